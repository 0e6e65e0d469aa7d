//! GPT-2's tangent pass: [`Gpt2`]'s autograd forward (`model/gpt2/autograd.rs`) op for op on
//! [`Dual`]s, its Conv1D layers (`y = x W + b`, W `[in, out]`, plus a LoRA adapter's term)
//! moving along their directions.

use super::dual::{attention, Directions, Dual};
use crate::model::autograd;
use crate::model::gpt2::{Conv1D, Gpt2};
use candle_core::Tensor;

/// The logits `[b, t, vocab]` and their tangents `J v_k`, stacked `[n·b, t, vocab]`.
pub(super) fn tangent(
    model: &Gpt2,
    ids: &[Vec<u32>],
    t: usize,
    dirs: &Directions,
) -> candle_core::Result<Dual> {
    let cfg = &model.config;
    let (b, d, h) = (ids.len(), cfg.n_embd, cfg.n_head);
    let hd = d / h;
    let device = &model.device;
    let ids_t = autograd::padded_ids(ids, t, device)?;
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let pos_t = Tensor::from_vec(pos, b * t, device)?;
    let mut x = Dual::constant(
        (model.wte.index_select(&ids_t, 0)? + model.wpe.index_select(&pos_t, 0)?)?,
        dirs.n(),
    )?;
    let mask = autograd::causal_mask(t, None, device)?;
    let scale = if cfg.scale_attn_weights {
        1.0 / (hd as f64).sqrt()
    } else {
        1.0
    };
    // The Conv1D and, when an adapter is attached, its `B(A x) · scaling`.
    let linear = |layer: &Conv1D, a: &Dual| -> candle_core::Result<Dual> {
        let y = a.affine(&layer.weight, Some(&layer.bias), dirs.take(layer.tap))?;
        match &layer.lora {
            Some(lora) => y.add(&a.lora(lora, dirs)?),
            None => Ok(y),
        }
    };
    for block in &model.blocks {
        let hidden = x.layer_norm(&block.ln_1)?;
        let qkv = linear(&block.c_attn, &hidden)?;
        let part = |k: usize| {
            qkv.map(|m, copies| {
                m.reshape((copies * b, t, 3, h, hd))?
                    .narrow(2, k, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            })
        };
        let attn = attention(&part(0)?, &part(1)?, &part(2)?, &mask, scale)?;
        x = x.add(&linear(&block.c_proj, &attn)?)?;
        let hidden = x.layer_norm(&block.ln_2)?;
        let act = linear(&block.c_fc, &hidden)?.activation(&cfg.activation_function)?;
        x = x.add(&linear(&block.mlp_proj, &act)?)?;
    }
    let head = model.lm_head.t()?;
    x.layer_norm(&model.ln_f)?
        .map(|y, copies| y.matmul(&head)?.reshape((copies * b, t, cfg.vocab_size)))
}
