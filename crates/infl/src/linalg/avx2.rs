//! The covariance pass's Grams on x86-64 with AVX2 and FMA but no AVX-512: the lower triangle
//! of `xᵀ x` for row-major `x` (a token per row), in one sweep over the tokens.
//!
//! Why not the `gemm` crate: a Gram done as a recursion of general products re-packs the
//! tokens at every level (the block below the diagonal, then each half), and on a Zen 4 without
//! AVX-512 packing was 15.7% of the Grams' time and edge kernels 2.4% (perf, one thread). Here
//! each block of tokens ([`block_tokens`]) is packed once, into panels of 16 columns, and every
//! block of the triangle is formed from those: the kernel's 16 rows are one panel, and its 6
//! broadcast columns are read from the panels in place. The width is padded with zeros, so one
//! kernel serves the edges too. One thread, 2,048 tokens, widths 128 / 256 / 512 / 1,024 /
//! 1,025: 70.0 / 76.4 / 76.7 / 81.2 / 77.9 GF/s against 49.5 / 60.5 / 63.7 / 59.4 / 63.9 for
//! the recursion (counting the symmetric half's FLOPs). On AVX-512 machines the `gemm` crate's
//! wider kernels win, so they keep the recursion ([`available`]).
//!
//! The same kernel for the eigenvalue and scoring passes' per-sequence products `gᵀ a` (`k` a
//! sequence's length) was tried and not kept: 66.8–71.4 GF/s against 65.8–74.6 for the `gemm`
//! crate on the benchmark job's shapes (one thread, two interleaved runs), the same within the
//! noise.
//!
//! The sums are f32 over all the tokens, as in the recursion, in a fixed order: each output
//! element is one kernel's accumulation over the blocks in turn, whatever the thread count.

use rayon::prelude::*;
use std::arch::x86_64::{
    __m256, _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
    _mm256_setzero_ps, _mm256_storeu_ps,
};

/// Rows of an output block: two 8-lane vectors along `i`.
const MR: usize = 16;
/// Columns of an output block, each a broadcast of one input: 2 × 6 accumulators, 12 of the
/// 16 vector registers, leaving room for the two loads and the broadcast.
const NR: usize = 6;
/// Bytes of panels a block of tokens packs into: half a Zen 4 core's 1 MiB L2.
const PANEL_BYTES: usize = 512 << 10;

/// Tokens per packed block for a width of `blocks_i · MR`: as many as keep the
/// panels within [`PANEL_BYTES`], 128 to 512.
/// Longer blocks mean fewer kernel calls, each loading and storing its output block once.
fn block_tokens(blocks_i: usize) -> usize {
    (PANEL_BYTES / (4 * MR * blocks_i.max(1))).clamp(128, 512)
}

/// Whether this machine takes this path: AVX2 and FMA, and no AVX-512 (where the `gemm`
/// crate's 16-lane kernels are faster than these 8-lane ones).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && !is_x86_feature_detected!("avx512f")
    })
}

/// The lower triangle (`i ≥ j`) of `xᵀ x` for the `n × d` row-major `x` (row stride `ld`),
/// added into the f64 sums `acc(i, j)` (the leading `d × d` triangle of `acc`); anything
/// past `d` is not touched. With `parallel`,
/// the output's column blocks are split over the current pool (the same sums, bit for bit).
///
/// # Panics
/// If [`available`] is false, or `x` is shorter than `n` rows of stride `ld` need.
pub fn add_gram_rows(
    acc: &mut super::Lower,
    x: &[f32],
    (n, d, ld): (usize, usize, usize),
    parallel: bool,
) {
    assert!(available(), "the AVX2 Gram kernel needs AVX2 and FMA");
    assert!(acc.dim() >= d, "acc is at least d × d");
    assert!(
        d <= ld && (n == 0 || x.len() >= (n - 1) * ld + d),
        "x is n rows of stride ld"
    );
    if n == 0 || d == 0 {
        return;
    }
    let (blocks_i, blocks_j) = (d.div_ceil(MR), d.div_ceil(NR));
    let ldc = blocks_i * MR;
    // f32 sums, column-major with `ldc` rows: the kernels write whole blocks (padding too).
    let mut sums = vec![0f32; ldc * blocks_j * NR];
    let block = block_tokens(blocks_i).min(n);
    let mut panels = Panels::new(blocks_i * block * MR);
    for t0 in (0..n).step_by(block) {
        let kc = block.min(n - t0);
        pack(&x[t0 * ld..], (kc, d, ld), panels.slice_mut());
        let a = panels.slice();
        let first = t0 == 0;
        // Column block `jb` of the sums: `NR` columns, from the block holding row `jb·NR` on.
        let column_block = |(jb, out): (usize, &mut [f32])| {
            // Column c of x, as packed: panel c / MR, offset c % MR, MR apart from token to
            // token. Padding columns (past d) read column d − 1: their sums are not kept.
            let columns: [&[f32]; NR] = std::array::from_fn(|k| {
                let c = (jb * NR + k).min(d - 1);
                &a[(c / MR) * kc * MR + c % MR..(c / MR + 1) * kc * MR]
            });
            for ib in (jb * NR) / MR..blocks_i {
                let rows = &a[ib * kc * MR..(ib + 1) * kc * MR];
                // SAFETY: `available` checked the features; `rows` holds `kc` packed rows of
                // MR floats, each of `columns` kc floats MR apart, and `out[ib·MR..]` NR
                // columns of stride `ldc`.
                unsafe { kernel(kc, rows, &columns, &mut out[ib * MR..], ldc, first) };
            }
        };
        let columns = sums.chunks_mut(ldc * NR).enumerate();
        if parallel {
            columns
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(column_block);
        } else {
            columns.for_each(column_block);
        }
    }
    for j in 0..d {
        let out = &mut acc.col_mut(j)[..d - j];
        for (o, &s) in out.iter_mut().zip(&sums[j * ldc + j..j * ldc + d]) {
            *o += s as f64;
        }
    }
}

/// Packed panels on a 64-byte boundary, so that no vector load straddles two cache lines.
struct Panels {
    data: Vec<f32>,
    start: usize,
    len: usize,
}

impl Panels {
    fn new(len: usize) -> Panels {
        let data = vec![0f32; len + 16];
        let start = data.as_ptr().align_offset(64).min(16);
        Panels { data, start, len }
    }
    fn slice(&self) -> &[f32] {
        &self.data[self.start..self.start + self.len]
    }
    fn slice_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.start..self.start + self.len]
    }
}

/// Packs `kc` rows of `d` columns (row stride `ld`) into panels of `MR` columns: panel `p`
/// holds, at `p·kc·MR + t·MR`, row t's columns `[p·MR, p·MR + MR)`, zero past `d`. Each chunk
/// is a fixed-size copy, done by inline moves (a `memmove` call per small chunk was 17% of a
/// 256-wide Gram's time).
fn pack(rows: &[f32], (kc, d, ld): (usize, usize, usize), panels: &mut [f32]) {
    let full = d / MR;
    let rest = d - full * MR;
    for t in 0..kc {
        let row = &rows[t * ld..t * ld + d];
        for (p, chunk) in row.chunks_exact(MR).enumerate() {
            let at = p * kc * MR + t * MR;
            let dst: &mut [f32; MR] = (&mut panels[at..at + MR]).try_into().expect("MR wide");
            *dst = chunk.try_into().expect("MR wide");
        }
        if rest > 0 {
            let at = full * kc * MR + t * MR;
            panels[at..at + rest].copy_from_slice(&row[full * MR..]);
            panels[at + rest..at + MR].fill(0.0);
        }
    }
}

/// One `MR × NR` output block over `kc` tokens: `c(i, j) [+]= Σ_t rows(t, i) · columns[j](t)`,
/// with `rows` packed `MR` per token, each of `columns` read every `MR` floats, and `c`
/// column-major (column stride `ldc`), written (`first`) or added to.
///
/// # Safety
/// AVX2 and FMA must be available; `rows` holds `kc · MR` floats, each of `columns` at least
/// `(kc − 1) · MR + 1`, and `c` at least `(NR − 1) · ldc + MR`.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(
    kc: usize,
    rows: &[f32],
    columns: &[&[f32]; NR],
    c: &mut [f32],
    ldc: usize,
    first: bool,
) {
    assert!(c.len() >= (NR - 1) * ldc + MR);
    assert!(kc > 0 && rows.len() >= kc * MR);
    assert!(columns.iter().all(|b| b.len() > (kc - 1) * MR));
    let a = rows.as_ptr();
    let b: [*const f32; NR] = std::array::from_fn(|j| columns[j].as_ptr());
    let c = c.as_mut_ptr();
    let mut sums: [[__m256; 2]; NR] = [[_mm256_setzero_ps(); 2]; NR];
    // SAFETY (all pointer reads and writes below): in bounds by the assertions above.
    unsafe {
        for t in 0..kc {
            let a0 = _mm256_loadu_ps(a.add(t * MR));
            let a1 = _mm256_loadu_ps(a.add(t * MR + 8));
            for (s, bj) in sums.iter_mut().zip(b) {
                let bj = _mm256_broadcast_ss(&*bj.add(t * MR));
                s[0] = _mm256_fmadd_ps(a0, bj, s[0]);
                s[1] = _mm256_fmadd_ps(a1, bj, s[1]);
            }
        }
        for (j, s) in sums.iter().enumerate() {
            let col = c.add(j * ldc);
            let (mut lo, mut hi) = (s[0], s[1]);
            if !first {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(col));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(col.add(8)));
            }
            _mm256_storeu_ps(col, lo);
            _mm256_storeu_ps(col.add(8), hi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quarter-integer inputs: every product and partial sum is exact in f32, so the kernel's
    /// sums must equal the f64 ones exactly, at every width around the block edges and over
    /// several token blocks, split over threads or not.
    #[test]
    fn gram_rows_are_the_exact_lower_triangle() {
        if !available() {
            return;
        }
        let n = 2 * 512 + 37;
        for d in [1, 5, 6, 7, 16, 17, 40, 96, 257] {
            let ld = d + 3;
            let x: Vec<f32> = (0..n * ld)
                .map(|k| ((k * 7 + k / ld * 3) % 11) as f32 * 0.25 - 1.0)
                .collect();
            let start = |i: usize, j: usize| (i * 3 + j) as f64;
            // One row and column wider than the Gram: the kernel keeps to the leading d.
            let mut acc = super::super::Lower::zeros(d + 1);
            for j in 0..=d {
                for (k, v) in acc.col_mut(j).iter_mut().enumerate() {
                    *v = start(j + k, j);
                }
            }
            let mut split = acc.clone();
            add_gram_rows(&mut acc, &x, (n, d, ld), false);
            add_gram_rows(&mut split, &x, (n, d, ld), true);
            for j in 0..=d {
                for k in 0..=d - j {
                    let i = j + k;
                    let want = if i < d {
                        start(i, j)
                            + (0..n)
                                .map(|t| x[t * ld + i] as f64 * x[t * ld + j] as f64)
                                .sum::<f64>()
                    } else {
                        start(i, j)
                    };
                    assert_eq!(acc.col(j)[k], want, "width {d}, ({i}, {j})");
                    assert_eq!(split.col(j)[k], want, "width {d}, ({i}, {j}), split");
                }
            }
        }
    }

    /// Values that do round in f32: the threaded sums are the same bits as the serial ones.
    #[test]
    fn threads_do_not_change_the_bits() {
        if !available() {
            return;
        }
        let (n, d) = (3 * 512 + 5, 70);
        let x: Vec<f32> = (0..n * d).map(|k| ((k as f32) * 0.377).sin()).collect();
        let mut serial = super::super::Lower::zeros(d);
        add_gram_rows(&mut serial, &x, (n, d, d), false);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let mut split = super::super::Lower::zeros(d);
        pool.install(|| add_gram_rows(&mut split, &x, (n, d, d), true));
        assert_eq!(serial, split);
        // And they are the Gram to f32 accuracy.
        for j in 0..d {
            for i in j..d {
                let exact: f64 = (0..n)
                    .map(|t| x[t * d + i] as f64 * x[t * d + j] as f64)
                    .sum();
                let got = serial.col(j)[i - j];
                assert!((got - exact).abs() < 1e-4 * (1.0 + exact.abs()));
            }
        }
    }
}
