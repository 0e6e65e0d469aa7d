//! `infl train` + `infl validate lds` end to end on a corpus small enough for CI.

mod common;

use common::{ok, s, scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The first `lines` documents of the bundled demo corpus, and the fact queries among them plus
/// two free-form ones.
fn small_corpus(dir: &Path, lines: usize) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare-facts");
    let corpus: String = std::fs::read_to_string(root.join("corpus.jsonl"))
        .unwrap()
        .lines()
        .take(lines)
        .map(|l| format!("{l}\n"))
        .collect();
    let queries: String = std::fs::read_to_string(root.join("queries.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| {
            let q: Value = serde_json::from_str(l).unwrap();
            q["source_line"]
                .as_u64()
                .is_some_and(|n| n as usize <= lines)
                || q["id"] == "sonnet_18"
                || q["id"] == "witches"
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let (c, q) = (dir.join("corpus.jsonl"), dir.join("queries.jsonl"));
    std::fs::write(&c, corpus).unwrap();
    std::fs::write(&q, queries).unwrap();
    (c, q)
}

#[test]
fn train_writes_a_reproducible_checkpoint_that_fit_and_score_read() {
    let dir = scratch("lds", "train");
    let (corpus, queries) = small_corpus(&dir, 60);
    let (a, b) = (dir.join("a"), dir.join("b"));
    common::train_tiny(&corpus, &a, "2");
    common::train_tiny(&corpus, &b, "2");
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs between two runs with the same seed"
        );
    }
    let record = common::read_json(&a.join("training.json"));
    let losses = record["epoch_losses"].as_array().unwrap();
    assert!(
        losses[1].as_f64().unwrap() < losses[0].as_f64().unwrap(),
        "{record}"
    );
    let config = common::read_json(&a.join("config.json"));
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["n_positions"], 64);
    assert!(config["vocab_size"].as_u64().unwrap() <= 300);
    // The checkpoint is a model like any other.
    let (factors, results) = (dir.join("factors"), dir.join("results"));
    ok(&[
        "fit",
        "--model",
        s(&a),
        "--train",
        s(&corpus),
        "--out",
        s(&factors),
    ]);
    ok(&[
        "score",
        "--model",
        s(&a),
        "--factors",
        s(&factors),
        "--train",
        s(&corpus),
        "--queries",
        s(&queries),
        "--out",
        s(&results),
    ]);
    let meta = common::read_json(&results.join("meta.json"));
    assert_eq!(meta["corpus"]["n_sequences"], record["n_sequences"]);
    // A corpus line that is not JSON is named with its line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": 3}\n").unwrap();
    let out = common::run(&["train", "--train", s(&bad), "--out", s(&dir.join("c"))]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("`text`"),
        "{err}"
    );
    assert!(!dir.join("c").exists(), "a failed run leaves no checkpoint");
}

#[test]
fn lds_retrains_subsets_and_reproduces_the_model_on_the_full_set() {
    let dir = scratch("lds", "lds");
    let (corpus, queries) = small_corpus(&dir, 60);
    let model = dir.join("model");
    common::train_tiny(&corpus, &model, "2");
    let out = dir.join("out");
    let run = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "validate",
            "lds",
            "--model",
            s(&model),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        ok(&args);
        common::read_json(&out.join("lds.json"))
    };
    let r = run(&["--subsets", "4"], &out);
    let nq = r["query_ids"].as_array().unwrap().len();
    assert!(nq >= 3, "{nq} queries");
    let names: Vec<&str> = r["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ekfac", "kfac", "diagonal", "identity"]);
    for st in r["strategies"].as_array().unwrap() {
        let per = st["per_query"].as_array().unwrap();
        assert_eq!(per.len(), nq);
        for v in per.iter().filter_map(Value::as_f64) {
            assert!((-1.0..=1.0).contains(&v), "{st}");
        }
    }
    let subsets = r["subset_losses"].as_array().unwrap();
    assert_eq!(subsets.len(), 4);
    // Retrained models differ from each other: the measurements move.
    assert!(
        r["mean_loss_spread"].as_f64().unwrap() > 1e-3,
        "{}",
        r["mean_loss_spread"]
    );
    // The measurement is the one `score` differentiates: same −log p from two code paths
    // (candle autograd here, the fast engine's loss head there).
    let meta = common::read_json(&out.join("runs/ekfac/results/meta.json"));
    for (a, b) in r["full_model_losses"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["queries"]["losses"].as_array().unwrap())
    {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
    // A rerun resumes from the saved subsets: identical measurements.
    assert!(out.join("work/subset-0003.json").exists());
    let again = run(&["--subsets", "4"], &out);
    assert_eq!(again["subset_losses"], r["subset_losses"]);

    // On the full set, retraining is the original training, bit for bit: every "subset" model
    // measures exactly what the checkpoint does.
    let whole = run(
        &[
            "--subsets",
            "2",
            "--fraction",
            "1",
            "--strategies",
            "identity",
        ],
        &dir.join("whole"),
    );
    for row in whole["subset_losses"].as_array().unwrap() {
        assert_eq!(
            row, &whole["full_model_losses"],
            "retraining on everything is not the model"
        );
    }
    // Another corpus than the one trained on is refused (exit code 4).
    let other = dir.join("other.jsonl");
    std::fs::write(&other, "{\"text\": \"something else\"}\n").unwrap();
    let o = common::run(&[
        "validate",
        "lds",
        "--model",
        s(&model),
        "--train",
        s(&other),
        "--queries",
        s(&queries),
        "--out",
        s(&dir.join("x")),
    ]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `ekfac-refined` is one row per `--iterations` count; 0 iterations is EK-FAC's row exactly,
/// and every row records its score time.
#[test]
fn lds_scores_the_refined_inverse_at_each_iteration_count() {
    let dir = scratch("lds", "refined");
    let (corpus, queries) = small_corpus(&dir, 30);
    let model = dir.join("model");
    common::train_tiny(&corpus, &model, "2");
    let out = dir.join("out");
    ok(&[
        "validate",
        "lds",
        "--model",
        s(&model),
        "--train",
        s(&corpus),
        "--queries",
        s(&queries),
        "--out",
        s(&out),
        "--subsets",
        "3",
        "--strategies",
        "ekfac,ekfac-refined",
        "--iterations",
        "0,2",
        "--refine-batch",
        "8",
    ]);
    let r = common::read_json(&out.join("lds.json"));
    let rows = r["strategies"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|x| x["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ekfac", "ekfac-refined:0", "ekfac-refined:2"]);
    assert_eq!(rows[0]["per_query"], rows[1]["per_query"]);
    assert!(rows
        .iter()
        .all(|x| x["score_seconds"].as_f64().unwrap() > 0.0));
    let meta = common::read_json(&out.join("runs/ekfac-refined/results-2/meta.json"));
    assert_eq!(meta["refine"]["sequences"], 8);
}
