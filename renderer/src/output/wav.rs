//! `--output wav:DIR`: one WAV file per guest stream.
//!
//! Streams that arrived as s16 PCM are stored as s16 (bit-exact to the wire); Opus
//! streams as 32-bit float. The header is rewritten with the true sizes once a second
//! and when the stream closes, so a file is valid at the latest when its stream closes
//! or `melange-host` gets SIGINT/SIGTERM, and nearly complete even after a SIGKILL.
//!
//! What a guest can do to the directory is bounded:
//! - A file is only ever created, never opened again: exclusively (`O_EXCL`), never
//!   through a symlink, so an earlier recording (another run's, another stream's) is
//!   never truncated or overwritten. Names are `s<SESSION>-stream<ID>[.<PART>]-<APP>.wav`,
//!   and the session numbers of a run start after the highest one already in the
//!   directory, so they stay unique across restarts; a name taken all the same (two
//!   hosts in one directory) gets `~2`, `~3`, ... before `.wav`.
//! - Each stream is written at most in real time: its receiver drops audio beyond it
//!   ([`melange_shim::receive`]).
//! - All streams together write at most `--wav-max-bytes` in one run, each file
//!   counting [`FILE_COST`] besides its audio (so that streams opened and closed at
//!   the control limit cannot make files without end); when that is reached the files
//!   are finished as they are, one line says so, and further audio is discarded (new
//!   streams get no file). A file stops at the format's 4 GiB.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use melange_shim::wav::{self, SampleFormat, WavFormat};
use melange_transport::message::Volume;

use super::{Output, OutputError, StreamDesc, StreamSink};

const HEADER_REFRESH: Duration = Duration::from_secs(1);
/// Default of `--wav-max-bytes`: 1 GiB, 46 minutes of one stereo Opus stream (stored
/// as float) or 3 hours of stereo PCM.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Attempts at a free name (`~2`, `~3`, ...) before giving up on a stream's file.
const NAME_ATTEMPTS: u32 = 100;
/// What a file costs against `--wav-max-bytes` before its audio: its header, an inode
/// and the blocks a file system gives a small file, rounded up.
pub const FILE_COST: u64 = 64 * 1024;

/// What all the files of one run may hold together.
#[derive(Debug)]
struct Budget {
    max_bytes: u64,
    written: AtomicU64,
    /// Set once the cap is reached (and said).
    reached: AtomicBool,
    /// Set once a write failed (and said): a full disk fails every stream's writes,
    /// and a guest opening streams would make a line each.
    failed: AtomicBool,
}

impl Budget {
    /// Takes `n` bytes; false once the cap is reached.
    fn take(&self, n: u64) -> bool {
        if self.reached.load(Ordering::Relaxed) {
            return false;
        }
        if self.written.load(Ordering::Relaxed) + n > self.max_bytes {
            if !self.reached.swap(true, Ordering::Relaxed) {
                log::error!(
                    "melange-host: the WAV files of this run reached --wav-max-bytes ({} bytes): they are finished as \
                     they are and further audio is discarded; raise the limit or restart melange-host",
                    self.max_bytes
                );
            }
            return false;
        }
        self.written.fetch_add(n, Ordering::Relaxed);
        true
    }
}

/// Writes streams into a directory.
#[derive(Debug)]
pub struct WavOutput {
    dir: PathBuf,
    /// The highest session number in the directory's names when this run started.
    session_base: u64,
    budget: Arc<Budget>,
}

impl WavOutput {
    /// Creates `dir` if needed; all files of this run hold at most `max_bytes`.
    pub fn new(dir: &Path, max_bytes: u64) -> Result<Self, OutputError> {
        let io = |source| OutputError::Io { path: dir.into(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let session_base = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| session_of(&e.ok()?.file_name().to_string_lossy()))
            .max()
            .unwrap_or(0);
        let budget = Budget {
            max_bytes,
            written: AtomicU64::new(0),
            reached: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        };
        Ok(Self { dir: dir.into(), session_base, budget: Arc::new(budget) })
    }
}

/// The session number of a file name this output makes (`s12-stream3-app.wav`: 12).
fn session_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix('s')?;
    let (n, rest) = rest.split_once('-')?;
    // Numbers no run reaches (a planted name) are not ours.
    (rest.starts_with("stream") && name.ends_with(".wav")).then(|| n.parse().ok().filter(|n| *n < 1 << 48))?
}

impl Output for WavOutput {
    fn open(&mut self, desc: &StreamDesc) -> Result<Box<dyn StreamSink>, OutputError> {
        if !self.budget.take(FILE_COST) {
            return Ok(Box::new(super::null::Discard("nowhere (--wav-max-bytes reached)")));
        }
        let app = super::file_name_part(&desc.open.app.name);
        let part = if desc.part > 1 { format!(".{}", desc.part) } else { String::new() };
        let stem = format!("s{}-stream{}{part}-{app}", self.session_base.saturating_add(desc.session), desc.stream);
        let mut last = None;
        for attempt in 1..=NAME_ATTEMPTS {
            let name = if attempt == 1 { format!("{stem}.wav") } else { format!("{stem}~{attempt}.wav") };
            match WavWriter::create_new(&self.dir.join(name), desc.format.rate, desc.format.channels, desc.from_s16) {
                Err(OutputError::Io { source, path }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                    last = Some(OutputError::Io { source, path });
                }
                Ok(mut writer) => {
                    writer.budget = Some(self.budget.clone());
                    return Ok(Box::new(writer));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| OutputError::Io {
            path: self.dir.join(format!("{stem}.wav")),
            source: std::io::ErrorKind::AlreadyExists.into(),
        }))
    }

    fn describe(&self) -> String {
        format!("WAV files in {} (at most {} bytes)", self.dir.display(), self.budget.max_bytes)
    }
}

/// A streaming WAV writer (PCM s16 or IEEE float).
#[derive(Debug)]
pub struct WavWriter {
    path: PathBuf,
    file: BufWriter<File>,
    s16: bool,
    channels: u16,
    rate: u32,
    data_bytes: u64,
    last_header: Instant,
    scratch: Vec<u8>,
    /// The guest's volume per channel (muted: 0).
    gains: Vec<f32>,
    closed: bool,
    /// The run's budget, where there is one; and whether writing failed (said once).
    budget: Option<Arc<Budget>>,
    failed: bool,
}

impl WavWriter {
    /// Creates a new file (never one that exists, never through a symlink) and writes a
    /// provisional header.
    pub fn create_new(path: &Path, rate: u32, channels: u8, s16: bool) -> Result<Self, OutputError> {
        let io = |source| OutputError::Io { path: path.into(), source };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o640)
            .open(path)
            .map_err(io)?;
        let mut w = Self {
            path: path.into(),
            file: BufWriter::with_capacity(64 * 1024, file),
            s16,
            channels: u16::from(channels),
            rate,
            data_bytes: 0,
            last_header: Instant::now(),
            scratch: Vec::new(),
            gains: vec![1.0; usize::from(channels)],
            closed: false,
            budget: None,
            failed: false,
        };
        w.write_header().map_err(io)?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_header(&mut self) -> std::io::Result<()> {
        let sample = if self.s16 { SampleFormat::S16 } else { SampleFormat::F32 };
        // A file never holds more than the header can say (see `append`).
        let h = wav::header(WavFormat { sample, channels: self.channels, rate: self.rate }, self.data_bytes);
        self.file.flush()?;
        let f = self.file.get_mut();
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&h)?;
        f.seek(SeekFrom::End(0))?;
        Ok(())
    }

    fn append(&mut self, samples: &[f32]) -> std::io::Result<()> {
        let bytes = samples.len() as u64 * if self.s16 { 2 } else { 4 };
        // Most audio one file holds: what a RIFF header can say.
        if self.data_bytes + bytes > wav::MAX_DATA_BYTES {
            return Err(std::io::Error::other("a WAV file holds 4 GiB at most"));
        }
        if self.budget.as_ref().is_some_and(|b| !b.take(bytes)) {
            return Ok(());
        }
        self.scratch.clear();
        let gains = self.gains.iter().copied().cycle();
        let scaled = samples.iter().zip(gains).map(|(v, g)| if g == 1.0 { *v } else { v * g });
        if self.s16 {
            // Exact inverse of the decoder's s16 / 32768 (at full volume).
            self.scratch
                .extend(scaled.flat_map(|v| ((v * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes()));
        } else {
            self.scratch.extend(scaled.flat_map(|v| v.to_le_bytes()));
        }
        self.file.write_all(&self.scratch)?;
        self.data_bytes += self.scratch.len() as u64;
        if self.last_header.elapsed() >= HEADER_REFRESH {
            self.last_header = Instant::now();
            self.write_header()?;
        }
        Ok(())
    }
}

impl StreamSink for WavWriter {
    fn write(&mut self, samples: &[f32]) {
        if self.failed {
            return;
        }
        if let Err(e) = self.append(samples) {
            // A full disk fails every write from here on: said once a run.
            if !self.budget.as_ref().is_some_and(|b| b.failed.swap(true, Ordering::Relaxed)) {
                log::error!(
                    "melange-host: {}: write failed: {e}; the rest of this stream is not written (later failures \
                     of this run are not logged)",
                    self.path.display()
                );
            }
            self.failed = true;
        }
    }

    fn set_volume(&mut self, volume: &Volume) {
        self.gains =
            if volume.mute { vec![0.0; usize::from(self.channels)] } else { volume.gains(usize::from(self.channels)) };
    }

    fn buffered_frames(&self) -> usize {
        0
    }

    fn underruns(&self) -> u64 {
        0
    }

    fn overflows(&self) -> u64 {
        0
    }

    fn close(&mut self) -> Result<(), OutputError> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.write_header()
            .and_then(|()| self.file.flush())
            .map_err(|source| OutputError::Io { path: self.path.clone(), source })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for WavWriter {
    fn drop(&mut self) {
        let _ = StreamSink::close(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_valid_s16_file() {
        let path = std::env::temp_dir().join(format!("melange-wav-test-{}.wav", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut w = WavWriter::create_new(&path, 48000, 2, true).unwrap();
        w.write(&[0.5, -0.5, 0.25, -1.0]);
        w.close().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (format, data) = wav::parse(&bytes).unwrap();
        assert_eq!(format, WavFormat { sample: SampleFormat::S16, channels: 2, rate: 48000 });
        assert_eq!(bytes[..wav::HEADER_BYTES], wav::header(format, 8));
        let samples: Vec<i16> = data.chunks(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(samples, [16384, -16384, 8192, -32768]);
        std::fs::remove_file(path).unwrap();
    }

    fn desc(session: u64, stream: u32, app: &str) -> StreamDesc {
        use melange_transport::message::{AppInfo, AudioFormat, Codec, MediaKind, StreamOpen};
        let format = AudioFormat { rate: 48_000, channels: 1, positions: vec![2] };
        StreamDesc {
            stream,
            session,
            open: StreamOpen {
                media: MediaKind::Audio(format.clone()),
                codec: Codec::PcmS16Le,
                frame_samples: 480,
                app: AppInfo { name: app.into(), ..Default::default() },
                codec_data: Vec::new(),
            },
            format,
            from_s16: true,
            latency_frames: 960,
            latency_auto: false,
            quantum: 128,
            part: 1,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("melange-wav-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_restarted_host_never_truncates_or_follows_what_is_there() {
        let dir = scratch("restart");
        // An earlier run's recording, and a symlink planted where a new name could go.
        std::fs::write(dir.join("s1-stream1-app.wav"), b"earlier recording").unwrap();
        std::fs::write(dir.join("victim"), b"not ours").unwrap();
        std::os::unix::fs::symlink(dir.join("victim"), dir.join("s2-stream1-app.wav")).unwrap();
        let mut out = WavOutput::new(&dir, DEFAULT_MAX_BYTES).unwrap();
        let mut sink = out.open(&desc(1, 1, "app")).unwrap();
        sink.write(&[0.5; 480]);
        sink.close().unwrap();
        assert_eq!(sink.describe(), dir.join("s3-stream1-app.wav").display().to_string());
        assert_eq!(std::fs::read(dir.join("s1-stream1-app.wav")).unwrap(), b"earlier recording");
        assert_eq!(std::fs::read(dir.join("victim")).unwrap(), b"not ours");
        // A name taken all the same (another host in the directory, a link planted
        // there) gets a suffix; nothing is written through the link.
        std::fs::write(dir.join("s4-stream2-app.wav"), b"other host").unwrap();
        let sink = out.open(&desc(2, 2, "app")).unwrap();
        assert_eq!(sink.describe(), dir.join("s4-stream2-app~2.wav").display().to_string());
        assert_eq!(std::fs::read(dir.join("s4-stream2-app.wav")).unwrap(), b"other host");
        std::os::unix::fs::symlink(dir.join("victim"), dir.join("s4-stream3-app.wav")).unwrap();
        let sink = out.open(&desc(2, 3, "app")).unwrap();
        assert_eq!(sink.describe(), dir.join("s4-stream3-app~2.wav").display().to_string());
        assert_eq!(std::fs::read(dir.join("victim")).unwrap(), b"not ours");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn all_files_together_stop_at_the_cap() {
        let dir = scratch("cap");
        let mut out = WavOutput::new(&dir, 2 * FILE_COST + 10_000).unwrap();
        let mut a = out.open(&desc(1, 1, "a")).unwrap();
        let mut b = out.open(&desc(1, 2, "b")).unwrap();
        for _ in 0..10 {
            a.write(&[0.25; 480]);
            b.write(&[0.25; 480]);
        }
        a.close().unwrap();
        b.close().unwrap();
        let sizes: u64 = ["s1-stream1-a.wav", "s1-stream2-b.wav"]
            .iter()
            .map(|n| std::fs::metadata(dir.join(n)).unwrap().len() - wav::HEADER_BYTES as u64)
            .sum();
        assert!((10_000 - 960..=10_000).contains(&sizes), "{sizes} bytes of audio");
        // And a stream opened after the cap gets no file.
        let late = out.open(&desc(1, 3, "c")).unwrap();
        assert!(late.describe().contains("--wav-max-bytes"), "{}", late.describe());
        assert!(!dir.join("s1-stream3-c.wav").exists());
        // Each file is whole: its header says what it holds.
        let bytes = std::fs::read(dir.join("s1-stream1-a.wav")).unwrap();
        let (format, _) = wav::parse(&bytes).unwrap();
        let held = bytes.len() - wav::HEADER_BYTES;
        assert_eq!(bytes[..wav::HEADER_BYTES], wav::header(format, held as u64));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
