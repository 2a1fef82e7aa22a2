//! The stub's end of the media broker: what an in-app stub (a player's GStreamer sink,
//! the test stub) links to reach melange-host through the guest's broker.
//!
//! Blocking and single-threaded: [`MediaClient::connect`] does the handshake and learns
//! what the host takes (or that no host is there, at once); sends queue in the
//! client's session and go out on [`MediaClient::flush`]; [`MediaClient::poll`] reads
//! what came back (keyframe requests, refusals, the host going) and keeps the session
//! alive, and must be called at least every second or so.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use melange_transport::message::{codec_bits, kind_bits, AccessUnit, Capabilities, Role, StreamControl, StreamOpen};
use melange_transport::session::{CloseReason, Event, Session, SessionConfig, SessionError};

/// Why the client cannot (or can no longer) send.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No broker at the path: Melange's guest side is not running.
    #[error("no media broker at {path}: {source}")]
    NoBroker {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The broker is there but no host is: decode locally.
    #[error("{0}")]
    NoHost(String),
    /// The session ended or was refused.
    #[error("session ended: {0}")]
    Closed(CloseReason),
    /// A send that is not allowed (unknown stream, too large, ...).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The socket failed.
    #[error("media broker socket: {0}")]
    Io(#[from] io::Error),
}

/// What came back from the host through the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Send a keyframe on this stream next.
    KeyframeRequest(u32),
    /// The host refused this stream (it cannot decode it): decode it locally.
    Rejected(u32, String),
    /// The host's render delay for this stream, ns: from an access unit arriving to
    /// its picture or sound coming out. A player renders that much early.
    Latency(u32, u64),
}

/// See the module docs.
#[derive(Debug)]
pub struct MediaClient {
    sock: UnixStream,
    session: Session,
    buf: Vec<u8>,
}

/// The broker's socket: `$XDG_RUNTIME_DIR/melange/media.sock`.
pub fn default_socket() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("melange/media.sock"))
}

impl MediaClient {
    /// Connects and completes the handshake within `timeout`.
    pub fn connect(path: &Path, software: &str, timeout: Duration) -> Result<MediaClient, ClientError> {
        let sock = UnixStream::connect(path).map_err(|source| ClientError::NoBroker { path: path.into(), source })?;
        sock.set_write_timeout(Some(Duration::from_secs(5)))?;
        let caps = Capabilities {
            codecs: codec_bits::ENCODED,
            max_streams: 0,
            kinds: kind_bits::ENCODED_AUDIO | kind_bits::ENCODED_VIDEO,
        };
        let session = Session::new(SessionConfig::new(Role::Guest, software, caps), Instant::now());
        let mut client = MediaClient { sock, session, buf: vec![0; 64 * 1024] };
        client.flush()?;
        let deadline = Instant::now() + timeout;
        while !client.session.is_established() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::NoHost("the media broker did not answer".into()));
            }
            client.read(Some(left))?;
            if let Some(e) = client.closed() {
                return Err(e);
            }
        }
        Ok(client)
    }

    /// What the host takes: offer nothing else.
    pub fn host_capabilities(&self) -> Option<&Capabilities> {
        self.session.peer().map(|p| &p.capabilities)
    }

    /// Announces a stream (`stream`: any id of this client's choosing but 0).
    pub fn open_stream(&mut self, stream: u32, open: &StreamOpen) -> Result<(), ClientError> {
        self.session.open_stream(stream, open)?;
        self.flush()
    }

    /// Sends an access unit; false if it was dropped (the broker or host fell behind:
    /// the stream then waits for a keyframe).
    pub fn send_access_unit(&mut self, stream: u32, au: &AccessUnit) -> Result<bool, ClientError> {
        let queued = self.session.send_access_unit(stream, au)?;
        self.flush()?;
        Ok(queued)
    }

    /// Sends a control of a stream (flush, pause, resume, end of stream).
    pub fn send_control(&mut self, stream: u32, control: StreamControl) -> Result<(), ClientError> {
        self.session.send_stream_control(stream, control)?;
        self.flush()
    }

    /// Ends a stream.
    pub fn close_stream(&mut self, stream: u32, reason: &str) -> Result<(), ClientError> {
        self.session.close_stream(stream, reason);
        self.flush()
    }

    /// Reads what came back within `timeout` (zero: what is there) and runs the
    /// session's timers; an error once the session is over.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<ClientEvent>, ClientError> {
        self.read(Some(timeout))?;
        if self.session.poll_timeout().is_some_and(|t| t <= Instant::now()) {
            self.session.handle_timeout(Instant::now());
        }
        let mut out = Vec::new();
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::StreamControl { stream, control: StreamControl::KeyframeRequest } => {
                    out.push(ClientEvent::KeyframeRequest(stream))
                }
                Event::StreamRejected { stream, reason } => out.push(ClientEvent::Rejected(stream, reason)),
                Event::StreamLatency { stream, render_ns } => out.push(ClientEvent::Latency(stream, render_ns)),
                Event::Closed(reason) => return Err(ClientError::Closed(reason)),
                _ => {}
            }
        }
        self.flush()?;
        Ok(out)
    }

    /// Says goodbye.
    pub fn close(mut self) {
        self.session.close(CloseReason::Local("player done".into()));
        let _ = self.flush();
    }

    /// Writes everything queued.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        loop {
            let out = self.session.pending_output();
            if out.is_empty() {
                return Ok(());
            }
            let n = self.sock.write(out)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            self.session.consume_output(n);
        }
    }

    fn read(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.sock.set_read_timeout(timeout.filter(|t| !t.is_zero()))?;
        // Non-blocking only for this read: writes block (with their timeout).
        let now_only = timeout.is_some_and(|t| t.is_zero());
        self.sock.set_nonblocking(now_only)?;
        let read = self.sock.read(&mut self.buf);
        if now_only {
            self.sock.set_nonblocking(false)?;
        }
        match read {
            Ok(0) => Err(ClientError::Closed(CloseReason::Goodbye("the media broker went".into()))),
            Ok(n) => {
                self.session.handle_input(Instant::now(), &self.buf[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The session's end, as an error, if it ended.
    fn closed(&mut self) -> Option<ClientError> {
        while let Some(event) = self.session.poll_event() {
            if let Event::Closed(reason) = event {
                return Some(match reason {
                    CloseReason::Refused(text) => ClientError::NoHost(text),
                    other => ClientError::Closed(other),
                });
            }
        }
        None
    }
}
