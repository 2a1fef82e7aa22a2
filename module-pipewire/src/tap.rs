//! One tap: a passive capture stream on one app's output. Its real-time callback only
//! copies the app's audio into a ring ([`TapWriter`]); the link's I/O thread encodes
//! and sends it. The tap tells the app the stream's end-to-end latency and shows its
//! counters on its node.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use melange_guest::core::GuestStats;
use melange_guest::thread::GuestHandle;
use melange_pw::RtStream;
use melange_shim::codec::input_format;
use melange_shim::tap::{tap_ring, TapEncoder, TapStats, TapWriter};
use melange_transport::message::{AppInfo, AudioFormat, MediaKind, StreamOpen};
use pipewire as pw;
use pw::properties::properties;
use pw::spa;

use crate::config::Config;
use crate::policy::tap_node_name;
use crate::stream::{format_pod, new_stream, update_properties, TAP_RATE};

/// SPA channel positions of the redirect sink (and so of every tap): FL, FR.
pub(crate) const POSITIONS: [u32; 2] = [spa::sys::SPA_AUDIO_CHANNEL_FL, spa::sys::SPA_AUDIO_CHANNEL_FR];
/// Audio a tap ring holds: far more than an encoder wake-up period.
const TAP_RING: Duration = Duration::from_millis(500);
/// A latency that moved less than this since it was published is not published again.
const LATENCY_STEP_NS: u64 = 1_000_000;

/// One tap, open on the session's PipeWire.
pub(crate) struct Tap {
    stream_id: u32,
    /// The links the module made to the tap for an app WirePlumber cannot link it to
    /// (see `policy::Action::Link`), per (app's output port, tap's input port): the
    /// link's proxy, whose drop destroys the link.
    pub(crate) links: BTreeMap<(u32, u32), pw::link::Link>,
    stream: RtStream<pw::stream::StreamBox<'static>, TapWriter>,
    link: GuestHandle,
    stats: Arc<TapStats>,
    /// The latency the app was last told, ns (0: never).
    published_ns: u64,
    /// The counters last put on the tap's node.
    published_counters: Vec<(&'static str, String)>,
}

impl Tap {
    /// Opens a tap on app node `app_id` (`object.serial` `serial`) and announces its
    /// stream to the host through `link`: WirePlumber links it to the app
    /// (`target.object`), or, with `manual`, the module does.
    pub(crate) fn open(
        core: &pw::core::Core,
        config: &Config,
        link: &GuestHandle,
        app_id: u32,
        serial: &str,
        app: AppInfo,
        manual: bool,
    ) -> Result<Tap, String> {
        let codec = config.codec.clone();
        let sample = input_format(&codec);
        let format = AudioFormat { rate: TAP_RATE, channels: POSITIONS.len() as u8, positions: POSITIONS.to_vec() };
        let frame_samples = (u64::from(TAP_RATE) * u64::from(config.frame_us) / 1_000_000) as u32;
        let frame_bytes = usize::from(format.channels) * sample.bytes();
        let ring_bytes = (TAP_RATE as usize * frame_bytes) * TAP_RING.as_millis() as usize / 1000;
        let (writer, reader) = tap_ring(ring_bytes, frame_bytes, TAP_RATE);
        let stats = writer.stats().clone();
        let mut encoder = TapEncoder::new(reader, &format, &codec, frame_samples, config.mode.application())
            .map_err(|e| e.to_string())?;
        encoder.set_complexity(config.complexity).map_err(|e| e.to_string())?;

        let name = app.name.clone();
        let stream_id = link.open_tap(
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

        let node_name = tap_node_name(serial);
        let mut props = properties! {
            "media.type" => "Audio",
            "media.category" => "Capture",
            "node.name" => node_name.as_str(),
            "node.description" => format!("Melange tap: {name}").as_str(),
            "application.name" => "Melange",
            // The guest graph's quantum while this app is redirected: part of the latency.
            "node.latency" => format!("{}/{TAP_RATE}", config.tap_quantum).as_str(),
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
        let stream = new_stream(core, &format!("melange-tap-{stream_id}"), props)
            .map_err(|e| format!("cannot create the tap stream: {e}"))?;
        let listener = stream
            .add_local_listener_with_user_data(writer)
            .process(melange_pw::capture_into)
            .register()
            .map_err(|e| format!("cannot listen on the tap stream: {e}"))?;
        let stream = RtStream::new(stream, listener);

        let pod = format_pod(sample, &POSITIONS)?;
        melange_pw::connect(&stream, spa::utils::Direction::Input, &pod, !manual)
            .map_err(|e| format!("cannot connect the tap stream: {e}"))?;
        Ok(Tap {
            stream_id,
            links: BTreeMap::new(),
            stream,
            link: link.clone(),
            stats,
            published_ns: 0,
            published_counters: Vec::new(),
        })
    }

    /// Tells the app the stream's end-to-end latency when the link thread has a new
    /// figure. PipeWire gives an app the mean of the smallest and largest latency
    /// among the input ports it is linked to; the redirect sink (a null sink) reports
    /// none, so the tap reports twice the latency for the app to see it once.
    pub(crate) fn publish_latency(&mut self) {
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

    /// Puts the stream's counters on the tap's node as `melange.*` properties (see
    /// `docs/guest.md`; `pw-cli info` and `wpctl inspect` show them), when they moved.
    pub(crate) fn publish_counters(&mut self, link: &GuestStats) {
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

impl Drop for Tap {
    fn drop(&mut self) {
        // The data loop stops calling us before the listener and its writer go.
        self.stream.stop();
        // The I/O thread sees the writer gone, sends what is left and closes the stream.
        self.link.wake();
        log::debug!("melange: tap for stream {} removed", self.stream_id);
    }
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
