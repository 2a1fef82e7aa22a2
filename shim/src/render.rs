//! The playing end of a jitter buffer, for every stream that plays decoded audio on a
//! clock other than the one it was made on: melange-host's playback streams (guest
//! audio on the host's clock) and the guest's virtual microphone (host audio on the
//! guest's clock).
//!
//! Decoded samples reach the stream's real-time callback through an SPSC ring. Once per
//! output cycle the callback hands [`RenderCore::cycle`] the buffer to fill: it skips
//! what an overrun let pass ([`MissedCycles`]), decides with [`Playout`] whether to
//! prime or play, fills the rest with silence, and feeds the ring's fill to the
//! [`DriftController`], whose ratio the caller writes into its stream's rate match.
//! Plain arithmetic and atomics: no allocation, lock, log or syscall.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};

use crate::drift::DriftController;
use crate::playout::{MissedCycles, Playout};

/// What a jitter buffer with a derived target keeps beyond the output cycle being played
/// and the deepest recent dip of its fill: 3 ms (2 ms let a late guest cycle underrun in
/// the simulation `late_packets_now_and_then_underrun_at_most_once`, while the set
/// point was still rising to a new dip), and 1 ms more for each underrun, up to 4 more.
/// The dip that caused an underrun is already in the deepest dip; doubling the margin
/// as well made two underruns cost 12 ms of latency for the rest of the stream.
pub fn jitter_margin_frames(rate: u32, underruns: u64) -> u32 {
    let ms = 3 + underruns.min(4) as u32;
    rate * ms / 1000
}

/// How a stream renders.
#[derive(Debug, Clone, Copy)]
pub struct RenderConfig {
    /// Sample frames per second.
    pub rate: u32,
    /// Interleaved channels.
    pub channels: usize,
    /// Jitter-buffer target in sample frames.
    pub latency_frames: usize,
    /// True when the target was derived: drift control may then trim the buffer to what
    /// the arrival pattern needs; a given target is held as given.
    pub trim: bool,
    /// The output's cycle in sample frames.
    pub quantum: u32,
    /// Most a settled buffer may hold beyond the fill drift control holds, in ms, if
    /// anything beyond is to be skipped. Drift control drains an excess at 1 ms a
    /// second at most; a burst (a far graph that stalled and caught up, a port that
    /// held bytes back) would stay as latency. The microphone cuts it (60 ms: in a call
    /// a glitch now beats a delay that stays); playback keeps it and tells the apps
    /// (`None`), so that picture and sound stay together.
    pub max_excess_ms: Option<u32>,
}

impl RenderConfig {
    fn margin(&self, underruns: u64) -> Option<u32> {
        self.trim.then(|| jitter_margin_frames(self.rate, underruns))
    }
}

/// Counters and flags shared between the stream's owner and its real-time callback.
#[derive(Debug, Default)]
pub struct RenderStats {
    /// Underruns so far.
    pub underruns: AtomicU64,
    /// Frames the callback filled from the ring, and with silence (priming, underruns).
    pub played_frames: AtomicU64,
    /// See [`RenderStats::played_frames`].
    pub silence_frames: AtomicU64,
    /// Frames skipped because the output ran cycles without the callback, or because
    /// the buffer held more than [`RenderConfig::max_excess_ms`] beyond its target.
    pub skipped_frames: AtomicU64,
    /// Times the buffer was cut back to its target ([`RenderConfig::max_excess_ms`]).
    pub latency_cuts: AtomicU64,
    /// Cycles run.
    pub cycles: AtomicU64,
    /// Frames in the ring at the start of each cycle, summed: with [`RenderStats::cycles`]
    /// the jitter buffer's mean fill over any interval.
    pub fill_sum_frames: AtomicU64,
    /// The drift controller's last estimate, in ppm x 1000.
    pub drift_ppb: AtomicI64,
    /// The fill drift control holds, in frames (its set point).
    pub target_frames: AtomicU64,
    /// When the callback reads the ring next (`CLOCK_MONOTONIC` ns; 0 before the first
    /// cycle), and how long what it writes takes to be heard: the stream's delay to the
    /// device plus what its resampler holds. Set by the caller ([`RenderCore::timing`]).
    pub next_read_ns: AtomicU64,
    /// See [`RenderStats::next_read_ns`].
    pub output_delay_ns: AtomicU64,
    /// The output's position (in ns of its own clock) and `CLOCK_MONOTONIC` at the first
    /// and the last cycle: how fast the output's graph really ran
    /// ([`RenderStats::clock_ppm`]).
    pub clock_first: [AtomicU64; 2],
    /// See [`RenderStats::clock_first`].
    pub clock_last: [AtomicU64; 2],
    /// Set by the owner: play out what is buffered, then stop ([`RenderStats::drained`]).
    pub draining: AtomicBool,
    /// Set by the callback once a draining stream has played everything.
    pub drained: AtomicBool,
    /// Set by the owner when a new stream starts feeding the ring: the callback primes
    /// again from scratch, with the configured target and a fresh drift estimate.
    pub restart: AtomicBool,
}

impl RenderStats {
    /// How much faster than `CLOCK_MONOTONIC` the output's graph ran since its first
    /// cycle, in ppm: a graph whose timer fired late without making up for it runs
    /// slow, and drift control then measures that too. `None` before a second passed.
    pub fn clock_ppm(&self) -> Option<f64> {
        let load = |a: &[AtomicU64; 2]| (a[0].load(Ordering::Relaxed), a[1].load(Ordering::Relaxed));
        let ((p0, t0), (p1, t1)) = (load(&self.clock_first), load(&self.clock_last));
        let elapsed = t1.checked_sub(t0).filter(|e| *e >= 1_000_000_000)?;
        Some((p1.saturating_sub(p0) as f64 / elapsed as f64 - 1.0) * 1e6)
    }
}

/// The callback's half of a rendering stream. See the module docs.
#[derive(Debug)]
pub struct RenderCore {
    consumer: Consumer<f32>,
    playout: Playout,
    missed: MissedCycles,
    drift: DriftController,
    config: RenderConfig,
    stats: Arc<RenderStats>,
}

/// A ring holding `capacity_frames`, its feeding end and the core that plays it.
pub fn render_ring(config: RenderConfig, capacity_frames: usize) -> (Producer<f32>, RenderCore) {
    let (producer, consumer) = RingBuffer::new(capacity_frames * config.channels.max(1));
    (producer, RenderCore::new(consumer, config))
}

impl RenderCore {
    /// Plays what `consumer` receives.
    pub fn new(consumer: Consumer<f32>, config: RenderConfig) -> Self {
        let config = RenderConfig { channels: config.channels.max(1), ..config };
        Self {
            consumer,
            playout: Playout::new(config.latency_frames),
            missed: MissedCycles::default(),
            drift: Self::drift_for(&config),
            config,
            stats: Arc::new(RenderStats::default()),
        }
    }

    fn drift_for(config: &RenderConfig) -> DriftController {
        DriftController::new(config.latency_frames, config.quantum, config.rate, config.margin(0))
    }

    /// Interleaved channels.
    pub fn channels(&self) -> usize {
        self.config.channels
    }

    /// Sample frames per second.
    pub fn rate(&self) -> u32 {
        self.config.rate
    }

    /// The counters and flags, for the stream's owner.
    pub fn stats(&self) -> &Arc<RenderStats> {
        &self.stats
    }

    /// Fills `out` (whole frames of native-endian f32, interleaved) for one cycle.
    /// `ticks` is the output's position in frames (`pw_time.ticks`) where known.
    /// Returns the ratio to resample by while playing: over 1 when the ring fills up
    /// (consume faster), under 1 when it runs low.
    pub fn cycle(&mut self, ticks: Option<u64>, out: &mut [u8]) -> Option<f64> {
        let channels = self.config.channels;
        let frames = out.len() / (4 * channels);
        if self.stats.restart.swap(false, Ordering::Relaxed) {
            self.playout = Playout::new(self.config.latency_frames);
            self.drift = Self::drift_for(&self.config);
        }
        let mut buffered = self.consumer.slots() / channels;
        let missed = ticks.map_or(0, |t| self.missed.observe(t));
        if missed > 0 && self.playout.is_playing() {
            // The output ran a cycle without us (its graph overran): that audio was due,
            // so skip it rather than play everything a cycle later.
            let skip = ((missed as f64 * self.drift.ratio()).round() as usize).min(buffered.saturating_sub(frames));
            if let Ok(chunk) = self.consumer.read_chunk(skip * channels) {
                chunk.commit_all();
                buffered -= skip;
                self.stats.skipped_frames.fetch_add(skip as u64, Ordering::Relaxed);
            }
        }
        let draining = self.stats.draining.load(Ordering::Relaxed);
        let limit =
            self.config.max_excess_ms.map(|ms| self.drift.target() as usize + (self.config.rate * ms / 1000) as usize);
        if !draining && self.playout.is_playing() && self.drift.settled() && limit.is_some_and(|l| buffered > l) {
            let skip = buffered - self.drift.target() as usize;
            if let Ok(chunk) = self.consumer.read_chunk(skip * channels) {
                chunk.commit_all();
                buffered -= skip;
                self.stats.skipped_frames.fetch_add(skip as u64, Ordering::Relaxed);
                self.stats.latency_cuts.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.fill_sum_frames.fetch_add(buffered as u64, Ordering::Relaxed);
        let mut ratio = None;
        let take = if draining {
            if buffered == 0 {
                self.stats.drained.store(true, Ordering::Relaxed);
            }
            buffered.min(frames)
        } else {
            let before = self.playout.underruns();
            let take = self.playout.plan(buffered, frames);
            if self.playout.underruns() != before {
                self.stats.underruns.fetch_add(1, Ordering::Relaxed);
                self.drift.relearn(self.config.margin(self.playout.underruns()));
            }
            if self.playout.is_playing() {
                ratio = Some(self.drift.update(buffered as f64));
                self.stats.drift_ppb.store((self.drift.drift_ppm() * 1000.0) as i64, Ordering::Relaxed);
                self.stats.target_frames.store(self.drift.target().max(0.0) as u64, Ordering::Relaxed);
            }
            take
        };
        let out = &mut out[..frames * 4 * channels];
        let mut written = 0;
        if let Ok(chunk) = self.consumer.read_chunk(take * channels) {
            let (a, b) = chunk.as_slices();
            for (dst, v) in out.chunks_exact_mut(4).zip(a.iter().chain(b.iter())) {
                dst.copy_from_slice(&v.to_ne_bytes());
                written += 4;
            }
            chunk.commit_all();
        }
        out[written..].fill(0);
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        self.stats.played_frames.fetch_add(take as u64, Ordering::Relaxed);
        self.stats.silence_frames.fetch_add((frames - take) as u64, Ordering::Relaxed);
        ratio
    }

    /// Records the output's timing after a cycle of `frames` that started at `now_ns`:
    /// `delay_ns` from the cycle's start to being heard, and the output's position then
    /// in ns of its own clock.
    pub fn timing(&self, now_ns: u64, position_ns: u64, frames: usize, delay_ns: u64) {
        let st = &self.stats;
        if st.clock_first[1].load(Ordering::Relaxed) == 0 {
            st.clock_first[0].store(position_ns, Ordering::Relaxed);
            st.clock_first[1].store(now_ns, Ordering::Relaxed);
        }
        st.clock_last[0].store(position_ns, Ordering::Relaxed);
        st.clock_last[1].store(now_ns, Ordering::Relaxed);
        self.stats.output_delay_ns.store(delay_ns, Ordering::Relaxed);
        let next = now_ns as f64 + frames as f64 * 1e9 / f64::from(self.config.rate.max(1));
        self.stats.next_read_ns.store(next as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RenderConfig {
        RenderConfig {
            rate: 48_000,
            channels: 1,
            latency_frames: 480,
            trim: false,
            quantum: 256,
            max_excess_ms: Some(60),
        }
    }

    fn samples(out: &[u8]) -> Vec<f32> {
        out.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    #[test]
    fn primes_to_the_target_then_plays_in_order() {
        let (mut tx, mut core) = render_ring(config(), 4800);
        let mut out = vec![0u8; 256 * 4];
        for v in 0..300 {
            tx.push(v as f32).unwrap();
        }
        assert_eq!(core.cycle(Some(0), &mut out), None, "priming under the target");
        assert!(samples(&out).iter().all(|v| *v == 0.0));
        for v in 300..600 {
            tx.push(v as f32).unwrap();
        }
        assert!(core.cycle(Some(256), &mut out).is_some());
        assert_eq!(samples(&out), (0..256).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(core.stats().silence_frames.load(Ordering::Relaxed), 256);
    }

    #[test]
    fn a_burst_far_beyond_the_target_is_cut_back_to_it() {
        let (mut tx, mut core) = render_ring(config(), 48_000);
        let mut out = vec![0u8; 256 * 4];
        // Steady: 256 in, 256 out per cycle, until drift control has learned its set point.
        for v in 0..512 {
            tx.push(v as f32).unwrap();
        }
        let mut next = 512;
        for c in 0..200u64 {
            for _ in 0..256 {
                tx.push(next as f32).unwrap();
                next += 1;
            }
            core.cycle(Some(c * 256), &mut out);
        }
        assert_eq!(core.stats().latency_cuts.load(Ordering::Relaxed), 0, "no cut while steady");
        // A 100 ms burst: cut back to the target, the oldest first.
        for _ in 0..4800 {
            tx.push(next as f32).unwrap();
            next += 1;
        }
        core.cycle(Some(200 * 256), &mut out);
        assert_eq!(core.stats().latency_cuts.load(Ordering::Relaxed), 1);
        let first = samples(&out)[0];
        let target = core.drift.target();
        assert!((f64::from(next as u32) - f64::from(first) - target).abs() < 2.0, "{first} for {next} at {target}");
    }

    #[test]
    fn a_restart_primes_again_from_the_configured_target() {
        let (mut tx, mut core) = render_ring(config(), 4800);
        let mut out = vec![0u8; 256 * 4];
        for v in 0..600 {
            tx.push(v as f32).unwrap();
        }
        // 256 and 256 played, then an underrun: 88 left for 256 wanted. The target grows.
        for c in 0..3 {
            core.cycle(Some(c * 256), &mut out);
        }
        assert_eq!(core.stats().underruns.load(Ordering::Relaxed), 1);
        for v in 0..480 {
            tx.push(v as f32).unwrap();
        }
        core.stats().restart.store(true, Ordering::Relaxed);
        assert!(core.cycle(Some(768), &mut out).is_some(), "480 frames are the first target again");
    }
}
