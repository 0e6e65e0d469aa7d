//! The terminal's view of `top_k.jsonl`: each query's top few sources with the score's unit,
//! as `infl score` prints them.

use super::{Direction, TopEntry};
use std::fmt::Write as _;

/// Each query's `n` most positively influential sources, one line each: rank, score, the
/// predicted change of −log p on removal (where the scores have that unit), percentile,
/// sequence id and the start of its text; headed by what the numbers mean.
pub fn top_sources_text(entries: &[TopEntry], query_ids: &[String], n: usize) -> String {
    let mut out = String::new();
    let with_removal = entries.iter().any(|e| e.removal_change.is_some());
    let _ = writeln!(
        out,
        "top sources per query (score > 0: the sequence supports the completion{})",
        if with_removal {
            "; removed: the predicted change of −log p(completion | prompt), in nats, if the sequence were removed from training (> 0: the completion becomes less likely)"
        } else {
            "; these scores have no removal unit (identity or cosine)"
        }
    );
    for qid in query_ids {
        let mut top: Vec<&TopEntry> = entries
            .iter()
            .filter(|e| &e.query_id == qid && e.direction == Direction::Top)
            .collect();
        top.sort_by_key(|e| e.rank);
        let _ = writeln!(out, "query {qid}");
        for e in top.into_iter().take(n) {
            let text = e.text.as_deref().unwrap_or("").replace('\n', " / ");
            let short: String = text.chars().take(60).collect();
            let removal = e
                .removal_change
                .map(|d| format!("  removed {d:+.3e} nats"))
                .unwrap_or_default();
            let pct = e
                .percentile
                .map(|p| format!("  pct {p:.1}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  #{} {:+.4e}{removal}{pct}  [{}] {short}",
                e.rank, e.score, e.sequence_id
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_each_querys_top_sources_with_the_unit() {
        let entry = |q: &str, direction, rank, score: f64| TopEntry {
            query_id: q.into(),
            direction,
            rank,
            sequence_id: format!("{rank}:0"),
            score,
            removal_change: Some(score / 40.0),
            group_removal_change: None,
            percentile: Some(100.0),
            text: Some("a\nb".into()),
            per_layer: None,
            tokens: None,
            stability: None,
        };
        let entries = vec![
            entry("q", Direction::Top, 2, 1.0),
            entry("q", Direction::Top, 1, 4.0),
            entry("q", Direction::Bottom, 1, -4.0),
        ];
        let text = top_sources_text(&entries, &["q".into()], 5);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("in nats"), "{text}");
        assert_eq!(lines[1], "query q");
        assert_eq!(
            lines[2],
            "  #1 +4.0000e0  removed +1.000e-1 nats  pct 100.0  [1:0] a / b"
        );
        assert!(lines[3].starts_with("  #2 +1.0000e0"), "{text}");
        assert_eq!(lines.len(), 4, "no bottom entries: {text}");
    }
}
