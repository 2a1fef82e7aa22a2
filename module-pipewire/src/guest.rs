//! The guest side in PipeWire: the redirect sink, the watch on app streams, the taps,
//! and the virtual microphone.
//!
//! Everything here runs on the module process's main loop, except each tap's `process`
//! callback, which runs on the real-time data loop and only writes its [`TapWriter`],
//! and the microphone's, which only plays its [`RenderCore`].

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;
use std::time::Duration;

use melange_guest::core::GuestStats as LinkStats;
use melange_guest::mic::{MicFeed, MIC_RATE};
use melange_guest::thread::{GuestConfig as LinkConfig, GuestHandle as LinkHandle, GuestThread as LinkManager};
use melange_shim::codec::{input_format, SampleFormat};
use melange_shim::render::{jitter_margin_frames, render_ring, OutputClock, RenderConfig, RenderCore, RenderStats};
use melange_shim::tap::{tap_ring, TapEncoder, TapStats, TapWriter};
use melange_transport::message::{AppInfo, AudioFormat, MediaKind, StreamOpen, Volume};
use pipewire as pw;
use pw::core::CoreBox;
use pw::properties::properties;
use pw::registry::RegistryBox;
use pw::spa;
use pw::spa::utils::dict::DictRef;
use pw::types::ObjectType;

use crate::config::Config;

/// Graph rate the taps ask for: Opus's native rate, and PipeWire's default.
const TAP_RATE: u32 = 48_000;
/// SPA channel positions of the redirect sink (and so of every tap): FL, FR.
const POSITIONS: [u32; 2] = [spa::sys::SPA_AUDIO_CHANNEL_FL, spa::sys::SPA_AUDIO_CHANNEL_FR];
/// Audio a tap ring holds: far more than an encoder wake-up period.
const TAP_RING: Duration = Duration::from_millis(500);
/// How often the main loop looks for new latency figures to tell the apps (and, every
/// [`COUNTER_TICKS`] of it, puts each tap's counters on its node).
const LATENCY_POLL: Duration = Duration::from_millis(250);
const COUNTER_TICKS: u32 = 4;
/// A latency that moved less than this since it was published is not published again.
const LATENCY_STEP_NS: u64 = 1_000_000;
/// How long a tap outlives its app's last link to our sinks while the app is linked to
/// nothing: WirePlumber moves a stream by unlinking it first, and an app moved from
/// one of our sinks to the other keeps its tap (and its host stream) through it.
const MOVE_GRACE: Duration = Duration::from_millis(300);

/// Decoded microphone audio the virtual source's ring holds at most.
const MIC_RING: Duration = Duration::from_millis(500);

/// The virtual microphone: an `Audio/Source` stream of this process that plays what
/// the host's microphone sends, silence without it.
struct MicSource {
    // Declared before `stream`: the listener (and its render core) must go first.
    _listener: pw::stream::StreamListener<MicRt>,
    stream: pw::stream::StreamBox<'static>,
    stats: Arc<RenderStats>,
    published: Vec<(&'static str, String)>,
    /// The fill sum and cycle count at the last put.
    fill_mark: (u64, u64),
}

impl MicSource {
    /// Puts the jitter buffer's figures on the source's node as `melange.*` properties:
    /// its mean fill since the last put, the drift, underruns and silence so far.
    fn publish_counters(&mut self) {
        let s = &self.stats;
        let (sum, cycles) = (s.fill_sum_frames.load(Ordering::Relaxed), s.cycles.load(Ordering::Relaxed));
        let (last_sum, last_cycles) = std::mem::replace(&mut self.fill_mark, (sum, cycles));
        let fill = (cycles > last_cycles)
            .then(|| (sum - last_sum) as f64 / (cycles - last_cycles) as f64 * 1000.0 / f64::from(MIC_RATE))
            .map_or("n/a".to_string(), |ms| format!("{ms:.1}"));
        let counters = vec![
            ("melange.fill.ms", fill),
            (
                "melange.target.ms",
                format!("{:.1}", s.target_frames.load(Ordering::Relaxed) as f64 * 1000.0 / f64::from(MIC_RATE)),
            ),
            ("melange.drift.ppm", format!("{:.0}", s.drift_ppb.load(Ordering::Relaxed) as f64 / 1000.0)),
            ("melange.underruns", s.underruns.load(Ordering::Relaxed).to_string()),
            ("melange.latency.cuts", s.latency_cuts.load(Ordering::Relaxed).to_string()),
            ("melange.silence.frames", s.silence_frames.load(Ordering::Relaxed).to_string()),
        ];
        update_properties(&self.stream, counters, &mut self.published);
    }
}

/// What the microphone's real-time callback owns.
struct MicRt {
    core: RenderCore,
    /// The stream's rate-match area, from `io_changed` (null when unset).
    rate_match: Arc<AtomicPtr<spa::sys::spa_io_rate_match>>,
}

/// A node seen in the registry that may be an app: every node but our sinks and
/// microphone. Which ones are apps is decided by what feeds the sinks ([`reconcile`]).
struct AppNode {
    serial: String,
    /// Whether it has a `media.class`: WirePlumber links a tap to such a node when the
    /// tap names it as its target; to one without (a JACK client, `client.api = jack`)
    /// the module links the tap itself ([`ManualLinks`]).
    has_class: bool,
    info: Option<AppInfo>,
    _proxy: pw::node::Node,
    _listener: pw::node::NodeListener,
}

/// A port seen in the registry.
struct PortInfo {
    node: u32,
    output: bool,
    /// `audio.channel` (FL, FR, ...), or `port.name` where it has none.
    channel: String,
}

/// A link seen in the registry: its nodes, and its ports where the registry says them.
#[derive(Clone, Copy)]
struct LinkInfo {
    out_node: u32,
    in_node: u32,
    out_port: Option<u32>,
    in_port: Option<u32>,
}

/// The links the module made for a tap whose app WirePlumber cannot link it to: each
/// of the app's links into our sinks mirrored onto the tap's input port of the same
/// channel.
#[derive(Default)]
struct ManualLinks {
    /// The tap's own node, once the registry shows it.
    node: Option<u32>,
    /// Per (app's output port, tap's input port): the link's proxy (dropping it
    /// destroys the link), and whether the registry has shown the link yet (one that
    /// was shown and is gone was destroyed by someone else: it is made again).
    made: BTreeMap<(u32, u32), (pw::link::Link, bool)>,
}

/// One tap: a passive capture stream on one app's output. The link's I/O thread
/// encodes what it captures.
struct Tap {
    stream_id: u32,
    /// The tap's `node.name`, `melange.tap.<app's object.serial>`.
    node_name: String,
    /// `Some` when the module links the tap itself (see [`AppNode::has_class`]).
    manual: Option<ManualLinks>,
    // Declared before `stream`: the listener (and its TapWriter) must go first.
    listener: Option<pw::stream::StreamListener<TapWriter>>,
    stream: pw::stream::StreamBox<'static>,
    link: LinkHandle,
    stats: Arc<TapStats>,
    /// The latency the app was last told, ns (0: never).
    published_ns: u64,
    /// The counters last put on the tap's node.
    published_counters: Vec<(&'static str, String)>,
}

impl Tap {
    /// Tells the app the stream's end-to-end latency when the link thread has a new
    /// figure. PipeWire gives an app the mean of the smallest and largest latency
    /// among the input ports it is linked to; the redirect sink (a null sink) reports
    /// none, so the tap reports twice the latency for the app to see it once.
    fn publish_latency(&mut self) {
        let ns = self.stats.latency_ns.load(Ordering::Relaxed);
        if ns == 0 || ns.abs_diff(self.published_ns) < LATENCY_STEP_NS {
            return;
        }
        let reported = i64::try_from(ns.saturating_mul(2)).unwrap_or(i64::MAX);
        let pod = match latency_pod(reported) {
            Ok(pod) => pod,
            Err(e) => {
                log::warn!("melange: stream {}: {e}", self.stream_id);
                return;
            }
        };
        let Some(pod) = spa::pod::Pod::from_bytes(&pod) else { return };
        match self.stream.update_params(&mut [pod]) {
            Ok(()) => {
                log::debug!("melange: stream {} latency {:.1} ms", self.stream_id, ns as f64 / 1e6);
                self.published_ns = ns;
            }
            Err(e) => log::warn!("melange: stream {}: cannot publish its latency: {e}", self.stream_id),
        }
    }
}

impl Tap {
    /// Puts the stream's counters on the tap's node as `melange.*` properties (see
    /// `docs/guest.md`; `pw-cli info` and `wpctl inspect` show them), when they moved.
    fn publish_counters(&mut self, link: &LinkStats) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
        let s = &self.stats;
        let counters = vec![
            ("melange.stream", self.stream_id.to_string()),
            ("melange.packets.sent", load(&s.packets_sent)),
            ("melange.packets.dropped", load(&s.packets_dropped)),
            ("melange.bitrate", load(&s.bitrate)),
            ("melange.latency.ms", format!("{:.1}", s.latency_ns.load(Ordering::Relaxed) as f64 / 1e6)),
            ("melange.skipped.frames", load(&s.gap_frames)),
            ("melange.overflow.bytes", load(&s.overflow_bytes)),
            ("melange.host.connected", link.connected.load(Ordering::Relaxed).to_string()),
            ("melange.host.sessions", load(&link.sessions)),
            ("melange.bitrate.steps.down", load(&link.bitrate_steps_down)),
            ("melange.bitrate.steps.up", load(&link.bitrate_steps_up)),
        ];
        update_properties(&self.stream, counters, &mut self.published_counters);
    }
}

/// Puts `props` on a stream's node unless they are what was last put there.
fn update_properties(
    stream: &pw::stream::Stream,
    props: Vec<(&'static str, String)>,
    published: &mut Vec<(&'static str, String)>,
) {
    if props == *published {
        return;
    }
    let mut dict = pw::properties::PropertiesBox::new();
    for (k, v) in &props {
        dict.insert(*k, v.as_str());
    }
    // SAFETY: both pointers are valid for the call; PipeWire copies the dict.
    let rc = unsafe { pw::sys::pw_stream_update_properties(stream.as_raw_ptr(), &(*dict.as_raw_ptr()).dict) };
    if rc >= 0 {
        *published = props;
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Stop the data loop from calling us before the listener and its writer go.
        let _ = self.stream.disconnect();
        self.listener.take();
        // The I/O thread sees the writer gone, sends what is left and closes the stream.
        self.link.wake();
        log::debug!("melange: tap for stream {} removed", self.stream_id);
    }
}

/// Mutable state shared by the registry and node callbacks.
struct State {
    config: Config,
    core: &'static CoreBox<'static>,
    link: LinkHandle,
    /// The redirect sink: passive, this process's own (see [`ensure_sinks`]), and the
    /// watch on its volume.
    sink_id: Option<u32>,
    sink_proxy: Option<pw::node::Node>,
    sink_listener: Option<pw::node::NodeListener>,
    /// The standby sink: lingering, for when this process is not running.
    standby_id: Option<u32>,
    standby_proxy: Option<pw::node::Node>,
    synced: bool,
    apps: BTreeMap<u32, AppNode>,
    links: BTreeMap<u32, LinkInfo>,
    ports: BTreeMap<u32, PortInfo>,
    /// Every `Audio/Sink` node, ours or not.
    sinks: BTreeSet<u32>,
    taps: BTreeMap<u32, Tap>,
    /// Tapped apps linked to no sink at all, and since when (see [`MOVE_GRACE`]).
    unlinked_since: BTreeMap<u32, std::time::Instant>,
    /// The microphone's render core until its source is made, then the source.
    mic_core: Option<RenderCore>,
    mic: Option<MicSource>,
    /// The source's node id, and whether an app records from it (links out of it).
    mic_id: Option<u32>,
    mic_wanted: bool,
}

/// The running guest side. Dropping it tears everything down in order.
pub struct Guest {
    state: Rc<RefCell<State>>,
    latency_timer: Option<pw::loop_::TimerSource<'static>>,
    registry_listener: Option<pw::registry::Listener>,
    core_listener: Option<pw::core::Listener>,
    registry: *mut RegistryBox<'static>,
    core: *mut CoreBox<'static>,
    link: Option<LinkManager>,
}

impl Guest {
    /// Connects to the session's PipeWire through `context`, makes sure the sink exists
    /// and starts watching app streams.
    ///
    /// # Safety
    /// `context` must be the live context of the process that loaded the module, and
    /// outlive the returned value.
    pub unsafe fn start(context: *mut pw::sys::pw_context, config: Config) -> Result<Box<Guest>, String> {
        // SAFETY: Context is a transparent wrapper over pw_context; we only borrow it.
        let context: &'static pw::context::Context = unsafe { &*(context as *const pw::context::Context) };
        let core = context
            .connect(None)
            .map_err(|e| format!("cannot connect to PipeWire (is it running for this user?): {e}"))?;
        let core: &'static CoreBox<'static> = Box::leak(Box::new(core));
        let registry = match core.get_registry() {
            Ok(r) => {
                let ptr = std::ptr::NonNull::new(r.as_raw_ptr()).ok_or("null registry")?;
                std::mem::forget(r);
                // SAFETY: we took the registry out of the box above; the core outlives it.
                let r: RegistryBox<'static> = unsafe { RegistryBox::from_raw(ptr) };
                &*Box::leak(Box::new(r))
            }
            Err(e) => {
                // SAFETY: leaked just above and not shared yet.
                drop(unsafe { Box::from_raw(core as *const CoreBox<'static> as *mut CoreBox<'static>) });
                return Err(format!("cannot get the PipeWire registry: {e}"));
            }
        };
        // The microphone's packets: 10 ms, or 5 ms when the taps' are shorter (at 32
        // kbit/s a 2.5 ms Opus packet is 10 bytes, too few for clean speech); its jitter
        // buffer derived as the host's: a packet, the graph's quantum and the margin.
        let mic_frame_us = config.frame_us.clamp(5_000, 10_000);
        let mic_frames = (u64::from(MIC_RATE) * u64::from(mic_frame_us) / 1_000_000) as usize;
        let (mic_feed, mic_core) = render_ring(
            RenderConfig {
                rate: MIC_RATE,
                channels: 1,
                latency_frames: mic_frames + config.tap_quantum as usize + jitter_margin_frames(MIC_RATE, 0) as usize,
                trim: true,
                quantum: config.tap_quantum,
                packet_frames: mic_frames as u32,
            },
            MIC_RATE as usize * MIC_RING.as_millis() as usize / 1000,
        );
        let mic_stats = mic_core.stats().clone();
        let link = LinkManager::spawn(LinkConfig {
            port: config.port.clone(),
            software: format!("melange-guest {}", env!("CARGO_PKG_VERSION")),
            mic: Some(MicFeed { producer: mic_feed, stats: mic_stats, frame_us: mic_frame_us }),
            broker: config.media_socket.path(),
        })
        .map_err(|e| format!("cannot open port {}: {e}", config.port))?;

        let state = Rc::new(RefCell::new(State {
            config,
            core,
            link: link.handle(),
            sink_id: None,
            sink_proxy: None,
            sink_listener: None,
            standby_id: None,
            standby_proxy: None,
            synced: false,
            apps: BTreeMap::new(),
            links: BTreeMap::new(),
            ports: BTreeMap::new(),
            sinks: BTreeSet::new(),
            taps: BTreeMap::new(),
            unlinked_since: BTreeMap::new(),
            mic_core: Some(mic_core),
            mic: None,
            mic_id: None,
            mic_wanted: false,
        }));

        let weak = Rc::downgrade(&state);
        let weak_remove = weak.clone();
        let registry_listener = registry
            .add_listener_local()
            .global(move |global| {
                if let Some(state) = weak.upgrade() {
                    on_global(&state, registry, global);
                }
            })
            .global_remove(move |id| {
                if let Some(state) = weak_remove.upgrade() {
                    on_global_remove(&state, id);
                }
            })
            .register();

        let pending = core.sync(0).map_err(|e| format!("core sync failed: {e}"))?;
        let weak = Rc::downgrade(&state);
        let core_listener = core
            .add_listener_local()
            .done(move |id, seq| {
                if id == pw::core::PW_ID_CORE && seq == pending {
                    if let Some(state) = weak.upgrade() {
                        state.borrow_mut().synced = true;
                        ensure_sinks(&state);
                    }
                }
            })
            .error(|id, _seq, res, message| {
                if res == -libc::ENOENT {
                    // WirePlumber destroys a dont-reconnect tap whose app went first.
                    log::debug!("melange: PipeWire object {id} already gone: {message}");
                } else if res == -libc::EPIPE {
                    // The session's PipeWire went away (restarted, or the session ended).
                    // Its objects are gone with it; start over as a new process, as
                    // WirePlumber does: systemd's Restart=always (or whoever runs us)
                    // starts the module again once PipeWire is back, and it re-taps.
                    log::error!(
                        "melange: lost the connection to the session's PipeWire ({message}); \
                         exiting so that the service starts again with it"
                    );
                    // SAFETY: kill(2) on our own process; `pipewire` quits its main loop
                    // on SIGTERM and unloads the module cleanly.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                } else {
                    log::warn!("melange: PipeWire error on object {id}: {message} ({res})");
                }
            })
            .register();

        // SAFETY: Loop is a transparent wrapper over pw_loop; the context's main loop
        // outlives the module, and the timer is dropped in `release`.
        let main_loop: &'static pw::loop_::Loop =
            unsafe { &*(pw::sys::pw_context_get_main_loop(context.as_raw_ptr()) as *const pw::loop_::Loop) };
        let weak = Rc::downgrade(&state);
        let link_stats = link.handle().stats().clone();
        let ticks = std::cell::Cell::new(0u32);
        let latency_timer = main_loop.add_timer(move |_| {
            if let Some(state) = weak.upgrade() {
                ticks.set(ticks.get().wrapping_add(1));
                if let Some(volume) = state.borrow().link.take_host_volume() {
                    log::info!("melange: the host set the volume; putting it on the redirect sink");
                    apply_host_volume(&state.borrow(), &volume);
                }
                if ticks.get() % COUNTER_TICKS == 0 {
                    if let Some(mic) = &mut state.borrow_mut().mic {
                        mic.publish_counters();
                    }
                }
                for tap in state.borrow_mut().taps.values_mut() {
                    tap.publish_latency();
                    if ticks.get() % COUNTER_TICKS == 0 {
                        tap.publish_counters(&link_stats);
                    }
                }
                // Closes the taps of apps whose move grace ran out.
                reconcile(&state);
            }
        });
        let _ = latency_timer.update_timer(Some(LATENCY_POLL), Some(LATENCY_POLL));

        Ok(Box::new(Guest {
            state,
            latency_timer: Some(latency_timer),
            registry_listener: Some(registry_listener),
            core_listener: Some(core_listener),
            registry: registry as *const RegistryBox<'static> as *mut RegistryBox<'static>,
            core: core as *const CoreBox<'static> as *mut CoreBox<'static>,
            link: Some(link),
        }))
    }
}

impl Guest {
    /// The core proxy, for the module to watch its removal.
    pub fn core_ptr(&self) -> *mut pw::sys::pw_core {
        // SAFETY: the core lives until `release` or drop.
        unsafe { (*self.core).as_raw_ptr() }
    }

    /// Tears down everything that hangs on the core: taps, proxies, listeners, the
    /// registry, and the link. Idempotent.
    fn release(&mut self) {
        {
            let mut s = self.state.borrow_mut();
            s.taps.clear();
            s.apps.clear();
            s.mic.take();
            s.sink_listener.take();
            s.sink_proxy.take();
            s.standby_proxy.take();
        }
        // No more callbacks from here on.
        self.latency_timer.take();
        self.registry_listener.take();
        self.core_listener.take();
        if let Some(link) = self.link.take() {
            link.shutdown();
        }
        if !self.registry.is_null() {
            // SAFETY: leaked in `start`; its listener and users are gone above.
            drop(unsafe { Box::from_raw(self.registry) });
            self.registry = std::ptr::null_mut();
        }
    }

    /// The process is disconnecting our core (context teardown destroys cores before
    /// modules): release what hangs on it now, and leave the core itself to PipeWire.
    pub fn on_core_removed(&mut self) {
        self.release();
        if !self.core.is_null() {
            // SAFETY: leaked in `start`; PipeWire frees the pw_core itself now, so only
            // the Box is freed, without running CoreBox's disconnect.
            let core = unsafe { Box::from_raw(self.core) };
            let _ = core.into_raw();
            self.core = std::ptr::null_mut();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.release();
        if !self.core.is_null() {
            // SAFETY: leaked in `start`; everything that borrowed it is gone.
            drop(unsafe { Box::from_raw(self.core) });
        }
    }
}

fn dict_get<'a>(props: Option<&'a DictRef>, key: &str) -> Option<&'a str> {
    props.and_then(|p| p.get(key)).filter(|v| !v.is_empty())
}

fn on_global(
    state: &Rc<RefCell<State>>,
    registry: &'static RegistryBox<'static>,
    global: &pw::registry::GlobalObject<&DictRef>,
) {
    let props = global.props;
    let num = |k| dict_get(props, k).and_then(|v| v.parse::<u32>().ok());
    match global.type_ {
        ObjectType::Node => {
            let class = dict_get(props, "media.class").unwrap_or("");
            let name = dict_get(props, "node.name").unwrap_or("");
            let mut s = state.borrow_mut();
            if class == "Audio/Sink" {
                s.sinks.insert(global.id);
            }
            if let Some(tap) = s.taps.values_mut().find(|t| t.node_name == name) {
                if let Some(manual) = &mut tap.manual {
                    manual.node = Some(global.id);
                }
                drop(s);
                reconcile(state);
                return;
            }
            if class == "Audio/Source" && name == s.config.mic_name() {
                log::info!("melange: microphone {name} is node {}", global.id);
                s.mic_id = Some(global.id);
                return;
            }
            if class == "Audio/Sink" && (name == s.config.sink_name || name == s.config.standby_name()) {
                if name == s.config.sink_name {
                    log::info!("melange: redirect sink {name} is node {}", global.id);
                    s.sink_id = Some(global.id);
                } else {
                    log::info!("melange: standby sink {name} is node {}", global.id);
                    s.standby_id = Some(global.id);
                }
                drop(s);
                reconcile(state);
                return;
            }
            // Any other node may feed our sinks: an app of any API (PipeWire, Pulse,
            // ALSA, JACK), a loopback, another sink's monitor. Its full properties come
            // with its info.
            let Ok(proxy) = registry.bind::<pw::node::Node, _>(global) else { return };
            let id = global.id;
            let weak: Weak<RefCell<State>> = Rc::downgrade(state);
            let listener = proxy
                .add_listener_local()
                .info(move |info| {
                    let Some(state) = weak.upgrade() else { return };
                    // Later info events carry an empty dict when props did not change.
                    let props = info.props().filter(|p| p.iter().next().is_some());
                    if props.is_none() {
                        return;
                    }
                    let app = AppInfo {
                        name: dict_get(props, "application.name")
                            .or_else(|| dict_get(props, "node.description"))
                            .or_else(|| dict_get(props, "node.name"))
                            .unwrap_or("unknown")
                            .to_string(),
                        role: dict_get(props, "media.role").unwrap_or("").to_string(),
                        binary: dict_get(props, "application.process.binary").unwrap_or("").to_string(),
                        icon_name: dict_get(props, "application.icon-name").unwrap_or("").to_string(),
                        media_name: dict_get(props, "media.name").unwrap_or("").to_string(),
                    };
                    let known = {
                        let mut s = state.borrow_mut();
                        let Some(node) = s.apps.get_mut(&id) else { return };
                        let known = node.info.is_some();
                        node.info = Some(app);
                        known
                    };
                    if !known {
                        reconcile(&state);
                    }
                })
                .register();
            let serial = dict_get(props, "object.serial").unwrap_or("").to_string();
            let has_class = !class.is_empty();
            s.apps.insert(id, AppNode { serial, has_class, info: None, _proxy: proxy, _listener: listener });
        }
        ObjectType::Port => {
            let Some(node) = num("node.id") else { return };
            let output = dict_get(props, "port.direction") == Some("out");
            let channel = dict_get(props, "audio.channel").or_else(|| dict_get(props, "port.name")).unwrap_or("");
            state.borrow_mut().ports.insert(global.id, PortInfo { node, output, channel: channel.to_string() });
            reconcile(state);
        }
        ObjectType::Link => {
            if let (Some(out_node), Some(in_node)) = (num("link.output.node"), num("link.input.node")) {
                let link =
                    LinkInfo { out_node, in_node, out_port: num("link.output.port"), in_port: num("link.input.port") };
                state.borrow_mut().links.insert(global.id, link);
                reconcile(state);
            }
        }
        _ => {}
    }
}

fn on_global_remove(state: &Rc<RefCell<State>>, id: u32) {
    let removed = {
        let mut s = state.borrow_mut();
        if s.sink_id == Some(id) {
            log::warn!("melange: redirect sink {id} was removed");
            s.sink_id = None;
        }
        if s.standby_id == Some(id) {
            log::warn!("melange: standby sink {id} was removed");
            s.standby_id = None;
        }
        if s.mic_id == Some(id) {
            log::warn!("melange: microphone {id} was removed");
            s.mic_id = None;
        }
        s.sinks.remove(&id);
        s.unlinked_since.remove(&id);
        // Drop the tap outside the borrow: its Drop joins the encoder thread.
        let tap = s.taps.remove(&id);
        let app = s.apps.remove(&id);
        s.links.remove(&id);
        s.ports.remove(&id);
        (tap, app)
    };
    drop(removed);
    reconcile(state);
}

/// Creates the two sinks apps play into, each only if the registry has none of its name
/// (after the first sync).
///
/// - The redirect sink (`sink.name`, the default) is this process's own and passive:
///   an app linked to it runs only once its tap, which is not passive, is linked too,
///   so the app's first sample is captured, never played before the tap is there.
///   It goes when this process goes.
/// - The standby sink (`sink.name` + `.standby`) lingers: when this process is not
///   running, WirePlumber moves the apps to it (the next default) and they play on,
///   discarded, without waiting for anything. Apps on it are tapped too.
fn ensure_sinks(state: &Rc<RefCell<State>>) {
    let mut s = state.borrow_mut();
    if !s.synced {
        return;
    }
    if s.standby_id.is_none() && s.standby_proxy.is_none() {
        let name = s.config.standby_name();
        let description = format!("{} (standby)", s.config.sink_description);
        s.standby_proxy = create_sink(&s, &name, &description, SinkKind::Standby);
    }
    if s.sink_id.is_none() && s.sink_proxy.is_none() {
        let name = s.config.sink_name.clone();
        let description = s.config.sink_description.clone();
        s.sink_proxy = create_sink(&s, &name, &description, SinkKind::Redirect);
        s.sink_listener = s.sink_proxy.as_ref().map(|p| watch_volume(p, s.link.clone()));
    }
    if let Some(core) = s.mic_core.take() {
        match create_mic(&s, core) {
            Ok(mic) => s.mic = Some(mic),
            Err(e) => log::error!("melange: cannot create the microphone: {e}"),
        }
    }
}

/// The virtual microphone, `sink.name` + `.mic` ("Melange microphone"): a source of this
/// process, the default one by its priority. It plays what the host's microphone sends
/// ([`RenderCore`]), and silence without it: never an error, never another device.
fn create_mic(s: &State, core: RenderCore) -> Result<MicSource, String> {
    let name = s.config.mic_name();
    let description = format!("{} microphone", s.config.sink_description);
    let props = properties! {
        "media.type" => "Audio",
        "media.category" => "Duplex",
        "media.class" => "Audio/Source",
        "node.name" => name.as_str(),
        "node.description" => description.as_str(),
        "node.latency" => format!("{}/{MIC_RATE}", s.config.tap_quantum).as_str(),
        "priority.session" => "2000",
        "priority.driver" => "0",
    };
    let stream = pw::stream::StreamBox::new(s.core, "melange-mic", props)
        .map_err(|e| format!("cannot create the microphone's stream: {e}"))?;
    let stats = core.stats().clone();
    let rate_match = Arc::new(AtomicPtr::new(std::ptr::null_mut()));
    let io_rate_match = rate_match.clone();
    let listener = stream
        .add_local_listener_with_user_data(MicRt { core, rate_match })
        .io_changed(move |_, _, id, area, _| {
            // May run on another thread than `process`: hand the pointer over atomically.
            if id == spa::sys::SPA_IO_RateMatch {
                io_rate_match.store(area.cast(), Ordering::Release);
            }
        })
        .process(|stream, rt| {
            // Real-time: the render core fills the buffer; nothing else.
            let clock = stream
                .time()
                .ok()
                .map(|t| OutputClock { ticks: t.ticks(), now_ns: u64::try_from(t.now()).unwrap_or(0) });
            let Some(mut buffer) = stream.dequeue_buffer() else { return };
            let requested = buffer.requested() as usize;
            let Some(data) = buffer.datas_mut().first_mut() else { return };
            let Some(bytes) = data.data() else { return };
            let max_frames = bytes.len() / 4;
            let frames = if requested > 0 { requested.min(max_frames) } else { max_frames.min(1024) };
            if let Some(ratio) = rt.core.cycle(clock, &mut bytes[..frames * 4]) {
                // SAFETY: PipeWire keeps the area it passed to io_changed valid until it
                // passes another (or null), and only this callback writes it.
                if let Some(rm) = unsafe { rt.rate_match.load(Ordering::Acquire).as_mut() } {
                    rm.rate = 1.0 / ratio;
                    rm.flags |= spa::sys::SPA_IO_RATE_MATCH_FLAG_ACTIVE;
                }
            }
            let chunk = data.chunk_mut();
            *chunk.offset_mut() = 0;
            *chunk.stride_mut() = 4;
            *chunk.size_mut() = (frames * 4) as u32;
        })
        .register()
        .map_err(|e| format!("cannot listen on the microphone's stream: {e}"))?;
    let pod = format_pod(SampleFormat::F32, &[spa::sys::SPA_AUDIO_CHANNEL_MONO])?;
    // Not autoconnected: a source that recording apps are linked to.
    melange_pw::connect(&stream, spa::utils::Direction::Output, &pod, false)
        .map_err(|e| format!("cannot connect the microphone's stream: {e}"))?;
    log::info!("melange: created the microphone {name} (\"{description}\")");
    Ok(MicSource { _listener: listener, stream, stats, published: Vec::new(), fill_mark: (0, 0) })
}

/// Tells the link the redirect sink's volume and mute whenever they change: the taps
/// take the apps' audio before the sink, so the host applies them (and the link sends
/// nothing while muted).
fn watch_volume(sink: &pw::node::Node, link: LinkHandle) -> pw::node::NodeListener {
    let listener = sink
        .add_listener_local()
        .param(move |_seq, id, _index, _next, param| {
            if id == spa::param::ParamType::Props {
                if let Some(volume) = param.and_then(parse_volume) {
                    link.set_volume(volume);
                }
            }
        })
        .register();
    sink.subscribe_params(&[spa::param::ParamType::Props]);
    listener
}

/// `channelVolumes` and `mute` from a node's Props, if it has them.
fn parse_volume(pod: &spa::pod::Pod) -> Option<Volume> {
    use spa::pod::{Value, ValueArray};
    let (_, value) = spa::pod::deserialize::PodDeserializer::deserialize_any_from(pod.as_bytes()).ok()?;
    let Value::Object(obj) = value else { return None };
    let mut channels = None;
    let mut mute = None;
    for p in obj.properties {
        match (p.key, p.value) {
            (spa::sys::SPA_PROP_channelVolumes, Value::ValueArray(ValueArray::Float(v))) if !v.is_empty() => {
                channels = Some(v)
            }
            (spa::sys::SPA_PROP_mute, Value::Bool(m)) => mute = Some(m),
            _ => {}
        }
    }
    Some(Volume { channels: channels?, mute: mute.unwrap_or(false) })
}

/// Puts the volume the host asked for on the redirect sink; its change comes back
/// through [`watch_volume`] and goes to the host as the guest's.
fn apply_host_volume(s: &State, volume: &Volume) {
    use spa::pod::{Property, Value, ValueArray};
    let Some(sink) = &s.sink_proxy else { return };
    let obj = spa::pod::Object {
        type_: spa::utils::SpaTypes::ObjectParamProps.as_raw(),
        id: spa::param::ParamType::Props.as_raw(),
        properties: vec![
            Property::new(
                spa::sys::SPA_PROP_channelVolumes,
                Value::ValueArray(ValueArray::Float(volume.gains(POSITIONS.len()))),
            ),
            Property::new(spa::sys::SPA_PROP_mute, Value::Bool(volume.mute)),
        ],
    };
    let pod = spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &Value::Object(obj))
        .map(|(c, _)| c.into_inner());
    match pod.as_deref().ok().and_then(spa::pod::Pod::from_bytes) {
        Some(pod) => sink.set_param(spa::param::ParamType::Props, 0, pod),
        None => log::warn!("melange: cannot build the volume the host asked for"),
    }
}

/// Which of the two sinks [`ensure_sinks`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkKind {
    Redirect,
    Standby,
}

/// A null sink in the session's PipeWire (apps' audio goes nowhere but to the taps).
fn create_sink(s: &State, name: &str, description: &str, kind: SinkKind) -> Option<pw::node::Node> {
    let quantum = format!("{}/{TAP_RATE}", s.config.tap_quantum);
    let redirect = kind == SinkKind::Redirect;
    let props = properties! {
        "factory.name" => "support.null-audio-sink",
        "node.name" => name,
        "node.description" => description,
        "media.class" => "Audio/Sink",
        "audio.position" => "FL,FR",
        "audio.rate" => "48000",
        // An app's first graph cycle runs at the taps' quantum, not at whatever the app
        // asked for: on the standby sink, where an app may run before its tap, that
        // first cycle is all that can be lost.
        "node.latency" => quantum.as_str(),
        "node.passive" => if redirect { "true" } else { "false" },
        // The standby outlives this process: apps play on into it if the module stops.
        "object.linger" => if redirect { "false" } else { "true" },
        // Above any emulated sound card, so WirePlumber makes them the default, the
        // redirect sink first.
        "priority.session" => if redirect { "2000" } else { "1900" },
        "monitor.channel-volumes" => "true",
        "node.virtual" => "true",
    };
    match s.core.create_object::<pw::node::Node>("adapter", &props) {
        Ok(proxy) => {
            log::info!(
                "melange: created the {} sink {name} (\"{description}\")",
                if redirect { "redirect" } else { "standby" }
            );
            Some(proxy)
        }
        Err(e) => {
            log::error!("melange: cannot create the sink {name}: {e}");
            None
        }
    }
}

/// Opens taps for the apps linked to either sink and closes the taps of apps linked
/// to another sink, or to none for longer than [`MOVE_GRACE`]. An app is any node with
/// an output port linked into one of our sinks that is not ours, whatever its API or
/// `media.class`: what feeds the sink is what the user would hear.
fn reconcile(state: &Rc<RefCell<State>>) {
    let mut stale = Vec::new();
    {
        let mut s = state.borrow_mut();
        let ours = [s.sink_id, s.standby_id];
        let own = |id: u32| ours.contains(&Some(id)) || s.mic_id == Some(id);
        let linked: BTreeSet<u32> = s
            .links
            .values()
            .filter(|l| ours.contains(&Some(l.in_node)) && !own(l.out_node))
            .map(|l| l.out_node)
            .collect();
        let elsewhere: BTreeSet<u32> = s
            .links
            .values()
            .filter(|l| s.sinks.contains(&l.in_node) && !ours.contains(&Some(l.in_node)))
            .map(|l| l.out_node)
            .collect();
        let now = std::time::Instant::now();
        let tapped: Vec<u32> = s.taps.keys().copied().filter(|id| !linked.contains(id)).collect();
        for id in tapped {
            let since = *s.unlinked_since.entry(id).or_insert(now);
            if elsewhere.contains(&id) || now.duration_since(since) >= MOVE_GRACE {
                s.unlinked_since.remove(&id);
                if let Some(t) = s.taps.remove(&id) {
                    stale.push(t);
                }
            }
        }
        s.unlinked_since.retain(|id, _| !linked.contains(id));
        let recording = s.mic_id.is_some_and(|mic| s.links.values().any(|l| l.out_node == mic));
        if recording != s.mic_wanted {
            s.mic_wanted = recording;
            s.link.want_mic(recording);
        }
        for id in linked {
            if s.taps.contains_key(&id) {
                continue;
            }
            let Some(app) = s.apps.get(&id) else { continue };
            let Some(info) = app.info.clone() else { continue };
            let (serial, manual) = (app.serial.clone(), !app.has_class);
            match open_tap(&s, id, &serial, info, manual) {
                Ok(tap) => {
                    s.taps.insert(id, tap);
                }
                Err(e) => log::error!("melange: cannot tap app node {id}: {e}"),
            }
        }
        link_manual_taps(&mut s);
    }
    drop(stale);
}

/// Links each tap that WirePlumber cannot link ([`ManualLinks`]) as its app feeds our
/// sinks: every link from one of the app's output ports into a sink's input port of
/// channel C gets a twin from that output port into the tap's input port of channel C.
/// A twin whose original went is removed; one someone else destroyed is made again.
fn link_manual_taps(s: &mut State) {
    let ours = [s.sink_id, s.standby_id];
    let mut wanted: BTreeMap<u32, BTreeSet<(u32, u32)>> = BTreeMap::new();
    let mut existing: BTreeSet<(u32, u32)> = BTreeSet::new();
    for (app, tap) in &s.taps {
        let Some(tap_node) = tap.manual.as_ref().and_then(|m| m.node) else { continue };
        let pairs = wanted.entry(*app).or_default();
        for link in s.links.values() {
            if let (Some(out_port), Some(in_port), true) = (link.out_port, link.in_port, link.in_node == tap_node) {
                existing.insert((out_port, in_port));
            }
            if link.out_node != *app || !ours.contains(&Some(link.in_node)) {
                continue;
            }
            let (Some(out_port), Some(in_port)) = (link.out_port, link.in_port) else { continue };
            let Some(channel) = s.ports.get(&in_port).map(|p| p.channel.as_str()) else { continue };
            let tap_port = s.ports.iter().find(|(_, p)| p.node == tap_node && !p.output && p.channel == channel);
            if let Some((tap_port, _)) = tap_port {
                pairs.insert((out_port, *tap_port));
            }
        }
    }
    for (app, pairs) in wanted {
        let Some(manual) = s.taps.get_mut(&app).and_then(|t| t.manual.as_mut()) else { continue };
        let Some(tap_node) = manual.node else { continue };
        // Seen links are marked; twins no longer wanted, or destroyed after they were
        // seen, are let go (and the latter made again below).
        manual.made.retain(|pair, (_, seen)| {
            let here = existing.contains(pair);
            *seen |= here;
            pairs.contains(pair) && (here || !*seen)
        });
        for (out_port, tap_port) in pairs {
            if manual.made.contains_key(&(out_port, tap_port)) {
                continue;
            }
            let props = properties! {
                "link.output.node" => app.to_string().as_str(),
                "link.output.port" => out_port.to_string().as_str(),
                "link.input.node" => tap_node.to_string().as_str(),
                "link.input.port" => tap_port.to_string().as_str(),
                "object.linger" => "false",
            };
            match s.core.create_object::<pw::link::Link>("link-factory", &props) {
                Ok(proxy) => {
                    manual.made.insert((out_port, tap_port), (proxy, false));
                }
                Err(e) => log::error!("melange: cannot link port {out_port} of node {app} to its tap: {e}"),
            }
        }
    }
}

/// Opens a tap on `app_id`: WirePlumber links it to the app (`target.object`), or,
/// with `manual`, the module does ([`link_manual_taps`]).
fn open_tap(s: &State, app_id: u32, serial: &str, app: AppInfo, manual: bool) -> Result<Tap, String> {
    let codec = s.config.codec.clone();
    let sample = input_format(&codec);
    let format = AudioFormat { rate: TAP_RATE, channels: POSITIONS.len() as u8, positions: POSITIONS.to_vec() };
    let frame_samples = (u64::from(TAP_RATE) * u64::from(s.config.frame_us) / 1_000_000) as u32;
    let frame_bytes = usize::from(format.channels) * sample.bytes();
    let ring_bytes = (TAP_RATE as usize * frame_bytes) * TAP_RING.as_millis() as usize / 1000;
    let (writer, reader) = tap_ring(ring_bytes, frame_bytes, TAP_RATE);
    let stats = writer.stats().clone();
    let mut encoder = TapEncoder::new(reader, &format, &codec, frame_samples, s.config.mode.application())
        .map_err(|e| e.to_string())?;
    encoder.set_complexity(s.config.complexity).map_err(|e| e.to_string())?;

    let name = app.name.clone();
    let stream_id = s.link.open_tap(
        StreamOpen {
            media: MediaKind::Audio(format.clone()),
            codec: codec.clone(),
            frame_samples,
            app,
            codec_data: Vec::new(),
        },
        encoder,
    );
    log::info!(
        "melange: tapping \"{name}\" (node {app_id}, serial {serial}) as stream {stream_id}, {} at {} Hz{}",
        codec.name(),
        TAP_RATE,
        if manual { ", linked by the module (the node has no media.class)" } else { "" }
    );

    let node_name = format!("melange.tap.{serial}");
    let mut props = properties! {
        "media.type" => "Audio",
        "media.category" => "Capture",
        "node.name" => node_name.as_str(),
        "node.description" => format!("Melange tap: {name}").as_str(),
        "application.name" => "Melange",
        // The guest graph's quantum while this app is redirected: part of the latency.
        "node.latency" => format!("{}/{TAP_RATE}", s.config.tap_quantum).as_str(),
        // Not passive: the tap is what lets an app on the (passive) redirect sink run.
        "node.passive" => "false",
        // Never move to another source: a tap whose app went records nothing rather
        // than something else (dont-fallback is WirePlumber 0.5's spelling,
        // dont-reconnect 0.4's).
        "node.dont-reconnect" => "true",
        "node.dont-fallback" => "true",
        "stream.capture.sink" => "false",
    };
    if !manual {
        props.insert("target.object", serial);
    }
    let stream = pw::stream::StreamBox::new(s.core, &format!("melange-tap-{stream_id}"), props)
        .map_err(|e| format!("cannot create the tap stream: {e}"))?;
    let listener = stream
        .add_local_listener_with_user_data(writer)
        .process(melange_pw::capture_into)
        .register()
        .map_err(|e| format!("cannot listen on the tap stream: {e}"))?;

    let pod = format_pod(sample, &POSITIONS)?;
    melange_pw::connect(&stream, spa::utils::Direction::Input, &pod, !manual)
        .map_err(|e| format!("cannot connect the tap stream: {e}"))?;
    Ok(Tap {
        stream_id,
        node_name,
        manual: manual.then(ManualLinks::default),
        listener: Some(listener),
        stream,
        link: s.link.clone(),
        stats,
        published_ns: 0,
        published_counters: Vec::new(),
    })
}

/// A playback `SPA_PARAM_Latency` (direction input) of `ns` nanoseconds.
fn latency_pod(ns: i64) -> Result<Vec<u8>, String> {
    use spa::pod::{Property, Value};
    let obj = spa::pod::Object {
        type_: spa::utils::SpaTypes::ObjectParamLatency.as_raw(),
        id: spa::param::ParamType::Latency.as_raw(),
        properties: vec![
            Property::new(
                spa::sys::SPA_PARAM_LATENCY_direction,
                Value::Id(spa::utils::Id(spa::sys::SPA_DIRECTION_INPUT)),
            ),
            Property::new(spa::sys::SPA_PARAM_LATENCY_minQuantum, Value::Float(0.0)),
            Property::new(spa::sys::SPA_PARAM_LATENCY_maxQuantum, Value::Float(0.0)),
            Property::new(spa::sys::SPA_PARAM_LATENCY_minRate, Value::Int(0)),
            Property::new(spa::sys::SPA_PARAM_LATENCY_maxRate, Value::Int(0)),
            Property::new(spa::sys::SPA_PARAM_LATENCY_minNs, Value::Long(ns)),
            Property::new(spa::sys::SPA_PARAM_LATENCY_maxNs, Value::Long(ns)),
        ],
    };
    spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &spa::pod::Value::Object(obj))
        .map(|(c, _)| c.into_inner())
        .map_err(|e| format!("cannot build the latency pod: {e:?}"))
}

/// An EnumFormat at [`TAP_RATE`] in `positions`: the sink's layout and the codec's
/// input sample format for a tap, mono f32 for the microphone.
fn format_pod(sample: SampleFormat, positions: &[u32]) -> Result<Vec<u8>, String> {
    let format = match sample {
        SampleFormat::F32 => spa::param::audio::AudioFormat::F32LE,
        SampleFormat::S16Le => spa::param::audio::AudioFormat::S16LE,
    };
    melange_pw::format_pod(format, TAP_RATE, positions)
}
