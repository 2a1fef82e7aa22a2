//! The PipeWire glue that the guest module (`module-pipewire`) and melange-host
//! (`renderer`) share, and nothing else: an EnumFormat pod for raw audio, the real-time
//! `process` callbacks of a capture stream and of a playback stream, the order in which
//! such a stream is torn down, how every Melange stream connects, and the start-up of a
//! thread that runs a PipeWire client of its own. The guest must not depend on the
//! renderer, nor the renderer on the guest; both depend on this. Policy (which format,
//! which properties, which target) stays with the callers.
//!
//! The real-time callbacks ([`capture_into`], [`play_from`]) never allocate, lock, log,
//! sleep or make a system call: they read the graph's clock, copy, and store atomics.

pub mod video;

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use melange_shim::render::{OutputClock, RenderCore};
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

/// Where PipeWire lets a playback stream set its resampler's rate (`SPA_IO_RateMatch`),
/// handed from `io_changed`, which may run on another thread, to [`play_from`].
#[derive(Debug, Default)]
pub struct RateMatch(AtomicPtr<spa::sys::spa_io_rate_match>);

impl RateMatch {
    /// For a stream's `io_changed` callback: keeps the area PipeWire passes for
    /// `SPA_IO_RateMatch` (null when it takes it back).
    pub fn io_changed(&self, id: u32, area: *mut c_void) {
        if id == spa::sys::SPA_IO_RateMatch {
            self.0.store(area.cast(), Ordering::Release);
        }
    }
}

/// What the real-time callback of a playback stream owns: the render core it plays
/// (jitter buffer, playout, drift control), and where drift control's rate goes.
#[derive(Debug)]
pub struct Playback {
    /// The render core; its statistics are shared with whoever made it.
    pub core: RenderCore,
    /// The stream's rate-match area.
    pub rate_match: Arc<RateMatch>,
}

/// Listens on the playback `stream` that plays `core`: `io_changed` keeps the stream's
/// rate-match area, `process` is [`play_from`]. The caller may add callbacks before it
/// registers the listener (and then keeps it in an [`RtStream`]).
pub fn listen_playback(
    stream: &pw::stream::Stream,
    core: RenderCore,
) -> pw::stream::ListenerLocalBuilder<'_, Playback> {
    let rate_match = Arc::new(RateMatch::default());
    let io = rate_match.clone();
    stream
        .add_local_listener_with_user_data(Playback { core, rate_match })
        .io_changed(move |_, _, id, area, _| io.io_changed(id, area))
        .process(|stream, playback| play_from(stream, &mut playback.core, &playback.rate_match))
}

/// The `process` callback of a playback stream of interleaved f32: `core` fills the
/// cycle's buffer (the frames the graph asks for; silence while priming or on
/// underrun), drift control's rate goes into the stream's rate-match area, and the
/// graph's timing into the core's statistics. Real-time: no allocation, lock, log or
/// syscall.
pub fn play_from(stream: &pw::stream::Stream, core: &mut RenderCore, rate_match: &RateMatch) {
    let time = stream.time().ok();
    let Some(mut buffer) = stream.dequeue_buffer() else { return };
    let requested = buffer.requested() as usize;
    let Some(data) = buffer.datas_mut().first_mut() else { return };
    let stride = 4 * core.channels();
    let Some(bytes) = data.data() else { return };
    let max_frames = bytes.len() / stride;
    let frames = if requested > 0 { requested.min(max_frames) } else { max_frames.min(1024) };
    let clock = time.as_ref().map(|t| OutputClock { ticks: t.ticks(), now_ns: u64::try_from(t.now()).unwrap_or(0) });
    if let Some(ratio) = core.cycle(clock, &mut bytes[..frames * stride]) {
        // SAFETY: PipeWire keeps the area it passed to io_changed valid until it passes
        // another (or null), and only this callback writes it.
        if let Some(rm) = unsafe { rate_match.0.load(Ordering::Acquire).as_mut() } {
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
        core.timing(now_ns, position_ns as u64, frames, output_delay_ns(&t, core.rate()));
    }
    let chunk = data.chunk_mut();
    *chunk.offset_mut() = 0;
    *chunk.stride_mut() = stride as i32;
    *chunk.size_mut() = (frames * stride) as u32;
}

/// How long a sample the stream is given now takes to be heard: its delay to the
/// device plus what its resampler holds.
fn output_delay_ns(t: &pw::stream::Time, rate: u32) -> u64 {
    let r = t.rate();
    let delay_s = if r.denom > 0 { t.delay() as f64 * f64::from(r.num) / f64::from(r.denom) } else { 0.0 };
    (delay_s * 1e9 + t.buffered() as f64 * 1e9 / f64::from(rate.max(1))).max(0.0) as u64
}

/// A stream and the listener whose user data its real-time callback uses, torn down
/// in the one safe order: the stream is disconnected first, so that the data loop no
/// longer calls `process`; then the listener goes, with that data; then the stream.
/// Dereferences to the stream.
pub struct RtStream<S: std::ops::Deref<Target = pw::stream::Stream>, D> {
    listener: Option<pw::stream::StreamListener<D>>,
    stream: S,
}

impl<S: std::ops::Deref<Target = pw::stream::Stream>, D> RtStream<S, D> {
    /// `stream` and its `listener`.
    pub fn new(stream: S, listener: pw::stream::StreamListener<D>) -> Self {
        Self { listener: Some(listener), stream }
    }

    /// Disconnects the stream and drops the listener with its data (the stream itself
    /// goes with `self`). Idempotent; dropping does it too.
    pub fn stop(&mut self) {
        if let Some(listener) = self.listener.take() {
            let _ = self.stream.disconnect();
            drop(listener);
        }
    }
}

impl<S: std::ops::Deref<Target = pw::stream::Stream>, D> std::ops::Deref for RtStream<S, D> {
    type Target = pw::stream::Stream;

    fn deref(&self) -> &pw::stream::Stream {
        &self.stream
    }
}

impl<S: std::ops::Deref<Target = pw::stream::Stream>, D> Drop for RtStream<S, D> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<S: std::ops::Deref<Target = pw::stream::Stream>, D> std::fmt::Debug for RtStream<S, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtStream").field("listening", &self.listener.is_some()).finish_non_exhaustive()
    }
}

/// A PipeWire client of its own, as each of melange-host's PipeWire threads runs: its
/// main loop and its context. Its connection goes to the thread's `serve` (see
/// [`spawn_client`]).
pub struct Client {
    /// The thread's main loop: `serve` quits it to end the thread.
    pub main_loop: pw::main_loop::MainLoopRc,
    /// The context, to connect again after the connection was lost.
    pub context: pw::context::ContextRc,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// Why a client thread did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// No connection to PipeWire (is it running for this user?).
    Connect(String),
    /// What `serve` said.
    Serve(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Connect(e) | StartError::Serve(e) => f.write_str(e),
        }
    }
}

/// Where a client thread's word on start-up comes (see [`spawn_client`]).
pub type Started = crossbeam_channel::Receiver<Result<(), StartError>>;

/// Whatever a client thread's `serve` sets up and keeps until its loop quits.
pub trait Held {}
impl<T: ?Sized> Held for T {}

/// Starts a thread named `name` that runs a PipeWire client of its own until its main
/// loop quits. The thread connects to this user's PipeWire with `client-rt.conf`, as
/// audio apps do (its module-rt makes the data loop that runs the streams' real-time
/// callbacks a real-time thread; under `client.conf` it is an ordinary thread that a
/// busy machine delays by milliseconds), hands the connection to `serve`, which sets up
/// what the thread does (streams, timers, a command receiver that quits the loop) and
/// returns what must live while it runs, then runs the loop. What `serve` returned is
/// dropped before the context and the loop.
///
/// The receiver gets the thread's word on start-up, once: `Ok` when `serve` succeeded
/// and the loop is about to run, or why not (the thread has then ended). The caller
/// waits for it, or not.
pub fn spawn_client<F>(name: &str, serve: F) -> std::io::Result<(JoinHandle<()>, Started)>
where
    F: for<'c> FnOnce(&'c Client, pw::core::CoreRc) -> Result<Box<dyn Held + 'c>, String> + Send + 'static,
{
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
        pw::init();
        let (client, core) = match connect_client() {
            Ok(v) => v,
            Err(e) => {
                let _ = ready_tx.send(Err(StartError::Connect(e)));
                return;
            }
        };
        let held = match serve(&client, core) {
            Ok(held) => held,
            Err(e) => {
                let _ = ready_tx.send(Err(StartError::Serve(e)));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        client.main_loop.run();
        drop(held);
    })?;
    Ok((thread, ready_rx))
}

/// A main loop, a context with `client-rt.conf`, and a connection on them.
fn connect_client() -> Result<(Client, pw::core::CoreRc), String> {
    let main_loop = pw::main_loop::MainLoopRc::new(None).map_err(|e| e.to_string())?;
    let props = pw::properties::properties! { "config.name" => "client-rt.conf" };
    let context = pw::context::ContextRc::new(&main_loop, Some(props)).map_err(|e| e.to_string())?;
    let core = context.connect_rc(None).map_err(|e| e.to_string())?;
    Ok((Client { main_loop, context }, core))
}
