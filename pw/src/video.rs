//! A raw video source node: a PipeWire output stream with `media.class=Video/Source`
//! that drives its own graph and hands consumers the frames put in its [`FrameSlot`]
//! (packed I420 at one size and rate). It may offer consumers other layouts and sizes
//! too ([`VideoSource::start_offering`]): frames are then converted as they are handed
//! on ([`convert`]), exactly where only the layout differs. A graph cycle runs when a
//! frame arrives, so a frame
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

/// A pixel layout a consumer may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Planar Y, U, V, chroma halved both ways (what frames are put as).
    I420,
    /// Planar Y, then U and V interleaved, chroma halved both ways.
    Nv12,
    /// Packed Y0 U Y1 V, chroma halved across (most V4L2 apps' first choice).
    Yuy2,
}

impl PixelFormat {
    fn spa(self) -> spa::param::video::VideoFormat {
        match self {
            PixelFormat::I420 => spa::param::video::VideoFormat::I420,
            PixelFormat::Nv12 => spa::param::video::VideoFormat::NV12,
            PixelFormat::Yuy2 => spa::param::video::VideoFormat::YUY2,
        }
    }

    fn from_spa(format: spa::param::video::VideoFormat) -> Option<Self> {
        [PixelFormat::I420, PixelFormat::Nv12, PixelFormat::Yuy2].into_iter().find(|f| f.spa() == format)
    }
}

/// The format a consumer agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutFormat {
    /// Its layout.
    pub format: PixelFormat,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
}

impl OutFormat {
    /// Bytes of one frame and of one row of its first plane.
    pub fn layout(&self) -> (usize, usize) {
        let (w, h) = (self.width as usize, self.height as usize);
        match self.format {
            PixelFormat::I420 | PixelFormat::Nv12 => (w * h + 2 * (w.div_ceil(2) * h.div_ceil(2)), w),
            PixelFormat::Yuy2 => (2 * w.div_ceil(2) * 2 * h, 2 * w.div_ceil(2)),
        }
    }
}

/// Converts `src`, packed I420 of `sw` x `sh`, into `out`'s layout and size in `dst`
/// (at least [`OutFormat::layout`] bytes); returns the bytes written, 0 if `src` or
/// `dst` is short. The picture is cropped at its centre to `out`'s aspect, then scaled:
/// luma bilinear, chroma nearest. At the same size it only moves bytes: converting back
/// gives `src` exactly.
pub fn convert(src: &[u8], sw: u32, sh: u32, out: OutFormat, dst: &mut [u8]) -> usize {
    let (sw, sh, ow, oh) = (sw as usize, sh as usize, out.width as usize, out.height as usize);
    let (size, _) = out.layout();
    let (scw, sch) = (sw.div_ceil(2), sh.div_ceil(2));
    if ow == 0 || oh == 0 || src.len() < sw * sh + 2 * scw * sch || dst.len() < size {
        return 0;
    }
    let (y_plane, rest) = src.split_at(sw * sh);
    let (u_plane, v_plane) = rest.split_at(scw * sch);
    // The source rectangle of `out`'s aspect, centred.
    let (cw, ch) = if sw * oh > sh * ow { (sh * ow / oh, sh) } else { (sw, sw * oh / ow) };
    let (cx, cy) = ((sw - cw) / 2, (sh - ch) / 2);
    // Per output column (row): the two source columns (rows) and the weight of the second.
    let taps = |n_out: usize, n_in: usize, offset: usize, limit: usize| -> Vec<(usize, usize, u32)> {
        (0..n_out)
            .map(|i| {
                let pos = ((i as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0) + offset as f64;
                let a = (pos.floor() as usize).min(limit - 1);
                let b = (a + 1).min(limit - 1);
                (a, b, ((pos - pos.floor()) * 256.0).round() as u32)
            })
            .collect()
    };
    let cols = taps(ow, cw, cx, sw);
    let rows = taps(oh, ch, cy, sh);
    let luma = |x: usize, y: usize| -> u8 {
        let ((x0, x1, wx), (y0, y1, wy)) = (cols[x], rows[y]);
        let p = |xx: usize, yy: usize| u32::from(y_plane[yy * sw + xx]);
        let top = p(x0, y0) * (256 - wx) + p(x1, y0) * wx;
        let bottom = p(x0, y1) * (256 - wx) + p(x1, y1) * wx;
        ((top * (256 - wy) + bottom * wy + (1 << 15)) >> 16) as u8
    };
    // Chroma: the nearest source sample to the centre of each output chroma sample.
    let chroma_at = |plane: &[u8], x2: usize, y2: usize, ocw: usize, och: usize| -> u8 {
        let sx = (cx as f64 / 2.0 + (x2 as f64 + 0.5) * (cw as f64 / 2.0) / ocw as f64 - 0.5).round().max(0.0);
        let sy = (cy as f64 / 2.0 + (y2 as f64 + 0.5) * (ch as f64 / 2.0) / och as f64 - 0.5).round().max(0.0);
        plane[(sy as usize).min(sch - 1) * scw + (sx as usize).min(scw - 1)]
    };
    let (ocw, och) = (ow.div_ceil(2), oh.div_ceil(2));
    match out.format {
        PixelFormat::I420 | PixelFormat::Nv12 => {
            let (dy, dc) = dst[..size].split_at_mut(ow * oh);
            for y in 0..oh {
                for x in 0..ow {
                    dy[y * ow + x] = luma(x, y);
                }
            }
            for y2 in 0..och {
                for x2 in 0..ocw {
                    let (u, v) = (chroma_at(u_plane, x2, y2, ocw, och), chroma_at(v_plane, x2, y2, ocw, och));
                    if out.format == PixelFormat::I420 {
                        dc[y2 * ocw + x2] = u;
                        dc[ocw * och + y2 * ocw + x2] = v;
                    } else {
                        dc[2 * (y2 * ocw + x2)] = u;
                        dc[2 * (y2 * ocw + x2) + 1] = v;
                    }
                }
            }
        }
        PixelFormat::Yuy2 => {
            let stride = 2 * ocw * 2;
            for y in 0..oh {
                for x2 in 0..ocw {
                    let at = y * stride + 4 * x2;
                    let (x0, x1) = (2 * x2, (2 * x2 + 1).min(ow - 1));
                    dst[at] = luma(x0, y);
                    dst[at + 1] = chroma_at(u_plane, x2, y / 2, ocw, och);
                    dst[at + 2] = luma(x1, y);
                    dst[at + 3] = chroma_at(v_plane, x2, y / 2, ocw, och);
                }
            }
        }
    }
    size
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
    fixed_pod(PixelFormat::I420, video.width, video.height, video.fps)
}

/// The `EnumFormat` pods offering `formats` at `video`'s size and `sizes`, at
/// `video`'s rate: one fixed pod per layout and size, I420 at `video`'s own size first
/// (preferred). Fixed pods, not choices: pw-v4l2 (0.3.65) cannot negotiate choices.
fn offer_pods(video: RawVideo, formats: &[PixelFormat], sizes: &[(u32, u32)]) -> Result<Vec<Vec<u8>>, String> {
    let native = (video.width, video.height);
    let mut all = vec![native];
    all.extend(sizes.iter().copied().filter(|s| *s != native));
    let mut pods = Vec::new();
    for format in formats {
        for &(width, height) in &all {
            pods.push(fixed_pod(*format, width, height, video.fps)?);
        }
    }
    Ok(pods)
}

/// One fixed raw video `EnumFormat` pod.
fn fixed_pod(format: PixelFormat, width: u32, height: u32, fps: u32) -> Result<Vec<u8>, String> {
    use spa::param::format::{FormatProperties, MediaSubtype, MediaType};
    let obj = spa::pod::object!(
        spa::utils::SpaTypes::ObjectParamFormat,
        spa::param::ParamType::EnumFormat,
        spa::pod::property!(FormatProperties::MediaType, Id, MediaType::Video),
        spa::pod::property!(FormatProperties::MediaSubtype, Id, MediaSubtype::Raw),
        spa::pod::property!(FormatProperties::VideoFormat, Id, format.spa()),
        spa::pod::property!(FormatProperties::VideoSize, Rectangle, spa::utils::Rectangle { width, height }),
        spa::pod::property!(FormatProperties::VideoFramerate, Fraction, spa::utils::Fraction { num: fps, denom: 1 }),
    );
    serialize(Value::Object(obj))
}

/// The `Buffers` pod for frames of `out`: 4 buffers (2 to 8), one block of a frame.
fn buffers_pod(out: OutFormat) -> Result<Vec<u8>, String> {
    let (size, stride) = out.layout();
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
            int(spa::sys::SPA_PARAM_BUFFERS_size, size as i32),
            int(spa::sys::SPA_PARAM_BUFFERS_stride, stride as i32),
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
                let dst = std::slice::from_raw_parts_mut(d.data.cast::<u8>(), d.maxsize as usize);
                let native =
                    OutFormat { format: PixelFormat::I420, width: state.video.width, height: state.video.height };
                let n = if state.out == native {
                    let n = frame.len().min(dst.len());
                    dst[..n].copy_from_slice(&frame[..n]);
                    n
                } else {
                    convert(frame, state.video.width, state.video.height, state.out, dst)
                };
                (*d.chunk).offset = 0;
                (*d.chunk).size = n as u32;
                (*d.chunk).stride = state.out.layout().1 as i32;
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
    /// What consumers agreed on; the frames' own format until they have.
    out: OutFormat,
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
    /// source of `video` (I420 at its size only), taking its frames from `frames` as
    /// they come; `main_loop` is the stream's, and is woken by [`FrameSlot::put`].
    pub fn start(
        stream: S,
        main_loop: &'static pw::loop_::Loop,
        video: RawVideo,
        frames: FrameSlot,
    ) -> Result<Self, String> {
        Self::start_offering(stream, main_loop, video, &[PixelFormat::I420], &[], frames)
    }

    /// As [`VideoSource::start`], offering consumers `formats` (the first preferred)
    /// at `video`'s size (preferred) or one of `sizes`: frames, put as I420 of `video`,
    /// are converted to what was agreed ([`convert`]).
    pub fn start_offering(
        stream: S,
        main_loop: &'static pw::loop_::Loop,
        video: RawVideo,
        formats: &[PixelFormat],
        sizes: &[(u32, u32)],
        frames: FrameSlot,
    ) -> Result<Self, String> {
        let native = OutFormat { format: PixelFormat::I420, width: video.width, height: video.height };
        let listener = stream
            .add_local_listener_with_user_data(SourceState { video, out: native, frames: frames.clone(), delivered: 0 })
            .param_changed(|stream, state, id, param| {
                let Some(param) = param.filter(|_| id == spa::param::ParamType::Format.as_raw()) else { return };
                let mut info = spa::param::video::VideoInfoRaw::new();
                if info.parse(param).is_err() {
                    return;
                }
                let (format, size) = (info.format(), info.size());
                let Some(format) = PixelFormat::from_spa(format) else { return };
                if size.width == 0 || size.height == 0 || size.width > 8192 || size.height > 8192 {
                    return;
                }
                state.out = OutFormat { format, width: size.width, height: size.height };
                // The format is agreed: say how big buffers must be, and that
                // each carries a header (its time and sequence number).
                if let (Ok(buffers), Ok(meta)) = (buffers_pod(state.out), header_meta_pod()) {
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
        let offers = offer_pods(video, formats, sizes)?;
        let mut params =
            offers.iter().map(|p| Pod::from_bytes(p).ok_or("bad format pod")).collect::<Result<Vec<_>, _>>()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4x4 I420 frame: luma 0..16, U 100.., V 200...
    fn small() -> Vec<u8> {
        let mut f: Vec<u8> = (0..16).collect();
        f.extend([100, 101, 102, 103]);
        f.extend([200, 201, 202, 203]);
        f
    }

    #[test]
    fn the_same_size_in_another_layout_moves_bytes_only() {
        let src = small();
        let mut nv12 = vec![0u8; 24];
        assert_eq!(convert(&src, 4, 4, OutFormat { format: PixelFormat::Nv12, width: 4, height: 4 }, &mut nv12), 24);
        assert_eq!(&nv12[..16], &src[..16]);
        assert_eq!(&nv12[16..], [100, 200, 101, 201, 102, 202, 103, 203]);
        let mut yuy2 = vec![0u8; 32];
        assert_eq!(convert(&src, 4, 4, OutFormat { format: PixelFormat::Yuy2, width: 4, height: 4 }, &mut yuy2), 32);
        // Row 1: Y4 U0 Y5 V0 Y6 U1 Y7 V1 (chroma of row pair 0).
        assert_eq!(&yuy2[8..16], [4, 100, 5, 200, 6, 101, 7, 201]);
        assert_eq!(&yuy2[24..32], [12, 102, 13, 202, 14, 103, 15, 203]);
        let mut same = vec![0u8; 24];
        convert(&src, 4, 4, OutFormat { format: PixelFormat::I420, width: 4, height: 4 }, &mut same);
        assert_eq!(same, src);
    }

    #[test]
    fn scaling_keeps_flat_areas_and_crops_to_the_aspect() {
        // 8x4, left half luma 50, right half 150; chroma flat.
        let mut src = Vec::new();
        for _ in 0..4 {
            src.extend([50u8; 4]);
            src.extend([150u8; 4]);
        }
        src.extend([128u8; 16]);
        // To 4x4 (square): the centre 4x4 is cropped: columns 2..6 -> 50 50 150 150.
        let out = OutFormat { format: PixelFormat::I420, width: 4, height: 4 };
        let mut dst = vec![0u8; out.layout().0];
        convert(&src, 8, 4, out, &mut dst);
        assert_eq!(&dst[..4], [50, 50, 150, 150]);
        // Up to 16x8: flat areas stay flat, the edge is blended.
        let out = OutFormat { format: PixelFormat::I420, width: 16, height: 8 };
        let mut dst = vec![0u8; out.layout().0];
        convert(&src, 8, 4, out, &mut dst);
        assert_eq!(&dst[..3], [50, 50, 50]);
        assert_eq!(&dst[13..16], [150, 150, 150]);
        assert!(dst[16 * 8..].iter().all(|&c| c == 128));
        // Short buffers: nothing written.
        assert_eq!(convert(&src[..10], 8, 4, out, &mut dst), 0);
        assert_eq!(convert(&src, 8, 4, out, &mut [0u8; 10]), 0);
    }
}
