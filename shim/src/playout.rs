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
//! Drift control, which holds the fill at the target, is a later layer.

#![forbid(unsafe_code)]

/// Most the target grows to, as a multiple of the configured target.
const MAX_GROWTH: usize = 4;

/// Per-stream playout state. Real-time safe: plain arithmetic.
#[derive(Debug, Clone)]
pub struct Playout {
    target: usize,
    max_target: usize,
    playing: bool,
    underruns: u64,
}

impl Playout {
    /// Starts playing once `target_frames` sample frames are buffered.
    pub fn new(target_frames: usize) -> Self {
        let target = target_frames.max(1);
        Self { target, max_target: target * MAX_GROWTH, playing: false, underruns: 0 }
    }

    /// Frames to read from the ring this cycle, given what is buffered and what the
    /// output wants; the caller writes silence for the rest.
    pub fn plan(&mut self, buffered: usize, wanted: usize) -> usize {
        if !self.playing {
            if buffered < self.target {
                return 0;
            }
            self.playing = true;
        }
        if buffered < wanted {
            self.underruns += 1;
            self.playing = false;
            self.target = (self.target + wanted.max(self.target / 2)).min(self.max_target);
            return buffered;
        }
        wanted
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_then_plays_then_reprimes_higher_after_an_underrun() {
        let mut p = Playout::new(1440);
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
    /// 1024 frames every 4 output cycles of 256; an encoder thread that wakes at random
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
        let fixed = underruns_in_model(Playout { max_target: 1440, ..Playout::new(1440) });
        let adaptive = underruns_in_model(Playout::new(1440));
        // The model's encoder gaps are unbounded (geometric), so no target is perfect:
        // growth must cut underruns, and stop at the steps it takes to reach its cap.
        assert!(fixed > adaptive, "adaptive {adaptive} underruns, fixed {fixed}");
        assert!(adaptive <= 4, "{adaptive} underruns with an adaptive target");
    }

    #[test]
    fn growth_is_capped() {
        let mut p = Playout::new(100);
        for _ in 0..100 {
            p.plan(1000, 1);
            p.plan(0, 256);
        }
        assert_eq!(p.target(), 400);
    }
}
