//! The tokenizer a GGUF file's metadata describes, built as a Hugging Face `tokenizers` one.
//!
//! The vocabulary and merges are in the file; how text is split before BPE is only named, by
//! `tokenizer.ggml.pre` (llama.cpp's converter identifies the original tokenizer.json and writes
//! its name). Each name maps to the pre-tokenizer of the original tokenizer.json, because that
//! is what the model was trained on: SmolLM2's (`smollm`) splits every digit off before the
//! GPT-2 regex, and without it `"\n\n1"` is `Ċ Ċ 1` instead of `ĊĊ 1`. A name this module does
//! not know is refused, never tokenised with a guess.

use super::file::{GgufFile, Value};
use crate::error::{Error, Result};
use serde_json::{json, Value as Json};
use std::path::Path;

/// Llama 3's split (its tokenizer.json), digits in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (its tokenizer.json), every digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The normalizer and pre-tokenizer of the original tokenizer.json that `pre` (a
/// `tokenizer.ggml.pre` value, absent: `None`) names, as tokenizer.json objects.
fn pre_tokenizer(pre: Option<&str>) -> Option<(Json, Json)> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": use_regex})
    };
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                "invert": false},
            byte_level(false)]})
    };
    Some(match pre {
        // GPT-2's byte-level regex (what transformers' GGUF loader builds for every file).
        None | Some("default" | "gpt2" | "gpt-2") => (Json::Null, byte_level(true)),
        // llama.cpp splits `\p{N}` off first for these, as their tokenizer.json's
        // `Digits(individual_digits)` does, then applies the GPT-2 regex.
        Some("smollm" | "starcoder" | "refact" | "codeshell") => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        Some("llama3" | "llama-v3" | "llama-bpe") => (Json::Null, split(LLAMA3_SPLIT)),
        Some("qwen2") => (json!({"type": "NFC"}), split(QWEN2_SPLIT)),
        Some(_) => return None,
    })
}

/// The byte-level BPE tokenizer a `tokenizer.ggml.model = gpt2` GGUF file describes, split as
/// its `tokenizer.ggml.pre` names (no BOS added: `add_bos_token` is honoured only by chat
/// templates).
pub fn tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let f = GgufFile::open(path)?;
    let model = f.meta_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::input(format!(
            "{}: GGUF tokenizer model `{model}` is not supported (only gpt2-style byte-level BPE); pre-tokenise the corpus and queries (`ids`, `prompt_ids`/`completion_ids`)",
            f.path
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        match f.meta(key)? {
            Value::Array(v) => v
                .iter()
                .map(|x| {
                    x.as_str().map(String::from).ok_or_else(|| {
                        Error::input(format!("{}: `{key}` must be an array of strings", f.path))
                    })
                })
                .collect(),
            _ => Err(Error::input(format!(
                "{}: `{key}` must be an array",
                f.path
            ))),
        }
    };
    let pre = match f.metadata.get("tokenizer.ggml.pre") {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| {
            Error::input(format!("{}: `tokenizer.ggml.pre` must be a string", f.path))
        })?),
    };
    let Some((normalizer, pre_tokenizer)) = pre_tokenizer(pre) else {
        return Err(Error::input(format!(
            "{}: GGUF pre-tokenizer `{}` is not supported (gpt2, smollm, starcoder, refact, \
             codeshell, llama3/llama-bpe and qwen2 are): its text would be split differently \
             from the model's own tokenizer. Pre-tokenise the corpus and queries (`ids`, \
             `prompt_ids`/`completion_ids`)",
            f.path,
            pre.unwrap_or_default()
        )));
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<usize> = match f.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.as_usize().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    build(&tokens, merges, &types, (normalizer, pre_tokenizer))
        .map_err(|e| Error::input(format!("{}: cannot build the tokenizer: {e}", f.path)))
}

/// The byte-level BPE of `tokens` (ids in order) and `merges`, with `types`' control and
/// user-defined tokens as special tokens, split by the `(normalizer, pre_tokenizer)` given.
fn build(
    tokens: &[String],
    merges: Vec<String>,
    types: &[usize],
    (normalizer, pre_tokenizer): (Json, Json),
) -> std::result::Result<tokenizers::Tokenizer, tokenizers::Error> {
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), Json::from(i)))
        .collect();
    // Control (3) and user-defined (4) tokens match as whole special tokens, as transformers does.
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    json.to_string().parse::<tokenizers::Tokenizer>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each pre-tokenizer splits `text` (before BPE), worked by hand from the regexes.
    fn splits(pre: &str, text: &str) -> Vec<String> {
        let (normalizer, pre_tokenizer) = pre_tokenizer(Some(pre)).unwrap();
        let tok = build(&["a".into()], vec![], &[1], (normalizer, pre_tokenizer)).unwrap();
        let mut pts = tokenizers::PreTokenizedString::from(text);
        use tokenizers::PreTokenizer;
        tok.get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut pts)
            .unwrap();
        pts.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
    }

    #[test]
    fn each_pre_type_splits_as_its_original_tokenizer() {
        // GPT-2: a whitespace run leaves its last character (`\s+(?!\S)`), which a digit
        // run takes if it is a space. Ġ is the space, Ċ the newline in the byte-level alphabet.
        assert_eq!(splits("gpt2", "\n\n1"), ["Ċ", "Ċ", "1"]);
        assert_eq!(splits("gpt2", "x  2024"), ["x", "Ġ", "Ġ2024"]);
        // SmolLM2: every digit split off first, so the whitespace runs stay together.
        assert_eq!(splits("smollm", "\n\n1"), ["ĊĊ", "1"]);
        assert_eq!(splits("smollm", "x  2024"), ["x", "ĠĠ", "2", "0", "2", "4"]);
        // Llama 3: newline runs on their own, digits in threes.
        assert_eq!(splits("llama-bpe", "\n\n1"), ["ĊĊ", "1"]);
        assert_eq!(splits("llama-bpe", "x  2024"), ["x", "Ġ", "Ġ", "202", "4"]);
        // Qwen2: digits one by one; a letter run takes one leading non-letter.
        assert_eq!(
            splits("qwen2", "x  2024"),
            ["x", "Ġ", "Ġ", "2", "0", "2", "4"]
        );
        assert_eq!(splits("qwen2", "(Hello"), ["(Hello"]);
        assert_eq!(splits("gpt2", "(Hello"), ["(", "Hello"]);
    }

    #[test]
    fn smollm_ids_keep_a_newline_run_before_a_digit_whole() {
        let tokens: Vec<String> = ["Ċ", "1", "ĊĊ"].map(String::from).to_vec();
        let ids = |pre| {
            let tok = build(
                &tokens,
                vec!["Ċ Ċ".into()],
                &[1, 1, 1],
                pre_tokenizer(pre).unwrap(),
            )
            .unwrap();
            tok.encode("\n\n1", false).unwrap().get_ids().to_vec()
        };
        assert_eq!(ids(Some("smollm")), [2, 1]);
        // Without the digit split (what transformers' GGUF loader builds): `Ċ Ċ 1`.
        assert_eq!(ids(None), [0, 0, 1]);
    }

    #[test]
    fn unknown_pre_types_are_refused() {
        assert!(pre_tokenizer(Some("deepseek-llm")).is_none());
        assert!(pre_tokenizer(Some("tekken")).is_none());
    }
}
