//! The report's SVG charts: influence per layer (bars), the log-log survival function of a
//! query's scores with its fitted power-law tail, and the calibration scatter plot of `infl
//! validate removal` (measured against predicted, with y = x).

use super::html::{escape, fmt_score, short};
use crate::powerlaw::PowerLawFit;
use crate::results::Distribution;
use std::fmt::Write as _;

/// The layer names the report shows everywhere (chart rows and sequence rows): the checkpoint
/// names of meta.json without the dotted prefix they all share (`transformer.`), but never
/// cutting into the block path (`h.0.mlp.c_fc` stays whole, not `0.mlp.c_fc`).
pub fn layer_labels(names: &[String]) -> Vec<String> {
    let first = match names.first() {
        Some(f) if names.len() > 1 => f,
        _ => return names.to_vec(),
    };
    let mut cut = 0;
    for (i, _) in first.match_indices('.') {
        let prefix = &first[..=i];
        let shared = names
            .iter()
            .all(|n| n.starts_with(prefix) && n.len() > prefix.len());
        // A block index after the cut would leave `0.mlp…`: keep the component naming it.
        let index_next = first[i + 1..].starts_with(|c: char| c.is_ascii_digit());
        if !shared || index_next {
            break;
        }
        cut = i + 1;
    }
    names.iter().map(|n| n[cut..].to_string()).collect()
}

/// A horizontal bar chart, one row per layer: the signed `values` diverging from zero (red
/// positive, blue negative) and, when given, `abs` (Σ|part|) as grey bars in a second panel
/// with its own scale.
pub fn layer_svg(names: &[String], values: &[f64], abs: Option<&[f64]>) -> String {
    let labels = layer_labels(names);
    let c = LayerChart::new(values, abs);
    let (label_w, row, top, signed_w, abs_w) = (c.label_w, c.row, c.top, c.signed_w, c.abs_w);
    let w = label_w
        + signed_w
        + c.value_w
        + if abs.is_some() {
            abs_w + c.value_w
        } else {
            0.0
        };
    let n = names.len().min(values.len());
    let height = top + row * n as f64 + 24.0;
    let x = |v: f64| c.x(v);
    let abs_x0 = c.abs_x0();
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
        let part_abs = abs.and_then(|a| a.get(i)).copied();
        layer_row(
            &mut s,
            &c,
            (&names[i], &labels[i]),
            top + row * i as f64,
            (values[i], part_abs),
        );
    }
    layer_ticks(&mut s, &c, top + row * n as f64 + 16.0);
    s.push_str("</svg>");
    s
}

/// Where [`layer_svg`] draws: the columns' widths and the value ranges of its two panels.
struct LayerChart {
    label_w: f64,
    row: f64,
    top: f64,
    signed_w: f64,
    value_w: f64,
    abs_w: f64,
    lo: f64,
    hi: f64,
    abs_max: f64,
}

impl LayerChart {
    fn new(values: &[f64], abs: Option<&[f64]>) -> Self {
        let finite = |x: &f64| x.is_finite();
        let lo = values.iter().copied().filter(finite).fold(0.0, f64::min);
        let mut hi = values.iter().copied().filter(finite).fold(0.0, f64::max);
        if hi - lo <= 0.0 {
            hi = 1.0;
        }
        LayerChart {
            label_w: 175.0,
            row: 16.0,
            top: 30.0,
            signed_w: if abs.is_some() { 170.0 } else { 300.0 },
            value_w: 62.0,
            abs_w: 110.0,
            lo,
            hi,
            abs_max: abs
                .map(|a| a.iter().copied().filter(finite).fold(0.0, f64::max))
                .filter(|m| *m > 0.0)
                .unwrap_or(1.0),
        }
    }

    /// The x of value `v` in the signed panel.
    fn x(&self, v: f64) -> f64 {
        self.label_w + (v - self.lo) / (self.hi - self.lo) * self.signed_w
    }

    /// Where the Σ|part| panel starts.
    fn abs_x0(&self) -> f64 {
        self.label_w + self.signed_w + self.value_w
    }
}

/// One layer's row at height `y`: its label, its signed bar and value, and its Σ|part| bar.
fn layer_row(
    s: &mut String,
    c: &LayerChart,
    (name, label): (&str, &str),
    y: f64,
    (v, abs): (f64, Option<f64>),
) {
    let (label_w, row, signed_w, abs_w, abs_max) =
        (c.label_w, c.row, c.signed_w, c.abs_w, c.abs_max);
    let x = |v: f64| c.x(v);
    let abs_x0 = c.abs_x0();
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#1f2328\"><title>{}</title>{}</text>",
        label_w - 6.0,
        y + row * 0.72,
        escape(name),
        escape(&short(label, 28))
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
            escape(name),
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
    if let Some(a) = abs.filter(|a| a.is_finite()) {
        let _ = write!(
            s,
            "<rect x=\"{abs_x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#8c959f\"><title>{}: Σ|part| {}</title></rect><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#57606a\" font-size=\"10\">{}</text>",
            y + 3.0,
            (a / abs_max * abs_w).max(0.5),
            row - 6.0,
            escape(name),
            escape(&fmt_score(a)),
            abs_x0 + abs_w + 4.0,
            y + row * 0.72,
            escape(fmt_score(a).trim_start_matches('+'))
        );
    }
}

/// The signed panel's value ticks along `base`.
fn layer_ticks(s: &mut String, c: &LayerChart, base: f64) {
    let (lo, hi) = (c.lo, c.hi);
    let x = |v: f64| c.x(v);
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
    let (w, h) = (SURVIVAL_BOX.0, SURVIVAL_BOX.1);
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
    let fr = SurvivalFrame::around(&pos, &neg);
    survival_axes(&mut s, &fr);
    survival_points(&mut s, &fr, &pos, &neg);
    if let Some(f) = fit {
        survival_fit(&mut s, &fr, d, f);
    }
    survival_legend(&mut s, fit);
    s.push_str("</svg>");
    s
}

/// [`survival_svg`]'s size and margins: width, height, left, right, top, bottom.
const SURVIVAL_BOX: (f64, f64, f64, f64, f64, f64) = (520.0, 340.0, 58.0, 16.0, 14.0, 40.0);

/// [`survival_svg`]'s axes: log10 |score| from `x0` to `x1`, log10 share from `y0` to `y1`
/// (whole decades), and where they land in the box.
struct SurvivalFrame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl SurvivalFrame {
    /// Whole decades around the plotted points (at least one each way).
    fn around(pos: &[(f64, f64)], neg: &[(f64, f64)]) -> Self {
        let all = pos.iter().chain(neg);
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
        SurvivalFrame { x0, x1, y0, y1 }
    }

    fn px(&self, v: f64) -> f64 {
        let (w, _, l, r, _, _) = SURVIVAL_BOX;
        l + (v - self.x0) / (self.x1 - self.x0) * (w - l - r)
    }

    fn py(&self, v: f64) -> f64 {
        let (_, h, _, _, t, b) = SURVIVAL_BOX;
        t + (self.y1 - v) / (self.y1 - self.y0) * (h - t - b)
    }
}

/// The frame, the decade ticks and grid lines, and the axis titles.
fn survival_axes(s: &mut String, fr: &SurvivalFrame) {
    let (w, h, l, r, t, b) = SURVIVAL_BOX;
    let px = |v: f64| fr.px(v);
    let py = |v: f64| fr.py(v);
    let (x0, x1, y0, y1) = (fr.x0, fr.x1, fr.y0, fr.y1);
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
}

/// The positive and |negative| scores' points.
fn survival_points(s: &mut String, fr: &SurvivalFrame, pos: &[(f64, f64)], neg: &[(f64, f64)]) {
    let px = |v: f64| fr.px(v);
    let py = |v: f64| fr.py(v);
    for (pts, colour, name) in [(neg, "#2563eb", "negative"), (pos, "#dc2626", "positive")] {
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
}

/// The fitted power law of the positive tail (dashed) and a marker at x_min.
fn survival_fit(s: &mut String, fr: &SurvivalFrame, d: &Distribution, f: &PowerLawFit) {
    let (_, h, _, _, t, b) = SURVIVAL_BOX;
    let px = |v: f64| fr.px(v);
    let py = |v: f64| fr.py(v);
    let y0 = fr.y0;
    let count = d.count.max(1) as f64;
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

/// The legend, lower left: a survival curve on log-log axes leaves that corner empty.
fn survival_legend(s: &mut String, fit: Option<&PowerLawFit>) {
    let (_, h, l, _, _, b) = SURVIVAL_BOX;
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
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#1f2328\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            lx + 5.0,
            t + 46.0,
            lx + 19.0,
            t + 46.0,
            lx + 22.0,
            t + 50.0,
            escape(&fit_legend(f))
        );
    }
    s.push_str("</g>");
}

/// The fit's legend entry: α only with its verdict.
fn fit_legend(f: &PowerLawFit) -> String {
    let caveat = if f.sample_too_small() {
        ", too few values"
    } else {
        ""
    };
    match f.verdict() {
        crate::powerlaw::Verdict::RuledOut(_) => "fit: power law ruled out".into(),
        _ => format!("fit α = {:.2} ± {:.2}{caveat}", f.alpha, f.alpha_se),
    }
}

/// One series of [`scatter_svg`]: its legend name, colour and (x, y) points.
pub struct Series<'a> {
    pub name: String,
    pub colour: &'static str,
    pub points: &'a [(f64, f64)],
}

/// [`scatter_svg`]'s size and margins: width, height, left, right, top, bottom.
const SCATTER_BOX: (f64, f64, f64, f64, f64, f64) = (480.0, 400.0, 62.0, 16.0, 14.0, 44.0);

/// A scatter plot of `series` on linear axes that include 0, with the line y = x (dashed)
/// where it crosses the frame: a calibration plot, measured (y) against predicted (x).
pub fn scatter_svg(series: &[Series], x_title: &str, y_title: &str) -> String {
    let (w, h, l, r, t, b) = SCATTER_BOX;
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart scatter\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"system-ui,sans-serif\" font-size=\"11\" role=\"img\" aria-label=\"{}\">",
        escape(&format!("{y_title} against {x_title}"))
    );
    if all.is_empty() {
        s.push_str("<text x=\"20\" y=\"40\">no points</text></svg>");
        return s;
    }
    let xs = Ticks::around(all.iter().map(|p| p.0));
    let ys = Ticks::around(all.iter().map(|p| p.1));
    let px = |v: f64| l + (v - xs.lo) / (xs.hi - xs.lo) * (w - l - r);
    let py = |v: f64| t + (ys.hi - v) / (ys.hi - ys.lo) * (h - t - b);
    let _ = write!(
        s,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" stroke=\"#8c959f\"/>",
        w - l - r,
        h - t - b
    );
    for v in xs.values() {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{t}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"{2}\"/><text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\" fill=\"#57606a\">{4}</text>",
            px(v),
            h - b,
            if v == 0.0 { "#8c959f" } else { "#eaeef2" },
            h - b + 16.0,
            tick_label(v)
        );
    }
    for v in ys.values() {
        let _ = write!(
            s,
            "<line x1=\"{l}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"{2}\"/><text x=\"{3:.1}\" y=\"{4:.1}\" text-anchor=\"end\" fill=\"#57606a\">{5}</text>",
            py(v),
            w - r,
            if v == 0.0 { "#8c959f" } else { "#eaeef2" },
            l - 6.0,
            py(v) + 4.0,
            tick_label(v)
        );
    }
    // y = x over the part of the frame where both coordinates are in range.
    let (a, z) = (xs.lo.max(ys.lo), xs.hi.min(ys.hi));
    if a < z {
        let _ = write!(
            s,
            "<line class=\"identity\" x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#1f2328\" stroke-width=\"1.2\" stroke-dasharray=\"6 4\"/>",
            px(a),
            py(a),
            px(z),
            py(z)
        );
    }
    for (i, se) in series.iter().enumerate() {
        let _ = write!(
            s,
            "<g class=\"series\" fill=\"{}\" fill-opacity=\"0.8\">",
            se.colour
        );
        for (x, y) in se.points.iter().filter(finite) {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\"/>",
                px(*x),
                py(*y)
            );
        }
        let ly = t + 16.0 + 16.0 * i as f64;
        let _ = write!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#1f2328\">{}</text></g>",
            l + 12.0,
            ly - 4.0,
            l + 22.0,
            ly,
            escape(&se.name)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#1f2328\">{}</text><text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\" fill=\"#1f2328\">{}</text></svg>",
        l + (w - l - r) / 2.0,
        h - 8.0,
        escape(x_title),
        t + (h - t - b) / 2.0,
        escape(y_title)
    );
    s
}

/// A linear axis: from `lo` to `hi` (both multiples of `step`, the range including 0) in
/// steps of 1, 2 or 5 × 10^n, about six of them.
struct Ticks {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Ticks {
    fn around(values: impl Iterator<Item = f64>) -> Self {
        let (min, max) = values.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        let span = if max > min { max - min } else { 1.0 };
        let raw = span / 6.0;
        let decade = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * decade)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * decade);
        let lo = (min / step).floor() * step;
        let mut hi = (max / step).ceil() * step;
        if hi <= lo {
            hi = lo + step;
        }
        Ticks { lo, hi, step }
    }

    fn values(&self) -> Vec<f64> {
        let n = ((self.hi - self.lo) / self.step).round() as i64;
        (0..=n)
            .map(|i| {
                let v = self.lo + i as f64 * self.step;
                // No "-0" and no 0.30000000000000004.
                if v.abs() < self.step * 1e-9 {
                    0.0
                } else {
                    v
                }
            })
            .collect()
    }
}

/// A tick's label: a plain number with no more digits than the step needs.
fn tick_label(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_drop_the_shared_prefix_but_keep_the_block_path() {
        let names: Vec<String> = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            layer_labels(&names),
            vec!["h.0.mlp.c_fc", "h.1.attn.c_attn"]
        );
        assert_eq!(layer_labels(&names[..1]), vec!["transformer.h.0.mlp.c_fc"]);
        let gpt2: Vec<String> = ["h.0.mlp.c_fc", "h.0.mlp.c_proj"]
            .map(String::from)
            .to_vec();
        assert_eq!(layer_labels(&gpt2), gpt2);
    }

    /// x in [−2, 1] and y in [−1, 0.5] get steps of 0.5; the frame is 402 × 342 px from
    /// (62, 14), so y = x runs from (−1, −1) at (196, 356) to (0.5, 0.5) at (397, 14).
    #[test]
    fn scatter_places_points_and_the_identity_line_by_hand() {
        let top = [(1.0, 0.5)];
        let bottom = [(-2.0, -1.0), (f64::NAN, 3.0)];
        let svg = scatter_svg(
            &[
                Series {
                    name: "top".into(),
                    colour: "#dc2626",
                    points: &top,
                },
                Series {
                    name: "bottom <k>".into(),
                    colour: "#2563eb",
                    points: &bottom,
                },
            ],
            "predicted",
            "measured",
        );
        assert!(
            svg.contains("class=\"identity\" x1=\"196.0\" y1=\"356.0\" x2=\"397.0\" y2=\"14.0\"")
        );
        assert!(svg.contains("<circle cx=\"464.0\" cy=\"14.0\" r=\"3.5\"/>"));
        assert!(svg.contains("<circle cx=\"62.0\" cy=\"356.0\" r=\"3.5\"/>"));
        // The NaN point is left out: two data circles and two legend circles.
        assert_eq!(svg.matches("<circle").count(), 4);
        for label in [">-2<", ">-1.5<", ">0<", ">0.5<", ">1<"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(svg.contains("bottom &lt;k&gt;"));
        assert!(scatter_svg(&[], "x", "y").contains("no points"));
    }
}
