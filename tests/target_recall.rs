//! `score --prefilter N --target-recall R` on the bundled corpus: queries whose estimated recall
//! misses R at the first N are widened until they reach it, and the widened top-k is checked
//! against an unfiltered run's exact scores; a budget too small says so and still exits 0.

mod common;

use common::{ok, s, scratch};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// (query id → sequence id → score) of the top entries.
fn top(dir: &Path) -> HashMap<String, HashMap<String, f64>> {
    let mut out: HashMap<String, HashMap<String, f64>> = HashMap::new();
    for l in std::fs::read_to_string(dir.join("top_k.jsonl"))
        .unwrap()
        .lines()
    {
        let e: Value = serde_json::from_str(l).unwrap();
        if e["direction"] == "top" {
            out.entry(e["query_id"].as_str().unwrap().into())
                .or_default()
                .insert(
                    e["sequence_id"].as_str().unwrap().into(),
                    e["score"].as_f64().unwrap(),
                );
        }
    }
    out
}

fn prefilter_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("prefilter.json")).unwrap()).unwrap()
}

#[test]
fn target_recall_widens_until_reached_and_warns_on_a_small_budget() {
    let dir = scratch("target-recall", "bundled");
    let (model, corpus, queries, factors, index) = common::fitted_and_indexed(&dir);
    let paths = (
        model.as_path(),
        corpus.as_path(),
        queries.as_path(),
        factors.as_path(),
    );
    let score = |out: &Path, extra: &[&str]| {
        let a = common::bundled_score_args(paths, out, extra);
        common::run(&a)
    };
    let exact_dir = dir.join("exact");
    assert!(score(&exact_dir, &[]).status.success());
    let exact = top(&exact_dir);

    // Every other sequence sampled: each estimate is the exact recall, so R = 1 is reached
    // exactly when the widened candidates hold the whole exact top-10.
    let pre = [
        "--prefilter",
        "20",
        "--index",
        s(&index),
        "--prefilter-sample",
        "100000",
        "--target-recall",
        "1",
    ];
    let wide_dir = dir.join("wide");
    let out = score(&wide_dir, &[&pre[..], &["--prefilter-max", "640"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("not reached"), "{stderr}");
    let file = prefilter_json(&wide_dir);
    assert_eq!(
        (
            file["target_recall"].as_f64(),
            file["prefilter_max"].as_u64()
        ),
        (Some(1.0), Some(640))
    );
    let got = top(&wide_dir);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(wide_dir.join("meta.json")).unwrap())
            .unwrap();
    let n_sequences = meta["corpus"]["n_sequences"].as_u64().unwrap();
    let (mut widened, mut short_of_all) = (0, 0);
    for q in file["queries"].as_array().unwrap() {
        let id = q["query_id"].as_str().unwrap();
        let n = q["prefilter"].as_u64().unwrap();
        eprintln!("{id}: N {n}, recall {}", q["recall"]);
        assert_eq!(q["reached"], true, "{q}");
        assert_eq!(q["recall_low"].as_f64(), Some(1.0));
        assert_eq!(q["candidates"].as_u64(), Some(n));
        // N doubles from 20, up to the corpus.
        assert!(
            [20, 40, 80, 160, 320].contains(&n) || n == n_sequences,
            "{n}"
        );
        widened += usize::from(n > 20);
        short_of_all += usize::from(n > 20 && n < n_sequences);
        // The recall against the exact scores: the same ten sequences, the same scores.
        let (truth, mine) = (&exact[id], &got[id]);
        let t: HashSet<&String> = truth.keys().collect();
        let m: HashSet<&String> = mine.keys().collect();
        assert_eq!(t, m, "{id}");
        for (seq, v) in truth {
            assert!(
                (v - mine[seq]).abs() <= 1e-9 * v.abs().max(1.0),
                "{id} {seq}: {v} vs {}",
                mine[seq]
            );
        }
    }
    // The first N missed some query's target (else nothing was tested).
    assert!(widened > 0, "no query needed widening at N = 20");
    // And some query reached it with fewer than all the sequences.
    assert!(short_of_all > 0);

    // A budget of N itself: nothing can widen; the queries that missed are named, exit 0.
    let small_dir = dir.join("small");
    let out = score(&small_dir, &[&pre[..], &["--prefilter-max", "20"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: --target-recall 1 not reached within --prefilter-max 20"),
        "{stderr}"
    );
    let file = prefilter_json(&small_dir);
    let missed: Vec<&Value> = file["queries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["reached"] == false)
        .collect();
    assert_eq!(missed.len(), widened, "{file}");
    assert!(missed.iter().all(|q| q["prefilter"] == 20));

    // The report says which N each query used and whether it reached the target.
    let html = dir.join("report.html");
    ok(&["report", s(&small_dir), "--out", s(&html)]);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("id=\"prefilter\"") && page.contains("not reached"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn target_recall_is_refused_where_it_cannot_run() {
    let (model, corpus, queries) = common::bundled();
    let base = [
        "score",
        "--model",
        s(&model),
        "--factors",
        "/nonexistent",
        "--train",
        s(&corpus),
        "--queries",
        s(&queries),
        "--out",
        "/tmp/never",
    ];
    // Without --prefilter (clap), with a recall out of range, with a budget below N.
    for extra in [
        &["--target-recall", "0.9"][..],
        &[
            "--prefilter",
            "10",
            "--index",
            "/x",
            "--target-recall",
            "1.5",
        ],
        &[
            "--prefilter",
            "10",
            "--index",
            "/x",
            "--target-recall",
            "0.9",
            "--prefilter-max",
            "5",
        ],
        &[
            "--prefilter",
            "10",
            "--index",
            "/x",
            "--target-recall",
            "0.9",
            "--shard",
            "0/2",
        ],
    ] {
        let out = common::run(&[&base[..], extra].concat());
        let code = out.status.code();
        assert!(
            code == Some(2) || code == Some(3),
            "{extra:?}: {code:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
