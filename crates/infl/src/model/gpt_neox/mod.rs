//! GPT-NeoX (`gpt_neox` checkpoints: Pythia, GPT-NeoX-20B): fused `query_key_value` whose output
//! is laid out per head as `[heads, 3, head_dim]`, partial rotary embeddings (`rotary_pct`),
//! parallel or sequential residual (`use_parallel_residual`), LayerNorm, untied `embed_out`.
//!
//! Tracked layers, by checkpoint name: `gpt_neox.layers.N.attention.{query_key_value,dense}`
//! (attn) and `gpt_neox.layers.N.mlp.{dense_h_to_4h,dense_4h_to_h}` (mlp).
//!
//! This file holds the config and the mapping of checkpoint names onto the model;
//! `autograd.rs` the reference forward with taps, `fast.rs` the fast engine's net.

mod autograd;
pub mod fast;

use super::autograd::{supported_activation, LayerNorm, Linear, LinearLoader};
use super::lora::Adapter;
use super::rope::RopeParameters;
use super::weights::Weights;
use super::{ModuleSelection, TrackedLayer};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// The fields of a GPT-NeoX config that change the computation.
#[derive(Debug, Clone)]
pub struct GptNeoXConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub rotary_pct: f64,
    pub rotary_emb_base: f64,
    pub use_parallel_residual: bool,
    pub hidden_act: String,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
}

/// A GPT-NeoX `config.json` as transformers writes it (legacy `rotary_pct`/`rotary_emb_base`
/// or the newer `rope_parameters`); absent or null fields take transformers' defaults in
/// [`GptNeoXConfig::from_hf`].
#[derive(Debug, Clone, serde::Deserialize)]
struct HfGptNeoXConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: Option<usize>,
    layer_norm_eps: Option<f64>,
    rotary_pct: Option<f64>,
    rotary_emb_base: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde::de::IgnoredAny>,
    use_parallel_residual: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
}

impl GptNeoXConfig {
    /// Parses config.json (`path` names it in errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        Self::from_hf(super::parse_config(v.clone(), path, "GPT-NeoX")?, path)
    }

    /// Checks the shapes and settings of a parsed config and applies transformers' defaults.
    fn from_hf(c: HfGptNeoXConfig, path: &Path) -> Result<Self> {
        let bad = |msg: String| Err(Error::input(format!("{}: {msg}", path.display())));
        let (hidden_size, heads) = (c.hidden_size, c.num_attention_heads);
        if heads == 0 || hidden_size % heads != 0 {
            return bad(format!(
                "hidden_size ({hidden_size}) must be a positive multiple of num_attention_heads ({heads})"
            ));
        }
        let legacy_pct = c.rotary_pct.unwrap_or(0.25);
        let legacy_base = c.rotary_emb_base.unwrap_or(10000.0);
        let (rotary_pct, rotary_emb_base) = match &c.rope_parameters {
            Some(rp) => {
                let kind = rp.kind();
                if kind != "default" {
                    return bad(format!(
                        "gpt_neox rope_type `{kind}` is not supported (only default)"
                    ));
                }
                (
                    rp.partial_rotary_factor.unwrap_or(legacy_pct),
                    rp.rope_theta.unwrap_or(legacy_base),
                )
            }
            None if c.rope_scaling.is_some() => {
                return bad("gpt_neox rope_scaling is not supported".into());
            }
            None => (legacy_pct, legacy_base),
        };
        if !(0.0..=1.0).contains(&rotary_pct) {
            return bad(format!("rotary_pct {rotary_pct} must lie in [0, 1]"));
        }
        let hidden_act = c.hidden_act.unwrap_or_else(|| "gelu".into());
        if !supported_activation(&hidden_act) {
            return bad(format!("hidden_act `{hidden_act}` is not supported"));
        }
        Ok(GptNeoXConfig {
            vocab_size: c.vocab_size,
            hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: heads,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            layer_norm_eps: c.layer_norm_eps.unwrap_or(1e-5),
            rotary_pct,
            rotary_emb_base,
            use_parallel_residual: c.use_parallel_residual.unwrap_or(true),
            hidden_act,
            attention_bias: c.attention_bias.unwrap_or(true),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        })
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// transformers: `int(head_size * rotary_pct)`.
    pub(crate) fn rotary_dims(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }
}

pub(crate) struct Block {
    pub(crate) input_layernorm: LayerNorm,
    pub(crate) post_attention_layernorm: LayerNorm,
    pub(crate) qkv: Linear,
    pub(crate) dense: Linear,
    pub(crate) h_to_4h: Linear,
    pub(crate) four_h_to_h: Linear,
}

/// A GPT-NeoX causal LM.
pub struct GptNeoX {
    pub(crate) config: GptNeoXConfig,
    pub(crate) embed_in: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) final_layer_norm: LayerNorm,
    pub(crate) embed_out: Tensor,
    pub(crate) tracked: Vec<TrackedLayer>,
    pub(crate) n_parameters: usize,
}

impl GptNeoX {
    pub fn load(dir: &Path, modules: ModuleSelection) -> Result<Self> {
        Self::load_on(dir, modules, &Device::Cpu)
    }

    /// [`Self::load`] with the weights on `device` (the autograd engine then runs there).
    pub fn load_on(dir: &Path, modules: ModuleSelection, device: &Device) -> Result<Self> {
        let (hf, path) = super::read_config(dir, "GPT-NeoX")?;
        let config = GptNeoXConfig::from_hf(hf, &path)?;
        let weights = Weights::open(dir)?.on(device);
        Self::from_weights(config, &weights, modules)
    }

    pub fn from_weights(
        config: GptNeoXConfig,
        w: &Weights,
        modules: ModuleSelection,
    ) -> Result<Self> {
        let c = &config;
        let (d, v, di) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let mut l = LinearLoader::new(w, modules);
        let embed_in = l.tensor("gpt_neox.embed_in.weight", &[v, d])?;
        let ln = |l: &mut LinearLoader, name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: l.tensor(&format!("{name}.weight"), &[d])?,
                bias: l.tensor(&format!("{name}.bias"), &[d])?,
                eps: c.layer_norm_eps,
            })
        };
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}");
            let (attn, mlp) = (ModuleSelection::Attn, ModuleSelection::Mlp);
            let input_layernorm = ln(&mut l, &format!("{p}.input_layernorm"))?;
            let post_attention_layernorm = ln(&mut l, &format!("{p}.post_attention_layernorm"))?;
            let b = c.attention_bias;
            let qkv = l.linear(&format!("{p}.attention.query_key_value"), d, 3 * d, b, attn)?;
            let dense = l.linear(&format!("{p}.attention.dense"), d, d, b, attn)?;
            let h_to_4h = l.linear(&format!("{p}.mlp.dense_h_to_4h"), d, di, true, mlp)?;
            let four_h_to_h = l.linear(&format!("{p}.mlp.dense_4h_to_h"), di, d, true, mlp)?;
            blocks.push(Block {
                input_layernorm,
                post_attention_layernorm,
                qkv,
                dense,
                h_to_4h,
                four_h_to_h,
            });
        }
        let final_layer_norm = ln(&mut l, "gpt_neox.final_layer_norm")?;
        let embed_out = if c.tie_word_embeddings {
            embed_in.clone()
        } else {
            l.tensor("embed_out.weight", &[v, d])?
        };
        let (tracked, n_parameters) = (l.tracked, l.n_parameters);
        Ok(GptNeoX {
            config,
            embed_in,
            blocks,
            final_layer_norm,
            embed_out,
            tracked,
            n_parameters,
        })
    }

    pub fn config(&self) -> &GptNeoXConfig {
        &self.config
    }
}

impl GptNeoX {
    /// Applies a LoRA adapter to the blocks' linear layers, in load order
    /// ([`crate::model::lora::Adapter::attach`]).
    pub fn attach(&mut self, adapter: &Adapter, modules: ModuleSelection) -> Result<()> {
        let linears = self
            .blocks
            .iter_mut()
            .flat_map(|b| [&mut b.qkv, &mut b.dense, &mut b.h_to_4h, &mut b.four_h_to_h]);
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

    #[test]
    fn mismatched_tensor_is_named() {
        let dir = fixture("gpt_neox_parallel");
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["intermediate_size"] = 48.into();
        let c = GptNeoXConfig::from_json(&v, &dir.join("config.json")).unwrap();
        let w = Weights::open(&dir).unwrap();
        let err = GptNeoX::from_weights(c, &w, ModuleSelection::All)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("gpt_neox.layers.0.mlp.dense_h_to_4h.weight") && err.contains("[40, 16]"),
            "{err}"
        );
    }
}
