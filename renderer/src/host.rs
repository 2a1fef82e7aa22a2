//! The host side of a session: streams in, decoded audio out.
//!
//! [`Host`] owns the protocol session for the current connection and one
//! [`HostStream`] per guest stream. It is driven by [`Host::run`], a poll loop over the
//! [`Link`]; everything it logs is one line per connect, disconnect, stream open and
//! close, plus rate-limited lines for bad input.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use melange_shim::clock;
use melange_shim::codec::{validate, StreamDecoder};
use melange_transport::frame::HEADER_LEN;
use melange_transport::message::{
    codec_bits, Capabilities, CaptureDemand, CaptureDevice, Codec, MediaKind, MediaPacket, Role, StreamOpen, Volume,
    MEDIA_HEADER_LEN,
};
use melange_transport::port::{Link, LinkEvent, Waker};
use melange_transport::session::{Event, Session, SessionConfig};

use crate::mic::{MicCapture, MicSpec, MIC_RATE};
use crate::output::{Output, StreamDesc, StreamSink};

/// Streams a guest may have open at once.
pub const MAX_STREAMS: u16 = 64;
/// Longest gap (in ms of audio) filled with concealment; longer gaps are skipped.
const MAX_CONCEAL_MS: u64 = 100;
/// Latency samples kept per stream for the percentiles (about 30 min at 10 ms).
const MAX_LATENCY_SAMPLES: usize = 200_000;

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
    frame_samples as usize
        + output_quantum(frame_samples, rate) as usize
        + melange_shim::render::jitter_margin_frames(rate, 0) as usize
}

/// Settings of the host.
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
}

/// The microphone's capture, and whether the guest was told of its stream (once open).
struct Mic {
    capture: MicCapture,
    frame_samples: u32,
    announced: bool,
}

/// How often the session thread looks whether the microphone has opened.
const MIC_OPEN_POLL: Duration = Duration::from_millis(5);

/// The id of the microphone stream the host sends (host streams have ids of their own).
pub const MIC_STREAM: u32 = 1;
/// Packet durations the guest may ask of the microphone, in microseconds.
const MIC_FRAME_US: [u32; 4] = [2_500, 5_000, 10_000, 20_000];

/// How often `--stats` prints.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// One guest stream being rendered.
struct HostStream {
    desc: StreamDesc,
    decoder: StreamDecoder,
    /// The output; `None` while the stream is idle (see [`HostConfig::idle_timeout`]).
    sink: Option<Box<dyn StreamSink>>,
    /// Where the output went (the last part), for the report.
    output: String,
    last_media: Instant,
    /// Underruns and overflows of output parts already closed.
    closed_underruns: u64,
    closed_overflows: u64,
    /// Packets dropped because no output could be opened, and when to try again.
    dropped_packets: u64,
    reopen_at: Instant,
    next_seq: Option<u32>,
    packets: u64,
    wire_bytes: u64,
    frames: u64,
    lost_packets: u64,
    decode_errors: u64,
    /// Frames decoded from real packets, and frames made up by concealment: the
    /// second may never exceed the first, so sequence gaps cannot amplify a flood.
    decoded_frames: u64,
    concealed_frames: u64,
    opened: Instant,
    /// Output fill (frames) as packets arrive, per second; its mean in the stream's
    /// second and tenth second and in the last full second (ms).
    fill: WindowMean,
    fill_second_2: Option<f64>,
    fill_second_10: Option<f64>,
    fill_last: Option<f64>,
    seconds_seen: u32,
    /// Render delay (ns) each packet meets, per [`RENDER_WINDOW`]; the last mean, and
    /// the last one reported to the guest.
    render: WindowMean,
    render_last: Option<u64>,
    render_reported: Option<u64>,
    latencies_ms: Vec<f32>,
    /// Wire bytes and latency samples at the last `--stats` line.
    stats_bytes: u64,
    stats_latencies: usize,
    scratch: Vec<f32>,
}

/// The mean of a value over consecutive windows of time.
#[derive(Debug, Clone, Copy)]
struct WindowMean {
    length: Duration,
    start: Instant,
    sum: f64,
    count: u32,
}

impl WindowMean {
    fn new(length: Duration, start: Instant) -> Self {
        Self { length, start, sum: 0.0, count: 0 }
    }

    /// Adds a sample taken at `now`; returns the mean of the window it closed, if any.
    fn add(&mut self, now: Instant, value: f64) -> Option<f64> {
        let closed = (now.saturating_duration_since(self.start) >= self.length && self.count > 0)
            .then(|| self.sum / f64::from(self.count));
        if closed.is_some() {
            *self = Self::new(self.length, now);
        }
        self.sum += value;
        self.count += 1;
        closed
    }
}

/// The render delay is averaged over windows this long before it is reported: long
/// enough to even out where packets land in the output's cycle, short enough that a
/// change reaches the guest's apps within a second. At most two reports a second per
/// stream keep 64 streams under the peer's control-frame limit.
const RENDER_WINDOW: Duration = Duration::from_millis(500);
/// A render delay that moved by more than this since the last report is reported again.
const RENDER_REPORT_STEP_NS: u64 = 1_000_000;

/// An output that cannot be opened is tried again after this; packets meanwhile are
/// dropped and counted.
const REOPEN_RETRY: Duration = Duration::from_millis(500);

/// Longest guest-supplied string kept (app name, role, ...), in characters.
const MAX_GUEST_STRING: usize = 128;

/// A guest-supplied string without control characters (NUL among them), cut to
/// [`MAX_GUEST_STRING`] characters.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_GUEST_STRING).collect()
}

/// Logs bad input at most once per [`BAD_INPUT_LOG_INTERVAL`] per kind of problem,
/// counting what it suppressed, so a hostile guest cannot flood the log.
#[derive(Debug, Default)]
struct RateLimitedLog {
    /// Kind -> (last logged, suppressed since).
    kinds: BTreeMap<&'static str, (Instant, u64)>,
}

/// How often each kind of bad-input message may be logged.
const BAD_INPUT_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl RateLimitedLog {
    fn warn(&mut self, kind: &'static str, text: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        match self.kinds.get_mut(kind) {
            Some((last, suppressed)) if now.saturating_duration_since(*last) < BAD_INPUT_LOG_INTERVAL => {
                *suppressed += 1;
            }
            Some((last, suppressed)) => {
                log::warn!("melange-host: {kind}: {text} ({suppressed} more since the last report)");
                *last = now;
                *suppressed = 0;
            }
            None => {
                log::warn!("melange-host: {kind}: {text}");
                self.kinds.insert(kind, (now, 0));
            }
        }
    }
}

/// The host's state across connections.
pub struct Host {
    config: HostConfig,
    output: Box<dyn Output>,
    session: Option<Session>,
    sessions: u64,
    streams: BTreeMap<u32, HostStream>,
    clock_id: String,
    same_clock: bool,
    bad_input: RateLimitedLog,
    /// The connect error last logged, so a retrying connect logs each problem once.
    last_connect_error: Option<String>,
    /// When `--stats` last printed.
    stats_at: Instant,
    /// The microphone while the guest records from it.
    mic: Option<Mic>,
    /// The guest's output volume, applied to every stream (see [`Volume`]).
    volume: Volume,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("sessions", &self.sessions).field("streams", &self.streams.len()).finish()
    }
}

impl Host {
    /// A host rendering into `output`.
    pub fn new(config: HostConfig, output: Box<dyn Output>) -> Self {
        Self {
            config,
            output,
            session: None,
            sessions: 0,
            streams: BTreeMap::new(),
            clock_id: clock::clock_id(),
            same_clock: false,
            bad_input: RateLimitedLog::default(),
            last_connect_error: None,
            stats_at: Instant::now(),
            mic: None,
            volume: Volume::unity(),
        }
    }

    /// Runs until `stop` is set (then wakes through `waker`) or the link ends for good.
    pub fn run(&mut self, link: &mut Link, waker: &Waker, stop: &AtomicBool) -> std::io::Result<()> {
        log::info!(
            "melange-host: waiting for a guest on {}; sound goes to {}",
            link.describe(),
            self.output.describe()
        );
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            let mic_due = self.pump_mic();
            self.flush(link);
            let mut timeout = self
                .session
                .as_ref()
                .and_then(Session::poll_timeout)
                .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(Instant::now()));
            if let Some(at) = mic_due {
                timeout = timeout.min(Duration::from_nanos(at.saturating_sub(clock::monotonic_ns())));
            }
            let want_write = self.session.as_ref().is_some_and(|s| !s.pending_output().is_empty());
            match link.wait(want_write, Some(timeout), Some(waker))? {
                LinkEvent::Connected => {
                    log::info!("melange-host: connected on {}; waiting for the guest's hello", link.describe());
                    self.start_session();
                }
                LinkEvent::Disconnected(reason) => self.end_session(&format!("guest disconnected ({reason})")),
                // A session whose peer went silent too long ends before its bytes
                // are read: after a stall (this process stopped, the machine
                // suspended) they are stale, and the guest has moved on to a new
                // session.
                LinkEvent::Readable if !self.tick(Instant::now()) => link.disconnect(),
                LinkEvent::Readable => loop {
                    match link.read(&mut buf)? {
                        Some(0) => {
                            self.end_session("guest disconnected (end of stream)");
                            break;
                        }
                        // Checked again for every read: the process may have been
                        // stopped between two reads, or between a read and its handling.
                        Some(_) if !self.tick(Instant::now()) => {
                            link.disconnect();
                            break;
                        }
                        Some(n) => {
                            if !self.receive(Instant::now(), &buf[..n]) {
                                link.disconnect();
                            }
                        }
                        None => break,
                    }
                },
                LinkEvent::Woken | LinkEvent::Writable | LinkEvent::Timeout => {}
            }
            if !self.tick(Instant::now()) {
                link.disconnect();
            }
            let connect_error = link.last_error().map(str::to_owned);
            if connect_error.is_some() && connect_error != self.last_connect_error {
                log::warn!("melange-host: still trying: {}", connect_error.as_deref().unwrap_or_default());
            }
            self.last_connect_error = connect_error;
            if link.is_finished() {
                log::info!("melange-host: {} ended", link.describe());
                break;
            }
        }
        self.shutdown(link);
        Ok(())
    }

    fn start_session(&mut self) {
        self.close_all("new connection");
        self.sessions += 1;
        // The guest says its volume at the start of each session.
        self.volume = Volume::unity();
        let (now, now_ns) = clock::now_pair();
        let mut cfg = SessionConfig::new(
            Role::Host,
            format!("melange-host {}", env!("CARGO_PKG_VERSION")),
            Capabilities { codecs: codec_bits::PCM_S16LE | codec_bits::OPUS, max_streams: MAX_STREAMS },
        );
        cfg.clock_id = self.clock_id.clone();
        cfg.origin_ns = now_ns;
        self.session = Some(Session::new(cfg, now));
    }

    fn end_session(&mut self, why: &str) {
        if self.session.take().is_some() {
            log::info!("melange-host: {why}");
        }
        self.close_all("guest disconnected");
    }

    fn shutdown(&mut self, link: &mut Link) {
        self.close_all("host shutting down");
        if let Some(s) = &mut self.session {
            s.close(melange_transport::session::CloseReason::Local("host shutting down".into()));
        }
        self.flush(link);
        self.session = None;
    }

    fn flush(&mut self, link: &mut Link) {
        let Some(s) = &mut self.session else { return };
        while !s.pending_output().is_empty() {
            match link.write(s.pending_output()) {
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
            self.start_session();
        }
        if let Some(s) = &mut self.session {
            s.handle_input(now, bytes);
        }
        self.handle_events(now)
    }

    /// Runs timers: session heartbeats and timeouts, idle streams releasing their
    /// outputs, `--stats`. Returns false when the session has closed. Sans-IO, like
    /// [`Host::receive`].
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
        let idle = self.config.idle_timeout;
        for (id, s) in &mut self.streams {
            if s.sink.is_some() && now.saturating_duration_since(s.last_media) >= idle {
                if let Some(mut sink) = s.sink.take() {
                    let _ = sink.close();
                    s.closed_underruns += sink.underruns();
                    s.closed_overflows += sink.overflows();
                }
                log::info!("melange-host: stream {id} idle for {idle:?}: output released until it plays again");
            }
        }
        self.handle_events(now)
    }

    /// Bytes the host wants to send to the guest (for callers of [`Host::receive`]).
    pub fn take_output(&mut self) -> Vec<u8> {
        let Some(s) = &mut self.session else { return Vec::new() };
        let out = s.pending_output().to_vec();
        s.consume_output(out.len());
        out
    }

    /// Processes session events; false once the session has closed.
    fn handle_events(&mut self, now: Instant) -> bool {
        loop {
            let Some(event) = self.session.as_mut().and_then(Session::poll_event) else { return true };
            match event {
                Event::Established(peer) => {
                    self.same_clock = !peer.clock_id.is_empty() && peer.clock_id == self.clock_id;
                    log::info!(
                        "melange-host: guest connected: {} (protocol v{}, session {:#x}{})",
                        peer.software,
                        peer.version,
                        peer.epoch,
                        if self.same_clock { ", same clock as the host" } else { "" }
                    );
                }
                Event::StreamOpened { stream, open } => self.open_stream(now, stream, open),
                Event::StreamClosed { stream, reason } => self.close_stream(stream, &reason),
                Event::Media { stream, packet } => self.on_media(now, stream, &packet),
                Event::CaptureDemand(demand) => self.on_capture_demand(demand),
                Event::Volume(volume) => {
                    log::info!("melange-host: the guest's volume is now {}", volume);
                    self.apply_volume(volume);
                }
                Event::PeerRestarted => {
                    log::info!("melange-host: the guest side restarted; starting a new session");
                    self.close_all("guest restarted");
                }
                Event::StreamRejected { stream, reason } => {
                    log::warn!("melange-host: guest refused stream {stream}: {reason}")
                }
                // Reports about streams the host sends; it sends none in this version.
                Event::StreamLatency { .. } => {}
                Event::Error(e) => self.bad_input.warn(e.kind(), format_args!("skipped bad input from the guest: {e}")),
                Event::Closed(reason) => {
                    log::warn!("melange-host: session closed: {reason}");
                    self.session = None;
                    self.close_all("session closed");
                    return false;
                }
            }
        }
    }

    fn open_stream(&mut self, now: Instant, stream: u32, mut open: StreamOpen) {
        // Guest strings end up in PipeWire properties, logs and file names.
        for field in [
            &mut open.app.name,
            &mut open.app.role,
            &mut open.app.binary,
            &mut open.app.icon_name,
            &mut open.app.media_name,
        ] {
            *field = sanitize(field);
        }
        let MediaKind::Audio(format) = open.media.clone();
        let result = validate(&format, &open.codec, open.frame_samples)
            .and_then(|()| StreamDecoder::new(&format, &open.codec, open.frame_samples))
            .map_err(|e| e.to_string())
            .and_then(|decoder| {
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
                Ok((desc, decoder, sink))
            });
        match result {
            Ok((desc, decoder, sink)) => {
                let output = sink.describe();
                log::info!(
                    "melange-host: stream {stream} opened: \"{}\" (role {}, binary {}), {} {} Hz {} ch, {} ms packets -> {}",
                    open.app.name,
                    if open.app.role.is_empty() { "none" } else { &open.app.role },
                    if open.app.binary.is_empty() { "unknown" } else { &open.app.binary },
                    open.codec.name(),
                    format.rate,
                    format.channels,
                    f64::from(open.frame_samples) * 1000.0 / f64::from(format.rate),
                    sink.describe()
                );
                self.streams.insert(
                    stream,
                    HostStream {
                        desc,
                        decoder,
                        sink: Some(sink),
                        output,
                        last_media: now,
                        closed_underruns: 0,
                        closed_overflows: 0,
                        dropped_packets: 0,
                        reopen_at: now,
                        next_seq: None,
                        packets: 0,
                        wire_bytes: 0,
                        frames: 0,
                        lost_packets: 0,
                        decode_errors: 0,
                        decoded_frames: 0,
                        concealed_frames: 0,
                        opened: Instant::now(),
                        fill: WindowMean::new(Duration::from_secs(1), now),
                        fill_second_2: None,
                        fill_second_10: None,
                        fill_last: None,
                        seconds_seen: 0,
                        render: WindowMean::new(RENDER_WINDOW, now),
                        render_last: None,
                        render_reported: None,
                        latencies_ms: Vec::new(),
                        stats_bytes: 0,
                        stats_latencies: 0,
                        scratch: Vec::with_capacity(open.frame_samples as usize * usize::from(format.channels)),
                    },
                );
            }
            Err(e) => {
                log::warn!("melange-host: refusing stream {stream} (\"{}\"): {e}", open.app.name);
                if let Some(s) = &mut self.session {
                    s.reject_stream(stream, &e);
                }
            }
        }
    }

    fn on_media(&mut self, now: Instant, stream: u32, packet: &MediaPacket) {
        let Some(s) = self.streams.get_mut(&stream) else { return };
        s.last_media = now;
        if s.sink.as_ref().is_some_and(|k| k.is_lost()) {
            if let Some(mut sink) = s.sink.take() {
                let _ = sink.close();
                s.closed_underruns += sink.underruns();
                s.closed_overflows += sink.overflows();
            }
            log::warn!("melange-host: stream {stream}: its output went away (the host's PipeWire?); opening it again");
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
                    log::info!("melange-host: stream {stream} plays again -> {}", sink.describe());
                    s.output = sink.describe();
                    s.sink = Some(sink);
                }
                Err(e) => {
                    self.bad_input.warn("output", format_args!("stream {stream}: cannot reopen the output: {e}"));
                    s.reopen_at = now + REOPEN_RETRY;
                    s.dropped_packets += 1;
                    return;
                }
            }
        }
        let rate = u64::from(s.desc.format.rate);
        s.packets += 1;
        s.wire_bytes += (HEADER_LEN + MEDIA_HEADER_LEN + packet.data.len()) as u64;
        // At most 120 ms per packet (Opus's longest frame); never trust the count further.
        if packet.duration == 0 || u64::from(packet.duration) * 1000 > rate * 120 {
            s.decode_errors += 1;
            self.bad_input
                .warn("bad packet", format_args!("stream {stream}: packet with bad duration {}", packet.duration));
            return;
        }
        let duration = packet.duration as usize;
        s.scratch.clear();
        if let Some(expected) = s.next_seq {
            let gap = packet.seq.wrapping_sub(expected);
            if gap >= 0x8000_0000 {
                // Older than what we played: a duplicate or reordered packet.
                return;
            }
            if gap > 0 {
                s.lost_packets += u64::from(gap);
                let lost_frames = u64::from(gap) * u64::from(s.desc.open.frame_samples);
                if lost_frames * 1000 <= rate * MAX_CONCEAL_MS && s.concealed_frames + lost_frames <= s.decoded_frames {
                    s.decoder.conceal(lost_frames as usize, &mut s.scratch);
                    s.concealed_frames += lost_frames;
                }
            }
        }
        s.next_seq = Some(packet.seq.wrapping_add(1));
        let before = s.scratch.len();
        if let Err(e) = s.decoder.decode(&packet.data, duration, &mut s.scratch) {
            s.decode_errors += 1;
            self.bad_input.warn("bad packet", format_args!("stream {stream}: {e}"));
            if s.concealed_frames + duration as u64 <= s.decoded_frames {
                s.decoder.conceal(duration, &mut s.scratch);
                s.concealed_frames += duration as u64;
            }
        } else {
            s.decoded_frames += ((s.scratch.len() - before) / usize::from(s.desc.format.channels)) as u64;
        }
        s.frames += (s.scratch.len() / usize::from(s.desc.format.channels)) as u64;
        let now_ns = clock::monotonic_ns();
        // What this packet's first sample meets: everything buffered ahead of it.
        let render_ns = s.sink.as_ref().map_or(0, |k| k.render_delay_ns(now_ns));
        if let Some(sink) = &mut s.sink {
            sink.write(&s.scratch);
        }
        let fill = s.sink.as_ref().map_or(0, |k| k.buffered_frames()) as f64;
        if let Some(mean) = s.fill.add(now, fill) {
            let mean_ms = mean * 1000.0 / rate as f64;
            s.seconds_seen += 1;
            match s.seconds_seen {
                2 => s.fill_second_2 = Some(mean_ms),
                10 => s.fill_second_10 = Some(mean_ms),
                _ => {}
            }
            s.fill_last = Some(mean_ms);
        }
        if let Some(mean) = s.render.add(now, render_ns as f64) {
            let render = mean as u64;
            s.render_last = Some(render);
            if s.render_reported.map_or(true, |r| r.abs_diff(render) > RENDER_REPORT_STEP_NS) {
                if let Some(session) = &mut self.session {
                    session.report_latency(stream, render);
                }
                s.render_reported = Some(render);
            }
        }
        if self.same_clock && s.latencies_ms.len() < MAX_LATENCY_SAMPLES {
            // pts is when the first sample would have played in the guest; a packet cut
            // from late in a large graph cycle arrives before that, so this can be < 0.
            let transit_ms = (i128::from(now_ns) - i128::from(packet.pts_ns)) as f64 / 1e6;
            s.latencies_ms.push((transit_ms + render_ns as f64 / 1e6) as f32);
        }
    }

    fn close_stream(&mut self, stream: u32, reason: &str) {
        let Some(mut s) = self.streams.remove(&stream) else { return };
        let drift_ppm = s.sink.as_ref().and_then(|k| k.drift_ppm());
        let clock_ppm = s.sink.as_ref().and_then(|k| k.clock_ppm());
        let (underruns, overflows) = match s.sink.take() {
            Some(mut sink) => {
                if let Err(e) = sink.close() {
                    log::error!("melange-host: stream {stream}: {e}");
                }
                (s.closed_underruns + sink.underruns(), s.closed_overflows + sink.overflows())
            }
            None => (s.closed_underruns, s.closed_overflows),
        };
        let seconds = s.opened.elapsed().as_secs_f64();
        let media_seconds = s.frames as f64 / f64::from(s.desc.format.rate);
        let mut lat = std::mem::take(&mut s.latencies_ms);
        lat.sort_by(f32::total_cmp);
        let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).map(|v| f64::from(*v));
        let (p50, p99) = (pct(0.5), pct(0.99));
        let wire_rate = if media_seconds > 0.0 { s.wire_bytes as f64 / media_seconds } else { 0.0 };
        let fmt_ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1} ms"));
        log::info!(
            "melange-host: stream {stream} closed ({reason}): \"{}\", {media_seconds:.2} s of audio, {} packets, {:.1} kB/s on the wire, \
             latency p50 {} p99 {}, {} lost, {} bad, {} underruns",
            s.desc.open.app.name,
            s.packets,
            wire_rate / 1000.0,
            fmt_ms(p50),
            fmt_ms(p99),
            s.lost_packets,
            s.decode_errors,
            underruns
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
                "packets": s.packets,
                "wire_bytes": s.wire_bytes,
                "wire_bytes_per_s": wire_rate,
                "latency_ms_p50": p50,
                "latency_ms_p99": p99,
                "lost_packets": s.lost_packets,
                "bad_packets": s.decode_errors,
                "underruns": underruns,
                "drift_ppm": drift_ppm,
                "output_clock_ppm": clock_ppm,
                "fill_ms_second_2": s.fill_second_2,
                "fill_ms_second_10": s.fill_second_10,
                "fill_ms_last_second": s.fill_last,
                "render_ms_last": s.render_last.map(|ns| ns as f64 / 1e6),
                "overflow_samples": overflows,
                "dropped_packets": s.dropped_packets,
            });
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = written {
                log::error!("melange-host: cannot write the report {}: {e}", path.display());
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
            let kbps = (s.wire_bytes - s.stats_bytes) as f64 * 8.0 / 1000.0 / elapsed_s.max(1e-3);
            s.stats_bytes = s.wire_bytes;
            let mut recent: Vec<f32> = s.latencies_ms[s.stats_latencies.min(s.latencies_ms.len())..].to_vec();
            s.stats_latencies = s.latencies_ms.len();
            recent.sort_by(f32::total_cmp);
            let latency = recent.get(recent.len() / 2).map_or("n/a".to_string(), |v| format!("{v:.1}"));
            let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
            let (fill, drift, underruns) = match &s.sink {
                Some(k) => (
                    Some(k.buffered_frames() as f64 * 1000.0 / f64::from(s.desc.format.rate)),
                    k.drift_ppm(),
                    s.closed_underruns + k.underruns(),
                ),
                None => (None, None, s.closed_underruns),
            };
            let _ = writeln!(
                out,
                "stats session={} stream={id} app={:?} codec={} kbps={kbps:.1} latency_ms={latency} render_ms={} \
                 fill_ms={} drift_ppm={} lost={} dropped={} bad={} underruns={underruns}",
                s.desc.session,
                s.desc.open.app.name,
                s.desc.open.codec.name(),
                ms(s.render_last.map(|ns| ns as f64 / 1e6)),
                ms(fill),
                drift.map_or("n/a".to_string(), |d| format!("{d:.0}")),
                s.lost_packets,
                s.dropped_packets,
                s.decode_errors,
            );
        }
        let _ = out.flush();
    }

    fn close_all(&mut self, reason: &str) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.close_stream(id, reason);
        }
        self.close_mic(reason);
    }

    /// Puts the guest's volume on every stream's output.
    fn apply_volume(&mut self, volume: Volume) {
        for sink in self.streams.values_mut().filter_map(|s| s.sink.as_mut()) {
            sink.set_volume(&volume);
        }
        self.volume = volume;
    }

    fn on_capture_demand(&mut self, demand: CaptureDemand) {
        match demand.device {
            CaptureDevice::Microphone if demand.active => self.open_mic(demand.frame_us),
            CaptureDevice::Microphone => self.close_mic("the guest stopped recording"),
        }
    }

    /// Starts opening the microphone for the guest; [`Host::pump_mic`] announces its
    /// stream once PipeWire has opened it. On failure the guest's virtual microphone
    /// stays silent, and the log says why.
    fn open_mic(&mut self, frame_us: u32) {
        if self.mic.is_some() || self.session.is_none() {
            return;
        }
        if self.config.mic == MicSpec::None {
            log::info!("melange-host: a guest app records from its microphone; with --mic none it hears silence");
            return;
        }
        let frame_us = if MIC_FRAME_US.contains(&frame_us) { frame_us } else { 10_000 };
        let frame_samples = MIC_RATE / 1000 * frame_us / 1000;
        match MicCapture::open(&self.config.mic, frame_samples) {
            Ok(mic) => self.mic = Some(Mic { capture: mic, frame_samples, announced: false }),
            Err(e) => log::warn!("melange-host: cannot open the microphone for the guest ({e}); it hears silence"),
        }
    }

    /// Announces the microphone's stream to the guest once its capture is open; false
    /// (and the microphone dropped) if it cannot be had.
    fn announce_mic(&mut self) -> bool {
        let (Some(mic), Some(s)) = (&mut self.mic, &mut self.session) else { return false };
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
                log::info!(
                    "melange-host: microphone opened for the guest: {}, Opus {} kbit/s mono, {} ms packets",
                    self.config.mic,
                    crate::mic::MIC_BITRATE / 1000,
                    f64::from(mic.frame_samples) * 1000.0 / f64::from(MIC_RATE)
                );
                true
            }
            Err(e) => {
                log::warn!("melange-host: {e}");
                self.mic = None;
                false
            }
        }
    }

    fn close_mic(&mut self, why: &str) {
        match self.mic.take() {
            Some(mic) if mic.announced => {
                if let Some(s) = &mut self.session {
                    s.close_stream(MIC_STREAM, why);
                }
                log::info!("melange-host: microphone closed ({why})");
            }
            Some(_) => log::info!("melange-host: microphone no longer wanted while opening ({why})"),
            None => {}
        }
    }

    /// Sends what the microphone captured, in whole packets; returns when the next one
    /// is due (`CLOCK_MONOTONIC` ns) while it is open.
    fn pump_mic(&mut self) -> Option<u64> {
        if self.mic.as_ref().is_some_and(|m| !m.announced) && !self.announce_mic() {
            // Still opening: look again soon (the capture thread answers in some 40 ms).
            return self.mic.is_some().then(|| clock::monotonic_ns() + MIC_OPEN_POLL.as_nanos() as u64);
        }
        let (Some(mic), Some(s)) = (&mut self.mic, &mut self.session) else { return None };
        let mic = &mut mic.capture;
        while let Some(packet) = mic.next_packet() {
            match packet {
                Ok(p) => {
                    // Dropped oldest first by the session if the port falls behind.
                    let _ = s.send_media(MIC_STREAM, &p);
                }
                Err(e) => self.bad_input.warn("microphone", format_args!("encode failed: {e}")),
            }
        }
        Some(mic.wake_at(clock::monotonic_ns()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::WavOutput;
    use melange_transport::message::{AppInfo, AudioFormat};

    /// A guest session talking to `host` through `receive`, with virtual time.
    fn connect(host: &mut Host, now: Instant) -> Session {
        let caps = Capabilities { codecs: codec_bits::PCM_S16LE, max_streams: 8 };
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
        let config = HostConfig {
            latency: Some(Duration::from_millis(30)),
            report: None,
            idle_timeout: Duration::from_secs(30),
            stats: false,
            mic: MicSpec::None,
        };
        let mut host = Host::new(config, Box::new(WavOutput::new(&dir).unwrap()));
        let t0 = Instant::now();
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
        assert_eq!(std::fs::metadata(&first).unwrap().len(), 44 + 10 * 960, "the first part is finished");

        let t1 = t + Duration::from_millis(500);
        for seq in 10..15 {
            guest.send_media(1, &packet(seq)).unwrap();
        }
        pump(&mut host, &mut guest, t1);
        assert!(host.streams[&1].sink.is_some());
        guest.close_stream(1, "done");
        pump(&mut host, &mut guest, t1);
        assert!(host.streams.is_empty());
        assert_eq!(std::fs::metadata(dir.join("s1-stream1.2-app.wav")).unwrap().len(), 44 + 5 * 960);
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
        let config = HostConfig {
            latency: None,
            report: None,
            idle_timeout: Duration::from_secs(30),
            stats: false,
            mic: MicSpec::None,
        };
        let mut host = Host::new(config, Box::new(FixedDelay(delay.clone())));
        let t0 = Instant::now();
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

    #[test]
    fn guest_strings_lose_control_characters_and_length() {
        assert_eq!(sanitize("Fire\0fox\n"), "Firefox");
        assert_eq!(sanitize(&"x".repeat(1000)).len(), 128);
        assert_eq!(sanitize("Équipe (guest)"), "Équipe (guest)");
    }
}
