//! `fit --seeds 3` and the stability of each query's top-k across the three fits, on the
//! bundled model: the seed fit's scores are a plain `fit --seed S` + `score`'s exactly, and
//! every number of stability.json is recomputed from three plain runs that list every
//! sequence (`--top-k` above the corpus size).

mod common;

use common::{ok, s, scratch};
use serde_json::Value;
use std::path::Path;

fn lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("top_k.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Query id's top list: (sequence id, score), best first.
fn ranking(entries: &[Value], query: &str) -> Vec<(String, f64)> {
    entries
        .iter()
        .filter(|e| e["query_id"] == query && e["direction"] == "top")
        .map(|e| {
            (
                e["sequence_id"].as_str().unwrap().to_string(),
                e["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn seeds_stability_matches_three_plain_runs() {
    let dir = scratch("stability", "seeds");
    let (model, corpus, queries) = common::bundled();
    let common = ["--max-len", "48", "--batch-size", "8"];
    let fit = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "fit",
            "--model",
            s(&model),
            "--train",
            s(&corpus),
            "--out",
            s(out),
        ];
        a.extend(common);
        a.extend(extra);
        ok(&a);
    };
    let score = |factors: &Path, out: &Path, extra: &[&str]| {
        let mut a = vec![
            "score",
            "--model",
            s(&model),
            "--factors",
            s(factors),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--out",
            s(out),
        ];
        a.extend(common);
        a.extend(extra);
        ok(&a);
    };
    let k = 10;
    let seeds = [5u64, 6, 7];
    let three = dir.join("three");
    fit(&three, &["--seed", "5", "--seeds", "3"]);
    // Scoring refuses what does not compose with the fits' one pass, naming a fit to score alone.
    for extra in [&["--normalize", "cosine"][..], &["--shard", "0/2"]] {
        let mut a = vec![
            "score",
            "--model",
            s(&model),
            "--factors",
            s(&three),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--out",
        ];
        let refused = dir.join("refused");
        a.push(s(&refused));
        a.extend(common);
        a.extend(extra);
        let out = common::run(&a);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{extra:?}: {stderr}");
        assert!(stderr.contains("seeds/6"), "{stderr}");
    }
    let stable_out = dir.join("stable");
    // A strict threshold, so that the demo model's rather stable rankings flag some queries.
    score(
        &three,
        &stable_out,
        &["--top-k", "10", "--stable-overlap", "0.8"],
    );
    let mut plain = Vec::new();
    for seed in seeds {
        let f = dir.join(format!("f{seed}"));
        fit(&f, &["--seed", &seed.to_string()]);
        let out = dir.join(format!("p{seed}"));
        score(&f, &out, &["--top-k", "100000"]);
        plain.push(lines(&out));
    }
    // The seed fit is the plain seed-5 fit, and its other fits the plain seed-6 and 7 fits.
    let bytes = |d: &Path| std::fs::read(d.join("factors.safetensors")).unwrap();
    assert!(bytes(&three) == bytes(&dir.join("f5")));
    assert!(bytes(&three.join("seeds/7")) == bytes(&dir.join("f7")));

    let got = lines(&stable_out);
    // Every line of top_k.jsonl but the stability fields is the plain seed-5 run's, bottom
    // lines included.
    let plain5 = dir.join("p5-top10");
    score(&dir.join("f5"), &plain5, &["--top-k", "10"]);
    let stripped: Vec<Value> = got
        .iter()
        .cloned()
        .map(|mut e| {
            e.as_object_mut().unwrap().remove("stability");
            e
        })
        .collect();
    assert_eq!(stripped, lines(&plain5));
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(stable_out.join("stability.json")).unwrap())
            .unwrap();
    assert_eq!(file["seeds"], serde_json::json!([5, 6, 7]));
    let threshold = file["stable_overlap"].as_f64().unwrap();
    let mut flagged = Vec::new();
    for q in file["queries"].as_array().unwrap() {
        let id = q["query_id"].as_str().unwrap();
        let full: Vec<Vec<(String, f64)>> = plain.iter().map(|p| ranking(p, id)).collect();
        // The seed fit's scores: exactly the plain seed-5 run's top 10.
        let mine = ranking(&got, id);
        assert_eq!(mine, full[0][..k].to_vec(), "{id}");
        // Overlap: mean pairwise Jaccard of the three top-10 sets; shared: in all three.
        let sets: Vec<Vec<&String>> = full
            .iter()
            .map(|r| r[..k].iter().map(|(s, _)| s).collect())
            .collect();
        let jaccard = |a: &Vec<&String>, b: &Vec<&String>| {
            let inter = a.iter().filter(|x| b.contains(x)).count() as f64;
            inter / ((a.len() + b.len()) as f64 - inter)
        };
        let overlap = (jaccard(&sets[0], &sets[1])
            + jaccard(&sets[0], &sets[2])
            + jaccard(&sets[1], &sets[2]))
            / 3.0;
        let shared = sets[0]
            .iter()
            .filter(|x| sets[1].contains(x) && sets[2].contains(x))
            .count() as f64
            / k as f64;
        assert!(
            (q["overlap"].as_f64().unwrap() - overlap).abs() < 1e-12,
            "{id}: {q} vs {overlap}"
        );
        assert!(
            (q["shared"].as_f64().unwrap() - shared).abs() < 1e-12,
            "{id}"
        );
        assert_eq!(q["stable"].as_bool(), Some(overlap >= threshold));
        if overlap < threshold {
            flagged.push(id.to_string());
        }
        // Each top sequence: its rank and score in every plain run.
        for (r, t) in q["top"].as_array().unwrap().iter().enumerate() {
            let seq = t["sequence_id"].as_str().unwrap();
            assert_eq!(seq, mine[r].0);
            let ranks: Vec<usize> = full
                .iter()
                .map(|f| f.iter().position(|(s, _)| s == seq).unwrap() + 1)
                .collect();
            let scores: Vec<f64> = full
                .iter()
                .map(|f| f.iter().find(|(s, _)| s == seq).unwrap().1)
                .collect();
            assert_eq!(t["ranks"], serde_json::json!(ranks), "{id} {seq}");
            assert_eq!(t["scores"], serde_json::json!(scores), "{id} {seq}");
            assert_eq!(t["rank_min"], *ranks.iter().min().unwrap());
            assert_eq!(t["rank_max"], *ranks.iter().max().unwrap());
            let mean = scores.iter().sum::<f64>() / 3.0;
            let std = (scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
            let close =
                |a: &Value, b: f64| (a.as_f64().unwrap() - b).abs() <= 1e-12 * b.abs().max(1e-300);
            assert!(close(&t["score_std"], std), "{id} {seq}: {t}");
            assert!(close(&t["score_rel_std"], std / mean.abs()), "{id} {seq}");
            // The same numbers on the top_k.jsonl line.
            let line = got
                .iter()
                .find(|e| e["query_id"] == id && e["direction"] == "top" && e["rank"] == r + 1)
                .unwrap();
            assert_eq!(line["stability"]["ranks"], t["ranks"]);
            assert_eq!(line["stability"]["score_std"], t["score_std"]);
        }
    }
    eprintln!("not stable: {flagged:?}");
    assert_eq!(threshold, 0.8);
    assert!(!flagged.is_empty() && flagged.len() < 8, "{flagged:?}");

    // The report's stability panel flags exactly the queries below the threshold.
    let html = dir.join("report.html");
    ok(&["report", s(&stable_out), "--out", s(&html)]);
    let page = std::fs::read_to_string(&html).unwrap();
    let panel = &page[page.find("id=\"stability\"").expect("a stability panel")..];
    let panel = &panel[..panel.find("</table>").unwrap()];
    assert_eq!(
        panel.matches("not stable</b></td></tr>").count(),
        flagged.len(),
        "{panel}"
    );
    for id in &flagged {
        let row = &panel[panel.find(&format!("<tr><td>{id}</td>")).unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(row.contains("not stable"), "{row}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn seeds_refuse_what_they_do_not_support() {
    let dir = scratch("stability", "refusals");
    let (model, corpus, _) = common::bundled();
    let fit = |extra: &[&str]| {
        let mut a = vec!["fit", "--model", s(&model), "--train", s(&corpus), "--out"];
        let out = dir.join("f");
        let out = s(&out).to_string();
        a.push(&out);
        a.extend(["--max-len", "48"]);
        a.extend(extra);
        common::run(&a)
    };
    for extra in [
        &["--seeds", "2", "--fisher", "empirical"][..],
        &["--seeds", "2", "--shard", "0/2"],
        &["--seeds", "2", "--strategy", "identity"],
    ] {
        let out = fit(extra);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("--seeds"));
    }
    let out = fit(&["--seeds", "0"]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
