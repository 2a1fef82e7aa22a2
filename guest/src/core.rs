//! The guest's side of a connection, sans-IO: what the port's bytes, the taps and the
//! module's commands make it do, and what it writes back, in the shape of
//! [`Session`] one level up.
//!
//! The driver ([`crate::thread`]) calls, with the time of the call:
//! - [`GuestCore::command`] with each [`Command`] from the module (streams, volume,
//!   the microphone's demand), in the order they were sent,
//! - [`GuestCore::connected`] / [`GuestCore::disconnected`] as the port comes and goes,
//! - [`GuestCore::handle_input`] with every chunk read from the port,
//! - [`GuestCore::poll`] whenever it wakes (it encodes what the taps hold, steps Opus's
//!   bitrate and runs the session's timers),
//! - [`GuestCore::transmit`] / [`GuestCore::consume`] to write bytes to the port,
//! - [`GuestCore::poll_event`] for what only the driver can do (hang up, hand the
//!   host's volume to the module),
//! - [`GuestCore::poll_timeout`] for when to call [`GuestCore::poll`] next.
//!
//! Each stream is announced in every session (a new epoch on every connect); media is
//! dropped, and counted, while no host is there, while the redirect sink is muted or
//! when the port cannot keep up (oldest first, by the session); stream control is never
//! dropped. While the port cannot keep up, Opus's bitrate steps down
//! ([`crate::congestion`]) and back up once it can.
//!
//! Two clocks come in with every call: `now` ([`Instant`]) for the session's timers and
//! `now_ns` (`CLOCK_MONOTONIC`, the graph's clock) for the taps. Tests pass both in
//! virtual time.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use melange_shim::tap::TapEncoder;
use melange_transport::message::{
    codec_bits, kind_bits, AccessUnit, Capabilities, CaptureDemand, CaptureDevice, Codec, MediaKind, MediaPacket, Role,
    StreamControl, StreamOpen, Volume, MAX_STREAMS,
};
use melange_transport::session::{CloseReason, Event, Session, SessionConfig};

use crate::camera::{CameraFeed, CameraReceiver};
use crate::congestion::{BitrateLadder, Step};
use crate::latency::LatencyEstimate;
use crate::mic::{MicFeed, MicReceiver};

/// Most media queued for the port, in time at the rate media is made; beyond it the
/// oldest is dropped. Heartbeats queue behind it, so it must stay well under the
/// peer's 5 s timeout.
pub const MAX_QUEUED_MEDIA_MS: u64 = 500;
/// The queue's cap in bytes is never under this, nor over [`MAX_QUEUED_MEDIA`] (a
/// second of stereo PCM): with the tap rings (half a second each) this bounds what a
/// slow host can make the guest hold.
pub const MIN_QUEUED_MEDIA: usize = 16 * 1024;
/// See [`MIN_QUEUED_MEDIA`].
pub const MAX_QUEUED_MEDIA: usize = 192 * 1024;
/// How often the bitrate ladder looks at the port's queue.
const CONGESTION_INTERVAL_NS: u64 = 100_000_000;
/// Longest the driver sleeps while taps send, so a tap that went is noticed.
const MAX_SOURCE_WAIT: Duration = Duration::from_millis(20);
/// Longest it sleeps while nothing is sent (no host, or muted): it only empties the
/// taps' rings (half a second each), so ten looks a second keep the CPU near zero.
/// What waits when a host comes back is dropped ([`GuestCore::skip_sources`]).
const IDLE_SOURCE_WAIT: Duration = Duration::from_millis(100);
/// Longest the driver sleeps at all.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Counters of the guest's connection, readable from any thread.
#[derive(Debug, Default)]
pub struct GuestStats {
    /// Sessions established.
    pub sessions: AtomicU64,
    /// Media packets written to a session.
    pub packets_sent: AtomicU64,
    /// Media packets dropped (no host, stream not announced, port too slow).
    pub packets_dropped: AtomicU64,
    /// Opus bitrate steps down and up since the start (the port fell behind, caught up).
    pub bitrate_steps_down: AtomicU64,
    /// See [`GuestStats::bitrate_steps_down`].
    pub bitrate_steps_up: AtomicU64,
    /// Bytes written to the port.
    pub bytes_written: AtomicU64,
    /// True while a session is established.
    pub connected: AtomicBool,
    /// Access units of broker streams queued for the host, and dropped instead (no
    /// host, or the port fell behind: see the session's counts too).
    pub units_sent: AtomicU64,
    /// See [`GuestStats::units_sent`].
    pub units_dropped: AtomicU64,
}

/// What the module tells the core, in order: a stream's open, its media and its close
/// arrive as they were sent, so a close never overtakes the stream's last packets.
pub enum Command {
    /// Whether a guest app records from the virtual microphone now.
    MicWanted(bool),
    /// Whether an app captures from the virtual camera.
    CameraWanted(bool),
    /// The redirect sink's volume changed; nothing is sent while it is muted.
    Volume(Volume),
    /// A stream whose media the core encodes from `encoder`'s tap. It closes by itself
    /// once the tap's writer is gone and everything it captured is sent.
    Tap(u32, StreamOpen, Box<TapEncoder>),
    /// A stream of the media broker (a player's encoded video or audio): announced in
    /// every session, fed with [`Command::AccessUnit`].
    Open(u32, StreamOpen),
    /// An access unit of a broker stream.
    AccessUnit(u32, AccessUnit),
    /// Control of a broker stream from its player (flush, pause, resume, end of stream).
    Control(u32, StreamControl),
    /// Ends a stream.
    Close(u32, String),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::MicWanted(w) => write!(f, "MicWanted({w})"),
            Command::CameraWanted(w) => write!(f, "CameraWanted({w})"),
            Command::Volume(v) => write!(f, "Volume({v:?})"),
            Command::Tap(id, _, _) => write!(f, "Tap({id})"),
            Command::Open(id, _) => write!(f, "Open({id})"),
            Command::AccessUnit(id, au) => write!(f, "AccessUnit({id}, {})", au.seq),
            Command::Control(id, c) => write!(f, "Control({id}, {c:?})"),
            Command::Close(id, _) => write!(f, "Close({id})"),
        }
    }
}

/// What only the driver can do, from [`GuestCore::poll_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum CoreEvent {
    /// The session ended by protocol (the host said goodbye, or it timed out): hang up
    /// the port, so that the next connection is a new session.
    HangUp,
    /// The host set the volume: the module puts it on the redirect sink, whose change
    /// comes back as [`Command::Volume`].
    HostVolume(Volume),
    /// For the media broker.
    Broker(BrokerNote),
}

/// What the media broker hears of the host and its streams.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerNote {
    /// A host is there, taking these kinds and codecs.
    HostReady(Capabilities),
    /// The host is gone: players fall back to decoding themselves.
    HostGone,
    /// The host refused a broker stream (or cannot take it), with the reason.
    Rejected(u32, String),
    /// The host asks a broker stream for a keyframe (also at the start of a session).
    KeyframeRequest(u32),
    /// The host's render delay of a broker stream, ns: the player's sink renders that
    /// much early.
    Latency(u32, u64),
}

/// The core's settings.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Software name sent in the handshake.
    pub software: String,
    /// The guest's clock identity (see `SessionConfig::clock_id`).
    pub clock_id: String,
}

/// A tap the core encodes.
#[derive(Debug)]
struct Source {
    encoder: Box<TapEncoder>,
    errors: u64,
    latency: LatencyEstimate,
    /// Packets dropped in sessions that ended, or before any (the current session
    /// counts its own).
    dropped: u64,
}

impl Source {
    fn new(encoder: Box<TapEncoder>, rate: u32) -> Self {
        let codec_ns = u64::from(encoder.delay()) * 1_000_000_000 / u64::from(rate.max(1));
        Self { encoder, errors: 0, latency: LatencyEstimate::new(codec_ns), dropped: 0 }
    }

    /// Hands the latency, once known, to the tap's owner, who tells the app.
    fn publish_latency(&self, id: u32) {
        if let Some(total) = self.latency.total_ns() {
            log::debug!("melange guest: stream {id}: latency {}", self.latency);
            self.encoder.stats().latency_ns.store(total.max(1), Ordering::Relaxed);
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct GuestCore {
    config: CoreConfig,
    stats: Arc<GuestStats>,
    /// The virtual microphone's feed, if the guest has one.
    mic: Option<MicReceiver>,
    /// The virtual camera's feed, if the guest has one.
    camera: Option<CameraReceiver>,
    /// The redirect sink's volume; nothing is sent while it is muted.
    volume: Volume,
    session: Option<Session>,
    /// Every live stream, announced or not.
    streams: BTreeMap<u32, StreamOpen>,
    /// Their taps.
    sources: BTreeMap<u32, Source>,
    /// The streams of the media broker.
    brokered: BTreeSet<u32>,
    /// Streams announced in the current session.
    announced: BTreeSet<u32>,
    /// Sessions started, for the session's epoch.
    epoch: u64,
    /// Opus's bitrate against the port; set by the first Opus stream.
    ladder: Option<BitrateLadder>,
    /// Media bytes handed to the session since the last congestion check, when that
    /// was, and the rate media is made at (bytes/s, smoothed).
    media_bytes: u64,
    congestion_at_ns: u64,
    media_rate: f64,
    events: VecDeque<CoreEvent>,
}

impl GuestCore {
    /// A core with no session yet; `mic` and `camera` are the virtual microphone's and
    /// camera's feeds, if the guest has them.
    pub fn new(config: CoreConfig, mic: Option<MicFeed>, camera: Option<CameraFeed>, stats: Arc<GuestStats>) -> Self {
        Self {
            config,
            stats,
            mic: mic.map(MicReceiver::new),
            camera: camera.map(CameraReceiver::new),
            volume: Volume::unity(),
            session: None,
            streams: BTreeMap::new(),
            sources: BTreeMap::new(),
            brokered: BTreeSet::new(),
            announced: BTreeSet::new(),
            epoch: 0,
            ladder: None,
            media_bytes: 0,
            congestion_at_ns: 0,
            media_rate: 0.0,
            events: VecDeque::new(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<GuestStats> {
        &self.stats
    }

    /// True while a session is there, established or not.
    pub fn has_session(&self) -> bool {
        self.session.is_some()
    }

    /// Applies one command from the module.
    pub fn command(&mut self, command: Command) {
        match command {
            Command::Volume(volume) => {
                if volume.same_as(&self.volume) {
                    return;
                }
                let unmuted = self.volume.mute && !volume.mute;
                self.volume = volume;
                if unmuted {
                    // What waited while muted is not sent late.
                    self.skip_sources();
                }
                self.send_volume();
            }
            Command::CameraWanted(wanted) => {
                if self.camera.as_mut().is_some_and(|c| c.set_wanted(wanted)) {
                    self.send_camera_demand();
                }
            }
            Command::MicWanted(wanted) => {
                if self.mic.as_mut().is_some_and(|m| m.set_wanted(wanted)) {
                    self.send_mic_demand();
                }
            }
            Command::Tap(id, open, mut encoder) => {
                let MediaKind::Audio(format) = &open.media else {
                    log::warn!("melange guest: stream {id}: a tap carries audio, not {}", open.media.name());
                    return;
                };
                if let Codec::Opus { bitrate } = open.codec {
                    // New streams start at the bitrate the port takes now.
                    let ladder = self.ladder.get_or_insert_with(|| BitrateLadder::new(bitrate));
                    let now = ladder.bitrate().min(bitrate);
                    if now != bitrate && encoder.set_bitrate(now).is_err() {
                        log::warn!("melange guest: stream {id}: cannot set the Opus bitrate to {now}");
                    }
                    encoder.stats().bitrate.store(u64::from(now), Ordering::Relaxed);
                }
                self.sources.insert(id, Source::new(encoder, format.rate));
                self.streams.insert(id, open);
                self.announce(id);
            }
            Command::Open(id, open) => {
                self.streams.insert(id, open);
                self.brokered.insert(id);
                self.announce(id);
            }
            Command::AccessUnit(id, au) => {
                let sent = match &mut self.session {
                    Some(s) if self.announced.contains(&id) => s.send_access_unit(id, &au).unwrap_or(false),
                    _ => false,
                };
                let counter = if sent { &self.stats.units_sent } else { &self.stats.units_dropped };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Command::Control(id, control) => {
                if let Some(s) = self.session.as_mut().filter(|_| self.announced.contains(&id)) {
                    let _ = s.send_stream_control(id, control);
                }
            }
            Command::Close(id, reason) => {
                self.sources.remove(&id);
                self.brokered.remove(&id);
                self.close(id, &reason);
            }
        }
    }

    /// The port is connected: a new session (a new epoch) starts.
    pub fn connected(&mut self, now: Instant, now_ns: u64) {
        self.epoch += 1;
        let mut cfg = SessionConfig::new(
            Role::Guest,
            self.config.software.clone(),
            Capabilities {
                codecs: codec_bits::PCM_S16LE | codec_bits::OPUS | codec_bits::ENCODED | codec_bits::RAW_I420,
                max_streams: MAX_STREAMS,
                kinds: kind_bits::AUDIO
                    | kind_bits::ENCODED_AUDIO
                    | kind_bits::ENCODED_VIDEO
                    | if self.camera.is_some() { kind_bits::CAMERA } else { 0 },
            },
        );
        cfg.epoch = (now_ns & !0xFFFF) | (self.epoch & 0xFFFF);
        cfg.max_queued_media = MAX_QUEUED_MEDIA;
        cfg.origin_ns = now_ns;
        cfg.clock_id = self.config.clock_id.clone();
        self.session = Some(Session::new(cfg, now));
        self.announced.clear();
        // The host reports each stream's render delay anew in the new session.
        for source in self.sources.values_mut() {
            source.latency.host_gone();
        }
    }

    /// The port is gone; true if a session ended with it.
    pub fn disconnected(&mut self) -> bool {
        self.keep_session_drops();
        self.announced.clear();
        if self.stats.connected.swap(false, Ordering::Relaxed) {
            self.events.push_back(CoreEvent::Broker(BrokerNote::HostGone));
        }
        if let Some(mic) = &mut self.mic {
            mic.end_session();
        }
        if let Some(camera) = &mut self.camera {
            camera.disconnected();
        }
        self.session.take().is_some()
    }

    /// Bytes read from the port; what they say is acted on at the next
    /// [`GuestCore::poll`], so that the microphone's packets of one wake-up are received
    /// together (of a backlog, the oldest are the ones beyond the real-time budget).
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        if let Some(s) = &mut self.session {
            s.handle_input(now, bytes);
        }
    }

    /// Acts on what the host sent, runs the session's timers, steps Opus's bitrate,
    /// encodes every whole packet waiting in the taps and closes the streams of taps
    /// that are gone.
    pub fn poll(&mut self, now: Instant, now_ns: u64) {
        if let Some(s) = &mut self.session {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
        self.handle_events(now);
        // Before encoding: the queue is what the port left of the last wake-up's writes.
        self.control_congestion(now_ns);
        self.encode_sources(now_ns);
    }

    /// How long the driver may wait before the next [`GuestCore::poll`], at most.
    pub fn poll_timeout(&self, now: Instant, now_ns: u64) -> Duration {
        let mut timeout = self
            .session
            .as_ref()
            .and_then(Session::poll_timeout)
            .map_or(MAX_WAIT, |t| t.saturating_duration_since(now))
            .min(MAX_WAIT);
        if self.sending() {
            if let Some(at) = self.sources.values().map(|s| s.encoder.wake_at(now_ns)).min() {
                // Capped, so a tap whose writer went without a wake-up is still noticed.
                timeout = timeout.min(Duration::from_nanos(at.saturating_sub(now_ns))).min(MAX_SOURCE_WAIT);
            }
        } else if !self.sources.is_empty() {
            timeout = timeout.min(IDLE_SOURCE_WAIT);
        }
        timeout
    }

    /// Bytes for the port.
    pub fn transmit(&self) -> &[u8] {
        self.session.as_ref().map_or(&[], |s| s.pending_output())
    }

    /// Marks `n` bytes of [`GuestCore::transmit`] as written.
    pub fn consume(&mut self, n: usize) {
        if let Some(s) = &mut self.session {
            s.consume_output(n);
            self.stats.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The next thing only the driver can do.
    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// Sends what the taps still hold and says goodbye; the driver flushes
    /// [`GuestCore::transmit`] after it.
    pub fn shutdown(&mut self, now_ns: u64) {
        self.encode_sources(now_ns);
        if let Some(s) = &mut self.session {
            s.close(CloseReason::Local("guest side shutting down".into()));
        }
    }

    /// The live streams' ids.
    pub fn streams(&self) -> impl Iterator<Item = u32> + '_ {
        self.streams.keys().copied()
    }

    /// Tells the host the redirect sink's volume, if a host is there (a new session is
    /// told at its start).
    fn send_volume(&mut self) {
        if let Some(s) = self.session.as_mut().filter(|s| s.is_established()) {
            let _ = s.send_volume(&self.volume);
        }
    }

    /// Tells the host whether the virtual microphone is wanted, if a host is there (a
    /// new session is told at its start).
    fn send_mic_demand(&mut self) {
        let (Some(mic), Some(s)) = (&self.mic, &mut self.session) else { return };
        let demand = mic.demand();
        if s.is_established() && s.demand_capture(demand).is_ok() {
            log::info!(
                "melange guest: {} the host's microphone",
                if demand.active { "a guest app records: asking for" } else { "no guest app records: releasing" }
            );
        }
    }

    /// Tells the host whether the virtual camera is wanted, if a host is there (a new
    /// session is told at its start).
    fn send_camera_demand(&mut self) {
        // A host that offers no camera (or predates it) is not asked.
        if !self.camera.as_ref().is_some_and(CameraReceiver::host_has_camera) {
            return;
        }
        let Some(s) = self.session.as_mut().filter(|s| s.is_established()) else { return };
        let active = self.camera.as_ref().is_some_and(CameraReceiver::wanted);
        let demand = CaptureDemand { device: CaptureDevice::Camera, active, frame_us: 0 };
        if s.demand_capture(demand).is_ok() {
            log::info!(
                "melange guest: {} the host's camera",
                if demand.active { "a guest app captures: asking for" } else { "no guest app captures: releasing" }
            );
        }
    }

    fn handle_events(&mut self, now: Instant) {
        let mut mic_burst: Vec<MediaPacket> = Vec::new();
        let mut mic_stream = 0;
        while let Some(event) = self.session.as_mut().and_then(Session::poll_event) {
            if let Event::Media { stream, packet } = event {
                if stream != mic_stream {
                    self.receive_mic(now, mic_stream, &mut mic_burst);
                    mic_stream = stream;
                }
                mic_burst.push(packet);
                continue;
            }
            self.receive_mic(now, mic_stream, &mut mic_burst);
            self.handle_event(now, event);
            if self.session.is_none() {
                return;
            }
        }
        self.receive_mic(now, mic_stream, &mut mic_burst);
    }

    fn handle_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Established(peer) => {
                log::info!(
                    "melange guest: connected to {} (protocol v{}, session {:#x})",
                    peer.software,
                    peer.version,
                    peer.epoch
                );
                self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                self.stats.connected.store(true, Ordering::Relaxed);
                // Streams start with what the taps capture from now on.
                self.skip_sources();
                self.send_volume();
                if self.mic.as_ref().is_some_and(MicReceiver::wanted) {
                    self.send_mic_demand();
                }
                if let Some(camera) = &mut self.camera {
                    camera.connected(&peer.capabilities);
                    if camera.wanted() {
                        self.send_camera_demand();
                    }
                }
                self.events.push_back(CoreEvent::Broker(BrokerNote::HostReady(peer.capabilities.clone())));
                let ids: Vec<u32> = self.streams.keys().copied().collect();
                for id in ids {
                    self.announce(id);
                    if self.brokered.contains(&id) && self.announced.contains(&id) {
                        // A new session starts from a keyframe.
                        self.events.push_back(CoreEvent::Broker(BrokerNote::KeyframeRequest(id)));
                    }
                }
            }
            Event::StreamRejected { stream, reason } => {
                log::warn!("melange guest: host refused stream {stream}: {reason}");
                self.announced.remove(&stream);
                if self.brokered.remove(&stream) {
                    self.streams.remove(&stream);
                    self.events.push_back(CoreEvent::Broker(BrokerNote::Rejected(stream, reason)));
                }
            }
            Event::StreamLatency { stream, render_ns } if self.brokered.contains(&stream) => {
                self.events.push_back(CoreEvent::Broker(BrokerNote::Latency(stream, render_ns)));
            }
            Event::StreamLatency { stream, render_ns } => {
                if let Some(source) = self.sources.get_mut(&stream) {
                    source.latency.host_render(render_ns);
                    source.publish_latency(stream);
                }
            }
            Event::Closed(reason) => {
                log::warn!("melange guest: session closed: {reason}");
                self.disconnected();
                self.events.push_back(CoreEvent::HangUp);
            }
            Event::Error(e) => log::debug!("melange guest: skipped bad input from host: {e}"),
            Event::StreamOpened { stream, open } if matches!(open.media, MediaKind::Camera(_)) => {
                let taken = match &mut self.camera {
                    Some(camera) => camera.open(stream, &open),
                    None => Err("this guest has no virtual camera".into()),
                };
                match taken {
                    Ok(()) => log::info!("melange guest: the host's camera arrives as stream {stream}"),
                    Err(reason) => {
                        log::warn!("melange guest: refusing host stream {stream}: {reason}");
                        if let Some(s) = &mut self.session {
                            s.reject_stream(stream, &reason);
                        }
                    }
                }
            }
            // The other stream a host opens is the microphone.
            Event::StreamOpened { stream, open } => {
                let taken = match &mut self.mic {
                    Some(mic) => mic.open(now, stream, &open),
                    None => Err(crate::mic::MicError::NoSource),
                };
                match taken {
                    Ok(()) => log::info!(
                        "melange guest: the host's microphone arrives as stream {stream}, {}",
                        open.codec.name()
                    ),
                    Err(reason) => {
                        log::warn!("melange guest: refusing host stream {stream}: {reason}");
                        if let Some(s) = &mut self.session {
                            s.reject_stream(stream, &reason.to_string());
                        }
                    }
                }
            }
            Event::Media { .. } => {}
            Event::StreamClosed { stream, reason } => {
                if let Some(camera) = &mut self.camera {
                    if camera.close(stream, &reason) {
                        log::info!("melange guest: the host's camera stream ended ({reason})");
                    }
                }
                if let Some(mic) = &mut self.mic {
                    if mic.close(stream) {
                        log::info!("melange guest: the host's microphone stopped ({reason}); {}", mic.describe());
                    }
                }
            }
            Event::Volume(volume) => {
                log::info!("melange guest: the host sets the volume to {volume}");
                self.events.push_back(CoreEvent::HostVolume(volume));
            }
            // Host-side requests; a guest never gets them from a well-behaved host.
            Event::CaptureDemand(_) | Event::PeerRestarted => {}
            Event::StreamControl { stream, control: StreamControl::KeyframeRequest }
                if self.brokered.contains(&stream) =>
            {
                self.events.push_back(CoreEvent::Broker(BrokerNote::KeyframeRequest(stream)));
            }
            Event::AccessUnit { stream, au } => {
                let Some(camera) = self.camera.as_mut().filter(|c| c.is_camera(stream)) else { return };
                if camera.unit(au) == crate::camera::Delivery::WantKeyframe {
                    if let Some(s) = &mut self.session {
                        let _ = s.send_stream_control(stream, StreamControl::KeyframeRequest);
                    }
                }
            }
            Event::StreamControl { .. } => {}
        }
    }

    /// Hands the microphone the packets of `stream` that arrived together.
    fn receive_mic(&mut self, now: Instant, stream: u32, burst: &mut Vec<MediaPacket>) {
        if let (Some(mic), false) = (&mut self.mic, burst.is_empty()) {
            mic.media(now, stream, burst);
        }
        burst.clear();
    }

    fn announce(&mut self, id: u32) {
        let (Some(s), Some(open)) = (&mut self.session, self.streams.get(&id)) else { return };
        if !s.is_established() {
            return;
        }
        if s.peer().is_some_and(|p| !p.capabilities.accepts(&open.media, &open.codec)) {
            let reason = format!("melange-host does not take {} {}", open.media.name(), open.codec.name());
            log::warn!("melange guest: stream {id}: {reason}");
            if self.brokered.remove(&id) {
                self.streams.remove(&id);
                self.events.push_back(CoreEvent::Broker(BrokerNote::Rejected(id, reason)));
            }
            return;
        }
        match s.open_stream(id, open) {
            Ok(()) => {
                self.announced.insert(id);
            }
            Err(e) => log::warn!("melange guest: cannot announce stream {id}: {e}"),
        }
    }

    /// Drops, unencoded, what waits in the taps: no host takes it, or it is older than
    /// the session that starts now. Counted as dropped.
    fn skip_sources(&mut self) {
        for source in self.sources.values_mut() {
            let skipped = source.encoder.skip_waiting();
            source.dropped += skipped;
            source.encoder.stats().packets_dropped.store(source.dropped, Ordering::Relaxed);
            self.stats.packets_dropped.fetch_add(skipped, Ordering::Relaxed);
        }
    }

    /// True while a host takes media: a session is established and the redirect sink
    /// is not muted (muting sends nothing, not encoded silence).
    fn sending(&self) -> bool {
        !self.volume.mute && self.session.as_ref().is_some_and(Session::is_established)
    }

    /// Encodes every whole packet waiting in the taps and closes the streams of taps
    /// that are gone.
    fn encode_sources(&mut self, now_ns: u64) {
        if !self.sending() {
            self.skip_sources();
        }
        let mut finished = Vec::new();
        let ids: Vec<u32> = self.sources.keys().copied().collect();
        for id in ids {
            while let Some(source) = self.sources.get_mut(&id) {
                match source.encoder.next_packet() {
                    Some(Ok(packet)) => {
                        if self.forward_media(id, &packet) {
                            self.sample_latency(id, now_ns, packet.pts_ns);
                        }
                    }
                    Some(Err(e)) => {
                        source.errors += 1;
                        if source.errors.is_power_of_two() {
                            log::warn!("melange guest: stream {id}: encode failed ({} so far): {e}", source.errors);
                        }
                    }
                    None => {
                        if source.encoder.is_finished() {
                            finished.push(id);
                        }
                        break;
                    }
                }
            }
        }
        for id in finished {
            if let Some(source) = self.sources.remove(&id) {
                let dropped = source.encoder.stats().overflow_bytes.load(Ordering::Relaxed);
                if dropped > 0 {
                    log::warn!("melange guest: stream {id}: the encoder fell behind, {dropped} bytes dropped");
                }
                let gaps = source.encoder.stats().gap_frames.load(Ordering::Relaxed);
                if gaps > 0 {
                    log::info!("melange guest: stream {id}: {gaps} frames of silence where the graph skipped the tap");
                }
            }
            self.close(id, "app stopped");
            log::info!("melange guest: stream {id} closed (app stopped)");
        }
    }

    /// Feeds a sent packet's timing to the stream's latency estimate.
    fn sample_latency(&mut self, id: u32, now_ns: u64, pts_ns: u64) {
        let rtt = self.session.as_ref().and_then(Session::rtt);
        let Some(source) = self.sources.get_mut(&id) else { return };
        if let Some(rtt) = rtt {
            source.latency.round_trip(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
        }
        if source.latency.packet_sent(now_ns, pts_ns) {
            source.publish_latency(id);
        }
    }

    /// Queues a packet for the host; false if it was dropped. The session drops the
    /// oldest media itself when the port falls behind ([`MAX_QUEUED_MEDIA`]).
    fn forward_media(&mut self, id: u32, packet: &MediaPacket) -> bool {
        let sent = match &mut self.session {
            Some(s) if self.announced.contains(&id) => s.send_media(id, packet).is_ok(),
            _ => false,
        };
        self.media_bytes += packet.data.len() as u64;
        let counter = if sent { &self.stats.packets_sent } else { &self.stats.packets_dropped };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(source) = self.sources.get_mut(&id) {
            let stats = source.encoder.stats();
            if sent {
                stats.packets_sent.fetch_add(1, Ordering::Relaxed);
            } else {
                source.dropped += 1;
            }
            let in_session = self.session.as_ref().map_or(0, |s| s.media_dropped(id));
            stats.packets_dropped.store(source.dropped + in_session, Ordering::Relaxed);
        }
        sent
    }

    /// Folds the drops the ending session counted into each stream's own.
    fn keep_session_drops(&mut self) {
        let Some(s) = &self.session else { return };
        for (id, source) in &mut self.sources {
            source.dropped += s.media_dropped(*id);
        }
    }

    /// Steps Opus's bitrate down while the port falls behind, and up once it keeps up
    /// again (see [`crate::congestion`]).
    fn control_congestion(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.congestion_at_ns);
        if elapsed < CONGESTION_INTERVAL_NS {
            return;
        }
        let rate = std::mem::take(&mut self.media_bytes) as f64 * 1e9 / elapsed as f64;
        // Half-second smoothing: a packet more or less in one interval is no trend.
        self.media_rate += (rate - self.media_rate) * (elapsed as f64 / 5e8).min(1.0);
        self.congestion_at_ns = now_ns;
        if let Some(s) = &mut self.session {
            let cap = (self.media_rate * MAX_QUEUED_MEDIA_MS as f64 / 1000.0) as usize;
            s.set_max_queued_media(cap.clamp(MIN_QUEUED_MEDIA, MAX_QUEUED_MEDIA));
        }
        let Some(ladder) = &mut self.ladder else { return };
        let queued = self.session.as_ref().map_or(0, Session::queued_media_bytes);
        let Some(step) = ladder.update(now_ns, queued, self.media_rate) else { return };
        let (bitrate, counter) = match step {
            Step::Down(b) => {
                log::warn!(
                    "melange guest: the port is behind ({} kB queued): Opus bitrate down to {} kbit/s",
                    queued / 1000,
                    b / 1000
                );
                (b, &self.stats.bitrate_steps_down)
            }
            Step::Up(b) => {
                log::info!("melange guest: the port keeps up again: Opus bitrate up to {} kbit/s", b / 1000);
                (b, &self.stats.bitrate_steps_up)
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        for source in self.sources.values_mut() {
            if matches!(source.encoder.set_bitrate(bitrate), Ok(true)) {
                source.encoder.stats().bitrate.store(u64::from(bitrate), Ordering::Relaxed);
            }
        }
    }

    fn close(&mut self, id: u32, reason: &str) {
        self.streams.remove(&id);
        if self.announced.remove(&id) {
            if let Some(s) = &mut self.session {
                s.close_stream(id, reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core against a real host [`Session`] over a virtual port, in virtual time:
    //! the taps are real tap rings written as a guest graph would, one quantum a cycle.

    use super::*;
    use melange_shim::opus::Application;
    use melange_shim::render::{render_ring, RenderConfig};
    use melange_shim::tap::{tap_ring, TapWriter};
    use melange_transport::message::{AppInfo, AudioFormat, CaptureDevice};

    const RATE: u32 = 48_000;
    /// The guest graph's cycle, frames (5.3 ms).
    const QUANTUM: usize = 256;
    /// 10 ms packets.
    const PACKET: u32 = 480;
    const MS: u64 = 1_000_000;

    fn stereo() -> AudioFormat {
        AudioFormat { rate: RATE, channels: 2, positions: vec![3, 4] }
    }

    /// A tap as the module makes one, and the graph end that writes it.
    fn tap(codec: Codec) -> (StreamOpen, TapEncoder, TapWriter) {
        let sample_bytes = if matches!(codec, Codec::PcmS16Le) { 2 } else { 4 };
        let (writer, reader) = tap_ring(RATE as usize * 2 * sample_bytes / 2, 2 * sample_bytes, RATE);
        let encoder = TapEncoder::new(reader, &stereo(), &codec, PACKET, Application::RestrictedLowDelay).unwrap();
        let open = StreamOpen {
            media: MediaKind::Audio(stereo()),
            codec,
            frame_samples: PACKET,
            app: AppInfo { name: "app".into(), ..Default::default() },
            codec_data: Vec::new(),
        };
        (open, encoder, writer)
    }

    /// One app's tap, played by the virtual graph: each cycle's samples are the cycle's
    /// number, so what arrives can be traced back to when it was captured.
    struct Graph {
        writer: Option<TapWriter>,
        sample_bytes: usize,
        cycles: u64,
    }

    /// The core, a real host session on the other end of a virtual port, and a clock.
    struct World {
        core: GuestCore,
        host: Option<Session>,
        t0: Instant,
        /// Virtual time since `t0`, ns.
        t: u64,
        graphs: Vec<Graph>,
        /// Bytes a second the port moves from guest to host (`None`: any).
        port_rate: Option<u64>,
        port_credit: f64,
        shuttled_at: u64,
        /// What the host's session saw, with the time it saw it.
        seen: Vec<(u64, Event)>,
        core_events: Vec<CoreEvent>,
        /// Calls of [`GuestCore::poll`].
        wakeups: u64,
    }

    impl World {
        fn new(mic: Option<MicFeed>) -> Self {
            let config = CoreConfig { software: "test guest".into(), clock_id: "test".into() };
            Self {
                core: GuestCore::new(config, mic, None, Arc::default()),
                host: None,
                t0: Instant::now(),
                t: 0,
                graphs: Vec::new(),
                port_rate: None,
                port_credit: 0.0,
                shuttled_at: 0,
                seen: Vec::new(),
                core_events: Vec::new(),
                wakeups: 0,
            }
        }

        fn now(&self) -> (Instant, u64) {
            (self.t0 + Duration::from_nanos(self.t), 1_000_000_000 + self.t)
        }

        /// Adds an app's tap to the core and to the graph; returns its stream id.
        fn add_tap(&mut self, id: u32, codec: Codec) -> usize {
            let sample_bytes = if matches!(codec, Codec::PcmS16Le) { 2 } else { 4 };
            let (open, encoder, writer) = tap(codec);
            self.core.command(Command::Tap(id, open, Box::new(encoder)));
            self.graphs.push(Graph { writer: Some(writer), sample_bytes, cycles: 0 });
            self.graphs.len() - 1
        }

        fn connect(&mut self) {
            self.connect_taking(codec_bits::PCM_S16LE | codec_bits::OPUS, kind_bits::AUDIO);
        }

        /// Connects to a host that takes `codecs` of `kinds`.
        fn connect_taking(&mut self, codecs: u64, kinds: u32) {
            let (now, now_ns) = self.now();
            self.core.connected(now, now_ns);
            let caps = Capabilities { codecs, max_streams: MAX_STREAMS, kinds };
            self.host = Some(Session::new(SessionConfig::new(Role::Host, "test host", caps), now));
        }

        /// The port drops: both ends see it.
        fn disconnect(&mut self) {
            self.core.disconnected();
            self.host = None;
        }

        fn cycle_ns() -> u64 {
            QUANTUM as u64 * 1_000_000_000 / u64::from(RATE)
        }

        /// Runs for `ms` of virtual time, waking the core only when it asks to be (its
        /// poll timeout) or when the port has bytes for it, as the driver does.
        fn run(&mut self, ms: u64) {
            let end = self.t + ms * MS;
            let mut next_cycle = (self.t / Self::cycle_ns() + 1) * Self::cycle_ns();
            while self.t < end {
                let (now, now_ns) = self.now();
                let wake = self.t + u64::try_from(self.core.poll_timeout(now, now_ns).as_nanos()).unwrap();
                let step = wake.min(next_cycle).min(end).max(self.t + 1);
                self.t = step;
                if self.t >= next_cycle {
                    self.graph_cycle(next_cycle);
                    next_cycle += Self::cycle_ns();
                }
                let inbound = self.shuttle();
                if self.t >= wake || inbound {
                    let (now, now_ns) = self.now();
                    self.core.poll(now, now_ns);
                    self.wakeups += 1;
                }
                // Commands make events too; the driver takes them after every command.
                self.core_events.extend(std::iter::from_fn(|| self.core.poll_event()));
            }
        }

        /// One graph cycle: every tap gets a quantum stamped with the cycle's time.
        fn graph_cycle(&mut self, at: u64) {
            let pts = 1_000_000_000 + at;
            for g in &mut self.graphs {
                g.cycles += 1;
                let Some(w) = &mut g.writer else { continue };
                let value = (g.cycles % 30_000) as i16;
                let bytes: Vec<u8> = if g.sample_bytes == 2 {
                    std::iter::repeat_n(value.to_le_bytes(), QUANTUM * 2).flatten().collect()
                } else {
                    std::iter::repeat_n((f32::from(value) / 32768.0).to_le_bytes(), QUANTUM * 2).flatten().collect()
                };
                w.push(&bytes, pts, pts);
            }
        }

        /// Moves bytes both ways over the virtual port; true if the guest got some.
        fn shuttle(&mut self) -> bool {
            let (now, _) = self.now();
            let Some(host) = &mut self.host else { return false };
            let mut room = usize::MAX;
            let dt = self.t - std::mem::replace(&mut self.shuttled_at, self.t);
            if let Some(rate) = self.port_rate {
                // Bytes at `rate`, in bursts of up to 10 ms.
                self.port_credit = (self.port_credit + rate as f64 * dt as f64 / 1e9).min(rate as f64 / 100.0);
                room = self.port_credit as usize;
            }
            let out = self.core.transmit();
            let n = out.len().min(room);
            host.handle_input(now, &out[..n]);
            self.core.consume(n);
            self.port_credit -= n as f64;
            if host.poll_timeout().is_some_and(|t| t <= now) {
                host.handle_timeout(now);
            }
            let t = self.t;
            self.seen.extend(std::iter::from_fn(|| host.poll_event()).map(|e| (t, e)));
            let back = host.pending_output().to_vec();
            host.consume_output(back.len());
            self.core.handle_input(now, &back);
            !back.is_empty()
        }

        fn host(&mut self) -> &mut Session {
            self.host.as_mut().unwrap()
        }

        /// The media the host got for `stream`: (seq, pts relative to the run's start).
        fn media(&self, stream: u32) -> Vec<(u32, u64)> {
            self.seen
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::Media { stream: s, packet } if *s == stream => {
                        Some((packet.seq, packet.pts_ns - 1_000_000_000))
                    }
                    _ => None,
                })
                .collect()
        }

        fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
            self.seen.iter().filter(|(_, e)| f(e)).count()
        }
    }

    fn assert_contiguous(media: &[(u32, u64)]) {
        for w in media.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "a gap in the sequence: {media:?}");
            assert!((w[1].1 - w[0].1).abs_diff(10 * MS) < 1000, "pts does not advance by the packet: {media:?}");
        }
    }

    #[test]
    fn a_stream_is_announced_then_every_packet_then_its_end_in_that_order() {
        let mut w = World::new(None);
        w.connect();
        w.add_tap(7, Codec::PcmS16Le);
        w.run(300);
        // The app goes: its tap's writer is dropped.
        w.graphs[0].writer = None;
        w.run(100);
        let order: Vec<&str> = w
            .seen
            .iter()
            .filter_map(|(_, e)| match e {
                Event::StreamOpened { stream: 7, .. } => Some("open"),
                Event::Media { stream: 7, .. } => Some("media"),
                Event::StreamClosed { stream: 7, .. } => Some("close"),
                _ => None,
            })
            .collect();
        assert_eq!(order.first(), Some(&"open"));
        assert_eq!(order.last(), Some(&"close"));
        assert_eq!(order.iter().filter(|o| **o != "media").count(), 2, "{order:?}");
        let media = w.media(7);
        assert_contiguous(&media);
        // 300 ms of cycles: about 29 whole packets, and the last partial one padded.
        assert!((29..=32).contains(&media.len()), "{} packets", media.len());
        assert_eq!(media[0].0, 0);
        assert_eq!(w.core.streams().count(), 0);
        assert_eq!(w.core.stats().packets_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_new_session_announces_every_live_stream_again_and_skips_what_waited() {
        let mut w = World::new(None);
        w.add_tap(1, Codec::PcmS16Le);
        w.add_tap(2, Codec::Opus { bitrate: 64_000 });
        // Taps before any host: nothing is kept for later.
        w.run(200);
        w.connect();
        w.run(200);
        let first = (w.media(1), w.media(2));
        assert!(first.0.len() >= 18 && first.1.len() >= 18, "{} {}", first.0.len(), first.1.len());
        for m in [&first.0, &first.1] {
            assert!(m[0].1 >= 190 * MS, "audio from before the session was sent: {m:?}");
            assert_contiguous(m);
        }
        w.disconnect();
        w.run(300);
        w.seen.clear();
        w.connect();
        let back = w.t;
        w.run(200);
        assert_eq!(w.count(|e| matches!(e, Event::StreamOpened { .. })), 2, "both streams again");
        for id in [1, 2] {
            let m = w.media(id);
            assert!(!m.is_empty());
            assert!(m[0].1 + 10 * MS >= back, "stream {id}: audio from the outage was sent late: {m:?}");
            assert_contiguous(&m);
        }
        let stats = w.core.stats();
        assert_eq!(stats.sessions.load(Ordering::Relaxed), 2);
        // What the taps captured without a host was dropped, and counted.
        assert!(stats.packets_dropped.load(Ordering::Relaxed) >= 2 * 45, "{stats:?}");
    }

    #[test]
    fn a_muted_sink_sends_nothing_and_unmuting_resumes_with_fresh_audio() {
        let mut w = World::new(None);
        w.connect();
        w.add_tap(1, Codec::PcmS16Le);
        w.run(100);
        let mut muted = Volume::unity();
        muted.mute = true;
        w.core.command(Command::Volume(muted.clone()));
        w.run(20);
        let before = w.media(1).len();
        w.run(500);
        assert!(w.media(1).len() <= before + 1, "media sent while muted");
        let unmuted_at = w.t;
        w.core.command(Command::Volume(Volume::unity()));
        w.run(100);
        let after: Vec<_> = w.media(1).into_iter().skip(before + 1).collect();
        assert!(after.len() >= 8, "{after:?}");
        assert!(after[0].1 + 10 * MS >= unmuted_at, "audio from the mute was sent: {after:?}");
        let volumes: Vec<bool> = w
            .seen
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Volume(v) => Some(v.mute),
                _ => None,
            })
            .collect();
        assert_eq!(volumes.last(), Some(&false));
        assert!(volumes.contains(&true), "{volumes:?}");
    }

    #[test]
    fn a_slow_port_drops_the_oldest_media_and_steps_opus_down_then_back_up() {
        let mut w = World::new(None);
        w.connect();
        w.add_tap(1, Codec::Opus { bitrate: 128_000 });
        w.run(500);
        let stats = w.core.stats().clone();
        // 128 kbit/s is 16 kB/s; the port takes 6 kB/s for 5 s.
        w.port_rate = Some(6_000);
        w.run(5_000);
        let down = stats.bitrate_steps_down.load(Ordering::Relaxed);
        assert!(down >= 1, "no step down");
        // Until the steps took effect the port could not take it all: the oldest went.
        assert!(w.core.sources[&1].encoder.stats().packets_dropped.load(Ordering::Relaxed) > 0);
        assert!(w.core.sources[&1].encoder.stats().bitrate.load(Ordering::Relaxed) < 128_000);
        w.port_rate = None;
        w.run(10_000);
        assert!(stats.bitrate_steps_up.load(Ordering::Relaxed) >= 1, "no step back up");
        // Control is never dropped: the stream is still open on the host, and its end
        // arrives after its last packet.
        w.graphs[0].writer = None;
        w.run(100);
        assert!(matches!(w.seen.last(), Some((_, Event::StreamClosed { stream: 1, .. }))));
        let media = w.media(1);
        assert!(media.windows(2).all(|p| p[1].0 > p[0].0), "out of order");
    }

    #[test]
    fn one_wake_up_serves_every_tap_and_comes_once_a_packet() {
        let mut w = World::new(None);
        w.connect();
        for id in 1..=4 {
            w.add_tap(id, Codec::Opus { bitrate: 64_000 });
        }
        w.run(200);
        let (wakeups, packets) = (w.wakeups, w.media(1).len());
        w.run(2_000);
        let wakeups = w.wakeups - wakeups;
        let packets = w.media(1).len() - packets;
        assert!((195..=205).contains(&packets), "{packets} packets of each tap in 2 s");
        // The host's replies (heartbeats, the latency it reports) wake it too, rarely.
        assert!(wakeups <= packets as u64 * 11 / 10, "{wakeups} wake-ups for {packets} packets of 4 taps");
    }

    #[test]
    fn the_hosts_goodbye_hangs_up_and_its_volume_goes_to_the_module() {
        let mut w = World::new(None);
        w.connect();
        w.run(50);
        let mut v = Volume::unity();
        v.channels = vec![0.5, 0.5];
        w.host().send_volume(&v).unwrap();
        w.run(20);
        let caps = Capabilities { codecs: 3, max_streams: MAX_STREAMS, kinds: kind_bits::AUDIO };
        assert_eq!(w.core_events, [CoreEvent::Broker(BrokerNote::HostReady(caps)), CoreEvent::HostVolume(v)]);
        w.host().close(CloseReason::Local("bye".into()));
        w.run(20);
        let end = &w.core_events[w.core_events.len() - 2..];
        assert_eq!(end, [CoreEvent::Broker(BrokerNote::HostGone), CoreEvent::HangUp]);
        assert!(!w.core.has_session());
        assert!(!w.core.stats().connected.load(Ordering::Relaxed));
    }

    #[test]
    fn the_microphone_is_asked_for_at_every_change_and_in_every_session() {
        let config =
            RenderConfig { rate: RATE, channels: 1, latency_frames: 960, trim: true, quantum: 256, packet_frames: 480 };
        let (producer, render) = render_ring(config, 24_000);
        let mic = MicFeed { producer, stats: render.stats().clone(), frame_us: 10_000 };
        let mut w = World::new(Some(mic));
        w.core.command(Command::MicWanted(true));
        w.connect();
        w.run(50);
        w.core.command(Command::MicWanted(false));
        w.run(20);
        w.disconnect();
        w.core.command(Command::MicWanted(true));
        w.connect();
        w.run(50);
        let demands: Vec<(bool, u32)> = w
            .seen
            .iter()
            .filter_map(|(_, e)| match e {
                Event::CaptureDemand(d) if d.device == CaptureDevice::Microphone => Some((d.active, d.frame_us)),
                _ => None,
            })
            .collect();
        assert_eq!(demands, vec![(true, 10_000), (false, 10_000), (true, 10_000)]);
    }

    fn video_open() -> StreamOpen {
        use melange_transport::message::VideoFormat;
        StreamOpen {
            media: MediaKind::EncodedVideo(VideoFormat {
                width: 640,
                height: 360,
                framerate_num: 30,
                framerate_den: 1,
            }),
            codec: Codec::Vp8,
            frame_samples: 0,
            app: AppInfo { name: "player".into(), ..Default::default() },
            codec_data: Vec::new(),
        }
    }

    fn access_unit(seq: u32, key: bool) -> AccessUnit {
        use melange_transport::message::au_flags;
        AccessUnit {
            seq,
            flags: if key { au_flags::KEYFRAME } else { 0 },
            pts_ns: u64::from(seq) * 33_000_000,
            dts_ns: 0,
            duration_ns: 33_000_000,
            data: vec![seq as u8; 30_000],
        }
    }

    /// A broker stream is announced in every session and asks its player for a
    /// keyframe at each start; its units go after the audio of the same wake-up.
    #[test]
    fn broker_streams_are_announced_in_every_session_and_start_at_a_keyframe() {
        let all = (codec_bits::PCM_S16LE | codec_bits::ENCODED, kind_bits::AUDIO | kind_bits::ENCODED_VIDEO);
        let mut w = World::new(None);
        w.add_tap(1, Codec::PcmS16Le);
        w.core.command(Command::Open(50, video_open()));
        w.connect_taking(all.0, all.1);
        w.run(30);
        assert!(w.core_events.contains(&CoreEvent::Broker(BrokerNote::KeyframeRequest(50))), "{:?}", w.core_events);
        for seq in 0..3 {
            w.core.command(Command::AccessUnit(50, access_unit(seq, seq == 0)));
            w.run(15);
        }
        let units: Vec<u32> = w
            .seen
            .iter()
            .filter_map(|(_, e)| if let Event::AccessUnit { stream: 50, au } = e { Some(au.seq) } else { None })
            .collect();
        assert_eq!(units, [0, 1, 2]);
        assert!(w.media(1).len() >= 5, "the tap goes on beside the video");
        w.disconnect();
        w.core_events.clear();
        w.seen.clear();
        w.connect_taking(all.0, all.1);
        w.run(30);
        assert!(w.count(|e| matches!(e, Event::StreamOpened { stream: 50, .. })) == 1);
        assert!(w.core_events.contains(&CoreEvent::Broker(BrokerNote::KeyframeRequest(50))));
        // The host asks too; the player hears it.
        w.host().send_stream_control(50, StreamControl::KeyframeRequest).unwrap();
        w.core_events.clear();
        w.run(10);
        assert_eq!(w.core_events, [CoreEvent::Broker(BrokerNote::KeyframeRequest(50))]);
    }

    /// A host that does not take a broker stream's kind is never offered it: the
    /// player is told why and decodes itself.
    #[test]
    fn a_broker_stream_the_host_cannot_take_is_refused_to_its_player() {
        let mut w = World::new(None);
        w.connect();
        w.run(20);
        w.core.command(Command::Open(7, video_open()));
        w.run(20);
        assert_eq!(w.count(|e| matches!(e, Event::StreamOpened { .. })), 0);
        let refused = w.core_events.iter().find_map(|e| match e {
            CoreEvent::Broker(BrokerNote::Rejected(7, reason)) => Some(reason.clone()),
            _ => None,
        });
        assert_eq!(refused.as_deref(), Some("melange-host does not take encoded video vp8"), "{:?}", w.core_events);
        assert_eq!(w.core.streams().count(), 0);
    }
}
