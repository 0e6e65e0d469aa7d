//! End-to-end runs of the `infl` binary: batch-size invariance of fit + score, outputs, and the
//! error messages and exit codes for bad input.

use infl::model::gpt2::{Gpt2, Gpt2Config};
use infl::model::ModuleSelection;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infl-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(n_embd: usize) -> Gpt2Config {
    Gpt2Config {
        vocab_size: 31,
        n_positions: 12,
        n_embd,
        n_layer: 2,
        n_head: 2,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        reorder_and_upcast_attn: false,
    }
}

/// A random GPT-2 checkpoint, a pre-tokenised corpus with documents longer than the context,
/// and pre-tokenised queries.
fn fixture(dir: &Path, seed: u64) -> (PathBuf, PathBuf, PathBuf) {
    let model = dir.join("model");
    Gpt2::random(config(8), seed, ModuleSelection::All)
        .unwrap()
        .save(&model)
        .unwrap();
    let mut corpus = String::new();
    for d in 0..23u32 {
        let len = 1 + (d * 7 % 19) as usize;
        let ids: Vec<u32> = (0..len as u32).map(|t| (d * 5 + t * 3) % 31).collect();
        corpus.push_str(&format!("{{\"ids\": {ids:?}}}\n"));
    }
    let corpus_path = dir.join("corpus.jsonl");
    std::fs::write(&corpus_path, corpus).unwrap();
    let queries = dir.join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"id\": \"a\", \"prompt_ids\": [1, 2, 3], \"completion_ids\": [4, 5]}\n\
         {\"id\": \"b\", \"prompt_ids\": [9], \"completion_ids\": [10, 11, 12]}\n\
         {\"prompt_ids\": [20, 21, 22, 23], \"completion_ids\": [7]}\n",
    )
    .unwrap();
    (model, corpus_path, queries)
}

fn infl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_infl"))
        .arg("--quiet")
        .args(args)
        .output()
        .expect("the infl binary runs")
}

fn ok(args: &[&str]) {
    let out = infl(args);
    assert!(
        out.status.success(),
        "infl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_scores(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let t = infl::io::read_safetensors(path).unwrap();
    t["scores"].clone()
}

fn fit_and_score(dir: &Path, strategy: &str, fisher: &str, batch: &str) -> Vec<f64> {
    let (model, corpus, queries) = (
        dir.join("model"),
        dir.join("corpus.jsonl"),
        dir.join("queries.jsonl"),
    );
    let factors = dir.join(format!("f-{strategy}-{fisher}-{batch}"));
    let results = dir.join(format!("r-{strategy}-{fisher}-{batch}"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&[
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&corpus),
        "--out",
        &s(&factors),
        "--strategy",
        strategy,
        "--fisher",
        fisher,
        "--batch-size",
        batch,
        "--seed",
        "3",
    ]);
    ok(&[
        "score",
        "--model",
        &s(&model),
        "--factors",
        &s(&factors),
        "--train",
        &s(&corpus),
        "--queries",
        &s(&queries),
        "--out",
        &s(&results),
        "--dense",
        "--batch-size",
        batch,
        "--top-k",
        "4",
    ]);
    let (shape, scores) = read_scores(&results.join("scores.safetensors"));
    // 23 documents with up to 19 tokens in windows of 12 → 23 + (documents longer than 12).
    let expected_sequences = (0..23u32)
        .map(|d| (1 + (d * 7 % 19) as usize).div_ceil(12))
        .sum::<usize>();
    assert_eq!(shape, vec![3, expected_sequences]);
    scores
}

#[test]
fn scores_do_not_depend_on_batch_size() {
    let dir = scratch("batch");
    fixture(&dir, 11);
    for (strategy, fisher) in [
        ("ekfac", "empirical"),
        ("kfac", "sampled"),
        ("diagonal", "sampled"),
        ("identity", "empirical"),
    ] {
        let one = fit_and_score(&dir, strategy, fisher, "1");
        let many = fit_and_score(&dir, strategy, fisher, "32");
        let scale = one.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(scale > 0.0);
        for (a, b) in one.iter().zip(&many) {
            assert!(
                (a - b).abs() <= 1e-5 * scale,
                "{strategy}/{fisher}: batch 1 gives {a}, batch 32 gives {b}"
            );
        }
    }
}

#[test]
fn outputs_record_provenance_and_top_k() {
    let dir = scratch("outputs");
    fixture(&dir, 12);
    fit_and_score(&dir, "ekfac", "sampled", "4");
    let results = dir.join("r-ekfac-sampled-4");
    let top = std::fs::read_to_string(results.join("top_k.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = top
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3 * 4);
    assert_eq!(lines[0]["query_id"], "a");
    assert_eq!(lines[0]["rank"], 1);
    assert_eq!(
        lines[8]["query_id"], "3",
        "queries without an id are named by their line"
    );
    let scores: Vec<f64> = lines[..4]
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["strategy"], "ekfac");
    assert_eq!(meta["fisher"], "sampled");
    assert_eq!(meta["damping"], "heuristic");
    assert_eq!(meta["damping_per_layer"].as_array().unwrap().len(), 8);
    assert_eq!(meta["model"]["architecture"], "gpt2");
    assert_eq!(meta["queries"]["losses"].as_array().unwrap().len(), 3);
    assert!(meta["factors"]["factors_sha256"].as_str().unwrap().len() == 64);
}

#[test]
fn bad_input_is_reported_with_file_line_and_field() {
    let dir = scratch("errors");
    let (model, corpus, queries) = fixture(&dir, 13);
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"ids\": [1, 2]}\n{\"ids\": [1, \"x\"]}\n").unwrap();
    let out = infl(&[
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&bad),
        "--out",
        &s(&dir.join("f")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("bad.jsonl:2") && err.contains("`ids`[1]"),
        "{err}"
    );
    assert!(
        !dir.join("f").join("meta.json").exists(),
        "nothing half-written"
    );

    let text = dir.join("text.jsonl");
    std::fs::write(&text, "{\"text\": \"hello\"}\n").unwrap();
    let out = infl(&[
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&text),
        "--out",
        &s(&dir.join("f")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("tokenizer.json"), "{err}");

    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("config.json"), "{\"model_type\": \"bert\"}").unwrap();
    let out = infl(&[
        "fit",
        "--model",
        &s(&other),
        "--train",
        &s(&corpus),
        "--out",
        &s(&dir.join("f")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("bert") && err.contains("not supported"),
        "{err}"
    );

    // Factors from one model are refused for another.
    let factors = dir.join("factors");
    ok(&[
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&corpus),
        "--out",
        &s(&factors),
        "--fisher",
        "empirical",
    ]);
    let model2 = dir.join("model2");
    Gpt2::random(config(8), 99, ModuleSelection::All)
        .unwrap()
        .save(&model2)
        .unwrap();
    let out = infl(&[
        "score",
        "--model",
        &s(&model2),
        "--factors",
        &s(&factors),
        "--train",
        &s(&corpus),
        "--queries",
        &s(&queries),
        "--out",
        &s(&dir.join("r")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("another model"), "{err}");

    // A tampered factors file is refused.
    let st = factors.join("factors.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&st, bytes).unwrap();
    let out = infl(&[
        "score",
        "--model",
        &s(&model),
        "--factors",
        &s(&factors),
        "--train",
        &s(&corpus),
        "--queries",
        &s(&queries),
        "--out",
        &s(&dir.join("r")),
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A weight tensor whose shape disagrees with config.json is named.
    let wrong = dir.join("wrong");
    Gpt2::random(config(8), 1, ModuleSelection::All)
        .unwrap()
        .save(&wrong)
        .unwrap();
    let cfg = std::fs::read_to_string(wrong.join("config.json"))
        .unwrap()
        .replace("\"n_embd\": 8", "\"n_embd\": 10");
    std::fs::write(wrong.join("config.json"), cfg).unwrap();
    let out = infl(&[
        "fit",
        "--model",
        &s(&wrong),
        "--train",
        &s(&corpus),
        "--out",
        &s(&dir.join("f")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("wte.weight") && err.contains("shape"), "{err}");

    // Usage errors exit 2 (clap).
    let out = infl(&["fit", "--model"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn demo_runs_on_the_bundled_model_and_finds_the_facts() {
    let dir = scratch("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_infl"))
        .args(["--quiet", "demo", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("query element_zorbium"), "{stdout}");
    // The one document stating the fact is the top source of its query (measured: rank 1).
    let top: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("results/top_k.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = top
        .iter()
        .find(|e| e["query_id"] == "element_zorbium")
        .unwrap();
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .contains("Imre Valk discovered the element zorbium"),
        "{first}"
    );
    assert!(dir.join("results/scores.safetensors").exists());
}

/// The new families run through the unchanged fit/score pipeline from the command line, GGUF
/// included (text queries use the tokenizer built from the GGUF metadata), and `inspect`
/// describes them.
#[test]
fn other_families_fit_score_and_inspect() {
    let dir = scratch("families");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families");
    let corpus = dir.join("corpus.jsonl");
    std::fs::write(
        &corpus,
        "{\"ids\": [1, 5, 9, 33, 2, 60, 17]}\n{\"ids\": [7, 7, 50, 22]}\n{\"ids\": [3, 4, 22, 8, 9]}\n",
    )
    .unwrap();
    let queries = dir.join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"prompt_ids\": [1, 5], \"completion_ids\": [9, 33]}\n",
    )
    .unwrap();
    for model in ["gpt_neox_parallel", "qwen2", "tiny_llama.gguf"] {
        let m = root.join(model);
        let m = m.to_str().unwrap();
        let f = dir.join(format!("f-{model}"));
        let r = dir.join(format!("r-{model}"));
        ok(&[
            "fit",
            "--quiet",
            "--model",
            m,
            "--train",
            corpus.to_str().unwrap(),
            "--out",
            f.to_str().unwrap(),
            "--fisher",
            "empirical",
            "--max-len",
            "8",
        ]);
        ok(&[
            "score",
            "--quiet",
            "--model",
            m,
            "--factors",
            f.to_str().unwrap(),
            "--train",
            corpus.to_str().unwrap(),
            "--queries",
            queries.to_str().unwrap(),
            "--out",
            r.to_str().unwrap(),
        ]);
        let top = std::fs::read_to_string(r.join("top_k.jsonl")).unwrap();
        assert_eq!(top.lines().count(), 3, "{top}");
        let out = infl(&[
            "inspect",
            "--model",
            m,
            "--batch-size",
            "2",
            "--max-len",
            "8",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("FIT TOTAL") && text.contains("tokens/s"),
            "{text}"
        );
    }
    // Text queries through the GGUF's own tokenizer.
    let gguf = root.join("tiny_llama.gguf");
    let text_queries = dir.join("text_queries.jsonl");
    std::fs::write(
        &text_queries,
        "{\"prompt\": \"the cat\", \"completion\": \" sat in the hat\"}\n",
    )
    .unwrap();
    ok(&[
        "score",
        "--quiet",
        "--model",
        gguf.to_str().unwrap(),
        "--factors",
        dir.join("f-tiny_llama.gguf").to_str().unwrap(),
        "--train",
        corpus.to_str().unwrap(),
        "--queries",
        text_queries.to_str().unwrap(),
        "--out",
        dir.join("r-text").to_str().unwrap(),
    ]);
    // An unknown model_type is a clear input error (exit code 3).
    let bad = dir.join("bad-model");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("config.json"), "{\"model_type\": \"mamba\"}").unwrap();
    let out = infl(&["inspect", "--model", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mamba"));
}
