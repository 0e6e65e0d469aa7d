//! Small dense helpers over faer shared by the curvature and influence stages.

use faer::{Mat, MatMut, MatRef, Par};

#[cfg(target_arch = "x86_64")]
pub mod avx2;

/// Subnormal floats (|x| < 1.2e-38 in f32) are flushed to zero when produced and read as zero
/// when consumed, on the calling thread and on every thread of rayon's global pool (which the
/// products, kernels and candle run on). Idempotent and cheap after the first call.
///
/// Why: x86 cores take a microcode assist, on the order of a hundred cycles, for every vector
/// instruction that meets a subnormal. A randomly initialised GPT-2 makes them in its softmax
/// (probabilities below e^-87) and in GELU's derivative far from zero: measured, the fast
/// engine's GPT-2 pass ran 1.4× slower with them. What it changes is below 1.2e-38 absolute,
/// far under the rounding of any quantity the scores are made of. Every thread that computes
/// must be in the same mode for results not to depend on the thread count, so the passes'
/// own worker threads call it too.
pub fn flush_subnormals() {
    use std::sync::Once;
    static POOL: Once = Once::new();
    flush_subnormals_on_this_thread();
    POOL.call_once(|| {
        rayon::broadcast(|_| flush_subnormals_on_this_thread());
    });
}

/// [`flush_subnormals`] for the calling thread only (for threads outside rayon's pool).
pub fn flush_subnormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes the thread's own MXCSR; bits 15 (FTZ) and 6 (DAZ) change only
    // how subnormals are treated, no exception masks or rounding.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets FPCR.FZ (bit 24), the flush-to-zero mode, on the calling thread.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
    }
}

/// Parallelism for faer products: all cores (rayon's global pool).
pub fn par() -> Par {
    Par::rayon(0)
}

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

/// The tokens of a layer's taps rotated into an eigenbasis, `(g Q_S, ā Q_A)`, or `None`
/// without one (the original basis: use `g` and `ā` as they are). Rotating the tokens first,
/// `(g Q_S)ᵀ (ā Q_A) = Q_Sᵀ G Q_A`, is the cheaper order when sequences are shorter than the
/// layer is wide.
pub fn rotate_tokens(
    g: MatRef<'_, f32>,
    a: MatRef<'_, f32>,
    basis: Option<(MatRef<'_, f32>, MatRef<'_, f32>)>,
    parallel: bool,
) -> Option<(RowMajor, RowMajor)> {
    basis.map(|(q_s, q_a)| {
        (
            RowMajor::product(g, q_s, parallel),
            RowMajor::product(a, q_a, parallel),
        )
    })
}

/// `vec(g_sᵀ a_s)` of each sequence s, whose rows are `offsets[s]..offsets[s+1]` of `g`
/// (`n × d_out`) and `a` (`n × d_in`), as the columns of a `(d_out·d_in) × n_seq` matrix
/// (column-major vec). One sequence per task, each product on one thread: the products are
/// small (k = a sequence's length), and splitting each over the cores cost more than it saved.
pub fn sequence_products(g: MatRef<'_, f32>, a: MatRef<'_, f32>, offsets: &[usize]) -> Mat<f32> {
    use rayon::prelude::*;
    let (d_out, d_in) = (g.ncols(), a.ncols());
    let n_seq = offsets.len().saturating_sub(1);
    let mut out = Mat::<f32>::zeros(d_out * d_in, n_seq);
    let parallel_inside = n_seq == 1;
    out.as_mut()
        .par_col_chunks_mut(1)
        .zip(offsets.par_windows(2))
        .for_each(|(mut col, w)| {
            let (s, e) = (w[0], w[1]);
            let col = col
                .as_mut()
                .col_mut(0)
                .try_as_col_major_mut()
                .expect("owned column is contiguous")
                .as_slice_mut();
            gemm(
                MatMut::from_column_major_slice_mut(col, d_out, d_in),
                g.subrows(s, e - s).transpose(),
                a.subrows(s, e - s),
                false,
                parallel_inside,
            );
        });
    out
}

/// Dot products of the per-sequence gradients `R_s = g_sᵀ a_s` (rows `offsets[s]..offsets[s+1]`
/// of `g`, `n × d_out`, and `a`, `n × d_in`) with query gradients, over the columns
/// `j0..j0 + w` of `R` only: `out[s·nq + q] += Σ_{i, j0 ≤ j < j0+w} R_s[i, j] · P_q[i, j]`, where
/// `queries[q]` is column-major `vec(P_q)` (`d_out · d_in` long). Single-threaded: the caller
/// runs blocks as tasks.
///
/// The sequences' `d_out × w` tiles are formed into a buffer that stays in cache and dotted
/// with the queries' matching (contiguous) tiles at once, so no batch of full per-sequence
/// gradients is written to memory, zeroed first, and read back. Summed in f64 per block of
/// [`DOT_TILE`] elements as [`dots_into`] sums.
pub fn sequence_block_dots(
    g: MatRef<'_, f32>,
    a: MatRef<'_, f32>,
    offsets: &[usize],
    (j0, w): (usize, usize),
    queries: &[&[f32]],
    out: &mut [f64],
) {
    let (d_out, d_in) = (g.ncols(), a.ncols());
    let n_seq = offsets.len().saturating_sub(1);
    assert!(j0 + w <= d_in, "columns within a's");
    assert!(queries.iter().all(|q| q.len() == d_out * d_in));
    assert_eq!(out.len(), n_seq * queries.len(), "out is n_seq × n_queries");
    let tile = d_out * w;
    let mut tiles: Vec<f32> = Vec::with_capacity(tile * n_seq);
    for (s, win) in offsets.windows(2).enumerate() {
        let (t0, t1) = (win[0], win[1]);
        // SAFETY: sequence s's tile is the `d_out × w` column-major block at `s · tile` of the
        // buffer's capacity, written whole (no accumulation, so it is not read) before the
        // length below covers it; it aliases neither input.
        unsafe {
            gemm_raw(
                tiles.as_mut_ptr().add(s * tile),
                (d_out, w),
                (1, d_out as isize),
                g.subrows(t0, t1 - t0).transpose(),
                a.subrows(t0, t1 - t0).subcols(j0, w),
                false,
                false,
            );
        }
    }
    // SAFETY: every one of the n_seq tiles was written above.
    unsafe { tiles.set_len(tile * n_seq) };
    let cols: Vec<&[f32]> = tiles.chunks(tile).collect();
    let qs: Vec<&[f32]> = queries
        .iter()
        .map(|q| &q[j0 * d_out..(j0 + w) * d_out])
        .collect();
    let mut part = vec![0f64; out.len()];
    dots_serial(&mut part, &qs, Columns::F32(&cols), tile);
    for (o, p) in out.iter_mut().zip(&part) {
        *o += p;
    }
}

/// `acc[i, j] += Σ_s R_s[i, j]²` with `R_s = g_sᵀ a_s`, where `g_s`, `a_s` are the rows
/// `offsets[s]..offsets[s+1]` of `g` (`n × d_out`) and `a` (`n × d_in`): the squared
/// per-sequence gradients of the eigenvalue pass, in whatever basis `g` and `a` are in.
///
/// Block by block of columns of `acc` (threaded over blocks with `parallel`), every sequence
/// in order on a `d_out × block` tile that stays in cache, squared as it is made: no full
/// `R_s` is stored, and every element is summed in sequence order, so the result does not
/// depend on the thread count.
pub fn add_squared_sequence_products(
    acc: &mut Mat<f64>,
    g: MatRef<'_, f32>,
    a: MatRef<'_, f32>,
    offsets: &[usize],
    parallel: bool,
) {
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    let d_out = g.ncols();
    let tile = |b: usize, mut acc_b: MatMut<'_, f64>| {
        let (j0, w) = (b * BLOCK, acc_b.ncols());
        let mut r = Mat::<f32>::zeros(d_out, w);
        for win in offsets.windows(2) {
            let (s, e) = (win[0], win[1]);
            gemm(
                r.as_mut(),
                g.subrows(s, e - s).transpose(),
                a.subrows(s, e - s).subcols(j0, w),
                false,
                false,
            );
            for c in 0..w {
                let src = r.col(c).try_as_col_major().expect("owned column");
                let dst = acc_b
                    .as_mut()
                    .col_mut(c)
                    .try_as_col_major_mut()
                    .expect("owned column");
                for (o, &x) in dst.as_slice_mut().iter_mut().zip(src.as_slice()) {
                    let x = x as f64;
                    *o += x * x;
                }
            }
        }
    };
    if parallel {
        acc.as_mut()
            .par_col_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, acc_b)| tile(b, acc_b));
    } else {
        let (rows, cols) = (acc.nrows(), acc.ncols());
        for (b, j0) in (0..cols).step_by(BLOCK).enumerate() {
            tile(
                b,
                acc.as_mut()
                    .submatrix_mut(0, j0, rows, BLOCK.min(cols - j0)),
            );
        }
    }
}

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
unsafe fn gemm_raw(
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

/// The fastest of three runs of `f`, in seconds (the machines are shared: the minimum is the
/// least disturbed run).
fn best_of_3(f: &mut dyn FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// One row of [`gram_benchmark`], in seconds per Gram.
pub struct GramTiming {
    pub tokens: usize,
    pub width: usize,
    /// The general product `xᵀ x` ([`add_gram_general`]).
    pub general: f64,
    /// [`add_gram`] with each product split over the cores.
    pub split: f64,
    /// [`add_gram_recursive`], one Gram per core at once.
    pub recursive_per_core: f64,
    /// [`add_gram`] (the AVX2 kernel where the machine takes it), one Gram per core at once.
    pub per_core: f64,
}

/// Times the Grams of row-major `T × d` inputs (the taps' layout), best of 3 each, for `infl
/// bench`: the general product, [`add_gram`] split over the cores, and one Gram per core at
/// once (as the passes run them) by [`add_gram_recursive`] and by [`add_gram`].
pub fn gram_benchmark(shapes: &[(usize, usize)]) -> Vec<GramTiming> {
    use rayon::prelude::*;
    shapes
        .iter()
        .map(|&(t, d)| {
            let data: Vec<f32> = (0..t * d)
                .map(|k| ((k / d * 31 + k % d * 17) % 97) as f32 / 97.0)
                .collect();
            let x = rows(&data, t, d);
            let mut acc = Mat::<f64>::zeros(d, d);
            let general = best_of_3(&mut || add_gram_general(&mut acc, x));
            let split = best_of_3(&mut || add_gram(&mut acc, x, true));
            let cores = rayon::current_num_threads().max(1);
            let mut accs: Vec<Mat<f64>> = (0..cores).map(|_| Mat::zeros(d, d)).collect();
            let mut per_core = |gram: fn(&mut Mat<f64>, MatRef<'_, f32>, bool)| {
                best_of_3(&mut || accs.par_iter_mut().for_each(|acc| gram(acc, x, false)))
                    / cores as f64
            };
            let recursive_per_core = per_core(add_gram_recursive);
            let per_core = per_core(add_gram);
            GramTiming {
                tokens: t,
                width: d,
                general,
                split,
                recursive_per_core,
                per_core,
            }
        })
        .collect()
}

/// Times the scoring product `Aᵀ B` (`A`: `d × nq` queries, `B`: `d × ns` training columns)
/// through a general GEMM ([`mul`]) against [`dots`], best of 3 each, for `infl bench`: rows of
/// (nq, ns, d, GEMM seconds, dots seconds).
pub fn dots_benchmark(shapes: &[(usize, usize, usize)]) -> Vec<(usize, usize, usize, f64, f64)> {
    shapes
        .iter()
        .map(|&(nq, ns, d)| {
            let a = Mat::from_fn(d, nq, |i, j| ((i * 31 + j * 17) % 97) as f32 / 97.0);
            let b = Mat::from_fn(d, ns, |i, j| ((i * 13 + j * 29) % 89) as f32 / 89.0);
            let gemm = best_of_3(&mut || {
                std::hint::black_box(mul(a.transpose(), b.as_ref()));
            });
            let fused = best_of_3(&mut || {
                std::hint::black_box(dots(&a, &b));
            });
            (nq, ns, d, gemm, fused)
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
    fn subnormals_are_flushed_on_the_caller_and_the_pool() {
        use rayon::prelude::*;
        use std::hint::black_box;
        // 1e-30 · 1e-10 = 1e-40 is subnormal in f32; the smallest subnormal times 2^100 is a
        // normal 1.8e-15 unless it is read as zero.
        let product = || black_box(1e-30f32) * black_box(1e-10f32);
        let scaled = || black_box(f32::from_bits(1)) * black_box(2f32.powi(100));
        let before = std::thread::spawn(move || (product(), scaled()))
            .join()
            .unwrap();
        assert!(before.0 > 0.0 && before.1 > 1e-15, "{before:?}");
        flush_subnormals();
        assert_eq!((product(), scaled()), (0.0, 0.0));
        let on_pool: Vec<(f32, f32)> = (0..64)
            .into_par_iter()
            .map(|_| (product(), scaled()))
            .collect();
        assert!(on_pool.iter().all(|&p| p == (0.0, 0.0)));
        // Normal numbers are untouched.
        assert_eq!(black_box(2e-20f32) * black_box(0.5f32), 1e-20f32);
        assert_eq!(
            black_box(f32::MIN_POSITIVE) * black_box(1.0f32),
            f32::MIN_POSITIVE
        );
    }

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

    /// The per-sequence products behind the eigenvalue and scoring statistics, on row-major
    /// taps, against sums written out: at a `d_out` the AVX2 kernel takes (32) and one it
    /// leaves to the `gemm` crate (20), exactly (quarter integers).
    #[test]
    fn sequence_products_are_the_per_sequence_gradients() {
        let offsets = [0usize, 5, 5, 136, 200];
        let n = offsets[offsets.len() - 1];
        for (d_out, d_in) in [(32usize, 70usize), (20, 9)] {
            let gv: Vec<f32> = (0..n * d_out)
                .map(|k| ((k * 7 + k / d_out) % 11) as f32 * 0.25 - 1.0)
                .collect();
            let av: Vec<f32> = (0..n * d_in)
                .map(|k| ((k * 5 + k / d_in * 3) % 13) as f32 * 0.25 - 1.5)
                .collect();
            let (g, a) = (rows(&gv, n, d_out), rows(&av, n, d_in));
            let r = |s: usize, i: usize, j: usize| -> f64 {
                (offsets[s]..offsets[s + 1])
                    .map(|t| gv[t * d_out + i] as f64 * av[t * d_in + j] as f64)
                    .sum()
            };
            let mut acc = Mat::<f64>::zeros(d_out, d_in);
            add_squared_sequence_products(&mut acc, g, a, &offsets, false);
            let queries: Vec<Vec<f32>> = (0..3)
                .map(|q| {
                    (0..d_out * d_in)
                        .map(|k| ((k * 3 + q) % 7) as f32 * 0.5 - 1.5)
                        .collect()
                })
                .collect();
            let qs: Vec<&[f32]> = queries.iter().map(|q| q.as_slice()).collect();
            let (j0, w) = (d_in / 3, d_in - d_in / 3 - 1);
            let mut dots = vec![0f64; 4 * 3];
            sequence_block_dots(g, a, &offsets, (j0, w), &qs, &mut dots);
            for i in 0..d_out {
                for j in 0..d_in {
                    let want: f64 = (0..4).map(|s| r(s, i, j).powi(2)).sum();
                    assert_eq!(acc[(i, j)], want, "{d_out}: squares at ({i}, {j})");
                }
            }
            for s in 0..4 {
                for q in 0..3 {
                    let want: f64 = (j0..j0 + w)
                        .flat_map(|j| (0..d_out).map(move |i| (i, j)))
                        .map(|(i, j)| queries[q][j * d_out + i] as f64 * r(s, i, j))
                        .sum();
                    assert_eq!(dots[s * 3 + q], want, "{d_out}: sequence {s}, query {q}");
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

/// Columns of length `d`: the training side of a dot-product block.
#[derive(Clone, Copy)]
pub enum Columns<'a> {
    F32(&'a [&'a [f32]]),
    /// bfloat16 values (the upper half of an f32) as little-endian bytes at any alignment, as a
    /// store's mapping holds them; widened on the fly. Each column is `2·d` bytes.
    Bf16Le(&'a [&'a [u8]]),
    /// f32 values as little-endian bytes at any alignment; each column is `4·d` bytes.
    F32Le(&'a [&'a [u8]]),
}

impl<'a> Columns<'a> {
    fn len(&self) -> usize {
        match self {
            Columns::F32(b) => b.len(),
            Columns::Bf16Le(b) | Columns::F32Le(b) => b.len(),
        }
    }

    fn range(&self, from: usize, to: usize) -> Columns<'a> {
        match *self {
            Columns::F32(b) => Columns::F32(&b[from..to]),
            Columns::Bf16Le(b) => Columns::Bf16Le(&b[from..to]),
            Columns::F32Le(b) => Columns::F32Le(&b[from..to]),
        }
    }

    /// Element `i` of column `j`.
    fn at(&self, j: usize, i: usize) -> f32 {
        match self {
            Columns::F32(b) => b[j][i],
            Columns::Bf16Le(b) => {
                f32::from_bits((u16::from_le_bytes([b[j][2 * i], b[j][2 * i + 1]]) as u32) << 16)
            }
            Columns::F32Le(b) => {
                let c = &b[j][4 * i..4 * i + 4];
                f32::from_le_bytes([c[0], c[1], c[2], c[3]])
            }
        }
    }

    /// Whether every column holds `d` values.
    fn all_of_length(&self, d: usize) -> bool {
        match self {
            Columns::F32(b) => b.iter().all(|c| c.len() == d),
            Columns::Bf16Le(b) => b.iter().all(|c| c.len() == 2 * d),
            Columns::F32Le(b) => b.iter().all(|c| c.len() == 4 * d),
        }
    }
}

/// Elements of `d` per tile: a tile of 16 query columns (128 KiB) stays in L2 while every
/// training column of the batch streams past it.
const DOT_TILE: usize = 2048;

/// `out[s·nq + q] = Σ_i a_q[i] · b_s[i]` for the query columns `a` against the training columns
/// `b` (all of length `d`), accumulated in f64 tile by tile.
///
/// This is the product scoring spends its time in: few queries, a batch of training columns,
/// and a reduction over all of a layer's parameters. A general GEMM spends about as long packing
/// such skinny operands as multiplying them; here both sides are read in place (both are
/// contiguous along the reduction), bf16 is widened in registers, and the query tile is reused
/// from cache across the batch.
pub fn dots_into(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize) {
    let (nq, ns) = (a.len(), b.len());
    assert!(
        a.iter().all(|c| c.len() == d),
        "query columns have length d"
    );
    assert!(b.all_of_length(d), "training columns have length d");
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
                dots_serial(chunk, a, b.range(i * per, i * per + cols), d);
            });
    } else {
        dots_serial(out, a, b, d);
    }
}

fn dots_serial(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize) {
    out.iter_mut().for_each(|x| *x = 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the functions are compiled for (AVX-512
            // only when detected); every column has length d (asserted by the caller).
            unsafe { dots_avx2(out, a, b, d, std::arch::is_x86_feature_detected!("avx512f")) };
            return;
        }
    }
    dots_portable(out, a, b, d);
}

fn dots_portable(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize) {
    let nq = a.len();
    for t0 in (0..d).step_by(DOT_TILE) {
        let t1 = (t0 + DOT_TILE).min(d);
        for s in 0..b.len() {
            for (q, aq) in a.iter().enumerate() {
                let aq = &aq[t0..t1];
                let sum: f32 = match b {
                    Columns::F32(b) => aq.iter().zip(&b[s][t0..t1]).map(|(x, y)| x * y).sum(),
                    _ => aq
                        .iter()
                        .enumerate()
                        .map(|(i, x)| x * b.at(s, t0 + i))
                        .sum(),
                };
                out[s * nq + q] += sum as f64;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize, avx512: bool) {
    let (nq, ns) = (a.len(), b.len());
    for t0 in (0..d).step_by(DOT_TILE) {
        let len = DOT_TILE.min(d - t0);
        for s0 in (0..ns).step_by(3) {
            let sn = 3.min(ns - s0);
            // 8 query columns × 3 training columns per block with AVX-512 (24 of its 32
            // registers), 4 × 3 with AVX2 (12 of 16). Each dot is summed the same way in any
            // block, so the block size does not change the result.
            let qb = if avx512 { 8 } else { 4 };
            for q0 in (0..nq).step_by(qb) {
                let qn = qb.min(nq - q0);
                let mut sums = [[0f32; 3]; 8];
                macro_rules! block {
                    ($q:literal, $s:literal) => {
                        if avx512 {
                            micro_avx512::<$q, $s>(
                                &a[q0..q0 + $q],
                                b.range(s0, s0 + $s),
                                t0,
                                len,
                                &mut sums,
                            )
                        } else {
                            micro_avx2::<$q, $s>(
                                &a[q0..q0 + $q],
                                b.range(s0, s0 + $s),
                                t0,
                                len,
                                &mut sums,
                            )
                        }
                    };
                }
                macro_rules! columns {
                    ($q:literal) => {
                        match sn {
                            3 => block!($q, 3),
                            2 => block!($q, 2),
                            _ => block!($q, 1),
                        }
                    };
                }
                match qn {
                    8 => columns!(8),
                    7 => columns!(7),
                    6 => columns!(6),
                    5 => columns!(5),
                    4 => columns!(4),
                    3 => columns!(3),
                    2 => columns!(2),
                    _ => columns!(1),
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
unsafe fn micro_avx2<const QN: usize, const SN: usize>(
    a: &[&[f32]],
    b: Columns<'_>,
    t0: usize,
    len: usize,
    sums: &mut [[f32; 3]; 8],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); SN]; QN];
    let a_ptr: [*const f32; QN] = std::array::from_fn(|i| a[i].as_ptr().add(t0));
    let body = len / 8 * 8;
    let mut i = 0;
    while i < body {
        // Unaligned loads: the byte columns of a mapped store are at any alignment (and x86
        // is little-endian, as the store).
        // A loop, not `array::from_fn`: a closure is a function of its own, compiled without
        // this one's target features unless inlined, and one build did not inline it (the
        // loads then ran as calls, doubling the kernel's time).
        let mut bv = [_mm256_setzero_ps(); SN];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = match b {
                Columns::F32(b) => _mm256_loadu_ps(b[j].as_ptr().add(t0 + i)),
                Columns::F32Le(b) => _mm256_loadu_ps(b[j].as_ptr().add(4 * (t0 + i)).cast()),
                Columns::Bf16Le(b) => {
                    let h = _mm_loadu_si128(b[j].as_ptr().add(2 * (t0 + i)).cast());
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
            };
        }
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
            sums[q][j] = lanes.iter().sum::<f32>() + dot_tail(a[q], b, j, t0, body, len);
        }
    }
}

/// [`micro_avx2`] 16 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512<const QN: usize, const SN: usize>(
    a: &[&[f32]],
    b: Columns<'_>,
    t0: usize,
    len: usize,
    sums: &mut [[f32; 3]; 8],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); SN]; QN];
    let a_ptr: [*const f32; QN] = std::array::from_fn(|i| a[i].as_ptr().add(t0));
    let body = len / 16 * 16;
    let mut i = 0;
    while i < body {
        // A loop, not `array::from_fn`: see `micro_avx2`.
        let mut bv = [_mm512_setzero_ps(); SN];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = match b {
                Columns::F32(b) => _mm512_loadu_ps(b[j].as_ptr().add(t0 + i)),
                Columns::F32Le(b) => _mm512_loadu_ps(b[j].as_ptr().add(4 * (t0 + i)).cast()),
                Columns::Bf16Le(b) => {
                    let h = _mm256_loadu_si256(b[j].as_ptr().add(2 * (t0 + i)).cast());
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
            };
        }
        for (q, row) in acc.iter_mut().enumerate() {
            let av = _mm512_loadu_ps(a_ptr[q].add(i));
            for (j, cell) in row.iter_mut().enumerate() {
                *cell = _mm512_fmadd_ps(av, bv[j], *cell);
            }
        }
        i += 16;
    }
    for (q, row) in acc.iter().enumerate() {
        for (j, cell) in row.iter().enumerate() {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *cell);
            sums[q][j] = lanes.iter().sum::<f32>() + dot_tail(a[q], b, j, t0, body, len);
        }
    }
}

/// The scalar remainder of a micro-kernel's dot product: elements `t0 + body .. t0 + len` of
/// query column `a` and training column `j` of `b`.
fn dot_tail(a: &[f32], b: Columns<'_>, j: usize, t0: usize, body: usize, len: usize) -> f32 {
    let mut sum = 0f32;
    for k in body..len {
        sum += a[t0 + k] * b.at(j, t0 + k);
    }
    sum
}

/// The columns of an owned matrix as contiguous slices.
pub fn columns(m: &Mat<f32>) -> Vec<&[f32]> {
    (0..m.ncols())
        .map(|k| {
            m.col(k)
                .try_as_col_major()
                .expect("an owned matrix's columns are contiguous")
                .as_slice()
        })
        .collect()
}

/// `Aᵀ B` for column-stacked `A` (`d × nq`, few columns) and `B` (`d × ns`), through
/// [`dots_into`]: `[nq × ns]`.
pub fn dots(a: &Mat<f32>, b: &Mat<f32>) -> Mat<f32> {
    let (ac, bc) = (columns(a), columns(b));
    let mut out = vec![0f64; a.ncols() * b.ncols()];
    dots_into(&mut out, &ac, Columns::F32(&bc), a.nrows());
    Mat::from_fn(a.ncols(), b.ncols(), |q, s| out[s * a.ncols() + q] as f32)
}

#[cfg(test)]
mod dots_tests {
    use super::*;

    fn reference(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f64> {
        let mut out = vec![0.0; a.len() * b.len()];
        for (s, bs) in b.iter().enumerate() {
            for (q, aq) in a.iter().enumerate() {
                out[s * a.len() + q] = aq.iter().zip(bs).map(|(x, y)| *x as f64 * *y as f64).sum();
            }
        }
        out
    }

    #[test]
    fn dot_blocks_equal_an_f64_reference_for_every_edge_shape() {
        // Lengths around the 8-lane body and the tile, block counts that leave edges, and
        // enough columns to split over threads.
        for (nq, ns, d) in [
            (16, 32, 5000),
            (5, 7, 13),
            (1, 1, 1),
            (4, 3, 2048),
            (3, 5, 2049),
            (17, 4, 4103),
        ] {
            let a: Vec<Vec<f32>> = (0..nq)
                .map(|q| {
                    (0..d)
                        .map(|i| (((q * d + i) * 37 % 101) as f32 - 50.0) / 17.0)
                        .collect()
                })
                .collect();
            let b: Vec<Vec<f32>> = (0..ns)
                .map(|s| {
                    (0..d)
                        .map(|i| (((s * d + i) * 53 % 97) as f32 - 48.0) / 13.0)
                        .collect()
                })
                .collect();
            let ar: Vec<&[f32]> = a.iter().map(|c| c.as_slice()).collect();
            let br: Vec<&[f32]> = b.iter().map(|c| c.as_slice()).collect();
            let want = reference(&a, &b);
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            let close = |got: &[f64], want: &[f64], what: &str| {
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() < 1e-5 * scale,
                        "{what} {nq}×{ns}×{d}: {g} vs {w}"
                    );
                }
            };
            let mut got = vec![0.0; ns * nq];
            dots_into(&mut got, &ar, Columns::F32(&br), d);
            close(&got, &want, "f32");
            let mut portable = vec![0.0; ns * nq];
            dots_portable(&mut portable, &ar, Columns::F32(&br), d);
            close(&portable, &want, "portable");
            // bf16: the reference uses the same rounded training values.
            let bits: Vec<Vec<u16>> = b
                .iter()
                .map(|c| c.iter().map(|x| (x.to_bits() >> 16) as u16).collect())
                .collect();
            let widened: Vec<Vec<f32>> = bits
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|&h| f32::from_bits((h as u32) << 16))
                        .collect()
                })
                .collect();
            // As a store's mapping holds them: little-endian bytes, one byte past an aligned
            // start (a record's tag byte), so that no value is aligned to its width.
            let misaligned = |bytes: Vec<u8>| -> Vec<u8> {
                let mut v = vec![0xAB];
                v.extend(bytes);
                v
            };
            let bf16_bytes: Vec<Vec<u8>> = bits
                .iter()
                .map(|c| misaligned(c.iter().flat_map(|h| h.to_le_bytes()).collect()))
                .collect();
            let bf16_cols: Vec<&[u8]> = bf16_bytes.iter().map(|c| &c[1..]).collect();
            let widened_want = reference(&a, &widened);
            dots_into(&mut got, &ar, Columns::Bf16Le(&bf16_cols), d);
            close(&got, &widened_want, "bf16");
            portable.fill(0.0); // the portable kernel accumulates
            dots_portable(&mut portable, &ar, Columns::Bf16Le(&bf16_cols), d);
            close(&portable, &widened_want, "bf16 portable");
            let f32_bytes: Vec<Vec<u8>> = b
                .iter()
                .map(|c| misaligned(c.iter().flat_map(|x| x.to_le_bytes()).collect()))
                .collect();
            let f32_cols: Vec<&[u8]> = f32_bytes.iter().map(|c| &c[1..]).collect();
            let mut from_bytes = vec![0.0; ns * nq];
            dots_into(&mut from_bytes, &ar, Columns::F32Le(&f32_cols), d);
            dots_into(&mut got, &ar, Columns::F32(&br), d);
            assert_eq!(from_bytes, got, "f32 bytes sum exactly as f32 slices");
            portable.fill(0.0);
            dots_portable(&mut portable, &ar, Columns::F32Le(&f32_cols), d);
            close(&portable, &want, "f32 bytes portable");
            // Through owned matrices (padded column strides).
            let am = Mat::from_fn(d, nq, |i, q| a[q][i]);
            let bm = Mat::from_fn(d, ns, |i, s| b[s][i]);
            let m = dots(&am, &bm);
            for s in 0..ns {
                for q in 0..nq {
                    assert!((m[(q, s)] as f64 - want[s * nq + q]).abs() < 1e-5 * scale);
                }
            }
        }
    }
}
