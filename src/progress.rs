//! The progress of long work on stderr: the library's `Progress` reports drawn as indicatif bars
//! on a terminal, and as plain log lines where stderr is not one (a batch job, a pipe, a file),
//! where bars would print nothing.

use infl::pass::Progress;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between two log lines of one piece of work, at most (a line also marks each tenth
/// of a known total).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Progress on stderr, in tokens (or the unit of [`Progress::begin_in`]), with rate and ETA.
pub struct Bars {
    quiet: bool,
    terminal: bool,
    bar: Mutex<Option<indicatif::ProgressBar>>,
    log: Mutex<Option<LogLines>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        Bars {
            quiet,
            terminal: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
            log: Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn begin(&self, what: &str, total_tokens: u64) {
        self.begin_in(what, total_tokens, "tokens");
    }

    fn begin_in(&self, what: &str, total: u64, unit: &'static str) {
        if self.quiet {
            return;
        }
        if !self.terminal {
            if let Ok(mut l) = self.log.lock() {
                *l = Some(LogLines::new(what, total, unit));
            }
            return;
        }
        // A streamed pass does not know its length up front (total 0): count without a bar.
        let (len, template) = if total == 0 {
            (
                None,
                format!("{{msg:>16}} {{pos}} {unit}  {{per_sec}}  {{elapsed}}"),
            )
        } else {
            (
                Some(total),
                format!(
                    "{{msg:>16}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}"
                ),
            )
        };
        let bar =
            indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }

    fn advance(&self, tokens: u64) {
        if let Ok(mut l) = self.log.lock() {
            if let Some(line) = l.as_mut().and_then(|l| l.advance(tokens)) {
                eprintln!("{line}");
            }
        }
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.inc(tokens);
            }
        }
    }

    fn end(&self) {
        if let Ok(mut l) = self.log.lock() {
            if let Some(log) = l.take() {
                eprintln!("{}", log.finished());
            }
        }
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish();
            }
        }
    }
}

/// One piece of work reported as log lines: what, done/total, rate, ETA.
struct LogLines {
    what: String,
    unit: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    /// The next tenth of `total` that gets a line.
    next_tenth: u64,
}

impl LogLines {
    fn new(what: &str, total: u64, unit: &'static str) -> Self {
        let now = Instant::now();
        LogLines {
            what: what.to_string(),
            unit,
            total,
            done: 0,
            started: now,
            last: now,
            next_tenth: 1,
        }
    }

    /// Counts `n` units; the line to print when a tenth is passed or `LOG_EVERY` has gone by.
    fn advance(&mut self, n: u64) -> Option<String> {
        self.done += n;
        let tenth = self.total > 0 && self.done * 10 >= self.next_tenth * self.total;
        if !tenth && self.last.elapsed() < LOG_EVERY {
            return None;
        }
        if let Some(tenths) = (self.done * 10).checked_div(self.total) {
            self.next_tenth = (tenths + 1).min(11);
        }
        self.last = Instant::now();
        Some(self.line())
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// The rate in `unit`/s, to two significant figures where it is below 10 (an
    /// eigendecomposition of a large layer takes many seconds).
    fn rate_text(&self) -> String {
        let rate = self.rate();
        let decimals = match rate {
            r if r >= 10.0 => 0,
            r if r >= 1.0 => 1,
            r if r >= 0.1 => 2,
            _ => 3,
        };
        format!("{rate:.decimals$} {}/s", self.unit)
    }

    fn line(&self) -> String {
        let (what, unit, rate) = (&self.what, self.unit, self.rate_text());
        if self.total == 0 {
            return format!(
                "{what}: {} {unit}, {rate}, {} elapsed",
                self.done,
                clock(self.started.elapsed().as_secs_f64())
            );
        }
        let left = self.total.saturating_sub(self.done) as f64 / self.rate().max(1e-9);
        format!(
            "{what}: {}/{} {unit} ({:.0}%), {rate}, ETA {}",
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total as f64,
            clock(left)
        )
    }

    fn finished(&self) -> String {
        format!(
            "{}: done, {} {} in {} ({})",
            self.what,
            self.done,
            self.unit,
            clock(self.started.elapsed().as_secs_f64()),
            self.rate_text()
        )
    }
}

/// `1h02m`, `3m07s` or `4.2s`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let whole = s.round() as u64;
    match whole / 3600 {
        0 => format!("{}m{:02}s", whole / 60, whole % 60),
        h => format!("{h}h{:02}m", (whole % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_marks_each_tenth_of_a_known_total() {
        let mut log = LogLines::new("covariance pass", 100, "tokens");
        let lines: Vec<String> = (0..20).filter_map(|_| log.advance(5)).collect();
        assert_eq!(lines.len(), 10, "{lines:?}");
        assert!(lines[0].starts_with("covariance pass: 10/100 tokens (10%)"));
        assert!(lines[9].contains("100/100 tokens (100%)"));
        assert!(log
            .finished()
            .starts_with("covariance pass: done, 100 tokens in"));
        assert_eq!(clock(3727.0), "1h02m");
        assert_eq!(clock(187.0), "3m07s");
    }

    #[test]
    fn other_units_are_named_and_slow_rates_keep_their_figures() {
        let mut log = LogLines::new("eigendecompositions", 4, "layers");
        log.started -= Duration::from_secs(40);
        let line = log.advance(1).unwrap_or_default();
        // One layer in 40 s: 0.025 layers/s, and the three left at that rate take 2 minutes.
        assert!(
            line.starts_with("eigendecompositions: 1/4 layers (25%), 0.025 layers/s, ETA 2m0"),
            "{line}"
        );
        assert!(log
            .finished()
            .starts_with("eigendecompositions: done, 1 layers in 40"));
    }
}
