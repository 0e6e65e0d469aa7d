//! Small dense helpers over faer shared by the curvature and influence stages: GEMM through
//! the `gemm` crate ([`gemm`]), symmetric Grams ([`gram`]) into packed triangles ([`lower`]), the per-sequence products of the
//! eigenvalue and scoring passes ([`sequence`]), the scoring dot kernels ([`dots`]),
//! eigendecomposition ([`eigh`]), layouts and precision conversions ([`layout`]) and the
//! timings behind `infl bench` ([`bench`]). This file holds the process-wide float mode
//! (subnormal flushing) and re-exports every helper as `crate::linalg::X`.

use faer::Par;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
mod bench;
mod dots;
mod eigh;
mod gemm;
mod gram;
mod layout;
mod lower;
mod sequence;

pub use bench::{dots_benchmark, gram_benchmark, GramTiming};
pub use dots::{columns, dots, dots_into, Columns};
pub use eigh::eigh;
pub use gemm::{gemm, mul, mul_into, RowMajor};
pub use gram::{add_gram, add_gram_general, add_gram_homogeneous, add_gram_recursive};
pub use layout::{
    f32_from_row_major, homogeneous, rows, to_f32, to_f64, to_row_major, Homogeneous,
};
pub use lower::Lower;
pub use sequence::{
    add_squared_sequence_products, rotate_tokens, sequence_block_dots, sequence_products,
};

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
}
