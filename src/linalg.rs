//! Small dense helpers over faer shared by the curvature and influence stages.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// Parallelism for faer products: all cores (rayon's global pool).
pub fn par() -> Par {
    Par::rayon(0)
}

/// Row-major `n × d` slice as a matrix view (no copy).
pub fn rows(data: &[f32], n: usize, d: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(data, n, d)
}

/// `[a, 1]` for a layer with a bias (the homogeneous coordinate goes last), else `a`.
pub fn homogeneous(a: &[f32], n: usize, d_in: usize, has_bias: bool) -> Mat<f32> {
    let width = d_in + usize::from(has_bias);
    Mat::from_fn(
        n,
        width,
        |i, j| if j < d_in { a[i * d_in + j] } else { 1.0 },
    )
}

/// `dst ← lhs · rhs` (or `dst += lhs · rhs` with `accumulate`).
pub fn mul_into(
    dst: MatMut<'_, f32>,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    accumulate: bool,
) {
    let beta = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    matmul(dst, beta, lhs, rhs, 1.0f32, par());
}

pub fn mul(lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(lhs.nrows(), rhs.ncols());
    mul_into(out.as_mut(), lhs, rhs, false);
    out
}

/// The lower triangle (diagonal included) of `xᵀ x`, computed in f32 and added into an f64
/// accumulator whose upper triangle is left untouched; [`mirror_lower`] completes the sum. A
/// symmetric rank-k update: column block by column block, one general product computes the
/// block's part of the lower triangle, about half the work of `xᵀ x` at full GEMM speed.
pub fn add_gram(acc: &mut Mat<f64>, x: MatRef<'_, f32>) {
    let d = x.ncols();
    // Narrow blocks save more work; wide ones keep the products efficient.
    let block = 128.max(d.div_ceil(16));
    let mut part = Mat::<f32>::zeros(d, block.min(d));
    for jb in (0..d).step_by(block) {
        let w = block.min(d - jb);
        let mut dst = part.as_mut().submatrix_mut(0, 0, d - jb, w);
        matmul(
            dst.as_mut(),
            Accum::Replace,
            x.subcols(jb, d - jb).transpose(),
            x.subcols(jb, w),
            1.0,
            par(),
        );
        for c in 0..w {
            let src = dst
                .as_ref()
                .col(c)
                .try_as_col_major()
                .expect("owned column");
            let out = acc
                .as_mut()
                .col_mut(jb + c)
                .try_as_col_major_mut()
                .expect("owned column")
                .as_slice_mut();
            for (o, v) in out[jb + c..].iter_mut().zip(&src.as_slice()[c..d - jb]) {
                *o += *v as f64;
            }
        }
    }
}

/// Copies the lower triangle onto the upper one (completes sums built by [`add_gram`]).
pub fn mirror_lower(m: &mut Mat<f64>) {
    for j in 0..m.ncols() {
        for i in j + 1..m.nrows() {
            m[(j, i)] = m[(i, j)];
        }
    }
}

/// Times [`add_gram`] against [`add_gram_general`] on `T × d` inputs (best of 3 each), for
/// `infl bench`: rows of (T, d, general seconds, symmetric seconds).
pub fn gram_benchmark(shapes: &[(usize, usize)]) -> Vec<(usize, usize, f64, f64)> {
    let best = |f: &mut dyn FnMut()| {
        (0..3)
            .map(|_| {
                let t0 = std::time::Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    shapes
        .iter()
        .map(|&(t, d)| {
            let x = Mat::from_fn(t, d, |i, j| ((i * 31 + j * 17) % 97) as f32 / 97.0);
            let mut acc = Mat::<f64>::zeros(d, d);
            let general = best(&mut || add_gram_general(&mut acc, x.as_ref()));
            let symmetric = best(&mut || add_gram(&mut acc, x.as_ref()));
            (t, d, general, symmetric)
        })
        .collect()
}

/// The general-product `xᵀ x` that [`add_gram`] replaces, for its test and benchmark.
pub fn add_gram_general(acc: &mut Mat<f64>, x: MatRef<'_, f32>) {
    let gram = mul(x.transpose(), x);
    for j in 0..gram.ncols() {
        for i in 0..gram.nrows() {
            acc[(i, j)] += gram[(i, j)] as f64;
        }
    }
}

/// Symmetric eigendecomposition in f64: eigenvalues ascending and eigenvectors as columns.
pub fn eigh(m: &Mat<f64>) -> Result<(Vec<f64>, Mat<f64>), String> {
    let sym = Mat::from_fn(m.nrows(), m.ncols(), |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
    let evd = sym
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| format!("eigendecomposition did not converge: {e:?}"))?;
    let values = (0..m.nrows()).map(|i| evd.S()[i]).collect();
    Ok((values, evd.U().to_owned()))
}

pub fn to_f32(m: &Mat<f64>) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}

pub fn to_f64(m: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

/// Row-major copy of a matrix (the layout of our safetensors files).
pub fn to_row_major<T: Copy>(m: MatRef<'_, T>) -> Vec<T> {
    let mut v = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v.push(m[(i, j)]);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigh_reconstructs_the_matrix() {
        let m = Mat::from_fn(4, 4, |i, j| {
            1.0 / (1.0 + i as f64 + j as f64) + if i == j { 1.0 } else { 0.0 }
        });
        let (vals, q) = eigh(&m).unwrap();
        assert!(vals.windows(2).all(|w| w[0] <= w[1]));
        for i in 0..4 {
            for j in 0..4 {
                let r: f64 = (0..4).map(|k| q[(i, k)] * vals[k] * q[(j, k)]).sum();
                assert!((r - m[(i, j)]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gram_is_the_exact_symmetric_product() {
        let x = Mat::from_fn(37, 9, |i, j| ((i * 7 + j * 3) % 11) as f32 * 0.25 - 1.0);
        let mut acc = Mat::<f64>::zeros(9, 9);
        add_gram(&mut acc, x.as_ref());
        add_gram(&mut acc, x.as_ref());
        assert_eq!(
            acc[(0, 8)],
            0.0,
            "the upper triangle is left to mirror_lower"
        );
        mirror_lower(&mut acc);
        for i in 0..9 {
            for j in 0..9 {
                let exact: f64 = (0..37)
                    .map(|t| 2.0 * x[(t, i)] as f64 * x[(t, j)] as f64)
                    .sum();
                // Quarter-integer inputs: every product and partial sum is exact in f32.
                assert_eq!(acc[(i, j)], exact);
                assert_eq!(acc[(i, j)], acc[(j, i)]);
            }
        }
    }

    #[test]
    fn homogeneous_appends_ones_last() {
        let h = homogeneous(&[1.0, 2.0, 3.0, 4.0], 2, 2, true);
        assert_eq!(to_row_major(h.as_ref()), vec![1.0, 2.0, 1.0, 3.0, 4.0, 1.0]);
    }
}

/// Columns of length `d`, one after another: the training side of a dot-product block.
#[derive(Clone, Copy)]
pub enum Columns<'a> {
    /// bfloat16 bit patterns (the upper half of an f32), widened on the fly.
    Bf16(&'a [u16]),
    F32(&'a [f32]),
}

impl Columns<'_> {
    fn len(&self) -> usize {
        match self {
            Columns::Bf16(b) => b.len(),
            Columns::F32(b) => b.len(),
        }
    }
}

/// Elements of `d` per tile: a tile of 16 query columns (128 KiB) stays in L2 while every
/// training column of the batch streams past it.
const DOT_TILE: usize = 2048;

/// `out[s·nq + q] = Σ_i a[q·d + i] · b_s[i]` for the `nq` query columns of `a` against every
/// column of `b` (each of length `d`), accumulated in f64 tile by tile.
///
/// This is the product the gradient store scores with: few queries, a batch of training
/// columns, and a reduction over millions of parameters. A general GEMM spends as long packing
/// such skinny operands as multiplying them; here both sides are read in place (both are
/// contiguous along the reduction), bf16 is widened in registers, and the query tile is reused
/// from cache across the batch.
pub fn dots_into(out: &mut [f64], a: &[f32], nq: usize, b: Columns<'_>, d: usize) {
    assert_eq!(a.len(), nq * d, "query block is nq × d");
    let ns = b.len().checked_div(d).unwrap_or(0);
    assert_eq!(
        b.len(),
        ns * d,
        "training block is whole columns of length d"
    );
    assert_eq!(out.len(), ns * nq, "output is ns × nq");
    // Columns split over the threads, in whole micro-kernel blocks of 3.
    let threads = rayon::current_num_threads().max(1);
    let per = ns.div_ceil(threads).div_ceil(3) * 3;
    if threads > 1 && ns >= 6 && nq > 0 {
        use rayon::prelude::*;
        out.par_chunks_mut(per * nq)
            .enumerate()
            .for_each(|(i, chunk)| {
                let cols = chunk.len() / nq;
                let part = match b {
                    Columns::Bf16(b) => Columns::Bf16(&b[i * per * d..(i * per + cols) * d]),
                    Columns::F32(b) => Columns::F32(&b[i * per * d..(i * per + cols) * d]),
                };
                dots_serial(chunk, a, nq, part, d, cols);
            });
    } else {
        dots_serial(out, a, nq, b, d, ns);
    }
}

fn dots_serial(out: &mut [f64], a: &[f32], nq: usize, b: Columns<'_>, d: usize, ns: usize) {
    out.iter_mut().for_each(|x| *x = 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { dots_avx2(out, a, nq, b, d, ns) };
            return;
        }
    }
    dots_portable(out, a, nq, b, d, ns);
}

fn dots_portable(out: &mut [f64], a: &[f32], nq: usize, b: Columns<'_>, d: usize, ns: usize) {
    for t0 in (0..d).step_by(DOT_TILE) {
        let t1 = (t0 + DOT_TILE).min(d);
        for s in 0..ns {
            for q in 0..nq {
                let aq = &a[q * d + t0..q * d + t1];
                let sum: f32 = match b {
                    Columns::F32(b) => aq
                        .iter()
                        .zip(&b[s * d + t0..s * d + t1])
                        .map(|(x, y)| x * y)
                        .sum(),
                    Columns::Bf16(b) => aq
                        .iter()
                        .zip(&b[s * d + t0..s * d + t1])
                        .map(|(x, &y)| x * f32::from_bits((y as u32) << 16))
                        .sum(),
                };
                out[s * nq + q] += sum as f64;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(out: &mut [f64], a: &[f32], nq: usize, b: Columns<'_>, d: usize, ns: usize) {
    for t0 in (0..d).step_by(DOT_TILE) {
        let len = DOT_TILE.min(d - t0);
        for s0 in (0..ns).step_by(3) {
            let sn = 3.min(ns - s0);
            for q0 in (0..nq).step_by(4) {
                let qn = 4.min(nq - q0);
                let mut sums = [[0f32; 3]; 4];
                macro_rules! block {
                    ($q:literal, $s:literal) => {
                        micro_avx2::<$q, $s>(a, q0, b, s0, d, t0, len, &mut sums)
                    };
                }
                match (qn, sn) {
                    (4, 3) => block!(4, 3),
                    (4, 2) => block!(4, 2),
                    (4, 1) => block!(4, 1),
                    (3, 3) => block!(3, 3),
                    (3, 2) => block!(3, 2),
                    (3, 1) => block!(3, 1),
                    (2, 3) => block!(2, 3),
                    (2, 2) => block!(2, 2),
                    (2, 1) => block!(2, 1),
                    (1, 3) => block!(1, 3),
                    (1, 2) => block!(1, 2),
                    _ => block!(1, 1),
                }
                for (i, row) in sums.iter().enumerate().take(qn) {
                    for (j, &v) in row.iter().enumerate().take(sn) {
                        out[(s0 + j) * nq + q0 + i] += v as f64;
                    }
                }
            }
        }
    }
}

/// `QN × SN` dot products over `len` elements from `t0`: QN·SN accumulators of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx2<const QN: usize, const SN: usize>(
    a: &[f32],
    q0: usize,
    b: Columns<'_>,
    s0: usize,
    d: usize,
    t0: usize,
    len: usize,
    sums: &mut [[f32; 3]; 4],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); SN]; QN];
    let a_ptr: [*const f32; QN] = std::array::from_fn(|i| a.as_ptr().add((q0 + i) * d + t0));
    let body = len / 8 * 8;
    let mut i = 0;
    while i < body {
        let bv: [__m256; SN] = std::array::from_fn(|j| {
            let at = (s0 + j) * d + t0 + i;
            match b {
                Columns::F32(b) => _mm256_loadu_ps(b.as_ptr().add(at)),
                Columns::Bf16(b) => {
                    let h = _mm_loadu_si128(b.as_ptr().add(at) as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
            }
        });
        for (q, row) in acc.iter_mut().enumerate() {
            let av = _mm256_loadu_ps(a_ptr[q].add(i));
            for (j, cell) in row.iter_mut().enumerate() {
                *cell = _mm256_fmadd_ps(av, bv[j], *cell);
            }
        }
        i += 8;
    }
    for (q, row) in acc.iter().enumerate() {
        for (j, cell) in row.iter().enumerate() {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *cell);
            let mut sum: f32 = lanes.iter().sum();
            for k in body..len {
                let at = (s0 + j) * d + t0 + k;
                let y = match b {
                    Columns::F32(b) => b[at],
                    Columns::Bf16(b) => f32::from_bits((b[at] as u32) << 16),
                };
                sum += *a_ptr[q].add(k) * y;
            }
            sums[q][j] = sum;
        }
    }
}

#[cfg(test)]
mod dots_tests {
    use super::*;

    fn reference(a: &[f32], nq: usize, b: &[f32], d: usize) -> Vec<f64> {
        let ns = b.len() / d;
        let mut out = vec![0.0; ns * nq];
        for s in 0..ns {
            for q in 0..nq {
                out[s * nq + q] = (0..d)
                    .map(|i| a[q * d + i] as f64 * b[s * d + i] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn dot_blocks_equal_an_f64_reference_for_every_edge_shape() {
        // Lengths around the 8-lane body, the tile, and block counts that leave edges.
        for (nq, ns, d) in [
            (16, 32, 5000),
            (5, 7, 13),
            (1, 1, 1),
            (4, 3, 2048),
            (3, 5, 2049),
            (17, 4, 4103),
        ] {
            let a: Vec<f32> = (0..nq * d)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..ns * d)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0)
                .collect();
            let want = reference(&a, nq, &b, d);
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            let mut got = vec![0.0; ns * nq];
            dots_into(&mut got, &a, nq, Columns::F32(&b), d);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-5 * scale,
                    "f32 {nq}×{ns}×{d}: {g} vs {w}"
                );
            }
            let mut portable = vec![0.0; ns * nq];
            dots_portable(&mut portable, &a, nq, Columns::F32(&b), d, ns);
            for (g, w) in portable.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5 * scale, "portable {nq}×{ns}×{d}");
            }
            // bf16: the reference uses the same rounded training values.
            let bits: Vec<u16> = b.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
            let widened: Vec<f32> = bits
                .iter()
                .map(|&h| f32::from_bits((h as u32) << 16))
                .collect();
            let want = reference(&a, nq, &widened, d);
            dots_into(&mut got, &a, nq, Columns::Bf16(&bits), d);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-5 * scale,
                    "bf16 {nq}×{ns}×{d}: {g} vs {w}"
                );
            }
        }
    }
}
