//! The real-time half of a jitter buffer: when to start playing and how much to take.
//!
//! Decoded audio waits in an SPSC ring between the network thread and the output's
//! real-time callback. [`Playout`] is the callback's decision, made once per cycle with
//! nothing but two numbers: it primes until the ring holds the latency target, then
//! plays; on an underrun it plays what is left, fills with silence and primes again.

/// Per-stream playout state. Real-time safe: plain arithmetic.
#[derive(Debug, Clone)]
pub struct Playout {
    target: usize,
    playing: bool,
    underruns: u64,
}

impl Playout {
    /// Starts playing once `target_frames` sample frames are buffered.
    pub fn new(target_frames: usize) -> Self {
        Self { target: target_frames.max(1), playing: false, underruns: 0 }
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
            return buffered;
        }
        wanted
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
    fn primes_then_plays_then_reprimes_after_an_underrun() {
        let mut p = Playout::new(1440);
        assert_eq!(p.plan(480, 256), 0);
        assert_eq!(p.plan(1439, 256), 0);
        assert_eq!(p.plan(1440, 256), 256);
        assert!(p.is_playing());
        assert_eq!(p.plan(100, 256), 100);
        assert_eq!(p.underruns(), 1);
        assert_eq!(p.plan(500, 256), 0);
        assert_eq!(p.plan(1500, 256), 256);
    }
}
