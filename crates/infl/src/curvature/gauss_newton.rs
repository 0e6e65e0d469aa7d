//! Exact Gauss-Newton-vector products on the tracked layers: `G v = Σ_positions Jᵀ H J v`,
//! with J the Jacobian of the logits with respect to the tracked layers' weights (bias last, as
//! the factors lay them out) and `H = diag(p) − ppᵀ` the softmax cross-entropy's Hessian in
//! the logits, at every position whose prediction enters the loss.
//!
//! `J v` is a forward-mode tangent pass on the autograd reference (candle 0.11 detaches the
//! gradients it builds, so a double backward is not available): each op of the forward carries
//! its tangent (linear `dy = dx W + x V + v_b`, layer norm, GELU, softmax attention linearised).
//! `Jᵀ(H J v)` is the ordinary backward of `Σ logits ⊙ u` through the tapped forward. GPT-2
//! only for now; other architectures are refused with [`Error::Input`].
//!
//! This is the expectation over the Fisher's sampled labels of `vec(G_z) vec(G_z)ᵀ`, the
//! per-sequence product whose mean over sequences is EK-FAC's Λ: [`GaussNewton::product`]
//! returns the **sum** over a batch's sequences; divide by their number for Λ's scale.

use crate::error::{Error, Result};
use crate::model::autograd::{self, Autograd, LayerNorm};
use crate::model::gpt2::Gpt2;
use crate::model::{AnyModel, TokenBatch, TrackedLayer};
use candle_core::{Tensor, D};
use faer::Mat;

/// A value and its tangent.
struct Dual {
    x: Tensor,
    dx: Tensor,
}

impl Dual {
    fn add(&self, o: &Dual) -> candle_core::Result<Dual> {
        Ok(Dual {
            x: (&self.x + &o.x)?,
            dx: (&self.dx + &o.dx)?,
        })
    }

    /// `y = (x − μ)/σ · w + b`: `dy = (dc − n·mean(n ⊙ dc))/σ · w` with `c = x − μ`, `n = c/σ`.
    fn layer_norm(&self, ln: &LayerNorm) -> candle_core::Result<Dual> {
        let mean = self.x.mean_keepdim(D::Minus1)?;
        let c = self.x.broadcast_sub(&mean)?;
        let sigma = (c.sqr()?.mean_keepdim(D::Minus1)? + ln.eps)?.sqrt()?;
        let n = c.broadcast_div(&sigma)?;
        let dc = self.dx.broadcast_sub(&self.dx.mean_keepdim(D::Minus1)?)?;
        let proj = (&n * &dc)?.mean_keepdim(D::Minus1)?;
        let dn = dc.sub(&n.broadcast_mul(&proj)?)?.broadcast_div(&sigma)?;
        Ok(Dual {
            x: n.broadcast_mul(&ln.weight)?.broadcast_add(&ln.bias)?,
            dx: dn.broadcast_mul(&ln.weight)?,
        })
    }

    /// GPT-2's activations by config name, with their derivatives.
    fn activation(&self, name: &str) -> candle_core::Result<Dual> {
        let x = &self.x;
        let (y, slope) = match name {
            "relu" => (x.relu()?, x.ge(0f32)?.to_dtype(x.dtype())?),
            // x Φ(x): slope Φ(x) + x φ(x).
            "gelu" => {
                let cdf = (((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?;
                let pdf = ((x.sqr()? * -0.5)?.exp()? * (0.5 / std::f64::consts::PI).sqrt())?;
                ((x * &cdf)?, (cdf + (x * pdf)?)?)
            }
            // 0.5 x (1 + tanh u), u = c (x + 0.044715 x³):
            // slope 0.5 (1 + tanh u) + 0.5 x (1 − tanh² u) c (1 + 3·0.044715 x²).
            _ => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let th = ((x + ((x.sqr()? * x)? * 0.044715)?)? * c)?.tanh()?;
                let half = ((&th + 1.0)? * 0.5)?;
                let du = (((x.sqr()? * (3.0 * 0.044715))? + 1.0)? * c)?;
                let sech2 = (th.sqr()?.neg()? + 1.0)?;
                let slope = (&half + ((x * 0.5)? * (sech2 * du)?)?)?;
                ((x * &half)?, slope)
            }
        };
        Ok(Dual {
            x: y,
            dx: (&self.dx * slope)?,
        })
    }
}

/// Causal softmax attention and its tangent; `q`, `k`, `v` are `[b, h, t, hd]`; returns
/// `[b·t, h·hd]` like [`autograd::attention`]. `dP = P ⊙ (dS − Σ P ⊙ dS)`.
fn attention(q: &Dual, k: &Dual, v: &Dual, mask: &Tensor, scale: f64) -> candle_core::Result<Dual> {
    let (b, h, t, hd) = q.x.dims4()?;
    let kt = k.x.t()?.contiguous()?;
    let scores = (q.x.matmul(&kt)? * scale)?.broadcast_add(mask)?;
    let dscores = ((q.dx.matmul(&kt)? + q.x.matmul(&k.dx.t()?.contiguous()?)?)? * scale)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let pd = (&p * &dscores)?;
    let dp = (&pd - p.broadcast_mul(&pd.sum_keepdim(D::Minus1)?)?)?;
    let out = p.matmul(&v.x)?;
    let dout = (dp.matmul(&v.x)? + p.matmul(&v.dx)?)?;
    let heads = |x: Tensor| x.transpose(1, 2)?.contiguous()?.reshape((b * t, h * hd));
    Ok(Dual {
        x: heads(out)?,
        dx: heads(dout)?,
    })
}

/// The tangent direction of one tracked layer, as candle tensors: `w` is `[d_out, d_in]`,
/// `b` the bias column `[d_out]` (absent without a bias).
struct Direction {
    w: Tensor,
    b: Option<Tensor>,
}

/// Exact Gauss-Newton-vector products of a model on the autograd reference.
pub struct GaussNewton {
    model: Gpt2,
    /// For each of the caller's layers, its index among the model's tracked layers.
    layers: Vec<usize>,
    tracked: Vec<TrackedLayer>,
}

impl GaussNewton {
    /// Products on `tracked` (the caller's layers, matched to the model's by name; the other
    /// layers of the model are held fixed).
    pub fn new(model: AnyModel, tracked: &[TrackedLayer]) -> Result<Self> {
        let AnyModel::Gpt2(model) = model else {
            return Err(Error::input(
                "the refined inverse (exact Gauss-Newton products) supports GPT-2 checkpoints \
                 only for now",
            ));
        };
        let own = model.spec().tracked;
        let layers = tracked
            .iter()
            .map(|l| {
                own.iter()
                    .position(|m| m.name == l.name && m.d_in == l.d_in && m.d_out == l.d_out)
                    .ok_or_else(|| {
                        Error::Mismatch(format!(
                            "layer {} is not a tracked layer of the model",
                            l.name
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GaussNewton {
            model,
            layers,
            tracked: tracked.to_vec(),
        })
    }

    pub fn tracked(&self) -> &[TrackedLayer] {
        &self.tracked
    }

    /// `Σ_{z ∈ batch} Σ_{t: loss position} J_tᵀ (diag p_t − p_t p_tᵀ) J_t v`, per layer
    /// (`d_out × d_in_h`, bias last). `v` holds one matrix per caller's layer.
    pub fn product(&self, batch: &TokenBatch, v: &[Mat<f32>]) -> Result<Vec<Mat<f32>>> {
        let (logits, dlogits) = self.jvp(batch, v)?;
        let u = output_hessian(&logits, &dlogits, batch, self.model.config.vocab_size);
        self.vjp(batch, u)
    }

    /// The logits `[b, t, vocab]` and their tangent `J v`, flattened row-major.
    pub(crate) fn jvp(&self, batch: &TokenBatch, v: &[Mat<f32>]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n_own = self.model.spec().tracked.len();
        let mut directions: Vec<Option<Direction>> = (0..n_own).map(|_| None).collect();
        for ((l, &own), m) in self.tracked.iter().zip(&self.layers).zip(v) {
            directions[own] = Some(direction(l, m, &self.model.device)?);
        }
        let (z, dz) = gpt2_tangent(&self.model, &batch.ids, batch.max_len(), &directions)?;
        Ok((
            z.flatten_all()?.to_vec1::<f32>()?,
            dz.flatten_all()?.to_vec1::<f32>()?,
        ))
    }

    /// `Jᵀ u` per caller's layer for an output gradient `u` (`[b, t, vocab]`, row-major): the
    /// backward of `Σ logits ⊙ u`, summed over the batch's positions.
    pub(crate) fn vjp(&self, batch: &TokenBatch, u: Vec<f32>) -> Result<Vec<Mat<f32>>> {
        let t = batch.max_len();
        let rows = batch.len() * t;
        let probes = self.model.zero_probes(rows)?;
        let probe_tensors: Vec<Tensor> = probes.iter().map(|p| p.as_tensor().clone()).collect();
        let fwd = self.model.tapped_forward(&batch.ids, t, &probe_tensors)?;
        let u = Tensor::from_vec(u, fwd.logits.shape(), fwd.logits.device())?;
        let grads = (&fwd.logits * &u)?.sum_all()?.backward()?;
        let mut out = Vec::with_capacity(self.layers.len());
        for (l, &own) in self.tracked.iter().zip(&self.layers) {
            let g = grads.get(&probes[own]).ok_or_else(|| {
                Error::Other(format!("internal: no gradient reached layer {}", l.name))
            })?;
            let a = &fwd.inputs[own];
            let a = if l.has_bias {
                Tensor::cat(&[a, &a.ones_like()?.narrow(1, 0, 1)?], 1)?
            } else {
                a.clone()
            };
            // Σ_rows g_r ā_rᵀ: [d_out, rows] × [rows, d_in_h].
            let w = g.t()?.contiguous()?.matmul(&a.contiguous()?)?;
            let flat = w.flatten_all()?.to_vec1::<f32>()?;
            let d_i = l.d_in_h();
            out.push(Mat::from_fn(l.d_out, d_i, |i, j| flat[i * d_i + j]));
        }
        Ok(out)
    }
}

/// `u_t = H_t dz_t = p_t ⊙ (dz_t − p_tᵀ dz_t)` at every loss position, 0 elsewhere; in f64.
fn output_hessian(logits: &[f32], dlogits: &[f32], batch: &TokenBatch, vocab: usize) -> Vec<f32> {
    let t_max = batch.max_len();
    let mut u = vec![0f32; logits.len()];
    for (b, positions) in batch.loss_positions.iter().enumerate() {
        for (t, _) in positions.iter().enumerate().filter(|(_, on)| **on) {
            let at = (b * t_max + t) * vocab;
            let (z, dz) = (&logits[at..at + vocab], &dlogits[at..at + vocab]);
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let e: Vec<f64> = z.iter().map(|&x| (x as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let pdz: f64 = e.iter().zip(dz).map(|(p, d)| p / sum * *d as f64).sum();
            for ((out, p), d) in u[at..at + vocab].iter_mut().zip(&e).zip(dz) {
                *out = (p / sum * (*d as f64 - pdz)) as f32;
            }
        }
    }
    u
}

/// Layer `l`'s direction `m` (`d_out × d_in_h`) as tensors on `device`.
fn direction(l: &TrackedLayer, m: &Mat<f32>, device: &candle_core::Device) -> Result<Direction> {
    if m.nrows() != l.d_out || m.ncols() != l.d_in_h() {
        return Err(Error::Other(format!(
            "internal: direction of layer {} is {}×{}, not {}×{}",
            l.name,
            m.nrows(),
            m.ncols(),
            l.d_out,
            l.d_in_h()
        )));
    }
    let w: Vec<f32> = (0..l.d_out)
        .flat_map(|i| (0..l.d_in).map(move |j| m[(i, j)]))
        .collect();
    let b = l
        .has_bias
        .then(|| {
            let col: Vec<f32> = (0..l.d_out).map(|i| m[(i, l.d_in)]).collect();
            Tensor::from_vec(col, l.d_out, device)
        })
        .transpose()?;
    Ok(Direction {
        w: Tensor::from_vec(w, (l.d_out, l.d_in), device)?,
        b,
    })
}

/// GPT-2's forward ([`Gpt2::forward`]) carrying tangents: returns the logits and `J v`, both
/// `[b, t, vocab]`. `directions[i]` is tracked layer i's weight direction (none: held fixed).
fn gpt2_tangent(
    model: &Gpt2,
    ids: &[Vec<u32>],
    t: usize,
    directions: &[Option<Direction>],
) -> candle_core::Result<(Tensor, Tensor)> {
    let cfg = &model.config;
    let (b, d, h) = (ids.len(), cfg.n_embd, cfg.n_head);
    let hd = d / h;
    let device = &model.device;
    let ids_t = autograd::padded_ids(ids, t, device)?;
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let pos_t = Tensor::from_vec(pos, b * t, device)?;
    let x0 = (model.wte.index_select(&ids_t, 0)? + model.wpe.index_select(&pos_t, 0)?)?;
    let mut x = Dual {
        dx: x0.zeros_like()?,
        x: x0,
    };
    let mask = autograd::causal_mask(t, None, device)?;
    let scale = if cfg.scale_attn_weights {
        1.0 / (hd as f64).sqrt()
    } else {
        1.0
    };
    let linear = |layer: &crate::model::gpt2::Conv1D, a: &Dual| -> candle_core::Result<Dual> {
        let y = a.x.matmul(&layer.weight)?.broadcast_add(&layer.bias)?;
        let mut dy = a.dx.matmul(&layer.weight)?;
        if let Some(Some(dir)) = layer.tap.map(|i| &directions[i]) {
            dy = (dy + a.x.matmul(&dir.w.t()?)?)?;
            if let Some(bias) = &dir.b {
                dy = dy.broadcast_add(bias)?;
            }
        }
        Ok(Dual { x: y, dx: dy })
    };
    for block in &model.blocks {
        let hidden = x.layer_norm(&block.ln_1)?;
        let qkv = linear(&block.c_attn, &hidden)?;
        let heads = |m: &Tensor, k: usize| -> candle_core::Result<Tensor> {
            m.reshape((b, t, 3, h, hd))?
                .narrow(2, k, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let part = |k: usize| -> candle_core::Result<Dual> {
            Ok(Dual {
                x: heads(&qkv.x, k)?,
                dx: heads(&qkv.dx, k)?,
            })
        };
        let attn = attention(&part(0)?, &part(1)?, &part(2)?, &mask, scale)?;
        x = x.add(&linear(&block.c_proj, &attn)?)?;
        let hidden = x.layer_norm(&block.ln_2)?;
        let act = linear(&block.c_fc, &hidden)?.activation(&cfg.activation_function)?;
        x = x.add(&linear(&block.mlp_proj, &act)?)?;
    }
    let x = x.layer_norm(&model.ln_f)?;
    let head = model.lm_head.t()?;
    let shape = (b, t, cfg.vocab_size);
    Ok((
        x.x.matmul(&head)?.reshape(shape)?,
        x.dx.matmul(&head)?.reshape(shape)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt2::tests::tiny_config;
    use crate::model::{Labels, ModuleSelection, TapModel};
    use candle_core::Device;

    fn batch() -> TokenBatch {
        TokenBatch::training(&[(0, &[1, 5, 7, 2, 9, 11]), (1, &[3, 4, 22])])
    }

    fn model(activation: &str, seed: u64) -> GaussNewton {
        let mut config = tiny_config();
        config.activation_function = activation.into();
        let m = Gpt2::random(config, seed, ModuleSelection::All).unwrap();
        let tracked = m.spec().tracked.to_vec();
        GaussNewton::new(AnyModel::Gpt2(m), &tracked).unwrap()
    }

    /// A deterministic pseudo-random direction per layer.
    pub(crate) fn random_direction(tracked: &[TrackedLayer], seed: u64) -> Vec<Mat<f32>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        tracked
            .iter()
            .map(|l| Mat::from_fn(l.d_out, l.d_in_h(), |_, _| rng.random::<f32>() - 0.5))
            .collect()
    }

    fn dot(a: &[Mat<f32>], b: &[Mat<f32>]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let mut s = 0f64;
                for j in 0..x.ncols() {
                    for i in 0..x.nrows() {
                        s += x[(i, j)] as f64 * y[(i, j)] as f64;
                    }
                }
                s
            })
            .sum()
    }

    /// The tangent pass's logits are the reference forward's.
    #[test]
    fn tangent_pass_computes_the_reference_logits() {
        let gn = model("gelu_new", 3);
        let b = batch();
        let v = random_direction(gn.tracked(), 1);
        let (z, _) = gn.jvp(&b, &v).unwrap();
        let probes: Vec<Tensor> = gn
            .model
            .zero_probes(b.len() * b.max_len())
            .unwrap()
            .iter()
            .map(|p| p.as_tensor().clone())
            .collect();
        let want = gn
            .model
            .tapped_forward(&b.ids, b.max_len(), &probes)
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = z
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "max |Δ logit| = {worst}");
    }

    /// `J v` against central differences of the logits along the direction, through the
    /// probes: adding `ε ā_i V_iᵀ` to layer i's output has the same derivative at ε = 0 as
    /// moving its weights by `ε V_i`. The smooth activations (ReLU's kinks defeat finite
    /// differences; the adjoint test covers it).
    #[test]
    fn jvp_matches_finite_differences() {
        for activation in ["gelu_new", "gelu"] {
            let gn = model(activation, 5);
            let b = batch();
            let t = b.max_len();
            let rows = b.len() * t;
            let v = random_direction(gn.tracked(), 2);
            let (_, dz) = gn.jvp(&b, &v).unwrap();
            // The tracked layers' inputs at ε = 0.
            let zero: Vec<Tensor> = gn
                .model
                .zero_probes(rows)
                .unwrap()
                .iter()
                .map(|p| p.as_tensor().clone())
                .collect();
            let inputs = gn.model.tapped_forward(&b.ids, t, &zero).unwrap().inputs;
            let logits_at = |eps: f64| -> Vec<f64> {
                let probes: Vec<Tensor> = gn
                    .tracked()
                    .iter()
                    .zip(&v)
                    .zip(&inputs)
                    .map(|((l, m), a)| {
                        let dir = direction(l, m, &Device::Cpu).unwrap();
                        let mut y = a.matmul(&dir.w.t().unwrap()).unwrap();
                        if let Some(bias) = &dir.b {
                            y = y.broadcast_add(bias).unwrap();
                        }
                        (y * eps).unwrap()
                    })
                    .collect();
                let z = gn.model.tapped_forward(&b.ids, t, &probes).unwrap().logits;
                z.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            };
            let central = |h: f64| -> Vec<f64> {
                let (p, m) = (logits_at(h), logits_at(-h));
                p.iter().zip(&m).map(|(a, b)| (a - b) / (2.0 * h)).collect()
            };
            let (c1, c2) = (central(2e-3), central(4e-3));
            let scale = dz.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            assert!(scale > 1e-3, "{activation}: J v is zero");
            for (i, &d) in dz.iter().enumerate() {
                // Padding rows are not compared: their logits see no real token's change.
                let fd = (4.0 * c1[i] - c2[i]) / 3.0;
                assert!(
                    (fd - d as f64).abs() < 2e-3 * scale,
                    "{activation}: entry {i}: tangent {d} vs finite differences {fd}"
                );
            }
        }
    }

    /// The adjoint identity `⟨u, J v⟩ = ⟨Jᵀ u, v⟩`: the tangent pass against the autograd
    /// backward (itself checked against finite differences in the model's tests).
    #[test]
    fn jvp_is_the_adjoint_of_the_backward() {
        for activation in ["gelu_new", "gelu", "relu"] {
            let gn = model(activation, 7);
            let b = batch();
            let v = random_direction(gn.tracked(), 3);
            let (z, dz) = gn.jvp(&b, &v).unwrap();
            let u: Vec<f32> = (0..z.len())
                .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
                .collect();
            let lhs: f64 = u.iter().zip(&dz).map(|(a, b)| *a as f64 * *b as f64).sum();
            let jt_u = gn.vjp(&b, u).unwrap();
            let rhs = dot(&jt_u, &v);
            assert!(
                (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
                "{activation}: ⟨u, Jv⟩ = {lhs}, ⟨Jᵀu, v⟩ = {rhs}"
            );
        }
    }

    /// Against the dense Gauss-Newton `Σ_t J_tᵀ H_t J_t` with J built row by row (one backward
    /// per logit), on two layers of a tiny model; and against the expectation of the sampled
    /// Fisher: for one position, `Σ_c p_c g_c g_cᵀ` with `g_c` the gradient under label c.
    #[test]
    fn product_equals_the_dense_gauss_newton() {
        let gn = model("gelu_new", 11);
        let b = batch();
        let vocab = gn.model.config.vocab_size;
        let t = b.max_len();
        let v = random_direction(gn.tracked(), 4);
        let got = gn.product(&b, &v).unwrap();
        let (z, _) = gn.jvp(&b, &v).unwrap();
        let mut want: Vec<Mat<f32>> = gn
            .tracked()
            .iter()
            .map(|l| Mat::zeros(l.d_out, l.d_in_h()))
            .collect();
        let mut want64: Vec<Vec<f64>> = want
            .iter()
            .map(|m| vec![0.0; m.nrows() * m.ncols()])
            .collect();
        for (s, positions) in b.loss_positions.iter().enumerate() {
            for (pos, _) in positions.iter().enumerate().filter(|(_, on)| **on) {
                let at = (s * t + pos) * vocab;
                // J's rows at this position, one backward each.
                let rows: Vec<Vec<Mat<f32>>> = (0..vocab)
                    .map(|c| {
                        let mut u = vec![0f32; z.len()];
                        u[at + c] = 1.0;
                        gn.vjp(&b, u).unwrap()
                    })
                    .collect();
                let max = z[at..at + vocab].iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
                let e: Vec<f64> = z[at..at + vocab]
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .collect();
                let p: Vec<f64> = e.iter().map(|x| x / e.iter().sum::<f64>()).collect();
                let jv: Vec<f64> = rows.iter().map(|r| dot(r, &v)).collect();
                let pjv: f64 = p.iter().zip(&jv).map(|(a, b)| a * b).sum();
                for c in 0..vocab {
                    let hjv = p[c] * (jv[c] - pjv);
                    for (acc, row) in want64.iter_mut().zip(&rows[c]) {
                        for j in 0..row.ncols() {
                            for i in 0..row.nrows() {
                                acc[i + j * row.nrows()] += row[(i, j)] as f64 * hjv;
                            }
                        }
                    }
                }
            }
        }
        for (m, acc) in want.iter_mut().zip(&want64) {
            let r = m.nrows();
            for j in 0..m.ncols() {
                for i in 0..r {
                    m[(i, j)] = acc[i + j * r] as f32;
                }
            }
        }
        let norm = dot(&want, &want).sqrt();
        let diff: Vec<Mat<f32>> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        let err = dot(&diff, &diff).sqrt();
        assert!(norm > 1e-3, "the product is zero");
        assert!(err < 1e-4 * norm, "‖G v − dense‖ = {err}, ‖dense‖ = {norm}");
        // vᵀ G v ≥ 0: the Gauss-Newton is positive semi-definite.
        assert!(dot(&got, &v) > 0.0);
    }

    /// The GN is the expectation of the sampled-label Fisher: over labels drawn from the model,
    /// the mean of `(gᵀ v)²` tends to `vᵀ G v`. Checked with exact enumeration on a
    /// one-prediction sequence: `Σ_c p_c ⟨G_c, v⟩²` with `G_c` the gradient under label c.
    #[test]
    fn product_is_the_fishers_expectation() {
        let gn = model("gelu_new", 13);
        let seq: &[u32] = &[4, 9];
        let b = TokenBatch::training(&[(0, seq)]);
        let v = random_direction(gn.tracked(), 5);
        let vgv = dot(&gn.product(&b, &v).unwrap(), &v);
        let vocab = gn.model.config.vocab_size;
        let (z, _) = gn.jvp(&b, &v).unwrap();
        let max = z[..vocab].iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
        let e: Vec<f64> = z[..vocab].iter().map(|&x| (x as f64 - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut expect = 0f64;
        for c in 0..vocab as u32 {
            let labelled = TokenBatch::training(&[(0, &[4, c])]);
            let taps = gn.model.taps(&labelled, Labels::Data).unwrap();
            let g: Vec<Mat<f32>> = gn
                .tracked()
                .iter()
                .enumerate()
                .map(|(i, l)| crate::influence::sequence_gradients(l, &taps, i))
                .map(|m| Mat::from_fn(m.nrows(), 1, |i, _| m[(i, 0)]))
                .collect();
            let flat_v: Vec<Mat<f32>> = v
                .iter()
                .map(|m| {
                    Mat::from_fn(m.nrows() * m.ncols(), 1, |k, _| {
                        m[(k % m.nrows(), k / m.nrows())]
                    })
                })
                .collect();
            let gv = dot(&g, &flat_v);
            expect += e[c as usize] / sum * gv * gv;
        }
        assert!(
            (vgv - expect).abs() < 1e-4 * expect.abs(),
            "vᵀGv = {vgv}, E_y[(gᵀv)²] = {expect}"
        );
    }
}
