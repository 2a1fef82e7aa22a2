//! The playing end of a jitter buffer, for every stream that plays decoded audio on a
//! clock other than the one it was made on: melange-host's playback streams (guest
//! audio on the host's clock) and the guest's virtual microphone (host audio on the
//! guest's clock).
//!
//! Decoded samples reach the stream's real-time callback through an SPSC ring. Once per
//! output cycle the callback hands [`RenderCore::cycle`] the buffer to fill: it skips
//! what an overrun let pass ([`MissedCycles`]), cuts a backlog beyond the target
//! ([`excess_margin_frames`]), decides with [`Playout`] whether to prime or play,
//! fills the rest with silence, and feeds the ring's fill to the [`DriftController`],
//! whose ratio the caller writes into its stream's rate match.
//! Plain arithmetic and atomics: no allocation, lock, log or syscall.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};

use crate::drift::DriftController;
use crate::playout::{MissedCycles, Playout, OUTAGE_MS};

/// [`OUTAGE_MS`] in nanoseconds: a gap between two cycles that long is an outage.
const OUTAGE_NS: u64 = OUTAGE_MS as u64 * 1_000_000;

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

/// The jitter buffer's derived target, both ends alike: one packet (packets land whole,
/// so the fill swings by one), one output cycle, and the margin. melange-host's
/// `--latency auto` and the guest's virtual microphone start from it.
pub fn jitter_target_frames(packet_frames: u32, quantum: u32, rate: u32) -> usize {
    packet_frames as usize + quantum as usize + jitter_margin_frames(rate, 0) as usize
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
    /// Sample frames in one packet of the stream: how much lands at once.
    pub packet_frames: u32,
}

/// How far above its target a playing buffer may fill before the oldest audio beyond
/// the target is dropped: two packets and 10 ms (30 ms for 10 ms packets, 15 ms for
/// 2.5 ms ones), more than the bursts of a guest graph cycle and a late wake-up put
/// there. More is a backlog: audio that waited while the sender, the port or this
/// process stalled. Drift control would drain it at 1 ms a second (a 0.5 s backlog
/// for 8 minutes); a call, a game, a UI sound and a video player that re-syncs all
/// want the stream back at its target, so it is cut, oldest first, and counted.
pub fn excess_margin_frames(rate: u32, packet_frames: u32) -> u32 {
    2 * packet_frames + rate / 100
}

/// After a backlog was cut, or an outage, the fill's lowest point is watched over
/// windows this long, [`TRIM_WINDOWS`] of them, and at the end of each whatever kept it
/// above the target by more than [`TRIM_FLOOR_MS`] is cut as well (normally the fill
/// dips below its target): a backlog often arrives in pieces, each under the
/// margin (through an 8 KiB socket buffer, 40 ms of PCM at a time), and where the
/// first cut lands against the arrival pattern is a guess; drift control would take
/// seconds to drain what is left. The lowest point, not the mean, does not depend on
/// where in the arrival pattern the window ends.
const TRIM_WINDOW_MS: u32 = 250;
/// See [`TRIM_WINDOW_MS`]: a second in all (each trim is a cut, heard; drift control
/// drains what is left later); the outage's grace (an underrun in it primes again
/// without raising the target) lasts two seconds longer.
const TRIM_WINDOWS: u32 = 4;
/// See [`TRIM_WINDOW_MS`].
const TRIM_FLOOR_MS: u32 = 2;
/// Once drift control has settled, the fill's lowest point is also watched over every
/// second: when even that stayed this far above the set point, the fill stepped up
/// (the output lost cycles it did not report as missed, or the receiving side caught
/// up after a stall under the cut margin) and is cut back to the set point. Drift
/// control cannot drain a step: its error is clamped at 5 ms and its rate at
/// 1000 ppm, so it would sit saturated, reporting a drift that is not there, while
/// the latency stays raised. The fill normally dips below the set point; 5 ms
/// above it for a whole second is no jitter.
const HELD_HIGH_MS: u32 = 5;
/// See [`HELD_HIGH_MS`]: the window, in [`TRIM_WINDOW_MS`] units.
const HELD_HIGH_WINDOWS: u32 = 4;
/// Most a stream's output may find queued when it starts before that is a backlog
/// (a stream announced during a stall) rather than what came while it was opening
/// (measured: up to 60 ms).
const STARTUP_BACKLOG_MS: u32 = 100;

/// The frames a stream's ring must hold: the largest target the playout may grow to
/// (4 x `latency_frames`), the backlog the render core lets stand before it cuts
/// ([`excess_margin_frames`] plus the deepest dip drift control remembers, 20 ms),
/// and two packets landing at once. 133 ms for 10 ms packets at the automatic target.
pub fn ring_frames(latency_frames: usize, packet_frames: u32, rate: u32) -> usize {
    4 * latency_frames
        + excess_margin_frames(rate, packet_frames) as usize
        + (rate / 50) as usize
        + 2 * packet_frames as usize
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
    /// Frames skipped because the output ran cycles without the callback, or cut as a
    /// backlog beyond the target ([`excess_margin_frames`]).
    pub skipped_frames: AtomicU64,
    /// Times a backlog was cut back to the target, and the frames cut.
    pub latency_cuts: AtomicU64,
    /// See [`RenderStats::latency_cuts`].
    pub cut_frames: AtomicU64,
    /// Outages: cycles that started over [`OUTAGE_MS`] after the one before.
    pub outages: AtomicU64,
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

/// Where the output is at the start of a cycle: its position in frames
/// (`pw_time.ticks`) and the cycle's start on `CLOCK_MONOTONIC` (`pw_time.now`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputClock {
    /// Position in frames.
    pub ticks: u64,
    /// Nanoseconds.
    pub now_ns: u64,
}

/// Trimming what a backlog left over the target, after a cut or an outage
/// ([`TRIM_WINDOW_MS`]).
#[derive(Debug, Clone, Copy)]
struct Trim {
    /// The lowest fill in the current window, and its cycles left.
    min: usize,
    left: u32,
    /// Windows left after the current one.
    windows: u32,
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
    /// After a cut or an outage: see [`Trim`].
    trim: Option<Trim>,
    /// The steady watch for a fill held high ([`HELD_HIGH_MS`]); `windows` unused.
    held: Trim,
    /// The jitter underruns the set point was last learned after.
    learned_jitter: u64,
    /// Cycles left in the three seconds after an outage, in which an underrun is part
    /// of the outage (arrivals after a stall are irregular, and trims cut), not jitter
    /// to make room for.
    outage_grace: u32,
    /// Whether a backlog is cut: not before drift control first settled, nor after a
    /// restart until then, so that what queued while the output started is played
    /// (and drained by drift control), not cut from the start of a sound; from an
    /// outage or underrun on, whatever else happened.
    cuts_armed: bool,
    /// When the last cycle started (`CLOCK_MONOTONIC` ns).
    last_cycle_ns: Option<u64>,
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
            playout: Playout::new(config.latency_frames, Playout::outage_frames(config.rate)),
            missed: MissedCycles::default(),
            drift: Self::drift_for(&config),
            config,
            stats: Arc::new(RenderStats::default()),
            trim: None,
            held: Trim { min: usize::MAX, left: 0, windows: 0 },
            cuts_armed: false,
            outage_grace: 0,
            learned_jitter: 0,
            last_cycle_ns: None,
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

    /// Fills `out` (whole frames of native-endian f32, interleaved) for one cycle, at
    /// `clock` where the output says it. Returns the ratio to resample by while
    /// playing: over 1 when the ring fills up (consume faster), under 1 when it runs
    /// low.
    ///
    /// A cycle that starts over [`OUTAGE_MS`] after the last one follows an outage:
    /// this process (or the output) did not run. What the buffer holds then is that
    /// old and is dropped (a stream's backlog, or what a virtual source held when it
    /// was last used); the buffer primes again to the fill it held, the outage counted
    /// as no jitter.
    pub fn cycle(&mut self, clock: Option<OutputClock>, out: &mut [u8]) -> Option<f64> {
        let channels = self.config.channels;
        let frames = out.len() / (4 * channels);
        if self.stats.restart.swap(false, Ordering::Relaxed) {
            self.playout = Playout::new(self.config.latency_frames, Playout::outage_frames(self.config.rate));
            self.drift = Self::drift_for(&self.config);
            self.cuts_armed = false;
            self.learned_jitter = 0;
            self.last_cycle_ns = None;
        }
        self.cuts_armed |= self.drift.settled() || self.playout.underruns() > 0;
        let mut buffered = self.consumer.slots() / channels;
        let draining = self.stats.draining.load(Ordering::Relaxed);
        if let Some(now_ns) = clock.map(|c| c.now_ns) {
            // Longer than the outage and the last cycle itself: a cycle of 2048 frames
            // or more is no outage.
            let cycle_ns = frames as u64 * 1_000_000_000 / u64::from(self.config.rate.max(1));
            let gap = self.last_cycle_ns.map_or(0, |last| now_ns.saturating_sub(last));
            self.last_cycle_ns = Some(now_ns);
            if gap > OUTAGE_NS + cycle_ns && !draining {
                self.stats.outages.fetch_add(1, Ordering::Relaxed);
                buffered -= self.cut(buffered);
                self.cuts_armed = true;
                // Past the last trim, whose cut an underrun may follow.
                self.outage_grace = self.trim_cycles() * (TRIM_WINDOWS + 8);
                self.arm_trim(self.drift.settled());
                self.playout.outage(self.reference().0 as usize);
                self.missed = MissedCycles::default();
            }
        }
        let missed = clock.map_or(0, |c| self.missed.observe(c.ticks));
        if !draining {
            let cut = self.excess(buffered, frames).min(buffered.saturating_sub(frames));
            buffered -= self.cut(cut);
        }
        if missed > 0 && self.playout.is_playing() {
            // The output ran a cycle without us (its graph overran): that audio was due,
            // so skip it rather than play everything a cycle later. (When this whole
            // process was stopped, input and all, the outage above started afresh.)
            let skip = ((missed as f64 * self.drift.ratio()).round() as usize).min(buffered.saturating_sub(frames));
            buffered -= self.skip(skip);
        }
        self.stats.fill_sum_frames.fetch_add(buffered as u64, Ordering::Relaxed);
        let mut ratio = None;
        let take = if draining {
            if buffered == 0 {
                self.stats.drained.store(true, Ordering::Relaxed);
            }
            buffered.min(frames)
        } else {
            let (underruns, was_playing) = (self.playout.underruns(), self.playout.is_playing());
            let (take, jitter) = (self.playout.plan(buffered, frames), self.playout.jitter_underruns());
            if self.playout.underruns() != underruns {
                self.stats.underruns.fetch_add(1, Ordering::Relaxed);
                if self.outage_grace > 0 {
                    self.playout.outage(self.reference().0 as usize);
                }
            }
            self.outage_grace = self.outage_grace.saturating_sub(1);
            if !was_playing && self.playout.is_playing() && jitter > self.learned_jitter {
                // Primed again after jitter: learn the set point afresh, with the margin
                // the jitter so far asks for. (An outage leaves the set point as it was:
                // the clocks and the arrival pattern did not change.)
                self.learned_jitter = jitter;
                self.drift.relearn(self.config.margin(jitter));
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

    /// Frames of backlog to cut now, oldest first. Once the fill passes the target by
    /// [`excess_margin_frames`] and the deepest dip of the arrival pattern: all above
    /// the target plus that dip (what the fill normally holds just after packets
    /// land); then, over [`TRIM_WINDOW_MS`], what still keeps the lowest fill above
    /// where it normally dips to. The target is drift control's set point once
    /// learned, the playout's (priming) target before.
    fn excess(&mut self, buffered: usize, frames: usize) -> usize {
        // The cycle being played is in the fill too: with cycles longer than the margin
        // (a host graph at 2048 frames), a fill that covers one is no backlog.
        let margin = f64::from(excess_margin_frames(self.config.rate, self.config.packet_frames)) + frames as f64;
        if !self.cuts_armed {
            // What queued while the output started is kept (it is the start of a
            // sound), unless it is more than that can be: a stream announced during a
            // stall, with its backlog.
            let target = self.playout.target() as f64;
            let most = target + f64::from(self.config.rate * STARTUP_BACKLOG_MS / 1000);
            return if buffered as f64 > most { (buffered as f64 - target - margin).max(0.0) as usize } else { 0 };
        }
        let (target, dip, settled) = self.reference();
        if buffered as f64 > target + margin + dip {
            self.arm_trim(settled);
            return (buffered as f64 - target - dip).max(0.0) as usize;
        }
        let cycles = self.trim_cycles();
        let Some(trim) = &mut self.trim else { return self.held_high(buffered, target, settled) };
        trim.min = trim.min.min(buffered);
        trim.left = trim.left.saturating_sub(1);
        if trim.left > 0 {
            return 0;
        }
        let min = trim.min;
        if trim.windows == 0 {
            self.trim = None;
        } else {
            *trim = Trim { min: usize::MAX, left: cycles, windows: trim.windows - 1 };
        }
        if !self.playout.is_playing() || !settled {
            return 0;
        }
        // The lowest point back at the target, a whole dip above where the fill normally
        // dips to: arrivals after a stall are more irregular than before it, and an
        // underrun then would glitch again. Drift control drains the rest (a few ms).
        let over = min as f64 - target;
        if over > f64::from(self.config.rate * TRIM_FLOOR_MS / 1000) {
            over as usize
        } else {
            0
        }
    }

    /// What to cut when the fill's lowest point over the last second stayed
    /// [`HELD_HIGH_MS`] above `target`: down to the target (see [`HELD_HIGH_MS`]).
    fn held_high(&mut self, buffered: usize, target: f64, settled: bool) -> usize {
        if !settled || !self.playout.is_playing() || self.drift.catching_up() {
            self.held = Trim { min: usize::MAX, left: 0, windows: 0 };
            return 0;
        }
        if self.held.left == 0 {
            self.held = Trim { min: usize::MAX, left: self.trim_cycles() * HELD_HIGH_WINDOWS, windows: 0 };
        }
        self.held.min = self.held.min.min(buffered);
        self.held.left -= 1;
        if self.held.left > 0 {
            return 0;
        }
        let over = self.held.min as f64 - target;
        if over > f64::from(self.config.rate * HELD_HIGH_MS / 1000) {
            over as usize
        } else {
            0
        }
    }

    /// Trims what a backlog leaves for the next [`TRIM_WINDOWS`], where drift control
    /// has a set point to trim to.
    fn arm_trim(&mut self, settled: bool) {
        self.held.left = 0;
        self.trim = settled.then(|| Trim { min: usize::MAX, left: self.trim_cycles(), windows: TRIM_WINDOWS - 1 });
    }

    /// Output cycles in [`TRIM_WINDOW_MS`] (at least one).
    fn trim_cycles(&self) -> u32 {
        let cycles =
            u64::from(self.config.rate) * u64::from(TRIM_WINDOW_MS) / 1000 / u64::from(self.config.quantum.max(1));
        cycles.clamp(1, u64::from(u32::MAX)) as u32
    }

    /// The fill the buffer should hold now and how deep it normally dips below it, in
    /// frames, and whether drift control has settled: its set point once settled, the
    /// playout's target before.
    fn reference(&self) -> (f64, f64, bool) {
        if self.drift.settled() {
            (self.drift.target(), self.drift.deepest_dip(), true)
        } else {
            (self.playout.target() as f64, 0.0, false)
        }
    }

    /// Drops the `frames` oldest frames as stale, counted as a latency cut.
    fn cut(&mut self, frames: usize) -> usize {
        let cut = self.skip(frames);
        if cut > 0 {
            self.stats.latency_cuts.fetch_add(1, Ordering::Relaxed);
            self.stats.cut_frames.fetch_add(cut as u64, Ordering::Relaxed);
        }
        cut
    }

    /// Drops the `frames` oldest frames of the ring; returns how many it dropped.
    fn skip(&mut self, frames: usize) -> usize {
        if frames == 0 {
            return 0;
        }
        let Ok(chunk) = self.consumer.read_chunk(frames * self.config.channels) else { return 0 };
        chunk.commit_all();
        self.stats.skipped_frames.fetch_add(frames as u64, Ordering::Relaxed);
        self.drift.skipped(frames as f64);
        frames
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
        RenderConfig { rate: 48_000, channels: 1, latency_frames: 480, trim: false, quantum: 256, packet_frames: 480 }
    }

    /// The clock of an output at `ticks` frames of 48 kHz that started at 0.
    fn at(ticks: u64) -> Option<OutputClock> {
        Some(OutputClock { ticks, now_ns: ticks * 1_000_000_000 / 48_000 })
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
        assert_eq!(core.cycle(at(0), &mut out), None, "priming under the target");
        assert!(samples(&out).iter().all(|v| *v == 0.0));
        for v in 300..600 {
            tx.push(v as f32).unwrap();
        }
        assert!(core.cycle(at(256), &mut out).is_some());
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
            core.cycle(at(c * 256), &mut out);
        }
        assert_eq!(core.stats().latency_cuts.load(Ordering::Relaxed), 0, "no cut while steady");
        // A 100 ms burst: cut back to the target, the oldest first.
        for _ in 0..4800 {
            tx.push(next as f32).unwrap();
            next += 1;
        }
        core.cycle(at(200 * 256), &mut out);
        assert_eq!(core.stats().latency_cuts.load(Ordering::Relaxed), 1);
        let first = samples(&out)[0];
        let target = core.drift.target();
        assert!((f64::from(next as u32) - f64::from(first) - target).abs() < 2.0, "{first} for {next} at {target}");
    }

    /// One stream on virtual clocks: 10 ms packets from a guest whose graph hands
    /// them over every 256 frames, received through the real-time budget into a
    /// 500 ms ring, played in 128-frame cycles with the auto target the host derives,
    /// each cycle asking for as much input as the ratio it was given says (as the
    /// output's resampler does). Between `stall` and `stall + length` seconds the
    /// receiving process is stopped: nothing arrives, no cycle runs; the guest queues at
    /// most 500 ms meanwhile. When it runs again, the output's callback runs before the
    /// backlog is read if `output_first`. The mean fill (ms) of each 100 ms of the
    /// output's time, the underruns and the drift measured at the end (ppm).
    fn stalled_stream(stall: f64, length: f64, seconds: f64, output_first: bool) -> (Vec<(f64, f64)>, u64, f64) {
        use crate::receive::Pacer;
        use std::time::{Duration, Instant};
        let (rate, quantum, packet) = (48_000u32, 128u32, 480u32);
        let config = RenderConfig {
            rate,
            channels: 1,
            latency_frames: jitter_target_frames(packet, quantum, rate),
            trim: true,
            quantum,
            packet_frames: packet,
        };
        let (mut tx, mut core) = render_ring(config, rate as usize / 2);
        let t0 = Instant::now();
        let mut pacer = Pacer::new(rate, t0, crate::receive::PACE_BURST);
        let (cycle, guest_cycle) = (f64::from(quantum) / 48_000.0, 256.0 / 48_000.0);
        let (mut t, mut next_cycle, mut made, mut handed) = (0.0f64, 0.0f64, 0u64, 0.0f64);
        let mut queue = std::collections::VecDeque::new();
        let (mut fills, mut window, mut ticks) = (Vec::new(), (0.0, 0u32, 0.1), 0u64);
        let stalled = |t: f64| t >= stall && t < stall + length;
        let (mut ratio, mut owed) = (1.0f64, 0.0f64);
        let mut cycle_now = |core: &mut RenderCore, ticks: u64, ratio: &mut f64| {
            owed += f64::from(quantum) * *ratio;
            let frames = owed.floor() as usize;
            owed -= frames as f64;
            let mut out = vec![0u8; frames * 4];
            if let Some(r) = core.cycle(at(ticks), &mut out) {
                *ratio = r;
            }
        };
        let mut resumed = false;
        while t < seconds {
            // The guest's graph: whole packets every guest cycle, queued (500 ms at most).
            if t >= handed {
                let due = ((t / 0.010) as u64).saturating_sub(made);
                for _ in 0..due {
                    queue.push_back(packet);
                    made += 1;
                }
                while queue.len() > 50 {
                    queue.pop_front();
                }
                handed += guest_cycle;
            }
            if !stalled(t) {
                let now = t0 + Duration::from_secs_f64(t);
                if t > stall && !resumed && output_first {
                    ticks = (t / cycle).round() as u64 * u64::from(quantum);
                    cycle_now(&mut core, ticks, &mut ratio);
                    next_cycle = t + cycle;
                }
                resumed |= t > stall;
                while let Some(frames) = queue.pop_front() {
                    if pacer.take(now, u64::from(frames)) {
                        let n = (frames as usize).min(tx.slots());
                        if let Ok(chunk) = tx.write_chunk_uninit(n) {
                            chunk.fill_from_iter(std::iter::repeat(0.5f32));
                        }
                    }
                }
                if t >= next_cycle {
                    // The output's position moves on while the process is stopped.
                    let played_ticks = (t / cycle).round() as u64 * u64::from(quantum);
                    ticks = ticks.max(played_ticks);
                    let fill = core.consumer.slots() as f64 / 48.0;
                    cycle_now(&mut core, ticks, &mut ratio);
                    next_cycle += cycle;
                    window.0 += fill;
                    window.1 += 1;
                }
            } else {
                next_cycle = t;
            }
            if t >= window.2 {
                if window.1 > 0 {
                    fills.push((window.2, window.0 / f64::from(window.1)));
                }
                window = (0.0, 0, window.2 + 0.1);
            }
            t += 0.0005;
        }
        (fills, core.stats().underruns.load(Ordering::Relaxed), core.drift.drift_ppm())
    }

    #[test]
    fn after_a_stall_the_stream_is_back_at_its_latency_within_a_second() {
        for (length, output_first) in [0.2, 1.0, 3.0, 4.9].into_iter().flat_map(|l| [(l, false), (l, true)]) {
            let (fills, underruns, drift) = stalled_stream(10.0, length, 25.0, output_first);
            let before: Vec<f64> = fills.iter().filter(|(t, _)| (8.0..10.0).contains(t)).map(|f| f.1).collect();
            let normal = before.iter().sum::<f64>() / before.len() as f64;
            let resumed = 10.0 + length;
            let worst =
                fills.iter().filter(|(t, _)| *t >= resumed + 1.0).map(|(_, f)| (f - normal).abs()).fold(0.0, f64::max);
            let peak = fills.iter().filter(|(t, _)| *t >= resumed).map(|f| f.1).fold(0.0, f64::max);
            // What the trims leave (up to a dip, some ms) drift control drains.
            assert!(
                worst < 5.0,
                "{length} s stall: the fill was {normal:.1} ms before, off by {worst:.1} ms a second after (peak {peak:.1})"
            );
            assert!(underruns <= 2, "{length} s stall: {underruns} underruns");
            assert!(drift.abs() < 100.0, "{length} s stall: drift control measures {drift:.0} ppm of none");
        }
    }

    #[test]
    fn a_fill_that_stepped_up_under_the_cut_margin_is_cut_back_within_a_second_or_two() {
        for trim in [false, true] {
            let mut config = config();
            config.trim = trim;
            let (mut tx, mut core) = render_ring(config, 48_000);
            let mut out = vec![0u8; 256 * 4];
            // Cycle by cycle, what the output's resampler would take at the ratio the
            // last cycle returned (256 frames in fewer or more here, as the core reads
            // 256), plus `extra` frames before the first.
            let (mut next, mut cycle, mut ratio, mut owed) = (0u32, 0u64, 1.0, 0.0f64);
            let mut run = |tx: &mut Producer<f32>, core: &mut RenderCore, cycles: u64, extra: usize| {
                for n in 0..cycles {
                    owed += 256.0 / ratio;
                    let whole = owed.floor();
                    owed -= whole;
                    for _ in 0..whole as usize + if n == 0 { extra } else { 0 } {
                        tx.push(next as f32).unwrap();
                        next += 1;
                    }
                    ratio = core.cycle(at(cycle * 256), &mut out).unwrap_or(1.0);
                    cycle += 1;
                }
            };
            // Ten steady seconds: never cut.
            run(&mut tx, &mut core, 1875, 512);
            assert_eq!(core.stats().latency_cuts.load(Ordering::Relaxed), 0, "trim {trim}: no cut while steady");
            let target = core.drift.target();
            // 20 ms more than the output took, at once: under the margin of 30 ms.
            run(&mut tx, &mut core, 375, 960);
            let cut = core.stats().cut_frames.load(Ordering::Relaxed);
            assert_eq!(core.stats().latency_cuts.load(Ordering::Relaxed), 1, "trim {trim}: one cut");
            // Drift control drains a little of it meanwhile (at most 48 frames a second).
            assert!((850..=980).contains(&cut), "trim {trim}: cut {cut} frames of a 960-frame step");
            let fill = core.consumer.slots() as f64;
            assert!((fill - target).abs() < 300.0, "trim {trim}: fill {fill} for a set point of {target}");
            assert!(core.drift.drift_ppm().abs() < 600.0, "trim {trim}: drift {} ppm", core.drift.drift_ppm());
        }
    }

    #[test]
    fn what_queued_while_the_output_started_is_played_not_cut() {
        let mut config = config();
        config.trim = true;
        let (mut tx, mut core) = render_ring(config, 24_000);
        let mut out = vec![0u8; 256 * 4];
        // 60 ms queued before the first cycle, then real time.
        for v in 0..2880 {
            tx.push(v as f32).unwrap();
        }
        let mut next = 2880;
        let first = core.cycle(at(0), &mut out).map(|_| samples(&out)[0]);
        assert_eq!(first, Some(0.0), "the first sample plays first");
        for c in 1..2000u64 {
            for _ in 0..256 {
                tx.push(next as f32).unwrap();
                next += 1;
            }
            core.cycle(at(c * 256), &mut out);
        }
        assert_eq!(core.stats().cut_frames.load(Ordering::Relaxed), 0);
        assert!(core.drift.catching_up() || core.drift.target() < 2880.0, "drift control drains it");
    }

    #[test]
    fn long_cycles_are_no_outage_but_a_pause_is_and_drops_what_waited() {
        let mut config = config();
        config.quantum = 8192;
        let (mut tx, mut core) = render_ring(config, 48_000);
        let mut out = vec![0u8; 8192 * 4];
        // Cycles of 170 ms: no outage, however long over 100 ms they are.
        for c in 0..20u64 {
            for v in 0..8192 {
                tx.push(v as f32).unwrap();
            }
            core.cycle(at(c * 8192), &mut out);
        }
        assert_eq!(core.stats().outages.load(Ordering::Relaxed), 0);
        // A virtual source nobody recorded from for 2 s: what it held then is that old.
        for v in 0..1000 {
            tx.push(v as f32).unwrap();
        }
        let held = core.consumer.slots();
        assert!(held > 0);
        let resumed = 20 * 8192 + 96_000;
        core.cycle(at(resumed), &mut out);
        assert_eq!(core.stats().outages.load(Ordering::Relaxed), 1);
        assert_eq!(core.stats().cut_frames.load(Ordering::Relaxed), held as u64, "dropped, not played");
        assert!(samples(&out).iter().all(|v| *v == 0.0));
    }

    #[test]
    fn bursts_of_a_large_guest_cycle_are_never_cut() {
        // 1024-frame guest cycles: two or three packets at once every 21 ms, for a minute.
        let mut config = config();
        config.trim = true;
        config.quantum = 128;
        let (mut tx, mut core) = render_ring(config, 24_000);
        let mut out = vec![0u8; 128 * 4];
        let (mut made, mut pushed) = (0u64, 0u64);
        for c in 0..(60 * 48_000 / 128) as u64 {
            let t = c * 128;
            if t / 1024 * 1024 == t {
                let due = t / 480 + 1;
                while made < due {
                    made += 1;
                }
                while pushed < made {
                    for _ in 0..480 {
                        let _ = tx.push(0.25);
                    }
                    pushed += 1;
                }
            }
            core.cycle(at(t), &mut out);
        }
        assert_eq!(core.stats().latency_cuts.load(Ordering::Relaxed), 0);
    }

    proptest::proptest! {
        /// Any mix of arrivals, cycle sizes, clock jumps (stalls, new clocks, time going
        /// back) and restarts: the callback never panics, fills exactly the buffer it
        /// is given, and plays only what was pushed, in order.
        #[test]
        fn the_callback_survives_any_arrivals_and_clocks(
            ops in proptest::collection::vec((0usize..3000, 1usize..1024, 0u8..8, proptest::bool::ANY), 1..400)
        ) {
            let mut config = config();
            config.trim = true;
            config.quantum = 128;
            let (mut tx, mut core) = render_ring(config, 12_000);
            let (mut pushed, mut expected, mut ticks, mut now_ns) = (0u64, 0.0f32, 0u64, 0u64);
            for (arrive, frames, jump, restart) in ops {
                for _ in 0..arrive.min(tx.slots()) {
                    pushed += 1;
                    let _ = tx.push(pushed as f32);
                }
                if restart && jump == 7 {
                    core.stats().restart.store(true, Ordering::Relaxed);
                }
                let step = frames as u64;
                (ticks, now_ns) = match jump {
                    0 => (ticks + step * 100, now_ns + step * 2_083_333),
                    1 => (ticks.saturating_sub(5000), now_ns + 1_000_000),
                    2 => (ticks + step, now_ns + 5_000_000_000),
                    _ => (ticks + step, now_ns + step * 20_833),
                };
                let mut out = vec![0u8; frames * 4];
                core.cycle(Some(OutputClock { ticks, now_ns }), &mut out);
                for v in samples(&out).into_iter().filter(|v| *v != 0.0) {
                    proptest::prop_assert!(v > expected && u64::from(v as u32) <= pushed, "{v} after {expected}");
                    expected = v;
                }
            }
        }
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
            core.cycle(at(c * 256), &mut out);
        }
        assert_eq!(core.stats().underruns.load(Ordering::Relaxed), 1);
        for v in 0..480 {
            tx.push(v as f32).unwrap();
        }
        core.stats().restart.store(true, Ordering::Relaxed);
        assert!(core.cycle(at(768), &mut out).is_some(), "480 frames are the first target again");
    }
}
