//! Wall and CPU time of a run's phases: a [`Progress`] that times each phase a stage announces
//! (`begin` to `end`) while passing the calls on, for `infl bench`'s tables and `infl
//! inspect`'s probe.

use super::Progress;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// A reading a [`PhaseClock`] takes at the passes' idle points ([`Progress::idle`]), at most
/// once per `every`: `bench` reads the GEMM rate there, so that each pass's floor is at the
/// rate the machine gave while that pass ran. The reading's own time is left out of the phase.
pub struct Sampler<'a> {
    pub every: Duration,
    pub read: &'a (dyn Fn() -> f64 + Sync),
}

/// One timed phase: its time (less the readings taken in it) and the readings.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: String,
    pub elapsed: Elapsed,
    pub readings: Vec<f64>,
}

struct Running {
    name: String,
    watch: Stopwatch,
    /// Time spent taking readings in this phase.
    paused: Elapsed,
    readings: Vec<f64>,
}

/// Progress that also times each named phase (`begin` to `end`, summed when a name repeats).
pub struct PhaseClock<'a> {
    inner: &'a dyn Progress,
    sampler: Option<Sampler<'a>>,
    /// When the last reading was taken (`None` before the first).
    last_reading: Mutex<Option<Instant>>,
    /// Time spent taking readings, in phases or not.
    paused: Mutex<Elapsed>,
    running: Mutex<Option<Running>>,
    phases: Mutex<Vec<Phase>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<'a> PhaseClock<'a> {
    /// Times the phases announced to it and passes every call on to `inner`.
    pub fn new(inner: &'a dyn Progress) -> Self {
        PhaseClock {
            inner,
            sampler: None,
            last_reading: Mutex::new(None),
            paused: Mutex::new(Elapsed::ZERO),
            running: Mutex::new(None),
            phases: Mutex::new(Vec::new()),
        }
    }

    /// [`PhaseClock::new`] that also takes `sampler`'s readings while the phases run.
    pub fn sampling(inner: &'a dyn Progress, sampler: Sampler<'a>) -> Self {
        PhaseClock {
            sampler: Some(sampler),
            ..PhaseClock::new(inner)
        }
    }

    /// Wall and CPU seconds of the phases called `name`.
    pub fn seconds(&self, name: &str) -> Elapsed {
        self.sum(|n| n == name)
    }

    /// The readings taken in the phases called `name`, in order.
    pub fn readings(&self, name: &str) -> Vec<f64> {
        lock(&self.phases)
            .iter()
            .filter(|p| p.name == name)
            .flat_map(|p| p.readings.iter().copied())
            .collect()
    }

    /// Time spent taking readings so far: to leave out of an interval timed around the phases.
    pub fn paused(&self) -> Elapsed {
        *lock(&self.paused)
    }

    fn sum(&self, keep: impl Fn(&str) -> bool) -> Elapsed {
        lock(&self.phases)
            .iter()
            .filter(|p| keep(&p.name))
            .fold(Elapsed::ZERO, |sum, p| sum.plus(p.elapsed))
    }
}

impl Progress for PhaseClock<'_> {
    fn begin(&self, what: &str, total_tokens: u64) {
        self.begin_in(what, total_tokens, "tokens");
    }
    fn begin_in(&self, what: &str, total: u64, unit: &'static str) {
        *lock(&self.running) = Some(Running {
            name: what.to_string(),
            watch: Stopwatch::start(),
            paused: Elapsed::ZERO,
            readings: Vec::new(),
        });
        self.inner.begin_in(what, total, unit);
    }
    fn advance(&self, tokens: u64) {
        self.inner.advance(tokens);
    }
    fn idle(&self) {
        if let Some(sampler) = &self.sampler {
            let mut last = lock(&self.last_reading);
            if last.is_none_or(|t| t.elapsed() >= sampler.every) {
                let watch = Stopwatch::start();
                let value = (sampler.read)();
                let spent = watch.elapsed();
                *last = Some(Instant::now());
                let mut paused = lock(&self.paused);
                *paused = paused.plus(spent);
                if let Some(r) = lock(&self.running).as_mut() {
                    r.paused = r.paused.plus(spent);
                    r.readings.push(value);
                }
            }
        }
        self.inner.idle();
    }
    fn end(&self) {
        if let Some(r) = lock(&self.running).take() {
            lock(&self.phases).push(Phase {
                name: r.name,
                elapsed: r.watch.elapsed().minus(r.paused),
                readings: r.readings,
            });
        }
        self.inner.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pass::Silent;

    /// Readings are taken at idle points, at most once per interval, and the phase's time
    /// leaves theirs out.
    #[test]
    fn readings_are_taken_at_idle_points_and_left_out_of_the_phase() {
        let count = std::sync::atomic::AtomicUsize::new(0);
        let read = || {
            std::thread::sleep(Duration::from_millis(30));
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as f64
        };
        let every_time = PhaseClock::sampling(
            &Silent,
            Sampler {
                every: Duration::ZERO,
                read: &read,
            },
        );
        let watch = Stopwatch::start();
        every_time.begin("pass", 0);
        for _ in 0..3 {
            every_time.idle();
        }
        every_time.end();
        let outer = watch.elapsed().wall;
        assert_eq!(every_time.readings("pass"), vec![0.0, 1.0, 2.0]);
        let (phase, paused) = (every_time.seconds("pass").wall, every_time.paused().wall);
        assert!(paused >= 0.09, "three readings of 30 ms took {paused} s");
        assert!(
            phase >= 0.0 && phase + paused <= outer,
            "{phase} + {paused} > {outer}"
        );

        // Once an hour: the first idle point reads, the next two do not; outside a phase a
        // reading still counts as paused time but belongs to no phase.
        let hourly = PhaseClock::sampling(
            &Silent,
            Sampler {
                every: Duration::from_secs(3600),
                read: &read,
            },
        );
        hourly.idle();
        hourly.begin("pass", 0);
        hourly.idle();
        hourly.idle();
        hourly.end();
        assert!(hourly.readings("pass").is_empty());
        assert!(hourly.paused().wall >= 0.03);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 4);

        // Without a sampler nothing is read.
        let plain = PhaseClock::new(&Silent);
        plain.begin("pass", 0);
        plain.idle();
        plain.end();
        assert!(plain.readings("pass").is_empty() && plain.paused().wall == 0.0);
    }
}
