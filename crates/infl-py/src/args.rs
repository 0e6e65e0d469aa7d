//! The arguments of `index`, `inspect` and `report` as the Python functions take them: the
//! command line defines these in its binary (src/cli/args.rs), so they are restated here with
//! the same names, defaults and help; python/tests/test_options.py checks every default against
//! `infl CMD --help`. (fit, score and self-influence reuse the command line's own argument types.)

use infl::model::ModuleSelection;
use infl::options::Compute;
use std::path::PathBuf;

#[derive(clap::Parser)]
#[command(name = "index")]
pub struct Index {
    /// Training corpus (JSONL), as given to `infl score --train`.
    #[arg(long, value_name = "CORPUS")]
    pub corpus: PathBuf,
    /// The checkpoint whose tokenizer and vocabulary define the token ids.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Output directory for the index.
    #[arg(long, value_name = "INDEX")]
    pub out: PathBuf,
    /// Window length, as `score` will use it [default: the model's context length].
    #[arg(long, value_name = "N", value_parser = infl::options::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    /// Replace what a previous run left in --out (every file it wrote; nothing else).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(clap::Parser)]
#[command(name = "inspect")]
pub struct Inspect {
    /// Checkpoint directory (config.json + safetensors) or a llama.cpp .gguf file.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// Sequences per batch the estimate assumes.
    #[arg(long, default_value_t = infl::options::DEFAULT_BATCH_SIZE, value_name = "B", value_parser = infl::options::BATCH_SIZE.parser())]
    pub batch_size: usize,
    /// Window length the estimate assumes [default: min(model context length, 512)].
    #[arg(long, value_name = "N", value_parser = infl::options::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    /// Which linear layers to track.
    #[arg(long, value_enum, default_value_t = ModuleSelection::All)]
    pub modules: ModuleSelection,
    /// How many queries the score estimate assumes (a count: `inspect` reads no queries file).
    #[arg(long, default_value_t = 1, value_name = "Q", value_parser = infl::options::N_QUERIES.parser())]
    pub n_queries: usize,
    /// How score stores each query's preconditioned gradients: rank k, or `full`.
    #[arg(long, default_value_t = infl::options::QueryRank(Some(32)), value_name = "k|full")]
    pub query_rank: infl::options::QueryRank,
    /// Skip the one-batch timing probe (memory estimate only).
    #[arg(long)]
    pub no_probe: bool,
}

#[derive(clap::Parser)]
#[command(name = "report")]
pub struct Report {
    /// A results directory written by `infl score`.
    #[arg(long, value_name = "RESULTS")]
    pub results: PathBuf,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html", value_name = "FILE")]
    pub out: PathBuf,
    /// Bootstrap samples of the power-law goodness-of-fit p-value (0: none).
    #[arg(long, default_value_t = infl::powerlaw::FitOptions::default().bootstrap, value_name = "N")]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Longer sequences show this many tokens around their largest part.
    #[arg(long, default_value_t = 400, value_name = "N")]
    pub max_tokens: usize,
}
