//! The guest's end of the user's camera: what the guest core does for the virtual
//! camera ("Melange camera").
//!
//! The module watches the links out of its camera node and tells the link whether any
//! app captures ([`CameraReceiver::set_wanted`]); the link tells the host
//! (`CaptureDemand { device: Camera }`) at every change and at the start of every
//! session. The host answers with a camera stream of its own: one access unit a frame,
//! raw I420 at the size the virtual camera offers, or VP8 or H.264 (`--camera-codec`)
//! for the [`CameraSink`] to decode. [`CameraReceiver`] checks the stream and every
//! raw frame and hands them to the sink.
//! What the node should say about it is [`CameraReceiver::status`]: why no frames
//! come, or that they do.
//!
//! Sans-IO: tested with made-up streams; frames are moved, never copied.

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use melange_transport::message::{AccessUnit, Capabilities, Codec, MediaKind, StreamOpen, VideoFormat};

/// What shows the host's frames: the virtual camera, behind a decoder for encoded
/// streams. Called on the guest thread, in order.
pub trait CameraSink: Send {
    /// The codecs of encoded camera streams it decodes, as `codec_bits`.
    fn decodes(&self) -> u64;
    /// A stream of `codec` starts: raw I420, or one of [`CameraSink::decodes`]. The
    /// error says why it cannot be shown.
    fn start(&mut self, codec: &Codec) -> Result<(), String>;
    /// A frame: raw I420 of the feed's size, or an access unit of the started codec.
    /// False when the decoder lost its way and needs a keyframe.
    fn frame(&mut self, au: AccessUnit) -> bool;
    /// The stream ended.
    fn stop(&mut self);
}

/// Where the host's frames go, and where the camera's status is told.
pub struct CameraFeed {
    /// The one picture format the virtual camera offers (raw I420).
    pub video: VideoFormat,
    /// Shows the frames.
    pub sink: Box<dyn CameraSink>,
    /// What the node says ([`CameraReceiver::status`]), updated at every change.
    pub status: Arc<Mutex<String>>,
}

/// What became of a frame of the camera's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Handed to the sink.
    Shown,
    /// Not a frame of the offered size: dropped, counted.
    Refused,
    /// Handed on, and the decoder needs a keyframe: ask the host.
    WantKeyframe,
}

impl std::fmt::Debug for CameraFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraFeed").field("video", &self.video).finish_non_exhaustive()
    }
}

/// Bytes of one I420 frame of `video`: the luma plane and two quarter-size chroma
/// planes, packed.
pub fn i420_bytes(video: &VideoFormat) -> usize {
    let (w, h) = (video.width as usize, video.height as usize);
    w * h + 2 * (w.div_ceil(2) * h.div_ceil(2))
}

/// The host's camera as the guest sees it (see the module docs).
#[derive(Debug)]
pub struct CameraReceiver {
    feed: CameraFeed,
    wanted: bool,
    /// `None` without a session; then whether the host has a camera to give.
    host_has_camera: Option<bool>,
    /// The host's camera stream, while open, and its codec.
    stream: Option<(u32, Codec)>,
    /// Why the host's last camera stream ended while it was still wanted.
    failure: Option<String>,
    /// Frames handed to the node, and refused (of the wrong size), this run.
    delivered: u64,
    refused: u64,
}

impl CameraReceiver {
    /// A receiver feeding `feed`; no host yet.
    pub fn new(feed: CameraFeed) -> Self {
        let mut camera =
            Self { feed, wanted: false, host_has_camera: None, stream: None, failure: None, delivered: 0, refused: 0 };
        camera.publish();
        camera
    }

    /// Whether an app captures from the virtual camera.
    pub fn wanted(&self) -> bool {
        self.wanted
    }

    /// Whether the host of this session offers a camera (its handshake's kind bit).
    pub fn host_has_camera(&self) -> bool {
        self.host_has_camera == Some(true)
    }

    /// Sets whether an app captures; true if that changed (the host is to be told).
    pub fn set_wanted(&mut self, wanted: bool) -> bool {
        if std::mem::replace(&mut self.wanted, wanted) == wanted {
            return false;
        }
        if wanted {
            self.failure = None;
        }
        self.publish();
        true
    }

    /// A session is established with a host of `capabilities`.
    pub fn connected(&mut self, capabilities: &Capabilities) {
        self.host_has_camera = Some(capabilities.kinds & melange_transport::message::kind_bits::CAMERA != 0);
        if self.stream.take().is_some() {
            self.feed.sink.stop();
        }
        self.failure = None;
        self.publish();
    }

    /// The session ended: its stream with it.
    pub fn disconnected(&mut self) {
        self.host_has_camera = None;
        if self.stream.take().is_some() {
            self.feed.sink.stop();
        }
        self.publish();
    }

    /// The host opened a camera stream: taken if it is what the virtual camera shows.
    pub fn open(&mut self, stream: u32, open: &StreamOpen) -> Result<(), String> {
        let MediaKind::Camera(video) = &open.media else {
            return Err(format!("a host stream of {} is no camera", open.media.name()));
        };
        if let Some((old, _)) = self.stream {
            return Err(format!("the host's camera already arrives as stream {old}"));
        }
        let checked = self.check(video, &open.codec).and_then(|()| self.feed.sink.start(&open.codec));
        if let Err(why) = checked {
            self.failure = Some(why.clone());
            self.publish();
            return Err(why);
        }
        self.stream = Some((stream, open.codec.clone()));
        self.failure = None;
        self.publish();
        Ok(())
    }

    fn check(&self, video: &VideoFormat, codec: &Codec) -> Result<(), String> {
        if *codec != Codec::RawI420 && self.feed.sink.decodes() & codec.bit() == 0 {
            return Err(format!(
                "the guest's camera cannot decode {} (raw I420{} only here)",
                codec.name(),
                ["vp8", "h264"]
                    .into_iter()
                    .filter(|c| Codec::from_name(c).is_some_and(|c| self.feed.sink.decodes() & c.bit() != 0))
                    .map(|c| format!(", {c}"))
                    .collect::<String>()
            ));
        }
        if (video.width, video.height) != (self.feed.video.width, self.feed.video.height) {
            return Err(format!(
                "the guest's camera shows {}x{}, not {}x{}",
                self.feed.video.width, self.feed.video.height, video.width, video.height
            ));
        }
        Ok(())
    }

    /// True if `stream` is the camera's.
    pub fn is_camera(&self, stream: u32) -> bool {
        self.stream.as_ref().is_some_and(|(s, _)| *s == stream)
    }

    /// A frame of the camera's stream: raw frames are handed on if whole, else counted
    /// and dropped; encoded ones go to the sink's decoder.
    pub fn unit(&mut self, au: AccessUnit) -> Delivery {
        let raw = self.stream.as_ref().is_some_and(|(_, c)| *c == Codec::RawI420);
        if raw && au.data.len() != i420_bytes(&self.feed.video) {
            self.refused += 1;
            if self.refused.is_power_of_two() {
                log::warn!(
                    "melange guest: dropped a camera frame of {} bytes ({} expected; {} dropped so far)",
                    au.data.len(),
                    i420_bytes(&self.feed.video),
                    self.refused
                );
            }
            return Delivery::Refused;
        }
        self.delivered += 1;
        if self.feed.sink.frame(au) {
            Delivery::Shown
        } else {
            Delivery::WantKeyframe
        }
    }

    /// The host ended `stream`; true if it was the camera's.
    pub fn close(&mut self, stream: u32, reason: &str) -> bool {
        if !self.is_camera(stream) {
            return false;
        }
        self.stream = None;
        self.feed.sink.stop();
        if self.wanted {
            self.failure = Some(reason.to_owned());
        }
        self.publish();
        true
    }

    /// Frames handed to the node so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// What the node says (`melange.camera.status`): one of the lines of
    /// docs/calls.md, "The camera".
    pub fn status(&self) -> String {
        match (self.host_has_camera, self.wanted, &self.stream, &self.failure) {
            (None, ..) => "no host connected".into(),
            (Some(false), ..) => "the host has no camera to give (melange-host --camera none)".into(),
            (Some(true), _, Some(_), _) => "streaming the host's camera".into(),
            (Some(true), false, None, _) => "idle: no app captures, the host's camera is closed".into(),
            (Some(true), true, None, Some(why)) => format!("the host's camera failed: {why}"),
            (Some(true), true, None, None) => "opening the host's camera".into(),
        }
    }

    fn publish(&mut self) {
        let status = self.status();
        if let Ok(mut s) = self.feed.status.lock() {
            if *s != status {
                log::info!("melange guest: camera: {status}");
                *s = status;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use melange_transport::message::{kind_bits, AppInfo};

    const VIDEO: VideoFormat = VideoFormat { width: 64, height: 36, framerate_num: 30, framerate_den: 1 };

    /// Frames as the node got them.
    type Got = Arc<Mutex<Vec<Vec<u8>>>>;

    /// A sink that keeps what it gets, decodes VP8 (by keeping it too), and wants a
    /// keyframe after a unit of one byte.
    struct Keep(Got);

    impl CameraSink for Keep {
        fn decodes(&self) -> u64 {
            melange_transport::message::codec_bits::VP8
        }
        fn start(&mut self, _: &Codec) -> Result<(), String> {
            Ok(())
        }
        fn frame(&mut self, au: AccessUnit) -> bool {
            let lost = au.data.len() == 1;
            self.0.lock().unwrap().push(au.data);
            !lost
        }
        fn stop(&mut self) {}
    }

    fn receiver() -> (CameraReceiver, Got, Arc<Mutex<String>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(String::new()));
        let feed = CameraFeed { video: VIDEO, sink: Box::new(Keep(got.clone())), status: status.clone() };
        (CameraReceiver::new(feed), got, status)
    }

    fn open(media: MediaKind, codec: Codec) -> StreamOpen {
        StreamOpen { media, codec, frame_samples: 0, app: AppInfo::default(), codec_data: Vec::new() }
    }

    fn frame(len: usize, fill: u8) -> AccessUnit {
        AccessUnit { seq: 0, pts_ns: 0, dts_ns: 0, duration_ns: 0, flags: 1, data: vec![fill; len] }
    }

    fn caps(kinds: u32) -> Capabilities {
        Capabilities { codecs: melange_transport::message::codec_bits::RAW_I420, max_streams: 8, kinds }
    }

    #[test]
    fn status_says_why_no_frames_come_and_when_they_do() {
        let (mut cam, _, status) = receiver();
        let now = || status.lock().unwrap().clone();
        assert_eq!(now(), "no host connected");
        cam.connected(&caps(kind_bits::AUDIO));
        assert!(now().contains("no camera to give"), "{}", now());
        cam.connected(&caps(kind_bits::AUDIO | kind_bits::CAMERA));
        assert!(now().starts_with("idle"), "{}", now());
        assert!(cam.set_wanted(true));
        assert!(!cam.set_wanted(true), "no change, nothing to tell");
        assert_eq!(now(), "opening the host's camera");
        cam.open(5, &open(MediaKind::Camera(VIDEO), Codec::RawI420)).unwrap();
        assert_eq!(now(), "streaming the host's camera");
        assert!(cam.close(5, "cannot open camera X"));
        assert_eq!(now(), "the host's camera failed: cannot open camera X");
        cam.set_wanted(false);
        assert!(now().starts_with("idle"));
        cam.disconnected();
        assert_eq!(now(), "no host connected");
    }

    #[test]
    fn only_whole_frames_of_the_offered_size_reach_the_node() {
        let (mut cam, got, _) = receiver();
        cam.connected(&caps(kind_bits::CAMERA));
        let wrong_size = VideoFormat { width: 640, ..VIDEO };
        assert!(cam.open(1, &open(MediaKind::Camera(wrong_size), Codec::RawI420)).is_err());
        assert!(cam.open(1, &open(MediaKind::EncodedVideo(VIDEO), Codec::RawI420)).is_err());
        let h264 = cam.open(1, &open(MediaKind::Camera(VIDEO), Codec::H264)).unwrap_err();
        assert!(h264.contains("cannot decode h264 (raw I420, vp8 only here)"), "{h264}");
        cam.open(2, &open(MediaKind::Camera(VIDEO), Codec::RawI420)).unwrap();
        assert!(cam.open(3, &open(MediaKind::Camera(VIDEO), Codec::RawI420)).is_err(), "one camera stream");
        let whole = i420_bytes(&VIDEO);
        assert_eq!(whole, 64 * 36 * 3 / 2);
        assert_eq!(cam.unit(frame(whole, 1)), Delivery::Shown);
        assert_eq!(cam.unit(frame(whole - 1, 2)), Delivery::Refused);
        assert_eq!(cam.unit(frame(whole + 1, 3)), Delivery::Refused);
        assert_eq!(cam.unit(frame(0, 4)), Delivery::Refused);
        assert_eq!(cam.unit(frame(whole, 5)), Delivery::Shown);
        assert_eq!(got.lock().unwrap().iter().map(|f| f[0]).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(cam.delivered(), 2);
        // An encoded stream's units go to the decoder whatever their size.
        assert!(cam.close(2, "done"));
        cam.open(3, &open(MediaKind::Camera(VIDEO), Codec::Vp8)).unwrap();
        assert_eq!(cam.unit(frame(100, 6)), Delivery::Shown);
        assert_eq!(cam.unit(frame(1, 7)), Delivery::WantKeyframe);
        assert_eq!(got.lock().unwrap().len(), 4);
    }
}
