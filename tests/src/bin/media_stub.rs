//! A player's in-app stub in miniature, for tests and the bench: connects to the guest's
//! media broker and sends a synthetic H.264-shaped stream (start code, an IDR or non-IDR
//! NAL header, deterministic bytes), keyframes every `--gop` units.
//!
//! It answers a keyframe request with a keyframe, can join late (`--late N` deltas
//! first), seek (`--seek-at N`: flush, then a keyframe with the discontinuity flag) and
//! pace itself at the frame rate (`--realtime`). Every access unit it sent is logged as
//! a JSON line to `--log` (seq, pts_ns, size, FNV-1a 64 of the bytes, flags), which the
//! tests compare with what `melange-host --video-output frames:DIR` wrote.
//!
//! Exit status: 0 when everything was sent, 2 when there is no broker or no host (a
//! real player would decode locally), 3 when the host refused the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use melange_guest::client::{ClientError, ClientEvent, MediaClient};
use melange_transport::message::{
    au_flags, AccessUnit, AppInfo, AudioFormat, Codec, MediaKind, StreamControl, StreamOpen, VideoFormat,
};
use melange_transport::session::SessionError;
use serde_json::json;

/// Send a synthetic encoded video stream through the guest's media broker.
#[derive(Debug, Parser)]
#[command(name = "melange-media-stub")]
struct Args {
    /// The broker's socket (default: $XDG_RUNTIME_DIR/melange/media.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Access units to send.
    #[arg(long, default_value_t = 300)]
    units: u32,
    /// Frames per second (pts step, and the pace with --realtime).
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// A keyframe every this many units.
    #[arg(long, default_value_t = 60)]
    gop: u32,
    /// Bytes of a keyframe.
    #[arg(long, default_value_t = 200_000)]
    key_bytes: usize,
    /// Bytes of any other unit.
    #[arg(long, default_value_t = 20_000)]
    delta_bytes: usize,
    /// Codec to announce: h264, h265, vp8, vp9 or av1 (video); mp3, aac, opus, vorbis
    /// or flac (audio at 48 kHz, stereo, every unit a keyframe).
    #[arg(long, default_value = "h264")]
    codec: String,
    /// Join late: the first N units are not keyframes.
    #[arg(long, default_value_t = 0)]
    late: u32,
    /// Seek before unit N: a flush, then a keyframe marked as a discontinuity.
    #[arg(long)]
    seek_at: Option<u32>,
    /// Send at the frame rate instead of as fast as possible.
    #[arg(long)]
    realtime: bool,
    /// The app name the host shows.
    #[arg(long, default_value = "stub player")]
    app: String,
    /// Where to log what was sent (JSON lines).
    #[arg(long)]
    log: Option<PathBuf>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// An H.264-shaped unit: a start code, an IDR (0x65) or non-IDR (0x41) NAL header,
/// then bytes that depend on the unit's number and their position.
fn unit_bytes(seq: u32, size: usize, key: bool) -> Vec<u8> {
    let mut data = vec![0, 0, 0, 1, if key { 0x65 } else { 0x41 }];
    let mut x = u64::from(seq).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while data.len() < size.max(5) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.push(x as u8);
    }
    data.truncate(size.max(5));
    data
}

/// Why the stub stopped early.
#[derive(Debug)]
enum Stop {
    /// No broker or no host: a player decodes locally.
    Unavailable(ClientError),
    /// The host will not take the stream: a player decodes it locally.
    Refused(String),
    /// Anything else.
    Failed(ClientError),
}

impl From<ClientError> for Stop {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::NoBroker { .. } | ClientError::NoHost(_) => Stop::Unavailable(e),
            ClientError::Session(SessionError::PeerCannotTake { .. }) => Stop::Refused(e.to_string()),
            other => Stop::Failed(other),
        }
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Failed(e.into())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Unavailable(e)) => {
            eprintln!("melange-media-stub: {e}; a player would decode locally");
            ExitCode::from(2)
        }
        Err(Stop::Refused(reason)) => {
            eprintln!("melange-media-stub: refused: {reason}; a player would decode locally");
            ExitCode::from(3)
        }
        Err(Stop::Failed(e)) => {
            eprintln!("melange-media-stub: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Stop> {
    let path = args
        .socket
        .clone()
        .or_else(melange_guest::client::default_socket)
        .ok_or_else(|| ClientError::NoHost("XDG_RUNTIME_DIR is not set and no --socket was given".into()))?;
    let mut log: Box<dyn Write> = match &args.log {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => Box::new(std::io::sink()),
    };
    let started = Instant::now();
    let mut client = MediaClient::connect(&path, "melange-media-stub", Duration::from_secs(2))?;
    writeln!(log, "{}", json!({"event": "connected", "ms": started.elapsed().as_secs_f64() * 1e3}))?;
    let codec = Codec::from_name(&args.codec)
        .filter(|c| !matches!(c, Codec::PcmS16Le))
        .ok_or_else(|| Stop::Refused(format!("{} is no codec of a player's stream", args.codec)))?;
    let video = codec.is_video();
    let media = if video {
        MediaKind::EncodedVideo(VideoFormat { width: 1280, height: 720, framerate_num: args.fps, framerate_den: 1 })
    } else {
        MediaKind::EncodedAudio(AudioFormat { rate: 48_000, channels: 2, positions: vec![3, 4] })
    };
    let open = StreamOpen {
        media,
        codec,
        frame_samples: 0,
        app: AppInfo { name: args.app.clone(), role: "Movie".into(), ..AppInfo::default() },
        codec_data: vec![1, 0x64, 0, 0x1F, 0xFF, 0xE1, 0, 4, 0x67, 0x64, 0, 0x1F],
    };
    client.open_stream(1, &open)?;
    let frame_ns = 1_000_000_000 / u64::from(args.fps.max(1));
    let t0 = melange_shim::clock::monotonic_ns();
    let (mut force_key, mut discontinuity) = (false, false);
    let pace = Instant::now();
    for seq in 0..args.units {
        if args.seek_at == Some(seq) {
            client.send_control(1, StreamControl::Flush)?;
            writeln!(log, "{}", json!({"event": "flush"}))?;
            (force_key, discontinuity) = (true, true);
        }
        for event in client.poll(Duration::ZERO)? {
            match event {
                ClientEvent::KeyframeRequest(_) => {
                    force_key = true;
                    writeln!(log, "{}", json!({"event": "keyframe-request", "before": seq}))?;
                }
                ClientEvent::Latency(_, render_ns) => {
                    writeln!(log, "{}", json!({"event": "latency", "render_ns": render_ns}))?;
                }
                ClientEvent::Rejected(_, reason) => {
                    writeln!(log, "{}", json!({"event": "rejected", "reason": reason}))?;
                    log.flush()?;
                    return Err(Stop::Refused(reason));
                }
            }
        }
        let key = !video || force_key || (seq >= args.late && seq % args.gop.max(1) == 0);
        let size = if key { args.key_bytes } else { args.delta_bytes };
        let mut flags = if key { au_flags::KEYFRAME } else { 0 };
        if discontinuity {
            flags |= au_flags::DISCONTINUITY;
        }
        let au = AccessUnit {
            seq,
            flags,
            pts_ns: t0 + u64::from(seq) * frame_ns,
            dts_ns: 0,
            duration_ns: frame_ns,
            data: unit_bytes(seq, size, key),
        };
        let sent = match client.send_access_unit(1, &au) {
            Ok(sent) => sent,
            Err(e) => {
                // Refused meanwhile: the refusal says why.
                for event in client.poll(Duration::from_millis(100)).unwrap_or_default() {
                    if let ClientEvent::Rejected(_, reason) = event {
                        return Err(Stop::Refused(reason));
                    }
                }
                return Err(e.into());
            }
        };
        writeln!(
            log,
            "{}",
            json!({"event": "au", "seq": seq, "pts_ns": au.pts_ns, "size": au.data.len(), "fnv": fnv1a(&au.data),
                "keyframe": key, "discontinuity": discontinuity, "sent": sent})
        )?;
        (force_key, discontinuity) = (false, false);
        if args.realtime {
            let due = pace + Duration::from_nanos(frame_ns * u64::from(seq + 1));
            while let Some(left) = due.checked_duration_since(Instant::now()) {
                for event in client.poll(left.min(Duration::from_millis(5)))? {
                    match event {
                        ClientEvent::KeyframeRequest(_) => {
                            force_key = true;
                            writeln!(log, "{}", json!({"event": "keyframe-request", "before": seq + 1}))?;
                        }
                        ClientEvent::Rejected(_, reason) => return Err(Stop::Refused(reason)),
                        ClientEvent::Latency(..) => {}
                    }
                }
            }
        }
    }
    client.send_control(1, StreamControl::EndOfStream)?;
    client.close_stream(1, "played to the end")?;
    // Let the broker take the last bytes before the goodbye.
    let _ = client.poll(Duration::from_millis(200));
    client.close();
    log.flush()?;
    Ok(())
}
