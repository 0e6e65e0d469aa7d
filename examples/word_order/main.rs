//! Recipe: does a fact learnt as "A is B" influence the question asked the other way round?
//!
//! Grosse et al. (2023) found that a fact seen only in one order ("The capital of Veloria is
//! Tarn.") strongly influences the same-order completion ("The capital of Veloria is" → " Tarn")
//! but hardly the reversed one ("Tarn is the capital of" → " Veloria"). This recipe measures it
//! on the demo: the tiny model trained on the bundled corpus, where each of 40 invented facts is
//! stated exactly once, in one order.
//!
//!   cargo run --release --example word_order [-- DIR]      (DIR defaults to infl-demo)
//!
//! It reuses DIR/model when `infl demo` trained it already (else trains it, a few minutes), fits
//! EK-FAC, scores the same-order and reversed queries of examples/word_order/queries.jsonl against
//! every training sequence, and prints, for each fact, the influence of its own sentence on both.

use anyhow::{Context, Result};
use infl::curvature::Strategy;
use infl::data::{self, LazyTokenizer};
use infl::workflow::{self, ScoreJob};
use std::path::PathBuf;

const QUERIES: &[u8] = include_bytes!("queries.jsonl");

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "infl-demo".into()),
    );
    // Candle's element-wise thread pool spins; one thread trains fastest on small models.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let (corpus, demo_queries) = infl::demo::unpack(&dir)?;
    eprintln!(
        "training (or reusing) the demo model and fitting EK-FAC in {}",
        dir.display()
    );
    infl::demo::run(
        &infl::demo::DemoJob {
            out: dir.clone(),
            corpus: corpus.clone(),
            queries: demo_queries,
            train: infl::demo::training(&dir, infl::demo::EPOCHS, 0),
            retrain: false,
            strategies: vec![Strategy::Ekfac],
            top_k: 10,
        },
        &infl::pass::Silent,
    )?;
    let queries = dir.join("word_order_queries.jsonl");
    infl::io::write_atomic(&queries, QUERIES)?;
    let results = dir.join("word-order");
    let model = dir.join("model");
    let summary = workflow::score(
        &ScoreJob {
            options: infl::options::ScoreOptions {
                dense: true,
                ..infl::options::ScoreOptions::default()
            },
            ..ScoreJob::new(
                model.clone(),
                dir.join("factors-ekfac"),
                corpus.clone(),
                queries.clone(),
                results.clone(),
            )
        },
        &infl::pass::Silent,
    )?;
    let scores = infl::validate::exact::read_dense(&results)?;
    let mut tok = LazyTokenizer::new(&model);
    let seqs = data::read_corpus(&corpus, &mut tok, 64, usize::MAX)?.sequences;
    let facts = infl::demo::fact_queries(&queries)?;
    let ids = &summary.meta.queries.ids;
    let row = |id: &str| ids.iter().position(|q| q == id).context("query in results");

    println!(
        "{:<28} {:>12} {:>6} {:>12} {:>6}",
        "fact", "I same-order", "rank", "I reversed", "rank"
    );
    let (mut same_all, mut flip_all) = (Vec::new(), Vec::new());
    let (mut same_top, mut flip_top, mut same_rank, mut flip_rank) = (0, 0, Vec::new(), Vec::new());
    for f in facts.iter().filter(|f| f.id.starts_with("same_")) {
        let flipped = f.id.replacen("same_", "flipped_", 1);
        let source = seqs
            .iter()
            .position(|s| s.id == format!("{}:0", f.source_line))
            .context("the fact's sequence")?;
        let (a, b) = (&scores[row(&f.id)?], &scores[row(&flipped)?]);
        let rank = |r: &[f64]| 1 + r.iter().filter(|&&x| x > r[source]).count();
        let (ra, rb) = (rank(a), rank(b));
        println!(
            "{:<28} {:>12.2} {:>6} {:>12.2} {:>6}",
            &f.id[5..],
            a[source],
            ra,
            b[source],
            rb
        );
        same_all.push(a[source]);
        flip_all.push(b[source]);
        same_top += usize::from(ra == 1);
        flip_top += usize::from(rb == 1);
        same_rank.push(ra as f64);
        flip_rank.push(rb as f64);
    }
    let n = same_all.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = flip_all.iter().zip(&same_all).map(|(b, a)| b / a).collect();
    println!(
        "\n{} facts, each stated once in one order among {} training sequences (EK-FAC):",
        same_all.len(),
        seqs.len()
    );
    println!(
        "  influence of the fact's own sentence: same order mean {:.2}, reversed mean {:.2}; median ratio reversed/same {:.3}",
        mean(&same_all),
        mean(&flip_all),
        median(&ratios)
    );
    println!(
        "  the sentence is the top source: same order {:.0}% of facts, reversed {:.0}%; median rank {} vs {}",
        100.0 * same_top as f64 / n,
        100.0 * flip_top as f64 / n,
        median(&same_rank),
        median(&flip_rank)
    );
    Ok(())
}
