//! The guest's media broker, sans-IO: in-app stubs (a player's GStreamer sinks, later
//! others) reach the one virtio port through it.
//!
//! A stub connects to `$XDG_RUNTIME_DIR/melange/media.sock` and speaks the Melange
//! protocol itself, as a guest: its hello, then its streams (encoded audio or video,
//! with codec data and the app's metadata), access units and control. The broker
//! answers as a host would, with the real host's capabilities, and maps each stub
//! stream onto a stream of the port next to the taps ([`Command::Open`]); what the host
//! says of a stream (a refusal, a keyframe request) goes back to its stub.
//!
//! - No host: every hello is refused at once with "no melange-host is connected", so
//!   the app decodes itself; a host that goes says goodbye to every stub.
//! - Budgets per stub: [`MAX_STREAMS_PER_CLIENT`] streams, access units at
//!   [`CLIENT_RATE`] bytes a second with bursts of [`CLIENT_BURST`]; beyond it a stub's
//!   units are dropped until its next keyframe, and counted. Audio never waits for a
//!   stub: the port's session sends bulk after audio.
//! - Garbage on the socket costs the stub its session, nobody else anything (the
//!   session's framing and limits; fuzzed through `fuzz_targets/session.rs`).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use melange_transport::message::{codec_bits, kind_bits, Capabilities, Role, StreamControl, MAX_STREAMS};
use melange_transport::session::{Event, Session, SessionConfig};

use crate::core::{BrokerNote, Command};

/// Stubs connected at once.
pub const MAX_CLIENTS: usize = 16;
/// Streams one stub may have open.
pub const MAX_STREAMS_PER_CLIENT: u16 = 8;
/// Access-unit bytes a second one stub may send on average: 4 MB/s, four times a
/// 4K stream.
pub const CLIENT_RATE: f64 = 4e6;
/// Bytes a stub may send at once beyond its rate (two 4K keyframes).
pub const CLIENT_BURST: f64 = 8e6;
/// What a stub is told when no host is there.
pub const NO_HOST: &str = "no melange-host is connected";

/// A stub's stream on the port.
#[derive(Debug)]
struct Mapped {
    port: u32,
    /// Units are dropped until a keyframe (after the budget ran out).
    awaiting_keyframe: bool,
}

#[derive(Debug)]
struct Client {
    session: Session,
    streams: BTreeMap<u32, Mapped>,
    /// Token bucket of access-unit bytes, and when it was last filled.
    tokens: f64,
    filled: Instant,
    dropped_units: u64,
}

/// See the module docs. Client ids are the driver's (one per connection).
pub struct BrokerCore {
    host: Option<Capabilities>,
    clients: BTreeMap<u64, Client>,
    /// Port stream ids of stub streams, back to (client, stub stream).
    ports: BTreeMap<u32, (u64, u32)>,
    commands: VecDeque<Command>,
    /// Clients that closed (their sockets go).
    gone: BTreeSet<u64>,
    next_port: Box<dyn FnMut() -> u32 + Send>,
}

impl std::fmt::Debug for BrokerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCore")
            .field("host", &self.host.is_some())
            .field("clients", &self.clients.len())
            .field("streams", &self.ports.len())
            .finish()
    }
}

impl BrokerCore {
    /// A broker; `next_port` hands out port stream ids (shared with the taps').
    pub fn new(next_port: impl FnMut() -> u32 + Send + 'static) -> Self {
        Self {
            host: None,
            clients: BTreeMap::new(),
            ports: BTreeMap::new(),
            commands: VecDeque::new(),
            gone: BTreeSet::new(),
            next_port: Box::new(next_port),
        }
    }

    /// True when another stub may connect.
    pub fn has_room(&self) -> bool {
        self.clients.len() < MAX_CLIENTS
    }

    /// A stub connected as `id`.
    pub fn accept(&mut self, now: Instant, id: u64) {
        let caps = self.host.clone().unwrap_or(Capabilities { codecs: 0, max_streams: 0, kinds: 0 });
        let caps = Capabilities {
            codecs: caps.codecs & codec_bits::ENCODED,
            max_streams: MAX_STREAMS_PER_CLIENT.min(MAX_STREAMS),
            kinds: caps.kinds & (kind_bits::ENCODED_AUDIO | kind_bits::ENCODED_VIDEO),
        };
        let mut session = Session::new(SessionConfig::new(Role::Host, "melange-guest media broker", caps), now);
        session.refuse_hellos(self.host.is_none().then(|| NO_HOST.to_string()));
        let client = Client { session, streams: BTreeMap::new(), tokens: CLIENT_BURST, filled: now, dropped_units: 0 };
        self.clients.insert(id, client);
    }

    /// Bytes from stub `id`.
    pub fn input(&mut self, now: Instant, id: u64, bytes: &[u8]) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.session.handle_input(now, bytes);
        }
        self.events(now, id);
    }

    /// Stub `id` hung up.
    pub fn hung_up(&mut self, id: u64) {
        self.close_streams(id, "the player went");
        self.clients.remove(&id);
        self.gone.remove(&id);
    }

    /// What the guest core says of the host and of the stubs' streams.
    pub fn note(&mut self, now: Instant, note: BrokerNote) {
        match note {
            BrokerNote::HostReady(caps) => {
                self.host = Some(caps);
                for c in self.clients.values_mut() {
                    c.session.refuse_hellos(None);
                }
            }
            BrokerNote::HostGone => {
                self.host = None;
                let ids: Vec<u64> = self.clients.keys().copied().collect();
                for id in ids {
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.session.refuse_hellos(Some(NO_HOST.into()));
                        if c.session.is_established() {
                            c.session.close(melange_transport::CloseReason::Unavailable(NO_HOST.into()));
                        }
                    }
                    self.events(now, id);
                }
            }
            BrokerNote::Rejected(port, reason) => {
                if let Some((id, stream)) = self.ports.remove(&port) {
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.streams.remove(&stream);
                        c.session.reject_stream(stream, &reason);
                    }
                }
            }
            BrokerNote::KeyframeRequest(port) => {
                if let Some(&(id, stream)) = self.ports.get(&port) {
                    if let Some(c) = self.clients.get_mut(&id) {
                        let _ = c.session.send_stream_control(stream, StreamControl::KeyframeRequest);
                    }
                }
            }
            BrokerNote::Latency(port, render_ns) => {
                if let Some(&(id, stream)) = self.ports.get(&port) {
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.session.report_latency(stream, render_ns);
                    }
                }
            }
        }
    }

    /// Runs the stubs' session timers.
    pub fn timeout(&mut self, now: Instant) {
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.clients.get_mut(&id) {
                if c.session.poll_timeout().is_some_and(|t| t <= now) {
                    c.session.handle_timeout(now);
                }
            }
            self.events(now, id);
        }
    }

    /// When [`BrokerCore::timeout`] is due next.
    pub fn poll_timeout(&self, now: Instant) -> Duration {
        self.clients
            .values()
            .filter_map(|c| c.session.poll_timeout())
            .min()
            .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now))
    }

    /// Bytes for stub `id`.
    pub fn transmit(&self, id: u64) -> &[u8] {
        self.clients.get(&id).map_or(&[], |c| c.session.pending_output())
    }

    /// Marks `n` bytes of [`BrokerCore::transmit`] written.
    pub fn consume(&mut self, id: u64, n: usize) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.session.consume_output(n);
        }
    }

    /// The next command for the guest core.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// A stub whose session ended: its socket goes now, after the driver wrote what
    /// [`BrokerCore::transmit`] had for it (its refusal or goodbye).
    pub fn poll_gone(&mut self) -> Option<u64> {
        let id = *self.gone.iter().next()?;
        self.gone.remove(&id);
        self.clients.remove(&id);
        Some(id)
    }

    /// Stubs connected.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Closes every port stream of stub `id`.
    fn close_streams(&mut self, id: u64, reason: &str) {
        let Some(c) = self.clients.get_mut(&id) else { return };
        for (_, m) in std::mem::take(&mut c.streams) {
            self.ports.remove(&m.port);
            self.commands.push_back(Command::Close(m.port, reason.into()));
        }
        if std::mem::take(&mut c.dropped_units) > 0 {
            log::warn!("melange broker: player {id}: access units over its budget were dropped");
        }
    }

    fn events(&mut self, now: Instant, id: u64) {
        loop {
            let Some(c) = self.clients.get_mut(&id) else { return };
            let Some(event) = c.session.poll_event() else { return };
            match event {
                Event::Established(peer) => log::info!("melange broker: player {id} connected: {}", peer.software),
                Event::StreamOpened { stream, open } => {
                    if !open.media.is_encoded() {
                        // Tapped audio goes through PipeWire; the session's stream limit
                        // holds the rest.
                        c.session.reject_stream(stream, "a player's audio goes through PipeWire, not the broker");
                        continue;
                    }
                    let port = (self.next_port)();
                    log::info!(
                        "melange broker: player {id} stream {stream} ({}, {} {}) is stream {port}",
                        open.app.name,
                        open.media.name(),
                        open.codec.name()
                    );
                    c.streams.insert(stream, Mapped { port, awaiting_keyframe: false });
                    self.ports.insert(port, (id, stream));
                    self.commands.push_back(Command::Open(port, open));
                }
                Event::AccessUnit { stream, au } => {
                    let Some(m) = c.streams.get_mut(&stream) else { continue };
                    let elapsed = now.saturating_duration_since(c.filled).as_secs_f64();
                    c.filled = now;
                    c.tokens = (c.tokens + elapsed * CLIENT_RATE).min(CLIENT_BURST);
                    let cost = au.data.len() as f64;
                    if (m.awaiting_keyframe && !au.is_keyframe()) || cost > c.tokens {
                        m.awaiting_keyframe = true;
                        c.dropped_units += 1;
                        if c.dropped_units.is_power_of_two() {
                            log::warn!(
                                "melange broker: player {id} sends faster than {} MB/s: {} access units dropped",
                                CLIENT_RATE / 1e6,
                                c.dropped_units
                            );
                        }
                        continue;
                    }
                    m.awaiting_keyframe = false;
                    c.tokens -= cost;
                    self.commands.push_back(Command::AccessUnit(m.port, au));
                }
                Event::StreamControl { stream, control } => {
                    if let Some(m) = c.streams.get(&stream) {
                        self.commands.push_back(Command::Control(m.port, control));
                    }
                }
                Event::StreamClosed { stream, reason } => {
                    if let Some(m) = c.streams.remove(&stream) {
                        self.ports.remove(&m.port);
                        self.commands.push_back(Command::Close(m.port, reason));
                    }
                }
                Event::Closed(reason) => {
                    log::info!("melange broker: player {id}: {reason}");
                    self.close_streams(id, "the player went");
                    self.gone.insert(id);
                    return;
                }
                Event::PeerRestarted => {
                    for (_, m) in std::mem::take(&mut c.streams) {
                        self.ports.remove(&m.port);
                        self.commands.push_back(Command::Close(m.port, "the player started again".into()));
                    }
                }
                Event::Error(e) => log::debug!("melange broker: player {id}: {e}"),
                // A stub sends no audio packets, asks for no device, sets no volume.
                Event::Media { .. }
                | Event::StreamRejected { .. }
                | Event::StreamLatency { .. }
                | Event::CaptureDemand(_)
                | Event::Volume(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use melange_transport::message::{au_flags, AccessUnit, AppInfo, Codec, MediaKind, StreamOpen, VideoFormat};
    use melange_transport::session::CloseReason;

    fn broker() -> BrokerCore {
        let mut next = 100;
        BrokerCore::new(move || {
            next += 1;
            next
        })
    }

    fn host_caps() -> Capabilities {
        Capabilities {
            codecs: codec_bits::PCM_S16LE | codec_bits::OPUS | codec_bits::H264,
            max_streams: 64,
            kinds: kind_bits::AUDIO | kind_bits::ENCODED_VIDEO,
        }
    }

    /// A stub's session, connected to the broker as client `id`.
    fn stub(b: &mut BrokerCore, now: Instant, id: u64) -> Session {
        let caps = Capabilities { codecs: codec_bits::ENCODED, max_streams: 0, kinds: kind_bits::ENCODED_VIDEO };
        let s = Session::new(SessionConfig::new(Role::Guest, "stub", caps), now);
        b.accept(now, id);
        let mut s = s;
        pump(b, now, id, &mut s);
        s
    }

    /// Moves bytes both ways until both are quiet.
    fn pump(b: &mut BrokerCore, now: Instant, id: u64, s: &mut Session) {
        for _ in 0..100_000 {
            let out = s.pending_output().to_vec();
            s.consume_output(out.len());
            if !out.is_empty() {
                b.input(now, id, &out);
            }
            let back = b.transmit(id).to_vec();
            b.consume(id, back.len());
            s.handle_input(now, &back);
            if out.is_empty() && back.is_empty() {
                return;
            }
        }
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn commands(b: &mut BrokerCore) -> Vec<Command> {
        std::iter::from_fn(|| b.poll_command()).collect()
    }

    fn open() -> StreamOpen {
        StreamOpen {
            media: MediaKind::EncodedVideo(VideoFormat { width: 64, height: 64, framerate_num: 30, framerate_den: 1 }),
            codec: Codec::H264,
            frame_samples: 0,
            app: AppInfo { name: "player".into(), ..AppInfo::default() },
            codec_data: vec![1],
        }
    }

    fn unit(seq: u32, size: usize, key: bool) -> AccessUnit {
        AccessUnit {
            seq,
            flags: if key { au_flags::KEYFRAME } else { 0 },
            pts_ns: u64::from(seq),
            dts_ns: 0,
            duration_ns: 1,
            data: vec![7; size],
        }
    }

    #[test]
    fn without_a_host_a_stub_is_refused_at_once_and_with_one_it_learns_what_the_host_takes() {
        let now = Instant::now();
        let mut b = broker();
        let mut s = stub(&mut b, now, 1);
        let ev = events(&mut s);
        assert!(matches!(ev.last(), Some(Event::Closed(CloseReason::Refused(r))) if r == NO_HOST), "{ev:?}");
        assert_eq!(b.poll_gone(), Some(1));
        b.note(now, BrokerNote::HostReady(host_caps()));
        let mut s = stub(&mut b, now, 2);
        let Some(Event::Established(peer)) = events(&mut s).into_iter().next() else { panic!("not established") };
        // Only what a player's stream may use: encoded kinds and codecs.
        assert_eq!(peer.capabilities.kinds, kind_bits::ENCODED_VIDEO);
        assert_eq!(peer.capabilities.codecs, codec_bits::OPUS | codec_bits::H264);
        // The host goes: the stub is told, its streams close.
        s.open_stream(4, &open()).unwrap();
        pump(&mut b, now, 2, &mut s);
        commands(&mut b);
        b.note(now, BrokerNote::HostGone);
        pump(&mut b, now, 2, &mut s);
        assert!(matches!(events(&mut s).last(), Some(Event::Closed(CloseReason::Goodbye(r))) if r.contains(NO_HOST)));
        assert!(matches!(commands(&mut b)[..], [Command::Close(101, _)]));
    }

    #[test]
    fn a_stubs_stream_maps_onto_the_port_and_the_hosts_answers_come_back() {
        let now = Instant::now();
        let mut b = broker();
        b.note(now, BrokerNote::HostReady(host_caps()));
        let mut s = stub(&mut b, now, 1);
        events(&mut s);
        s.open_stream(4, &open()).unwrap();
        s.send_access_unit(4, &unit(0, 40_000, true)).unwrap();
        pump(&mut b, now, 1, &mut s);
        s.send_stream_control(4, StreamControl::Flush).unwrap();
        pump(&mut b, now, 1, &mut s);
        let got = commands(&mut b);
        assert!(
            matches!(&got[..], [Command::Open(101, o), Command::AccessUnit(101, au), Command::Control(101, StreamControl::Flush)]
            if *o == open() && au.data.len() == 40_000),
            "{got:?}"
        );
        b.note(now, BrokerNote::KeyframeRequest(101));
        b.note(now, BrokerNote::Rejected(101, "no decoder".into()));
        pump(&mut b, now, 1, &mut s);
        let ev = events(&mut s);
        assert_eq!(ev[0], Event::StreamControl { stream: 4, control: StreamControl::KeyframeRequest });
        assert_eq!(ev[1], Event::StreamRejected { stream: 4, reason: "no decoder".into() });
    }

    /// One stub over its budget loses its own units (until its next keyframe); another
    /// stub's go through.
    #[test]
    fn a_stub_over_its_budget_loses_its_own_units_only() {
        let now = Instant::now();
        let mut b = broker();
        b.note(now, BrokerNote::HostReady(host_caps()));
        let (mut greedy, mut fair) = (stub(&mut b, now, 1), stub(&mut b, now, 2));
        for s in [&mut greedy, &mut fair] {
            events(s);
            s.open_stream(1, &open()).unwrap();
        }
        for seq in 0..30 {
            greedy.send_access_unit(1, &unit(seq, 1_000_000, seq % 10 == 0)).unwrap();
            pump(&mut b, now, 1, &mut greedy);
        }
        fair.send_access_unit(1, &unit(0, 100_000, true)).unwrap();
        pump(&mut b, now, 2, &mut fair);
        let units: Vec<(u32, u32)> = commands(&mut b)
            .into_iter()
            .filter_map(|c| if let Command::AccessUnit(port, au) = c { Some((port, au.seq)) } else { None })
            .collect();
        // 8 MB of burst: the first 8 units of 1 MB, then nothing until a keyframe the
        // budget allows (none, at the same instant).
        let greedy_units: Vec<u32> = units.iter().filter(|u| u.0 == 101).map(|u| u.1).collect();
        assert_eq!(greedy_units, (0..8).collect::<Vec<_>>());
        assert!(units.contains(&(102, 0)), "the other stub's unit went through: {units:?}");
        // A second later the greedy one is back, at its next keyframe.
        let later = now + Duration::from_secs(1);
        greedy.send_access_unit(1, &unit(30, 1_000, false)).unwrap();
        greedy.send_access_unit(1, &unit(40, 1_000, true)).unwrap();
        pump(&mut b, later, 1, &mut greedy);
        let seqs: Vec<u32> = commands(&mut b)
            .into_iter()
            .filter_map(|c| if let Command::AccessUnit(_, au) = c { Some(au.seq) } else { None })
            .collect();
        assert_eq!(seqs, [40]);
    }

    /// Garbage from one stub ends its session, never the broker's or another stub's.
    #[test]
    fn garbage_costs_a_stub_its_session_and_nobody_else_anything() {
        let now = Instant::now();
        let mut b = broker();
        b.note(now, BrokerNote::HostReady(host_caps()));
        let mut good = stub(&mut b, now, 1);
        events(&mut good);
        b.accept(now, 2);
        let mut x = 0x9E37_79B9u32;
        for round in 0..2000 {
            let junk: Vec<u8> = (0..(round % 97) + 1)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            b.input(now, 2, &junk);
            let _ = b.transmit(2).len();
            b.consume(2, usize::MAX);
        }
        good.open_stream(1, &open()).unwrap();
        good.send_access_unit(1, &unit(0, 100, true)).unwrap();
        pump(&mut b, now, 1, &mut good);
        assert!(commands(&mut b).iter().any(|c| matches!(c, Command::AccessUnit(_, au) if au.data.len() == 100)));
    }
}
