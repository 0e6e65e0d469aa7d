//! GPT-2 (Hugging Face `GPT2LMHeadModel` checkpoints), with candle autograd.
//!
//! Taps: every tracked linear computes `y = a W + b + probe`, where `probe` is a zero `Var`
//! of the output's shape. After the backward pass the probe's gradient is exactly
//! g = ∂L/∂y, and `a` is kept from the forward pass. Layer norm, softmax and GELU are composed
//! from elementary ops because candle's fused versions have no backward (they would silently
//! cut the graph); `tests::every_probe_receives_a_gradient` fails if any tap goes missing.
//!
//! This file holds the config and the mapping of checkpoint names onto the model (load, random
//! init, save); `autograd.rs` the reference forward with taps, `fast.rs` the fast engine's net.

mod autograd;
pub mod fast;

use super::autograd::LayerNorm;
use super::lora::{Adaptable, Adapter, Lora, Target};
use super::weights::Weights;
use super::{ModuleSelection, TrackedLayer};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
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

/// A Conv1D layer as GPT-2 stores it: weight `[in, out]`, `y = x W + b`, plus a LoRA
/// adapter's `B A x · scaling` when one is attached ([`super::lora`]).
pub(crate) struct Conv1D {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    /// Index among the tracked layers, if tracked.
    pub(crate) tap: Option<usize>,
    /// Tracked-layer name (the checkpoint's: `transformer.h.0.attn.c_attn` or `h.0.…`).
    pub(crate) name: String,
    /// Attention or MLP: which `--modules` selects the layer.
    pub(crate) kind: ModuleSelection,
    pub(crate) lora: Option<Lora>,
}

impl Adaptable for Conv1D {
    /// PEFT names the layer by the module tree of `GPT2LMHeadModel`, always under
    /// `transformer.`, and reads its in/out features from the `[in, out]` weight.
    fn target(&mut self) -> Result<Target<'_>> {
        let (d_in, d_out) = self.weight.dims2()?;
        let bare = self.name.strip_prefix("transformer.").unwrap_or(&self.name);
        Ok(Target {
            key: format!("transformer.{bare}"),
            name: &self.name,
            kind: self.kind,
            d_in,
            d_out,
            has_bias: true,
            device: self.weight.device(),
            tap: &mut self.tap,
            lora: &mut self.lora,
        })
    }
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
        let (config, path) = super::read_config::<Gpt2Config>(dir, "GPT-2")?;
        config.validate(&path)?;
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
                    let keep = modules == ModuleSelection::All || modules == kind;
                    let name = format!("{prefix}h.{i}.{local}");
                    let tap = keep.then(|| {
                        tracked.push(TrackedLayer {
                            name: name.clone(),
                            d_in,
                            d_out,
                            has_bias: true,
                        });
                        tracked.len() - 1
                    });
                    Ok(Conv1D {
                        weight: get(&format!("h.{i}.{local}.weight"), &[d_in, d_out])?,
                        bias: get(&format!("h.{i}.{local}.bias"), &[d_out])?,
                        tap,
                        name,
                        kind,
                        lora: None,
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

    /// Applies a LoRA adapter to the blocks' Conv1D layers, in load order
    /// ([`crate::model::lora::Adapter::attach`]).
    pub fn attach(&mut self, adapter: &Adapter, modules: ModuleSelection) -> Result<()> {
        let convs = self
            .blocks
            .iter_mut()
            .flat_map(|b| [&mut b.c_attn, &mut b.c_proj, &mut b.c_fc, &mut b.mlp_proj]);
        let (tracked, n_parameters) = adapter.attach(convs, modules)?;
        self.tracked = tracked;
        self.n_parameters += n_parameters;
        Ok(())
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::TapModel;

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
}
