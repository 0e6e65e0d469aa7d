//! `infl self-influence`: every training sequence's influence on its own loss.

use super::score::ScoreSummary;
use super::{prepare, Prepared, CHUNK_BATCHES};
use crate::data::{self, LazyTokenizer};
use crate::error::{Error, Result};
use crate::influence::{self, Damping};
use crate::io;
use crate::model;
use crate::pass::{self, Progress};
use crate::provenance::{CorpusInfo, META_FILE};
use crate::results::{self, meta::ScoresMeta};
use std::path::PathBuf;

/// Settings of `infl self-influence`.
#[derive(Debug, Clone)]
pub struct SelfInfluenceJob {
    pub model: PathBuf,
    pub factors: PathBuf,
    pub train: PathBuf,
    pub out: PathBuf,
    pub damping: Damping,
    pub top_k: usize,
    pub batch_size: usize,
    pub max_len: Option<usize>,
}

/// Each training sequence's influence on its own loss, I(z, z) = ⟨(F+λI)⁻¹∇L_z, ∇L_z⟩: large
/// values flag outliers and mislabelled data. Writes `self_influence.jsonl` (every sequence, in
/// corpus order), `top_k.jsonl` (query id `self`: the highest and lowest), `distribution.json`
/// and `meta.json`.
pub fn self_influence(job: &SelfInfluenceJob, progress: &dyn Progress) -> Result<ScoreSummary> {
    use std::io::Write;
    let started = std::time::Instant::now();
    let Prepared {
        fmeta,
        model,
        model_info,
        preconditioner,
        max_len,
    } = prepare(&job.model, &job.factors, job.damping, job.max_len)?;
    let tracked = model.tracked().to_vec();
    let mut tok = LazyTokenizer::new(&job.model);
    io::ensure_dir(&job.out)?;
    let all_path = job.out.join("self_influence.jsonl");
    let tmp = job
        .out
        .join(format!(".self_influence.jsonl.tmp-{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut all = std::io::BufWriter::new(file);
    let mut acc = results::ScoreAccumulator::new(1, 1, job.top_k, None);
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
    let stats = data::stream_corpus(
        &job.train,
        &mut tok,
        max_len,
        model.vocab_size(),
        job.batch_size.max(1) * CHUNK_BATCHES,
        |chunk| {
            pass::run_batches(
                model.as_ref(),
                chunk,
                seen,
                job.batch_size,
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
                        writeln!(all, "{line}").map_err(|e| Error::io(&tmp, e))?;
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
    all.into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &all_path).map_err(|e| Error::io(&all_path, e))?;
    let ids = vec!["self".to_string()];
    let top = results::entries(&acc.summaries, &ids, &mut tok, false, None);
    results::write_top_k(&job.out.join("top_k.jsonl"), &top)?;
    results::write_distribution(&job.out.join("distribution.json"), &acc.summaries, &ids)?;
    let meta = ScoresMeta::base(
        "self-influence",
        "I(z,z) = sum over tracked layers of <(F+λI)^-1 ∇L_z, ∇L_z> (≥ 0)",
        &fmeta,
        model_info,
        &preconditioner,
        &tracked,
        CorpusInfo::streamed(&job.train, &stats, max_len),
        (job.damping, job.batch_size, job.top_k),
        &job.factors,
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
