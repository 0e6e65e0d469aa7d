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
//!   memory check, [`OutputOptions`]); it changes no number, so no output records it but
//!   the shard count.
//! - [`Compute`]: where the forward and backward passes run (engine, device); defined beside
//!   the models that take it ([`crate::model::load`]).
//!
//! Every numeric option's range is defined here too ([`AtLeast`] and the `parse_*` functions):
//! each options type's `check()` and the command line's value parsers read the same bounds, so
//! a library caller and the command line refuse the same values with the same reason
//! ([`Error::Usage`], exit code 2).

use crate::curvature::{Fisher, Strategy};
pub use crate::data::Columns;
use crate::error::{Error, Result};
use crate::influence::Damping;
pub use crate::model::Compute;
use crate::model::ModuleSelection;
use crate::partition::Partition;
use crate::shard::Shard;

/// Sequences per forward/backward batch, unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// The smallest value a count option takes, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtLeast {
    /// The option's command-line name, without the dashes.
    pub flag: &'static str,
    pub min: usize,
    pub why: &'static str,
}

impl AtLeast {
    /// Refuses `value` below the minimum, naming the option.
    pub fn check(&self, value: usize) -> Result<()> {
        if value >= self.min {
            return Ok(());
        }
        Err(Error::usage(format!(
            "--{} {value}: {}",
            self.flag,
            self.range()
        )))
    }

    /// [`AtLeast::check`] of an option that may be absent.
    pub fn check_some(&self, value: Option<usize>) -> Result<()> {
        value.map_or(Ok(()), |v| self.check(v))
    }

    fn range(&self) -> String {
        format!(
            "must be a whole number of at least {} ({})",
            self.min, self.why
        )
    }

    /// A command-line value: a whole number no smaller than the minimum (a negative number
    /// gets the same explanation).
    pub fn parse(&self, s: &str) -> std::result::Result<usize, String> {
        match s.trim().parse::<usize>() {
            Ok(v) if v >= self.min => Ok(v),
            _ => Err(self.range()),
        }
    }

    /// [`AtLeast::parse`] as a clap value parser.
    pub fn parser(
        self,
    ) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone + Send + Sync {
        move |s| self.parse(s)
    }
}

/// `--batch-size` (every command that runs the model, and `train`).
pub const BATCH_SIZE: AtLeast = AtLeast {
    flag: "batch-size",
    min: 1,
    why: "a batch holds at least one sequence",
};
/// `--max-len` (and `train --n-positions`, the same windows).
pub const MAX_LEN: AtLeast = AtLeast {
    flag: "max-len",
    min: 2,
    why: "a window needs two tokens to have a next-token loss",
};
/// `--top-k`.
pub const TOP_K: AtLeast = AtLeast {
    flag: "top-k",
    min: 1,
    why: "an empty list answers nothing",
};
/// `score --prefilter`.
pub const PREFILTER: AtLeast = AtLeast {
    flag: "prefilter",
    min: 1,
    why: "a query with no candidate has nothing to score",
};
/// `fit --seeds`.
pub const SEEDS: AtLeast = AtLeast {
    flag: "seeds",
    min: 1,
    why: "one fit is the seed's own",
};
/// `score --refine-batch`.
pub const REFINE_BATCH: AtLeast = AtLeast {
    flag: "refine-batch",
    min: 1,
    why: "the Gauss-Newton products average over at least one training sequence",
};
/// `--checkpoint-every`.
pub const CHECKPOINT_EVERY: AtLeast = AtLeast {
    flag: "checkpoint-every",
    min: 1,
    why: "the state is saved after whole sequences",
};
/// `--threads`.
pub const THREADS: AtLeast = AtLeast {
    flag: "threads",
    min: 1,
    why: "a run needs a core",
};
/// `inspect --n-queries`, `bench --query-counts`.
pub const N_QUERIES: AtLeast = AtLeast {
    flag: "n-queries",
    min: 1,
    why: "a score estimate needs a query",
};
/// `bench --rss-scales`.
pub const RSS_SCALE: AtLeast = AtLeast {
    flag: "rss-scales",
    min: 1,
    why: "the corpus is repeated a whole number of times",
};
/// `report --max-tokens`.
pub const MAX_TOKENS: AtLeast = AtLeast {
    flag: "max-tokens",
    min: 1,
    why: "a sequence shown with no token says nothing",
};
/// `train --vocab-size`.
pub const VOCAB_SIZE: AtLeast = AtLeast {
    flag: "vocab-size",
    min: 257,
    why: "the 256 bytes and <|endoftext|>",
};
/// `train --n-embd`.
pub const N_EMBD: AtLeast = AtLeast {
    flag: "n-embd",
    min: 1,
    why: "the residual stream needs a width",
};
/// `train --n-layer`.
pub const N_LAYER: AtLeast = AtLeast {
    flag: "n-layer",
    min: 1,
    why: "a model with no transformer block has no layer to fit",
};
/// `train --n-head`.
pub const N_HEAD: AtLeast = AtLeast {
    flag: "n-head",
    min: 1,
    why: "attention needs a head",
};
/// `train --n-positions`: the training windows, as `--max-len`.
pub const N_POSITIONS: AtLeast = AtLeast {
    flag: "n-positions",
    min: 2,
    why: "a window needs two tokens to have a next-token loss",
};
/// `--epochs`.
pub const EPOCHS: AtLeast = AtLeast {
    flag: "epochs",
    min: 1,
    why: "training needs a pass over the data",
};
/// `validate lds --subsets`.
pub const SUBSETS: AtLeast = AtLeast {
    flag: "subsets",
    min: 2,
    why: "a rank correlation needs two retrained models",
};

/// A command-line number that must be finite and above zero (`--lr`).
pub fn parse_positive(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err("must be a number above 0".into()),
    }
}

/// A command-line number that must be finite and not negative (`--weight-decay`).
pub fn parse_non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err("must be a number of at least 0".into()),
    }
}

/// A command-line fraction above 0 and at most 1 (`validate lds --fraction`: a subset of no
/// sequence trains nothing).
pub fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err("must be a number above 0 and at most 1".into()),
    }
}

/// A fixed damping must be a finite number of at least 0 (the command line's parser already
/// refuses others; library callers build the value themselves).
fn check_damping(damping: Damping) -> Result<()> {
    match damping {
        Damping::Fixed(x) if !(x.is_finite() && x >= 0.0) => Err(Error::usage(format!(
            "--damping {x}: must be `heuristic` or a number of at least 0"
        ))),
        _ => Ok(()),
    }
}

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
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", value_parser = MAX_LEN.parser()))]
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "B", value_parser = BATCH_SIZE.parser())
    )]
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Seed of the labels sampled for the true Fisher.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0, value_name = "S"))]
    #[serde(default)]
    pub seed: u64,
    /// Also fit K − 1 more times with seeds S+1..S+K−1 (sampled Fisher), into OUT/seeds/SEED/:
    /// `score` then measures how stable each query's top-k is across the K fits
    /// (stability.json); OUT itself holds the seed-S fit.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1, value_name = "K", value_parser = SEEDS.parser()))]
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub seeds: usize,
    /// Which column (or JSONL field) of the corpus holds each document.
    #[cfg_attr(feature = "clap", command(flatten))]
    #[serde(flatten)]
    pub columns: Columns,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}

impl FitOptions {
    /// Every option in its range ([`Error::Usage`] naming the first one that is not).
    pub fn check(&self) -> Result<()> {
        BATCH_SIZE.check(self.batch_size)?;
        MAX_LEN.check_some(self.max_len)?;
        SEEDS.check(self.seeds)
    }
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
            seeds: 1,
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
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 10, value_name = "K", value_parser = TOP_K.parser()))]
    pub top_k: usize,
    /// Also write the full [n_queries, n_train] matrix to scores.safetensors.
    #[cfg_attr(feature = "clap", arg(long))]
    pub dense: bool,
    /// Sequences per forward/backward batch (results do not depend on it; with ekfac-refined
    /// factors, also the queries refined together, whose answers then differ in rounding).
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "B", value_parser = BATCH_SIZE.parser())
    )]
    pub batch_size: usize,
    /// Window length for the corpus [default: the one the factors were fitted with].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", value_parser = MAX_LEN.parser()))]
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
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", requires = "index", value_parser = PREFILTER.parser()))]
    pub prefilter: Option<usize>,
    /// With --prefilter: how many of the other sequences (a seeded random sample per query) are
    /// scored too, to estimate the recall of the exact top-k among the candidates
    /// (prefilter.json); 0 estimates nothing.
    #[cfg_attr(feature = "clap", arg(long, value_name = "M", default_value_t = DEFAULT_PREFILTER_SAMPLE, requires = "prefilter"))]
    #[serde(default = "default_prefilter_sample")]
    pub prefilter_sample: usize,
    /// With --prefilter: widen a query's N (doubling, up to --prefilter-max) until the lower
    /// end of the 95% interval of its estimated recall reaches R; only the new candidates (and
    /// a recall sample redrawn outside them) are scored. Says per query which N it used and
    /// whether R was reached (prefilter.json, the terminal, the report).
    #[cfg_attr(feature = "clap", arg(long, value_name = "R", requires = "prefilter"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_recall: Option<f64>,
    /// With --target-recall: the largest N a query is widened to [default: 8 × --prefilter].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", requires = "target_recall", value_parser = PREFILTER.parser()))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefilter_max: Option<usize>,
    /// With factors of `fit --seeds K`: a query whose top-k overlaps less than this across the
    /// fits (mean pairwise Jaccard index) is flagged as not stable (stability.json, the report).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = DEFAULT_STABLE_OVERLAP, value_name = "J"))]
    #[serde(
        default = "default_stable_overlap",
        skip_serializing_if = "is_default_stable_overlap"
    )]
    pub stable_overlap: f64,
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
    /// The refined inverse of `ekfac-refined` factors.
    #[cfg_attr(feature = "clap", command(flatten))]
    #[serde(flatten)]
    pub refine: RefineOptions,
}

/// How `ekfac-refined` factors' inverse is refined per query: preconditioned conjugate
/// gradient on `(G + λI) x = ∇f_q` over exact Gauss-Newton products on a seeded sample of the
/// corpus, with EK-FAC's damped inverse as the preconditioner and its answer as the start
/// (docs/math.md). Other strategies' scores ignore these.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default)]
pub struct RefineOptions {
    /// With ekfac-refined factors: conjugate-gradient iterations per query (each one
    /// Gauss-Newton product over the refine-batch sequences); 0 scores exactly as ekfac.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 5, value_name = "K"))]
    pub iterations: usize,
    /// With ekfac-refined factors: training sequences (a seeded sample of the training
    /// corpus) the Gauss-Newton products average over.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 32, value_name = "N", value_parser = REFINE_BATCH.parser()))]
    pub refine_batch: usize,
    /// With ekfac-refined factors: a query's iterations stop once its residual
    /// ‖∇f_q − (G + λI) x‖ is at most this fraction of ‖∇f_q‖.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = 1e-3, value_name = "TOL")
    )]
    pub refine_tolerance: f64,
    /// With ekfac-refined factors: seed of the sample of the training corpus.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0, value_name = "SEED"))]
    pub refine_seed: u64,
}

impl Default for RefineOptions {
    fn default() -> Self {
        RefineOptions {
            iterations: 5,
            refine_batch: 32,
            refine_tolerance: 1e-3,
            refine_seed: 0,
        }
    }
}

impl RefineOptions {
    /// Every option in its range.
    pub fn check(&self) -> Result<()> {
        REFINE_BATCH.check(self.refine_batch)?;
        if !(self.refine_tolerance.is_finite() && self.refine_tolerance >= 0.0) {
            return Err(Error::usage(format!(
                "--refine-tolerance {}: must be a number of at least 0",
                self.refine_tolerance
            )));
        }
        Ok(())
    }
}

/// Sequences sampled per query outside the pre-filter's candidates.
pub const DEFAULT_PREFILTER_SAMPLE: usize = 256;

/// `--stable-overlap`: for k = 10, two fits share fewer than about 6.7 sequences on average.
pub const DEFAULT_STABLE_OVERLAP: f64 = 0.5;

fn default_stable_overlap() -> f64 {
    DEFAULT_STABLE_OVERLAP
}

fn is_default_stable_overlap(x: &f64) -> bool {
    *x == DEFAULT_STABLE_OVERLAP
}

fn default_prefilter_sample() -> usize {
    DEFAULT_PREFILTER_SAMPLE
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

impl ScoreOptions {
    /// Every option in its range ([`Error::Usage`] naming the first one that is not).
    pub fn check(&self) -> Result<()> {
        check_damping(self.damping)?;
        TOP_K.check(self.top_k)?;
        BATCH_SIZE.check(self.batch_size)?;
        MAX_LEN.check_some(self.max_len)?;
        PREFILTER.check_some(self.prefilter)?;
        self.check_target_recall()?;
        if !(0.0..=1.0).contains(&self.stable_overlap) {
            return Err(Error::usage(format!(
                "--stable-overlap {}: must be a Jaccard index, from 0 to 1",
                self.stable_overlap
            )));
        }
        self.refine.check()?;
        if self.query_rank == QueryRank(Some(0)) {
            return Err(Error::usage(
                "--query-rank 0: must be `full` or a whole number of at least 1",
            ));
        }
        Ok(())
    }
}

impl ScoreOptions {
    /// The largest N `--target-recall` widens a query's candidates to.
    pub fn prefilter_budget(&self) -> Option<usize> {
        let n = self.prefilter?;
        Some(self.prefilter_max.unwrap_or(n.saturating_mul(8)))
    }

    fn check_target_recall(&self) -> Result<()> {
        let Some(r) = self.target_recall else {
            return match self.prefilter_max {
                Some(_) => Err(Error::usage("--prefilter-max goes with --target-recall")),
                None => Ok(()),
            };
        };
        if !(r > 0.0 && r <= 1.0) {
            return Err(Error::usage(format!(
                "--target-recall {r}: must be a recall above 0 and at most 1"
            )));
        }
        let Some(n) = self.prefilter else {
            return Err(Error::usage("--target-recall goes with --prefilter N"));
        };
        if self.prefilter_sample == 0 {
            return Err(Error::usage(
                "--target-recall needs the recall estimate: --prefilter-sample must be at least 1",
            ));
        }
        match self.prefilter_max {
            Some(max) if max < n => Err(Error::usage(format!(
                "--prefilter-max {max}: must be at least --prefilter {n}"
            ))),
            _ => Ok(()),
        }
    }
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
            prefilter_sample: DEFAULT_PREFILTER_SAMPLE,
            target_recall: None,
            prefilter_max: None,
            stable_overlap: DEFAULT_STABLE_OVERLAP,
            store: false,
            parquet: false,
            columns: Columns::default(),
            refine: RefineOptions::default(),
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
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 20, value_name = "K", value_parser = TOP_K.parser()))]
    pub top_k: usize,
    /// Sequences per forward/backward batch.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "B", value_parser = BATCH_SIZE.parser())
    )]
    pub batch_size: usize,
    /// Window length [default: the one the factors were fitted with].
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", value_parser = MAX_LEN.parser()))]
    pub max_len: Option<usize>,
    /// Which column (or JSONL field) of the corpus holds each document.
    #[cfg_attr(feature = "clap", command(flatten))]
    #[serde(flatten)]
    pub columns: Columns,
}

impl SelfInfluenceOptions {
    /// Every option in its range ([`Error::Usage`] naming the first one that is not).
    pub fn check(&self) -> Result<()> {
        check_damping(self.damping)?;
        TOP_K.check(self.top_k)?;
        BATCH_SIZE.check(self.batch_size)?;
        MAX_LEN.check_some(self.max_len)
    }
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
            hide_default_value = true,
            // `-1/2` reaches the shard's own check instead of reading as a flag.
            allow_hyphen_values = true
        )
    )]
    pub shard: Shard,
    /// Save the pass's state every M sequences [default: every 15 minutes]; rerunning the same
    /// command after a crash or kill resumes from it, with identical results.
    #[cfg_attr(feature = "clap", arg(long, value_name = "M", value_parser = CHECKPOINT_EVERY.parser()))]
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
    #[cfg_attr(feature = "clap", command(flatten))]
    pub output: OutputOptions,
}

/// What a run may do to an output directory that holds another run's output
/// ([`crate::output_dir`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct OutputOptions {
    /// Replace what --out holds (another kind of output, or one made with other settings):
    /// remove every file of the previous run there before writing. Without it such a
    /// directory is refused. Files infl did not write are never removed.
    #[cfg_attr(feature = "clap", arg(long))]
    pub overwrite: bool,
}

impl OutputOptions {
    /// Replace whatever infl output is there: what library callers that start from scratch use.
    pub const REPLACE: OutputOptions = OutputOptions { overwrite: true };
}

/// How `infl fit` and `infl score` split the tracked layers when they do not fit in memory
/// ([`crate::partition`]): a partition at a time, each with the memory of its own layers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Partitioning {
    /// Run only partition i of P of the tracked layers (contiguous, balanced by factor bytes),
    /// in OUT/work/partition-i-of-P/. Run every i, in any order or on other machines (each
    /// combines with --shard), then `infl merge OUT` joins them into what an unpartitioned
    /// run writes: the same factors, or the same scores (a score is a sum over layers).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "i/P", value_parser = parse_partition, conflicts_with_all = ["partitions", "memory_limit"])
    )]
    pub partition: Option<Partition>,
    /// Run the tracked layers in P partitions, one after another in this process, then join
    /// them: the memory of the largest partition, for P passes over the corpus.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "P", value_parser = PARTITIONS.parser(), conflicts_with = "memory_limit")
    )]
    pub partitions: Option<usize>,
    /// As --partitions, with the fewest partitions whose estimated peak (`infl inspect`'s
    /// estimate) fits in this much memory: bytes, or with a unit (800M, 16G, 1.5T).
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "BYTES", value_parser = parse_bytes)
    )]
    pub memory_limit: Option<u64>,
}

/// At least one partition.
pub const PARTITIONS: AtLeast = AtLeast {
    flag: "partitions",
    min: 1,
    why: "the layers go into at least one partition",
};

impl Partitioning {
    pub fn is_none(&self) -> bool {
        *self == Partitioning::default()
    }

    pub fn check(&self) -> Result<()> {
        PARTITIONS.check_some(self.partitions)?;
        if let Some(p) = self.partition {
            Partition::new(p.index, p.count)?;
        }
        if self.memory_limit == Some(0) {
            return Err(Error::usage("--memory-limit must be positive"));
        }
        Ok(())
    }
}

#[cfg(feature = "clap")]
fn parse_partition(s: &str) -> std::result::Result<Partition, String> {
    Partition::parse(s).map_err(|e| e.to_string())
}

/// Bytes with an optional binary unit: `123`, `800M`, `16G`, `1.5T` (K, M, G, T are powers of
/// 1024; a trailing `B` or `iB` is allowed).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let upper = s.trim().to_ascii_uppercase();
    let t = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (number, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, ' '),
    };
    let scale = match unit {
        ' ' => 1u64,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => return Err(format!("`{s}`: expected bytes, e.g. 800M, 16G")),
    };
    let x: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected bytes, e.g. 800M, 16G"))?;
    if !(x.is_finite() && x > 0.0) {
        return Err(format!("`{s}`: expected a positive size"));
    }
    Ok((x * scale as f64) as u64)
}

/// Seconds between saved states when `checkpoint_every` is not given.
pub const CHECKPOINT_SECONDS: f64 = 900.0;

impl RunOptions {
    /// One unsharded run from scratch that never saves its state and replaces the output in
    /// its directory: what library callers (the demo, the validations) use.
    pub const ONCE: RunOptions = RunOptions {
        shard: Shard::WHOLE,
        checkpoint_every: None,
        fresh: true,
        memory_check: true,
        checkpoint_seconds: f64::INFINITY,
        output: OutputOptions::REPLACE,
    };

    /// Every option in its range ([`Error::Usage`] naming the first one that is not).
    pub fn check(&self) -> Result<()> {
        CHECKPOINT_EVERY.check_some(self.checkpoint_every)?;
        Shard::new(self.shard.index, self.shard.count)
            .map(|_| ())
            .map_err(|e| Error::usage(e.to_string()))
    }

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

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn memory_limits_parse_with_binary_units() {
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("800M"), Ok(800 << 20));
        assert_eq!(parse_bytes("16G"), Ok(16 << 30));
        assert_eq!(parse_bytes("16GiB"), Ok(16 << 30));
        assert_eq!(parse_bytes("16gb"), Ok(16 << 30));
        assert_eq!(parse_bytes("1.5T"), Ok(3 << 39));
        for bad in ["", "x", "0", "-1G", "16Q", "nanG"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_options_type_refuses_values_out_of_range_as_usage_errors() {
        let usage = |r: Result<()>, flag: &str| match r {
            Err(Error::Usage(m)) => assert!(m.contains(flag), "{m}"),
            other => panic!("{flag}: {other:?}"),
        };
        for max_len in [0, 1] {
            let fit = FitOptions {
                max_len: Some(max_len),
                ..FitOptions::default()
            };
            usage(fit.check(), "--max-len");
        }
        assert!(FitOptions {
            max_len: Some(2),
            ..FitOptions::default()
        }
        .check()
        .is_ok());
        let score = |o: ScoreOptions| o.check();
        usage(
            score(ScoreOptions {
                top_k: 0,
                ..ScoreOptions::default()
            }),
            "--top-k",
        );
        usage(
            score(ScoreOptions {
                refine: RefineOptions {
                    refine_batch: 0,
                    ..RefineOptions::default()
                },
                ..ScoreOptions::default()
            }),
            "--refine-batch",
        );
        usage(
            score(ScoreOptions {
                refine: RefineOptions {
                    refine_tolerance: -1.0,
                    ..RefineOptions::default()
                },
                ..ScoreOptions::default()
            }),
            "--refine-tolerance",
        );
        usage(
            score(ScoreOptions {
                prefilter: Some(0),
                ..ScoreOptions::default()
            }),
            "--prefilter",
        );
        usage(
            score(ScoreOptions {
                damping: Damping::Fixed(-1.0),
                ..ScoreOptions::default()
            }),
            "--damping",
        );
        usage(
            SelfInfluenceOptions {
                batch_size: 0,
                ..SelfInfluenceOptions::default()
            }
            .check(),
            "--batch-size",
        );
        usage(
            RunOptions {
                shard: Shard { index: 3, count: 2 },
                ..RunOptions::ONCE
            }
            .check(),
            "--shard",
        );
        usage(
            RunOptions {
                checkpoint_every: Some(0),
                ..RunOptions::ONCE
            }
            .check(),
            "--checkpoint-every",
        );
        assert!(ScoreOptions::default().check().is_ok());
        assert!(RunOptions::ONCE.check().is_ok());
        // The command line's parser gives the same range.
        assert_eq!(MAX_LEN.parse("2"), Ok(2));
        assert!(MAX_LEN.parse("-1").unwrap_err().contains("at least 2"));
        assert!(parse_fraction("0").is_err() && parse_fraction("1").is_ok());
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
                output: OutputOptions::default(),
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
