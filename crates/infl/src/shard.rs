//! Splitting one job into deterministic shards that any launcher (Slurm job arrays, Kubernetes
//! Indexed Jobs, a shell loop) can run, and the process-wide thread count.
//!
//! **The partition.** The corpus is cut into training sequences exactly as an unsharded run cuts
//! it (documents in file order, each into windows of `--max-len` tokens). Sequence number `k`
//! (0-based, in that order) belongs to shard `k mod N`. Round-robin keeps shards balanced when
//! document lengths drift along the file, needs no counting pass, and every shard sees the
//! same global sequence numbers (which seed the sampled Fisher labels), so a sharded run
//! computes exactly the per-sequence quantities of an unsharded one.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole job: one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            return Err(Error::input("--shard i/N: N must be at least 1"));
        }
        if index >= count {
            return Err(Error::input(format!(
                "--shard {index}/{count}: the shard index must be below the shard count (shards are numbered 0..{})",
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }

    /// Does global sequence number `k` belong to this shard?
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }

    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// `i-of-N`, used in file names.
    pub fn tag(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// Parses `--shard`: `i/N` (explicit), `auto` (a Slurm array task: index and count from
    /// `SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_MIN`, `SLURM_ARRAY_TASK_STEP` and
    /// `SLURM_ARRAY_TASK_COUNT`) or `auto/N` (the index from `JOB_COMPLETION_INDEX`, as a
    /// Kubernetes Indexed Job sets it, or else from Slurm; the count N given explicitly).
    pub fn parse(spec: &str) -> Result<Self> {
        Self::parse_with_env(spec, &|k| std::env::var(k).ok())
    }

    /// [`Shard::parse`] with the environment given as a lookup (for tests).
    pub fn parse_with_env(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let bad = || {
            Error::input(format!(
                "--shard `{spec}`: expected `i/N` (e.g. 0/4), `auto` (Slurm array) or `auto/N` (Kubernetes Indexed Job with N completions)"
            ))
        };
        let number = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
        let (head, tail) = match spec.split_once('/') {
            Some((h, t)) => (h, Some(t)),
            None => (spec, None),
        };
        if head != "auto" {
            let count = number(tail.ok_or_else(bad)?)?;
            return Shard::new(number(head)?, count);
        }
        let var = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::input(format!(
                        "--shard auto: environment variable {name}=`{v}` is not a non-negative integer"
                    ))
                }),
            }
        };
        let slurm_index = || -> Result<Option<usize>> {
            let Some(id) = var("SLURM_ARRAY_TASK_ID")? else {
                return Ok(None);
            };
            let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = var("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            if id < min || (id - min) % step != 0 {
                return Err(Error::input(format!(
                    "--shard auto: SLURM_ARRAY_TASK_ID={id} is not MIN + k·STEP (MIN {min}, STEP {step})"
                )));
            }
            Ok(Some((id - min) / step))
        };
        match tail {
            None => {
                let index = slurm_index()?.ok_or_else(|| {
                    Error::input(
                        "--shard auto: SLURM_ARRAY_TASK_ID is not set (not a Slurm array task); use --shard auto/N with JOB_COMPLETION_INDEX, or --shard i/N",
                    )
                })?;
                let count = var("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                    Error::input("--shard auto: SLURM_ARRAY_TASK_COUNT is not set; give the count explicitly with --shard auto/N")
                })?;
                Shard::new(index, count).map_err(|e| {
                    Error::input(format!("--shard auto (from the Slurm environment): {e}"))
                })
            }
            Some(t) => {
                let count = number(t)?;
                let index = match var("JOB_COMPLETION_INDEX")? {
                    Some(i) => i,
                    None => slurm_index()?.ok_or_else(|| {
                        Error::input(format!(
                            "--shard auto/{count}: neither JOB_COMPLETION_INDEX (Kubernetes Indexed Job) nor SLURM_ARRAY_TASK_ID is set"
                        ))
                    })?,
                };
                Shard::new(index, count)
            }
        }
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        Shard::parse(spec)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many cores the process uses (0 = every core). With an engine threaded inside (the
/// fast engine) that is the number of threads of its kernels and products: rayon, gemm and
/// faer follow `RAYON_NUM_THREADS`, and the passes split them between two batches computed at
/// once ([`crate::pass::batches_at_once`]). With `data_parallel` (the autograd engine, whose
/// elementwise ops are single-threaded) it is the number of batches run at once instead, each
/// single-threaded: candle's threaded products under concurrent batches oversubscribe the
/// cores (measured slower). Call it first thing, before any thread pool starts. Results do not
/// depend on it: batches are formed and reduced in the same order whatever the count.
pub fn set_threads(n: usize, data_parallel: bool) {
    THREADS.store(n, Ordering::Relaxed);
    let inner = if data_parallel { 1 } else { n };
    if inner > 0 {
        // Read once when rayon's global pool starts, and by candle at each product.
        std::env::set_var("RAYON_NUM_THREADS", inner.to_string());
    }
}

/// The number of batches the passes run at once.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn explicit_specs_parse_and_partition_round_robin() {
        let s = Shard::parse("1/3").unwrap();
        assert_eq!((s.index, s.count), (1, 3));
        let owned: Vec<usize> = (0..10).filter(|&k| s.owns(k)).collect();
        assert_eq!(owned, vec![1, 4, 7]);
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("0/0").is_err());
        assert!(Shard::parse("x/2").is_err());
        assert!(Shard::parse("2").is_err());
    }

    #[test]
    fn every_sequence_belongs_to_exactly_one_shard() {
        for n in 1..6 {
            for k in 0..50 {
                let owners = (0..n)
                    .filter(|&i| Shard::new(i, n).unwrap().owns(k))
                    .count();
                assert_eq!(owners, 1);
            }
        }
    }

    #[test]
    fn slurm_array_with_offset_and_step() {
        let e = env(&[
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            Shard::parse_with_env("auto", &e).unwrap(),
            Shard::new(3, 4).unwrap()
        );
        let bad = env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert!(Shard::parse_with_env("auto", &bad).is_err());
        assert!(Shard::parse_with_env("auto", &env(&[])).is_err());
    }

    #[test]
    fn kubernetes_indexed_job() {
        let e = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            Shard::parse_with_env("auto/5", &e).unwrap(),
            Shard::new(2, 5).unwrap()
        );
        assert!(Shard::parse_with_env("auto/2", &e).is_err());
        assert!(Shard::parse_with_env("auto/2", &env(&[])).is_err());
    }
}
