//! A hostile guest. On the same connection as a genuine stream, a test client speaks
//! the protocol badly on purpose: maximum-size frame floods, one stream over the limit,
//! huge declared lengths, zero-length payloads, sequence jumps and wraps, time going
//! backwards, hostile Opus packets, unknown frame kinds, garbage, and a client that
//! never reads; then a handshake storm. melange-host must stay up within its memory and
//! CPU bounds, play the genuine stream bit-exact, conceal the packets a second, lossy
//! stream loses (silence exactly in their place, for PCM; a gap too long to conceal
//! skipped), give no hostile stream more concealment than the audio it really sent,
//! rate-limit its log per kind of error, and serve the next guest.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use melange_renderer::host::MAX_STREAMS;
use melange_shim::receive::MAX_CONCEAL_MS;
use melange_tests::audio;
use melange_tests::{cpu_seconds, proc_status_kib, reports, scratch, start_host, wait_until, wav_files, ScriptedGuest};
use melange_transport::frame::{crc16, encode_frame, FrameKind, MAX_PAYLOAD};
use melange_transport::message::{encode_control, Capabilities, Codec, Hello, Role};

#[test]
fn melange_host_survives_a_hostile_guest_and_keeps_the_genuine_stream_playing() {
    let dir = scratch("hostile");
    let sock = dir.join("port.sock");
    let wav = dir.join("wav");
    let mut host = start_host(
        &["--listen", &format!("unix:{}", sock.display()), "--output", &format!("wav:{}", wav.display())],
        None,
        &dir,
    );
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let pid = host.pid();
    let started = Instant::now();
    let cpu0 = cpu_seconds(pid);

    let mut g = ScriptedGuest::connect(&sock);
    // Stream 1 is genuine PCM; 2 (Opus) and 3 (PCM) are hostile; 4 is genuine PCM that
    // loses packets; the rest fill melange-host's limit, and one more is refused.
    g.open(1, 48000, 2, Codec::PcmS16Le, 480, "genuine");
    g.open(2, 48000, 2, Codec::Opus { bitrate: 64_000 }, 480, "hostile opus");
    g.open(3, 48000, 2, Codec::PcmS16Le, 480, "hostile pcm");
    g.open(4, 48000, 2, Codec::PcmS16Le, 480, "lossy");
    let limit = u32::from(MAX_STREAMS);
    for id in 5..=limit {
        g.open(id, 8000, 1, Codec::PcmS16Le, 480, "filler");
    }
    g.open(limit + 1, 48000, 2, Codec::PcmS16Le, 480, "one too many");

    let signal = audio::noise(300 * 960, 0.4, 7);
    let sent: Vec<i16> = signal.iter().map(|v| (v * 32767.0) as i16).collect();
    // Stream 4's packets that never leave: single losses, three in a row (both short
    // enough to conceal), and twelve in a row (120 ms, over MAX_CONCEAL_MS: skipped).
    let long_gap = 250..262u32;
    let lost = |seq: u32| seq % 50 == 25 || (140..143).contains(&seq) || long_gap.contains(&seq);
    let lossy: Vec<i16> = audio::noise(300 * 960, 0.4, 11).iter().map(|v| (v * 32767.0) as i16).collect();
    // What stream 4 must come out as: its packets, silence in place of each lost one
    // (PCM's concealment), nothing for the long gap.
    let mut lossy_expected: Vec<i16> = Vec::new();
    for (seq, chunk) in (0u32..).zip(lossy.chunks(960)) {
        match (lost(seq), long_gap.contains(&seq)) {
            (false, _) => lossy_expected.extend_from_slice(chunk),
            (true, false) => lossy_expected.extend(std::iter::repeat_n(0, chunk.len())),
            (true, true) => {}
        }
    }
    assert!(long_gap.len() as u64 * 10 > MAX_CONCEAL_MS, "the long gap must be too long to conceal");
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let big = vec![0x5Au8; MAX_PAYLOAD - 16];
    // The genuine stream at real time (a stream may deliver no faster), the attacks
    // between its packets as fast as they go.
    let paced = Instant::now();
    for (seq, chunk) in sent.chunks(960).enumerate() {
        if let Some(wait) = (paced + Duration::from_millis(10 * seq as u64)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let seq = seq as u32;
        let data: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
        g.media(1, seq, 1_000_000_000 + u64::from(seq) * 10_000_000, 480, data);
        if !lost(seq) {
            let data: Vec<u8> = lossy[seq as usize * 960..][..960].iter().flat_map(|s| s.to_le_bytes()).collect();
            g.media(4, seq, 1_000_000_000 + u64::from(seq) * 10_000_000, 480, data);
        }
        match seq % 8 {
            // Maximum-size frames, in a flood, for a stream that does not exist.
            0 => {
                for _ in 0..8 {
                    g.media(999, seq, 0, 480, big.clone());
                }
            }
            // Maximum-size PCM that does not match its claimed duration; hostile Opus.
            1 => {
                g.media(3, seq, 0, 480, big.clone());
                let junk: Vec<u8> = (0..(next() % 1200) as usize).map(|_| next() as u8).collect();
                g.media(2, seq, 0, 480, junk);
                g.media(2, seq, 0, 0, vec![0xFC, 0xFF, 0xFE]);
            }
            // A header that declares more than the limit (checked before buffering),
            // then garbage.
            2 => {
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(b"MLNG");
                h[4] = 1;
                h[5] = 0x20;
                h[8] = 1;
                h[12..14].copy_from_slice(&u16::MAX.to_le_bytes());
                let c = crc16(&h[..14]);
                h[14..16].copy_from_slice(&c.to_le_bytes());
                g.raw(&h);
                let garbage: Vec<u8> = (0..(next() % 3000) as usize).map(|_| next() as u8).collect();
                g.raw(&garbage);
            }
            // Zero-length payloads of every kind that has one.
            3 => {
                g.frame(FrameKind::StreamOpen, 0, 66, &[]);
                g.frame(FrameKind::Media, 0, 3, &[]);
                g.frame(FrameKind::Heartbeat, 0, 0, &[]);
                g.frame(FrameKind::StreamClose, 0, 77, &[]);
                g.frame(FrameKind::Welcome, 0, 0, &[]);
            }
            // Sequence jumps and wraps, time going backwards, absurd durations.
            4 => {
                let pcm = vec![0u8; 1920];
                for s in [u32::MAX - 1, u32::MAX, 0, 1, 1_000_000, 3, u32::MAX / 2 + 7] {
                    g.media(3, s, u64::MAX - u64::from(seq), 480, pcm.clone());
                }
                g.media(3, 9, 5, u32::MAX, pcm);
            }
            // Frame kinds from a "newer" peer: skipped; and stream ids 0 and reserved.
            5 => {
                g.frame(FrameKind::Unknown(0x7E), 0, 0, b"from the future");
                g.media(0, 0, 0, 480, vec![0; 1920]);
                g.frame(FrameKind::StreamOpen, 0, 1, &[0xFF; 40]);
            }
            _ => {}
        }
    }
    // A quiet second, so the close is not counted against the control-rate limit.
    std::thread::sleep(Duration::from_millis(1100));
    g.close(1, "genuine stream ends");
    g.close(4, "lossy stream ends");
    let closed = wait_until(Duration::from_secs(10), || {
        let reps = reports(&dir);
        let closed = |id: u32, app: &str| reps.iter().any(|r| r["stream"] == id && r["app"] == app);
        (closed(1, "genuine") && closed(4, "lossy")).then_some(())
    });
    assert!(closed.is_some(), "the genuine streams never closed:\n{}", host.log_text());

    // The genuine stream came out whole and bit-exact.
    let genuine = audio::read_wav(&wav.join("s1-stream1-genuine.wav")).expect("genuine WAV");
    assert_eq!(genuine.s16.as_deref(), Some(&sent[..]), "the genuine stream was damaged");
    let reps = reports(&dir);
    let r1 = reps.iter().find(|r| r["stream"] == 1).expect("report");
    assert_eq!(r1["lost_packets"], 0);
    assert_eq!(r1["bad_packets"], 0);
    // The lossy stream's lost packets were concealed: silence exactly in their place,
    // everything else bit-exact, and the long gap skipped, not filled.
    let short_losses = (0..300u32).filter(|s| lost(*s) && !long_gap.contains(s)).count();
    let r4 = reps.iter().find(|r| r["stream"] == 4).expect("report of the lossy stream");
    eprintln!(
        "lossy stream: {} packets lost, {} concealed ms, {} packets; {short_losses} short losses and a gap of {} sent",
        r4["lost_packets"],
        r4["concealed_ms"],
        r4["packets"],
        long_gap.len()
    );
    let lossy_out = audio::read_wav(&wav.join("s1-stream4-lossy.wav")).expect("lossy WAV");
    let lossy_out = lossy_out.s16.expect("PCM is stored as s16");
    assert_eq!(lossy_out.len(), lossy_expected.len(), "the lossy stream's length");
    if let Some(i) = lossy_out.iter().zip(&lossy_expected).position(|(a, b)| a != b) {
        panic!("the lossy stream differs at sample frame {} (packet {})", i / 2, i / 960);
    }
    assert_eq!(r4["lost_packets"].as_u64(), Some((short_losses + long_gap.len()) as u64));
    assert_eq!(r4["concealed_ms"].as_f64(), Some(short_losses as f64 * 10.0));
    // The stream over the limit was refused.
    assert!(!wav.join(format!("s1-stream{}-one_too_many.wav", limit + 1)).exists(), "a stream over the limit");
    assert!(host.log_text().contains("stream limit"), "{}", host.log_text());

    // Handshake storm: the session is closed and the connection dropped.
    for i in 0..25u64 {
        let hello = Hello {
            min_version: melange_transport::message::PROTOCOL_MIN,
            max_version: melange_transport::message::PROTOCOL_MAX,
            role: Role::Guest,
            software: "storm".into(),
            epoch: i,
            clock_id: String::new(),
            capabilities: Capabilities {
                codecs: 3,
                max_streams: melange_transport::message::MAX_STREAMS,
                kinds: melange_transport::message::kind_bits::AUDIO,
            },
        };
        let mut frame = Vec::new();
        encode_frame(&mut frame, FrameKind::Hello, 0, 0, &encode_control("hello", &hello).expect("encodes"))
            .expect("fits");
        // The host hangs up part way through the storm; later writes fail, as they should.
        let _ = g.sock.write_all(&frame);
    }
    let hung_up = wait_until(Duration::from_secs(5), || {
        let mut buf = [0u8; 65536];
        match g.sock.read(&mut buf) {
            Ok(0) | Err(_) => Some(()),
            Ok(_) => None,
        }
    });
    assert!(hung_up.is_some(), "the host kept a storming guest");
    assert!(host.log_text().contains("handshake storm"), "{}", host.log_text());

    // The host is still there, idle, and serves the next guest.
    let cpu1 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu = cpu_seconds(pid) - cpu1;
    let mut next_guest = ScriptedGuest::connect(&sock);
    next_guest.open(1, 48000, 2, Codec::PcmS16Le, 480, "next guest");
    for seq in 0..20u32 {
        next_guest.media(1, seq, 0, 480, vec![1; 1920]);
    }
    next_guest.close(1, "done");
    let served =
        wait_until(Duration::from_secs(10), || reports(&dir).iter().any(|r| r["app"] == "next guest").then_some(()));
    assert!(served.is_some(), "the host did not serve the next guest:\n{}", host.log_text());

    // No hostile stream got more concealment than the audio it really sent (closed with
    // their session by the storm): sequence jumps of up to 2^31 and refused packets
    // cannot make audio out of nothing. Its files hold exactly what its report counts.
    let reps = reports(&dir);
    for (id, name) in [(2u32, "hostile_opus"), (3, "hostile_pcm")] {
        let r = reps
            .iter()
            .find(|r| r["session"] == 1 && r["stream"] == id)
            .unwrap_or_else(|| panic!("no report of hostile stream {id}:\n{}", host.log_text()));
        let (all_ms, concealed_ms) = (r["media_seconds"].as_f64().unwrap_or(-1.0) * 1000.0, r["concealed_ms"].as_f64());
        let concealed_ms = concealed_ms.unwrap_or(f64::MAX);
        let decoded_ms = all_ms - concealed_ms;
        let file_ms: f64 = wav_files(&wav)
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("s1-stream{id}"))))
            .filter(|p| p.to_string_lossy().contains(name))
            .map(|p| audio::read_wav(p).map_or(0.0, |a| a.seconds() * 1000.0))
            .sum();
        eprintln!(
            "hostile stream {id}: {decoded_ms:.0} ms decoded, {concealed_ms:.0} ms concealed, {file_ms:.0} ms in its \
             file; {} packets, {} lost, {} bad, {} late",
            r["packets"], r["lost_packets"], r["bad_packets"], r["late_packets"]
        );
        assert!(concealed_ms <= decoded_ms, "stream {id}: {concealed_ms} ms concealed for {decoded_ms} ms decoded");
        assert!((file_ms - all_ms).abs() < 0.5, "stream {id}: {file_ms} ms in its files, {all_ms} ms reported");
    }

    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let peak_kib = proc_status_kib(pid, "VmHWM:");
    host.stop();
    let log = std::fs::read_to_string(dir.join("host.log")).unwrap_or_default();
    eprintln!("hostile: {wall:.1} s, host cpu {cpu:.2} s, idle cpu {idle_cpu:.3} s/s, peak RSS {} KiB", peak_kib);
    assert!(!log.contains("panicked"), "melange-host panicked:\n{log}");
    assert!(peak_kib > 0 && peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    assert!(cpu < wall, "host used {cpu:.2} s of CPU in {wall:.2} s");
    assert!(idle_cpu < 0.05, "host spins when idle: {idle_cpu} s of CPU in 1 s");
    // Each kind of bad input is logged once, then at most every 5 s.
    let kinds =
        ["bad frame", "malformed message", "unknown stream", "bad packet", "unknown frame kind", "stream limit"];
    let allowed = 2 + (wall / 5.0).ceil() as usize;
    for kind in kinds {
        let n = log.matches(&format!("melange-host: {kind}:")).count();
        assert!(n >= 1, "no {kind:?} logged:\n{log}");
        assert!(n <= allowed, "{kind:?} logged {n} times in {wall:.1} s");
    }
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings < 60, "{warnings} warnings: the log is flooded:\n{log}");
}
