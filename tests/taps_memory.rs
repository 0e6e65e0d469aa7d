//! The fast engine's count of what one batch's taps hold ([`TapModel::taps_peak_bytes`], the
//! memory estimate of `infl inspect`, `fit` and `score`) against the heap it really uses: a
//! counting allocator records the peak bytes live during `taps`, for each family. The count
//! must not fall short (a run it lets start must fit) and must not overstate by much (a run
//! that fits must not be refused).
//!
//! One test in its own binary: the allocator is process-wide, and another test running at
//! the same time would count towards the peak.

use infl::model::gpt2::{Gpt2, Gpt2Config};
use infl::model::{load, Compute, Engine, Labels, ModuleSelection, TapModel, TokenBatch};
use std::path::Path;
use std::sync::atomic::Ordering;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

/// Peak heap growth over one `taps` call on `batch_size` sequences of `len` tokens.
fn measured_peak(model: &dyn TapModel, batch_size: usize, len: usize) -> usize {
    let seqs: Vec<Vec<u32>> = (0..batch_size)
        .map(|s| {
            (0..len)
                .map(|t| ((s * 131 + t * 71) % model.vocab_size()) as u32)
                .collect()
        })
        .collect();
    let refs: Vec<(u64, &[u32])> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u64, s.as_slice()))
        .collect();
    let batch = TokenBatch::training(&refs);
    // Once to warm up what lives on after it (rayon's threads and their scratch), then measured.
    model.taps(&batch, Labels::Data).unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let taps = model.taps(&batch, Labels::Data).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    drop(taps);
    peak
}

fn check(name: &str, model: &dyn TapModel, batch_size: usize, len: usize) {
    let measured = measured_peak(model, batch_size, len) as f64;
    let counted = model
        .taps_peak_bytes(batch_size, len)
        .expect("the fast engine counts its memory") as f64;
    println!(
        "{name}: {batch_size} x {len} tokens, counted {counted:.0} B, measured peak {measured:.0} B ({:.2}x)",
        counted / measured
    );
    assert!(
        counted >= measured && counted <= 1.5 * measured,
        "{name}: counted {counted} B against a measured peak of {measured} B"
    );
}

#[test]
fn the_fast_engines_count_of_its_taps_memory_bounds_the_measured_peak() {
    let config: Gpt2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 512, "n_positions": 64, "n_embd": 64, "n_layer": 3, "n_head": 4
    }))
    .unwrap();
    let gpt2 = Gpt2::random(config, 1, ModuleSelection::All).unwrap();
    let fast = infl::model::gpt2::fast::FastGpt2::new(&gpt2).unwrap();
    check("gpt2", &fast, 8, 64);
    let families = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families");
    for name in [
        "gpt_neox_parallel",
        "gpt_neox_sequential",
        "llama",
        "mistral",
        "qwen2",
    ] {
        let model = load(
            &families.join(name),
            ModuleSelection::All,
            Compute::cpu(Engine::Fast),
        )
        .unwrap();
        check(name, model.as_ref(), 8, 32);
    }
}
