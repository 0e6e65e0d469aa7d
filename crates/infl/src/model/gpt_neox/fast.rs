//! GPT-NeoX (Pythia) on the fast engine: fused query_key_value laid out `[head, {q, k, v},
//! head_dim]`, partial rotary embeddings (the first `rotary_dims` of each head), parallel or
//! sequential residual. Per block the forward keeps the layer norms' normalised rows and
//! inverse roots, qkv after RoPE, the softmax row statistics, the activation's derivative at the
//! MLP pre-activation and the linear inputs (the taps' `a`).

use super::GptNeoX;
use crate::error::{Error, Result};
use crate::model::fast::kernels::{
    act_and_derivative, attention_backward, attention_forward, mul_in_place, rope_apply, Act,
    QkvLayout, Rope,
};
use crate::model::fast::{
    embed, pass_flops, rope, spans, to_vec, BlockFloats, Fast, LayerNormBlockSaved as Saved,
    LmHead, Meta, Net, Norm, Proj, TapBatchParts,
};
use crate::model::{autograd, Labels, TapModel, TokenBatch};
use std::sync::Arc;

/// The fast GPT-NeoX.
pub type FastGptNeoX = Fast<GptNeoXNet>;

struct Block {
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    qkv: Proj,
    dense: Proj,
    h_to_4h: Proj,
    four_h_to_h: Proj,
}

pub struct GptNeoXNet {
    embed: Arc<Vec<f32>>,
    d: usize,
    layout: QkvLayout,
    inv_freq: Vec<f64>,
    parallel: bool,
    scale: f32,
    act: Act,
    blocks: Vec<Block>,
    head: LmHead,
}

impl FastGptNeoX {
    pub fn new(m: &GptNeoX) -> Result<Self> {
        Self::assemble(m, m.blocks.iter())
    }

    /// [`Self::new`], consuming the autograd model: each block's tensors are freed once
    /// copied, so the weights are never held twice (at most the model and one block's copy).
    pub fn from_owned(mut m: GptNeoX) -> Result<Self> {
        let blocks = std::mem::take(&mut m.blocks);
        Self::assemble(&m, blocks)
    }

    /// The engine's model from `m`'s configuration and embeddings and `blocks` (`m`'s own,
    /// borrowed or taken from it).
    fn assemble<B: std::borrow::Borrow<super::Block>>(
        m: &GptNeoX,
        blocks: impl IntoIterator<Item = B>,
    ) -> Result<Self> {
        let c = m.config();
        let act = Act::from_name(&c.hidden_act).ok_or_else(|| {
            Error::input(format!("hidden_act `{}` is not supported", c.hidden_act))
        })?;
        let embed = Arc::new(to_vec(&m.embed_in)?);
        let norm = |n: &autograd::LayerNorm| Norm::layer(&n.weight, &n.bias, n.eps);
        let blocks = blocks
            .into_iter()
            .map(|b| {
                let b = b.borrow();
                Ok(Block {
                    input_layernorm: norm(&b.input_layernorm)?,
                    post_attention_layernorm: norm(&b.post_attention_layernorm)?,
                    qkv: Proj::new(&b.qkv)?,
                    dense: Proj::new(&b.dense)?,
                    h_to_4h: Proj::new(&b.h_to_4h)?,
                    four_h_to_h: Proj::new(&b.four_h_to_h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (h, hd) = (c.num_attention_heads, c.hidden_size / c.num_attention_heads);
        let rd = c.rotary_dims();
        let head = LmHead::new(
            norm(&m.final_layer_norm)?,
            &embed,
            &m.embed_in,
            &m.embed_out,
        )?;
        let net = GptNeoXNet {
            embed,
            d: c.hidden_size,
            layout: QkvLayout::interleaved(h, hd),
            // As the reference: no rotation below two dimensions.
            inv_freq: if rd >= 2 {
                crate::model::rope::inv_freq(c.rotary_emb_base, rd)
            } else {
                Vec::new()
            },
            parallel: c.use_parallel_residual,
            scale: (1.0 / (hd as f64).sqrt()) as f32,
            act,
            blocks,
            head,
        };
        Ok(Fast::with(Meta::of(m as &dyn TapModel), net))
    }
}

impl GptNeoXNet {
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
        let mut saved = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (h1, n1) = b.input_layernorm.fwd(&x);
            let mut qkv = b.qkv.lin.fwd(&h1);
            rope_apply(&mut qkv, lay, rope, spans, false);
            let (attn, stats) = attention_forward(&qkv, lay, spans, None, self.scale);
            // Parallel: the MLP reads the block's input; sequential: the attention's output.
            let (h2, n2) = if self.parallel {
                let r = b.post_attention_layernorm.fwd(&x);
                b.dense.lin.fwd_into(&attn, &mut x, true);
                r
            } else {
                b.dense.lin.fwd_into(&attn, &mut x, true);
                b.post_attention_layernorm.fwd(&x)
            };
            let (act, dact) = act_and_derivative(self.act, &b.h_to_4h.lin.fwd(&h2));
            b.four_h_to_h.lin.fwd_into(&act, &mut x, true);
            saved.push(Saved {
                n1,
                h1,
                qkv,
                stats,
                attn,
                n2,
                h2,
                dact,
                act,
            });
        }
        (x, saved)
    }
}

impl Net for GptNeoXNet {
    fn taps(&self, batch: &TokenBatch, labels: Labels, n_tracked: usize) -> Result<TapBatchParts> {
        let spans = spans(&batch.ids);
        let rope = self.rope(batch.max_len());
        let (x, saved) = self.forward(&batch.ids, &spans, &rope);
        let (mut dx, losses) = self.head.backward(&x, batch, &spans, labels);
        let mut a: Vec<Option<Vec<f32>>> = vec![None; n_tracked];
        let mut g: Vec<Option<Vec<f32>>> = vec![None; n_tracked];
        let lay = &self.layout;
        let attn_taps = |b: &Block| b.qkv.tap.is_some() || b.dense.tap.is_some();
        let lowest = self
            .blocks
            .iter()
            .position(|b| attn_taps(b) || b.h_to_4h.tap.is_some() || b.four_h_to_h.tap.is_some());
        for (i, (b, s)) in self.blocks.iter().zip(saved).enumerate().rev() {
            let Some(lowest) = lowest.filter(|&l| i >= l) else {
                break;
            };
            // Below the lowest tracked layer nothing is needed; in the lowest block the
            // attention branch only when it holds a tracked layer.
            let need_below = i != lowest;
            let need_attn = need_below || attn_taps(b);
            if let Some(t) = b.four_h_to_h.tap {
                g[t] = Some(dx.clone());
            }
            let mut dpre = b.four_h_to_h.lin.bwd(&dx);
            mul_in_place(&mut dpre, &s.dact);
            // Parallel residual: the attention branch sees the block output's gradient.
            let mut dattn = None;
            if self.parallel && need_attn {
                if let Some(t) = b.dense.tap {
                    g[t] = Some(dx.clone());
                }
                dattn = Some(b.dense.lin.bwd(&dx));
            }
            if need_below || (!self.parallel && need_attn) {
                let dh2 = b.h_to_4h.lin.bwd(&dpre);
                b.post_attention_layernorm.bwd(&dh2, &s.n2, &mut dx, true);
            }
            if let Some(t) = b.h_to_4h.tap {
                g[t] = Some(dpre);
            }
            if need_attn {
                let dattn = match dattn {
                    Some(v) => v,
                    None => {
                        if let Some(t) = b.dense.tap {
                            g[t] = Some(dx.clone());
                        }
                        b.dense.lin.bwd(&dx)
                    }
                };
                let mut dqkv =
                    attention_backward(&s.qkv, lay, &spans, None, self.scale, &s.stats, &dattn);
                rope_apply(&mut dqkv, lay, &rope, &spans, true);
                if need_below {
                    let dh1 = b.qkv.lin.bwd(&dqkv);
                    b.input_layernorm.bwd(&dh1, &s.n1, &mut dx, true);
                }
                if let Some(t) = b.qkv.tap {
                    g[t] = Some(dqkv);
                }
            }
            for (p, v) in [
                (&b.qkv, s.h1),
                (&b.dense, s.attn),
                (&b.h_to_4h, s.h2),
                (&b.four_h_to_h, s.act),
            ] {
                if let Some(t) = p.tap {
                    a[t] = Some(v);
                }
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
        let i = self.blocks.first().map_or(0, |b| b.h_to_4h.lin.d_out);
        let f = BlockFloats::layer_norm_mlp(self.d, self.layout.heads, self.layout.stride, i);
        (self.blocks.len(), f)
    }

    fn head_shape(&self) -> (usize, usize) {
        (self.head.d, self.head.vocab)
    }

    fn flops(&self, batch: &TokenBatch) -> f64 {
        let blocks = self
            .blocks
            .iter()
            .map(|b| [&b.qkv.lin, &b.dense.lin, &b.h_to_4h.lin, &b.four_h_to_h.lin]);
        pass_flops(batch, blocks, &self.layout, &self.head)
    }
}
