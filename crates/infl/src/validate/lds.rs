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
//! `OUT/work/`, so an interrupted run resumes where it stopped.

use super::spearman;
use crate::curvature::{Fisher, Strategy};
use crate::data::{self, Corpus, LazyTokenizer, Query};
use crate::error::{Error, Result};
use crate::influence::Damping;
use crate::io;
use crate::model::gpt2::{Gpt2, Gpt2Config};
use crate::model::ModuleSelection;
use crate::options::FitOptions;
use crate::options::{RefineOptions, ScoreOptions};
use crate::pass::{Progress, Silent};
use crate::train::{completion_losses, Trainer, TrainingRecord};
use crate::workflow::{self, FitJob, ScoreJob};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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

/// Saved result of one retrained subset.
#[derive(serde::Serialize, serde::Deserialize)]
struct SubsetResult {
    fingerprint: String,
    subset: usize,
    losses: Vec<f64>,
    seconds: f64,
}

pub fn run(job: &LdsJob, progress: &dyn Progress) -> Result<LdsReport> {
    let started = std::time::Instant::now();
    check(job)?;
    let inputs = Inputs::read(job)?;
    io::ensure_dir(&job.out)?;
    let scores = strategy_scores(job, inputs.config.n_positions, progress)?;

    let n = inputs.corpus.sequences.len();
    let subsets = subsets(n, job.fraction, job.subsets, job.seed);
    let retraining = Retraining::prepare(job, &inputs, &subsets)?;
    let (subset_losses, retrain_seconds) = retraining.run(job, progress)?;

    let (mean_loss_spread, strategies) =
        lds_per_strategy(&scores, &subsets, &subset_losses, inputs.queries.len());
    let Inputs {
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

/// What the LDS is computed from, read and checked before any work: the recipe, the corpus it
/// was trained on, the queries, and their measurements under the full model.
struct Inputs {
    training: TrainingRecord,
    corpus_sha256: String,
    config: Gpt2Config,
    corpus: Corpus,
    queries: Vec<Query>,
    queries_sha256: String,
    full_model_losses: Vec<f64>,
    weights_sha256: String,
}

impl Inputs {
    fn read(job: &LdsJob) -> Result<Self> {
        let record_path = job.model.join("training.json");
        let training: TrainingRecord = io::read_json(&record_path).map_err(|_| {
            Error::input(format!(
                "{}: missing or unreadable; LDS retrains the model, so it needs a checkpoint made by `infl train` (or `infl demo`), which records its recipe there",
                record_path.display()
            ))
        })?;
        let corpus_sha256 = data::sha256_file(&job.train)?;
        if corpus_sha256 != training.corpus_sha256 {
            return Err(Error::Mismatch(format!(
                "{} (sha256 {}…) is not the corpus {} was trained on ({}, sha256 {}…)",
                job.train.display(),
                &corpus_sha256[..12],
                job.model.display(),
                training.corpus,
                &training.corpus_sha256[..12]
            )));
        }
        let full = Gpt2::load(&job.model, ModuleSelection::All)?;
        let config = full.config().clone();
        let mut tokenizer = LazyTokenizer::new(&job.model);
        let corpus = data::read_corpus(
            &job.train,
            &mut tokenizer,
            config.n_positions,
            config.vocab_size,
        )?;
        let n = corpus.sequences.len();
        if n != training.n_sequences {
            return Err(Error::Mismatch(format!(
                "{} cuts into {n} sequences but training.json records {}",
                job.train.display(),
                training.n_sequences
            )));
        }
        let (queries, queries_sha256) = data::read_queries(
            &job.queries,
            &mut tokenizer,
            config.n_positions,
            config.vocab_size,
        )?;
        let full_model_losses = completion_losses(&full, &pairs(&queries))?;
        let weights_sha256 = crate::provenance::ModelInfo::of(&job.model, &full)?.weights_sha256;
        Ok(Inputs {
            training,
            corpus_sha256,
            config,
            corpus,
            queries,
            queries_sha256,
            full_model_losses,
            weights_sha256,
        })
    }
}

/// Each query as (prompt, completion) token ids, as [`completion_losses`] measures them.
fn pairs(queries: &[Query]) -> Vec<(&[u32], &[u32])> {
    queries
        .iter()
        .map(|q| (q.prompt_ids.as_slice(), q.completion_ids.as_slice()))
        .collect()
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

/// The retraining of every subset on the recipe, resumable: each finished subset is saved in
/// `OUT/work/subset-MMMM.json` under a fingerprint of everything its measurements depend on.
struct Retraining<'a> {
    inputs: &'a Inputs,
    subsets: &'a [Vec<usize>],
    pairs: Vec<(&'a [u32], &'a [u32])>,
    fingerprint: String,
    work: PathBuf,
}

impl<'a> Retraining<'a> {
    /// Fingerprints the run and readies `OUT/work/` (emptied first with `--fresh`).
    fn prepare(job: &LdsJob, inputs: &'a Inputs, subsets: &'a [Vec<usize>]) -> Result<Self> {
        let fingerprint = {
            let mut h = Sha256::new();
            h.update(
                serde_json::json!({
                    "weights": inputs.weights_sha256,
                    "corpus": inputs.corpus_sha256,
                    "queries": inputs.queries_sha256,
                    "fraction": job.fraction,
                    "seed": job.seed,
                    "options": inputs.training.options,
                })
                .to_string(),
            );
            data::hex(&h.finalize())
        };
        let work = job.out.join("work");
        if job.fresh && work.exists() {
            std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        }
        io::ensure_dir(&work)?;
        Ok(Retraining {
            inputs,
            subsets,
            pairs: pairs(&inputs.queries),
            fingerprint,
            work,
        })
    }

    fn saved(&self, m: usize) -> PathBuf {
        self.work.join(format!("subset-{m:04}.json"))
    }

    /// Tokens trained on for subset m (the progress unit).
    fn tokens(&self, m: usize) -> u64 {
        self.subsets[m]
            .iter()
            .map(|&i| self.inputs.corpus.sequences[i].ids.len() as u64)
            .sum::<u64>()
            * self.inputs.training.options.epochs as u64
    }

    /// The saved subsets first, then the rest, `threads` at a time. Returns the measurements
    /// `[subset][query]` and the seconds spent retraining.
    fn run(&self, job: &LdsJob, progress: &dyn Progress) -> Result<(Vec<Vec<f64>>, f64)> {
        let results = Mutex::new(self.resume(job.subsets));
        let todo: Vec<usize> = {
            let r = results.lock().map_err(|_| poisoned())?;
            (0..job.subsets).filter(|&m| r[m].is_none()).collect()
        };
        progress.begin(
            &format!("retrain {} of {} subsets", todo.len(), job.subsets),
            todo.iter().map(|&m| self.tokens(m)).sum(),
        );
        let retrain_started = std::time::Instant::now();
        let next = AtomicUsize::new(0);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..job.threads.max(1).min(todo.len().max(1)) {
                scope.spawn(|| self.worker(&todo, &next, &failure, &results, progress));
            }
        });
        progress.end();
        if let Some(e) = failure.into_inner().map_err(|_| poisoned())? {
            return Err(e);
        }
        let retrain_seconds = retrain_started.elapsed().as_secs_f64();
        let subset_losses: Vec<Vec<f64>> = results
            .into_inner()
            .map_err(|_| poisoned())?
            .into_iter()
            .map(|r| {
                r.map(|r| r.losses)
                    .ok_or_else(|| Error::Other("a subset was not retrained".into()))
            })
            .collect::<Result<_>>()?;
        Ok((subset_losses, retrain_seconds))
    }

    /// The saved results that belong to this run (same fingerprint, subset and query count).
    fn resume(&self, count: usize) -> Vec<Option<SubsetResult>> {
        let mut results: Vec<Option<SubsetResult>> = (0..count).map(|_| None).collect();
        for (m, slot) in results.iter_mut().enumerate() {
            if let Ok(r) = io::read_json::<SubsetResult>(&self.saved(m)) {
                if r.fingerprint == self.fingerprint
                    && r.subset == m
                    && r.losses.len() == self.pairs.len()
                {
                    *slot = Some(r);
                }
            }
        }
        results
    }

    /// One retraining thread: takes the next subset to do until none is left or one failed.
    fn worker(
        &self,
        todo: &[usize],
        next: &AtomicUsize,
        failure: &Mutex<Option<Error>>,
        results: &Mutex<Vec<Option<SubsetResult>>>,
        progress: &dyn Progress,
    ) {
        crate::linalg::flush_subnormals_on_this_thread();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&m) = todo.get(i) else { break };
            if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                break;
            }
            match self.retrain(m) {
                Ok(r) => {
                    progress.advance(self.tokens(m));
                    if let Ok(mut all) = results.lock() {
                        all[m] = Some(r);
                    }
                }
                Err(e) => {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                    break;
                }
            }
        }
    }

    /// Retrains from scratch on subset m, measures the queries, and saves the result.
    fn retrain(&self, m: usize) -> Result<SubsetResult> {
        let t0 = std::time::Instant::now();
        let seqs: Vec<&[u32]> = self.subsets[m]
            .iter()
            .map(|&i| self.inputs.corpus.sequences[i].ids.as_slice())
            .collect();
        let mut trainer = Trainer::new(
            self.inputs.config.clone(),
            self.inputs.training.options.clone(),
        )?;
        trainer.fit(&seqs, &Silent)?;
        let losses = completion_losses(trainer.model(), &self.pairs)?;
        let r = SubsetResult {
            fingerprint: self.fingerprint.clone(),
            subset: m,
            losses,
            seconds: t0.elapsed().as_secs_f64(),
        };
        io::write_json(&self.saved(m), &r)?;
        Ok(r)
    }
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

fn poisoned() -> Error {
    Error::Other("a retraining thread panicked".into())
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
