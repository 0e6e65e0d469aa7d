//! The fast engine: an explicit forward that keeps exactly what the backward needs, and an
//! explicit backward that computes activation gradients only (dX = dY·W, never a weight
//! gradient), on the CPU with fused, threaded kernels ([`kernels`]).
//!
//! Sequences are not padded: the tokens of a batch are concatenated into one `[n_tokens, d]`
//! matrix (so every GEMM runs on real tokens only and the rows already are the taps' rows), and
//! attention runs per (sequence, head). The LM head is evaluated only at loss positions during
//! the taps, in chunks, and the backward stops at the lowest tracked layer.
//!
//! This module holds the plumbing every architecture shares (the [`Net`] trait and the
//! [`TapModel`] over it, [`Lin`], [`Norm`], [`LmHead`], RoPE tables, FLOP counts; the kernels in
//! [`kernels`]); each architecture's net lives in its folder (`model/<arch>/fast.rs`) and is
//! built from the autograd model's loaded weights ([`from_autograd`]); the autograd models
//! remain the reference that `tests/fast_engine.rs` checks every tap against.

pub mod bench;
pub mod kernels;

use super::loss::{label_draws, position_loss, target};
use super::{
    gpt2, gpt_neox, llama, AnyModel, BlockShape, Labels, LayerTap, TapBatch, TapModel, TokenBatch,
    TrackedLayer,
};
use crate::error::{Error, Result};
use candle_core::Tensor;
use kernels::*;
use rayon::prelude::*;
use std::sync::Arc;

/// The fast counterpart of an autograd model (same weights, tracked layers and taps).
pub fn from_autograd(model: AnyModel) -> Result<Box<dyn TapModel>> {
    Ok(match model {
        // Consumed block by block: the weights are never held twice.
        AnyModel::Gpt2(m) => Box::new(gpt2::fast::FastGpt2::from_owned(m)?),
        AnyModel::GptNeoX(m) => Box::new(gpt_neox::fast::FastGptNeoX::from_owned(m)?),
        AnyModel::Llama(m) => Box::new(llama::fast::FastLlama::from_owned(m)?),
    })
}

/// A tensor's elements as a row-major f32 vector.
pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// What a [`TapModel`] reports about itself, copied from the autograd model.
pub(crate) struct Meta {
    pub architecture: String,
    pub tracked: Vec<TrackedLayer>,
    pub vocab: usize,
    pub max_positions: usize,
    pub n_parameters: usize,
    pub shape: BlockShape,
}

impl Meta {
    pub fn of(m: &dyn TapModel) -> Self {
        Meta {
            architecture: m.architecture().to_string(),
            tracked: m.tracked().to_vec(),
            vocab: m.vocab_size(),
            max_positions: m.max_positions(),
            n_parameters: m.n_parameters(),
            shape: m.block_shape(),
        }
    }
}

/// A linear layer `y = x Wᵀ + b`, `W` stored `[d_out, d_in]`.
pub(crate) struct Lin {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub d_in: usize,
    pub d_out: usize,
}

impl Lin {
    /// From `[d_out, d_in]` weights.
    pub fn new(w: &Tensor, b: Option<&Tensor>) -> Result<Lin> {
        let (d_out, d_in) = w.dims2()?;
        Ok(Lin {
            w: to_vec(w)?,
            b: b.map(to_vec).transpose()?,
            d_in,
            d_out,
        })
    }

    /// Several layers reading the same input, fused by stacking their output rows (a missing
    /// bias among present ones is zero, which adds nothing).
    pub fn stack(parts: &[&super::autograd::Linear]) -> Result<Lin> {
        let mut w = Vec::new();
        let mut b = Vec::new();
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let (mut d_out, d_in) = (0, parts[0].weight.dims2()?.1);
        for p in parts {
            let (o, i) = p.weight.dims2()?;
            if i != d_in {
                return Err(Error::Other("internal: fused layers differ in d_in".into()));
            }
            w.extend(to_vec(&p.weight)?);
            match &p.bias {
                Some(t) => b.extend(to_vec(t)?),
                None => b.extend(std::iter::repeat_n(0.0, o)),
            }
            d_out += o;
        }
        Ok(Lin {
            w,
            b: any_bias.then_some(b),
            d_in,
            d_out,
        })
    }

    /// `y = x Wᵀ + b` for `x` of n rows.
    pub fn fwd(&self, x: &[f32]) -> Vec<f32> {
        matmul_wt_new(x, &self.w, self.d_in, self.d_out, self.b.as_deref())
    }

    /// `y = [y +] b + x Wᵀ` (the bias is added before the product is accumulated).
    pub fn fwd_into(&self, x: &[f32], y: &mut [f32], acc: bool) {
        match &self.b {
            Some(b) => {
                y.par_chunks_mut(self.d_out).for_each(|r| {
                    for (v, b) in r.iter_mut().zip(b) {
                        *v = if acc { *v + b } else { *b };
                    }
                });
                matmul_wt(x, &self.w, self.d_in, self.d_out, y, true);
            }
            None => matmul_wt(x, &self.w, self.d_in, self.d_out, y, acc),
        }
    }

    /// `dx = dy W` (a fresh buffer).
    pub fn bwd(&self, dy: &[f32]) -> Vec<f32> {
        matmul_w_new(dy, &self.w, self.d_in, self.d_out)
    }

    /// FLOPs of one product over `n` rows.
    pub fn flops(&self, n: usize) -> f64 {
        2.0 * (n * self.d_in * self.d_out) as f64
    }
}

/// A linear layer and its index among the tracked layers, if tracked.
pub(crate) struct Proj {
    pub lin: Lin,
    pub tap: Option<usize>,
}

impl Proj {
    /// From an autograd `nn.Linear` (`[d_out, d_in]` weights).
    pub fn new(l: &super::autograd::Linear) -> Result<Proj> {
        Ok(Proj {
            lin: Lin::new(&l.weight, l.bias.as_ref())?,
            tap: l.tap,
        })
    }
}

/// What a GPT-2 / GPT-NeoX block's forward keeps for its backward (see
/// [`BlockFloats::layer_norm_mlp`]).
pub(crate) struct LayerNormBlockSaved {
    pub n1: NormSaved,
    pub h1: Vec<f32>,
    pub qkv: Vec<f32>,
    pub stats: Vec<f32>,
    pub attn: Vec<f32>,
    pub n2: NormSaved,
    pub h2: Vec<f32>,
    /// act′ of the MLP pre-activation (its backward).
    pub dact: Vec<f32>,
    pub act: Vec<f32>,
}

/// Layer norm or RMS norm with its weights.
pub(crate) enum Norm {
    Layer { w: Vec<f32>, b: Vec<f32>, eps: f64 },
    Rms { w: Vec<f32>, eps: f64 },
}

/// What a norm's backward needs: the normalised rows and their inverse root.
pub(crate) struct NormSaved {
    pub xhat: Vec<f32>,
    pub rstd: Vec<f32>,
}

impl Norm {
    pub fn layer(w: &Tensor, b: &Tensor, eps: f64) -> Result<Norm> {
        Ok(Norm::Layer {
            w: to_vec(w)?,
            b: to_vec(b)?,
            eps,
        })
    }

    pub fn rms(w: &Tensor, eps: f64) -> Result<Norm> {
        Ok(Norm::Rms { w: to_vec(w)?, eps })
    }

    fn width(&self) -> usize {
        match self {
            Norm::Layer { w, .. } | Norm::Rms { w, .. } => w.len(),
        }
    }

    pub fn fwd(&self, x: &[f32]) -> (Vec<f32>, NormSaved) {
        let (d, n) = (self.width(), x.len());
        assert_eq!(n % d.max(1), 0, "rows of the norm's width");
        let (mut xhat, mut rstd, mut y) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n / d),
            Vec::with_capacity(n),
        );
        let (xh, rs, out) = (
            &mut xhat.spare_capacity_mut()[..n],
            &mut rstd.spare_capacity_mut()[..n / d],
            &mut y.spare_capacity_mut()[..n],
        );
        match self {
            Norm::Layer { w, b, eps } => layer_norm_fwd(x, w, b, *eps, xh, rs, out),
            Norm::Rms { w, eps } => rms_norm_fwd(x, w, *eps, xh, rs, out),
        }
        // SAFETY: the norms write every element of all three outputs.
        unsafe {
            xhat.set_len(n);
            rstd.set_len(n / d);
            y.set_len(n);
        }
        (y, NormSaved { xhat, rstd })
    }

    /// `dx [+]= ∂norm/∂x ᵀ dy`.
    pub fn bwd(&self, dy: &[f32], s: &NormSaved, dx: &mut [f32], acc: bool) {
        match self {
            Norm::Layer { w, .. } => layer_norm_bwd(dy, &s.xhat, &s.rstd, w, dx, acc),
            Norm::Rms { w, .. } => rms_norm_bwd(dy, &s.xhat, &s.rstd, w, dx, acc),
        }
    }
}

/// Each sequence's (first row, length) in the concatenated token matrix.
pub(crate) fn spans(ids: &[Vec<u32>]) -> Vec<(usize, usize)> {
    let mut o = 0;
    ids.iter()
        .map(|s| {
            let span = (o, s.len());
            o += s.len();
            span
        })
        .collect()
}

/// Token embeddings of the concatenated sequences, `[n_tokens, d]`.
pub(crate) fn embed(table: &[f32], d: usize, ids: &[Vec<u32>]) -> Vec<f32> {
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let mut x = vec![0f32; flat.len() * d];
    x.par_chunks_mut(d).zip(&flat).for_each(|(row, &id)| {
        row.copy_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
    });
    x
}

/// The final norm and the LM head `logits = norm(x) Eᵀ`, `E` `[vocab, d]` (shared with the
/// token embeddings when tied).
pub(crate) struct LmHead {
    pub norm: Norm,
    pub w: Arc<Vec<f32>>,
    pub vocab: usize,
    pub d: usize,
}

impl LmHead {
    /// The head over `head` (`[vocab, d]`), sharing the embedding table's floats when `head` is
    /// the embedding tensor itself (tied embeddings).
    pub fn new(norm: Norm, embed: &Arc<Vec<f32>>, embed_t: &Tensor, head: &Tensor) -> Result<Self> {
        let (vocab, d) = head.dims2()?;
        let w = if head.id() == embed_t.id() {
            embed.clone()
        } else {
            Arc::new(to_vec(head)?)
        };
        Ok(LmHead { norm, w, vocab, d })
    }
}

/// RoPE tables for positions `0..len` of the (already scaled) inverse frequencies.
pub(crate) fn rope(inv_freq: &[f64], len: usize) -> Rope {
    let (cos, sin) = super::rope::rope_tables(inv_freq, len);
    Rope {
        cos,
        sin,
        dims: 2 * inv_freq.len(),
    }
}

/// Logit rows per chunk of the LM head (bounds the logits held at once to ~64 MiB).
fn head_chunk(vocab: usize) -> usize {
    ((16usize << 20) / vocab.max(1)).max(1)
}

impl LmHead {
    /// Logits of every row of `x` (the final residual stream).
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let (xf, _) = self.norm.fwd(x);
        matmul_wt_new(&xf, &self.w, self.d, self.vocab, None)
    }

    /// Losses of each sequence and dL/dx of the final residual stream: the head's logits are
    /// formed only at loss positions (other rows get no gradient), chunk by chunk.
    pub fn backward(
        &self,
        x: &[f32],
        batch: &TokenBatch,
        spans: &[(usize, usize)],
        labels: Labels,
    ) -> (Vec<f32>, Vec<f64>) {
        let (d, v) = (self.d, self.vocab);
        let (xf, saved) = self.norm.fwd(x);
        let draws = label_draws(batch, labels);
        // (row, sequence, position) of every loss position, in batch order.
        let rows: Vec<(usize, usize, usize)> = spans
            .iter()
            .enumerate()
            .flat_map(|(b, &(o, l))| {
                let mask = &batch.loss_positions[b];
                (0..l).filter(move |&t| mask[t]).map(move |t| (o + t, b, t))
            })
            .collect();
        let mut dxf = vec![0f32; xf.len()];
        let mut losses = vec![0f64; batch.len()];
        let mut row_loss = vec![0f64; rows.len()];
        for (chunk, loss_out) in rows
            .chunks(head_chunk(v))
            .zip(row_loss.chunks_mut(head_chunk(v)))
        {
            let c = chunk.len();
            let mut xc = vec![0f32; c * d];
            for (dst, &(r, _, _)) in xc.chunks_mut(d).zip(chunk) {
                dst.copy_from_slice(&xf[r * d..(r + 1) * d]);
            }
            let mut z = matmul_wt_new(&xc, &self.w, d, v, None);
            z.par_chunks_mut(v)
                .zip(chunk.par_iter())
                .zip(loss_out.par_iter_mut())
                .for_each_init(
                    || vec![0f64; v],
                    |probs, ((zr, &(_, b, t)), lo)| {
                        *lo = position_loss(zr, target(batch, draws.as_deref(), b, t), probs);
                    },
                );
            matmul_w(&z, &self.w, d, v, &mut xc, false);
            for (src, &(r, _, _)) in xc.chunks(d).zip(chunk) {
                dxf[r * d..(r + 1) * d].copy_from_slice(src);
            }
        }
        // Summed in position order, like the padded reference.
        for (&(_, b, _), l) in rows.iter().zip(&row_loss) {
            losses[b] += l;
        }
        let mut dx = vec![0f32; x.len()];
        self.norm.bwd(&dxf, &saved, &mut dx, false);
        (dx, losses)
    }

    /// FLOPs of the head's forward product and its activation backward over `n` loss rows.
    pub fn flops(&self, n: usize) -> f64 {
        4.0 * (n * self.d * self.vocab) as f64
    }
}

/// Assembles the taps: `a[i]`/`g[i]` of tracked layer i over all rows of the batch.
pub(crate) fn tap_batch(
    batch: &TokenBatch,
    losses: Vec<f64>,
    a: Vec<Option<Vec<f32>>>,
    g: Vec<Option<Vec<f32>>>,
    tracked: &[TrackedLayer],
) -> Result<TapBatch> {
    let n = batch.n_tokens();
    let layers = a
        .into_iter()
        .zip(g)
        .zip(tracked)
        .map(|((a, g), l)| match (a, g) {
            (Some(a), Some(g)) if a.len() == n * l.d_in && g.len() == n * l.d_out => {
                Ok(LayerTap { a, g })
            }
            _ => Err(Error::Other(format!(
                "internal: the fast engine produced no taps for {}",
                l.name
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TapBatch {
        seq_lens: batch.ids.iter().map(Vec::len).collect(),
        losses,
        layers,
    })
}

/// A fast architecture: forward + activation backward over a batch.
pub trait Net: Send + Sync {
    fn taps(&self, batch: &TokenBatch, labels: Labels, n_tracked: usize) -> Result<TapBatchParts>;
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>>;
    /// FLOPs of the forward and activation-backward products (GEMMs and attention) of `taps`
    /// on `batch`, counted from the shapes: the floor a GEMM-bound implementation would meet.
    fn flops(&self, batch: &TokenBatch) -> f64;
    /// The number of blocks and what each holds per token ([`BlockFloats`]).
    fn block_floats(&self) -> (usize, BlockFloats);
    /// The LM head's (width, vocabulary).
    fn head_shape(&self) -> (usize, usize);
    /// The longest sequence the model can embed (learned positions), if limited.
    fn position_limit(&self) -> Option<usize> {
        None
    }
}

/// Losses and per-layer (a, g) slots, in tracked-layer order.
pub struct TapBatchParts {
    pub losses: Vec<f64>,
    pub a: Vec<Option<Vec<f32>>>,
    pub g: Vec<Option<Vec<f32>>>,
}

/// A [`TapModel`] running a fast [`Net`].
pub struct Fast<N> {
    meta: Meta,
    net: N,
}

impl<N: Net> Fast<N> {
    pub(crate) fn with(meta: Meta, net: N) -> Self {
        Fast { meta, net }
    }

    /// The kernels index embeddings without bounds errors of their own: refuse ids outside
    /// the vocabulary, and sequences longer than learned position embeddings.
    fn check(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.meta.vocab) {
            return Err(Error::input(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.meta.vocab
            )));
        }
        if let Some(limit) = self.net.position_limit() {
            if ids.len() > limit {
                return Err(Error::input(format!(
                    "a sequence of {} tokens is longer than the model's {limit} positions",
                    ids.len()
                )));
            }
        }
        Ok(())
    }

    /// GEMM-bound FLOPs of [`TapModel::taps`] on `batch` (for `infl bench`).
    pub fn flops(&self, batch: &TokenBatch) -> f64 {
        self.net.flops(batch)
    }
}

impl<N: Net> TapModel for Fast<N> {
    fn architecture(&self) -> &str {
        &self.meta.architecture
    }
    fn tracked(&self) -> &[TrackedLayer] {
        &self.meta.tracked
    }
    fn vocab_size(&self) -> usize {
        self.meta.vocab
    }
    fn max_positions(&self) -> usize {
        self.meta.max_positions
    }
    fn n_parameters(&self) -> usize {
        self.meta.n_parameters
    }
    fn taps(&self, batch: &TokenBatch, labels: Labels) -> Result<TapBatch> {
        crate::linalg::flush_subnormals();
        for ids in &batch.ids {
            self.check(ids)?;
        }
        let parts = self.net.taps(batch, labels, self.meta.tracked.len())?;
        tap_batch(batch, parts.losses, parts.a, parts.g, &self.meta.tracked)
    }
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        crate::linalg::flush_subnormals();
        self.check(ids)?;
        self.net.logits(ids)
    }
    fn block_shape(&self) -> BlockShape {
        self.meta.shape
    }
    /// Every kernel is threaded (rayon) and the products split over cores (gemm).
    fn is_threaded(&self) -> bool {
        true
    }
    fn engine(&self) -> super::Engine {
        super::Engine::Fast
    }
    fn tap_flops(&self, batch: &TokenBatch) -> Option<f64> {
        Some(self.net.flops(batch))
    }
    fn taps_peak_bytes(&self, batch_size: usize, max_len: usize) -> Option<u64> {
        let n = (batch_size * max_len) as u64;
        let (blocks, f) = self.net.block_floats();
        let (l, s, t, tr) = (
            blocks as u64,
            f.saved as u64,
            f.taps as u64,
            f.transient as u64,
        );
        let (d, v) = self.net.head_shape();
        let rows = n.min(head_chunk(v) as u64);
        let (d, v) = (d as u64, v as u64);
        // The LM head runs with every block's saved tensors alive: the final norm's rows,
        // roots and gradient, dL/dx, each loss row's index and loss (8 floats' worth), and
        // one chunk of logits with its rows of the stream.
        let at_head = n * (l * s + 4 * d + 1 + 8) + rows * (v + d);
        // Down the blocks, each block's saved tensors give way to its taps: the most held at
        // once is at the top block (every block's saved and its taps) or the bottom one.
        let in_blocks = n * ((l * s + t).max(s + l * t) + tr);
        // And the residual stream throughout, and each thread's scratch: attention's tiles of
        // probabilities and their gradient, the loss's row in f64.
        let scratch = rayon::current_num_threads() as u64
            * (2 * kernels::TILE as u64 * max_len as u64 + 2 * v);
        Some(4 * (n * d + at_head.max(in_blocks) + scratch))
    }
}

/// Floats per token that one block of a [`Net`] holds during its taps (the memory estimate,
/// [`TapModel::taps_peak_bytes`]), with every layer tracked.
pub struct BlockFloats {
    /// Kept by the forward for the backward: the norms' rows and roots, the linear inputs,
    /// attention's q, k, v and row statistics, the MLP's activation terms.
    pub saved: usize,
    /// Allocated by the backward for the taps: each g, and each a not moved out of `saved`.
    pub taps: usize,
    /// The largest short-lived buffers of the block's forward or backward at one time.
    pub transient: usize,
}

impl BlockFloats {
    /// A GPT-2 / GPT-NeoX block: two layer norms, a fused qkv `q` wide for `heads` heads of
    /// a `d`-wide stream, and an `i`-wide MLP whose forward keeps act and act′.
    pub fn layer_norm_mlp(d: usize, heads: usize, q: usize, i: usize) -> BlockFloats {
        BlockFloats {
            // Two norms (rows and a root each), h1, qkv, two statistics per head, attn, h2,
            // act and act'.
            saved: 2 * (d + 1) + d + q + 2 * heads + d + d + 2 * i,
            // g of the output projections (copies of dL/dx), of the MLP input (dL/dpre) and
            // of qkv; every a is a saved tensor moved.
            taps: 2 * d + i + q,
            // The pre-activation next to act and act', or dL/dpre's product with dL/dattn
            // (computed first with a parallel residual) and the norms' gradients.
            transient: i + 3 * d,
        }
    }
}

/// Attention FLOPs of a causal pass over sequences of these lengths, forward and backward
/// (q kᵀ and P v forward; recomputed q kᵀ, dO vᵀ, dS k, dSᵀ q, Pᵀ dO backward), counting only
/// the tiles the kernels compute.
pub(crate) fn attention_flops(lens: &[usize], heads: usize, head_dim: usize) -> f64 {
    let tile = 64;
    lens.iter()
        .map(|&l| {
            let pairs: usize = (0..l)
                .step_by(tile)
                .map(|r0| (r0 + tile).min(l) - r0)
                .zip((0..l).step_by(tile).map(|r0| (r0 + tile).min(l)))
                .map(|(m, n)| m * n)
                .sum();
            7.0 * 2.0 * (pairs * heads * head_dim) as f64
        })
        .sum()
}

/// The number of loss positions of a batch (rows of the LM head).
pub(crate) fn loss_rows(batch: &TokenBatch) -> usize {
    batch
        .loss_positions
        .iter()
        .map(|m| m.iter().filter(|&&b| b).count())
        .sum()
}

/// FLOPs of a fast pass over `batch` (for [`Net::flops`]): each block's four products, forward
/// and activation backward, and its attention, then the LM head at the loss positions.
pub(crate) fn pass_flops<'a>(
    batch: &TokenBatch,
    blocks: impl Iterator<Item = [&'a Lin; 4]>,
    layout: &QkvLayout,
    head: &LmHead,
) -> f64 {
    let n = batch.n_tokens();
    let lens: Vec<usize> = batch.ids.iter().map(Vec::len).collect();
    let per_block: f64 = blocks
        .map(|lins| {
            lins.iter().map(|l| 2.0 * l.flops(n)).sum::<f64>()
                + attention_flops(&lens, layout.heads, layout.head_dim)
        })
        .sum();
    per_block + head.flops(loss_rows(batch))
}
