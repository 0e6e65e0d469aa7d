//! General products through the `gemm` crate: into a faer view ([`gemm`], [`mul_into`], [`mul`])
//! or into fresh row-major storage ([`RowMajor::product`]).

use super::layout::{rows, to_row_major};
use faer::{Mat, MatMut, MatRef};

/// `dst ← lhs · rhs` (or `dst += lhs · rhs` with `accumulate`).
pub fn mul_into(
    dst: MatMut<'_, f32>,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    accumulate: bool,
) {
    gemm(dst, lhs, rhs, accumulate, true);
}

/// `dst ← [dst +] lhs · rhs` through the `gemm` crate (the fast engine's GEMM): on the
/// rotations of the eigenvalue pass (2048 × 1024 × 1024) it ran 2× faster than faer's product
/// here, and it is never slower on the per-sequence shapes (k = a sequence's length) or on the
/// Gram blocks run one per thread ([`add_gram`]). Threaded over the output with `parallel`;
/// the sum over k runs in the same order either way.
pub fn gemm(
    dst: MatMut<'_, f32>,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n) = (dst.nrows(), dst.ncols());
    let (rs, cs) = (dst.row_stride(), dst.col_stride());
    // SAFETY: `dst` is a unique mutable view of m × n elements at these strides, so it aliases
    // neither input.
    unsafe {
        gemm_raw(
            dst.as_ptr_mut(),
            (m, n),
            (rs, cs),
            lhs,
            rhs,
            accumulate,
            parallel,
        )
    }
}

/// [`gemm`] into `m × n` elements at `dst` with (row, column) strides `strides`.
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads) of every element of the
/// `m × n` matrix at those strides, and alias neither input.
pub(super) unsafe fn gemm_raw(
    dst: *mut f32,
    (m, n): (usize, usize),
    (rs, cs): (isize, isize),
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    accumulate: bool,
    parallel: bool,
) {
    let k = lhs.ncols();
    assert!(
        lhs.nrows() == m && rhs.nrows() == k && rhs.ncols() == n,
        "gemm: shapes differ"
    );
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    // SAFETY: the input pointers and strides come from live faer views of the stated shapes;
    // the caller vouches for `dst`.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst,
            cs,
            rs,
            accumulate,
            lhs.as_ptr(),
            lhs.col_stride(),
            lhs.row_stride(),
            rhs.as_ptr(),
            rhs.col_stride(),
            rhs.row_stride(),
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// An owned row-major f32 matrix (the taps' layout: a sequence's rows are contiguous).
pub struct RowMajor {
    data: Vec<f32>,
    nrows: usize,
    ncols: usize,
}

impl RowMajor {
    pub fn as_ref(&self) -> MatRef<'_, f32> {
        rows(&self.data, self.nrows, self.ncols)
    }

    pub fn copy_of(m: MatRef<'_, f32>) -> RowMajor {
        RowMajor {
            data: to_row_major(m),
            nrows: m.nrows(),
            ncols: m.ncols(),
        }
    }

    /// `lhs · rhs`, written whole by the product (its storage is not zeroed first: zeroing
    /// the eigenvalue pass's rotated tokens moved 200 MB per batch of the kronfluence job).
    pub fn product(lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, parallel: bool) -> RowMajor {
        let (m, n) = (lhs.nrows(), rhs.ncols());
        let mut data = Vec::<f32>::with_capacity(m * n);
        // SAFETY: the product overwrites all m × n elements of the fresh, unaliased storage
        // (row stride n) before `set_len` exposes them.
        unsafe {
            gemm_raw(
                data.as_mut_ptr(),
                (m, n),
                (n as isize, 1),
                lhs,
                rhs,
                false,
                parallel,
            );
            data.set_len(m * n);
        }
        RowMajor {
            data,
            nrows: m,
            ncols: n,
        }
    }
}

pub fn mul(lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(lhs.nrows(), rhs.ncols());
    mul_into(out.as_mut(), lhs, rhs, false);
    out
}
