//! The streaming reduction of scores: per query the top-k and bottom-k sequences, running
//! statistics, the largest-magnitude tails and a magnitude sketch ([`QuerySummary`]), fed batch
//! by batch by [`ScoreAccumulator`]; summaries of disjoint parts of a corpus merge exactly.

use super::dense::DenseWriter;
use super::TAIL_SIZE;
use crate::data::Sequence;
use crate::error::Result;
use faer::Mat;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;

/// A training sequence kept in a top or bottom list.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

/// Keeps the `cap` largest values seen. Saved as the list of values (cap [`TAIL_SIZE`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(into = "Vec<f64>", from = "Vec<f64>")]
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

impl From<Largest> for Vec<f64> {
    fn from(l: Largest) -> Self {
        l.descending()
    }
}

impl From<Vec<f64>> for Largest {
    fn from(v: Vec<f64>) -> Self {
        let mut l = Largest::new(TAIL_SIZE);
        for x in v {
            l.push(x);
        }
        l
    }
}

/// JSON has no infinities: the running min and max of an empty summary are saved as strings.
mod extended_f64 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Finite(f64),
        Named(String),
    }

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            Repr::Finite(*x)
        } else {
            Repr::Named(x.to_string())
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Finite(x) => Ok(x),
            Repr::Named(n) => n
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("`{n}` is not a number"))),
        }
    }
}

/// Buckets per doubling of the magnitude sketch: a bucket spans a factor 2^(1/16), so any
/// quantile read from it is within 4.4% (relative) of the exact one.
pub const SKETCH_BUCKETS_PER_OCTAVE: f64 = 16.0;

/// A mergeable sketch of score magnitudes: counts per logarithmic bucket, separately for
/// positive and negative scores. Two sketches merge by adding counts (shards, corpora).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MagnitudeSketch {
    /// bucket → count, bucket b holding |x| in [2^(b/16), 2^((b+1)/16)).
    pub positive: std::collections::BTreeMap<i32, u64>,
    pub negative: std::collections::BTreeMap<i32, u64>,
    pub zeros: u64,
}

impl MagnitudeSketch {
    pub(super) fn bucket(x: f64) -> i32 {
        (x.abs().log2() * SKETCH_BUCKETS_PER_OCTAVE).floor() as i32
    }

    pub fn push(&mut self, x: f64) {
        if x > 0.0 {
            *self.positive.entry(Self::bucket(x)).or_default() += 1;
        } else if x < 0.0 {
            *self.negative.entry(Self::bucket(x)).or_default() += 1;
        } else {
            self.zeros += 1;
        }
    }

    pub fn merge(&mut self, other: &MagnitudeSketch) {
        for (b, c) in &other.positive {
            *self.positive.entry(*b).or_default() += c;
        }
        for (b, c) in &other.negative {
            *self.negative.entry(*b).or_default() += c;
        }
        self.zeros += other.zeros;
    }

    /// The magnitude below which a fraction `q` of the positive scores lie (bucket midpoint).
    pub fn positive_quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.positive.values().sum();
        let target = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in &self.positive {
            seen += c;
            if seen >= target {
                return Some(2f64.powf((*b as f64 + 0.5) / SKETCH_BUCKETS_PER_OCTAVE));
            }
        }
        None
    }
}

/// Everything kept about one query's scores. Summaries of disjoint parts of a corpus merge
/// exactly ([`QuerySummary::merge`]); saved as JSON for checkpoints and shards.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuerySummary {
    pub count: u64,
    pub sum: f64,
    pub sum_sq: f64,
    pub sum_pos: f64,
    pub sum_neg: f64,
    #[serde(with = "extended_f64")]
    pub min: f64,
    #[serde(with = "extended_f64")]
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
    pub sketch: MagnitudeSketch,
    /// With a pre-filter: the scores of the seeded sample of non-candidates (scored to
    /// estimate the pre-filter's recall, kept out of everything above).
    #[serde(default)]
    pub prefilter_sample: Vec<f64>,
    /// With the fits of `fit --seeds K`: what the query's stability is computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability: Option<super::stability::Track>,
}

/// Which sequences count for each query in a pre-filtered pass: its candidates, and the sample
/// of the rest whose scores are only recorded ([`QuerySummary::prefilter_sample`]).
#[derive(Debug, Clone, Copy)]
pub struct Prefilter<'a> {
    pub candidates: &'a [std::collections::HashSet<usize>],
    pub sampled: &'a [std::collections::HashSet<usize>],
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
    pub(crate) fn new(n_layers: usize) -> Self {
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
            sketch: MagnitudeSketch::default(),
            prefilter_sample: Vec::new(),
            stability: None,
        }
    }

    /// Adds the summary of a disjoint part of the corpus. Top and bottom lists keep the order a
    /// single pass gives: by score, ties by corpus position.
    pub fn merge(&mut self, other: &QuerySummary, k: usize) {
        self.count += other.count;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.sum_pos += other.sum_pos;
        self.sum_neg += other.sum_neg;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        for (a, b) in self.total_per_layer.iter_mut().zip(&other.total_per_layer) {
            *a += b;
        }
        for (a, b) in self.abs_per_layer.iter_mut().zip(&other.abs_per_layer) {
            *a += b;
        }
        for x in other.tail_pos.heap.iter() {
            self.tail_pos.push(x.0 .0);
        }
        for x in other.tail_neg.heap.iter() {
            self.tail_neg.push(x.0 .0);
        }
        self.sketch.merge(&other.sketch);
        self.prefilter_sample
            .extend_from_slice(&other.prefilter_sample);
        let combine = |mine: &mut Vec<Candidate>, theirs: &[Candidate], descending: bool| {
            mine.extend(theirs.iter().cloned());
            mine.sort_by(|a, b| {
                let by_score = if descending {
                    b.score.total_cmp(&a.score)
                } else {
                    a.score.total_cmp(&b.score)
                };
                by_score.then(a.index.cmp(&b.index))
            });
            mine.truncate(k);
        };
        combine(&mut self.top, &other.top, true);
        combine(&mut self.bottom, &other.bottom, false);
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

    /// Tracks every query's stability across `n_fits` fits ([`super::stability`]).
    pub fn with_stability(mut self, n_fits: usize) -> Self {
        for s in &mut self.summaries {
            s.stability = Some(super::stability::Track::new(n_fits, self.k));
        }
        self
    }

    /// Continues from saved summaries (a resumed pass).
    pub fn resume(summaries: Vec<QuerySummary>, k: usize, dense: Option<DenseWriter>) -> Self {
        ScoreAccumulator {
            summaries,
            k,
            dense,
        }
    }

    /// Flushes the dense rows to disk (before a checkpoint records how many columns they hold).
    pub fn flush(&mut self) -> Result<()> {
        match self.dense.as_mut() {
            Some(d) => d.flush(),
            None => Ok(()),
        }
    }

    /// Adds one batch: `parts[ℓ]` is layer ℓ's `[n_queries, n_seq]` scores for `seqs`, whose
    /// corpus indices are `indices`; `scale[q][n]` (cosine normalisation) multiplies every part
    /// when given; with `prefilter`, query q only counts its candidates and records the scores
    /// of its sampled non-candidates apart.
    pub fn add(
        &mut self,
        indices: &[usize],
        seqs: &[Sequence],
        parts: &[Mat<f32>],
        scale: Option<&[Vec<f64>]>,
        prefilter: Option<Prefilter<'_>>,
    ) -> Result<()> {
        let mut rows: Vec<Vec<f32>> = vec![Vec::with_capacity(seqs.len()); self.summaries.len()];
        for (q, summary) in self.summaries.iter_mut().enumerate() {
            for (n, seq) in seqs.iter().enumerate() {
                let (candidate, sampled) = match prefilter {
                    None => (true, false),
                    Some(p) => (
                        p.candidates[q].contains(&indices[n]),
                        p.sampled[q].contains(&indices[n]),
                    ),
                };
                if !candidate && !sampled {
                    continue;
                }
                let factor = scale.map_or(1.0, |s| s[q][n]);
                let per_layer: Vec<f64> = parts.iter().map(|p| p[(q, n)] as f64 * factor).collect();
                let score: f64 = per_layer.iter().sum();
                if !candidate {
                    summary.prefilter_sample.push(score);
                    continue;
                }
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
                summary.sketch.push(score);
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
                    index: indices[n],
                    sequence_id: seq.id.clone(),
                    ids: seq.ids.clone(),
                    score,
                    per_layer: per_layer.clone(),
                };
                offer(&mut summary.top, self.k, score, |a, b| a > b, make);
                let make = || Candidate {
                    index: indices[n],
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
            let idx: Vec<usize> = (start..start + chunk.len()).collect();
            acc.add(&idx, &seqs, &[l0, l1], None, None).unwrap();
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
    fn magnitude_sketch_quantiles_are_within_a_bucket_and_merge() {
        // |x| = 1.01^i for i in 0..1000, split over two sketches.
        let values: Vec<f64> = (0..1000).map(|i| 1.01f64.powi(i)).collect();
        let (mut a, mut b) = (MagnitudeSketch::default(), MagnitudeSketch::default());
        for (i, v) in values.iter().enumerate() {
            if i % 2 == 0 {
                a.push(*v)
            } else {
                b.push(*v)
            }
        }
        a.push(-3.0);
        a.push(0.0);
        a.merge(&b);
        assert_eq!(a.positive.values().sum::<u64>(), 1000);
        assert_eq!((a.negative.values().sum::<u64>(), a.zeros), (1, 1));
        for q in [0.1, 0.5, 0.9, 0.99] {
            let exact = values[(q * 1000.0f64).ceil() as usize - 1];
            let got = a.positive_quantile(q).unwrap();
            assert!(
                (got / exact).log2().abs() <= 1.0 / 16.0,
                "q {q}: {got} vs {exact}"
            );
        }
    }
}
