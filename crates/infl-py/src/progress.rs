//! How a job run from Python reports progress and hears Ctrl-C: [`PyProgress`], the library's
//! `Progress` drawn as the command line's bars on stderr, or handed to a Python callable (the
//! package's tqdm adapter, or the caller's own), checking Python's signals at every report.

use infl::pass::Progress;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Where the reports go.
pub enum Sink {
    /// Nowhere (signals are still checked).
    Silent,
    /// The command line's indicatif bars on stderr.
    Bars(crate::bars::Bars),
    /// `callback(stage, done, total, finished)`, with the GIL held.
    Callback(Py<PyAny>),
}

/// The library's `Progress` for a job run from Python. At every report it takes the GIL briefly,
/// hands the report to the Python callable (if any) and runs Python's signal handlers; a
/// `KeyboardInterrupt` there (or any exception from the callable) is kept and asks the pass to
/// stop at its next batch boundary, where it saves its resumable state as at a checkpoint.
pub struct PyProgress {
    sink: Sink,
    stage: Mutex<String>,
    total: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    raised: Mutex<Option<PyErr>>,
}

impl PyProgress {
    pub fn new(sink: Sink) -> Self {
        PyProgress {
            sink,
            stage: Mutex::new(String::new()),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            raised: Mutex::new(None),
        }
    }

    /// The exception that stopped the job (Ctrl-C's `KeyboardInterrupt`, or the callable's).
    pub fn take_raised(&self) -> Option<PyErr> {
        self.raised.lock().ok().and_then(|mut r| r.take())
    }

    /// Keeps the first exception and stops the job.
    fn raise(&self, e: PyErr) {
        if let Ok(mut r) = self.raised.lock() {
            r.get_or_insert(e);
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Takes the GIL, reports to the callable and checks signals; the first exception stops the
    /// job.
    fn report(&self, finished: bool) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        Python::attach(|py| {
            let called = match &self.sink {
                Sink::Callback(f) => {
                    let stage = self.stage.lock().map(|s| s.clone()).unwrap_or_default();
                    let (done, total) = (
                        self.done.load(Ordering::Relaxed),
                        self.total.load(Ordering::Relaxed),
                    );
                    f.call1(py, (stage, done, total, finished)).map(|_| ())
                }
                _ => Ok(()),
            };
            if let Err(e) = called.and_then(|()| py.check_signals()) {
                self.raise(e);
            }
        });
    }
}

impl Progress for PyProgress {
    fn begin(&self, what: &str, total_tokens: u64) {
        self.begin_in(what, total_tokens, "tokens");
    }

    /// The callable hears the stage, done and total as for tokens (the package's tqdm adapter
    /// names the unit from the stage).
    fn begin_in(&self, what: &str, total: u64, unit: &'static str) {
        if let Ok(mut s) = self.stage.lock() {
            *s = what.to_string();
        }
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        if let Sink::Bars(b) = &self.sink {
            b.begin_in(what, total, unit);
        }
        self.report(false);
    }

    fn advance(&self, tokens: u64) {
        self.done.fetch_add(tokens, Ordering::Relaxed);
        if let Sink::Bars(b) = &self.sink {
            b.advance(tokens);
        }
        self.report(false);
    }

    fn end(&self) {
        if let Sink::Bars(b) = &self.sink {
            b.end();
        }
        self.report(true);
    }

    fn stop_requested(&self) -> bool {
        // Python runs signal handlers only on its main thread, and progress may be reported
        // from a worker's: the pass also asks here, between batches, on the job's own thread.
        if !self.stop.load(Ordering::Relaxed) {
            Python::attach(|py| {
                if let Err(e) = py.check_signals() {
                    self.raise(e);
                }
            });
        }
        self.stop.load(Ordering::Relaxed)
    }
}
