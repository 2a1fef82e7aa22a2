//! Where encoded streams (a player's own video and audio, access units) go:
//! `--video-output`. One [`EncodedOutput`] per process, one [`EncodedSink`] per stream,
//! as [`super::Output`] and [`super::StreamSink`] are for tapped audio.
//!
//! - `null`: counts and discards.
//! - `frames:DIR`: for tests and inspection, per stream a `.bin` file with every access
//!   unit's bytes back to back and a `.jsonl` index: one line for the stream's opening
//!   (kind, codec, codec data in hex, size), one per access unit (seq, pts, dts,
//!   duration, flags, size, offset into the `.bin`, FNV-1a 64 of its bytes), one per
//!   control and one for the close. Files are created exclusively, never through a
//!   symlink, and all of a run's hold at most `--wav-max-bytes`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use melange_transport::message::{au_flags, AccessUnit, MediaKind, StreamControl, StreamOpen};
use serde_json::json;

use super::OutputError;

/// `--video-output` as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoOutputSpec {
    /// Count and discard.
    Null,
    /// Access units and their timestamps into files in a directory.
    Frames(PathBuf),
}

impl FromStr for VideoOutputSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "null" => Ok(VideoOutputSpec::Null),
            _ => match s.strip_prefix("frames:") {
                Some(dir) if !dir.is_empty() => Ok(VideoOutputSpec::Frames(dir.into())),
                _ => Err(format!("invalid video output {s:?}: expected null or frames:DIR")),
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
    /// Creates the sink for a new stream.
    fn open(&mut self, desc: &EncodedDesc) -> Result<Box<dyn EncodedSink>, OutputError>;
    /// Where the streams go, for the startup log.
    fn describe(&self) -> String;
}

/// One encoded stream's destination.
pub trait EncodedSink {
    /// Takes one access unit, in order.
    fn access_unit(&mut self, au: &AccessUnit);
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
    fn access_unit(&mut self, _au: &AccessUnit) {}

    fn control(&mut self, _control: StreamControl) {}

    fn close(&mut self, _reason: &str) -> Result<(), OutputError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "nowhere".into()
    }
}

/// `--video-output frames:DIR`. See the module docs.
#[derive(Debug)]
pub struct FramesOutput {
    dir: PathBuf,
    /// Bytes all files of this run may still take.
    left: std::rc::Rc<std::cell::Cell<u64>>,
    max_bytes: u64,
}

impl FramesOutput {
    /// Creates `dir` if needed.
    pub fn new(dir: &Path, max_bytes: u64) -> Result<Self, OutputError> {
        std::fs::create_dir_all(dir).map_err(|source| OutputError::Io { path: dir.into(), source })?;
        Ok(Self { dir: dir.into(), left: std::rc::Rc::new(std::cell::Cell::new(max_bytes)), max_bytes })
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

impl EncodedOutput for FramesOutput {
    fn open(&mut self, desc: &EncodedDesc) -> Result<Box<dyn EncodedSink>, OutputError> {
        let app = super::file_name_part(&desc.open.app.name);
        let pid = std::process::id();
        let stem = format!("p{pid}-s{}-stream{}-{app}.{}", desc.session, desc.stream, desc.open.codec.name());
        let base = self.dir.join(stem);
        let index_path = base.with_extension(format!("{}.jsonl", desc.open.codec.name()));
        let data_path = base.with_extension(format!("{}.bin", desc.open.codec.name()));
        let index = create_new(&index_path)?;
        let data = create_new(&data_path)?;
        let mut sink = FramesSink { path: data_path, index, data, offset: 0, left: self.left.clone(), full: false };
        let (kind, size) = match &desc.open.media {
            MediaKind::EncodedVideo(v) => (
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
    left: std::rc::Rc<std::cell::Cell<u64>>,
    /// The run's byte cap was reached (said once, in the index).
    full: bool,
}

/// FNV-1a, 64 bits: a checksum the tests recompute.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl FramesSink {
    fn take(&mut self, bytes: u64) -> bool {
        let left = self.left.get();
        if bytes > left {
            if !self.full {
                self.full = true;
                let _ = writeln!(self.index, "{}", json!({"event": "full"}));
            }
            return false;
        }
        self.left.set(left - bytes);
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
    fn access_unit(&mut self, au: &AccessUnit) {
        if !self.take(au.data.len() as u64 + 256) {
            return;
        }
        let line = json!({"event": "au", "seq": au.seq, "pts_ns": au.pts_ns, "dts_ns": au.dts(),
            "duration_ns": au.duration_ns, "keyframe": au.is_keyframe(),
            "discontinuity": au.flags & au_flags::DISCONTINUITY != 0,
            "size": au.data.len(), "offset": self.offset, "fnv": fnv1a(&au.data)});
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
