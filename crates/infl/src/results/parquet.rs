//! Parquet copies of a results directory for dataframe tools (`score --parquet`):
//! `top_k.parquet`, one row per line of `top_k.jsonl` (`query_id`, `direction`, `rank`,
//! `sequence_id`, `score`, `text`), and with `--dense` `scores.parquet`, one row per training
//! sequence in corpus order: `sequence_id` (`ROW:WINDOW`), then one f32 column per query,
//! named by its id. Each file's key-value metadata holds the run's `meta.json` under
//! [`META_KEY`]. Files are written atomically; the dense one streams, one row group per chunk
//! of sequences.

use super::TopEntry;
use crate::data::Sequence;
use crate::error::{Error, Result};
use crate::io::AtomicFile;
use arrow_array::{ArrayRef, Float32Array, Float64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The key of the run's `meta.json` in the files' key-value metadata.
pub const META_KEY: &str = "infl.meta";

fn writer(path: &Path, schema: Arc<Schema>, meta_json: &str) -> Result<ArrowWriter<AtomicFile>> {
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(vec![KeyValue::new(
            META_KEY.to_string(),
            meta_json.to_string(),
        )]))
        .build();
    let out = AtomicFile::create(path)?;
    ArrowWriter::try_new(out, schema, Some(props)).map_err(|e| parquet_error(path, e))
}

fn parquet_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("{}: writing Parquet: {e}", path.display()))
}

fn finish(path: &Path, w: ArrowWriter<AtomicFile>) -> Result<()> {
    w.into_inner().map_err(|e| parquet_error(path, e))?.commit()
}

/// Writes `top_k.parquet`: the rows of `top_k.jsonl` (per-layer and per-token parts stay in
/// the JSONL).
pub fn write_top_k_parquet(path: &Path, entries: &[TopEntry], meta_json: &str) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("query_id", DataType::Utf8, false),
        Field::new("direction", DataType::Utf8, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("sequence_id", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("text", DataType::Utf8, true),
    ]));
    let direction = |e: &TopEntry| match serde_json::to_value(e.direction) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            entries.iter().map(|e| &e.query_id),
        )),
        Arc::new(StringArray::from_iter_values(entries.iter().map(direction))),
        Arc::new(UInt32Array::from_iter_values(
            entries.iter().map(|e| e.rank as u32),
        )),
        Arc::new(StringArray::from_iter_values(
            entries.iter().map(|e| &e.sequence_id),
        )),
        Arc::new(Float64Array::from_iter_values(
            entries.iter().map(|e| e.score),
        )),
        Arc::new(StringArray::from_iter(
            entries.iter().map(|e| e.text.as_deref()),
        )),
    ];
    let batch =
        RecordBatch::try_new(schema.clone(), columns).map_err(|e| parquet_error(path, e))?;
    let mut w = writer(path, schema, meta_json)?;
    w.write(&batch).map_err(|e| parquet_error(path, e))?;
    finish(path, w)
}

/// Writes `scores.parquet` from a finished `scores.safetensors`, the sequence ids pushed in
/// corpus order ([`DenseParquet::push`]).
pub struct DenseParquet {
    path: PathBuf,
    writer: ArrowWriter<AtomicFile>,
    schema: Arc<Schema>,
    /// `scores.safetensors`, mapped: `[n_queries, n_train]` f32, row-major.
    map: memmap2::Mmap,
    data_start: usize,
    n_queries: usize,
    n_train: usize,
    written: usize,
}

impl DenseParquet {
    pub fn create(
        path: &Path,
        dense: &Path,
        query_ids: &[String],
        meta_json: &str,
    ) -> Result<Self> {
        let file = std::fs::File::open(dense).map_err(|e| Error::io(dense, e))?;
        // SAFETY: the file was just written and committed by this run; nothing rewrites it.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(dense, e))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| Error::Mismatch(format!("{}: {e}", dense.display())))?;
        let view = st
            .tensor("scores")
            .map_err(|e| Error::Mismatch(format!("{}: {e}", dense.display())))?;
        let (n_queries, n_train) = match view.shape() {
            [q, n] if *q == query_ids.len() => (*q, *n),
            shape => {
                return Err(Error::Mismatch(format!(
                    "{}: `scores` has shape {shape:?}, not [{}, _]",
                    dense.display(),
                    query_ids.len()
                )))
            }
        };
        let data_start = view.data().as_ptr() as usize - map.as_ptr() as usize;
        let mut fields = vec![Field::new("sequence_id", DataType::Utf8, false)];
        fields.extend(
            query_ids
                .iter()
                .map(|q| Field::new(q, DataType::Float32, false)),
        );
        let schema = Arc::new(Schema::new(fields));
        Ok(DenseParquet {
            path: path.to_path_buf(),
            writer: writer(path, schema.clone(), meta_json)?,
            schema,
            map,
            data_start,
            n_queries,
            n_train,
            written: 0,
        })
    }

    /// The next `chunk` of training sequences, in corpus order, as one row group.
    pub fn push(&mut self, chunk: &[Sequence]) -> Result<()> {
        let (k0, k1) = (self.written, self.written + chunk.len());
        if k1 > self.n_train {
            return Err(Error::Mismatch(format!(
                "the corpus holds more than the {} sequences the dense scores have",
                self.n_train
            )));
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(
            chunk.iter().map(|s| &s.id),
        ))];
        for q in 0..self.n_queries {
            let at = |k: usize| {
                let o = self.data_start + 4 * (q * self.n_train + k);
                let b = self.map.get(o..o + 4).unwrap_or(&[0; 4]);
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            };
            columns.push(Arc::new(Float32Array::from_iter_values((k0..k1).map(at))));
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| parquet_error(&self.path, e))?;
        self.writer
            .write(&batch)
            .and_then(|()| self.writer.flush())
            .map_err(|e| parquet_error(&self.path, e))?;
        self.written = k1;
        Ok(())
    }

    /// Checks that every sequence came, then renames the file into place.
    pub fn finish(self) -> Result<()> {
        if self.written != self.n_train {
            return Err(Error::Mismatch(format!(
                "the corpus holds {} sequences, the dense scores {}",
                self.written, self.n_train
            )));
        }
        finish(&self.path, self.writer)
    }
}

/// Writes the Parquet copies of a finished results directory `out` (after
/// `scores.safetensors`, before `meta.json`): `top_k.parquet`, and with `dense`
/// `scores.parquet`, whose sequence ids come from streaming the corpus again (token ids only,
/// no model), refused if it no longer hashes as it did.
pub fn write_results_parquet(
    out: &Path,
    meta: &super::meta::ScoresMeta,
    top: &[TopEntry],
) -> Result<()> {
    let meta_json = serde_json::to_string(meta).map_err(|e| Error::Other(e.to_string()))?;
    write_top_k_parquet(&out.join("top_k.parquet"), top, &meta_json)?;
    if !meta.options.dense {
        return Ok(());
    }
    let mut dense = DenseParquet::create(
        &out.join("scores.parquet"),
        &out.join("scores.safetensors"),
        &meta.queries.ids,
        &meta_json,
    )?;
    let corpus = Path::new(&meta.corpus.path);
    let mut tok = crate::data::LazyTokenizer::new(Path::new(&meta.model.path));
    let stats = crate::data::stream_corpus_columns(
        corpus,
        &meta.options.columns,
        &mut tok,
        meta.corpus.max_len,
        usize::MAX,
        4096,
        |chunk| dense.push(chunk),
    )?;
    if stats.sha256 != meta.corpus.sha256 {
        return Err(Error::Mismatch(format!(
            "{} changed while it was scored (sha256 {}…, scored {}…)",
            corpus.display(),
            &stats.sha256[..12],
            &meta.corpus.sha256[..12.min(meta.corpus.sha256.len())]
        )));
    }
    dense.finish()
}
