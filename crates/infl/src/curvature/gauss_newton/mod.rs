//! Exact Gauss-Newton-vector products on the tracked layers: `G v = Σ_positions Jᵀ H J v`,
//! with J the Jacobian of the logits with respect to the tracked layers' weights (bias last, as
//! the factors lay them out) and `H = diag(p) − ppᵀ` the softmax cross-entropy's Hessian in
//! the logits, at every position whose prediction enters the loss.
//!
//! `J v` is a forward-mode tangent pass on the autograd reference (candle 0.11 detaches the
//! gradients it builds, so a double backward is not available): each architecture's forward
//! replayed on dual numbers ([`dual`]; `gpt2.rs`, `gpt_neox.rs`, `llama.rs`), a LoRA adapter's
//! A and B included. `Jᵀ(H J v)` is the ordinary backward of `Σ logits ⊙ u` through the
//! tapped forward. Mixture-of-experts models are refused with [`Error::Input`] (top-k routing
//! is piecewise: a tangent pass would have to replay the routing). Every product checks that
//! the tangent pass reproduced the model's logits and applied every layer's direction, so a
//! forward the pass does not mirror fails loudly instead of returning a wrong product.
//!
//! This is the expectation over the Fisher's sampled labels of `vec(G_z) vec(G_z)ᵀ`, the
//! per-sequence product whose mean over sequences is EK-FAC's Λ: [`GaussNewton::product`]
//! returns the **sum** over a batch's sequences; divide by their number for Λ's scale.

mod dual;
mod gpt2;
mod gpt_neox;
mod llama;

use crate::error::{Error, Result};
use crate::model::autograd::Autograd;
use crate::model::llama::Mlp;
use crate::model::{AnyModel, TokenBatch, TrackedLayer};
use candle_core::Tensor;
use dual::{Direction, Directions, Dual};
use faer::Mat;

/// Whether the products cover models of `architecture` (a config's `model_type`): every one
/// infl loads but the mixtures of experts. [`GaussNewton::new`] checks the model itself.
pub fn covers(architecture: &str) -> bool {
    !matches!(architecture, "mixtral" | "qwen2_moe" | "qwen3_moe")
}

/// Exact Gauss-Newton-vector products of a model on the autograd reference.
pub struct GaussNewton {
    model: AnyModel,
    /// For each of the caller's layers, its index among the model's tracked layers.
    layers: Vec<usize>,
    tracked: Vec<TrackedLayer>,
}

impl GaussNewton {
    /// Products on `tracked` (the caller's layers, matched to the model's by name; the other
    /// layers of the model are held fixed). Refuses the models no tangent pass covers.
    pub fn new(model: AnyModel, tracked: &[TrackedLayer]) -> Result<Self> {
        if let AnyModel::Llama(m) = &model {
            if m.blocks.iter().any(|b| matches!(b.mlp, Mlp::Moe(_))) {
                return Err(Error::input(format!(
                    "ekfac-refined: the exact Gauss-Newton products do not cover \
                     mixture-of-experts blocks (model_type `{}`); fit these layers with \
                     --strategy ekfac",
                    m.config.model_type
                )));
            }
        }
        let own = model_ref(&model).spec().tracked;
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

    fn autograd(&self) -> &dyn Autograd {
        model_ref(&self.model)
    }

    /// `Σ_{z ∈ batch} Σ_{t: loss position} J_tᵀ (diag p_t − p_t p_tᵀ) J_t v`, per layer
    /// (`d_out × d_in_h`, bias last). `v` holds one matrix per caller's layer.
    pub fn product(&self, batch: &TokenBatch, v: &[Mat<f32>]) -> Result<Vec<Mat<f32>>> {
        let mut out = self.products(batch, &[v])?;
        out.pop()
            .ok_or_else(|| Error::Other("internal: no product returned".into()))
    }

    /// [`Self::product`] for several directions at once (`directions[k]`: one matrix per
    /// caller's layer), in direction order. One tangent pass carries every direction and one
    /// reference forward serves every backward, so n directions cost less than n products.
    pub fn products(
        &self,
        batch: &TokenBatch,
        directions: &[&[Mat<f32>]],
    ) -> Result<Vec<Vec<Mat<f32>>>> {
        let (logits, dlogits) = self.jvp_many(batch, directions)?;
        let vocab = self.autograd().spec().vocab;
        let reference = self.reference(batch)?;
        check_logits(&logits, &reference.logits()?)?;
        // One backward per direction through the one forward: a backward over copies of the
        // batch (one per direction) was measured slower, its forward growing with the copies.
        output_hessian(&logits, &dlogits, batch, vocab)
            .into_iter()
            .map(|u| self.pullback(&reference, u))
            .collect()
    }

    /// The logits `[b, t, vocab]` and their tangent `J v`, flattened row-major.
    #[cfg(test)]
    pub(crate) fn jvp(&self, batch: &TokenBatch, v: &[Mat<f32>]) -> Result<(Vec<f32>, Vec<f32>)> {
        self.jvp_many(batch, &[v])
    }

    /// The logits `[b, t, vocab]` and the tangents `J v_k` of every direction after one
    /// another, flattened row-major.
    fn jvp_many(
        &self,
        batch: &TokenBatch,
        directions: &[&[Mat<f32>]],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let spec = self.autograd().spec();
        let mut by_tap: Vec<Option<Direction>> = spec.tracked.iter().map(|_| None).collect();
        for (i, (l, &own)) in self.tracked.iter().zip(&self.layers).enumerate() {
            let per_direction = directions
                .iter()
                .map(|v| {
                    v.get(i).ok_or_else(|| {
                        Error::Other(format!("internal: no direction for layer {}", l.name))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            by_tap[own] = Some(direction(l, &per_direction, spec.device)?);
        }
        let dirs = Directions::new(by_tap, directions.len());
        let (ids, t) = (&batch.ids, batch.max_len());
        let z = match &self.model {
            AnyModel::Gpt2(m) => gpt2::tangent(m, ids, t, &dirs)?,
            AnyModel::GptNeoX(m) => gpt_neox::tangent(m, ids, t, &dirs)?,
            AnyModel::Llama(m) => llama::tangent(m, ids, t, &dirs)?,
        };
        if let Some(i) = dirs.unused() {
            return Err(Error::Other(format!(
                "internal: the tangent pass never applied layer {}'s direction",
                spec.tracked.get(i).map_or("?", |l| l.name.as_str())
            )));
        }
        let Dual { x, dx, .. } = z;
        Ok((
            x.flatten_all()?.to_vec1::<f32>()?,
            dx.flatten_all()?.to_vec1::<f32>()?,
        ))
    }

    /// `Jᵀ u` per caller's layer for an output gradient `u` (`[b, t, vocab]`, row-major): the
    /// backward of `Σ logits ⊙ u`, summed over the batch's positions.
    #[cfg(test)]
    pub(crate) fn vjp(&self, batch: &TokenBatch, u: Vec<f32>) -> Result<Vec<Mat<f32>>> {
        self.pullback(&self.reference(batch)?, u)
    }

    /// The reference forward through zero probes on every tracked layer, whose graph each
    /// [`Self::pullback`] runs backward through.
    fn reference(&self, batch: &TokenBatch) -> Result<Reference> {
        let model = self.autograd();
        let t = batch.max_len();
        let probes = model.zero_probes(batch.len() * t)?;
        let probe_tensors: Vec<Tensor> = probes.iter().map(|p| p.as_tensor().clone()).collect();
        let forward = model.tapped_forward(&batch.ids, t, &probe_tensors)?;
        Ok(Reference { probes, forward })
    }

    /// `Jᵀ u` per caller's layer through `reference`'s graph.
    fn pullback(&self, reference: &Reference, u: Vec<f32>) -> Result<Vec<Mat<f32>>> {
        let fwd = &reference.forward;
        let u = Tensor::from_vec(u, fwd.logits.shape(), fwd.logits.device())?;
        let grads = (&fwd.logits * &u)?.sum_all()?.backward()?;
        let mut out = Vec::with_capacity(self.layers.len());
        for (l, &own) in self.tracked.iter().zip(&self.layers) {
            let g = grads.get(&reference.probes[own]).ok_or_else(|| {
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

/// A tapped forward kept for its graph, and the probes its backwards read gradients from.
struct Reference {
    probes: Vec<candle_core::Var>,
    forward: crate::model::autograd::Forward,
}

impl Reference {
    fn logits(&self) -> Result<Vec<f32>> {
        Ok(self.forward.logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The autograd view of whichever architecture `model` is.
fn model_ref(model: &AnyModel) -> &dyn Autograd {
    match model {
        AnyModel::Gpt2(m) => m,
        AnyModel::GptNeoX(m) => m,
        AnyModel::Llama(m) => m,
    }
}

/// The tangent pass must compute the reference forward's logits (the same ops in the same
/// order, up to rounding): a model feature the pass does not replay shows here.
fn check_logits(tangent: &[f32], reference: &[f32]) -> Result<()> {
    let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
    // A NaN in one pass only is a difference; the same non-finite value in both is not.
    let worst = tangent
        .iter()
        .zip(reference)
        .map(|(a, b)| {
            if a.to_bits() == b.to_bits() {
                0.0
            } else {
                (a - b).abs()
            }
        })
        .fold(0f32, |m, d| if d.is_nan() || d > m { d } else { m });
    if tangent.len() != reference.len() || worst.is_nan() || worst > 1e-3 * scale {
        return Err(Error::Other(format!(
            "internal: the tangent pass's logits differ from the model's by {worst} \
             (it does not mirror this model's forward)"
        )));
    }
    Ok(())
}

/// `u_t = H_t dz_t = p_t ⊙ (dz_t − p_tᵀ dz_t)` at every loss position, 0 elsewhere, in f64,
/// for each direction's tangent `dz` (`dlogits` holds them one after another); the softmax
/// `p_t` is formed once for all of them.
fn output_hessian(
    logits: &[f32],
    dlogits: &[f32],
    batch: &TokenBatch,
    vocab: usize,
) -> Vec<Vec<f32>> {
    let t_max = batch.max_len();
    let tangents: Vec<&[f32]> = dlogits.chunks(logits.len().max(1)).collect();
    let mut u = vec![vec![0f32; logits.len()]; tangents.len()];
    let mut p = vec![0f64; vocab];
    for (b, positions) in batch.loss_positions.iter().enumerate() {
        for (t, _) in positions.iter().enumerate().filter(|(_, on)| **on) {
            let at = (b * t_max + t) * vocab;
            let z = &logits[at..at + vocab];
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            for (p, &x) in p.iter_mut().zip(z) {
                *p = (x as f64 - max).exp();
            }
            let sum: f64 = p.iter().sum();
            p.iter_mut().for_each(|p| *p /= sum);
            for (dz, u) in tangents.iter().zip(u.iter_mut()) {
                let dz = &dz[at..at + vocab];
                let pdz: f64 = p.iter().zip(dz).map(|(p, d)| p * *d as f64).sum();
                for ((out, p), d) in u[at..at + vocab].iter_mut().zip(&p).zip(dz) {
                    *out = (p * (*d as f64 - pdz)) as f32;
                }
            }
        }
    }
    u
}

/// Layer `l`'s directions `m_k` (each `d_out × d_in_h`) as the stacked tensors of a
/// [`Direction`] on `device`.
fn direction(
    l: &TrackedLayer,
    per_direction: &[&Mat<f32>],
    device: &candle_core::Device,
) -> Result<Direction> {
    if let Some(m) = per_direction
        .iter()
        .find(|m| m.nrows() != l.d_out || m.ncols() != l.d_in_h())
    {
        return Err(Error::Other(format!(
            "internal: direction of layer {} is {}×{}, not {}×{}",
            l.name,
            m.nrows(),
            m.ncols(),
            l.d_out,
            l.d_in_h()
        )));
    }
    let n = per_direction.len();
    let w: Vec<f32> = per_direction
        .iter()
        .flat_map(|m| (0..l.d_out).flat_map(move |i| (0..l.d_in).map(move |j| m[(i, j)])))
        .collect();
    let b = l
        .has_bias
        .then(|| {
            let cols: Vec<f32> = per_direction
                .iter()
                .flat_map(|m| (0..l.d_out).map(move |i| m[(i, l.d_in)]))
                .collect();
            Tensor::from_vec(cols, (n, l.d_out), device)
        })
        .transpose()?;
    Ok(Direction {
        w: Tensor::from_vec(w, (n * l.d_out, l.d_in), device)?,
        b,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::fixture;
    use crate::model::gpt2::tests::tiny_config;
    use crate::model::gpt2::Gpt2;
    use crate::model::{load_autograd, Labels, ModuleSelection};
    use candle_core::Device;

    fn batch() -> TokenBatch {
        TokenBatch::training(&[(0, &[1, 5, 7, 2, 9, 11]), (1, &[3, 4, 22])])
    }

    fn gpt2(activation: &str, seed: u64) -> AnyModel {
        let mut config = tiny_config();
        config.activation_function = activation.into();
        AnyModel::Gpt2(Gpt2::random(config, seed, ModuleSelection::All).unwrap())
    }

    fn family(name: &str) -> AnyModel {
        load_autograd(&fixture(name), ModuleSelection::All, &Device::Cpu).unwrap()
    }

    fn on_every_layer(model: AnyModel) -> GaussNewton {
        let tracked = model_ref(&model).spec().tracked.to_vec();
        GaussNewton::new(model, &tracked).unwrap()
    }

    /// Every configuration a tangent pass covers, named, and whether its activation is smooth
    /// (ReLU's kinks defeat finite differences). GPT-2 per activation; GPT-NeoX with parallel
    /// and sequential residual (both partial rotary, biases); Llama with GQA, llama3-scaled
    /// RoPE and a tied head, with linear-scaled RoPE, with a LoRA adapter on q, v and down;
    /// Qwen2's q/k/v biases; Mistral with a sliding window shorter than the batch; a Llama GGUF.
    fn cases() -> Vec<(&'static str, bool, GaussNewton)> {
        let mut adapted = family("llama");
        let lora = fixture("../lora/qvd");
        let adapter = crate::model::lora::Adapter::open(&lora).unwrap();
        adapted.attach(&adapter, ModuleSelection::All).unwrap();
        let mut windowed = family("mistral");
        if let AnyModel::Llama(m) = &mut windowed {
            m.config.sliding_window = Some(3);
        }
        vec![
            ("gpt2 gelu_new", true, on_every_layer(gpt2("gelu_new", 3))),
            ("gpt2 gelu", true, on_every_layer(gpt2("gelu", 5))),
            ("gpt2 relu", false, on_every_layer(gpt2("relu", 7))),
            (
                "gpt_neox_parallel",
                true,
                on_every_layer(family("gpt_neox_parallel")),
            ),
            (
                "gpt_neox_sequential",
                true,
                on_every_layer(family("gpt_neox_sequential")),
            ),
            ("llama", true, on_every_layer(family("llama"))),
            (
                "llama_linear_rope",
                true,
                on_every_layer(family("llama_linear_rope")),
            ),
            ("llama + lora", true, on_every_layer(adapted)),
            ("qwen2", true, on_every_layer(family("qwen2"))),
            ("mistral window 3", true, on_every_layer(windowed)),
            (
                "tiny_llama.gguf",
                true,
                on_every_layer(family("tiny_llama.gguf")),
            ),
        ]
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

    fn zero_probes(gn: &GaussNewton, rows: usize) -> Vec<Tensor> {
        gn.autograd()
            .zero_probes(rows)
            .unwrap()
            .iter()
            .map(|p| p.as_tensor().clone())
            .collect()
    }

    fn vocab(gn: &GaussNewton) -> usize {
        gn.autograd().spec().vocab
    }

    /// The tangent pass's logits are the reference forward's, and the tangent is not zero
    /// on any layer: each layer's direction alone moves the logits.
    #[test]
    fn tangent_pass_computes_the_reference_logits() {
        for (name, _, gn) in cases() {
            let b = batch();
            let v = random_direction(gn.tracked(), 1);
            let (z, _) = gn.jvp(&b, &v).unwrap();
            let probes = zero_probes(&gn, b.len() * b.max_len());
            let fwd = gn.autograd().tapped_forward(&b.ids, b.max_len(), &probes);
            let want = fwd.unwrap().logits.flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            let worst = z
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name}: max |Δ logit| = {worst}");
            for (i, l) in gn.tracked().iter().enumerate() {
                let mut only: Vec<Mat<f32>> = v.iter().map(|m| m * 0.0).collect();
                only[i] = v[i].clone();
                let (_, dz) = gn.jvp(&b, &only).unwrap();
                let norm = dz.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(
                    norm > 1e-6,
                    "{name}: layer {} does not move the logits",
                    l.name
                );
            }
        }
    }

    /// `J v` against central differences of the logits along the direction, through the
    /// probes: adding `ε ā_i V_iᵀ` to layer i's output has the same derivative at ε = 0 as
    /// moving its weights by `ε V_i`. The smooth activations only (the adjoint test covers
    /// ReLU).
    #[test]
    fn jvp_matches_finite_differences() {
        for (name, _, gn) in cases().into_iter().filter(|c| c.1) {
            let b = batch();
            let t = b.max_len();
            let rows = b.len() * t;
            let v = random_direction(gn.tracked(), 2);
            let (_, dz) = gn.jvp(&b, &v).unwrap();
            // The tracked layers' inputs at ε = 0.
            let model = gn.autograd();
            let zero = zero_probes(&gn, rows);
            let inputs = model.tapped_forward(&b.ids, t, &zero).unwrap().inputs;
            let logits_at = |eps: f64| -> Vec<f64> {
                let mut probes = zero.clone();
                for ((l, m), &own) in gn.tracked().iter().zip(&v).zip(&gn.layers) {
                    let dir = direction(l, &[m], &Device::Cpu).unwrap();
                    let mut y = inputs[own].matmul(&dir.w.t().unwrap()).unwrap();
                    if let Some(bias) = &dir.b {
                        y = y.broadcast_add(bias).unwrap();
                    }
                    probes[own] = (y * eps).unwrap();
                }
                let z = model.tapped_forward(&b.ids, t, &probes).unwrap().logits;
                let z = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                z.iter().map(|&x| x as f64).collect()
            };
            let central = |h: f64| -> Vec<f64> {
                let (p, m) = (logits_at(h), logits_at(-h));
                p.iter().zip(&m).map(|(a, b)| (a - b) / (2.0 * h)).collect()
            };
            let (c1, c2) = (central(2e-3), central(4e-3));
            let scale = dz.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            assert!(scale > 1e-3, "{name}: J v is zero");
            for (i, &d) in dz.iter().enumerate() {
                let fd = (4.0 * c1[i] - c2[i]) / 3.0;
                assert!(
                    (fd - d as f64).abs() < 2e-3 * scale,
                    "{name}: entry {i}: tangent {d} vs finite differences {fd}"
                );
            }
        }
    }

    /// The adjoint identity `⟨u, J v⟩ = ⟨Jᵀ u, v⟩`: the tangent pass against the autograd
    /// backward (itself checked against finite differences in the models' tests).
    #[test]
    fn jvp_is_the_adjoint_of_the_backward() {
        for (name, _, gn) in cases() {
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
                "{name}: ⟨u, Jv⟩ = {lhs}, ⟨Jᵀu, v⟩ = {rhs}"
            );
        }
    }

    /// Against the dense Gauss-Newton `Σ_t J_tᵀ H_t J_t` with J built row by row (one backward
    /// per logit), on every tracked layer of each tiny model.
    #[test]
    fn product_equals_the_dense_gauss_newton() {
        for (name, _, gn) in cases() {
            let b = batch();
            let vocab = vocab(&gn);
            let t = b.max_len();
            let v = random_direction(gn.tracked(), 4);
            let got = gn.product(&b, &v).unwrap();
            let (z, _) = gn.jvp(&b, &v).unwrap();
            let mut want64: Vec<Vec<f64>> = got
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
                    let p = softmax(&z[at..at + vocab]);
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
            let want: Vec<Mat<f32>> = got
                .iter()
                .zip(&want64)
                .map(|(m, acc)| {
                    let r = m.nrows();
                    Mat::from_fn(r, m.ncols(), |i, j| acc[i + j * r] as f32)
                })
                .collect();
            let norm = dot(&want, &want).sqrt();
            let diff: Vec<Mat<f32>> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let err = dot(&diff, &diff).sqrt();
            assert!(norm > 1e-3, "{name}: the product is zero");
            assert!(
                err < 1e-4 * norm,
                "{name}: ‖G v − dense‖ = {err}, ‖dense‖ = {norm}"
            );
            // vᵀ G v ≥ 0: the Gauss-Newton is positive semi-definite.
            assert!(dot(&got, &v) > 0.0, "{name}");
        }
    }

    /// Several directions in one pass give each direction's own product: the tangents of a
    /// batch of directions do not mix (each against the one-direction product, itself checked
    /// against the dense Gauss-Newton above).
    #[test]
    fn products_of_several_directions_are_each_directions_product() {
        for (name, _, gn) in cases() {
            let b = batch();
            let vs: Vec<Vec<Mat<f32>>> = (10..13)
                .map(|seed| random_direction(gn.tracked(), seed))
                .collect();
            let refs: Vec<&[Mat<f32>]> = vs.iter().map(|v| v.as_slice()).collect();
            let together = gn.products(&b, &refs).unwrap();
            assert_eq!(together.len(), 3, "{name}");
            for (k, (got, v)) in together.iter().zip(&vs).enumerate() {
                let alone = gn.product(&b, v).unwrap();
                let diff: Vec<Mat<f32>> = got.iter().zip(&alone).map(|(a, b)| a - b).collect();
                let (err, norm) = (dot(&diff, &diff).sqrt(), dot(&alone, &alone).sqrt());
                assert!(norm > 1e-3, "{name}: direction {k}'s product is zero");
                assert!(
                    err < 1e-5 * norm,
                    "{name}: direction {k}: ‖together − alone‖ = {err}, ‖alone‖ = {norm}"
                );
            }
        }
    }

    fn softmax(z: &[f32]) -> Vec<f64> {
        let max = z.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
        let e: Vec<f64> = z.iter().map(|&x| (x as f64 - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| x / sum).collect()
    }

    /// The GN is the expectation of the sampled-label Fisher: over labels drawn from the model,
    /// the mean of `(gᵀ v)²` tends to `vᵀ G v`. Checked with exact enumeration on a
    /// one-prediction sequence: `Σ_c p_c ⟨G_c, v⟩²` with `G_c` the gradient under label c.
    #[test]
    fn product_is_the_fishers_expectation() {
        for (name, _, gn) in cases() {
            let b = TokenBatch::training(&[(0, &[4, 9])]);
            let v = random_direction(gn.tracked(), 5);
            let vgv = dot(&gn.product(&b, &v).unwrap(), &v);
            let vocab = vocab(&gn);
            let (z, _) = gn.jvp(&b, &v).unwrap();
            let p = softmax(&z[..vocab]);
            let model = gn.autograd();
            let mut expect = 0f64;
            for c in 0..vocab as u32 {
                let labelled = TokenBatch::training(&[(0, &[4, c])]);
                let probes = model.zero_probes(2).unwrap();
                let (taps, _) = model.run(&labelled, Labels::Data, &probes).unwrap();
                let gv: f64 = gn
                    .tracked()
                    .iter()
                    .zip(&gn.layers)
                    .zip(&v)
                    .map(|((l, &own), m)| {
                        let g = crate::influence::sequence_gradients(l, &taps, own);
                        let d_o = m.nrows();
                        (0..g.nrows())
                            .map(|k| g[(k, 0)] as f64 * m[(k % d_o, k / d_o)] as f64)
                            .sum::<f64>()
                    })
                    .sum();
                expect += p[c as usize] * gv * gv;
            }
            assert!(
                (vgv - expect).abs() < 1e-4 * expect.abs(),
                "{name}: vᵀGv = {vgv}, E_y[(gᵀv)²] = {expect}"
            );
        }
    }

    fn m_type(model: &AnyModel) -> String {
        model_ref(model).spec().architecture.to_string()
    }

    /// Expert blocks are refused, the model type named.
    #[test]
    fn mixtures_of_experts_are_refused() {
        let dir = fixture("../moe/mixtral");
        let model = load_autograd(&dir, ModuleSelection::All, &Device::Cpu).unwrap();
        let tracked = model_ref(&model).spec().tracked.to_vec();
        assert!(!covers(&m_type(&model)));
        match GaussNewton::new(model, &tracked) {
            Err(Error::Input(msg)) => {
                assert!(
                    msg.contains("mixture-of-experts") && msg.contains("mixtral"),
                    "{msg}"
                )
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a mixture of experts was accepted"),
        }
    }

    /// A product whose tangent pass did not reproduce the model's logits is an error.
    #[test]
    fn logits_the_model_does_not_compute_are_an_error() {
        let reference = [1.0f32, -2.0, 3.0];
        assert!(check_logits(&[1.0, -2.0, 3.000_01], &reference).is_ok());
        assert!(check_logits(&[1.0, -2.0, 3.1], &reference).is_err());
        assert!(check_logits(&[1.0, f32::NAN, 3.0], &reference).is_err());
        assert!(check_logits(&[1.0, f32::NAN, 3.0], &[1.0, f32::NAN, 3.0]).is_ok());
    }
}
