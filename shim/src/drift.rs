//! Drift control: holding a jitter buffer at its target when two clocks disagree.
//!
//! The guest's graph runs on the guest's clock, the host's output on the host's; with
//! a few hundred ppm between them a buffer that is merely primed fills or drains by
//! tens of milliseconds an hour. [`DriftController`] turns the buffer's fill, once per
//! output cycle, into the rate at which the output's resampler should consume input
//! (PipeWire's `SPA_IO_RateMatch.rate`), with the delay-locked loop PipeWire's own
//! network modules use (`spa/utils/dll.h`, ported here: it is static inline in C).
//!
//! Plain arithmetic, no allocation: safe in a real-time callback.

#![forbid(unsafe_code)]

/// Loop bandwidth in Hz. Simulated at ±500 ppm with 10 ms packets into 256-frame
/// cycles: 0.128 Hz converges in 2 s but wobbles the rate by ±420 ppm; 0.064 Hz holds
/// the fill within 2 ms after 3 s with ±140 ppm of wobble (a quarter of a cent of
/// pitch); 0.032 Hz needs 11 s at -500 ppm, over the 10 s budget.
const BANDWIDTH_HZ: f64 = 0.064;
/// The error fed to the loop is clamped to this many milliseconds, so a burst or an
/// underrun cannot swing the rate.
const MAX_ERROR_MS: f64 = 5.0;
/// The rate never leaves 1 ± this: twice the largest drift we expect (500 ppm), and
/// under two cents of pitch even when it is all used.
const MAX_CORRECTION: f64 = 0.001;
/// Seconds of fill averaged to learn the set point before correcting anything.
const LEARN_SECONDS: f64 = 0.5;

/// PipeWire's delay-locked loop (`struct spa_dll`).
#[derive(Debug, Clone)]
struct Dll {
    z1: f64,
    z2: f64,
    z3: f64,
    w0: f64,
    w1: f64,
    w2: f64,
}

impl Dll {
    fn new(bandwidth_hz: f64, period: u32, rate: u32) -> Self {
        let w = 2.0 * std::f64::consts::PI * bandwidth_hz * f64::from(period) / f64::from(rate);
        Self { z1: 0.0, z2: 0.0, z3: 0.0, w0: 1.0 - (-20.0 * w).exp(), w1: w * 1.5 / f64::from(period), w2: w / 1.5 }
    }

    /// `spa_dll_update`: returns the correction factor for an error in frames.
    fn update(&mut self, err: f64) -> f64 {
        self.z1 += self.w0 * (self.w1 * err - self.z1);
        self.z2 += self.w0 * (self.z1 - self.z2);
        self.z3 += self.w2 * self.z2;
        1.0 - (self.z2 + self.z3)
    }
}

/// Per-stream drift control. See the module docs.
///
/// The set point is learned, not given: packets arrive in bursts, so the mean fill of a
/// buffer primed to its jitter target sits above that target by about half a burst.
/// Correcting that offset would drain it at a pitch-changing rate; the controller
/// instead averages the fill for its first half second and holds that level, so it
/// only ever corrects drift.
#[derive(Debug, Clone)]
pub struct DriftController {
    dll: Dll,
    target: f64,
    max_error: f64,
    ratio: f64,
    learn_cycles: u32,
    learned: (f64, u32),
}

impl DriftController {
    /// A controller holding `target_frames` buffered, updated every `period_frames`
    /// output frames at `rate` Hz.
    pub fn new(target_frames: usize, period_frames: u32, rate: u32) -> Self {
        let learn_cycles = (LEARN_SECONDS * f64::from(rate.max(1)) / f64::from(period_frames.max(1))).ceil() as u32;
        Self {
            dll: Dll::new(BANDWIDTH_HZ, period_frames.max(1), rate.max(1)),
            target: target_frames as f64,
            max_error: MAX_ERROR_MS * f64::from(rate) / 1000.0,
            ratio: 1.0,
            learn_cycles,
            learned: (0.0, 0),
        }
    }

    /// Learns the set point again (after the jitter buffer raised its target and
    /// re-primed), keeping what the loop knows about the drift.
    pub fn relearn(&mut self) {
        self.learned = (0.0, 0);
    }

    /// The fill being held, in frames (the learned set point once learned).
    pub fn target(&self) -> f64 {
        self.target
    }

    /// Feeds the frames buffered at the start of an output cycle; returns the input
    /// frames to consume per output frame (above 1 drains a buffer that is too full).
    pub fn update(&mut self, buffered_frames: f64) -> f64 {
        if !buffered_frames.is_finite() {
            return self.ratio;
        }
        if self.learned.1 < self.learn_cycles {
            self.learned.0 += buffered_frames;
            self.learned.1 += 1;
            if self.learned.1 == self.learn_cycles {
                self.target = self.learned.0 / f64::from(self.learn_cycles);
            }
            return self.ratio;
        }
        let err = (buffered_frames - self.target).clamp(-self.max_error, self.max_error);
        let corr = self.dll.update(err);
        self.ratio = if corr > 0.0 { (1.0 / corr).clamp(1.0 - MAX_CORRECTION, 1.0 + MAX_CORRECTION) } else { 1.0 };
        self.ratio
    }

    /// The last ratio returned.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The ratio as a clock difference in ppm (positive: the guest runs fast).
    pub fn drift_ppm(&self) -> f64 {
        (self.ratio - 1.0) * 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Virtual clocks: the guest makes 480-frame packets on its clock (`ppm` off the
    /// host's), arriving with up to `jitter_ms` of delay; the host output consumes
    /// `ratio * 256` input frames every 256 output frames. Returns, after the warm-up,
    /// the worst deviation of the one-second mean fill from the target (ms), the lowest
    /// fill seen (frames), and the mean ratio over the last 10 s.
    fn simulate(ppm: f64, seconds: f64, warmup: f64, jitter_ms: f64) -> (f64, f64, f64) {
        let rate = 48_000.0;
        let target = 1440.0; // 30 ms: where the buffer is primed
        let mut ctl = DriftController::new(1440, 256, 48_000);
        let packet_period = 0.010 / (1.0 + ppm * 1e-6); // host seconds per guest packet
        let cycle = 256.0 / rate;
        let mut x: u32 = 1;
        let mut next_packet = 0.0f64;
        let mut in_flight: Vec<f64> = Vec::new(); // arrival times of sent packets
        let mut buffered = target; // primed
        let (mut worst, mut lowest) = (0.0f64, f64::MAX);
        let (mut sum, mut n, mut window_end) = (0.0, 0u32, 1.0);
        let (mut ratio_sum, mut ratio_n) = (0.0, 0u32);
        let mut t = 0.0;
        while t < seconds {
            while next_packet <= t {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                in_flight.push(next_packet + jitter_ms / 1000.0 * f64::from(x >> 16) / 65536.0);
                next_packet += packet_period;
            }
            in_flight.retain(|&arrival| {
                if arrival <= t {
                    buffered += 480.0;
                    false
                } else {
                    true
                }
            });
            // The fill the controller holds: at the start of each output cycle.
            let ratio = ctl.update(buffered);
            sum += buffered;
            n += 1;
            buffered -= ratio * 256.0;
            lowest = lowest.min(buffered);
            if t > seconds - 10.0 {
                ratio_sum += ratio;
                ratio_n += 1;
            }
            t += cycle;
            if t >= window_end {
                if t > warmup {
                    worst = worst.max(((sum / f64::from(n) - ctl.target()) / rate * 1000.0).abs());
                    // The learned set point is the primed fill plus about half a packet.
                    assert!((ctl.target() - target).abs() < 480.0, "learned set point {}", ctl.target());
                }
                sum = 0.0;
                n = 0;
                window_end += 1.0;
            }
        }
        (worst, lowest, ratio_sum / f64::from(ratio_n.max(1)))
    }

    #[test]
    fn holds_the_target_within_2_ms_for_an_hour_at_500_ppm_either_way() {
        for ppm in [500.0, -500.0, 120.0, 0.0] {
            let (worst, lowest, ratio) = simulate(ppm, 3600.0, 10.0, 2.0);
            assert!(worst <= 2.0, "{ppm} ppm: the mean fill strayed {worst:.2} ms from the target");
            assert!(lowest > 0.0, "{ppm} ppm: underrun (fill {lowest})");
            assert!(((ratio - 1.0) * 1e6 - ppm).abs() < 50.0, "{ppm} ppm: learned {:.0} ppm", (ratio - 1.0) * 1e6);
        }
    }

    #[test]
    fn without_control_the_same_drift_empties_the_buffer() {
        // The same 500 ppm with a fixed ratio of 1 drains 30 ms in a minute: what the
        // controller is for.
        let mut buffered = 1440.0f64;
        let mut t = 0.0;
        while t < 60.0 {
            buffered += 48_000.0 * (1.0 - 500e-6) * (256.0 / 48_000.0) - 256.0;
            t += 256.0 / 48_000.0;
        }
        assert!(buffered < 0.0);
    }

    #[test]
    fn the_rate_stays_within_its_bounds_on_absurd_input() {
        let mut ctl = DriftController::new(1440, 256, 48_000);
        for i in 0..100_000 {
            let r = ctl.update(if i % 2 == 0 { 1e12 } else { -1e12 });
            assert!((1.0 - MAX_CORRECTION..=1.0 + MAX_CORRECTION).contains(&r));
        }
        let r = ctl.update(f64::NAN);
        assert!(r.is_finite());
    }
}
