//! melange-host's encoded streams: a guest player's own video and audio, forwarded as
//! access units (protocol v2), handed to the `--video-output` backend.
//!
//! A stream whose codec the host does not take (`--video-codecs`) or whose output
//! cannot open is refused with a reason the guest's stub sees. A stream whose first
//! access unit is not a keyframe (it joined late), or that lost one, asks its sender
//! for a keyframe, at most once a second.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use melange_transport::message::{codec_bits, AccessUnit, Codec, StreamControl, StreamOpen};

use crate::output::encoded::{EncodedDesc, EncodedOutput, EncodedSink};

/// Least time between two keyframe requests of one stream.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// What the host should tell the guest about a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Refuse the stream, with this reason.
    Reject(String),
    /// Ask its sender for a keyframe.
    KeyframeRequest,
}

struct Stream {
    sink: Box<dyn EncodedSink>,
    app: String,
    units: u64,
    bytes: u64,
    /// The next access unit must be a keyframe to be usable (start, loss, flush).
    need_keyframe: bool,
    last_request: Option<Instant>,
}

/// The encoded streams of the current session. See the module docs.
pub struct EncodedStreams {
    output: Box<dyn EncodedOutput>,
    /// Codecs taken, as `codec_bits`.
    codecs: u64,
    streams: BTreeMap<u32, Stream>,
}

impl std::fmt::Debug for EncodedStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedStreams").field("codecs", &self.codecs).field("streams", &self.streams.len()).finish()
    }
}

/// Parses `--video-codecs`: a comma-separated list of codec names, or `all`.
pub fn parse_codecs(list: &str) -> Result<u64, String> {
    if list == "all" {
        return Ok(codec_bits::ENCODED);
    }
    list.split(',').filter(|n| !n.is_empty()).try_fold(0, |bits, name| match Codec::from_name(name.trim()) {
        Some(c) if c.bit() & codec_bits::ENCODED != 0 => Ok(bits | c.bit()),
        _ => Err(format!("unknown codec {name:?} (h264, h265, vp8, vp9, av1, mp3, aac, opus, vorbis, flac)")),
    })
}

impl EncodedStreams {
    /// Streams into `output`, taking the codecs `codecs` (`codec_bits`).
    pub fn new(output: Box<dyn EncodedOutput>, codecs: u64) -> Self {
        Self { output, codecs: codecs & codec_bits::ENCODED, streams: BTreeMap::new() }
    }

    /// The codecs taken, for the handshake.
    pub fn codecs(&self) -> u64 {
        self.codecs
    }

    /// Where the streams go, for the startup log.
    pub fn describe(&self) -> String {
        self.output.describe()
    }

    /// Opens a stream; the error is the reason to refuse it with.
    pub fn open(&mut self, session: u64, stream: u32, open: &StreamOpen) -> Result<String, String> {
        if self.codecs & open.codec.bit() == 0 {
            return Err(format!("melange-host does not take {} {}", open.media.name(), open.codec.name()));
        }
        let desc = EncodedDesc { stream, session, open: open.clone() };
        let sink = self.output.open(&desc).map_err(|e| e.to_string())?;
        let to = sink.describe();
        let app = open.app.name.clone();
        let stream_state = Stream { sink, app, units: 0, bytes: 0, need_keyframe: true, last_request: None };
        self.streams.insert(stream, stream_state);
        Ok(to)
    }

    /// True for a stream this opened.
    pub fn contains(&self, stream: u32) -> bool {
        self.streams.contains_key(&stream)
    }

    /// Hands over an access unit; may ask for a keyframe.
    pub fn access_unit(&mut self, now: Instant, stream: u32, au: &AccessUnit) -> Option<Reply> {
        let s = self.streams.get_mut(&stream)?;
        if au.is_keyframe() {
            s.need_keyframe = false;
        }
        s.units += 1;
        s.bytes += au.data.len() as u64;
        s.sink.access_unit(au);
        s.need_keyframe.then(|| s.request(now)).flatten()
    }

    /// A unit of `stream` was lost on the way (a cut or oversized one): the next ones
    /// are unusable until a keyframe; may ask for one.
    pub fn lost(&mut self, now: Instant, stream: u32) -> Option<Reply> {
        let s = self.streams.get_mut(&stream)?;
        s.need_keyframe = true;
        s.request(now)
    }

    /// Hands over the sender's control.
    pub fn control(&mut self, stream: u32, control: StreamControl) {
        if let Some(s) = self.streams.get_mut(&stream) {
            if control == StreamControl::Flush {
                s.need_keyframe = true;
            }
            s.sink.control(control);
        }
    }

    /// Closes a stream; returns a line for the log.
    pub fn close(&mut self, stream: u32, reason: &str) -> Option<String> {
        let mut s = self.streams.remove(&stream)?;
        let result = s.sink.close(reason);
        Some(format!(
            "stream {stream} (\"{}\") closed ({reason}): {} access units, {} bytes{}",
            s.app,
            s.units,
            s.bytes,
            result.err().map(|e| format!("; {e}")).unwrap_or_default()
        ))
    }

    /// Closes every stream; returns a line per stream for the log.
    pub fn close_all(&mut self, reason: &str) -> Vec<String> {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.close(id, reason)).collect()
    }
}

impl Stream {
    fn request(&mut self, now: Instant) -> Option<Reply> {
        if self.last_request.is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_REQUEST_INTERVAL) {
            return None;
        }
        self.last_request = Some(now);
        Some(Reply::KeyframeRequest)
    }
}
