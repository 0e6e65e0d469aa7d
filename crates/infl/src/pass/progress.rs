//! How a pass over data reports how far it has got: the [`Progress`] every pass is handed, and
//! [`Silent`], which reports nothing.

/// Reports progress of passes over data, in tokens, and of other long work in its own units.
pub trait Progress: Sync {
    fn begin(&self, what: &str, total_tokens: u64);
    /// Work counted in `unit` (plural: "layers") rather than tokens; [`Progress::advance`]
    /// then counts that unit. Reported as [`Progress::begin`] unless the reporter shows units.
    fn begin_in(&self, what: &str, total: u64, unit: &'static str) {
        let _ = unit;
        self.begin(what, total);
    }
    fn advance(&self, tokens: u64);
    /// Called by a pass between its steps, when none of its work is in flight: where a
    /// benchmark can measure the machine without disturbing the pass or being disturbed by it.
    fn idle(&self) {}
    fn end(&self);
    /// Whether the caller asks the pass to stop (Ctrl-C in the Python package). A pass asks
    /// after each batch; a resumable pass first saves its state as at a checkpoint, then
    /// stops with [`crate::Error::Interrupted`], so rerunning the job resumes there.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Progress that reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}
