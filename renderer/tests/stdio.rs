//! `melange-host --stdio` against an in-process guest session: the host's parser,
//! decoder and WAV output with no PipeWire anywhere, over a real pipe.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use melange_transport::message::{
    codec_bits, AppInfo, AudioFormat, Capabilities, Codec, MediaKind, MediaPacket, Role, StreamOpen,
};
use melange_transport::session::{Event, Session, SessionConfig};

#[test]
fn stdio_session_renders_pcm_bit_exact_and_ends_at_end_of_input() {
    let dir = std::env::temp_dir().join(format!("melange-stdio-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut host = Command::new(env!("CARGO_BIN_EXE_melange-host"))
        .args(["--stdio", "--allow-root", "--output"])
        .arg(format!("wav:{}", dir.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("melange-host runs");
    let mut to_host = host.stdin.take().expect("stdin");
    let mut from_host = host.stdout.take().expect("stdout");

    let now = Instant::now();
    let mut guest = Session::new(
        SessionConfig::new(
            Role::Guest,
            "stdio-test",
            Capabilities {
                codecs: codec_bits::PCM_S16LE,
                max_streams: 4,
                kinds: melange_transport::message::kind_bits::AUDIO,
            },
        ),
        now,
    );
    to_host.write_all(guest.pending_output()).expect("hello");
    guest.consume_output(usize::MAX);
    let mut buf = [0u8; 4096];
    while !guest.is_established() {
        let n = from_host.read(&mut buf).expect("welcome");
        assert!(n > 0, "host closed before welcoming");
        guest.handle_input(now, &buf[..n]);
    }
    assert!(matches!(guest.poll_event(), Some(Event::Established(p)) if p.software.starts_with("melange-host")));

    let open = StreamOpen {
        media: MediaKind::Audio(AudioFormat { rate: 48000, channels: 2, positions: vec![3, 4] }),
        codec: Codec::PcmS16Le,
        frame_samples: 480,
        app: AppInfo { name: "stdio app".into(), ..Default::default() },
        codec_data: Vec::new(),
    };
    guest.open_stream(1, &open).expect("open");
    let mut sent = Vec::new();
    for seq in 0..50u32 {
        let samples: Vec<i16> = (0..960).map(|i| ((seq * 960 + i) as i16).wrapping_mul(37)).collect();
        sent.extend_from_slice(&samples);
        let data = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        guest
            .send_media(1, &MediaPacket { seq, pts_ns: u64::from(seq) * 10_000_000, duration: 480, data })
            .expect("media");
    }
    guest.close_stream(1, "done");
    to_host.write_all(guest.pending_output()).expect("stream");
    drop(to_host); // end of input ends the host

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = host.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "melange-host did not exit at end of input");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    host.stderr.take().expect("stderr").read_to_string(&mut log).expect("log");
    assert!(status.success(), "{log}");
    assert!(log.contains("stream 1 opened: \"stdio app\""), "{log}");
    assert!(log.contains("stream 1 closed (done)"), "{log}");

    let wav = std::fs::read(dir.join("s1-stream1-stdio_app.wav")).expect("WAV written");
    let got: Vec<i16> = wav[44..].chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    assert_eq!(got, sent);
    let _ = std::fs::remove_dir_all(&dir);
}
