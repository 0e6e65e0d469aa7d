//! Layer partitions (`fit --partition i/P`, `--partitions P`, `--memory-limit`): a fit run a
//! partition of the tracked layers at a time writes the very factors an unpartitioned fit
//! writes (the same bytes), in one process or in several (with shards inside a partition),
//! and a partition killed mid-pass resumes to the same bytes.

mod common;

use common::{kill_when, max_rel_diff_where, ok, run, s};
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    common::scratch("partitions", name)
}

fn bundled() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    (
        root.join("assets/tiny-gpt2"),
        root.join("tests/fixtures/kronfluence/corpus_ids.jsonl"),
    )
}

/// `infl fit` on the bundled model (EK-FAC, every layer) into `out`, with `extra` options.
fn fit_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let (model, corpus) = bundled();
    let mut a: Vec<String> = [
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
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Runs `infl fit` (not quiet: the tests read what it says), failing on an error.
fn fit(out: &Path, extra: &[&str]) -> String {
    loud(&fit_args(out, extra))
}

/// Runs infl with `args`, not quiet, and returns its stderr; fails the test if infl fails.
fn loud(args: &[String]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infl"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "infl {args:?} failed:\n{stderr}");
    stderr
}

fn same_factors(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::read(a.join("factors.safetensors")).unwrap(),
        std::fs::read(b.join("factors.safetensors")).unwrap(),
        "factors.safetensors of {} and {} differ",
        a.display(),
        b.display()
    );
    let meta = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("meta.json")).unwrap()).unwrap()
    };
    assert_eq!(meta(a), meta(b));
    assert!(!b.join("work").exists(), "the partitions' work is removed");
}

#[test]
fn partitions_in_one_process_or_several_write_the_unpartitioned_factors() {
    let dir = scratch("equal");
    let whole = dir.join("whole");
    fit(&whole, &[]);

    // One process, three partitions in turn.
    let three = dir.join("three");
    let said = fit(&three, &["--partitions", "3"]);
    assert!(said.contains("partition 2/3: "), "{said}");
    assert!(said.contains("in 3 partitions"), "{said}");
    same_factors(&whole, &three);

    // Separate processes, one of them sharded, then `infl merge`.
    let split = dir.join("split");
    let first = fit(&split, &["--partition", "0/3"]);
    assert!(first.contains("infl merge"), "{first}");
    fit(&split, &["--partition", "2/3"]);
    // Merging before partition 1 is done says which is missing, and writes nothing.
    let said = loud(&["merge".to_string(), s(&split).to_string()]);
    assert!(said.contains("partition 1/3: not started"), "{said}");
    assert!(!split.join("factors.safetensors").exists());
    for shard in ["0/2", "1/2"] {
        fit(&split, &["--partition", "1/3", "--shard", shard]);
    }
    // The shards' covariance pass is merged, then their eigenvalue pass runs, then the join.
    ok(&["merge", s(&split)]);
    for shard in ["0/2", "1/2"] {
        fit(&split, &["--partition", "1/3", "--shard", shard]);
    }
    ok(&["merge", s(&split)]);
    // The sharded partition's sums were added in another order: f32 rounding.
    let (a, b) = (
        whole.join("factors.safetensors"),
        split.join("factors.safetensors"),
    );
    let d = max_rel_diff_where(&a, &b, |n| !n.contains(".Q_"));
    assert!(d < 1e-6, "partitioned factors differ by {d:e}");
    assert!(
        !split.join("work").exists(),
        "the partitions' work is removed"
    );
    // Eigenvectors of (near-)repeated eigenvalues are any basis of their space, and this
    // model has such, so they are compared by what they are for: the scores.
    let scores = |factors: &Path| {
        let (model, corpus) = bundled();
        let out = factors.with_extension("scores");
        ok(&[
            "score",
            "--model",
            s(&model),
            "--factors",
            s(factors),
            "--train",
            s(&corpus),
            "--queries",
            s(&corpus.with_file_name("queries_ids.jsonl")),
            "--out",
            s(&out),
            "--dense",
        ]);
        out.join("scores.safetensors")
    };
    let d = max_rel_diff_where(&scores(&whole), &scores(&split), |_| true);
    assert!(
        d < 1e-5,
        "scores from the partitioned factors differ by {d:e}"
    );

    // Another partition count in the same directory is refused (exit 4).
    let other = dir.join("other");
    fit(&other, &["--partition", "0/2"]);
    let r = run(&fit_args(&other, &["--partition", "1/3"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(
        r.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn a_partition_killed_mid_pass_resumes_to_the_same_factors() {
    let dir = scratch("kill");
    let whole = dir.join("whole");
    fit(&whole, &[]);
    let killed = dir.join("killed");
    let a = fit_args(
        &killed,
        &[
            "--partitions",
            "2",
            "--threads",
            "1",
            "--checkpoint-every",
            "16",
        ],
    );
    let work = killed.join("work/partition-1-of-2/work");
    // Killed in each pass of the second partition, after a checkpoint was committed there.
    assert!(kill_when(&a, &work.join("covariance.0-of-1.json")));
    assert!(kill_when(&a, &work.join("eigenvalue.0-of-1.json")));
    let last = loud(&a);
    assert!(last.contains("resuming the eigenvalue pass"), "{last}");
    same_factors(&whole, &killed);
}

#[test]
fn a_memory_limit_picks_the_partition_count_or_says_it_cannot() {
    let dir = scratch("limit");
    // Far too little: even one layer per partition does not fit (usage error, exit 2).
    let r = run(&fit_args(&dir.join("tiny"), &["--memory-limit", "1K"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(
        r.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("even one layer"));
    // Plenty: one partition, the unpartitioned factors.
    let whole = dir.join("whole");
    fit(&whole, &[]);
    let roomy = dir.join("roomy");
    let said = fit(&roomy, &["--memory-limit", "64G"]);
    assert!(said.contains("in 1 partitions"), "{said}");
    same_factors(&whole, &roomy);
}
