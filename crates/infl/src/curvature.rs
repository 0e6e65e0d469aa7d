//! Curvature stage: KFAC covariances A and S, their eigenbases, and the EK-FAC eigenvalue
//! correction Λ, accumulated from the (a, g) taps of the model stage.
//!
//! Conventions (DESIGN.md; identical to kronfluence 1.0.1):
//! - `A = (1/N_tok) Σ_t ā_t ā_tᵀ`, `S = (1/N_tok) Σ_t g_t g_tᵀ`, N_tok counting every real token,
//!   the last of each sequence too (its g is zero); ā = [a, 1] for layers with a bias.
//! - Eigendecompositions in f64; eigenvectors then rounded to f32 and used as stored.
//! - EK-FAC `Λ = (1/N_seq) Σ_n (Q_Sᵀ G_n Q_A)^∘2`, G_n = Σ_t g_t ā_tᵀ the summed gradient of
//!   sequence n. Diagonal: `(1/N_seq) Σ_n G_n^∘2` in the original basis. KFAC: `Λ = λ_S λ_Aᵀ`.

pub mod device;
pub mod format;

use crate::data::Sequence;
use crate::error::{Error, Result};
use crate::io::OwnedTensor;
use crate::linalg;
use crate::model::{Labels, TapBatch, TapModel, TokenBatch, TrackedLayer};
use faer::Mat;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// How the Fisher (GGN) of each tracked layer is approximated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Eigenvalue-corrected KFAC: KFAC eigenbases, per-sequence eigenvalues Λ (the paper's method).
    Ekfac,
    /// KFAC: F ≈ S ⊗ A on the per-token scale.
    Kfac,
    /// Diagonal Fisher from per-sequence squared gradients.
    Diagonal,
    /// No curvature: plain gradient dot products, no damping.
    Identity,
}

impl Strategy {
    /// The strategy's name on the command line and in output files.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Ekfac => "ekfac",
            Strategy::Kfac => "kfac",
            Strategy::Diagonal => "diagonal",
            Strategy::Identity => "identity",
        }
    }

    fn needs_covariance(self) -> bool {
        matches!(self, Strategy::Ekfac | Strategy::Kfac)
    }
    fn needs_lambda(self) -> bool {
        matches!(self, Strategy::Ekfac | Strategy::Diagonal)
    }
}

/// Where the labels of the Fisher come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Fisher {
    /// Labels sampled from the model's predictive distribution: the true Fisher (= GGN).
    Sampled,
    /// The data's own labels (deterministic; what kronfluence calls use_empirical_fisher).
    Empirical,
}

/// Reports progress of passes over data, in tokens.
pub trait Progress: Sync {
    fn begin(&self, what: &str, total_tokens: u64);
    fn advance(&self, tokens: u64);
    /// Called by a pass between its steps, when none of its work is in flight: where a
    /// benchmark can measure the machine without disturbing the pass or being disturbed by it.
    fn idle(&self) {}
    fn end(&self);
}

/// Progress that reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// Runs the model over `seqs` in batches and hands each batch's taps to `visit`, checking that
/// losses and gradients are finite (naming the sequence when they are not), as one progress bar.
pub fn for_each_batch(
    model: &dyn TapModel,
    seqs: &[Sequence],
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
    progress.begin(what, total as u64);
    run_batches(model, seqs, 0, batch_size, labels, progress, what, visit)?;
    progress.end();
    Ok(())
}

/// The loop of [`for_each_batch`] without beginning or ending a progress bar, for passes that
/// stream the corpus chunk by chunk. Sequence `k` of `seqs` has the stable index `first + k`
/// (seeding sampled labels); `visit` receives the batch's offset within `seqs`.
#[allow(clippy::too_many_arguments)]
pub fn run_batches(
    model: &dyn TapModel,
    seqs: &[Sequence],
    first: usize,
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    let indices: Vec<u64> = (0..seqs.len()).map(|k| (first + k) as u64).collect();
    run_indexed(
        model, seqs, &indices, batch_size, labels, progress, what, visit,
    )
}

/// How many batches the passes compute at once with `model`. An engine that is not threaded
/// (autograd) runs [`crate::shard::threads`] batches, one thread each. A threaded engine (fast)
/// runs two batches, the threads split between them ([`pool_threads`]): its products are only
/// tokens × layer width, which a core alone runs nearer its GEMM rate than two cores splitting
/// them (the covariance pass 7–11% faster on 2 cores, measured), and two batches' activations
/// are what two at once cost in memory, whatever the core count.
pub fn batches_at_once(model: &dyn TapModel) -> usize {
    let threads = crate::shard::threads().max(1);
    if model.is_threaded() {
        threads.min(2)
    } else {
        threads
    }
}

/// The threads of the pool of concurrent batch `k` of `at_once` sharing `threads`: every
/// thread goes to one of them (3 threads: 2 and 1).
fn pool_threads(k: usize, at_once: usize, threads: usize) -> usize {
    threads / at_once + usize::from(k < threads % at_once)
}

/// [`run_batches`] with each sequence's stable index given (a shard's sequences are not
/// contiguous). Batches are cut from `seqs` in order and `visit` sees them in order;
/// [`batches_at_once`] says how many are computed at once. Results do not depend on the thread
/// count: an engine's taps do not depend on its threads, and they are visited in order.
///
/// The engine runs one group of batches ahead of `visit`, as a task of the caller's rayon
/// pool: while the statistics of one batch are formed, the taps of the next are computed, so
/// the serial stretches of either (norms, the loss, accumulating into f64) overlap the other's
/// threaded products instead of leaving cores idle. At most two groups' taps are alive at once.
#[allow(clippy::too_many_arguments)]
pub fn run_indexed(
    model: &dyn TapModel,
    seqs: &[Sequence],
    indices: &[u64],
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    mut visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    // The whole pass, its products and whatever consumes its taps, in one subnormal mode.
    crate::linalg::flush_subnormals();
    let size = batch_size.max(1);
    let batches: Vec<TokenBatch> = seqs
        .chunks(size)
        .zip(indices.chunks(size))
        .map(|(chunk, idx)| {
            let refs: Vec<(u64, &[u32])> = chunk
                .iter()
                .zip(idx)
                .map(|(s, &i)| (i, s.ids.as_slice()))
                .collect();
            TokenBatch::training(&refs)
        })
        .collect();
    let threads = batches_at_once(model);
    // A pool per concurrent batch for a threaded engine, whose kernels split over the pool
    // they run in; an unthreaded engine runs on plain threads.
    let pools = if model.is_threaded() && threads > 1 {
        (0..threads)
            .map(|k| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(pool_threads(k, threads, crate::shard::threads().max(1)))
                    .start_handler(|_| crate::linalg::flush_subnormals_on_this_thread())
                    .build()
                    .map_err(|e| Error::Other(format!("{what}: cannot start threads: {e}")))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let groups: Vec<&[TokenBatch]> = batches.chunks(threads).collect();
    let mut ready = groups
        .first()
        .map(|g| group_taps(model, g, labels, &pools, what));
    for (group_no, group) in groups.iter().enumerate() {
        let results = ready.take().unwrap_or_default();
        let mut visited: Result<()> = Ok(());
        // The next group's taps as a task of the caller's rayon pool, this group's visit on
        // the calling thread; both done before the next step.
        rayon::in_place_scope(|scope| {
            if let Some(next) = groups.get(group_no + 1) {
                let ready = &mut ready;
                let pools = &pools;
                scope.spawn(move |_| *ready = Some(group_taps(model, next, labels, pools, what)));
            }
            visited = (|| {
                for (k, (batch, taps)) in group.iter().zip(results).enumerate() {
                    let start = (group_no * threads + k) * size;
                    let chunk = &seqs[start..start + batch.len()];
                    let taps = taps?;
                    if let Err(e) = check_finite(&taps, |j| chunk[j].id.clone(), what) {
                        // Padding shares attention with real tokens, so one broken sequence
                        // can poison its whole batch: rerun each alone to name the one at fault.
                        for (j, s) in chunk.iter().enumerate() {
                            let one = [(batch.stable_index[j], s.ids.as_slice())];
                            let alone = model.taps(&TokenBatch::training(&one), labels)?;
                            check_finite(&alone, |_| s.id.clone(), what)?;
                        }
                        return Err(e);
                    }
                    visit(start, &taps)?;
                    progress.advance(batch.n_tokens() as u64);
                }
                Ok(())
            })();
        });
        visited?;
        progress.idle();
    }
    Ok(())
}

/// The taps of one group of batches, each batch on its own thread (in its own pool, given
/// `pools`) when there are several; a batch alone gets every thread.
fn group_taps(
    model: &dyn TapModel,
    group: &[TokenBatch],
    labels: Labels,
    pools: &[rayon::ThreadPool],
    what: &str,
) -> Vec<Result<TapBatch>> {
    if group.len() == 1 {
        return vec![model.taps(&group[0], labels)];
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(k, b)| {
                scope.spawn(move || match pools.get(k) {
                    Some(pool) => pool.install(|| model.taps(b, labels)),
                    None => {
                        crate::linalg::flush_subnormals_on_this_thread();
                        model.taps(b, labels)
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Other(format!("{what}: a worker thread panicked")))
                })
            })
            .collect()
    })
}

pub fn check_finite(taps: &TapBatch, name: impl Fn(usize) -> String, what: &str) -> Result<()> {
    // The common case, everything finite, in one threaded branch-free sweep; the sequence at
    // fault is looked for only when something is not.
    let all_finite = taps.losses.iter().all(|l| l.is_finite())
        && taps
            .layers
            .par_iter()
            .all(|l| l.g.par_chunks(1 << 14).all(all_finite_f32));
    if all_finite {
        return Ok(());
    }
    let offsets = taps.offsets();
    for (k, loss) in taps.losses.iter().enumerate() {
        let bad_grad = taps.layers.iter().any(|l| {
            let d = l.g.len() / offsets[offsets.len() - 1].max(1);
            l.g[offsets[k] * d..offsets[k + 1] * d]
                .iter()
                .any(|x| !x.is_finite())
        });
        if !loss.is_finite() || bad_grad {
            return Err(Error::NonFinite(format!(
                "{what}: sequence {} has a non-finite {} (loss = {loss})",
                name(k),
                if loss.is_finite() { "gradient" } else { "loss" }
            )));
        }
    }
    Ok(())
}

/// No NaN or infinity in `x` (whose magnitude bits are at least those of infinity), by a max
/// over the magnitude bits with no early exit, so that the loop vectorises.
fn all_finite_f32(x: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7F80_0000;
    let worst = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF));
    worst < EXPONENT
}

pub use crate::options::FitOptions;

/// The fitted curvature of one tracked layer. Matrices are f32 as stored; eigenvalues f64.
#[derive(Debug, Clone)]
pub struct LayerFactors {
    pub layer: TrackedLayer,
    pub n_tokens: u64,
    pub n_sequences: u64,
    /// A (`d_in_h × d_in_h`) and S (`d_out × d_out`), normalised per token (KFAC, EK-FAC).
    pub covariance: Option<(Mat<f32>, Mat<f32>)>,
    /// (λ_A, Q_A, λ_S, Q_S), eigenvalues ascending (KFAC, EK-FAC).
    pub eigen: Option<Eigenbasis>,
    /// Λ, `d_out × d_in_h`, normalised per sequence (EK-FAC: in the eigenbasis; diagonal: in
    /// the original basis).
    pub lambda: Option<Mat<f32>>,
}

#[derive(Debug, Clone)]
pub struct Eigenbasis {
    pub eigvals_a: Vec<f64>,
    pub q_a: Mat<f32>,
    pub eigvals_s: Vec<f64>,
    pub q_s: Mat<f32>,
}

/// Fitted factors of every tracked layer.
#[derive(Debug, Clone)]
pub struct Factors {
    pub strategy: Strategy,
    pub layers: Vec<LayerFactors>,
}

/// The two passes over the data of a fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// Sums of ā āᵀ and g gᵀ over tokens (KFAC, EK-FAC).
    Covariance,
    /// Sums of squared per-sequence gradients, in the eigenbasis (EK-FAC) or not (diagonal).
    Eigenvalue,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Covariance => "covariance",
            Pass::Eigenvalue => "eigenvalue",
        }
    }

    /// Sampled labels are drawn afresh for each pass, as kronfluence does.
    fn label_pass(self) -> u64 {
        match self {
            Pass::Covariance => 0,
            Pass::Eigenvalue => 1,
        }
    }
}

impl Strategy {
    /// The passes a fit of this strategy runs, in order.
    pub fn passes(self) -> Vec<Pass> {
        let mut p = Vec::new();
        if self.needs_covariance() {
            p.push(Pass::Covariance);
        }
        if self.needs_lambda() {
            p.push(Pass::Eigenvalue);
        }
        p
    }
}

/// The running sums of one pass: never means, so that shards and resumed runs add exactly.
#[derive(Debug, Clone)]
pub struct PassSums {
    pub pass: Pass,
    /// Covariance: `[Σāāᵀ, Σggᵀ]` per tracked layer, in order (lower triangles: the upper ones
    /// are filled in by [`eigendecompose`]); eigenvalue: one `Σ (Q_Sᵀ G Q_A)^∘2`
    /// (or `Σ G^∘2`) per tracked layer.
    pub sums: Vec<Mat<f64>>,
    pub n_tokens: u64,
    pub n_sequences: u64,
}

impl PassSums {
    pub fn zeros(pass: Pass, tracked: &[TrackedLayer]) -> Self {
        let sums = match pass {
            Pass::Covariance => tracked
                .iter()
                .flat_map(|l| {
                    [
                        Mat::zeros(l.d_in_h(), l.d_in_h()),
                        Mat::zeros(l.d_out, l.d_out),
                    ]
                })
                .collect(),
            Pass::Eigenvalue => tracked
                .iter()
                .map(|l| Mat::zeros(l.d_out, l.d_in_h()))
                .collect(),
        };
        PassSums {
            pass,
            sums,
            n_tokens: 0,
            n_sequences: 0,
        }
    }

    /// Adds another shard's sums.
    pub fn add(&mut self, other: &PassSums) {
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        self.n_tokens += other.n_tokens;
        self.n_sequences += other.n_sequences;
    }

    fn names(pass: Pass, tracked: &[TrackedLayer]) -> Vec<String> {
        match pass {
            Pass::Covariance => tracked
                .iter()
                .flat_map(|l| [format!("{}.A_sum", l.name), format!("{}.S_sum", l.name)])
                .collect(),
            Pass::Eigenvalue => tracked
                .iter()
                .map(|l| format!("{}.lambda_sum", l.name))
                .collect(),
        }
    }

    /// f64 tensors `{layer}.A_sum`, `{layer}.S_sum` or `{layer}.lambda_sum`, and `counts`
    /// (`[tokens, sequences]`).
    pub fn to_tensors(&self, tracked: &[TrackedLayer]) -> Vec<(String, OwnedTensor)> {
        let mut out: Vec<(String, OwnedTensor)> = Self::names(self.pass, tracked)
            .into_iter()
            .zip(&self.sums)
            .map(|(n, m)| {
                (
                    n,
                    OwnedTensor::F64(vec![m.nrows(), m.ncols()], linalg::to_row_major(m.as_ref())),
                )
            })
            .collect();
        out.push((
            "counts".into(),
            OwnedTensor::F64(vec![2], vec![self.n_tokens as f64, self.n_sequences as f64]),
        ));
        out
    }

    /// Reads back [`PassSums::to_tensors`]; `what` names the source in messages.
    pub fn from_tensors(
        mut t: crate::io::TensorMap,
        pass: Pass,
        tracked: &[TrackedLayer],
        what: &str,
    ) -> Result<Self> {
        let mut zero = Self::zeros(pass, tracked);
        for (name, m) in Self::names(pass, tracked).iter().zip(zero.sums.iter_mut()) {
            let (shape, v) = t
                .remove(name)
                .ok_or_else(|| Error::Mismatch(format!("{what}: tensor `{name}` is missing")))?;
            if shape != [m.nrows(), m.ncols()] {
                return Err(Error::Mismatch(format!(
                    "{what}: tensor `{name}` has shape {shape:?}, expected [{}, {}]",
                    m.nrows(),
                    m.ncols()
                )));
            }
            let c = m.ncols();
            *m = Mat::from_fn(m.nrows(), c, |i, j| v[i * c + j]);
        }
        let (_, counts) = t
            .remove("counts")
            .ok_or_else(|| Error::Mismatch(format!("{what}: tensor `counts` is missing")))?;
        zero.n_tokens = counts.first().copied().unwrap_or(0.0) as u64;
        zero.n_sequences = counts.get(1).copied().unwrap_or(0.0) as u64;
        Ok(zero)
    }
}

/// FLOPs of the products that form `pass`'s statistics over `n_tokens` tokens, counted from the
/// shapes as [`accumulate`] runs them (for `infl bench`'s floors): the covariance pass's Grams
/// as symmetric rank-k updates (half a general product, `N d²`), the eigenvalue pass's
/// rotation of the tokens (`2N (d_out² + d_in²)`) and its per-sequence products
/// (`2N d_out d_in`); element-wise work (squares, sums in f64) is not counted.
pub fn statistics_flops(pass: Pass, tracked: &[TrackedLayer], n_tokens: usize) -> f64 {
    let n = n_tokens as f64;
    tracked
        .iter()
        .map(|l| {
            let (o, i) = (l.d_out as f64, l.d_in_h() as f64);
            match pass {
                Pass::Covariance => n * (o * o + i * i),
                Pass::Eigenvalue => 2.0 * n * (o * o + i * i) + 2.0 * n * o * i,
            }
        })
        .sum()
}

/// Adds one batch's taps to the running sums of `state.pass`. For the eigenvalue pass,
/// `bases[ℓ]` is layer ℓ's eigenbasis (EK-FAC) or `None` (diagonal: the original basis).
pub fn accumulate(
    state: &mut PassSums,
    tracked: &[TrackedLayer],
    bases: &[Option<&Eigenbasis>],
    taps: &TapBatch,
) {
    accumulate_keeping(state, tracked, bases, taps, false);
}

/// The tokens of a batch rotated into each layer's eigenbasis, `(g Q_S, ā Q_A)` (`None` for a
/// layer in the original basis), as the eigenvalue pass forms them.
pub type RotatedTokens = Vec<Option<(linalg::RowMajor, linalg::RowMajor)>>;

/// [`accumulate`], and with `keep` the eigenvalue pass's rotated tokens: a gradient store
/// written from the same pass takes them instead of rotating the tokens again (the rotation is
/// most of the pass's statistics).
pub fn accumulate_keeping(
    state: &mut PassSums,
    tracked: &[TrackedLayer],
    bases: &[Option<&Eigenbasis>],
    taps: &TapBatch,
    keep: bool,
) -> Option<RotatedTokens> {
    let offsets = taps.offsets();
    let n = offsets[offsets.len() - 1];
    state.n_tokens += n as u64;
    state.n_sequences += taps.seq_lens.len() as u64;
    // One task per statistic (two per layer in the covariance pass, one in the eigenvalue
    // pass), each product on one thread; with fewer statistics than that keeps busy, the
    // products split over the cores instead. Each sum is formed the same way either way.
    let tasks = state.sums.len();
    let inner = tasks < 4 * rayon::current_num_threads();
    match state.pass {
        Pass::Covariance => {
            let grams: Vec<(usize, &mut Mat<f64>)> = state.sums.iter_mut().enumerate().collect();
            crate::tasks::largest_first(
                grams,
                |(k, _)| {
                    let l = &tracked[k / 2];
                    let d = if k % 2 == 0 { l.d_in_h() } else { l.d_out };
                    (d * d) as f64
                },
                |(k, sum)| {
                    let (l, tap) = (&tracked[k / 2], &taps.layers[k / 2]);
                    if k % 2 == 0 {
                        let shape = (n, l.d_in);
                        linalg::add_gram_homogeneous(sum, &tap.a, shape, l.has_bias, inner);
                    } else {
                        linalg::add_gram(sum, linalg::rows(&tap.g, n, l.d_out), inner);
                    }
                },
            );
            None
        }
        Pass::Eigenvalue => {
            let layers: Vec<(usize, &mut Mat<f64>)> = state.sums.iter_mut().enumerate().collect();
            let rotated: RotatedTokens = crate::tasks::largest_first(
                layers,
                |(k, _)| {
                    let (o, i) = (tracked[*k].d_out as f64, tracked[*k].d_in_h() as f64);
                    o * o + i * i + o * i
                },
                |(k, sum)| {
                    let (l, tap, basis) = (&tracked[k], &taps.layers[k], bases[k]);
                    let a = linalg::homogeneous(&tap.a, n, l.d_in, l.has_bias);
                    let g = linalg::rows(&tap.g, n, l.d_out);
                    let rotated = linalg::rotate_tokens(
                        g,
                        a.as_ref(),
                        basis.map(|b| (b.q_s.as_ref(), b.q_a.as_ref())),
                        inner,
                    );
                    let (g_rot, a_rot) = match &rotated {
                        Some((g_rot, a_rot)) => (g_rot.as_ref(), a_rot.as_ref()),
                        None => (g, a.as_ref()),
                    };
                    linalg::add_squared_sequence_products(sum, g_rot, a_rot, &offsets, inner);
                    rotated.filter(|_| keep)
                },
            );
            keep.then_some(rotated)
        }
    }
}

/// When a long pass saves its state.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After at least this many sequences since the last save.
    pub every_sequences: Option<usize>,
    /// Or after this much time since the last save.
    pub every_seconds: f64,
}

impl CheckpointPolicy {
    pub const NEVER: CheckpointPolicy = CheckpointPolicy {
        every_sequences: None,
        every_seconds: f64::INFINITY,
    };
}

/// Decides when a pass saves its state, from the sequences done and the time elapsed.
pub struct Checkpointer {
    policy: CheckpointPolicy,
    last_done: usize,
    last_time: std::time::Instant,
}

impl Checkpointer {
    /// Starts counting at `done` sequences.
    pub fn new(policy: CheckpointPolicy, done: usize) -> Self {
        Checkpointer {
            policy,
            last_done: done,
            last_time: std::time::Instant::now(),
        }
    }

    /// Is a save due now that `done` sequences are done? (Resets the clock when it is.)
    pub fn due(&mut self, done: usize) -> bool {
        let due = self
            .policy
            .every_sequences
            .is_some_and(|m| done - self.last_done >= m)
            || self.last_time.elapsed().as_secs_f64() >= self.policy.every_seconds;
        if due {
            self.last_done = done;
            self.last_time = std::time::Instant::now();
        }
        due
    }
}

/// The labels of `pass` under `options` (sampled labels are drawn afresh per pass).
pub fn pass_labels(options: &FitOptions, pass: Pass) -> Labels {
    match options.fisher {
        Fisher::Empirical => Labels::Data,
        Fisher::Sampled => Labels::Sampled {
            seed: options.seed,
            pass: pass.label_pass(),
        },
    }
}

/// Adds `seqs` (stable indices `indices`) to the sums of `state.pass`, batch by batch;
/// `after_batch(state, k, taps, rotated)` runs once the first k sequences of `seqs` are in, with
/// the taps of the batch that ended there (the last `taps.seq_lens.len()` of those k) and, with
/// `keep_rotated` in the eigenvalue pass, its tokens rotated into the eigenbasis.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_sequences(
    model: &dyn TapModel,
    options: &FitOptions,
    seqs: &[Sequence],
    indices: &[u64],
    bases: &[Option<&Eigenbasis>],
    state: &mut PassSums,
    keep_rotated: bool,
    progress: &dyn Progress,
    mut after_batch: impl FnMut(&PassSums, usize, &TapBatch, Option<&RotatedTokens>) -> Result<()>,
) -> Result<()> {
    let tracked = model.tracked().to_vec();
    let what = format!("{} pass", state.pass.name());
    // A model on a GPU has its statistics formed there too; a store takes the rotated tokens
    // of the CPU path.
    let on_device = match crate::model::statistics_device(model)? {
        Some(d) if !keep_rotated => Some(device::DeviceStatistics::new(d, bases)?),
        _ => None,
    };
    run_indexed(
        model,
        seqs,
        indices,
        options.batch_size,
        pass_labels(options, state.pass),
        progress,
        &what,
        |start, taps| {
            let rotated = match &on_device {
                Some(stats) => {
                    stats.accumulate(state, &tracked, taps)?;
                    None
                }
                None => accumulate_keeping(state, &tracked, bases, taps, keep_rotated),
            };
            after_batch(state, start + taps.seq_lens.len(), taps, rotated.as_ref())
        },
    )
}

/// Runs `state.pass` over `seqs[position..]` (stable indices `indices`), adding to `state`.
/// `save(state, position)` is called at batch boundaries as `policy` asks; resuming from a
/// saved (state, position) gives bit-identical sums, because batches are cut from `position`
/// (a batch boundary) and added in the same order.
#[allow(clippy::too_many_arguments)]
pub fn run_pass(
    model: &dyn TapModel,
    options: &FitOptions,
    seqs: &[Sequence],
    indices: &[u64],
    bases: &[Option<&Eigenbasis>],
    state: &mut PassSums,
    position: usize,
    policy: CheckpointPolicy,
    progress: &dyn Progress,
    mut save: impl FnMut(&PassSums, usize) -> Result<()>,
) -> Result<()> {
    let rest = &seqs[position..];
    progress.begin(
        &format!("{} pass", state.pass.name()),
        rest.iter().map(|s| s.ids.len() as u64).sum(),
    );
    let mut checkpointer = Checkpointer::new(policy, position);
    accumulate_sequences(
        model,
        options,
        rest,
        &indices[position..],
        bases,
        state,
        false,
        progress,
        |state, k, _, _| {
            let done = position + k;
            if done < seqs.len() && checkpointer.due(done) {
                save(state, done)?;
            }
            Ok(())
        },
    )?;
    progress.end();
    Ok(())
}

/// Normalised covariances and their eigendecompositions from the (merged) covariance sums:
/// the factors of a KFAC fit, and the bases of an EK-FAC one. Layers run in parallel, each
/// decomposition on one thread (the same computation whatever the thread count).
pub fn eigendecompose(tracked: &[TrackedLayer], cov: &PassSums) -> Result<Vec<LayerFactors>> {
    let norm = 1.0 / cov.n_tokens.max(1) as f64;
    tracked
        .par_iter()
        .zip(cov.sums.par_chunks(2))
        .map(|(l, pair)| {
            // The passes accumulate lower triangles only (linalg::add_gram).
            let scaled = |m: &Mat<f64>| {
                let mut m = m.clone();
                linalg::mirror_lower(&mut m);
                Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * norm)
            };
            let (a, s) = (scaled(&pair[0]), scaled(&pair[1]));
            let eig = |m: &Mat<f64>, which: &str| {
                linalg::eigh(m).map_err(|e| Error::Other(format!("layer {} {which}: {e}", l.name)))
            };
            let (ea, es) = rayon::join(|| eig(&a, "A"), || eig(&s, "S"));
            let ((eigvals_a, q_a), (eigvals_s, q_s)) = (ea?, es?);
            Ok(LayerFactors {
                layer: l.clone(),
                n_tokens: cov.n_tokens,
                n_sequences: cov.n_sequences,
                covariance: Some((linalg::to_f32(&a), linalg::to_f32(&s))),
                eigen: Some(Eigenbasis {
                    eigvals_a,
                    q_a: linalg::to_f32(&q_a),
                    eigvals_s,
                    q_s: linalg::to_f32(&q_s),
                }),
                lambda: None,
            })
        })
        .collect()
}

/// Sets Λ of each layer from the (merged) eigenvalue sums, normalised per sequence.
pub fn set_lambda(layers: &mut [LayerFactors], lam: &PassSums) {
    let norm = 1.0 / lam.n_sequences.max(1) as f64;
    for (lf, sum) in layers.iter_mut().zip(&lam.sums) {
        lf.n_tokens = lam.n_tokens;
        lf.n_sequences = lam.n_sequences;
        lf.lambda = Some(Mat::from_fn(sum.nrows(), sum.ncols(), |i, j| {
            (sum[(i, j)] * norm) as f32
        }));
    }
}

/// Factors with no curvature (the identity strategy), or before any pass.
pub fn empty_factors(
    tracked: &[TrackedLayer],
    n_tokens: u64,
    n_sequences: u64,
) -> Vec<LayerFactors> {
    tracked
        .iter()
        .map(|l| LayerFactors {
            layer: l.clone(),
            n_tokens,
            n_sequences,
            covariance: None,
            eigen: None,
            lambda: None,
        })
        .collect()
}

/// Fits the factors of `options.strategy` over `seqs` in one process, with no checkpoints: a
/// covariance pass (KFAC, EK-FAC), the eigendecompositions, then an eigenvalue pass (EK-FAC,
/// diagonal). `infl fit` runs the same passes shardable and resumable ([`crate::workflow`]).
pub fn fit(
    model: &dyn TapModel,
    seqs: &[Sequence],
    options: &FitOptions,
    progress: &dyn Progress,
) -> Result<Factors> {
    let tracked = model.tracked().to_vec();
    if tracked.is_empty() {
        return Err(Error::input(
            "no tracked layers: --modules selected nothing",
        ));
    }
    let indices: Vec<u64> = (0..seqs.len() as u64).collect();
    let n_tokens: u64 = seqs.iter().map(|s| s.ids.len() as u64).sum();
    let mut layers = empty_factors(&tracked, n_tokens, seqs.len() as u64);
    for pass in options.strategy.passes() {
        let mut state = PassSums::zeros(pass, &tracked);
        let bases: Vec<Option<&Eigenbasis>> = layers.iter().map(|l| l.eigen.as_ref()).collect();
        run_pass(
            model,
            options,
            seqs,
            &indices,
            &bases,
            &mut state,
            0,
            CheckpointPolicy::NEVER,
            progress,
            |_, _| Ok(()),
        )?;
        match pass {
            Pass::Covariance => layers = eigendecompose(&tracked, &state)?,
            Pass::Eigenvalue => set_lambda(&mut layers, &state),
        }
    }
    Ok(Factors {
        strategy: options.strategy,
        layers,
    })
}

impl Factors {
    /// Tensors named `{layer}.{A,S,Q_A,eigvals_A,Q_S,eigvals_S,lambda}` plus per-layer counts.
    pub fn to_tensors(&self) -> Vec<(String, OwnedTensor)> {
        let mut out = Vec::new();
        let mat = |m: &Mat<f32>| {
            OwnedTensor::F32(vec![m.nrows(), m.ncols()], linalg::to_row_major(m.as_ref()))
        };
        for lf in &self.layers {
            let n = &lf.layer.name;
            out.push((
                format!("{n}.counts"),
                OwnedTensor::F64(vec![2], vec![lf.n_tokens as f64, lf.n_sequences as f64]),
            ));
            if let Some((a, s)) = &lf.covariance {
                out.push((format!("{n}.A"), mat(a)));
                out.push((format!("{n}.S"), mat(s)));
            }
            if let Some(e) = &lf.eigen {
                out.push((format!("{n}.Q_A"), mat(&e.q_a)));
                out.push((
                    format!("{n}.eigvals_A"),
                    OwnedTensor::F64(vec![e.eigvals_a.len()], e.eigvals_a.clone()),
                ));
                out.push((format!("{n}.Q_S"), mat(&e.q_s)));
                out.push((
                    format!("{n}.eigvals_S"),
                    OwnedTensor::F64(vec![e.eigvals_s.len()], e.eigvals_s.clone()),
                ));
            }
            if let Some(l) = &lf.lambda {
                out.push((format!("{n}.lambda"), mat(l)));
            }
        }
        out
    }

    /// Reads factors written by [`Factors::to_tensors`] for the given layers.
    pub fn from_file(path: &Path, strategy: Strategy, layers: &[TrackedLayer]) -> Result<Factors> {
        let t = crate::io::read_safetensors(path)?;
        Self::from_tensors(t, strategy, layers, &path.display().to_string())
    }

    /// [`Factors::from_file`] from tensors already read; `what` names their source in messages.
    pub fn from_tensors(
        mut t: crate::io::TensorMap,
        strategy: Strategy,
        layers: &[TrackedLayer],
        what: &str,
    ) -> Result<Factors> {
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f64>> {
            let (s, v) = t
                .remove(name)
                .ok_or_else(|| Error::Mismatch(format!("{what}: tensor `{name}` is missing")))?;
            if s != shape {
                return Err(Error::Mismatch(format!(
                    "{what}: tensor `{name}` has shape {s:?}, the model's layer needs {shape:?}"
                )));
            }
            Ok(v)
        };
        let mat32 = |v: Vec<f64>, r: usize, c: usize| linalg::f32_from_row_major(&v, r, c);
        let mut out = Vec::new();
        for l in layers {
            let n = &l.name;
            let (di, d_o) = (l.d_in_h(), l.d_out);
            let counts = take(&format!("{n}.counts"), &[2])?;
            let (covariance, eigen) = if strategy.needs_covariance() {
                let a = mat32(take(&format!("{n}.A"), &[di, di])?, di, di);
                let s = mat32(take(&format!("{n}.S"), &[d_o, d_o])?, d_o, d_o);
                let q_a = mat32(take(&format!("{n}.Q_A"), &[di, di])?, di, di);
                let q_s = mat32(take(&format!("{n}.Q_S"), &[d_o, d_o])?, d_o, d_o);
                let eigvals_a = take(&format!("{n}.eigvals_A"), &[di])?;
                let eigvals_s = take(&format!("{n}.eigvals_S"), &[d_o])?;
                (
                    Some((a, s)),
                    Some(Eigenbasis {
                        eigvals_a,
                        q_a,
                        eigvals_s,
                        q_s,
                    }),
                )
            } else {
                (None, None)
            };
            let lambda = if strategy.needs_lambda() {
                Some(mat32(take(&format!("{n}.lambda"), &[d_o, di])?, d_o, di))
            } else {
                None
            };
            out.push(LayerFactors {
                layer: l.clone(),
                n_tokens: counts[0] as u64,
                n_sequences: counts[1] as u64,
                covariance,
                eigen,
                lambda,
            });
        }
        Ok(Factors {
            strategy,
            layers: out,
        })
    }
}

/// Per-layer metadata recorded in the factors' meta.json.
pub fn layer_summary(factors: &Factors) -> Vec<HashMap<&'static str, serde_json::Value>> {
    factors
        .layers
        .iter()
        .map(|l| {
            HashMap::from([
                ("name", l.layer.name.clone().into()),
                ("d_in", l.layer.d_in.into()),
                ("d_out", l.layer.d_out.into()),
                ("has_bias", l.layer.has_bias.into()),
                ("n_tokens", l.n_tokens.into()),
                ("n_sequences", l.n_sequences.into()),
            ])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_batches_share_every_thread() {
        for (threads, want) in [(2, vec![1, 1]), (3, vec![2, 1]), (16, vec![8, 8])] {
            let got: Vec<usize> = (0..2).map(|k| pool_threads(k, 2, threads)).collect();
            assert_eq!(got, want, "{threads} threads");
        }
        assert_eq!(pool_threads(0, 1, 5), 5);
    }

    /// The FLOP counts `infl bench --passes-only` divides by, worked by hand for one layer.
    #[test]
    fn statistics_and_scoring_flops_are_counted_from_the_shapes() {
        // d_in 2 with a bias: d_in_h = 3; d_out = 4; 10 tokens in 2 sequences.
        let l = TrackedLayer {
            name: "x".into(),
            d_in: 2,
            d_out: 4,
            has_bias: true,
        };
        let one = std::slice::from_ref(&l);
        // Grams as symmetric updates: N (d_out² + d_in²) = 10 · (16 + 9).
        assert_eq!(statistics_flops(Pass::Covariance, one, 10), 250.0);
        // Rotation 2N (16 + 9) = 500, per-sequence products 2N · 4 · 3 = 240.
        assert_eq!(statistics_flops(Pass::Eigenvalue, one, 10), 740.0);
        // Per-sequence gradients 2N · 12 = 240, dots with 3 queries 2 · 2 · 3 · 12 = 144.
        assert_eq!(crate::influence::scoring_flops(one, 10, 2, 3), 384.0);
        // Queries of 4 and 6 tokens: tokens first 740, summed first 240 + 2·2·12·7 = 576
        // (cheaper here), and the rotation back 336 outside the store's basis.
        assert_eq!(crate::influence::query_flops(one, &[4, 6], true), 576.0);
        assert_eq!(crate::influence::query_flops(one, &[4, 6], false), 912.0);
    }
}
