//! Matrix layouts: row-major views of the taps, the homogeneous `[a, 1]` taps, and the copies
//! between f64 and f32 and between faer's column-major matrices and our row-major files.

use faer::{Mat, MatRef};

/// Row-major `n × d` slice as a matrix view (no copy).
pub fn rows(data: &[f32], n: usize, d: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(data, n, d)
}

/// `[a, 1]` for a layer with a bias (the homogeneous coordinate goes last), else `a` itself,
/// as a row-major `n × width` matrix: the taps' own layout, so building it is a row copy (a
/// column-major copy would be a strided transpose, measured at 7% of a fit).
pub struct Homogeneous<'a> {
    data: std::borrow::Cow<'a, [f32]>,
    n: usize,
    width: usize,
}

impl Homogeneous<'_> {
    pub fn as_ref(&self) -> MatRef<'_, f32> {
        rows(&self.data, self.n, self.width)
    }
}

pub fn homogeneous(a: &[f32], n: usize, d_in: usize, has_bias: bool) -> Homogeneous<'_> {
    use rayon::prelude::*;
    if !has_bias {
        return Homogeneous {
            data: std::borrow::Cow::Borrowed(&a[..n * d_in]),
            n,
            width: d_in,
        };
    }
    let width = d_in + 1;
    assert!(a.len() >= n * d_in, "taps hold n rows");
    // Written whole, so not zeroed first.
    let mut data = Vec::with_capacity(n * width);
    data.spare_capacity_mut()[..n * width]
        .par_chunks_mut(width * 64)
        .zip(a[..n * d_in].par_chunks(d_in * 64))
        .for_each(|(dst, src)| {
            for (row, x) in dst.chunks_mut(width).zip(src.chunks(d_in)) {
                for (d, &v) in row[..d_in].iter_mut().zip(x) {
                    d.write(v);
                }
                row[d_in].write(1.0);
            }
        });
    // SAFETY: every one of the n rows of `width` elements was written above.
    unsafe { data.set_len(n * width) };
    Homogeneous {
        data: std::borrow::Cow::Owned(data),
        n,
        width,
    }
}

pub fn to_f32(m: &Mat<f64>) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}

pub fn to_f64(m: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

/// The row-major `r × c` values `v` (our safetensors layout) as an f32 matrix, transposed tile
/// by tile: filled a column at a time, each element read from a different cache line (a tenth of
/// re-scoring from a store was loading the factors that way).
pub fn f32_from_row_major(v: &[f64], r: usize, c: usize) -> Mat<f32> {
    const TILE: usize = 64;
    assert_eq!(v.len(), r * c, "r × c values");
    let mut m = Mat::<f32>::zeros(r, c);
    for i0 in (0..r).step_by(TILE) {
        let i1 = (i0 + TILE).min(r);
        for j in 0..c {
            let col = m
                .col_mut(j)
                .try_as_col_major_mut()
                .expect("owned column is contiguous")
                .as_slice_mut();
            for (i, x) in col[i0..i1].iter_mut().enumerate() {
                *x = v[(i0 + i) * c + j] as f32;
            }
        }
    }
    m
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
    fn homogeneous_appends_ones_last() {
        let h = homogeneous(&[1.0, 2.0, 3.0, 4.0], 2, 2, true);
        assert_eq!(to_row_major(h.as_ref()), vec![1.0, 2.0, 1.0, 3.0, 4.0, 1.0]);
    }

    #[test]
    fn row_major_values_read_back_in_tiles_round_trip() {
        // Shapes around the 64-row tile, and one narrower than it.
        for (r, c) in [(1, 1), (3, 200), (64, 65), (130, 7), (257, 129)] {
            let v: Vec<f64> = (0..r * c).map(|k| k as f64 * 0.5 - 3.0).collect();
            let m = f32_from_row_major(&v, r, c);
            let want: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            assert_eq!(to_row_major(m.as_ref()), want, "{r} × {c}");
        }
    }
}
