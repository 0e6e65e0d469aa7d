//! [`Lower`]: a symmetric matrix kept as its lower triangle, packed by columns, in f64. The
//! covariance pass's running sums `Σāāᵀ` and `Σggᵀ` are symmetric, and its Grams form only
//! the lower triangle ([`super::add_gram`]): packed, the sums take `d(d+1)/2` values instead of
//! `d²`, half the pass's state, with no loss of precision (still f64 sums of the f32 products).

use faer::Mat;

/// The lower triangle (`i ≥ j`) of a `d × d` symmetric matrix: column `j` holds rows `j..d`,
/// one column after the other.
#[derive(Debug, Clone, PartialEq)]
pub struct Lower {
    d: usize,
    data: Vec<f64>,
}

impl Lower {
    /// Values of a packed triangle of width `d`.
    pub fn packed_len(d: usize) -> usize {
        d * (d + 1) / 2
    }

    pub fn zeros(d: usize) -> Lower {
        Lower {
            d,
            data: vec![0.0; Self::packed_len(d)],
        }
    }

    /// A triangle from its packed values (as [`Lower::as_slice`] gives them); `None` when
    /// their number is not `packed_len(d)`.
    pub fn from_packed(d: usize, data: Vec<f64>) -> Option<Lower> {
        (data.len() == Self::packed_len(d)).then_some(Lower { d, data })
    }

    /// The width `d`.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// The packed values, column by column.
    pub fn as_slice(&self) -> &[f64] {
        &self.data
    }

    /// Where column `j` starts: the columns before it hold `d, d − 1, …, d − j + 1` values.
    fn start(&self, j: usize) -> usize {
        j * self.d - j * j.saturating_sub(1) / 2
    }

    /// Column `j` from the diagonal down: element `k` is row `j + k`.
    pub fn col(&self, j: usize) -> &[f64] {
        let s = self.start(j);
        &self.data[s..s + self.d - j]
    }

    /// [`Lower::col`], mutable.
    pub fn col_mut(&mut self, j: usize) -> &mut [f64] {
        let s = self.start(j);
        let d = self.d;
        &mut self.data[s..s + d - j]
    }

    /// Adds another triangle of the same width.
    ///
    /// # Panics
    /// If the widths differ.
    pub fn add(&mut self, other: &Lower) {
        assert_eq!(self.d, other.d, "triangles of one width");
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
    }

    /// The whole symmetric matrix, times `scale`.
    pub fn to_full_scaled(&self, scale: f64) -> Mat<f64> {
        let mut m = Mat::<f64>::zeros(self.d, self.d);
        for j in 0..self.d {
            for (k, &v) in self.col(j).iter().enumerate() {
                m[(j + k, j)] = v * scale;
                m[(j, j + k)] = v * scale;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_tile_the_packed_values_and_expand_to_the_symmetric_matrix() {
        for d in [0, 1, 2, 5, 17] {
            let mut l = Lower::zeros(d);
            assert_eq!(l.as_slice().len(), d * (d + 1) / 2);
            // Fill (i, j) with a value naming it; every packed slot is written exactly once.
            for j in 0..d {
                for (k, v) in l.col_mut(j).iter_mut().enumerate() {
                    assert_eq!(*v, 0.0, "({}, {j}) written twice", j + k);
                    *v = (100 * (j + k) + j) as f64 + 1.0;
                }
            }
            assert!(l.as_slice().iter().all(|&v| v != 0.0));
            let m = l.to_full_scaled(0.5);
            for i in 0..d {
                for j in 0..d {
                    let (r, c) = if i >= j { (i, j) } else { (j, i) };
                    assert_eq!(m[(i, j)], ((100 * r + c) as f64 + 1.0) * 0.5);
                }
            }
            let mut twice = l.clone();
            twice.add(&l);
            assert_eq!(twice.to_full_scaled(0.25), m);
            assert_eq!(Lower::from_packed(d, l.as_slice().to_vec()), Some(l));
            assert_eq!(Lower::from_packed(d, vec![0.0; d * d + 1]), None);
        }
    }
}
