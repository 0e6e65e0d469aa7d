//! Queries answered in memory, for `infl serve`: a model, its factors and (when `fit --store`
//! wrote one) its gradient store, loaded once, score each batch of queries with the passes
//! `infl score` runs ([`super::score`]'s streamed pass, [`super::score_store`]'s store pass,
//! the same reduction and per-token pass), without a results directory. Also what the server
//! shows around a query: the model's continuation of a prompt, and a training sequence's text
//! and self-influence.

use super::score::{streamed_pass, token_pass, MemoryCheck, Saved, ScoreJob, ScoreRun};
use super::score_store::{open_store, score_from_store, stored_corpus};
use super::{prepare, Prepared};
use crate::curvature::Strategy;
use crate::data::{self, CorpusStats, LazyTokenizer, Query, Sequence};
use crate::error::{Error, Result};
use crate::influence::Damping;
use crate::influence::{self, PreconditionedQueries};
use crate::model::{Labels, TapModel};
use crate::options::{Compute, Normalize, QueryRank, ScoreOptions};
use crate::pass::{Progress, Silent};
use crate::provenance::ModelInfo;
use crate::results::{self, Direction, ScoreAccumulator, TopEntry};
use crate::store::{StoreReader, STORE_DIR};
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What a query engine loads: the same paths and options as `infl score`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: PathBuf,
    pub factors: PathBuf,
    pub train: PathBuf,
    /// Damping, batch size, window length and the corpus's columns; `store` reads the
    /// factors' gradient store (an error when it has none).
    pub options: ScoreOptions,
    pub compute: Compute,
    /// A BM25 index of the corpus (`infl index`), for queries that ask to score only their
    /// lexical candidates ([`QueryOptions::prefilter`]).
    pub index: Option<PathBuf>,
}

/// The options a request may choose; everything else is the engine's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueryOptions {
    pub top_k: usize,
    pub normalize: Normalize,
    /// Ignored with a store (store queries are exact).
    pub query_rank: QueryRank,
    /// Also split each top/bottom score over the training sequence's tokens.
    pub per_token: bool,
    /// Score only the query's N best BM25 matches (as `infl score --prefilter N`); needs the
    /// engine's index.
    pub prefilter: Option<usize>,
}

/// What produced an answer: the checkpoint, factors and corpus, by hash.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnswerProvenance {
    pub model: ModelInfo,
    pub factors: PathBuf,
    pub factors_sha256: String,
    pub strategy: Strategy,
    pub damping: Damping,
    pub corpus: PathBuf,
    pub corpus_sha256: String,
    /// `store` (read back from the gradient store) or `streamed` (a pass over the corpus).
    pub source: &'static str,
    pub layers: Vec<String>,
}

/// One query's answer: what `infl score` writes for it (its rows of `top_k.jsonl`, its
/// distribution and per-layer totals, its −log p).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Answer {
    pub id: String,
    /// −log p(completion | prompt).
    pub loss: f64,
    pub self_influence: f64,
    pub top: Vec<TopEntry>,
    pub bottom: Vec<TopEntry>,
    /// Training sequences scored.
    pub n_sequences: u64,
    /// The BM25 pre-filter the scores were limited to: each query's N best lexical matches.
    pub prefilter: Option<usize>,
    pub distribution: results::Distribution,
    /// Σ over the corpus of each layer's part of the score, and of its magnitude.
    pub total_per_layer: Vec<f64>,
    pub abs_per_layer: Vec<f64>,
}

/// A training sequence, found by id.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SequenceInfo {
    pub id: String,
    pub index: usize,
    pub text: Option<String>,
    pub ids: Vec<u32>,
    /// The sequence's influence on its own loss, ⟨g, P g⟩ summed over layers.
    pub self_influence: f64,
}

/// How to continue a prompt: greedy (`temperature` 0) or sampled with a seed.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f64,
    pub seed: u64,
}

/// Each query's pre-filter candidates, and the recall sample of the rest (kept empty here).
type Candidates = (Vec<HashSet<usize>>, Vec<HashSet<usize>>);

/// A model, its factors and optionally its gradient store, loaded once and asked many times.
/// Not shared between threads: one owner answers every request in turn.
pub struct QueryEngine {
    job: ScoreJob,
    prepared: Prepared,
    tok: LazyTokenizer,
    /// The gradient store, checked once against the factors and corpus, opened once and
    /// rewound for each pass: its chunks are verified on the first pass that reads them.
    store: Option<StoreReader>,
    /// The BM25 index for pre-filtered queries, checked against the corpus once.
    index: Option<crate::index::Bm25Index>,
    corpus: CorpusStats,
}

impl QueryEngine {
    /// Loads the model and factors and checks the corpus (and the store, with `store`) as
    /// `infl score` does before its pass.
    pub fn open(config: EngineConfig) -> Result<Self> {
        let mut options = config.options.clone();
        options.check()?;
        if options.store {
            options.query_rank = QueryRank::FULL;
        }
        let job = ScoreJob {
            options,
            compute: config.compute,
            ..ScoreJob::new(
                config.model,
                config.factors,
                config.train,
                PathBuf::new(),
                PathBuf::new(),
            )
        };
        let prepared = prepare(
            &job.model,
            &job.factors,
            (job.options.damping, job.options.max_len),
            job.compute.clone(),
        )?;
        let mut tok = LazyTokenizer::new(&job.model);
        let checked = data::check_corpus(
            &job.train,
            &job.options.columns,
            &mut tok,
            prepared.model.vocab_size(),
        )?;
        let index = match &config.index {
            Some(dir) => {
                let index = crate::index::Bm25Index::open(dir)?;
                index.check(dir, &job.train, prepared.max_len)?;
                Some(index)
            }
            None => None,
        };
        let store = match job.options.store {
            true => Some(open_store(&job, &prepared.fmeta, prepared.max_len)?.keep_sequences()),
            false => None,
        };
        let corpus = match &store {
            Some(reader) => stored_corpus(&reader.meta),
            // Counted by the first pass; the hash is known now.
            None => CorpusStats {
                n_documents: checked.n_documents,
                n_sequences: 0,
                n_tokens: 0,
                sha256: checked.sha256,
            },
        };
        Ok(QueryEngine {
            store,
            index,
            job,
            prepared,
            tok,
            corpus,
        })
    }

    /// Whether `dir` holds a gradient store (`fit --store`).
    pub fn factors_have_store(factors: &Path) -> bool {
        factors.join(STORE_DIR).is_dir()
    }

    pub fn model(&self) -> &dyn TapModel {
        self.prepared.model.as_ref()
    }

    /// Training sequences in the corpus (0 before the first streamed pass counted them).
    pub fn n_sequences(&self) -> usize {
        self.corpus.n_sequences
    }

    pub fn provenance(&self) -> AnswerProvenance {
        let p = &self.prepared;
        AnswerProvenance {
            model: p.model_info.clone(),
            factors: self.job.factors.clone(),
            factors_sha256: p.fmeta.factors_sha256.clone(),
            strategy: p.fmeta.options.strategy,
            damping: self.job.options.damping,
            corpus: self.job.train.clone(),
            corpus_sha256: self.corpus.sha256.clone(),
            source: if self.store.is_some() {
                "store"
            } else {
                "streamed"
            },
            layers: p.model.tracked().iter().map(|l| l.name.clone()).collect(),
        }
    }

    /// A query from a request's JSON fields (as a line of a query file), checked against the
    /// model's vocabulary and context; `at` names it in errors.
    pub fn parse_query(
        &mut self,
        id: String,
        obj: &serde_json::Map<String, serde_json::Value>,
        at: &str,
    ) -> Result<Query> {
        let model = self.prepared.model.as_ref();
        let (positions, vocab) = (model.max_positions(), model.vocab_size());
        data::query_fields(id, obj, at, &mut self.tok, positions, vocab)
    }

    /// Scores `queries` against every training sequence in one pass (over the store, or
    /// streamed over the corpus), with `options` shared by all of them.
    pub fn answer(
        &mut self,
        queries: &[Query],
        options: QueryOptions,
        progress: &dyn Progress,
    ) -> Result<Vec<Answer>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let score_options = ScoreOptions {
            top_k: options.top_k,
            normalize: options.normalize,
            query_rank: match self.store.is_some() {
                true => QueryRank::FULL,
                false => options.query_rank,
            },
            per_layer: true,
            per_token: options.per_token,
            ..self.job.options.clone()
        };
        score_options.check()?;
        let job = ScoreJob {
            options: score_options,
            ..self.job.clone()
        };
        let candidates = self.candidates(queries, options.prefilter)?;
        let (prepared, tok) = (&self.prepared, &mut self.tok);
        let has_store = self.store.is_some();
        let model = prepared.model.as_ref();
        let pq = influence::precondition_queries(
            model,
            queries,
            &prepared.preconditioner,
            job.options.batch_size,
            job.options.query_rank.0,
            has_store,
            progress,
        )?;
        let tracked = model.tracked().to_vec();
        let settings = serde_json::Value::Null;
        let run = ScoreRun {
            fits: &[],
            job: &job,
            options: &job.options,
            tracked: &tracked,
            preconditioner: &prepared.preconditioner,
            pq: &pq,
            // No recall sample: an answer lists the candidates' scores only.
            candidates: candidates.as_ref().map(|(c, s)| results::Prefilter {
                candidates: c,
                sampled: s,
            }),
            // Never checkpointed (RunOptions::ONCE): nothing is written.
            work: Path::new(""),
            stem: String::new(),
            settings: &settings,
            progress,
            parts_dir: None,
        };
        let mut saved = Saved {
            acc: ScoreAccumulator::new(queries.len(), tracked.len(), options.top_k, None),
            dense_columns: 0,
            parts: None,
            position: 0,
            complete: false,
        };
        // Total unknown in advance: the corpus is streamed (or the store read) as it goes.
        progress.begin("scoring pass", 0);
        let corpus = match &mut self.store {
            Some(reader) => {
                reader.rewind()?;
                score_from_store(&run, reader, &mut saved)?;
                stored_corpus(&reader.meta)
            }
            None => corpus_pass(&run, prepared, tok, queries, &mut saved)?,
        };
        progress.end();
        let summaries = std::mem::take(&mut saved.acc.summaries);
        let token_parts = match options.per_token {
            true => Some(token_parts(
                &run, prepared, tok, has_store, queries, &summaries,
            )?),
            false => None,
        };
        let ids: Vec<String> = queries.iter().map(|q| q.id.clone()).collect();
        // What a score means in nats, as `infl score` records it for these factors.
        let removal = results::RemovalScale::of(
            prepared.fmeta.options.strategy,
            options.normalize,
            &prepared.fmeta.corpus,
        );
        let rows = results::entries(
            &summaries,
            &ids,
            tok,
            true,
            token_parts.as_ref(),
            removal.as_ref(),
        );
        let mut out = answers(&summaries, &ids, &pq, rows);
        out.iter_mut().for_each(|a| a.prefilter = options.prefilter);
        self.corpus = corpus;
        Ok(out)
    }

    /// Each query's pre-filter candidates (`infl score --prefilter`'s), when `prefilter` asks,
    /// and an empty recall sample for each.
    fn candidates(
        &self,
        queries: &[Query],
        prefilter: Option<usize>,
    ) -> Result<Option<Candidates>> {
        let Some(n) = prefilter else {
            return Ok(None);
        };
        let index = self.index.as_ref().ok_or_else(|| {
            Error::input(
                "field `prefilter`: this server has no BM25 index; start it with --index INDEX (from `infl index`)",
            )
        })?;
        let candidates = queries
            .iter()
            .map(|q| index.candidates(q, n).into_iter().collect())
            .collect();
        Ok(Some((candidates, vec![HashSet::new(); queries.len()])))
    }

    /// The training sequence with id `id` (as `top_k.jsonl` names it), its text and
    /// self-influence; `None` when the corpus has no such sequence. Streams the corpus.
    pub fn sequence(&mut self, id: &str) -> Result<Option<SequenceInfo>> {
        let model = self.prepared.model.as_ref();
        let mut found: Option<(usize, Sequence)> = None;
        let mut seen = 0usize;
        data::stream_corpus_columns(
            &self.job.train,
            &self.job.options.columns,
            &mut self.tok,
            self.prepared.max_len,
            model.vocab_size(),
            1024,
            |chunk| {
                if found.is_none() {
                    if let Some(i) = chunk.iter().position(|s| s.id == id) {
                        found = Some((seen + i, chunk[i].clone()));
                    }
                }
                seen += chunk.len();
                Ok(())
            },
        )?;
        let Some((index, seq)) = found else {
            return Ok(None);
        };
        let mut own = 0f64;
        crate::pass::for_each_batch(
            model,
            std::slice::from_ref(&seq),
            1,
            Labels::Data,
            &Silent,
            "self-influence",
            |_, taps| {
                let tracked = model.tracked();
                own = influence::batch_self_influence(tracked, &self.prepared.preconditioner, taps)
                    .first()
                    .copied()
                    .unwrap_or(0.0);
                Ok(())
            },
        )?;
        Ok(Some(SequenceInfo {
            text: self.tok.decode(&seq.ids),
            id: seq.id,
            index,
            ids: seq.ids,
            self_influence: own,
        }))
    }

    /// The model's continuation of `prompt`: up to `max_tokens` tokens, each the most likely
    /// (temperature 0) or drawn from the softmax at `temperature` with a seeded generator.
    /// Returns the completion's text and token ids.
    pub fn generate(&mut self, prompt: &str, sampling: Sampling) -> Result<(String, Vec<u32>)> {
        let model = self.prepared.model.as_ref();
        let mut ids = self.tok.encode(prompt, "generate: field `prompt`")?;
        if ids.is_empty() {
            return Err(Error::input("field `prompt` is empty: nothing to continue"));
        }
        let (vocab, start) = (model.vocab_size(), ids.len());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
        while ids.len() - start < sampling.max_tokens && ids.len() < model.max_positions() {
            let logits = model.logits(&ids)?;
            let last = logits
                .get(logits.len().saturating_sub(vocab)..)
                .filter(|l| l.len() == vocab)
                .ok_or_else(|| {
                    Error::Other("logits of another shape than the vocabulary".into())
                })?;
            if last.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "generate: the model's logits after {} tokens are not finite",
                    ids.len()
                )));
            }
            ids.push(next_token(last, sampling.temperature, &mut rng));
        }
        let completion = ids.split_off(start);
        let text = self.tok.decode(&completion).unwrap_or_default();
        Ok((text, completion))
    }
}

/// The streamed pass over the corpus ([`streamed_pass`]), with `infl score`'s memory check.
fn corpus_pass(
    run: &ScoreRun<'_>,
    prepared: &Prepared,
    tok: &mut LazyTokenizer,
    queries: &[Query],
    saved: &mut Saved,
) -> Result<CorpusStats> {
    let model = prepared.model.as_ref();
    let memory = MemoryCheck {
        enabled: true,
        model,
        batch_size: run.options.batch_size,
        n_queries: queries.len(),
        query_rank: run.options.query_rank.0,
    };
    let mut checked_len = queries
        .iter()
        .map(|q| q.prompt_ids.len() + q.completion_ids.len())
        .max()
        .unwrap_or(1);
    memory.check(checked_len)?;
    // Pre-filtered: only the union of the queries' candidates is computed.
    let union = run.candidates.map(|p| {
        p.candidates
            .iter()
            .chain(p.sampled)
            .flatten()
            .copied()
            .collect()
    });
    let window = (prepared.max_len, union);
    streamed_pass(run, model, &memory, window, tok, saved, &mut checked_len)
}

/// The per-token split of the top and bottom sequences ([`token_pass`]). Store queries are in
/// the store's basis, so the split takes the queries again in the model's own.
fn token_parts(
    run: &ScoreRun<'_>,
    prepared: &Prepared,
    tok: &mut LazyTokenizer,
    has_store: bool,
    queries: &[Query],
    summaries: &[results::QuerySummary],
) -> Result<std::collections::HashMap<(usize, usize), Vec<results::TokenPart>>> {
    let model = prepared.model.as_ref();
    let batch_size = run.options.batch_size;
    let own_basis;
    let pq = match has_store {
        true => {
            own_basis = influence::precondition_queries(
                model,
                queries,
                &prepared.preconditioner,
                batch_size,
                None,
                false,
                &Silent,
            )?;
            &own_basis
        }
        false => run.pq,
    };
    token_pass(model, summaries, pq, batch_size, tok, |taps| {
        run.scale(taps)
    })
}

/// The most likely token (temperature 0), or one drawn from softmax(logits / temperature).
fn next_token(logits: &[f32], temperature: f64, rng: &mut impl Rng) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0;
    if temperature <= 0.0 {
        return argmax as u32;
    }
    let top = logits[argmax] as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&x| ((x as f64 - top) / temperature).exp())
        .collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    argmax as u32
}

/// Each query's answer from the pass's summaries and the rows `results::entries` made of them.
fn answers(
    summaries: &[results::QuerySummary],
    ids: &[String],
    pq: &PreconditionedQueries,
    rows: Vec<TopEntry>,
) -> Vec<Answer> {
    let mut out: Vec<Answer> = summaries
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(q, (s, id))| Answer {
            id: id.clone(),
            loss: pq.losses.get(q).copied().unwrap_or(f64::NAN),
            self_influence: pq.self_influence.get(q).copied().unwrap_or(f64::NAN),
            top: Vec::new(),
            bottom: Vec::new(),
            n_sequences: s.count,
            prefilter: None,
            distribution: results::Distribution {
                query_id: id.clone(),
                count: s.count as usize,
                sum: s.sum,
                sum_sq: s.sum_sq,
                sum_pos: s.sum_pos,
                sum_neg: s.sum_neg,
                min: s.min,
                max: s.max,
                tail_pos: s.tail_pos(),
                tail_neg: s.tail_neg(),
                sketch: None,
            },
            total_per_layer: s.total_per_layer.clone(),
            abs_per_layer: s.abs_per_layer.clone(),
        })
        .collect();
    // `entries` lists each query's rows in query order; ids are unique within a batch.
    for row in rows {
        if let Some(a) = out.iter_mut().find(|a| a.id == row.query_id) {
            match row.direction {
                Direction::Top => a.top.push(row),
                Direction::Bottom => a.bottom.push(row),
            }
        }
    }
    out
}
