//! The two null sinks apps play into, and the redirect sink's volume both ways.
//!
//! - The redirect sink (`sink.name`, the default) is this process's own and passive:
//!   an app linked to it runs only once its tap, which is not passive, is linked too,
//!   so the app's first sample is captured, never played before the tap is there.
//!   It goes when this process goes.
//! - The standby sink (`sink.name` + `.standby`) lingers: when this process is not
//!   running, WirePlumber moves the apps to it (the next default) and they play on,
//!   discarded, without waiting for anything. Apps on it are tapped too.
//!
//! The taps take the apps' audio before the sink, so the sink's volume and mute are
//! the host's to apply: they go to the link, and a volume the host sets comes back onto
//! the sink.

use melange_guest::thread::GuestHandle;
use melange_transport::message::Volume;
use pipewire as pw;
use pw::properties::properties;
use pw::spa;

use crate::config::Config;
use crate::stream::TAP_RATE;
use crate::tap::POSITIONS;

/// Which of the two sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SinkKind {
    Redirect,
    Standby,
}

/// A null sink in the session's PipeWire (apps' audio goes nowhere but to the taps).
pub(crate) fn create_sink(
    core: &pw::core::Core,
    config: &Config,
    name: &str,
    description: &str,
    kind: SinkKind,
) -> Option<pw::node::Node> {
    let quantum = format!("{}/{TAP_RATE}", config.tap_quantum);
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
    match core.create_object::<pw::node::Node>("adapter", &props) {
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

/// Tells the link the redirect sink's volume and mute whenever they change: the taps
/// take the apps' audio before the sink, so the host applies them (and the link sends
/// nothing while muted).
pub(crate) fn watch_volume(sink: &pw::node::Node, link: GuestHandle) -> pw::node::NodeListener {
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
pub(crate) fn apply_host_volume(sink: &pw::node::Node, volume: &Volume) {
    use spa::pod::{Property, Value, ValueArray};
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
