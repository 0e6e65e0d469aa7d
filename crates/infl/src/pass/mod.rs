//! The machinery of every pass over data (the fit's passes, scoring, self-influence, the
//! gradient store): sequences cut into batches, the model's taps computed a group of batches
//! ahead of the statistics that consume them, each batch checked finite and handed on in order,
//! with progress reported in tokens. What a pass does with the taps is its caller's.

pub mod clock;
mod finite;
mod progress;
pub mod tasks;
mod threads;

pub use finite::check_finite;
pub use progress::{Progress, Silent};
pub use threads::batches_at_once;

use crate::data::Sequence;
use crate::error::Result;
use crate::model::{Labels, TapBatch, TapModel, TokenBatch};
use threads::group_taps;

/// Runs the model over `seqs` in batches and hands each batch's taps to `visit`, checking that
/// losses and gradients are finite (naming the sequence when they are not), as one progress bar.
pub fn for_each_batch(
    model: &dyn TapModel,
    seqs: &[Sequence],
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
    progress.begin(what, total as u64);
    run_batches(model, seqs, 0, batch_size, labels, progress, what, visit)?;
    progress.end();
    Ok(())
}

/// The loop of [`for_each_batch`] without beginning or ending a progress bar, for passes that
/// stream the corpus chunk by chunk. Sequence `k` of `seqs` has the stable index `first + k`
/// (seeding sampled labels); `visit` receives the batch's offset within `seqs`.
#[allow(clippy::too_many_arguments)]
pub fn run_batches(
    model: &dyn TapModel,
    seqs: &[Sequence],
    first: usize,
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    let indices: Vec<u64> = (0..seqs.len()).map(|k| (first + k) as u64).collect();
    run_indexed(
        model, seqs, &indices, batch_size, labels, progress, what, visit,
    )
}

/// [`run_batches`] with each sequence's stable index given (a shard's sequences are not
/// contiguous). Batches are cut from `seqs` in order and `visit` sees them in order;
/// [`batches_at_once`] says how many are computed at once. Results do not depend on the thread
/// count: an engine's taps do not depend on its threads, and they are visited in order.
///
/// The engine runs one group of batches ahead of `visit`, as a task of the caller's rayon
/// pool: while the statistics of one batch are formed, the taps of the next are computed, so
/// the serial stretches of either (norms, the loss, accumulating into f64) overlap the other's
/// threaded products instead of leaving cores idle. At most two groups' taps are alive at once.
#[allow(clippy::too_many_arguments)]
pub fn run_indexed(
    model: &dyn TapModel,
    seqs: &[Sequence],
    indices: &[u64],
    batch_size: usize,
    labels: Labels,
    progress: &dyn Progress,
    what: &str,
    mut visit: impl FnMut(usize, &TapBatch) -> Result<()>,
) -> Result<()> {
    // The whole pass, its products and whatever consumes its taps, in one subnormal mode.
    crate::linalg::flush_subnormals();
    let size = batch_size.max(1);
    let batches = cut_batches(seqs, indices, size);
    let threads = batches_at_once(model);
    let pools = threads::batch_pools(model, threads, what)?;
    let visiting = Visiting {
        model,
        seqs,
        size,
        labels,
        progress,
        what,
    };
    let groups: Vec<&[TokenBatch]> = batches.chunks(threads).collect();
    let mut ready = groups
        .first()
        .map(|g| group_taps(model, g, labels, &pools, what));
    for (group_no, group) in groups.iter().enumerate() {
        let results = ready.take().unwrap_or_default();
        let mut visited: Result<()> = Ok(());
        // The next group's taps as a task of the caller's rayon pool, this group's visit on
        // the calling thread; both done before the next step.
        rayon::in_place_scope(|scope| {
            if let Some(next) = groups.get(group_no + 1) {
                let ready = &mut ready;
                let pools = &pools;
                scope.spawn(move |_| *ready = Some(group_taps(model, next, labels, pools, what)));
            }
            visited = visiting.group(group_no * threads, group, results, &mut visit);
        });
        visited?;
        progress.idle();
    }
    Ok(())
}

/// `seqs` cut in order into batches of `size` (the last may be shorter), with their stable
/// indices.
fn cut_batches(seqs: &[Sequence], indices: &[u64], size: usize) -> Vec<TokenBatch> {
    seqs.chunks(size)
        .zip(indices.chunks(size))
        .map(|(chunk, idx)| {
            let refs: Vec<(u64, &[u32])> = chunk
                .iter()
                .zip(idx)
                .map(|(s, &i)| (i, s.ids.as_slice()))
                .collect();
            TokenBatch::training(&refs)
        })
        .collect()
}

/// What visiting a batch's taps needs besides the taps: the same for every batch of a pass.
struct Visiting<'a> {
    model: &'a dyn TapModel,
    seqs: &'a [Sequence],
    size: usize,
    labels: Labels,
    progress: &'a dyn Progress,
    what: &'a str,
}

impl Visiting<'_> {
    /// Hands the taps of `group` (whose first batch is batch `first_batch` of the pass) to
    /// `visit` in order, each checked finite first, advancing the progress batch by batch.
    fn group(
        &self,
        first_batch: usize,
        group: &[TokenBatch],
        results: Vec<Result<TapBatch>>,
        visit: &mut impl FnMut(usize, &TapBatch) -> Result<()>,
    ) -> Result<()> {
        for (k, (batch, taps)) in group.iter().zip(results).enumerate() {
            let start = (first_batch + k) * self.size;
            let chunk = &self.seqs[start..start + batch.len()];
            let taps = taps?;
            finite::check_batch(self.model, chunk, batch, &taps, self.labels, self.what)?;
            // Read before the visit, which sees the same answer and saves its state on it.
            let stopping = self.progress.stop_requested();
            visit(start, &taps)?;
            self.progress.advance(batch.n_tokens() as u64);
            if stopping {
                return Err(crate::Error::Interrupted(format!(
                    "{} stopped at a batch boundary; rerunning the same job resumes from its last saved state",
                    self.what
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt2::{tests::tiny_config, Gpt2};
    use crate::model::ModuleSelection;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Asks the pass to stop once the first batch is reported.
    struct StopAfterFirst(AtomicBool);

    impl Progress for StopAfterFirst {
        fn begin(&self, _: &str, _: u64) {}
        fn advance(&self, _: u64) {
            self.0.store(true, Ordering::Relaxed);
        }
        fn end(&self) {}
        fn stop_requested(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn a_stop_requested_ends_the_pass_after_one_more_batch_that_sees_it() {
        let model = Gpt2::random(tiny_config(), 1, ModuleSelection::Mlp).unwrap();
        let seqs: Vec<Sequence> = (0..6)
            .map(|k| Sequence {
                id: format!("{k}:0"),
                ids: vec![1, 2, 3, 4 + k],
            })
            .collect();
        // Silent: every batch visited.
        let mut visited = 0;
        run_batches(&model, &seqs, 0, 2, Labels::Data, &Silent, "t", |_, _| {
            visited += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(visited, 3);
        // Stopped: the first batch, then the one whose visit saw the request (it saves there).
        let stop = StopAfterFirst(AtomicBool::new(false));
        let mut seen = Vec::new();
        let r = run_batches(&model, &seqs, 0, 2, Labels::Data, &stop, "t", |start, _| {
            seen.push((start, stop.stop_requested()));
            Ok(())
        });
        assert!(matches!(r, Err(crate::Error::Interrupted(_))), "{r:?}");
        assert_eq!(seen, vec![(0, false), (2, true)]);
    }
}
