//! Conversations rendered with the model's own chat template, as `transformers`'
//! `apply_chat_template` renders them: the template of `tokenizer_config.json` (or
//! `chat_template.jinja`) beside the checkpoint, or the GGUF file's `tokenizer.chat_template`,
//! run by minijinja with Jinja2's settings as Hugging Face uses them (`trim_blocks`,
//! `lstrip_blocks`, loop controls, `raise_exception`, a `tojson` that writes what Python's
//! `json.dumps` writes, `bos_token`/`eos_token`, Python's string methods).
//!
//! A query given as `messages` measures its final assistant turn: the prompt is everything
//! before it rendered with `add_generation_prompt`, the completion is the rest of the whole
//! conversation's rendering, and the token ids are those of the whole rendering, split where
//! the prompt's own tokens end (refused if the prompt's tokens are not a prefix). A training
//! document given as `messages` is rendered whole.

use super::LazyTokenizer;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A compiled chat template and the special tokens it is rendered with.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// `source` as a template, `origin` naming where it came from in errors.
    pub fn new(source: String, bos_token: String, eos_token: String, origin: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::input(format!("{origin}: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("the chat template refused the conversation: {msg}"),
                ))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source).map_err(|e| {
            Error::input(format!("{origin}: the chat template does not parse: {e:#}"))
        })?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The chat template of a checkpoint directory or a `.gguf` file.
    pub fn load(model: &Path) -> Result<Self> {
        if crate::model::gguf::is_gguf(model) {
            return Self::from_gguf(model);
        }
        let config_path = model.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::input(format!("{}: malformed JSON: {e}", config_path.display()))
            })?,
            Err(_) => Value::Null,
        };
        let jinja = model.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?
        } else {
            template_of_config(&config).ok_or_else(|| {
                Error::input(format!(
                    "{}: conversations (`messages`) need the model's chat template, and neither {} has `chat_template` nor does {} exist",
                    model.display(),
                    config_path.display(),
                    jinja.display()
                ))
            })?
        };
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        };
        let origin = config_path.display().to_string();
        Self::new(source, token("bos_token"), token("eos_token"), &origin)
    }

    fn from_gguf(path: &Path) -> Result<Self> {
        use crate::model::gguf::{GgufFile, Value as G};
        let f = GgufFile::open(path)?;
        let source = match f.metadata.get("tokenizer.chat_template") {
            Some(G::Str(s)) => s.clone(),
            _ => {
                return Err(Error::input(format!(
                    "{}: conversations (`messages`) need the model's chat template, and the file has no `tokenizer.chat_template`",
                    path.display()
                )))
            }
        };
        let tokens = match f.metadata.get("tokenizer.ggml.tokens") {
            Some(G::Array(v)) => v.as_slice(),
            _ => &[],
        };
        let token = |key: &str| match f.metadata.get(key) {
            Some(G::Int(i)) => usize::try_from(*i)
                .ok()
                .and_then(|i| tokens.get(i))
                .and_then(|t| match t {
                    G::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            _ => String::new(),
        };
        let origin = path.display().to_string();
        Self::new(
            source,
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
            &origin,
        )
    }

    /// The text of `messages` (a JSON array of `{"role", "content"}` objects).
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        at: &str,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::input(format!("{at}: {e}")))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template
            .render(ctx)
            .map_err(|e| Error::input(format!("{at}: rendering the chat template failed: {e:#}")))
    }
}

/// `chat_template` of a tokenizer_config.json: a string, or a list of named templates (the one
/// named `default` is used).
fn template_of_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

/// Hugging Face's `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent)`, so
/// `", "` and `": "` between items on one line, no HTML escaping.
fn tojson(
    value: minijinja::Value,
    indent: Option<usize>,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let bad = |e: serde_json::Error| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    };
    let json = serde_json::to_value(&value).map_err(bad)?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            serde::Serialize::serialize(
                &json,
                &mut serde_json::Serializer::with_formatter(&mut out, fmt),
            )
        }
        None => serde::Serialize::serialize(
            &json,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter),
        ),
    };
    written.map_err(bad)?;
    Ok(minijinja::Value::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// serde_json's compact output with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `messages` of a JSON object as a conversation: a non-empty array of objects, each with a
/// string `role`.
pub fn messages<'a>(v: &'a Value, at: &str) -> Result<&'a [Value]> {
    let list = v.as_array().filter(|l| !l.is_empty()).ok_or_else(|| {
        Error::input(format!(
            "{at}: field `messages` must be a non-empty array of {{\"role\", \"content\"}} objects"
        ))
    })?;
    for (k, m) in list.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(Error::input(format!(
                "{at}: field `messages`[{k}] must be an object with a string `role`"
            )));
        }
    }
    Ok(list.as_slice())
}

/// A conversation query: token ids split at the final assistant turn, and the two texts.
#[derive(Debug)]
pub struct ChatQuery {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub prompt: String,
    pub completion: String,
}

impl LazyTokenizer {
    fn chat(&mut self) -> Result<&ChatTemplate> {
        if self.chat.is_none() {
            let model = if self.gguf {
                self.path.clone()
            } else {
                self.path.parent().unwrap_or(Path::new("")).to_path_buf()
            };
            self.chat = Some(ChatTemplate::load(&model)?);
        }
        Ok(self.chat.as_ref().expect("loaded above"))
    }

    /// Token ids of a whole conversation (a training document given as `messages`).
    pub fn encode_conversation(&mut self, messages: &[Value], at: &str) -> Result<Vec<u32>> {
        let text = self.chat()?.render(messages, false, at)?;
        self.encode(&text, at)
    }

    /// A query given as `messages`: the final turn, which must be the assistant's, is the
    /// completion; the ids are exactly those of the whole rendered conversation.
    pub fn encode_chat_query(&mut self, messages: &[Value], at: &str) -> Result<ChatQuery> {
        let (last, before) = messages
            .split_last()
            .ok_or_else(|| Error::input(format!("{at}: field `messages` is empty")))?;
        if last.get("role").and_then(Value::as_str) != Some("assistant") {
            return Err(Error::input(format!(
                "{at}: the last of `messages` must be the assistant's turn (it is the completion measured)"
            )));
        }
        if before.is_empty() {
            return Err(Error::input(format!(
                "{at}: `messages` needs at least one turn before the assistant's (the prompt)"
            )));
        }
        let template = self.chat()?;
        let prompt = template.render(before, true, at)?;
        let whole = template.render(messages, false, at)?;
        let completion = whole.strip_prefix(prompt.as_str()).ok_or_else(|| {
            Error::input(format!(
                "{at}: the chat template renders the conversation without its last turn (with the generation prompt) as text that does not begin the whole conversation's, so the completion cannot be cut from it"
            ))
        })?;
        let completion = completion.to_string();
        let prompt_ids = self.encode(&prompt, at)?;
        let mut ids = self.encode(&whole, at)?;
        if !ids.starts_with(&prompt_ids) {
            return Err(Error::input(format!(
                "{at}: the prompt's tokens are not a prefix of the whole conversation's (a token spans the prompt/completion boundary)"
            )));
        }
        let completion_ids = ids.split_off(prompt_ids.len());
        Ok(ChatQuery {
            prompt_ids,
            completion_ids,
            prompt,
            completion,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/chat/expected.json: `transformers`' `apply_chat_template` token ids for
    /// four templates and four conversations (made by make_fixture.py there).
    #[test]
    fn token_ids_equal_transformers_apply_chat_template() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat");
        let text = std::fs::read_to_string(root.join("expected.json")).unwrap();
        let expected: Value = serde_json::from_str(&text).unwrap();
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let mut checked = 0;
        for (name, cases) in expected.as_object().unwrap() {
            let mut tok = LazyTokenizer::new(&root.join(name));
            for (k, case) in cases.as_array().unwrap().iter().enumerate() {
                let at = format!("{name} case {k}");
                let messages = case["messages"].as_array().unwrap();
                if let Some(err) = case.get("error") {
                    let e = tok
                        .encode_conversation(messages, &at)
                        .unwrap_err()
                        .to_string();
                    assert!(e.contains(err.as_str().unwrap()), "{at}: {e}");
                    continue;
                }
                let whole = ids(&case["ids"]);
                let prompt = ids(&case["prompt_ids"]);
                assert_eq!(
                    tok.encode_conversation(messages, &at).unwrap(),
                    whole,
                    "{at}"
                );
                match tok.encode_chat_query(messages, &at) {
                    Ok(q) => {
                        assert_eq!(q.prompt_ids, prompt, "{at}");
                        assert_eq!([q.prompt_ids, q.completion_ids].concat(), whole, "{at}");
                        assert!(case["text"].as_str().unwrap().ends_with(&q.completion));
                    }
                    // The `tools` template stops at a turn starting with STOP, so the prompt
                    // is not a prefix of the whole: refused rather than cut wrongly.
                    Err(e) => assert!(!whole.starts_with(&prompt), "{at}: {e}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 15);
    }

    /// `messages` in query and corpus files (JSONL here; tables convert rows to the same
    /// objects) go through the template.
    #[test]
    fn query_and_corpus_files_take_messages() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat");
        let text = std::fs::read_to_string(root.join("expected.json")).unwrap();
        let expected: Value = serde_json::from_str(&text).unwrap();
        let case = &expected["chatml"][1];
        let dir = std::env::temp_dir().join(format!("infl-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = serde_json::json!({"id": "c", "messages": case["messages"]}).to_string();
        let queries = dir.join("q.jsonl");
        std::fs::write(&queries, format!("{line}\n")).unwrap();
        let mut tok = LazyTokenizer::new(&root.join("chatml"));
        let (q, _) = crate::data::read_queries(&queries, &mut tok, 1000, 514).unwrap();
        let whole: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(q[0].prompt_ids, prompt);
        assert_eq!(
            [q[0].prompt_ids.clone(), q[0].completion_ids.clone()].concat(),
            whole
        );
        assert_eq!(q[0].completion.as_deref(), Some("Tarn.<|im_end|>\n"));
        let c = crate::data::read_corpus(&queries, &mut tok, 1000, 514).unwrap();
        assert_eq!(c.sequences[0].ids, whole);
        // The model's vocabulary is checked against the rendered ids too.
        let e = crate::data::read_queries(&queries, &mut tok, 1000, 512)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q.jsonl:1") && e.contains("outside the model's vocabulary"),
            "{e}"
        );
    }

    #[test]
    fn queries_need_a_final_assistant_turn_and_a_template() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat");
        let mut tok = LazyTokenizer::new(&root.join("chatml"));
        let user: Value = serde_json::json!([{"role": "user", "content": "hi"}]);
        let e = tok
            .encode_chat_query(user.as_array().unwrap(), "q.jsonl:3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("q.jsonl:3") && e.contains("assistant"), "{e}");
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-gpt2");
        let e = LazyTokenizer::new(&model)
            .encode_conversation(user.as_array().unwrap(), "c.jsonl:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat_template"), "{e}");
        let e = messages(&serde_json::json!([{"content": "x"}]), "c.jsonl:2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.jsonl:2") && e.contains("`role`"), "{e}");
    }
}
