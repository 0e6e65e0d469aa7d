//! `infl report`: reads a results directory written by `infl score` and writes one
//! self-contained HTML file (inline CSS and SVG; no network, no scripts from elsewhere) that a
//! person reads in a browser: an index of queries, and per query the prompt and completion,
//! −log p, the top and bottom training sequences with per-token highlighting, a per-layer bar
//! chart and the log-log survival plot of the scores with the fitted power-law tail.
//!
//! Optional parts of the results directory (per-layer and per-token parts, the distribution
//! statistics) may be missing; the report then says which `infl score` flag produces them.

use crate::error::{Error, Result};
use crate::io;
use crate::powerlaw::{self, HalfMass, PowerLawFit};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Largest number of positive (and negative) scores kept per query for the tail analysis,
/// as in `distribution.json`.
pub const TAIL_LEN: usize = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Top,
    Bottom,
}

fn default_direction() -> Direction {
    Direction::Top
}

/// One token of a training sequence and its part of the score.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct TokenPart {
    pub text: String,
    pub score: f64,
}

/// One line of `top_k.jsonl`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Entry {
    pub query_id: String,
    #[serde(default = "default_direction")]
    pub direction: Direction,
    pub rank: usize,
    pub sequence_id: String,
    pub score: f64,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub per_layer: Option<Vec<f64>>,
    #[serde(default)]
    pub tokens: Option<Vec<TokenPart>>,
}

/// Streamed statistics of one query's scores over all training sequences (`distribution.json`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Distribution {
    pub query_id: String,
    pub count: usize,
    pub sum: f64,
    pub sum_sq: f64,
    pub sum_pos: f64,
    pub sum_neg: f64,
    pub min: f64,
    pub max: f64,
    /// The largest positive scores, descending.
    pub tail_pos: Vec<f64>,
    /// Magnitudes of the most negative scores, descending.
    pub tail_neg: Vec<f64>,
}

impl Distribution {
    /// The same statistics computed from a dense row of scores.
    pub fn from_scores(query_id: &str, row: &[f64]) -> Self {
        let mut pos: Vec<f64> = row.iter().copied().filter(|x| *x > 0.0).collect();
        let mut neg: Vec<f64> = row.iter().filter(|x| **x < 0.0).map(|x| -x).collect();
        pos.sort_by(|a, b| b.total_cmp(a));
        neg.sort_by(|a, b| b.total_cmp(a));
        let sum_pos = pos.iter().sum();
        let sum_neg = -neg.iter().sum::<f64>();
        pos.truncate(TAIL_LEN);
        neg.truncate(TAIL_LEN);
        Distribution {
            query_id: query_id.to_string(),
            count: row.len(),
            sum: row.iter().sum(),
            sum_sq: row.iter().map(|x| x * x).sum(),
            sum_pos,
            sum_neg,
            min: row.iter().copied().fold(f64::INFINITY, f64::min),
            max: row.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            tail_pos: pos,
            tail_neg: neg,
        }
    }
}

#[derive(serde::Deserialize)]
struct DistributionFile {
    queries: Vec<Distribution>,
}

/// Per-layer totals of one query over all training sequences (`layers.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LayerTotals {
    pub query_id: String,
    pub total_per_layer: Vec<f64>,
    pub abs_per_layer: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct LayersFile {
    layers: Vec<String>,
    queries: Vec<LayerTotals>,
}

/// One query of a results directory.
#[derive(Debug, Clone)]
pub struct QueryInfo {
    pub id: String,
    /// −log p(completion | prompt), nats.
    pub loss: Option<f64>,
    pub prompt: Option<String>,
    pub completion: Option<String>,
}

/// A results directory written by `infl score`, read back.
#[derive(Debug, Clone)]
pub struct Results {
    pub dir: PathBuf,
    pub queries: Vec<QueryInfo>,
    pub queries_sha256: Option<String>,
    pub strategy: String,
    /// Score normalisation (`none`, `cosine`), when recorded.
    pub normalize: Option<String>,
    pub model: String,
    pub corpus: String,
    pub corpus_sha256: Option<String>,
    pub n_sequences: Option<usize>,
    /// Tracked layer names, in order, when known.
    pub layers: Option<Vec<String>>,
    pub entries: Vec<Entry>,
    /// Per query (in `queries` order): from distribution.json, else from the dense scores.
    pub distribution: Option<Vec<Distribution>>,
    /// Where `distribution` came from (a file name).
    pub distribution_source: Option<&'static str>,
    /// Per query (in `queries` order), from layers.json.
    pub layer_totals: Option<Vec<LayerTotals>>,
    /// Dense scores, one row per query, when scores.safetensors exists.
    pub dense: Option<Vec<Vec<f64>>>,
}

fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn opt_strings(
    v: Option<&Value>,
    n: usize,
    file: &Path,
    name: &str,
) -> Result<Vec<Option<String>>> {
    match v {
        None | Some(Value::Null) => Ok(vec![None; n]),
        Some(Value::Array(a)) if a.len() == n => {
            Ok(a.iter().map(|x| x.as_str().map(str::to_string)).collect())
        }
        Some(_) => Err(Error::input(format!(
            "{}: field `{name}` must be an array of {n} strings or nulls (one per query)",
            file.display()
        ))),
    }
}

impl Results {
    /// Reads `dir`: meta.json and top_k.jsonl are required; distribution.json, layers.json and
    /// scores.safetensors are read when present.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        if !meta_path.exists() {
            return Err(Error::input(format!(
                "{}: not a results directory (no meta.json); create one with `infl score`",
                dir.display()
            )));
        }
        let meta: Value = io::read_json(&meta_path)?;
        if let Some(kind) = meta.get("kind").and_then(Value::as_str) {
            if kind != "scores" {
                return Err(Error::Mismatch(format!(
                    "{}: holds `{kind}`, not scores; `infl report` reads the output of `infl score`",
                    meta_path.display()
                )));
            }
        }
        let ids: Vec<String> = field(&meta, "queries.ids")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
            .ok_or_else(|| {
                Error::input(format!(
                    "{}: field `queries.ids` is missing or not an array of strings",
                    meta_path.display()
                ))
            })?;
        let n = ids.len();
        let losses: Vec<Option<f64>> =
            match field(&meta, "queries.losses").and_then(Value::as_array) {
                Some(a) if a.len() == n => a.iter().map(Value::as_f64).collect(),
                Some(_) => {
                    return Err(Error::input(format!(
                        "{}: field `queries.losses` must hold one number per query ({n})",
                        meta_path.display()
                    )))
                }
                None => vec![None; n],
            };
        let prompts = opt_strings(
            field(&meta, "queries.prompts"),
            n,
            &meta_path,
            "queries.prompts",
        )?;
        let completions = opt_strings(
            field(&meta, "queries.completions"),
            n,
            &meta_path,
            "queries.completions",
        )?;
        let queries: Vec<QueryInfo> = (0..n)
            .map(|i| QueryInfo {
                id: ids[i].clone(),
                loss: losses[i],
                prompt: prompts[i].clone(),
                completion: completions[i].clone(),
            })
            .collect();
        let text = |path: &str| {
            field(&meta, path)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let mut layers: Option<Vec<String>> = field(&meta, "layers")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect());
        if layers.is_none() {
            // Older results: the layer names are those of `damping_per_layer` ([name, λ] pairs).
            layers = field(&meta, "damping_per_layer")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .map(|p| p.get(0).and_then(Value::as_str).map(str::to_string))
                        .collect()
                });
        }

        let entries = read_entries(&dir.join("top_k.jsonl"), &ids, layers.as_deref())?;

        let dense = read_dense(&dir.join("scores.safetensors"), n)?;
        let dist_path = dir.join("distribution.json");
        let (distribution, distribution_source) = if dist_path.exists() {
            let file: DistributionFile = io::read_json(&dist_path)?;
            let ordered = in_query_order(file.queries, &ids, &dist_path, |d| &d.query_id)?;
            for d in &ordered {
                if d.tail_pos
                    .iter()
                    .chain(&d.tail_neg)
                    .any(|x| !(x.is_finite() && *x >= 0.0))
                {
                    return Err(Error::input(format!(
                        "{}: query `{}`: `tail_pos` and `tail_neg` must hold non-negative finite magnitudes",
                        dist_path.display(),
                        d.query_id
                    )));
                }
            }
            (Some(ordered), Some("distribution.json"))
        } else if let Some(rows) = &dense {
            let d = ids
                .iter()
                .zip(rows)
                .map(|(id, row)| Distribution::from_scores(id, row))
                .collect();
            (Some(d), Some("scores.safetensors"))
        } else {
            (None, None)
        };

        let layers_path = dir.join("layers.json");
        let layer_totals = if layers_path.exists() {
            let file: LayersFile = io::read_json(&layers_path)?;
            let ordered = in_query_order(file.queries, &ids, &layers_path, |t| &t.query_id)?;
            for t in &ordered {
                if t.total_per_layer.len() != file.layers.len()
                    || t.abs_per_layer.len() != file.layers.len()
                {
                    return Err(Error::input(format!(
                        "{}: query `{}`: `total_per_layer` and `abs_per_layer` must have one value per layer ({})",
                        layers_path.display(),
                        t.query_id,
                        file.layers.len()
                    )));
                }
            }
            if let Some(names) = &layers {
                if names != &file.layers && entries.iter().any(|e| e.per_layer.is_some()) {
                    return Err(Error::input(format!(
                        "{}: `layers` {:?} differ from meta.json's {:?}",
                        layers_path.display(),
                        file.layers,
                        names
                    )));
                }
            }
            layers = Some(file.layers);
            Some(ordered)
        } else {
            None
        };

        Ok(Results {
            dir: dir.to_path_buf(),
            queries,
            queries_sha256: text("queries.sha256"),
            strategy: field(&meta, "strategy")
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_else(|| "unknown".into()),
            normalize: text("normalize"),
            model: text("model.path").unwrap_or_else(|| "unknown model".into()),
            corpus: text("corpus.path").unwrap_or_else(|| "unknown corpus".into()),
            corpus_sha256: text("corpus.sha256"),
            n_sequences: field(&meta, "corpus.n_sequences")
                .and_then(Value::as_u64)
                .map(|x| x as usize),
            layers,
            entries,
            distribution,
            distribution_source,
            layer_totals,
            dense,
        })
    }

    /// The entries of query `id` in one direction, by rank.
    pub fn entries(&self, id: &str, direction: Direction) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.query_id == id && e.direction == direction)
            .collect();
        v.sort_by_key(|e| e.rank);
        v
    }

    /// What this directory lacks for a full report, each with the command that produces it.
    pub fn missing(&self) -> Vec<String> {
        let mut m = Vec::new();
        if !self.entries.iter().any(|e| e.tokens.is_some()) {
            m.push(
                "per-token parts (token highlighting): run `infl score --per-token`".to_string(),
            );
        }
        if self.layer_totals.is_none() && !self.entries.iter().any(|e| e.per_layer.is_some()) {
            m.push("per-layer parts (layer chart): run `infl score --per-layer`".to_string());
        }
        if self.distribution.is_none() {
            m.push(
                "distribution statistics (tail fit and plot): no distribution.json or scores.safetensors; rerun `infl score` with this version of infl (or with `--dense`)"
                    .to_string(),
            );
        }
        if !self
            .entries
            .iter()
            .any(|e| e.direction == Direction::Bottom)
        {
            m.push("bottom-k sequences (most negative influence): rerun `infl score` with this version of infl".to_string());
        }
        if self
            .queries
            .iter()
            .all(|q| q.prompt.is_none() && q.completion.is_none())
        {
            m.push("query texts: meta.json has no `queries.prompts` (pre-tokenised queries, or an older `infl score`)".to_string());
        }
        m
    }
}

/// Reorders per-query records to `ids`' order; every query must appear exactly once.
fn in_query_order<T>(
    items: Vec<T>,
    ids: &[String],
    file: &Path,
    id_of: impl Fn(&T) -> &String,
) -> Result<Vec<T>> {
    let mut slots: Vec<Option<T>> = (0..ids.len()).map(|_| None).collect();
    for item in items {
        let id = id_of(&item);
        let i = ids.iter().position(|q| q == id).ok_or_else(|| {
            Error::input(format!(
                "{}: query `{id}` is not among meta.json's `queries.ids`",
                file.display()
            ))
        })?;
        slots[i] = Some(item);
    }
    slots
        .into_iter()
        .zip(ids)
        .map(|(s, id)| {
            s.ok_or_else(|| Error::input(format!("{}: no record for query `{id}`", file.display())))
        })
        .collect()
}

fn read_entries(path: &Path, ids: &[String], layers: Option<&[String]>) -> Result<Vec<Entry>> {
    if !path.exists() {
        return Err(Error::input(format!(
            "{}: missing; `infl score` writes it",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: Entry = serde_json::from_str(line)
            .map_err(|err| Error::input(format!("{}:{}: {err}", path.display(), i + 1)))?;
        if !ids.contains(&e.query_id) {
            return Err(Error::input(format!(
                "{}:{}: query `{}` is not among meta.json's `queries.ids`",
                path.display(),
                i + 1,
                e.query_id
            )));
        }
        if let (Some(p), Some(names)) = (&e.per_layer, layers) {
            if p.len() != names.len() {
                return Err(Error::input(format!(
                    "{}:{}: `per_layer` has {} values but there are {} tracked layers",
                    path.display(),
                    i + 1,
                    p.len(),
                    names.len()
                )));
            }
        }
        out.push(e);
    }
    Ok(out)
}

fn read_dense(path: &Path, n_queries: usize) -> Result<Option<Vec<Vec<f64>>>> {
    if !path.exists() {
        return Ok(None);
    }
    let mut t = io::read_safetensors(path)?;
    let (shape, values) = t
        .remove("scores")
        .ok_or_else(|| Error::input(format!("{}: no tensor `scores`", path.display())))?;
    if shape.len() != 2 || shape[0] != n_queries {
        return Err(Error::input(format!(
            "{}: tensor `scores` has shape {shape:?}; expected [{n_queries}, n_train]",
            path.display()
        )));
    }
    Ok(Some(
        values
            .chunks(shape[1].max(1))
            .map(<[f64]>::to_vec)
            .collect(),
    ))
}

/// Settings of the report.
#[derive(Debug, Clone, Copy)]
pub struct ReportOptions {
    pub fit: powerlaw::FitOptions,
    /// Longer sequences show this many tokens around their largest part (keeps the file small).
    pub max_tokens: usize,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            fit: powerlaw::FitOptions::default(),
            max_tokens: 400,
        }
    }
}

/// The tail analysis of one query.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TailAnalysis {
    pub query_id: String,
    /// The fit of the positive tail, or why there is none.
    pub fit: std::result::Result<PowerLawFit, String>,
    pub half: HalfMass,
    /// Positive scores the fit used (the largest ones recorded).
    pub n_fitted_from: usize,
    /// Training sequences scored.
    pub count: usize,
}

/// Fits the positive tail of one query's scores and measures how concentrated it is.
pub fn analyse(d: &Distribution, opts: &powerlaw::FitOptions) -> TailAnalysis {
    let sample: Vec<f64> = d.tail_pos.iter().copied().filter(|x| *x > 0.0).collect();
    let fit = powerlaw::fit(&sample, opts).map_err(|e| e.to_string());
    TailAnalysis {
        query_id: d.query_id.clone(),
        fit,
        half: powerlaw::mass_concentration(d.sum_pos, &d.tail_pos),
        n_fitted_from: sample.len(),
        count: d.count,
    }
}

/// What `write_report` did.
pub struct ReportSummary {
    pub tails: Vec<TailAnalysis>,
    /// Parts the results lack, with the command that produces each.
    pub missing: Vec<String>,
    pub bytes: usize,
}

/// Reads `results_dir` and writes the HTML report to `out` atomically.
pub fn write_report(results_dir: &Path, out: &Path, opts: &ReportOptions) -> Result<ReportSummary> {
    let results = Results::open(results_dir)?;
    let tails: Vec<TailAnalysis> = results
        .distribution
        .iter()
        .flatten()
        .map(|d| analyse(d, &opts.fit))
        .collect();
    let missing = results.missing();
    let html = render(&results, &tails, &missing, opts.max_tokens);
    io::write_atomic(out, html.as_bytes())?;
    Ok(ReportSummary {
        tails,
        missing,
        bytes: html.len(),
    })
}

// ---------------------------------------------------------------------------------------------
// HTML

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

fn render_entries(
    html: &mut String,
    entries: &[&Entry],
    scale: f64,
    layers: Option<&[String]>,
    max_tokens: usize,
) {
    for e in entries {
        let _ = write!(
            html,
            "<div class=\"seq\" data-direction=\"{}\"><div class=\"seq-head\">#{} &nbsp;<b>{}</b> &nbsp;sequence <code>{}</code>",
            if e.direction == Direction::Top { "top" } else { "bottom" },
            e.rank,
            escape(&fmt_score(e.score)),
            escape(&e.sequence_id)
        );
        if let (Some(parts), Some(names)) = (&e.per_layer, layers) {
            // The layer carrying the largest part, as a one-line summary.
            if let Some((i, v)) = parts
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            {
                let _ = write!(
                    html,
                    " &nbsp;· largest layer part: <code>{}</code> {}",
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
         Token colours: <span class=\"swatch\" style=\"background:rgba(220,38,38,.85)\"></span> positive part \
         <span class=\"swatch\" style=\"background:rgba(37,99,235,.85)\"></span> negative part (hover a token for its part; \
         the parts of a sequence sum to its score; colour ∝ √|part|, saturating at the 95th percentile of the query's |parts|).</p>",
    );
    if !missing.is_empty() {
        h.push_str("<div class=\"note\" id=\"missing\"><b>Not in these results:</b><ul>");
        for m in missing {
            let _ = write!(h, "<li>{}</li>", escape(m));
        }
        h.push_str("</ul></div>");
    }

    // Index.
    h.push_str("<div class=\"panel\" id=\"index\"><h2>Queries</h2><table><tr><th>query</th><th>prompt → completion</th><th>−log p</th><th>tail α</th><th>half the positive influence</th></tr>");
    for (qi, q) in results.queries.iter().enumerate() {
        let tail = tails.get(qi);
        let _ = write!(
            h,
            "<tr><td><a href=\"#q{qi}\">{}</a></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            escape(&q.id),
            escape(&short(&query_line(q), 90)),
            q.loss.map(|l| format!("{l:.3}")).unwrap_or_else(|| "–".into()),
            tail.and_then(|t| t.fit.as_ref().ok())
                .map(|f| format!("{:.2} ± {:.2}", f.alpha, f.alpha_se))
                .unwrap_or_else(|| "–".into()),
            tail.map(|t| half_short(&t.half)).unwrap_or_else(|| "–".into()),
        );
    }
    h.push_str("</table></div>");

    for (qi, q) in results.queries.iter().enumerate() {
        render_query(&mut h, results, qi, q, tails.get(qi), max_tokens);
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

fn short(s: &str, n: usize) -> String {
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
    max_tokens: usize,
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
    render_entries(h, &top, scale, r.layers.as_deref(), max_tokens);
    let _ = write!(
        h,
        "<h3>Most negatively influential sequences (bottom {})</h3>",
        bottom.len()
    );
    if bottom.is_empty() {
        h.push_str("<div class=\"note\">No bottom sequences recorded: rerun `infl score` with this version of infl.</div>");
    }
    render_entries(h, &bottom, scale, r.layers.as_deref(), max_tokens);
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
                "<div class=\"stat fit\">Power-law tail of the positive scores: <b>α = {:.3} ± {:.3}</b> above x<sub>min</sub> = {} ({} of the {} largest positive scores; KS distance {:.4}); goodness of fit p = {}{}</div>",
                f.alpha,
                f.alpha_se,
                escape(&fmt_score(f.x_min)),
                f.n_tail,
                t.n_fitted_from,
                f.ks,
                f.p_value.map(|p| format!("{p:.3}")).unwrap_or_else(|| "not computed".into()),
                match f.p_value {
                    Some(p) if p < 0.1 => " (&lt; 0.1: the power law is ruled out)".to_string(),
                    Some(_) => format!(" ({} bootstrap samples; ≥ 0.1: consistent with a power law)", f.bootstrap),
                    None => String::new(),
                }
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
    let _ = write!(
        h,
        "<div class=\"legend\">Bars: each layer's part summed over the top {} sequences (layers.json with totals over all sequences is missing: run `infl score --per-layer`).</div>",
        parts.len()
    );
}

// ---------------------------------------------------------------------------------------------
// SVG

/// Drops the dotted prefix every name shares (`transformer.`), for shorter chart labels.
fn strip_common_prefix(names: &[String]) -> Vec<String> {
    let first = match names.first() {
        Some(f) if names.len() > 1 => f,
        _ => return names.to_vec(),
    };
    let mut cut = 0;
    for (i, _) in first.match_indices('.') {
        let prefix = &first[..=i];
        if names
            .iter()
            .all(|n| n.starts_with(prefix) && n.len() > prefix.len())
        {
            cut = i + 1;
        } else {
            break;
        }
    }
    names.iter().map(|n| n[cut..].to_string()).collect()
}

/// A horizontal bar chart, one row per layer: the signed `values` diverging from zero (red
/// positive, blue negative) and, when given, `abs` (Σ|part|) as grey bars in a second panel
/// with its own scale.
pub fn layer_svg(names: &[String], values: &[f64], abs: Option<&[f64]>) -> String {
    let labels = strip_common_prefix(names);
    let (label_w, row, top) = (130.0, 16.0, 30.0);
    let signed_w = if abs.is_some() { 170.0 } else { 300.0 };
    let value_w = 62.0;
    let abs_w = 110.0;
    let w = label_w + signed_w + value_w + if abs.is_some() { abs_w + value_w } else { 0.0 };
    let n = names.len().min(values.len());
    let height = top + row * n as f64 + 24.0;
    let finite = |x: &f64| x.is_finite();
    let lo = values.iter().copied().filter(finite).fold(0.0, f64::min);
    let mut hi = values.iter().copied().filter(finite).fold(0.0, f64::max);
    if hi - lo <= 0.0 {
        hi = 1.0;
    }
    let x = |v: f64| label_w + (v - lo) / (hi - lo) * signed_w;
    let abs_x0 = label_w + signed_w + value_w;
    let abs_max = abs
        .map(|a| a.iter().copied().filter(finite).fold(0.0, f64::max))
        .filter(|m| *m > 0.0)
        .unwrap_or(1.0);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart layers\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" viewBox=\"0 0 {w} {height}\" font-family=\"system-ui,sans-serif\" font-size=\"11\" role=\"img\" aria-label=\"influence per layer\">"
    );
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"14\" text-anchor=\"middle\" fill=\"#1f2328\" font-weight=\"600\">signed total</text>",
        label_w + signed_w / 2.0
    );
    if abs.is_some() {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"14\" text-anchor=\"middle\" fill=\"#1f2328\" font-weight=\"600\">Σ |part|</text>",
            abs_x0 + abs_w / 2.0
        );
    }
    let _ = write!(
        s,
        "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#57606a\"/>",
        x(0.0),
        top - 4.0,
        top + row * n as f64 + 2.0
    );
    for i in 0..n {
        let y = top + row * i as f64;
        let v = values[i];
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#1f2328\"><title>{}</title>{}</text>",
            label_w - 6.0,
            y + row * 0.72,
            escape(&names[i]),
            escape(&short(&labels[i], 22))
        );
        if v.is_finite() {
            let (x0, x1) = if v >= 0.0 {
                (x(0.0), x(v))
            } else {
                (x(v), x(0.0))
            };
            let _ = write!(
                s,
                "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                y + 3.0,
                (x1 - x0).max(0.5),
                row - 6.0,
                if v >= 0.0 { "#dc2626" } else { "#2563eb" },
                escape(&names[i]),
                escape(&fmt_score(v))
            );
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#57606a\" font-size=\"10\">{}</text>",
                label_w + signed_w + 4.0,
                y + row * 0.72,
                escape(&fmt_score(v))
            );
        }
        if let Some(a) = abs.and_then(|a| a.get(i)).filter(|a| a.is_finite()) {
            let _ = write!(
                s,
                "<rect x=\"{abs_x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#8c959f\"><title>{}: Σ|part| {}</title></rect><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#57606a\" font-size=\"10\">{}</text>",
                y + 3.0,
                (a / abs_max * abs_w).max(0.5),
                row - 6.0,
                escape(&names[i]),
                escape(&fmt_score(*a)),
                abs_x0 + abs_w + 4.0,
                y + row * 0.72,
                escape(fmt_score(*a).trim_start_matches('+'))
            );
        }
    }
    let base = top + row * n as f64 + 16.0;
    // Ticks at the ends, and at zero where it does not crowd them.
    let mut ticks = vec![lo, hi];
    if (x(0.0) - x(lo)).min(x(hi) - x(0.0)) >= 60.0 {
        ticks.push(0.0);
    }
    for v in ticks {
        let anchor = if v == lo {
            "start"
        } else if v == hi {
            "end"
        } else {
            "middle"
        };
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{base:.1}\" text-anchor=\"{anchor}\" fill=\"#57606a\" font-size=\"10\">{}</text>",
            x(v),
            escape(&fmt_score(v))
        );
    }
    s.push_str("</svg>");
    s
}

/// Ranks 1..=n thinned to about 60 points per decade (all of the first 60).
fn plotted_ranks(n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut last = 0usize;
    for r in 1..=n {
        if r <= 60 || (r as f64) >= last as f64 * 1.04 || r == n {
            out.push(r);
            last = r;
        }
    }
    out
}

/// The log-log survival function of the scores: P(score ≥ x) for the positive scores (red) and
/// P(score ≤ −x) for the negative ones (blue), each over all scored sequences, with the fitted
/// power-law tail of the positive scores (dashed).
pub fn survival_svg(d: &Distribution, fit: Option<&PowerLawFit>) -> String {
    let (w, h) = (520.0, 340.0);
    let (l, r, t, b) = (58.0, 16.0, 14.0, 40.0);
    let count = d.count.max(1) as f64;
    let series = |tail: &[f64]| -> Vec<(f64, f64)> {
        plotted_ranks(tail.len())
            .into_iter()
            .filter(|&r| tail[r - 1] > 0.0 && tail[r - 1].is_finite())
            .map(|r| (tail[r - 1].log10(), (r as f64 / count).log10()))
            .collect()
    };
    let pos = series(&d.tail_pos);
    let neg = series(&d.tail_neg);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart survival\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"system-ui,sans-serif\" font-size=\"11\" role=\"img\" aria-label=\"survival function of the scores, log-log\">"
    );
    if pos.is_empty() && neg.is_empty() {
        s.push_str("<text x=\"20\" y=\"40\">no non-zero scores</text></svg>");
        return s;
    }
    let all = pos.iter().chain(&neg);
    let (mut x0, mut x1) = all
        .clone()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let mut y0 = all.fold(0.0f64, |a, p| a.min(p.1));
    let y1 = 0.0;
    x0 = x0.floor();
    x1 = x1.ceil().max(x0 + 1.0);
    y0 = y0.floor().min(y1 - 1.0);
    let px = |v: f64| l + (v - x0) / (x1 - x0) * (w - l - r);
    let py = |v: f64| t + (y1 - v) / (y1 - y0) * (h - t - b);
    // Frame and decade ticks.
    let _ = write!(
        s,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" stroke=\"#8c959f\"/>",
        w - l - r,
        h - t - b
    );
    let step_x = ((x1 - x0) / 8.0).ceil().max(1.0);
    let mut e = x0;
    while e <= x1 + 1e-9 {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{t}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#eaeef2\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\" fill=\"#57606a\">10<tspan dy=\"-5\" font-size=\"9\">{3}</tspan></text>",
            px(e),
            h - b,
            h - b + 16.0,
            e as i64
        );
        e += step_x;
    }
    let step_y = ((y1 - y0) / 7.0).ceil().max(1.0);
    let mut e = y1;
    while e >= y0 - 1e-9 {
        let _ = write!(
            s,
            "<line x1=\"{l}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#eaeef2\"/><text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\" fill=\"#57606a\">10<tspan dy=\"-5\" font-size=\"9\">{4}</tspan></text>",
            py(e),
            w - r,
            l - 6.0,
            py(e) + 4.0,
            e as i64
        );
        e -= step_y;
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#1f2328\">|score|</text><text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\" fill=\"#1f2328\">share of sequences ≥ |score|</text>",
        l + (w - l - r) / 2.0,
        h - 6.0,
        t + (h - t - b) / 2.0
    );
    for (pts, colour, name) in [(&neg, "#2563eb", "negative"), (&pos, "#dc2626", "positive")] {
        if pts.is_empty() {
            continue;
        }
        let _ = write!(
            s,
            "<g class=\"series {name}\" fill=\"{colour}\" fill-opacity=\"0.75\">"
        );
        for (a, b) in pts.iter() {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\"/>",
                px(*a),
                py(*b)
            );
        }
        s.push_str("</g>");
    }
    if let Some(f) = fit {
        let xmax = d.tail_pos.first().copied().unwrap_or(f.x_min).max(f.x_min);
        let ymin = f.n_tail as f64 / count;
        // S(x) = (n_tail / count) · (x / x_min)^(1 − α) for x ≥ x_min.
        let (a0, b0) = (f.x_min.log10(), ymin.log10());
        let a1 = xmax.log10();
        let b1 = b0 + (1.0 - f.alpha) * (a1 - a0);
        let _ = write!(
            s,
            "<line class=\"fit\" x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#1f2328\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>",
            px(a0),
            py(b0),
            px(a1),
            py(b1.max(y0))
        );
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#8c959f\" stroke-dasharray=\"2 3\"/>",
            px(a0),
            t,
            h - b
        );
    }
    // Legend, lower left: a survival curve on log-log axes leaves that corner empty.
    let lx = l + 6.0;
    let lh = if fit.is_some() { 56.0 } else { 40.0 };
    let t = h - b - lh - 6.0;
    let _ = write!(
        s,
        "<g font-size=\"11\"><rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"144\" height=\"{lh}\" fill=\"#fff\" fill-opacity=\"0.9\" stroke=\"#d0d7de\"/>\
         <circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#dc2626\"/><text x=\"{:.1}\" y=\"{:.1}\">positive scores</text>\
         <circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#2563eb\"/><text x=\"{:.1}\" y=\"{:.1}\">|negative scores|</text>",
        t,
        lx + 12.0,
        t + 14.0,
        lx + 22.0,
        t + 18.0,
        lx + 12.0,
        t + 30.0,
        lx + 22.0,
        t + 34.0
    );
    if let Some(f) = fit {
        let _ = write!(
            s,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#1f2328\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\">fit α = {:.2} ± {:.2}</text>",
            lx + 5.0,
            t + 46.0,
            lx + 19.0,
            t + 46.0,
            lx + 22.0,
            t + 50.0,
            f.alpha,
            f.alpha_se
        );
    }
    s.push_str("</g></svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_numbers() {
        let names: Vec<String> = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            strip_common_prefix(&names),
            vec!["0.mlp.c_fc", "1.attn.c_attn"]
        );
        assert_eq!(
            strip_common_prefix(&names[..1]),
            vec!["transformer.h.0.mlp.c_fc"]
        );
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
