//! A scoring run's saved state (checkpoints, a finished shard's summaries) and how the states
//! of a run's shards become a results directory.

use super::{MergeOutcome, WORK_DIR};
use crate::checkpoint;
use crate::data::LazyTokenizer;
use crate::error::{Error, Result};
use crate::io;
use crate::provenance::META_FILE;
use crate::results::{self, meta::ScoresMeta};
use crate::shard::Shard;
use std::path::{Path, PathBuf};

pub(super) const SCORE_TEMPLATE_FILE: &str = "score.json";

/// What every shard of a score records for `infl merge`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct ScoreTemplate {
    pub(super) settings: serde_json::Value,
    pub(super) shards: usize,
    pub(super) top_k: usize,
}

/// The saved state of a shard's scoring pass (a checkpoint, or complete with `meta`).
#[derive(serde::Serialize)]
pub(super) struct ScoreStateRef<'a> {
    pub(super) summaries: &'a [results::QuerySummary],
    pub(super) dense_columns: u64,
    /// Records of a layer partition's parts file ([`results::parts`]) at this state.
    pub(super) parts_records: u64,
    pub(super) meta: Option<&'a ScoresMeta>,
}

#[derive(serde::Deserialize)]
pub(super) struct ScoreState {
    pub(super) summaries: Vec<results::QuerySummary>,
    pub(super) dense_columns: u64,
    #[serde(default)]
    pub(super) parts_records: u64,
    pub(super) meta: Option<ScoresMeta>,
}

pub(super) fn parse_score_state(bytes: &[u8], what: &str) -> Result<ScoreState> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Mismatch(format!(
            "{what}: unreadable scoring state ({e}); rerun with --fresh"
        ))
    })
}

pub(super) fn dense_row_paths(work: &Path, shard: Shard, n_queries: usize) -> Vec<PathBuf> {
    (0..n_queries)
        .map(|q| work.join(format!("dense.{}.q{q}.f32", shard.tag())))
        .collect()
}

/// The shards' scoring states of a results directory, merged.
pub(super) struct MergedScores {
    pub(super) summaries: Vec<results::QuerySummary>,
    pub(super) meta: ScoresMeta,
    pub(super) dense_rows: Vec<Vec<PathBuf>>,
    pub(super) shards: usize,
    /// What `--target-recall` did to the pre-filter, when it ran.
    pub(super) widening: Option<results::Widening>,
    /// The seeds of `fit --seeds` fits whose stability the summaries track (empty: one fit).
    pub(super) seeds: Vec<u64>,
}

pub(super) fn gather_scores(out: &Path) -> Result<MergedScores> {
    let work = out.join(WORK_DIR);
    let template: ScoreTemplate = io::read_json(&work.join(SCORE_TEMPLATE_FILE))?;
    let n = template.shards;
    let mut merged: Option<(Vec<results::QuerySummary>, ScoresMeta)> = None;
    let mut missing = Vec::new();
    for i in 0..n {
        let shard = Shard { index: i, count: n };
        let stem = format!("score.{}", shard.tag());
        match checkpoint::load(&work, &stem, &template.settings)? {
            Some((m, bytes)) if m.complete => {
                let state = parse_score_state(&bytes, &m.file)?;
                let meta = state.meta.ok_or_else(|| {
                    Error::Mismatch(format!("{}: complete state without meta", m.file))
                })?;
                merged = Some(match merged {
                    None => (state.summaries, meta),
                    Some((mut all, first)) => {
                        for (a, b) in all.iter_mut().zip(&state.summaries) {
                            a.merge(b, template.top_k);
                        }
                        (all, first)
                    }
                });
            }
            Some((m, _)) => missing.push(format!("{i} (at corpus sequence {})", m.position)),
            None => missing.push(format!("{i} (not started)")),
        }
    }
    if !missing.is_empty() {
        return Err(Error::input(format!(
            "{}: the scoring pass is not finished on shard(s) {} of {n}; run `infl score --shard i/{n}` for them first",
            out.display(),
            missing.join(", ")
        )));
    }
    let (summaries, meta) = merged.ok_or_else(|| Error::input("no shards to merge"))?;
    let n_queries = meta.queries.ids.len();
    Ok(MergedScores {
        dense_rows: (0..n)
            .map(|i| dense_row_paths(&work, Shard { index: i, count: n }, n_queries))
            .collect(),
        summaries,
        meta,
        shards: n,
        widening: None,
        seeds: Vec::new(),
    })
}

/// Writes a results directory from merged summaries: top_k.jsonl, distribution.json,
/// layers.json, scores.safetensors, then meta.json (last), and removes the work state.
pub(super) fn write_scores(
    out: &Path,
    merged: &MergedScores,
    token_parts: Option<&std::collections::HashMap<(usize, usize), Vec<results::TokenPart>>>,
) -> Result<Vec<results::TopEntry>> {
    let meta = &merged.meta;
    let query_ids = &meta.queries.ids;
    let mut tok = LazyTokenizer::new(Path::new(&meta.model.path));
    let mut top = results::entries(
        &merged.summaries,
        query_ids,
        &mut tok,
        meta.options.per_layer,
        token_parts,
        meta.removal.as_ref(),
    );
    let stability = results::stability::stability(
        &merged.summaries,
        query_ids,
        &merged.seeds,
        (meta.options.top_k, meta.options.stable_overlap),
    );
    if let Some(file) = &stability {
        results::stability::annotate(&mut top, file);
        results::stability::write_stability(&out.join("stability.json"), file)?;
    }
    results::write_top_k(&out.join("top_k.jsonl"), &top)?;
    results::write_distribution(&out.join("distribution.json"), &merged.summaries, query_ids)?;
    if meta.options.per_layer {
        results::write_layers(
            &out.join("layers.json"),
            &merged.summaries,
            query_ids,
            &meta.layers,
        )?;
    }
    if meta.options.prefilter.is_some() && meta.options.prefilter_sample > 0 {
        results::write_prefilter(
            &out.join("prefilter.json"),
            &merged.summaries,
            query_ids,
            (meta.options.top_k, meta.corpus.n_sequences),
            meta.options.prefilter.unwrap_or(0),
            merged.widening.as_ref(),
        )?;
    }
    if meta.options.dense {
        results::write_dense_from_shards(
            &out.join("scores.safetensors"),
            query_ids,
            &merged.dense_rows,
            meta.corpus.n_sequences,
        )?;
    }
    if meta.options.parquet {
        results::parquet::write_results_parquet(out, meta, &top)?;
    }
    io::write_json(&out.join(META_FILE), meta)?;
    let work = out.join(WORK_DIR);
    std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    Ok(top)
}

/// Merges the shards of a sharded score into a results directory.
pub struct ScoresMerged {
    pub outcome: MergeOutcome,
    pub top: Vec<results::TopEntry>,
}

pub fn merge_scores(out: &Path) -> Result<ScoresMerged> {
    let merged = gather_scores(out)?;
    let top = write_scores(out, &merged, None)?;
    Ok(ScoresMerged {
        outcome: MergeOutcome {
            finished: true,
            message: format!(
                "merged the scores of {} queries × {} training sequences from {} shard(s) → {}",
                merged.meta.queries.ids.len(),
                merged.meta.corpus.n_sequences,
                merged.shards,
                out.display()
            ),
        },
        top,
    })
}
