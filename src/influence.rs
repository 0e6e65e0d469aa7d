//! Influence stage: preconditioned query gradients (the inverse-Hessian-vector products) and
//! their inner products with training gradients.
//!
//! `P_q = Q_S [ (Q_Sᵀ G_q Q_A) ⊘ (Λ + λ) ] Q_Aᵀ` per layer, and
//! `I(q, z) = Σ_ℓ ⟨P_{q,ℓ}, G_{z,ℓ}⟩`. Positive: up-weighting z lowers −log p(completion | prompt).

use crate::curvature::{for_each_batch, Factors, Progress, Strategy};
use crate::data::{Query, Sequence};
use crate::error::{Error, Result};
use crate::linalg;
use crate::model::{Labels, TapBatch, TapModel, TokenBatch, TrackedLayer};
use faer::{Mat, MatRef};

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

/// Applies the damped inverse curvature of every layer.
pub struct Preconditioner {
    layers: Vec<LayerPreconditioner>,
    /// The λ used per layer (0 for identity).
    pub damping: Vec<f64>,
}

impl Preconditioner {
    pub fn new(factors: &Factors, damping: Damping) -> Result<Self> {
        let mut layers = Vec::new();
        let mut used = Vec::new();
        for lf in &factors.layers {
            let (d_o, d_i) = (lf.layer.d_out, lf.layer.d_in_h());
            let missing = |what: &str| {
                Error::Mismatch(format!(
                    "layer {}: the factors hold no {what}",
                    lf.layer.name
                ))
            };
            // Λ in f64, as kronfluence prepares it; the reciprocal is then stored in f32.
            let lambda: Option<Mat<f64>> = match factors.strategy {
                Strategy::Ekfac | Strategy::Diagonal => Some(linalg::to_f64(
                    lf.lambda.as_ref().ok_or_else(|| missing("Λ"))?.as_ref(),
                )),
                Strategy::Kfac => {
                    let e = lf.eigen.as_ref().ok_or_else(|| missing("eigenbasis"))?;
                    Some(Mat::from_fn(d_o, d_i, |o, i| {
                        e.eigvals_s[o] * e.eigvals_a[i]
                    }))
                }
                Strategy::Identity => None,
            };
            let Some(lambda) = lambda else {
                layers.push(LayerPreconditioner::Identity);
                used.push(0.0);
                continue;
            };
            let lam = match damping {
                Damping::Fixed(x) => x,
                Damping::Heuristic => {
                    let mut sum = 0.0;
                    for j in 0..d_i {
                        for i in 0..d_o {
                            sum += lambda[(i, j)];
                        }
                    }
                    0.1 * sum / (d_o * d_i) as f64
                }
            };
            let inverse = Mat::from_fn(d_o, d_i, |i, j| (1.0 / (lambda[(i, j)] + lam)) as f32);
            if (0..d_i).any(|j| (0..d_o).any(|i| !inverse[(i, j)].is_finite())) {
                return Err(Error::NonFinite(format!(
                    "layer {}: Λ + λ has a zero (λ = {lam}); use a positive --damping",
                    lf.layer.name
                )));
            }
            used.push(lam);
            layers.push(match factors.strategy {
                Strategy::Diagonal => LayerPreconditioner::Diagonal { inverse },
                _ => {
                    let e = lf.eigen.as_ref().ok_or_else(|| missing("eigenbasis"))?;
                    LayerPreconditioner::Eigen {
                        q_a: e.q_a.clone(),
                        q_s: e.q_s.clone(),
                        inverse,
                    }
                }
            });
        }
        Ok(Preconditioner {
            layers,
            damping: used,
        })
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
fn sequence_gradients(layer: &TrackedLayer, taps: &TapBatch, index: usize) -> Mat<f32> {
    let offsets = taps.offsets();
    let n = offsets[offsets.len() - 1];
    let tap = &taps.layers[index];
    let a = linalg::homogeneous(&tap.a, n, layer.d_in, layer.has_bias);
    let g = linalg::rows(&tap.g, n, layer.d_out);
    let dim = layer.d_out * layer.d_in_h();
    let n_seq = taps.seq_lens.len();
    let mut buf = vec![0f32; dim * n_seq];
    for (k, w) in offsets.windows(2).enumerate() {
        let (s, e) = (w[0], w[1]);
        let col = &mut buf[k * dim..(k + 1) * dim];
        let dst = faer::MatMut::from_column_major_slice_mut(col, layer.d_out, layer.d_in_h());
        linalg::mul_into(
            dst,
            g.subrows(s, e - s).transpose(),
            a.as_ref().subrows(s, e - s),
            false,
        );
    }
    Mat::from_fn(dim, n_seq, |i, j| buf[j * dim + i])
}

/// Per-query preconditioned gradients, one `n_queries × (d_out·d_in_h)` matrix per layer
/// (row q = column-major vec(P_q)).
pub struct PreconditionedQueries {
    pub per_layer: Vec<Mat<f32>>,
    /// −log p(completion | prompt) of each query.
    pub losses: Vec<f64>,
}

/// Computes and preconditions the measurement gradient of every query.
pub fn precondition_queries(
    model: &dyn TapModel,
    queries: &[Query],
    preconditioner: &Preconditioner,
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<PreconditionedQueries> {
    let tracked = model.tracked();
    let mut per_layer: Vec<Mat<f32>> = tracked
        .iter()
        .map(|l| Mat::zeros(queries.len(), l.d_out * l.d_in_h()))
        .collect();
    let mut losses = Vec::with_capacity(queries.len());
    let total: usize = queries
        .iter()
        .map(|q| q.prompt_ids.len() + q.completion_ids.len())
        .sum();
    progress.begin("query gradients", total as u64);
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
        crate::curvature::check_finite(
            &taps,
            |k| format!("query `{}`", chunk[k].id),
            "query gradients",
        )?;
        losses.extend_from_slice(&taps.losses);
        for (index, l) in tracked.iter().enumerate() {
            let grads = sequence_gradients(l, &taps, index);
            for k in 0..chunk.len() {
                let g = faer::MatRef::from_column_major_slice(
                    grads
                        .col(k)
                        .try_as_col_major()
                        .expect("owned column is contiguous")
                        .as_slice(),
                    l.d_out,
                    l.d_in_h(),
                );
                let p = preconditioner.apply(index, g);
                let row = &mut per_layer[index];
                for j in 0..p.ncols() {
                    for i in 0..p.nrows() {
                        row[(start + k, i + j * p.nrows())] = p[(i, j)];
                    }
                }
            }
        }
        progress.advance(batch.n_tokens() as u64);
    }
    progress.end();
    Ok(PreconditionedQueries { per_layer, losses })
}

/// Dense influence scores `[n_queries][n_train]` (f64 accumulation over layers).
pub fn score_dense(
    model: &dyn TapModel,
    queries: &PreconditionedQueries,
    train: &[Sequence],
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f64>>> {
    let n_q = queries.losses.len();
    let tracked = model.tracked();
    let mut scores = vec![vec![0f64; train.len()]; n_q];
    for_each_batch(
        model,
        train,
        batch_size,
        Labels::Data,
        progress,
        "scoring pass",
        |start, taps| {
            for (index, l) in tracked.iter().enumerate() {
                let grads = sequence_gradients(l, taps, index);
                let part = linalg::mul(queries.per_layer[index].as_ref(), grads.as_ref());
                for (q, row) in scores.iter_mut().enumerate() {
                    for k in 0..grads.ncols() {
                        row[start + k] += part[(q, k)] as f64;
                    }
                }
            }
            Ok(())
        },
    )?;
    Ok(scores)
}
