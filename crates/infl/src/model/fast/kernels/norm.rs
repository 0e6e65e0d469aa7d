//! Layer norm and RMS norm, forward and backward, fused per row: one pass computes the
//! statistics, the normalised values kept for the backward, and the output.

use super::lanes::multiversion;
use super::rows_per_task;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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
