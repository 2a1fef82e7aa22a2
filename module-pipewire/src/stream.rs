//! What the module's own streams (the taps, the virtual microphone) have in common on
//! the session's PipeWire: how one is made on the module's connection, its format, and
//! how it shows figures on its node.

use melange_shim::codec::SampleFormat;
use pipewire as pw;
use pw::spa;

/// Graph rate of the module's streams: Opus's native rate, and PipeWire's default.
pub(crate) const TAP_RATE: u32 = 48_000;

/// A stream named `name` with `props` on `core`, owned apart from the borrow of the
/// core. The caller drops it before the core: the guest keeps every stream in its
/// state, which it empties before it lets the connection go (`Guest::release`).
pub(crate) fn new_stream(
    core: &pw::core::Core,
    name: &str,
    props: pw::properties::PropertiesBox,
) -> Result<pw::stream::StreamBox<'static>, pw::Error> {
    let stream = pw::stream::StreamBox::new(core, name, props)?;
    // SAFETY: the pointer comes from a live StreamBox whose ownership moves here (it is
    // not destroyed by `into_raw`); the core outlives the stream (see above).
    Ok(unsafe { pw::stream::StreamBox::from_raw(stream.into_raw()) })
}

/// Puts `props` on a stream's node unless they are what was last put there.
pub(crate) fn update_properties(
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

/// An EnumFormat at [`TAP_RATE`] in `positions`: the sink's layout and the codec's
/// input sample format for a tap, mono f32 for the microphone.
pub(crate) fn format_pod(sample: SampleFormat, positions: &[u32]) -> Result<Vec<u8>, String> {
    let format = match sample {
        SampleFormat::F32 => spa::param::audio::AudioFormat::F32LE,
        SampleFormat::S16Le => spa::param::audio::AudioFormat::S16LE,
    };
    melange_pw::format_pod(format, TAP_RATE, positions)
}
