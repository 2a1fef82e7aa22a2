//! What shows the host's camera frames in the virtual camera: raw frames go straight
//! to its [`FrameSlot`]; an encoded stream (melange-host `--camera-codec vp8|h264`) is
//! decoded first, with GStreamer:
//!
//! ```text
//! appsrc ! decodebin ! videoconvert ! videoscale ! video/x-raw,format=I420,width=640,height=360 ! appsink
//! ```
//!
//! The decoder runs on GStreamer's threads; each decoded frame goes to the slot, which
//! wakes the node. A decoder error drops the pipeline: the next keyframe starts a new
//! one, and the host is asked for it.

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use melange_guest::camera::CameraSink;
use melange_pw::video::FrameSlot;
use melange_transport::message::{codec_bits, AccessUnit, Codec};

use crate::camera::CAMERA_VIDEO;

/// Decoders tried, per codec bit: any one makes the codec decodable here (decodebin
/// picks the best ranked).
const DECODERS: [(u64, &[&str]); 2] = [
    (codec_bits::VP8, &["vp8dec", "avdec_vp8", "vavp8dec"]),
    (codec_bits::H264, &["avdec_h264", "openh264dec", "vah264dec", "v4l2h264dec"]),
];

/// The virtual camera's [`CameraSink`].
pub(crate) struct ModuleCameraSink {
    slot: FrameSlot,
    decodes: u64,
    codec: Option<Codec>,
    decoder: Option<Decoder>,
    /// The decoder failed: units are dropped until a keyframe starts a new one.
    broken: bool,
}

impl ModuleCameraSink {
    /// A sink into `slot`; which codecs it decodes is found once, here.
    pub(crate) fn new(slot: FrameSlot) -> Self {
        let decodes = match gst::init() {
            Ok(()) => DECODERS
                .iter()
                .filter(|(_, names)| names.iter().any(|n| gst::ElementFactory::find(n).is_some()))
                .fold(0, |bits, (bit, _)| bits | bit),
            Err(e) => {
                log::warn!("melange: cannot start GStreamer ({e}): the camera takes raw frames only");
                0
            }
        };
        Self { slot, decodes, codec: None, decoder: None, broken: false }
    }
}

impl CameraSink for ModuleCameraSink {
    fn decodes(&self) -> u64 {
        self.decodes
    }

    fn start(&mut self, codec: &Codec) -> Result<(), String> {
        self.stop();
        if *codec != Codec::RawI420 {
            self.decoder = Some(Decoder::start(codec, self.slot.clone())?);
            log::info!("melange: decoding the host's camera ({})", codec.name());
        }
        self.codec = Some(codec.clone());
        self.broken = false;
        Ok(())
    }

    fn frame(&mut self, au: AccessUnit) -> bool {
        let Some(codec) = &self.codec else { return true };
        if *codec == Codec::RawI420 {
            self.slot.put(au.data);
            return true;
        }
        if self.broken {
            if !au.is_keyframe() {
                return true;
            }
            match Decoder::start(codec, self.slot.clone()) {
                Ok(d) => {
                    self.decoder = Some(d);
                    self.broken = false;
                }
                Err(e) => {
                    log::warn!("melange: cannot restart the camera's decoder: {e}");
                    return true;
                }
            }
        }
        let Some(decoder) = &mut self.decoder else { return true };
        match decoder.push(au) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("melange: the camera's decoder failed ({e}); waiting for a keyframe");
                self.decoder = None;
                self.broken = true;
                false
            }
        }
    }

    fn stop(&mut self) {
        self.decoder = None;
        self.codec = None;
        self.slot.clear();
    }
}

/// One encoded camera stream's decoding pipeline. Dropping it stops it.
struct Decoder {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
}

impl Decoder {
    fn start(codec: &Codec, slot: FrameSlot) -> Result<Self, String> {
        let caps = match codec {
            Codec::Vp8 => gst::Caps::builder("video/x-vp8").build(),
            Codec::H264 => gst::Caps::builder("video/x-h264")
                .field("stream-format", "byte-stream")
                .field("alignment", "au")
                .build(),
            other => return Err(format!("no decoder for {} here", other.name())),
        };
        let make = |name: &str| {
            gst::ElementFactory::make(name).build().map_err(|e| format!("cannot make GStreamer's {name}: {e}"))
        };
        let src = gst_app::AppSrc::builder()
            .caps(&caps)
            .format(gst::Format::Time)
            .is_live(true)
            .do_timestamp(true)
            .max_bytes(4 << 20)
            .build();
        let decode = make("decodebin")?;
        let convert = make("videoconvert")?;
        let scale = make("videoscale")?;
        let filter = make("capsfilter")?;
        filter.set_property(
            "caps",
            gst::Caps::builder("video/x-raw")
                .field("format", "I420")
                .field("width", CAMERA_VIDEO.width as i32)
                .field("height", CAMERA_VIDEO.height as i32)
                .build(),
        );
        let sink = gst_app::AppSink::builder().sync(false).max_buffers(2).drop(true).build();
        let pipeline = gst::Pipeline::with_name("melange-camera-decoder");
        pipeline
            .add_many([src.upcast_ref(), &decode, &convert, &scale, &filter, sink.upcast_ref()])
            .map_err(|e| e.to_string())?;
        src.link(&decode).map_err(|e| e.to_string())?;
        gst::Element::link_many([&convert, &scale, &filter, sink.upcast_ref()]).map_err(|e| e.to_string())?;
        let convert_sink = convert.static_pad("sink").ok_or("videoconvert without a sink pad")?;
        decode.connect_pad_added(move |_, pad| {
            if !convert_sink.is_linked() {
                let _ = pad.link(&convert_sink);
            }
        });
        let expected = CAMERA_VIDEO.frame_bytes();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    if let Some(map) = sample.buffer().and_then(|b| b.map_readable().ok()) {
                        // Default strides at this size pack the planes.
                        if map.len() == expected {
                            slot.put(map.to_vec());
                        }
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        pipeline.set_state(gst::State::Playing).map_err(|e| format!("cannot start the camera's decoder: {e}"))?;
        Ok(Self { pipeline, src })
    }

    /// Hands the decoder a unit; the error is the first the pipeline reported.
    fn push(&mut self, au: AccessUnit) -> Result<(), String> {
        if let Some(bus) = self.pipeline.bus() {
            while let Some(msg) = bus.pop() {
                if let gst::MessageView::Error(e) = msg.view() {
                    return Err(e.error().to_string());
                }
            }
        }
        let keyframe = au.is_keyframe();
        let mut buffer = gst::Buffer::from_mut_slice(au.data);
        if !keyframe {
            if let Some(b) = buffer.get_mut() {
                b.set_flags(gst::BufferFlags::DELTA_UNIT);
            }
        }
        self.src.push_buffer(buffer).map(drop).map_err(|e| format!("the decoder took no more: {e:?}"))
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        let _ = self.src.end_of_stream();
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}
