//! End-to-end runs of the `infl` binary: batch-size invariance of fit + score, outputs, and the
//! error messages and exit codes for bad input.

mod common;

use infl::model::gpt2::{Gpt2, Gpt2Config};
use infl::model::ModuleSelection;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli", name)
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
    // Per query: the 4 most positive, then the 4 most negative.
    assert_eq!(lines.len(), 3 * 4 * 2);
    assert_eq!(lines[0]["query_id"], "a");
    assert_eq!(lines[0]["rank"], 1);
    assert_eq!(lines[0]["direction"], "top");
    assert_eq!(lines[4]["direction"], "bottom");
    assert_eq!(
        lines[16]["query_id"], "3",
        "queries without an id are named by their line"
    );
    let top: Vec<f64> = lines[..4]
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert!(top.windows(2).all(|w| w[0] >= w[1]));
    let bottom: Vec<f64> = lines[4..8]
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert!(bottom.windows(2).all(|w| w[0] <= w[1]) && bottom[0] < top[3]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["strategy"], "ekfac");
    assert_eq!(meta["fisher"], "sampled");
    assert_eq!(meta["damping"], "heuristic");
    assert_eq!(meta["damping_per_layer"].as_array().unwrap().len(), 8);
    assert_eq!(meta["model"]["architecture"], "gpt2");
    assert_eq!(meta["model"]["engine"], "fast");
    assert_eq!(meta["model"]["device"], "cpu");
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

    // A missing weight tensor is named.
    let missing = dir.join("missing");
    Gpt2::random(config(8), 1, ModuleSelection::All)
        .unwrap()
        .save(&missing)
        .unwrap();
    let mut t = infl::io::read_safetensors(&missing.join("model.safetensors")).unwrap();
    t.remove("h.1.mlp.c_fc.bias");
    let tensors: Vec<(String, infl::io::OwnedTensor)> = t
        .into_iter()
        .map(|(k, (shape, v))| {
            (
                k,
                infl::io::OwnedTensor::F32(shape, v.iter().map(|&x| x as f32).collect()),
            )
        })
        .collect();
    infl::io::write_safetensors(&missing.join("model.safetensors"), &tensors, None).unwrap();
    let out = infl(&[
        "fit",
        "--model",
        &s(&missing),
        "--train",
        &s(&corpus),
        "--out",
        &s(&dir.join("f")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("h.1.mlp.c_fc.bias") && err.contains("missing"),
        "{err}"
    );

    // A non-finite loss names the sequence and exits 5.
    let nan = dir.join("nan");
    Gpt2::random(config(8), 1, ModuleSelection::All)
        .unwrap()
        .save(&nan)
        .unwrap();
    let mut t = infl::io::read_safetensors(&nan.join("model.safetensors")).unwrap();
    // Position 5 embeds to NaN: only sequences longer than 5 tokens break.
    let (shape, wpe) = t.remove("wpe.weight").unwrap();
    let mut wpe: Vec<f32> = wpe.iter().map(|&x| x as f32).collect();
    wpe[5 * shape[1]] = f32::NAN;
    let mut tensors: Vec<(String, infl::io::OwnedTensor)> = t
        .into_iter()
        .map(|(k, (shape, v))| {
            (
                k,
                infl::io::OwnedTensor::F32(shape, v.iter().map(|&x| x as f32).collect()),
            )
        })
        .collect();
    tensors.push(("wpe.weight".into(), infl::io::OwnedTensor::F32(shape, wpe)));
    infl::io::write_safetensors(&nan.join("model.safetensors"), &tensors, None).unwrap();
    let nan_corpus = dir.join("nan.jsonl");
    std::fs::write(
        &nan_corpus,
        "{\"ids\": [1, 2, 3]}\n{\"ids\": [5, 4, 6, 7, 8, 9]}\n",
    )
    .unwrap();
    let out = infl(&[
        "fit",
        "--model",
        &s(&nan),
        "--train",
        &s(&nan_corpus),
        "--out",
        &s(&dir.join("f")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("sequence 2:0") && err.contains("non-finite"),
        "{err}"
    );

    // Usage errors exit 2 (clap).
    let out = infl(&["fit", "--model"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The GPU path's statistics, scores and self-influence (candle products, `--device cuda`),
/// forced onto candle's CPU device with `INFL_DEVICE_PATH_ON_CPU=1`, against the CPU path: the
/// same factors, scores (rank-4 and full-rank queries) and self-influence to f32 rounding.
#[test]
fn the_gpu_path_gives_the_cpu_path_results() {
    let dir = scratch("device-path");
    let (model, corpus, queries) = fixture(&dir, 19);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |tag: &str, rank: &str, device_path: bool| -> [Vec<f64>; 3] {
        let (f, r) = (dir.join(format!("f-{tag}")), dir.join(format!("r-{tag}")));
        let own = dir.join(format!("self-{tag}"));
        let (m, c, q) = (s(&model), s(&corpus), s(&queries));
        let (fs, rs) = (s(&f), s(&r));
        let cmd = |args: &[&str]| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_infl"));
            c.arg("--quiet").args(args);
            if device_path {
                c.env("INFL_DEVICE_PATH_ON_CPU", "1");
            }
            let out = c.output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        cmd(&[
            "fit",
            "--model",
            &m,
            "--train",
            &c,
            "--out",
            &fs,
            "--batch-size",
            "4",
        ]);
        cmd(&[
            "score",
            "--model",
            &m,
            "--factors",
            &fs,
            "--train",
            &c,
            "--queries",
            &q,
            "--out",
            &rs,
            "--dense",
            "--query-rank",
            rank,
        ]);
        cmd(&[
            "self-influence",
            "--model",
            &m,
            "--factors",
            &fs,
            "--train",
            &c,
            "--out",
            &s(&own),
        ]);
        let factors = infl::io::read_safetensors(&f.join("factors.safetensors")).unwrap();
        let mut names: Vec<&String> = factors.keys().collect();
        names.sort();
        let flat = names.iter().flat_map(|n| factors[*n].1.clone()).collect();
        let scores = infl::io::read_safetensors(&r.join("scores.safetensors")).unwrap();
        let own = std::fs::read_to_string(own.join("self_influence.jsonl")).unwrap();
        let own = own
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["self_influence"].as_f64().unwrap()
            })
            .collect();
        [flat, scores["scores"].1.clone(), own]
    };
    let close = |what: &str, x: &[f64], y: &[f64]| {
        assert_eq!(x.len(), y.len());
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = x.iter().zip(y).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-5 * scale, "{what}: {worst:e} against {scale:e}");
        // The device path sums in another order: identical bits would mean it never ran.
        assert!(x != y, "{what}: the device path was not taken");
    };
    for rank in ["4", "full"] {
        let [f_cpu, s_cpu, own_cpu] = run(&format!("cpu-{rank}"), rank, false);
        let [f_dev, s_dev, own_dev] = run(&format!("dev-{rank}"), rank, true);
        close("factors", &f_cpu, &f_dev);
        close(&format!("rank {rank} scores"), &s_cpu, &s_dev);
        close("self-influence", &own_cpu, &own_dev);
    }
}

/// `--device`: a name that is no device is a usage error; the fast engine refuses a GPU; a
/// build without the `cuda` feature says how to get one; `--device cpu` is the default.
#[test]
fn device_choices_are_checked_and_explained() {
    let dir = scratch("device");
    let (model, corpus, _) = fixture(&dir, 17);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let fit = |extra: &[&str], out: &str| {
        let (m, c, o) = (s(&model), s(&corpus), s(&dir.join(out)));
        let mut args = vec!["fit", "--model", &m, "--train", &c, "--out", &o];
        args.extend_from_slice(extra);
        infl(&args)
    };

    let out = fit(&["--device", "gpu"], "f1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("use cpu, cuda or cuda:N"), "{err}");

    let out = fit(&["--engine", "fast", "--device", "cuda:1"], "f2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("--engine fast runs on the CPU only") && err.contains("--device cuda:1"),
        "{err}"
    );
    assert!(
        !dir.join("f2").exists(),
        "nothing is written on a refused run"
    );

    #[cfg(not(feature = "cuda"))]
    {
        let out = fit(&["--device", "cuda"], "f3");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("built without GPU support") && err.contains("--features cuda"),
            "{err}"
        );
    }

    // The autograd engine on `--device cpu` gives the factors of the default autograd run.
    let a = fit(&["--engine", "autograd", "--device", "cpu"], "f4");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = fit(&["--engine", "autograd"], "f5");
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let read = |d: &str| std::fs::read(dir.join(d).join("factors.safetensors")).unwrap();
    assert_eq!(read("f4"), read("f5"));
    let meta = std::fs::read_to_string(dir.join("f4").join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["model"]["engine"], "autograd");
    assert_eq!(meta["model"]["device"], "cpu");
}

#[test]
fn demo_trains_fits_scores_and_measures_recall_of_the_facts() {
    let dir = scratch("demo");
    // One epoch keeps the test short; the README's numbers come from the default run.
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_infl"))
            .args([
                "--quiet",
                "demo",
                "--epochs",
                "1",
                "--strategies",
                "ekfac,identity",
                "--out",
            ])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("query fact_capital_veloria"), "{stdout}");
    assert!(stdout.contains("recall@10"), "{stdout}");
    // A Hugging Face checkpoint the other commands read.
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training.json",
    ] {
        assert!(dir.join("model").join(f).exists(), "{f}");
    }
    let recall: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("recall.json")).unwrap()).unwrap();
    let methods: Vec<&str> = recall["recall"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["ekfac", "identity", "tf-idf (bm25)"]);
    assert_eq!(recall["facts"].as_array().unwrap().len(), 40);
    let at = |m: usize, k: &str| recall["recall"][m][k].as_f64().unwrap();
    // Measured after one epoch: ekfac recall@1 0.95, @10 1.0; every fact query's top-10 is
    // scanned, so these are real ranks, not a formatting check.
    assert!(at(0, "recall_at_10") >= 0.9, "{recall}");
    assert!(at(0, "recall_at_1") >= 0.8, "{recall}");
    for m in 0..3 {
        assert!(at(m, "recall_at_1") <= at(m, "recall_at_10"));
    }
    // The fact's own line, per query, is what is ranked.
    let first = std::fs::read_to_string(dir.join("results-ekfac/top_k.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(first["query_id"], "fact_capital_veloria");
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .contains("The capital of Veloria is Tarn."),
        "{first}"
    );
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("fact_capital_veloria") && html.contains("<svg"));
    // A second run reuses the trained model: same weights, byte for byte.
    let weights = std::fs::read(dir.join("model/model.safetensors")).unwrap();
    let out = run();
    assert!(out.status.success());
    assert_eq!(
        weights,
        std::fs::read(dir.join("model/model.safetensors")).unwrap()
    );
}

/// Low-rank queries, per-layer and per-token parts, self-influence and cosine normalisation,
/// each against an exact counterpart.
#[test]
fn scoring_options_agree_with_exact_references() {
    let dir = scratch("options");
    let (model, corpus, _) = fixture(&dir, 21);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // Queries made from training sequences: prompt = first token, completion = the rest, so
    // the measurement is exactly the sequence's training loss and I(q, z) = I(z, z).
    let seqs: Vec<Vec<u64>> = std::fs::read_to_string(&corpus)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        })
        .collect();
    let picked = [1usize, 4, 9]; // documents of 8, 10 and 7 tokens: one window each
    let mut q = String::new();
    for &d in &picked {
        assert!(seqs[d].len() <= 12 && seqs[d].len() >= 2);
        q.push_str(&format!(
            "{{\"id\": \"z{d}\", \"prompt_ids\": {:?}, \"completion_ids\": {:?}}}\n",
            &seqs[d][..1],
            &seqs[d][1..]
        ));
    }
    let queries = dir.join("self_queries.jsonl");
    std::fs::write(&queries, q).unwrap();
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
    let score = |name: &str, extra: &[&str]| -> (Vec<usize>, Vec<f64>) {
        let out = dir.join(name);
        let mut args = vec![
            "score".to_string(),
            "--model".into(),
            s(&model),
            "--factors".into(),
            s(&factors),
            "--train".into(),
            s(&corpus),
            "--queries".into(),
            s(&queries),
            "--out".into(),
            s(&out),
            "--dense".into(),
            "--top-k".into(),
            "3".into(),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        read_scores(&out.join("scores.safetensors"))
    };
    let (shape, full) = score(
        "full",
        &["--query-rank", "full", "--per-layer", "--per-token"],
    );
    let n = shape[1];
    let scale = full.iter().fold(0f64, |m, x| m.max(x.abs()));

    // Rank 9 reaches every layer's rank (d_in + 1 = 9 or d_out = 8): exact.
    let (_, k9) = score("k9", &["--query-rank", "9"]);
    for (a, b) in full.iter().zip(&k9) {
        assert!((a - b).abs() <= 1e-4 * scale, "rank 9 {b} vs full {a}");
    }
    // Rank 1 is an approximation: different, but still correlated.
    let (_, k1) = score("k1", &["--query-rank", "1"]);
    let worst = full
        .iter()
        .zip(&k1)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst > 1e-3 * scale, "rank 1 should not be exact");

    // Per-layer and per-token parts sum to the score.
    let top = std::fs::read_to_string(dir.join("full/top_k.jsonl")).unwrap();
    for line in top.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let score = e["score"].as_f64().unwrap();
        let layers: f64 = e["per_layer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        let tokens: f64 = e["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["score"].as_f64().unwrap())
            .sum();
        assert!(
            (layers - score).abs() <= 1e-5 * scale,
            "per-layer parts {layers} vs score {score}"
        );
        assert!(
            (tokens - score).abs() <= 1e-4 * scale,
            "per-token parts {tokens} vs score {score}"
        );
    }
    let layers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("full/layers.json")).unwrap())
            .unwrap();
    for (qi, lq) in layers["queries"].as_array().unwrap().iter().enumerate() {
        let total: f64 = lq["total_per_layer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        let row: f64 = full[qi * n..(qi + 1) * n].iter().sum();
        assert!(
            (total - row).abs() <= 1e-4 * scale * n as f64,
            "layer totals {total} vs row sum {row}"
        );
    }

    // Self-influence equals I(q, z) for the query made from z.
    let si = dir.join("self");
    ok(&[
        "self-influence",
        "--model",
        &s(&model),
        "--factors",
        &s(&factors),
        "--train",
        &s(&corpus),
        "--out",
        &s(&si),
    ]);
    let own: Vec<f64> = std::fs::read_to_string(si.join("self_influence.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["self_influence"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(own.len(), n);
    // Column of document d: documents before it with > 12 tokens took two windows.
    let column = |d: usize| (0..d).map(|e| seqs[e].len().div_ceil(12)).sum::<usize>();
    for (qi, &d) in picked.iter().enumerate() {
        let (a, b) = (full[qi * n + column(d)], own[column(d)]);
        assert!(
            b > 0.0 && (a - b).abs() <= 1e-4 * b,
            "I(q,z) {a} vs self-influence {b}"
        );
    }

    // Cosine: bounded by 1, and exactly 1 between a sequence and the query made from it.
    let (_, cos) = score("cos", &["--query-rank", "full", "--normalize", "cosine"]);
    assert!(cos.iter().all(|c| c.abs() <= 1.0 + 1e-4));
    for (qi, &d) in picked.iter().enumerate() {
        assert!((cos[qi * n + column(d)] - 1.0).abs() < 1e-4);
    }
}

#[test]
fn prefilter_scores_only_candidates_and_checks_its_index() {
    let dir = scratch("prefilter");
    let (model, corpus, queries) = fixture(&dir, 31);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (factors, index) = (dir.join("factors"), dir.join("index"));
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
    ok(&[
        "index",
        &s(&corpus),
        "--model",
        &s(&model),
        "--out",
        &s(&index),
    ]);
    let run = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out = dir.join(name);
        let mut args = vec![
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
            &s(&out),
            "--top-k",
            "5",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|x| x.to_string()));
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        std::fs::read_to_string(out.join("top_k.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let exact = run("exact", &[]);
    // A filter as large as the corpus changes nothing.
    let all = run("all", &["--prefilter", "1000", "--index", &s(&index)]);
    assert_eq!(
        exact
            .iter()
            .map(|e| (&e["query_id"], &e["sequence_id"]))
            .collect::<Vec<_>>(),
        all.iter()
            .map(|e| (&e["query_id"], &e["sequence_id"]))
            .collect::<Vec<_>>()
    );
    // Two candidates per query: at most two sequences listed per query and direction, each with
    // the score it has in the exact run.
    let two = run("two", &["--prefilter", "2", "--index", &s(&index)]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("exact/meta.json")).unwrap())
            .unwrap();
    for q in meta["queries"]["ids"].as_array().unwrap() {
        let listed: Vec<&serde_json::Value> = two
            .iter()
            .filter(|e| &e["query_id"] == q && e["direction"] == "top")
            .collect();
        assert!(
            !listed.is_empty() && listed.len() <= 2,
            "{q}: {}",
            listed.len()
        );
    }
    let dense_bad = infl(&[
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
        &s(&dir.join("x")),
        "--prefilter",
        "2",
        "--index",
        &s(&index),
        "--dense",
    ]);
    assert_eq!(dense_bad.status.code(), Some(3));
    // An index of another corpus is refused.
    let other = dir.join("other.jsonl");
    std::fs::write(&other, "{\"ids\": [1, 2, 3]}\n").unwrap();
    let out = infl(&[
        "score",
        "--model",
        &s(&model),
        "--factors",
        &s(&factors),
        "--train",
        &s(&other),
        "--queries",
        &s(&queries),
        "--out",
        &s(&dir.join("x")),
        "--prefilter",
        "2",
        "--index",
        &s(&index),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("another corpus"), "{err}");
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
        // One query, three sequences: all three at each end (top, then bottom).
        assert_eq!(top.lines().count(), 6, "{top}");
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

#[test]
fn an_explicit_layer_list_restricts_fit_and_score() {
    let dir = scratch("layers");
    let (model, corpus, queries) = fixture(&dir, 41);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let chosen = "h.0.mlp.c_fc,h.1.attn.c_proj";
    let factors = dir.join("factors");
    ok(&[
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&corpus),
        "--out",
        &s(&factors),
        "--layers",
        chosen,
        "--fisher",
        "empirical",
    ]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(factors.join("meta.json")).unwrap()).unwrap();
    let names: Vec<&str> = meta["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["h.0.mlp.c_fc", "h.1.attn.c_proj"]);
    let out = dir.join("r");
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
        &s(&out),
        "--per-layer",
    ]);
    let top = std::fs::read_to_string(out.join("top_k.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(top.lines().next().unwrap()).unwrap();
    assert_eq!(first["per_layer"].as_array().unwrap().len(), 2);

    let bad = infl(&[
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&corpus),
        "--out",
        &s(&dir.join("x")),
        "--layers",
        "h.9.mlp.c_fc",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(3), "{err}");
    assert!(
        err.contains("h.9.mlp.c_fc") && err.contains("available"),
        "{err}"
    );
}

/// A long-context model scoring short documents: the memory check follows the sequences
/// actually streamed, not the context length (which once made score refuse everything).
#[test]
fn memory_check_follows_the_streamed_sequences_not_the_context() {
    let dir = scratch("longctx");
    let model = dir.join("model");
    let mut cfg = config(8);
    cfg.n_positions = 200_000;
    Gpt2::random(cfg, 5, ModuleSelection::All)
        .unwrap()
        .save(&model)
        .unwrap();
    let corpus = dir.join("corpus.jsonl");
    std::fs::write(&corpus, "{\"ids\": [1, 2, 3, 4]}\n{\"ids\": [5, 6, 7]}\n").unwrap();
    let queries = dir.join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"prompt_ids\": [1, 2], \"completion_ids\": [3]}\n",
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let factors = dir.join("factors");
    ok(&[
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&corpus),
        "--out",
        &s(&factors),
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
        &s(&dir.join("r")),
    ]);
}

/// `bench --passes-only` times a fit and a full-rank score pass by pass and prints each against
/// its floor: every pass row has FLOPs, a floor and a time, and the total adds them up.
#[test]
fn bench_prints_each_pass_against_its_gemm_bound_floor() {
    let dir = scratch("passes");
    let (model, corpus, queries) = fixture(&dir, 3);
    let bench = dir.join("bench");
    let out = infl(&[
        "bench",
        "--passes-only",
        "--model",
        model.to_str().unwrap(),
        "--train",
        corpus.to_str().unwrap(),
        "--queries",
        queries.to_str().unwrap(),
        "--batch-size",
        "2",
        "--fisher",
        "empirical",
        "--out",
        bench.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Numbers of a row; `-` (a column that does not apply, or a phase too short to time) as None.
    let row = |name: &str| -> Vec<Option<f64>> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` row in:\n{text}"));
        line[name.len()..]
            .split_whitespace()
            .map(|v| (v != "-").then(|| v.trim_end_matches('%').parse::<f64>().unwrap()))
            .collect()
    };
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    let header = text
        .lines()
        .find(|l| l.starts_with("passes against their GEMM-bound floor"))
        .unwrap_or_else(|| panic!("no header in:\n{text}"));
    let best: f64 = header
        .rsplit("best ")
        .next()
        .and_then(|b| b.trim_end_matches(" GF/s").parse().ok())
        .unwrap_or_else(|| panic!("no best rate in {header}"));
    // The passes' driver offers idle points, and the first of them always reads the rate.
    let read: usize = header
        .split("GEMM rate read ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no reading count in {header}"));
    assert!(read >= 1, "{header}");
    let passes = [
        "covariance pass",
        "eigenvalue pass",
        "score: query gradients",
        "score: scoring pass",
    ];
    let mut flops = 0.0;
    for name in passes {
        let r = row(name);
        assert_eq!(
            r.len(),
            7,
            "{name}: FLOP, GF/s, floor s, seconds, floor/actual, vs best, cores"
        );
        // FLOPs from the shapes; on this tiny model a pass can take under the printed 1 ms.
        let (f, rate, floor, secs) = (r[0].unwrap(), r[1].unwrap(), r[2].unwrap(), r[3].unwrap());
        assert!(f > 0.0 && secs >= 0.0, "{name}: {r:?}");
        // The floor is the FLOPs at the pass's rate, which is no faster than the best one;
        // so the ratio at the best rate is the smaller (both rounded to 1%).
        assert!(
            rate > 0.0 && rate <= best + 0.05,
            "{name}: {rate} against {best}"
        );
        assert!(
            (floor - f / (rate * 1e9)).abs() <= 2e-3 * floor + 1e-3,
            "{name}: {r:?}"
        );
        if secs > 0.0 {
            assert!(r[5].unwrap() <= r[4].unwrap() + 1.0, "{name}: {r:?}");
        }
        // CPU time over wall time: no more cores than the machine has.
        if let Some(c) = r[6] {
            assert!((0.0..=cores + 0.05).contains(&c), "{name}: {c} cores");
        }
        flops += f;
    }
    let total = row("fit + score");
    // Each row is printed to 4 significant digits.
    let total_flops = total[0].unwrap();
    assert!(
        (total_flops - flops).abs() <= 1e-3 * flops,
        "{total:?} against {flops}"
    );
    let busy = total[6].expect("the whole job is long enough to time");
    assert!(busy > 0.0 && busy <= cores + 0.05, "{busy} cores");
    // The parts timed apart: the forward/backward and each pass's statistics add up to that
    // pass's FLOPs, and each part was timed.
    let taps = row("forward + activation backward");
    assert_eq!(taps.len(), 5, "{taps:?}");
    for (part, pass) in [
        ("covariance statistics alone", "covariance pass"),
        ("eigenvalue statistics alone", "eigenvalue pass"),
        ("scoring statistics alone", "score: scoring pass"),
    ] {
        let (r, whole) = (row(part), row(pass));
        assert_eq!(
            r.len(),
            5,
            "{part}: FLOP, floor s, seconds, floor/actual, pass/parts"
        );
        let sum = taps[0].unwrap() + r[0].unwrap();
        assert!(
            (sum - whole[0].unwrap()).abs() <= 2e-3 * sum,
            "{part}: {sum} against {pass}'s {:?}",
            whole[0]
        );
        assert!(r[2].unwrap() >= 0.0 && r[4].unwrap() > 0.0, "{part}: {r:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `bench --passes-only --repeat 2` prints a table per run, with one best rate for both, and a
/// summary listing each run's whole-job ratios (at its own rates, and at the best rate) as its
/// own table printed them.
#[test]
fn bench_repeats_print_every_run_and_their_ratios() {
    let dir = scratch("passes-repeat");
    let (model, corpus, queries) = fixture(&dir, 3);
    let bench = dir.join("bench");
    let (model, corpus, queries) = (
        model.to_str().unwrap(),
        corpus.to_str().unwrap(),
        queries.to_str().unwrap(),
    );
    let out_dir = bench.to_str().unwrap();
    let args = |repeat| {
        [
            "bench",
            "--passes-only",
            "--repeat",
            repeat,
            "--model",
            model,
            "--train",
            corpus,
            "--queries",
            queries,
            "--batch-size",
            "2",
            "--fisher",
            "empirical",
            "--out",
            out_dir,
        ]
    };
    let zero = infl(&args("0"));
    assert_eq!(zero.status.code(), Some(2), "--repeat 0 is a usage error");
    let out = infl(&args("2"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("passes against their GEMM-bound floor"))
        .collect();
    assert_eq!(headers.len(), 2, "{text}");
    assert!(headers[0].contains("(run 1 of 2)") && headers[1].contains("(run 2 of 2)"));
    // One best rate for both tables.
    let best = |h: &str| h.rsplit("best ").next().unwrap().to_string();
    assert_eq!(best(headers[0]), best(headers[1]));
    // Each run's whole-job ratios: at the rates read during it, and at the best rate.
    let per_run: Vec<(String, String)> = text
        .lines()
        .filter(|l| l.starts_with("fit + score ") && !l.contains(" over "))
        .map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            (v[7].to_string(), v[8].to_string())
        })
        .collect();
    assert_eq!(per_run.len(), 2, "{text}");
    let summary = text
        .lines()
        .find(|l| l.starts_with("fit + score over 2 runs"))
        .unwrap_or_else(|| panic!("no summary in:\n{text}"));
    assert!(
        summary.contains(&format!(
            "floor/actual {}, {} (median ",
            per_run[0].0, per_run[1].0
        )) && summary.contains(&format!(
            " GF/s {}, {} (median ",
            per_run[0].1, per_run[1].1
        )),
        "{summary} against {per_run:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
