//! Every option of the stages, defined once, as kronfluence's `arguments.py` does it: the
//! library's jobs take these structs, the command line flattens them (each field's doc comment
//! is its `--help`; the clap derives sit behind the `clap` feature), `meta.json` records them,
//! and the settings fingerprint that shards and resumed runs must agree on is their
//! serialisation. A default here is the command line's default.
//!
//! - [`FitOptions`]: what `infl fit` computes.
//! - [`ScoreOptions`]: what `infl score` computes; [`SelfInfluenceOptions`] for
//!   `infl self-influence`.
//! - [`RunOptions`]: how a long run is carried out (sharding, checkpoints, resumption, the
//!   memory check); it changes no number, so no output records it but the shard count.
//! - [`Compute`]: where the forward and backward passes run (engine, device); defined beside
//!   the models that take it ([`crate::model::load`]).

use crate::curvature::{Fisher, Strategy};
pub use crate::data::Columns;
use crate::influence::Damping;
pub use crate::model::Compute;
use crate::model::ModuleSelection;
use crate::shard::Shard;

/// Sequences per forward/backward batch, unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// What `infl fit` computes. Recorded in the factors' `meta.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct FitOptions {
    /// Curvature approximation.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Strategy::Ekfac))]
    pub strategy: Strategy,
    /// Labels of the Fisher: sampled from the model (true Fisher) or the data's (empirical).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Fisher::Sampled))]
    pub fisher: Fisher,
    /// Which linear layers of the blocks to track (attention qkv/out, MLP in/out).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = ModuleSelection::All))]
    #[serde(default = "all_modules")]
    pub modules: ModuleSelection,
    /// Track only these layers, by checkpoint name (comma-separated, within --modules; see
    /// `infl inspect` for the names), e.g. `transformer.h.0.mlp.c_fc,transformer.h.1.mlp.c_fc`.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_delimiter = ',', value_name = "NAME,..")
    )]
    #[serde(default, rename = "selected_layers")]
    pub layers: Option<Vec<String>>,
    /// Documents longer than this many tokens are cut into consecutive windows
    /// [default: the model's context length].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "B")
    )]
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Seed of the labels sampled for the true Fisher.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0, value_name = "S"))]
    #[serde(default)]
    pub seed: u64,
    /// Which column (or JSONL field) of the corpus holds each document.
    #[cfg_attr(feature = "clap", command(flatten))]
    #[serde(flatten)]
    pub columns: Columns,
}

fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}

fn all_modules() -> ModuleSelection {
    ModuleSelection::All
}

impl Default for FitOptions {
    /// EK-FAC with the true Fisher on every linear layer of the blocks, windows of the model's
    /// context length.
    fn default() -> Self {
        FitOptions {
            strategy: Strategy::Ekfac,
            fisher: Fisher::Sampled,
            modules: ModuleSelection::All,
            layers: None,
            max_len: None,
            batch_size: DEFAULT_BATCH_SIZE,
            seed: 0,
            columns: Columns::default(),
        }
    }
}

/// What the reported score is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// The influence I(q, z) itself.
    None,
    /// I(q, z) / sqrt(I(q, q) · I(z, z)): cosine of the two gradients in the damped
    /// inverse-Fisher metric (RelatIF-style; bounded by 1 in magnitude).
    Cosine,
}

/// The rank each query's preconditioned gradient is compressed to, per layer: `None` is exact
/// (`full`). Written `32` or `full` on the command line, a number or null in `meta.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct QueryRank(pub Option<usize>);

impl QueryRank {
    pub const FULL: QueryRank = QueryRank(None);
}

impl std::str::FromStr for QueryRank {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "full" {
            return Ok(QueryRank::FULL);
        }
        match s.parse::<usize>() {
            Ok(k) if k > 0 => Ok(QueryRank(Some(k))),
            _ => Err(format!("`{s}` is neither `full` nor a positive rank")),
        }
    }
}

impl std::fmt::Display for QueryRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(k) => write!(f, "{k}"),
            None => f.write_str("full"),
        }
    }
}

/// What `infl score` computes. Recorded in the results' `meta.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ScoreOptions {
    /// Damping added to the eigenvalues: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = Damping::Heuristic, value_name = "heuristic|X")
    )]
    pub damping: Damping,
    /// How many of the most influential sequences to keep per query.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 10, value_name = "K"))]
    pub top_k: usize,
    /// Also write the full [n_queries, n_train] matrix to scores.safetensors.
    #[cfg_attr(feature = "clap", arg(long))]
    pub dense: bool,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "B")
    )]
    pub batch_size: usize,
    /// Window length for the corpus [default: the one the factors were fitted with].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Compress each query's preconditioned gradient to rank k per layer (truncated SVD), so
    /// scoring costs O(k (d_in + d_out)) per token and layer; `full` is exact. Exact anyway
    /// where k reaches a layer's rank.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = QueryRank(Some(32)), value_name = "k|full")
    )]
    pub query_rank: QueryRank,
    /// Also write each top/bottom score's parts per tracked layer, and per-layer totals over
    /// the whole corpus (layers.json).
    #[cfg_attr(feature = "clap", arg(long))]
    pub per_layer: bool,
    /// Also split each top/bottom score over the training sequence's tokens (one more small
    /// pass over those sequences).
    #[cfg_attr(feature = "clap", arg(long))]
    pub per_token: bool,
    /// `none`: raw influence. `cosine`: I(q,z)/sqrt(I(q,q)·I(z,z)), unit-normalised gradients
    /// in the damped inverse-Fisher metric (RelatIF-style).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = Normalize::None))]
    pub normalize: Normalize,
    /// Score only each query's N best BM25 matches (over token ids) from --index: the paper's
    /// TF-IDF pre-filter for corpora too large to score whole.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", requires = "index"))]
    pub prefilter: Option<usize>,
    /// Read the training gradients from FACTORS/store/ (written by `fit --store` on the same
    /// corpus) instead of running the model over --train; queries are then exact (full rank).
    #[cfg_attr(feature = "clap", arg(long, conflicts_with_all = ["per_token", "shard"]))]
    #[serde(default, deserialize_with = "store_flag")]
    pub store: bool,
    /// Also write top_k.parquet and, with --dense, scores.parquet (a row per training sequence,
    /// a column per query), with the run's meta.json in each file's metadata.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub parquet: bool,
    /// Which column (or JSONL field) of the corpus holds each document.
    #[cfg_attr(feature = "clap", command(flatten))]
    #[serde(flatten)]
    pub columns: Columns,
}

/// `store` in a results `meta.json`: a flag, or (format 1) the store's path or null.
fn store_flag<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Flag(bool),
        Path(Option<String>),
    }
    Ok(match <Stored as serde::Deserialize>::deserialize(d)? {
        Stored::Flag(b) => b,
        Stored::Path(p) => p.is_some(),
    })
}

impl Default for ScoreOptions {
    /// Exact (full-rank) scores with the heuristic damping and the top 10 kept, no dense matrix,
    /// no decompositions: what library callers start from (the command line's `--query-rank`
    /// defaults to 32 instead).
    fn default() -> Self {
        ScoreOptions {
            damping: Damping::Heuristic,
            top_k: 10,
            dense: false,
            batch_size: DEFAULT_BATCH_SIZE,
            max_len: None,
            query_rank: QueryRank::FULL,
            per_layer: false,
            per_token: false,
            normalize: Normalize::None,
            prefilter: None,
            store: false,
            parquet: false,
            columns: Columns::default(),
        }
    }
}

/// What `infl self-influence` computes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct SelfInfluenceOptions {
    /// Damping: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = Damping::Heuristic, value_name = "heuristic|X")
    )]
    pub damping: Damping,
    /// How many of the highest and lowest sequences to list.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 20, value_name = "K"))]
    pub top_k: usize,
    /// Sequences per forward/backward batch.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "B")
    )]
    pub batch_size: usize,
    /// Window length [default: the one the factors were fitted with].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_len: Option<usize>,
    /// Which column (or JSONL field) of the corpus holds each document.
    #[cfg_attr(feature = "clap", command(flatten))]
    #[serde(flatten)]
    pub columns: Columns,
}

impl Default for SelfInfluenceOptions {
    fn default() -> Self {
        SelfInfluenceOptions {
            damping: Damping::Heuristic,
            top_k: 20,
            batch_size: DEFAULT_BATCH_SIZE,
            max_len: None,
            columns: Columns::default(),
        }
    }
}

/// How a long run is carried out: which shard of the corpus, when its state is saved, whether
/// saved state is resumed, whether the memory estimate may stop it. Results do not depend on
/// any of it.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RunOptions {
    /// Run only shard i of N of the corpus: sequence k (0-based, corpus order) belongs to shard
    /// k mod N. `auto` takes index and count from a Slurm array task
    /// (SLURM_ARRAY_TASK_ID/MIN/STEP/COUNT); `auto/N` takes the index from JOB_COMPLETION_INDEX
    /// (Kubernetes Indexed Job) or Slurm. Combine the shards with `infl merge`.
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            value_name = "i/N|auto|auto/N",
            default_value = "0/1",
            hide_default_value = true
        )
    )]
    pub shard: Shard,
    /// Save the pass's state every M sequences [default: every 15 minutes]; rerunning the same
    /// command after a crash or kill resumes from it, with identical results.
    #[cfg_attr(feature = "clap", arg(long, value_name = "M"))]
    pub checkpoint_every: Option<usize>,
    /// Discard saved state in --out instead of resuming from it.
    #[cfg_attr(feature = "clap", arg(long))]
    pub fresh: bool,
    /// Start even if the memory estimate exceeds the memory available.
    #[cfg_attr(
        feature = "clap",
        arg(long = "no-memory-check", action = clap::ArgAction::SetFalse)
    )]
    pub memory_check: bool,
    /// Seconds between saved states when `checkpoint_every` is not given: 15 minutes on the
    /// command line, never for library callers ([`RunOptions::ONCE`]).
    #[cfg_attr(feature = "clap", arg(skip = CHECKPOINT_SECONDS))]
    pub checkpoint_seconds: f64,
}

/// Seconds between saved states when `checkpoint_every` is not given.
pub const CHECKPOINT_SECONDS: f64 = 900.0;

impl RunOptions {
    /// One unsharded run from scratch that never saves its state: what library callers (the
    /// demo, the validations) use.
    pub const ONCE: RunOptions = RunOptions {
        shard: Shard::WHOLE,
        checkpoint_every: None,
        fresh: true,
        memory_check: true,
        checkpoint_seconds: f64::INFINITY,
    };

    /// When the passes save their state: every `checkpoint_every` sequences, or else every
    /// `checkpoint_seconds`.
    pub fn checkpoint_policy(&self) -> crate::checkpoint::CheckpointPolicy {
        crate::checkpoint::CheckpointPolicy {
            every_sequences: self.checkpoint_every,
            every_seconds: match self.checkpoint_every {
                Some(_) => f64::INFINITY,
                None => self.checkpoint_seconds,
            },
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions::ONCE
    }
}

#[cfg(all(test, feature = "clap"))]
mod tests {
    use super::*;
    use crate::model::Engine;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Fit {
        #[command(flatten)]
        options: FitOptions,
        #[command(flatten)]
        run: RunOptions,
        #[command(flatten)]
        compute: Compute,
    }

    #[derive(clap::Parser)]
    struct Score {
        #[command(flatten)]
        options: ScoreOptions,
        #[arg(long)]
        index: Option<std::path::PathBuf>,
    }

    #[derive(clap::Parser)]
    struct SelfInfluence {
        #[command(flatten)]
        options: SelfInfluenceOptions,
    }

    #[test]
    fn command_line_defaults_are_the_library_defaults() {
        let fit = Fit::try_parse_from(["fit"]).unwrap();
        assert_eq!(fit.options, FitOptions::default());
        assert_eq!(fit.compute, Compute::default());
        // The command line checkpoints every 15 minutes; library callers never do.
        assert_eq!(
            fit.run,
            RunOptions {
                fresh: false,
                checkpoint_seconds: CHECKPOINT_SECONDS,
                ..RunOptions::ONCE
            }
        );
        assert_eq!(
            fit.run.checkpoint_policy().every_seconds,
            CHECKPOINT_SECONDS
        );
        assert_eq!(
            RunOptions::ONCE.checkpoint_policy().every_seconds,
            f64::INFINITY
        );
        let score = Score::try_parse_from(["score"]).unwrap();
        assert_eq!(
            score.options,
            ScoreOptions {
                query_rank: QueryRank(Some(32)),
                ..ScoreOptions::default()
            }
        );
        let own = SelfInfluence::try_parse_from(["self-influence"]).unwrap();
        assert_eq!(own.options, SelfInfluenceOptions::default());
    }

    #[test]
    fn options_parse_from_their_flags() {
        let fit = Fit::try_parse_from([
            "fit",
            "--strategy",
            "kfac",
            "--layers",
            "a,b",
            "--max-len",
            "7",
            "--shard",
            "1/3",
            "--checkpoint-every",
            "5",
            "--no-memory-check",
            "--device",
            "cpu",
            "--engine",
            "autograd",
        ])
        .unwrap();
        assert_eq!(fit.options.strategy, Strategy::Kfac);
        assert_eq!(fit.options.layers, Some(vec!["a".into(), "b".into()]));
        assert_eq!(fit.options.max_len, Some(7));
        assert_eq!(fit.run.shard, Shard { index: 1, count: 3 });
        assert_eq!(fit.run.checkpoint_policy().every_sequences, Some(5));
        assert_eq!(fit.run.checkpoint_policy().every_seconds, f64::INFINITY);
        assert!(!fit.run.memory_check);
        assert_eq!(fit.compute.engine(), Engine::Autograd);
        let score = Score::try_parse_from([
            "score",
            "--query-rank",
            "full",
            "--damping",
            "0.5",
            "--prefilter",
            "3",
            "--index",
            "i",
        ])
        .unwrap();
        assert_eq!(score.options.query_rank, QueryRank::FULL);
        assert_eq!(score.options.damping, Damping::Fixed(0.5));
        assert_eq!(score.options.prefilter, Some(3));
        assert!(Score::try_parse_from(["score", "--query-rank", "0"]).is_err());
        assert!(Score::try_parse_from(["score", "--prefilter", "3"]).is_err());
    }

    #[test]
    fn results_of_format_1_read_their_store_path_as_the_flag() {
        let mut v = serde_json::to_value(ScoreOptions::default()).unwrap();
        for (stored, flag) in [
            (serde_json::json!("f/store"), true),
            (serde_json::Value::Null, false),
            (serde_json::json!(true), true),
        ] {
            v["store"] = stored;
            let o: ScoreOptions = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(o.store, flag);
        }
    }
}
