//! Melange's GStreamer glue, shared by the guest's player sinks (`gst-plugin-melange`)
//! and melange-host's decoders: what caps a stream announces and which caps decode it.

#![forbid(unsafe_code)]

pub mod caps;

pub use gstreamer;
