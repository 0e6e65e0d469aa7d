//! When a long pass saves its state: a [`CheckpointPolicy`] (every so many sequences, or so
//! many seconds) and the [`Checkpointer`] that applies it as the pass goes.

/// When a long pass saves its state.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After at least this many sequences since the last save.
    pub every_sequences: Option<usize>,
    /// Or after this much time since the last save.
    pub every_seconds: f64,
}

impl CheckpointPolicy {
    pub const NEVER: CheckpointPolicy = CheckpointPolicy {
        every_sequences: None,
        every_seconds: f64::INFINITY,
    };
}

/// Decides when a pass saves its state, from the sequences done and the time elapsed.
pub struct Checkpointer {
    policy: CheckpointPolicy,
    last_done: usize,
    last_time: std::time::Instant,
}

impl Checkpointer {
    /// Starts counting at `done` sequences.
    pub fn new(policy: CheckpointPolicy, done: usize) -> Self {
        Checkpointer {
            policy,
            last_done: done,
            last_time: std::time::Instant::now(),
        }
    }

    /// Is a save due now that `done` sequences are done? (Resets the clock when it is.)
    pub fn due(&mut self, done: usize) -> bool {
        let due = self
            .policy
            .every_sequences
            .is_some_and(|m| done - self.last_done >= m)
            || self.last_time.elapsed().as_secs_f64() >= self.policy.every_seconds;
        if due {
            self.last_done = done;
            self.last_time = std::time::Instant::now();
        }
        due
    }
}
