//! Curvature stage: KFAC covariances A and S, their eigenbases, and the EK-FAC eigenvalue
//! correction Λ, accumulated from the (a, g) taps of the model stage.
//!
//! Conventions (DESIGN.md; identical to kronfluence 1.0.1):
//! - `A = (1/N_tok) Σ_t ā_t ā_tᵀ`, `S = (1/N_tok) Σ_t g_t g_tᵀ`, N_tok counting every real token,
//!   the last of each sequence too (its g is zero); ā = [a, 1] for layers with a bias.
//! - Eigendecompositions in f64; eigenvectors then rounded to f32 and used as stored.
//! - EK-FAC `Λ = (1/N_seq) Σ_n (Q_Sᵀ G_n Q_A)^∘2`, G_n = Σ_t g_t ā_tᵀ the summed gradient of
//!   sequence n. Diagonal: `(1/N_seq) Σ_n G_n^∘2` in the original basis. KFAC: `Λ = λ_S λ_Aᵀ`.

use crate::data::Sequence;
use crate::error::{Error, Result};
use crate::io::OwnedTensor;
use crate::linalg;
use crate::model::{Labels, TapBatch, TapModel, TokenBatch, TrackedLayer};
use faer::Mat;
use std::collections::HashMap;
use std::path::Path;

/// How the Fisher (GGN) of each tracked layer is approximated.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Eigenvalue-corrected KFAC: KFAC eigenbases, per-sequence eigenvalues Λ (the paper's method).
    Ekfac,
    /// KFAC: F ≈ S ⊗ A on the per-token scale.
    Kfac,
    /// Diagonal Fisher from per-sequence squared gradients.
    Diagonal,
    /// No curvature: plain gradient dot products, no damping.
    Identity,
}

impl Strategy {
    fn needs_covariance(self) -> bool {
        matches!(self, Strategy::Ekfac | Strategy::Kfac)
    }
    fn needs_lambda(self) -> bool {
        matches!(self, Strategy::Ekfac | Strategy::Diagonal)
    }
}

/// Where the labels of the Fisher come from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Fisher {
    /// Labels sampled from the model's predictive distribution: the true Fisher (= GGN).
    Sampled,
    /// The data's own labels (deterministic; what kronfluence calls use_empirical_fisher).
    Empirical,
}

/// Reports progress of passes over data, in tokens.
pub trait Progress: Sync {
    fn begin(&self, what: &str, total_tokens: u64);
    fn advance(&self, tokens: u64);
    fn end(&self);
}

/// Progress that reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// Runs the model over `seqs` in batches and hands each batch's taps to `visit`, checking that
/// losses and gradients are finite (naming the sequence when they are not), as one progress bar.
pub fn for_each_batch(
    model: &dyn TapModel,
    seqs: &[Sequence],
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
    progress.begin(what, total as u64);
    run_batches(model, seqs, 0, batch_size, labels, progress, what, visit)?;
    progress.end();
    Ok(())
}

/// The loop of [`for_each_batch`] without beginning or ending a progress bar, for passes that
/// stream the corpus chunk by chunk. Sequence `k` of `seqs` has the stable index `first + k`
/// (seeding sampled labels); `visit` receives the batch's offset within `seqs`.
#[allow(clippy::too_many_arguments)]
pub fn run_batches(
    model: &dyn TapModel,
    seqs: &[Sequence],
    first: usize,
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    mut visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    let size = batch_size.max(1);
    for (chunk_no, chunk) in seqs.chunks(size).enumerate() {
        let start = chunk_no * size;
        let refs: Vec<(u64, &[u32])> = chunk
            .iter()
            .enumerate()
            .map(|(k, s)| ((first + start + k) as u64, s.ids.as_slice()))
            .collect();
        let batch = TokenBatch::training(&refs);
        let taps = model.taps(&batch, labels)?;
        if let Err(e) = check_finite(&taps, |k| chunk[k].id.clone(), what) {
            // Padding shares attention with real tokens, so one broken sequence can poison its
            // whole batch: rerun each alone to name the one at fault.
            for (k, r) in refs.iter().enumerate() {
                let alone = model.taps(&TokenBatch::training(std::slice::from_ref(r)), labels)?;
                check_finite(&alone, |_| chunk[k].id.clone(), what)?;
            }
            return Err(e);
        }
        visit(start, &taps)?;
        progress.advance(batch.n_tokens() as u64);
    }
    Ok(())
}

/// Errors out naming the first sequence whose loss or gradient is NaN or infinite.
pub fn check_finite(taps: &TapBatch, name: impl Fn(usize) -> String, what: &str) -> Result<()> {
    let offsets = taps.offsets();
    for (k, loss) in taps.losses.iter().enumerate() {
        let bad_grad = taps.layers.iter().any(|l| {
            let d = l.g.len() / offsets[offsets.len() - 1].max(1);
            l.g[offsets[k] * d..offsets[k + 1] * d]
                .iter()
                .any(|x| !x.is_finite())
        });
        if !loss.is_finite() || bad_grad {
            return Err(Error::NonFinite(format!(
                "{what}: sequence {} has a non-finite {} (loss = {loss})",
                name(k),
                if loss.is_finite() { "gradient" } else { "loss" }
            )));
        }
    }
    Ok(())
}

/// Settings of `infl fit`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FitOptions {
    pub strategy: Strategy,
    pub fisher: Fisher,
    pub batch_size: usize,
    /// Seeds the labels sampled for the true Fisher.
    pub seed: u64,
}

/// The fitted curvature of one tracked layer. Matrices are f32 as stored; eigenvalues f64.
#[derive(Debug, Clone)]
pub struct LayerFactors {
    pub layer: TrackedLayer,
    pub n_tokens: u64,
    pub n_sequences: u64,
    /// A (`d_in_h × d_in_h`) and S (`d_out × d_out`), normalised per token (KFAC, EK-FAC).
    pub covariance: Option<(Mat<f32>, Mat<f32>)>,
    /// (λ_A, Q_A, λ_S, Q_S), eigenvalues ascending (KFAC, EK-FAC).
    pub eigen: Option<Eigenbasis>,
    /// Λ, `d_out × d_in_h`, normalised per sequence (EK-FAC: in the eigenbasis; diagonal: in
    /// the original basis).
    pub lambda: Option<Mat<f32>>,
}

#[derive(Debug, Clone)]
pub struct Eigenbasis {
    pub eigvals_a: Vec<f64>,
    pub q_a: Mat<f32>,
    pub eigvals_s: Vec<f64>,
    pub q_s: Mat<f32>,
}

/// Fitted factors of every tracked layer.
#[derive(Debug, Clone)]
pub struct Factors {
    pub strategy: Strategy,
    pub layers: Vec<LayerFactors>,
}

/// Fits the factors of `options.strategy` over `seqs`: a covariance pass (KFAC, EK-FAC), the
/// eigendecompositions, then a Λ pass (EK-FAC, diagonal).
pub fn fit(
    model: &dyn TapModel,
    seqs: &[Sequence],
    options: &FitOptions,
    progress: &dyn Progress,
) -> Result<Factors> {
    let tracked = model.tracked().to_vec();
    if tracked.is_empty() {
        return Err(Error::input(
            "no tracked layers: --modules selected nothing",
        ));
    }
    let labels = |pass| match options.fisher {
        Fisher::Empirical => Labels::Data,
        Fisher::Sampled => Labels::Sampled {
            seed: options.seed,
            pass,
        },
    };
    let n_tokens: u64 = seqs.iter().map(|s| s.ids.len() as u64).sum();
    let mut layers: Vec<LayerFactors> = tracked
        .iter()
        .map(|l| LayerFactors {
            layer: l.clone(),
            n_tokens,
            n_sequences: seqs.len() as u64,
            covariance: None,
            eigen: None,
            lambda: None,
        })
        .collect();

    if options.strategy.needs_covariance() {
        let mut sums: Vec<(Mat<f64>, Mat<f64>)> = tracked
            .iter()
            .map(|l| {
                (
                    Mat::zeros(l.d_in_h(), l.d_in_h()),
                    Mat::zeros(l.d_out, l.d_out),
                )
            })
            .collect();
        for_each_batch(
            model,
            seqs,
            options.batch_size,
            labels(0),
            progress,
            "covariance pass",
            |_, taps| {
                let n = taps.seq_lens.iter().sum();
                for ((l, tap), (a_sum, s_sum)) in
                    tracked.iter().zip(&taps.layers).zip(sums.iter_mut())
                {
                    let a = linalg::homogeneous(&tap.a, n, l.d_in, l.has_bias);
                    linalg::add_gram(a_sum, a.as_ref());
                    linalg::add_gram(s_sum, linalg::rows(&tap.g, n, l.d_out));
                }
                Ok(())
            },
        )?;
        for (lf, (a_sum, s_sum)) in layers.iter_mut().zip(sums) {
            let norm = 1.0 / n_tokens as f64;
            let a = Mat::from_fn(a_sum.nrows(), a_sum.ncols(), |i, j| a_sum[(i, j)] * norm);
            let s = Mat::from_fn(s_sum.nrows(), s_sum.ncols(), |i, j| s_sum[(i, j)] * norm);
            let eig = |m: &Mat<f64>, which: &str| {
                linalg::eigh(m)
                    .map_err(|e| Error::Other(format!("layer {} {which}: {e}", lf.layer.name)))
            };
            let (eigvals_a, q_a) = eig(&a, "A")?;
            let (eigvals_s, q_s) = eig(&s, "S")?;
            lf.eigen = Some(Eigenbasis {
                eigvals_a,
                q_a: linalg::to_f32(&q_a),
                eigvals_s,
                q_s: linalg::to_f32(&q_s),
            });
            lf.covariance = Some((linalg::to_f32(&a), linalg::to_f32(&s)));
        }
    }

    if options.strategy.needs_lambda() {
        let mut sums: Vec<Mat<f64>> = tracked
            .iter()
            .map(|l| Mat::zeros(l.d_out, l.d_in_h()))
            .collect();
        let bases: Vec<Option<&Eigenbasis>> = layers.iter().map(|l| l.eigen.as_ref()).collect();
        for_each_batch(
            model,
            seqs,
            options.batch_size,
            labels(1),
            progress,
            "eigenvalue pass",
            |_, taps| {
                let offsets = taps.offsets();
                let n = offsets[offsets.len() - 1];
                for (((l, tap), sum), basis) in tracked
                    .iter()
                    .zip(&taps.layers)
                    .zip(sums.iter_mut())
                    .zip(&bases)
                {
                    let a = linalg::homogeneous(&tap.a, n, l.d_in, l.has_bias);
                    let g = linalg::rows(&tap.g, n, l.d_out);
                    // Rotate the tokens first: (g Q_S)ᵀ (ā Q_A) = Q_Sᵀ G Q_A, cheaper when the
                    // sequences are shorter than the layer is wide.
                    let (g_rot, a_rot) = match basis {
                        Some(b) => (
                            linalg::mul(g, b.q_s.as_ref()),
                            linalg::mul(a.as_ref(), b.q_a.as_ref()),
                        ),
                        None => (g.to_owned(), a),
                    };
                    let mut r = Mat::<f32>::zeros(l.d_out, l.d_in_h());
                    for w in offsets.windows(2) {
                        let (s, e) = (w[0], w[1]);
                        linalg::mul_into(
                            r.as_mut(),
                            g_rot.as_ref().subrows(s, e - s).transpose(),
                            a_rot.as_ref().subrows(s, e - s),
                            false,
                        );
                        for j in 0..r.ncols() {
                            for i in 0..r.nrows() {
                                let x = r[(i, j)] as f64;
                                sum[(i, j)] += x * x;
                            }
                        }
                    }
                }
                Ok(())
            },
        )?;
        for (lf, sum) in layers.iter_mut().zip(sums) {
            let norm = 1.0 / seqs.len() as f64;
            lf.lambda = Some(Mat::from_fn(sum.nrows(), sum.ncols(), |i, j| {
                (sum[(i, j)] * norm) as f32
            }));
        }
    }
    Ok(Factors {
        strategy: options.strategy,
        layers,
    })
}

impl Factors {
    /// Tensors named `{layer}.{A,S,Q_A,eigvals_A,Q_S,eigvals_S,lambda}` plus per-layer counts.
    pub fn to_tensors(&self) -> Vec<(String, OwnedTensor)> {
        let mut out = Vec::new();
        let mat = |m: &Mat<f32>| {
            OwnedTensor::F32(vec![m.nrows(), m.ncols()], linalg::to_row_major(m.as_ref()))
        };
        for lf in &self.layers {
            let n = &lf.layer.name;
            out.push((
                format!("{n}.counts"),
                OwnedTensor::F64(vec![2], vec![lf.n_tokens as f64, lf.n_sequences as f64]),
            ));
            if let Some((a, s)) = &lf.covariance {
                out.push((format!("{n}.A"), mat(a)));
                out.push((format!("{n}.S"), mat(s)));
            }
            if let Some(e) = &lf.eigen {
                out.push((format!("{n}.Q_A"), mat(&e.q_a)));
                out.push((
                    format!("{n}.eigvals_A"),
                    OwnedTensor::F64(vec![e.eigvals_a.len()], e.eigvals_a.clone()),
                ));
                out.push((format!("{n}.Q_S"), mat(&e.q_s)));
                out.push((
                    format!("{n}.eigvals_S"),
                    OwnedTensor::F64(vec![e.eigvals_s.len()], e.eigvals_s.clone()),
                ));
            }
            if let Some(l) = &lf.lambda {
                out.push((format!("{n}.lambda"), mat(l)));
            }
        }
        out
    }

    /// Reads factors written by [`Factors::to_tensors`] for the given layers.
    pub fn from_file(path: &Path, strategy: Strategy, layers: &[TrackedLayer]) -> Result<Factors> {
        let mut t = crate::io::read_safetensors(path)?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f64>> {
            let (s, v) = t.remove(name).ok_or_else(|| {
                Error::Mismatch(format!("{}: tensor `{name}` is missing", path.display()))
            })?;
            if s != shape {
                return Err(Error::Mismatch(format!(
                    "{}: tensor `{name}` has shape {s:?}, the model's layer needs {shape:?}",
                    path.display()
                )));
            }
            Ok(v)
        };
        let mat32 =
            |v: Vec<f64>, r: usize, c: usize| Mat::from_fn(r, c, |i, j| v[i * c + j] as f32);
        let mut out = Vec::new();
        for l in layers {
            let n = &l.name;
            let (di, d_o) = (l.d_in_h(), l.d_out);
            let counts = take(&format!("{n}.counts"), &[2])?;
            let (covariance, eigen) = if strategy.needs_covariance() {
                let a = mat32(take(&format!("{n}.A"), &[di, di])?, di, di);
                let s = mat32(take(&format!("{n}.S"), &[d_o, d_o])?, d_o, d_o);
                let q_a = mat32(take(&format!("{n}.Q_A"), &[di, di])?, di, di);
                let q_s = mat32(take(&format!("{n}.Q_S"), &[d_o, d_o])?, d_o, d_o);
                let eigvals_a = take(&format!("{n}.eigvals_A"), &[di])?;
                let eigvals_s = take(&format!("{n}.eigvals_S"), &[d_o])?;
                (
                    Some((a, s)),
                    Some(Eigenbasis {
                        eigvals_a,
                        q_a,
                        eigvals_s,
                        q_s,
                    }),
                )
            } else {
                (None, None)
            };
            let lambda = if strategy.needs_lambda() {
                Some(mat32(take(&format!("{n}.lambda"), &[d_o, di])?, d_o, di))
            } else {
                None
            };
            out.push(LayerFactors {
                layer: l.clone(),
                n_tokens: counts[0] as u64,
                n_sequences: counts[1] as u64,
                covariance,
                eigen,
                lambda,
            });
        }
        Ok(Factors {
            strategy,
            layers: out,
        })
    }
}

/// Per-layer metadata recorded in the factors' meta.json.
pub fn layer_summary(factors: &Factors) -> Vec<HashMap<&'static str, serde_json::Value>> {
    factors
        .layers
        .iter()
        .map(|l| {
            HashMap::from([
                ("name", l.layer.name.clone().into()),
                ("d_in", l.layer.d_in.into()),
                ("d_out", l.layer.d_out.into()),
                ("has_bias", l.layer.has_bias.into()),
                ("n_tokens", l.n_tokens.into()),
                ("n_sequences", l.n_sequences.into()),
            ])
        })
        .collect()
}
