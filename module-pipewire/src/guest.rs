//! The guest side on the session's PipeWire: the adapter between the registry and the
//! [`GraphPolicy`], and the life of everything the module makes there.
//!
//! The registry's callbacks tell the policy what they see and carry out the actions it
//! answers with ([`apply`]): taps opened and closed ([`Tap`]), the links the module
//! makes for taps on apps without a media class, the microphone's demand passed to the
//! link. Beside that, after the first sync: the two sinks ([`crate::sink`]) and the
//! virtual microphone ([`MicSource`]); and a timer that publishes the taps' latency and
//! counters, puts the host's volume on the sink, and lets the policy's move grace run
//! out.
//!
//! Everything here runs on the module process's main loop, except each tap's `process`
//! callback, which runs on the real-time data loop and only writes its tap ring, and
//! the microphone's, which only plays its render core.
//!
//! Ownership: [`Guest`] owns the connection (the core) and the registry; callbacks
//! hold only weak references to them and to the [`State`], which holds every stream and
//! proxy made on the connection. [`Guest::release`] empties the state, then drops the
//! callbacks, the registry and (unless PipeWire took it back) the core, in that order.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use melange_guest::thread::{GuestConfig, GuestHandle, GuestThread};
use melange_shim::render::RenderCore;
use melange_transport::message::AppInfo;
use pipewire as pw;
use pw::core::CoreBox;
use pw::properties::properties;
use pw::registry::RegistryBox;
use pw::spa::utils::dict::DictRef;
use pw::types::ObjectType;

use crate::camera::CameraSource;
use crate::config::Config;
use crate::mic::{mic_ring, MicSource};
use crate::policy::{Action, GraphPolicy, LinkFacts, NodeFacts, NodeRole, OwnNames, OwnNode};
use crate::sink::{apply_host_volume, create_sink, watch_volume, SinkKind};
use crate::tap::Tap;
use melange_guest::camera::CameraFeed;
use melange_pw::video::FrameSlot;

/// How often the main loop looks for new latency figures to tell the apps (and, every
/// [`COUNTER_TICKS`] of it, puts each tap's counters on its node), and lets the
/// policy's time pass.
const LATENCY_POLL: Duration = Duration::from_millis(250);
const COUNTER_TICKS: u32 = 4;

/// A node the policy may find to be an app, watched for its info.
struct Watched {
    // Declared first: the listener goes before its proxy.
    _listener: pw::node::NodeListener,
    _proxy: pw::node::Node,
}

/// Mutable state shared by the registry, node and timer callbacks.
struct State {
    config: Config,
    /// The connection, owned by [`Guest`].
    core: Weak<CoreBox<'static>>,
    link: GuestHandle,
    policy: GraphPolicy,
    /// The redirect sink this process made (see [`ensure_sinks`]), and the watch on its
    /// volume.
    sink_proxy: Option<pw::node::Node>,
    sink_listener: Option<pw::node::NodeListener>,
    /// The standby sink this process made.
    standby_proxy: Option<pw::node::Node>,
    synced: bool,
    /// Per node id: the nodes the policy called candidates.
    watched: BTreeMap<u32, Watched>,
    /// Per app node id: its tap.
    taps: BTreeMap<u32, Tap>,
    /// The microphone's render core until its source is made, then the source.
    mic_core: Option<RenderCore>,
    mic: Option<MicSource>,
    /// The virtual camera, once made; it is woken on `main_loop`.
    camera: Option<CameraSource>,
    /// Where the guest thread puts the host's camera frames for it.
    camera_frames: FrameSlot,
    /// What the camera's node says (`melange.camera.status`), as the guest thread sees it.
    camera_status: Arc<Mutex<String>>,
    main_loop: &'static pw::loop_::Loop,
}

/// The running guest side. Dropping it tears everything down in order.
pub struct Guest {
    state: Rc<RefCell<State>>,
    latency_timer: Option<pw::loop_::TimerSource<'static>>,
    registry_listener: Option<pw::registry::Listener>,
    core_listener: Option<pw::core::Listener>,
    registry: Option<Rc<RegistryBox<'static>>>,
    core: Option<Rc<CoreBox<'static>>>,
    link: Option<GuestThread>,
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
        let core = Rc::new(
            context
                .connect(None)
                .map_err(|e| format!("cannot connect to PipeWire (is it running for this user?): {e}"))?,
        );
        let registry = Rc::new(registry_of(&core)?);
        let (mic_feed, mic_core) = mic_ring(&config);
        let camera_frames = FrameSlot::new().map_err(|e| format!("cannot make the camera's frame slot: {e}"))?;
        let camera_status = Arc::new(Mutex::new(String::new()));
        let camera_feed = CameraFeed {
            video: crate::camera::camera_format(),
            sink: Box::new(crate::camera_sink::ModuleCameraSink::new(camera_frames.clone())),
            status: camera_status.clone(),
        };
        let link = GuestThread::spawn(GuestConfig {
            port: config.port.clone(),
            software: format!("melange-guest {}", env!("CARGO_PKG_VERSION")),
            mic: Some(mic_feed),
            camera: Some(camera_feed),
            broker: config.media_socket.path(),
        })
        .map_err(|e| format!("cannot open port {}: {e}", config.port))?;

        let names = OwnNames {
            sink: config.sink_name.clone(),
            standby: config.standby_name(),
            mic: config.mic_name(),
            camera: config.camera_name(),
        };
        // SAFETY: Loop is a transparent wrapper over pw_loop; the context's main loop
        // outlives the module, and the timers (ours and the camera's) are dropped in `release`.
        let main_loop: &'static pw::loop_::Loop =
            unsafe { &*(pw::sys::pw_context_get_main_loop(context.as_raw_ptr()) as *const pw::loop_::Loop) };
        let state = Rc::new(RefCell::new(State {
            config,
            core: Rc::downgrade(&core),
            link: link.handle(),
            policy: GraphPolicy::new(names),
            sink_proxy: None,
            sink_listener: None,
            standby_proxy: None,
            synced: false,
            watched: BTreeMap::new(),
            taps: BTreeMap::new(),
            mic_core: Some(mic_core),
            mic: None,
            camera: None,
            camera_frames,
            camera_status,
            main_loop,
        }));

        let (weak, weak_registry) = (Rc::downgrade(&state), Rc::downgrade(&registry));
        let weak_remove = weak.clone();
        let registry_listener = registry
            .add_listener_local()
            .global(move |global| {
                if let (Some(state), Some(registry)) = (weak.upgrade(), weak_registry.upgrade()) {
                    on_global(&state, &registry, global);
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

        let weak = Rc::downgrade(&state);
        let link_stats = link.handle().stats().clone();
        let ticks = std::cell::Cell::new(0u32);
        let latency_timer = main_loop.add_timer(move |_| {
            let Some(state) = weak.upgrade() else { return };
            ticks.set(ticks.get().wrapping_add(1));
            if let Some(volume) = state.borrow().link.take_host_volume() {
                log::info!("melange: the host set the volume; putting it on the redirect sink");
                if let Some(sink) = &state.borrow().sink_proxy {
                    apply_host_volume(sink, &volume);
                }
            }
            if ticks.get() % COUNTER_TICKS == 0 {
                if let Some(mic) = &mut state.borrow_mut().mic {
                    mic.publish_counters();
                }
            }
            let status = state.borrow().camera_status.lock().map(|s| s.clone()).unwrap_or_default();
            if let Some(camera) = &mut state.borrow_mut().camera {
                camera.set_status(&status);
            }
            for tap in state.borrow_mut().taps.values_mut() {
                tap.publish_latency();
                if ticks.get() % COUNTER_TICKS == 0 {
                    tap.publish_counters(&link_stats);
                }
            }
            // Closes the taps of apps whose move grace ran out.
            let actions = state.borrow_mut().policy.tick(Instant::now());
            apply(&state, actions);
        });
        let _ = latency_timer.update_timer(Some(LATENCY_POLL), Some(LATENCY_POLL));

        Ok(Box::new(Guest {
            state,
            latency_timer: Some(latency_timer),
            registry_listener: Some(registry_listener),
            core_listener: Some(core_listener),
            registry: Some(registry),
            core: Some(core),
            link: Some(link),
        }))
    }

    /// The core proxy, for the module to watch its removal (null once released).
    pub fn core_ptr(&self) -> *mut pw::sys::pw_core {
        self.core.as_ref().map_or(std::ptr::null_mut(), |core| core.as_raw_ptr())
    }

    /// Tears down everything that hangs on the core: taps, proxies, listeners, the
    /// registry, and the link. Idempotent.
    fn release(&mut self) {
        {
            let mut s = self.state.borrow_mut();
            s.taps.clear();
            s.watched.clear();
            s.mic.take();
            s.camera.take();
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
        // The callbacks that held it weakly are gone: this destroys the registry proxy.
        self.registry.take();
    }

    /// The process is disconnecting our core (context teardown destroys cores before
    /// modules): release what hangs on it now, and leave the core itself to PipeWire.
    pub fn on_core_removed(&mut self) {
        self.release();
        if let Some(core) = self.core.take() {
            match Rc::try_unwrap(core) {
                // PipeWire frees the pw_core itself now: let go of the box without
                // running its disconnect.
                Ok(core) => {
                    let _ = core.into_raw();
                }
                // Nothing else holds the core strongly (the state's is weak); were it
                // shared, forgetting this handle still never disconnects it twice.
                Err(shared) => std::mem::forget(shared),
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.release();
        // Everything made on the core is gone: this disconnects it (unless
        // `on_core_removed` already let PipeWire have it).
        self.core.take();
    }
}

/// The registry of `core`, owned apart from the borrow of the core: the guest destroys
/// it before its core ([`Guest::release`]).
fn registry_of(core: &pw::core::Core) -> Result<RegistryBox<'static>, String> {
    let registry = core.get_registry().map_err(|e| format!("cannot get the PipeWire registry: {e}"))?;
    let ptr = std::ptr::NonNull::new(registry.as_raw_ptr()).ok_or("null registry")?;
    std::mem::forget(registry);
    // SAFETY: the registry's ownership moves from the box forgotten above to the new
    // one; the core outlives it (see above).
    Ok(unsafe { RegistryBox::from_raw(ptr) })
}

fn dict_get<'a>(props: Option<&'a DictRef>, key: &str) -> Option<&'a str> {
    props.and_then(|p| p.get(key)).filter(|v| !v.is_empty())
}

/// A global appeared: the policy is told, and its actions carried out.
fn on_global(
    state: &Rc<RefCell<State>>,
    registry: &RegistryBox<'static>,
    global: &pw::registry::GlobalObject<&DictRef>,
) {
    let props = global.props;
    let num = |k| dict_get(props, k).and_then(|v| v.parse::<u32>().ok());
    let now = Instant::now();
    let actions = match global.type_ {
        ObjectType::Node => {
            let class = dict_get(props, "media.class").unwrap_or("");
            let name = dict_get(props, "node.name").unwrap_or("");
            let serial = dict_get(props, "object.serial").unwrap_or("");
            let mut s = state.borrow_mut();
            let (role, actions) = s.policy.node_added(global.id, NodeFacts { class, name, serial }, now);
            match role {
                NodeRole::Own(OwnNode::Microphone) => log::info!("melange: microphone {name} is node {}", global.id),
                NodeRole::Own(OwnNode::Camera) => log::info!("melange: camera {name} is node {}", global.id),
                NodeRole::Own(OwnNode::RedirectSink) => {
                    log::info!("melange: redirect sink {name} is node {}", global.id)
                }
                NodeRole::Own(OwnNode::StandbySink) => log::info!("melange: standby sink {name} is node {}", global.id),
                NodeRole::Tap => {}
                NodeRole::Candidate => {
                    // Its full properties come with its info.
                    if let Some(watched) = watch_node(state, registry, global) {
                        s.watched.insert(global.id, watched);
                    }
                }
            }
            actions
        }
        ObjectType::Port => {
            let Some(node) = num("node.id") else { return };
            let output = dict_get(props, "port.direction") == Some("out");
            let channel = dict_get(props, "audio.channel").or_else(|| dict_get(props, "port.name")).unwrap_or("");
            state.borrow_mut().policy.port_added(global.id, node, output, channel, now)
        }
        ObjectType::Link => {
            let (Some(out_node), Some(in_node)) = (num("link.output.node"), num("link.input.node")) else { return };
            let link =
                LinkFacts { out_node, in_node, out_port: num("link.output.port"), in_port: num("link.input.port") };
            state.borrow_mut().policy.link_added(global.id, link, now)
        }
        _ => return,
    };
    apply(state, actions);
}

/// Binds a node that may be an app and tells the policy its info when it comes.
fn watch_node(
    state: &Rc<RefCell<State>>,
    registry: &RegistryBox<'static>,
    global: &pw::registry::GlobalObject<&DictRef>,
) -> Option<Watched> {
    let proxy = registry.bind::<pw::node::Node, _>(global).ok()?;
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
            let actions = state.borrow_mut().policy.app_info(id, app, Instant::now());
            apply(&state, actions);
        })
        .register();
    Some(Watched { _listener: listener, _proxy: proxy })
}

/// A global went: the policy is told, and its actions carried out.
fn on_global_remove(state: &Rc<RefCell<State>>, id: u32) {
    let (actions, watched) = {
        let mut s = state.borrow_mut();
        match s.policy.own_node(id) {
            Some(OwnNode::RedirectSink) => log::warn!("melange: redirect sink {id} was removed"),
            Some(OwnNode::StandbySink) => log::warn!("melange: standby sink {id} was removed"),
            Some(OwnNode::Microphone) => log::warn!("melange: microphone {id} was removed"),
            Some(OwnNode::Camera) => log::warn!("melange: camera {id} was removed"),
            None => {}
        }
        (s.policy.removed(id, Instant::now()), s.watched.remove(&id))
    };
    drop(watched);
    apply(state, actions);
}

/// Carries out the policy's actions, and tells it which failed. Closed taps are dropped
/// once the state is no longer borrowed.
fn apply(state: &Rc<RefCell<State>>, actions: Vec<Action>) {
    if actions.is_empty() {
        return;
    }
    let mut closed = Vec::new();
    {
        let mut guard = state.borrow_mut();
        let s = &mut *guard;
        for action in actions {
            match action {
                Action::OpenTap { app, serial, info, manual } => {
                    let tap = match s.core.upgrade() {
                        Some(core) => Tap::open(&core, &s.config, &s.link, app, &serial, info, manual),
                        None => Err("the connection to PipeWire is gone".into()),
                    };
                    match tap {
                        Ok(tap) => {
                            s.taps.insert(app, tap);
                        }
                        Err(e) => {
                            log::error!("melange: cannot tap app node {app}: {e}");
                            s.policy.tap_failed(app);
                        }
                    }
                }
                Action::CloseTap { app } => closed.extend(s.taps.remove(&app)),
                Action::WantMic(wanted) => s.link.want_mic(wanted),
                Action::WantCamera(wanted) => s.link.want_camera(wanted),
                Action::Link { app, out_port, tap_node, tap_port } => {
                    match link_ports(&s.core, app, out_port, tap_node, tap_port) {
                        Ok(proxy) => {
                            if let Some(tap) = s.taps.get_mut(&app) {
                                tap.links.insert((out_port, tap_port), proxy);
                            }
                        }
                        Err(e) => {
                            log::error!("melange: cannot link port {out_port} of node {app} to its tap: {e}");
                            s.policy.link_failed(app, out_port, tap_port);
                        }
                    }
                }
                Action::Unlink { app, out_port, tap_port } => {
                    if let Some(tap) = s.taps.get_mut(&app) {
                        tap.links.remove(&(out_port, tap_port));
                    }
                }
            }
        }
    }
    drop(closed);
}

/// A link from port `out_port` of node `out_node` to port `in_port` of node `in_node`,
/// which goes with its proxy.
fn link_ports(
    core: &Weak<CoreBox<'static>>,
    out_node: u32,
    out_port: u32,
    in_node: u32,
    in_port: u32,
) -> Result<pw::link::Link, String> {
    let core = core.upgrade().ok_or("the connection to PipeWire is gone")?;
    let props = properties! {
        "link.output.node" => out_node.to_string().as_str(),
        "link.output.port" => out_port.to_string().as_str(),
        "link.input.node" => in_node.to_string().as_str(),
        "link.input.port" => in_port.to_string().as_str(),
        "object.linger" => "false",
    };
    core.create_object::<pw::link::Link>("link-factory", &props).map_err(|e| e.to_string())
}

/// Creates the two sinks apps play into (see [`crate::sink`]), each only if the
/// registry has none of its name, and the virtual microphone (after the first sync).
fn ensure_sinks(state: &Rc<RefCell<State>>) {
    let mut guard = state.borrow_mut();
    let s = &mut *guard;
    if !s.synced {
        return;
    }
    let Some(core) = s.core.upgrade() else { return };
    if s.policy.standby_sink().is_none() && s.standby_proxy.is_none() {
        let name = s.config.standby_name();
        let description = format!("{} (standby)", s.config.sink_description);
        s.standby_proxy = create_sink(&core, &s.config, &name, &description, SinkKind::Standby);
    }
    if s.policy.redirect_sink().is_none() && s.sink_proxy.is_none() {
        let name = s.config.sink_name.clone();
        let description = s.config.sink_description.clone();
        s.sink_proxy = create_sink(&core, &s.config, &name, &description, SinkKind::Redirect);
        s.sink_listener = s.sink_proxy.as_ref().map(|p| watch_volume(p, s.link.clone()));
    }
    if let Some(render) = s.mic_core.take() {
        match MicSource::create(&core, &s.config, render) {
            Ok(mic) => s.mic = Some(mic),
            Err(e) => log::error!("melange: cannot create the microphone: {e}"),
        }
        match CameraSource::create(&core, s.main_loop, &s.config, s.camera_frames.clone()) {
            Ok(camera) => s.camera = Some(camera),
            Err(e) => log::error!("melange: cannot create the camera: {e}"),
        }
    }
}
