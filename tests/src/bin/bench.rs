//! `melange-bench`: Melange against PipeWire's own network modules, in one run, on this
//! machine, with the same input.
//!
//! ```text
//! melange-bench [--seconds N] [--streams 1,8,32] [--systems a,b] [--json FILE] [--svg FILE]
//! ```
//!
//! Systems: `melange-opus` (the default: Opus 10 ms), `melange-opus-video` (the same
//! while 8 Mbit/s of synthetic video, 200 KB keyframes every 2 s, shares the port through
//! the media broker: audio goes first), `melange-low-latency`, `melange-pcm`, `rtp-l16` (module-rtp-sink to module-rtp-source, L16) and
//! `pulse-tunnel` (module-pulse-tunnel to a pipewire-pulse on the host side). Each runs
//! between two headless PipeWire sessions, a guest and a host, whose null sink stands
//! in for the speakers; the guest side of each system runs in its own `pipewire`
//! process, so its CPU is measured alone.
//!
//! - Latency, from app to host output on one clock: `melange-probe play` is the app and
//!   stamps each click of a click train with the graph time it entered the guest graph;
//!   `melange-probe record` stamps each click as it leaves the system's playback stream
//!   on the host (recorded directly: the null sink stand-in's monitor would add a cycle
//!   that it does not report). p50/p99 over the clicks of the 1-stream run, after the
//!   first 3 s (convergence).
//! - Guest CPU per stream (% of one core): the guest-side process's CPU while N apps
//!   play, divided by N (not minus its idle rate: the peers stream silence when idle).
//!   The peers mix every app into one stream, so their cost per stream falls with N;
//!   Melange keeps one stream per app. `guest_cpu_pct_per_stream` is the 1-stream
//!   figure, `guest_cpu_pct_per_stream_by_streams` has them all.
//! - Bytes per second per stream on the wire: Melange's port bytes (melange-host's
//!   report); for the peers, bytes sent on the loopback interface (IP and UDP/TCP
//!   headers included, as on a network), divided by N.
//! - Quality: correlation of the host recording with the source, aligned (1 = same).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use melange_tests::audio;
use melange_tests::{
    child_named, cpu_seconds, reports, scratch, start_guest_with, start_host, wait_until, GuestCodec, PipeWire, Proc,
};
use melange_transport::frame::HEADER_LEN;
use serde_json::json;

const RATE: u32 = 48_000;
/// Seconds of each latency run treated as convergence and left out of the figures.
const SETTLE_S: f64 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    MelangeOpus,
    MelangeOpusVideo,
    MelangeLowLatency,
    MelangePcm,
    Rtp,
    PulseTunnel,
    MelangeOpusPlayer,
    MelangeCamera,
    MelangeCameraVp8,
    MelangeCameraH264,
}

impl System {
    const ALL: [System; 10] = [
        System::MelangeOpus,
        System::MelangeOpusVideo,
        System::MelangeLowLatency,
        System::MelangePcm,
        System::Rtp,
        System::PulseTunnel,
        System::MelangeOpusPlayer,
        System::MelangeCamera,
        System::MelangeCameraVp8,
        System::MelangeCameraH264,
    ];

    /// What runs without `--systems`: the audio comparison.
    const DEFAULT: [System; 6] = [
        System::MelangeOpus,
        System::MelangeOpusVideo,
        System::MelangeLowLatency,
        System::MelangePcm,
        System::Rtp,
        System::PulseTunnel,
    ];

    fn name(self) -> &'static str {
        match self {
            System::MelangeOpus => "melange-opus",
            System::MelangeOpusVideo => "melange-opus-video",
            System::MelangeLowLatency => "melange-low-latency",
            System::MelangePcm => "melange-pcm",
            System::Rtp => "rtp-l16",
            System::PulseTunnel => "pulse-tunnel",
            System::MelangeOpusPlayer => "melange-opus-player",
            System::MelangeCamera => "melange-camera",
            System::MelangeCameraVp8 => "melange-camera-vp8",
            System::MelangeCameraH264 => "melange-camera-h264",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            System::MelangeOpus => "Melange, Opus 128 kbit/s, 10 ms packets (default)",
            System::MelangeOpusVideo => {
                "Melange, Opus as above, while 8 Mbit/s of video (200 KB keyframes every 2 s) shares the port"
            }
            System::MelangeLowLatency => "Melange low-latency mode, Opus 2.5 ms packets",
            System::MelangePcm => "Melange, PCM s16",
            System::Rtp => "module-rtp-sink -> module-rtp-source, L16, defaults",
            System::PulseTunnel => "module-pulse-tunnel -> pipewire-pulse, defaults",
            System::MelangeOpusPlayer => {
                "Melange, Opus as above, while a playbin player forwards a 720p30 H.264 + AAC clip \
                 (melange-player), against the same player decoding in the guest (one stream only)"
            }
            System::MelangeCamera => {
                "the host's camera (melange-test-camera, 640x360 I420 at 30 fps) to a guest app (pipewiresrc) \
                 through \"Melange camera\", raw: latency from the camera's frame to the app, guest CPU"
            }
            System::MelangeCameraVp8 => "the camera as melange-camera, encoded: melange-host --camera-codec vp8",
            System::MelangeCameraH264 => "the camera as melange-camera, encoded: melange-host --camera-codec h264",
        }
    }

    /// The guest sink apps play into.
    fn sink(self) -> &'static str {
        match self {
            System::MelangeOpus
            | System::MelangeOpusVideo
            | System::MelangeLowLatency
            | System::MelangePcm
            | System::MelangeOpusPlayer
            | System::MelangeCamera
            | System::MelangeCameraVp8
            | System::MelangeCameraH264 => "melange",
            System::Rtp => "bench-rtp-sink",
            System::PulseTunnel => "bench-tunnel-sink",
        }
    }

    fn is_melange(self) -> bool {
        matches!(
            self,
            System::MelangeOpus
                | System::MelangeOpusVideo
                | System::MelangeLowLatency
                | System::MelangePcm
                | System::MelangeOpusPlayer
                | System::MelangeCamera
                | System::MelangeCameraVp8
                | System::MelangeCameraH264
        )
    }

    /// `--camera-codec` of the camera systems.
    fn camera_codec(self) -> Option<&'static str> {
        match self {
            System::MelangeCamera => Some("raw"),
            System::MelangeCameraVp8 => Some("vp8"),
            System::MelangeCameraH264 => Some("h264"),
            _ => None,
        }
    }
}

/// `--systems` takes the names [`System::name`] gives, and `--help` lists them with
/// what each is.
impl clap::ValueEnum for System {
    fn value_variants<'a>() -> &'a [Self] {
        &System::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(self.describe()))
    }
}

/// Melange against PipeWire's own network modules, in one run, on this machine, with
/// the same input (see `scripts/bench`).
#[derive(Debug, clap::Parser)]
#[command(name = "melange-bench")]
struct Args {
    /// Seconds each run plays (at least 6: the first 3 are convergence).
    #[arg(long, value_name = "N", default_value_t = 12.0)]
    seconds: f64,
    /// How many streams play at once, one run per count.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_value = "1,8,32")]
    streams: Vec<usize>,
    /// The systems to measure, in this order [default: all].
    #[arg(long, value_name = "SYSTEM,SYSTEM,...", value_delimiter = ',')]
    systems: Vec<System>,
    /// Where the results go as JSON, one object per system [default: in the scratch
    /// directory].
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where the latency distributions go as SVG [default: in the scratch directory].
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// One run: a system with N streams.
#[derive(Debug, Default, Clone)]
struct Run {
    cpu_pct_per_stream: f64,
    wire_bytes_per_s_per_stream: f64,
    latencies_ms: Vec<f64>,
    quality: Option<f64>,
    underruns: u64,
    player: Option<PlayerFigures>,
}

/// What `melange-opus-player` measures besides the tapped stream.
#[derive(Debug, Default, Clone)]
struct PlayerFigures {
    /// The player's CPU, % of one core, forwarding and decoding in the guest.
    cpu_forwarding_pct: f64,
    cpu_decoding_pct: f64,
    /// The guest module's process (taps and broker) while the player forwards.
    module_pct: f64,
    /// Bytes of its streams on the port against the file's, per second.
    wire_bytes_per_s: f64,
    file_bytes_per_s: f64,
    /// Picture minus sound on the host, ms, per frame after the first 3 s.
    av_offsets_ms: Vec<f64>,
    frames_shown: usize,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// Bytes sent on the loopback interface so far.
fn loopback_tx_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == "lo").then(|| rest.split_whitespace().nth(8)?.parse().ok())?
        })
        .unwrap_or(0)
}

/// A `pipewire -c CONF` process loading one module, as a client of `pw`.
fn module_process(pw: &PipeWire, dir: &Path, name: &str, module: &str, args: &str) -> Proc {
    let conf = dir.join(format!("{name}.conf"));
    let text = format!(
        "context.properties = {{ log.level = 2 }}\n\
         context.spa-libs = {{ audio.convert.* = audioconvert/libspa-audioconvert\n    support.* = support/libspa-support }}\n\
         context.modules = [\n\
         {{ name = libpipewire-module-rt flags = [ ifexists nofail ] }}\n\
         {{ name = libpipewire-module-protocol-native }}\n\
         {{ name = libpipewire-module-client-node }}\n\
         {{ name = libpipewire-module-adapter }}\n\
         {{ name = {module} args = {{ {args} }} }}\n]\n"
    );
    std::fs::write(&conf, text).unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
    let mut cmd = pw.command("pipewire");
    cmd.arg("-c").arg(&conf);
    Proc::spawn(cmd, dir.join(format!("{name}.log")))
}

fn wait_for_node(pw: &PipeWire, name: &str, timeout: Duration) -> Result<(), String> {
    wait_until(timeout, || pw.node_props(name)).map(|_| ()).ok_or_else(|| format!("node {name} did not appear"))
}

/// Pairs each click heard on the host with the latest click played before it.
fn latencies(played: &Path, heard: &Path) -> Vec<f64> {
    let read = |p: &Path| -> Vec<(i64, i64)> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["onset_ns"].as_i64()?, v["delay_ns"].as_i64().unwrap_or(0))))
            .collect()
    };
    let played = read(played);
    let heard = read(heard);
    let Some(first) = played.first().map(|p| p.0) else { return Vec::new() };
    heard
        .iter()
        .filter_map(|(t, _)| {
            let p = played.iter().rev().find(|(pt, _)| pt <= t)?;
            let ms = (t - p.0) as f64 / 1e6;
            let period_ms = audio::CLICK_PERIOD * 1000.0;
            (ms < period_ms && (p.0 - first) as f64 / 1e9 >= SETTLE_S).then_some(ms)
        })
        .collect()
}

/// Correlation of the host recording with the source: the median over 100 ms windows,
/// one per click period, each aligned on its own (the signal repeats every period, and
/// rate matching slowly shifts the alignment).
fn quality(recording: &Path, seconds: f64) -> Option<f64> {
    let rec = audio::read_wav(recording).ok()?.channel(0);
    let source = audio::click_train(RATE, seconds);
    let period = (f64::from(RATE) * audio::CLICK_PERIOD) as usize;
    let s0 = *audio::click_onsets(&source, RATE).first()?;
    let (window, search) = (RATE as usize / 10, 96);
    // The chirp between clicks, from 20 ms after a click.
    let src = source.get(s0 + 960..s0 + 960 + window)?;
    let mut values: Vec<f64> = audio::click_onsets(&rec, RATE)
        .into_iter()
        .skip(2)
        .filter_map(|r| {
            let base = (r + 960).checked_sub(search)?;
            let lag = audio::best_lag(src, rec.get(base..)?, 2 * search, window);
            Some(audio::correlation(src, rec.get(base + lag..base + lag + window)?))
        })
        .collect();
    let _ = period;
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

struct Setup {
    host: PipeWire,
    guest: PipeWire,
    /// `node.name` of a peer's playback stream on the host (Melange's appear per app).
    host_stream: String,
    /// Guest-side process (CPU is measured on it) and host-side process.
    guest_side: Proc,
    _host_side: Proc,
}

fn setup(system: System, dir: &Path, index: usize) -> Result<Setup, String> {
    let host_dir = dir.join("host");
    if system == System::PulseTunnel {
        let conf = host_dir.join("config/pipewire/pipewire-pulse.conf.d");
        std::fs::create_dir_all(&conf).map_err(|e| e.to_string())?;
        std::fs::write(
            conf.join("50-bench-tcp.conf"),
            format!(
                "pulse.properties = {{ server.address = [ \"unix:native\" \"tcp:127.0.0.1:{}\" ] }}\n",
                24713 + index
            ),
        )
        .map_err(|e| e.to_string())?;
    }
    let host = PipeWire::start(&host_dir);
    host.add_null_sink("speakers");
    let guest = PipeWire::start(&dir.join("guest"));
    let sock = dir.join("port.sock");
    let (guest_side, host_side) = match system {
        // (melange-camera is measured by measure_camera, with a session of its own.)
        System::MelangeOpus
        | System::MelangeOpusVideo
        | System::MelangeLowLatency
        | System::MelangePcm
        | System::MelangeOpusPlayer
        | System::MelangeCamera
        | System::MelangeCameraVp8
        | System::MelangeCameraH264 => {
            let listen = format!("unix:{}", sock.display());
            let frames = format!("frames:{}", dir.join("frames").display());
            let video = if system == System::MelangeOpusPlayer { frames.as_str() } else { "null" };
            let host_side =
                start_host(&["--listen", &listen, "--output", "pipewire", "--video-output", video], Some(&host), dir);
            wait_until(Duration::from_secs(10), || sock.exists().then_some(())).ok_or("melange-host did not start")?;
            let (codec, extra): (GuestCodec, &[&str]) = match system {
                System::MelangePcm => (GuestCodec::Pcm, &[]),
                System::MelangeLowLatency => (GuestCodec::Opus(128_000), &["--mode", "low-latency"]),
                _ => (GuestCodec::Opus(128_000), &[]),
            };
            let mut g =
                start_guest_with(&guest, &format!("unix:{}", sock.display()), codec, extra, dir.join("guest.log"));
            g.wait_for_log("connected to melange-host", Duration::from_secs(10));
            (g, host_side)
        }
        System::Rtp => {
            let (data, sap) = (26000 + 2 * index, 29875 + index);
            let host_side = module_process(
                &host,
                dir,
                "rtp-source",
                "libpipewire-module-rtp-source",
                &format!("sap.ip = 127.0.0.1 sap.port = {sap} local.ifname = lo stream.props = {{ target.object = speakers }}"),
            );
            let g = module_process(
                &guest,
                dir,
                "rtp-sink",
                "libpipewire-module-rtp-sink",
                &format!(
                    "destination.ip = 127.0.0.1 destination.port = {data} sap.ip = 127.0.0.1 sap.port = {sap} \
                     local.ifname = lo net.loop = true audio.format = S16BE audio.rate = 48000 audio.channels = 2 \
                     audio.position = [ FL FR ] stream.props = {{ node.name = {} }}",
                    system.sink()
                ),
            );
            wait_for_node(&guest, system.sink(), Duration::from_secs(10))?;
            (g, host_side)
        }
        System::PulseTunnel => {
            // pipewire-pulse itself is the host side; a placeholder keeps the shape.
            let mut sleeper = host.command("sleep");
            sleeper.arg("infinity");
            let idle = Proc::spawn(sleeper, dir.join("idle.log"));
            let g = module_process(
                &guest,
                dir,
                "pulse-tunnel",
                "libpipewire-module-pulse-tunnel",
                &format!(
                    "tunnel.mode = sink pulse.server.address = \"tcp:127.0.0.1:{}\" node.name = {} \
                     audio.rate = 48000 audio.channels = 2 audio.position = [ FL FR ]",
                    24713 + index,
                    system.sink()
                ),
            );
            wait_for_node(&guest, system.sink(), Duration::from_secs(10))?;
            (g, idle)
        }
    };
    let mut host_stream = String::new();
    if !system.is_melange() {
        // The peers' host-side stream appears only once they found each other (RTP: at
        // the next SAP announcement).
        host_stream = wait_until(Duration::from_secs(30), || {
            let nodes = host.nodes_where(|p| p["media.class"] == "Stream/Output/Audio");
            nodes.first().and_then(|p| p["node.name"].as_str().map(str::to_owned))
        })
        .ok_or_else(|| format!("{}: no stream appeared on the host side", system.name()))?;
    }
    Ok(Setup { host, guest, host_stream, guest_side, _host_side: host_side })
}

fn measure(system: System, streams: usize, seconds: f64, dir: &Path, index: usize) -> Result<Run, String> {
    let dir = dir.join(format!("{}-{streams}", system.name()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut s = setup(system, &dir, index)?;
    let pid = child_named(s.guest_side.pid(), "pipewire");

    // Idle rate first, so the per-stream figure is what streaming costs.
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let idle = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();

    let probe = melange_tests::bin("melange-probe");
    let (played, heard, wav) = (dir.join("played.jsonl"), dir.join("heard.jsonl"), dir.join("heard.wav"));
    let file = dir.join("clicks.wav");
    audio::write_wav_f32(&file, RATE, 1, &audio::click_train(RATE, seconds));
    let mut apps = Vec::new();
    for i in 0..streams {
        let mut cmd = if i == 0 && streams == 1 {
            let mut c = s.guest.command(&probe);
            c.args(["play", "--target", system.sink(), "--seconds", &seconds.to_string()]).arg("--out").arg(&played);
            c
        } else {
            let mut c = s.guest.command("pw-play");
            c.args(["--target", system.sink(), "--latency", "256"]).arg(&file);
            c
        };
        apps.push(cmd.spawn().map_err(|e| format!("cannot start an app: {e}"))?);
    }
    // The host-side playback stream is the output: recorded directly, once it exists
    // (a null sink's monitor would add a cycle that a sound card reports and it does not).
    let recorder = if streams == 1 {
        let target = match system.is_melange() {
            true => "melange.s1.stream1".to_string(),
            false => s.host_stream.clone(),
        };
        wait_for_node(&s.host, &target, Duration::from_secs(10))?;
        let mut cmd = s.host.command(&probe);
        cmd.args(["record", "--target", &target, "--seconds", &(seconds + 3.0).to_string()])
            .arg("--out")
            .arg(&heard)
            .arg("--wav")
            .arg(&wav);
        Some(Proc::spawn(cmd, dir.join("record.log")))
    } else {
        None
    };
    // Once the app is stream 1 on the host: 8 Mbit/s at 30 frames a second: a 200 KB keyframe every 2 s and 59 of 30.5 KB.
    let video = if system == System::MelangeOpusVideo {
        let mut cmd = s.guest.command(melange_tests::bin("melange-media-stub"));
        let units = ((seconds + 4.0) * 30.0) as u32;
        cmd.args(["--realtime", "--fps", "30", "--gop", "60", "--key-bytes", "200000", "--delta-bytes", "30500"])
            .args(["--units", &units.to_string(), "--log"])
            .arg(dir.join("video.jsonl"));
        Some(Proc::spawn(cmd, dir.join("video.log")))
    } else {
        None
    };
    let clip = (system == System::MelangeOpusPlayer).then(|| player_clip(&dir, seconds)).transpose()?;
    let player = match &clip {
        Some(clip) => Some(start_player(&s.guest, &dir, clip, true)?),
        None => None,
    };
    std::thread::sleep(Duration::from_secs(1));
    let player_cpu0 = player.as_ref().map(|p| cpu_seconds(p.pid()));
    let (c1, l1, t1) = (cpu_seconds(pid), loopback_tx_bytes(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds - 2.0));
    let busy = (cpu_seconds(pid) - c1) / t1.elapsed().as_secs_f64();
    let player_cpu =
        player_cpu0.zip(player.as_ref()).map(|(c0, p)| (cpu_seconds(p.pid()) - c0) / t1.elapsed().as_secs_f64());
    let lo_rate = loopback_tx_bytes().saturating_sub(l1) as f64 / t1.elapsed().as_secs_f64();
    let _ = std::fs::write(dir.join("cpu.txt"), format!("idle {idle:.5} busy {busy:.5} (cores)\n"));
    // An app that has not finished well after its file ended is stuck (see "Known
    // glitches" in docs/latency.md): stop it rather than wait for ever, and count it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stuck = 0;
    for mut app in apps {
        while app.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                stuck += 1;
                let _ = app.kill();
                let _ = app.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if stuck > 0 {
        eprintln!("melange-bench: {} x{streams}: {stuck} app(s) did not finish and were stopped", system.name());
    }
    if let Some(mut v) = video {
        v.stop();
    }
    if let Some(mut p) = player {
        wait_until(Duration::from_secs(15), || p.try_wait());
        p.stop();
    }
    if let Some(mut r) = recorder {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !heard.exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        r.stop();
    }
    // Busy, not busy minus idle: the peers stream silence while idle, so their idle
    // rate is their streaming cost; Melange's idle rate is near zero.
    let mut run = Run { cpu_pct_per_stream: busy * 100.0 / streams as f64, ..Run::default() };
    if system.is_melange() {
        let n = streams;
        wait_until(Duration::from_secs(15), || (reports(&dir).len() >= n).then_some(()));
        s.guest_side.stop();
        let reps = reports(&dir);
        run.wire_bytes_per_s_per_stream =
            reps.iter().filter_map(|r| r["wire_bytes_per_s"].as_f64()).sum::<f64>() / streams as f64;
        run.underruns = reps.iter().filter_map(|r| r["underruns"].as_u64()).sum();
    } else {
        run.wire_bytes_per_s_per_stream = lo_rate / streams as f64;
        s.guest_side.stop();
    }
    if streams == 1 {
        run.latencies_ms = latencies(&played, &heard);
        run.quality = quality(&wav, seconds);
    }
    if let (Some(clip), Some(forwarding)) = (&clip, player_cpu) {
        // The same player, decoding in the guest (no melange plugin), for comparison.
        let mut p = start_player(&s.guest, &dir, clip, false)?;
        std::thread::sleep(Duration::from_secs(1));
        let (c0, t0) = (cpu_seconds(p.pid()), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(seconds - 2.0));
        let decoding = (cpu_seconds(p.pid()) - c0) / t0.elapsed().as_secs_f64();
        wait_until(Duration::from_secs(15), || p.try_wait());
        p.stop();
        run.player = Some(player_figures(&dir, clip, forwarding, decoding, busy)?);
    }
    s.guest.stop();
    s.host.stop();
    Ok(run)
}

/// A 720p30 H.264 (B-frames, 3 Mbit/s) + AAC clip of `seconds` + 2 s, made once.
fn player_clip(dir: &Path, seconds: f64) -> Result<PathBuf, String> {
    let clip = dir.join("clip-720p.mp4");
    let frames = ((seconds + 2.0) * 30.0) as u32;
    let audio = ((seconds + 2.0) * 50.0) as u32;
    let pipeline = format!(
        "mp4mux name=m ! filesink location={} \
         videotestsrc num-buffers={frames} pattern=smpte horizontal-speed=4 ! \
         video/x-raw,width=1280,height=720,framerate=30/1 ! videoconvert ! \
         x264enc bitrate=3000 key-int-max=60 bframes=2 speed-preset=veryfast ! h264parse ! queue ! m. \
         audiotestsrc num-buffers={audio} samplesperbuffer=960 freq=440 volume=0.4 ! \
         audio/x-raw,rate=48000,channels=2 ! voaacenc bitrate=128000 ! aacparse ! queue ! m.",
        clip.display()
    );
    let out = std::process::Command::new("gst-launch-1.0")
        .args(["-q", "-e"])
        .args(pipeline.split_whitespace())
        .output()
        .map_err(|e| format!("gst-launch-1.0: {e}"))?;
    if !out.status.success() {
        return Err(format!("making the clip: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(clip)
}

/// `melange-player` on `clip` in the guest session: with the melange plugin
/// (`forwarding`), or without it, decoding into a fake video sink (there is no display)
/// and the guest's PipeWire.
fn start_player(guest: &PipeWire, dir: &Path, clip: &Path, forwarding: bool) -> Result<Proc, String> {
    let plugins = dir.join(if forwarding { "gst-plugin" } else { "gst-none" });
    std::fs::create_dir_all(&plugins).map_err(|e| e.to_string())?;
    if forwarding {
        std::fs::copy(melange_tests::profile_dir().join("libgstmelange.so"), plugins.join("libgstmelange.so"))
            .map_err(|e| format!("libgstmelange.so: {e}"))?;
    }
    let mut cmd = guest.command(melange_tests::bin("melange-player"));
    cmd.env("GST_PLUGIN_PATH", &plugins).env("GST_REGISTRY", plugins.join("registry.bin")).arg(clip);
    if !forwarding {
        cmd.args(["--video-sink", "fakesink sync=true"]);
    }
    let name = if forwarding { "player-forwarding.log" } else { "player-decoding.log" };
    Ok(Proc::spawn(cmd, dir.join(name)))
}

/// The player's figures from the host's frame logs (`dir/frames`).
fn player_figures(
    dir: &Path,
    clip: &Path,
    forwarding: f64,
    decoding: f64,
    module: f64,
) -> Result<PlayerFigures, String> {
    let frames_dir = dir.join("frames");
    let lines = |suffix: &str| -> Vec<serde_json::Value> {
        std::fs::read_dir(&frames_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .flat_map(|p| std::fs::read_to_string(p).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    };
    let (video, audio) = (lines(".h264.decoded.jsonl"), lines(".aac.decoded.jsonl"));
    let heard = |pts: i64| -> Option<f64> {
        audio.iter().find_map(|l| {
            let (start, n, due) = (l["pts_ns"].as_i64()?, l["frames"].as_i64()?, l["due_ns"].as_i64()?);
            (start..start + n * 1_000_000_000 / i64::from(RATE)).contains(&pts).then(|| (due + pts - start) as f64)
        })
    };
    let first = video.first().and_then(|f| f["pts_ns"].as_i64()).unwrap_or(0);
    let av_offsets_ms = video
        .iter()
        .filter_map(|f| Some((f["pts_ns"].as_i64()?, f["shown_ns"].as_f64()?)))
        .filter(|(pts, _)| pts - first >= 3_000_000_000)
        .filter_map(|(pts, shown)| Some((shown - heard(pts)?) / 1e6))
        .collect();
    // On the port: each unit's bytes, its 36-byte header and a frame header per 16 KiB.
    let units: Vec<serde_json::Value> =
        [".h264.jsonl", ".aac.jsonl"].iter().flat_map(|s| lines(s)).filter(|l| l["event"] == "au").collect();
    let wire: u64 = units
        .iter()
        .filter_map(|u| u["size"].as_u64())
        .map(|n| n + 36 + (n + 36).div_ceil(16 * 1024) * HEADER_LEN as u64)
        .sum();
    let span = |key: &str| -> f64 {
        let t: Vec<f64> = units.iter().filter_map(|u| u[key].as_f64()).collect();
        let (lo, hi) = t.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        ((hi - lo) / 1e9).max(1e-3)
    };
    let seconds = span("pts_ns");
    let file_bytes = std::fs::metadata(clip).map_err(|e| e.to_string())?.len() as f64;
    let clip_seconds = (video.len().max(1) as f64 / 30.0).max(seconds);
    Ok(PlayerFigures {
        cpu_forwarding_pct: forwarding * 100.0,
        cpu_decoding_pct: decoding * 100.0,
        module_pct: module * 100.0,
        wire_bytes_per_s: wire as f64 / seconds,
        file_bytes_per_s: file_bytes / clip_seconds,
        av_offsets_ms,
        frames_shown: video.len(),
    })
}

fn svg(results: &[(System, Vec<f64>)]) -> String {
    let (w, row, left) = (760.0, 46.0, 190.0);
    let max = results.iter().flat_map(|(_, v)| v.iter().copied()).fold(10.0f64, f64::max);
    let max = (max / 50.0).ceil() * 50.0;
    let x = |ms: f64| left + (w - left - 20.0) * ms / max;
    let h = 50.0 + row * results.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">Added latency, app to host output (ms); one dot per click, bar = p50, tick = p99</text>\n"
    );
    let mut t = 0.0;
    while t <= max {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" y1=\"30\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
            x(t),
            h - 15.0,
            h - 3.0,
            t
        );
        t += if max > 100.0 { 25.0 } else { 10.0 };
    }
    for (i, (system, v)) in results.iter().enumerate() {
        let y = 50.0 + row * i as f64;
        let _ = writeln!(s, "<text x=\"10\" y=\"{:.1}\">{}</text>", y + 4.0, system.name());
        for (k, ms) in v.iter().enumerate() {
            let jitter = (k % 7) as f64 * 2.0 - 6.0;
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#3465a4\" fill-opacity=\"0.6\"/>",
                x(*ms),
                y + jitter
            );
        }
        if !v.is_empty() {
            let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
            let _ = writeln!(
                s,
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#cc0000\" stroke-width=\"3\"/>\
                 <line x1=\"{3:.1}\" y1=\"{1:.1}\" x2=\"{3:.1}\" y2=\"{2:.1}\" stroke=\"#cc0000\"/>",
                x(p50),
                y - 12.0,
                y + 12.0,
                x(p99)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// What `melange-camera` measures.
struct CameraFigures {
    /// From the test camera putting a frame to the guest app reading it, each frame after
    /// the first second.
    latencies_ms: Vec<f64>,
    /// Frame numbers the app never got, between its first and last.
    skipped: u64,
    fps: f64,
    /// The camera stream's bytes on the port, per second (melange-host's count).
    wire_bytes_per_s: f64,
    /// The worst frame's PSNR against the camera's own picture (infinite: exact).
    psnr_min_db: f64,
    /// The guest module's process, melange-host and the app, % of one core.
    guest_cpu_pct: f64,
    host_cpu_pct: f64,
    app_cpu_pct: f64,
}

/// The host's camera to a guest app as `codec` (see [`System::MelangeCamera`]): the
/// app reads frames from a pipe as `pipewiresrc ... ! fdsink` writes them, and each
/// frame's number (in blocks, `Pattern::Smooth`) finds when the camera put it
/// (`melange-test-camera --times`); both sides share `CLOCK_MONOTONIC`.
fn measure_camera(seconds: f64, dir: &Path, codec: &str) -> Result<CameraFigures, String> {
    use melange_tests::video::{self, Pattern};
    use std::io::Read;
    const FRAME: usize = 640 * 360 * 3 / 2;
    let dir = dir.join(format!("melange-camera-{codec}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let host = PipeWire::start(&dir.join("host"));
    let guest = PipeWire::start(&dir.join("guest"));
    let times = dir.join("camera-times.txt");
    let mut cmd = host.command(melange_tests::bin("melange-test-camera"));
    cmd.args(["--name", "bench-cam", "--pattern", "smooth", "--times"]).arg(&times);
    let mut camera = Proc::spawn(cmd, dir.join("camera.log"));
    camera.wait_for_log("melange-test-camera: bench-cam", Duration::from_secs(10));
    let sock = dir.join("port.sock");
    let listen = format!("unix:{}", sock.display());
    let host_args = ["--listen", &listen, "--output", "null", "--camera", "bench-cam", "--camera-codec", codec];
    let mut host_side = start_host(&host_args, Some(&host), &dir);
    wait_until(Duration::from_secs(10), || sock.exists().then_some(())).ok_or("melange-host did not start")?;
    let mut g = start_guest_with(
        &guest,
        &format!("unix:{}", sock.display()),
        GuestCodec::Opus(128_000),
        &[],
        dir.join("guest.log"),
    );
    g.wait_for_log("connected to melange-host", Duration::from_secs(10));
    let module = child_named(g.pid(), "pipewire");
    let mut app = guest
        .command("gst-launch-1.0")
        .args(["-q", "pipewiresrc", "target-object=melange.camera", "!"])
        .args(["video/x-raw,format=I420,width=640,height=360", "!", "fdsink", "fd=1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the app: {e}"))?;
    let mut out = app.stdout.take().ok_or("the app has no stdout")?;
    let mut frame = vec![0u8; FRAME];
    let mut arrivals: Vec<(u64, u64)> = Vec::new();
    let started = Instant::now();
    let mut cpu0 = None;
    let mut psnr_min_db = f64::INFINITY;
    while started.elapsed().as_secs_f64() < seconds {
        out.read_exact(&mut frame).map_err(|e| format!("the app's frames ended: {e}"))?;
        let at = melange_shim::clock::monotonic_ns();
        let n = video::number(Pattern::Smooth, 640, &frame);
        // One frame a second checked against the camera's: the check costs a core.
        if n % 30 == 0 {
            psnr_min_db = psnr_min_db.min(video::psnr(&frame, &video::frame(Pattern::Smooth, 640, 360, n)));
        }
        if started.elapsed() >= Duration::from_secs(1) {
            if cpu0.is_none() {
                cpu0 = Some((cpu_seconds(module), cpu_seconds(host_side.pid()), cpu_seconds(app.id()), Instant::now()));
            }
            arrivals.push((n, at));
        }
    }
    let (m0, h0, a0, t0) = cpu0.ok_or("no frames after the first second")?;
    let secs = t0.elapsed().as_secs_f64();
    let pct = |now: f64, then: f64| (now - then) / secs * 100.0;
    let (guest_cpu_pct, host_cpu_pct, app_cpu_pct) =
        (pct(cpu_seconds(module), m0), pct(cpu_seconds(host_side.pid()), h0), pct(cpu_seconds(app.id()), a0));
    let _ = app.kill();
    let _ = app.wait();
    // "camera closed (...): N frames, B bytes to the guest in S s"
    host_side.wait_for_log("camera closed", Duration::from_secs(5));
    let log = host_side.log_text();
    let closed = log.lines().find(|l| l.contains("camera closed")).unwrap_or_default();
    let field = |after: &str, before: &str| -> Option<f64> {
        let rest = &closed[closed.find(after)? + after.len()..];
        rest[..rest.find(before)?].trim().parse().ok()
    };
    let wire_bytes_per_s = field("frames, ", " bytes").zip(field(" in ", " s")).map_or(0.0, |(b, s)| b / s.max(1e-9));
    camera.stop();
    let put: std::collections::HashMap<u64, u64> = std::fs::read_to_string(&times)
        .map_err(|e| e.to_string())?
        .lines()
        .filter_map(|l| l.split_once(' ').and_then(|(n, t)| Some((n.parse().ok()?, t.parse().ok()?))))
        .collect();
    let latencies_ms: Vec<f64> =
        arrivals.iter().filter_map(|(n, at)| put.get(n).map(|p| at.saturating_sub(*p) as f64 / 1e6)).collect();
    let (first, last) = (arrivals.first().map_or(0, |a| a.0), arrivals.last().map_or(0, |a| a.0));
    let skipped = (last + 1).saturating_sub(first).saturating_sub(arrivals.len() as u64);
    Ok(CameraFigures {
        latencies_ms,
        skipped,
        fps: arrivals.len() as f64 / secs,
        wire_bytes_per_s,
        psnr_min_db,
        guest_cpu_pct,
        host_cpu_pct,
        app_cpu_pct,
    })
}

fn run(args: Args) -> Result<(), String> {
    let Args { seconds, streams: counts, systems, json, svg: svg_file } = args;
    if seconds.is_nan() || seconds < 6.0 {
        return Err("--seconds must be at least 6".into());
    }
    if counts.contains(&0) {
        return Err("--streams: each count must be at least 1".into());
    }
    let systems = if systems.is_empty() { System::DEFAULT.to_vec() } else { systems };
    let dir = scratch("bench");
    let json_path = json.unwrap_or_else(|| dir.join("bench.json"));
    let svg_path = svg_file.unwrap_or_else(|| dir.join("bench-latency.svg"));

    let mut results = Vec::new();
    let mut index = 0;
    let mut cameras = Vec::new();
    for &system in &systems {
        if let Some(codec) = system.camera_codec() {
            eprintln!("melange-bench: {}, {seconds} s ...", system.name());
            let figures = measure_camera(seconds, &dir, codec).map_err(|e| format!("{}: {e}", system.name()))?;
            cameras.push((system, figures));
            continue;
        }
        let mut runs = Vec::new();
        for &n in &counts {
            eprintln!("melange-bench: {} with {n} stream(s), {seconds} s ...", system.name());
            index += 1;
            let r = measure(system, n, seconds, &dir, index).map_err(|e| format!("{} x{n}: {e}", system.name()))?;
            runs.push((n, r));
        }
        results.push((system, runs));
    }

    if results.is_empty() {
        // Only the camera: its own line below.
    } else {
        println!(
            "{:<20} {:>8} {:>8} {:>9} {:>12} {:>8}  {}",
            "system",
            "p50 ms",
            "p99 ms",
            "quality",
            "bytes/s",
            "underrun",
            counts.iter().map(|n| format!("cpu%/stream x{n}")).collect::<Vec<_>>().join("  ")
        );
    }
    let mut objects = Vec::new();
    let mut plot = Vec::new();
    for (system, runs) in &results {
        let one = runs.iter().find(|(n, _)| *n == 1).map(|(_, r)| r.clone()).unwrap_or_default();
        let (p50, p99) = (percentile(&one.latencies_ms, 0.5), percentile(&one.latencies_ms, 0.99));
        let bytes = runs.first().map_or(0.0, |(_, r)| r.wire_bytes_per_s_per_stream);
        println!(
            "{:<20} {:>8.1} {:>8.1} {:>9.4} {:>12.0} {:>8}  {}",
            system.name(),
            p50,
            p99,
            one.quality.unwrap_or(f64::NAN),
            bytes,
            one.underruns,
            runs.iter().map(|(_, r)| format!("{:>15.2}", r.cpu_pct_per_stream)).collect::<Vec<_>>().join("  ")
        );
        let cpu: serde_json::Map<String, serde_json::Value> = runs
            .iter()
            .map(|(n, r)| (n.to_string(), json!((r.cpu_pct_per_stream * 1000.0).round() / 1000.0)))
            .collect();
        objects.push(json!({
            "system": system.name(),
            "description": system.describe(),
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "latency_samples": one.latencies_ms.len(),
            "guest_cpu_pct_per_stream": runs.first().map(|(_, r)| (r.cpu_pct_per_stream * 1000.0).round() / 1000.0),
            "guest_cpu_pct_per_stream_by_streams": cpu,
            "wire_bytes_per_s": bytes,
            "quality": one.quality,
            "quality_metric": "correlation of the host output with the source, aligned",
            "underruns": one.underruns,
        }));
        plot.push((*system, one.latencies_ms));
    }
    if !results.is_empty() {
        println!(
            "(latency: app to host output on one clock, after {SETTLE_S} s; bytes/s per stream at {} stream(s); \
             cpu: guest-side process, % of one core per stream)",
            counts.first().copied().unwrap_or(1)
        );
    }
    for (system, runs) in &results {
        for (n, r) in runs {
            let Some(p) = &r.player else { continue };
            let mut abs: Vec<f64> = p.av_offsets_ms.iter().map(|o| o.abs()).collect();
            abs.sort_by(f64::total_cmp);
            println!(
                "{} x{n}: player CPU {:.1} % forwarding vs {:.1} % decoding in the guest ({:.2}x); guest module \
                 (taps and broker) {:.1} %; its streams on the port {:.0} B/s vs the file's {:.0} B/s ({:.3}x); \
                 picture minus sound on the host: median {:.1} ms, |p99| {:.1} ms over {} frames ({} shown)",
                system.name(),
                p.cpu_forwarding_pct,
                p.cpu_decoding_pct,
                p.cpu_forwarding_pct / p.cpu_decoding_pct.max(1e-9),
                p.module_pct,
                p.wire_bytes_per_s,
                p.file_bytes_per_s,
                p.wire_bytes_per_s / p.file_bytes_per_s.max(1e-9),
                percentile(&p.av_offsets_ms, 0.5),
                percentile(&abs, 0.99),
                p.av_offsets_ms.len(),
                p.frames_shown
            );
        }
    }
    for (system, c) in &cameras {
        let (p50, p99) = (percentile(&c.latencies_ms, 0.5), percentile(&c.latencies_ms, 0.99));
        println!(
            "{}: 640x360 at 30 fps, {}: camera frame to guest app p50 {p50:.1} ms, p99 {p99:.1} ms \
             over {} frames ({} skipped, {:.1} fps); {:.0} B/s on the port; PSNR min {:.1} dB; guest module {:.1} % \
             of a core, melange-host {:.1} %, the app (pipewiresrc) {:.1} %",
            system.name(),
            system.camera_codec().unwrap_or_default(),
            c.latencies_ms.len(),
            c.skipped,
            c.fps,
            c.wire_bytes_per_s,
            c.psnr_min_db,
            c.guest_cpu_pct,
            c.host_cpu_pct,
            c.app_cpu_pct
        );
        objects.push(json!({
            "system": system.name(),
            "description": system.describe(),
            "wire_bytes_per_s": c.wire_bytes_per_s,
            "psnr_min_db": c.psnr_min_db,
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "latency_samples": c.latencies_ms.len(),
            "frames_skipped": c.skipped,
            "fps": c.fps,
            "guest_cpu_pct": c.guest_cpu_pct,
            "host_cpu_pct": c.host_cpu_pct,
            "app_cpu_pct": c.app_cpu_pct,
        }));
    }
    let text = serde_json::to_string_pretty(&objects).map_err(|e| e.to_string())?;
    std::fs::write(&json_path, text + "\n").map_err(|e| format!("{}: {e}", json_path.display()))?;
    std::fs::write(&svg_path, svg(&plot)).map_err(|e| format!("{}: {e}", svg_path.display()))?;
    println!("json: {}\nsvg:  {}", json_path.display(), svg_path.display());
    Ok(())
}

fn main() -> ExitCode {
    match run(<Args as clap::Parser>::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("melange-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults_and_lists() {
        let a = Args::try_parse_from(["melange-bench"]).unwrap();
        assert_eq!((a.seconds, a.streams, a.systems, a.json, a.svg), (12.0, vec![1, 8, 32], vec![], None, None));
        let a =
            Args::try_parse_from(["melange-bench", "--streams", "1,4", "--systems", "rtp-l16,melange-pcm"]).unwrap();
        assert_eq!((a.streams, a.systems), (vec![1, 4], vec![System::Rtp, System::MelangePcm]));
    }

    #[test]
    fn a_misspelled_flag_or_value_is_an_error() {
        for args in [&["--secnds", "6"][..], &["--streams", "1,x"], &["--systems", "melange"], &["extra"]] {
            let e = Args::try_parse_from(std::iter::once("melange-bench").chain(args.iter().copied())).unwrap_err();
            assert_ne!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{args:?}");
        }
    }
}
