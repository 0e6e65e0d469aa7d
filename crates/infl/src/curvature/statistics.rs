//! The statistics of a fit's passes: the running sums a pass adds each batch's taps to
//! ([`PassSums`], [`accumulate`]), as tensors for checkpoints and shards, and the FLOPs of
//! forming them.

use super::{Eigenbasis, Pass};
use crate::error::Result;
use crate::io::{TensorFile, TensorRef};
use crate::linalg::{self, Lower};
use crate::model::{TapBatch, TrackedLayer};
use faer::Mat;

/// The running sums of one pass: never means, so that shards and resumed runs add exactly.
#[derive(Debug, Clone)]
pub struct PassSums {
    pub pass: Pass,
    pub sums: Sums,
    pub n_tokens: u64,
    pub n_sequences: u64,
}

/// A pass's sums, per tracked layer in order.
#[derive(Debug, Clone)]
pub enum Sums {
    /// The covariance pass's `[Σāāᵀ, Σggᵀ]` per layer: symmetric, so kept as their packed
    /// lower triangles (half the state of whole matrices, the same f64 sums).
    Covariance(Vec<Lower>),
    /// The eigenvalue pass's `Σ (Q_Sᵀ G Q_A)^∘2` (or `Σ G^∘2`) per layer.
    Eigenvalue(Vec<Mat<f64>>),
}

impl PassSums {
    pub fn zeros(pass: Pass, tracked: &[TrackedLayer]) -> Self {
        let sums = match pass {
            Pass::Covariance => Sums::Covariance(
                tracked
                    .iter()
                    .flat_map(|l| [Lower::zeros(l.d_in_h()), Lower::zeros(l.d_out)])
                    .collect(),
            ),
            Pass::Eigenvalue => Sums::Eigenvalue(
                tracked
                    .iter()
                    .map(|l| Mat::zeros(l.d_out, l.d_in_h()))
                    .collect(),
            ),
        };
        PassSums {
            pass,
            sums,
            n_tokens: 0,
            n_sequences: 0,
        }
    }

    /// Adds another shard's sums of the same pass.
    ///
    /// # Panics
    /// If `other` holds another pass's sums.
    pub fn add(&mut self, other: &PassSums) {
        match (&mut self.sums, &other.sums) {
            (Sums::Covariance(a), Sums::Covariance(b)) => {
                a.iter_mut().zip(b).for_each(|(a, b)| a.add(b))
            }
            (Sums::Eigenvalue(a), Sums::Eigenvalue(b)) => {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b)
            }
            _ => panic!("sums of two different passes"),
        }
        self.n_tokens += other.n_tokens;
        self.n_sequences += other.n_sequences;
    }

    /// The bytes the sums hold.
    pub fn bytes(&self) -> usize {
        match &self.sums {
            Sums::Covariance(s) => s.iter().map(|l| 8 * l.as_slice().len()).sum(),
            Sums::Eigenvalue(s) => s.iter().map(|m| 8 * m.nrows() * m.ncols()).sum(),
        }
    }

    fn names(pass: Pass, tracked: &[TrackedLayer]) -> Vec<String> {
        match pass {
            Pass::Covariance => tracked
                .iter()
                .flat_map(|l| [format!("{}.A_sum", l.name), format!("{}.S_sum", l.name)])
                .collect(),
            Pass::Eigenvalue => tracked
                .iter()
                .map(|l| format!("{}.lambda_sum", l.name))
                .collect(),
        }
    }

    /// f64 tensors `{layer}.A_sum`, `{layer}.S_sum` (each the packed lower triangle, column
    /// by column: `d(d+1)/2` values) or `{layer}.lambda_sum` (`d_out × d_in`), and `counts`
    /// (`[tokens, sequences]`), borrowed (saved without a copy by
    /// [`crate::checkpoint::save_tensors`]).
    pub fn to_tensors(&self, tracked: &[TrackedLayer]) -> Vec<(String, TensorRef<'_>)> {
        let names = Self::names(self.pass, tracked).into_iter();
        let mut out: Vec<(String, TensorRef<'_>)> = match &self.sums {
            Sums::Covariance(s) => names
                .zip(s)
                .map(|(n, l)| (n, TensorRef::f64(vec![l.as_slice().len()], l.as_slice())))
                .collect(),
            Sums::Eigenvalue(s) => names
                .zip(s)
                .map(|(n, m)| (n, TensorRef::mat_f64(m.as_ref())))
                .collect(),
        };
        out.push((
            "counts".into(),
            TensorRef::f64_owned(vec![2], vec![self.n_tokens as f64, self.n_sequences as f64]),
        ));
        out
    }

    /// Reads back [`PassSums::to_tensors`] from a checkpoint, one tensor at a time (never the
    /// whole file, nor a second copy of the sums, in memory).
    pub fn read(file: &mut TensorFile, pass: Pass, tracked: &[TrackedLayer]) -> Result<Self> {
        let mut sums = PassSums::zeros(pass, tracked);
        sums.add_file(file, tracked)?;
        Ok(sums)
    }

    /// Adds the sums saved in `file` (another shard's), one tensor at a time.
    pub fn add_file(&mut self, file: &mut TensorFile, tracked: &[TrackedLayer]) -> Result<()> {
        let names = Self::names(self.pass, tracked);
        match &mut self.sums {
            Sums::Covariance(s) => {
                for (name, sum) in names.iter().zip(s.iter_mut()) {
                    let d = sum.dim();
                    let saved = file.vec_f64(name, Lower::packed_len(d))?;
                    let saved = Lower::from_packed(d, saved).expect("read at the packed length");
                    sum.add(&saved);
                }
            }
            Sums::Eigenvalue(s) => {
                for (name, sum) in names.iter().zip(s.iter_mut()) {
                    *sum += file.mat_f64(name, sum.nrows(), sum.ncols())?;
                }
            }
        }
        let counts = file.vec_f64("counts", 2)?;
        self.n_tokens += counts[0] as u64;
        self.n_sequences += counts[1] as u64;
        Ok(())
    }
}

/// FLOPs of the products that form `pass`'s statistics over `n_tokens` tokens, counted from the
/// shapes as [`accumulate`] runs them (for `infl bench`'s floors): the covariance pass's Grams
/// as symmetric rank-k updates (half a general product, `N d²`), the eigenvalue pass's
/// rotation of the tokens (`2N (d_out² + d_in²)`) and its per-sequence products
/// (`2N d_out d_in`); element-wise work (squares, sums in f64) is not counted.
pub fn statistics_flops(pass: Pass, tracked: &[TrackedLayer], n_tokens: usize) -> f64 {
    let n = n_tokens as f64;
    tracked
        .iter()
        .map(|l| {
            let (o, i) = (l.d_out as f64, l.d_in_h() as f64);
            match pass {
                Pass::Covariance => n * (o * o + i * i),
                Pass::Eigenvalue => 2.0 * n * (o * o + i * i) + 2.0 * n * o * i,
            }
        })
        .sum()
}

/// Adds one batch's taps to the running sums of `state.pass`. For the eigenvalue pass,
/// `bases[ℓ]` is layer ℓ's eigenbasis (EK-FAC) or `None` (diagonal: the original basis).
pub fn accumulate(
    state: &mut PassSums,
    tracked: &[TrackedLayer],
    bases: &[Option<&Eigenbasis>],
    taps: &TapBatch,
) {
    accumulate_keeping(state, tracked, bases, taps, false);
}

/// The tokens of a batch rotated into each layer's eigenbasis, `(g Q_S, ā Q_A)` (`None` for a
/// layer in the original basis), as the eigenvalue pass forms them.
pub type RotatedTokens = Vec<Option<(linalg::RowMajor, linalg::RowMajor)>>;

/// [`accumulate`], and with `keep` the eigenvalue pass's rotated tokens: a gradient store
/// written from the same pass takes them instead of rotating the tokens again (the rotation is
/// most of the pass's statistics).
pub fn accumulate_keeping(
    state: &mut PassSums,
    tracked: &[TrackedLayer],
    bases: &[Option<&Eigenbasis>],
    taps: &TapBatch,
    keep: bool,
) -> Option<RotatedTokens> {
    let offsets = taps.offsets();
    let n = offsets[offsets.len() - 1];
    state.n_tokens += n as u64;
    state.n_sequences += taps.seq_lens.len() as u64;
    // One task per statistic (two per layer in the covariance pass, one in the eigenvalue
    // pass), each product on one thread; with fewer statistics than that keeps busy, the
    // products split over the cores instead. Each sum is formed the same way either way.
    let tasks = match &state.sums {
        Sums::Covariance(s) => s.len(),
        Sums::Eigenvalue(s) => s.len(),
    };
    let inner = tasks < 4 * rayon::current_num_threads();
    match &mut state.sums {
        Sums::Covariance(sums) => {
            let grams: Vec<(usize, &mut Lower)> = sums.iter_mut().enumerate().collect();
            crate::pass::tasks::largest_first(
                grams,
                |(k, _)| {
                    let l = &tracked[k / 2];
                    let d = if k % 2 == 0 { l.d_in_h() } else { l.d_out };
                    (d * d) as f64
                },
                |(k, sum)| {
                    let (l, tap) = (&tracked[k / 2], &taps.layers[k / 2]);
                    if k % 2 == 0 {
                        let shape = (n, l.d_in);
                        linalg::add_gram_homogeneous(sum, &tap.a, shape, l.has_bias, inner);
                    } else {
                        linalg::add_gram(sum, linalg::rows(&tap.g, n, l.d_out), inner);
                    }
                },
            );
            None
        }
        Sums::Eigenvalue(sums) => {
            let layers: Vec<(usize, &mut Mat<f64>)> = sums.iter_mut().enumerate().collect();
            let rotated: RotatedTokens = crate::pass::tasks::largest_first(
                layers,
                |(k, _)| {
                    let (o, i) = (tracked[*k].d_out as f64, tracked[*k].d_in_h() as f64);
                    o * o + i * i + o * i
                },
                |(k, sum)| {
                    let (l, tap, basis) = (&tracked[k], &taps.layers[k], bases[k]);
                    let a = linalg::homogeneous(&tap.a, n, l.d_in, l.has_bias);
                    let g = linalg::rows(&tap.g, n, l.d_out);
                    let rotated = linalg::rotate_tokens(
                        g,
                        a.as_ref(),
                        basis.map(|b| (b.q_s.as_ref(), b.q_a.as_ref())),
                        inner,
                    );
                    let (g_rot, a_rot) = match &rotated {
                        Some((g_rot, a_rot)) => (g_rot.as_ref(), a_rot.as_ref()),
                        None => (g, a.as_ref()),
                    };
                    linalg::add_squared_sequence_products(sum, g_rot, a_rot, &offsets, inner);
                    rotated.filter(|_| keep)
                },
            );
            keep.then_some(rotated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FLOP counts `infl bench --passes-only` divides by, worked by hand for one layer.
    #[test]
    fn statistics_and_scoring_flops_are_counted_from_the_shapes() {
        // d_in 2 with a bias: d_in_h = 3; d_out = 4; 10 tokens in 2 sequences.
        let l = TrackedLayer {
            name: "x".into(),
            d_in: 2,
            d_out: 4,
            has_bias: true,
        };
        let one = std::slice::from_ref(&l);
        // Grams as symmetric updates: N (d_out² + d_in²) = 10 · (16 + 9).
        assert_eq!(statistics_flops(Pass::Covariance, one, 10), 250.0);
        // Rotation 2N (16 + 9) = 500, per-sequence products 2N · 4 · 3 = 240.
        assert_eq!(statistics_flops(Pass::Eigenvalue, one, 10), 740.0);
        // Per-sequence gradients 2N · 12 = 240, dots with 3 queries 2 · 2 · 3 · 12 = 144.
        assert_eq!(crate::influence::scoring_flops(one, 10, 2, 3), 384.0);
        // Queries of 4 and 6 tokens: tokens first 740, summed first 240 + 2·2·12·7 = 576
        // (cheaper here), and the rotation back 336 outside the store's basis.
        assert_eq!(crate::influence::query_flops(one, &[4, 6], true), 576.0);
        assert_eq!(crate::influence::query_flops(one, &[4, 6], false), 912.0);
    }
}
