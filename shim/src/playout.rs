//! The real-time half of a jitter buffer: when to start playing and how much to take.
//!
//! Decoded audio waits in an SPSC ring between the network thread and the output's
//! real-time callback. [`Playout`] is the callback's decision, made once per cycle with
//! nothing but two numbers: it primes until the ring holds the latency target, then
//! plays; on an underrun it plays what is left, fills with silence and primes again.
//!
//! The target adapts upward: each underrun raises it by half (at least by the cycle that
//! could not be filled), up to four times the configured target. Guest audio arrives in bursts (a
//! guest graph cycle of 1024 frames is two or three 10 ms packets at once), and a target
//! below burst size plus scheduling jitter would underrun again after every re-prime.
//! An underrun whose silence outlasts [`OUTAGE_MS`] (and the two cycles priming takes
//! at most) was no jitter but an outage (the sender, the port or this process stalled):
//! the target goes back to where it was, and the underrun does not count as jitter
//! ([`Playout::jitter_underruns`]).
//! Drift control, which holds the fill at the target, is a later layer.
//!
//! [`MissedCycles`] notices output cycles the graph ran without the callback (a host
//! graph that overran skips one now and then): their audio was due and not played, so
//! it is skipped too, and the latency stays where it was instead of growing by a cycle
//! at every such skip.

#![forbid(unsafe_code)]

/// Most the target grows to, as a multiple of the configured target.
const MAX_GROWTH: usize = 4;
/// Silence after an underrun beyond which it was an outage, not jitter, in ms.
pub const OUTAGE_MS: u32 = 100;

/// Per-stream playout state. Real-time safe: plain arithmetic.
#[derive(Debug, Clone)]
pub struct Playout {
    target: usize,
    max_target: usize,
    playing: bool,
    underruns: u64,
    jitter_underruns: u64,
    /// Silence served since the last underrun, frames, and the target before it raised
    /// the target; `None` while playing or once judged an outage.
    starved: Option<(usize, usize)>,
    outage_frames: usize,
    /// Where priming ends this time, if not at the target (after an outage).
    prime_at: Option<usize>,
}

impl Playout {
    /// Starts playing once `target_frames` sample frames are buffered; an underrun
    /// whose silence lasts over `outage_frames` is an outage.
    pub fn new(target_frames: usize, outage_frames: usize) -> Self {
        let target = target_frames.max(1);
        Self {
            target,
            max_target: target * MAX_GROWTH,
            playing: false,
            underruns: 0,
            jitter_underruns: 0,
            starved: None,
            outage_frames,
            prime_at: None,
        }
    }

    /// [`OUTAGE_MS`] in frames at `rate`.
    pub fn outage_frames(rate: u32) -> usize {
        (u64::from(rate) * u64::from(OUTAGE_MS) / 1000) as usize
    }

    /// Frames to read from the ring this cycle, given what is buffered and what the
    /// output wants; the caller writes silence for the rest.
    pub fn plan(&mut self, buffered: usize, wanted: usize) -> usize {
        if !self.playing {
            if buffered < self.prime_at.unwrap_or(self.target) {
                if let Some((silence, before)) = &mut self.starved {
                    *silence = silence.saturating_add(wanted);
                    // Priming itself takes up to two cycles: with cycles of 2048 frames
                    // those alone pass 100 ms.
                    if *silence > self.outage_frames.saturating_add(2 * wanted) {
                        self.target = *before;
                        self.jitter_underruns -= 1;
                        self.starved = None;
                    }
                }
                return 0;
            }
            self.playing = true;
            self.starved = None;
            self.prime_at = None;
        }
        if buffered < wanted {
            self.underruns += 1;
            self.jitter_underruns += 1;
            self.playing = false;
            self.starved = Some((wanted - buffered, self.target));
            self.target = (self.target + wanted.max(self.target / 2)).min(self.max_target);
            return buffered;
        }
        wanted
    }

    /// The output or this process did not run for a while (an outage, not jitter):
    /// prime again, this time to `prime_frames` (the fill drift control holds, which
    /// may be below the target priming starts from). An underrun it caused is no
    /// jitter, and the target goes back to what it was before it.
    pub fn outage(&mut self, prime_frames: usize) {
        if let Some((_, before)) = self.starved.take() {
            self.target = before;
            self.jitter_underruns -= 1;
        }
        self.playing = false;
        self.prime_at = Some(prime_frames.clamp(1, self.target));
    }

    /// The current target in sample frames.
    pub fn target(&self) -> usize {
        self.target
    }

    /// True while playing (not priming).
    pub fn is_playing(&self) -> bool {
        self.playing
    }

    /// Underruns so far.
    pub fn underruns(&self) -> u64 {
        self.underruns
    }

    /// Underruns so far that were jitter, not outages (see [`OUTAGE_MS`]); the last one
    /// counts as jitter until its silence has outlasted [`OUTAGE_MS`].
    pub fn jitter_underruns(&self) -> u64 {
        self.jitter_underruns
    }
}

/// Counts output frames that a real-time callback was not called for, from the output
/// clock's position (`pw_time.ticks`) at each call. Plain arithmetic, real-time safe.
///
/// The cycle length is learned from the position itself (two calls in a row that moved
/// it by the same amount), so a graph whose quantum another client changed is followed.
/// A late graph either runs the late cycle and the next back to back (the second call
/// sees the same position: nothing was missed) or skips one (the position jumps by two
/// cycles and no second call follows). So a jump is only reported once the next call
/// shows it was not made up for.
#[derive(Debug, Clone, Default)]
pub struct MissedCycles {
    /// Position at the last call; `None` before the first.
    last: Option<u64>,
    /// How far the position moved at the last call, and the learned cycle length.
    last_step: u64,
    cycle: u64,
    /// Frames the position ran ahead of the calls, not yet made up for or reported.
    pending: u64,
    /// Frames reported missed so far.
    total: u64,
}

/// A position that moves by more than this many cycles at once jumped (a new driver,
/// a suspended graph that resumed): nothing to skip. About a second at 256 frames.
const MAX_MISSED_CYCLES: u64 = 200;

impl MissedCycles {
    /// Feeds one call: the output position now. Returns the output frames found missed
    /// (the caller skips as much input), usually 0.
    pub fn observe(&mut self, position: u64) -> u64 {
        let Some(last) = self.last.replace(position) else { return 0 };
        let step = position.wrapping_sub(last);
        if position < last {
            // Backwards: a new clock. Start over.
            *self = Self { last: Some(position), total: self.total, ..Self::default() };
            return 0;
        }
        let same = step == std::mem::replace(&mut self.last_step, step);
        if same && step > 0 && step != self.cycle {
            // A new cycle length: what looked like a jump was the change.
            self.cycle = step;
            self.pending = 0;
            return 0;
        }
        if self.cycle == 0 {
            return 0;
        }
        if step < self.cycle {
            // This call makes up for (part of) a late cycle.
            self.pending = self.pending.saturating_sub(self.cycle - step);
            return 0;
        }
        let confirmed = std::mem::take(&mut self.pending);
        let ahead = step - self.cycle;
        if ahead > 0 && ahead <= MAX_MISSED_CYCLES * self.cycle {
            self.pending = ahead;
        }
        self.total += confirmed;
        confirmed
    }

    /// Frames reported missed so far.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_cycle_is_reported_once_the_next_call_does_not_make_up_for_it() {
        let mut m = MissedCycles::default();
        let mut calls = [0u64, 256, 512, 1024, 1280, 1536].into_iter().map(|p| m.observe(p));
        // 768 was skipped: reported at the call after the jump.
        assert_eq!(calls.by_ref().take(4).collect::<Vec<_>>(), [0, 0, 0, 0]);
        assert_eq!(calls.next(), Some(256));
        assert_eq!(calls.next(), Some(0));
        assert_eq!(m.total(), 256);
    }

    #[test]
    fn a_late_cycle_run_back_to_back_with_the_next_is_no_miss() {
        let mut m = MissedCycles::default();
        // Late: the call at 768 sees 1024, and the next call, right after, sees 1024 too.
        let got: Vec<u64> = [0u64, 256, 512, 1024, 1024, 1280, 1536].into_iter().map(|p| m.observe(p)).collect();
        assert_eq!(got, [0; 7]);
        assert_eq!(m.total(), 0);
    }

    #[test]
    fn a_clock_that_does_not_move_jumps_far_or_goes_back_reports_nothing() {
        let mut m = MissedCycles::default();
        assert!((0..10).all(|_| m.observe(0) == 0));
        let mut got: Vec<u64> =
            [256u64, 512, 100_000_000, 100_000_256, 100_000_512, 100].into_iter().map(|p| m.observe(p)).collect();
        got.extend([356u64, 612, 868].into_iter().map(|p| m.observe(p)));
        assert_eq!(got, [0; 9]);
        assert_eq!(m.total(), 0);
    }

    #[test]
    fn the_cycle_is_learned_and_followed_when_it_changes() {
        let mut m = MissedCycles::default();
        // 128-frame cycles, one skipped; then 64-frame cycles, one skipped.
        let positions = [0u64, 128, 256, 512, 640, 704, 768, 896, 960];
        let got: Vec<u64> = positions.into_iter().map(|p| m.observe(p)).collect();
        assert_eq!(got, [0, 0, 0, 0, 128, 0, 0, 0, 64]);
        // Back to 256-frame cycles: the change is no miss.
        let got: Vec<u64> = [1216u64, 1472, 1728, 1984].into_iter().map(|p| m.observe(p)).collect();
        assert_eq!(got, [0; 4]);
        assert_eq!(m.total(), 192);
    }

    #[test]
    fn primes_then_plays_then_reprimes_higher_after_an_underrun() {
        let mut p = Playout::new(1440, 4800);
        assert_eq!(p.plan(480, 256), 0);
        assert_eq!(p.plan(1439, 256), 0);
        assert_eq!(p.plan(1440, 256), 256);
        assert!(p.is_playing());
        assert_eq!(p.plan(100, 256), 100);
        assert_eq!(p.underruns(), 1);
        assert_eq!(p.target(), 2160);
        assert_eq!(p.plan(2159, 256), 0);
        assert_eq!(p.plan(2160, 256), 256);
    }

    /// Underrun events in a model of the real arrival pattern: the guest graph makes
    /// 1024 frames every 4 output cycles of 256; a sending thread that wakes at random
    /// (every other cycle on average) sends the whole 480-frame packets it has; each send arrives 0 to
    /// 2 output cycles later.
    fn underruns_in_model(mut p: Playout) -> u64 {
        let mut x: u32 = 12345;
        let (mut produced, mut sent, mut buffered) = (0usize, 0usize, 0usize);
        let mut in_flight = [0usize; 3];
        for cycle in 0..40_000 {
            if cycle % 4 == 0 {
                produced += 1024;
            }
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if x >> 31 != 0 {
                let n = (produced - sent) / 480 * 480;
                sent += n;
                in_flight[((x >> 16) % 3) as usize] += n;
            }
            buffered += in_flight[0];
            in_flight.rotate_left(1);
            in_flight[2] = 0;
            buffered -= p.plan(buffered, 256);
        }
        p.underruns()
    }

    #[test]
    fn bursty_arrival_stops_underrunning_once_the_target_has_grown() {
        let fixed = underruns_in_model(Playout { max_target: 1440, ..Playout::new(1440, 4800) });
        let adaptive = underruns_in_model(Playout::new(1440, 4800));
        // The model's encoder gaps are unbounded (geometric), so no target is perfect:
        // growth must cut underruns, and stop at the steps it takes to reach its cap.
        assert!(fixed > adaptive, "adaptive {adaptive} underruns, fixed {fixed}");
        assert!(adaptive <= 4, "{adaptive} underruns with an adaptive target");
    }

    #[test]
    fn an_outage_primes_again_at_the_target_it_had() {
        let mut p = Playout::new(1440, 4800);
        assert_eq!(p.plan(1440, 256), 256);
        // Jitter: silent for 2 cycles, then primed again at the raised target.
        assert_eq!(p.plan(100, 256), 100);
        assert_eq!((p.target(), p.jitter_underruns()), (2160, 1));
        assert_eq!(p.plan(0, 256), 0);
        assert_eq!(p.plan(2160, 256), 256);
        assert_eq!((p.target(), p.jitter_underruns()), (2160, 1));
        // An outage: silent past 4800 frames and two cycles; the target is what it was.
        assert_eq!(p.plan(10, 256), 10);
        for _ in 0..21 {
            assert_eq!(p.plan(0, 256), 0);
        }
        assert_eq!((p.target(), p.underruns(), p.jitter_underruns()), (2160, 2, 1));
        assert_eq!(p.plan(2160, 256), 256);
    }

    #[test]
    fn priming_through_long_cycles_is_no_outage() {
        // The host's graph went to 2048-frame cycles: an underrun, then two cycles of
        // silence while 2048 frames a cycle arrive. Jitter, not an outage.
        let mut p = Playout::new(752, 4800);
        assert_eq!(p.plan(800, 128), 128);
        assert_eq!(p.plan(700, 2048), 700);
        assert_eq!(p.plan(2048, 2048), 0);
        assert_eq!(p.plan(4096, 2048), 2048);
        assert_eq!((p.target(), p.jitter_underruns()), (2800, 1), "the target grew for the long cycles");
    }

    #[test]
    fn growth_is_capped() {
        let mut p = Playout::new(100, 4800);
        for _ in 0..100 {
            p.plan(1000, 1);
            p.plan(0, 256);
        }
        assert_eq!(p.target(), 400);
    }
}
