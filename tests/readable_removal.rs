//! `removal_change` against an actual removal: a tiny model made by `infl train` is retrained
//! with exactly its recipe (the LDS machinery: same initialisation, optimiser and schedule)
//! without each fact query's top-10 group, and without its bottom-10 group, and the measured
//! change of −log p(completion | prompt) is set beside `group_removal_change`. The numbers are
//! printed (`--nocapture`); the test asserts only what first-order influence must get right on
//! average: removing the top group raises −log p more than removing the bottom group.

mod common;

use common::{ok, s, scratch};
use infl::data::{self, LazyTokenizer};
use infl::model::gpt2::Gpt2;
use infl::model::ModuleSelection;
use infl::train::{completion_losses, Trainer, TrainingRecord};
use serde_json::Value;

#[test]
fn group_removal_change_against_retraining_without_the_group() {
    let dir = scratch("readable", "removal");
    let (corpus, queries) = common::demo_subset(&dir, 60);
    let model = dir.join("model");
    common::train_tiny(&corpus, &model, "4");
    let factors = dir.join("factors");
    ok(&[
        "fit",
        "--model",
        s(&model),
        "--train",
        s(&corpus),
        "--out",
        s(&factors),
    ]);
    let results = dir.join("results");
    ok(&[
        "score",
        "--model",
        s(&model),
        "--factors",
        s(&factors),
        "--train",
        s(&corpus),
        "--queries",
        s(&queries),
        "--out",
        s(&results),
        "--top-k",
        "10",
        "--query-rank",
        "full",
    ]);

    let record: TrainingRecord =
        serde_json::from_str(&std::fs::read_to_string(model.join("training.json")).unwrap())
            .unwrap();
    let full = Gpt2::load(&model, ModuleSelection::All).unwrap();
    let config = full.config().clone();
    let mut tok = LazyTokenizer::new(&model);
    let c = data::read_corpus(&corpus, &mut tok, config.n_positions, config.vocab_size).unwrap();
    let (qs, _) =
        data::read_queries(&queries, &mut tok, config.n_positions, config.vocab_size).unwrap();
    let pairs: Vec<(&[u32], &[u32])> = qs
        .iter()
        .map(|q| (q.prompt_ids.as_slice(), q.completion_ids.as_slice()))
        .collect();
    let before = completion_losses(&full, &pairs).unwrap();

    let top_k: Vec<Value> = std::fs::read_to_string(results.join("top_k.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Retrains without `group` (sequence ids) and measures query qi.
    let without = |group: &[String], qi: usize| -> f64 {
        let seqs: Vec<&[u32]> = c
            .sequences
            .iter()
            .filter(|s| !group.contains(&s.id))
            .map(|s| s.ids.as_slice())
            .collect();
        let mut t = Trainer::new(config.clone(), record.options.clone()).unwrap();
        t.fit(&seqs, &infl::pass::Silent).unwrap();
        completion_losses(t.model(), &pairs[qi..=qi]).unwrap()[0]
    };
    let (mut top_measured, mut bottom_measured) = (Vec::new(), Vec::new());
    let (mut top_predicted, mut bottom_predicted) = (Vec::new(), Vec::new());
    for (qi, q) in qs.iter().enumerate().take(4) {
        for (direction, measured, predicted) in [
            ("top", &mut top_measured, &mut top_predicted),
            ("bottom", &mut bottom_measured, &mut bottom_predicted),
        ] {
            let group: Vec<&Value> = top_k
                .iter()
                .filter(|e| e["query_id"] == q.id.as_str() && e["direction"] == direction)
                .collect();
            let ids: Vec<String> = group
                .iter()
                .map(|e| e["sequence_id"].as_str().unwrap().to_string())
                .collect();
            let p = group.last().unwrap()["group_removal_change"]
                .as_f64()
                .unwrap();
            let m = without(&ids, qi) - before[qi];
            eprintln!(
                "query {} {direction}-{}: predicted {p:+.4} nats, measured {m:+.4} nats (−log p before {:.3})",
                q.id,
                ids.len(),
                before[qi]
            );
            measured.push(m);
            predicted.push(p);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "mean over {} queries: top-10 removed: predicted {:+.4}, measured {:+.4}; bottom-10 removed: predicted {:+.4}, measured {:+.4}",
        top_measured.len(),
        mean(&top_predicted),
        mean(&top_measured),
        mean(&bottom_predicted),
        mean(&bottom_measured)
    );
    assert!(mean(&top_predicted) > 0.0 && mean(&bottom_predicted) < 0.0);
    assert!(
        mean(&top_measured) > mean(&bottom_measured),
        "removing the top groups should hurt the completions more than removing the bottom groups"
    );
}
