//! What a report shows of a whole run beyond its one results directory ([`RunContext`]): the
//! same queries ranked by other methods (strategies, a lexical baseline), a recall table, and
//! which corpus line states each query's fact (★ wherever that sequence appears). `infl demo`
//! fills it in so that its report holds everything its terminal prints.

use super::html::{escape, fmt_score};
use std::collections::HashMap;
use std::fmt::Write as _;

/// One method's ranking of the queries' sources: per query id, sequence ids best first, with
/// their scores where the method has them.
#[derive(Debug, Clone, Default)]
pub struct Ranking {
    pub method: String,
    pub per_query: HashMap<String, Vec<(String, Option<f64>)>>,
}

/// One row of the recall table: how often a method ranks each fact's own sequence first and
/// in its top 10.
#[derive(Debug, Clone)]
pub struct RecallRow {
    pub method: String,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
}

/// The rest of the run a report describes; [`RunContext::default`] is a plain report.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// Every method's ranking, the report's own strategy first.
    pub rankings: Vec<Ranking>,
    pub recall: Vec<RecallRow>,
    /// The number of fact queries behind `recall`.
    pub n_facts: usize,
    /// Query id → the corpus line (1-based) that states its fact.
    pub own_line: HashMap<String, usize>,
}

impl RunContext {
    /// Whether `sequence_id` (`LINE:WINDOW`) is the sequence stating `query_id`'s fact.
    pub fn is_own(&self, query_id: &str, sequence_id: &str) -> bool {
        let line = sequence_id.split(':').next().and_then(|l| l.parse().ok());
        line.is_some() && self.own_line.get(query_id).copied() == line
    }

    /// The panel after the query index: the recall table and what ★ means.
    pub(super) fn render_summary(&self, h: &mut String) {
        if self.recall.is_empty() && self.rankings.len() < 2 {
            return;
        }
        h.push_str("<div class=\"panel\" id=\"run\"><h2>The whole run</h2>");
        if !self.recall.is_empty() {
            let _ = write!(
                h,
                "<h3>Recall of each fact's own sentence ({} fact queries)</h3><table class=\"recall\"><tr><th>method</th><th>recall@1</th><th>recall@10</th></tr>",
                self.n_facts
            );
            for r in &self.recall {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}</td></tr>",
                    escape(&r.method),
                    r.recall_at_1,
                    r.recall_at_10
                );
            }
            h.push_str("</table>");
        }
        if self.rankings.len() > 1 {
            let names: Vec<String> = self.rankings.iter().map(|r| escape(&r.method)).collect();
            let _ = write!(
                h,
                "<p class=\"legend\">Methods scored: {}. Each query shows every method's top sources; the sections below are {}'s.</p>",
                names.join(", "),
                names[0]
            );
        }
        if !self.own_line.is_empty() {
            h.push_str("<p class=\"legend\">★ marks the sequence that states the query's fact (its own sentence).</p>");
        }
        h.push_str("</div>");
    }

    /// Per query: the top `n` sources of every method side by side.
    pub(super) fn render_query(&self, h: &mut String, query_id: &str, n: usize) {
        if self.rankings.len() < 2 {
            return;
        }
        h.push_str("<h3>Top sources by method</h3><table class=\"methods\"><tr><th>rank</th>");
        for r in &self.rankings {
            let _ = write!(h, "<th>{}</th>", escape(&r.method));
        }
        h.push_str("</tr>");
        for rank in 0..n {
            let _ = write!(h, "<tr><td class=\"num\">{}</td>", rank + 1);
            for r in &self.rankings {
                let cell = r.per_query.get(query_id).and_then(|v| v.get(rank));
                match cell {
                    Some((id, score)) => {
                        let _ = write!(
                            h,
                            "<td>{}<code>{}</code>{}</td>",
                            if self.is_own(query_id, id) {
                                "★ "
                            } else {
                                ""
                            },
                            escape(id),
                            score
                                .map(|s| format!(" {}", escape(&fmt_score(s))))
                                .unwrap_or_default()
                        );
                    }
                    None => h.push_str("<td>–</td>"),
                }
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
    }
}
