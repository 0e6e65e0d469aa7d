//! PEFT LoRA adapters (`--adapter DIR`) against PEFT and kronfluence.
//!
//! The fixture (tests/fixtures/lora, made by scripts/make_lora_fixture.py) holds two adapters
//! of the tiny random Llama of tests/fixtures/families/llama with random (non-zero) A and B:
//! `qvd` (r 4, alpha 8, q/v/down) and `rslora` (r 2, alpha 3, rsLoRA, every linear of block 1);
//! the logits of the merged models from PEFT's `merge_and_unload`; and kronfluence 1.0.1's
//! EK-FAC and identity pairwise scores with `qvd`'s lora_A/lora_B modules tracked. The same for
//! GPT-2 (scripts/make_lora_gpt2_fixture.py): adapter `gpt2` (r 4, alpha 6, every Conv1D) on
//! the bundled assets/tiny-gpt2, its merged logits and kronfluence scores (`gpt2_*` files).
//! The taps against finite differences are unit tests of `infl::model::lora`.

mod common;

use common::{family_fixture, ok, run, s, scratch};
use infl::curvature::{Fisher, Strategy};
use infl::io::read_safetensors;
use infl::model::{Compute, ModuleSelection};
use infl::options::{FitOptions, RunOptions, ScoreOptions};
use infl::pass::Silent;
use infl::workflow::{self, FitJob, ScoreJob};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lora")
        .join(name)
}

fn with_adapter(name: &str) -> Compute {
    Compute {
        adapter: Some(fixture(name)),
        ..Compute::CPU
    }
}

fn reference() -> serde_json::Value {
    json(&fixture("reference.json"))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tiny_gpt2() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-gpt2")
}

/// Max |infl − PEFT| over the logits of the reference sequences, and max |adapted − base| (so
/// that a parity that ignores the adapter cannot pass).
fn logit_diffs(base: &Path, adapter: &str, want: &serde_json::Value) -> (f32, f32) {
    let seqs: Vec<Vec<u32>> = serde_json::from_value(reference()["sequences"].clone()).unwrap();
    logit_diffs_on(&seqs, base, adapter, want)
}

fn logit_diffs_on(
    seqs: &[Vec<u32>],
    base: &Path,
    adapter: &str,
    want: &serde_json::Value,
) -> (f32, f32) {
    let want: Vec<Vec<f32>> = serde_json::from_value(want.clone()).unwrap();
    let adapted = infl::model::load(base, ModuleSelection::Adapter, with_adapter(adapter)).unwrap();
    let plain = infl::model::load(base, ModuleSelection::All, Compute::CPU).unwrap();
    let (mut vs_peft, mut vs_base) = (0f32, 0f32);
    for (ids, want) in seqs.iter().zip(&want) {
        let got = adapted.logits(ids).unwrap();
        assert_eq!(got.len(), want.len());
        for ((a, b), c) in got.iter().zip(want).zip(plain.logits(ids).unwrap()) {
            vs_peft = vs_peft.max((a - b).abs());
            vs_base = vs_base.max((a - c).abs());
        }
    }
    (vs_peft, vs_base)
}

#[test]
fn logits_match_peft_merged_model() {
    let r = reference();
    for (base, adapter, want, tol) in [
        ("llama", "qvd", &r["logits"]["qvd"], 1e-5),
        ("llama", "rslora", &r["logits"]["rslora"], 1e-5),
        // The GGUF file holds one matrix in F16 (the reference is the f32 model): as the
        // GGUF parity test of the families fixture, 1e-4.
        (
            "tiny_llama.gguf",
            "qvd",
            &r["logits_default_rope"]["qvd"],
            1e-4,
        ),
    ] {
        let (vs_peft, vs_base) = logit_diffs(&family_fixture(base), adapter, want);
        eprintln!("{base} + {adapter}: max |logit − PEFT| = {vs_peft:e}, adapter moved logits by {vs_base}");
        assert!(vs_peft <= tol, "{base} + {adapter}: {vs_peft}");
        assert!(
            vs_base > 0.1,
            "{base} + {adapter}: the adapter changes nothing"
        );
    }
}

/// GPT-2's Conv1D layers with PEFT's `fan_in_fan_out` adapter, against the merged model's
/// logits computed in float64 (float32 rounding alone is ~9e-6 on this base's logits, which
/// reach ~18: PEFT's own float32 merged model is that far from them).
#[test]
fn gpt2_logits_match_peft_merged_model() {
    let r = json(&fixture("gpt2_reference.json"));
    let seqs: Vec<Vec<u32>> = serde_json::from_value(r["sequences"].clone()).unwrap();
    let (vs_peft, vs_base) = logit_diffs_on(&seqs, &tiny_gpt2(), "gpt2", &r["logits"]);
    eprintln!(
        "tiny-gpt2 + gpt2: max |logit − PEFT| = {vs_peft:e} (PEFT's float32: {}), adapter \
         moved logits by {vs_base}",
        r["peft_float32_error"]
    );
    assert!(vs_peft <= 1e-5, "{vs_peft}");
    assert!(vs_base > 0.1, "the adapter changes nothing");
}

/// kronfluence's tracked-module names (`base_model.model.NAME.lora_A.default`) against ours.
fn kronfluence_names(meta: &str) -> Vec<String> {
    let mut names: Vec<String> = json(&fixture(meta))["kronfluence"]["tracked_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let n = n.as_str().unwrap();
            let n = n.strip_prefix("base_model.model.").unwrap();
            n.strip_suffix(".default").unwrap().to_string()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn gpt2_adapter_layers_are_tracked_as_kronfluence_names_them() {
    let model =
        infl::model::load(&tiny_gpt2(), ModuleSelection::Adapter, with_adapter("gpt2")).unwrap();
    let mut ours: Vec<String> = model.tracked().iter().map(|l| l.name.clone()).collect();
    ours.sort();
    assert_eq!(ours, kronfluence_names("gpt2_meta.json"));
    let b = &model.tracked()[1];
    assert_eq!(
        (b.name.as_str(), b.d_in, b.d_out, b.has_bias),
        ("transformer.h.0.attn.c_attn.lora_B", 4, 144, false)
    );
    // --modules mlp: the MLP's Conv1Ds and the adapters on them.
    let mlp = infl::model::load(&tiny_gpt2(), ModuleSelection::Mlp, with_adapter("gpt2")).unwrap();
    let names: Vec<&str> = mlp.tracked().iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names.len(), 2 * 2 * 3, "{names:?}");
    assert!(names.contains(&"transformer.h.1.mlp.c_proj"));
    assert!(names.contains(&"transformer.h.1.mlp.c_proj.lora_A"));
    assert!(!names.iter().any(|n| n.contains("attn")));
}

#[test]
fn adapter_layers_are_tracked_as_kronfluence_names_them() {
    let model = infl::model::load(
        &family_fixture("llama"),
        ModuleSelection::Adapter,
        with_adapter("qvd"),
    )
    .unwrap();
    let mut ours: Vec<String> = model.tracked().iter().map(|l| l.name.clone()).collect();
    ours.sort();
    assert_eq!(ours, kronfluence_names("meta.json"));
    let a = &model.tracked()[0];
    assert_eq!(
        (a.name.as_str(), a.d_in, a.d_out, a.has_bias),
        ("model.layers.0.self_attn.q_proj.lora_A", 16, 4, false)
    );
    // --modules attn: the attention's base layers and the adapters on them, not down_proj's.
    let attn = infl::model::load(
        &family_fixture("llama"),
        ModuleSelection::Attn,
        with_adapter("qvd"),
    )
    .unwrap();
    let names: Vec<&str> = attn.tracked().iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names.len(), 2 * (4 + 2 * 2), "{names:?}");
    assert!(names.contains(&"model.layers.1.self_attn.o_proj"));
    assert!(names.contains(&"model.layers.1.self_attn.v_proj.lora_B"));
    assert!(!names.iter().any(|n| n.contains("down_proj")));
}

/// `fit` + `score` through the library on the adapter's modules of `model` + `adapter`, with
/// kronfluence's settings.
fn infl_scores(
    model: PathBuf,
    adapter: &str,
    strategy: Strategy,
    dir: &Path,
) -> (Vec<usize>, Vec<f64>) {
    let factors = dir.join(format!("factors-{strategy:?}"));
    let results = dir.join(format!("results-{strategy:?}"));
    let options = FitOptions {
        strategy,
        fisher: Fisher::Empirical,
        modules: ModuleSelection::Adapter,
        batch_size: 4,
        ..FitOptions::default()
    };
    let fit = FitJob {
        compute: with_adapter(adapter),
        ..FitJob::new(
            model.clone(),
            fixture("corpus_ids.jsonl"),
            factors.clone(),
            options,
        )
    };
    workflow::fit(&fit, &Silent).unwrap();
    let score = ScoreJob {
        compute: with_adapter(adapter),
        options: ScoreOptions {
            dense: true,
            query_rank: infl::options::QueryRank(None),
            batch_size: 4,
            ..ScoreOptions::default()
        },
        run: RunOptions::ONCE,
        ..ScoreJob::new(
            model,
            factors,
            fixture("corpus_ids.jsonl"),
            fixture("queries_ids.jsonl"),
            results.clone(),
        )
    };
    workflow::score(&score, &Silent).unwrap();
    let t = read_safetensors(&results.join("scores.safetensors")).unwrap();
    t["scores"].clone()
}

/// infl's EK-FAC and identity scores on `adapter`'s modules against kronfluence's in
/// `reference`.
fn check_kronfluence_parity(model: PathBuf, adapter: &str, reference: &str) {
    let reference = read_safetensors(&fixture(reference)).unwrap();
    let dir = scratch("lora", &format!("kronfluence-{adapter}"));
    for (strategy, key) in [
        (Strategy::Ekfac, "scores.ekfac"),
        (Strategy::Identity, "scores.identity"),
    ] {
        let (shape, want) = &reference[key];
        let (got_shape, got) = infl_scores(model.clone(), adapter, strategy, &dir);
        assert_eq!(&got_shape, shape, "{key}");
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs() / scale));
        eprintln!("{adapter} {key}: max |infl − kronfluence| / max |score| = {worst:.2e}");
        assert!(worst <= 1e-4, "{adapter} {key}: {worst:.2e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn scores_on_adapter_modules_match_kronfluence() {
    check_kronfluence_parity(family_fixture("llama"), "qvd", "reference.safetensors");
}

#[test]
fn gpt2_scores_on_adapter_modules_match_kronfluence() {
    check_kronfluence_parity(tiny_gpt2(), "gpt2", "gpt2_reference.safetensors");
}

/// The adapter is part of the model's identity: recorded in meta.json, and factors fitted
/// with one refuse another (exit 4), or none.
#[test]
fn factors_record_the_adapter_and_refuse_another() {
    let dir = scratch("lora", "provenance");
    let (model, corpus, queries) = (
        family_fixture("llama"),
        fixture("corpus_ids.jsonl"),
        fixture("queries_ids.jsonl"),
    );
    let (qvd, rslora) = (fixture("qvd"), fixture("rslora"));
    let factors = dir.join("factors");
    ok(&[
        "fit",
        "--model",
        s(&model),
        "--adapter",
        s(&qvd),
        "--train",
        s(&corpus),
        "--out",
        s(&factors),
        "--modules",
        "adapter",
        "--fisher",
        "empirical",
    ]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(factors.join("meta.json")).unwrap()).unwrap();
    let recorded = &meta["model"]["adapter"];
    assert_eq!(recorded["path"], s(&qvd));
    let want = infl::provenance::AdapterInfo::of(&qvd).unwrap();
    assert_eq!(recorded["sha256"], want.sha256.as_str());
    assert_eq!(meta["model"]["engine"], "autograd");

    let score = |adapter: Option<&Path>, out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "score",
            "--model",
            s(&model),
            "--factors",
            s(&factors),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--out",
            s(&out),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        (run(&args), out)
    };
    let (same, out) = score(Some(&qvd), "same");
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(results["model"]["adapter"]["sha256"], want.sha256.as_str());
    for (adapter, what) in [(Some(rslora.as_path()), "another"), (None, "none")] {
        let (refused, out) = score(adapter, what);
        let err = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(4), "{what}: {err}");
        assert!(err.contains("adapter"), "{what}: {err}");
        assert!(
            !out.exists(),
            "{what}: a refused score wrote {}",
            out.display()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn adapter_options_that_cannot_apply_are_usage_errors() {
    let model = family_fixture("llama");
    let (qvd, missing) = (fixture("qvd"), fixture("no-such-adapter"));
    let cases: [(&[&str], &str); 3] = [
        (&["--modules", "adapter"], "--adapter DIR"),
        (
            &["--adapter", s(&qvd), "--engine", "fast"],
            "--engine autograd",
        ),
        (&["--adapter", s(&missing)], "adapter_config.json"),
    ];
    for (extra, says) in cases {
        let mut args = vec!["inspect", "--model", s(&model)];
        args.extend_from_slice(extra);
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        let code = if says == "adapter_config.json" { 3 } else { 2 };
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}
