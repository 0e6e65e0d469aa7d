//! Every file format infl reads, corrupted: seeded random truncations and bit flips of each file
//! never panic, and never exit 0 with a result that differs from the clean run's.
//!
//! Each case builds a pristine "world" once (a model, a corpus, queries, factors, a gradient
//! store, a BM25 index, shard states of a sharded fit and score), then for every mutation copies
//! the world, corrupts one file, and runs the command that reads it. Files whose bytes carry
//! meaning a user may legitimately change (the corpus and the queries) only have to fail without a
//! panic; every other file is infl's own or a checkpoint's, and a change to it must be refused
//! (a non-zero exit with a message) unless the result is unchanged.
//!
//! `INFL_CORRUPTION_TRIALS` (default 12) sets the truncations and the bit flips per file.

mod common;

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Corruptions of each kind per file.
fn trials() -> usize {
    std::env::var("INFL_CORRUPTION_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every regular file under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

fn infl(world: &Path, args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_infl"))
        .arg("--quiet")
        .args(args)
        .current_dir(world)
        .output()
        .expect("the infl binary runs")
}

/// The result files of a run whose output is `out` (inside `world`): every file but the
/// provenance (meta.json records paths and times) and infl's lock and temporary files.
fn result_bytes(world: &Path, out: &str) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(&world.join(out))
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name != "meta.json" && !name.starts_with('.')
        })
        .map(|p| {
            let bytes = std::fs::read(world.join(out).join(&p)).unwrap();
            (p, bytes)
        })
        .collect()
}

/// The result files of `case`'s run, but the corrupted file itself where it lies in the output
/// directory (a shard state that `infl merge` leaves in place).
fn outputs_of(world: &Path, case: &Case) -> Vec<(PathBuf, Vec<u8>)> {
    let corrupted = Path::new(case.file).strip_prefix(case.out).ok();
    result_bytes(world, case.out)
        .into_iter()
        .filter(|(p, _)| Some(p.as_path()) != corrupted)
        .collect()
}

/// One corruption.
#[derive(Debug, Clone, Copy)]
enum Mutation {
    Truncate(usize),
    FlipBit(usize, u8),
}

impl Mutation {
    fn apply(self, path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        match self {
            Mutation::Truncate(at) => bytes.truncate(at),
            Mutation::FlipBit(at, bit) => bytes[at] ^= 1 << bit,
        }
        std::fs::write(path, bytes).unwrap();
    }
}

/// `trials()` truncations and bit flips of a file of `len` bytes; half of them land in the
/// first 512 bytes, where the headers are.
fn mutations(len: usize, rng: &mut impl Rng) -> Vec<Mutation> {
    let mut out = Vec::new();
    if len == 0 {
        return out;
    }
    for i in 0..trials() {
        let span = if i % 2 == 0 { len.min(512) } else { len };
        out.push(Mutation::Truncate(rng.random_range(0..span)));
        out.push(Mutation::FlipBit(
            rng.random_range(0..span),
            rng.random_range(0..8),
        ));
    }
    out
}

/// A reader under test: the file to corrupt, the command that reads it, its output directory,
/// and whether an exit 0 must reproduce the clean result exactly.
struct Case {
    file: &'static str,
    args: Vec<String>,
    out: &'static str,
    strict: bool,
}

/// Runs every mutation of `case.file` in a copy of `world`; returns the failures.
fn run_case(world: &Path, scratch: &Path, case: &Case, rng: &mut impl Rng) -> Vec<String> {
    let clean_dir = scratch.join("clean");
    let _ = std::fs::remove_dir_all(&clean_dir);
    copy_dir(world, &clean_dir);
    let clean = infl(&clean_dir, &case.args);
    assert!(
        clean.status.success(),
        "clean run of {:?} failed:\n{}",
        case.args,
        String::from_utf8_lossy(&clean.stderr)
    );
    let expected = outputs_of(&clean_dir, case);
    let len = std::fs::metadata(world.join(case.file)).unwrap().len() as usize;
    let mut failures = Vec::new();
    for mutation in mutations(len, rng) {
        let trial = scratch.join("trial");
        let _ = std::fs::remove_dir_all(&trial);
        copy_dir(world, &trial);
        mutation.apply(&trial.join(case.file));
        let run = infl(&trial, &case.args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        let what = format!(
            "{} {mutation:?} → `infl {}`",
            case.file,
            case.args.join(" ")
        );
        match run.status.code() {
            None => failures.push(format!("{what}: killed by a signal\n{stderr}")),
            Some(101) => failures.push(format!("{what}: panicked\n{stderr}")),
            Some(0) if case.strict && outputs_of(&trial, case) != expected => failures.push(
                format!("{what}: exit 0 with a result other than the clean run's"),
            ),
            Some(0) => {}
            Some(code) if stderr.trim().is_empty() => {
                failures.push(format!("{what}: exit {code} without a message"))
            }
            Some(_) => {}
        }
    }
    failures
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// The pristine world: a random GPT-2, a corpus and queries of token ids, factors with a
/// gradient store, a BM25 index, and the shard states of a two-shard fit (both passes) and score.
fn build_world(world: &Path) {
    common::random_gpt2(world, 5, 14, |d| 3 + d * 5 % 13, |d, t| d * 3 + t * t + 1);
    let w = |list: &[&str]| {
        let out = infl(world, &args(list));
        assert!(
            out.status.success(),
            "infl {list:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let model = ["--model", "model"];
    let data = ["--train", "corpus.jsonl"];
    w(&[
        &["fit"][..],
        &model,
        &data,
        &["--out", "factors", "--store"],
    ]
    .concat());
    w(&[&["index"][..], &model, &["--out", "index", "corpus.jsonl"]].concat());
    let score = [
        &["score"][..],
        &model,
        &["--factors", "factors"],
        &data,
        &["--queries", "queries.jsonl"],
    ]
    .concat();
    for shard in ["0/2", "1/2"] {
        w(&[&score[..], &["--out", "score-shards", "--shard", shard]].concat());
    }
    let fit = [&["fit"][..], &model, &data].concat();
    for shard in ["0/2", "1/2"] {
        w(&[&fit[..], &["--out", "fit-shards-1", "--shard", shard]].concat());
    }
    copy_dir(&world.join("fit-shards-1"), &world.join("fit-shards-2"));
    w(&["merge", "fit-shards-2"]);
    for shard in ["0/2", "1/2"] {
        w(&[&fit[..], &["--out", "fit-shards-2", "--shard", shard]].concat());
    }
}

/// Every reader, as a (file, command) case.
fn cases(world: &Path) -> Vec<Case> {
    let score = |extra: &[&str]| {
        let mut a = args(&[
            "score",
            "--model",
            "model",
            "--factors",
            "factors",
            "--train",
            "corpus.jsonl",
            "--queries",
            "queries.jsonl",
            "--out",
            "results",
        ]);
        a.extend(args(extra));
        if !extra.contains(&"--prefilter") {
            a.push("--dense".into());
        }
        a
    };
    let mut cases = Vec::new();
    let mut add = |file: &'static str, args: Vec<String>, out: &'static str, strict: bool| {
        cases.push(Case {
            file,
            args,
            out,
            strict,
        })
    };
    add("corpus.jsonl", score(&[]), "results", false);
    add("queries.jsonl", score(&[]), "results", false);
    add("model/config.json", score(&[]), "results", true);
    add("model/model.safetensors", score(&[]), "results", true);
    add("factors/factors.safetensors", score(&[]), "results", true);
    add("factors/meta.json", score(&[]), "results", true);
    for file in [
        "factors/store/gradients.bin",
        "factors/store/store.json",
        "factors/store/sequences.jsonl",
    ] {
        add(file, score(&["--store"]), "results", true);
    }
    add(
        "index/index.safetensors",
        score(&["--index", "index", "--prefilter", "5"]),
        "results",
        true,
    );
    for (dir, out) in [
        ("score-shards", "score-shards"),
        ("fit-shards-1", "fit-shards-1"),
        ("fit-shards-2", "fit-shards-2"),
    ] {
        // The lock files hold only the holder's pid, for people to read; infl reads no data
        // from them.
        let data_files = files_under(&world.join(dir))
            .into_iter()
            .filter(|f| !f.to_string_lossy().ends_with(".lock"));
        for file in data_files {
            let file: &'static str =
                Box::leak(format!("{dir}/{}", file.display()).into_boxed_str());
            add(file, args(&["merge", out]), out, true);
        }
    }
    cases
}

#[test]
fn corrupted_files_are_refused_never_panic_and_never_pass_as_clean() {
    let scratch = common::scratch("corruption", "all");
    let world = scratch.join("world");
    build_world(&world);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(34);
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in cases(&world) {
        runs += 2 * trials();
        failures.extend(run_case(&world, &scratch, &case, &mut rng));
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} corrupted runs went wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A GGUF checkpoint, corrupted, under the command that reads it whole (`score` loads every
/// tensor; any change of the file changes its hash, so an exit 0 must be the clean result).
#[test]
fn corrupted_gguf_is_refused_and_never_panics() {
    let scratch = common::scratch("corruption", "gguf");
    let world = scratch.join("world");
    std::fs::create_dir_all(&world).unwrap();
    std::fs::copy(
        common::family_fixture("tiny_llama.gguf"),
        world.join("model.gguf"),
    )
    .unwrap();
    std::fs::write(
        world.join("corpus.jsonl"),
        "{\"ids\": [1, 5, 9, 13, 2]}\n{\"ids\": [7, 7, 3, 40, 41, 42]}\n{\"ids\": [60, 2, 8]}\n",
    )
    .unwrap();
    std::fs::write(
        world.join("queries.jsonl"),
        "{\"id\": \"q\", \"prompt_ids\": [1, 5], \"completion_ids\": [9, 13]}\n",
    )
    .unwrap();
    let fit = infl(
        &world,
        &args(&[
            "fit",
            "--model",
            "model.gguf",
            "--train",
            "corpus.jsonl",
            "--out",
            "factors",
        ]),
    );
    assert!(
        fit.status.success(),
        "{}",
        String::from_utf8_lossy(&fit.stderr)
    );
    let case = Case {
        file: "model.gguf",
        args: args(&[
            "score",
            "--model",
            "model.gguf",
            "--factors",
            "factors",
            "--train",
            "corpus.jsonl",
            "--queries",
            "queries.jsonl",
            "--out",
            "results",
            "--dense",
        ]),
        out: "results",
        strict: true,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3434);
    let failures = run_case(&world, &scratch, &case, &mut rng);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let _ = std::fs::remove_dir_all(&scratch);
}
