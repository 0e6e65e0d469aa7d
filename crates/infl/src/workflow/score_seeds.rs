//! Scoring against the K fits of `fit --seeds K`: every other fit's damped inverse
//! preconditions the same queries, and the one corpus pass dots each training gradient with
//! all K sets of preconditioned queries ([`ScoreRun::track`](super::score::ScoreRun)); the
//! seed fit's scores are the results, the others only feed each query's stability
//! ([`crate::results::stability`]).

use super::fit_seeds::seed_dirs;
use super::score::ScoreJob;
use super::Prepared;
use crate::curvature::format::{open_factors, FACTORS_FILE};
use crate::data::Query;
use crate::error::{Error, Result};
use crate::influence::{self, PreconditionedQueries, Preconditioner};
use crate::options::{Normalize, ScoreOptions};
use crate::pass::Progress;

/// The other fits' preconditioned queries (none for a one-seed fit), with their seeds after
/// the seed fit's own; what does not go with them is refused.
pub(super) fn other_fits(
    job: &ScoreJob,
    options: &ScoreOptions,
    prepared: &Prepared,
    queries: &[Query],
    progress: &dyn Progress,
) -> Result<(Vec<PreconditionedQueries>, Vec<u64>)> {
    let fmeta = &prepared.fmeta;
    let dirs = seed_dirs(&job.factors, &fmeta.options);
    let seeds: Vec<u64> = dirs.iter().map(|(s, _)| *s).collect();
    if dirs.len() < 2 {
        return Ok((Vec::new(), seeds));
    }
    let model = prepared.model.as_ref();
    if !job.run.shard.is_whole()
        || options.store
        || !job.partitioning.is_none()
        || options.target_recall.is_some()
        || options.normalize == Normalize::Cosine
        || prepared.preconditioner.is_refined()
        || crate::model::statistics_device(model)?.is_some()
    {
        return Err(Error::input(format!(
            "the factors in {} hold {} fits (`fit --seeds`): their stability is scored in one unsharded pass on the CPU, without --store, layer partitions, --target-recall, --normalize cosine or ekfac-refined; score one fit's directory (e.g. {}) for those",
            job.factors.display(),
            dirs.len(),
            job.factors.join(super::fit_seeds::SEEDS_DIR).join(seeds[1].to_string()).display()
        )));
    }
    let mut out = Vec::with_capacity(dirs.len() - 1);
    for (seed, dir) in dirs.into_iter().skip(1) {
        let theirs = open_factors(&dir).map_err(|e| {
            Error::Mismatch(format!(
                "{}: the fit of seed {seed} of a `fit --seeds {}` is missing or unreadable ({e}); rerun the fit",
                dir.display(),
                fmeta.options.seeds
            ))
        })?;
        let same = theirs.model.weights_sha256 == fmeta.model.weights_sha256
            && theirs.corpus.sha256 == fmeta.corpus.sha256
            && theirs.layers.len() == fmeta.layers.len()
            && theirs.options.seed == seed
            && theirs.options.strategy == fmeta.options.strategy
            && theirs.options.max_len == fmeta.options.max_len;
        if !same {
            return Err(Error::Mismatch(format!(
                "{}: not the seed-{seed} fit of the same model, corpus, layers and strategy as {}; rerun `infl fit --seeds`",
                dir.display(),
                job.factors.display()
            )));
        }
        let mut preconditioner = Preconditioner::from_file(
            &dir.join(FACTORS_FILE),
            fmeta.options.strategy,
            model.tracked(),
            options.damping,
        )?;
        out.push(influence::precondition_queries(
            model,
            queries,
            &preconditioner,
            options.batch_size,
            options.query_rank.0,
            false,
            progress,
        )?);
        preconditioner.release();
    }
    Ok((out, seeds))
}
