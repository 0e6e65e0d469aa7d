//! Results stage: scores are reduced on the fly to what people read — per query the top-k and
//! bottom-k sequences (with per-layer parts), running statistics of the whole distribution and
//! its largest-magnitude tails — so memory does not grow with the corpus. The dense matrix, when
//! asked for, goes to disk a row-chunk at a time.

//!
//! One typed schema, read and written here: [`schema`] holds the records of the files
//! (`top_k.jsonl`, `distribution.json`, `layers.json`) and [`meta`] those of `meta.json`;
//! [`summary`] reduces the scores, [`write`] and [`dense`] write the files and [`read`] reads
//! a results directory back for `infl report` and `infl compare`; [`units`] turns scores into
//! predicted changes of −log p and percentiles.

mod dense;
pub mod meta;
pub mod parquet;
pub mod parts;
mod prefilter;
mod read;
mod schema;
pub mod stability;
mod summary;
mod text;
mod units;
mod write;

pub use dense::{write_dense_from_shards, DenseWriter};
pub use prefilter::{
    estimate, estimates, sample_rest, write_prefilter, PrefilterFile, PrefilterRecall, Widening,
};
pub use read::{QueryInfo, Results};
pub use schema::{Direction, Distribution, LayerTotals, TokenPart, TopEntry, TAIL_SIZE};
pub use stability::{SequenceStability, StabilityFile};
pub use summary::{
    Candidate, MagnitudeSketch, Prefilter, QuerySummary, ScoreAccumulator,
    SKETCH_BUCKETS_PER_OCTAVE,
};
pub use text::top_sources_text;
pub use units::{RemovalScale, REMOVAL_CONVENTION};
pub use write::{entries, write_distribution, write_layers, write_top_k};
