//! Corpora and queries from Hugging Face `datasets` files on disk: Parquet (`to_parquet`), Arrow
//! IPC in the file and the stream format, and a `save_to_disk` directory (`data-*.arrow` stream
//! files beside `state.json`). Record batches are streamed; each row becomes the same JSON object
//! a JSONL line would be (only the columns the caller reads are converted), so the rules of
//! `data.rs` (fields, ids `ROW:WINDOW`, errors) hold unchanged, ROW counting from 1 like LINE.
//!
//! Also [`Columns`]: which column (or JSONL field) holds a document's text or token ids.

use crate::error::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Which column of a table (or field of a JSONL line) holds a training document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Columns {
    /// Column (table) or field (JSONL) of the training documents' text.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value = "text", value_name = "NAME")
    )]
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Column (table) or field (JSONL) of pre-tokenised documents' token ids; when given it
    /// must be present in every row [default: `ids` where a row has it, else the text].
    #[cfg_attr(feature = "clap", arg(long, value_name = "NAME"))]
    #[serde(default)]
    pub tokens_column: Option<String>,
}

fn default_text_column() -> String {
    "text".into()
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            text_column: default_text_column(),
            tokens_column: None,
        }
    }
}

/// The layout of a tabular input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Parquet,
    IpcFile,
    IpcStream,
    /// A `Dataset.save_to_disk` directory: its `data-*.arrow` files in order.
    DatasetDir,
}

const PARQUET_MAGIC: &[u8] = b"PAR1";
const IPC_FILE_MAGIC: &[u8] = b"ARROW1";
/// An IPC stream opens with a continuation marker before its schema message.
const IPC_STREAM_MARKER: &[u8] = &[0xff, 0xff, 0xff, 0xff];

/// Which table layout `path` is, or `None` for JSONL: a directory is a `save_to_disk` dataset;
/// a file is told by its first bytes (so the extension does not matter), a `.parquet`,
/// `.arrow`, `.ipc` or `.feather` file that is none of them is refused.
pub fn layout(path: &Path) -> Result<Option<Layout>> {
    if path.is_dir() {
        return Ok(Some(Layout::DatasetDir));
    }
    let mut head = [0u8; 6];
    let mut file = super::open_input(path)?;
    let n = read_up_to(&mut file, &mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(PARQUET_MAGIC) {
        return Ok(Some(Layout::Parquet));
    }
    if head.starts_with(IPC_FILE_MAGIC) {
        return Ok(Some(Layout::IpcFile));
    }
    if head.starts_with(IPC_STREAM_MARKER) {
        return Ok(Some(Layout::IpcStream));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ["parquet", "arrow", "ipc", "feather"].contains(&ext) {
        return Err(Error::input(format!(
            "{}: neither a Parquet file nor Arrow IPC (file or stream): its first bytes are {head:02x?}",
            path.display()
        )));
    }
    Ok(None)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The data files of a `save_to_disk` directory, in row order: `state.json`'s `_data_files`
/// when present (that is the order `datasets` reads them in), else the `data-*.arrow` files
/// sorted by name.
pub fn dataset_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let state = dir.join("state.json");
    if state.exists() {
        let text = std::fs::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("{}: malformed JSON: {e}", state.display())))?;
        let files = v.get("_data_files").and_then(Value::as_array);
        let names: Option<Vec<&str>> = files.map(|fs| {
            fs.iter()
                .filter_map(|f| f.get("filename").and_then(Value::as_str))
                .collect()
        });
        match names {
            Some(names) if !names.is_empty() => {
                return Ok(names.into_iter().map(|n| dir.join(n)).collect())
            }
            _ => {
                return Err(Error::input(format!(
                    "{}: `_data_files` must list the dataset's files as {{\"filename\": ...}}",
                    state.display()
                )))
            }
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("data-") && name.ends_with(".arrow")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::input(format!(
            "{}: a directory input must be a `datasets` save_to_disk directory (state.json and data-*.arrow files), and it has neither",
            dir.display()
        )));
    }
    Ok(files)
}

/// SHA-256 of a `save_to_disk` directory: of its data files' bytes, concatenated in row order
/// (the metadata files change with `datasets` versions, the rows do not).
pub fn sha256_dir(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in dataset_files(dir)? {
        let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(super::hex(&hasher.finalize()))
}

/// Streams the rows of the table at `path` as JSON objects holding the `wanted` columns the
/// table has (others are not converted); `f(row, at, object)` with ROW from 1 and `at` naming
/// the file and row for error messages.
pub fn for_each_row(
    path: &Path,
    layout: Layout,
    wanted: &[&str],
    mut f: impl FnMut(usize, &str, &Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let mut row = 0usize;
    let mut batch_rows = |file: &Path, batch: RecordBatch| -> Result<()> {
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            row += 1;
            let at = format!("{}: row {row}", path.display());
            let mut obj = Map::new();
            for (c, field) in schema.fields().iter().enumerate() {
                let value = cell(batch.column(c).as_ref(), i).map_err(|e| {
                    Error::input(format!(
                        "{}: row {row}: column `{}`: {e}",
                        file.display(),
                        field.name()
                    ))
                })?;
                obj.insert(field.name().clone(), value);
            }
            f(row, &at, &obj)?;
        }
        Ok(())
    };
    let files = match layout {
        Layout::DatasetDir => dataset_files(path)?,
        _ => vec![path.to_path_buf()],
    };
    for file in files {
        let bad = |e: &dyn std::fmt::Display| {
            Error::input(format!("{}: cannot read the table: {e}", file.display()))
        };
        let open = File::open(&file).map_err(|e| Error::io(&file, e))?;
        match layout {
            Layout::Parquet => {
                use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
                use parquet::arrow::ProjectionMask;
                let builder =
                    ParquetRecordBatchReaderBuilder::try_new(open).map_err(|e| bad(&e))?;
                let roots = projection(builder.schema(), wanted);
                let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
                let reader = builder.with_projection(mask).build().map_err(|e| bad(&e))?;
                for batch in reader {
                    batch_rows(&file, batch.map_err(|e| bad(&e))?)?;
                }
            }
            Layout::IpcFile => {
                let schema = arrow_ipc::reader::FileReader::try_new(BufReader::new(&open), None)
                    .map_err(|e| bad(&e))?
                    .schema();
                let reader = arrow_ipc::reader::FileReader::try_new(
                    BufReader::new(open),
                    Some(projection(&schema, wanted)),
                )
                .map_err(|e| bad(&e))?;
                for batch in reader {
                    batch_rows(&file, batch.map_err(|e| bad(&e))?)?;
                }
            }
            Layout::IpcStream | Layout::DatasetDir => {
                let reader = arrow_ipc::reader::StreamReader::try_new(BufReader::new(open), None)
                    .map_err(|e| bad(&e))?;
                for batch in reader {
                    let batch = batch.map_err(|e| bad(&e))?;
                    let keep = projection(batch.schema().as_ref(), wanted);
                    let batch = batch.project(&keep).map_err(|e| bad(&e))?;
                    batch_rows(&file, batch)?;
                }
            }
        }
    }
    Ok(())
}

/// Indices of the `wanted` columns that `schema` has, in schema order.
fn projection(schema: &Schema, wanted: &[&str]) -> Vec<usize> {
    schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| wanted.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect()
}

/// Row `i` of `array` as JSON: strings, numbers, booleans, lists and structs (a `messages`
/// column is a list of structs); null is `null`.
fn cell(array: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    macro_rules! num {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(i))
        };
    }
    Ok(match array.data_type() {
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(array.as_string_view().value(i)),
        DataType::Boolean => Value::from(array.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => num!(Float32Type),
        DataType::Float64 => num!(Float64Type),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(array.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut obj = Map::new();
            for (k, field) in fields.iter().enumerate() {
                obj.insert(field.name().clone(), cell(s.column(k).as_ref(), i)?);
            }
            Value::Object(obj)
        }
        other => return Err(format!("values of type {other} are not supported")),
    })
}

fn list(values: &dyn Array) -> std::result::Result<Value, String> {
    (0..values.len())
        .map(|k| cell(values, k))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_corpus, read_queries, stream_corpus_columns, LazyTokenizer};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tabular")
            .join(name)
    }

    #[test]
    fn layouts_are_told_by_content() {
        assert_eq!(
            layout(&fixture("corpus.parquet")).unwrap(),
            Some(Layout::Parquet)
        );
        assert_eq!(
            layout(&fixture("corpus.arrow")).unwrap(),
            Some(Layout::IpcFile)
        );
        assert_eq!(
            layout(&fixture("corpus_stream.arrow")).unwrap(),
            Some(Layout::IpcStream)
        );
        assert_eq!(
            layout(&fixture("corpus_dataset")).unwrap(),
            Some(Layout::DatasetDir)
        );
        assert_eq!(layout(&fixture("corpus.jsonl")).unwrap(), None);
        let e = layout(&fixture("corpus.jsonl").with_extension("parquet.missing"));
        assert!(e.is_err());
    }

    #[test]
    fn token_columns_are_windowed_with_row_ids() {
        let mut tok = LazyTokenizer::new(Path::new("/nonexistent-model-dir"));
        let columns = Columns {
            tokens_column: Some("input_ids".into()),
            ..Columns::default()
        };
        let mut got = Vec::new();
        let stats = stream_corpus_columns(
            &fixture("tokens.parquet"),
            &columns,
            &mut tok,
            2,
            10,
            100,
            |c| {
                got.extend(c.iter().map(|s| (s.id.clone(), s.ids.clone())));
                Ok(())
            },
        )
        .unwrap();
        let want: Vec<(String, Vec<u32>)> = vec![
            ("1:0".into(), vec![1, 2]),
            ("1:1".into(), vec![3, 4]),
            ("1:2".into(), vec![5]),
            ("2:0".into(), vec![6]),
            ("3:0".into(), vec![7, 8]),
            ("3:1".into(), vec![9]),
        ];
        assert_eq!(got, want);
        assert_eq!(
            stats.sha256,
            crate::data::sha256_file(&fixture("tokens.parquet")).unwrap()
        );
        // Without --tokens-column, the table has neither `text` nor `ids`.
        let e = read_corpus(&fixture("tokens.parquet"), &mut tok, 2, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokens.parquet: row 1") && e.contains("`text`"),
            "{e}"
        );
        let e = stream_corpus_columns(
            &fixture("tokens_bad.parquet"),
            &columns,
            &mut tok,
            2,
            10,
            1,
            |_| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tokens_bad.parquet: row 2") && e.contains("`input_ids`[1] = 999"),
            "{e}"
        );
    }

    #[test]
    fn dataset_directories_hash_their_data_files_in_order() {
        let dir = fixture("corpus_dataset");
        let files = dataset_files(&dir).unwrap();
        assert_eq!(files.len(), 2);
        let mut bytes = std::fs::read(&files[0]).unwrap();
        bytes.extend(std::fs::read(&files[1]).unwrap());
        use sha2::Digest;
        let want = crate::data::hex(&sha2::Sha256::digest(&bytes));
        assert_eq!(crate::data::sha256_file(&dir).unwrap(), want);
    }

    #[test]
    fn queries_read_from_a_table_match_jsonl() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-gpt2");
        let mut tok = LazyTokenizer::new(&model);
        let (a, _) = read_queries(&fixture("queries.parquet"), &mut tok, 64, 512).unwrap();
        let (b, _) = read_queries(&fixture("queries.jsonl"), &mut tok, 64, 512).unwrap();
        let key =
            |q: &crate::data::Query| (q.id.clone(), q.prompt_ids.clone(), q.completion_ids.clone());
        assert_eq!(
            a.iter().map(key).collect::<Vec<_>>(),
            b.iter().map(key).collect::<Vec<_>>()
        );
        assert_eq!(a.len(), 4);
    }
}
