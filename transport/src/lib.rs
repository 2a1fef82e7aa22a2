//! Melange wire protocol v1 and the byte-stream ports it runs over.
//!
//! - [`frame`]: the 16-byte frame header and an incremental, resynchronising decoder.
//! - [`message`]: control messages (serde + postcard) and the binary media packet.
//! - [`session`]: a sans-IO state machine for one connection (handshake, heartbeat,
//!   streams). No sockets and no clock inside.
//! - [`text`]: the one sanitizer for every string a peer sends.
//! - [`port`]: the I/O edge: `virtio:NAME`, `unix:PATH` (connect, retrying), a listening
//!   unix socket, stdio, and an in-memory pair for tests.
//!
//! The spec is `docs/protocol.md`. This crate knows nothing about codecs or PipeWire.

// Tests fail by panicking; production code may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
// The parsers (frame, message, session) forbid unsafe code; only the port edge, which
// calls poll(2) and eventfd(2), may use it.
#![deny(unsafe_code)]

pub mod frame;
pub mod message;
mod outq;
#[allow(unsafe_code)]
pub mod port;
pub mod session;
pub mod text;

pub use frame::{FrameDecoder, FrameError, FrameKind, MAX_FRAME};
pub use message::{AppInfo, AudioFormat, Capabilities, Codec, MediaKind, MediaPacket, Role, StreamOpen};
pub use port::{Port, PortEvent, PortSpec, Waker};
pub use session::{CloseReason, Event, PeerInfo, Session, SessionConfig, SessionError};
