//! Writes the files of a results directory that people and `infl report` read:
//! `top_k.jsonl`, `distribution.json` and `layers.json`, each atomically.

use super::schema::{DistributionFile, LayersFile};
use super::{
    Direction, Distribution, LayerTotals, QuerySummary, RemovalScale, TokenPart, TopEntry,
    TAIL_SIZE,
};
use crate::data::LazyTokenizer;
use crate::error::{Error, Result};
use crate::io;
use std::path::Path;

/// `top_k.jsonl` lines for every query: the top block, then the bottom block; with
/// `removal`, each line's predicted change of −log p on removal (alone and with the ranks
/// above it).
pub fn entries(
    summaries: &[QuerySummary],
    query_ids: &[String],
    tokenizer: &mut LazyTokenizer,
    per_layer: bool,
    tokens: Option<&std::collections::HashMap<(usize, usize), Vec<TokenPart>>>,
    removal: Option<&RemovalScale>,
) -> Vec<TopEntry> {
    let mut out = Vec::new();
    let dists = distributions(summaries, query_ids);
    for (q, (s, qid)) in summaries.iter().zip(query_ids).enumerate() {
        for (direction, list) in [(Direction::Top, &s.top), (Direction::Bottom, &s.bottom)] {
            let mut group = 0.0;
            for (rank, c) in list.iter().enumerate() {
                group += c.score;
                out.push(TopEntry {
                    query_id: qid.clone(),
                    direction,
                    rank: rank + 1,
                    sequence_id: c.sequence_id.clone(),
                    score: c.score,
                    removal_change: removal.map(|r| r.removal_change(c.score)),
                    group_removal_change: removal.map(|r| r.removal_change(group)),
                    percentile: dists.get(q).and_then(|d| d.percentile(c.score)),
                    text: tokenizer.decode(&c.ids),
                    per_layer: per_layer.then(|| c.per_layer.clone()),
                    tokens: tokens.and_then(|t| t.get(&(q, c.index)).cloned()),
                    stability: None,
                });
            }
        }
    }
    out
}

/// Writes `top_k.jsonl` atomically.
pub fn write_top_k(path: &Path, entries: &[TopEntry]) -> Result<()> {
    let mut text = String::new();
    for e in entries {
        text.push_str(&serde_json::to_string(e).map_err(|e| Error::Other(e.to_string()))?);
        text.push('\n');
    }
    io::write_atomic(path, text.as_bytes())
}

/// Writes `distribution.json`: running statistics and tails per query.
pub fn write_distribution(
    path: &Path,
    summaries: &[QuerySummary],
    query_ids: &[String],
) -> Result<()> {
    let file = DistributionFile {
        tail_size: TAIL_SIZE,
        queries: distributions(summaries, query_ids),
    };
    write_sorted_json(path, &file)
}

/// The records of `distribution.json`, one per query.
fn distributions(summaries: &[QuerySummary], query_ids: &[String]) -> Vec<Distribution> {
    summaries
        .iter()
        .zip(query_ids)
        .map(|(s, id)| Distribution {
            query_id: id.clone(),
            count: s.count as usize,
            sum: s.sum,
            sum_sq: s.sum_sq,
            sum_pos: s.sum_pos,
            sum_neg: s.sum_neg,
            min: s.min,
            max: s.max,
            tail_pos: s.tail_pos(),
            tail_neg: s.tail_neg(),
            sketch: Some(s.sketch.clone()),
        })
        .collect()
}

/// Writes `layers.json`: per query, each layer's total part over all training sequences.
pub fn write_layers(
    path: &Path,
    summaries: &[QuerySummary],
    query_ids: &[String],
    layers: &[String],
) -> Result<()> {
    let queries = summaries
        .iter()
        .zip(query_ids)
        .map(|(s, id)| LayerTotals {
            query_id: id.clone(),
            total_per_layer: s.total_per_layer.clone(),
            abs_per_layer: s.abs_per_layer.clone(),
        })
        .collect();
    let file = LayersFile {
        layers: layers.to_vec(),
        queries,
    };
    write_sorted_json(path, &file)
}

/// [`io::write_json`] through a `serde_json::Value`, whose maps sort their keys: the key order
/// these files have always had, whatever the order of the records' fields.
fn write_sorted_json<T: serde::Serialize>(path: &Path, record: &T) -> Result<()> {
    let value = serde_json::to_value(record).map_err(|e| Error::Other(e.to_string()))?;
    io::write_json(path, &value)
}
