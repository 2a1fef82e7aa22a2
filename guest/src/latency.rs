//! The end-to-end latency of a redirected stream, as the guest tells its apps.
//!
//! An app that keeps audio and video in sync asks how long a sample takes from the
//! start of the graph cycle that takes it to being heard. For a redirected stream that
//! is the sum of four parts, each measured where it happens, on that side's own clock:
//!
//! | part | measured by | how |
//! |---|---|---|
//! | guest | the guest core (`melange-guest` thread) | mean of (sent - pts) per packet: waiting for the rest of the packet, encoding, queueing |
//! | codec | the encoder | its lookahead (Opus), 0 for PCM |
//! | transport | the session | half the heartbeat round trip |
//! | host render | `melange-host` | jitter buffer ahead of an arriving packet, the wait for its output's next cycle, the output's latency (`StreamLatency` reports) |
//!
//! [`LatencyEstimate`] keeps the parts of one stream and their sum. Sans-IO: times come
//! in as arguments (`CLOCK_MONOTONIC` nanoseconds of the guest).

#![forbid(unsafe_code)]

/// Guest-side delays are averaged over windows of this length before they count: 50
/// packets of 10 ms even out where packets fall in the guest's cycles.
const WINDOW_NS: u64 = 500_000_000;

/// One stream's latency parts. See the module docs.
#[derive(Debug, Clone)]
pub struct LatencyEstimate {
    codec_ns: u64,
    /// Current window: start, sum of delays, packets.
    window: (u64, u64, u64),
    guest_ns: Option<u64>,
    transport_ns: u64,
    host_render_ns: Option<u64>,
}

impl LatencyEstimate {
    /// A stream whose encoder delays audio by `codec_ns` (its lookahead).
    pub fn new(codec_ns: u64) -> Self {
        Self { codec_ns, window: (0, 0, 0), guest_ns: None, transport_ns: 0, host_render_ns: None }
    }

    /// Records a packet whose first sample entered the graph at `pts_ns` leaving for
    /// the host at `now_ns`. Returns true when this closed a window, so the total may
    /// have changed.
    pub fn packet_sent(&mut self, now_ns: u64, pts_ns: u64) -> bool {
        let (start, sum, n) = &mut self.window;
        if *n == 0 {
            *start = now_ns;
        }
        // A pts ahead of now (a clock step) counts as no delay rather than a huge one.
        *sum = sum.saturating_add(now_ns.saturating_sub(pts_ns));
        *n += 1;
        if now_ns.saturating_sub(*start) < WINDOW_NS {
            return false;
        }
        self.guest_ns = Some(*sum / *n);
        self.window = (0, 0, 0);
        true
    }

    /// The host's render delay for the stream, from its latest report.
    pub fn host_render(&mut self, render_ns: u64) {
        self.host_render_ns = Some(render_ns);
    }

    /// The round trip to the host, from the session's heartbeats.
    pub fn round_trip(&mut self, rtt_ns: u64) {
        self.transport_ns = rtt_ns / 2;
    }

    /// Forgets what the host said (a new session: it reports again).
    pub fn host_gone(&mut self) {
        self.host_render_ns = None;
    }

    /// The whole latency from the guest graph to the host's output, once both sides
    /// have measured their parts.
    pub fn total_ns(&self) -> Option<u64> {
        let (guest, host) = (self.guest_ns?, self.host_render_ns?);
        Some(guest.saturating_add(self.codec_ns).saturating_add(self.transport_ns).saturating_add(host))
    }
}

impl std::fmt::Display for LatencyEstimate {
    /// `20.6 ms (guest 7.7, codec 2.5, transport 0.0, host 10.4)`; `?` for a part not
    /// measured yet.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |ns: Option<u64>| ns.map_or("?".to_string(), |ns| format!("{:.1}", ns as f64 / 1e6));
        write!(
            f,
            "{} ms (guest {}, codec {}, transport {}, host {})",
            ms(self.total_ns()),
            ms(self.guest_ns),
            ms(Some(self.codec_ns)),
            ms(Some(self.transport_ns)),
            ms(self.host_render_ns)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn sums_the_parts_once_both_sides_measured_theirs() {
        let mut l = LatencyEstimate::new(2_500_000);
        assert_eq!(l.total_ns(), None);
        // 10 ms packets leaving 7 or 9 ms after their first sample: 8 ms on average.
        let mut closed = false;
        for i in 0..=100u64 {
            let pts = 5_000 * MS + i * 10 * MS;
            closed |= l.packet_sent(pts + if i % 2 == 0 { 7 * MS } else { 9 * MS }, pts);
        }
        assert!(closed, "half a second of packets closes a window");
        assert_eq!(l.total_ns(), None, "no host report yet");
        l.host_render(20 * MS);
        l.round_trip(MS);
        let total = l.total_ns().unwrap();
        assert!(total.abs_diff(8 * MS + 2_500_000 + MS / 2 + 20 * MS) < 20_000, "{total}");
        assert_eq!(l.to_string(), "31.0 ms (guest 8.0, codec 2.5, transport 0.5, host 20.0)");
        l.host_gone();
        assert_eq!(l.total_ns(), None);
    }

    #[test]
    fn a_window_needs_half_a_second_and_odd_clocks_do_not_overflow() {
        let mut l = LatencyEstimate::new(0);
        assert!(!l.packet_sent(100 * MS, 95 * MS));
        assert!(!l.packet_sent(350 * MS, 345 * MS));
        assert!(l.packet_sent(600 * MS, 595 * MS));
        // pts after now (a clock step), and extreme values: no panic, no wrap.
        assert!(!l.packet_sent(0, u64::MAX));
        assert!(l.packet_sent(u64::MAX, 0));
        l.host_render(u64::MAX);
        assert_eq!(l.total_ns(), Some(u64::MAX));
    }
}
