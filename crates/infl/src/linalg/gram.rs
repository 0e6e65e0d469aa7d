//! Symmetric Grams `xᵀ x` of a layer's taps, added into packed f64 triangles ([`Lower`]):
//! the covariance pass's A and S. Only the lower triangle is formed ([`add_gram`]).

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::gemm::{gemm, mul};
use super::layout::rows;
use super::lower::Lower;
use faer::{Mat, MatRef};

/// The lower triangle (diagonal included) of `xᵀ x`, computed in f32 and added into the
/// leading `d × d` triangle of the f64 accumulator `acc` (`d` = `x`'s columns). A
/// symmetric rank-k update done as a recursion on the triangle ([`add_lower`]): split in two,
/// the block below the diagonal is one general product and each diagonal half recurses, down
/// to leaves of [`GRAM_LEAF`]. The products are large and few, and the work is 52–58% of a
/// general `xᵀ x` at the passes' widths (257–1,025); 128-wide column blocks, the previous
/// scheme, did 56–75% in more, narrower products. One thread, 2,048 tokens, AMD EPYC (Zen 5),
/// 2026-12-03, two runs: widths 256 / 257 / 768 / 1,024 / 1,025 took 0.77–0.81 / 0.95–0.96 /
/// 7.3–7.7 / 14.1–14.8 / 13.2–13.9 ms against 1.04–1.06 / 1.19–1.23 / 8.2–8.4 / 14.3–14.6 /
/// 15.1–15.6 ms with the column blocks (leaves of 128: 0.83–0.88 ms at width 256).
///
/// `parallel` splits each product over the cores; the passes instead run one Gram per task
/// (there are two per tracked layer), where a single-threaded product measured 1.5–2× the
/// throughput of a product split over two cores at these shapes (`k` = a batch's tokens,
/// outputs a few hundred wide). The blocks, and so the bits, are the same either way.
///
/// On x86-64 with AVX2 and no AVX-512, a row-major `x` (the passes' taps) takes [`avx2`]'s
/// kernel instead, which packs each block of tokens once for the whole triangle.
pub fn add_gram(acc: &mut Lower, x: MatRef<'_, f32>, parallel: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available()
        && x.nrows() > 0
        && x.col_stride() == 1
        && x.row_stride() >= x.ncols() as isize
    {
        let (n, d, ld) = (x.nrows(), x.ncols(), x.row_stride() as usize);
        // SAFETY: `x` is a live view of n rows, `ld` apart, of d contiguous elements each.
        let rows = unsafe { std::slice::from_raw_parts(x.as_ptr(), (n - 1) * ld + d) };
        avx2::add_gram_rows(acc, rows, (n, d, ld), parallel);
        return;
    }
    add_gram_recursive(acc, x, parallel);
}

/// [`add_gram`] as a recursion of `gemm` crate products, on any machine and layout (and the
/// baseline the AVX2 kernel is benchmarked against).
pub fn add_gram_recursive(acc: &mut Lower, x: MatRef<'_, f32>, parallel: bool) {
    let d = x.ncols();
    // Room for the largest product: the first split's block below the diagonal, or a leaf.
    let mut part = Mat::<f32>::zeros(d, gram_split(d).max(GRAM_LEAF / 2).min(d.max(1)));
    add_lower(acc, x, (0, d), &mut part, parallel);
}

/// [`add_gram`] of `[a, 1]` (with `bias`; else of `a`), without forming it: the Gram of the
/// `d` columns of `a`, then the ones column's row, `Σ_t a_t` (summed in f64), and corner, the
/// token count. An appended column made the width 257 for a 256-wide layer, and the recursion's
/// one-row and one-column remainders ran such a Gram at 55% of the GEMM rate against 86% for
/// width 256 (one thread, 2,048 tokens).
///
/// `a` holds the `n × d` row-major taps.
pub fn add_gram_homogeneous(
    acc: &mut Lower,
    a: &[f32],
    (n, d): (usize, usize),
    bias: bool,
    parallel: bool,
) {
    assert_eq!(acc.dim(), d + usize::from(bias), "acc is the Gram's width");
    add_gram(acc, rows(a, n, d), parallel);
    if bias {
        let mut sums = vec![0f64; d];
        for row in a[..n * d].chunks_exact(d.max(1)) {
            for (s, &x) in sums.iter_mut().zip(row) {
                *s += x as f64;
            }
        }
        // Row d of each column j sits d − j below that column's diagonal.
        for (j, s) in sums.into_iter().enumerate() {
            acc.col_mut(j)[d - j] += s;
        }
        acc.col_mut(d)[0] += n as f64;
    }
}

/// Diagonal blocks of at most this width end [`add_gram`]'s recursion; each is done as column
/// blocks of half its width, every one of them a product of the block's rows below it.
const GRAM_LEAF: usize = 64;

/// The lower triangle of the diagonal block `[off, off + size)²` of `xᵀ x`, added into `acc`,
/// with `part` as the products' f32 scratch.
fn add_lower(
    acc: &mut Lower,
    x: MatRef<'_, f32>,
    (off, size): (usize, usize),
    part: &mut Mat<f32>,
    parallel: bool,
) {
    // `xᵀ x` over rows `[r0, r0 + rows)` and columns `[c0, c0 + cols)`, added into the same
    // block of `acc` from row `r0 + skip(c)` of each column c on (the triangle's edge), which
    // is on or below the diagonal: packed column `c0 + c` starts at its diagonal.
    let mut product = |(r0, rows): (usize, usize), (c0, cols): (usize, usize), diagonal: bool| {
        let mut dst = part.as_mut().submatrix_mut(0, 0, rows, cols);
        gemm(
            dst.as_mut(),
            x.subcols(r0, rows).transpose(),
            x.subcols(c0, cols),
            false,
            parallel,
        );
        for c in 0..cols {
            let skip = if diagonal { c } else { 0 };
            let src = dst
                .as_ref()
                .col(c)
                .try_as_col_major()
                .expect("owned column");
            let top = r0 + skip - (c0 + c);
            let out = &mut acc.col_mut(c0 + c)[top..top + rows - skip];
            for (o, v) in out.iter_mut().zip(&src.as_slice()[skip..]) {
                *o += *v as f64;
            }
        }
    };
    if size <= GRAM_LEAF {
        let w0 = GRAM_LEAF / 2;
        for jb in (0..size).step_by(w0) {
            let w = w0.min(size - jb);
            product((off + jb, size - jb), (off + jb, w), true);
        }
        return;
    }
    let h = gram_split(size);
    product((off + h, size - h), (off, h), false);
    add_lower(acc, x, (off, h), part, parallel);
    add_lower(acc, x, (off + h, size - h), part, parallel);
}

/// Where [`add_lower`] splits a diagonal block of `size`: half, on a 16-element boundary (a
/// whole SIMD register of rows).
fn gram_split(size: usize) -> usize {
    (size / 2).div_ceil(16) * 16
}

/// The general-product `xᵀ x` that [`add_gram`] replaces, for its benchmark: the whole
/// product is formed, and its lower triangle added into `acc`.
pub fn add_gram_general(acc: &mut Lower, x: MatRef<'_, f32>) {
    let gram = mul(x.transpose(), x);
    for j in 0..gram.ncols() {
        for (k, o) in acc.col_mut(j).iter_mut().enumerate() {
            *o += gram[(j + k, j)] as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_is_the_exact_symmetric_product() {
        // One leaf (9), a leaf's column blocks (40), and recursions of several depths with
        // odd halves (65, 200, 257).
        for d in [9, 40, 65, 200, 257] {
            let x = Mat::from_fn(37, d, |i, j| ((i * 7 + j * 3) % 11) as f32 * 0.25 - 1.0);
            let mut acc = Lower::zeros(d);
            add_gram(&mut acc, x.as_ref(), false);
            add_gram(&mut acc, x.as_ref(), true);
            let full = acc.to_full_scaled(1.0);
            for i in 0..d {
                for j in 0..d {
                    let exact: f64 = (0..37)
                        .map(|t| 2.0 * x[(t, i)] as f64 * x[(t, j)] as f64)
                        .sum();
                    // Quarter-integer inputs: every product and partial sum is exact in f32.
                    assert_eq!(full[(i, j)], exact, "width {d}, ({i}, {j})");
                }
            }
            // The recursion on any layout forms the same sums as the row-major kernel.
            let mut recursive = Lower::zeros(d);
            add_gram_recursive(&mut recursive, x.as_ref(), false);
            add_gram_recursive(&mut recursive, x.as_ref(), false);
            assert_eq!(recursive, acc, "width {d}");
        }
    }

    #[test]
    fn homogeneous_gram_is_the_gram_of_the_taps_with_a_ones_column() {
        for (d, bias) in [(5, true), (64, true), (256, false), (256, true)] {
            let n = 29;
            let a: Vec<f32> = (0..n * d)
                .map(|k| ((k * 5 + k / d) % 13) as f32 * 0.25 - 1.5)
                .collect();
            let w = d + usize::from(bias);
            let start = |i: usize, j: usize| (i + 2 * j) as f64;
            let mut acc = Lower::zeros(w);
            for j in 0..w {
                for (k, v) in acc.col_mut(j).iter_mut().enumerate() {
                    *v = start(j + k, j);
                }
            }
            add_gram_homogeneous(&mut acc, &a, (n, d), bias, false);
            let full = acc.to_full_scaled(1.0);
            let x = |t: usize, j: usize| if j == d { 1.0 } else { a[t * d + j] as f64 };
            for i in 0..w {
                for j in 0..=i {
                    let exact: f64 = (0..n).map(|t| x(t, i) * x(t, j)).sum();
                    // Added onto the triangle's starting values, exactly (quarter integers).
                    assert_eq!(full[(i, j)], exact + start(i, j), "{d}: ({i}, {j})");
                    assert_eq!(full[(j, i)], full[(i, j)]);
                }
            }
        }
    }
}
