//! Where decoded streams go. One [`Output`] per process, one [`StreamSink`] per guest
//! stream; one file per backend.

pub mod encoded;
mod null;
#[allow(unsafe_code)]
mod pipewire;
mod wav;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use melange_transport::message::{AudioFormat, StreamOpen, Volume};
use thiserror::Error;

pub use self::null::NullOutput;

pub(crate) use self::pipewire::format_pod;
pub use self::pipewire::PipeWireOutput;
pub use self::wav::{WavOutput, WavWriter, DEFAULT_MAX_BYTES as DEFAULT_WAV_MAX_BYTES};

/// `--output` as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// One playback stream per guest stream on the host's PipeWire.
    PipeWire,
    /// One WAV file per guest stream in a directory.
    Wav(PathBuf),
    /// Everything into a directory: tapped audio as WAV files, a player's encoded
    /// streams as `--video-output frames:DIR` writes them (unless that is given).
    Frames(PathBuf),
    /// Decode and discard.
    Null,
}

impl FromStr for OutputSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pipewire" => Ok(OutputSpec::PipeWire),
            "null" => Ok(OutputSpec::Null),
            _ => match (s.strip_prefix("wav:"), s.strip_prefix("frames:")) {
                (Some(dir), _) if !dir.is_empty() => Ok(OutputSpec::Wav(dir.into())),
                (_, Some(dir)) if !dir.is_empty() => Ok(OutputSpec::Frames(dir.into())),
                _ => Err(format!("invalid output {s:?}: expected pipewire, wav:DIR, frames:DIR or null")),
            },
        }
    }
}

/// An output backend failed.
#[derive(Debug, Error)]
pub enum OutputError {
    /// The host's PipeWire is not reachable.
    #[error("cannot connect to the host's PipeWire ({0}); is it running for this user? Use --output wav:DIR or --output null without it")]
    PipeWireUnavailable(String),
    /// PipeWire refused a stream.
    #[error("PipeWire stream: {0}")]
    PipeWire(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What a stream sink needs to know besides the samples.
#[derive(Debug, Clone)]
pub struct StreamDesc {
    /// Guest stream id.
    pub stream: u32,
    /// Host session number (1, 2, ...), so file names stay unique across reconnects.
    pub session: u64,
    /// The guest's announcement.
    pub open: StreamOpen,
    /// Decoded layout.
    pub format: AudioFormat,
    /// Whether samples came from s16 (so a WAV can store them losslessly as s16).
    pub from_s16: bool,
    /// Jitter-buffer target in sample frames.
    pub latency_frames: usize,
    /// True when the target was derived (`--latency auto`): the output may then trim the
    /// buffer to what the arrival pattern needs; a given target is held as given.
    pub latency_auto: bool,
    /// Output quantum in sample frames (what the PipeWire output asks for).
    pub quantum: u32,
    /// Which output of this stream this is: 1, then 2, 3, ... each time an idle stream
    /// plays again.
    pub part: u32,
}

impl StreamDesc {
    /// What the host shows for the stream, e.g. "Firefox (guest)".
    pub fn display_name(&self) -> String {
        let app = if self.open.app.name.is_empty() { "Guest app" } else { self.open.app.name.as_str() };
        format!("{app} (guest)")
    }
}

/// A backend.
pub trait Output {
    /// Creates the sink for a new guest stream. Never waits for a sound server: a
    /// backend that must may answer later ([`StreamSink::poll_open`]).
    fn open(&mut self, desc: &StreamDesc) -> Result<Box<dyn StreamSink>, OutputError>;
    /// Where the sound goes, for the startup log.
    fn describe(&self) -> String;
    /// A volume or mute the user set on one of the streams on the host since the last
    /// call (the guest's volume applies to all of them: see [`Volume`]).
    fn take_user_volume(&mut self) -> Option<Volume> {
        None
    }
}

/// One guest stream's destination.
pub trait StreamSink {
    /// Takes decoded interleaved samples. Never blocks.
    fn write(&mut self, samples: &[f32]);
    /// Sample frames written but not yet played (jitter buffer plus output queue).
    fn buffered_frames(&self) -> usize;
    /// Underruns so far (output wanted samples the buffer did not have).
    fn underruns(&self) -> u64;
    /// Samples dropped because the buffer was full.
    fn overflows(&self) -> u64;
    /// How long a sample written now waits before it is heard, in nanoseconds, at
    /// `now_ns` (`CLOCK_MONOTONIC`): the audio buffered ahead of it, the wait for the
    /// output's next cycle, and the output's own latency. 0 where nothing is heard
    /// (files, null).
    fn render_delay_ns(&self, _now_ns: u64) -> u64 {
        0
    }
    /// True once the output went away under the stream (the host's PipeWire
    /// restarted): the host then opens a new one.
    fn is_lost(&self) -> bool {
        false
    }
    /// For an output that opens in the background (the host's PipeWire: [`Output::open`]
    /// returns before it has answered): `Err` once opening failed after all, at `now`
    /// or earlier; the sink then plays nothing and is dropped like one whose open
    /// failed. `Ok` while opening and once open.
    fn poll_open(&mut self, _now: Instant) -> Result<(), OutputError> {
        Ok(())
    }
    /// The fill the jitter buffer holds (drift control's set point), where there is one.
    fn target_frames(&self) -> Option<u64> {
        None
    }
    /// Times a backlog beyond the target was cut, and the frames cut, where the output
    /// has a jitter buffer.
    fn latency_cuts(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Outages of the output (cycles that came over 100 ms after the last: this process
    /// or the host's graph stopped), where it counts them.
    fn outages(&self) -> u64 {
        0
    }
    /// The clock difference drift control has measured, in ppm, where it runs.
    fn drift_ppm(&self) -> Option<f64> {
        None
    }
    /// How much faster than `CLOCK_MONOTONIC` the output's graph ran, in ppm, where it
    /// has one (a busy machine can make it run slow).
    fn clock_ppm(&self) -> Option<f64> {
        None
    }
    /// Applies the guest's output volume: on the host's mixer where there is one (so the
    /// user sees it there), to the samples in files.
    fn set_volume(&mut self, _volume: &Volume) {}
    /// Finishes the stream (drains or finalises files). Called exactly once.
    fn close(&mut self) -> Result<(), OutputError>;
    /// Where this stream goes, for the log.
    fn describe(&self) -> String;
}

/// An app's name as part of a file name: ASCII letters, digits, `-` and `.` kept, the
/// rest `_`, at most 40 characters (guest strings never choose a path).
pub(crate) fn file_name_part(app: &str) -> String {
    app.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).take(40).collect()
}

/// What an output may hold.
#[derive(Debug, Clone, Copy)]
pub struct OutputLimits {
    /// Streams at once (a PipeWire stream still playing out after its close counts).
    pub max_streams: usize,
    /// Bytes all WAV files of a run may hold together (`--wav-max-bytes`).
    pub wav_max_bytes: u64,
}

/// Makes the backend `spec` names.
pub fn make_output(spec: &OutputSpec, limits: OutputLimits) -> Result<Box<dyn Output>, OutputError> {
    Ok(match spec {
        OutputSpec::PipeWire => Box::new(PipeWireOutput::connect(limits.max_streams)?),
        OutputSpec::Wav(dir) | OutputSpec::Frames(dir) => Box::new(WavOutput::new(dir, limits.wav_max_bytes)?),
        OutputSpec::Null => Box::new(NullOutput),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_output_specs() {
        assert_eq!("pipewire".parse(), Ok(OutputSpec::PipeWire));
        assert_eq!("null".parse(), Ok(OutputSpec::Null));
        assert_eq!("wav:/tmp/x".parse(), Ok(OutputSpec::Wav("/tmp/x".into())));
        assert_eq!("frames:/tmp/f".parse(), Ok(OutputSpec::Frames("/tmp/f".into())));
        assert!("frames:".parse::<OutputSpec>().is_err());
        assert!("wav:".parse::<OutputSpec>().unwrap_err().contains("expected pipewire"));
        assert!("alsa".parse::<OutputSpec>().is_err());
    }
}
