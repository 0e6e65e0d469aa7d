//! What the stages between the passes hold, measured with a counting allocator against
//! what they must hold: the eigendecompositions consume the covariance sums (each layer's f64
//! sums give way to its f32 factors, so the phase adds only the eigensolver's workspace), and
//! preconditioning the queries holds one layer's working copies at a time beside the stored
//! gradients (not every layer's twice). Either regression doubles a large model's peak.
//!
//! One test in its own binary: the allocator is process-wide, and another test running at
//! the same time would count towards the peak.

use infl::curvature::{self, Fisher, Pass, PassSums, Strategy};
use infl::data::{Query, Sequence};
use infl::influence::{self, Damping, Preconditioner};
use infl::model::gpt2::{Gpt2, Gpt2Config};
use infl::model::{ModuleSelection, TapModel};
use infl::options::FitOptions;
use infl::pass::Silent;
use std::sync::atomic::Ordering;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

/// Bytes allocated at the peak of `f` beyond those live when it starts.
fn peak_growth<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

#[test]
fn the_stages_between_passes_hold_one_layer_of_working_copies() {
    // 6 blocks × 4 tracked layers of similar size: holding every layer twice is far above
    // holding one layer's copies.
    let c: Gpt2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 97, "n_positions": 32, "n_embd": 48, "n_layer": 6, "n_head": 4
    }))
    .unwrap();
    let gpt2 = Gpt2::random(c, 3, ModuleSelection::All).unwrap();
    let model = infl::model::gpt2::fast::FastGpt2::new(&gpt2).unwrap();
    drop(gpt2);
    let tracked = model.tracked().to_vec();
    let seqs: Vec<Sequence> = (0..6u32)
        .map(|s| Sequence {
            id: format!("{s}:0"),
            ids: (0..24).map(|t| (s * 31 + t * 7) % 97).collect(),
        })
        .collect();
    let options = FitOptions {
        strategy: Strategy::Ekfac,
        fisher: Fisher::Empirical,
        batch_size: 3,
        ..FitOptions::default()
    };

    // The eigendecompositions: the sums are live when they start; the factors replace them.
    let mut cov = PassSums::zeros(Pass::Covariance, &tracked);
    let bases = vec![None; tracked.len()];
    curvature::run_pass(
        &model,
        &options,
        &seqs,
        &(0..6).collect::<Vec<u64>>(),
        &bases,
        &mut cov,
        0,
        infl::checkpoint::CheckpointPolicy::NEVER,
        &Silent,
        |_, _| Ok(()),
    )
    .unwrap();
    // The sums are packed lower triangles; the factors made from them are f32 covariances
    // and eigenvectors, 8 bytes per element of the whole matrices.
    let sums_bytes = cov.bytes();
    let dims: Vec<usize> = tracked.iter().flat_map(|l| [l.d_in_h(), l.d_out]).collect();
    let factor_bytes: usize = dims.iter().map(|d| 8 * d * d).sum();
    let largest = dims.iter().map(|d| d * d).max().unwrap();
    // Two threads whatever the machine, so the bound below does not grow with the cores; a
    // first run warms up what lives on after it (the GEMM kernels' per-thread buffers).
    let threads = 2;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    drop(pool.install(|| curvature::eigendecompose(&tracked, cov.clone(), &Silent).unwrap()));
    let (layers, growth) =
        peak_growth(|| pool.install(|| curvature::eigendecompose(&tracked, cov, &Silent).unwrap()));
    // Per layer being decomposed (one per thread, A and S at once), the eigensolver's copies.
    let workspace = threads * 2 * 40 * largest;
    // The factors replace the sums, which go as each layer is decomposed: the heap grows by
    // their difference, not by the factors beside the sums.
    let replaced = factor_bytes - sums_bytes;
    eprintln!(
        "eigendecompositions: {growth} bytes grown, sums {sums_bytes}, factors {factor_bytes}, \
         workspace bound {workspace}"
    );
    assert!(
        growth <= replaced + workspace + sums_bytes / 8,
        "{growth} > {replaced} + {workspace} + {}",
        sums_bytes / 8
    );

    // Preconditioning the queries: beside the stored gradients, one layer's copies.
    let mut lam = PassSums::zeros(Pass::Eigenvalue, &tracked);
    let eigen: Vec<_> = layers.iter().map(|l| l.eigen.as_ref()).collect();
    curvature::run_pass(
        &model,
        &options,
        &seqs,
        &(0..6).collect::<Vec<u64>>(),
        &eigen,
        &mut lam,
        0,
        infl::checkpoint::CheckpointPolicy::NEVER,
        &Silent,
        |_, _| Ok(()),
    )
    .unwrap();
    let mut layers = layers;
    curvature::set_lambda(&mut layers, &lam);
    let factors = curvature::Factors {
        strategy: Strategy::Ekfac,
        layers,
    };
    let preconditioner = Preconditioner::new(&factors, Damping::Heuristic).unwrap();
    drop(factors);
    let queries: Vec<Query> = (0..8u32)
        .map(|q| Query {
            id: format!("q{q}"),
            prompt_ids: (0..6).map(|t| (q * 13 + t * 5) % 97).collect(),
            completion_ids: (0..4).map(|t| (q * 3 + t * 11) % 97).collect(),
            prompt: None,
            completion: None,
        })
        .collect();
    let per_query: usize = tracked.iter().map(|l| 4 * l.d_out * l.d_in_h()).sum();
    let largest_layer = tracked
        .iter()
        .map(|l| 4 * l.d_out * l.d_in_h())
        .max()
        .unwrap();
    let n = queries.len();
    // Once to warm up what lives on after it (rayon's threads and their scratch).
    let run = || {
        influence::precondition_queries(&model, &queries, &preconditioner, n, None, false, &Silent)
            .unwrap()
    };
    drop(run());
    let (pq, growth) = peak_growth(|| {
        influence::precondition_queries(&model, &queries, &preconditioner, n, None, false, &Silent)
            .unwrap()
    });
    assert_eq!(pq.len(), n);
    let stored = n * per_query;
    let activations = model.taps_peak_bytes(n, 10).unwrap() as usize;
    // The stored gradients, the batch's taps, and one layer's working copies (rotated, scaled,
    // the product back out of the eigenbasis, its transpose). Plus 1 MiB: a thread that did no
    // product in the warm-up run allocates its GEMM packing buffer (512 KiB here) in the
    // measured one, which happened on a loaded machine (+524,288 bytes exactly); the
    // regression this guards against held every layer's copies, 8 MB more.
    let bound = stored + activations + 4 * n * largest_layer + (1 << 20);
    eprintln!(
        "preconditioning: {growth} bytes grown; stored {stored}, activations {activations}, bound {bound}, every layer twice {}",
        stored + 2 * n * per_query
    );
    assert!(growth <= bound, "{growth} > {bound}");
}
