//! Causal softmax attention per (sequence, head), forward and backward, tile by tile: the
//! probability matrices are never stored, the backward recomputes them from the row max and
//! sum the forward saves. GQA heads share their kv head; an optional sliding window limits the
//! keys a row sees.

use super::activation::exp;
use super::gemm::{gemm, View};
use super::lanes::{max_lanes, multiversion, sum_lanes};
use super::rope::QkvLayout;
use super::{written, SyncPtr};
use rayon::prelude::*;

/// Query rows per attention tile: a tile of queries only needs the keys up to its last row.
pub(crate) const TILE: usize = 64;

/// The keys row `i` may see: `[lo, i]`, with a sliding window `i − j < w`.
fn key_start(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Causal softmax attention of every (sequence, head): `out` (rows × heads·head_dim) gets
/// `softmax(scale · q kᵀ + mask) v` per head, `stats` (rows × heads × 2) the row max and
/// sum of exponentials that let the backward recompute the probabilities bit for bit.
pub fn attention_fwd(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    out: &mut [f32],
    stats: &mut [f32],
) {
    let rows = rows_named(seqs);
    assert!(out.len() >= rows * lay.heads * lay.head_dim && stats.len() >= rows * 2 * lay.heads);
    assert!(qkv.len() >= rows * lay.stride);
    // SAFETY: the outputs cover every row a sequence names (checked above).
    unsafe {
        attention_fwd_raw(
            qkv,
            lay,
            seqs,
            window,
            scale,
            SyncPtr(out.as_mut_ptr()),
            SyncPtr(stats.as_mut_ptr()),
        )
    }
}

/// One past the last row any sequence names (the rows the outputs must hold).
fn rows_named(seqs: &[(usize, usize)]) -> usize {
    seqs.iter().map(|&(o, l)| o + l).max().unwrap_or(0)
}

/// The rows `0..n` when the sequences tile them in order with no gap, else `None`.
pub(super) fn tiled_rows(seqs: &[(usize, usize)]) -> Option<usize> {
    let mut next = 0;
    for &(o, l) in seqs {
        if o != next {
            return None;
        }
        next += l;
    }
    Some(next)
}

/// [`attention_fwd`] into fresh `(out, stats)`, which it writes whole (no zeroing first) when
/// `seqs` tile the rows, as the engine's concatenated batches do.
pub fn attention_forward(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (h, hd) = (lay.heads, lay.head_dim);
    let Some(n) = tiled_rows(seqs) else {
        let rows = rows_named(seqs);
        let (mut out, mut stats) = (vec![0f32; rows * h * hd], vec![0f32; rows * 2 * h]);
        attention_fwd(qkv, lay, seqs, window, scale, &mut out, &mut stats);
        return (out, stats);
    };
    assert!(qkv.len() >= n * lay.stride);
    let mut out = Vec::new();
    // SAFETY: every (row, head) of both outputs belongs to one task, which writes it: the
    // sequences tile rows 0..n and every head of every row is visited.
    let stats = unsafe {
        written(n * 2 * h, |st| {
            out = written(n * h * hd, |o| {
                attention_fwd_raw(qkv, lay, seqs, window, scale, SyncPtr(o), SyncPtr(st))
            })
        })
    };
    (out, stats)
}

/// # Safety
/// `outp` must cover rows × heads·head_dim and `statp` rows × 2·heads floats, for every row
/// of `seqs`, and `qkv` every row × stride.
unsafe fn attention_fwd_raw(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    outp: SyncPtr,
    statp: SyncPtr,
) {
    let (h, hd) = (lay.heads, lay.head_dim);
    let group = h / lay.kv_heads;
    let (od, sd) = (h * hd, 2 * h);
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .flat_map(|&(o, l)| (0..h).map(move |hh| (o, l, hh)))
        .collect();
    tasks.par_iter().for_each(|&(o, l, hh)| {
        let g = hh / group;
        let q = View::rows(
            &qkv[(o * lay.stride + lay.q.0 + hh * lay.q.1)..],
            lay.stride,
        );
        let kcol = o * lay.stride + lay.k.0 + g * lay.k.1;
        let vcol = o * lay.stride + lay.v.0 + g * lay.v.1;
        let mut s = vec![0f32; TILE * l];
        for r0 in (0..l).step_by(TILE) {
            let r1 = (r0 + TILE).min(l);
            let ks = key_start(r0, window);
            let (m, n) = (r1 - r0, r1 - ks);
            // SAFETY: q/k/v views lie inside `qkv`; `s` holds m×n.
            unsafe {
                gemm(
                    m,
                    n,
                    hd,
                    s.as_mut_ptr(),
                    n,
                    View {
                        ptr: q.ptr.add(r0 * lay.stride),
                        ..q
                    },
                    View::t(&qkv[kcol + ks * lay.stride..], lay.stride),
                    false,
                    scale,
                    false,
                );
            }
            for i in r0..r1 {
                let row = &mut s[(i - r0) * n..(i - r0 + 1) * n];
                let lo = key_start(i, window) - ks;
                let hi = i + 1 - ks;
                let (mx, sum) = softmax_in_place(&mut row[lo..hi]);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                // SAFETY: row (o + i), head hh of `stats` belongs to this task only.
                unsafe {
                    let st = statp.get().add((o + i) * sd + 2 * hh);
                    *st = mx;
                    *st.add(1) = sum;
                }
            }
            // SAFETY: rows r0..r1 of head hh in `out` belong to this task only.
            unsafe {
                gemm(
                    m,
                    hd,
                    n,
                    outp.get().add((o + r0) * od + hh * hd),
                    od,
                    View::rows(&s, n),
                    View::rows(&qkv[vcol + ks * lay.stride..], lay.stride),
                    false,
                    1.0,
                    false,
                );
            }
        }
    });
}

/// Backward of [`attention_fwd`]: from `dout` (rows × heads·head_dim) writes dq, dk, dv into
/// the q/k/v columns of `dqkv` (other columns untouched). Per tile the probabilities P are
/// recomputed; dP = dO vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP)) · scale, dq = dS k, dk += dSᵀ q,
/// dv += Pᵀ dO. Tasks are (sequence, kv head) so that a group's query heads accumulate into
/// their shared dk, dv without races.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    stats: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let rows = rows_named(seqs);
    assert!(dqkv.len() >= rows * lay.stride && qkv.len() >= rows * lay.stride);
    // SAFETY: `dqkv` covers every row a sequence names (checked above).
    unsafe {
        attention_bwd_raw(
            qkv,
            lay,
            seqs,
            window,
            scale,
            stats,
            dout,
            SyncPtr(dqkv.as_mut_ptr()),
        )
    }
}

impl QkvLayout {
    /// Does every column of a row belong to exactly one q, k or v head?
    pub(super) fn covers_every_column(&self) -> bool {
        let mut seen = vec![0u8; self.stride];
        let mut mark = |start: usize, step: usize, count: usize| {
            for i in 0..count {
                for c in start + i * step..start + i * step + self.head_dim {
                    match seen.get_mut(c) {
                        Some(v) => *v += 1,
                        None => return false,
                    }
                }
            }
            true
        };
        mark(self.q.0, self.q.1, self.heads)
            && mark(self.k.0, self.k.1, self.kv_heads)
            && mark(self.v.0, self.v.1, self.kv_heads)
            && seen.iter().all(|&v| v == 1)
    }
}

/// [`attention_bwd`] into a fresh `dqkv`, written whole (no zeroing first) when `seqs` tile the
/// rows and the q, k and v heads cover every column, as in every architecture here.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    stats: &[f32],
    dout: &[f32],
) -> Vec<f32> {
    match tiled_rows(seqs) {
        Some(n) if lay.covers_every_column() => {
            assert!(qkv.len() >= n * lay.stride);
            // SAFETY: each task zeroes, then accumulates into, the k and v columns of its kv
            // head and writes the q columns of its query heads, for all rows of its sequence;
            // the heads cover every column and the sequences every row.
            unsafe {
                written(n * lay.stride, |dp| {
                    attention_bwd_raw(qkv, lay, seqs, window, scale, stats, dout, SyncPtr(dp))
                })
            }
        }
        _ => {
            let rows = rows_named(seqs);
            let mut dqkv = vec![0f32; rows * lay.stride];
            attention_bwd(qkv, lay, seqs, window, scale, stats, dout, &mut dqkv);
            dqkv
        }
    }
}

/// # Safety
/// `dp` must cover every row of `seqs` × `lay.stride` floats, as must `qkv`.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_bwd_raw(
    qkv: &[f32],
    lay: &QkvLayout,
    seqs: &[(usize, usize)],
    window: Option<usize>,
    scale: f32,
    stats: &[f32],
    dout: &[f32],
    dp: SyncPtr,
) {
    let (h, hd, st) = (lay.heads, lay.head_dim, lay.stride);
    let group = h / lay.kv_heads;
    let (od, sd) = (h * hd, 2 * h);
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .flat_map(|&(o, l)| (0..lay.kv_heads).map(move |g| (o, l, g)))
        .collect();
    tasks.par_iter().for_each(|&(o, l, g)| {
        let kcol = o * st + lay.k.0 + g * lay.k.1;
        let vcol = o * st + lay.v.0 + g * lay.v.1;
        // SAFETY (for every write below): the k/v columns of kv head g and the q columns of
        // its query heads, rows o..o+l, belong to this task only.
        unsafe {
            for i in 0..l {
                for c in [kcol, vcol] {
                    std::ptr::write_bytes(dp.get().add(c + i * st), 0, hd);
                }
            }
        }
        let mut p = vec![0f32; TILE * l];
        let mut ds = vec![0f32; TILE * l];
        for hh in g * group..(g + 1) * group {
            let qcol = o * st + lay.q.0 + hh * lay.q.1;
            for r0 in (0..l).step_by(TILE) {
                let r1 = (r0 + TILE).min(l);
                let ks = key_start(r0, window);
                let (m, n) = (r1 - r0, r1 - ks);
                let q_t = View::rows(&qkv[qcol + r0 * st..], st);
                let k_t = View::rows(&qkv[kcol + ks * st..], st);
                let v_t = View::rows(&qkv[vcol + ks * st..], st);
                let do_t = View::rows(&dout[(o + r0) * od + hh * hd..], od);
                unsafe {
                    gemm(
                        m,
                        n,
                        hd,
                        p.as_mut_ptr(),
                        n,
                        q_t,
                        View {
                            rs: 1,
                            cs: st,
                            ..k_t
                        },
                        false,
                        scale,
                        false,
                    );
                    gemm(
                        m,
                        n,
                        hd,
                        ds.as_mut_ptr(),
                        n,
                        do_t,
                        View {
                            rs: 1,
                            cs: st,
                            ..v_t
                        },
                        false,
                        1.0,
                        false,
                    );
                }
                for i in r0..r1 {
                    let pr = &mut p[(i - r0) * n..(i - r0 + 1) * n];
                    let dr = &mut ds[(i - r0) * n..(i - r0 + 1) * n];
                    let lo = key_start(i, window) - ks;
                    let hi = i + 1 - ks;
                    let s = &stats[(o + i) * sd + 2 * hh..];
                    let (mx, sum) = (s[0], s[1]);
                    softmax_grad_row(&mut pr[lo..hi], &mut dr[lo..hi], mx, sum, scale);
                    pr[..lo].fill(0.0);
                    pr[hi..].fill(0.0);
                    dr[..lo].fill(0.0);
                    dr[hi..].fill(0.0);
                }
                unsafe {
                    // dq (rows r0..r1) = dS k
                    gemm(
                        m,
                        hd,
                        n,
                        dp.get().add(qcol + r0 * st),
                        st,
                        View::rows(&ds, n),
                        k_t,
                        false,
                        1.0,
                        false,
                    );
                    // dk (keys ks..r1) += dSᵀ q
                    gemm(
                        n,
                        hd,
                        m,
                        dp.get().add(kcol + ks * st),
                        st,
                        View::t(&ds, n),
                        q_t,
                        true,
                        1.0,
                        false,
                    );
                    // dv (keys ks..r1) += Pᵀ dO
                    gemm(
                        n,
                        hd,
                        m,
                        dp.get().add(vcol + ks * st),
                        st,
                        View::t(&p, n),
                        do_t,
                        true,
                        1.0,
                        false,
                    );
                }
            }
        }
    });
}

multiversion! {
    /// Softmax of `row` in place; returns its (max, sum of e^(x − max)), the statistics the
    /// backward recomputes the probabilities from.
    fn softmax_in_place(row: &mut [f32]) -> (f32, f32) {
        let mx = max_lanes(row);
        for x in row.iter_mut() {
            *x = exp(*x - mx);
        }
        let sum = sum_lanes(row);
        for x in row.iter_mut() {
            *x /= sum;
        }
        (mx, sum)
    }
}

multiversion! {
    /// One row of the attention backward: `p` holds the scores on entry and the recomputed
    /// probabilities on return, `d` holds dP on entry and dS = P ∘ (dP − ⟨P, dP⟩) · scale.
    fn softmax_grad_row(p: &mut [f32], d: &mut [f32], mx: f32, sum: f32, scale: f32) {
        for x in p.iter_mut() {
            *x = exp(*x - mx) / sum;
        }
        let mut lanes = [0f32; 8];
        let mut chunks = p.chunks_exact(8).zip(d.chunks_exact(8));
        for (pc, dc) in &mut chunks {
            for ((l, a), b) in lanes.iter_mut().zip(pc).zip(dc) {
                *l += a * b;
            }
        }
        let tail = p.len() - p.len() % 8;
        for ((l, a), b) in lanes.iter_mut().zip(&p[tail..]).zip(&d[tail..]) {
            *l += a * b;
        }
        let dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for (x, &pv) in d.iter_mut().zip(p.iter()) {
            *x = pv * (*x - dot) * scale;
        }
    }
}
