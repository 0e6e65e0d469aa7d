//! Timings of the Gram and scoring-product kernels against general products, for `infl bench`.

use super::dots::dots;
use super::gemm::mul;
use super::gram::{add_gram, add_gram_general, add_gram_recursive};
use super::layout::rows;
use super::lower::Lower;
use faer::{Mat, MatRef};

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
            let mut acc = Lower::zeros(d);
            let general = best_of_3(&mut || add_gram_general(&mut acc, x));
            let split = best_of_3(&mut || add_gram(&mut acc, x, true));
            let cores = rayon::current_num_threads().max(1);
            let mut accs: Vec<Lower> = (0..cores).map(|_| Lower::zeros(d)).collect();
            let mut per_core = |gram: fn(&mut Lower, MatRef<'_, f32>, bool)| {
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
