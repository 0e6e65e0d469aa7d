//! The HTTP side: routes, request checks (each error names its field, as JSON), bearer auth,
//! the body-size limit, the hand-off to the worker's bounded queue (503 + Retry-After when
//! full), request metrics, and graceful shutdown on SIGTERM or Ctrl-C.

use crate::metrics::Metrics;
use crate::progress::PassProgress;
use crate::worker::{InfluenceRequest, Job, Reply};
use crate::ServeConfig;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use infl::options::{Normalize, QueryRank};
use infl::workflow::{QueryOptions, Sampling};
use infl::Error;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// The page at `/`: one file, inline script and style, no external assets.
const PAGE: &str = include_str!("page.html");

/// Longest continuation `POST /v1/generate` makes.
const MAX_GENERATE: usize = 256;

/// Fields of an influence request that are options, not the query's own.
const OPTION_FIELDS: &[&str] = &[
    "id",
    "top_k",
    "normalize",
    "query_rank",
    "per_token",
    "prefilter",
];

/// Largest `prefilter` a request may ask for (more candidates than that is the whole corpus of
/// any store a server answers from in seconds).
const MAX_PREFILTER: usize = 1 << 24;

#[derive(Clone)]
struct App {
    queue: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    progress: Arc<PassProgress>,
    token: Option<Arc<str>>,
    max_top_k: usize,
    /// The engine's provenance, for `/healthz`.
    about: Arc<Value>,
}

/// Binds `config.addr` and serves until a shutdown signal; in-flight requests finish first.
pub async fn serve(
    config: &ServeConfig,
    queue: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    progress: Arc<PassProgress>,
    about: Value,
) -> infl::Result<()> {
    let app = App {
        queue,
        metrics,
        progress,
        token: config.token.as_deref().map(Arc::from),
        max_top_k: config.max_top_k,
        about: Arc::new(about),
    };
    let router = Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/influence", post(influence))
        .route("/v1/generate", post(generate))
        .route("/v1/sequence/{id}", get(sequence))
        .route("/v1/progress", get(progress_view))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(config.max_body))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            config.max_body,
        ))
        // Inside the guard, so that a timed-out request is counted with its 408.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| Error::Other(format!("cannot listen on {}: {e}", config.addr)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("cannot listen on {}: {e}", config.addr)))?;
    eprintln!("infl serve: listening on http://{bound}");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| Error::Other(format!("server stopped: {e}")))?;
    eprintln!("infl serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Every request: the bearer token where one is set (the page and `/healthz` are open), then
/// its status and latency counted.
async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path();
    let route = route_label(path);
    let open = path == "/" || path == "/healthz";
    let response = match &app.token {
        Some(token) if !open && !authorized(request.headers(), token) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send `Authorization: Bearer TOKEN` (the server's --token)",
        )
        .into_response(),
        _ => next.run(request).await,
    };
    app.metrics
        .request(route, response.status().as_u16(), started.elapsed());
    response
}

/// The route a path belongs to, for the metrics' labels (sequence ids are not labels).
fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/healthz" => "/healthz",
        "/metrics" => "/metrics",
        "/v1/influence" => "/v1/influence",
        "/v1/generate" => "/v1/generate",
        "/v1/progress" => "/v1/progress",
        p if p.starts_with("/v1/sequence/") => "/v1/sequence/{id}",
        _ => "other",
    }
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in full whatever the first difference, so timing does not tell the prefix.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page loads nothing from elsewhere and talks only to this server.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        PAGE,
    )
        .into_response()
}

async fn healthz(State(app): State<App>) -> Response {
    Json(json!({"status": "ok", "provenance": *app.about})).into_response()
}

async fn metrics_text(State(app): State<App>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "no such route: see docs/serve.md").into_response()
}

async fn influence(State(app): State<App>, body: Result<Json<Value>, JsonRejection>) -> Response {
    let request = match body
        .map_err(ApiError::from)
        .and_then(|Json(v)| influence_request(v, app.max_top_k))
    {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    submit(&app, |reply| Job::Influence(request, reply)).await
}

async fn generate(State(app): State<App>, body: Result<Json<Value>, JsonRejection>) -> Response {
    let (prompt, sampling) = match body
        .map_err(ApiError::from)
        .and_then(|Json(v)| generate_request(v))
    {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    submit(&app, |reply| Job::Generate(prompt, sampling, reply)).await
}

/// How far the worker's current pass has got (the page polls it while a query is scored).
async fn progress_view(State(app): State<App>) -> Response {
    Json(json!(app.progress.view())).into_response()
}

async fn sequence(State(app): State<App>, Path(id): Path<String>) -> Response {
    let shown = id.clone();
    let response = submit(&app, |reply| Job::Sequence(id, reply)).await;
    match response.status() {
        StatusCode::NOT_FOUND => ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no training sequence with id `{shown}` (ids as the influence answers give them)"
            ),
        )
        .into_response(),
        _ => response,
    }
}

/// Queues a job for the worker and waits for its reply; 503 with Retry-After when the queue
/// is full (never an unbounded backlog).
async fn submit(app: &App, job: impl FnOnce(oneshot::Sender<Reply>) -> Job) -> Response {
    let (tx, rx) = oneshot::channel();
    app.metrics.enqueued();
    if let Err(e) = app.queue.try_send(job(tx)) {
        app.metrics.dequeued(1);
        let why = match e {
            mpsc::error::TrySendError::Full(_) => "the queue is full; retry shortly",
            mpsc::error::TrySendError::Closed(_) => "the server is shutting down",
        };
        let mut r = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    }
    match rx.await {
        Ok(Ok(Value::Null)) => {
            // The worker's "not found" (a sequence id); the route words the message.
            StatusCode::NOT_FOUND.into_response()
        }
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the worker stopped before answering",
        )
        .into_response(),
    }
}

/// An influence request's options checked (each error names its field); the query's own
/// fields are checked by the worker, which holds the tokenizer.
fn influence_request(body: Value, max_top_k: usize) -> Result<InfluenceRequest, ApiError> {
    let Value::Object(mut obj) = body else {
        return Err(ApiError::bad("the body must be a JSON object"));
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => "query".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(ApiError::field(
                "id",
                "field `id` must be a string or number",
            ))
        }
    };
    let top_k = integer(&obj, "top_k", 10, 1, max_top_k)?;
    let normalize = match obj.get("normalize") {
        None | Some(Value::Null) => Normalize::None,
        Some(Value::String(s)) if s == "none" => Normalize::None,
        Some(Value::String(s)) if s == "cosine" => Normalize::Cosine,
        Some(_) => {
            return Err(ApiError::field(
                "normalize",
                "field `normalize` must be \"none\" or \"cosine\"",
            ))
        }
    };
    let query_rank = match obj.get("query_rank") {
        None | Some(Value::Null) => QueryRank::FULL,
        Some(Value::String(s)) if s == "full" => QueryRank::FULL,
        Some(_) => QueryRank(Some(integer(&obj, "query_rank", 1, 1, 1 << 20)?)),
    };
    let per_token = match obj.get("per_token") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::field(
                "per_token",
                "field `per_token` must be true or false",
            ))
        }
    };
    let prefilter = match obj.get("prefilter") {
        None | Some(Value::Null) => None,
        Some(_) => Some(integer(&obj, "prefilter", 1, 1, MAX_PREFILTER)?),
    };
    for f in OPTION_FIELDS {
        obj.remove(*f);
    }
    Ok(InfluenceRequest {
        id,
        fields: obj,
        options: QueryOptions {
            top_k,
            normalize,
            query_rank,
            per_token,
            prefilter,
        },
    })
}

fn generate_request(body: Value) -> Result<(String, Sampling), ApiError> {
    let Value::Object(obj) = body else {
        return Err(ApiError::bad("the body must be a JSON object"));
    };
    for key in obj.keys() {
        if !["prompt", "max_tokens", "temperature", "seed"].contains(&key.as_str()) {
            return Err(ApiError::field(
                key,
                format!("unknown field `{key}` (expected prompt, max_tokens, temperature, seed)"),
            ));
        }
    }
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(ApiError::field(
                "prompt",
                "field `prompt` must be a non-empty string",
            ))
        }
    };
    let max_tokens = integer(&obj, "max_tokens", 32, 1, MAX_GENERATE)?;
    let temperature = match obj.get("temperature") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite() && (0.0..=100.0).contains(t))
            .ok_or_else(|| {
                ApiError::field(
                    "temperature",
                    "field `temperature` must be a number from 0 (greedy) to 100",
                )
            })?,
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            ApiError::field("seed", "field `seed` must be a non-negative integer")
        })?,
    };
    Ok((
        prompt,
        Sampling {
            max_tokens,
            temperature,
            seed,
        },
    ))
}

/// An optional integer field in `lo..=hi`.
fn integer(
    obj: &Map<String, Value>,
    name: &str,
    default: usize,
    lo: usize,
    hi: usize,
) -> Result<usize, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| {
                ApiError::field(
                    name,
                    format!("field `{name}` must be an integer from {lo} to {hi}"),
                )
            }),
    }
}

/// An error answer: `{"error": {"status", "message", "field"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError {
            status,
            field: named_field(&message),
            message,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

/// The field a library message names (its messages say "field `NAME`").
fn named_field(message: &str) -> Option<String> {
    let rest = message.split("field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(
            e.status(),
            format!("unreadable request body: {}", e.body_text()),
        )
    }
}

impl From<Error> for ApiError {
    /// Bad input is the client's (400); a non-finite loss, data that does not belong together
    /// and anything else are the server's (500).
    fn from(e: Error) -> Self {
        let status = match e {
            Error::Input(_) | Error::Usage(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let kind = match e {
            Error::NonFinite(_) => "non-finite: ",
            _ => "",
        };
        ApiError::new(status, format!("{kind}{e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "status": self.status.as_u16(),
            "message": self.message,
            "field": self.field,
        }});
        (self.status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_named_and_the_query_fields_pass_through() {
        let r = influence_request(
            json!({"prompt": "a", "completion": "b", "top_k": 3, "normalize": "cosine", "query_rank": 8, "prefilter": 20}),
            100,
        )
        .unwrap();
        assert_eq!(r.options.top_k, 3);
        assert_eq!(r.options.normalize, Normalize::Cosine);
        assert_eq!(r.options.query_rank, QueryRank(Some(8)));
        assert_eq!(r.options.prefilter, Some(20));
        assert_eq!(
            r.fields.keys().collect::<Vec<_>>(),
            ["completion", "prompt"]
        );
        for (body, field) in [
            (json!({"top_k": 0}), "top_k"),
            (json!({"top_k": 101}), "top_k"),
            (json!({"top_k": "5"}), "top_k"),
            (json!({"normalize": "l2"}), "normalize"),
            (json!({"query_rank": -1}), "query_rank"),
            (json!({"per_token": 1}), "per_token"),
            (json!({"prefilter": 0}), "prefilter"),
            (json!({"prefilter": "all"}), "prefilter"),
            (json!({"id": [1]}), "id"),
        ] {
            let e = influence_request(body, 100).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.field.as_deref(), Some(field));
        }
        assert!(influence_request(json!([1]), 100).is_err());
    }

    #[test]
    fn library_errors_keep_their_field_and_class() {
        let e = ApiError::from(Error::input("request: missing field `completion`"));
        assert_eq!(
            (e.status, e.field.as_deref()),
            (StatusCode::BAD_REQUEST, Some("completion"))
        );
        let e = ApiError::from(Error::NonFinite("loss is NaN".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.starts_with("non-finite"));
    }

    #[test]
    fn the_token_must_match_in_full() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "s3cret"));
        h.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(!authorized(&h, "s3cret"));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorized(&h, "s3cret"));
    }
}
