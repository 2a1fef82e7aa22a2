//! Protocol v2 end to end: a player's stub (`melange-media-stub`) sends an encoded video
//! stream through the real guest module's media broker, over the port next to the taps,
//! to a real melange-host that writes what arrives (`--video-output frames:DIR`).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use melange_tests::{scratch, serial, start_guest, start_host, wait_until, GuestCodec, PipeWire, Redirected};
use melange_transport::frame::{encode_frame, FrameDecoder, FrameKind};
use serde_json::Value;

/// The broker's socket of a guest session.
fn media_sock(pw: &PipeWire) -> PathBuf {
    pw.dir.join("run/melange/media.sock")
}

/// Runs the stub against `pw`'s broker with `args`; its log goes to `log`.
fn stub(pw: &PipeWire, log: &Path, args: &[&str]) -> Output {
    let sock = media_sock(pw);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("the broker listens");
    pw.command(melange_tests::bin("melange-media-stub"))
        .arg("--socket")
        .arg(&sock)
        .arg("--log")
        .arg(log)
        .args(args)
        .output()
        .expect("the stub runs")
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The one `.jsonl` index melange-host wrote into `dir` for codec `codec`.
fn index(dir: &Path, codec: &str) -> PathBuf {
    let suffix = format!(".{codec}.jsonl");
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(&suffix))
        .collect();
    assert_eq!(found.len(), 1, "{found:?} in {}", dir.display());
    found[0].clone()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The fields both sides log of an access unit.
fn unit(v: &Value) -> (u64, u64, u64, u64, bool, bool) {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    let b = |k: &str| v[k].as_bool().unwrap_or_else(|| panic!("{k} in {v}"));
    (n("seq"), n("pts_ns"), n("size"), n("fnv"), b("keyframe"), b("discontinuity"))
}

/// 300 access units with 200 KB keyframes, joining late (a keyframe request) and
/// seeking half way (a flush): every byte and timestamp arrives, in order, with the
/// flush between the units before and after it. Sent at a player's pace (60 frames a
/// second, 11 Mbit/s): faster than the port takes, late video is dropped by design.
#[test]
fn a_stubs_video_arrives_whole_and_in_order_through_the_broker() {
    let _serial = serial();
    let dir = scratch("media-stream");
    let frames = dir.join("frames");
    let video_output = format!("frames:{}", frames.display());
    let rig = Redirected::start_with_host_args(&dir, GuestCodec::Opus(128_000), &["--video-output", &video_output]);
    let log = dir.join("stub.jsonl");
    let out =
        stub(&rig.guest_pw, &log, &["--units", "300", "--late", "5", "--seek-at", "150", "--realtime", "--fps", "60"]);
    assert!(out.status.success(), "stub: {}\n{}", String::from_utf8_lossy(&out.stderr), rig.guest.log_text());
    let sent = json_lines(&log);
    let index_path = index(&frames, "h264");
    wait_until(Duration::from_secs(10), || json_lines(&index_path).iter().any(|l| l["event"] == "close").then_some(()))
        .unwrap_or_else(|| panic!("the stream did not close on the host:\n{}", rig.host.log_text()));
    let got = json_lines(&index_path);

    // The stream's opening: kind, codec, codec data.
    assert_eq!(got[0]["event"], "open");
    assert_eq!((got[0]["kind"].as_str(), got[0]["codec"].as_str()), (Some("video"), Some("h264")));
    assert_eq!(got[0]["codec_data"], "016400 1fffe1000467 64001f".replace(' ', ""));

    // Every unit the stub sent, in order, with its timestamps and bytes.
    let sent_units: Vec<_> = sent.iter().filter(|l| l["event"] == "au" && l["sent"] == true).map(unit).collect();
    let got_units: Vec<_> = got.iter().filter(|l| l["event"] == "au").map(unit).collect();
    assert_eq!(sent_units.len(), 300, "the stub's queue dropped units");
    assert_eq!(got_units, sent_units);
    let bin = std::fs::read(index_path.with_extension("").with_extension("h264.bin")).expect("the .bin file");
    for l in got.iter().filter(|l| l["event"] == "au") {
        let (off, size) = (l["offset"].as_u64().unwrap() as usize, l["size"].as_u64().unwrap() as usize);
        assert_eq!(fnv1a(&bin[off..off + size]), l["fnv"].as_u64().unwrap(), "unit {}", l["seq"]);
    }

    // Joined late: the host asked for a keyframe, and got one before the first regular one.
    let request = sent.iter().find(|l| l["event"] == "keyframe-request").expect("a keyframe request");
    let first_key = got_units.iter().find(|u| u.4).expect("a keyframe").0;
    assert!(first_key < 60 && first_key >= request["before"].as_u64().unwrap(), "{request} then {first_key}");

    // The seek: a flush between 149 and 150, and 150 a keyframe marking a discontinuity.
    let order: Vec<String> = got
        .iter()
        .filter_map(|l| match l["event"].as_str() {
            Some("au") => Some(l["seq"].to_string()),
            Some(other) => Some(other.to_string()),
            None => None,
        })
        .collect();
    let flush = order.iter().position(|e| e == "flush").expect("the flush arrived");
    assert_eq!((order[flush - 1].as_str(), order[flush + 1].as_str()), ("149", "150"), "{order:?}");
    assert!(got_units[150].4 && got_units[150].5, "{:?}", got_units[150]);
    assert!(order.ends_with(&["eos".into(), "close".into()]), "{order:?}");
    let host_log = rig.host.log_text();
    assert!(host_log.contains("stream") && host_log.contains("encoded video h264"), "{host_log}");
}

/// No host: a stub is told at once (well under a second), so its player decodes.
#[test]
fn without_a_host_a_stub_is_told_at_once() {
    let _serial = serial();
    let dir = scratch("media-no-host");
    let pw = PipeWire::start(&dir.join("guest"));
    let port = format!("unix:{}", dir.join("nobody.sock").display());
    let guest = start_guest(&pw, &port, GuestCodec::Opus(128_000), dir.join("guest.log"));
    let started = Instant::now();
    let out = stub(&pw, &dir.join("stub.jsonl"), &["--units", "10"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no melange-host is connected"), "{stderr}");
    assert!(took < Duration::from_secs(1), "told after {took:?}");
    drop(guest);
}

/// A codec the host does not take is never offered (the handshake says what it takes),
/// and one it cannot open after all is refused per stream with the host's reason; the
/// stub sees both, and the session goes on.
#[test]
fn a_codec_the_host_lacks_is_refused_with_a_reason_the_stub_sees() {
    let _serial = serial();
    let dir = scratch("media-codec");
    let rig = Redirected::start_with_host_args(
        &dir,
        GuestCodec::Opus(128_000),
        &["--video-output", "null", "--video-codecs", "vp8,vp9,vorbis"],
    );
    let out = stub(&rig.guest_pw, &dir.join("stub.jsonl"), &["--units", "30", "--codec", "h264"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("does not take encoded video h264"), "{stderr}");
    // Vorbis is taken, but the stub's setup data is no Vorbis headers: the host
    // refuses that stream with its reason.
    let log = dir.join("stub-vorbis.jsonl");
    let out = stub(
        &rig.guest_pw,
        &log,
        &["--units", "300", "--codec", "vorbis", "--delta-bytes", "300", "--realtime", "--fps", "50"],
    );
    // The broker's socket is the user's alone.
    let mode = std::fs::metadata(media_sock(&rig.guest_pw)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "media.sock mode {mode:o}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("malformed"), "{stderr}");
    assert!(rig.host.log_text().contains("refusing stream"), "{}", rig.host.log_text());
    let ok = stub(&rig.guest_pw, &dir.join("stub2.jsonl"), &["--units", "30", "--codec", "vp8"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

/// Garbage, a frame that announces 8 MiB and a stub that stops reading cost the broker
/// nothing: a well-behaved stub after them gets through whole.
#[test]
fn garbage_on_the_broker_socket_harms_nobody() {
    let _serial = serial();
    let dir = scratch("media-garbage");
    let frames = dir.join("frames");
    let video_output = format!("frames:{}", frames.display());
    let rig = Redirected::start_with_host_args(&dir, GuestCodec::Opus(128_000), &["--video-output", &video_output]);
    let sock = media_sock(&rig.guest_pw);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("the broker listens");
    let mut noise = UnixStream::connect(&sock).unwrap();
    let mut x = 0x1234_5678u32;
    let garbage: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let _ = noise.write_all(&garbage);
    let mut big = Vec::new();
    encode_frame(&mut big, FrameKind::AuStart, 0, 1, &[0xFF; 64]).unwrap();
    let _ = noise.write_all(&big);
    // A second stub connects and never reads.
    let _mute = UnixStream::connect(&sock).unwrap();
    let log = dir.join("stub.jsonl");
    let out = stub(&rig.guest_pw, &log, &["--units", "40", "--gop", "10", "--realtime", "--fps", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index_path = index(&frames, "h264");
    wait_until(Duration::from_secs(10), || json_lines(&index_path).iter().any(|l| l["event"] == "close").then_some(()))
        .expect("the stream closed");
    let got = json_lines(&index_path).iter().filter(|l| l["event"] == "au").count();
    assert_eq!(got, 40);
    assert!(!rig.guest.log_text().contains("panicked"));
}

/// A protocol v1 guest is refused with one line that names both versions, on both ends.
#[test]
fn a_v1_guest_is_refused_with_both_versions_named() {
    let _serial = serial();
    let dir = scratch("media-v1");
    let sock = dir.join("port.sock");
    let listen = format!("unix:{}", sock.display());
    let mut host = start_host(&["--listen", &listen, "--output", "null"], None, &dir);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A v1 hello: versions 1..=1, role guest, "v1", epoch 1, no clock, caps (3, 64).
    let mut hello = Vec::new();
    encode_frame(&mut hello, FrameKind::Hello, 0, 0, &[1, 1, 0, 2, b'v', b'1', 1, 0, 3, 64]).unwrap();
    s.write_all(&hello).unwrap();
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    let refuse = loop {
        let n = s.read(&mut buf).expect("an answer");
        assert!(n > 0, "closed without a reason");
        dec.push(&buf[..n]);
        if let Ok(Some(f)) = dec.next_frame() {
            break f;
        }
    };
    assert_eq!(refuse.header.kind, FrameKind::Refuse);
    let text = String::from_utf8_lossy(&refuse.payload).into_owned();
    assert!(text.contains("1..=1") && text.contains("2..=2"), "{text}");
    host.stop();
    let log = host.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("1..=1") && l.contains("2..=2")).collect();
    assert_eq!(lines.len(), 1, "{log}");
}

/// `--output frames:DIR` puts everything in one directory: tapped audio as WAV files, a
/// player's encoded stream as `--video-output frames:DIR` writes it.
#[test]
fn output_frames_takes_audio_as_wav_and_video_as_frames() {
    use melange_transport::message::{au_flags, AccessUnit, AppInfo, Codec, MediaKind, StreamOpen, VideoFormat};
    let _serial = serial();
    let dir = scratch("media-output-frames");
    let sock = dir.join("port.sock");
    let out = dir.join("out");
    let (listen, output) = (format!("unix:{}", sock.display()), format!("frames:{}", out.display()));
    let mut host = start_host(&["--listen", &listen, "--output", &output], None, &dir);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let mut g = melange_tests::ScriptedGuest::connect(&sock);
    g.open(1, 48000, 2, Codec::PcmS16Le, 480, "tone");
    for seq in 0..10 {
        g.media(1, seq, 0, 480, vec![1; 1920]);
    }
    let open = StreamOpen {
        media: MediaKind::EncodedVideo(VideoFormat { width: 16, height: 16, framerate_num: 25, framerate_den: 1 }),
        codec: Codec::Vp8,
        frame_samples: 0,
        app: AppInfo { name: "clip".into(), ..AppInfo::default() },
        codec_data: Vec::new(),
    };
    g.session.open_stream(2, &open).expect("the host takes VP8");
    let au =
        AccessUnit { seq: 0, flags: au_flags::KEYFRAME, pts_ns: 5, dts_ns: 0, duration_ns: 40, data: vec![9; 50_000] };
    assert!(g.session.send_access_unit(2, &au).unwrap());
    g.session.close_stream(2, "done");
    loop {
        let bytes = g.session.pending_output().to_vec();
        if bytes.is_empty() {
            break;
        }
        g.session.consume_output(bytes.len());
        g.raw(&bytes);
    }
    g.close(1, "done");
    let closed = |p: &Path| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"event\":\"close\""));
    let index_path = wait_until(Duration::from_secs(10), || {
        std::fs::read_dir(&out)
            .ok()?
            .filter_map(|e| Some(e.ok()?.path()))
            .find(|p| p.to_string_lossy().ends_with(".vp8.jsonl") && closed(p))
    })
    .unwrap_or_else(|| panic!("no closed video index:\n{}", host.log_text()));
    let units: Vec<Value> = json_lines(&index_path).into_iter().filter(|l| l["event"] == "au").collect();
    assert_eq!(units.len(), 1);
    assert_eq!((units[0]["size"].as_u64(), units[0]["fnv"].as_u64()), (Some(50_000), Some(fnv1a(&[9; 50_000]))));
    host.stop();
    let wav = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|x| x == "wav"))
        .expect("the audio's WAV file");
    let got = melange_tests::audio::read_wav(&wav).expect("a valid WAV");
    assert_eq!(got.s16.as_deref().map(<[i16]>::len), Some(10 * 960));
}
