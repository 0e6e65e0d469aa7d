//! `meta.json` of a results directory (`infl score`, `infl self-influence`): the settings, the
//! queries and the provenance of every score in it.

use crate::curvature::format::FactorsMeta;
use crate::curvature::{Fisher, Strategy};
use crate::influence::{Damping, Preconditioner};
use crate::model::ModuleSelection;
use crate::options::Normalize;
use crate::provenance::{CorpusInfo, ModelInfo};
use std::path::Path;

/// What a score means, recorded in every results directory.
pub const SCORE_CONVENTION: &str = "I(q,z) = sum over tracked layers of <(F+λI)^-1 ∇f_q, ∇L_z>; f_q = -log p(completion|prompt) summed over completion tokens, L_z = summed next-token cross-entropy of z; positive = training on z lowers f_q (z supports the completion); not divided by the number of training sequences";

/// The queries of a results directory. Only `ids` is required when read back: results of
/// older releases lack the rest (an empty list then means not recorded).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueriesInfo {
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub sha256: String,
    pub ids: Vec<String>,
    /// Prompt and completion text (null for pre-tokenised queries).
    #[serde(default)]
    pub prompts: Vec<Option<String>>,
    #[serde(default)]
    pub completions: Vec<Option<String>>,
    /// −log p(completion | prompt) per query, in nats (a non-finite one is written as null
    /// and read back as NaN).
    #[serde(default, deserialize_with = "nulls_as_nan")]
    pub losses: Vec<f64>,
    /// I(q, q): the query gradient's squared norm in the damped inverse-Fisher metric.
    #[serde(default, deserialize_with = "nulls_as_nan")]
    pub self_influence: Vec<f64>,
}

/// JSON has no NaN or infinity: serde_json writes them as null.
fn nulls_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let v: Vec<Option<f64>> = serde::Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

/// What readers of a results directory (`infl report`, `infl compare`) take from its
/// `meta.json`: fields of [`ScoresMeta`] under the same names and types, each optional
/// (results of older releases, and hand-made ones, lack some), with the model and corpus
/// provenance cut to what they show ([`SourceRef`]).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct ScoresMetaView {
    pub kind: Option<String>,
    pub strategy: Option<Strategy>,
    pub normalize: Option<Normalize>,
    /// Absent before the results recorded it: then the names of `damping_per_layer`.
    pub layers: Option<Vec<String>>,
    pub damping_per_layer: Option<Vec<(String, f64)>>,
    pub model: SourceRef,
    pub corpus: SourceRef,
    pub queries: Option<QueriesInfo>,
}

/// The fields of [`ModelInfo`] and [`CorpusInfo`] that readers show.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct SourceRef {
    pub path: Option<String>,
    pub sha256: Option<String>,
    pub n_sequences: Option<usize>,
}

/// `meta.json` of a results directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScoresMeta {
    pub tool: String,
    pub version: String,
    pub kind: String,
    pub strategy: Strategy,
    pub fisher: Fisher,
    pub modules: ModuleSelection,
    pub damping: Damping,
    /// λ actually used per tracked layer.
    pub damping_per_layer: Vec<(String, f64)>,
    /// Tracked layer names, in the order of every per-layer array.
    pub layers: Vec<String>,
    /// Rank of the compressed query gradients (null = exact).
    pub query_rank: Option<usize>,
    /// The gradient store the training gradients were read from (null = computed by the model).
    #[serde(default)]
    pub store: Option<String>,
    pub normalize: Normalize,
    pub per_layer: bool,
    pub per_token: bool,
    /// N candidates per query kept by the BM25 pre-filter (null = every sequence scored).
    pub prefilter: Option<usize>,
    pub top_k: usize,
    pub dense: bool,
    pub batch_size: usize,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub queries: QueriesInfo,
    pub factors: FactorsRef,
    pub score_convention: String,
}

impl ScoresMeta {
    /// The provenance every scores-like output shares; options default to off.
    #[allow(clippy::too_many_arguments)]
    pub fn base(
        kind: &str,
        convention: &str,
        fmeta: &FactorsMeta,
        model: ModelInfo,
        preconditioner: &Preconditioner,
        tracked: &[crate::model::TrackedLayer],
        corpus: CorpusInfo,
        (damping, batch_size, top_k): (Damping, usize, usize),
        factors_dir: &Path,
    ) -> Self {
        let layers: Vec<String> = tracked.iter().map(|l| l.name.clone()).collect();
        ScoresMeta {
            tool: "infl".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: kind.into(),
            strategy: fmeta.strategy,
            fisher: fmeta.fisher,
            modules: fmeta.modules,
            damping,
            damping_per_layer: layers
                .iter()
                .cloned()
                .zip(preconditioner.damping.iter().copied())
                .collect(),
            layers,
            query_rank: None,
            store: None,
            normalize: Normalize::None,
            per_layer: false,
            per_token: false,
            prefilter: None,
            top_k,
            dense: false,
            batch_size,
            model,
            corpus,
            queries: QueriesInfo {
                path: String::new(),
                sha256: String::new(),
                ids: vec!["self".into()],
                prompts: vec![None],
                completions: vec![None],
                losses: vec![],
                self_influence: vec![],
            },
            factors: FactorsRef {
                path: factors_dir.display().to_string(),
                factors_sha256: fmeta.factors_sha256.clone(),
                fitted_on: fmeta.corpus.clone(),
            },
            score_convention: convention.into(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FactorsRef {
    pub path: String,
    pub factors_sha256: String,
    pub fitted_on: CorpusInfo,
}
