//! Independent tasks of unequal cost on the cores, largest first.
//!
//! A pass's statistics are a few dozen products per batch whose costs differ by 30× (a
//! 256-wide Gram against a 1,024-wide one). Split in halves by rayon's indexed iterators, a
//! batch ended with one core still on a large product while the other waited: two threads gave
//! 1.75–1.79× one thread's throughput, against the 1.94× of a plain GEMM split over both
//! (the kronfluence bench job's taps, 4 batches). Taken from one queue in descending cost
//! (Graham's longest-processing-time rule), the last task a core starts is a small one.
//!
//! Each task runs whole on one thread and writes only its own output, so results do not
//! depend on the thread count or on which thread ran what.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// `f(item)` for every item, on all of rayon's threads, taking items in descending `cost`
/// (ties in their given order); the results come back in the items' order.
pub fn largest_first<T: Send, R: Send>(
    items: Vec<T>,
    cost: impl Fn(&T) -> f64,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let n = items.len();
    let costs: Vec<f64> = items.iter().map(&cost).collect();
    let mut order: Vec<usize> = (0..n).collect();
    // Stable: equal costs keep their order, so a run is the same from call to call.
    order.sort_by(|&i, &j| costs[j].total_cmp(&costs[i]));
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let results: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let worker = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        let Some(&i) = order.get(k) else { break };
        let item = lock(&slots[i]).take().expect("each item is taken once");
        let r = f(item);
        *lock(&results[i]) = Some(r);
    };
    let threads = rayon::current_num_threads().min(n);
    if threads <= 1 {
        worker();
    } else {
        rayon::scope(|s| {
            for _ in 1..threads {
                s.spawn(|_| worker());
            }
            worker();
        });
    }
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item ran")
        })
        .collect()
}

/// A lock whose holder cannot have panicked mid-update (each slot is only moved in or out).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_items_order_whatever_the_costs() {
        let items: Vec<usize> = (0..50).collect();
        // Costs out of order, with ties, so the run order differs from the items' order.
        let out = largest_first(items, |&i| ((i * 37) % 11) as f64, |i| i * i);
        assert_eq!(out, (0..50).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn larger_items_start_first_on_one_thread() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let started = Mutex::new(Vec::new());
        pool.install(|| {
            largest_first(
                vec![3.0, 9.0, 1.0, 9.0, 5.0],
                |&c| c,
                |c| lock(&started).push(c),
            )
        });
        assert_eq!(started.into_inner().unwrap(), vec![9.0, 9.0, 5.0, 3.0, 1.0]);
    }

    #[test]
    fn no_items_and_more_threads_than_items_are_fine() {
        let none: Vec<u8> = largest_first(Vec::<u8>::new(), |_| 1.0, |x| x);
        assert!(none.is_empty());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let out = pool.install(|| largest_first(vec![1, 2], |&x| x as f64, |x| x + 1));
        assert_eq!(out, vec![2, 3]);
    }
}
