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

/// `xᵀ x` in f32, added into an f64 accumulator (symmetric; both triangles filled).
pub fn add_gram(acc: &mut Mat<f64>, x: MatRef<'_, f32>) {
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
    fn homogeneous_appends_ones_last() {
        let h = homogeneous(&[1.0, 2.0, 3.0, 4.0], 2, 2, true);
        assert_eq!(to_row_major(h.as_ref()), vec![1.0, 2.0, 1.0, 3.0, 4.0, 1.0]);
    }
}
