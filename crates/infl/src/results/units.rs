//! What a score means in numbers a person can read: the predicted change of the query's
//! −log p(completion | prompt) if a training sequence (or a group of them) were removed from
//! training ([`RemovalScale`]), and a score's percentile among the query's scores
//! ([`Distribution::percentile`]). docs/math.md derives the scale.

use super::Distribution;
use super::TAIL_SIZE;
use crate::curvature::Strategy;
use crate::options::Normalize;
use crate::provenance::CorpusInfo;

/// Turns a score into the predicted change of −log p(completion | prompt), in nats, when its
/// training sequence is removed: `+score / divisor`. The divisor is the size of the set the
/// curvature averages over: training sequences for EK-FAC and the diagonal (per-sequence
/// Fisher), training tokens for KFAC (per-token Fisher), both as counted by the fit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RemovalScale {
    /// N: the number of training sequences (or tokens) the factors were fitted on.
    pub divisor: f64,
    /// What `divisor` counts: `sequences` or `tokens`.
    pub counts: String,
}

impl RemovalScale {
    /// The scale of scores made with `strategy` and `normalize` on factors fitted on
    /// `fitted_on`; none where the score has no such meaning (identity: no curvature; cosine:
    /// a ratio) or the fit corpus is empty.
    pub fn of(strategy: Strategy, normalize: Normalize, fitted_on: &CorpusInfo) -> Option<Self> {
        if normalize != Normalize::None {
            return None;
        }
        let (n, counts) = match strategy {
            Strategy::Ekfac | Strategy::EkfacRefined | Strategy::Diagonal => {
                (fitted_on.n_sequences, "sequences")
            }
            Strategy::Kfac => (fitted_on.n_tokens, "tokens"),
            Strategy::Identity => return None,
        };
        (n > 0).then(|| RemovalScale {
            divisor: n as f64,
            counts: counts.into(),
        })
    }

    /// The predicted change of −log p(completion | prompt), nats, when sequences whose scores
    /// sum to `score` are removed from training: positive means the completion becomes less
    /// likely (the sequences supported it).
    pub fn removal_change(&self, score: f64) -> f64 {
        score / self.divisor
    }
}

/// How the units are written in `meta.json`'s `removal` (and shown by `infl report`).
pub const REMOVAL_CONVENTION: &str = "removal_change = score / N: the predicted change of -log p(completion|prompt), in nats, if the sequence were removed from training (group_removal_change: ranks 1..rank of its list removed together); positive = removing it makes the completion less likely; N = the training sequences (EK-FAC, diagonal) or tokens (KFAC) the factors were fitted on";

impl Distribution {
    /// The percentile of `score` among the query's scores: 100 × the share of the scored
    /// sequences whose score is at most `score` (the top sequence is at 100). Exact for any
    /// score inside the kept tails (the [`TAIL_SIZE`] largest of each sign, so every top-k and
    /// bottom-k entry with k ≤ [`TAIL_SIZE`]) and for zero; beyond the tails it is read from the
    /// magnitude sketch, counting half of the score's bucket; None without a sketch there.
    pub fn percentile(&self, score: f64) -> Option<f64> {
        if self.count == 0 || !score.is_finite() {
            return None;
        }
        let n = self.count as f64;
        let at_most = if score > 0.0 {
            n - self.above_positive(score)?
        } else if score < 0.0 {
            self.at_or_below_negative(-score)?
        } else {
            let sketch = self.sketch.as_ref()?;
            (sketch.negative.values().sum::<u64>() + sketch.zeros) as f64
        };
        Some(100.0 * at_most / n)
    }

    /// How many scores exceed the positive `s`.
    fn above_positive(&self, s: f64) -> Option<f64> {
        match within_tail(&self.tail_pos, s) {
            true => Some(self.tail_pos.iter().filter(|x| **x > s).count() as f64),
            false => {
                let sketch = self.sketch.as_ref()?;
                Some(beyond_in_sketch(&sketch.positive, s))
            }
        }
    }

    /// How many scores are at or below the negative `-m` (magnitude at least `m`).
    fn at_or_below_negative(&self, m: f64) -> Option<f64> {
        match within_tail(&self.tail_neg, m) {
            true => Some(self.tail_neg.iter().filter(|x| **x >= m).count() as f64),
            false => {
                let sketch = self.sketch.as_ref()?;
                Some(beyond_in_sketch(&sketch.negative, m))
            }
        }
    }
}

/// Whether every magnitude ≥ `m` of this sign is in `tail` (descending): the tail holds all of
/// them when it is not full, else everything down to its last value.
fn within_tail(tail: &[f64], m: f64) -> bool {
    tail.len() < TAIL_SIZE || tail.last().is_some_and(|last| m >= *last)
}

/// Magnitudes above `m` in a sketch: the buckets above m's, and half of its own bucket.
fn beyond_in_sketch(buckets: &std::collections::BTreeMap<i32, u64>, m: f64) -> f64 {
    let own = super::MagnitudeSketch::bucket(m);
    let above: u64 = buckets.range(own + 1..).map(|(_, c)| c).sum();
    let same = buckets.get(&own).copied().unwrap_or(0);
    above as f64 + same as f64 / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(n_sequences: usize, n_tokens: usize) -> CorpusInfo {
        CorpusInfo {
            path: "c.jsonl".into(),
            sha256: String::new(),
            max_len: 8,
            n_documents: n_sequences,
            n_sequences,
            n_tokens,
        }
    }

    #[test]
    fn removal_scale_divides_by_what_the_curvature_averages_over() {
        let c = corpus(40, 1000);
        let ekfac = RemovalScale::of(Strategy::Ekfac, Normalize::None, &c).unwrap();
        assert_eq!((ekfac.divisor, ekfac.counts.as_str()), (40.0, "sequences"));
        assert_eq!(ekfac.removal_change(2.0), 0.05);
        let kfac = RemovalScale::of(Strategy::Kfac, Normalize::None, &c).unwrap();
        assert_eq!((kfac.divisor, kfac.counts.as_str()), (1000.0, "tokens"));
        assert_eq!(
            RemovalScale::of(Strategy::Diagonal, Normalize::None, &c).map(|s| s.divisor),
            Some(40.0)
        );
        assert!(RemovalScale::of(Strategy::Identity, Normalize::None, &c).is_none());
        assert!(RemovalScale::of(Strategy::Ekfac, Normalize::Cosine, &c).is_none());
        assert!(RemovalScale::of(Strategy::Ekfac, Normalize::None, &corpus(0, 0)).is_none());
    }

    /// docs/math.md's hand-worked case: one parameter, L_z = ½(θ − y_z)², f = ½(θ − t)²,
    /// J = (1/N) Σ L_z, so θ* = mean(y), H = 1 and I(q, z) = (θ* − t)(θ* − y_z). Removing z
    /// and re-solving exactly changes f by I/(N − 1) + O(1/N²): the prediction I/N is within
    /// a relative 1/N plus the second-order term.
    #[test]
    fn removal_change_predicts_a_quadratic_models_exact_removal() {
        let y: Vec<f64> = (0..50)
            .map(|i| ((i * 37) % 11) as f64 * 0.3 - 1.0)
            .collect();
        let n = y.len();
        let t = 2.0;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let theta = mean(&y);
        let f = |th: f64| 0.5 * (th - t) * (th - t);
        let scale = RemovalScale::of(Strategy::Ekfac, Normalize::None, &corpus(n, 10 * n)).unwrap();
        for z in [0, 7, 23] {
            let score = (theta - t) * (theta - y[z]);
            let rest: Vec<f64> = (0..n).filter(|&i| i != z).map(|i| y[i]).collect();
            let measured = f(mean(&rest)) - f(theta);
            let predicted = scale.removal_change(score);
            assert!(predicted.signum() == measured.signum(), "z {z}");
            let rel = (predicted - measured).abs() / measured.abs();
            assert!(
                rel < 2.5 / n as f64,
                "z {z}: {predicted} vs {measured} ({rel})"
            );
        }
    }

    #[test]
    fn percentiles_are_exact_in_the_tails_and_from_the_sketch_beyond() {
        // 10 scores: -3, -1, 0, 0.5, 1, 2, 2.5, 4, 8, 9.
        let row = [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 2.5, 4.0, 8.0, 9.0];
        let mut d = Distribution::from_scores("q", &row);
        let mut sketch = super::super::MagnitudeSketch::default();
        row.iter().for_each(|x| sketch.push(*x));
        d.sketch = Some(sketch);
        assert_eq!(d.percentile(9.0), Some(100.0));
        assert_eq!(d.percentile(8.0), Some(90.0));
        assert_eq!(d.percentile(0.5), Some(40.0));
        assert_eq!(d.percentile(0.0), Some(30.0));
        assert_eq!(d.percentile(-1.0), Some(20.0));
        assert_eq!(d.percentile(-3.0), Some(10.0));

        // A full positive tail of TAIL_SIZE values 1..=TAIL_SIZE above 1000 smaller ones: a
        // score below the tail is read from the sketch.
        let small: Vec<f64> = (0..1000)
            .map(|i| 0.001 * (1.0 + i as f64 / 1000.0))
            .collect();
        let big: Vec<f64> = (1..=TAIL_SIZE).map(|i| i as f64).collect();
        let all: Vec<f64> = small.iter().chain(&big).copied().collect();
        let mut d = Distribution::from_scores("q", &all);
        let mut sketch = super::super::MagnitudeSketch::default();
        all.iter().for_each(|x| sketch.push(*x));
        d.sketch = Some(sketch);
        let n = all.len() as f64;
        // In the tail: exact.
        assert_eq!(
            d.percentile(1.0),
            Some(100.0 * (n - (TAIL_SIZE - 1) as f64) / n)
        );
        // Below it: 501 of the small ones (i = 0..=500) lie at or below 0.0015.
        let exact = 100.0 * 501.0 / n;
        let got = d.percentile(0.0015).unwrap();
        // Within the count of one sketch bucket (a factor 2^(1/16) ≈ 4.4% of 0.0015 holds ~66).
        assert!((got - exact).abs() < 100.0 * 70.0 / n, "{got} vs {exact}");
        // Without a sketch the percentile beyond the tail is unknown.
        d.sketch = None;
        assert_eq!(d.percentile(0.0015), None);
    }
}
