//! The session: a deterministic state machine over one connection.
//!
//! No sockets and no clock inside: time enters as an argument. The I/O edge calls
//! - [`Session::handle_input`] with every chunk of bytes read from the port,
//! - [`Session::handle_timeout`] when [`Session::poll_timeout`] has passed,
//! - [`Session::poll_event`] until `None` after each of the above,
//! - [`Session::pending_output`] / [`Session::consume_output`] to write bytes out.
//!
//! One `Session` lives exactly as long as one connection. After a disconnect the edge
//! makes a new one (a new epoch); nothing from the old one is replayed.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::frame::{
    encode_frame, Frame, FrameDecoder, FrameError, FrameKind, Header, FLAG_CRITICAL, FRAME_VERSION, MAX_PAYLOAD,
};
use crate::message::{
    decode_control, encode_control, Capabilities, CaptureDemand, Heartbeat, Hello, MediaPacket, MessageError, Reason,
    Role, StreamEnd, StreamLatency, StreamOpen, Volume, Welcome, MEDIA_HEADER_LEN, PROTOCOL_MAX, PROTOCOL_MIN,
};
use crate::outq::OutQueue;
use crate::text::sanitize;

/// Longest plausible round trip; longer samples are ignored.
const MAX_RTT_SAMPLE: Duration = Duration::from_secs(5);

/// Settings of one session. Every default is documented on [`SessionConfig::new`].
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Which end we are. The guest speaks first.
    pub role: Role,
    /// Our software name and version, sent in the handshake.
    pub software: String,
    /// Our clock domain (see [`Hello::clock_id`]).
    pub clock_id: String,
    /// What we can do.
    pub capabilities: Capabilities,
    /// This session's epoch (guest) or 0 (host, which echoes the guest's).
    pub epoch: u64,
    /// Our monotonic clock in nanoseconds at the `now` passed to [`Session::new`].
    pub origin_ns: u64,
    /// How often to send a heartbeat once established. Default 1 s.
    pub heartbeat_interval: Duration,
    /// Silence from the peer after which the session is dead. Default 5 s.
    pub peer_timeout: Duration,
    /// Time allowed for the handshake. Default 5 s. A guest counts from the start; a
    /// host from the first byte it receives (QEMU's socket is there long before the
    /// guest's module is, and an idle connection costs nothing).
    pub handshake_timeout: Duration,
    /// Most handshakes a peer may start in one minute on this connection; beyond it the
    /// session closes. Default 20.
    pub max_handshakes_per_minute: usize,
    /// Most control frames (anything but media) accepted per second; the rest are
    /// dropped and reported. Default 200.
    pub max_control_per_second: u32,
    /// Most bytes waiting for a peer that does not read; beyond it the session closes.
    /// Default 1 MiB.
    pub max_pending_output: usize,
    /// Most bytes of media waiting for the port; beyond it the oldest media frames are
    /// dropped (and counted, [`Session::media_dropped`]), never control. Default
    /// 192 KiB: a second of stereo PCM, ten of Opus at 128 kbit/s.
    pub max_queued_media: usize,
}

impl SessionConfig {
    /// Defaults: heartbeat every 1 s, peer timeout 5 s, handshake timeout 5 s.
    pub fn new(role: Role, software: impl Into<String>, capabilities: Capabilities) -> Self {
        Self {
            role,
            software: software.into(),
            clock_id: String::new(),
            capabilities,
            epoch: 0,
            origin_ns: 0,
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_handshakes_per_minute: 20,
            max_control_per_second: 200,
            max_pending_output: 1 << 20,
            max_queued_media: 192 * 1024,
        }
    }
}

/// What the peer told us in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Negotiated protocol version.
    pub version: u8,
    /// Peer software name and version.
    pub software: String,
    /// The session epoch.
    pub epoch: u64,
    /// Peer clock domain.
    pub clock_id: String,
    /// Peer capabilities.
    pub capabilities: Capabilities,
}

/// Something the edge must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The handshake is done; streams may be opened.
    Established(PeerInfo),
    /// The peer announced a stream.
    StreamOpened {
        /// Stream id.
        stream: u32,
        /// Its description.
        open: StreamOpen,
    },
    /// The peer ended a stream.
    StreamClosed {
        /// Stream id.
        stream: u32,
        /// Why.
        reason: String,
    },
    /// The peer refused a stream we opened.
    StreamRejected {
        /// Stream id.
        stream: u32,
        /// Why.
        reason: String,
    },
    /// Media for an open stream.
    Media {
        /// Stream id.
        stream: u32,
        /// The packet.
        packet: MediaPacket,
    },
    /// The guest wants a capture device opened, or no longer (host side only).
    CaptureDemand(CaptureDemand),
    /// The peer's view of the guest's output volume changed.
    Volume(Volume),
    /// The peer reported how long a stream we send takes from arrival to being heard.
    StreamLatency {
        /// Stream id.
        stream: u32,
        /// The peer's render delay, nanoseconds.
        render_ns: u64,
    },
    /// The guest started a new session on the same connection (its side restarted):
    /// every stream of the old one is gone. A [`Event::Established`] follows.
    PeerRestarted,
    /// A bad frame or message was skipped; the session goes on. For rate-limited logs.
    Error(SessionError),
    /// The session is over; make a new one to talk again.
    Closed(CloseReason),
}

/// A non-fatal problem with what the peer sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// Bytes that are not a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame whose payload is not the message its kind says.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// A frame that makes no sense in the current state.
    #[error("unexpected {kind:?} frame {state}")]
    Unexpected {
        /// Frame kind.
        kind: FrameKind,
        /// Where we were.
        state: &'static str,
    },
    /// Media or close for a stream that is not open.
    #[error("frame for unknown stream {0}")]
    UnknownStream(u32),
    /// A stream-open for an id already open.
    #[error("stream {0} is already open")]
    DuplicateStream(u32),
    /// A stream-open over the stream limit.
    #[error("stream {stream} refused: {limit} streams already open")]
    TooManyStreams {
        /// Refused stream id.
        stream: u32,
        /// The limit.
        limit: u16,
    },
    /// Stream id 0 is reserved for session frames.
    #[error("stream id 0 is reserved")]
    ReservedStream,
    /// A frame kind this build does not know, skipped.
    #[error("skipped unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// Control frames beyond the per-second limit were dropped.
    #[error("control flood: {dropped} control frames over the limit of {limit}/s dropped")]
    ControlFlood {
        /// Frames dropped in the last second.
        dropped: u32,
        /// The limit.
        limit: u32,
    },
    /// A call by the edge that is not allowed now (not a peer problem).
    #[error("session is not established")]
    NotEstablished,
}

impl SessionError {
    /// A short stable name for the kind of error, for per-kind log rate limits.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::Frame(_) => "bad frame",
            SessionError::Message(_) => "malformed message",
            SessionError::Unexpected { .. } => "unexpected frame",
            SessionError::UnknownStream(_) => "unknown stream",
            SessionError::DuplicateStream(_) => "duplicate stream",
            SessionError::TooManyStreams { .. } => "stream limit",
            SessionError::ReservedStream => "reserved stream id",
            SessionError::UnknownKind(_) => "unknown frame kind",
            SessionError::ControlFlood { .. } => "control flood",
            SessionError::NotEstablished => "not established",
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloseReason {
    /// The two ends share no protocol version.
    #[error("protocol version mismatch: peer speaks {peer_min}..={peer_max}, this build speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}; upgrade the older side")]
    VersionMismatch {
        /// Peer's lowest version.
        peer_min: u8,
        /// Peer's highest version.
        peer_max: u8,
    },
    /// The peer refused our handshake.
    #[error("peer refused the session: {0}")]
    Refused(String),
    /// The peer is not the role we expect (two guests or two hosts).
    #[error("peer has the wrong role {0:?}")]
    WrongRole(Role),
    /// No handshake within the handshake timeout.
    #[error("no handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// Nothing heard from the peer within the peer timeout.
    #[error("peer silent for {0:?}")]
    PeerTimeout(Duration),
    /// The peer said goodbye.
    #[error("peer closed the session: {0}")]
    Goodbye(String),
    /// The peer sent a critical frame kind this build does not know.
    #[error("peer sent critical frame kind 0x{0:02x} this build does not know")]
    UnknownCritical(u8),
    /// The peer started more handshakes than allowed in a minute.
    #[error("handshake storm: more than {0} handshakes in a minute")]
    HandshakeStorm(usize),
    /// The peer stopped reading: our queued output passed the limit.
    #[error("peer stopped reading: {0} bytes queued for it")]
    PeerNotReading(usize),
    /// We closed it.
    #[error("closed locally: {0}")]
    Local(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Guest: hello sent. Host: waiting for hello.
    Handshake,
    Established,
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Handshake => "during the handshake",
            State::Established => "in an established session",
            State::Closed => "after close",
        }
    }
}

/// One connection's protocol state. See the module docs for the calling contract.
pub struct Session {
    config: SessionConfig,
    state: State,
    origin: Instant,
    decoder: FrameDecoder,
    out: OutQueue,
    /// Media frames dropped per stream because the port fell behind.
    media_dropped: BTreeMap<u32, u64>,
    events: VecDeque<Event>,
    peer: Option<PeerInfo>,
    /// Streams the peer opened towards us.
    incoming: BTreeSet<u32>,
    /// Streams we opened towards the peer.
    outgoing: BTreeSet<u32>,
    last_rx: Instant,
    next_heartbeat: Instant,
    /// The peer's last heartbeat: its `sent_ns` and when it arrived, echoed in ours.
    peer_heartbeat: Option<(u64, Instant)>,
    /// Smoothed round-trip time in nanoseconds, from echoed heartbeats.
    srtt_ns: Option<f64>,
    /// When the handshake must be done: set at start (guest) or first byte (host).
    handshake_deadline: Option<Instant>,
    /// Times of recent handshakes from the peer (at most the limit + 1 kept).
    handshakes: VecDeque<Instant>,
    /// Control frames in the current one-second window, and the window's start.
    control_window: (Instant, u32),
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.config.role)
            .field("state", &self.state)
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .field("pending_output", &self.pending_output().len())
            .finish()
    }
}

impl Session {
    /// Starts a session on a fresh connection. A guest queues its hello at once.
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        let mut s = Self {
            state: State::Handshake,
            origin: now,
            decoder: FrameDecoder::new(),
            out: OutQueue::default(),
            media_dropped: BTreeMap::new(),
            events: VecDeque::new(),
            peer: None,
            incoming: BTreeSet::new(),
            outgoing: BTreeSet::new(),
            last_rx: now,
            next_heartbeat: now + config.heartbeat_interval,
            peer_heartbeat: None,
            srtt_ns: None,
            handshake_deadline: (config.role == Role::Guest).then(|| now + config.handshake_timeout),
            handshakes: VecDeque::new(),
            control_window: (now, 0),
            config,
        };
        if s.config.role == Role::Guest {
            s.send_hello();
        }
        s
    }

    /// The negotiated peer, once established.
    pub fn peer(&self) -> Option<&PeerInfo> {
        self.peer.as_ref()
    }

    /// True between [`Event::Established`] and [`Event::Closed`].
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True once [`Event::Closed`] has been queued.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Feeds bytes read from the port.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        if self.state == State::Closed || bytes.is_empty() {
            return;
        }
        self.last_rx = now;
        if self.handshake_deadline.is_none() && self.state == State::Handshake {
            self.handshake_deadline = Some(now + self.config.handshake_timeout);
        }
        self.decoder.push(bytes);
        loop {
            if self.state == State::Closed {
                return;
            }
            match self.decoder.next_frame() {
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => return,
                Err(e) => self.events.push_back(Event::Error(e.into())),
            }
        }
    }

    /// Runs timers: heartbeats, handshake and peer timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Handshake => {
                if self.handshake_deadline.is_some_and(|d| now >= d) {
                    self.close(CloseReason::HandshakeTimeout(self.config.handshake_timeout));
                }
            }
            State::Established => {
                if now >= self.last_rx + self.config.peer_timeout {
                    self.close(CloseReason::PeerTimeout(self.config.peer_timeout));
                } else if now >= self.next_heartbeat {
                    let (echo_ns, echo_hold_ns) = self.peer_heartbeat.map_or((0, 0), |(sent, at)| {
                        (sent, u64::try_from(now.saturating_duration_since(at).as_nanos()).unwrap_or(u64::MAX))
                    });
                    let beat = Heartbeat { sent_ns: self.mono_ns(now), echo_ns, echo_hold_ns };
                    self.send_control(FrameKind::Heartbeat, 0, "heartbeat", &beat);
                    self.next_heartbeat = now + self.config.heartbeat_interval;
                }
            }
        }
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Handshake => self.handshake_deadline,
            State::Established => Some(self.next_heartbeat.min(self.last_rx + self.config.peer_timeout)),
        }
    }

    /// The round-trip time to the peer and back, smoothed over heartbeats (one a
    /// second each way); `None` until the first echo came back. Half of it is the
    /// estimate of the one-way transport delay: the two ends' clocks are not comparable.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt_ns.map(|ns| Duration::from_nanos(ns as u64))
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes waiting to be written to the port.
    pub fn pending_output(&self) -> &[u8] {
        self.out.pending()
    }

    /// Marks `n` bytes of [`Session::pending_output`] as written.
    pub fn consume_output(&mut self, n: usize) {
        self.out.consume(n);
    }

    /// Bytes of media waiting for the port: how far behind it is.
    pub fn queued_media_bytes(&self) -> usize {
        self.out.media_bytes()
    }

    /// Sets [`SessionConfig::max_queued_media`]: the guest keeps it at half a second of
    /// the media it makes, so the queue (and what waits behind it) stays short in time.
    /// Takes effect with the next media frame.
    pub fn set_max_queued_media(&mut self, bytes: usize) {
        self.config.max_queued_media = bytes;
    }

    /// Media frames of `stream` dropped so far because the port fell behind
    /// ([`SessionConfig::max_queued_media`]).
    pub fn media_dropped(&self, stream: u32) -> u64 {
        self.media_dropped.get(&stream).copied().unwrap_or(0)
    }

    /// Announces a stream to the peer.
    pub fn open_stream(&mut self, stream: u32, open: &StreamOpen) -> Result<(), SessionError> {
        self.require_established()?;
        if stream == 0 {
            return Err(SessionError::ReservedStream);
        }
        let payload = encode_control("stream-open", open)?;
        self.outgoing.insert(stream);
        self.push_frame(FrameKind::StreamOpen, stream, &payload);
        Ok(())
    }

    /// Ends a stream we opened. Unknown ids are ignored (already closed or rejected).
    pub fn close_stream(&mut self, stream: u32, reason: &str) {
        if self.state != State::Established || !self.outgoing.remove(&stream) {
            return;
        }
        self.send_control(FrameKind::StreamClose, stream, "stream-close", &StreamEnd { reason: reason.into() });
    }

    /// Refuses a stream the peer opened.
    pub fn reject_stream(&mut self, stream: u32, reason: &str) {
        if self.state != State::Established || !self.incoming.remove(&stream) {
            return;
        }
        self.send_control(FrameKind::StreamReject, stream, "stream-reject", &StreamEnd { reason: reason.into() });
    }

    /// Tells the peer the render delay of a stream it sends us. Non-critical: a peer
    /// that does not know the frame kind skips it.
    pub fn report_latency(&mut self, stream: u32, render_ns: u64) {
        if self.state != State::Established || !self.incoming.contains(&stream) {
            return;
        }
        self.send_control(FrameKind::StreamLatency, stream, "stream-latency", &StreamLatency { render_ns });
    }

    /// Tells the host whether the guest wants a capture device now (guest side).
    /// Non-critical: a host that does not know the frame kind skips it.
    pub fn demand_capture(&mut self, demand: CaptureDemand) -> Result<(), SessionError> {
        self.require_established()?;
        self.send_control(FrameKind::CaptureDemand, 0, "capture-demand", &demand);
        Ok(())
    }

    /// Tells the peer the guest's output volume (see [`Volume`]).
    pub fn send_volume(&mut self, volume: &Volume) -> Result<(), SessionError> {
        self.require_established()?;
        self.send_control(FrameKind::Volume, 0, "volume", volume);
        Ok(())
    }

    /// Queues one media packet of an open outgoing stream.
    pub fn send_media(&mut self, stream: u32, packet: &MediaPacket) -> Result<(), SessionError> {
        self.require_established()?;
        if !self.outgoing.contains(&stream) {
            return Err(SessionError::UnknownStream(stream));
        }
        let len = MEDIA_HEADER_LEN + packet.data.len();
        let len16 = u16::try_from(len)
            .ok()
            .filter(|&l| usize::from(l) <= MAX_PAYLOAD)
            .ok_or(MessageError::TooLarge { kind: "media", len })?;
        let header = Header { version: FRAME_VERSION, kind: FrameKind::Media, flags: 0, stream, len: len16 };
        self.out.push(Some(stream), |out| {
            out.extend_from_slice(&header.encode());
            packet.encode_into(out);
        });
        let dropped = &mut self.media_dropped;
        self.out.drop_oldest_media(self.config.max_queued_media, |s| *dropped.entry(s).or_default() += 1);
        Ok(())
    }

    /// Says goodbye and closes.
    pub fn close(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::Established {
            self.send_control(FrameKind::Goodbye, 0, "goodbye", &Reason { text: reason.to_string() });
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed(reason));
    }

    fn require_established(&self) -> Result<(), SessionError> {
        if self.state == State::Established {
            Ok(())
        } else {
            Err(SessionError::NotEstablished)
        }
    }

    /// Takes a round-trip sample from the echo in the peer's heartbeat. A sample over
    /// [`MAX_RTT_SAMPLE`] is an echo from a peer with a broken clock, or of a heartbeat
    /// of another session, and is ignored.
    fn on_heartbeat(&mut self, now: Instant, beat: Heartbeat) {
        self.peer_heartbeat = Some((beat.sent_ns, now));
        if beat.echo_ns == 0 {
            return;
        }
        let rtt = self.mono_ns(now).checked_sub(beat.echo_ns).and_then(|t| t.checked_sub(beat.echo_hold_ns));
        if let Some(rtt) = rtt.filter(|r| *r <= MAX_RTT_SAMPLE.as_nanos() as u64) {
            // TCP's smoothing (RFC 6298): an eighth of each new sample.
            let rtt = rtt as f64;
            self.srtt_ns = Some(self.srtt_ns.map_or(rtt, |s| s + (rtt - s) / 8.0));
        }
    }

    fn mono_ns(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        self.config.origin_ns.saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    fn send_hello(&mut self) {
        let hello = Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            role: self.config.role,
            software: self.config.software.clone(),
            epoch: self.config.epoch,
            clock_id: self.config.clock_id.clone(),
            capabilities: self.config.capabilities.clone(),
        };
        self.send_control(FrameKind::Hello, 0, "hello", &hello);
    }

    fn send_control<T: serde::Serialize>(&mut self, kind: FrameKind, stream: u32, name: &'static str, msg: &T) {
        match encode_control(name, msg) {
            Ok(payload) => self.push_frame(kind, stream, &payload),
            // Only our own oversized strings can get here; report, never panic.
            Err(e) => self.events.push_back(Event::Error(e.into())),
        }
    }

    /// Queues a frame. Session frames are never critical: every v1 kind is known to
    /// every v1 peer, and kinds added later must be safe to skip unless marked.
    fn push_frame(&mut self, kind: FrameKind, stream: u32, payload: &[u8]) {
        let mut result = Ok(());
        self.out.push(None, |out| result = encode_frame(out, kind, 0, stream, payload));
        if let Err(e) = result {
            self.events.push_back(Event::Error(e.into()));
        }
        self.check_pending();
    }

    /// Closes the session when the peer has stopped reading. Nothing more is queued
    /// after that (the goodbye is dropped with the rest).
    fn check_pending(&mut self) {
        let pending = self.out.pending().len();
        if pending > self.config.max_pending_output && self.state != State::Closed {
            self.out.clear();
            self.state = State::Closed;
            self.events.push_back(Event::Closed(CloseReason::PeerNotReading(pending)));
        }
    }

    /// Counts a control frame; false if it is over this second's limit.
    fn admit_control(&mut self, now: Instant) -> bool {
        let (start, count) = &mut self.control_window;
        if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
            let dropped = count.saturating_sub(self.config.max_control_per_second);
            if dropped > 0 {
                let limit = self.config.max_control_per_second;
                self.events.push_back(Event::Error(SessionError::ControlFlood { dropped, limit }));
            }
            self.control_window = (now, 0);
        }
        self.control_window.1 = self.control_window.1.saturating_add(1);
        self.control_window.1 <= self.config.max_control_per_second
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame) {
        let Frame { header, payload } = frame;
        if header.kind != FrameKind::Media && !self.admit_control(now) {
            return;
        }
        let unexpected =
            |state: State| Event::Error(SessionError::Unexpected { kind: header.kind, state: state.name() });
        match (header.kind, self.state) {
            (FrameKind::Hello, _) if self.config.role == Role::Host => self.on_hello(now, &payload),
            (FrameKind::Welcome, State::Handshake) if self.config.role == Role::Guest => self.on_welcome(&payload),
            (FrameKind::Refuse, State::Handshake) => {
                let text =
                    decode_control::<Reason>("refuse", &payload).map_or_else(|e| e.to_string(), |r| sanitize(&r.text));
                self.state = State::Closed;
                self.events.push_back(Event::Closed(CloseReason::Refused(text)));
            }
            (FrameKind::Goodbye, _) => {
                let text =
                    decode_control::<Reason>("goodbye", &payload).map_or_else(|e| e.to_string(), |r| sanitize(&r.text));
                self.state = State::Closed;
                self.events.push_back(Event::Closed(CloseReason::Goodbye(text)));
            }
            (FrameKind::Heartbeat, State::Established) => match Heartbeat::decode(&payload) {
                Ok(beat) => self.on_heartbeat(now, beat),
                Err(e) => self.events.push_back(Event::Error(e.into())),
            },
            (FrameKind::StreamOpen, State::Established) => self.on_stream_open(header.stream, &payload),
            (FrameKind::StreamClose, State::Established) => {
                if !self.incoming.remove(&header.stream) {
                    self.events.push_back(Event::Error(SessionError::UnknownStream(header.stream)));
                    return;
                }
                let reason = decode_control::<StreamEnd>("stream-close", &payload)
                    .map_or_else(|e| e.to_string(), |r| sanitize(&r.reason));
                self.events.push_back(Event::StreamClosed { stream: header.stream, reason });
            }
            (FrameKind::StreamReject, State::Established) => {
                if !self.outgoing.remove(&header.stream) {
                    self.events.push_back(Event::Error(SessionError::UnknownStream(header.stream)));
                    return;
                }
                let reason = decode_control::<StreamEnd>("stream-reject", &payload)
                    .map_or_else(|e| e.to_string(), |r| sanitize(&r.reason));
                self.events.push_back(Event::StreamRejected { stream: header.stream, reason });
            }
            (FrameKind::StreamLatency, State::Established) => {
                if !self.outgoing.contains(&header.stream) {
                    self.events.push_back(Event::Error(SessionError::UnknownStream(header.stream)));
                    return;
                }
                match decode_control::<StreamLatency>("stream-latency", &payload) {
                    Ok(l) => {
                        self.events.push_back(Event::StreamLatency { stream: header.stream, render_ns: l.render_ns })
                    }
                    Err(e) => self.events.push_back(Event::Error(e.into())),
                }
            }
            (FrameKind::CaptureDemand, State::Established) if self.config.role == Role::Host => {
                match decode_control::<CaptureDemand>("capture-demand", &payload) {
                    Ok(d) => self.events.push_back(Event::CaptureDemand(d)),
                    Err(e) => self.events.push_back(Event::Error(e.into())),
                }
            }
            (FrameKind::Volume, State::Established) => match decode_control::<Volume>("volume", &payload) {
                Ok(v) => self.events.push_back(Event::Volume(v)),
                Err(e) => self.events.push_back(Event::Error(e.into())),
            },
            (FrameKind::Media, State::Established) => {
                if !self.incoming.contains(&header.stream) {
                    self.events.push_back(Event::Error(SessionError::UnknownStream(header.stream)));
                    return;
                }
                match MediaPacket::decode(&payload) {
                    Ok(packet) => self.events.push_back(Event::Media { stream: header.stream, packet }),
                    Err(e) => self.events.push_back(Event::Error(e.into())),
                }
            }
            (FrameKind::Unknown(k), _) => {
                if header.flags & FLAG_CRITICAL != 0 {
                    self.close(CloseReason::UnknownCritical(k));
                } else {
                    self.events.push_back(Event::Error(SessionError::UnknownKind(k)));
                }
            }
            (_, state) => self.events.push_back(unexpected(state)),
        }
    }

    fn on_hello(&mut self, now: Instant, payload: &[u8]) {
        let hello = match decode_control::<Hello>("hello", payload) {
            Ok(h) => h,
            Err(e) => {
                self.events.push_back(Event::Error(e.into()));
                return;
            }
        };
        self.handshakes.push_back(now);
        while self.handshakes.front().is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(60)) {
            self.handshakes.pop_front();
        }
        if self.handshakes.len() > self.config.max_handshakes_per_minute {
            self.close(CloseReason::HandshakeStorm(self.config.max_handshakes_per_minute));
            return;
        }
        if self.state == State::Established {
            // The guest side restarted without us seeing a disconnect (a virtio port
            // stays connected on the host across a guest module restart).
            self.incoming.clear();
            self.outgoing.clear();
            self.peer = None;
            self.state = State::Handshake;
            self.events.push_back(Event::PeerRestarted);
        }
        if hello.role != Role::Guest {
            self.refuse(CloseReason::WrongRole(hello.role));
            return;
        }
        let version = hello.max_version.min(PROTOCOL_MAX);
        if version < hello.min_version || version < PROTOCOL_MIN {
            self.refuse(CloseReason::VersionMismatch { peer_min: hello.min_version, peer_max: hello.max_version });
            return;
        }
        let welcome = Welcome {
            version,
            software: self.config.software.clone(),
            epoch: hello.epoch,
            clock_id: self.config.clock_id.clone(),
            capabilities: self.config.capabilities.clone(),
        };
        self.send_control(FrameKind::Welcome, 0, "welcome", &welcome);
        self.next_heartbeat = now + self.config.heartbeat_interval;
        self.establish(PeerInfo {
            version,
            software: sanitize(&hello.software),
            epoch: hello.epoch,
            clock_id: sanitize(&hello.clock_id),
            capabilities: hello.capabilities,
        });
    }

    fn on_welcome(&mut self, payload: &[u8]) {
        match decode_control::<Welcome>("welcome", payload) {
            Ok(w) if (PROTOCOL_MIN..=PROTOCOL_MAX).contains(&w.version) => self.establish(PeerInfo {
                version: w.version,
                software: sanitize(&w.software),
                epoch: w.epoch,
                clock_id: sanitize(&w.clock_id),
                capabilities: w.capabilities,
            }),
            Ok(w) => self.close(CloseReason::VersionMismatch { peer_min: w.version, peer_max: w.version }),
            Err(e) => self.events.push_back(Event::Error(e.into())),
        }
    }

    fn establish(&mut self, peer: PeerInfo) {
        self.state = State::Established;
        self.peer = Some(peer.clone());
        self.events.push_back(Event::Established(peer));
    }

    fn refuse(&mut self, reason: CloseReason) {
        self.send_control(FrameKind::Refuse, 0, "refuse", &Reason { text: reason.to_string() });
        self.state = State::Closed;
        self.events.push_back(Event::Closed(reason));
    }

    fn on_stream_open(&mut self, stream: u32, payload: &[u8]) {
        if stream == 0 {
            self.events.push_back(Event::Error(SessionError::ReservedStream));
            return;
        }
        if self.incoming.contains(&stream) {
            self.events.push_back(Event::Error(SessionError::DuplicateStream(stream)));
            return;
        }
        let limit = self.config.capabilities.max_streams;
        if self.incoming.len() >= usize::from(limit) {
            self.events.push_back(Event::Error(SessionError::TooManyStreams { stream, limit }));
            self.send_control(
                FrameKind::StreamReject,
                stream,
                "stream-reject",
                &StreamEnd { reason: format!("stream limit of {limit} reached") },
            );
            return;
        }
        match decode_control::<StreamOpen>("stream-open", payload) {
            Ok(mut open) => {
                open.app.sanitize();
                self.incoming.insert(stream);
                self.events.push_back(Event::StreamOpened { stream, open });
            }
            Err(e) => {
                // An unknown codec or media kind from a newer peer: refuse this stream only.
                self.send_control(
                    FrameKind::StreamReject,
                    stream,
                    "stream-reject",
                    &StreamEnd { reason: e.to_string() },
                );
                self.events.push_back(Event::Error(e.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AppInfo, AudioFormat, Codec, MediaKind};

    fn caps() -> Capabilities {
        Capabilities { codecs: 3, max_streams: 4 }
    }

    fn pair(now: Instant) -> (Session, Session) {
        let mut g = SessionConfig::new(Role::Guest, "guest-test", caps());
        g.epoch = 7;
        let h = SessionConfig::new(Role::Host, "host-test", caps());
        (Session::new(g, now), Session::new(h, now))
    }

    /// Moves all pending bytes from `a` to `b`, optionally in pieces of `chunk` bytes.
    fn shuttle(now: Instant, a: &mut Session, b: &mut Session, chunk: usize) {
        let bytes = a.pending_output().to_vec();
        a.consume_output(bytes.len());
        for piece in bytes.chunks(chunk.max(1)) {
            b.handle_input(now, piece);
        }
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn open() -> StreamOpen {
        StreamOpen {
            media: MediaKind::Audio(AudioFormat { rate: 48000, channels: 2, positions: vec![3, 4] }),
            codec: Codec::PcmS16Le,
            frame_samples: 480,
            app: AppInfo { name: "pw-play".into(), ..Default::default() },
        }
    }

    fn established(now: Instant) -> (Session, Session) {
        let (mut g, mut h) = pair(now);
        shuttle(now, &mut g, &mut h, usize::MAX);
        shuttle(now, &mut h, &mut g, usize::MAX);
        assert!(g.is_established() && h.is_established());
        events(&mut g);
        events(&mut h);
        (g, h)
    }

    #[test]
    fn handshake_with_input_split_at_every_byte() {
        let now = Instant::now();
        let (g0, _) = pair(now);
        let hello = g0.pending_output().to_vec();
        for cut in 0..=hello.len() {
            let (_, mut h) = pair(now);
            h.handle_input(now, &hello[..cut]);
            h.handle_input(now, &hello[cut..]);
            let ev = events(&mut h);
            assert!(
                matches!(&ev[..], [Event::Established(p)] if p.epoch == 7 && p.software == "guest-test"),
                "cut {cut}: {ev:?}"
            );
        }
    }

    #[test]
    fn stream_open_media_close_round_trip() {
        let now = Instant::now();
        let (mut g, mut h) = established(now);
        g.open_stream(5, &open()).unwrap();
        for seq in 0..3 {
            let p =
                MediaPacket { seq, pts_ns: u64::from(seq) * 10_000_000, duration: 480, data: vec![seq as u8; 1920] };
            g.send_media(5, &p).unwrap();
        }
        g.close_stream(5, "app stopped");
        shuttle(now, &mut g, &mut h, 7);
        let ev = events(&mut h);
        assert_eq!(ev.len(), 5, "{ev:?}");
        assert!(matches!(&ev[0], Event::StreamOpened { stream: 5, open: o } if *o == open()));
        assert!(
            matches!(&ev[3], Event::Media { stream: 5, packet } if packet.seq == 2 && packet.data == vec![2u8; 1920])
        );
        assert!(matches!(&ev[4], Event::StreamClosed { stream: 5, reason } if reason == "app stopped"));
    }

    /// Every string the peer sends reaches the edge sanitized: its software name, an
    /// app's fields, close and goodbye reasons.
    #[test]
    fn every_peer_string_arrives_sanitized() {
        use crate::text::{sanitize, MAX_PEER_TEXT};
        let forged = format!("x\r\nERROR melange-host: forged\u{1b}]0;title\u{7}\u{1b}[2J\0{}", "y".repeat(1000));
        let clean = |t: &str| t == sanitize(&forged) && t.chars().count() == MAX_PEER_TEXT && !t.contains('\n');
        let now = Instant::now();
        let (mut g, mut h) = pair(now);
        g.config.software = forged.clone();
        g.out.clear();
        g.send_hello();
        shuttle(now, &mut g, &mut h, usize::MAX);
        let ev = events(&mut h);
        assert!(matches!(&ev[..], [Event::Established(p)] if clean(&p.software)), "{ev:?}");
        shuttle(now, &mut h, &mut g, usize::MAX);
        events(&mut g);
        let mut o = open();
        o.app = AppInfo {
            name: forged.clone(),
            role: forged.clone(),
            binary: forged.clone(),
            icon_name: forged.clone(),
            media_name: forged.clone(),
        };
        g.open_stream(5, &o).unwrap();
        g.close_stream(5, &forged);
        shuttle(now, &mut g, &mut h, usize::MAX);
        let ev = events(&mut h);
        let Event::StreamOpened { open: got, .. } = &ev[0] else { panic!("{ev:?}") };
        for f in [&got.app.name, &got.app.role, &got.app.binary, &got.app.icon_name, &got.app.media_name] {
            assert!(clean(f), "{f:?}");
        }
        assert!(matches!(&ev[1], Event::StreamClosed { reason, .. } if clean(reason)), "{ev:?}");
        h.send_control(FrameKind::Goodbye, 0, "goodbye", &Reason { text: forged.clone() });
        shuttle(now, &mut h, &mut g, usize::MAX);
        let ev = events(&mut g);
        assert!(matches!(ev.last(), Some(Event::Closed(CloseReason::Goodbye(t))) if clean(t)), "{ev:?}");
    }

    #[test]
    fn the_receiver_reports_a_streams_latency_to_its_sender() {
        let now = Instant::now();
        let (mut g, mut h) = established(now);
        g.open_stream(5, &open()).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        events(&mut h);
        h.report_latency(5, 12_500_000);
        h.report_latency(6, 1); // not a stream the guest sends: not sent
        shuttle(now, &mut h, &mut g, usize::MAX);
        let ev = events(&mut g);
        assert!(matches!(&ev[..], [Event::StreamLatency { stream: 5, render_ns: 12_500_000 }]), "{ev:?}");
        // After the stream closed, a late report is an unknown-stream error, not a crash.
        h.report_latency(5, 1);
        g.close_stream(5, "done");
        let late = h.pending_output().to_vec();
        h.consume_output(late.len());
        g.handle_input(now, &late);
        assert!(matches!(&events(&mut g)[..], [Event::Error(SessionError::UnknownStream(5))]));
    }

    #[test]
    fn the_guest_asks_for_the_microphone_and_only_the_host_hears_it() {
        use crate::message::CaptureDevice;
        let now = Instant::now();
        let (mut g, mut h) = established(now);
        let on = CaptureDemand { device: CaptureDevice::Microphone, active: true, frame_us: 10_000 };
        g.demand_capture(on).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        assert_eq!(events(&mut h), [Event::CaptureDemand(on)]);
        // The other way it is not the protocol: an error event, the session goes on.
        h.demand_capture(on).unwrap();
        shuttle(now, &mut h, &mut g, usize::MAX);
        assert!(matches!(&events(&mut g)[..], [Event::Error(SessionError::Unexpected { .. })]));
        assert!(g.is_established() && h.is_established());
    }

    #[test]
    fn the_volume_goes_both_ways() {
        let now = Instant::now();
        let (mut g, mut h) = established(now);
        let half = Volume { channels: vec![0.125, 0.125], mute: false };
        assert_eq!(half.to_string(), "50 %", "as desktops show it: the cube root");
        g.send_volume(&half).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        assert_eq!(events(&mut h), [Event::Volume(half.clone())]);
        let muted = Volume { mute: true, ..half };
        h.send_volume(&muted).unwrap();
        shuttle(now, &mut h, &mut g, usize::MAX);
        assert_eq!(events(&mut g), [Event::Volume(muted)]);
    }

    #[test]
    fn version_mismatch_is_refused_with_a_clear_error() {
        let now = Instant::now();
        let (_, mut h) = pair(now);
        let hello = Hello {
            min_version: 2,
            max_version: 3,
            role: Role::Guest,
            software: "future".into(),
            epoch: 1,
            clock_id: String::new(),
            capabilities: caps(),
        };
        let mut wire = Vec::new();
        encode_frame(&mut wire, FrameKind::Hello, 0, 0, &encode_control("hello", &hello).unwrap()).unwrap();
        h.handle_input(now, &wire);
        let ev = events(&mut h);
        let Some(Event::Closed(reason)) = ev.last() else { panic!("{ev:?}") };
        let text = reason.to_string();
        assert!(text.contains("peer speaks 2..=3") && text.contains("speaks 1..=1"), "{text}");

        // The guest learns why.
        let (mut g, _) = pair(now);
        g.consume_output(usize::MAX);
        let refuse = h.pending_output().to_vec();
        g.handle_input(now, &refuse);
        let ev = events(&mut g);
        assert!(
            matches!(&ev[..], [Event::Closed(CloseReason::Refused(t))] if t.contains("version mismatch")),
            "{ev:?}"
        );
    }

    #[test]
    fn heartbeats_keep_it_alive_and_silence_closes_it() {
        let t0 = Instant::now();
        let (mut g, mut h) = established(t0);
        for s in 1..=20 {
            let now = t0 + Duration::from_millis(500 * s);
            g.handle_timeout(now);
            h.handle_timeout(now);
            shuttle(now, &mut g, &mut h, usize::MAX);
            shuttle(now, &mut h, &mut g, usize::MAX);
        }
        assert!(g.is_established() && h.is_established());
        assert!(events(&mut h).is_empty());
        // Now the guest falls silent.
        let last = t0 + Duration::from_millis(10_000);
        let mut now = last;
        while !h.is_closed() {
            now = h.poll_timeout().unwrap();
            h.handle_timeout(now);
        }
        assert!(now - last <= Duration::from_secs(5));
        assert!(matches!(events(&mut h).last(), Some(Event::Closed(CloseReason::PeerTimeout(_)))));
    }

    /// Each side measures the round trip on its own clock from the echo of its heartbeat,
    /// however far apart the two clocks are.
    #[test]
    fn echoed_heartbeats_measure_the_round_trip() {
        let t0 = Instant::now();
        let mut g = SessionConfig::new(Role::Guest, "guest-test", caps());
        g.origin_ns = 5_000_000_000;
        let mut h = SessionConfig::new(Role::Host, "host-test", caps());
        h.origin_ns = 987_654_321_000_000;
        let (mut g, mut h) = (Session::new(g, t0), Session::new(h, t0));
        shuttle(t0, &mut g, &mut h, usize::MAX);
        shuttle(t0, &mut h, &mut g, usize::MAX);
        assert_eq!(g.rtt(), None);
        let one_way = Duration::from_millis(3);
        for s in 1..=10u32 {
            // The guest's beat takes 3 ms to arrive; the host answers 400 ms later, 3 ms again.
            let beat = t0 + Duration::from_secs(s.into());
            g.handle_timeout(beat);
            shuttle(beat + one_way, &mut g, &mut h, usize::MAX);
            let answer = beat + Duration::from_millis(400);
            h.handle_timeout(answer);
            shuttle(answer + one_way, &mut h, &mut g, usize::MAX);
        }
        let rtt = g.rtt().expect("the guest measured the round trip");
        assert!(rtt.abs_diff(2 * one_way) < Duration::from_micros(10), "{rtt:?}");
        assert!(h.rtt().is_some_and(|r| r.abs_diff(2 * one_way) < Duration::from_micros(10)));
    }

    #[test]
    fn handshake_times_out() {
        let t0 = Instant::now();
        let (mut g, mut h) = pair(t0);
        assert_eq!(g.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        // A host waits without limit for the first byte (QEMU's socket exists long
        // before the guest's module), then allows 5 s for the rest of the handshake.
        assert_eq!(h.poll_timeout(), None);
        let t1 = t0 + Duration::from_secs(3600);
        h.handle_input(t1, &g.pending_output()[..3]);
        assert_eq!(h.poll_timeout(), Some(t1 + Duration::from_secs(5)));
        h.handle_timeout(t1 + Duration::from_secs(5));
        assert!(matches!(events(&mut h)[..], [Event::Closed(CloseReason::HandshakeTimeout(_))]));
        g.handle_timeout(t0 + Duration::from_secs(5));
        assert!(matches!(events(&mut g)[..], [Event::Closed(CloseReason::HandshakeTimeout(_))]));
    }

    fn hello_frame(epoch: u64) -> Vec<u8> {
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Guest,
            software: "storm".into(),
            epoch,
            clock_id: String::new(),
            capabilities: caps(),
        };
        let mut wire = Vec::new();
        encode_frame(&mut wire, FrameKind::Hello, 0, 0, &encode_control("hello", &hello).unwrap()).unwrap();
        wire
    }

    #[test]
    fn a_handshake_storm_closes_the_session() {
        let t0 = Instant::now();
        let (_, mut h) = pair(t0);
        for i in 0..20u64 {
            h.handle_input(t0 + Duration::from_millis(i * 100), &hello_frame(i));
        }
        assert!(h.is_established(), "20 handshakes a minute are allowed");
        h.handle_input(t0 + Duration::from_secs(3), &hello_frame(99));
        assert!(matches!(events(&mut h).last(), Some(Event::Closed(CloseReason::HandshakeStorm(20)))));
        // Spread over more than a minute, the same number is fine.
        let (_, mut h) = pair(t0);
        for i in 0..40u64 {
            h.handle_input(t0 + Duration::from_secs(i * 4), &hello_frame(i));
        }
        assert!(h.is_established());
    }

    #[test]
    fn control_frames_over_the_rate_limit_are_dropped_and_reported() {
        let t0 = Instant::now();
        let (mut g, mut h) = established(t0);
        let mut wire = Vec::new();
        for _ in 0..250 {
            encode_frame(
                &mut wire,
                FrameKind::Heartbeat,
                0,
                0,
                &encode_control("heartbeat", &Heartbeat { sent_ns: 1, echo_ns: 0, echo_hold_ns: 0 }).unwrap(),
            )
            .unwrap();
        }
        h.handle_input(t0, &wire);
        g.open_stream(1, &open()).unwrap();
        shuttle(t0, &mut g, &mut h, usize::MAX);
        // The hello, 250 heartbeats, then the stream-open: over 200 this second, dropped.
        assert!(!events(&mut h).iter().any(|e| matches!(e, Event::StreamOpened { .. })));
        let t1 = t0 + Duration::from_secs(1);
        h.handle_input(t1, &wire[..wire.len() / 250]);
        let ev = events(&mut h);
        assert!(matches!(ev[..], [Event::Error(SessionError::ControlFlood { dropped: 52, limit: 200 })]), "{ev:?}");
        assert!(h.is_established());
    }

    #[test]
    fn a_peer_that_stops_reading_loses_the_oldest_media_and_is_dropped_only_at_the_output_limit() {
        let t0 = Instant::now();
        let (mut g, _h) = established(t0);
        g.open_stream(1, &open()).unwrap();
        // Media for a peer that does not read: the newest stays, the oldest goes.
        for seq in 0..10_000u32 {
            let packet = MediaPacket { seq, pts_ns: 0, duration: 480, data: vec![seq as u8; 1920] };
            g.send_media(1, &packet).unwrap();
        }
        assert!(!g.is_closed(), "media alone never closes a session");
        let queued = g.pending_output().len();
        assert!(queued <= 192 * 1024 + 1024, "{queued} bytes queued");
        let frame = 16 + MEDIA_HEADER_LEN + 1920;
        let kept = (queued / frame) as u64;
        assert_eq!(g.media_dropped(1), 10_000 - kept);
        // The last frame queued is the last packet sent.
        assert!(g.pending_output()[queued - 1920..].iter().all(|b| *b == (9_999u32 as u8)));
        // Control is never dropped: a peer that reads none of it is cut off at the limit.
        let mut sent = 0;
        while !g.is_closed() {
            g.close_stream(1, "again");
            let _ = g.open_stream(1, &open());
            sent += 1;
            assert!(sent < 100_000, "output grew without limit");
        }
        assert!(matches!(events(&mut g).last(), Some(Event::Closed(CloseReason::PeerNotReading(n))) if *n > 1 << 20));
        assert!(g.pending_output().is_empty(), "nothing is kept for a peer that does not read");
    }

    #[test]
    fn unknown_kinds_are_skipped_unless_critical() {
        let now = Instant::now();
        let (_, mut h) = established(now);
        let mut wire = Vec::new();
        encode_frame(&mut wire, FrameKind::Unknown(0x7E), 0, 0, b"future").unwrap();
        h.handle_input(now, &wire);
        assert!(matches!(events(&mut h)[..], [Event::Error(SessionError::UnknownKind(0x7E))]));
        assert!(h.is_established());
        wire.clear();
        encode_frame(&mut wire, FrameKind::Unknown(0x7F), FLAG_CRITICAL, 0, b"future").unwrap();
        h.handle_input(now, &wire);
        assert!(matches!(events(&mut h)[..], [Event::Closed(CloseReason::UnknownCritical(0x7F))]));
    }

    #[test]
    fn media_for_unknown_stream_and_stream_limit() {
        let now = Instant::now();
        let (mut g, mut h) = established(now);
        let mut wire = Vec::new();
        let mut payload = Vec::new();
        MediaPacket { seq: 0, pts_ns: 0, duration: 1, data: vec![] }.encode_into(&mut payload);
        encode_frame(&mut wire, FrameKind::Media, 0, 9, &payload).unwrap();
        h.handle_input(now, &wire);
        assert!(matches!(events(&mut h)[..], [Event::Error(SessionError::UnknownStream(9))]));
        for id in 1..=5 {
            g.open_stream(id, &open()).unwrap();
        }
        shuttle(now, &mut g, &mut h, usize::MAX);
        let ev = events(&mut h);
        assert_eq!(ev.iter().filter(|e| matches!(e, Event::StreamOpened { .. })).count(), 4);
        assert!(matches!(ev.last(), Some(Event::Error(SessionError::TooManyStreams { stream: 5, limit: 4 }))));
        shuttle(now, &mut h, &mut g, usize::MAX);
        assert!(matches!(events(&mut g)[..], [Event::StreamRejected { stream: 5, .. }]));
        assert_eq!(
            g.send_media(5, &MediaPacket { seq: 0, pts_ns: 0, duration: 1, data: vec![] }),
            Err(SessionError::UnknownStream(5))
        );
    }

    #[test]
    fn a_second_hello_restarts_the_session() {
        let now = Instant::now();
        let (mut g, mut h) = established(now);
        g.open_stream(1, &open()).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        events(&mut h);
        let (mut g2, _) = pair(now);
        shuttle(now, &mut g2, &mut h, usize::MAX);
        let ev = events(&mut h);
        assert!(matches!(&ev[..], [Event::PeerRestarted, Event::Established(_)]), "{ev:?}");
        // The old stream is gone: its media is now an error.
        g.send_media(1, &MediaPacket { seq: 0, pts_ns: 0, duration: 1, data: vec![] }).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        assert!(matches!(events(&mut h)[..], [Event::Error(SessionError::UnknownStream(1))]));
    }
}
