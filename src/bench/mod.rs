//! `infl bench`: fit and score timed against one plain forward+backward over the same tokens,
//! query batching, peak memory against corpus size and the kernels; `--passes-only` (each pass
//! against its GEMM-bound floor) in `floors`, the peak-memory children in `rss`, the engine and
//! kernel comparisons in `kernels`.

mod floors;
mod kernels;
mod rss;

use crate::cli::args::BenchArgs;
use anyhow::Result;
use infl::curvature::Fisher;
use infl::data::Sequence;
use infl::model::{Labels, ModuleSelection, TapModel};
use infl::options::{FitOptions, QueryRank, RunOptions, ScoreOptions};
use infl::pass::for_each_batch;
use infl::pass::{Progress, Silent};
use infl::workflow::{self, FitJob, ScoreJob};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The model, data and settings every measurement of a bench runs on.
struct Inputs {
    model: PathBuf,
    train: PathBuf,
    queries: PathBuf,
    max_len: usize,
    batch_size: usize,
    /// Where the benchmark writes its scratch files.
    out: PathBuf,
}

impl Inputs {
    /// The factors the default measurement fits and scores with (and its peak-memory children
    /// read).
    fn factors(&self) -> PathBuf {
        self.out.join("factors")
    }
}

/// `infl bench`: the measurement `a` asks for (the bundled model and corpus unless it names
/// its own).
pub fn run(a: BenchArgs, progress: &dyn Progress) -> Result<()> {
    if a.engines_only {
        return kernels::print();
    }
    let (model_dir, corpus, queries, default_len) = match (a.model, a.train, a.queries) {
        (Some(m), Some(t), Some(q)) => (m, t, q, None),
        _ => {
            let (m, t, q) = crate::demo::unpack_bundled(&a.out)?;
            (m, t, q, Some(crate::demo::BUNDLED_WINDOW))
        }
    };
    let model = infl::model::load(&model_dir, ModuleSelection::All, infl::model::Compute::CPU)?;
    let inputs = Inputs {
        max_len: a.max_len.or(default_len).unwrap_or(model.max_positions()),
        model: model_dir,
        train: corpus,
        queries,
        batch_size: a.batch_size,
        out: a.out,
    };
    if a.passes_only {
        return floors::pass_floors(
            model.as_ref(),
            &inputs,
            a.fisher,
            a.repeat as usize,
            progress,
        );
    }
    if let Some(scale) = a.rss_child {
        return rss::child(scale, &inputs);
    }
    measure(
        model.as_ref(),
        &inputs,
        (&a.query_counts, &a.rss_scales),
        progress,
    )
}

/// The default bench: the baseline, an EK-FAC fit, a rank-32 score, query batching at each of
/// `query_counts`, peak memory at each of `rss_scales`, then the engines and kernels.
fn measure(
    model: &dyn TapModel,
    inputs: &Inputs,
    (query_counts, rss_scales): (&[usize], &[usize]),
    progress: &dyn Progress,
) -> Result<()> {
    let mut tok = infl::data::LazyTokenizer::new(&inputs.model);
    let data =
        infl::data::read_corpus(&inputs.train, &mut tok, inputs.max_len, model.vocab_size())?;
    let n_tokens = data.n_tokens() as f64;
    let n_queries = infl::data::read_queries(
        &inputs.queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?
    .0
    .len();

    // Timed before and after the other passes, keeping the best, so that first-touch page
    // faults and a busy machine do not flatter the ratios.
    let mut base = baseline(model, &data.sequences, inputs.batch_size)?;

    let t0 = Instant::now();
    let fit = fit_job(inputs, inputs.factors(), Fisher::Sampled, inputs.batch_size);
    workflow::fit(&fit, progress)?;
    let fit_s = t0.elapsed().as_secs_f64();

    let score_s = workflow::score(
        &inputs_score_job(inputs, &inputs.queries, Some(32), "results"),
        progress,
    )?
    .seconds;
    let batching = query_batching(inputs, query_counts, progress)?;

    base = base
        .min(baseline(model, &data.sequences, inputs.batch_size)?)
        .min(baseline(model, &data.sequences, inputs.batch_size)?);
    println!(
        "infl bench: {} parameters, {} training tokens, {} queries, batch {}",
        model.n_parameters(),
        n_tokens,
        n_queries,
        inputs.batch_size
    );
    println!(
        "{:<44} {:>10} {:>12} {:>10}",
        "pass", "seconds", "tokens/s", "× fwd+bwd"
    );
    let rows = [
        ("forward+backward (baseline)".to_string(), base),
        ("fit ekfac (2 passes + eigh)".to_string(), fit_s),
        (
            format!("score, {n_queries} queries, rank 32 (end to end)"),
            score_s,
        ),
    ];
    for (name, secs) in rows.into_iter().chain(batching) {
        println!(
            "{name:<44} {secs:>10.3} {:>12.0} {:>10.2}",
            n_tokens / secs,
            secs / base
        );
    }
    match rss::peak_rss_mib() {
        Some(m) => println!("peak memory of this process (VmHWM): {m:.0} MiB"),
        None => println!("peak memory: not available on this platform"),
    }
    rss::measure_scales(inputs, rss_scales)?;
    // Last, so that its models do not count in the peak memory reported above.
    kernels::print()
}

/// Baseline: one forward+backward over every training token, taps extracted and dropped; its
/// seconds.
fn baseline(model: &dyn TapModel, sequences: &[Sequence], batch_size: usize) -> Result<f64> {
    let t0 = Instant::now();
    for_each_batch(
        model,
        sequences,
        batch_size,
        Labels::Data,
        &Silent,
        "baseline",
        |_, _| Ok(()),
    )?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Query batching: many queries share one pass over the training data. Each of `counts`
/// queries (the queries file repeated under new ids) is scored at rank 32 and at full rank;
/// returns each scoring pass's (row name, seconds).
fn query_batching(
    inputs: &Inputs,
    counts: &[usize],
    progress: &dyn Progress,
) -> Result<Vec<(String, f64)>> {
    let text = std::fs::read_to_string(&inputs.queries)?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut batching = Vec::new();
    for &count in counts {
        let many = inputs.out.join(format!("queries-{count}.jsonl"));
        let mut out = String::new();
        for i in 0..count {
            let mut v: serde_json::Value = serde_json::from_str(lines[i % lines.len()])?;
            v["id"] = format!("q{i}").into();
            out.push_str(&format!("{v}\n"));
        }
        infl::io::write_atomic(&many, out.as_bytes())?;
        for (rank, label) in [(Some(32), "rank 32"), (None, "full rank")] {
            let job = inputs_score_job(inputs, &many, rank, &format!("results-{count}"));
            let secs = workflow::score(&job, progress)?.pass_seconds;
            batching.push((format!("scoring pass, {count} queries, {label}"), secs));
        }
    }
    Ok(batching)
}

/// The fit `infl bench` times: EK-FAC over every layer with `fisher`'s labels (seed 0), batches
/// of `batch_size`, factors to `out`; no checkpoints, no store, resumable (not `--fresh`).
fn fit_job(inputs: &Inputs, out: PathBuf, fisher: Fisher, batch_size: usize) -> FitJob {
    FitJob {
        run: RunOptions {
            fresh: false,
            ..RunOptions::ONCE
        },
        ..FitJob::new(
            inputs.model.clone(),
            inputs.train.clone(),
            out,
            FitOptions {
                fisher,
                batch_size,
                max_len: Some(inputs.max_len),
                ..FitOptions::default()
            },
        )
    }
}

/// `score_job` of `inputs`'s model, factors and corpus with `queries`, written to OUT/`out`.
fn inputs_score_job(
    inputs: &Inputs,
    queries: &Path,
    query_rank: Option<usize>,
    out: &str,
) -> ScoreJob {
    score_job(
        (&inputs.model, &inputs.factors(), &inputs.train, queries),
        inputs.out.join(out),
        (inputs.batch_size, inputs.max_len),
        query_rank,
    )
}

/// The scoring job `infl bench` times: top 10, no dense output, heuristic damping, resumable
/// (not `--fresh`).
fn score_job(
    (model, factors, train, queries): (&Path, &Path, &Path, &Path),
    out: PathBuf,
    (batch_size, max_len): (usize, usize),
    query_rank: Option<usize>,
) -> ScoreJob {
    ScoreJob {
        options: ScoreOptions {
            batch_size,
            max_len: Some(max_len),
            query_rank: QueryRank(query_rank),
            ..ScoreOptions::default()
        },
        run: RunOptions {
            fresh: false,
            ..RunOptions::ONCE
        },
        ..ScoreJob::new(
            model.to_path_buf(),
            factors.to_path_buf(),
            train.to_path_buf(),
            queries.to_path_buf(),
            out,
        )
    }
}
