//! The memory a job's check counts as available (`inspect::mem_available`): what the system
//! has available plus what the process already holds, since the estimates count the whole
//! job and the checks run after the job has loaded some of it (a 1B model's score, holding
//! its weights and preconditioner, was refused for want of memory it already had, and so was
//! the second layer partition of a fit, under the buffers the first had freed and the
//! allocator kept).
//!
//! One test in its own binary: another test allocating at the same time would move
//! MemAvailable.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

const MIB: u64 = 1 << 20;

/// A field of a /proc file in kB, in bytes.
fn proc_bytes(file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    let line = text.lines().find(|l| l.starts_with(field)).unwrap();
    1024 * line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
}

#[test]
fn memory_the_process_holds_counts_as_available() {
    // 448 MiB, written so that their pages are resident.
    let buffers: Vec<Vec<u8>> = (0..7168)
        .map(|i| vec![(i % 250) as u8 + 1; 64 << 10])
        .collect();
    let system = proc_bytes("/proc/meminfo", "MemAvailable:");
    let counted = infl::inspect::mem_available().unwrap();
    assert!(
        counted > system + 400 * MIB,
        "the 448 MiB held were not counted: MemAvailable {} MiB, counted {} MiB",
        system / MIB,
        counted / MIB
    );
    drop(buffers);
}
