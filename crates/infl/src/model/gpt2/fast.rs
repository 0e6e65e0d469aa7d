//! GPT-2 on the fast engine. Per block the forward keeps: the two layer norms' normalised rows
//! and inverse roots, the four linear inputs (ln_1 output, attention output, ln_2 output, GELU
//! output: the taps' `a`), the fused qkv (attention backward) and GELU's derivative at the MLP
//! pre-activation (its backward), plus each attention row's softmax max and sum.

use super::{Conv1D, Gpt2};
use crate::error::{Error, Result};
use crate::model::fast::kernels::{
    act_and_derivative, attention_backward, attention_forward, mul_in_place, Act, QkvLayout,
};
use crate::model::fast::{
    embed, pass_flops, spans, to_vec, BlockFloats, Fast, LayerNormBlockSaved as Saved, Lin, LmHead,
    Meta, Net, Norm, Proj, TapBatchParts,
};
use crate::model::{Labels, TapModel, TokenBatch};
use rayon::prelude::*;
use std::sync::Arc;

/// The fast GPT-2.
pub type FastGpt2 = Fast<Gpt2Net>;

/// GPT-2's Conv1D stores `[in, out]`: transposed once into `[out, in]`.
fn conv1d(c: &Conv1D) -> Result<Proj> {
    Ok(Proj {
        lin: Lin::new(&c.weight.t()?.contiguous()?, Some(&c.bias))?,
        tap: c.tap,
    })
}

struct Block {
    ln_1: Norm,
    c_attn: Proj,
    c_proj: Proj,
    ln_2: Norm,
    c_fc: Proj,
    mlp_proj: Proj,
}

pub struct Gpt2Net {
    wte: Arc<Vec<f32>>,
    wpe: Vec<f32>,
    d: usize,
    layout: QkvLayout,
    scale: f32,
    act: Act,
    blocks: Vec<Block>,
    head: LmHead,
}

impl FastGpt2 {
    pub fn new(m: &Gpt2) -> Result<Self> {
        Self::assemble(m, m.blocks.iter())
    }

    /// [`Self::new`], consuming the autograd model: each block's tensors are freed once
    /// copied, so the weights are never held twice (at most the model and one block's copy).
    pub fn from_owned(mut m: Gpt2) -> Result<Self> {
        let blocks = std::mem::take(&mut m.blocks);
        Self::assemble(&m, blocks)
    }

    /// The engine's model from `m`'s configuration and embeddings and `blocks` (`m`'s own,
    /// borrowed or taken from it).
    fn assemble<B: std::borrow::Borrow<super::Block>>(
        m: &Gpt2,
        blocks: impl IntoIterator<Item = B>,
    ) -> Result<Self> {
        let c = m.config();
        let act = Act::from_name(&c.activation_function).ok_or_else(|| {
            Error::input(format!(
                "activation `{}` is not supported",
                c.activation_function
            ))
        })?;
        let (d, h) = (c.n_embd, c.n_head);
        let wte = Arc::new(to_vec(&m.wte)?);
        let norm =
            |ln: &crate::model::autograd::LayerNorm| Norm::layer(&ln.weight, &ln.bias, ln.eps);
        let blocks = blocks
            .into_iter()
            .map(|b| {
                let b = b.borrow();
                Ok(Block {
                    ln_1: norm(&b.ln_1)?,
                    c_attn: conv1d(&b.c_attn)?,
                    c_proj: conv1d(&b.c_proj)?,
                    ln_2: norm(&b.ln_2)?,
                    c_fc: conv1d(&b.c_fc)?,
                    mlp_proj: conv1d(&b.mlp_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = LmHead::new(norm(&m.ln_f)?, &wte, &m.wte, &m.lm_head)?;
        let net = Gpt2Net {
            wte,
            wpe: to_vec(&m.wpe)?,
            d,
            layout: QkvLayout::blocked(h, h, d / h),
            scale: if c.scale_attn_weights {
                (1.0 / ((d / h) as f64).sqrt()) as f32
            } else {
                1.0
            },
            act,
            blocks,
            head,
        };
        Ok(Fast::with(Meta::of(m as &dyn TapModel), net))
    }
}

impl Gpt2Net {
    fn forward(&self, ids: &[Vec<u32>], spans: &[(usize, usize)]) -> (Vec<f32>, Vec<Saved>) {
        let d = self.d;
        let mut x = embed(&self.wte, d, ids);
        let pos: Vec<usize> = spans.iter().flat_map(|&(_, l)| 0..l).collect();
        x.par_chunks_mut(d).zip(&pos).for_each(|(row, &p)| {
            for (v, e) in row.iter_mut().zip(&self.wpe[p * d..(p + 1) * d]) {
                *v += e;
            }
        });
        let lay = &self.layout;
        let mut saved = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (h1, n1) = b.ln_1.fwd(&x);
            let qkv = b.c_attn.lin.fwd(&h1);
            let (attn, stats) = attention_forward(&qkv, lay, spans, None, self.scale);
            b.c_proj.lin.fwd_into(&attn, &mut x, true);
            let (h2, n2) = b.ln_2.fwd(&x);
            let (act, dact) = act_and_derivative(self.act, &b.c_fc.lin.fwd(&h2));
            b.mlp_proj.lin.fwd_into(&act, &mut x, true);
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

impl Net for Gpt2Net {
    fn taps(&self, batch: &TokenBatch, labels: Labels, n_tracked: usize) -> Result<TapBatchParts> {
        let spans = spans(&batch.ids);
        let (x, saved) = self.forward(&batch.ids, &spans);
        let (mut dx, losses) = self.head.backward(&x, batch, &spans, labels);
        let mut a: Vec<Option<Vec<f32>>> = vec![None; n_tracked];
        let mut g: Vec<Option<Vec<f32>>> = vec![None; n_tracked];
        let has_attn_tap = |b: &Block| b.c_attn.tap.is_some() || b.c_proj.tap.is_some();
        let lowest = self
            .blocks
            .iter()
            .position(|b| has_attn_tap(b) || b.c_fc.tap.is_some() || b.mlp_proj.tap.is_some());
        for (i, (b, s)) in self.blocks.iter().zip(saved).enumerate().rev() {
            let Some(lowest) = lowest.filter(|&l| i >= l) else {
                break;
            };
            // MLP: x_out = x_mid + mlp_proj(act(c_fc(ln_2(x_mid)))).
            if let Some(t) = b.mlp_proj.tap {
                g[t] = Some(dx.clone());
            }
            let mut dpre = b.mlp_proj.lin.bwd(&dx);
            mul_in_place(&mut dpre, &s.dact);
            let last = i == lowest && !has_attn_tap(b);
            if !last {
                let dh2 = b.c_fc.lin.bwd(&dpre);
                b.ln_2.bwd(&dh2, &s.n2, &mut dx, true);
            }
            if let Some(t) = b.c_fc.tap {
                g[t] = Some(dpre);
            }
            if !last {
                // Attention: x_mid = x_in + c_proj(attn(c_attn(ln_1(x_in)))).
                if let Some(t) = b.c_proj.tap {
                    g[t] = Some(dx.clone());
                }
                let dattn = b.c_proj.lin.bwd(&dx);
                let lay = &self.layout;
                let dqkv =
                    attention_backward(&s.qkv, lay, &spans, None, self.scale, &s.stats, &dattn);
                if i != lowest {
                    let dh1 = b.c_attn.lin.bwd(&dqkv);
                    b.ln_1.bwd(&dh1, &s.n1, &mut dx, true);
                }
                if let Some(t) = b.c_attn.tap {
                    g[t] = Some(dqkv);
                }
            }
            for (p, v) in [
                (&b.c_attn, s.h1),
                (&b.c_proj, s.attn),
                (&b.c_fc, s.h2),
                (&b.mlp_proj, s.act),
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
        let (x, _) = self.forward(&ids, &spans(&ids));
        Ok(self.head.logits(&x))
    }

    fn position_limit(&self) -> Option<usize> {
        Some(self.wpe.len() / self.d)
    }

    fn block_floats(&self) -> (usize, BlockFloats) {
        let i = self.blocks.first().map_or(0, |b| b.c_fc.lin.d_out);
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
            .map(|b| [&b.c_attn.lin, &b.c_proj.lin, &b.c_fc.lin, &b.mlp_proj.lin]);
        pass_flops(batch, blocks, &self.layout, &self.head)
    }
}
