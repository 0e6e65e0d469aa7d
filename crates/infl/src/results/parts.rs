//! The per-layer parts of every scored sequence, as a layer partition's scoring pass leaves
//! them for the join (`score --partition`, [`crate::partition`]): a score is a sum over layers,
//! so the partitions' parts, laid side by side in the model's layer order, are exactly the
//! parts an unpartitioned pass reduces, and the join reduces them the same way.
//!
//! `parts.SHARD.bin` holds fixed-size little-endian records, one per sequence in pass order:
//! the sequence's corpus index (u64), its self-influence over the partition's layers (f64; 0
//! unless scores are cosine-normalised), one byte per query saying whether the query scores it
//! (1: a candidate, 2: in the pre-filter's recall sample, 0: neither), then the parts (f32),
//! layer-major: `[layer][query]`. `parts.SHARD.json` ([`PartsInfo`]) is written once the pass
//! is complete, with the record count and the pass's `meta.json`.

use super::meta::ScoresMeta;
use crate::error::{Error, Result};
use faer::Mat;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Whether query `q` scores a sequence: as [`super::Prefilter`] decides, or always.
pub const NOT_SCORED: u8 = 0;
pub const CANDIDATE: u8 = 1;
pub const SAMPLED: u8 = 2;

/// What a finished partition pass records next to its parts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartsInfo {
    pub records: u64,
    pub n_queries: usize,
    /// The partition's layers, in the order of each record's parts.
    pub layers: Vec<String>,
    /// The model's vocabulary size (the join re-reads the corpus with the same checks).
    pub vocab_size: usize,
    /// The pass's `meta.json`: its queries' self-influence and damping cover these layers only.
    pub meta: ScoresMeta,
}

/// Bytes of one record for `n_queries` queries and `n_layers` layers.
pub fn record_bytes(n_queries: usize, n_layers: usize) -> u64 {
    16 + n_queries as u64 + 4 * (n_queries * n_layers) as u64
}

pub fn parts_path(dir: &Path, shard_tag: &str) -> PathBuf {
    dir.join(format!("parts.{shard_tag}.bin"))
}

pub fn info_path(dir: &Path, shard_tag: &str) -> PathBuf {
    dir.join(format!("parts.{shard_tag}.json"))
}

/// Appends records; resumes at a checkpoint's record count (anything after it is cut off).
pub struct PartsWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    records: u64,
    n_queries: usize,
    n_layers: usize,
}

impl PartsWriter {
    pub fn resume(path: PathBuf, records: u64, n_queries: usize, n_layers: usize) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let want = records * record_bytes(n_queries, n_layers);
        let have = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        if have < want {
            return Err(Error::Mismatch(format!(
                "{}: holds {have} bytes, its checkpoint says {records} records ({want} bytes); rerun with --fresh",
                path.display()
            )));
        }
        f.set_len(want).map_err(|e| Error::io(&path, e))?;
        Ok(PartsWriter {
            path,
            out: BufWriter::new(f),
            records,
            n_queries,
            n_layers,
        })
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// One batch: `parts[layer]` is queries × sequences; `own` the sequences' self-influence;
    /// `scored(q, n)` the flag of query `q` for sequence `n`.
    pub fn append(
        &mut self,
        indices: &[usize],
        parts: &[Mat<f32>],
        own: Option<&[f64]>,
        scored: impl Fn(usize, usize) -> u8,
    ) -> Result<()> {
        if parts.len() != self.n_layers {
            return Err(Error::Other(format!(
                "{}: a batch of {} layers' parts for a partition of {}",
                self.path.display(),
                parts.len(),
                self.n_layers
            )));
        }
        let record = record_bytes(self.n_queries, self.n_layers) as usize;
        let mut buf = Vec::with_capacity(record);
        for (n, &index) in indices.iter().enumerate() {
            buf.clear();
            buf.extend_from_slice(&(index as u64).to_le_bytes());
            let own = own.and_then(|o| o.get(n)).copied().unwrap_or(0.0);
            buf.extend_from_slice(&own.to_le_bytes());
            buf.extend((0..self.n_queries).map(|q| scored(q, n)));
            for layer in parts {
                for q in 0..self.n_queries {
                    buf.extend_from_slice(&layer[(q, n)].to_le_bytes());
                }
            }
            self.out
                .write_all(&buf)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        self.records += indices.len() as u64;
        Ok(())
    }

    /// Makes the records written so far durable (before a checkpoint records their count).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq)]
pub struct PartsRecord {
    pub index: usize,
    pub own: f64,
    pub scored: Vec<u8>,
    /// `[layer][query]`.
    pub parts: Vec<f32>,
}

/// Reads a finished pass's records in order.
pub struct PartsReader {
    path: PathBuf,
    input: BufReader<std::fs::File>,
    left: u64,
    n_queries: usize,
    n_layers: usize,
}

impl PartsReader {
    /// Opens `path` holding exactly `info.records` records (else it was cut or grown since).
    pub fn open(path: PathBuf, info: &PartsInfo) -> Result<Self> {
        let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let n_layers = info.layers.len();
        let want = info.records * record_bytes(info.n_queries, n_layers);
        let have = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        if have != want {
            return Err(Error::Mismatch(format!(
                "{}: {have} bytes, but its pass recorded {} records ({want} bytes); rerun that partition with --fresh",
                path.display(),
                info.records
            )));
        }
        Ok(PartsReader {
            path,
            input: BufReader::new(f),
            left: info.records,
            n_queries: info.n_queries,
            n_layers,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    pub fn next_record(&mut self) -> Result<Option<PartsRecord>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; record_bytes(self.n_queries, self.n_layers) as usize];
        self.input
            .read_exact(&mut buf)
            .map_err(|e| Error::io(&self.path, e))?;
        self.left -= 1;
        let word = |at: usize| -> [u8; 8] {
            let mut w = [0u8; 8];
            w.copy_from_slice(&buf[at..at + 8]);
            w
        };
        let nq = self.n_queries;
        let parts = buf[16 + nq..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Some(PartsRecord {
            index: u64::from_le_bytes(word(0)) as usize,
            own: f64::from_le_bytes(word(8)),
            scored: buf[16..16 + nq].to_vec(),
            parts,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_resume_cuts_what_follows_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("infl-parts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("parts.whole.bin");
        // 2 queries, 3 layers, a batch of 2 sequences: parts[l][(q, n)] = 100l + 10q + n.
        let parts: Vec<Mat<f32>> = (0..3)
            .map(|l| Mat::from_fn(2, 2, |q, n| (100 * l + 10 * q + n) as f32))
            .collect();
        let mut w = PartsWriter::resume(path.clone(), 0, 2, 3).unwrap();
        w.append(&[7, 9], &parts, Some(&[1.5, 2.5]), |q, n| (q + n) as u8 % 3)
            .unwrap();
        w.flush().unwrap();
        // A batch written after the checkpoint (at 2 records), then a resume: it is cut.
        w.append(&[11, 12], &parts, None, |_, _| CANDIDATE).unwrap();
        w.flush().unwrap();
        drop(w);
        let w = PartsWriter::resume(path.clone(), 2, 2, 3).unwrap();
        assert_eq!(w.records(), 2);
        drop(w);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            2 * record_bytes(2, 3)
        );
        let info = PartsInfo {
            records: 2,
            n_queries: 2,
            layers: vec!["a".into(), "b".into(), "c".into()],
            vocab_size: 10,
            meta: serde_json::from_str(include_str!(
                "../../../../tests/fixtures/format1/results_meta.json"
            ))
            .unwrap(),
        };
        let mut r = PartsReader::open(path, &info).unwrap();
        let first = r.next_record().unwrap().unwrap();
        assert_eq!(
            (first.index, first.own, first.scored.clone()),
            (7, 1.5, vec![0, 1])
        );
        assert_eq!(first.parts, vec![0.0, 10.0, 100.0, 110.0, 200.0, 210.0]);
        let second = r.next_record().unwrap().unwrap();
        assert_eq!((second.index, second.scored), (9, vec![1, 2]));
        assert_eq!(second.parts, vec![1.0, 11.0, 101.0, 111.0, 201.0, 211.0]);
        assert!(r.next_record().unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
