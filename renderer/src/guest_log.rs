//! Log lines a guest can cause, within a budget.
//!
//! Whatever a guest does (streams opened and closed as fast as the control limit
//! allows, with the longest reasons; its volume toggled; bad input of every kind), what
//! it makes melange-host write to its log is bounded: every such line goes through
//! [`GuestLog`], which spends a byte budget refilled at [`BYTES_PER_SECOND`] up to
//! [`BURST_BYTES`], and holds back what is over it, counted. Bad input is also limited
//! per kind, to one line per [`BAD_INPUT_INTERVAL`]. Every [`SUMMARY_INTERVAL`] in
//! which lines were held back ends with one line that says how many.
//!
//! Lines are built from sanitized guest strings ([`melange_transport::text`]) and
//! numbers only. Sans-IO: time enters as an argument.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Log bytes a second a guest's doings may cost in the long run.
pub const BYTES_PER_SECOND: f64 = 8.0 * 1024.0;
/// ... and in a burst (a guest connecting with a few dozen streams).
pub const BURST_BYTES: f64 = 32.0 * 1024.0;
/// How often each kind of bad-input message may be logged.
pub const BAD_INPUT_INTERVAL: Duration = Duration::from_secs(5);
/// How often a summary of held-back lines is logged, at most.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// What the logger adds to each line (time stamp, level), counted against the budget.
const LINE_OVERHEAD: usize = 32;

/// How important a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Normal operation (streams opening and closing, volume).
    Info,
    /// Something the user may want to act on, or bad input.
    Warn,
}

/// See the module docs.
#[derive(Debug)]
pub struct GuestLog {
    tokens: f64,
    last: Instant,
    /// Kind -> (last logged, suppressed since).
    kinds: BTreeMap<&'static str, (Instant, u64)>,
    /// Lines and bytes held back since the last summary, and when that was.
    held: (u64, u64),
    summary_at: Instant,
}

impl GuestLog {
    /// A full budget at `now`.
    pub fn new(now: Instant) -> Self {
        Self { tokens: BURST_BYTES, last: now, kinds: BTreeMap::new(), held: (0, 0), summary_at: now }
    }

    /// Logs `text` if the budget allows it at `now`; counts it as held back if not.
    /// Returns whether it was logged.
    pub fn line(&mut self, now: Instant, level: Level, text: std::fmt::Arguments<'_>) -> bool {
        let line = format!("melange-host: {text}");
        let cost = (line.len() + LINE_OVERHEAD) as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * BYTES_PER_SECOND).min(BURST_BYTES);
        if cost > self.tokens {
            self.held.0 += 1;
            self.held.1 += line.len() as u64;
            return false;
        }
        self.tokens -= cost;
        match level {
            Level::Info => log::info!("{line}"),
            Level::Warn => log::warn!("{line}"),
        }
        true
    }

    /// Logs bad input of `kind` at most once per [`BAD_INPUT_INTERVAL`], saying how many
    /// were suppressed since; within the budget. Returns whether it was logged.
    pub fn bad_input(&mut self, now: Instant, kind: &'static str, text: std::fmt::Arguments<'_>) -> bool {
        match self.kinds.get_mut(kind) {
            Some((last, suppressed)) if now.saturating_duration_since(*last) < BAD_INPUT_INTERVAL => {
                *suppressed += 1;
                false
            }
            Some((last, suppressed)) => {
                let more = *suppressed;
                *last = now;
                let logged =
                    self.line(now, Level::Warn, format_args!("{kind}: {text} ({more} more since the last report)"));
                if let Some((_, suppressed)) = self.kinds.get_mut(kind) {
                    // Counted on if the byte budget held this one back too.
                    *suppressed = if logged { 0 } else { more + 1 };
                }
                logged
            }
            None => {
                self.kinds.insert(kind, (now, 0));
                self.line(now, Level::Warn, format_args!("{kind}: {text}"))
            }
        }
    }

    /// Logs, at most every [`SUMMARY_INTERVAL`], how much was held back since the last
    /// summary. Call it from the host's timer.
    pub fn tick(&mut self, now: Instant) {
        if self.held.0 == 0 || now.saturating_duration_since(self.summary_at) < SUMMARY_INTERVAL {
            return;
        }
        let (lines, bytes) = std::mem::take(&mut self.held);
        let seconds = now.saturating_duration_since(self.summary_at).as_secs();
        self.summary_at = now;
        log::warn!(
            "melange-host: held back {lines} log lines ({bytes} bytes) about the guest in the last {seconds} s: it \
             does more than the log's budget of {} KiB/s allows",
            BYTES_PER_SECOND as u64 / 1024
        );
    }

    /// Lines held back since the last summary.
    pub fn held_lines(&self) -> u64 {
        self.held.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_held_to_the_budget_and_summarised() {
        let t0 = Instant::now();
        let mut log = GuestLog::new(t0);
        let reason = "r".repeat(128);
        let mut logged_bytes = 0usize;
        // 1000 lines a second for 60 s.
        for i in 0..60_000u64 {
            let now = t0 + Duration::from_millis(i);
            let text = format!("stream {i} closed ({reason})");
            if log.line(now, Level::Info, format_args!("{text}")) {
                logged_bytes += text.len() + "melange-host: ".len() + LINE_OVERHEAD;
            }
            log.tick(now);
        }
        let per_second = (logged_bytes as f64 - BURST_BYTES) / 60.0;
        assert!(per_second <= BYTES_PER_SECOND + 1.0, "{per_second} B/s");
        assert!(log.held_lines() < 60_000);
    }

    #[test]
    fn bad_input_of_one_kind_is_logged_once_per_interval() {
        let t0 = Instant::now();
        let mut log = GuestLog::new(t0);
        let mut logged = 0;
        for i in 0..1000u64 {
            if log.bad_input(t0 + Duration::from_millis(i * 20), "bad packet", format_args!("x")) {
                logged += 1;
            }
        }
        // 20 s: the first, then one every 5 s.
        assert_eq!(logged, 4);
    }
}
