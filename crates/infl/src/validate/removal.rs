//! The calibration of the removal units (`infl validate removal`): does `group_removal_change`,
//! the predicted change of −log p(completion | prompt) when a query's top-k sequences are
//! removed from training together ([`crate::results::RemovalScale`]), match what retraining
//! without them measures?
//!
//! On a model made by `infl train` (its `training.json` is the recipe), the model is fitted and
//! scored with one strategy under `OUT/run/`; then for each query and each group size k the
//! model is retrained from scratch with exactly the recipe on the corpus without the query's
//! top-k group, and without its bottom-k group (its prediction is negative), and without
//! seeded random groups of k (the noise floor: what removing k sequences the scores did not
//! pick does to f_q, retraining's own variation included), and the measured change
//! f_q(retrained) − f_q(model) is set beside the prediction. Per k the module fits measured on predicted ([`Calibration`]: least-squares slope and
//! intercept, the slope through the origin, Pearson and Spearman) and writes `removal.json`,
//! `removal.html` (a scatter plot per k with the line y = x) and the terminal table.
//!
//! Each retrained model is saved in `OUT/work/` as it finishes ([`super::retrain`]); a rerun
//! skips the saved ones.

use super::retrain::{Recipe, Retrained, Retraining, TrainingSet};
use super::{pearson, spearman};
use crate::curvature::Strategy;
use crate::error::{Error, Result};
use crate::io;
use crate::options::{FitOptions, Normalize, QueryRank, ScoreOptions};
use crate::pass::Progress;
use crate::report::{escape, scatter_svg, Series, CSS};
use crate::results::{Direction, RemovalScale, TopEntry};
use crate::train::TrainingRecord;
use crate::workflow::{self, FitJob, ScoreJob};
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Settings of `infl validate removal`.
#[derive(Debug, Clone)]
pub struct RemovalJob {
    /// A checkpoint written by `infl train` (its `training.json` is the recipe retrained).
    pub model: PathBuf,
    /// The corpus it was trained on (checked against the recorded hash).
    pub train: PathBuf,
    pub queries: PathBuf,
    pub out: PathBuf,
    /// The group sizes k removed, each from the top and the bottom of every query's ranking.
    pub groups: Vec<usize>,
    /// The strategy whose predictions are calibrated (one with a removal scale).
    pub strategy: Strategy,
    /// Random groups of each size k per query (the control), each retrained like the others.
    pub random_groups: usize,
    /// Seeds the random groups.
    pub random_seed: u64,
    /// Models retrained at once (each single-threaded inside).
    pub threads: usize,
    /// Discard saved retraining results in `OUT/work/`.
    pub fresh: bool,
}

/// Which k sequences a removal takes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The query's k most positive scores.
    Top,
    /// Its k most negative.
    Bottom,
    /// k sequences drawn at random (seeded per query, k and group): the control.
    Random,
}

impl From<Direction> for Side {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Top => Side::Top,
            Direction::Bottom => Side::Bottom,
        }
    }
}

/// One retrained model: a query's top, bottom or a random k sequences removed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Removal {
    pub query_id: String,
    pub k: usize,
    pub side: Side,
    /// The group's summed scores in nats: `group_removal_change` at rank k of the side's list,
    /// or the random group's scores through the same scale.
    pub predicted: f64,
    /// f_q(retrained without the group) − f_q(model), nats.
    pub measured: f64,
    /// f_q under the retrained model.
    pub loss_after: f64,
    /// The removed sequences' ids (`LINE:WINDOW`): rank order, or corpus order for a random
    /// group.
    pub removed: Vec<String>,
    /// The retrained model's record, `OUT/work/NAME.json`.
    pub retrained: String,
}

/// How the measured changes follow the predicted ones over a set of removals.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    pub k: usize,
    /// The side the removals come from; None: top and bottom together.
    pub side: Option<Side>,
    pub n: usize,
    /// Least squares measured ≈ slope · predicted + intercept.
    pub slope: f64,
    pub intercept: f64,
    /// Least squares measured ≈ slope · predicted (no intercept): 1 is a calibrated scale.
    pub slope_through_origin: f64,
    pub pearson: f64,
    pub spearman: f64,
    pub mean_predicted: f64,
    pub mean_measured: f64,
    /// Standard deviation of the measured changes (n − 1): for the random side, the noise
    /// floor a top-k measurement stands out from.
    #[serde(default)]
    pub sd_measured: f64,
}

impl Calibration {
    /// The fit of `measured` on `predicted` (paired, same length). Undefined numbers are NaN
    /// (written as null): a slope with fewer than two distinct predictions, a correlation of
    /// a constant.
    pub fn of(k: usize, side: Option<Side>, predicted: &[f64], measured: &[f64]) -> Self {
        let (slope, intercept) = least_squares(predicted, measured);
        Calibration {
            k,
            side,
            n: predicted.len().min(measured.len()),
            slope,
            intercept,
            slope_through_origin: slope_through_origin(predicted, measured),
            pearson: pearson(predicted, measured),
            spearman: spearman(predicted, measured),
            mean_predicted: mean(predicted),
            mean_measured: mean(measured),
            sd_measured: sd(measured),
        }
    }
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.iter().sum::<f64>() / x.len() as f64
}

/// Sample standard deviation; NaN for fewer than two values.
fn sd(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return f64::NAN;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Ordinary least squares y ≈ a·x + b: (a, b). NaN for fewer than two distinct x.
pub fn least_squares(x: &[f64], y: &[f64]) -> (f64, f64) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let (mx, my) = (mean(x), mean(y));
    let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
    if n < 2 || sxx == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let slope = sxy / sxx;
    (slope, my - slope * mx)
}

/// Least squares y ≈ a·x through the origin: a = Σxy / Σx². NaN when every x is 0.
pub fn slope_through_origin(x: &[f64], y: &[f64]) -> f64 {
    let sxx: f64 = x.iter().map(|v| v * v).sum();
    if sxx == 0.0 {
        return f64::NAN;
    }
    x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>() / sxx
}

/// `removal.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RemovalReport {
    pub tool: String,
    pub definition: String,
    pub model: String,
    pub model_weights_sha256: String,
    pub corpus: String,
    pub corpus_sha256: String,
    pub queries: String,
    pub queries_sha256: String,
    pub query_ids: Vec<String>,
    pub n_sequences: usize,
    pub strategy: Strategy,
    /// What turned the scores into nats.
    pub removal: RemovalScale,
    pub groups: Vec<usize>,
    /// Random groups per query and k, and their seed.
    #[serde(default)]
    pub random_groups: usize,
    #[serde(default)]
    pub random_seed: u64,
    pub training: TrainingRecord,
    /// Each query's f_q under the model, in query-file order.
    pub full_model_losses: Vec<f64>,
    /// Query by query, then k: top, bottom, then the random groups.
    pub removals: Vec<Removal>,
    /// Per k: top and bottom together, then the top side, the bottom side, and (with random
    /// groups) the random side.
    pub calibration: Vec<Calibration>,
    pub retrain_seconds: f64,
    pub seconds: f64,
}

pub const REMOVAL_FILE: &str = "removal.json";
pub const REMOVAL_HTML: &str = "removal.html";
const DEFINITION: &str = "For each query q and group size k, the model is retrained from scratch with the recipe in training.json (same init seed, optimiser, schedule, epochs) on the corpus without q's top-k sequences (side top), without its bottom-k (side bottom), and without random groups of k drawn from random_seed (side random, the control: the noise floor of the measurement). measured = f_q(retrained) - f_q(model), f_q = -log p(completion | prompt) in nats; predicted = (sum of the group's scores) / N (group_removal_change at rank k for top and bottom). Per k: least squares of measured on predicted (slope, intercept; and through the origin), Pearson and Spearman correlation, over top and bottom together and per side. A calibrated scale has slope 1.";

pub fn run(job: &RemovalJob, progress: &dyn Progress) -> Result<RemovalReport> {
    let started = std::time::Instant::now();
    check(job)?;
    let recipe = Recipe::read(&job.model, &job.train, &job.queries)?;
    let n = recipe.corpus.sequences.len();
    let largest = job.groups.iter().copied().max().unwrap_or(0);
    if largest * 2 > n {
        return Err(Error::usage(format!(
            "--groups {largest}: the top and bottom {largest} of {n} training sequences overlap; use groups of at most {}",
            n / 2
        )));
    }
    io::ensure_dir(&job.out)?;
    let (top, dense, removal) = predictions(job, recipe.config.n_positions, progress)?;
    let mut planned = plan(&recipe, &top, &job.groups)?;
    planned.extend(plan_random(&recipe, &dense, &removal, job)?);
    // Query by query, then k: top, bottom, then the random groups.
    planned.sort_by_key(|p| (p.query, p.row.k, p.row.side as u8));
    let sets: Vec<TrainingSet> = planned.iter().map(|p| p.set.clone()).collect();
    let retraining = Retraining::prepare(&recipe, job.out.join("work"), job.fresh)?;
    let (retrained, retrain_seconds) = retraining.run(&sets, job.threads, progress)?;
    let removals = measure(&recipe, planned, &retrained);
    let report = RemovalReport {
        tool: format!("infl {}", env!("CARGO_PKG_VERSION")),
        definition: DEFINITION.into(),
        model: job.model.display().to_string(),
        model_weights_sha256: recipe.weights_sha256.clone(),
        corpus: job.train.display().to_string(),
        corpus_sha256: recipe.corpus_sha256.clone(),
        queries: job.queries.display().to_string(),
        queries_sha256: recipe.queries_sha256.clone(),
        query_ids: recipe.queries.iter().map(|q| q.id.clone()).collect(),
        n_sequences: n,
        strategy: job.strategy,
        removal,
        groups: job.groups.clone(),
        random_groups: job.random_groups,
        random_seed: job.random_seed,
        full_model_losses: recipe.full_model_losses.clone(),
        training: recipe.training,
        calibration: calibrate(&removals, &job.groups, job.random_groups > 0),
        removals,
        retrain_seconds,
        seconds: started.elapsed().as_secs_f64(),
    };
    io::write_json(&job.out.join(REMOVAL_FILE), &report)?;
    io::write_atomic(&job.out.join(REMOVAL_HTML), report.html().as_bytes())?;
    Ok(report)
}

/// The settings no run can satisfy, refused before any work.
fn check(job: &RemovalJob) -> Result<()> {
    if job.groups.is_empty() || job.groups.contains(&0) {
        return Err(Error::usage(
            "--groups: give one or more group sizes k, each at least 1",
        ));
    }
    if job.strategy == Strategy::Identity {
        return Err(Error::usage(
            "--strategy identity: its scores have no removal scale (no curvature); calibrate ekfac, kfac, diagonal or ekfac-refined",
        ));
    }
    Ok(())
}

/// Fits and scores the model with the job's strategy under `OUT/run/` (full-rank queries,
/// top and bottom lists as long as the largest group, dense scores for the random groups).
/// Returns `top_k.jsonl`'s entries, the `[query][sequence]` scores and the scale that turned
/// the scores into nats.
fn predictions(
    job: &RemovalJob,
    max_len: usize,
    progress: &dyn Progress,
) -> Result<(Vec<TopEntry>, Vec<Vec<f64>>, RemovalScale)> {
    let dir = job.out.join("run");
    let options = FitOptions {
        strategy: job.strategy,
        max_len: Some(max_len),
        ..FitOptions::default()
    };
    workflow::fit(
        &FitJob::new(
            job.model.clone(),
            job.train.clone(),
            dir.join("factors"),
            options,
        ),
        progress,
    )?;
    let summary = workflow::score(
        &ScoreJob {
            options: ScoreOptions {
                top_k: job.groups.iter().copied().max().unwrap_or(1),
                dense: job.random_groups > 0,
                query_rank: QueryRank::FULL,
                normalize: Normalize::None,
                ..ScoreOptions::default()
            },
            ..ScoreJob::new(
                job.model.clone(),
                dir.join("factors"),
                job.train.clone(),
                job.queries.clone(),
                dir.join("results"),
            )
        },
        progress,
    )?;
    let removal = summary.meta.removal.clone().ok_or_else(|| {
        Error::Other(format!(
            "{}: the scores carry no removal scale",
            dir.join("results").display()
        ))
    })?;
    let dense = match job.random_groups {
        0 => Vec::new(),
        _ => super::exact::read_dense(&dir.join("results"))?,
    };
    Ok((summary.top, dense, removal))
}

/// A removal to retrain: its row (measurement pending) and its training set.
struct Planned {
    row: Removal,
    query: usize,
    set: TrainingSet,
}

/// One training set per (query, k, side): the corpus without the side's first k sequences.
fn plan(recipe: &Recipe, top: &[TopEntry], groups: &[usize]) -> Result<Vec<Planned>> {
    let index: HashMap<&str, usize> = recipe
        .corpus
        .sequences
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut out = Vec::new();
    for (qi, q) in recipe.queries.iter().enumerate() {
        for &k in groups {
            for side in [Direction::Top, Direction::Bottom] {
                let mut list: Vec<&TopEntry> = top
                    .iter()
                    .filter(|e| e.query_id == q.id && e.direction == side)
                    .collect();
                list.sort_by_key(|e| e.rank);
                let group = list.get(..k).ok_or_else(|| {
                    Error::Other(format!(
                        "query {}: {} {side:?} sequences scored, fewer than k = {k}",
                        q.id,
                        list.len()
                    ))
                })?;
                let removed: Vec<usize> = group
                    .iter()
                    .map(|e| {
                        index.get(e.sequence_id.as_str()).copied().ok_or_else(|| {
                            Error::Other(format!("sequence {} is not in the corpus", e.sequence_id))
                        })
                    })
                    .collect::<Result<_>>()?;
                let predicted = group
                    .last()
                    .and_then(|e| e.group_removal_change)
                    .ok_or_else(|| {
                        Error::Other("top_k.jsonl has no group_removal_change".into())
                    })?;
                let side_name = if side == Direction::Top {
                    "top"
                } else {
                    "bottom"
                };
                let name = format!("q{qi:04}-k{k}-{side_name}");
                out.push(Planned {
                    row: Removal {
                        query_id: q.id.clone(),
                        k,
                        side: side.into(),
                        predicted,
                        measured: f64::NAN,
                        loss_after: f64::NAN,
                        removed: group.iter().map(|e| e.sequence_id.clone()).collect(),
                        retrained: name.clone(),
                    },
                    query: qi,
                    set: TrainingSet {
                        name,
                        keep: (0..recipe.corpus.sequences.len())
                            .filter(|i| !removed.contains(i))
                            .collect(),
                    },
                });
            }
        }
    }
    Ok(out)
}

/// `k` distinct corpus indices of `0..n`, sorted, drawn from the seed, the query, k and the
/// group alone (so adding a query or a group size does not change the others' groups).
pub fn random_group(n: usize, k: usize, (seed, query, group): (u64, usize, usize)) -> Vec<usize> {
    let mut h = Sha256::new();
    h.update(format!("infl-removal-random:{seed}:{query}:{k}:{group}"));
    let digest = h.finalize();
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&digest);
    let mut rng = rand_chacha::ChaCha8Rng::from_seed(bytes);
    let mut out = rand::seq::index::sample(&mut rng, n, k.min(n)).into_vec();
    out.sort_unstable();
    out
}

/// The random groups: `job.random_groups` per query and k, predicted through the same scale
/// as the top and bottom groups from the dense scores.
fn plan_random(
    recipe: &Recipe,
    dense: &[Vec<f64>],
    removal: &RemovalScale,
    job: &RemovalJob,
) -> Result<Vec<Planned>> {
    let n = recipe.corpus.sequences.len();
    let mut out = Vec::new();
    for (qi, q) in recipe.queries.iter().enumerate() {
        let row = dense.get(qi).filter(|r| r.len() == n);
        for &k in &job.groups {
            for g in 0..job.random_groups {
                let row = row.ok_or_else(|| {
                    Error::Other(format!("query {}: the dense scores are not 1 × {n}", q.id))
                })?;
                let removed = random_group(n, k, (job.random_seed, qi, g));
                let score: f64 = removed.iter().map(|&i| row[i]).sum();
                let name = format!("q{qi:04}-k{k}-random{g}");
                out.push(Planned {
                    row: Removal {
                        query_id: q.id.clone(),
                        k,
                        side: Side::Random,
                        predicted: removal.removal_change(score),
                        measured: f64::NAN,
                        loss_after: f64::NAN,
                        removed: removed
                            .iter()
                            .map(|&i| recipe.corpus.sequences[i].id.clone())
                            .collect(),
                        retrained: name.clone(),
                    },
                    query: qi,
                    set: TrainingSet {
                        name,
                        keep: (0..n)
                            .filter(|i| removed.binary_search(i).is_err())
                            .collect(),
                    },
                });
            }
        }
    }
    Ok(out)
}

/// Each planned removal with its measurement from its retrained model (`retrained` in
/// `planned` order).
fn measure(recipe: &Recipe, planned: Vec<Planned>, retrained: &[Retrained]) -> Vec<Removal> {
    planned
        .into_iter()
        .zip(retrained)
        .map(|(p, r)| {
            let after = r.losses.get(p.query).copied().unwrap_or(f64::NAN);
            let before = recipe
                .full_model_losses
                .get(p.query)
                .copied()
                .unwrap_or(f64::NAN);
            Removal {
                measured: after - before,
                loss_after: after,
                ..p.row
            }
        })
        .collect()
}

/// Per k: top and bottom together, then the top side, the bottom side and (`random`) the
/// random side.
pub fn calibrate(removals: &[Removal], groups: &[usize], random: bool) -> Vec<Calibration> {
    let mut out = Vec::new();
    let mut sides = vec![None, Some(Side::Top), Some(Side::Bottom)];
    if random {
        sides.push(Some(Side::Random));
    }
    for &k in groups {
        for &side in &sides {
            let (p, m): (Vec<f64>, Vec<f64>) = removals
                .iter()
                .filter(|r| {
                    r.k == k
                        && match side {
                            None => r.side != Side::Random,
                            Some(s) => r.side == s,
                        }
                })
                .map(|r| (r.predicted, r.measured))
                .unzip();
            out.push(Calibration::of(k, side, &p, &m));
        }
    }
    out
}

fn side_name(side: Option<Side>) -> &'static str {
    match side {
        None => "both",
        Some(Side::Top) => "top",
        Some(Side::Bottom) => "bottom",
        Some(Side::Random) => "random",
    }
}

impl RemovalReport {
    /// The terminal table: one row per k and side.
    pub fn table(&self) -> String {
        let mut s = format!(
            "removal calibration ({}): {} queries, {} training sequences; predicted = group_removal_change, measured = change of −log p after retraining without the group (nats); both = top and bottom; random = seeded random groups (the noise floor)\n{:>4} {:<7} {:>4} {:>9} {:>10} {:>13} {:>8} {:>9} {:>10} {:>10} {:>8}\n",
            self.strategy.name(),
            self.query_ids.len(),
            self.n_sequences,
            "k",
            "side",
            "n",
            "slope",
            "intercept",
            "slope via 0",
            "Pearson",
            "Spearman",
            "mean pred",
            "mean meas",
            "sd meas"
        );
        for c in &self.calibration {
            let _ = writeln!(
                s,
                "{:>4} {:<7} {:>4} {:>9.3} {:>10.3} {:>13.3} {:>8.3} {:>9.3} {:>+10.3} {:>+10.3} {:>8.3}",
                c.k,
                side_name(c.side),
                c.n,
                c.slope,
                c.intercept,
                c.slope_through_origin,
                c.pearson,
                c.spearman,
                c.mean_predicted,
                c.mean_measured,
                c.sd_measured
            );
        }
        s
    }

    /// `removal.html`: self-contained (inline CSS and SVG): per k, measured against predicted
    /// with the line y = x and the fit's numbers; then every removal.
    pub fn html(&self) -> String {
        let mut h = format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>infl validate removal</title><style>{CSS}</style></head><body><main>\
             <h1>Removal calibration: predicted against measured</h1>\
             <p class=\"sub\">{} · model {} · corpus {} ({} sequences) · {} queries · strategy {} · N = {} {}</p>\
             <p class=\"stat\">{}</p>",
            escape(&self.tool),
            escape(&self.model),
            escape(&self.corpus),
            self.n_sequences,
            self.query_ids.len(),
            self.strategy.name(),
            self.removal.divisor,
            escape(&self.removal.counts),
            escape(DEFINITION)
        );
        for &k in &self.groups {
            self.html_group(&mut h, k);
        }
        h.push_str("<section class=\"panel\"><h2>Every removal</h2><table><tr><th>query</th><th>k</th><th>side</th><th>predicted</th><th>measured</th></tr>");
        for r in &self.removals {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{:+.4}</td><td class=\"num\">{:+.4}</td></tr>",
                escape(&r.query_id),
                r.k,
                side_name(Some(r.side)),
                r.predicted,
                r.measured
            );
        }
        h.push_str("</table></section></main></body></html>\n");
        h
    }

    /// One k's panel: the scatter plot and the fit per side.
    fn html_group(&self, h: &mut String, k: usize) {
        let points = |side: Side| -> Vec<(f64, f64)> {
            self.removals
                .iter()
                .filter(|r| r.k == k && r.side == side)
                .map(|r| (r.predicted, r.measured))
                .collect()
        };
        let (top, bottom, random) = (
            points(Side::Top),
            points(Side::Bottom),
            points(Side::Random),
        );
        let svg = scatter_svg(
            &[
                Series {
                    name: format!("top-{k} removed"),
                    colour: "#dc2626",
                    points: &top,
                },
                Series {
                    name: format!("bottom-{k} removed"),
                    colour: "#2563eb",
                    points: &bottom,
                },
                Series {
                    name: format!("random {k} removed"),
                    colour: "#6b7280",
                    points: &random,
                },
            ],
            "predicted change of −log p (nats)",
            "measured change of −log p (nats)",
        );
        let _ = write!(
            h,
            "<section class=\"panel\"><h2>k = {k}</h2><div class=\"figs\"><div class=\"fig\">{svg}</div><div class=\"fig\"><table><tr><th>side</th><th>n</th><th>slope</th><th>intercept</th><th>slope through 0</th><th>Pearson</th><th>Spearman</th></tr>"
        );
        for c in self.calibration.iter().filter(|c| c.k == k) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}</td></tr>",
                side_name(c.side),
                c.n,
                c.slope,
                c.intercept,
                c.slope_through_origin,
                c.pearson,
                c.spearman
            );
        }
        h.push_str("</table><p class=\"legend\">Dashed: y = x, where a calibrated prediction lies. Slope through 0 = Σ pred·meas / Σ pred².</p></div></div></section>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_and_the_slope_through_the_origin_by_hand() {
        // y = 2x + 1 exactly.
        let x = [0.0, 1.0, 2.0, 3.0];
        let y = [1.0, 3.0, 5.0, 7.0];
        assert_eq!(least_squares(&x, &y), (2.0, 1.0));
        // Through the origin: Σxy = 0+3+10+21 = 34, Σx² = 14.
        assert!((slope_through_origin(&x, &y) - 34.0 / 14.0).abs() < 1e-12);
        // x = [1, 2, 3], y = [1, 3, 2]: mean 2, 2; Sxy = (−1)(−1) + 0 + (1)(0) = 1, Sxx = 2.
        let (a, b) = least_squares(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]);
        assert!(
            (a - 0.5).abs() < 1e-12 && (b - 1.0).abs() < 1e-12,
            "{a} {b}"
        );
        // Undefined: one point, a constant x, all-zero x.
        assert!(least_squares(&[1.0], &[2.0]).0.is_nan());
        assert!(least_squares(&[2.0, 2.0], &[1.0, 3.0]).1.is_nan());
        assert!(slope_through_origin(&[0.0, 0.0], &[1.0, 2.0]).is_nan());
    }

    fn row(k: usize, side: Side, predicted: f64, measured: f64) -> Removal {
        Removal {
            query_id: "q".into(),
            k,
            side,
            predicted,
            measured,
            loss_after: 0.0,
            removed: vec![],
            retrained: String::new(),
        }
    }

    #[test]
    fn calibration_is_per_k_over_both_sides_and_each_side() {
        let (t, b) = (Side::Top, Side::Bottom);
        // k = 10: measured = 0.5 · predicted exactly; k = 50: one point per side.
        let rows = [
            row(10, t, 2.0, 1.0),
            row(10, t, 4.0, 2.0),
            row(10, b, -2.0, -1.0),
            row(10, b, -6.0, -3.0),
            row(50, t, 1.0, 3.0),
            row(50, b, -1.0, 1.0),
        ];
        let c = calibrate(&rows, &[10, 50], false);
        assert_eq!(c.len(), 6);
        assert_eq!((c[0].k, c[0].side, c[0].n), (10, None, 4));
        assert!((c[0].slope - 0.5).abs() < 1e-12 && c[0].intercept.abs() < 1e-12);
        assert!((c[0].slope_through_origin - 0.5).abs() < 1e-12);
        assert!((c[0].pearson - 1.0).abs() < 1e-12 && (c[0].spearman - 1.0).abs() < 1e-12);
        assert_eq!((c[1].side, c[1].n), (Some(t), 2));
        assert_eq!((c[2].side, c[2].n, c[2].mean_predicted), (Some(b), 2, -4.0));
        // k = 50 both: (1, 3), (−1, 1): slope 1, intercept 2; through 0: (3 − 1) / 2 = 1.
        assert_eq!((c[3].slope, c[3].intercept), (1.0, 2.0));
        assert_eq!(c[3].slope_through_origin, 1.0);
        // One point per side: no slope, no correlation.
        assert!(c[4].slope.is_nan() && c[4].pearson.is_nan());
        assert_eq!(c[4].slope_through_origin, 3.0);
    }

    #[test]
    fn random_groups_are_seeded_distinct_and_of_size_k() {
        let a = random_group(80, 5, (3, 0, 0));
        assert_eq!(a, random_group(80, 5, (3, 0, 0)), "same seed, same group");
        assert_eq!(a.len(), 5);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&i| i < 80));
        // Another seed, query or group draws another group.
        for other in [(4, 0, 0), (3, 1, 0), (3, 0, 1)] {
            assert_ne!(a, random_group(80, 5, other), "{other:?}");
        }
        assert_eq!(random_group(4, 9, (0, 0, 0)), vec![0, 1, 2, 3]);
    }

    #[test]
    fn the_random_side_has_its_own_row_and_stays_out_of_both() {
        let rows = [
            row(10, Side::Top, 2.0, 1.0),
            row(10, Side::Bottom, -2.0, -1.0),
            row(10, Side::Random, 0.1, 0.3),
            row(10, Side::Random, -0.1, -0.1),
        ];
        let c = calibrate(&rows, &[10], true);
        assert_eq!(c.len(), 4);
        assert_eq!((c[0].side, c[0].n), (None, 2));
        assert_eq!((c[3].side, c[3].n), (Some(Side::Random), 2));
        // measured 0.3, −0.1: mean 0.1, s.d. √((0.04 + 0.04) / 1).
        assert!((c[3].mean_measured - 0.1).abs() < 1e-12);
        assert!((c[3].sd_measured - 0.08f64.sqrt()).abs() < 1e-12);
    }
}
