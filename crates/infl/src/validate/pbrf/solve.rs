//! The proximal Bregman response function's optimisation, independent of the model: the
//! [`Problem`] a model provides (the Bregman term and the sequence's loss, with gradients), the
//! minimiser of the proximal objective ([`minimise`]: L-BFGS from θ^s with an Armijo
//! backtracking line search on the gradients, stopped on the gradient norm), and the PBRF influence as a central
//! difference of the measurements over ±ε ([`response`]).
//!
//! With δ = θ − θ^s, the objective minimised for training sequence m is
//! `Φ_ε(δ) = B(δ) − ε (L_m(θ^s + δ) − L_m(θ^s)) + ½ Σ_i λ_i δ_i²`, where
//! `B(δ) = (1/N) Σ_z D(h(θ^s + δ, z), h(θ^s, z))` is the mean Bregman divergence of the outputs.
//! At δ = 0, B and its gradient vanish, so the first step moves along `ε ∇L_m`; the response's
//! first-order term is `ε (G + λ)⁻¹ ∇L_m` with G the Gauss-Newton of B, and the PBRF influence
//! `(f(r(ε)) − f(r(−ε))) / 2ε = ∇fᵀ (G + λ)⁻¹ ∇L_m + O(ε²)` is `infl score`'s `I(q, m)`.

use crate::error::{Error, Result};

/// What the PBRF needs from a model, at parameters `θ^s + δ` (δ over the optimised parameters).
pub trait Problem {
    /// The number of optimised parameters (the length of δ).
    fn dim(&self) -> usize;
    /// The proximal weight λ_i of each parameter.
    fn damping(&self) -> &[f64];
    /// The gradient in δ of `B(δ) − ε L_m(θ^s + δ)` (the optimiser needs no values: see
    /// [`decrease`]).
    fn gradient(&mut self, delta: &[f64], m: usize, epsilon: f64) -> Result<Vec<f64>>;
    /// Every query's measurement `f_q(θ^s + δ)`.
    fn measure(&mut self, delta: &[f64]) -> Result<Vec<f64>>;
}

/// When the minimiser stops.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SolveOptions {
    /// At most this many L-BFGS steps (each one gradient evaluation, more when it backtracks).
    pub max_steps: usize,
    /// Converged when `‖∇Φ(δ)‖ ≤ tolerance · ‖∇Φ(0)‖` (`‖∇Φ(0)‖ = ε ‖∇L_m‖`).
    pub tolerance: f64,
    /// Pairs (s, y) L-BFGS keeps.
    pub memory: usize,
}

impl Default for SolveOptions {
    fn default() -> Self {
        SolveOptions {
            max_steps: 200,
            tolerance: 1e-4,
            memory: 20,
        }
    }
}

/// How one minimisation ended.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Solution {
    pub steps: usize,
    /// Objective evaluations (with gradient), the line search's included.
    pub evaluations: usize,
    /// `‖∇Φ‖ / ‖∇Φ(0)‖` at the end.
    pub gradient_norm: f64,
    pub converged: bool,
    /// `‖δ‖` at the end.
    pub displacement: f64,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `Φ_ε(α) − Φ_ε(0)` along a line from its slopes at both ends (`φ'(0) = slope`,
/// `φ'(α) = slope_at`): the trapezoid rule, exact on a quadratic. Near the optimum Φ changes by
/// less than the f32 rounding of its value, while its gradient stays accurate relative to its
/// size: the line search compares gradients, not values.
fn decrease(slope: f64, slope_at: f64, alpha: f64) -> f64 {
    0.5 * alpha * (slope + slope_at)
}

/// The gradient of `Φ_ε(δ)`: the problem's terms plus the proximal one.
fn objective(problem: &mut dyn Problem, delta: &[f64], m: usize, epsilon: f64) -> Result<Vec<f64>> {
    let mut grad = problem.gradient(delta, m, epsilon)?;
    let lam = problem.damping();
    for ((g, d), l) in grad.iter_mut().zip(delta).zip(lam) {
        *g += l * d;
    }
    if grad.iter().any(|g| !g.is_finite()) {
        return Err(Error::NonFinite(format!(
            "the PBRF objective's gradient became non-finite while optimising for sequence {m}; \
             use a smaller --epsilon"
        )));
    }
    Ok(grad)
}

/// L-BFGS's two-loop recursion: `−H g`, with H the inverse-Hessian estimate from the pairs
/// (s, y, 1/sᵀy); with no pairs `H = diag(1/λ)`, the inverse of the proximal term's curvature
/// (the objective is at least that curved, so the first step is at most too long).
fn direction(g: &[f64], pairs: &[(Vec<f64>, Vec<f64>, f64)], lam: &[f64]) -> Vec<f64> {
    let mut q = g.to_vec();
    let mut alphas = Vec::with_capacity(pairs.len());
    for (s, y, rho) in pairs.iter().rev() {
        let a = rho * dot(s, &q);
        for (qi, yi) in q.iter_mut().zip(y) {
            *qi -= a * yi;
        }
        alphas.push(a);
    }
    match pairs.last() {
        Some((s, y, _)) => {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|x| *x *= gamma);
        }
        None => q.iter_mut().zip(lam).for_each(|(x, l)| *x /= l),
    }
    for ((s, y, rho), a) in pairs.iter().zip(alphas.into_iter().rev()) {
        let b = rho * dot(y, &q);
        for (qi, si) in q.iter_mut().zip(s) {
            *qi += (a - b) * si;
        }
    }
    q.iter_mut().for_each(|x| *x = -*x);
    q
}

/// Minimises `Φ_ε` from δ = 0 (θ^s). Returns δ and how the minimisation ended. It stops early,
/// unconverged, when the line search finds no decrease (the objective's rounding floor).
pub fn minimise(
    problem: &mut dyn Problem,
    m: usize,
    epsilon: f64,
    options: &SolveOptions,
) -> Result<(Vec<f64>, Solution)> {
    let lam = problem.damping().to_vec();
    if lam.len() != problem.dim() || lam.iter().any(|l| !(*l > 0.0 && l.is_finite())) {
        return Err(Error::input(
            "the PBRF needs a positive, finite damping λ on every parameter",
        ));
    }
    let mut x = vec![0.0; problem.dim()];
    let mut g = objective(problem, &x, m, epsilon)?;
    let g0 = dot(&g, &g).sqrt();
    let mut solution = Solution {
        steps: 0,
        evaluations: 1,
        gradient_norm: 0.0,
        converged: true,
        displacement: 0.0,
    };
    if g0 == 0.0 {
        return Ok((x, solution));
    }
    let mut pairs: Vec<(Vec<f64>, Vec<f64>, f64)> = Vec::new();
    solution.converged = false;
    while solution.steps < options.max_steps {
        if dot(&g, &g).sqrt() <= options.tolerance * g0 {
            solution.converged = true;
            break;
        }
        let mut d = direction(&g, &pairs, &lam);
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            pairs.clear();
            d = direction(&g, &pairs, &lam);
            slope = dot(&g, &d);
        }
        // Armijo backtracking from the full step, on the decrease the gradients predict.
        let mut alpha = 1.0;
        let mut accepted = None;
        for _ in 0..40 {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(xi, di)| xi + alpha * di).collect();
            let gn = objective(problem, &xn, m, epsilon)?;
            solution.evaluations += 1;
            if decrease(slope, dot(&gn, &d), alpha) <= 1e-4 * alpha * slope {
                accepted = Some((xn, gn));
                break;
            }
            alpha *= 0.5;
        }
        let Some((xn, gn)) = accepted else {
            break;
        };
        let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        // Only pairs with positive curvature keep the estimate positive definite.
        if sy > 1e-12 * dot(&y, &y).max(f64::MIN_POSITIVE) {
            pairs.push((s, y, 1.0 / sy));
            if pairs.len() > options.memory.max(1) {
                pairs.remove(0);
            }
        }
        (x, g) = (xn, gn);
        solution.steps += 1;
    }
    solution.gradient_norm = dot(&g, &g).sqrt() / g0;
    solution.converged |= solution.gradient_norm <= options.tolerance;
    solution.displacement = dot(&x, &x).sqrt();
    Ok((x, solution))
}

/// One training sequence's PBRF influence on every query.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Response {
    /// `(f_q(r(ε)) − f_q(r(−ε))) / 2ε` per query: `infl score`'s sign and scale (positive:
    /// down-weighting the sequence raises f_q, so it supports the completion).
    pub influence: Vec<f64>,
    /// `(f_q(r(ε)) + f_q(r(−ε)) − 2 f_q(θ^s)) / 2ε` per query: the second-order part the central
    /// difference cancels, relative to which the influence is read (small: the response is
    /// linear in ε there).
    pub curvature: Vec<f64>,
    pub plus: Solution,
    pub minus: Solution,
}

/// The PBRF influence of training sequence m: Φ minimised at +ε and at −ε, the measurements
/// differenced. `base` holds the measurements at θ^s.
pub fn response(
    problem: &mut dyn Problem,
    m: usize,
    epsilon: f64,
    options: &SolveOptions,
    base: &[f64],
) -> Result<Response> {
    if !(epsilon > 0.0 && epsilon.is_finite()) {
        return Err(Error::usage(format!(
            "--epsilon must be a positive number (got {epsilon})"
        )));
    }
    let (up, plus) = minimise(problem, m, epsilon, options)?;
    let f_up = problem.measure(&up)?;
    let (down, minus) = minimise(problem, m, -epsilon, options)?;
    let f_down = problem.measure(&down)?;
    let influence = f_up
        .iter()
        .zip(&f_down)
        .map(|(a, b)| (a - b) / (2.0 * epsilon))
        .collect();
    let curvature = f_up
        .iter()
        .zip(&f_down)
        .zip(base)
        .map(|((a, b), c)| (a + b - 2.0 * c) / (2.0 * epsilon))
        .collect();
    Ok(Response {
        influence,
        curvature,
        plus,
        minus,
    })
}
