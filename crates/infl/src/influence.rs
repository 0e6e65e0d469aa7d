//! Influence stage: preconditioned query gradients (the inverse-Hessian-vector products) and
//! their inner products with training gradients.
//!
//! `P_q = Q_S [ (Q_Sᵀ G_q Q_A) ⊘ (Λ + λ) ] Q_Aᵀ` per layer, and
//! `I(q, z) = Σ_ℓ ⟨P_{q,ℓ}, G_{z,ℓ}⟩`. Positive: up-weighting z lowers −log p(completion | prompt).

pub mod device;
pub mod refine;

use crate::curvature::{Factors, LayerFactors, Strategy};
use crate::data::{Query, Sequence};
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::linalg;
use crate::model::{Labels, TapBatch, TapModel, TokenBatch, TrackedLayer};
use crate::pass::tasks::largest_first;
use crate::pass::{for_each_batch, Progress};
use faer::{Mat, MatRef};
use std::path::Path;

/// The damping λ added to the eigenvalues.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Damping {
    /// `0.1 × mean(Λ)`, per layer (the paper's and kronfluence's heuristic).
    Heuristic,
    /// The same λ for every layer.
    Fixed(f64),
}

impl std::str::FromStr for Damping {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "heuristic" {
            return Ok(Damping::Heuristic);
        }
        match s.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(Damping::Fixed(x)),
            _ => Err(format!(
                "`{s}` is neither `heuristic` nor a non-negative number"
            )),
        }
    }
}

impl std::fmt::Display for Damping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damping::Heuristic => f.write_str("heuristic"),
            Damping::Fixed(x) => write!(f, "{x}"),
        }
    }
}

enum LayerPreconditioner {
    /// EK-FAC and KFAC: rotate into the eigenbasis, divide, rotate back.
    Eigen {
        q_a: Mat<f32>,
        q_s: Mat<f32>,
        inverse: Mat<f32>,
    },
    /// Diagonal: element-wise division in the original basis.
    Diagonal {
        inverse: Mat<f32>,
    },
    Identity,
}

impl LayerPreconditioner {
    /// Layer `lf`'s damped inverse, taking its eigenbasis (no copy), and the λ used (0 for
    /// identity).
    fn new(strategy: Strategy, lf: LayerFactors, damping: Damping) -> Result<(Self, f64)> {
        let (d_o, d_i) = (lf.layer.d_out, lf.layer.d_in_h());
        let name = &lf.layer.name;
        let missing =
            |what: &str| Error::Mismatch(format!("layer {name}: the factors hold no {what}"));
        // Λ read in f64, as kronfluence prepares it; the reciprocal is then stored in f32.
        let lambda: Box<dyn Fn(usize, usize) -> f64 + '_> = match strategy {
            Strategy::Ekfac | Strategy::EkfacRefined | Strategy::Diagonal => {
                let l = lf.lambda.as_ref().ok_or_else(|| missing("Λ"))?;
                Box::new(move |i, j| l[(i, j)] as f64)
            }
            Strategy::Kfac => {
                let e = lf.eigen.as_ref().ok_or_else(|| missing("eigenbasis"))?;
                Box::new(move |i, j| e.eigvals_s[i] * e.eigvals_a[j])
            }
            Strategy::Identity => return Ok((LayerPreconditioner::Identity, 0.0)),
        };
        let lam = match damping {
            Damping::Fixed(x) => x,
            Damping::Heuristic => {
                let mut sum = 0.0;
                for j in 0..d_i {
                    for i in 0..d_o {
                        sum += lambda(i, j);
                    }
                }
                // A layer the fit never reached (an expert no token was routed to) has Λ = 0:
                // its training gradients are all zero, so any λ gives it the same (zero) part
                // of every score; 1 keeps the inverse finite.
                match 0.1 * sum / (d_o * d_i) as f64 {
                    0.0 => 1.0,
                    lam => lam,
                }
            }
        };
        let inverse = Mat::from_fn(d_o, d_i, |i, j| (1.0 / (lambda(i, j) + lam)) as f32);
        drop(lambda);
        if (0..d_i).any(|j| (0..d_o).any(|i| !inverse[(i, j)].is_finite())) {
            return Err(Error::NonFinite(format!(
                "layer {name}: Λ + λ has a zero (λ = {lam}); use a positive --damping"
            )));
        }
        let layer = match strategy {
            Strategy::Diagonal => LayerPreconditioner::Diagonal { inverse },
            _ => {
                let e = lf.eigen.ok_or_else(|| missing("eigenbasis"))?;
                LayerPreconditioner::Eigen {
                    q_a: e.q_a,
                    q_s: e.q_s,
                    inverse,
                }
            }
        };
        Ok((layer, lam))
    }
}

/// Applies the damped inverse curvature of every layer.
pub struct Preconditioner {
    layers: Vec<LayerPreconditioner>,
    /// The λ used per layer (0 for identity).
    pub damping: Vec<f64>,
    /// Whether the factors' strategy refines each query's inverse ([`refine`]).
    refined: bool,
    /// The refinement, once the scoring job has set it up ([`Preconditioner::refine_with`]).
    refiner: Option<refine::Refiner>,
}

impl Preconditioner {
    pub fn new(factors: &Factors, damping: Damping) -> Result<Self> {
        let layers = factors.layers.iter().map(|lf| {
            // A copy of what the inverse needs (never the covariances).
            Ok(LayerFactors {
                covariance: None,
                layer: lf.layer.clone(),
                eigen: lf.eigen.clone(),
                lambda: lf.lambda.clone(),
                ..*lf
            })
        });
        Self::build(factors.strategy, damping, layers)
    }

    /// [`Preconditioner::new`] straight from a factors file, one layer at a time: the peak is
    /// the preconditioner plus one layer's Λ, and the covariances are never read.
    pub fn from_file(
        path: &Path,
        strategy: Strategy,
        tracked: &[TrackedLayer],
        damping: Damping,
    ) -> Result<Self> {
        let mut file = TensorFile::open(path)?;
        let layers = tracked
            .iter()
            .map(|l| LayerFactors::read(&mut file, strategy, l, false));
        Self::build(strategy, damping, layers)
    }

    fn build(
        strategy: Strategy,
        damping: Damping,
        layers: impl Iterator<Item = Result<LayerFactors>>,
    ) -> Result<Self> {
        let (mut built, mut used) = (Vec::new(), Vec::new());
        for lf in layers {
            let (layer, lam) = LayerPreconditioner::new(strategy, lf?, damping)?;
            built.push(layer);
            used.push(lam);
        }
        Ok(Preconditioner {
            layers: built,
            damping: used,
            refined: strategy.is_refined(),
            refiner: None,
        })
    }

    /// Whether the factors' strategy refines each query's inverse, so that preconditioning
    /// queries needs [`Preconditioner::refine_with`] first.
    pub fn is_refined(&self) -> bool {
        self.refined
    }

    /// Refines the queries [`precondition_queries`] preconditions from now on.
    pub fn refine_with(&mut self, refiner: refine::Refiner) {
        self.refiner = Some(refiner);
    }

    /// Returns the memory of the damped inverse (its eigenvectors are about half the factors)
    /// once the queries are preconditioned, for a scoring pass that needs no training
    /// sequence's self-influence; the damping used per layer stays, for the record. Nothing of
    /// the inverse may be applied afterwards.
    pub fn release(&mut self) {
        self.layers = Vec::new();
    }

    /// `⟨P_z, G_z⟩` of layer `layer` from the gradient in the store's basis, `r`:
    /// `Σ r² ⊘ (Λ + λ)` (`Σ r²` for identity).
    pub fn self_influence_in_store_basis(&self, layer: usize, r: MatRef<'_, f32>) -> f64 {
        let inverse = match &self.layers[layer] {
            LayerPreconditioner::Eigen { inverse, .. } => Some(inverse),
            LayerPreconditioner::Diagonal { inverse } => Some(inverse),
            LayerPreconditioner::Identity => None,
        };
        let mut sum = 0f64;
        for j in 0..r.ncols() {
            for i in 0..r.nrows() {
                let x = r[(i, j)] as f64;
                sum += x * x * inverse.map_or(1.0, |m| m[(i, j)] as f64);
            }
        }
        sum
    }

    /// The summed gradient of each sequence of a batch in layer `layer`'s basis, as the columns
    /// of a `(d_out·d_in_h) × n_seq` matrix (column-major vec): `R_k = Q_Sᵀ G_k Q_A` for an
    /// eigenbasis, `G_k` itself otherwise (the store's basis, see [`crate::store`]).
    ///
    /// The rotation takes the cheaper order for the batch: rotating the tokens first,
    /// `(g Q_S)ᵀ (ā Q_A)`, costs `T (d_out² + d_in²)` per sequence of `T` tokens, rotating the
    /// summed gradient `d_out d_in (d_out + d_in)`; a query of a few dozen tokens is a tenth of
    /// the work the first way.
    pub fn basis_gradients(&self, layer: usize, l: &TrackedLayer, taps: &TapBatch) -> Mat<f32> {
        let offsets = taps.offsets();
        let (n, n_seq) = (offsets[offsets.len() - 1], taps.seq_lens.len());
        let (d_o, d_i) = (l.d_out as f64, l.d_in_h() as f64);
        let tokens_first =
            n as f64 * (d_o * d_o + d_i * d_i) < n_seq as f64 * d_o * d_i * (d_o + d_i);
        self.basis_gradients_in(layer, l, taps, tokens_first)
    }

    /// [`Self::basis_gradients`] in the order asked for (both are tested to agree).
    pub(crate) fn basis_gradients_in(
        &self,
        layer: usize,
        l: &TrackedLayer,
        taps: &TapBatch,
        tokens_first: bool,
    ) -> Mat<f32> {
        let LayerPreconditioner::Eigen { q_a, q_s, .. } = &self.layers[layer] else {
            return sequence_gradients(l, taps, layer);
        };
        let offsets = taps.offsets();
        let (n, n_seq) = (offsets[offsets.len() - 1], taps.seq_lens.len());
        if tokens_first {
            let tap = &taps.layers[layer];
            let a = linalg::homogeneous(&tap.a, n, l.d_in, l.has_bias);
            let g = linalg::rows(&tap.g, n, l.d_out);
            let (g_rot, a_rot) =
                linalg::rotate_tokens(g, a.as_ref(), Some((q_s.as_ref(), q_a.as_ref())), true)
                    .expect("a basis is given");
            return linalg::sequence_products(g_rot.as_ref(), a_rot.as_ref(), &offsets);
        }
        let mut grads = sequence_gradients(l, taps, layer);
        for k in 0..n_seq {
            let g = column_as_matrix(&grads, k, l.d_out, l.d_in_h());
            let rotated = linalg::mul(linalg::mul(q_s.transpose(), g).as_ref(), q_a.as_ref());
            let col = grads
                .col_mut(k)
                .try_as_col_major_mut()
                .expect("owned column is contiguous")
                .as_slice_mut();
            for j in 0..rotated.ncols() {
                for i in 0..rotated.nrows() {
                    col[i + j * rotated.nrows()] = rotated[(i, j)];
                }
            }
        }
        grads
    }

    /// Every column of `r` (gradients in layer `layer`'s basis, from [`Self::basis_gradients`])
    /// divided by the damped curvature there: `R ⊘ (Λ + λ)` (`R ⊘ (F_diag + λ)` for the
    /// diagonal, `R` for identity), the preconditioned gradients in the store's basis; into one
    /// buffer, column k at `k · d_out · d_in_h`.
    pub fn scale_columns(&self, layer: usize, r: &Mat<f32>) -> Vec<f32> {
        let mut out = Vec::with_capacity(r.nrows() * r.ncols());
        for k in 0..r.ncols() {
            let col = r
                .col(k)
                .try_as_col_major()
                .expect("owned column is contiguous")
                .as_slice();
            match &self.layers[layer] {
                LayerPreconditioner::Identity => out.extend_from_slice(col),
                LayerPreconditioner::Diagonal { inverse }
                | LayerPreconditioner::Eigen { inverse, .. } => {
                    // `inverse` is d_out × d_in_h; its columns follow each other in `col`.
                    let d_o = inverse.nrows();
                    for (j, chunk) in col.chunks(d_o).enumerate() {
                        let inv = inverse
                            .col(j)
                            .try_as_col_major()
                            .expect("owned column is contiguous")
                            .as_slice();
                        out.extend(chunk.iter().zip(inv).map(|(x, y)| x * y));
                    }
                }
            }
        }
        out
    }

    /// [`Self::from_basis`] of a batch of matrices at once (`s`: `d_out × d_in_h` matrices,
    /// column-major, one after the other), written into `dst` (one `d_out · d_in_h` slice
    /// each). For an eigenbasis `Q_S [S_1 … S_n]` is one product, then each `(Q_S S_k) Q_Aᵀ`.
    pub fn from_basis_into(
        &self,
        layer: usize,
        s: &[f32],
        (d_o, d_i): (usize, usize),
        dst: &mut [&mut [f32]],
    ) {
        let n = dst.len();
        assert_eq!(s.len(), n * d_o * d_i, "n matrices of d_out × d_in_h");
        match &self.layers[layer] {
            LayerPreconditioner::Eigen { q_a, q_s, .. } => {
                let left = linalg::mul(
                    q_s.as_ref(),
                    MatRef::from_column_major_slice(s, d_o, n * d_i),
                );
                for (k, out) in dst.iter_mut().enumerate() {
                    linalg::mul_into(
                        faer::MatMut::from_column_major_slice_mut(out, d_o, d_i),
                        left.as_ref().subcols(k * d_i, d_i),
                        q_a.transpose(),
                        false,
                    );
                }
            }
            _ => {
                for (k, out) in dst.iter_mut().enumerate() {
                    out.copy_from_slice(&s[k * d_o * d_i..(k + 1) * d_o * d_i]);
                }
            }
        }
    }

    /// A matrix in the original basis taken into layer `layer`'s: `Q_Sᵀ M Q_A` for an
    /// eigenbasis, `M` otherwise ([`Self::from_basis`] undoes it).
    pub fn to_basis(&self, layer: usize, m: MatRef<'_, f32>) -> Mat<f32> {
        match &self.layers[layer] {
            LayerPreconditioner::Eigen { q_a, q_s, .. } => {
                linalg::mul(linalg::mul(q_s.transpose(), m).as_ref(), q_a.as_ref())
            }
            _ => m.to_owned(),
        }
    }

    /// A matrix in layer `layer`'s basis taken back to the original one: `Q_S S Q_Aᵀ` for an
    /// eigenbasis, `S` otherwise.
    pub fn from_basis(&self, layer: usize, s: Mat<f32>) -> Mat<f32> {
        match &self.layers[layer] {
            LayerPreconditioner::Eigen { q_a, q_s, .. } => linalg::mul(
                linalg::mul(q_s.as_ref(), s.as_ref()).as_ref(),
                q_a.transpose(),
            ),
            _ => s,
        }
    }

    /// The preconditioned gradient of layer `layer`.
    pub fn apply(&self, layer: usize, g: MatRef<'_, f32>) -> Mat<f32> {
        match &self.layers[layer] {
            LayerPreconditioner::Identity => g.to_owned(),
            LayerPreconditioner::Diagonal { inverse } => {
                Mat::from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] * inverse[(i, j)])
            }
            LayerPreconditioner::Eigen { q_a, q_s, inverse } => {
                let rotated = linalg::mul(linalg::mul(q_s.transpose(), g).as_ref(), q_a.as_ref());
                let scaled = Mat::from_fn(rotated.nrows(), rotated.ncols(), |i, j| {
                    rotated[(i, j)] * inverse[(i, j)]
                });
                linalg::mul(
                    linalg::mul(q_s.as_ref(), scaled.as_ref()).as_ref(),
                    q_a.transpose(),
                )
            }
        }
    }
}

/// Summed per-sequence gradients `G_n = Σ_t g_t ā_tᵀ` (`d_out × d_in_h`) of one layer, written as
/// columns (column-major `vec(G_n)`) of a `(d_out·d_in_h) × n_seq` matrix.
pub fn sequence_gradients(layer: &TrackedLayer, taps: &TapBatch, index: usize) -> Mat<f32> {
    let offsets = taps.offsets();
    let n = offsets[offsets.len() - 1];
    let tap = &taps.layers[index];
    let a = linalg::homogeneous(&tap.a, n, layer.d_in, layer.has_bias);
    let g = linalg::rows(&tap.g, n, layer.d_out);
    linalg::sequence_products(g, a.as_ref(), &offsets)
}

pub fn column_as_matrix(m: &Mat<f32>, k: usize, rows: usize, cols: usize) -> MatRef<'_, f32> {
    let col = m
        .col(k)
        .try_as_col_major()
        .expect("owned column is contiguous")
        .as_slice();
    MatRef::from_column_major_slice(col, rows, cols)
}

/// The preconditioned query gradients of one layer.
pub enum LayerQueries {
    /// `[d_out·d_in_h, n_queries]`: column q = column-major vec(P_q). Exact.
    Full(Mat<f32>),
    /// Rank-k factors `P_q ≈ (U_q Σ_q) V_qᵀ`, stacked over queries: `u` is `d_out × (n_q·k)`,
    /// `v` is `d_in_h × (n_q·k)`; query q owns columns `q·k .. (q+1)·k` (zero-padded when the
    /// layer's rank is below k). Scores never form a training gradient: Σ_t (g_tᵀ U Σ)(Vᵀ ā_t).
    LowRank {
        u: Mat<f32>,
        v: Mat<f32>,
        rank: usize,
    },
}

/// Per-query preconditioned gradients for every tracked layer.
pub struct PreconditionedQueries {
    pub per_layer: Vec<LayerQueries>,
    /// −log p(completion | prompt) of each query.
    pub losses: Vec<f64>,
    /// ⟨P_q, G_q⟩ summed over layers: the query's squared norm in the damped inverse-Fisher
    /// metric (before any rank truncation), for cosine normalisation.
    pub self_influence: Vec<f64>,
    /// How the queries' inverse was refined (`ekfac-refined` factors only).
    pub refined: Option<refine::RefineReport>,
}

impl PreconditionedQueries {
    pub fn len(&self) -> usize {
        self.losses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.losses.is_empty()
    }
}

/// Truncated SVD `P ≈ (U Σ)_k V_kᵀ`, written into the query's block of columns.
fn low_rank_into(
    p: MatRef<'_, f32>,
    k: usize,
    u: &mut Mat<f32>,
    v: &mut Mat<f32>,
    q: usize,
) -> Result<()> {
    let svd = p.thin_svd().map_err(|e| {
        Error::Other(format!(
            "SVD of a preconditioned query gradient failed: {e:?}"
        ))
    })?;
    let s = svd.S();
    let mut order: Vec<usize> = (0..s.dim()).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    for (slot, &r) in order.iter().take(k).enumerate() {
        let col = q * k + slot;
        for i in 0..p.nrows() {
            u[(i, col)] = svd.U()[(i, r)] * s[r];
        }
        for j in 0..p.ncols() {
            v[(j, col)] = svd.V()[(j, r)];
        }
    }
    Ok(())
}

/// Computes and preconditions the measurement gradient of every query; with `rank = Some(k)`
/// each P_q is compressed to rank k per layer (exact when k ≥ the layer's rank). With
/// `store_basis`, P_q is expressed in the gradient store's basis (see
/// [`Preconditioner::scale_columns`]) and kept at full rank.
pub fn precondition_queries(
    model: &dyn TapModel,
    queries: &[Query],
    preconditioner: &Preconditioner,
    batch_size: usize,
    rank: Option<usize>,
    store_basis: bool,
    progress: &dyn Progress,
) -> Result<PreconditionedQueries> {
    let rank = if store_basis { None } else { rank };
    let tracked = model.tracked();
    let n_q = queries.len();
    let rank = rank.filter(|&k| tracked.iter().any(|l| k < l.d_out.min(l.d_in_h())));
    let mut per_layer: Vec<LayerQueries> = tracked
        .iter()
        .map(|l| match rank {
            None => LayerQueries::Full(Mat::zeros(l.d_out * l.d_in_h(), n_q)),
            Some(k) => LayerQueries::LowRank {
                u: Mat::zeros(l.d_out, n_q * k),
                v: Mat::zeros(l.d_in_h(), n_q * k),
                rank: k,
            },
        })
        .collect();
    let mut losses = Vec::with_capacity(n_q);
    let mut self_influence = vec![0f64; n_q];
    if preconditioner.refined && preconditioner.refiner.is_none() {
        return Err(Error::input(
            "ekfac-refined factors: this command does not refine the inverse; score them \
             with `infl score` (or fit --strategy ekfac for plain EK-FAC)",
        ));
    }
    let mut refined = Vec::new();
    let refine_started = std::time::Instant::now();
    let total: usize = queries
        .iter()
        .map(|q| q.prompt_ids.len() + q.completion_ids.len())
        .sum();
    // A refinement's passes count their sample's tokens once per query they carry:
    // `--iterations` + 1 passes per query (fewer for a query that converges early, and one
    // more where a converged residual is rechecked).
    match preconditioner.refiner.as_ref() {
        Some(r) if r.options().iterations > 0 => {
            let passes = (r.options().iterations as u64 + 1) * queries.len() as u64;
            progress.begin(
                "query gradients and refinement",
                total as u64 + passes * r.pass_tokens(),
            );
        }
        _ => progress.begin("query gradients", total as u64),
    }
    for (chunk_no, chunk) in queries.chunks(batch_size.max(1)).enumerate() {
        let start = chunk_no * batch_size.max(1);
        let refs: Vec<(u64, &[u32], &[u32])> = chunk
            .iter()
            .enumerate()
            .map(|(k, q)| {
                (
                    (start + k) as u64,
                    q.prompt_ids.as_slice(),
                    q.completion_ids.as_slice(),
                )
            })
            .collect();
        let batch = TokenBatch::queries(&refs);
        let taps = model.taps(&batch, Labels::Data)?;
        crate::pass::check_finite(
            &taps,
            |k| format!("query `{}`", chunk[k].id),
            "query gradients",
        )?;
        losses.extend_from_slice(&taps.losses);
        let n = chunk.len();
        match preconditioner.refiner.as_ref() {
            // The refinement couples the layers (Gauss-Newton products through the whole
            // network), so it needs every layer's gradients of the chunk at once.
            Some(refiner) => {
                let rotated: Vec<Mat<f32>> = (0..tracked.len())
                    .map(|index| preconditioner.basis_gradients(index, &tracked[index], &taps))
                    .collect();
                let mut scaled: Vec<Vec<f32>> = (0..tracked.len())
                    .map(|index| preconditioner.scale_columns(index, &rotated[index]))
                    .collect();
                let dims: Vec<usize> = tracked.iter().map(|l| l.d_out * l.d_in_h()).collect();
                refined.extend(refine_chunk(
                    (refiner, preconditioner),
                    &rotated,
                    &mut scaled,
                    &dims,
                    progress,
                )?);
                for (index, l) in tracked.iter().enumerate() {
                    let layer = (index, l, &rotated[index], &scaled[index][..]);
                    let stored = &mut per_layer[index];
                    store_layer_queries(
                        preconditioner,
                        layer,
                        (start, n),
                        store_basis,
                        &mut self_influence,
                        stored,
                    )?;
                }
            }
            // Otherwise a layer at a time: one layer's rotated and scaled gradients are held
            // beside the stored ones, not every layer's twice.
            None => {
                for (index, l) in tracked.iter().enumerate() {
                    let rotated = preconditioner.basis_gradients(index, l, &taps);
                    let scaled = preconditioner.scale_columns(index, &rotated);
                    let layer = (index, l, &rotated, &scaled[..]);
                    let stored = &mut per_layer[index];
                    store_layer_queries(
                        preconditioner,
                        layer,
                        (start, n),
                        store_basis,
                        &mut self_influence,
                        stored,
                    )?;
                }
            }
        }
        progress.advance(batch.n_tokens() as u64);
    }
    progress.end();
    let refined = preconditioner
        .refiner
        .as_ref()
        .map(|r| refine::RefineReport {
            options: *r.options(),
            sequences: r.sequences(),
            seconds: refine_started.elapsed().as_secs_f64(),
            queries: refined,
        });
    Ok(PreconditionedQueries {
        per_layer,
        losses,
        self_influence,
        refined,
    })
}

/// Adds the queries `start..start + n` of one layer (`index`, its gradients in the eigenbasis
/// `rotated`, a column per query, and the preconditioner's answers there `scaled`, one query
/// after the other) to their self-influence, and stores their preconditioned gradients.
fn store_layer_queries(
    preconditioner: &Preconditioner,
    (index, l, rotated, scaled): (usize, &TrackedLayer, &Mat<f32>, &[f32]),
    (start, n): (usize, usize),
    store_basis: bool,
    self_influence: &mut [f64],
    stored: &mut LayerQueries,
) -> Result<()> {
    let (d_o, d_i) = (l.d_out, l.d_in_h());
    for k in 0..n {
        // ⟨P, G⟩ is the same in either basis.
        let r = rotated
            .col(k)
            .try_as_col_major()
            .expect("owned column is contiguous")
            .as_slice();
        let p = &scaled[k * d_o * d_i..(k + 1) * d_o * d_i];
        self_influence[start + k] += p
            .iter()
            .zip(r)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum::<f64>();
    }
    match stored {
        LayerQueries::Full(stack) => {
            let mut dst: Vec<&mut [f32]> = stack
                .as_mut()
                .subcols_mut(start, n)
                .col_iter_mut()
                .map(|c| c.try_as_col_major_mut())
                .map(|c| c.expect("owned column is contiguous").as_slice_mut())
                .collect();
            if store_basis {
                for (k, col) in dst.iter_mut().enumerate() {
                    col.copy_from_slice(&scaled[k * d_o * d_i..(k + 1) * d_o * d_i]);
                }
            } else {
                preconditioner.from_basis_into(index, scaled, (d_o, d_i), &mut dst);
            }
        }
        LayerQueries::LowRank { u, v, rank } => {
            for k in 0..n {
                let s = MatRef::from_column_major_slice(
                    &scaled[k * d_o * d_i..(k + 1) * d_o * d_i],
                    d_o,
                    d_i,
                );
                let p = preconditioner.from_basis(index, s.to_owned());
                low_rank_into(p.as_ref(), *rank, u, v, start + k)?
            }
        }
    }
    Ok(())
}

/// Each query of a chunk refined in place: `rotated` (per layer, a column per query) are the
/// gradients in the eigenbasis, `scaled` (per layer, the queries one after the other, `dims`
/// each) EK-FAC's answers there.
fn refine_chunk(
    (refiner, preconditioner): (&refine::Refiner, &Preconditioner),
    rotated: &[Mat<f32>],
    scaled: &mut [Vec<f32>],
    dims: &[usize],
    progress: &dyn Progress,
) -> Result<Vec<refine::Convergence>> {
    let n = rotated.first().map_or(0, |m| m.ncols());
    let mut out = Vec::with_capacity(n);
    if refiner.options().iterations == 0 {
        return Ok(out);
    }
    // Per query, its gradient (the right-hand side) and EK-FAC's answer (the start), per layer.
    let b: Vec<Vec<Vec<f32>>> = (0..n)
        .map(|k| {
            rotated
                .iter()
                .map(|m| {
                    let col = m
                        .col(k)
                        .try_as_col_major()
                        .expect("owned column is contiguous");
                    col.as_slice().to_vec()
                })
                .collect()
        })
        .collect();
    let mut x: Vec<Vec<Vec<f32>>> = (0..n)
        .map(|k| {
            scaled
                .iter()
                .zip(dims)
                .map(|(s, &d)| s[k * d..(k + 1) * d].to_vec())
                .collect()
        })
        .collect();
    out.extend(refiner.solve_many(preconditioner, &b, &mut x, progress)?);
    for (k, xk) in x.iter().enumerate() {
        for ((s, &d), xl) in scaled.iter_mut().zip(dims).zip(xk) {
            s[k * d..(k + 1) * d].copy_from_slice(xl);
        }
    }
    Ok(out)
}

/// FLOPs of the products of a full-rank scoring pass's statistics over `n_tokens` tokens in
/// `n_sequences` sequences against `n_queries` queries (for `infl bench`'s floors): each
/// sequence's summed gradient (`2N d_out d_in`) and its dot products with the queries
/// (`2 n_seq n_q d_out d_in`).
pub fn scoring_flops(
    tracked: &[TrackedLayer],
    n_tokens: usize,
    n_sequences: usize,
    n_queries: usize,
) -> f64 {
    let (n, s, q) = (n_tokens as f64, n_sequences as f64, n_queries as f64);
    tracked
        .iter()
        .map(|l| {
            let d = l.d_out as f64 * l.d_in_h() as f64;
            2.0 * n * d + 2.0 * s * q * d
        })
        .sum()
}

/// FLOPs of preconditioning full-rank queries of these lengths in an eigenbasis, as
/// [`precondition_queries`] runs it (one batch): the rotation in the cheaper order (see
/// [`Preconditioner::basis_gradients`]) and, outside the store's basis, the rotation back.
pub fn query_flops(tracked: &[TrackedLayer], lens: &[usize], store_basis: bool) -> f64 {
    let (n, nq) = (lens.iter().sum::<usize>() as f64, lens.len() as f64);
    tracked
        .iter()
        .map(|l| {
            let (o, i) = (l.d_out as f64, l.d_in_h() as f64);
            let tokens_first = 2.0 * n * (o * o + i * i) + 2.0 * n * o * i;
            let summed = 2.0 * n * o * i + 2.0 * nq * o * i * (o + i);
            let back = if store_basis {
                0.0
            } else {
                2.0 * nq * o * i * (o + i)
            };
            tokens_first.min(summed) + back
        })
        .sum()
}

/// Scores of every layer for a batch of training sequences, `[n_queries, n_seq]` per layer, as
/// [`layer_scores`] gives them. Full-rank layers never hold a batch of per-sequence gradients:
/// each task forms one block of columns of every sequence's gradient and dots it with the
/// queries' matching block at once ([`linalg::sequence_block_dots`]); the tasks (layers ×
/// blocks) share the cores, and each layer's blocks are added in order, so the scores do not
/// depend on the thread count.
pub fn batch_scores(
    tracked: &[TrackedLayer],
    queries: &[LayerQueries],
    taps: &TapBatch,
) -> Vec<Mat<f32>> {
    /// Columns per block: wide enough that each sequence's product is an efficient GEMM (its
    /// `k` is only the sequence's length; 64 columns measured slower than no blocking), narrow
    /// enough that a block of 16 sequences at 1,024 rows (13 MiB) stays in the last-level cache.
    const BLOCK: usize = 256;
    let offsets = taps.offsets();
    let n = offsets[offsets.len() - 1];
    let n_seq = taps.seq_lens.len();
    let homogeneous: Vec<Option<linalg::Homogeneous<'_>>> = tracked
        .iter()
        .enumerate()
        .map(|(i, l)| match &queries[i] {
            LayerQueries::Full(_) => Some(linalg::homogeneous(
                &taps.layers[i].a,
                n,
                l.d_in,
                l.has_bias,
            )),
            LayerQueries::LowRank { .. } => None,
        })
        .collect();
    // Blocks of nearly equal width, so that no task is a sliver.
    let tasks: Vec<(usize, usize, usize)> = tracked
        .iter()
        .enumerate()
        .filter(|(i, _)| homogeneous[*i].is_some())
        .flat_map(|(i, l)| {
            let d = l.d_in_h();
            let blocks = d.div_ceil(BLOCK);
            let w = d.div_ceil(blocks);
            (0..blocks).map(move |b| (i, b * w, w.min(d - b * w)))
        })
        .collect();
    let cost = |&(i, _, w): &(usize, usize, usize)| (tracked[i].d_out * w) as f64;
    let parts: Vec<Vec<f64>> = largest_first(tasks.clone(), cost, |(i, j0, w)| {
        let (l, LayerQueries::Full(stack)) = (&tracked[i], &queries[i]) else {
            unreachable!("tasks are made for full-rank layers only")
        };
        let a = homogeneous[i].as_ref().expect("made for full-rank layers");
        let g = linalg::rows(&taps.layers[i].g, n, l.d_out);
        let qs = linalg::columns(stack);
        let mut out = vec![0f64; n_seq * qs.len()];
        linalg::sequence_block_dots(g, a.as_ref(), &offsets, (j0, w), &qs, &mut out);
        out
    });
    tracked
        .iter()
        .enumerate()
        .map(|(i, l)| match &queries[i] {
            LayerQueries::Full(stack) => {
                let nq = stack.ncols();
                let mut sum = vec![0f64; n_seq * nq];
                for (_, part) in tasks.iter().zip(&parts).filter(|(t, _)| t.0 == i) {
                    for (s, p) in sum.iter_mut().zip(part) {
                        *s += p;
                    }
                }
                Mat::from_fn(nq, n_seq, |q, s| sum[s * nq + q] as f32)
            }
            LayerQueries::LowRank { .. } => layer_scores(l, i, &queries[i], taps),
        })
        .collect()
}

/// Scores of one layer for a batch of training sequences: `[n_queries, n_seq]`.
pub fn layer_scores(
    layer: &TrackedLayer,
    index: usize,
    queries: &LayerQueries,
    taps: &TapBatch,
) -> Mat<f32> {
    match queries {
        LayerQueries::Full(stack) => {
            let grads = sequence_gradients(layer, taps, index);
            linalg::dots(stack, &grads)
        }
        LayerQueries::LowRank { .. } => {
            let tokens = layer_token_scores(layer, index, queries, taps);
            let offsets = taps.offsets();
            Mat::from_fn(tokens.ncols(), taps.seq_lens.len(), |q, n| {
                (offsets[n]..offsets[n + 1]).map(|t| tokens[(t, q)]).sum()
            })
        }
    }
}

/// Per-token parts of one layer's scores, `[n_tokens, n_queries]`: `g_tᵀ P_q ā_t`. Summed
/// over a sequence's tokens they give [`layer_scores`] exactly (same representation of P_q).
pub fn layer_token_scores(
    layer: &TrackedLayer,
    index: usize,
    queries: &LayerQueries,
    taps: &TapBatch,
) -> Mat<f32> {
    let n = taps.seq_lens.iter().sum();
    let tap = &taps.layers[index];
    let a = linalg::homogeneous(&tap.a, n, layer.d_in, layer.has_bias);
    let g = linalg::rows(&tap.g, n, layer.d_out);
    match queries {
        LayerQueries::Full(stack) => {
            let n_q = stack.ncols();
            let mut out = Mat::<f32>::zeros(n, n_q);
            for q in 0..n_q {
                let p = column_as_matrix(stack, q, layer.d_out, layer.d_in_h());
                let ap = linalg::mul(a.as_ref(), p.transpose());
                for t in 0..n {
                    out[(t, q)] = (0..layer.d_out).map(|o| ap[(t, o)] * g[(t, o)]).sum();
                }
            }
            out
        }
        LayerQueries::LowRank { u, v, rank } => {
            let gu = linalg::mul(g, u.as_ref());
            let av = linalg::mul(a.as_ref(), v.as_ref());
            let n_q = u.ncols() / rank;
            // Column sweeps over contiguous memory: out[:, q] = Σ_{r ∈ q's block} gu[:, r] ∘ av[:, r].
            let mut out = Mat::<f32>::zeros(n, n_q);
            for q in 0..n_q {
                let dst = out
                    .col_mut(q)
                    .try_as_col_major_mut()
                    .expect("owned column")
                    .as_slice_mut();
                for r in q * rank..(q + 1) * rank {
                    let g = gu
                        .col(r)
                        .try_as_col_major()
                        .expect("owned column")
                        .as_slice();
                    let a = av
                        .col(r)
                        .try_as_col_major()
                        .expect("owned column")
                        .as_slice();
                    for ((d, x), y) in dst.iter_mut().zip(g).zip(a) {
                        *d += x * y;
                    }
                }
            }
            out
        }
    }
}

/// `⟨P_z, G_z⟩` summed over layers for each sequence of a batch: each training sequence's
/// influence on its own loss (also its squared norm in the inverse-Fisher metric).
pub fn batch_self_influence(
    tracked: &[TrackedLayer],
    preconditioner: &Preconditioner,
    taps: &TapBatch,
) -> Vec<f64> {
    let mut out = vec![0f64; taps.seq_lens.len()];
    for (index, l) in tracked.iter().enumerate() {
        let rotated = preconditioner.basis_gradients(index, l, taps);
        for (k, o) in out.iter_mut().enumerate() {
            let r = column_as_matrix(&rotated, k, l.d_out, l.d_in_h());
            *o += preconditioner.self_influence_in_store_basis(index, r);
        }
    }
    out
}

/// Dense influence scores `[n_queries][n_train]` (f64 accumulation over layers), in memory.
/// For tests and small corpora; `infl score` streams through [`crate::results`] instead.
pub fn score_dense(
    model: &dyn TapModel,
    queries: &PreconditionedQueries,
    train: &[Sequence],
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f64>>> {
    let tracked = model.tracked();
    let mut scores = vec![vec![0f64; train.len()]; queries.len()];
    for_each_batch(
        model,
        train,
        batch_size,
        Labels::Data,
        progress,
        "scoring pass",
        |start, taps| {
            let parts = batch_scores(tracked, &queries.per_layer, taps);
            for part in parts {
                for (q, row) in scores.iter_mut().enumerate() {
                    for k in 0..part.ncols() {
                        row[start + k] += part[(q, k)] as f64;
                    }
                }
            }
            Ok(())
        },
    )?;
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvature::LayerFactors;
    use crate::model::TrackedLayer;

    fn layer_with(lambda: Mat<f32>) -> LayerFactors {
        LayerFactors {
            layer: TrackedLayer {
                name: "expert".into(),
                d_in: lambda.ncols(),
                d_out: lambda.nrows(),
                has_bias: false,
            },
            n_tokens: 0,
            n_sequences: 0,
            covariance: None,
            eigen: None,
            lambda: Some(lambda),
        }
    }

    #[test]
    fn a_layer_the_fit_never_reached_gets_a_finite_heuristic_damping() {
        // Λ = 0 (an expert no token was routed to): 0.1 · mean Λ would be 0 and 1/(Λ + λ)
        // infinite; λ = 1 instead.
        let zero = layer_with(Mat::zeros(2, 3));
        let (_, lam) =
            LayerPreconditioner::new(Strategy::Diagonal, zero, Damping::Heuristic).unwrap();
        assert_eq!(lam, 1.0);
        // Any other layer keeps 0.1 · mean Λ.
        let seen = layer_with(Mat::from_fn(2, 3, |i, j| (i + j) as f32));
        let (_, lam) =
            LayerPreconditioner::new(Strategy::Diagonal, seen, Damping::Heuristic).unwrap();
        assert!((lam - 0.1 * 9.0 / 6.0).abs() < 1e-12);
    }
}
