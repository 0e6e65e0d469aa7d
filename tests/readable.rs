//! Scores people can read: `top_k.jsonl`'s predicted change of −log p on removal and
//! percentile, checked against the run's own numbers (the fit's N, the dense scores); what
//! `infl score` prints; and a report that holds the whole run.

mod common;

use common::{ok, random_gpt2, s, scratch};
use infl::report::{self, Ranking, RecallRow, RunContext};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A random GPT-2 with 30 documents (some longer than the context) and its two queries.
fn setup(name: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = scratch("readable", name);
    let (model, corpus, queries) =
        random_gpt2(&dir, 5, 30, |d| 3 + d * 5 % 23, |d, t| d * 7 + t * 3);
    (dir, model, corpus, queries)
}

fn fit(model: &Path, corpus: &Path, out: &Path, strategy: &str) {
    ok(&[
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
        "--max-len",
        "16",
        "--batch-size",
        "4",
    ]);
}

fn score_args<'a>(
    model: &'a Path,
    factors: &'a Path,
    corpus: &'a Path,
    queries: &'a Path,
    out: &'a Path,
) -> Vec<&'a str> {
    vec![
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
        "--max-len",
        "16",
        "--top-k",
        "5",
        "--batch-size",
        "4",
    ]
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn removal_change_and_percentile_follow_the_fit_and_the_dense_scores() {
    let (dir, model, corpus, queries) = setup("units");
    let factors = dir.join("factors");
    fit(&model, &corpus, &factors, "ekfac");
    let out = dir.join("results");
    let mut args = score_args(&model, &factors, &corpus, &queries, &out);
    args.extend(["--dense", "--per-layer"]);
    ok(&args);

    let meta = json(&out.join("meta.json"));
    let n = json(&factors.join("meta.json"))["corpus"]["n_sequences"]
        .as_u64()
        .unwrap();
    assert!(
        n > 30,
        "documents longer than the context make more sequences: {n}"
    );
    assert_eq!(meta["removal"]["divisor"].as_f64(), Some(n as f64));
    assert_eq!(meta["removal"]["counts"], "sequences");
    assert!(meta["removal_convention"]
        .as_str()
        .unwrap()
        .contains("nats"));

    // The dense rows give every exact percentile.
    let t = infl::io::read_safetensors(&out.join("scores.safetensors")).unwrap();
    let (shape, dense) = &t["scores"];
    let ids: Vec<String> = serde_json::from_value(meta["queries"]["ids"].clone()).unwrap();
    let mut group = std::collections::HashMap::new();
    let entries = lines(&out.join("top_k.jsonl"));
    for e in &entries {
        let score = e["score"].as_f64().unwrap();
        let removal = e["removal_change"].as_f64().unwrap();
        assert!(
            (removal - score / n as f64).abs() <= 1e-12 * score.abs().max(1.0),
            "{e}"
        );
        let key = (e["query_id"].to_string(), e["direction"].to_string());
        let sum = group.entry(key).or_insert(0.0);
        *sum += score;
        let g = e["group_removal_change"].as_f64().unwrap();
        assert!(
            (g - *sum / n as f64).abs() <= 1e-9 * sum.abs().max(1.0),
            "{e}"
        );

        let q = ids
            .iter()
            .position(|i| e["query_id"] == *i.as_str())
            .unwrap();
        let row = &dense[q * shape[1]..(q + 1) * shape[1]];
        // The dense file is f32: count against the f32 of the score.
        let s32 = score as f32 as f64;
        let at_most = row.iter().filter(|x| **x <= s32).count();
        let exact = 100.0 * at_most as f64 / shape[1] as f64;
        let got = e["percentile"].as_f64().unwrap();
        assert!(
            (got - exact).abs() <= 100.0 / shape[1] as f64,
            "{e}: exact {exact}"
        );
    }
    let top1 = entries
        .iter()
        .find(|e| e["rank"] == 1 && e["direction"] == "top")
        .unwrap();
    assert_eq!(top1["percentile"].as_f64(), Some(100.0));

    // The report shows the unit, the layer part's basis and α only with a verdict.
    let html = dir.join("report.html");
    report::write_report(&out, &html, &Default::default()).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("removing it: −log p"),
        "no unit in the report"
    );
    assert!(
        page.contains(&format!("Here N = {n} training sequences")),
        "no N in the report"
    );
    assert!(page.contains("largest layer part (by magnitude)"));
    assert!(!page.contains("<th>tail α</th>"));
}

#[test]
fn kfac_divides_by_tokens_and_identity_has_no_removal_unit() {
    let (dir, model, corpus, queries) = setup("strategies");
    for (strategy, counts) in [("kfac", Some("tokens")), ("identity", None)] {
        let factors = dir.join(format!("factors-{strategy}"));
        fit(&model, &corpus, &factors, strategy);
        let out = dir.join(format!("results-{strategy}"));
        ok(&score_args(&model, &factors, &corpus, &queries, &out));
        let meta = json(&out.join("meta.json"));
        let entries = lines(&out.join("top_k.jsonl"));
        match counts {
            Some(c) => {
                let tokens = json(&factors.join("meta.json"))["corpus"]["n_tokens"]
                    .as_f64()
                    .unwrap();
                assert_eq!(meta["removal"]["counts"], c);
                assert_eq!(meta["removal"]["divisor"].as_f64(), Some(tokens));
                let e = &entries[0];
                let want = e["score"].as_f64().unwrap() / tokens;
                assert!(
                    (e["removal_change"].as_f64().unwrap() - want).abs()
                        <= 1e-12 * want.abs().max(1.0)
                );
            }
            None => {
                assert!(meta.get("removal").is_none(), "{meta}");
                assert!(entries.iter().all(|e| e.get("removal_change").is_none()));
                assert!(entries.iter().all(|e| e.get("percentile").is_some()));
            }
        }
    }
}

#[test]
fn score_prints_each_querys_top_sources_with_the_unit() {
    let (dir, model, corpus, queries) = setup("print");
    let factors = dir.join("factors");
    fit(&model, &corpus, &factors, "ekfac");
    let out = dir.join("results");
    // Not quiet: the sources go to stdout with the summary line on stderr.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_infl"))
        .args(score_args(&model, &factors, &corpus, &queries, &out))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("in nats"), "{text}");
    let top = lines(&out.join("top_k.jsonl"));
    for q in ["a", "b"] {
        assert!(text.contains(&format!("query {q}\n")), "{text}");
        let first = top
            .iter()
            .find(|e| e["query_id"] == q && e["rank"] == 1)
            .unwrap();
        let line = format!(
            "  #1 {:+.4e}  removed {:+.3e} nats",
            first["score"].as_f64().unwrap(),
            first["removal_change"].as_f64().unwrap()
        );
        assert!(text.contains(&line), "{line} not in\n{text}");
    }
    assert_eq!(
        text.matches("  #").count(),
        6,
        "three sources per query: {text}"
    );
}

#[test]
fn a_run_report_holds_every_method_the_recall_table_and_the_own_sentence() {
    let (dir, model, corpus, queries) = setup("run");
    let factors = dir.join("factors");
    fit(&model, &corpus, &factors, "ekfac");
    let out = dir.join("results");
    ok(&score_args(&model, &factors, &corpus, &queries, &out));
    let top = lines(&out.join("top_k.jsonl"));
    let ranked = |q: &str| -> Vec<(String, Option<f64>)> {
        top.iter()
            .filter(|e| e["query_id"] == q && e["direction"] == "top")
            .map(|e| {
                (
                    e["sequence_id"].as_str().unwrap().to_string(),
                    e["score"].as_f64(),
                )
            })
            .collect()
    };
    // Query a's "own sentence": the line of its second-ranked sequence.
    let second = ranked("a")[1].0.clone();
    let own_line: usize = second.split(':').next().unwrap().parse().unwrap();
    let run = RunContext {
        rankings: vec![
            Ranking {
                method: "ekfac".into(),
                per_query: [
                    ("a".to_string(), ranked("a")),
                    ("b".to_string(), ranked("b")),
                ]
                .into(),
            },
            Ranking {
                method: "tf-idf (bm25)".into(),
                per_query: [("a".to_string(), vec![("29:0".to_string(), None)])].into(),
            },
        ],
        recall: vec![RecallRow {
            method: "ekfac".into(),
            recall_at_1: 0.0,
            recall_at_10: 1.0,
        }],
        n_facts: 1,
        own_line: [("a".to_string(), own_line)].into(),
    };
    let html = dir.join("report.html");
    report::write_run_report(&out, &html, &Default::default(), &run).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("Recall of each fact's own sentence (1 fact queries)"));
    assert!(page.contains("<td>ekfac</td><td class=\"num\">0.000</td><td class=\"num\">1.000</td>"));
    assert!(page.contains("<th>tf-idf (bm25)</th>"));
    assert!(
        page.contains(&format!("★ <code>{second}</code>")),
        "the methods table marks the own sentence"
    );
    assert!(
        page.contains("★ own sentence</span> #2"),
        "the sequence rows mark it"
    );
    assert!(page.contains("<code>29:0</code>"));
    // A plain report has none of it.
    report::write_report(&out, &html, &Default::default()).unwrap();
    let plain = std::fs::read_to_string(&html).unwrap();
    assert!(!plain.contains("Top sources by method") && !plain.contains("★"));
}
