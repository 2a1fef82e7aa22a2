//! The guest's end of the user's microphone: what the guest core does for the
//! virtual source.
//!
//! The module counts the guest apps recording from its virtual microphone and tells
//! the link whether any does ([`MicReceiver::set_wanted`]); the link tells the host
//! (`CaptureDemand`), at every change and at the start of every session. The host
//! answers with a stream of its own, mono at 48 kHz; [`MicReceiver`] receives it as
//! every stream is received ([`Receiver`]: order, loss concealment, real-time budget)
//! into the virtual source's render ring ([`melange_shim::render`]), whose real-time callback plays
//! it on the guest's clock with its own jitter buffer and drift control. Without that
//! stream (no host, no microphone, `--mic none`) the ring stays empty and the source
//! plays silence.
//!
//! Sans-IO: tested with packets made by the same encoder the host uses.

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rtrb::Producer;

use melange_shim::receive::{BurstPool, ReceiveCounts, Receiver};
use melange_shim::render::RenderStats;
use melange_transport::message::{CaptureDemand, CaptureDevice, MediaKind, MediaPacket, StreamOpen};

pub use melange_transport::message::MIC_RATE;
/// The microphone's channels, as the virtual source offers them.
pub const MIC_CHANNELS: u8 = 1;

/// Why the guest refuses a microphone stream from the host.
#[derive(Debug, thiserror::Error)]
pub enum MicError {
    /// Not tapped audio.
    #[error("the microphone is audio, not {0}")]
    NotAudio(&'static str),
    /// Another layout than the source's.
    #[error("the guest's microphone takes {MIC_CHANNELS} channel at {MIC_RATE} Hz, not {channels} at {rate} Hz")]
    Format {
        /// The stream's rate.
        rate: u32,
        /// The stream's channels.
        channels: u8,
    },
    /// Its codec or layout cannot be decoded.
    #[error(transparent)]
    Codec(#[from] melange_shim::codec::CodecError),
    /// This guest has no virtual microphone.
    #[error("this guest has no virtual microphone")]
    NoSource,
}

/// The feeding end of the virtual source's render ring.
#[derive(Debug)]
pub struct MicFeed {
    /// Decoded samples go here.
    pub producer: Producer<f32>,
    /// The render core's counters and flags ([`RenderStats::restart`] for a new stream).
    pub stats: Arc<RenderStats>,
    /// Packet duration to ask the host for, microseconds.
    pub frame_us: u32,
}

/// The microphone stream's state in the guest core. See the module docs.
#[derive(Debug)]
pub struct MicReceiver {
    feed: MicFeed,
    wanted: bool,
    stream: Option<(u32, Receiver)>,
    /// The starting bursts of the host's streams (see [`BurstPool`]).
    pool: Option<BurstPool>,
    scratch: Vec<f32>,
    /// Samples the ring had no room for.
    overflow_samples: u64,
}

impl MicReceiver {
    /// Feeds `feed`; nothing is wanted until [`MicReceiver::set_wanted`].
    pub fn new(feed: MicFeed) -> Self {
        Self { feed, wanted: false, stream: None, pool: None, scratch: Vec::new(), overflow_samples: 0 }
    }

    /// What to tell the host now.
    pub fn demand(&self) -> CaptureDemand {
        CaptureDemand { device: CaptureDevice::Microphone, active: self.wanted, frame_us: self.feed.frame_us }
    }

    /// Whether any guest app records now; true if that changed.
    pub fn set_wanted(&mut self, wanted: bool) -> bool {
        std::mem::replace(&mut self.wanted, wanted) != wanted
    }

    /// True while a guest app records.
    pub fn wanted(&self) -> bool {
        self.wanted
    }

    /// Takes the stream the host opened at `now` if it is a microphone the source can
    /// play; otherwise says why, for the stream-reject.
    pub fn open(&mut self, now: Instant, stream: u32, open: &StreamOpen) -> Result<(), MicError> {
        let MediaKind::Audio(format) = &open.media else {
            return Err(MicError::NotAudio(open.media.name()));
        };
        if format.rate != MIC_RATE || format.channels != MIC_CHANNELS {
            return Err(MicError::Format { rate: format.rate, channels: format.channels });
        }
        let pool = self.pool.get_or_insert_with(|| BurstPool::new(now));
        let receiver = Receiver::new(format, &open.codec, open.frame_samples, now, pool)?;
        self.stream = Some((stream, receiver));
        self.feed.stats.restart.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Receives packets of the microphone stream that arrived together at `now` into
    /// the ring (with concealment for lost ones, the oldest dropped beyond the
    /// real-time budget); false if `stream` is not the microphone.
    pub fn media(&mut self, now: Instant, stream: u32, packets: &[MediaPacket]) -> bool {
        let Some((id, receiver)) = &mut self.stream else { return false };
        if *id != stream {
            return false;
        }
        self.scratch.clear();
        // Whatever it played (concealment included) goes to the ring; the counters
        // say what was dropped and why.
        receiver.receive_burst(now, packets, &mut self.scratch);
        let n = self.scratch.len().min(self.feed.producer.slots());
        if let Ok(chunk) = self.feed.producer.write_chunk_uninit(n) {
            chunk.fill_from_iter(self.scratch[..n].iter().copied());
        }
        self.overflow_samples += (self.scratch.len() - n) as u64;
        true
    }

    /// The host ended `stream`; true if it was the microphone. What is buffered plays
    /// out while an app records, then the source is silent; what is left when none does
    /// is dropped when the source runs again after its pause (an outage to its render
    /// core).
    pub fn close(&mut self, stream: u32) -> bool {
        let ours = self.stream.as_ref().is_some_and(|(id, _)| *id == stream);
        if ours {
            self.stream = None;
        }
        ours
    }

    /// The session ended: its stream with it.
    pub fn end_session(&mut self) {
        self.stream = None;
    }

    /// True while the host sends the microphone.
    pub fn is_streaming(&self) -> bool {
        self.stream.is_some()
    }

    /// How the source played so far, for the log: packets lost and concealed, dropped
    /// for running ahead of real time, underruns, frames played and silent, drift in
    /// ppm, frames buffered now.
    pub fn describe(&self) -> String {
        let st = &self.feed.stats;
        let counts = self.counts();
        format!(
            "{} packets lost ({} frames concealed), {} bad, {} beyond real time, {} underruns, {} frames played, {} \
             silent, {} skipped ({} cuts back to the target), drift {:.0} ppm, {} frames buffered",
            counts.lost,
            counts.concealed_frames,
            counts.bad,
            counts.over_budget,
            st.underruns.load(Ordering::Relaxed),
            st.played_frames.load(Ordering::Relaxed),
            st.silence_frames.load(Ordering::Relaxed),
            st.skipped_frames.load(Ordering::Relaxed),
            st.latency_cuts.load(Ordering::Relaxed),
            st.drift_ppb.load(Ordering::Relaxed) as f64 / 1000.0,
            self.feed.producer.buffer().capacity() - self.feed.producer.slots(),
        )
    }

    /// The current stream's receive counters (zero without one).
    pub fn counts(&self) -> ReceiveCounts {
        self.stream.as_ref().map(|(_, r)| *r.counts()).unwrap_or_default()
    }

    /// Samples dropped for want of room in the ring, so far.
    pub fn overflow_samples(&self) -> u64 {
        self.overflow_samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use melange_shim::codec::FrameEncoder;
    use melange_shim::opus::Application;
    use melange_shim::render::{render_ring, OutputClock, RenderConfig};
    use melange_transport::message::{AppInfo, AudioFormat, Codec};

    fn format() -> AudioFormat {
        AudioFormat { rate: 48_000, channels: 1, positions: vec![2] }
    }

    fn open(format: AudioFormat) -> StreamOpen {
        StreamOpen {
            media: MediaKind::Audio(format),
            codec: Codec::Opus { bitrate: 32_000 },
            frame_samples: 480,
            app: AppInfo::default(),
            codec_data: Vec::new(),
        }
    }

    #[test]
    fn the_hosts_microphone_is_decoded_into_the_source_and_played() {
        let config = RenderConfig {
            rate: 48_000,
            channels: 1,
            latency_frames: 960,
            trim: false,
            quantum: 256,
            packet_frames: 480,
        };
        let (producer, mut core) = render_ring(config, 24_000);
        let feed = MicFeed { producer, stats: core.stats().clone(), frame_us: 10_000 };
        let mut mic = MicReceiver::new(feed);
        assert!(!mic.demand().active);
        assert!(mic.set_wanted(true) && !mic.set_wanted(true));
        assert_eq!(mic.demand(), CaptureDemand { device: CaptureDevice::Microphone, active: true, frame_us: 10_000 });

        let t0 = Instant::now();
        let stereo = AudioFormat { rate: 48_000, channels: 2, positions: vec![3, 4] };
        assert!(mic.open(t0, 3, &open(stereo)).is_err());
        mic.open(t0, 3, &open(format())).unwrap();
        let mut enc = FrameEncoder::new(&format(), &Codec::Opus { bitrate: 32_000 }, 480, Application::Voip).unwrap();
        // 400 Hz at half scale, 200 ms.
        let tone: Vec<f32> =
            (0..9600).map(|i| 0.5 * (i as f32 * 400.0 * std::f32::consts::TAU / 48_000.0).sin()).collect();
        // The host's packets, one every 10 ms, each followed by the source's cycle of
        // 480 frames.
        let mut played = Vec::new();
        let mut out = vec![0u8; 480 * 4];
        for (seq, frame) in tone.chunks(480).enumerate() {
            let bytes: Vec<u8> = frame.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut data = Vec::new();
            enc.encode(&bytes, &mut data).unwrap();
            // Packet 7 is lost on the way: concealed, so the tone plays on in time.
            if seq != 7 {
                let packet = MediaPacket { seq: seq as u32, pts_ns: 0, duration: 480, data };
                let now = t0 + std::time::Duration::from_millis(10 * seq as u64);
                let packet = [packet];
                assert!(mic.media(now, 3, &packet));
                assert!(!mic.media(now, 4, &packet), "another stream is not the microphone");
            }
            let clock = OutputClock { ticks: seq as u64 * 480, now_ns: seq as u64 * 10_000_000 };
            core.cycle(Some(clock), &mut out);
            played.extend(out.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])));
        }
        // Past the encoder's lookahead and the start: the tone's level (-9 dBFS RMS).
        let body = &played[2400..7000];
        let rms = (body.iter().map(|v| v * v).sum::<f32>() / body.len() as f32).sqrt();
        assert!((20.0 * rms.log10() - 20.0 * (0.5f32 / 2f32.sqrt()).log10()).abs() < 1.0, "rms {rms}");
        let counts = mic.counts();
        assert_eq!((counts.lost, counts.concealed_frames, counts.bad), (1, 480, 0));
        assert_eq!(counts.frames(), 9600, "every packet's time played, the lost one's concealed");
        assert_eq!(mic.overflow_samples(), 0);
        assert!(mic.close(3) && !mic.is_streaming());
    }
}
