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

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueriesInfo {
    pub path: String,
    pub sha256: String,
    pub ids: Vec<String>,
    /// Prompt and completion text (null for pre-tokenised queries).
    pub prompts: Vec<Option<String>>,
    pub completions: Vec<Option<String>>,
    /// −log p(completion | prompt) per query, in nats.
    pub losses: Vec<f64>,
    /// I(q, q): the query gradient's squared norm in the damped inverse-Fisher metric.
    pub self_influence: Vec<f64>,
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
