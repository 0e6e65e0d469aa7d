//! Results stage: top-k per query (JSONL), dense score matrices (safetensors), and the
//! provenance every output carries (meta.json).

use crate::data::{Corpus, LazyTokenizer, Query};
use crate::error::Result;
use crate::io::{self, OwnedTensor};
use std::collections::HashMap;
use std::path::Path;

/// One line of `top_k.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopEntry {
    pub query_id: String,
    pub rank: usize,
    pub sequence_id: String,
    pub score: f64,
    /// The training sequence's text (decoded window), when a tokenizer is available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Indices of the `k` largest scores, highest first (ties broken by corpus order).
pub fn top_k_indices(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The top-k entries of every query, with text decoded once per distinct sequence.
pub fn top_entries(
    scores: &[Vec<f64>],
    queries: &[Query],
    corpus: &Corpus,
    k: usize,
    tokenizer: &mut LazyTokenizer,
) -> Vec<TopEntry> {
    let mut texts: HashMap<usize, Option<String>> = HashMap::new();
    let mut out = Vec::new();
    for (q, row) in queries.iter().zip(scores) {
        for (rank, n) in top_k_indices(row, k).into_iter().enumerate() {
            let text = texts
                .entry(n)
                .or_insert_with(|| tokenizer.decode(&corpus.sequences[n].ids))
                .clone();
            out.push(TopEntry {
                query_id: q.id.clone(),
                rank: rank + 1,
                sequence_id: corpus.sequences[n].id.clone(),
                score: row[n],
                text,
            });
        }
    }
    out
}

/// Writes `top_k.jsonl` atomically.
pub fn write_top_k(path: &Path, entries: &[TopEntry]) -> Result<()> {
    let mut text = String::new();
    for e in entries {
        text.push_str(&serde_json::to_string(e).map_err(|e| crate::Error::Other(e.to_string()))?);
        text.push('\n');
    }
    io::write_atomic(path, text.as_bytes())
}

/// Writes the dense matrix `scores` (f32, `[n_queries, n_train]`) with the row and column ids
/// in the safetensors header.
pub fn write_dense(
    path: &Path,
    scores: &[Vec<f64>],
    queries: &[Query],
    corpus: &Corpus,
) -> Result<()> {
    let n_train = corpus.sequences.len();
    let data: Vec<f32> = scores
        .iter()
        .flat_map(|r| r.iter().map(|&x| x as f32))
        .collect();
    let ids = |v: Vec<&str>| serde_json::to_string(&v).unwrap_or_default();
    let metadata = HashMap::from([
        (
            "query_ids".to_string(),
            ids(queries.iter().map(|q| q.id.as_str()).collect()),
        ),
        (
            "sequence_ids".to_string(),
            ids(corpus.sequences.iter().map(|s| s.id.as_str()).collect()),
        ),
    ]);
    io::write_safetensors(
        path,
        &[(
            "scores".to_string(),
            OwnedTensor::F32(vec![scores.len(), n_train], data),
        )],
        Some(metadata),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_stable() {
        assert_eq!(top_k_indices(&[0.5, 2.0, -1.0, 2.0, 0.1], 3), vec![1, 3, 0]);
        assert_eq!(top_k_indices(&[1.0], 5), vec![0]);
    }
}
