//! CPU kernels of the fast engine: f32 GEMM (the `gemm` crate, which candle's CPU matmul also
//! uses), fused layer norm / RMS norm forward and backward, activations and their derivatives,
//! rotary embeddings, and causal attention forward and backward that never stores the
//! probability matrices (they are recomputed tile by tile from the saved row max and sum).
//!
//! Matrices are row-major `&[f32]`; a row of activations is one token. Row-wise kernels run in
//! parallel over rows with rayon, attention over (sequence, key/value head) pairs.

use rayon::prelude::*;
use std::mem::MaybeUninit;

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

/// A strided matrix view for [`gemm`]: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// A row-major matrix with `ld` elements between rows.
    pub fn rows(s: &[f32], ld: usize) -> View {
        View {
            ptr: s.as_ptr(),
            rs: ld,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `ld` elements between rows.
    pub fn t(s: &[f32], ld: usize) -> View {
        View {
            ptr: s.as_ptr(),
            rs: 1,
            cs: ld,
        }
    }
}

/// `C (m×n, row stride ldc) = [C +] scale · A (m×k) · B (k×n)`.
///
/// # Safety
/// The views must cover `m×k` and `k×n` elements inside live allocations, `c` must cover
/// `m×n` with row stride `ldc` and not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    a: View,
    b: View,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let par = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

/// `y (n×d_out) = [y +] x (n×d_in) · Wᵀ` with `W` stored `[d_out, d_in]` (nn.Linear), threaded.
pub fn matmul_wt(x: &[f32], w: &[f32], d_in: usize, d_out: usize, y: &mut [f32], acc: bool) {
    let n = x.len() / d_in.max(1);
    assert!(x.len() == n * d_in && w.len() == d_in * d_out && y.len() == n * d_out);
    // SAFETY: shapes checked above; `y` is a distinct &mut.
    unsafe {
        gemm(
            n,
            d_out,
            d_in,
            y.as_mut_ptr(),
            d_out,
            View::rows(x, d_in),
            View::t(w, d_in),
            acc,
            1.0,
            true,
        )
    }
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

/// `x Wᵀ` for `x` of n rows (n×d_in) and `W` stored `[d_out, d_in]`, in a fresh buffer; with
/// `bias`, `b + x Wᵀ` (the bias is the product's starting value, as in [`matmul_wt`] with
/// `acc` onto bias rows).
pub fn matmul_wt_new(
    x: &[f32],
    w: &[f32],
    d_in: usize,
    d_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let n = x.len() / d_in.max(1);
    assert!(x.len() == n * d_in && w.len() == d_in * d_out);
    assert!(bias.is_none_or(|b| b.len() == d_out));
    // SAFETY: every row is written, by the bias copy and then accumulated by the product, or
    // by the product alone; rows are disjoint across tasks; shapes checked above.
    unsafe {
        written(n * d_out, |y| {
            if let Some(b) = bias {
                let y = SyncPtr(y);
                (0..n)
                    .into_par_iter()
                    .with_min_len(rows_per_task(d_out))
                    .for_each(|r| {
                        std::ptr::copy_nonoverlapping(b.as_ptr(), y.get().add(r * d_out), d_out);
                    });
            }
            gemm(
                n,
                d_out,
                d_in,
                y,
                d_out,
                View::rows(x, d_in),
                View::t(w, d_in),
                bias.is_some(),
                1.0,
                true,
            );
        })
    }
}

/// `dy W` for `dy` of n rows (n×d_out) and `W` stored `[d_out, d_in]`, in a fresh buffer.
pub fn matmul_w_new(dy: &[f32], w: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    let n = dy.len() / d_out.max(1);
    assert!(dy.len() == n * d_out && w.len() == d_in * d_out);
    // SAFETY: the product writes all n×d_in elements; shapes checked above.
    unsafe {
        written(n * d_in, |dx| {
            gemm(
                n,
                d_in,
                d_out,
                dx,
                d_in,
                View::rows(dy, d_out),
                View::rows(w, d_in),
                false,
                1.0,
                true,
            )
        })
    }
}

/// `dx (n×d_in) = [dx +] dy (n×d_out) · W` with `W` stored `[d_out, d_in]`, threaded.
pub fn matmul_w(dy: &[f32], w: &[f32], d_in: usize, d_out: usize, dx: &mut [f32], acc: bool) {
    let n = dy.len() / d_out.max(1);
    assert!(dy.len() == n * d_out && w.len() == d_in * d_out && dx.len() == n * d_in);
    // SAFETY: shapes checked above; `dx` is a distinct &mut.
    unsafe {
        gemm(
            n,
            d_in,
            d_out,
            dx.as_mut_ptr(),
            d_in,
            View::rows(dy, d_out),
            View::rows(w, d_in),
            acc,
            1.0,
            true,
        )
    }
}

/// Rows smaller than this many elements go to rayon in groups, so tiny models do not pay a
/// task per row.
const ROW_GRAIN: usize = 1 << 14;

fn rows_per_task(d: usize) -> usize {
    (ROW_GRAIN / d.max(1)).max(1)
}

/// Layer norm of each row of `x` (n×d): writes `xhat = (x − mean)/sqrt(var + eps)` into `xhat`,
/// `1/sqrt(var + eps)` into `rstd`, and `y = xhat·w + b` into `y`: every element of all three,
/// so they need not be initialised. The order of operations follows the composed reference
/// (centred values, biased variance, division by the root).
pub fn layer_norm_fwd(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f64,
    xhat: &mut [MaybeUninit<f32>],
    rstd: &mut [MaybeUninit<f32>],
    y: &mut [MaybeUninit<f32>],
) {
    norm_fwd(x, w, Some(b), eps, xhat, rstd, y)
}

/// [`layer_norm_fwd`] (with `b`) or [`rms_norm_fwd`] (without), rows in parallel.
fn norm_fwd(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f64,
    xhat: &mut [MaybeUninit<f32>],
    rstd: &mut [MaybeUninit<f32>],
    y: &mut [MaybeUninit<f32>],
) {
    let d = w.len();
    let g = rows_per_task(d);
    x.par_chunks(d * g)
        .zip(xhat.par_chunks_mut(d * g))
        .zip(rstd.par_chunks_mut(g))
        .zip(y.par_chunks_mut(d * g))
        .for_each(|(((x, xh), rs), y)| norm_rows(x, w, b, eps as f32, xh, rs, y));
}

multiversion! {
    /// Rows of [`layer_norm_fwd`] (with `b`) or [`rms_norm_fwd`] (without): the mean and the
    /// mean square in eight interleaved partial sums, so that they vectorise (the loop is a
    /// function of its own, compiled for the CPU: a closure inside the threaded loop is not).
    fn norm_rows(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        eps: f32,
        xh: &mut [MaybeUninit<f32>],
        rs: &mut [MaybeUninit<f32>],
        y: &mut [MaybeUninit<f32>],
    ) {
        let d = w.len();
        for (((x, xh), r), y) in x
            .chunks(d)
            .zip(xh.chunks_mut(d))
            .zip(rs.iter_mut())
            .zip(y.chunks_mut(d))
        {
            let mean = if b.is_some() { lanes_sum(x, |v| v) / d as f32 } else { 0.0 };
            let ms = lanes_sum(x, |v| (v - mean) * (v - mean)) / d as f32;
            let root = (ms + eps).sqrt();
            r.write(1.0 / root);
            match b {
                Some(b) => {
                    for j in 0..d {
                        let v = (x[j] - mean) / root;
                        xh[j].write(v);
                        y[j].write(v * w[j] + b[j]);
                    }
                }
                None => {
                    for j in 0..d {
                        let v = x[j] / root;
                        xh[j].write(v);
                        y[j].write(v * w[j]);
                    }
                }
            }
        }
    }
}

/// `Σ f(x_j)` in eight interleaved partial sums combined in a fixed order (inlined into the
/// multiversioned loops that call it, so it vectorises with them).
#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += f(v);
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// Backward of [`layer_norm_fwd`]: `dx [+]= rstd · (dxhat − mean(dxhat) − xhat · mean(dxhat·xhat))`
/// with `dxhat = dy·w`; sums in f64.
pub fn layer_norm_bwd(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: &mut [f32],
    acc: bool,
) {
    norm_bwd(dy, xhat, rstd, w, dx, acc, true)
}

/// RMS norm of each row: `xhat = x / sqrt(mean(x²) + eps)`, `y = xhat·w`.
pub fn rms_norm_fwd(
    x: &[f32],
    w: &[f32],
    eps: f64,
    xhat: &mut [MaybeUninit<f32>],
    rstd: &mut [MaybeUninit<f32>],
    y: &mut [MaybeUninit<f32>],
) {
    norm_fwd(x, w, None, eps, xhat, rstd, y)
}

/// Backward of [`rms_norm_fwd`]: `dx [+]= rstd · (dxhat − xhat · mean(dxhat·xhat))`.
pub fn rms_norm_bwd(dy: &[f32], xhat: &[f32], rstd: &[f32], w: &[f32], dx: &mut [f32], acc: bool) {
    norm_bwd(dy, xhat, rstd, w, dx, acc, false)
}

fn norm_bwd(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: &mut [f32],
    acc: bool,
    center: bool,
) {
    let d = w.len();
    let g = rows_per_task(d);
    dy.par_chunks(d * g)
        .zip(xhat.par_chunks(d * g))
        .zip(rstd.par_chunks(g))
        .zip(dx.par_chunks_mut(d * g))
        .for_each(|(((dy, xh), rs), dx)| norm_bwd_rows(dy, xh, rs, w, dx, acc, center));
}

multiversion! {
    /// Rows of [`norm_bwd`]: the two means in eight interleaved f64 partial sums (vectorised;
    /// one running f64 sum was a chain of dependent adds, four cycles an element).
    fn norm_bwd_rows(
        dy: &[f32],
        xh: &[f32],
        rs: &[f32],
        w: &[f32],
        dx: &mut [f32],
        acc: bool,
        center: bool,
    ) {
        let d = w.len();
        for (((dy, xh), r), dx) in dy
            .chunks(d)
            .zip(xh.chunks(d))
            .zip(rs.iter())
            .zip(dx.chunks_mut(d))
        {
            let (mut l1, mut l2) = ([0f64; 8], [0f64; 8]);
            let body = d / 8 * 8;
            for j0 in (0..body).step_by(8) {
                for l in 0..8 {
                    let g = (dy[j0 + l] * w[j0 + l]) as f64;
                    l1[l] += g;
                    l2[l] += g * xh[j0 + l] as f64;
                }
            }
            for j in body..d {
                let g = (dy[j] * w[j]) as f64;
                l1[j - body] += g;
                l2[j - body] += g * xh[j] as f64;
            }
            let fold = |l: [f64; 8]| ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
            let (s1, s2) = (fold(l1), fold(l2));
            let m1 = if center { (s1 / d as f64) as f32 } else { 0.0 };
            let m2 = (s2 / d as f64) as f32;
            for j in 0..d {
                let v = r * (dy[j] * w[j] - m1 - xh[j] * m2);
                if acc {
                    dx[j] += v;
                } else {
                    dx[j] = v;
                }
            }
        }
    }
}

/// Activation functions by their config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))` (gelu_new, gelu_pytorch_tanh, gelu_fast).
    GeluTanh,
    /// `0.5 x (1 + erf(x/√2))` (gelu).
    GeluErf,
    Relu,
    /// `x σ(x)` (silu, swish).
    Silu,
}

impl Act {
    /// The activation a config name selects (the names `ops::activation` accepts).
    pub fn from_name(name: &str) -> Option<Act> {
        match name {
            "gelu" => Some(Act::GeluErf),
            "relu" => Some(Act::Relu),
            "silu" | "swish" => Some(Act::Silu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Act::GeluTanh),
            _ => None,
        }
    }

    /// The activation. Both tanh forms are evaluated through the logistic function,
    /// `0.5 (1 + tanh(u)) = σ(2u)`, which needs one `exp` instead of a (much slower) `tanh`
    /// and stays accurate (no cancellation) for every x.
    #[inline(always)]
    pub fn f(self, x: f32) -> f32 {
        match self {
            Act::GeluTanh => x * sigmoid(2.0 * gelu_inner(x)),
            Act::GeluErf => {
                (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
                    * 0.5
                    * x
            }
            Act::Relu => x.max(0.0),
            Act::Silu => x * sigmoid(x),
        }
    }

    /// The derivative (exact constants).
    #[inline(always)]
    pub fn df(self, x: f32) -> f32 {
        match self {
            Act::GeluTanh => {
                // With s = σ(2u): 0.5 (1 + tanh u) = s and 1 − tanh² u = 4 s (1 − s).
                let s = sigmoid(2.0 * gelu_inner(x));
                s + 2.0 * x * s * (1.0 - s) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Act::GeluErf => {
                let cdf = 0.5
                    * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = exp(-0.5 * x * x) / (2.0 * std::f32::consts::PI).sqrt();
                cdf + x * pdf
            }
            Act::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Silu => {
                let s = sigmoid(x);
                s + x * s * (1.0 - s)
            }
        }
    }
}

/// √(2/π).
const GELU_C: f32 = 0.797_884_6;

/// `√(2/π) (x + 0.044715 x³)`.
#[inline(always)]
fn gelu_inner(x: f32) -> f32 {
    GELU_C * (x + 0.044715 * x * x * x)
}

/// `1 / (1 + e^{−z})` (0 or 1 at the extremes, never NaN).
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

/// `e^x` in f32 with no library call, so that loops over it vectorise: Cephes' `expf` (range
/// reduction by ln 2 split in two parts, a degree-6 polynomial, the power of two set in the
/// exponent bits); relative error below 2.5e-7 over the whole range (tested against f64).
/// Below −87.33, where `e^x` is subnormal, it returns 0; above 88.72 it returns `e^88.72`
/// (only reached by `sigmoid` of x < −88.7, whose value then rounds to 0 either way).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    let xc = x.clamp(LO, HI);
    // n = round(x / ln 2) by the 1.5·2²³ trick (exact in round-to-nearest, vectorises with no
    // rounding instruction). The shifted sum holds n in its low mantissa bits, which gives n as
    // an integer with no float-to-int conversion: `as i32` saturates and maps NaN to 0, which
    // LLVM emitted as 16 scalar conversions per vector (measured: a third of GELU's time).
    let shifted = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let n_int = shifted.to_bits() as i32 - 0x4B40_0000;
    let n = shifted - 12_582_912.0;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n for n in [-126, 128] as two normal halves, 2^⌊n/2⌋ · 2^⌈n/2⌉: one power would leave
    // the exponent field at both ends.
    let n = n_int;
    let half = n >> 1;
    let pow = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        e * pow(half) * pow(n - half)
    }
}

/// Defines `fn $name` compiled three times, for AVX-512, for AVX2 + FMA and for the portable
/// target, and runs the widest the CPU has: LLVM then vectorises the element loops 16 or 8
/// wide (the portable build targets SSE2, and a closure handed to a feature-enabled function
/// is not inlined into it, measured). Every build computes the same values: nothing here uses
/// fused multiply-adds, and Rust never contracts `a * b + c` on its own.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wider($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `wider` is compiled for.
                    return unsafe { wider($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    fn glu_rows(act: Act, gu: &[f32], di: usize, y: &mut [f32]) {
        for (gu, y) in gu.chunks(2 * di).zip(y.chunks_mut(di)) {
            let (gate, up) = gu.split_at(di);
            for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                *y = act.f(g) * u;
            }
        }
    }
}

multiversion! {
    fn glu_grad_rows(act: Act, gu: &[f32], dy: &[f32], di: usize, dgu: &mut [f32]) {
        for ((gu, dy), dgu) in gu.chunks(2 * di).zip(dy.chunks(di)).zip(dgu.chunks_mut(2 * di)) {
            let (gate, up) = gu.split_at(di);
            let (dgate, dup) = dgu.split_at_mut(di);
            for ((((dg, du), &dy), &g), &u) in dgate.iter_mut().zip(dup).zip(dy).zip(gate).zip(up) {
                *dg = dy * u * act.df(g);
                *du = dy * act.f(g);
            }
        }
    }
}

multiversion! {
    /// Sum in eight interleaved partial sums, combined in a fixed order: vectorisable (an
    /// in-order sum is not) and deterministic.
    pub fn sum_lanes(x: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        for (l, v) in lanes.iter_mut().zip(chunks.remainder()) {
            *l += v;
        }
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    }
}

multiversion! {
    /// The largest element (−∞ for an empty slice; NaNs are skipped, as by `f32::max`), in 16
    /// interleaved partial maxima: a single running maximum is a serial chain of dependent
    /// `max` instructions that LLVM does not reorder (it was most of the LM head's loss, one
    /// per logit). The maximum does not depend on the order, so the value is the fold's.
    pub fn max_lanes(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.max(v);
            }
        }
        for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
            *l = l.max(v);
        }
        lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l))
    }
}

multiversion! {
    /// Softmax of `row` in place; returns its (max, sum of e^(x − max)), the statistics the
    /// backward recomputes the probabilities from.
    fn softmax_in_place(row: &mut [f32]) -> (f32, f32) {
        let mx = max_lanes(row);
        for x in row.iter_mut() {
            *x = exp(*x - mx);
        }
        let sum = sum_lanes(row);
        for x in row.iter_mut() {
            *x /= sum;
        }
        (mx, sum)
    }
}

multiversion! {
    /// One row of the attention backward: `p` holds the scores on entry and the recomputed
    /// probabilities on return, `d` holds dP on entry and dS = P ∘ (dP − ⟨P, dP⟩) · scale.
    fn softmax_grad_row(p: &mut [f32], d: &mut [f32], mx: f32, sum: f32, scale: f32) {
        for x in p.iter_mut() {
            *x = exp(*x - mx) / sum;
        }
        let mut lanes = [0f32; 8];
        let mut chunks = p.chunks_exact(8).zip(d.chunks_exact(8));
        for (pc, dc) in &mut chunks {
            for ((l, a), b) in lanes.iter_mut().zip(pc).zip(dc) {
                *l += a * b;
            }
        }
        let tail = p.len() - p.len() % 8;
        for ((l, a), b) in lanes.iter_mut().zip(&p[tail..]).zip(&d[tail..]) {
            *l += a * b;
        }
        let dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for (x, &pv) in d.iter_mut().zip(p.iter()) {
            *x = pv * (*x - dot) * scale;
        }
    }
}

/// `(act(x), act'(x))` in fresh buffers, in one sweep (the logistic term of GELU and SiLU is
/// shared): the forward keeps the derivative for the backward, which is then a product
/// ([`mul_in_place`]) instead of a second evaluation. The values are those of `act.f` and
/// `act.df`, bit for bit.
pub fn act_and_derivative(act: Act, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = x.len();
    let (mut y, mut d) = (Vec::with_capacity(n), Vec::with_capacity(n));
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(ROW_GRAIN)
        .zip(d.spare_capacity_mut()[..n].par_chunks_mut(ROW_GRAIN))
        .zip(x.par_chunks(ROW_GRAIN))
        .for_each(|((y, d), x)| act_and_derivative_slice(act, x, y, d));
    // SAFETY: every element of both was written by `act_and_derivative_slice`.
    unsafe {
        y.set_len(n);
        d.set_len(n);
    }
    (y, d)
}

multiversion! {
    fn act_and_derivative_slice(
        act: Act,
        x: &[f32],
        y: &mut [MaybeUninit<f32>],
        d: &mut [MaybeUninit<f32>],
    ) {
        for ((x, y), d) in x.iter().zip(y).zip(d) {
            y.write(act.f(*x));
            d.write(act.df(*x));
        }
    }
}

/// `dy ← dy · d`, elementwise (the activation backward from a saved derivative).
pub fn mul_in_place(dy: &mut [f32], d: &[f32]) {
    assert_eq!(
        dy.len(),
        d.len(),
        "gradient and derivative have one element each"
    );
    dy.par_chunks_mut(ROW_GRAIN)
        .zip(d.par_chunks(ROW_GRAIN))
        .for_each(|(dy, d)| mul_slice(dy, d));
}

multiversion! {
    fn mul_slice(dy: &mut [f32], d: &[f32]) {
        for (dy, d) in dy.iter_mut().zip(d) {
            *dy *= *d;
        }
    }
}

/// SwiGLU-style gate: `y = act(gate) · up`, where row r of `gu` (n × 2di) is `[gate | up]`.
pub fn glu_fwd(act: Act, gu: &[f32], di: usize, y: &mut [f32]) {
    let g = rows_per_task(2 * di);
    gu.par_chunks(2 * di * g)
        .zip(y.par_chunks_mut(di * g))
        .for_each(|(gu, y)| {
            glu_rows(act, gu, di, y);
        });
}

/// Backward of [`glu_fwd`]: `dgu = [dy · up · act'(gate) | dy · act(gate)]`.
pub fn glu_bwd(act: Act, gu: &[f32], dy: &[f32], di: usize, dgu: &mut [f32]) {
    let g = rows_per_task(2 * di);
    gu.par_chunks(2 * di * g)
        .zip(dy.par_chunks(di * g))
        .zip(dgu.par_chunks_mut(2 * di * g))
        .for_each(|((gu, dy), dgu)| {
            glu_grad_rows(act, gu, dy, di, dgu);
        });
}

/// Where each head's q, k and v sit in a row of the fused projection output: head `h` of q
/// starts at column `q.0 + h·q.1`, kv head `g` of k at `k.0 + g·k.1`, of v at `v.0 + g·v.1`.
#[derive(Debug, Clone, Copy)]
pub struct QkvLayout {
    pub stride: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q: (usize, usize),
    pub k: (usize, usize),
    pub v: (usize, usize),
}

impl QkvLayout {
    /// `[q heads | k heads | v heads]` (GPT-2's c_attn, Llama's q/k/v fused in that order).
    pub fn blocked(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        let (hq, hk) = (heads * head_dim, kv_heads * head_dim);
        QkvLayout {
            stride: hq + 2 * hk,
            heads,
            kv_heads,
            head_dim,
            q: (0, head_dim),
            k: (hq, head_dim),
            v: (hq + hk, head_dim),
        }
    }

    /// `[head, {q, k, v}, head_dim]` (GPT-NeoX's query_key_value).
    pub fn interleaved(heads: usize, head_dim: usize) -> Self {
        QkvLayout {
            stride: 3 * heads * head_dim,
            heads,
            kv_heads: heads,
            head_dim,
            q: (0, 3 * head_dim),
            k: (head_dim, 3 * head_dim),
            v: (2 * head_dim, 3 * head_dim),
        }
    }
}

/// Rotary tables for positions `0..len`: `cos`/`sin` are `len × rotary_dims` (each half
/// repeated, HF's `rotate_half` convention).
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub dims: usize,
}

/// Rotates (or, with `inverse`, rotates back: the transpose, for the backward) the first
/// `rope.dims` dimensions of every q and k head of every row. `seqs` gives each sequence's
/// (first row, length): positions restart at 0 in each sequence.
pub fn rope_apply(
    qkv: &mut [f32],
    lay: &QkvLayout,
    rope: &Rope,
    seqs: &[(usize, usize)],
    inverse: bool,
) {
    let (r, half) = (rope.dims, rope.dims / 2);
    if r == 0 {
        return;
    }
    let mut pos = vec![0usize; qkv.len() / lay.stride];
    for &(o, l) in seqs {
        for t in 0..l {
            pos[o + t] = t;
        }
    }
    let rotate = |row: &mut [f32], col: usize, p: usize| {
        let (c, s) = (
            &rope.cos[p * r..p * r + half],
            &rope.sin[p * r..p * r + half],
        );
        let x = &mut row[col..col + r];
        for i in 0..half {
            let (x1, x2) = (x[i], x[i + half]);
            if inverse {
                x[i] = x1 * c[i] + x2 * s[i];
                x[i + half] = x2 * c[i] - x1 * s[i];
            } else {
                // The reference computes x·cos + rotate_half(x)·sin with rotate_half = [−x2, x1].
                x[i] = x1 * c[i] + -x2 * s[i];
                x[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    };
    qkv.par_chunks_mut(lay.stride)
        .zip(pos.par_iter())
        .for_each(|(row, &p)| {
            for h in 0..lay.heads {
                rotate(row, lay.q.0 + h * lay.q.1, p);
            }
            for g in 0..lay.kv_heads {
                rotate(row, lay.k.0 + g * lay.k.1, p);
            }
        });
}

/// Query rows per attention tile: a tile of queries only needs the keys up to its last row.
pub(crate) const TILE: usize = 64;

/// The keys row `i` may see: `[lo, i]`, with a sliding window `i − j < w`.
fn key_start(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Causal softmax attention of every (sequence, head): `out` (rows × heads·head_dim) gets
/// `softmax(scale · q kᵀ + mask) v` per head, `stats` (rows × heads × 2) the row max and
/// sum of exponentials that let the backward recompute the probabilities bit for bit.
pub fn attention_fwd(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    out: &mut [f32],
    stats: &mut [f32],
) {
    let rows = rows_named(seqs);
    assert!(out.len() >= rows * lay.heads * lay.head_dim && stats.len() >= rows * 2 * lay.heads);
    assert!(qkv.len() >= rows * lay.stride);
    // SAFETY: the outputs cover every row a sequence names (checked above).
    unsafe {
        attention_fwd_raw(
            qkv,
            lay,
            seqs,
            window,
            scale,
            SyncPtr(out.as_mut_ptr()),
            SyncPtr(stats.as_mut_ptr()),
        )
    }
}

/// One past the last row any sequence names (the rows the outputs must hold).
fn rows_named(seqs: &[(usize, usize)]) -> usize {
    seqs.iter().map(|&(o, l)| o + l).max().unwrap_or(0)
}

/// The rows `0..n` when the sequences tile them in order with no gap, else `None`.
fn tiled_rows(seqs: &[(usize, usize)]) -> Option<usize> {
    let mut next = 0;
    for &(o, l) in seqs {
        if o != next {
            return None;
        }
        next += l;
    }
    Some(next)
}

/// [`attention_fwd`] into fresh `(out, stats)`, which it writes whole (no zeroing first) when
/// `seqs` tile the rows, as the engine's concatenated batches do.
pub fn attention_forward(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (h, hd) = (lay.heads, lay.head_dim);
    let Some(n) = tiled_rows(seqs) else {
        let rows = rows_named(seqs);
        let (mut out, mut stats) = (vec![0f32; rows * h * hd], vec![0f32; rows * 2 * h]);
        attention_fwd(qkv, lay, seqs, window, scale, &mut out, &mut stats);
        return (out, stats);
    };
    assert!(qkv.len() >= n * lay.stride);
    let mut out = Vec::new();
    // SAFETY: every (row, head) of both outputs belongs to one task, which writes it: the
    // sequences tile rows 0..n and every head of every row is visited.
    let stats = unsafe {
        written(n * 2 * h, |st| {
            out = written(n * h * hd, |o| {
                attention_fwd_raw(qkv, lay, seqs, window, scale, SyncPtr(o), SyncPtr(st))
            })
        })
    };
    (out, stats)
}

/// # Safety
/// `outp` must cover rows × heads·head_dim and `statp` rows × 2·heads floats, for every row
/// of `seqs`, and `qkv` every row × stride.
unsafe fn attention_fwd_raw(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    outp: SyncPtr,
    statp: SyncPtr,
) {
    let (h, hd) = (lay.heads, lay.head_dim);
    let group = h / lay.kv_heads;
    let (od, sd) = (h * hd, 2 * h);
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .flat_map(|&(o, l)| (0..h).map(move |hh| (o, l, hh)))
        .collect();
    tasks.par_iter().for_each(|&(o, l, hh)| {
        let g = hh / group;
        let q = View::rows(
            &qkv[(o * lay.stride + lay.q.0 + hh * lay.q.1)..],
            lay.stride,
        );
        let kcol = o * lay.stride + lay.k.0 + g * lay.k.1;
        let vcol = o * lay.stride + lay.v.0 + g * lay.v.1;
        let mut s = vec![0f32; TILE * l];
        for r0 in (0..l).step_by(TILE) {
            let r1 = (r0 + TILE).min(l);
            let ks = key_start(r0, window);
            let (m, n) = (r1 - r0, r1 - ks);
            // SAFETY: q/k/v views lie inside `qkv`; `s` holds m×n.
            unsafe {
                gemm(
                    m,
                    n,
                    hd,
                    s.as_mut_ptr(),
                    n,
                    View {
                        ptr: q.ptr.add(r0 * lay.stride),
                        ..q
                    },
                    View::t(&qkv[kcol + ks * lay.stride..], lay.stride),
                    false,
                    scale,
                    false,
                );
            }
            for i in r0..r1 {
                let row = &mut s[(i - r0) * n..(i - r0 + 1) * n];
                let lo = key_start(i, window) - ks;
                let hi = i + 1 - ks;
                let (mx, sum) = softmax_in_place(&mut row[lo..hi]);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                // SAFETY: row (o + i), head hh of `stats` belongs to this task only.
                unsafe {
                    let st = statp.get().add((o + i) * sd + 2 * hh);
                    *st = mx;
                    *st.add(1) = sum;
                }
            }
            // SAFETY: rows r0..r1 of head hh in `out` belong to this task only.
            unsafe {
                gemm(
                    m,
                    hd,
                    n,
                    outp.get().add((o + r0) * od + hh * hd),
                    od,
                    View::rows(&s, n),
                    View::rows(&qkv[vcol + ks * lay.stride..], lay.stride),
                    false,
                    1.0,
                    false,
                );
            }
        }
    });
}

/// Backward of [`attention_fwd`]: from `dout` (rows × heads·head_dim) writes dq, dk, dv into
/// the q/k/v columns of `dqkv` (other columns untouched). Per tile the probabilities P are
/// recomputed; dP = dO vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP)) · scale, dq = dS k, dk += dSᵀ q,
/// dv += Pᵀ dO. Tasks are (sequence, kv head) so that a group's query heads accumulate into
/// their shared dk, dv without races.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    stats: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let rows = rows_named(seqs);
    assert!(dqkv.len() >= rows * lay.stride && qkv.len() >= rows * lay.stride);
    // SAFETY: `dqkv` covers every row a sequence names (checked above).
    unsafe {
        attention_bwd_raw(
            qkv,
            lay,
            seqs,
            window,
            scale,
            stats,
            dout,
            SyncPtr(dqkv.as_mut_ptr()),
        )
    }
}

impl QkvLayout {
    /// Does every column of a row belong to exactly one q, k or v head?
    fn covers_every_column(&self) -> bool {
        let mut seen = vec![0u8; self.stride];
        let mut mark = |start: usize, step: usize, count: usize| {
            for i in 0..count {
                for c in start + i * step..start + i * step + self.head_dim {
                    match seen.get_mut(c) {
                        Some(v) => *v += 1,
                        None => return false,
                    }
                }
            }
            true
        };
        mark(self.q.0, self.q.1, self.heads)
            && mark(self.k.0, self.k.1, self.kv_heads)
            && mark(self.v.0, self.v.1, self.kv_heads)
            && seen.iter().all(|&v| v == 1)
    }
}

/// [`attention_bwd`] into a fresh `dqkv`, written whole (no zeroing first) when `seqs` tile the
/// rows and the q, k and v heads cover every column, as in every architecture here.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    stats: &[f32],
    dout: &[f32],
) -> Vec<f32> {
    match tiled_rows(seqs) {
        Some(n) if lay.covers_every_column() => {
            assert!(qkv.len() >= n * lay.stride);
            // SAFETY: each task zeroes, then accumulates into, the k and v columns of its kv
            // head and writes the q columns of its query heads, for all rows of its sequence;
            // the heads cover every column and the sequences every row.
            unsafe {
                written(n * lay.stride, |dp| {
                    attention_bwd_raw(qkv, lay, seqs, window, scale, stats, dout, SyncPtr(dp))
                })
            }
        }
        _ => {
            let rows = rows_named(seqs);
            let mut dqkv = vec![0f32; rows * lay.stride];
            attention_bwd(qkv, lay, seqs, window, scale, stats, dout, &mut dqkv);
            dqkv
        }
    }
}

/// # Safety
/// `dp` must cover every row of `seqs` × `lay.stride` floats, as must `qkv`.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_bwd_raw(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    stats: &[f32],
    dout: &[f32],
    dp: SyncPtr,
) {
    let (h, hd, st) = (lay.heads, lay.head_dim, lay.stride);
    let group = h / lay.kv_heads;
    let (od, sd) = (h * hd, 2 * h);
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .flat_map(|&(o, l)| (0..lay.kv_heads).map(move |g| (o, l, g)))
        .collect();
    tasks.par_iter().for_each(|&(o, l, g)| {
        let kcol = o * st + lay.k.0 + g * lay.k.1;
        let vcol = o * st + lay.v.0 + g * lay.v.1;
        // SAFETY (for every write below): the k/v columns of kv head g and the q columns of
        // its query heads, rows o..o+l, belong to this task only.
        unsafe {
            for i in 0..l {
                for c in [kcol, vcol] {
                    std::ptr::write_bytes(dp.get().add(c + i * st), 0, hd);
                }
            }
        }
        let mut p = vec![0f32; TILE * l];
        let mut ds = vec![0f32; TILE * l];
        for hh in g * group..(g + 1) * group {
            let qcol = o * st + lay.q.0 + hh * lay.q.1;
            for r0 in (0..l).step_by(TILE) {
                let r1 = (r0 + TILE).min(l);
                let ks = key_start(r0, window);
                let (m, n) = (r1 - r0, r1 - ks);
                let q_t = View::rows(&qkv[qcol + r0 * st..], st);
                let k_t = View::rows(&qkv[kcol + ks * st..], st);
                let v_t = View::rows(&qkv[vcol + ks * st..], st);
                let do_t = View::rows(&dout[(o + r0) * od + hh * hd..], od);
                unsafe {
                    gemm(
                        m,
                        n,
                        hd,
                        p.as_mut_ptr(),
                        n,
                        q_t,
                        View {
                            rs: 1,
                            cs: st,
                            ..k_t
                        },
                        false,
                        scale,
                        false,
                    );
                    gemm(
                        m,
                        n,
                        hd,
                        ds.as_mut_ptr(),
                        n,
                        do_t,
                        View {
                            rs: 1,
                            cs: st,
                            ..v_t
                        },
                        false,
                        1.0,
                        false,
                    );
                }
                for i in r0..r1 {
                    let pr = &mut p[(i - r0) * n..(i - r0 + 1) * n];
                    let dr = &mut ds[(i - r0) * n..(i - r0 + 1) * n];
                    let lo = key_start(i, window) - ks;
                    let hi = i + 1 - ks;
                    let s = &stats[(o + i) * sd + 2 * hh..];
                    let (mx, sum) = (s[0], s[1]);
                    softmax_grad_row(&mut pr[lo..hi], &mut dr[lo..hi], mx, sum, scale);
                    pr[..lo].fill(0.0);
                    pr[hi..].fill(0.0);
                    dr[..lo].fill(0.0);
                    dr[hi..].fill(0.0);
                }
                unsafe {
                    // dq (rows r0..r1) = dS k
                    gemm(
                        m,
                        hd,
                        n,
                        dp.get().add(qcol + r0 * st),
                        st,
                        View::rows(&ds, n),
                        k_t,
                        false,
                        1.0,
                        false,
                    );
                    // dk (keys ks..r1) += dSᵀ q
                    gemm(
                        n,
                        hd,
                        m,
                        dp.get().add(kcol + ks * st),
                        st,
                        View::t(&ds, n),
                        q_t,
                        true,
                        1.0,
                        false,
                    );
                    // dv (keys ks..r1) += Pᵀ dO
                    gemm(
                        n,
                        hd,
                        m,
                        dp.get().add(vcol + ks * st),
                        st,
                        View::t(&p, n),
                        do_t,
                        true,
                        1.0,
                        false,
                    );
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_derivatives_match_finite_differences() {
        for act in [Act::GeluTanh, Act::GeluErf, Act::Silu, Act::Relu] {
            for &x in &[-3.1f32, -0.7, 0.3, 1.9] {
                let h = 1e-3f64;
                let f = |v: f64| act.f(v as f32) as f64;
                let fd = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
                assert!(
                    (fd - act.df(x) as f64).abs() < 2e-3,
                    "{act:?} at {x}: {fd} vs {}",
                    act.df(x)
                );
            }
        }
    }

    #[test]
    fn max_lanes_is_the_running_maximum_at_every_length_and_position() {
        let fold = |x: &[f32]| x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for len in [0usize, 1, 7, 15, 16, 17, 33, 8192] {
            let base: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 * -0.25).collect();
            assert_eq!(
                max_lanes(&base).to_bits(),
                fold(&base).to_bits(),
                "len {len}"
            );
            // The maximum in each lane and in the remainder, and NaNs, which both skip.
            for at in [0, len / 2, len.saturating_sub(1)]
                .into_iter()
                .filter(|&a| a < len)
            {
                let mut x = base.clone();
                x[at] = 3.5;
                assert_eq!(max_lanes(&x), 3.5, "len {len}, max at {at}");
                x[at] = f32::NAN;
                assert_eq!(
                    max_lanes(&x).to_bits(),
                    fold(&x).to_bits(),
                    "len {len}, NaN at {at}"
                );
            }
        }
        assert_eq!(max_lanes(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn exp_is_within_its_error_bound_and_the_same_vectorised() {
        let xs: Vec<f32> = (0..200_000).map(|i| -87.3 + i as f32 * 0.000_88).collect();
        let mut worst = 0f64;
        for &x in &xs {
            let (e, r) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((e - r) / r).abs());
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!((exp(-100.0), exp(-87.34)), (0.0, 0.0));
        assert!(exp(-87.33).is_normal() && exp(88.7).is_finite() && exp(1000.0).is_finite());
        // The AVX2 build of a loop gives the scalar build's bits.
        multiversion! {
            fn exp_all(x: &mut [f32]) {
                x.iter_mut().for_each(|x| *x = exp(*x));
            }
        }
        let mut wide = xs.clone();
        exp_all(&mut wide);
        for (&x, &w) in xs.iter().zip(&wide) {
            assert_eq!(
                std::hint::black_box(exp)(x).to_bits(),
                w.to_bits(),
                "at {x}"
            );
        }
    }

    #[test]
    fn gemm_views_compute_transposed_products() {
        // A = [[1, 2], [3, 4]], B = [[5, 6], [7, 8]]: A Bᵀ = [[17, 23], [39, 53]].
        let (a, b) = ([1f32, 2., 3., 4.], [5f32, 6., 7., 8.]);
        let mut c = [0f32; 4];
        matmul_wt(&a, &b, 2, 2, &mut c, false);
        assert_eq!(c, [17., 23., 39., 53.]);
        // dy·W with W = B: [[19, 22], [43, 50]], accumulated onto the previous result.
        matmul_w(&a, &b, 2, 2, &mut c, true);
        assert_eq!(c, [36., 45., 82., 103.]);
    }

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
