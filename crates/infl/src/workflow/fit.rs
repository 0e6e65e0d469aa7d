//! `infl fit`: the curvature passes over the corpus (streamed, sharded, checkpointed) that end
//! in a factors directory. A fit scans the corpus once (hash, counts, this shard's part), then
//! runs its strategy's passes in turn; each pass resumes from its saved state, and a whole fit
//! hands the eigenbases from the covariance pass to the eigenvalue pass in memory.

use super::fit_merge::{save_bases_in_background, write_factors, EIGEN_STATE, FIT_TEMPLATE_FILE};
use super::{check_max_len, open_work_dir, MergeOutcome, CHUNK_BATCHES};
use crate::checkpoint;
use crate::curvature::format::{open_factors, FACTORS_FILE};
use crate::curvature::{self, Factors, LayerFactors, Pass, PassSums, Strategy};
use crate::data::{self, CorpusStats, LazyTokenizer};
use crate::error::{Error, Result};
use crate::model::{self, Labels, TapModel, TrackedLayer};
use crate::options::{Compute, FitOptions, Partitioning, RunOptions};
use crate::output_dir::{Kind, OutputDir};
use crate::pass::Progress;
use crate::provenance::{CorpusInfo, ModelInfo};
use crate::shard::Shard;
use crate::store::{StoreMeta, StoreOptions, StoreProvenance, StoreWriter, STORE_DIR};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

/// One `infl fit`: its files, what it computes, how it runs and where.
#[derive(Debug, Clone)]
pub struct FitJob {
    pub model: PathBuf,
    pub train: PathBuf,
    pub out: PathBuf,
    pub options: FitOptions,
    pub run: RunOptions,
    pub compute: Compute,
    /// After fitting, keep every training sequence's gradient in the factors' basis on disk
    /// (`OUT/store/`), in this precision, for `score --store`.
    pub store: Option<StoreOptions>,
    /// Fit the tracked layers a partition at a time ([`crate::partition`]).
    pub partitioning: Partitioning,
}

impl FitJob {
    /// A fit with `options`, unsharded, fresh, never checkpointed, on the CPU, no store: what
    /// library callers (the demo, the validations, the recipes) start from and adjust with
    /// `FitJob { .., ..FitJob::new(..) }`.
    pub fn new(model: PathBuf, train: PathBuf, out: PathBuf, options: FitOptions) -> Self {
        FitJob {
            model,
            train,
            out,
            options,
            run: RunOptions::ONCE,
            compute: Compute::default(),
            store: None,
            partitioning: Partitioning::default(),
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

/// What every shard of a fit records for `infl merge`, which has no model at hand.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct FitTemplate {
    pub(super) options: FitOptions,
    pub(super) model: ModelInfo,
    pub(super) corpus: CorpusInfo,
    pub(super) tracked: Vec<TrackedLayer>,
    pub(super) shards: usize,
}

impl FitTemplate {
    /// What shards and resumed runs must agree on: everything but paths.
    pub(super) fn settings(&self) -> serde_json::Value {
        let mut settings = serde_json::json!({
            "stage": "fit",
            "options": self.options,
            "tracked": self.tracked,
            "model_config_sha256": self.model.config_sha256,
            "model_weights_sha256": self.model.weights_sha256,
            "corpus_sha256": self.corpus.sha256,
            "max_len": self.corpus.max_len,
            "shards": self.shards,
            // 2: the covariance sums are saved as packed lower triangles (1: whole matrices).
            "state_format": 2,
        });
        // Only with an adapter, so that the settings of runs without one keep their value.
        if let Some(adapter) = &self.model.adapter {
            settings["model_adapter_sha256"] = adapter.sha256.clone().into();
        }
        settings
    }
}

/// The state file of one pass of one shard.
pub(super) fn pass_stem(pass: Pass, shard: Shard) -> String {
    format!("{}.{}", pass.name(), shard.tag())
}

pub fn fit(job: &FitJob, progress: &dyn Progress) -> Result<FitSummary> {
    if job.options.seeds > 1 {
        return super::fit_seeds::fit_seeds(job, progress);
    }
    fit_one(job, progress)
}

/// One fit (the seed's own, of a `--seeds` fit).
pub(super) fn fit_one(job: &FitJob, progress: &dyn Progress) -> Result<FitSummary> {
    if !job.partitioning.is_none() {
        return super::fit_partitions::fit_partitioned(job, progress);
    }
    let started = std::time::Instant::now();
    job.options.check()?;
    job.run.check()?;
    // What earlier work in this process freed goes back before the model loads: kept by the
    // allocator, a layer partition's buffers stood under the next partition's load (21.9 GiB
    // for a 1B model's two 18.5 GiB partitions under a 20 GiB limit).
    crate::io::release_freed_memory();
    // The model first (memory-mapped, quick): a refused device writes no directory.
    let model = open_model(job)?;
    let max_len = job.options.max_len.unwrap_or(model.max_positions());
    check_max_len(max_len, model.as_ref())?;
    let out = OutputDir::open(
        &job.out,
        Kind::Factors,
        job.run.shard,
        job.run.output.overwrite,
    )?;
    let mut tok = LazyTokenizer::new(&job.model);
    let chunk = job.options.batch_size.max(1) * CHUNK_BATCHES;
    let scan = scan_corpus(job, model.as_ref(), &mut tok, max_len, chunk)?;
    if job.run.memory_check {
        let e = crate::inspect::estimate(model.as_ref(), job.options.batch_size, scan.longest);
        let advice = match crate::inspect::mem_available() {
            Some(a) => crate::inspect::partition_advice(
                model.as_ref(),
                job.options.batch_size,
                scan.longest,
                a,
            ),
            None => "use a smaller --batch-size or --max-len".into(),
        };
        crate::inspect::check_memory("infl fit", e.fit_total(), &advice)?;
    }
    if job.store.is_some() && !job.run.shard.is_whole() {
        return Err(Error::input(
            "--store is written by an unsharded fit (the store is one file in corpus order); run the sharded fit without it, then `infl fit --store` on one machine, or score without a store",
        ));
    }
    let template = FitTemplate {
        options: job.options.clone(),
        model: ModelInfo::of(&job.model, model.as_ref())?
            .with_adapter(job.compute.adapter.as_deref())?,
        corpus: CorpusInfo::streamed(&job.train, &scan.stats, max_len),
        tracked: model.tracked().to_vec(),
        shards: job.run.shard.count,
    };
    let settings = template.settings();
    let work = open_work_dir(
        &out,
        job.run.fresh,
        FIT_TEMPLATE_FILE,
        &settings,
        &template,
        |t: FitTemplate| t.settings(),
    )?;
    let mut run = FitRun {
        job,
        model: model.as_ref(),
        tok,
        scan,
        max_len,
        chunk,
        template,
        settings,
        work,
        progress,
        folded_store: None,
    };
    let summary = |finished: bool, message: String, scan: &Scan| FitSummary {
        n_sequences: scan.owned,
        n_tokens: scan.owned_tokens as usize,
        n_layers: model.tracked().len(),
        seconds: started.elapsed().as_secs_f64(),
        finished,
        message,
    };
    let mut message = match run.passes()? {
        Ended::Factors(outcome) => outcome.message,
        Ended::ShardDone(message) => return Ok(summary(false, message, &run.scan)),
    };
    if let Some(options) = job.store {
        let meta = run.finish_store(options)?;
        message.push_str(&store_message(&meta, options, job));
    }
    Ok(summary(true, message, &run.scan))
}

/// The model with the layers the fit tracks.
pub(super) fn open_model(job: &FitJob) -> Result<Box<dyn TapModel>> {
    let mut model = model::load(&job.model, job.options.modules, job.compute.clone())?;
    if let Some(names) = &job.options.layers {
        model = model::select_layers(model, names)?;
    }
    if model.tracked().is_empty() {
        return Err(Error::input(
            "no tracked layers: --modules selected nothing",
        ));
    }
    Ok(model)
}

/// The first scan of the corpus (no model): its hash and counts, this shard's part, the
/// longest window and the bytes a gradient store would take.
struct Scan {
    stats: CorpusStats,
    longest: usize,
    /// This shard's sequences and their tokens.
    owned: usize,
    owned_tokens: u64,
    store_bytes: u64,
}

fn scan_corpus(
    job: &FitJob,
    model: &dyn TapModel,
    tok: &mut LazyTokenizer,
    max_len: usize,
    chunk: usize,
) -> Result<Scan> {
    let (mut longest, mut global) = (1usize, 0usize);
    let (mut owned, mut owned_tokens, mut store_bytes) = (0usize, 0u64, 0u64);
    let stats = data::stream_corpus_columns(
        &job.train,
        &job.options.columns,
        tok,
        max_len,
        model.vocab_size(),
        chunk,
        |c| {
            for s in c {
                longest = longest.max(s.ids.len());
                if job.run.shard.owns(global) {
                    owned += 1;
                    owned_tokens += s.ids.len() as u64;
                    if let Some(options) = job.store {
                        store_bytes +=
                            crate::store::sequence_bytes(model.tracked(), s.ids.len(), options);
                    }
                }
                global += 1;
            }
            Ok(())
        },
    )?;
    Ok(Scan {
        stats,
        longest,
        owned,
        owned_tokens,
        store_bytes,
    })
}

/// How the passes of a fit ended.
enum Ended {
    /// factors.safetensors and meta.json are written.
    Factors(MergeOutcome),
    /// A shard's pass is done; `infl merge` comes next.
    ShardDone(String),
}

/// A pass's saved state: its sums, the sequences done, and whether it is complete.
struct PassState {
    sums: PassSums,
    position: usize,
    complete: bool,
}

/// Everything the passes of one fit share.
struct FitRun<'a> {
    job: &'a FitJob,
    model: &'a dyn TapModel,
    tok: LazyTokenizer,
    scan: Scan,
    max_len: usize,
    chunk: usize,
    template: FitTemplate,
    settings: serde_json::Value,
    work: PathBuf,
    progress: &'a dyn Progress,
    /// With the empirical Fisher the eigenvalue pass computes, under the data's labels, the
    /// very gradients a store keeps: when that pass runs whole in this process the store is
    /// written from its taps, and the separate store pass is skipped.
    folded_store: Option<StoreWriter>,
}

impl FitRun<'_> {
    fn tracked(&self) -> &[TrackedLayer] {
        &self.template.tracked
    }

    /// Runs the passes the strategy still needs, in turn, until the factors are written or
    /// this shard's pass is done.
    fn passes(&mut self) -> Result<Ended> {
        let strategy = self.job.options.strategy;
        // A whole fit hands its eigenbases to the eigenvalue pass in memory, not by reading
        // back the state it has just saved (which is there for resuming).
        let mut handed_bases: Option<Arc<Factors>> = None;
        let mut saving_bases: Option<JoinHandle<Result<()>>> = None;
        loop {
            let bases = match handed_bases.take() {
                Some(bases) => Some(bases),
                None => self.saved_bases()?.map(Arc::new),
            };
            let Some(pass) = strategy
                .passes()
                .into_iter()
                .find(|p| *p == Pass::Eigenvalue || bases.is_none())
            else {
                // Nothing left to run over the data (identity).
                return super::fit_merge::merge_factors(&self.job.out, self.progress)
                    .map(Ended::Factors);
            };
            // The eigenvalue pass needs only the eigenvectors: once the bases are saved, A and
            // S go back, and the factors file takes them from the saved bases at the end.
            let bases = match (pass, bases) {
                (Pass::Eigenvalue, Some(b)) if self.job.run.shard.is_whole() => {
                    if let Some(saving) = saving_bases.take() {
                        join(saving, "saving the eigenbases")?;
                    }
                    Some(Arc::new(without_covariances(b)))
                }
                (_, b) => b,
            };
            let stem = pass_stem(pass, self.job.run.shard);
            let mut state = self.load_state(pass, &stem)?;
            let unsaved = !state.complete;
            if unsaved {
                let layers = bases.as_deref().map_or(&[][..], |b| &b.layers[..]);
                self.start_folded_store(pass, &state, layers)?;
                self.stream_pass(pass, &stem, layers, &mut state)?;
            }
            // The pass's complete sums are saved below (a whole fit's covariance sums while the
            // eigendecompositions run).
            if !self.job.run.shard.is_whole() {
                if unsaved {
                    self.save(&stem, &state.sums, self.scan.owned, true)?;
                }
                return Ok(Ended::ShardDone(self.shard_message(pass, state.complete)));
            }
            // What `merge_factors` does for the shards of a sharded fit, from the sums in memory.
            match pass {
                Pass::Covariance => {
                    let layers = self.eigendecompose(&stem, state.sums, unsaved)?;
                    if !strategy.passes().contains(&Pass::Eigenvalue) {
                        return self.write(layers);
                    }
                    let bases = Arc::new(Factors {
                        strategy: Strategy::Kfac,
                        layers,
                    });
                    saving_bases = Some(save_bases_in_background(
                        &self.work,
                        &self.settings,
                        bases.clone(),
                    ));
                    handed_bases = Some(bases);
                }
                Pass::Eigenvalue => {
                    if let Some(saving) = saving_bases.take() {
                        join(saving, "saving the eigenbases")?;
                    }
                    if unsaved {
                        self.save(&stem, &state.sums, self.scan.owned, true)?;
                    }
                    // The save has finished, so these bases are the only reference left.
                    let mut layers = match bases.map(Arc::try_unwrap) {
                        Some(Ok(bases)) => bases.layers,
                        Some(Err(shared)) => shared.layers.clone(),
                        None => {
                            let corpus = &self.template.corpus;
                            curvature::empty_factors(
                                self.tracked(),
                                corpus.n_tokens as u64,
                                corpus.n_sequences as u64,
                            )
                        }
                    };
                    curvature::set_lambda(&mut layers, &state.sums);
                    return self.write(layers);
                }
            }
        }
    }

    /// The eigenbases a covariance pass left in the work directory, if it did (without A and
    /// S, which the factors file takes from the saved file).
    fn saved_bases(&self) -> Result<Option<Factors>> {
        let Some((_, mut file)) =
            checkpoint::load_tensor_file(&self.work, EIGEN_STATE, &self.settings)?
        else {
            return Ok(None);
        };
        Factors::read_bases(&mut file, self.tracked()).map(Some)
    }

    /// The saved state of `pass` for this shard, or zeros.
    fn load_state(&self, pass: Pass, stem: &str) -> Result<PassState> {
        Ok(
            match checkpoint::load_tensor_file(&self.work, stem, &self.settings)? {
                Some((m, mut file)) => PassState {
                    sums: PassSums::read(&mut file, pass, self.tracked())?,
                    position: m.position as usize,
                    complete: m.complete,
                },
                None => PassState {
                    sums: PassSums::zeros(pass, self.tracked()),
                    position: 0,
                    complete: false,
                },
            },
        )
    }

    fn save(&self, stem: &str, sums: &PassSums, done: usize, complete: bool) -> Result<()> {
        checkpoint::save_tensors(
            &self.work,
            stem,
            sums.to_tensors(self.tracked()),
            &self.settings,
            done as u64,
            complete,
        )
    }

    /// Starts writing the gradient store from the eigenvalue pass's own taps, when the store
    /// is asked for, the pass runs whole here and its labels are the data's.
    fn start_folded_store(
        &mut self,
        pass: Pass,
        state: &PassState,
        bases: &[LayerFactors],
    ) -> Result<()> {
        let Some(options) = self.job.store else {
            return Ok(());
        };
        let fold = state.position == 0
            && pass == Pass::Eigenvalue
            && curvature::pass_labels(&self.job.options, pass) == Labels::Data;
        if !fold {
            return Ok(());
        }
        let layers = if bases.is_empty() {
            curvature::empty_factors(self.tracked(), 0, 0)
        } else {
            bases.to_vec()
        };
        let factors = Factors {
            strategy: self.job.options.strategy,
            layers,
        };
        // The factors' hash is known once they are written (set before finishing).
        self.folded_store = Some(self.create_store(&factors, String::new(), options)?);
        Ok(())
    }

    /// One pass over this shard's sequences past the saved position, adding to `state`,
    /// saving it as the checkpoint policy asks.
    fn stream_pass(
        &mut self,
        pass: Pass,
        stem: &str,
        bases: &[LayerFactors],
        state: &mut PassState,
    ) -> Result<()> {
        let (job, position, owned) = (self.job, state.position, self.scan.owned);
        if position > 0 {
            eprintln!(
                "resuming the {} pass of shard {} at sequence {position} of {owned}",
                pass.name(),
                job.run.shard,
            );
        }
        // The previous phase's freed buffers (the eigendecompositions', the scan's) go back
        // before this pass allocates its own.
        crate::io::release_freed_memory();
        let basis_refs: Vec<Option<&curvature::Eigenbasis>> = (0..self.tracked().len())
            .map(|i| bases.get(i).and_then(|l| l.eigen.as_ref()))
            .collect();
        self.progress
            .begin(&format!("{} pass", pass.name()), self.scan.owned_tokens);
        let mut checkpointer =
            crate::checkpoint::Checkpointer::new(job.run.checkpoint_policy(), position);
        let (mut global, mut owned_seen) = (0usize, 0usize);
        let mut folded_store = self.folded_store.take();
        let mut tok = std::mem::replace(&mut self.tok, LazyTokenizer::new(&job.model));
        let this = &*self;
        let stats = data::stream_corpus_columns(
            &job.train,
            &job.options.columns,
            &mut tok,
            this.max_len,
            this.model.vocab_size(),
            this.chunk,
            |c| {
                // This shard's sequences past the resume point, with their corpus-wide numbers
                // (which seed sampled labels).
                let (mut seqs, mut indices) = (Vec::new(), Vec::new());
                for s in c {
                    if job.run.shard.owns(global) {
                        if owned_seen >= position {
                            seqs.push(s.clone());
                            indices.push(global as u64);
                        } else {
                            this.progress.advance(s.ids.len() as u64);
                        }
                        owned_seen += 1;
                    }
                    global += 1;
                }
                let before = owned_seen - seqs.len();
                curvature::accumulate_sequences(
                    this.model,
                    &job.options,
                    &seqs,
                    &indices,
                    &basis_refs,
                    &mut state.sums,
                    folded_store.is_some(),
                    this.progress,
                    |sums, k, taps, rotated| {
                        if let Some(w) = folded_store.as_mut() {
                            w.add(&seqs[k - taps.seq_lens.len()..k], taps, rotated)?;
                        }
                        let done = before + k;
                        // A stop asked for is a checkpoint: the rerun resumes here.
                        let stop = this.progress.stop_requested();
                        if done < owned && (checkpointer.due(done) || stop) {
                            this.save(stem, sums, done, false)?;
                        }
                        Ok(())
                    },
                )
            },
        )?;
        self.progress.end();
        self.tok = tok;
        self.folded_store = folded_store;
        if stats.sha256 != self.scan.stats.sha256 {
            return Err(Error::input(format!(
                "{}: the corpus changed while it was being fitted; rerun with --fresh",
                job.train.display()
            )));
        }
        Ok(())
    }

    /// The eigenbases of the covariance sums, saving the sums meanwhile when they are new.
    /// Saves the complete covariance sums (unless they were loaded so), then decomposes them,
    /// consuming them. The save comes first, not beside the decompositions, because each
    /// layer's sums are freed as it is decomposed: holding them all to the end for a
    /// concurrent save would double the fit's peak.
    fn eigendecompose(
        &self,
        stem: &str,
        sums: PassSums,
        unsaved: bool,
    ) -> Result<Vec<LayerFactors>> {
        if unsaved {
            self.save(stem, &sums, self.scan.owned, true)?;
        }
        // The covariance pass's batches are freed: their pages go back before the
        // decompositions allocate theirs.
        crate::io::release_freed_memory();
        curvature::eigendecompose(self.tracked(), sums, self.progress)
    }

    fn write(&self, layers: Vec<LayerFactors>) -> Result<Ended> {
        let strategy = self.job.options.strategy;
        // Covariances returned before the eigenvalue pass come from the saved bases, a tensor
        // at a time.
        let saved = match layers
            .iter()
            .any(|l| l.eigen.is_some() && l.covariance.is_none())
        {
            true => Some(
                checkpoint::load_tensor_file(&self.work, EIGEN_STATE, &self.settings)?
                    .ok_or_else(|| {
                        Error::Other(
                            "the saved eigenbases vanished before the factors were written".into(),
                        )
                    })?
                    .1,
            ),
            false => None,
        };
        write_factors(
            &self.job.out,
            &self.template,
            Factors { strategy, layers },
            saved.as_ref(),
        )
        .map(Ended::Factors)
    }

    fn shard_message(&self, pass: Pass, was_complete: bool) -> String {
        let job = self.job;
        format!(
            "{} pass of shard {} {}; when all {} shards are done, run `infl merge {}`",
            pass.name(),
            job.run.shard,
            if was_complete {
                "was already done"
            } else {
                "done"
            },
            job.run.shard.count,
            job.out.display()
        )
    }

    /// Starts the fit's gradient store in `FACTORS/store/`, after checking that the disk holds
    /// it.
    fn create_store(
        &self,
        factors: &Factors,
        factors_sha256: String,
        options: StoreOptions,
    ) -> Result<StoreWriter> {
        let dir = self.job.out.join(STORE_DIR);
        let scan = &self.scan.stats;
        crate::store::check_disk(&dir, self.scan.store_bytes, scan.n_sequences)?;
        StoreWriter::create(
            &dir,
            factors,
            options,
            &StoreProvenance {
                factors_sha256,
                corpus_sha256: scan.sha256.clone(),
                max_len: self.max_len,
                n_documents: scan.n_documents,
            },
        )
    }

    /// The gradient store of the finished fit: from the eigenvalue pass's taps when they were
    /// folded in, else one more streamed pass under the data's labels.
    fn finish_store(&mut self, options: StoreOptions) -> Result<StoreMeta> {
        let factors_sha256 = open_factors(&self.job.out)?.factors_sha256;
        if let Some(mut writer) = self.folded_store.take() {
            writer.set_factors_sha256(factors_sha256);
            return writer.finish();
        }
        let factors = Factors::from_file(
            &self.job.out.join(FACTORS_FILE),
            self.job.options.strategy,
            self.tracked(),
        )?;
        let mut writer = self.create_store(&factors, factors_sha256, options)?;
        let (job, model, progress) = (self.job, self.model, self.progress);
        progress.begin("gradient store", self.scan.stats.n_tokens as u64);
        let mut seen = 0usize;
        data::stream_corpus_columns(
            &job.train,
            &job.options.columns,
            &mut self.tok,
            self.max_len,
            model.vocab_size(),
            self.chunk,
            |c| {
                crate::pass::run_batches(
                    model,
                    c,
                    seen,
                    job.options.batch_size,
                    Labels::Data,
                    progress,
                    "gradient store",
                    |start, taps| writer.add(&c[start..start + taps.seq_lens.len()], taps, None),
                )?;
                seen += c.len();
                Ok(())
            },
        )?;
        progress.end();
        writer.finish()
    }
}

fn store_message(meta: &StoreMeta, options: StoreOptions, job: &FitJob) -> String {
    format!(
        "; gradient store {:.1} MiB ({:.1} KiB per sequence, {:?}, {:?}) → {}",
        meta.bytes as f64 / (1u64 << 20) as f64,
        meta.bytes as f64 / meta.n_sequences.max(1) as f64 / 1024.0,
        options.dtype,
        options.form,
        job.out.join(STORE_DIR).display()
    )
}

/// Waits for a background save.
/// `bases` without their covariances (A and S), which the eigenvalue pass does not need.
fn without_covariances(bases: Arc<Factors>) -> Factors {
    let mut bases = Arc::try_unwrap(bases).unwrap_or_else(|shared| (*shared).clone());
    for layer in &mut bases.layers {
        layer.covariance = None;
    }
    bases
}

fn join(handle: JoinHandle<Result<()>>, what: &str) -> Result<()> {
    handle
        .join()
        .map_err(|_| Error::Other(format!("{what}: the thread panicked")))?
}
