//! The server's counters and their Prometheus text exposition (`GET /metrics`): requests by
//! route and status, a latency histogram, the queue's length, the passes and the queries they
//! scored together.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    /// (route, status) → count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Per bucket (and +Inf last) counts, sum of seconds, count.
    latency: Mutex<Histogram>,
    queued: AtomicU64,
    passes: AtomicU64,
    pass_queries: AtomicU64,
    pass_micros: AtomicU64,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route.to_string(), status)).or_default() += 1;
        }
        if let Ok(mut h) = self.latency.lock() {
            let s = took.as_secs_f64();
            let i = BUCKETS
                .iter()
                .position(|&b| s <= b)
                .unwrap_or(BUCKETS.len());
            h.counts[i] += 1;
            h.sum += s;
            h.count += 1;
        }
    }

    pub fn enqueued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dequeued(&self, n: u64) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }

    /// A scoring pass over `queries` queries that took `took`.
    pub fn batch(&self, queries: usize, took: Duration) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.pass_queries
            .fetch_add(queries as u64, Ordering::Relaxed);
        self.pass_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP infl_requests_total HTTP requests answered, by route and status."
        );
        let _ = writeln!(out, "# TYPE infl_requests_total counter");
        if let Ok(r) = self.requests.lock() {
            for ((route, status), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "infl_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP infl_request_seconds Time from a request's arrival to its answer."
        );
        let _ = writeln!(out, "# TYPE infl_request_seconds histogram");
        if let Ok(h) = self.latency.lock() {
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                let _ = writeln!(
                    out,
                    "infl_request_seconds_bucket{{le=\"{b}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "infl_request_seconds_bucket{{le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "infl_request_seconds_sum {}", h.sum);
            let _ = writeln!(out, "infl_request_seconds_count {}", h.count);
        }
        let gauges = [
            (
                "infl_queue_length",
                "gauge",
                "Requests waiting for the worker.",
                self.queued.load(Ordering::Relaxed) as f64,
            ),
            (
                "infl_scoring_passes_total",
                "counter",
                "Scoring passes run (one per batch of queries sharing options).",
                self.passes.load(Ordering::Relaxed) as f64,
            ),
            (
                "infl_scored_queries_total",
                "counter",
                "Influence queries scored by those passes.",
                self.pass_queries.load(Ordering::Relaxed) as f64,
            ),
            (
                "infl_scoring_seconds_total",
                "counter",
                "Time spent in scoring passes.",
                self.pass_micros.load(Ordering::Relaxed) as f64 / 1e6,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_counts_requests_and_fills_cumulative_buckets() {
        let m = Metrics::default();
        m.request("/v1/influence", 200, Duration::from_millis(3));
        m.request("/v1/influence", 200, Duration::from_millis(30));
        m.request("/healthz", 503, Duration::from_secs(20));
        m.enqueued();
        m.enqueued();
        m.dequeued(1);
        let text = m.render();
        assert!(
            text.contains("infl_requests_total{route=\"/v1/influence\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("infl_requests_total{route=\"/healthz\",status=\"503\"} 1"));
        assert!(text.contains("infl_request_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("infl_request_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("infl_request_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("infl_request_seconds_bucket{le=\"10\"} 2"));
        assert!(text.contains("infl_request_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("infl_request_seconds_count 3"));
        assert!(text.contains("infl_queue_length 1\n"));
    }
}
