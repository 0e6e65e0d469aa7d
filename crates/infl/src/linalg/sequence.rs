//! Per-sequence products `g_sᵀ a_s` of a layer's taps (the per-sequence gradients): whole
//! ([`sequence_products`]), squared and summed (the eigenvalue pass), or dotted with query
//! gradients block by block (scoring), and the tokens' rotation into an eigenbasis.

use super::dots::{dots_serial, Columns};
use super::gemm::{gemm, gemm_raw, RowMajor};
use faer::{Mat, MatMut, MatRef};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::rows;

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
}
