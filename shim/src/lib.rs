//! Melange's media core, with no PipeWire in it.
//!
//! - Guest side: the [`tap`] ring that the real-time capture callback writes, the
//!   per-stream [`tap::TapEncoder`] (packetizer), and the [`link`] manager (one I/O
//!   thread, reconnect, bounded queues), and the [`congestion`] control of Opus's
//!   bitrate when the port cannot keep up; the [`mic`] receiver that feeds the virtual
//!   microphone with the host's.
//! - The [`latency`] the guest tells its apps, from the parts each side measures.
//! - Both sides: [`codec`] (Opus through the system libopus, PCM), the jitter buffer's
//!   [`playout`] decision and [`drift`] control, joined in the real-time [`render`]
//!   core of every stream that plays; the [`receive`] end of every stream (order,
//!   concealment, the real-time budget, decoding); and the [`clock`].
//!
//! The renderer depends on this crate for the shared pieces; nothing here depends on
//! PipeWire or on the renderer.

// Tests fail by panicking; production code may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
// Unsafe code only at the libopus FFI and clock_gettime; the rest forbids it.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod clock;
pub mod codec;
pub mod congestion;
pub mod drift;
pub mod latency;
pub mod link;
pub mod mic;
#[allow(unsafe_code)]
pub mod opus;
pub mod playout;
pub mod receive;
pub mod render;
pub mod tap;
pub mod wav;
