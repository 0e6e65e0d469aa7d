//! Helpers shared by the end-to-end tests that drive the `infl` binary.
// Each test file uses its own subset.
#![allow(dead_code)]

use infl::model::gpt2::{Gpt2, Gpt2Config};
use infl::model::ModuleSelection;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A fresh scratch directory for one test. The suite's directories that earlier test
/// processes left (a test's output is kept for inspection when it fails, and a process-wide
/// fixture is never dropped) are removed once their process has exited.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    sweep_exited(suite);
    let dir = std::env::temp_dir().join(format!("infl-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes `infl-{suite}-{pid}-*` scratch directories whose process no longer runs (Linux,
/// where /proc says so; elsewhere nothing is removed).
fn sweep_exited(suite: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!("infl-{suite}-");
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The `infl` binary, quiet.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infl"));
    c.arg("--quiet");
    c
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the infl binary runs")
}

/// Runs `infl args`, failing the test with its stderr when it fails.
pub fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "infl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A random 2-block GPT-2 of width 12 (vocab 37, context 16) saved under `dir/model`, a
/// pre-tokenised corpus of `n_docs` documents (document d has `len(d)` tokens, token t being
/// `token(d, t) % 37`) and two pre-tokenised queries.
pub fn random_gpt2(
    dir: &Path,
    seed: u64,
    n_docs: u32,
    len: impl Fn(u32) -> u32,
    token: impl Fn(u32, u32) -> u32,
) -> (PathBuf, PathBuf, PathBuf) {
    let model = dir.join("model");
    let config = Gpt2Config {
        vocab_size: 37,
        n_positions: 16,
        n_embd: 12,
        n_layer: 2,
        n_head: 2,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        reorder_and_upcast_attn: false,
    };
    Gpt2::random(config, seed, ModuleSelection::All)
        .unwrap()
        .save(&model)
        .unwrap();
    let mut corpus = String::new();
    for d in 0..n_docs {
        let ids: Vec<u32> = (0..len(d)).map(|t| token(d, t) % 37).collect();
        corpus.push_str(&format!("{{\"ids\": {ids:?}}}\n"));
    }
    let corpus_path = dir.join("corpus.jsonl");
    std::fs::write(&corpus_path, corpus).unwrap();
    let queries = dir.join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"id\": \"a\", \"prompt_ids\": [1, 2, 3], \"completion_ids\": [4, 5]}\n\
         {\"id\": \"b\", \"prompt_ids\": [9], \"completion_ids\": [10, 11, 12]}\n",
    )
    .unwrap();
    (model, corpus_path, queries)
}

/// A committed tiny model of `tests/fixtures/families` (checkpoint directory or GGUF file).
/// CARGO_MANIFEST_DIR is read at run time first: a test binary run outside cargo, on another
/// machine (bench/gpu_run.sh), finds the repository there.
pub fn family_fixture(name: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("tests/fixtures/families")
        .join(name)
}

/// max |x − reference| over a tensor, divided by max |reference| (the difference itself when
/// the reference is zero).
pub fn rel_diff(x: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(x.len(), reference.len());
    let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = x
        .iter()
        .zip(reference)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Starts `args`, waits until `marker` exists (a checkpoint was committed), then SIGKILLs it.
/// Returns false when the process finished before the marker appeared.
pub fn kill_when(args: &[String], marker: &Path) -> bool {
    let mut child = bin().args(args).spawn().unwrap();
    let started = Instant::now();
    loop {
        if marker.exists() {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            return true;
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            return false;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The largest difference between the tensors of two safetensors files whose name passes
/// `keep`, relative to each tensor's largest magnitude.
pub fn max_rel_diff_where(a: &Path, b: &Path, keep: impl Fn(&str) -> bool) -> f64 {
    let ta = infl::io::read_safetensors(a).unwrap();
    let tb = infl::io::read_safetensors(b).unwrap();
    assert_eq!(
        ta.keys().collect::<std::collections::BTreeSet<_>>(),
        tb.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let mut worst = 0f64;
    for (name, (shape, x)) in ta.iter().filter(|(n, _)| keep(n)) {
        let (shape_b, y) = &tb[name];
        assert_eq!(shape, shape_b, "{name}");
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (u, v) in x.iter().zip(y) {
            worst = worst.max((u - v).abs() / scale);
        }
    }
    worst
}

/// The first `lines` documents of the bundled demo corpus and their fact queries, written to
/// `dir/corpus.jsonl` and `dir/queries.jsonl`: a corpus a tiny `infl train` model learns in
/// seconds.
pub fn demo_subset(dir: &Path, lines: usize) -> (PathBuf, PathBuf) {
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
            let q: serde_json::Value = serde_json::from_str(l).unwrap();
            q["source_line"]
                .as_u64()
                .is_some_and(|n| n as usize <= lines)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let (c, q) = (dir.join("corpus.jsonl"), dir.join("queries.jsonl"));
    std::fs::write(&c, corpus).unwrap();
    std::fs::write(&q, queries).unwrap();
    (c, q)
}

/// The bundled model with the demo corpus and queries: (model, corpus, queries).
pub fn bundled() -> (PathBuf, PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    (
        root.join("assets/tiny-gpt2"),
        root.join("assets/demo/corpus.jsonl"),
        root.join("assets/demo/queries.jsonl"),
    )
}

/// The window and batch options the bundled model's pre-filter tests fit, index and score with.
pub const BUNDLED_WINDOWS: [&str; 4] = ["--max-len", "48", "--batch-size", "8"];

/// `infl score` of the queries against the corpus with `fitted_and_indexed`'s paths (model,
/// corpus, queries, factors), top 10, in its 48-token windows, into `out`, with `extra` flags.
pub fn bundled_score_args<'a>(
    (model, corpus, queries, factors): (&'a Path, &'a Path, &'a Path, &'a Path),
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "score",
        "--model",
        s(model),
        "--factors",
        s(factors),
        "--train",
        s(corpus),
        "--queries",
        s(queries),
        "--out",
        s(out),
        "--top-k",
        "10",
    ];
    a.extend(BUNDLED_WINDOWS);
    a.extend(extra);
    a
}

/// The bundled model fitted into `DIR/factors` and its demo corpus indexed into `DIR/index`
/// (48-token windows): (model, corpus, queries, factors, index).
pub fn fitted_and_indexed(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    let (model, corpus, queries) = bundled();
    let (factors, index) = (dir.join("factors"), dir.join("index"));
    let mut fit = vec![
        "fit",
        "--model",
        s(&model),
        "--train",
        s(&corpus),
        "--out",
        s(&factors),
    ];
    fit.extend(BUNDLED_WINDOWS);
    ok(&fit);
    ok(&[
        "index",
        s(&corpus),
        "--model",
        s(&model),
        "--out",
        s(&index),
        "--max-len",
        "48",
    ]);
    (model, corpus, queries, factors, index)
}

/// A file's JSON.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `infl train` of a one-block, 16-wide GPT-2 (vocabulary 300, 64 positions, batch 8) on
/// `corpus` for `epochs`, into `model`: the validate tests' retrainable model.
pub fn train_tiny(corpus: &Path, model: &Path, epochs: &str) {
    ok(&[
        "train",
        "--train",
        s(corpus),
        "--out",
        s(model),
        "--vocab-size",
        "300",
        "--n-embd",
        "16",
        "--n-head",
        "2",
        "--n-layer",
        "1",
        "--n-positions",
        "64",
        "--epochs",
        epochs,
        "--batch-size",
        "8",
    ]);
}
