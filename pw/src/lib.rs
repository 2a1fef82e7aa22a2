//! The PipeWire glue that the guest module (`module-pipewire`) and melange-host
//! (`renderer`) share, and nothing else: an EnumFormat pod for raw audio, the real-time
//! `process` callback of a capture stream, and how every Melange stream connects. The
//! guest must not depend on the renderer, nor the renderer on the guest; both depend on
//! this. Policy (which format, which properties, which target) stays with the callers.

use melange_shim::tap::TapWriter;
use pipewire as pw;
use pw::spa;

/// An EnumFormat pod for raw interleaved audio: `format` samples at `rate` Hz, one
/// channel per entry of `positions` (SPA channel positions, at most 64).
pub fn format_pod(format: spa::param::audio::AudioFormat, rate: u32, positions: &[u32]) -> Result<Vec<u8>, String> {
    let mut info = spa::param::audio::AudioInfoRaw::new();
    info.set_format(format);
    info.set_rate(rate);
    info.set_channels(positions.len() as u32);
    let mut position = [0u32; spa::sys::SPA_AUDIO_MAX_CHANNELS as usize];
    for (slot, p) in position.iter_mut().zip(positions) {
        *slot = *p;
    }
    info.set_position(position);
    let obj = spa::pod::Object {
        type_: spa::utils::SpaTypes::ObjectParamFormat.as_raw(),
        id: spa::param::ParamType::EnumFormat.as_raw(),
        properties: info.into(),
    };
    spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &spa::pod::Value::Object(obj))
        .map(|(c, _)| c.into_inner())
        .map_err(|e| format!("cannot build the format pod: {e:?}"))
}

/// The `process` callback of a capture stream: takes the buffer the graph filled and
/// pushes its bytes into `writer`, stamped with the graph clock's time of this cycle
/// and its position. Real-time: reads the clock, copies, nothing else (no allocation,
/// lock, log or syscall; a full ring drops and counts inside the writer).
pub fn capture_into(stream: &pw::stream::Stream, writer: &mut TapWriter) {
    let (pts, position) = stream.time().map_or((0, 0), |t| {
        let now = u64::try_from(t.now()).unwrap_or(0);
        let r = t.rate();
        // The position in ns of the graph's clock; its time where the rate is unknown.
        let position = if r.denom > 0 {
            (u128::from(t.ticks()) * 1_000_000_000 * u128::from(r.num) / u128::from(r.denom)) as u64
        } else {
            now
        };
        (now, position)
    });
    let Some(mut buffer) = stream.dequeue_buffer() else { return };
    let Some(data) = buffer.datas_mut().first_mut() else { return };
    let (offset, size) = (data.chunk().offset() as usize, data.chunk().size() as usize);
    if let Some(bytes) = data.data() {
        let end = offset.saturating_add(size).min(bytes.len());
        writer.push(&bytes[offset.min(end)..end], pts, position);
    }
}

/// Connects `stream` in `direction` with `format` (a [`format_pod`]), buffers mapped
/// and `process` called on the real-time data loop; linked by the session manager
/// when `autoconnect`, else left for others to link (a node others link to, such as a
/// virtual source).
pub fn connect(
    stream: &pw::stream::Stream,
    direction: spa::utils::Direction,
    format: &[u8],
    autoconnect: bool,
) -> Result<(), String> {
    let mut params = [spa::pod::Pod::from_bytes(format).ok_or("bad format pod")?];
    let mut flags = pw::stream::StreamFlags::MAP_BUFFERS | pw::stream::StreamFlags::RT_PROCESS;
    if autoconnect {
        flags |= pw::stream::StreamFlags::AUTOCONNECT;
    }
    stream.connect(direction, None, flags, &mut params).map_err(|e| e.to_string())
}
