//! Matrix products: [`View`], a strided matrix, [`gemm`], the one unsafe call into the `gemm`
//! crate, and the `nn.Linear` products `x Wᵀ` ([`matmul_wt`], [`matmul_wt_new`]) and `dy W`
//! ([`matmul_w`], [`matmul_w_new`]) on row-major weights stored `[d_out, d_in]`.

use super::{rows_per_task, written, SyncPtr};
use rayon::prelude::*;

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
        ::gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        ::gemm::Parallelism::None
    };
    ::gemm::gemm(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
