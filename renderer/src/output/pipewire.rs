//! `--output pipewire`: one playback stream per guest stream on the host's PipeWire.
//!
//! A dedicated thread runs the PipeWire main loop; it creates and destroys streams on
//! request. Samples never pass through it: the session thread writes decoded audio into
//! a per-stream SPSC ring, and the stream's real-time callback reads it
//! ([`melange_pw::play_from`]), deciding when to start (the `--latency` target) and
//! writing silence on underrun. On close the stream plays out what is buffered before
//! it is destroyed.
//!
//! Opening never waits for PipeWire: [`PipeWireOutput::open`] hands the stream to the
//! PipeWire thread and returns its sink at once (the session thread may write into its
//! ring from then on); the thread's answer comes later, and
//! [`StreamSink::poll_open`] reports a failure (or no answer within [`OPEN_TIMEOUT`]),
//! after which the sink is useless and the session drops it. Opens the thread has not
//! taken yet are bounded by twice the stream limit. The thread makes at most one
//! stream per turn of its loop, and cuts a drain short only once its stream has
//! settled ([`PwThread`]).
//!
//! Drift control: while playing, the callback feeds the ring's fill to a
//! [`DriftController`] and writes its rate into the stream's `SPA_IO_RateMatch` area, so
//! the stream's resampler consumes guest audio exactly as fast as the guest's clock
//! makes it and the fill stays at the target instead of creeping.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use melange_pw::{Held, Playback, RtStream};
use melange_shim::render::{RenderConfig, RenderCore, RenderStats};
use melange_transport::message::{AudioFormat, Volume};
use pipewire as pw;
use pw::spa;
use pw::spa::support::system::IoFlags;
use rtrb::Producer;

use super::{Output, OutputError, StreamDesc, StreamSink};

/// How often the PipeWire thread looks for streams that finished draining.
const REAP_INTERVAL: Duration = Duration::from_millis(50);
/// A draining stream is destroyed after this even if its callback never ran.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the PipeWire thread tries to connect again after losing the host's PipeWire.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// How long the PipeWire thread may take to answer an open before the stream counts as
/// failed.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new stream is left to PipeWire and the session manager to set up (link,
/// start) before its drain may be cut short to make room for another (see [`PwThread`]):
/// with 100 ms the stream churn of the bounds test leaves no more file descriptors
/// behind than when opens waited; streams still come and go at 640 a second.
const SETTLE_TIME: Duration = Duration::from_millis(100);

enum Command {
    Open {
        key: u64,
        name: String,
        props: Vec<(&'static str, String)>,
        format: AudioFormat,
        core: Box<RenderCore>,
        /// Raised when the host's PipeWire goes away under the stream.
        lost: Arc<AtomicBool>,
        reply: crossbeam_channel::Sender<Result<(), String>>,
    },
    Close {
        key: u64,
    },
    Volume {
        key: u64,
        volume: Volume,
    },
    Quit,
}

/// Connection to the host's PipeWire.
pub struct PipeWireOutput {
    commands: pw::channel::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    next_key: u64,
    /// The last volume the user set on one of our streams (the PipeWire thread puts it).
    user_volume: Arc<Mutex<Option<Volume>>>,
    /// Opens sent to the PipeWire thread that it has not taken yet: fewer than
    /// `max_waiting`, so a thread that hangs holds a bounded number of rings.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Open { key, .. } => write!(f, "Open({key})"),
            Command::Close { key } => write!(f, "Close({key})"),
            Command::Volume { key, .. } => write!(f, "Volume({key})"),
            Command::Quit => f.write_str("Quit"),
        }
    }
}

impl std::fmt::Debug for PipeWireOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeWireOutput").field("next_key", &self.next_key).finish()
    }
}

impl PipeWireOutput {
    /// Starts the PipeWire thread and connects; fails fast if PipeWire is not running.
    /// At most `max_streams` playback streams exist at once, those still playing out
    /// what they hold after a close included: opening one more cuts the oldest such
    /// drain short (once that stream has settled: the open waits until then).
    pub fn connect(max_streams: usize) -> Result<Self, OutputError> {
        let (tx, rx) = pw::channel::channel::<Command>();
        let user_volume: Arc<Mutex<Option<Volume>>> = Arc::default();
        let reported = user_volume.clone();
        let waiting = Arc::new(AtomicUsize::new(0));
        let taken = waiting.clone();
        let (thread, ready) = melange_pw::spawn_client("melange-pipewire", move |client, core| {
            serve(client, core, rx, reported, taken, max_streams)
        })
        .map_err(|e| OutputError::PipeWire(e.to_string()))?;
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {
                // Twice the stream limit: a guest opening and closing streams as fast as
                // the control limit lets it fits while the thread makes them one a turn.
                let max_waiting = 2 * max_streams;
                Ok(Self { commands: tx, thread: Some(thread), next_key: 1, user_volume, waiting, max_waiting })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(OutputError::PipeWireUnavailable(e.to_string()))
            }
            Err(_) => Err(OutputError::PipeWireUnavailable("no answer within 10 s".into())),
        }
    }
}

impl Drop for PipeWireOutput {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Output for PipeWireOutput {
    /// Hands the stream to the PipeWire thread and returns at once (see the module
    /// documentation); fails here only if that thread is gone or has not taken the
    /// last `2 * max_streams` opens yet.
    fn open(&mut self, desc: &StreamDesc) -> Result<Box<dyn StreamSink>, OutputError> {
        let waiting = self.waiting.load(Ordering::Relaxed);
        if waiting >= self.max_waiting {
            return Err(OutputError::PipeWire(format!(
                "the PipeWire thread has not taken the last {waiting} opens yet"
            )));
        }
        let channels = usize::from(desc.format.channels);
        let config = RenderConfig {
            rate: desc.format.rate,
            channels,
            latency_frames: desc.latency_frames,
            trim: desc.latency_auto,
            quantum: desc.quantum,
            packet_frames: desc.open.frame_samples,
        };
        // 133 ms for 10 ms packets at the automatic target: 64 streams of 8 channels
        // hold 13 MiB at most; a fixed --latency grows it four times as fast.
        let ring = melange_shim::render::ring_frames(desc.latency_frames, desc.open.frame_samples, desc.format.rate);
        let (producer, core) = melange_shim::render::render_ring(config, ring);
        let stats = core.stats().clone();
        let lost = Arc::new(AtomicBool::new(false));
        let key = self.next_key;
        self.next_key += 1;
        let name = desc.display_name();
        let app = &desc.open.app;
        let mut props = vec![
            ("media.type", "Audio".to_string()),
            ("media.category", "Playback".to_string()),
            ("node.name", format!("melange.s{}.stream{}", desc.session, desc.stream)),
            ("melange.guest.part", desc.part.to_string()),
            ("node.description", name.clone()),
            ("media.name", if app.media_name.is_empty() { name.clone() } else { app.media_name.clone() }),
            ("application.name", name.clone()),
            // Small quantum hint: the jitter buffer, not the device period, sets latency.
            ("node.latency", format!("{}/{}", desc.quantum, desc.format.rate)),
            ("melange.guest.stream", desc.stream.to_string()),
        ];
        if !app.role.is_empty() {
            props.push(("media.role", app.role.clone()));
        }
        if !app.icon_name.is_empty() {
            props.push(("application.icon-name", app.icon_name.clone()));
        }
        if !app.binary.is_empty() {
            props.push(("melange.guest.binary", app.binary.clone()));
        }
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let open = Command::Open {
            key,
            name: name.clone(),
            props,
            format: desc.format.clone(),
            core: Box::new(core),
            lost: lost.clone(),
            reply: reply_tx,
        };
        if self.commands.send(open).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(OutputError::PipeWire("the PipeWire thread is gone".into()));
        }
        Ok(Box::new(PipeWireSink {
            key,
            name,
            producer,
            channels,
            rate: desc.format.rate,
            stats,
            lost,
            opening: Opening::Waiting(reply_rx, Instant::now()),
            overflows: 0,
            commands: self.commands.clone(),
            closed: false,
        }))
    }

    fn describe(&self) -> String {
        "the host's PipeWire (one playback stream per guest stream)".into()
    }

    fn take_user_volume(&mut self) -> Option<Volume> {
        self.user_volume.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Where a stream's open stands, as far as the session thread knows.
enum Opening {
    /// Sent to the PipeWire thread at that instant; its answer comes on the receiver.
    Waiting(crossbeam_channel::Receiver<Result<(), String>>, Instant),
    Open,
    Failed(String),
}

struct PipeWireSink {
    key: u64,
    name: String,
    producer: Producer<f32>,
    channels: usize,
    rate: u32,
    stats: Arc<RenderStats>,
    /// Raised by the PipeWire thread when the host's PipeWire went away under the stream.
    lost: Arc<AtomicBool>,
    opening: Opening,
    overflows: u64,
    commands: pw::channel::Sender<Command>,
    closed: bool,
}

impl StreamSink for PipeWireSink {
    fn write(&mut self, samples: &[f32]) {
        let n = samples.len().min(self.producer.slots());
        let n = n - n % self.channels.max(1);
        if n < samples.len() {
            self.overflows += (samples.len() - n) as u64;
        }
        if let Ok(chunk) = self.producer.write_chunk_uninit(n) {
            chunk.fill_from_iter(samples[..n].iter().copied());
        }
    }

    fn buffered_frames(&self) -> usize {
        (self.producer.buffer().capacity() - self.producer.slots()) / self.channels.max(1)
    }

    fn underruns(&self) -> u64 {
        self.stats.underruns.load(Ordering::Relaxed)
    }

    fn render_delay_ns(&self, now_ns: u64) -> u64 {
        let buffered_ns = self.buffered_frames() as u64 * 1_000_000_000 / u64::from(self.rate.max(1));
        let wait_ns = self.stats.next_read_ns.load(Ordering::Relaxed).saturating_sub(now_ns);
        buffered_ns + wait_ns + self.stats.output_delay_ns.load(Ordering::Relaxed)
    }

    fn overflows(&self) -> u64 {
        self.overflows
    }

    fn set_volume(&mut self, volume: &Volume) {
        let _ = self.commands.send(Command::Volume { key: self.key, volume: volume.clone() });
    }

    fn drift_ppm(&self) -> Option<f64> {
        Some(self.stats.drift_ppb.load(Ordering::Relaxed) as f64 / 1000.0)
    }

    fn target_frames(&self) -> Option<u64> {
        Some(self.stats.target_frames.load(Ordering::Relaxed))
    }

    fn latency_cuts(&self) -> (u64, u64) {
        (self.stats.latency_cuts.load(Ordering::Relaxed), self.stats.cut_frames.load(Ordering::Relaxed))
    }

    fn outages(&self) -> u64 {
        self.stats.outages.load(Ordering::Relaxed)
    }

    fn clock_ppm(&self) -> Option<f64> {
        self.stats.clock_ppm()
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn poll_open(&mut self, now: Instant) -> Result<(), OutputError> {
        if let Opening::Waiting(reply, since) = &self.opening {
            self.opening = match reply.try_recv() {
                Ok(Ok(())) => Opening::Open,
                Ok(Err(e)) => Opening::Failed(e),
                Err(crossbeam_channel::TryRecvError::Empty) if now.saturating_duration_since(*since) < OPEN_TIMEOUT => {
                    return Ok(())
                }
                Err(_) => Opening::Failed("no answer from the PipeWire thread".into()),
            };
        }
        match &self.opening {
            Opening::Failed(e) => Err(OutputError::PipeWire(e.clone())),
            Opening::Waiting(..) | Opening::Open => Ok(()),
        }
    }

    fn close(&mut self) -> Result<(), OutputError> {
        if !std::mem::replace(&mut self.closed, true) {
            log::debug!(
                "{}: played {} frames, {} silent, {} skipped, {} cycles, {} underruns, drift {:.0} ppm",
                self.name,
                self.stats.played_frames.load(Ordering::Relaxed),
                self.stats.silence_frames.load(Ordering::Relaxed),
                self.stats.skipped_frames.load(Ordering::Relaxed),
                self.stats.cycles.load(Ordering::Relaxed),
                self.stats.underruns.load(Ordering::Relaxed),
                self.stats.drift_ppb.load(Ordering::Relaxed) as f64 / 1000.0
            );
            self.stats.draining.store(true, Ordering::Relaxed);
            let _ = self.commands.send(Command::Close { key: self.key });
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("PipeWire stream \"{}\"", self.name)
    }
}

impl Drop for PipeWireSink {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

struct Live {
    stream: RtStream<pw::stream::StreamRc, Playback>,
    /// The volume last put on the stream, by the guest or by the user.
    volume: Rc<RefCell<Volume>>,
    lost: Arc<AtomicBool>,
    stats: Arc<RenderStats>,
    /// When it was made.
    made: Instant,
    closing_since: Option<Instant>,
}

/// What the PipeWire thread serves (see [`melange_pw::spawn_client`]): the commands
/// on `rx` ([`PwThread`]), and a timer that reaps drained streams and reconnects after
/// a loss.
fn serve<'c>(
    client: &'c melange_pw::Client,
    core: pw::core::CoreRc,
    rx: pw::channel::Receiver<Command>,
    user_volume: Arc<Mutex<Option<Volume>>>,
    waiting: Arc<AtomicUsize>,
    max_streams: usize,
) -> Result<Box<dyn Held + 'c>, String> {
    // A socket pair of its own to ask its loop for a turn (a pw::channel cannot be
    // written from its own callback: it holds the channel's lock).
    let (turn_rx, turn_tx) = UnixStream::pair().map_err(|e| format!("cannot make the thread's socket pair: {e}"))?;
    turn_rx.set_nonblocking(true).map_err(|e| e.to_string())?;
    turn_tx.set_nonblocking(true).map_err(|e| e.to_string())?;
    let thread = Rc::new(PwThread {
        streams: RefCell::default(),
        connection: RefCell::new(None),
        lost: Cell::new(false),
        queue: RefCell::default(),
        turn: turn_tx,
        turn_asked: Cell::new(false),
        user_volume,
        waiting,
        max_streams,
    });
    *thread.connection.borrow_mut() = Some(Connection::new(core, &thread));
    let reap = {
        let thread = thread.clone();
        let context = client.context.clone();
        let next_attempt = Cell::new(Instant::now());
        client.main_loop.loop_().add_timer(move |_| {
            if thread.lost.replace(false) && thread.connection.borrow_mut().take().is_some() {
                // Every stream on the old connection is gone: the host reopens them.
                for live in thread.streams.borrow().values() {
                    live.lost.store(true, Ordering::Relaxed);
                }
                thread.streams.borrow_mut().clear();
                next_attempt.set(Instant::now() + RECONNECT_INTERVAL);
                log::error!("melange-host: lost the connection to the host's PipeWire; reconnecting");
            }
            if thread.connection.borrow().is_none() && Instant::now() >= next_attempt.get() {
                match context.connect_rc(None) {
                    Ok(core) => {
                        log::info!("melange-host: reconnected to the host's PipeWire");
                        *thread.connection.borrow_mut() = Some(Connection::new(core, &thread));
                    }
                    Err(_) => next_attempt.set(Instant::now() + RECONNECT_INTERVAL),
                }
            }
            thread.streams.borrow_mut().retain(|_, live| match live.closing_since {
                Some(since) => !live.stats.drained.load(Ordering::Relaxed) && since.elapsed() < DRAIN_TIMEOUT,
                None => true,
            });
            // An open that waits for room may have it now.
            if !thread.queue.borrow().is_empty() {
                thread.ask_turn();
            }
        })
    };
    let _ = reap.update_timer(Some(REAP_INTERVAL), Some(REAP_INTERVAL));

    let weak_loop = client.main_loop.downgrade();
    let receiver = rx.attach(client.main_loop.loop_(), {
        let thread = thread.clone();
        move |cmd| {
            if let Command::Quit = cmd {
                thread.queue.borrow_mut().clear();
                thread.streams.borrow_mut().clear();
                if let Some(l) = weak_loop.upgrade() {
                    l.quit();
                }
                return;
            }
            thread.queue.borrow_mut().push_back(cmd);
            thread.ask_turn();
        }
    });
    let turns = client.main_loop.loop_().add_io(turn_rx, IoFlags::IN, {
        let thread = thread.clone();
        move |rx| {
            let _ = rx.read(&mut [0u8; 16]);
            thread.turn_asked.set(false);
            thread.take_turn();
        }
    });
    Ok(Box::new((receiver, turns, reap, thread)))
}

/// The PipeWire thread's state, shared by its command receiver, its timer and its
/// connection's listener.
///
/// Commands are carried out in order, in turns of the thread's loop, at most one open
/// a turn (between two, the loop sends what the last asked of PipeWire and handles its
/// answers); and a stream's drain is cut short to make room for another only once the
/// stream is [`SETTLE_TIME`] old. The session thread sends opens in bursts, without
/// waiting for them: without these two rules, streams were made all in one go and
/// destroyed in the midst of their setup, and each such stream left file descriptors
/// behind in this process (PipeWire 0.3.65: the bounds test's stream churn ended with
/// hundreds of eventfds), as they did not while each open waited for the thread.
struct PwThread {
    // Declared first: the streams go before the connection.
    streams: RefCell<BTreeMap<u64, Live>>,
    connection: RefCell<Option<Connection>>,
    /// Raised by the connection's error callback (it cannot drop the core it runs on);
    /// the timer acts on it.
    lost: Cell<bool>,
    /// Commands received and not carried out yet, in order.
    queue: RefCell<VecDeque<Command>>,
    /// Asks the loop for a turn: the write end of a socket pair whose read end the
    /// loop watches.
    turn: UnixStream,
    /// A turn was asked for and has not come yet.
    turn_asked: Cell<bool>,
    user_volume: Arc<Mutex<Option<Volume>>>,
    waiting: Arc<AtomicUsize>,
    max_streams: usize,
}

impl PwThread {
    /// Asks for a turn of the loop, unless one is coming.
    fn ask_turn(&self) {
        // One byte at most is ever unread, so the write cannot block; were it to fail,
        // the reaping timer asks again.
        if !self.turn_asked.replace(true) && (&self.turn).write(&[1]).is_err() {
            self.turn_asked.set(false);
        }
    }

    /// A turn: carries out the commands waiting, in order, up to and with the first
    /// open, and asks for another turn if more wait. An open that must wait for room
    /// ([`evict_drains`]) stays first in line; the reaping timer asks for turns while
    /// commands wait.
    fn take_turn(&self) {
        loop {
            let Some(cmd) = self.queue.borrow_mut().pop_front() else { return };
            let open = matches!(cmd, Command::Open { .. });
            if open && !evict_drains(&mut self.streams.borrow_mut(), self.max_streams.saturating_sub(1), Instant::now())
            {
                self.queue.borrow_mut().push_front(cmd);
                return;
            }
            self.carry_out(cmd);
            if open {
                if !self.queue.borrow().is_empty() {
                    self.ask_turn();
                }
                return;
            }
        }
    }

    fn carry_out(&self, cmd: Command) {
        match cmd {
            Command::Open { key, name, props, format, core, lost, reply } => {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                let stats = core.stats().clone();
                let result = match self.connection.borrow().as_ref() {
                    Some(c) => {
                        let volume = Rc::new(RefCell::new(Volume {
                            channels: vec![1.0; usize::from(format.channels)],
                            mute: false,
                        }));
                        let watch = VolumeWatch { applied: volume.clone(), report: self.user_volume.clone() };
                        open_stream(&c.core, &name, props, &format, *core, watch).map(|stream| {
                            let live = Live { stream, volume, lost, stats, made: Instant::now(), closing_since: None };
                            self.streams.borrow_mut().insert(key, live);
                        })
                    }
                    None => Err("the host's PipeWire is gone; reconnecting".into()),
                };
                let _ = reply.send(result);
            }
            Command::Volume { key, volume } => {
                if let Some(live) = self.streams.borrow().get(&key) {
                    let gains = volume.gains(live.volume.borrow().channels.len());
                    *live.volume.borrow_mut() = Volume { channels: gains.clone(), mute: volume.mute };
                    set_volume(&live.stream, gains, volume.mute);
                }
            }
            Command::Close { key } => {
                if let Some(live) = self.streams.borrow_mut().get_mut(&key) {
                    live.closing_since = Some(Instant::now());
                }
            }
            // Carried out as it arrives (see `serve`).
            Command::Quit => {}
        }
    }
}

/// Cuts the drains of the streams that closed longest ago until at most `keep` streams
/// are left (or none is draining). False when the next to cut was made less than
/// [`SETTLE_TIME`] before `now`: it is cut once it is that old.
fn evict_drains(streams: &mut BTreeMap<u64, Live>, keep: usize, now: Instant) -> bool {
    while streams.len() > keep {
        let oldest = streams.iter().filter_map(|(k, l)| Some((l.closing_since?, *k))).min();
        let Some((_, key)) = oldest else { return true };
        if streams.get(&key).is_some_and(|l| now.saturating_duration_since(l.made) < SETTLE_TIME) {
            return false;
        }
        streams.remove(&key);
    }
    true
}

/// A connection to the host's PipeWire and the listener that notices its loss.
struct Connection {
    // Declared first: the listener goes before the core.
    _listener: pw::core::Listener,
    core: pw::core::CoreRc,
}

impl Connection {
    fn new(core: pw::core::CoreRc, thread: &Rc<PwThread>) -> Self {
        let on_error = Rc::downgrade(thread);
        let listener = core
            .add_listener_local()
            .error(move |id, _seq, res, message| {
                if res == -libc::EPIPE {
                    if let Some(thread) = on_error.upgrade() {
                        thread.lost.set(true);
                    }
                } else {
                    log::warn!("host PipeWire error on object {id}: {message} ({res})");
                }
            })
            .register();
        Self { _listener: listener, core }
    }
}

/// What a stream's `control_info` needs to tell a change the user made from one we made.
struct VolumeWatch {
    applied: Rc<RefCell<Volume>>,
    report: Arc<Mutex<Option<Volume>>>,
}

impl VolumeWatch {
    /// The stream reports a control's value: a value other than the one last applied
    /// is the user's.
    fn control(&self, id: u32, values: &[f32]) {
        let mut applied = self.applied.borrow_mut();
        let seen = match id {
            spa::sys::SPA_PROP_channelVolumes if !values.is_empty() => {
                Volume { channels: values.to_vec(), mute: applied.mute }
            }
            spa::sys::SPA_PROP_mute if !values.is_empty() => {
                Volume { channels: applied.channels.clone(), mute: values[0] > 0.5 }
            }
            _ => return,
        };
        if !seen.same_as(&applied) {
            *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen.clone());
            *applied = seen;
        }
    }
}

/// Puts a volume on a stream: `channelVolumes` and `mute`, in one call.
fn set_volume(stream: &pw::stream::Stream, mut gains: Vec<f32>, mute: bool) {
    let mut mute = if mute { 1.0f32 } else { 0.0 };
    // SAFETY: a live stream; each (id, count, values) triple points at `count` floats
    // that outlive the call, and the list ends with 0 as pw_stream_set_control wants
    // (pipewire-rs's set_control omits it).
    unsafe {
        pw::sys::pw_stream_set_control(
            stream.as_raw_ptr(),
            spa::sys::SPA_PROP_channelVolumes,
            gains.len() as u32,
            gains.as_mut_ptr(),
            spa::sys::SPA_PROP_mute,
            1u32,
            &mut mute as *mut f32,
            0u32,
        );
    }
}

/// A playback stream of `name` with `props` in `format` that plays `core`, connected.
fn open_stream(
    core: &pw::core::CoreRc,
    name: &str,
    props: Vec<(&'static str, String)>,
    format: &AudioFormat,
    render: RenderCore,
    watch: VolumeWatch,
) -> Result<RtStream<pw::stream::StreamRc, Playback>, String> {
    let mut properties = pw::properties::PropertiesBox::new();
    for (k, v) in &props {
        properties.insert(*k, v.as_str());
    }
    let stream = pw::stream::StreamRc::new(core.clone(), name, properties).map_err(|e| e.to_string())?;
    let listener = melange_pw::listen_playback(&stream, render)
        .control_info(move |_, _, id, control| {
            // SAFETY: PipeWire passes a valid control whose `values` holds `n_values`
            // floats for the duration of the call (or null).
            let values = unsafe { control.as_ref() }
                .filter(|c| !c.values.is_null())
                .map_or(&[][..], |c| unsafe { std::slice::from_raw_parts(c.values, c.n_values as usize) });
            watch.control(id, values);
        })
        .register()
        .map_err(|e| e.to_string())?;
    let stream = RtStream::new(stream, listener);
    let pod = format_pod(format)?;
    melange_pw::connect(&stream, spa::utils::Direction::Output, &pod, true)?;
    Ok(stream)
}

/// The EnumFormat of a stream of interleaved f32 in `format`'s layout.
pub(crate) fn format_pod(format: &AudioFormat) -> Result<Vec<u8>, String> {
    melange_pw::format_pod(spa::param::audio::AudioFormat::F32LE, format.rate, &format.positions)
}
