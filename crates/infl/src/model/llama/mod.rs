//! The Llama family (`llama`, `mistral`, `qwen2` checkpoints, the mixtures of experts
//! `mixtral`, `qwen2_moe`, `qwen3_moe`; also the Llama GGUF files of [`super::gguf`]): RMSNorm,
//! RoPE (with `rope_scaling` "linear" / "llama3"), SwiGLU MLP or expert block ([`super::moe`]),
//! grouped-query attention, tied or untied embeddings, optional q/k/v(/o) biases, Qwen3's
//! per-head q/k RMSNorm, Mistral's sliding window.
//!
//! Tracked layers, by checkpoint name: `model.layers.N.self_attn.{q,k,v,o}_proj` (attn) and
//! `model.layers.N.mlp.{gate,up,down}_proj` (mlp), or an expert block's router and experts
//! (`model.layers.N.mlp.gate`, `model.layers.N.mlp.experts.E.down_proj`, …; mlp).
//!
//! This file holds the config and the mapping of checkpoint names onto the model;
//! `autograd.rs` the reference forward with taps, `fast.rs` the fast engine's net.

mod autograd;
pub mod fast;

use super::autograd::{supported_activation, Linear, LinearLoader, RmsNorm};
use super::lora::Adapter;
use super::moe::{HfMoeFields, MoeBlock, MoeConfig};
use super::rope::{self, RopeParameters};
use super::weights::Weights;
use super::{ModuleSelection, TrackedLayer};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

pub use super::rope::RopeScaling;

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
    /// Qwen3's RMSNorm over each head of q and k (before RoPE).
    pub qk_norm: bool,
    /// The expert blocks of a mixture of experts.
    pub moe: Option<MoeConfig>,
}

/// A Llama-family `config.json` as transformers writes it (legacy `rope_theta`/`rope_scaling`
/// keys or the newer `rope_parameters`); absent or null fields take transformers' defaults in
/// [`LlamaConfig::from_hf`].
#[derive(Debug, Clone, serde::Deserialize)]
struct HfLlamaConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeParameters>,
    rope_parameters: Option<RopeParameters>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    qkv_bias: Option<bool>,
    #[serde(flatten)]
    moe: HfMoeFields,
}

impl LlamaConfig {
    /// Parses a transformers config.json (`path` names it in errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        Self::from_hf(super::parse_config(v.clone(), path, "Llama-family")?, path)
    }

    /// Checks the shapes and settings of a parsed config and applies transformers' defaults.
    fn from_hf(c: HfLlamaConfig, path: &Path) -> Result<Self> {
        let bad = |msg: String| Err(Error::input(format!("{}: {msg}", path.display())));
        let model_type = c.model_type.unwrap_or_else(|| "llama".into());
        let (hidden_size, num_attention_heads) = (c.hidden_size, c.num_attention_heads);
        let num_key_value_heads = c.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || (hidden_size % num_attention_heads != 0 && c.head_dim.is_none())
        {
            return bad(format!(
                "hidden_size ({hidden_size}) must be a positive multiple of num_attention_heads ({num_attention_heads})"
            ));
        }
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let rope_theta = match &c.rope_parameters {
            Some(rp) => rp.rope_theta.unwrap_or(10000.0),
            None => c.rope_theta.unwrap_or(10000.0),
        };
        let rope_scaling = match c.rope_parameters.as_ref().or(c.rope_scaling.as_ref()) {
            None => RopeScaling::None,
            Some(s) => s.scaling(path)?,
        };
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            "qwen2_moe" => (c.qkv_bias.unwrap_or(true), false),
            "mistral" | "mixtral" => (false, false),
            _ => {
                let b = c.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        let hidden_act = c.hidden_act.unwrap_or_else(|| "silu".into());
        if !supported_activation(&hidden_act) {
            return bad(format!("hidden_act `{hidden_act}` is not supported"));
        }
        let sliding_window = match model_type.as_str() {
            "mistral" | "mixtral" => c.sliding_window,
            "qwen2" | "qwen2_moe" | "qwen3_moe" if c.use_sliding_window.unwrap_or(false) => {
                return bad(
                    "qwen2 with use_sliding_window = true (per-layer sliding windows) is not supported"
                        .into(),
                );
            }
            _ => None,
        };
        let moe = MoeConfig::from_hf(&model_type, &c.moe, c.intermediate_size, path)?;
        Ok(LlamaConfig {
            qk_norm: model_type == "qwen3_moe",
            moe,
            vocab_size: c.vocab_size,
            hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: c.head_dim.unwrap_or(hidden_size / num_attention_heads),
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: c.mlp_bias.unwrap_or(false),
            hidden_act,
            sliding_window,
            model_type,
        })
    }

    /// RoPE inverse frequencies after scaling.
    pub fn inv_freq(&self) -> Vec<f64> {
        self.rope_scaling
            .apply(rope::inv_freq(self.rope_theta, self.head_dim))
    }
}

pub(crate) struct Block {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    /// Qwen3's per-head norms of q and k.
    pub(crate) qk_norm: Option<[RmsNorm; 2]>,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) mlp: Mlp,
}

/// A block's feed-forward: the dense SwiGLU MLP or an expert block.
// One per block, a few dozen at most: the inline size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Mlp {
    Dense {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    Moe(Box<MoeBlock>),
}

impl Mlp {
    /// Every linear layer, in load order.
    pub(crate) fn linears(&mut self) -> Vec<&mut Linear> {
        match self {
            Mlp::Dense { gate, up, down } => vec![gate, up, down],
            Mlp::Moe(m) => m.linears(),
        }
    }
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
        let (hf, path) = super::read_config(dir, "Llama-family")?;
        let config = LlamaConfig::from_hf(hf, &path)?;
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
            let qk_norm = if c.qk_norm {
                let head_norm = |l: &mut LinearLoader, name: &str| -> Result<RmsNorm> {
                    Ok(RmsNorm {
                        weight: l.tensor(&format!("{p}.self_attn.{name}.weight"), &[c.head_dim])?,
                        eps: c.rms_norm_eps,
                    })
                };
                Some([head_norm(&mut l, "q_norm")?, head_norm(&mut l, "k_norm")?])
            } else {
                None
            };
            let post_attention_layernorm = norm(&mut l, "post_attention_layernorm")?;
            let mlp = match &c.moe {
                Some(moe) if moe.is_sparse(i) => {
                    Mlp::Moe(Box::new(MoeBlock::load(&mut l, moe, i, d)?))
                }
                _ => Mlp::Dense {
                    gate: l.linear(&format!("{p}.mlp.gate_proj"), d, di, c.mlp_bias, mlp)?,
                    up: l.linear(&format!("{p}.mlp.up_proj"), d, di, c.mlp_bias, mlp)?,
                    down: l.linear(&format!("{p}.mlp.down_proj"), di, d, c.mlp_bias, mlp)?,
                },
            };
            blocks.push(Block {
                input_layernorm,
                q,
                k,
                v: v_,
                o,
                qk_norm,
                post_attention_layernorm,
                mlp,
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
}

impl Llama {
    /// Applies a LoRA adapter to the blocks' linear layers, in load order
    /// ([`crate::model::lora::Adapter::attach`]).
    pub fn attach(&mut self, adapter: &Adapter, modules: ModuleSelection) -> Result<()> {
        let linears = self.blocks.iter_mut().flat_map(|b| {
            let mut all = vec![&mut b.q, &mut b.k, &mut b.v, &mut b.o];
            all.extend(b.mlp.linears());
            all
        });
        let (tracked, n_parameters) = adapter.attach(linears, modules)?;
        self.tracked = tracked;
        self.n_parameters += n_parameters;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::fixture;
    use crate::model::TapModel;

    fn load(name: &str, modules: ModuleSelection) -> Llama {
        Llama::load(&fixture(name), modules).unwrap()
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
