//! Payloads: control messages (serde + postcard), media packets and access-unit headers
//! (fixed binary headers).
//!
//! Compatibility rule within a protocol version: a message may only grow by appending
//! fields, and readers ignore trailing bytes they do not know. Anything else is a new
//! version. [`Hello`] (and so [`Capabilities`], its last field) only ever grows at its
//! end, so any two builds can read each other's.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::MAX_PAYLOAD;

/// Protocol versions this build speaks, lowest and highest. Version 2 added encoded
/// audio and video streams, access units and stream control; a version 1 peer is
/// refused with a reason that names both ranges.
pub const PROTOCOL_MIN: u8 = 2;
/// See [`PROTOCOL_MIN`].
pub const PROTOCOL_MAX: u8 = 2;

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
    /// Opus (RFC 6716), one Opus packet per media packet or access unit.
    pub const OPUS: u64 = 1 << 1;
    /// MPEG-1/2 Audio Layer III.
    pub const MP3: u64 = 1 << 2;
    /// AAC (raw access units; the AudioSpecificConfig is the codec data).
    pub const AAC: u64 = 1 << 3;
    /// Vorbis (the three stream headers are the codec data).
    pub const VORBIS: u64 = 1 << 4;
    /// FLAC (the stream header is the codec data).
    pub const FLAC: u64 = 1 << 5;
    /// H.264 (AVC).
    pub const H264: u64 = 1 << 8;
    /// H.265 (HEVC).
    pub const H265: u64 = 1 << 9;
    /// VP8.
    pub const VP8: u64 = 1 << 10;
    /// VP9.
    pub const VP9: u64 = 1 << 11;
    /// AV1.
    pub const AV1: u64 = 1 << 12;
    /// Raw I420 video frames (the camera where the port is local): each access unit
    /// is one whole frame, its planes packed without padding.
    pub const RAW_I420: u64 = 1 << 13;
    /// With [`H264`]: also the profiles beyond High (High 10, High 4:2:2, High 4:4:4
    /// and their intra forms). [`H264`] alone is Constrained Baseline to High, 8-bit
    /// 4:2:0: what every decoder takes, hardware ones included.
    pub const H264_HIGH_PROFILES: u64 = 1 << 16;
    /// With [`H265`]: also the range extensions (4:2:2, 4:4:4, 12-bit, ...). [`H265`]
    /// alone is Main, Main 10 and Main Still Picture.
    pub const H265_RANGE_PROFILES: u64 = 1 << 17;
    /// With [`VP9`]: also profiles 1 to 3 (4:2:2 and 4:4:4, 10 and 12-bit). [`VP9`]
    /// alone is profile 0.
    pub const VP9_HIGH_PROFILES: u64 = 1 << 18;
    /// With [`AV1`]: also High and Professional. [`AV1`] alone is Main.
    pub const AV1_HIGH_PROFILES: u64 = 1 << 19;
    /// The profile bits above, each meaningful only with its codec's bit. A peer that
    /// predates them sets none: its guests offer the common profiles only.
    pub const PROFILES: u64 = H264_HIGH_PROFILES | H265_RANGE_PROFILES | VP9_HIGH_PROFILES | AV1_HIGH_PROFILES;
    /// Every codec of encoded audio and video streams, every profile.
    pub const ENCODED: u64 = OPUS | MP3 | AAC | VORBIS | FLAC | H264 | H265 | VP8 | VP9 | AV1 | PROFILES;

    /// The profile bit that goes with `codec`'s bit, 0 for a codec without one.
    pub const fn profiles_of(codec: u64) -> u64 {
        match codec {
            H264 => H264_HIGH_PROFILES,
            H265 => H265_RANGE_PROFILES,
            VP9 => VP9_HIGH_PROFILES,
            AV1 => AV1_HIGH_PROFILES,
            _ => 0,
        }
    }
}

/// Stream kind bits, used in [`Capabilities::kinds`]. Unknown bits are ignored.
pub mod kind_bits {
    /// Tapped audio: [`super::MediaKind::Audio`], real-time media packets.
    pub const AUDIO: u32 = 1 << 0;
    /// A player's encoded audio: [`super::MediaKind::EncodedAudio`], access units.
    pub const ENCODED_AUDIO: u32 = 1 << 1;
    /// A player's encoded video: [`super::MediaKind::EncodedVideo`], access units.
    pub const ENCODED_VIDEO: u32 = 1 << 2;
    /// The user's camera, host to guest: [`super::MediaKind::Camera`], access units.
    /// The host sets it when it has a camera to give (not `--camera none`), the guest
    /// when it has a virtual camera to show it in.
    pub const CAMERA: u32 = 1 << 3;
}

/// What a peer can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Codecs the peer decodes (host) or can encode (guest), as [`codec_bits`].
    pub codecs: u64,
    /// Most streams the peer accepts at once in the direction it receives.
    pub max_streams: u16,
    /// Stream kinds the peer handles, as [`kind_bits`] (protocol v2; a v1 peer's
    /// capabilities end before it and read as [`kind_bits::AUDIO`]).
    pub kinds: u32,
}

impl Capabilities {
    /// True when the peer takes a stream of this kind and codec.
    pub fn accepts(&self, media: &MediaKind, codec: &Codec) -> bool {
        self.kinds & media.bit() != 0 && self.codecs & codec.bit() != 0
    }
}

/// [`Hello`] and [`Welcome`] as protocol v1 wrote them: their capabilities had no kinds.
mod v1 {
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub(super) struct Capabilities {
        pub codecs: u64,
        pub max_streams: u16,
    }

    #[derive(Deserialize)]
    pub(super) struct Hello {
        pub min_version: u8,
        pub max_version: u8,
        pub role: super::Role,
        pub software: String,
        pub epoch: u64,
        pub clock_id: String,
        pub capabilities: Capabilities,
    }

    #[derive(Deserialize)]
    pub(super) struct Welcome {
        pub version: u8,
        pub software: String,
        pub epoch: u64,
        pub clock_id: String,
        pub capabilities: Capabilities,
    }

    impl From<Capabilities> for super::Capabilities {
        fn from(c: Capabilities) -> Self {
            Self { codecs: c.codecs, max_streams: c.max_streams, kinds: super::kind_bits::AUDIO }
        }
    }
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

impl Hello {
    /// Decodes a hello of any version, v1's (whose capabilities end early) included,
    /// so that a peer of another version can be told exactly which.
    pub fn decode(payload: &[u8]) -> Result<Hello, MessageError> {
        decode_control::<Hello>("hello", payload).or_else(|e| {
            decode_control::<v1::Hello>("hello", payload)
                .map(|h| Hello {
                    min_version: h.min_version,
                    max_version: h.max_version,
                    role: h.role,
                    software: h.software,
                    epoch: h.epoch,
                    clock_id: h.clock_id,
                    capabilities: h.capabilities.into(),
                })
                .map_err(|_| e)
        })
    }
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

impl Welcome {
    /// Decodes a welcome, v1's included (see [`Hello::decode`]).
    pub fn decode(payload: &[u8]) -> Result<Welcome, MessageError> {
        decode_control::<Welcome>("welcome", payload).or_else(|e| {
            decode_control::<v1::Welcome>("welcome", payload)
                .map(|w| Welcome {
                    version: w.version,
                    software: w.software,
                    epoch: w.epoch,
                    clock_id: w.clock_id,
                    capabilities: w.capabilities.into(),
                })
                .map_err(|_| e)
        })
    }
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

/// What kind of media a stream carries, and how its frames carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaKind {
    /// Tapped audio, encoded by Melange as it plays: [`MediaPacket`]s at real time.
    Audio(AudioFormat),
    /// A player's own encoded audio, forwarded as it comes: [`AccessUnit`]s.
    EncodedAudio(AudioFormat),
    /// A player's own encoded video: [`AccessUnit`]s.
    EncodedVideo(VideoFormat),
    /// The user's camera, host to guest: one [`AccessUnit`] a frame.
    Camera(VideoFormat),
}

impl MediaKind {
    /// This kind's bit in [`kind_bits`].
    pub fn bit(&self) -> u32 {
        match self {
            MediaKind::Audio(_) => kind_bits::AUDIO,
            MediaKind::EncodedAudio(_) => kind_bits::ENCODED_AUDIO,
            MediaKind::EncodedVideo(_) => kind_bits::ENCODED_VIDEO,
            MediaKind::Camera(_) => kind_bits::CAMERA,
        }
    }

    /// True for the kinds whose frames are access units (bulk, below audio).
    pub fn is_encoded(&self) -> bool {
        !matches!(self, MediaKind::Audio(_))
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            MediaKind::Audio(_) => "audio",
            MediaKind::EncodedAudio(_) => "encoded audio",
            MediaKind::EncodedVideo(_) => "encoded video",
            MediaKind::Camera(_) => "camera",
        }
    }
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

/// Picture size and frame rate of a video stream, as the player reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoFormat {
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// Frames per second as a fraction; 0/1 when variable or unknown.
    pub framerate_num: u32,
    /// See [`VideoFormat::framerate_num`].
    pub framerate_den: u32,
}

/// How the packets or access units of a stream are encoded. New codecs are new
/// variants; a peer that cannot decode a stream-open answers with a stream-reject, the
/// session goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Signed 16-bit little-endian interleaved PCM.
    PcmS16Le,
    /// Opus; one packet per media packet or access unit.
    Opus {
        /// Target bitrate in bits per second (0 when forwarded as the player has it).
        bitrate: u32,
    },
    /// MPEG-1/2 Audio Layer III.
    Mp3,
    /// AAC, raw access units.
    Aac,
    /// Vorbis.
    Vorbis,
    /// FLAC.
    Flac,
    /// H.264, in the byte-stream format or as avcC access units per the codec data.
    H264,
    /// H.265.
    H265,
    /// VP8.
    Vp8,
    /// VP9.
    Vp9,
    /// AV1.
    Av1,
    /// Raw I420 frames, one per access unit (see [`codec_bits::RAW_I420`]).
    RawI420,
}

impl Codec {
    /// This codec's bit in [`codec_bits`].
    pub fn bit(&self) -> u64 {
        match self {
            Codec::PcmS16Le => codec_bits::PCM_S16LE,
            Codec::Opus { .. } => codec_bits::OPUS,
            Codec::Mp3 => codec_bits::MP3,
            Codec::Aac => codec_bits::AAC,
            Codec::Vorbis => codec_bits::VORBIS,
            Codec::Flac => codec_bits::FLAC,
            Codec::H264 => codec_bits::H264,
            Codec::H265 => codec_bits::H265,
            Codec::Vp8 => codec_bits::VP8,
            Codec::Vp9 => codec_bits::VP9,
            Codec::Av1 => codec_bits::AV1,
            Codec::RawI420 => codec_bits::RAW_I420,
        }
    }

    /// Short name for logs and file names.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::PcmS16Le => "pcm",
            Codec::Opus { .. } => "opus",
            Codec::Mp3 => "mp3",
            Codec::Aac => "aac",
            Codec::Vorbis => "vorbis",
            Codec::Flac => "flac",
            Codec::H264 => "h264",
            Codec::H265 => "h265",
            Codec::Vp8 => "vp8",
            Codec::Vp9 => "vp9",
            Codec::Av1 => "av1",
            Codec::RawI420 => "i420",
        }
    }

    /// The codec of a name as [`Codec::name`] gives it (Opus at bitrate 0).
    pub fn from_name(name: &str) -> Option<Codec> {
        Some(match name {
            "pcm" => Codec::PcmS16Le,
            "opus" => Codec::Opus { bitrate: 0 },
            "mp3" => Codec::Mp3,
            "aac" => Codec::Aac,
            "vorbis" => Codec::Vorbis,
            "flac" => Codec::Flac,
            "h264" => Codec::H264,
            "h265" => Codec::H265,
            "vp8" => Codec::Vp8,
            "vp9" => Codec::Vp9,
            "av1" => Codec::Av1,
            "i420" => Codec::RawI420,
            _ => return None,
        })
    }

    /// True for the video codecs.
    pub fn is_video(&self) -> bool {
        matches!(self, Codec::H264 | Codec::H265 | Codec::Vp8 | Codec::Vp9 | Codec::Av1)
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
    /// Nominal duration of one media packet in sample frames (0 for access units).
    pub frame_samples: u32,
    /// The app behind the stream.
    pub app: AppInfo,
    /// The codec's setup data (AAC's AudioSpecificConfig, H.264's avcC, the Vorbis,
    /// Opus and FLAC stream headers), as the player has it; empty when none.
    pub codec_data: Vec<u8>,
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
    /// The user's camera, as the guest's "Melange camera" (`frame_us` unused).
    Camera,
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

/// Control of one encoded stream (frame kind `StreamControl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamControl {
    /// Sender to receiver: forget everything of the stream before this (a seek); the
    /// next access unit starts afresh, usually a keyframe with the discontinuity flag.
    Flush,
    /// Sender to receiver: the player paused; nothing follows until [`StreamControl::Resume`].
    Pause,
    /// Sender to receiver: the player plays again.
    Resume,
    /// Sender to receiver: the last access unit has been sent; the stream stays open
    /// (a seek back may follow) until closed.
    EndOfStream,
    /// Receiver to sender: send a keyframe (the receiver lost data or joined late).
    KeyframeRequest,
    /// Sender to receiver: where the player shows the video, for the receiver to size
    /// (and where it can, place) its picture: the rectangle the app gave its video
    /// sink (`GstVideoOverlay`), in the app's window, in pixels.
    Geometry(Geometry),
}

/// A video's rectangle in its app's window ([`StreamControl::Geometry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Left edge, pixels from the window's left.
    pub x: i32,
    /// Top edge, pixels from the window's top.
    pub y: i32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Bytes of the binary header that starts an access unit's first frame.
pub const AU_HEADER_LEN: usize = 36;
/// Largest access unit either side sends or accepts, bytes: a 4K keyframe fits.
pub const MAX_ACCESS_UNIT: usize = 8 << 20;

/// [`AccessUnit::flags`] bits.
pub mod au_flags {
    /// Decodable on its own (a video keyframe; every audio access unit).
    pub const KEYFRAME: u32 = 1 << 0;
    /// Not contiguous with the one before (after a flush, or a gap).
    pub const DISCONTINUITY: u32 = 1 << 1;
    /// `dts_ns` is set (it differs from `pts_ns`).
    pub const HAS_DTS: u32 = 1 << 2;
    /// Decode it, but do not show or play it: a unit before the start of a seek's
    /// segment, needed to decode the ones after. Sent at once, not at its time, so its
    /// timestamps say nothing about the stream's pace.
    pub const DECODE_ONLY: u32 = 1 << 3;
}

/// One encoded access unit of a player's stream: a video frame, an audio frame. It is
/// split into frames of at most [`crate::frame::MAX_FRAME`] bytes: `AuStart` carries
/// the header and the first bytes, `AuData` the rest, in order.
///
/// ```text
/// 0      4       8              16             24             32      36
/// | seq  | flags |   pts_ns     |   dts_ns     | duration_ns  | size  | data ...
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    /// Per-stream sequence number, +1 per access unit, wrapping.
    pub seq: u32,
    /// [`au_flags`].
    pub flags: u32,
    /// Presentation time on the sender's monotonic clock (the guest's, as audio's), ns.
    pub pts_ns: u64,
    /// Decoding time where it differs from `pts_ns` ([`au_flags::HAS_DTS`]), else 0.
    pub dts_ns: u64,
    /// Duration, ns (0: unknown).
    pub duration_ns: u64,
    /// The encoded bytes, at most [`MAX_ACCESS_UNIT`].
    pub data: Vec<u8>,
}

impl AccessUnit {
    /// True for a keyframe.
    pub fn is_keyframe(&self) -> bool {
        self.flags & au_flags::KEYFRAME != 0
    }

    /// The decoding time: `dts_ns` where set, else `pts_ns`.
    pub fn dts(&self) -> u64 {
        if self.flags & au_flags::HAS_DTS != 0 {
            self.dts_ns
        } else {
            self.pts_ns
        }
    }

    /// Writes the header that starts the first frame; `size` is `data.len()`.
    pub fn encode_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.pts_ns.to_le_bytes());
        out.extend_from_slice(&self.dts_ns.to_le_bytes());
        out.extend_from_slice(&self.duration_ns.to_le_bytes());
        out.extend_from_slice(&u32::try_from(self.data.len()).unwrap_or(u32::MAX).to_le_bytes());
    }

    /// Parses the header of a first frame: the access unit without its data, its
    /// announced size, and the first bytes of data.
    pub fn decode_header(payload: &[u8]) -> Result<(AccessUnit, usize, &[u8]), MessageError> {
        let (head, data) = payload
            .split_first_chunk::<AU_HEADER_LEN>()
            .ok_or(MessageError::Truncated { kind: "access unit", len: payload.len() })?;
        let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        let au = AccessUnit {
            seq: u32_at(0),
            flags: u32_at(4),
            pts_ns: u64_at(8),
            dts_ns: u64_at(16),
            duration_ns: u64_at(24),
            data: Vec::new(),
        };
        Ok((au, u32_at(32) as usize, data))
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
            codec_data: Vec::new(),
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
            b'f', b'o', b'x', 7, b'f', b'i', b'r', b'e', b'f', b'o', b'x', 0, //
            0, // codec_data: none
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode_control::<StreamOpen>("stream-open", &bytes).unwrap(), sample_open());
    }

    #[test]
    fn golden_hello() {
        let hello = Hello {
            min_version: 2,
            max_version: 2,
            role: Role::Guest,
            software: "m".into(),
            epoch: 300,
            clock_id: "c".into(),
            capabilities: Capabilities {
                codecs: 3,
                max_streams: 64,
                kinds: kind_bits::AUDIO | kind_bits::ENCODED_VIDEO,
            },
        };
        let bytes = encode_control("hello", &hello).unwrap();
        assert_eq!(bytes, [2, 2, 0, 1, b'm', 0xAC, 0x02, 1, b'c', 3, 64, 5]);
        assert_eq!(Hello::decode(&bytes).unwrap(), hello);
    }

    /// A v1 peer's hello (its capabilities end before `kinds`) still reads, so that it
    /// can be told which versions each side speaks.
    #[test]
    fn a_v1_hello_reads_as_audio_only() {
        let v1 = [1, 1, 0, 1, b'm', 0xAC, 0x02, 1, b'c', 3, 64];
        let hello = Hello::decode(&v1).unwrap();
        assert_eq!((hello.min_version, hello.max_version), (1, 1));
        assert_eq!(hello.capabilities, Capabilities { codecs: 3, max_streams: 64, kinds: kind_bits::AUDIO });
        assert!(Hello::decode(&v1[..9]).is_err());
    }

    #[test]
    fn golden_v2_messages() {
        let open = StreamOpen {
            media: MediaKind::EncodedVideo(VideoFormat {
                width: 1280,
                height: 720,
                framerate_num: 30,
                framerate_den: 1,
            }),
            codec: Codec::H264,
            frame_samples: 0,
            app: AppInfo { name: "Totem".into(), role: "Movie".into(), ..Default::default() },
            codec_data: vec![1, 0x64, 0, 0x1F],
        };
        let bytes = encode_control("stream-open", &open).unwrap();
        let expected: &[u8] = &[
            2, // MediaKind::EncodedVideo
            0x80, 0x0A, 0xD0, 0x05, 30, 1, // 1280 x 720, 30/1
            6, // Codec::H264
            0, // frame_samples
            5, b'T', b'o', b't', b'e', b'm', 5, b'M', b'o', b'v', b'i', b'e', 0, 0, 0, // app
            4, 1, 0x64, 0, 0x1F, // codec_data
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode_control::<StreamOpen>("stream-open", &bytes).unwrap(), open);
        let audio = MediaKind::EncodedAudio(AudioFormat { rate: 44100, channels: 2, positions: vec![3, 4] });
        assert_eq!(encode_control("kind", &audio).unwrap(), [1, 0xC4, 0xD8, 0x02, 2, 2, 3, 4]);
        // The camera: kind 3, codec 11, capture device 1.
        let camera = MediaKind::Camera(VideoFormat { width: 640, height: 360, framerate_num: 30, framerate_den: 1 });
        assert_eq!(encode_control("kind", &camera).unwrap(), [3, 0x80, 0x05, 0xE8, 0x02, 30, 1]);
        assert_eq!(encode_control("codec", &Codec::RawI420).unwrap(), [11]);
        let demand = CaptureDemand { device: CaptureDevice::Camera, active: true, frame_us: 0 };
        assert_eq!(encode_control("capture-demand", &demand).unwrap(), [1, 1, 0]);
        assert_eq!(codec_bits::RAW_I420, 1 << 13);
        assert_eq!(kind_bits::CAMERA, 1 << 3);
        let controls = [
            StreamControl::Flush,
            StreamControl::Pause,
            StreamControl::Resume,
            StreamControl::EndOfStream,
            StreamControl::KeyframeRequest,
        ];
        for (i, c) in controls.into_iter().enumerate() {
            assert_eq!(encode_control("stream-control", &c).unwrap(), [i as u8]);
        }
        let au = AccessUnit {
            seq: 7,
            flags: au_flags::KEYFRAME | au_flags::HAS_DTS,
            pts_ns: 0x0102_0304_0506_0708,
            dts_ns: 0x1112_1314_1516_1718,
            duration_ns: 33_333_333,
            data: vec![0xAA, 0xBB],
        };
        let mut header = Vec::new();
        au.encode_header(&mut header);
        assert_eq!(
            header,
            [
                7, 0, 0, 0, 5, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, 0x55,
                0xA0, 0xFC, 0x01, 0, 0, 0, 0, 2, 0, 0, 0
            ]
        );
        header.extend_from_slice(&au.data);
        let (back, size, data) = AccessUnit::decode_header(&header).unwrap();
        assert_eq!((size, data), (2, &[0xAA, 0xBB][..]));
        assert_eq!(AccessUnit { data: data.to_vec(), ..back }, au);
        assert!(AccessUnit::decode_header(&header[..35]).is_err());
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
        (any::<u64>(), any::<u16>()).prop_map(|(codecs, max_streams)| Capabilities {
            codecs,
            max_streams,
            kinds: crate::message::kind_bits::AUDIO,
        })
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
                codec_data: Vec::new(),
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
