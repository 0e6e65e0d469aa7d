//! GPT-2 (Hugging Face `GPT2LMHeadModel` checkpoints), with candle autograd.
//!
//! Taps: every tracked linear computes `y = a W + b + probe`, where `probe` is a zero `Var`
//! of the output's shape. After the backward pass the probe's gradient is exactly
//! g = ∂L/∂y, and `a` is kept from the forward pass. Layer norm, softmax and GELU are composed
//! from elementary ops because candle's fused versions have no backward (they would silently
//! cut the graph); `tests::every_probe_receives_a_gradient` fails if any tap goes missing.

use super::weights::Weights;
use super::{ops::Forward, Labels, ModuleSelection, TapBatch, TapModel, TokenBatch, TrackedLayer};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor, Var, D};
use std::collections::HashMap;
use std::path::Path;

/// The fields of a GPT-2 `config.json` that change the computation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {
    fn d_inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::input(format!("{}: {msg}", path.display())));
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd ({}) must be a positive multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu" | "relu"
        ) {
            return bad(format!(
                "activation_function `{}` is not supported (gelu_new, gelu_pytorch_tanh, gelu, relu)",
                self.activation_function
            ));
        }
        if self.scale_attn_by_inverse_layer_idx || self.reorder_and_upcast_attn {
            return bad(
                "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported"
                    .into(),
            );
        }
        Ok(())
    }
}

pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// A Conv1D layer as GPT-2 stores it: weight `[in, out]`, `y = x W + b`.
pub(crate) struct Conv1D {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    /// Index among the tracked layers, if tracked.
    pub(crate) tap: Option<usize>,
}

pub(crate) struct Block {
    pub(crate) ln_1: LayerNorm,
    pub(crate) c_attn: Conv1D,
    pub(crate) c_proj: Conv1D,
    pub(crate) ln_2: LayerNorm,
    pub(crate) c_fc: Conv1D,
    pub(crate) mlp_proj: Conv1D,
}

/// A GPT-2 language model with tied (or explicit) LM head.
pub struct Gpt2 {
    pub(crate) config: Gpt2Config,
    pub(crate) wte: Tensor,
    pub(crate) wpe: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_f: LayerNorm,
    pub(crate) lm_head: Tensor,
    pub(crate) tracked: Vec<TrackedLayer>,
    pub(crate) n_parameters: usize,
    pub(crate) device: Device,
}

impl Gpt2 {
    /// Loads `config.json` and `model.safetensors` (or a sharded index) from `dir`.
    pub fn load(dir: &Path, modules: ModuleSelection) -> Result<Self> {
        Self::load_on(dir, modules, &Device::Cpu)
    }

    /// [`Self::load`] with the weights on `device` (the autograd engine then runs there).
    pub fn load_on(dir: &Path, modules: ModuleSelection, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Gpt2Config = serde_json::from_str(&text).map_err(|e| {
            Error::input(format!(
                "{}: not a valid GPT-2 config: {e}",
                config_path.display()
            ))
        })?;
        config.validate(&config_path)?;
        let weights = Weights::open(dir)?.on(device);
        Self::from_weights(config, &weights, modules)
    }

    /// Builds a model from named tensors (checkpoint names, with or without `transformer.`).
    /// The tensors are used as given (no copy), so `Var`s stay trainable (see [`crate::train`]).
    pub(crate) fn from_weights(
        config: Gpt2Config,
        w: &Weights,
        modules: ModuleSelection,
    ) -> Result<Self> {
        let prefix = if w.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (d, v, p, di) = (
            config.n_embd,
            config.vocab_size,
            config.n_positions,
            config.d_inner(),
        );
        let n_parameters = std::cell::Cell::new(0usize);
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = w.get(&format!("{prefix}{name}"), shape)?;
            n_parameters.set(n_parameters.get() + t.elem_count());
            Ok(t)
        };
        let wte = get("wte.weight", &[v, d])?;
        let wpe = get("wpe.weight", &[p, d])?;
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(&format!("{name}.weight"), &[d])?,
                bias: get(&format!("{name}.bias"), &[d])?,
                eps: config.layer_norm_epsilon,
            })
        };
        let mut blocks = Vec::with_capacity(config.n_layer);
        let mut tracked = Vec::new();
        for i in 0..config.n_layer {
            let ln_1 = ln(&format!("h.{i}.ln_1"))?;
            let ln_2 = ln(&format!("h.{i}.ln_2"))?;
            let mut conv =
                |local: &str, d_in: usize, d_out: usize, kind: ModuleSelection| -> Result<Conv1D> {
                    let name = format!("h.{i}.{local}");
                    let keep = modules == ModuleSelection::All || modules == kind;
                    let tap = keep.then(|| {
                        tracked.push(TrackedLayer {
                            name: format!("{prefix}{name}"),
                            d_in,
                            d_out,
                            has_bias: true,
                        });
                        tracked.len() - 1
                    });
                    Ok(Conv1D {
                        weight: get(&format!("{name}.weight"), &[d_in, d_out])?,
                        bias: get(&format!("{name}.bias"), &[d_out])?,
                        tap,
                    })
                };
            let c_attn = conv("attn.c_attn", d, 3 * d, ModuleSelection::Attn)?;
            let c_proj = conv("attn.c_proj", d, d, ModuleSelection::Attn)?;
            let c_fc = conv("mlp.c_fc", d, di, ModuleSelection::Mlp)?;
            let mlp_proj = conv("mlp.c_proj", di, d, ModuleSelection::Mlp)?;
            blocks.push(Block {
                ln_1,
                c_attn,
                c_proj,
                ln_2,
                c_fc,
                mlp_proj,
            });
        }
        let ln_f = ln("ln_f")?;
        let lm_head = if w.contains("lm_head.weight") {
            w.get("lm_head.weight", &[v, d])?
        } else {
            wte.clone()
        };
        Ok(Gpt2 {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            tracked,
            n_parameters: n_parameters.get(),
            device: w.device().clone(),
        })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// A randomly initialised model (GPT-2's N(0, 0.02) init, layer norms at identity plus
    /// noise so that every parameter matters), for tests and benchmarks.
    pub fn random(config: Gpt2Config, seed: u64, modules: ModuleSelection) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    // Box–Muller from two uniforms.
                    let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                    mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect();
            tensors.insert(name, (shape, data));
        };
        let (d, di) = (config.n_embd, config.d_inner());
        add("wte.weight".into(), vec![config.vocab_size, d], 0.0, 0.1);
        add("wpe.weight".into(), vec![config.n_positions, d], 0.0, 0.05);
        for i in 0..config.n_layer {
            for ln in ["ln_1", "ln_2"] {
                add(format!("h.{i}.{ln}.weight"), vec![d], 1.0, 0.1);
                add(format!("h.{i}.{ln}.bias"), vec![d], 0.0, 0.1);
            }
            for (name, din, dout) in [
                ("attn.c_attn", d, 3 * d),
                ("attn.c_proj", d, d),
                ("mlp.c_fc", d, di),
                ("mlp.c_proj", di, d),
            ] {
                add(format!("h.{i}.{name}.weight"), vec![din, dout], 0.0, 0.2);
                add(format!("h.{i}.{name}.bias"), vec![dout], 0.0, 0.05);
            }
        }
        add("ln_f.weight".into(), vec![d], 1.0, 0.1);
        add("ln_f.bias".into(), vec![d], 0.0, 0.1);
        let weights = Weights::owned(
            tensors
                .into_iter()
                .map(|(k, (shape, data))| Ok((k, Tensor::from_vec(data, shape, &Device::Cpu)?)))
                .collect::<Result<_>>()?,
            "random weights",
        );
        Self::from_weights(config, &weights, modules)
    }

    /// Writes the model as a Hugging Face checkpoint directory (config.json, model.safetensors).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut t: HashMap<String, Tensor> = HashMap::new();
        t.insert("wte.weight".into(), self.wte.clone());
        t.insert("wpe.weight".into(), self.wpe.clone());
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, ln) in [("ln_1", &b.ln_1), ("ln_2", &b.ln_2)] {
                t.insert(format!("h.{i}.{name}.weight"), ln.weight.clone());
                t.insert(format!("h.{i}.{name}.bias"), ln.bias.clone());
            }
            for (name, c) in [
                ("attn.c_attn", &b.c_attn),
                ("attn.c_proj", &b.c_proj),
                ("mlp.c_fc", &b.c_fc),
                ("mlp.c_proj", &b.mlp_proj),
            ] {
                t.insert(format!("h.{i}.{name}.weight"), c.weight.clone());
                t.insert(format!("h.{i}.{name}.bias"), c.bias.clone());
            }
        }
        t.insert("ln_f.weight".into(), self.ln_f.weight.clone());
        t.insert("ln_f.bias".into(), self.ln_f.bias.clone());
        let st = dir.join("model.safetensors");
        candle_core::safetensors::save(&t, &st)?;
        let mut config =
            serde_json::to_value(&self.config).map_err(|e| Error::Other(e.to_string()))?;
        config["model_type"] = "gpt2".into();
        config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| Error::Other(e.to_string()))?;
        let path = dir.join("config.json");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }

    /// Forward pass over a right-padded batch. `probes[i]` is added to the output of tracked
    /// layer i (`[B*T, d_out]`); with no probes (training) nothing is added. Returns the logits
    /// `[B, T, V]` and each tracked layer's input.
    pub(crate) fn forward(
        &self,
        ids: &[Vec<u32>],
        padded_len: usize,
        probes: &[Tensor],
    ) -> candle_core::Result<Forward> {
        let (b, t) = (ids.len(), padded_len);
        let (d, h) = (self.config.n_embd, self.config.n_head);
        let hd = d / h;
        let flat: Vec<u32> = ids
            .iter()
            .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())))
            .collect();
        let ids_t = Tensor::from_vec(flat, b * t, &self.device)?;
        let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let pos_t = Tensor::from_vec(pos, b * t, &self.device)?;
        let mut x = (self.wte.index_select(&ids_t, 0)? + self.wpe.index_select(&pos_t, 0)?)?;

        // Causal mask: padding sits to the right of every real token, so causality alone keeps
        // real positions from seeing padding.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?;
        let scale = if self.config.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };

        let mut inputs = vec![None; self.tracked.len()];
        let mut linear = |layer: &Conv1D, a: &Tensor| -> candle_core::Result<Tensor> {
            let y = a.matmul(&layer.weight)?.broadcast_add(&layer.bias)?;
            match layer.tap {
                Some(i) => {
                    inputs[i] = Some(a.clone());
                    match probes.get(i) {
                        Some(probe) => y + probe,
                        None => Ok(y),
                    }
                }
                None => Ok(y),
            }
        };
        for block in &self.blocks {
            let hidden = block.ln_1.forward(&x)?;
            let qkv = linear(&block.c_attn, &hidden)?.reshape((b, t, 3, h, hd))?;
            let heads = |k: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, k, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            // Softmax is shift-invariant, so the detached max changes no gradient.
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let attn = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, d))?;
            x = (x + linear(&block.c_proj, &attn)?)?;
            let hidden = block.ln_2.forward(&x)?;
            let pre = linear(&block.c_fc, &hidden)?;
            let act = self.activation(&pre)?;
            x = (x + linear(&block.mlp_proj, &act)?)?;
        }
        let x = self.ln_f.forward(&x)?;
        let logits = x
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, self.config.vocab_size))?;
        let inputs = inputs
            .into_iter()
            .map(|i| i.expect("every tracked layer is in a block"))
            .collect();
        Ok(Forward { logits, inputs })
    }

    fn activation(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.activation_function.as_str() {
            "gelu" => x.gelu_erf(),
            "relu" => x.relu(),
            // gelu_new: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))), composed so that its
            // backward is exact (candle's fused gelu backward uses rounded constants).
            _ => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let inner = ((x + ((x.sqr()? * x)? * 0.044715)?)? * c)?;
                (x * 0.5)? * (inner.tanh()? + 1.0)?
            }
        }
    }

    fn zero_probes(&self, rows: usize) -> candle_core::Result<Vec<Var>> {
        super::ops::zero_probes(&self.tracked, rows, &self.device)
    }

    /// Logits, padded length and the probes' gradients for a batch (exposed to tests through
    /// [`TapModel::taps`]; the probe values are inputs so finite differences can perturb them).
    fn run(
        &self,
        batch: &TokenBatch,
        labels: Labels,
        probes: &[Var],
    ) -> Result<(TapBatch, candle_core::backprop::GradStore)> {
        super::ops::run_taps(
            &self.tracked,
            self.config.vocab_size,
            batch,
            labels,
            probes,
            |ids, t, p| self.forward(ids, t, p),
        )
    }
}

impl TapModel for Gpt2 {
    fn architecture(&self) -> &str {
        "gpt2"
    }

    fn tracked(&self) -> &[TrackedLayer] {
        &self.tracked
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    fn n_parameters(&self) -> usize {
        self.n_parameters
    }

    /// On a GPU one batch keeps the device busy and the cores form its statistics; on the
    /// CPU the driver runs batches side by side instead.
    fn is_threaded(&self) -> bool {
        !self.device.is_cpu()
    }

    fn device(&self) -> super::ComputeDevice {
        super::ComputeDevice::of(&self.device)
    }

    fn taps(&self, batch: &TokenBatch, labels: Labels) -> Result<TapBatch> {
        let rows = batch.len() * batch.max_len();
        let probes = self.zero_probes(rows)?;
        Ok(self.run(batch, labels, &probes)?.0)
    }

    fn block_shape(&self) -> super::BlockShape {
        super::BlockShape {
            layers: self.config.n_layer,
            heads: self.config.n_head,
            hidden: self.config.n_embd,
            intermediate: self.config.d_inner(),
        }
    }

    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        super::ops::single_logits(&self.tracked, ids, &self.device, |ids, t, p| {
            self.forward(ids, t, p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_config() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 23,
            n_positions: 16,
            n_embd: 8,
            n_layer: 2,
            n_head: 2,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
        }
    }

    fn batch() -> TokenBatch {
        TokenBatch::training(&[(0, &[1, 5, 7, 2, 9, 11]), (1, &[3, 4, 22])])
    }

    #[test]
    fn every_probe_receives_a_nonzero_gradient() {
        let model = Gpt2::random(tiny_config(), 1, ModuleSelection::All).unwrap();
        assert_eq!(model.tracked().len(), 8);
        let taps = model.taps(&batch(), Labels::Data).unwrap();
        assert_eq!(taps.seq_lens, vec![6, 3]);
        for (l, tap) in model.tracked().iter().zip(&taps.layers) {
            assert_eq!(tap.a.len(), 9 * l.d_in);
            assert_eq!(tap.g.len(), 9 * l.d_out);
            let norm: f32 = tap.g.iter().map(|x| x * x).sum();
            assert!(norm > 1e-12, "layer {} got no gradient", l.name);
        }
    }

    /// g = ∂L/∂y checked against finite differences of the loss in the probes.
    #[test]
    fn taps_match_finite_differences() {
        let model = Gpt2::random(tiny_config(), 2, ModuleSelection::All).unwrap();
        let batch = batch();
        let t = batch.max_len();
        let rows = batch.len() * t;
        let probes = model.zero_probes(rows).unwrap();
        let (_, grads) = model.run(&batch, Labels::Data, &probes).unwrap();
        let raw_g: Vec<Tensor> = probes
            .iter()
            .map(|p| grads.get(p).unwrap().clone())
            .collect();
        let loss_at = |layer: usize, idx: usize, eps: f32| -> f64 {
            let probes: Vec<Var> = model.zero_probes(rows).unwrap();
            let mut v = vec![0f32; rows * model.tracked[layer].d_out];
            v[idx] = eps;
            probes[layer]
                .set(
                    &Tensor::from_vec(v, (rows, model.tracked[layer].d_out), &Device::Cpu).unwrap(),
                )
                .unwrap();
            let (taps, _) = model.run(&batch, Labels::Data, &probes).unwrap();
            taps.losses.iter().sum()
        };
        let mut checked = 0;
        for (layer, g) in raw_g.iter().enumerate() {
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let d_out = model.tracked[layer].d_out;
            // Rows 0 and 4 of the first sequence; rows 1 and 2 of the second (2 is its last token,
            // which predicts nothing: g = 0).
            for row in [0usize, 4, t + 1, t + 2] {
                for col in [0, d_out / 2, d_out - 1] {
                    let idx = row * d_out + col;
                    // Central differences with one Richardson step (error O(h⁴)); the
                    // random model is strongly curved, so plain O(h²) needs tiny steps that f32
                    // rounding then spoils.
                    let central = |h: f32| {
                        (loss_at(layer, idx, h) - loss_at(layer, idx, -h)) / (2.0 * h as f64)
                    };
                    let fd = (4.0 * central(2e-3) - central(4e-3)) / 3.0;
                    let err = (fd - g[idx] as f64).abs();
                    assert!(
                        err < 2e-3 * (1.0 + g[idx].abs() as f64),
                        "layer {layer} row {row} col {col}: autograd {} vs finite differences {fd}",
                        g[idx]
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 8 * 4 * 3);
    }

    /// Padding rows never influence real rows: taps of a sequence alone equal its taps in a
    /// padded batch.
    #[test]
    fn taps_do_not_depend_on_padding() {
        let model = Gpt2::random(tiny_config(), 3, ModuleSelection::All).unwrap();
        let alone = model
            .taps(&TokenBatch::training(&[(1, &[3, 4, 22])]), Labels::Data)
            .unwrap();
        let padded = model.taps(&batch(), Labels::Data).unwrap();
        for (l, (x, y)) in alone.layers.iter().zip(&padded.layers).enumerate() {
            let d_out = model.tracked[l].d_out;
            let tail = &y.g[6 * d_out..];
            for (p, q) in x.g.iter().zip(tail) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                    "layer {l}: {p} vs {q}"
                );
            }
        }
        assert!((alone.losses[0] - padded.losses[1]).abs() < 1e-5);
    }

    #[test]
    fn save_then_load_round_trips() {
        let model = Gpt2::random(tiny_config(), 4, ModuleSelection::Mlp).unwrap();
        let dir = std::env::temp_dir().join(format!("infl-gpt2-rt-{}", std::process::id()));
        model.save(&dir).unwrap();
        let back = Gpt2::load(&dir, ModuleSelection::Mlp).unwrap();
        assert_eq!(back.tracked(), model.tracked());
        assert_eq!(
            model.logits(&[1, 2, 3]).unwrap(),
            back.logits(&[1, 2, 3]).unwrap()
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Identity-strategy scores from the taps equal dot products of per-sequence weight
    /// gradients computed by autograd on the weights themselves.
    #[test]
    fn identity_scores_equal_autograd_weight_gradient_dot_products() {
        use crate::curvature::{Factors, LayerFactors, Strategy};
        use crate::data::{Query, Sequence};
        use crate::influence::{precondition_queries, score_dense, Damping, Preconditioner};
        use crate::pass::Silent;

        let mut model = Gpt2::random(tiny_config(), 5, ModuleSelection::All).unwrap();
        let mut params: Vec<(Var, Var)> = Vec::new();
        for block in model.blocks.iter_mut() {
            for conv in [
                &mut block.c_attn,
                &mut block.c_proj,
                &mut block.c_fc,
                &mut block.mlp_proj,
            ] {
                let (w, b) = (
                    Var::from_tensor(&conv.weight).unwrap(),
                    Var::from_tensor(&conv.bias).unwrap(),
                );
                conv.weight = w.as_tensor().clone();
                conv.bias = b.as_tensor().clone();
                params.push((w, b));
            }
        }
        let grad_of = |batch: &TokenBatch| -> Vec<f64> {
            let probes = model.zero_probes(batch.len() * batch.max_len()).unwrap();
            let (_, grads) = model.run(batch, Labels::Data, &probes).unwrap();
            params
                .iter()
                .flat_map(|(w, b)| {
                    let w = grads
                        .get(w)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let b = grads.get(b).unwrap().to_vec1::<f32>().unwrap();
                    w.into_iter().chain(b).map(f64::from)
                })
                .collect()
        };
        let train: Vec<Sequence> = [vec![1u32, 5, 7, 2, 9], vec![3, 4, 22, 8], vec![6, 6, 1]]
            .into_iter()
            .enumerate()
            .map(|(k, ids)| Sequence {
                id: format!("{k}:0"),
                ids,
            })
            .collect();
        let queries: Vec<Query> = [(vec![2u32, 3], vec![4u32, 5]), (vec![7, 8, 9], vec![1])]
            .into_iter()
            .enumerate()
            .map(|(k, (p, c))| Query {
                id: k.to_string(),
                prompt_ids: p,
                completion_ids: c,
                prompt: None,
                completion: None,
            })
            .collect();

        let factors = Factors {
            strategy: Strategy::Identity,
            layers: model
                .tracked()
                .iter()
                .map(|l| LayerFactors {
                    layer: l.clone(),
                    n_tokens: 0,
                    n_sequences: 0,
                    covariance: None,
                    eigen: None,
                    lambda: None,
                })
                .collect(),
        };
        let pre = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
        let pq = precondition_queries(&model, &queries, &pre, 2, None, false, &Silent).unwrap();
        let scores = score_dense(&model, &pq, &train, 2, &Silent).unwrap();

        for (qi, q) in queries.iter().enumerate() {
            let gq = grad_of(&TokenBatch::queries(&[(
                0,
                &q.prompt_ids,
                &q.completion_ids,
            )]));
            for (n, s) in train.iter().enumerate() {
                let gn = grad_of(&TokenBatch::training(&[(0, &s.ids)]));
                let want: f64 = gq.iter().zip(&gn).map(|(a, b)| a * b).sum();
                let got = scores[qi][n];
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "query {qi}, train {n}: taps give {got}, autograd weight gradients give {want}"
                );
            }
        }
    }

    /// The gradients in the eigenbasis come out the same whether the tokens are rotated first
    /// or each summed gradient is, and scaling then rotating back is the preconditioner itself.
    #[test]
    fn basis_gradients_agree_in_both_orders_and_with_the_dense_rotation() {
        use crate::curvature::{fit, Fisher, FitOptions, Strategy};
        use crate::data::Sequence;
        use crate::influence::{column_as_matrix, sequence_gradients, Damping, Preconditioner};
        use crate::pass::Silent;

        let model = Gpt2::random(tiny_config(), 11, ModuleSelection::All).unwrap();
        let seqs: Vec<Sequence> = (0..6u32)
            .map(|k| Sequence {
                id: format!("{k}:0"),
                ids: (0..4 + 2 * k).map(|t| (t * 7 + k * 3) % 23).collect(),
            })
            .collect();
        let options = FitOptions {
            strategy: Strategy::Ekfac,
            fisher: Fisher::Empirical,
            batch_size: 3,
            seed: 1,
        };
        let factors = fit(&model, &seqs, &options, &Silent).unwrap();
        let pre = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
        let refs: Vec<(u64, &[u32])> = seqs.iter().map(|s| (0, s.ids.as_slice())).collect();
        let taps = model
            .taps(&TokenBatch::training(&refs), Labels::Data)
            .unwrap();
        for (index, l) in model.tracked().iter().enumerate() {
            let (d_o, d_i) = (l.d_out, l.d_in_h());
            let tokens = pre.basis_gradients_in(index, l, &taps, true);
            let summed = pre.basis_gradients_in(index, l, &taps, false);
            let grads = sequence_gradients(l, &taps, index);
            let e = factors.layers[index].eigen.as_ref().unwrap();
            for k in 0..seqs.len() {
                let g = column_as_matrix(&grads, k, d_o, d_i);
                // Q_Sᵀ G Q_A in f64.
                let want = faer::Mat::<f64>::from_fn(d_o, d_i, |o, i| {
                    let mut sum = 0.0;
                    for p in 0..d_o {
                        for r in 0..d_i {
                            sum += e.q_s[(p, o)] as f64 * g[(p, r)] as f64 * e.q_a[(r, i)] as f64;
                        }
                    }
                    sum
                });
                let scale = (0..d_i)
                    .flat_map(|i| (0..d_o).map(move |o| (o, i)))
                    .fold(1e-12f64, |m, (o, i)| m.max(want[(o, i)].abs()));
                for (what, got) in [("tokens first", &tokens), ("summed", &summed)] {
                    let r = column_as_matrix(got, k, d_o, d_i);
                    for i in 0..d_i {
                        for o in 0..d_o {
                            let err = (r[(o, i)] as f64 - want[(o, i)]).abs();
                            assert!(
                                err <= 1e-4 * scale,
                                "{} seq {k} ({what}) [{o},{i}]: {} vs {}",
                                l.name,
                                r[(o, i)],
                                want[(o, i)]
                            );
                        }
                    }
                }
                // Scaled in the basis and rotated back: the preconditioned gradient.
                let scaled = pre.scale_columns(index, &tokens);
                let s = faer::MatRef::from_column_major_slice(
                    &scaled[k * d_o * d_i..(k + 1) * d_o * d_i],
                    d_o,
                    d_i,
                );
                let back = pre.from_basis(index, s.to_owned());
                let direct = pre.apply(index, g);
                let scale = (0..d_i)
                    .flat_map(|i| (0..d_o).map(move |o| (o, i)))
                    .fold(1e-12f32, |m, (o, i)| m.max(direct[(o, i)].abs()));
                for i in 0..d_i {
                    for o in 0..d_o {
                        assert!((back[(o, i)] - direct[(o, i)]).abs() <= 1e-4 * scale);
                    }
                }
            }
        }
    }

    /// The scoring pass's blocked scores equal per-sequence gradients dotted with the queries
    /// (in f64), at widths that cut the layers into several uneven blocks, and do not depend on
    /// the thread count.
    #[test]
    fn batch_scores_equal_dots_of_per_sequence_gradients() {
        use crate::influence::{batch_scores, sequence_gradients, LayerQueries};
        let config = Gpt2Config {
            n_embd: 100,
            n_layer: 1,
            n_head: 2,
            ..tiny_config()
        };
        let model = Gpt2::random(config, 4, ModuleSelection::All).unwrap();
        let refs: Vec<(u64, Vec<u32>)> = (0..5u32)
            .map(|k| (k as u64, (0..3 + 2 * k).map(|t| (t * 5 + k) % 23).collect()))
            .collect();
        let refs: Vec<(u64, &[u32])> = refs.iter().map(|(i, s)| (*i, s.as_slice())).collect();
        let taps = model
            .taps(&TokenBatch::training(&refs), Labels::Data)
            .unwrap();
        let tracked = model.tracked().to_vec();
        let nq = 3;
        let queries: Vec<LayerQueries> = tracked
            .iter()
            .map(|l| {
                LayerQueries::Full(faer::Mat::from_fn(l.d_out * l.d_in_h(), nq, |i, q| {
                    ((i * 7 + q * 13) % 29) as f32 / 29.0 - 0.5
                }))
            })
            .collect();
        // 101 and 401 inputs with the bias: one block, and two of 201 and 200 columns.
        assert!(tracked.iter().any(|l| l.d_in_h() == 401));
        let got = batch_scores(&tracked, &queries, &taps);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let serial = one.install(|| batch_scores(&tracked, &queries, &taps));
        for (i, l) in tracked.iter().enumerate() {
            let grads = sequence_gradients(l, &taps, i);
            let LayerQueries::Full(stack) = &queries[i] else {
                unreachable!()
            };
            for s in 0..refs.len() {
                for q in 0..nq {
                    let want: f64 = (0..grads.nrows())
                        .map(|r| grads[(r, s)] as f64 * stack[(r, q)] as f64)
                        .sum();
                    // f32 products: the error scales with Σ|terms|, not with a sum that
                    // cancels (seen: 3.5e-6 on a dot of 0.052 whose terms sum to 461 in
                    // absolute value, on AVX2; 8e-9 of Σ|terms| at worst).
                    let scale: f64 = (0..grads.nrows())
                        .map(|r| (grads[(r, s)] as f64 * stack[(r, q)] as f64).abs())
                        .sum();
                    let v = got[i][(q, s)] as f64;
                    assert!(
                        (v - want).abs() <= 1e-5 * want.abs().max(1e-3) + 1e-7 * scale,
                        "{} seq {s} query {q}: {v} vs {want}",
                        l.name
                    );
                    assert_eq!(got[i][(q, s)], serial[i][(q, s)], "thread count");
                }
            }
        }
    }
}
