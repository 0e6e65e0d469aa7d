//! Symmetric eigendecomposition in f64 (the curvature factors' eigenbases).

use faer::Mat;

/// Symmetric eigendecomposition in f64: eigenvalues ascending and eigenvectors as columns.
pub fn eigh(m: &Mat<f64>) -> Result<(Vec<f64>, Mat<f64>), String> {
    let sym = Mat::from_fn(m.nrows(), m.ncols(), |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
    let evd = sym
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| format!("eigendecomposition did not converge: {e:?}"))?;
    let values = (0..m.nrows()).map(|i| evd.S()[i]).collect();
    Ok((values, evd.U().to_owned()))
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
}
