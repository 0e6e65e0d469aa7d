//! Peak memory against corpus size: each size scored by a child `infl bench --rss-child`
//! process of its own (a process's VmHWM never goes down).

use super::{score_job, Inputs};
use anyhow::Result;
use infl::pass::Silent;
use infl::workflow;

/// Peak resident memory of this process (VmHWM), in MiB, where /proc tells it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs one child per corpus size of `scales` (multiples of the corpus) and prints its line.
pub fn measure_scales(inputs: &Inputs, scales: &[usize]) -> Result<()> {
    let exe = std::env::current_exe()?;
    for scale in scales {
        let out = std::process::Command::new(&exe)
            .args([
                "--quiet",
                "bench",
                "--rss-child",
                &scale.to_string(),
                "--batch-size",
                &inputs.batch_size.to_string(),
                "--out",
            ])
            .arg(&inputs.out)
            .args(["--model"])
            .arg(&inputs.model)
            .args(["--train"])
            .arg(&inputs.train)
            .args(["--queries"])
            .arg(&inputs.queries)
            .args(["--max-len", &inputs.max_len.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "bench child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// One streamed scoring run on the corpus repeated `scale` times; prints its peak memory.
pub fn child(scale: usize, inputs: &Inputs) -> Result<()> {
    let big = inputs.out.join(format!("corpus-x{scale}.jsonl"));
    {
        use std::io::Write;
        let text = std::fs::read(&inputs.train)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big)?);
        for _ in 0..scale {
            f.write_all(&text)?;
        }
        f.flush()?;
    }
    let job = score_job(
        (&inputs.model, &inputs.factors(), &big, &inputs.queries),
        inputs.out.join(format!("results-x{scale}")),
        (inputs.batch_size, inputs.max_len),
        Some(32),
    );
    let s = workflow::score(&job, &Silent)?;
    std::fs::remove_file(&big)?;
    println!(
        "corpus ×{scale:<4} {:>9} sequences {:>10} tokens  peak memory (VmHWM) {:>6.0} MiB  ({:.1}s)",
        s.meta.corpus.n_sequences,
        s.meta.corpus.n_tokens,
        peak_rss_mib().unwrap_or(f64::NAN),
        s.seconds
    );
    Ok(())
}
