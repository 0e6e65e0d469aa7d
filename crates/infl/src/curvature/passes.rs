//! A fit's passes run over sequences: each pass's labels, the sums of a pass accumulated batch
//! by batch through the pass machinery ([`crate::pass`]), a whole pass with checkpoints, and
//! [`fit`], every pass of a strategy in memory. `infl fit` ([`crate::workflow`]) streams the
//! corpus through the same [`accumulate_sequences`].

use super::{
    accumulate_keeping, device, eigendecompose, empty_factors, set_lambda, Eigenbasis, Factors,
    Fisher, Pass, PassSums, RotatedTokens,
};
use crate::checkpoint::{CheckpointPolicy, Checkpointer};
use crate::data::Sequence;
use crate::error::{Error, Result};
use crate::model::{Labels, TapBatch, TapModel};
use crate::options::FitOptions;
use crate::pass::{run_indexed, Progress};

/// The labels of `pass` under `options` (sampled labels are drawn afresh per pass).
pub fn pass_labels(options: &FitOptions, pass: Pass) -> Labels {
    match options.fisher {
        Fisher::Empirical => Labels::Data,
        Fisher::Sampled => Labels::Sampled {
            seed: options.seed,
            pass: pass.label_pass(),
        },
    }
}

/// Adds `seqs` (stable indices `indices`) to the sums of `state.pass`, batch by batch;
/// `after_batch(state, k, taps, rotated)` runs once the first k sequences of `seqs` are in, with
/// the taps of the batch that ended there (the last `taps.seq_lens.len()` of those k) and, with
/// `keep_rotated` in the eigenvalue pass, its tokens rotated into the eigenbasis.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_sequences(
    model: &dyn TapModel,
    options: &FitOptions,
    seqs: &[Sequence],
    indices: &[u64],
    bases: &[Option<&Eigenbasis>],
    state: &mut PassSums,
    keep_rotated: bool,
    progress: &dyn Progress,
    mut after_batch: impl FnMut(&PassSums, usize, &TapBatch, Option<&RotatedTokens>) -> Result<()>,
) -> Result<()> {
    let tracked = model.tracked().to_vec();
    let what = format!("{} pass", state.pass.name());
    // A model on a GPU has its statistics formed there too; a store takes the rotated tokens
    // of the CPU path.
    let on_device = match crate::model::statistics_device(model)? {
        Some(d) if !keep_rotated => Some(device::DeviceStatistics::new(d, bases)?),
        _ => None,
    };
    run_indexed(
        model,
        seqs,
        indices,
        options.batch_size,
        pass_labels(options, state.pass),
        progress,
        &what,
        |start, taps| {
            let rotated = match &on_device {
                Some(stats) => {
                    stats.accumulate(state, &tracked, taps)?;
                    None
                }
                None => accumulate_keeping(state, &tracked, bases, taps, keep_rotated),
            };
            after_batch(state, start + taps.seq_lens.len(), taps, rotated.as_ref())
        },
    )
}

/// Runs `state.pass` over `seqs[position..]` (stable indices `indices`), adding to `state`.
/// `save(state, position)` is called at batch boundaries as `policy` asks; resuming from a
/// saved (state, position) gives bit-identical sums, because batches are cut from `position`
/// (a batch boundary) and added in the same order.
#[allow(clippy::too_many_arguments)]
pub fn run_pass(
    model: &dyn TapModel,
    options: &FitOptions,
    seqs: &[Sequence],
    indices: &[u64],
    bases: &[Option<&Eigenbasis>],
    state: &mut PassSums,
    position: usize,
    policy: CheckpointPolicy,
    progress: &dyn Progress,
    mut save: impl FnMut(&PassSums, usize) -> Result<()>,
) -> Result<()> {
    let rest = &seqs[position..];
    progress.begin(
        &format!("{} pass", state.pass.name()),
        rest.iter().map(|s| s.ids.len() as u64).sum(),
    );
    let mut checkpointer = Checkpointer::new(policy, position);
    accumulate_sequences(
        model,
        options,
        rest,
        &indices[position..],
        bases,
        state,
        false,
        progress,
        |state, k, _, _| {
            let done = position + k;
            if done < seqs.len() && checkpointer.due(done) {
                save(state, done)?;
            }
            Ok(())
        },
    )?;
    progress.end();
    Ok(())
}

/// Fits the factors of `options.strategy` over `seqs` in one process, with no checkpoints: a
/// covariance pass (KFAC, EK-FAC), the eigendecompositions, then an eigenvalue pass (EK-FAC,
/// diagonal). `infl fit` runs the same passes shardable and resumable ([`crate::workflow`]);
/// this one (for `infl inspect`'s probe and the tests) runs each as [`run_pass`], on the same
/// [`accumulate_sequences`], [`eigendecompose`] and [`set_lambda`], with no loop of its own.
pub fn fit(
    model: &dyn TapModel,
    seqs: &[Sequence],
    options: &FitOptions,
    progress: &dyn Progress,
) -> Result<Factors> {
    let tracked = model.tracked().to_vec();
    if tracked.is_empty() {
        return Err(Error::input(
            "no tracked layers: --modules selected nothing",
        ));
    }
    let indices: Vec<u64> = (0..seqs.len() as u64).collect();
    let n_tokens: u64 = seqs.iter().map(|s| s.ids.len() as u64).sum();
    let mut layers = empty_factors(&tracked, n_tokens, seqs.len() as u64);
    for pass in options.strategy.passes() {
        let mut state = PassSums::zeros(pass, &tracked);
        let bases: Vec<Option<&Eigenbasis>> = layers.iter().map(|l| l.eigen.as_ref()).collect();
        run_pass(
            model,
            options,
            seqs,
            &indices,
            &bases,
            &mut state,
            0,
            CheckpointPolicy::NEVER,
            progress,
            |_, _| Ok(()),
        )?;
        match pass {
            Pass::Covariance => layers = eigendecompose(&tracked, state, progress)?,
            Pass::Eigenvalue => set_lambda(&mut layers, &state),
        }
    }
    Ok(Factors {
        strategy: options.strategy,
        layers,
    })
}
