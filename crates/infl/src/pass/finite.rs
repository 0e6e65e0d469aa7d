//! Finite losses and gradients: every pass checks each batch's taps before using them, and
//! names the sequence at fault when something is not finite.

use crate::data::Sequence;
use crate::error::{Error, Result};
use crate::model::{Labels, TapBatch, TapModel, TokenBatch};
use rayon::prelude::*;

/// [`check_finite`] on the taps of `batch`, cut from `chunk`'s sequences; when they are not
/// finite, the sequence at fault is named.
pub(super) fn check_batch(
    model: &dyn TapModel,
    chunk: &[Sequence],
    batch: &TokenBatch,
    taps: &TapBatch,
    labels: Labels,
    what: &str,
) -> Result<()> {
    if let Err(e) = check_finite(taps, |j| chunk[j].id.clone(), what) {
        // Padding shares attention with real tokens, so one broken sequence
        // can poison its whole batch: rerun each alone to name the one at fault.
        for (j, s) in chunk.iter().enumerate() {
            let one = [(batch.stable_index[j], s.ids.as_slice())];
            let alone = model.taps(&TokenBatch::training(&one), labels)?;
            check_finite(&alone, |_| s.id.clone(), what)?;
        }
        return Err(e);
    }
    Ok(())
}

/// Every loss and gradient of `taps` is finite; otherwise an error naming the first sequence
/// (`name(k)` for the batch's k-th) with a non-finite one.
pub fn check_finite(taps: &TapBatch, name: impl Fn(usize) -> String, what: &str) -> Result<()> {
    // The common case, everything finite, in one threaded branch-free sweep; the sequence at
    // fault is looked for only when something is not.
    let all_finite = taps.losses.iter().all(|l| l.is_finite())
        && taps
            .layers
            .par_iter()
            .all(|l| l.g.par_chunks(1 << 14).all(all_finite_f32));
    if all_finite {
        return Ok(());
    }
    let offsets = taps.offsets();
    for (k, loss) in taps.losses.iter().enumerate() {
        let bad_grad = taps.layers.iter().any(|l| {
            let d = l.g.len() / offsets[offsets.len() - 1].max(1);
            l.g[offsets[k] * d..offsets[k + 1] * d]
                .iter()
                .any(|x| !x.is_finite())
        });
        if !loss.is_finite() || bad_grad {
            return Err(Error::NonFinite(format!(
                "{what}: sequence {} has a non-finite {} (loss = {loss})",
                name(k),
                if loss.is_finite() { "gradient" } else { "loss" }
            )));
        }
    }
    Ok(())
}

/// No NaN or infinity in `x` (whose magnitude bits are at least those of infinity), by a max
/// over the magnitude bits with no early exit, so that the loop vectorises.
fn all_finite_f32(x: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7F80_0000;
    let worst = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF));
    worst < EXPONENT
}
