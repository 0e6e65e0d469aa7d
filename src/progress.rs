//! The progress bars of the command line: the library's `Progress` reports drawn with indicatif.

use infl::pass::Progress;

/// indicatif progress bars on stderr, in tokens, with rate and ETA.
pub struct Bars {
    quiet: bool,
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        Bars {
            quiet,
            bar: std::sync::Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn begin(&self, what: &str, total_tokens: u64) {
        if self.quiet {
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
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.inc(tokens);
            }
        }
    }

    fn end(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish();
            }
        }
    }
}
