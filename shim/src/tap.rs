//! The tap ring: the only thing the real-time capture callback touches.
//!
//! [`TapWriter::push`] copies a cycle's bytes and its graph time into two preallocated
//! wait-free SPSC rings ([`rtrb`]): no allocation, lock, log or syscall. When the ring is
//! full the cycle is dropped whole (never a partial sample frame) and counted. A cycle
//! the tap was not called for (a guest graph that overran) is filled with silence, so
//! the bytes stay in step with the graph clock and every later packet keeps its time.
//! A skipped cycle is one both the graph's position and its time moved past: the time
//! alone moves with a wake-up late on a busy machine (the silence put in for those made
//! a 1 kHz tone come out at 949 Hz after a restart under load), the position alone
//! jumps when the graph changes its driver (an app starting on a sink that drives).
//! [`TapEncoder`], on the thread that sends (the guest core's, the host microphone's),
//! cuts the bytes into codec frames, stamps each with its presentation time and encodes
//! it into a [`MediaPacket`].

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use melange_transport::message::{AudioFormat, Codec, MediaPacket};
use rtrb::{Consumer, Producer, RingBuffer};

use crate::codec::{input_format, CodecError, FrameEncoder};
use crate::opus::Application;

/// Time stamp of the first byte of one pushed cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// Byte offset in the stream of bytes written so far.
    offset: u64,
    /// Guest graph time of that byte, nanoseconds.
    pts_ns: u64,
}

/// Counters and figures of one tap, shared by its writer (RT), its encoder and its owner.
#[derive(Debug, Default)]
pub struct TapStats {
    /// End-to-end latency of the stream in nanoseconds, from the graph cycle that takes
    /// a sample to the host's output (`melange_guest::latency`); 0 until known. Written by
    /// the sending thread, published to the app by the tap's owner.
    pub latency_ns: AtomicU64,
    /// Cycles pushed.
    pub cycles: AtomicU64,
    /// Packets sent to the host, and dropped instead (no host, or the port fell behind:
    /// oldest first). Written by the sending thread.
    pub packets_sent: AtomicU64,
    /// See [`TapStats::packets_sent`].
    pub packets_dropped: AtomicU64,
    /// The bitrate the stream is encoded at now, bit/s (0 for PCM). Written by the
    /// sending thread.
    pub bitrate: AtomicU64,
    /// Bytes dropped because the ring was full (the encoder fell behind).
    pub overflow_bytes: AtomicU64,
    /// Sample frames of silence put in for cycles the tap was not called for.
    pub gap_frames: AtomicU64,
    /// Graph time at which the next cycle is due: the last cycle's time plus its length.
    pub next_cycle_ns: AtomicU64,
    /// Length of the last cycle in nanoseconds (the guest graph's quantum).
    pub cycle_ns: AtomicU64,
}

/// Real-time end of a tap.
#[derive(Debug)]
pub struct TapWriter {
    data: Producer<u8>,
    marks: Producer<Mark>,
    written: u64,
    frame_bytes: usize,
    ns_per_frame: f64,
    /// Graph position and time (ns) the next cycle should start at (the last one's
    /// end); 0 before the first.
    expected_position_ns: u64,
    expected_pts_ns: u64,
    stats: Arc<TapStats>,
}

/// A tap that missed more than this (a paused app resumed, a stopped graph restarted)
/// has no gap to fill: its audio just starts again.
const MAX_GAP_NS: u64 = 100_000_000;

/// The sending thread's end of a tap.
#[derive(Debug)]
pub struct TapReader {
    data: Consumer<u8>,
    marks: Consumer<Mark>,
    read: u64,
    current: Option<Mark>,
    stats: Arc<TapStats>,
}

/// Makes a tap ring holding `capacity_bytes` of audio, for sample frames of
/// `frame_bytes` bytes (channels × sample size) at `rate` Hz.
pub fn tap_ring(capacity_bytes: usize, frame_bytes: usize, rate: u32) -> (TapWriter, TapReader) {
    let (data_tx, data_rx) = RingBuffer::new(capacity_bytes);
    // One mark per cycle; cycles are at least 16 frames, so this never limits.
    let (marks_tx, marks_rx) = RingBuffer::new((capacity_bytes / frame_bytes.max(1) / 16).max(64));
    let stats = Arc::new(TapStats::default());
    (
        TapWriter {
            data: data_tx,
            marks: marks_tx,
            written: 0,
            frame_bytes: frame_bytes.max(1),
            ns_per_frame: 1e9 / f64::from(rate.max(1)),
            expected_position_ns: 0,
            expected_pts_ns: 0,
            stats: stats.clone(),
        },
        TapReader { data: data_rx, marks: marks_rx, read: 0, current: None, stats },
    )
}

impl TapWriter {
    /// Copies one cycle of captured bytes stamped with the time of its first sample
    /// (`pw_time.now`), at the graph's position `position_ns` (`pw_time.ticks` in ns).
    /// Real-time safe.
    pub fn push(&mut self, bytes: &[u8], pts_ns: u64, position_ns: u64) {
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        let whole = bytes.len() - bytes.len() % self.frame_bytes;
        if whole == 0 {
            return;
        }
        // When the sending thread should look next: it sleeps until then instead of polling.
        let cycle_ns = ((whole / self.frame_bytes) as f64 * self.ns_per_frame) as u64;
        self.stats.cycle_ns.store(cycle_ns, Ordering::Relaxed);
        self.stats.next_cycle_ns.store(pts_ns.saturating_add(cycle_ns), Ordering::Release);
        let expected = std::mem::replace(&mut self.expected_position_ns, position_ns.saturating_add(cycle_ns));
        let expected_pts = std::mem::replace(&mut self.expected_pts_ns, pts_ns.saturating_add(cycle_ns));
        let gap_ns = position_ns.saturating_sub(expected).min(pts_ns.saturating_sub(expected_pts));
        if expected > 0 && gap_ns * 2 >= cycle_ns && gap_ns <= MAX_GAP_NS {
            let frames = (gap_ns as f64 / self.ns_per_frame).round() as u64;
            self.stats.gap_frames.fetch_add(frames, Ordering::Relaxed);
            self.write(frames as usize * self.frame_bytes, pts_ns.saturating_sub(gap_ns), std::iter::repeat(0));
        }
        self.write(whole, pts_ns, bytes[..whole].iter().copied());
    }

    /// Appends `n` bytes from `bytes` stamped `pts_ns`, or drops them whole and counts
    /// them if the ring has no room.
    fn write(&mut self, n: usize, pts_ns: u64, bytes: impl Iterator<Item = u8>) {
        if self.data.slots() < n || self.marks.slots() == 0 {
            self.stats.overflow_bytes.fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        // Both pushes fit: checked just above, and we are the only producer.
        let _ = self.marks.push(Mark { offset: self.written, pts_ns });
        if let Ok(chunk) = self.data.write_chunk_uninit(n) {
            chunk.fill_from_iter(bytes);
        }
        self.written += n as u64;
    }

    /// Shared counters.
    pub fn stats(&self) -> &Arc<TapStats> {
        &self.stats
    }
}

impl TapReader {
    /// Bytes waiting.
    pub fn available(&self) -> usize {
        self.data.slots()
    }

    /// True once the writer is gone (the tap was destroyed).
    pub fn is_abandoned(&self) -> bool {
        self.data.is_abandoned()
    }

    /// Shared counters.
    pub fn stats(&self) -> &Arc<TapStats> {
        &self.stats
    }

    /// Moves exactly `n` bytes into `out` (cleared first) and returns the pts of the
    /// first one, or `None` if fewer than `n` are waiting.
    fn pop(&mut self, n: usize, out: &mut Vec<u8>, ns_per_byte: f64) -> Option<u64> {
        if self.data.slots() < n {
            return None;
        }
        Some(self.pop_up_to(n, out, ns_per_byte))
    }

    /// Moves up to `n` bytes into `out` (cleared first); returns the pts of the first.
    fn pop_up_to(&mut self, n: usize, out: &mut Vec<u8>, ns_per_byte: f64) -> u64 {
        let n = n.min(self.data.slots());
        while let Ok(next) = self.marks.peek() {
            if next.offset > self.read {
                break;
            }
            self.current = self.marks.pop().ok();
        }
        let pts = self.current.map_or(0, |m| m.pts_ns + ((self.read - m.offset) as f64 * ns_per_byte).round() as u64);
        out.clear();
        if let Ok(chunk) = self.data.read_chunk(n) {
            let (a, b) = chunk.as_slices();
            out.extend_from_slice(a);
            out.extend_from_slice(b);
            chunk.commit_all();
        }
        self.read += n as u64;
        pts
    }
}

/// How long after a cycle is due the encoder looks for its data.
pub const WAKE_MARGIN_NS: u64 = 300_000;
/// How often it looks again when a predicted cycle is late.
const WAKE_RETRY_NS: u64 = 250_000;

/// Cuts a tap's bytes into frames and encodes them: the per-stream packetizer.
#[derive(Debug)]
pub struct TapEncoder {
    reader: TapReader,
    encoder: FrameEncoder,
    frame_samples: u32,
    frame_bytes: usize,
    ns_per_byte: f64,
    seq: u32,
    frame: Vec<u8>,
    /// Once the tap is gone: bytes still to send, the last partial frame plus the
    /// encoder's lookahead, in frames padded with silence (the end is drained, not cut).
    tail_bytes: Option<usize>,
    /// Bytes of the encoder's lookahead.
    lookahead_bytes: usize,
}

impl TapEncoder {
    /// An encoder for one tap. `format` is what the tap delivers, in the sample format
    /// [`input_format`] says the codec needs.
    pub fn new(
        reader: TapReader,
        format: &AudioFormat,
        codec: &Codec,
        frame_samples: u32,
        application: Application,
    ) -> Result<Self, CodecError> {
        let encoder = FrameEncoder::new(format, codec, frame_samples, application)?;
        let sample_frame_bytes = usize::from(format.channels) * input_format(codec).bytes();
        let frame_bytes = frame_samples as usize * sample_frame_bytes;
        let lookahead_bytes = encoder.delay() as usize * sample_frame_bytes;
        Ok(Self {
            reader,
            encoder,
            frame_samples,
            frame_bytes,
            ns_per_byte: 1e9 / f64::from(format.rate) / sample_frame_bytes as f64,
            seq: 0,
            frame: Vec::with_capacity(frame_bytes),
            tail_bytes: None,
            lookahead_bytes,
        })
    }

    /// Sets Opus's complexity (0..=10); PCM ignores it.
    pub fn set_complexity(&mut self, complexity: u8) -> Result<(), CodecError> {
        self.encoder.set_complexity(complexity)
    }

    /// Sets Opus's bitrate in bit/s; PCM ignores it.
    pub fn set_bitrate(&mut self, bitrate: u32) -> Result<bool, CodecError> {
        self.encoder.set_bitrate(bitrate)
    }

    /// Encoder delay in sample frames.
    pub fn delay(&self) -> u32 {
        self.encoder.delay()
    }

    /// The tap's counters.
    pub fn stats(&self) -> &Arc<TapStats> {
        self.reader.stats()
    }

    /// True when the tap is gone and everything it captured has been encoded.
    pub fn is_finished(&self) -> bool {
        self.reader.is_abandoned() && self.reader.available() < self.frame_bytes && self.tail_bytes == Some(0)
    }

    /// When the sending thread should next look for a whole frame, in graph time
    /// (`CLOCK_MONOTONIC` ns), given the time `now_ns`.
    ///
    /// The real-time side cannot signal (no syscalls), so the thread predicts: the cycle
    /// that completes the frame is due at the next cycle time plus whole quanta, and the
    /// tap runs a little after a cycle starts ([`WAKE_MARGIN_NS`]). A prediction that
    /// has passed without data is retried in short steps; a graph that has stopped
    /// (paused, or no cycle yet) is polled every half frame.
    pub fn wake_at(&self, now_ns: u64) -> u64 {
        let frame_ns = (self.frame_bytes as f64 * self.ns_per_byte) as u64;
        let idle = now_ns.saturating_add(frame_ns / 2);
        let missing = self.frame_bytes.saturating_sub(self.reader.available());
        if missing == 0 {
            return now_ns;
        }
        let stats = self.reader.stats();
        let cycle_ns = stats.cycle_ns.load(Ordering::Relaxed);
        let next_cycle = stats.next_cycle_ns.load(Ordering::Acquire);
        if cycle_ns == 0 || next_cycle == 0 {
            return idle;
        }
        let cycle_bytes = (cycle_ns as f64 / self.ns_per_byte).round().max(1.0) as usize;
        let cycles = missing.div_ceil(cycle_bytes) as u64;
        let due = next_cycle.saturating_add((cycles - 1).saturating_mul(cycle_ns)).saturating_add(WAKE_MARGIN_NS);
        if due > now_ns {
            due
        } else if now_ns - next_cycle < 2 * cycle_ns.max(WAKE_RETRY_NS) {
            now_ns + WAKE_RETRY_NS
        } else {
            idle
        }
    }

    /// Drops every whole frame waiting, unencoded, and returns how many: with no host to
    /// send to, encoding would cost CPU for nothing. Sequence numbers advance as if the
    /// frames had been sent and lost, and a tap that is gone still drains its tail
    /// through [`TapEncoder::next_packet`].
    pub fn skip_waiting(&mut self) -> u64 {
        let mut skipped = 0;
        while self.reader.pop(self.frame_bytes, &mut self.frame, self.ns_per_byte).is_some() {
            self.seq = self.seq.wrapping_add(1);
            skipped += 1;
        }
        skipped
    }

    /// Encodes the next whole frame if one is waiting. Once the tap is gone, the last
    /// partial frame follows, padded with silence, and as much silence again as the
    /// encoder holds back (Opus's lookahead), so the stream's last sample is heard.
    pub fn next_packet(&mut self) -> Option<Result<MediaPacket, CodecError>> {
        // Read first: once abandoned, nothing more can arrive in the ring.
        let abandoned = self.reader.is_abandoned();
        let pts_ns = match self.reader.pop(self.frame_bytes, &mut self.frame, self.ns_per_byte) {
            Some(pts) => pts,
            None if abandoned => {
                let partial = self.reader.available();
                let lookahead = if self.seq > 0 || partial > 0 { self.lookahead_bytes } else { 0 };
                let tail = self.tail_bytes.get_or_insert(partial + lookahead);
                if *tail == 0 {
                    return None;
                }
                *tail = tail.saturating_sub(self.frame_bytes);
                let pts = self.reader.pop_up_to(partial, &mut self.frame, self.ns_per_byte);
                self.frame.resize(self.frame_bytes, 0);
                pts
            }
            None => return None,
        };
        let mut data = Vec::new();
        let result = self.encoder.encode(&self.frame, &mut data).map(|()| MediaPacket {
            seq: self.seq,
            pts_ns,
            duration: self.frame_samples,
            data,
        });
        self.seq = self.seq.wrapping_add(1);
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt() -> AudioFormat {
        AudioFormat { rate: 48000, channels: 2, positions: vec![3, 4] }
    }

    #[test]
    fn frames_are_cut_and_stamped_across_cycles() {
        // PCM stereo: 4 bytes per sample frame; 10 ms = 480 frames = 1920 bytes.
        let (mut w, r) = tap_ring(64 * 1024, 4, 48_000);
        let mut enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        // Cycles of 256 frames, 5.333 ms apart.
        let cycle_ns = 256.0 * 1e9 / 48000.0;
        let mut expected = Vec::new();
        for c in 0..15u32 {
            let bytes: Vec<u8> = (0..256 * 4).map(|i| ((c * 1024 + i) % 251) as u8).collect();
            expected.extend_from_slice(&bytes);
            w.push(
                &bytes,
                1_000_000_000 + (f64::from(c) * cycle_ns) as u64,
                1_000_000_000 + (f64::from(c) * cycle_ns) as u64,
            );
        }
        let mut got = Vec::new();
        let mut packets = Vec::new();
        while let Some(p) = enc.next_packet() {
            let p = p.unwrap();
            got.extend_from_slice(&p.data);
            packets.push(p);
        }
        assert_eq!(packets.len(), 15 * 256 / 480);
        assert_eq!(got[..], expected[..got.len()]);
        for (i, p) in packets.iter().enumerate() {
            assert_eq!(p.seq, i as u32);
            let want = 1_000_000_000.0 + i as f64 * 10_000_000.0;
            assert!((p.pts_ns as f64 - want).abs() < 2.0, "packet {i}: {} vs {want}", p.pts_ns);
        }
    }

    #[test]
    fn a_cycle_the_tap_missed_becomes_silence_and_later_packets_keep_their_time() {
        let (mut w, r) = tap_ring(64 * 1024, 4, 48_000);
        let mut enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        let cycle_ns = 256.0 * 1e9 / 48000.0;
        let at = |c: u32| 1_000_000_000 + (f64::from(c) * cycle_ns) as u64;
        // Cycles 0..8 but for cycle 3; and a paused graph: cycle 1000 comes next.
        for c in (0..8).filter(|c| *c != 3).chain([1000, 1001]) {
            w.push(&[(c % 200) as u8 + 1; 256 * 4], at(c), at(c));
        }
        assert_eq!(w.stats().gap_frames.load(Ordering::Relaxed), 256);
        let mut got = Vec::new();
        while let Some(p) = enc.next_packet() {
            let p = p.unwrap();
            let want = 1_000_000_000 + u64::from(p.seq) * 10_000_000;
            if p.seq < 4 {
                assert!(p.pts_ns.abs_diff(want) < 2, "packet {}: {} vs {want}", p.seq, p.pts_ns);
            }
            got.extend_from_slice(&p.data);
        }
        let cycle = |c: usize| &got[c * 1024..(c + 1) * 1024];
        assert!(cycle(2).iter().all(|b| *b == 3) && cycle(4).iter().all(|b| *b == 5));
        assert!(cycle(3).iter().all(|b| *b == 0), "the missed cycle is silent");
        assert!(cycle(8).iter().all(|b| *b == 1), "no silence for a long pause");
    }

    #[test]
    fn a_late_wake_up_is_no_skipped_cycle() {
        let (mut w, r) = tap_ring(64 * 1024, 4, 48_000);
        let mut enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        let cycle_ns = 256.0 * 1e9 / 48000.0;
        let at = |c: u32| 1_000_000_000 + (f64::from(c) * cycle_ns) as u64;
        // Every fourth cycle wakes 0.8 of a cycle late; the graph's position is regular.
        for c in 0..40u32 {
            let late = if c % 4 == 1 { (0.8 * cycle_ns) as u64 } else { 0 };
            w.push(&[c as u8 + 1; 256 * 4], at(c) + late, at(c));
        }
        assert_eq!(w.stats().gap_frames.load(Ordering::Relaxed), 0);
        let mut got = Vec::new();
        while let Some(p) = enc.next_packet() {
            got.extend_from_slice(&p.unwrap().data);
        }
        // 10 240 frames: 21 whole packets of 480, not one frame of silence among them.
        assert_eq!(got.len(), 21 * 480 * 4);
        assert!(got.chunks(1024).enumerate().all(|(c, x)| x.iter().all(|b| *b == c as u8 + 1)));
    }

    #[test]
    fn a_new_driver_is_no_skipped_cycle() {
        let (mut w, _r) = tap_ring(64 * 1024, 4, 48_000);
        let cycle_ns = 256.0 * 1e9 / 48000.0;
        let at = |c: u32| 1_000_000_000 + (f64::from(c) * cycle_ns) as u64;
        // The graph's position jumps by 40 ms when another node drives; its time runs on.
        for c in 0..20u32 {
            let position = if c < 10 { at(c) } else { at(c) + 40_000_000 };
            w.push(&[1u8; 256 * 4], at(c), position);
        }
        assert_eq!(w.stats().gap_frames.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn skipped_frames_are_not_encoded_and_later_packets_keep_their_time() {
        let (mut w, r) = tap_ring(64 * 1024, 4, 48_000);
        let mut enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        let cycle_ns = 256.0 * 1e9 / 48000.0;
        let at = |c: u32| 1_000_000_000 + (f64::from(c) * cycle_ns) as u64;
        for c in 0..10 {
            w.push(&[c as u8 + 1; 256 * 4], at(c), at(c));
        }
        // 2560 frames: five whole packets go, 160 frames wait for the next.
        assert_eq!(enc.skip_waiting(), 5);
        assert_eq!(enc.skip_waiting(), 0);
        for c in 10..12 {
            w.push(&[c as u8 + 1; 256 * 4], at(c), at(c));
        }
        let p = enc.next_packet().expect("a whole frame").unwrap();
        assert_eq!(p.seq, 5);
        assert!(p.pts_ns.abs_diff(1_050_000_000) < 2, "{}", p.pts_ns);
        // Frames 2400..2880: cycle 9's last 160, cycle 10, and cycle 11's first 64.
        let (a, rest) = p.data.split_at(160 * 4);
        let (b, c) = rest.split_at(256 * 4);
        assert!(a.iter().all(|x| *x == 10) && b.iter().all(|x| *x == 11) && c.iter().all(|x| *x == 12));
    }

    #[test]
    fn a_full_ring_drops_whole_cycles_and_counts_them() {
        let (mut w, r) = tap_ring(4096, 4, 48_000);
        w.push(&[1u8; 4000], 0, 0);
        w.push(&[2u8; 400], 1, 1);
        assert_eq!(w.stats().overflow_bytes.load(Ordering::Relaxed), 400);
        w.push(&[3u8; 7], 2, 2); // a partial frame is cut to whole frames
        assert_eq!(r.available(), 4004);
    }

    #[test]
    fn the_end_is_drained_padded_to_a_whole_frame() {
        // PCM: 700 frames, then the app goes: one whole packet and one padded one.
        let (mut w, r) = tap_ring(64 * 1024, 4, 48_000);
        let mut enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        let bytes: Vec<u8> = (0..700 * 4).map(|i| (i % 251) as u8 | 1).collect();
        w.push(&bytes, 1_000_000_000, 1_000_000_000);
        let first = enc.next_packet().unwrap().unwrap();
        assert!(enc.next_packet().is_none(), "a partial frame waits while the tap lives");
        drop(w);
        let last = enc.next_packet().unwrap().unwrap();
        assert!(enc.next_packet().is_none());
        assert!(enc.is_finished());
        assert_eq!(first.data[..], bytes[..480 * 4]);
        assert_eq!(last.data[..220 * 4], bytes[480 * 4..]);
        assert!(last.data[220 * 4..].iter().all(|b| *b == 0), "padded with silence");
        assert_eq!(last.pts_ns, 1_010_000_000);

        // Opus: a whole frame, then the lookahead is flushed with one frame of silence.
        let (mut w, r) = tap_ring(64 * 1024, 8, 48_000);
        let opus = Codec::Opus { bitrate: 64_000 };
        let mut enc = TapEncoder::new(r, &fmt(), &opus, 480, Application::RestrictedLowDelay).unwrap();
        assert!(enc.delay() > 0);
        w.push(&[0u8; 480 * 8], 0, 0);
        drop(w);
        assert!(enc.next_packet().unwrap().is_ok());
        assert!(enc.next_packet().unwrap().is_ok(), "the lookahead is flushed");
        assert!(enc.next_packet().is_none() && enc.is_finished());

        // A tap that never captured anything sends nothing.
        let (w, r) = tap_ring(4096, 8, 48_000);
        let mut enc = TapEncoder::new(r, &fmt(), &opus, 480, Application::RestrictedLowDelay).unwrap();
        drop(w);
        assert!(enc.next_packet().is_none() && enc.is_finished());
    }

    #[test]
    fn finishes_when_the_writer_is_gone() {
        let (w, r) = tap_ring(4096, 4, 48_000);
        let mut enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        assert!(!enc.is_finished());
        drop(w);
        assert!(enc.next_packet().is_none());
        assert!(enc.is_finished());
    }

    #[test]
    fn wakes_when_the_cycle_completing_a_frame_is_due() {
        let (mut w, r) = tap_ring(64 * 1024, 4, 48_000);
        let enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        let half_frame = 5_000_000;
        // No cycle yet: poll every half frame.
        assert_eq!(enc.wake_at(1_000), 1_000 + half_frame);
        let cycle = (256.0 * 1e9 / 48_000.0) as u64;
        w.push(&[0u8; 256 * 4], 10_000_000, 10_000_000);
        // 224 frames missing: the next cycle brings them.
        assert_eq!(enc.wake_at(10_100_000), 10_000_000 + cycle + WAKE_MARGIN_NS);
        // Late: retry soon; long stopped: back to polling.
        assert_eq!(enc.wake_at(10_000_000 + cycle + 600_000), 10_000_000 + cycle + 600_000 + WAKE_RETRY_NS);
        assert_eq!(enc.wake_at(60_000_000), 60_000_000 + half_frame);
        w.push(&[0u8; 256 * 4], 10_000_000 + cycle, 10_000_000 + cycle);
        assert_eq!(enc.wake_at(16_000_000), 16_000_000);
    }
}
