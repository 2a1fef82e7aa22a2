//! An in-process guest on a unix socket that speaks the protocol well or badly on
//! purpose: the hostile-guest test and the drift test drive melange-host with it. And an
//! in-process host that the guest module connects to, for the microphone's drift test.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use melange_transport::frame::{encode_frame, FrameKind};
use melange_transport::message::{
    codec_bits, encode_control, AppInfo, AudioFormat, Capabilities, CaptureDemand, CaptureDevice, Codec, MediaKind,
    MediaPacket, Role, StreamEnd, StreamOpen, Volume,
};
use melange_transport::session::{Event, Session, SessionConfig};

/// See the module docs. Panics (failing the test) when the host stops reading.
#[derive(Debug)]
pub struct ScriptedGuest {
    /// The connection.
    pub sock: UnixStream,
    /// The well-formed side: used for the handshake.
    pub session: Session,
}

impl ScriptedGuest {
    /// Connects and completes the handshake.
    pub fn connect(path: &Path) -> ScriptedGuest {
        Self::connect_as(path, "scripted guest")
    }

    /// Connects and completes the handshake, calling itself `software`.
    pub fn connect_as(path: &Path, software: &str) -> ScriptedGuest {
        let sock = UnixStream::connect(path).expect("connect to melange-host");
        sock.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
        sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        // What the guest module offers.
        let max_streams = melange_transport::message::MAX_STREAMS;
        let caps = Capabilities {
            codecs: codec_bits::PCM_S16LE | codec_bits::OPUS,
            max_streams,
            kinds: melange_transport::message::kind_bits::AUDIO,
        };
        let session = Session::new(SessionConfig::new(Role::Guest, software, caps), Instant::now());
        let mut g = ScriptedGuest { sock, session };
        let hello = g.session.pending_output().to_vec();
        g.session.consume_output(hello.len());
        g.raw(&hello);
        let mut buf = [0u8; 4096];
        while !g.session.is_established() {
            let n = g.sock.read(&mut buf).expect("welcome");
            assert!(n > 0, "host hung up during the handshake");
            g.session.handle_input(Instant::now(), &buf[..n]);
        }
        g
    }

    /// Writes bytes as they are.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("host keeps reading");
    }

    /// Writes one frame.
    pub fn frame(&mut self, kind: FrameKind, flags: u8, stream: u32, payload: &[u8]) {
        let mut out = Vec::new();
        encode_frame(&mut out, kind, flags, stream, payload).expect("frame fits");
        self.raw(&out);
    }

    /// Opens an audio stream (mono gets position MONO, stereo FL/FR, more channels
    /// FL, FR, FC, LFE, ...).
    pub fn open(&mut self, stream: u32, rate: u32, channels: u8, codec: Codec, frame_samples: u32, name: &str) {
        let positions = match channels {
            1 => vec![2],
            n => (3..3 + u32::from(n)).collect(),
        };
        self.open_with(stream, AudioFormat { rate, channels, positions }, codec, frame_samples, name);
    }

    /// Opens an audio stream of any layout, sound or not.
    pub fn open_with(&mut self, stream: u32, format: AudioFormat, codec: Codec, frame_samples: u32, name: &str) {
        let open = StreamOpen {
            media: MediaKind::Audio(format),
            codec,
            frame_samples,
            app: AppInfo { name: name.into(), ..Default::default() },
            codec_data: Vec::new(),
        };
        self.frame(FrameKind::StreamOpen, 0, stream, &encode_control("stream-open", &open).expect("encodes"));
    }

    /// Closes a stream.
    pub fn close(&mut self, stream: u32, reason: &str) {
        let end = StreamEnd { reason: reason.into() };
        self.frame(FrameKind::StreamClose, 0, stream, &encode_control("stream-close", &end).expect("encodes"));
    }

    /// Says the guest's output volume.
    pub fn volume(&mut self, volume: &Volume) {
        self.frame(FrameKind::Volume, 0, 0, &encode_control("volume", volume).expect("encodes"));
    }

    /// Says whether a guest app records from the microphone (10 ms packets).
    pub fn demand_mic(&mut self, active: bool) {
        let demand = CaptureDemand { device: CaptureDevice::Microphone, active, frame_us: 10_000 };
        self.frame(FrameKind::CaptureDemand, 0, 0, &encode_control("capture-demand", &demand).expect("encodes"));
    }

    /// Sends one media packet.
    pub fn media(&mut self, stream: u32, seq: u32, pts_ns: u64, duration: u32, data: Vec<u8>) {
        let mut payload = Vec::new();
        MediaPacket { seq, pts_ns, duration, data }.encode_into(&mut payload);
        self.frame(FrameKind::Media, 0, stream, &payload);
    }
}

/// A host that takes one guest connection and speaks the protocol through a real
/// [`Session`]: heartbeats and all, so the guest keeps the session.
#[derive(Debug)]
pub struct ScriptedHost {
    sock: UnixStream,
    session: Session,
    events: Vec<Event>,
}

impl ScriptedHost {
    /// Waits for the guest on `listener` and completes the handshake.
    pub fn accept(listener: &UnixListener) -> ScriptedHost {
        let (sock, _) = listener.accept().expect("the guest connects");
        sock.set_nonblocking(true).expect("non-blocking");
        // What melange-host offers.
        let max_streams = melange_renderer::host::MAX_STREAMS;
        let caps = Capabilities {
            codecs: codec_bits::PCM_S16LE | codec_bits::OPUS,
            max_streams,
            kinds: melange_transport::message::kind_bits::AUDIO,
        };
        let session = Session::new(SessionConfig::new(Role::Host, "scripted host", caps), Instant::now());
        let mut h = ScriptedHost { sock, session, events: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.session.is_established() {
            assert!(Instant::now() < deadline, "no handshake with the guest");
            h.pump();
            std::thread::sleep(Duration::from_millis(5));
        }
        h
    }

    /// Reads what the guest sent, runs the session's timers and writes what it has;
    /// events are kept for [`ScriptedHost::take_events`].
    pub fn pump(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => panic!("the guest hung up"),
                Ok(n) => self.session.handle_input(Instant::now(), &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading from the guest: {e}"),
            }
        }
        let now = Instant::now();
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
        }
        while let Some(e) = self.session.poll_event() {
            self.events.push(e);
        }
        while !self.session.pending_output().is_empty() {
            match self.sock.write(self.session.pending_output()) {
                Ok(n) => self.session.consume_output(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("writing to the guest: {e}"),
            }
        }
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The session, to open streams and send media with.
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }
}
