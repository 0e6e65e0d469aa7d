//! The stages as file-to-file jobs, like kronfluence's factors and scores: [`fit`] writes a
//! factors directory, [`score`] and [`self_influence`] read it back and refuse factors that
//! belong to another model or other settings, [`merge`] joins the shards of either. Every
//! output records what made it.

mod fit;
mod fit_merge;
mod fit_partitions;
mod fit_seeds;
mod query;
mod score;
mod score_merge;
mod score_partitions;
mod score_seeds;
mod score_store;
mod score_widen;
mod self_influence;

pub use fit::{fit, FitJob, FitSummary};
pub use fit_merge::merge_factors;
pub use query::{
    Answer, AnswerProvenance, EngineConfig, QueryEngine, QueryOptions, Sampling, SequenceInfo,
};
pub use score::{score, ScoreJob, ScoreSummary};
pub use score_merge::{merge_scores, ScoresMerged};
pub use self_influence::{self_influence, SelfInfluenceJob};

use fit_merge::FIT_TEMPLATE_FILE;
use score_merge::SCORE_TEMPLATE_FILE;

use crate::checkpoint;
use crate::curvature::format::{open_factors, FactorsMeta, FACTORS_FILE};
use crate::error::{Error, Result};
use crate::influence::{Damping, Preconditioner};
use crate::io;
use crate::model::{self, TapModel};
use crate::options::Compute;
use crate::output_dir::OutputDir;
use crate::pass::Progress;
use crate::provenance::{AdapterInfo, ModelInfo};
use crate::shard::Shard;
use std::path::Path;

/// Intermediate state of a fit or score (pass sums, shard results, checkpoints), inside its
/// output directory; removed once the final files are written.
pub const WORK_DIR: &str = "work";

/// Sequences per streamed chunk, in batches.
pub(super) const CHUNK_BATCHES: usize = 16;

/// Refuses to add to a work directory that another job (other settings, or another shard
/// count) started: its shards would not merge.
fn check_same_job<T: serde::de::DeserializeOwned>(
    template: &Path,
    settings: &serde_json::Value,
    settings_of: impl Fn(T) -> serde_json::Value,
) -> Result<()> {
    if !template.exists() {
        return Ok(());
    }
    let theirs = settings_of(io::read_json(template)?);
    if &theirs != settings {
        return Err(Error::Mismatch(format!(
            "{}: a run with other settings ({}) left its state here; rerun with those settings, or with --fresh to discard it",
            template.display(),
            checkpoint::differing_keys(&theirs, settings)
        )));
    }
    Ok(())
}

/// The work directory of a fit or score in the locked `out`, started or resumed: the run's
/// settings claimed for the directory ([`OutputDir::claim`]), the work state discarded when
/// asked, refused when another job's state is there, with this job's template written.
pub(super) fn open_work_dir<T: serde::Serialize + serde::de::DeserializeOwned>(
    out: &OutputDir,
    fresh: bool,
    template_file: &str,
    settings: &serde_json::Value,
    template: &T,
    settings_of: impl Fn(T) -> serde_json::Value,
) -> Result<std::path::PathBuf> {
    out.claim(settings, fresh)?;
    let work = out.path().join(WORK_DIR);
    if fresh && work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    }
    io::ensure_dir(&work)?;
    let template_path = work.join(template_file);
    check_same_job(&template_path, settings, settings_of)?;
    io::write_json(&template_path, template)?;
    Ok(work)
}

pub(super) fn check_max_len(max_len: usize, model: &dyn TapModel) -> Result<()> {
    crate::options::MAX_LEN.check(max_len)?;
    if max_len > model.max_positions() {
        return Err(Error::input(format!(
            "--max-len {max_len} must be at most the model's context length {}",
            model.max_positions()
        )));
    }
    Ok(())
}

/// Model, factors and preconditioner, checked to belong together.
pub(super) struct Prepared {
    pub(super) fmeta: FactorsMeta,
    pub(super) model: Box<dyn TapModel>,
    pub(super) model_info: ModelInfo,
    pub(super) preconditioner: Preconditioner,
    pub(super) max_len: usize,
}

pub(super) fn prepare(
    model_dir: &Path,
    factors_dir: &Path,
    (damping, max_len): (Damping, Option<usize>),
    compute: Compute,
) -> Result<Prepared> {
    prepare_layers(model_dir, factors_dir, (damping, max_len), compute, None)
}

/// [`prepare`] for `partition` of the factors' layers (a layer partition's scoring pass): the
/// model tracks, and the preconditioner holds, only those.
pub(super) fn prepare_layers(
    model_dir: &Path,
    factors_dir: &Path,
    (damping, max_len): (Damping, Option<usize>),
    compute: Compute,
    partition: Option<&[String]>,
) -> Result<Prepared> {
    let fmeta = open_factors(factors_dir)?;
    // Checked before the model loads: the adapter's files are small, the model may not be.
    let adapter = compute
        .adapter
        .as_deref()
        .map(AdapterInfo::of)
        .transpose()?;
    AdapterInfo::check(
        &adapter,
        &fmeta.model.adapter,
        &format!("the factors in {}", factors_dir.display()),
    )?;
    let mut model = model::load(model_dir, fmeta.options.modules, compute)?;
    if let Some(names) = &fmeta.options.layers {
        model = model::select_layers(model, names)?;
    }
    let model_info = ModelInfo {
        adapter,
        ..ModelInfo::of(model_dir, model.as_ref())?
    };
    if model_info.weights_sha256 != fmeta.model.weights_sha256
        || model_info.config_sha256 != fmeta.model.config_sha256
    {
        return Err(Error::Mismatch(format!(
            "the factors in {} were fitted on another model ({}, weights sha256 {}…), not on {} (weights sha256 {}…); rerun `infl fit` with this model",
            factors_dir.display(),
            fmeta.model.path,
            &fmeta.model.weights_sha256[..12],
            model_dir.display(),
            &model_info.weights_sha256[..12]
        )));
    }
    let names: Vec<&str> = model.tracked().iter().map(|l| l.name.as_str()).collect();
    let fitted: Vec<&str> = fmeta
        .layers
        .iter()
        .filter_map(|l| l.get("name")?.as_str())
        .collect();
    if names != fitted {
        return Err(Error::Mismatch(format!(
            "the factors track layers {fitted:?} but the model gives {names:?}"
        )));
    }
    if let Some(names) = partition {
        model = model::select_layers(model, names)?;
    }
    let preconditioner = Preconditioner::from_file(
        &factors_dir.join(FACTORS_FILE),
        fmeta.options.strategy,
        model.tracked(),
        damping,
    )?;
    let max_len = max_len.unwrap_or(fmeta.corpus.max_len);
    check_max_len(max_len, model.as_ref())?;
    Ok(Prepared {
        fmeta,
        model,
        model_info,
        preconditioner,
        max_len,
    })
}

/// Writes a partitioned run's plan to `path`, or checks that the one already there is the
/// same (every partition's process must plan alike).
fn record_plan<T>(path: &Path, plan: &T) -> Result<()>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq,
{
    if path.exists() {
        let theirs: T = crate::io::read_json(path)?;
        if &theirs != plan {
            return Err(Error::Mismatch(format!(
                "{}: the partitions here were planned with another count, other layers, shards or settings; use the same options, or another --out",
                path.display()
            )));
        }
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        crate::io::ensure_dir(dir)?;
    }
    crate::io::write_json(path, plan)
}

/// What `infl merge` did.
pub struct MergeOutcome {
    /// The final files are written.
    pub finished: bool,
    pub message: String,
}

/// `infl merge DIR`: merges the shards of the fit or score whose `--out` was `DIR`, holding
/// the directory's exclusive lock (no shard may still be running). `progress` reports the
/// eigendecompositions a merged covariance pass needs.
pub fn merge(dir: &Path, progress: &dyn Progress) -> Result<MergeOutcome> {
    if !dir.is_dir() {
        return Err(Error::input(format!(
            "{}: no such directory; give the --out of a sharded `infl fit` or `infl score`",
            dir.display()
        )));
    }
    let _lock = OutputDir::lock(dir, Shard::WHOLE)?;
    let work = dir.join(WORK_DIR);
    if work.join(fit_partitions::PLAN_FILE).exists() {
        return fit_partitions::join_partitions(dir, progress);
    }
    if work.join(FIT_TEMPLATE_FILE).exists() {
        return merge_factors(dir, progress);
    }
    if work.join(score_partitions::SCORE_PLAN_FILE).exists() {
        return score_partitions::join_score_partitions(dir).map(|j| j.outcome);
    }
    if work.join(SCORE_TEMPLATE_FILE).exists() {
        return merge_scores(dir).map(|m| m.outcome);
    }
    Err(Error::input(format!(
        "{}: nothing to merge (no {WORK_DIR}/ with the state of a sharded `infl fit` or `infl score`)",
        dir.display()
    )))
}
