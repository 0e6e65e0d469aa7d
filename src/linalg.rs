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
