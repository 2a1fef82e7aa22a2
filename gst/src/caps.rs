//! GStreamer caps and protocol v2 stream announcements, both ways: what the sinks
//! offer (only the codecs the connected host decodes), what a negotiated caps
//! announces, and, on the host, the caps that decode an announced stream.
//!
//! Codec data travels as the player has it (docs/protocol.md): H.264's avcC and H.265's
//! hvcC (empty for the byte-stream format, parameter sets in band), AAC's
//! AudioSpecificConfig (raw access units only; ADTS is converted by `aacparse`
//! before the sink), AV1's av1C where there is one, and for Vorbis, Opus and FLAC the
//! caps' `streamheader` buffers, each as a 4-byte big-endian length and its bytes.

use gstreamer as gst;
use gstreamer::prelude::*;

use melange_transport::message::{codec_bits, AudioFormat, Codec, MediaKind, VideoFormat};

/// Which of the two sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `melangevideosink`.
    Video,
    /// `melangeaudiosink`.
    Audio,
}

/// Every codec of a kind, in the order caps list them.
pub fn codecs(kind: Kind) -> &'static [u64] {
    match kind {
        Kind::Video => &[codec_bits::H264, codec_bits::H265, codec_bits::VP8, codec_bits::VP9, codec_bits::AV1],
        Kind::Audio => &[codec_bits::MP3, codec_bits::AAC, codec_bits::OPUS, codec_bits::VORBIS, codec_bits::FLAC],
    }
}

/// The caps a sink takes for one codec (`codec_bits`): parsed, whole access units.
fn codec_caps(bit: u64) -> gst::Caps {
    match bit {
        codec_bits::H264 => gst::Caps::builder("video/x-h264")
            .field("stream-format", gst::List::new(["avc", "byte-stream"]))
            .field("alignment", "au")
            .build(),
        codec_bits::H265 => gst::Caps::builder("video/x-h265")
            .field("stream-format", gst::List::new(["hvc1", "hev1", "byte-stream"]))
            .field("alignment", "au")
            .build(),
        codec_bits::VP8 => gst::Caps::builder("video/x-vp8").build(),
        codec_bits::VP9 => gst::Caps::builder("video/x-vp9").build(),
        codec_bits::AV1 => {
            gst::Caps::builder("video/x-av1").field("stream-format", "obu-stream").field("alignment", "tu").build()
        }
        codec_bits::MP3 => gst::Caps::builder("audio/mpeg")
            .field("mpegversion", 1i32)
            .field("layer", 3i32)
            .field("parsed", true)
            .build(),
        codec_bits::AAC => gst::Caps::builder("audio/mpeg")
            .field("mpegversion", gst::List::new([2i32, 4]))
            .field("stream-format", "raw")
            .build(),
        codec_bits::OPUS => gst::Caps::builder("audio/x-opus").build(),
        codec_bits::VORBIS => gst::Caps::builder("audio/x-vorbis").build(),
        codec_bits::FLAC => gst::Caps::builder("audio/x-flac").field("framed", true).build(),
        _ => gst::Caps::new_empty(),
    }
}

/// The caps a sink offers while `accepted` (`codec_bits`) are what the host decodes:
/// empty when it decodes none of the kind (the player then decodes locally).
pub fn offered(kind: Kind, accepted: u64) -> gst::Caps {
    let mut caps = gst::Caps::new_empty();
    for &bit in codecs(kind) {
        if accepted & bit == 0 {
            continue;
        }
        let mut one = codec_caps(bit);
        // Without its profile bit only the common profiles: a stream of another says
        // so in its caps and is not taken. (One that names no profile is.)
        if accepted & codec_bits::profiles_of(bit) == 0 && !common_profiles(bit).is_empty() {
            if let Some(s) = one.make_mut().structure_mut(0) {
                s.set("profile", gst::List::new(common_profiles(bit).iter().copied()));
            }
        }
        caps.merge(one);
    }
    caps
}

/// The profiles of codec `bit` every decoder of it takes (GStreamer's names), offered
/// without the codec's profile bit (`codec_bits::profiles_of`); empty for codecs
/// without profile bits.
pub fn common_profiles(bit: u64) -> &'static [&'static str] {
    match bit {
        codec_bits::H264 => {
            &["constrained-baseline", "baseline", "main", "extended", "high", "progressive-high", "constrained-high"]
        }
        codec_bits::H265 => &["main", "main-10", "main-still-picture"],
        codec_bits::VP9 => &["0"],
        codec_bits::AV1 => &["main"],
        _ => &[],
    }
}

/// The profiles of codec `bit` its profile bit adds: a host sets the bit when its
/// decoders take every one of them.
pub fn high_profiles(bit: u64) -> &'static [&'static str] {
    match bit {
        codec_bits::H264 => &[
            "high-10",
            "high-4:2:2",
            "high-4:4:4",
            "high-10-intra",
            "high-4:2:2-intra",
            "high-4:4:4-intra",
            "cavlc-4:4:4-intra",
        ],
        codec_bits::H265 => &[
            "main-12",
            "main-422-10",
            "main-422-12",
            "main-444",
            "main-444-10",
            "main-444-12",
            "main-intra",
            "main-10-intra",
            "main-444-still-picture",
        ],
        codec_bits::VP9 => &["1", "2", "3"],
        codec_bits::AV1 => &["high", "professional"],
        _ => &[],
    }
}

/// The pad template's caps: every codec of the kind.
pub fn template(kind: Kind) -> gst::Caps {
    offered(kind, codec_bits::ENCODED)
}

/// What a negotiated caps announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The stream's kind and layout.
    pub media: MediaKind,
    /// The codec.
    pub codec: Codec,
    /// Its setup data (see the module docs).
    pub codec_data: Vec<u8>,
}

fn int(s: &gst::StructureRef, name: &str) -> Option<u32> {
    s.get::<i32>(name).ok().and_then(|v| u32::try_from(v).ok())
}

fn buffer_bytes(buffer: &gst::Buffer) -> Vec<u8> {
    buffer.map_readable().map(|m| m.as_slice().to_vec()).unwrap_or_default()
}

/// The `streamheader` buffers, each as a 4-byte big-endian length and its bytes.
fn stream_headers(s: &gst::StructureRef) -> Vec<u8> {
    let Ok(headers) = s.get::<gst::ArrayRef>("streamheader") else { return Vec::new() };
    let mut out = Vec::new();
    for value in headers.iter() {
        if let Ok(buffer) = value.get::<gst::Buffer>() {
            let bytes = buffer_bytes(&buffer);
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(&bytes);
        }
    }
    out
}

/// Splits codec data written by [`stream_headers`]; `None` if it is not in that form.
pub fn split_headers(mut data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
        out.push(data.get(4..4 + len)?);
        data = &data[4 + len..];
    }
    Some(out)
}

/// What fixed caps announce, or why they cannot be forwarded.
pub fn announce(caps: &gst::CapsRef) -> Result<Announced, String> {
    let s = caps.structure(0).ok_or("empty caps")?;
    let codec_data = || s.get::<gst::Buffer>("codec_data").map(|b| buffer_bytes(&b)).unwrap_or_default();
    let video = |codec: Codec, codec_data: Vec<u8>| {
        let (num, den) = s
            .get::<gst::Fraction>("framerate")
            .ok()
            .and_then(|f| Some((u32::try_from(f.numer()).ok()?, u32::try_from(f.denom()).ok()?)))
            .unwrap_or((0, 1));
        Ok(Announced {
            media: MediaKind::EncodedVideo(VideoFormat {
                width: int(s, "width").unwrap_or(0),
                height: int(s, "height").unwrap_or(0),
                framerate_num: num,
                framerate_den: den.max(1),
            }),
            codec,
            codec_data,
        })
    };
    let audio = |codec: Codec, codec_data: Vec<u8>| {
        let rate = int(s, "rate").filter(|r| *r > 0).ok_or("audio caps without a rate")?;
        let channels = int(s, "channels").and_then(|c| u8::try_from(c).ok()).filter(|c| *c > 0).unwrap_or(2);
        Ok(Announced {
            media: MediaKind::EncodedAudio(AudioFormat { rate, channels, positions: Vec::new() }),
            codec,
            codec_data,
        })
    };
    let format = s.get::<&str>("stream-format").unwrap_or("");
    match s.name().as_str() {
        "video/x-h264" => video(Codec::H264, if format == "byte-stream" { Vec::new() } else { codec_data() }),
        "video/x-h265" => video(Codec::H265, if format == "byte-stream" { Vec::new() } else { codec_data() }),
        "video/x-vp8" => video(Codec::Vp8, Vec::new()),
        "video/x-vp9" => video(Codec::Vp9, Vec::new()),
        "video/x-av1" => video(Codec::Av1, codec_data()),
        "audio/mpeg" => match s.get::<i32>("mpegversion") {
            Ok(1) => audio(Codec::Mp3, Vec::new()),
            Ok(2 | 4) => audio(Codec::Aac, codec_data()),
            _ => Err(format!("unsupported {caps}")),
        },
        "audio/x-opus" => audio(Codec::Opus { bitrate: 0 }, stream_headers(s)),
        "audio/x-vorbis" => audio(Codec::Vorbis, stream_headers(s)),
        "audio/x-flac" => audio(Codec::Flac, stream_headers(s)),
        other => Err(format!("melange does not forward {other}")),
    }
}

/// The caps that decode an announced stream (the host's side of [`announce`]).
pub fn decoder_caps(media: &MediaKind, codec: &Codec, codec_data: &[u8]) -> Result<gst::Caps, String> {
    let buffer = |bytes: &[u8]| gst::Buffer::from_slice(bytes.to_vec());
    let headers = || -> Result<gst::Array, String> {
        let parts = split_headers(codec_data).ok_or("malformed stream headers in the codec data")?;
        Ok(gst::Array::new(parts.into_iter().map(|p| buffer(p).to_send_value())))
    };
    let mut caps = match codec {
        Codec::H264 | Codec::H265 => {
            let (name, packed) =
                if matches!(codec, Codec::H264) { ("video/x-h264", "avc") } else { ("video/x-h265", "hvc1") };
            let b = gst::Caps::builder(name).field("alignment", "au");
            if codec_data.is_empty() {
                b.field("stream-format", "byte-stream").build()
            } else {
                b.field("stream-format", packed).field("codec_data", buffer(codec_data)).build()
            }
        }
        Codec::Vp8 => gst::Caps::builder("video/x-vp8").build(),
        Codec::Vp9 => gst::Caps::builder("video/x-vp9").build(),
        Codec::Av1 => {
            let b = gst::Caps::builder("video/x-av1").field("stream-format", "obu-stream").field("alignment", "tu");
            if codec_data.is_empty() {
                b.build()
            } else {
                b.field("codec_data", buffer(codec_data)).build()
            }
        }
        Codec::Mp3 => gst::Caps::builder("audio/mpeg")
            .field("mpegversion", 1i32)
            .field("layer", 3i32)
            .field("parsed", true)
            .build(),
        Codec::Aac => {
            if codec_data.is_empty() {
                return Err("AAC without its AudioSpecificConfig".into());
            }
            gst::Caps::builder("audio/mpeg")
                .field("mpegversion", 4i32)
                .field("stream-format", "raw")
                .field("framed", true)
                .field("codec_data", buffer(codec_data))
                .build()
        }
        Codec::Opus { .. } if codec_data.is_empty() => {
            gst::Caps::builder("audio/x-opus").field("channel-mapping-family", 0i32).build()
        }
        Codec::Opus { .. } => {
            let parts = split_headers(codec_data).ok_or("malformed stream headers in the codec data")?;
            let head = parts.first().copied().unwrap_or_default();
            let mut b = gst::Caps::builder("audio/x-opus").field("streamheader", headers()?);
            // OpusHead (RFC 7845 5.1): the mapping family at byte 18, then for families
            // other than 0 the stream and coupled counts and the channel mapping.
            match head.get(18).copied() {
                None | Some(0) => b = b.field("channel-mapping-family", 0i32),
                Some(family) => {
                    let channels = usize::from(*head.get(9).ok_or("a short OpusHead")?);
                    let (streams, coupled) =
                        (head.get(19).ok_or("a short OpusHead")?, head.get(20).ok_or("a short OpusHead")?);
                    let mapping = head.get(21..21 + channels).ok_or("a short OpusHead")?;
                    b = b
                        .field("channel-mapping-family", i32::from(family))
                        .field("stream-count", i32::from(*streams))
                        .field("coupled-count", i32::from(*coupled))
                        .field("channel-mapping", gst::Array::new(mapping.iter().map(|&m| i32::from(m))));
                }
            }
            b.build()
        }
        Codec::Vorbis => gst::Caps::builder("audio/x-vorbis").field("streamheader", headers()?).build(),
        Codec::Flac => {
            gst::Caps::builder("audio/x-flac").field("framed", true).field("streamheader", headers()?).build()
        }
        Codec::PcmS16Le => return Err("PCM is not an encoded stream".into()),
        Codec::RawI420 => return Err("raw video is not an encoded stream".into()),
    };
    let Some(s) = caps.make_mut().structure_mut(0) else { return Err("empty caps".into()) };
    match media {
        MediaKind::EncodedVideo(v) | MediaKind::Camera(v) => {
            if v.width > 0 && v.height > 0 {
                s.set("width", v.width.min(i32::MAX as u32) as i32);
                s.set("height", v.height.min(i32::MAX as u32) as i32);
            }
            if v.framerate_num > 0 && v.framerate_den > 0 {
                s.set(
                    "framerate",
                    gst::Fraction::new(
                        v.framerate_num.min(i32::MAX as u32) as i32,
                        v.framerate_den.min(i32::MAX as u32) as i32,
                    ),
                );
            }
        }
        MediaKind::EncodedAudio(a) | MediaKind::Audio(a) => {
            s.set("rate", a.rate.min(i32::MAX as u32) as i32);
            s.set("channels", i32::from(a.channels));
        }
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn init() {
        gst::init().unwrap();
    }

    #[test]
    fn offers_only_what_the_host_decodes() {
        init();
        assert!(offered(Kind::Video, 0).is_empty());
        assert!(offered(Kind::Video, codec_bits::AAC | codec_bits::OPUS).is_empty());
        let vp = offered(Kind::Video, codec_bits::VP8 | codec_bits::VP9);
        assert!(vp.can_intersect(&gst::Caps::builder("video/x-vp9").build()));
        assert!(!vp.can_intersect(&gst::Caps::builder("video/x-h264").build()));
        // Raw video never matches: autovideosink and friends never pick a Melange sink.
        assert!(!template(Kind::Video).can_intersect(&gst::Caps::builder("video/x-raw").build()));
        assert!(!template(Kind::Audio).can_intersect(&gst::Caps::builder("audio/x-raw").build()));
    }

    /// Without a codec's profile bit, a stream that names another profile is not
    /// taken (the player decodes it locally); one that names none is.
    #[test]
    fn offers_only_the_profiles_the_host_decodes() {
        init();
        let stream = |name: &str, profile: Option<&str>| {
            let mut b = gst::Caps::builder(name);
            if name == "video/x-h264" {
                b = b.field("stream-format", "avc").field("alignment", "au");
            }
            match profile {
                Some(p) => b.field("profile", p).build(),
                None => b.build(),
            }
        };
        use codec_bits::*;
        let cases = [
            ("video/x-h264", H264, H264_HIGH_PROFILES, "high", "high-4:4:4"),
            ("video/x-vp9", VP9, VP9_HIGH_PROFILES, "0", "2"),
        ];
        for (name, codec, profiles, common, high) in cases {
            let common_only = offered(Kind::Video, codec);
            assert!(common_only.can_intersect(&stream(name, Some(common))), "{name} {common}");
            assert!(!common_only.can_intersect(&stream(name, Some(high))), "{name} {high}");
            assert!(common_only.can_intersect(&stream(name, None)), "{name} without a profile");
            let all = offered(Kind::Video, codec | profiles);
            assert!(all.can_intersect(&stream(name, Some(high))), "{name} {high} with its bit");
            assert!(all.can_intersect(&stream(name, Some(common))), "{name} {common} with its bit");
        }
        // Every profile either is common or comes with the bit, never both.
        for &bit in codecs(Kind::Video) {
            assert!(common_profiles(bit).iter().all(|p| !high_profiles(bit).contains(p)));
            assert_eq!(common_profiles(bit).is_empty(), codec_bits::profiles_of(bit) == 0);
        }
    }

    #[test]
    fn announced_streams_decode_with_the_same_setup() {
        init();
        let avcc = vec![1, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x64, 0, 0x1f];
        let caps = gst::Caps::builder("video/x-h264")
            .field("stream-format", "avc")
            .field("alignment", "au")
            .field("width", 1280i32)
            .field("height", 720i32)
            .field("framerate", gst::Fraction::new(30000, 1001))
            .field("codec_data", gst::Buffer::from_slice(avcc.clone()))
            .build();
        let a = announce(&caps).unwrap();
        assert_eq!(a.codec, Codec::H264);
        assert_eq!(a.codec_data, avcc);
        assert_eq!(
            a.media,
            MediaKind::EncodedVideo(VideoFormat {
                width: 1280,
                height: 720,
                framerate_num: 30000,
                framerate_den: 1001
            })
        );
        let back = decoder_caps(&a.media, &a.codec, &a.codec_data).unwrap();
        assert!(back.is_subset(&caps) && caps.is_subset(&back), "{back} vs {caps}");

        let headers = [vec![1u8, b'v', b'o', b'r'], vec![3, 4], vec![5; 300]];
        let array = gst::Array::new(headers.iter().map(|h| gst::Buffer::from_slice(h.clone()).to_send_value()));
        let caps = gst::Caps::builder("audio/x-vorbis")
            .field("rate", 44100i32)
            .field("channels", 2i32)
            .field("streamheader", array)
            .build();
        let a = announce(&caps).unwrap();
        assert_eq!(split_headers(&a.codec_data).unwrap(), headers.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let back = decoder_caps(&a.media, &a.codec, &a.codec_data).unwrap();
        assert!(back.is_subset(&caps), "{back} vs {caps}");
    }

    #[test]
    fn malformed_setup_data_is_an_error_not_a_panic() {
        init();
        let media = MediaKind::EncodedAudio(AudioFormat { rate: 48000, channels: 2, positions: vec![] });
        assert!(decoder_caps(&media, &Codec::Vorbis, &[0, 0, 0, 9, 1]).is_err());
        assert!(decoder_caps(&media, &Codec::Aac, &[]).is_err());
        assert!(split_headers(&[0, 0]).is_none());
        assert!(announce(&gst::Caps::builder("video/x-raw").build()).is_err());
        assert!(announce(&gst::Caps::builder("audio/mpeg").field("mpegversion", 4i32).build()).is_err());
    }
}
