//! `infl score`: the queries' preconditioned gradients, then one streamed pass over the corpus
//! (or over its gradient store, [`super::score_store`]) scoring every training sequence against
//! every query, reduced on the fly to each query's top and bottom k; then, when asked, the
//! per-token split of those.

use super::score_merge::{
    dense_row_paths, gather_scores, parse_score_state, write_scores, ScoreStateRef, ScoreTemplate,
};
use super::score_store::{open_store, score_from_store};
use super::{open_work_dir, prepare_layers, Prepared, CHUNK_BATCHES};
use crate::checkpoint;
use crate::curvature::gauss_newton::GaussNewton;
use crate::data::{self, CorpusStats, LazyTokenizer, Query, Sequence};
use crate::error::{Error, Result};
use crate::influence::refine::{self, Refiner};
use crate::influence::{self, PreconditionedQueries, Preconditioner};
use crate::model::{self, Labels, TapBatch, TapModel, TrackedLayer};
use crate::options::{Compute, Normalize, Partitioning, QueryRank, RunOptions, ScoreOptions};
use crate::output_dir::{Kind, OutputDir};
use crate::pass::Progress;
use crate::provenance::CorpusInfo;
use crate::results::meta::{Provenance, QueriesInfo, ScoresMeta, SCORE_CONVENTION};
use crate::results::parts::{self, PartsInfo, PartsWriter};
use crate::results::{self, Prefilter, ScoreAccumulator};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One `infl score`: its files, what it computes, how it runs and where.
#[derive(Debug, Clone)]
pub struct ScoreJob {
    pub model: PathBuf,
    pub factors: PathBuf,
    pub train: PathBuf,
    pub queries: PathBuf,
    pub out: PathBuf,
    /// The BM25 index (`infl index`) that `options.prefilter` takes candidates from.
    pub index: Option<PathBuf>,
    pub options: ScoreOptions,
    pub run: RunOptions,
    pub compute: Compute,
    /// Score a partition of the tracked layers at a time ([`super::score_partitions`]).
    pub partitioning: Partitioning,
}

impl ScoreJob {
    /// Exact (full-rank) scores with the heuristic damping and the top 10 kept, unsharded,
    /// fresh, never checkpointed, on the CPU ([`ScoreOptions::default`]): what library callers
    /// start from and adjust with `ScoreJob { .., ..ScoreJob::new(..) }`.
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
            index: None,
            options: ScoreOptions::default(),
            run: RunOptions::ONCE,
            compute: Compute::default(),
            partitioning: Partitioning::default(),
        }
    }

    /// The options as they run, once checked to go together: with a store the queries are
    /// exact.
    pub(super) fn checked_options(&self) -> Result<ScoreOptions> {
        let o = &self.options;
        o.check()?;
        self.run.check()?;
        if o.store && (!self.run.shard.is_whole() || o.per_token) {
            return Err(Error::input(
                "--store reads the whole stored corpus in one process: it does not go with --shard or --per-token",
            ));
        }
        if o.prefilter.is_some() && o.dense {
            return Err(Error::input(
                "--dense and --prefilter do not go together: a pre-filtered run scores only each query's candidates",
            ));
        }
        if o.prefilter.is_some() != self.index.is_some() {
            return Err(Error::input(
                "--prefilter N and --index DIR go together: the index gives the candidates",
            ));
        }
        if o.target_recall.is_some()
            && (!self.run.shard.is_whole() || o.store || !self.partitioning.is_none())
        {
            return Err(Error::input(
                "--target-recall widens the candidates after the merged estimate, in one process over the corpus: it does not go with --shard, --store or layer partitions",
            ));
        }
        if o.per_token && !self.run.shard.is_whole() {
            return Err(Error::input(
                "--per-token does not go with --shard: the per-token pass needs the merged top-k; run it unsharded (it reads only the top and bottom sequences)",
            ));
        }
        let mut options = o.clone();
        if options.store {
            options.query_rank = QueryRank::FULL;
        }
        Ok(options)
    }
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

pub fn score(job: &ScoreJob, progress: &dyn Progress) -> Result<ScoreSummary> {
    if !job.partitioning.is_none() {
        return super::score_partitions::score_partitioned(job, progress);
    }
    score_layers(job, progress, None)
}

/// `infl score` over `partition`'s layers of the factors (all of them: None). A partition's
/// pass also leaves every sequence's per-layer parts in `parts.SHARD.bin` for the join
/// ([`results::parts`]).
pub(super) fn score_layers(
    job: &ScoreJob,
    progress: &dyn Progress,
    partition: Option<&[String]>,
) -> Result<ScoreSummary> {
    let started = std::time::Instant::now();
    let options = job.checked_options()?;
    // Earlier work's freed buffers go back before the model loads (see `fit_one`).
    crate::io::release_freed_memory();
    let out = OutputDir::open(
        &job.out,
        Kind::Scores,
        job.run.shard,
        job.run.output.overwrite,
    )?;
    let mut prepared = prepare_layers(
        &job.model,
        &job.factors,
        (options.damping, options.max_len),
        job.compute.clone(),
        partition,
    )?;
    let model = prepared.model.as_ref();
    let mut tok = LazyTokenizer::new(&job.model);
    let (queries, queries_sha) = data::read_queries(
        &job.queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?;
    // Every corpus line is checked before the first forward pass (and before work/ exists);
    // the check's hash is the one the settings record.
    let corpus = data::check_corpus(
        &job.train,
        &job.options.columns,
        &mut tok,
        model.vocab_size(),
    )?;
    let memory = MemoryCheck {
        enabled: job.run.memory_check,
        model,
        batch_size: options.batch_size,
        n_queries: queries.len(),
        query_rank: options.query_rank.0,
    };
    let mut checked_len = queries
        .iter()
        .map(|q| q.prompt_ids.len() + q.completion_ids.len())
        .max()
        .unwrap_or(1);
    memory.check(checked_len)?;
    // With a gradient store the corpus is read back, not recomputed: the queries stay exact
    // (full rank), rotated into the store's basis.
    let mut store = match options.store {
        true => Some(open_store(job, &prepared.fmeta, prepared.max_len)?),
        false => None,
    };
    if prepared.preconditioner.is_refined() {
        let refiner = refiner(job, &options, &prepared, &mut tok)?;
        prepared.preconditioner.refine_with(refiner);
    }
    let model = prepared.model.as_ref();
    let pq = influence::precondition_queries(
        model,
        &queries,
        &prepared.preconditioner,
        options.batch_size,
        options.query_rank.0,
        store.is_some(),
        progress,
    )?;
    let (fits, seeds) =
        super::score_seeds::other_fits(job, &options, &prepared, &queries, progress)?;
    // The pass needs the damped inverse again only for the training sequences' own
    // influence (cosine normalisation); otherwise its memory goes back before the pass.
    if options.normalize != Normalize::Cosine {
        prepared.preconditioner.release();
    }
    // The queries' gradients and rotations are freed: their pages go back before the pass.
    crate::io::release_freed_memory();
    let candidates = prefilter_candidates(job, &options, &queries, prepared.max_len)?;
    let (work, settings) = start_work(
        &out,
        job,
        &options,
        &prepared,
        (&corpus.sha256, &queries_sha),
    )?;
    let tracked = model.tracked().to_vec();
    let run = ScoreRun {
        job,
        options: &options,
        tracked: &tracked,
        preconditioner: &prepared.preconditioner,
        pq: &pq,
        fits: &fits,
        candidates: candidates.as_ref().map(|(c, s)| Prefilter {
            candidates: c,
            sampled: s,
        }),
        work: &work,
        stem: format!("score.{}", job.run.shard.tag()),
        settings: &settings,
        progress,
        parts_dir: partition.map(|_| job.out.as_path()),
    };
    let mut saved = run.resume(queries.len())?;
    if saved.position > 0 && !saved.complete {
        eprintln!(
            "resuming the scoring pass of shard {} at corpus sequence {}",
            job.run.shard, saved.position
        );
    }
    progress.begin("scoring pass", 0);
    let pass_started = std::time::Instant::now();
    let stats = match store.as_mut() {
        Some(reader) => {
            if !saved.complete {
                score_from_store(&run, reader, &mut saved)?;
            }
            super::score_store::stored_corpus(&reader.meta)
        }
        None => {
            // The candidates and the recall samples: every sequence some query scores.
            let union = candidates
                .as_ref()
                .map(|(c, s)| c.iter().chain(s).flatten().copied().collect());
            streamed_pass(
                &run,
                model,
                &memory,
                (prepared.max_len, union),
                &mut tok,
                &mut saved,
                &mut checked_len,
            )?
        }
    };
    progress.end();
    let pass_seconds = pass_started.elapsed().as_secs_f64();
    if options.top_k > stats.n_sequences {
        eprintln!(
            "warning: --top-k {} exceeds the {} training sequences; every sequence is listed",
            options.top_k, stats.n_sequences
        );
    }
    if !saved.complete {
        let meta = scores_meta(
            job,
            &options,
            (&queries, &queries_sha),
            &pq,
            &prepared,
            &stats,
        );
        saved.acc.flush()?;
        // A partition's parts are complete, and say so, before its state does.
        if let Some(w) = saved.parts.as_mut() {
            w.flush()?;
            let info = PartsInfo {
                records: w.records(),
                n_queries: queries.len(),
                layers: tracked.iter().map(|l| l.name.clone()).collect(),
                vocab_size: model.vocab_size(),
                meta: meta.clone(),
            };
            crate::io::write_json(&parts::info_path(&job.out, &job.run.shard.tag()), &info)?;
        }
        run.save(&saved, stats.n_sequences, Some(&meta))?;
    }
    let was_complete = saved.complete;
    drop(saved);
    if !job.run.shard.is_whole() {
        return run.shard_summary(started, pass_seconds, was_complete);
    }
    let mut merged = gather_scores(&job.out)?;
    let widened = match options.target_recall {
        Some(_) => {
            let w = super::score_widen::Widen {
                run: &run,
                model,
                memory: &memory,
                max_len: prepared.max_len,
                queries: &queries,
            };
            Some(super::score_widen::widen(
                &w,
                &mut merged,
                &mut tok,
                &mut checked_len,
            )?)
        }
        None => None,
    };
    merged.widening = widened.clone();
    if !fits.is_empty() {
        merged.seeds = seeds;
    }
    let token_parts = match options.per_token {
        true => Some(token_pass(
            model,
            &merged.summaries,
            &pq,
            options.batch_size,
            &mut tok,
            |taps| run.scale(taps),
        )?),
        false => None,
    };
    let top = write_scores(&job.out, &merged, token_parts.as_ref())?;
    let mut message = String::new();
    if let Some(w) = &widened {
        let ests = results::estimates(
            &merged.summaries,
            &merged.meta.queries.ids,
            (options.top_k, stats.n_sequences),
            options.prefilter.unwrap_or(0),
            Some(w),
        );
        let (lines, warning) = super::score_widen::widening_text(&ests, w);
        message.push_str(&lines);
        if let Some(warning) = warning {
            eprintln!("{warning}");
        }
    }
    message.push_str(&format!(
        "scored {} queries × {} training sequences → {}",
        queries.len(),
        stats.n_sequences,
        job.out.display()
    ));
    Ok(ScoreSummary {
        summaries: merged.summaries,
        top,
        meta: merged.meta,
        seconds: started.elapsed().as_secs_f64(),
        pass_seconds,
        message,
    })
}

/// The work directory of this run with its settings fingerprint: the options serialised with
/// the hashes of the model, factors, corpus and queries.
fn start_work(
    out: &OutputDir,
    job: &ScoreJob,
    options: &ScoreOptions,
    prepared: &Prepared,
    (corpus_sha, queries_sha): (&str, &str),
) -> Result<(PathBuf, serde_json::Value)> {
    let settings = serde_json::json!({
        "stage": "score",
        "model_config_sha256": prepared.model_info.config_sha256,
        "model_weights_sha256": prepared.model_info.weights_sha256,
        "factors_sha256": prepared.fmeta.factors_sha256,
        "corpus_sha256": corpus_sha,
        "queries_sha256": queries_sha,
        "max_len": prepared.max_len,
        "options": options,
        "shards": job.run.shard.count,
    });
    let template = ScoreTemplate {
        settings: settings.clone(),
        shards: job.run.shard.count,
        top_k: options.top_k,
    };
    let work = open_work_dir(
        out,
        job.run.fresh,
        super::score_merge::SCORE_TEMPLATE_FILE,
        &settings,
        &template,
        |t: ScoreTemplate| t.settings,
    )?;
    Ok((work, settings))
}

/// The scoring pass over the corpus itself, on the model's device.
pub(super) fn streamed_pass(
    run: &ScoreRun<'_>,
    model: &dyn TapModel,
    memory: &MemoryCheck<'_>,
    (max_len, union): (usize, Option<HashSet<usize>>),
    tok: &mut LazyTokenizer,
    saved: &mut Saved,
    checked_len: &mut usize,
) -> Result<CorpusStats> {
    let on_device = match model::statistics_device(model)? {
        // A model on a GPU has the training sequences' scores formed there too.
        Some(d) => Some(influence::device::DeviceScorer::new(
            d,
            &run.pq.per_layer,
            run.pq.len(),
        )?),
        None => None,
    };
    let streamed = StreamedPass {
        run,
        model,
        on_device: on_device.as_ref(),
        memory,
        max_len,
        union,
    };
    streamed.run(tok, saved, checked_len)
}

/// The results' `meta.json` of a finished pass.
fn scores_meta(
    job: &ScoreJob,
    options: &ScoreOptions,
    (queries, queries_sha): (&[Query], &str),
    pq: &PreconditionedQueries,
    prepared: &Prepared,
    stats: &CorpusStats,
) -> ScoresMeta {
    let queries_info = QueriesInfo {
        path: job.queries.display().to_string(),
        sha256: queries_sha.to_string(),
        ids: queries.iter().map(|q| q.id.clone()).collect(),
        prompts: queries.iter().map(|q| q.prompt.clone()).collect(),
        completions: queries.iter().map(|q| q.completion.clone()).collect(),
        losses: pq.losses.clone(),
        self_influence: pq.self_influence.clone(),
    };
    ScoresMeta::new(
        "scores",
        SCORE_CONVENTION,
        options.clone(),
        queries_info,
        Provenance {
            fmeta: &prepared.fmeta,
            factors_dir: &job.factors,
            model: prepared.model_info.clone(),
            corpus: CorpusInfo::streamed(&job.train, stats, prepared.max_len),
            tracked: prepared.model.tracked(),
            preconditioner: &prepared.preconditioner,
        },
    )
    .with_refine(pq.refined.clone())
}

/// The refinement of `ekfac-refined` factors' inverse: the autograd model on the scored layers
/// and a seeded sample of the corpus (drawn by the factors' sequence count).
fn refiner(
    job: &ScoreJob,
    options: &ScoreOptions,
    prepared: &Prepared,
    tok: &mut LazyTokenizer,
) -> Result<Refiner> {
    if options.normalize == Normalize::Cosine {
        return Err(Error::input(
            "--normalize cosine needs every training sequence's own influence, which the \
             refined inverse does not compute; score ekfac-refined factors without it",
        ));
    }
    let device = job.compute.device.candle()?;
    let modules = prepared.fmeta.options.modules;
    let mut model = model::load_autograd(&job.model, modules, &device)?;
    if let Some(dir) = &job.compute.adapter {
        model.attach(&model::lora::Adapter::open(dir)?, modules)?;
    }
    let tracked = prepared.model.tracked();
    let gn = GaussNewton::new(model, tracked)?;
    let sample = refine::sample_corpus(
        &job.train,
        &options.columns,
        tok,
        (prepared.max_len, prepared.model.vocab_size()),
        prepared.fmeta.corpus.n_sequences,
        &options.refine,
    )?;
    Refiner::new(gn, sample, options.refine, options.batch_size)
}

/// The memory estimate of a scoring run, re-checked as longer sequences arrive. Scoring
/// streams the corpus, so no term of the estimate grows with it (n_train = 0); the activation
/// term depends on the longest sequence.
pub(super) struct MemoryCheck<'a> {
    pub(super) enabled: bool,
    pub(super) model: &'a dyn TapModel,
    pub(super) batch_size: usize,
    pub(super) n_queries: usize,
    /// `--query-rank`: how the queries' gradients are stored.
    pub(super) query_rank: Option<usize>,
}

impl MemoryCheck<'_> {
    pub(super) fn check(&self, longest: usize) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let e = crate::inspect::estimate(self.model, self.batch_size, longest)
            .at_query_rank(self.model.tracked(), self.query_rank);
        crate::inspect::check_memory(
            "infl score",
            e.score_total(self.n_queries as u64, 0),
            "score fewer queries per run, or use a smaller --batch-size",
        )
    }
}

/// Pre-filter: each query keeps its N best lexical matches from the index, plus a seeded sample
/// of the other sequences scored only to estimate the filter's recall; the pass computes
/// gradients only for their union.
#[allow(clippy::type_complexity)]
fn prefilter_candidates(
    job: &ScoreJob,
    options: &ScoreOptions,
    queries: &[Query],
    max_len: usize,
) -> Result<Option<(Vec<HashSet<usize>>, Vec<HashSet<usize>>)>> {
    let (Some(n), Some(dir)) = (options.prefilter, &job.index) else {
        return Ok(None);
    };
    let index = crate::index::Bm25Index::open(dir)?;
    index.check(dir, &job.train, max_len)?;
    if n >= index.n_sequences() {
        eprintln!(
            "warning: --prefilter {n} is not smaller than the corpus ({} sequences): every sequence is scored",
            index.n_sequences()
        );
    }
    let candidates: Vec<HashSet<usize>> = queries
        .iter()
        .map(|q| index.candidates(q, n).into_iter().collect())
        .collect();
    let sampled = candidates
        .iter()
        .enumerate()
        .map(|(qi, c)| {
            results::sample_rest(index.n_sequences(), c, options.prefilter_sample, 0, qi)
        })
        .collect();
    Ok(Some((candidates, sampled)))
}

/// A scoring pass's running state: the reduction, the dense columns written, and where it
/// stands in the corpus.
pub(super) struct Saved {
    pub(super) acc: ScoreAccumulator,
    pub(super) dense_columns: u64,
    /// A layer partition's pass: every sequence's per-layer parts, for the join.
    pub(super) parts: Option<PartsWriter>,
    /// Corpus sequences already scored (resumed from a checkpoint).
    pub(super) position: usize,
    pub(super) complete: bool,
}

/// What the scoring pass of one run shares, whichever source its training gradients come from.
pub(super) struct ScoreRun<'a> {
    pub(super) job: &'a ScoreJob,
    pub(super) options: &'a ScoreOptions,
    pub(super) tracked: &'a [TrackedLayer],
    pub(super) preconditioner: &'a Preconditioner,
    pub(super) pq: &'a PreconditionedQueries,
    /// The queries preconditioned by the other fits of `fit --seeds` (none: one fit), scored
    /// beside `pq` for each query's stability.
    pub(super) fits: &'a [PreconditionedQueries],
    /// Each query's pre-filter candidates and recall sample (None: every sequence).
    pub(super) candidates: Option<Prefilter<'a>>,
    pub(super) work: &'a Path,
    pub(super) stem: String,
    pub(super) settings: &'a serde_json::Value,
    pub(super) progress: &'a dyn Progress,
    /// Where a layer partition's pass writes its parts (None: not a partition).
    pub(super) parts_dir: Option<&'a Path>,
}

impl ScoreRun<'_> {
    pub(super) fn cosine(&self) -> bool {
        self.options.normalize == Normalize::Cosine
    }

    /// The cosine normalisers of a batch's sequences, when scores are normalised.
    pub(super) fn scale(&self, taps: &TapBatch) -> Option<Vec<Vec<f64>>> {
        self.train_self(taps)
            .map(|own| cosine_factors(&self.pq.self_influence, &own))
    }

    /// The self-influence of a batch's sequences, when scores are cosine-normalised.
    pub(super) fn train_self(&self, taps: &TapBatch) -> Option<Vec<f64>> {
        self.cosine()
            .then(|| influence::batch_self_influence(self.tracked, self.preconditioner, taps))
    }

    /// The saved state of this shard's pass, or a fresh one.
    pub(super) fn resume(&self, n_queries: usize) -> Result<Saved> {
        let (state, position, complete) =
            match checkpoint::load(self.work, &self.stem, self.settings)? {
                Some((m, bytes)) => (
                    Some(parse_score_state(&bytes, &m.file)?),
                    m.position as usize,
                    m.complete,
                ),
                None => (None, 0, false),
            };
        let dense_columns = state.as_ref().map_or(0, |s| s.dense_columns);
        let parts = match self.parts_dir {
            Some(dir) if !complete => Some(PartsWriter::resume(
                parts::parts_path(dir, &self.job.run.shard.tag()),
                state.as_ref().map_or(0, |s| s.parts_records),
                n_queries,
                self.tracked.len(),
            )?),
            _ => None,
        };
        let dense = match self.options.dense && !complete {
            true => Some(results::DenseWriter::resume(
                dense_row_paths(self.work, self.job.run.shard, n_queries),
                dense_columns,
            )?),
            false => None,
        };
        let k = self.options.top_k;
        let acc = match state {
            Some(s) => ScoreAccumulator::resume(s.summaries, k, dense),
            None => ScoreAccumulator::new(n_queries, self.tracked.len(), k, dense),
        };
        let acc = match self.fits.is_empty() || saved_tracks(&acc) {
            true => acc,
            false => acc.with_stability(self.fits.len() + 1),
        };
        Ok(Saved {
            acc,
            dense_columns,
            parts,
            position,
            complete,
        })
    }

    /// Saves the pass's state at corpus sequence `done`; with `meta`, as complete.
    pub(super) fn save(&self, saved: &Saved, done: usize, meta: Option<&ScoresMeta>) -> Result<()> {
        let state = ScoreStateRef {
            summaries: &saved.acc.summaries,
            dense_columns: saved.dense_columns,
            parts_records: saved.parts.as_ref().map_or(0, |p| p.records()),
            meta,
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| Error::Other(e.to_string()))?;
        checkpoint::save(
            self.work,
            &self.stem,
            "json",
            &bytes,
            self.settings,
            done as u64,
            meta.is_some(),
        )
    }

    /// Adds a batch's per-layer scores (queries × sequences) to the reduction; a partition's
    /// pass also records them with the sequences' self-influence `own` (cosine only).
    pub(super) fn add(
        &self,
        saved: &mut Saved,
        indices: &[usize],
        seqs: &[Sequence],
        parts: &[faer::Mat<f32>],
        own: Option<&[f64]>,
    ) -> Result<()> {
        let scale = own.map(|own| cosine_factors(&self.pq.self_influence, own));
        saved
            .acc
            .add(indices, seqs, parts, scale.as_deref(), self.candidates)?;
        if let Some(w) = saved.parts.as_mut() {
            w.append(indices, parts, own, |q, n| match self.candidates {
                None => parts::CANDIDATE,
                Some(p) if p.candidates[q].contains(&indices[n]) => parts::CANDIDATE,
                Some(p) if p.sampled[q].contains(&indices[n]) => parts::SAMPLED,
                Some(_) => parts::NOT_SCORED,
            })?;
        }
        if self.options.dense {
            saved.dense_columns += seqs.len() as u64;
        }
        Ok(())
    }

    /// Adds a batch's scores under the other fits (`parts` is the seed fit's) to each query's
    /// stability track; nothing without other fits.
    pub(super) fn track(
        &self,
        saved: &mut Saved,
        indices: &[usize],
        taps: &TapBatch,
        parts: &[faer::Mat<f32>],
    ) {
        if self.fits.is_empty() {
            return;
        }
        let others: Vec<Vec<faer::Mat<f32>>> = self
            .fits
            .iter()
            .map(|pq| influence::batch_scores(self.tracked, &pq.per_layer, taps))
            .collect();
        let all: Vec<&[faer::Mat<f32>]> = std::iter::once(parts)
            .chain(others.iter().map(Vec::as_slice))
            .collect();
        results::stability::track_batch(&mut saved.acc.summaries, indices, &all, self.candidates);
    }

    /// The summary of a shard's finished pass, read back from its saved state.
    fn shard_summary(
        &self,
        started: std::time::Instant,
        pass_seconds: f64,
        was_complete: bool,
    ) -> Result<ScoreSummary> {
        let job = self.job;
        let (m, bytes) = checkpoint::load(self.work, &self.stem, self.settings)?
            .ok_or_else(|| Error::Other(format!("{}: saved state vanished", self.stem)))?;
        let state = parse_score_state(&bytes, &m.file)?;
        let meta = state
            .meta
            .ok_or_else(|| Error::Other(format!("{}: complete state without meta", self.stem)))?;
        Ok(ScoreSummary {
            summaries: state.summaries,
            top: Vec::new(),
            meta,
            seconds: started.elapsed().as_secs_f64(),
            pass_seconds,
            message: format!(
                "scoring pass of shard {} {}; when all {} shards are done, run `infl merge {}`",
                job.run.shard,
                if was_complete {
                    "was already done"
                } else {
                    "done"
                },
                job.run.shard.count,
                job.out.display()
            ),
        })
    }
}

/// The scoring pass over the corpus itself: the model's gradients of this shard's (and the
/// pre-filter's) sequences, batch by batch, checkpointed as the policy asks.
struct StreamedPass<'a> {
    run: &'a ScoreRun<'a>,
    model: &'a dyn TapModel,
    on_device: Option<&'a influence::device::DeviceScorer>,
    memory: &'a MemoryCheck<'a>,
    max_len: usize,
    /// Every query's candidates together: the sequences the pass computes.
    union: Option<HashSet<usize>>,
}

impl StreamedPass<'_> {
    fn run(
        &self,
        tok: &mut LazyTokenizer,
        saved: &mut Saved,
        checked_len: &mut usize,
    ) -> Result<CorpusStats> {
        let (run, job) = (self.run, self.run.job);
        let (position, complete) = (saved.position, saved.complete);
        let policy = job.run.checkpoint_policy();
        let mut seen = 0usize;
        let mut scored = 0usize;
        let mut last_save = (0usize, std::time::Instant::now());
        let batch_size = run.options.batch_size;
        data::stream_corpus_columns(
            &job.train,
            &job.options.columns,
            tok,
            self.max_len,
            self.model.vocab_size(),
            batch_size.max(1) * CHUNK_BATCHES,
            |chunk| {
                let first = seen;
                seen += chunk.len();
                if complete || seen <= position {
                    return Ok(());
                }
                let longest = chunk.iter().map(|s| s.ids.len()).max().unwrap_or(0);
                if longest > *checked_len {
                    self.memory.check(longest)?;
                    *checked_len = longest;
                }
                let indices: Vec<usize> = (first.max(position)..seen)
                    .filter(|&i| job.run.shard.owns(i))
                    .filter(|i| self.union.as_ref().is_none_or(|u| u.contains(i)))
                    .collect();
                let kept: Vec<Sequence> =
                    indices.iter().map(|&i| chunk[i - first].clone()).collect();
                let stable: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
                crate::pass::run_indexed(
                    self.model,
                    &kept,
                    &stable,
                    batch_size,
                    Labels::Data,
                    run.progress,
                    "scoring pass",
                    |start, taps| {
                        let parts = match self.on_device {
                            Some(scorer) => scorer.batch_scores(run.tracked, taps)?,
                            None => influence::batch_scores(run.tracked, &run.pq.per_layer, taps),
                        };
                        let n = taps.seq_lens.len();
                        let range = start..start + n;
                        run.add(
                            saved,
                            &indices[range.clone()],
                            &kept[range.clone()],
                            &parts,
                            run.train_self(taps).as_deref(),
                        )?;
                        run.track(saved, &indices[range], taps, &parts);
                        scored += n;
                        let due = policy
                            .every_sequences
                            .is_some_and(|m| scored - last_save.0 >= m)
                            || last_save.1.elapsed().as_secs_f64() >= policy.every_seconds
                            // A stop asked for is a checkpoint: the rerun resumes here.
                            || run.progress.stop_requested();
                        if due {
                            saved.acc.flush()?;
                            if let Some(w) = saved.parts.as_mut() {
                                w.flush()?;
                            }
                            run.save(saved, indices[start + n - 1] + 1, None)?;
                            last_save = (scored, std::time::Instant::now());
                        }
                        Ok(())
                    },
                )
            },
        )
    }
}

/// Whether a resumed reduction already carries its stability tracks.
fn saved_tracks(acc: &ScoreAccumulator) -> bool {
    acc.summaries.iter().all(|s| s.stability.is_some())
}

/// The cosine normalisers `1 / sqrt(self(q) · self(z))` of each query (rows) and training
/// sequence (columns). A zero gradient (a one-token sequence predicts nothing) has no
/// direction: its cosine is 0, not 0/0.
pub(super) fn cosine_factors(query_self: &[f64], train_self: &[f64]) -> Vec<Vec<f64>> {
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

/// Second, small pass over the top/bottom sequences of every query: each score split over the
/// sequence's tokens, `Σ_ℓ g_tᵀ P_{q,ℓ} ā_t` for token t (the position whose output predicts
/// token t+1). Keyed by (query, corpus index).
pub(super) fn token_pass(
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
    crate::pass::for_each_batch(
        model,
        &seqs,
        batch_size,
        crate::model::Labels::Data,
        &crate::pass::Silent,
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
