//! The Llama family (llama, mistral, qwen2, Llama GGUF files) on the fast engine. q, k and v
//! are fused into one product (they read the same input), as are gate and up; their taps are
//! the column blocks of the fused outputs. Per block the forward keeps the two RMS norms'
//! normalised rows and inverse roots, the fused qkv after RoPE (attention backward), the
//! softmax row statistics, the attention output, the fused gate|up (SwiGLU backward) and the
//! linear inputs (the taps' `a`). RoPE is linear: its backward rotates the gradients back.

use super::{Llama, Mlp};
use crate::error::{Error, Result};
use crate::model::fast::kernels::{
    attention_backward, attention_forward, glu_bwd, glu_fwd, rope_apply, Act, QkvLayout, Rope,
};
use crate::model::fast::{
    embed, pass_flops, rope, spans, to_vec, BlockFloats, Fast, Lin, LmHead, Meta, Net, Norm,
    NormSaved, TapBatchParts,
};
use crate::model::{autograd, Labels, TapModel, TokenBatch};
use rayon::prelude::*;
use std::sync::Arc;

/// The fast Llama-family model.
pub type FastLlama = Fast<LlamaNet>;

struct Block {
    input_layernorm: Norm,
    /// q, k, v stacked: output `[q heads | k heads | v heads]`.
    qkv: Lin,
    /// Taps of q, k, v.
    qkv_taps: [Option<usize>; 3],
    o: Lin,
    o_tap: Option<usize>,
    post_attention_layernorm: Norm,
    /// gate, up stacked: output `[gate | up]`.
    gate_up: Lin,
    gate_up_taps: [Option<usize>; 2],
    down: Lin,
    down_tap: Option<usize>,
}

pub struct LlamaNet {
    embed: Arc<Vec<f32>>,
    d: usize,
    di: usize,
    layout: QkvLayout,
    inv_freq: Vec<f64>,
    window: Option<usize>,
    scale: f32,
    act: Act,
    blocks: Vec<Block>,
    head: LmHead,
}

struct Saved {
    n1: NormSaved,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    stats: Vec<f32>,
    attn: Vec<f32>,
    n2: NormSaved,
    h2: Vec<f32>,
    gu: Vec<f32>,
    y: Vec<f32>,
}

/// Splits the columns of a row-major matrix into blocks of the given widths.
pub(crate) fn split_cols(m: &[f32], widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let n = m.len() / total;
    let mut out: Vec<Vec<f32>> = widths.iter().map(|w| vec![0f32; n * w]).collect();
    let mut start = 0;
    for (o, &w) in out.iter_mut().zip(widths) {
        o.par_chunks_mut(w)
            .zip(m.par_chunks(total))
            .for_each(|(dst, src)| dst.copy_from_slice(&src[start..start + w]));
        start += w;
    }
    out
}

impl FastLlama {
    pub fn new(m: &Llama) -> Result<Self> {
        Self::assemble(m, m.blocks.iter())
    }

    /// [`Self::new`], consuming the autograd model: each block's tensors are freed once
    /// copied, so the weights are never held twice (at most the model and one block's copy).
    pub fn from_owned(mut m: Llama) -> Result<Self> {
        let blocks = std::mem::take(&mut m.blocks);
        Self::assemble(&m, blocks)
    }

    /// The engine's model from `m`'s configuration and embeddings and `blocks` (`m`'s own,
    /// borrowed or taken from it).
    fn assemble<B: std::borrow::Borrow<super::Block>>(
        m: &Llama,
        blocks: impl IntoIterator<Item = B>,
    ) -> Result<Self> {
        let c = m.config();
        let act = Act::from_name(&c.hidden_act).ok_or_else(|| {
            Error::input(format!("hidden_act `{}` is not supported", c.hidden_act))
        })?;
        if c.moe.is_some() || c.qk_norm {
            return Err(Error::input(format!(
                "--engine fast does not run `{}` models (mixtures of experts, q/k norms); use \
                 --engine autograd",
                c.model_type
            )));
        }
        let embed = Arc::new(to_vec(&m.embed)?);
        let norm = |n: &autograd::RmsNorm| Norm::rms(&n.weight, n.eps);
        let blocks = blocks
            .into_iter()
            .map(|b| {
                let b = b.borrow();
                let Mlp::Dense { gate, up, down } = &b.mlp else {
                    return Err(Error::Other(
                        "internal: an expert block in a dense model".into(),
                    ));
                };
                Ok(Block {
                    input_layernorm: norm(&b.input_layernorm)?,
                    qkv: Lin::stack(&[&b.q, &b.k, &b.v])?,
                    qkv_taps: [b.q.tap, b.k.tap, b.v.tap],
                    o: Lin::new(&b.o.weight, b.o.bias.as_ref())?,
                    o_tap: b.o.tap,
                    post_attention_layernorm: norm(&b.post_attention_layernorm)?,
                    gate_up: Lin::stack(&[gate, up])?,
                    gate_up_taps: [gate.tap, up.tap],
                    down: Lin::new(&down.weight, down.bias.as_ref())?,
                    down_tap: down.tap,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = LmHead::new(norm(&m.norm)?, &embed, &m.embed, &m.lm_head)?;
        let net = LlamaNet {
            embed,
            d: c.hidden_size,
            di: c.intermediate_size,
            layout: QkvLayout::blocked(c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            inv_freq: c.inv_freq(),
            window: c.sliding_window,
            scale: (1.0 / (c.head_dim as f64).sqrt()) as f32,
            act,
            blocks,
            head,
        };
        Ok(Fast::with(Meta::of(m as &dyn TapModel), net))
    }
}

impl LlamaNet {
    fn rope(&self, len: usize) -> Rope {
        rope(&self.inv_freq, len)
    }

    fn forward(
        &self,
        ids: &[Vec<u32>],
        spans: &[(usize, usize)],
        rope: &Rope,
    ) -> (Vec<f32>, Vec<Saved>) {
        let (d, lay) = (self.d, &self.layout);
        let mut x = embed(&self.embed, d, ids);
        let n = x.len() / d;
        let mut saved = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (h1, n1) = b.input_layernorm.fwd(&x);
            let mut qkv = b.qkv.fwd(&h1);
            rope_apply(&mut qkv, lay, rope, spans, false);
            let (attn, stats) = attention_forward(&qkv, lay, spans, self.window, self.scale);
            b.o.fwd_into(&attn, &mut x, true);
            let (h2, n2) = b.post_attention_layernorm.fwd(&x);
            let gu = b.gate_up.fwd(&h2);
            let mut y = vec![0f32; n * self.di];
            glu_fwd(self.act, &gu, self.di, &mut y);
            b.down.fwd_into(&y, &mut x, true);
            saved.push(Saved {
                n1,
                h1,
                qkv,
                stats,
                attn,
                n2,
                h2,
                gu,
                y,
            });
        }
        (x, saved)
    }
}

impl Net for LlamaNet {
    fn taps(&self, batch: &TokenBatch, labels: Labels, n_tracked: usize) -> Result<TapBatchParts> {
        let spans = spans(&batch.ids);
        let rope = self.rope(batch.max_len());
        let (x, saved) = self.forward(&batch.ids, &spans, &rope);
        let (mut dx, losses) = self.head.backward(&x, batch, &spans, labels);
        let mut a: Vec<Option<Vec<f32>>> = vec![None; n_tracked];
        let mut g: Vec<Option<Vec<f32>>> = vec![None; n_tracked];
        let lay = &self.layout;
        let attn_taps = |b: &Block| b.qkv_taps.iter().any(Option::is_some) || b.o_tap.is_some();
        let lowest = self.blocks.iter().position(|b| {
            attn_taps(b) || b.gate_up_taps.iter().any(Option::is_some) || b.down_tap.is_some()
        });
        let (hq, hk) = (lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim);
        for (i, (b, s)) in self.blocks.iter().zip(saved).enumerate().rev() {
            let Some(lowest) = lowest.filter(|&l| i >= l) else {
                break;
            };
            if let Some(t) = b.down_tap {
                g[t] = Some(dx.clone());
            }
            let dy = b.down.bwd(&dx);
            let mut dgu = vec![0f32; s.gu.len()];
            glu_bwd(self.act, &s.gu, &dy, self.di, &mut dgu);
            // Freed now, not at the end of the block: it is MLP-wide.
            drop(dy);
            let last = i == lowest && !attn_taps(b);
            if !last {
                let dh2 = b.gate_up.bwd(&dgu);
                b.post_attention_layernorm.bwd(&dh2, &s.n2, &mut dx, true);
            }
            if b.gate_up_taps.iter().any(Option::is_some) {
                for (t, part) in b.gate_up_taps.iter().zip(split_cols(&dgu, &[self.di; 2])) {
                    if let Some(t) = *t {
                        g[t] = Some(part);
                    }
                }
            }
            drop(dgu);
            if !last {
                if let Some(t) = b.o_tap {
                    g[t] = Some(dx.clone());
                }
                let dattn = b.o.bwd(&dx);
                let mut dqkv = attention_backward(
                    &s.qkv,
                    lay,
                    &spans,
                    self.window,
                    self.scale,
                    &s.stats,
                    &dattn,
                );
                rope_apply(&mut dqkv, lay, &rope, &spans, true);
                if i != lowest {
                    let dh1 = b.qkv.bwd(&dqkv);
                    b.input_layernorm.bwd(&dh1, &s.n1, &mut dx, true);
                }
                if b.qkv_taps.iter().any(Option::is_some) {
                    for (t, part) in b.qkv_taps.iter().zip(split_cols(&dqkv, &[hq, hk, hk])) {
                        if let Some(t) = *t {
                            g[t] = Some(part);
                        }
                    }
                }
            }
            for t in b.qkv_taps.iter().flatten() {
                a[*t] = Some(s.h1.clone());
            }
            for t in b.gate_up_taps.iter().flatten() {
                a[*t] = Some(s.h2.clone());
            }
            if let Some(t) = b.o_tap {
                a[t] = Some(s.attn);
            }
            if let Some(t) = b.down_tap {
                a[t] = Some(s.y);
            }
        }
        Ok(TapBatchParts { losses, a, g })
    }

    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let ids = vec![ids.to_vec()];
        let (x, _) = self.forward(&ids, &spans(&ids), &self.rope(ids[0].len()));
        Ok(self.head.logits(&x))
    }

    fn block_floats(&self) -> (usize, BlockFloats) {
        let (d, i, lay) = (self.d, self.di, &self.layout);
        let (hq, hk) = (lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim);
        let f = BlockFloats {
            // Two RMS norms (rows and a root each), h1, q/k/v, two statistics per head,
            // attn, h2, gate|up and the GLU output.
            saved: 2 * (d + 1) + d + (hq + 2 * hk) + 2 * lay.heads + hq + d + 3 * i,
            // g of down and o (copies of dL/dx), of gate and up and of q, k, v (split copies),
            // and h1 for each of q, k, v and h2 for gate and up (copies).
            taps: 2 * d + 2 * i + (hq + 2 * hk) + 5 * d,
            // dL/dy with dL/d(gate|up) and dL/dh, or dL/dattn with dL/dqkv and dL/dh.
            transient: (3 * i + d).max(2 * hq + 2 * hk + d),
        };
        (self.blocks.len(), f)
    }

    fn head_shape(&self) -> (usize, usize) {
        (self.head.d, self.head.vocab)
    }

    fn flops(&self, batch: &TokenBatch) -> f64 {
        let blocks = self
            .blocks
            .iter()
            .map(|b| [&b.qkv, &b.o, &b.gate_up, &b.down]);
        pass_flops(batch, blocks, &self.layout, &self.head)
    }
}
