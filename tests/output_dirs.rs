//! Output directories are owned, locked and never silently mixed: the hostile cases of issue 34
//! ("Output directories"), each run through the binary on a tiny random GPT-2.

mod common;

use common::{ok, random_gpt2, run, s};
use std::path::{Path, PathBuf};
use std::process::Output;

fn scratch(name: &str) -> PathBuf {
    common::scratch("outdirs", name)
}

/// Model, corpus of `n_docs` documents and two queries in `dir`.
fn inputs(dir: &Path, n_docs: u32) -> (PathBuf, PathBuf, PathBuf) {
    random_gpt2(dir, 7, n_docs, |d| 5 + d % 9, |d, t| d * 7 + t * 3 + 1)
}

fn fit_args(model: &Path, corpus: &Path, out: &Path, strategy: &str) -> Vec<String> {
    [
        "fit",
        "--model",
        s(model),
        "--train",
        s(corpus),
        "--out",
        s(out),
        "--strategy",
        strategy,
        "--fisher",
        "empirical",
    ]
    .map(String::from)
    .to_vec()
}

fn score_args(
    model: &Path,
    factors: &Path,
    corpus: &Path,
    queries: &Path,
    out: &Path,
) -> Vec<String> {
    [
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
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Asserts exit 4 with every one of `needles` in the message; returns the message.
fn refused(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "expected exit 4, got:\n{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from:\n{err}");
    }
    err
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A pid no process has now: one of a child that has exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn score_into_its_own_factors_directory_is_refused() {
    let dir = scratch("score-into-factors");
    let (model, corpus, queries) = inputs(&dir, 12);
    let factors = dir.join("factors");
    ok(&strs(&fit_args(&model, &corpus, &factors, "ekfac")));
    let meta = read(&factors.join("meta.json"));
    let out = run(&strs(&score_args(
        &model, &factors, &corpus, &queries, &factors,
    )));
    refused(&out, &["holds factors", "another --out", "--overwrite"]);
    assert_eq!(read(&factors.join("meta.json")), meta, "factors untouched");
    assert!(!factors.join("top_k.jsonl").exists());
    // The factors still score.
    ok(&strs(&score_args(
        &model,
        &factors,
        &corpus,
        &queries,
        &dir.join("r"),
    )));
}

#[test]
fn fit_into_a_results_directory_is_refused_and_overwrite_replaces_it() {
    let dir = scratch("fit-into-results");
    let (model, corpus, queries) = inputs(&dir, 12);
    let factors = dir.join("factors");
    ok(&strs(&fit_args(&model, &corpus, &factors, "ekfac")));
    let results = dir.join("results");
    ok(&strs(&score_args(
        &model, &factors, &corpus, &queries, &results,
    )));
    let meta = read(&results.join("meta.json"));
    std::fs::write(results.join("notes.txt"), "mine").unwrap();
    let out = run(&strs(&fit_args(&model, &corpus, &results, "kfac")));
    refused(&out, &["holds scores", "--overwrite"]);
    assert_eq!(read(&results.join("meta.json")), meta, "results untouched");
    // --overwrite removes every file of the scores, and nothing infl did not write.
    let mut args = fit_args(&model, &corpus, &results, "kfac");
    args.push("--overwrite".into());
    ok(&strs(&args));
    for stale in ["top_k.jsonl", "distribution.json"] {
        assert!(!results.join(stale).exists(), "{stale} left behind");
    }
    assert!(results.join("factors.safetensors").exists());
    assert_eq!(read(&results.join("notes.txt")), b"mine");
    let m: serde_json::Value = serde_json::from_slice(&read(&results.join("meta.json"))).unwrap();
    assert_eq!(m["kind"], "factors");
}

#[test]
fn fit_with_other_settings_over_a_finished_fit_is_refused() {
    let dir = scratch("fit-other-settings");
    let (model, corpus, _) = inputs(&dir, 12);
    let factors = dir.join("factors");
    ok(&strs(&fit_args(&model, &corpus, &factors, "ekfac")));
    let st = read(&factors.join("factors.safetensors"));
    let out = run(&strs(&fit_args(&model, &corpus, &factors, "kfac")));
    refused(&out, &["other settings", "options", "--overwrite"]);
    assert_eq!(read(&factors.join("factors.safetensors")), st);
    // The same settings redo the fit, as before.
    ok(&strs(&fit_args(&model, &corpus, &factors, "ekfac")));
}

#[test]
fn rescoring_with_other_queries_is_refused_and_leaves_no_stale_files() {
    let dir = scratch("rescore");
    let (model, corpus, queries) = inputs(&dir, 12);
    let factors = dir.join("factors");
    ok(&strs(&fit_args(&model, &corpus, &factors, "ekfac")));
    let results = dir.join("results");
    let mut first = score_args(&model, &factors, &corpus, &queries, &results);
    first.extend(["--per-layer".into(), "--dense".into()]);
    ok(&strs(&first));
    assert!(results.join("layers.json").exists() && results.join("scores.safetensors").exists());
    let other = dir.join("other.jsonl");
    std::fs::write(
        &other,
        "{\"id\": \"c\", \"prompt_ids\": [3, 4], \"completion_ids\": [6]}\n",
    )
    .unwrap();
    let second = score_args(&model, &factors, &corpus, &other, &results);
    let out = run(&strs(&second));
    refused(&out, &["other settings", "queries_sha256", "--overwrite"]);
    let mut replace = second.clone();
    replace.push("--overwrite".into());
    ok(&strs(&replace));
    assert!(!results.join("layers.json").exists(), "stale layers.json");
    assert!(!results.join("scores.safetensors").exists(), "stale scores");
    let top = String::from_utf8(read(&results.join("top_k.jsonl"))).unwrap();
    assert!(top.contains("\"c\"") && !top.contains("\"a\""), "{top}");
}

#[test]
fn a_second_fit_into_the_same_directory_stops_naming_the_holder() {
    let dir = scratch("concurrent");
    // Long enough that the first fit still runs when the second starts.
    let (model, corpus, _) = inputs(&dir, 4000);
    let factors = dir.join("factors");
    let args = fit_args(&model, &corpus, &factors, "ekfac");
    let mut first = common::bin()
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lock = factors.join(".infl.lock");
    let pid = first.id().to_string();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&lock)
        .map(|t| t.trim() != pid)
        .unwrap_or(true)
    {
        assert!(
            started.elapsed().as_secs() < 60,
            "the first fit never locked"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = run(&strs(&args));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first fit ended before the second started: make the corpus longer"
    );
    refused(
        &second,
        &["in use by another infl process", &format!("pid {pid}")],
    );
    let status = first.wait().unwrap();
    assert!(status.success(), "the first fit was disturbed");
    assert!(factors.join("factors.safetensors").exists());
}

#[test]
fn temporary_files_of_a_dead_process_are_swept() {
    let dir = scratch("temps");
    let (model, corpus, _) = inputs(&dir, 12);
    let factors = dir.join("factors");
    ok(&strs(&fit_args(&model, &corpus, &factors, "ekfac")));
    let pid = dead_pid();
    let stale = [
        factors.join(format!(".meta.json.tmp-{pid}")),
        factors.join(format!(".factors.safetensors.tmp-{pid}")),
    ];
    for p in &stale {
        std::fs::write(p, b"half-written").unwrap();
    }
    std::fs::create_dir_all(factors.join(format!(".store.tmp-{pid}"))).unwrap();
    ok(&strs(&fit_args(&model, &corpus, &factors, "ekfac")));
    for p in &stale {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(!factors.join(format!(".store.tmp-{pid}")).exists());
}

#[test]
fn a_directory_infl_did_not_write_is_refused() {
    let dir = scratch("foreign");
    let (model, corpus, _) = inputs(&dir, 12);
    // The model's own directory, for example.
    for overwrite in [false, true] {
        let mut args = fit_args(&model, &corpus, &model, "ekfac");
        if overwrite {
            args.push("--overwrite".into());
        }
        refused(&run(&strs(&args)), &["not an infl output"]);
    }
    assert!(model.join("config.json").exists() && !model.join("meta.json").exists());
}
