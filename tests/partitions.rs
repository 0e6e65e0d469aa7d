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
/// [`run`] with owned arguments (what `fit_args` and `score_args` make).
fn run_owned(args: &[String]) -> std::process::Output {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

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
    let r = run_owned(&fit_args(&other, &["--partition", "1/3"]));
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
    let r = run_owned(&fit_args(&dir.join("tiny"), &["--memory-limit", "1K"]));
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

/// `infl score` on the bundled model and queries with `factors`, into `out`, with `extra`.
fn score_args(factors: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let (model, corpus) = bundled();
    let mut a: Vec<String> = [
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
        s(out),
        "--max-len",
        "48",
        "--batch-size",
        "4",
        "--top-k",
        "5",
        "--per-layer",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn score(factors: &Path, out: &Path, extra: &[&str]) -> String {
    loud(&score_args(factors, out, extra))
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The files of two results directories are the same bytes (`meta.json` the same but for the
/// queries' self-influence, summed over the partitions in another grouping: ≤ 1e-12).
fn same_results(a: &Path, b: &Path, files: &[&str]) {
    for f in files {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        if x != y {
            let (x, y) = (String::from_utf8_lossy(&x), String::from_utf8_lossy(&y));
            let first = x.lines().zip(y.lines()).find(|(u, v)| u != v);
            panic!(
                "{f} of {} and {} differ, first at: {first:?}",
                a.display(),
                b.display()
            );
        }
    }
    let (mut ma, mut mb) = (
        read_json(&a.join("meta.json")),
        read_json(&b.join("meta.json")),
    );
    let own = |m: &mut serde_json::Value| -> Vec<f64> {
        let v = m["queries"]["self_influence"].take();
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (x, y) in own(&mut ma).iter().zip(own(&mut mb)) {
        assert!(
            (x - y).abs() <= 1e-12 * x.abs(),
            "self-influence {x} vs {y}"
        );
    }
    assert_eq!(ma, mb);
    assert!(!b.join("work").exists(), "the partitions' work is removed");
}

/// Factors of the bundled model, fitted once for the scoring tests of this file.
fn scoring_factors() -> PathBuf {
    static FACTORS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FACTORS
        .get_or_init(|| {
            let out = scratch("score-factors");
            fit(&out, &[]);
            out
        })
        .clone()
}

#[test]
fn partitioned_scores_equal_the_unpartitioned_scores() {
    let factors = scoring_factors();
    let dir = scratch("score-equal");
    let whole = dir.join("whole");
    score(&factors, &whole, &["--dense"]);
    let files = [
        "top_k.jsonl",
        "distribution.json",
        "layers.json",
        "scores.safetensors",
    ];

    // One process, three partitions in turn, joined as it ends.
    let three = dir.join("three");
    let said = score(&factors, &three, &["--dense", "--partitions", "3"]);
    assert!(said.contains("partition 2/3: "), "{said}");
    same_results(&whole, &three, &files);

    // Separate processes, one partition sharded, then `infl merge`.
    let split = dir.join("split");
    let first = score(&factors, &split, &["--dense", "--partition", "0/3"]);
    assert!(first.contains("infl merge"), "{first}");
    score(&factors, &split, &["--dense", "--partition", "2/3"]);
    let early = run(&["merge", s(&split)]);
    assert_ne!(early.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("partition 2/3"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    assert!(!split.join("top_k.jsonl").exists());
    // The other partitions are not sharded: shard 0/1 is their whole pass. A sharded
    // partition needs every partition sharded the same way, so shard all three.
    // Sharded results add the shards' sums in another order than one pass: the reference is
    // the unpartitioned run sharded the same way.
    let whole_sharded = dir.join("whole-sharded");
    for shard in ["0/2", "1/2"] {
        score(&factors, &whole_sharded, &["--dense", "--shard", shard]);
    }
    ok(&["merge", s(&whole_sharded)]);
    let sharded = dir.join("sharded");
    for p in ["0/3", "1/3", "2/3"] {
        for shard in ["0/2", "1/2"] {
            score(
                &factors,
                &sharded,
                &["--dense", "--partition", p, "--shard", shard],
            );
        }
    }
    ok(&["merge", s(&sharded)]);
    same_results(&whole_sharded, &sharded, &files);
    score(&factors, &split, &["--dense", "--partition", "1/3"]);
    ok(&["merge", s(&split)]);
    same_results(&whole, &split, &files);

    // Cosine normalisation divides by self-influences summed over the partitions: equal to
    // rounding.
    let cos_whole = dir.join("cos-whole");
    let cos_parts = dir.join("cos-parts");
    score(&factors, &cos_whole, &["--dense", "--normalize", "cosine"]);
    score(
        &factors,
        &cos_parts,
        &["--dense", "--normalize", "cosine", "--partitions", "2"],
    );
    let d = max_rel_diff_where(
        &cos_whole.join("scores.safetensors"),
        &cos_parts.join("scores.safetensors"),
        |_| true,
    );
    assert!(d < 1e-6, "cosine scores differ by {d:e}");
    let ids = |d: &Path| -> Vec<String> {
        std::fs::read_to_string(d.join("top_k.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                read_json_str(l)["sequence_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(ids(&cos_whole), ids(&cos_parts));

    // A different partition count in the same directory is refused (exit 4); --store and
    // --per-token need every layer in one pass (exit 2).
    let r = run_owned(&score_args(
        &factors,
        &split.with_extension("other"),
        &["--partition", "0/2"],
    ));
    assert!(r.status.success());
    let r = run_owned(&score_args(
        &factors,
        &split.with_extension("other"),
        &["--partition", "1/3"],
    ));
    assert_eq!(
        r.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let r = run_owned(&score_args(
        &factors,
        &dir.join("tok"),
        &["--per-token", "--partitions", "2"],
    ));
    assert_eq!(
        r.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

fn read_json_str(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap()
}

#[test]
fn a_prefiltered_partitioned_score_equals_the_unpartitioned_one() {
    let factors = scoring_factors();
    let dir = scratch("score-prefilter");
    let (model, corpus) = bundled();
    let index = dir.join("index");
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
    let extra = [
        "--index",
        s(&index),
        "--prefilter",
        "12",
        "--prefilter-sample",
        "10",
    ];
    let whole = dir.join("whole");
    score(&factors, &whole, &extra);
    let parts = dir.join("parts");
    score(
        &factors,
        &parts,
        &[&extra[..], &["--partitions", "2"]].concat(),
    );
    same_results(
        &whole,
        &parts,
        &[
            "top_k.jsonl",
            "distribution.json",
            "layers.json",
            "prefilter.json",
        ],
    );
}

#[test]
fn a_partition_killed_mid_scoring_resumes_to_the_same_scores() {
    let factors = scoring_factors();
    let dir = scratch("score-kill");
    let whole = dir.join("whole");
    score(&factors, &whole, &["--dense"]);
    let killed = dir.join("killed");
    let a = score_args(
        &factors,
        &killed,
        &[
            "--dense",
            "--partitions",
            "2",
            "--threads",
            "1",
            "--checkpoint-every",
            "8",
        ],
    );
    // Killed in the second partition's pass, after a checkpoint was committed there.
    let marker = killed.join("work/partition-1-of-2/work/score.0-of-1.json");
    assert!(kill_when(&a, &marker));
    let last = loud(&a);
    assert!(last.contains("partition 0/2: already scored"), "{last}");
    assert!(last.contains("resuming the scoring pass"), "{last}");
    same_results(
        &whole,
        &killed,
        &[
            "top_k.jsonl",
            "distribution.json",
            "layers.json",
            "scores.safetensors",
        ],
    );
}

#[test]
fn a_scoring_memory_limit_picks_the_partition_count_or_says_it_cannot() {
    let factors = scoring_factors();
    let dir = scratch("score-limit");
    let r = run(
        &score_args(&factors, &dir.join("tiny"), &["--memory-limit", "1K"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        r.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("even one layer"));
    let whole = dir.join("whole");
    score(&factors, &whole, &[]);
    let roomy = dir.join("roomy");
    let said = score(&factors, &roomy, &["--memory-limit", "64G"]);
    assert!(said.contains("from 1 layer partitions"), "{said}");
    same_results(
        &whole,
        &roomy,
        &["top_k.jsonl", "distribution.json", "layers.json"],
    );
}
