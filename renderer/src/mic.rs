//! The user's microphone for the guest, opened only while a guest app records.
//!
//! The guest says when an app starts and stops recording from its virtual microphone
//! (`CaptureDemand`); only then does melange-host hold a capture stream on the host's
//! PipeWire, so the host's microphone indicator tells the truth. Each capture gets a
//! thread with its own PipeWire connection, made on demand and dropped with it: a host
//! whose PipeWire restarted between two calls simply connects again.
//!
//! The stream's real-time callback copies each cycle into a tap ring ([`TapWriter`]),
//! as the guest's taps do; the session thread cuts it into packets and encodes them
//! with Opus's `voip` application ([`TapEncoder`]), mono at 32 kbit/s.

use std::str::FromStr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use melange_pw::{Held, RtStream, StartError, Started};
use melange_shim::codec::CodecError;
use melange_shim::opus::Application;
use melange_shim::tap::{tap_ring, TapEncoder, TapWriter};
use melange_transport::message::{AppInfo, AudioFormat, Codec, MediaKind, MediaPacket, StreamOpen};
use pipewire as pw;
use pw::spa;

/// The microphone's rate (the protocol's): Opus's and PipeWire's default.
pub use melange_transport::message::MIC_RATE;
/// Opus bitrate of the microphone: clean wideband speech.
pub const MIC_BITRATE: u32 = 32_000;
/// Captured audio the ring holds: far more than the session thread's wake-up period.
const RING: Duration = Duration::from_millis(500);
/// How long opening may take before the guest is told there is no microphone.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// `--mic`: which host source the guest's virtual microphone records from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MicSpec {
    /// The host's default source (WirePlumber's choice, followed if it changes).
    Default,
    /// This source (`node.name`, or an `object.serial`); never another.
    Named(String),
    /// None: the guest's microphone stays silent.
    None,
}

impl FromStr for MicSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("empty --mic: give default, none or a source's node.name".into()),
            "default" => Ok(MicSpec::Default),
            "none" => Ok(MicSpec::None),
            name => Ok(MicSpec::Named(name.into())),
        }
    }
}

impl std::fmt::Display for MicSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MicSpec::Default => f.write_str("the default source"),
            MicSpec::Named(n) => write!(f, "source {n}"),
            MicSpec::None => f.write_str("no source (--mic none)"),
        }
    }
}

/// The announcement of the microphone stream to the guest.
pub fn stream_open(frame_samples: u32) -> StreamOpen {
    StreamOpen {
        media: MediaKind::Audio(format()),
        codec: Codec::Opus { bitrate: MIC_BITRATE },
        frame_samples,
        app: AppInfo { name: "Microphone".into(), role: "Communication".into(), ..AppInfo::default() },
        codec_data: Vec::new(),
    }
}

fn format() -> AudioFormat {
    AudioFormat { rate: MIC_RATE, channels: 1, positions: vec![spa::sys::SPA_AUDIO_CHANNEL_MONO] }
}

/// A capture stream, opening or open, and its encoder. Dropping it closes the stream.
pub struct MicCapture {
    encoder: TapEncoder,
    quit: pw::channel::Sender<()>,
    thread: Option<JoinHandle<()>>,
    /// The capture thread's word on opening, until it came.
    opening: Option<(Started, Instant)>,
}

impl std::fmt::Debug for MicCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicCapture").finish_non_exhaustive()
    }
}

impl MicCapture {
    /// Starts opening `spec` (not [`MicSpec::None`]) in packets of `frame_samples` on a
    /// thread of its own, without waiting for PipeWire: [`MicCapture::poll_open`] says
    /// when the stream is open.
    pub fn open(spec: &MicSpec, frame_samples: u32) -> Result<Self, String> {
        let target = match spec {
            MicSpec::None => return Err("no microphone (--mic none)".into()),
            MicSpec::Default => None,
            MicSpec::Named(n) => Some(n.clone()),
        };
        let (writer, reader) = tap_ring(MIC_RATE as usize * 4 * RING.as_millis() as usize / 1000, 4, MIC_RATE);
        let codec = Codec::Opus { bitrate: MIC_BITRATE };
        let encoder = TapEncoder::new(reader, &format(), &codec, frame_samples, Application::Voip)
            .map_err(|e| format!("cannot make the microphone's encoder: {e}"))?;
        let (quit_tx, quit_rx) = pw::channel::channel::<()>();
        let (thread, ready) = melange_pw::spawn_client("melange-mic", move |client, core| {
            serve(client, core, target, frame_samples, writer, quit_rx)
        })
        .map_err(|e| format!("cannot start the microphone's thread: {e}"))?;
        Ok(Self { encoder, quit: quit_tx, thread: Some(thread), opening: Some((ready, Instant::now())) })
    }

    /// Whether the capture stream is open: `Ok(false)` while the host's PipeWire has not
    /// answered (at most [`OPEN_TIMEOUT`]), `Ok(true)` from when it has, `Err` if opening
    /// failed (the capture is then useless and should be dropped).
    pub fn poll_open(&mut self) -> Result<bool, String> {
        let Some((ready, since)) = &self.opening else { return Ok(true) };
        match ready.try_recv() {
            Ok(Ok(())) => {
                self.opening = None;
                Ok(true)
            }
            Ok(Err(StartError::Connect(e))) => {
                Err(format!("cannot connect to the host's PipeWire ({e}); is it running for this user?"))
            }
            Ok(Err(StartError::Serve(e))) => Err(e),
            Err(crossbeam_channel::TryRecvError::Empty) if since.elapsed() < OPEN_TIMEOUT => Ok(false),
            Err(crossbeam_channel::TryRecvError::Empty) => {
                Err(format!("the host's PipeWire did not answer within {OPEN_TIMEOUT:?}"))
            }
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err("the microphone's thread ended".into()),
        }
    }

    /// The next whole packet captured, encoded.
    pub fn next_packet(&mut self) -> Option<Result<MediaPacket, CodecError>> {
        self.encoder.next_packet()
    }

    /// Drops what was captured and not yet sent, unencoded (while the guest does not
    /// want it); the guest sees the gap as lost packets.
    pub fn skip_waiting(&mut self) {
        self.encoder.skip_waiting();
    }

    /// When the next packet is due, in `CLOCK_MONOTONIC` ns (see [`TapEncoder::wake_at`]).
    pub fn wake_at(&self, now_ns: u64) -> u64 {
        self.encoder.wake_at(now_ns)
    }

    fn stop(&mut self) {
        let _ = self.quit.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MicCapture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the capture thread serves (see [`melange_pw::spawn_client`]): the capture
/// stream, until told to quit.
fn serve<'c>(
    client: &'c melange_pw::Client,
    core: pw::core::CoreRc,
    target: Option<String>,
    frame_samples: u32,
    writer: TapWriter,
    quit: pw::channel::Receiver<()>,
) -> Result<Box<dyn Held + 'c>, String> {
    let stream = open_stream(&core, target.as_deref(), frame_samples, writer)?;
    let weak_loop = client.main_loop.downgrade();
    let receiver = quit.attach(client.main_loop.loop_(), move |()| {
        if let Some(l) = weak_loop.upgrade() {
            l.quit();
        }
    });
    Ok(Box::new((stream, receiver)))
}

fn open_stream(
    core: &pw::core::CoreRc,
    target: Option<&str>,
    frame_samples: u32,
    writer: TapWriter,
) -> Result<RtStream<pw::stream::StreamRc, TapWriter>, String> {
    let mut props = pw::properties::properties! {
        "media.type" => "Audio",
        "media.category" => "Capture",
        "media.role" => "Communication",
        "node.name" => "melange.mic",
        "node.description" => "Guest microphone",
        "application.name" => "Melange",
        // Half a packet, so a packet is whole soon after its last sample was spoken.
        "node.latency" => format!("{}/{MIC_RATE}", (frame_samples / 2).next_power_of_two().clamp(64, 256)).as_str(),
    };
    if let Some(t) = target {
        // A named source or nothing: never another microphone by fallback.
        props.insert("target.object", t);
        props.insert("node.dont-reconnect", "true");
        props.insert("node.dont-fallback", "true");
    }
    let stream = pw::stream::StreamRc::new(core.clone(), "melange-mic", props).map_err(|e| e.to_string())?;
    let listener = stream
        .add_local_listener_with_user_data(writer)
        .process(melange_pw::capture_into)
        .register()
        .map_err(|e| e.to_string())?;
    let stream = RtStream::new(stream, listener);
    let pod = crate::output::format_pod(&format())?;
    melange_pw::connect(&stream, spa::utils::Direction::Input, &pod, true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mic_specs() {
        assert_eq!("default".parse(), Ok(MicSpec::Default));
        assert_eq!("none".parse(), Ok(MicSpec::None));
        assert_eq!("alsa_input.usb".parse(), Ok(MicSpec::Named("alsa_input.usb".into())));
        assert!("".parse::<MicSpec>().is_err());
    }
}
