//! The dense `[n_queries, n_train]` score matrix as `scores.safetensors`, written without
//! holding it: each query's row streams to a file of its own ([`DenseWriter`]), and the
//! header and rows are then joined into the results (or merged from shards' rows).

use crate::error::{Error, Result};
use crate::io;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `[n_queries, n_train]` f32 scores as safetensors without holding the matrix: each
/// query's row grows in its own temporary file; `finish` writes the header and concatenates.
pub struct DenseWriter {
    parts: Vec<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl DenseWriter {
    pub fn new(dir: &Path, n_queries: usize) -> Result<Self> {
        let mut parts = Vec::with_capacity(n_queries);
        for q in 0..n_queries {
            let p = dir.join(format!(".scores-row-{q}.tmp-{}", std::process::id()));
            let f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
            parts.push((p, std::io::BufWriter::new(f)));
        }
        Ok(DenseWriter { parts })
    }

    /// Row files at fixed paths holding `columns` columns already (a resumed pass): anything
    /// written after the last checkpoint is cut off.
    pub fn resume(paths: Vec<PathBuf>, columns: u64) -> Result<Self> {
        let mut parts = Vec::with_capacity(paths.len());
        for p in paths {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            let have = f.metadata().map_err(|e| Error::io(&p, e))?.len();
            if have < columns * 4 {
                return Err(Error::Mismatch(format!(
                    "{}: holds {} scores, its checkpoint says {columns}; rerun with --fresh",
                    p.display(),
                    have / 4
                )));
            }
            f.set_len(columns * 4).map_err(|e| Error::io(&p, e))?;
            parts.push((p, std::io::BufWriter::new(f)));
        }
        Ok(DenseWriter { parts })
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        for (p, w) in self.parts.iter_mut() {
            w.flush().map_err(|e| Error::io(p.as_path(), e))?;
            w.get_ref()
                .sync_data()
                .map_err(|e| Error::io(p.as_path(), e))?;
        }
        Ok(())
    }

    /// Closes the row files, keeping them (a shard's part of the dense matrix).
    pub fn close(mut self) -> Result<()> {
        self.flush()
    }

    pub(super) fn append(&mut self, rows: &[Vec<f32>]) -> Result<()> {
        for ((p, w), row) in self.parts.iter_mut().zip(rows) {
            for x in row {
                w.write_all(&x.to_le_bytes())
                    .map_err(|e| Error::io(p.as_path(), e))?;
            }
        }
        Ok(())
    }

    pub(super) fn finish(self, path: &Path, query_ids: &[String], n_train: usize) -> Result<()> {
        let mut out = start_dense_file(path, query_ids, (self.parts.len(), n_train))?;
        for (p, w) in self.parts {
            w.into_inner().map_err(|e| Error::io(&p, e.into_error()))?;
            let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            std::io::copy(&mut f, &mut out).map_err(|e| Error::io(out.tmp_path(), e))?;
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
        out.commit()
    }
}

/// Starts `scores.safetensors` at `path` (committed by the caller once the `[n_q, n_train]`
/// f32 values follow): its length-prefixed header, padded to 8 bytes.
fn start_dense_file(
    path: &Path,
    query_ids: &[String],
    (n_q, n_train): (usize, usize),
) -> Result<io::AtomicFile> {
    let bytes = n_q * n_train * 4;
    let header = serde_json::json!({
        "__metadata__": {
            "query_ids": serde_json::to_string(query_ids).unwrap_or_default(),
            "columns": "training sequences in corpus order (ids LINE:WINDOW as in top_k.jsonl)",
        },
        "scores": {"dtype": "F32", "shape": [n_q, n_train], "data_offsets": [0, bytes]},
    });
    let mut header = serde_json::to_vec(&header).map_err(|e| Error::Other(e.to_string()))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = io::AtomicFile::create(path)?;
    out.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&header))
        .map_err(|e| Error::io(out.tmp_path(), e))?;
    Ok(out)
}

/// Writes the dense `[n_queries, n_train]` matrix from shards' row files: `rows[i][q]` holds
/// shard i's scores for query q, for the sequences k ≡ i (mod N) in corpus order. Reads and
/// writes one value at a time per shard; never holds a row.
pub fn write_dense_from_shards(
    path: &Path,
    query_ids: &[String],
    rows: &[Vec<PathBuf>],
    n_train: usize,
) -> Result<()> {
    use std::io::Read;
    let n_shards = rows.len();
    let mut out = start_dense_file(path, query_ids, (query_ids.len(), n_train))?;
    for q in 0..query_ids.len() {
        let mut readers = rows
            .iter()
            .map(|r| {
                let p = &r[q];
                std::fs::File::open(p)
                    .map(std::io::BufReader::new)
                    .map_err(|e| Error::io(p, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut value = [0u8; 4];
        for k in 0..n_train {
            let i = k % n_shards;
            readers[i].read_exact(&mut value).map_err(|e| {
                Error::Mismatch(format!(
                    "{}: ends before sequence {k} ({e}); the shard is incomplete",
                    rows[i][q].display()
                ))
            })?;
            out.write_all(&value)
                .map_err(|e| Error::io(out.tmp_path(), e))?;
        }
    }
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sequence;
    use crate::results::ScoreAccumulator;
    use faer::Mat;

    fn seq(i: usize) -> Sequence {
        Sequence {
            id: format!("{i}:0"),
            ids: vec![i as u32],
        }
    }

    #[test]
    fn dense_writer_produces_a_valid_safetensors_file() {
        let dir = std::env::temp_dir().join(format!("infl-dense-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut acc = ScoreAccumulator::new(2, 1, 1, Some(DenseWriter::new(&dir, 2).unwrap()));
        let seqs: Vec<Sequence> = (0..3).map(seq).collect();
        acc.add(
            &[0, 1],
            &seqs[..2],
            &[Mat::from_fn(2, 2, |q, n| (q * 10 + n) as f32)],
            None,
            None,
        )
        .unwrap();
        acc.add(
            &[2],
            &seqs[2..],
            &[Mat::from_fn(2, 1, |q, _| (q * 10 + 2) as f32)],
            None,
            None,
        )
        .unwrap();
        let path = dir.join("scores.safetensors");
        acc.finish_dense(&path, &["a".into(), "b".into()], 3)
            .unwrap();
        let t = crate::io::read_safetensors(&path).unwrap();
        assert_eq!(
            t["scores"],
            (vec![2, 3], vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
