//! [`super::batch_scores`] on the device the model runs on (a GPU with `--device cuda`): the
//! preconditioned queries uploaded once per scoring pass, each batch's taps uploaded, and each
//! layer's `[n_queries, n_seq]` scores brought back.
//!
//! - Full rank: every sequence's gradient transposed, `ā_sᵀ g_s` (`d_in_h × d_out`), whose
//!   row-major flattening is the column-major `vec(G_s)` the queries are stored in, as one
//!   batched product over the zero-padded sequences; then one product with the query stack.
//! - Rank k: `(g U) ∘ (ā V)` per token, summed over each query's k columns and then over each
//!   sequence's tokens (a product with a 0/1 sequence-membership matrix).
//!
//! - Self-influence: see [`DeviceSelfInfluence`].
//!
//! The same code runs on candle's CPU device, which is how it is tested against the CPU path.

use super::LayerQueries;
use crate::curvature::device::{rotate, sequence_products, tokens, upload};
use crate::error::Result;
use crate::model::{TapBatch, TrackedLayer};
use candle_core::{Device, Tensor};
use faer::Mat;

enum DeviceQueries {
    /// `[d_out·d_in_h, n_q]`.
    Full(Tensor),
    /// `u` `[d_out, n_q·k]`, `v` `[d_in_h, n_q·k]`.
    LowRank { u: Tensor, v: Tensor, rank: usize },
}

/// Per scoring pass: the device and every layer's preconditioned queries there.
pub struct DeviceScorer {
    device: Device,
    queries: Vec<DeviceQueries>,
    n_queries: usize,
}

impl DeviceScorer {
    pub fn new(device: Device, queries: &[LayerQueries], n_queries: usize) -> Result<Self> {
        let queries = queries
            .iter()
            .map(|q| {
                Ok(match q {
                    LayerQueries::Full(stack) => DeviceQueries::Full(upload(stack, &device)?),
                    LayerQueries::LowRank { u, v, rank } => DeviceQueries::LowRank {
                        u: upload(u, &device)?,
                        v: upload(v, &device)?,
                        rank: *rank,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(DeviceScorer {
            device,
            queries,
            n_queries,
        })
    }

    /// Each layer's scores of one batch, `[n_queries, n_seq]`, as [`super::batch_scores`].
    pub fn batch_scores(&self, tracked: &[TrackedLayer], taps: &TapBatch) -> Result<Vec<Mat<f32>>> {
        let (lens, offsets) = (&taps.seq_lens, taps.offsets());
        let n = offsets[offsets.len() - 1];
        let (nq, n_seq) = (self.n_queries, lens.len());
        if n == 0 {
            return Ok(tracked.iter().map(|_| Mat::zeros(nq, n_seq)).collect());
        }
        // Row s has ones at sequence s's tokens.
        let membership: Vec<f32> = offsets
            .windows(2)
            .flat_map(|w| (0..n).map(move |t| f32::from(u8::from((w[0]..w[1]).contains(&t)))))
            .collect();
        let membership = Tensor::from_vec(membership, (n_seq, n), &self.device)?;
        let mut out = Vec::with_capacity(tracked.len());
        for ((l, tap), q) in tracked.iter().zip(&taps.layers).zip(&self.queries) {
            let a = tokens(&tap.a, (n, l.d_in), l.has_bias, &self.device)?;
            let g = tokens(&tap.g, (n, l.d_out), false, &self.device)?;
            let scores = match q {
                DeviceQueries::Full(stack) => sequence_products(&a, &g, lens)?
                    .reshape((n_seq, l.d_in_h() * l.d_out))?
                    .matmul(stack)?,
                DeviceQueries::LowRank { u, v, rank } => {
                    let per_token = (g.matmul(u)? * a.matmul(v)?)?
                        .reshape((n, nq, *rank))?
                        .sum(2)?;
                    membership.matmul(&per_token)?
                }
            };
            let v = scores.flatten_all()?.to_vec1::<f32>()?;
            out.push(Mat::from_fn(nq, n_seq, |q, s| v[s * nq + q]));
        }
        Ok(out)
    }
}

/// [`super::batch_self_influence`] on the device: per layer, every sequence's gradient in the
/// preconditioner's basis, `R_s = (g Q_S)ᵀ (ā Q_A)` (`G_s` itself without an eigenbasis), as one
/// batched product, then `Σ R_s² ⊘ (Λ + λ)` in f64.
pub struct DeviceSelfInfluence {
    device: Device,
    layers: Vec<PreconditionerOnDevice>,
}

/// One layer's preconditioner on the device.
struct PreconditionerOnDevice {
    /// `(Q_S, Q_A)` for an eigenbasis (EK-FAC, KFAC).
    basis: Option<(Tensor, Tensor)>,
    /// `1 ⊘ (Λ + λ)` in f64; `None` for identity.
    inverse: Option<Tensor>,
}

impl DeviceSelfInfluence {
    pub fn new(device: Device, preconditioner: &super::Preconditioner) -> Result<Self> {
        use super::LayerPreconditioner as P;
        let layers = preconditioner
            .layers
            .iter()
            .map(|l| {
                let inverse = |m: &Mat<f32>| -> Result<Tensor> {
                    Ok(upload(m, &device)?.to_dtype(candle_core::DType::F64)?)
                };
                Ok(match l {
                    P::Eigen {
                        q_a,
                        q_s,
                        inverse: inv,
                    } => PreconditionerOnDevice {
                        basis: Some((upload(q_s, &device)?, upload(q_a, &device)?)),
                        inverse: Some(inverse(inv)?),
                    },
                    P::Diagonal { inverse: inv } => PreconditionerOnDevice {
                        basis: None,
                        inverse: Some(inverse(inv)?),
                    },
                    P::Identity => PreconditionerOnDevice {
                        basis: None,
                        inverse: None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(DeviceSelfInfluence { device, layers })
    }

    /// `⟨P_z, G_z⟩` summed over layers for each sequence of the batch.
    pub fn batch(&self, tracked: &[TrackedLayer], taps: &TapBatch) -> Result<Vec<f64>> {
        let lens = &taps.seq_lens;
        let n: usize = lens.iter().sum();
        let mut out = vec![0f64; lens.len()];
        if n == 0 {
            return Ok(out);
        }
        for ((l, tap), p) in tracked.iter().zip(&taps.layers).zip(&self.layers) {
            let a = tokens(&tap.a, (n, l.d_in), l.has_bias, &self.device)?;
            let g = tokens(&tap.g, (n, l.d_out), false, &self.device)?;
            let (g, a) = rotate(g, a, p.basis.as_ref())?;
            let squares = sequence_products(&g, &a, lens)?
                .to_dtype(candle_core::DType::F64)?
                .sqr()?;
            let weighted = match &p.inverse {
                Some(inv) => squares.broadcast_mul(inv)?,
                None => squares,
            };
            let per_sequence = weighted.sum((1, 2))?.to_vec1::<f64>()?;
            for (o, v) in out.iter_mut().zip(per_sequence) {
                *o += v;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvature::device::tests::random_taps;
    use crate::influence::batch_scores;
    use rand::{Rng, SeedableRng};

    /// Tracked layers of these `(d_in, d_out, has_bias)`.
    fn layers(shapes: &[(usize, usize, bool)]) -> Vec<TrackedLayer> {
        shapes
            .iter()
            .map(|&(d_in, d_out, has_bias)| TrackedLayer {
                name: format!("l{d_in}"),
                d_in,
                d_out,
                has_bias,
            })
            .collect()
    }

    /// Full-rank and rank-2 queries over three layers (with and without a bias), sequences of
    /// unequal lengths, one of a single token: the device scores are the CPU path's.
    #[test]
    fn device_scores_are_the_cpu_scores() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut draw =
            |k: usize| -> Vec<f32> { (0..k).map(|_| rng.random_range(-1f32..1.0)).collect() };
        let tracked = layers(&[(6, 5, true), (3, 8, false), (4, 4, true)]);
        let lens = vec![4, 1, 6];
        let taps = random_taps(&tracked, &lens, 5);
        let nq = 3;
        let mut mat = |r: usize, c: usize| {
            let v = draw(r * c);
            Mat::from_fn(r, c, |i, j| v[i * c + j])
        };
        let queries = vec![
            LayerQueries::Full(mat(tracked[0].d_out * tracked[0].d_in_h(), nq)),
            LayerQueries::LowRank {
                u: mat(tracked[1].d_out, nq * 2),
                v: mat(tracked[1].d_in_h(), nq * 2),
                rank: 2,
            },
            LayerQueries::Full(mat(tracked[2].d_out * tracked[2].d_in_h(), nq)),
        ];
        let host = batch_scores(&tracked, &queries, &taps);
        let scorer = DeviceScorer::new(Device::Cpu, &queries, nq).unwrap();
        let device = scorer.batch_scores(&tracked, &taps).unwrap();
        for (x, y) in host.iter().zip(&device) {
            assert_eq!((x.nrows(), x.ncols()), (nq, lens.len()));
            assert_eq!((y.nrows(), y.ncols()), (nq, lens.len()));
            for q in 0..nq {
                for s in 0..lens.len() {
                    let (a, b) = (x[(q, s)], y[(q, s)]);
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                        "({q}, {s}): {a} vs {b}"
                    );
                }
            }
        }
    }

    /// EK-FAC, diagonal and identity preconditioners fitted on random taps: the device's
    /// self-influence of a batch is the CPU path's.
    #[test]
    fn device_self_influence_is_the_cpu_one() {
        use crate::curvature::{
            accumulate, eigendecompose, empty_factors, set_lambda, Factors, Pass, PassSums,
            Strategy,
        };
        use crate::influence::{batch_self_influence, Damping, Preconditioner};
        let tracked = layers(&[(6, 5, true), (3, 8, false)]);
        let fit = random_taps(&tracked, &[7, 3, 9, 5], 8);
        let mut cov = PassSums::zeros(Pass::Covariance, &tracked);
        accumulate(&mut cov, &tracked, &[], &fit);
        let eigen = eigendecompose(&tracked, cov, &crate::pass::Silent).unwrap();
        let lambda = |bases: &[Option<&crate::curvature::Eigenbasis>]| {
            let mut sums = PassSums::zeros(Pass::Eigenvalue, &tracked);
            accumulate(&mut sums, &tracked, bases, &fit);
            sums
        };
        let mut ekfac = eigen.clone();
        let bases: Vec<_> = eigen.iter().map(|f| f.eigen.as_ref()).collect();
        set_lambda(&mut ekfac, &lambda(&bases));
        let mut diagonal = empty_factors(&tracked, 0, 0);
        set_lambda(&mut diagonal, &lambda(&[None, None]));
        let batch = random_taps(&tracked, &[4, 1, 6], 9);
        for (strategy, layers) in [
            (Strategy::Ekfac, ekfac),
            (Strategy::Diagonal, diagonal),
            (Strategy::Identity, empty_factors(&tracked, 0, 0)),
        ] {
            let factors = Factors { strategy, layers };
            let p = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
            let host = batch_self_influence(&tracked, &p, &batch);
            let device = DeviceSelfInfluence::new(Device::Cpu, &p)
                .unwrap()
                .batch(&tracked, &batch)
                .unwrap();
            for (a, b) in host.iter().zip(&device) {
                assert!(*a > 0.0);
                assert!((a - b).abs() <= 1e-5 * a.abs(), "{strategy:?}: {a} vs {b}");
            }
        }
    }
}
