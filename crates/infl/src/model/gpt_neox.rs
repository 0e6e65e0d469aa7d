//! GPT-NeoX (`gpt_neox` checkpoints: Pythia, GPT-NeoX-20B): fused `query_key_value` whose output
//! is laid out per head as `[heads, 3, head_dim]`, partial rotary embeddings (`rotary_pct`),
//! parallel or sequential residual (`use_parallel_residual`), LayerNorm, untied `embed_out`.
//!
//! Tracked layers, by checkpoint name: `gpt_neox.layers.N.attention.{query_key_value,dense}`
//! (attn) and `gpt_neox.layers.N.mlp.{dense_h_to_4h,dense_4h_to_h}` (mlp).

use super::llama::Fields;
use super::ops::{self, Forward, LayerNorm, Linear, LinearLoader, Recorder, Rotary};
use super::weights::Weights;
use super::{Labels, ModuleSelection, TapBatch, TapModel, TokenBatch, TrackedLayer};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor, Var};
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

impl GptNeoXConfig {
    /// Parses config.json: legacy `rotary_pct`/`rotary_emb_base` or newer `rope_parameters`.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { v, path };
        let hidden_size = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        if heads == 0 || hidden_size % heads != 0 {
            return Err(Error::input(format!(
                "{}: hidden_size ({hidden_size}) must be a positive multiple of num_attention_heads ({heads})",
                path.display()
            )));
        }
        let (rotary_pct, rotary_emb_base) = match v.get("rope_parameters").filter(|x| x.is_object())
        {
            Some(rp) => {
                let r = Fields { v: rp, path };
                let kind = r.str_or("rope_type", "default")?;
                if kind != "default" {
                    return Err(Error::input(format!(
                        "{}: gpt_neox rope_type `{kind}` is not supported (only default)",
                        path.display()
                    )));
                }
                (
                    r.f64_or("partial_rotary_factor", f.f64_or("rotary_pct", 0.25)?)?,
                    r.f64_or("rope_theta", f.f64_or("rotary_emb_base", 10000.0)?)?,
                )
            }
            None => {
                if v.get("rope_scaling").is_some_and(|s| !s.is_null()) {
                    return Err(Error::input(format!(
                        "{}: gpt_neox rope_scaling is not supported",
                        path.display()
                    )));
                }
                (
                    f.f64_or("rotary_pct", 0.25)?,
                    f.f64_or("rotary_emb_base", 10000.0)?,
                )
            }
        };
        if !(0.0..=1.0).contains(&rotary_pct) {
            return Err(Error::input(format!(
                "{}: rotary_pct {rotary_pct} must lie in [0, 1]",
                path.display()
            )));
        }
        let hidden_act = f.str_or("hidden_act", "gelu")?;
        if !ops::supported_activation(&hidden_act) {
            return Err(Error::input(format!(
                "{}: hidden_act `{hidden_act}` is not supported",
                path.display()
            )));
        }
        Ok(GptNeoXConfig {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: heads,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
            rotary_pct,
            rotary_emb_base,
            use_parallel_residual: f.bool_or("use_parallel_residual", true)?,
            hidden_act,
            attention_bias: f.bool_or("attention_bias", true)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        })
    }

    fn head_dim(&self) -> usize {
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
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", config_path.display())))?;
        let config = GptNeoXConfig::from_json(&v, &config_path)?;
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

    fn forward(
        &self,
        ids: &[Vec<u32>],
        t: usize,
        probes: &[Tensor],
    ) -> candle_core::Result<Forward> {
        let c = &self.config;
        let b = ids.len();
        let dev = self.embed_in.device().clone();
        let (h, hd) = (c.num_attention_heads, c.head_dim());
        let mut x = self
            .embed_in
            .index_select(&ops::padded_ids(ids, t, &dev)?, 0)?;
        let mask = ops::causal_mask(t, None, &dev)?;
        let rotary_dims = c.rotary_dims();
        let rotary = (rotary_dims >= 2)
            .then(|| Rotary::new(&ops::inv_freq(c.rotary_emb_base, rotary_dims), t, &dev));
        let rotary = rotary.transpose()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut rec = Recorder::new(probes);
        for block in &self.blocks {
            let hidden = block.input_layernorm.forward(&x)?;
            // Output columns are ordered [head, {q, k, v}, head_dim].
            let qkv = rec.linear(&block.qkv, &hidden)?.reshape((b, t, h, 3, hd))?;
            let part = |k: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(3, k, 1)?
                    .squeeze(3)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
            if let Some(r) = &rotary {
                q = r.apply(&q)?;
                k = r.apply(&k)?;
            }
            let attn = ops::attention(&q, &k, &v, &mask, scale)?;
            let attn_out = rec.linear(&block.dense, &attn)?;
            let mlp = |rec: &mut Recorder, input: &Tensor| -> candle_core::Result<Tensor> {
                let hidden = block.post_attention_layernorm.forward(input)?;
                let act = ops::activation(&c.hidden_act, &rec.linear(&block.h_to_4h, &hidden)?)?;
                rec.linear(&block.four_h_to_h, &act)
            };
            x = if c.use_parallel_residual {
                let m = mlp(&mut rec, &x)?;
                ((&x + attn_out)? + m)?
            } else {
                let h1 = (&x + attn_out)?;
                let m = mlp(&mut rec, &h1)?;
                (h1 + m)?
            };
        }
        let x = self.final_layer_norm.forward(&x)?;
        let logits = x
            .matmul(&self.embed_out.t()?)?
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

impl TapModel for GptNeoX {
    fn architecture(&self) -> &str {
        "gpt_neox"
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
        !self.embed_in.device().is_cpu()
    }

    fn device(&self) -> super::ComputeDevice {
        super::ComputeDevice::of(self.embed_in.device())
    }

    fn taps(&self, batch: &TokenBatch, labels: Labels) -> Result<TapBatch> {
        let probes = ops::zero_probes(
            &self.tracked,
            batch.len() * batch.max_len(),
            self.embed_in.device(),
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
        ops::single_logits(&self.tracked, ids, self.embed_in.device(), |i, t, p| {
            self.forward(i, t, p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::testing::*;

    #[test]
    fn logits_match_transformers() {
        for name in ["gpt_neox_parallel", "gpt_neox_sequential"] {
            let m = GptNeoX::load(&fixture(name), ModuleSelection::All).unwrap();
            assert_eq!(m.config.rotary_dims(), 4);
            let diff = max_logit_diff(&m, &fixture(name).join("reference.json"));
            eprintln!("{name}: max |logit diff| = {diff:e}");
            assert!(diff < 1e-4, "{name}: max |logit diff| {diff}");
        }
    }

    #[test]
    fn tap_tests() {
        for name in ["gpt_neox_parallel", "gpt_neox_sequential"] {
            let m = GptNeoX::load(&fixture(name), ModuleSelection::All).unwrap();
            assert_eq!(m.tracked().len(), 8);
            assert_eq!(
                m.tracked()[0].name,
                "gpt_neox.layers.0.attention.query_key_value"
            );
            every_probe_receives_a_gradient(&m);
            taps_do_not_depend_on_padding(&m);
            taps_match_finite_differences(&m.tracked, |p| {
                m.run(&batch(), Labels::Data, p).unwrap()
            });
        }
    }

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
