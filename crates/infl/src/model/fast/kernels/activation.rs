//! Activations by their config names ([`Act`]) with their exact derivatives, the vectorising
//! [`exp`] they are built on, and the elementwise kernels over them: the forward that keeps the
//! derivative ([`act_and_derivative`]), its backward ([`mul_in_place`]) and the gated
//! (SwiGLU-style) forward and backward ([`glu_fwd`], [`glu_bwd`]).

use super::lanes::multiversion;
use super::{rows_per_task, ROW_GRAIN};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Activation functions by their config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))` (gelu_new, gelu_pytorch_tanh, gelu_fast).
    GeluTanh,
    /// `0.5 x (1 + erf(x/√2))` (gelu).
    GeluErf,
    Relu,
    /// `x σ(x)` (silu, swish).
    Silu,
}

impl Act {
    /// The activation a config name selects (the names `ops::activation` accepts).
    pub fn from_name(name: &str) -> Option<Act> {
        match name {
            "gelu" => Some(Act::GeluErf),
            "relu" => Some(Act::Relu),
            "silu" | "swish" => Some(Act::Silu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Act::GeluTanh),
            _ => None,
        }
    }

    /// The activation. Both tanh forms are evaluated through the logistic function,
    /// `0.5 (1 + tanh(u)) = σ(2u)`, which needs one `exp` instead of a (much slower) `tanh`
    /// and stays accurate (no cancellation) for every x.
    #[inline(always)]
    pub fn f(self, x: f32) -> f32 {
        match self {
            Act::GeluTanh => x * sigmoid(2.0 * gelu_inner(x)),
            Act::GeluErf => {
                (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
                    * 0.5
                    * x
            }
            Act::Relu => x.max(0.0),
            Act::Silu => x * sigmoid(x),
        }
    }

    /// The derivative (exact constants).
    #[inline(always)]
    pub fn df(self, x: f32) -> f32 {
        match self {
            Act::GeluTanh => {
                // With s = σ(2u): 0.5 (1 + tanh u) = s and 1 − tanh² u = 4 s (1 − s).
                let s = sigmoid(2.0 * gelu_inner(x));
                s + 2.0 * x * s * (1.0 - s) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Act::GeluErf => {
                let cdf = 0.5
                    * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = exp(-0.5 * x * x) / (2.0 * std::f32::consts::PI).sqrt();
                cdf + x * pdf
            }
            Act::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Silu => {
                let s = sigmoid(x);
                s + x * s * (1.0 - s)
            }
        }
    }
}

/// √(2/π).
const GELU_C: f32 = 0.797_884_6;

/// `√(2/π) (x + 0.044715 x³)`.
#[inline(always)]
fn gelu_inner(x: f32) -> f32 {
    GELU_C * (x + 0.044715 * x * x * x)
}

/// `1 / (1 + e^{−z})` (0 or 1 at the extremes, never NaN).
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

/// `e^x` in f32 with no library call, so that loops over it vectorise: Cephes' `expf` (range
/// reduction by ln 2 split in two parts, a degree-6 polynomial, the power of two set in the
/// exponent bits); relative error below 2.5e-7 over the whole range (tested against f64).
/// Below −87.33, where `e^x` is subnormal, it returns 0; above 88.72 it returns `e^88.72`
/// (only reached by `sigmoid` of x < −88.7, whose value then rounds to 0 either way).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    let xc = x.clamp(LO, HI);
    // n = round(x / ln 2) by the 1.5·2²³ trick (exact in round-to-nearest, vectorises with no
    // rounding instruction). The shifted sum holds n in its low mantissa bits, which gives n as
    // an integer with no float-to-int conversion: `as i32` saturates and maps NaN to 0, which
    // LLVM emitted as 16 scalar conversions per vector (measured: a third of GELU's time).
    let shifted = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let n_int = shifted.to_bits() as i32 - 0x4B40_0000;
    let n = shifted - 12_582_912.0;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n for n in [-126, 128] as two normal halves, 2^⌊n/2⌋ · 2^⌈n/2⌉: one power would leave
    // the exponent field at both ends.
    let n = n_int;
    let half = n >> 1;
    let pow = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        e * pow(half) * pow(n - half)
    }
}

multiversion! {
    fn glu_rows(act: Act, gu: &[f32], di: usize, y: &mut [f32]) {
        for (gu, y) in gu.chunks(2 * di).zip(y.chunks_mut(di)) {
            let (gate, up) = gu.split_at(di);
            for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                *y = act.f(g) * u;
            }
        }
    }
}

multiversion! {
    fn glu_grad_rows(act: Act, gu: &[f32], dy: &[f32], di: usize, dgu: &mut [f32]) {
        for ((gu, dy), dgu) in gu.chunks(2 * di).zip(dy.chunks(di)).zip(dgu.chunks_mut(2 * di)) {
            let (gate, up) = gu.split_at(di);
            let (dgate, dup) = dgu.split_at_mut(di);
            for ((((dg, du), &dy), &g), &u) in dgate.iter_mut().zip(dup).zip(dy).zip(gate).zip(up) {
                *dg = dy * u * act.df(g);
                *du = dy * act.f(g);
            }
        }
    }
}

/// `(act(x), act'(x))` in fresh buffers, in one sweep (the logistic term of GELU and SiLU is
/// shared): the forward keeps the derivative for the backward, which is then a product
/// ([`mul_in_place`]) instead of a second evaluation. The values are those of `act.f` and
/// `act.df`, bit for bit.
pub fn act_and_derivative(act: Act, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = x.len();
    let (mut y, mut d) = (Vec::with_capacity(n), Vec::with_capacity(n));
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(ROW_GRAIN)
        .zip(d.spare_capacity_mut()[..n].par_chunks_mut(ROW_GRAIN))
        .zip(x.par_chunks(ROW_GRAIN))
        .for_each(|((y, d), x)| act_and_derivative_slice(act, x, y, d));
    // SAFETY: every element of both was written by `act_and_derivative_slice`.
    unsafe {
        y.set_len(n);
        d.set_len(n);
    }
    (y, d)
}

multiversion! {
    fn act_and_derivative_slice(
        act: Act,
        x: &[f32],
        y: &mut [MaybeUninit<f32>],
        d: &mut [MaybeUninit<f32>],
    ) {
        for ((x, y), d) in x.iter().zip(y).zip(d) {
            y.write(act.f(*x));
            d.write(act.df(*x));
        }
    }
}

/// `dy ← dy · d`, elementwise (the activation backward from a saved derivative).
pub fn mul_in_place(dy: &mut [f32], d: &[f32]) {
    assert_eq!(
        dy.len(),
        d.len(),
        "gradient and derivative have one element each"
    );
    dy.par_chunks_mut(ROW_GRAIN)
        .zip(d.par_chunks(ROW_GRAIN))
        .for_each(|(dy, d)| mul_slice(dy, d));
}

multiversion! {
    fn mul_slice(dy: &mut [f32], d: &[f32]) {
        for (dy, d) in dy.iter_mut().zip(d) {
            *dy *= *d;
        }
    }
}

/// SwiGLU-style gate: `y = act(gate) · up`, where row r of `gu` (n × 2di) is `[gate | up]`.
pub fn glu_fwd(act: Act, gu: &[f32], di: usize, y: &mut [f32]) {
    let g = rows_per_task(2 * di);
    gu.par_chunks(2 * di * g)
        .zip(y.par_chunks_mut(di * g))
        .for_each(|(gu, y)| {
            glu_rows(act, gu, di, y);
        });
}

/// Backward of [`glu_fwd`]: `dgu = [dy · up · act'(gate) | dy · act(gate)]`.
pub fn glu_bwd(act: Act, gu: &[f32], dy: &[f32], di: usize, dgu: &mut [f32]) {
    let g = rows_per_task(2 * di);
    gu.par_chunks(2 * di * g)
        .zip(dy.par_chunks(di * g))
        .zip(dgu.par_chunks_mut(2 * di * g))
        .for_each(|((gu, dy), dgu)| {
            glu_grad_rows(act, gu, dy, di, dgu);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_derivatives_match_finite_differences() {
        for act in [Act::GeluTanh, Act::GeluErf, Act::Silu, Act::Relu] {
            for &x in &[-3.1f32, -0.7, 0.3, 1.9] {
                let h = 1e-3f64;
                let f = |v: f64| act.f(v as f32) as f64;
                let fd = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
                assert!(
                    (fd - act.df(x) as f64).abs() < 2e-3,
                    "{act:?} at {x}: {fd} vs {}",
                    act.df(x)
                );
            }
        }
    }

    #[test]
    fn exp_is_within_its_error_bound_and_the_same_vectorised() {
        let xs: Vec<f32> = (0..200_000).map(|i| -87.3 + i as f32 * 0.000_88).collect();
        let mut worst = 0f64;
        for &x in &xs {
            let (e, r) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((e - r) / r).abs());
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!((exp(-100.0), exp(-87.34)), (0.0, 0.0));
        assert!(exp(-87.33).is_normal() && exp(88.7).is_finite() && exp(1000.0).is_finite());
        // The AVX2 build of a loop gives the scalar build's bits.
        multiversion! {
            fn exp_all(x: &mut [f32]) {
                x.iter_mut().for_each(|x| *x = exp(*x));
            }
        }
        let mut wide = xs.clone();
        exp_all(&mut wide);
        for (&x, &w) in xs.iter().zip(&wide) {
            assert_eq!(
                std::hint::black_box(exp)(x).to_bits(),
                w.to_bits(),
                "at {x}"
            );
        }
    }
}
