//! `--output wav:DIR`: one WAV file per guest stream.
//!
//! Streams that arrived as s16 PCM are stored as s16 (bit-exact to the wire); Opus
//! streams as 32-bit float. The header is rewritten with the true sizes once a second
//! and when the stream closes, so a file is valid at the latest when its stream closes
//! or `melange-host` gets SIGINT/SIGTERM, and nearly complete even after a SIGKILL.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use melange_transport::message::Volume;

use super::{Output, OutputError, StreamDesc, StreamSink};

const HEADER_REFRESH: Duration = Duration::from_secs(1);

/// Writes streams into a directory.
#[derive(Debug)]
pub struct WavOutput {
    dir: PathBuf,
}

impl WavOutput {
    /// Creates `dir` if needed.
    pub fn new(dir: &Path) -> Result<Self, OutputError> {
        std::fs::create_dir_all(dir).map_err(|source| OutputError::Io { path: dir.into(), source })?;
        Ok(Self { dir: dir.into() })
    }
}

impl Output for WavOutput {
    fn open(&mut self, desc: &StreamDesc) -> Result<Box<dyn StreamSink>, OutputError> {
        let app: String = desc
            .open
            .app
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
            .take(40)
            .collect();
        let part = if desc.part > 1 { format!(".{}", desc.part) } else { String::new() };
        let path = self.dir.join(format!("s{}-stream{}{part}-{app}.wav", desc.session, desc.stream));
        let writer = WavWriter::create(&path, desc.format.rate, desc.format.channels, desc.from_s16)?;
        Ok(Box::new(writer))
    }

    fn describe(&self) -> String {
        format!("WAV files in {}", self.dir.display())
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
}

impl WavWriter {
    /// Creates the file and writes a provisional header.
    pub fn create(path: &Path, rate: u32, channels: u8, s16: bool) -> Result<Self, OutputError> {
        let io = |source| OutputError::Io { path: path.into(), source };
        let file = File::create(path).map_err(io)?;
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
        };
        w.write_header().map_err(io)?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_header(&mut self) -> std::io::Result<()> {
        let bytes_per_sample: u16 = if self.s16 { 2 } else { 4 };
        let block = self.channels * bytes_per_sample;
        // Sizes saturate at the format's 4 GiB limit instead of wrapping.
        let data = u32::try_from(self.data_bytes).unwrap_or(u32::MAX - 36);
        let mut h = Vec::with_capacity(44);
        h.extend_from_slice(b"RIFF");
        h.extend_from_slice(&(36 + data).to_le_bytes());
        h.extend_from_slice(b"WAVEfmt ");
        h.extend_from_slice(&16u32.to_le_bytes());
        h.extend_from_slice(&(if self.s16 { 1u16 } else { 3u16 }).to_le_bytes());
        h.extend_from_slice(&self.channels.to_le_bytes());
        h.extend_from_slice(&self.rate.to_le_bytes());
        h.extend_from_slice(&(self.rate * u32::from(block)).to_le_bytes());
        h.extend_from_slice(&block.to_le_bytes());
        h.extend_from_slice(&(bytes_per_sample * 8).to_le_bytes());
        h.extend_from_slice(b"data");
        h.extend_from_slice(&data.to_le_bytes());
        self.file.flush()?;
        let f = self.file.get_mut();
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&h)?;
        f.seek(SeekFrom::End(0))?;
        Ok(())
    }

    fn append(&mut self, samples: &[f32]) -> std::io::Result<()> {
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
        if let Err(e) = self.append(samples) {
            log::error!("{}: write failed: {e}", self.path.display());
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
        let mut w = WavWriter::create(&path, 48000, 2, true).unwrap();
        w.write(&[0.5, -0.5, 0.25, -1.0]);
        w.close().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 36 + 8);
        assert_eq!(u32::from_le_bytes(bytes[40..44].try_into().unwrap()), 8);
        let samples: Vec<i16> = bytes[44..].chunks(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(samples, [16384, -16384, 8192, -32768]);
        std::fs::remove_file(path).unwrap();
    }
}
