//! Golden bytes: one whole frame of every kind, pinned. A reordered serde field, a
//! changed enum index or a changed header fails here; such a change is a new protocol
//! version (docs/protocol.md), never a silent edit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use melange_transport::frame::{encode_frame, FrameDecoder, FrameKind};
use melange_transport::message::{
    au_flags, encode_control, AccessUnit, AppInfo, AudioFormat, Capabilities, CaptureDemand, CaptureDevice, Codec,
    Geometry, Heartbeat, Hello, MediaKind, MediaPacket, Reason, Role, StreamControl, StreamEnd, StreamLatency,
    StreamOpen, VideoFormat, Volume, Welcome,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn frame(kind: FrameKind, stream: u32, payload: &[u8]) -> String {
    let mut out = Vec::new();
    encode_frame(&mut out, kind, 0, stream, payload).unwrap();
    // Every golden frame must also decode back to itself.
    let mut dec = FrameDecoder::new();
    dec.push(&out);
    let f = dec.next_frame().unwrap().unwrap();
    assert_eq!((f.header.kind, f.header.stream, &f.payload[..]), (kind, stream, payload));
    hex(&out)
}

fn caps() -> Capabilities {
    Capabilities { codecs: 3, max_streams: 64, kinds: melange_transport::message::kind_bits::AUDIO }
}

#[test]
fn every_frame_kind_is_pinned() {
    let hello = Hello {
        min_version: 2,
        max_version: 2,
        role: Role::Guest,
        software: "g".into(),
        epoch: 0x1234,
        clock_id: "c".into(),
        capabilities: caps(),
    };
    let welcome =
        Welcome { version: 2, software: "h".into(), epoch: 0x1234, clock_id: "c".into(), capabilities: caps() };
    let open = StreamOpen {
        media: MediaKind::Audio(AudioFormat { rate: 44100, channels: 1, positions: vec![2] }),
        codec: Codec::PcmS16Le,
        frame_samples: 441,
        app: AppInfo {
            name: "a".into(),
            role: "r".into(),
            binary: "b".into(),
            icon_name: "i".into(),
            media_name: "m".into(),
        },
        codec_data: Vec::new(),
    };
    let media = {
        let mut p = Vec::new();
        MediaPacket { seq: 0x0102_0304, pts_ns: 0x1122_3344_5566_7788, duration: 480, data: vec![0xAA, 0xBB] }
            .encode_into(&mut p);
        p
    };
    let video = StreamOpen {
        media: MediaKind::EncodedVideo(VideoFormat { width: 640, height: 360, framerate_num: 30, framerate_den: 1 }),
        codec: Codec::Vp8,
        frame_samples: 0,
        app: AppInfo { name: "t".into(), ..AppInfo::default() },
        codec_data: vec![0xCD],
    };
    let au = AccessUnit {
        seq: 3,
        flags: au_flags::KEYFRAME,
        pts_ns: 1_000_000_000,
        dts_ns: 0,
        duration_ns: 33_333_333,
        data: vec![0x10, 0x20, 0x30],
    };
    // An access unit of 3 bytes sent as a start with 2 and data with 1.
    let au_start = {
        let mut p = Vec::new();
        au.encode_header(&mut p);
        p.extend_from_slice(&au.data[..2]);
        p
    };
    let cases: [(&str, FrameKind, u32, Vec<u8>, &str); 17] = [
        (
            "hello",
            FrameKind::Hello,
            0,
            encode_control("hello", &hello).unwrap(),
            "4d4c4e4701010000000000000c00e8da0202000167b4240163034001",
        ),
        (
            "welcome",
            FrameKind::Welcome,
            0,
            encode_control("welcome", &welcome).unwrap(),
            "4d4c4e4701020000000000000a000a5d020168b4240163034001",
        ),
        (
            "refuse",
            FrameKind::Refuse,
            0,
            encode_control("refuse", &Reason { text: "no".into() }).unwrap(),
            "4d4c4e4701030000000000000300b10c026e6f",
        ),
        (
            "heartbeat",
            FrameKind::Heartbeat,
            0,
            encode_control(
                "heartbeat",
                &Heartbeat { sent_ns: 1_000_000_000, echo_ns: 999_000_000, echo_hold_ns: 250_000_000 },
            )
            .unwrap(),
            "4d4c4e4701040000000000000e0046cb8094ebdc03c08faedc0380e59a77",
        ),
        (
            "goodbye",
            FrameKind::Goodbye,
            0,
            encode_control("goodbye", &Reason { text: "bye".into() }).unwrap(),
            "4d4c4e4701050000000000000400aecf03627965",
        ),
        (
            "stream-open",
            FrameKind::StreamOpen,
            7,
            encode_control("stream-open", &open).unwrap(),
            "4d4c4e47011000000700000015009f1300c4d80201010200b9030161017201620169016d00",
        ),
        (
            "stream-close",
            FrameKind::StreamClose,
            7,
            encode_control("stream-close", &StreamEnd { reason: "s".into() }).unwrap(),
            "4d4c4e470111000007000000020058620173",
        ),
        (
            "stream-reject",
            FrameKind::StreamReject,
            7,
            encode_control("stream-reject", &StreamEnd { reason: "r".into() }).unwrap(),
            "4d4c4e47011200000700000002001c4f0172",
        ),
        (
            "stream-latency",
            FrameKind::StreamLatency,
            7,
            encode_control("stream-latency", &StreamLatency { render_ns: 12_500_000 }).unwrap(),
            "4d4c4e4701130000070000000400990ea0f8fa05",
        ),
        (
            "capture-demand",
            FrameKind::CaptureDemand,
            0,
            encode_control(
                "capture-demand",
                &CaptureDemand { device: CaptureDevice::Microphone, active: true, frame_us: 10_000 },
            )
            .unwrap(),
            "4d4c4e470114000000000000040073770001904e",
        ),
        (
            "volume",
            FrameKind::Volume,
            0,
            encode_control("volume", &Volume { channels: vec![0.5, 1.0], mute: true }).unwrap(),
            "4d4c4e4701150000000000000a005fbf020000003f0000803f01",
        ),
        ("media", FrameKind::Media, 7, media, "4d4c4e47012000000700000012000a7e040302018877665544332211e0010000aabb"),
        (
            "stream-open video",
            FrameKind::StreamOpen,
            9,
            encode_control("stream-open", &video).unwrap(),
            "4d4c4e4701100000090000001100f85f028005e8021e01080001740000000001cd",
        ),
        (
            "stream-control",
            FrameKind::StreamControl,
            9,
            encode_control("stream-control", &StreamControl::KeyframeRequest).unwrap(),
            "4d4c4e4701160000090000000100030604",
        ),
        (
            "stream-control geometry",
            FrameKind::StreamControl,
            9,
            encode_control(
                "stream-control",
                &StreamControl::Geometry(Geometry { x: -8, y: 40, width: 1280, height: 720 }),
            )
            .unwrap(),
            "4d4c4e4701160000090000000700a5ac050f50800ad005",
        ),
        (
            "au-start",
            FrameKind::AuStart,
            9,
            au_start,
            "4d4c4e4701210000090000002600dbdc030000000100000000ca9a3b00000000000000000000000055a0fc0100000000030000001020",
        ),
        ("au-data", FrameKind::AuData, 9, vec![0x30], "4d4c4e4701220000090000000100ee6e30"),
    ];
    let mut wrong = Vec::new();
    for (name, kind, stream, payload, want) in cases {
        let got = frame(kind, stream, &payload);
        if got != want {
            wrong.push(format!("{name}: got {got}\n{:>width$}want {want}", "", width = name.len() + 2));
        }
    }
    assert!(wrong.is_empty(), "wire encoding changed:\n{}", wrong.join("\n"));
}
