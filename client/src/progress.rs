//! A one-line progress report on stderr for long work a compile may wait for (packaging a
//! toolchain, sending it to the farm). Only when stderr is a terminal: piped to a file or a
//! build log, nothing is written that could mix into the compiler's output.

use std::io::Write;
use std::time::{Duration, Instant};

/// How often the line is redrawn at most.
const EVERY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Progress {
    label: String,
    enabled: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// A report of `label` (e.g. "packaging /usr/bin/gcc for the farm"), shown only when `tty`.
    pub fn new(label: impl Into<String>, tty: bool) -> Progress {
        Progress {
            label: label.into(),
            enabled: tty,
            last: None,
            drawn: false,
        }
    }

    /// `done` of `total` bytes; redrawn at most every [`EVERY`].
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled || self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let percent = (done.saturating_mul(100))
            .checked_div(total)
            .unwrap_or(100)
            .min(100);
        let mb = |b: u64| b as f64 / 1e6;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[Kkiln: {} {percent:>3}% ({:.1} of {:.1} MB)",
            self.label,
            mb(done),
            mb(total)
        );
        let _ = err.flush();
        self.drawn = true;
    }

    /// Clears the line (a report that was drawn leaves nothing behind).
    pub fn finish(self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}
