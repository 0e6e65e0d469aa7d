//! `score --prefilter N`'s recall estimate (`prefilter.json`) against the exact recall on the
//! bundled corpus: the exact top-k comes from an unfiltered run of the same model and factors.

mod common;

use common::{ok, s, scratch};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

fn top_ids(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("top_k.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["direction"] == "top")
        .map(|e| {
            (
                e["query_id"].as_str().unwrap().to_string(),
                e["sequence_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn prefilter_recall_estimate_covers_the_exact_recall() {
    let dir = scratch("readable", "prefilter");
    let (model, corpus, queries, factors, index) = common::fitted_and_indexed(&dir);
    let paths = (
        model.as_path(),
        corpus.as_path(),
        queries.as_path(),
        factors.as_path(),
    );
    let score = |out: &Path, extra: &[&str]| {
        let a = common::bundled_score_args(paths, out, extra);
        ok(&a);
    };
    let exact = dir.join("exact");
    score(&exact, &[]);
    let exact_top = top_ids(&exact);

    // A sample of 60 of the other sequences, and (second run) all of them.
    let (sampled, whole) = (dir.join("sampled"), dir.join("whole"));
    let pre = ["--prefilter", "40", "--index", s(&index)];
    score(
        &sampled,
        &[&pre[..], &["--prefilter-sample", "60"]].concat(),
    );
    score(
        &whole,
        &[&pre[..], &["--prefilter-sample", "100000"]].concat(),
    );

    let mut covered = 0;
    let mut n_queries = 0;
    for (run, exact_estimate) in [(&sampled, false), (&whole, true)] {
        let file: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("prefilter.json")).unwrap())
                .unwrap();
        assert_eq!(file["confidence"], 0.95);
        let got_top = top_ids(run);
        for q in file["queries"].as_array().unwrap() {
            let qid = q["query_id"].as_str().unwrap();
            let truth: HashSet<&String> = exact_top
                .iter()
                .filter(|(i, _)| i == qid)
                .map(|(_, s)| s)
                .collect();
            let found = got_top
                .iter()
                .filter(|(i, s)| i == qid && truth.contains(s))
                .count();
            let recall = found as f64 / truth.len() as f64;
            let (est, lo, hi) = (
                q["recall"].as_f64().unwrap(),
                q["recall_low"].as_f64().unwrap(),
                q["recall_high"].as_f64().unwrap(),
            );
            eprintln!(
                "{qid}: exact recall {recall:.2}, estimate {est:.2} [{lo:.2}, {hi:.2}] ({q})"
            );
            assert!(lo <= est && est <= hi);
            if exact_estimate {
                assert_eq!(q["sampled"], q["rest"]);
                assert!(
                    (est - recall).abs() < 1e-9,
                    "{qid}: {est} vs exact {recall}"
                );
            } else {
                assert_eq!(q["sampled"], 60);
                n_queries += 1;
                covered += usize::from(lo - 1e-9 <= recall && recall <= hi + 1e-9);
            }
        }
    }
    // 95% intervals: all but at most one of the 8 queries.
    assert!(
        covered + 1 >= n_queries,
        "{covered} of {n_queries} intervals cover the exact recall"
    );
}
