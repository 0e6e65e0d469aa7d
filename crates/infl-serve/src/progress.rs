//! How far the worker's current pass has got, for `GET /v1/progress` and the page's progress
//! line: the worker hands a [`PassProgress`] to every pass, the HTTP side reads a snapshot.
//!
//! A streamed corpus pass does not know its length in advance (the corpus is tokenized as it
//! is read), so each step's token count from its last complete run is kept and offered as the
//! expected total of the next run of the same step: the corpus does not change while serving.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A snapshot of the worker's progress, as `GET /v1/progress` answers it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProgressView {
    /// Whether a request is being worked on now.
    pub busy: bool,
    /// The step in progress (`query gradients`, `scoring pass`, …), or the last one finished.
    pub step: Option<String>,
    /// Tokens the step has processed so far.
    pub done_tokens: u64,
    /// Tokens the step will process: known in advance, or the step's previous complete run;
    /// null on the first streamed pass.
    pub total_tokens: Option<u64>,
    /// Seconds since the step began.
    pub elapsed_s: f64,
}

#[derive(Default)]
struct State {
    busy: bool,
    step: Option<String>,
    done: u64,
    total: u64,
    began: Option<Instant>,
    /// Each step's tokens at its last complete run.
    finished: HashMap<String, u64>,
}

/// The worker's progress, shared with the HTTP side.
#[derive(Default)]
pub struct PassProgress {
    state: Mutex<State>,
}

impl PassProgress {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A poisoned lock only means a pass panicked mid-update: the counts are still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    /// The worker starts (`true`) or finishes (`false`) a request.
    pub fn set_busy(&self, busy: bool) {
        self.with(|s| s.busy = busy);
    }

    pub fn view(&self) -> ProgressView {
        self.with(|s| {
            let expected = s.step.as_ref().and_then(|w| s.finished.get(w)).copied();
            ProgressView {
                busy: s.busy,
                step: s.step.clone(),
                done_tokens: s.done,
                total_tokens: match s.total {
                    0 => expected,
                    t => Some(t),
                },
                elapsed_s: s.began.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            }
        })
    }
}

impl infl::pass::Progress for PassProgress {
    fn begin(&self, what: &str, total_tokens: u64) {
        self.with(|s| {
            s.step = Some(what.to_string());
            s.done = 0;
            s.total = total_tokens;
            s.began = Some(Instant::now());
        });
    }

    fn advance(&self, tokens: u64) {
        self.with(|s| s.done += tokens);
    }

    fn end(&self) {
        self.with(|s| {
            if let Some(step) = s.step.clone() {
                s.finished.insert(step, s.done);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infl::pass::Progress;

    #[test]
    fn a_streamed_step_expects_its_last_complete_run() {
        let p = PassProgress::default();
        p.set_busy(true);
        p.begin("scoring pass", 0);
        p.advance(300);
        let first = p.view();
        assert_eq!((first.busy, first.done_tokens), (true, 300));
        assert_eq!(
            first.total_tokens, None,
            "nothing known before the first run"
        );
        p.advance(200);
        p.end();
        p.begin("query gradients", 40);
        p.advance(40);
        p.end();
        p.begin("scoring pass", 0);
        p.advance(100);
        let second = p.view();
        assert_eq!(second.step.as_deref(), Some("scoring pass"));
        assert_eq!((second.done_tokens, second.total_tokens), (100, Some(500)));
        p.end();
        p.set_busy(false);
        assert!(!p.view().busy);
    }

    #[test]
    fn a_known_total_wins_over_the_last_run() {
        let p = PassProgress::default();
        p.begin("query gradients", 40);
        p.advance(40);
        p.end();
        p.begin("query gradients", 64);
        assert_eq!(p.view().total_tokens, Some(64));
    }
}
