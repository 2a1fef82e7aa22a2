//! `melangevideosink` and `melangeaudiosink`: GStreamer sinks for a player's encoded
//! video and audio, forwarded undecoded to melange-host through the guest's media
//! broker ([`crate::forward`]).
//!
//! Ranked above the decoders, so playbin-based players (gst-play-1.0, Totem, ...)
//! pick them for the encoded caps of a file and create no decoder; without a host, or
//! for a codec the host does not decode, they offer no caps and the player decodes
//! locally. They sync on each buffer's decoding time (basesink's default), so access
//! units leave in decoding order at the player's pace, early by `render-delay`: the
//! time the host takes to show or play them, which the player's own A/V sync and
//! position queries then account for.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer::subclass::prelude::*;
use gstreamer_base as gst_base;
use gstreamer_base::prelude::*;
use gstreamer_base::subclass::prelude::*;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use melange_transport::message::{Geometry, StreamControl};

use crate::forward::{Forwarder, Note, Times};
use melange_gst::caps::{self, Kind};

/// The sinks' rank, over primary: above the decoders (primary) and parsers (primary + 1), so
/// autoplugging tries them first for the encoded caps they take.
pub const RANK_ABOVE_PRIMARY: i32 = 10;

/// What the host adds between an access unit leaving the sink and its picture or
/// sound coming out (decode, the audio's jitter buffer and device): the sinks'
/// `render-delay` until the host reports the stream's own (within a second).
pub const HOST_RENDER_DELAY_NS: u64 = 40_000_000;

/// The most render delay a host's report sets (a report beyond is capped).
const MAX_RENDER_DELAY_NS: u64 = 2_000_000_000;

static CAT: std::sync::LazyLock<gst::DebugCategory> = std::sync::LazyLock::new(|| {
    gst::DebugCategory::new("melangesink", gst::DebugColorFlags::empty(), Some("Melange player sinks"))
});

/// The shared implementation; one instance per element.
#[derive(Debug)]
pub struct Inner {
    kind: Kind,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    forwarder: Forwarder,
    socket: Option<PathBuf>,
    /// The next buffer follows a flush.
    after_flush: bool,
    /// The host went away or refused the stream (said once, as an element error).
    failed: bool,
    /// Said that sound at a rate other than 1 is left out.
    said_rate: bool,
    /// The app's window (`GstVideoOverlay`), 0 for none.
    window: usize,
    /// Where in it the app shows the video, when it said.
    geometry: Option<Geometry>,
    /// What to tell GStreamer once the state's lock is let go (posting while holding
    /// it would deadlock an app whose bus sync handler calls back into the element).
    pending_error: Option<String>,
    pending_delay: Option<gst::ClockTime>,
}

impl Inner {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            state: Arc::new(Mutex::new(State {
                forwarder: Forwarder::new(kind),
                socket: None,
                after_flush: false,
                failed: false,
                said_rate: false,
                window: 0,
                geometry: None,
                pending_error: None,
                pending_delay: None,
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Video => "melangevideosink",
            Kind::Audio => "melangeaudiosink",
        }
    }

    fn properties() -> Vec<glib::ParamSpec> {
        vec![glib::ParamSpecString::builder("socket")
            .nick("Broker socket")
            .blurb("The guest's media broker (default: $XDG_RUNTIME_DIR/melange/media.sock)")
            .build()]
    }

    fn set_property(&self, pspec: &glib::ParamSpec, value: &glib::Value) {
        if pspec.name() == "socket" {
            self.state().socket = value.get::<Option<String>>().ok().flatten().map(PathBuf::from);
        }
    }

    fn property(&self, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "socket" => self.state().socket.as_ref().map(|p| p.display().to_string()).to_value(),
            _ => None::<String>.to_value(),
        }
    }

    fn pad_templates(kind: Kind) -> Vec<gst::PadTemplate> {
        gst::PadTemplate::new("sink", gst::PadDirection::Sink, gst::PadPresence::Always, &caps::template(kind))
            .into_iter()
            .collect()
    }

    fn constructed(&self, sink: &gst_base::BaseSink) {
        sink.set_sync(true);
        sink.set_render_delay(gst::ClockTime::from_nseconds(HOST_RENDER_DELAY_NS));
        // A late buffer is still sent: the host decides what it shows.
        sink.set_max_lateness(-1);
        sink.set_qos(false);
        // What lies before the segment (an accurate seek's lead-in from its keyframe)
        // is not shown, but the host's decoder needs it: basesink hands it over (at
        // once, unsynced) and it is forwarded marked decode-only.
        sink.set_drop_out_of_segment(false);
    }

    /// Before the parent's state change.
    fn on_state_change(&self, sink: &gst_base::BaseSink, transition: gst::StateChange) {
        let mut state = self.state();
        let control = match transition {
            gst::StateChange::NullToReady => {
                let socket = state.socket.clone();
                state.forwarder.connect(socket);
                match state.forwarder.unavailable() {
                    Some(why) => gst::info!(CAT, obj = sink, "{}: not forwarding: {why}", self.name()),
                    None => gst::info!(CAT, obj = sink, "{}: forwarding {}", self.name(), state.forwarder.offered()),
                }
                state.failed = false;
                None
            }
            gst::StateChange::ReadyToNull => {
                state.forwarder.disconnect();
                None
            }
            gst::StateChange::PlayingToPaused => Some(StreamControl::Pause),
            gst::StateChange::PausedToPlaying => Some(StreamControl::Resume),
            _ => None,
        };
        if let Some(control) = control {
            if let Err(e) = state.forwarder.control(control) {
                self.fail(sink, &mut state, &e.to_string());
            }
        }
    }

    fn caps(&self, filter: Option<&gst::Caps>) -> gst::Caps {
        let offered = self.state().forwarder.offered();
        match filter {
            Some(f) => f.intersect_with_mode(&offered, gst::CapsIntersectMode::First),
            None => offered,
        }
    }

    fn set_caps(&self, sink: &gst_base::BaseSink, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        // As video sinks do: the app may hand its window (and a rectangle in it) now,
        // from its bus's sync handler, which calls back into this element.
        let windowless = self.state().window == 0;
        if let Some(overlay) = sink.dynamic_cast_ref::<gst_video::VideoOverlay>().filter(|_| windowless) {
            overlay.prepare_window_handle();
        }
        let mut state = self.state();
        state
            .forwarder
            .open(caps)
            .map_err(|e| gst::loggable_error!(CAT, "{}: cannot forward {caps}: {e}", self.name()))?;
        gst::info!(CAT, obj = sink, "{}: forwarding {caps}", self.name());
        if let Some(geometry) = state.geometry {
            if let Err(e) = state.forwarder.control(StreamControl::Geometry(geometry)) {
                fail(sink, &mut state, &e.to_string());
            }
        }
        Ok(())
    }

    /// `GstVideoOverlay::set_render_rectangle`: forwarded once a stream is open (or when
    /// it opens). The whole window (-1s) has no size known here: nothing is sent, and the
    /// host keeps what it had.
    fn set_render_rectangle(&self, sink: &gst_base::BaseSink, x: i32, y: i32, width: i32, height: i32) {
        let geometry =
            (width > 0 && height > 0).then_some(Geometry { x, y, width: width as u32, height: height as u32 });
        gst::info!(CAT, obj = sink, "{}: the app shows the video at {geometry:?}", self.name());
        let mut state = self.state();
        state.geometry = geometry;
        if let Some(geometry) = geometry {
            if let Err(e) = state.forwarder.control(StreamControl::Geometry(geometry)) {
                fail(sink, &mut state, &e.to_string());
            }
        }
    }

    /// `GstVideoOverlay::set_window_handle`: the app's window, kept so that it is not
    /// asked for again.
    fn set_window_handle(&self, sink: &gst_base::BaseSink, handle: usize) {
        gst::debug!(CAT, obj = sink, "{}: the app's window is {handle:#x}", self.name());
        self.state().window = handle;
    }

    fn render(&self, sink: &gst_base::BaseSink, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let segment = sink.segment();
        let base = sink.base_time().map_or(0, gst::ClockTime::nseconds);
        let on_clock = |t: Option<gst::ClockTime>| -> Option<u64> {
            let segment = segment.downcast_ref::<gst::ClockTime>()?;
            Some(segment.to_running_time(t?)?.nseconds() + base)
        };
        let dts = on_clock(buffer.dts());
        let Some(pts) = on_clock(buffer.pts()).or(dts) else {
            let mut state = self.state();
            if before_segment(sink, buffer) {
                let times = lead_in_times(sink, buffer);
                return forward(sink, &mut state, buffer, times);
            }
            gst::debug!(CAT, obj = sink, "dropping a buffer without a timestamp");
            return Ok(gst::FlowSuccess::Ok);
        };
        let mut state = self.state();
        if before_segment(sink, buffer) {
            let times = lead_in_times(sink, buffer);
            return forward(sink, &mut state, buffer, times);
        }
        // At another rate the units come faster or slower than their sound plays: a
        // local decoder would stretch it (scaletempo); the host cannot, so the sound
        // of a trick mode is left out, as many players mute it. Video follows the rate.
        let rate = segment.downcast_ref::<gst::ClockTime>().map_or(1.0, |s| s.rate());
        if self.kind == Kind::Audio && (rate - 1.0).abs() > 1e-6 {
            if !std::mem::replace(&mut state.said_rate, true) {
                gst::info!(CAT, obj = sink, "{}: not forwarding sound at rate {rate}", self.name());
            }
            return Ok(gst::FlowSuccess::Ok);
        }
        let times = Times {
            pts_ns: pts,
            dts_ns: dts,
            duration_ns: buffer.duration().map_or(0, gst::ClockTime::nseconds),
            keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
            discontinuity: std::mem::take(&mut state.after_flush) || buffer.flags().contains(gst::BufferFlags::DISCONT),
            decode_only: false,
        };
        forward(sink, &mut state, buffer, times)
    }

    fn event(&self, sink: &gst_base::BaseSink, event: &gst::Event) {
        let control = match event.view() {
            gst::EventView::FlushStop(_) => {
                self.state().after_flush = true;
                Some(StreamControl::Flush)
            }
            gst::EventView::Eos(_) => Some(StreamControl::EndOfStream),
            _ => None,
        };
        if let Some(control) = control {
            let mut state = self.state();
            if let Err(e) = state.forwarder.control(control) {
                self.fail(sink, &mut state, &e.to_string());
            }
        }
    }

    fn fail(&self, sink: &gst_base::BaseSink, state: &mut State, why: &str) {
        fail(sink, state, why);
    }

    /// Tells GStreamer what the last call found, with the state's lock let go: the
    /// host's render delay (basesink posts the latency message) and a failure.
    fn settle(&self, sink: &gst_base::BaseSink) {
        let (error, delay) = {
            let mut state = self.state();
            (state.pending_error.take(), state.pending_delay.take())
        };
        if let Some(delay) = delay.filter(|d| sink.render_delay() != *d) {
            gst::info!(CAT, obj = sink, "the host renders {delay} after arrival");
            sink.set_render_delay(delay);
        }
        if let Some(why) = error {
            gst::element_error!(
                sink,
                gst::ResourceError::Write,
                ("{}: {why}", sink.factory().map_or("melange sink".into(), |f| f.name().to_string()))
            );
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the stream failed, for one clear element error once the lock is let go
/// ([`Inner::settle`]): the stream cannot go on (the player shows it and stops; played
/// again, it decodes locally if the host is still gone).
fn fail(_sink: &gst_base::BaseSink, state: &mut State, why: &str) {
    if !std::mem::replace(&mut state.failed, true) {
        state.pending_error = Some(why.to_owned());
    }
}

/// True for a buffer shown wholly before the current segment (by its presentation
/// time, as basesink clips).
fn before_segment(sink: &gst_base::BaseSink, buffer: &gst::BufferRef) -> bool {
    let segment = sink.segment();
    let Some(segment) = segment.downcast_ref::<gst::ClockTime>() else { return false };
    let Some(start) = buffer.pts().or(buffer.dts()) else { return false };
    let stop = buffer.duration().and_then(|d| start.checked_add(d));
    segment.clip(start, stop).is_none() && segment.start().is_some_and(|s| start < s)
}

/// A lead-in unit's times: at the segment's start (it is not shown, only decoded).
fn lead_in_times(sink: &gst_base::BaseSink, buffer: &gst::BufferRef) -> Times {
    let base = sink.base_time().map_or(0, gst::ClockTime::nseconds);
    let segment = sink.segment();
    let start = segment
        .downcast_ref::<gst::ClockTime>()
        .and_then(|s| s.to_running_time(s.start()?))
        .map_or(0, gst::ClockTime::nseconds);
    Times {
        pts_ns: base + start,
        dts_ns: None,
        duration_ns: buffer.duration().map_or(0, gst::ClockTime::nseconds),
        keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
        discontinuity: false,
        decode_only: true,
    }
}

/// Sends a buffer and acts on what the host said meanwhile.
fn forward(
    sink: &gst_base::BaseSink,
    state: &mut State,
    buffer: &gst::BufferRef,
    times: Times,
) -> Result<gst::FlowSuccess, gst::FlowError> {
    if state.failed {
        return Err(gst::FlowError::Error);
    }
    let data = buffer.map_readable().map_err(|_| gst::FlowError::Error)?.as_slice().to_vec();
    match state.forwarder.send(data, times) {
        Ok(notes) => {
            for note in notes {
                match note {
                    Note::KeyframeRequest => gst::debug!(CAT, obj = sink, "the host asked for a keyframe"),
                    Note::Latency(ns) => {
                        state.pending_delay = Some(gst::ClockTime::from_nseconds(ns.min(MAX_RENDER_DELAY_NS)));
                    }
                    Note::Rejected(reason) => {
                        fail(sink, state, &format!("melange-host refused the stream: {reason}"));
                        return Err(gst::FlowError::Error);
                    }
                }
            }
            Ok(gst::FlowSuccess::Ok)
        }
        Err(e) => {
            fail(sink, state, &format!("melange-host went away: {e}"));
            Err(gst::FlowError::Error)
        }
    }
}

/// Defines one sink element around [`Inner`].
macro_rules! melange_sink {
    ($module:ident, $wrapper:ident, $type_name:literal, $kind:expr, $long_name:literal, $klass:literal, $description:literal,
     interfaces: $interfaces:ty, implements: [$($implements:path),*]) => {
        pub mod $module {
            use super::*;

            #[derive(Debug)]
            pub struct Imp(pub(crate) Inner);

            impl Default for Imp {
                fn default() -> Self {
                    Imp(Inner::new($kind))
                }
            }

            #[glib::object_subclass]
            impl ObjectSubclass for Imp {
                const NAME: &'static str = $type_name;
                type Type = $wrapper;
                type ParentType = gst_base::BaseSink;
                type Interfaces = $interfaces;
            }

            impl ObjectImpl for Imp {
                fn properties() -> &'static [glib::ParamSpec] {
                    static PROPERTIES: std::sync::LazyLock<Vec<glib::ParamSpec>> =
                        std::sync::LazyLock::new(Inner::properties);
                    &PROPERTIES
                }

                fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
                    self.0.set_property(pspec, value)
                }

                fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
                    self.0.property(pspec)
                }

                fn constructed(&self) {
                    self.parent_constructed();
                    self.0.constructed(self.obj().upcast_ref());
                }
            }

            impl GstObjectImpl for Imp {}

            impl ElementImpl for Imp {
                fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
                    static META: std::sync::LazyLock<gst::subclass::ElementMetadata> = std::sync::LazyLock::new(|| {
                        gst::subclass::ElementMetadata::new($long_name, $klass, $description, "The Melange developers")
                    });
                    Some(&META)
                }

                fn pad_templates() -> &'static [gst::PadTemplate] {
                    static TEMPLATES: std::sync::LazyLock<Vec<gst::PadTemplate>> =
                        std::sync::LazyLock::new(|| Inner::pad_templates($kind));
                    &TEMPLATES
                }

                fn change_state(
                    &self,
                    transition: gst::StateChange,
                ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
                    self.0.on_state_change(self.obj().upcast_ref(), transition);
                    self.0.settle(self.obj().upcast_ref());
                    self.parent_change_state(transition)
                }
            }

            impl BaseSinkImpl for Imp {
                fn caps(&self, filter: Option<&gst::Caps>) -> Option<gst::Caps> {
                    Some(self.0.caps(filter))
                }

                fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
                    let result = self.0.set_caps(self.obj().upcast_ref(), caps);
                    self.0.settle(self.obj().upcast_ref());
                    result
                }

                fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
                    let result = self.0.render(self.obj().upcast_ref(), buffer);
                    self.0.settle(self.obj().upcast_ref());
                    result
                }

                fn event(&self, event: gst::Event) -> bool {
                    self.0.event(self.obj().upcast_ref(), &event);
                    self.0.settle(self.obj().upcast_ref());
                    self.parent_event(event)
                }
            }
        }

        glib::wrapper! {
            /// See the module docs.
            pub struct $wrapper(ObjectSubclass<$module::Imp>) @extends gst_base::BaseSink, gst::Element, gst::Object
                $(, @implements $implements)*;
        }
    };
}

melange_sink!(
    video,
    MelangeVideoSink,
    "GstMelangeVideoSink",
    Kind::Video,
    "Melange video sink",
    "Sink/Video",
    "Forwards a player's encoded video undecoded to melange-host on the user's device",
    interfaces: (gst_video::VideoOverlay,),
    implements: [gst_video::VideoOverlay]
);

impl crate::overlay::Overlay for video::Imp {
    fn set_render_rectangle(&self, x: i32, y: i32, width: i32, height: i32) {
        self.0.set_render_rectangle(self.obj().upcast_ref(), x, y, width, height);
        self.0.settle(self.obj().upcast_ref());
    }

    fn set_window_handle(&self, handle: usize) {
        self.0.set_window_handle(self.obj().upcast_ref(), handle);
    }
}

melange_sink!(
    audio,
    MelangeAudioSink,
    "GstMelangeAudioSink",
    Kind::Audio,
    "Melange audio sink",
    "Sink/Audio",
    "Forwards a player's encoded audio undecoded to melange-host on the user's device",
    interfaces: (),
    implements: []
);

/// Registers both sinks.
pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "melangevideosink",
        gst::Rank::PRIMARY + RANK_ABOVE_PRIMARY,
        MelangeVideoSink::static_type(),
    )?;
    gst::Element::register(
        Some(plugin),
        "melangeaudiosink",
        gst::Rank::PRIMARY + RANK_ABOVE_PRIMARY,
        MelangeAudioSink::static_type(),
    )
}
