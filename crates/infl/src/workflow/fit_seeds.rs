//! `fit --seeds K`: the factors fitted K times with sampled-Fisher seeds S..S+K−1. OUT holds
//! the seed-S fit (its meta.json records `seeds`), and `OUT/seeds/SEED/` each other fit, a
//! factors directory of its own; `score` reads them all ([`seed_dirs`]) to measure how stable
//! each query's ranking is across the fits ([`crate::results::stability`]).
//!
//! The seed drives only the labels sampled for the Fisher (the covariance and eigenvalue
//! passes), so the K fits differ by the Monte-Carlo noise of the sampled Fisher alone; corpus,
//! windows and layers are the same.

use super::fit::{fit_one, FitJob, FitSummary};
use crate::curvature::{Fisher, Strategy};
use crate::error::{Error, Result};
use crate::options::FitOptions;
use crate::pass::Progress;
use std::path::{Path, PathBuf};

/// The folder of a `--seeds` fit's other fits.
pub const SEEDS_DIR: &str = "seeds";

/// The factors directories of the fits of `options` (fitted into `factors`): the seed's own
/// first.
pub fn seed_dirs(factors: &Path, options: &FitOptions) -> Vec<(u64, PathBuf)> {
    (0..options.seeds as u64)
        .map(|j| {
            let seed = options.seed.wrapping_add(j);
            let dir = match j {
                0 => factors.to_path_buf(),
                _ => factors.join(SEEDS_DIR).join(seed.to_string()),
            };
            (seed, dir)
        })
        .collect()
}

/// Fits the seed's factors into OUT, then each other seed's into `OUT/seeds/SEED/`.
pub(super) fn fit_seeds(job: &FitJob, progress: &dyn Progress) -> Result<FitSummary> {
    let o = &job.options;
    if o.fisher != Fisher::Sampled || o.strategy == Strategy::Identity {
        return Err(Error::input(
            "--seeds K refits the sampled Fisher with other seeds: it needs --fisher sampled and a strategy with curvature (the empirical Fisher and identity do not depend on the seed)",
        ));
    }
    if !job.run.shard.is_whole() || !job.partitioning.is_none() || job.store.is_some() {
        return Err(Error::input(
            "--seeds does not go with --shard, layer partitions or --store: fit each seed on its own (`--seed S`) for those",
        ));
    }
    let mut summary = fit_one(job, progress)?;
    for (seed, dir) in seed_dirs(&job.out, o).into_iter().skip(1) {
        let one = FitJob {
            out: dir,
            options: FitOptions {
                seed,
                seeds: 1,
                ..o.clone()
            },
            ..job.clone()
        };
        let s = fit_one(&one, progress)?;
        summary.seconds += s.seconds;
        summary.message.push_str(&format!(
            "\nseed {seed}: {} → {}",
            s.message,
            one.out.display()
        ));
    }
    Ok(summary)
}
