//! A stream's figures for `--stats`, `--report` and the render delay the guest is told:
//! bounded in memory whatever the stream's length.

use std::time::{Duration, Instant};

/// The mean of a value over consecutive windows of time.
#[derive(Debug, Clone, Copy)]
pub struct WindowMean {
    length: Duration,
    start: Instant,
    sum: f64,
    count: u32,
}

impl WindowMean {
    /// Windows of `length` from `start`.
    pub fn new(length: Duration, start: Instant) -> Self {
        Self { length, start, sum: 0.0, count: 0 }
    }

    /// Adds a sample taken at `now`; returns the mean of the window it closed, if any.
    pub fn add(&mut self, now: Instant, value: f64) -> Option<f64> {
        let closed = (now.saturating_duration_since(self.start) >= self.length && self.count > 0)
            .then(|| self.sum / f64::from(self.count));
        if closed.is_some() {
            *self = Self::new(self.length, now);
        }
        self.sum += value;
        self.count += 1;
        closed
    }
}

/// Latencies in bins of [`LatencyHistogram::BIN_MS`] from [`LatencyHistogram::LOW_MS`]
/// to [`LatencyHistogram::HIGH_MS`] (values outside count in the edge bins): its
/// percentiles to a tenth of a millisecond, in 42 KiB, for a stream of any length. (A
/// list of every sample, as before, grew by 800 KiB per stream and half hour.)
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    bins: Vec<u32>,
    count: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// Bin width, ms.
    pub const BIN_MS: f64 = 0.1;
    /// Lowest latency binned, ms (a packet cut from late in a large guest cycle arrives
    /// before its first sample's time: latency below 0 is real).
    pub const LOW_MS: f64 = -50.0;
    /// Highest latency binned, ms.
    pub const HIGH_MS: f64 = 1000.0;

    /// An empty histogram.
    pub fn new() -> Self {
        let n = ((Self::HIGH_MS - Self::LOW_MS) / Self::BIN_MS).round() as usize;
        Self { bins: vec![0; n], count: 0 }
    }

    /// Counts one latency.
    pub fn add(&mut self, ms: f64) {
        if !ms.is_finite() {
            return;
        }
        let last = self.bins.len() - 1;
        let i = (((ms - Self::LOW_MS) / Self::BIN_MS).floor().max(0.0) as usize).min(last);
        self.bins[i] = self.bins[i].saturating_add(1);
        self.count += 1;
    }

    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The latency below which a share `p` (0..=1) of the samples lie: the middle of
    /// its bin. `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count - 1) as f64 * p.clamp(0.0, 1.0)).round() as u64;
        let mut seen = 0u64;
        for (i, n) in self.bins.iter().enumerate() {
            seen += u64::from(*n);
            if seen > rank {
                return Some(Self::LOW_MS + (i as f64 + 0.5) * Self::BIN_MS);
            }
        }
        None
    }
}

/// Latency samples of the current second, for `--stats`' median: at most this many
/// (a second of 2.5 ms packets), the rest of the second is not sampled.
const RECENT_MAX: usize = 400;

/// One stream's figures.
#[derive(Debug)]
pub struct StreamStats {
    /// When the stream opened.
    pub opened: Instant,
    /// Bytes of its frames on the wire, headers included.
    pub wire_bytes: u64,
    /// Output fill (frames) as packets arrive, per second; its mean in the stream's
    /// second and tenth second and in the last full second (ms).
    fill: WindowMean,
    pub fill_second_2: Option<f64>,
    /// See [`StreamStats::fill_second_2`].
    pub fill_second_10: Option<f64>,
    /// See [`StreamStats::fill_second_2`].
    pub fill_last: Option<f64>,
    seconds_seen: u32,
    /// Render delay (ns) each packet meets, per [`RENDER_WINDOW`]; the last mean, and
    /// the last one reported to the guest.
    render: WindowMean,
    pub render_last: Option<u64>,
    render_reported: Option<u64>,
    /// Guest graph to output, ms (only where both ends share a clock).
    pub latency: LatencyHistogram,
    recent: Vec<f32>,
    /// Wire bytes at the last `--stats` line.
    stats_bytes: u64,
}

/// The render delay is averaged over windows this long before it is reported: long
/// enough to even out where packets land in the output's cycle, short enough that a
/// change reaches the guest's apps within a second. At most two reports a second per
/// stream keep 64 streams under the peer's control-frame limit.
pub const RENDER_WINDOW: Duration = Duration::from_millis(500);
/// A render delay that moved by more than this since the last report is reported again.
const RENDER_REPORT_STEP_NS: u64 = 1_000_000;

impl StreamStats {
    /// Figures of a stream opened at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            opened: now,
            wire_bytes: 0,
            fill: WindowMean::new(Duration::from_secs(1), now),
            fill_second_2: None,
            fill_second_10: None,
            fill_last: None,
            seconds_seen: 0,
            render: WindowMean::new(RENDER_WINDOW, now),
            render_last: None,
            render_reported: None,
            latency: LatencyHistogram::new(),
            recent: Vec::new(),
            stats_bytes: 0,
        }
    }

    /// Records a packet that arrived at `now`: the output's fill (ms) after it and the
    /// render delay it met (ns). Returns a render delay to report to the guest, when
    /// one is due.
    pub fn packet(&mut self, now: Instant, fill_ms: f64, render_ns: u64) -> Option<u64> {
        if let Some(mean) = self.fill.add(now, fill_ms) {
            self.seconds_seen += 1;
            match self.seconds_seen {
                2 => self.fill_second_2 = Some(mean),
                10 => self.fill_second_10 = Some(mean),
                _ => {}
            }
            self.fill_last = Some(mean);
        }
        let render = self.render.add(now, render_ns as f64)? as u64;
        self.render_last = Some(render);
        if self.render_reported.is_some_and(|r| r.abs_diff(render) <= RENDER_REPORT_STEP_NS) {
            return None;
        }
        self.render_reported = Some(render);
        Some(render)
    }

    /// Records one latency, ms.
    pub fn latency(&mut self, ms: f64) {
        self.latency.add(ms);
        if self.recent.len() < RECENT_MAX {
            self.recent.push(ms as f32);
        }
    }

    /// For a `--stats` line `elapsed_s` after the last: kbit/s on the wire since, and
    /// the median latency of the samples since (then forgotten).
    pub fn take_interval(&mut self, elapsed_s: f64) -> (f64, Option<f32>) {
        let kbps = (self.wire_bytes - self.stats_bytes) as f64 * 8.0 / 1000.0 / elapsed_s.max(1e-3);
        self.stats_bytes = self.wire_bytes;
        self.recent.sort_by(f32::total_cmp);
        let median = self.recent.get(self.recent.len() / 2).copied();
        self.recent.clear();
        (kbps, median)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_to_a_tenth_of_a_millisecond_in_bounded_memory() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.percentile(0.5), None);
        for i in 0..1000 {
            h.add(10.0 + f64::from(i) * 0.01); // 10.00 .. 19.99 ms
        }
        h.add(f64::NAN);
        assert_eq!(h.count(), 1000);
        assert!((h.percentile(0.5).unwrap() - 15.0).abs() <= 0.1);
        assert!((h.percentile(0.99).unwrap() - 19.9).abs() <= 0.1);
        h.add(1e9);
        h.add(-1e9);
        assert!(h.percentile(1.0).unwrap() < LatencyHistogram::HIGH_MS);
        assert!(h.percentile(0.0).unwrap() > LatencyHistogram::LOW_MS);
        assert!(h.bins.len() * 4 <= 42 * 1024);
    }

    #[test]
    fn the_render_delay_is_reported_when_it_moves() {
        let t0 = Instant::now();
        let mut s = StreamStats::new(t0);
        let mut reports = Vec::new();
        for i in 0..300u64 {
            let render = if i < 150 { 20_000_000 + (i % 2) * 500_000 } else { 60_000_000 };
            if let Some(r) = s.packet(t0 + Duration::from_millis(10 * i), 15.0, render) {
                reports.push((i, r));
            }
        }
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert!(reports[0].1.abs_diff(20_250_000) < 100_000);
        assert!((150..=210).contains(&reports[1].0));
        assert_eq!(s.fill_last, Some(15.0));
    }
}
