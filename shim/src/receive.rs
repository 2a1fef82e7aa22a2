//! What a received audio stream does with each packet before it plays: the receiving
//! end of every stream, melange-host's playback streams and the guest's microphone.
//!
//! [`Receiver::receive`] takes a packet and the time it arrived and appends the audio
//! to play for it:
//! - **Order.** A packet older than the last one played (a duplicate, or reordered) is
//!   dropped; a gap in the sequence numbers is lost packets.
//! - **Real time is a budget** ([`Pacer`]): a stream cannot deliver more audio than
//!   the wall clock allows, plus what it saved while silent (at most [`PACE_BURST`]).
//!   Audio beyond it is dropped before it
//!   is decoded, so a peer sending packets that each decode to 120 ms costs neither
//!   CPU nor memory nor disk. Of packets that arrived together (a backlog after a
//!   stall), the oldest are the ones dropped ([`Receiver::over_budget_prefix`]): the
//!   newest are what the stream plays next.
//! - **Concealment** fills a gap of lost packets (Opus's packet-loss concealment,
//!   silence for PCM) up to [`MAX_CONCEAL_MS`], within the budget, and never more in
//!   all than was really decoded: sequence jumps cannot amplify a flood.
//! - **Decoding** with the stream's [`StreamDecoder`], which refuses a packet whose
//!   content does not match its claimed duration; a refused packet is concealed.
//!
//! Sans-IO: time enters as an argument.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use melange_transport::message::{AudioFormat, Codec, MediaPacket};

use crate::codec::{CodecError, StreamDecoder};

/// Longest packet accepted, in ms of audio: Opus's longest (120 ms).
pub const MAX_PACKET_MS: u64 = 120;
/// Longest gap of lost packets filled with concealment, in ms; longer gaps are skipped.
pub const MAX_CONCEAL_MS: u64 = 100;
/// Most audio a stream may save up while it sends less than real time, to deliver later
/// at once: longer than a session survives a silent peer (5 s) and what a sender queues
/// meanwhile, so that after a backlog (which the render core then cuts) a stream's fresh
/// audio still has room in the budget with its usual jitter. (A budget of 1 s, emptied
/// by a backlog, dropped a fresh packet now and then for seconds: each early by a
/// millisecond found it short.) A new stream starts with what [`BurstPool`] gives. This
/// bounds what a hostile sender can make the receiver decode, buffer and write: real
/// time on average, in bursts of what it saved.
pub const PACE_BURST: Duration = Duration::from_secs(10);
/// What a new stream's budget holds at least: two 10 ms packets, so that the first
/// packets, which arrive with the stream's announcement, play. The rest of what it
/// starts with comes from its session's [`BurstPool`].
pub const MIN_START: Duration = Duration::from_millis(20);
/// What a session's [`BurstPool`] holds at most, and gains a second.
pub const POOL_BURST: Duration = Duration::from_secs(2);

/// How much faster than the receiver's clock a stream may run: the sender's clock may
/// be fast by a few hundred ppm and timers wake late; 2 % covers both with room, and
/// refills a budget a stall emptied within a minute.
pub const PACE_SLACK: f64 = 0.02;

/// Why a packet played nothing of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// Older than the last packet played: a duplicate, or reordered.
    Late,
    /// Beyond the stream's real-time budget; dropped undecoded.
    OverBudget,
    /// A duration of 0 or over [`MAX_PACKET_MS`]: not decoded, not concealed.
    BadDuration(u32),
    /// The decoder refused it; concealed in its place where the budget allowed.
    Bad(CodecError),
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dropped::Late => f.write_str("late or duplicate packet"),
            Dropped::OverBudget => f.write_str("audio beyond real time"),
            Dropped::BadDuration(d) => write!(f, "packet with bad duration {d}"),
            Dropped::Bad(e) => e.fmt(f),
        }
    }
}

/// A stream's counters since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveCounts {
    /// Packets that arrived.
    pub packets: u64,
    /// Packets missing from the sequence.
    pub lost: u64,
    /// Packets dropped as late or duplicate.
    pub late: u64,
    /// Packets the decoder refused, or with a bad duration.
    pub bad: u64,
    /// Packets dropped undecoded for running ahead of real time, and their audio.
    pub over_budget: u64,
    /// See [`ReceiveCounts::over_budget`].
    pub over_budget_frames: u64,
    /// Sample frames decoded from packets, and made up by concealment.
    pub decoded_frames: u64,
    /// See [`ReceiveCounts::decoded_frames`].
    pub concealed_frames: u64,
}

impl ReceiveCounts {
    /// Sample frames appended in all: decoded and concealed.
    pub fn frames(&self) -> u64 {
        self.decoded_frames + self.concealed_frames
    }
}

/// A token bucket of sample frames, filled by the wall clock: at the stream's rate
/// (plus [`PACE_SLACK`]), up to [`PACE_BURST`].
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// A budget for a stream of `rate` frames a second, from `now`, holding `burst` of
    /// audio to start with (at most [`PACE_BURST`]).
    pub fn new(rate: u32, now: Instant, burst: Duration) -> Self {
        let capacity = f64::from(rate) * PACE_BURST.as_secs_f64();
        let tokens = (f64::from(rate) * burst.as_secs_f64()).min(capacity);
        Self { rate: f64::from(rate) * (1.0 + PACE_SLACK), capacity, tokens, last: now }
    }

    /// Takes `frames` from the budget at `now`; false (and nothing taken) if it has
    /// not that much.
    pub fn take(&mut self, now: Instant, frames: u64) -> bool {
        self.refill(now);
        let frames = frames as f64;
        if frames > self.tokens {
            return false;
        }
        self.tokens -= frames;
        true
    }

    /// What the budget holds at `now`, in frames.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
    }
}

/// Where the starting bursts of a session's streams come from: [`POOL_BURST`] at most,
/// refilled at one second a second. A stream's own budget refills only as time passes
/// while it lives, so without this a peer opening, filling and closing streams at the
/// control limit (100 a second) would get a full burst each time: a hundred times real
/// time. With it, all the streams of a session together get at most real time more.
#[derive(Debug, Clone)]
pub struct BurstPool {
    seconds: f64,
    last: Instant,
}

impl BurstPool {
    /// A full pool at `now`.
    pub fn new(now: Instant) -> Self {
        Self { seconds: POOL_BURST.as_secs_f64(), last: now }
    }

    /// The starting burst for a stream opened at `now`: [`MIN_START`] and what the pool
    /// can give.
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.seconds = (self.seconds + elapsed).min(POOL_BURST.as_secs_f64());
        let give = self.seconds.min(PACE_BURST.saturating_sub(MIN_START).as_secs_f64());
        self.seconds -= give;
        MIN_START + Duration::from_secs_f64(give)
    }
}

/// The receiving end of one audio stream. See the module docs.
#[derive(Debug)]
pub struct Receiver {
    decoder: StreamDecoder,
    rate: u32,
    channels: usize,
    frame_samples: u32,
    next_seq: Option<u32>,
    pacer: Pacer,
    counts: ReceiveCounts,
}

impl Receiver {
    /// A receiver for a stream the peer opened at `now`, its starting burst from
    /// `pool`; validates the layout first.
    pub fn new(
        format: &AudioFormat,
        codec: &Codec,
        frame_samples: u32,
        now: Instant,
        pool: &mut BurstPool,
    ) -> Result<Self, CodecError> {
        let decoder = StreamDecoder::new(format, codec, frame_samples)?;
        Ok(Self {
            decoder,
            rate: format.rate,
            channels: usize::from(format.channels),
            frame_samples,
            next_seq: None,
            pacer: Pacer::new(format.rate, now, pool.take(now)),
            counts: ReceiveCounts::default(),
        })
    }

    /// Appends to `out` (interleaved f32) the audio `packet`, arrived at `now`, plays:
    /// concealment for the packets lost before it, then its own. `Err` says why it
    /// played nothing of its own; concealment may still have been appended.
    pub fn receive(&mut self, now: Instant, packet: &MediaPacket, out: &mut Vec<f32>) -> Result<(), Dropped> {
        self.counts.packets += 1;
        let rate = u64::from(self.rate);
        let duration = u64::from(packet.duration);
        if duration == 0 || duration * 1000 > rate * MAX_PACKET_MS {
            self.counts.bad += 1;
            return Err(Dropped::BadDuration(packet.duration));
        }
        let gap = match self.next_seq {
            Some(expected) => packet.seq.wrapping_sub(expected),
            None => 0,
        };
        if gap >= 0x8000_0000 {
            self.counts.late += 1;
            return Err(Dropped::Late);
        }
        self.next_seq = Some(packet.seq.wrapping_add(1));
        self.counts.lost += u64::from(gap);
        if !self.pacer.take(now, duration) {
            self.counts.over_budget += 1;
            self.counts.over_budget_frames += duration;
            return Err(Dropped::OverBudget);
        }
        let lost_frames = u64::from(gap) * u64::from(self.frame_samples);
        if gap > 0 && lost_frames * 1000 <= rate * MAX_CONCEAL_MS {
            self.conceal(now, lost_frames, out);
        }
        let before = out.len();
        match self.decoder.decode(&packet.data, duration as usize, out) {
            Ok(()) => {
                self.counts.decoded_frames += ((out.len() - before) / self.channels.max(1)) as u64;
                Ok(())
            }
            Err(e) => {
                self.counts.bad += 1;
                // Its time was already taken from the budget.
                if self.counts.concealed_frames + duration <= self.counts.decoded_frames {
                    self.decoder.conceal(duration as usize, out);
                    self.counts.concealed_frames += duration;
                }
                Err(Dropped::Bad(e))
            }
        }
    }

    /// Of `packets` that arrived together at `now` (oldest first), how many of the
    /// oldest do not fit the budget; the caller drops them with
    /// [`Receiver::drop_over_budget`] and receives the rest.
    pub fn over_budget_prefix(&mut self, now: Instant, packets: &[MediaPacket]) -> usize {
        let max = u64::from(self.rate) * MAX_PACKET_MS / 1000;
        let mut left = self.pacer.available(now);
        let kept = packets
            .iter()
            .rev()
            .take_while(|p| {
                let frames = u64::from(p.duration).min(max) as f64;
                left -= frames;
                left >= 0.0
            })
            .count();
        packets.len() - kept
    }

    /// Drops `packet` undecoded, as beyond the real-time budget: counted, and its
    /// sequence number taken as received, so that no concealment fills its place.
    pub fn drop_over_budget(&mut self, packet: &MediaPacket) {
        self.counts.packets += 1;
        self.counts.over_budget += 1;
        self.counts.over_budget_frames += u64::from(packet.duration);
        let gap = self.next_seq.map_or(0, |expected| packet.seq.wrapping_sub(expected));
        if gap < 0x8000_0000 {
            self.counts.lost += u64::from(gap);
            self.next_seq = Some(packet.seq.wrapping_add(1));
        }
    }

    /// [`Receiver::receive`] for packets that arrived together: the oldest of them
    /// beyond the budget are dropped, the rest received in order. Returns how many were
    /// dropped that way.
    pub fn receive_burst(&mut self, now: Instant, packets: &[MediaPacket], out: &mut Vec<f32>) -> usize {
        let over = self.over_budget_prefix(now, packets);
        for (i, p) in packets.iter().enumerate() {
            if i < over {
                self.drop_over_budget(p);
            } else {
                let _ = self.receive(now, p, out);
            }
        }
        over
    }

    /// Conceals `frames` if the budget and what was decoded so far allow it.
    fn conceal(&mut self, now: Instant, frames: u64, out: &mut Vec<f32>) {
        if self.counts.concealed_frames + frames <= self.counts.decoded_frames && self.pacer.take(now, frames) {
            self.decoder.conceal(frames as usize, out);
            self.counts.concealed_frames += frames;
        }
    }

    /// The counters so far.
    pub fn counts(&self) -> &ReceiveCounts {
        &self.counts
    }

    /// Sample frames per second.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Interleaved channels.
    pub fn channels(&self) -> usize {
        self.channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::FrameEncoder;
    use crate::opus::Application;

    fn mono() -> AudioFormat {
        AudioFormat { rate: 48_000, channels: 1, positions: vec![2] }
    }

    fn pcm(seq: u32, frames: u32) -> MediaPacket {
        MediaPacket { seq, pts_ns: 0, duration: frames, data: vec![0x10; frames as usize * 2] }
    }

    /// Plays `packets` at their times (ms after `t0`); returns frames appended.
    fn play(rx: &mut Receiver, t0: Instant, packets: impl IntoIterator<Item = (u64, MediaPacket)>) -> usize {
        let mut out = Vec::new();
        for (ms, p) in packets {
            let _ = rx.receive(t0 + Duration::from_millis(ms), &p, &mut out);
        }
        out.len()
    }

    #[test]
    fn a_stream_at_real_time_loses_nothing_for_an_hour_even_from_a_fast_clock() {
        let t0 = Instant::now();
        let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, t0, &mut BurstPool::new(t0)).unwrap();
        // 10 ms packets from a clock 500 ppm fast, for an hour, arriving in bursts of three.
        let packets = (0..360_000u32).map(|seq| {
            let sent_us = u64::from(seq) * 10_000 * 1_000_000 / 1_000_500;
            (sent_us / 30_000 * 30 + 30, pcm(seq, 480))
        });
        assert_eq!(play(&mut rx, t0, packets), 360_000 * 480);
        assert_eq!(rx.counts().over_budget, 0);
    }

    #[test]
    fn audio_beyond_real_time_is_dropped_before_decoding() {
        let t0 = Instant::now();
        let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, t0, &mut BurstPool::new(t0)).unwrap();
        // 120 ms packets, one a millisecond, for 10 s: 1200 s of audio claimed.
        let packets = (0..10_000u32).map(|seq| (u64::from(seq), pcm(seq, 5760)));
        let frames = play(&mut rx, t0, packets) as f64;
        let allowed = 48_000.0 * (10.0 * (1.0 + PACE_SLACK) + (POOL_BURST + MIN_START).as_secs_f64());
        assert!(frames <= allowed, "{frames} frames in 10 s");
        assert!(frames >= 48_000.0 * 9.0, "the budget is real time, not less: {frames}");
        assert_eq!(rx.counts().lost, 0, "dropped packets are not lost ones");
        assert_eq!(rx.counts().concealed_frames, 0, "nor concealed");
        assert!(rx.counts().over_budget > 9_000);
    }

    #[test]
    fn a_backlog_after_a_stall_is_received_and_fresh_audio_after_it_too() {
        let t0 = Instant::now();
        let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, t0, &mut BurstPool::new(t0)).unwrap();
        // Real time for 10 s, then nothing for 4.9 s, then its backlog at once (the
        // render core cuts it), then fresh packets, two at a time, one of them 5 ms early.
        let mut packets: Vec<(u64, MediaPacket)> = (0..1000u32).map(|s| (u64::from(s) * 10, pcm(s, 480))).collect();
        packets.extend((1000..1490u32).map(|s| (14_900, pcm(s, 480))));
        packets.extend((1490..1990u32).map(|s| (14_900 + u64::from(s - 1489) / 2 * 20 - 5, pcm(s, 480))));
        let frames = play(&mut rx, t0, packets);
        assert_eq!(frames, 1990 * 480, "nothing dropped");
        assert_eq!(rx.counts().over_budget, 0);
    }

    #[test]
    fn of_a_backlog_beyond_the_budget_the_oldest_is_dropped_and_fresh_audio_plays_on() {
        let t0 = Instant::now();
        let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, t0, &mut BurstPool::new(t0)).unwrap();
        // A backlog of 8 s arrives at 3 s (the stream had saved 3 s, and the 2 s it
        // started with), then fresh packets with jitter.
        let backlog: Vec<MediaPacket> = (0..800u32).map(|s| pcm(s, 480)).collect();
        let at = t0 + Duration::from_secs(3);
        let mut out = Vec::new();
        let over = rx.receive_burst(at, &backlog, &mut out);
        let kept = 800 - over;
        assert!((500..=515).contains(&kept), "kept {kept} packets of the backlog: the 5.1 s saved");
        assert_eq!(out.len(), kept * 480, "the newest of it");
        assert_eq!((rx.counts().over_budget as usize, rx.counts().lost, rx.counts().concealed_frames), (over, 0, 0));
        // Fresh audio at real time, two packets at a time: none of it is dropped.
        let mut fresh = Vec::new();
        for i in 0..500u32 {
            let arrive = at + Duration::from_millis(u64::from(i / 2 * 20 + 20));
            rx.receive_burst(arrive, &[pcm(800 + i, 480)], &mut fresh);
        }
        assert_eq!(fresh.len(), 500 * 480);
    }

    #[test]
    fn streams_opened_and_closed_at_the_control_limit_share_one_burst() {
        let t0 = Instant::now();
        let mut pool = BurstPool::new(t0);
        let mut frames = 0;
        // 100 streams a second for 10 s, each sent as much as it may at once.
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, now, &mut pool).unwrap();
            let mut out = Vec::new();
            let flood: Vec<MediaPacket> = (0..200u32).map(|s| pcm(s, 480)).collect();
            rx.receive_burst(now, &flood, &mut out);
            frames += out.len();
        }
        let seconds = frames as f64 / 48_000.0;
        let most = POOL_BURST.as_secs_f64() + 10.0 + 1000.0 * MIN_START.as_secs_f64();
        assert!(seconds <= most, "{seconds:.1} s of audio in 10 s");
        assert!(seconds < 40.0, "{seconds:.1} s of audio in 10 s: four times real time at most");
    }

    #[test]
    fn order_loss_and_concealment() {
        let t0 = Instant::now();
        let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, t0, &mut BurstPool::new(t0)).unwrap();
        let mut out = Vec::new();
        let at = |ms| t0 + Duration::from_millis(ms);
        for seq in 0..5 {
            rx.receive(at(u64::from(seq) * 10), &pcm(seq, 480), &mut out).unwrap();
        }
        assert_eq!(rx.receive(at(50), &pcm(3, 480), &mut out), Err(Dropped::Late));
        // Two lost: concealed (silence for PCM) before the packet.
        let before = out.len();
        rx.receive(at(80), &pcm(7, 480), &mut out).unwrap();
        assert_eq!(out.len() - before, 3 * 480);
        assert!(out[before..before + 960].iter().all(|v| *v == 0.0));
        // A jump too long to conceal is skipped.
        let before = out.len();
        rx.receive(at(90), &pcm(1_000, 480), &mut out).unwrap();
        assert_eq!(out.len() - before, 480);
        assert_eq!(rx.counts().lost, 2 + 992);
        assert_eq!(rx.counts().late, 1);
        // Wrapping sequence numbers are no gap.
        let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, t0, &mut BurstPool::new(t0)).unwrap();
        assert_eq!(play(&mut rx, t0, [(0, pcm(u32::MAX, 480)), (10, pcm(0, 480))]), 960);
        assert_eq!(rx.counts().lost, 0);
    }

    #[test]
    fn concealment_never_exceeds_what_was_decoded() {
        let t0 = Instant::now();
        let mut rx = Receiver::new(&mono(), &Codec::PcmS16Le, 480, t0, &mut BurstPool::new(t0)).unwrap();
        // Every packet claims a gap of 9 before it: 90 ms to conceal for 10 ms decoded.
        let frames = play(&mut rx, t0, (0..100u32).map(|i| (u64::from(i) * 100, pcm(i * 10, 480))));
        assert!(rx.counts().concealed_frames <= rx.counts().decoded_frames);
        assert!(frames <= 2 * 100 * 480);
    }

    #[test]
    fn bad_packets_are_concealed_within_the_budget_and_bad_durations_are_not() {
        let t0 = Instant::now();
        let fmt = AudioFormat { rate: 48_000, channels: 2, positions: vec![3, 4] };
        let codec = Codec::Opus { bitrate: 64_000 };
        let mut rx = Receiver::new(&fmt, &codec, 480, t0, &mut BurstPool::new(t0)).unwrap();
        let mut enc = FrameEncoder::new(&fmt, &codec, 480, Application::Audio).unwrap();
        let mut out = Vec::new();
        for seq in 0..3u32 {
            let mut data = Vec::new();
            enc.encode(&vec![0u8; 480 * 2 * 4], &mut data).unwrap();
            let p = MediaPacket { seq, pts_ns: 0, duration: 480, data };
            rx.receive(t0 + Duration::from_millis(u64::from(seq) * 10), &p, &mut out).unwrap();
        }
        let before = out.len();
        let junk = MediaPacket { seq: 3, pts_ns: 0, duration: 480, data: vec![0xFF; 3] };
        assert!(matches!(rx.receive(t0 + Duration::from_millis(30), &junk, &mut out), Err(Dropped::Bad(_))));
        assert_eq!(out.len() - before, 960, "concealed in its place");
        for d in [0, 5761, u32::MAX] {
            let p = MediaPacket { seq: 4, pts_ns: 0, duration: d, data: vec![1] };
            assert_eq!(rx.receive(t0, &p, &mut out), Err(Dropped::BadDuration(d)));
        }
        assert_eq!(rx.counts().bad, 4);
    }
}
