//! `infl validate exact`: influence under the exact damped per-layer (block-diagonal) Fisher,
//! and how well each approximate strategy (ekfac, kfac, diagonal, identity) reproduces it.
//!
//! Per tracked layer ℓ, with `vec(G_{z,ℓ})` the flattened per-sequence gradient
//! `Σ_t g_t ā_tᵀ` (length `D_ℓ = d_out·d_in_h`):
//! - `F_ℓ = (1/N) Σ_z vec(G^F_{z,ℓ}) vec(G^F_{z,ℓ})ᵀ`, the per-sequence gradients taken under
//!   the Fisher's labels: exactly those of `fit`'s eigenvalue (Λ) pass
//!   ([`curvature::pass_labels`] with [`Pass::Eigenvalue`]; sampled with the same seed, or the
//!   data's labels for `--fisher empirical`).
//! - `λ_ℓ = 0.1·trace(F_ℓ)/D_ℓ` (heuristic; EK-FAC's `0.1·mean(Λ)` is the same number, since
//!   its eigenbasis preserves the Frobenius norm), or a fixed `--damping`.
//! - `I(q, z) = Σ_ℓ vec(G_{q,ℓ})ᵀ (F_ℓ + λ_ℓ I)⁻¹ vec(G_{z,ℓ})`, G_q the query's measurement
//!   gradient and G_z the training-loss gradient (data labels): `infl score`'s convention.
//!
//! `(F + λI)⁻¹` is applied in f64, by the Woodbury identity on the N gradients,
//! `(F + λI)⁻¹ = (1/λ)[I − M (NλI + MᵀM)⁻¹ Mᵀ]` with M the `D × N` matrix of gradients (an
//! `N × N` Cholesky factorisation), or by a dense `D × D` Cholesky when `D ≤ N` (cheaper then).

use super::{Agreement, AgreementSummary};
use crate::curvature::{self, Factors, Fisher, Pass, Strategy};
use crate::data::{self, Corpus, LazyTokenizer, Query, Sequence};
use crate::error::{Error, Result};
use crate::influence::{self, Damping, LayerQueries, Preconditioner};
use crate::io;
use crate::linalg;
use crate::model::{self, Labels, ModuleSelection, TapModel, TrackedLayer};
use crate::options::FitOptions;
use crate::options::RefineOptions;
use crate::options::ScoreOptions;
use crate::pass::Progress;
use crate::provenance::{CorpusInfo, ModelInfo};
use crate::workflow::{self, FitJob, ScoreJob};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Side};
use std::path::{Path, PathBuf};

/// The strategies compared against the exact Fisher, in table order (`ekfac-refined` with
/// `score`'s default refinement, on every architecture the Gauss-Newton products cover: not
/// the mixtures of experts).
pub const STRATEGIES: [Strategy; 5] = [
    Strategy::Ekfac,
    Strategy::Kfac,
    Strategy::Diagonal,
    Strategy::Identity,
    Strategy::EkfacRefined,
];

/// How `(F + λI)⁻¹` is applied for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// `(1/λ)[I − M (NλI + MᵀM)⁻¹ Mᵀ]`: an `N × N` Cholesky factorisation.
    Woodbury,
    /// `F + λI` formed (`D × D`) and Cholesky-factorised.
    Dense,
}

impl Solver {
    /// The cheaper of the two for a layer of `d` parameters and `n` sequences (forming the
    /// Gram matrix costs `n²d` against `d²n` for F, the factorisation `n³/3` against `d³/3`).
    pub fn cheaper(d: usize, n: usize) -> Solver {
        if d <= n {
            Solver::Dense
        } else {
            Solver::Woodbury
        }
    }
}

fn mul64(lhs: MatRef<'_, f64>, rhs: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(lhs.nrows(), rhs.ncols());
    matmul(
        out.as_mut(),
        Accum::Replace,
        lhs,
        rhs,
        1.0f64,
        linalg::par(),
    );
    out
}

/// `(F + λI)⁻¹ R` for every column of `rhs` (`D × r`), where `F = (1/N) M Mᵀ` and `m` is the
/// `D × N` matrix whose columns are the N per-sequence gradients. All in f64.
pub fn damped_inverse_apply(
    m: MatRef<'_, f64>,
    lambda: f64,
    rhs: MatRef<'_, f64>,
    solver: Solver,
) -> Result<Mat<f64>> {
    let (d, n) = (m.nrows(), m.ncols());
    if !(lambda > 0.0 && lambda.is_finite()) {
        return Err(Error::input(format!(
            "the exact damped Fisher needs a positive, finite damping (got λ = {lambda}); pass --damping X with X > 0"
        )));
    }
    if rhs.nrows() != d {
        return Err(Error::Other(format!(
            "damped_inverse_apply: {} rows on the right, {d} parameters",
            rhs.nrows()
        )));
    }
    let not_pd = |what: &str| {
        Error::NonFinite(format!(
            "the {what} of the exact damped Fisher is not positive definite (λ = {lambda:e}); use a larger --damping"
        ))
    };
    match solver {
        Solver::Dense => {
            let mut k = mul64(m, m.transpose());
            let norm = 1.0 / n.max(1) as f64;
            for j in 0..d {
                for i in 0..d {
                    k[(i, j)] *= norm;
                }
                k[(j, j)] += lambda;
            }
            let llt = k.llt(Side::Lower).map_err(|_| not_pd("D × D matrix"))?;
            let mut x = rhs.to_owned();
            llt.solve_in_place(&mut x);
            Ok(x)
        }
        Solver::Woodbury => {
            let mut gram = mul64(m.transpose(), m);
            for i in 0..n {
                gram[(i, i)] += n as f64 * lambda;
            }
            let llt = gram
                .llt(Side::Lower)
                .map_err(|_| not_pd("Gram matrix NλI + MᵀM"))?;
            let mut t = mul64(m.transpose(), rhs);
            llt.solve_in_place(&mut t);
            let mt = mul64(m, t.as_ref());
            Ok(Mat::from_fn(d, rhs.ncols(), |i, j| {
                (rhs[(i, j)] - mt[(i, j)]) / lambda
            }))
        }
    }
}

/// λ of one layer: `0.1·trace(F)/D` (heuristic, F = (1/N) M Mᵀ) or the fixed value.
pub fn layer_damping(m: MatRef<'_, f64>, damping: Damping) -> f64 {
    match damping {
        Damping::Fixed(x) => x,
        Damping::Heuristic => {
            let mut sq = 0.0;
            for j in 0..m.ncols() {
                for i in 0..m.nrows() {
                    sq += m[(i, j)] * m[(i, j)];
                }
            }
            0.1 * sq / (m.ncols().max(1) * m.nrows().max(1)) as f64
        }
    }
}

/// Bytes the exact computation holds at its peak: the per-sequence Fisher gradients of every
/// layer (`N·ΣD·8`), each layer's Gram (or dense F) matrix and its Cholesky factor
/// (`2·min(N, D)²·8`), and the query gradients with their preconditioned copies.
pub fn memory_bytes(tracked: &[TrackedLayer], n: usize, n_queries: usize) -> u64 {
    tracked
        .iter()
        .map(|l| {
            let d = (l.d_out * l.d_in_h()) as u64;
            let m = d.min(n as u64);
            8 * (n as u64 * d + 2 * m * m + 3 * d * n_queries as u64)
        })
        .sum()
}

/// Per-sequence gradients of every tracked layer under the Fisher's labels (those of `fit`'s
/// eigenvalue pass), as `D_ℓ × N` f64 matrices: column z is `vec(G_z)` (column-major, as
/// [`influence::sequence_gradients`] writes it). Sequence k has stable index k.
pub fn fisher_gradients(
    model: &dyn TapModel,
    seqs: &[Sequence],
    options: &FitOptions,
    progress: &dyn Progress,
) -> Result<Vec<Mat<f64>>> {
    sequence_gradient_matrices(
        model,
        seqs,
        options.batch_size,
        curvature::pass_labels(options, Pass::Eigenvalue),
        progress,
        "exact Fisher gradients",
    )
}

fn sequence_gradient_matrices(
    model: &dyn TapModel,
    seqs: &[Sequence],
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
) -> Result<Vec<Mat<f64>>> {
    let tracked = model.tracked().to_vec();
    let mut out: Vec<Mat<f64>> = tracked
        .iter()
        .map(|l| Mat::zeros(l.d_out * l.d_in_h(), seqs.len()))
        .collect();
    crate::pass::for_each_batch(
        model,
        seqs,
        batch_size,
        labels,
        progress,
        what,
        |start, taps| {
            for (index, l) in tracked.iter().enumerate() {
                let g = influence::sequence_gradients(l, taps, index);
                let m = &mut out[index];
                for k in 0..g.ncols() {
                    for d in 0..g.nrows() {
                        m[(d, start + k)] = g[(d, k)] as f64;
                    }
                }
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// Exact influence scores and what they were computed with.
#[derive(Debug, Clone)]
pub struct ExactScores {
    /// `[n_queries][n_train]`, in query-file and corpus order.
    pub scores: Vec<Vec<f64>>,
    /// Per tracked layer: name, D, λ, trace(F)/D, solver.
    pub layers: Vec<ExactLayer>,
    /// −log p(completion | prompt) per query.
    pub query_losses: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExactLayer {
    pub name: String,
    /// Parameters of the layer's block, `d_out·d_in_h`.
    pub dim: usize,
    /// λ added to F.
    pub damping: f64,
    /// `trace(F)/D`, the mean eigenvalue of F.
    pub mean_eigenvalue: f64,
    pub solver: Solver,
}

/// Exact influence of every training sequence in `train` on every query, under the damped
/// per-layer Fisher with the labels of `options` (fisher, seed; strategy is ignored).
/// `solver` forces Woodbury or dense for every layer (`None`: the cheaper per layer).
pub fn exact_scores(
    model: &dyn TapModel,
    train: &[Sequence],
    queries: &[Query],
    options: &FitOptions,
    damping: Damping,
    solver: Option<Solver>,
    progress: &dyn Progress,
) -> Result<ExactScores> {
    let tracked = model.tracked().to_vec();
    let n = train.len();
    if n == 0 || tracked.is_empty() {
        return Err(Error::input(
            "exact influence needs at least one training sequence and one tracked layer",
        ));
    }
    // The query gradients, exactly as `infl score` computes them (full rank).
    let identity = Preconditioner::new(
        &Factors {
            strategy: Strategy::Identity,
            layers: curvature::empty_factors(&tracked, 0, 0),
        },
        Damping::Heuristic,
    )?;
    let pq = influence::precondition_queries(
        model,
        queries,
        &identity,
        options.batch_size,
        None,
        false,
        progress,
    )?;
    let fisher = fisher_gradients(model, train, options, progress)?;
    let (pre, layers) = exact_inverse(&tracked, &fisher, &pq.per_layer, damping, solver, progress)?;
    let scores = match options.fisher {
        // The Fisher's labels are the data's: the training gradients are already at hand.
        Fisher::Empirical => {
            let mut scores = vec![vec![0f64; n]; queries.len()];
            for (index, m) in fisher.iter().enumerate() {
                add_scores(&mut scores, &pre[index], m.as_ref(), 0);
            }
            scores
        }
        Fisher::Sampled => {
            drop(fisher);
            scoring_pass(
                model,
                train,
                options.batch_size,
                &pre,
                queries.len(),
                progress,
            )?
        }
    };
    Ok(ExactScores {
        scores,
        layers,
        query_losses: pq.losses,
    })
}

/// `P_ℓ = (F_ℓ + λ_ℓ I)⁻¹ G_q` (`D_ℓ × n_q`) for every layer, with what each was computed with.
fn exact_inverse(
    tracked: &[TrackedLayer],
    fisher: &[Mat<f64>],
    queries: &[LayerQueries],
    damping: Damping,
    solver: Option<Solver>,
    progress: &dyn Progress,
) -> Result<(Vec<Mat<f64>>, Vec<ExactLayer>)> {
    let mut layers = Vec::with_capacity(tracked.len());
    let mut pre: Vec<Mat<f64>> = Vec::with_capacity(tracked.len());
    progress.begin("exact inverse", 0);
    for ((l, m), lq) in tracked.iter().zip(fisher).zip(queries) {
        let LayerQueries::Full(stack) = lq else {
            return Err(Error::Other("query gradients were compressed".into()));
        };
        let g_q = linalg::to_f64(stack.as_ref());
        let lam = layer_damping(m.as_ref(), damping);
        let (d, n) = (m.nrows(), m.ncols());
        let s = solver.unwrap_or(Solver::cheaper(d, n));
        let p = damped_inverse_apply(m.as_ref(), lam, g_q.as_ref(), s)
            .map_err(|e| Error::input(format!("layer {}: {e}", l.name)))?;
        layers.push(ExactLayer {
            name: l.name.clone(),
            dim: d,
            damping: lam,
            mean_eigenvalue: layer_damping(m.as_ref(), Damping::Heuristic) * 10.0,
            solver: s,
        });
        pre.push(p);
    }
    progress.end();
    Ok((pre, layers))
}

/// The training gradients under the data's labels, one more pass over `train`, each batch's
/// scores added as it comes.
fn scoring_pass(
    model: &dyn TapModel,
    train: &[Sequence],
    batch_size: usize,
    pre: &[Mat<f64>],
    n_queries: usize,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f64>>> {
    let tracked = model.tracked().to_vec();
    let mut scores = vec![vec![0f64; train.len()]; n_queries];
    crate::pass::for_each_batch(
        model,
        train,
        batch_size,
        Labels::Data,
        progress,
        "exact scoring pass",
        |start, taps| {
            for (index, l) in tracked.iter().enumerate() {
                let g = influence::sequence_gradients(l, taps, index);
                add_scores(
                    &mut scores,
                    &pre[index],
                    linalg::to_f64(g.as_ref()).as_ref(),
                    start,
                );
            }
            Ok(())
        },
    )?;
    Ok(scores)
}

/// Adds one layer's `P_ℓᵀ G` to the scores of the sequences `start..start + g.ncols()`.
fn add_scores(scores: &mut [Vec<f64>], pre: &Mat<f64>, g: MatRef<'_, f64>, start: usize) {
    let part = mul64(pre.transpose(), g);
    for (q, row) in scores.iter_mut().enumerate() {
        for k in 0..part.ncols() {
            row[start + k] += part[(q, k)];
        }
    }
}

/// Settings of `infl validate exact`.
#[derive(Debug, Clone)]
pub struct ExactJob {
    pub model: PathBuf,
    pub train: PathBuf,
    pub queries: PathBuf,
    /// exact.json goes here; each strategy's factors and results under `OUT/runs/STRATEGY/`.
    pub out: PathBuf,
    pub fisher: Fisher,
    pub seed: u64,
    pub modules: ModuleSelection,
    /// Window length; `None` = the model's context length.
    pub max_len: Option<usize>,
    pub batch_size: usize,
    pub damping: Damping,
    pub top_k: usize,
    /// Refuse above this many bytes for the exact Fisher (`None`: MemAvailable).
    pub memory_limit: Option<u64>,
    /// How `ekfac-refined` refines its queries' inverse.
    pub refine: RefineOptions,
}

/// One strategy's agreement with the exact scores.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StrategyReport {
    pub strategy: Strategy,
    /// The λ its scoring used per layer (as recorded in its meta.json).
    pub damping_per_layer: Vec<(String, f64)>,
    pub mean: Agreement,
    pub min: Agreement,
    pub per_query: Vec<QueryAgreement>,
    /// Where its factors and results are.
    pub factors: String,
    pub results: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueryAgreement {
    pub query_id: String,
    #[serde(flatten)]
    pub agreement: Agreement,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueriesRef {
    pub path: String,
    pub sha256: String,
    pub ids: Vec<String>,
    /// −log p(completion | prompt) per query.
    pub losses: Vec<f64>,
}

/// `exact.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExactReport {
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
    pub top_k: usize,
    pub batch_size: usize,
    /// The exact computation per tracked layer: λ, trace(F)/D, the solver used.
    pub layers: Vec<ExactLayer>,
    pub strategies: Vec<StrategyReport>,
    pub exact_seconds: f64,
    pub seconds: f64,
    pub definition: String,
}

impl ExactReport {
    /// The table `infl validate exact` prints.
    pub fn table(&self) -> String {
        let rows: Vec<(String, AgreementSummary)> = self
            .strategies
            .iter()
            .map(|s| {
                (
                    s.strategy.name().to_string(),
                    AgreementSummary {
                        mean: s.mean,
                        min: s.min,
                    },
                )
            })
            .collect();
        format!(
            "Against the exact damped block-diagonal Fisher ({} labels, seed {}): {} queries × {} training sequences, {} layers\n{}",
            format!("{:?}", self.fisher).to_lowercase(),
            self.seed,
            self.queries.ids.len(),
            self.corpus.n_sequences,
            self.layers.len(),
            super::table(&rows, self.top_k)
        )
    }
}

pub const EXACT_FILE: &str = "exact.json";
const DEFINITION: &str = "I(q,z) = sum over tracked layers l of vec(G_q,l)^T (F_l + λ_l I)^-1 vec(G_z,l); F_l = (1/N) sum_z vec(G^F_z,l) vec(G^F_z,l)^T from per-sequence gradients under the Fisher's labels (those of fit's eigenvalue pass); λ_l = 0.1 trace(F_l)/D_l (heuristic) or fixed; G_q the query's measurement gradient (completion tokens), G_z the training-loss gradient; same sign and scale as infl score. Per query, each strategy's scores against the exact ones: Spearman (average ranks for ties), Pearson, and |top-k exact ∩ top-k strategy|/k over the most positive scores";

/// Reads the dense `[n_queries, n_train]` scores of a results directory written with `--dense`.
pub fn read_dense(results: &Path) -> Result<Vec<Vec<f64>>> {
    let path = results.join("scores.safetensors");
    let mut t = io::read_safetensors(&path)?;
    let (shape, v) = t
        .remove("scores")
        .ok_or_else(|| Error::Mismatch(format!("{}: no tensor `scores`", path.display())))?;
    if shape.len() != 2 {
        return Err(Error::Mismatch(format!(
            "{}: `scores` has shape {shape:?}",
            path.display()
        )));
    }
    Ok(v.chunks(shape[1].max(1)).map(<[f64]>::to_vec).collect())
}

/// Runs `infl validate exact`: the exact scores, then fit + score of every strategy in
/// [`STRATEGIES`] with the same labels and damping, compared query by query. Writes
/// `OUT/exact.json` (atomically) and returns its contents.
pub fn run(job: &ExactJob, progress: &dyn Progress) -> Result<ExactReport> {
    let started = std::time::Instant::now();
    if job.batch_size == 0 {
        return Err(Error::input("--batch-size must be at least 1"));
    }
    if job.top_k == 0 {
        return Err(Error::input("--top-k must be at least 1"));
    }
    let inputs = Inputs::read(job)?;
    inputs.check_memory(job)?;
    io::ensure_dir(&job.out)?;
    let options = FitOptions {
        strategy: Strategy::Ekfac,
        fisher: job.fisher,
        batch_size: job.batch_size,
        seed: job.seed,
        modules: job.modules,
        max_len: Some(inputs.max_len),
        ..FitOptions::default()
    };
    let exact_started = std::time::Instant::now();
    let exact = exact_scores(
        inputs.model.as_ref(),
        &inputs.corpus.sequences,
        &inputs.queries,
        &options,
        job.damping,
        None,
        progress,
    )?;
    let exact_seconds = exact_started.elapsed().as_secs_f64();

    let refinable = crate::curvature::gauss_newton::covers(inputs.model.architecture());
    let strategies = STRATEGIES
        .into_iter()
        .filter(|s| refinable || !s.is_refined())
        .map(|strategy| compare_strategy(job, &inputs, &options, strategy, &exact, progress))
        .collect::<Result<Vec<_>>>()?;
    let n = inputs.corpus.sequences.len();
    let report = ExactReport {
        tool: "infl".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kind: "validate-exact".into(),
        model: ModelInfo::of(&job.model, inputs.model.as_ref())?,
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
            sha256: inputs.queries_sha,
            ids: inputs.queries.iter().map(|q| q.id.clone()).collect(),
            losses: exact.query_losses.clone(),
        },
        fisher: job.fisher,
        seed: job.seed,
        modules: job.modules,
        damping: job.damping,
        top_k: job.top_k,
        batch_size: job.batch_size,
        layers: exact.layers.clone(),
        strategies,
        exact_seconds,
        seconds: started.elapsed().as_secs_f64(),
        definition: DEFINITION.into(),
    };
    io::write_json(&job.out.join(EXACT_FILE), &report)?;
    Ok(report)
}

/// What `infl validate exact` reads and checks before any work.
struct Inputs {
    model: Box<dyn TapModel>,
    /// The window length the corpus is cut to.
    max_len: usize,
    corpus: Corpus,
    queries: Vec<Query>,
    queries_sha: String,
}

impl Inputs {
    fn read(job: &ExactJob) -> Result<Self> {
        let model = model::load(&job.model, job.modules, model::Compute::CPU)?;
        let max_len = super::window(model.as_ref(), job.max_len)?;
        let mut tok = LazyTokenizer::new(&job.model);
        let corpus = data::read_corpus(&job.train, &mut tok, max_len, model.vocab_size())?;
        let (queries, queries_sha) = data::read_queries(
            &job.queries,
            &mut tok,
            model.max_positions(),
            model.vocab_size(),
        )?;
        Ok(Inputs {
            model,
            max_len,
            corpus,
            queries,
            queries_sha,
        })
    }

    /// Refuses when the exact Fisher would not fit in `--memory-limit` (or MemAvailable).
    fn check_memory(&self, job: &ExactJob) -> Result<()> {
        let n = self.corpus.sequences.len();
        let need = memory_bytes(self.model.tracked(), n, self.queries.len());
        let limit = job.memory_limit.or_else(crate::inspect::mem_available);
        if let Some(limit) = limit {
            if need > limit {
                let dims: u64 = self
                    .model
                    .tracked()
                    .iter()
                    .map(|l| (l.d_out * l.d_in_h()) as u64)
                    .sum();
                return Err(Error::input(format!(
                    "the exact Fisher would need about {} ({n} sequences × {dims} parameters × 8 bytes of per-sequence gradients, plus the Gram matrices), more than the {} allowed ({}); use --modules mlp, fewer layers or a smaller corpus",
                    crate::inspect::human(need),
                    crate::inspect::human(limit),
                    if job.memory_limit.is_some() { "--memory-limit" } else { "MemAvailable" }
                )));
            }
        }
        Ok(())
    }
}

/// Fits and scores one strategy under `OUT/runs/STRATEGY/` (emptied first) with the exact
/// computation's labels and damping, and compares its dense scores with the exact ones.
fn compare_strategy(
    job: &ExactJob,
    inputs: &Inputs,
    options: &FitOptions,
    strategy: Strategy,
    exact: &ExactScores,
    progress: &dyn Progress,
) -> Result<StrategyReport> {
    let (queries, n) = (&inputs.queries, inputs.corpus.sequences.len());
    let dir = job.out.join("runs").join(strategy.name());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let (factors, results) = (dir.join("factors"), dir.join("results"));
    workflow::fit(
        &FitJob::new(
            job.model.clone(),
            job.train.clone(),
            factors.clone(),
            FitOptions {
                strategy,
                ..options.clone()
            },
        ),
        progress,
    )?;
    let summary = workflow::score(
        &ScoreJob {
            options: ScoreOptions {
                damping: job.damping,
                top_k: job.top_k,
                dense: true,
                batch_size: job.batch_size,
                max_len: Some(inputs.max_len),
                refine: job.refine,
                ..ScoreOptions::default()
            },
            ..ScoreJob::new(
                job.model.clone(),
                factors.clone(),
                job.train.clone(),
                job.queries.clone(),
                results.clone(),
            )
        },
        progress,
    )?;
    let dense = read_dense(&results)?;
    if dense.len() != queries.len() || dense.iter().any(|r| r.len() != n) {
        return Err(Error::Other(format!(
            "{}: the dense scores are not {} × {n}",
            results.display(),
            queries.len()
        )));
    }
    let per_query: Vec<QueryAgreement> = queries
        .iter()
        .zip(&exact.scores)
        .zip(&dense)
        .map(|((q, e), a)| QueryAgreement {
            query_id: q.id.clone(),
            agreement: Agreement::of(e, a, job.top_k),
        })
        .collect();
    let agreements: Vec<Agreement> = per_query.iter().map(|q| q.agreement).collect();
    let s = AgreementSummary::of(&agreements);
    Ok(StrategyReport {
        strategy,
        damping_per_layer: summary.meta.damping_per_layer.clone(),
        mean: s.mean,
        min: s.min,
        per_query,
        factors: factors.display().to_string(),
        results: results.display().to_string(),
    })
}
