//! The arguments of the pipeline's stages (fit, score, self-influence): their files, and the
//! library's option types flattened (`infl::options`: each option, its default and its help
//! are defined there once), with the library jobs they become.

use infl::options::{
    Compute, FitOptions, OutputOptions, Partitioning, RunOptions, ScoreOptions,
    SelfInfluenceOptions,
};
use infl::workflow::{FitJob, ScoreJob, SelfInfluenceJob};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FitArgs {
    /// Hugging Face checkpoint directory: config.json, model.safetensors, tokenizer.json
    /// (the tokenizer is only needed when the corpus holds text rather than token ids).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// Training corpus: JSONL, one document per line, {"text": ...}, {"ids": [...]} or a
    /// conversation {"messages": [...]}; or a Hugging Face `datasets` file: Parquet, Arrow IPC
    /// (file or stream) or a save_to_disk directory, one document per row (see --text-column).
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    /// Output directory for the factors (factors.safetensors + meta.json).
    #[arg(long, value_name = "FACTORS")]
    pub out: PathBuf,
    #[command(flatten)]
    pub options: FitOptions,
    #[command(flatten)]
    pub run: RunOptions,
    #[command(flatten)]
    pub partitioning: Partitioning,
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
    /// Form of each stored gradient: `auto` keeps the per-token factors where they are smaller
    /// and cheap to rebuild (sequences of at most 16 tokens), else the rotated gradient: as
    /// fast to re-score as `rotated`; `smallest` keeps whichever is smaller on disk (slower to
    /// re-score long sequences); `rotated` always the rotated gradient (docs/store.md).
    #[arg(long, value_enum, default_value = "auto", requires = "store")]
    pub store_form: infl::store::StoreForm,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// A factors directory written by `infl fit`.
    #[arg(long, value_name = "FACTORS")]
    pub factors: PathBuf,
    /// Training corpus to score (JSONL or a table, as for fit; it may differ from the fitting
    /// corpus).
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    /// Queries, JSONL: {"id": optional, "prompt": ..., "completion": ...}, pre-tokenised
    /// {"prompt_ids": [...], "completion_ids": [...]}, or {"messages": [...]} rendered with the
    /// model's chat template (the final assistant turn is the completion); or a table (Parquet,
    /// Arrow) with the same columns.
    #[arg(long, value_name = "QUERIES")]
    pub queries: PathBuf,
    /// Output directory: top_k.jsonl, meta.json (and scores.safetensors with --dense).
    #[arg(long, value_name = "RESULTS")]
    pub out: PathBuf,
    /// An index built by `infl index` from the same corpus and --max-len.
    #[arg(long, value_name = "INDEX", requires = "prefilter")]
    pub index: Option<PathBuf>,
    #[command(flatten)]
    pub options: ScoreOptions,
    #[command(flatten)]
    pub run: RunOptions,
    #[command(flatten)]
    pub partitioning: Partitioning,
}

#[derive(clap::Args)]
pub struct SelfInfluenceArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// A factors directory written by `infl fit`.
    #[arg(long, value_name = "FACTORS")]
    pub factors: PathBuf,
    /// Training corpus (JSONL or a table, as for fit).
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    /// Output directory: self_influence.jsonl (every sequence), top_k.jsonl, distribution.json,
    /// meta.json.
    #[arg(long, value_name = "RESULTS")]
    pub out: PathBuf,
    #[command(flatten)]
    pub options: SelfInfluenceOptions,
    #[command(flatten)]
    pub output: OutputOptions,
}

impl FitArgs {
    pub fn into_job(self) -> FitJob {
        let store = self.store.then_some(infl::store::StoreOptions {
            dtype: self.store_dtype,
            form: self.store_form,
        });
        FitJob {
            model: self.model,
            train: self.train,
            out: self.out,
            options: self.options,
            run: self.run,
            compute: self.compute,
            store,
            partitioning: self.partitioning,
        }
    }
}

impl ScoreArgs {
    pub fn into_job(self) -> ScoreJob {
        ScoreJob {
            model: self.model,
            factors: self.factors,
            train: self.train,
            queries: self.queries,
            out: self.out,
            index: self.index,
            options: self.options,
            run: self.run,
            compute: self.compute,
            partitioning: self.partitioning,
        }
    }
}

impl SelfInfluenceArgs {
    pub fn into_job(self) -> SelfInfluenceJob {
        SelfInfluenceJob {
            model: self.model,
            factors: self.factors,
            train: self.train,
            out: self.out,
            options: self.options,
            compute: self.compute,
            output: self.output,
        }
    }
}
