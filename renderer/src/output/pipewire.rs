//! `--output pipewire`: one playback stream per guest stream on the host's PipeWire.
//!
//! A dedicated thread runs the PipeWire main loop; it creates and destroys streams on
//! request. Samples never pass through it: the session thread writes decoded audio into
//! a per-stream SPSC ring, and the stream's real-time callback reads it, deciding with
//! [`Playout`] when to start (the `--latency` target) and writing silence on underrun.
//! On close the stream plays out what is buffered before it is destroyed.
//!
//! Drift control: while playing, the callback feeds the ring's fill to a
//! [`DriftController`] and writes its rate into the stream's `SPA_IO_RateMatch` area, so
//! the stream's resampler consumes guest audio exactly as fast as the guest's clock
//! makes it and the fill stays at the target instead of creeping.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use melange_shim::render::{OutputClock, RenderConfig, RenderCore, RenderStats};
use melange_transport::message::{AudioFormat, Volume};
use pipewire as pw;
use pw::spa;
use rtrb::Producer;

use super::{Output, OutputError, StreamDesc, StreamSink};

/// How often the PipeWire thread looks for streams that finished draining.
const REAP_INTERVAL: Duration = Duration::from_millis(50);
/// A draining stream is destroyed after this even if its callback never ran.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the PipeWire thread tries to connect again after losing the host's PipeWire.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);

/// What the PipeWire thread and the session thread share about a stream beside the
/// render core's counters.
#[derive(Debug, Default)]
struct Shared {
    /// The stream's rate-match area, set by `io_changed` (null when unset).
    rate_match: AtomicPtr<spa::sys::spa_io_rate_match>,
    /// The host's PipeWire went away under the stream: it plays nowhere any more.
    lost: AtomicBool,
}

/// What the real-time callback owns.
struct RtData {
    core: RenderCore,
    shared: Arc<Shared>,
}

enum Command {
    Open {
        key: u64,
        name: String,
        props: Vec<(&'static str, String)>,
        format: AudioFormat,
        rt: Box<RtData>,
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
    /// drain short.
    pub fn connect(max_streams: usize) -> Result<Self, OutputError> {
        let (tx, rx) = pw::channel::channel::<Command>();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let user_volume: Arc<Mutex<Option<Volume>>> = Arc::default();
        let reported = user_volume.clone();
        let thread = std::thread::Builder::new()
            .name("melange-pipewire".into())
            .spawn(move || run(rx, ready_tx, reported, max_streams))
            .map_err(|e| OutputError::PipeWire(e.to_string()))?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Self { commands: tx, thread: Some(thread), next_key: 1, user_volume }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(OutputError::PipeWireUnavailable(e))
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
    fn open(&mut self, desc: &StreamDesc) -> Result<Box<dyn StreamSink>, OutputError> {
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
        let shared = Arc::new(Shared::default());
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
        let rt = RtData { core, shared: shared.clone() };
        self.commands
            .send(Command::Open {
                key,
                name: name.clone(),
                props,
                format: desc.format.clone(),
                rt: Box::new(rt),
                reply: reply_tx,
            })
            .map_err(|_| OutputError::PipeWire("the PipeWire thread is gone".into()))?;
        match reply_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(OutputError::PipeWire(e)),
            Err(_) => return Err(OutputError::PipeWire("no answer from the PipeWire thread".into())),
        }
        Ok(Box::new(PipeWireSink {
            key,
            name,
            producer,
            channels,
            rate: desc.format.rate,
            stats,
            shared,
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

struct PipeWireSink {
    key: u64,
    name: String,
    producer: Producer<f32>,
    channels: usize,
    rate: u32,
    stats: Arc<RenderStats>,
    shared: Arc<Shared>,
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
        self.shared.lost.load(Ordering::Relaxed)
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
    // Declared first: the listener (and its ring end) goes before the stream.
    _listener: pw::stream::StreamListener<RtData>,
    stream: pw::stream::StreamRc,
    /// The volume last put on the stream, by the guest or by the user.
    volume: Rc<RefCell<Volume>>,
    shared: Arc<Shared>,
    stats: Arc<RenderStats>,
    closing_since: Option<Instant>,
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.stream.disconnect();
    }
}

fn run(
    rx: pw::channel::Receiver<Command>,
    ready: crossbeam_channel::Sender<Result<(), String>>,
    user_volume: Arc<Mutex<Option<Volume>>>,
    max_streams: usize,
) {
    pw::init();
    let setup = || -> Result<_, String> {
        let main_loop = pw::main_loop::MainLoopRc::new(None).map_err(|e| e.to_string())?;
        // client-rt.conf, as audio apps use: its module-rt makes the data loop that runs
        // the playback callbacks real-time. Under client.conf it is an ordinary thread
        // that a busy machine delays by milliseconds.
        let props = pw::properties::properties! { "config.name" => "client-rt.conf" };
        let context = pw::context::ContextRc::new(&main_loop, Some(props)).map_err(|e| e.to_string())?;
        let core = context.connect_rc(None).map_err(|e| e.to_string())?;
        Ok((main_loop, context, core))
    };
    let (main_loop, context, core) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // The connection, and a flag its error callback raises (it cannot drop the core it
    // runs on); the timer below acts on it.
    let lost = Rc::new(std::cell::Cell::new(false));
    let connection: Rc<RefCell<Option<Connection>>> = Rc::new(RefCell::new(Some(Connection::new(core, &lost))));
    let streams: Rc<RefCell<BTreeMap<u64, Live>>> = Rc::new(RefCell::new(BTreeMap::new()));
    let reap = {
        let (streams, connection, lost) = (streams.clone(), connection.clone(), lost.clone());
        let next_attempt = std::cell::Cell::new(Instant::now());
        main_loop.loop_().add_timer(move |_| {
            if lost.replace(false) && connection.borrow_mut().take().is_some() {
                // Every stream on the old connection is gone: the host reopens them.
                for live in streams.borrow().values() {
                    live.shared.lost.store(true, Ordering::Relaxed);
                }
                streams.borrow_mut().clear();
                next_attempt.set(Instant::now() + RECONNECT_INTERVAL);
                log::error!("melange-host: lost the connection to the host's PipeWire; reconnecting");
            }
            if connection.borrow().is_none() && Instant::now() >= next_attempt.get() {
                match context.connect_rc(None) {
                    Ok(core) => {
                        log::info!("melange-host: reconnected to the host's PipeWire");
                        *connection.borrow_mut() = Some(Connection::new(core, &lost));
                    }
                    Err(_) => next_attempt.set(Instant::now() + RECONNECT_INTERVAL),
                }
            }
            streams.borrow_mut().retain(|_, live| match live.closing_since {
                Some(since) => !live.stats.drained.load(Ordering::Relaxed) && since.elapsed() < DRAIN_TIMEOUT,
                None => true,
            });
        })
    };
    let _ = reap.update_timer(Some(REAP_INTERVAL), Some(REAP_INTERVAL));

    let weak_loop = main_loop.downgrade();
    let _receiver = rx.attach(main_loop.loop_(), {
        let streams = streams.clone();
        let connection = connection.clone();
        move |cmd| match cmd {
            Command::Open { key, name, props, format, rt, reply } => {
                let (shared, stats) = (rt.shared.clone(), rt.core.stats().clone());
                evict_drains(&mut streams.borrow_mut(), max_streams.saturating_sub(1));
                let result = match connection.borrow().as_ref() {
                    Some(c) => {
                        let volume = Rc::new(RefCell::new(Volume {
                            channels: vec![1.0; usize::from(format.channels)],
                            mute: false,
                        }));
                        let watch = VolumeWatch { applied: volume.clone(), report: user_volume.clone() };
                        open_stream(&c.core, &name, props, &format, *rt, watch).map(|(stream, listener)| {
                            streams.borrow_mut().insert(
                                key,
                                Live { _listener: listener, stream, volume, shared, stats, closing_since: None },
                            );
                        })
                    }
                    None => Err("the host's PipeWire is gone; reconnecting".into()),
                };
                let _ = reply.send(result);
            }
            Command::Volume { key, volume } => {
                if let Some(live) = streams.borrow().get(&key) {
                    let gains = volume.gains(live.volume.borrow().channels.len());
                    *live.volume.borrow_mut() = Volume { channels: gains.clone(), mute: volume.mute };
                    set_volume(&live.stream, gains, volume.mute);
                }
            }
            Command::Close { key } => {
                if let Some(live) = streams.borrow_mut().get_mut(&key) {
                    live.closing_since = Some(Instant::now());
                }
            }
            Command::Quit => {
                streams.borrow_mut().clear();
                if let Some(l) = weak_loop.upgrade() {
                    l.quit();
                }
            }
        }
    });
    let _ = ready.send(Ok(()));
    main_loop.run();
    streams.borrow_mut().clear();
}

/// Cuts the drains of the streams that closed longest ago until at most `keep` streams
/// are left (or none is draining).
fn evict_drains(streams: &mut BTreeMap<u64, Live>, keep: usize) {
    while streams.len() > keep {
        let oldest = streams.iter().filter_map(|(k, l)| Some((l.closing_since?, *k))).min();
        let Some((_, key)) = oldest else { return };
        streams.remove(&key);
    }
}

/// A connection to the host's PipeWire and the listener that notices its loss.
struct Connection {
    // Declared first: the listener goes before the core.
    _listener: pw::core::Listener,
    core: pw::core::CoreRc,
}

impl Connection {
    fn new(core: pw::core::CoreRc, lost: &Rc<std::cell::Cell<bool>>) -> Self {
        let lost = lost.clone();
        let listener = core
            .add_listener_local()
            .error(move |id, _seq, res, message| {
                if res == -libc::EPIPE {
                    lost.set(true);
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
fn set_volume(stream: &pw::stream::StreamRc, mut gains: Vec<f32>, mute: bool) {
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

fn open_stream(
    core: &pw::core::CoreRc,
    name: &str,
    props: Vec<(&'static str, String)>,
    format: &AudioFormat,
    rt: RtData,
    watch: VolumeWatch,
) -> Result<(pw::stream::StreamRc, pw::stream::StreamListener<RtData>), String> {
    let mut properties = pw::properties::PropertiesBox::new();
    for (k, v) in &props {
        properties.insert(*k, v.as_str());
    }
    let stream = pw::stream::StreamRc::new(core.clone(), name, properties).map_err(|e| e.to_string())?;
    let io_shared = rt.shared.clone();
    let listener = stream
        .add_local_listener_with_user_data(rt)
        .control_info(move |_, _, id, control| {
            // SAFETY: PipeWire passes a valid control whose `values` holds `n_values`
            // floats for the duration of the call (or null).
            let values = unsafe { control.as_ref() }
                .filter(|c| !c.values.is_null())
                .map_or(&[][..], |c| unsafe { std::slice::from_raw_parts(c.values, c.n_values as usize) });
            watch.control(id, values);
        })
        .io_changed(move |_, _, id, area, _| {
            // May run on another thread than `process`: hand the pointer over atomically.
            if id == spa::sys::SPA_IO_RateMatch {
                io_shared.rate_match.store(area.cast(), Ordering::Release);
            }
        })
        .process(|stream, d| {
            // Real-time: the render core fills the buffer; no allocation or locks.
            let time = stream.time().ok();
            let Some(mut buffer) = stream.dequeue_buffer() else { return };
            let requested = buffer.requested() as usize;
            let Some(data) = buffer.datas_mut().first_mut() else { return };
            let stride = 4 * d.core.channels();
            let Some(bytes) = data.data() else { return };
            let max_frames = bytes.len() / stride;
            let frames = if requested > 0 { requested.min(max_frames) } else { max_frames.min(1024) };
            let clock =
                time.as_ref().map(|t| OutputClock { ticks: t.ticks(), now_ns: u64::try_from(t.now()).unwrap_or(0) });
            if let Some(ratio) = d.core.cycle(clock, &mut bytes[..frames * stride]) {
                let rate_match = d.shared.rate_match.load(Ordering::Acquire);
                // SAFETY: PipeWire keeps the area it passed to io_changed valid until it
                // passes another (or null), and only this callback writes it.
                if let Some(rm) = unsafe { rate_match.as_mut() } {
                    // rate > 1 consumes less input per output frame (as module-rtp-source).
                    rm.rate = 1.0 / ratio;
                    rm.flags |= spa::sys::SPA_IO_RATE_MATCH_FLAG_ACTIVE;
                }
            }
            if let Some(t) = time.filter(|t| t.now() > 0) {
                let r = t.rate();
                let position_ns =
                    if r.denom > 0 { t.ticks() as f64 * 1e9 * f64::from(r.num) / f64::from(r.denom) } else { 0.0 };
                let now_ns = u64::try_from(t.now()).unwrap_or(0);
                d.core.timing(now_ns, position_ns as u64, frames, output_delay_ns(&t, d.core.rate()));
            }
            let chunk = data.chunk_mut();
            *chunk.offset_mut() = 0;
            *chunk.stride_mut() = stride as i32;
            *chunk.size_mut() = (frames * stride) as u32;
        })
        .register()
        .map_err(|e| e.to_string())?;

    let pod = format_pod(format)?;
    melange_pw::connect(&stream, spa::utils::Direction::Output, &pod, true)?;
    Ok((stream, listener))
}

/// How long a sample the stream is given now takes to be heard: its delay to the
/// device plus what its resampler holds.
fn output_delay_ns(t: &pw::stream::Time, rate: u32) -> u64 {
    let r = t.rate();
    let delay_s = if r.denom > 0 { t.delay() as f64 * f64::from(r.num) / f64::from(r.denom) } else { 0.0 };
    (delay_s * 1e9 + t.buffered() as f64 * 1e9 / f64::from(rate.max(1))).max(0.0) as u64
}

/// The EnumFormat of a stream of interleaved f32 in `format`'s layout.
pub(crate) fn format_pod(format: &AudioFormat) -> Result<Vec<u8>, String> {
    melange_pw::format_pod(spa::param::audio::AudioFormat::F32LE, format.rate, &format.positions)
}
