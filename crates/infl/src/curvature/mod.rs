//! Curvature stage: KFAC covariances A and S, their eigenbases, and the EK-FAC eigenvalue
//! correction Λ, accumulated from the (a, g) taps of the model stage.
//!
//! Conventions (docs/math.md; identical to kronfluence 1.0.1):
//! - `A = (1/N_tok) Σ_t ā_t ā_tᵀ`, `S = (1/N_tok) Σ_t g_t g_tᵀ`, N_tok counting every real token,
//!   the last of each sequence too (its g is zero); ā = [a, 1] for layers with a bias.
//! - Eigendecompositions in f64; eigenvectors then rounded to f32 and used as stored.
//! - EK-FAC `Λ = (1/N_seq) Σ_n (Q_Sᵀ G_n Q_A)^∘2`, G_n = Σ_t g_t ā_tᵀ the summed gradient of
//!   sequence n. Diagonal: `(1/N_seq) Σ_n G_n^∘2` in the original basis. KFAC: `Λ = λ_S λ_Aᵀ`.
//!
//! One idea per file: `strategy` (what a fit computes), `statistics` (the sums a pass adds
//! batches to), `passes` (running them over sequences), `eigen` (sums to factors), `factors`
//! (the factors and their tensors), [`device`] (the statistics on a GPU) and [`format`] (the
//! factors directory); [`gauss_newton`] the exact Gauss-Newton-vector products of the refined
//! inverse. The batch loop under every pass is [`crate::pass`]'s.

pub mod device;
mod eigen;
mod factors;
pub mod format;
pub mod gauss_newton;
mod passes;
mod statistics;
mod strategy;

pub use eigen::{eigendecompose, empty_factors, set_lambda};
pub use factors::{layer_summary, Eigenbasis, Factors, LayerFactors};
pub use passes::{accumulate_sequences, fit, pass_labels, run_pass};
pub use statistics::{
    accumulate, accumulate_keeping, statistics_flops, PassSums, RotatedTokens, Sums,
};
pub use strategy::{Fisher, Pass, Strategy};
