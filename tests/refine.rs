//! `ekfac-refined` end to end: its factors are EK-FAC's, 0 iterations scores exactly as ekfac,
//! iterations lower each query's residual (recorded in meta.json) and change the scores, and
//! re-scoring from a gradient store equals a pass over the corpus; on GPT-2, GPT-NeoX, the
//! Llama family and a LoRA adapter. `self-influence` refuses the factors.

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
    fit_with(dir, (model, corpus), strategy, store, &[])
}

fn fit_with(
    dir: &Path,
    (model, corpus): (&Path, &Path),
    strategy: &str,
    store: bool,
    extra: &[&str],
) -> PathBuf {
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
    args.extend_from_slice(extra);
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
    std::fs::remove_dir_all(&dir).ok();
}

/// Each query's `(iterations, initial_residual, residual)` from a refined run's meta.json.
fn convergence(results: &Path) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(results.join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["refine"]["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            let f = |k: &str| q[k].as_f64().unwrap();
            (
                q["iterations"].as_u64().unwrap(),
                f("initial_residual"),
                f("residual"),
            )
        })
        .collect()
}

/// GPT-NeoX (parallel residual, partial rotary), Llama (GQA, llama3 RoPE, tied head), a LoRA
/// adapter on Llama (its layers only) and one on GPT-2 (beside a base layer): 0 iterations is EK-FAC bit for bit, and run long
/// enough, every query's residual falls by over 100× (the solve converges; that it converges
/// to the dense solve is `influence::refine`'s unit test).
#[test]
fn refined_scores_on_gpt_neox_llama_and_an_adapter() {
    let lora = common::family_fixture("../lora");
    let corpus = lora.join("corpus_ids.jsonl");
    let queries = lora.join("queries_ids.jsonl");
    let adapter = lora.join("qvd");
    let gpt2_adapter = lora.join("gpt2");
    let cases: [(&str, &str, Vec<&str>); 4] = [
        ("neox", "gpt_neox_parallel", vec![]),
        ("llama", "llama", vec![]),
        (
            "lora",
            "llama",
            vec!["--adapter", s(&adapter), "--modules", "adapter"],
        ),
        // The bundled GPT-2 with an adapter on every Conv1D; one base layer tracked beside
        // the adapter's, so the products must run the adapted model, not the base.
        (
            "gpt2 lora",
            "../../../assets/tiny-gpt2",
            vec![
                "--adapter",
                s(&gpt2_adapter),
                "--layers",
                "transformer.h.1.mlp.c_fc,transformer.h.1.mlp.c_fc.lora_A,transformer.h.1.mlp.c_fc.lora_B",
            ],
        ),
    ];
    for (name, fixture, fit_extra) in cases {
        let dir = common::scratch("refine", name);
        let model = common::family_fixture(fixture);
        let inputs = (model.as_path(), corpus.as_path(), queries.as_path());
        let ekfac = fit_with(&dir, (&model, &corpus), "ekfac", false, &fit_extra);
        let refined = fit_with(&dir, (&model, &corpus), "ekfac-refined", false, &fit_extra);
        let adapter_args: Vec<&str> = fit_extra.iter().copied().take(2).collect();
        let plain = dense(&score(&dir, "ekfac", inputs, &ekfac, &adapter_args));
        let mut zero_args = adapter_args.clone();
        zero_args.extend(["--iterations", "0"]);
        let zero = score(&dir, "zero", inputs, &refined, &zero_args);
        assert_eq!(
            dense(&zero),
            plain,
            "{name}: 0 iterations is EK-FAC bit for bit"
        );

        let mut long = adapter_args.clone();
        long.extend(["--iterations", "200", "--refine-tolerance", "1e-5"]);
        let solved = score(&dir, "solved", inputs, &refined, &long);
        let per_query = convergence(&solved);
        assert_eq!(per_query.len(), 4, "{name}");
        for (iterations, start, end) in per_query {
            eprintln!("{name}: {iterations} iterations, residual {start:.3e} -> {end:.3e}");
            assert!(start > 1e-2, "{name}: EK-FAC is already exact ({start})");
            // f32 CG on thousands of coordinates is slow past ~1e-3 relative; EK-FAC starts near 10.
            assert!(
                end <= 1e-2 * start,
                "{name}: not converged: {start} -> {end} in {iterations}"
            );
        }
        let moved = max_rel(&dense(&solved), &plain);
        assert!(moved > 1e-3, "{name}: refinement changed nothing ({moved})");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A training sequence's refined self-influence would need a solve of its own: self-influence
/// refuses ekfac-refined factors (exit 3, the strategy named) before touching its output, and
/// computes EK-FAC's on the same model's ekfac factors.
#[test]
fn self_influence_refuses_refined_factors() {
    let dir = common::scratch("refine", "self");
    let (model, corpus, _) = common::random_gpt2(&dir, 4, 12, |d| 4 + d % 5, |d, t| d * 3 + t * 7);
    let refined = fit(&dir, (&model, &corpus), "ekfac-refined", false);
    let ekfac = fit(&dir, (&model, &corpus), "ekfac", false);
    let self_influence = |factors: &Path, out: &Path| {
        run(&[
            "self-influence",
            "--model",
            s(&model),
            "--factors",
            s(factors),
            "--train",
            s(&corpus),
            "--out",
            s(out),
        ])
    };
    let out = dir.join("self-refined");
    let refused = self_influence(&refined, &out);
    assert_eq!(refused.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("ekfac-refined") && stderr.contains("--strategy ekfac"),
        "{stderr}"
    );
    assert!(!out.exists(), "the refused run left {}", out.display());
    let plain = self_influence(&ekfac, &dir.join("self-ekfac"));
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
