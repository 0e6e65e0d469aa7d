//! The PBRF [`Problem`] of a GPT-2 checkpoint: the tracked layers' weights and biases are
//! candle `Var`s (every other weight frozen), the Bregman divergence of the softmax
//! cross-entropy is the KL divergence `KL(p_s ‖ p)` between the next-token distributions at
//! θ^s and at θ, summed over a sequence's loss positions and averaged over the N training
//! sequences (the training loss's sum-over-tokens, mean-over-sequences convention, so that its
//! Gauss-Newton is the one EK-FAC's Λ estimates).
//!
//! Each gradient is one pass over the corpus: a forward, the logits' gradient
//! `(p − p_s)/N` (and `−ε (p − onehot(y))` on sequence m's positions) computed in f64, and one
//! backward of `Σ logits ⊙ u` to the `Var`s. The reference log-probabilities `log p_s` are kept
//! for every loss position (f32, `positions × vocab`).

use super::solve::Problem;
use crate::data::Sequence;
use crate::error::{Error, Result};
use crate::model::gpt2::Gpt2;
use crate::model::TrackedLayer;
use candle_core::{Device, Tensor, Var};

/// One batch of training sequences, with the reference log-probabilities of its loss positions.
struct Batch {
    ids: Vec<Vec<u32>>,
    padded_len: usize,
    /// Corpus index of the first sequence.
    first: usize,
    /// Per loss position: (row in the `[b·t, vocab]` logits, sequence in the batch, target).
    rows: Vec<(usize, usize, u32)>,
    /// `log p_s`, `rows.len() × vocab`.
    reference: Vec<f32>,
}

/// The tracked parameters as `Var`s: (weight `[d_in, d_out]`, bias `[d_out]`) per layer.
struct Parameter {
    var: Var,
    base: Vec<f32>,
    shape: Vec<usize>,
    offset: usize,
}

pub struct Gpt2Problem {
    model: Gpt2,
    parameters: Vec<Parameter>,
    damping: Vec<f64>,
    batches: Vec<Batch>,
    n_sequences: usize,
    queries: Vec<(Vec<u32>, Vec<u32>)>,
    vocab: usize,
}

/// `log softmax(z)` in f64.
fn log_softmax(z: &[f32]) -> Vec<f64> {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    z.iter().map(|&x| x as f64 - lse).collect()
}

impl Gpt2Problem {
    /// `model`'s tracked layers become the optimised parameters, layer ℓ's with proximal weight
    /// `lambdas[ℓ]` (in [`Gpt2::spec`]'s tracked order). The reference distributions are computed
    /// here, one forward pass over `train`.
    pub fn new(
        mut model: Gpt2,
        train: &[Sequence],
        queries: Vec<(Vec<u32>, Vec<u32>)>,
        lambdas: &[f64],
        batch_size: usize,
    ) -> Result<Self> {
        let tracked: Vec<TrackedLayer> = model.tracked.clone();
        if lambdas.len() != tracked.len() {
            return Err(Error::Other(format!(
                "internal: {} damping values for {} tracked layers",
                lambdas.len(),
                tracked.len()
            )));
        }
        if train.is_empty() || batch_size == 0 {
            return Err(Error::input(
                "the PBRF needs at least one training sequence and a batch size of at least 1",
            ));
        }
        let mut slots: Vec<Option<[Parameter; 2]>> = (0..tracked.len()).map(|_| None).collect();
        let mut offset = 0;
        for block in &mut model.blocks {
            for conv in [
                &mut block.c_attn,
                &mut block.c_proj,
                &mut block.c_fc,
                &mut block.mlp_proj,
            ] {
                let Some(i) = conv.tap else { continue };
                let mut pair = Vec::with_capacity(2);
                for t in [&mut conv.weight, &mut conv.bias] {
                    let var = Var::from_tensor(t)?;
                    *t = var.as_tensor().clone();
                    let base = t.flatten_all()?.to_vec1::<f32>()?;
                    pair.push(Parameter {
                        var,
                        shape: t.dims().to_vec(),
                        offset,
                        base,
                    });
                    offset += t.elem_count();
                }
                let [w, b]: [Parameter; 2] = pair
                    .try_into()
                    .map_err(|_| Error::Other("internal: two parameters per layer".into()))?;
                slots[i] = Some([w, b]);
            }
        }
        let mut parameters = Vec::with_capacity(2 * tracked.len());
        let mut damping = Vec::with_capacity(offset);
        for (slot, &lam) in slots.into_iter().zip(lambdas) {
            let layer = slot
                .ok_or_else(|| Error::Other("internal: a tracked layer has no weights".into()))?;
            for p in layer {
                damping.extend(std::iter::repeat_n(lam, p.base.len()));
                parameters.push(p);
            }
        }
        let vocab = model.config.vocab_size;
        let mut problem = Gpt2Problem {
            model,
            parameters,
            damping,
            batches: Vec::new(),
            n_sequences: train.len(),
            queries,
            vocab,
        };
        problem.batches = problem.reference_batches(train, batch_size)?;
        Ok(problem)
    }

    /// The corpus in batches of `batch_size`, with `log p_s` at every loss position.
    fn reference_batches(&self, train: &[Sequence], batch_size: usize) -> Result<Vec<Batch>> {
        let v = self.vocab;
        let mut out = Vec::with_capacity(train.len().div_ceil(batch_size));
        for (k, chunk) in train.chunks(batch_size).enumerate() {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|s| s.ids.clone()).collect();
            let t = ids.iter().map(Vec::len).max().unwrap_or(0);
            let rows: Vec<(usize, usize, u32)> = ids
                .iter()
                .enumerate()
                .flat_map(|(b, s)| {
                    s.windows(2)
                        .enumerate()
                        .map(move |(p, w)| (b * t + p, b, w[1]))
                })
                .collect();
            let logits = self.logits(&ids, t)?;
            let mut reference = Vec::with_capacity(rows.len() * v);
            for &(r, _, _) in &rows {
                reference.extend(
                    log_softmax(&logits[r * v..(r + 1) * v])
                        .iter()
                        .map(|&x| x as f32),
                );
            }
            out.push(Batch {
                ids,
                padded_len: t,
                first: k * batch_size,
                rows,
                reference,
            });
        }
        Ok(out)
    }

    fn logits(&self, ids: &[Vec<u32>], t: usize) -> Result<Vec<f32>> {
        let fwd = self.model.forward(ids, t, &[])?;
        Ok(fwd.logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Sets the `Var`s to `θ^s + δ`.
    fn set(&self, delta: &[f64]) -> Result<()> {
        if delta.len() != self.damping.len() {
            return Err(Error::Other(format!(
                "internal: δ has {} entries for {} parameters",
                delta.len(),
                self.damping.len()
            )));
        }
        for p in &self.parameters {
            let d = &delta[p.offset..p.offset + p.base.len()];
            let values: Vec<f32> = p
                .base
                .iter()
                .zip(d)
                .map(|(b, d)| (*b as f64 + d) as f32)
                .collect();
            p.var
                .set(&Tensor::from_vec(values, p.shape.as_slice(), &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// One batch's gradient of the objective in the logits:
    /// `u = (p − p_s)/N` (the gradient of `KL(p_s ‖ p)`), and `−ε (p − onehot(y))` more on
    /// sequence m's positions (the gradient of `−ε L_m`, `L = −log p_y`).
    fn logit_gradient(&self, batch: &Batch, logits: &[f32], m: usize, epsilon: f64) -> Vec<f32> {
        let v = self.vocab;
        let scale = 1.0 / self.n_sequences as f64;
        let mut u = vec![0f32; logits.len()];
        for (k, &(r, b, y)) in batch.rows.iter().enumerate() {
            let reference = &batch.reference[k * v..(k + 1) * v];
            let ls = log_softmax(&logits[r * v..(r + 1) * v]);
            let on_m = batch.first + b == m;
            let row = &mut u[r * v..(r + 1) * v];
            for (c, ((out, &s), l)) in row.iter_mut().zip(reference).zip(&ls).enumerate() {
                let p = l.exp();
                let mut g = scale * (p - (s as f64).exp());
                if on_m {
                    g -= epsilon * (p - f64::from(c == y as usize));
                }
                *out = g as f32;
            }
        }
        u
    }
}

impl Problem for Gpt2Problem {
    fn dim(&self) -> usize {
        self.damping.len()
    }

    fn damping(&self) -> &[f64] {
        &self.damping
    }

    fn gradient(&mut self, delta: &[f64], m: usize, epsilon: f64) -> Result<Vec<f64>> {
        self.set(delta)?;
        let mut grad = vec![0.0; self.dim()];
        for batch in &self.batches {
            let fwd = self.model.forward(&batch.ids, batch.padded_len, &[])?;
            let logits = fwd.logits.flatten_all()?.to_vec1::<f32>()?;
            let u = self.logit_gradient(batch, &logits, m, epsilon);
            let u = Tensor::from_vec(u, fwd.logits.shape(), &Device::Cpu)?;
            let grads = (&fwd.logits * &u)?.sum_all()?.backward()?;
            for p in &self.parameters {
                let Some(g) = grads.get(p.var.as_tensor()) else {
                    continue;
                };
                let g = g.flatten_all()?.to_vec1::<f32>()?;
                for (acc, x) in grad[p.offset..p.offset + g.len()].iter_mut().zip(g) {
                    *acc += x as f64;
                }
            }
        }
        Ok(grad)
    }

    fn measure(&mut self, delta: &[f64]) -> Result<Vec<f64>> {
        self.set(delta)?;
        let pairs: Vec<(&[u32], &[u32])> = self
            .queries
            .iter()
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect();
        crate::train::completion_losses(&self.model, &pairs)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::curvature::gauss_newton::GaussNewton;
    use crate::model::gpt2::tests::tiny_config;
    use crate::model::{AnyModel, ModuleSelection, TapModel, TokenBatch};
    use crate::validate::pbrf::solve::{self, SolveOptions};
    use faer::linalg::solvers::Solve;
    use faer::Mat;

    fn sequences() -> Vec<Sequence> {
        (0..6u32)
            .map(|d| Sequence {
                id: format!("{d}:0"),
                ids: (0..5 + d).map(|t| (d * 5 + t * 3 + t * t) % 23).collect(),
            })
            .collect()
    }

    fn queries() -> Vec<(Vec<u32>, Vec<u32>)> {
        vec![(vec![1, 2, 3], vec![4, 5]), (vec![9], vec![10, 11, 12])]
    }

    /// Per-layer `d_out × d_in_h` matrices as one f64 vector (layer by layer, column-major).
    pub(crate) fn flat(ms: &[Mat<f32>]) -> Vec<f64> {
        ms.iter()
            .flat_map(|m| {
                (0..m.ncols()).flat_map(move |j| (0..m.nrows()).map(move |i| m[(i, j)] as f64))
            })
            .collect()
    }

    pub(crate) fn unflat(v: &[f64], tracked: &[TrackedLayer]) -> Vec<Mat<f32>> {
        let mut at = 0;
        tracked
            .iter()
            .map(|l| {
                let m = Mat::from_fn(l.d_out, l.d_in_h(), |i, j| v[at + i + j * l.d_out] as f32);
                at += l.d_out * l.d_in_h();
                m
            })
            .collect()
    }

    /// The mean Gauss-Newton `(1/n) Σ_z Jᵀ H J` of `train` (n sequences) on `gn`'s layers,
    /// built densely column by column from products, in f64.
    pub(crate) fn dense_gauss_newton(gn: &GaussNewton, train: &TokenBatch, n: usize) -> Mat<f64> {
        let tracked = gn.tracked();
        let d: usize = tracked.iter().map(|l| l.d_out * l.d_in_h()).sum();
        let mut g = Mat::<f64>::zeros(d, d);
        for j in 0..d {
            let mut e = vec![0.0; d];
            e[j] = 1.0;
            let col = flat(&gn.product(train, &unflat(&e, tracked)).unwrap());
            for (i, x) in col.iter().enumerate() {
                g[(i, j)] = x / n as f64;
            }
        }
        g
    }

    /// The gradient of the cross-entropy at `batch`'s loss positions: `Jᵀ (p − onehot(y))`.
    pub(crate) fn loss_gradient(gn: &GaussNewton, batch: &TokenBatch, vocab: usize) -> Vec<f64> {
        let zero: Vec<Mat<f32>> = gn
            .tracked()
            .iter()
            .map(|l| Mat::zeros(l.d_out, l.d_in_h()))
            .collect();
        let (z, _) = gn.jvp(batch, &zero).unwrap();
        let t_max = batch.max_len();
        let mut u = vec![0f32; z.len()];
        for (b, positions) in batch.loss_positions.iter().enumerate() {
            for (t, _) in positions.iter().enumerate().filter(|(_, on)| **on) {
                let at = (b * t_max + t) * vocab;
                let ls = log_softmax(&z[at..at + vocab]);
                let y = batch.ids[b][t + 1] as usize;
                for (c, l) in ls.iter().enumerate() {
                    u[at + c] = (l.exp() - f64::from(c == y)) as f32;
                }
            }
        }
        flat(&gn.vjp(batch, u).unwrap())
    }

    /// The PBRF's first-order response is the damped Gauss-Newton inverse: on a tiny GPT-2,
    /// the optimised PBRF influence equals `∇f_qᵀ (G + Λ)⁻¹ ∇L_m`, G = (1/N) Σ_z Jᵀ H J built
    /// densely from Gauss-Newton products and Λ each layer's λ, solved in f64.
    #[test]
    fn pbrf_influence_is_the_damped_gauss_newton_influence() {
        let (seed, modules) = (7, ModuleSelection::Mlp);
        let config = tiny_config();
        let vocab = config.vocab_size;
        let m = Gpt2::random(config.clone(), seed, modules).unwrap();
        let tracked = m.tracked().to_vec();
        let gn = GaussNewton::new(AnyModel::Gpt2(m), &tracked).unwrap();
        let seqs = sequences();
        let n = seqs.len();
        let refs: Vec<(u64, &[u32])> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.ids.as_slice()))
            .collect();
        let train = TokenBatch::training(&refs);

        // The dense damped Gauss-Newton, λ_ℓ = 0.1·trace(G_ℓℓ)/D_ℓ (the heuristic's scale).
        let dims: Vec<usize> = tracked.iter().map(|l| l.d_out * l.d_in_h()).collect();
        let d: usize = dims.iter().sum();
        let mut g = dense_gauss_newton(&gn, &train, n);
        let mut lambdas = Vec::new();
        let mut at = 0;
        for &dl in &dims {
            let trace: f64 = (at..at + dl).map(|i| g[(i, i)]).sum();
            let lam = 0.1 * trace / dl as f64;
            (at..at + dl).for_each(|i| g[(i, i)] += lam);
            lambdas.push(lam);
            at += dl;
        }
        let lu = g.partial_piv_lu();
        let grads_q: Vec<Vec<f64>> = queries()
            .iter()
            .enumerate()
            .map(|(i, (p, c))| {
                let b = TokenBatch::queries(&[(i as u64, p.as_slice(), c.as_slice())]);
                loss_gradient(&gn, &b, vocab)
            })
            .collect();

        let model = Gpt2::random(config, seed, modules).unwrap();
        let mut problem = Gpt2Problem::new(model, &seqs, queries(), &lambdas, 4).unwrap();
        assert_eq!(problem.dim(), d);
        let base = problem.measure(&vec![0.0; d]).unwrap();
        let options = SolveOptions {
            max_steps: 300,
            tolerance: 1e-6,
            memory: 30,
        };
        for m in [0, 5] {
            let gm = loss_gradient(&gn, &TokenBatch::training(&[refs[m]]), vocab);
            let x = lu.solve(Mat::from_fn(d, 1, |i, _| gm[i]));
            let want: Vec<f64> = grads_q
                .iter()
                .map(|gq| (0..d).map(|i| gq[i] * x[(i, 0)]).sum())
                .collect();
            // ε small enough that the response is linear to 1e-4 (the curvature part is ~1% of
            // the influence at ε = 1e-4 on this strongly curved random model).
            let got = solve::response(&mut problem, m, 1e-4, &options, &base).unwrap();
            for s in [got.plus, got.minus] {
                assert!(s.gradient_norm < 1e-3, "{got:?}");
            }
            let scale = want.iter().fold(0f64, |s, w| s.max(w.abs()));
            for (w, g) in want.iter().zip(&got.influence) {
                assert!(
                    (w - g).abs() < 1e-3 * scale,
                    "sequence {m}: PBRF {g} against (G + λ)⁻¹ {w} (all: {want:?} vs {:?})",
                    got.influence
                );
            }
        }
    }
}
