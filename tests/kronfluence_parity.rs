//! infl against kronfluence 1.0.1 on the same model, data and queries.
//!
//! The fixture (tests/fixtures/kronfluence) was made by scripts/make_fixture.py: the bundled
//! tiny GPT-2 (assets/tiny-gpt2), the demo corpus cut into windows of 48 tokens, the demo
//! queries, and kronfluence's pairwise scores with use_empirical_fisher=True and the heuristic
//! damping (damping_factor=None), Conv1D swapped for nn.Linear, the four linears of each block
//! tracked, float32 throughout. See its meta.json for versions and settings.

use infl::curvature::{Fisher, Strategy};
use infl::influence::Damping;
use infl::io::read_safetensors;
use infl::model::ModuleSelection;
use infl::options::FitOptions;
use infl::pass::Silent;
use infl::workflow::{self, FitJob, ScoreJob};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/kronfluence").join(name)
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

fn run(strategy: Strategy, dir: &Path) -> Vec<Vec<f64>> {
    let model = root().join("assets/tiny-gpt2");
    let factors = dir.join(format!("factors-{strategy:?}"));
    workflow::fit(
        &FitJob {
            model: model.clone(),
            train: fixture("corpus_ids.jsonl"),
            out: factors.clone(),
            store: None,
            partitioning: Default::default(),
            options: FitOptions {
                strategy,
                fisher: Fisher::Empirical,
                batch_size: 16,
                seed: 0,
                modules: ModuleSelection::All,
                layers: None,
                max_len: Some(48),
                ..FitOptions::default()
            },
            run: infl::options::RunOptions {
                memory_check: true,
                shard: infl::shard::Shard::WHOLE,
                fresh: false,
                ..infl::options::RunOptions::ONCE
            },
            compute: Default::default(),
        },
        &Silent,
    )
    .unwrap();
    workflow::score(
        &ScoreJob {
            model,
            factors,
            train: fixture("corpus_ids.jsonl"),
            queries: fixture("queries_ids.jsonl"),
            out: dir.join(format!("results-{strategy:?}")),
            options: infl::options::ScoreOptions {
                damping: Damping::Heuristic,
                top_k: 5,
                dense: true,
                batch_size: 16,
                max_len: None,
                query_rank: infl::options::QueryRank(None),
                per_layer: false,
                per_token: false,
                normalize: infl::options::Normalize::None,
                prefilter: None,
                store: false,
                ..infl::options::ScoreOptions::default()
            },
            run: infl::options::RunOptions {
                shard: infl::shard::Shard::WHOLE,
                fresh: false,
                memory_check: true,
                ..infl::options::RunOptions::ONCE
            },
            index: None,
            compute: Default::default(),
            partitioning: Default::default(),
        },
        &Silent,
    )
    .unwrap();
    let t =
        read_safetensors(&dir.join(format!("results-{strategy:?}/scores.safetensors"))).unwrap();
    let (shape, v) = &t["scores"];
    (0..shape[0])
        .map(|q| v[q * shape[1]..(q + 1) * shape[1]].to_vec())
        .collect()
}

#[test]
fn scores_match_kronfluence() {
    let reference = read_safetensors(&fixture("reference.safetensors")).unwrap();
    let dir = std::env::temp_dir().join(format!("infl-kf-{}", std::process::id()));
    for (strategy, key, min_pearson) in [
        (Strategy::Ekfac, "scores.ekfac", 0.999),
        (Strategy::Kfac, "scores.kfac", 0.999),
        (Strategy::Identity, "scores.identity", 0.999),
        (Strategy::Diagonal, "scores.diagonal", 0.999),
    ] {
        let (shape, want) = &reference[key];
        let got = run(strategy, &dir);
        assert_eq!(shape, &vec![got.len(), got[0].len()], "{key}: shape");
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let mut worst_rel = 0f64;
        for (q, row) in got.iter().enumerate() {
            let want_row = &want[q * shape[1]..(q + 1) * shape[1]];
            let r = pearson(row, want_row);
            assert!(
                r >= min_pearson,
                "{key}: query {q} Pearson {r} < {min_pearson}"
            );
            for (a, b) in row.iter().zip(want_row) {
                worst_rel = worst_rel.max((a - b).abs() / scale);
            }
        }
        eprintln!("{key}: max |infl − kronfluence| / max |score| = {worst_rel:.2e}");
        assert!(
            worst_rel < 1e-3,
            "{key}: scores differ by {worst_rel:.2e} of the largest score"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn logits_match_transformers() {
    let reference = read_safetensors(&fixture("reference.safetensors")).unwrap();
    let model = infl::model::load(
        &root().join("assets/tiny-gpt2"),
        ModuleSelection::All,
        infl::model::Compute::CPU,
    )
    .unwrap();
    let corpus = std::fs::read_to_string(fixture("corpus_ids.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(corpus.lines().next().unwrap()).unwrap();
    let ids: Vec<u32> = first["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let ids = &ids[..ids.len().min(48)];
    let (shape, want) = &reference["logits.0"];
    assert_eq!(shape[0], ids.len());
    let got = model.logits(ids).unwrap();
    for (a, b) in got.iter().zip(want) {
        assert!(
            (*a as f64 - b).abs() < 1e-4,
            "logit {a} vs transformers {b}"
        );
    }
}

#[test]
fn rust_tokenizer_matches_python_tokenizer() {
    let mut tok = infl::data::LazyTokenizer::new(&root().join("assets/tiny-gpt2"));
    let text = std::fs::read_to_string(root().join("assets/demo/corpus.jsonl")).unwrap();
    let ids = std::fs::read_to_string(fixture("corpus_ids.jsonl")).unwrap();
    let mut n = 0;
    for (t, i) in text.lines().zip(ids.lines()) {
        let t: serde_json::Value = serde_json::from_str(t).unwrap();
        let i: serde_json::Value = serde_json::from_str(i).unwrap();
        let want: Vec<u32> = i["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(t["text"].as_str().unwrap(), "test").unwrap();
        assert_eq!(got, want, "document {n}");
        n += 1;
    }
    assert!(n > 100);
}

#[test]
fn factors_match_kronfluence() {
    let reference = read_safetensors(&fixture("reference.safetensors")).unwrap();
    let dir = std::env::temp_dir().join(format!("infl-kf-factors-{}", std::process::id()));
    let model = root().join("assets/tiny-gpt2");
    let out = dir.join("f");
    workflow::fit(
        &FitJob {
            model: model.clone(),
            train: fixture("corpus_ids.jsonl"),
            out: out.clone(),
            store: None,
            partitioning: Default::default(),
            options: FitOptions {
                strategy: Strategy::Ekfac,
                fisher: Fisher::Empirical,
                batch_size: 5,
                seed: 0,
                modules: ModuleSelection::All,
                layers: None,
                max_len: Some(48),
                ..FitOptions::default()
            },
            run: infl::options::RunOptions {
                memory_check: true,
                shard: infl::shard::Shard::WHOLE,
                fresh: false,
                ..infl::options::RunOptions::ONCE
            },
            compute: Default::default(),
        },
        &Silent,
    )
    .unwrap();
    let ours = read_safetensors(&out.join("factors.safetensors")).unwrap();
    for (mine, theirs) in [("A", "A"), ("S", "S"), ("lambda", "lambda")] {
        let (s1, v1) = &ours[&format!("transformer.h.0.attn.c_proj.{mine}")];
        let (s2, v2) = &reference[&format!("factors.h.0.attn.c_proj.{theirs}")];
        assert_eq!(s1, s2, "{mine}: shape");
        let scale = v2.iter().fold(0f64, |m, x| m.max(x.abs()));
        let worst = v1
            .iter()
            .zip(v2)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{mine}: max abs diff {worst:.2e} (scale {scale:.2e})");
        assert!(
            worst <= 1e-4 * scale,
            "{mine}: differs by {worst} (scale {scale})"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
