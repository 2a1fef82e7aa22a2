//! A raw video source node: a PipeWire output stream with `media.class=Video/Source`
//! that drives its own graph and hands consumers the frames put in its [`FrameSlot`]
//! (I420, one size and rate). A graph cycle runs when a frame arrives, so a frame
//! waits for no timer: it reaches consumers as soon as it is put. With no frame coming
//! nothing runs, and a consumer simply gets no new frame.
//!
//! As verified on PipeWire 0.3.65 (docs: DESIGN, "Facts verified for video"): flags
//! `DRIVER | MAP_BUFFERS`, `trigger_process()` once a frame, and a `ParamBuffers` sent
//! once the format is agreed (without it consumers get empty frames).
//! `pipewiresrc target-object=NAME ! video/x-raw ! ...` then receives every frame
//! sent, in order.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pipewire as pw;
use pw::spa;
use spa::pod::{Object, Pod, Property, PropertyFlags, Value};

/// The raw format a [`VideoSource`] offers: I420 at one size and frame rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawVideo {
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
}

impl RawVideo {
    /// Bytes of one I420 frame: the luma plane and two quarter-size chroma planes.
    pub fn frame_bytes(&self) -> usize {
        let (w, h) = (self.width as usize, self.height as usize);
        w * h + 2 * (w.div_ceil(2) * h.div_ceil(2))
    }

    /// Time between frames.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.fps.max(1)))
    }
}

/// Where frames wait for the source: the newest one wins (a consumer wants the latest
/// picture, not a backlog). Fed from any thread; each frame put wakes the source's
/// loop through an eventfd, and the source hands it on at once.
#[derive(Clone)]
pub struct FrameSlot {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    rx: crossbeam_channel::Receiver<Vec<u8>>,
    /// An eventfd the source's loop watches.
    wake: Arc<OwnedFd>,
    /// Frames put while two were waiting already, so the oldest was dropped.
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for FrameSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSlot").field("waiting", &self.rx.len()).finish_non_exhaustive()
    }
}

impl FrameSlot {
    /// An empty slot; fails only if the process is out of file descriptors.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: see above.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = crossbeam_channel::bounded(2);
        Ok(Self { tx, rx, wake, dropped: Arc::default() })
    }

    /// Offers a frame; when two already wait, the oldest is dropped for it.
    pub fn put(&self, frame: Vec<u8>) {
        if let Err(crossbeam_channel::TrySendError::Full(frame)) = self.tx.try_send(frame) {
            let _ = self.rx.try_recv();
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let _ = self.tx.try_send(frame);
        }
        self.signal();
    }

    /// Frames dropped unseen because newer ones came before the source took them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Drops the frames waiting (the stream they came from ended).
    pub fn clear(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.rx.try_recv().ok()
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. It cannot fail but
        // by overflowing the counter, which still leaves the loop woken.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Resets the eventfd (the loop was woken).
    fn drain_signal(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from our non-blocking eventfd.
        let _ = unsafe { libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    }
}

/// The `EnumFormat` pod of `video`.
pub fn video_format_pod(video: RawVideo) -> Result<Vec<u8>, String> {
    use spa::param::format::{FormatProperties, MediaSubtype, MediaType};
    let obj = spa::pod::object!(
        spa::utils::SpaTypes::ObjectParamFormat,
        spa::param::ParamType::EnumFormat,
        spa::pod::property!(FormatProperties::MediaType, Id, MediaType::Video),
        spa::pod::property!(FormatProperties::MediaSubtype, Id, MediaSubtype::Raw),
        spa::pod::property!(FormatProperties::VideoFormat, Id, spa::param::video::VideoFormat::I420),
        spa::pod::property!(
            FormatProperties::VideoSize,
            Rectangle,
            spa::utils::Rectangle { width: video.width, height: video.height }
        ),
        spa::pod::property!(
            FormatProperties::VideoFramerate,
            Fraction,
            spa::utils::Fraction { num: video.fps, denom: 1 }
        ),
    );
    serialize(Value::Object(obj))
}

/// The `Buffers` pod for frames of `video`: 4 buffers (2 to 8), one block of a frame.
fn buffers_pod(video: RawVideo) -> Result<Vec<u8>, String> {
    let int = |key: u32, value: i32| Property { key, flags: PropertyFlags::empty(), value: Value::Int(value) };
    let obj = Object {
        type_: spa::utils::SpaTypes::ObjectParamBuffers.as_raw(),
        id: spa::param::ParamType::Buffers.as_raw(),
        properties: vec![
            Property {
                key: spa::sys::SPA_PARAM_BUFFERS_buffers,
                flags: PropertyFlags::empty(),
                value: Value::Choice(spa::pod::ChoiceValue::Int(spa::utils::Choice(
                    spa::utils::ChoiceFlags::empty(),
                    spa::utils::ChoiceEnum::Range { default: 4, min: 2, max: 8 },
                ))),
            },
            int(spa::sys::SPA_PARAM_BUFFERS_blocks, 1),
            int(spa::sys::SPA_PARAM_BUFFERS_size, video.frame_bytes() as i32),
            int(spa::sys::SPA_PARAM_BUFFERS_stride, video.width as i32),
        ],
    };
    serialize(Value::Object(obj))
}

/// The `Meta` pod asking for a `spa_meta_header` on every buffer: consumers
/// (pipewiresrc) take a frame's time from it, and without it get none.
fn header_meta_pod() -> Result<Vec<u8>, String> {
    let obj = Object {
        type_: spa::sys::SPA_TYPE_OBJECT_ParamMeta,
        id: spa::sys::SPA_PARAM_Meta,
        properties: vec![
            Property {
                key: spa::sys::SPA_PARAM_META_type,
                flags: PropertyFlags::empty(),
                value: Value::Id(spa::utils::Id(spa::sys::SPA_META_Header)),
            },
            Property {
                key: spa::sys::SPA_PARAM_META_size,
                flags: PropertyFlags::empty(),
                value: Value::Int(std::mem::size_of::<spa::sys::spa_meta_header>() as i32),
            },
        ],
    };
    serialize(Value::Object(obj))
}

/// Hands `frame` to the stream in its next free buffer, stamped with the time now on
/// `CLOCK_MONOTONIC` (as PipeWire's V4L2 cameras stamp theirs) and its number; false
/// if no buffer was free.
fn put_frame(stream: &pw::stream::Stream, frame: &[u8], state: &SourceState) -> bool {
    // SAFETY: a buffer dequeued from the stream is ours until queued back, below; its
    // spa_buffer, datas, chunk and metas are PipeWire's for that buffer, and the data
    // is mapped (MAP_BUFFERS) with `maxsize` bytes.
    unsafe {
        let b = stream.dequeue_raw_buffer();
        if b.is_null() {
            return false;
        }
        let buf = (*b).buffer;
        let mut put = false;
        if !buf.is_null() && (*buf).n_datas > 0 && !(*buf).datas.is_null() {
            let d = &mut *(*buf).datas;
            if !d.data.is_null() && !d.chunk.is_null() {
                let n = frame.len().min(d.maxsize as usize);
                std::ptr::copy_nonoverlapping(frame.as_ptr(), d.data.cast::<u8>(), n);
                (*d.chunk).offset = 0;
                (*d.chunk).size = n as u32;
                (*d.chunk).stride = state.video.width as i32;
                (*d.chunk).flags = 0;
                let size = std::mem::size_of::<spa::sys::spa_meta_header>();
                let h = spa::sys::spa_buffer_find_meta_data(buf, spa::sys::SPA_META_Header, size)
                    .cast::<spa::sys::spa_meta_header>();
                if !h.is_null() {
                    (*h).flags = 0;
                    (*h).offset = 0;
                    (*h).pts = melange_shim::clock::monotonic_ns() as i64;
                    (*h).dts_offset = 0;
                    (*h).seq = state.delivered;
                }
                put = true;
            }
        }
        stream.queue_raw_buffer(b);
        put
    }
}

fn serialize(value: Value) -> Result<Vec<u8>, String> {
    spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &value)
        .map(|(cursor, _)| cursor.into_inner())
        .map_err(|e| format!("cannot build a pod: {e:?}"))
}

/// What the stream's callbacks own.
#[derive(Debug)]
pub struct SourceState {
    video: RawVideo,
    frames: FrameSlot,
    /// Frames handed to consumers.
    pub delivered: u64,
}

/// A raw video source on a PipeWire connection. See the module docs.
pub struct VideoSource<S: std::ops::Deref<Target = pw::stream::Stream>> {
    // Dropped first: its callback triggers the stream.
    _wake: pw::loop_::IoSource<'static, Arc<OwnedFd>>,
    stream: crate::RtStream<S, SourceState>,
}

impl<S: std::ops::Deref<Target = pw::stream::Stream>> std::fmt::Debug for VideoSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoSource").finish_non_exhaustive()
    }
}

impl<S: std::ops::Deref<Target = pw::stream::Stream> + 'static> VideoSource<S> {
    /// Connects `stream` (made with `media.class=Video/Source` and a `node.name`) as a
    /// source of `video`, taking its frames from `frames` as they come; `main_loop` is
    /// the stream's, and is woken by [`FrameSlot::put`].
    pub fn start(
        stream: S,
        main_loop: &'static pw::loop_::Loop,
        video: RawVideo,
        frames: FrameSlot,
    ) -> Result<Self, String> {
        let listener = stream
            .add_local_listener_with_user_data(SourceState { video, frames: frames.clone(), delivered: 0 })
            .param_changed(|stream, state, id, param| {
                if id != spa::param::ParamType::Format.as_raw() || param.is_none() {
                    return;
                }
                // The format is agreed: say how big buffers must be, and that
                // each carries a header (its time and sequence number).
                if let (Ok(buffers), Ok(meta)) = (buffers_pod(state.video), header_meta_pod()) {
                    if let (Some(buffers), Some(meta)) = (Pod::from_bytes(&buffers), Pod::from_bytes(&meta)) {
                        let _ = stream.update_params(&mut [buffers, meta]);
                    }
                }
            })
            .process(|stream, state| {
                let Some(frame) = state.frames.take() else { return };
                if put_frame(stream, &frame, state) {
                    state.delivered += 1;
                }
                if !state.frames.rx.is_empty() {
                    // A frame came while this one was handed on: a cycle for it too.
                    state.frames.signal();
                }
            })
            .register()
            .map_err(|e| format!("cannot listen on the video source: {e}"))?;
        let stream = crate::RtStream::new(stream, listener);
        let format = video_format_pod(video)?;
        let mut params = [Pod::from_bytes(&format).ok_or("bad format pod")?];
        stream
            .connect(
                spa::utils::Direction::Output,
                None,
                pw::stream::StreamFlags::DRIVER | pw::stream::StreamFlags::MAP_BUFFERS,
                &mut params,
            )
            .map_err(|e| format!("cannot connect the video source: {e}"))?;
        let raw = stream.as_raw_ptr();
        let slot = frames.clone();
        let wake = main_loop.add_io(frames.wake.clone(), spa::support::system::IoFlags::IN, move |_| {
            slot.drain_signal();
            // SAFETY: the io source is dropped with the source, before its stream.
            unsafe { pw::sys::pw_stream_trigger_process(raw) };
        });
        Ok(Self { _wake: wake, stream })
    }

    /// The stream, for its properties and state.
    pub fn stream(&self) -> &pw::stream::Stream {
        &self.stream
    }
}
