//! Whether the BM25 pre-filter dropped the answer: per query, an estimate of the recall of the
//! exact top-k among its N candidates (`prefilter.json`). A seeded random sample of the other
//! sequences ([`sample_rest`]) is scored exactly beside the candidates; the share of it scoring
//! above each kept candidate, scaled to all the other sequences, says whether that candidate
//! stays in the exact top-k, with a 95% Wilson interval.

use super::QuerySummary;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::path::Path;

/// z of a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Up to `m` distinct sequences of `0..n` outside `candidates`, drawn from (seed, query) alone.
pub fn sample_rest(
    n: usize,
    candidates: &HashSet<usize>,
    m: usize,
    seed: u64,
    query: usize,
) -> HashSet<usize> {
    let rest = n.saturating_sub(candidates.len());
    if m >= rest {
        return (0..n).filter(|i| !candidates.contains(i)).collect();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (query as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut out = HashSet::with_capacity(m);
    // Rejection: m < rest, so every draw has a positive chance of being new.
    while out.len() < m {
        let i = rng.random_range(0..n);
        if !candidates.contains(&i) {
            out.insert(i);
        }
    }
    out
}

/// One query's recall estimate (a record of `prefilter.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefilterRecall {
    pub query_id: String,
    /// The k of the top-k whose recall is estimated.
    pub k: usize,
    /// Candidates scored (N, or fewer in a small corpus).
    pub candidates: usize,
    /// Sequences outside the candidates.
    pub rest: usize,
    /// Of those, scored exactly as a sample, and how many of them beat the candidates' k-th score.
    pub sampled: usize,
    pub sampled_above: usize,
    /// Estimated share of the exact top-k that is among the candidates, with its 95% interval
    /// (exact, low = high, when the whole rest was sampled).
    pub recall: f64,
    pub recall_low: f64,
    pub recall_high: f64,
    /// The N this query's candidates were taken with (wider than `--prefilter` when
    /// `--target-recall` widened it).
    #[serde(default)]
    pub prefilter: usize,
    /// With `--target-recall`: whether `recall_low` reached the target within the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<bool>,
}

/// What `--target-recall` did: the target, the budget, and each query's N in the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Widening {
    pub target: f64,
    pub max: usize,
    pub used: Vec<usize>,
}

impl Widening {
    /// Whether an estimate meets the target: its interval's lower end does (the honest reading
    /// of a sampled estimate).
    pub fn meets(&self, e: &PrefilterRecall) -> bool {
        e.recall_low >= self.target
    }

    /// The next N of a query that misses the target with `used` candidates of a corpus of
    /// `n_sequences`: twice as many, within the budget; None when it cannot widen.
    pub fn next(&self, used: usize, n_sequences: usize) -> Option<usize> {
        let next = used.saturating_mul(2).min(self.max).min(n_sequences);
        (next > used).then_some(next)
    }
}

/// The estimate for one query: the candidate ranked j (from 0) among the candidates stays in
/// the exact top-k when `j + R·p_j < k`, with R the sequences outside the candidates and p_j the
/// share of them scoring above it, estimated from the sample (its Wilson bounds give the
/// interval; exact when the whole rest was sampled).
pub fn estimate(query_id: &str, s: &QuerySummary, k: usize, n_sequences: usize) -> PrefilterRecall {
    let candidates = s.count as usize;
    let rest = n_sequences.saturating_sub(candidates);
    let sample = &s.prefilter_sample;
    let m = sample.len();
    let above = |score: f64| sample.iter().filter(|v| **v > score).count();
    let threshold = s.top.last().map_or(f64::NEG_INFINITY, |c| c.score);
    // Candidates kept in the exact top-k when the share of the rest above score is `share`.
    let recall_with = |share: &dyn Fn(usize) -> f64| -> f64 {
        let kept = s
            .top
            .iter()
            .enumerate()
            .filter(|(j, c)| (*j as f64) + rest as f64 * share(above(c.score)) < k as f64)
            .count();
        kept as f64 / k.max(1) as f64
    };
    let point = |x: usize| if m == 0 { 0.0 } else { x as f64 / m as f64 };
    let exact = m >= rest;
    let (recall, recall_low, recall_high) = if exact {
        let r = recall_with(&point);
        (r, r, r)
    } else {
        (
            recall_with(&point),
            // More of the rest above a candidate, lower recall.
            recall_with(&|x| wilson(x, m).1),
            recall_with(&|x| wilson(x, m).0),
        )
    };
    PrefilterRecall {
        query_id: query_id.to_string(),
        k,
        candidates,
        rest,
        sampled: m,
        sampled_above: above(threshold),
        recall,
        recall_low,
        recall_high,
        prefilter: candidates,
        reached: None,
    }
}

/// The 95% Wilson score interval of a proportion x/m.
fn wilson(x: usize, m: usize) -> (f64, f64) {
    let (x, m) = (x as f64, m as f64);
    let p = x / m;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * m)) / (1.0 + z2 / m);
    let half = Z95 * (p * (1.0 - p) / m + z2 / (4.0 * m * m)).sqrt() / (1.0 + z2 / m);
    // At x = 0 (x = m) the bound is exactly 0 (1); rounding would leave a hair off it.
    let low = if x == 0.0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let high = if x == m {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (low, high)
}

/// `prefilter.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefilterFile {
    /// The confidence of every interval.
    pub confidence: f64,
    /// With `--target-recall`: the target and the largest N a query could be widened to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_recall: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefilter_max: Option<usize>,
    pub queries: Vec<PrefilterRecall>,
}

/// Every query's recall estimate, with what `--target-recall` did when it ran: `n` is the N
/// asked for (each query's own when widened).
pub fn estimates(
    summaries: &[QuerySummary],
    query_ids: &[String],
    (k, n_sequences): (usize, usize),
    n: usize,
    widening: Option<&Widening>,
) -> Vec<PrefilterRecall> {
    summaries
        .iter()
        .zip(query_ids)
        .enumerate()
        .map(|(q, (s, id))| {
            let mut e = estimate(id, s, k, n_sequences);
            e.prefilter = widening.and_then(|w| w.used.get(q).copied()).unwrap_or(n);
            e.reached = widening.map(|w| w.meets(&e));
            e
        })
        .collect()
}

/// Writes `prefilter.json`: every query's recall estimate (see [`estimates`]).
pub fn write_prefilter(
    path: &Path,
    summaries: &[QuerySummary],
    query_ids: &[String],
    (k, n_sequences): (usize, usize),
    n: usize,
    widening: Option<&Widening>,
) -> Result<()> {
    let file = PrefilterFile {
        confidence: 0.95,
        target_recall: widening.map(|w| w.target),
        prefilter_max: widening.map(|w| w.max),
        queries: estimates(summaries, query_ids, (k, n_sequences), n, widening),
    };
    let value = serde_json::to_value(&file).map_err(|e| Error::Other(e.to_string()))?;
    crate::io::write_json(path, &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_seeded_distinct_and_outside_the_candidates() {
        let cands: HashSet<usize> = (0..10).collect();
        let a = sample_rest(100, &cands, 20, 7, 0);
        assert_eq!(a, sample_rest(100, &cands, 20, 7, 0));
        assert_ne!(a, sample_rest(100, &cands, 20, 7, 1));
        assert_eq!(a.len(), 20);
        assert!(a.iter().all(|i| *i >= 10 && *i < 100));
        assert_eq!(sample_rest(15, &cands, 20, 7, 0), (10..15).collect());
    }

    #[test]
    fn wilson_interval_by_hand() {
        // x = 0 of m = 100: upper = z²/(m + z²) = 3.8415/103.8415 = 0.036994.
        let (lo, hi) = wilson(0, 100);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.036994).abs() < 1e-5, "{hi}");
        // x = 50 of 100: 0.5 ± 0.0951 (the textbook value 0.4038–0.5962).
        let (lo, hi) = wilson(50, 100);
        assert!(
            (lo - 0.4038).abs() < 1e-4 && (hi - 0.5962).abs() < 1e-4,
            "{lo} {hi}"
        );
    }
}
