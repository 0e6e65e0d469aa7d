//! From a pass's sums to factors: the covariances normalised and eigendecomposed (after the
//! covariance pass), Λ normalised (after the eigenvalue pass), and factors with neither.

use super::{Eigenbasis, LayerFactors, PassSums, Sums};
use crate::error::{Error, Result};
use crate::linalg::{self, Lower};
use crate::model::TrackedLayer;
use crate::pass::Progress;
use faer::Mat;
use rayon::prelude::*;

/// Normalised covariances and their eigendecompositions from the (merged) covariance sums:
/// the factors of a KFAC fit, and the bases of an EK-FAC one. Layers run in parallel, each
/// decomposition on one thread (the same computation whatever the thread count). The sums are
/// consumed: each layer's f64 sums are normalised in place and freed once decomposed, so the
/// f32 factors replace them rather than join them (the fit's peak would otherwise hold both).
/// `progress` counts the layers decomposed (a 1B model's take tens of minutes).
pub fn eigendecompose(
    tracked: &[TrackedLayer],
    cov: PassSums,
    progress: &dyn Progress,
) -> Result<Vec<LayerFactors>> {
    let norm = 1.0 / cov.n_tokens.max(1) as f64;
    let (n_tokens, n_sequences) = (cov.n_tokens, cov.n_sequences);
    let Sums::Covariance(grams) = cov.sums else {
        return Err(Error::Other(
            "eigendecompose takes the covariance pass's sums".into(),
        ));
    };
    let mut grams = grams.into_iter();
    let pairs: Vec<(Lower, Lower)> =
        std::iter::from_fn(|| Some((grams.next()?, grams.next()?))).collect();
    progress.begin_in("eigendecompositions", tracked.len() as u64, "layers");
    let layers = tracked
        .par_iter()
        .zip(pairs.into_par_iter())
        .map(|(l, (a, s))| {
            // The packed triangles (linalg::add_gram) become whole normalised matrices, one
            // at a time so that a layer never holds both forms of both.
            let a = expand(a, norm);
            let s = expand(s, norm);
            let eig = |m: &Mat<f64>, which: &str| {
                linalg::eigh(m).map_err(|e| Error::Other(format!("layer {} {which}: {e}", l.name)))
            };
            let (ea, es) = rayon::join(|| eig(&a, "A"), || eig(&s, "S"));
            let ((eigvals_a, q_a), (eigvals_s, q_s)) = (ea?, es?);
            let factors = LayerFactors {
                layer: l.clone(),
                n_tokens,
                n_sequences,
                covariance: Some((linalg::to_f32(&a), linalg::to_f32(&s))),
                eigen: Some(Eigenbasis {
                    eigvals_a,
                    q_a: linalg::to_f32(&q_a),
                    eigvals_s,
                    q_s: linalg::to_f32(&q_s),
                }),
                lambda: None,
            };
            // The layer's f64 sums and the solver's workspaces, freed here, are sizes the
            // next layers' f32 factors do not reuse: return them rather than let the heap grow.
            drop((a, s, q_a, q_s));
            crate::io::release_freed_memory();
            progress.advance(1);
            Ok(factors)
        })
        .collect();
    progress.end();
    layers
}

/// The symmetric matrix of a packed triangle, times `norm`; the triangle is freed.
fn expand(sum: Lower, norm: f64) -> Mat<f64> {
    sum.to_full_scaled(norm)
}

/// Sets Λ of each layer from the (merged) eigenvalue sums, normalised per sequence.
///
/// # Panics
/// If `lam` holds the covariance pass's sums.
pub fn set_lambda(layers: &mut [LayerFactors], lam: &PassSums) {
    let norm = 1.0 / lam.n_sequences.max(1) as f64;
    let Sums::Eigenvalue(sums) = &lam.sums else {
        panic!("set_lambda takes the eigenvalue pass's sums");
    };
    for (lf, sum) in layers.iter_mut().zip(sums) {
        lf.n_tokens = lam.n_tokens;
        lf.n_sequences = lam.n_sequences;
        lf.lambda = Some(Mat::from_fn(sum.nrows(), sum.ncols(), |i, j| {
            (sum[(i, j)] * norm) as f32
        }));
    }
}

/// Factors with no curvature (the identity strategy), or before any pass.
pub fn empty_factors(
    tracked: &[TrackedLayer],
    n_tokens: u64,
    n_sequences: u64,
) -> Vec<LayerFactors> {
    tracked
        .iter()
        .map(|l| LayerFactors {
            layer: l.clone(),
            n_tokens,
            n_sequences,
            covariance: None,
            eigen: None,
            lambda: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvature::Pass;
    use std::sync::Mutex;

    /// One `begin_in`: what, total, unit.
    type Begun = (String, u64, &'static str);

    /// What a reporter was told: each begin, the units advanced, the ends.
    #[derive(Default)]
    struct Record(Mutex<(Vec<Begun>, u64, usize)>);

    impl Progress for Record {
        fn begin(&self, what: &str, total: u64) {
            self.begin_in(what, total, "tokens");
        }
        fn begin_in(&self, what: &str, total: u64, unit: &'static str) {
            let mut r = self.0.lock().unwrap();
            r.0.push((what.to_string(), total, unit));
        }
        fn advance(&self, n: u64) {
            self.0.lock().unwrap().1 += n;
        }
        fn end(&self) {
            self.0.lock().unwrap().2 += 1;
        }
    }

    /// Each layer's decomposition is counted once it is done, in layers, within one begin/end.
    #[test]
    fn the_decompositions_report_their_layers() {
        let layer = |name: &str, d_in, d_out| TrackedLayer {
            name: name.into(),
            d_in,
            d_out,
            has_bias: false,
        };
        let tracked = [layer("a", 3, 2), layer("b", 2, 4), layer("c", 5, 1)];
        let mut cov = PassSums::zeros(Pass::Covariance, &tracked);
        cov.n_tokens = 4;
        let record = Record::default();
        let factors = eigendecompose(&tracked, cov, &record).unwrap();
        assert_eq!(factors.len(), 3);
        let (begun, advanced, ended) = &*record.0.lock().unwrap();
        assert_eq!(begun, &[("eigendecompositions".to_string(), 3, "layers")]);
        assert_eq!((*advanced, *ended), (3, 1));
    }
}
