//! GPT-NeoX's tangent pass: [`GptNeoX`]'s autograd forward (`model/gpt_neox/autograd.rs`) op
//! for op on [`Dual`]s: the fused `query_key_value` laid out `[head, {q, k, v}, head_dim]`,
//! partial rotary embeddings, parallel or sequential residual.

use super::dual::{attention, Directions, Dual};
use crate::model::autograd::{self, Rotary};
use crate::model::gpt_neox::GptNeoX;
use crate::model::rope;

/// The logits `[b, t, vocab]` and their tangents `J v_k`, stacked `[n·b, t, vocab]`.
pub(super) fn tangent(
    model: &GptNeoX,
    ids: &[Vec<u32>],
    t: usize,
    dirs: &Directions,
) -> candle_core::Result<Dual> {
    let c = &model.config;
    let b = ids.len();
    let dev = model.embed_in.device().clone();
    let (h, hd) = (c.num_attention_heads, c.head_dim());
    let mut x = Dual::constant(
        model
            .embed_in
            .index_select(&autograd::padded_ids(ids, t, &dev)?, 0)?,
        dirs.n(),
    )?;
    let mask = autograd::causal_mask(t, None, &dev)?;
    let rotary_dims = c.rotary_dims();
    let rotary = (rotary_dims >= 2)
        .then(|| Rotary::new(&rope::inv_freq(c.rotary_emb_base, rotary_dims), t, &dev))
        .transpose()?;
    let scale = 1.0 / (hd as f64).sqrt();
    for block in &model.blocks {
        let hidden = x.layer_norm(&block.input_layernorm)?;
        let qkv = hidden.linear(&block.qkv, dirs)?;
        let part = |k: usize| {
            qkv.map(|m, copies| {
                m.reshape((copies * b, t, h, 3, hd))?
                    .narrow(3, k, 1)?
                    .squeeze(3)?
                    .transpose(1, 2)?
                    .contiguous()
            })
        };
        let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
        if let Some(r) = &rotary {
            q = q.rotate(r)?;
            k = k.rotate(r)?;
        }
        let attn_out = attention(&q, &k, &v, &mask, scale)?.linear(&block.dense, dirs)?;
        let mlp = |input: &Dual| -> candle_core::Result<Dual> {
            input
                .layer_norm(&block.post_attention_layernorm)?
                .linear(&block.h_to_4h, dirs)?
                .activation(&c.hidden_act)?
                .linear(&block.four_h_to_h, dirs)
        };
        x = if c.use_parallel_residual {
            x.add(&attn_out)?.add(&mlp(&x)?)?
        } else {
            let h1 = x.add(&attn_out)?;
            h1.add(&mlp(&h1)?)?
        };
    }
    let head = model.embed_out.t()?;
    x.layer_norm(&model.final_layer_norm)?
        .map(|y, copies| y.matmul(&head)?.reshape((copies * b, t, c.vocab_size)))
}
