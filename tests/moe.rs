//! Mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers and an
//! independent float64 reference.
//!
//! The fixtures (tests/fixtures/moe, made by scripts/make_moe_fixture.py) are tiny random
//! checkpoints of each layout with transformers' logits, and `trained/`: a tiny Qwen2-MoE
//! trained on its corpus with the scores of an independent float64 EK-FAC reference. The taps against finite differences,
//! the routing of each token to exactly top-k experts and the expert without tokens are unit
//! tests of `infl::model::moe`.

mod common;

use common::scratch;
use infl::curvature::{Fisher, Strategy};
use infl::io::read_safetensors;
use infl::model::{Compute, Engine, ModuleSelection};
use infl::options::{FitOptions, RunOptions, ScoreOptions};
use infl::pass::Silent;
use infl::workflow::{self, FitJob, ScoreJob};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/moe")
        .join(name)
}

fn autograd() -> Compute {
    Compute::cpu(Engine::Autograd)
}

#[test]
fn logits_match_transformers() {
    for name in ["mixtral", "qwen2_moe", "qwen3_moe", "trained"] {
        let dir = fixture(name);
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let seqs: Vec<Vec<u32>> = serde_json::from_value(v["sequences"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
        let m = infl::model::load(&dir, ModuleSelection::All, autograd()).unwrap();
        let (mut worst, mut scale) = (0f32, 1f32);
        for (s, want) in seqs.iter().zip(&want) {
            scale = want.iter().fold(scale, |m, x| m.max(x.abs()));
            let got = m.logits(s).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("{name}: max |logit diff| = {worst:e} (max |logit| {scale})");
        // f32 rounding grows with the logits' size: the trained model's reach ~12, so 1e-5
        // relative there; the random fixtures' stay below 5, 1e-5 absolute.
        let tol = if name == "trained" {
            1e-5 * scale
        } else {
            1e-5
        };
        assert!(worst <= tol, "{name}: max |logit diff| {worst}");
    }
}

/// llama.cpp's layouts load as the same models: the GGUF copies of the Mixtral (`llama` with
/// `ffn_gate_inp` and stacked `ffn_*_exps`), Qwen2-MoE (`qwen2moe`, with the shared expert
/// `ffn_*_shexp` and its gate `ffn_gate_inp_shexp`) and Qwen3-MoE (`qwen3moe`, with
/// `attn_{q,k}_norm` and renormalised top-k) fixtures give transformers' logits, with the
/// safetensors load's tracked layers (names and shapes).
#[test]
fn gguf_experts_match_the_safetensors_model() {
    for name in ["mixtral", "qwen2_moe", "qwen3_moe"] {
        let gguf = fixture(&format!("{name}.gguf"));
        let m = infl::model::load(&gguf, ModuleSelection::All, autograd()).unwrap();
        let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let seqs: Vec<Vec<u32>> = serde_json::from_value(v["sequences"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
        let mut worst = 0f32;
        for (s, want) in seqs.iter().zip(&want) {
            let got = m.logits(s).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("{name}.gguf: max |logit diff| = {worst:e}");
        assert!(worst <= 1e-5, "{name}: {worst}");
        let st = infl::model::load(&fixture(name), ModuleSelection::All, autograd()).unwrap();
        assert_eq!(m.tracked(), st.tracked(), "{name}");
        assert_eq!(m.architecture(), st.architecture(), "{name}");
    }
    let m =
        infl::model::load(&fixture("qwen2_moe.gguf"), ModuleSelection::Mlp, autograd()).unwrap();
    let names: Vec<&str> = m.tracked().iter().map(|l| l.name.as_str()).collect();
    for want in [
        "model.layers.0.mlp.gate",
        "model.layers.0.mlp.experts.3.up_proj",
        "model.layers.0.mlp.shared_expert.down_proj",
        "model.layers.0.mlp.shared_expert_gate",
        "model.layers.1.mlp.gate_proj",
    ] {
        assert!(names.contains(&want), "{want}: {names:?}");
    }
}

#[test]
fn experts_and_routers_are_tracked_layers() {
    let m = infl::model::load(&fixture("qwen2_moe"), ModuleSelection::Mlp, autograd()).unwrap();
    let names: Vec<&str> = m.tracked().iter().map(|l| l.name.as_str()).collect();
    // Layer 0: router, 4 experts × 3, the shared expert's 3 and its gate; layer 1 is dense.
    assert_eq!(names.len(), 1 + 12 + 3 + 1 + 3, "{names:?}");
    assert_eq!(names[0], "model.layers.0.mlp.gate");
    assert_eq!(names[12], "model.layers.0.mlp.experts.3.down_proj");
    assert_eq!(names[16], "model.layers.0.mlp.shared_expert_gate");
    assert_eq!(names[19], "model.layers.1.mlp.down_proj");
    let router = &m.tracked()[0];
    assert_eq!((router.d_in, router.d_out, router.has_bias), (16, 4, false));
    let m = infl::model::load(&fixture("mixtral"), ModuleSelection::All, autograd()).unwrap();
    assert!(m
        .tracked()
        .iter()
        .any(|l| l.name == "model.layers.1.block_sparse_moe.experts.2.w2"));
}

#[test]
fn experts_run_on_autograd_by_default_and_the_fast_engine_refuses_them() {
    let m = infl::model::load(&fixture("mixtral"), ModuleSelection::All, Compute::CPU).unwrap();
    assert_eq!(m.engine(), Engine::Autograd);
    let err = infl::model::load(
        &fixture("mixtral"),
        ModuleSelection::All,
        Compute::cpu(Engine::Fast),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("--engine autograd") && err.contains("mixtral"),
        "{err}"
    );
}

/// `fit` + `score` through the library on the trained fixture's MLP modules (router, experts,
/// shared expert, the dense layer), with kronfluence's settings.
/// Returns the results directory.
fn infl_score(strategy: Strategy, dir: &Path, per_layer: bool) -> PathBuf {
    let trained = fixture("trained");
    let factors = dir.join(format!("factors-{strategy:?}"));
    let results = dir.join(format!("results-{strategy:?}"));
    let options = FitOptions {
        strategy,
        fisher: Fisher::Empirical,
        modules: ModuleSelection::Mlp,
        batch_size: 4,
        ..FitOptions::default()
    };
    let fit = FitJob {
        compute: autograd(),
        ..FitJob::new(
            trained.clone(),
            trained.join("corpus_ids.jsonl"),
            factors.clone(),
            options,
        )
    };
    workflow::fit(&fit, &Silent).unwrap();
    let score = ScoreJob {
        compute: autograd(),
        options: ScoreOptions {
            dense: true,
            per_layer,
            query_rank: infl::options::QueryRank(None),
            batch_size: 4,
            ..ScoreOptions::default()
        },
        run: RunOptions::ONCE,
        ..ScoreJob::new(
            trained.clone(),
            factors,
            trained.join("corpus_ids.jsonl"),
            trained.join("queries_ids.jsonl"),
            results.clone(),
        )
    };
    workflow::score(&score, &Silent).unwrap();
    results
}

#[test]
fn scores_match_an_independent_float64_reference() {
    let reference = read_safetensors(&fixture("trained").join("reference.safetensors")).unwrap();
    let dir = scratch("moe", "reference");
    for (strategy, key, tol) in [
        (Strategy::Ekfac, "scores.ekfac", 1e-4),
        (Strategy::Identity, "scores.identity", 1e-4),
    ] {
        let (shape, want) = &reference[key];
        let results = infl_score(strategy, &dir, false);
        let (got_shape, got) =
            read_safetensors(&results.join("scores.safetensors")).unwrap()["scores"].clone();
        assert_eq!(&got_shape, shape, "{key}");
        // Per query, relative to its largest score (the queries' scales differ by 100×).
        let n = shape[1];
        let mut worst = 0f64;
        for (got, want) in got.chunks(n).zip(want.chunks(n)) {
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (a, b) in got.iter().zip(want) {
                worst = worst.max((a - b).abs() / scale);
            }
        }
        eprintln!("{key}: max |infl − reference| / the query's max |score| = {worst:.2e}");
        assert!(worst <= tol, "{key}: {worst:.2e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--per-layer` names the expert layers, and the report groups their parts by expert.
#[test]
fn the_report_shows_which_experts_carried_the_influence() {
    let dir = scratch("moe", "report");
    let results = infl_score(Strategy::Ekfac, &dir, true);
    let r = infl::results::Results::open(&results).unwrap();
    let layers = r.layers.clone().unwrap();
    let expert = layers
        .iter()
        .position(|l| l == "model.layers.0.mlp.experts.2.up_proj")
        .expect("expert layers in the per-layer output");
    // The per-layer parts of each top entry add up to its score, the experts' included.
    for e in &r.entries {
        let parts = e.per_layer.as_ref().unwrap();
        assert_eq!(parts.len(), layers.len());
        let sum: f64 = parts.iter().sum();
        assert!((sum - e.score).abs() <= 1e-3 * e.score.abs().max(1.0));
    }
    assert!(r
        .entries
        .iter()
        .any(|e| e.per_layer.as_ref().unwrap()[expert] != 0.0));
    let html = dir.join("report.html");
    infl::report::write_report(&results, &html, &infl::report::ReportOptions::default()).unwrap();
    let text = std::fs::read_to_string(&html).unwrap();
    assert_eq!(
        text.matches("<table class=\"experts\">").count(),
        r.queries.len(),
        "one experts table per query"
    );
    assert!(text.contains("<td><code>model.layers.0.mlp</code></td>"));
    assert!(text.contains("expert 3: ") && text.contains("shared: "));
    std::fs::remove_dir_all(&dir).ok();
}
