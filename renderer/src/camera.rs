//! The user's camera for the guest, opened only while a guest app captures.
//!
//! The guest says when an app starts and stops capturing from its virtual camera
//! (`CaptureDemand { device: Camera }`); only then does melange-host hold a capture of
//! the host's camera, so the camera's light tells the truth. The capture is a
//! GStreamer pipeline of its own:
//!
//! ```text
//! pipewiresrc [target-object=NAME] ! videoconvert ! videoscale ! videorate drop-only=true
//!   ! video/x-raw,format=I420,width=640,height=360,pixel-aspect-ratio=1/1 ! appsink
//! ```
//!
//! Each frame is copied off the streaming thread into a short queue, the session
//! thread is woken, and the frame goes to the guest whole, as one access unit of the
//! camera stream ([`CAMERA_VIDEO`]): raw by default (a camera that already gives I420
//! at that size passes through byte for byte), or encoded with `--camera-codec`
//! (`vp8enc` or `x264enc`/`openh264enc` after the caps filter, real-time settings, a
//! keyframe at least every 2 s and whenever the guest or a dropped frame asks).

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use melange_transport::message::{AppInfo, Codec, MediaKind, StreamOpen, VideoFormat};
use melange_transport::port::Waker;

/// What the guest's camera shows: raw I420, the common video-call size and rate.
pub const CAMERA_VIDEO: VideoFormat = VideoFormat { width: 640, height: 360, framerate_num: 30, framerate_den: 1 };
/// Bits per second of an encoded camera stream: 640x360 at 30 fps, a video call's rate.
pub const CAMERA_BITRATE: u32 = 2_000_000;
/// Frames between keyframes at most (2 s).
const KEYFRAME_DISTANCE: u32 = 60;

/// `--camera-codec`: how the camera's frames go to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraCodec {
    /// Raw I420, 10.4 MB/s: where the port is local.
    Raw,
    /// VP8 at [`CAMERA_BITRATE`], decoded in the guest.
    Vp8,
    /// H.264 Constrained Baseline at [`CAMERA_BITRATE`], decoded in the guest.
    H264,
}

impl FromStr for CameraCodec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(CameraCodec::Raw),
            "vp8" => Ok(CameraCodec::Vp8),
            "h264" => Ok(CameraCodec::H264),
            other => Err(format!("--camera-codec takes raw, vp8 or h264, not {other:?}")),
        }
    }
}

impl CameraCodec {
    /// The protocol's codec.
    pub fn codec(self) -> Codec {
        match self {
            CameraCodec::Raw => Codec::RawI420,
            CameraCodec::Vp8 => Codec::Vp8,
            CameraCodec::H264 => Codec::H264,
        }
    }

    /// The GStreamer encoder used, the first of these found.
    fn encoders(self) -> &'static [&'static str] {
        match self {
            CameraCodec::Raw => &[],
            CameraCodec::Vp8 => &["vp8enc"],
            CameraCodec::H264 => &["x264enc", "openh264enc"],
        }
    }
}

impl std::fmt::Display for CameraCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CameraCodec::Raw => f.write_str("raw I420"),
            CameraCodec::Vp8 => write!(f, "VP8 {} kbit/s", CAMERA_BITRATE / 1000),
            CameraCodec::H264 => write!(f, "H.264 {} kbit/s", CAMERA_BITRATE / 1000),
        }
    }
}

/// Frames waiting for the session thread; beyond it the newest is dropped (the
/// session thread is late by more than 100 ms).
const QUEUE: usize = 3;

/// `--camera`: which host camera the guest's virtual camera shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraSpec {
    /// The host's default camera (WirePlumber's choice).
    Default,
    /// This camera (a `Video/Source` node's `node.name`, or an `object.serial`); never another.
    Named(String),
    /// None: the guest's camera stays dark.
    None,
}

impl FromStr for CameraSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("empty --camera: give default, none or a camera's node.name".into()),
            "default" => Ok(CameraSpec::Default),
            "none" => Ok(CameraSpec::None),
            name if name.chars().any(char::is_control) => Err("--camera NAME has control characters".into()),
            name => Ok(CameraSpec::Named(name.into())),
        }
    }
}

impl std::fmt::Display for CameraSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CameraSpec::Default => f.write_str("the default camera"),
            CameraSpec::Named(n) => write!(f, "camera {n}"),
            CameraSpec::None => f.write_str("no camera (--camera none)"),
        }
    }
}

/// Bytes of one frame of [`CAMERA_VIDEO`].
pub fn frame_bytes() -> usize {
    let (w, h) = (CAMERA_VIDEO.width as usize, CAMERA_VIDEO.height as usize);
    w * h + 2 * (w.div_ceil(2) * h.div_ceil(2))
}

/// Whether this machine can capture a camera and send it as `codec`: GStreamer, its
/// PipeWire source and the encoder are there. The error says what to install.
pub fn available(codec: CameraCodec) -> Result<(), String> {
    crate::decode::init()?;
    for element in ["pipewiresrc", "videoconvert", "videoscale", "videorate", "appsink"] {
        if gst::ElementFactory::find(element).is_none() {
            return Err(format!(
                "GStreamer has no {element} here (install gstreamer1.0-pipewire and gstreamer1.0-plugins-base)"
            ));
        }
    }
    let encoders = codec.encoders();
    if !encoders.is_empty() && !encoders.iter().any(|e| gst::ElementFactory::find(e).is_some()) {
        return Err(format!(
            "GStreamer has no {} here for --camera-codec (install gstreamer1.0-plugins-good for VP8, \
             gstreamer1.0-plugins-ugly or -bad for H.264)",
            encoders.join(" or ")
        ));
    }
    Ok(())
}

/// The encoder for `codec` (not raw), set for a live call, and the caps after it.
fn encoder(codec: CameraCodec) -> Result<(gst::Element, Option<gst::Caps>), String> {
    let name = codec
        .encoders()
        .iter()
        .find(|e| gst::ElementFactory::find(e).is_some())
        .ok_or_else(|| format!("no encoder for {codec}"))?;
    let e = gst::ElementFactory::make(name).build().map_err(|e| format!("cannot make GStreamer's {name}: {e}"))?;
    let set = |k: &str, v: &str| {
        if e.find_property(k).is_some() {
            e.set_property_from_str(k, v);
        }
    };
    let (bitrate, kbit, distance) =
        (CAMERA_BITRATE.to_string(), (CAMERA_BITRATE / 1000).to_string(), KEYFRAME_DISTANCE.to_string());
    let caps = match *name {
        "vp8enc" => {
            set("deadline", "1");
            set("cpu-used", "8");
            set("end-usage", "cbr");
            set("target-bitrate", &bitrate);
            set("keyframe-max-dist", &distance);
            set("lag-in-frames", "0");
            set("threads", "2");
            set("error-resilient", "default");
            None
        }
        "x264enc" => {
            set("tune", "zerolatency");
            set("speed-preset", "ultrafast");
            set("bitrate", &kbit);
            set("key-int-max", &distance);
            set("byte-stream", "true");
            Some(
                gst::Caps::builder("video/x-h264")
                    .field("profile", "constrained-baseline")
                    .field("stream-format", "byte-stream")
                    .field("alignment", "au")
                    .build(),
            )
        }
        _ => {
            set("bitrate", &bitrate);
            set("gop-size", &distance);
            set("rate-control", "bitrate");
            Some(
                gst::Caps::builder("video/x-h264")
                    .field("stream-format", "byte-stream")
                    .field("alignment", "au")
                    .build(),
            )
        }
    };
    Ok((e, caps))
}

/// The announcement of the camera stream to the guest.
pub fn stream_open(codec: CameraCodec) -> StreamOpen {
    StreamOpen {
        media: MediaKind::Camera(CAMERA_VIDEO),
        codec: codec.codec(),
        frame_samples: 0,
        app: AppInfo { name: "Camera".into(), role: "Camera".into(), ..AppInfo::default() },
        codec_data: Vec::new(),
    }
}

/// A frame as captured: its bytes and when it reached melange-host, on
/// `CLOCK_MONOTONIC`.
#[derive(Debug)]
pub struct Captured {
    /// [`frame_bytes`] of I420, or the encoded frame.
    pub data: Vec<u8>,
    /// ns.
    pub at_ns: u64,
    /// Decodable on its own (every raw frame is).
    pub keyframe: bool,
}

/// A running capture. Dropping it stops the camera (off the caller's thread).
pub struct CameraCapture {
    pipeline: gst::Pipeline,
    source: gst::Element,
    /// Where keyframe requests go in (upstream from here), for an encoded stream.
    sink: Option<gst::Element>,
    frames: crossbeam_channel::Receiver<Captured>,
    /// The starting thread's word: pipewiresrc's start waits until a camera is linked
    /// (0.3.65 gives up after 30 s).
    started: crossbeam_channel::Receiver<Result<(), String>>,
    /// A frame was dropped since the last poll (the session thread was late).
    lost: Arc<AtomicBool>,
    /// Frames of another size or layout than packed I420 at [`CAMERA_VIDEO`], dropped.
    odd: Arc<AtomicU64>,
}

impl std::fmt::Debug for CameraCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraCapture").finish_non_exhaustive()
    }
}

impl CameraCapture {
    /// Starts capturing `spec` (not [`CameraSpec::None`]) as `codec`; each frame wakes
    /// `waker`.
    pub fn open(spec: &CameraSpec, codec: CameraCodec, waker: Waker) -> Result<Self, String> {
        let target = match spec {
            CameraSpec::None => return Err("no camera (--camera none)".into()),
            CameraSpec::Default => None,
            CameraSpec::Named(n) => Some(n.as_str()),
        };
        available(codec)?;
        let make = |name: &str| {
            gst::ElementFactory::make(name).build().map_err(|e| format!("cannot make GStreamer's {name}: {e}"))
        };
        let source = make("pipewiresrc")?;
        let mut props = gst::Structure::builder("props")
            // Not the guest's camera's name: a guest and its host may share a PipeWire.
            .field("node.name", "melange-host.camera")
            .field("node.description", "Camera for the guest")
            .field("application.name", "Melange")
            .field("media.role", "Camera");
        if let Some(target) = target {
            if source.find_property("target-object").is_none() {
                return Err("this GStreamer PipeWire source cannot pick a camera by name (no target-object)".into());
            }
            source.set_property("target-object", target);
            // That camera or none: never another by fallback.
            props = props.field("node.dont-reconnect", "true").field("node.dont-fallback", "true");
        }
        if source.find_property("stream-properties").is_some() {
            source.set_property("stream-properties", props.build());
        }
        let convert = make("videoconvert")?;
        let scale = make("videoscale")?;
        let rate = make("videorate")?;
        rate.set_property("drop-only", true);
        let caps = gst::Caps::builder("video/x-raw")
            .field("format", "I420")
            .field("width", CAMERA_VIDEO.width as i32)
            .field("height", CAMERA_VIDEO.height as i32)
            .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
            .build();
        let max_rate = CAMERA_VIDEO.framerate_num / CAMERA_VIDEO.framerate_den.max(1);
        rate.set_property("max-rate", max_rate as i32);
        let filter = make("capsfilter")?;
        filter.set_property("caps", &caps);
        let mut elements = vec![source.clone(), convert, scale, rate, filter];
        let mut sink_caps = caps;
        if codec != CameraCodec::Raw {
            let (enc, enc_caps) = encoder(codec)?;
            elements.push(enc);
            if let Some(c) = enc_caps {
                let f = make("capsfilter")?;
                f.set_property("caps", &c);
                elements.push(f);
                sink_caps = c;
            } else {
                sink_caps = gst::Caps::new_any();
            }
        }
        let sink = gst_app::AppSink::builder().caps(&sink_caps).sync(false).max_buffers(2).drop(true).build();
        elements.push(sink.clone().upcast());
        let pipeline = gst::Pipeline::with_name("melange-camera");
        pipeline.add_many(&elements).map_err(|e| e.to_string())?;
        gst::Element::link_many(&elements).map_err(|e| format!("cannot link the camera's pipeline: {e}"))?;
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let (bus_waker, start_waker) = (waker.try_clone().ok(), waker.try_clone().ok());
        let waker = Arc::new(waker);
        let (lost, odd) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (lost_in, odd_in) = (lost.clone(), odd.clone());
        let expected = (codec == CameraCodec::Raw).then(frame_bytes);
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let Some(buffer) = sample.buffer() else { return Ok(gst::FlowSuccess::Ok) };
                    let Ok(map) = buffer.map_readable() else { return Ok(gst::FlowSuccess::Ok) };
                    // Default strides at this size pack the planes; anything else is not a frame.
                    if expected.is_none_or(|e| map.len() == e) && !map.is_empty() {
                        let at_ns = melange_shim::clock::monotonic_ns();
                        let keyframe = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
                        if tx.try_send(Captured { data: map.to_vec(), at_ns, keyframe }).is_err() {
                            lost_in.store(true, Ordering::Relaxed);
                        }
                        waker.wake();
                    } else {
                        odd_in.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        // Errors wake the session thread too, so a failure is seen at once.
        if let (Some(bus), Some(w)) = (pipeline.bus(), bus_waker) {
            bus.set_sync_handler(move |_, msg| {
                if matches!(msg.view(), gst::MessageView::Error(_)) {
                    w.wake();
                }
                gst::BusSyncReply::Pass
            });
        }
        let (started_tx, started) = crossbeam_channel::bounded(1);
        let starting = pipeline.clone();
        std::thread::Builder::new()
            .name("melange-camera-start".into())
            .spawn(move || {
                let result = starting.set_state(gst::State::Playing).map(drop).map_err(|e| {
                    let why = bus_error(&starting).unwrap_or_else(|| e.to_string());
                    format!("cannot start the camera's capture: {why}")
                });
                let _ = started_tx.send(result);
                if let Some(w) = start_waker {
                    w.wake();
                }
            })
            .map_err(|e| format!("cannot start the camera's thread: {e}"))?;
        let sink = (codec != CameraCodec::Raw).then(|| sink.upcast());
        Ok(Self { pipeline, source, sink, frames: rx, started, lost, odd })
    }

    /// Asks the encoder for a keyframe (the guest lost one, or a frame was dropped);
    /// nothing for raw frames, every one of which is a keyframe.
    pub fn request_keyframe(&self) {
        if let Some(sink) = &self.sink {
            let s = gst::Structure::builder("GstForceKeyUnit").field("all-headers", true).build();
            sink.send_event(gst::event::CustomUpstream::new(s));
        }
    }

    /// The frames captured since the last call, oldest first, and whether one was lost
    /// before them; or why the capture failed (it is then useless and should be dropped).
    pub fn poll(&mut self) -> Result<(Vec<Captured>, bool), String> {
        if let Ok(Err(why)) = self.started.try_recv() {
            return Err(why);
        }
        if let Some(why) = bus_error(&self.pipeline) {
            return Err(why);
        }
        let frames: Vec<Captured> = self.frames.try_iter().collect();
        let odd = self.odd.load(Ordering::Relaxed);
        if frames.is_empty() && odd > 0 {
            return Err(format!("{odd} frames came in another layout than packed I420 at 640x360"));
        }
        Ok((frames, self.lost.swap(false, Ordering::Relaxed)))
    }
}

impl Drop for CameraCapture {
    fn drop(&mut self) {
        // On a thread of its own: pipewiresrc's teardown waits for PipeWire, and the
        // session thread must not. A start still waiting for a camera is woken first
        // (flushing ends pipewiresrc's wait), or the stop would wait behind it.
        let (pipeline, source) = (self.pipeline.clone(), self.source.clone());
        let stop = move || {
            source.send_event(gst::event::FlushStart::new());
            let _ = pipeline.set_state(gst::State::Null);
        };
        let spawned = std::thread::Builder::new().name("melange-camera-stop".into()).spawn(stop.clone());
        if spawned.is_err() {
            stop();
        }
    }
}

/// The first error on `pipeline`'s bus, with GStreamer's details, if any. Every
/// message waiting is taken, so the bus never grows.
fn bus_error(pipeline: &gst::Pipeline) -> Option<String> {
    let bus = pipeline.bus()?;
    let mut error = None;
    while let Some(msg) = bus.pop() {
        if let (gst::MessageView::Error(e), None) = (msg.view(), &error) {
            error = Some(match e.debug() {
                Some(d) => format!("{} ({d})", e.error()),
                None => e.error().to_string(),
            });
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_camera_specs() {
        assert_eq!("default".parse(), Ok(CameraSpec::Default));
        assert_eq!("none".parse(), Ok(CameraSpec::None));
        assert_eq!("v4l2_input.usb".parse(), Ok(CameraSpec::Named("v4l2_input.usb".into())));
        assert!("".parse::<CameraSpec>().is_err());
        assert!("a\nb".parse::<CameraSpec>().is_err());
    }

    #[test]
    fn parses_camera_codecs() {
        assert_eq!("raw".parse(), Ok(CameraCodec::Raw));
        assert_eq!("vp8".parse(), Ok(CameraCodec::Vp8));
        assert_eq!("h264".parse(), Ok(CameraCodec::H264));
        assert!("VP8".parse::<CameraCodec>().is_err());
        assert!("".parse::<CameraCodec>().is_err());
        assert_eq!(CameraCodec::H264.codec(), Codec::H264);
    }

    #[test]
    fn a_frame_is_the_packed_i420_of_the_cameras_size() {
        assert_eq!(frame_bytes(), 640 * 360 * 3 / 2);
        let open = stream_open(CameraCodec::Raw);
        assert_eq!(open.media, MediaKind::Camera(CAMERA_VIDEO));
        assert_eq!(open.codec, Codec::RawI420);
    }
}
