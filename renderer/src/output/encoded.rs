//! Where encoded streams (a player's own video and audio, access units) go:
//! `--video-output`. One [`EncodedOutput`] per process, one [`EncodedSink`] per stream,
//! as [`super::Output`] and [`super::StreamSink`] are for tapped audio.
//!
//! - `window` (the default): video decoded and shown in a window per stream, titled
//!   after the app ([`crate::decode`]).
//! - `null`: video counted and discarded, undecoded.
//! - `frames:DIR`: for tests and inspection, per stream a `.bin` file with every access
//!   unit's bytes back to back and a `.jsonl` index: one line for the stream's opening
//!   (kind, codec, codec data in hex, size), one per access unit (seq, pts, dts,
//!   duration, flags, size, offset into the `.bin`, FNV-1a 64 of its bytes), one per
//!   control and one for the close. The stream is decoded as well, into a
//!   `.decoded.jsonl`: for video one line per frame when it is shown (guest pts,
//!   `shown_ns` on this host's `CLOCK_MONOTONIC`, size, FNV-1a 64 of the visible I420
//!   pixels, mean luma); for audio one line per decoded buffer handed to the audio
//!   output (guest pts, `due_ns` when its first sample is heard, sample frames and the
//!   index of the first). Files are created exclusively, never through a symlink, and
//!   all of a run's hold at most `--wav-max-bytes`.
//!
//! Encoded audio is decoded whatever the video output, and plays through `--output`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use melange_transport::message::{au_flags, AccessUnit, MediaKind, StreamControl, StreamOpen};
use serde_json::json;

use super::OutputError;
pub use crate::decode::{FrameLog, Show};

/// `--video-output` as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoOutputSpec {
    /// Decode and show each stream in a window.
    Window,
    /// Count and discard.
    Null,
    /// Access units and their timestamps into files in a directory, and the decoded
    /// frames' checksums and times.
    Frames(PathBuf),
}

impl FromStr for VideoOutputSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "null" => Ok(VideoOutputSpec::Null),
            "window" => Ok(VideoOutputSpec::Window),
            _ => match s.strip_prefix("frames:") {
                Some(dir) if !dir.is_empty() => Ok(VideoOutputSpec::Frames(dir.into())),
                _ => Err(format!("invalid video output {s:?}: expected window, null or frames:DIR")),
            },
        }
    }
}

/// What an encoded sink needs to know.
#[derive(Debug, Clone)]
pub struct EncodedDesc {
    /// Guest stream id.
    pub stream: u32,
    /// Host session number (1, 2, ...), so file names stay unique across reconnects.
    pub session: u64,
    /// The guest's announcement.
    pub open: StreamOpen,
}

/// A backend for encoded streams.
pub trait EncodedOutput {
    /// Creates the sink for a new stream: what records its access units.
    fn open(&mut self, desc: &EncodedDesc) -> Result<Box<dyn EncodedSink>, OutputError>;
    /// Where a video stream's decoded frames go; `None`: not decoded.
    fn show(&mut self, _desc: &EncodedDesc) -> Result<Option<Show>, OutputError> {
        Ok(None)
    }
    /// Where lines about an audio stream's decoded buffers go, if anywhere.
    fn decoded_log(&mut self, _desc: &EncodedDesc) -> Result<Option<FrameLog>, OutputError> {
        Ok(None)
    }
    /// True when video streams are decoded (their codecs need a decoder here).
    fn decodes_video(&self) -> bool {
        false
    }
    /// Where the streams go, for the startup log.
    fn describe(&self) -> String;
}

/// One encoded stream's destination.
pub trait EncodedSink {
    /// Takes one access unit, in order, that arrived at `arrival_ns` (`CLOCK_MONOTONIC`).
    fn access_unit(&mut self, arrival_ns: u64, au: &AccessUnit);
    /// Takes a control of the stream's sender (flush, pause, resume, end of stream).
    fn control(&mut self, control: StreamControl);
    /// Finishes the stream. Called exactly once.
    fn close(&mut self, reason: &str) -> Result<(), OutputError>;
    /// Where this stream goes, for the log.
    fn describe(&self) -> String;
}

/// Makes the backend `spec` names; `max_bytes` caps what a files backend writes.
pub fn make_video_output(spec: &VideoOutputSpec, max_bytes: u64) -> Result<Box<dyn EncodedOutput>, OutputError> {
    Ok(match spec {
        VideoOutputSpec::Null => Box::new(NullVideo),
        VideoOutputSpec::Window => Box::new(WindowOutput),
        VideoOutputSpec::Frames(dir) => Box::new(FramesOutput::new(dir, max_bytes)?),
    })
}

/// `--video-output null`.
#[derive(Debug)]
pub struct NullVideo;

impl EncodedOutput for NullVideo {
    fn open(&mut self, _desc: &EncodedDesc) -> Result<Box<dyn EncodedSink>, OutputError> {
        Ok(Box::new(NullVideo))
    }

    fn describe(&self) -> String {
        "nowhere (--video-output null)".into()
    }
}

impl EncodedSink for NullVideo {
    fn access_unit(&mut self, _arrival_ns: u64, _au: &AccessUnit) {}

    fn control(&mut self, _control: StreamControl) {}

    fn close(&mut self, _reason: &str) -> Result<(), OutputError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "nowhere".into()
    }
}

/// `--video-output window`.
#[derive(Debug)]
pub struct WindowOutput;

impl EncodedOutput for WindowOutput {
    fn open(&mut self, _desc: &EncodedDesc) -> Result<Box<dyn EncodedSink>, OutputError> {
        Ok(Box::new(NullVideo))
    }

    fn show(&mut self, desc: &EncodedDesc) -> Result<Option<Show>, OutputError> {
        let app = if desc.open.app.name.is_empty() { "Guest app" } else { desc.open.app.name.as_str() };
        let (width, height) = match &desc.open.media {
            MediaKind::EncodedVideo(v) => (v.width, v.height),
            _ => (0, 0),
        };
        Ok(Some(Show::Window { title: format!("{app} (guest)"), width, height }))
    }

    fn decodes_video(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        "a window per video (--video-output window)".into()
    }
}

/// `--video-output frames:DIR`. See the module docs.
#[derive(Debug)]
pub struct FramesOutput {
    dir: PathBuf,
    /// Bytes all files of this run may still take.
    left: Arc<AtomicU64>,
    max_bytes: u64,
}

impl FramesOutput {
    /// Creates `dir` if needed.
    pub fn new(dir: &Path, max_bytes: u64) -> Result<Self, OutputError> {
        std::fs::create_dir_all(dir).map_err(|source| OutputError::Io { path: dir.into(), source })?;
        Ok(Self { dir: dir.into(), left: Arc::new(AtomicU64::new(max_bytes)), max_bytes })
    }
}

/// Creates a file that does not exist yet, never through a symlink.
fn create_new(path: &Path) -> Result<BufWriter<File>, OutputError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o640)
        .open(path)
        .map(|f| BufWriter::with_capacity(64 * 1024, f))
        .map_err(|source| OutputError::Io { path: path.into(), source })
}

impl FramesOutput {
    /// A stream's files are `BASE.CODEC.jsonl`, `.bin` and `.decoded.jsonl`.
    fn base(&self, desc: &EncodedDesc) -> PathBuf {
        let app = super::file_name_part(&desc.open.app.name);
        let pid = std::process::id();
        self.dir.join(format!("p{pid}-s{}-stream{}-{app}.{}", desc.session, desc.stream, desc.open.codec.name()))
    }

    fn decoded(&self, desc: &EncodedDesc) -> Result<FrameLog, OutputError> {
        let path = self.base(desc).with_extension(format!("{}.decoded.jsonl", desc.open.codec.name()));
        let file = create_new(&path)?.into_inner().map_err(|e| OutputError::Io { path, source: e.into_error() })?;
        Ok(FrameLog::new(file, self.left.clone()))
    }
}

impl EncodedOutput for FramesOutput {
    fn show(&mut self, desc: &EncodedDesc) -> Result<Option<Show>, OutputError> {
        self.decoded(desc).map(|log| Some(Show::Frames(log)))
    }

    fn decoded_log(&mut self, desc: &EncodedDesc) -> Result<Option<FrameLog>, OutputError> {
        self.decoded(desc).map(Some)
    }

    fn decodes_video(&self) -> bool {
        true
    }

    fn open(&mut self, desc: &EncodedDesc) -> Result<Box<dyn EncodedSink>, OutputError> {
        let base = self.base(desc);
        let index_path = base.with_extension(format!("{}.jsonl", desc.open.codec.name()));
        let data_path = base.with_extension(format!("{}.bin", desc.open.codec.name()));
        let index = create_new(&index_path)?;
        let data = create_new(&data_path)?;
        let mut sink = FramesSink { path: data_path, index, data, offset: 0, left: self.left.clone(), full: false };
        let (kind, size) = match &desc.open.media {
            MediaKind::EncodedVideo(v) | MediaKind::Camera(v) => (
                "video",
                json!({"width": v.width, "height": v.height,
                "framerate": [v.framerate_num, v.framerate_den]}),
            ),
            MediaKind::EncodedAudio(a) | MediaKind::Audio(a) => {
                ("audio", json!({"rate": a.rate, "channels": a.channels}))
            }
        };
        let hex: String = desc.open.codec_data.iter().map(|b| format!("{b:02x}")).collect();
        sink.line(&json!({"event": "open", "kind": kind, "codec": desc.open.codec.name(), "codec_data": hex,
            "format": size, "app": desc.open.app.name}));
        Ok(Box::new(sink))
    }

    fn describe(&self) -> String {
        format!("access units into {} (at most {} bytes)", self.dir.display(), self.max_bytes)
    }
}

/// One stream's `.bin` and `.jsonl`.
struct FramesSink {
    path: PathBuf,
    index: BufWriter<File>,
    data: BufWriter<File>,
    offset: u64,
    left: Arc<AtomicU64>,
    /// The run's byte cap was reached (said once, in the index).
    full: bool,
}

/// FNV-1a, 64 bits: a checksum the tests recompute.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl FramesSink {
    fn take(&mut self, bytes: u64) -> bool {
        if self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(bytes)).is_err() {
            if !self.full {
                self.full = true;
                let _ = writeln!(self.index, "{}", json!({"event": "full"}));
            }
            return false;
        }
        true
    }

    fn line(&mut self, value: &serde_json::Value) {
        let text = value.to_string();
        if self.take(text.len() as u64 + 1) {
            let _ = writeln!(self.index, "{text}");
        }
    }
}

impl EncodedSink for FramesSink {
    fn access_unit(&mut self, arrival_ns: u64, au: &AccessUnit) {
        if !self.take(au.data.len() as u64 + 256) {
            return;
        }
        let line = json!({"event": "au", "seq": au.seq, "pts_ns": au.pts_ns, "dts_ns": au.dts(),
            "duration_ns": au.duration_ns, "keyframe": au.is_keyframe(),
            "discontinuity": au.flags & au_flags::DISCONTINUITY != 0,
            "decode_only": au.flags & au_flags::DECODE_ONLY != 0,
            "size": au.data.len(), "offset": self.offset, "fnv": fnv1a(&au.data), "arrival_ns": arrival_ns});
        if self.data.write_all(&au.data).is_ok() {
            self.offset += au.data.len() as u64;
            let _ = writeln!(self.index, "{line}");
        }
    }

    fn control(&mut self, control: StreamControl) {
        let name = match control {
            StreamControl::Flush => "flush",
            StreamControl::Pause => "pause",
            StreamControl::Resume => "resume",
            StreamControl::EndOfStream => "eos",
            StreamControl::KeyframeRequest => "keyframe-request",
            StreamControl::Geometry(g) => {
                let line = json!({"event": "geometry", "x": g.x, "y": g.y, "width": g.width, "height": g.height});
                return self.line(&line);
            }
        };
        self.line(&json!({"event": name}));
    }

    fn close(&mut self, reason: &str) -> Result<(), OutputError> {
        self.line(&json!({"event": "close", "reason": reason}));
        let io = |source| OutputError::Io { path: self.path.clone(), source };
        self.data.flush().map_err(io)?;
        self.index.flush().map_err(io)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
