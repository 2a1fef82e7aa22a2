//! melange-host's GStreamer decoders for a player's forwarded streams.
//!
//! One pipeline per stream, `appsrc ! decodebin ! ...`, so the host's own decoders
//! (hardware ones where GStreamer ranks them first) do the work:
//!
//! - video: `videoconvert ! ... ! autovideosink` in a window titled after the app
//!   (`--video-output window`), or an appsink that logs each decoded frame's checksum
//!   and the time it was shown (`frames:DIR`). Frames are shown at their guest
//!   presentation time mapped onto this host's clock ([`Anchor`]) plus the pipeline's
//!   latency (the decoder's reordering), which is reported to the player's sink as the
//!   stream's render delay: the sink sends that much early.
//! - audio: `audioconvert ! audioresample ! appsink` to interleaved f32 at the
//!   announced rate and channels, handed to the host thread, which plays it through the
//!   tapped audio's output (volume, mute, drift control and latency as for tapped
//!   audio); the output's render delay is reported to the player's sink. Each sink
//!   sending early by its own stream's delay is what keeps picture and sound together.
//!
//! The host thread never waits on GStreamer: units are queued (a bounded appsrc queue,
//! beyond which they are dropped until a keyframe) and decoded audio comes back over a
//! channel with a wake-up of the host's loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use melange_transport::message::{
    au_flags, codec_bits, AccessUnit, AudioFormat, Codec, MediaKind, StreamControl, StreamOpen,
};

/// Most bytes queued for one decoder; beyond it units are dropped until a keyframe.
const MAX_QUEUED_BYTES: u64 = 16 << 20;

/// Access units per window of the anchor's minimum (half a second of video at 30 fps):
/// a change of the sender's render delay is followed within two windows.
const ANCHOR_WINDOW: u32 = 16;

/// Starts GStreamer and keeps the host from ever picking a Melange player sink (they
/// belong in guests, but a machine may have both packages).
pub fn init() -> Result<(), String> {
    gst::init().map_err(|e| format!("cannot start GStreamer: {e}"))?;
    let registry = gst::Registry::get();
    for name in ["melangevideosink", "melangeaudiosink"] {
        if let Some(feature) = registry.lookup_feature(name) {
            feature.set_rank(gst::Rank::NONE);
        }
    }
    Ok(())
}

/// Of `codecs` (`codec_bits`), those a decoder on this host takes. A profile bit
/// (`codec_bits::PROFILES`) is set when every profile it stands for has a decoder
/// (software decoders take them all; a hardware one lists the profiles it takes).
pub fn decodable(codecs: u64) -> u64 {
    let decoders = gst::ElementFactory::factories_with_type(gst::ElementFactoryType::DECODER, gst::Rank::MARGINAL);
    let takes = |caps: &gst::Caps| decoders.iter().any(|f| f.can_sink_any_caps(caps));
    let mut out = 0;
    for bit in (0..64).map(|i| 1u64 << i).filter(|b| codecs & b != 0 && codec_bits::ENCODED & b != 0) {
        let Some((media, codec, data)) = probe_stream(bit) else { continue };
        let Ok(caps) = melange_gst::caps::decoder_caps(&media, &codec, &data) else { continue };
        // A parser in between (h264parse's byte-stream to avc) counts as well: decodebin
        // finds it. Matching the codec's own caps without setup data is enough.
        let name = caps.structure(0).map_or("", |s| s.name().as_str()).to_owned();
        let bare = gst::Caps::builder(name.as_str()).build();
        if takes(&caps) || takes(&bare) {
            out |= bit;
        }
        let profiles = codec_bits::profiles_of(bit);
        let high = melange_gst::caps::high_profiles(bit);
        if codecs & profiles != 0
            && !high.is_empty()
            && high.iter().all(|p| takes(&gst::Caps::builder(name.as_str()).field("profile", *p).build()))
        {
            out |= profiles;
        }
    }
    out & !(codec_bits::PROFILES & !profile_bits_of(out))
}

/// The profile bits whose codec's bit is in `codecs`.
fn profile_bits_of(codecs: u64) -> u64 {
    (0..64).map(|i| 1u64 << i).filter(|b| codecs & b != 0).fold(0, |acc, b| acc | codec_bits::profiles_of(b))
}

/// A stream of codec `bit` as a player would announce it, for [`decodable`].
fn probe_stream(bit: u64) -> Option<(MediaKind, Codec, Vec<u8>)> {
    let audio = MediaKind::EncodedAudio(AudioFormat { rate: 48_000, channels: 2, positions: Vec::new() });
    let video = MediaKind::EncodedVideo(melange_transport::message::VideoFormat {
        width: 640,
        height: 360,
        framerate_num: 30,
        framerate_den: 1,
    });
    let headers = vec![0, 0, 0, 1, 0];
    Some(match bit {
        codec_bits::H264 => (video, Codec::H264, Vec::new()),
        codec_bits::H265 => (video, Codec::H265, Vec::new()),
        codec_bits::VP8 => (video, Codec::Vp8, Vec::new()),
        codec_bits::VP9 => (video, Codec::Vp9, Vec::new()),
        codec_bits::AV1 => (video, Codec::Av1, Vec::new()),
        codec_bits::MP3 => (audio, Codec::Mp3, Vec::new()),
        codec_bits::AAC => (audio, Codec::Aac, vec![0x11, 0x90]),
        codec_bits::OPUS => (audio, Codec::Opus { bitrate: 0 }, Vec::new()),
        codec_bits::VORBIS => (audio, Codec::Vorbis, headers),
        codec_bits::FLAC => (audio, Codec::Flac, headers),
        _ => return None,
    })
}

/// Maps a stream's guest times onto this host's `CLOCK_MONOTONIC`.
///
/// Players send each unit at its decoding time on their clock, so arrival minus
/// decoding time is the clocks' offset plus the trip; its minimum over the last one or
/// two windows of [`ANCHOR_WINDOW`] units is the offset with the least trip, and follows
/// drift between the clocks a window at a time. Reset by flushes, resumes and
/// discontinuities, where the guest's timeline jumps.
#[derive(Debug, Default, Clone, Copy)]
pub struct Anchor {
    previous: Option<i64>,
    current: Option<i64>,
    in_window: u32,
}

impl Anchor {
    /// Takes a unit with decoding time `dts_ns` (guest) that arrived at `arrival_ns`
    /// (host); returns the offset to add to guest times.
    pub fn update(&mut self, arrival_ns: u64, dts_ns: u64) -> i64 {
        let offset = arrival_ns as i64 - dts_ns as i64;
        self.current = Some(self.current.map_or(offset, |c| c.min(offset)));
        self.in_window += 1;
        let result = self.offset().unwrap_or(offset);
        if self.in_window >= ANCHOR_WINDOW {
            self.previous = self.current.take();
            self.in_window = 0;
        }
        result
    }

    /// The current offset, if any unit arrived since the last reset.
    pub fn offset(&self) -> Option<i64> {
        match (self.previous, self.current) {
            (Some(p), Some(c)) => Some(p.min(c)),
            (p, c) => p.or(c),
        }
    }

    /// Forgets the offset (the guest's timeline jumped).
    pub fn reset(&mut self) {
        *self = Anchor::default();
    }
}

/// Where decoded video goes.
#[derive(Debug, Clone)]
pub enum Show {
    /// A window titled `title`, `width` x `height` (0: the video's size).
    Window {
        /// "Totem (guest)".
        title: String,
        /// The guest's reported size.
        width: u32,
        /// See `width`.
        height: u32,
    },
    /// One JSON line per decoded frame (see [`FrameLog`]).
    Frames(FrameLog),
}

/// Lines about decoded frames or audio, written from GStreamer's threads into a file
/// under the run's byte cap (`--wav-max-bytes`).
#[derive(Debug, Clone)]
pub struct FrameLog {
    file: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    left: Arc<AtomicU64>,
}

impl FrameLog {
    /// Writes into `file`, taking bytes from `left`.
    pub fn new(file: std::fs::File, left: Arc<AtomicU64>) -> Self {
        Self { file: Arc::new(Mutex::new(std::io::BufWriter::new(file))), left }
    }

    /// Writes one line, unless the cap is reached.
    pub fn line(&self, value: &serde_json::Value) {
        use std::io::Write;
        let text = value.to_string();
        let n = text.len() as u64 + 1;
        if self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(n)).is_err() {
            return;
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{text}");
    }

    /// Writes what is buffered.
    pub fn flush(&self) {
        use std::io::Write;
        let _ = self.file.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// FNV-1a, 64 bits, continued from `h`.
fn fnv1a_from(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Checksum and mean luma of an I420 frame in GStreamer's default layout, visible
/// pixels only (rows without their padding).
pub fn i420_digest(data: &[u8], width: usize, height: usize) -> Option<(u64, f64)> {
    // GStreamer's default I420 layout (video-info.c).
    let (round2, round4) = (|n: usize| (n + 1) & !1, |n: usize| (n + 3) & !3);
    let (y_stride, c_stride) = (round4(width), round4(round2(width) / 2));
    let (c_width, c_height) = (round2(width) / 2, round2(height) / 2);
    let u_at = y_stride * round2(height);
    let v_at = u_at + c_stride * c_height;
    let planes =
        [(0, y_stride, width, height), (u_at, c_stride, c_width, c_height), (v_at, c_stride, c_width, c_height)];
    let mut h = FNV_START;
    let mut luma = 0u64;
    for (i, &(at, stride, w, rows)) in planes.iter().enumerate() {
        for r in 0..rows {
            let row = data.get(at + r * stride..at + r * stride + w)?;
            if i == 0 {
                luma += row.iter().map(|&b| u64::from(b)).sum::<u64>();
            }
            h = fnv1a_from(h, row);
        }
    }
    Some((h, luma as f64 / (width * height).max(1) as f64))
}

/// A decoding pipeline: the parts both kinds share.
struct Pipeline {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    bus: gst::Bus,
}

impl Pipeline {
    fn new(open: &StreamOpen, live: bool) -> Result<(Self, gst::Element), String> {
        let caps = melange_gst::caps::decoder_caps(&open.media, &open.codec, &open.codec_data)?;
        let pipeline = gst::Pipeline::new();
        let src = gst_app::AppSrc::builder()
            .caps(&caps)
            .format(gst::Format::Time)
            .is_live(live)
            .block(false)
            .max_bytes(MAX_QUEUED_BYTES)
            .build();
        let decodebin = make("decodebin")?;
        pipeline.add_many([src.upcast_ref(), &decodebin]).map_err(|e| e.to_string())?;
        src.link(&decodebin).map_err(|e| e.to_string())?;
        let bus = pipeline.bus().ok_or("a pipeline without a bus")?;
        Ok((Self { pipeline, src, bus }, decodebin))
    }

    /// Links decodebin's pad of `prefix` media (once) to `sink_pad`.
    fn link_decoded(decodebin: &gst::Element, prefix: &'static str, sink_pad: gst::Pad) {
        decodebin.connect_pad_added(move |_, pad| {
            let is_kind = pad
                .current_caps()
                .or_else(|| Some(pad.query_caps(None)))
                .and_then(|c| c.structure(0).map(|s| s.name().starts_with(prefix)))
                .unwrap_or(false);
            if is_kind && !sink_pad.is_linked() {
                let _ = pad.link(&sink_pad);
            }
        });
    }

    /// Starts the pipeline; on failure, says why as its elements told the bus (a window
    /// sink without a display, a device that would not open) rather than only that a
    /// state change failed.
    fn start(&self) -> Result<(), String> {
        let Err(e) = self.pipeline.set_state(gst::State::Playing) else { return Ok(()) };
        let _ = self.pipeline.set_state(gst::State::Null);
        let mut why = Vec::new();
        while let Some(msg) = self.bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(err) = msg.view() {
                let from = msg.src().map(|s| s.name().to_string()).unwrap_or_default();
                why.push(format!("{from}: {}", err.error()));
            }
        }
        Err(if why.is_empty() {
            format!("cannot start decoding: {e}")
        } else {
            format!("cannot start decoding: {}", why.join("; "))
        })
    }

    /// Queues a buffer; false when the queue is full (the unit was dropped).
    fn push(&self, au: &AccessUnit, pts_ns: u64, dts_ns: u64) -> bool {
        if self.src.current_level_bytes() + au.data.len() as u64 > MAX_QUEUED_BYTES {
            return false;
        }
        let mut buffer = gst::Buffer::from_slice(au.data.clone());
        if let Some(b) = buffer.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds(pts_ns));
            b.set_dts(gst::ClockTime::from_nseconds(dts_ns));
            if au.duration_ns > 0 {
                b.set_duration(gst::ClockTime::from_nseconds(au.duration_ns));
            }
            let mut flags = gst::BufferFlags::empty();
            if !au.is_keyframe() {
                flags |= gst::BufferFlags::DELTA_UNIT;
            }
            if au.flags & au_flags::DECODE_ONLY != 0 {
                flags |= gst::BufferFlags::DECODE_ONLY;
            }
            b.set_flags(flags);
        }
        self.src.push_buffer(buffer).is_ok()
    }

    /// The first error GStreamer reported since the last call. Also applies a
    /// changed latency (a decoder found its reordering depth), as players do.
    fn error(&self) -> Option<String> {
        while let Some(msg) = self.bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Latency]) {
            match msg.view() {
                gst::MessageView::Error(e) => return Some(e.error().to_string()),
                _ => {
                    let _ = self.pipeline.recalculate_latency();
                }
            }
        }
        None
    }

    fn stop(&self) {
        let _ = self.src.end_of_stream();
        let _ = self.pipeline.set_state(gst::State::Null);
    }

    /// Ends the stream, waits up to `wait` for what is queued to come out, then stops.
    fn finish(&self, wait: Duration) {
        let _ = self.src.end_of_stream();
        let _ = self.bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(wait.as_nanos() as u64),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Drop for Pipeline {
    /// However a decoder ends (a stream dropped without a close, a host that stops),
    /// its elements stop and let go of their threads, windows and devices.
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Raw video of `width` x `height` (at most 8192 each): the size of a stream's window.
fn window_caps(width: u32, height: u32) -> gst::Caps {
    // At most 8K UHD's pixels, the shape kept: every frame is scaled to this.
    const MAX_AREA: f64 = 7680.0 * 4320.0;
    let (w, h) = (f64::from(width.clamp(1, 8192)), f64::from(height.clamp(1, 8192)));
    let k = (MAX_AREA / (w * h)).sqrt().min(1.0);
    gst::Caps::builder("video/x-raw")
        .field("width", (w * k).max(1.0) as i32)
        .field("height", (h * k).max(1.0) as i32)
        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
        .build()
}

fn make(name: &str) -> Result<gst::Element, String> {
    gst::ElementFactory::make(name).build().map_err(|_| format!("GStreamer element {name} is missing"))
}

/// A video stream's decoder. See the module docs.
pub struct VideoDecoder {
    p: Pipeline,
    anchor: Anchor,
    /// Guest offset of the last anchor, for the frame log's guest times.
    guest_offset: Arc<AtomicU64>,
    /// Decoded frames still to drop: one per decode-only unit since the last flush
    /// (the decoder puts them out first: they come before the segment).
    skip: Arc<AtomicU64>,
    /// In a window: the size the picture is scaled to, and whether the window exists
    /// (the video sink made it at the first frame, with that size; it keeps it).
    size: Option<(gst::Element, Arc<std::sync::atomic::AtomicBool>)>,
}

impl std::fmt::Debug for VideoDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoDecoder").field("anchor", &self.anchor).finish()
    }
}

impl VideoDecoder {
    /// Builds and starts the pipeline for `open`, showing frames as `show` says.
    pub fn new(open: &StreamOpen, show: Show) -> Result<Self, String> {
        let (p, decodebin) = Pipeline::new(open, true)?;
        let convert = make("videoconvert")?;
        p.pipeline.add(&convert).map_err(|e| e.to_string())?;
        Pipeline::link_decoded(&decodebin, "video/", convert.static_pad("sink").ok_or("videoconvert without a pad")?);
        let guest_offset = Arc::new(AtomicU64::new(0));
        let skip = Arc::new(AtomicU64::new(0));
        let mut size = None;
        if let Some(pad) = convert.static_pad("sink") {
            let skip = skip.clone();
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                let dropped = skip.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
                if dropped {
                    gst::PadProbeReturn::Drop
                } else {
                    gst::PadProbeReturn::Ok
                }
            });
        }
        match show {
            Show::Window { title, width, height } => {
                let scale = make("videoscale")?;
                let filter = make("capsfilter")?;
                if width > 0 && height > 0 {
                    filter.set_property("caps", window_caps(width, height));
                }
                let sink = make("autovideosink")?;
                p.pipeline.add_many([&scale, &filter, &sink]).map_err(|e| e.to_string())?;
                gst::Element::link_many([&convert, &scale, &filter, &sink]).map_err(|e| e.to_string())?;
                // The window's title: ximagesink and its kind take it from a title tag.
                let tags = {
                    let mut t = gst::TagList::new();
                    if let Some(t) = t.get_mut() {
                        t.add::<gst::tags::Title>(&title.as_str(), gst::TagMergeMode::Replace);
                    }
                    t
                };
                let shown = Arc::new(std::sync::atomic::AtomicBool::new(false));
                if let Some(pad) = filter.static_pad("src") {
                    let shown = shown.clone();
                    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, _| {
                        pad.push_event(gst::event::Tag::new(tags.clone()));
                        shown.store(true, Ordering::Relaxed);
                        gst::PadProbeReturn::Remove
                    });
                }
                size = Some((filter, shown));
            }
            Show::Frames(log) => {
                let caps = gst::Caps::builder("video/x-raw").field("format", "I420").build();
                let sink = gst_app::AppSink::builder().caps(&caps).sync(true).max_buffers(4).build();
                p.pipeline.add(sink.upcast_ref::<gst::Element>()).map_err(|e| e.to_string())?;
                convert.link(&sink).map_err(|e| e.to_string())?;
                let offset = guest_offset.clone();
                let mut n = 0u64;
                sink.set_callbacks(
                    gst_app::AppSinkCallbacks::builder()
                        .new_sample(move |sink| {
                            let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                            let shown_ns = melange_shim::clock::monotonic_ns();
                            let (w, h) = sample
                                .caps()
                                .and_then(|c| c.structure(0).map(|s| (s.get::<i32>("width"), s.get::<i32>("height"))))
                                .and_then(|(w, h)| {
                                    Some((usize::try_from(w.ok()?).ok()?, usize::try_from(h.ok()?).ok()?))
                                })
                                .unwrap_or((0, 0));
                            let Some(buffer) = sample.buffer() else { return Ok(gst::FlowSuccess::Ok) };
                            let Ok(map) = buffer.map_readable() else { return Ok(gst::FlowSuccess::Ok) };
                            let digest = i420_digest(map.as_slice(), w, h);
                            let host_pts = buffer.pts().map_or(0, gst::ClockTime::nseconds)
                                + sink.base_time().map_or(0, gst::ClockTime::nseconds);
                            let pts_ns = (host_pts as i64).wrapping_sub(offset.load(Ordering::Relaxed) as i64);
                            let mut q = gst::query::Latency::new();
                            let latency_ns = sink.query(&mut q).then(|| q.result().1.nseconds());
                            log.line(&serde_json::json!({"event": "frame", "n": n, "pts_ns": pts_ns,
                                "shown_ns": shown_ns, "latency_ns": latency_ns, "width": w, "height": h,
                                "fnv": digest.map(|d| d.0), "luma": digest.map(|d| (d.1 * 10.0).round() / 10.0)}));
                            n += 1;
                            Ok(gst::FlowSuccess::Ok)
                        })
                        .build(),
                );
            }
        }
        p.start()?;
        Ok(Self { p, anchor: Anchor::default(), guest_offset, skip, size })
    }

    /// Queues an access unit that arrived at `arrival_ns` (`CLOCK_MONOTONIC`); false
    /// when it was dropped (the decoder fell behind).
    pub fn push(&mut self, arrival_ns: u64, au: &AccessUnit) -> bool {
        if au.flags & au_flags::DISCONTINUITY != 0 {
            self.anchor.reset();
        }
        // A decode-only unit came at once, not at its time: it says nothing of the
        // clocks' offset, and is not shown anyway.
        let offset = if au.flags & au_flags::DECODE_ONLY != 0 {
            self.skip.fetch_add(1, Ordering::Relaxed);
            self.anchor.offset().unwrap_or(arrival_ns as i64 - au.dts() as i64)
        } else {
            self.anchor.update(arrival_ns, au.dts())
        };
        self.guest_offset.store(offset as u64, Ordering::Relaxed);
        let base = self.p.pipeline.base_time().map_or(0, gst::ClockTime::nseconds) as i64;
        let running = |t: u64| (t as i64 + offset - base).max(0) as u64;
        self.p.push(au, running(au.pts_ns), running(au.dts()))
    }

    /// Follows the player's controls: a flush (a seek) drops what the decoder holds.
    pub fn control(&mut self, control: StreamControl) {
        match control {
            StreamControl::Flush => {
                self.anchor.reset();
                self.p.src.send_event(gst::event::FlushStart::new());
                self.p.src.send_event(gst::event::FlushStop::new(false));
                self.skip.store(0, Ordering::Relaxed);
            }
            StreamControl::Resume => self.anchor.reset(),
            StreamControl::Geometry(g) => {
                // Before the first frame the window is made at this size; after, its
                // video sink keeps the window it has (the user can resize it).
                if let Some((filter, shown)) = &self.size {
                    if !shown.load(Ordering::Relaxed) {
                        filter.set_property("caps", window_caps(g.width, g.height));
                    }
                }
            }
            StreamControl::EndOfStream | StreamControl::Pause | StreamControl::KeyframeRequest => {}
        }
    }

    /// How long after its (mapped) decoding time a frame is shown: the pipeline's
    /// latency (the decoder's reordering and its own), once it is known.
    pub fn render_delay_ns(&self) -> Option<u64> {
        let mut q = gst::query::Latency::new();
        if !self.p.pipeline.query(&mut q) {
            return None;
        }
        let (live, min, _max) = q.result();
        live.then_some(min.nseconds())
    }

    /// The first decoding error since the last call.
    pub fn error(&self) -> Option<String> {
        self.p.error()
    }

    /// Stops decoding.
    pub fn stop(&self) {
        self.p.stop();
    }

    /// Shows what is queued, then stops, on a thread of its own (a frame is shown at
    /// its time: up to the stream's latency from now).
    pub fn finish(self) -> Option<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("melange-video-end".into())
            .spawn(move || self.p.finish(Duration::from_secs(1)))
            .ok()
    }
}

/// Decoded audio for the host thread: interleaved f32 and the guest time of its first
/// sample.
#[derive(Debug)]
pub struct Decoded {
    /// Samples, interleaved.
    pub samples: Vec<f32>,
    /// The first sample's presentation time on the guest's clock, ns.
    pub pts_ns: u64,
}

/// An audio stream's decoder. See the module docs.
pub struct AudioDecoder {
    p: Pipeline,
    rx: crossbeam_channel::Receiver<Decoded>,
    /// The guest time the appsrc's timeline starts at.
    origin_ns: Option<u64>,
}

impl std::fmt::Debug for AudioDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioDecoder").finish()
    }
}

impl AudioDecoder {
    /// Builds and starts the pipeline for `open`, decoding to `format`; `wake` is
    /// called whenever decoded audio is ready.
    pub fn new(
        open: &StreamOpen,
        format: &AudioFormat,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let (p, decodebin) = Pipeline::new(open, false)?;
        let convert = make("audioconvert")?;
        let resample = make("audioresample")?;
        let caps = gst::Caps::builder("audio/x-raw")
            .field("format", "F32LE")
            .field("layout", "interleaved")
            .field("rate", format.rate.min(i32::MAX as u32) as i32)
            .field("channels", i32::from(format.channels))
            .build();
        let sink = gst_app::AppSink::builder().caps(&caps).sync(false).build();
        p.pipeline.add_many([&convert, &resample, sink.upcast_ref()]).map_err(|e| e.to_string())?;
        gst::Element::link_many([&convert, &resample, sink.upcast_ref()]).map_err(|e| e.to_string())?;
        Pipeline::link_decoded(&decodebin, "audio/", convert.static_pad("sink").ok_or("audioconvert without a pad")?);
        let (tx, rx) = crossbeam_channel::bounded::<Decoded>(256);
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let Some(buffer) = sample.buffer() else { return Ok(gst::FlowSuccess::Ok) };
                    let Ok(map) = buffer.map_readable() else { return Ok(gst::FlowSuccess::Ok) };
                    let samples =
                        map.as_slice().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    let pts_ns = buffer.pts().map_or(0, gst::ClockTime::nseconds);
                    // A full channel: the host thread is gone or far behind; drop.
                    let _ = tx.try_send(Decoded { samples, pts_ns });
                    wake();
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        p.start()?;
        Ok(Self { p, rx, origin_ns: None })
    }

    /// A flush (a seek): drops what the decoder holds and what it decoded, and takes
    /// the next unit's time as the new origin (a seek back goes before the old one).
    pub fn flush(&mut self) {
        self.p.src.send_event(gst::event::FlushStart::new());
        self.p.src.send_event(gst::event::FlushStop::new(false));
        while self.rx.try_recv().is_ok() {}
        self.origin_ns = None;
    }

    /// Queues an access unit; false when it was dropped (the decoder fell behind).
    /// Decode-only units are left out: audio units decode on their own.
    pub fn push(&mut self, au: &AccessUnit) -> bool {
        if au.flags & au_flags::DECODE_ONLY != 0 {
            return true;
        }
        let origin = *self.origin_ns.get_or_insert(au.pts_ns);
        self.p.push(au, au.pts_ns.saturating_sub(origin), au.dts().saturating_sub(origin))
    }

    /// Decoded audio ready now, with guest times.
    pub fn take(&self) -> impl Iterator<Item = Decoded> + '_ {
        let origin = self.origin_ns.unwrap_or(0);
        self.rx.try_iter().map(move |mut d| {
            d.pts_ns += origin;
            d
        })
    }

    /// The first decoding error since the last call.
    pub fn error(&self) -> Option<String> {
        self.p.error()
    }

    /// Stops decoding.
    pub fn stop(&self) {
        self.p.stop();
    }

    /// Decodes what is queued (waiting at most `wait`: on the host's thread), then
    /// stops; what came out is still in [`AudioDecoder::take`].
    pub fn finish(&self, wait: Duration) {
        self.p.finish(wait);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Debian's software decoders (gst-libav, which scripts/setup installs) take every
    /// profile of H.264 and H.265; a profile bit never comes without its codec's.
    #[test]
    fn profile_bits_follow_the_decoders_and_never_come_alone() {
        init().unwrap();
        let all = decodable(codec_bits::ENCODED);
        for codec in [codec_bits::H264, codec_bits::H265] {
            assert_ne!(all & codec, 0, "a decoder for {codec:#x}");
            assert_ne!(all & codec_bits::profiles_of(codec), 0, "every profile of {codec:#x}");
        }
        assert_eq!(decodable(codec_bits::PROFILES), 0, "profile bits alone");
        assert_eq!(decodable(codec_bits::H264_HIGH_PROFILES | codec_bits::VP8), decodable(codec_bits::VP8));
    }

    #[test]
    fn the_anchor_takes_the_least_trip_and_follows_drift() {
        let mut a = Anchor::default();
        // Trips of 5, 2, 9 ms: the offset is the least.
        assert_eq!(a.update(1_005, 1_000), 5);
        assert_eq!(a.update(2_002, 2_000), 2);
        assert_eq!(a.update(3_009, 3_000), 2);
        // The guest's clock runs slow by 1 per unit: two windows later the offset grew.
        let mut a = Anchor::default();
        let mut last = 0;
        for i in 0..(3 * ANCHOR_WINDOW as u64) {
            last = a.update(1000 * i + i, 1000 * i);
        }
        assert!(last >= i64::from(ANCHOR_WINDOW), "{last}");
        a.reset();
        assert_eq!(a.offset(), None);
    }

    #[test]
    fn i420_digest_reads_visible_pixels_only() {
        // 6x2: rows of 6 luma bytes in strides of 8, chroma 3 in strides of 4.
        let (w, h) = (6usize, 2usize);
        let mut frame = vec![0xEEu8; 8 * 2 + 4 + 4];
        for r in 0..h {
            for c in 0..w {
                frame[r * 8 + c] = 100;
            }
        }
        let (h1, luma) = i420_digest(&frame, w, h).unwrap();
        assert!((luma - 100.0).abs() < 1e-9);
        frame[6] = 1; // padding
        assert_eq!(i420_digest(&frame, w, h).unwrap().0, h1);
        frame[0] = 1; // a pixel
        assert_ne!(i420_digest(&frame, w, h).unwrap().0, h1);
        assert!(i420_digest(&frame[..10], w, h).is_none());
    }
}
