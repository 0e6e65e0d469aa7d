//! Data stage: corpora and queries from JSONL, tokenisation, windowing into training sequences.
//!
//! A corpus line is one document, `{"text": ...}` or pre-tokenised `{"ids": [...]}`. A document
//! longer than `max_len` tokens is cut into consecutive windows; each window is one training
//! sequence with the stable id `LINE:WINDOW` (LINE counts from 1 like an editor, WINDOW from 0).
//! Blank lines are skipped (they still count for LINE), and so is a UTF-8 byte-order mark at the
//! start of a file. A field whose name is a near miss of a known one (`txt`, `Text`,
//! `completion_id`) is refused rather than ignored; other extra fields (metadata) are allowed.
//! [`check_corpus`] runs those checks over a whole corpus without tokenising it, so that a
//! job can refuse a bad line before its first forward pass.
//!
//! Tables (Parquet, Arrow IPC, a `datasets` directory) are read by [`tabular`], one row as one
//! line (ROW from 1); conversations (`messages`) are rendered by [`chat`].

pub mod chat;
pub mod tabular;
pub use tabular::Columns;

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Loads the model's tokenizer on first use (`tokenizer.json` of a checkpoint directory, or the
/// vocabulary in a GGUF file's metadata): a pre-tokenised corpus and queries need none at all.
pub struct LazyTokenizer {
    path: PathBuf,
    /// The tokenizer is built from a GGUF file's metadata rather than read from tokenizer.json.
    gguf: bool,
    loaded: Option<tokenizers::Tokenizer>,
    /// The chat template, read when the first conversation comes.
    chat: Option<chat::ChatTemplate>,
}

impl LazyTokenizer {
    /// `model` is a checkpoint directory or a `.gguf` file.
    pub fn new(model: &Path) -> Self {
        let gguf = crate::model::gguf::is_gguf(model);
        LazyTokenizer {
            path: if gguf {
                model.to_path_buf()
            } else {
                model.join("tokenizer.json")
            },
            gguf,
            loaded: None,
            chat: None,
        }
    }

    /// A tokenizer already in memory (one just trained).
    pub fn loaded(tokenizer: tokenizers::Tokenizer) -> Self {
        LazyTokenizer {
            path: PathBuf::new(),
            gguf: false,
            loaded: Some(tokenizer),
            chat: None,
        }
    }

    /// Whether `tokenizer.json` exists (decoding text for reports is optional).
    pub fn available(&self) -> bool {
        self.loaded.is_some() || self.path.exists()
    }

    pub fn get(&mut self, needed_by: &str) -> Result<&tokenizers::Tokenizer> {
        if self.loaded.is_none() {
            if !self.path.exists() {
                return Err(Error::input(format!(
                    "{needed_by} holds text, so the model's tokenizer is needed, but {} does not exist (pre-tokenise with `ids` / `prompt_ids`+`completion_ids`, or add tokenizer.json)",
                    self.path.display()
                )));
            }
            let tok = if self.gguf {
                crate::model::gguf::tokenizer(&self.path)?
            } else {
                tokenizers::Tokenizer::from_file(&self.path).map_err(|e| {
                    Error::input(format!(
                        "{}: cannot load tokenizer: {e}",
                        self.path.display()
                    ))
                })?
            };
            self.loaded = Some(tok);
        }
        Ok(self.loaded.as_ref().expect("loaded above"))
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&mut self, text: &str, needed_by: &str) -> Result<Vec<u32>> {
        let tok = self.get(needed_by)?;
        let enc = tok
            .encode(text, false)
            .map_err(|e| Error::input(format!("{needed_by}: tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, or `None` when there is no tokenizer.
    pub fn decode(&mut self, ids: &[u32]) -> Option<String> {
        if !self.available() {
            return None;
        }
        self.get("decoding").ok()?.decode(ids, false).ok()
    }
}

/// One training sequence: a window of one document.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// `LINE:WINDOW`.
    pub id: String,
    pub ids: Vec<u32>,
}

/// A corpus cut into training sequences, in corpus order.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub path: PathBuf,
    pub sequences: Vec<Sequence>,
    pub n_documents: usize,
    /// SHA-256 of the file's bytes.
    pub sha256: String,
}

impl Corpus {
    pub fn n_tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.ids.len()).sum()
    }
}

/// One query: the completion whose −log p given the prompt is measured.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub prompt: Option<String>,
    pub completion: Option<String>,
}

/// The fields a corpus line may hold.
const CORPUS_FIELDS: &[&str] = &["text", "ids", "messages"];
/// The fields a query line may hold.
const QUERY_FIELDS: &[&str] = &[
    "id",
    "prompt",
    "completion",
    "prompt_ids",
    "completion_ids",
    "messages",
];

/// Refuses a field whose name is a near miss of a known one (same letters in another case, or
/// at most a quarter of its letters edited): it would be ignored silently, and a query's `Id`
/// or a document's `txt` would then give a wrong id or a missing text.
fn check_field_names(
    obj: &serde_json::Map<String, serde_json::Value>,
    known: &[&str],
    at: &str,
) -> Result<()> {
    for key in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        let near = known.iter().find(|k| {
            k.eq_ignore_ascii_case(key) || strsim::normalized_damerau_levenshtein(k, key) >= 0.75
        });
        if let Some(near) = near {
            return Err(Error::input(format!(
                "{at}: unknown field `{key}`: did you mean `{near}`? (a line holds {})",
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
}

/// Opens an input file; one that does not exist is bad input naming the path.
fn open_input(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::input(format!("{}: no such file", path.display())),
        _ => Error::io(path, e),
    })
}

/// Reads `path` line by line as JSON objects; `f(line_number, object)` for each non-blank line.
/// Streams: memory does not grow with the file. Returns the SHA-256 of the file's bytes.
fn for_each_json_line(
    path: &Path,
    mut f: impl FnMut(usize, &serde_json::Map<String, serde_json::Value>) -> Result<()>,
) -> Result<String> {
    use std::io::BufRead;
    let file = open_input(path)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut line = Vec::new();
    let mut line_no = 0;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&line);
        line_no += 1;
        let text = std::str::from_utf8(&line).map_err(|e| {
            Error::input(format!(
                "{}:{line_no}: not valid UTF-8: {e}",
                path.display()
            ))
        })?;
        // Editors on Windows start UTF-8 files with a byte-order mark; it is no part of the JSON.
        let text = match line_no {
            1 => text.strip_prefix('\u{feff}').unwrap_or(text),
            _ => text,
        };
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            Error::input(format!("{}:{line_no}: malformed JSON: {e}", path.display()))
        })?;
        let obj = value.as_object().ok_or_else(|| {
            Error::input(format!(
                "{}:{line_no}: expected a JSON object",
                path.display()
            ))
        })?;
        f(line_no, obj)?;
    }
    Ok(hex(&hasher.finalize()))
}

/// Reads a JSONL file or a table (see [`tabular::layout`]) record by record:
/// `f(number, at, object)` with `at` naming file and line or row. Only the `wanted` columns of
/// a table are read. Returns the SHA-256 of the input ([`sha256_file`]).
fn for_each_record(
    path: &Path,
    wanted: &[&str],
    mut f: impl FnMut(usize, &str, &serde_json::Map<String, serde_json::Value>) -> Result<()>,
) -> Result<String> {
    match tabular::layout(path)? {
        Some(layout) => {
            tabular::for_each_row(path, layout, wanted, f)?;
            sha256_file(path)
        }
        None => for_each_json_line(path, |line, obj| {
            f(line, &format!("{}:{line}", path.display()), obj)
        }),
    }
}

fn ids_field(
    obj: &serde_json::Map<String, serde_json::Value>,
    field: &str,
    at: &str,
    vocab_size: usize,
) -> Result<Option<Vec<u32>>> {
    let Some(v) = obj.get(field) else {
        return Ok(None);
    };
    let arr = v.as_array().ok_or_else(|| {
        Error::input(format!(
            "{at}: field `{field}` must be an array of token ids"
        ))
    })?;
    let mut ids = Vec::with_capacity(arr.len());
    for (k, x) in arr.iter().enumerate() {
        let id = x
            .as_u64()
            .filter(|&i| (i as usize) < vocab_size)
            .ok_or_else(|| {
                Error::input(format!(
                    "{at}: field `{field}`[{k}] = {x} is not a token id in 0..{vocab_size}"
                ))
            })?;
        ids.push(id as u32);
    }
    Ok(Some(ids))
}

fn text_field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    field: &str,
    at: &str,
) -> Result<Option<&'a str>> {
    match obj.get(field) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| Error::input(format!("{at}: field `{field}` must be a string"))),
    }
}

fn check_vocab(ids: &[u32], vocab_size: usize, at: &str) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= vocab_size) {
        Some(bad) => Err(Error::input(format!(
            "{at}: the tokenizer produced id {bad}, outside the model's vocabulary of {vocab_size}: tokenizer.json does not match the model"
        ))),
        None => Ok(()),
    }
}

/// One corpus record: pre-tokenised ids, text for the tokenizer, or a conversation for the
/// chat template.
enum Document<'a> {
    Ids(Vec<u32>),
    Text(&'a str),
    Messages(&'a serde_json::Value),
}

/// The document of a corpus record in the chosen `columns`, its fields checked.
fn document<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    at: &str,
    vocab_size: usize,
    columns: &Columns,
) -> Result<Document<'a>> {
    let tokens = columns.tokens_column.as_deref().unwrap_or("ids");
    let text = columns.text_column.as_str();
    let known = [tokens, text, "messages"];
    check_field_names(obj, &known, at)?;
    if let Some(ids) = ids_field(obj, tokens, at, vocab_size)? {
        return Ok(Document::Ids(ids));
    }
    if columns.tokens_column.is_some() {
        return Err(Error::input(format!("{at}: missing field `{tokens}`")));
    }
    if let Some(text) = text_field(obj, text, at)? {
        return Ok(Document::Text(text));
    }
    match obj.get("messages") {
        Some(messages) => Ok(Document::Messages(messages)),
        None => Err(Error::input(format!(
            "{at}: missing field `{text}` (or pre-tokenised `{tokens}`, or a conversation's `messages`){}",
            closest_unknown(obj, &known)
        ))),
    }
}

/// Where a required field is missing: the unknown field most like a known one, as a hint
/// (`; found `idz`: did you mean `ids`?`), or nothing.
fn closest_unknown(obj: &serde_json::Map<String, serde_json::Value>, known: &[&str]) -> String {
    let mut best: Option<(f64, &str, &str)> = None;
    for key in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        for k in known {
            let sim = strsim::normalized_damerau_levenshtein(k, key);
            if sim >= 0.5 && best.is_none_or(|(b, _, _)| sim > b) {
                best = Some((sim, key, k));
            }
        }
    }
    best.map_or(String::new(), |(_, key, k)| {
        format!("; found `{key}`: did you mean `{k}`?")
    })
}

/// What [`check_corpus`] found.
#[derive(Debug, Clone)]
pub struct CorpusCheck {
    pub n_documents: usize,
    /// SHA-256 of the file's bytes.
    pub sha256: String,
}

/// Checks every record of a corpus (JSONL or a table) (JSON, fields and their types, token ids in the
/// vocabulary, the tokenizer present where a line holds text) without tokenising it: what a
/// job runs before its first forward pass, so a bad line 10 million is found in seconds.
pub fn check_corpus(
    path: &Path,
    columns: &Columns,
    tokenizer: &mut LazyTokenizer,
    vocab_size: usize,
) -> Result<CorpusCheck> {
    let (mut n_documents, mut with_tokens) = (0usize, 0usize);
    let tokens = columns.tokens_column.as_deref().unwrap_or("ids");
    let text = columns.text_column.as_str();
    let sha256 = for_each_record(path, &[tokens, text, "messages"], |_, at, obj| {
        let empty = match document(obj, at, vocab_size, columns)? {
            Document::Ids(ids) => ids.is_empty(),
            Document::Text(text) => {
                tokenizer.get(at)?;
                text.is_empty()
            }
            Document::Messages(messages) => {
                chat::messages(messages, at)?;
                tokenizer.get(at)?;
                false
            }
        };
        n_documents += 1;
        with_tokens += usize::from(!empty);
        Ok(())
    })?;
    if with_tokens == 0 {
        return Err(no_tokens(path));
    }
    Ok(CorpusCheck {
        n_documents,
        sha256,
    })
}

fn no_tokens(path: &Path) -> Error {
    Error::input(format!(
        "{}: the corpus holds no tokens (every line is blank or empty)",
        path.display()
    ))
}

/// What a streamed pass over a corpus saw.
#[derive(Debug, Clone)]
pub struct CorpusStats {
    pub n_documents: usize,
    pub n_sequences: usize,
    pub n_tokens: usize,
    pub sha256: String,
}

/// Streams a JSONL corpus, cutting each document into windows of at most `max_len` tokens, and
/// hands them to `f` in chunks of about `chunk` sequences (in corpus order). Memory holds one
/// chunk, whatever the corpus size.
pub fn stream_corpus(
    path: &Path,
    tokenizer: &mut LazyTokenizer,
    max_len: usize,
    vocab_size: usize,
    chunk: usize,
    f: impl FnMut(&[Sequence]) -> Result<()>,
) -> Result<CorpusStats> {
    let columns = Columns::default();
    stream_corpus_columns(path, &columns, tokenizer, max_len, vocab_size, chunk, f)
}

/// [`stream_corpus`] with the document's text or token ids in the chosen `columns`; a record
/// with neither but `messages` is a conversation, rendered whole with the chat template.
pub fn stream_corpus_columns(
    path: &Path,
    columns: &Columns,
    tokenizer: &mut LazyTokenizer,
    max_len: usize,
    vocab_size: usize,
    chunk: usize,
    mut f: impl FnMut(&[Sequence]) -> Result<()>,
) -> Result<CorpusStats> {
    crate::options::MAX_LEN.check(max_len)?;
    let mut pending: Vec<Sequence> = Vec::new();
    let (mut n_documents, mut n_sequences, mut n_tokens) = (0, 0, 0);
    let tokens = columns.tokens_column.as_deref().unwrap_or("ids");
    let text = columns.text_column.as_str();
    let sha256 = for_each_record(path, &[tokens, text, "messages"], |line, at, obj| {
        let ids = match document(obj, at, vocab_size, columns)? {
            Document::Ids(ids) => ids,
            Document::Text(text) => {
                let ids = tokenizer.encode(text, at)?;
                check_vocab(&ids, vocab_size, at)?;
                ids
            }
            Document::Messages(messages) => {
                let ids = tokenizer.encode_conversation(chat::messages(messages, at)?, at)?;
                check_vocab(&ids, vocab_size, at)?;
                ids
            }
        };
        n_documents += 1;
        n_tokens += ids.len();
        for (w, window) in ids.chunks(max_len).enumerate() {
            pending.push(Sequence {
                id: format!("{line}:{w}"),
                ids: window.to_vec(),
            });
            n_sequences += 1;
        }
        if pending.len() >= chunk.max(1) {
            f(&pending)?;
            pending.clear();
        }
        Ok(())
    })?;
    if !pending.is_empty() {
        f(&pending)?;
    }
    if n_sequences == 0 {
        return Err(no_tokens(path));
    }
    Ok(CorpusStats {
        n_documents,
        n_sequences,
        n_tokens,
        sha256,
    })
}

/// The `text` of every document of a JSONL corpus, in file order (what a tokenizer trains on).
/// Pre-tokenised lines (`ids`) are refused: they carry no text.
pub fn read_texts(path: &Path) -> Result<(Vec<String>, String)> {
    let mut texts = Vec::new();
    let sha256 = for_each_record(path, &["text"], |_, at, obj| {
        check_field_names(obj, CORPUS_FIELDS, at)?;
        match text_field(obj, "text", at)? {
            Some(text) => {
                texts.push(text.to_string());
                Ok(())
            }
            None => Err(Error::input(format!(
                "{at}: missing field `text` (training a tokenizer needs text, not `ids`)"
            ))),
        }
    })?;
    if texts.is_empty() {
        return Err(Error::input(format!(
            "{}: the corpus holds no documents",
            path.display()
        )));
    }
    Ok((texts, sha256))
}

/// Reads a whole JSONL corpus into memory (token ids only), cut into windows.
pub fn read_corpus(
    path: &Path,
    tokenizer: &mut LazyTokenizer,
    max_len: usize,
    vocab_size: usize,
) -> Result<Corpus> {
    let mut sequences = Vec::new();
    let stats = stream_corpus(path, tokenizer, max_len, vocab_size, 1024, |chunk| {
        sequences.extend_from_slice(chunk);
        Ok(())
    })?;
    Ok(Corpus {
        path: path.to_path_buf(),
        sequences,
        n_documents: stats.n_documents,
        sha256: stats.sha256,
    })
}

/// Reads a JSONL query file. Token ids are `encode(prompt) ++ encode(completion)`, each encoded
/// separately, so the completion boundary is exact.
pub fn read_queries(
    path: &Path,
    tokenizer: &mut LazyTokenizer,
    max_positions: usize,
    vocab_size: usize,
) -> Result<(Vec<Query>, String)> {
    let mut queries: Vec<Query> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let sha = for_each_record(path, QUERY_FIELDS, |line, at, obj| {
        let at = at.to_string();
        let id = match obj.get("id") {
            None | Some(serde_json::Value::Null) => line.to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => {
                return Err(Error::input(format!(
                    "{at}: field `id` must be a string or number"
                )))
            }
        };
        if !seen.insert(id.clone()) {
            return Err(Error::input(format!("{at}: duplicate query id `{id}`")));
        }
        queries.push(query_fields(
            id,
            obj,
            &at,
            tokenizer,
            max_positions,
            vocab_size,
        )?);
        Ok(())
    })?;
    if queries.is_empty() {
        return Err(Error::input(format!("{}: no queries", path.display())));
    }
    Ok((queries, sha))
}

/// One query from its JSON object's fields (`prompt` + `completion`, `messages`, or
/// `prompt_ids` + `completion_ids`), checked as a query file's line is; `at` names the place
/// in errors. The server reads its requests' queries with it.
pub fn query_fields(
    id: String,
    obj: &serde_json::Map<String, serde_json::Value>,
    at: &str,
    tokenizer: &mut LazyTokenizer,
    max_positions: usize,
    vocab_size: usize,
) -> Result<Query> {
    check_field_names(obj, QUERY_FIELDS, at)?;
    let (prompt_ids, completion_ids, prompt, completion) = match (
        ids_field(obj, "prompt_ids", at, vocab_size)?,
        ids_field(obj, "completion_ids", at, vocab_size)?,
    ) {
        (Some(p), Some(c)) => (p, c, None, None),
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::input(format!(
                "{at}: pre-tokenised queries need both `prompt_ids` and `completion_ids`"
            )))
        }
        (None, None) if obj.contains_key("messages") && !obj.contains_key("prompt") => {
            let messages = obj.get("messages").unwrap_or(&serde_json::Value::Null);
            let q = tokenizer.encode_chat_query(chat::messages(messages, at)?, at)?;
            check_vocab(&q.prompt_ids, vocab_size, at)?;
            check_vocab(&q.completion_ids, vocab_size, at)?;
            (
                q.prompt_ids,
                q.completion_ids,
                Some(q.prompt),
                Some(q.completion),
            )
        }
        (None, None) => {
            let missing = |field: &str| {
                Error::input(format!(
                    "{at}: missing field `{field}`{}",
                    closest_unknown(obj, QUERY_FIELDS)
                ))
            };
            let prompt = text_field(obj, "prompt", at)?.ok_or_else(|| missing("prompt"))?;
            let completion =
                text_field(obj, "completion", at)?.ok_or_else(|| missing("completion"))?;
            let p = tokenizer.encode(prompt, at)?;
            let c = tokenizer.encode(completion, at)?;
            check_vocab(&p, vocab_size, at)?;
            check_vocab(&c, vocab_size, at)?;
            (p, c, Some(prompt.to_string()), Some(completion.to_string()))
        }
    };
    if completion_ids.is_empty() {
        return Err(Error::input(format!(
            "{at}: field `completion` is empty: there is nothing to measure"
        )));
    }
    if prompt_ids.is_empty() {
        return Err(Error::input(format!(
            "{at}: field `prompt` is empty: the first completion token needs a preceding token"
        )));
    }
    let len = prompt_ids.len() + completion_ids.len();
    if len > max_positions {
        return Err(Error::input(format!(
            "{at}: prompt + completion is {len} tokens, longer than the model's context of {max_positions}"
        )));
    }
    Ok(Query {
        id,
        prompt_ids,
        completion_ids,
        prompt,
        completion,
    })
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's bytes, streamed (of a `datasets` directory: its data files', [`tabular::sha256_dir`]).
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    if path.is_dir() {
        return tabular::sha256_dir(path);
    }
    let mut f = open_input(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infl-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn no_tokenizer() -> LazyTokenizer {
        LazyTokenizer::new(Path::new("/nonexistent-model-dir"))
    }

    #[test]
    fn windows_get_stable_ids() {
        let p = write("c1.jsonl", "{\"ids\": [1,2,3,4,5]}\n\n{\"ids\": [6]}\n");
        let c = read_corpus(&p, &mut no_tokenizer(), 2, 10).unwrap();
        let ids: Vec<_> = c
            .sequences
            .iter()
            .map(|s| (s.id.as_str(), s.ids.clone()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("1:0", vec![1, 2]),
                ("1:1", vec![3, 4]),
                ("1:2", vec![5]),
                ("3:0", vec![6])
            ]
        );
        assert_eq!(c.n_documents, 2);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let p = write("c2.jsonl", "{\"ids\": [1]}\n{\"txt\": \"x\"}\n");
        let e = read_corpus(&p, &mut no_tokenizer(), 4, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c2.jsonl:2") && e.contains("`text`"), "{e}");

        let p = write("c3.jsonl", "{\"ids\": [1]}\n{\"ids\": [1, 99]}\n");
        let e = read_corpus(&p, &mut no_tokenizer(), 4, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c3.jsonl:2") && e.contains("`ids`[1]"), "{e}");

        let p = write("c4.jsonl", "{\"ids\": [1]\n");
        let e = read_corpus(&p, &mut no_tokenizer(), 4, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c4.jsonl:1") && e.contains("malformed JSON"),
            "{e}"
        );

        let p = write("c5.jsonl", "{\"text\": \"hello\"}\n");
        let e = read_corpus(&p, &mut no_tokenizer(), 4, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.json"), "{e}");

        let p = write(
            "q1.jsonl",
            "{\"prompt_ids\": [1], \"completion_ids\": []}\n",
        );
        let e = read_queries(&p, &mut no_tokenizer(), 8, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("q1.jsonl:1") && e.contains("empty"), "{e}");

        let p = write("q2.jsonl", "{\"prompt\": \"a\"}\n");
        let e = read_queries(&p, &mut no_tokenizer(), 8, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q2.jsonl:1") && e.contains("`completion`"),
            "{e}"
        );

        let p = write(
            "q3.jsonl",
            "{\"prompt_ids\": [1,2,3], \"completion_ids\": [4,5,6]}\n",
        );
        let e = read_queries(&p, &mut no_tokenizer(), 5, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than the model's context"), "{e}");

        let p = write("c6.jsonl", "\n\n");
        let e = read_corpus(&p, &mut no_tokenizer(), 4, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tokens"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_near_miss_fields_are_refused() {
        let p = write("bom.jsonl", "\u{feff}{\"ids\": [1, 2]}\n{\"ids\": [3]}\n");
        let c = read_corpus(&p, &mut no_tokenizer(), 4, 10).unwrap();
        assert_eq!(c.sequences[0].ids, vec![1, 2]);
        assert_eq!(
            check_corpus(&p, &Columns::default(), &mut no_tokenizer(), 10)
                .unwrap()
                .n_documents,
            2
        );
        // Only the first line may start with the mark.
        let p = write("bom2.jsonl", "{\"ids\": [1]}\n\u{feff}{\"ids\": [3]}\n");
        let e = read_corpus(&p, &mut no_tokenizer(), 4, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bom2.jsonl:2") && e.contains("malformed JSON"),
            "{e}"
        );

        // Metadata fields pass; near misses of known ones do not, wherever they are.
        let p = write(
            "meta.jsonl",
            "{\"ids\": [1], \"id\": 7, \"source\": \"web\"}\n{\"ids\": [2], \"txt\": \"x\"}\n",
        );
        let e = check_corpus(&p, &Columns::default(), &mut no_tokenizer(), 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("meta.jsonl:2") && e.contains("`txt`") && e.contains("`text`"),
            "{e}"
        );
        let p = write(
            "q5.jsonl",
            "{\"prompt_ids\": [1], \"completion_ids\": [2], \"Id\": \"x\"}\n",
        );
        let e = read_queries(&p, &mut no_tokenizer(), 8, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("q5.jsonl:1") && e.contains("`Id`"), "{e}");

        // The check reads every line without tokenising, and wants a tokenizer for text.
        let p = write(
            "late.jsonl",
            "{\"ids\": [1]}\n{\"ids\": [1]}\n{\"ids\": [1, \"x\"]}\n",
        );
        let e = check_corpus(&p, &Columns::default(), &mut no_tokenizer(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("late.jsonl:3") && e.contains("`ids`[1]"), "{e}");
        let p = write("text.jsonl", "{\"text\": \"a\"}\n");
        let e = check_corpus(&p, &Columns::default(), &mut no_tokenizer(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        let e = check_corpus(
            Path::new("/nonexistent/c.jsonl"),
            &Columns::default(),
            &mut no_tokenizer(),
            10,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Input(_)) && e.to_string().contains("no such file"),
            "{e}"
        );
    }

    #[test]
    fn query_ids_default_to_line_numbers() {
        let p = write(
            "q4.jsonl",
            "{\"prompt_ids\": [1], \"completion_ids\": [2]}\n{\"id\": \"x\", \"prompt_ids\": [1], \"completion_ids\": [2, 3]}\n",
        );
        let (q, _) = read_queries(&p, &mut no_tokenizer(), 8, 10).unwrap();
        assert_eq!(q[0].id, "1");
        assert_eq!(q[1].id, "x");
        assert_eq!(q[1].completion_ids, vec![2, 3]);
    }
}
