//! `ekfac-refined` end to end: its factors are EK-FAC's, 0 iterations scores exactly as ekfac,
//! iterations lower each query's residual (recorded in meta.json) and change the scores, and
//! re-scoring from a gradient store equals a pass over the corpus.

mod common;

use common::{ok, run, s};
use std::path::{Path, PathBuf};

fn dense(dir: &Path) -> Vec<f64> {
    infl::io::read_safetensors(&dir.join("scores.safetensors")).unwrap()["scores"]
        .1
        .clone()
}

fn max_rel(x: &[f64], reference: &[f64]) -> f64 {
    let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
    x.iter()
        .zip(reference)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() / scale))
}

fn fit(dir: &Path, (model, corpus): (&Path, &Path), strategy: &str, store: bool) -> PathBuf {
    let out = dir.join(format!("f-{strategy}-{store}"));
    let mut args = vec![
        "fit",
        "--model",
        s(model),
        "--train",
        s(corpus),
        "--out",
        s(&out),
        "--strategy",
        strategy,
    ];
    if store {
        args.push("--store");
    }
    ok(&args);
    out
}

/// `infl score --dense` into `dir/name` with `extra` arguments.
fn score(
    dir: &Path,
    name: &str,
    (model, corpus, queries): (&Path, &Path, &Path),
    factors: &Path,
    extra: &[&str],
) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "score",
        "--model",
        s(model),
        "--factors",
        s(factors),
        "--train",
        s(corpus),
        "--queries",
        s(queries),
        "--query-rank",
        "full",
        "--dense",
        "--out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    out
}

#[test]
fn refined_scores_start_at_ekfac_converge_and_rescore_from_a_store() {
    let dir = common::scratch("refine", "all");
    let (model, corpus, queries) =
        common::random_gpt2(&dir, 3, 30, |d| 4 + d % 9, |d, t| d * 5 + t * 3 + t * t);
    let inputs = (model.as_path(), corpus.as_path(), queries.as_path());
    let ekfac = fit(&dir, (&model, &corpus), "ekfac", false);
    let refined = fit(&dir, (&model, &corpus), "ekfac-refined", true);
    // The same factors: the refinement happens at scoring time.
    assert_eq!(
        std::fs::read(ekfac.join("factors.safetensors")).unwrap(),
        std::fs::read(refined.join("factors.safetensors")).unwrap()
    );

    let plain = dense(&score(&dir, "ekfac", inputs, &ekfac, &[]));
    let zero = score(&dir, "zero", inputs, &refined, &["--iterations", "0"]);
    assert_eq!(dense(&zero), plain, "0 iterations is EK-FAC bit for bit");

    let three = score(&dir, "three", inputs, &refined, &["--iterations", "3"]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(three.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["strategy"], "ekfac-refined");
    assert_eq!(meta["iterations"], 3);
    let record = &meta["refine"];
    assert_eq!(record["sequences"], 30, "{record}");
    let per_query = record["queries"].as_array().unwrap();
    assert_eq!(per_query.len(), 2);
    for q in per_query {
        let (start, end) = (
            q["initial_residual"].as_f64().unwrap(),
            q["residual"].as_f64().unwrap(),
        );
        assert!(q["iterations"].as_u64().unwrap() >= 1, "{q}");
        assert!(end < 0.5 * start, "the residual barely fell: {q}");
    }
    let refined_scores = dense(&three);
    let moved = max_rel(&refined_scores, &plain);
    assert!(moved > 1e-3, "refinement changed nothing ({moved})");

    // From the store: the same refined queries, rotated into the store's basis.
    let stored = score(
        &dir,
        "stored",
        inputs,
        &refined,
        &["--iterations", "3", "--store"],
    );
    let diff = max_rel(&dense(&stored), &refined_scores);
    assert!(diff < 1e-4, "store vs pass: {diff}");

    // Cosine needs every training sequence's refined self-influence: refused (exit 3).
    let out = run(&[
        "score",
        "--model",
        s(&model),
        "--factors",
        s(&refined),
        "--train",
        s(&corpus),
        "--queries",
        s(&queries),
        "--normalize",
        "cosine",
        "--out",
        s(&dir.join("cosine")),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cosine"));
}
