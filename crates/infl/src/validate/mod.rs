//! Validation of the approximate curvature strategies against references: `infl validate`.
//!
//! Each subcommand computes influence scores some more exact (or more expensive) way and
//! measures, per query, how well each strategy's scores agree with them. The agreement
//! measures shared by every validation live here: [`spearman`] (rank correlation, average ranks
//! for ties), [`pearson`], [`top_k_overlap`], and the table that prints them.
//!
//! - [`exact`]: the exact damped per-layer (block-diagonal) Fisher, inverted through the
//!   Woodbury identity on the per-sequence gradients (`infl validate exact`).
//! - [`lds`]: the linear datamodeling score: retrain on random subsets and correlate the
//!   measured losses with the influence-predicted ones (`infl validate lds`).
//! - [`pbrf`]: the proximal Bregman response function, optimised on a sample of training
//!   sequences (`infl validate pbrf`).
//! - [`removal`]: the calibration of `group_removal_change`: retrain without each query's
//!   top-k (and bottom-k) group and set the measured change of −log p beside the predicted one
//!   (`infl validate removal`).
//! - [`retrain`]: retraining a model on chosen training sets with its recorded recipe,
//!   resumably, for `lds` and `removal`.

pub mod exact;
pub mod lds;
pub mod pbrf;
pub mod removal;
pub mod retrain;

use crate::error::Result;
use crate::options::{FitOptions, ScoreOptions};
use crate::pass::Progress;
use crate::workflow::{self, FitJob, ScoreJob, ScoreSummary};
use std::path::Path;

/// The window length of a validation run on `model` (`max_len`, or the model's context),
/// checked, once the model is known to track some layer.
pub(crate) fn window(model: &dyn crate::model::TapModel, max_len: Option<usize>) -> Result<usize> {
    if model.tracked().is_empty() {
        return Err(crate::Error::input(
            "no tracked layers: --modules selected nothing",
        ));
    }
    let max_len = max_len.unwrap_or(model.max_positions());
    if max_len == 0 || max_len > model.max_positions() {
        return Err(crate::Error::input(format!(
            "--max-len {max_len} must be between 1 and the model's context length {}",
            model.max_positions()
        )));
    }
    Ok(max_len)
}

/// Fits `fit` into `DIR/factors` and scores the queries densely into `DIR/results` (full-rank
/// queries); returns the `[query][sequence]` scores and the score's summary.
pub(crate) fn fit_and_score(
    (model, train, queries): (&Path, &Path, &Path),
    dir: &Path,
    fit: FitOptions,
    score: ScoreOptions,
    progress: &dyn Progress,
) -> Result<(Vec<Vec<f64>>, ScoreSummary)> {
    let (factors, results) = (dir.join("factors"), dir.join("results"));
    workflow::fit(
        &FitJob::new(model.into(), train.into(), factors.clone(), fit),
        progress,
    )?;
    let summary = workflow::score(
        &ScoreJob {
            options: ScoreOptions {
                dense: true,
                query_rank: crate::options::QueryRank(None),
                ..score
            },
            ..ScoreJob::new(
                model.into(),
                factors,
                train.into(),
                queries.into(),
                results.clone(),
            )
        },
        progress,
    )?;
    Ok((exact::read_dense(&results)?, summary))
}

/// Ranks of `x` (1-based), ties sharing their average rank. NaNs rank last.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut out = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) hold equal values: each gets the mean of ranks i+1..=j+1.
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = avg;
        }
        i = j + 1;
    }
    out
}

/// Pearson correlation of `a` and `b` (equal lengths). NaN when either is constant or empty.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n == 0 {
        return f64::NAN;
    }
    let ma = a[..n].iter().sum::<f64>() / n as f64;
    let mb = b[..n].iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a[..n].iter().zip(&b[..n]) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return f64::NAN;
    }
    (sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0)
}

/// Spearman rank correlation: the Pearson correlation of the ranks (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Indices of the `k` largest values (most positive first; ties broken by position).
pub fn top_k_indices(x: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    order.truncate(k.min(x.len()));
    order
}

/// `|top-k(a) ∩ top-k(b)| / k` over the most positive scores (k clipped to the length).
pub fn top_k_overlap(a: &[f64], b: &[f64], k: usize) -> f64 {
    let k = k.min(a.len()).min(b.len());
    if k == 0 {
        return f64::NAN;
    }
    let ta: std::collections::HashSet<usize> = top_k_indices(a, k).into_iter().collect();
    let shared = top_k_indices(b, k)
        .into_iter()
        .filter(|i| ta.contains(i))
        .count();
    shared as f64 / k as f64
}

/// How one strategy's scores of one query agree with the reference's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    pub spearman: f64,
    pub pearson: f64,
    pub top_k_overlap: f64,
}

impl Agreement {
    /// `reference` and `approx` score the same training sequences in the same order.
    pub fn of(reference: &[f64], approx: &[f64], k: usize) -> Self {
        Agreement {
            spearman: spearman(reference, approx),
            pearson: pearson(reference, approx),
            top_k_overlap: top_k_overlap(reference, approx, k),
        }
    }
}

/// Mean and minimum of each measure over queries.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgreementSummary {
    pub mean: Agreement,
    pub min: Agreement,
}

impl AgreementSummary {
    pub fn of(per_query: &[Agreement]) -> Self {
        let stat = |f: fn(&Agreement) -> f64| {
            let v: Vec<f64> = per_query.iter().map(f).collect();
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            (mean, if v.is_empty() { f64::NAN } else { min })
        };
        let (s, p, t) = (
            stat(|a| a.spearman),
            stat(|a| a.pearson),
            stat(|a| a.top_k_overlap),
        );
        AgreementSummary {
            mean: Agreement {
                spearman: s.0,
                pearson: p.0,
                top_k_overlap: t.0,
            },
            min: Agreement {
                spearman: s.1,
                pearson: p.1,
                top_k_overlap: t.1,
            },
        }
    }
}

/// One row per strategy: `Spearman`, `Pearson` and `top-k overlap`, each as `mean (min)` over
/// the queries.
pub fn table(rows: &[(String, AgreementSummary)], k: usize) -> String {
    let cell = |mean: f64, min: f64, digits: usize| format!("{mean:.digits$} ({min:.digits$})");
    let head_k = format!("top-{k} overlap mean (min)");
    let mut out = format!(
        "{:<14} {:>22} {:>22} {:>28}\n",
        "strategy", "Spearman mean (min)", "Pearson mean (min)", head_k
    );
    for (name, s) in rows {
        out.push_str(&format!(
            "{:<14} {:>22} {:>22} {:>28}\n",
            name,
            cell(s.mean.spearman, s.min.spearman, 4),
            cell(s.mean.pearson, s.min.pearson, 4),
            cell(s.mean.top_k_overlap, s.min.top_k_overlap, 2),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_share_their_average_rank() {
        assert_eq!(ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
        assert_eq!(ranks(&[1.0, 1.0, 1.0]), vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn spearman_and_pearson_by_hand() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        // Monotone but not linear: Spearman 1, Pearson below 1.
        let b = [1.0, 4.0, 9.0, 16.0, 100.0];
        assert!((spearman(&a, &b) - 1.0).abs() < 1e-12);
        assert!(pearson(&a, &b) < 0.95);
        let rev: Vec<f64> = a.iter().rev().copied().collect();
        assert!((spearman(&a, &rev) + 1.0).abs() < 1e-12);
        assert!((pearson(&a, &rev) + 1.0).abs() < 1e-12);
        // Pearson by hand: x = [1,2,3], y = [1,3,2] → cov 0.5·2, var 2, 2 → 0.5.
        assert!((pearson(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]) - 0.5).abs() < 1e-12);
        // With ties: ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4].
        let r = pearson(&[1.0, 2.5, 2.5, 4.0], &[1.0, 2.0, 3.0, 4.0]);
        assert!((spearman(&[0.0, 7.0, 7.0, 9.0], &[1.0, 2.0, 3.0, 4.0]) - r).abs() < 1e-12);
        assert!(pearson(&[1.0, 1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn top_k_overlap_counts_shared_sequences() {
        let a = [5.0, 4.0, 3.0, 2.0, 1.0];
        let b = [5.0, 1.0, 4.0, 2.0, 3.0];
        // top-2: {0, 1} vs {0, 2} → 1/2; top-3: {0,1,2} vs {0,2,4} → 2/3.
        assert_eq!(top_k_overlap(&a, &b, 2), 0.5);
        assert!((top_k_overlap(&a, &b, 3) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(top_k_overlap(&a, &b, 50), 1.0);
        assert_eq!(top_k_indices(&[1.0, 3.0, 3.0], 2), vec![1, 2]);
    }

    #[test]
    fn summary_takes_mean_and_min() {
        let q = [
            Agreement {
                spearman: 0.5,
                pearson: 1.0,
                top_k_overlap: 0.2,
            },
            Agreement {
                spearman: 1.0,
                pearson: 0.0,
                top_k_overlap: 0.4,
            },
        ];
        let s = AgreementSummary::of(&q);
        assert_eq!(s.mean.spearman, 0.75);
        assert_eq!(s.min.pearson, 0.0);
        assert!((s.mean.top_k_overlap - 0.3).abs() < 1e-12);
        let t = table(&[("ekfac".into(), s)], 10);
        assert!(t.contains("top-10 overlap") && t.contains("0.7500 (0.5000)"));
    }
}
