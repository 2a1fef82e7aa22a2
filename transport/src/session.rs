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
//!
//! **Audio first.** Output waits in two queues: control and audio, and the bulk of
//! encoded streams (access units, cut into frames of at most 16 KiB). The port is given
//! the bulk queue one frame at a time, and only while nothing waits in the first: an
//! audio packet waits at most for the rest of one bulk frame. Access units that cannot
//! go in time ([`SessionConfig::max_queued_bulk`]) are dropped whole, and the stream's
//! next ones until a keyframe; control of an encoded stream (its flush, end, close)
//! goes in the bulk queue behind its access units, so it never overtakes them.
//!
//! **Reassembly.** An incoming access unit is held until its last frame; its announced
//! size is checked against [`SessionConfig::max_access_unit`] and, with every other unit
//! being received, [`SessionConfig::max_reassembly`] before anything is buffered.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::frame::{
    encode_frame, Frame, FrameDecoder, FrameError, FrameKind, Header, FLAG_CRITICAL, FRAME_VERSION, MAX_PAYLOAD,
};
use crate::message::{
    decode_control, encode_control, AccessUnit, Capabilities, CaptureDemand, Heartbeat, Hello, MediaPacket,
    MessageError, Reason, Role, StreamControl, StreamEnd, StreamLatency, StreamOpen, Volume, Welcome, AU_HEADER_LEN,
    MAX_ACCESS_UNIT, MEDIA_HEADER_LEN, PROTOCOL_MAX, PROTOCOL_MIN,
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
    /// Most bytes of access units waiting for the port; beyond it the stream's queued
    /// units are dropped whole, and its next ones until a keyframe (and counted,
    /// [`Session::units_dropped`]). Default 1 MiB: a second of 8 Mbit/s video.
    pub max_queued_bulk: usize,
    /// Largest access unit accepted from the peer. Default [`MAX_ACCESS_UNIT`] (8 MiB).
    pub max_access_unit: usize,
    /// Most bytes of incoming access units held while their frames arrive, all streams
    /// together (announced sizes). Default 16 MiB.
    pub max_reassembly: usize,
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
            max_queued_bulk: 1 << 20,
            max_access_unit: MAX_ACCESS_UNIT,
            max_reassembly: 16 << 20,
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
    /// A whole access unit of an encoded stream the peer sends.
    AccessUnit {
        /// Stream id.
        stream: u32,
        /// The access unit.
        au: AccessUnit,
    },
    /// Control of an encoded stream: from its sender (flush, pause, resume, end of
    /// stream) or, for a stream we send, from its receiver (keyframe request).
    StreamControl {
        /// Stream id.
        stream: u32,
        /// What.
        control: StreamControl,
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
    /// An access unit that breaks the rules: too large, cut short by the next, more
    /// bytes than announced, data without a start, or over the reassembly budget.
    #[error("stream {stream}: access unit dropped: {what}")]
    BadAccessUnit {
        /// Stream id.
        stream: u32,
        /// What was wrong.
        what: String,
    },
    /// A call by the edge that is not allowed now (not a peer problem).
    #[error("session is not established")]
    NotEstablished,
    /// A stream the peer said it cannot take (its capabilities); not sent.
    #[error("the peer does not take {kind} {codec}")]
    PeerCannotTake {
        /// The media kind.
        kind: &'static str,
        /// The codec.
        codec: &'static str,
    },
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
            SessionError::BadAccessUnit { .. } => "bad access unit",
            SessionError::PeerCannotTake { .. } => "not taken by the peer",
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
    /// This side cannot serve a session now (a broker without a host), and says why.
    #[error("{0}")]
    Unavailable(String),
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
    /// Access units' frames, and the control of their streams (see the module docs).
    bulk: OutQueue,
    /// Media frames dropped per stream because the port fell behind.
    media_dropped: BTreeMap<u32, u64>,
    /// Outgoing encoded streams: their control goes behind their access units.
    bulk_streams: BTreeSet<u32>,
    /// Outgoing encoded streams that dropped access units and wait for a keyframe.
    awaiting_keyframe: BTreeSet<u32>,
    /// Access units dropped per outgoing stream.
    units_dropped: BTreeMap<u32, u64>,
    /// The next access unit's number in the bulk queue.
    next_unit: u64,
    /// Incoming encoded streams.
    incoming_encoded: BTreeSet<u32>,
    /// Incoming access units whose frames are arriving, by stream, and their announced
    /// sizes' sum.
    assembling: BTreeMap<u32, (AccessUnit, usize)>,
    assembling_bytes: usize,
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
    /// Host side: refuse every hello with this reason ([`Session::refuse_hellos`]).
    refusal: Option<String>,
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
            bulk: OutQueue::default(),
            media_dropped: BTreeMap::new(),
            bulk_streams: BTreeSet::new(),
            awaiting_keyframe: BTreeSet::new(),
            units_dropped: BTreeMap::new(),
            next_unit: 0,
            incoming_encoded: BTreeSet::new(),
            assembling: BTreeMap::new(),
            assembling_bytes: 0,
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
            refusal: None,
            control_window: (now, 0),
            config,
        };
        if s.config.role == Role::Guest {
            s.send_hello();
        }
        s
    }

    /// Host side: refuses every hello from now on with `reason` (one line), or accepts
    /// them again with `None`. The peer learns the reason at once.
    pub fn refuse_hellos(&mut self, reason: Option<String>) {
        self.refusal = reason;
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

    /// Bytes to write to the port next: control and audio, or, when none wait (or
    /// a bulk frame is half written), one frame of the bulk queue. Empty when nothing
    /// waits; call again after [`Session::consume_output`] for more.
    pub fn pending_output(&self) -> &[u8] {
        if self.bulk_turn() {
            self.bulk.pending_frame()
        } else {
            self.out.pending()
        }
    }

    /// Marks `n` bytes of [`Session::pending_output`] as written.
    pub fn consume_output(&mut self, n: usize) {
        if self.bulk_turn() {
            self.bulk.consume(n);
        } else {
            self.out.consume(n);
        }
    }

    /// True when the bulk queue has the port: its frame is begun, or nothing else waits.
    fn bulk_turn(&self) -> bool {
        self.bulk.frame_begun() || (self.out.pending().is_empty() && self.bulk.len() > 0)
    }

    /// Bytes of access units (and their streams' control) waiting for the port.
    pub fn queued_bulk_bytes(&self) -> usize {
        self.bulk.len()
    }

    /// Access units of `stream` dropped so far because the port fell behind.
    pub fn units_dropped(&self, stream: u32) -> u64 {
        self.units_dropped.get(&stream).copied().unwrap_or(0)
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
        if let Some(peer) = &self.peer {
            if !peer.capabilities.accepts(&open.media, &open.codec) {
                return Err(SessionError::PeerCannotTake { kind: open.media.name(), codec: open.codec.name() });
            }
        }
        let payload = encode_control("stream-open", open)?;
        self.outgoing.insert(stream);
        if open.media.is_encoded() {
            self.bulk_streams.insert(stream);
        }
        self.push_frame(FrameKind::StreamOpen, stream, &payload);
        Ok(())
    }

    /// Ends a stream we opened. Unknown ids are ignored (already closed or rejected).
    /// An encoded stream's close goes after its queued access units.
    pub fn close_stream(&mut self, stream: u32, reason: &str) {
        if self.state != State::Established || !self.outgoing.remove(&stream) {
            return;
        }
        self.awaiting_keyframe.remove(&stream);
        let end = StreamEnd { reason: reason.into() };
        if self.bulk_streams.remove(&stream) {
            self.push_bulk_control(FrameKind::StreamClose, stream, "stream-close", &end);
        } else {
            self.send_control(FrameKind::StreamClose, stream, "stream-close", &end);
        }
    }

    /// Queues an access unit of an open outgoing encoded stream; `Ok(false)` when it
    /// was dropped instead: the stream waits for a keyframe after a drop, and units
    /// that would pass [`SessionConfig::max_queued_bulk`] go (the stream's queued ones
    /// first). Counted in [`Session::units_dropped`].
    pub fn send_access_unit(&mut self, stream: u32, au: &AccessUnit) -> Result<bool, SessionError> {
        self.require_established()?;
        if !self.bulk_streams.contains(&stream) {
            return Err(SessionError::UnknownStream(stream));
        }
        if au.data.len() > MAX_ACCESS_UNIT {
            return Err(MessageError::TooLarge { kind: "access unit", len: au.data.len() }.into());
        }
        if !au.is_keyframe() && self.awaiting_keyframe.contains(&stream) {
            *self.units_dropped.entry(stream).or_default() += 1;
            return Ok(false);
        }
        let frames = au.data.len().saturating_sub(MAX_PAYLOAD - AU_HEADER_LEN).div_ceil(MAX_PAYLOAD) + 1;
        let size = au.data.len() + AU_HEADER_LEN + frames * crate::frame::HEADER_LEN;
        if self.bulk.len() + size > self.config.max_queued_bulk {
            // Late: what this stream has queued goes, and the stream starts again at a
            // keyframe (this one, if it is one and fits).
            let dropped = &mut self.units_dropped;
            self.bulk.drop_units(|s, _| s == stream, |s, _| *dropped.entry(s).or_default() += 1);
            if !au.is_keyframe() || self.bulk.len() + size > self.config.max_queued_bulk {
                *self.units_dropped.entry(stream).or_default() += 1;
                self.awaiting_keyframe.insert(stream);
                return Ok(false);
            }
        }
        self.awaiting_keyframe.remove(&stream);
        let unit = self.next_unit;
        self.next_unit += 1;
        let first = au.data.len().min(MAX_PAYLOAD - AU_HEADER_LEN);
        let header = |kind, len: usize| Header {
            version: FRAME_VERSION,
            kind,
            flags: 0,
            stream,
            len: u16::try_from(len).unwrap_or(u16::MAX),
        };
        self.bulk.push_unit(stream, unit, |out| {
            out.extend_from_slice(&header(FrameKind::AuStart, AU_HEADER_LEN + first).encode());
            au.encode_header(out);
            out.extend_from_slice(&au.data[..first]);
        });
        for chunk in au.data[first..].chunks(MAX_PAYLOAD) {
            self.bulk.push_unit(stream, unit, |out| {
                out.extend_from_slice(&header(FrameKind::AuData, chunk.len()).encode());
                out.extend_from_slice(chunk);
            });
        }
        Ok(true)
    }

    /// Sends control of an encoded stream: [`StreamControl::KeyframeRequest`] for a
    /// stream the peer sends us, the others for one we send (after its queued access
    /// units; a flush first drops those, unsent).
    pub fn send_stream_control(&mut self, stream: u32, control: StreamControl) -> Result<(), SessionError> {
        self.require_established()?;
        if control == StreamControl::KeyframeRequest {
            if !self.incoming_encoded.contains(&stream) {
                return Err(SessionError::UnknownStream(stream));
            }
            self.send_control(FrameKind::StreamControl, stream, "stream-control", &control);
            return Ok(());
        }
        if !self.bulk_streams.contains(&stream) {
            return Err(SessionError::UnknownStream(stream));
        }
        if control == StreamControl::Flush {
            self.bulk.drop_units(|s, _| s == stream, |_, _| {});
            self.awaiting_keyframe.remove(&stream);
        }
        self.push_bulk_control(FrameKind::StreamControl, stream, "stream-control", &control);
        Ok(())
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

    /// Queues a control frame of an encoded stream in the bulk queue, behind its units.
    fn push_bulk_control<T: serde::Serialize>(&mut self, kind: FrameKind, stream: u32, name: &'static str, msg: &T) {
        let payload = match encode_control(name, msg) {
            Ok(payload) => payload,
            Err(e) => return self.events.push_back(Event::Error(e.into())),
        };
        let mut result = Ok(());
        self.bulk.push(None, |out| result = encode_frame(out, kind, 0, stream, &payload));
        if let Err(e) = result {
            self.events.push_back(Event::Error(e.into()));
        }
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
        let media = matches!(header.kind, FrameKind::Media | FrameKind::AuStart | FrameKind::AuData);
        if !media && !self.admit_control(now) {
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
                self.incoming_encoded.remove(&header.stream);
                self.forget_assembly(header.stream);
                let reason = decode_control::<StreamEnd>("stream-close", &payload)
                    .map_or_else(|e| e.to_string(), |r| sanitize(&r.reason));
                self.events.push_back(Event::StreamClosed { stream: header.stream, reason });
            }
            (FrameKind::StreamReject, State::Established) => {
                if !self.outgoing.remove(&header.stream) {
                    self.events.push_back(Event::Error(SessionError::UnknownStream(header.stream)));
                    return;
                }
                if self.bulk_streams.remove(&header.stream) {
                    let stream = header.stream;
                    self.bulk.drop_units(|s, _| s == stream, |_, _| {});
                    self.awaiting_keyframe.remove(&stream);
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
            (FrameKind::AuStart, State::Established) => self.on_au_start(header.stream, &payload),
            (FrameKind::AuData, State::Established) => self.on_au_data(header.stream, &payload),
            (FrameKind::StreamControl, State::Established) => self.on_stream_control(header.stream, &payload),
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
        let hello = match Hello::decode(payload) {
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
            self.bulk_streams.clear();
            self.awaiting_keyframe.clear();
            self.bulk.clear();
            self.incoming_encoded.clear();
            self.assembling.clear();
            self.assembling_bytes = 0;
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
        if let Some(reason) = self.refusal.clone() {
            self.refuse(CloseReason::Unavailable(reason));
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
        match Welcome::decode(payload) {
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
                if open.media.is_encoded() {
                    self.incoming_encoded.insert(stream);
                }
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

    fn bad_unit(&mut self, stream: u32, what: impl Into<String>) {
        self.events.push_back(Event::Error(SessionError::BadAccessUnit { stream, what: what.into() }));
    }

    /// Forgets a half-received access unit; true if there was one.
    fn forget_assembly(&mut self, stream: u32) -> bool {
        match self.assembling.remove(&stream) {
            Some((_, size)) => {
                self.assembling_bytes -= size;
                true
            }
            None => false,
        }
    }

    fn on_au_start(&mut self, stream: u32, payload: &[u8]) {
        if !self.incoming_encoded.contains(&stream) {
            self.events.push_back(Event::Error(SessionError::UnknownStream(stream)));
            return;
        }
        if self.forget_assembly(stream) {
            self.bad_unit(stream, "cut short by the next one");
        }
        let (mut au, size, first) = match AccessUnit::decode_header(payload) {
            Ok(parts) => parts,
            Err(e) => {
                self.events.push_back(Event::Error(e.into()));
                return;
            }
        };
        if size > self.config.max_access_unit {
            self.bad_unit(stream, format!("{size} bytes, over the limit of {}", self.config.max_access_unit));
            return;
        }
        if first.len() > size {
            self.bad_unit(stream, format!("{} bytes in its first frame, {size} announced", first.len()));
            return;
        }
        if first.len() == size {
            au.data = first.to_vec();
            self.events.push_back(Event::AccessUnit { stream, au });
            return;
        }
        if self.assembling_bytes + size > self.config.max_reassembly {
            let limit = self.config.max_reassembly;
            self.bad_unit(stream, format!("{size} bytes would pass the {limit} bytes held for reassembly"));
            return;
        }
        // Grown as frames arrive: a peer that announces much and sends little costs
        // the budget, not memory.
        au.data = Vec::with_capacity(size.min(64 * 1024));
        au.data.extend_from_slice(first);
        self.assembling_bytes += size;
        self.assembling.insert(stream, (au, size));
    }

    fn on_au_data(&mut self, stream: u32, payload: &[u8]) {
        let Some((au, size)) = self.assembling.get_mut(&stream) else {
            if self.incoming_encoded.contains(&stream) {
                self.bad_unit(stream, "data without a start");
            } else {
                self.events.push_back(Event::Error(SessionError::UnknownStream(stream)));
            }
            return;
        };
        let (have, size) = (au.data.len(), *size);
        if have + payload.len() > size {
            self.forget_assembly(stream);
            self.bad_unit(stream, format!("{} bytes, {size} announced", have + payload.len()));
            return;
        }
        au.data.extend_from_slice(payload);
        if au.data.len() == size {
            if let Some((au, size)) = self.assembling.remove(&stream) {
                self.assembling_bytes -= size;
                self.events.push_back(Event::AccessUnit { stream, au });
            }
        }
    }

    fn on_stream_control(&mut self, stream: u32, payload: &[u8]) {
        let control = match decode_control::<StreamControl>("stream-control", payload) {
            Ok(c) => c,
            Err(e) => {
                self.events.push_back(Event::Error(e.into()));
                return;
            }
        };
        let ours = control == StreamControl::KeyframeRequest;
        let known = if ours { self.bulk_streams.contains(&stream) } else { self.incoming_encoded.contains(&stream) };
        if !known {
            self.events.push_back(Event::Error(SessionError::UnknownStream(stream)));
            return;
        }
        if control == StreamControl::Flush {
            self.forget_assembly(stream);
        }
        self.events.push_back(Event::StreamControl { stream, control });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AppInfo, AudioFormat, Codec, MediaKind};

    fn caps() -> Capabilities {
        Capabilities { codecs: 3, max_streams: 4, kinds: crate::message::kind_bits::AUDIO }
    }

    fn pair(now: Instant) -> (Session, Session) {
        let mut g = SessionConfig::new(Role::Guest, "guest-test", caps());
        g.epoch = 7;
        let h = SessionConfig::new(Role::Host, "host-test", caps());
        (Session::new(g, now), Session::new(h, now))
    }

    /// Moves all pending bytes from `a` to `b`, optionally in pieces of `chunk` bytes.
    fn shuttle(now: Instant, a: &mut Session, b: &mut Session, chunk: usize) {
        for bytes in drain(a) {
            for piece in bytes.chunks(chunk.max(1)) {
                b.handle_input(now, piece);
            }
        }
    }

    /// Everything `a` has to write, in the pieces it hands out.
    fn drain(a: &mut Session) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| {
            let bytes = a.pending_output().to_vec();
            a.consume_output(bytes.len());
            (!bytes.is_empty()).then_some(bytes)
        })
        .collect()
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
            codec_data: Vec::new(),
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
        // A v1 guest's hello, as v1 wrote it (its capabilities end before `kinds`).
        let v1_hello = [1, 1, 0, 2, b'v', b'1', 1, 0, 3, 64];
        let mut wire = Vec::new();
        encode_frame(&mut wire, FrameKind::Hello, 0, 0, &v1_hello).unwrap();
        h.handle_input(now, &wire);
        let ev = events(&mut h);
        let Some(Event::Closed(reason)) = ev.last() else { panic!("{ev:?}") };
        let text = reason.to_string();
        assert!(text.contains("peer speaks 1..=1") && text.contains("speaks 2..=2"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");

        let (_, mut h) = pair(now);
        let hello = Hello {
            min_version: 3,
            max_version: 4,
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
        assert!(text.contains("peer speaks 3..=4") && text.contains("speaks 2..=2"), "{text}");

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
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
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

    fn all_caps() -> Capabilities {
        use crate::message::{codec_bits, kind_bits};
        Capabilities {
            codecs: codec_bits::PCM_S16LE | codec_bits::ENCODED,
            max_streams: 4,
            kinds: kind_bits::AUDIO | kind_bits::ENCODED_AUDIO | kind_bits::ENCODED_VIDEO,
        }
    }

    fn established_v2(now: Instant, host: impl FnOnce(&mut SessionConfig)) -> (Session, Session) {
        let g = SessionConfig::new(Role::Guest, "guest-test", all_caps());
        let mut h = SessionConfig::new(Role::Host, "host-test", all_caps());
        host(&mut h);
        let (mut g, mut h) = (Session::new(g, now), Session::new(h, now));
        shuttle(now, &mut g, &mut h, usize::MAX);
        shuttle(now, &mut h, &mut g, usize::MAX);
        events(&mut g);
        events(&mut h);
        (g, h)
    }

    fn video() -> StreamOpen {
        use crate::message::VideoFormat;
        StreamOpen {
            media: MediaKind::EncodedVideo(VideoFormat {
                width: 1280,
                height: 720,
                framerate_num: 30,
                framerate_den: 1,
            }),
            codec: Codec::H264,
            frame_samples: 0,
            app: AppInfo { name: "player".into(), ..Default::default() },
            codec_data: vec![1, 2, 3],
        }
    }

    fn unit(seq: u32, size: usize, key: bool) -> AccessUnit {
        use crate::message::au_flags;
        AccessUnit {
            seq,
            flags: if key { au_flags::KEYFRAME } else { 0 },
            pts_ns: u64::from(seq) * 33_333_333,
            dts_ns: 0,
            duration_ns: 33_333_333,
            data: (0..size).map(|i| (i as u32 ^ seq) as u8).collect(),
        }
    }

    fn units(ev: &[Event]) -> Vec<&AccessUnit> {
        ev.iter().filter_map(|e| if let Event::AccessUnit { au, .. } = e { Some(au) } else { None }).collect()
    }

    #[test]
    fn access_units_of_any_size_arrive_whole_whatever_the_cuts() {
        let now = Instant::now();
        for chunk in [1, 7, 16_384, 100_000] {
            let (mut g, mut h) = established_v2(now, |_| {});
            g.open_stream(3, &video()).unwrap();
            let sent = [unit(0, 200_000, true), unit(1, 0, false), unit(2, 16_348, false), unit(3, 16_349, false)];
            for au in &sent {
                assert!(g.send_access_unit(3, au).unwrap());
            }
            g.close_stream(3, "done");
            shuttle(now, &mut g, &mut h, chunk);
            let ev = events(&mut h);
            assert!(matches!(&ev[0], Event::StreamOpened { stream: 3, open } if *open == video()), "{ev:?}");
            assert_eq!(units(&ev), sent.iter().collect::<Vec<_>>(), "cut in pieces of {chunk}");
            assert!(matches!(ev.last(), Some(Event::StreamClosed { stream: 3, .. })));
            assert_eq!(h.assembling_bytes, 0);
        }
    }

    /// A 200 KB keyframe waits behind nothing: audio queued after it goes out after
    /// at most the one video frame the port has begun.
    #[test]
    fn audio_is_written_before_the_video_that_waits() {
        let now = Instant::now();
        let (mut g, mut h) = established_v2(now, |_| {});
        g.open_stream(1, &open()).unwrap();
        g.open_stream(2, &video()).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        events(&mut h);
        g.send_access_unit(2, &unit(0, 200_000, true)).unwrap();
        // The port takes half of the first video frame, then an audio packet arrives.
        let first = g.pending_output().len();
        assert!(first <= crate::frame::MAX_FRAME);
        let half = g.pending_output()[..first / 2].to_vec();
        g.consume_output(first / 2);
        h.handle_input(now, &half);
        let packet = MediaPacket { seq: 0, pts_ns: 0, duration: 480, data: vec![1; 1920] };
        g.send_media(1, &packet).unwrap();
        // The video frame is finished first (framing), then the audio, then the rest.
        let pieces = drain(&mut g);
        assert_eq!(pieces[0].len(), first - first / 2);
        assert_eq!(pieces[1].len(), crate::frame::HEADER_LEN + MEDIA_HEADER_LEN + 1920);
        assert!(pieces.len() > 10);
        let mut order = Vec::new();
        for p in &pieces {
            h.handle_input(now, p);
            order.extend(events(&mut h).into_iter().map(|e| matches!(e, Event::Media { .. })));
        }
        assert_eq!(order, [true, false], "audio first, then the whole access unit");
    }

    #[test]
    fn late_video_is_dropped_whole_until_a_keyframe_and_counted() {
        let now = Instant::now();
        let (mut g, mut h) = established_v2(now, |_| {});
        g.config.max_queued_bulk = 100_000;
        g.open_stream(2, &video()).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        // Units of 20 kB, a keyframe every 6, on a port that takes 12 kB a unit's time.
        let mut got = Vec::new();
        for seq in 0..60 {
            g.send_access_unit(2, &unit(seq, 20_000, seq % 6 == 0)).unwrap();
            assert!(g.queued_bulk_bytes() <= 100_000);
            let mut budget = 12_000;
            while budget > 0 && !g.pending_output().is_empty() {
                let n = g.pending_output().len().min(budget);
                let bytes = g.pending_output()[..n].to_vec();
                g.consume_output(n);
                h.handle_input(now, &bytes);
                budget -= n;
            }
            got.extend(units(&events(&mut h)).iter().map(|a| a.seq));
        }
        shuttle(now, &mut g, &mut h, usize::MAX);
        got.extend(units(&events(&mut h)).iter().map(|a| a.seq));
        assert!(g.units_dropped(2) > 0);
        assert_eq!(got.len() as u64 + g.units_dropped(2), 60, "{got:?}");
        // In order, and after every gap the stream starts again at a keyframe.
        for w in got.windows(2) {
            assert!(w[1] > w[0], "{got:?}");
            assert!(w[1] == w[0] + 1 || w[1] % 6 == 0, "a gap not ended by a keyframe: {got:?}");
        }
    }

    #[test]
    fn a_flush_drops_unsent_units_and_control_never_overtakes_them() {
        let now = Instant::now();
        let (mut g, mut h) = established_v2(now, |_| {});
        g.open_stream(2, &video()).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        for seq in 0..4 {
            g.send_access_unit(2, &unit(seq, 30_000, seq == 0)).unwrap();
        }
        // The port has begun unit 0: it stays whole, 1..3 go, the flush follows it.
        let begun = g.pending_output().len() / 2;
        let bytes = g.pending_output()[..begun].to_vec();
        g.consume_output(begun);
        h.handle_input(now, &bytes);
        g.send_stream_control(2, StreamControl::Flush).unwrap();
        g.send_access_unit(2, &unit(10, 5_000, true)).unwrap();
        g.send_stream_control(2, StreamControl::EndOfStream).unwrap();
        g.close_stream(2, "done");
        shuttle(now, &mut g, &mut h, usize::MAX);
        let order: Vec<String> = events(&mut h)
            .into_iter()
            .filter_map(|e| match e {
                Event::AccessUnit { au, .. } => Some(format!("au{}", au.seq)),
                Event::StreamControl { control, .. } => Some(format!("{control:?}")),
                Event::StreamClosed { .. } => Some("close".into()),
                _ => None,
            })
            .collect();
        assert_eq!(order, ["au0", "Flush", "au10", "EndOfStream", "close"]);
        assert_eq!(g.units_dropped(2), 0, "a flush is not a loss");
    }

    #[test]
    fn the_receiver_asks_for_a_keyframe_and_only_for_a_stream_it_receives() {
        let now = Instant::now();
        let (mut g, mut h) = established_v2(now, |_| {});
        g.open_stream(2, &video()).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        events(&mut h);
        assert!(h.send_stream_control(9, StreamControl::KeyframeRequest).is_err());
        assert!(h.send_stream_control(2, StreamControl::Flush).is_err(), "the host does not send stream 2");
        h.send_stream_control(2, StreamControl::KeyframeRequest).unwrap();
        shuttle(now, &mut h, &mut g, usize::MAX);
        assert_eq!(events(&mut g), [Event::StreamControl { stream: 2, control: StreamControl::KeyframeRequest }]);
    }

    #[test]
    fn a_peer_is_never_offered_what_it_cannot_take() {
        let now = Instant::now();
        let (mut g, _h) = established(now); // the host takes tapped audio only
        let err = g.open_stream(2, &video()).unwrap_err();
        assert!(matches!(err, SessionError::PeerCannotTake { kind: "encoded video", codec: "h264" }), "{err}");
        assert!(g.send_access_unit(2, &unit(0, 10, true)).is_err());
    }

    /// Every way a peer can break reassembly costs it one error and the unit, and no
    /// memory beyond the budget: sizes are checked before anything is buffered.
    #[test]
    fn reassembly_refuses_what_breaks_its_limits_before_buffering() {
        use crate::message::AU_HEADER_LEN;
        let now = Instant::now();
        let (mut g, mut h) = established_v2(now, |c| {
            c.max_access_unit = 1 << 20;
            c.max_reassembly = 1_500_000;
        });
        for id in [2, 4] {
            g.open_stream(id, &video()).unwrap();
        }
        shuttle(now, &mut g, &mut h, usize::MAX);
        events(&mut h);
        let start = |stream: u32, size: u32, first: &[u8]| {
            let mut payload = Vec::new();
            AccessUnit { data: Vec::new(), ..unit(0, 0, true) }.encode_header(&mut payload);
            payload[32..AU_HEADER_LEN].copy_from_slice(&size.to_le_bytes());
            payload.extend_from_slice(first);
            let mut wire = Vec::new();
            encode_frame(&mut wire, FrameKind::AuStart, 0, stream, &payload).unwrap();
            wire
        };
        let data = |stream: u32, bytes: &[u8]| {
            let mut wire = Vec::new();
            encode_frame(&mut wire, FrameKind::AuData, 0, stream, bytes).unwrap();
            wire
        };
        let errors = |h: &mut Session| {
            events(h).into_iter().filter(|e| matches!(e, Event::Error(SessionError::BadAccessUnit { .. }))).count()
        };
        // Over the size limit: refused at its start, nothing held.
        h.handle_input(now, &start(2, 2 << 20, &[1]));
        assert_eq!((errors(&mut h), h.assembling_bytes), (1, 0));
        h.handle_input(now, &data(2, &[1; 100]));
        assert_eq!(errors(&mut h), 1, "data without a start");
        // Announced 1 MB and sent 10 bytes: the budget counts the announcement, the
        // memory only what came.
        h.handle_input(now, &start(2, 1 << 20, &[1; 10]));
        assert_eq!(h.assembling_bytes, 1 << 20);
        assert!(h.assembling[&2].0.data.capacity() <= 64 * 1024);
        // A second stream may not pass the budget with its own.
        h.handle_input(now, &start(4, 600_000, &[1; 10]));
        assert_eq!(errors(&mut h), 1);
        // Cut short by the next start; then more bytes than announced.
        h.handle_input(now, &start(2, 20, &[1; 10]));
        assert_eq!(errors(&mut h), 1);
        assert_eq!(h.assembling_bytes, 20);
        h.handle_input(now, &data(2, &[1; 11]));
        assert_eq!((errors(&mut h), h.assembling_bytes), (1, 0));
        // A first frame longer than announced.
        h.handle_input(now, &start(2, 3, &[1; 10]));
        assert_eq!(errors(&mut h), 1);
        // Access-unit frames on an audio stream, or none, are refused too.
        g.open_stream(1, &open()).unwrap();
        shuttle(now, &mut g, &mut h, usize::MAX);
        events(&mut h);
        h.handle_input(now, &start(1, 3, &[1; 3]));
        assert!(matches!(events(&mut h)[..], [Event::Error(SessionError::UnknownStream(1))]));
        // The session went on: a good unit still arrives.
        g.send_access_unit(2, &unit(5, 40_000, true)).unwrap();
        shuttle(now, &mut g, &mut h, 999);
        assert_eq!(units(&events(&mut h)).len(), 1);
        assert!(h.is_established());
    }
}
