//! The autograd engine's plumbing, shared by every architecture's reference forward
//! (`<arch>/autograd.rs`): tapped linear layers, the composed (differentiable) norms,
//! activations, rotary embeddings and attention, the forward → loss head → backward → (a, g)
//! extraction, and [`TapModel`] written once for every model that implements [`Autograd`].
//!
//! Everything is composed from elementary candle ops: candle's fused layer_norm / rms_norm /
//! softmax / rope have no backward and would silently cut the autograd graph.

use super::lora::Lora;
use super::loss::loss_head;
use super::weights::Weights;
use super::{
    BlockShape, ComputeDevice, Labels, LayerTap, ModuleSelection, TapBatch, TapModel, TokenBatch,
    TrackedLayer,
};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};

/// A linear layer as `nn.Linear` stores it: weight `[out, in]`, `y = a Wᵀ + b`, plus a LoRA
/// adapter's `B A a · scaling` when one is attached ([`super::lora`]).
pub(crate) struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Index among the tracked layers, if tracked.
    pub tap: Option<usize>,
    /// Checkpoint name (`model.layers.0.self_attn.q_proj`): what an adapter targets.
    pub name: String,
    /// Attention or MLP: which `--modules` selects the layer.
    pub kind: ModuleSelection,
    pub lora: Option<Lora>,
}

/// Loads linear layers by checkpoint name and registers the tracked ones.
pub(crate) struct LinearLoader<'a> {
    pub weights: &'a Weights,
    pub modules: ModuleSelection,
    pub tracked: Vec<TrackedLayer>,
    pub n_parameters: usize,
}

impl<'a> LinearLoader<'a> {
    pub fn new(weights: &'a Weights, modules: ModuleSelection) -> Self {
        LinearLoader {
            weights,
            modules,
            tracked: Vec::new(),
            n_parameters: 0,
        }
    }

    /// Any tensor (embeddings, norms), counted in the parameters.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.get(name, shape)?;
        self.n_parameters += t.elem_count();
        Ok(t)
    }

    /// `name.weight` `[d_out, d_in]` and, if `bias`, `name.bias`; tracked when `kind` is selected.
    pub fn linear(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        kind: ModuleSelection,
    ) -> Result<Linear> {
        let weight = self.tensor(&format!("{name}.weight"), &[d_out, d_in])?;
        let bias = if bias {
            Some(self.tensor(&format!("{name}.bias"), &[d_out])?)
        } else {
            let b = format!("{name}.bias");
            if self.weights.contains(&b) {
                return Err(Error::input(format!(
                    "{}: tensor `{b}` is present but the config says this layer has no bias",
                    self.weights.source()
                )));
            }
            None
        };
        let keep = self.modules == ModuleSelection::All || self.modules == kind;
        let tap = keep.then(|| {
            self.tracked.push(TrackedLayer {
                name: name.to_string(),
                d_in,
                d_out,
                has_bias: bias.is_some(),
            });
            self.tracked.len() - 1
        });
        Ok(Linear {
            weight,
            bias,
            tap,
            name: name.to_string(),
            kind,
            lora: None,
        })
    }
}

/// Records tracked layers' inputs during a forward pass and adds their probes to the outputs.
pub(crate) struct Recorder<'a> {
    probes: &'a [Tensor],
    pub inputs: Vec<Option<Tensor>>,
    /// While a routed expert runs ([`Recorder::linear_routed`]): the batch rows it runs on.
    routed: Option<Tensor>,
    /// Tracked layers of experts that received no rows: see [`Recorder::keep_idle_probes`].
    idle: Vec<usize>,
}

impl<'a> Recorder<'a> {
    pub fn new(probes: &'a [Tensor]) -> Self {
        Recorder {
            probes,
            inputs: vec![None; probes.len()],
            routed: None,
            idle: Vec::new(),
        }
    }

    /// `y + 0 · Σ probe` for the probes of experts that ran on no rows: their outputs reach
    /// nothing, so without this term the backward would not reach their probes at all (a
    /// cut graph); with it their g is exactly zero.
    pub fn keep_idle_probes(&mut self, y: Tensor) -> candle_core::Result<Tensor> {
        let mut y = y;
        for i in std::mem::take(&mut self.idle) {
            // A product with a zero tensor, not `* 0.0`: candle prunes affine maps by 0.
            let sum = self.probes[i].sum_all()?;
            y = y.broadcast_add(&sum.mul(&sum.zeros_like()?)?)?;
        }
        Ok(y)
    }

    /// [`Recorder::linear`] on some rows of the batch only (a mixture-of-experts expert):
    /// `a` holds the batch rows `rows`; the tap's input is `a` scattered into zero rows, and
    /// only the probe's rows `rows` are added, so the other rows' (a, g) stay exactly zero.
    pub fn linear_routed(
        &mut self,
        layer: &Linear,
        a: &Tensor,
        rows: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.routed = Some(rows.clone());
        let y = self.linear(layer, a);
        self.routed = None;
        y
    }

    /// `a` is `[rows, d_in]`; returns `[rows, d_out]`. With an adapter, PEFT's
    /// `base(a) + B(A(a)) · scaling`, A and B tapped as layers of their own.
    pub fn linear(&mut self, layer: &Linear, a: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = a.matmul(&layer.weight.t()?)?;
        if let Some(b) = &layer.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = &layer.lora {
            let u = self.tap(lora.tap_a, a, a.matmul(&lora.a.t()?)?)?;
            let v = self.tap(lora.tap_b, &u, u.matmul(&lora.b.t()?)?)?;
            y = (y + (v * lora.scaling)?)?;
        }
        self.tap(layer.tap, a, y)
    }

    /// Records `a` as tracked layer `tap`'s input and adds its probe to its output `y`.
    fn tap(&mut self, tap: Option<usize>, a: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        match tap {
            Some(i) => match &self.routed {
                None => {
                    self.inputs[i] = Some(a.clone());
                    y + &self.probes[i]
                }
                Some(rows) => {
                    let (n, d_in) = (self.probes[i].dim(0)?, a.dim(1)?);
                    let zeros = Tensor::zeros((n, d_in), a.dtype(), a.device())?;
                    self.inputs[i] = Some(zeros.index_add(rows, a, 0)?);
                    if rows.dim(0)? == 0 {
                        self.idle.push(i);
                    }
                    y + self.probes[i].index_select(rows, 0)?
                }
            },
            None => Ok(y),
        }
    }

    pub fn finish(self) -> candle_core::Result<Vec<Tensor>> {
        self.inputs
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.ok_or_else(|| {
                    candle_core::Error::Msg(format!("internal: tracked layer {i} never ran"))
                })
            })
            .collect()
    }
}

pub(crate) struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `x / sqrt(mean(x²) + eps) · w` (Llama's RMSNorm).
pub(crate) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)
    }
}

/// Activation functions by their config names.
pub(crate) fn activation(name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    match name {
        "gelu" => x.gelu_erf(),
        "relu" => x.relu(),
        // x·σ(x) with σ(x) = (1 + tanh(x/2)) / 2: finite gradient for every x.
        "silu" | "swish" => x * (((x * 0.5)?.tanh()? + 1.0)? * 0.5)?,
        // gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))).
        _ => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
            (x * 0.5)? * (inner.tanh()? + 1.0)?
        }
    }
}

/// Whether [`activation`] computes `name`.
pub(crate) fn supported_activation(name: &str) -> bool {
    matches!(
        name,
        "gelu" | "relu" | "silu" | "swish" | "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast"
    )
}

/// Rotary embedding tables for `rotary_dims` leading dimensions of each head, HF's
/// `rotate_half` convention (pairs (i, i + rotary_dims/2)), positions 0..len.
pub(crate) struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
    pub rotary_dims: usize,
}

impl Rotary {
    /// `inv_freq` has `rotary_dims / 2` entries.
    pub fn new(inv_freq: &[f64], len: usize, device: &Device) -> candle_core::Result<Self> {
        let half = inv_freq.len();
        let (cos, sin) = super::rope::rope_tables(inv_freq, len);
        Ok(Rotary {
            cos: Tensor::from_vec(cos, (len, 2 * half), device)?,
            sin: Tensor::from_vec(sin, (len, 2 * half), device)?,
            rotary_dims: 2 * half,
        })
    }

    /// `x` is `[b, heads, t, head_dim]`; rotates the first `rotary_dims` dims of each head.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let r = self.rotary_dims;
        let (x_rot, x_pass) = if r < hd {
            (
                x.narrow(D::Minus1, 0, r)?,
                Some(x.narrow(D::Minus1, r, hd - r)?),
            )
        } else {
            (x.clone(), None)
        };
        let x1 = x_rot.narrow(D::Minus1, 0, r / 2)?;
        let x2 = x_rot.narrow(D::Minus1, r / 2, r / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let out = (x_rot.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?)?;
        match x_pass {
            Some(p) => Tensor::cat(&[&out, &p], D::Minus1),
            None => Ok(out),
        }
    }
}

/// Additive attention mask `[t, t]`: causal, and, with a sliding window w, key j is visible from
/// query i only when i − j < w. Right padding sits after every real token, so real positions
/// never see padding.
pub(crate) fn causal_mask(
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// Scaled dot-product attention with composed softmax. `q` is `[b, h, t, hd]`, `k`/`v`
/// `[b, kv, t, hd]` with `h` a multiple of `kv` (query head i uses kv head i / (h/kv)).
/// Returns `[b·t, h·hd]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let kv = k.dim(1)?;
    let repeat = |x: &Tensor| -> candle_core::Result<Tensor> {
        if kv == h {
            return x.contiguous();
        }
        x.unsqueeze(2)?
            .expand((b, kv, h / kv, t, hd))?
            .contiguous()?
            .reshape((b, h, t, hd))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
    // Softmax is shift-invariant, so the detached max changes no gradient.
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * t, h * hd))
}

/// Token ids right-padded with 0 into a `[b·t]` tensor.
pub(crate) fn padded_ids(
    ids: &[Vec<u32>],
    t: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let flat: Vec<u32> = ids
        .iter()
        .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())))
        .collect();
    Tensor::from_vec(flat, ids.len() * t, device)
}

/// What one forward pass keeps for the taps.
pub(crate) struct Forward {
    /// `[b, t, vocab]`.
    pub logits: Tensor,
    /// Each tracked layer's input `[b·t, d_in]`.
    pub inputs: Vec<Tensor>,
}

pub(crate) fn zero_probes(
    tracked: &[TrackedLayer],
    rows: usize,
    device: &Device,
) -> candle_core::Result<Vec<Var>> {
    tracked
        .iter()
        .map(|l| Var::zeros((rows, l.d_out), DType::F32, device))
        .collect()
}

/// Forward, loss head, one backward of the surrogate `Σ logits ⊙ dL/dlogits`, and the (a, g) of
/// every real token per tracked layer. `forward(ids, padded_len, probes)`.
pub(crate) fn run_taps(
    tracked: &[TrackedLayer],
    vocab: usize,
    batch: &TokenBatch,
    labels: Labels,
    probes: &[Var],
    forward: impl Fn(&[Vec<u32>], usize, &[Tensor]) -> candle_core::Result<Forward>,
) -> Result<(TapBatch, candle_core::backprop::GradStore)> {
    let t = batch.max_len();
    let probe_tensors: Vec<Tensor> = probes.iter().map(|p| p.as_tensor().clone()).collect();
    let fwd = forward(&batch.ids, t, &probe_tensors)?;
    let logits = fwd.logits.flatten_all()?.to_vec1::<f32>()?;
    let (dlogits, losses) = loss_head(&logits, vocab, t, batch, labels);
    // The loss head runs on the host (f64 log-sum-exp, sampled labels); its dL/dlogits goes
    // back to wherever the model runs.
    let device = fwd.logits.device();
    let dlogits = Tensor::from_vec(dlogits, fwd.logits.shape(), device)?;
    let surrogate = (&fwd.logits * &dlogits)?.sum_all()?;
    let grads = surrogate.backward()?;
    let real_rows: Vec<u32> = batch
        .ids
        .iter()
        .enumerate()
        .flat_map(|(b, s)| (0..s.len()).map(move |i| (b * t + i) as u32))
        .collect();
    let real_rows = Tensor::from_vec(real_rows.clone(), real_rows.len(), device)?;
    let mut layers = Vec::with_capacity(tracked.len());
    for (i, probe) in probes.iter().enumerate() {
        let g = grads.get(probe).ok_or_else(|| {
            Error::Other(format!(
                "internal: no gradient reached tracked layer {} (the autograd graph is cut)",
                tracked[i].name
            ))
        })?;
        let a = fwd.inputs[i]
            .index_select(&real_rows, 0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let g = g
            .index_select(&real_rows, 0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        layers.push(LayerTap { a, g });
    }
    let taps = TapBatch {
        seq_lens: batch.ids.iter().map(Vec::len).collect(),
        losses,
        layers,
    };
    Ok((taps, grads))
}

/// Logits of one sequence through `forward` with zero probes.
pub(crate) fn single_logits(
    tracked: &[TrackedLayer],
    ids: &[u32],
    device: &Device,
    forward: impl Fn(&[Vec<u32>], usize, &[Tensor]) -> candle_core::Result<Forward>,
) -> Result<Vec<f32>> {
    let probes: Vec<Tensor> = zero_probes(tracked, ids.len(), device)?
        .iter()
        .map(|p| p.as_tensor().clone())
        .collect();
    let fwd = forward(&[ids.to_vec()], ids.len(), &probes)?;
    Ok(fwd.logits.flatten_all()?.to_vec1::<f32>()?)
}

/// What [`TapModel`] reports about a model, borrowed from an architecture's autograd model.
pub(crate) struct Spec<'a> {
    /// Architecture name as in config.json (`gpt2`, `llama`, …).
    pub architecture: &'a str,
    pub tracked: &'a [TrackedLayer],
    pub vocab: usize,
    pub max_positions: usize,
    pub n_parameters: usize,
    pub shape: BlockShape,
    /// Where the weights live (the taps are computed there).
    pub device: &'a Device,
}

/// An architecture's reference model on candle autograd: its description and its forward with
/// probes. [`TapModel`] is implemented once for all of them, below.
pub(crate) trait Autograd: Send + Sync {
    fn spec(&self) -> Spec<'_>;

    /// Forward pass over a right-padded batch: `probes[i]` is added to the output of tracked
    /// layer i (`[B*T, d_out]`). Returns the logits `[B, T, V]` and each tracked layer's input.
    fn tapped_forward(
        &self,
        ids: &[Vec<u32>],
        padded_len: usize,
        probes: &[Tensor],
    ) -> candle_core::Result<Forward>;

    /// One zero probe per tracked layer for `rows` rows.
    fn zero_probes(&self, rows: usize) -> candle_core::Result<Vec<Var>> {
        let s = self.spec();
        zero_probes(s.tracked, rows, s.device)
    }

    /// Taps and the probes' gradients for a batch (the probe values are inputs so that finite
    /// differences can perturb them).
    fn run(
        &self,
        batch: &TokenBatch,
        labels: Labels,
        probes: &[Var],
    ) -> Result<(TapBatch, candle_core::backprop::GradStore)> {
        let s = self.spec();
        run_taps(s.tracked, s.vocab, batch, labels, probes, |ids, t, p| {
            self.tapped_forward(ids, t, p)
        })
    }
}

impl<M: Autograd> TapModel for M {
    fn architecture(&self) -> &str {
        self.spec().architecture
    }

    fn tracked(&self) -> &[TrackedLayer] {
        self.spec().tracked
    }

    fn vocab_size(&self) -> usize {
        self.spec().vocab
    }

    fn max_positions(&self) -> usize {
        self.spec().max_positions
    }

    fn n_parameters(&self) -> usize {
        self.spec().n_parameters
    }

    /// On a GPU one batch keeps the device busy and the cores form its statistics; on the
    /// CPU the driver runs batches side by side instead.
    fn is_threaded(&self) -> bool {
        !self.spec().device.is_cpu()
    }

    fn device(&self) -> ComputeDevice {
        ComputeDevice::of(self.spec().device)
    }

    fn taps(&self, batch: &TokenBatch, labels: Labels) -> Result<TapBatch> {
        let probes = self.zero_probes(batch.len() * batch.max_len())?;
        Ok(self.run(batch, labels, &probes)?.0)
    }

    fn block_shape(&self) -> BlockShape {
        self.spec().shape
    }

    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let s = self.spec();
        single_logits(s.tracked, ids, s.device, |i, t, p| {
            self.tapped_forward(i, t, p)
        })
    }
}

/// Shared tests for every architecture: parity with transformers' reference logits, finite
/// differences on the probes, every probe reached, padding invariance.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/families")
            .join(name)
    }

    /// Max |logit − reference| over the sequences of `reference.json`-style file.
    pub fn max_logit_diff(model: &dyn TapModel, reference: &std::path::Path) -> f32 {
        let text = std::fs::read_to_string(reference).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let seqs: Vec<Vec<u32>> = serde_json::from_value(v["sequences"].clone()).unwrap();
        let logits: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
        let mut worst = 0f32;
        for (s, want) in seqs.iter().zip(&logits) {
            let got = model.logits(s).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                worst = worst.max((a - b).abs());
            }
        }
        worst
    }

    pub fn batch() -> TokenBatch {
        TokenBatch::training(&[(0, &[1, 5, 7, 2, 9, 11]), (1, &[3, 4, 22])])
    }

    pub fn every_probe_receives_a_gradient(model: &dyn TapModel) {
        let taps = model.taps(&batch(), Labels::Data).unwrap();
        assert_eq!(taps.seq_lens, vec![6, 3]);
        for (l, tap) in model.tracked().iter().zip(&taps.layers) {
            assert_eq!(tap.a.len(), 9 * l.d_in);
            assert_eq!(tap.g.len(), 9 * l.d_out);
            let norm: f32 = tap.g.iter().map(|x| x * x).sum();
            assert!(norm > 1e-12, "layer {} got no gradient", l.name);
        }
    }

    /// `run(probes)` returns (taps, grads) of `batch()` with the given probe values.
    pub fn taps_match_finite_differences(
        tracked: &[TrackedLayer],
        run: impl Fn(&[Var]) -> (TapBatch, candle_core::backprop::GradStore),
    ) {
        let batch = batch();
        let t = batch.max_len();
        let rows = batch.len() * t;
        let probes = zero_probes(tracked, rows, &Device::Cpu).unwrap();
        let (_, grads) = run(&probes);
        let loss_at = |layer: usize, idx: usize, eps: f32| -> f64 {
            let probes = zero_probes(tracked, rows, &Device::Cpu).unwrap();
            let mut v = vec![0f32; rows * tracked[layer].d_out];
            v[idx] = eps;
            probes[layer]
                .set(&Tensor::from_vec(v, (rows, tracked[layer].d_out), &Device::Cpu).unwrap())
                .unwrap();
            run(&probes).0.losses.iter().sum()
        };
        for (layer, probe) in probes.iter().enumerate() {
            let g = grads
                .get(probe)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d_out = tracked[layer].d_out;
            for row in [0usize, 4, t + 1, t + 2] {
                for col in [0, d_out / 2, d_out - 1] {
                    let idx = row * d_out + col;
                    let central = |h: f32| {
                        (loss_at(layer, idx, h) - loss_at(layer, idx, -h)) / (2.0 * h as f64)
                    };
                    let fd = (4.0 * central(2e-3) - central(4e-3)) / 3.0;
                    let err = (fd - g[idx] as f64).abs();
                    assert!(
                        err < 2e-3 * (1.0 + g[idx].abs() as f64),
                        "{} row {row} col {col}: autograd {} vs finite differences {fd}",
                        tracked[layer].name,
                        g[idx]
                    );
                }
            }
            if row_is_last_token_zero(&g, t + 2, d_out) {
                continue;
            }
            panic!("{}: the last token's g must be 0", tracked[layer].name);
        }
    }

    fn row_is_last_token_zero(g: &[f32], row: usize, d_out: usize) -> bool {
        g[row * d_out..(row + 1) * d_out].iter().all(|x| *x == 0.0)
    }

    pub fn taps_do_not_depend_on_padding(model: &dyn TapModel) {
        let alone = model
            .taps(&TokenBatch::training(&[(1, &[3, 4, 22])]), Labels::Data)
            .unwrap();
        let padded = model.taps(&batch(), Labels::Data).unwrap();
        for (l, (x, y)) in alone.layers.iter().zip(&padded.layers).enumerate() {
            let d_out = model.tracked()[l].d_out;
            let d_in = model.tracked()[l].d_in;
            for (p, q) in x.g.iter().zip(&y.g[6 * d_out..]) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                    "layer {l}: {p} vs {q}"
                );
            }
            for (p, q) in x.a.iter().zip(&y.a[6 * d_in..]) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                    "layer {l}: {p} vs {q}"
                );
            }
        }
        assert!((alone.losses[0] - padded.losses[1]).abs() < 1e-5);
    }
}
