//! Drift control end to end, both ways.
//!
//! Host playback: a guest whose clock runs 500 ppm fast (an in-process guest
//! pacing its packets 500 ppm faster than real time) plays into melange-host's PipeWire
//! output in a host session running at its nominal rate. Without drift control the
//! jitter buffer would grow by 10 ms over 20 s; with it the fill must hold within 2 ms
//! once converged (from second 10 to the end), and the drift it measured must be the
//! guest's 500 ppm, sign included (see [`DRIFT_BAND_PPM`]).
//! The target is given (`--latency 30`) so that the test isolates drift control from
//! the automatic target, whose 3 ms margin a sleep-paced test sender on a busy 2-core
//! machine can overrun.
//!
//! Each test runs 20 s of real-time audio: they take turns ([`serial`]).

use std::time::{Duration, Instant};

use melange_guest::mic::{MIC_CHANNELS, MIC_RATE};
use melange_tests::{
    audio, reports, scratch, serial, start_guest, start_host, stats_lines, wait_until, GuestCodec, PipeWire,
    ScriptedGuest, ScriptedHost,
};
use melange_transport::message::{
    AppInfo, AudioFormat, CaptureDemand, CaptureDevice, Codec, MediaKind, MediaPacket, StreamOpen,
};
use melange_transport::session::Event;

/// How far the drift measured once converged (the mean of one figure a second from
/// second 10 on) may be from the clock difference the test makes, in ppm. The
/// controller's rate wobbles by about ±140 ppm around the drift with 2 ms of arrival
/// jitter (`shim/src/drift.rs`), and a sleep-paced sender on a busy machine adds some;
/// the mean of ten figures is well within this. A drift measured with the wrong sign
/// (-500) or not at all (0) is far outside it.
const DRIFT_BAND_PPM: f64 = 250.0;

/// The mean of `figures`, `None` if there are none.
fn mean(figures: &[f64]) -> Option<f64> {
    (!figures.is_empty()).then(|| figures.iter().sum::<f64>() / figures.len() as f64)
}

#[test]
fn host_playback_holds_its_fill_against_a_guest_clock_500_ppm_fast() {
    let _serial = serial();
    const PPM: f64 = 500.0;
    const SECONDS: u32 = 20;
    let dir = scratch("drift");
    let host_pw = PipeWire::start(&dir.join("host"));
    host_pw.add_null_sink("speakers");
    let sock = dir.join("port.sock");
    let mut host = start_host(
        &["--listen", &format!("unix:{}", sock.display()), "--output", "pipewire", "--latency", "30", "--stats"],
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

    let at_close = report["drift_ppm"].as_f64().expect("the PipeWire output measures drift");
    // How the host's graph ran against CLOCK_MONOTONIC: the guest's packets are paced on
    // that clock, so what drift control sees is the guest's 500 ppm less the graph's.
    let graph = report["output_clock_ppm"].as_f64().expect("the output's clock rate");
    let expected = ((1.0 + PPM * 1e-6) / (1.0 + graph * 1e-6) - 1.0) * 1e6;
    let second_10 = report["fill_ms_second_10"].as_f64().expect("fill in the tenth second");
    let last = report["fill_ms_last_second"].as_f64().expect("fill in the last second");
    // The drift once converged: the `--stats` figure of each second from the tenth on
    // (one figure is the controller's rate at that instant, which wobbles).
    let figures: Vec<f64> =
        stats_lines(&host.log, 1).iter().skip(10).filter_map(|l| l.get("drift_ppm")?.parse().ok()).collect();
    let converged =
        mean(&figures).unwrap_or_else(|| panic!("no --stats figures after second 10:\n{}", host.log_text()));
    eprintln!(
        "drift: measured {converged:.0} ppm (mean from second 10 on; {at_close:.0} at the close; each second: \
         {figures:.0?}) for a guest {PPM} ppm fast on a host graph that ran {graph:+.0} ppm, so {expected:.0} ppm \
         expected; fill {second_10:.1} ms in second 10, {last:.1} ms at the end; {report}"
    );
    // What drift control owes first: the fill held.
    assert!((last - second_10).abs() <= 2.0, "the fill moved from {second_10:.1} ms to {last:.1} ms");
    assert!(figures.len() >= 5, "only {} figures after second 10", figures.len());
    assert!(
        (converged - expected).abs() <= DRIFT_BAND_PPM,
        "measured {converged:.0} ppm for {expected:.0} ppm (±{DRIFT_BAND_PPM}): {figures:.0?}"
    );
    assert!(report["underruns"].as_u64().unwrap_or(99) <= 1, "underruns: {}", report["underruns"]);
}

/// The guest's microphone, the other way: an in-process host whose clock runs 500 ppm
/// fast sends the microphone to the guest module while a guest app records. The
/// virtual source's jitter buffer must hold its fill within 2 ms of its target at
/// second 10 and at the end, measure the host's 500 ppm (the mean of one figure a
/// second from second 10 on, within [`DRIFT_BAND_PPM`]), and not underrun (its figures
/// are on the source's node, put there once a second).
#[test]
fn the_guests_microphone_holds_its_fill_against_a_host_clock_500_ppm_fast() {
    let _serial = serial();
    const PPM: f64 = 500.0;
    const SECONDS: u32 = 20;
    let dir = scratch("mic-drift");
    let sock = dir.join("port.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("listen");
    let pw = PipeWire::start(&dir.join("guest"));
    let mut guest = start_guest(&pw, &format!("unix:{}", sock.display()), GuestCodec::Pcm, dir.join("guest.log"));
    let mut host = ScriptedHost::accept(&listener);
    wait_until(Duration::from_secs(10), || pw.node_props("melange.mic")).expect("the guest's microphone");
    let mut rec = pw.command("pw-record");
    rec.args(["--target", "melange.mic"]).arg(dir.join("mic.wav"));
    let mut rec = rec.spawn().expect("pw-record starts");
    let asked = wait_until(Duration::from_secs(10), || {
        host.pump();
        host.take_events().into_iter().find_map(|e| match e {
            Event::CaptureDemand(CaptureDemand { device: CaptureDevice::Microphone, active: true, .. }) => Some(()),
            _ => None,
        })
    });
    assert!(asked.is_some(), "the guest never asked for the microphone:\n{}", guest.log_text());
    let open = StreamOpen {
        media: MediaKind::Audio(AudioFormat { rate: MIC_RATE, channels: MIC_CHANNELS, positions: vec![2] }),
        codec: Codec::PcmS16Le,
        frame_samples: 480,
        app: AppInfo { name: "Microphone".into(), ..AppInfo::default() },
        codec_data: Vec::new(),
    };
    host.session().open_stream(1, &open).expect("opens");
    let tone = audio::to_s16(&audio::tone(997.0, MIC_RATE, f64::from(SECONDS), 0.2), usize::from(MIC_CHANNELS));
    let fill = |pw: &PipeWire| {
        let p = pw.node_props("melange.mic")?;
        let v = |k: &str| p[k].as_f64().or_else(|| p[k].as_str()?.parse().ok());
        Some((v("melange.fill.ms")?, v("melange.target.ms")?, v("melange.drift.ppm")?, v("melange.underruns")?))
    };
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        for (seq, chunk) in tone.chunks(480).enumerate() {
            // Packet n is due at n * 10 ms of host time, which is 500 ppm faster.
            let due = start + Duration::from_secs_f64(seq as f64 * 0.010 / (1.0 + PPM * 1e-6));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let data = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
            let packet = MediaPacket { seq: seq as u32, pts_ns: seq as u64 * 10_000_000, duration: 480, data };
            host.session().send_media(1, &packet).expect("sends");
            host.pump();
        }
        host
    });
    // The module puts its figures on the node once a second: one look a second from
    // second 10 to the last.
    let figures: Vec<Option<(f64, f64, f64, f64)>> = (10..SECONDS)
        .map(|second| {
            std::thread::sleep(
                (start + Duration::from_secs(u64::from(second))).saturating_duration_since(Instant::now()),
            );
            fill(&pw)
        })
        .collect();
    let (at_10, at_end) = (figures.first().copied().flatten(), figures.last().copied().flatten());
    let drifts: Vec<f64> = figures.iter().flatten().map(|f| f.2).collect();
    let mut host = sender.join().expect("the sender");
    host.session().close_stream(1, "done");
    host.pump();
    let _ = rec.kill();
    let _ = rec.wait();
    guest.stop();

    let converged = mean(&drifts).expect("drift figures from second 10 on");
    eprintln!(
        "the guest's microphone: drift measured {converged:.0} ppm (mean from second 10 on; each second: \
         {drifts:.0?}) for a host {PPM} ppm fast; (fill ms, target ms, drift ppm, underruns) {at_10:?} at second 10, \
         {at_end:?} at the end"
    );
    let (f10, t10, _, _) = at_10.expect("figures at second 10");
    let (fend, tend, _, underruns) = at_end.expect("figures at the end");
    // The target itself may rise after a late packet (a deeper dip of the fill); what
    // drift control owes first is the fill at the target.
    assert!((f10 - t10).abs() <= 2.0, "at second 10 the fill was {f10:.1} ms for a target of {t10:.1} ms");
    assert!((fend - tend).abs() <= 2.0, "at the end the fill was {fend:.1} ms for a target of {tend:.1} ms");
    // The guest's graph runs on CLOCK_MONOTONIC too (its timer may fire late, which
    // drift control would measure as well; the module does not report it): the drift
    // is the host's 500 ppm.
    assert!(drifts.len() >= 5, "only {} figures after second 10", drifts.len());
    assert!(
        (converged - PPM).abs() <= DRIFT_BAND_PPM,
        "measured {converged:.0} ppm for {PPM} ppm (±{DRIFT_BAND_PPM}): {drifts:.0?}"
    );
    assert!(underruns <= 1.0, "{underruns} underruns");
}
