//! The host side of a session: streams in, decoded audio out.
//!
//! [`Host`] owns the protocol session for the current connection and one
//! [`HostStream`] per guest stream. Its core is sans-IO: [`Host::receive`] and
//! [`Host::tick`] take the time as an argument; [`Host::run`] is the poll loop over a
//! [`Port`] that feeds them. Each received stream goes through a [`Receiver`] (order,
//! concealment, the real-time budget, decoding) into its output's sink.
//!
//! Everything the guest can make it log goes through [`GuestLog`]: within a byte
//! budget, bad input at most once per kind every 5 s, and guest strings sanitized by
//! the session before they get here.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use melange_shim::clock;
use melange_shim::receive::{BurstPool, Dropped, Receiver};
use melange_transport::frame::HEADER_LEN;
use melange_transport::message::{
    au_flags, codec_bits, kind_bits, AccessUnit, Capabilities, CaptureDemand, CaptureDevice, Codec, MediaKind,
    MediaPacket, Role, StreamControl, StreamOpen, Volume, MEDIA_HEADER_LEN,
};
use melange_transport::port::{Port, PortEvent, Waker};
use melange_transport::session::{Event, Session, SessionConfig, SessionError};

use crate::camera::{CameraCapture, CameraCodec, CameraSpec};
use crate::encoded::{AudioOut, EncodedStreams, Reply};
use crate::guest_log::{GuestLog, Level};
use crate::mic::{MicCapture, MicSpec, MIC_RATE};
use crate::output::encoded::NullVideo;
use crate::output::{Output, StreamDesc, StreamSink};
use crate::stats::StreamStats;

/// Streams a guest may have open at once.
pub use melange_transport::message::MAX_STREAMS;

/// The output quantum for a stream, at 48 kHz: 128 frames for packets of 10 ms and
/// more, 64 below (low-latency mode); scaled to the stream's rate. A sample must be
/// buffered when the cycle that plays it starts, so the quantum adds to latency one for
/// one: 128 instead of 256 took 2 ms off normal mode's p50 (`scripts/bench`), for 375
/// host wake-ups a second instead of 188.
pub fn output_quantum(frame_samples: u32, rate: u32) -> u32 {
    let packet_us = u64::from(frame_samples) * 1_000_000 / u64::from(rate.max(1));
    let at_48k: u64 = if packet_us >= 10_000 { 128 } else { 64 };
    ((at_48k * u64::from(rate) / 48_000).max(16)) as u32
}

/// The automatic jitter-buffer target: one packet, one output quantum and the jitter
/// margin. The fill at the start of an output cycle swings by up to a packet (packets
/// land whole) and must never fall below the cycle plus the margin, the least drift
/// control trims it to; priming lower (as the first version did, without the margin)
/// left every low-latency stream an underrun in its first seconds. The playout raises
/// the target after an underrun.
pub fn auto_latency_frames(frame_samples: u32, rate: u32) -> usize {
    melange_shim::render::jitter_target_frames(frame_samples, output_quantum(frame_samples, rate), rate)
}

/// Settings of the host. [`HostConfig::default`] is melange-host's defaults.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Jitter-buffer target; `None` derives it from each stream's packet duration
    /// ([`auto_latency_frames`]).
    pub latency: Option<Duration>,
    /// Appends one JSON object per closed stream to this file.
    pub report: Option<PathBuf>,
    /// A stream without media for this long releases its output (the PipeWire stream
    /// or WAV file) until it plays again. The protocol stream stays open.
    pub idle_timeout: Duration,
    /// Prints one line of figures per stream every second on stdout (`--stats`).
    pub stats: bool,
    /// The source the guest's virtual microphone records from (`--mic`).
    pub mic: MicSpec,
    /// The camera the guest's virtual camera shows (`--camera`).
    pub camera: CameraSpec,
    /// How its frames go to the guest (`--camera-codec`).
    pub camera_codec: CameraCodec,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            latency: None,
            report: None,
            idle_timeout: Duration::from_secs(30),
            stats: false,
            mic: MicSpec::Default,
            camera: CameraSpec::Default,
            camera_codec: CameraCodec::Raw,
        }
    }
}

/// The microphone's capture, while the guest wants it (and [`MIC_HOLD`] after), and
/// whether the guest was told of its stream (once open).
struct MicOpen {
    capture: MicCapture,
    frame_samples: u32,
    announced: bool,
}

/// The guest's demand for the microphone, with hysteresis: a capture the guest no
/// longer wants is held open for [`MIC_HOLD`] (sending nothing) in case it wants it
/// again, and a capture that closed opens again [`MIC_REOPEN`] later at the soonest. A
/// guest toggling its demand as fast as it can opens the user's microphone once, not
/// fifty times a second; the microphone stays open at most [`MIC_HOLD`] after the last
/// app stopped recording.
struct Mic {
    open: Option<MicOpen>,
    wanted: bool,
    frame_us: u32,
    /// When a capture no longer wanted closes.
    release_at: Option<Instant>,
    /// No capture opens before this.
    next_open: Option<Instant>,
    /// The guest asked while `--mic none` (said once per session).
    said_none: bool,
}

/// The camera's capture while the guest wants it (and [`MIC_HOLD`] after).
struct CameraOpen {
    capture: CameraCapture,
    /// Whether the guest was told of the stream (at the first frame).
    announced: bool,
    since: Instant,
    seq: u32,
    /// Frames and bytes sent to the guest.
    sent: u64,
    bytes: u64,
    /// When the encoder was last asked for a keyframe.
    keyframe_asked: Option<Instant>,
    /// A frame was lost (dropped, or captured while not wanted): the next one sent
    /// must be a keyframe, or an encoded stream would show a broken picture.
    need_keyframe: bool,
    /// When the last frame came: a camera that stops giving frames counts as failed.
    last_frame: Instant,
    /// The stream id of this capture (a new one each, so that a new stream never
    /// meets the old one's close still queued behind its frames).
    stream: u32,
}

/// The guest's demand for the camera, with the microphone's hysteresis ([`MIC_HOLD`],
/// [`MIC_REOPEN`]).
struct Camera {
    /// `--camera` can be had here (not `none`, and GStreamer can capture).
    usable: bool,
    open: Option<CameraOpen>,
    wanted: bool,
    release_at: Option<Instant>,
    next_open: Option<Instant>,
    /// The guest asked for a camera it cannot have (said once per session).
    said_none: bool,
    /// Woken by each frame captured.
    waker: Option<Waker>,
    /// The guest refused the camera's stream: not offered again until it asks anew.
    refused: bool,
    /// How long after the next failure the camera is tried again (doubling).
    retry: Duration,
    /// The last camera stream id used.
    last_stream: u32,
}

/// How long a camera may take to give its first frame before the capture counts as
/// failed.
pub const CAMERA_FIRST_FRAME: Duration = Duration::from_secs(5);
/// How long after a failed capture the camera is tried again, while still wanted; it
/// doubles with each failure in a row, up to [`CAMERA_RETRY_MAX`].
pub const CAMERA_RETRY: Duration = Duration::from_secs(5);
/// The longest wait between two tries of a failing camera.
pub const CAMERA_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long an open camera may give no frame before it counts as gone.
pub const CAMERA_SILENCE: Duration = Duration::from_secs(3);
/// The id of the first camera stream the host sends; each capture takes the next.
pub const CAMERA_STREAM: u32 = 2;
/// How often the camera's encoder may be asked for a keyframe at most.
const KEYFRAME_ASK: Duration = Duration::from_millis(200);

/// How long a capture the guest no longer wants stays open, silent: short enough that
/// the host's microphone indicator goes off well within a second of the last app
/// stopping.
pub const MIC_HOLD: Duration = Duration::from_millis(500);
/// How long after an open or a close the microphone may open again: with
/// [`MIC_HOLD`], at most one open a second whatever the guest does.
pub const MIC_REOPEN: Duration = Duration::from_millis(500);
/// How often the session thread looks whether the microphone has opened.
const MIC_OPEN_POLL: Duration = Duration::from_millis(5);

/// The id of the microphone stream the host sends (host streams have ids of their own).
pub const MIC_STREAM: u32 = 1;
/// Packet durations the guest may ask of the microphone, in microseconds.
const MIC_FRAME_US: [u32; 4] = [2_500, 5_000, 10_000, 20_000];

/// Most bytes `--report` writes in a run: a guest opening and closing streams at the
/// control limit makes a line each (60 kB/s).
const MAX_REPORT_BYTES: u64 = 64 << 20;

/// How often `--stats` prints.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// One guest stream being rendered.
struct HostStream {
    desc: StreamDesc,
    receiver: Receiver,
    /// The output; `None` while the stream is idle (see [`HostConfig::idle_timeout`]).
    sink: Option<Box<dyn StreamSink>>,
    /// Where the output went (the last part), for the report.
    output: String,
    last_media: Instant,
    /// Figures of output parts already closed.
    closed: SinkTotals,
    /// Packets dropped because no output could be opened, and when to try again.
    dropped_packets: u64,
    reopen_at: Instant,
    /// Whether the log said that this stream runs ahead of real time.
    said_over_budget: bool,
    stats: StreamStats,
    scratch: Vec<f32>,
}

/// What a sink counted, summed over a stream's output parts.
#[derive(Debug, Clone, Copy, Default)]
struct SinkTotals {
    underruns: u64,
    overflows: u64,
    cuts: u64,
    cut_frames: u64,
    outages: u64,
}

impl SinkTotals {
    fn of(sink: &dyn StreamSink) -> Self {
        let (cuts, cut_frames) = sink.latency_cuts();
        Self { underruns: sink.underruns(), overflows: sink.overflows(), cuts, cut_frames, outages: sink.outages() }
    }

    fn plus(self, o: Self) -> Self {
        Self {
            underruns: self.underruns + o.underruns,
            overflows: self.overflows + o.overflows,
            cuts: self.cuts + o.cuts,
            cut_frames: self.cut_frames + o.cut_frames,
            outages: self.outages + o.outages,
        }
    }
}

impl HostStream {
    /// Says, once per stream, that it runs ahead of real time.
    fn say_over_budget(&mut self, now: Instant, stream: u32, log: &mut GuestLog) {
        if !std::mem::replace(&mut self.said_over_budget, true) {
            log.line(
                now,
                Level::Warn,
                format_args!(
                    "stream {stream} (\"{}\") delivers audio faster than real time; what is beyond it is dropped \
                     undecoded (counted as over_budget)",
                    self.desc.open.app.name
                ),
            );
        }
    }

    /// Totals over the closed parts and the open one.
    fn totals(&self) -> SinkTotals {
        self.sink.as_deref().map_or(self.closed, |k| self.closed.plus(SinkTotals::of(k)))
    }

    /// Closes the open output part, if any, adding its figures to the totals.
    fn release(&mut self) -> Result<(), crate::output::OutputError> {
        let Some(mut sink) = self.sink.take() else { return Ok(()) };
        let result = sink.close();
        self.closed = self.closed.plus(SinkTotals::of(sink.as_ref()));
        result
    }
}

/// An output that cannot be opened is tried again after this; packets meanwhile are
/// dropped and counted.
const REOPEN_RETRY: Duration = Duration::from_millis(500);

/// Reads from the port in one go at most, before timers and signals get a look: a
/// guest that floods the port cannot keep the loop from stopping.
const READ_BATCH: usize = 32;

/// The host's state across connections.
pub struct Host {
    config: HostConfig,
    output: Box<dyn Output>,
    /// Encoded streams (a player's video and audio) and where they go.
    encoded: EncodedStreams,
    /// What a session that closed still had to write (its refusal or goodbye).
    parting: Vec<u8>,
    session: Option<Session>,
    sessions: u64,
    streams: BTreeMap<u32, HostStream>,
    clock_id: String,
    /// An instant and `CLOCK_MONOTONIC` at the same moment, to turn one into the other.
    clock: (Instant, u64),
    same_clock: bool,
    log: GuestLog,
    /// The connect error last logged, so a retrying connect logs each problem once.
    last_connect_error: Option<String>,
    /// When `--stats` last printed.
    stats_at: Instant,
    mic: Mic,
    camera: Camera,
    /// The guest's output volume, applied to every stream (see [`Volume`]).
    volume: Volume,
    /// The starting bursts of the guest's streams, across sessions (see [`BurstPool`]).
    bursts: BurstPool,
    /// Bytes written to `--report` this run.
    report_bytes: u64,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("sessions", &self.sessions).field("streams", &self.streams.len()).finish()
    }
}

impl Host {
    /// A host rendering into `output`, made at `clock`: the same moment as an
    /// [`Instant`] and as `CLOCK_MONOTONIC` ns ([`clock::now_pair`]).
    pub fn new(config: HostConfig, output: Box<dyn Output>, clock: (Instant, u64)) -> Self {
        Self {
            config,
            output,
            encoded: EncodedStreams::new(Box::new(NullVideo), codec_bits::ENCODED),
            parting: Vec::new(),
            session: None,
            sessions: 0,
            streams: BTreeMap::new(),
            clock_id: clock::clock_id(),
            clock,
            same_clock: false,
            log: GuestLog::new(clock.0),
            last_connect_error: None,
            stats_at: clock.0,
            mic: Mic {
                open: None,
                wanted: false,
                frame_us: 10_000,
                release_at: None,
                next_open: None,
                said_none: false,
            },
            camera: Camera {
                usable: false,
                open: None,
                wanted: false,
                release_at: None,
                next_open: None,
                said_none: false,
                waker: None,
                refused: false,
                retry: CAMERA_RETRY,
                last_stream: CAMERA_STREAM - 1,
            },
            volume: Volume::unity(),
            bursts: BurstPool::new(clock.0),
            report_bytes: 0,
        }
    }

    /// Says whether `--camera` can be had (not `none`, and GStreamer can capture): only
    /// then does the handshake offer the guest a camera.
    pub fn set_camera_usable(&mut self, usable: bool) {
        self.camera.usable = usable && self.config.camera != CameraSpec::None;
    }

    /// Sends encoded streams (protocol v2) to `encoded` instead of discarding them.
    pub fn set_encoded(&mut self, encoded: EncodedStreams) {
        self.encoded = encoded;
    }

    /// `now` on `CLOCK_MONOTONIC`, in nanoseconds.
    fn mono_ns(&self, now: Instant) -> u64 {
        clock::instant_to_ns(now, self.clock)
    }

    /// Runs until `stop` is set (then wakes through `waker`) or the port ends for good.
    pub fn run(&mut self, port: &mut Port, waker: &Waker, stop: &AtomicBool) -> std::io::Result<()> {
        log::info!(
            "melange-host: waiting for a guest on {}; sound goes to {}",
            port.describe(),
            self.output.describe()
        );
        let mut buf = vec![0u8; 64 * 1024];
        self.encoded.set_waker(waker.try_clone()?);
        self.camera.waker = Some(waker.try_clone()?);
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mic_due = self.pump_mic(now);
            let camera_due = self.pump_camera(now);
            self.flush(port);
            let mut wake =
                self.session.as_ref().and_then(Session::poll_timeout).unwrap_or(now + Duration::from_secs(1));
            for at in [mic_due, camera_due].into_iter().flatten() {
                wake = wake.min(at);
            }
            let want_write = self.session.as_ref().is_some_and(|s| !s.pending_output().is_empty());
            match port.wait(want_write, Some(wake.saturating_duration_since(now)), Some(waker))? {
                PortEvent::Connected => {
                    log::info!("melange-host: connected on {}; waiting for the guest's hello", port.describe());
                    self.start_session(Instant::now());
                }
                PortEvent::Disconnected(reason) => {
                    self.end_session(Instant::now(), &format!("guest disconnected ({reason})"))
                }
                PortEvent::Readable => self.read(port, &mut buf, stop)?,
                PortEvent::Woken | PortEvent::Writable | PortEvent::Timeout => {}
            }
            if !self.tick(Instant::now()) {
                self.hang_up(port);
            }
            let connect_error = port.last_error().map(str::to_owned);
            if connect_error.is_some() && connect_error != self.last_connect_error {
                log::warn!("melange-host: still trying: {}", connect_error.as_deref().unwrap_or_default());
            }
            self.last_connect_error = connect_error;
            if port.is_finished() {
                log::info!("melange-host: {} ended", port.describe());
                break;
            }
        }
        self.shutdown(port);
        Ok(())
    }

    /// Ends the connection after writing what the closed session still had to say
    /// (best effort: the port may take no more).
    fn hang_up(&mut self, port: &mut Port) {
        let parting = std::mem::take(&mut self.parting);
        let mut at = 0;
        while at < parting.len() {
            match port.write(&parting[at..]) {
                Ok(n) if n > 0 => at += n,
                _ => break,
            }
        }
        port.disconnect();
    }

    /// Reads what the port has, at most [`READ_BATCH`] reads, and handles it.
    ///
    /// A session whose peer went silent too long ends before its bytes are read: after
    /// a stall (this process stopped, the machine suspended) they are stale, and the
    /// guest has moved on to a new session. That is checked before every read: the
    /// process may have been stopped between two reads, or between a read and its
    /// handling.
    fn read(&mut self, port: &mut Port, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<()> {
        for _ in 0..READ_BATCH {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if !self.tick(Instant::now()) {
                self.hang_up(port);
                return Ok(());
            }
            match port.read(buf)? {
                Some(0) => {
                    self.end_session(Instant::now(), "guest disconnected (end of stream)");
                    return Ok(());
                }
                Some(n) => {
                    if !self.receive(Instant::now(), &buf[..n]) {
                        self.hang_up(port);
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    fn start_session(&mut self, now: Instant) {
        self.close_all(now, "new connection");
        self.sessions += 1;
        // The guest says its volume at the start of each session.
        self.volume = Volume::unity();
        let mut cfg = SessionConfig::new(
            Role::Host,
            format!("melange-host {}", env!("CARGO_PKG_VERSION")),
            Capabilities {
                codecs: codec_bits::PCM_S16LE | codec_bits::OPUS | self.encoded.codecs(),
                max_streams: MAX_STREAMS,
                kinds: kind_bits::AUDIO | self.encoded.kinds() | if self.camera.usable { kind_bits::CAMERA } else { 0 },
            },
        );
        cfg.clock_id = self.clock_id.clone();
        cfg.origin_ns = self.mono_ns(now);
        self.session = Some(Session::new(cfg, now));
    }

    fn end_session(&mut self, now: Instant, why: &str) {
        if self.session.take().is_some() {
            self.log.line(now, Level::Info, format_args!("{why}"));
        }
        self.close_all(now, "guest disconnected");
    }

    fn shutdown(&mut self, port: &mut Port) {
        let now = Instant::now();
        self.close_all(now, "host shutting down");
        if let Some(s) = &mut self.session {
            s.close(melange_transport::session::CloseReason::Local("host shutting down".into()));
        }
        self.flush(port);
        self.session = None;
        self.encoded.finish();
    }

    fn flush(&mut self, port: &mut Port) {
        let Some(s) = &mut self.session else { return };
        while !s.pending_output().is_empty() {
            match port.write(s.pending_output()) {
                Ok(0) => return,
                Ok(n) => s.consume_output(n),
                Err(_) => return, // the read side reports the disconnect
            }
        }
    }

    /// Handles bytes from the guest on the current connection (starting a session if
    /// there is none). Returns false when the session has closed and the connection
    /// should be dropped. The sans-IO entry point: [`Host::run`] and the fuzzers use it.
    pub fn receive(&mut self, now: Instant, bytes: &[u8]) -> bool {
        if self.session.is_none() {
            self.start_session(now);
        }
        if let Some(s) = &mut self.session {
            s.handle_input(now, bytes);
        }
        self.handle_events(now)
    }

    /// Runs timers: session heartbeats and timeouts, idle streams releasing their
    /// outputs, the microphone's hysteresis, `--stats`, the log's summary. Returns
    /// false when the session has closed. Sans-IO, like [`Host::receive`].
    pub fn tick(&mut self, now: Instant) -> bool {
        if self.config.stats && now.saturating_duration_since(self.stats_at) >= STATS_INTERVAL {
            let elapsed = now.saturating_duration_since(self.stats_at).as_secs_f64();
            self.stats_at = now;
            self.print_stats(elapsed);
        }
        if let Some(s) = &mut self.session {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
        if let Some(volume) = self.output.take_user_volume().filter(|v| !v.same_as(&self.volume)) {
            log::info!("melange-host: volume set on the host: {}; the guest follows", volume);
            if let Some(s) = &mut self.session {
                let _ = s.send_volume(&volume);
            }
            self.apply_volume(volume);
        }
        let pumped = self.encoded.pump(now, self.mono_ns(now));
        for line in pumped.lines {
            self.log.line(now, Level::Warn, format_args!("{line}"));
        }
        if let Some(s) = &mut self.session {
            for (stream, render_ns) in pumped.latencies {
                s.report_latency(stream, render_ns);
            }
        }
        let idle = self.config.idle_timeout;
        let mut released = Vec::new();
        for (id, s) in &mut self.streams {
            if s.sink.is_some() && now.saturating_duration_since(s.last_media) >= idle {
                let _ = s.release();
                released.push(*id);
            }
        }
        for id in released {
            self.log.line(
                now,
                Level::Info,
                format_args!("stream {id} idle for {idle:?}: output released until it plays again"),
            );
        }
        self.log.tick(now);
        self.handle_events(now)
    }

    /// Bytes the host wants to send to the guest (for callers of [`Host::receive`]).
    pub fn take_output(&mut self) -> Vec<u8> {
        let Some(s) = &mut self.session else { return Vec::new() };
        let out = s.pending_output().to_vec();
        s.consume_output(out.len());
        out
    }

    /// Processes session events; false once the session has closed. The media of each
    /// stream that arrived together (up to the next control event) are received
    /// together ([`Host::on_media`]), however the streams' packets interleave.
    fn handle_events(&mut self, now: Instant) -> bool {
        let mut bursts: BTreeMap<u32, Vec<MediaPacket>> = BTreeMap::new();
        while let Some(event) = self.session.as_mut().and_then(Session::poll_event) {
            if let Event::Media { stream, packet } = event {
                bursts.entry(stream).or_default().push(packet);
                continue;
            }
            self.on_bursts(now, &mut bursts);
            match event {
                Event::Established(peer) => {
                    self.same_clock = !peer.clock_id.is_empty() && peer.clock_id == self.clock_id;
                    self.log.line(
                        now,
                        Level::Info,
                        format_args!(
                            "guest connected: {} (protocol v{}, session {:#x}{})",
                            peer.software,
                            peer.version,
                            peer.epoch,
                            if self.same_clock { ", same clock as the host" } else { "" }
                        ),
                    );
                }
                Event::StreamOpened { stream, open } if open.media.is_encoded() => {
                    self.open_encoded(now, stream, &open)
                }
                Event::StreamOpened { stream, open } => self.open_stream(now, stream, open),
                Event::StreamClosed { stream, reason } if self.encoded.contains(stream) => {
                    if let Some(line) = self.encoded.close(stream, &reason) {
                        self.log.line(now, Level::Info, format_args!("{line}"));
                    }
                }
                Event::StreamClosed { stream, reason } => self.close_stream(now, stream, &reason),
                Event::AccessUnit { stream, au } => {
                    let reply = self.encoded.access_unit(now, self.mono_ns(now), stream, &au);
                    self.reply_encoded(stream, reply);
                }
                // A keyframe request is for a stream the host sends: the camera's.
                Event::StreamControl { stream, control: StreamControl::KeyframeRequest } => {
                    if let Some(open) = self.camera.open.as_mut().filter(|o| o.stream == stream) {
                        // At most every KEYFRAME_ASK, however often the guest asks.
                        if open.keyframe_asked.is_none_or(|at| now.saturating_duration_since(at) >= KEYFRAME_ASK) {
                            open.keyframe_asked = Some(now);
                            open.capture.request_keyframe();
                        }
                    }
                }
                Event::StreamControl { stream, control } => self.encoded.control(stream, control),
                Event::Media { .. } => {}
                Event::CaptureDemand(demand) => self.on_capture_demand(now, demand),
                Event::Volume(volume) => {
                    self.log.line(now, Level::Info, format_args!("the guest's volume is now {volume}"));
                    self.apply_volume(volume);
                }
                Event::PeerRestarted => {
                    self.log.line(now, Level::Info, format_args!("the guest side restarted; starting a new session"));
                    self.close_all(now, "guest restarted");
                }
                Event::StreamRejected { stream, reason }
                    if self.camera.open.as_ref().is_some_and(|o| o.stream == stream) =>
                {
                    // Final until the guest asks anew: no camera light blinking every
                    // few seconds for a guest that cannot take it.
                    self.camera.refused = true;
                    let why = format!("the guest refused the camera: {reason}");
                    self.fail_camera(now, &why);
                }
                Event::StreamRejected { stream, reason } => {
                    self.log.line(now, Level::Warn, format_args!("guest refused stream {stream}: {reason}"));
                }
                // Reports about streams the host sends; it sends none in this version.
                Event::StreamLatency { .. } => {}
                Event::Error(e) => {
                    if let SessionError::BadAccessUnit { stream, .. } = &e {
                        let reply = self.encoded.lost(now, *stream);
                        self.reply_encoded(*stream, reply);
                    }
                    self.log.bad_input(now, e.kind(), format_args!("skipped bad input from the guest: {e}"));
                }
                Event::Closed(reason) => {
                    self.log.line(now, Level::Warn, format_args!("session closed: {reason}"));
                    // Its last words (a refusal, a goodbye) still go out before the hang-up.
                    if let Some(s) = self.session.take() {
                        self.parting = s.pending_output().to_vec();
                    }
                    self.close_all(now, "session closed");
                    return false;
                }
            }
        }
        self.on_bursts(now, &mut bursts);
        true
    }

    fn on_bursts(&mut self, now: Instant, bursts: &mut BTreeMap<u32, Vec<MediaPacket>>) {
        for (stream, burst) in std::mem::take(bursts) {
            self.on_media(now, stream, &burst);
        }
    }

    /// Opens a player's encoded stream, or refuses it with the reason.
    fn open_encoded(&mut self, now: Instant, stream: u32, open: &StreamOpen) {
        let latency = self.config.latency;
        let latency_frames = move |frame_samples: u32, rate: u32| match latency {
            Some(l) => ((u128::from(rate) * l.as_micros() / 1_000_000) as usize, false),
            None => (auto_latency_frames(frame_samples, rate), true),
        };
        let audio = AudioOut {
            output: self.output.as_mut(),
            session: self.sessions,
            latency_frames: &latency_frames,
            quantum: &output_quantum,
            volume: &self.volume,
        };
        match self.encoded.open(now, stream, open, audio) {
            Ok(to) => {
                self.log.line(
                    now,
                    Level::Info,
                    format_args!(
                        "stream {stream} opened: \"{}\", {} {} ({} bytes of codec data) -> {to}",
                        open.app.name,
                        open.media.name(),
                        open.codec.name(),
                        open.codec_data.len()
                    ),
                );
            }
            Err(e) => {
                self.log.line(now, Level::Warn, format_args!("refusing stream {stream} (\"{}\"): {e}", open.app.name));
                if let Some(s) = &mut self.session {
                    s.reject_stream(stream, &e);
                }
            }
        }
    }

    /// Tells the guest what the encoded streams need.
    fn reply_encoded(&mut self, stream: u32, reply: Option<Reply>) {
        let Some(s) = &mut self.session else { return };
        match reply {
            Some(Reply::KeyframeRequest) => {
                let _ = s.send_stream_control(stream, StreamControl::KeyframeRequest);
            }
            Some(Reply::Reject(reason)) => s.reject_stream(stream, &reason),
            None => {}
        }
    }

    fn open_stream(&mut self, now: Instant, stream: u32, open: StreamOpen) {
        // Guest strings arrive sanitized (the session does it for every peer string).
        let MediaKind::Audio(format) = open.media.clone() else { return };
        let result = Receiver::new(&format, &open.codec, open.frame_samples, now, &mut self.bursts)
            .map_err(|e| e.to_string())
            .and_then(|receiver| {
                let desc = StreamDesc {
                    stream,
                    session: self.sessions,
                    from_s16: matches!(open.codec, Codec::PcmS16Le),
                    latency_frames: match self.config.latency {
                        Some(l) => (u128::from(format.rate) * l.as_micros() / 1_000_000) as usize,
                        None => auto_latency_frames(open.frame_samples, format.rate),
                    },
                    latency_auto: self.config.latency.is_none(),
                    quantum: output_quantum(open.frame_samples, format.rate),
                    part: 1,
                    format: format.clone(),
                    open: open.clone(),
                };
                let mut sink = self.output.open(&desc).map_err(|e| e.to_string())?;
                sink.set_volume(&self.volume);
                Ok((desc, receiver, sink))
            });
        match result {
            Ok((desc, receiver, sink)) => {
                let output = sink.describe();
                self.log.line(
                    now,
                    Level::Info,
                    format_args!(
                        "stream {stream} opened: \"{}\" (role {}, binary {}), {} {} Hz {} ch, {} ms packets -> {}",
                        open.app.name,
                        if open.app.role.is_empty() { "none" } else { &open.app.role },
                        if open.app.binary.is_empty() { "unknown" } else { &open.app.binary },
                        open.codec.name(),
                        format.rate,
                        format.channels,
                        f64::from(open.frame_samples) * 1000.0 / f64::from(format.rate),
                        output
                    ),
                );
                self.streams.insert(
                    stream,
                    HostStream {
                        desc,
                        receiver,
                        sink: Some(sink),
                        output,
                        last_media: now,
                        closed: SinkTotals::default(),
                        dropped_packets: 0,
                        reopen_at: now,
                        said_over_budget: false,
                        stats: StreamStats::new(now),
                        scratch: Vec::with_capacity(open.frame_samples as usize * usize::from(format.channels)),
                    },
                );
            }
            Err(e) => {
                self.log.line(now, Level::Warn, format_args!("refusing stream {stream} (\"{}\"): {e}", open.app.name));
                if let Some(s) = &mut self.session {
                    s.reject_stream(stream, &e);
                }
            }
        }
    }

    /// Plays packets of `stream` that arrived together at `now`: of those beyond the
    /// stream's real-time budget the oldest are dropped undecoded, the rest played in
    /// order.
    fn on_media(&mut self, now: Instant, stream: u32, burst: &[MediaPacket]) {
        let over = self.streams.get_mut(&stream).map_or(0, |s| s.receiver.over_budget_prefix(now, burst));
        for (i, packet) in burst.iter().enumerate() {
            self.on_packet(now, stream, packet, i < over);
        }
    }

    /// Plays one packet, or drops it as `over_budget`.
    fn on_packet(&mut self, now: Instant, stream: u32, packet: &MediaPacket, over_budget: bool) {
        let now_ns = self.mono_ns(now);
        let Some(s) = self.streams.get_mut(&stream) else { return };
        s.last_media = now;
        s.stats.wire_bytes += (HEADER_LEN + MEDIA_HEADER_LEN + packet.data.len()) as u64;
        if over_budget {
            s.receiver.drop_over_budget(packet);
            s.say_over_budget(now, stream, &mut self.log);
            return;
        }
        if let Some(Err(e)) = s.sink.as_mut().map(|k| k.poll_open(now)) {
            // As a failed reopen: tried again after REOPEN_RETRY, packets meanwhile
            // dropped and counted.
            let _ = s.release();
            self.log.bad_input(now, "output", format_args!("stream {stream}: cannot open the output: {e}"));
            s.reopen_at = now + REOPEN_RETRY;
        }
        if s.sink.as_ref().is_some_and(|k| k.is_lost()) {
            let _ = s.release();
            self.log.line(
                now,
                Level::Warn,
                format_args!("stream {stream}: its output went away (the host's PipeWire?); opening it again"),
            );
        }
        if s.sink.is_none() {
            if now < s.reopen_at {
                s.dropped_packets += 1;
                return;
            }
            s.desc.part += 1;
            match self.output.open(&s.desc) {
                Ok(mut sink) => {
                    sink.set_volume(&self.volume);
                    s.output = sink.describe();
                    self.log.line(now, Level::Info, format_args!("stream {stream} plays again -> {}", s.output));
                    s.sink = Some(sink);
                }
                Err(e) => {
                    self.log.bad_input(now, "output", format_args!("stream {stream}: cannot reopen the output: {e}"));
                    s.reopen_at = now + REOPEN_RETRY;
                    s.dropped_packets += 1;
                    return;
                }
            }
        }
        s.scratch.clear();
        match s.receiver.receive(now, packet, &mut s.scratch) {
            Ok(()) | Err(Dropped::Late) => {}
            Err(Dropped::OverBudget) => {
                s.say_over_budget(now, stream, &mut self.log);
                return;
            }
            Err(e @ (Dropped::Bad(_) | Dropped::BadDuration(_))) => {
                self.log.bad_input(now, "bad packet", format_args!("stream {stream}: {e}"));
            }
        }
        if s.scratch.is_empty() {
            return;
        }
        let rate = f64::from(s.desc.format.rate);
        // What this packet's first sample meets: everything buffered ahead of it.
        let render_ns = s.sink.as_ref().map_or(0, |k| k.render_delay_ns(now_ns));
        if let Some(sink) = &mut s.sink {
            sink.write(&s.scratch);
        }
        let fill_ms = s.sink.as_ref().map_or(0, |k| k.buffered_frames()) as f64 * 1000.0 / rate;
        if let Some(render) = s.stats.packet(now, fill_ms, render_ns) {
            if let Some(session) = &mut self.session {
                session.report_latency(stream, render);
            }
        }
        if self.same_clock {
            // pts is when the first sample would have played in the guest; a packet cut
            // from late in a large graph cycle arrives before that, so this can be < 0.
            let transit_ms = (i128::from(now_ns) - i128::from(packet.pts_ns)) as f64 / 1e6;
            s.stats.latency(transit_ms + render_ns as f64 / 1e6);
        }
    }

    fn close_stream(&mut self, now: Instant, stream: u32, reason: &str) {
        let Some(mut s) = self.streams.remove(&stream) else { return };
        let drift_ppm = s.sink.as_ref().and_then(|k| k.drift_ppm());
        let clock_ppm = s.sink.as_ref().and_then(|k| k.clock_ppm());
        if let Err(e) = s.release() {
            self.log.line(now, Level::Warn, format_args!("stream {stream}: {e}"));
        }
        let totals = s.closed;
        let counts = *s.receiver.counts();
        let rate = f64::from(s.desc.format.rate);
        let seconds = now.saturating_duration_since(s.stats.opened).as_secs_f64();
        let media_seconds = counts.frames() as f64 / rate;
        let (p50, p99) = (s.stats.latency.percentile(0.5), s.stats.latency.percentile(0.99));
        let wire_rate = if media_seconds > 0.0 { s.stats.wire_bytes as f64 / media_seconds } else { 0.0 };
        let fmt_ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1} ms"));
        self.log.line(
            now,
            Level::Info,
            format_args!(
                "stream {stream} closed ({reason}): \"{}\", {media_seconds:.2} s of audio, {} packets, {:.1} kB/s on \
                 the wire, latency p50 {} p99 {}, {} lost, {} bad, {} beyond real time, {} underruns, {:.0} ms of \
                 backlog cut",
                s.desc.open.app.name,
                counts.packets,
                wire_rate / 1000.0,
                fmt_ms(p50),
                fmt_ms(p99),
                counts.lost,
                counts.bad,
                counts.over_budget,
                totals.underruns,
                totals.cut_frames as f64 * 1000.0 / rate,
            ),
        );
        if let Some(path) = &self.config.report {
            let line = serde_json::json!({
                "session": s.desc.session,
                "stream": stream,
                "app": s.desc.open.app.name,
                "codec": s.desc.open.codec.name(),
                "rate": s.desc.format.rate,
                "channels": s.desc.format.channels,
                "output": s.output,
                "seconds": seconds,
                "media_seconds": media_seconds,
                "packets": counts.packets,
                "wire_bytes": s.stats.wire_bytes,
                "wire_bytes_per_s": wire_rate,
                "latency_ms_p50": p50,
                "latency_ms_p99": p99,
                "lost_packets": counts.lost,
                "late_packets": counts.late,
                "bad_packets": counts.bad,
                "over_budget_packets": counts.over_budget,
                "over_budget_ms": counts.over_budget_frames as f64 * 1000.0 / rate,
                "concealed_ms": counts.concealed_frames as f64 * 1000.0 / rate,
                "underruns": totals.underruns,
                "latency_cuts": totals.cuts,
                "outages": totals.outages,
                "cut_ms": totals.cut_frames as f64 * 1000.0 / rate,
                "drift_ppm": drift_ppm,
                "output_clock_ppm": clock_ppm,
                "fill_ms_second_2": s.stats.fill_second_2,
                "fill_ms_second_10": s.stats.fill_second_10,
                "fill_ms_last_second": s.stats.fill_last,
                "render_ms_last": s.stats.render_last.map(|ns| ns as f64 / 1e6),
                "overflow_samples": totals.overflows,
                "dropped_packets": s.dropped_packets,
            });
            let line = line.to_string();
            if self.report_bytes + line.len() as u64 > MAX_REPORT_BYTES {
                if self.report_bytes <= MAX_REPORT_BYTES {
                    log::warn!(
                        "melange-host: the report {} reached {MAX_REPORT_BYTES} bytes this run; no more lines",
                        path.display()
                    );
                    self.report_bytes = MAX_REPORT_BYTES + 1;
                }
                return;
            }
            self.report_bytes += line.len() as u64 + 1;
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = written {
                self.log.bad_input(now, "report", format_args!("cannot write the report {}: {e}", path.display()));
            }
        }
    }

    /// One `--stats` line per stream on stdout: `key=value` pairs, for people and
    /// scripts. `latency_ms` (guest graph to output, median of the last second) only
    /// where both ends share a clock; `render_ms` is what the host adds.
    fn print_stats(&mut self, elapsed_s: f64) {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        for (id, s) in &mut self.streams {
            let (kbps, latency) = s.stats.take_interval(elapsed_s);
            let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
            let rate = f64::from(s.desc.format.rate);
            let (fill, target, drift) = match &s.sink {
                Some(k) => (
                    Some(k.buffered_frames() as f64 * 1000.0 / rate),
                    k.target_frames().map(|f| f as f64 * 1000.0 / rate),
                    k.drift_ppm(),
                ),
                None => (None, None, None),
            };
            let totals = s.totals();
            let counts = s.receiver.counts();
            let _ = writeln!(
                out,
                "stats session={} stream={id} app={:?} codec={} kbps={kbps:.1} latency_ms={} render_ms={} \
                 fill_ms={} target_ms={} drift_ppm={} lost={} dropped={} bad={} over_budget={} cuts={} cut_ms={:.0} \
                 outages={} underruns={}",
                s.desc.session,
                s.desc.open.app.name,
                s.desc.open.codec.name(),
                ms(latency.map(f64::from)),
                ms(s.stats.render_last.map(|ns| ns as f64 / 1e6)),
                ms(fill),
                ms(target),
                drift.map_or("n/a".to_string(), |d| format!("{d:.0}")),
                counts.lost,
                s.dropped_packets,
                counts.bad,
                counts.over_budget,
                totals.cuts,
                totals.cut_frames as f64 * 1000.0 / rate,
                totals.outages,
                totals.underruns,
            );
        }
        let _ = out.flush();
    }

    fn close_all(&mut self, now: Instant, reason: &str) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.close_stream(now, id, reason);
        }
        for line in self.encoded.close_all(reason) {
            self.log.line(now, Level::Info, format_args!("{line}"));
        }
        self.close_mic(now, reason);
        self.mic.wanted = false;
        self.mic.release_at = None;
        self.mic.said_none = false;
        self.close_camera(now, reason);
        self.camera.wanted = false;
        self.camera.release_at = None;
        self.camera.said_none = false;
        self.camera.refused = false;
        self.camera.retry = CAMERA_RETRY;
        self.camera.next_open = None;
    }

    /// Puts the guest's volume on every stream's output.
    fn apply_volume(&mut self, volume: Volume) {
        for sink in self.streams.values_mut().filter_map(|s| s.sink.as_mut()) {
            sink.set_volume(&volume);
        }
        self.encoded.set_volume(&volume);
        self.volume = volume;
    }

    fn on_capture_demand(&mut self, now: Instant, demand: CaptureDemand) {
        match demand.device {
            CaptureDevice::Microphone if demand.active => {
                self.mic.wanted = true;
                self.mic.release_at = None;
                if MIC_FRAME_US.contains(&demand.frame_us) {
                    self.mic.frame_us = demand.frame_us;
                }
            }
            CaptureDevice::Microphone => {
                self.mic.wanted = false;
                if self.mic.open.is_some() && self.mic.release_at.is_none() {
                    self.mic.release_at = Some(now + MIC_HOLD);
                }
            }
            CaptureDevice::Camera if demand.active => {
                if !self.camera.wanted {
                    // Asked anew: a refusal or a run of failures is forgotten.
                    self.camera.refused = false;
                    self.camera.retry = CAMERA_RETRY;
                }
                self.camera.wanted = true;
                self.camera.release_at = None;
                self.pump_camera(now);
                return;
            }
            CaptureDevice::Camera => {
                self.camera.wanted = false;
                if self.camera.open.is_some() && self.camera.release_at.is_none() {
                    self.camera.release_at = Some(now + MIC_HOLD);
                }
                return;
            }
        }
        self.pump_mic(now);
    }

    /// Starts capturing the camera for the guest; [`Host::pump_camera`] announces its
    /// stream with the first frame. On failure the guest's camera stays dark and says
    /// why, and so does the log.
    fn open_camera(&mut self, now: Instant) {
        let codec = self.config.camera_codec.codec();
        let takes = self
            .session
            .as_ref()
            .and_then(Session::peer)
            .is_some_and(|p| p.capabilities.accepts(&MediaKind::Camera(crate::camera::CAMERA_VIDEO), &codec));
        if !self.camera.usable || !takes || self.camera.refused {
            if !std::mem::replace(&mut self.camera.said_none, true) {
                let why = if !self.camera.usable {
                    "melange-host has none to give (--camera none)".to_owned()
                } else if self.camera.refused {
                    "the guest refused it; not opened again until asked anew".to_owned()
                } else {
                    format!("the guest takes no camera as {}", codec.name())
                };
                self.log.line(now, Level::Info, format_args!("a guest app captures from its camera; {why}"));
            }
            return;
        }
        self.camera.next_open = Some(now + MIC_REOPEN);
        let Some(waker) = self.camera.waker.as_ref().and_then(|w| w.try_clone().ok()) else { return };
        match CameraCapture::open(&self.config.camera, self.config.camera_codec, waker) {
            Ok(capture) => {
                self.log.line(now, Level::Info, format_args!("opening {} for the guest", self.config.camera));
                // Never 0 (reserved) nor 1 (the microphone's).
                let stream = self.camera.last_stream.checked_add(1).unwrap_or(CAMERA_STREAM).max(CAMERA_STREAM);
                self.camera.last_stream = stream;
                self.camera.open = Some(CameraOpen {
                    capture,
                    announced: false,
                    since: now,
                    seq: 0,
                    sent: 0,
                    bytes: 0,
                    keyframe_asked: None,
                    need_keyframe: true,
                    last_frame: now,
                    stream,
                });
            }
            Err(e) => self.fail_camera(now, &e),
        }
    }

    /// The capture failed: the guest is told why (a camera stream that ends at once),
    /// and the camera is tried again later if still wanted, each time later.
    fn fail_camera(&mut self, now: Instant, why: &str) {
        let open = self.camera.open.take();
        let retry = self.camera.retry;
        self.camera.next_open = Some(now + retry);
        self.camera.retry = (retry * 2).min(CAMERA_RETRY_MAX);
        let again =
            if self.camera.refused { String::new() } else { format!("; trying again in {} s", retry.as_secs()) };
        self.log.line(
            now,
            Level::Warn,
            format_args!("cannot capture {} for the guest: {why}{again}", self.config.camera),
        );
        let stream = open.as_ref().map_or(self.camera.last_stream.max(CAMERA_STREAM), |o| o.stream);
        let announced = open.as_ref().is_some_and(|o| o.announced);
        if let Some(s) = self.session.as_mut().filter(|s| s.is_established()) {
            if announced || s.open_stream(stream, &crate::camera::stream_open(self.config.camera_codec)).is_ok() {
                s.close_stream(stream, why);
            }
        }
    }

    fn close_camera(&mut self, now: Instant, why: &str) {
        self.camera.release_at = None;
        let Some(open) = self.camera.open.take() else { return };
        self.camera.next_open = Some(now + MIC_REOPEN);
        if open.announced {
            if let Some(s) = &mut self.session {
                s.close_stream(open.stream, why);
            }
        }
        let secs = now.saturating_duration_since(open.since).as_secs_f64();
        self.log.line(
            now,
            Level::Info,
            format_args!(
                "camera closed ({why}): {} frames, {} bytes to the guest in {secs:.1} s",
                open.sent, open.bytes
            ),
        );
    }

    /// Sends the guest the frames captured, closes the camera once it is no longer
    /// wanted, opens it when it is; returns when to look again.
    fn pump_camera(&mut self, now: Instant) -> Option<Instant> {
        if self.camera.release_at.is_some_and(|at| at <= now) {
            self.close_camera(now, "no guest app captures any more");
        }
        let established = self.session.as_ref().is_some_and(Session::is_established);
        if self.camera.wanted && self.camera.open.is_none() && established {
            match self.camera.next_open {
                Some(at) if at > now => return Some(at),
                _ => self.open_camera(now),
            }
        }
        let release = self.camera.release_at;
        let (Some(open), Some(s)) = (&mut self.camera.open, &mut self.session) else { return release };
        let (frames, lost) = match open.capture.poll() {
            Ok(polled) => polled,
            Err(why) => {
                self.fail_camera(now, &why);
                return release;
            }
        };
        if lost {
            open.need_keyframe = true;
        }
        if !frames.is_empty() {
            open.last_frame = now;
        }
        if !open.announced && !frames.is_empty() && self.camera.wanted {
            if let Err(e) = s.open_stream(open.stream, &crate::camera::stream_open(self.config.camera_codec)) {
                let why = format!("cannot announce the camera to the guest: {e}");
                self.fail_camera(now, &why);
                return release;
            }
            open.announced = true;
            self.camera.retry = CAMERA_RETRY;
            let v = crate::camera::CAMERA_VIDEO;
            let ms = now.saturating_duration_since(open.since).as_millis();
            self.log.line(
                now,
                Level::Info,
                format_args!(
                    "camera opened for the guest: {}, {}x{} {} at up to {} fps, first frame after {ms} ms",
                    self.config.camera, v.width, v.height, self.config.camera_codec, v.framerate_num
                ),
            );
        }
        let sending = open.announced && self.camera.wanted;
        let mut ask = false;
        for frame in frames {
            if !sending || (open.need_keyframe && !frame.keyframe) {
                // Not sent: an encoded stream goes on from a keyframe only.
                open.need_keyframe = true;
                ask = true;
                continue;
            }
            let au = AccessUnit {
                seq: open.seq,
                flags: if frame.keyframe { au_flags::KEYFRAME } else { 0 },
                pts_ns: frame.at_ns,
                dts_ns: frame.at_ns,
                duration_ns: 1_000_000_000 / u64::from(crate::camera::CAMERA_VIDEO.framerate_num),
                data: frame.data,
            };
            open.seq = open.seq.wrapping_add(1);
            // Dropped by the session, oldest first, if the port falls behind; the
            // stream then waits for a keyframe, which the encoder is asked for.
            if s.send_access_unit(open.stream, &au).unwrap_or(false) {
                open.sent += 1;
                open.bytes += au.data.len() as u64;
                open.need_keyframe = false;
            } else {
                open.need_keyframe = true;
                ask = true;
            }
        }
        if (ask || lost)
            && sending
            && open.keyframe_asked.is_none_or(|at| now.saturating_duration_since(at) >= KEYFRAME_ASK)
        {
            open.keyframe_asked = Some(now);
            open.capture.request_keyframe();
        }
        if !open.announced && now.saturating_duration_since(open.since) >= CAMERA_FIRST_FRAME {
            let why = format!(
                "no frame within {} s (is the camera there, and not held by another app?)",
                CAMERA_FIRST_FRAME.as_secs()
            );
            self.fail_camera(now, &why);
            return release;
        }
        if open.announced && now.saturating_duration_since(open.last_frame) >= CAMERA_SILENCE {
            let why = format!("no frame for {} s (was the camera unplugged?)", CAMERA_SILENCE.as_secs());
            self.fail_camera(now, &why);
            return release;
        }
        let deadline = if open.announced { open.last_frame + CAMERA_SILENCE } else { open.since + CAMERA_FIRST_FRAME };
        [release, Some(deadline)].into_iter().flatten().min()
    }

    /// Starts opening the microphone for the guest; [`Host::pump_mic`] announces its
    /// stream once PipeWire has opened it. On failure the guest's virtual microphone
    /// stays silent, and the log says why.
    fn open_mic(&mut self, now: Instant) {
        if self.config.mic == MicSpec::None {
            if !std::mem::replace(&mut self.mic.said_none, true) {
                self.log.line(
                    now,
                    Level::Info,
                    format_args!("a guest app records from its microphone; with --mic none it hears silence"),
                );
            }
            return;
        }
        let frame_samples = MIC_RATE / 1000 * self.mic.frame_us / 1000;
        // Whatever happens, not again before MIC_REOPEN: a microphone that fails to
        // open is not tried fifty times a second either.
        self.mic.next_open = Some(now + MIC_REOPEN);
        match MicCapture::open(&self.config.mic, frame_samples) {
            Ok(capture) => self.mic.open = Some(MicOpen { capture, frame_samples, announced: false }),
            Err(e) => {
                self.log.line(
                    now,
                    Level::Warn,
                    format_args!("cannot open the microphone for the guest ({e}); it hears silence"),
                );
            }
        }
    }

    /// Announces the microphone's stream to the guest once its capture is open; false
    /// (and the microphone dropped) if it cannot be had.
    fn announce_mic(&mut self, now: Instant) -> bool {
        let (Some(mic), Some(s)) = (&mut self.mic.open, &mut self.session) else { return false };
        let result = match mic.capture.poll_open() {
            Ok(false) => return false,
            Ok(true) => s
                .open_stream(MIC_STREAM, &crate::mic::stream_open(mic.frame_samples))
                .map_err(|e| format!("cannot announce the microphone to the guest: {e}")),
            Err(e) => Err(format!("cannot open the microphone for the guest ({e}); it hears silence")),
        };
        match result {
            Ok(()) => {
                mic.announced = true;
                let packet_ms = f64::from(mic.frame_samples) * 1000.0 / f64::from(MIC_RATE);
                self.log.line(
                    now,
                    Level::Info,
                    format_args!(
                        "microphone opened for the guest: {}, Opus {} kbit/s mono, {packet_ms} ms packets",
                        self.config.mic,
                        crate::mic::MIC_BITRATE / 1000,
                    ),
                );
                true
            }
            Err(e) => {
                self.log.line(now, Level::Warn, format_args!("{e}"));
                self.mic.open = None;
                false
            }
        }
    }

    fn close_mic(&mut self, now: Instant, why: &str) {
        self.mic.release_at = None;
        match self.mic.open.take() {
            Some(mic) if mic.announced => {
                if let Some(s) = &mut self.session {
                    s.close_stream(MIC_STREAM, why);
                }
                self.log.line(now, Level::Info, format_args!("microphone closed ({why})"));
            }
            Some(_) => {
                self.log.line(now, Level::Info, format_args!("microphone no longer wanted while opening ({why})"));
            }
            None => return,
        }
        self.mic.next_open = Some(now + MIC_REOPEN);
    }

    /// The microphone's timers and packets: closes a capture whose hold ran out, opens
    /// one the guest wants (once [`MIC_REOPEN`] allows), announces it once open, and
    /// sends what it captured in whole packets while the guest wants it (drops it while
    /// held). Returns when to look again.
    fn pump_mic(&mut self, now: Instant) -> Option<Instant> {
        if self.mic.release_at.is_some_and(|at| at <= now) {
            self.close_mic(now, "the guest stopped recording");
        }
        if self.mic.wanted && self.mic.open.is_none() && self.session.is_some() {
            match self.mic.next_open {
                Some(at) if at > now => return Some(at),
                _ => self.open_mic(now),
            }
        }
        let release = self.mic.release_at;
        let earliest = |t: Instant| Some(release.map_or(t, |r| r.min(t)));
        if self.mic.wanted && self.mic.open.as_ref().is_some_and(|m| !m.announced) && !self.announce_mic(now) {
            // Still opening: look again soon (the capture thread answers in some 40 ms).
            return if self.mic.open.is_some() { earliest(now + MIC_OPEN_POLL) } else { release };
        }
        let now_ns = self.mono_ns(now);
        let (Some(mic), Some(s)) = (&mut self.mic.open, &mut self.session) else { return release };
        let capture = &mut mic.capture;
        if !self.mic.wanted {
            capture.skip_waiting();
            return earliest(now + Duration::from_millis(100));
        }
        let mut failed = None;
        while let Some(packet) = capture.next_packet() {
            match packet {
                // Dropped oldest first by the session if the port falls behind.
                Ok(p) => drop(s.send_media(MIC_STREAM, &p)),
                Err(e) => failed = Some(e),
            }
        }
        let due_ns = capture.wake_at(now_ns);
        if let Some(e) = failed {
            self.log.bad_input(now, "microphone", format_args!("encode failed: {e}"));
        }
        earliest(now + Duration::from_nanos(due_ns.saturating_sub(now_ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::WavOutput;
    use melange_shim::wav::HEADER_BYTES;
    use melange_transport::message::{AppInfo, AudioFormat};

    /// A guest session talking to `host` through `receive`, with virtual time.
    fn connect(host: &mut Host, now: Instant) -> Session {
        let caps = Capabilities {
            codecs: codec_bits::PCM_S16LE,
            max_streams: 8,
            kinds: melange_transport::message::kind_bits::AUDIO,
        };
        let mut guest = Session::new(SessionConfig::new(Role::Guest, "test guest", caps), now);
        pump(host, &mut guest, now);
        assert!(guest.is_established());
        guest
    }

    fn pump(host: &mut Host, guest: &mut Session, now: Instant) {
        let out = guest.pending_output().to_vec();
        guest.consume_output(out.len());
        assert!(host.receive(now, &out));
        guest.handle_input(now, &host.take_output());
    }

    /// A 10 ms mono PCM stream of an app.
    fn mono_pcm(app: &str) -> StreamOpen {
        StreamOpen {
            media: MediaKind::Audio(AudioFormat { rate: 48000, channels: 1, positions: vec![2] }),
            codec: Codec::PcmS16Le,
            frame_samples: 480,
            app: AppInfo { name: app.into(), ..Default::default() },
            codec_data: Vec::new(),
        }
    }

    /// Lets virtual time pass second by second, heartbeats flowing both ways.
    fn idle(host: &mut Host, guest: &mut Session, from: Instant, seconds: u64) -> Instant {
        let mut now = from;
        for _ in 0..seconds {
            now += Duration::from_secs(1);
            guest.handle_timeout(now);
            pump(host, guest, now);
            assert!(host.tick(now), "the session must survive idling");
        }
        now
    }

    #[test]
    fn an_idle_stream_releases_its_output_and_reopens_when_it_plays_again() {
        let dir = std::env::temp_dir().join(format!("melange-idle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config =
            HostConfig { latency: Some(Duration::from_millis(30)), mic: MicSpec::None, ..HostConfig::default() };
        let t0 = Instant::now();
        let mut host = Host::new(config, Box::new(WavOutput::new(&dir, 1 << 30).unwrap()), (t0, 0));
        let mut guest = connect(&mut host, t0);
        guest.open_stream(1, &mono_pcm("app")).unwrap();
        let packet = |seq| MediaPacket { seq, pts_ns: 0, duration: 480, data: vec![7; 960] };
        for seq in 0..10 {
            guest.send_media(1, &packet(seq)).unwrap();
        }
        pump(&mut host, &mut guest, t0);
        let first = dir.join("s1-stream1-app.wav");
        let t = idle(&mut host, &mut guest, t0, 29);
        assert!(host.streams[&1].sink.is_some(), "released before the timeout");
        let t = idle(&mut host, &mut guest, t, 1);
        assert!(host.streams[&1].sink.is_none(), "an idle stream keeps its output");
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            HEADER_BYTES as u64 + 10 * 960,
            "the first part is finished"
        );

        let t1 = t + Duration::from_millis(500);
        for seq in 10..15 {
            guest.send_media(1, &packet(seq)).unwrap();
        }
        pump(&mut host, &mut guest, t1);
        assert!(host.streams[&1].sink.is_some());
        guest.close_stream(1, "done");
        pump(&mut host, &mut guest, t1);
        assert!(host.streams.is_empty());
        assert_eq!(std::fs::metadata(dir.join("s1-stream1.2-app.wav")).unwrap().len(), HEADER_BYTES as u64 + 5 * 960);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An output whose render delay the test sets.
    struct FixedDelay(std::sync::Arc<std::sync::atomic::AtomicU64>);
    struct FixedDelaySink(std::sync::Arc<std::sync::atomic::AtomicU64>);

    impl Output for FixedDelay {
        fn open(&mut self, _: &StreamDesc) -> Result<Box<dyn StreamSink>, crate::output::OutputError> {
            Ok(Box::new(FixedDelaySink(self.0.clone())))
        }
        fn describe(&self) -> String {
            "fixed delay".into()
        }
    }

    impl StreamSink for FixedDelaySink {
        fn write(&mut self, _: &[f32]) {}
        fn buffered_frames(&self) -> usize {
            0
        }
        fn underruns(&self) -> u64 {
            0
        }
        fn overflows(&self) -> u64 {
            0
        }
        fn render_delay_ns(&self, _: u64) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
        fn close(&mut self) -> Result<(), crate::output::OutputError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "fixed delay".into()
        }
    }

    /// The host tells the guest each stream's render delay once it has half a second
    /// of packets, and again only when it moved by more than a millisecond.
    #[test]
    fn render_delay_is_reported_to_the_guest_when_it_changes() {
        let delay = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(20_000_000));
        let config = HostConfig { mic: MicSpec::None, ..HostConfig::default() };
        let t0 = Instant::now();
        let mut host = Host::new(config, Box::new(FixedDelay(delay.clone())), (t0, 0));
        let mut guest = connect(&mut host, t0);
        guest.open_stream(1, &mono_pcm("app")).unwrap();
        let mut reports = Vec::new();
        for seq in 0..300u32 {
            let now = t0 + Duration::from_millis(10 * u64::from(seq));
            match seq {
                100 => delay.store(20_500_000, Ordering::Relaxed), // within a millisecond
                150 => delay.store(60_000_000, Ordering::Relaxed),
                _ => {}
            }
            guest.send_media(1, &MediaPacket { seq, pts_ns: 0, duration: 480, data: vec![0; 960] }).unwrap();
            pump(&mut host, &mut guest, now);
            while let Some(ev) = guest.poll_event() {
                if let Event::StreamLatency { stream: 1, render_ns } = ev {
                    reports.push((seq, render_ns));
                }
            }
        }
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert_eq!(reports[0].1, 20_000_000);
        assert!(reports[0].0 <= 55, "the first report came after {} packets", reports[0].0);
        assert_eq!(reports[1].1, 60_000_000);
        assert!((150..=210).contains(&reports[1].0), "the change came after packet {}", reports[1].0);
    }

    /// An output that counts the frames written to it, per stream.
    #[derive(Default, Clone)]
    struct Counting(std::sync::Arc<std::sync::Mutex<BTreeMap<u32, usize>>>);
    struct CountingSink(std::sync::Arc<std::sync::Mutex<BTreeMap<u32, usize>>>, u32, usize);

    impl Output for Counting {
        fn open(&mut self, desc: &StreamDesc) -> Result<Box<dyn StreamSink>, crate::output::OutputError> {
            Ok(Box::new(CountingSink(self.0.clone(), desc.stream, usize::from(desc.format.channels))))
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    impl StreamSink for CountingSink {
        fn write(&mut self, samples: &[f32]) {
            *self.0.lock().unwrap().entry(self.1).or_default() += samples.len() / self.2;
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
        fn close(&mut self) -> Result<(), crate::output::OutputError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    /// 2-byte Opus packets that each decode to 120 ms, as fast as the guest can send
    /// them, next to a genuine stream: the flood gets real time and no more, and the
    /// genuine stream every frame it sent.
    #[test]
    fn a_stream_cannot_deliver_more_than_real_time() {
        let counting = Counting::default();
        let config = HostConfig { mic: MicSpec::None, ..HostConfig::default() };
        let t0 = Instant::now();
        let mut host = Host::new(config, Box::new(counting.clone()), (t0, 0));
        let mut guest = connect(&mut host, t0);
        guest.open_stream(1, &mono_pcm("genuine")).unwrap();
        let opus = StreamOpen {
            media: MediaKind::Audio(AudioFormat { rate: 48000, channels: 2, positions: vec![3, 4] }),
            codec: Codec::Opus { bitrate: 64_000 },
            frame_samples: 480,
            app: AppInfo { name: "flood".into(), ..Default::default() },
            codec_data: Vec::new(),
        };
        guest.open_stream(2, &opus).unwrap();
        // TOC 0xFB: CELT fullband 20 ms frames, code 3 (a count follows): 6 empty
        // frames, 120 ms from 2 bytes.
        let amplifier = vec![0xFB, 0x06];
        let mut seq = 0u32;
        let seconds = 10u64;
        for ms in 0..seconds * 1000 {
            let now = t0 + Duration::from_millis(ms);
            if ms % 10 == 0 {
                let p = MediaPacket { seq: (ms / 10) as u32, pts_ns: 0, duration: 480, data: vec![1; 960] };
                guest.send_media(1, &p).unwrap();
            }
            for _ in 0..5 {
                let p = MediaPacket { seq, pts_ns: 0, duration: 5760, data: amplifier.clone() };
                let _ = guest.send_media(2, &p);
                seq += 1;
            }
            pump(&mut host, &mut guest, now);
            if ms % 1000 == 0 {
                guest.handle_timeout(now);
                assert!(host.tick(now));
            }
        }
        let frames = counting.0.lock().unwrap().clone();
        let limit = 48_000.0
            * (seconds as f64 * (1.0 + melange_shim::receive::PACE_SLACK)
                + (melange_shim::receive::POOL_BURST + melange_shim::receive::MIN_START).as_secs_f64());
        assert!((frames[&2] as f64) <= limit, "the flood wrote {} frames in {seconds} s", frames[&2]);
        assert!(frames[&2] as f64 >= 48_000.0 * (seconds as f64 - 1.0), "real time is allowed: {}", frames[&2]);
        assert_eq!(frames[&1], seconds as usize * 48_000, "the genuine stream lost audio");
        assert!(host.streams[&2].receiver.counts().over_budget > 40_000);
    }

    /// An output whose first open fails after `open` returned, as the host's PipeWire
    /// may answer (`StreamSink::poll_open`); later opens succeed.
    #[derive(Default, Clone)]
    struct FailsFirst {
        opens: std::sync::Arc<std::sync::Mutex<u32>>,
        written: std::sync::Arc<std::sync::Mutex<usize>>,
    }
    struct FailsFirstSink {
        failed: bool,
        written: std::sync::Arc<std::sync::Mutex<usize>>,
    }

    impl Output for FailsFirst {
        fn open(&mut self, _: &StreamDesc) -> Result<Box<dyn StreamSink>, crate::output::OutputError> {
            let mut opens = self.opens.lock().unwrap();
            *opens += 1;
            Ok(Box::new(FailsFirstSink { failed: *opens == 1, written: self.written.clone() }))
        }
        fn describe(&self) -> String {
            "fails first".into()
        }
    }

    impl StreamSink for FailsFirstSink {
        fn write(&mut self, samples: &[f32]) {
            *self.written.lock().unwrap() += samples.len();
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
        fn poll_open(&mut self, _: Instant) -> Result<(), crate::output::OutputError> {
            if self.failed {
                return Err(crate::output::OutputError::PipeWire("refused".into()));
            }
            Ok(())
        }
        fn close(&mut self) -> Result<(), crate::output::OutputError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "fails first".into()
        }
    }

    /// An output that fails to open after the stream was accepted is dropped and tried
    /// again after REOPEN_RETRY, the packets meanwhile dropped and counted.
    #[test]
    fn an_output_that_fails_to_open_later_is_tried_again() {
        let output = FailsFirst::default();
        let config = HostConfig { mic: MicSpec::None, ..HostConfig::default() };
        let t0 = Instant::now();
        let mut host = Host::new(config, Box::new(output.clone()), (t0, 0));
        let mut guest = connect(&mut host, t0);
        guest.open_stream(1, &mono_pcm("app")).unwrap();
        for seq in 0..100u32 {
            let now = t0 + Duration::from_millis(10 * u64::from(seq));
            guest.send_media(1, &MediaPacket { seq, pts_ns: 0, duration: 480, data: vec![0; 960] }).unwrap();
            pump(&mut host, &mut guest, now);
        }
        assert_eq!(*output.opens.lock().unwrap(), 2);
        let s = &host.streams[&1];
        assert_eq!(s.desc.part, 2);
        assert_eq!(s.dropped_packets, 50, "REOPEN_RETRY is 500 ms of 10 ms packets");
        assert!(s.sink.is_some());
        assert!(*output.written.lock().unwrap() > 0, "the second part plays");
    }

    /// Demand for the microphone toggled fifty times a second with `--mic none`: said
    /// once, and no capture is ever made.
    #[test]
    fn a_toggling_guest_is_told_once_that_there_is_no_microphone() {
        let config = HostConfig { mic: MicSpec::None, ..HostConfig::default() };
        let t0 = Instant::now();
        let mut host = Host::new(config, Box::new(Counting::default()), (t0, 0));
        let mut guest = connect(&mut host, t0);
        for i in 0..100u64 {
            let now = t0 + Duration::from_millis(20 * i);
            let demand = CaptureDemand { device: CaptureDevice::Microphone, active: i % 2 == 0, frame_us: 10_000 };
            let _ = guest.demand_capture(demand);
            pump(&mut host, &mut guest, now);
            assert!(host.mic.open.is_none());
        }
        assert!(host.mic.said_none);
    }
}
