//! Wall and CPU time of a run's phases: a [`Progress`] that times each phase a stage announces
//! (`begin` to `end`) while passing the calls on, for `infl bench`'s tables and `infl
//! inspect`'s probe.

use crate::curvature::Progress;
use std::sync::{Mutex, PoisonError};

/// Wall and CPU seconds of an interval (CPU: the whole process's, where the platform reports it).
#[derive(Clone, Copy, Debug)]
pub struct Elapsed {
    pub wall: f64,
    pub cpu: Option<f64>,
}

impl Elapsed {
    pub const ZERO: Elapsed = Elapsed {
        wall: 0.0,
        cpu: Some(0.0),
    };

    pub fn plus(self, o: Elapsed) -> Elapsed {
        Elapsed {
            wall: self.wall + o.wall,
            cpu: self.cpu.zip(o.cpu).map(|(a, b)| a + b),
        }
    }

    pub fn minus(self, o: Elapsed) -> Elapsed {
        Elapsed {
            wall: self.wall - o.wall,
            cpu: self.cpu.zip(o.cpu).map(|(a, b)| a - b),
        }
    }
}

/// The start of an [`Elapsed`] interval.
pub struct Stopwatch {
    wall: std::time::Instant,
    cpu: Option<f64>,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch {
            wall: std::time::Instant::now(),
            cpu: crate::io::process_cpu_seconds(),
        }
    }

    pub fn elapsed(&self) -> Elapsed {
        Elapsed {
            wall: self.wall.elapsed().as_secs_f64(),
            cpu: self
                .cpu
                .zip(crate::io::process_cpu_seconds())
                .map(|(a, b)| b - a),
        }
    }
}

/// Progress that also times each named phase (`begin` to `end`, summed when a name repeats).
pub struct PhaseClock<'a> {
    inner: &'a dyn Progress,
    running: Mutex<Option<(String, Stopwatch)>>,
    phases: Mutex<Vec<(String, Elapsed)>>,
}

impl<'a> PhaseClock<'a> {
    /// Times the phases announced to it and passes every call on to `inner`.
    pub fn new(inner: &'a dyn Progress) -> Self {
        PhaseClock {
            inner,
            running: Mutex::new(None),
            phases: Mutex::new(Vec::new()),
        }
    }

    /// Wall and CPU seconds of the phases called `name`.
    pub fn seconds(&self, name: &str) -> Elapsed {
        self.sum(|n| n == name)
    }

    /// Wall and CPU seconds of every phase.
    pub fn total(&self) -> Elapsed {
        self.sum(|_| true)
    }

    fn sum(&self, keep: impl Fn(&str) -> bool) -> Elapsed {
        let phases = self.phases.lock().unwrap_or_else(PoisonError::into_inner);
        phases
            .iter()
            .filter(|(n, _)| keep(n))
            .fold(Elapsed::ZERO, |sum, (_, e)| sum.plus(*e))
    }
}

impl Progress for PhaseClock<'_> {
    fn begin(&self, what: &str, total_tokens: u64) {
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((what.to_string(), Stopwatch::start()));
        self.inner.begin(what, total_tokens);
    }
    fn advance(&self, tokens: u64) {
        self.inner.advance(tokens);
    }
    fn end(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((name, watch)) = running {
            let e = watch.elapsed();
            self.phases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((name, e));
        }
        self.inner.end();
    }
}
