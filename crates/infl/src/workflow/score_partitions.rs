//! `infl score` a partition of the tracked layers at a time ([`crate::partition`]): each
//! partition is an ordinary scoring run over its own layers in `RESULTS/work/partition-i-of-P/`
//! (so it shards and resumes as any score does) that also leaves every sequence's per-layer
//! parts ([`results::parts`]). A score is a sum over layers, so the join lays the partitions'
//! parts side by side in the model's layer order and reduces them exactly as an unpartitioned
//! pass does: the same top/bottom-k, distribution, per-layer parts and dense scores.

use super::score::{score_layers, ScoreJob, ScoreSummary};
use super::score_merge::{
    dense_row_paths, gather_scores, write_scores, ScoreStateRef, ScoreTemplate, SCORE_TEMPLATE_FILE,
};
use super::{MergeOutcome, CHUNK_BATCHES, WORK_DIR};
use crate::checkpoint;
use crate::curvature::format::{open_factors, FactorsMeta};
use crate::data::{self, LazyTokenizer, Sequence};
use crate::error::{Error, Result};
use crate::io;
use crate::model::TrackedLayer;
use crate::options::{Partitioning, ScoreOptions};
use crate::output_dir::{Kind, OutputDir};
use crate::partition::{self, Partition};
use crate::pass::Progress;
use crate::results::meta::ScoresMeta;
use crate::results::parts::{self, PartsInfo, PartsReader, PartsRecord};
use crate::results::{self, Prefilter, ScoreAccumulator};
use crate::shard::Shard;
use faer::Mat;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The plan every partition of one score shares, in `RESULTS/work/score-partitions.json`.
pub(super) const SCORE_PLAN_FILE: &str = "score-partitions.json";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct ScorePlan {
    /// Each partition's layers, in the model's order.
    partitions: Vec<Vec<String>>,
    shards: usize,
    /// The run's options (each partition's pass writes no dense matrix: the join does).
    options: ScoreOptions,
    factors_sha256: String,
    /// The corpus the join re-reads for the sequences' ids and tokens.
    train: PathBuf,
    model: PathBuf,
}

fn partition_dir(out: &Path, p: Partition) -> PathBuf {
    out.join(WORK_DIR).join(format!("partition-{}", p.tag()))
}

/// `infl score` with `--partition`, `--partitions` or `--memory-limit`.
pub(super) fn score_partitioned(job: &ScoreJob, progress: &dyn Progress) -> Result<ScoreSummary> {
    let started = std::time::Instant::now();
    let options = job.checked_options()?;
    job.partitioning.check()?;
    if options.store || options.per_token {
        return Err(Error::usage(
            "--store and --per-token score every layer in one pass: they do not go with --partition, --partitions or --memory-limit",
        ));
    }
    let shard = job.run.shard;
    if job.partitioning.partition.is_none() && !shard.is_whole() {
        return Err(Error::usage(
            "--partitions and --memory-limit run every partition in this process, which a shard cannot; shard a partitioned score with `--partition i/P --shard j/N`, one process each",
        ));
    }
    let fmeta = open_factors(&job.factors)?;
    if fmeta.options.strategy == crate::curvature::Strategy::EkfacRefined {
        // Its Gauss-Newton products couple every layer: a partition's alone would differ.
        return Err(Error::usage(
            "ekfac-refined factors refine each query through every layer at once: score them without --partition, --partitions or --memory-limit",
        ));
    }
    let tracked = fitted_layers(&fmeta.layers, &job.factors)?;
    let (count, run_here) = partitions_to_run(job, &fmeta, &tracked)?;
    let lock_as = match run_here.as_slice() {
        [one] if count > 1 || !shard.is_whole() => Shard {
            index: one.index * shard.count + shard.index,
            count: count * shard.count,
        },
        _ => Shard::WHOLE,
    };
    let out = OutputDir::open(&job.out, Kind::Scores, lock_as, job.run.output.overwrite)?;
    let ranges = partition::plan(&tracked, count);
    let plan = ScorePlan {
        partitions: ranges
            .iter()
            .map(|r| tracked[r.clone()].iter().map(|l| l.name.clone()).collect())
            .collect(),
        shards: shard.count,
        options: options.clone(),
        factors_sha256: fmeta.factors_sha256.clone(),
        train: job.train.clone(),
        model: job.model.clone(),
    };
    let settings = serde_json::json!({ "stage": "score-partitioned", "plan": plan });
    out.claim(&settings, job.run.fresh)?;
    super::record_plan(&job.out.join(WORK_DIR).join(SCORE_PLAN_FILE), &plan)?;
    let mut last = None;
    for &p in &run_here {
        let dir = partition_dir(&job.out, p);
        let layers = &plan.partitions[p.index];
        if job.run.fresh && dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        if parts::info_path(&dir, &shard.tag()).exists() {
            eprintln!("partition {p}: already scored");
            continue;
        }
        eprintln!(
            "partition {p}: {} layers ({} … {})",
            layers.len(),
            layers.first().map_or("", String::as_str),
            layers.last().map_or("", String::as_str),
        );
        let sub = ScoreJob {
            out: dir,
            options: ScoreOptions {
                dense: false,
                parquet: false,
                ..options.clone()
            },
            partitioning: Partitioning::default(),
            ..job.clone()
        };
        last = Some(score_layers(&sub, progress, Some(layers))?);
    }
    if run_here.len() == count && shard.is_whole() {
        // This process holds the directory's exclusive lock.
        let joined = join_score_partitions(&job.out)?;
        return Ok(ScoreSummary {
            summaries: joined.summaries,
            top: joined.top,
            meta: joined.meta,
            seconds: started.elapsed().as_secs_f64(),
            pass_seconds: 0.0,
            message: joined.outcome.message,
        });
    }
    let p = run_here[0];
    let (summaries, meta) = match last {
        Some(s) => (s.summaries, s.meta),
        None => (
            Vec::new(),
            read_info(&partition_dir(&job.out, p), shard)?.meta,
        ),
    };
    Ok(ScoreSummary {
        summaries,
        top: Vec::new(),
        meta,
        seconds: started.elapsed().as_secs_f64(),
        pass_seconds: 0.0,
        message: format!(
            "partition {p} of shard {shard} scored; when every partition (and shard) is, run `infl merge {}`",
            job.out.display()
        ),
    })
}

/// A joined partitioned score: what `infl merge` reports, and the results it wrote.
pub(super) struct Joined {
    pub(super) outcome: MergeOutcome,
    pub(super) top: Vec<results::TopEntry>,
    pub(super) summaries: Vec<results::QuerySummary>,
    pub(super) meta: ScoresMeta,
}

/// The factors' layers as `meta.json` records them (name, widths, bias).
fn fitted_layers(
    layers: &[std::collections::BTreeMap<String, serde_json::Value>],
    factors: &Path,
) -> Result<Vec<TrackedLayer>> {
    layers
        .iter()
        .map(|l| serde_json::from_value(serde_json::json!(l)))
        .collect::<std::result::Result<Vec<TrackedLayer>, _>>()
        .map_err(|e| {
            Error::Mismatch(format!(
                "{}: a layer record without its name and widths ({e}); refit the factors",
                factors.join(crate::provenance::META_FILE).display()
            ))
        })
}

/// The partition count and the partitions this process runs.
fn partitions_to_run(
    job: &ScoreJob,
    fmeta: &FactorsMeta,
    tracked: &[TrackedLayer],
) -> Result<(usize, Vec<Partition>)> {
    partition::to_run(&job.partitioning, tracked, |budget| {
        score_partitions_for(job, fmeta, tracked, budget)
    })
}

/// The fewest partitions whose scoring each fits in `budget` by `infl inspect`'s estimate.
fn score_partitions_for(
    job: &ScoreJob,
    fmeta: &FactorsMeta,
    tracked: &[TrackedLayer],
    budget: u64,
) -> Result<usize> {
    let mut model = crate::model::load(&job.model, fmeta.options.modules, job.compute.clone())?;
    if let Some(names) = &fmeta.options.layers {
        model = crate::model::select_layers(model, names)?;
    }
    let mut tok = LazyTokenizer::new(&job.model);
    let (queries, _) = data::read_queries(
        &job.queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?;
    let max_len = job.options.max_len.unwrap_or(fmeta.corpus.max_len);
    let fixed = crate::inspect::score_fixed_bytes(model.as_ref(), job.options.batch_size, max_len);
    let n = queries.len() as u64;
    partition::count_for_budget(tracked, budget, fixed, |layers| {
        let rank = job.options.query_rank.0;
        crate::inspect::score_layer_bytes(layers, n, rank, job.options.batch_size)
    })
    .ok_or_else(|| {
        Error::usage(format!(
            "--memory-limit {}: even one layer per partition needs more (the weights and one batch alone are {} by `infl inspect`'s estimate); use a smaller --batch-size or fewer queries per run",
            crate::inspect::human(budget),
            crate::inspect::human(fixed)
        ))
    })
}

fn read_info(dir: &Path, shard: Shard) -> Result<PartsInfo> {
    io::read_json(&parts::info_path(dir, &shard.tag()))
}

/// `infl merge RESULTS` of a partitioned score: once every partition has scored every shard,
/// joins their parts into each shard's reduction, then writes the results directory an
/// unpartitioned score writes.
pub(super) fn join_score_partitions(out: &Path) -> Result<Joined> {
    let work = out.join(WORK_DIR);
    let plan: ScorePlan = io::read_json(&work.join(SCORE_PLAN_FILE))?;
    let count = plan.partitions.len();
    let mut pending = Vec::new();
    for index in 0..count {
        for s in 0..plan.shards {
            let shard = Shard {
                index: s,
                count: plan.shards,
            };
            let dir = partition_dir(out, Partition { index, count });
            if !parts::info_path(&dir, &shard.tag()).exists() {
                pending.push(format!("partition {}/{count} shard {shard}", index + 1));
            }
        }
    }
    if !pending.is_empty() {
        return Err(Error::input(format!(
            "{}: not every partition has scored yet ({}); run `infl score --partition i/{count}` for them, then `infl merge` again",
            out.display(),
            pending.join(", ")
        )));
    }
    let settings = serde_json::json!({ "stage": "score-partitions-joined", "plan": plan });
    io::write_json(
        &work.join(SCORE_TEMPLATE_FILE),
        &ScoreTemplate {
            settings: settings.clone(),
            shards: plan.shards,
            top_k: plan.options.top_k,
        },
    )?;
    for s in 0..plan.shards {
        let shard = Shard {
            index: s,
            count: plan.shards,
        };
        join_shard(out, &plan, shard, &settings)?;
    }
    let merged = gather_scores(out)?;
    let top = write_scores(out, &merged, None)?;
    let message = format!(
        "joined the scores of {} queries × {} training sequences from {count} layer partitions → {}",
        merged.meta.queries.ids.len(),
        merged.meta.corpus.n_sequences,
        out.display()
    );
    Ok(Joined {
        outcome: MergeOutcome {
            finished: true,
            message,
        },
        top,
        summaries: merged.summaries,
        meta: merged.meta,
    })
}

/// The partitions' passes over `shard`, joined into that shard's complete scoring state, as
/// if one pass had scored every layer.
fn join_shard(
    out: &Path,
    plan: &ScorePlan,
    shard: Shard,
    settings: &serde_json::Value,
) -> Result<()> {
    let work = out.join(WORK_DIR);
    let count = plan.partitions.len();
    let dirs: Vec<PathBuf> = (0..count)
        .map(|index| partition_dir(out, Partition { index, count }))
        .collect();
    let infos = dirs
        .iter()
        .map(|d| read_info(d, shard))
        .collect::<Result<Vec<_>>>()?;
    let meta = joined_meta(plan, &infos)?;
    let mut readers = dirs
        .iter()
        .zip(&infos)
        .map(|(d, info)| PartsReader::open(parts::parts_path(d, &shard.tag()), info))
        .collect::<Result<Vec<_>>>()?;
    let n_queries = meta.queries.ids.len();
    let dense = match plan.options.dense {
        true => Some(results::DenseWriter::resume(
            dense_row_paths(&work, shard, n_queries),
            0,
        )?),
        false => None,
    };
    let mut acc = ScoreAccumulator::new(n_queries, meta.layers.len(), plan.options.top_k, dense);
    let mut tok = LazyTokenizer::new(&plan.model);
    let mut pending: Option<Vec<PartsRecord>> = next_records(&mut readers)?;
    let mut dense_columns = 0u64;
    let mut seen = 0usize;
    let stats = data::stream_corpus_columns(
        &plan.train,
        &plan.options.columns,
        &mut tok,
        meta.corpus.max_len,
        infos[0].vocab_size,
        plan.options.batch_size.max(1) * CHUNK_BATCHES,
        |chunk| {
            let first = seen;
            seen += chunk.len();
            let mut batch: Vec<(Sequence, Vec<PartsRecord>)> = Vec::new();
            while let Some(records) = pending.take() {
                let index = records[0].index;
                if index >= seen {
                    pending = Some(records);
                    break;
                }
                let seq = index
                    .checked_sub(first)
                    .and_then(|i| chunk.get(i))
                    .ok_or_else(|| {
                        Error::Mismatch(format!(
                            "the partitions' parts name corpus sequence {index} out of order; rerun them with --fresh"
                        ))
                    })?;
                batch.push((seq.clone(), records));
                pending = next_records(&mut readers)?;
            }
            dense_columns += batch.len() as u64;
            add_joined(&mut acc, &meta, batch)
        },
    )?;
    if pending.is_some() {
        return Err(Error::Mismatch(format!(
            "{}: the partitions' parts name sequences beyond the corpus's {}: it changed since they were scored",
            plan.train.display(),
            stats.n_sequences
        )));
    }
    if stats.sha256 != meta.corpus.sha256 {
        return Err(Error::Mismatch(format!(
            "{}: the corpus changed since the partitions scored it (sha256 {}…, was {}…)",
            plan.train.display(),
            &stats.sha256[..12],
            &meta.corpus.sha256[..12.min(meta.corpus.sha256.len())]
        )));
    }
    acc.flush()?;
    let state = ScoreStateRef {
        summaries: &acc.summaries,
        dense_columns: if plan.options.dense { dense_columns } else { 0 },
        parts_records: 0,
        meta: Some(&meta),
    };
    let bytes = serde_json::to_vec(&state).map_err(|e| Error::Other(e.to_string()))?;
    checkpoint::save(
        &work,
        &format!("score.{}", shard.tag()),
        "json",
        &bytes,
        settings,
        stats.n_sequences as u64,
        true,
    )
}

/// The next record of every partition: the same sequence in each, or the parts do not belong
/// together.
fn next_records(readers: &mut [PartsReader]) -> Result<Option<Vec<PartsRecord>>> {
    let mut records = Vec::with_capacity(readers.len());
    for r in readers.iter_mut() {
        records.push(r.next_record()?);
    }
    match records.iter().filter(|r| r.is_some()).count() {
        0 => Ok(None),
        n if n == records.len() => {
            let records: Vec<PartsRecord> = records.into_iter().flatten().collect();
            let first = &records[0];
            if records
                .iter()
                .any(|r| r.index != first.index || r.scored != first.scored)
            {
                return Err(Error::Mismatch(
                    "the partitions scored different sequences (another corpus, shard or pre-filter); rerun them with --fresh".into(),
                ));
            }
            Ok(Some(records))
        }
        _ => Err(Error::Mismatch(
            "the partitions scored different numbers of sequences; rerun them with --fresh".into(),
        )),
    }
}

/// One batch of joined records into the reduction: parts side by side in layer order, the
/// cosine normalisers from the summed self-influences, the pre-filter from the records' flags.
fn add_joined(
    acc: &mut ScoreAccumulator,
    meta: &ScoresMeta,
    batch: Vec<(Sequence, Vec<PartsRecord>)>,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let n = batch.len();
    let n_queries = meta.queries.ids.len();
    let mut layer_parts: Vec<Mat<f32>> = Vec::with_capacity(meta.layers.len());
    for p in 0..batch[0].1.len() {
        let n_layers = batch[0].1[p].parts.len() / n_queries.max(1);
        for l in 0..n_layers {
            layer_parts.push(Mat::from_fn(n_queries, n, |q, j| {
                batch[j].1[p].parts[l * n_queries + q]
            }));
        }
    }
    let indices: Vec<usize> = batch.iter().map(|(_, r)| r[0].index).collect();
    let scale = (meta.options.normalize == crate::options::Normalize::Cosine).then(|| {
        let own: Vec<f64> = batch
            .iter()
            .map(|(_, r)| r.iter().map(|x| x.own).sum())
            .collect();
        super::score::cosine_factors(&meta.queries.self_influence, &own)
    });
    let mut candidates = vec![HashSet::new(); n_queries];
    let mut sampled = vec![HashSet::new(); n_queries];
    for (_, records) in &batch {
        for (q, &flag) in records[0].scored.iter().enumerate() {
            match flag {
                parts::CANDIDATE => candidates[q].insert(records[0].index),
                parts::SAMPLED => sampled[q].insert(records[0].index),
                _ => false,
            };
        }
    }
    let prefilter = meta.options.prefilter.is_some().then_some(Prefilter {
        candidates: &candidates,
        sampled: &sampled,
    });
    let seqs: Vec<Sequence> = batch.into_iter().map(|(s, _)| s).collect();
    acc.add(&indices, &seqs, &layer_parts, scale.as_deref(), prefilter)
}

/// The `meta.json` of the whole run from its partitions': every layer in order, with its
/// damping, and the queries' self-influence summed over the partitions.
fn joined_meta(plan: &ScorePlan, infos: &[PartsInfo]) -> Result<ScoresMeta> {
    let mut meta = infos[0].meta.clone();
    meta.layers.clear();
    meta.damping_per_layer.clear();
    meta.queries.self_influence = vec![0.0; meta.queries.ids.len()];
    for (info, layers) in infos.iter().zip(&plan.partitions) {
        let m = &info.meta;
        if &m.layers != layers
            || m.queries.sha256 != infos[0].meta.queries.sha256
            || m.corpus != infos[0].meta.corpus
            || m.model.weights_sha256 != infos[0].meta.model.weights_sha256
        {
            return Err(Error::Mismatch(
                "the partitions were scored with other layers, queries, corpus or model than the plan; rerun them with --fresh".into(),
            ));
        }
        meta.layers.extend(m.layers.iter().cloned());
        meta.damping_per_layer
            .extend(m.damping_per_layer.iter().cloned());
        for (total, part) in meta
            .queries
            .self_influence
            .iter_mut()
            .zip(&m.queries.self_influence)
        {
            *total += part;
        }
    }
    meta.options = plan.options.clone();
    Ok(meta)
}
