//! The guest's link manager: one I/O thread that owns the port and the session.
//!
//! Streams are registered through a [`LinkHandle`] from any thread. The I/O thread
//! (re)connects by itself, starts a new session (a new epoch) on every connect,
//! announces every live stream in it, and forwards media.
//!
//! Taps hand the thread their [`TapEncoder`]: it encodes every tap itself, waking when
//! the guest graph cycle that completes a packet has run ([`TapEncoder::wake_at`]).
//! Taps share the graph's clock, so one wake-up serves all of them, and a packet goes
//! from the tap ring to the port without crossing another thread. Wake-ups, not
//! encoding, dominate a stream's CPU cost in a VM. Media is dropped, and
//! counted, while no host is there or the port cannot keep up (oldest first, by the
//! session); stream control is never dropped: the current set of streams is
//! re-announced after every reconnect. While the port cannot keep up, Opus's bitrate
//! steps down ([`crate::congestion`]) and back up once it can.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use melange_transport::message::{codec_bits, Capabilities, Codec, MediaKind, MediaPacket, Role, StreamOpen, Volume};
use melange_transport::port::{Link, LinkEvent, PortSpec, Waker};
use melange_transport::session::{Event, Session, SessionConfig};

use crate::clock;
use crate::congestion::{BitrateLadder, Step};
use crate::latency::LatencyEstimate;
use crate::mic::{MicFeed, MicReceiver};
use crate::tap::TapEncoder;

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
/// Stream items (mostly media packets) that may wait between the encoders and the I/O
/// thread.
const STREAM_QUEUE: usize = 512;
/// Longest the I/O thread sleeps while it has taps, so one that went is noticed.
const MAX_SOURCE_WAIT: Duration = Duration::from_millis(20);
/// Longest it sleeps while no host is there: it only empties the taps' rings (half a
/// second each), so ten looks a second keep the module's CPU near zero. What waits
/// when a host comes back is dropped ([`IoThread::skip_sources`]).
const IDLE_SOURCE_WAIT: Duration = Duration::from_millis(100);
/// Streams the guest may announce at once.
pub const MAX_STREAMS: u16 = 64;

/// Link counters, readable from any thread.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Sessions established.
    pub sessions: AtomicU64,
    /// Media packets written to a session.
    pub packets_sent: AtomicU64,
    /// Media packets dropped (no host, stream not announced, port too slow).
    pub packets_dropped: AtomicU64,
    /// Opus bitrate steps down and up since the start (the port fell behind, caught up).
    pub bitrate_steps_down: AtomicU64,
    /// See [`LinkStats::bitrate_steps_down`].
    pub bitrate_steps_up: AtomicU64,
    /// Bytes written to the port.
    pub bytes_written: AtomicU64,
    /// True while a session is established.
    pub connected: AtomicBool,
}

/// What taps and encoders tell the I/O thread about a stream. One channel carries all
/// of it, so a stream's open, media and close arrive in the order they were sent: a
/// close never overtakes the stream's last packets.
enum StreamItem {
    /// Whether a guest app records from the virtual microphone now.
    MicWanted(bool),
    /// The redirect sink's volume changed.
    Volume(Volume),
    Open(u32, StreamOpen),
    Tap(u32, StreamOpen, Box<TapEncoder>),
    Media(u32, MediaPacket),
    Close(u32, String),
}

/// Cheap, cloneable access to the link from taps and encoders.
#[derive(Debug, Clone)]
pub struct LinkHandle {
    items: Sender<StreamItem>,
    shutdown: Arc<AtomicBool>,
    waker: Arc<Waker>,
    next_id: Arc<AtomicU32>,
    stats: Arc<LinkStats>,
    /// What the host last asked the redirect sink's volume to be, until taken.
    host_volume: Arc<Mutex<Option<Volume>>>,
}

impl std::fmt::Debug for StreamItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamItem::MicWanted(w) => write!(f, "MicWanted({w})"),
            StreamItem::Volume(v) => write!(f, "Volume({v:?})"),
            StreamItem::Open(id, _) => write!(f, "Open({id})"),
            StreamItem::Tap(id, _, _) => write!(f, "Tap({id})"),
            StreamItem::Media(id, p) => write!(f, "Media({id}, {})", p.seq),
            StreamItem::Close(id, _) => write!(f, "Close({id})"),
        }
    }
}

impl LinkHandle {
    /// Registers a stream; it is announced now if a host is there, else on connect.
    pub fn open_stream(&self, open: StreamOpen) -> u32 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        // Control is never dropped: waits for room (the I/O thread drains constantly).
        let _ = self.items.send(StreamItem::Open(id, open));
        self.waker.wake();
        id
    }

    /// Registers a stream whose media the I/O thread encodes from `encoder`'s tap. The
    /// stream closes by itself once the tap's writer is gone and everything it captured
    /// is sent (the last partial packet padded with silence); call [`LinkHandle::wake`]
    /// after dropping the writer so that is prompt.
    pub fn open_tap(&self, open: StreamOpen, encoder: TapEncoder) -> u32 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let _ = self.items.send(StreamItem::Tap(id, open, Box::new(encoder)));
        self.waker.wake();
        id
    }

    /// Tells the host whether a guest app records from the virtual microphone now.
    pub fn want_mic(&self, wanted: bool) {
        let _ = self.items.send(StreamItem::MicWanted(wanted));
        self.waker.wake();
    }

    /// Tells the host the redirect sink's volume and mute: it applies them to every
    /// stream, and while muted nothing is sent at all.
    pub fn set_volume(&self, volume: Volume) {
        let _ = self.items.send(StreamItem::Volume(volume));
        self.waker.wake();
    }

    /// A volume the user set on the host since the last call, for the redirect sink.
    pub fn take_host_volume(&self) -> Option<Volume> {
        self.host_volume.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Wakes the I/O thread (after a tap's writer went away).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Ends a stream.
    pub fn close_stream(&self, stream: u32, reason: &str) {
        let _ = self.items.send(StreamItem::Close(stream, reason.into()));
        self.waker.wake();
    }

    /// Queues a media packet; false if it was dropped because the queue is full.
    pub fn send_media(&self, stream: u32, packet: MediaPacket) -> bool {
        match self.items.try_send(StreamItem::Media(stream, packet)) {
            Ok(()) => {
                self.waker.wake();
                true
            }
            Err(_) => {
                self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Link counters.
    pub fn stats(&self) -> &Arc<LinkStats> {
        &self.stats
    }
}

/// Settings of the guest link.
#[derive(Debug)]
pub struct LinkConfig {
    /// Where the host is.
    pub port: PortSpec,
    /// Software name sent in the handshake.
    pub software: String,
    /// The virtual microphone's render ring, if the guest has one.
    pub mic: Option<MicFeed>,
}

/// The running I/O thread.
#[derive(Debug)]
pub struct LinkManager {
    handle: LinkHandle,
    thread: Option<JoinHandle<()>>,
}

impl LinkManager {
    /// Opens the port and starts the I/O thread. Fails only if the port spec itself
    /// is unusable; an absent host is waited for.
    pub fn spawn(mut config: LinkConfig) -> io::Result<Self> {
        let link = Link::open(&config.port)?;
        let (items_tx, items_rx) = crossbeam_channel::bounded(STREAM_QUEUE);
        let shutdown = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Waker::new()?);
        let stats = Arc::new(LinkStats::default());
        let handle = LinkHandle {
            items: items_tx,
            shutdown: shutdown.clone(),
            waker: waker.clone(),
            next_id: Arc::new(AtomicU32::new(1)),
            stats: stats.clone(),
            host_volume: Arc::default(),
        };
        let mic = config.mic.take().map(MicReceiver::new);
        let mut io = IoThread {
            link,
            config,
            mic,
            volume: Volume::unity(),
            host_volume: handle.host_volume.clone(),
            items: items_rx,
            shutdown,
            waker,
            stats,
            session: None,
            streams: BTreeMap::new(),
            sources: BTreeMap::new(),
            announced: BTreeSet::new(),
            epoch: 0,
            last_status: String::new(),
            clock_id: clock::clock_id(),
            ladder: None,
            media_bytes: 0,
            congestion_at_ns: 0,
            media_rate: 0.0,
        };
        let thread = std::thread::Builder::new().name("melange-link".into()).spawn(move || io.run())?;
        Ok(Self { handle, thread: Some(thread) })
    }

    /// A handle for taps and encoders.
    pub fn handle(&self) -> LinkHandle {
        self.handle.clone()
    }

    /// Says goodbye to the host and stops the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown.store(true, Ordering::Relaxed);
            self.handle.waker.wake();
            let _ = t.join();
        }
    }
}

impl Drop for LinkManager {
    fn drop(&mut self) {
        self.stop();
    }
}

struct IoThread {
    link: Link,
    config: LinkConfig,
    /// The virtual microphone's feed, if the guest has one.
    mic: Option<MicReceiver>,
    /// The redirect sink's volume; nothing is sent while it is muted.
    volume: Volume,
    /// Where a volume the host asks for waits for the module (see [`LinkHandle`]).
    host_volume: Arc<Mutex<Option<Volume>>>,
    items: Receiver<StreamItem>,
    shutdown: Arc<AtomicBool>,
    waker: Arc<Waker>,
    stats: Arc<LinkStats>,
    session: Option<Session>,
    /// Every live stream, announced or not.
    streams: BTreeMap<u32, StreamOpen>,
    /// Streams whose media this thread encodes from a tap.
    sources: BTreeMap<u32, Source>,
    /// Streams announced in the current session.
    announced: BTreeSet<u32>,
    epoch: u64,
    /// Last connectivity problem logged, so each is logged once.
    last_status: String,
    clock_id: String,
    /// Opus's bitrate against the port; set by the first Opus stream.
    ladder: Option<BitrateLadder>,
    /// Media bytes handed to the session since the last congestion check, when that
    /// was, and the rate media is made at (bytes/s, smoothed).
    media_bytes: u64,
    congestion_at_ns: u64,
    media_rate: f64,
}

/// A tap this thread encodes.
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
            log::debug!("melange link: stream {id}: latency {}", self.latency);
            self.encoder.stats().latency_ns.store(total.max(1), Ordering::Relaxed);
        }
    }
}

impl IoThread {
    fn run(&mut self) {
        log::info!("melange link: waiting for the host on {}", self.link.describe());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !self.drain_items() {
                break;
            }
            let now_ns = self.encode_sources();
            self.flush();
            self.control_congestion(now_ns);
            let mut timeout = self
                .session
                .as_ref()
                .and_then(Session::poll_timeout)
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1));
            if self.sending() {
                if let Some(at) = self.sources.values().map(|s| s.encoder.wake_at(now_ns)).min() {
                    // Capped, so a tap whose writer went without a wake-up is still noticed.
                    timeout = timeout.min(Duration::from_nanos(at.saturating_sub(now_ns))).min(MAX_SOURCE_WAIT);
                }
            } else if !self.sources.is_empty() {
                timeout = timeout.min(IDLE_SOURCE_WAIT);
            }
            let want_write = self.session.as_ref().is_some_and(|s| !s.pending_output().is_empty());
            let event = match self.link.wait(want_write, Some(timeout), Some(&self.waker)) {
                Ok(ev) => ev,
                Err(e) => {
                    self.status(format!("port error on {}: {e}", self.link.describe()));
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            match event {
                LinkEvent::Connected => self.start_session(),
                LinkEvent::Disconnected(reason) => self.end_session(&reason),
                LinkEvent::Readable => self.read(&mut buf),
                LinkEvent::Woken | LinkEvent::Writable | LinkEvent::Timeout => {}
            }
            if self.session.is_none() {
                if let Some(e) = self.link.last_error().map(str::to_owned) {
                    self.status(format!("waiting for the host: {e}"));
                }
            }
            if let Some(s) = &mut self.session {
                if s.poll_timeout().is_some_and(|t| t <= Instant::now()) {
                    s.handle_timeout(Instant::now());
                }
            }
            self.handle_events();
        }
        // Taps released before the shutdown send their last packets and close.
        self.encode_sources();
        if let Some(s) = &mut self.session {
            s.close(melange_transport::session::CloseReason::Local("guest side shutting down".into()));
        }
        self.flush();
    }

    /// Logs a connectivity problem once, until it changes.
    fn status(&mut self, text: String) {
        if text != self.last_status {
            log::warn!("melange link: {text}");
            self.last_status = text;
        }
    }

    fn start_session(&mut self) {
        self.epoch += 1;
        let (now, now_ns) = clock::now_pair();
        let mut cfg = SessionConfig::new(
            Role::Guest,
            self.config.software.clone(),
            Capabilities { codecs: codec_bits::PCM_S16LE | codec_bits::OPUS, max_streams: MAX_STREAMS },
        );
        cfg.epoch = (now_ns & !0xFFFF) | (self.epoch & 0xFFFF);
        cfg.max_queued_media = MAX_QUEUED_MEDIA;
        cfg.origin_ns = now_ns;
        cfg.clock_id = self.clock_id.clone();
        self.session = Some(Session::new(cfg, now));
        self.announced.clear();
        // The host reports each stream's render delay anew in the new session.
        for source in self.sources.values_mut() {
            source.latency.host_gone();
        }
    }

    fn end_session(&mut self, reason: &str) {
        if self.forget_session() {
            log::warn!("melange link: host disconnected ({reason}); reconnecting");
        } else {
            self.status(reason.to_string());
        }
    }

    /// Drops the session and what belongs to it; true if there was one.
    fn forget_session(&mut self) -> bool {
        self.keep_session_drops();
        self.announced.clear();
        self.stats.connected.store(false, Ordering::Relaxed);
        if let Some(mic) = &mut self.mic {
            mic.end_session();
        }
        self.session.take().is_some()
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
                "melange link: {} the host's microphone",
                if demand.active { "a guest app records: asking for" } else { "no guest app records: releasing" }
            );
        }
    }

    fn read(&mut self, buf: &mut [u8]) {
        loop {
            match self.link.read(buf) {
                Ok(Some(0)) => {
                    self.end_session("end of stream");
                    return;
                }
                Ok(Some(n)) => {
                    if let Some(s) = &mut self.session {
                        s.handle_input(Instant::now(), &buf[..n]);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.end_session(&e.to_string());
                    return;
                }
            }
        }
    }

    fn handle_events(&mut self) {
        // The microphone's packets of one read are received together, so that of a
        // backlog the oldest are the ones beyond the real-time budget.
        let mut mic_burst: Vec<MediaPacket> = Vec::new();
        let mut mic_stream = 0;
        while let Some(event) = self.session.as_mut().and_then(Session::poll_event) {
            if let Event::Media { stream, packet } = event {
                if stream != mic_stream {
                    self.receive_mic(mic_stream, &mut mic_burst);
                    mic_stream = stream;
                }
                mic_burst.push(packet);
                continue;
            }
            self.receive_mic(mic_stream, &mut mic_burst);
            match event {
                Event::Established(peer) => {
                    log::info!(
                        "melange link: connected to {} on {} (protocol v{}, session {:#x})",
                        peer.software,
                        self.link.describe(),
                        peer.version,
                        peer.epoch
                    );
                    self.last_status.clear();
                    self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                    self.stats.connected.store(true, Ordering::Relaxed);
                    // Streams start with what the taps capture from now on.
                    self.skip_sources();
                    self.send_volume();
                    if self.mic.as_ref().is_some_and(MicReceiver::wanted) {
                        self.send_mic_demand();
                    }
                    let ids: Vec<u32> = self.streams.keys().copied().collect();
                    for id in ids {
                        self.announce(id);
                    }
                }
                Event::StreamRejected { stream, reason } => {
                    log::warn!("melange link: host refused stream {stream}: {reason}");
                    self.announced.remove(&stream);
                }
                Event::StreamLatency { stream, render_ns } => {
                    if let Some(source) = self.sources.get_mut(&stream) {
                        source.latency.host_render(render_ns);
                        source.publish_latency(stream);
                    }
                }
                Event::Closed(reason) => {
                    log::warn!("melange link: session closed: {reason}");
                    self.forget_session();
                    self.link.disconnect();
                    return;
                }
                Event::Error(e) => log::debug!("melange link: skipped bad input from host: {e}"),
                // The only stream a host opens is the microphone.
                Event::StreamOpened { stream, open } => {
                    let taken = match &mut self.mic {
                        Some(mic) => mic.open(Instant::now(), stream, &open),
                        None => Err("this guest has no virtual microphone".into()),
                    };
                    match taken {
                        Ok(()) => log::info!(
                            "melange link: the host's microphone arrives as stream {stream}, {}",
                            open.codec.name()
                        ),
                        Err(reason) => {
                            log::warn!("melange link: refusing host stream {stream}: {reason}");
                            if let Some(s) = &mut self.session {
                                s.reject_stream(stream, &reason);
                            }
                        }
                    }
                }
                Event::Media { .. } => {}
                Event::StreamClosed { stream, reason } => {
                    if let Some(mic) = &mut self.mic {
                        if mic.close(stream) {
                            log::info!("melange link: the host's microphone stopped ({reason}); {}", mic.describe());
                        }
                    }
                }
                Event::Volume(volume) => {
                    log::info!("melange link: the host sets the volume to {volume}");
                    // The module puts it on the redirect sink, whose change comes back
                    // here as StreamItem::Volume.
                    *self.host_volume.lock().unwrap_or_else(|e| e.into_inner()) = Some(volume);
                }
                // Host-side requests; a guest never gets them from a well-behaved host.
                Event::CaptureDemand(_) | Event::PeerRestarted => {}
            }
        }
        self.receive_mic(mic_stream, &mut mic_burst);
    }

    /// Hands the microphone the packets of `stream` that arrived together.
    fn receive_mic(&mut self, stream: u32, burst: &mut Vec<MediaPacket>) {
        if let (Some(mic), false) = (&mut self.mic, burst.is_empty()) {
            mic.media(Instant::now(), stream, burst);
        }
        burst.clear();
    }

    fn announce(&mut self, id: u32) {
        let (Some(s), Some(open)) = (&mut self.session, self.streams.get(&id)) else { return };
        if !s.is_established() {
            return;
        }
        let wanted = open.codec.bit();
        if s.peer().is_some_and(|p| p.capabilities.codecs & wanted == 0) {
            log::warn!("melange link: host cannot decode {} for stream {id}", open.codec.name());
            return;
        }
        match s.open_stream(id, open) {
            Ok(()) => {
                self.announced.insert(id);
            }
            Err(e) => log::warn!("melange link: cannot announce stream {id}: {e}"),
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
    /// that are gone; returns the time it looked.
    fn encode_sources(&mut self) -> u64 {
        let now_ns = clock::monotonic_ns();
        let mut finished = Vec::new();
        let ids: Vec<u32> = self.sources.keys().copied().collect();
        if !self.sending() {
            self.skip_sources();
        }
        for id in ids {
            while let Some(source) = self.sources.get_mut(&id) {
                match source.encoder.next_packet() {
                    Some(Ok(packet)) => {
                        if self.forward_media(id, &packet) {
                            let rtt = self.session.as_ref().and_then(Session::rtt);
                            if let Some(source) = self.sources.get_mut(&id) {
                                if let Some(rtt) = rtt {
                                    source.latency.round_trip(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
                                }
                                if source.latency.packet_sent(clock::monotonic_ns(), packet.pts_ns) {
                                    source.publish_latency(id);
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        source.errors += 1;
                        if source.errors.is_power_of_two() {
                            log::warn!("melange link: stream {id}: encode failed ({} so far): {e}", source.errors);
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
                    log::warn!("melange link: stream {id}: the encoder fell behind, {dropped} bytes dropped");
                }
                let gaps = source.encoder.stats().gap_frames.load(Ordering::Relaxed);
                if gaps > 0 {
                    log::info!("melange link: stream {id}: {gaps} frames of silence where the graph skipped the tap");
                }
            }
            self.close(id, "app stopped");
            log::info!("melange link: stream {id} closed (app stopped)");
        }
        now_ns
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
                    "melange link: the port is behind ({} kB queued): Opus bitrate down to {} kbit/s",
                    queued / 1000,
                    b / 1000
                );
                (b, &self.stats.bitrate_steps_down)
            }
            Step::Up(b) => {
                log::info!("melange link: the port keeps up again: Opus bitrate up to {} kbit/s", b / 1000);
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

    /// Applies what taps and encoders sent, in order; false on shutdown.
    fn drain_items(&mut self) -> bool {
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return false;
            }
            match self.items.try_recv() {
                Ok(StreamItem::Volume(volume)) => {
                    if !volume.same_as(&self.volume) {
                        let unmuted = self.volume.mute && !volume.mute;
                        self.volume = volume;
                        if unmuted {
                            // What waited while muted is not sent late.
                            self.skip_sources();
                        }
                        self.send_volume();
                    }
                }
                Ok(StreamItem::MicWanted(wanted)) => {
                    if self.mic.as_mut().is_some_and(|m| m.set_wanted(wanted)) {
                        self.send_mic_demand();
                    }
                }
                Ok(StreamItem::Open(id, open)) => {
                    self.streams.insert(id, open);
                    self.announce(id);
                }
                Ok(StreamItem::Tap(id, open, mut encoder)) => {
                    let MediaKind::Audio(format) = &open.media;
                    if let Codec::Opus { bitrate } = open.codec {
                        // New streams start at the bitrate the port takes now.
                        let ladder = self.ladder.get_or_insert_with(|| BitrateLadder::new(bitrate));
                        let now = ladder.bitrate().min(bitrate);
                        if now != bitrate && encoder.set_bitrate(now).is_err() {
                            log::warn!("melange link: stream {id}: cannot set the Opus bitrate to {now}");
                        }
                        encoder.stats().bitrate.store(u64::from(now), Ordering::Relaxed);
                    }
                    self.sources.insert(id, Source::new(encoder, format.rate));
                    self.streams.insert(id, open);
                    self.announce(id);
                }
                Ok(StreamItem::Media(id, packet)) => {
                    self.forward_media(id, &packet);
                }
                Ok(StreamItem::Close(id, reason)) => {
                    self.sources.remove(&id);
                    self.close(id, &reason);
                }
                // Every handle is gone: nobody can send anything again.
                Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn flush(&mut self) {
        let Some(s) = &mut self.session else { return };
        while !s.pending_output().is_empty() {
            match self.link.write(s.pending_output()) {
                Ok(0) => return,
                Ok(n) => {
                    s.consume_output(n);
                    self.stats.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.end_session(&e.to_string());
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use melange_transport::message::{AppInfo, AudioFormat, Codec, MediaKind};

    /// A stream's open, media and close reach the host in the order they were sent,
    /// even when they are sent back to back: the end of a stream is never cut.
    #[test]
    fn stream_traffic_keeps_its_order() {
        let path = std::env::temp_dir().join(format!("melange-link-order-{}.sock", std::process::id()));
        let mut listener = Link::listen(&path).unwrap();
        let manager =
            LinkManager::spawn(LinkConfig { port: PortSpec::Unix(path.clone()), software: "test".into(), mic: None })
                .unwrap();
        let handle = manager.handle();

        let caps = Capabilities { codecs: codec_bits::PCM_S16LE, max_streams: 8 };
        let mut host: Option<Session> = None;
        let mut buf = vec![0u8; 65536];
        let mut events = Vec::new();
        let mut sent = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !events.iter().any(|e| matches!(e, Event::StreamClosed { .. })) {
            // Once the guest side is established too (it dropped media before that).
            if handle.stats().connected.load(Ordering::Relaxed) && !sent {
                let open = StreamOpen {
                    media: MediaKind::Audio(AudioFormat { rate: 48000, channels: 1, positions: vec![2] }),
                    codec: Codec::PcmS16Le,
                    frame_samples: 480,
                    app: AppInfo::default(),
                };
                let id = handle.open_stream(open);
                for seq in 0..50 {
                    assert!(handle.send_media(id, MediaPacket { seq, pts_ns: 0, duration: 480, data: vec![0; 960] }));
                }
                handle.close_stream(id, "done");
                sent = true;
            }
            match listener.wait(false, Some(Duration::from_millis(20)), None).unwrap() {
                LinkEvent::Connected => {
                    host =
                        Some(Session::new(SessionConfig::new(Role::Host, "test host", caps.clone()), Instant::now()));
                }
                LinkEvent::Readable => {
                    while let Some(n) = listener.read(&mut buf).unwrap() {
                        if n == 0 {
                            break;
                        }
                        if let Some(h) = &mut host {
                            h.handle_input(Instant::now(), &buf[..n]);
                        }
                    }
                }
                _ => {}
            }
            if let Some(h) = &mut host {
                let out = h.pending_output().to_vec();
                let n = listener.write(&out).unwrap_or(0);
                h.consume_output(n);
                events.extend(std::iter::from_fn(|| h.poll_event()));
            }
        }
        manager.shutdown();
        let media: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::Media { packet, .. } => Some(packet.seq),
                _ => None,
            })
            .collect();
        assert!(events.iter().any(|e| matches!(e, Event::StreamClosed { .. })), "no close: {events:?}");
        assert_eq!(media, (0..50).collect::<Vec<u32>>(), "packets lost or reordered before the close");
    }
}
