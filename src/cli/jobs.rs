//! The arguments of the pipeline's stages (fit, score, self-influence) and where and how
//! their passes run, with the library jobs they become: the one place that maps those flags
//! onto `infl::workflow`'s jobs.

use anyhow::Result;
use infl::curvature::{Fisher, FitOptions, Strategy};
use infl::influence::Damping;
use infl::model::ModuleSelection;
use infl::workflow::{FitJob, Normalize, ScoreJob, SelfInfluenceJob};
use std::path::PathBuf;

/// Where and how the forward and backward passes run (fit, score, self-influence, inspect).
#[derive(clap::Args, Clone, Copy)]
pub struct ComputeArgs {
    /// Engine of the forward/backward passes: fast (explicit forward, activation-only
    /// backward, fused threaded kernels; CPU only) or autograd (candle autograd, the reference:
    /// slower on the CPU, and the engine that runs on a GPU) [default: fast on the CPU,
    /// autograd on a GPU].
    #[arg(long, value_enum)]
    pub engine: Option<infl::model::Engine>,
    /// Device of the forward/backward passes: cpu, cuda (GPU 0) or cuda:N. A GPU needs a build
    /// with `--features cuda`; there the fit's statistics (covariances, Λ), the training
    /// sequences' scores and their self-influence are formed on the GPU too;
    /// eigendecompositions, query preconditioning, `--normalize cosine` and a gradient store
    /// run on the CPU.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: infl::model::ComputeDevice,
}

impl ComputeArgs {
    pub fn engine(&self) -> infl::model::Engine {
        self.engine.unwrap_or(self.device.default_engine())
    }

    /// Makes these the engine and device of every model the command loads.
    pub fn apply(&self) {
        infl::model::set_default_engine(self.engine());
        infl::model::set_default_device(self.device);
    }
}

#[derive(clap::Args)]
pub struct FitArgs {
    /// Hugging Face checkpoint directory: config.json, model.safetensors, tokenizer.json
    /// (the tokenizer is only needed when the corpus holds text rather than token ids).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Training corpus, JSONL: one document per line, {"text": ...} or {"ids": [...]}.
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    /// Output directory for the factors (factors.safetensors + meta.json).
    #[arg(long, value_name = "FACTORS")]
    pub out: PathBuf,
    /// Curvature approximation.
    #[arg(long, value_enum, default_value = "ekfac")]
    pub strategy: Strategy,
    /// Labels of the Fisher: sampled from the model (true Fisher) or the data's (empirical).
    #[arg(long, value_enum, default_value = "sampled")]
    pub fisher: Fisher,
    /// Which linear layers of the blocks to track (attention qkv/out, MLP in/out).
    #[arg(long, value_enum, default_value = "all")]
    pub modules: ModuleSelection,
    /// Track only these layers, by checkpoint name (comma-separated, within --modules; see
    /// `infl inspect` for the names), e.g. `transformer.h.0.mlp.c_fc,transformer.h.1.mlp.c_fc`.
    #[arg(long, value_delimiter = ',', value_name = "NAME,..")]
    pub layers: Option<Vec<String>>,
    /// Documents longer than this many tokens are cut into consecutive windows
    /// [default: the model's context length].
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[arg(long, default_value_t = 8, value_name = "B")]
    pub batch_size: usize,
    /// Seed of the labels sampled for the true Fisher.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Start even if the memory estimate exceeds the memory available.
    #[arg(long = "no-memory-check", action = clap::ArgAction::SetFalse)]
    pub memory_check: bool,
    #[command(flatten)]
    pub sharding: ShardArgs,
    /// Also keep every training sequence's gradient, in the factors' eigenbasis, in
    /// FACTORS/store/: `score --store` then scores new queries with no pass over the training
    /// data. With `--fisher empirical` it is written from the eigenvalue pass's own gradients;
    /// otherwise (sampled labels, or a resumed pass) one more pass under the data's labels
    /// writes it. The size is checked against free disk before writing.
    #[arg(long)]
    pub store: bool,
    /// Precision of the gradient store.
    #[arg(long, value_enum, default_value = "f32", requires = "store")]
    pub store_dtype: infl::store::StoreDtype,
    /// Form of each stored gradient: `smallest` on disk (the rotated gradient or its per-token
    /// factors), or always `rotated` (more disk for sequences shorter than the layers are
    /// wide; `score --store` reads it with no reconstruction).
    #[arg(long, value_enum, default_value = "smallest", requires = "store")]
    pub store_form: infl::store::StoreForm,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// A factors directory written by `infl fit`.
    #[arg(long, value_name = "FACTORS")]
    pub factors: PathBuf,
    /// Training corpus to score (JSONL, as for fit; it may differ from the fitting corpus).
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    /// Queries, JSONL: {"id": optional, "prompt": ..., "completion": ...} or pre-tokenised
    /// {"prompt_ids": [...], "completion_ids": [...]}.
    #[arg(long, value_name = "QUERIES")]
    pub queries: PathBuf,
    /// Output directory: top_k.jsonl, meta.json (and scores.safetensors with --dense).
    #[arg(long, value_name = "RESULTS")]
    pub out: PathBuf,
    /// Damping added to the eigenvalues: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    pub damping: Damping,
    /// How many of the most influential sequences to keep per query.
    #[arg(long, default_value_t = 10, value_name = "K")]
    pub top_k: usize,
    /// Also write the full [n_queries, n_train] matrix to scores.safetensors.
    #[arg(long)]
    pub dense: bool,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[arg(long, default_value_t = 8, value_name = "B")]
    pub batch_size: usize,
    /// Window length for the corpus [default: the one the factors were fitted with].
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
    /// Start even if the memory estimate exceeds the memory available.
    #[arg(long = "no-memory-check", action = clap::ArgAction::SetFalse)]
    pub memory_check: bool,
    /// Compress each query's preconditioned gradient to rank k per layer (truncated SVD), so
    /// scoring costs O(k (d_in + d_out)) per token and layer; `full` is exact. Exact anyway
    /// where k reaches a layer's rank.
    #[arg(long, default_value = "32", value_name = "k|full", value_parser = parse_rank)]
    pub query_rank: QueryRank,
    /// Also write each top/bottom score's parts per tracked layer, and per-layer totals over
    /// the whole corpus (layers.json).
    #[arg(long)]
    pub per_layer: bool,
    /// Also split each top/bottom score over the training sequence's tokens (one more small
    /// pass over those sequences).
    #[arg(long)]
    pub per_token: bool,
    /// `none`: raw influence. `cosine`: I(q,z)/sqrt(I(q,q)·I(z,z)), unit-normalised gradients
    /// in the damped inverse-Fisher metric (RelatIF-style).
    #[arg(long, value_enum, default_value = "none")]
    pub normalize: Normalize,
    /// Score only each query's N best BM25 matches (over token ids) from --index: the paper's
    /// TF-IDF pre-filter for corpora too large to score whole.
    #[arg(long, value_name = "N", requires = "index")]
    pub prefilter: Option<usize>,
    /// An index built by `infl index` from the same corpus and --max-len.
    #[arg(long, value_name = "INDEX", requires = "prefilter")]
    pub index: Option<PathBuf>,
    #[command(flatten)]
    pub sharding: ShardArgs,
    /// Read the training gradients from FACTORS/store/ (written by `fit --store` on the same
    /// corpus) instead of running the model over --train; queries are then exact (full rank).
    #[arg(long, conflicts_with_all = ["per_token", "shard"])]
    pub store: bool,
}

#[derive(Clone, Copy)]
pub struct QueryRank(Option<usize>);

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
pub struct SelfInfluenceArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// A factors directory written by `infl fit`.
    #[arg(long, value_name = "FACTORS")]
    pub factors: PathBuf,
    /// Training corpus (JSONL).
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    /// Output directory: self_influence.jsonl (every sequence), top_k.jsonl, distribution.json,
    /// meta.json.
    #[arg(long, value_name = "RESULTS")]
    pub out: PathBuf,
    /// Damping: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    pub damping: Damping,
    /// How many of the highest and lowest sequences to list.
    #[arg(long, default_value_t = 20, value_name = "K")]
    pub top_k: usize,
    /// Sequences per forward/backward batch.
    #[arg(long, default_value_t = 8, value_name = "B")]
    pub batch_size: usize,
    /// Window length [default: the one the factors were fitted with].
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
}

/// `--shard`, shared by fit and score.
#[derive(clap::Args)]
pub struct ShardArgs {
    /// Run only shard i of N of the corpus: sequence k (0-based, corpus order) belongs to shard
    /// k mod N. `auto` takes index and count from a Slurm array task
    /// (SLURM_ARRAY_TASK_ID/MIN/STEP/COUNT); `auto/N` takes the index from JOB_COMPLETION_INDEX
    /// (Kubernetes Indexed Job) or Slurm. Combine the shards with `infl merge`.
    #[arg(long, value_name = "i/N|auto|auto/N")]
    pub shard: Option<String>,
    /// Save the pass's state every M sequences [default: every 15 minutes]; rerunning the same
    /// command after a crash or kill resumes from it, with identical results.
    #[arg(long, value_name = "M")]
    pub checkpoint_every: Option<usize>,
    /// Discard saved state in --out instead of resuming from it.
    #[arg(long)]
    pub fresh: bool,
}

impl ShardArgs {
    pub fn shard(&self) -> Result<infl::shard::Shard> {
        Ok(match &self.shard {
            None => infl::shard::Shard::WHOLE,
            Some(s) => infl::shard::Shard::parse(s)?,
        })
    }

    pub fn policy(&self) -> infl::curvature::CheckpointPolicy {
        infl::curvature::CheckpointPolicy {
            every_sequences: self.checkpoint_every,
            every_seconds: if self.checkpoint_every.is_some() {
                f64::INFINITY
            } else {
                900.0
            },
        }
    }
}

impl FitArgs {
    /// The fit these arguments ask for.
    pub fn into_job(self) -> Result<FitJob> {
        Ok(FitJob {
            model: self.model,
            train: self.train,
            out: self.out,
            modules: self.modules,
            layers: self.layers,
            memory_check: self.memory_check,
            max_len: self.max_len,
            shard: self.sharding.shard()?,
            checkpoint: self.sharding.policy(),
            fresh: self.sharding.fresh,
            store: self.store.then_some(infl::store::StoreOptions {
                dtype: self.store_dtype,
                form: self.store_form,
            }),
            options: FitOptions {
                strategy: self.strategy,
                fisher: self.fisher,
                batch_size: self.batch_size,
                seed: self.seed,
            },
        })
    }
}

impl ScoreArgs {
    /// The scoring these arguments ask for.
    pub fn into_job(self) -> Result<ScoreJob> {
        Ok(ScoreJob {
            model: self.model,
            factors: self.factors,
            train: self.train,
            queries: self.queries,
            out: self.out,
            damping: self.damping,
            top_k: self.top_k,
            dense: self.dense,
            batch_size: self.batch_size,
            max_len: self.max_len,
            query_rank: self.query_rank.0,
            per_layer: self.per_layer,
            per_token: self.per_token,
            normalize: self.normalize,
            prefilter: self
                .prefilter
                .map(|n| (n, self.index.clone().unwrap_or_default())),
            shard: self.sharding.shard()?,
            checkpoint: self.sharding.policy(),
            fresh: self.sharding.fresh,
            store: self.store,
            memory_check: self.memory_check,
        })
    }
}

impl SelfInfluenceArgs {
    /// The self-influence run these arguments ask for.
    pub fn into_job(self) -> SelfInfluenceJob {
        SelfInfluenceJob {
            model: self.model,
            factors: self.factors,
            train: self.train,
            out: self.out,
            damping: self.damping,
            top_k: self.top_k,
            batch_size: self.batch_size,
            max_len: self.max_len,
        }
    }
}
