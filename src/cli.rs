//! Argument parsing, progress bars and printing. Every option is documented here once.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use infl::curvature::{Fisher, FitOptions, Progress, Strategy};
use infl::influence::Damping;
use infl::model::ModuleSelection;
use infl::workflow::{self, FitJob, ScoreJob};
use std::path::PathBuf;

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
Try `infl demo` first: it runs both stages on a tiny model and corpus bundled in the binary."
)]
struct Cli {
    /// No progress bars or summaries on stderr (results still go to files / stdout).
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit the curvature factors (A, S, eigenbases, Λ) of a model on a training corpus.
    Fit(FitArgs),
    /// Score the influence of every training sequence on every query.
    Score(ScoreArgs),
    /// Run fit and score on the bundled tiny model and corpus, and print the top sequences.
    Demo(DemoArgs),
    /// Time fit and score against one plain forward+backward over the same tokens; peak memory.
    Bench(BenchArgs),
    /// Describe a model (architecture, parameters, tracked layers) and estimate the memory and
    /// time fit and score will need, before running them.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Checkpoint directory (config.json + safetensors) or a llama.cpp .gguf file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,
    /// Sequences per batch the estimate assumes.
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch_size: usize,
    /// Window length the estimate assumes [default: min(model context length, 512)].
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
    /// Which linear layers to track.
    #[arg(long, value_enum, default_value = "all")]
    modules: ModuleSelection,
    /// Number of queries the score estimate assumes.
    #[arg(long, default_value_t = 1, value_name = "Q")]
    queries: u64,
    /// Skip the one-batch timing probe (memory estimate only).
    #[arg(long)]
    no_probe: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Checkpoint directory [default: the bundled tiny model].
    #[arg(long, value_name = "DIR", requires = "train", requires = "queries")]
    model: Option<PathBuf>,
    /// Training corpus [default: the bundled demo corpus].
    #[arg(long, value_name = "CORPUS")]
    train: Option<PathBuf>,
    /// Queries [default: the bundled demo queries].
    #[arg(long, value_name = "QUERIES")]
    queries: Option<PathBuf>,
    /// Window length [default: the model's context length].
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch_size: usize,
    /// Where the benchmark writes its scratch files.
    #[arg(long, default_value = "infl-bench", value_name = "DIR")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct FitArgs {
    /// Hugging Face checkpoint directory: config.json, model.safetensors, tokenizer.json
    /// (the tokenizer is only needed when the corpus holds text rather than token ids).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Training corpus, JSONL: one document per line, {"text": ...} or {"ids": [...]}.
    #[arg(long, value_name = "CORPUS")]
    train: PathBuf,
    /// Output directory for the factors (factors.safetensors + meta.json).
    #[arg(long, value_name = "FACTORS")]
    out: PathBuf,
    /// Curvature approximation.
    #[arg(long, value_enum, default_value = "ekfac")]
    strategy: Strategy,
    /// Labels of the Fisher: sampled from the model (true Fisher) or the data's (empirical).
    #[arg(long, value_enum, default_value = "sampled")]
    fisher: Fisher,
    /// Which linear layers of the blocks to track (attention qkv/out, MLP in/out).
    #[arg(long, value_enum, default_value = "all")]
    modules: ModuleSelection,
    /// Documents longer than this many tokens are cut into consecutive windows
    /// [default: the model's context length].
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch_size: usize,
    /// Seed of the labels sampled for the true Fisher.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Start even if the memory estimate exceeds the memory available.
    #[arg(long = "no-memory-check", action = clap::ArgAction::SetFalse)]
    memory_check: bool,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A factors directory written by `infl fit`.
    #[arg(long, value_name = "FACTORS")]
    factors: PathBuf,
    /// Training corpus to score (JSONL, as for fit; it may differ from the fitting corpus).
    #[arg(long, value_name = "CORPUS")]
    train: PathBuf,
    /// Queries, JSONL: {"id": optional, "prompt": ..., "completion": ...} or pre-tokenised
    /// {"prompt_ids": [...], "completion_ids": [...]}.
    #[arg(long, value_name = "QUERIES")]
    queries: PathBuf,
    /// Output directory: top_k.jsonl, meta.json (and scores.safetensors with --dense).
    #[arg(long, value_name = "RESULTS")]
    out: PathBuf,
    /// Damping added to the eigenvalues: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    damping: Damping,
    /// How many of the most influential sequences to keep per query.
    #[arg(long, default_value_t = 10, value_name = "K")]
    top_k: usize,
    /// Also write the full [n_queries, n_train] matrix to scores.safetensors.
    #[arg(long)]
    dense: bool,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch_size: usize,
    /// Window length for the corpus [default: the one the factors were fitted with].
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
    /// Start even if the memory estimate exceeds the memory available.
    #[arg(long = "no-memory-check", action = clap::ArgAction::SetFalse)]
    memory_check: bool,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Where the demo writes its model copy, factors and results.
    #[arg(long, default_value = "infl-demo", value_name = "DIR")]
    out: PathBuf,
    /// Curvature approximation for the demo.
    #[arg(long, value_enum, default_value = "ekfac")]
    strategy: Strategy,
    /// How many top sequences to print per query.
    #[arg(long, default_value_t = 3, value_name = "K")]
    top_k: usize,
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let progress = Bars::new(cli.quiet);
    match cli.command {
        Command::Fit(a) => {
            let job = FitJob {
                model: a.model,
                train: a.train,
                out: a.out,
                modules: a.modules,
                memory_check: a.memory_check,
                max_len: a.max_len,
                options: FitOptions {
                    strategy: a.strategy,
                    fisher: a.fisher,
                    batch_size: a.batch_size,
                    seed: a.seed,
                },
            };
            let s = workflow::fit(&job, &progress)?;
            if !cli.quiet {
                eprintln!(
                    "fitted {:?} factors for {} layers on {} sequences ({} tokens) in {:.1}s → {}",
                    job.options.strategy,
                    s.n_layers,
                    s.n_sequences,
                    s.n_tokens,
                    s.seconds,
                    job.out.display()
                );
            }
        }
        Command::Score(a) => {
            let job = ScoreJob {
                model: a.model,
                factors: a.factors,
                train: a.train,
                queries: a.queries,
                out: a.out,
                damping: a.damping,
                top_k: a.top_k,
                dense: a.dense,
                batch_size: a.batch_size,
                max_len: a.max_len,
                memory_check: a.memory_check,
            };
            let s = workflow::score(&job, &progress)?;
            if !cli.quiet {
                eprintln!(
                    "scored {} queries × {} training sequences in {:.1}s → {}",
                    s.meta.queries.ids.len(),
                    s.meta.corpus.n_sequences,
                    s.seconds,
                    job.out.display()
                );
            }
        }
        Command::Demo(a) => demo(a, &progress, cli.quiet)?,
        Command::Bench(a) => bench(a, &progress)?,
        Command::Inspect(a) => inspect(a, cli.quiet)?,
    }
    Ok(())
}

fn inspect(a: InspectArgs, quiet: bool) -> Result<()> {
    use infl::inspect;
    let model = infl::model::load(&a.model, a.modules)?;
    let max_len = a.max_len.unwrap_or(model.max_positions().min(512));
    if max_len == 0 || max_len > model.max_positions() || a.batch_size == 0 {
        anyhow::bail!(infl::Error::input(format!(
            "--max-len must be between 1 and {} and --batch-size at least 1",
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
            a.queries,
            probe.as_ref()
        )
    );
    Ok(())
}

/// Maps the library's error kinds onto the documented exit codes.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<infl::Error>() {
            return match e {
                infl::Error::Input(_) => 3,
                infl::Error::Mismatch(_) => 4,
                infl::Error::NonFinite(_) => 5,
                _ => 1,
            };
        }
    }
    1
}

/// indicatif progress bars on stderr, in tokens, with rate and ETA.
struct Bars {
    quiet: bool,
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        Bars {
            quiet,
            bar: std::sync::Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn begin(&self, what: &str, total_tokens: u64) {
        if self.quiet {
            return;
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total_tokens),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>16} [{bar:30}] {pos}/{len} tokens  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }

    fn advance(&self, tokens: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.inc(tokens);
            }
        }
    }

    fn end(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish();
            }
        }
    }
}

/// Window length the bundled model was trained with (scripts/make_fixture.py).
const BUNDLED_WINDOW: usize = 48;

/// The bundled tiny model and corpus, embedded so that `infl demo` works from any directory.
mod bundled {
    pub const CONFIG: &[u8] = include_bytes!("../assets/tiny-gpt2/config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../assets/tiny-gpt2/model.safetensors");
    pub const TOKENIZER: &[u8] = include_bytes!("../assets/tiny-gpt2/tokenizer.json");
    pub const CORPUS: &[u8] = include_bytes!("../assets/demo/corpus.jsonl");
    pub const QUERIES: &[u8] = include_bytes!("../assets/demo/queries.jsonl");
}

/// Writes the bundled model, corpus and queries under `dir`; returns their paths.
fn unpack_bundled(dir: &std::path::Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).with_context(|| format!("creating {}", model.display()))?;
    for (name, bytes) in [
        ("config.json", bundled::CONFIG),
        ("model.safetensors", bundled::WEIGHTS),
        ("tokenizer.json", bundled::TOKENIZER),
    ] {
        infl::io::write_atomic(&model.join(name), bytes)?;
    }
    let corpus = dir.join("corpus.jsonl");
    let queries = dir.join("queries.jsonl");
    infl::io::write_atomic(&corpus, bundled::CORPUS)?;
    infl::io::write_atomic(&queries, bundled::QUERIES)?;
    Ok((model, corpus, queries))
}

fn demo(a: DemoArgs, progress: &Bars, quiet: bool) -> Result<()> {
    let (model, corpus, queries) = unpack_bundled(&a.out)?;
    if !quiet {
        eprintln!(
            "infl demo: a 2-layer GPT-2 trained on {} bundled documents; files in {}",
            bundled::CORPUS.iter().filter(|&&b| b == b'\n').count(),
            a.out.display()
        );
    }
    let factors = a.out.join("factors");
    let fit = FitJob {
        model: model.clone(),
        train: corpus.clone(),
        out: factors.clone(),
        modules: ModuleSelection::All,
        memory_check: true,
        // The bundled model was trained on 48-token windows; positions past 48 are untrained.
        max_len: Some(BUNDLED_WINDOW),
        options: FitOptions {
            strategy: a.strategy,
            fisher: Fisher::Sampled,
            batch_size: 8,
            seed: 0,
        },
    };
    workflow::fit(&fit, progress)?;
    let score = ScoreJob {
        model,
        factors,
        train: corpus,
        queries: queries.clone(),
        out: a.out.join("results"),
        damping: Damping::Heuristic,
        top_k: 10,
        dense: true,
        batch_size: 8,
        max_len: None,
        memory_check: true,
    };
    let s = workflow::score(&score, progress)?;
    let texts = query_texts(&queries)?;
    for (qi, qid) in s.meta.queries.ids.iter().enumerate() {
        let (prompt, completion) = texts.get(qi).cloned().unwrap_or_default();
        println!(
            "\nquery {qid}: {prompt:?} → {completion:?}   (−log p = {:.2})",
            s.meta.queries.losses[qi]
        );
        for e in s.top.iter().filter(|e| &e.query_id == qid).take(a.top_k) {
            let text = e.text.as_deref().unwrap_or("").replace('\n', " ");
            let short: String = text.chars().take(90).collect();
            println!(
                "  #{} {:>10.3}  [{}] {}",
                e.rank, e.score, e.sequence_id, short
            );
        }
    }
    if !quiet {
        eprintln!(
            "\nfull results: {}/results (top_k.jsonl, scores.safetensors, meta.json)",
            a.out.display()
        );
    }
    Ok(())
}

fn query_texts(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            (s("prompt"), s("completion"))
        })
        .collect())
}

/// Peak resident memory of this process (VmHWM), in MiB, where /proc tells it.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn bench(a: BenchArgs, progress: &Bars) -> Result<()> {
    use infl::curvature::{for_each_batch, Silent};
    use infl::model::Labels;
    use std::time::Instant;

    let (model_dir, corpus, queries, default_len) = match (a.model, a.train, a.queries) {
        (Some(m), Some(t), Some(q)) => (m, t, q, None),
        _ => {
            let (m, t, q) = unpack_bundled(&a.out)?;
            (m, t, q, Some(BUNDLED_WINDOW))
        }
    };
    let model = infl::model::load(&model_dir, ModuleSelection::All)?;
    let max_len = a.max_len.or(default_len).unwrap_or(model.max_positions());
    let mut tok = infl::data::LazyTokenizer::new(&model_dir);
    let data = infl::data::read_corpus(&corpus, &mut tok, max_len, model.vocab_size())?;
    let n_tokens = data.n_tokens() as f64;
    let n_queries = infl::data::read_queries(
        &queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?
    .0
    .len();

    // Baseline: one forward+backward over every training token, taps extracted and dropped.
    // Best of two runs, so that first-touch page faults do not flatter the ratios.
    let mut base = f64::INFINITY;
    for _ in 0..2 {
        let t0 = Instant::now();
        for_each_batch(
            model.as_ref(),
            &data.sequences,
            a.batch_size,
            Labels::Data,
            &Silent,
            "baseline",
            |_, _| Ok(()),
        )?;
        base = base.min(t0.elapsed().as_secs_f64());
    }

    let factors = a.out.join("factors");
    let t0 = Instant::now();
    let fit = FitJob {
        model: model_dir.clone(),
        train: corpus.clone(),
        out: factors.clone(),
        modules: ModuleSelection::All,
        memory_check: true,
        max_len: Some(max_len),
        options: FitOptions {
            strategy: Strategy::Ekfac,
            fisher: Fisher::Sampled,
            batch_size: a.batch_size,
            seed: 0,
        },
    };
    workflow::fit(&fit, progress)?;
    let fit_s = t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let score = ScoreJob {
        model: model_dir,
        factors,
        train: corpus,
        queries,
        out: a.out.join("results"),
        damping: Damping::Heuristic,
        top_k: 10,
        dense: false,
        batch_size: a.batch_size,
        max_len: Some(max_len),
        memory_check: true,
    };
    workflow::score(&score, progress)?;
    let score_s = t0.elapsed().as_secs_f64();

    println!(
        "infl bench: {} parameters, {} training tokens, {} queries, batch {}",
        model.n_parameters(),
        n_tokens,
        n_queries,
        a.batch_size
    );
    println!(
        "{:<34} {:>10} {:>14} {:>10}",
        "pass", "seconds", "tokens/s", "× fwd+bwd"
    );
    for (name, secs) in [
        ("forward+backward (baseline)", base),
        ("fit ekfac (2 passes + eigh)", fit_s),
        ("score (queries + 1 pass)", score_s),
    ] {
        println!(
            "{name:<34} {secs:>10.3} {:>14.0} {:>10.2}",
            n_tokens / secs,
            secs / base
        );
    }
    match peak_rss_mib() {
        Some(m) => println!("peak memory (VmHWM): {m:.0} MiB"),
        None => println!("peak memory: not available on this platform"),
    }
    Ok(())
}
