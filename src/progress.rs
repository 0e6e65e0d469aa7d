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

/// Progress on stderr, in tokens, with rate and ETA.
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
        if self.quiet {
            return;
        }
        if !self.terminal {
            if let Ok(mut l) = self.log.lock() {
                *l = Some(LogLines::new(what, total_tokens));
            }
            return;
        }
        // A streamed pass does not know its length up front (total 0): count without a bar.
        let (len, template) = if total_tokens == 0 {
            (None, "{msg:>16} {pos} tokens  {per_sec}  {elapsed}")
        } else {
            (
                Some(total_tokens),
                "{msg:>16} [{bar:30}] {pos}/{len} tokens  {per_sec}  ETA {eta}",
            )
        };
        let bar =
            indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
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
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    /// The next tenth of `total` that gets a line.
    next_tenth: u64,
}

impl LogLines {
    fn new(what: &str, total: u64) -> Self {
        let now = Instant::now();
        LogLines {
            what: what.to_string(),
            total,
            done: 0,
            started: now,
            last: now,
            next_tenth: 1,
        }
    }

    /// Counts `tokens`; the line to print when a tenth is passed or `LOG_EVERY` has gone by.
    fn advance(&mut self, tokens: u64) -> Option<String> {
        self.done += tokens;
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

    fn line(&self) -> String {
        let rate = self.rate();
        if self.total == 0 {
            return format!(
                "{}: {} tokens, {rate:.0} tokens/s, {} elapsed",
                self.what,
                self.done,
                clock(self.started.elapsed().as_secs_f64())
            );
        }
        let left = self.total.saturating_sub(self.done) as f64 / rate.max(1e-9);
        format!(
            "{}: {}/{} tokens ({:.0}%), {rate:.0} tokens/s, ETA {}",
            self.what,
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total as f64,
            clock(left)
        )
    }

    fn finished(&self) -> String {
        format!(
            "{}: done, {} tokens in {} ({:.0} tokens/s)",
            self.what,
            self.done,
            clock(self.started.elapsed().as_secs_f64()),
            self.rate()
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
        let mut log = LogLines::new("covariance pass", 100);
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
}
