//! `infl report`: reads a results directory written by `infl score` and writes one
//! self-contained HTML file (inline CSS and SVG; no network, no scripts from elsewhere) that a
//! person reads in a browser: an index of queries, and per query the prompt and completion,
//! −log p, the top and bottom training sequences with per-token highlighting, a per-layer bar
//! chart and the log-log survival plot of the scores with the fitted power-law tail.
//!
//! Optional parts of the results directory (per-layer and per-token parts, the distribution
//! statistics) may be missing; the report then says which `infl score` flag produces them.
//!
//! `html` writes the page, `charts` its two SVG charts, `experts` the per-expert table of a
//! mixture of experts, `run` what a report shows of the rest
//! of a run (other methods' rankings, a recall table: [`RunContext`]), `trust` the pre-filter's
//! recall and the ranking's stability across fits; the results are read by
//! [`crate::results::Results`].

mod charts;
mod experts;
mod html;
mod run;
mod trust;

use crate::error::Result;
use crate::io;
use crate::powerlaw::{self, HalfMass, PowerLawFit};
use std::path::Path;

pub use crate::results::{Direction, Distribution, LayerTotals, QueryInfo, Results, TokenPart};
pub use charts::{layer_svg, scatter_svg, survival_svg, Series};
pub(crate) use html::CSS;
pub use html::{colour_scale, escape, fmt_score, render, token_colour, token_window};
pub use run::{Ranking, RecallRow, RunContext};

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
    write_run_report(results_dir, out, opts, &RunContext::default())
}

/// [`write_report`] with the rest of the run shown beside the results ([`RunContext`]).
pub fn write_run_report(
    results_dir: &Path,
    out: &Path,
    opts: &ReportOptions,
    run: &RunContext,
) -> Result<ReportSummary> {
    let results = Results::open(results_dir)?;
    let tails: Vec<TailAnalysis> = results
        .distribution
        .iter()
        .flatten()
        .map(|d| analyse(d, &opts.fit))
        .collect();
    let missing = results.missing();
    let html = render(&results, &tails, &missing, opts.max_tokens, run);
    io::write_atomic(out, html.as_bytes())?;
    Ok(ReportSummary {
        tails,
        missing,
        bytes: html.len(),
    })
}
