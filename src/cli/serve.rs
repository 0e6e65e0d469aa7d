//! `infl serve`'s arguments and the call into `infl_serve::run`: the server itself (routes,
//! queue, page) lives in the `infl-serve` crate.

use infl::influence::Damping;
use infl::options::{self as o, Columns, Compute, ScoreOptions};
use infl::workflow::{EngineConfig, QueryEngine};
use infl_serve::ServeConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

const QUEUE: o::AtLeast = o::AtLeast {
    flag: "queue",
    min: 1,
    why: "a server with no queue answers nothing",
};
const MAX_BATCH: o::AtLeast = o::AtLeast {
    flag: "max-batch",
    min: 1,
    why: "a pass scores at least one query",
};
const REQUEST_TIMEOUT: o::AtLeast = o::AtLeast {
    flag: "request-timeout",
    min: 1,
    why: "a request needs time to be answered",
};
const MAX_BODY: o::AtLeast = o::AtLeast {
    flag: "max-body",
    min: 64,
    why: "a request needs room for its query",
};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The checkpoint directory the factors were fitted on.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// A factors directory written by `infl fit`; with a gradient store (`fit --store`) queries
    /// are answered from it, with no pass over the corpus.
    #[arg(long, value_name = "FACTORS")]
    pub factors: PathBuf,
    /// The training corpus (the one the store was written from; streamed per query without a
    /// store), as for `infl score`.
    #[arg(long, value_name = "CORPUS")]
    pub train: PathBuf,
    #[command(flatten)]
    pub columns: Columns,
    /// Stream the corpus for every query even when the factors have a gradient store.
    #[arg(long)]
    pub no_store: bool,
    /// A BM25 index of the corpus (`infl index`): requests may then ask `"prefilter": N` to
    /// score only their N best lexical matches.
    #[arg(long, value_name = "INDEX")]
    pub index: Option<PathBuf>,
    /// Address to listen on. Anything but loopback needs --token.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "IP:PORT")]
    pub addr: SocketAddr,
    /// Bearer token the API requests must carry (`Authorization: Bearer TOKEN`); required to
    /// listen beyond this machine. The page and /healthz stay open.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Damping added to the eigenvalues, fixed for the server's life: `heuristic` or a number.
    #[arg(long, default_value_t = Damping::Heuristic, value_name = "heuristic|X")]
    pub damping: Damping,
    /// Sequences per forward/backward batch.
    #[arg(long, default_value_t = o::DEFAULT_BATCH_SIZE, value_name = "B", value_parser = o::BATCH_SIZE.parser())]
    pub batch_size: usize,
    /// Window length for the corpus [default: the one the factors were fitted with].
    #[arg(long, value_name = "N", value_parser = o::MAX_LEN.parser())]
    pub max_len: Option<usize>,
    /// Requests that may wait; one more is answered 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = QUEUE.parser())]
    pub queue: usize,
    /// Influence queries scored together in one pass, at most.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = MAX_BATCH.parser())]
    pub max_batch: usize,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES", value_parser = MAX_BODY.parser())]
    pub max_body: usize,
    /// Largest top_k a request may ask for.
    #[arg(long, default_value_t = 1000, value_name = "K", value_parser = o::TOP_K.parser())]
    pub max_top_k: usize,
    /// Longest a request may take, in seconds, its wait in the queue included: it is then
    /// answered 408, and dropped unscored if it was still waiting. Without a store a query
    /// streams the whole corpus: give this room for that pass.
    #[arg(long, default_value_t = 600, value_name = "SECONDS", value_parser = REQUEST_TIMEOUT.parser())]
    pub request_timeout: usize,
}

impl ServeArgs {
    pub fn into_config(self) -> ServeConfig {
        let store = !self.no_store && QueryEngine::factors_have_store(&self.factors);
        ServeConfig {
            engine: EngineConfig {
                model: self.model,
                factors: self.factors,
                train: self.train,
                options: ScoreOptions {
                    damping: self.damping,
                    batch_size: self.batch_size,
                    max_len: self.max_len,
                    store,
                    columns: self.columns,
                    ..ScoreOptions::default()
                },
                compute: self.compute,
                index: self.index,
            },
            addr: self.addr,
            token: self.token,
            queue: self.queue,
            max_batch: self.max_batch,
            max_body: self.max_body,
            max_top_k: self.max_top_k,
            request_timeout: std::time::Duration::from_secs(self.request_timeout as u64),
        }
    }
}
