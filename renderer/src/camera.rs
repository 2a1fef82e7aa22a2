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
//! thread is woken, and the frame goes to the guest whole, raw, as one access unit of
//! the camera stream ([`CAMERA_VIDEO`]). A camera that already gives I420 at that size
//! passes through unconverted, byte for byte.

use std::str::FromStr;
use std::sync::Arc;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use melange_transport::message::{AppInfo, Codec, MediaKind, StreamOpen, VideoFormat};
use melange_transport::port::Waker;

/// What the guest's camera shows: raw I420, the common video-call size and rate.
pub const CAMERA_VIDEO: VideoFormat = VideoFormat { width: 640, height: 360, framerate_num: 30, framerate_den: 1 };
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

/// Whether this machine can capture a camera at all: GStreamer and its PipeWire
/// source are there. The error says what to install.
pub fn available() -> Result<(), String> {
    crate::decode::init()?;
    for element in ["pipewiresrc", "videoconvert", "videoscale", "videorate", "appsink"] {
        if gst::ElementFactory::find(element).is_none() {
            return Err(format!(
                "GStreamer has no {element} here (install gstreamer1.0-pipewire and gstreamer1.0-plugins-base)"
            ));
        }
    }
    Ok(())
}

/// The announcement of the camera stream to the guest.
pub fn stream_open() -> StreamOpen {
    StreamOpen {
        media: MediaKind::Camera(CAMERA_VIDEO),
        codec: Codec::RawI420,
        frame_samples: 0,
        app: AppInfo { name: "Camera".into(), role: "Camera".into(), ..AppInfo::default() },
        codec_data: Vec::new(),
    }
}

/// A frame as captured: its bytes and when it reached melange-host, on
/// `CLOCK_MONOTONIC`.
#[derive(Debug)]
pub struct Captured {
    /// [`frame_bytes`] of I420.
    pub data: Vec<u8>,
    /// ns.
    pub at_ns: u64,
}

/// A running capture. Dropping it stops the camera (off the caller's thread).
pub struct CameraCapture {
    pipeline: gst::Pipeline,
    source: gst::Element,
    frames: crossbeam_channel::Receiver<Captured>,
    /// The starting thread's word: pipewiresrc's start waits until a camera is linked,
    /// forever if there is none.
    started: crossbeam_channel::Receiver<Result<(), String>>,
}

impl std::fmt::Debug for CameraCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraCapture").finish_non_exhaustive()
    }
}

impl CameraCapture {
    /// Starts capturing `spec` (not [`CameraSpec::None`]); each frame wakes `waker`.
    pub fn open(spec: &CameraSpec, waker: Waker) -> Result<Self, String> {
        let target = match spec {
            CameraSpec::None => return Err("no camera (--camera none)".into()),
            CameraSpec::Default => None,
            CameraSpec::Named(n) => Some(n.as_str()),
        };
        available()?;
        let make = |name: &str| {
            gst::ElementFactory::make(name).build().map_err(|e| format!("cannot make GStreamer's {name}: {e}"))
        };
        let source = make("pipewiresrc")?;
        let mut props = gst::Structure::builder("props")
            .field("node.name", "melange.camera")
            .field("node.description", "Guest camera")
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
        let sink = gst_app::AppSink::builder().caps(&caps).sync(false).max_buffers(2).drop(true).build();
        let pipeline = gst::Pipeline::with_name("melange-camera");
        let elements = [&source, &convert, &scale, &rate, sink.upcast_ref()];
        pipeline.add_many(elements).map_err(|e| e.to_string())?;
        gst::Element::link_many(elements).map_err(|e| format!("cannot link the camera's pipeline: {e}"))?;
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let waker = Arc::new(waker);
        let expected = frame_bytes();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let Some(buffer) = sample.buffer() else { return Ok(gst::FlowSuccess::Ok) };
                    let Ok(map) = buffer.map_readable() else { return Ok(gst::FlowSuccess::Ok) };
                    // Default strides at this size pack the planes; anything else is not a frame.
                    if map.len() == expected {
                        let at_ns = melange_shim::clock::monotonic_ns();
                        if tx.try_send(Captured { data: map.to_vec(), at_ns }).is_ok() {
                            waker.wake();
                        }
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
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
            })
            .map_err(|e| format!("cannot start the camera's thread: {e}"))?;
        Ok(Self { pipeline, source, frames: rx, started })
    }

    /// The frames captured since the last call, oldest first, or why the capture
    /// failed (it is then useless and should be dropped).
    pub fn poll(&mut self) -> Result<Vec<Captured>, String> {
        if let Ok(Err(why)) = self.started.try_recv() {
            return Err(why);
        }
        if let Some(why) = bus_error(&self.pipeline) {
            return Err(why);
        }
        Ok(self.frames.try_iter().collect())
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
    fn a_frame_is_the_packed_i420_of_the_cameras_size() {
        assert_eq!(frame_bytes(), 640 * 360 * 3 / 2);
        let open = stream_open();
        assert_eq!(open.media, MediaKind::Camera(CAMERA_VIDEO));
        assert_eq!(open.codec, Codec::RawI420);
    }
}
