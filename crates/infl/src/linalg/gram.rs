//! Symmetric Grams `xᵀ x` of a layer's taps, added into f64 accumulators: the covariance
//! pass's A and S. The lower triangle is built ([`add_gram`]) and [`mirror_lower`] completes it.

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::gemm::{gemm, mul};
use super::layout::rows;
use faer::{Mat, MatRef};

/// The lower triangle (diagonal included) of `xᵀ x`, computed in f32 and added into an f64
/// accumulator whose upper triangle is left untouched; [`mirror_lower`] completes the sum. A
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
pub fn add_gram(acc: &mut Mat<f64>, x: MatRef<'_, f32>, parallel: bool) {
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
pub fn add_gram_recursive(acc: &mut Mat<f64>, x: MatRef<'_, f32>, parallel: bool) {
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
    acc: &mut Mat<f64>,
    a: &[f32],
    (n, d): (usize, usize),
    bias: bool,
    parallel: bool,
) {
    assert_eq!(
        acc.nrows(),
        d + usize::from(bias),
        "acc is the Gram's width"
    );
    add_gram(acc, rows(a, n, d), parallel);
    if bias {
        let mut sums = vec![0f64; d];
        for row in a[..n * d].chunks_exact(d.max(1)) {
            for (s, &x) in sums.iter_mut().zip(row) {
                *s += x as f64;
            }
        }
        for (j, s) in sums.into_iter().enumerate() {
            acc[(d, j)] += s;
        }
        acc[(d, d)] += n as f64;
    }
}

/// Diagonal blocks of at most this width end [`add_gram`]'s recursion; each is done as column
/// blocks of half its width, every one of them a product of the block's rows below it.
const GRAM_LEAF: usize = 64;

/// The lower triangle of the diagonal block `[off, off + size)²` of `xᵀ x`, added into `acc`,
/// with `part` as the products' f32 scratch.
fn add_lower(
    acc: &mut Mat<f64>,
    x: MatRef<'_, f32>,
    (off, size): (usize, usize),
    part: &mut Mat<f32>,
    parallel: bool,
) {
    // `xᵀ x` over rows `[r0, r0 + rows)` and columns `[c0, c0 + cols)`, added into the same
    // block of `acc` from row `r0 + skip(c)` of each column c on (the triangle's edge).
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
            let out = acc
                .as_mut()
                .col_mut(c0 + c)
                .try_as_col_major_mut()
                .expect("owned column")
                .as_slice_mut();
            for (o, v) in out[r0 + skip..r0 + rows]
                .iter_mut()
                .zip(&src.as_slice()[skip..])
            {
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

/// Copies the lower triangle onto the upper one (completes sums built by [`add_gram`]).
pub fn mirror_lower(m: &mut Mat<f64>) {
    for j in 0..m.ncols() {
        for i in j + 1..m.nrows() {
            m[(j, i)] = m[(i, j)];
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_is_the_exact_symmetric_product() {
        // One leaf (9), a leaf's column blocks (40), and recursions of several depths with
        // odd halves (65, 200, 257).
        for d in [9, 40, 65, 200, 257] {
            let x = Mat::from_fn(37, d, |i, j| ((i * 7 + j * 3) % 11) as f32 * 0.25 - 1.0);
            let mut acc = Mat::<f64>::zeros(d, d);
            add_gram(&mut acc, x.as_ref(), false);
            add_gram(&mut acc, x.as_ref(), true);
            for j in 1..d {
                assert_eq!(
                    acc[(0, j)],
                    0.0,
                    "the upper triangle is left to mirror_lower"
                );
            }
            mirror_lower(&mut acc);
            for i in 0..d {
                for j in 0..d {
                    let exact: f64 = (0..37)
                        .map(|t| 2.0 * x[(t, i)] as f64 * x[(t, j)] as f64)
                        .sum();
                    // Quarter-integer inputs: every product and partial sum is exact in f32.
                    assert_eq!(acc[(i, j)], exact, "width {d}, ({i}, {j})");
                    assert_eq!(acc[(i, j)], acc[(j, i)]);
                }
            }
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
            let mut acc = Mat::<f64>::from_fn(w, w, |i, j| (i + 2 * j) as f64);
            add_gram_homogeneous(&mut acc, &a, (n, d), bias, false);
            mirror_lower(&mut acc);
            let x = |t: usize, j: usize| if j == d { 1.0 } else { a[t * d + j] as f64 };
            for i in 0..w {
                for j in 0..=i {
                    let exact: f64 = (0..n).map(|t| x(t, i) * x(t, j)).sum();
                    // Added onto the lower triangle's starting values, exactly (quarter
                    // integers); mirror_lower copied them up.
                    assert_eq!(acc[(i, j)], exact + (i + 2 * j) as f64, "{d}: ({i}, {j})");
                    assert_eq!(acc[(j, i)], acc[(i, j)]);
                }
            }
        }
    }
}
