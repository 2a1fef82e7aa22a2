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
/// Time constant of the moving average that dips of the fill are measured from.
const MEAN_SECONDS: f64 = 0.5;

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
/// The set point is learned, not given. For its first half second the controller only
/// watches the fill at the start of each output cycle: its mean, and its minimum (the
/// fill just before the latest packet of the guest's burst pattern lands). The minimum
/// only has to cover the cycle being played plus a margin (the floor); anything above
/// it is latency bought for nothing, left by priming (the fill jumps a whole packet at
/// a time) and by packets that queued while the output stream started. So the goal
/// becomes the floor plus the deepest dip below the mean, and the controller drains
/// the excess by consuming [`CATCH_UP`] faster (1.7 cents of pitch, for a few seconds
/// at the start of a stream) instead of skipping audio.
///
/// From then on it keeps watching how deep the fill dips below its moving average
/// (late packets, bursts): a dip deeper than any before raises the goal to the floor
/// plus that dip, and the set point follows at [`CATCH_UP`] (consuming slower). Guest
/// graphs on busy machines run late now and then (seen here: 2 to 6 ms every few
/// seconds, deeper than anything the first half second shows); trimming the buffer
/// below such a dip would underrun at the next one. The goal never falls again until
/// the buffer re-primes: a set point that rises and falls with every window made the
/// drift loop chase it.
#[derive(Debug, Clone)]
pub struct DriftController {
    dll: Dll,
    /// The fill being held now; ramps down to `goal` while draining start-up excess.
    set_point: f64,
    /// The fill to hold once the excess is drained.
    goal: f64,
    /// Lowest fill at a cycle start that still leaves a margin: one cycle plus the
    /// margin; `None` holds the fill where priming left it (a given `--latency`).
    floor: Option<f64>,
    period: f64,
    max_error: f64,
    ratio: f64,
    /// The part of `ratio` that corrects clock drift (the rest drains start-up excess).
    drift: f64,
    learn_cycles: u32,
    /// Sum, minimum and count of the fills seen while learning.
    learned: (f64, f64, u32),
    /// Deepest dip of the fill below its moving average so far. The mean is the fill's
    /// own, not the set point, so a set point on the move (and the loop lagging it) is
    /// no dip.
    deepest_dip: f64,
    mean_fill: f64,
    mean_weight: f64,
}

/// Extra input consumed per output frame while draining start-up excess: 1.7 cents of
/// pitch, inaudible; 5 ms of excess takes 5 s. (At 0.5 % PipeWire's resampler did not
/// follow and the loop saturated in the end-to-end drift test.)
const CATCH_UP: f64 = 0.001;

impl DriftController {
    /// A controller for a buffer primed at `target_frames`, updated every
    /// `period_frames` output frames at `rate` Hz, that keeps at least
    /// `period_frames + margin_frames` buffered at the start of every cycle; with
    /// `None` for the margin it holds the fill priming left instead of trimming it.
    pub fn new(target_frames: usize, period_frames: u32, rate: u32, margin_frames: Option<u32>) -> Self {
        let cycles_per_second = f64::from(rate.max(1)) / f64::from(period_frames.max(1));
        let learn_cycles = (LEARN_SECONDS * cycles_per_second).ceil() as u32;
        Self {
            dll: Dll::new(BANDWIDTH_HZ, period_frames.max(1), rate.max(1)),
            set_point: target_frames as f64,
            goal: target_frames as f64,
            floor: margin_frames.map(|m| f64::from(period_frames) + f64::from(m)),
            period: f64::from(period_frames.max(1)),
            max_error: MAX_ERROR_MS * f64::from(rate) / 1000.0,
            ratio: 1.0,
            drift: 1.0,
            learn_cycles,
            learned: (0.0, f64::MAX, 0),
            deepest_dip: 0.0,
            mean_fill: target_frames as f64,
            mean_weight: (1.0 / (MEAN_SECONDS * cycles_per_second)).min(1.0),
        }
    }

    /// Learns the set point again (after the jitter buffer re-primed), with a new
    /// margin, keeping what the loop knows about the drift.
    pub fn relearn(&mut self, margin_frames: Option<u32>) {
        self.floor = margin_frames.map(|m| self.period + f64::from(m));
        self.learned = (0.0, f64::MAX, 0);
        self.deepest_dip = 0.0;
    }

    /// The fill being held, in frames.
    pub fn target(&self) -> f64 {
        self.set_point
    }

    /// How far the fill dips below its mean in the normal run of arrivals, in frames:
    /// the deepest dip seen since the set point was last learned.
    pub fn deepest_dip(&self) -> f64 {
        self.deepest_dip
    }

    /// The buffer dropped `frames` outside the normal flow (audio cut as stale, or
    /// skipped for cycles the output missed): the fill's average follows at once, so
    /// the drop is no dip, and a set point still being learned is learned again from
    /// what is left.
    pub fn skipped(&mut self, frames: f64) {
        self.mean_fill -= frames;
        if !self.settled() {
            self.learned = (0.0, f64::MAX, 0);
        }
    }

    /// True once the set point is learned (the first half second after priming).
    pub fn settled(&self) -> bool {
        self.learned.2 >= self.learn_cycles
    }

    /// Feeds the frames buffered at the start of an output cycle; returns the input
    /// frames to consume per output frame (above 1 drains a buffer that is too full).
    pub fn update(&mut self, buffered_frames: f64) -> f64 {
        if !buffered_frames.is_finite() {
            return self.ratio;
        }
        if self.learned.2 < self.learn_cycles {
            self.learned.0 += buffered_frames;
            self.learned.1 = self.learned.1.min(buffered_frames);
            self.learned.2 += 1;
            if self.learned.2 == self.learn_cycles {
                let mean = self.learned.0 / f64::from(self.learn_cycles);
                self.set_point = mean;
                self.mean_fill = mean;
                self.deepest_dip = mean - self.learned.1;
                self.goal = self.floor.map_or(mean, |floor| floor + self.deepest_dip);
            }
            return self.ratio;
        }
        // Keep the deepest dip above the floor. One deeper than four times the error
        // clamp is a stall, not jitter: the playout's re-priming handles it.
        self.mean_fill += self.mean_weight * (buffered_frames - self.mean_fill);
        let dip = (self.mean_fill - buffered_frames).min(self.max_error * 4.0);
        if dip > self.deepest_dip {
            self.deepest_dip = dip;
            if let Some(floor) = self.floor {
                self.goal = self.goal.max(floor + dip);
            }
        }
        // The set point moves by exactly what the extra (or missing) rate drains (or
        // lets accumulate), so the loop only ever sees drift.
        let max_step = CATCH_UP * self.period;
        let step = (self.set_point - self.goal).clamp(-max_step, max_step);
        self.set_point -= step;
        let err = (buffered_frames - self.set_point).clamp(-self.max_error, self.max_error);
        let integral = self.dll.z3;
        let corr = self.dll.update(err);
        let wanted = if corr > 0.0 { 1.0 / corr } else { 1.0 + MAX_CORRECTION };
        self.drift = wanted.clamp(1.0 - MAX_CORRECTION, 1.0 + MAX_CORRECTION);
        if self.drift != wanted {
            // Anti-windup: while the rate is at its bound, integrating further would only
            // make the loop overshoot for seconds once the fill comes back.
            self.dll.z3 = integral;
        }
        self.ratio = self.drift + step / self.period;
        self.ratio
    }

    /// The last ratio returned.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The clock difference the loop has measured, in ppm (positive: the guest runs
    /// fast); excludes draining start-up excess.
    pub fn drift_ppm(&self) -> f64 {
        (self.drift - 1.0) * 1e6
    }

    /// True while the set point moves towards its goal.
    pub fn catching_up(&self) -> bool {
        (self.set_point - self.goal).abs() > f64::EPSILON
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Virtual clocks: the guest makes 480-frame packets on its clock (`ppm` off the
    /// host's), arriving with up to `jitter_ms` of delay; the host output consumes
    /// `ratio * 256` input frames every 256 output frames. Returns, after the warm-up,
    /// the worst deviation of the one-second mean fill from the target (ms), the lowest
    /// and highest fill seen (frames), and the mean ratio over the last 10 s.
    fn simulate(ppm: f64, seconds: f64, warmup: f64, jitter_ms: f64, period: u32) -> (f64, f64, f64, f64) {
        let rate = 48_000.0;
        let target = 1440.0; // 30 ms: where the buffer is primed
        let mut ctl = DriftController::new(1440, period, 48_000, Some(72));
        let packet_period = 0.010 / (1.0 + ppm * 1e-6); // host seconds per guest packet
        let cycle = f64::from(period) / rate;
        let mut x: u32 = 1;
        let mut next_packet = 0.0f64;
        let mut in_flight: Vec<f64> = Vec::new(); // arrival times of sent packets
        let mut buffered = target; // primed
        let (mut worst, mut lowest, mut highest) = (0.0f64, f64::MAX, 0.0f64);
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
            highest = highest.max(buffered);
            sum += buffered;
            n += 1;
            buffered -= ratio * f64::from(period);
            lowest = lowest.min(buffered);
            if t > seconds - 10.0 {
                ratio_sum += ratio;
                ratio_n += 1;
            }
            t += cycle;
            if t >= window_end {
                if t > warmup {
                    worst = worst.max(((sum / f64::from(n) - ctl.target()) / rate * 1000.0).abs());
                    // Trimmed: the fill before a packet lands keeps one cycle and the margin,
                    // plus the jitter the learning half second saw.
                    assert!(ctl.target() < target, "set point {} not trimmed", ctl.target());
                    assert!(ctl.target() > f64::from(period) + 72.0, "set point {} below the floor", ctl.target());
                }
                sum = 0.0;
                n = 0;
                window_end += 1.0;
            }
        }
        (worst, lowest, highest, ratio_sum / f64::from(ratio_n.max(1)))
    }

    #[test]
    fn holds_the_target_within_2_ms_for_an_hour_at_500_ppm_either_way() {
        for (ppm, period) in [(500.0, 256), (-500.0, 256), (120.0, 256), (0.0, 256), (500.0, 128), (-500.0, 128)] {
            let (worst, lowest, highest, ratio) = simulate(ppm, 3600.0, 10.0, 2.0, period);
            assert!(worst <= 2.0, "{ppm} ppm: the mean fill strayed {worst:.2} ms from the target");
            assert!(lowest > 0.0, "{ppm} ppm: underrun (fill {lowest})");
            // Never near a backlog: far under the target (30 ms) and the cut's margin.
            assert!(highest < 0.5 * 48_000.0 / 4.0, "{ppm} ppm: the fill reached {highest} frames");
            assert!(((ratio - 1.0) * 1e6 - ppm).abs() < 50.0, "{ppm} ppm: learned {:.0} ppm", (ratio - 1.0) * 1e6);
        }
    }

    /// A guest whose graph runs late now and then: every 3 s a packet (and the ones
    /// queued behind it) lands 5 ms late, on top of 2 ms of jitter, for an hour at
    /// 300 ppm. The first spike is deeper than anything the first half second showed
    /// and may underrun; the controller remembers it, so no later spike does, and the
    /// latency it costs stays bounded (the set point stays below the priming level).
    #[test]
    fn late_packets_now_and_then_underrun_at_most_once() {
        let (rate, period) = (48_000.0, 256u32);
        // The margin melange-host keeps: 3 ms.
        let mut ctl = DriftController::new(1440, period, 48_000, Some(144));
        let packet_period = 0.010 / (1.0 + 300e-6);
        let cycle = f64::from(period) / rate;
        let (mut x, mut next_packet, mut seq) = (7u32, 0.0f64, 0u64);
        let mut in_flight: Vec<f64> = Vec::new();
        let mut buffered = 1440.0f64;
        let (mut underruns, mut last_underrun, mut highest_target) = (0u32, 0.0f64, 0.0f64);
        let mut t = 0.0;
        while t < 3600.0 {
            while next_packet <= t {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let mut arrival = next_packet + 0.002 * f64::from(x >> 16) / 65536.0;
                if seq % 300 == 150 {
                    arrival += 0.005;
                }
                // A packet never overtakes the one before it.
                arrival = arrival.max(in_flight.last().copied().unwrap_or(0.0));
                in_flight.push(arrival);
                next_packet += packet_period;
                seq += 1;
            }
            in_flight.retain(|&arrival| {
                let arrived = arrival <= t;
                if arrived {
                    buffered += 480.0;
                }
                !arrived
            });
            let ratio = ctl.update(buffered);
            buffered -= ratio * f64::from(period);
            if buffered < 0.0 {
                // The output plays silence for what was missing.
                underruns += 1;
                last_underrun = t;
                buffered = 0.0;
            }
            if t > 60.0 {
                highest_target = highest_target.max(ctl.target());
            }
            t += cycle;
        }
        assert!(underruns <= 1, "{underruns} underruns, the last at {last_underrun:.1} s");
        assert!(highest_target < 1440.0, "the set point rose to {highest_target} frames");
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
        let mut ctl = DriftController::new(1440, 256, 48_000, Some(72));
        for i in 0..100_000 {
            let r = ctl.update(if i % 2 == 0 { 1e12 } else { -1e12 });
            assert!((1.0 - MAX_CORRECTION..=1.0 + MAX_CORRECTION).contains(&r));
        }
        let r = ctl.update(f64::NAN);
        assert!(r.is_finite());
    }
}
