//! The worker thread that owns the [`QueryEngine`]: it takes requests from the bounded queue
//! in arrival order, and scores the influence queries it finds waiting together in one pass
//! (grouped by the options a pass shares), each answer cut to its own `top_k`.

use crate::metrics::Metrics;
use crate::progress::PassProgress;
use crate::ServeConfig;
use infl::workflow::{Answer, QueryEngine, QueryOptions, Sampling};
use infl::Error;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What the worker answers with: a JSON body, or the library's error.
pub type Reply = std::result::Result<serde_json::Value, Error>;

/// An influence request, parsed as far as the HTTP side can without the tokenizer.
#[derive(Debug)]
pub struct InfluenceRequest {
    pub id: String,
    /// The query's own fields (`prompt`, `completion`, `messages`, `*_ids`).
    pub fields: serde_json::Map<String, serde_json::Value>,
    pub options: QueryOptions,
}

pub enum Job {
    Influence(InfluenceRequest, oneshot::Sender<Reply>),
    Generate(String, Sampling, oneshot::Sender<Reply>),
    Sequence(String, oneshot::Sender<Reply>),
}

/// Starts the worker; the queue's sender is the server's way in.
pub fn start(
    engine: QueryEngine,
    config: &ServeConfig,
    metrics: Arc<Metrics>,
    progress: Arc<PassProgress>,
) -> (mpsc::Sender<Job>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.queue);
    let max_batch = config.max_batch;
    let handle = std::thread::spawn(move || {
        Worker {
            engine,
            metrics,
            progress,
            max_batch,
        }
        .run(rx)
    });
    (tx, handle)
}

struct Worker {
    engine: QueryEngine,
    metrics: Arc<Metrics>,
    progress: Arc<PassProgress>,
    max_batch: usize,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut held: VecDeque<Job> = VecDeque::new();
        loop {
            let first = match held.pop_front() {
                Some(job) => job,
                None => match rx.blocking_recv() {
                    Some(job) => {
                        self.metrics.dequeued(1);
                        job
                    }
                    None => return,
                },
            };
            self.progress.set_busy(true);
            self.handle(first, &mut rx, &mut held);
            self.progress.set_busy(false);
        }
    }

    /// One job, and the influence queries waiting with it.
    fn handle(&mut self, first: Job, rx: &mut mpsc::Receiver<Job>, held: &mut VecDeque<Job>) {
        match first {
            Job::Influence(request, reply) => {
                let mut batch = vec![(request, reply)];
                // Everything already waiting: influence queries join this pass, the rest
                // keep their turn.
                while batch.len() < self.max_batch {
                    let next = match held.pop_front() {
                        Some(job) => job,
                        None => match rx.try_recv() {
                            Ok(job) => {
                                self.metrics.dequeued(1);
                                job
                            }
                            Err(_) => break,
                        },
                    };
                    match next {
                        Job::Influence(r, s) => batch.push((r, s)),
                        other => held.push_back(other),
                    }
                }
                self.influence(batch);
            }
            Job::Generate(prompt, sampling, reply) => {
                let r = self.engine.generate(&prompt, sampling).map(|(text, ids)| {
                        serde_json::json!({"prompt": prompt, "completion": text, "completion_ids": ids})
                    });
                let _ = reply.send(r);
            }
            Job::Sequence(id, reply) => {
                // Null: no such sequence (404).
                let r = self
                    .engine
                    .sequence(&id)
                    .map(|found| serde_json::json!(found));
                let _ = reply.send(r);
            }
        }
    }

    /// Scores a batch of influence requests: each parsed on its own (a bad one fails alone),
    /// then one pass per group of requests that share a pass's options.
    fn influence(&mut self, batch: Vec<(InfluenceRequest, oneshot::Sender<Reply>)>) {
        let mut groups: Vec<(QueryOptions, Vec<Parsed>)> = Vec::new();
        // A request whose client has gone (disconnected, or timed out while it waited) is
        // not scored: nobody would read the answer.
        let batch = batch.into_iter().filter(|(_, reply)| !reply.is_closed());
        for (i, (request, reply)) in batch.enumerate() {
            // A batch-unique id: the scoring pass keys its rows by query id.
            let query = match self
                .engine
                .parse_query(format!("#{i}"), &request.fields, "request")
            {
                Ok(q) => q,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    continue;
                }
            };
            let key = QueryOptions {
                top_k: 0,
                ..request.options
            };
            let parsed = Parsed {
                query,
                request,
                reply,
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(parsed),
                None => groups.push((key, vec![parsed])),
            }
        }
        for (key, members) in groups {
            self.score_group(key, members);
        }
    }

    /// One pass for requests with the same options (the largest `top_k` of them). When the
    /// pass fails, each request is retried alone, so that one bad query fails only itself.
    fn score_group(&mut self, key: QueryOptions, members: Vec<Parsed>) {
        let top_k = members.iter().map(|m| m.request.options.top_k).max();
        let options = QueryOptions {
            top_k: top_k.unwrap_or(1),
            ..key
        };
        let queries: Vec<_> = members.iter().map(|m| m.query.clone()).collect();
        let started = std::time::Instant::now();
        match self
            .engine
            .answer(&queries, options, self.progress.as_ref())
        {
            Ok(answers) => {
                self.metrics.batch(members.len(), started.elapsed());
                let provenance = serde_json::json!(self.engine.provenance());
                let n = members.len();
                for (m, a) in members.into_iter().zip(answers) {
                    let body = answer_json(a, &m.request, &provenance, n);
                    let _ = m.reply.send(Ok(body));
                }
            }
            Err(e) if members.len() == 1 => {
                if let Some(m) = members.into_iter().next() {
                    let _ = m.reply.send(Err(e));
                }
            }
            Err(_) => {
                for m in members {
                    let own = m.request.options;
                    self.score_group(own, vec![m]);
                }
            }
        }
    }
}

struct Parsed {
    query: infl::data::Query,
    request: InfluenceRequest,
    reply: oneshot::Sender<Reply>,
}

/// The answer's JSON under the request's own id, cut to its own `top_k`.
fn answer_json(
    mut a: Answer,
    request: &InfluenceRequest,
    provenance: &serde_json::Value,
    batch: usize,
) -> serde_json::Value {
    let k = request.options.top_k;
    a.top.truncate(k);
    a.bottom.truncate(k);
    a.id = request.id.clone();
    a.distribution.query_id = request.id.clone();
    for row in a.top.iter_mut().chain(a.bottom.iter_mut()) {
        row.query_id = request.id.clone();
    }
    let mut body = serde_json::json!(a);
    if let Some(obj) = body.as_object_mut() {
        obj.insert("provenance".into(), provenance.clone());
        obj.insert("options".into(), serde_json::json!(request.options));
        obj.insert("batch_size".into(), serde_json::json!(batch));
    }
    body
}
