//! Argument parsing, progress bars and printing. Every option is documented here once.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use infl::curvature::{Fisher, FitOptions, Strategy};
use infl::influence::Damping;
use infl::model::ModuleSelection;
use infl::options::Normalize;
use infl::pass::clock::{Elapsed, PhaseClock, Stopwatch};
use infl::pass::Progress;
use infl::workflow::{self, FitJob, ScoreJob, SelfInfluenceJob};
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
Try `infl demo` first: it trains a tiny GPT-2 on a corpus bundled in the binary (Shakespeare\n\
and 40 invented facts), runs both stages and measures how often each fact's sentence is found.\n\
`infl validate exact` measures each strategy against the exact damped per-layer Fisher, and\n\
`infl validate lds` against retraining (the linear datamodeling score)."
)]
struct Cli {
    /// No progress bars or summaries on stderr (results still go to files / stdout).
    #[arg(long, short, global = true)]
    quiet: bool,

    /// Cores to use [default: every core]: the engine's threads, or as many batches at once
    /// (data-parallel over sequences) where the engine is not threaded inside. Results do not
    /// depend on it.
    #[arg(long, global = true, value_name = "N")]
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
    /// Measure how well each curvature strategy reproduces a more exact reference.
    #[command(
        long_about = "Measure how well each curvature strategy (ekfac, kfac, diagonal, identity) reproduces a\n\
    more exact reference, query by query, on a model small enough to compute the reference.\n\n\
    Subcommands:\n  \
    exact   against influence under the exact damped per-layer (block-diagonal) Fisher\n  \
    lds     against retraining: the linear datamodeling score over M models trained on subsets"
    )]
    Validate(ValidateArgs),
}

#[derive(clap::Args)]
struct ValidateArgs {
    #[command(subcommand)]
    command: ValidateCommand,
}

/// The references `infl validate` measures the strategies against.
#[derive(Subcommand)]
enum ValidateCommand {
    /// Against influence under the exact damped per-layer (block-diagonal) Fisher.
    #[command(
        long_about = "Compare every strategy with influence under the exact damped per-layer Fisher.\n\n\
    For each tracked layer l, with vec(G_z) the flattened per-sequence gradient (D_l parameters):\n  \
    F_l = (1/N) Σ_z vec(G_z) vec(G_z)ᵀ   over the N training sequences, under the Fisher's labels\n                                     \
    (those `fit` uses for Λ: sampled with --seed, or the data's)\n  \
    λ_l = 0.1 · trace(F_l) / D_l          (the same number as EK-FAC's 0.1 · mean(Λ)), or --damping\n  \
    I(q, z) = Σ_l vec(G_q)ᵀ (F_l + λ_l I)⁻¹ vec(G_z)   with `infl score`'s sign and scale\n\
    (F + λI)⁻¹ is applied in f64 through the Woodbury identity on the N gradients (a dense D × D\n\
    solve where D ≤ N). EK-FAC, KFAC and diagonal approximate exactly this F; identity drops it.\n\n\
    Each strategy is then fitted and scored with the same labels and damping (full-rank queries,\n\
    dense scores; OUT/runs/STRATEGY/{factors,results}), and compared per query with the exact\n\
    scores over all training sequences:\n  \
    Spearman   rank correlation (ties share their average rank): does it order the corpus alike?\n  \
    Pearson    linear correlation of the raw scores (scale-free: KFAC's larger scale does not matter)\n  \
    top-k      |top-k exact ∩ top-k strategy| / k over the most positive scores: does it find the\n             \
    same most supportive sequences?\n\
    The table shows the mean over queries and, in parentheses, the worst query. 1 is perfect\n\
    agreement; identity's row is the baseline of no curvature at all. OUT/exact.json holds every\n\
    number per query, the λ of each layer, and the model, corpus and query hashes.\n\n\
    The exact Fisher holds N · ΣD f64 numbers (plus an N × N matrix per layer): it is for small\n\
    models and corpora; the command refuses, with the numbers, when it would not fit in memory."
    )]
    Exact(ValidateExactArgs),
    /// The linear datamodeling score: retrain on random subsets, correlate with the prediction.
    #[command(
        long_about = "The linear datamodeling score (LDS, Park et al. 2023), the field's standard accuracy test.\n\n\
    M random subsets S_m of the training sequences are drawn (--fraction of them each, from\n\
    --seed), and the model is retrained from scratch on each with exactly the recipe recorded in\n\
    MODEL/training.json (same initialisation seed, optimiser, schedule and epochs; so MODEL must\n\
    come from `infl train` or `infl demo`). Each query's f_q = −log p(completion | prompt) is\n\
    measured under every retrained model. Influence from the full model predicts it: positive\n\
    I(q, z) means up-weighting z lowers f_q, so the prediction for S_m is −Σ_{z∈S_m} I(q, z).\n\
    LDS(q) is the Spearman correlation over the M subsets of prediction and measurement; the\n\
    table shows its mean over queries (± standard error, min, max) for each strategy.\n\
    1 would mean influence orders the retrained models' losses perfectly; 0, not at all.\n\
    For reference, kronfluence reports 0.44 for EK-FAC and 0.12 for identity on GPT-2/WikiText.\n\n\
    Retraining costs M trainings on --fraction of the data; they run --threads at a time, and each\n\
    finished one is saved in OUT/work/, so rerunning an interrupted command resumes it. OUT/lds.json\n\
    holds every measurement, every query's LDS and the provenance."
    )]
    Lds(ValidateLdsArgs),
}

#[derive(clap::Args)]
struct ValidateLdsArgs {
    /// A checkpoint made by `infl train` or `infl demo` (its training.json is retrained).
    #[arg(long, default_value = "infl-demo/model", value_name = "DIR")]
    model: PathBuf,
    /// The corpus it was trained on (checked against training.json's hash).
    #[arg(long, default_value = "infl-demo/corpus.jsonl", value_name = "CORPUS")]
    train: PathBuf,
    /// Queries (JSONL).
    #[arg(
        long,
        default_value = "infl-demo/queries.jsonl",
        value_name = "QUERIES"
    )]
    queries: PathBuf,
    /// Output directory: lds.json, the strategies' runs, saved retraining results (work/).
    #[arg(long, default_value = "infl-validate-lds", value_name = "DIR")]
    out: PathBuf,
    /// M: how many subsets to retrain on.
    #[arg(long, default_value_t = 50, value_name = "M")]
    subsets: usize,
    /// Fraction of the training sequences in each subset.
    #[arg(long, default_value_t = 0.5, value_name = "F")]
    fraction: f64,
    /// Seed of the subsets.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Strategies to score.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ekfac,kfac,diagonal,identity"
    )]
    strategies: Vec<Strategy>,
    /// Labels of the Fisher.
    #[arg(long, value_enum, default_value = "sampled")]
    fisher: Fisher,
    /// Damping: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    damping: Damping,
    /// Discard the retraining results saved in OUT/work/ instead of resuming from them.
    #[arg(long)]
    fresh: bool,
}

#[derive(clap::Args)]
struct ValidateExactArgs {
    /// Checkpoint directory [default: the bundled tiny model, with its 48-token windows].
    #[arg(long, value_name = "DIR", requires = "train", requires = "queries")]
    model: Option<PathBuf>,
    /// Training corpus (JSONL) [default: the bundled demo corpus].
    #[arg(long, value_name = "CORPUS")]
    train: Option<PathBuf>,
    /// Queries (JSONL) [default: the bundled demo queries].
    #[arg(long, value_name = "QUERIES")]
    queries: Option<PathBuf>,
    /// Output directory: exact.json, and each strategy's factors and results under runs/.
    #[arg(long, default_value = "infl-validate-exact", value_name = "DIR")]
    out: PathBuf,
    /// Labels of the Fisher (exact and fitted alike): sampled from the model, or the data's.
    #[arg(long, value_enum, default_value = "sampled")]
    fisher: Fisher,
    /// Seed of the sampled labels.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Which linear layers of the blocks to track.
    #[arg(long, value_enum, default_value = "all")]
    modules: ModuleSelection,
    /// Window length [default: the model's context length; 48 for the bundled model].
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch_size: usize,
    /// Damping: `heuristic` (0.1 × trace(F)/D per layer, = 0.1 × mean(Λ)) or a number (> 0),
    /// used by the exact Fisher and every strategy alike.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    damping: Damping,
    /// k of the top-k overlap.
    #[arg(long, default_value_t = 10, value_name = "K")]
    top_k: usize,
    /// Refuse when the exact Fisher would need more than this many MiB [default: MemAvailable].
    #[arg(long, value_name = "MIB")]
    memory_limit: Option<u64>,
}

#[derive(clap::Args)]
#[command(
    long_about = "Merge the shards of a sharded `fit` or `score` exactly.\n\n\
A sharded fit runs in two rounds when the strategy is ekfac:\n  \
1. `infl fit --shard i/N --out F` on every shard (covariance pass), then `infl merge F`\n     \
(adds the shards' sums, computes the eigenbases once);\n  \
2. the same `infl fit --shard i/N --out F` on every shard again (eigenvalue pass), then\n     \
`infl merge F` (adds Λ's sums, writes factors.safetensors and meta.json).\n\
kfac and diagonal need one round, identity none. A sharded score needs one: every shard\n\
`infl score --shard i/N --out R`, then `infl merge R` (top-k and summaries merged, the dense\n\
matrix reassembled in corpus order)."
)]
struct MergeArgs {
    /// The --out directory the shards wrote to (a factors or a results directory).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// `--shard`, shared by fit and score.
#[derive(clap::Args)]
struct ShardArgs {
    /// Run only shard i of N of the corpus: sequence k (0-based, corpus order) belongs to shard
    /// k mod N. `auto` takes index and count from a Slurm array task
    /// (SLURM_ARRAY_TASK_ID/MIN/STEP/COUNT); `auto/N` takes the index from JOB_COMPLETION_INDEX
    /// (Kubernetes Indexed Job) or Slurm. Combine the shards with `infl merge`.
    #[arg(long, value_name = "i/N|auto|auto/N")]
    shard: Option<String>,
    /// Save the pass's state every M sequences [default: every 15 minutes]; rerunning the same
    /// command after a crash or kill resumes from it, with identical results.
    #[arg(long, value_name = "M")]
    checkpoint_every: Option<usize>,
    /// Discard saved state in --out instead of resuming from it.
    #[arg(long)]
    fresh: bool,
}

impl ShardArgs {
    fn shard(&self) -> Result<infl::shard::Shard> {
        Ok(match &self.shard {
            None => infl::shard::Shard::WHOLE,
            Some(s) => infl::shard::Shard::parse(s)?,
        })
    }

    fn policy(&self) -> infl::checkpoint::CheckpointPolicy {
        infl::checkpoint::CheckpointPolicy {
            every_sequences: self.checkpoint_every,
            every_seconds: if self.checkpoint_every.is_some() {
                f64::INFINITY
            } else {
                900.0
            },
        }
    }
}

#[derive(clap::Args)]
struct ReportArgs {
    /// A results directory written by `infl score`.
    #[arg(value_name = "RESULTS")]
    results: PathBuf,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html", value_name = "FILE")]
    out: PathBuf,
    /// Bootstrap samples of the power-law goodness-of-fit p-value (0: none).
    #[arg(long, default_value_t = 200, value_name = "N")]
    bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Longer sequences show this many tokens around their largest part.
    #[arg(long, default_value_t = 400, value_name = "N")]
    max_tokens: usize,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// Two or more results directories scored on the same queries.
    #[arg(value_name = "RESULTS", num_args = 2.., required = true)]
    results: Vec<PathBuf>,
    /// Also write a side-by-side HTML view.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Also write the numbers as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Checkpoint directory (config.json + safetensors) or a llama.cpp .gguf file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
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

/// Where and how the forward and backward passes run (fit, score, self-influence, inspect).
#[derive(clap::Args, Clone, Copy)]
struct ComputeArgs {
    /// Engine of the forward/backward passes: fast (explicit forward, activation-only
    /// backward, fused threaded kernels; CPU only) or autograd (candle autograd, the reference:
    /// slower on the CPU, and the engine that runs on a GPU) [default: fast on the CPU,
    /// autograd on a GPU].
    #[arg(long, value_enum)]
    engine: Option<infl::model::Engine>,
    /// Device of the forward/backward passes: cpu, cuda (GPU 0) or cuda:N. A GPU needs a build
    /// with `--features cuda`; there the fit's statistics (covariances, Λ), the training
    /// sequences' scores and their self-influence are formed on the GPU too;
    /// eigendecompositions, query preconditioning, `--normalize cosine` and a gradient store
    /// run on the CPU.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: infl::model::ComputeDevice,
}

impl ComputeArgs {
    fn engine(&self) -> infl::model::Engine {
        self.engine.unwrap_or(self.device.default_engine())
    }

    /// Makes these the engine and device of every model the command loads.
    fn apply(&self) {
        infl::model::set_default_engine(self.engine());
        infl::model::set_default_device(self.device);
    }
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
    /// Query counts of the query-batching measurement: each count shares one scoring pass
    /// (the queries repeated under new ids), at rank 32 and at full rank.
    #[arg(
        long,
        default_value = "1,10,50",
        value_delimiter = ',',
        value_name = "N,M,.."
    )]
    query_counts: Vec<usize>,
    /// Corpus sizes (multiples of the base corpus) at which peak memory of a streamed scoring
    /// run is measured, each in its own process.
    #[arg(
        long,
        default_value = "1,10,100",
        value_delimiter = ',',
        value_name = "X,Y,.."
    )]
    rss_scales: Vec<usize>,
    /// Internal: run one scoring job on the corpus repeated this many times and print its
    /// peak memory (used by the parent bench to measure each size in a fresh process).
    #[arg(long, hide = true)]
    rss_child: Option<usize>,
    /// Only compare the engines (fast vs autograd per family, and vs the GEMM-bound floor).
    #[arg(long)]
    engines_only: bool,
    /// Only time a full fit (EK-FAC) and a full-rank scoring run on the model, corpus and
    /// queries, and print each pass against its GEMM-bound floor: the FLOPs of its products,
    /// counted from the shapes, at the GEMM rate read every 2 s while the pass ran (between
    /// its steps, the readings' time left out), and at the best rate read in the whole run.
    #[arg(long, conflicts_with = "engines_only")]
    passes_only: bool,
    /// Runs of `--passes-only`'s fit and score, each with its own readings of the rate; the
    /// strict ratios are at the best rate of all of them. Ends with the whole job's ratios
    /// over the runs: on a shared machine one run says little.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Labels of the Fisher in `--passes-only`'s fit.
    #[arg(long, value_enum, default_value = "sampled")]
    fisher: Fisher,
}

#[derive(clap::Args)]
struct FitArgs {
    /// Hugging Face checkpoint directory: config.json, model.safetensors, tokenizer.json
    /// (the tokenizer is only needed when the corpus holds text rather than token ids).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
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
    /// Track only these layers, by checkpoint name (comma-separated, within --modules; see
    /// `infl inspect` for the names), e.g. `transformer.h.0.mlp.c_fc,transformer.h.1.mlp.c_fc`.
    #[arg(long, value_delimiter = ',', value_name = "NAME,..")]
    layers: Option<Vec<String>>,
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
    #[command(flatten)]
    sharding: ShardArgs,
    /// Also keep every training sequence's gradient, in the factors' eigenbasis, in
    /// FACTORS/store/: `score --store` then scores new queries with no pass over the training
    /// data. With `--fisher empirical` it is written from the eigenvalue pass's own gradients;
    /// otherwise (sampled labels, or a resumed pass) one more pass under the data's labels
    /// writes it. The size is checked against free disk before writing.
    #[arg(long)]
    store: bool,
    /// Precision of the gradient store.
    #[arg(long, value_enum, default_value = "f32", requires = "store")]
    store_dtype: infl::store::StoreDtype,
    /// Form of each stored gradient: `smallest` on disk (the rotated gradient or its per-token
    /// factors), or always `rotated` (more disk for sequences shorter than the layers are
    /// wide; `score --store` reads it with no reconstruction).
    #[arg(long, value_enum, default_value = "smallest", requires = "store")]
    store_form: infl::store::StoreForm,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
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
    /// Compress each query's preconditioned gradient to rank k per layer (truncated SVD), so
    /// scoring costs O(k (d_in + d_out)) per token and layer; `full` is exact. Exact anyway
    /// where k reaches a layer's rank.
    #[arg(long, default_value = "32", value_name = "k|full", value_parser = parse_rank)]
    query_rank: QueryRank,
    /// Also write each top/bottom score's parts per tracked layer, and per-layer totals over
    /// the whole corpus (layers.json).
    #[arg(long)]
    per_layer: bool,
    /// Also split each top/bottom score over the training sequence's tokens (one more small
    /// pass over those sequences).
    #[arg(long)]
    per_token: bool,
    /// `none`: raw influence. `cosine`: I(q,z)/sqrt(I(q,q)·I(z,z)), unit-normalised gradients
    /// in the damped inverse-Fisher metric (RelatIF-style).
    #[arg(long, value_enum, default_value = "none")]
    normalize: Normalize,
    /// Score only each query's N best BM25 matches (over token ids) from --index: the paper's
    /// TF-IDF pre-filter for corpora too large to score whole.
    #[arg(long, value_name = "N", requires = "index")]
    prefilter: Option<usize>,
    /// An index built by `infl index` from the same corpus and --max-len.
    #[arg(long, value_name = "INDEX", requires = "prefilter")]
    index: Option<PathBuf>,
    #[command(flatten)]
    sharding: ShardArgs,
    /// Read the training gradients from FACTORS/store/ (written by `fit --store` on the same
    /// corpus) instead of running the model over --train; queries are then exact (full rank).
    #[arg(long, conflicts_with_all = ["per_token", "shard"])]
    store: bool,
}

#[derive(clap::Args)]
struct IndexArgs {
    /// Training corpus (JSONL), as given to `infl score --train`.
    corpus: PathBuf,
    /// The checkpoint whose tokenizer and vocabulary define the token ids.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Output directory for the index.
    #[arg(long, value_name = "INDEX")]
    out: PathBuf,
    /// Window length, as `score` will use it [default: the model's context length].
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
}

#[derive(Clone, Copy)]
struct QueryRank(Option<usize>);

fn parse_rank(s: &str) -> std::result::Result<QueryRank, String> {
    if s == "full" {
        return Ok(QueryRank(None));
    }
    match s.parse::<usize>() {
        Ok(k) if k > 0 => Ok(QueryRank(Some(k))),
        _ => Err(format!("`{s}` is neither `full` nor a positive rank")),
    }
}

#[derive(clap::Args)]
struct SelfInfluenceArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
    /// A factors directory written by `infl fit`.
    #[arg(long, value_name = "FACTORS")]
    factors: PathBuf,
    /// Training corpus (JSONL).
    #[arg(long, value_name = "CORPUS")]
    train: PathBuf,
    /// Output directory: self_influence.jsonl (every sequence), top_k.jsonl, distribution.json,
    /// meta.json.
    #[arg(long, value_name = "RESULTS")]
    out: PathBuf,
    /// Damping: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    damping: Damping,
    /// How many of the highest and lowest sequences to list.
    #[arg(long, default_value_t = 20, value_name = "K")]
    top_k: usize,
    /// Sequences per forward/backward batch.
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch_size: usize,
    /// Window length [default: the one the factors were fitted with].
    #[arg(long, value_name = "N")]
    max_len: Option<usize>,
}

#[derive(clap::Args)]
#[command(
    long_about = "Train a small GPT-2-style causal language model from scratch.\n\n\
First a byte-level BPE tokenizer is trained on the corpus's text (GPT-2's pre-tokenisation,\n\
<|endoftext|> as id 0; or --tokenizer reuses one). Each document is then cut into windows of\n\
--n-positions tokens, exactly the training sequences `infl fit` and `infl score` stream, and the\n\
model trains on them: AdamW, linear warm-up then cosine decay to a tenth of --lr, gradient norm\n\
clipped at 1, the mean next-token cross-entropy of each batch as the loss. The same --seed gives\n\
the same weights, bit for bit.\n\n\
OUT becomes a Hugging Face checkpoint directory (config.json, model.safetensors with a tied LM\n\
head, tokenizer.json) that `infl fit --model OUT` and transformers' GPT2LMHeadModel load, plus\n\
training.json: the corpus hash, every setting and the loss of every epoch."
)]
struct TrainArgs {
    /// Training corpus: JSONL, one `{"text": ...}` document per line.
    #[arg(long, value_name = "CORPUS")]
    train: PathBuf,
    /// Output checkpoint directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Reuse this tokenizer.json instead of training one (--vocab-size is then ignored).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Entries of the BPE tokenizer to train (≥ 257: the 256 bytes and <|endoftext|>).
    #[arg(long, default_value_t = 2048, value_name = "N")]
    vocab_size: usize,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 64, value_name = "D")]
    n_embd: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2, value_name = "L")]
    n_layer: usize,
    /// Attention heads (must divide --n-embd).
    #[arg(long, default_value_t = 4, value_name = "H")]
    n_head: usize,
    /// Context length; documents are cut into windows of this many tokens.
    #[arg(long, default_value_t = 64, value_name = "T")]
    n_positions: usize,
    /// Passes over the training sequences.
    #[arg(long, default_value_t = 10, value_name = "E")]
    epochs: usize,
    /// Sequences per optimiser step.
    #[arg(long, default_value_t = 16, value_name = "B")]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3, value_name = "LR")]
    lr: f64,
    /// Linear warm-up steps (at most a tenth of the run).
    #[arg(long, default_value_t = 50, value_name = "N")]
    warmup: usize,
    /// AdamW weight decay (matrices and embeddings only).
    #[arg(long, default_value_t = 0.01, value_name = "W")]
    weight_decay: f64,
    /// Seed of the initialisation and of the order of the sequences.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl TrainArgs {
    fn job(&self) -> infl::train::TrainJob {
        infl::train::TrainJob {
            train: self.train.clone(),
            out: self.out.clone(),
            tokenizer: self.tokenizer.clone(),
            vocab_size: self.vocab_size,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_positions: self.n_positions,
            options: infl::train::TrainOptions {
                epochs: self.epochs,
                batch_size: self.batch_size,
                lr: self.lr,
                warmup_steps: self.warmup,
                weight_decay: self.weight_decay,
                seed: self.seed,
                ..Default::default()
            },
        }
    }
}

#[derive(clap::Args)]
#[command(
    long_about = "Run the whole workflow on data whose answers are known, with no download.\n\n\
The bundled corpus is real public-domain English (Macbeth, A Midsummer Night's Dream and the\n\
Sonnets, Project Gutenberg's etexts as packaged by the Open Knowledge Foundation's Open\n\
Shakespeare) plus 40 synthetic facts about invented places, people and things, each stated\n\
exactly once (\"The capital of Veloria is Tarn.\"). The demo trains a tiny GPT-2 on it from\n\
scratch (`infl train`), fits and scores each --strategies entry, prints the top sources of every\n\
query, and measures how often each fact's own sentence is the top source (recall@1) or among\n\
the top 10 (recall@10), against a lexical TF-IDF baseline (BM25 over the same token ids).\n\
A second run reuses the trained model (same corpus and settings) unless --retrain is given."
)]
struct DemoArgs {
    /// Where the demo writes its model, factors, results and report.
    #[arg(long, default_value = "infl-demo", value_name = "DIR")]
    out: PathBuf,
    /// Strategies to score and compare (the first one gets the report and the printed lists).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ekfac,kfac,identity"
    )]
    strategies: Vec<Strategy>,
    /// How many top sequences to print per query.
    #[arg(long, default_value_t = 3, value_name = "K")]
    top_k: usize,
    /// Train the model again even when DIR/model matches the corpus and settings.
    #[arg(long)]
    retrain: bool,
    #[command(flatten)]
    train: DemoTrainArgs,
}

/// The demo model's training settings (`infl train --help` explains each).
#[derive(clap::Args)]
struct DemoTrainArgs {
    /// Passes over the corpus.
    #[arg(long, default_value_t = infl::demo::EPOCHS, value_name = "E")]
    epochs: usize,
    /// Seed of the initialisation and of the order of the sequences.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl DemoTrainArgs {
    fn job_for(&self, out: &std::path::Path) -> infl::train::TrainJob {
        infl::demo::training(out, self.epochs, self.seed)
    }
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let compute = match &cli.command {
        Command::Fit(a) => Some(a.compute),
        Command::Score(a) => Some(a.compute),
        Command::SelfInfluence(a) => Some(a.compute),
        Command::Inspect(a) => Some(a.compute),
        _ => None,
    };
    if cli.threads == Some(0) {
        anyhow::bail!(infl::Error::input("--threads must be at least 1"));
    }
    // Before any thread pool starts (they read the count once).
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
        Command::Validate(v) => matches!(v.command, ValidateCommand::Lds(_)),
        _ => false,
    };
    if trains && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let progress = Bars::new(cli.quiet);
    match cli.command {
        Command::Fit(a) => {
            a.compute.apply();
            let job = FitJob {
                model: a.model,
                train: a.train,
                out: a.out,
                modules: a.modules,
                layers: a.layers,
                memory_check: a.memory_check,
                max_len: a.max_len,
                shard: a.sharding.shard()?,
                checkpoint: a.sharding.policy(),
                fresh: a.sharding.fresh,
                store: a.store.then_some(infl::store::StoreOptions {
                    dtype: a.store_dtype,
                    form: a.store_form,
                }),
                options: FitOptions {
                    strategy: a.strategy,
                    fisher: a.fisher,
                    batch_size: a.batch_size,
                    seed: a.seed,
                },
            };
            let s = workflow::fit(&job, &progress)?;
            if !cli.quiet {
                eprintln!("{} ({:.1}s)", s.message, s.seconds);
            }
        }
        Command::Score(a) => {
            a.compute.apply();
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
                query_rank: a.query_rank.0,
                per_layer: a.per_layer,
                per_token: a.per_token,
                normalize: a.normalize,
                prefilter: a
                    .prefilter
                    .map(|n| (n, a.index.clone().unwrap_or_default())),
                shard: a.sharding.shard()?,
                checkpoint: a.sharding.policy(),
                fresh: a.sharding.fresh,
                store: a.store,
                memory_check: a.memory_check,
            };
            let s = workflow::score(&job, &progress)?;
            if !cli.quiet {
                eprintln!("{} ({:.1}s)", s.message, s.seconds);
            }
        }
        Command::Index(a) => {
            let started = std::time::Instant::now();
            let model = infl::model::load(&a.model, ModuleSelection::All)?;
            let max_len = a.max_len.unwrap_or(model.max_positions());
            let mut tok = infl::data::LazyTokenizer::new(&a.model);
            let index =
                infl::index::Bm25Index::build(&a.corpus, &mut tok, max_len, model.vocab_size())?;
            index.save(&a.out)?;
            if !cli.quiet {
                eprintln!(
                    "indexed {} sequences in {:.1}s → {}",
                    index.n_sequences(),
                    started.elapsed().as_secs_f64(),
                    a.out.display()
                );
            }
        }
        Command::SelfInfluence(a) => {
            a.compute.apply();
            let job = SelfInfluenceJob {
                model: a.model,
                factors: a.factors,
                train: a.train,
                out: a.out,
                damping: a.damping,
                top_k: a.top_k,
                batch_size: a.batch_size,
                max_len: a.max_len,
            };
            let s = workflow::self_influence(&job, &progress)?;
            if !cli.quiet {
                eprintln!(
                    "self-influence of {} training sequences in {:.1}s → {}",
                    s.meta.corpus.n_sequences,
                    s.seconds,
                    job.out.display()
                );
            }
        }
        Command::Train(a) => {
            let job = a.job();
            let t = infl::train::train(&job, &progress)?;
            if !cli.quiet {
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
        }
        Command::Demo(a) => demo(a, &progress, cli.quiet)?,
        Command::Bench(a) => bench(a, &progress)?,
        Command::Report(a) => report(a, cli.quiet)?,
        Command::Compare(a) => {
            let cmp = infl::compare::run(&a.results, a.out.as_deref(), a.json.as_deref())?;
            print!("{}", cmp.table());
        }
        Command::Inspect(a) => inspect(a, cli.quiet)?,
        Command::Merge(a) => {
            let out = workflow::merge(&a.dir)?;
            if !cli.quiet {
                eprintln!("{}", out.message);
            }
        }
        Command::Validate(a) => match a.command {
            ValidateCommand::Exact(a) => validate_exact(a, &progress, cli.quiet)?,
            ValidateCommand::Lds(a) => {
                let job = infl::validate::lds::LdsJob {
                    model: a.model,
                    train: a.train,
                    queries: a.queries,
                    out: a.out,
                    subsets: a.subsets,
                    fraction: a.fraction,
                    seed: a.seed,
                    strategies: a.strategies,
                    fisher: a.fisher,
                    damping: a.damping,
                    threads: infl::shard::threads(),
                    fresh: a.fresh,
                };
                let r = infl::validate::lds::run(&job, &progress)?;
                print!("{}", r.table());
                if !cli.quiet {
                    eprintln!(
                        "retraining took {:.0}s of {:.0}s; measurements vary by {:.3} nats (mean s.d. over subsets); wrote {}",
                        r.retrain_seconds,
                        r.seconds,
                        r.mean_loss_spread,
                        job.out.join(infl::validate::lds::LDS_FILE).display()
                    );
                }
            }
        },
    }
    Ok(())
}

fn validate_exact(a: ValidateExactArgs, progress: &Bars, quiet: bool) -> Result<()> {
    let bundled = a.model.is_none();
    let (model, train, queries) = if bundled {
        let (m, t, q) = unpack_bundled(&a.out.join("bundled"))?;
        (m, a.train.unwrap_or(t), a.queries.unwrap_or(q))
    } else {
        (
            a.model.unwrap_or_default(),
            a.train.unwrap_or_default(),
            a.queries.unwrap_or_default(),
        )
    };
    let job = infl::validate::exact::ExactJob {
        model,
        train,
        queries,
        out: a.out,
        fisher: a.fisher,
        seed: a.seed,
        modules: a.modules,
        max_len: a.max_len.or(bundled.then_some(BUNDLED_WINDOW)),
        batch_size: a.batch_size,
        damping: a.damping,
        top_k: a.top_k,
        memory_limit: a.memory_limit.map(|m| m.saturating_mul(1 << 20)),
    };
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

fn inspect(a: InspectArgs, quiet: bool) -> Result<()> {
    use infl::inspect;
    a.compute.apply();
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
        // A streamed pass does not know its length up front (total 0): count without a bar.
        let (len, template) = if total_tokens == 0 {
            (None, "{msg:>16} {pos} tokens  {per_sec}  {elapsed}")
        } else {
            (
                Some(total_tokens),
                "{msg:>16} [{bar:30}] {pos}/{len} tokens  {per_sec}  ETA {eta}",
            )
        };
        let bar =
            indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
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
                    "{}: tail α = {:.3} ± {:.3} above x_min = {} ({} values), p = {}; {}",
                    t.query_id,
                    f.alpha,
                    f.alpha_se,
                    infl::report::fmt_score(f.x_min),
                    f.n_tail,
                    f.p_value
                        .map(|p| format!("{p:.3}"))
                        .unwrap_or_else(|| "–".into()),
                    t.half
                ),
                Err(e) => eprintln!("{}: no tail fit ({e}); {}", t.query_id, t.half),
            }
        }
        eprintln!("wrote {} ({} KiB)", a.out.display(), s.bytes / 1024);
    }
    Ok(())
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
    let (corpus, queries) = infl::demo::unpack(&a.out)?;
    let job = infl::demo::DemoJob {
        out: a.out.clone(),
        corpus,
        queries: queries.clone(),
        train: a.train.job_for(&a.out),
        retrain: a.retrain,
        strategies: a.strategies.clone(),
        top_k: 10,
    };
    if !quiet {
        eprintln!(
            "infl demo: train a {}-layer GPT-2 on {} documents (Shakespeare + {} synthetic facts, each stated once), fit and score; files in {}",
            job.train.n_layer,
            infl::demo::CORPUS.iter().filter(|&&b| b == b'\n').count(),
            infl::demo::fact_queries(&queries)?.len(),
            a.out.display()
        );
    }
    let outcome = infl::demo::run(&job, progress)?;
    let t = &outcome.training;
    if !quiet {
        eprintln!(
            "model: {} parameters, {} sequences × ≤{} tokens, final training loss {:.3} ({}{:.0}s)",
            t.parameters,
            t.n_sequences,
            t.config.n_positions,
            t.epoch_losses.last().copied().unwrap_or(f64::NAN),
            if outcome.trained_now {
                "trained in "
            } else {
                "reused, trained earlier in "
            },
            t.seconds
        );
    }
    let (first, summary) = &outcome.scores[0];
    let texts = query_texts(&queries)?;
    println!(
        "\ntop sources by {} (score > 0: the sequence supports the completion)",
        first.name()
    );
    for (qi, qid) in summary.meta.queries.ids.iter().enumerate() {
        let (prompt, completion) = texts.get(qi).cloned().unwrap_or_default();
        let own = outcome
            .facts
            .iter()
            .find(|f| &f.id == qid)
            .map(|f| f.source_line);
        println!(
            "\nquery {qid}: {prompt:?} → {completion:?}   (−log p = {:.2})",
            summary.meta.queries.losses[qi]
        );
        for e in summary
            .top
            .iter()
            .filter(|e| &e.query_id == qid && e.direction == "top")
            .take(a.top_k)
        {
            let text = e.text.as_deref().unwrap_or("").replace('\n', " / ");
            let short: String = text.chars().take(80).collect();
            let mark = if own.is_some_and(|l| e.sequence_id.starts_with(&format!("{l}:"))) {
                "★"
            } else {
                " "
            };
            println!(
                "  {mark}#{} {:>10.3}  [{}] {}",
                e.rank, e.score, e.sequence_id, short
            );
        }
    }
    println!(
        "\nrecall of each fact's own sentence ({} fact queries; ★ above):",
        outcome.facts.len()
    );
    println!("{:<16} {:>9} {:>10}", "method", "recall@1", "recall@10");
    for r in &outcome.recall {
        println!(
            "{:<16} {:>9.3} {:>10.3}",
            r.method, r.recall_at_1, r.recall_at_10
        );
    }
    let json = a.out.join("recall.json");
    infl::io::write_atomic(
        &json,
        serde_json::to_string_pretty(&serde_json::json!({
            "corpus_sha256": t.corpus_sha256,
            "model": outcome.model,
            "training": t,
            "facts": outcome.facts,
            "recall": outcome.recall,
            "tool": format!("infl {}", env!("CARGO_PKG_VERSION")),
        }))?
        .as_bytes(),
    )?;
    if !quiet {
        eprintln!(
            "\nwrote {} (the table above, per fact), results-*/ (top_k.jsonl, meta.json){}",
            json.display(),
            outcome
                .report
                .as_ref()
                .map(|r| format!("; open {} in a browser", r.display()))
                .unwrap_or_default()
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

/// Covariance updates: the symmetric rank-k update against a general `xᵀ x`, same run.
/// The scoring product (queries against training columns): general GEMM against the dot-block
/// kernel, same run.
fn print_dots_bench() {
    println!("\nscoring product Aᵀ B (16 queries, 32 training columns), best of 3:");
    println!(
        "{:>8} {:>10} {:>10} {:>8}",
        "d", "GEMM ms", "dots ms", "ratio"
    );
    for (_, _, d, g, f) in infl::linalg::dots_benchmark(&[
        (16, 32, 48 * 49),
        (16, 32, 257 * 1024),
        (16, 32, 769 * 3072),
    ]) {
        println!("{d:>8} {:>10.2} {:>10.2} {:>7.2}×", g * 1e3, f * 1e3, g / f);
    }
}

/// The scoring job `infl bench` times: top 10, no dense output, heuristic damping, resumable
/// (not `--fresh`).
fn bench_score_job(
    (model, factors, train, queries): (
        &std::path::Path,
        &std::path::Path,
        &std::path::Path,
        &std::path::Path,
    ),
    out: PathBuf,
    (batch_size, max_len): (usize, usize),
    query_rank: Option<usize>,
) -> ScoreJob {
    ScoreJob {
        model: model.to_path_buf(),
        factors: factors.to_path_buf(),
        train: train.to_path_buf(),
        queries: queries.to_path_buf(),
        out,
        damping: Damping::Heuristic,
        top_k: 10,
        dense: false,
        batch_size,
        max_len: Some(max_len),
        query_rank,
        per_layer: false,
        per_token: false,
        normalize: Normalize::None,
        prefilter: None,
        shard: infl::shard::Shard::WHOLE,
        checkpoint: infl::checkpoint::CheckpointPolicy::NEVER,
        fresh: false,
        store: false,
        memory_check: true,
    }
}

/// What `bench --passes-only` runs on.
struct PassInputs<'a> {
    model: &'a std::path::Path,
    train: &'a std::path::Path,
    queries: &'a std::path::Path,
    max_len: usize,
    batch_size: usize,
    fisher: Fisher,
    out: &'a std::path::Path,
    /// Runs of the fit and score (at least 1).
    repeat: usize,
}

/// A phase of `bench --passes-only`'s run: its time (the rate readings' own left out) and the
/// GEMM rates read while it ran.
struct Timed {
    time: Elapsed,
    rates: Vec<f64>,
}

/// One run of `bench --passes-only`'s fit and score: each phase's time and rates, and the
/// fastest GEMM rate measured before, between, after and during them.
struct PassRun {
    best: f64,
    fit: Elapsed,
    score: Elapsed,
    covariance: Timed,
    eigenvalue: Timed,
    queries: Timed,
    scoring: Timed,
}

impl PassRun {
    /// The run's passes in the tables' order, each with its phase and `flops` (in that order).
    fn passes(&self, flops: [f64; 4]) -> [(&'static str, &Timed, f64); 4] {
        [
            ("covariance pass", &self.covariance, flops[0]),
            ("eigenvalue pass", &self.eigenvalue, flops[1]),
            ("score: query gradients", &self.queries, flops[2]),
            ("score: scoring pass", &self.scoring, flops[3]),
        ]
    }
}

/// How often `bench --passes-only` reads the GEMM rate while a pass runs. A reading takes
/// about 0.12 s (two reference products per thread) and is left out of the pass's time.
const RATE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The mean of `rates`, or `fallback` when there are none. An arithmetic mean, because the
/// readings are spread evenly over the pass's time: its FLOPs over the mean rate times its
/// seconds is its share of the GEMM throughput the machine gave over those seconds.
fn mean_rate(rates: &[f64], fallback: f64) -> f64 {
    if rates.is_empty() {
        fallback
    } else {
        rates.iter().sum::<f64>() / rates.len() as f64
    }
}

/// The median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `infl bench --passes-only`: times `infl fit` (EK-FAC) and a full-rank `infl score` pass by
/// pass, and prints each pass against its GEMM-bound floor.
fn pass_floors(
    model: &dyn infl::model::TapModel,
    inputs: &PassInputs<'_>,
    progress: &dyn Progress,
) -> Result<()> {
    use infl::curvature::{statistics_flops, Pass};
    use infl::model::TokenBatch;

    let mut tok = infl::data::LazyTokenizer::new(inputs.model);
    let data = infl::data::read_corpus(inputs.train, &mut tok, inputs.max_len, model.vocab_size())?;
    let queries = infl::data::read_queries(
        inputs.queries,
        &mut tok,
        model.max_positions(),
        model.vocab_size(),
    )?
    .0;
    let tracked = model.tracked();
    let batch = inputs.batch_size.max(1);
    // The products of the forward and backward passes, batch by batch as the passes cut them.
    let mut taps_flops = 0.0;
    for chunk in data.sequences.chunks(batch) {
        let refs: Vec<(u64, &[u32])> = chunk.iter().map(|s| (0, s.ids.as_slice())).collect();
        taps_flops += model
            .tap_flops(&TokenBatch::training(&refs))
            .ok_or_else(|| {
                anyhow::anyhow!("--passes-only needs the fast engine, which counts its FLOPs")
            })?;
    }
    let mut query_flops = 0.0;
    for chunk in queries.chunks(batch) {
        let refs: Vec<(u64, &[u32], &[u32])> = chunk
            .iter()
            .map(|q| (0, q.prompt_ids.as_slice(), q.completion_ids.as_slice()))
            .collect();
        query_flops += model.tap_flops(&TokenBatch::queries(&refs)).unwrap_or(0.0);
        let lens: Vec<usize> = chunk
            .iter()
            .map(|q| q.prompt_ids.len() + q.completion_ids.len())
            .collect();
        query_flops += infl::influence::query_flops(tracked, &lens, false);
    }
    let n_tokens = data.n_tokens();
    let n_seqs = data.sequences.len();

    let runs = (0..inputs.repeat.max(1))
        .map(|_| time_fit_and_score(inputs, batch, progress))
        .collect::<Result<Vec<_>>>()?;
    // The fastest rate of all: the strict floor is then the lower bound it claims to be, in
    // every run.
    let rate = runs.iter().map(|r| r.best).fold(0.0, f64::max);
    let cov_flops = taps_flops + statistics_flops(Pass::Covariance, tracked, n_tokens);
    let lam_flops = taps_flops + statistics_flops(Pass::Eigenvalue, tracked, n_tokens);
    let scr_flops =
        taps_flops + infl::influence::scoring_flops(tracked, n_tokens, n_seqs, queries.len());
    let total_flops = cov_flops + lam_flops + query_flops + scr_flops;
    // (floor at the rates read during the phase, at the best rate), in seconds.
    let floors = |flops: f64, phase: &Timed| (flops / mean_rate(&phase.rates, rate), flops / rate);
    let row = |name: &str, time: Elapsed, flops: f64, (floor, strict): (f64, f64)| {
        let secs = time.wall;
        // Cores kept busy: the process's CPU time over the wall time (not for a phase too
        // short to time).
        let cores = match time.cpu {
            Some(c) if secs >= 0.01 => format!("{:.2}", c / secs),
            _ => "-".into(),
        };
        if flops > 0.0 {
            println!(
                "{name:<34} {flops:>10.3e} {:>7.1} {floor:>9.3} {secs:>9.3} {:>11.0}% {:>8.0}% {cores:>6}",
                flops / floor / 1e9,
                100.0 * floor / secs,
                100.0 * strict / secs
            );
        } else {
            println!(
                "{name:<34} {:>10} {:>7} {:>9} {secs:>9.3} {:>12} {:>9} {cores:>6}",
                "-", "-", "-", "-", "-"
            );
        }
    };
    let flops = [cov_flops, lam_flops, query_flops, scr_flops];
    // The whole job's (floor at the rates read, floor at the best rate) of a run.
    let job_floors = |run: &PassRun| {
        run.passes(flops)
            .into_iter()
            .map(|(_, phase, flops)| floors(flops, phase))
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
    };
    for (k, run) in runs.iter().enumerate() {
        let label = if runs.len() > 1 {
            format!(" (run {} of {})", k + 1, runs.len())
        } else {
            String::new()
        };
        let read: Vec<f64> = [&run.covariance, &run.eigenvalue, &run.queries, &run.scoring]
            .iter()
            .flat_map(|p| p.rates.iter().copied())
            .collect();
        let (lo, hi) = read.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
            (lo.min(r), hi.max(r))
        });
        println!(
            "{}passes against their GEMM-bound floor: {} training tokens in {n_seqs} sequences, {} queries (full rank), batch {batch}{label}; GEMM rate read {} times during the passes, {:.1}–{:.1} GF/s; best {:.1} GF/s",
            if k > 0 { "\n" } else { "" },
            n_tokens,
            queries.len(),
            read.len(),
            if read.is_empty() { 0.0 } else { lo / 1e9 },
            hi / 1e9,
            rate / 1e9
        );
        println!(
            "{:<34} {:>10} {:>7} {:>9} {:>9} {:>12} {:>9} {:>6}",
            "pass", "FLOP", "GF/s", "floor s", "seconds", "floor/actual", "vs best", "cores"
        );
        // The rest of the fit and of the score: what their own clocks measured beyond the passes.
        let fit_rest = run
            .fit
            .minus(run.covariance.time)
            .minus(run.eigenvalue.time);
        let score_rest = run.score.minus(run.queries.time).minus(run.scoring.time);
        let none = (0.0, 0.0);
        let pass_row = |(name, phase, flops): (&str, &Timed, f64)| {
            row(name, phase.time, flops, floors(flops, phase))
        };
        let [covariance, eigenvalue, queries, scoring] = run.passes(flops);
        pass_row(covariance);
        pass_row(eigenvalue);
        row("fit: eigendecomposition, load, save", fit_rest, 0.0, none);
        pass_row(queries);
        pass_row(scoring);
        row("score: load, save", score_rest, 0.0, none);
        row(
            "fit + score",
            run.fit.plus(run.score),
            total_flops,
            job_floors(run),
        );
    }
    println!(
        "(the passes' products: forward and activation backward, covariance Grams as symmetric\n\
         rank-k updates, the eigenbasis rotations and per-sequence products, the scores' dot\n\
         products; element-wise work, the eigendecomposition and I/O are not counted. GF/s: the\n\
         mean of the rates read during the pass (the best rate where none was), the floor's\n\
         rate; vs best: the floor at the best rate read in the run{}, a stricter bound on a\n\
         machine whose rate wanders; cores: the process's CPU time over the wall time, of {}\n\
         threads)",
        if runs.len() > 1 { "s" } else { "" },
        rayon::current_num_threads()
    );
    if runs.len() > 1 {
        let ratios = |strict: bool| -> Vec<f64> {
            runs.iter()
                .map(|r| {
                    let (floor, at_best) = job_floors(r);
                    100.0 * if strict { at_best } else { floor } / r.fit.plus(r.score).wall
                })
                .collect()
        };
        let listed = |v: &[f64]| {
            v.iter()
                .map(|p| format!("{p:.0}%"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (read, strict) = (ratios(false), ratios(true));
        println!(
            "fit + score over {} runs: floor/actual {} (median {:.0}%); vs best at {:.1} GF/s {} (median {:.0}%)",
            runs.len(),
            listed(&read),
            median(read.clone()),
            rate / 1e9,
            listed(&strict),
            median(strict.clone())
        );
    }
    let last = runs.last().expect("at least one run");

    // Each pass overlaps its forward/backward with its statistics: the parts timed apart say
    // which of the two is off its floor.
    let parts = infl::pass_parts::time_parts(model, &data.sequences, batch, queries.len().max(1))?;
    let statistics = [
        (
            "covariance statistics alone",
            parts.covariance,
            statistics_flops(Pass::Covariance, tracked, n_tokens),
            last.covariance.time.wall,
        ),
        (
            "eigenvalue statistics alone",
            parts.eigenvalue,
            statistics_flops(Pass::Eigenvalue, tracked, n_tokens),
            last.eigenvalue.time.wall,
        ),
        (
            "scoring statistics alone",
            parts.scoring,
            infl::influence::scoring_flops(tracked, n_tokens, n_seqs, queries.len()),
            last.scoring.time.wall,
        ),
    ];
    println!(
        "\nthe passes' parts timed apart (at the best GEMM rate{}):",
        if runs.len() > 1 {
            "; pass/parts of the last run"
        } else {
            ""
        }
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "part", "FLOP", "floor s", "seconds", "floor/actual", "pass/parts"
    );
    let part_row = |name: &str, secs: f64, flops: f64, overlap: String| {
        let floor = flops / rate;
        println!(
            "{name:<34} {flops:>10.3e} {floor:>10.3} {secs:>10.3} {:>11.0}% {overlap:>12}",
            100.0 * floor / secs.max(1e-9)
        );
    };
    part_row(
        "forward + activation backward",
        parts.taps,
        taps_flops,
        "-".into(),
    );
    for (name, secs, flops, pass) in statistics {
        let overlap = format!("{:.0}%", 100.0 * pass / (parts.taps + secs).max(1e-9));
        part_row(name, secs, flops, overlap);
    }
    println!(
        "(forward + activation backward: every batch through the passes' driver, nothing\n\
         consuming the taps; statistics: on the taps of the first {} batches, scaled by tokens,\n\
         with dense stand-ins for the eigenbases and queries; pass/parts: the pass's time over\n\
         the two parts' sum, below 100% where the pass overlaps them)",
        data.sequences
            .len()
            .div_ceil(batch)
            .min(infl::pass_parts::KEPT_BATCHES)
    );
    Ok(())
}

/// Times one `infl fit` (EK-FAC) and one full-rank `infl score` for `bench --passes-only`.
fn time_fit_and_score(
    inputs: &PassInputs<'_>,
    batch: usize,
    progress: &dyn Progress,
) -> Result<PassRun> {
    let rate_before = infl::model::fast::bench::gemm_rate();
    let probe = infl::model::fast::bench::GemmProbe::default();
    let read = || probe.read();
    let clock = PhaseClock::sampling(
        progress,
        infl::pass::clock::Sampler {
            every: RATE_EVERY,
            read: &read,
        },
    );
    let factors = inputs.out.join("passes-factors");
    let fit = FitJob {
        model: inputs.model.to_path_buf(),
        train: inputs.train.to_path_buf(),
        out: factors.clone(),
        modules: ModuleSelection::All,
        layers: None,
        memory_check: true,
        max_len: Some(inputs.max_len),
        shard: infl::shard::Shard::WHOLE,
        checkpoint: infl::checkpoint::CheckpointPolicy::NEVER,
        fresh: true,
        store: None,
        options: FitOptions {
            strategy: Strategy::Ekfac,
            fisher: inputs.fisher,
            batch_size: batch,
            seed: 0,
        },
    };
    // Wall and CPU time over the same interval, so that their ratio means cores kept busy.
    let watch = Stopwatch::start();
    workflow::fit(&fit, &clock)?;
    let fit_time = watch.elapsed().minus(clock.paused());
    // The rate again between the fit and the score: on a shared machine one measurement can
    // land in a slow moment, which would lower the floor's rate and flatter every ratio.
    let rate_between = infl::model::fast::bench::gemm_rate();
    let score = ScoreJob {
        fresh: true,
        ..bench_score_job(
            (inputs.model, &factors, inputs.train, inputs.queries),
            inputs.out.join("passes-scores"),
            (batch, inputs.max_len),
            None,
        )
    };
    let (watch, paused) = (Stopwatch::start(), clock.paused());
    workflow::score(&score, &clock)?;
    let score_time = watch.elapsed().minus(clock.paused().minus(paused));
    let timed = |name: &str| Timed {
        time: clock.seconds(name),
        rates: clock.readings(name),
    };
    let (covariance, eigenvalue) = (timed("covariance pass"), timed("eigenvalue pass"));
    let (queries, scoring) = (timed("query gradients"), timed("scoring pass"));
    let best = [&covariance, &eigenvalue, &queries, &scoring]
        .iter()
        .flat_map(|p| p.rates.iter().copied())
        .fold(
            rate_before
                .max(rate_between)
                .max(infl::model::fast::bench::gemm_rate()),
            f64::max,
        );
    Ok(PassRun {
        best,
        fit: fit_time,
        score: score_time,
        covariance,
        eigenvalue,
        queries,
        scoring,
    })
}

fn print_gram_bench() {
    println!("\ncovariance update Σ xᵀx (f32 product, f64 accumulator, row-major x), best of 3:");
    println!(
        "{:>6} {:>6} {:>12} {:>14} {:>16} {:>14} {:>8}",
        "T", "d", "general ms", "sym, split ms", "recursion 1/core", "sym, 1/core ms", "ratio"
    );
    let shapes = [(1024, 257), (2048, 1025), (2048, 3072)];
    for g in infl::linalg::gram_benchmark(&shapes) {
        println!(
            "{:>6} {:>6} {:>12.2} {:>14.2} {:>16.2} {:>14.2} {:>7.2}×",
            g.tokens,
            g.width,
            g.general * 1e3,
            g.split * 1e3,
            g.recursive_per_core * 1e3,
            g.per_core * 1e3,
            g.general / g.split.min(g.per_core)
        );
    }
    println!(
        "(1/core: one Gram per core at once, as the passes run them; time per Gram; recursion:\n\
         the products of the `gemm` crate, which machines without the AVX2 kernel run)"
    );
}

fn bench(a: BenchArgs, progress: &Bars) -> Result<()> {
    use infl::model::Labels;
    use infl::pass::{for_each_batch, Silent};
    use std::time::Instant;

    if a.engines_only {
        print!("{}", infl::model::fast::bench::run()?.table());
        print_gram_bench();
        print_dots_bench();
        return Ok(());
    }
    let (model_dir, corpus, queries, default_len) = match (a.model, a.train, a.queries) {
        (Some(m), Some(t), Some(q)) => (m, t, q, None),
        _ => {
            let (m, t, q) = unpack_bundled(&a.out)?;
            (m, t, q, Some(BUNDLED_WINDOW))
        }
    };
    let model = infl::model::load(&model_dir, ModuleSelection::All)?;
    let max_len = a.max_len.or(default_len).unwrap_or(model.max_positions());
    if a.passes_only {
        let inputs = PassInputs {
            model: &model_dir,
            train: &corpus,
            queries: &queries,
            max_len,
            batch_size: a.batch_size,
            fisher: a.fisher,
            out: &a.out,
            repeat: a.repeat as usize,
        };
        return pass_floors(model.as_ref(), &inputs, progress);
    }
    let factors = a.out.join("factors");
    if let Some(scale) = a.rss_child {
        return rss_child(
            scale,
            &model_dir,
            &factors,
            &corpus,
            &queries,
            max_len,
            a.batch_size,
            &a.out,
        );
    }
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
    // Timed before and after the other passes, keeping the best, so that first-touch page
    // faults and a busy machine do not flatter the ratios.
    let baseline = || -> Result<f64> {
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
        Ok(t0.elapsed().as_secs_f64())
    };
    let mut base = baseline()?;

    let t0 = Instant::now();
    let fit = FitJob {
        model: model_dir.clone(),
        train: corpus.clone(),
        out: factors.clone(),
        modules: ModuleSelection::All,
        layers: None,
        memory_check: true,
        max_len: Some(max_len),
        shard: infl::shard::Shard::WHOLE,
        checkpoint: infl::checkpoint::CheckpointPolicy::NEVER,
        fresh: false,
        store: None,
        options: FitOptions {
            strategy: Strategy::Ekfac,
            fisher: Fisher::Sampled,
            batch_size: a.batch_size,
            seed: 0,
        },
    };
    workflow::fit(&fit, progress)?;
    let fit_s = t0.elapsed().as_secs_f64();

    let score_job = |queries: PathBuf, train: PathBuf, rank: Option<usize>, out: &str| {
        bench_score_job(
            (&model_dir, &factors, &train, &queries),
            a.out.join(out),
            (a.batch_size, max_len),
            rank,
        )
    };
    let score_s = workflow::score(
        &score_job(queries.clone(), corpus.clone(), Some(32), "results"),
        progress,
    )?
    .seconds;

    // Query batching: many queries share one pass over the training data.
    let text = std::fs::read_to_string(&queries)?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut batching = Vec::new();
    for &count in &a.query_counts {
        let many = a.out.join(format!("queries-{count}.jsonl"));
        let mut out = String::new();
        for i in 0..count {
            let mut v: serde_json::Value = serde_json::from_str(lines[i % lines.len()])?;
            v["id"] = format!("q{i}").into();
            out.push_str(&format!("{v}\n"));
        }
        infl::io::write_atomic(&many, out.as_bytes())?;
        for (rank, label) in [(Some(32), "rank 32"), (None, "full rank")] {
            let job = score_job(
                many.clone(),
                corpus.clone(),
                rank,
                &format!("results-{count}"),
            );
            let secs = workflow::score(&job, progress)?.pass_seconds;
            batching.push((format!("scoring pass, {count} queries, {label}"), secs));
        }
    }

    base = base.min(baseline()?).min(baseline()?);
    println!(
        "infl bench: {} parameters, {} training tokens, {} queries, batch {}",
        model.n_parameters(),
        n_tokens,
        n_queries,
        a.batch_size
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
    match peak_rss_mib() {
        Some(m) => println!("peak memory of this process (VmHWM): {m:.0} MiB"),
        None => println!("peak memory: not available on this platform"),
    }

    // Peak memory against corpus size, each size in a fresh process (VmHWM never goes down).
    let exe = std::env::current_exe()?;
    for scale in &a.rss_scales {
        let out = std::process::Command::new(&exe)
            .args([
                "--quiet",
                "bench",
                "--rss-child",
                &scale.to_string(),
                "--batch-size",
                &a.batch_size.to_string(),
                "--out",
            ])
            .arg(&a.out)
            .args(["--model"])
            .arg(&model_dir)
            .args(["--train"])
            .arg(&corpus)
            .args(["--queries"])
            .arg(&queries)
            .args(["--max-len", &max_len.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "bench child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    // Last, so that its models do not count in the peak memory reported above.
    print!("{}", infl::model::fast::bench::run()?.table());
    print_gram_bench();
    print_dots_bench();
    Ok(())
}

/// One streamed scoring run on the corpus repeated `scale` times; prints its peak memory.
#[allow(clippy::too_many_arguments)]
fn rss_child(
    scale: usize,
    model: &std::path::Path,
    factors: &std::path::Path,
    corpus: &std::path::Path,
    queries: &std::path::Path,
    max_len: usize,
    batch_size: usize,
    out: &std::path::Path,
) -> Result<()> {
    let big = out.join(format!("corpus-x{scale}.jsonl"));
    {
        use std::io::Write;
        let text = std::fs::read(corpus)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big)?);
        for _ in 0..scale {
            f.write_all(&text)?;
        }
        f.flush()?;
    }
    let job = bench_score_job(
        (model, factors, &big, queries),
        out.join(format!("results-x{scale}")),
        (batch_size, max_len),
        Some(32),
    );
    let s = workflow::score(&job, &Bars::new(true))?;
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
