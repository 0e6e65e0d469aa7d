//! `infl self-influence`: every training sequence's influence on its own loss.

use super::score::ScoreSummary;
use super::{prepare, Prepared, CHUNK_BATCHES};
use crate::data::{self, LazyTokenizer};
use crate::error::{Error, Result};
use crate::influence;
use crate::io;
use crate::model;
use crate::options::{Compute, OutputOptions, ScoreOptions, SelfInfluenceOptions};
use crate::output_dir::{Kind, OutputDir};
use crate::pass::Progress;
use crate::provenance::{CorpusInfo, META_FILE};
use crate::results;
use crate::results::meta::{Provenance, QueriesInfo, ScoresMeta};
use crate::shard::Shard;
use std::path::PathBuf;

/// One `infl self-influence`: its files, what it computes and where.
#[derive(Debug, Clone)]
pub struct SelfInfluenceJob {
    pub model: PathBuf,
    pub factors: PathBuf,
    pub train: PathBuf,
    pub out: PathBuf,
    pub options: SelfInfluenceOptions,
    pub compute: Compute,
    /// What may be replaced in `out`.
    pub output: OutputOptions,
}

/// Each training sequence's influence on its own loss, I(z, z) = ⟨(F+λI)⁻¹∇L_z, ∇L_z⟩: large
/// values flag outliers and mislabelled data. Writes `self_influence.jsonl` (every sequence, in
/// corpus order), `top_k.jsonl` (query id `self`: the highest and lowest), `distribution.json`
/// and `meta.json`.
pub fn self_influence(job: &SelfInfluenceJob, progress: &dyn Progress) -> Result<ScoreSummary> {
    use std::io::Write;
    let started = std::time::Instant::now();
    job.options.check()?;
    refuse_refined(&job.factors)?;
    let out = OutputDir::open(
        &job.out,
        Kind::SelfInfluence,
        Shard::WHOLE,
        job.output.overwrite,
    )?;
    let Prepared {
        fmeta,
        model,
        model_info,
        preconditioner,
        max_len,
    } = prepare(
        &job.model,
        &job.factors,
        (job.options.damping, job.options.max_len),
        job.compute.clone(),
    )?;
    let tracked = model.tracked().to_vec();
    let mut tok = LazyTokenizer::new(&job.model);
    // Every corpus line is checked before the first forward pass and before any output.
    let corpus = data::check_corpus(
        &job.train,
        &job.options.columns,
        &mut tok,
        model.vocab_size(),
    )?;
    io::ensure_dir(&job.out)?;
    out.claim(
        &serde_json::json!({
            "stage": "self-influence",
            "model_config_sha256": model_info.config_sha256,
            "model_weights_sha256": model_info.weights_sha256,
            "factors_sha256": fmeta.factors_sha256,
            "corpus_sha256": corpus.sha256,
            "max_len": max_len,
            "options": job.options,
        }),
        false,
    )?;
    let all_path = job.out.join("self_influence.jsonl");
    let mut all = io::AtomicFile::create(&all_path)?;
    let mut acc = results::ScoreAccumulator::new(1, 1, job.options.top_k, None);
    // A model on a GPU has the self-influence formed there too.
    let on_device = match model::statistics_device(model.as_ref())? {
        Some(d) => Some(influence::device::DeviceSelfInfluence::new(
            d,
            &preconditioner,
        )?),
        None => None,
    };
    progress.begin("self-influence", 0);
    let pass_started = std::time::Instant::now();
    let mut seen = 0usize;
    let stats = data::stream_corpus_columns(
        &job.train,
        &job.options.columns,
        &mut tok,
        max_len,
        model.vocab_size(),
        job.options.batch_size.max(1) * CHUNK_BATCHES,
        |chunk| {
            crate::pass::run_batches(
                model.as_ref(),
                chunk,
                seen,
                job.options.batch_size,
                crate::model::Labels::Data,
                progress,
                "self-influence",
                |start, taps| {
                    let own = match &on_device {
                        Some(d) => d.batch(&tracked, taps)?,
                        None => influence::batch_self_influence(&tracked, &preconditioner, taps),
                    };
                    let n = own.len();
                    for (k, v) in own.iter().enumerate() {
                        let line = serde_json::json!({"sequence_id": chunk[start + k].id, "self_influence": v});
                        writeln!(all, "{line}").map_err(|e| Error::io(all.tmp_path(), e))?;
                    }
                    let part = faer::Mat::from_fn(1, n, |_, k| own[k] as f32);
                    let idx: Vec<usize> = (seen + start..seen + start + n).collect();
                    acc.add(&idx, &chunk[start..start + n], &[part], None, None)
                },
            )?;
            seen += chunk.len();
            Ok(())
        },
    )?;
    progress.end();
    all.sync_and_commit()?;
    let ids = vec!["self".to_string()];
    let top = results::entries(&acc.summaries, &ids, &mut tok, false, None, None);
    results::write_top_k(&job.out.join("top_k.jsonl"), &top)?;
    results::write_distribution(&job.out.join("distribution.json"), &acc.summaries, &ids)?;
    let options = ScoreOptions {
        damping: job.options.damping,
        top_k: job.options.top_k,
        batch_size: job.options.batch_size,
        max_len: job.options.max_len,
        columns: job.options.columns.clone(),
        ..ScoreOptions::default()
    };
    let meta = ScoresMeta::new(
        "self-influence",
        "I(z,z) = sum over tracked layers of <(F+λI)^-1 ∇L_z, ∇L_z> (≥ 0)",
        options,
        QueriesInfo::own(),
        Provenance {
            fmeta: &fmeta,
            factors_dir: &job.factors,
            model: model_info,
            corpus: CorpusInfo::streamed(&job.train, &stats, max_len),
            tracked: &tracked,
            preconditioner: &preconditioner,
        },
    );
    io::write_json(&job.out.join(META_FILE), &meta)?;
    Ok(ScoreSummary {
        summaries: acc.summaries,
        top,
        meta,
        seconds: started.elapsed().as_secs_f64(),
        pass_seconds: pass_started.elapsed().as_secs_f64(),
        message: String::new(),
    })
}

/// A training sequence's refined self-influence would take a conjugate-gradient solve of its
/// own (iterations × Gauss-Newton products over the refinement sample, per sequence), so
/// `ekfac-refined` factors are refused rather than scored with plain EK-FAC's inverse under
/// the refined name. Checked before the output directory is touched.
fn refuse_refined(factors: &std::path::Path) -> Result<()> {
    let fmeta = crate::curvature::format::factors_meta(factors)?;
    if fmeta.options.strategy.is_refined() {
        return Err(Error::input(format!(
            "{}: ekfac-refined factors refine each query's inverse with a solve of its own; \
             self-influence would need one per training sequence and is not computed for \
             them. Fit the same model with --strategy ekfac (the factors are the same) for \
             EK-FAC self-influence",
            factors.display()
        )));
    }
    Ok(())
}
