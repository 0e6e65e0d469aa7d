//! Scale-out: shards run as separate processes merge to the single run; a run killed with
//! SIGKILL mid-pass resumes to byte-identical output; the thread count changes nothing; bad
//! checkpoints and incomplete merges are refused.

mod common;

use common::{bin, kill_when, max_rel_diff_where, ok, run, s};
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    common::scratch("scale", name)
}

/// A random GPT-2 and a pre-tokenised corpus of 61 documents (some cut into two windows).
fn fixture(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    common::random_gpt2(
        dir,
        3,
        61,
        |d| 2 + d * 11 % 23,
        |d, t| d * 7 + t * 5 + t * t,
    )
}

/// Largest |x − y| / max|x| over every tensor of two safetensors files with the same names.
fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    max_rel_diff_where(a, b, |_| true)
}

fn top_ids(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["query_id"].as_str().unwrap().to_string(),
                v["direction"].as_str().unwrap().to_string(),
                v["sequence_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn fit_args<'a>(
    model: &'a Path,
    corpus: &'a Path,
    out: &'a Path,
    strategy: &'a str,
) -> Vec<&'a str> {
    vec![
        "fit",
        "--model",
        s(model),
        "--train",
        s(corpus),
        "--out",
        s(out),
        "--strategy",
        strategy,
        "--max-len",
        "16",
        "--batch-size",
        "4",
    ]
}

/// Runs `args` once per shard, all N processes at the same time.
fn shards(args: &[&str], n: usize) {
    let children: Vec<_> = (0..n)
        .map(|i| {
            let spec = format!("{i}/{n}");
            bin()
                .args(args)
                .args(["--shard", &spec])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "shard of {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn three_shard_processes_merge_to_the_single_run() {
    let dir = scratch("shards");
    let (model, corpus, queries) = fixture(&dir);
    for strategy in ["ekfac", "diagonal", "kfac"] {
        let single = dir.join(format!("single-{strategy}"));
        ok(&fit_args(&model, &corpus, &single, strategy));
        let sharded = dir.join(format!("sharded-{strategy}"));
        let args = fit_args(&model, &corpus, &sharded, strategy);
        shards(&args, 3);
        let merged = ok(&["merge", s(&sharded)]);
        if strategy == "ekfac" {
            // The eigenvalue pass needs the merged eigenbases: a second round.
            assert!(!sharded.join("factors.safetensors").exists());
            assert!(String::from_utf8_lossy(&merged.stderr).is_empty()); // --quiet
            shards(&args, 3);
            ok(&["merge", s(&sharded)]);
        }
        // A, S, their eigenvalues and Λ agree to f32 rounding. Eigenvectors are another
        // matter: a perturbation δ of A turns those of eigenvalues a gap g apart by ≈ δ/g, and
        // the summation order alone (other batches) perturbs A by ~1e-7; so they get a looser
        // bound here, and the scores they produce are compared below.
        let (a, b) = (
            single.join("factors.safetensors"),
            sharded.join("factors.safetensors"),
        );
        let d = max_rel_diff_where(&a, &b, |n| !n.contains(".Q_"));
        assert!(d < 1e-6, "{strategy}: sharded factors differ by {d:e}");
        let dq = max_rel_diff_where(&a, &b, |n| n.contains(".Q_"));
        assert!(
            dq < 1e-3,
            "{strategy}: sharded eigenvectors differ by {dq:e}"
        );
        assert!(!sharded.join("work").exists(), "work state removed");
    }

    // Scores of 3 shards merged = the single run: dense matrix, top-k order, summaries.
    let factors = dir.join("single-ekfac");
    let score_args = |out: &Path| -> Vec<String> {
        [
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
            s(out),
            "--dense",
            "--top-k",
            "5",
            "--batch-size",
            "4",
            "--per-layer",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let single = dir.join("scores-single");
    let a = score_args(&single);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let sharded = dir.join("scores-sharded");
    let b = score_args(&sharded);
    shards(&b.iter().map(String::as_str).collect::<Vec<_>>(), 3);
    ok(&["merge", s(&sharded)]);
    let d = max_rel_diff(
        &single.join("scores.safetensors"),
        &sharded.join("scores.safetensors"),
    );
    assert!(d < 1e-6, "sharded dense scores differ by {d:e}");
    // Scores through the factors of the sharded fit, end to end.
    let via_sharded_fit = dir.join("scores-sharded-fit");
    let mut c: Vec<String> = score_args(&via_sharded_fit);
    let at = c.iter().position(|x| x == "--factors").unwrap() + 1;
    c[at] = dir.join("sharded-ekfac").display().to_string();
    ok(&c.iter().map(String::as_str).collect::<Vec<_>>());
    let d = max_rel_diff(
        &single.join("scores.safetensors"),
        &via_sharded_fit.join("scores.safetensors"),
    );
    eprintln!("scores through sharded vs single ekfac factors: max rel diff {d:e}");
    assert!(d < 1e-5, "scores through sharded factors differ by {d:e}");
    assert_eq!(
        top_ids(&single.join("top_k.jsonl")),
        top_ids(&sharded.join("top_k.jsonl"))
    );
    let dist = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("distribution.json")).unwrap())
            .unwrap()
    };
    let (da, db) = (dist(&single), dist(&sharded));
    for q in 0..2 {
        for field in ["count", "sum", "sum_sq", "sum_pos", "min", "max"] {
            let x = da["queries"][q][field].as_f64().unwrap();
            let y = db["queries"][q][field].as_f64().unwrap();
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1e-12),
                "query {q} {field}: {x} vs {y}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merge_refuses_missing_shards_and_mixed_settings() {
    let dir = scratch("refuse");
    let (model, corpus, _) = fixture(&dir);
    let out = dir.join("f");
    let args = fit_args(&model, &corpus, &out, "kfac");
    let mut first = args.clone();
    first.extend(["--shard", "0/2"]);
    ok(&first);
    let r = run(&["merge", s(&out)]);
    assert_eq!(r.status.code(), Some(3));
    let msg = String::from_utf8_lossy(&r.stderr);
    assert!(msg.contains("shard(s) 1 (not started) of 2"), "{msg}");
    // Shard 1 with another seed: its state would not belong with shard 0's.
    let mut other = args.clone();
    other.extend(["--shard", "1/2", "--seed", "7"]);
    let r = run(&other);
    assert_eq!(
        r.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("other settings"));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bundled() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    (
        root.join("assets/tiny-gpt2"),
        root.join("tests/fixtures/kronfluence/corpus_ids.jsonl"),
    )
}

#[test]
fn fit_killed_mid_pass_resumes_to_identical_factors() {
    let dir = scratch("kill-fit");
    let (model, corpus) = bundled();
    let args = |out: &Path| -> Vec<String> {
        [
            "fit",
            "--model",
            s(&model),
            "--train",
            s(&corpus),
            "--out",
            s(out),
            "--max-len",
            "48",
            "--batch-size",
            "4",
            "--threads",
            "1",
            "--checkpoint-every",
            "16",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let clean = dir.join("clean");
    ok(&args(&clean).iter().map(String::as_str).collect::<Vec<_>>());

    let killed = dir.join("killed");
    let a = args(&killed);
    let work = killed.join("work");
    // Killed once in each pass, after a checkpoint was committed.
    assert!(kill_when(&a, &work.join("covariance.0-of-1.json")));
    assert!(!killed.join("factors.safetensors").exists());
    assert!(kill_when(&a, &work.join("eigenvalue.0-of-1.json")));
    let last = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        String::from_utf8_lossy(&last.stderr).contains("resuming the eigenvalue pass"),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    assert_eq!(
        std::fs::read(clean.join("factors.safetensors")).unwrap(),
        std::fs::read(killed.join("factors.safetensors")).unwrap(),
        "resumed factors are byte-identical"
    );

    // A corrupt checkpoint is reported (exit 4), never used; --fresh starts over.
    let broken = dir.join("broken");
    let b = args(&broken);
    assert!(kill_when(&b, &broken.join("work/covariance.0-of-1.json")));
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(broken.join("work/covariance.0-of-1.json")).unwrap(),
    )
    .unwrap();
    let payload = broken.join("work").join(manifest["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&payload).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&payload, bytes).unwrap();
    let r = run(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&r.stderr).contains("corrupt checkpoint"));
    let mut fresh = b.clone();
    fresh.push("--fresh".into());
    ok(&fresh.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        std::fs::read(clean.join("factors.safetensors")).unwrap(),
        std::fs::read(broken.join("factors.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn score_killed_mid_pass_resumes_to_identical_results() {
    let dir = scratch("kill-score");
    let (model, corpus) = bundled();
    let queries = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kronfluence/queries_ids.jsonl");
    let factors = dir.join("factors");
    ok(&[
        "fit",
        "--model",
        s(&model),
        "--train",
        s(&corpus),
        "--out",
        s(&factors),
        "--max-len",
        "48",
        "--strategy",
        "kfac",
    ]);
    let args = |out: &Path| -> Vec<String> {
        [
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
            s(out),
            "--dense",
            "--batch-size",
            "4",
            "--threads",
            "1",
            "--checkpoint-every",
            "16",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let clean = dir.join("clean");
    ok(&args(&clean).iter().map(String::as_str).collect::<Vec<_>>());
    let killed = dir.join("killed");
    let a = args(&killed);
    assert!(kill_when(&a, &killed.join("work/score.0-of-1.json")));
    let last = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(String::from_utf8_lossy(&last.stderr).contains("resuming the scoring pass"));
    for f in ["scores.safetensors", "top_k.jsonl", "distribution.json"] {
        assert_eq!(
            std::fs::read(clean.join(f)).unwrap(),
            std::fs::read(killed.join(f)).unwrap(),
            "{f} differs after resuming"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn thread_count_does_not_change_factors() {
    let dir = scratch("threads");
    let (model, corpus, _) = fixture(&dir);
    let one = dir.join("one");
    let two = dir.join("two");
    let mut a = fit_args(&model, &corpus, &one, "ekfac");
    a.extend(["--threads", "1"]);
    ok(&a);
    let mut b = fit_args(&model, &corpus, &two, "ekfac");
    b.extend(["--threads", "3"]);
    ok(&b);
    assert_eq!(
        std::fs::read(one.join("factors.safetensors")).unwrap(),
        std::fs::read(two.join("factors.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
