//! Splitting the tracked layers into partitions, so that a model whose factors do not fit in
//! memory is fitted a partition at a time (the paper's and kronfluence's answer for large
//! models). Scores and factors are per layer, so partitions compose exactly: the factors of
//! partitions `0..P` together are those of one unpartitioned fit, tensor for tensor.
//!
//! **The plan.** Partition `i` of `P` is a contiguous run of the tracked layers (in the model's
//! order), cut so that each holds about `1/P` of the factor bytes: contiguous keeps a merged
//! factors file in the unpartitioned order, and balancing by bytes (not by layer count) keeps
//! the largest partition, which sets the memory a run needs, as small as the layers allow.

use crate::error::{Error, Result};
use crate::model::TrackedLayer;
use std::ops::Range;

/// Partition `index` of `count` (0-based) of the tracked layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    pub index: usize,
    pub count: usize,
}

impl Partition {
    /// Every layer in one partition.
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// `i-of-P`, used in directory names.
    pub fn tag(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// Partition `index` of `count`, refused unless `0 ≤ index < count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::Usage(format!(
                "--partition {index}/{count}: expected i/P with 0 ≤ i < P (e.g. 0/4)"
            )));
        }
        Ok(Partition { index, count })
    }

    /// Parses `--partition i/P`.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || {
            Error::Usage(format!(
                "--partition `{spec}`: expected `i/P` with 0 ≤ i < P (e.g. 0/4)"
            ))
        };
        let (i, p) = spec.split_once('/').ok_or_else(bad)?;
        let number = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
        Self::new(number(i)?, number(p)?).map_err(|_| bad())
    }

    /// This partition's layers, as a range of `tracked` ([`plan`]).
    pub fn layers(&self, tracked: &[TrackedLayer]) -> Result<Range<usize>> {
        if self.count > tracked.len() {
            return Err(Error::Usage(format!(
                "--partition {}/{}: only {} layers are tracked, so at most {} partitions",
                self.index,
                self.count,
                tracked.len(),
                tracked.len()
            )));
        }
        Ok(plan(tracked, self.count)[self.index].clone())
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The partition count and the partitions this process runs, as `partitioning` asks: one
/// partition, P of them, or (`--memory-limit`, or nothing) the count `auto` plans for the budget.
pub fn to_run(
    partitioning: &crate::options::Partitioning,
    tracked: &[TrackedLayer],
    auto: impl FnOnce(u64) -> Result<usize>,
) -> Result<(usize, Vec<Partition>)> {
    if let Some(one) = partitioning.partition {
        one.layers(tracked)?;
        return Ok((one.count, vec![one]));
    }
    let count = match partitioning.partitions {
        Some(count) => count,
        None => auto(partitioning.memory_limit.unwrap_or(u64::MAX))?,
    };
    Partition { index: 0, count }.layers(tracked)?;
    Ok((
        count,
        (0..count).map(|index| Partition { index, count }).collect(),
    ))
}

/// Bytes of one layer's fitted factors (A, S, their eigenvectors and Λ in f32): the weight
/// each layer carries in the plan.
pub fn factor_bytes(l: &TrackedLayer) -> u64 {
    let (i, o) = (l.d_in_h() as u64, l.d_out as u64);
    4 * (2 * (i * i + o * o) + o * i)
}

/// `count` contiguous, non-empty ranges covering `tracked`, each holding about `1/count` of the
/// factor bytes: the cut after layer `k` is placed where the running total is nearest to the
/// next multiple of `total/count`, leaving at least one layer for each later partition.
pub fn plan(tracked: &[TrackedLayer], count: usize) -> Vec<Range<usize>> {
    let n = tracked.len();
    let count = count.clamp(1, n.max(1));
    let bytes: Vec<u64> = tracked.iter().map(factor_bytes).collect();
    let total: u64 = bytes.iter().sum();
    let mut prefix = vec![0u64; n + 1];
    for (k, b) in bytes.iter().enumerate() {
        prefix[k + 1] = prefix[k] + b;
    }
    let mut ranges = Vec::with_capacity(count);
    let mut start = 0;
    for p in 1..count {
        let target = total as f64 * p as f64 / count as f64;
        // The end of partition p-1: at least one layer past `start`, and at least one layer
        // left for each of the `count - p` partitions after it.
        let (lo, hi) = (start + 1, n - (count - p));
        let end = (lo..=hi)
            .min_by(|&a, &b| {
                let da = (prefix[a] as f64 - target).abs();
                let db = (prefix[b] as f64 - target).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(lo);
        ranges.push(start..end);
        start = end;
    }
    ranges.push(start..n);
    ranges
}

/// The fewest partitions whose largest needs at most `budget` bytes, where a partition of
/// layers `r` needs `fixed + per_layer(r)` (the weights and a batch's activations, plus what
/// its layers' statistics hold); `None` if even one layer per partition does not fit.
pub fn count_for_budget(
    tracked: &[TrackedLayer],
    budget: u64,
    fixed: u64,
    per_layers: impl Fn(&[TrackedLayer]) -> u64,
) -> Option<usize> {
    (1..=tracked.len().max(1)).find(|&p| {
        plan(tracked, p)
            .into_iter()
            .all(|r| fixed + per_layers(&tracked[r]) <= budget)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, d_in: usize, d_out: usize) -> TrackedLayer {
        TrackedLayer {
            name: name.into(),
            d_in,
            d_out,
            has_bias: false,
        }
    }

    #[test]
    fn plans_are_contiguous_cover_every_layer_and_balance_bytes() {
        // Bytes per layer: 4·(2·(i² + o²) + o·i): 10×10 → 2000, 20×20 → 8000.
        let t = vec![
            layer("a", 10, 10),
            layer("b", 10, 10),
            layer("c", 20, 20),
            layer("d", 10, 10),
            layer("e", 10, 10),
        ];
        assert_eq!(factor_bytes(&t[0]), 2000);
        assert_eq!(factor_bytes(&t[2]), 8000);
        // Total 16000; the cut nearest 8000 is after `c` (12000 − 8000 = 4000) or before it
        // (4000 − 8000): equal distance, the first wins.
        assert_eq!(plan(&t, 2), vec![0..2, 2..5]);
        // Three parts of ~5333: after b (4000), after c (12000 → nearest to 10667 is 12000).
        assert_eq!(plan(&t, 3), vec![0..2, 2..3, 3..5]);
        assert_eq!(plan(&t, 5), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
        assert_eq!(plan(&t, 1), vec![0..5]);
        for p in 1..=5 {
            let r = plan(&t, p);
            assert_eq!(r.len(), p);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[p - 1].end, 5);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            assert!(r.iter().all(|x| !x.is_empty()));
        }
    }

    #[test]
    fn parse_and_budget() {
        assert_eq!(
            Partition::parse("1/3").unwrap(),
            Partition { index: 1, count: 3 }
        );
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2"] {
            assert!(
                matches!(Partition::parse(bad), Err(Error::Usage(_))),
                "{bad}"
            );
        }
        let t = vec![layer("a", 10, 10), layer("b", 10, 10), layer("c", 10, 10)];
        let need = |l: &[TrackedLayer]| l.iter().map(factor_bytes).sum::<u64>();
        assert_eq!(count_for_budget(&t, 7000, 1000, need), Some(1));
        assert_eq!(count_for_budget(&t, 6999, 1000, need), Some(2));
        assert_eq!(count_for_budget(&t, 3000, 1000, need), Some(3));
        assert_eq!(count_for_budget(&t, 2999, 1000, need), None);
        assert!(Partition { index: 0, count: 4 }.layers(&t).is_err());
    }
}
