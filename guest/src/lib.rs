//! Melange's guest side, with no PipeWire in it: what the guest module does between
//! its taps and the port.
//!
//! - [`core`]: the sans-IO [`core::GuestCore`]: the session with the host, each tap's
//!   encoding, stream announcement across reconnects, mute, and the microphone's
//!   receiving end; driven with the time of every call, so tests run it in virtual time.
//! - [`thread`]: the one thread that owns the port and drives the core, and the
//!   [`thread::GuestHandle`] the module's threads reach it through.
//! - [`congestion`]: Opus's bitrate against a port that cannot keep up.
//! - [`latency`]: the latency the guest tells its apps, from the parts each side measures.
//! - [`mic`]: the receiving end of the host's microphone, into the virtual source's ring.
//! - [`camera`]: the receiving end of the host's camera, into the virtual camera.
//! - [`broker`]: the media broker, sans-IO: players' in-app stubs reach the port
//!   through it; [`broker_thread`] owns its socket and drives it; [`client`] is the
//!   stubs' end.
//!
//! melange-host does not depend on this crate; the media both ends share (codecs, the
//! tap ring, the receive path, the jitter buffer) lives in `melange-shim`.

// Tests fail by panicking; production code may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![forbid(unsafe_code)]

pub mod broker;
pub mod broker_thread;
pub mod camera;
pub mod client;
pub mod congestion;
pub mod core;
pub mod latency;
pub mod mic;
pub mod thread;
