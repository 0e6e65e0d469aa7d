//! `infl score`: the queries' preconditioned gradients, then one streamed pass over the corpus
//! (or its gradient store) scoring every training sequence against every query.

use super::score_merge::{
    dense_row_paths, gather_scores, parse_score_state, write_scores, ScoreStateRef, ScoreTemplate,
    SCORE_TEMPLATE_FILE,
};
use super::{check_same_job, prepare, Prepared, CHUNK_BATCHES, WORK_DIR};
use crate::checkpoint;
use crate::checkpoint::CheckpointPolicy;
use crate::data::{self, LazyTokenizer};
use crate::error::{Error, Result};
use crate::influence::{self, Damping};
use crate::io;
use crate::model::{self, TapModel};
use crate::options::Normalize;
use crate::pass::{self, Progress};
use crate::provenance::CorpusInfo;
use crate::results::{
    self,
    meta::{QueriesInfo, ScoresMeta, SCORE_CONVENTION},
};
use crate::shard::Shard;
use std::path::PathBuf;

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
                pass::run_indexed(
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
    pass::for_each_batch(
        model,
        &seqs,
        batch_size,
        crate::model::Labels::Data,
        &pass::Silent,
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
