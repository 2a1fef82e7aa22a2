//! A raw video source node: a PipeWire output stream with `media.class=Video/Source`
//! that drives its own graph at its frame rate and hands consumers the frames put in
//! its [`FrameSlot`] (I420, one size and rate). With no frame waiting it delivers
//! nothing that cycle: a consumer simply gets no new frame.
//!
//! As verified on PipeWire 0.3.65 (docs: DESIGN, "Facts verified for video"): flags
//! `DRIVER | MAP_BUFFERS`, a timer calling `trigger_process()` once a frame, and a
//! `ParamBuffers` sent once the format is agreed (without it consumers get empty
//! frames). `pipewiresrc target-object=NAME ! video/x-raw ! ...` then receives every
//! frame sent, in order.

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
/// picture, not a backlog). Fed from any thread; the source takes at most one a cycle.
#[derive(Debug, Clone)]
pub struct FrameSlot {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    rx: crossbeam_channel::Receiver<Vec<u8>>,
}

impl Default for FrameSlot {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(2);
        Self { tx, rx }
    }
}

impl FrameSlot {
    /// Offers a frame; when two already wait, the oldest is dropped for it.
    pub fn put(&self, frame: Vec<u8>) {
        if let Err(crossbeam_channel::TrySendError::Full(frame)) = self.tx.try_send(frame) {
            let _ = self.rx.try_recv();
            let _ = self.tx.try_send(frame);
        }
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.rx.try_recv().ok()
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
    _timer: pw::loop_::TimerSource<'static>,
    stream: crate::RtStream<S, SourceState>,
}

impl<S: std::ops::Deref<Target = pw::stream::Stream>> std::fmt::Debug for VideoSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoSource").finish_non_exhaustive()
    }
}

impl<S: std::ops::Deref<Target = pw::stream::Stream> + 'static> VideoSource<S> {
    /// Connects `stream` (made with `media.class=Video/Source` and a `node.name`) as a
    /// source of `video`, taking its frames from `frames`, on `main_loop`'s timer.
    pub fn start(
        stream: S,
        main_loop: &'static pw::loop_::Loop,
        video: RawVideo,
        frames: FrameSlot,
    ) -> Result<Self, String> {
        let listener = stream
            .add_local_listener_with_user_data(SourceState { video, frames, delivered: 0 })
            .param_changed(|stream, state, id, param| {
                if id != spa::param::ParamType::Format.as_raw() || param.is_none() {
                    return;
                }
                // The format is agreed: say how big buffers must be.
                if let Ok(pod) = buffers_pod(state.video) {
                    if let Some(pod) = Pod::from_bytes(&pod) {
                        let _ = stream.update_params(&mut [pod]);
                    }
                }
            })
            .process(|stream, state| {
                let Some(frame) = state.frames.take() else { return };
                let Some(mut buffer) = stream.dequeue_buffer() else { return };
                let Some(data) = buffer.datas_mut().first_mut() else { return };
                let stride = state.video.width as i32;
                let Some(bytes) = data.data() else { return };
                let n = frame.len().min(bytes.len());
                bytes[..n].copy_from_slice(&frame[..n]);
                let chunk = data.chunk_mut();
                *chunk.offset_mut() = 0;
                *chunk.size_mut() = n as u32;
                *chunk.stride_mut() = stride;
                state.delivered += 1;
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
        let timer = main_loop.add_timer(move |_| {
            // SAFETY: the timer is dropped with the source, before its stream.
            unsafe { pw::sys::pw_stream_trigger_process(raw) };
        });
        timer
            .update_timer(Some(video.interval()), Some(video.interval()))
            .into_result()
            .map_err(|e| format!("cannot start the video source's timer: {e}"))?;
        Ok(Self { _timer: timer, stream })
    }

    /// The stream, for its properties and state.
    pub fn stream(&self) -> &pw::stream::Stream {
        &self.stream
    }
}
