//! The linear datamodeling score (LDS; Park et al. 2023, "TRAK"), the field's standard test of
//! whether attribution scores predict what retraining does: `infl validate lds`.
//!
//! For M random subsets S_m of the training sequences (each a fixed fraction, 50% by default,
//! drawn from a fixed seed), the model is retrained from scratch on S_m with exactly the recipe
//! that made it (`training.json`: same initialisation seed, optimiser, schedule and epochs), and
//! each query's measurement f_q = −log p(completion | prompt) is taken under the retrained model.
//! Influence computed once on the full model predicts those measurements: since I(q, z) > 0 means
//! that up-weighting z lowers f_q, the prediction for subset m is
//!
//!   f̂_q(S_m) = −Σ_{z ∈ S_m} I(q, z)       (up to a constant, which no rank correlation sees)
//!
//! and the LDS of query q is the Spearman correlation over m of f̂_q(S_m) with the measured
//! f_q(θ_{S_m}). The score of a strategy is the mean over queries.
//!
//! Retraining dominates the cost (M models); each finished subset's measurements are saved in
//! `OUT/work/`, so an interrupted run resumes where it stopped ([`super::retrain`]).

use super::retrain::{Recipe, Retraining, TrainingSet};
use super::spearman;
use crate::curvature::{Fisher, Strategy};
use crate::error::{Error, Result};
use crate::influence::Damping;
use crate::io;
use crate::options::FitOptions;
use crate::options::{RefineOptions, ScoreOptions};
use crate::pass::Progress;
use crate::train::TrainingRecord;
use crate::workflow::{self, FitJob, ScoreJob};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// Settings of `infl validate lds`.
#[derive(Debug, Clone)]
pub struct LdsJob {
    /// A checkpoint written by `infl train` (its `training.json` is the recipe retrained).
    pub model: PathBuf,
    /// The corpus it was trained on (checked against the recorded hash).
    pub train: PathBuf,
    pub queries: PathBuf,
    pub out: PathBuf,
    /// M, the number of retrained subsets.
    pub subsets: usize,
    /// The fraction of the training sequences in each subset.
    pub fraction: f64,
    /// Seed of the subsets.
    pub seed: u64,
    pub strategies: Vec<Strategy>,
    pub fisher: Fisher,
    pub damping: Damping,
    /// Models retrained at once (each single-threaded inside).
    pub threads: usize,
    /// Discard saved retraining results in `OUT/work/`.
    pub fresh: bool,
    /// How `ekfac-refined` refines (its `iterations` unused: see `refine_iterations`).
    pub refine: RefineOptions,
    /// `ekfac-refined`'s iteration counts, each scored as a row of its own.
    pub refine_iterations: Vec<usize>,
}

/// The subsets' indices: `round(fraction · n)` distinct sequences each, sorted, drawn for subset
/// m from (seed, m) alone, so that subset m is the same whatever M is.
pub fn subsets(n: usize, fraction: f64, m: usize, seed: u64) -> Vec<Vec<usize>> {
    let k = ((fraction * n as f64).round() as usize).clamp(1, n.max(1));
    (0..m)
        .map(|i| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            let mut all: Vec<usize> = (0..n).collect();
            for j in 0..k {
                let r = rng.random_range(j..n);
                all.swap(j, r);
            }
            let mut pick = all[..k].to_vec();
            pick.sort_unstable();
            pick
        })
        .collect()
}

/// LDS of one query: Spearman over subsets of the predicted −Σ_{z∈S} I(q, z) against the
/// measured losses.
pub fn lds(scores: &[f64], subsets: &[Vec<usize>], measured: &[f64]) -> f64 {
    let predicted: Vec<f64> = subsets
        .iter()
        .map(|s| -s.iter().map(|&z| scores[z]).sum::<f64>())
        .collect();
    spearman(&predicted, measured)
}

/// One strategy's LDS.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StrategyLds {
    pub strategy: String,
    pub mean: f64,
    /// Standard error of the mean over queries.
    pub stderr: f64,
    pub min: f64,
    pub max: f64,
    /// Per query, in query-file order.
    pub per_query: Vec<f64>,
    /// Time of the strategy's `infl score` (queries and the pass over the corpus).
    #[serde(default)]
    pub score_seconds: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LdsReport {
    pub tool: String,
    pub definition: String,
    pub model: String,
    pub model_weights_sha256: String,
    pub corpus: String,
    pub corpus_sha256: String,
    pub queries: String,
    pub queries_sha256: String,
    pub query_ids: Vec<String>,
    pub n_sequences: usize,
    pub subsets: usize,
    pub fraction: f64,
    pub seed: u64,
    pub fisher: Fisher,
    pub training: TrainingRecord,
    /// Each query's measurement under the full model.
    pub full_model_losses: Vec<f64>,
    /// `[subset][query]` measurements under the retrained models.
    pub subset_losses: Vec<Vec<f64>>,
    /// Mean over queries of the spread (standard deviation over subsets) of the measurements.
    pub mean_loss_spread: f64,
    pub strategies: Vec<StrategyLds>,
    pub retrain_seconds: f64,
    pub seconds: f64,
}

impl LdsReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "LDS: {} retrained models on {:.0}% subsets of {} sequences, {} queries\n{:<16} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            self.subsets,
            self.fraction * 100.0,
            self.n_sequences,
            self.query_ids.len(),
            "strategy",
            "mean",
            "± s.e.",
            "min",
            "max",
            "score s"
        );
        for r in &self.strategies {
            s += &format!(
                "{:<16} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9.1}\n",
                r.strategy,
                r.mean,
                r.stderr,
                r.min,
                r.max,
                r.score_seconds.unwrap_or(f64::NAN)
            );
        }
        s
    }
}

pub const LDS_FILE: &str = "lds.json";
const DEFINITION: &str = "For M random subsets S_m (fixed fraction of the training sequences, seeded), the model is retrained from scratch on S_m with the recipe in training.json (same init seed, optimiser, schedule, epochs) and f_q = -log p(completion | prompt) is measured. LDS(q) = Spearman over m of (-sum_{z in S_m} I(q,z)) against f_q(theta_{S_m}), with I from the full model (positive I: up-weighting z lowers f_q). A strategy's LDS is the mean over queries.";

pub fn run(job: &LdsJob, progress: &dyn Progress) -> Result<LdsReport> {
    let started = std::time::Instant::now();
    check(job)?;
    let inputs = Recipe::read(&job.model, &job.train, &job.queries)?;
    io::ensure_dir(&job.out)?;
    let scores = strategy_scores(job, inputs.config.n_positions, progress)?;

    let n = inputs.corpus.sequences.len();
    let subsets = subsets(n, job.fraction, job.subsets, job.seed);
    let sets: Vec<TrainingSet> = subsets
        .iter()
        .enumerate()
        .map(|(m, keep)| TrainingSet {
            name: format!("subset-{m:04}"),
            keep: keep.clone(),
        })
        .collect();
    let retraining = Retraining::prepare(&inputs, job.out.join("work"), job.fresh)?;
    let (retrained, retrain_seconds) = retraining.run(&sets, job.threads, progress)?;
    let subset_losses: Vec<Vec<f64>> = retrained.into_iter().map(|r| r.losses).collect();

    let (mean_loss_spread, strategies) =
        lds_per_strategy(&scores, &subsets, &subset_losses, inputs.queries.len());
    let Recipe {
        training,
        corpus_sha256,
        queries,
        queries_sha256,
        full_model_losses,
        weights_sha256,
        ..
    } = inputs;
    let report = LdsReport {
        tool: format!("infl {}", env!("CARGO_PKG_VERSION")),
        definition: DEFINITION.into(),
        model: job.model.display().to_string(),
        model_weights_sha256: weights_sha256,
        corpus: job.train.display().to_string(),
        corpus_sha256,
        queries: job.queries.display().to_string(),
        queries_sha256,
        query_ids: queries.iter().map(|q| q.id.clone()).collect(),
        n_sequences: n,
        subsets: job.subsets,
        fraction: job.fraction,
        seed: job.seed,
        fisher: job.fisher,
        training,
        full_model_losses,
        subset_losses,
        mean_loss_spread,
        strategies,
        retrain_seconds,
        seconds: started.elapsed().as_secs_f64(),
    };
    io::write_json(&job.out.join(LDS_FILE), &report)?;
    Ok(report)
}

/// The settings no retraining can satisfy.
fn check(job: &LdsJob) -> Result<()> {
    if job.subsets < 2 {
        return Err(Error::input(
            "--subsets must be at least 2 (a correlation over subsets)",
        ));
    }
    if !(job.fraction > 0.0 && job.fraction <= 1.0) {
        return Err(Error::input("--fraction must lie in (0, 1]"));
    }
    Ok(())
}

/// A strategy's name, its dense `[query][sequence]` scores and its score's time in seconds.
type StrategyScores = (String, Vec<Vec<f64>>, f64);

/// Influence from the full model, for each strategy: its dense `[query][sequence]` scores
/// and the score's time, fitted and scored under `OUT/runs/STRATEGY/` (`ekfac-refined`: one
/// fit, scored once per iteration count into `results-K/`).
fn strategy_scores(
    job: &LdsJob,
    max_len: usize,
    progress: &dyn Progress,
) -> Result<Vec<StrategyScores>> {
    let mut scores = Vec::new();
    for &strategy in &job.strategies {
        let name = strategy.name().to_string();
        let dir = job.out.join("runs").join(&name);
        workflow::fit(
            &FitJob::new(
                job.model.clone(),
                job.train.clone(),
                dir.join("factors"),
                FitOptions {
                    strategy,
                    fisher: job.fisher,
                    max_len: Some(max_len),
                    ..FitOptions::default()
                },
            ),
            progress,
        )?;
        let runs: Vec<(String, String, RefineOptions)> = match strategy.is_refined() {
            false => vec![(name, "results".into(), job.refine)],
            true => job
                .refine_iterations
                .iter()
                .map(|&k| {
                    let refine = RefineOptions {
                        iterations: k,
                        ..job.refine
                    };
                    (format!("{name}:{k}"), format!("results-{k}"), refine)
                })
                .collect(),
        };
        for (name, results, refine) in runs {
            let summary = workflow::score(
                &ScoreJob {
                    options: ScoreOptions {
                        damping: job.damping,
                        dense: true,
                        refine,
                        ..ScoreOptions::default()
                    },
                    ..ScoreJob::new(
                        job.model.clone(),
                        dir.join("factors"),
                        job.train.clone(),
                        job.queries.clone(),
                        dir.join(&results),
                    )
                },
                progress,
            )?;
            let dense = super::exact::read_dense(&dir.join(&results))?;
            scores.push((name, dense, summary.seconds));
        }
    }
    Ok(scores)
}

/// The mean over queries of the measurements' spread over subsets, and each strategy's LDS.
fn lds_per_strategy(
    scores: &[StrategyScores],
    subsets: &[Vec<usize>],
    subset_losses: &[Vec<f64>],
    nq: usize,
) -> (f64, Vec<StrategyLds>) {
    let column = |q: usize| -> Vec<f64> { subset_losses.iter().map(|l| l[q]).collect() };
    let mean_loss_spread = (0..nq)
        .map(|q| {
            let c = column(q);
            let mean = c.iter().sum::<f64>() / c.len() as f64;
            (c.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (c.len() - 1) as f64).sqrt()
        })
        .sum::<f64>()
        / nq.max(1) as f64;
    let strategies = scores
        .iter()
        .map(|(name, dense, seconds)| {
            let per_query: Vec<f64> = (0..nq)
                .map(|q| lds(&dense[q], subsets, &column(q)))
                .collect();
            StrategyLds {
                score_seconds: Some(*seconds),
                ..summarise(name, per_query)
            }
        })
        .collect();
    (mean_loss_spread, strategies)
}

fn summarise(name: &str, per_query: Vec<f64>) -> StrategyLds {
    let finite: Vec<f64> = per_query
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    if finite.is_empty() {
        // Every correlation undefined (e.g. --fraction 1: all subsets equal).
        return StrategyLds {
            strategy: name.to_string(),
            mean: f64::NAN,
            stderr: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            per_query,
            score_seconds: None,
        };
    }
    let k = finite.len() as f64;
    let mean = finite.iter().sum::<f64>() / k;
    let var = finite.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0).max(1.0);
    StrategyLds {
        strategy: name.to_string(),
        mean,
        stderr: (var / k).sqrt(),
        min: finite.iter().copied().fold(f64::INFINITY, f64::min),
        max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        per_query,
        score_seconds: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_seeded_distinct_and_of_the_requested_size() {
        let a = subsets(101, 0.5, 6, 3);
        assert_eq!(a, subsets(101, 0.5, 6, 3));
        // Subset m does not depend on how many are drawn.
        assert_eq!(a[..3], subsets(101, 0.5, 3, 3)[..]);
        assert_ne!(a[0], a[1]);
        assert_ne!(a[0], subsets(101, 0.5, 1, 4)[0]);
        for s in &a {
            assert_eq!(s.len(), 51);
            assert!(s.windows(2).all(|w| w[0] < w[1]) && *s.last().unwrap() < 101);
        }
        // Every sequence lands in about half the subsets over many draws.
        let many = subsets(10, 0.5, 2000, 0);
        for z in 0..10 {
            let c = many.iter().filter(|s| s.contains(&z)).count();
            assert!((900..1100).contains(&c), "sequence {z} in {c} of 2000");
        }
        assert_eq!(subsets(8, 1.0, 2, 0)[1], (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn lds_is_one_when_losses_follow_the_prediction_and_minus_one_when_reversed() {
        let scores = [3.0, -1.0, 0.5, 2.0, -4.0, 0.0];
        let s = subsets(6, 0.5, 12, 1);
        // Measured loss = constant − Σ_{z∈S} I(q,z) + a monotone distortion: rank-identical.
        let measured: Vec<f64> = s
            .iter()
            .map(|sub| {
                let p: f64 = -sub.iter().map(|&z| scores[z]).sum::<f64>();
                7.0 + p.powi(3)
            })
            .collect();
        assert!((lds(&scores, &s, &measured) - 1.0).abs() < 1e-12);
        let reversed: Vec<f64> = measured.iter().map(|x| -x).collect();
        assert!((lds(&scores, &s, &reversed) + 1.0).abs() < 1e-12);
        // Hand-worked: two subsets {0,1} and {2,3}: predictions −2 and −2.5; losses 1 and 2.
        let hand = lds(&scores, &[vec![0, 1], vec![2, 3]], &[1.0, 2.0]);
        assert!((hand + 1.0).abs() < 1e-12, "{hand}");
    }
}
