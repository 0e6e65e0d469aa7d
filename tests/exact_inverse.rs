//! The curvature and influence stages against dense f64 computations on a tiny layer:
//! covariances, Λ (the per-sequence Fisher's diagonal in the KFAC eigenbasis), the EK-FAC and
//! KFAC inverses, and the heuristic damping. The taps come from a synthetic model so that the
//! reference can be built from exactly the same (a, g).

use faer::linalg::solvers::Solve;
use faer::Mat;
use infl::curvature::{self, Fisher, Strategy};
use infl::data::Sequence;
use infl::influence::{Damping, Preconditioner};
use infl::model::{Labels, LayerTap, TapBatch, TapModel, TokenBatch, TrackedLayer};
use infl::options::FitOptions;
use infl::pass::Silent;
use rand::{Rng, SeedableRng};

const D_IN: usize = 3;
const D_OUT: usize = 5;

/// A "model" whose taps are fixed random numbers per (sequence, position): one tracked layer
/// with a bias.
struct SyntheticTaps {
    layer: Vec<TrackedLayer>,
}

fn token_tap(seq: u64, t: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seq * 1000 + t as u64);
    let a = (0..D_IN).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let g = (0..D_OUT)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0 + 0.3)
        .collect();
    (a, g)
}

impl TapModel for SyntheticTaps {
    fn architecture(&self) -> &str {
        "synthetic"
    }
    fn tracked(&self) -> &[TrackedLayer] {
        &self.layer
    }
    fn vocab_size(&self) -> usize {
        100
    }
    fn max_positions(&self) -> usize {
        100
    }
    fn n_parameters(&self) -> usize {
        D_OUT * (D_IN + 1)
    }
    fn taps(&self, batch: &TokenBatch, _: Labels) -> infl::Result<TapBatch> {
        let (mut a, mut g) = (Vec::new(), Vec::new());
        for (k, ids) in batch.ids.iter().enumerate() {
            for t in 0..ids.len() {
                let (x, y) = token_tap(batch.stable_index[k], t);
                a.extend(x);
                g.extend(y);
            }
        }
        Ok(TapBatch {
            seq_lens: batch.ids.iter().map(Vec::len).collect(),
            losses: vec![0.0; batch.len()],
            layers: vec![LayerTap { a, g }],
        })
    }
    fn logits(&self, _: &[u32]) -> infl::Result<Vec<f32>> {
        unreachable!("not used by the curvature stage")
    }
}

fn setup() -> (SyntheticTaps, Vec<Sequence>) {
    let model = SyntheticTaps {
        layer: vec![TrackedLayer {
            name: "layer".into(),
            d_in: D_IN,
            d_out: D_OUT,
            has_bias: true,
        }],
    };
    let seqs = (1..=6)
        .map(|n| Sequence {
            id: format!("{n}:0"),
            ids: vec![0; n],
        })
        .collect();
    (model, seqs)
}

/// vec(G) in row-major order: index o·(D_IN+1) + i.
fn sequence_gradient(seq: u64, len: usize) -> Vec<f64> {
    let d = D_IN + 1;
    let mut v = vec![0.0; D_OUT * d];
    for t in 0..len {
        let (a, g) = token_tap(seq, t);
        let a: Vec<f64> = a.iter().map(|&x| x as f64).chain([1.0]).collect();
        for o in 0..D_OUT {
            for i in 0..d {
                v[o * d + i] += g[o] as f64 * a[i];
            }
        }
    }
    v
}

fn dense_covariances(seqs: &[Sequence]) -> (Mat<f64>, Mat<f64>) {
    let d = D_IN + 1;
    let (mut a_cov, mut s_cov) = (Mat::<f64>::zeros(d, d), Mat::<f64>::zeros(D_OUT, D_OUT));
    let mut n = 0.0;
    for (k, s) in seqs.iter().enumerate() {
        for t in 0..s.ids.len() {
            let (a, g) = token_tap(k as u64, t);
            let a: Vec<f64> = a.iter().map(|&x| x as f64).chain([1.0]).collect();
            for i in 0..d {
                for j in 0..d {
                    a_cov[(i, j)] += a[i] * a[j];
                }
            }
            for i in 0..D_OUT {
                for j in 0..D_OUT {
                    s_cov[(i, j)] += g[i] as f64 * g[j] as f64;
                }
            }
            n += 1.0;
        }
    }
    (
        Mat::from_fn(d, d, |i, j| a_cov[(i, j)] / n),
        Mat::from_fn(D_OUT, D_OUT, |i, j| s_cov[(i, j)] / n),
    )
}

/// kron(X, Y)[(o,i),(p,j)] = X[o,p]·Y[i,j] (row-major vec of an out × in matrix).
fn kron(x: &Mat<f64>, y: &Mat<f64>) -> Mat<f64> {
    let (n, m) = (x.nrows(), y.nrows());
    Mat::from_fn(n * m, n * m, |r, c| x[(r / m, c / m)] * y[(r % m, c % m)])
}

fn f64_of(m: &Mat<f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

fn query_gradient() -> Vec<f64> {
    sequence_gradient(77, 4)
}

fn apply(p: &Preconditioner, g: &[f64]) -> Vec<f64> {
    let d = D_IN + 1;
    let gm = Mat::from_fn(D_OUT, d, |o, i| g[o * d + i] as f32);
    let out = p.apply(0, gm.as_ref());
    (0..D_OUT * d).map(|k| out[(k / d, k % d)] as f64).collect()
}

fn solve(mut f: Mat<f64>, damping: f64, rhs: &[f64]) -> Vec<f64> {
    for i in 0..f.nrows() {
        f[(i, i)] += damping;
    }
    let b = Mat::from_fn(rhs.len(), 1, |i, _| rhs[i]);
    let x = f.partial_piv_lu().solve(&b);
    (0..rhs.len()).map(|i| x[(i, 0)]).collect()
}

fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{k}]: got {g}, dense reference {w}"
        );
    }
}

fn fit(strategy: Strategy) -> (curvature::Factors, Vec<Sequence>) {
    let (model, seqs) = setup();
    let options = FitOptions {
        strategy,
        fisher: Fisher::Empirical,
        batch_size: 4,
        seed: 0,
        ..FitOptions::default()
    };
    (
        curvature::fit(&model, &seqs, &options, &Silent).unwrap(),
        seqs,
    )
}

#[test]
fn covariances_count_every_token() {
    let (factors, seqs) = fit(Strategy::Kfac);
    let (a, s) = dense_covariances(&seqs);
    let (fa, fs) = factors.layers[0].covariance.as_ref().unwrap();
    for (got, want) in [(f64_of(fa), a), (f64_of(fs), s)] {
        for i in 0..want.nrows() {
            for j in 0..want.ncols() {
                assert!((got[(i, j)] - want[(i, j)]).abs() < 1e-6, "{i},{j}");
            }
        }
    }
    assert_eq!(factors.layers[0].n_tokens, 21);
    assert_eq!(factors.layers[0].n_sequences, 6);
}

#[test]
fn ekfac_lambda_is_the_per_sequence_fisher_diagonal_in_the_eigenbasis() {
    let (factors, seqs) = fit(Strategy::Ekfac);
    let lf = &factors.layers[0];
    let e = lf.eigen.as_ref().unwrap();
    let u = kron(&f64_of(&e.q_s), &f64_of(&e.q_a));
    let d = D_OUT * (D_IN + 1);
    // Dense per-sequence Fisher F = (1/N) Σ vec(G_n) vec(G_n)ᵀ.
    let mut f = Mat::<f64>::zeros(d, d);
    for (k, s) in seqs.iter().enumerate() {
        let v = sequence_gradient(k as u64, s.ids.len());
        for i in 0..d {
            for j in 0..d {
                f[(i, j)] += v[i] * v[j] / seqs.len() as f64;
            }
        }
    }
    let ut_f_u = u.transpose() * &f * &u;
    let lambda = lf.lambda.as_ref().unwrap();
    let got: Vec<f64> = (0..d)
        .map(|k| lambda[(k / (D_IN + 1), k % (D_IN + 1))] as f64)
        .collect();
    let want: Vec<f64> = (0..d).map(|k| ut_f_u[(k, k)]).collect();
    assert_close(&got, &want, 1e-5, "Λ");

    // Heuristic damping = 0.1·mean(Λ) = 0.1·trace(F)/dim (the basis is orthogonal).
    let p = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
    let trace: f64 = (0..d).map(|k| f[(k, k)]).sum();
    assert!((p.damping[0] - 0.1 * trace / d as f64).abs() < 1e-5 * trace / d as f64);

    // The EK-FAC inverse equals the dense damped inverse of U diag(Λ) Uᵀ.
    let lam = 0.37;
    let p = Preconditioner::new(&factors, Damping::Fixed(lam)).unwrap();
    let f_ek = &u * Mat::from_fn(d, d, |i, j| if i == j { want[i] } else { 0.0 }) * u.transpose();
    let g = query_gradient();
    assert_close(&apply(&p, &g), &solve(f_ek, lam, &g), 1e-4, "EK-FAC IHVP");
}

#[test]
fn kfac_inverse_equals_the_dense_damped_kronecker_inverse() {
    let (factors, seqs) = fit(Strategy::Kfac);
    let (a, s) = dense_covariances(&seqs);
    let lam = 0.05;
    let p = Preconditioner::new(&factors, Damping::Fixed(lam)).unwrap();
    let g = query_gradient();
    assert_close(
        &apply(&p, &g),
        &solve(kron(&s, &a), lam, &g),
        1e-4,
        "KFAC IHVP",
    );
}

#[test]
fn diagonal_and_identity_preconditioners() {
    let (factors, seqs) = fit(Strategy::Diagonal);
    let d = D_OUT * (D_IN + 1);
    let mut diag = vec![0.0; d];
    for (k, s) in seqs.iter().enumerate() {
        for (x, v) in diag
            .iter_mut()
            .zip(sequence_gradient(k as u64, s.ids.len()))
        {
            *x += v * v / seqs.len() as f64;
        }
    }
    let lam = 0.2;
    let p = Preconditioner::new(&factors, Damping::Fixed(lam)).unwrap();
    let g = query_gradient();
    let want: Vec<f64> = g.iter().zip(&diag).map(|(x, f)| x / (f + lam)).collect();
    assert_close(&apply(&p, &g), &want, 1e-5, "diagonal IHVP");

    let (factors, _) = fit(Strategy::Identity);
    let p = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
    assert_eq!(p.damping, vec![0.0]);
    assert_close(&apply(&p, &g), &g, 1e-7, "identity");
}
