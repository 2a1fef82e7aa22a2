//! Media codecs both ends use: the guest's frame encoder and the host's stream decoder.
//!
//! The guest side works on the bytes its tap delivers: f32 (native endian, interleaved)
//! for Opus, s16le for PCM, so PCM needs no conversion on the guest at all and stays
//! bit-exact. The host side always decodes to interleaved f32; s16 samples convert to
//! f32 and back exactly (division by 32768 is exact in binary floating point).

#![forbid(unsafe_code)]

use melange_transport::message::{AudioFormat, Codec};
use thiserror::Error;

use crate::opus::{self, Application};

/// Frame durations Opus allows, in microseconds; PCM takes the same set.
pub const FRAME_DURATIONS_US: [u32; 6] = [2_500, 5_000, 10_000, 20_000, 40_000, 60_000];
/// Most channels a stream may have.
pub const MAX_CHANNELS: u8 = 8;
/// Rates a stream may have.
pub const RATES: [u32; 7] = [8000, 12000, 16000, 24000, 32000, 44100, 48000];

/// SPA channel positions a stream may name (`SPA_AUDIO_CHANNEL_*`): MONO for a
/// single channel, the named positions FL (3) to BRC (37), and AUX0 to AUX63; each at
/// most once. Anything else reached PipeWire as given before.
pub fn valid_positions(positions: &[u32]) -> bool {
    const MONO: u32 = 2;
    const NAMED: std::ops::RangeInclusive<u32> = 3..=37;
    const AUX: std::ops::RangeInclusive<u32> = 0x1000..=0x103f;
    let known = |p: &u32| (*p == MONO && positions.len() == 1) || NAMED.contains(p) || AUX.contains(p);
    positions.iter().all(known) && positions.iter().enumerate().all(|(i, p)| !positions[..i].contains(p))
}

/// Sample format the tap must deliver for a codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    /// 32-bit float, native endian.
    F32,
    /// Signed 16-bit little-endian.
    S16Le,
}

impl SampleFormat {
    /// Bytes per sample.
    pub fn bytes(self) -> usize {
        match self {
            SampleFormat::F32 => 4,
            SampleFormat::S16Le => 2,
        }
    }
}

/// The sample format a codec's encoder takes.
pub fn input_format(codec: &Codec) -> SampleFormat {
    match codec {
        Codec::PcmS16Le => SampleFormat::S16Le,
        // Opus; the codecs of players' streams are never encoded here (see [`validate`]).
        _ => SampleFormat::F32,
    }
}

/// A codec or format problem.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// libopus refused.
    #[error(transparent)]
    Opus(#[from] opus::OpusError),
    /// A stream layout this build cannot code.
    #[error("unsupported stream format: {0}")]
    Unsupported(String),
    /// A packet that does not decode to what its header says.
    #[error("bad packet: {0}")]
    BadPacket(String),
}

/// Checks a stream's layout and codec against what both ends support. Both the guest
/// (before opening) and the host (before allocating a decoder) call this.
pub fn validate(format: &AudioFormat, codec: &Codec, frame_samples: u32) -> Result<(), CodecError> {
    if !matches!(codec, Codec::PcmS16Le | Codec::Opus { .. }) {
        return Err(CodecError::Unsupported(format!("{} is not a codec of tapped audio", codec.name())));
    }
    if !RATES.contains(&format.rate) {
        return Err(CodecError::Unsupported(format!("rate {} Hz (supported: {RATES:?})", format.rate)));
    }
    if format.channels == 0 || format.channels > MAX_CHANNELS {
        return Err(CodecError::Unsupported(format!("{} channels (1..={MAX_CHANNELS})", format.channels)));
    }
    if format.positions.len() != usize::from(format.channels) {
        return Err(CodecError::Unsupported(format!(
            "{} channel positions for {} channels",
            format.positions.len(),
            format.channels
        )));
    }
    if !valid_positions(&format.positions) {
        return Err(CodecError::Unsupported(format!(
            "channel positions {:?} (each a known SPA position, none twice)",
            format.positions
        )));
    }
    let ok_duration = FRAME_DURATIONS_US
        .iter()
        .any(|us| u64::from(*us) * u64::from(format.rate) == u64::from(frame_samples) * 1_000_000);
    if !ok_duration {
        return Err(CodecError::Unsupported(format!(
            "{frame_samples} samples per frame at {} Hz is not 2.5, 5, 10, 20, 40 or 60 ms",
            format.rate
        )));
    }
    if let Codec::Opus { bitrate } = codec {
        if !opus::RATES.contains(&format.rate) || format.channels > 2 {
            return Err(CodecError::Unsupported(format!(
                "opus at {} Hz with {} channels (opus takes 8/12/16/24/48 kHz, 1 or 2 channels)",
                format.rate, format.channels
            )));
        }
        if !(6_000..=510_000).contains(bitrate) {
            return Err(CodecError::Unsupported(format!("opus bitrate {bitrate} (6000..=510000)")));
        }
    }
    let max_bytes = u64::from(frame_samples) * u64::from(format.channels) * 2;
    if matches!(codec, Codec::PcmS16Le) && max_bytes > melange_transport::message::MAX_MEDIA_DATA as u64 {
        return Err(CodecError::Unsupported(format!("a {max_bytes}-byte PCM frame does not fit one media packet")));
    }
    Ok(())
}

/// Encodes fixed-size frames of tap bytes into media payloads.
#[derive(Debug)]
pub enum FrameEncoder {
    /// s16le in, s16le out: a copy.
    Pcm,
    /// f32 in, Opus out.
    Opus {
        /// The libopus encoder.
        encoder: opus::Encoder,
        /// Scratch: the frame as f32.
        scratch: Vec<f32>,
    },
}

impl FrameEncoder {
    /// An encoder for a validated stream.
    pub fn new(
        format: &AudioFormat,
        codec: &Codec,
        frame_samples: u32,
        application: Application,
    ) -> Result<Self, CodecError> {
        validate(format, codec, frame_samples)?;
        Ok(match codec {
            Codec::PcmS16Le => FrameEncoder::Pcm,
            Codec::Opus { bitrate } => FrameEncoder::Opus {
                encoder: opus::Encoder::new(format.rate, format.channels, application, *bitrate)?,
                scratch: Vec::with_capacity(frame_samples as usize * usize::from(format.channels)),
            },
            other => return Err(CodecError::Unsupported(other.name().into())),
        })
    }

    /// Sets Opus's complexity (0..=10); PCM ignores it.
    pub fn set_complexity(&mut self, complexity: u8) -> Result<(), CodecError> {
        if let FrameEncoder::Opus { encoder, .. } = self {
            encoder.set_complexity(complexity)?;
        }
        Ok(())
    }

    /// Sets Opus's bitrate in bit/s; PCM ignores it. True if the codec has a bitrate.
    pub fn set_bitrate(&mut self, bitrate: u32) -> Result<bool, CodecError> {
        match self {
            FrameEncoder::Opus { encoder, .. } => {
                encoder.set_bitrate(bitrate)?;
                Ok(true)
            }
            FrameEncoder::Pcm => Ok(false),
        }
    }

    /// Encoder delay in sample frames (Opus lookahead; 0 for PCM).
    pub fn delay(&self) -> u32 {
        match self {
            FrameEncoder::Pcm => 0,
            FrameEncoder::Opus { encoder, .. } => encoder.lookahead(),
        }
    }

    /// Encodes one frame of tap bytes (exactly one frame's worth) into `out`.
    pub fn encode(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            FrameEncoder::Pcm => {
                out.clear();
                out.extend_from_slice(frame);
                Ok(())
            }
            FrameEncoder::Opus { encoder, scratch } => {
                scratch.clear();
                scratch.extend(frame.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])));
                encoder.encode(scratch, out)?;
                Ok(())
            }
        }
    }
}

/// Decodes a stream's packets to interleaved f32.
#[derive(Debug)]
pub enum StreamDecoder {
    /// s16le PCM.
    Pcm {
        /// Channels per frame.
        channels: usize,
    },
    /// Opus.
    Opus {
        /// The libopus decoder.
        decoder: opus::Decoder,
        /// Channels per frame.
        channels: usize,
    },
}

impl StreamDecoder {
    /// A decoder for a stream the peer opened; validates the layout first.
    pub fn new(format: &AudioFormat, codec: &Codec, frame_samples: u32) -> Result<Self, CodecError> {
        validate(format, codec, frame_samples)?;
        let channels = usize::from(format.channels);
        Ok(match codec {
            Codec::PcmS16Le => StreamDecoder::Pcm { channels },
            Codec::Opus { .. } => {
                StreamDecoder::Opus { decoder: opus::Decoder::new(format.rate, format.channels)?, channels }
            }
            other => return Err(CodecError::Unsupported(other.name().into())),
        })
    }

    /// Decodes one packet that claims `frames` sample frames, appending to `out`.
    /// A packet whose content does not match its claim is refused, and `out` is unchanged.
    pub fn decode(&mut self, data: &[u8], frames: usize, out: &mut Vec<f32>) -> Result<(), CodecError> {
        match self {
            StreamDecoder::Pcm { channels } => {
                if data.len() != frames * *channels * 2 {
                    return Err(CodecError::BadPacket(format!(
                        "{} bytes of PCM for {frames} frames of {channels} channels",
                        data.len()
                    )));
                }
                out.extend(data.chunks_exact(2).map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0));
                Ok(())
            }
            StreamDecoder::Opus { decoder, channels } => {
                if data.is_empty() {
                    return Err(CodecError::BadPacket("empty opus packet".into()));
                }
                let n = decoder.packet_frames(data)?;
                if n != frames {
                    return Err(CodecError::BadPacket(format!("opus packet of {n} frames claims {frames}")));
                }
                let start = out.len();
                out.resize(start + frames * *channels, 0.0);
                match decoder.decode(Some(data), &mut out[start..]) {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        out.truncate(start);
                        Err(e.into())
                    }
                }
            }
        }
    }

    /// Fills a gap of `frames` lost sample frames: Opus conceals, PCM plays silence.
    pub fn conceal(&mut self, frames: usize, out: &mut Vec<f32>) {
        let start = out.len();
        match self {
            StreamDecoder::Pcm { channels } => out.resize(start + frames * *channels, 0.0),
            StreamDecoder::Opus { decoder, channels } => {
                out.resize(start + frames * *channels, 0.0);
                // Concealment failing just leaves silence.
                let _ = decoder.decode(None, &mut out[start..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stereo() -> AudioFormat {
        AudioFormat { rate: 48000, channels: 2, positions: vec![3, 4] }
    }

    fn tone(freq: f32, frames: usize, amp: f32) -> Vec<f32> {
        (0..frames)
            .flat_map(|i| {
                let v = amp * (2.0 * std::f32::consts::PI * freq * i as f32 / 48000.0).sin();
                [v, v]
            })
            .collect()
    }

    #[test]
    fn pcm_round_trip_is_bit_exact() {
        let fmt = stereo();
        let mut enc = FrameEncoder::new(&fmt, &Codec::PcmS16Le, 480, Application::Audio).unwrap();
        let mut dec = StreamDecoder::new(&fmt, &Codec::PcmS16Le, 480).unwrap();
        let samples: Vec<i16> = (0..960).map(|i| (i * 68 - 32768) as i16).collect();
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut packet = Vec::new();
        enc.encode(&bytes, &mut packet).unwrap();
        let mut out = Vec::new();
        dec.decode(&packet, 480, &mut out).unwrap();
        let back: Vec<i16> = out.iter().map(|v| (v * 32768.0) as i16).collect();
        assert_eq!(back, samples);
    }

    #[test]
    fn opus_keeps_a_tone() {
        let fmt = stereo();
        let codec = Codec::Opus { bitrate: 128_000 };
        let mut enc = FrameEncoder::new(&fmt, &codec, 480, Application::Audio).unwrap();
        let mut dec = StreamDecoder::new(&fmt, &codec, 480).unwrap();
        let input = tone(1000.0, 48000, 0.5);
        let mut out = Vec::new();
        let mut packet = Vec::new();
        for frame in input.chunks_exact(960) {
            let bytes: Vec<u8> = frame.iter().flat_map(|v| v.to_ne_bytes()).collect();
            enc.encode(&bytes, &mut packet).unwrap();
            assert!(packet.len() < 400, "128 kbit/s at 10 ms is ~160 bytes, got {}", packet.len());
            dec.decode(&packet, 480, &mut out).unwrap();
        }
        let rms = |s: &[f32]| (s.iter().map(|v| v * v).sum::<f32>() / s.len() as f32).sqrt();
        let tail = &out[out.len() / 2..];
        let db = 20.0 * (rms(tail) / rms(&input[input.len() / 2..])).log10();
        assert!(db.abs() < 0.5, "level changed by {db} dB");
    }

    #[test]
    fn hostile_packets_are_refused_without_panic() {
        let fmt = stereo();
        let codec = Codec::Opus { bitrate: 64_000 };
        let mut dec = StreamDecoder::new(&fmt, &codec, 480).unwrap();
        let mut out = Vec::new();
        assert!(dec.decode(&[], 480, &mut out).is_err());
        assert!(dec.decode(&[0xFF; 3], 480, &mut out).is_err());
        let mut pcm = StreamDecoder::new(&fmt, &Codec::PcmS16Le, 480).unwrap();
        assert!(pcm.decode(&[0; 3], 480, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn validate_refuses_what_peers_cannot_code() {
        let ok = stereo();
        assert!(validate(&ok, &Codec::PcmS16Le, 480).is_ok());
        assert!(validate(&AudioFormat { rate: 0, ..ok.clone() }, &Codec::PcmS16Le, 480).is_err());
        assert!(validate(&AudioFormat { channels: 0, positions: vec![], ..ok.clone() }, &Codec::PcmS16Le, 480).is_err());
        assert!(validate(&ok, &Codec::PcmS16Le, 0).is_err());
        assert!(validate(&ok, &Codec::PcmS16Le, 481).is_err());
        assert!(validate(&AudioFormat { rate: 44100, ..ok.clone() }, &Codec::Opus { bitrate: 64_000 }, 441).is_err());
        assert!(validate(&AudioFormat { rate: 44100, ..ok.clone() }, &Codec::PcmS16Le, 441).is_ok());
        assert!(validate(&ok, &Codec::Opus { bitrate: 1 }, 480).is_err());
    }

    #[test]
    fn channel_positions_are_known_and_distinct() {
        let with = |positions: Vec<u32>| AudioFormat { rate: 48000, channels: positions.len() as u8, positions };
        for good in [vec![2], vec![3], vec![3, 4], vec![3, 4, 5, 6, 7, 8], vec![0x1000, 0x1001], vec![37, 0x103f]] {
            assert!(validate(&with(good.clone()), &Codec::PcmS16Le, 480).is_ok(), "{good:?}");
        }
        for bad in [
            vec![0xFFFF_FFFF, 0xFFFF_FFFF],
            vec![3, 3],
            vec![0],
            vec![1],
            vec![2, 3],
            vec![38],
            vec![0x1040],
            vec![0x10000],
        ] {
            assert!(validate(&with(bad.clone()), &Codec::PcmS16Le, 480).is_err(), "{bad:?}");
        }
    }
}
