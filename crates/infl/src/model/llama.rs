//! The Llama family (`llama`, `mistral`, `qwen2` checkpoints; also the Llama GGUF files of
//! [`super::gguf`]): RMSNorm, RoPE (with `rope_scaling` "linear" / "llama3"), SwiGLU MLP,
//! grouped-query attention, tied or untied embeddings, optional q/k/v(/o) biases, Mistral's
//! sliding window.
//!
//! Tracked layers, by checkpoint name: `model.layers.N.self_attn.{q,k,v,o}_proj` (attn) and
//! `model.layers.N.mlp.{gate,up,down}_proj` (mlp).

use super::ops::{self, Forward, Linear, LinearLoader, Recorder, RmsNorm, Rotary};
use super::weights::Weights;
use super::{Labels, ModuleSelection, TapBatch, TapModel, TokenBatch, TrackedLayer};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use std::path::Path;

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's band-wise rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The fields of a Llama-family config that change the computation.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: String,
    pub sliding_window: Option<usize>,
}

/// Reads a config.json field, with a message naming the file and field.
pub(crate) struct Fields<'a> {
    pub v: &'a Value,
    pub path: &'a Path,
}

impl Fields<'_> {
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| {
            Error::input(format!("{}: field `{key}` is missing", self.path.display()))
        })
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(|u| Some(u as usize)).ok_or_else(|| {
                Error::input(format!(
                    "{}: field `{key}` must be a non-negative integer, got {x}",
                    self.path.display()
                ))
            }),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| {
                Error::input(format!(
                    "{}: field `{key}` must be a number, got {x}",
                    self.path.display()
                ))
            }),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| {
                Error::input(format!(
                    "{}: field `{key}` must be true or false, got {x}",
                    self.path.display()
                ))
            }),
        }
    }

    pub fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(x) => x.as_str().map(String::from).ok_or_else(|| {
                Error::input(format!(
                    "{}: field `{key}` must be a string, got {x}",
                    self.path.display()
                ))
            }),
        }
    }
}

impl LlamaConfig {
    /// Parses a transformers config.json (legacy `rope_theta`/`rope_scaling` keys or the newer
    /// `rope_parameters`).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { v, path };
        let model_type = f.str_or("model_type", "llama")?;
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || (hidden_size % num_attention_heads != 0 && f.usize_opt("head_dim")?.is_none())
        {
            return Err(Error::input(format!(
                "{}: hidden_size ({hidden_size}) must be a positive multiple of num_attention_heads ({num_attention_heads})",
                path.display()
            )));
        }
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::input(format!(
                "{}: num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})",
                path.display()
            )));
        }
        let head_dim = f
            .usize_opt("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);
        let rope_params = v.get("rope_parameters").filter(|x| x.is_object());
        let rope_theta = match rope_params {
            Some(rp) => Fields { v: rp, path }.f64_or("rope_theta", 10000.0)?,
            None => f.f64_or("rope_theta", 10000.0)?,
        };
        let scaling_value = rope_params.or(v.get("rope_scaling").filter(|x| !x.is_null()));
        let rope_scaling = match scaling_value {
            None => RopeScaling::None,
            Some(s) => parse_rope_scaling(s, path)?,
        };
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            "mistral" => (false, false),
            _ => {
                let b = f.bool_or("attention_bias", false)?;
                (b, b)
            }
        };
        let mlp_bias = f.bool_or("mlp_bias", false)?;
        let hidden_act = f.str_or("hidden_act", "silu")?;
        if !ops::supported_activation(&hidden_act) {
            return Err(Error::input(format!(
                "{}: hidden_act `{hidden_act}` is not supported",
                path.display()
            )));
        }
        let sliding_window = match model_type.as_str() {
            "mistral" => f.usize_opt("sliding_window")?,
            "qwen2" => {
                if f.bool_or("use_sliding_window", false)? {
                    return Err(Error::input(format!(
                        "{}: qwen2 with use_sliding_window = true (per-layer sliding windows) is not supported",
                        path.display()
                    )));
                }
                None
            }
            _ => None,
        };
        Ok(LlamaConfig {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            hidden_act,
            sliding_window,
            model_type,
        })
    }

    /// RoPE inverse frequencies after scaling.
    pub fn inv_freq(&self) -> Vec<f64> {
        let base = ops::inv_freq(self.rope_theta, self.head_dim);
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base
                .iter()
                .map(|f| (*f as f32 / *factor as f32) as f64)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(s: &Value, path: &Path) -> Result<RopeScaling> {
    let f = Fields { v: s, path };
    let kind = match s.get("rope_type").or(s.get("type")) {
        Some(Value::String(k)) => k.clone(),
        _ => "default".to_string(),
    };
    let factor = || -> Result<f64> {
        s.get("factor").and_then(Value::as_f64).ok_or_else(|| {
            Error::input(format!(
                "{}: rope scaling `{kind}` needs a numeric `factor`",
                path.display()
            ))
        })
    };
    match kind.as_str() {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f.f64_or("low_freq_factor", 1.0)?,
            high_freq_factor: f.f64_or("high_freq_factor", 4.0)?,
            original_max_position_embeddings: f
                .f64_or("original_max_position_embeddings", 8192.0)?,
        }),
        other => Err(Error::input(format!(
            "{}: rope scaling type `{other}` is not supported (supported: default, linear, llama3)",
            path.display()
        ))),
    }
}

pub(crate) struct Block {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

/// A Llama-family causal LM.
pub struct Llama {
    pub(crate) config: LlamaConfig,
    pub(crate) embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Tensor,
    pub(crate) tracked: Vec<TrackedLayer>,
    pub(crate) n_parameters: usize,
}

impl Llama {
    /// Loads `config.json` and the safetensors weights of a checkpoint directory.
    pub fn load(dir: &Path, modules: ModuleSelection) -> Result<Self> {
        Self::load_on(dir, modules, &Device::Cpu)
    }

    /// [`Self::load`] with the weights on `device` (the autograd engine then runs there).
    pub fn load_on(dir: &Path, modules: ModuleSelection, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", config_path.display())))?;
        let config = LlamaConfig::from_json(&v, &config_path)?;
        let weights = Weights::open(dir)?.on(device);
        Self::from_weights(config, &weights, modules)
    }

    /// Builds the model from tensors named as in a transformers checkpoint.
    pub fn from_weights(
        config: LlamaConfig,
        w: &Weights,
        modules: ModuleSelection,
    ) -> Result<Self> {
        let c = &config;
        let (d, v, di) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let (hq, hk) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut l = LinearLoader::new(w, modules);
        let embed = l.tensor("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let norm = |l: &mut LinearLoader, name: &str| -> Result<RmsNorm> {
                Ok(RmsNorm {
                    weight: l.tensor(&format!("{p}.{name}.weight"), &[d])?,
                    eps: c.rms_norm_eps,
                })
            };
            let input_layernorm = norm(&mut l, "input_layernorm")?;
            let (attn, mlp) = (ModuleSelection::Attn, ModuleSelection::Mlp);
            let q = l.linear(&format!("{p}.self_attn.q_proj"), d, hq, c.qkv_bias, attn)?;
            let k = l.linear(&format!("{p}.self_attn.k_proj"), d, hk, c.qkv_bias, attn)?;
            let v_ = l.linear(&format!("{p}.self_attn.v_proj"), d, hk, c.qkv_bias, attn)?;
            let o = l.linear(&format!("{p}.self_attn.o_proj"), hq, d, c.o_bias, attn)?;
            let post_attention_layernorm = norm(&mut l, "post_attention_layernorm")?;
            let gate = l.linear(&format!("{p}.mlp.gate_proj"), d, di, c.mlp_bias, mlp)?;
            let up = l.linear(&format!("{p}.mlp.up_proj"), d, di, c.mlp_bias, mlp)?;
            let down = l.linear(&format!("{p}.mlp.down_proj"), di, d, c.mlp_bias, mlp)?;
            blocks.push(Block {
                input_layernorm,
                q,
                k,
                v: v_,
                o,
                post_attention_layernorm,
                gate,
                up,
                down,
            });
        }
        let norm = RmsNorm {
            weight: l.tensor("model.norm.weight", &[d])?,
            eps: c.rms_norm_eps,
        };
        // An explicit lm_head wins; without one the embeddings are tied (as transformers does
        // when tie_word_embeddings is set and the checkpoint omits the head).
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            match w.get_opt("lm_head.weight", &[v, d])? {
                Some(h) => {
                    l.n_parameters += h.elem_count();
                    h
                }
                None => {
                    return Err(Error::input(format!(
                        "{}: tensor `lm_head.weight` is missing and tie_word_embeddings is false",
                        w.source()
                    )))
                }
            }
        };
        let (tracked, n_parameters) = (l.tracked, l.n_parameters);
        Ok(Llama {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            tracked,
            n_parameters,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn forward(
        &self,
        ids: &[Vec<u32>],
        t: usize,
        probes: &[Tensor],
    ) -> candle_core::Result<Forward> {
        let c = &self.config;
        let b = ids.len();
        let dev = self.embed.device().clone();
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let mut x = self
            .embed
            .index_select(&ops::padded_ids(ids, t, &dev)?, 0)?;
        let mask = ops::causal_mask(t, c.sliding_window, &dev)?;
        let rotary = Rotary::new(&c.inv_freq(), t, &dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut rec = Recorder::new(probes);
        for block in &self.blocks {
            let hidden = block.input_layernorm.forward(&x)?;
            let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = heads(rec.linear(&block.q, &hidden)?, h)?;
            let k = heads(rec.linear(&block.k, &hidden)?, kv)?;
            let v = heads(rec.linear(&block.v, &hidden)?, kv)?;
            let (q, k) = (rotary.apply(&q)?, rotary.apply(&k)?);
            let attn = ops::attention(&q, &k, &v, &mask, scale)?;
            x = (x + rec.linear(&block.o, &attn)?)?;
            let hidden = block.post_attention_layernorm.forward(&x)?;
            let gate = ops::activation(&c.hidden_act, &rec.linear(&block.gate, &hidden)?)?;
            let up = rec.linear(&block.up, &hidden)?;
            x = (x + rec.linear(&block.down, &(gate * up)?)?)?;
        }
        let x = self.norm.forward(&x)?;
        let logits = x
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, c.vocab_size))?;
        Ok(Forward {
            logits,
            inputs: rec.finish()?,
        })
    }

    fn run(
        &self,
        batch: &TokenBatch,
        labels: Labels,
        probes: &[Var],
    ) -> Result<(TapBatch, candle_core::backprop::GradStore)> {
        ops::run_taps(
            &self.tracked,
            self.config.vocab_size,
            batch,
            labels,
            probes,
            |ids, t, p| self.forward(ids, t, p),
        )
    }
}

impl TapModel for Llama {
    fn architecture(&self) -> &str {
        &self.config.model_type
    }

    fn tracked(&self) -> &[TrackedLayer] {
        &self.tracked
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn n_parameters(&self) -> usize {
        self.n_parameters
    }

    /// On a GPU one batch keeps the device busy and the cores form its statistics; on the
    /// CPU the driver runs batches side by side instead.
    fn is_threaded(&self) -> bool {
        !self.embed.device().is_cpu()
    }

    fn device(&self) -> super::ComputeDevice {
        super::ComputeDevice::of(self.embed.device())
    }

    fn taps(&self, batch: &TokenBatch, labels: Labels) -> Result<TapBatch> {
        let probes = ops::zero_probes(
            &self.tracked,
            batch.len() * batch.max_len(),
            self.embed.device(),
        )?;
        Ok(self.run(batch, labels, &probes)?.0)
    }

    fn block_shape(&self) -> super::BlockShape {
        super::BlockShape {
            layers: self.config.num_hidden_layers,
            heads: self.config.num_attention_heads,
            hidden: self.config.hidden_size,
            intermediate: self.config.intermediate_size,
        }
    }

    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        ops::single_logits(&self.tracked, ids, self.embed.device(), |i, t, p| {
            self.forward(i, t, p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testing::*;

    fn load(name: &str, modules: ModuleSelection) -> Llama {
        Llama::load(&fixture(name), modules).unwrap()
    }

    #[test]
    fn logits_match_transformers() {
        for name in ["llama", "llama_linear_rope", "qwen2", "mistral"] {
            let m = load(name, ModuleSelection::All);
            let diff = max_logit_diff(&m, &fixture(name).join("reference.json"));
            eprintln!("{name}: max |logit diff| = {diff:e}");
            assert!(diff < 1e-4, "{name}: max |logit diff| {diff}");
        }
    }

    #[test]
    fn configs_parse_as_expected() {
        let m = load("llama", ModuleSelection::All);
        assert!(m.config.tie_word_embeddings);
        assert!(matches!(m.config.rope_scaling, RopeScaling::Llama3 { .. }));
        assert_eq!(m.config.num_key_value_heads, 2);
        let q = load("qwen2", ModuleSelection::Attn);
        assert!(q.tracked()[0].has_bias && !q.tracked()[3].has_bias);
        assert_eq!(q.tracked()[0].name, "model.layers.0.self_attn.q_proj");
        let q = load("qwen2", ModuleSelection::Mlp);
        assert_eq!(q.tracked().len(), 6);
        assert_eq!(q.tracked()[2].name, "model.layers.0.mlp.down_proj");
    }

    #[test]
    fn tap_tests() {
        for name in ["llama", "qwen2", "mistral"] {
            let m = load(name, ModuleSelection::All);
            every_probe_receives_a_gradient(&m);
            taps_do_not_depend_on_padding(&m);
            taps_match_finite_differences(&m.tracked, |p| {
                m.run(&batch(), Labels::Data, p).unwrap()
            });
        }
    }

    #[test]
    fn sliding_window_limits_attention() {
        let mut m = load("mistral", ModuleSelection::All);
        let ids = [1u32, 5, 9, 33, 2, 60, 17, 8];
        let full = m.logits(&ids).unwrap();
        m.config.sliding_window = Some(3);
        let windowed = m.logits(&ids).unwrap();
        let v = m.config.vocab_size;
        // The first 3 positions see at most 3 keys either way; later ones differ.
        assert_eq!(&full[..3 * v], &windowed[..3 * v]);
        assert!(full[7 * v..]
            .iter()
            .zip(&windowed[7 * v..])
            .any(|(a, b)| (a - b).abs() > 1e-4));
    }

    #[test]
    fn unknown_rope_scaling_is_rejected() {
        let v = serde_json::json!({"model_type": "llama", "vocab_size": 8, "hidden_size": 4,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "rope_scaling": {"rope_type": "yarn", "factor": 2.0}});
        let err = LlamaConfig::from_json(&v, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("yarn") && err.contains("c.json"), "{err}");
    }
}
