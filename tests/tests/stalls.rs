//! Short stalls on real daemons: a receiver that stops for less than the peer timeout
//! (a busy desktop, a debugger, a laptop that freezes) must be back at its stream's
//! normal latency within a second of running again, with the stream's tone going on
//! at its frequency and level, not play the backlog that waited for it.
//!
//! - Playback: melange-host gets SIGSTOP for 0.2, 1, 3 and 4.9 s while a guest app
//!   plays a tone into `--output pipewire`, Opus and PCM; its `--stats` give the latency
//!   (guest graph to host output, one clock) before and after.
//! - The microphone: the guest module gets SIGSTOP as long while a guest app records
//!   the host's microphone; the virtual source's node gives its jitter buffer's fill
//!   and target before and after.

use std::path::Path;
use std::time::{Duration, Instant};

use melange_tests::{
    audio, child_named, scratch, serial, signal, start_guest, start_host, stats_lines, wait_until, GuestCodec,
    PipeWire, Proc, Redirected,
};

/// The stall lengths the issue names, in seconds: all under the 5 s peer timeout.
const STALLS: [f64; 4] = [0.2, 1.0, 3.0, 4.9];

/// A 1 kHz tone at 0.25 of full scale, mono or stereo, `seconds` long.
fn tone_file(dir: &Path, name: &str, channels: usize, seconds: f64) -> std::path::PathBuf {
    let file = dir.join(name);
    let samples = audio::to_s16(&audio::tone(1000.0, 48000, seconds, 0.25), channels);
    audio::write_wav_s16(&file, 48000, channels as u16, &samples);
    file
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The latency of stream 1 in the `--stats` lines from index `from` on.
fn latencies(log: &Path, from: usize) -> Vec<f64> {
    stats_lines(log, 1).iter().skip(from).filter_map(|l| l.get("latency_ms")?.parse().ok()).collect()
}

/// Records `target` in `pw` for `seconds` and checks a 1 kHz tone at `level` dBFS.
fn assert_tone_from(pw: &PipeWire, dir: &Path, target: &str, seconds: f64, level: f64, tolerance: f64, what: &str) {
    let path = dir.join(format!("{what}.wav"));
    let mut rec = pw.command("pw-record");
    rec.args(["--target", target]).arg(&path);
    let mut rec = Proc::spawn(rec, dir.join(format!("{what}.log"))).stop_with_sigint();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    rec.stop();
    let out = audio::read_wav(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
    let x = out.channel(0);
    let body = audio::middle(audio::active(&x, 0.01), 0.8);
    assert!(body.len() as f64 >= 0.5 * seconds * 48000.0, "{what}: only {} samples of tone", body.len());
    // Drift control moves the pitch by 0.2 % at most; a trim's cut in the window moves
    // the estimate a little more.
    let f = audio::median_frequency(body, out.rate);
    assert!((f - 1000.0).abs() < 6.0, "{what}: {f:.1} Hz");
    let got = audio::rms_db(body);
    assert!((got - level).abs() < tolerance, "{what}: {got:.2} dBFS, played {level:.2}");
}

fn playback_comes_back_after_stalls(codec: GuestCodec, name: &str) {
    let _serial = serial();
    let dir = scratch(name);
    let rig = Redirected::start_with_host_args(&dir, codec, &["--stats"]);
    let file = tone_file(&dir, "tone.wav", 2, 90.0);
    let mut app = rig.guest_pw.command("pw-play").arg(&file).spawn().expect("pw-play starts");
    wait_until(Duration::from_secs(10), || rig.host_pw.node_props("melange.s1.stream1"))
        .unwrap_or_else(|| panic!("no host playback stream:\n{}", rig.host.log_text()));
    std::thread::sleep(Duration::from_secs(4));
    let level = 20.0 * (0.25f64 / 2f64.sqrt()).log10();
    let mut figures = Vec::new();
    for stall in STALLS {
        let before_from = stats_lines(&rig.host.log, 1).len().saturating_sub(3);
        let normal = median(latencies(&rig.host.log, before_from)).expect("latency before the stall");
        signal(rig.host.pid(), libc::SIGSTOP);
        std::thread::sleep(Duration::from_secs_f64(stall));
        signal(rig.host.pid(), libc::SIGCONT);
        let resumed = Instant::now();
        // Lines printed 2 s after it ran again or later cover 1 s after and later.
        std::thread::sleep(Duration::from_secs(2));
        let after_from = stats_lines(&rig.host.log, 1).len();
        assert_tone_from(&rig.host_pw, &dir, "melange.s1.stream1", 2.0, level, 1.0, &format!("after-{stall}"));
        let after = latencies(&rig.host.log, after_from);
        figures.push(format!(
            "{stall} s stall: latency {normal:.1} ms before, {after:?} from 1 s after ({:.1} s)",
            resumed.elapsed().as_secs_f64()
        ));
        assert!(after.len() >= 2, "too few --stats lines after the {stall} s stall:\n{}", rig.host.log_text());
        // Back at the latency it had, not at the backlog's (the stall's length: 200 ms
        // and more; before, 500 ms and more for minutes), within what a busy machine
        // moves it by: a second's median moves by a few ms, and an underrun in the
        // irregular arrivals after a stall may grow the jitter buffer's target once
        // (by half and a cycle, up to 16 ms at 10 ms packets).
        let typical = after.iter().sum::<f64>() / after.len().max(1) as f64;
        let worst = after.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(
            typical <= normal + 20.0 && worst <= normal + 40.0,
            "{stall} s stall: latency {normal:.1} ms before, {after:?} ms from a second after:\n{}",
            figures.join("\n")
        );
    }
    let _ = app.kill();
    let _ = app.wait();
    eprintln!("{name}:\n{}", figures.join("\n"));
    let log = rig.host.log_text();
    assert!(log.contains("guest connected") && !log.contains("panicked"), "{log}");
}

#[test]
fn opus_playback_is_back_at_its_latency_a_second_after_a_stalled_host() {
    playback_comes_back_after_stalls(GuestCodec::Opus(128_000), "stall-opus");
}

#[test]
fn pcm_playback_is_back_at_its_latency_a_second_after_a_stalled_host() {
    playback_comes_back_after_stalls(GuestCodec::Pcm, "stall-pcm");
}

/// The `melange.fill.ms` and `melange.target.ms` the guest's virtual source puts on its
/// node every second.
fn mic_fill(pw: &PipeWire) -> Option<(f64, f64)> {
    let props = pw.node_props("melange.mic")?;
    // pw-dump prints a property that reads as a number as one.
    let get = |k: &str| props[k].as_f64().or_else(|| props[k].as_str()?.parse().ok());
    Some((get("melange.fill.ms")?, get("melange.target.ms")?))
}

#[test]
fn the_guests_microphone_is_back_at_its_latency_a_second_after_a_stalled_guest() {
    let _serial = serial();
    let dir = scratch("stall-mic");
    let sock = dir.join("port.sock");
    let host_pw = PipeWire::start(&dir.join("host"));
    host_pw.add_null_sink("speakers");
    let mic_tone = tone_file(&dir, "mic-tone.wav", 1, 120.0);
    let props = "{ media.class=Audio/Source node.name=test-mic node.description=test-mic priority.session=1500 }";
    let mut source = host_pw.command("pw-play").args(["-P", props]).arg(&mic_tone).spawn().expect("pw-play");
    wait_until(Duration::from_secs(10), || host_pw.node_props("test-mic")).expect("the test microphone appears");
    let listen = format!("unix:{}", sock.display());
    let mut host = start_host(&["--listen", &listen, "--output", "null", "--mic", "test-mic"], Some(&host_pw), &dir);
    host.wait_for_log("waiting for a guest", Duration::from_secs(10));
    let guest_pw = PipeWire::start(&dir.join("guest"));
    let mut guest = start_guest(&guest_pw, &listen, GuestCodec::Opus(128_000), dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    // A guest app records the virtual microphone the whole time.
    let mut rec = guest_pw.command("pw-record");
    rec.args(["--target", "melange.mic", "--channels", "1"]).arg(dir.join("recording.wav"));
    let mut rec = Proc::spawn(rec, dir.join("recording.log")).stop_with_sigint();
    host.wait_for_log("microphone opened", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(4));
    let module = child_named(guest.pid(), "pipewire");
    let level = 20.0 * (0.25f64 / 2f64.sqrt()).log10();
    let mut figures = Vec::new();
    for stall in STALLS {
        let (fill, target) = mic_fill(&guest_pw).expect("the source's figures");
        signal(module, libc::SIGSTOP);
        std::thread::sleep(Duration::from_secs_f64(stall));
        signal(module, libc::SIGCONT);
        // The figures are put on the node once a second: those of the second that
        // began a second after the module ran again.
        std::thread::sleep(Duration::from_millis(2100));
        let (after, after_target) = mic_fill(&guest_pw).expect("the source's figures");
        figures.push(format!(
            "{stall} s stall: fill {fill:.1} ms (target {target:.1}) before, {after:.1} ms (target {after_target:.1}) after"
        ));
        // Back at the fill it held before (which may be above a target drift control
        // is still draining to), or at its target, within what the irregular arrivals
        // after a stall move it by (as for playback).
        assert!(after - fill.max(after_target) <= 20.0, "{stall} s stall, the microphone:\n{}", figures.join("\n"));
        assert_tone_from(&guest_pw, &dir, "melange.mic", 1.5, level, 1.0, &format!("mic-after-{stall}"));
    }
    rec.stop();
    let _ = source.kill();
    let _ = source.wait();
    eprintln!("the microphone:\n{}", figures.join("\n"));
    guest.stop();
    host.stop();
}
