//! Access units (protocol v2) between two sessions: whole ones sent through the
//! guest's bulk queue, and raw `AuStart`/`AuData`/`StreamControl` frames of any size and
//! order, cut at random points. Never panics, and every access unit that comes out is
//! whole: as long as its header announced, within the receiver's limit.
//!
//! Input: ops of three bytes: what to do, and a 16-bit argument.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use melange_transport::frame::{encode_frame, FrameKind};
use melange_transport::message::{
    au_flags, codec_bits, kind_bits, AccessUnit, AppInfo, Capabilities, Codec, MediaKind, Role, StreamControl,
    StreamOpen, VideoFormat,
};
use melange_transport::session::{Event, Session, SessionConfig};

const LIMIT: usize = 1 << 20;

fn caps() -> Capabilities {
    Capabilities { codecs: codec_bits::ENCODED, max_streams: 8, kinds: kind_bits::ENCODED_VIDEO }
}

fn open() -> StreamOpen {
    StreamOpen {
        media: MediaKind::EncodedVideo(VideoFormat { width: 2, height: 2, framerate_num: 1, framerate_den: 1 }),
        codec: Codec::Vp9,
        frame_samples: 0,
        app: AppInfo::default(),
        codec_data: Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut g = Session::new(SessionConfig::new(Role::Guest, "g", caps()), now);
    let mut hc = SessionConfig::new(Role::Host, "h", caps());
    hc.max_access_unit = LIMIT;
    hc.max_reassembly = 2 * LIMIT;
    let mut h = Session::new(hc, now);
    let mut wire = Vec::new();
    let pump = |g: &mut Session, h: &mut Session, wire: &mut Vec<u8>, cut: usize| {
        loop {
            let out = g.pending_output().to_vec();
            if out.is_empty() {
                break;
            }
            g.consume_output(out.len());
            wire.extend_from_slice(&out);
        }
        let cut = cut.min(wire.len());
        h.handle_input(now, &wire[..cut]);
        h.handle_input(now, &wire[cut..]);
        wire.clear();
        let back = h.pending_output().to_vec();
        h.consume_output(back.len());
        g.handle_input(now, &back);
        while let Some(e) = h.poll_event() {
            if let Event::AccessUnit { au, .. } = e {
                assert!(au.data.len() <= LIMIT);
            }
        }
        while g.poll_event().is_some() {}
    };
    pump(&mut g, &mut h, &mut wire, 0);
    let _ = g.open_stream(1, &open());
    let mut seq = 0u32;
    for op in data.chunks_exact(3) {
        let arg = usize::from(u16::from_le_bytes([op[1], op[2]]));
        match op[0] % 6 {
            0 => {
                let au = AccessUnit {
                    seq,
                    flags: if arg & 1 == 0 { au_flags::KEYFRAME } else { 0 },
                    pts_ns: u64::from(seq),
                    dts_ns: 0,
                    duration_ns: 1,
                    data: vec![seq as u8; arg * 8],
                };
                seq += 1;
                let _ = g.send_access_unit(1, &au);
            }
            1 => {
                // A start announcing `arg * 64` bytes, carrying up to 300.
                let mut payload = Vec::new();
                AccessUnit { seq, flags: 0, pts_ns: 0, dts_ns: 0, duration_ns: 0, data: Vec::new() }
                    .encode_header(&mut payload);
                payload[32..36].copy_from_slice(&u32::try_from(arg * 64).unwrap_or(0).to_le_bytes());
                payload.extend(std::iter::repeat(7).take(arg % 300));
                let _ = encode_frame(&mut wire, FrameKind::AuStart, 0, u32::from(op[1] % 3), &payload);
            }
            2 => {
                let _ = encode_frame(&mut wire, FrameKind::AuData, 0, u32::from(op[1] % 3), &vec![9; arg % 16_000]);
            }
            3 => {
                let _ = encode_frame(&mut wire, FrameKind::StreamControl, 0, 1, &[op[1] % 7]);
            }
            4 => {
                let control = [StreamControl::Flush, StreamControl::Pause, StreamControl::EndOfStream][arg % 3];
                let _ = g.send_stream_control(1, control);
            }
            _ => {
                g.close_stream(1, "x");
                let _ = g.open_stream(1, &open());
            }
        }
        pump(&mut g, &mut h, &mut wire, arg);
    }
});
