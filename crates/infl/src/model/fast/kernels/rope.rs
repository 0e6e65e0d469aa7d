//! Where q, k and v sit in a row of the fused projection ([`QkvLayout`]) and the rotary
//! embedding applied to the q and k heads in place ([`Rope`], [`rope_apply`]).

use rayon::prelude::*;

/// Where each head's q, k and v sit in a row of the fused projection output: head `h` of q
/// starts at column `q.0 + h·q.1`, kv head `g` of k at `k.0 + g·k.1`, of v at `v.0 + g·v.1`.
#[derive(Debug, Clone, Copy)]
pub struct QkvLayout {
    pub stride: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q: (usize, usize),
    pub k: (usize, usize),
    pub v: (usize, usize),
}

impl QkvLayout {
    /// `[q heads | k heads | v heads]` (GPT-2's c_attn, Llama's q/k/v fused in that order).
    pub fn blocked(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        let (hq, hk) = (heads * head_dim, kv_heads * head_dim);
        QkvLayout {
            stride: hq + 2 * hk,
            heads,
            kv_heads,
            head_dim,
            q: (0, head_dim),
            k: (hq, head_dim),
            v: (hq + hk, head_dim),
        }
    }

    /// `[head, {q, k, v}, head_dim]` (GPT-NeoX's query_key_value).
    pub fn interleaved(heads: usize, head_dim: usize) -> Self {
        QkvLayout {
            stride: 3 * heads * head_dim,
            heads,
            kv_heads: heads,
            head_dim,
            q: (0, 3 * head_dim),
            k: (head_dim, 3 * head_dim),
            v: (2 * head_dim, 3 * head_dim),
        }
    }
}

/// Rotary tables for positions `0..len`: `cos`/`sin` are `len × rotary_dims` (each half
/// repeated, HF's `rotate_half` convention).
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub dims: usize,
}

/// Rotates (or, with `inverse`, rotates back: the transpose, for the backward) the first
/// `rope.dims` dimensions of every q and k head of every row. `seqs` gives each sequence's
/// (first row, length): positions restart at 0 in each sequence.
pub fn rope_apply(
    qkv: &mut [f32],
    lay: &QkvLayout,
    rope: &Rope,
    seqs: &[(usize, usize)],
    inverse: bool,
) {
    let (r, half) = (rope.dims, rope.dims / 2);
    if r == 0 {
        return;
    }
    let mut pos = vec![0usize; qkv.len() / lay.stride];
    for &(o, l) in seqs {
        for t in 0..l {
            pos[o + t] = t;
        }
    }
    let rotate = |row: &mut [f32], col: usize, p: usize| {
        let (c, s) = (
            &rope.cos[p * r..p * r + half],
            &rope.sin[p * r..p * r + half],
        );
        let x = &mut row[col..col + r];
        for i in 0..half {
            let (x1, x2) = (x[i], x[i + half]);
            if inverse {
                x[i] = x1 * c[i] + x2 * s[i];
                x[i + half] = x2 * c[i] - x1 * s[i];
            } else {
                // The reference computes x·cos + rotate_half(x)·sin with rotate_half = [−x2, x1].
                x[i] = x1 * c[i] + -x2 * s[i];
                x[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    };
    qkv.par_chunks_mut(lay.stride)
        .zip(pos.par_iter())
        .for_each(|(row, &p)| {
            for h in 0..lay.heads {
                rotate(row, lay.q.0 + h * lay.q.1, p);
            }
            for g in 0..lay.kv_heads {
                rotate(row, lay.k.0 + g * lay.k.1, p);
            }
        });
}
