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

/// Most bytes waiting for the decoder; beyond it units are dropped until a keyframe.
const MAX_QUEUED: u64 = 4 << 20;
/// Decoder failures in a row after which the host is no longer asked for keyframes.
const MAX_FAILURES: u32 = 3;

/// The virtual camera's [`CameraSink`].
pub(crate) struct ModuleCameraSink {
    slot: FrameSlot,
    /// Which codecs it decodes: found on first use (starting GStreamer may scan its
    /// plugins, which the module's load must not wait for).
    decodes: std::sync::OnceLock<u64>,
    codec: Option<Codec>,
    decoder: Option<Decoder>,
    /// Units are dropped until a keyframe (the decoder failed, or fell behind); a
    /// failed decoder is made anew then.
    broken: bool,
    skip_to_keyframe: bool,
    /// Decoder failures in a row.
    failures: u32,
}

impl ModuleCameraSink {
    /// A sink into `slot`.
    pub(crate) fn new(slot: FrameSlot) -> Self {
        Self {
            slot,
            decodes: std::sync::OnceLock::new(),
            codec: None,
            decoder: None,
            broken: false,
            skip_to_keyframe: false,
            failures: 0,
        }
    }
}

impl CameraSink for ModuleCameraSink {
    fn decodes(&self) -> u64 {
        *self.decodes.get_or_init(|| match gst::init() {
            Ok(()) => DECODERS
                .iter()
                .filter(|(_, names)| names.iter().any(|n| gst::ElementFactory::find(n).is_some()))
                .fold(0, |bits, (bit, _)| bits | bit),
            Err(e) => {
                log::warn!("melange: cannot start GStreamer ({e}): the camera takes raw frames only");
                0
            }
        })
    }

    fn start(&mut self, codec: &Codec) -> Result<(), String> {
        self.stop();
        if *codec != Codec::RawI420 {
            self.decoder = Some(Decoder::start(codec, self.slot.clone())?);
            log::info!("melange: decoding the host's camera ({})", codec.name());
        }
        self.codec = Some(codec.clone());
        self.broken = false;
        self.skip_to_keyframe = false;
        self.failures = 0;
        Ok(())
    }

    fn frame(&mut self, au: AccessUnit) -> bool {
        let Some(codec) = &self.codec else { return true };
        if *codec == Codec::RawI420 {
            self.slot.put(au.data);
            return true;
        }
        if (self.broken || self.skip_to_keyframe) && !au.is_keyframe() {
            return true;
        }
        self.skip_to_keyframe = false;
        if self.broken {
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
        if decoder.queued() > MAX_QUEUED {
            // The decoder fell behind: what it holds is late already.
            self.skip_to_keyframe = true;
            return false;
        }
        match decoder.push(au) {
            Ok(()) => {
                self.failures = 0;
                true
            }
            Err(e) => {
                self.decoder = None;
                self.broken = true;
                self.failures += 1;
                if self.failures.is_power_of_two() {
                    log::warn!(
                        "melange: the camera's decoder failed ({e}; {} in a row); waiting for a keyframe",
                        self.failures
                    );
                }
                // A decoder that fails on every keyframe asks no more of the host.
                self.failures <= MAX_FAILURES
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

    /// Bytes waiting in the decoder's input.
    fn queued(&self) -> u64 {
        self.src.current_level_bytes()
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
