//! `melange-host`: renders what a Melange guest sends.
//!
//! - [`host`]: the session loop: handshake, one decoder and sink per guest stream,
//!   gap concealment, per-stream statistics.
//! - [`mic`]: the user's microphone for the guest, captured only while a guest app
//!   records from its virtual microphone.
//! - [`guest_log`]: what the guest can make it log, within a budget.
//! - [`stats`]: each stream's figures, bounded in memory.
//! - [`output`]: where audio goes: the host's PipeWire (one playback stream per guest
//!   app, with the jitter buffer in its real-time callback), WAV files, or nowhere.
//!
//! Codecs and the playout decision come from `melange-shim`; the wire protocol from
//! `melange-transport`. Nothing here depends on the guest's PipeWire code.

// Tests fail by panicking; production code may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
// Unsafe code only where PipeWire hands us its rate-match area (output::pipewire).
#![deny(unsafe_code)]

pub mod camera;
pub mod decode;
pub mod encoded;
pub mod guest_log;
pub mod host;
pub mod mic;
pub mod output;
pub mod stats;
