//! The two stages as file-to-file jobs, like kronfluence's factors and scores: `fit` writes a
//! factors directory, `score` reads it back and refuses factors that belong to another model or
//! other settings. Every output records what made it.

use crate::curvature::{self, Factors, Fisher, FitOptions, Progress, Strategy};
use crate::data::{self, LazyTokenizer};
use crate::error::{Error, Result};
use crate::influence::{self, Damping, Preconditioner};
use crate::io;
use crate::model::{self, ModuleSelection, TapModel};
use crate::results;
use std::path::{Path, PathBuf};

pub const FACTORS_FILE: &str = "factors.safetensors";
pub const META_FILE: &str = "meta.json";

/// Identity of a checkpoint: hashes of its config and weight files.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub path: String,
    pub architecture: String,
    pub config_sha256: String,
    pub weights_sha256: String,
    pub n_parameters: usize,
}

impl ModelInfo {
    /// `dir` is a checkpoint directory (config.json and weight files hashed) or a GGUF file
    /// (the file holds config and weights: both hashes are its hash).
    pub fn of(dir: &Path, model: &dyn TapModel) -> Result<Self> {
        if model::gguf::is_gguf(dir) {
            let sha = data::sha256_file(dir)?;
            return Ok(ModelInfo {
                path: dir.display().to_string(),
                architecture: model.architecture().to_string(),
                config_sha256: sha.clone(),
                weights_sha256: sha,
                n_parameters: model.n_parameters(),
            });
        }
        let (files, _) = model::weight_files(dir)?;
        let weights = files
            .iter()
            .map(|p| data::sha256_file(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelInfo {
            path: dir.display().to_string(),
            architecture: model.architecture().to_string(),
            config_sha256: data::sha256_file(&dir.join("config.json"))?,
            weights_sha256: data::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                weights.join(",").as_bytes(),
            )),
            n_parameters: model.n_parameters(),
        })
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CorpusInfo {
    pub path: String,
    pub sha256: String,
    pub max_len: usize,
    pub n_documents: usize,
    pub n_sequences: usize,
    pub n_tokens: usize,
}

impl CorpusInfo {
    fn of(c: &data::Corpus, max_len: usize) -> Self {
        CorpusInfo {
            path: c.path.display().to_string(),
            sha256: c.sha256.clone(),
            max_len,
            n_documents: c.n_documents,
            n_sequences: c.sequences.len(),
            n_tokens: c.n_tokens(),
        }
    }
}

/// `meta.json` of a factors directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FactorsMeta {
    pub tool: String,
    pub version: String,
    pub kind: String,
    pub strategy: Strategy,
    pub fisher: Fisher,
    pub modules: ModuleSelection,
    pub options: FitOptions,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub layers: Vec<std::collections::HashMap<String, serde_json::Value>>,
    pub factors_sha256: String,
}

/// Settings of `infl fit`.
#[derive(Debug, Clone)]
pub struct FitJob {
    pub model: PathBuf,
    pub train: PathBuf,
    pub out: PathBuf,
    pub modules: ModuleSelection,
    /// Window length; `None` = the model's context length.
    pub max_len: Option<usize>,
    pub options: FitOptions,
    /// Refuse to start when the memory estimate ([`crate::inspect`]) exceeds MemAvailable.
    pub memory_check: bool,
}

/// Summary of a finished fit, for printing.
pub struct FitSummary {
    pub n_sequences: usize,
    pub n_tokens: usize,
    pub n_layers: usize,
    pub seconds: f64,
}

pub fn fit(job: &FitJob, progress: &dyn Progress) -> Result<FitSummary> {
    let started = std::time::Instant::now();
    let model = model::load(&job.model, job.modules)?;
    let max_len = job.max_len.unwrap_or(model.max_positions());
    check_max_len(max_len, model.as_ref())?;
    let mut tok = LazyTokenizer::new(&job.model);
    let corpus = data::read_corpus(&job.train, &mut tok, max_len, model.vocab_size())?;
    if job.memory_check {
        let longest = corpus
            .sequences
            .iter()
            .map(|s| s.ids.len())
            .max()
            .unwrap_or(1);
        let e = crate::inspect::estimate(model.as_ref(), job.options.batch_size, longest);
        crate::inspect::check_memory(
            "infl fit",
            e.fit_total(),
            "use a smaller --batch-size or --max-len, or --modules mlp",
        )?;
    }
    let model_info = ModelInfo::of(&job.model, model.as_ref())?;
    let factors = curvature::fit(model.as_ref(), &corpus.sequences, &job.options, progress)?;

    io::ensure_dir(&job.out)?;
    let st_path = job.out.join(FACTORS_FILE);
    io::write_safetensors(&st_path, &factors.to_tensors(), None)?;
    let meta = FactorsMeta {
        tool: "infl".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kind: "factors".into(),
        strategy: job.options.strategy,
        fisher: job.options.fisher,
        modules: job.modules,
        options: job.options.clone(),
        model: model_info,
        corpus: CorpusInfo::of(&corpus, max_len),
        layers: curvature::layer_summary(&factors)
            .into_iter()
            .map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            .collect(),
        factors_sha256: data::sha256_file(&st_path)?,
    };
    // meta.json last: it vouches for the safetensors file by hash.
    io::write_json(&job.out.join(META_FILE), &meta)?;
    Ok(FitSummary {
        n_sequences: corpus.sequences.len(),
        n_tokens: corpus.n_tokens(),
        n_layers: factors.layers.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn check_max_len(max_len: usize, model: &dyn TapModel) -> Result<()> {
    if max_len == 0 || max_len > model.max_positions() {
        return Err(Error::input(format!(
            "--max-len {max_len} must be between 1 and the model's context length {}",
            model.max_positions()
        )));
    }
    Ok(())
}

/// Settings of `infl score`.
#[derive(Debug, Clone)]
pub struct ScoreJob {
    pub model: PathBuf,
    pub factors: PathBuf,
    pub train: PathBuf,
    pub queries: PathBuf,
    pub out: PathBuf,
    pub damping: Damping,
    pub top_k: usize,
    pub dense: bool,
    pub batch_size: usize,
    /// Window length; `None` = the one the factors were fitted with.
    pub max_len: Option<usize>,
    /// Refuse to start when the memory estimate ([`crate::inspect`]) exceeds MemAvailable.
    pub memory_check: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueriesInfo {
    pub path: String,
    pub sha256: String,
    pub ids: Vec<String>,
    /// −log p(completion | prompt) per query, in nats.
    pub losses: Vec<f64>,
}

/// `meta.json` of a results directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScoresMeta {
    pub tool: String,
    pub version: String,
    pub kind: String,
    pub strategy: Strategy,
    pub fisher: Fisher,
    pub modules: ModuleSelection,
    pub damping: Damping,
    /// λ actually used per tracked layer.
    pub damping_per_layer: Vec<(String, f64)>,
    pub top_k: usize,
    pub dense: bool,
    pub batch_size: usize,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub queries: QueriesInfo,
    pub factors: FactorsRef,
    pub score_convention: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FactorsRef {
    pub path: String,
    pub factors_sha256: String,
    pub fitted_on: CorpusInfo,
}

/// Reads a factors directory, checking it is complete and belongs to `model_dir`'s checkpoint.
pub fn open_factors(dir: &Path) -> Result<FactorsMeta> {
    let meta_path = dir.join(META_FILE);
    if !meta_path.exists() {
        return Err(Error::input(format!(
            "{}: not a factors directory (no meta.json); create one with `infl fit`",
            dir.display()
        )));
    }
    let meta: FactorsMeta = io::read_json(&meta_path)?;
    if meta.kind != "factors" {
        return Err(Error::Mismatch(format!(
            "{}: holds `{}`, not factors",
            meta_path.display(),
            meta.kind
        )));
    }
    let st = dir.join(FACTORS_FILE);
    let sha = data::sha256_file(&st)?;
    if sha != meta.factors_sha256 {
        return Err(Error::Mismatch(format!(
            "{}: its hash does not match meta.json (a fit was interrupted or the file was replaced); rerun `infl fit`",
            st.display()
        )));
    }
    Ok(meta)
}

pub struct ScoreSummary {
    pub scores: Vec<Vec<f64>>,
    pub top: Vec<results::TopEntry>,
    pub meta: ScoresMeta,
    pub seconds: f64,
}

pub fn score(job: &ScoreJob, progress: &dyn Progress) -> Result<ScoreSummary> {
    let started = std::time::Instant::now();
    let fmeta = open_factors(&job.factors)?;
    let model = model::load(&job.model, fmeta.modules)?;
    let model_info = ModelInfo::of(&job.model, model.as_ref())?;
    if model_info.weights_sha256 != fmeta.model.weights_sha256
        || model_info.config_sha256 != fmeta.model.config_sha256
    {
        return Err(Error::Mismatch(format!(
            "the factors in {} were fitted on another model ({}, weights sha256 {}…), not on {} (weights sha256 {}…); rerun `infl fit` with this model",
            job.factors.display(),
            fmeta.model.path,
            &fmeta.model.weights_sha256[..12],
            job.model.display(),
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
    let factors = Factors::from_file(
        &job.factors.join(FACTORS_FILE),
        fmeta.strategy,
        model.tracked(),
    )?;
    let preconditioner = Preconditioner::new(&factors, job.damping)?;

    let max_len = job.max_len.unwrap_or(fmeta.corpus.max_len);
    check_max_len(max_len, model.as_ref())?;
    let mut tok = LazyTokenizer::new(&job.model);
    let (queries, queries_sha) = data::read_queries(
        &job.queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?;
    let corpus = data::read_corpus(&job.train, &mut tok, max_len, model.vocab_size())?;
    if job.memory_check {
        let longest = corpus
            .sequences
            .iter()
            .map(|s| s.ids.len())
            .chain(
                queries
                    .iter()
                    .map(|q| q.prompt_ids.len() + q.completion_ids.len()),
            )
            .max()
            .unwrap_or(1);
        let e = crate::inspect::estimate(model.as_ref(), job.batch_size, longest);
        crate::inspect::check_memory(
            "infl score",
            e.score_total(queries.len() as u64, corpus.sequences.len() as u64),
            "score fewer queries per run, or use a smaller --batch-size",
        )?;
    }

    let pq = influence::precondition_queries(
        model.as_ref(),
        &queries,
        &preconditioner,
        job.batch_size,
        progress,
    )?;
    let scores = influence::score_dense(
        model.as_ref(),
        &pq,
        &corpus.sequences,
        job.batch_size,
        progress,
    )?;

    io::ensure_dir(&job.out)?;
    let top = results::top_entries(&scores, &queries, &corpus, job.top_k, &mut tok);
    results::write_top_k(&job.out.join("top_k.jsonl"), &top)?;
    if job.dense {
        results::write_dense(
            &job.out.join("scores.safetensors"),
            &scores,
            &queries,
            &corpus,
        )?;
    }
    let meta = ScoresMeta {
        tool: "infl".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kind: "scores".into(),
        strategy: fmeta.strategy,
        fisher: fmeta.fisher,
        modules: fmeta.modules,
        damping: job.damping,
        damping_per_layer: names.iter().map(|n| n.to_string()).zip(preconditioner.damping.iter().copied()).collect(),
        top_k: job.top_k,
        dense: job.dense,
        batch_size: job.batch_size,
        model: model_info,
        corpus: CorpusInfo::of(&corpus, max_len),
        queries: QueriesInfo {
            path: job.queries.display().to_string(),
            sha256: queries_sha,
            ids: queries.iter().map(|q| q.id.clone()).collect(),
            losses: pq.losses.clone(),
        },
        factors: FactorsRef {
            path: job.factors.display().to_string(),
            factors_sha256: fmeta.factors_sha256.clone(),
            fitted_on: fmeta.corpus.clone(),
        },
        score_convention: "I(q,z) = sum over tracked layers of <(F+λI)^-1 ∇f_q, ∇L_z>; f_q = -log p(completion|prompt) summed over completion tokens, L_z = summed next-token cross-entropy of z; positive = training on z lowers f_q (z supports the completion); not divided by the number of training sequences".into(),
    };
    io::write_json(&job.out.join(META_FILE), &meta)?;
    Ok(ScoreSummary {
        scores,
        top,
        meta,
        seconds: started.elapsed().as_secs_f64(),
    })
}
