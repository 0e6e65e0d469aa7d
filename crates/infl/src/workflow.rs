//! The two stages as file-to-file jobs, like kronfluence's factors and scores: `fit` writes a
//! factors directory, `score` reads it back and refuses factors that belong to another model or
//! other settings. Every output records what made it.

use crate::checkpoint;
use crate::curvature::{self, CheckpointPolicy, Factors, Fisher, FitOptions, Progress, Strategy};
use crate::data::{self, LazyTokenizer};
use crate::error::{Error, Result};
use crate::influence::{self, Damping, Preconditioner};
use crate::io;
use crate::model::{self, ModuleSelection, TapModel};
use crate::results;
use crate::shard::Shard;
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
    /// The engine and device that computed the taps (`fast`, `cpu`; `autograd`, `cuda:0`).
    /// Results agree across them to f32 rounding; factors made on one score on another.
    #[serde(default)]
    pub engine: model::Engine,
    #[serde(default)]
    pub device: String,
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
                engine: model.engine(),
                device: model.device().to_string(),
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
            engine: model.engine(),
            device: model.device().to_string(),
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
    /// Which part of the corpus this process fits ([`Shard::WHOLE`] = all of it).
    pub shard: Shard,
    /// When the passes save their state for resumption.
    pub checkpoint: CheckpointPolicy,
    /// Discard any saved state in `out` instead of resuming from it.
    pub fresh: bool,
    /// After fitting, keep every training sequence's gradient in the factors' basis on disk
    /// (`OUT/store/`), in this precision, for `score --store`.
    pub store: Option<crate::store::StoreOptions>,
}

impl FitJob {
    /// A fit of every linear layer in the blocks, with the model's context as window length,
    /// unsharded, fresh, never checkpointed, no store: the settings library callers (the demo,
    /// the validations, the recipes) start from and adjust with `FitJob { .., ..FitJob::new(..) }`.
    pub fn new(model: PathBuf, train: PathBuf, out: PathBuf, options: FitOptions) -> Self {
        FitJob {
            model,
            train,
            out,
            modules: ModuleSelection::All,
            layers: None,
            max_len: None,
            options,
            memory_check: true,
            shard: Shard::WHOLE,
            checkpoint: CheckpointPolicy::NEVER,
            fresh: true,
            store: None,
        }
    }
}

/// Summary of a fit invocation, for printing.
pub struct FitSummary {
    pub n_sequences: usize,
    pub n_tokens: usize,
    pub n_layers: usize,
    pub seconds: f64,
    /// factors.safetensors and meta.json are written (false: a shard's pass is done and waits
    /// for `infl merge`).
    pub finished: bool,
    /// What happened and what to run next.
    pub message: String,
}

/// Intermediate state of a fit or score (pass sums, shard results, checkpoints), inside its
/// output directory; removed once the final files are written.
pub const WORK_DIR: &str = "work";

/// What every shard of a fit records for `infl merge`, which has no model at hand.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FitTemplate {
    strategy: Strategy,
    fisher: Fisher,
    modules: ModuleSelection,
    options: FitOptions,
    model: ModelInfo,
    corpus: CorpusInfo,
    selected_layers: Option<Vec<String>>,
    tracked: Vec<crate::model::TrackedLayer>,
    shards: usize,
}

impl FitTemplate {
    /// What shards and resumed runs must agree on: everything but paths.
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "stage": "fit",
            "options": self.options,
            "modules": self.modules,
            "selected_layers": self.selected_layers,
            "tracked": self.tracked,
            "model_config_sha256": self.model.config_sha256,
            "model_weights_sha256": self.model.weights_sha256,
            "corpus_sha256": self.corpus.sha256,
            "max_len": self.corpus.max_len,
            "shards": self.shards,
        })
    }
}

const FIT_TEMPLATE_FILE: &str = "fit.json";
const EIGEN_STATE: &str = "eigenbasis";

fn pass_stem(pass: curvature::Pass, shard: Shard) -> String {
    format!("{}.{}", pass.name(), shard.tag())
}

pub fn fit(job: &FitJob, progress: &dyn Progress) -> Result<FitSummary> {
    let started = std::time::Instant::now();
    let mut model = model::load(&job.model, job.modules)?;
    if let Some(names) = &job.layers {
        model = model::select_layers(model, names)?;
    }
    if model.tracked().is_empty() {
        return Err(Error::input(
            "no tracked layers: --modules selected nothing",
        ));
    }
    let max_len = job.max_len.unwrap_or(model.max_positions());
    check_max_len(max_len, model.as_ref())?;
    let mut tok = LazyTokenizer::new(&job.model);
    // The passes stream the corpus: memory holds one chunk, whatever its size. A first scan
    // (no model) gives its hash and counts, this shard's size and the longest window.
    let chunk = job.options.batch_size.max(1) * CHUNK_BATCHES;
    let (mut longest, mut global) = (1usize, 0usize);
    let (mut owned, mut owned_tokens, mut store_bytes) = (0usize, 0u64, 0u64);
    let scan = data::stream_corpus(
        &job.train,
        &mut tok,
        max_len,
        model.vocab_size(),
        chunk,
        |c| {
            for s in c {
                longest = longest.max(s.ids.len());
                if job.shard.owns(global) {
                    owned += 1;
                    owned_tokens += s.ids.len() as u64;
                    if let Some(dtype) = job.store {
                        store_bytes +=
                            crate::store::sequence_bytes(model.tracked(), s.ids.len(), dtype);
                    }
                }
                global += 1;
            }
            Ok(())
        },
    )?;
    if job.memory_check {
        let e = crate::inspect::estimate(model.as_ref(), job.options.batch_size, longest);
        crate::inspect::check_memory(
            "infl fit",
            e.fit_total(),
            "use a smaller --batch-size or --max-len, or --modules mlp",
        )?;
    }
    let tracked = model.tracked().to_vec();
    if job.store.is_some() && !job.shard.is_whole() {
        return Err(Error::input(
            "--store is written by an unsharded fit (the store is one file in corpus order); run the sharded fit without it, then `infl fit --store` on one machine, or score without a store",
        ));
    }
    let template = FitTemplate {
        strategy: job.options.strategy,
        fisher: job.options.fisher,
        modules: job.modules,
        options: job.options.clone(),
        model: ModelInfo::of(&job.model, model.as_ref())?,
        corpus: CorpusInfo::streamed(&job.train, &scan, max_len),
        selected_layers: job.layers.clone(),
        tracked: tracked.clone(),
        shards: job.shard.count,
    };
    let settings = template.settings();
    let work = job.out.join(WORK_DIR);
    if job.fresh && work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    }
    io::ensure_dir(&work)?;
    check_same_job(
        &work.join(FIT_TEMPLATE_FILE),
        &settings,
        |t: FitTemplate| t.settings(),
    )?;
    io::write_json(&work.join(FIT_TEMPLATE_FILE), &template)?;

    let summary = |finished: bool, message: String| FitSummary {
        n_sequences: owned,
        n_tokens: owned_tokens as usize,
        n_layers: tracked.len(),
        seconds: started.elapsed().as_secs_f64(),
        finished,
        message,
    };
    // With the empirical Fisher the eigenvalue pass computes, under the data's labels, the very
    // gradients a store keeps: when that pass runs whole in this process the store is written
    // from its taps, and the separate store pass is skipped.
    let mut folded_store: Option<crate::store::StoreWriter> = None;
    // A whole fit hands its eigenbases to the eigenvalue pass in memory, not by reading back
    // the state it has just saved (which is there for resuming).
    let mut handed_bases: Option<Vec<curvature::LayerFactors>> = None;
    let mut saving_bases: Option<std::thread::JoinHandle<Result<()>>> = None;
    let finished = loop {
        let eigen = match handed_bases {
            Some(_) => None,
            None => checkpoint::load(&work, EIGEN_STATE, &settings)?,
        };
        let have_bases = handed_bases.is_some() || eigen.is_some();
        let pass = match job
            .options
            .strategy
            .passes()
            .into_iter()
            .find(|p| *p == curvature::Pass::Eigenvalue || !have_bases)
        {
            Some(p) => p,
            // Nothing left to run over the data (identity).
            None => break merge_factors(&job.out)?,
        };
        let bases: Vec<crate::curvature::LayerFactors> = match (handed_bases.take(), &eigen) {
            (Some(bases), _) => bases,
            (None, Some((_, bytes))) => {
                Factors::from_tensors(
                    io::parse_safetensors(bytes, EIGEN_STATE)?,
                    Strategy::Kfac,
                    &tracked,
                    EIGEN_STATE,
                )?
                .layers
            }
            (None, None) => Vec::new(),
        };
        let basis_refs: Vec<Option<&curvature::Eigenbasis>> = (0..tracked.len())
            .map(|i| bases.get(i).and_then(|l| l.eigen.as_ref()))
            .collect();
        let stem = pass_stem(pass, job.shard);
        let (mut state, position, complete) = match checkpoint::load(&work, &stem, &settings)? {
            Some((m, bytes)) => (
                curvature::PassSums::from_tensors(
                    io::parse_safetensors(&bytes, &m.file)?,
                    pass,
                    &tracked,
                    &m.file,
                )?,
                m.position as usize,
                m.complete,
            ),
            None => (curvature::PassSums::zeros(pass, &tracked), 0, false),
        };
        if let Some(options) = job.store {
            let fold = !complete
                && position == 0
                && pass == curvature::Pass::Eigenvalue
                && curvature::pass_labels(&job.options, pass) == crate::model::Labels::Data;
            if fold {
                let layers = if bases.is_empty() {
                    curvature::empty_factors(&tracked, 0, 0)
                } else {
                    bases.clone()
                };
                let factors = Factors {
                    strategy: job.options.strategy,
                    layers,
                };
                // The factors' hash is known once they are written (set before finishing).
                folded_store = Some(create_store(
                    job,
                    &factors,
                    String::new(),
                    options,
                    (&scan, max_len),
                    store_bytes,
                )?);
            }
        }
        let save = |state: &curvature::PassSums, done: usize, complete: bool| {
            let bytes = io::safetensors_bytes(&state.to_tensors(&tracked))?;
            checkpoint::save(
                &work,
                &stem,
                "safetensors",
                &bytes,
                &settings,
                done as u64,
                complete,
            )
        };
        if !complete {
            if position > 0 {
                eprintln!(
                    "resuming the {} pass of shard {} at sequence {position} of {owned}",
                    pass.name(),
                    job.shard,
                );
            }
            progress.begin(&format!("{} pass", pass.name()), owned_tokens);
            let mut checkpointer = curvature::Checkpointer::new(job.checkpoint, position);
            let (mut global, mut owned_seen) = (0usize, 0usize);
            let stats = data::stream_corpus(
                &job.train,
                &mut tok,
                max_len,
                model.vocab_size(),
                chunk,
                |c| {
                    // This shard's sequences past the resume point, with their corpus-wide
                    // numbers (which seed sampled labels).
                    let (mut seqs, mut indices) = (Vec::new(), Vec::new());
                    for s in c {
                        if job.shard.owns(global) {
                            if owned_seen >= position {
                                seqs.push(s.clone());
                                indices.push(global as u64);
                            } else {
                                progress.advance(s.ids.len() as u64);
                            }
                            owned_seen += 1;
                        }
                        global += 1;
                    }
                    let before = owned_seen - seqs.len();
                    curvature::accumulate_sequences(
                        model.as_ref(),
                        &job.options,
                        &seqs,
                        &indices,
                        &basis_refs,
                        &mut state,
                        folded_store.is_some(),
                        progress,
                        |state, k, taps, rotated| {
                            if let Some(w) = folded_store.as_mut() {
                                w.add(&seqs[k - taps.seq_lens.len()..k], taps, rotated)?;
                            }
                            let done = before + k;
                            if done < owned && checkpointer.due(done) {
                                save(state, done, false)?;
                            }
                            Ok(())
                        },
                    )
                },
            )?;
            progress.end();
            if stats.sha256 != scan.sha256 {
                return Err(Error::input(format!(
                    "{}: the corpus changed while it was being fitted; rerun with --fresh",
                    job.train.display()
                )));
            }
        }
        // The pass's complete sums are saved below (a whole fit's covariance sums while the
        // eigendecompositions run).
        let unsaved = !complete;
        if !job.shard.is_whole() {
            if unsaved {
                save(&state, owned, true)?;
            }
            return Ok(summary(
                false,
                format!(
                    "{} pass of shard {} {}; when all {} shards are done, run `infl merge {}`",
                    pass.name(),
                    job.shard,
                    if complete { "was already done" } else { "done" },
                    job.shard.count,
                    job.out.display()
                ),
            ));
        }
        // What `merge_factors` does for the shards of a sharded fit, from the sums in memory.
        let strategy = job.options.strategy;
        match pass {
            curvature::Pass::Covariance => {
                let layers = std::thread::scope(|scope| {
                    let saving = unsaved.then(|| scope.spawn(|| save(&state, owned, true)));
                    let layers = curvature::eigendecompose(&tracked, &state);
                    if let Some(saving) = saving {
                        saving.join().map_err(|_| {
                            Error::Other("saving the covariance sums: the thread panicked".into())
                        })??;
                    }
                    layers
                })?;
                if !strategy.passes().contains(&curvature::Pass::Eigenvalue) {
                    break write_factors(&job.out, &template, Factors { strategy, layers })?;
                }
                let (saving, layers) = save_bases_in_background(&work, &settings, layers);
                saving_bases = Some(saving);
                handed_bases = Some(layers);
            }
            curvature::Pass::Eigenvalue => {
                if let Some(saving) = saving_bases.take() {
                    saving.join().map_err(|_| {
                        Error::Other("saving the eigenbases: the thread panicked".into())
                    })??;
                }
                if unsaved {
                    save(&state, owned, true)?;
                }
                let mut layers = if bases.is_empty() {
                    curvature::empty_factors(
                        &tracked,
                        template.corpus.n_tokens as u64,
                        template.corpus.n_sequences as u64,
                    )
                } else {
                    bases
                };
                curvature::set_lambda(&mut layers, &state);
                break write_factors(&job.out, &template, Factors { strategy, layers })?;
            }
        }
    };
    let mut message = finished.message;
    if let Some(options) = job.store {
        let meta = match folded_store {
            Some(mut writer) => {
                writer.set_factors_sha256(open_factors(&job.out)?.factors_sha256);
                writer.finish()?
            }
            None => write_store(
                job,
                model.as_ref(),
                &mut tok,
                (&scan, max_len, chunk),
                options,
                store_bytes,
                progress,
            )?,
        };
        message.push_str(&format!(
            "; gradient store {:.1} MiB ({:.1} KiB per sequence, {:?}, {:?}) → {}",
            meta.bytes as f64 / (1u64 << 20) as f64,
            meta.bytes as f64 / meta.n_sequences.max(1) as f64 / 1024.0,
            options.dtype,
            options.form,
            job.out.join(crate::store::STORE_DIR).display()
        ));
    }
    Ok(summary(true, message))
}

/// The cosine normalisers `1 / sqrt(self(q) · self(z))` of each query (rows) and training
/// sequence (columns). A zero gradient (a one-token sequence predicts nothing) has no
/// direction: its cosine is 0, not 0/0.
fn cosine_factors(query_self: &[f64], train_self: &[f64]) -> Vec<Vec<f64>> {
    query_self
        .iter()
        .map(|sq| {
            train_self
                .iter()
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
}

/// Starts the fit's gradient store in `FACTORS/store/`, after checking that the disk holds
/// `need` bytes.
fn create_store(
    job: &FitJob,
    factors: &Factors,
    factors_sha256: String,
    options: crate::store::StoreOptions,
    (scan, max_len): (&data::CorpusStats, usize),
    need: u64,
) -> Result<crate::store::StoreWriter> {
    let dir = job.out.join(crate::store::STORE_DIR);
    crate::store::check_disk(&dir, need, scan.n_sequences)?;
    crate::store::StoreWriter::create(
        &dir,
        factors,
        options,
        &crate::store::StoreProvenance {
            factors_sha256,
            corpus_sha256: scan.sha256.clone(),
            max_len,
            n_documents: scan.n_documents,
        },
    )
}

/// The gradient store of a finished fit: one more streamed pass, under the data's labels.
fn write_store(
    job: &FitJob,
    model: &dyn TapModel,
    tok: &mut LazyTokenizer,
    (scan, max_len, chunk): (&data::CorpusStats, usize, usize),
    options: crate::store::StoreOptions,
    need: u64,
    progress: &dyn Progress,
) -> Result<crate::store::StoreMeta> {
    let meta = open_factors(&job.out)?;
    let factors = Factors::from_file(&job.out.join(FACTORS_FILE), meta.strategy, model.tracked())?;
    let mut writer = create_store(
        job,
        &factors,
        meta.factors_sha256,
        options,
        (scan, max_len),
        need,
    )?;
    progress.begin("gradient store", scan.n_tokens as u64);
    let mut seen = 0usize;
    data::stream_corpus(&job.train, tok, max_len, model.vocab_size(), chunk, |c| {
        curvature::run_batches(
            model,
            c,
            seen,
            job.options.batch_size,
            crate::model::Labels::Data,
            progress,
            "gradient store",
            |start, taps| writer.add(&c[start..start + taps.seq_lens.len()], taps, None),
        )?;
        seen += c.len();
        Ok(())
    })?;
    progress.end();
    writer.finish()
}

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

/// What `infl merge` did.
pub struct MergeOutcome {
    /// The final files are written.
    pub finished: bool,
    pub message: String,
}

/// Adds the shards' sums of the pending pass of the fit in `out` exactly: after the covariance
/// pass, the eigendecompositions (once, for every shard of the next pass); after the last
/// pass, factors.safetensors and meta.json. Refuses missing, unfinished or mismatched shards.
pub fn merge_factors(out: &Path) -> Result<MergeOutcome> {
    let work = out.join(WORK_DIR);
    let template_path = work.join(FIT_TEMPLATE_FILE);
    if !template_path.exists() {
        return Err(Error::input(format!(
            "{}: no fit in progress here (no {WORK_DIR}/{FIT_TEMPLATE_FILE}); run `infl fit --shard i/N --out {}` first",
            out.display(),
            out.display()
        )));
    }
    let template: FitTemplate = io::read_json(&template_path)?;
    let settings = template.settings();
    let tracked = &template.tracked;
    let n = template.shards;
    let gather = |pass: curvature::Pass| -> Result<curvature::PassSums> {
        let mut total = curvature::PassSums::zeros(pass, tracked);
        let mut missing = Vec::new();
        for i in 0..n {
            let stem = pass_stem(pass, Shard { index: i, count: n });
            match checkpoint::load(&work, &stem, &settings)? {
                Some((m, bytes)) if m.complete => total.add(&curvature::PassSums::from_tensors(
                    io::parse_safetensors(&bytes, &m.file)?,
                    pass,
                    tracked,
                    &m.file,
                )?),
                Some((m, _)) => missing.push(format!("{i} (at sequence {})", m.position)),
                None => missing.push(format!("{i} (not started)")),
            }
        }
        if !missing.is_empty() {
            return Err(Error::input(format!(
                "{}: the {} pass is not finished on shard(s) {} of {n}; run `infl fit --shard i/{n}` for them first",
                out.display(),
                pass.name(),
                missing.join(", ")
            )));
        }
        Ok(total)
    };
    let strategy = template.strategy;
    let eigen = checkpoint::load(&work, EIGEN_STATE, &settings)?;
    let passes = strategy.passes();
    let mut layers = match &eigen {
        Some((_, bytes)) => {
            Factors::from_tensors(
                io::parse_safetensors(bytes, EIGEN_STATE)?,
                Strategy::Kfac,
                tracked,
                EIGEN_STATE,
            )?
            .layers
        }
        None => curvature::empty_factors(
            tracked,
            template.corpus.n_tokens as u64,
            template.corpus.n_sequences as u64,
        ),
    };
    if passes.contains(&curvature::Pass::Covariance) && eigen.is_none() {
        let cov = gather(curvature::Pass::Covariance)?;
        layers = curvature::eigendecompose(tracked, &cov)?;
        if passes.contains(&curvature::Pass::Eigenvalue) {
            save_bases(&work, &settings, layers, n)?;
            return Ok(MergeOutcome {
                finished: false,
                message: format!(
                    "merged the covariance pass of {n} shard(s) and computed the eigenbases; now run the eigenvalue pass: the same `infl fit` on every shard, then `infl merge {}` again",
                    out.display()
                ),
            });
        }
    } else if passes.contains(&curvature::Pass::Eigenvalue) {
        let lam = gather(curvature::Pass::Eigenvalue)?;
        curvature::set_lambda(&mut layers, &lam);
    }
    write_factors(out, &template, Factors { strategy, layers })
}

/// Saves the eigenbases as the fit's eigenbasis state, then discards the covariance sums of
/// its `shards` (the bases stand for them from then on).
fn save_bases(
    work: &Path,
    settings: &serde_json::Value,
    layers: Vec<curvature::LayerFactors>,
    shards: usize,
) -> Result<Vec<curvature::LayerFactors>> {
    let (tensors, layers) = bases_tensors(layers);
    store_bases(work, settings, &tensors, shards)?;
    Ok(layers)
}

/// [`save_bases`] for a whole fit, on a thread of its own while the eigenvalue pass runs on
/// the bases in memory (the save took 0.36 s of the 1.5 s between a fit's passes, measured on
/// 200 sequences of the bench job). Until it lands the covariance sums are kept, so a fit
/// interrupted before then resumes from them, and their eigendecomposition gives the same
/// bases. The pass writes only its own state files meanwhile; the handle reports the save, and
/// is joined when the pass ends, before the fit's last writes remove the work directory.
fn save_bases_in_background(
    work: &Path,
    settings: &serde_json::Value,
    layers: Vec<curvature::LayerFactors>,
) -> (
    std::thread::JoinHandle<Result<()>>,
    Vec<curvature::LayerFactors>,
) {
    let (tensors, layers) = bases_tensors(layers);
    let (work, settings) = (work.to_path_buf(), settings.clone());
    let saving = std::thread::spawn(move || store_bases(&work, &settings, &tensors, 1));
    (saving, layers)
}

/// The tensors of the eigenbasis state, and the layers they were copied from.
fn bases_tensors(
    layers: Vec<curvature::LayerFactors>,
) -> (Vec<(String, io::OwnedTensor)>, Vec<curvature::LayerFactors>) {
    let kfac = Factors {
        strategy: Strategy::Kfac,
        layers,
    };
    (kfac.to_tensors(), kfac.layers)
}

fn store_bases(
    work: &Path,
    settings: &serde_json::Value,
    tensors: &[(String, io::OwnedTensor)],
    shards: usize,
) -> Result<()> {
    let bytes = io::safetensors_bytes(tensors)?;
    checkpoint::save(work, EIGEN_STATE, "safetensors", &bytes, settings, 0, true)?;
    for i in 0..shards {
        let shard = Shard {
            index: i,
            count: shards,
        };
        checkpoint::discard(work, &pass_stem(curvature::Pass::Covariance, shard))?;
    }
    Ok(())
}

/// Writes the finished factors of the fit in `out` (factors.safetensors, then meta.json, which
/// vouches for it by hash) and removes its work directory.
fn write_factors(out: &Path, template: &FitTemplate, factors: Factors) -> Result<MergeOutcome> {
    let (strategy, tracked, n) = (factors.strategy, &template.tracked, template.shards);
    let work = out.join(WORK_DIR);
    let st_path = out.join(FACTORS_FILE);
    let factors_sha256 = io::write_safetensors(&st_path, &factors.to_tensors(), None)?;
    let meta = FactorsMeta {
        tool: "infl".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kind: "factors".into(),
        strategy,
        fisher: template.fisher,
        modules: template.modules,
        options: template.options.clone(),
        model: template.model.clone(),
        corpus: template.corpus.clone(),
        layers: curvature::layer_summary(&factors)
            .into_iter()
            .map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            .collect(),
        selected_layers: template.selected_layers.clone(),
        factors_sha256,
    };
    // meta.json last: it vouches for the safetensors file by hash.
    io::write_json(&out.join(META_FILE), &meta)?;
    std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    Ok(MergeOutcome {
        finished: true,
        message: format!(
            "fitted {strategy:?} factors for {} layers on {} sequences ({} tokens){} → {}",
            tracked.len(),
            template.corpus.n_sequences,
            template.corpus.n_tokens,
            if n > 1 {
                format!(", merged from {n} shards")
            } else {
                String::new()
            },
            out.display()
        ),
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
    /// Which part of the corpus this process scores ([`Shard::WHOLE`] = all of it).
    pub shard: Shard,
    /// When the scoring pass saves its state for resumption.
    pub checkpoint: CheckpointPolicy,
    /// Discard any saved state in `out` instead of resuming from it.
    pub fresh: bool,
    /// Read the training gradients from the factors' gradient store (`fit --store`) instead of
    /// running the model over the corpus.
    pub store: bool,
}

impl ScoreJob {
    /// Exact (full-rank) scores with the heuristic damping and the top 10 kept, unsharded,
    /// fresh, never checkpointed, no dense matrix, no decompositions: the settings library
    /// callers start from and adjust with `ScoreJob { .., ..ScoreJob::new(..) }`.
    pub fn new(
        model: PathBuf,
        factors: PathBuf,
        train: PathBuf,
        queries: PathBuf,
        out: PathBuf,
    ) -> Self {
        ScoreJob {
            model,
            factors,
            train,
            queries,
            out,
            damping: Damping::Heuristic,
            top_k: 10,
            dense: false,
            batch_size: 8,
            max_len: None,
            memory_check: true,
            query_rank: None,
            per_layer: false,
            per_token: false,
            normalize: Normalize::None,
            prefilter: None,
            shard: Shard::WHOLE,
            checkpoint: CheckpointPolicy::NEVER,
            fresh: true,
            store: false,
        }
    }
}

/// What the reported score is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
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
    /// The gradient store the training gradients were read from (null = computed by the model).
    #[serde(default)]
    pub store: Option<String>,
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
            store: None,
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
    /// What happened and what to run next.
    pub message: String,
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

    // With a gradient store the corpus is read back, not recomputed: the queries stay exact
    // (full rank), rotated into the store's basis.
    let mut store = if job.store {
        if !job.shard.is_whole() || job.per_token {
            return Err(Error::input(
                "--store reads the whole stored corpus in one process: it does not go with --shard or --per-token",
            ));
        }
        let reader = crate::store::StoreReader::open(&job.factors.join(crate::store::STORE_DIR))?;
        let m = &reader.meta;
        if m.factors_sha256 != fmeta.factors_sha256 {
            return Err(Error::Mismatch(format!(
                "{}: the gradient store was written with other factors; rewrite it with `infl fit --store`",
                job.factors.display()
            )));
        }
        if m.corpus_sha256 != data::sha256_file(&job.train)? || m.max_len != max_len {
            return Err(Error::Mismatch(format!(
                "the gradient store in {} holds another corpus or --max-len ({} tokens per window) than --train {} with --max-len {max_len}",
                job.factors.display(),
                m.max_len,
                job.train.display()
            )));
        }
        Some(reader)
    } else {
        None
    };
    let pq = influence::precondition_queries(
        model.as_ref(),
        &queries,
        &preconditioner,
        job.batch_size,
        job.query_rank,
        store.is_some(),
        progress,
    )?;
    // A model on a GPU has the training sequences' scores formed there too.
    let on_device = match model::statistics_device(model.as_ref())? {
        Some(d) => Some(influence::device::DeviceScorer::new(
            d,
            &pq.per_layer,
            pq.len(),
        )?),
        None => None,
    };

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

    if job.per_token && !job.shard.is_whole() {
        return Err(Error::input(
            "--per-token does not go with --shard: the per-token pass needs the merged top-k; run it unsharded (it reads only the top and bottom sequences)",
        ));
    }
    let settings = serde_json::json!({
        "stage": "score",
        "model_config_sha256": model_info.config_sha256,
        "model_weights_sha256": model_info.weights_sha256,
        "factors_sha256": fmeta.factors_sha256,
        "corpus_sha256": data::sha256_file(&job.train)?,
        "queries_sha256": queries_sha,
        "max_len": max_len,
        "damping": job.damping,
        "top_k": job.top_k,
        "dense": job.dense,
        "batch_size": job.batch_size,
        "query_rank": job.query_rank,
        "per_layer": job.per_layer,
        "normalize": job.normalize,
        "prefilter": job.prefilter.as_ref().map(|p| p.0),
        "shards": job.shard.count,
        "store": job.store,
    });
    let work = job.out.join(WORK_DIR);
    if job.fresh && work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    }
    io::ensure_dir(&work)?;
    check_same_job(
        &work.join(SCORE_TEMPLATE_FILE),
        &settings,
        |t: ScoreTemplate| t.settings,
    )?;
    io::write_json(
        &work.join(SCORE_TEMPLATE_FILE),
        &ScoreTemplate {
            settings: settings.clone(),
            shards: job.shard.count,
            top_k: job.top_k,
        },
    )?;
    let stem = format!("score.{}", job.shard.tag());
    let dense_paths = dense_row_paths(&work, job.shard, queries.len());
    let (saved, position, complete) = match checkpoint::load(&work, &stem, &settings)? {
        Some((m, bytes)) => (
            Some(parse_score_state(&bytes, &m.file)?),
            m.position as usize,
            m.complete,
        ),
        None => (None, 0, false),
    };
    let mut dense_columns = saved.as_ref().map_or(0, |s| s.dense_columns);
    let dense = if job.dense && !complete {
        Some(results::DenseWriter::resume(
            dense_paths.clone(),
            dense_columns,
        )?)
    } else {
        None
    };
    let mut acc = match saved {
        Some(s) => results::ScoreAccumulator::resume(s.summaries, job.top_k, dense),
        None => results::ScoreAccumulator::new(queries.len(), tracked.len(), job.top_k, dense),
    };
    let cosine = job.normalize == Normalize::Cosine;
    let scale = |taps: &crate::model::TapBatch| -> Option<Vec<Vec<f64>>> {
        cosine.then(|| {
            let own = influence::batch_self_influence(&tracked, &preconditioner, taps);
            cosine_factors(&pq.self_influence, &own)
        })
    };
    let save = |acc: &results::ScoreAccumulator,
                dense_columns: u64,
                done: usize,
                meta: Option<&ScoresMeta>| {
        let state = ScoreStateRef {
            summaries: &acc.summaries,
            dense_columns,
            meta,
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| Error::Other(e.to_string()))?;
        checkpoint::save(
            &work,
            &stem,
            "json",
            &bytes,
            &settings,
            done as u64,
            meta.is_some(),
        )
    };
    if position > 0 && !complete {
        eprintln!(
            "resuming the scoring pass of shard {} at corpus sequence {position}",
            job.shard
        );
    }
    progress.begin("scoring pass", 0);
    let pass_started = std::time::Instant::now();
    let mut seen = 0usize;
    let mut last_save = (0usize, std::time::Instant::now());
    let mut scored = 0usize;
    let stats = if let Some(reader) = store.as_mut() {
        if !complete {
            // Each layer's queries, already in the store's basis, query after query (`Q × D`,
            // each query contiguous, as the dot kernel reads them).
            let rotated: Vec<Vec<f32>> = tracked
                .iter()
                .enumerate()
                .map(|(li, l)| match &pq.per_layer[li] {
                    influence::LayerQueries::Full(stack) => {
                        let d = l.d_out * l.d_in_h();
                        let mut out = vec![0f32; stack.ncols() * d];
                        for q in 0..stack.ncols() {
                            out[q * d..(q + 1) * d].copy_from_slice(
                                stack
                                    .col(q)
                                    .try_as_col_major()
                                    .expect("owned column is contiguous")
                                    .as_slice(),
                            );
                        }
                        out
                    }
                    influence::LayerQueries::LowRank { .. } => {
                        unreachable!("store scoring asks for full-rank queries")
                    }
                })
                .collect();
            let n_queries = pq.self_influence.len();
            let batch = job.batch_size.max(1) * 4;
            let mut index = 0usize;
            // Reading overlaps scoring: a reader thread walks the next batch's records (locating
            // its rotated columns in the mapping and mapping their pages in, rebuilding those
            // stored as factors) while the batch before it is scored; two sets of per-layer
            // batches go back and forth.
            type Filled = Result<(Vec<crate::store::LayerBatch>, Vec<data::Sequence>)>;
            let (filled_tx, filled_rx) = std::sync::mpsc::sync_channel::<Filled>(1);
            let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<crate::store::LayerBatch>>();
            for _ in 0..2 {
                let set = tracked
                    .iter()
                    .map(|l| crate::store::LayerBatch::new(l.d_out * l.d_in_h()))
                    .collect();
                let _ = empty_tx.send(set);
            }
            let bytes = reader.bytes();
            let reader_ref = &mut *reader;
            std::thread::scope(|scope| -> Result<()> {
                scope.spawn(move || {
                    crate::linalg::flush_subnormals_on_this_thread();
                    for mut columns in empty_rx {
                        columns.iter_mut().for_each(|c| c.clear());
                        let mut seqs = Vec::with_capacity(batch);
                        while seqs.len() < batch {
                            match reader_ref.next_columns(&mut columns, seqs.len()) {
                                Ok(Some(seq)) => seqs.push(seq),
                                Ok(None) => break,
                                Err(e) => {
                                    let _ = filled_tx.send(Err(e));
                                    return;
                                }
                            }
                        }
                        reader_ref.prefault_batch();
                        if seqs.is_empty() || filled_tx.send(Ok((columns, seqs))).is_err() {
                            return;
                        }
                    }
                });
                // Owned here, so that an early return drops it and the reader stops waiting.
                let empty_tx = empty_tx;
                let mut dots = Vec::new();
                for filled in filled_rx {
                    let (columns, seqs) = filled?;
                    let n = seqs.len();
                    let mut own = vec![0f64; n];
                    let mut parts = Vec::with_capacity(tracked.len());
                    for (li, l) in tracked.iter().enumerate() {
                        let c = &columns[li];
                        if cosine {
                            for (k, o) in own.iter_mut().enumerate() {
                                let col = c.column_f32(k, &bytes);
                                *o += preconditioner.self_influence_in_store_basis(
                                    li,
                                    faer::MatRef::from_column_major_slice(
                                        &col,
                                        l.d_out,
                                        l.d_in_h(),
                                    ),
                                );
                            }
                        }
                        let mut part = faer::Mat::<f32>::zeros(n_queries, n);
                        let queries: Vec<&[f32]> = rotated[li].chunks(c.d).collect();
                        let stored = c.stored(&bytes);
                        let rebuilt: Vec<&[f32]> = c.rebuilt().chunks(c.d).collect();
                        for (block, cols) in [
                            (bytes.columns(&stored), &c.stored_cols),
                            (crate::linalg::Columns::F32(&rebuilt), &c.rebuilt_cols),
                        ] {
                            if cols.is_empty() {
                                continue;
                            }
                            dots.resize(cols.len() * n_queries, 0.0);
                            crate::linalg::dots_into(&mut dots, &queries, block, c.d);
                            for (i, &k) in cols.iter().enumerate() {
                                for q in 0..n_queries {
                                    part[(q, k)] = dots[i * n_queries + q] as f32;
                                }
                            }
                        }
                        parts.push(part);
                    }
                    let factors: Option<Vec<Vec<f64>>> =
                        cosine.then(|| cosine_factors(&pq.self_influence, &own));
                    let indices: Vec<usize> = (index..index + n).collect();
                    acc.add(
                        &indices,
                        &seqs,
                        &parts,
                        factors.as_deref(),
                        allowed.as_deref(),
                    )?;
                    if job.dense {
                        dense_columns += n as u64;
                    }
                    progress.advance(seqs.iter().map(|s| s.ids.len() as u64).sum());
                    index += n;
                    let _ = empty_tx.send(columns);
                }
                Ok(())
            })?;
        }
        let m = &reader.meta;
        data::CorpusStats {
            n_documents: m.n_documents,
            n_sequences: m.n_sequences,
            n_tokens: m.n_tokens,
            sha256: m.corpus_sha256.clone(),
        }
    } else {
        data::stream_corpus(
            &job.train,
            &mut tok,
            max_len,
            model.vocab_size(),
            job.batch_size.max(1) * CHUNK_BATCHES,
            |chunk| {
                let first = seen;
                seen += chunk.len();
                if complete || seen <= position {
                    return Ok(());
                }
                let longest = chunk.iter().map(|s| s.ids.len()).max().unwrap_or(0);
                if longest > checked_len {
                    check_memory(longest)?;
                    checked_len = longest;
                }
                let indices: Vec<usize> = (first.max(position)..seen)
                    .filter(|&i| job.shard.owns(i))
                    .filter(|i| union.as_ref().is_none_or(|u| u.contains(i)))
                    .collect();
                let kept: Vec<data::Sequence> =
                    indices.iter().map(|&i| chunk[i - first].clone()).collect();
                let stable: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
                curvature::run_indexed(
                    model.as_ref(),
                    &kept,
                    &stable,
                    job.batch_size,
                    crate::model::Labels::Data,
                    progress,
                    "scoring pass",
                    |start, taps| {
                        let parts = match &on_device {
                            Some(scorer) => scorer.batch_scores(&tracked, taps)?,
                            None => influence::batch_scores(&tracked, &pq.per_layer, taps),
                        };
                        let n = taps.seq_lens.len();
                        acc.add(
                            &indices[start..start + n],
                            &kept[start..start + n],
                            &parts,
                            scale(taps).as_deref(),
                            allowed.as_deref(),
                        )?;
                        if job.dense {
                            dense_columns += n as u64;
                        }
                        scored += n;
                        let due = job
                            .checkpoint
                            .every_sequences
                            .is_some_and(|m| scored - last_save.0 >= m)
                            || last_save.1.elapsed().as_secs_f64() >= job.checkpoint.every_seconds;
                        if due {
                            acc.flush()?;
                            save(&acc, dense_columns, indices[start + n - 1] + 1, None)?;
                            last_save = (scored, std::time::Instant::now());
                        }
                        Ok(())
                    },
                )
            },
        )?
    };
    progress.end();
    let pass_seconds = pass_started.elapsed().as_secs_f64();
    if job.top_k > stats.n_sequences {
        eprintln!(
            "warning: --top-k {} exceeds the {} training sequences; every sequence is listed",
            job.top_k, stats.n_sequences
        );
    }
    if !complete {
        acc.flush()?;
        let meta = ScoresMeta {
            query_rank: if job.store { None } else { job.query_rank },
            store: job.store.then(|| {
                job.factors
                    .join(crate::store::STORE_DIR)
                    .display()
                    .to_string()
            }),
            normalize: job.normalize,
            per_layer: job.per_layer,
            per_token: job.per_token,
            prefilter: job.prefilter.as_ref().map(|p| p.0),
            dense: job.dense,
            queries: QueriesInfo {
                path: job.queries.display().to_string(),
                sha256: queries_sha.clone(),
                ids: query_ids.clone(),
                prompts: queries.iter().map(|q| q.prompt.clone()).collect(),
                completions: queries.iter().map(|q| q.completion.clone()).collect(),
                losses: pq.losses.clone(),
                self_influence: pq.self_influence.clone(),
            },
            ..ScoresMeta::base(
                "scores",
                SCORE_CONVENTION,
                &fmeta,
                model_info.clone(),
                &preconditioner,
                &tracked,
                CorpusInfo::streamed(&job.train, &stats, max_len),
                (job.damping, job.batch_size, job.top_k),
                &job.factors,
            )
        };
        save(&acc, dense_columns, stats.n_sequences, Some(&meta))?;
    }
    drop(acc);
    if !job.shard.is_whole() {
        let state = checkpoint::load(&work, &stem, &settings)?
            .ok_or_else(|| Error::Other(format!("{stem}: saved state vanished")))?;
        let state = parse_score_state(&state.1, &state.0.file)?;
        let meta = state
            .meta
            .ok_or_else(|| Error::Other(format!("{stem}: complete state without meta")))?;
        return Ok(ScoreSummary {
            summaries: state.summaries,
            top: Vec::new(),
            meta,
            seconds: started.elapsed().as_secs_f64(),
            pass_seconds,
            message: format!(
                "scoring pass of shard {} {}; when all {} shards are done, run `infl merge {}`",
                job.shard,
                if complete { "was already done" } else { "done" },
                job.shard.count,
                job.out.display()
            ),
        });
    }
    let merged = gather_scores(&job.out)?;
    let token_parts = if job.per_token {
        Some(token_pass(
            model.as_ref(),
            &merged.summaries,
            &pq,
            job.batch_size,
            &mut tok,
            |taps| scale(taps),
        )?)
    } else {
        None
    };
    let top = write_scores(&job.out, &merged, token_parts.as_ref())?;
    Ok(ScoreSummary {
        summaries: merged.summaries,
        top,
        meta: merged.meta,
        seconds: started.elapsed().as_secs_f64(),
        pass_seconds,
        message: format!(
            "scored {} queries × {} training sequences → {}",
            query_ids.len(),
            stats.n_sequences,
            job.out.display()
        ),
    })
}

const SCORE_TEMPLATE_FILE: &str = "score.json";

/// What every shard of a score records for `infl merge`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ScoreTemplate {
    settings: serde_json::Value,
    shards: usize,
    top_k: usize,
}

/// The saved state of a shard's scoring pass (a checkpoint, or complete with `meta`).
#[derive(serde::Serialize)]
struct ScoreStateRef<'a> {
    summaries: &'a [results::QuerySummary],
    dense_columns: u64,
    meta: Option<&'a ScoresMeta>,
}

#[derive(serde::Deserialize)]
struct ScoreState {
    summaries: Vec<results::QuerySummary>,
    dense_columns: u64,
    meta: Option<ScoresMeta>,
}

fn parse_score_state(bytes: &[u8], what: &str) -> Result<ScoreState> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Mismatch(format!(
            "{what}: unreadable scoring state ({e}); rerun with --fresh"
        ))
    })
}

fn dense_row_paths(work: &Path, shard: Shard, n_queries: usize) -> Vec<PathBuf> {
    (0..n_queries)
        .map(|q| work.join(format!("dense.{}.q{q}.f32", shard.tag())))
        .collect()
}

/// The shards' scoring states of a results directory, merged.
struct MergedScores {
    summaries: Vec<results::QuerySummary>,
    meta: ScoresMeta,
    dense_rows: Vec<Vec<PathBuf>>,
    shards: usize,
}

fn gather_scores(out: &Path) -> Result<MergedScores> {
    let work = out.join(WORK_DIR);
    let template: ScoreTemplate = io::read_json(&work.join(SCORE_TEMPLATE_FILE))?;
    let n = template.shards;
    let mut merged: Option<(Vec<results::QuerySummary>, ScoresMeta)> = None;
    let mut missing = Vec::new();
    for i in 0..n {
        let shard = Shard { index: i, count: n };
        let stem = format!("score.{}", shard.tag());
        match checkpoint::load(&work, &stem, &template.settings)? {
            Some((m, bytes)) if m.complete => {
                let state = parse_score_state(&bytes, &m.file)?;
                let meta = state.meta.ok_or_else(|| {
                    Error::Mismatch(format!("{}: complete state without meta", m.file))
                })?;
                merged = Some(match merged {
                    None => (state.summaries, meta),
                    Some((mut all, first)) => {
                        for (a, b) in all.iter_mut().zip(&state.summaries) {
                            a.merge(b, template.top_k);
                        }
                        (all, first)
                    }
                });
            }
            Some((m, _)) => missing.push(format!("{i} (at corpus sequence {})", m.position)),
            None => missing.push(format!("{i} (not started)")),
        }
    }
    if !missing.is_empty() {
        return Err(Error::input(format!(
            "{}: the scoring pass is not finished on shard(s) {} of {n}; run `infl score --shard i/{n}` for them first",
            out.display(),
            missing.join(", ")
        )));
    }
    let (summaries, meta) = merged.ok_or_else(|| Error::input("no shards to merge"))?;
    let n_queries = meta.queries.ids.len();
    Ok(MergedScores {
        dense_rows: (0..n)
            .map(|i| dense_row_paths(&work, Shard { index: i, count: n }, n_queries))
            .collect(),
        summaries,
        meta,
        shards: n,
    })
}

/// Writes a results directory from merged summaries: top_k.jsonl, distribution.json,
/// layers.json, scores.safetensors, then meta.json (last), and removes the work state.
fn write_scores(
    out: &Path,
    merged: &MergedScores,
    token_parts: Option<&std::collections::HashMap<(usize, usize), Vec<results::TokenPart>>>,
) -> Result<Vec<results::TopEntry>> {
    let meta = &merged.meta;
    let query_ids = &meta.queries.ids;
    let mut tok = LazyTokenizer::new(Path::new(&meta.model.path));
    let top = results::entries(
        &merged.summaries,
        query_ids,
        &mut tok,
        meta.per_layer,
        token_parts,
    );
    results::write_top_k(&out.join("top_k.jsonl"), &top)?;
    results::write_distribution(&out.join("distribution.json"), &merged.summaries, query_ids)?;
    if meta.per_layer {
        results::write_layers(
            &out.join("layers.json"),
            &merged.summaries,
            query_ids,
            &meta.layers,
        )?;
    }
    if meta.dense {
        results::write_dense_from_shards(
            &out.join("scores.safetensors"),
            query_ids,
            &merged.dense_rows,
            meta.corpus.n_sequences,
        )?;
    }
    io::write_json(&out.join(META_FILE), meta)?;
    let work = out.join(WORK_DIR);
    std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    Ok(top)
}

/// Merges the shards of a sharded score into a results directory.
pub struct ScoresMerged {
    pub outcome: MergeOutcome,
    pub top: Vec<results::TopEntry>,
}

pub fn merge_scores(out: &Path) -> Result<ScoresMerged> {
    let merged = gather_scores(out)?;
    let top = write_scores(out, &merged, None)?;
    Ok(ScoresMerged {
        outcome: MergeOutcome {
            finished: true,
            message: format!(
                "merged the scores of {} queries × {} training sequences from {} shard(s) → {}",
                merged.meta.queries.ids.len(),
                merged.meta.corpus.n_sequences,
                merged.shards,
                out.display()
            ),
        },
        top,
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
            curvature::run_batches(
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

/// `infl merge DIR`: merges the shards of the fit or score whose `--out` was `DIR`.
pub fn merge(dir: &Path) -> Result<MergeOutcome> {
    let work = dir.join(WORK_DIR);
    if work.join(FIT_TEMPLATE_FILE).exists() {
        return merge_factors(dir);
    }
    if work.join(SCORE_TEMPLATE_FILE).exists() {
        return merge_scores(dir).map(|m| m.outcome);
    }
    Err(Error::input(format!(
        "{}: nothing to merge (no {WORK_DIR}/ with the state of a sharded `infl fit` or `infl score`)",
        dir.display()
    )))
}
