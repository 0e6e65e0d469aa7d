//! The fitted factors: per layer the covariances, their eigenbases and Λ ([`LayerFactors`]),
//! as the named tensors of `factors.safetensors` and back, and the per-layer summary of the
//! factors' meta.json.

use super::Strategy;
use crate::error::Result;
use crate::io::{TensorFile, TensorRef};
use crate::model::TrackedLayer;
use faer::Mat;
use std::collections::HashMap;
use std::path::Path;

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

impl LayerFactors {
    /// Layer `l`'s factors of `strategy` from a factors file; without `covariance`, A and S
    /// (which scoring never uses) are not read.
    pub fn read(
        file: &mut TensorFile,
        strategy: Strategy,
        l: &TrackedLayer,
        covariance: bool,
    ) -> Result<LayerFactors> {
        let n = &l.name;
        let (di, d_o) = (l.d_in_h(), l.d_out);
        let counts = file.vec_f64(&format!("{n}.counts"), 2)?;
        let (covariance, eigen) = if strategy.needs_covariance() {
            let covariance = match covariance {
                true => Some((
                    file.mat_f32(&format!("{n}.A"), di, di)?,
                    file.mat_f32(&format!("{n}.S"), d_o, d_o)?,
                )),
                false => None,
            };
            let eigen = Eigenbasis {
                eigvals_a: file.vec_f64(&format!("{n}.eigvals_A"), di)?,
                q_a: file.mat_f32(&format!("{n}.Q_A"), di, di)?,
                eigvals_s: file.vec_f64(&format!("{n}.eigvals_S"), d_o)?,
                q_s: file.mat_f32(&format!("{n}.Q_S"), d_o, d_o)?,
            };
            (covariance, Some(eigen))
        } else {
            (None, None)
        };
        let lambda = match strategy.needs_lambda() {
            true => Some(file.mat_f32(&format!("{n}.lambda"), d_o, di)?),
            false => None,
        };
        Ok(LayerFactors {
            layer: l.clone(),
            n_tokens: counts[0] as u64,
            n_sequences: counts[1] as u64,
            covariance,
            eigen,
            lambda,
        })
    }
}

/// Fitted factors of every tracked layer.
#[derive(Debug, Clone)]
pub struct Factors {
    pub strategy: Strategy,
    pub layers: Vec<LayerFactors>,
}

impl Factors {
    /// Tensors named `{layer}.{A,S,Q_A,eigvals_A,Q_S,eigvals_S,lambda}` plus per-layer counts,
    /// borrowed (written without a copy by [`crate::io::write_tensors`]).
    pub fn to_tensors(&self) -> Vec<(String, TensorRef<'_>)> {
        let mut out = Vec::new();
        for lf in &self.layers {
            let n = &lf.layer.name;
            out.push((
                format!("{n}.counts"),
                TensorRef::f64_owned(vec![2], vec![lf.n_tokens as f64, lf.n_sequences as f64]),
            ));
            if let Some((a, s)) = &lf.covariance {
                out.push((format!("{n}.A"), TensorRef::mat_f32(a.as_ref())));
                out.push((format!("{n}.S"), TensorRef::mat_f32(s.as_ref())));
            }
            if let Some(e) = &lf.eigen {
                out.push((format!("{n}.Q_A"), TensorRef::mat_f32(e.q_a.as_ref())));
                out.push((
                    format!("{n}.eigvals_A"),
                    TensorRef::f64(vec![e.eigvals_a.len()], &e.eigvals_a),
                ));
                out.push((format!("{n}.Q_S"), TensorRef::mat_f32(e.q_s.as_ref())));
                out.push((
                    format!("{n}.eigvals_S"),
                    TensorRef::f64(vec![e.eigvals_s.len()], &e.eigvals_s),
                ));
            }
            if let Some(l) = &lf.lambda {
                out.push((format!("{n}.lambda"), TensorRef::mat_f32(l.as_ref())));
            }
        }
        out
    }

    /// Reads factors written by [`Factors::to_tensors`] for the given layers, one tensor at a
    /// time.
    pub fn from_file(path: &Path, strategy: Strategy, layers: &[TrackedLayer]) -> Result<Factors> {
        let mut file = TensorFile::open(path)?;
        let layers = layers
            .iter()
            .map(|l| LayerFactors::read(&mut file, strategy, l, true))
            .collect::<Result<_>>()?;
        Ok(Factors { strategy, layers })
    }

    /// The eigenbases saved between a fit's passes (KFAC-shaped tensors), read a layer at a
    /// time and without A and S: the eigenvalue pass needs only the bases, and the factors
    /// file takes A and S from the saved file itself.
    pub fn read_bases(file: &mut TensorFile, layers: &[TrackedLayer]) -> Result<Factors> {
        let layers = layers
            .iter()
            .map(|l| LayerFactors::read(file, Strategy::Kfac, l, false))
            .collect::<Result<_>>()?;
        Ok(Factors {
            strategy: Strategy::Kfac,
            layers,
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
