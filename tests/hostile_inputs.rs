//! Hostile options and input files through the `infl` binary: every option out of its range is a
//! usage error (exit code 2) that names the option and its range, negative numbers included;
//! input files are checked in full before any work (exit code 3, naming file, line and field);
//! a missing input file is bad input named once; long work reports progress as log lines when
//! stderr is not a terminal.

mod common;

use common::{ok, run, s};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A tiny model with its corpus and queries, fitted once for every test of this file.
struct Fixture {
    dir: PathBuf,
    model: PathBuf,
    corpus: PathBuf,
    queries: PathBuf,
    factors: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = common::scratch("hostile", "fixture");
        let (model, corpus, queries) =
            common::random_gpt2(&dir, 3, 12, |d| 3 + d % 7, |d, t| d * 5 + t * 3);
        let factors = dir.join("factors");
        ok(&[
            "fit",
            "--model",
            s(&model),
            "--train",
            s(&corpus),
            "--out",
            s(&factors),
            "--fisher",
            "empirical",
        ]);
        Fixture {
            dir,
            model,
            corpus,
            queries,
            factors,
        }
    })
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("hostile", name)
}

/// `infl ARGS`: its exit code and stderr.
fn infl(args: &[&str]) -> (Option<i32>, String) {
    let out = run(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `fit` on the fixture with `extra`, into `out`.
fn fit_args<'a>(f: &'a Fixture, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "fit",
        "--model",
        s(&f.model),
        "--train",
        s(&f.corpus),
        "--out",
        s(out),
    ];
    a.extend_from_slice(extra);
    a
}

/// `score` on the fixture with `extra`, into `out`.
fn score_args<'a>(f: &'a Fixture, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "score",
        "--model",
        s(&f.model),
        "--factors",
        s(&f.factors),
        "--train",
        s(&f.corpus),
        "--queries",
        s(&f.queries),
        "--out",
        s(out),
    ];
    a.extend_from_slice(extra);
    a
}

/// `self-influence` on the fixture with `extra`, into `out`.
fn self_args<'a>(f: &'a Fixture, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "self-influence",
        "--model",
        s(&f.model),
        "--factors",
        s(&f.factors),
        "--train",
        s(&f.corpus),
        "--out",
        s(out),
    ];
    a.extend_from_slice(extra);
    a
}

/// Asserts a usage error (exit code 2) whose message holds every one of `needles`, and that
/// clap did not read the value as a flag.
fn usage_error(args: &[&str], needles: &[&str]) {
    let (code, err) = infl(args);
    assert_eq!(code, Some(2), "infl {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "infl {args:?}: `{n}` not in: {err}");
    }
    assert!(!err.contains("unexpected argument"), "{err}");
}

#[test]
fn windows_too_short_for_a_loss_are_refused_by_every_command() {
    let f = fixture();
    let out = scratch("max-len");
    for len in ["0", "1"] {
        let why = ["--max-len", "at least 2", "next-token loss"];
        usage_error(&fit_args(f, &out, &["--max-len", len]), &why);
        usage_error(&score_args(f, &out, &["--max-len", len]), &why);
        usage_error(&self_args(f, &out, &["--max-len", len]), &why);
        usage_error(
            &[
                "validate",
                "exact",
                "--model",
                s(&f.model),
                "--train",
                s(&f.corpus),
                "--queries",
                s(&f.queries),
                "--out",
                s(&out),
                "--max-len",
                len,
            ],
            &why,
        );
        usage_error(
            &[
                "index",
                s(&f.corpus),
                "--model",
                s(&f.model),
                "--out",
                s(&out),
                "--max-len",
                len,
            ],
            &why,
        );
    }
    assert!(!out.join("meta.json").exists(), "nothing written");
}

#[test]
fn zero_counts_are_usage_errors() {
    let f = fixture();
    let out = scratch("zero");
    usage_error(
        &fit_args(f, &out, &["--batch-size", "0"]),
        &["--batch-size", "at least 1"],
    );
    usage_error(
        &score_args(f, &out, &["--batch-size", "0"]),
        &["--batch-size", "at least 1"],
    );
    usage_error(
        &score_args(f, &out, &["--top-k", "0"]),
        &["--top-k", "at least 1"],
    );
    usage_error(
        &self_args(f, &out, &["--top-k", "0"]),
        &["--top-k", "at least 1"],
    );
    usage_error(
        &score_args(f, &out, &["--prefilter", "0", "--index", s(&out)]),
        &["--prefilter", "at least 1"],
    );
    usage_error(
        &fit_args(f, &out, &["--checkpoint-every", "0"]),
        &["--checkpoint-every", "at least 1"],
    );
    let mut threads = vec!["--threads", "0"];
    threads.extend(fit_args(f, &out, &[]));
    usage_error(&threads, &["--threads", "at least 1"]);
    usage_error(
        &["inspect", "--model", s(&f.model), "--batch-size", "0"],
        &["--batch-size"],
    );
    usage_error(
        &["report", s(&out), "--max-tokens", "0"],
        &["--max-tokens", "at least 1"],
    );
    usage_error(
        &["bench", "--query-counts", "1,0"],
        &["--query-counts", "at least 1"],
    );
    usage_error(
        &["validate", "lds", "--subsets", "1"],
        &["--subsets", "at least 2"],
    );
    usage_error(
        &["validate", "lds", "--fraction", "0"],
        &["--fraction", "above 0"],
    );
    assert!(!out.join("meta.json").exists(), "nothing written");
}

#[test]
fn shards_out_of_range_are_usage_errors() {
    let f = fixture();
    let out = scratch("shard");
    usage_error(
        &fit_args(f, &out, &["--shard", "3/2"]),
        &["--shard", "below the shard count"],
    );
    usage_error(
        &fit_args(f, &out, &["--shard", "0/0"]),
        &["--shard", "at least 1"],
    );
    usage_error(
        &fit_args(f, &out, &["--shard", "-1/2"]),
        &["--shard", "-1/2", "expected `i/N`"],
    );
}

#[test]
fn negative_numbers_get_the_range_not_unexpected_argument() {
    let f = fixture();
    let out = scratch("negative");
    usage_error(
        &score_args(f, &out, &["--damping", "-1"]),
        &["--damping", "non-negative"],
    );
    usage_error(
        &score_args(f, &out, &["--top-k", "-3"]),
        &["--top-k", "at least 1"],
    );
    usage_error(
        &fit_args(f, &out, &["--batch-size", "-8"]),
        &["--batch-size", "at least 1"],
    );
}

#[test]
fn train_refuses_shapes_nothing_can_be_fitted_on() {
    let dir = scratch("train");
    let corpus = dir.join("corpus.jsonl");
    std::fs::write(&corpus, "{\"text\": \"one two three four five six\"}\n").unwrap();
    let out = dir.join("model");
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "--train", s(&corpus), "--out", s(&out)];
        a.extend_from_slice(extra);
        infl(&a)
    };
    for (flag, value, needle) in [
        ("--n-layer", "0", "at least 1"),
        ("--n-head", "0", "at least 1"),
        ("--n-embd", "0", "at least 1"),
        ("--n-positions", "1", "at least 2"),
        ("--vocab-size", "100", "at least 257"),
        ("--epochs", "0", "at least 1"),
        ("--batch-size", "0", "at least 1"),
        ("--lr", "0", "above 0"),
        ("--lr", "-1", "above 0"),
        ("--weight-decay", "-0.5", "at least 0"),
    ] {
        let (code, err) = train(&[flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && err.contains(needle), "{err}");
    }
    // A range that depends on two options is checked by the library, with the same exit code.
    let (code, err) = train(&["--n-embd", "10", "--n-head", "3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--n-head"), "{err}");
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let f = fixture();
    let dir = scratch("bom");
    let corpus = dir.join("corpus.jsonl");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(&f.corpus).unwrap());
    std::fs::write(&corpus, bytes).unwrap();
    let queries = dir.join("queries.jsonl");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(&f.queries).unwrap());
    std::fs::write(&queries, bytes).unwrap();
    ok(&[
        "score",
        "--model",
        s(&f.model),
        "--factors",
        s(&f.factors),
        "--train",
        s(&corpus),
        "--queries",
        s(&queries),
        "--out",
        s(&dir.join("results")),
        "--query-rank",
        "full",
    ]);
    let top = std::fs::read_to_string(dir.join("results/top_k.jsonl")).unwrap();
    assert!(top.contains("\"a\"") && top.contains("\"b\""), "{top}");
}

#[test]
fn a_missing_input_is_bad_input_named_once() {
    let f = fixture();
    let dir = scratch("missing");
    let gone = dir.join("gone.jsonl");
    let gone_dir = dir.join("gone-dir");
    let out = dir.join("out");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "corpus",
            vec![
                "fit",
                "--model",
                s(&f.model),
                "--train",
                s(&gone),
                "--out",
                s(&out),
            ],
        ),
        (
            "queries",
            vec![
                "score",
                "--model",
                s(&f.model),
                "--factors",
                s(&f.factors),
                "--train",
                s(&f.corpus),
                "--queries",
                s(&gone),
                "--out",
                s(&out),
            ],
        ),
        (
            "model",
            vec![
                "fit",
                "--model",
                s(&gone_dir),
                "--train",
                s(&f.corpus),
                "--out",
                s(&out),
            ],
        ),
        (
            "factors",
            vec![
                "score",
                "--model",
                s(&f.model),
                "--factors",
                s(&gone_dir),
                "--train",
                s(&f.corpus),
                "--queries",
                s(&f.queries),
                "--out",
                s(&out),
            ],
        ),
    ];
    for (what, args) in cases {
        let (code, err) = infl(&args);
        assert_eq!(code, Some(3), "missing {what}: {err}");
        let path = if what == "model" || what == "factors" {
            s(&gone_dir)
        } else {
            s(&gone)
        };
        assert_eq!(err.matches(path).count(), 1, "missing {what}: {err}");
        assert!(
            err.matches("os error").count() <= 1,
            "missing {what}: the OS error twice: {err}"
        );
    }
}

#[test]
fn a_misspelt_field_is_found_before_any_work() {
    let f = fixture();
    let dir = scratch("misspelt");
    // The last line of the corpus misspells `ids`; the pass would reach it last.
    let corpus = dir.join("corpus.jsonl");
    let mut text = std::fs::read_to_string(&f.corpus).unwrap();
    text.push_str("{\"idz\": [1, 2, 3]}\n");
    std::fs::write(&corpus, &text).unwrap();
    let line = text.lines().count();
    let results = dir.join("results");
    let (code, err) = infl(&[
        "score",
        "--model",
        s(&f.model),
        "--factors",
        s(&f.factors),
        "--train",
        s(&corpus),
        "--queries",
        s(&f.queries),
        "--out",
        s(&results),
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains(&format!("corpus.jsonl:{line}"))
            && err.contains("`idz`")
            && err.contains("`ids`"),
        "{err}"
    );
    assert!(!results.join("work").exists(), "work/ left behind");

    let own = dir.join("self");
    let (code, err) = infl(&[
        "self-influence",
        "--model",
        s(&f.model),
        "--factors",
        s(&f.factors),
        "--train",
        s(&corpus),
        "--out",
        s(&own),
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains(&format!("corpus.jsonl:{line}")), "{err}");
    assert!(!own.exists(), "an output directory made before the check");

    // A query's `Id` would silently give the query its line number as id.
    let queries = dir.join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"Id\": \"capital\", \"prompt_ids\": [1, 2], \"completion_ids\": [3]}\n",
    )
    .unwrap();
    let (code, err) = infl(&[
        "score",
        "--model",
        s(&f.model),
        "--factors",
        s(&f.factors),
        "--train",
        s(&f.corpus),
        "--queries",
        s(&queries),
        "--out",
        s(&dir.join("r2")),
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("queries.jsonl:1") && err.contains("`Id`") && err.contains("`id`"),
        "{err}"
    );
}

#[test]
fn progress_is_logged_when_stderr_is_not_a_terminal() {
    let f = fixture();
    let dir = scratch("progress");
    // Not --quiet, stderr a pipe.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infl"))
        .args(fit_args(
            f,
            &dir.join("factors"),
            &["--fisher", "empirical"],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains(" pass: ") && l.contains("tokens (") && l.contains("ETA")),
        "no progress line: {err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains(" pass: done, ") && l.contains("tokens/s")),
        "no closing line: {err}"
    );
}

#[test]
fn inspect_takes_a_query_count_by_its_own_name() {
    let f = fixture();
    let out = ok(&[
        "inspect",
        "--model",
        s(&f.model),
        "--n-queries",
        "7",
        "--no-probe",
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("7 queries"), "{report}");
    // `--queries` names a file everywhere else: inspect points to the count instead.
    let (code, err) = infl(&["inspect", "--model", s(&f.model), "--queries", "q.jsonl"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--n-queries"), "{err}");
}

#[test]
fn compare_says_what_it_got_and_what_it_expects() {
    let f = fixture();
    let (code, err) = infl(&["compare", s(&f.factors), s(&f.dir)]);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("`factors`")
            && err.contains("infl fit")
            && err.contains("infl compare")
            && err.contains("infl score"),
        "{err}"
    );
}
