//! Candidate pre-filter: a BM25 index over the training sequences' token ids, so that
//! `infl score --prefilter N` computes gradients only for each query's N best lexical matches
//! (the paper cut 10M sequences to 10k per query with TF-IDF before the gradient pass).
//!
//! The index is over the *model's* token ids, built from the very windows `score` streams, so a
//! candidate is exactly one training sequence. It is an inverted file (postings sorted by
//! sequence) in a safetensors container with the corpus fingerprint in its header.
//!
//! The header also records each array's xxh3 ([`crate::checksum`]) and the format version;
//! [`Bm25Index::open`] verifies the sums, then the structure (offsets from 0, non-decreasing,
//! ending at the postings' count; postings of a term in increasing sequence order; sequence ids
//! below the number of sequences; each sequence's length the sum of its term counts), so that a
//! scored index can neither panic nor rank from corrupt data. An index without sums (from an
//! infl before format 3) is refused: rebuilding one is a tokenizing pass, no model.

use crate::data::{self, LazyTokenizer, Query};
use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// BM25 constants (Robertson et al.; the usual defaults).
const K1: f32 = 1.2;
const B: f32 = 0.75;

pub const INDEX_FILE: &str = "index.safetensors";

/// The index's arrays, in file order.
const ARRAYS: [&str; 4] = [
    "offsets",
    "postings_sequence",
    "postings_tf",
    "sequence_length",
];

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

/// `infl index`: the index of `corpus` over `model`'s token ids (windows of `max_len`, by
/// default the model's context length), saved in `out` (owned and locked as every output is;
/// `overwrite` replaces a previous index there).
pub fn index_corpus(
    model_dir: &Path,
    corpus: &Path,
    out: &Path,
    max_len: Option<usize>,
    overwrite: bool,
) -> Result<Bm25Index> {
    use crate::output_dir::{Kind, OutputDir};
    let out = OutputDir::open(out, Kind::Index, crate::shard::Shard::WHOLE, overwrite)?;
    let model = crate::model::load(
        model_dir,
        crate::model::ModuleSelection::All,
        crate::model::Compute::CPU,
    )?;
    let max_len = max_len.unwrap_or(model.max_positions());
    let mut tok = LazyTokenizer::new(model_dir);
    let index = Bm25Index::build(corpus, &mut tok, max_len, model.vocab_size())?;
    index.save(&out)?;
    Ok(index)
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
        let mut meta = HashMap::from([
            (
                "format_version".to_string(),
                crate::provenance::FORMAT_VERSION.to_string(),
            ),
            ("kind".to_string(), "infl-bm25-index".to_string()),
            ("corpus_sha256".to_string(), self.corpus_sha256.clone()),
            ("max_len".to_string(), self.max_len.to_string()),
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        for (name, b) in &arrays {
            meta.insert(format!("xxh3.{name}"), crate::checksum::hex_of(b));
        }
        let data =
            safetensors::serialize(views, Some(meta)).map_err(|e| Error::Other(e.to_string()))?;
        crate::io::write_atomic(&dir.join(INDEX_FILE), &data)
    }

    /// Reads an index, verifying its checksums and structure (corruption is
    /// [`Error::Mismatch`] naming the file and the array).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(INDEX_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::input(format!(
                "{}: cannot read the index ({e}); build one with `infl index`",
                path.display()
            ))
        })?;
        let bad = |what: &str| {
            Error::Mismatch(format!(
                "{}: corrupt or not an infl index ({what}); rebuild it with `infl index`",
                path.display()
            ))
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|_| bad("unreadable header"))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| bad("no metadata"))?;
        if meta.get("kind").map(String::as_str) != Some("infl-bm25-index") {
            return Err(bad("wrong kind"));
        }
        let version = meta
            .get("format_version")
            .map(|v| v.parse::<u32>().map_err(|_| bad("format_version")))
            .transpose()?;
        let Some(version) = version else {
            return Err(Error::Mismatch(format!(
                "{}: an index without checksums (written by an infl before format 3); rebuild it with `infl index`",
                path.display()
            )));
        };
        crate::provenance::check_format(version, &path)?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|_| bad("unreadable tensors"))?;
        let array = |name: &str| -> Result<Vec<u32>> {
            let v = st.tensor(name).map_err(|_| bad(name))?;
            if v.dtype() != Dtype::U32 {
                return Err(bad(&format!("`{name}` is not u32")));
            }
            let sum = meta
                .get(&format!("xxh3.{name}"))
                .ok_or_else(|| bad(&format!("no checksum of `{name}`")))?;
            if &crate::checksum::hex_of(v.data()) != sum {
                return Err(Error::Mismatch(format!(
                    "{}: array `{name}` does not match its checksum: the file is corrupt (a disk or copy error, or it was edited); rebuild it with `infl index`",
                    path.display()
                )));
            }
            Ok(v.data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let [offsets, post_seq, post_tf, doc_len] = ARRAYS.map(array);
        let index = Bm25Index {
            offsets: offsets?,
            post_seq: post_seq?,
            post_tf: post_tf?,
            doc_len: doc_len?,
            corpus_sha256: meta
                .get("corpus_sha256")
                .cloned()
                .ok_or_else(|| bad("corpus_sha256"))?,
            max_len: meta
                .get("max_len")
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| bad("max_len"))?,
        };
        index.validate().map_err(|what| bad(&what))?;
        Ok(index)
    }

    /// The structure [`Bm25Index::scores`] relies on, or what breaks it.
    fn validate(&self) -> std::result::Result<(), String> {
        let n_postings = self.post_seq.len();
        if self.post_tf.len() != n_postings {
            return Err(format!(
                "{n_postings} posting sequences but {} term counts",
                self.post_tf.len()
            ));
        }
        if self.offsets.first() != Some(&0) {
            return Err("`offsets` does not start at 0".into());
        }
        if self.offsets.last().map(|&o| o as usize) != Some(n_postings) {
            return Err(format!(
                "`offsets` ends at {:?}, not at the {n_postings} postings",
                self.offsets.last()
            ));
        }
        if let Some(t) = self.offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(format!("`offsets` decreases at term {t}"));
        }
        let n = self.doc_len.len();
        let mut lengths = vec![0u64; n];
        for (t, w) in self.offsets.windows(2).enumerate() {
            let (s, e) = (w[0] as usize, w[1] as usize);
            let mut previous: Option<u32> = None;
            for (&d, &tf) in self.post_seq[s..e].iter().zip(&self.post_tf[s..e]) {
                if d as usize >= n {
                    return Err(format!(
                        "term {t} has a posting for sequence {d}, of {n} sequences"
                    ));
                }
                if previous.is_some_and(|p| p >= d) {
                    return Err(format!(
                        "the postings of term {t} are not in increasing sequence order"
                    ));
                }
                if tf == 0 {
                    return Err(format!("term {t} has a zero count in sequence {d}"));
                }
                previous = Some(d);
                lengths[d as usize] += tf as u64;
            }
        }
        if let Some(d) = (0..n).find(|&d| lengths[d] != self.doc_len[d] as u64) {
            return Err(format!(
                "sequence {d} has length {} but its term counts sum to {}",
                self.doc_len[d], lengths[d]
            ));
        }
        Ok(())
    }

    /// Refuses an index built from another corpus or another windowing.
    pub fn check(&self, dir: &Path, corpus: &Path, max_len: usize) -> Result<()> {
        let sha = data::sha256_file(corpus)?;
        if sha != self.corpus_sha256 {
            return Err(Error::Mismatch(format!(
                "the index in {} was built from another corpus (sha256 {}…), not {} (sha256 {}…); rebuild it with `infl index`",
                dir.display(),
                self.corpus_sha256.get(..12).unwrap_or(&self.corpus_sha256),
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

    /// A small index, and a fresh directory `index` to save it in (its corpus beside it): sequences [1, 2, 3], [4, 4, 5, 6], [7, 8].
    fn small_index(name: &str) -> (std::path::PathBuf, Bm25Index) {
        let dir = std::env::temp_dir().join(format!("infl-index-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("c.jsonl");
        std::fs::write(
            &corpus,
            "{\"ids\": [1, 2, 3]}\n{\"ids\": [4, 4, 5, 6]}\n{\"ids\": [7, 8]}\n",
        )
        .unwrap();
        let mut tok = LazyTokenizer::new(&dir);
        let index = Bm25Index::build(&corpus, &mut tok, 16, 10).unwrap();
        (dir.join("index"), index)
    }

    /// Saves `index` into `dir` as `infl index --overwrite` would.
    fn save_to(index: &Bm25Index, dir: &Path) {
        use crate::output_dir::{Kind, OutputDir};
        let out = OutputDir::open(dir, Kind::Index, crate::shard::Shard::WHOLE, true).unwrap();
        index.save(&out).unwrap();
    }

    fn open_err(dir: &Path) -> String {
        match Bm25Index::open(dir) {
            Err(e @ Error::Mismatch(_)) => e.to_string(),
            Err(e) => panic!("not a mismatch: {e}"),
            Ok(_) => panic!("a corrupt index was opened"),
        }
    }

    /// Indexes whose checksums match but whose structure is broken (as a buggy or hostile
    /// writer would leave them) are refused, naming what is wrong, without a panic.
    #[test]
    fn structurally_broken_indexes_are_refused() {
        let (dir, clean) = small_index("structure");
        type Tamper = Box<dyn Fn(&mut Bm25Index)>;
        let tampered: Vec<(&str, Tamper)> = vec![
            ("decreases", Box::new(|i| i.offsets.swap(3, 5))),
            (
                "not at the",
                Box::new(|i| *i.offsets.last_mut().unwrap() = 1000),
            ),
            (
                "sequence 1000000000",
                Box::new(|i| i.post_seq[0] = 1_000_000_000),
            ),
            ("has length 0", Box::new(|i| i.doc_len[1] = 0)),
            (
                "increasing sequence order",
                Box::new(|i| {
                    // Term 4's posting moved onto term 1's: term 1 then lists sequence 1 then 0.
                    i.offsets = vec![0, 0, 2, 3, 4, 5, 6, 7, 8, 9, 9];
                    i.post_seq = vec![1, 0, 0, 0, 1, 1, 2, 2, 1];
                    i.post_tf = vec![2, 1, 1, 1, 1, 1, 1, 1, 1];
                }),
            ),
            ("zero count", Box::new(|i| i.post_tf[0] = 0)),
            (
                "term counts",
                Box::new(|i| {
                    i.post_tf.pop();
                }),
            ),
        ];
        for (want, tamper) in tampered {
            let mut index = Bm25Index {
                offsets: clean.offsets.clone(),
                post_seq: clean.post_seq.clone(),
                post_tf: clean.post_tf.clone(),
                doc_len: clean.doc_len.clone(),
                corpus_sha256: clean.corpus_sha256.clone(),
                max_len: clean.max_len,
            };
            tamper(&mut index);
            save_to(&index, &dir);
            let e = open_err(&dir);
            assert!(e.contains(want) && e.contains(INDEX_FILE), "{want}: {e}");
        }
        save_to(&clean, &dir);
        Bm25Index::open(&dir).unwrap();
        std::fs::remove_dir_all(dir.parent().unwrap()).ok();
    }

    #[test]
    fn a_flipped_bit_and_an_index_without_checksums_are_refused() {
        let (dir, index) = small_index("bits");
        save_to(&index, &dir);
        let path = dir.join(INDEX_FILE);
        let clean = std::fs::read(&path).unwrap();
        // Every bit of the data section (after the 8-byte length and the JSON header).
        let data_start = 8 + u64::from_le_bytes(clean[..8].try_into().unwrap()) as usize;
        for byte in data_start..clean.len() {
            for bit in 0..8 {
                let mut b = clean.clone();
                b[byte] ^= 1 << bit;
                std::fs::write(&path, &b).unwrap();
                let e = open_err(&dir);
                assert!(e.contains("does not match its checksum"), "{e}");
            }
        }
        // Every header byte changed: refused one way or another, never a panic.
        for byte in 8..data_start {
            let mut b = clean.clone();
            b[byte] ^= 0x10;
            std::fs::write(&path, &b).unwrap();
            if let Ok(i) = Bm25Index::open(&dir) {
                // Only a change to the version string or a metadata value that changes nothing read.
                assert_eq!(i.n_sequences(), 3);
            }
        }
        // An index as an infl before format 3 wrote it: no format_version, no sums (the
        // version is checked before the arrays are read).
        let old_meta = HashMap::from([
            ("kind".to_string(), "infl-bm25-index".to_string()),
            ("corpus_sha256".to_string(), index.corpus_sha256.clone()),
            ("max_len".to_string(), "16".to_string()),
        ]);
        let empty: Vec<(String, TensorView<'_>)> = Vec::new();
        std::fs::write(
            &path,
            safetensors::serialize(empty, Some(old_meta)).unwrap(),
        )
        .unwrap();
        let e = open_err(&dir);
        assert!(
            e.contains("without checksums") && e.contains("infl index"),
            "{e}"
        );
        std::fs::remove_dir_all(dir.parent().unwrap()).ok();
    }
}
