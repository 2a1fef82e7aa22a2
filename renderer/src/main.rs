//! The `melange-host` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use clap::{ArgGroup, Parser};
use melange_renderer::camera::{CameraCodec, CameraSpec};
use melange_renderer::encoded::{parse_codecs, EncodedStreams};
use melange_renderer::host::MAX_STREAMS;
use melange_renderer::host::{Host, HostConfig};
use melange_renderer::output::encoded::{make_video_output, VideoOutputSpec};
use melange_renderer::output::{make_output, OutputLimits, OutputSpec, DEFAULT_WAV_MAX_BYTES};
use melange_transport::message::codec_bits;
use melange_transport::port::{Port, PortSpec, Waker};

/// Render the audio of a Melange guest VM on this machine.
///
/// Connects to the guest's virtio-serial port (QEMU's chardev socket), or listens for
/// it, and plays each guest app's stream as its own PipeWire stream named after the app.
#[derive(Debug, Parser)]
#[command(name = "melange-host", version, group(ArgGroup::new("port").required(true).args(["connect", "listen", "stdio"])))]
struct Cli {
    /// Connect to the guest port, retrying: unix:PATH (QEMU's `-chardev socket,server=on`).
    #[arg(long, value_name = "unix:PATH")]
    connect: Option<String>,
    /// Listen on a unix socket (QEMU's `-chardev socket,server=off,reconnect=1` connects).
    #[arg(long, value_name = "unix:PATH")]
    listen: Option<String>,
    /// Talk the protocol on standard input and output.
    #[arg(long)]
    stdio: bool,
    /// Where the sound goes: pipewire, wav:DIR (one file per stream), null, or
    /// frames:DIR (WAV files, and a player's encoded streams as --video-output frames:DIR).
    #[arg(long, value_name = "OUTPUT", default_value = "pipewire")]
    output: OutputSpec,
    /// Where a guest player's own video goes (protocol v2): window (decoded, one
    /// window per video titled after the app), null (discarded undecoded), or
    /// frames:DIR (each stream's access units, and its decoded frames' checksums and
    /// times, for tests). Default: window where there is a display (without one,
    /// videos are declined and players decode them in the guest), or the directory of
    /// --output frames:DIR. A player's encoded audio is decoded and plays through
    /// --output.
    #[arg(long, value_name = "window|null|frames:DIR")]
    video_output: Option<VideoOutputSpec>,
    /// The codecs of encoded streams melange-host takes, comma-separated (h264, h265,
    /// vp8, vp9, av1, mp3, aac, opus, vorbis, flac), or all; of these, only those with
    /// a GStreamer decoder on this machine are offered. Others are refused per stream
    /// and the guest's player decodes them itself.
    #[arg(long, value_name = "LIST", default_value = "all", value_parser = parse_codecs)]
    video_codecs: u64,
    /// Most bytes the WAV files (and frames:DIR files) of one run may hold together
    /// (suffixes K, M, G: powers of 1024); once reached, the files are finished and
    /// further audio is discarded.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_WAV_MAX_BYTES, value_parser = parse_bytes)]
    wav_max_bytes: u64,
    /// Jitter-buffer target in milliseconds (1..=1000), or auto: one packet, one output
    /// quantum and a 3 ms margin (15.7 ms for 10 ms packets, 6.8 ms for 2.5 ms ones),
    /// then trimmed to what the arrivals need.
    #[arg(long, value_name = "MS|auto", default_value = "auto", value_parser = parse_latency)]
    latency: Latency,
    /// Seconds without media after which a stream releases its output (PipeWire stream
    /// or WAV file) until it plays again.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    idle_timeout: u64,
    /// Append one JSON object per closed stream (latency, bitrate, losses) to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Print one line of figures per stream every second on stdout: bitrate, latency,
    /// render delay, jitter-buffer fill, drift, lost and dropped packets, underruns.
    #[arg(long)]
    stats: bool,
    /// The source the guest's virtual microphone records from: default (the host's
    /// default source), none, or a source's node.name. Opened only while a guest app
    /// records, closed as soon as none does.
    #[arg(long, value_name = "default|none|NAME", default_value = "default")]
    mic: melange_renderer::mic::MicSpec,
    /// The camera the guest's virtual camera ("Melange camera") shows: default (the
    /// host's default camera), none, or a camera's node.name (a PipeWire Video/Source).
    /// Captured only while a guest app captures, closed within a second of the last
    /// one stopping; each open and close is logged.
    #[arg(long, value_name = "default|none|NAME", default_value = "default")]
    camera: melange_renderer::camera::CameraSpec,
    /// How the camera's frames go to the guest: raw (I420, 10.4 MB/s: a local port),
    /// vp8 or h264 (2 Mbit/s, encoded here with GStreamer, decoded in the guest).
    #[arg(long, value_name = "raw|vp8|h264", default_value = "raw")]
    camera_codec: melange_renderer::camera::CameraCodec,
    /// Run even as root. melange-host needs no privileges: run it as the user whose
    /// PipeWire plays the sound.
    #[arg(long)]
    allow_root: bool,
}

/// `--latency`: a fixed target, or `None` for auto.
#[derive(Debug, Clone, Copy)]
struct Latency(Option<Duration>);

fn parse_latency(s: &str) -> Result<Latency, String> {
    if s == "auto" {
        return Ok(Latency(None));
    }
    match s.parse::<u64>() {
        Ok(ms) if (1..=1000).contains(&ms) => Ok(Latency(Some(Duration::from_millis(ms)))),
        _ => Err("expected milliseconds (1..=1000) or auto".into()),
    }
}

/// `--wav-max-bytes`: a byte count, with an optional K, M or G (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(format!("unknown unit {unit:?}: give bytes, or K, M or G")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a byte count (e.g. 1073741824, 512M, 1G)"))?;
    n.checked_mul(1 << shift).filter(|n| *n > 0).ok_or_else(|| format!("{s:?} is out of range"))
}

static STOP: AtomicBool = AtomicBool::new(false);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn install_signal_handlers(waker: &Waker) {
    WAKE_FD.store(waker.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches atomics and calls write(2).
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    // A vanished peer must be an error on write, not a killed process.
    // SAFETY: ignoring SIGPIPE has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

fn parse_unix(flag: &str, value: &str) -> Result<PathBuf, String> {
    match value.parse::<PortSpec>() {
        Ok(PortSpec::Unix(path)) => Ok(path),
        _ => Err(format!("--{flag} takes unix:PATH, not {value:?}")),
    }
}

/// True where a window can open.
fn has_display() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"].iter().any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()))
}

/// The encoded streams' outputs and the codecs offered: those asked for that this
/// machine decodes (all video codecs where video is not decoded).
fn encoded_streams(cli: &Cli) -> Result<EncodedStreams, String> {
    let mut codecs = cli.video_codecs;
    let spec = match (&cli.video_output, &cli.output) {
        (Some(VideoOutputSpec::Window), _) if !has_display() => {
            return Err("--video-output window needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set; \
                        use --video-output null or frames:DIR"
                .into())
        }
        (Some(spec), _) => spec.clone(),
        (None, OutputSpec::Frames(dir)) => VideoOutputSpec::Frames(dir.clone()),
        (None, _) if has_display() => VideoOutputSpec::Window,
        (None, _) => {
            log::warn!(
                "melange-host: no display (DISPLAY and WAYLAND_DISPLAY are unset): guest videos are declined and \
                 decoded in the guest; a player's audio still plays here"
            );
            codecs &= !VIDEO_CODECS;
            VideoOutputSpec::Null
        }
    };
    let video = make_video_output(&spec, cli.wav_max_bytes).map_err(|e| e.to_string())?;
    if let Err(e) = melange_renderer::decode::init() {
        log::warn!("melange-host: {e}: a guest player's video and audio are declined and decoded in the guest");
        return Ok(EncodedStreams::new(video, 0));
    }
    let must_decode = if video.decodes_video() { codecs } else { codecs & !VIDEO_CODECS };
    let missing = must_decode & !melange_renderer::decode::decodable(must_decode);
    if missing != 0 {
        log::info!(
            "melange-host: no GStreamer decoder here for {}; players decode those in the guest",
            melange_renderer::encoded::codec_names(missing)
        );
    }
    let mut taken = codecs & !missing;
    // The handshake's Opus bit also stands for tapped audio, which the host always
    // takes: so players' Opus is taken whenever players' audio is, or a sink would
    // offer Opus only to be refused.
    if taken & AUDIO_CODECS != 0 && melange_renderer::decode::decodable(codec_bits::OPUS) != 0 {
        taken |= codec_bits::OPUS;
    }
    Ok(EncodedStreams::new(video, taken))
}

/// The codecs of players' audio, as `codec_bits`.
const AUDIO_CODECS: u64 = codec_bits::ENCODED & !VIDEO_CODECS;

/// The video codecs, as `codec_bits`.
const VIDEO_CODECS: u64 =
    codec_bits::H264 | codec_bits::H265 | codec_bits::VP8 | codec_bits::VP9 | codec_bits::AV1 | codec_bits::PROFILES;

fn run(cli: Cli) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !cli.allow_root {
        return Err("refusing to run as root: melange-host parses bytes from a VM and needs no privileges; \
                    run it as the desktop user (or pass --allow-root)"
            .into());
    }
    let mut port = if let Some(spec) = &cli.connect {
        let path = parse_unix("connect", spec)?;
        Port::open(&PortSpec::Unix(path)).map_err(|e| e.to_string())?
    } else if let Some(spec) = &cli.listen {
        let path = parse_unix("listen", spec)?;
        Port::listen(&path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?
    } else {
        Port::open(&PortSpec::Stdio).map_err(|e| e.to_string())?
    };
    let limits = OutputLimits { max_streams: usize::from(MAX_STREAMS), wav_max_bytes: cli.wav_max_bytes };
    let output = make_output(&cli.output, limits).map_err(|e| e.to_string())?;
    let encoded = encoded_streams(&cli)?;
    let waker = Waker::new().map_err(|e| e.to_string())?;
    install_signal_handlers(&waker);
    let config = HostConfig {
        latency: cli.latency.0,
        report: cli.report,
        idle_timeout: Duration::from_secs(cli.idle_timeout),
        stats: cli.stats,
        mic: cli.mic,
        camera: cli.camera.clone(),
        camera_codec: cli.camera_codec,
    };
    let camera_usable = cli.camera != CameraSpec::None
        && match melange_renderer::camera::available(CameraCodec::Raw) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("melange-host: {e}: the guest's camera stays dark");
                false
            }
        };
    if camera_usable {
        // Asked for by name, an encoder that is not there is a wrong setting.
        melange_renderer::camera::available(cli.camera_codec)?;
    }
    let mut host = Host::new(config, output, melange_shim::clock::now_pair());
    host.set_encoded(encoded);
    host.set_camera_usable(camera_usable);
    host.run(&mut port, &waker, &STOP).map_err(|e| format!("port error on {}: {e}", port.describe()))?;
    log::info!("melange-host: stopped");
    Ok(())
}

/// Allocations from this size up are mapped on their own and unmapped when freed.
///
/// glibc raises its mmap threshold after the first such free, and from then on serves
/// large blocks from its per-thread arenas, where `calloc` must clear them (touching
/// every page) and a freed block stays resident. PipeWire's converter allocates
/// megabytes of zeroed scratch per playback stream (sized for its largest quantum and
/// channel count, most of it never used): a guest opening and closing streams made
/// melange-host's peak RSS 170-250 MiB with 64 streams. Fixed here, it stays under
/// 64 MiB (44-56 MiB measured, `tests/tests/bounds.rs`).
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

fn main() -> ExitCode {
    // SAFETY: mallopt has no preconditions; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("melange-host: {e}");
            ExitCode::FAILURE
        }
    }
}
