//! `infl bench --engines-only` (and the end of every full bench): the engines against each
//! other and the GEMM-bound floor, the covariance update and the scoring product kernels.

use anyhow::Result;

/// The engines' table, then the covariance-update and scoring-product kernels.
pub fn print() -> Result<()> {
    print!("{}", infl::model::fast::bench::run()?.table());
    print_gram_bench();
    print_dots_bench();
    Ok(())
}

/// Covariance updates: the symmetric rank-k update against a general `xᵀ x`, same run.
fn print_gram_bench() {
    println!("\ncovariance update Σ xᵀx (f32 product, f64 accumulator, row-major x), best of 3:");
    println!(
        "{:>6} {:>6} {:>12} {:>14} {:>16} {:>14} {:>8}",
        "T", "d", "general ms", "sym, split ms", "recursion 1/core", "sym, 1/core ms", "ratio"
    );
    let shapes = [(1024, 257), (2048, 1025), (2048, 3072)];
    for g in infl::linalg::gram_benchmark(&shapes) {
        println!(
            "{:>6} {:>6} {:>12.2} {:>14.2} {:>16.2} {:>14.2} {:>7.2}×",
            g.tokens,
            g.width,
            g.general * 1e3,
            g.split * 1e3,
            g.recursive_per_core * 1e3,
            g.per_core * 1e3,
            g.general / g.split.min(g.per_core)
        );
    }
    println!(
        "(1/core: one Gram per core at once, as the passes run them; time per Gram; recursion:\n\
         the products of the `gemm` crate, which machines without the AVX2 kernel run)"
    );
}

/// The scoring product (queries against training columns): general GEMM against the dot-block
/// kernel, same run.
fn print_dots_bench() {
    println!("\nscoring product Aᵀ B (16 queries, 32 training columns), best of 3:");
    println!(
        "{:>8} {:>10} {:>10} {:>8}",
        "d", "GEMM ms", "dots ms", "ratio"
    );
    for (_, _, d, g, f) in infl::linalg::dots_benchmark(&[
        (16, 32, 48 * 49),
        (16, 32, 257 * 1024),
        (16, 32, 769 * 3072),
    ]) {
        println!("{d:>8} {:>10.2} {:>10.2} {:>7.2}×", g * 1e3, f * 1e3, g / f);
    }
}
