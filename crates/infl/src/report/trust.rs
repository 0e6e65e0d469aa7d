//! The report's panels on how far to trust the rankings: the pre-filter's estimated recall
//! per query (prefilter.json; with `--target-recall`, the N each query used and whether it
//! reached the target) and the ranking's stability across the fits of `fit --seeds`
//! (stability.json), flagging a query whose top-k is not stable.

use super::html::escape;
use crate::results::{PrefilterFile, Results, StabilityFile};
use std::fmt::Write as _;

/// Both panels, each when its file is in the results.
pub(super) fn render(h: &mut String, r: &Results) {
    if let Some(p) = &r.prefilter {
        render_prefilter(h, p);
    }
    if let Some(s) = &r.stability {
        render_stability(h, s);
    }
}

fn render_prefilter(h: &mut String, p: &PrefilterFile) {
    h.push_str("<div class=\"panel\" id=\"prefilter\"><h2>Recall of the pre-filter</h2>");
    let _ = write!(
        h,
        "<p class=\"legend\">Each query scored only its N best BM25 candidates; a seeded sample of the other sequences, scored exactly, estimates the share of the exact top-k among them ({}% interval).",
        p.confidence * 100.0
    );
    if let (Some(t), Some(max)) = (p.target_recall, p.prefilter_max) {
        let _ = write!(
            h,
            " N was widened (doubling, up to {max}) until the interval's lower end reached {t}."
        );
    }
    h.push_str("</p><table><tr><th>query</th><th>N</th><th>recall</th><th>95% interval</th>");
    if p.target_recall.is_some() {
        h.push_str("<th>target</th>");
    }
    h.push_str("</tr>");
    for q in &p.queries {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}–{:.3}</td>",
            escape(&q.query_id),
            q.prefilter,
            q.recall,
            q.recall_low,
            q.recall_high
        );
        match q.reached {
            Some(true) => h.push_str("<td>reached</td>"),
            Some(false) => h.push_str("<td class=\"flag\"><b>not reached</b></td>"),
            None => {}
        }
        h.push_str("</tr>");
    }
    h.push_str("</table></div>");
}

fn render_stability(h: &mut String, s: &StabilityFile) {
    let unstable = s.queries.iter().filter(|q| !q.stable).count();
    let _ = write!(
        h,
        "<div class=\"panel\" id=\"stability\"><h2>Stability across {} fits</h2><p class=\"legend\">The factors were fitted {} times, sampled-Fisher seeds {}; the results are seed {}'s. <i>Overlap</i>: the mean over pairs of fits of the Jaccard index of their top {}; <i>shared</i>: the share of the top {} in every fit's; <i>ranks</i>: each top sequence's lowest and highest rank over the fits (— : below the top {}); <i>score spread</i>: the median over the top {} of the scores' standard deviation over the fits relative to their mean. A ranking with overlap below {} is flagged <b>not stable</b> ({} of {} queries here).</p>",
        s.seeds.len(),
        s.seeds.len(),
        s.seeds.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "),
        s.seeds.first().copied().unwrap_or(0),
        s.top_k,
        s.top_k,
        s.depth,
        s.top_k,
        s.stable_overlap,
        unstable,
        s.queries.len()
    );
    h.push_str("<table><tr><th>query</th><th>overlap</th><th>shared</th><th>ranks of the top sequences</th><th>score spread</th><th></th></tr>");
    for q in &s.queries {
        let ranks: Vec<String> = q
            .top
            .iter()
            .map(|t| match t.spread.rank_max {
                Some(m) if m == t.spread.rank_min => m.to_string(),
                Some(m) => format!("{}–{m}", t.spread.rank_min),
                None => format!("{}–", t.spread.rank_min),
            })
            .collect();
        let mut rel: Vec<f64> = q
            .top
            .iter()
            .filter_map(|t| t.spread.score_rel_std)
            .collect();
        rel.sort_by(f64::total_cmp);
        let median = match rel.len() {
            0 => "–".to_string(),
            n => format!("{:.1}%", (rel[(n - 1) / 2] + rel[n / 2]) / 2.0 * 100.0),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{:.2}</td><td class=\"num\">{:.2}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            escape(&q.query_id),
            q.overlap,
            q.shared,
            ranks.join(" · "),
            median,
            if q.stable {
                "stable"
            } else {
                "<b class=\"unstable\">not stable</b>"
            }
        );
    }
    h.push_str("</table></div>");
}
