//! Results stage: scores are reduced on the fly to what people read — per query the top-k and
//! bottom-k sequences (with per-layer parts), running statistics of the whole distribution and
//! its largest-magnitude tails — so memory does not grow with the corpus. The dense matrix, when
//! asked for, goes to disk a row-chunk at a time.

use crate::data::{LazyTokenizer, Sequence};
use crate::error::{Error, Result};
use crate::io;
use faer::Mat;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How many of the largest positive (and most negative) scores are kept per query for the
/// distribution analysis.
pub const TAIL_SIZE: usize = 2000;

/// One token's share of a score.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenPart {
    pub text: String,
    pub score: f64,
}

/// One line of `top_k.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopEntry {
    pub query_id: String,
    /// `top` (most positive first) or `bottom` (most negative first).
    pub direction: String,
    pub rank: usize,
    pub sequence_id: String,
    pub score: f64,
    /// The training sequence's text (decoded window), when a tokenizer is available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The score's parts, one per tracked layer (with `--per-layer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_layer: Option<Vec<f64>>,
    /// The score's parts, one per token of the sequence (with `--per-token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<TokenPart>>,
}

/// A training sequence kept in a top or bottom list.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Position in the corpus (column of the dense matrix).
    pub index: usize,
    pub sequence_id: String,
    pub ids: Vec<u32>,
    pub score: f64,
    pub per_layer: Vec<f64>,
}

/// f64 with a total order, for heaps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Total(f64);
impl Eq for Total {}
impl PartialOrd for Total {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Total {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Keeps the `cap` largest values seen.
#[derive(Debug, Clone, Default)]
struct Largest {
    cap: usize,
    heap: BinaryHeap<Reverse<Total>>,
}

impl Largest {
    fn new(cap: usize) -> Self {
        Largest {
            cap,
            heap: BinaryHeap::new(),
        }
    }
    fn push(&mut self, x: f64) {
        if self.heap.len() < self.cap {
            self.heap.push(Reverse(Total(x)));
        } else if self.heap.peek().is_some_and(|m| x > m.0 .0) {
            self.heap.pop();
            self.heap.push(Reverse(Total(x)));
        }
    }
    fn descending(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.heap.iter().map(|r| r.0 .0).collect();
        v.sort_by(|a, b| b.total_cmp(a));
        v
    }
}

/// Everything kept about one query's scores.
#[derive(Debug, Clone)]
pub struct QuerySummary {
    pub count: u64,
    pub sum: f64,
    pub sum_sq: f64,
    pub sum_pos: f64,
    pub sum_neg: f64,
    pub min: f64,
    pub max: f64,
    /// Most positive first.
    pub top: Vec<Candidate>,
    /// Most negative first.
    pub bottom: Vec<Candidate>,
    /// Σ over all training sequences of each layer's part, and of its magnitude.
    pub total_per_layer: Vec<f64>,
    pub abs_per_layer: Vec<f64>,
    tail_pos: Largest,
    tail_neg: Largest,
}

/// Inserts into a list kept sorted by `better`, at most `k` long.
fn offer(
    list: &mut Vec<Candidate>,
    k: usize,
    score: f64,
    better: impl Fn(f64, f64) -> bool,
    make: impl FnOnce() -> Candidate,
) {
    if k == 0 || (list.len() == k && !better(score, list[k - 1].score)) {
        return;
    }
    let pos = list
        .iter()
        .position(|c| better(score, c.score))
        .unwrap_or(list.len());
    list.insert(pos, make());
    list.truncate(k);
}

impl QuerySummary {
    fn new(n_layers: usize) -> Self {
        QuerySummary {
            count: 0,
            sum: 0.0,
            sum_sq: 0.0,
            sum_pos: 0.0,
            sum_neg: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            top: Vec::new(),
            bottom: Vec::new(),
            total_per_layer: vec![0.0; n_layers],
            abs_per_layer: vec![0.0; n_layers],
            tail_pos: Largest::new(TAIL_SIZE),
            tail_neg: Largest::new(TAIL_SIZE),
        }
    }

    /// Largest positive scores, descending.
    pub fn tail_pos(&self) -> Vec<f64> {
        self.tail_pos.descending()
    }

    /// Magnitudes of the most negative scores, descending.
    pub fn tail_neg(&self) -> Vec<f64> {
        self.tail_neg.descending()
    }
}

/// Reduces streamed scores to per-query summaries (and optionally a dense matrix on disk).
pub struct ScoreAccumulator {
    pub summaries: Vec<QuerySummary>,
    k: usize,
    dense: Option<DenseWriter>,
}

impl ScoreAccumulator {
    pub fn new(n_queries: usize, n_layers: usize, k: usize, dense: Option<DenseWriter>) -> Self {
        ScoreAccumulator {
            summaries: (0..n_queries)
                .map(|_| QuerySummary::new(n_layers))
                .collect(),
            k,
            dense,
        }
    }

    /// Adds one batch: `parts[ℓ]` is layer ℓ's `[n_queries, n_seq]` scores for `seqs`, whose
    /// first sequence has corpus index `start`; `scale[q][n]` (cosine normalisation) multiplies
    /// every part when given.
    pub fn add(
        &mut self,
        start: usize,
        seqs: &[Sequence],
        parts: &[Mat<f32>],
        scale: Option<&[Vec<f64>]>,
    ) -> Result<()> {
        let mut rows: Vec<Vec<f32>> = vec![Vec::with_capacity(seqs.len()); self.summaries.len()];
        for (q, summary) in self.summaries.iter_mut().enumerate() {
            for (n, seq) in seqs.iter().enumerate() {
                let factor = scale.map_or(1.0, |s| s[q][n]);
                let per_layer: Vec<f64> = parts.iter().map(|p| p[(q, n)] as f64 * factor).collect();
                let score: f64 = per_layer.iter().sum();
                rows[q].push(score as f32);
                summary.count += 1;
                summary.sum += score;
                summary.sum_sq += score * score;
                if score > 0.0 {
                    summary.sum_pos += score;
                    summary.tail_pos.push(score);
                } else if score < 0.0 {
                    summary.sum_neg += score;
                    summary.tail_neg.push(-score);
                }
                summary.min = summary.min.min(score);
                summary.max = summary.max.max(score);
                for ((total, abs), part) in summary
                    .total_per_layer
                    .iter_mut()
                    .zip(summary.abs_per_layer.iter_mut())
                    .zip(&per_layer)
                {
                    *total += part;
                    *abs += part.abs();
                }
                let make = || Candidate {
                    index: start + n,
                    sequence_id: seq.id.clone(),
                    ids: seq.ids.clone(),
                    score,
                    per_layer: per_layer.clone(),
                };
                offer(&mut summary.top, self.k, score, |a, b| a > b, make);
                let make = || Candidate {
                    index: start + n,
                    sequence_id: seq.id.clone(),
                    ids: seq.ids.clone(),
                    score,
                    per_layer: per_layer.clone(),
                };
                offer(&mut summary.bottom, self.k, score, |a, b| a < b, make);
            }
        }
        if let Some(d) = self.dense.as_mut() {
            d.append(&rows)?;
        }
        Ok(())
    }

    /// Finishes the dense file, if any.
    pub fn finish_dense(
        &mut self,
        path: &Path,
        query_ids: &[String],
        n_train: usize,
    ) -> Result<()> {
        match self.dense.take() {
            Some(d) => d.finish(path, query_ids, n_train),
            None => Ok(()),
        }
    }
}

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

    fn append(&mut self, rows: &[Vec<f32>]) -> Result<()> {
        for ((p, w), row) in self.parts.iter_mut().zip(rows) {
            for x in row {
                w.write_all(&x.to_le_bytes())
                    .map_err(|e| Error::io(p.as_path(), e))?;
            }
        }
        Ok(())
    }

    fn finish(self, path: &Path, query_ids: &[String], n_train: usize) -> Result<()> {
        let n_q = self.parts.len();
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
        let tmp = path.with_file_name(format!(".scores.safetensors.tmp-{}", std::process::id()));
        {
            let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut out = std::io::BufWriter::new(f);
            let io_err = |e| Error::io(&tmp, e);
            out.write_all(&(header.len() as u64).to_le_bytes())
                .map_err(io_err)?;
            out.write_all(&header).map_err(io_err)?;
            for (p, w) in self.parts {
                w.into_inner().map_err(|e| Error::io(&p, e.into_error()))?;
                let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
                std::io::copy(&mut f, &mut out).map_err(io_err)?;
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
            out.flush().map_err(io_err)?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// `top_k.jsonl` lines for every query: the top block, then the bottom block.
pub fn entries(
    summaries: &[QuerySummary],
    query_ids: &[String],
    tokenizer: &mut LazyTokenizer,
    per_layer: bool,
    tokens: Option<&std::collections::HashMap<(usize, usize), Vec<TokenPart>>>,
) -> Vec<TopEntry> {
    let mut out = Vec::new();
    for (q, (s, qid)) in summaries.iter().zip(query_ids).enumerate() {
        for (direction, list) in [("top", &s.top), ("bottom", &s.bottom)] {
            for (rank, c) in list.iter().enumerate() {
                out.push(TopEntry {
                    query_id: qid.clone(),
                    direction: direction.into(),
                    rank: rank + 1,
                    sequence_id: c.sequence_id.clone(),
                    score: c.score,
                    text: tokenizer.decode(&c.ids),
                    per_layer: per_layer.then(|| c.per_layer.clone()),
                    tokens: tokens.and_then(|t| t.get(&(q, c.index)).cloned()),
                });
            }
        }
    }
    out
}

/// Writes `top_k.jsonl` atomically.
pub fn write_top_k(path: &Path, entries: &[TopEntry]) -> Result<()> {
    let mut text = String::new();
    for e in entries {
        text.push_str(&serde_json::to_string(e).map_err(|e| Error::Other(e.to_string()))?);
        text.push('\n');
    }
    io::write_atomic(path, text.as_bytes())
}

/// Writes `distribution.json`: running statistics and tails per query.
pub fn write_distribution(
    path: &Path,
    summaries: &[QuerySummary],
    query_ids: &[String],
) -> Result<()> {
    let queries: Vec<serde_json::Value> = summaries
        .iter()
        .zip(query_ids)
        .map(|(s, id)| {
            serde_json::json!({
                "query_id": id, "count": s.count, "sum": s.sum, "sum_sq": s.sum_sq,
                "sum_pos": s.sum_pos, "sum_neg": s.sum_neg, "min": s.min, "max": s.max,
                "tail_pos": s.tail_pos(), "tail_neg": s.tail_neg(),
            })
        })
        .collect();
    io::write_json(
        path,
        &serde_json::json!({ "tail_size": TAIL_SIZE, "queries": queries }),
    )
}

/// Writes `layers.json`: per query, each layer's total part over all training sequences.
pub fn write_layers(
    path: &Path,
    summaries: &[QuerySummary],
    query_ids: &[String],
    layers: &[String],
) -> Result<()> {
    let queries: Vec<serde_json::Value> = summaries
        .iter()
        .zip(query_ids)
        .map(|(s, id)| {
            serde_json::json!({
                "query_id": id, "total_per_layer": s.total_per_layer, "abs_per_layer": s.abs_per_layer,
            })
        })
        .collect();
    io::write_json(
        path,
        &serde_json::json!({ "layers": layers, "queries": queries }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(i: usize) -> Sequence {
        Sequence {
            id: format!("{i}:0"),
            ids: vec![i as u32],
        }
    }

    #[test]
    fn summaries_keep_top_bottom_and_exact_statistics() {
        let scores = [0.5f32, 2.0, -1.0, 2.5, -3.0, 0.0, 1.0];
        let mut acc = ScoreAccumulator::new(1, 2, 2, None);
        // Two layers whose parts sum to the score, fed in two batches.
        for (start, chunk) in [(0usize, &scores[..4]), (4, &scores[4..])] {
            let seqs: Vec<Sequence> = (start..start + chunk.len()).map(seq).collect();
            let l0 = Mat::from_fn(1, chunk.len(), |_, n| chunk[n] * 0.25);
            let l1 = Mat::from_fn(1, chunk.len(), |_, n| chunk[n] * 0.75);
            acc.add(start, &seqs, &[l0, l1], None).unwrap();
        }
        let s = &acc.summaries[0];
        assert_eq!(
            s.top.iter().map(|c| c.index).collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert_eq!(
            s.bottom.iter().map(|c| c.index).collect::<Vec<_>>(),
            vec![4, 2]
        );
        assert_eq!(s.top[0].per_layer, vec![0.625, 1.875]);
        assert_eq!(s.count, 7);
        assert!((s.sum - 2.0).abs() < 1e-12);
        assert!((s.sum_pos - 6.0).abs() < 1e-12 && (s.sum_neg + 4.0).abs() < 1e-12);
        assert_eq!(s.tail_pos(), vec![2.5, 2.0, 1.0, 0.5]);
        assert_eq!(s.tail_neg(), vec![3.0, 1.0]);
        assert!((s.total_per_layer[1] - 1.5).abs() < 1e-12);
    }

    #[test]
    fn dense_writer_produces_a_valid_safetensors_file() {
        let dir = std::env::temp_dir().join(format!("infl-dense-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut acc = ScoreAccumulator::new(2, 1, 1, Some(DenseWriter::new(&dir, 2).unwrap()));
        let seqs: Vec<Sequence> = (0..3).map(seq).collect();
        acc.add(
            0,
            &seqs[..2],
            &[Mat::from_fn(2, 2, |q, n| (q * 10 + n) as f32)],
            None,
        )
        .unwrap();
        acc.add(
            2,
            &seqs[2..],
            &[Mat::from_fn(2, 1, |q, _| (q * 10 + 2) as f32)],
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
