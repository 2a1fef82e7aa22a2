//! What both sinks do, without GObject: the broker connection and what goes over it.
//!
//! A [`Forwarder`] connects when its sink goes to READY and learns what the host
//! decodes; the sink offers only that (nothing without a host, so the player decodes
//! locally). Negotiated caps open a stream, buffers become access units stamped on the
//! guest's monotonic clock (the pipeline's running time plus its base time), and the
//! player's flushes, pauses and end of stream follow them. A keep-alive thread answers
//! the broker's heartbeats while no buffer flows (paused, prerolled).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use melange_guest::client::{ClientError, ClientEvent, MediaClient};
use melange_transport::message::{au_flags, kind_bits, AccessUnit, AppInfo, Capabilities, StreamControl, StreamOpen};

use melange_gst::caps::{self, Announced, Kind};

/// How long connecting to the broker may take (it answers at once, with or without a
/// host; a broker that does not is treated as absent).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the keep-alive thread reads the broker.
const KEEPALIVE: Duration = Duration::from_millis(250);

/// Why nothing is forwarded; the sink then offers no caps.
pub type Unavailable = String;

/// The broker connection and what the keep-alive thread read for the sink.
#[derive(Debug, Default)]
struct Conn {
    client: Option<MediaClient>,
    /// Events read by the keep-alive thread, for the next send to report.
    events: Vec<ClientEvent>,
}

/// [`Conn`], shared with the keep-alive thread.
type Shared = Arc<Mutex<Conn>>;

/// See the module docs.
#[derive(Debug)]
pub struct Forwarder {
    kind: Kind,
    client: Shared,
    /// What the host decodes (`codec_bits`), 0 without a host.
    host_codecs: u64,
    /// Why there is no connection, for the debug log and the element's messages.
    unavailable: Option<Unavailable>,
    /// The open stream's id, if one is open.
    stream: Option<u32>,
    next_stream: u32,
    seq: u32,
    /// Access units the broker or host could not take (they wait for a keyframe).
    pub dropped: u64,
    /// Access units sent.
    pub sent: u64,
    stop: Arc<AtomicBool>,
    keepalive: Option<JoinHandle<()>>,
}

/// What the sink learns from the host between buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The host asked for a keyframe (a player playing a file cannot make one: the
    /// next keyframe comes when it comes).
    KeyframeRequest,
    /// The host refused the stream.
    Rejected(String),
    /// The host's render delay for the stream, ns.
    Latency(u64),
}

fn lock(client: &Shared) -> MutexGuard<'_, Conn> {
    client.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The app behind this process, as the host shows it.
fn app_info(kind: Kind) -> AppInfo {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let name = gstreamer::glib::application_name()
        .map(|n| n.to_string())
        .or_else(|| gstreamer::glib::prgname().map(|n| n.to_string()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| binary.clone());
    let role = std::env::var("MELANGE_MEDIA_ROLE").unwrap_or_else(|_| "Movie".into());
    let _ = kind;
    AppInfo { name, role, binary, ..AppInfo::default() }
}

impl Forwarder {
    /// A forwarder for one sink, not connected.
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            client: Arc::new(Mutex::new(Conn::default())),
            host_codecs: 0,
            unavailable: Some("not started".into()),
            stream: None,
            next_stream: 1,
            seq: 0,
            dropped: 0,
            sent: 0,
            stop: Arc::new(AtomicBool::new(false)),
            keepalive: None,
        }
    }

    /// Connects to the broker at `socket` (or the default one) and learns what the
    /// host decodes. Never fails: without a broker or host the sink offers nothing.
    pub fn connect(&mut self, socket: Option<PathBuf>) {
        self.disconnect();
        let Some(path) = socket.or_else(melange_guest::client::default_socket) else {
            self.unavailable = Some("XDG_RUNTIME_DIR is not set: no media broker to find".into());
            return;
        };
        match MediaClient::connect(&path, concat!("gst-plugin-melange ", env!("CARGO_PKG_VERSION")), CONNECT_TIMEOUT) {
            Ok(client) => {
                self.host_codecs = client.host_capabilities().map_or(0, |c| usable_codecs(self.kind, c));
                self.unavailable = None;
                *lock(&self.client) = Conn { client: Some(client), events: Vec::new() };
                self.stop.store(false, Ordering::Relaxed);
                let (client, stop) = (self.client.clone(), self.stop.clone());
                self.keepalive = std::thread::Builder::new()
                    .name("melange-sink-keepalive".into())
                    .spawn(move || keep_alive(&client, &stop))
                    .ok();
            }
            Err(e) => self.unavailable = Some(e.to_string()),
        }
    }

    /// Says goodbye (closing the stream first) and stops the keep-alive thread.
    pub fn disconnect(&mut self) {
        self.close_stream("player stopped");
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.keepalive.take() {
            let _ = t.join();
        }
        if let Some(client) = lock(&self.client).client.take() {
            client.close();
        }
        self.host_codecs = 0;
        self.unavailable.get_or_insert_with(|| "not started".into());
    }

    /// Why nothing is offered, if nothing is.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// The caps to offer now.
    pub fn offered(&self) -> gstreamer::Caps {
        caps::offered(self.kind, self.host_codecs)
    }

    /// Opens a stream for negotiated caps (closing one opened for earlier caps).
    pub fn open(&mut self, caps: &gstreamer::CapsRef) -> Result<(), String> {
        let Announced { media, codec, codec_data } = caps::announce(caps)?;
        if self.host_codecs & codec.bit() == 0 {
            return Err(format!("melange-host does not decode {}", codec.name()));
        }
        self.close_stream("new caps");
        let open = StreamOpen { media, codec, frame_samples: 0, app: app_info(self.kind), codec_data };
        let id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        let mut guard = lock(&self.client);
        let client = guard.client.as_mut().ok_or("no melange-host is connected")?;
        client.open_stream(id, &open).map_err(|e| e.to_string())?;
        self.stream = Some(id);
        self.seq = 0;
        Ok(())
    }

    /// Sends one access unit. Times are on the guest's monotonic clock (ns).
    pub fn send(&mut self, data: Vec<u8>, times: Times) -> Result<Vec<Note>, ClientError> {
        let Some(stream) = self.stream else { return Ok(Vec::new()) };
        let mut flags = 0;
        if times.keyframe {
            flags |= au_flags::KEYFRAME;
        }
        if times.discontinuity {
            flags |= au_flags::DISCONTINUITY;
        }
        if times.decode_only {
            flags |= au_flags::DECODE_ONLY;
        }
        let dts_ns = match times.dts_ns {
            Some(dts) if dts != times.pts_ns => {
                flags |= au_flags::HAS_DTS;
                dts
            }
            _ => 0,
        };
        let au =
            AccessUnit { seq: self.seq, flags, pts_ns: times.pts_ns, dts_ns, duration_ns: times.duration_ns, data };
        self.seq = self.seq.wrapping_add(1);
        let mut guard = lock(&self.client);
        let conn = &mut *guard;
        let client = conn.client.as_mut().ok_or_else(|| ClientError::NoHost("no melange-host is connected".into()))?;
        if client.send_access_unit(stream, &au)? {
            self.sent += 1;
        } else {
            self.dropped += 1;
        }
        let mut events = std::mem::take(&mut conn.events);
        events.extend(client.poll(Duration::ZERO)?);
        let notes = events
            .into_iter()
            .map(|e| match e {
                ClientEvent::KeyframeRequest(_) => Note::KeyframeRequest,
                ClientEvent::Rejected(_, reason) => Note::Rejected(reason),
                ClientEvent::Latency(_, ns) => Note::Latency(ns),
            })
            .collect();
        Ok(notes)
    }

    /// Sends a control of the open stream (flush, pause, resume, end of stream).
    pub fn control(&mut self, control: StreamControl) -> Result<(), ClientError> {
        let Some(stream) = self.stream else { return Ok(()) };
        match lock(&self.client).client.as_mut() {
            Some(client) => client.send_control(stream, control),
            None => Ok(()),
        }
    }

    fn close_stream(&mut self, reason: &str) {
        if let Some(stream) = self.stream.take() {
            if let Some(client) = lock(&self.client).client.as_mut() {
                let _ = client.close_stream(stream, reason);
            }
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// What a sink of `kind` may offer of the host's `codecs`: nothing where the host
/// takes no players' streams of that kind (the Opus bit also stands for tapped audio).
fn usable_codecs(kind: Kind, caps: &Capabilities) -> u64 {
    let bit = match kind {
        Kind::Video => kind_bits::ENCODED_VIDEO,
        Kind::Audio => kind_bits::ENCODED_AUDIO,
    };
    if caps.kinds & bit == 0 {
        0
    } else {
        caps.codecs
    }
}

/// An access unit's times, on the guest's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct Times {
    /// Presentation time, ns.
    pub pts_ns: u64,
    /// Decoding time, ns, where the buffer has one.
    pub dts_ns: Option<u64>,
    /// Duration, ns (0: unknown).
    pub duration_ns: u64,
    /// Decodable on its own.
    pub keyframe: bool,
    /// Follows a gap or a seek.
    pub discontinuity: bool,
    /// Before the segment: to decode the units after it, not to show.
    pub decode_only: bool,
}

/// Reads the broker while the sink is idle, so its heartbeats are answered; ends when
/// told or when the session is over (the next send reports that).
fn keep_alive(client: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(KEEPALIVE);
        let mut guard = lock(client);
        let conn = &mut *guard;
        let Some(c) = conn.client.as_mut() else { return };
        match c.poll(Duration::ZERO) {
            Ok(events) => conn.events.extend(events),
            Err(_) => return,
        }
    }
}
