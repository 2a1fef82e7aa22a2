//! The tap ring: the only thing the real-time capture callback touches.
//!
//! [`TapWriter::push`] copies a cycle's bytes and its graph time into two preallocated
//! wait-free SPSC rings ([`rtrb`]): no allocation, lock, log or syscall. When the ring is
//! full the cycle is dropped whole (never a partial sample frame) and counted.
//! [`TapEncoder`] on the encoder thread cuts the bytes into codec frames, stamps each with
//! its presentation time and encodes it into a [`MediaPacket`].

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

/// Counters the RT side updates and anyone may read.
#[derive(Debug, Default)]
pub struct TapStats {
    /// Cycles pushed.
    pub cycles: AtomicU64,
    /// Bytes dropped because the ring was full (the encoder fell behind).
    pub overflow_bytes: AtomicU64,
}

/// Real-time end of a tap.
#[derive(Debug)]
pub struct TapWriter {
    data: Producer<u8>,
    marks: Producer<Mark>,
    written: u64,
    frame_bytes: usize,
    stats: Arc<TapStats>,
}

/// Encoder-thread end of a tap.
#[derive(Debug)]
pub struct TapReader {
    data: Consumer<u8>,
    marks: Consumer<Mark>,
    read: u64,
    current: Option<Mark>,
    stats: Arc<TapStats>,
}

/// Makes a tap ring holding `capacity_bytes` of audio, for sample frames of
/// `frame_bytes` bytes (channels × sample size).
pub fn tap_ring(capacity_bytes: usize, frame_bytes: usize) -> (TapWriter, TapReader) {
    let (data_tx, data_rx) = RingBuffer::new(capacity_bytes);
    // One mark per cycle; cycles are at least 16 frames, so this never limits.
    let (marks_tx, marks_rx) = RingBuffer::new((capacity_bytes / frame_bytes.max(1) / 16).max(64));
    let stats = Arc::new(TapStats::default());
    (
        TapWriter { data: data_tx, marks: marks_tx, written: 0, frame_bytes: frame_bytes.max(1), stats: stats.clone() },
        TapReader { data: data_rx, marks: marks_rx, read: 0, current: None, stats },
    )
}

impl TapWriter {
    /// Copies one cycle of captured bytes stamped with the graph time of its first
    /// sample. Real-time safe.
    pub fn push(&mut self, bytes: &[u8], pts_ns: u64) {
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        let whole = bytes.len() - bytes.len() % self.frame_bytes;
        if whole == 0 {
            return;
        }
        if self.data.slots() < whole || self.marks.slots() == 0 {
            self.stats.overflow_bytes.fetch_add(whole as u64, Ordering::Relaxed);
            return;
        }
        // Both pushes fit: checked just above, and we are the only producer.
        let _ = self.marks.push(Mark { offset: self.written, pts_ns });
        if let Ok(chunk) = self.data.write_chunk_uninit(whole) {
            chunk.fill_from_iter(bytes[..whole].iter().copied());
        }
        self.written += whole as u64;
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
        Some(pts)
    }
}

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
        Ok(Self {
            reader,
            encoder,
            frame_samples,
            frame_bytes,
            ns_per_byte: 1e9 / f64::from(format.rate) / sample_frame_bytes as f64,
            seq: 0,
            frame: Vec::with_capacity(frame_bytes),
        })
    }

    /// Encoder delay in sample frames.
    pub fn delay(&self) -> u32 {
        self.encoder.delay()
    }

    /// The tap's counters.
    pub fn stats(&self) -> &Arc<TapStats> {
        self.reader.stats()
    }

    /// True when the tap is gone and every whole frame has been encoded.
    pub fn is_finished(&self) -> bool {
        self.reader.is_abandoned() && self.reader.available() < self.frame_bytes
    }

    /// Encodes the next whole frame if one is waiting.
    pub fn next_packet(&mut self) -> Option<Result<MediaPacket, CodecError>> {
        let pts_ns = self.reader.pop(self.frame_bytes, &mut self.frame, self.ns_per_byte)?;
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
        let (mut w, r) = tap_ring(64 * 1024, 4);
        let mut enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        // Cycles of 256 frames, 5.333 ms apart.
        let cycle_ns = 256.0 * 1e9 / 48000.0;
        let mut expected = Vec::new();
        for c in 0..15u32 {
            let bytes: Vec<u8> = (0..256 * 4).map(|i| ((c * 1024 + i) % 251) as u8).collect();
            expected.extend_from_slice(&bytes);
            w.push(&bytes, 1_000_000_000 + (f64::from(c) * cycle_ns) as u64);
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
    fn a_full_ring_drops_whole_cycles_and_counts_them() {
        let (mut w, r) = tap_ring(4096, 4);
        w.push(&[1u8; 4000], 0);
        w.push(&[2u8; 400], 1);
        assert_eq!(w.stats().overflow_bytes.load(Ordering::Relaxed), 400);
        w.push(&[3u8; 7], 2); // a partial frame is cut to whole frames
        assert_eq!(r.available(), 4004);
    }

    #[test]
    fn finishes_when_the_writer_is_gone() {
        let (w, r) = tap_ring(4096, 4);
        let enc = TapEncoder::new(r, &fmt(), &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        assert!(!enc.is_finished());
        drop(w);
        assert!(enc.is_finished());
    }
}
