//! The report's HTML: the page (index, one section per query, token highlighting), its
//! stylesheet, and the number and text formatting shared with the charts and `infl compare`.

use super::charts::{layer_labels, layer_svg, survival_svg};
use super::{RunContext, TailAnalysis};
use crate::powerlaw::HalfMass;
use crate::results::{Direction, Distribution, QueryInfo, Results, TokenPart, TopEntry};
use std::fmt::Write as _;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A score with four significant digits, e.g. `+1.234e-3` or `+12.34`.
pub fn fmt_score(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if (1e-2..1e4).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        format!("{x:+.decimals$}")
    } else {
        format!("{x:+.3e}")
    }
}

pub(crate) const CSS: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1140px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:0 0 8px}h3{font-size:15px;margin:16px 0 6px}
.sub{color:#57606a;font-size:13px}
section.query,.panel{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin:18px 0}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 10px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.qtext{font:13px/1.5 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;background:#f6f8fa;border-radius:6px;padding:8px 10px;margin:4px 0}
.completion{background:#fff3bf;border-radius:3px}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.fig{flex:1 1 480px;min-width:0}
.fig svg{max-width:100%;height:auto}
.seq{border-top:1px solid #eaeef2;padding:8px 0}.seq-head{font-size:12.5px;color:#57606a;margin-bottom:4px}
.seq-head b{color:#1f2328;font-variant-numeric:tabular-nums}
.tokens,.plain{font:12.5px/1.7 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-word;max-height:260px;overflow:auto}
.tok{border-radius:2px}
.note{background:#fff8c5;border:1px solid #d4a72c66;border-radius:6px;padding:6px 10px;font-size:13px;margin:6px 0}
.stat{font-size:13px;margin:4px 0}.legend{font-size:12px;color:#57606a}
.swatch{display:inline-block;width:40px;height:10px;vertical-align:middle;border-radius:2px}
.col .seq{padding:6px 8px;margin:4px 0;border:2px solid transparent;border-radius:6px}.col .seq.shared{border-color:#8250df;background:#fbf8ff}
.cols{display:grid;gap:12px}.col{min-width:0}
.own{color:#9a6700;font-weight:600}
"#;

/// The |part| at which token colours saturate: the 95th percentile of the query's token parts
/// (one outsized token would otherwise leave every other one white).
pub fn colour_scale(magnitudes: &mut [f64]) -> f64 {
    if magnitudes.is_empty() {
        return 0.0;
    }
    magnitudes.sort_by(f64::total_cmp);
    let i = ((magnitudes.len() - 1) as f64 * 0.95).round() as usize;
    let p = magnitudes[i];
    if p > 0.0 {
        p
    } else {
        magnitudes[magnitudes.len() - 1]
    }
}

/// Background colour of a token part: red for positive, blue for negative, stronger with |s|.
pub fn token_colour(score: f64, scale: f64) -> String {
    if scale.is_nan() || scale <= 0.0 || !score.is_finite() || score == 0.0 {
        return "transparent".into();
    }
    // Square root: heavy-tailed parts would otherwise leave all but a few tokens white.
    let a = (score.abs() / scale).min(1.0).sqrt() * 0.85;
    if score > 0.0 {
        format!("rgba(220,38,38,{a:.3})")
    } else {
        format!("rgba(37,99,235,{a:.3})")
    }
}

fn render_tokens(html: &mut String, tokens: &[TokenPart], scale: f64, max_tokens: usize) {
    let (start, end) = token_window(tokens, max_tokens);
    html.push_str("<div class=\"tokens\">");
    if start > 0 {
        html.push('…');
    }
    for t in &tokens[start..end] {
        let _ = write!(
            html,
            "<span class=\"tok\" style=\"background:{}\" title=\"{}\" data-score=\"{}\">{}</span>",
            token_colour(t.score, scale),
            escape(&fmt_score(t.score)),
            t.score,
            escape(&t.text)
        );
    }
    if end < tokens.len() {
        html.push('…');
    }
    html.push_str("</div>");
    if end - start < tokens.len() {
        let _ = write!(
            html,
            "<div class=\"legend\">tokens {}–{} of {} shown, around the largest part (`infl report --max-tokens` shows more)</div>",
            start + 1,
            end,
            tokens.len()
        );
    }
}

/// The window of at most `max` tokens centred on the largest |part|.
pub fn token_window(tokens: &[TokenPart], max: usize) -> (usize, usize) {
    let n = tokens.len();
    let max = max.max(1);
    if n <= max {
        return (0, n);
    }
    // The first of the largest |parts| (max_by would return the last).
    let mut peak = 0;
    for (i, t) in tokens.iter().enumerate() {
        if t.score.abs() > tokens[peak].score.abs() {
            peak = i;
        }
    }
    let start = peak.saturating_sub(max / 2).min(n - max);
    (start, start + max)
}

/// An entry's score in readable units: the predicted change of −log p on removal (alone and
/// with the ranks above it) and its percentile, where recorded.
fn units_line(e: &TopEntry) -> String {
    let mut out = String::new();
    if let Some(d) = e.removal_change {
        let _ = write!(
            out,
            " &nbsp;· removing it: −log p {} nats",
            escape(&fmt_score(d))
        );
        if let Some(g) = e.group_removal_change.filter(|_| e.rank > 1) {
            let _ = write!(
                out,
                " (ranks 1–{} together: {})",
                e.rank,
                escape(&fmt_score(g))
            );
        }
    }
    if let Some(p) = e.percentile {
        let _ = write!(out, " &nbsp;· percentile {p:.2}");
    }
    out
}

fn render_entries(
    html: &mut String,
    entries: &[&TopEntry],
    (scale, max_tokens): (f64, usize),
    layers: Option<&[String]>,
    run: &RunContext,
) {
    let labels = layers.map(layer_labels);
    let layers = labels.as_deref();
    for e in entries {
        let _ = write!(
            html,
            "<div class=\"seq\" data-direction=\"{}\"><div class=\"seq-head\">{}#{} &nbsp;<b>{}</b> &nbsp;sequence <code>{}</code>",
            if e.direction == Direction::Top { "top" } else { "bottom" },
            if run.is_own(&e.query_id, &e.sequence_id) {
                "<span class=\"own\" title=\"states the query's fact\">★ own sentence</span> "
            } else {
                ""
            },
            e.rank,
            escape(&fmt_score(e.score)),
            escape(&e.sequence_id)
        );
        html.push_str(&units_line(e));
        if let (Some(parts), Some(names)) = (&e.per_layer, layers) {
            // The layer carrying the largest part, as a one-line summary.
            if let Some((i, v)) = parts
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            {
                let _ = write!(
                    html,
                    " &nbsp;· largest layer part (by magnitude): <code>{}</code> {}",
                    escape(names.get(i).map(String::as_str).unwrap_or("?")),
                    escape(&fmt_score(*v))
                );
            }
        }
        html.push_str("</div>");
        match (&e.tokens, &e.text) {
            (Some(t), _) => render_tokens(html, t, scale, max_tokens),
            (None, Some(text)) => {
                let _ = write!(html, "<div class=\"plain\">{}</div>", escape(text));
            }
            (None, None) => html.push_str(
                "<div class=\"note\">no text: the corpus was pre-tokenised and the model has no tokenizer.json</div>",
            ),
        }
        html.push_str("</div>");
    }
}

/// Renders the whole report.
pub fn render(
    results: &Results,
    tails: &[TailAnalysis],
    missing: &[String],
    max_tokens: usize,
    run: &RunContext,
) -> String {
    let mut h = String::with_capacity(1 << 16);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>infl report: {}</title><style>{CSS}</style></head><body><main>",
        escape(&results.dir.display().to_string())
    );
    let _ = write!(
        h,
        "<h1>Influence report</h1><div class=\"sub\">results <code>{}</code> · model <code>{}</code> · strategy <b>{}</b>{} · corpus <code>{}</code>{}</div>",
        escape(&results.dir.display().to_string()),
        escape(&results.model),
        escape(&results.strategy),
        match results.normalize.as_deref() {
            Some(n) if n != "none" => format!(" · scores normalised: <b>{}</b>", escape(n)),
            _ => String::new(),
        },
        escape(&results.corpus),
        results
            .n_sequences
            .map(|n| format!(" ({n} training sequences)"))
            .unwrap_or_default()
    );
    h.push_str(
        "<p class=\"legend\">A score I(q, z) &gt; 0 means training on sequence z lowers −log p(completion | prompt): z supports the completion. \
         <i>Removing it</i>: the predicted change of −log p(completion | prompt), in nats, if the sequence were removed from training (score / N, \
         N the training sequences the factors were fitted on, or tokens for KFAC): positive means the completion would become less likely. \
         <i>Percentile</i>: the share of the query's scored sequences scoring at most this much. \
         Token colours: <span class=\"swatch\" style=\"background:rgba(220,38,38,.85)\"></span> positive part \
         <span class=\"swatch\" style=\"background:rgba(37,99,235,.85)\"></span> negative part (hover a token for its part; \
         the parts of a sequence sum to its score; colour ∝ √|part|, saturating at the 95th percentile of the query's |parts|).</p>",
    );
    if let Some(r) = &results.removal {
        let _ = write!(
            h,
            "<p class=\"legend\" id=\"units\">Here N = {} training {} (the factors' fit), so a score of {} predicts {} nats on removal.</p>",
            r.divisor,
            escape(&r.counts),
            escape(&fmt_score(r.divisor)),
            escape(&fmt_score(1.0))
        );
    }
    if !missing.is_empty() {
        h.push_str("<div class=\"note\" id=\"missing\"><b>Not in these results:</b><ul>");
        for m in missing {
            let _ = write!(h, "<li>{}</li>", escape(m));
        }
        h.push_str("</ul></div>");
    }

    // Index.
    h.push_str("<div class=\"panel\" id=\"index\"><h2>Queries</h2><table><tr><th>query</th><th>prompt → completion</th><th>−log p</th><th>power-law tail</th><th>half the positive influence</th></tr>");
    for (qi, q) in results.queries.iter().enumerate() {
        let tail = tails.get(qi);
        let _ = write!(
            h,
            "<tr><td><a href=\"#q{qi}\">{}</a></td><td>{}</td><td class=\"num\">{}</td><td class=\"tail\">{}</td><td>{}</td></tr>",
            escape(&q.id),
            escape(&short(&query_line(q), 90)),
            q.loss.map(|l| format!("{l:.3}")).unwrap_or_else(|| "–".into()),
            tail.and_then(|t| t.fit.as_ref().ok())
                .map(|f| escape(&f.verdict_line()))
                .unwrap_or_else(|| "–".into()),
            tail.map(|t| half_short(&t.half)).unwrap_or_else(|| "–".into()),
        );
    }
    h.push_str("</table></div>");
    run.render_summary(&mut h);
    super::trust::render(&mut h, results);

    for (qi, q) in results.queries.iter().enumerate() {
        render_query(&mut h, results, qi, q, tails.get(qi), (max_tokens, run));
    }
    let _ = writeln!(
        h,
        "<p class=\"sub\">Written by infl {} (<code>infl report</code>).</p></main></body></html>",
        env!("CARGO_PKG_VERSION")
    );
    h
}

fn query_line(q: &QueryInfo) -> String {
    match (&q.prompt, &q.completion) {
        (None, None) => "(text not recorded)".into(),
        (p, c) => format!(
            "{} → {}",
            p.as_deref().unwrap_or(""),
            c.as_deref().unwrap_or("")
        ),
    }
}

pub(super) fn short(s: &str, n: usize) -> String {
    let flat: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if flat.chars().count() <= n {
        flat
    } else {
        flat.chars().take(n).collect::<String>() + "…"
    }
}

fn half_short(h: &HalfMass) -> String {
    match h {
        HalfMass::Exactly(k) => format!("{k} sequence{}", if *k == 1 { "" } else { "s" }),
        HalfMass::MoreThan(k) => format!("more than {k} sequences"),
        HalfMass::NoPositive => "no positive influence".into(),
    }
}

fn render_query(
    h: &mut String,
    r: &Results,
    qi: usize,
    q: &QueryInfo,
    tail: Option<&TailAnalysis>,
    (max_tokens, run): (usize, &RunContext),
) {
    let _ = write!(
        h,
        "<section class=\"query\" id=\"q{qi}\" data-query-id=\"{}\"><h2>Query {}</h2>",
        escape(&q.id),
        escape(&q.id)
    );
    if q.prompt.is_some() || q.completion.is_some() {
        let _ = write!(
            h,
            "<div class=\"qtext\">{}<span class=\"completion\" title=\"completion\">{}</span></div>",
            escape(q.prompt.as_deref().unwrap_or("")),
            escape(q.completion.as_deref().unwrap_or(""))
        );
    } else {
        h.push_str("<div class=\"note\">The query's text is not recorded in meta.json (pre-tokenised queries or an older `infl score`).</div>");
    }
    let _ = write!(
        h,
        "<div class=\"stat\">−log p(completion | prompt) = <b>{}</b> nats</div>",
        q.loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "not recorded".into())
    );

    h.push_str("<div class=\"figs\"><div class=\"fig\"><h3>Distribution of scores</h3>");
    match (r.distribution.as_ref().and_then(|d| d.get(qi)), tail) {
        (Some(d), Some(t)) => {
            h.push_str(&survival_svg(d, t.fit.as_ref().ok()));
            render_tail_stats(h, d, t, r.distribution_source.unwrap_or("?"));
        }
        _ => h.push_str("<div class=\"note\">No distribution statistics: rerun `infl score` with this version of infl (it writes distribution.json), or with `--dense`.</div>"),
    }
    h.push_str("</div><div class=\"fig\"><h3>Influence per layer</h3>");
    render_layers(h, r, qi, q);
    h.push_str("</div></div>");
    run.render_query(h, &q.id, 5);

    let top = r.entries(&q.id, Direction::Top);
    let bottom = r.entries(&q.id, Direction::Bottom);
    let mut mags: Vec<f64> = top
        .iter()
        .chain(&bottom)
        .flat_map(|e| e.tokens.iter().flatten())
        .map(|t| t.score.abs())
        .filter(|x| x.is_finite())
        .collect();
    let scale = colour_scale(&mut mags);
    let has_tokens = top.iter().chain(&bottom).any(|e| e.tokens.is_some());
    let any = !(top.is_empty() && bottom.is_empty());
    if any && !has_tokens {
        h.push_str("<div class=\"note\">No per-token parts: run `infl score --per-token` to get token highlighting.</div>");
    }
    let _ = write!(
        h,
        "<h3>Most positively influential sequences (top {})</h3>",
        top.len()
    );
    if top.is_empty() {
        h.push_str("<div class=\"note\">No top sequences recorded for this query.</div>");
    }
    render_entries(h, &top, (scale, max_tokens), r.layers.as_deref(), run);
    let _ = write!(
        h,
        "<h3>Most negatively influential sequences (bottom {})</h3>",
        bottom.len()
    );
    if bottom.is_empty() {
        h.push_str("<div class=\"note\">No bottom sequences recorded: rerun `infl score` with this version of infl.</div>");
    }
    render_entries(h, &bottom, (scale, max_tokens), r.layers.as_deref(), run);
    h.push_str("<p class=\"sub\"><a href=\"#index\">↑ index</a></p></section>");
}

fn render_tail_stats(h: &mut String, d: &Distribution, t: &TailAnalysis, source: &str) {
    let mean = if d.count > 0 {
        d.sum / d.count as f64
    } else {
        f64::NAN
    };
    let _ = write!(
        h,
        "<div class=\"stat\">{} sequences scored; mean {}, min {}, max {}; positive total {}, negative total {} (from {})</div>",
        d.count,
        escape(&fmt_score(mean)),
        escape(&fmt_score(d.min)),
        escape(&fmt_score(d.max)),
        escape(&fmt_score(d.sum_pos)),
        escape(&fmt_score(d.sum_neg)),
        escape(source)
    );
    match &t.fit {
        Ok(f) => {
            let _ = write!(
                h,
                "<div class=\"stat fit\">Power-law tail of the positive scores: <b>{}</b>; above x<sub>min</sub> = {} ({} of the {} largest positive scores; KS distance {:.4}; {} bootstrap samples)</div>",
                escape(&f.verdict_line()),
                escape(&fmt_score(f.x_min)),
                f.n_tail,
                t.n_fitted_from,
                f.ks,
                f.bootstrap,
            );
        }
        Err(e) => {
            let _ = write!(
                h,
                "<div class=\"note\">No power-law fit: {}</div>",
                escape(e)
            );
        }
    }
    let _ = write!(
        h,
        "<div class=\"stat half\"><b>{}</b>.</div>",
        escape(&capitalise(&t.half.to_string()))
    );
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn render_layers(h: &mut String, r: &Results, qi: usize, q: &QueryInfo) {
    let names = match &r.layers {
        Some(n) => n,
        None => {
            h.push_str(
                "<div class=\"note\">Layer names unknown: run `infl score --per-layer`.</div>",
            );
            return;
        }
    };
    if let Some(t) = r.layer_totals.as_ref().and_then(|t| t.get(qi)) {
        h.push_str(&layer_svg(
            names,
            &t.total_per_layer,
            Some(&t.abs_per_layer),
        ));
        h.push_str("<div class=\"legend\">Signed total: each layer's part of the scores summed over all training sequences. Σ |part|: the sum of the parts' magnitudes (own scale), how much each layer moves the scores either way.</div>");
        h.push_str(&super::experts::experts_table(
            names,
            &t.abs_per_layer,
            "Σ |part| over all training sequences",
        ));
        return;
    }
    let top = r.entries(&q.id, Direction::Top);
    let parts: Vec<&Vec<f64>> = top.iter().filter_map(|e| e.per_layer.as_ref()).collect();
    if parts.is_empty() {
        h.push_str("<div class=\"note\">No per-layer parts: run `infl score --per-layer` to see where in the network the influence lives.</div>");
        return;
    }
    let mut sum = vec![0.0; names.len()];
    for p in &parts {
        for (s, v) in sum.iter_mut().zip(p.iter()) {
            *s += v;
        }
    }
    h.push_str(&layer_svg(names, &sum, None));
    h.push_str(&super::experts::experts_table(
        names,
        &sum,
        "the parts summed over the top sequences",
    ));
    let _ = write!(
        h,
        "<div class=\"legend\">Bars: each layer's part summed over the top {} sequences (layers.json with totals over all sequences is missing: run `infl score --per-layer`).</div>",
        parts.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_text_and_token_colours() {
        assert_eq!(fmt_score(1234.5678), "+1235");
        assert_eq!(fmt_score(-0.012345), "-0.01235");
        assert_eq!(fmt_score(2.5e-5), "+2.500e-5");
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        // 20 magnitudes 1..=20: the 95th percentile (index round(19 · 0.95) = 18) is 19.
        let mut m: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(colour_scale(&mut m), 19.0);
        assert_eq!(token_colour(1.0, 0.0), "transparent");
        assert_eq!(token_colour(-19.0, 19.0), "rgba(37,99,235,0.850)");
        assert_eq!(token_colour(100.0, 19.0), "rgba(220,38,38,0.850)");
        let toks: Vec<TokenPart> = (0..10)
            .map(|i| TokenPart {
                text: i.to_string(),
                score: if i == 8 { -5.0 } else { 1.0 },
            })
            .collect();
        assert_eq!(token_window(&toks, 20), (0, 10));
        assert_eq!(token_window(&toks, 4), (6, 10)); // peak 8: 6..10, clamped at the end
        assert_eq!(token_window(&toks[..6], 2), (0, 2)); // all equal: the first is the peak
    }
}
