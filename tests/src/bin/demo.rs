//! The Melange demo: redirection end to end on a local stand-in for a VM.
//!
//! A headless "guest" PipeWire session (pipewire, WirePlumber, pipewire-pulse) runs the
//! Melange guest module; a unix socket stands in for the virtio-serial port; an app
//! (`pw-play`) plays a sample in the guest; `melange-host` renders it into this
//! machine's PipeWire if one is running, else into WAV files. Runs once with Opus and
//! once with PCM, and prints where the sound went, the latency and the bitrate.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use melange_tests::audio;
use melange_tests::{reports, scratch, start_guest, start_host, wait_until, GuestCodec, PipeWire};

fn sample(path: &Path) {
    // Three seconds of an arpeggio (A minor), panned left to right, with a soft attack.
    let rate = 48000u32;
    let notes = [220.0, 261.63, 329.63, 440.0, 523.25, 659.25];
    let note_len = rate as usize / 2;
    let mut out = Vec::with_capacity(notes.len() * note_len * 2);
    for (i, f) in notes.iter().enumerate() {
        for n in 0..note_len {
            let t = n as f64 / f64::from(rate);
            let env = (t * 40.0).min(1.0) * (-t * 3.0).exp();
            let v = 0.3
                * env
                * ((2.0 * std::f64::consts::PI * f * t).sin() + 0.3 * (4.0 * std::f64::consts::PI * f * t).sin());
            let pan = i as f64 / (notes.len() - 1) as f64;
            out.push((v * (1.0 - pan) * 32767.0) as i16);
            out.push((v * pan * 32767.0) as i16);
        }
    }
    audio::write_wav_s16(path, rate, 2, &out);
}

fn run() -> Result<(), String> {
    let dir = scratch("demo");
    let host_has_pipewire = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| Path::new(&d).join(std::env::var("PIPEWIRE_REMOTE").unwrap_or_else(|_| "pipewire-0".into())))
        .is_some_and(|s| s.exists());
    let wav_dir = dir.join("host-output");
    let output = if host_has_pipewire { "pipewire".to_string() } else { format!("wav:{}", wav_dir.display()) };
    let sock = dir.join("vm1.sock");
    println!("Melange demo (scratch directory {})", dir.display());
    println!(
        "  host:  melange-host --listen unix:{} --output {output}{}",
        sock.display(),
        if host_has_pipewire { "" } else { "   (no PipeWire running here, so WAV files)" }
    );
    let mut host = start_host(&["--listen", &format!("unix:{}", sock.display()), "--output", &output], None, &dir);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).ok_or("melange-host did not start")?;
    let pw = PipeWire::start(&dir.join("guest"));
    println!("  guest: headless PipeWire + WirePlumber + pipewire-pulse in {}", pw.dir.display());
    let file = dir.join("sample.wav");
    sample(&file);

    let mut rows = Vec::new();
    for (i, codec) in [GuestCodec::Opus(128_000), GuestCodec::Pcm].into_iter().enumerate() {
        let name = match codec {
            GuestCodec::Opus(_) => "opus 128 kbit/s",
            GuestCodec::Pcm => "pcm s16le",
        };
        let mut guest =
            start_guest(&pw, &format!("unix:{}", sock.display()), codec, dir.join(format!("guest-{i}.log")));
        guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
        println!("  guest app: pw-play {} ({name})", file.display());
        pw.run("pw-play", &[&file.to_string_lossy()]);
        wait_until(Duration::from_secs(10), || (reports(&dir).len() > i).then_some(()))
            .ok_or_else(|| format!("the host did not report the stream:\n{}", host.log_text()))?;
        guest.stop();
        rows.push((name, reports(&dir)[i].clone()));
    }
    host.stop();

    println!();
    println!("{:<16} {:>10} {:>10} {:>12}  where the sound went", "codec", "p50 ms", "p99 ms", "wire kbit/s");
    for (name, r) in &rows {
        let ms = |k: &str| r[k].as_f64().map_or("n/a".into(), |v| format!("{v:.1}"));
        let where_ = if host_has_pipewire {
            format!("this machine's PipeWire, stream \"{} (guest)\"", r["app"].as_str().unwrap_or(""))
        } else {
            r["output"].as_str().unwrap_or("").to_string()
        };
        println!(
            "{:<16} {:>10} {:>10} {:>12.1}  {}",
            name,
            ms("latency_ms_p50"),
            ms("latency_ms_p99"),
            r["wire_bytes_per_s"].as_f64().unwrap_or(0.0) * 8.0 / 1000.0,
            where_
        );
    }
    println!();
    println!("Latency: from the guest graph time a sample would have played at, to its arrival in");
    println!("melange-host plus what is queued there (the jitter buffer, for --output pipewire);");
    println!("negative: it arrived before the guest would have started playing it (pw-play uses large graph cycles).");
    println!("Logs: {}/host.log and {}/guest-*.log", dir.display(), dir.display());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("melange-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
