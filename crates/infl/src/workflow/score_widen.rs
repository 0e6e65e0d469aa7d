//! `score --target-recall R`: after the pre-filtered pass, each query whose estimated recall
//! (the lower end of its 95% interval, [`results::estimate`]) is below R has its BM25
//! candidates widened, N doubling up to `--prefilter-max`, and only the new candidates are
//! scored, with a recall sample redrawn outside the wider set; round after round until every
//! query reaches R or its budget is spent. Each round is a pass of its own in the work
//! directory (`score.widen{r}`), checkpointed and resumed like the first.

use super::score::{streamed_pass, MemoryCheck, ScoreRun};
use super::score_merge::MergedScores;
use crate::data::{LazyTokenizer, Query};
use crate::error::{Error, Result};
use crate::index::Bm25Index;
use crate::model::TapModel;
use crate::results::{self, Prefilter, PrefilterRecall, Widening};
use std::collections::HashSet;

/// What a widening round needs of the first pass.
pub(super) struct Widen<'a> {
    pub(super) run: &'a ScoreRun<'a>,
    pub(super) model: &'a dyn TapModel,
    pub(super) memory: &'a MemoryCheck<'a>,
    pub(super) max_len: usize,
    pub(super) queries: &'a [Query],
}

/// Widens the queries that miss the target, merging each round's new candidates into
/// `merged`'s summaries; returns each query's N in the end.
pub(super) fn widen(
    w: &Widen<'_>,
    merged: &mut MergedScores,
    tok: &mut LazyTokenizer,
    checked_len: &mut usize,
) -> Result<Widening> {
    let (run, o) = (w.run, w.run.options);
    let (Some(n0), Some(target), Some(max), Some(dir)) = (
        o.prefilter,
        o.target_recall,
        o.prefilter_budget(),
        run.job.index.as_ref(),
    ) else {
        return Err(Error::Other(
            "--target-recall without --prefilter and --index".into(),
        ));
    };
    let index = Bm25Index::open(dir)?;
    let n_seq = merged.meta.corpus.n_sequences;
    let nq = merged.summaries.len();
    let k = o.top_k;
    let mut widening = Widening {
        target,
        max,
        used: vec![n0.min(n_seq); nq],
    };
    for round in 1.. {
        let ests = results::estimates(
            &merged.summaries,
            &merged.meta.queries.ids,
            (k, n_seq),
            n0,
            Some(&widening),
        );
        let next: Vec<Option<usize>> = ests
            .iter()
            .zip(&widening.used)
            .map(|(e, &used)| match widening.meets(e) {
                true => None,
                false => widening.next(used, n_seq),
            })
            .collect();
        if next.iter().all(Option::is_none) {
            break;
        }
        // Candidates nest (BM25 order with ties by position), so the new ones are the
        // difference; the old recall sample is replaced by one drawn outside the wider set.
        let mut candidates = vec![HashSet::new(); nq];
        let mut sampled = vec![HashSet::new(); nq];
        for (q, n) in next.iter().enumerate() {
            let Some(n) = *n else { continue };
            let query = &w.queries[q];
            let old: HashSet<usize> = index
                .candidates(query, widening.used[q])
                .into_iter()
                .collect();
            let wide: HashSet<usize> = index.candidates(query, n).into_iter().collect();
            sampled[q] = results::sample_rest(n_seq, &wide, o.prefilter_sample, round, q);
            candidates[q] = wide.difference(&old).copied().collect();
        }
        let round_run = ScoreRun {
            candidates: Some(Prefilter {
                candidates: &candidates,
                sampled: &sampled,
            }),
            stem: format!("score.widen{round}"),
            ..*run
        };
        let mut saved = round_run.resume(nq)?;
        let union = candidates
            .iter()
            .chain(&sampled)
            .flatten()
            .copied()
            .collect();
        run.progress.begin("pre-filter widening pass", 0);
        let stats = streamed_pass(
            &round_run,
            w.model,
            w.memory,
            (w.max_len, Some(union)),
            tok,
            &mut saved,
            checked_len,
        )?;
        run.progress.end();
        if !saved.complete {
            saved.acc.flush()?;
            round_run.save(&saved, stats.n_sequences, Some(&merged.meta))?;
        }
        for (q, n) in next.iter().enumerate() {
            let (Some(n), Some(added)) = (*n, saved.acc.summaries.get(q)) else {
                continue;
            };
            let s = &mut merged.summaries[q];
            s.prefilter_sample.clear();
            s.merge(added, k);
            widening.used[q] = n;
        }
    }
    Ok(widening)
}

/// The terminal's account of a widened run: a line per query (its N, the recall's lower end,
/// whether it reached the target), and a warning naming the queries that did not.
pub(super) fn widening_text(ests: &[PrefilterRecall], w: &Widening) -> (String, Option<String>) {
    let mut lines = format!(
        "pre-filter widened to reach recall ≥ {} (lower end of the 95% interval), N at most {}:\n",
        w.target, w.max
    );
    let mut missed = Vec::new();
    for e in ests {
        let reached = w.meets(e);
        lines.push_str(&format!(
            "  {}: N = {}, recall {:.3} [{:.3}, {:.3}] {}\n",
            e.query_id,
            e.prefilter,
            e.recall,
            e.recall_low,
            e.recall_high,
            if reached { "reached" } else { "NOT reached" }
        ));
        if !reached {
            missed.push(e.query_id.clone());
        }
    }
    let warning = (!missed.is_empty()).then(|| {
        format!(
            "warning: --target-recall {} not reached within --prefilter-max {} for {} of {} queries ({}); the top-k of those may miss sequences the filter dropped",
            w.target,
            w.max,
            missed.len(),
            ests.len(),
            missed.join(", ")
        )
    });
    (lines, warning)
}
