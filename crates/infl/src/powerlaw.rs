//! The heavy tail of influence: a continuous power-law fit by the method of Clauset, Shalizi and
//! Newman (2009, "Power-law distributions in empirical data"), and how concentrated the positive
//! influence is.
//!
//! For each candidate lower bound x_min the exponent is the maximum-likelihood estimate
//! α̂ = 1 + n / Σ ln(x_i / x_min) over the n values ≥ x_min; x_min is the candidate whose fitted
//! tail is closest to the data in Kolmogorov–Smirnov distance. The standard error is
//! (α̂ − 1)/√n, and the goodness-of-fit p-value comes from CSN's semi-parametric bootstrap
//! (synthetic samples: the body resampled from the data below x_min, the tail drawn from the
//! fitted power law; each refitted with its own x_min; p = share whose KS distance is at least
//! the data's). A small p (< 0.1, CSN's threshold) rules the power law out.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// Settings of [`fit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitOptions {
    /// Synthetic samples of the goodness-of-fit bootstrap (0: no p-value).
    pub bootstrap: usize,
    /// Seed of the bootstrap's random numbers (the p-value is deterministic given it).
    pub seed: u64,
    /// At most this many x_min candidates, spread evenly over the distinct values (speed).
    pub max_candidates: usize,
    /// Candidates leaving fewer values than this in the tail are not considered.
    pub min_tail: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            bootstrap: 200,
            seed: 0,
            max_candidates: 100,
            min_tail: 10,
        }
    }
}

/// A fitted power-law tail p(x) ∝ x^(−α) for x ≥ x_min.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PowerLawFit {
    pub alpha: f64,
    /// Standard error of α: (α − 1)/√n_tail.
    pub alpha_se: f64,
    pub x_min: f64,
    /// Values ≥ x_min (the fitted tail).
    pub n_tail: usize,
    /// Values in the sample.
    pub n: usize,
    /// KS distance between the tail's empirical CDF and the fitted one.
    pub ks: f64,
    /// Goodness-of-fit p-value (None when no bootstrap was run).
    pub p_value: Option<f64>,
    /// Bootstrap replicates behind `p_value`.
    pub bootstrap: usize,
}

/// Tails with fewer values than this leave the goodness-of-fit test little power: a fit that
/// is not ruled out may still not be a power law (CSN 2009, §4: with n ≲ 50 the test rarely
/// rejects even clearly different distributions), so its α is shown with that caveat.
pub const MIN_TESTABLE_TAIL: usize = 50;

/// What the goodness-of-fit test says about a fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// p < 0.1: the power law is ruled out (α means nothing then).
    RuledOut(f64),
    /// p ≥ 0.1: consistent with a power law.
    Consistent(f64),
    /// No bootstrap was run.
    NotTested,
}

impl PowerLawFit {
    /// The test's verdict (CSN's threshold p < 0.1 rules the power law out).
    pub fn verdict(&self) -> Verdict {
        match self.p_value {
            Some(p) if p < 0.1 => Verdict::RuledOut(p),
            Some(p) => Verdict::Consistent(p),
            None => Verdict::NotTested,
        }
    }

    /// Whether the tail is too small for the verdict to mean much ([`MIN_TESTABLE_TAIL`]).
    pub fn sample_too_small(&self) -> bool {
        self.n_tail < MIN_TESTABLE_TAIL
    }

    /// α only with its verdict, and the small-sample caveat where it applies: what the report
    /// and the terminal show of a fit.
    pub fn verdict_line(&self) -> String {
        let alpha = format!("α = {:.2} ± {:.2}", self.alpha, self.alpha_se);
        let line = match self.verdict() {
            Verdict::RuledOut(p) => return format!("power law ruled out (p = {p:.3})"),
            Verdict::Consistent(p) => format!("{alpha}, consistent with a power law (p = {p:.3})"),
            Verdict::NotTested => format!("{alpha}, goodness of fit not tested"),
        };
        match self.sample_too_small() {
            true => format!(
                "{line}; sample too small to tell ({} tail values, fewer than {MIN_TESTABLE_TAIL})",
                self.n_tail
            ),
            false => line,
        }
    }
}

/// Fits a continuous power law to the tail of `sample` (positive, finite values; any order).
pub fn fit(sample: &[f64], opts: &FitOptions) -> Result<PowerLawFit> {
    if let Some(bad) = sample.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        return Err(Error::input(format!(
            "power-law fit: the sample must hold positive finite values; found {bad}"
        )));
    }
    let mut xs = sample.to_vec();
    xs.sort_by(f64::total_cmp);
    let best = fit_sorted(&xs, opts)?;
    let p_value = (opts.bootstrap > 0).then(|| bootstrap_p(&xs, &best, opts));
    Ok(PowerLawFit {
        p_value,
        bootstrap: opts.bootstrap,
        ..best
    })
}

/// The fit without a p-value; `xs` sorted ascending, all positive.
fn fit_sorted(xs: &[f64], opts: &FitOptions) -> Result<PowerLawFit> {
    let n = xs.len();
    let min_tail = opts.min_tail.max(2);
    if n < min_tail {
        return Err(Error::input(format!(
            "power-law fit: {n} values are too few (at least {min_tail} are needed)"
        )));
    }
    // Start of each run of equal values: the distinct x_min candidates, in index order.
    let starts: Vec<usize> = (0..n)
        .filter(|&i| (i == 0 || xs[i] != xs[i - 1]) && n - i >= min_tail)
        .collect();
    if starts.is_empty() {
        return Err(Error::input(
            "power-law fit: every candidate x_min leaves too few values in the tail",
        ));
    }
    let cap = opts.max_candidates.max(1);
    let candidates: Vec<usize> = if starts.len() <= cap {
        starts
    } else {
        let mut c: Vec<usize> = (0..cap)
            .map(|j| starts[j * (starts.len() - 1) / (cap - 1).max(1)])
            .collect();
        c.dedup();
        c
    };
    // Suffix sums of ln x: Σ_{j ≥ i} ln x_j.
    let mut suffix = vec![0.0; n + 1];
    for i in (0..n).rev() {
        suffix[i] = suffix[i + 1] + xs[i].ln();
    }
    let mut best: Option<PowerLawFit> = None;
    for &i in &candidates {
        let x_min = xs[i];
        let m = n - i;
        let denom = suffix[i] - m as f64 * x_min.ln();
        if denom <= 0.0 {
            continue; // every tail value equals x_min: no exponent
        }
        let alpha = 1.0 + m as f64 / denom;
        let ks = ks_distance(&xs[i..], x_min, alpha);
        if best.as_ref().is_none_or(|b| ks < b.ks) {
            best = Some(PowerLawFit {
                alpha,
                alpha_se: (alpha - 1.0) / (m as f64).sqrt(),
                x_min,
                n_tail: m,
                n,
                ks,
                p_value: None,
                bootstrap: 0,
            });
        }
    }
    best.ok_or_else(|| {
        Error::input("power-law fit: the sample has too few distinct values to fit a tail")
    })
}

/// KS distance between the empirical CDF of `tail` (sorted ascending, all ≥ x_min) and the
/// power-law CDF F(x) = 1 − (x/x_min)^(1−α).
pub fn ks_distance(tail: &[f64], x_min: f64, alpha: f64) -> f64 {
    let m = tail.len() as f64;
    let mut d: f64 = 0.0;
    let mut i = 0;
    while i < tail.len() {
        // A run of ties jumps the empirical CDF from i/m to j/m at once.
        let mut j = i + 1;
        while j < tail.len() && tail[j] == tail[i] {
            j += 1;
        }
        let f = 1.0 - (tail[i] / x_min).powf(1.0 - alpha);
        d = d
            .max((f - i as f64 / m).abs())
            .max((f - j as f64 / m).abs());
        i = j;
    }
    d
}

/// CSN's semi-parametric bootstrap p-value of `best` for the sorted sample `xs`.
fn bootstrap_p(xs: &[f64], best: &PowerLawFit, opts: &FitOptions) -> f64 {
    let n = xs.len();
    let body = &xs[..n - best.n_tail];
    let p_tail = best.n_tail as f64 / n as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let inner = FitOptions {
        bootstrap: 0,
        ..*opts
    };
    let mut at_least = 0usize;
    let mut synthetic = Vec::with_capacity(n);
    for _ in 0..opts.bootstrap {
        synthetic.clear();
        for _ in 0..n {
            if body.is_empty() || rng.random::<f64>() < p_tail {
                let u: f64 = rng.random();
                synthetic.push(best.x_min * (1.0 - u).powf(-1.0 / (best.alpha - 1.0)));
            } else {
                synthetic.push(body[rng.random_range(0..body.len())]);
            }
        }
        synthetic.sort_by(f64::total_cmp);
        // A synthetic sample that cannot be fitted counts as a worse fit than the data's.
        match fit_sorted(&synthetic, &inner) {
            Ok(f) if f.ks < best.ks => {}
            _ => at_least += 1,
        }
    }
    at_least as f64 / opts.bootstrap as f64
}

/// How many sequences hold half of the total positive influence.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", content = "sequences", rename_all = "snake_case")]
pub enum HalfMass {
    /// Exactly this many of the largest positive scores sum to at least half of the total.
    Exactly(usize),
    /// The recorded tail (this many values) holds less than half: more sequences are needed.
    MoreThan(usize),
    /// There is no positive influence at all.
    NoPositive,
}

/// The smallest number of sequences whose positive scores sum to at least half of `sum_pos`
/// (the sum of every positive score), given the largest positive scores in descending order.
pub fn mass_concentration(sum_pos: f64, tail_desc: &[f64]) -> HalfMass {
    if sum_pos.is_nan() || sum_pos <= 0.0 {
        return HalfMass::NoPositive;
    }
    let half = sum_pos / 2.0;
    let mut acc = 0.0;
    for (i, &x) in tail_desc.iter().enumerate() {
        acc += x;
        // A relative tolerance: the tail and sum_pos are accumulated in different orders.
        if acc >= half * (1.0 - 1e-12) {
            return HalfMass::Exactly(i + 1);
        }
    }
    HalfMass::MoreThan(tail_desc.len())
}

impl std::fmt::Display for HalfMass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HalfMass::Exactly(1) => write!(f, "half of the positive influence is held by 1 sequence"),
            HalfMass::Exactly(k) => write!(f, "half of the positive influence is held by {k} sequences"),
            HalfMass::MoreThan(k) => write!(
                f,
                "half of the positive influence needs more than the {k} largest scores recorded (too short a tail to tell exactly)"
            ),
            HalfMass::NoPositive => write!(f, "no training sequence has positive influence"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_exponent() {
        // Tail {1, e, e²} above x_min = 1: Σ ln(x/x_min) = 0 + 1 + 2 = 3, α = 1 + 3/3 = 2.
        let e = std::f64::consts::E;
        let opts = FitOptions {
            bootstrap: 0,
            min_tail: 3,
            ..FitOptions::default()
        };
        let f = fit(&[e, 1.0, e * e], &opts).unwrap();
        assert_eq!(f.x_min, 1.0);
        assert_eq!(f.n_tail, 3);
        assert!((f.alpha - 2.0).abs() < 1e-12, "{f:?}");
        assert!((f.alpha_se - 1.0 / 3f64.sqrt()).abs() < 1e-12);
        // F(x) = 1 − 1/x: F(1)=0, F(e)=0.632, F(e²)=0.865; steps 0,1/3,2/3,1.
        // max(|0−0|,|0−1/3|,|.632−1/3|,|.632−2/3|,|.865−2/3|,|.865−1|) = 0.3333 (at x = 1).
        assert!((f.ks - 1.0 / 3.0).abs() < 1e-12, "{}", f.ks);
        assert_eq!(f.p_value, None);
    }

    #[test]
    fn ks_of_exact_quantiles_is_one_step() {
        // Quantiles of the α = 3 law at (i + 0.5)/m: the KS distance is exactly 1/(2m).
        let m = 40;
        let tail: Vec<f64> = (0..m)
            .map(|i| (1.0 - (i as f64 + 0.5) / m as f64).powf(-0.5))
            .collect();
        let d = ks_distance(&tail, 1.0, 3.0);
        assert!((d - 0.5 / m as f64).abs() < 1e-12, "{d}");
    }

    #[test]
    fn bad_samples_are_refused() {
        let o = FitOptions::default();
        assert!(fit(&[1.0, -2.0], &o).is_err());
        assert!(fit(&[1.0, f64::NAN], &o).is_err());
        assert!(fit(&[1.0; 3], &o).is_err()); // too few
        assert!(fit(&[2.0; 50], &o).is_err()); // no spread
    }

    #[test]
    fn half_mass() {
        assert_eq!(
            mass_concentration(10.0, &[4.0, 1.0, 1.0]),
            HalfMass::Exactly(2)
        );
        assert_eq!(mass_concentration(10.0, &[5.0, 1.0]), HalfMass::Exactly(1));
        assert_eq!(mass_concentration(10.0, &[2.0, 2.0]), HalfMass::MoreThan(2));
        assert_eq!(mass_concentration(0.0, &[]), HalfMass::NoPositive);
        assert!(HalfMass::Exactly(3).to_string().contains("3 sequences"));
    }

    #[test]
    fn alpha_is_shown_only_with_its_verdict_and_the_small_sample_caveat() {
        let fit = |p: Option<f64>, n_tail: usize| PowerLawFit {
            alpha: 2.5,
            alpha_se: 0.25,
            x_min: 1.0,
            n_tail,
            n: 100,
            ks: 0.05,
            p_value: p,
            bootstrap: 200,
        };
        assert_eq!(
            fit(Some(0.005), 22).verdict_line(),
            "power law ruled out (p = 0.005)"
        );
        assert_eq!(
            fit(Some(0.4), 80).verdict_line(),
            "α = 2.50 ± 0.25, consistent with a power law (p = 0.400)"
        );
        assert_eq!(
            fit(Some(0.4), 22).verdict_line(),
            "α = 2.50 ± 0.25, consistent with a power law (p = 0.400); sample too small to tell (22 tail values, fewer than 50)"
        );
        assert_eq!(fit(None, 80).verdict(), Verdict::NotTested);
        // A real fit of 22 exact power-law quantiles: not ruled out, but too small to tell.
        let sample: Vec<f64> = (0..22)
            .map(|i| (1.0 - (i as f64 + 0.5) / 22.0).powf(-1.0 / 1.5))
            .collect();
        let f = fit_with(&sample);
        assert!(f.sample_too_small() && f.verdict_line().contains("sample too small"));
    }

    fn fit_with(sample: &[f64]) -> PowerLawFit {
        fit(sample, &FitOptions::default()).unwrap()
    }
}
