//! Hugging Face `datasets` files as inputs (tests/fixtures/tabular, made by its
//! make_fixture.py): scoring from Parquet, Arrow IPC (file and stream) and a `save_to_disk`
//! directory gives byte-identical scores to the same corpus and queries as JSONL, with the
//! same `ROW:WINDOW` ids; errors name file, row and column.

mod common;
use common::{ok, run, s, scratch};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/tabular").join(name)
}

fn model() -> PathBuf {
    root().join("assets/tiny-gpt2")
}

fn fit(train: &Path, out: &Path, extra: &[&str]) {
    let model = model();
    let mut args = vec![
        "fit",
        "--model",
        s(&model),
        "--train",
        s(train),
        "--out",
        s(out),
        "--fisher",
        "empirical",
        "--max-len",
        "8",
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

fn score(factors: &Path, train: &Path, queries: &Path, out: &Path, extra: &[&str]) {
    let model = model();
    let mut args = vec![
        "score",
        "--model",
        s(&model),
        "--factors",
        s(factors),
        "--train",
        s(train),
        "--queries",
        s(queries),
        "--out",
        s(out),
        "--dense",
        "--top-k",
        "5",
        "--query-rank",
        "full",
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn tables_score_exactly_as_jsonl() {
    let dir = scratch("tabular", "same");
    let factors = dir.join("factors");
    fit(&fixture("corpus.jsonl"), &factors, &[]);
    let reference = dir.join("jsonl");
    score(
        &factors,
        &fixture("corpus.jsonl"),
        &fixture("queries.jsonl"),
        &reference,
        &[],
    );
    // The windows of 8 tokens cut documents: ids like `3:1` must match too (top_k.jsonl).
    let top = String::from_utf8(bytes(&reference.join("top_k.jsonl"))).unwrap();
    assert!(top.contains(":1\""), "{top}");
    for (i, corpus) in [
        "corpus.parquet",
        "corpus.arrow",
        "corpus_stream.arrow",
        "corpus_dataset",
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.join(format!("t{i}"));
        score(
            &factors,
            &fixture(corpus),
            &fixture("queries.parquet"),
            &out,
            &["--text-column", "body"],
        );
        for file in ["scores.safetensors", "top_k.jsonl", "distribution.json"] {
            assert!(
                bytes(&out.join(file)) == bytes(&reference.join(file)),
                "{corpus}: {file} differs from the JSONL run's"
            );
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&bytes(&out.join("meta.json"))).unwrap();
        assert_eq!(meta["text_column"], "body");
        let sha = meta["corpus"]["sha256"].as_str().unwrap().to_string();
        assert_eq!(sha, infl::data::sha256_file(&fixture(corpus)).unwrap());
    }
    // Fitting from a table gives the same factors as from JSONL.
    let from_table = dir.join("factors_parquet");
    fit(
        &fixture("corpus.parquet"),
        &from_table,
        &["--text-column", "body"],
    );
    assert!(
        bytes(&from_table.join("factors.safetensors"))
            == bytes(&factors.join("factors.safetensors"))
    );
}

#[test]
fn table_errors_name_file_row_and_column() {
    let dir = scratch("tabular", "errors");
    let out = run(&[
        "fit",
        "--model",
        s(&model()),
        "--train",
        s(&fixture("tokens_bad.parquet")),
        "--tokens-column",
        "input_ids",
        "--out",
        s(&dir.join("f")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("tokens_bad.parquet: row 2") && err.contains("`input_ids`[1]"),
        "{err}"
    );
    let out = run(&[
        "fit",
        "--model",
        s(&model()),
        "--train",
        s(&fixture("corpus.parquet")),
        "--out",
        s(&dir.join("g")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("corpus.parquet: row 1") && err.contains("missing field `text`"),
        "{err}"
    );
}

/// `score --parquet`: top_k.parquet and scores.parquet hold the numbers of top_k.jsonl and
/// scores.safetensors, with the `ROW:WINDOW` ids and the run's meta.json in the metadata.
#[test]
fn parquet_results_hold_the_same_numbers_and_ids() {
    let dir = scratch("tabular", "parquet-out");
    let factors = dir.join("factors");
    fit(&fixture("corpus.jsonl"), &factors, &[]);
    let out = dir.join("results");
    score(
        &factors,
        &fixture("corpus.parquet"),
        &fixture("queries.jsonl"),
        &out,
        &["--text-column", "body", "--parquet"],
    );
    let dense = infl::io::read_safetensors(&out.join("scores.safetensors")).unwrap();
    let (shape, values) = &dense["scores"];
    let n_train = shape[1];
    let meta: serde_json::Value = serde_json::from_slice(&bytes(&out.join("meta.json"))).unwrap();
    let query_ids: Vec<String> = meta["queries"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap().to_string())
        .collect();
    let mut want_ids = Vec::new();
    infl::data::stream_corpus_columns(
        &fixture("corpus.parquet"),
        &infl::data::Columns {
            text_column: "body".into(),
            tokens_column: None,
        },
        &mut infl::data::LazyTokenizer::new(&model()),
        8,
        512,
        100,
        |c| {
            want_ids.extend(c.iter().map(|s| s.id.clone()));
            Ok(())
        },
    )
    .unwrap();
    let path = out.join("scores.parquet");
    let layout = infl::data::tabular::layout(&path).unwrap().unwrap();
    let mut wanted: Vec<&str> = vec!["sequence_id"];
    wanted.extend(query_ids.iter().map(String::as_str));
    let mut rows = 0;
    infl::data::tabular::for_each_row(&path, layout, &wanted, |row, _, obj| {
        let k = row - 1;
        assert_eq!(obj["sequence_id"], want_ids[k].as_str());
        for (q, id) in query_ids.iter().enumerate() {
            assert_eq!(obj[id].as_f64().unwrap(), values[q * n_train + k]);
        }
        rows += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(rows, n_train);
    let top = String::from_utf8(bytes(&out.join("top_k.jsonl"))).unwrap();
    let lines: Vec<serde_json::Value> = top
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let path = out.join("top_k.parquet");
    let layout = infl::data::tabular::layout(&path).unwrap().unwrap();
    let mut n = 0;
    let cols = [
        "query_id",
        "direction",
        "rank",
        "sequence_id",
        "score",
        "text",
    ];
    infl::data::tabular::for_each_row(&path, layout, &cols, |row, _, obj| {
        for c in cols {
            assert_eq!(obj[c], lines[row - 1][c], "row {row} column {c}");
        }
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, lines.len());
    let raw = bytes(&out.join("scores.parquet"));
    let needle = b"infl.meta";
    assert!(raw.windows(needle.len()).any(|w| w == needle));
}
