//! CPU kernels of the fast engine: f32 GEMM (the `gemm` crate, which candle's CPU matmul also
//! uses), fused layer norm / RMS norm forward and backward, activations and their derivatives,
//! rotary embeddings, and causal attention forward and backward that never stores the
//! probability matrices (they are recomputed tile by tile from the saved row max and sum).
//!
//! Matrices are row-major `&[f32]`; a row of activations is one token. Row-wise kernels run in
//! parallel over rows with rayon, attention over (sequence, key/value head) pairs.
//!
//! One file per idea: [`gemm`] (strided views, the GEMM wrapper and the `nn.Linear` products),
//! `norm` (layer norm, RMS norm), `activation` (activations, their derivatives, GLU), `rope`
//! (the fused q/k/v layout, rotary embeddings), `attention` (forward and backward) and `lanes`
//! (the `multiversion!` macro and the lane reductions every vectorised loop shares). This file
//! holds what they all use: [`SyncPtr`], the rows per rayon task and the unzeroed buffers of
//! [`written`].

mod activation;
mod attention;
mod gemm;
mod lanes;
mod norm;
mod rope;

pub use activation::{act_and_derivative, exp, glu_bwd, glu_fwd, mul_in_place, Act};
pub(crate) use attention::TILE;
pub use attention::{attention_backward, attention_bwd, attention_forward, attention_fwd};
pub use gemm::{gemm, matmul_w, matmul_w_new, matmul_wt, matmul_wt_new, View};
pub(crate) use lanes::multiversion;
pub use lanes::{max_lanes, sum_lanes};
pub use norm::{layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd};
pub use rope::{rope_apply, QkvLayout, Rope};

/// A raw pointer that may cross threads: each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub struct SyncPtr(pub *mut f32);
// SAFETY: users only write disjoint regions from different tasks (documented at each use).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    #[inline]
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows smaller than this many elements go to rayon in groups, so tiny models do not pay a
/// task per row.
const ROW_GRAIN: usize = 1 << 14;

fn rows_per_task(d: usize) -> usize {
    (ROW_GRAIN / d.max(1)).max(1)
}

/// `len` floats that `fill` writes through a raw pointer before anything reads them: a product
/// overwrites its whole output, so zeroing it first is wasted (a memset of every activation and
/// logit was 7% of a pass, measured).
///
/// # Safety
/// `fill` must write every one of the `len` elements.
pub unsafe fn written(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    fill(v.as_mut_ptr());
    // SAFETY: the caller guarantees `fill` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::attention::tiled_rows;
    use super::*;

    /// Leaves freed heap memory full of NaN, so that an output a kernel fails to write shows up
    /// (the allocator hands the same chunks back for the next buffers of these sizes).
    fn dirty_the_heap(lens: &[usize]) {
        for &n in lens {
            drop(std::hint::black_box(vec![f32::NAN; n]));
        }
    }

    #[test]
    fn unzeroed_outputs_equal_the_zeroed_kernels() {
        let mut rng = 0x9E37_79B9u32;
        let mut next = || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (rng >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // Two sequences, one longer than a 64-row tile; GQA (4 query heads on 2 kv heads,
        // blocked, with a sliding window) and MHA (interleaved).
        let seqs = [(0usize, 70usize), (70, 9)];
        let n = 79;
        for (lay, window) in [
            (QkvLayout::blocked(4, 2, 8), Some(5)),
            (QkvLayout::interleaved(3, 8), None),
        ] {
            assert!(lay.covers_every_column());
            let qkv: Vec<f32> = (0..n * lay.stride).map(|_| next()).collect();
            let od = lay.heads * lay.head_dim;
            let dout: Vec<f32> = (0..n * od).map(|_| next()).collect();
            let (mut out, mut stats) = (vec![0f32; n * od], vec![0f32; n * 2 * lay.heads]);
            attention_fwd(&qkv, &lay, &seqs, window, 0.3, &mut out, &mut stats);
            let mut dqkv = vec![0f32; n * lay.stride];
            attention_bwd(&qkv, &lay, &seqs, window, 0.3, &stats, &dout, &mut dqkv);
            dirty_the_heap(&[n * od, n * 2 * lay.heads, n * lay.stride]);
            let (out2, stats2) = attention_forward(&qkv, &lay, &seqs, window, 0.3);
            dirty_the_heap(&[n * lay.stride]);
            let dqkv2 = attention_backward(&qkv, &lay, &seqs, window, 0.3, &stats, &dout);
            assert_eq!(out, out2);
            assert_eq!(stats, stats2);
            assert_eq!(dqkv, dqkv2);
        }
        // A layout that leaves columns to nobody, and sequences with a gap, take the zeroed path.
        let partial = QkvLayout {
            stride: 40,
            ..QkvLayout::blocked(2, 2, 6)
        };
        assert!(!partial.covers_every_column());
        assert_eq!(tiled_rows(&[(0, 3), (4, 2)]), None);
        assert_eq!(tiled_rows(&seqs), Some(n));

        let x: Vec<f32> = (0..n * 24).map(|_| 4.0 * next()).collect();
        let w: Vec<f32> = (0..24 * 10).map(|_| next()).collect();
        let b: Vec<f32> = (0..10).map(|_| next()).collect();
        let mut y = vec![0f32; n * 10];
        for row in y.chunks_mut(10) {
            row.copy_from_slice(&b);
        }
        matmul_wt(&x, &w, 24, 10, &mut y, true);
        let mut dx = vec![0f32; n * 24];
        matmul_w(&y, &w, 24, 10, &mut dx, false);
        dirty_the_heap(&[n * 10, n * 24]);
        assert_eq!(matmul_wt_new(&x, &w, 24, 10, Some(&b)), y);
        dirty_the_heap(&[n * 24]);
        assert_eq!(matmul_w_new(&y, &w, 24, 10), dx);
        for act in [Act::GeluTanh, Act::GeluErf, Act::Silu, Act::Relu] {
            dirty_the_heap(&[x.len(), x.len()]);
            let (f, df) = act_and_derivative(act, &x);
            for ((&x, f), df) in x.iter().zip(f).zip(df) {
                assert_eq!(
                    (f.to_bits(), df.to_bits()),
                    (act.f(x).to_bits(), act.df(x).to_bits())
                );
            }
        }
    }
}
