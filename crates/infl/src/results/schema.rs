//! The records of a results directory's files, one type each, serialised by the writers and
//! deserialised by [`super::read`]: `top_k.jsonl` lines ([`TopEntry`]), `distribution.json`
//! ([`Distribution`] per query) and `layers.json` ([`LayerTotals`] per query).

use super::summary::MagnitudeSketch;

/// How many of the largest positive (and most negative) scores are kept per query for the
/// distribution analysis.
pub const TAIL_SIZE: usize = 2000;

/// Which end of a query's ranking a `top_k.jsonl` line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Most positive first.
    Top,
    /// Most negative first.
    Bottom,
}

/// Lines written before the bottom-k lists existed have no direction: they are top lists.
fn default_direction() -> Direction {
    Direction::Top
}

/// One token's share of a score.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenPart {
    pub text: String,
    pub score: f64,
}

/// One line of `top_k.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopEntry {
    pub query_id: String,
    #[serde(default = "default_direction")]
    pub direction: Direction,
    pub rank: usize,
    pub sequence_id: String,
    pub score: f64,
    /// The predicted change of −log p(completion | prompt), nats, if this sequence were removed
    /// from training (`score / N`, [`super::RemovalScale`]); positive: the completion becomes
    /// less likely. Absent where the score has no such scale (identity, cosine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_change: Option<f64>,
    /// The same for ranks 1..=rank of this list removed together (the top-k group's total at
    /// rank k).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_removal_change: Option<f64>,
    /// 100 × the share of the query's scored sequences scoring at most this score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// The training sequence's text (decoded window), when a tokenizer is available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The score's parts, one per tracked layer (with `--per-layer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_layer: Option<Vec<f64>>,
    /// The score's parts, one per token of the sequence (with `--per-token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<TokenPart>>,
    /// Across the fits of `fit --seeds K` (top entries only): this sequence's rank and score
    /// in each ([`super::stability`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability: Option<super::SequenceStability>,
}

/// Streamed statistics of one query's scores over all training sequences (`distribution.json`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Distribution {
    pub query_id: String,
    pub count: usize,
    pub sum: f64,
    pub sum_sq: f64,
    pub sum_pos: f64,
    pub sum_neg: f64,
    pub min: f64,
    pub max: f64,
    /// The largest positive scores, descending.
    pub tail_pos: Vec<f64>,
    /// Magnitudes of the most negative scores, descending.
    pub tail_neg: Vec<f64>,
    /// Every score's magnitude, bucketed (written by `infl score`; not from dense scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sketch: Option<MagnitudeSketch>,
}

impl Distribution {
    /// The same statistics computed from a dense row of scores.
    pub fn from_scores(query_id: &str, row: &[f64]) -> Self {
        let mut pos: Vec<f64> = row.iter().copied().filter(|x| *x > 0.0).collect();
        let mut neg: Vec<f64> = row.iter().filter(|x| **x < 0.0).map(|x| -x).collect();
        pos.sort_by(|a, b| b.total_cmp(a));
        neg.sort_by(|a, b| b.total_cmp(a));
        let sum_pos = pos.iter().sum();
        let sum_neg = -neg.iter().sum::<f64>();
        pos.truncate(TAIL_SIZE);
        neg.truncate(TAIL_SIZE);
        Distribution {
            query_id: query_id.to_string(),
            count: row.len(),
            sum: row.iter().sum(),
            sum_sq: row.iter().map(|x| x * x).sum(),
            sum_pos,
            sum_neg,
            min: row.iter().copied().fold(f64::INFINITY, f64::min),
            max: row.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            tail_pos: pos,
            tail_neg: neg,
            sketch: None,
        }
    }
}

/// `distribution.json`.
#[derive(serde::Deserialize, serde::Serialize)]
pub(super) struct DistributionFile {
    /// [`TAIL_SIZE`] when written.
    #[serde(default)]
    pub tail_size: usize,
    pub queries: Vec<Distribution>,
}

/// Per-layer totals of one query over all training sequences (`layers.json`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct LayerTotals {
    pub query_id: String,
    pub total_per_layer: Vec<f64>,
    pub abs_per_layer: Vec<f64>,
}

/// `layers.json`.
#[derive(serde::Deserialize, serde::Serialize)]
pub(super) struct LayersFile {
    pub layers: Vec<String>,
    pub queries: Vec<LayerTotals>,
}
