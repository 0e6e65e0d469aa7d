//! `infl fit` a partition of the tracked layers at a time ([`crate::partition`]): each
//! partition is an ordinary fit of its own layers in `FACTORS/work/partition-i-of-P/` (so it
//! resumes, shards and merges as any fit does), and joining them writes the one
//! factors.safetensors and meta.json an unpartitioned fit writes, tensor for tensor.

use super::fit::{fit, open_model, FitJob, FitSummary};
use super::fit_merge::merge_factors;
use super::{MergeOutcome, WORK_DIR};
use crate::curvature::format::{open_factors, FactorsMeta, FACTORS_FILE};
use crate::error::{Error, Result};
use crate::io;
use crate::model::{TapModel, TrackedLayer};
use crate::options::{FitOptions, Partitioning};
use crate::output_dir::{Kind, OutputDir};
use crate::partition::{self, Partition};
use crate::pass::Progress;
use crate::provenance::{ModelInfo, META_FILE};
use crate::shard::Shard;
use std::path::{Path, PathBuf};

/// The plan every partition of one fit shares, in `FACTORS/work/partitions.json`.
pub(super) const PLAN_FILE: &str = "partitions.json";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct PartitionPlan {
    count: usize,
    /// Every tracked layer, in the model's order; partition i holds `partition::plan(..)[i]`.
    tracked: Vec<TrackedLayer>,
    /// The fit's options (the user's `--layers`, not a partition's).
    options: FitOptions,
    model_config_sha256: String,
    model_weights_sha256: String,
}

/// A partition's own directory.
fn partition_dir(out: &Path, p: Partition) -> PathBuf {
    out.join(WORK_DIR).join(format!("partition-{}", p.tag()))
}

/// `infl fit` with `--partition`, `--partitions` or `--memory-limit`.
pub(super) fn fit_partitioned(job: &FitJob, progress: &dyn Progress) -> Result<FitSummary> {
    let started = std::time::Instant::now();
    job.options.check()?;
    job.run.check()?;
    job.partitioning.check()?;
    if job.store.is_some() {
        return Err(Error::usage(
            "--store is written by an unpartitioned fit; fit in partitions without it, or score without a store",
        ));
    }
    if job.partitioning.partition.is_none() && !job.run.shard.is_whole() {
        return Err(Error::usage(
            "--partitions and --memory-limit run every partition in this process, which a shard cannot; shard a partitioned fit with `--partition i/P --shard j/N`, one process each",
        ));
    }
    let model = open_model(job)?;
    let tracked = model.tracked().to_vec();
    let (count, run_here) = partitions_to_run(job, model.as_ref())?;
    // The directory's lock: exclusive when this process runs every partition, else shared
    // with the other partitions' (and shards') processes plus one of its own.
    let shard = job.run.shard;
    let lock_as = match run_here.as_slice() {
        [one] if count > 1 || !shard.is_whole() => Shard {
            index: one.index * shard.count + shard.index,
            count: count * shard.count,
        },
        _ => Shard::WHOLE,
    };
    let out = OutputDir::open(&job.out, Kind::Factors, lock_as, job.run.output.overwrite)?;
    let info = ModelInfo::of(&job.model, model.as_ref())?;
    let plan = PartitionPlan {
        count,
        tracked: tracked.clone(),
        options: job.options.clone(),
        model_config_sha256: info.config_sha256,
        model_weights_sha256: info.weights_sha256,
    };
    let settings = serde_json::json!({ "stage": "fit-partitioned", "plan": plan });
    out.claim(&settings, job.run.fresh)?;
    super::record_plan(&job.out.join(WORK_DIR).join(PLAN_FILE), &plan)?;
    drop(model);
    let ranges = partition::plan(&tracked, count);
    let (mut n_sequences, mut n_tokens) = (0, 0);
    for &p in &run_here {
        let layers = &tracked[ranges[p.index].clone()];
        if let Some(done) = fitted(&job.out, &plan, p, &ranges[p.index])? {
            eprintln!("partition {p}: already fitted");
            (n_sequences, n_tokens) = (done.corpus.n_sequences, done.corpus.n_tokens);
            continue;
        }
        eprintln!(
            "partition {p}: {} layers ({} … {}), {:.1} MiB of factors",
            layers.len(),
            layers[0].name,
            layers[layers.len() - 1].name,
            layers.iter().map(partition::factor_bytes).sum::<u64>() as f64 / (1u64 << 20) as f64
        );
        let sub = FitJob {
            out: partition_dir(&job.out, p),
            options: FitOptions {
                layers: Some(layers.iter().map(|l| l.name.clone()).collect()),
                ..job.options.clone()
            },
            partitioning: Partitioning::default(),
            ..job.clone()
        };
        let done = fit(&sub, progress)?;
        (n_sequences, n_tokens) = (done.n_sequences, done.n_tokens);
        if !done.finished {
            return Ok(FitSummary {
                seconds: started.elapsed().as_secs_f64(),
                message: format!(
                    "partition {p}: {}; then `infl merge {}` joins the partitions",
                    done.message,
                    job.out.display()
                ),
                ..done
            });
        }
    }
    let (finished, message) = if run_here.len() == count {
        // This process holds the directory's exclusive lock.
        let joined = join_partitions(&job.out, progress)?;
        (joined.finished, joined.message)
    } else {
        let p = run_here[0];
        (
            false,
            format!(
                "partition {p} fitted; when all {count} partitions are, run `infl merge {}`",
                job.out.display()
            ),
        )
    };
    Ok(FitSummary {
        n_sequences,
        n_tokens,
        n_layers: tracked.len(),
        seconds: started.elapsed().as_secs_f64(),
        finished,
        message,
    })
}

/// The factors of partition `p`, when a previous run finished them for this plan (a rerun of
/// a killed `--partitions` run resumes after them).
fn fitted(
    out: &Path,
    plan: &PartitionPlan,
    p: Partition,
    range: &std::ops::Range<usize>,
) -> Result<Option<FactorsMeta>> {
    let dir = partition_dir(out, p);
    if !dir.join(META_FILE).exists() {
        return Ok(None);
    }
    let meta = open_factors(&dir)?;
    check_partition(plan, p, range, &meta)?;
    Ok(Some(meta))
}

/// The partition count and the partitions this process runs.
fn partitions_to_run(job: &FitJob, model: &dyn TapModel) -> Result<(usize, Vec<Partition>)> {
    let max_len = job.options.max_len.unwrap_or(model.max_positions());
    let batch = job.options.batch_size;
    partition::to_run(&job.partitioning, model.tracked(), |budget| {
        crate::inspect::partitions_for(model, batch, max_len, budget).ok_or_else(|| {
            Error::usage(format!(
                "--memory-limit {:.2} GiB: even one layer per partition needs more (the weights and one batch alone are {:.2} GiB by `infl inspect`'s estimate); use a smaller --batch-size or --max-len",
                budget as f64 / (1u64 << 30) as f64,
                crate::inspect::fit_fixed_bytes(model, batch, max_len) as f64
                    / (1u64 << 30) as f64
            ))
        })
    })
}

/// `infl merge FACTORS` of a partitioned fit: merges each partition's shards where they
/// need it, and once every partition's factors are written joins them into
/// `FACTORS/factors.safetensors` and `meta.json`, then removes the work directory.
pub(super) fn join_partitions(out: &Path, progress: &dyn Progress) -> Result<MergeOutcome> {
    let plan: PartitionPlan = io::read_json(&out.join(WORK_DIR).join(PLAN_FILE))?;
    let ranges = partition::plan(&plan.tracked, plan.count);
    let mut pending = Vec::new();
    for index in 0..plan.count {
        let p = Partition {
            index,
            count: plan.count,
        };
        let dir = partition_dir(out, p);
        if dir.join(META_FILE).exists() {
            continue;
        }
        if dir
            .join(WORK_DIR)
            .join(super::fit_merge::FIT_TEMPLATE_FILE)
            .exists()
        {
            let merged = merge_factors(&dir, progress)?;
            if !merged.finished {
                pending.push(format!("partition {p}: {}", merged.message));
            }
        } else {
            pending.push(format!("partition {p}: not started"));
        }
    }
    if !pending.is_empty() {
        return Ok(MergeOutcome {
            finished: false,
            message: format!(
                "not every partition is fitted yet ({}); run `infl fit --partition i/{}` for them, then `infl merge {}` again",
                pending.join("; "),
                plan.count,
                out.display()
            ),
        });
    }
    let metas = (0..plan.count)
        .map(|index| {
            let p = Partition {
                index,
                count: plan.count,
            };
            let meta = open_factors(&partition_dir(out, p))?;
            check_partition(&plan, p, &ranges[index], &meta)?;
            Ok(meta)
        })
        .collect::<Result<Vec<_>>>()?;
    write_joined(out, &plan, &metas)
}

/// A partition's factors belong to the plan: its model, its layers, the plan's options, and
/// the same corpus as partition 0's.
fn check_partition(
    plan: &PartitionPlan,
    p: Partition,
    range: &std::ops::Range<usize>,
    meta: &FactorsMeta,
) -> Result<()> {
    let names: Vec<&str> = plan.tracked[range.clone()]
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    let theirs: Vec<&str> = meta
        .layers
        .iter()
        .filter_map(|l| l.get("name")?.as_str())
        .collect();
    let own_options = FitOptions {
        layers: plan.options.layers.clone(),
        ..meta.options.clone()
    };
    if names != theirs
        || own_options != plan.options
        || meta.model.weights_sha256 != plan.model_weights_sha256
        || meta.model.config_sha256 != plan.model_config_sha256
    {
        return Err(Error::Mismatch(format!(
            "partition {p}: its factors were fitted with other layers, options or model than the plan in {PLAN_FILE}; refit it with --fresh"
        )));
    }
    Ok(())
}

/// factors.safetensors of every partition's tensors, streamed from their files, and the
/// meta.json an unpartitioned fit writes.
fn write_joined(out: &Path, plan: &PartitionPlan, metas: &[FactorsMeta]) -> Result<MergeOutcome> {
    let first = &metas[0];
    for (index, m) in metas.iter().enumerate() {
        if m.corpus != first.corpus {
            return Err(Error::Mismatch(format!(
                "partition {index}/{}: fitted on another corpus (sha256 {}…, {} sequences) than partition 0 (sha256 {}…, {} sequences); refit it with --fresh",
                plan.count,
                &m.corpus.sha256[..12.min(m.corpus.sha256.len())],
                m.corpus.n_sequences,
                &first.corpus.sha256[..12.min(first.corpus.sha256.len())],
                first.corpus.n_sequences
            )));
        }
    }
    // Read a tensor at a time, not mapped: a mapping's pages stay resident as the join goes
    // (4 GiB more of a 1B model's 25 GiB before the kernel took any back).
    let files = (0..plan.count)
        .map(|index| {
            let p = Partition {
                index,
                count: plan.count,
            };
            io::TensorFile::open(&partition_dir(out, p).join(FACTORS_FILE))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut tensors = Vec::new();
    for f in &files {
        for name in f.names() {
            tensors.extend(io::TensorRef::in_file(f, name).map(|t| (name.to_string(), t)));
        }
    }
    let joined = out.join(FACTORS_FILE);
    let factors_sha256 = io::write_tensors(&joined, tensors, None)?;
    if let Some(e) = files.iter().find_map(io::TensorFile::read_error) {
        // The file holds zeros where a tensor could not be read: never vouched for.
        let _ = std::fs::remove_file(&joined);
        return Err(Error::Other(format!(
            "reading a partition's factors for the joined file failed ({e}); rerun `infl merge {}`",
            out.display()
        )));
    }
    drop(files);
    let meta = FactorsMeta::new(
        plan.options.clone(),
        first.model.clone(),
        first.corpus.clone(),
        metas.iter().flat_map(|m| m.layers.clone()).collect(),
        factors_sha256,
    );
    // meta.json last: it vouches for the safetensors file by hash.
    io::write_json(&out.join(META_FILE), &meta)?;
    let work = out.join(WORK_DIR);
    std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    Ok(MergeOutcome {
        finished: true,
        message: format!(
            "fitted {:?} factors for {} layers in {} partitions on {} sequences ({} tokens) → {}",
            plan.options.strategy,
            plan.tracked.len(),
            plan.count,
            first.corpus.n_sequences,
            first.corpus.n_tokens,
            out.display()
        ),
    })
}
