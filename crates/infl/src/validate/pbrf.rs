//! `infl validate pbrf`: the proximal Bregman response function (Bae et al. 2022), the ground
//! truth Grosse et al. 2023 measure influence approximations against, and how well each
//! strategy (ekfac, ekfac-refined, kfac, diagonal, identity) reproduces it.
//!
//! Two responses. **Linear** (the default, [`linear`]): the PBRF to first order in ε,
//! `∇f_qᵀ (G + λ)⁻¹ ∇L(z_m)` with G the exact Gauss-Newton over the whole corpus, one
//! conjugate-gradient solve per query, compared on every training sequence; every family the
//! Gauss-Newton products cover (not mixtures of experts). **Nonlinear** (GPT-2 only): for a
//! seeded sample of training sequences z_m, with θ^s the checkpoint's tracked weights,
//! `r(ε) = argmin_θ (1/N) Σ_z Σ_t KL(p_t(θ^s) ‖ p_t(θ)) − ε L(z_m, θ) + ½ Σ_ℓ λ_ℓ ‖θ_ℓ − θ^s_ℓ‖²`
//! over the tracked layers (the rest frozen), and the PBRF influence on query q is
//! `(f_q(r(ε)) − f_q(r(−ε))) / 2ε`. λ_ℓ is the damping EK-FAC's scoring used on layer ℓ: the
//! PBRF's first-order response is then `(G + λ)⁻¹ ∇L(z_m)`, G the Gauss-Newton of the training
//! loss, which is exactly what EK-FAC approximates, so the comparison measures the
//! approximation and nothing else. [`solve`] optimises, [`gpt2`] is the model's side.
//!
//! Each nonlinear sampled sequence's result is saved in `OUT/work/` under a fingerprint of
//! everything it depends on, so an interrupted run resumes.

pub mod gpt2;
pub mod linear;
pub mod solve;

use super::exact::QueriesRef;
use super::{pearson, spearman, Agreement, AgreementSummary};
use crate::curvature::{Fisher, Strategy};
use crate::data::{self, Corpus, LazyTokenizer, Query};
use crate::error::{Error, Result};
use crate::influence::Damping;
use crate::io;
use crate::model::{self, gpt2::Gpt2, AnyModel, ModuleSelection, TapModel};
use crate::options::{FitOptions, RefineOptions, ScoreOptions};
use crate::pass::Progress;
use crate::provenance::{CorpusInfo, ModelInfo};
use gpt2::Gpt2Problem;
use linear::{LinearOptions, LinearReference};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use solve::{Problem, Response, SolveOptions};
use std::path::PathBuf;

/// The strategies compared with the PBRF, in table order (EK-FAC first: its λ is the PBRF's).
pub const STRATEGIES: [Strategy; 5] = [
    Strategy::Ekfac,
    Strategy::EkfacRefined,
    Strategy::Kfac,
    Strategy::Diagonal,
    Strategy::Identity,
];

pub const PBRF_FILE: &str = "pbrf.json";

/// Which PBRF the strategies are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ResponseKind {
    /// First order in ε: `∇f_qᵀ (G + λ)⁻¹ ∇L(z_m)` by conjugate gradient, every sequence.
    Linear,
    /// The proximal objective optimised by L-BFGS per sampled sequence (GPT-2 only).
    Nonlinear,
}

/// Settings of `infl validate pbrf`.
#[derive(Debug, Clone)]
pub struct PbrfJob {
    pub model: PathBuf,
    pub train: PathBuf,
    pub queries: PathBuf,
    /// pbrf.json; the strategies' runs under `runs/`, the per-sequence results under `work/`.
    pub out: PathBuf,
    pub response: ResponseKind,
    /// The linear response's solve.
    pub linear: LinearOptions,
    /// The `ekfac-refined` strategy's refinement (its iterations and sample, not the truth's).
    pub refine: RefineOptions,
    /// Nonlinear: training sequences sampled (all of them when the corpus has fewer).
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
    /// `[query][sequence]`: every corpus sequence (linear) or the sample, in its order.
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
    pub response: ResponseKind,
    pub fisher: Fisher,
    pub seed: u64,
    pub modules: ModuleSelection,
    pub damping: Damping,
    /// λ_ℓ of the proximal term (EK-FAC's), per tracked layer.
    pub lambda_per_layer: Vec<(String, f64)>,
    /// The `ekfac-refined` strategy's settings.
    pub refine: RefineOptions,
    /// Linear: the solve per query and the reference scores of every sequence.
    pub linear: Option<LinearReference>,
    /// Nonlinear: ε of the central difference.
    pub epsilon: Option<f64>,
    /// Nonlinear: the L-BFGS settings.
    pub solve: Option<SolveOptions>,
    pub top_k: usize,
    /// Nonlinear: each sampled sequence's PBRF (empty for the linear response).
    pub samples: Vec<SampleResult>,
    pub strategies: Vec<StrategyReport>,
    /// Time of the reference (the solves or the optimisations) alone.
    pub pbrf_seconds: f64,
    pub seconds: f64,
    pub definition: String,
}

const LINEAR_DEFINITION: &str = "Linearised PBRF influence of training sequence z_m on query q: ∇f_qᵀ (G + λ)⁻¹ ∇L(z_m), the PBRF's first order in ε; G = (1/N) Σ_z Σ_t J_tᵀ H_t J_t the exact Gauss-Newton of the mean training loss over all N corpus sequences on the tracked layers, λ_l EK-FAC's damping; x_q = (G + λ)⁻¹ ∇f_q by preconditioned conjugate gradient (EK-FAC's damped inverse as preconditioner and start) to the relative residual `linear.options.tolerance`; L the training loss (sum over tokens), f_q = −log p(completion | prompt); same sign and scale as infl score. Per query, each strategy's scores of all N sequences against the reference: Spearman, Pearson, top-k overlap; pooled: over every (query, sequence) pair";

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
        let compared = self
            .strategies
            .first()
            .and_then(|s| s.scores.first())
            .map_or(0, Vec::len);
        let mut out = match &self.linear {
            Some(l) => linear_header(l, self.queries.ids.len()),
            None => {
                let converged = self
                    .samples
                    .iter()
                    .filter(|s| s.response.plus.converged && s.response.minus.converged)
                    .count();
                format!(
                    "Against the PBRF (ε = {:.3e}; {converged} of {} sequences converged): {} queries × {} sampled training sequences of {}\n",
                    self.epsilon.unwrap_or(f64::NAN),
                    self.samples.len(),
                    self.queries.ids.len(),
                    self.samples.len(),
                    self.corpus.n_sequences,
                )
            }
        };
        out.push_str(&super::table(&rows, self.top_k.min(compared)));
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

/// The linear reference's first line(s): its convergence, and a warning naming the queries
/// whose solve stopped above the tolerance.
fn linear_header(l: &LinearReference, n_queries: usize) -> String {
    let worst = l.per_query.iter().map(|q| q.residual).fold(0f64, f64::max);
    let iterations = |f: fn(usize, usize) -> usize| {
        l.per_query
            .iter()
            .map(|q| q.iterations)
            .reduce(f)
            .unwrap_or(0)
    };
    let mut out = format!(
        "Against the linearised PBRF ∇f_qᵀ (G + λ)⁻¹ ∇L(z_m), G over all {} sequences: {} of {} queries solved to residual ≤ {:.0e} (worst {:.1e}; {}–{} CG iterations): {} queries × {} training sequences\n",
        l.sequences,
        l.converged(),
        l.per_query.len(),
        l.options.tolerance,
        worst,
        iterations(usize::min),
        iterations(usize::max),
        n_queries,
        l.sequences
    );
    let unconverged: Vec<&str> = l
        .per_query
        .iter()
        .filter(|q| !q.converged)
        .map(|q| q.query_id.as_str())
        .collect();
    if !unconverged.is_empty() {
        out.push_str(&format!(
            "NOT CONVERGED: {} (residual above {:.0e} after at most {} iterations): the reference is not the PBRF there, so these rows bound nothing; raise --cg-iterations\n",
            unconverged.join(", "),
            l.options.tolerance,
            l.options.max_iterations
        ));
    }
    out
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

fn tap(model: &AnyModel) -> &dyn TapModel {
    match model {
        AnyModel::Gpt2(m) => m,
        AnyModel::GptNeoX(m) => m,
        AnyModel::Llama(m) => m,
    }
}

impl Inputs {
    /// The model apart: the nonlinear PBRF takes it over. Refuses the models the job's
    /// response does not cover.
    fn read(job: &PbrfJob) -> Result<(AnyModel, Self)> {
        let model = model::load_autograd(&job.model, job.modules, &candle_core::Device::Cpu)?;
        match (&model, job.response) {
            (AnyModel::Gpt2(_), _) => {}
            (_, ResponseKind::Nonlinear) => {
                return Err(Error::input(format!(
                    "{}: --response nonlinear supports GPT-2 checkpoints only (the tiny models \
                     `infl train` makes); the linear response covers this model",
                    job.model.display()
                )))
            }
            (AnyModel::Llama(m), ResponseKind::Linear) if m.config().moe.is_some() => {
                return Err(Error::input(format!(
                    "{}: the exact Gauss-Newton products behind the linear PBRF do not cover \
                     mixture-of-experts blocks (model_type `{}`)",
                    job.model.display(),
                    m.config().model_type
                )))
            }
            _ => {}
        }
        let m = tap(&model);
        let max_len = super::window(m, job.max_len)?;
        let mut tok = LazyTokenizer::new(&job.model);
        let corpus = data::read_corpus(&job.train, &mut tok, max_len, m.vocab_size())?;
        if corpus.sequences.len() < 3 {
            return Err(Error::input(format!(
                "{}: {} training sequences; the correlations need at least 3",
                job.train.display(),
                corpus.sequences.len()
            )));
        }
        let (queries, queries_sha) =
            data::read_queries(&job.queries, &mut tok, m.max_positions(), m.vocab_size())?;
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
    job.refine.check()?;
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
    if job.linear.max_iterations == 0 {
        return Err(Error::usage("--cg-iterations must be at least 1"));
    }
    if !(job.linear.tolerance > 0.0 && job.linear.tolerance < 1.0) {
        return Err(Error::usage(format!(
            "--cg-tolerance must lie in (0, 1) (got {})",
            job.linear.tolerance
        )));
    }
    Ok(())
}

/// One strategy's dense scores `[query][sequence]` and damping per layer.
type Scored = (Strategy, Vec<Vec<f64>>, Vec<(String, f64)>);

/// Step 1: every strategy fitted and scored densely under `OUT/runs/STRATEGY/`.
fn score_strategies(
    job: &PbrfJob,
    inputs: &Inputs,
    progress: &dyn Progress,
) -> Result<Vec<Scored>> {
    let n = inputs.corpus.sequences.len();
    let fit = FitOptions {
        fisher: job.fisher,
        batch_size: job.batch_size,
        seed: job.seed,
        modules: job.modules,
        max_len: Some(inputs.max_len),
        ..FitOptions::default()
    };
    let score = score_options(job, inputs);
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
    Ok(scored)
}

fn score_options(job: &PbrfJob, inputs: &Inputs) -> ScoreOptions {
    ScoreOptions {
        damping: job.damping,
        batch_size: job.batch_size,
        max_len: Some(inputs.max_len),
        refine: job.refine,
        ..ScoreOptions::default()
    }
}

/// The reference each strategy is compared with.
struct Reference {
    /// `[query][compared sequence]`.
    scores: Vec<Vec<f64>>,
    /// The corpus indices compared, in order.
    compared: Vec<usize>,
    linear: Option<LinearReference>,
    samples: Vec<SampleResult>,
    epsilon: Option<f64>,
}

/// Step 2, linear: `(G + λ)⁻¹ ∇f_q` on `ekfac-refined`'s factors (EK-FAC's, so its λ),
/// scored on every sequence.
fn linear_reference(job: &PbrfJob, inputs: &Inputs, progress: &dyn Progress) -> Result<Reference> {
    let n = inputs.corpus.sequences.len();
    let run = job.out.join("runs").join(Strategy::EkfacRefined.name());
    let ids: Vec<String> = inputs.queries.iter().map(|q| q.id.clone()).collect();
    let l = linear::solve(
        (&job.model, &job.train, &job.queries),
        &ids,
        (&run.join("factors"), &job.out.join("reference")),
        n,
        (job.linear, score_options(job, inputs)),
        progress,
    )?;
    Ok(Reference {
        scores: l.scores.clone(),
        compared: (0..n).collect(),
        linear: Some(l),
        samples: Vec::new(),
        epsilon: None,
    })
}

/// Step 2, nonlinear: the PBRF of each sampled sequence by L-BFGS.
fn nonlinear_reference(
    job: &PbrfJob,
    (model, inputs): (AnyModel, &Inputs),
    model_info: &ModelInfo,
    lambda_per_layer: &[(String, f64)],
    progress: &dyn Progress,
) -> Result<Reference> {
    let AnyModel::Gpt2(model) = model else {
        return Err(Error::Other(
            "internal: the nonlinear PBRF got no GPT-2".into(),
        ));
    };
    let n = inputs.corpus.sequences.len();
    let picked = sample(n, job.sample, job.seed);
    let epsilon = job.epsilon.unwrap_or(1.0 / n as f64);
    let fingerprint = fingerprint(job, inputs, model_info, lambda_per_layer, epsilon);
    let samples = pbrf_samples(
        job,
        (model, inputs),
        &picked,
        lambda_per_layer,
        (epsilon, &fingerprint),
        progress,
    )?;
    let scores = (0..inputs.queries.len())
        .map(|q| samples.iter().map(|s| s.response.influence[q]).collect())
        .collect();
    Ok(Reference {
        scores,
        compared: picked,
        linear: None,
        samples,
        epsilon: Some(epsilon),
    })
}

/// Runs `infl validate pbrf`: every strategy fitted and scored, the reference (the linear
/// solves, or the PBRF of each sampled sequence, resumed from `OUT/work/`), and the
/// correlations. Writes `OUT/pbrf.json`.
pub fn run(job: &PbrfJob, progress: &dyn Progress) -> Result<PbrfReport> {
    let started = std::time::Instant::now();
    check(job)?;
    let (model, inputs) = Inputs::read(job)?;
    io::ensure_dir(&job.out)?;
    let n = inputs.corpus.sequences.len();
    let model_info = ModelInfo::of(&job.model, tap(&model))?;

    let scored = score_strategies(job, &inputs, progress)?;
    let lambda_per_layer = scored
        .first()
        .map(|(_, _, d)| d.clone())
        .ok_or_else(|| Error::Other("internal: EK-FAC was not scored".into()))?;

    let pbrf_started = std::time::Instant::now();
    let reference = match job.response {
        ResponseKind::Linear => {
            drop(model);
            linear_reference(job, &inputs, progress)?
        }
        ResponseKind::Nonlinear => nonlinear_reference(
            job,
            (model, &inputs),
            &model_info,
            &lambda_per_layer,
            progress,
        )?,
    };
    if let Some(l) = &reference.linear {
        if l.damping_per_layer != lambda_per_layer {
            return Err(Error::Other(
                "internal: the linear reference's λ is not EK-FAC's".into(),
            ));
        }
    }
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
                &reference,
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
        response: job.response,
        fisher: job.fisher,
        seed: job.seed,
        modules: job.modules,
        damping: job.damping,
        lambda_per_layer,
        refine: job.refine,
        epsilon: reference.epsilon,
        solve: (job.response == ResponseKind::Nonlinear).then_some(job.solve),
        top_k: job.top_k,
        linear: reference.linear,
        samples: reference.samples,
        strategies,
        pbrf_seconds,
        seconds: started.elapsed().as_secs_f64(),
        definition: match job.response {
            ResponseKind::Linear => LINEAR_DEFINITION,
            ResponseKind::Nonlinear => DEFINITION,
        }
        .into(),
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

/// One strategy's scores of the compared sequences against the reference's.
fn compare(
    strategy: Strategy,
    dense: &[Vec<f64>],
    damping_per_layer: Vec<(String, f64)>,
    queries: &[Query],
    reference: &Reference,
    top_k: usize,
) -> StrategyReport {
    let scores: Vec<Vec<f64>> = dense
        .iter()
        .map(|row| reference.compared.iter().map(|&m| row[m]).collect())
        .collect();
    let reference: &[Vec<f64>] = &reference.scores;
    let per_query: Vec<super::exact::QueryAgreement> = queries
        .iter()
        .zip(reference)
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
