//! Faults, each on real daemons, with the recovery asserted on the audio that comes out:
//! melange-host killed and started again, and the port cut and restored a hundred times
//! while an app plays.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use melange_tests::{
    audio, child_named, fds_and_threads, lines, proc_status_kib, reports, scratch, serial, start_guest, start_host,
    wait_until, wav_files, GuestCodec, PipeWire, Proc, Redirected, Relay,
};

/// A tone long enough to outlast the test, played by pw-play in the guest.
fn long_tone(pw: &PipeWire, dir: &Path, seconds: f64) -> std::process::Child {
    let file = dir.join("tone.wav");
    audio::write_wav_s16(&file, 48000, 2, &audio::to_s16(&audio::tone(1000.0, 48000, seconds, 0.25), 2));
    pw.command("pw-play").arg(&file).spawn().expect("pw-play starts")
}

fn host_wav(dir: &Path, sock: &Path) -> Proc {
    host_wav_with(dir, sock, &[])
}

fn host_wav_with(dir: &Path, sock: &Path, extra: &[&str]) -> Proc {
    let (listen, wav) = (format!("unix:{}", sock.display()), format!("wav:{}", dir.join("wav").display()));
    let args: Vec<&str> = ["--listen", &listen, "--output", &wav].into_iter().chain(extra.iter().copied()).collect();
    start_host(&args, None, dir)
}

/// The `kbps` of each `--stats` line of stream 1 in the host's log, in order.
fn stats_kbps(host: &Proc) -> Vec<f64> {
    lines(&host.log)
        .iter()
        .filter(|l| l.starts_with("stats ") && l.contains(" stream=1 "))
        .filter_map(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix("kbps=")?.parse().ok()))
        .collect()
}

/// A 1 kHz tone of at least `seconds`, at the level it was sent.
fn assert_tone(path: &Path, seconds: f64) {
    let out = audio::read_wav(path).unwrap_or_else(|e| panic!("{e}"));
    let x = out.channel(0);
    let body = audio::middle(audio::active(&x, 0.01), 0.9);
    assert!(body.len() as f64 >= seconds * 48000.0, "{}: only {} samples of tone", path.display(), body.len());
    // Rate-matched outputs move the pitch by up to 0.2 % while they adapt.
    let f = audio::median_frequency(body, out.rate);
    assert!((f - 1000.0).abs() < 2.5, "{}: {f} Hz", path.display());
    let level = audio::rms_db(body);
    let want = 20.0 * (0.25f64 / 2f64.sqrt()).log10();
    assert!((level - want).abs() < 0.5, "{}: {level:.2} dBFS, sent {want:.2}", path.display());
}

/// melange-host is killed with SIGKILL mid-stream and started again 2 s later: the app
/// plays on unaffected, audio resumes within 500 ms of the host being back, and what
/// the new host plays is fresh (under 100 ms old, on the shared clock).
#[test]
fn a_killed_host_started_again_resumes_within_500_ms_with_fresh_audio() {
    let _serial = serial();
    let dir = scratch("host-killed");
    let sock = dir.join("port.sock");
    let first = dir.join("first");
    std::fs::create_dir_all(&first).expect("scratch");
    let mut host = host_wav(&first, &sock);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let pw = PipeWire::start(&dir.join("guest"));
    let mut guest = start_guest(&pw, &format!("unix:{}", sock.display()), GuestCodec::Pcm, dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let started = Instant::now();
    let mut app = long_tone(&pw, &dir, 8.0);
    host.wait_for_log("stream 1 opened", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(host.pid() as i32, libc::SIGKILL) };
    drop(host);
    std::thread::sleep(Duration::from_secs(2));

    let second = dir.join("second");
    std::fs::create_dir_all(&second).expect("scratch");
    let back = Instant::now();
    let mut host = host_wav(&second, &sock);
    let resumed = wait_until(Duration::from_secs(5), || {
        lines(&host.log).iter().any(|l| l.contains("stream 1 opened")).then(Instant::now)
    })
    .unwrap_or_else(|| panic!("no stream reached the new host:\n{}", host.log_text()));
    let status = app.wait().expect("pw-play runs");
    let played = started.elapsed().as_secs_f64();
    let closed = wait_until(Duration::from_secs(10), || (!reports(&second).is_empty()).then_some(()));
    assert!(closed.is_some(), "the new host closed no stream:\n{}", host.log_text());
    guest.stop();
    host.stop();

    let resume_ms = resumed.duration_since(back).as_secs_f64() * 1000.0;
    eprintln!("resumed {resume_ms:.0} ms after melange-host was started again; pw-play took {played:.2} s");
    assert!(status.success() && (played - 8.0).abs() < 0.5, "the app was affected: {status}, {played:.2} s for 8 s");
    assert!(resume_ms <= 500.0, "audio resumed {resume_ms:.0} ms after the host was back");
    let report = &reports(&second)[0];
    let p99 = report["latency_ms_p99"].as_f64().expect("same clock: latency measured");
    assert!(p99 < 100.0, "the new host played audio {p99:.0} ms old");
    let files = wav_files(&second.join("wav"));
    assert_eq!(files.len(), 1, "one stream after the restart");
    assert_tone(&files[0], 3.0);
}

/// The port is cut and restored 100 times while an app plays: every reconnect brings
/// the stream back with audio, and neither side leaks descriptors, threads or memory.
#[test]
fn a_hundred_reconnects_all_resume_and_leak_nothing() {
    const CUTS: usize = 100;
    let _serial = serial();
    let dir = scratch("reconnects");
    let (host_sock, guest_sock) = (dir.join("host.sock"), dir.join("guest.sock"));
    let mut host = host_wav(&dir, &host_sock);
    wait_until(Duration::from_secs(10), || host_sock.exists().then_some(())).expect("melange-host listens");
    let relay = Relay::start(&guest_sock, host_sock.clone());
    let pw = PipeWire::start(&dir.join("guest"));
    let mut guest =
        start_guest(&pw, &format!("unix:{}", guest_sock.display()), GuestCodec::Opus(64_000), dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let mut app = long_tone(&pw, &dir, 120.0);
    let module = child_named(guest.pid(), "pipewire");
    let wav = dir.join("wav");

    // Session n has stream files from session n on; wait for one with audio in it.
    let resumed_in = |session: usize| {
        wait_until(Duration::from_secs(5), || {
            let name = format!("s{session}-stream");
            wav_files(&wav)
                .into_iter()
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&name)))
                .filter(|p| std::fs::metadata(p).map_or(0, |m| m.len()) > 44 + 9600)
        })
    };
    let mut baseline = None;
    let mut worst = Duration::ZERO;
    for cut in 1..=CUTS {
        assert!(resumed_in(cut).is_some(), "session {cut} brought no audio:\n{}", host.log_text());
        if cut == 10 {
            // After the allocators settled.
            baseline = Some(usage(host.pid(), module));
        }
        let t = Instant::now();
        relay.cut();
        assert!(resumed_in(cut + 1).is_some(), "no audio after cut {cut}:\n{}", host.log_text());
        worst = worst.max(t.elapsed());
    }
    let end = usage(host.pid(), module);
    let _ = app.kill();
    let _ = app.wait();
    guest.stop();
    host.stop();

    let baseline = baseline.expect("measured");
    eprintln!(
        "{CUTS} cuts, slowest resume {worst:?}; host and module (fds, threads, RSS KiB): {baseline:?} -> {end:?}"
    );
    for (side, (b, e)) in [("melange-host", (baseline.0, end.0)), ("guest module", (baseline.1, end.1))] {
        assert_eq!((b.0, b.1), (e.0, e.1), "{side}: descriptors or threads grew over {} reconnects", CUTS - 10);
        assert!(e.2 <= b.2 + 2048, "{side}: RSS grew from {} to {} KiB", b.2, e.2);
    }
    // Every stream file holds the tone: the audio of each session is the app's.
    let mut out = std::fs::File::create(dir.join("checked.txt")).expect("scratch");
    for file in wav_files(&wav).iter().step_by(10) {
        let got = audio::read_wav(file).expect("valid WAV");
        let x = got.channel(0);
        // Some sessions last a fifth of a second: 20 ms windows.
        let f = audio::median_frequency_short(audio::middle(audio::active(&x, 0.01), 0.8), got.rate);
        let _ = writeln!(out, "{}: {f:.1} Hz", file.display());
        assert!((f - 1000.0).abs() < 2.0, "{}: {f} Hz", file.display());
    }
}

/// (fds, threads, RSS KiB) of the host and of the module process.
type Usage = ((usize, usize, u64), (usize, usize, u64));

fn usage(host: u32, module: u32) -> Usage {
    let one = |pid| {
        let (fds, threads) = fds_and_threads(pid);
        (fds, threads, proc_status_kib(pid, "VmRSS:"))
    };
    (one(host), one(module))
}

/// The guest module's process is killed with SIGKILL while three apps play: they play
/// on into the lingering sink without an error, and the module, started again (as
/// systemd's `Restart=always` would), taps all three again within 2 s.
#[test]
fn a_killed_module_started_again_taps_every_app_within_2_s() {
    let _serial = serial();
    let dir = scratch("module-killed");
    let sock = dir.join("port.sock");
    let mut host = host_wav(&dir, &sock);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let pw = PipeWire::start(&dir.join("guest"));
    let port = format!("unix:{}", sock.display());
    let mut guest = start_guest(&pw, &port, GuestCodec::Opus(64_000), dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let started = Instant::now();
    let mut apps: Vec<_> = [440.0, 660.0, 880.0]
        .iter()
        .map(|f| {
            let file = dir.join(format!("tone-{f}.wav"));
            audio::write_wav_s16(&file, 48000, 2, &audio::to_s16(&audio::tone(*f, 48000, 8.0, 0.2), 2));
            pw.command("pw-play").arg(&file).spawn().expect("pw-play starts")
        })
        .collect();
    let opened = |n: usize| lines(&host.log).iter().filter(|l| l.contains("opened:")).count() >= n;
    assert!(wait_until(Duration::from_secs(10), || opened(3).then_some(())).is_some(), "3 streams first");
    std::thread::sleep(Duration::from_secs(1));
    let module = child_named(guest.pid(), "pipewire");
    // SAFETY: kill(2) on our own grandchild.
    unsafe { libc::kill(module as i32, libc::SIGKILL) };
    let _ = guest.stop();
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Instant::now();
    let mut guest = start_guest(&pw, &port, GuestCodec::Opus(64_000), dir.join("guest-2.log"));
    let retapped = wait_until(Duration::from_secs(5), || opened(6).then(Instant::now));
    let statuses: Vec<_> = apps.iter_mut().map(|a| a.wait().expect("pw-play runs")).collect();
    let played = started.elapsed().as_secs_f64();
    guest.stop();
    host.stop();

    let retapped =
        retapped.unwrap_or_else(|| panic!("the restarted module did not tap all three:\n{}", host.log_text()));
    let took = retapped.duration_since(restarted).as_secs_f64();
    eprintln!("retapped 3 streams {took:.2} s after the module was started again; apps took {played:.2} s");
    assert!(statuses.iter().all(|s| s.success()), "an app failed: {statuses:?}");
    assert!((played - 8.0).abs() < 0.6, "the apps took {played:.2} s for 8 s");
    assert!(took <= 2.0, "the restarted module tapped the apps after {took:.2} s");
    // The second session's three streams carry the three tones.
    let mut tones: Vec<u32> = wav_files(&dir.join("wav"))
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("s2-")))
        .map(|p| {
            let got = audio::read_wav(p).expect("valid WAV");
            let x = got.channel(0);
            audio::median_frequency(audio::middle(audio::active(&x, 0.01), 0.8), got.rate).round() as u32
        })
        .collect();
    tones.sort();
    assert_eq!(tones, [440, 660, 880], "the re-tapped streams");
}

/// An app moved to another sink in the guest and back: its tap follows, so the host
/// has its stream while it plays into the redirect sink and none while it plays
/// elsewhere, never two at once.
#[test]
fn a_stream_moved_to_another_sink_and_back_is_followed_without_duplicates() {
    let _serial = serial();
    let dir = scratch("moved");
    let sock = dir.join("port.sock");
    let mut host = host_wav(&dir, &sock);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let pw = PipeWire::start(&dir.join("guest"));
    let mut guest = start_guest(&pw, &format!("unix:{}", sock.display()), GuestCodec::Pcm, dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    pw.add_null_sink("elsewhere");
    let mut app = long_tone(&pw, &dir, 6.0);
    host.wait_for_log("stream 1 opened", Duration::from_secs(10));
    let id_of = |name: &str, class: &str| -> (String, String) {
        let o = pw
            .dump()
            .into_iter()
            .find(|o| {
                let p = &o["info"]["props"];
                o["type"] == "PipeWire:Interface:Node"
                    && p["media.class"] == class
                    && (p["node.name"] == name || p["application.name"] == name)
            })
            .unwrap_or_else(|| panic!("no {class} node {name}"));
        (o["id"].to_string(), o["info"]["props"]["object.serial"].to_string().trim_matches('"').to_string())
    };
    let (app_id, _) = id_of("pw-play", "Stream/Output/Audio");
    let move_to = |sink: &str| {
        let (_, serial) = id_of(sink, "Audio/Sink");
        pw.run("pw-metadata", &["-n", "default", &app_id, "target.object", &serial]);
    };
    std::thread::sleep(Duration::from_secs(1));
    move_to("elsewhere");
    host.wait_for_log("stream 1 closed", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    move_to("melange");
    host.wait_for_log("stream 2 opened", Duration::from_secs(5));
    assert!(app.wait().expect("pw-play runs").success());
    host.wait_for_log("stream 2 closed", Duration::from_secs(10));
    guest.stop();
    host.stop();

    // The host's stream events, in order: never two streams open at once.
    let events: Vec<String> = lines(&host.log)
        .into_iter()
        .filter_map(|l| {
            let rest = l.split("melange-host: stream ").nth(1)?;
            let (id, what) = rest.split_once(' ')?;
            (what.starts_with("opened") || what.starts_with("closed")).then(|| format!("{id} {}", &what[..6]))
        })
        .collect();
    assert_eq!(events, ["1 opened", "1 closed", "2 opened", "2 closed"], "{}", host.log_text());
    let files = wav_files(&dir.join("wav"));
    assert_eq!(files.len(), 2);
    assert_tone(&files[1], 1.0);
}

/// The guest's PipeWire is restarted: the module, which cannot outlive its session's
/// daemon, exits with one clear line; started again with the new daemon (systemd's
/// job in a guest), it redirects the apps that play there.
#[test]
fn after_the_guests_pipewire_restarts_apps_are_redirected_again() {
    let _serial = serial();
    let dir = scratch("guest-pipewire-restart");
    let sock = dir.join("port.sock");
    let mut host = host_wav(&dir, &sock);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let port = format!("unix:{}", sock.display());
    let mut pw = PipeWire::start(&dir.join("guest"));
    let mut guest = start_guest(&pw, &port, GuestCodec::Pcm, dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let mut app = long_tone(&pw, &dir, 10.0);
    host.wait_for_log("stream 1 opened", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    pw.stop();
    let _ = app.wait();
    guest.wait_for_log("exiting so that the service starts again", Duration::from_secs(5));
    let _ = guest.stop();

    let mut pw = PipeWire::start(&dir.join("guest"));
    let mut guest = start_guest(&pw, &port, GuestCodec::Pcm, dir.join("guest-2.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let file = dir.join("after.wav");
    audio::write_wav_s16(&file, 48000, 2, &audio::to_s16(&audio::tone(1000.0, 48000, 2.0, 0.25), 2));
    pw.run("pw-play", &[&file.to_string_lossy()]);
    let closed = wait_until(Duration::from_secs(10), || (reports(&dir).len() >= 2).then_some(()));
    assert!(closed.is_some(), "no stream after the restart:\n{}", host.log_text());
    guest.stop();
    pw.stop();
    host.stop();
    let after: Vec<PathBuf> = wav_files(&dir.join("wav"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("s2-")))
        .collect();
    assert_eq!(after.len(), 1, "one stream in the session after the restart");
    assert_tone(&after[0], 1.5);
}

/// The host's PipeWire is restarted while a guest app plays: melange-host notices,
/// connects to the new daemon and plays the stream there again.
#[test]
fn after_the_hosts_pipewire_restarts_the_stream_plays_there_again() {
    let _serial = serial();
    let dir = scratch("host-pipewire-restart");
    let Redirected { mut host_pw, guest_pw, mut host, mut guest } = Redirected::start(&dir, GuestCodec::Opus(128_000));
    let mut app = long_tone(&guest_pw, &dir, 12.0);
    wait_until(Duration::from_secs(10), || host_pw.node_props("melange.s1.stream1"))
        .unwrap_or_else(|| panic!("no host playback stream:\n{}", host.log_text()));
    std::thread::sleep(Duration::from_secs(1));
    host_pw.stop();
    let host_pw = PipeWire::start(&dir.join("host"));
    host_pw.add_null_sink("speakers");
    let back = Instant::now();
    wait_until(Duration::from_secs(5), || host_pw.node_props("melange.s1.stream1"))
        .unwrap_or_else(|| panic!("the stream did not come back:\n{}", host.log_text()));
    let again = back.elapsed();
    let recording = dir.join("recorded.wav");
    let mut rec = host_pw.command("pw-record");
    rec.args(["--target", "melange.s1.stream1"]).arg(&recording);
    let mut rec = Proc::spawn(rec, dir.join("pw-record.log")).stop_with_sigint();
    std::thread::sleep(Duration::from_millis(2000));
    rec.stop();
    let _ = app.kill();
    let _ = app.wait();
    guest.stop();
    host.stop();
    eprintln!("the stream was back {again:?} after the host's PipeWire");
    let log = host.log_text();
    assert!(log.contains("lost the connection to the host's PipeWire"), "{log}");
    assert!(log.contains("reconnected to the host's PipeWire"), "{log}");
    assert_tone(&recording, 1.0);
}

/// The `melange.*` counters on the guest's tap node for the app `serial`, once they are
/// there (the module puts them on every second).
fn tap_counters(pw: &PipeWire) -> Option<serde_json::Value> {
    pw.nodes_where(|p| {
        p["node.name"].as_str().is_some_and(|n| n.starts_with("melange.tap.")) && !p["melange.stream"].is_null()
    })
    .into_iter()
    .next()
}

/// A counter from [`tap_counters`] (`pw-dump` shows numbers as numbers).
fn counter(props: &serde_json::Value, key: &str) -> u64 {
    props[key].as_u64().or_else(|| props[key].as_str()?.parse().ok()).unwrap_or(0)
}

/// melange-host is stopped (SIGSTOP) for 10 s while an app plays: the app plays on,
/// the guest holds little more memory than before and drops the media the host did not
/// take (counted), the session ends when the host's heartbeats stop, and once the host
/// runs again audio resumes in a new session, fresh: nothing the stopped host had left
/// unread is played.
#[test]
fn a_stopped_host_costs_the_guest_bounded_memory_and_resumes_with_fresh_audio() {
    let _serial = serial();
    let dir = scratch("host-stopped");
    let sock = dir.join("port.sock");
    let mut host = host_wav(&dir, &sock);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).expect("melange-host listens");
    let pw = PipeWire::start(&dir.join("guest"));
    let mut guest =
        start_guest(&pw, &format!("unix:{}", sock.display()), GuestCodec::Opus(128_000), dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let module = child_named(guest.pid(), "pipewire");
    let started = Instant::now();
    let mut app = long_tone(&pw, &dir, 20.0);
    host.wait_for_log("stream 1 opened", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let before_kib = proc_status_kib(module, "VmRSS:");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(host.pid() as i32, libc::SIGSTOP) };
    let mut peak_kib = before_kib;
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_secs(10) {
        peak_kib = peak_kib.max(proc_status_kib(module, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let dropped = tap_counters(&pw).map_or(0, |p| counter(&p, "melange.packets.dropped"));
    // SAFETY: as above.
    unsafe { libc::kill(host.pid() as i32, libc::SIGCONT) };
    let resumed = Instant::now();
    // A later session's file (the stopped host finds the guest's abandoned attempts in
    // its backlog first, each a session of its own).
    let later = |p: &PathBuf| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with("s1-"));
    let back = wait_until(Duration::from_secs(5), || {
        wav_files(&dir.join("wav"))
            .into_iter()
            .filter(later)
            .find(|p| std::fs::metadata(p).map_or(0, |m| m.len()) > 44 + 4 * 4800)
            .map(|_| Instant::now())
    });
    let status = app.wait().expect("pw-play runs");
    let played = started.elapsed().as_secs_f64();
    guest.stop();
    host.stop();

    let back = back.unwrap_or_else(|| panic!("no audio after the host ran again:\n{}", host.log_text()));
    let resume_ms = back.duration_since(resumed).as_secs_f64() * 1000.0;
    eprintln!(
        "module RSS {before_kib} KiB before, {peak_kib} KiB at most while the host was stopped; {dropped} packets \
         dropped; audio back {resume_ms:.0} ms after the host ran again; pw-play took {played:.2} s"
    );
    assert!(status.success() && (played - 20.0).abs() < 1.0, "the app was affected: {played:.2} s for 20 s");
    assert!(peak_kib <= before_kib + 2048, "the module grew from {before_kib} to {peak_kib} KiB");
    // A second or two of it waits in the port and the queue, and the count is put on
    // the node once a second.
    assert!(dropped >= 600, "only {dropped} of 1000 packets counted as dropped over 10 s");
    assert!(resume_ms <= 1500.0, "audio came back {resume_ms:.0} ms after the host ran again");
    assert!(guest.log_text().contains("peer silent"), "the guest did not notice:\n{}", guest.log_text());
    // Fresh: every stream's audio was at most a few cycles old when played.
    for r in reports(&dir) {
        let p99 = r["latency_ms_p99"].as_f64().unwrap_or(0.0);
        assert!(p99 < 200.0, "stream {} played audio {p99:.0} ms old: {r}", r["stream"]);
    }
    let second: Vec<PathBuf> = wav_files(&dir.join("wav")).into_iter().filter(later).collect();
    assert_eq!(second.len(), 1, "one stream after the host ran again: {second:?}");
    assert_tone(&second[0], 3.0);
}

/// The thread of `pid` called `comm`, as its `/proc/PID/task/TID` directory.
fn thread_named(pid: u32, comm: &str) -> Option<PathBuf> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks
        .filter_map(|t| t.ok().map(|t| t.path()))
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == comm))
}

/// CPU seconds of each thread of `pid`, by name.
fn threads_cpu(pid: u32) -> Vec<(String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| t.ok().map(|t| t.path()))
        .map(|t| {
            (std::fs::read_to_string(t.join("comm")).unwrap_or_default().trim().to_owned(), thread_cpu_seconds(&t))
        })
        .collect()
}

/// Context switches (voluntary and not) of a thread: how often it woke.
fn thread_switches(task: &Path) -> u64 {
    let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
    let count = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok());
    count("voluntary_ctxt_switches:").unwrap_or(0) + count("nonvoluntary_ctxt_switches:").unwrap_or(0)
}

/// CPU seconds a thread has used.
fn thread_cpu_seconds(task: &Path) -> f64 {
    let tid = task.file_name().and_then(|n| n.to_str()?.parse().ok()).unwrap_or(0);
    let pid = task.parent().and_then(|t| t.parent()?.file_name()?.to_str()?.parse().ok()).unwrap_or(0);
    // /proc/PID/task/TID/stat has the same layout as /proc/PID/stat.
    melange_tests::cpu_seconds_of(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// No host for 20 s while an app plays (the 10-minute case in small): the app plays on
/// in time, the module neither encodes nor grows, its I/O thread wakes a few times a
/// second (counted), what the tap captures is dropped and counted, and when a host
/// comes at last it gets fresh audio within a second and a half.
#[test]
fn an_absent_host_costs_the_guest_next_to_nothing_and_apps_play_on() {
    let _serial = serial();
    let dir = scratch("host-absent");
    let sock = dir.join("port.sock");
    let pw = PipeWire::start(&dir.join("guest"));
    let mut guest =
        start_guest(&pw, &format!("unix:{}", sock.display()), GuestCodec::Opus(128_000), dir.join("guest.log"));
    let module = child_named(guest.pid(), "pipewire");
    let started = Instant::now();
    let mut app = long_tone(&pw, &dir, 30.0);
    let first =
        wait_until(Duration::from_secs(10), || tap_counters(&pw).filter(|p| counter(p, "melange.packets.dropped") > 0))
            .expect("the tap's counters appear");
    let connected = &first["melange.host.connected"];
    assert!(connected == false || connected == "false", "no host, but the node says connected: {connected}");
    let (cpu_before, rss_before) = (melange_tests::cpu_seconds(module), proc_status_kib(module, "VmRSS:"));
    let io = thread_named(module, "melange-guest").expect("the module's melange-guest thread");
    let threads_before = threads_cpu(module);
    let (io_cpu_before, wakes_before) = (thread_cpu_seconds(&io), thread_switches(&io));
    let window = Instant::now();
    let mut rss_peak = rss_before;
    while window.elapsed() < Duration::from_secs(20) {
        rss_peak = rss_peak.max(proc_status_kib(module, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(250));
    }
    let seconds = window.elapsed().as_secs_f64();
    let cpu_pct = (melange_tests::cpu_seconds(module) - cpu_before) / seconds * 100.0;
    let io_cpu_pct = (thread_cpu_seconds(&io) - io_cpu_before) / seconds * 100.0;
    let by_thread: Vec<String> = threads_cpu(module)
        .into_iter()
        .zip(threads_before)
        .map(|((name, after), (_, before))| format!("{name} {:.2} %", (after - before) / seconds * 100.0))
        .collect();
    let wakes = (thread_switches(&io) - wakes_before) as f64 / seconds;
    let last = tap_counters(&pw).expect("counters");
    let dropped = counter(&last, "melange.packets.dropped") - counter(&first, "melange.packets.dropped");

    let mut host = host_wav(&dir, &sock);
    let came = Instant::now();
    let back = wait_until(Duration::from_secs(5), || {
        wav_files(&dir.join("wav"))
            .into_iter()
            .find(|p| std::fs::metadata(p).map_or(0, |m| m.len()) > 44 + 4 * 2 * 4800)
            .map(|_| came.elapsed())
    });
    let status = app.wait().expect("pw-play runs");
    let played = started.elapsed().as_secs_f64();
    guest.stop();
    host.stop();

    eprintln!(
        "no host for {seconds:.1} s: module CPU {cpu_pct:.3} % of a core (its I/O thread {io_cpu_pct:.3} %, woke \
         {wakes:.1} times/s; by thread: {}), RSS \
         {rss_before} -> {rss_peak} KiB, {dropped} packets dropped unencoded; audio {back:?} after a host came; \
         pw-play took {played:.2} s",
        by_thread.join(", ")
    );
    assert!(status.success() && (played - 30.0).abs() < 1.0, "the app was affected: {played:.2} s for 30 s");
    assert!(wakes < 30.0, "the I/O thread woke {wakes:.1} times a second with no host");
    assert!(rss_peak <= rss_before + 1024, "the module grew from {rss_before} to {rss_peak} KiB");
    // 100 packets a second; the count is put on the node once a second.
    assert!(dropped as f64 >= 80.0 * (seconds - 2.0), "only {dropped} packets counted as dropped in {seconds:.1} s");
    let back = back.unwrap_or_else(|| panic!("no audio once a host came:\n{}", host.log_text()));
    assert!(back <= Duration::from_millis(1500), "audio came {back:?} after the host");
    let wav = wav_files(&dir.join("wav"));
    assert_eq!(wav.len(), 1, "one stream: {wav:?}");
    for r in reports(&dir) {
        let p99 = r["latency_ms_p99"].as_f64().unwrap_or(0.0);
        assert!(p99 < 200.0, "stream {} played audio {p99:.0} ms old: {r}", r["stream"]);
    }
    assert_tone(&wav[0], 2.0);
}

/// The host reads the guest's port at half the rate Opus makes at 128 kbit/s: the
/// bitrate steps down until the port keeps up, the stream stays open (control gets
/// through), the guest's memory stays flat and what cannot be sent is dropped oldest
/// first and counted; once the host reads at full speed again the bitrate climbs back.
/// The steps show on the tap's node (`melange.*` properties) and in the log.
#[test]
fn a_host_reading_at_half_the_rate_steps_the_bitrate_down_and_back_up() {
    let _serial = serial();
    let dir = scratch("slow-host");
    let (host_sock, guest_sock) = (dir.join("host.sock"), dir.join("guest.sock"));
    let mut host = host_wav_with(&dir, &host_sock, &["--stats"]);
    wait_until(Duration::from_secs(10), || host_sock.exists().then_some(())).expect("melange-host listens");
    let relay = Relay::start(&guest_sock, host_sock.clone());
    let pw = PipeWire::start(&dir.join("guest"));
    let mut guest =
        start_guest(&pw, &format!("unix:{}", guest_sock.display()), GuestCodec::Opus(128_000), dir.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let module = child_named(guest.pid(), "pipewire");
    let mut app = long_tone(&pw, &dir, 45.0);
    host.wait_for_log("stream 1 opened", Duration::from_secs(10));
    let full = wait_until(Duration::from_secs(5), || tap_counters(&pw).filter(|p| counter(p, "melange.bitrate") > 0))
        .expect("the tap's counters appear");
    assert_eq!(counter(&full, "melange.bitrate"), 128_000);
    let before_kib = proc_status_kib(module, "VmRSS:");

    std::thread::sleep(Duration::from_secs(2));
    let kbps_before = stats_kbps(&host).len();
    // 128 kbit/s is 16 kB/s of Opus: pass 8.
    relay.throttle(Some(8_000));
    let lowered = wait_until(Duration::from_secs(15), || {
        tap_counters(&pw).filter(|p| counter(p, "melange.bitrate") <= 64_000 && counter(p, "melange.bitrate") > 0)
    });
    std::thread::sleep(Duration::from_secs(5));
    let slow = tap_counters(&pw).expect("counters");
    let kbps_slow = stats_kbps(&host).len();
    let peak_kib = proc_status_kib(module, "VmRSS:");
    relay.throttle(None);
    let restored =
        wait_until(Duration::from_secs(30), || tap_counters(&pw).filter(|p| counter(p, "melange.bitrate") == 128_000));
    let _ = app.kill();
    let _ = app.wait();
    guest.stop();
    host.stop();

    let lowered = lowered.unwrap_or_else(|| panic!("the bitrate did not step down:\n{}", guest.log_text()));
    eprintln!(
        "at half the rate: {} bit/s, {} steps down, {} packets dropped; module RSS {before_kib} -> {peak_kib} KiB",
        counter(&slow, "melange.bitrate"),
        counter(&slow, "melange.bitrate.steps.down"),
        counter(&slow, "melange.packets.dropped")
    );
    assert!(counter(&lowered, "melange.bitrate") >= 24_000);
    assert!(counter(&slow, "melange.bitrate.steps.down") >= 2);
    let restored = restored.unwrap_or_else(|| panic!("the bitrate did not climb back:\n{}", guest.log_text()));
    assert!(counter(&restored, "melange.bitrate.steps.up") >= 2);
    assert!(peak_kib <= before_kib + 2048, "the module grew from {before_kib} to {peak_kib} KiB");
    // Control got through all along: one session, one stream, never closed by a timeout.
    let opened = lines(&host.log).iter().filter(|l| l.contains("opened:")).count();
    assert_eq!(opened, 1, "the stream was opened {opened} times:\n{}", host.log_text());
    // melange-host --stats saw it too: what arrived fell to what the port passes.
    let kbps = stats_kbps(&host);
    assert!(kbps[..kbps_before].iter().any(|k| *k > 120.0), "--stats before the throttle: {kbps:?}");
    let during = &kbps[kbps_before..kbps_slow];
    assert!(during.iter().rev().take(3).all(|k| *k < 70.0), "--stats while throttled: {during:?}");
    assert!(guest.log_text().contains("Opus bitrate down to"), "no step in the log");
    assert!(guest.log_text().contains("Opus bitrate up to"), "no step back up in the log");
}
