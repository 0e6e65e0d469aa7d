//! How a pass spreads over the cores: how many batches it computes at once, the thread pool
//! of each, and the taps of a group of batches computed side by side.

use crate::error::{Error, Result};
use crate::model::{Labels, TapBatch, TapModel, TokenBatch};

/// How many batches the passes compute at once with `model`. An engine that is not threaded
/// (autograd) runs [`crate::shard::threads`] batches, one thread each. A threaded engine (fast)
/// runs two batches, the threads split between them ([`pool_threads`]): its products are only
/// tokens × layer width, which a core alone runs nearer its GEMM rate than two cores splitting
/// them (the covariance pass 7–11% faster on 2 cores, measured), and two batches' activations
/// are what two at once cost in memory, whatever the core count.
pub fn batches_at_once(model: &dyn TapModel) -> usize {
    let threads = crate::shard::threads().max(1);
    if model.is_threaded() {
        threads.min(2)
    } else {
        threads
    }
}

/// The threads of the pool of concurrent batch `k` of `at_once` sharing `threads`: every
/// thread goes to one of them (3 threads: 2 and 1).
pub(super) fn pool_threads(k: usize, at_once: usize, threads: usize) -> usize {
    threads / at_once + usize::from(k < threads % at_once)
}

/// A pool per concurrent batch for a threaded engine, whose kernels split over the pool
/// they run in; an unthreaded engine runs on plain threads (no pools).
pub(super) fn batch_pools(
    model: &dyn TapModel,
    at_once: usize,
    what: &str,
) -> Result<Vec<rayon::ThreadPool>> {
    if model.is_threaded() && at_once > 1 {
        (0..at_once)
            .map(|k| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(pool_threads(k, at_once, crate::shard::threads().max(1)))
                    .start_handler(|_| crate::linalg::flush_subnormals_on_this_thread())
                    .build()
                    .map_err(|e| Error::Other(format!("{what}: cannot start threads: {e}")))
            })
            .collect()
    } else {
        Ok(Vec::new())
    }
}

/// The taps of one group of batches, each batch on its own thread (in its own pool, given
/// `pools`) when there are several; a batch alone gets every thread.
pub(super) fn group_taps(
    model: &dyn TapModel,
    group: &[TokenBatch],
    labels: Labels,
    pools: &[rayon::ThreadPool],
    what: &str,
) -> Vec<Result<TapBatch>> {
    if group.len() == 1 {
        return vec![model.taps(&group[0], labels)];
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(k, b)| {
                scope.spawn(move || match pools.get(k) {
                    Some(pool) => pool.install(|| model.taps(b, labels)),
                    None => {
                        crate::linalg::flush_subnormals_on_this_thread();
                        model.taps(b, labels)
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Other(format!("{what}: a worker thread panicked")))
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_batches_share_every_thread() {
        for (threads, want) in [(2, vec![1, 1]), (3, vec![2, 1]), (16, vec![8, 8])] {
            let got: Vec<usize> = (0..2).map(|k| pool_threads(k, 2, threads)).collect();
            assert_eq!(got, want, "{threads} threads");
        }
        assert_eq!(pool_threads(0, 1, 5), 5);
    }
}
