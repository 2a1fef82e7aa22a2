//! Payloads: control messages (serde + postcard) and media packets (fixed binary header).
//!
//! Compatibility rule within protocol v1: a message may only grow by appending fields,
//! and readers ignore trailing bytes they do not know. Anything else is a new version.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::MAX_PAYLOAD;

/// Protocol versions this build speaks, lowest and highest.
pub const PROTOCOL_MIN: u8 = 1;
/// See [`PROTOCOL_MIN`].
pub const PROTOCOL_MAX: u8 = 1;

/// Which end of the link a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The guest VM side: taps apps, sends their media.
    Guest,
    /// The host or client device: renders what the guest sends.
    Host,
}

/// Codec capability bits, used in [`Capabilities::codecs`]. Unknown bits are ignored,
/// so a newer peer can advertise codecs an older one has never heard of.
pub mod codec_bits {
    /// Raw PCM, signed 16-bit little-endian interleaved.
    pub const PCM_S16LE: u64 = 1 << 0;
    /// Opus (RFC 6716), one Opus packet per media packet.
    pub const OPUS: u64 = 1 << 1;
}

/// What a peer can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Codecs the peer decodes (host) or can encode (guest), as [`codec_bits`].
    pub codecs: u64,
    /// Most streams the peer accepts at once in the direction it receives.
    pub max_streams: u16,
}

/// First message, guest to host. Its layout is frozen across protocol versions so that
/// any two builds can at least agree that they disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub min_version: u8,
    /// Highest protocol version the sender speaks.
    pub max_version: u8,
    /// Sender's role.
    pub role: Role,
    /// Sender's software name and version, for logs.
    pub software: String,
    /// Identifies this session; a new one after every reconnect or restart.
    pub epoch: u64,
    /// The sender's clock domain (Linux boot id). Equal ids mean both ends read the
    /// same monotonic clock, so latency can be measured directly.
    pub clock_id: String,
    /// What the sender can do.
    pub capabilities: Capabilities,
}

/// Host's answer to an acceptable [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both ends now speak.
    pub version: u8,
    /// Host software name and version.
    pub software: String,
    /// Echo of the guest's epoch.
    pub epoch: u64,
    /// The host's clock domain (see [`Hello::clock_id`]).
    pub clock_id: String,
    /// What the host can do.
    pub capabilities: Capabilities,
}

/// A refused handshake or a closing session, with a reason for the peer's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// Human-readable, one line.
    pub text: String,
}

/// Liveness, the sender's clock, and an echo of the peer's last heartbeat, from which
/// the peer measures the round trip (and so the transport delay) on its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's monotonic clock in nanoseconds when sent.
    pub sent_ns: u64,
    /// `sent_ns` of the last heartbeat received from the peer; 0 if none yet.
    pub echo_ns: u64,
    /// Nanoseconds between receiving that heartbeat and sending this one.
    pub echo_hold_ns: u64,
}

impl Heartbeat {
    /// Decodes a heartbeat, also in its first form (`sent_ns` alone, no echo).
    pub fn decode(payload: &[u8]) -> Result<Heartbeat, MessageError> {
        #[derive(Deserialize)]
        struct First {
            sent_ns: u64,
        }
        decode_control::<Heartbeat>("heartbeat", payload).or_else(|e| {
            decode_control::<First>("heartbeat", payload)
                .map(|f| Heartbeat { sent_ns: f.sent_ns, echo_ns: 0, echo_hold_ns: 0 })
                .map_err(|_| e)
        })
    }
}

/// What kind of media a stream carries. Video is reserved for later versions of the
/// stream-open message; adding it is a new variant, not a new protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaKind {
    /// Interleaved audio.
    Audio(AudioFormat),
}

/// Decoded audio layout of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioFormat {
    /// Sample frames per second.
    pub rate: u32,
    /// Channels per sample frame.
    pub channels: u8,
    /// SPA channel position ids (`SPA_AUDIO_CHANNEL_*`), one per channel.
    pub positions: Vec<u32>,
}

/// How the media packets of a stream are encoded. New codecs are new variants; a peer
/// that cannot decode a stream-open answers with a stream-reject, the session goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Signed 16-bit little-endian interleaved PCM.
    PcmS16Le,
    /// Opus; one packet per media packet.
    Opus {
        /// Target bitrate in bits per second.
        bitrate: u32,
    },
}

impl Codec {
    /// This codec's bit in [`codec_bits`].
    pub fn bit(&self) -> u64 {
        match self {
            Codec::PcmS16Le => codec_bits::PCM_S16LE,
            Codec::Opus { .. } => codec_bits::OPUS,
        }
    }

    /// Short name for logs and file names.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::PcmS16Le => "pcm",
            Codec::Opus { .. } => "opus",
        }
    }
}

/// The guest app behind a stream, from its PipeWire node properties.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppInfo {
    /// `application.name`.
    pub name: String,
    /// `media.role` (Music, Movie, Communication, ...), empty if the app set none.
    pub role: String,
    /// `application.process.binary`.
    pub binary: String,
    /// `application.icon-name`.
    pub icon_name: String,
    /// `media.name` (what the app is playing), empty if unset.
    pub media_name: String,
}

impl AppInfo {
    /// Makes every field safe to print and to pass on ([`crate::text::sanitize`]).
    pub fn sanitize(&mut self) {
        for field in [&mut self.name, &mut self.role, &mut self.binary, &mut self.icon_name, &mut self.media_name] {
            crate::text::sanitize_in_place(field);
        }
    }
}

/// Announces a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Media kind and its decoded layout.
    pub media: MediaKind,
    /// How packets are encoded.
    pub codec: Codec,
    /// Nominal duration of one media packet in sample frames.
    pub frame_samples: u32,
    /// The app behind the stream.
    pub app: AppInfo,
}

/// Ends a stream, or refuses one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEnd {
    /// Why, for the peer's log.
    pub reason: String,
}

/// The receiver's render delay for one stream (frame kind `StreamLatency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamLatency {
    /// From a packet's arrival to its first sample being heard, nanoseconds: the
    /// jitter buffer's mean fill ahead of an arriving packet plus the output's own
    /// latency.
    pub render_ns: u64,
}

/// A capture device the host provides to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaptureDevice {
    /// The user's microphone, as the guest's virtual source.
    Microphone,
}

/// Streams Melange's guest and host each announce at most at once (their Hello's
/// `Capabilities::max_streams`).
pub const MAX_STREAMS: u16 = 64;

/// The microphone stream's rate; it is mono. The host captures and sends at it, and the
/// guest's virtual source plays at it.
pub const MIC_RATE: u32 = 48_000;

/// Whether the guest wants a capture device now (frame kind `CaptureDemand`, stream 0).
/// Sent on every change and again at the start of each session; the host opens the
/// device while it is wanted and sends its audio as a stream of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureDemand {
    /// Which device.
    pub device: CaptureDevice,
    /// True while at least one guest app records from it.
    pub active: bool,
    /// Packet duration the guest wants, in microseconds (10 000; 5 000 or 2 500 in its
    /// low-latency mode).
    pub frame_us: u32,
}

/// The guest's output volume (frame kind `Volume`, stream 0): its redirect sink's, which
/// applies to every stream the guest sends (each app's own volume is applied in the
/// guest before its tap). Sent by the guest at each change and at a session's start;
/// sent by the host when the user changed a guest stream's volume there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// Linear gain per channel, as PipeWire's `channelVolumes` (1.0: unchanged). A
    /// receiver applies the mean to layouts with another channel count.
    pub channels: Vec<f32>,
    /// Muted: the guest sends no media at all while it is.
    pub mute: bool,
}

impl Volume {
    /// The highest gain applied: 150 % on a desktop's volume slider (which shows the
    /// cube root of the gain, as [`Volume`]'s `Display` does), 3.375 or +10.6 dB, where
    /// PulseAudio's and GNOME's sliders end. A peer asking for more gets this.
    pub const MAX_GAIN: f32 = 3.375;

    /// Full volume, not muted.
    pub fn unity() -> Self {
        Volume { channels: vec![1.0], mute: false }
    }

    /// The gains for `n` channels: these if there are as many, else their mean for
    /// each; never negative or non-finite, never above [`Volume::MAX_GAIN`].
    pub fn gains(&self, n: usize) -> Vec<f32> {
        let clean = |v: f32| if v.is_finite() { v.clamp(0.0, Self::MAX_GAIN) } else { 1.0 };
        if self.channels.len() == n {
            return self.channels.iter().copied().map(clean).collect();
        }
        let mean = if self.channels.is_empty() {
            1.0
        } else {
            self.channels.iter().copied().map(clean).sum::<f32>() / self.channels.len() as f32
        };
        vec![mean; n]
    }

    /// True when `other` is the same volume to within what a user can hear (0.1 %).
    pub fn same_as(&self, other: &Volume) -> bool {
        self.mute == other.mute
            && self.channels.len() == other.channels.len()
            && self.channels.iter().zip(&other.channels).all(|(a, b)| (a - b).abs() <= 0.001 * a.abs().max(b.abs()))
    }
}

/// "50 %", as desktops show a volume (the cube root of the linear gain), or "muted".
impl std::fmt::Display for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mute {
            return f.write_str("muted");
        }
        let gain = self.gains(1).first().copied().unwrap_or(1.0);
        write!(f, "{:.0} %", f64::from(gain).cbrt() * 100.0)
    }
}

/// Bytes of the binary media header inside a media frame's payload.
pub const MEDIA_HEADER_LEN: usize = 16;
/// Largest encoded payload of one media packet.
pub const MAX_MEDIA_DATA: usize = MAX_PAYLOAD - MEDIA_HEADER_LEN;

/// One encoded media packet. Not serde: a fixed header and the encoded bytes, so the
/// hot path does no serialization work.
///
/// ```text
/// 0      4              12      16
/// | seq  |   pts_ns      | dur  | data ...
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPacket {
    /// Per-stream sequence number, +1 per packet, wrapping.
    pub seq: u32,
    /// Presentation time of the first sample on the guest graph clock, nanoseconds.
    pub pts_ns: u64,
    /// Sample frames the packet decodes to.
    pub duration: u32,
    /// Encoded bytes, at most [`MAX_MEDIA_DATA`].
    pub data: Vec<u8>,
}

impl MediaPacket {
    /// Writes the media header and data as a frame payload.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.pts_ns.to_le_bytes());
        out.extend_from_slice(&self.duration.to_le_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Parses a media frame's payload.
    pub fn decode(payload: &[u8]) -> Result<MediaPacket, MessageError> {
        let (head, data) = payload
            .split_first_chunk::<MEDIA_HEADER_LEN>()
            .ok_or(MessageError::Truncated { kind: "media", len: payload.len() })?;
        let [s0, s1, s2, s3, p0, p1, p2, p3, p4, p5, p6, p7, d0, d1, d2, d3] = *head;
        Ok(MediaPacket {
            seq: u32::from_le_bytes([s0, s1, s2, s3]),
            pts_ns: u64::from_le_bytes([p0, p1, p2, p3, p4, p5, p6, p7]),
            duration: u32::from_le_bytes([d0, d1, d2, d3]),
            data: data.to_vec(),
        })
    }
}

/// Why a payload could not be read as the message its frame kind says.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    /// The payload is shorter than the message's fixed part.
    #[error("{kind} payload of {len} bytes is truncated")]
    Truncated {
        /// Message kind.
        kind: &'static str,
        /// Bytes present.
        len: usize,
    },
    /// postcard could not decode the control message.
    #[error("malformed {kind} message: {error}")]
    Malformed {
        /// Message kind.
        kind: &'static str,
        /// postcard's description.
        error: String,
    },
    /// The message would not fit one frame.
    #[error("{kind} message of {len} bytes does not fit one frame")]
    TooLarge {
        /// Message kind.
        kind: &'static str,
        /// Encoded size.
        len: usize,
    },
}

/// Serializes a control message.
pub fn encode_control<T: Serialize>(kind: &'static str, msg: &T) -> Result<Vec<u8>, MessageError> {
    let bytes = postcard::to_stdvec(msg).map_err(|e| MessageError::Malformed { kind, error: e.to_string() })?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(MessageError::TooLarge { kind, len: bytes.len() });
    }
    Ok(bytes)
}

/// Deserializes a control message, ignoring trailing bytes from a newer peer.
pub fn decode_control<'a, T: Deserialize<'a>>(kind: &'static str, payload: &'a [u8]) -> Result<T, MessageError> {
    postcard::take_from_bytes(payload)
        .map(|(msg, _rest)| msg)
        .map_err(|e| MessageError::Malformed { kind, error: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_open() -> StreamOpen {
        StreamOpen {
            media: MediaKind::Audio(AudioFormat { rate: 48000, channels: 2, positions: vec![3, 4] }),
            codec: Codec::Opus { bitrate: 128_000 },
            frame_samples: 480,
            app: AppInfo {
                name: "Firefox".into(),
                role: "Movie".into(),
                binary: "firefox".into(),
                icon_name: "firefox".into(),
                media_name: "".into(),
            },
        }
    }

    /// Pins the wire encoding: a reordered field or a changed type fails here.
    #[test]
    fn golden_stream_open() {
        let bytes = encode_control("stream-open", &sample_open()).unwrap();
        let expected: &[u8] = &[
            0, // MediaKind::Audio
            0x80, 0xF7, 0x02, // rate 48000 (varint)
            2,    // channels
            2, 3, 4, // positions
            1, 0x80, 0xE8, 0x07, // Codec::Opus, bitrate 128000
            0xE0, 0x03, // frame_samples 480
            7, b'F', b'i', b'r', b'e', b'f', b'o', b'x', 5, b'M', b'o', b'v', b'i', b'e', 7, b'f', b'i', b'r', b'e',
            b'f', b'o', b'x', 7, b'f', b'i', b'r', b'e', b'f', b'o', b'x', 0,
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode_control::<StreamOpen>("stream-open", &bytes).unwrap(), sample_open());
    }

    #[test]
    fn golden_hello() {
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Guest,
            software: "m".into(),
            epoch: 300,
            clock_id: "c".into(),
            capabilities: Capabilities { codecs: 3, max_streams: 64 },
        };
        let bytes = encode_control("hello", &hello).unwrap();
        assert_eq!(bytes, [1, 1, 0, 1, b'm', 0xAC, 0x02, 1, b'c', 3, 64]);
    }

    #[test]
    fn a_volume_is_capped_at_what_a_desktop_slider_allows() {
        let loud = Volume { channels: vec![15.85, 15.85], mute: false }; // +24 dB
        assert_eq!(loud.gains(2), [Volume::MAX_GAIN; 2]);
        assert_eq!(loud.gains(1), [Volume::MAX_GAIN]);
        assert_eq!(loud.to_string(), "150 %");
        let odd = Volume { channels: vec![f32::NAN, -1.0, f32::INFINITY, 0.5], mute: false };
        assert_eq!(odd.gains(4), [1.0, 0.0, 1.0, 0.5]);
        assert_eq!(Volume { channels: vec![0.125], mute: false }.to_string(), "50 %");
    }

    #[test]
    fn trailing_bytes_from_newer_peer_are_ignored() {
        let mut bytes = encode_control("stream-end", &StreamEnd { reason: "x".into() }).unwrap();
        bytes.extend_from_slice(&[9, 9, 9]);
        let end: StreamEnd = decode_control("stream-end", &bytes).unwrap();
        assert_eq!(end.reason, "x");
    }

    #[test]
    fn unknown_codec_is_a_clean_error() {
        let mut bytes = encode_control("stream-open", &sample_open()).unwrap();
        bytes[8] = 0x7F; // codec discriminant no build knows
        assert!(matches!(decode_control::<StreamOpen>("stream-open", &bytes), Err(MessageError::Malformed { .. })));
    }

    #[test]
    fn media_round_trip_and_truncation() {
        let p = MediaPacket { seq: 0xFFFF_FFFF, pts_ns: 1 << 40, duration: 480, data: vec![1, 2, 3] };
        let mut out = Vec::new();
        p.encode_into(&mut out);
        assert_eq!(out.len(), MEDIA_HEADER_LEN + 3);
        assert_eq!(MediaPacket::decode(&out).unwrap(), p);
        assert!(matches!(MediaPacket::decode(&out[..15]), Err(MessageError::Truncated { .. })));
    }
}

#[cfg(test)]
mod round_trips {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,40}"
    }

    fn caps() -> impl Strategy<Value = Capabilities> {
        (any::<u64>(), any::<u16>()).prop_map(|(codecs, max_streams)| Capabilities { codecs, max_streams })
    }

    fn codec() -> impl Strategy<Value = Codec> {
        prop_oneof![Just(Codec::PcmS16Le), any::<u32>().prop_map(|bitrate| Codec::Opus { bitrate })]
    }

    /// A heartbeat from a peer that sends no echo yet (`sent_ns` alone) still decodes.
    #[test]
    fn heartbeats_of_the_first_form_decode_without_an_echo() {
        let first = [0x80, 0x94, 0xeb, 0xdc, 0x03]; // varint 1_000_000_000
        assert_eq!(
            Heartbeat::decode(&first).unwrap(),
            Heartbeat { sent_ns: 1_000_000_000, echo_ns: 0, echo_hold_ns: 0 }
        );
        assert!(Heartbeat::decode(&[0x80]).is_err(), "a cut varint is malformed");
    }

    proptest! {
        #[test]
        fn hello(min in any::<u8>(), max in any::<u8>(), guest in any::<bool>(), software in text(), epoch in any::<u64>(),
                 clock_id in text(), capabilities in caps()) {
            let role = if guest { Role::Guest } else { Role::Host };
            let m = Hello { min_version: min, max_version: max, role, software, epoch, clock_id, capabilities };
            prop_assert_eq!(decode_control::<Hello>("hello", &encode_control("hello", &m).unwrap()).unwrap(), m);
        }

        #[test]
        fn welcome(version in any::<u8>(), software in text(), epoch in any::<u64>(), clock_id in text(), capabilities in caps()) {
            let m = Welcome { version, software, epoch, clock_id, capabilities };
            prop_assert_eq!(decode_control::<Welcome>("welcome", &encode_control("welcome", &m).unwrap()).unwrap(), m);
        }

        #[test]
        fn stream_open(rate in any::<u32>(), positions in proptest::collection::vec(any::<u32>(), 0..8), codec in codec(),
                       frame_samples in any::<u32>(), name in text(), role in text(), binary in text()) {
            let m = StreamOpen {
                media: MediaKind::Audio(AudioFormat { rate, channels: positions.len() as u8, positions }),
                codec,
                frame_samples,
                app: AppInfo { name, role, binary, icon_name: String::new(), media_name: String::new() },
            };
            prop_assert_eq!(decode_control::<StreamOpen>("stream-open", &encode_control("stream-open", &m).unwrap()).unwrap(), m);
        }

        #[test]
        fn small_messages(text in text(), sent_ns in any::<u64>()) {
            let r = Reason { text: text.clone() };
            prop_assert_eq!(decode_control::<Reason>("reason", &encode_control("reason", &r).unwrap()).unwrap(), r);
            let e = StreamEnd { reason: text };
            prop_assert_eq!(decode_control::<StreamEnd>("end", &encode_control("end", &e).unwrap()).unwrap(), e);
            let h = Heartbeat { sent_ns, echo_ns: sent_ns / 3, echo_hold_ns: sent_ns / 7 };
            prop_assert_eq!(Heartbeat::decode(&encode_control("hb", &h).unwrap()).unwrap(), h);
            let l = StreamLatency { render_ns: sent_ns };
            prop_assert_eq!(decode_control::<StreamLatency>("sl", &encode_control("sl", &l).unwrap()).unwrap(), l);
        }

        #[test]
        fn media(seq in any::<u32>(), pts_ns in any::<u64>(), duration in any::<u32>(),
                 data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let p = MediaPacket { seq, pts_ns, duration, data };
            let mut out = Vec::new();
            p.encode_into(&mut out);
            prop_assert_eq!(MediaPacket::decode(&out).unwrap(), p);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_control::<Hello>("hello", &bytes);
            let _ = decode_control::<StreamOpen>("stream-open", &bytes);
            let _ = decode_control::<Welcome>("welcome", &bytes);
            let _ = MediaPacket::decode(&bytes);
        }
    }
}
