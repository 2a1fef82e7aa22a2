//! Melange's media core, with no PipeWire in it: what both ends do with audio.
//!
//! - [`codec`] (Opus through the system libopus, PCM);
//! - the [`tap`] ring that a real-time capture callback writes and the per-stream
//!   [`tap::TapEncoder`] (packetizer) that cuts and encodes it: the guest's app taps and
//!   the host's microphone;
//! - the [`receive`] end of every stream (order, concealment, the real-time budget,
//!   decoding): the host's playback streams and the guest's microphone;
//! - the jitter buffer's [`playout`] decision and [`drift`] control, joined in the
//!   real-time [`render`] core of every stream that plays;
//! - the [`clock`], and the [`wav`] file layout (melange-host's `--output wav`, the tests).
//!
//! The guest's connection logic lives in `melange-guest`, melange-host's in
//! `melange-renderer`; both depend on this crate, nothing here on them or on PipeWire.

// Tests fail by panicking; production code may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
// Unsafe code only at the libopus FFI and clock_gettime; the rest forbids it.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod clock;
pub mod codec;
pub mod drift;
#[allow(unsafe_code)]
pub mod opus;
pub mod playout;
pub mod receive;
pub mod render;
pub mod tap;
pub mod wav;
