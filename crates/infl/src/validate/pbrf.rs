//! `infl validate pbrf`: the proximal Bregman response function (Bae et al. 2022), the ground
//! truth Grosse et al. 2023 measure influence approximations against, and how well each
//! strategy (ekfac, kfac, diagonal, identity) reproduces it.
//!
//! For a seeded sample of training sequences z_m, with θ^s the checkpoint's tracked weights,
//! `r(ε) = argmin_θ (1/N) Σ_z Σ_t KL(p_t(θ^s) ‖ p_t(θ)) − ε L(z_m, θ) + ½ Σ_ℓ λ_ℓ ‖θ_ℓ − θ^s_ℓ‖²`
//! over the tracked layers (the rest frozen), and the PBRF influence on query q is
//! `(f_q(r(ε)) − f_q(r(−ε))) / 2ε`. λ_ℓ is the damping EK-FAC's scoring used on layer ℓ: the
//! PBRF's first-order response is then `(G + λ)⁻¹ ∇L(z_m)`, G the Gauss-Newton of the training
//! loss, which is exactly what EK-FAC approximates, so the comparison measures the
//! approximation and nothing else. [`solve`] optimises, [`gpt2`] is the model's side.
//!
//! Each sampled sequence's result is saved in `OUT/work/` under a fingerprint of everything it
//! depends on, so an interrupted run resumes.

pub mod gpt2;
pub mod solve;

use super::exact::QueriesRef;
use super::{pearson, spearman, Agreement, AgreementSummary};
use crate::curvature::{Fisher, Strategy};
use crate::data::{self, Corpus, LazyTokenizer, Query};
use crate::error::{Error, Result};
use crate::influence::Damping;
use crate::io;
use crate::model::{self, gpt2::Gpt2, AnyModel, ModuleSelection, TapModel};
use crate::options::{FitOptions, ScoreOptions};
use crate::pass::Progress;
use crate::provenance::{CorpusInfo, ModelInfo};
use gpt2::Gpt2Problem;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use solve::{Problem, Response, SolveOptions};
use std::path::PathBuf;

/// The strategies compared with the PBRF, in table order.
pub const STRATEGIES: [Strategy; 4] = [
    Strategy::Ekfac,
    Strategy::Kfac,
    Strategy::Diagonal,
    Strategy::Identity,
];

pub const PBRF_FILE: &str = "pbrf.json";

/// Settings of `infl validate pbrf`.
#[derive(Debug, Clone)]
pub struct PbrfJob {
    pub model: PathBuf,
    pub train: PathBuf,
    pub queries: PathBuf,
    /// pbrf.json; the strategies' runs under `runs/`, the per-sequence results under `work/`.
    pub out: PathBuf,
    /// Training sequences sampled (all of them when the corpus has fewer).
    pub sample: usize,
    /// ε of the central difference; `None`: 1/N, the weight of one sequence in the mean loss.
    pub epsilon: Option<f64>,
    pub solve: SolveOptions,
    /// Seeds the sample and the Fisher's sampled labels.
    pub seed: u64,
    pub fisher: Fisher,
    pub modules: ModuleSelection,
    pub max_len: Option<usize>,
    pub batch_size: usize,
    /// The strategies' damping, and through EK-FAC's, the PBRF's λ.
    pub damping: Damping,
    /// k of the top-k overlap.
    pub top_k: usize,
    /// Discard the saved per-sequence results instead of resuming from them.
    pub fresh: bool,
}

/// One sampled training sequence's PBRF influence, as saved in `OUT/work/`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SampleResult {
    pub fingerprint: String,
    /// Index in the corpus.
    pub index: usize,
    /// `LINE:WINDOW`.
    pub id: String,
    #[serde(flatten)]
    pub response: Response,
    pub seconds: f64,
}

/// One strategy's agreement with the PBRF.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StrategyReport {
    pub strategy: Strategy,
    pub damping_per_layer: Vec<(String, f64)>,
    /// Over the sampled sequences, per query: mean and worst.
    pub mean: Agreement,
    pub min: Agreement,
    /// Over every (query, sequence) pair at once.
    pub pooled_pearson: f64,
    pub pooled_spearman: f64,
    pub per_query: Vec<super::exact::QueryAgreement>,
    /// `[query][sample]`, in the sample's order.
    pub scores: Vec<Vec<f64>>,
}

/// `pbrf.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PbrfReport {
    pub tool: String,
    pub version: String,
    pub kind: String,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub queries: QueriesRef,
    pub fisher: Fisher,
    pub seed: u64,
    pub modules: ModuleSelection,
    pub damping: Damping,
    /// λ_ℓ of the proximal term (EK-FAC's), per tracked layer.
    pub lambda_per_layer: Vec<(String, f64)>,
    pub epsilon: f64,
    pub solve: SolveOptions,
    pub top_k: usize,
    pub samples: Vec<SampleResult>,
    pub strategies: Vec<StrategyReport>,
    pub pbrf_seconds: f64,
    pub seconds: f64,
    pub definition: String,
}

const DEFINITION: &str = "PBRF influence of training sequence z_m on query q: (f_q(r(ε)) − f_q(r(−ε)))/2ε, r(ε) = argmin over the tracked layers' weights θ (others frozen) of (1/N) Σ_z Σ_t KL(p_t(θ^s) ‖ p_t(θ)) − ε L(z_m, θ) + ½ Σ_l λ_l ‖θ_l − θ^s_l‖², from θ^s by L-BFGS; L the training loss (sum over tokens), f_q = −log p(completion | prompt), λ_l EK-FAC's damping; same sign and scale as infl score. Per query, each strategy's scores of the sampled sequences against the PBRF's: Spearman, Pearson, top-k overlap; pooled: over every (query, sequence) pair";

impl PbrfReport {
    /// The table `infl validate pbrf` prints.
    pub fn table(&self) -> String {
        let rows: Vec<(String, AgreementSummary)> = self
            .strategies
            .iter()
            .map(|s| {
                let summary = AgreementSummary {
                    mean: s.mean,
                    min: s.min,
                };
                (s.strategy.name().to_string(), summary)
            })
            .collect();
        let converged = self
            .samples
            .iter()
            .filter(|s| s.response.plus.converged && s.response.minus.converged)
            .count();
        let mut out = format!(
            "Against the PBRF (ε = {:.3e}; {converged} of {} sequences converged): {} queries × {} sampled training sequences of {}\n{}",
            self.epsilon,
            self.samples.len(),
            self.queries.ids.len(),
            self.samples.len(),
            self.corpus.n_sequences,
            super::table(&rows, self.top_k.min(self.samples.len()))
        );
        out.push_str(&format!(
            "{:<14} {:>22} {:>22}\n",
            "pooled", "Spearman", "Pearson"
        ));
        for s in &self.strategies {
            out.push_str(&format!(
                "{:<14} {:>22.4} {:>22.4}\n",
                s.strategy.name(),
                s.pooled_spearman,
                s.pooled_pearson
            ));
        }
        out
    }
}

/// `k` distinct indices of `0..n` drawn from `seed` (all of them when `k ≥ n`), sorted.
pub fn sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x0bb7_f5a3_91e0);
    let mut all: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    for i in 0..k {
        let j = rng.random_range(i..n);
        all.swap(i, j);
    }
    let mut out = all[..k].to_vec();
    out.sort_unstable();
    out
}

/// What `infl validate pbrf` reads and checks before any work.
struct Inputs {
    max_len: usize,
    corpus: Corpus,
    queries: Vec<Query>,
    queries_sha: String,
}

impl Inputs {
    /// The model apart: the PBRF takes it over.
    fn read(job: &PbrfJob) -> Result<(Gpt2, Self)> {
        let AnyModel::Gpt2(model) =
            model::load_autograd(&job.model, job.modules, &candle_core::Device::Cpu)?
        else {
            return Err(Error::input(format!(
                "{}: infl validate pbrf supports GPT-2 checkpoints only (the tiny models `infl \
                 train` makes)",
                job.model.display()
            )));
        };
        let max_len = super::window(&model, job.max_len)?;
        let mut tok = LazyTokenizer::new(&job.model);
        let corpus = data::read_corpus(&job.train, &mut tok, max_len, model.vocab_size())?;
        if corpus.sequences.len() < 3 {
            return Err(Error::input(format!(
                "{}: {} training sequences; the correlations need at least 3",
                job.train.display(),
                corpus.sequences.len()
            )));
        }
        let (queries, queries_sha) = data::read_queries(
            &job.queries,
            &mut tok,
            model.max_positions(),
            model.vocab_size(),
        )?;
        Ok((
            model,
            Inputs {
                max_len,
                corpus,
                queries,
                queries_sha,
            },
        ))
    }
}

fn check(job: &PbrfJob) -> Result<()> {
    crate::options::BATCH_SIZE.check(job.batch_size)?;
    crate::options::TOP_K.check(job.top_k)?;
    if job.sample < 3 {
        return Err(Error::usage(format!(
            "--sample {} must be at least 3 (the correlations need three sequences)",
            job.sample
        )));
    }
    if let Some(e) = job.epsilon {
        if !(e > 0.0 && e.is_finite()) {
            return Err(Error::usage(format!(
                "--epsilon must be a positive number (got {e})"
            )));
        }
    }
    if job.solve.max_steps == 0 {
        return Err(Error::usage("--steps must be at least 1"));
    }
    if !(job.solve.tolerance > 0.0 && job.solve.tolerance < 1.0) {
        return Err(Error::usage(format!(
            "--tolerance must lie in (0, 1) (got {})",
            job.solve.tolerance
        )));
    }
    Ok(())
}

/// Runs `infl validate pbrf`: every strategy fitted and scored, the PBRF of each sampled
/// sequence (resumed from `OUT/work/`), and the correlations. Writes `OUT/pbrf.json`.
pub fn run(job: &PbrfJob, progress: &dyn Progress) -> Result<PbrfReport> {
    let started = std::time::Instant::now();
    check(job)?;
    let (model, inputs) = Inputs::read(job)?;
    io::ensure_dir(&job.out)?;
    let n = inputs.corpus.sequences.len();
    let picked = sample(n, job.sample, job.seed);
    let epsilon = job.epsilon.unwrap_or(1.0 / n as f64);

    // Step 1: the strategies' scores (EK-FAC first: its λ is the PBRF's).
    let fit = FitOptions {
        fisher: job.fisher,
        batch_size: job.batch_size,
        seed: job.seed,
        modules: job.modules,
        max_len: Some(inputs.max_len),
        ..FitOptions::default()
    };
    let score = ScoreOptions {
        damping: job.damping,
        batch_size: job.batch_size,
        max_len: Some(inputs.max_len),
        ..ScoreOptions::default()
    };
    let mut scored = Vec::with_capacity(STRATEGIES.len());
    for strategy in STRATEGIES {
        let dir = job.out.join("runs").join(strategy.name());
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let (dense, summary) = super::fit_and_score(
            (&job.model, &job.train, &job.queries),
            &dir,
            FitOptions {
                strategy,
                ..fit.clone()
            },
            score.clone(),
            progress,
        )?;
        if dense.len() != inputs.queries.len() || dense.iter().any(|r| r.len() != n) {
            return Err(Error::Other(format!(
                "{}: the dense scores are not {} × {n}",
                dir.display(),
                inputs.queries.len()
            )));
        }
        scored.push((strategy, dense, summary.meta.damping_per_layer));
    }
    let lambda_per_layer = scored
        .first()
        .map(|(_, _, d)| d.clone())
        .ok_or_else(|| Error::Other("internal: EK-FAC was not scored".into()))?;

    // Step 2: the PBRF of every sampled sequence.
    let pbrf_started = std::time::Instant::now();
    let model_info = ModelInfo::of(&job.model, &model)?;
    let fingerprint = fingerprint(job, &inputs, &model_info, &lambda_per_layer, epsilon);
    let samples = pbrf_samples(
        job,
        (model, &inputs),
        &picked,
        &lambda_per_layer,
        (epsilon, &fingerprint),
        progress,
    )?;
    let pbrf_seconds = pbrf_started.elapsed().as_secs_f64();

    // Step 3: the correlations.
    let strategies = scored
        .into_iter()
        .map(|(strategy, dense, damping_per_layer)| {
            compare(
                strategy,
                &dense,
                damping_per_layer,
                &inputs.queries,
                &picked,
                &samples,
                job.top_k,
            )
        })
        .collect();
    let report = PbrfReport {
        tool: "infl".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kind: "validate-pbrf".into(),
        model: model_info,
        corpus: CorpusInfo {
            path: job.train.display().to_string(),
            sha256: inputs.corpus.sha256.clone(),
            max_len: inputs.max_len,
            n_documents: inputs.corpus.n_documents,
            n_sequences: n,
            n_tokens: inputs.corpus.n_tokens(),
        },
        queries: QueriesRef {
            path: job.queries.display().to_string(),
            sha256: inputs.queries_sha.clone(),
            ids: inputs.queries.iter().map(|q| q.id.clone()).collect(),
            losses: Vec::new(),
        },
        fisher: job.fisher,
        seed: job.seed,
        modules: job.modules,
        damping: job.damping,
        lambda_per_layer,
        epsilon,
        solve: job.solve,
        top_k: job.top_k,
        samples,
        strategies,
        pbrf_seconds,
        seconds: started.elapsed().as_secs_f64(),
        definition: DEFINITION.into(),
    };
    io::write_json(&job.out.join(PBRF_FILE), &report)?;
    Ok(report)
}

/// Everything a sampled sequence's PBRF depends on.
fn fingerprint(
    job: &PbrfJob,
    inputs: &Inputs,
    model: &ModelInfo,
    lambdas: &[(String, f64)],
    epsilon: f64,
) -> String {
    let mut h = Sha256::new();
    h.update(
        serde_json::json!({
            "weights": model.weights_sha256,
            "corpus": inputs.corpus.sha256,
            "max_len": inputs.max_len,
            "queries": inputs.queries_sha,
            "modules": job.modules,
            "lambdas": lambdas,
            "epsilon": epsilon,
            "solve": job.solve,
        })
        .to_string(),
    );
    data::hex(&h.finalize())
}

/// The PBRF of each sequence in `picked`, the saved ones read back from `OUT/work/`, the rest
/// computed and saved one by one.
fn pbrf_samples(
    job: &PbrfJob,
    (model, inputs): (Gpt2, &Inputs),
    picked: &[usize],
    lambdas: &[(String, f64)],
    (epsilon, fingerprint): (f64, &str),
    progress: &dyn Progress,
) -> Result<Vec<SampleResult>> {
    let work = job.out.join("work");
    if job.fresh && work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    }
    io::ensure_dir(&work)?;
    let saved = |m: usize| work.join(format!("sequence-{m:06}.json"));
    let n_queries = inputs.queries.len();
    let mut results: Vec<Option<SampleResult>> = picked
        .iter()
        .map(|&m| {
            io::read_json::<SampleResult>(&saved(m)).ok().filter(|r| {
                r.fingerprint == fingerprint
                    && r.index == m
                    && r.response.influence.len() == n_queries
            })
        })
        .collect();
    let todo = results.iter().filter(|r| r.is_none()).count();
    if todo > 0 {
        let corpus = &inputs.corpus;
        let per_layer = layer_lambdas(&model, lambdas)?;
        let pairs = inputs
            .queries
            .iter()
            .map(|q| (q.prompt_ids.clone(), q.completion_ids.clone()))
            .collect();
        let mut problem =
            Gpt2Problem::new(model, &corpus.sequences, pairs, &per_layer, job.batch_size)?;
        let base = problem.measure(&vec![0.0; problem.dim()])?;
        progress.begin(
            &format!("PBRF of {todo} of {} sequences", picked.len()),
            todo as u64,
        );
        for (slot, &m) in results.iter_mut().zip(picked) {
            if slot.is_some() {
                continue;
            }
            let t0 = std::time::Instant::now();
            let response = solve::response(&mut problem, m, epsilon, &job.solve, &base)?;
            let r = SampleResult {
                fingerprint: fingerprint.to_string(),
                index: m,
                id: corpus.sequences[m].id.clone(),
                response,
                seconds: t0.elapsed().as_secs_f64(),
            };
            io::write_json(&saved(m), &r)?;
            *slot = Some(r);
            progress.advance(1);
        }
        progress.end();
    }
    results
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Other("internal: a sampled sequence has no PBRF".into())))
        .collect()
}

/// EK-FAC's λ of each of the model's tracked layers, matched by name.
fn layer_lambdas(model: &Gpt2, lambdas: &[(String, f64)]) -> Result<Vec<f64>> {
    model
        .tracked()
        .iter()
        .map(|l| {
            lambdas
                .iter()
                .find(|(name, _)| *name == l.name)
                .map(|(_, lam)| *lam)
                .ok_or_else(|| {
                    Error::Other(format!(
                        "internal: EK-FAC recorded no damping for layer {}",
                        l.name
                    ))
                })
        })
        .collect()
}

/// One strategy's scores of the sampled sequences against their PBRF influence.
fn compare(
    strategy: Strategy,
    dense: &[Vec<f64>],
    damping_per_layer: Vec<(String, f64)>,
    queries: &[Query],
    picked: &[usize],
    samples: &[SampleResult],
    top_k: usize,
) -> StrategyReport {
    let scores: Vec<Vec<f64>> = dense
        .iter()
        .map(|row| picked.iter().map(|&m| row[m]).collect())
        .collect();
    let reference: Vec<Vec<f64>> = (0..queries.len())
        .map(|q| samples.iter().map(|s| s.response.influence[q]).collect())
        .collect();
    let per_query: Vec<super::exact::QueryAgreement> = queries
        .iter()
        .zip(&reference)
        .zip(&scores)
        .map(|((q, r), a)| super::exact::QueryAgreement {
            query_id: q.id.clone(),
            agreement: Agreement::of(r, a, top_k),
        })
        .collect();
    let agreements: Vec<Agreement> = per_query.iter().map(|q| q.agreement).collect();
    let summary = AgreementSummary::of(&agreements);
    let (all_ref, all_got): (Vec<f64>, Vec<f64>) = reference
        .iter()
        .flatten()
        .copied()
        .zip(scores.iter().flatten().copied())
        .unzip();
    StrategyReport {
        strategy,
        damping_per_layer,
        mean: summary.mean,
        min: summary.min,
        pooled_pearson: pearson(&all_ref, &all_got),
        pooled_spearman: spearman(&all_ref, &all_got),
        per_query,
        scores,
    }
}
