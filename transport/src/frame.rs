//! Frame layer: a fixed 16-byte header followed by at most [`MAX_PAYLOAD`] bytes.
//!
//! The decoder follows the tokio-util codec contract: `Ok(None)` means "feed me more
//! bytes", `Err` means the bytes in front of the cursor are not a valid frame. After an
//! error the decoder has already skipped ahead to the next candidate magic, so the caller
//! may keep calling [`FrameDecoder::next_frame`]: a frame cut in the middle (a reconnect
//! can do that) costs one error, never the session.

#![forbid(unsafe_code)]

use thiserror::Error;

/// `"MLNG"`: the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"MLNG";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest frame on the wire, header included. One virtio-serial `write()` moves up to
/// 32 KiB, so a whole frame always fits one write.
pub const MAX_FRAME: usize = 16 * 1024;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = MAX_FRAME - HEADER_LEN;
/// The frame-layout version this crate speaks.
pub const FRAME_VERSION: u8 = 1;

/// Header flag: a receiver that does not know this frame's kind must reset the session
/// instead of skipping the frame.
pub const FLAG_CRITICAL: u8 = 0x01;

/// What a frame carries. Kinds are a closed list per protocol version; a receiver skips
/// kinds it does not know unless the frame has [`FLAG_CRITICAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Guest to host: protocol versions and capabilities.
    Hello,
    /// Host to guest: the chosen version and the host's capabilities.
    Welcome,
    /// Either way: the handshake failed; carries the reason.
    Refuse,
    /// Either way, once a second: liveness and the sender's clock.
    Heartbeat,
    /// Either way: the sender is closing the session; carries the reason.
    Goodbye,
    /// Announces a stream: media kind, codec, and the app's metadata.
    StreamOpen,
    /// Ends a stream.
    StreamClose,
    /// The receiver cannot play a stream it was offered (for example an unknown codec).
    StreamReject,
    /// One encoded media packet.
    Media,
    /// Receiver to sender, about a stream it plays: how long its audio takes from
    /// arriving to being heard, so the sender can tell its apps the whole latency.
    StreamLatency,
    /// Guest to host: whether an app in the guest records from a capture device the
    /// host provides (the virtual microphone), so the host opens the real one only then.
    CaptureDemand,
    /// Either way: the volume and mute of the guest's redirect sink, which applies to
    /// every stream the guest sends; from the host, a change the user made there.
    Volume,
    /// Either way, about an encoded stream (v2): flush, pause, resume, end of stream
    /// from its sender; a keyframe request from its receiver.
    StreamControl,
    /// The first frame of an access unit (v2): its header and first bytes.
    AuStart,
    /// A further frame of the access unit its stream is receiving (v2).
    AuData,
    /// A kind this build does not know (from a newer peer).
    Unknown(u8),
}

impl FrameKind {
    /// The kind's byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            FrameKind::Hello => 0x01,
            FrameKind::Welcome => 0x02,
            FrameKind::Refuse => 0x03,
            FrameKind::Heartbeat => 0x04,
            FrameKind::Goodbye => 0x05,
            FrameKind::StreamOpen => 0x10,
            FrameKind::StreamClose => 0x11,
            FrameKind::StreamReject => 0x12,
            FrameKind::StreamLatency => 0x13,
            FrameKind::CaptureDemand => 0x14,
            FrameKind::Volume => 0x15,
            FrameKind::StreamControl => 0x16,
            FrameKind::Media => 0x20,
            FrameKind::AuStart => 0x21,
            FrameKind::AuData => 0x22,
            FrameKind::Unknown(b) => b,
        }
    }

    /// The kind for a byte on the wire; never fails.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0x01 => FrameKind::Hello,
            0x02 => FrameKind::Welcome,
            0x03 => FrameKind::Refuse,
            0x04 => FrameKind::Heartbeat,
            0x05 => FrameKind::Goodbye,
            0x10 => FrameKind::StreamOpen,
            0x11 => FrameKind::StreamClose,
            0x12 => FrameKind::StreamReject,
            0x13 => FrameKind::StreamLatency,
            0x14 => FrameKind::CaptureDemand,
            0x15 => FrameKind::Volume,
            0x16 => FrameKind::StreamControl,
            0x20 => FrameKind::Media,
            0x21 => FrameKind::AuStart,
            0x22 => FrameKind::AuData,
            other => FrameKind::Unknown(other),
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame-layout version.
    pub version: u8,
    /// What the payload is.
    pub kind: FrameKind,
    /// [`FLAG_CRITICAL`] and reserved bits (ignored on receipt).
    pub flags: u8,
    /// Stream the frame belongs to; 0 for session-wide frames.
    pub stream: u32,
    /// Payload bytes that follow the header.
    pub len: u16,
}

impl Header {
    /// Serializes the header, computing the header check.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = self.version;
        h[5] = self.kind.to_byte();
        h[6] = self.flags;
        h[7] = 0;
        h[8..12].copy_from_slice(&self.stream.to_le_bytes());
        h[12..14].copy_from_slice(&self.len.to_le_bytes());
        let check = crc16(&h[0..14]);
        h[14..16].copy_from_slice(&check.to_le_bytes());
        h
    }

    /// Parses and checks a header. Does not look at the payload.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        if h[0..4] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let check = u16::from_le_bytes([h[14], h[15]]);
        if crc16(&h[0..14]) != check {
            return Err(FrameError::BadHeaderCheck);
        }
        let version = h[4];
        if version != FRAME_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let len = u16::from_le_bytes([h[12], h[13]]);
        if usize::from(len) > MAX_PAYLOAD {
            return Err(FrameError::TooLong(usize::from(len)));
        }
        Ok(Header {
            version,
            kind: FrameKind::from_byte(h[5]),
            flags: h[6],
            stream: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            len,
        })
    }
}

/// A whole frame: header plus payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The checked header.
    pub header: Header,
    /// Exactly `header.len` bytes.
    pub payload: Vec<u8>,
}

/// Why bytes could not be read as a frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The bytes do not start with `MLNG`: garbage, or a frame cut at a reconnect.
    #[error("bad magic: not at a frame boundary")]
    BadMagic,
    /// The header's CRC does not match its bytes.
    #[error("header check failed")]
    BadHeaderCheck,
    /// The frame uses a layout this build does not know.
    #[error("unsupported frame version {0} (this build speaks {FRAME_VERSION})")]
    UnsupportedVersion(u8),
    /// The declared payload is larger than the protocol allows.
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong(usize),
}

/// Writes one frame into `out`. Fails only if `payload` is over [`MAX_PAYLOAD`].
pub fn encode_frame(
    out: &mut Vec<u8>,
    kind: FrameKind,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len = u16::try_from(payload.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_PAYLOAD)
        .ok_or(FrameError::TooLong(payload.len()))?;
    let header = Header { version: FRAME_VERSION, kind, flags, stream, len };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    Ok(())
}

/// Incremental frame decoder over a byte stream cut at arbitrary points.
///
/// Memory is bounded by construction: it never holds more than [`MAX_FRAME`] bytes
/// of a frame in progress plus what the caller pushed in one call.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Read cursor into `buf`; bytes before it are consumed.
    pos: usize,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self { buf: Vec::with_capacity(2 * MAX_FRAME), pos: 0 }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && (self.pos >= self.buf.len() / 2 || self.buf.len() + bytes.len() > self.buf.capacity()) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Forgets everything buffered (after a reconnect).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error for the
    /// bytes at the cursor. After an error the cursor has moved to the next possible
    /// frame start, so calling again continues the stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            // A partial header still has to start with (a prefix of) the magic.
            let n = avail.len().min(MAGIC.len());
            if avail[..n] != MAGIC[..n] {
                self.resync();
                return Err(FrameError::BadMagic);
            }
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&avail[..HEADER_LEN]);
        let header = match Header::decode(&h) {
            Ok(header) => header,
            Err(e) => {
                self.resync();
                return Err(e);
            }
        };
        let total = HEADER_LEN + usize::from(header.len);
        if avail.len() < total {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..total].to_vec();
        self.pos += total;
        Ok(Some(Frame { header, payload }))
    }

    /// Skips at least one byte, then up to the next occurrence of the magic's first
    /// byte, so the next call tries the next candidate frame.
    fn resync(&mut self) {
        let start = self.pos + 1;
        let next = self.buf[start.min(self.buf.len())..]
            .iter()
            .position(|&b| b == MAGIC[0])
            .map_or(self.buf.len(), |i| start + i);
        self.pos = next;
    }
}

/// CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF): cheap enough for 14 bytes per frame
/// and enough to tell a real header from payload bytes that happen to contain `MLNG`.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: FrameKind, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(&mut v, kind, 0, stream, payload).unwrap();
        v
    }

    #[test]
    fn crc_matches_reference_vector() {
        // The standard check value for CRC-16/CCITT-FALSE.
        assert_eq!(crc16(b"123456789"), 0x29B1);
    }

    #[test]
    fn golden_header_bytes() {
        let bytes = frame(FrameKind::Media, 7, &[0xAA, 0xBB]);
        assert_eq!(bytes, [b'M', b'L', b'N', b'G', 1, 0x20, 0, 0, 7, 0, 0, 0, 2, 0, 0x79, 0x7D, 0xAA, 0xBB]);
    }

    #[test]
    fn split_at_every_byte() {
        let mut wire = frame(FrameKind::Hello, 0, b"hello");
        wire.extend(frame(FrameKind::Media, 3, &[1u8; 300]));
        wire.extend(frame(FrameKind::Heartbeat, 0, &[]));
        for cut in 0..=wire.len() {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                dec.push(part);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert_eq!(got[0].payload, b"hello");
            assert_eq!(got[1].header.stream, 3);
            assert_eq!(got[1].payload.len(), 300);
            assert_eq!(got[2].header.kind, FrameKind::Heartbeat);
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn byte_by_byte() {
        let wire = frame(FrameKind::StreamOpen, 9, &[5u8; 1000]);
        let mut dec = FrameDecoder::new();
        let mut n = 0;
        for b in &wire {
            dec.push(std::slice::from_ref(b));
            while dec.next_frame().unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 1);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut h = Header { version: 1, kind: FrameKind::Media, flags: 0, stream: 1, len: 0 }.encode();
        h[12..14].copy_from_slice(&u16::MAX.to_le_bytes());
        let check = crc16(&h[..14]);
        h[14..16].copy_from_slice(&check.to_le_bytes());
        let mut dec = FrameDecoder::new();
        dec.push(&h);
        assert_eq!(dec.next_frame(), Err(FrameError::TooLong(65535)));
    }

    #[test]
    fn resyncs_after_garbage_and_cut_frames() {
        let good = frame(FrameKind::Media, 1, &[9u8; 40]);
        let mut wire = b"garbage MLN".to_vec();
        wire.extend_from_slice(&good[5..]); // a frame cut in the middle
        wire.extend_from_slice(&good);
        let mut dec = FrameDecoder::new();
        dec.push(&wire);
        let mut frames = 0;
        let mut errors = 0;
        loop {
            match dec.next_frame() {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break,
                Err(_) => errors += 1,
            }
            assert!(errors < 100);
        }
        assert_eq!(frames, 1);
        assert!(errors >= 1);
    }

    #[test]
    fn unsupported_version_is_an_error() {
        let mut h = Header { version: 1, kind: FrameKind::Hello, flags: 0, stream: 0, len: 0 }.encode();
        h[4] = 2;
        let check = crc16(&h[..14]);
        h[14..16].copy_from_slice(&check.to_le_bytes());
        let mut dec = FrameDecoder::new();
        dec.push(&h);
        assert_eq!(dec.next_frame(), Err(FrameError::UnsupportedVersion(2)));
    }

    proptest! {
        #[test]
        fn round_trip(kind in any::<u8>(), flags in any::<u8>(), stream in any::<u32>(),
                      payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let kind = FrameKind::from_byte(kind);
            let mut wire = Vec::new();
            encode_frame(&mut wire, kind, flags, stream, &payload).unwrap();
            let mut dec = FrameDecoder::new();
            dec.push(&wire);
            let f = dec.next_frame().unwrap().unwrap();
            prop_assert_eq!(f.header.kind, kind);
            prop_assert_eq!(f.header.flags, flags);
            prop_assert_eq!(f.header.stream, stream);
            prop_assert_eq!(f.payload, payload);
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..4000)) {
            let mut dec = FrameDecoder::new();
            dec.push(&bytes);
            for _ in 0..bytes.len() + 1 {
                if let Ok(None) = dec.next_frame() { break; }
            }
        }
    }
}
