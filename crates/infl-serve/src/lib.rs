//! `infl serve`: an attribution server over the `infl` library. It loads a model, its factors
//! and (when `fit --store` wrote one) its gradient store once ([`infl::workflow::QueryEngine`])
//! and answers over HTTP: `POST /v1/influence`, `POST /v1/generate`, `GET /v1/sequence/{id}`,
//! `GET /v1/progress`, `GET /healthz`, `GET /metrics`, and a self-contained web page at `/`.
//!
//! One worker thread owns the engine; requests wait in a bounded queue ([`worker`]) and the
//! influence queries found waiting together are scored in one pass. The HTTP side ([`api`]) is
//! axum on tokio; it never runs the model itself.

mod api;
mod metrics;
mod progress;
mod worker;

use infl::workflow::{EngineConfig, QueryEngine};
use infl::{Error, Result};
use std::net::SocketAddr;
use std::sync::Arc;

/// How `infl serve` runs: the engine's inputs, where it listens, its limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub engine: EngineConfig,
    pub addr: SocketAddr,
    /// Bearer token every API request must carry; required to listen beyond loopback.
    pub token: Option<String>,
    /// Requests that may wait for the worker; one more is refused with 503 + Retry-After.
    pub queue: usize,
    /// Influence queries scored together in one pass, at most.
    pub max_batch: usize,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Largest `top_k` a request may ask for.
    pub max_top_k: usize,
    /// Longest a request may take, waiting in the queue included; it then gets 408 and, if it
    /// is still waiting, is dropped unscored.
    pub request_timeout: std::time::Duration,
}

impl ServeConfig {
    /// Refuses settings the server must not start with: a listener beyond loopback without a
    /// token (anyone on the network could read the corpus), a zero queue or batch.
    pub fn check(&self) -> Result<()> {
        if !self.addr.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            return Err(Error::usage(format!(
                "--addr {} listens beyond this machine: give --token SECRET (clients send `Authorization: Bearer SECRET`), or listen on 127.0.0.1",
                self.addr
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::usage("--request-timeout must be at least 1 second"));
        }
        for (name, v) in [
            ("--queue", self.queue),
            ("--max-batch", self.max_batch),
            ("--max-body", self.max_body),
            ("--max-top-k", self.max_top_k),
        ] {
            if v == 0 {
                return Err(Error::usage(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// Loads the engine, listens, and serves until SIGTERM or Ctrl-C; requests in flight then
/// finish before it returns.
pub fn run(config: ServeConfig) -> Result<()> {
    config.check()?;
    let engine = QueryEngine::open(config.engine.clone())?;
    let metrics = Arc::new(metrics::Metrics::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))?;
    let about = serde_json::json!(engine.provenance());
    let progress = Arc::new(progress::PassProgress::default());
    let (queue, worker) = worker::start(engine, &config, metrics.clone(), progress.clone());
    let served = runtime.block_on(api::serve(&config, queue, metrics, progress, about));
    // The queue's last sender went with the server: the worker finishes what it holds and ends.
    let _ = worker.join();
    served
}
