//! A hostile guest that stays inside every protocol limit, against the real
//! melange-host: what it can make the host spend (CPU, memory, PipeWire objects, open
//! files, disk, log) and how long the host takes to stop is bounded, each bound
//! measured here and printed (`--nocapture`) for docs/security.md.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use melange_tests::{
    audio, cpu_seconds, fds_and_threads, proc_status_kib, reports, scratch, serial, signal, start_host, wait_until,
    PipeWire, Proc, ScriptedGuest,
};
use melange_transport::message::{AudioFormat, Codec, Volume};

/// melange-host listening on `dir/port.sock` with `args`.
fn host(dir: &Path, pw: Option<&PipeWire>, args: &[&str]) -> (Proc, std::path::PathBuf) {
    let sock = dir.join("port.sock");
    let listen = format!("unix:{}", sock.display());
    let all: Vec<&str> = ["--listen", &listen].into_iter().chain(args.iter().copied()).collect();
    let host = start_host(&all, pw, dir);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    (host, sock)
}

/// 10 ms of stereo s16 PCM, every sample `v`.
fn pcm(v: i16) -> Vec<u8> {
    std::iter::repeat_n(v.to_le_bytes(), 960).flatten().collect()
}

/// TOC 0xFB (CELT fullband, 20 ms frames, code 3) and a count of 6 empty frames: two
/// bytes that decode to 120 ms.
const AMPLIFIER: [u8; 2] = [0xFB, 0x06];

/// 2-byte Opus packets that each decode to 120 ms, as fast as the guest can send them,
/// for 3 s, next to a genuine PCM stream at real time: the flood's WAV grows at real
/// time at most, and the genuine stream arrives whole.
#[test]
fn an_amplifying_stream_gets_real_time_and_no_more() {
    let _serial = serial();
    let dir = scratch("bounds-amplify");
    let wav = dir.join("wav");
    let (mut host, sock) = host(&dir, None, &["--output", &format!("wav:{}", wav.display())]);
    let pid = host.pid();
    let mut g = ScriptedGuest::connect(&sock);
    g.open(1, 48000, 2, Codec::PcmS16Le, 480, "genuine");
    g.open(2, 48000, 2, Codec::Opus { bitrate: 64_000 }, 480, "amplifier");
    let (cpu0, started) = (cpu_seconds(pid), Instant::now());
    let (mut seq, mut sent) = (0u32, 0usize);
    for p in 0..300u32 {
        g.media(1, p, 0, 480, pcm(1000 + p as i16));
        let due = started + Duration::from_millis(10 * u64::from(p + 1));
        while Instant::now() < due {
            g.media(2, seq, 0, 5760, AMPLIFIER.to_vec());
            seq += 1;
            sent += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    g.close(1, "done");
    g.close(2, "done");
    wait_until(Duration::from_secs(10), || (reports(&dir).len() == 2).then_some(())).expect("both streams close");
    host.stop();
    let flood = std::fs::metadata(wav.join("s1-stream2-amplifier.wav")).expect("the flood's file").len();
    let wire = sent as f64 * (16.0 + 16.0 + 2.0);
    eprintln!(
        "amplification: {sent} packets ({:.2} MB on the wire) claiming {:.0} s of audio in {seconds:.1} s wrote \
         {:.2} MB of WAV ({:.2} MB/s); host CPU {:.0} % of a core",
        wire / 1e6,
        sent as f64 * 0.12,
        flood as f64 / 1e6,
        flood as f64 / 1e6 / seconds,
        100.0 * cpu / seconds
    );
    // Stereo float at 48 kHz: 384 000 bytes a second of real time, plus the burst a
    // new stream starts with.
    let start = melange_shim::receive::POOL_BURST + melange_shim::receive::MIN_START;
    let allowed = 384_000.0 * (seconds * 1.02 + start.as_secs_f64()) + 44.0;
    assert!((flood as f64) <= allowed, "the flood wrote {flood} bytes in {seconds:.1} s");
    let genuine = audio::read_wav(&wav.join("s1-stream1-genuine.wav")).expect("the genuine file");
    let want: Vec<i16> = (0..300).flat_map(|p| std::iter::repeat_n(1000 + p as i16, 960)).collect();
    assert_eq!(genuine.s16.as_deref(), Some(&want[..]), "the genuine stream was damaged");
    let report = reports(&dir).into_iter().find(|r| r["stream"] == 2).expect("report");
    assert!(report["over_budget_packets"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(host.log_text().contains("faster than real time"), "{}", host.log_text());
}

/// The same packets on streams opened and closed at the control limit (a new stream's
/// own budget is fresh): all of them together still get about real time.
#[test]
fn amplifying_streams_opened_and_closed_at_the_control_limit_share_real_time() {
    let _serial = serial();
    let dir = scratch("bounds-amplify-churn");
    let wav = dir.join("wav");
    let (mut host, sock) = host(&dir, None, &["--output", &format!("wav:{}", wav.display())]);
    let mut g = ScriptedGuest::connect(&sock);
    let started = Instant::now();
    let mut id = 1u32;
    while started.elapsed() < Duration::from_secs(3) {
        let second = Instant::now();
        // Two control frames a stream, under the limit of 200 a second.
        for _ in 0..90 {
            g.open(id, 48000, 2, Codec::Opus { bitrate: 64_000 }, 480, "amplifier");
            for seq in 0..9 {
                g.media(id, seq, 0, 5760, AMPLIFIER.to_vec());
            }
            g.close(id, "done");
            id += 1;
        }
        if let Some(rest) = Duration::from_millis(1100).checked_sub(second.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Every stream closes (each makes a report line).
    let closed = wait_until(Duration::from_secs(10), || (reports(&dir).len() as u32 >= id - 1).then_some(()));
    host.stop();
    assert!(closed.is_some(), "{} of {} streams closed:\n{}", reports(&dir).len(), id - 1, host.log_text());
    let audio: u64 =
        melange_tests::wav_files(&wav).iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len() - 44).sum();
    let audio_s = audio as f64 / 384_000.0;
    eprintln!(
        "amplification by churn: {} streams claiming {:.0} s of audio in {seconds:.1} s wrote {audio_s:.1} s of it",
        id - 1,
        f64::from(id - 1) * 9.0 * 0.12
    );
    // The pool's 2 s, a second a second, and each stream's first 20 ms.
    let most = 2.0 + seconds + f64::from(id - 1) * 0.02 + 1.0;
    assert!(audio_s <= most, "{audio_s:.1} s of audio written in {seconds:.1} s");
}

/// A restarted host, a reused stream id and a symlink where a file could go: no
/// recording is truncated or overwritten, nothing is written through the link, and
/// `--wav-max-bytes` caps what one run writes, with one line saying so.
#[test]
fn wav_files_are_never_overwritten_and_capped() {
    let _serial = serial();
    let dir = scratch("bounds-wav");
    let wav = dir.join("wav");
    std::fs::create_dir_all(&wav).expect("dir");
    std::fs::write(dir.join("victim"), b"keep me").expect("victim");
    let output = format!("wav:{}", wav.display());
    for (run, value) in [(1, 100i16), (2, 200)] {
        if run == 2 {
            // A link planted where the next name could go.
            std::os::unix::fs::symlink(dir.join("victim"), wav.join("s2-stream1-app.wav")).expect("symlink");
        }
        // A file costs 64 KiB besides its audio: 64 KiB of audio is left.
        let (mut host, sock) = host(&dir, None, &["--output", &output, "--wav-max-bytes", "128K"]);
        let mut g = ScriptedGuest::connect(&sock);
        g.open(1, 48000, 2, Codec::PcmS16Le, 480, "app");
        let start = Instant::now();
        for p in 0..50u32 {
            if let Some(w) = (start + Duration::from_millis(10 * u64::from(p))).checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            g.media(1, p, 0, 480, pcm(value));
        }
        g.close(1, "done");
        wait_until(Duration::from_secs(10), || (reports(&dir).len() == run).then_some(())).expect("closed");
        host.stop();
        let log = host.log_text();
        assert!(log.contains("reached --wav-max-bytes"), "run {run}: {log}");
    }
    assert_eq!(std::fs::read(dir.join("victim")).expect("victim"), b"keep me", "written through the symlink");
    let files = melange_tests::wav_files(&wav);
    let names: Vec<String> = files.iter().filter_map(|f| Some(f.file_name()?.to_string_lossy().into_owned())).collect();
    eprintln!("wav: {names:?}");
    for (name, value) in [("s1-stream1-app.wav", 100i16), ("s3-stream1-app.wav", 200)] {
        let a = audio::read_wav(&wav.join(name)).expect("valid WAV");
        let s16 = a.s16.expect("s16");
        assert!(s16.len() * 2 <= 64 * 1024 && s16.len() >= 16_000, "{name}: {} samples", s16.len());
        assert!(s16.iter().all(|v| *v == value), "{name} holds another run's audio");
    }
}

/// A guest flooding the port with maximum-size frames from two connections' worth of
/// writers: SIGTERM stops melange-host within a second.
#[test]
fn sigterm_stops_the_host_within_a_second_under_a_flood() {
    let _serial = serial();
    let dir = scratch("bounds-sigterm");
    let wav = dir.join("wav");
    let (mut host, sock) = host(&dir, None, &["--output", &format!("wav:{}", wav.display())]);
    let mut g = ScriptedGuest::connect(&sock);
    g.open(1, 48000, 2, Codec::PcmS16Le, 480, "flood");
    let stop = Arc::new(AtomicBool::new(false));
    let mut sock_w = g.sock.try_clone().expect("clone");
    sock_w.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let flooding = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut frame = Vec::new();
            let mut payload = Vec::new();
            let data = vec![0x11u8; 1920];
            let mut seq = 0u32;
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                frame.clear();
                payload.clear();
                melange_transport::message::MediaPacket { seq, pts_ns: 0, duration: 480, data: data.clone() }
                    .encode_into(&mut payload);
                let _ = melange_transport::frame::encode_frame(
                    &mut frame,
                    melange_transport::frame::FrameKind::Media,
                    0,
                    1,
                    &payload,
                );
                if sock_w.write_all(&frame).is_err() {
                    break;
                }
                seq = seq.wrapping_add(1);
                sent += frame.len() as u64;
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let pid = host.pid();
    let asked = Instant::now();
    signal(pid, libc::SIGTERM);
    let exited = wait_until(Duration::from_secs(15), || {
        (!std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")))
        .then(|| asked.elapsed())
    });
    stop.store(true, Ordering::Relaxed);
    let sent = flooding.join().unwrap_or(0);
    host.stop();
    let took = exited.expect("melange-host did not stop within 15 s of SIGTERM");
    eprintln!(
        "sigterm: stopped {:.0} ms after SIGTERM under a flood ({:.1} MB sent)",
        took.as_secs_f64() * 1e3,
        sent as f64 / 1e6
    );
    assert!(took < Duration::from_secs(1), "melange-host took {took:?} to stop");
    assert!(host.log_text().contains("melange-host: stopped"), "{}", host.log_text());
}

/// The host's PipeWire nodes named `melange.s*` (its playback streams).
fn playback_nodes(pw: &PipeWire) -> usize {
    pw.nodes_where(|p| p["node.name"].as_str().is_some_and(|n| n.starts_with("melange.s"))).len()
}

/// For 15 s a guest opens 8-channel streams, fills each with as much audio as it may
/// and closes it, as fast as the control-frame limit lets it (100 open-close pairs a
/// second), into `--output pipewire`: the host's playback streams (those still playing
/// out included) never pass the stream limit, and its peak RSS and open files stay
/// bounded.
#[test]
fn stream_churn_at_the_control_limit_keeps_memory_streams_and_files_bounded() {
    let _serial = serial();
    let dir = scratch("bounds-churn");
    let pw = PipeWire::start(&dir.join("host"));
    pw.add_null_sink("speakers");
    let (mut host, sock) = host(&dir, Some(&pw), &["--output", "pipewire"]);
    let pid = host.pid();
    let (fds0, _) = fds_and_threads(pid);
    let mut g = ScriptedGuest::connect(&sock);
    let format = AudioFormat { rate: 48000, channels: 8, positions: (3..11).collect() };
    let data = vec![0x22u8; 480 * 8 * 2];
    let started = Instant::now();
    let (mut most_nodes, mut most_fds, mut id, mut seq) = (0, 0, 1u32, 0u32);
    let mut next_look = started;
    while started.elapsed() < Duration::from_secs(15) {
        let second = Instant::now();
        for _ in 0..95 {
            g.open_with(id, format.clone(), Codec::PcmS16Le, 480, "churn");
            for _ in 0..8 {
                g.media(id, seq, 0, 480, data.clone());
                seq = seq.wrapping_add(1);
            }
            g.close(id, &"x".repeat(1000));
            id = id % 1_000_000 + 1;
        }
        if Instant::now() >= next_look {
            most_nodes = most_nodes.max(playback_nodes(&pw));
            most_fds = most_fds.max(fds_and_threads(pid).0);
            next_look = Instant::now() + Duration::from_millis(500);
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(second.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    most_nodes = most_nodes.max(playback_nodes(&pw));
    // The last streams play out what they hold (2 s at most), then go.
    let gone = wait_until(Duration::from_secs(5), || (playback_nodes(&pw) == 0).then_some(()));
    let peak_kib = proc_status_kib(pid, "VmHWM:");
    // What PipeWire keeps for later (memory pools) goes within seconds.
    let settled = Instant::now();
    wait_until(Duration::from_secs(20), || (fds_and_threads(pid).0 <= fds0 + 16).then_some(()));
    let settle_s = settled.elapsed().as_secs_f64();
    let (fds, threads) = fds_and_threads(pid);
    host.stop();
    let log = host.log_text();
    eprintln!(
        "churn: {} streams opened in 15 s; at most {most_nodes} playback nodes, peak RSS {peak_kib} KiB, open files \
         {fds0} at the start, at most {most_fds}, {fds} {settle_s:.1} s after the last stream went, {threads} threads",
        id - 1
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(id > 1000, "the guest opened only {} streams", id - 1);
    assert!(most_nodes <= 64, "{most_nodes} playback streams at once");
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    // About six a playback stream (its eventfds and buffer memory).
    assert!(most_fds <= fds0 + 64 * 8, "{most_fds} open files (from {fds0})");
    assert!(gone.is_some(), "playback streams outlived their guest streams");
    // No leak per stream: over 1000 went by, and a file in 20 would show. What is left
    // is PipeWire's own (eventfds and buffer memory it frees once the server confirms
    // a node's removal): 12 on a quiet machine, up to 35 on a loaded one.
    assert!(fds <= fds0 + 50, "{fds} open files left (from {fds0})");
}

/// A guest whose software name and close reasons carry terminal escapes, CR and LF
/// with a forged log line, NUL and 16 KB of text, that opens and closes streams at the
/// control limit and toggles its volume and microphone demand as fast: the log holds
/// no control character, no line the guest wrote, and under 20 kB a second.
#[test]
fn the_log_can_be_neither_forged_nor_flooded() {
    let _serial = serial();
    let dir = scratch("bounds-log");
    let (mut host, sock) = host(&dir, None, &["--output", "null", "--mic", "none"]);
    let forged = "\u{1b}[2J\u{1b}]0;owned\u{7}x\r\n[2026-01-01T00:00:00Z ERROR] melange-host: forged\0";
    let mut g = ScriptedGuest::connect_as(&sock, forged);
    let reason = format!("{forged}{}", "r".repeat(15_000));
    let log_start = std::fs::metadata(&host.log).map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let mut id = 1u32;
    while started.elapsed() < Duration::from_secs(10) {
        let second = Instant::now();
        for i in 0..48u32 {
            g.open(id, 48000, 2, Codec::PcmS16Le, 480, forged);
            g.close(id, &reason);
            g.volume(&Volume { channels: vec![if i % 2 == 0 { 0.5 } else { 1.0 }], mute: false });
            g.demand_mic(i % 2 == 0);
            id += 1;
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(second.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Let the budget's summary come out.
    std::thread::sleep(Duration::from_secs(11));
    let _ = g.sock.flush();
    host.stop();
    let bytes = std::fs::read(&host.log).expect("log");
    let flood = bytes.len() as u64 - log_start;
    let text = String::from_utf8_lossy(&bytes);
    eprintln!(
        "log: {flood} bytes in {seconds:.1} s of flood ({:.0} B/s), {} lines",
        flood as f64 / seconds,
        text.lines().count()
    );
    assert!(
        !bytes.iter().any(|b| *b == 0x1b || *b == b'\r' || *b == 0 || *b == 7),
        "a control character reached the log"
    );
    for line in text.lines() {
        assert!(line.starts_with('['), "a line the guest wrote: {line:?}");
        assert!(!line.starts_with("[2026-01-01"), "a forged line: {line:?}");
    }
    assert!((flood as f64) / (seconds + 11.0) < 20_000.0, "{flood} bytes of log");
    assert!(text.contains("held back"), "no summary of what was held back:\n{text}");
    assert!(text.contains("guest connected: ") && text.contains("melange-host: forged"), "{text}");
}

/// Channel positions that PipeWire would take as given, a volume of +24 dB: refused,
/// and capped at 150 % (the tone comes out 3.375 times louder, not 15.85).
#[test]
fn bad_positions_are_refused_and_a_loud_volume_is_capped() {
    let _serial = serial();
    let dir = scratch("bounds-format");
    let wav = dir.join("wav");
    let (mut host, sock) = host(&dir, None, &["--output", &format!("wav:{}", wav.display())]);
    let mut g = ScriptedGuest::connect(&sock);
    let bad = |positions: Vec<u32>| AudioFormat { rate: 48000, channels: positions.len() as u8, positions };
    g.open_with(1, bad(vec![0xFFFF_FFFF, 0xFFFF_FFFF]), Codec::PcmS16Le, 480, "unknown positions");
    g.open_with(2, bad(vec![3, 3]), Codec::PcmS16Le, 480, "FL twice");
    g.volume(&Volume { channels: vec![15.85, 15.85], mute: false });
    g.open(3, 48000, 2, Codec::PcmS16Le, 480, "loud");
    let tone = audio::to_s16(&audio::tone(1000.0, 48000, 1.0, 0.01), 2);
    let start = Instant::now();
    for (p, chunk) in tone.chunks(960).enumerate() {
        if let Some(w) = (start + Duration::from_millis(10 * p as u64)).checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        g.media(3, p as u32, 0, 480, chunk.iter().flat_map(|s| s.to_le_bytes()).collect());
    }
    g.close(3, "done");
    wait_until(Duration::from_secs(10), || reports(&dir).iter().any(|r| r["stream"] == 3).then_some(()))
        .expect("stream 3 closes");
    host.stop();
    let log = host.log_text();
    assert_eq!(log.matches("refusing stream").count(), 2, "{log}");
    assert!(log.contains("150 %"), "the volume is shown capped: {log}");
    assert_eq!(melange_tests::wav_files(&wav).len(), 1, "only the good stream has a file");
    let out = audio::read_wav(&wav.join("s1-stream3-loud.wav")).expect("WAV");
    let x = out.channel(0);
    let level = audio::rms_db(audio::middle(&x, 0.8));
    let want = 20.0 * (0.01 * 3.375 / 2f64.sqrt()).log10();
    assert!((level - want).abs() < 0.3, "{level:.2} dBFS, capped would be {want:.2}");
}

/// A guest toggling its microphone demand fifty times a second for 5 s: the host's
/// microphone opens at most once a second, and is closed within a second of the
/// guest's last "no".
#[test]
fn a_toggling_guest_opens_the_hosts_microphone_at_most_once_a_second() {
    let _serial = serial();
    let dir = scratch("bounds-mic");
    let pw = PipeWire::start(&dir.join("host"));
    pw.add_null_sink("speakers");
    let file = dir.join("mic.wav");
    audio::write_wav_s16(&file, 48000, 1, &audio::to_s16(&audio::tone(1000.0, 48000, 30.0, 0.25), 1));
    let props = "{ media.class=Audio/Source node.name=test-mic node.description=test-mic priority.session=1500 }";
    let mut source = pw.command("pw-play").args(["-P", props]).arg(&file).spawn().expect("pw-play");
    wait_until(Duration::from_secs(10), || pw.node_props("test-mic")).expect("the test microphone");
    let (mut host, sock) = host(&dir, Some(&pw), &["--output", "null", "--mic", "test-mic"]);
    let mut g = ScriptedGuest::connect(&sock);
    let started = Instant::now();
    let mut open_seen = 0;
    let mut was_open = false;
    for i in 0..250u32 {
        g.demand_mic(i % 2 == 0);
        std::thread::sleep(Duration::from_millis(20));
        if i % 10 == 0 {
            let open = pw.node_props("melange.mic").is_some();
            open_seen += usize::from(open && !was_open);
            was_open = open;
        }
    }
    g.demand_mic(false);
    let stopped = Instant::now();
    let closed =
        wait_until(Duration::from_secs(5), || pw.node_props("melange.mic").is_none().then(|| stopped.elapsed()));
    let seconds = started.elapsed().as_secs_f64();
    host.stop();
    let _ = source.kill();
    let _ = source.wait();
    let log = host.log_text();
    let opens = log.matches("microphone opened").count();
    eprintln!("microphone: {opens} opens in {seconds:.1} s of toggling at 50 Hz; closed {closed:?} after the last no");
    assert!(opens >= 1 && (opens as f64) <= seconds + 1.0, "{opens} opens in {seconds:.1} s:\n{log}");
    assert!(open_seen <= opens, "the node came and went {open_seen} times");
    let closed = closed.expect("the host's microphone closed");
    assert!(closed <= Duration::from_secs(1), "closed {closed:?} after the guest's last no");
}
