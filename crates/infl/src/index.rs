//! Candidate pre-filter: a BM25 index over the training sequences' token ids, so that
//! `infl score --prefilter N` computes gradients only for each query's N best lexical matches
//! (the paper cut 10M sequences to 10k per query with TF-IDF before the gradient pass).
//!
//! The index is over the *model's* token ids, built from the very windows `score` streams, so a
//! candidate is exactly one training sequence. It is an inverted file (postings sorted by
//! sequence) in a safetensors container with the corpus fingerprint in its header.

use crate::data::{self, LazyTokenizer, Query};
use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// BM25 constants (Robertson et al.; the usual defaults).
const K1: f32 = 1.2;
const B: f32 = 0.75;

pub const INDEX_FILE: &str = "index.safetensors";

/// A BM25 inverted index over token ids.
pub struct Bm25Index {
    /// `offsets[t]..offsets[t+1]` are term t's postings.
    offsets: Vec<u32>,
    post_seq: Vec<u32>,
    post_tf: Vec<u32>,
    doc_len: Vec<u32>,
    pub corpus_sha256: String,
    pub max_len: usize,
}

impl Bm25Index {
    /// Indexes `corpus` exactly as `score` would window it.
    pub fn build(
        corpus: &Path,
        tokenizer: &mut LazyTokenizer,
        max_len: usize,
        vocab_size: usize,
    ) -> Result<Self> {
        // Pass 1 collects (term, sequence, tf) triples; memory is proportional to the number of
        // distinct (term, sequence) pairs, which is what the index holds anyway.
        let mut triples: Vec<(u32, u32, u32)> = Vec::new();
        let mut doc_len: Vec<u32> = Vec::new();
        let stats = data::stream_corpus(corpus, tokenizer, max_len, vocab_size, 4096, |chunk| {
            for s in chunk {
                let d = doc_len.len() as u32;
                doc_len.push(s.ids.len() as u32);
                let mut tf: HashMap<u32, u32> = HashMap::new();
                for &t in &s.ids {
                    *tf.entry(t).or_default() += 1;
                }
                triples.extend(tf.into_iter().map(|(t, c)| (t, d, c)));
            }
            Ok(())
        })?;
        triples.sort_unstable();
        let mut offsets = vec![0u32; vocab_size + 1];
        for &(t, _, _) in &triples {
            offsets[t as usize + 1] += 1;
        }
        for t in 0..vocab_size {
            offsets[t + 1] += offsets[t];
        }
        Ok(Bm25Index {
            offsets,
            post_seq: triples.iter().map(|x| x.1).collect(),
            post_tf: triples.iter().map(|x| x.2).collect(),
            doc_len,
            corpus_sha256: stats.sha256,
            max_len,
        })
    }

    pub fn n_sequences(&self) -> usize {
        self.doc_len.len()
    }

    /// BM25 scores of every sequence for a bag of query terms.
    pub fn scores(&self, terms: &[u32]) -> Vec<f32> {
        let n = self.doc_len.len() as f32;
        let avg = self.doc_len.iter().map(|&l| l as f64).sum::<f64>() as f32 / n.max(1.0);
        let mut out = vec![0f32; self.doc_len.len()];
        let mut unique: Vec<u32> = terms.to_vec();
        unique.sort_unstable();
        unique.dedup();
        for t in unique {
            let Some(range) = self.postings(t) else {
                continue;
            };
            let df = range.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for p in range {
                let (d, tf) = (self.post_seq[p] as usize, self.post_tf[p] as f32);
                let norm = K1 * (1.0 - B + B * self.doc_len[d] as f32 / avg);
                out[d] += idf * tf * (K1 + 1.0) / (tf + norm);
            }
        }
        out
    }

    fn postings(&self, t: u32) -> Option<std::ops::Range<usize>> {
        let t = t as usize;
        (t + 1 < self.offsets.len()).then(|| self.offsets[t] as usize..self.offsets[t + 1] as usize)
    }

    /// The `n` best sequences (corpus indices) for a query's prompt and completion tokens,
    /// best first; ties broken by corpus order.
    pub fn candidates(&self, query: &Query, n: usize) -> Vec<usize> {
        let terms: Vec<u32> = query
            .prompt_ids
            .iter()
            .chain(&query.completion_ids)
            .copied()
            .collect();
        let scores = self.scores(&terms);
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        idx.truncate(n);
        idx
    }

    /// Writes the index into `out`, opened for [`Kind::Index`](crate::output_dir::Kind) (with
    /// its lock) before the index was built; an index of another corpus or window length there
    /// is refused unless `out` was opened to overwrite.
    pub fn save(&self, out: &crate::output_dir::OutputDir) -> Result<()> {
        out.claim(
            &serde_json::json!({
                "corpus_sha256": self.corpus_sha256,
                "max_len": self.max_len,
            }),
            false,
        )?;
        let dir = out.path();
        let bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let arrays = [
            ("offsets", bytes(&self.offsets)),
            ("postings_sequence", bytes(&self.post_seq)),
            ("postings_tf", bytes(&self.post_tf)),
            ("sequence_length", bytes(&self.doc_len)),
        ];
        let views: Vec<(String, TensorView<'_>)> = arrays
            .iter()
            .map(|(n, b)| {
                let view = TensorView::new(Dtype::U32, vec![b.len() / 4], b)
                    .map_err(|e| Error::Other(e.to_string()))?;
                Ok((n.to_string(), view))
            })
            .collect::<Result<_>>()?;
        let meta = HashMap::from([
            ("kind".to_string(), "infl-bm25-index".to_string()),
            ("corpus_sha256".to_string(), self.corpus_sha256.clone()),
            ("max_len".to_string(), self.max_len.to_string()),
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        let data =
            safetensors::serialize(views, Some(meta)).map_err(|e| Error::Other(e.to_string()))?;
        crate::io::write_atomic(&dir.join(INDEX_FILE), &data)
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(INDEX_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::input(format!(
                "{}: cannot read the index ({e}); build one with `infl index`",
                path.display()
            ))
        })?;
        let bad =
            |what: &str| Error::input(format!("{}: not an infl index ({what})", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|_| bad("unreadable header"))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| bad("no metadata"))?;
        if meta.get("kind").map(String::as_str) != Some("infl-bm25-index") {
            return Err(bad("wrong kind"));
        }
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|_| bad("unreadable tensors"))?;
        let array = |name: &str| -> Result<Vec<u32>> {
            let v = st.tensor(name).map_err(|_| bad(name))?;
            Ok(v.data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        Ok(Bm25Index {
            offsets: array("offsets")?,
            post_seq: array("postings_sequence")?,
            post_tf: array("postings_tf")?,
            doc_len: array("sequence_length")?,
            corpus_sha256: meta
                .get("corpus_sha256")
                .cloned()
                .ok_or_else(|| bad("corpus_sha256"))?,
            max_len: meta
                .get("max_len")
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| bad("max_len"))?,
        })
    }

    /// Refuses an index built from another corpus or another windowing.
    pub fn check(&self, dir: &Path, corpus: &Path, max_len: usize) -> Result<()> {
        let sha = data::sha256_file(corpus)?;
        if sha != self.corpus_sha256 {
            return Err(Error::Mismatch(format!(
                "the index in {} was built from another corpus (sha256 {}…), not {} (sha256 {}…); rebuild it with `infl index`",
                dir.display(),
                &self.corpus_sha256[..12],
                corpus.display(),
                &sha[..12]
            )));
        }
        if max_len != self.max_len {
            return Err(Error::Mismatch(format!(
                "the index in {} windows documents at {} tokens but scoring uses {max_len}; rebuild it with --max-len {max_len}",
                dir.display(),
                self.max_len
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output_dir::OutputDir;
    use crate::shard::Shard;

    #[test]
    fn bm25_ranks_matching_sequences_first_and_matches_the_formula() {
        let dir = std::env::temp_dir().join(format!("infl-index-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("c.jsonl");
        std::fs::write(
            &corpus,
            "{\"ids\": [1, 2, 3]}\n{\"ids\": [4, 4, 5, 6]}\n{\"ids\": [7, 8]}\n",
        )
        .unwrap();
        let mut tok = LazyTokenizer::new(&dir);
        let index = Bm25Index::build(&corpus, &mut tok, 16, 10).unwrap();
        let out = dir.join("index");
        let kind = crate::output_dir::Kind::Index;
        index
            .save(&OutputDir::open(&out, kind, Shard::WHOLE, false).unwrap())
            .unwrap();
        let index = Bm25Index::open(&out).unwrap();
        let s = index.scores(&[4, 9]);
        // Hand-worked: N = 3, df(4) = 1, idf = ln(1 + 2.5/1.5); avg length 3; doc 1 has tf 2, len 4.
        let idf = (1.0f32 + 2.5 / 1.5).ln();
        let norm = K1 * (1.0 - B + B * 4.0 / 3.0);
        let want = idf * 2.0 * (K1 + 1.0) / (2.0 + norm);
        assert!((s[1] - want).abs() < 1e-6, "{} vs {want}", s[1]);
        assert_eq!((s[0], s[2]), (0.0, 0.0));
        let q = Query {
            id: "q".into(),
            prompt_ids: vec![7],
            completion_ids: vec![8, 1],
            prompt: None,
            completion: None,
        };
        assert_eq!(index.candidates(&q, 2), vec![2, 0]);
        index.check(&out, &corpus, 16).unwrap();
        assert!(index.check(&out, &corpus, 8).is_err());
        std::fs::write(&corpus, "{\"ids\": [1]}\n").unwrap();
        let e = index.check(&out, &corpus, 16).unwrap_err().to_string();
        assert!(e.contains("another corpus"), "{e}");
        // Another corpus's index over this one: refused, then replaced with the overwrite.
        let other = Bm25Index::build(&corpus, &mut tok, 16, 10).unwrap();
        let e = other
            .save(&OutputDir::open(&out, kind, Shard::WHOLE, false).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("other settings"), "{e}");
        other
            .save(&OutputDir::open(&out, kind, Shard::WHOLE, true).unwrap())
            .unwrap();
        assert_eq!(Bm25Index::open(&out).unwrap().n_sequences(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
