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

impl CorpusInfo {
    fn streamed(path: &Path, stats: &data::CorpusStats, max_len: usize) -> Self {
        CorpusInfo {
            path: path.display().to_string(),
            sha256: stats.sha256.clone(),
            max_len,
            n_documents: stats.n_documents,
            n_sequences: stats.n_sequences,
            n_tokens: stats.n_tokens,
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
    /// The explicit layer list of `fit --layers`, if one was given.
    #[serde(default)]
    pub selected_layers: Option<Vec<String>>,
    pub factors_sha256: String,
}

/// Settings of `infl fit`.
#[derive(Debug, Clone)]
pub struct FitJob {
    pub model: PathBuf,
    pub train: PathBuf,
    pub out: PathBuf,
    pub modules: ModuleSelection,
    /// Track only these layers (checkpoint names), within `modules`.
    pub layers: Option<Vec<String>>,
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
    let mut model = model::load(&job.model, job.modules)?;
    if let Some(names) = &job.layers {
        model = model::select_layers(model, names)?;
    }
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
        selected_layers: job.layers.clone(),
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
    /// Compress each preconditioned query gradient to this rank per layer (`None` = exact).
    pub query_rank: Option<usize>,
    /// Write per-layer parts (top/bottom-k) and per-layer totals (layers.json).
    pub per_layer: bool,
    /// Split each top/bottom-k score over the sequence's tokens.
    pub per_token: bool,
    pub normalize: Normalize,
    /// Score only each query's N best BM25 candidates from this index (`infl index`).
    pub prefilter: Option<(usize, PathBuf)>,
}

/// What the reported score is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// The influence I(q, z) itself.
    None,
    /// I(q, z) / sqrt(I(q, q) · I(z, z)): cosine of the two gradients in the damped
    /// inverse-Fisher metric (RelatIF-style; bounded by 1 in magnitude).
    Cosine,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueriesInfo {
    pub path: String,
    pub sha256: String,
    pub ids: Vec<String>,
    /// Prompt and completion text (null for pre-tokenised queries).
    pub prompts: Vec<Option<String>>,
    pub completions: Vec<Option<String>>,
    /// −log p(completion | prompt) per query, in nats.
    pub losses: Vec<f64>,
    /// I(q, q): the query gradient's squared norm in the damped inverse-Fisher metric.
    pub self_influence: Vec<f64>,
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
    /// Tracked layer names, in the order of every per-layer array.
    pub layers: Vec<String>,
    /// Rank of the compressed query gradients (null = exact).
    pub query_rank: Option<usize>,
    pub normalize: Normalize,
    pub per_layer: bool,
    pub per_token: bool,
    /// N candidates per query kept by the BM25 pre-filter (null = every sequence scored).
    pub prefilter: Option<usize>,
    pub top_k: usize,
    pub dense: bool,
    pub batch_size: usize,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    pub queries: QueriesInfo,
    pub factors: FactorsRef,
    pub score_convention: String,
}

impl ScoresMeta {
    /// The provenance every scores-like output shares; options default to off.
    #[allow(clippy::too_many_arguments)]
    fn base(
        kind: &str,
        convention: &str,
        fmeta: &FactorsMeta,
        model: ModelInfo,
        preconditioner: &Preconditioner,
        tracked: &[crate::model::TrackedLayer],
        corpus: CorpusInfo,
        (damping, batch_size, top_k): (Damping, usize, usize),
        factors_dir: &Path,
    ) -> Self {
        let layers: Vec<String> = tracked.iter().map(|l| l.name.clone()).collect();
        ScoresMeta {
            tool: "infl".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: kind.into(),
            strategy: fmeta.strategy,
            fisher: fmeta.fisher,
            modules: fmeta.modules,
            damping,
            damping_per_layer: layers
                .iter()
                .cloned()
                .zip(preconditioner.damping.iter().copied())
                .collect(),
            layers,
            query_rank: None,
            normalize: Normalize::None,
            per_layer: false,
            per_token: false,
            prefilter: None,
            top_k,
            dense: false,
            batch_size,
            model,
            corpus,
            queries: QueriesInfo {
                path: String::new(),
                sha256: String::new(),
                ids: vec!["self".into()],
                prompts: vec![None],
                completions: vec![None],
                losses: vec![],
                self_influence: vec![],
            },
            factors: FactorsRef {
                path: factors_dir.display().to_string(),
                factors_sha256: fmeta.factors_sha256.clone(),
                fitted_on: fmeta.corpus.clone(),
            },
            score_convention: convention.into(),
        }
    }
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
    pub summaries: Vec<results::QuerySummary>,
    pub top: Vec<results::TopEntry>,
    pub meta: ScoresMeta,
    pub seconds: f64,
    /// Time of the pass over the training corpus alone.
    pub pass_seconds: f64,
}

/// Model, factors and preconditioner, checked to belong together.
struct Prepared {
    fmeta: FactorsMeta,
    model: Box<dyn TapModel>,
    model_info: ModelInfo,
    preconditioner: Preconditioner,
    max_len: usize,
}

fn prepare(
    model_dir: &Path,
    factors_dir: &Path,
    damping: Damping,
    max_len: Option<usize>,
) -> Result<Prepared> {
    let fmeta = open_factors(factors_dir)?;
    let mut model = model::load(model_dir, fmeta.modules)?;
    if let Some(names) = &fmeta.selected_layers {
        model = model::select_layers(model, names)?;
    }
    let model_info = ModelInfo::of(model_dir, model.as_ref())?;
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
    let factors = Factors::from_file(
        &factors_dir.join(FACTORS_FILE),
        fmeta.strategy,
        model.tracked(),
    )?;
    let preconditioner = Preconditioner::new(&factors, damping)?;
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

/// Sequences per streamed chunk, in batches.
const CHUNK_BATCHES: usize = 16;

pub fn score(job: &ScoreJob, progress: &dyn Progress) -> Result<ScoreSummary> {
    let started = std::time::Instant::now();
    if job.query_rank == Some(0) {
        return Err(Error::input("--query-rank must be at least 1 (or `full`)"));
    }
    let Prepared {
        fmeta,
        model,
        model_info,
        preconditioner,
        max_len,
    } = prepare(&job.model, &job.factors, job.damping, job.max_len)?;
    let tracked = model.tracked().to_vec();
    let mut tok = LazyTokenizer::new(&job.model);
    let (queries, queries_sha) = data::read_queries(
        &job.queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?;
    let query_ids: Vec<String> = queries.iter().map(|q| q.id.clone()).collect();
    // Scoring streams the corpus, so no term of the estimate grows with it (n_train = 0); the
    // activation term depends on the longest sequence, which is re-checked as chunks arrive.
    let check_memory = |longest: usize| -> Result<()> {
        if !job.memory_check {
            return Ok(());
        }
        let e = crate::inspect::estimate(model.as_ref(), job.batch_size, longest);
        crate::inspect::check_memory(
            "infl score",
            e.score_total(queries.len() as u64, 0),
            "score fewer queries per run, or use a smaller --batch-size",
        )
    };
    let mut checked_len = queries
        .iter()
        .map(|q| q.prompt_ids.len() + q.completion_ids.len())
        .max()
        .unwrap_or(1);
    check_memory(checked_len)?;

    let pq = influence::precondition_queries(
        model.as_ref(),
        &queries,
        &preconditioner,
        job.batch_size,
        job.query_rank,
        progress,
    )?;

    // Pre-filter: each query keeps its N best lexical matches; the pass computes gradients
    // only for the union.
    let allowed: Option<Vec<std::collections::HashSet<usize>>> = match &job.prefilter {
        None => None,
        Some((n, dir)) => {
            if job.dense {
                return Err(Error::input(
                    "--dense and --prefilter do not go together: a pre-filtered run scores only each query's candidates",
                ));
            }
            let index = crate::index::Bm25Index::open(dir)?;
            index.check(dir, &job.train, max_len)?;
            if *n >= index.n_sequences() {
                eprintln!(
                    "warning: --prefilter {n} is not smaller than the corpus ({} sequences): every sequence is scored",
                    index.n_sequences()
                );
            }
            Some(
                queries
                    .iter()
                    .map(|q| index.candidates(q, *n).into_iter().collect())
                    .collect(),
            )
        }
    };
    let union: Option<std::collections::HashSet<usize>> = allowed
        .as_ref()
        .map(|a| a.iter().flatten().copied().collect());

    io::ensure_dir(&job.out)?;
    let dense = if job.dense {
        Some(results::DenseWriter::new(&job.out, queries.len())?)
    } else {
        None
    };
    let mut acc = results::ScoreAccumulator::new(queries.len(), tracked.len(), job.top_k, dense);
    let cosine = job.normalize == Normalize::Cosine;
    let scale = |taps: &crate::model::TapBatch| -> Option<Vec<Vec<f64>>> {
        cosine.then(|| {
            let own = influence::batch_self_influence(&tracked, &preconditioner, taps);
            pq.self_influence
                .iter()
                // A zero gradient (a one-token sequence predicts nothing) has no direction:
                // its cosine is 0, not 0/0.
                .map(|sq| {
                    own.iter()
                        .map(|sz| {
                            if sq * sz > 0.0 {
                                1.0 / (sq * sz).sqrt()
                            } else {
                                0.0
                            }
                        })
                        .collect()
                })
                .collect()
        })
    };
    progress.begin("scoring pass", 0);
    let pass_started = std::time::Instant::now();
    let mut seen = 0usize;
    let stats = data::stream_corpus(
        &job.train,
        &mut tok,
        max_len,
        model.vocab_size(),
        job.batch_size.max(1) * CHUNK_BATCHES,
        |chunk| {
            let longest = chunk.iter().map(|s| s.ids.len()).max().unwrap_or(0);
            if longest > checked_len {
                check_memory(longest)?;
                checked_len = longest;
            }
            let indices: Vec<usize> = (seen..seen + chunk.len())
                .filter(|i| union.as_ref().is_none_or(|u| u.contains(i)))
                .collect();
            let kept: Vec<data::Sequence> = match &union {
                None => chunk.to_vec(),
                Some(_) => indices.iter().map(|&i| chunk[i - seen].clone()).collect(),
            };
            curvature::run_batches(
                model.as_ref(),
                &kept,
                seen,
                job.batch_size,
                crate::model::Labels::Data,
                progress,
                "scoring pass",
                |start, taps| {
                    let parts: Vec<_> = tracked
                        .iter()
                        .enumerate()
                        .map(|(i, l)| influence::layer_scores(l, i, &pq.per_layer[i], taps))
                        .collect();
                    let n = taps.seq_lens.len();
                    acc.add(
                        &indices[start..start + n],
                        &kept[start..start + n],
                        &parts,
                        scale(taps).as_deref(),
                        allowed.as_deref(),
                    )
                },
            )?;
            seen += chunk.len();
            Ok(())
        },
    )?;
    progress.end();
    let pass_seconds = pass_started.elapsed().as_secs_f64();
    if job.top_k > stats.n_sequences {
        eprintln!(
            "warning: --top-k {} exceeds the {} training sequences; every sequence is listed",
            job.top_k, stats.n_sequences
        );
    }

    let token_parts = if job.per_token {
        Some(token_pass(
            model.as_ref(),
            &acc.summaries,
            &pq,
            job.batch_size,
            &mut tok,
            |taps| scale(taps),
        )?)
    } else {
        None
    };
    let top = results::entries(
        &acc.summaries,
        &query_ids,
        &mut tok,
        job.per_layer,
        token_parts.as_ref(),
    );
    results::write_top_k(&job.out.join("top_k.jsonl"), &top)?;
    results::write_distribution(
        &job.out.join("distribution.json"),
        &acc.summaries,
        &query_ids,
    )?;
    let layer_names: Vec<String> = tracked.iter().map(|l| l.name.clone()).collect();
    if job.per_layer {
        results::write_layers(
            &job.out.join("layers.json"),
            &acc.summaries,
            &query_ids,
            &layer_names,
        )?;
    }
    acc.finish_dense(
        &job.out.join("scores.safetensors"),
        &query_ids,
        stats.n_sequences,
    )?;
    let meta = ScoresMeta {
        query_rank: job.query_rank,
        normalize: job.normalize,
        per_layer: job.per_layer,
        per_token: job.per_token,
        prefilter: job.prefilter.as_ref().map(|p| p.0),
        dense: job.dense,
        queries: QueriesInfo {
            path: job.queries.display().to_string(),
            sha256: queries_sha,
            ids: query_ids,
            prompts: queries.iter().map(|q| q.prompt.clone()).collect(),
            completions: queries.iter().map(|q| q.completion.clone()).collect(),
            losses: pq.losses.clone(),
            self_influence: pq.self_influence.clone(),
        },
        ..ScoresMeta::base(
            "scores",
            SCORE_CONVENTION,
            &fmeta,
            model_info,
            &preconditioner,
            &tracked,
            CorpusInfo::streamed(&job.train, &stats, max_len),
            (job.damping, job.batch_size, job.top_k),
            &job.factors,
        )
    };
    io::write_json(&job.out.join(META_FILE), &meta)?;
    Ok(ScoreSummary {
        summaries: acc.summaries,
        top,
        meta,
        seconds: started.elapsed().as_secs_f64(),
        pass_seconds,
    })
}

const SCORE_CONVENTION: &str = "I(q,z) = sum over tracked layers of <(F+λI)^-1 ∇f_q, ∇L_z>; f_q = -log p(completion|prompt) summed over completion tokens, L_z = summed next-token cross-entropy of z; positive = training on z lowers f_q (z supports the completion); not divided by the number of training sequences";

/// Second, small pass over the top/bottom sequences of every query: each score split over the
/// sequence's tokens, `Σ_ℓ g_tᵀ P_{q,ℓ} ā_t` for token t (the position whose output predicts
/// token t+1). Keyed by (query, corpus index).
fn token_pass(
    model: &dyn TapModel,
    summaries: &[results::QuerySummary],
    pq: &influence::PreconditionedQueries,
    batch_size: usize,
    tok: &mut LazyTokenizer,
    scale: impl Fn(&crate::model::TapBatch) -> Option<Vec<Vec<f64>>>,
) -> Result<std::collections::HashMap<(usize, usize), Vec<results::TokenPart>>> {
    let mut wanted: std::collections::BTreeMap<usize, (String, Vec<u32>)> = Default::default();
    for s in summaries {
        for c in s.top.iter().chain(&s.bottom) {
            wanted
                .entry(c.index)
                .or_insert_with(|| (c.sequence_id.clone(), c.ids.clone()));
        }
    }
    let indices: Vec<usize> = wanted.keys().copied().collect();
    let seqs: Vec<data::Sequence> = wanted
        .into_values()
        .map(|(id, ids)| data::Sequence { id, ids })
        .collect();
    let tracked = model.tracked();
    let mut out = std::collections::HashMap::new();
    let mut token_text = |id: u32| tok.decode(&[id]).unwrap_or_else(|| format!("<{id}>"));
    let mut texts: Vec<Vec<String>> = Vec::with_capacity(seqs.len());
    for s in &seqs {
        texts.push(s.ids.iter().map(|&i| token_text(i)).collect());
    }
    curvature::for_each_batch(
        model,
        &seqs,
        batch_size,
        crate::model::Labels::Data,
        &curvature::Silent,
        "per-token pass",
        |start, taps| {
            let offsets = taps.offsets();
            let mut total: Option<faer::Mat<f32>> = None;
            for (i, l) in tracked.iter().enumerate() {
                let part = influence::layer_token_scores(l, i, &pq.per_layer[i], taps);
                total = Some(match total {
                    None => part,
                    Some(t) => t + part,
                });
            }
            let total = total.expect("at least one tracked layer");
            let factors = scale(taps);
            for n in 0..taps.seq_lens.len() {
                for q in 0..pq.len() {
                    let f = factors.as_ref().map_or(1.0, |s| s[q][n]);
                    let parts = (offsets[n]..offsets[n + 1])
                        .zip(&texts[start + n])
                        .map(|(t, text)| results::TokenPart {
                            text: text.clone(),
                            score: total[(t, q)] as f64 * f,
                        })
                        .collect();
                    out.insert((q, indices[start + n]), parts);
                }
            }
            Ok(())
        },
    )?;
    Ok(out)
}

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
            curvature::run_batches(
                model.as_ref(),
                chunk,
                seen,
                job.batch_size,
                crate::model::Labels::Data,
                progress,
                "self-influence",
                |start, taps| {
                    let own = influence::batch_self_influence(&tracked, &preconditioner, taps);
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
    })
}
