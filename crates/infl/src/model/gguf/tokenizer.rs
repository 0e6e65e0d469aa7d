//! The tokenizer a GGUF file's metadata describes, built as a Hugging Face `tokenizers` one.

use super::file::{GgufFile, Value};
use crate::error::{Error, Result};
use std::path::Path;

/// The byte-level BPE tokenizer a `tokenizer.ggml.model = gpt2` GGUF file describes (GPT-2
/// regex pre-tokenizer, no BOS added: `add_bos_token` is honoured only by chat templates).
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
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<usize> = match f.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.as_usize().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    // Control (3) and user-defined (4) tokens match as whole special tokens, as transformers does.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    json.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::input(format!("{}: cannot build the tokenizer: {e}", f.path)))
}
