//! The autograd engine on a GPU against the same engine on the CPU: every tap of every family,
//! and a whole fit + score through the binary. Built only with `--features cuda`, and run where
//! a GPU is visible: `cargo test --release --features cuda --test cuda`.
#![cfg(feature = "cuda")]

mod common;

use common::{family_fixture as fixture, ok, random_gpt2, rel_diff, s, scratch};
use infl::model::{load, Compute, ComputeDevice, Engine, Labels, ModuleSelection, TokenBatch};
use std::path::Path;

/// cuBLAS and candle's CUDA kernels sum in another order than the CPU: relative differences
/// of a few f32 ulps, amplified through the blocks.
const TOL: f64 = 1e-4;

fn gpu_taps_equal_cpu_taps(name: &str, dir: &Path) {
    for modules in [ModuleSelection::All, ModuleSelection::Mlp] {
        let gpu = load(
            dir,
            modules,
            Compute {
                engine: Some(Engine::Autograd),
                device: ComputeDevice::Cuda(0),
                adapter: None,
            },
        )
        .unwrap();
        let cpu = load(dir, modules, Compute::cpu(Engine::Autograd)).unwrap();
        assert!(gpu.is_threaded() && !cpu.is_threaded());
        let v = cpu.vocab_size() as u32;
        let seqs: Vec<Vec<u32>> = [40usize, 7, 1, 23]
            .iter()
            .map(|&len| len.min(cpu.max_positions()) as u32)
            .enumerate()
            .map(|(k, len)| (0..len).map(|t| (t * 7 + k as u32 * 3) % v).collect())
            .collect();
        let batch = TokenBatch::training(
            &seqs
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u64, s.as_slice()))
                .collect::<Vec<_>>(),
        );
        let (g, c) = (
            gpu.taps(&batch, Labels::Data).unwrap(),
            cpu.taps(&batch, Labels::Data).unwrap(),
        );
        assert_eq!(g.seq_lens, c.seq_lens);
        for (x, y) in g.losses.iter().zip(&c.losses) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{name}: loss {x} vs {y}"
            );
        }
        let mut worst = 0f64;
        for (l, (x, y)) in cpu.tracked().iter().zip(g.layers.iter().zip(&c.layers)) {
            for (what, a, b) in [("a", &x.a, &y.a), ("g", &x.g, &y.g)] {
                let d = rel_diff(a, b);
                assert!(d <= TOL, "{name} {modules:?} {} {what}: {d:e}", l.name);
                worst = worst.max(d);
            }
        }
        let d = rel_diff(
            &gpu.logits(&seqs[0]).unwrap(),
            &cpu.logits(&seqs[0]).unwrap(),
        );
        assert!(d <= TOL, "{name}: logits {d:e}");
        eprintln!("{name} {modules:?}: worst relative difference {worst:e}");
    }
}

#[test]
fn every_family_runs_on_the_gpu_as_on_the_cpu() {
    for name in [
        "llama",
        "qwen2",
        "mistral",
        "gpt_neox_parallel",
        "gpt_neox_sequential",
        "tiny_llama.gguf",
    ] {
        gpu_taps_equal_cpu_taps(name, &fixture(name));
    }
    let dir = scratch("cuda", "gpt2");
    let (model, _, _) = random_gpt2(&dir, 5, 1, |_| 1, |_, t| t);
    gpu_taps_equal_cpu_taps("gpt2", &model);
}

/// fit, score and self-influence with `--device cuda` against the fast engine on the CPU: the
/// same scores, with rank-4 queries (below the width-12 layers' rank) and full-rank ones (both
/// paths of the device scorer), and the same self-influence.
#[test]
fn fit_and_score_on_the_gpu_give_the_cpu_scores() {
    let dir = scratch("cuda", "job");
    let (model, corpus, queries) = random_gpt2(&dir, 9, 40, |d| 3 + d % 13, |d, t| d * 5 + t * 3);
    let run = |tag: &str, device: &str, rank: &str| -> Vec<f64> {
        let (f, r) = (dir.join(format!("f-{tag}")), dir.join(format!("r-{tag}")));
        let mut fit = vec![
            "fit",
            "--model",
            s(&model),
            "--train",
            s(&corpus),
            "--out",
            s(&f),
        ];
        fit.extend_from_slice(&["--device", device]);
        ok(&fit);
        let mut score = vec![
            "score",
            "--model",
            s(&model),
            "--factors",
            s(&f),
            "--train",
            s(&corpus),
            "--queries",
            s(&queries),
            "--out",
            s(&r),
            "--dense",
        ];
        score.extend_from_slice(&["--device", device, "--query-rank", rank]);
        ok(&score);
        let own = dir.join(format!("self-{tag}"));
        ok(&[
            "self-influence",
            "--model",
            s(&model),
            "--factors",
            s(&f),
            "--train",
            s(&corpus),
            "--out",
            s(&own),
            "--device",
            device,
        ]);
        let mut scores = infl::io::read_safetensors(&r.join("scores.safetensors")).unwrap()
            ["scores"]
            .1
            .clone();
        let own = std::fs::read_to_string(own.join("self_influence.jsonl")).unwrap();
        scores.extend(own.lines().map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["self_influence"].as_f64().unwrap()
        }));
        scores
    };
    for rank in ["4", "full"] {
        let cpu = run(&format!("cpu-{rank}"), "cpu", rank);
        let gpu = run(&format!("gpu-{rank}"), "cuda", rank);
        assert_eq!(cpu.len(), gpu.len());
        let scale = cpu.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = cpu
            .iter()
            .zip(&gpu)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "rank {rank}: max |gpu − cpu| / max |cpu| = {:e}",
            worst / scale
        );
        assert!(
            worst <= 1e-3 * scale,
            "rank {rank}: {worst} vs scale {scale}"
        );
    }
}
