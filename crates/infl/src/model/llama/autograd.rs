//! The Llama family's reference forward on candle autograd, with a probe on every tracked
//! layer's output (its gradient is the tap g): pre-norm blocks of grouped-query attention
//! with RoPE (and Mistral's sliding window) and a SwiGLU MLP.

use super::{Llama, Mlp};
use crate::model::autograd::{self, Autograd, Forward, Recorder, Rotary, Spec};
use crate::model::BlockShape;
use candle_core::Tensor;

impl Llama {
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
            .index_select(&autograd::padded_ids(ids, t, &dev)?, 0)?;
        let mask = autograd::causal_mask(t, c.sliding_window, &dev)?;
        let rotary = Rotary::new(&c.inv_freq(), t, &dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut rec = Recorder::new(probes);
        for block in &self.blocks {
            let hidden = block.input_layernorm.forward(&x)?;
            let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let mut q = heads(rec.linear(&block.q, &hidden)?, h)?;
            let mut k = heads(rec.linear(&block.k, &hidden)?, kv)?;
            if let Some([q_norm, k_norm]) = &block.qk_norm {
                (q, k) = (q_norm.forward(&q)?, k_norm.forward(&k)?);
            }
            let v = heads(rec.linear(&block.v, &hidden)?, kv)?;
            let (q, k) = (rotary.apply(&q)?, rotary.apply(&k)?);
            let attn = autograd::attention(&q, &k, &v, &mask, scale)?;
            x = (x + rec.linear(&block.o, &attn)?)?;
            let hidden = block.post_attention_layernorm.forward(&x)?;
            let mlp = match &block.mlp {
                Mlp::Dense { gate, up, down } => {
                    let gate = autograd::activation(&c.hidden_act, &rec.linear(gate, &hidden)?)?;
                    let up = rec.linear(up, &hidden)?;
                    rec.linear(down, &(gate * up)?)?
                }
                Mlp::Moe(moe) => moe.forward(&mut rec, &hidden, &c.hidden_act)?,
            };
            x = (x + mlp)?;
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
}

impl Autograd for Llama {
    fn spec(&self) -> Spec<'_> {
        let c = &self.config;
        Spec {
            architecture: &c.model_type,
            tracked: &self.tracked,
            vocab: c.vocab_size,
            max_positions: c.max_position_embeddings,
            n_parameters: self.n_parameters,
            shape: BlockShape {
                layers: c.num_hidden_layers,
                heads: c.num_attention_heads,
                hidden: c.hidden_size,
                intermediate: c.intermediate_size,
            },
            device: self.embed.device(),
        }
    }

    fn tapped_forward(
        &self,
        ids: &[Vec<u32>],
        padded_len: usize,
        probes: &[Tensor],
    ) -> candle_core::Result<Forward> {
        self.forward(ids, padded_len, probes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::*;
    use crate::model::{Labels, ModuleSelection, TapModel};

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
}
