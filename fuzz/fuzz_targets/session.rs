//! melange-host's whole receive path (session state machine, stream limits, decoders,
//! gap concealment, jitter accounting) fed a random mix of valid and invalid frames,
//! split at random points, with time moving forwards and backwards.
//!
//! Input: a sequence of ops. Each op's first byte picks what to append to the wire: a
//! valid hello, stream-open, media packet, close; a raw frame of any kind and flags; or
//! raw bytes; its next byte, how far time moves.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use melange_renderer::host::{Host, HostConfig};
use melange_renderer::output::NullOutput;
use melange_transport::frame::{encode_frame, FrameKind};
use melange_transport::message::{
    encode_control, kind_bits, AppInfo, AudioFormat, Capabilities, Codec, Hello, MediaKind, MediaPacket, Role,
    StreamEnd, StreamOpen, VideoFormat,
};

fn frame(out: &mut Vec<u8>, kind: FrameKind, stream: u32, payload: &[u8]) {
    let _ = encode_frame(out, kind, 0, stream, payload);
}

/// A host as the fuzzer drives it: a fixed target, no files, no microphone.
fn new_host(t0: Instant) -> Host {
    let config = HostConfig {
        latency: Some(Duration::from_millis(30)),
        mic: melange_renderer::mic::MicSpec::None,
        ..HostConfig::default()
    };
    Host::new(config, Box::new(NullOutput), (t0, 0))
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut host = new_host(t0);
    let mut now = t0 + Duration::from_secs(1000);
    let mut ops = data;
    while let [op, arg, rest @ ..] = ops {
        // Ops that carry bytes consume them; the next op starts after them.
        let mut used = 0;
        let mut wire = Vec::new();
        let stream = u32::from(*arg % 8);
        match op % 8 {
            0 => {
                let hello = Hello {
                    min_version: 1 + (arg & 1),
                    max_version: 2,
                    role: if arg & 2 == 0 { Role::Guest } else { Role::Host },
                    software: "fuzz".into(),
                    epoch: u64::from(*arg),
                    clock_id: String::new(),
                    capabilities: Capabilities { codecs: 3, max_streams: 64, kinds: kind_bits::AUDIO },
                };
                frame(&mut wire, FrameKind::Hello, 0, &encode_control("hello", &hello).unwrap_or_default());
            }
            1 => {
                let (rate, channels) = [(48000, 2), (44100, 1), (8000, 1), (0, 0), (48000, 9)][usize::from(arg % 5)];
                let format = AudioFormat { rate, channels, positions: vec![3; usize::from(channels)] };
                let media = match arg % 3 {
                    // A player's stream (v2): access units through the raw-frame ops.
                    2 => MediaKind::EncodedVideo(VideoFormat { width: 64, height: 64, framerate_num: 30, framerate_den: 1 }),
                    _ => MediaKind::Audio(format),
                };
                let open = StreamOpen {
                    media,
                    codec: if arg & 8 == 0 { Codec::PcmS16Le } else { Codec::Opus { bitrate: 64_000 } },
                    frame_samples: rate / 100,
                    app: AppInfo { name: "fuzz\0app".into(), ..Default::default() },
                    codec_data: Vec::new(),
                };
                frame(
                    &mut wire,
                    FrameKind::StreamOpen,
                    stream,
                    &encode_control("stream-open", &open).unwrap_or_default(),
                );
            }
            2 | 3 => {
                let len = (usize::from(rest.first().copied().unwrap_or(0)) * 16).min(rest.len().saturating_sub(1));
                let body = rest.get(1..1 + len).unwrap_or_default().to_vec();
                used = (1 + len).min(rest.len());
                let seq = u32::from(*arg) * 0x0101_0101;
                let packet =
                    MediaPacket { seq, pts_ns: u64::from(*arg) << 30, duration: u32::from(*arg) * 10, data: body };
                let mut payload = Vec::new();
                packet.encode_into(&mut payload);
                frame(&mut wire, FrameKind::Media, stream, &payload);
            }
            4 => {
                let end = StreamEnd { reason: "fuzz".into() };
                frame(
                    &mut wire,
                    FrameKind::StreamClose,
                    stream,
                    &encode_control("stream-close", &end).unwrap_or_default(),
                );
            }
            5 => {
                let n = usize::from(*arg).min(rest.len());
                let _ = encode_frame(&mut wire, FrameKind::from_byte(*arg), *arg, stream, &rest[..n]);
                used = n;
            }
            _ => {
                let n = usize::from(*arg).min(rest.len());
                wire.extend_from_slice(&rest[..n]);
                used = n;
            }
        }
        // Time mostly moves forward; sometimes it jumps far, or backwards.
        now = match arg % 16 {
            0 => now + Duration::from_secs(10),
            1 => now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
            _ => now + Duration::from_millis(u64::from(*arg)),
        };
        let split = usize::from(*op).min(wire.len());
        for part in [&wire[..split], &wire[split..]] {
            if !host.receive(now, part) {
                // Session closed: a new connection starts the next one.
                host = new_host(t0);
            }
        }
        let _ = host.take_output();
        ops = &rest[used..];
    }
});
