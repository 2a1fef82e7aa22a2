//! Drift control end to end: a guest whose clock runs 500 ppm fast (an in-process guest
//! pacing its packets 500 ppm faster than real time) plays into melange-host's PipeWire
//! output in a host session running at its nominal rate. Without drift control the
//! jitter buffer would grow by 10 ms over 20 s; with it the fill must hold within 2 ms
//! once converged (from second 10 to the end), and the measured drift must match.
//! The target is given (`--latency 30`) so that the test isolates drift control from
//! the automatic target, whose 2 ms margin a sleep-paced test sender on a busy 2-core
//! machine can overrun.

use std::time::{Duration, Instant};

use melange_tests::{audio, reports, scratch, start_host, wait_until, PipeWire, ScriptedGuest};
use melange_transport::message::Codec;

#[test]
fn host_playback_holds_its_fill_against_a_guest_clock_500_ppm_fast() {
    const PPM: f64 = 500.0;
    const SECONDS: u32 = 20;
    let dir = scratch("drift");
    let host_pw = PipeWire::start(&dir.join("host"));
    host_pw.add_null_sink("speakers");
    let sock = dir.join("port.sock");
    let mut host = start_host(
        &["--listen", &format!("unix:{}", sock.display()), "--output", "pipewire", "--latency", "30"],
        Some(&host_pw),
        &dir,
    );
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");

    let mut guest = ScriptedGuest::connect(&sock);
    guest.open(1, 48000, 2, Codec::PcmS16Le, 480, "fast clock");
    let tone = audio::to_s16(&audio::tone(997.0, 48000, f64::from(SECONDS), 0.2), 2);
    let start = Instant::now();
    for (seq, chunk) in tone.chunks(960).enumerate() {
        // Packet n is due at n * 10 ms of guest time, which is 500 ppm faster.
        let due = start + Duration::from_secs_f64(seq as f64 * 0.010 / (1.0 + PPM * 1e-6));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let data = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
        guest.media(1, seq as u32, seq as u64 * 10_000_000, 480, data);
    }
    guest.close(1, "done");
    let report = wait_until(Duration::from_secs(10), || reports(&dir).into_iter().find(|r| r["stream"] == 1))
        .unwrap_or_else(|| panic!("no report:\n{}", host.log_text()));
    host.stop();

    let drift = report["drift_ppm"].as_f64().expect("the PipeWire output measures drift");
    let second_10 = report["fill_ms_second_10"].as_f64().expect("fill in the tenth second");
    let last = report["fill_ms_last_second"].as_f64().expect("fill in the last second");
    eprintln!("drift: measured {drift:.0} ppm; fill {second_10:.1} ms in second 10, {last:.1} ms at the end; {report}");
    assert!((drift - PPM).abs() < 250.0, "measured {drift:.0} ppm for a guest {PPM} ppm fast");
    assert!((last - second_10).abs() <= 2.0, "the fill moved from {second_10:.1} ms to {last:.1} ms");
    assert!(report["underruns"].as_u64().unwrap_or(99) <= 1, "underruns: {}", report["underruns"]);
}
