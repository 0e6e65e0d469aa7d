//! `infl compare`: the same queries scored on different models or with different strategies.
//! Per query and pair of results: the overlap of the top-k lists (|A ∩ B| / k) and the Spearman
//! rank correlation of the scores of the shared sequences (the sequences in both top-k lists,
//! or every training sequence when both directories hold dense scores of the same corpus);
//! printed as a table, written as JSON and as a side-by-side HTML view.

use crate::error::{Error, Result};
use crate::io;
use crate::report::{self, escape, fmt_score};
use crate::results::{Direction, Results, TopEntry};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One results directory in a comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    pub dir: String,
    pub model: String,
    pub strategy: String,
}

/// Agreement of two results directories on one query.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairStats {
    pub query_id: String,
    /// Indices into [`Comparison::runs`].
    pub a: usize,
    pub b: usize,
    /// Length of the top lists compared (the shorter of the two).
    pub k: usize,
    /// Sequences in both top-k lists.
    pub shared: usize,
    /// shared / k.
    pub overlap: f64,
    /// Spearman's ρ over `spearman_over` sequences (None when fewer than 3).
    pub spearman: Option<f64>,
    pub spearman_n: usize,
    /// "top-k shared" or "all sequences (dense)".
    pub spearman_over: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub runs: Vec<Run>,
    pub query_ids: Vec<String>,
    pub pairs: Vec<PairStats>,
}

/// Opens every directory and checks they hold the same queries.
pub fn open_all(dirs: &[PathBuf]) -> Result<Vec<Results>> {
    if dirs.len() < 2 {
        return Err(Error::input(
            "`infl compare` needs at least two results directories",
        ));
    }
    let all: Vec<Results> = dirs
        .iter()
        .map(|d| Results::open(d))
        .collect::<Result<_>>()?;
    let first = &all[0];
    let ids = |r: &Results| r.queries.iter().map(|q| q.id.clone()).collect::<Vec<_>>();
    for r in &all[1..] {
        if ids(r) != ids(first) {
            return Err(Error::Mismatch(format!(
                "{} and {} hold different queries ({:?} vs {:?}); compare results scored on the same queries file",
                first.dir.display(),
                r.dir.display(),
                ids(first),
                ids(r)
            )));
        }
        if let (Some(a), Some(b)) = (&first.queries_sha256, &r.queries_sha256) {
            if a != b {
                return Err(Error::Mismatch(format!(
                    "{} and {} were scored on different queries files (queries.sha256 {}… vs {}…) although the ids agree; compare results scored on the same queries file",
                    first.dir.display(),
                    r.dir.display(),
                    &a[..a.len().min(12)],
                    &b[..b.len().min(12)]
                )));
            }
        }
    }
    Ok(all)
}

/// Ranks with ties averaged (1-based).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i + 1;
        while j < idx.len() && x[idx[j]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0;
        for &k in &idx[i..j] {
            r[k] = avg;
        }
        i = j;
    }
    r
}

/// Spearman's rank correlation (Pearson correlation of tie-averaged ranks); None when fewer than
/// 3 pairs or when either side is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 3 {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

fn same_corpus(a: &Results, b: &Results) -> bool {
    matches!((&a.corpus_sha256, &b.corpus_sha256), (Some(x), Some(y)) if x == y)
}

/// Compares every pair of `results` (which must hold the same queries: see [`open_all`]).
pub fn compare(results: &[Results]) -> Comparison {
    let runs = results
        .iter()
        .map(|r| Run {
            dir: r.dir.display().to_string(),
            model: r.model.clone(),
            strategy: r.strategy.clone(),
        })
        .collect();
    let query_ids: Vec<String> = results
        .first()
        .map(|r| r.queries.iter().map(|q| q.id.clone()).collect())
        .unwrap_or_default();
    let mut pairs = Vec::new();
    for (qi, qid) in query_ids.iter().enumerate() {
        for a in 0..results.len() {
            for b in a + 1..results.len() {
                pairs.push(pair(&results[a], &results[b], qi, qid, a, b));
            }
        }
    }
    Comparison {
        runs,
        query_ids,
        pairs,
    }
}

fn pair(ra: &Results, rb: &Results, qi: usize, qid: &str, a: usize, b: usize) -> PairStats {
    let ta = ra.entries(qid, Direction::Top);
    let tb = rb.entries(qid, Direction::Top);
    let k = ta.len().min(tb.len());
    let in_b: HashMap<&str, f64> = tb[..k]
        .iter()
        .map(|e| (e.sequence_id.as_str(), e.score))
        .collect();
    let (xs, ys): (Vec<f64>, Vec<f64>) = ta[..k]
        .iter()
        .filter_map(|e| in_b.get(e.sequence_id.as_str()).map(|&y| (e.score, y)))
        .unzip();
    let shared = xs.len();
    let dense = match (&ra.dense, &rb.dense) {
        (Some(da), Some(db)) if same_corpus(ra, rb) => match (da.get(qi), db.get(qi)) {
            (Some(x), Some(y)) if x.len() == y.len() => Some((x, y)),
            _ => None,
        },
        _ => None,
    };
    let (rho, n, over) = match dense {
        Some((x, y)) => (spearman(x, y), x.len(), "all sequences (dense)"),
        None => (spearman(&xs, &ys), shared, "top-k shared"),
    };
    PairStats {
        query_id: qid.to_string(),
        a,
        b,
        k,
        shared,
        overlap: if k > 0 { shared as f64 / k as f64 } else { 0.0 },
        spearman: rho,
        spearman_n: n,
        spearman_over: over.to_string(),
    }
}

impl Comparison {
    /// A plain-text table, one row per query and pair.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for (i, r) in self.runs.iter().enumerate() {
            let _ = writeln!(
                s,
                "[{}] {}  (model {}, {})",
                (b'A' + (i % 26) as u8) as char,
                r.dir,
                r.model,
                r.strategy
            );
        }
        let _ = writeln!(
            s,
            "{:<20} {:>5} {:>12} {:>10} {:>9}  spearman over",
            "query", "pair", "top-k ∩", "overlap", "spearman"
        );
        for p in &self.pairs {
            let _ = writeln!(
                s,
                "{:<20} {:>5} {:>12} {:>10.2} {:>9}  {} ({})",
                p.query_id,
                format!(
                    "{}–{}",
                    (b'A' + (p.a % 26) as u8) as char,
                    (b'A' + (p.b % 26) as u8) as char
                ),
                format!("{}/{}", p.shared, p.k),
                p.overlap,
                p.spearman
                    .map(|r| format!("{r:+.3}"))
                    .unwrap_or_else(|| "n/a".into()),
                p.spearman_over,
                p.spearman_n
            );
        }
        s
    }
}

/// A side-by-side HTML view: per query, one column per results directory with its top
/// sequences; sequences that appear in more than one column are outlined.
pub fn render_html(cmp: &Comparison, results: &[Results]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>infl compare</title><style>{}</style></head><body><main><h1>Comparison of {} results</h1><ul>",
        report::CSS,
        results.len()
    );
    for (i, r) in cmp.runs.iter().enumerate() {
        let _ = write!(
            h,
            "<li><b>{}</b> <code>{}</code>: model <code>{}</code>, strategy {}</li>",
            (b'A' + (i % 26) as u8) as char,
            escape(&r.dir),
            escape(&r.model),
            escape(&r.strategy)
        );
    }
    h.push_str("</ul><p class=\"legend\">Outlined: a sequence in the top list of more than one result. Overlap = |A ∩ B| / k; Spearman's ρ over the sequences in both top-k lists (over all sequences when both results hold dense scores of the same corpus).</p>");
    for (qi, qid) in cmp.query_ids.iter().enumerate() {
        render_query(&mut h, cmp, results, qi, qid);
    }
    h.push_str("</main></body></html>\n");
    h
}

/// One query's section: its text, the pairs' agreement, and the top lists side by side.
fn render_query(h: &mut String, cmp: &Comparison, results: &[Results], qi: usize, qid: &str) {
    let _ = write!(
        h,
        "<section class=\"query\" id=\"q{qi}\" data-query-id=\"{}\"><h2>Query {}</h2>",
        escape(qid),
        escape(qid)
    );
    if let Some(q) = results.first().and_then(|r| r.queries.get(qi)) {
        if q.prompt.is_some() || q.completion.is_some() {
            let _ = write!(
                h,
                "<div class=\"qtext\">{}<span class=\"completion\">{}</span></div>",
                escape(q.prompt.as_deref().unwrap_or("")),
                escape(q.completion.as_deref().unwrap_or(""))
            );
        }
    }
    h.push_str("<table class=\"pairs\"><tr><th>pair</th><th>top-k ∩</th><th>overlap</th><th>Spearman ρ</th><th>over</th></tr>");
    for p in cmp.pairs.iter().filter(|p| p.query_id == qid) {
        let _ = write!(
            h,
            "<tr><td>{}–{}</td><td class=\"num\">{}/{}</td><td class=\"num\">{:.2}</td><td class=\"num\">{}</td><td>{} ({})</td></tr>",
            (b'A' + (p.a % 26) as u8) as char,
            (b'A' + (p.b % 26) as u8) as char,
            p.shared,
            p.k,
            p.overlap,
            p.spearman.map(|r| format!("{r:+.3}")).unwrap_or_else(|| "n/a".into()),
            escape(&p.spearman_over),
            p.spearman_n
        );
    }
    h.push_str("</table>");
    let tops: Vec<Vec<&TopEntry>> = results
        .iter()
        .map(|r| r.entries(qid, Direction::Top))
        .collect();
    render_top_columns(h, cmp, &tops, results.len());
    h.push_str("</section>");
}

/// The top lists of one query, a column per results directory; sequences in more than one
/// list are outlined.
fn render_top_columns(h: &mut String, cmp: &Comparison, tops: &[Vec<&TopEntry>], cols: usize) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for t in tops {
        for e in t {
            *seen.entry(e.sequence_id.as_str()).or_default() += 1;
        }
    }
    let _ = write!(
        h,
        "<div class=\"cols\" style=\"grid-template-columns:repeat({cols},minmax(0,1fr))\">"
    );
    for (i, t) in tops.iter().enumerate() {
        let name = Path::new(&cmp.runs[i].dir)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| cmp.runs[i].dir.clone());
        let _ = write!(
            h,
            "<div class=\"col\"><h3>{}: {} <span class=\"sub\">({})</span></h3>",
            (b'A' + (i % 26) as u8) as char,
            escape(&name),
            escape(&cmp.runs[i].strategy)
        );
        for e in t {
            let shared = seen.get(e.sequence_id.as_str()).copied().unwrap_or(0) > 1;
            let text = e
                .text
                .clone()
                .or_else(|| {
                    e.tokens
                        .as_ref()
                        .map(|t| t.iter().map(|x| x.text.as_str()).collect())
                })
                .unwrap_or_default();
            let _ = write!(
                h,
                "<div class=\"seq{}\"><div class=\"seq-head\">#{} <b>{}</b> <code>{}</code></div><div class=\"plain\">{}</div></div>",
                if shared { " shared" } else { "" },
                e.rank,
                escape(&fmt_score(e.score)),
                escape(&e.sequence_id),
                escape(&text)
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</div>");
}

/// Runs the comparison and writes the requested outputs.
pub fn run(dirs: &[PathBuf], html: Option<&Path>, json: Option<&Path>) -> Result<Comparison> {
    let results = open_all(dirs)?;
    let cmp = compare(&results);
    if let Some(p) = html {
        io::write_atomic(p, render_html(&cmp, &results).as_bytes())?;
    }
    if let Some(p) = json {
        io::write_json(p, &cmp)?;
    }
    Ok(cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_by_hand() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // Ranks (1,2,3,4) vs (1,3,2,4): d² = 0+1+1+0 = 2, ρ = 1 − 6·2/(4·15) = 0.8.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
    }
}
