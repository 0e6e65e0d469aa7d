//! Recipe: the same queries on two model sizes (the paper's cross-model comparison).
//!
//! Grosse et al. (2023) compared the most influential sequences of the same queries across model
//! sizes: small models' top sources share the query's words, larger models' share its meaning.
//! This recipe trains a second, smaller model on the demo corpus (1 block of width 32 instead
//! of 2 blocks of width 64, same tokenizer, same recipe otherwise), scores the demo queries with
//! EK-FAC on both, and compares them with `infl compare` (top-10 overlap and Spearman per query),
//! plus each model's recall@1 of the facts' own sentences.
//!
//!   cargo run --release --example cross_model [-- DIR]     (DIR defaults to infl-demo)

use anyhow::Result;
use infl::curvature::{Fisher, Strategy};
use infl::options::FitOptions;
use infl::pass::Silent;
use infl::workflow::{self, FitJob, ScoreJob, ScoreSummary};
use std::path::{Path, PathBuf};

fn fit_and_score(model: &Path, corpus: &Path, queries: &Path, out: &Path) -> Result<ScoreSummary> {
    workflow::fit(
        &FitJob {
            options: FitOptions {
                max_len: Some(64),
                ..FitOptions::default()
            },
            ..FitJob::new(
                model.to_path_buf(),
                corpus.to_path_buf(),
                out.join("factors"),
                FitOptions {
                    strategy: Strategy::Ekfac,
                    fisher: Fisher::Sampled,
                    batch_size: 8,
                    seed: 0,
                    ..FitOptions::default()
                },
            )
        },
        &Silent,
    )?;
    Ok(workflow::score(
        &ScoreJob {
            options: infl::options::ScoreOptions {
                dense: true,
                ..infl::options::ScoreOptions::default()
            },
            ..ScoreJob::new(
                model.to_path_buf(),
                out.join("factors"),
                corpus.to_path_buf(),
                queries.to_path_buf(),
                out.join("results"),
            )
        },
        &Silent,
    )?)
}

/// Recall@1 of the facts' own sentences in a score run (the demo's measure).
fn recall_at_1(summary: &ScoreSummary, facts: &[infl::demo::FactQuery]) -> f64 {
    let ranked: Vec<Vec<String>> = facts
        .iter()
        .map(|f| infl::demo::top_sources(summary, &f.id))
        .collect();
    infl::demo::recall("ekfac", facts, &ranked).recall_at_1
}

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "infl-demo".into()),
    );
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let (corpus, queries) = infl::demo::unpack(&dir)?;
    let large = infl::demo::training(&dir, infl::demo::EPOCHS, 0);
    eprintln!("training (or reusing) the demo model in {}", dir.display());
    infl::demo::run(
        &infl::demo::DemoJob {
            out: dir.clone(),
            corpus: corpus.clone(),
            queries: queries.clone(),
            train: large.clone(),
            retrain: false,
            strategies: vec![Strategy::Ekfac],
            top_k: 10,
        },
        &Silent,
    )?;
    let small_dir = dir.join("cross-model/small");
    let small = infl::train::TrainJob {
        out: small_dir.join("model"),
        tokenizer: Some(large.out.join("tokenizer.json")),
        n_embd: 32,
        n_layer: 1,
        n_head: 2,
        ..large.clone()
    };
    eprintln!(
        "training the smaller model ({} block, width {})",
        small.n_layer, small.n_embd
    );
    let record = infl::train::train(&small, &Silent)?.record;
    let large_out = dir.join("cross-model/large");
    let a = fit_and_score(&small.out, &corpus, &queries, &small_dir)?;
    let b = fit_and_score(&large.out, &corpus, &queries, &large_out)?;
    let cmp = infl::compare::run(
        &[small_dir.join("results"), large_out.join("results")],
        Some(&dir.join("cross-model/compare.html")),
        Some(&dir.join("cross-model/compare.json")),
    )?;
    let facts = infl::demo::fact_queries(&queries)?;
    let is_fact = |q: &str| facts.iter().any(|f| f.id == q);
    let mean = |pick: &dyn Fn(&infl::compare::PairStats) -> Option<f64>, facts_only: bool| {
        let v: Vec<f64> = cmp
            .pairs
            .iter()
            .filter(|p| is_fact(&p.query_id) == facts_only)
            .filter_map(pick)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let large_params: usize =
        infl::io::read_json::<infl::train::TrainingRecord>(&large.out.join("training.json"))?
            .parameters;
    println!(
        "small: {} parameters (1×32), final loss {:.3};  large: {} parameters (2×64)",
        record.parameters,
        record.epoch_losses.last().copied().unwrap_or(f64::NAN),
        large_params
    );
    println!(
        "{:<24} {:>14} {:>18}",
        "queries", "top-10 overlap", "Spearman (all seq.)"
    );
    for (name, facts_only) in [("40 facts", true), ("4 free-form", false)] {
        println!(
            "{:<24} {:>14.3} {:>18.3}",
            name,
            mean(&|p| Some(p.overlap), facts_only),
            mean(&|p| p.spearman, facts_only)
        );
    }
    println!(
        "recall@1 of the facts' own sentences: small {:.3}, large {:.3}",
        recall_at_1(&a, &facts),
        recall_at_1(&b, &facts)
    );
    println!(
        "per query: {}/cross-model/compare.html (and compare.json)",
        dir.display()
    );
    Ok(())
}
