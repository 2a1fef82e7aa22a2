//! The virtual camera: a `Video/Source` stream of this process, `sink.name` +
//! `.camera` ("Melange camera"), the default camera by its priority. It hands its
//! consumers the host camera's frames while the host sends them, and nothing without
//! them: a consumer waits for its next frame, never an error, never another device.
//! Why nothing comes is on its node (`melange.camera.status`).

use melange_pw::video::{FrameSlot, PixelFormat, RawVideo, VideoSource};
use pipewire as pw;
use pw::properties::properties;

use crate::config::Config;
use crate::stream::{new_stream, update_properties};

/// The camera's format: raw I420 at the common video-call size and rate.
pub(crate) const CAMERA_VIDEO: RawVideo = RawVideo { width: 640, height: 360, fps: 30 };

/// The layouts apps may ask for, the frames' own first: NV12 for hardware encoders, YUY2
/// for V4L2 apps (most ask for it first).
const CAMERA_FORMATS: [PixelFormat; 3] = [PixelFormat::I420, PixelFormat::Nv12, PixelFormat::Yuy2];
/// The sizes apps may ask for besides [`CAMERA_VIDEO`]'s own (which they get unless
/// they ask otherwise): the usual camera sizes. Another aspect is cropped at the
/// centre; a larger size is scaled up from 640x360.
const CAMERA_SIZES: [(u32, u32); 5] = [(1280, 720), (960, 540), (640, 480), (320, 240), (320, 180)];

/// [`CAMERA_VIDEO`] as the protocol says it: what the guest takes from the host.
pub(crate) fn camera_format() -> melange_transport::message::VideoFormat {
    melange_transport::message::VideoFormat {
        width: CAMERA_VIDEO.width,
        height: CAMERA_VIDEO.height,
        framerate_num: CAMERA_VIDEO.fps,
        framerate_den: 1,
    }
}

/// The virtual camera, open on the session's PipeWire.
pub(crate) struct CameraSource {
    source: VideoSource<pw::stream::StreamBox<'static>>,
    published: Vec<(&'static str, String)>,
}

impl CameraSource {
    /// Makes the camera on `core`, showing the frames put in `frames` (woken on
    /// `main_loop`).
    pub(crate) fn create(
        core: &pw::core::Core,
        main_loop: &'static pw::loop_::Loop,
        config: &Config,
        frames: FrameSlot,
    ) -> Result<CameraSource, String> {
        let name = config.camera_name();
        let description = format!("{} camera", config.sink_description);
        let props = properties! {
            "media.type" => "Video",
            "media.category" => "Capture",
            "media.role" => "Camera",
            "media.class" => "Video/Source",
            "node.name" => name.as_str(),
            "node.description" => description.as_str(),
            "priority.session" => "2000",
            // WirePlumber 0.4.13's idle-suspend timer outlives a suspended node that
            // goes away and crashes the session manager (DESIGN): never suspend it.
            "session.suspend-timeout-seconds" => "0",
        };
        let stream =
            new_stream(core, "melange-camera", props).map_err(|e| format!("cannot create the camera's stream: {e}"))?;
        let source =
            VideoSource::start_offering(stream, main_loop, CAMERA_VIDEO, &CAMERA_FORMATS, &CAMERA_SIZES, frames)?;
        log::info!("melange: created the camera {name} (\"{description}\")");
        let mut camera = CameraSource { source, published: Vec::new() };
        camera.set_status("no host connected");
        Ok(camera)
    }

    /// Says on the node why frames do (not) come: `melange.camera.status`.
    pub(crate) fn set_status(&mut self, status: &str) {
        update_properties(
            self.source.stream(),
            vec![("melange.camera.status", status.to_owned())],
            &mut self.published,
        );
    }
}
