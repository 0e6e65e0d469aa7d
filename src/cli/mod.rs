//! The command line: the `Cli` and `Command` parser types (the arguments themselves are in
//! `args` and `jobs`) and the dispatch, one short function per subcommand that maps its
//! arguments to a library call and prints the summary.

pub mod args;
pub mod jobs;
pub mod serve;

use crate::progress::Bars;
use anyhow::Result;
use args::{
    BenchArgs, CompareArgs, DemoArgs, IndexArgs, InspectArgs, MergeArgs, ReportArgs, TrainArgs,
    ValidateArgs, ValidateCommand, ValidateExactArgs, ValidateLdsArgs, ValidatePbrfArgs,
    ValidateRemovalArgs,
};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use infl::pass::Progress;
use infl::workflow;
use jobs::{FitArgs, ScoreArgs, SelfInfluenceArgs};

#[derive(Parser)]
#[command(
    name = "infl",
    version,
    about = "Which training sequences made the model produce this completion? EK-FAC influence functions.",
    long_about = "Which training sequences made the model produce this completion?\n\n\
infl computes EK-FAC influence functions (Grosse et al. 2023) with the conventions of kronfluence:\n\
  infl fit   --model DIR --train CORPUS.jsonl --out FACTORS      curvature (A, S, eigenbases, Λ)\n\
  infl score --model DIR --factors FACTORS --train CORPUS.jsonl \\\n\
             --queries QUERIES.jsonl --out RESULTS              influence of each training sequence\n\n\
A score I(q, z) > 0 means training on z lowers −log p(completion | prompt) of query q: z supports\n\
the completion. Scores are sums over tracked layers and are not divided by the corpus size.\n\n\
Try `infl demo` first: it trains a tiny GPT-2 on a corpus bundled in the binary (Shakespeare\n\
and 40 invented facts), runs both stages and measures how often each fact's sentence is found.\n\
`infl validate exact` measures each strategy against the exact damped per-layer Fisher,\n\
`infl validate lds` against retraining (the linear datamodeling score), `infl validate pbrf`\n\
against the proximal Bregman response function; `infl validate removal` calibrates the\n\
predicted change of −log p on removal against retraining without the group."
)]
struct Cli {
    /// No progress bars or summaries on stderr (results still go to files / stdout).
    #[arg(long, short, global = true)]
    quiet: bool,

    /// Cores to use [default: every core]: the engine's threads, or as many batches at once
    /// (data-parallel over sequences) where the engine is not threaded inside. Results do not
    /// depend on it.
    #[arg(long, global = true, value_name = "N", value_parser = infl::options::THREADS.parser())]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit the curvature factors (A, S, eigenbases, Λ) of a model on a training corpus.
    Fit(FitArgs),
    /// Score the influence of every training sequence on every query.
    Score(ScoreArgs),
    /// Build a BM25 index over a corpus's token ids for `score --prefilter`.
    Index(IndexArgs),
    /// Each training sequence's influence on its own loss (outliers, mislabelled data).
    ///
    /// ekfac-refined factors are refused (exit 3): their inverse is refined by a solve per
    /// query, and one solve per training sequence is not run; fit --strategy ekfac instead.
    SelfInfluence(SelfInfluenceArgs),
    /// Train a small GPT-2 (and its byte-level BPE tokenizer) from scratch on a corpus.
    Train(TrainArgs),
    /// Train a tiny model on the bundled corpus, fit, score, print the top sources and recall.
    Demo(DemoArgs),
    /// Time fit and score against one plain forward+backward over the same tokens; peak memory.
    Bench(BenchArgs),
    /// Describe a model (architecture, parameters, tracked layers) and estimate the memory and
    /// time fit and score will need, before running them.
    Inspect(InspectArgs),
    /// Write a self-contained HTML report of a results directory (opens from disk, no network).
    Report(ReportArgs),
    /// Compare results of the same queries (other models or strategies): top-k overlap, rank correlation.
    Compare(CompareArgs),
    /// Merge the shards of a sharded `fit` or `score` (`--shard i/N`) exactly into final files.
    Merge(MergeArgs),
    /// Serve influence over HTTP: an API and a web page over the model, factors and store,
    /// loaded once (docs/serve.md).
    Serve(serve::ServeArgs),
    /// Measure how well each curvature strategy reproduces a more exact reference.
    #[command(
        long_about = "Measure how well each curvature strategy (ekfac, kfac, diagonal, identity) reproduces a\n\
    more exact reference, query by query, on a model small enough to compute the reference.\n\n\
    Subcommands:\n  \
    exact   against influence under the exact damped per-layer (block-diagonal) Fisher\n  \
    lds     against retraining: the linear datamodeling score over M models trained on subsets\n  \
    pbrf    against the proximal Bregman response function: linearised on every training sequence\n  \
    removal the removal units against retraining without each query's top-k, bottom-k and random groups"
    )]
    Validate(ValidateArgs),
}

/// Parses the command line and runs its subcommand.
pub fn run() -> Result<()> {
    let cli = parse();
    configure_threads(&cli)?;
    let (progress, quiet) = (Bars::new(cli.quiet), cli.quiet);
    match cli.command {
        Command::Fit(a) => fit(a, &progress, quiet),
        Command::Score(a) => score(a, &progress, quiet),
        Command::Index(a) => index(a, quiet),
        Command::SelfInfluence(a) => self_influence(a, &progress, quiet),
        Command::Train(a) => train(a, &progress, quiet),
        Command::Demo(a) => demo(a, &progress, quiet),
        Command::Bench(a) => crate::bench::run(a, &progress),
        Command::Report(a) => report(a, quiet),
        Command::Compare(a) => compare(a),
        Command::Inspect(a) => inspect(a, quiet),
        Command::Merge(a) => merge(a, &progress, quiet),
        Command::Serve(a) => Ok(infl_serve::run(a.into_config())?),
        Command::Validate(a) => match a.command {
            ValidateCommand::Exact(a) => validate_exact(a, &progress, quiet),
            ValidateCommand::Lds(a) => validate_lds(a, &progress, quiet),
            ValidateCommand::Pbrf(a) => validate_pbrf(a, &progress, quiet),
            ValidateCommand::Removal(a) => validate_removal(a, &progress, quiet),
        },
    }
}

/// The command line, parsed; clap's errors (exit code 2) end the process here.
fn parse() -> Cli {
    let matches = negative_numbers_are_values(Cli::command()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Lets every option's value start with a minus sign followed by a digit, so that `--damping -1`
/// or `--top-k -3` reaches the option's own range check ("must be at least …") instead of
/// being read as an unknown flag.
fn negative_numbers_are_values(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    })
    .mut_subcommands(negative_numbers_are_values)
}

/// Sets the cores the command uses (`--threads`), before any thread pool starts (they read the
/// count once).
fn configure_threads(cli: &Cli) -> Result<()> {
    let compute = match &cli.command {
        Command::Fit(a) => Some(&a.compute),
        Command::Score(a) => Some(&a.compute),
        Command::SelfInfluence(a) => Some(&a.compute),
        Command::Inspect(a) => Some(&a.compute),
        Command::Serve(a) => Some(&a.compute),
        _ => None,
    };
    // Autograd on the CPU runs batches side by side; on a GPU, as the fast engine, one batch
    // uses every core (the statistics).
    infl::shard::set_threads(
        cli.threads.unwrap_or(0),
        compute.is_some_and(|c| {
            c.engine() == infl::model::Engine::Autograd && c.device == Default::default()
        }),
    );
    // Training runs on candle's autograd, whose element-wise kernels split each op over a
    // spinning barrier pool: on small models and shared machines the spinning costs more than it
    // saves (measured: 3× slower on 2 loaded cores). One thread there; the products still use
    // the rayon pool.
    let trains = match &cli.command {
        Command::Train(_) | Command::Demo(_) => true,
        Command::Validate(v) => matches!(
            v.command,
            ValidateCommand::Lds(_) | ValidateCommand::Pbrf(_) | ValidateCommand::Removal(_)
        ),
        _ => false,
    };
    if trains && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    Ok(())
}

fn fit(a: FitArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let s = workflow::fit(&a.into_job(), progress)?;
    if !quiet {
        eprintln!("{} ({:.1}s)", s.message, s.seconds);
    }
    Ok(())
}

fn score(a: ScoreArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let s = workflow::score(&a.into_job(), progress)?;
    if !quiet {
        print!(
            "{}",
            infl::results::top_sources_text(&s.top, &s.meta.queries.ids, 3)
        );
        eprintln!("{} ({:.1}s)", s.message, s.seconds);
    }
    Ok(())
}

fn index(a: IndexArgs, quiet: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let index =
        infl::index::index_corpus(&a.model, &a.corpus, &a.out, a.max_len, a.output.overwrite)?;
    if !quiet {
        eprintln!(
            "indexed {} sequences in {:.1}s → {}",
            index.n_sequences(),
            started.elapsed().as_secs_f64(),
            a.out.display()
        );
    }
    Ok(())
}

fn self_influence(a: SelfInfluenceArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let job = a.into_job();
    let s = workflow::self_influence(&job, progress)?;
    if !quiet {
        eprintln!(
            "self-influence of {} training sequences in {:.1}s → {}",
            s.meta.corpus.n_sequences,
            s.seconds,
            job.out.display()
        );
    }
    Ok(())
}

fn train(a: TrainArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let job = a.job();
    let t = infl::train::train(&job, progress)?;
    if !quiet {
        let r = &t.record;
        eprintln!(
            "trained {} parameters on {} sequences ({} tokens) in {:.1}s: loss {:.3} → {:.3} (first → last epoch) → {}",
            r.parameters,
            r.n_sequences,
            r.n_tokens,
            r.seconds,
            r.epoch_losses.first().copied().unwrap_or(f64::NAN),
            r.epoch_losses.last().copied().unwrap_or(f64::NAN),
            job.out.display()
        );
    }
    Ok(())
}

fn demo(a: DemoArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let (corpus, queries) = infl::demo::unpack(&a.out)?;
    let job = infl::demo::DemoJob {
        out: a.out.clone(),
        corpus,
        queries,
        train: a.train.job_for(&a.out),
        retrain: a.retrain,
        strategies: a.strategies,
        top_k: 10,
    };
    crate::demo::run(&job, a.top_k, progress, quiet)
}

fn compare(a: CompareArgs) -> Result<()> {
    let cmp = infl::compare::run(&a.results, a.out.as_deref(), a.json.as_deref())?;
    print!("{}", cmp.table());
    Ok(())
}

fn merge(a: MergeArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let out = workflow::merge(&a.dir, progress)?;
    if !quiet {
        eprintln!("{}", out.message);
    }
    Ok(())
}

fn validate_exact(a: ValidateExactArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let job = a.into_job()?;
    let report = infl::validate::exact::run(&job, progress)?;
    print!("{}", report.table());
    if !quiet {
        eprintln!(
            "exact scores in {:.1}s, all in {:.1}s → {}",
            report.exact_seconds,
            report.seconds,
            job.out.join(infl::validate::exact::EXACT_FILE).display()
        );
    }
    Ok(())
}

fn validate_lds(a: ValidateLdsArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let job = a.into_job(infl::shard::threads());
    let r = infl::validate::lds::run(&job, progress)?;
    print!("{}", r.table());
    if !quiet {
        eprintln!(
            "retraining took {:.0}s of {:.0}s; measurements vary by {:.3} nats (mean s.d. over subsets); wrote {}",
            r.retrain_seconds,
            r.seconds,
            r.mean_loss_spread,
            job.out.join(infl::validate::lds::LDS_FILE).display()
        );
    }
    Ok(())
}

fn validate_pbrf(a: ValidatePbrfArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let job = a.into_job()?;
    let r = infl::validate::pbrf::run(&job, progress)?;
    print!("{}", r.table());
    if !quiet {
        eprintln!(
            "PBRF in {:.0}s, all in {:.0}s → {}",
            r.pbrf_seconds,
            r.seconds,
            job.out.join(infl::validate::pbrf::PBRF_FILE).display()
        );
    }
    Ok(())
}

fn validate_removal(a: ValidateRemovalArgs, progress: &dyn Progress, quiet: bool) -> Result<()> {
    let job = a.into_job(infl::shard::threads());
    let r = infl::validate::removal::run(&job, progress)?;
    print!("{}", r.table());
    if !quiet {
        eprintln!(
            "retraining took {:.0}s of {:.0}s; wrote {} and {}",
            r.retrain_seconds,
            r.seconds,
            job.out
                .join(infl::validate::removal::REMOVAL_FILE)
                .display(),
            job.out
                .join(infl::validate::removal::REMOVAL_HTML)
                .display()
        );
    }
    Ok(())
}

fn inspect(a: InspectArgs, quiet: bool) -> Result<()> {
    use infl::inspect;
    let model = infl::model::load(&a.model, a.modules, a.compute)?;
    let max_len = a.max_len.unwrap_or(model.max_positions().min(512));
    if max_len > model.max_positions() {
        anyhow::bail!(infl::Error::usage(format!(
            "--max-len {max_len}: must be at most the model's context length {}",
            model.max_positions()
        )));
    }
    let e = inspect::estimate(model.as_ref(), a.batch_size, max_len);
    let fits = inspect::mem_available().is_none_or(|m| e.fit_total() < m);
    let probe = if a.no_probe {
        None
    } else if !fits {
        if !quiet {
            eprintln!("skipping the timing probe: the estimate exceeds the memory available");
        }
        None
    } else {
        if !quiet {
            eprintln!(
                "probing one batch of {} × {max_len} tokens (taps, a one-batch fit, a one-query score)…",
                a.batch_size
            );
        }
        Some(inspect::probe(model.as_ref(), a.batch_size, max_len)?)
    };
    print!(
        "{}",
        inspect::report(
            &a.model,
            model.as_ref(),
            a.batch_size,
            max_len,
            (a.n_queries as u64, a.query_rank.0),
            probe.as_ref()
        )
    );
    Ok(())
}

fn report(a: ReportArgs, quiet: bool) -> Result<()> {
    let opts = infl::report::ReportOptions {
        fit: infl::powerlaw::FitOptions {
            bootstrap: a.bootstrap,
            seed: a.seed,
            ..Default::default()
        },
        max_tokens: a.max_tokens,
    };
    let s = infl::report::write_report(&a.results, &a.out, &opts)?;
    if !quiet {
        for m in &s.missing {
            eprintln!("note: missing {m}");
        }
        for t in &s.tails {
            match &t.fit {
                Ok(f) => eprintln!(
                    "{}: positive tail: {} (above x_min = {}); {}",
                    t.query_id,
                    f.verdict_line(),
                    infl::report::fmt_score(f.x_min),
                    t.half
                ),
                Err(e) => eprintln!("{}: no tail fit ({e}); {}", t.query_id, t.half),
            }
        }
        eprintln!("wrote {} ({} KiB)", a.out.display(), s.bytes / 1024);
    }
    Ok(())
}
