//! The Llama family's tangent pass: [`Llama`]'s autograd forward (`model/llama/autograd.rs`)
//! op for op on [`Dual`]s: RMSNorm, grouped-query attention with (scaled) RoPE, Qwen3's q/k
//! norms, Mistral's sliding window, biases where the config has them, the dense SwiGLU MLP,
//! tied or untied head. Expert blocks are refused before a pass
//! ([`super::GaussNewton::new`]).

use super::dual::{attention, Directions, Dual};
use crate::model::autograd::{self, Rotary};
use crate::model::llama::{Llama, Mlp};

/// The logits `[b, t, vocab]` and their tangents `J v_k`, stacked `[n·b, t, vocab]`.
pub(super) fn tangent(
    model: &Llama,
    ids: &[Vec<u32>],
    t: usize,
    dirs: &Directions,
) -> candle_core::Result<Dual> {
    let c = &model.config;
    let b = ids.len();
    let dev = model.embed.device().clone();
    let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let mut x = Dual::constant(
        model
            .embed
            .index_select(&autograd::padded_ids(ids, t, &dev)?, 0)?,
        dirs.n(),
    )?;
    let mask = autograd::causal_mask(t, c.sliding_window, &dev)?;
    let rotary = Rotary::new(&c.inv_freq(), t, &dev)?;
    let scale = 1.0 / (hd as f64).sqrt();
    for block in &model.blocks {
        let hidden = x.rms_norm(&block.input_layernorm)?;
        let heads = |y: Dual, n: usize| {
            y.map(|m, copies| {
                m.reshape((copies * b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            })
        };
        let mut q = heads(hidden.linear(&block.q, dirs)?, h)?;
        let mut k = heads(hidden.linear(&block.k, dirs)?, kv)?;
        if let Some([q_norm, k_norm]) = &block.qk_norm {
            (q, k) = (q.rms_norm(q_norm)?, k.rms_norm(k_norm)?);
        }
        let v = heads(hidden.linear(&block.v, dirs)?, kv)?;
        let (q, k) = (q.rotate(&rotary)?, k.rotate(&rotary)?);
        let attn = attention(&q, &k, &v, &mask, scale)?;
        x = x.add(&attn.linear(&block.o, dirs)?)?;
        let hidden = x.rms_norm(&block.post_attention_layernorm)?;
        let Mlp::Dense { gate, up, down } = &block.mlp else {
            return Err(candle_core::Error::Msg(
                "internal: expert blocks have no tangent pass".into(),
            ));
        };
        let gated = hidden
            .linear(gate, dirs)?
            .activation(&c.hidden_act)?
            .mul(&hidden.linear(up, dirs)?)?;
        x = x.add(&gated.linear(down, dirs)?)?;
    }
    let head = model.lm_head.t()?;
    x.rms_norm(&model.norm)?
        .map(|y, copies| y.matmul(&head)?.reshape((copies * b, t, c.vocab_size)))
}
