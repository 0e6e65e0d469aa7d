//! `meta.json` of a results directory (`infl score`, `infl self-influence`): the settings, the
//! queries and the provenance of every score in it.

use super::{RemovalScale, REMOVAL_CONVENTION};
use crate::curvature::format::FactorsMeta;
use crate::curvature::{Fisher, Strategy};
use crate::influence::Preconditioner;
use crate::model::ModuleSelection;
use crate::options::{Normalize, ScoreOptions};
use crate::provenance::{check_format, format_1, CorpusInfo, ModelInfo, FORMAT_VERSION};
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
    pub removal: Option<RemovalScale>,
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
    /// [`crate::provenance::FORMAT_VERSION`] when written.
    #[serde(default = "format_1")]
    pub format_version: u32,
    pub tool: String,
    pub version: String,
    /// `scores` or `self-influence`.
    pub kind: String,
    pub strategy: Strategy,
    pub fisher: Fisher,
    pub modules: ModuleSelection,
    /// The score's options, as top-level keys (`query_rank` null = exact: always so with
    /// `store`; a self-influence run records its damping, top-k and batch size, the rest off).
    #[serde(flatten)]
    pub options: ScoreOptions,
    /// λ actually used per tracked layer.
    pub damping_per_layer: Vec<(String, f64)>,
    /// Tracked layer names, in the order of every per-layer array.
    pub layers: Vec<String>,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub queries: QueriesInfo,
    pub factors: FactorsRef,
    pub score_convention: String,
    /// What turns a score into nats on removal ([`RemovalScale`]; scores only, absent where
    /// the score has no such scale and in results of older releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal: Option<RemovalScale>,
    /// [`super::REMOVAL_CONVENTION`] where `removal` is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_convention: Option<String>,
    /// How each query's inverse was refined (`ekfac-refined` factors; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<crate::influence::refine::RefineReport>,
}

/// What every scores-like output's `meta.json` records besides its options and queries.
pub struct Provenance<'a> {
    pub fmeta: &'a FactorsMeta,
    pub factors_dir: &'a Path,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub tracked: &'a [crate::model::TrackedLayer],
    pub preconditioner: &'a Preconditioner,
}

impl ScoresMeta {
    pub fn new(
        kind: &str,
        convention: &str,
        options: ScoreOptions,
        queries: QueriesInfo,
        from: Provenance<'_>,
    ) -> Self {
        let layers: Vec<String> = from.tracked.iter().map(|l| l.name.clone()).collect();
        let removal = (kind == "scores")
            .then(|| {
                RemovalScale::of(
                    from.fmeta.options.strategy,
                    options.normalize,
                    &from.fmeta.corpus,
                )
            })
            .flatten();
        ScoresMeta {
            format_version: FORMAT_VERSION,
            tool: "infl".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: kind.into(),
            strategy: from.fmeta.options.strategy,
            fisher: from.fmeta.options.fisher,
            modules: from.fmeta.options.modules,
            options,
            damping_per_layer: layers
                .iter()
                .cloned()
                .zip(from.preconditioner.damping.iter().copied())
                .collect(),
            layers,
            model: from.model,
            corpus: from.corpus,
            queries,
            factors: FactorsRef {
                path: from.factors_dir.display().to_string(),
                factors_sha256: from.fmeta.factors_sha256.clone(),
                fitted_on: from.fmeta.corpus.clone(),
            },
            score_convention: convention.into(),
            removal_convention: removal.as_ref().map(|_| REMOVAL_CONVENTION.into()),
            removal,
            refine: None,
        }
    }

    /// The record of how the queries' inverse was refined.
    pub fn with_refine(self, refine: Option<crate::influence::refine::RefineReport>) -> Self {
        ScoresMeta { refine, ..self }
    }

    /// Reads a results `meta.json` of any format this infl knows.
    pub fn read(path: &Path) -> crate::Result<Self> {
        let meta: ScoresMeta = crate::io::read_json(path)?;
        check_format(meta.format_version, path)?;
        Ok(meta)
    }
}

impl QueriesInfo {
    /// The one pseudo-query of a self-influence run.
    pub fn own() -> Self {
        QueriesInfo {
            path: String::new(),
            sha256: String::new(),
            ids: vec!["self".into()],
            prompts: vec![None],
            completions: vec![None],
            losses: vec![],
            self_influence: vec![],
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FactorsRef {
    pub path: String,
    pub factors_sha256: String,
    pub fitted_on: CorpusInfo,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results meta.json written by infl 0.1.0 (format 1: `store` the store's path).
    #[test]
    fn format_1_results_meta_reads_into_the_options() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/format1/results_meta.json");
        let meta = ScoresMeta::read(&path).unwrap();
        assert_eq!(meta.format_version, 1);
        assert!(meta.options.store);
        assert_eq!(meta.options.query_rank, crate::options::QueryRank::FULL);
        assert!(meta.options.per_layer && meta.options.per_token && meta.options.dense);
        assert_eq!((meta.options.top_k, meta.options.batch_size), (10, 8));
        assert_eq!(meta.options.max_len, None);
        assert_eq!(meta.queries.ids.len(), 2);
    }
}
