//! GPT-NeoX's reference forward on candle autograd, with a probe on every tracked layer's
//! output (its gradient is the tap g): fused qkv per head, partial rotary embeddings, parallel
//! or sequential residual.

use super::GptNeoX;
use crate::model::autograd::{self, Autograd, Forward, Recorder, Rotary, Spec};
use crate::model::{rope, BlockShape};
use candle_core::Tensor;

impl GptNeoX {
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
            .index_select(&autograd::padded_ids(ids, t, &dev)?, 0)?;
        let mask = autograd::causal_mask(t, None, &dev)?;
        let rotary_dims = c.rotary_dims();
        let rotary = (rotary_dims >= 2)
            .then(|| Rotary::new(&rope::inv_freq(c.rotary_emb_base, rotary_dims), t, &dev));
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
            let attn = autograd::attention(&q, &k, &v, &mask, scale)?;
            let attn_out = rec.linear(&block.dense, &attn)?;
            let mlp = |rec: &mut Recorder, input: &Tensor| -> candle_core::Result<Tensor> {
                let hidden = block.post_attention_layernorm.forward(input)?;
                let act =
                    autograd::activation(&c.hidden_act, &rec.linear(&block.h_to_4h, &hidden)?)?;
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
}

impl Autograd for GptNeoX {
    fn spec(&self) -> Spec<'_> {
        let c = &self.config;
        Spec {
            architecture: "gpt_neox",
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
            device: self.embed_in.device(),
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
}
