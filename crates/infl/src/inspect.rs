//! `infl inspect`: what a model is (architecture, parameters, tracked layers with shapes) and
//! what fitting and scoring it will cost, before anything runs: memory from the factor and
//! activation sizes, time from a one-batch probe. `fit` and `score` check the same memory
//! estimate against the memory available and refuse to start when it does not fit.
//!
//! The memory model follows what the stages actually hold (src/curvature.rs, src/influence.rs):
//! * fit, three phases, the largest its peak ([`FitPhases`]): the covariance pass (A and S sums
//!   in f64, packed lower triangles, beside the batches in flight); the eigendecompositions
//!   (each layer's sums expanded and freed as its f32 covariances and eigenvectors are made,
//!   plus the eigensolver's workspace); the eigenvalue pass (the f32 eigenvectors and the Λ sums in f64
//!   beside the batches in flight, then the f32 Λ). Files are written a tensor at a time;
//! * score: eigenvectors and (Λ+λ)⁻¹ in f32, one preconditioned gradient per query and layer
//!   (n_queries × Σ d_out·d_in_h × 4 bytes), per-sequence gradients of one batch and layer;
//! * both: the f32 weights and what one batch's forward and backward hold: for the fast engine
//!   its own count ([`TapModel::taps_peak_bytes`]: the tensors its forward saves, the taps,
//!   a chunk of logits), for autograd a model of its graph (activations, attention
//!   probabilities, logits and their gradient).

use crate::curvature::{self, Fisher, Strategy};
use crate::data::{Query, Sequence};
use crate::error::{Error, Result};
use crate::influence::{self, Damping, Preconditioner};
use crate::linalg::Lower;
use crate::model::{TapModel, TokenBatch, TrackedLayer};
use crate::options::FitOptions;
use crate::pass::Silent;

/// Bytes needed by each part of a run, for one model, batch size and window length.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    /// What one batch of `batch_size × max_len` tokens holds: its forward and backward (the
    /// engine's own count, or for autograd a model of its graph), its taps included.
    pub activations: u64,
    /// The copies of a batch's taps `fit` hands to its statistics, which consume them while
    /// the next batch's are computed (scoring consumes the taps where they are).
    pub taps_handoff: u64,
    /// Batches the passes compute at once, each with its own activations
    /// ([`crate::pass::batches_at_once`]).
    pub batches_at_once: u64,
    /// What `fit` holds beside the weights in each of its phases.
    pub fit_phases: FitPhases,
    /// Size of factors.safetensors.
    pub factor_file: u64,
    /// Preconditioner held by `score`.
    pub score_preconditioner: u64,
    /// Preconditioned gradients of one query (all tracked layers), as stored (full unless
    /// [`MemoryEstimate::at_query_rank`] says otherwise).
    pub per_query: u64,
    /// Per-sequence gradients of one batch for the largest layer, during scoring.
    pub score_batch: u64,
    /// Sequences per batch (what the activations are counted for).
    pub batch_size: u64,
}

impl MemoryEstimate {
    /// Peak bytes of `infl fit`: the weights and its largest phase.
    pub fn fit_total(&self) -> u64 {
        self.weights + self.fit_phases.peak()
    }

    /// Peak bytes of `infl score` with `n_queries` queries and `n_train` training sequences:
    /// the larger of its two phases, both holding the weights and the queries' preconditioned
    /// gradients. Preconditioning the queries holds the damped inverse (read from
    /// factors.safetensors a layer at a time, never the covariances) and one batch of at most
    /// `n_queries` sequences; the corpus pass, which starts after the inverse is returned,
    /// holds its batches in flight and their per-sequence gradients. (`--normalize cosine`
    /// keeps the inverse through the pass: add `score_preconditioner`.)
    pub fn score_total(&self, n_queries: u64, n_train: u64) -> u64 {
        let queries = n_queries.min(self.batch_size.max(1));
        let query_batch = self.activations * queries / self.batch_size.max(1);
        let preconditioning = self.score_preconditioner + query_batch;
        let pass = self.batches_at_once * (self.activations + self.score_batch);
        self.weights
            + n_queries * self.per_query
            + n_queries * n_train * 8
            + preconditioning.max(pass)
    }
}

/// Bytes of one query's preconditioned gradients over `layers` as scoring stores them: whole
/// (`d_out × d_in_h` per layer), or at `--query-rank k` as rank-k factors (`k (d_out + d_in_h)`)
/// wherever k is below some layer's rank (then every layer is stored so).
pub fn query_bytes(layers: &[TrackedLayer], rank: Option<usize>) -> u64 {
    let low = rank.filter(|&k| layers.iter().any(|l| k < l.d_out.min(l.d_in_h())));
    layers
        .iter()
        .map(|l| match low {
            Some(k) => 4 * (k * (l.d_out + l.d_in_h())) as u64,
            None => 4 * (l.d_out * l.d_in_h()) as u64,
        })
        .sum()
}

impl MemoryEstimate {
    /// The estimate with the queries stored at `--query-rank` `rank` (None: full) for
    /// `layers`, the model's tracked layers.
    pub fn at_query_rank(self, layers: &[TrackedLayer], rank: Option<usize>) -> Self {
        MemoryEstimate {
            per_query: query_bytes(layers, rank),
            ..self
        }
    }
}

/// The memory estimate for `model` with batches of `batch_size` windows of `max_len` tokens.
pub fn estimate(model: &dyn TapModel, batch_size: usize, max_len: usize) -> MemoryEstimate {
    let tracked = model.tracked();
    let sq = |x: usize| (x as u64) * (x as u64);
    let cov: u64 = tracked.iter().map(|l| sq(l.d_in_h()) + sq(l.d_out)).sum();
    let lam: u64 = tracked.iter().map(|l| (l.d_out * l.d_in_h()) as u64).sum();
    let max_lam: u64 = tracked
        .iter()
        .map(|l| (l.d_out * l.d_in_h()) as u64)
        .max()
        .unwrap_or(0);
    let eigvals: u64 = tracked.iter().map(|l| (l.d_in_h() + l.d_out) as u64).sum();
    let factor_file = 4 * (2 * cov + lam) + 8 * eigvals;

    let tokens = (batch_size * max_len) as u64;
    let widths: u64 = tracked.iter().map(|l| (l.d_in + l.d_out) as u64).sum();
    let shape = model.block_shape();
    // Floats per token kept by the autograd graph, and as many again for the gradients the
    // backward pass stores: per block about 40 hidden-wide tensors (norms, projections, rotary,
    // residuals), 14 MLP-wide ones (projections, activation) and 6 attention maps per head;
    // calibrated against the measured peak of SmolLM2-135M (`infl inspect` prints both).
    let graph = if shape.layers > 0 {
        2 * shape.layers as u64
            * (40 * shape.hidden as u64
                + 14 * shape.intermediate as u64
                + 6 * shape.heads as u64 * max_len as u64)
    } else {
        12 * widths
    };
    // The (a, g) of a batch handed to the curvature stage, consumed while the engine computes
    // the next batch (measured: a llama 30 × 576 fit's pass holds 2 × (the engine's count +
    // one batch's taps) beside its sums, within 5%).
    let taps = widths;
    // Logits, their copy, dL/dlogits (vector and tensor), the surrogate product.
    let logits = tokens * model.vocab_size() as u64 * 5;
    let activations = match model.taps_peak_bytes(batch_size, max_len) {
        // The fast engine counts what its taps hold (the autograd model above overstated
        // them 12×: 2.38 GiB against 192 MiB measured for 16 × 128 tokens of a 4 × 256 GPT-2).
        Some(peak) => peak,
        None => 4 * (tokens * graph + logits),
    };
    let batches_at_once = crate::pass::batches_at_once(model) as u64;
    let taps_handoff = 4 * tokens * taps;
    MemoryEstimate {
        weights: 4 * model.n_parameters() as u64,
        activations,
        taps_handoff,
        batches_at_once,
        fit_phases: FitPhases::of(tracked, batches_at_once * (activations + taps_handoff)),
        factor_file,
        score_preconditioner: 4 * (cov + lam),
        per_query: 4 * lam,
        score_batch: 4 * batch_size as u64 * max_lam,
        batch_size: batch_size as u64,
    }
}

/// What `fit` holds beside the weights in each of its phases (EK-FAC; KFAC and the diagonal
/// run a subset of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitPhases {
    /// The batches in flight and the f64 sums of A and S (packed lower triangles).
    pub covariance_pass: u64,
    /// The sums, each layer's replaced by its f32 covariances and eigenvectors as it is
    /// decomposed (equal bytes), plus per layer being decomposed (one per thread) the
    /// eigensolver's copies and workspace.
    pub decomposition: u64,
    /// The batches in flight, the f32 eigenvectors and the f64 Λ sums; at its end the f32 Λ
    /// beside the sums (the batches gone).
    pub eigenvalue_pass: u64,
}

impl FitPhases {
    /// The phases of a fit of `layers` with `batches` bytes of batches in flight.
    pub fn of(layers: &[TrackedLayer], batches: u64) -> Self {
        let sq = |x: usize| (x as u64) * (x as u64);
        let cov: u64 = layers.iter().map(|l| sq(l.d_in_h()) + sq(l.d_out)).sum();
        let packed: u64 = layers
            .iter()
            .map(|l| (Lower::packed_len(l.d_in_h()) + Lower::packed_len(l.d_out)) as u64)
            .sum();
        let lam: u64 = layers.iter().map(|l| (l.d_out * l.d_in_h()) as u64).sum();
        let mut sizes: Vec<u64> = layers
            .iter()
            .map(|l| sq(l.d_in_h()).max(sq(l.d_out)))
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let threads = rayon::current_num_threads().max(1);
        let decomposing: u64 = sizes.iter().take(threads).sum();
        FitPhases {
            covariance_pass: batches + 8 * packed,
            decomposition: 8 * cov + 32 * decomposing,
            eigenvalue_pass: (batches + 4 * cov + 8 * lam).max(4 * cov + 12 * lam),
        }
    }

    pub fn peak(&self) -> u64 {
        self.covariance_pass
            .max(self.decomposition)
            .max(self.eigenvalue_pass)
    }
}

/// What `fit` needs at its peak for the statistics of `layers` (a partition, or all): the
/// weights and its largest phase.
pub fn fit_bytes(e: &MemoryEstimate, layers: &[TrackedLayer]) -> u64 {
    let batches = e.batches_at_once * (e.activations + e.taps_handoff);
    e.weights + FitPhases::of(layers, batches).peak()
}

/// What `fit` holds whatever its layers: the weights and the batches in flight.
pub fn fit_fixed_bytes(model: &dyn TapModel, batch_size: usize, max_len: usize) -> u64 {
    let e = estimate(model, batch_size, max_len);
    e.weights + e.batches_at_once * (e.activations + e.taps_handoff)
}

/// What `score` holds for the layers of `layers` at its peak, the queries' preconditioning:
/// the damped inverse of each layer (eigenvectors and Λ, f32), `n_queries` preconditioned
/// gradients, and one batch's per-sequence gradients of the largest layer.
pub fn score_layer_bytes(
    layers: &[TrackedLayer],
    n_queries: u64,
    rank: Option<usize>,
    batch_size: usize,
) -> u64 {
    let sq = |x: usize| (x as u64) * (x as u64);
    let lam = |l: &TrackedLayer| (l.d_out * l.d_in_h()) as u64;
    let inverse: u64 = layers
        .iter()
        .map(|l| 4 * (sq(l.d_in_h()) + sq(l.d_out) + lam(l)))
        .sum();
    let queries = n_queries * query_bytes(layers, rank);
    let batch = 4 * batch_size as u64 * layers.iter().map(lam).max().unwrap_or(0);
    inverse + queries + batch
}

/// What `score` holds whatever its layers: the weights and the batches in flight.
pub fn score_fixed_bytes(model: &dyn TapModel, batch_size: usize, max_len: usize) -> u64 {
    let e = estimate(model, batch_size, max_len);
    e.weights + e.batches_at_once * e.activations
}

/// The fewest partitions of `model`'s tracked layers whose fits each need at most `budget`
/// bytes by this estimate ([`crate::partition::count_for_budget`]); `None` if one layer does
/// not fit.
pub fn partitions_for(
    model: &dyn TapModel,
    batch_size: usize,
    max_len: usize,
    budget: u64,
) -> Option<usize> {
    let e = estimate(model, batch_size, max_len);
    crate::partition::count_for_budget(model.tracked(), budget, 0, |r| fit_bytes(&e, r))
}

/// What to do when a fit needs more than `budget`: how many layer partitions bring each under
/// it, and what the largest then needs.
pub fn partition_advice(
    model: &dyn TapModel,
    batch_size: usize,
    max_len: usize,
    budget: u64,
) -> String {
    let fixed = fit_fixed_bytes(model, batch_size, max_len);
    match partitions_for(model, batch_size, max_len, budget) {
        Some(p) => {
            let (tracked, e) = (model.tracked(), estimate(model, batch_size, max_len));
            let largest = crate::partition::plan(tracked, p)
                .into_iter()
                .map(|r| fit_bytes(&e, &tracked[r]))
                .max()
                .unwrap_or(0);
            format!(
                "the fit fits in {} in {p} layer partitions (largest {}): `infl fit --memory-limit {}` (or --partitions {p})",
                human(budget),
                human(largest),
                human_flag(budget)
            )
        }
        None => format!(
            "the fit does not fit in {} even one layer per partition (the weights and one batch alone take {}); use a smaller --batch-size or --max-len",
            human(budget),
            human(fixed)
        ),
    }
}

/// A size as `--memory-limit` takes it, rounded down (`15G`, `800M`).
fn human_flag(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{}G", b >> 30),
        b => format!("{}M", (b >> 20).max(1)),
    }
}

/// The memory this job can use, in bytes (None where /proc cannot be read): what the system
/// has available (`MemAvailable`) plus what this process already holds (`RssAnon`). The
/// estimates count a whole job, weights and factors included, and a job checks them after
/// loading some of it: MemAvailable alone counted a 1B model's loaded weights and
/// preconditioner twice and refused a score that fit.
pub fn mem_available() -> Option<u64> {
    // What this process has freed and its allocator keeps ([`crate::io::keep_freed_memory`])
    // goes back first, so that the next stage's own pages are not stacked on it.
    crate::io::release_freed_memory();
    let kib = |file: &str, field: &str| -> Option<u64> {
        let text = std::fs::read_to_string(file).ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    let available = kib("/proc/meminfo", "MemAvailable:")?;
    let held = kib("/proc/self/status", "RssAnon:").unwrap_or(0);
    Some(1024 * (available + held))
}

/// Refuses to start `what` when `need` bytes exceed the memory available.
pub fn check_memory(what: &str, need: u64, hint: &str) -> Result<()> {
    if let Some(avail) = mem_available() {
        if need > avail {
            return Err(Error::input(format!(
                "{what} would need about {} but only {} is available (MemAvailable and what it holds); {hint}, or pass --no-memory-check to try anyway (`infl inspect` shows the breakdown)",
                human(need),
                human(avail)
            )));
        }
    }
    Ok(())
}

/// `1.23 GiB`-style sizes.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = bytes as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{x:.2} {}", units[u])
    }
}

/// Measured costs of one batch.
#[derive(Debug, Clone)]
pub struct Probe {
    pub tokens: usize,
    /// One forward + backward with taps.
    pub taps_seconds: f64,
    /// A whole EK-FAC fit (both passes, eigendecompositions) on the probe batch.
    pub fit_seconds: f64,
    /// The part of `fit_seconds` outside the passes over the batch: the eigendecompositions.
    pub eigh_seconds: f64,
    /// Scoring the probe batch against one query (identity preconditioner).
    pub score_seconds: f64,
    /// Peak memory growth measured during the taps of the batch (Linux: the resident-set
    /// high-water mark reset through /proc/self/clear_refs), to compare with the estimate.
    pub taps_peak_bytes: Option<u64>,
}

impl Probe {
    /// Fit time for `n_tokens` training tokens: eigendecompositions once, the rest per token.
    pub fn fit_estimate(&self, n_tokens: u64) -> f64 {
        let per_token = (self.fit_seconds - self.eigh_seconds).max(0.0) / self.tokens as f64;
        self.eigh_seconds + per_token * n_tokens as f64
    }

    /// Scoring time for `n_tokens` training tokens and one query.
    pub fn score_estimate(&self, n_tokens: u64) -> f64 {
        self.score_seconds / self.tokens as f64 * n_tokens as f64
    }
}

/// Deterministic pseudo-random token ids (the probe's cost does not depend on them).
fn probe_sequences(vocab: usize, batch_size: usize, max_len: usize) -> Vec<Sequence> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..batch_size)
        .map(|k| Sequence {
            id: format!("probe:{k}"),
            ids: (0..max_len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % vocab as u64) as u32
                })
                .collect(),
        })
        .collect()
}

/// Runs one batch of taps, a one-batch fit and a one-batch score, timing each.
pub fn probe(model: &dyn TapModel, batch_size: usize, max_len: usize) -> Result<Probe> {
    let seqs = probe_sequences(model.vocab_size(), batch_size, max_len);
    let refs: Vec<(u64, &[u32])> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u64, s.ids.as_slice()))
        .collect();
    let before = reset_peak_rss();
    let started = std::time::Instant::now();
    model.taps(&TokenBatch::training(&refs), crate::model::Labels::Data)?;
    let taps_seconds = started.elapsed().as_secs_f64();
    let taps_peak_bytes = before.and_then(|b| Some(status_bytes("VmHWM:")?.saturating_sub(b)));

    let options = FitOptions {
        strategy: Strategy::Ekfac,
        fisher: Fisher::Empirical,
        batch_size,
        ..FitOptions::default()
    };
    let passes = crate::pass::clock::PhaseClock::new(&Silent);
    let started = std::time::Instant::now();
    curvature::fit(model, &seqs, &options, &passes)?;
    let fit_seconds = started.elapsed().as_secs_f64();
    // The eigendecompositions as the fit ran them, a phase of their own (timed apart, on
    // other matrices and one after another, they took longer than the whole fit on a fast
    // machine, which left nothing per token and a flat estimate).
    let eigh_seconds = passes.seconds("eigendecompositions").wall;

    let identity = curvature::Factors {
        strategy: Strategy::Identity,
        layers: model
            .tracked()
            .iter()
            .map(|l| curvature::LayerFactors {
                layer: l.clone(),
                n_tokens: 0,
                n_sequences: 0,
                covariance: None,
                eigen: None,
                lambda: None,
            })
            .collect(),
    };
    let pre = Preconditioner::new(&identity, Damping::Heuristic)?;
    let half = max_len.div_ceil(2).max(1);
    let query = Query {
        id: "probe".into(),
        prompt_ids: seqs[0].ids[..half.min(seqs[0].ids.len() - 1).max(1)].to_vec(),
        completion_ids: seqs[0].ids[half.min(seqs[0].ids.len() - 1).max(1)..].to_vec(),
        prompt: None,
        completion: None,
    };
    let started = std::time::Instant::now();
    let pq = influence::precondition_queries(model, &[query], &pre, 1, None, false, &Silent)?;
    influence::score_dense(model, &pq, &seqs, batch_size, &Silent)?;
    let score_seconds = started.elapsed().as_secs_f64();
    Ok(Probe {
        tokens: batch_size * max_len,
        taps_seconds,
        fit_seconds,
        eigh_seconds,
        score_seconds,
        taps_peak_bytes,
    })
}

/// A `kB` field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the resident-set high-water mark to the current RSS and returns that RSS.
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    status_bytes("VmRSS:")
}

/// The text `infl inspect` prints.
pub fn report(
    model_path: &std::path::Path,
    model: &dyn TapModel,
    batch_size: usize,
    max_len: usize,
    (n_queries, query_rank): (u64, Option<usize>),
    probe_result: Option<&Probe>,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let tracked = model.tracked();
    let tracked_params: usize = tracked
        .iter()
        .map(|l| l.d_out * l.d_in + if l.has_bias { l.d_out } else { 0 })
        .sum();
    let _ = writeln!(s, "model         {}", model_path.display());
    let _ = writeln!(s, "architecture  {}", model.architecture());
    let _ = writeln!(
        s,
        "parameters    {} total, {} in {} tracked layers ({:.1}%)",
        model.n_parameters(),
        tracked_params,
        tracked.len(),
        100.0 * tracked_params as f64 / model.n_parameters().max(1) as f64
    );
    let _ = writeln!(
        s,
        "vocabulary    {}; context length {}",
        model.vocab_size(),
        model.max_positions()
    );
    let _ = writeln!(s, "\ntracked layers (d_out × d_in, + bias):");
    let width = tracked.iter().map(|l| l.name.len()).max().unwrap_or(0);
    for l in tracked {
        let _ = writeln!(
            s,
            "  {:width$}  {:>6} × {:<6}{}",
            l.name,
            l.d_out,
            l.d_in,
            if l.has_bias { " + bias" } else { "" },
        );
    }
    let e = estimate(model, batch_size, max_len).at_query_rank(tracked, query_rank);
    let _ = writeln!(
        s,
        "\nmemory estimate (batch {batch_size} × {max_len} tokens):"
    );
    let row = |s: &mut String, what: &str, b: u64| {
        let _ = writeln!(s, "  {what:<44} {:>12}", human(b));
    };
    row(&mut s, "weights (f32)", e.weights);
    row(&mut s, "activations + logits of one batch", e.activations);
    row(&mut s, "fit: taps handed to the statistics", e.taps_handoff);
    let _ = writeln!(
        s,
        "  {:<44} {:>12}",
        "batches computed at once (by --threads)", e.batches_at_once
    );
    row(
        &mut s,
        "fit: covariance pass (batches, f64 sums)",
        e.fit_phases.covariance_pass,
    );
    row(
        &mut s,
        "fit: eigendecompositions",
        e.fit_phases.decomposition,
    );
    row(
        &mut s,
        "fit: eigenvalue pass (batches, bases, Λ)",
        e.fit_phases.eigenvalue_pass,
    );
    row(&mut s, "factors.safetensors", e.factor_file);
    row(
        &mut s,
        "score: preconditioner (Q's, 1/(Λ+λ))",
        e.score_preconditioner,
    );
    row(
        &mut s,
        "score: preconditioned gradients per query",
        e.per_query,
    );
    row(&mut s, "FIT TOTAL", e.fit_total());
    row(
        &mut s,
        &format!("SCORE TOTAL ({n_queries} queries, scores aside)"),
        e.score_total(n_queries, 0),
    );
    match mem_available() {
        Some(a) => {
            row(&mut s, "available (MemAvailable + held now)", a);
            if e.fit_total() > a {
                let _ = writeln!(s, "  {}", partition_advice(model, batch_size, max_len, a));
            }
        }
        None => {
            let _ = writeln!(s, "  available memory unknown (/proc/meminfo unreadable)");
        }
    }
    match probe_result {
        Some(p) => {
            let _ = writeln!(s, "\ntime (one-batch probe of {} tokens):", p.tokens);
            let _ = writeln!(
                s,
                "  forward + backward with taps   {:.2} s ({:.0} tokens/s)",
                p.taps_seconds,
                p.tokens as f64 / p.taps_seconds
            );
            if let Some(b) = p.taps_peak_bytes {
                // Like with like: the engine's own count of the taps where it has one (the
                // estimate above adds the taps the statistics still hold).
                let counted = match model.taps_peak_bytes(batch_size, max_len) {
                    Some(c) => format!("the engine's count: {}", human(c)),
                    None => format!("estimate above: {}", human(e.activations)),
                };
                let _ = writeln!(
                    s,
                    "  measured peak memory growth of the taps: {} ({counted})",
                    human(b)
                );
            }
            let _ = writeln!(
                s,
                "  EK-FAC fit of the batch        {:.2} s (eigendecompositions {:.2} s of it)",
                p.fit_seconds, p.eigh_seconds
            );
            let _ = writeln!(
                s,
                "  scoring the batch, 1 query     {:.2} s ({:.0} tokens/s)",
                p.score_seconds,
                p.tokens as f64 / p.score_seconds
            );
            for n in [100_000u64, 1_000_000] {
                let _ = writeln!(
                    s,
                    "  estimate for {n} training tokens: fit {:.0} s, score {:.0} s per query batch",
                    p.fit_estimate(n),
                    p.score_estimate(n)
                );
            }
        }
        None => {
            let _ = writeln!(s, "\ntime: not probed");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt2::{Gpt2, Gpt2Config};
    use crate::model::ModuleSelection;

    fn tiny() -> Gpt2 {
        let c: Gpt2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 23, "n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2
        }))
        .unwrap();
        Gpt2::random(c, 1, ModuleSelection::All).unwrap()
    }

    #[test]
    fn estimate_counts_factor_sizes_exactly() {
        let m = tiny();
        let e = estimate(&m, 4, 16);
        // Per block: c_attn 24×(8+1), c_proj 8×9, c_fc 32×9, c_proj 8×33.
        let lam: u64 = 2 * (24 * 9 + 8 * 9 + 32 * 9 + 8 * 33);
        assert_eq!(e.per_query, 4 * lam);
        let cov: u64 = 2 * ((81 + 576) + (81 + 64) + (81 + 1024) + (33 * 33 + 64));
        assert_eq!(e.score_preconditioner, 4 * (cov + lam));
        assert_eq!(e.weights, 4 * m.n_parameters() as u64);
        // Activations grow with the batch.
        assert!(estimate(&m, 8, 16).activations > e.activations);
        // Each batch computed at once holds its own activations.
        let (one, two) = (
            MemoryEstimate {
                batches_at_once: 1,
                ..e.clone()
            },
            MemoryEstimate {
                batches_at_once: 2,
                ..e.clone()
            },
        );
        // A batch more in flight adds to both passes.
        let batch = e.activations + e.taps_handoff;
        let more = FitPhases::of(m.tracked(), 2 * batch);
        let fewer = FitPhases::of(m.tracked(), batch);
        assert_eq!(more.covariance_pass - fewer.covariance_pass, batch);
        assert_eq!(two.fit_total(), e.weights + two.fit_phases.peak());
        // Scoring's peak is the larger of preconditioning the queries (the inverse and one
        // batch of them) and the corpus pass (its batches in flight).
        let preconditioning = e.score_preconditioner + e.activations * 3 / 4;
        let pass = |at_once: u64| at_once * (e.activations + e.score_batch);
        let base = e.weights + 3 * e.per_query + 3 * 10 * 8;
        assert_eq!(one.score_total(3, 10), base + preconditioning.max(pass(1)));
        assert_eq!(two.score_total(3, 10), base + preconditioning.max(pass(2)));
        assert!(e.score_total(3, 10) - e.score_total(0, 10) == 3 * e.per_query + 3 * 10 * 8);
    }

    #[test]
    fn queries_are_counted_as_score_stores_them() {
        let m = tiny();
        let e = estimate(&m, 4, 16);
        // Per block: c_attn 24×9, c_proj 8×9, c_fc 32×9, c_proj 8×33 (d_out × d_in_h).
        assert_eq!(query_bytes(m.tracked(), None), e.per_query);
        let low: u64 = 2 * 4 * 2 * ((24 + 9) + (8 + 9) + (32 + 9) + (8 + 33));
        assert_eq!(query_bytes(m.tracked(), Some(2)), low);
        assert_eq!(e.clone().at_query_rank(m.tracked(), Some(2)).per_query, low);
        // k = 9 is below no layer's rank (the smaller dimensions are 8 and 9): stored whole.
        assert_eq!(query_bytes(m.tracked(), Some(9)), e.per_query);
    }

    #[test]
    fn fit_phases_by_hand() {
        // One 2 × 3 layer: A 3×3 and S 2×2 (13 values; lower triangles 6 + 3), Λ 2×3 (6),
        // decomposed alone (9).
        let l = TrackedLayer {
            name: "l".into(),
            d_in: 3,
            d_out: 2,
            has_bias: false,
        };
        let p = FitPhases::of(&[l], 100);
        assert_eq!(p.covariance_pass, 100 + 8 * 9);
        assert_eq!(p.decomposition, 8 * 13 + 32 * 9);
        assert_eq!(p.eigenvalue_pass, 100 + 4 * 13 + 8 * 6);
        assert_eq!(p.peak(), p.decomposition);
        // With large batches the passes dominate, the eigenvalue pass's own end aside.
        assert_eq!(FitPhases::of(&[], 1000).peak(), 1000);
    }

    #[test]
    fn partitions_are_proposed_for_a_budget_the_whole_fit_exceeds() {
        let m = tiny();
        let e = estimate(&m, 4, 16);
        let (fixed, whole) = (fit_fixed_bytes(&m, 4, 16), fit_bytes(&e, m.tracked()));
        assert_eq!(whole, e.fit_total());
        // Room for everything: one partition.
        assert_eq!(partitions_for(&m, 4, 16, whole), Some(1));
        // Room for about half the layers' state: more than one, each within the budget.
        let budget = fixed + (whole - fixed) / 2 + 1;
        let p = partitions_for(&m, 4, 16, budget).unwrap();
        assert!(p > 1);
        for r in crate::partition::plan(m.tracked(), p) {
            assert!(fit_bytes(&e, &m.tracked()[r]) <= budget);
        }
        let advice = partition_advice(&m, 4, 16, budget);
        assert!(advice.contains(&format!("--partitions {p}")), "{advice}");
        // Not even the weights: no plan, and it says so.
        assert_eq!(partitions_for(&m, 4, 16, fixed / 2), None);
        assert!(partition_advice(&m, 4, 16, fixed / 2).contains("even one layer"));
    }

    #[test]
    fn memory_check_refuses_the_impossible() {
        let err = check_memory("fit", u64::MAX / 2, "use a smaller --batch-size")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--no-memory-check") && err.contains("fit"),
            "{err}"
        );
        check_memory("fit", 1, "").unwrap();
    }

    #[test]
    fn probe_runs_and_reports() {
        let m = tiny();
        let p = probe(&m, 2, 8).unwrap();
        assert!(p.taps_seconds > 0.0 && p.fit_seconds > 0.0 && p.score_seconds > 0.0);
        // The fixed part is part of the fit, and the passes make the rest grow with the corpus.
        assert!(p.eigh_seconds <= p.fit_seconds, "{p:?}");
        let (one, ten) = (p.tokens as u64, 10 * p.tokens as u64);
        assert!(p.fit_estimate(ten) > p.fit_estimate(one), "{p:?}");
        assert!((p.fit_estimate(one) - p.fit_seconds).abs() < 1e-9, "{p:?}");
        let text = report(std::path::Path::new("tiny"), &m, 2, 8, (1, None), Some(&p));
        assert!(
            text.contains("h.1.mlp.c_proj") && text.contains("FIT TOTAL"),
            "{text}"
        );
    }
}
