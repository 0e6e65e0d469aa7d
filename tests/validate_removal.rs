//! `infl validate removal` end to end on a tiny `infl train` model: every number of
//! removal.json recomputed from its own records (the retrained models' measurements in work/,
//! the score's top_k.jsonl), a killed run resumed to the same JSON, and bad input refused.

mod common;

use common::{ok, s, scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn args(model: &Path, corpus: &Path, queries: &Path, out: &Path) -> Vec<String> {
    [
        "--threads",
        "1",
        "validate",
        "removal",
        "--model",
        s(model),
        "--train",
        s(corpus),
        "--queries",
        s(queries),
        "--out",
        s(out),
        "--groups",
        "2,5",
    ]
    .map(String::from)
    .to_vec()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Ranks 1..n, no ties expected among real-valued measurements.
fn ranks(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|v| 1.0 + x.iter().filter(|w| *w < v).count() as f64)
        .collect()
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        "{what}: {a} vs {b}"
    );
}

/// Every removal's prediction is `group_removal_change` at rank k of the score's list and its
/// measurement the retrained model's −log p minus the model's; every fit is the one computed
/// here by hand from those pairs. The random groups (one per query and k, seed 0) are the
/// seeded draws, of size k, predicted from the dense scores through the same scale.
fn check_against_own_records(out: &Path, model: &Path, corpus: &Path) -> Value {
    let r = common::read_json(&out.join("removal.json"));
    let qids: Vec<&str> = r["query_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap())
        .collect();
    let removals = r["removals"].as_array().unwrap();
    assert_eq!(removals.len(), qids.len() * 2 * 3);
    check_random_groups(&r, model, corpus, out);
    let top_k: Vec<Value> = std::fs::read_to_string(out.join("run/results/top_k.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for x in removals {
        let qi = qids.iter().position(|q| *q == x["query_id"]).unwrap();
        let saved =
            common::read_json(&out.join(format!("work/{}.json", x["retrained"].as_str().unwrap())));
        let after = f(&saved["losses"][qi]);
        assert_eq!(f(&x["loss_after"]), after);
        assert_eq!(
            f(&x["measured"]),
            after - f(&r["full_model_losses"][qi]),
            "{x}"
        );
        if x["side"] == "random" {
            continue;
        }
        let k = x["k"].as_u64().unwrap();
        let list: Vec<&Value> = top_k
            .iter()
            .filter(|e| e["query_id"] == x["query_id"] && e["direction"] == x["side"])
            .filter(|e| e["rank"].as_u64().unwrap() <= k)
            .collect();
        let ids: Vec<&Value> = list.iter().map(|e| &e["sequence_id"]).collect();
        assert_eq!(
            x["removed"].as_array().unwrap().iter().collect::<Vec<_>>(),
            ids
        );
        let at_k = list.iter().find(|e| e["rank"] == k).unwrap();
        assert_eq!(x["predicted"], at_k["group_removal_change"]);
        let scores: f64 = list.iter().map(|e| f(&e["score"])).sum();
        close(
            f(&x["predicted"]),
            scores / f(&r["removal"]["divisor"]),
            "predicted",
        );
    }
    // Removing the top group of 5 sequences measurably moves −log p: retraining happened.
    assert!(removals.iter().any(|x| f(&x["measured"]).abs() > 1e-3));

    let cal = r["calibration"].as_array().unwrap();
    assert_eq!(cal.len(), 2 * 4);
    for c in cal {
        let pairs: Vec<(f64, f64)> = removals
            .iter()
            .filter(|x| {
                x["k"] == c["k"]
                    && match c["side"].is_null() {
                        true => x["side"] != "random",
                        false => x["side"] == c["side"],
                    }
            })
            .map(|x| (f(&x["predicted"]), f(&x["measured"])))
            .collect();
        let (p, m): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
        assert_eq!(c["n"].as_u64().unwrap() as usize, p.len());
        let n = p.len() as f64;
        let (mp, mm) = (p.iter().sum::<f64>() / n, m.iter().sum::<f64>() / n);
        let sxy: f64 = pairs.iter().map(|(a, b)| (a - mp) * (b - mm)).sum();
        let sxx: f64 = p.iter().map(|a| (a - mp) * (a - mp)).sum();
        close(f(&c["slope"]), sxy / sxx, "slope");
        close(f(&c["intercept"]), mm - sxy / sxx * mp, "intercept");
        let origin =
            pairs.iter().map(|(a, b)| a * b).sum::<f64>() / p.iter().map(|a| a * a).sum::<f64>();
        close(f(&c["slope_through_origin"]), origin, "slope through 0");
        close(f(&c["pearson"]), pearson(&p, &m), "pearson");
        close(
            f(&c["spearman"]),
            pearson(&ranks(&p), &ranks(&m)),
            "spearman",
        );
    }
    // The top groups are predicted to hurt the completion, the bottom groups to help it.
    for x in removals.iter().filter(|x| x["side"] != "random") {
        let p = f(&x["predicted"]);
        assert!(if x["side"] == "top" { p > 0.0 } else { p < 0.0 }, "{x}");
    }
    r
}

/// Each query's random group of each k: `random_group(N, k, (seed 0, query, 0))` as sequence
/// ids, its prediction the dense scores of those sequences summed over the divisor.
fn check_random_groups(r: &Value, model: &Path, corpus: &Path, out: &Path) {
    let config = common::read_json(&model.join("config.json"));
    let (n_positions, vocab) = (
        config["n_positions"].as_u64().unwrap() as usize,
        config["vocab_size"].as_u64().unwrap() as usize,
    );
    let mut tok = infl::data::LazyTokenizer::new(model);
    let seqs = infl::data::read_corpus(corpus, &mut tok, n_positions, vocab)
        .unwrap()
        .sequences;
    let dense = infl::validate::exact::read_dense(&out.join("run/results")).unwrap();
    assert_eq!(
        (r["random_groups"].as_u64(), r["random_seed"].as_u64()),
        (Some(1), Some(0))
    );
    let mut seen = 0;
    for (qi, q) in r["query_ids"].as_array().unwrap().iter().enumerate() {
        for k in [2usize, 5] {
            let x: Vec<&Value> = r["removals"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| x["query_id"] == *q && x["k"] == k && x["side"] == "random")
                .collect();
            assert_eq!(x.len(), 1, "one random group per query and k");
            let want = infl::validate::removal::random_group(seqs.len(), k, (0, qi, 0));
            assert_eq!(want.len(), k);
            let ids: Vec<&str> = want.iter().map(|&i| seqs[i].id.as_str()).collect();
            let removed: Vec<&str> = x[0]["removed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(removed, ids);
            let sum: f64 = want.iter().map(|&i| dense[qi][i]).sum();
            close(
                f(&x[0]["predicted"]),
                sum / f(&r["removal"]["divisor"]),
                "random predicted",
            );
            seen += 1;
        }
    }
    assert!(seen > 0);
}

#[test]
fn removal_predictions_beside_retraining_resume_and_recompute() {
    let dir = scratch("removal", "run");
    let (corpus, queries) = common::demo_subset(&dir, 80);
    let model = dir.join("model");
    common::train_tiny(&corpus, &model, "3");

    let out = dir.join("out");
    let run = ok(&args(&model, &corpus, &queries, &out)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        table.contains("slope via 0") && table.contains("bottom") && table.contains("random"),
        "{table}"
    );
    let first = check_against_own_records(&out, &model, &corpus);
    let html = std::fs::read_to_string(out.join("removal.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 2, "one plot per k");
    assert!(html.contains("class=\"identity\"") && html.contains("y = x"));

    // Killed once its first retrained model is saved, then rerun: the saved one is reused
    // as it was, and the JSON is the uninterrupted run's.
    let resumed = dir.join("resumed");
    let a = args(&model, &corpus, &queries, &resumed);
    let marker = resumed.join("work/q0000-k2-top.json");
    assert!(
        common::kill_when(&a, &marker),
        "the run ended before it could be killed"
    );
    let saved = std::fs::read(&marker).unwrap();
    let names: Vec<PathBuf> = std::fs::read_dir(resumed.join("work"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(names.len() < 8, "killed after {} retrainings", names.len());
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        std::fs::read(&marker).unwrap(),
        saved,
        "a saved model was retrained"
    );
    let second = check_against_own_records(&resumed, &model, &corpus);
    for key in ["removals", "calibration", "full_model_losses", "query_ids"] {
        assert_eq!(first[key], second[key], "{key}");
    }
}

#[test]
fn removal_refuses_what_it_cannot_retrain_or_calibrate() {
    let dir = scratch("removal", "refusals");
    let (corpus, queries) = common::demo_subset(&dir, 80);
    let model = dir.join("model");
    common::train_tiny(&corpus, &model, "3");
    let code = |extra: &[&str], model: &Path, corpus: &Path| {
        let mut a = vec![
            "validate",
            "removal",
            "--model",
            s(model),
            "--train",
            s(corpus),
            "--queries",
            s(&queries),
        ];
        let out = dir.join("x");
        a.extend_from_slice(&["--out", s(&out)]);
        a.extend_from_slice(extra);
        let o = common::run(&a);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (c, e) = code(&["--groups", "0"], &model, &corpus);
    assert_eq!(c, Some(2), "{e}");
    let (c, e) = code(&["--strategy", "identity"], &model, &corpus);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("removal scale"), "{e}");
    let (c, e) = code(&["--groups", "2,400"], &model, &corpus);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("--groups 400"), "{e}");
    // A model with no recorded recipe.
    std::fs::create_dir_all(dir.join("bare")).unwrap();
    let (bare, bare_corpus, _) = common::random_gpt2(&dir.join("bare"), 1, 6, |_| 8, |d, t| d + t);
    let (c, e) = code(&[], &bare, &bare_corpus);
    assert_eq!(c, Some(3), "{e}");
    assert!(
        e.contains("training.json") && e.contains("infl train"),
        "{e}"
    );
    // Another corpus than the one trained on.
    let other = dir.join("other.jsonl");
    std::fs::write(&other, "{\"text\": \"something else\"}\n").unwrap();
    let (c, e) = code(&[], &model, &other);
    assert_eq!(c, Some(4), "{e}");
}
