//! `melange-bench`: figures for the redirection path, measured on this machine.
//!
//! For each codec and stream count: N copies of `pw-play` play a 10 s tone at once in a
//! headless guest session; the guest module sends them to `melange-host`, which plays
//! them into a headless host PipeWire session (a null sink stands in for speakers).
//! Printed per configuration:
//! - added latency p50/p99 (ms): guest presentation time to arrival at melange-host
//!   plus the host's jitter-buffer fill (one clock: both ends run on this machine);
//! - guest CPU per stream (% of one core): the module process's CPU time while
//!   streaming, minus its idle rate, divided by N;
//! - bytes per second per stream on the port.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use melange_tests::audio;
use melange_tests::{cpu_seconds, reports, scratch, start_guest, start_host, wait_until, GuestCodec, PipeWire};

/// The `pipewire -c melange-guest.conf` process under the launcher script.
fn module_pid(launcher: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid: &u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "pipewire"))
}

struct Row {
    codec: &'static str,
    streams: usize,
    p50: f64,
    p99: f64,
    cpu_pct_per_stream: f64,
    bytes_per_s: f64,
    underruns: u64,
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

fn measure(dir: &Path, codec: GuestCodec, name: &'static str, streams: usize, seconds: f64) -> Result<Row, String> {
    let run = dir.join(format!("{name}-{streams}").replace(' ', "-"));
    std::fs::create_dir_all(&run).map_err(|e| e.to_string())?;
    let host_pw = PipeWire::start(&run.join("host"));
    host_pw.add_null_sink("speakers");
    let sock = run.join("port.sock");
    let mut host =
        start_host(&["--listen", &format!("unix:{}", sock.display()), "--output", "pipewire"], Some(&host_pw), &run);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).ok_or("melange-host did not start")?;
    let pw = PipeWire::start(&run.join("guest"));
    let mut guest = start_guest(&pw, &format!("unix:{}", sock.display()), codec, run.join("guest.log"));
    guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let pid = module_pid(guest.pid()).ok_or("cannot find the guest module process")?;

    // Idle rate first, so the per-stream figure is what streaming costs.
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let idle = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();

    let file = run.join("tone.wav");
    audio::write_wav_s16(&file, 48000, 2, &audio::to_s16(&audio::tone(997.0, 48000, seconds, 0.25), 2));
    let apps: Vec<_> = (0..streams)
        .map(|_| pw.command("pw-play").arg(&file).spawn().map_err(|e| format!("pw-play: {e}")))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let (c1, t1) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds - 2.0));
    let busy = (cpu_seconds(pid) - c1) / t1.elapsed().as_secs_f64();
    for mut app in apps {
        let _ = app.wait();
    }
    wait_until(Duration::from_secs(15), || (reports(&run).len() >= streams).then_some(()))
        .ok_or_else(|| format!("host reported fewer than {streams} streams:\n{}", host.log_text()))?;
    guest.stop();
    host.stop();
    let reps = reports(&run);
    let get = |k: &str| reps.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>();
    Ok(Row {
        codec: name,
        streams,
        p50: percentile(get("latency_ms_p50"), 0.5),
        p99: percentile(get("latency_ms_p99"), 0.5),
        cpu_pct_per_stream: (busy - idle).max(0.0) * 100.0 / streams as f64,
        bytes_per_s: get("wire_bytes_per_s").iter().sum::<f64>() / streams as f64,
        underruns: reps.iter().filter_map(|r| r["underruns"].as_u64()).sum(),
    })
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 =
        args.iter().position(|a| a == "--seconds").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(10.0);
    let counts: Vec<usize> = args
        .iter()
        .position(|a| a == "--streams")
        .and_then(|i| args.get(i + 1))
        .map_or(vec![1, 8], |s| s.split(',').filter_map(|n| n.parse().ok()).collect());
    let dir = scratch("bench");
    let mut rows = Vec::new();
    for (codec, name) in [(GuestCodec::Opus(128_000), "opus 128k"), (GuestCodec::Pcm, "pcm s16")] {
        for &n in &counts {
            eprintln!("melange-bench: {name}, {n} stream(s), {seconds} s ...");
            rows.push(measure(&dir, codec, name, n, seconds)?);
        }
    }
    println!(
        "{:<10} {:>7} {:>8} {:>8} {:>14} {:>12} {:>10}",
        "codec", "streams", "p50 ms", "p99 ms", "cpu %/stream", "bytes/s", "underruns"
    );
    for r in &rows {
        println!(
            "{:<10} {:>7} {:>8.1} {:>8.1} {:>14.2} {:>12.0} {:>10}",
            r.codec, r.streams, r.p50, r.p99, r.cpu_pct_per_stream, r.bytes_per_s, r.underruns
        );
    }
    println!("(p50/p99: median over streams of each stream's percentile; 30 ms jitter target; one machine, one clock)");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("melange-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
