//! Loops compiled for the widest vector unit the CPU has: the [`multiversion!`] macro every
//! vectorised kernel is written with, and the lane-interleaved reductions ([`sum_lanes`],
//! [`max_lanes`]) that attention's softmax and the loss share.

/// Defines `fn $name` compiled three times, for AVX-512, for AVX2 + FMA and for the portable
/// target, and runs the widest the CPU has: LLVM then vectorises the element loops 16 or 8
/// wide (the portable build targets SSE2, and a closure handed to a feature-enabled function
/// is not inlined into it, measured). Every build computes the same values: nothing here uses
/// fused multiply-adds, and Rust never contracts `a * b + c` on its own.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wider($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `wider` is compiled for.
                    return unsafe { wider($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// Sum in eight interleaved partial sums, combined in a fixed order: vectorisable (an
    /// in-order sum is not) and deterministic.
    pub fn sum_lanes(x: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        for (l, v) in lanes.iter_mut().zip(chunks.remainder()) {
            *l += v;
        }
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    }
}

multiversion! {
    /// The largest element (−∞ for an empty slice; NaNs are skipped, as by `f32::max`), in 16
    /// interleaved partial maxima: a single running maximum is a serial chain of dependent
    /// `max` instructions that LLVM does not reorder (it was most of the LM head's loss, one
    /// per logit). The maximum does not depend on the order, so the value is the fold's.
    pub fn max_lanes(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.max(v);
            }
        }
        for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
            *l = l.max(v);
        }
        lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_lanes_is_the_running_maximum_at_every_length_and_position() {
        let fold = |x: &[f32]| x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for len in [0usize, 1, 7, 15, 16, 17, 33, 8192] {
            let base: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 * -0.25).collect();
            assert_eq!(
                max_lanes(&base).to_bits(),
                fold(&base).to_bits(),
                "len {len}"
            );
            // The maximum in each lane and in the remainder, and NaNs, which both skip.
            for at in [0, len / 2, len.saturating_sub(1)]
                .into_iter()
                .filter(|&a| a < len)
            {
                let mut x = base.clone();
                x[at] = 3.5;
                assert_eq!(max_lanes(&x), 3.5, "len {len}, max at {at}");
                x[at] = f32::NAN;
                assert_eq!(
                    max_lanes(&x).to_bits(),
                    fold(&x).to_bits(),
                    "len {len}, NaN at {at}"
                );
            }
        }
        assert_eq!(max_lanes(&[]), f32::NEG_INFINITY);
    }
}
