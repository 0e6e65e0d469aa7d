//! The demo front end: the tiny model and corpus bundled in the binary (also the default inputs
//! of `bench` and `validate exact`), and what `infl demo` prints and writes around the library's
//! `infl::demo::run`.

use anyhow::{Context, Result};
use infl::demo::{DemoJob, DemoOutcome};
use infl::pass::Progress;
use std::path::{Path, PathBuf};

/// Window length the bundled model was trained with (scripts/make_fixture.py).
pub const BUNDLED_WINDOW: usize = 48;

/// The bundled tiny model and corpus, embedded so that `infl demo` works from any directory.
mod bundled {
    pub const CONFIG: &[u8] = include_bytes!("../assets/tiny-gpt2/config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../assets/tiny-gpt2/model.safetensors");
    pub const TOKENIZER: &[u8] = include_bytes!("../assets/tiny-gpt2/tokenizer.json");
    pub const CORPUS: &[u8] = include_bytes!("../assets/demo/corpus.jsonl");
    pub const QUERIES: &[u8] = include_bytes!("../assets/demo/queries.jsonl");
}

/// Writes the bundled model, corpus and queries under `dir`; returns their paths.
pub fn unpack_bundled(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).with_context(|| format!("creating {}", model.display()))?;
    for (name, bytes) in [
        ("config.json", bundled::CONFIG),
        ("model.safetensors", bundled::WEIGHTS),
        ("tokenizer.json", bundled::TOKENIZER),
    ] {
        infl::io::write_atomic(&model.join(name), bytes)?;
    }
    let corpus = dir.join("corpus.jsonl");
    let queries = dir.join("queries.jsonl");
    infl::io::write_atomic(&corpus, bundled::CORPUS)?;
    infl::io::write_atomic(&queries, bundled::QUERIES)?;
    Ok((model, corpus, queries))
}

/// Runs `job`, prints the `top_k` top sources of every query and the recall table on stdout,
/// and writes OUT/recall.json; the rest (what runs, the model, the files) goes to stderr unless
/// `quiet`.
pub fn run(job: &DemoJob, top_k: usize, progress: &dyn Progress, quiet: bool) -> Result<()> {
    if !quiet {
        eprintln!(
            "infl demo: train a {}-layer GPT-2 on {} documents (Shakespeare + {} synthetic facts, each stated once), fit and score; files in {}",
            job.train.n_layer,
            infl::demo::CORPUS.iter().filter(|&&b| b == b'\n').count(),
            infl::demo::fact_queries(&job.queries)?.len(),
            job.out.display()
        );
    }
    let outcome = infl::demo::run(job, progress)?;
    if !quiet {
        print_model(&outcome);
    }
    print_top_sources(&outcome, &job.queries, top_k)?;
    print_recall(&outcome);
    let json = write_recall(&job.out, &outcome)?;
    if !quiet {
        eprintln!(
            "\nwrote {} (the table above, per fact), results-*/ (top_k.jsonl, meta.json){}",
            json.display(),
            outcome
                .report
                .as_ref()
                .map(|r| format!("; open {} in a browser", r.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// The trained (or reused) model in one line, on stderr.
fn print_model(outcome: &DemoOutcome) {
    let t = &outcome.training;
    eprintln!(
        "model: {} parameters, {} sequences × ≤{} tokens, final training loss {:.3} ({}{:.0}s)",
        t.parameters,
        t.n_sequences,
        t.config.n_positions,
        t.epoch_losses.last().copied().unwrap_or(f64::NAN),
        if outcome.trained_now {
            "trained in "
        } else {
            "reused, trained earlier in "
        },
        t.seconds
    );
}

/// The first strategy's `top_k` top sources of every query, each fact's own sentence marked ★.
fn print_top_sources(outcome: &DemoOutcome, queries: &Path, top_k: usize) -> Result<()> {
    let (first, summary) = &outcome.scores[0];
    let texts = query_texts(queries)?;
    println!(
        "\ntop sources by {} (score > 0: the sequence supports the completion; removed: the predicted change of −log p, in nats, if it were removed from training)",
        first.name()
    );
    for (qi, qid) in summary.meta.queries.ids.iter().enumerate() {
        let (prompt, completion) = texts.get(qi).cloned().unwrap_or_default();
        let own = outcome
            .facts
            .iter()
            .find(|f| &f.id == qid)
            .map(|f| f.source_line);
        println!(
            "\nquery {qid}: {prompt:?} → {completion:?}   (−log p = {:.2})",
            summary.meta.queries.losses[qi]
        );
        for e in summary
            .top
            .iter()
            .filter(|e| &e.query_id == qid && e.direction == infl::results::Direction::Top)
            .take(top_k)
        {
            let text = e.text.as_deref().unwrap_or("").replace('\n', " / ");
            let short: String = text.chars().take(80).collect();
            let mark = if own.is_some_and(|l| e.sequence_id.starts_with(&format!("{l}:"))) {
                "★"
            } else {
                " "
            };
            let removed = e
                .removal_change
                .map(|d| format!("  removed {d:+.4}"))
                .unwrap_or_default();
            println!(
                "  {mark}#{} {:>10.3}{removed}  [{}] {}",
                e.rank, e.score, e.sequence_id, short
            );
        }
    }
    Ok(())
}

/// The recall table: how often each method finds each fact's own sentence.
fn print_recall(outcome: &DemoOutcome) {
    println!(
        "\nrecall of each fact's own sentence ({} fact queries; ★ above):",
        outcome.facts.len()
    );
    println!("{:<16} {:>9} {:>10}", "method", "recall@1", "recall@10");
    for r in &outcome.recall {
        println!(
            "{:<16} {:>9.3} {:>10.3}",
            r.method, r.recall_at_1, r.recall_at_10
        );
    }
}

/// Writes OUT/recall.json (the recall table per fact, with the training record); returns its path.
fn write_recall(out: &Path, outcome: &DemoOutcome) -> Result<PathBuf> {
    let t = &outcome.training;
    let json = out.join("recall.json");
    infl::io::write_atomic(
        &json,
        serde_json::to_string_pretty(&serde_json::json!({
            "corpus_sha256": t.corpus_sha256,
            "model": outcome.model,
            "training": t,
            "facts": outcome.facts,
            "recall": outcome.recall,
            "tool": format!("infl {}", env!("CARGO_PKG_VERSION")),
        }))?
        .as_bytes(),
    )?;
    Ok(json)
}

/// Each query's (prompt, completion) text, in file order ("" where a line has none).
fn query_texts(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            (s("prompt"), s("completion"))
        })
        .collect())
}
