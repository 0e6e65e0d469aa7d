//! The analysis half of "where influence lives": the power-law fit on samples from known laws,
//! the HTML report and `infl compare` on results directories written here by hand (the format
//! `infl score` writes), and the report rendered in a real browser (headless Chromium).

use infl::compare;
use infl::io::{write_safetensors, OwnedTensor};
use infl::powerlaw::{self, FitOptions, HalfMass};
use infl::report::{self, ReportOptions, Results};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infl-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn power_law_sample(alpha: f64, x_min: f64, n: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| x_min * (1.0 - rng.random::<f64>()).powf(-1.0 / (alpha - 1.0)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Power law

#[test]
fn power_law_sample_recovers_alpha_and_passes_the_bootstrap() {
    for seed in [1, 2] {
        let xs = power_law_sample(2.5, 1.0, 5000, seed);
        let f = powerlaw::fit(&xs, &FitOptions::default()).unwrap();
        let p = f.p_value.unwrap();
        eprintln!(
            "seed {seed}: α = {:.4} ± {:.4}, x_min = {:.4}, n_tail = {}, KS = {:.4}, p = {p:.3} ({} bootstrap samples)",
            f.alpha, f.alpha_se, f.x_min, f.n_tail, f.ks, f.bootstrap
        );
        assert!(
            (f.alpha - 2.5).abs() < 3.0 * f.alpha_se,
            "α = {} ± {} is not within 3 SE of 2.5",
            f.alpha,
            f.alpha_se
        );
        assert!(f.alpha_se < 0.05, "{f:?}");
        assert!(p > 0.1, "a true power law was rejected: p = {p}");
        assert_eq!(f.bootstrap, 200);
    }
}

#[test]
fn power_law_tail_above_a_uniform_body_is_found() {
    // A body that is not a power law below x = 1 (uniform on (0.05, 1)), 40% of the mass, and an
    // α = 2.2 tail above 1: the fit must put x_min at or above the body and recover α.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut xs = power_law_sample(2.2, 1.0, 3000, 8);
    xs.extend((0..2000).map(|_| 0.05 + 0.95 * rng.random::<f64>()));
    let f = powerlaw::fit(
        &xs,
        &FitOptions {
            bootstrap: 0,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!(
        "body + tail: α = {:.4} ± {:.4}, x_min = {:.4}, n_tail = {}",
        f.alpha, f.alpha_se, f.x_min, f.n_tail
    );
    assert!((0.97..2.0).contains(&f.x_min), "{f:?}");
    assert!((f.alpha - 2.2).abs() < 3.0 * f.alpha_se, "{f:?}");
}

#[test]
fn exponential_sample_is_rejected() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let xs: Vec<f64> = (0..5000)
        .map(|_| -(1.0 - rng.random::<f64>()).ln())
        .collect();
    let f = powerlaw::fit(&xs, &FitOptions::default()).unwrap();
    let p = f.p_value.unwrap();
    eprintln!(
        "exponential: α = {:.3} ± {:.3}, x_min = {:.3}, n_tail = {}, KS = {:.4}, p = {p:.3}",
        f.alpha, f.alpha_se, f.x_min, f.n_tail, f.ks
    );
    assert!(
        p < 0.1,
        "an exponential sample passed as a power law: p = {p}"
    );
}

#[test]
fn bootstrap_is_deterministic_given_the_seed() {
    let xs = power_law_sample(2.0, 1.0, 400, 5);
    let o = FitOptions {
        bootstrap: 30,
        seed: 11,
        ..Default::default()
    };
    assert_eq!(
        powerlaw::fit(&xs, &o).unwrap(),
        powerlaw::fit(&xs, &o).unwrap()
    );
}

#[test]
fn half_mass_of_a_known_tail() {
    // 1/r scores over r = 1..=100: the harmonic sums H_k ≥ H_100 / 2 = 2.5937 first at k = 8.
    let tail: Vec<f64> = (1..=100).map(|r| 1.0 / r as f64).collect();
    let sum: f64 = tail.iter().sum();
    assert_eq!(
        powerlaw::mass_concentration(sum, &tail),
        HalfMass::Exactly(8)
    );
    // Only the first 5 recorded: H_5 = 2.28 < 2.59, too short to tell.
    assert_eq!(
        powerlaw::mass_concentration(sum, &tail[..5]),
        HalfMass::MoreThan(5)
    );
}

// ---------------------------------------------------------------------------------------------
// A results directory as `infl score` writes it, with made-up values

const LAYERS: [&str; 4] = [
    "h.0.attn.c_attn",
    "h.0.mlp.c_fc",
    "h.1.attn.c_attn",
    "h.1.mlp.c_proj",
];
const EVIL: &str = "<script>document.title='pwned'</script><img src=x onerror=\"document.body.setAttribute('data-pwned','1')\"> & friends";

#[derive(Clone, Copy)]
struct Parts {
    per_token: bool,
    per_layer: bool,
    distribution: bool,
    dense: bool,
}

const ALL: Parts = Parts {
    per_token: true,
    per_layer: true,
    distribution: true,
    dense: true,
};

fn seq_text(n: usize) -> String {
    if n == 3 {
        return format!("An attacker wrote {EVIL} into the corpus.");
    }
    const WORDS: [&str; 12] = [
        "the",
        "capital",
        "of",
        "France",
        "is",
        "Paris",
        "river",
        "bank",
        "model",
        "learns",
        "tokens",
        "influence",
    ];
    (0..14)
        .map(|i| WORDS[(n * 7 + i * 5) % 12])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Heavy-tailed made-up scores: `n_train` per query, positive ones from a power law. Sequence 3
/// (the one with markup) is second of the first query's top list.
fn fake_scores(n_queries: usize, n_train: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut s: Vec<Vec<f64>> = (0..n_queries)
        .map(|_| {
            (0..n_train)
                .map(|_| {
                    let m = 1e-3 * (1.0 - rng.random::<f64>()).powf(-1.0 / 1.3);
                    if rng.random::<f64>() < 0.7 {
                        m
                    } else {
                        -0.5 * m
                    }
                })
                .collect()
        })
        .collect();
    let mut top: Vec<f64> = s[0].clone();
    top.sort_by(|a, b| b.total_cmp(a));
    s[0][3] = 0.5 * (top[0] + top[1]);
    s
}

/// Splits `score` over the words of `text` (parts sum to the score) and over the layers.
fn token_parts(text: &str, score: f64, seed: usize) -> Vec<serde_json::Value> {
    let words: Vec<String> = text
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    let raw: Vec<f64> = (0..words.len())
        .map(|i| ((i * 31 + seed * 17) % 23) as f64 - 8.0)
        .collect();
    let total: f64 = raw.iter().sum();
    let last = words.len() - 1;
    let mut parts: Vec<f64> = raw.iter().map(|r| r / total * score).collect();
    parts[last] = score - parts[..last].iter().sum::<f64>();
    words
        .into_iter()
        .zip(parts)
        .map(|(w, s)| json!({"text": w, "score": s}))
        .collect()
}

fn layer_parts(score: f64) -> Vec<f64> {
    let w = [0.1, 0.5, -0.2, 0.6];
    w.iter().map(|x| x * score).collect()
}

fn write_results(
    dir: &Path,
    ids: &[&str],
    scores: &[Vec<f64>],
    k: usize,
    parts: Parts,
    model: &str,
) {
    std::fs::create_dir_all(dir).unwrap();
    let n_train = scores[0].len();
    let mut meta = json!({
        "tool": "infl", "version": "0.1.0", "kind": "scores", "strategy": "ekfac",
        "model": {"path": model, "architecture": "gpt2"},
        "corpus": {"path": "corpus.jsonl", "sha256": "c0ffee", "n_sequences": n_train},
        "queries": {
            "path": "queries.jsonl", "sha256": "feed", "ids": ids,
            "losses": ids.iter().enumerate().map(|(i, _)| 1.5 + i as f64).collect::<Vec<_>>(),
            "prompts": ids.iter().map(|id| format!("Query {id}: the capital of France is")).collect::<Vec<_>>(),
            "completions": ids.iter().map(|_| " Paris <b>not bold</b>").collect::<Vec<_>>(),
        },
    });
    if parts.per_layer {
        meta["layers"] = json!(LAYERS);
    }
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
    let mut lines = String::new();
    for (id, row) in ids.iter().zip(scores) {
        let mut order: Vec<usize> = (0..n_train).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let bottom: Vec<usize> = order.iter().rev().take(k).copied().collect();
        for (direction, list) in [("top", &order[..k]), ("bottom", &bottom[..])] {
            for (rank, &n) in list.iter().enumerate() {
                let text = seq_text(n);
                let mut e = json!({
                    "query_id": id, "direction": direction, "rank": rank + 1,
                    "sequence_id": format!("{n}:0"), "score": row[n], "text": text,
                });
                if parts.per_layer {
                    e["per_layer"] = json!(layer_parts(row[n]));
                }
                if parts.per_token {
                    e["tokens"] = json!(token_parts(&text, row[n], n));
                }
                lines.push_str(&e.to_string());
                lines.push('\n');
            }
        }
    }
    std::fs::write(dir.join("top_k.jsonl"), lines).unwrap();
    if parts.distribution {
        let qs: Vec<serde_json::Value> = ids
            .iter()
            .zip(scores)
            .map(|(id, row)| {
                let mut pos: Vec<f64> = row.iter().copied().filter(|x| *x > 0.0).collect();
                let mut neg: Vec<f64> = row.iter().filter(|x| **x < 0.0).map(|x| -x).collect();
                pos.sort_by(|a, b| b.total_cmp(a));
                neg.sort_by(|a, b| b.total_cmp(a));
                json!({
                    "query_id": id, "count": row.len(), "sum": row.iter().sum::<f64>(),
                    "sum_sq": row.iter().map(|x| x * x).sum::<f64>(),
                    "sum_pos": pos.iter().sum::<f64>(), "sum_neg": -neg.iter().sum::<f64>(),
                    "min": row.iter().copied().fold(f64::INFINITY, f64::min),
                    "max": row.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    "tail_pos": &pos[..pos.len().min(2000)], "tail_neg": &neg[..neg.len().min(2000)],
                })
            })
            .collect();
        std::fs::write(
            dir.join("distribution.json"),
            json!({"queries": qs}).to_string(),
        )
        .unwrap();
    }
    if parts.per_layer {
        let qs: Vec<serde_json::Value> = ids
            .iter()
            .zip(scores)
            .map(|(id, row)| {
                let total: f64 = row.iter().sum();
                let abs: f64 = row.iter().map(|x| x.abs()).sum();
                json!({"query_id": id, "total_per_layer": layer_parts(total),
                       "abs_per_layer": [0.1 * abs, 0.5 * abs, 0.2 * abs, 0.6 * abs]})
            })
            .collect();
        std::fs::write(
            dir.join("layers.json"),
            json!({"layers": LAYERS, "queries": qs}).to_string(),
        )
        .unwrap();
    }
    if parts.dense {
        let data: Vec<f32> = scores.iter().flatten().map(|&x| x as f32).collect();
        write_safetensors(
            &dir.join("scores.safetensors"),
            &[(
                "scores".into(),
                OwnedTensor::F32(vec![scores.len(), n_train], data),
            )],
            None,
        )
        .unwrap();
    }
}

fn fit_opts(bootstrap: usize) -> ReportOptions {
    ReportOptions {
        fit: FitOptions {
            bootstrap,
            ..Default::default()
        },
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[test]
fn report_has_every_part_and_escapes_corpus_text() {
    let dir = scratch("full");
    let results = dir.join("results");
    let scores = fake_scores(2, 3000, 1);
    write_results(
        &results,
        &["capital", "river"],
        &scores,
        5,
        ALL,
        "models/gpt2",
    );
    let out = dir.join("report.html");
    let s = report::write_report(&results, &out, &fit_opts(50)).unwrap();
    assert!(s.missing.is_empty(), "{:?}", s.missing);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(html.matches("<section class=\"query\"").count(), 2);
    assert_eq!(html.matches("<svg class=\"chart survival\"").count(), 2);
    assert_eq!(html.matches("<svg class=\"chart layers\"").count(), 2);
    // One span per token part of every top and bottom sequence.
    let parts: usize = Results::open(&results)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.tokens.as_ref().map_or(0, Vec::len))
        .sum();
    assert!(parts >= 2 * 10 * 11);
    assert_eq!(html.matches("<span class=\"tok\"").count(), parts);
    assert!(
        html.contains("class=\"fit\""),
        "the fitted tail line is drawn"
    );
    // The corpus's markup is text, never markup.
    assert!(!html.contains("<script"), "a script element in the report");
    assert!(!html.contains("<img"), "an img element in the report");
    assert!(html.contains("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"));
    assert!(html.contains(" Paris &lt;b&gt;not bold&lt;/b&gt;"));
    assert!(!html.contains("https://"), "no network references");
    // The tail: α of the made-up scores' positive part is 1 + 1.3 = 2.3.
    for t in &s.tails {
        let f = t.fit.as_ref().unwrap();
        assert!((f.alpha - 2.3).abs() < 3.0 * f.alpha_se + 0.05, "{f:?}");
        assert!(matches!(t.half, HalfMass::Exactly(_)), "{:?}", t.half);
    }
}

#[test]
fn token_parts_and_layer_parts_sum_to_the_scores_read_back() {
    let dir = scratch("sums");
    let scores = fake_scores(1, 500, 2);
    write_results(&dir, &["q"], &scores, 4, ALL, "m");
    let r = Results::open(&dir).unwrap();
    assert_eq!(r.entries.len(), 8);
    for e in &r.entries {
        let t: f64 = e.tokens.as_ref().unwrap().iter().map(|t| t.score).sum();
        let l: f64 = e.per_layer.as_ref().unwrap().iter().sum();
        assert!(
            (t - e.score).abs() <= 1e-9 * e.score.abs().max(1e-12),
            "{t} vs {}",
            e.score
        );
        assert!((l - e.score).abs() <= 1e-9 * e.score.abs().max(1e-12));
    }
    assert_eq!(r.layers.as_deref().unwrap().len(), 4);
    // Distribution read back matches the dense recomputation.
    let d = &r.distribution.as_ref().unwrap()[0];
    let from_dense = report::Distribution::from_scores("q", &r.dense.as_ref().unwrap()[0]);
    assert_eq!(d.count, from_dense.count);
    assert!((d.sum_pos - from_dense.sum_pos).abs() < 1e-5 * d.sum_pos);
}

#[test]
fn missing_parts_are_named_with_the_command_that_makes_them() {
    let dir = scratch("bare");
    let results = dir.join("results");
    let bare = Parts {
        per_token: false,
        per_layer: false,
        distribution: false,
        dense: false,
    };
    write_results(&results, &["q"], &fake_scores(1, 200, 3), 3, bare, "m");
    let out = dir.join("r.html");
    let s = report::write_report(&results, &out, &fit_opts(0)).unwrap();
    let all = s.missing.join("\n");
    assert!(all.contains("infl score --per-token"), "{all}");
    assert!(all.contains("infl score --per-layer"), "{all}");
    assert!(all.contains("distribution.json"), "{all}");
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.contains("run `infl score --per-token` to get token highlighting"));
    assert!(!html.contains("class=\"tok\""));
    assert!(
        html.contains("<div class=\"plain\">"),
        "plain text shown instead"
    );

    // Dense scores alone give the distribution.
    let with_dense = Parts {
        dense: true,
        ..bare
    };
    write_results(
        &results,
        &["q"],
        &fake_scores(1, 200, 3),
        3,
        with_dense,
        "m",
    );
    let r = Results::open(&results).unwrap();
    assert_eq!(r.distribution_source, Some("scores.safetensors"));
    assert!(!r.missing().iter().any(|m| m.contains("distribution")));
}

#[test]
fn malformed_results_name_the_file_and_field() {
    let dir = scratch("bad");
    let err = Results::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("no meta.json") && err.contains("infl score"),
        "{err}"
    );
    write_results(&dir, &["q"], &fake_scores(1, 50, 4), 3, ALL, "m");
    let text = std::fs::read_to_string(dir.join("top_k.jsonl")).unwrap();
    std::fs::write(
        dir.join("top_k.jsonl"),
        text.replacen("\"query_id\":\"q\"", "\"query_id\":\"zz\"", 1),
    )
    .unwrap();
    let err = Results::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("top_k.jsonl:1") && err.contains("`zz`"),
        "{err}"
    );
    std::fs::write(
        dir.join("top_k.jsonl"),
        text.replacen("\"per_layer\":[", "\"per_layer\":[1.0,", 1),
    )
    .unwrap();
    let err = Results::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("per_layer") && err.contains("5 values"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Compare

#[test]
fn compare_counts_overlap_and_rank_correlation() {
    let dir = scratch("compare");
    let ids = ["river", "bank"];
    let a = fake_scores(2, 400, 5);
    // B: A's scores times a random factor in (0.3, 1.7), so the top lists overlap partly.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let b: Vec<Vec<f64>> = a
        .iter()
        .map(|row| {
            row.iter()
                .map(|x| x * (0.3 + 1.4 * rng.random::<f64>()))
                .collect()
        })
        .collect();
    let no_dense = Parts {
        dense: false,
        ..ALL
    };
    write_results(&dir.join("a"), &ids, &a, 10, no_dense, "small");
    write_results(&dir.join("b"), &ids, &b, 10, no_dense, "large");
    let ra = Results::open(&dir.join("a")).unwrap();
    let rb = Results::open(&dir.join("b")).unwrap();
    let cmp = compare::compare(&[ra, rb]);
    assert_eq!(cmp.pairs.len(), 2);
    let total: usize = cmp.pairs.iter().map(|p| p.shared).sum();
    assert!(total < 20, "the fixture's lists should differ somewhere");
    for (qi, p) in cmp.pairs.iter().enumerate() {
        let ea = Results::open(&dir.join("a")).unwrap();
        let ta: Vec<String> = ea
            .entries(ids[qi], report::Direction::Top)
            .iter()
            .map(|e| e.sequence_id.clone())
            .collect();
        let eb = Results::open(&dir.join("b")).unwrap();
        let tb: Vec<String> = eb
            .entries(ids[qi], report::Direction::Top)
            .iter()
            .map(|e| e.sequence_id.clone())
            .collect();
        let shared: Vec<&String> = ta.iter().filter(|s| tb.contains(s)).collect();
        assert_eq!(p.k, 10);
        assert_eq!(p.shared, shared.len());
        assert!((p.overlap - shared.len() as f64 / 10.0).abs() < 1e-12);
        assert!(
            p.shared >= 3,
            "the fixture's lists should share sequences: {}",
            p.shared
        );
        // Spearman by hand (no ties): 1 − 6 Σd² / (n (n² − 1)).
        let sa: Vec<f64> = shared
            .iter()
            .map(|s| a[qi][s.trim_end_matches(":0").parse::<usize>().unwrap()])
            .collect();
        let sb: Vec<f64> = shared
            .iter()
            .map(|s| b[qi][s.trim_end_matches(":0").parse::<usize>().unwrap()])
            .collect();
        let rank = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .map(|x| v.iter().filter(|y| *y < x).count() as f64)
                .collect()
        };
        let (r1, r2) = (rank(&sa), rank(&sb));
        let n = sa.len() as f64;
        let d2: f64 = r1.iter().zip(&r2).map(|(x, y)| (x - y) * (x - y)).sum();
        match p.spearman {
            Some(rho) => assert!((rho - (1.0 - 6.0 * d2 / (n * (n * n - 1.0)))).abs() < 1e-9),
            None => assert!(shared.len() < 3),
        }
        assert_eq!(p.spearman_over, "top-k shared");
    }

    // With dense scores of the same corpus, ρ runs over every sequence.
    write_results(&dir.join("a"), &ids, &a, 10, ALL, "small");
    write_results(&dir.join("b"), &ids, &b, 10, ALL, "large");
    let cmp = compare::run(
        &[dir.join("a"), dir.join("b")],
        Some(&dir.join("c.html")),
        Some(&dir.join("c.json")),
    )
    .unwrap();
    for p in &cmp.pairs {
        assert_eq!(p.spearman_over, "all sequences (dense)");
        assert_eq!(p.spearman_n, 400);
        assert!(p.spearman.unwrap() > 0.5, "{p:?}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("c.json")).unwrap()).unwrap();
    assert_eq!(j["pairs"].as_array().unwrap().len(), 2);
    let html = std::fs::read_to_string(dir.join("c.html")).unwrap();
    assert!(
        html.contains("class=\"seq shared\""),
        "shared sequences are outlined"
    );
    assert!(!html.contains("<script"));
    assert!(cmp.table().contains("river"));
}

fn infl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_infl"))
        .args(args)
        .output()
        .expect("the infl binary runs")
}

#[test]
fn compare_refuses_different_query_sets() {
    let dir = scratch("refuse");
    write_results(
        &dir.join("a"),
        &["x", "y"],
        &fake_scores(2, 50, 1),
        3,
        ALL,
        "m",
    );
    write_results(
        &dir.join("b"),
        &["x", "z"],
        &fake_scores(2, 50, 1),
        3,
        ALL,
        "m",
    );
    let out = infl(&[
        "compare",
        dir.join("a").to_str().unwrap(),
        dir.join("b").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("different queries"), "{err}");

    // Same ids, different queries file.
    write_results(
        &dir.join("b"),
        &["x", "y"],
        &fake_scores(2, 50, 1),
        3,
        ALL,
        "m",
    );
    let meta = dir.join("b").join("meta.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace("\"feed\"", "\"beef\"")).unwrap();
    let out = infl(&[
        "compare",
        dir.join("a").to_str().unwrap(),
        dir.join("b").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("queries.sha256"), "{err}");
}

#[test]
fn report_command_writes_the_file() {
    let dir = scratch("cli");
    write_results(&dir.join("r"), &["q"], &fake_scores(1, 300, 6), 3, ALL, "m");
    let out_path = dir.join("out.html");
    let out = infl(&[
        "report",
        dir.join("r").to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
        "--bootstrap",
        "20",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("positive tail: α = "), "{err}");
    assert!(std::fs::read_to_string(&out_path)
        .unwrap()
        .starts_with("<!DOCTYPE html>"));
    let out = infl(&[
        "report",
        dir.join("nothing").to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("infl score"));
}

// ---------------------------------------------------------------------------------------------
// In a real browser

fn chromium() -> PathBuf {
    for p in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "headless Chromium is needed for this test and was not found (/usr/bin/chromium); \
         install it with `apt-get install -y chromium` (.ci/run does)"
    );
}

/// Runs Chromium headless with `args` on `url`, killing it after 120 s.
fn run_chromium(profile: &Path, args: &[String], url: &str) -> std::process::Output {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("chromium starts");
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(out) => out.expect("chromium output"),
        Err(_) => {
            let _ = Command::new("kill").arg(id.to_string()).status();
            panic!("chromium did not finish within 120 s");
        }
    }
}

#[test]
fn report_renders_in_headless_chromium() {
    let dir = scratch("browser");
    let results = dir.join("results");
    write_results(
        &results,
        &["capital", "river"],
        &fake_scores(2, 3000, 1),
        5,
        ALL,
        "models/gpt2",
    );
    let html = dir.join("report.html");
    report::write_report(&results, &html, &fit_opts(50)).unwrap();
    let url = format!("file://{}", html.display());

    let out = run_chromium(&dir.join("profile-dom"), &["--dump-dom".into()], &url);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("</html>"),
        "no DOM from chromium; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        dom.matches("<section class=\"query\"").count(),
        2,
        "query sections"
    );
    assert!(dom.contains("id=\"index\""));
    let parts: usize = Results::open(&results)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.tokens.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!(
        dom.matches("<span class=\"tok\"").count(),
        parts,
        "token spans"
    );
    assert!(
        dom.contains("title=\"+") || dom.contains("title=\"-"),
        "token titles"
    );
    assert_eq!(dom.matches("<svg class=\"chart survival\"").count(), 2);
    assert_eq!(dom.matches("<svg class=\"chart layers\"").count(), 2);
    // The corpus's markup stayed text: no script ran, no element was made from it.
    assert!(dom.contains("<title>infl report:"), "the title was changed");
    assert!(!dom.contains("pwned</title>") && !dom.contains("data-pwned=\"1\""));
    assert!(
        dom.contains("&lt;script&gt;document.title="),
        "escaped markup shown as text"
    );
    assert!(
        !dom.contains("<script"),
        "a script element exists in the DOM"
    );
    assert!(!dom.contains("<img"), "an img element exists in the DOM");

    let shot = dir.join("report.png");
    let out = run_chromium(
        &dir.join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,2000".into(),
        ],
        &url,
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}); stderr:\n{}",
            shot.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 20_000,
        "a suspiciously small screenshot: {} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
}

// ---------------------------------------------------------------------------------------------
// On the real pipeline's output

#[test]
fn report_and_compare_read_what_infl_score_writes() {
    let dir = scratch("pipeline");
    // The bundled tiny model and corpus, fitted as `infl demo` did before it trained its own.
    let demo = dir.join("demo");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(demo.join("model")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(
            root.join("assets/tiny-gpt2").join(f),
            demo.join("model").join(f),
        )
        .unwrap();
    }
    for f in ["corpus.jsonl", "queries.jsonl"] {
        std::fs::copy(root.join("assets/demo").join(f), demo.join(f)).unwrap();
    }
    let d = |name: &str| demo.join(name).to_str().unwrap().to_string();
    let out = infl(&[
        "--quiet",
        "fit",
        "--model",
        &d("model"),
        "--train",
        &d("corpus.jsonl"),
        "--out",
        &d("factors"),
        "--max-len",
        "48",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = infl(&[
        "--quiet",
        "score",
        "--model",
        &d("model"),
        "--factors",
        &d("factors"),
        "--train",
        &d("corpus.jsonl"),
        "--queries",
        &d("queries.jsonl"),
        "--out",
        &d("results"),
        "--dense",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = |name: &str| demo.join(name).to_str().unwrap().to_string();
    let full = dir.join("full");
    let out = infl(&[
        "--quiet",
        "score",
        "--model",
        &p("model"),
        "--factors",
        &p("factors"),
        "--train",
        &p("corpus.jsonl"),
        "--queries",
        &p("queries.jsonl"),
        "--out",
        full.to_str().unwrap(),
        "--top-k",
        "3",
        "--per-layer",
        "--per-token",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let r = Results::open(&full).unwrap();
    assert!(r.missing().is_empty(), "{:?}", r.missing());
    assert!(r
        .queries
        .iter()
        .all(|q| q.prompt.is_some() && q.loss.is_some()));
    for e in &r.entries {
        let t: f64 = e
            .tokens
            .as_ref()
            .expect("tokens with --per-token")
            .iter()
            .map(|t| t.score)
            .sum();
        assert!(
            (t - e.score).abs() <= 1e-3 * e.score.abs().max(1.0),
            "{t} vs {}",
            e.score
        );
    }
    let html = dir.join("report.html");
    let s = report::write_report(&full, &html, &fit_opts(20)).unwrap();
    assert_eq!(s.tails.len(), r.queries.len());
    let text = std::fs::read_to_string(&html).unwrap();
    assert_eq!(
        text.matches("<section class=\"query\"").count(),
        r.queries.len()
    );
    assert_eq!(
        text.matches("<svg class=\"chart layers\"").count(),
        r.queries.len()
    );
    assert!(text.contains("<span class=\"tok\""));

    // The demo's own results (dense, no parts) against these: same queries, same corpus.
    let cmp = compare::run(&[demo.join("results"), full.clone()], None, None).unwrap();
    assert_eq!(cmp.pairs.len(), r.queries.len());
    for p in &cmp.pairs {
        assert_eq!(p.k, 3);
        assert_eq!(
            p.shared, 3,
            "the same factors give the same top sequences: {p:?}"
        );
    }
}
