//! melange-host's encoded streams: a guest player's own video and audio, forwarded as
//! access units (protocol v2), recorded and decoded as `--video-output` says; decoded
//! audio plays through the tapped audio's `--output` ([`crate::decode`]).
//!
//! A stream whose codec the host does not take (`--video-codecs`, or no decoder here)
//! or whose output cannot open is refused with a reason the guest's stub sees. A
//! stream whose first access unit is not a keyframe (it joined late), or that lost
//! one, asks its sender for a keyframe, at most once a second; its decoder gets nothing
//! until one comes. A decoder that fails is logged and started again at a keyframe, at
//! most every [`DECODER_RETRY`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use melange_transport::message::{
    codec_bits, kind_bits, AccessUnit, AudioFormat, Codec, MediaKind, StreamControl, StreamOpen, Volume,
};
use melange_transport::port::Waker;
use serde_json::json;

use crate::decode::{AudioDecoder, FrameLog, Show, VideoDecoder};
use crate::output::encoded::{EncodedDesc, EncodedOutput, EncodedSink};
use crate::output::{Output, StreamDesc, StreamSink};

/// Least time between two keyframe requests of one stream.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// Least time between a decoder failing and the next one starting.
pub const DECODER_RETRY: Duration = Duration::from_secs(5);

/// Most video streams decoded at once: each is a decoder, its threads and its frames,
/// whatever size the guest announced.
pub const MAX_VIDEOS: usize = 8;

/// Largest side of a player's window the host sizes its own from (8K).
const MAX_VIDEO_SIDE: u32 = 8192;

/// Most pixels of a host window sized from a player's report (8K UHD): each frame is
/// scaled to it.
const MAX_VIDEO_AREA: u64 = 7680 * 4320;

/// Access units' times (pts, dts, duration) are below this: 2^62 ns.
const MAX_TIME_NS: u64 = 1 << 62;

/// Least media time a unit is charged against the budget: a guest cannot make units
/// free by claiming tiny durations (a 120 fps frame; a 2.5 ms audio packet).
const MIN_VIDEO_UNIT_NS: u64 = 8_333_333;
/// See [`MIN_VIDEO_UNIT_NS`].
const MIN_AUDIO_UNIT_NS: u64 = 2_500_000;

/// Closed videos whose decoders may still be showing their last frames; past this,
/// a closing video's decoder stops at once.
const MAX_FINISHING: usize = MAX_VIDEOS;

/// Players' audio rates the host plays.
const AUDIO_RATES: std::ops::RangeInclusive<u32> = 8_000..=384_000;

/// Most players' audio streams decoded at once.
pub const MAX_AUDIOS: usize = 16;

/// Media time a stream may save up to hand its decoder in a burst (a seek's lead-in,
/// a player catching up after a stall).
const BUDGET_SAVE: Duration = Duration::from_secs(10);

/// Media time a new stream may hand its decoder at once.
const BUDGET_START: Duration = Duration::from_secs(2);

/// A stream's real-time budget, as tapped audio has one (docs/host.md): what it hands
/// its decoder may run ahead of wall time by what it saved, at most [`BUDGET_SAVE`].
/// A guest cannot make the host decode faster than real time for long.
#[derive(Debug, Clone, Copy)]
struct Budget {
    left_ns: u64,
    at: Instant,
    last_pts: Option<u64>,
}

impl Budget {
    fn new(now: Instant) -> Self {
        Self { left_ns: BUDGET_START.as_nanos() as u64, at: now, last_pts: None }
    }

    /// The media time a unit stands for: its duration, else the step from the last
    /// unit's time (within a second), else a frame's or an audio packet's usual length.
    fn media_ns(&mut self, au: &AccessUnit, video: bool) -> u64 {
        let step = self.last_pts.map(|p| au.pts_ns.saturating_sub(p)).filter(|d| (1..1_000_000_000).contains(d));
        self.last_pts = Some(au.pts_ns);
        let least = if video { MIN_VIDEO_UNIT_NS } else { MIN_AUDIO_UNIT_NS };
        let claimed = if au.duration_ns > 0 {
            au.duration_ns.min(1_000_000_000)
        } else {
            step.unwrap_or(if video { 33_333_333 } else { 20_000_000 })
        };
        claimed.max(least)
    }

    /// Takes `ns` of media at `now`; false when over budget.
    fn take(&mut self, now: Instant, ns: u64) -> bool {
        let earned = now.saturating_duration_since(self.at).as_nanos() as u64;
        self.at = self.at.max(now);
        self.left_ns = self.left_ns.saturating_add(earned).min(BUDGET_SAVE.as_nanos() as u64);
        match self.left_ns.checked_sub(ns) {
            Some(left) => {
                self.left_ns = left;
                true
            }
            None => false,
        }
    }
}

/// Longest the host's thread waits for a closing audio stream's decoder.
const AUDIO_DRAIN: Duration = Duration::from_millis(5);

/// Least change of a stream's render delay that is reported again.
const LATENCY_STEP_NS: u64 = 2_000_000;

/// Least time between two reports of a stream's render delay.
const LATENCY_INTERVAL: Duration = Duration::from_millis(500);

/// What [`EncodedStreams::pump`] found.
#[derive(Debug, Default)]
pub struct Pumped {
    /// Lines for the log.
    pub lines: Vec<String>,
    /// Render delays to report to the senders: stream, ns.
    pub latencies: Vec<(u32, u64)>,
}

/// What opening a passthrough audio stream needs of the host.
pub struct AudioOut<'a> {
    /// The tapped audio's output.
    pub output: &'a mut dyn Output,
    /// The session number, for file names.
    pub session: u64,
    /// Jitter-buffer target for a stream of `frame_samples` at `rate`.
    pub latency_frames: &'a dyn Fn(u32, u32) -> (usize, bool),
    /// Output quantum for a stream of `frame_samples` at `rate`.
    pub quantum: &'a dyn Fn(u32, u32) -> u32,
    /// The guest's volume.
    pub volume: &'a Volume,
}

impl std::fmt::Debug for AudioOut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioOut").field("session", &self.session).finish()
    }
}

/// A passthrough audio stream's decoder and where it plays.
struct AudioPlay {
    decoder: Option<AudioDecoder>,
    sink: Box<dyn StreamSink>,
    log: Option<FrameLog>,
    /// Sample frames handed to the sink so far.
    frames: u64,
    channels: usize,
    delay: ArrivalDelay,
}

/// Units kept for matching decoded audio to its arrival.
const ARRIVALS: usize = 256;

/// Delays kept for the median reported.
const DELAYS: usize = 32;

/// An audio stream's measured render delay: from a unit's arrival to its first sample
/// being heard, decoding and the output's buffer included. The player's sink sends
/// that much early; the output's own estimate swings by a unit's length as chunks land,
/// so the median of the last [`DELAYS`] is what is reported.
#[derive(Debug, Default)]
struct ArrivalDelay {
    /// (guest pts, arrival on `CLOCK_MONOTONIC`) of the last units, in order.
    arrivals: std::collections::VecDeque<(u64, u64)>,
    delays: std::collections::VecDeque<u64>,
}

impl ArrivalDelay {
    fn arrived(&mut self, pts_ns: u64, now_ns: u64) {
        if self.arrivals.len() == ARRIVALS {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back((pts_ns, now_ns));
    }

    /// Decoded audio of guest time `pts_ns` is heard at `due_ns`.
    fn heard(&mut self, pts_ns: u64, due_ns: u64) {
        let Some(&(unit_pts, arrival)) = self.arrivals.iter().rev().find(|(p, _)| *p <= pts_ns) else { return };
        let Some(delay) = due_ns.checked_sub(arrival + (pts_ns - unit_pts)) else { return };
        if self.delays.len() == DELAYS {
            self.delays.pop_front();
        }
        self.delays.push_back(delay);
    }

    fn median(&self) -> Option<u64> {
        let mut v: Vec<u64> = self.delays.iter().copied().collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    fn reset(&mut self) {
        self.arrivals.clear();
    }
}

/// A video stream's decoder and how to make another.
struct VideoPlay {
    decoder: Option<VideoDecoder>,
    show: Show,
}

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
    open: StreamOpen,
    video: Option<VideoPlay>,
    audio: Option<AudioPlay>,
    /// When the decoder last failed.
    failed_at: Option<Instant>,
    /// The render delay last reported to the sender, and when.
    reported: Option<(u64, Instant)>,
    /// Units the decoder could not take (it fell behind).
    decoder_dropped: u64,
    /// What the stream may still hand its decoder.
    budget: Budget,
    /// Units dropped undecoded for coming faster than real time.
    over_budget: u64,
    /// Units dropped for times no player gives ([`MAX_TIME_NS`]).
    bad_times: u64,
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
    /// Wakes the host's loop when decoded audio is ready.
    waker: Option<Arc<Waker>>,
    /// Closed video streams showing their last frames.
    finishing: Vec<std::thread::JoinHandle<()>>,
    /// Lines for the log, taken by [`EncodedStreams::pump`].
    notes: Vec<String>,
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
        // A codec named is taken in every profile the decoders take.
        Some(c) if c.bit() & codec_bits::ENCODED != 0 => Ok(bits | c.bit() | codec_bits::profiles_of(c.bit())),
        _ => Err(format!("unknown codec {name:?} (h264, h265, vp8, vp9, av1, mp3, aac, opus, vorbis, flac)")),
    })
}

/// The names of the codecs in `bits`, comma-separated.
pub fn codec_names(bits: u64) -> String {
    const ALL: [Codec; 10] = [
        Codec::H264,
        Codec::H265,
        Codec::Vp8,
        Codec::Vp9,
        Codec::Av1,
        Codec::Mp3,
        Codec::Aac,
        Codec::Opus { bitrate: 0 },
        Codec::Vorbis,
        Codec::Flac,
    ];
    let profiles = [
        (codec_bits::H264_HIGH_PROFILES, "h264's profiles beyond High"),
        (codec_bits::H265_RANGE_PROFILES, "h265's range extensions"),
        (codec_bits::VP9_HIGH_PROFILES, "vp9's profiles 1 to 3"),
        (codec_bits::AV1_HIGH_PROFILES, "av1's High and Professional profiles"),
    ];
    let codecs = ALL.iter().filter(|c| bits & c.bit() != 0).map(|c| c.name());
    // A profile bit without its codec says nothing more.
    let extra = profiles.iter().filter(|(b, _)| {
        bits & b != 0 && ALL.iter().all(|c| bits & c.bit() == 0 || codec_bits::profiles_of(c.bit()) != *b)
    });
    codecs.chain(extra.map(|(_, name)| *name)).collect::<Vec<_>>().join(", ")
}

impl EncodedStreams {
    /// Streams into `output`, taking the codecs `codecs` (`codec_bits`). Decoding
    /// needs [`crate::decode::init`] first; the caller takes out what it cannot decode.
    pub fn new(output: Box<dyn EncodedOutput>, codecs: u64) -> Self {
        Self {
            output,
            codecs: codecs & codec_bits::ENCODED,
            streams: BTreeMap::new(),
            waker: None,
            finishing: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Lets decoders wake the host's loop.
    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(Arc::new(waker));
    }

    /// True when video streams are decoded.
    pub fn decodes_video(&self) -> bool {
        self.output.decodes_video()
    }

    /// The kinds of players' streams taken (`kind_bits`), for the handshake: none of a
    /// kind whose codecs are all declined.
    pub fn kinds(&self) -> u32 {
        let taken = |kind| melange_gst::caps::codecs(kind).iter().any(|b| self.codecs & b != 0);
        let mut kinds = 0;
        if taken(melange_gst::caps::Kind::Audio) {
            kinds |= kind_bits::ENCODED_AUDIO;
        }
        if taken(melange_gst::caps::Kind::Video) {
            kinds |= kind_bits::ENCODED_VIDEO;
        }
        kinds
    }

    /// The codecs taken, as `codec_bits`.
    pub fn codecs(&self) -> u64 {
        self.codecs
    }

    /// Where the streams go, for the startup log.
    pub fn describe(&self) -> String {
        self.output.describe()
    }

    /// Opens a stream; the error is the reason to refuse it with. Encoded audio plays
    /// through `audio`'s output.
    pub fn open(
        &mut self,
        now: Instant,
        stream: u32,
        open: &StreamOpen,
        audio: AudioOut<'_>,
    ) -> Result<String, String> {
        if matches!(open.media, MediaKind::Camera(_)) {
            return Err("a camera stream goes from the host to the guest, never back".into());
        }
        if self.codecs & open.codec.bit() == 0 {
            return Err(format!("melange-host does not take {} {}", open.media.name(), open.codec.name()));
        }
        let (videos, audios) = self
            .streams
            .values()
            .fold((0, 0), |(v, a), s| (v + usize::from(s.video.is_some()), a + usize::from(s.audio.is_some())));
        match &open.media {
            MediaKind::EncodedVideo(_) if videos >= MAX_VIDEOS && self.output.decodes_video() => {
                return Err(format!("melange-host shows at most {MAX_VIDEOS} videos at once"));
            }
            MediaKind::EncodedAudio(_) if audios >= MAX_AUDIOS => {
                return Err(format!("melange-host plays at most {MAX_AUDIOS} players' audio streams at once"));
            }
            MediaKind::EncodedAudio(f) if !AUDIO_RATES.contains(&f.rate) || !(1..=8).contains(&f.channels) => {
                return Err(format!(
                    "{} Hz with {} channels is no audio melange-host plays ({} to {} Hz, 1 to 8 channels)",
                    f.rate,
                    f.channels,
                    AUDIO_RATES.start(),
                    AUDIO_RATES.end()
                ));
            }
            _ => {}
        }
        let decoded = !matches!(open.media, MediaKind::EncodedVideo(_)) || self.output.decodes_video();
        if decoded {
            melange_gst::caps::decoder_caps(&open.media, &open.codec, &open.codec_data)
                .map_err(|e| format!("cannot decode {}: {e}", open.codec.name()))?;
        }
        let desc = EncodedDesc { stream, session: audio.session, open: open.clone() };
        let sink = self.output.open(&desc).map_err(|e| e.to_string())?;
        let mut to = sink.describe();
        let (mut video, mut audio_play) = (None, None);
        match &open.media {
            MediaKind::EncodedVideo(_) => {
                if let Some(show) = self.output.show(&desc).map_err(|e| e.to_string())? {
                    let decoder = new_video_decoder(open, &show)?;
                    to = format!("{to}, decoded ({})", describe_show(&show));
                    video = Some(VideoPlay { decoder: Some(decoder), show });
                }
            }
            MediaKind::EncodedAudio(format) | MediaKind::Audio(format) => {
                let play = self.open_audio(&desc, format, audio)?;
                to = format!("{to}, decoded -> {}", play.sink.describe());
                audio_play = Some(play);
            }
            MediaKind::Camera(_) => return Err("a camera stream goes from the host to the guest, never back".into()),
        }
        let app = open.app.name.clone();
        let stream_state = Stream {
            sink,
            open: open.clone(),
            video,
            audio: audio_play,
            failed_at: None,
            reported: None,
            decoder_dropped: 0,
            budget: Budget::new(now),
            over_budget: 0,
            bad_times: 0,
            app,
            units: 0,
            bytes: 0,
            need_keyframe: true,
            last_request: None,
        };
        self.streams.insert(stream, stream_state);
        Ok(to)
    }

    fn open_audio(&mut self, desc: &EncodedDesc, format: &AudioFormat, out: AudioOut<'_>) -> Result<AudioPlay, String> {
        let channels = format.channels.clamp(1, 8);
        let format = AudioFormat { rate: format.rate, channels, positions: default_positions(channels) };
        let frame_samples = nominal_frame_samples(&desc.open.codec, format.rate);
        let (latency_frames, latency_auto) = (out.latency_frames)(frame_samples, format.rate);
        let stream_desc = StreamDesc {
            stream: desc.stream,
            session: out.session,
            // What lands at once sizes the output's ring and its backlog margin: without
            // it a decoder's two-unit bursts were cut as backlog, then underran.
            open: StreamOpen { frame_samples, ..desc.open.clone() },
            format: format.clone(),
            from_s16: false,
            latency_frames,
            latency_auto,
            quantum: (out.quantum)(frame_samples, format.rate),
            part: 1,
        };
        let decoder = self.audio_decoder(&desc.open, &format)?;
        let mut sink = out.output.open(&stream_desc).map_err(|e| e.to_string())?;
        sink.set_volume(out.volume);
        let log = self.output.decoded_log(desc).map_err(|e| e.to_string())?;
        Ok(AudioPlay {
            decoder: Some(decoder),
            sink,
            log,
            frames: 0,
            channels: usize::from(channels),
            delay: ArrivalDelay::default(),
        })
    }

    fn audio_decoder(&self, open: &StreamOpen, format: &AudioFormat) -> Result<AudioDecoder, String> {
        let waker = self.waker.clone();
        AudioDecoder::new(open, format, move || {
            if let Some(w) = &waker {
                w.wake();
            }
        })
    }

    /// Plays what the decoders made since the last call, checks them for errors and
    /// finds render delays to report to the senders. `now_ns` is `now` on
    /// `CLOCK_MONOTONIC`.
    pub fn pump(&mut self, now: Instant, now_ns: u64) -> Pumped {
        let mut lines = std::mem::take(&mut self.notes);
        let mut latencies = Vec::new();
        for (id, s) in &mut self.streams {
            if let Some(a) = &mut s.audio {
                if let Some(d) = &a.decoder {
                    for decoded in d.take() {
                        let frames = (decoded.samples.len() / a.channels) as u64;
                        let due_ns = now_ns + a.sink.render_delay_ns(now_ns);
                        a.sink.write(&decoded.samples);
                        a.delay.heard(decoded.pts_ns, due_ns);
                        if let Some(log) = &a.log {
                            log.line(&json!({"event": "pcm", "pts_ns": decoded.pts_ns, "due_ns": due_ns,
                                "frames": frames, "at": a.frames}));
                        }
                        a.frames += frames;
                    }
                }
            }
            if let Some(delay) = s.render_delay_ns() {
                let due = s.reported.is_none_or(|(last, at)| {
                    delay.abs_diff(last) >= LATENCY_STEP_NS && now.saturating_duration_since(at) >= LATENCY_INTERVAL
                });
                if due {
                    s.reported = Some((delay, now));
                    latencies.push((*id, delay));
                }
            }
            let error = match (&s.video, &s.audio) {
                (Some(VideoPlay { decoder: Some(d), .. }), _) => d.error(),
                (_, Some(AudioPlay { decoder: Some(d), .. })) => d.error(),
                _ => None,
            };
            if let Some(e) = error {
                lines.push(format!(
                    "stream {id} (\"{}\"): cannot decode {}: {e}; trying again at a keyframe in {} s",
                    s.app,
                    s.open.codec.name(),
                    DECODER_RETRY.as_secs()
                ));
                s.stop_decoder();
                s.failed_at = Some(now);
            }
        }
        Pumped { lines, latencies }
    }

    /// Applies the guest's volume to passthrough audio.
    pub fn set_volume(&mut self, volume: &Volume) {
        for a in self.streams.values_mut().filter_map(|s| s.audio.as_mut()) {
            a.sink.set_volume(volume);
        }
    }

    /// True for a stream this opened.
    pub fn contains(&self, stream: u32) -> bool {
        self.streams.contains_key(&stream)
    }

    /// Hands over an access unit that arrived at `now` (`now_ns` on
    /// `CLOCK_MONOTONIC`); may ask for a keyframe.
    pub fn access_unit(&mut self, now: Instant, now_ns: u64, stream: u32, au: &AccessUnit) -> Option<Reply> {
        // Times past 2^62 ns (146 years) are no player's: taken as a lost unit, so no
        // timestamp arithmetic downstream can overflow.
        if au.pts_ns.max(au.dts()).max(au.duration_ns) >= MAX_TIME_NS {
            let s = self.streams.get_mut(&stream)?;
            s.bad_times += 1;
            if s.bad_times == 1 {
                self.notes.push(format!("stream {stream} (\"{}\"): a unit timed beyond 2^62 ns, dropped", s.app));
            }
            return self.lost(now, stream);
        }
        let s = self.streams.get_mut(&stream)?;
        if au.is_keyframe() {
            s.need_keyframe = false;
            if s.failed_at.is_some_and(|t| now.saturating_duration_since(t) >= DECODER_RETRY) {
                s.failed_at = None;
                s.restart_decoder(now, self.waker.clone());
            }
        }
        s.units += 1;
        s.bytes += au.data.len() as u64;
        s.sink.access_unit(now_ns, au);
        let is_video = s.video.is_some();
        let media_ns = s.budget.media_ns(au, is_video);
        if (s.video.is_some() || s.audio.is_some()) && !s.budget.take(now, media_ns) {
            s.over_budget += 1;
            if s.over_budget == 1 {
                self.notes.push(format!(
                    "stream {stream} (\"{}\") delivers media faster than real time; what is beyond it is dropped \
                     undecoded (counted in its close line)",
                    s.app
                ));
            }
            if is_video {
                s.need_keyframe = true;
            }
            return s.need_keyframe.then(|| s.request(now)).flatten();
        }
        if !s.need_keyframe {
            let taken = match (&mut s.video, &mut s.audio) {
                (Some(VideoPlay { decoder: Some(d), .. }), _) => d.push(now_ns, au),
                (_, Some(AudioPlay { decoder: Some(d), delay, .. })) => {
                    delay.arrived(au.pts_ns, now_ns);
                    d.push(au)
                }
                _ => true,
            };
            if !taken {
                s.decoder_dropped += 1;
                s.need_keyframe = true;
            }
        }
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
        let control = match control {
            StreamControl::Geometry(g)
                if g.width == 0
                    || g.height == 0
                    || g.width.max(g.height) > MAX_VIDEO_SIDE
                    || u64::from(g.width) * u64::from(g.height) > MAX_VIDEO_AREA =>
            {
                self.notes.push(format!("stream {stream}: ignoring the player's window of {}x{}", g.width, g.height));
                return;
            }
            c => c,
        };
        if let Some(s) = self.streams.get_mut(&stream) {
            if let (Some(v), StreamControl::Geometry(g)) = (&mut s.video, control) {
                self.notes.push(format!(
                    "stream {stream} (\"{}\"): the player shows it at {}x{} in its window (at {},{})",
                    s.app, g.width, g.height, g.x, g.y
                ));
                // A decoder made again (after an error) sizes its window the same.
                if let Show::Window { width, height, .. } = &mut v.show {
                    (*width, *height) = (g.width, g.height);
                }
            }
            if control == StreamControl::Flush {
                s.need_keyframe = true;
            }
            if let Some(VideoPlay { decoder: Some(d), .. }) = &mut s.video {
                d.control(control);
            }
            if let (Some(a), StreamControl::Flush) = (&mut s.audio, control) {
                a.delay.reset();
                if let Some(d) = &mut a.decoder {
                    d.flush();
                }
            }
            s.sink.control(control);
        }
    }

    /// Closes a stream; returns a line for the log.
    pub fn close(&mut self, stream: u32, reason: &str) -> Option<String> {
        let mut s = self.streams.remove(&stream)?;
        // What the decoders still hold plays out: video on a thread of its own, audio
        // here (a short wait: other streams wait meanwhile).
        if let Some(d) = s.video.as_mut().and_then(|v| v.decoder.take()) {
            self.finishing.retain(|t| !t.is_finished());
            if self.finishing.len() < MAX_FINISHING {
                self.finishing.extend(d.finish());
            } else {
                d.stop();
            }
        }
        if let Some(a) = &mut s.audio {
            if let Some(d) = a.decoder.take() {
                d.finish(AUDIO_DRAIN);
                for decoded in d.take() {
                    a.sink.write(&decoded.samples);
                }
            }
        }
        let mut result = s.sink.close(reason);
        if let Some(a) = &mut s.audio {
            result = result.and(a.sink.close());
            if let Some(log) = &a.log {
                log.flush();
            }
        }
        if let Some(VideoPlay { show: Show::Frames(log), .. }) = &s.video {
            log.flush();
        }
        Some(format!(
            "stream {stream} (\"{}\") closed ({reason}): {} access units, {} bytes{}{}",
            s.app,
            s.units,
            s.bytes,
            [
                (s.decoder_dropped, "not decoded (the decoder fell behind)"),
                (s.over_budget, "dropped (faster than real time)"),
                (s.bad_times, "dropped (times beyond 2^62 ns)"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!(", {n} {what}"))
            .collect::<String>(),
            result.err().map(|e| format!("; {e}")).unwrap_or_default()
        ))
    }

    /// Closes every stream; returns a line per stream for the log.
    pub fn close_all(&mut self, reason: &str) -> Vec<String> {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.close(id, reason)).collect()
    }

    /// Waits for closed video streams to show their last frames (at shutdown).
    pub fn finish(&mut self) {
        for t in self.finishing.drain(..) {
            let _ = t.join();
        }
    }
}

/// Channel positions for a stream that announced none: mono, or front left and
/// right, then SPA's AUX channels.
fn default_positions(channels: u8) -> Vec<u32> {
    const MONO: u32 = 2;
    const FL: u32 = 3;
    const FR: u32 = 4;
    const AUX0: u32 = 0x1000;
    match channels {
        1 => vec![MONO],
        2 => vec![FL, FR],
        n => (0..u32::from(n)).map(|i| AUX0 + i).collect(),
    }
}

/// The sample frames that land at once, for the jitter buffer's target: two access
/// units of the codec's usual size (decoders hold one back, then put out two), so the
/// target is right from the start rather than grown by underruns, which would move the
/// stream's render delay and with it the player's timing.
fn nominal_frame_samples(codec: &Codec, rate: u32) -> u32 {
    2 * match codec {
        Codec::Aac => 1024,
        Codec::Mp3 => 1152,
        Codec::Vorbis => 2048,
        Codec::Flac => 4096,
        _ => rate / 50,
    }
}

/// A video's decoder. A window sink that cannot open its display is tried once more
/// (seen under Xvfb: one connection refused among many taken), so that one refused
/// connection does not send the whole video back to the guest.
fn new_video_decoder(open: &StreamOpen, show: &Show) -> Result<VideoDecoder, String> {
    VideoDecoder::new(open, show.clone()).or_else(|e| {
        if !matches!(show, Show::Window { .. }) {
            return Err(e);
        }
        log::debug!("melange-host: {e}; trying the window once more");
        VideoDecoder::new(open, show.clone())
    })
}

fn describe_show(show: &Show) -> String {
    match show {
        Show::Window { title, .. } => format!("a window \"{title}\""),
        Show::Frames(_) => "frames logged".into(),
    }
}

impl Stream {
    /// From an access unit's arrival to its picture or sound coming out, where known.
    fn render_delay_ns(&self) -> Option<u64> {
        match (&self.video, &self.audio) {
            (Some(VideoPlay { decoder: Some(d), .. }), _) => d.render_delay_ns(),
            (_, Some(a)) if a.decoder.is_some() => a.delay.median(),
            _ => None,
        }
    }

    fn stop_decoder(&mut self) {
        if let Some(v) = &mut self.video {
            if let Some(d) = v.decoder.take() {
                d.stop();
            }
        }
        if let Some(a) = &mut self.audio {
            if let Some(d) = a.decoder.take() {
                d.stop();
            }
        }
    }

    /// A new decoder after one failed (errors here wait for the next retry).
    fn restart_decoder(&mut self, now: Instant, waker: Option<Arc<Waker>>) {
        self.stop_decoder();
        if let Some(v) = &mut self.video {
            v.decoder = new_video_decoder(&self.open, &v.show).ok();
        }
        if let (Some(a), MediaKind::EncodedAudio(format)) = (&mut self.audio, &self.open.media) {
            let format = AudioFormat { rate: format.rate, channels: a.channels as u8, positions: Vec::new() };
            a.decoder = AudioDecoder::new(&self.open, &format, move || {
                if let Some(w) = &waker {
                    w.wake();
                }
            })
            .ok();
        }
        if self.video.as_ref().is_some_and(|v| v.decoder.is_none())
            || self.audio.as_ref().is_some_and(|a| a.decoder.is_none())
        {
            self.failed_at = Some(now);
        }
    }

    fn request(&mut self, now: Instant) -> Option<Reply> {
        if self.last_request.is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_REQUEST_INTERVAL) {
            return None;
        }
        self.last_request = Some(now);
        Some(Reply::KeyframeRequest)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::output::encoded::FramesOutput;
    use crate::output::NullOutput;
    use melange_transport::message::{au_flags, AppInfo, VideoFormat};

    fn unit(pts_ns: u64, duration_ns: u64) -> AccessUnit {
        AccessUnit { seq: 0, flags: 0, pts_ns, dts_ns: 0, duration_ns, data: vec![0] }
    }

    /// Real time passes whole; a flood passes what was saved (2 s at the start, at most
    /// 10 s after a pause) and then real time only.
    #[test]
    fn the_real_time_budget_passes_real_time_and_bounds_a_flood() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        // 20 s at its pace: every unit taken.
        let ms = Duration::from_millis;
        for i in 0..1000u64 {
            let ns = b.media_ns(&unit(i * 20_000_000, 0), false);
            assert!(b.take(t0 + ms(20 * i), ns), "unit {i}");
        }
        // Then 100 s of media within 1 s: what was saved (at most 10 s... here 2 s left
        // and 20 ms a unit earned back) and no more.
        let start = t0 + ms(20_000);
        let taken = (0..5000u64)
            .filter(|i| {
                let ns = b.media_ns(&unit(20_000_000_000 + i * 20_000_000, 20_000_000), false);
                b.take(start + Duration::from_micros(200 * i), ns)
            })
            .count();
        assert!((100..=160).contains(&taken), "{taken} units of 20 ms taken in 1 s");
        // Units without duration or a sane step count as a frame.
        let mut v = Budget::new(t0);
        assert_eq!(v.media_ns(&unit(5, 0), true), 33_333_333);
        assert_eq!(v.media_ns(&unit(5 + 40_000_000, 0), true), 40_000_000);
        assert_eq!(v.media_ns(&unit(0, u64::MAX), true), 1_000_000_000);
        // Tiny claimed durations cost a 120 fps frame or a 2.5 ms packet at least.
        assert_eq!(v.media_ns(&unit(10, 1), true), MIN_VIDEO_UNIT_NS);
        assert_eq!(v.media_ns(&unit(11, 1), false), MIN_AUDIO_UNIT_NS);
    }

    /// An output that keeps what it was asked to open.
    #[derive(Default)]
    struct Recording(Vec<StreamDesc>);

    impl Output for Recording {
        fn open(
            &mut self,
            desc: &StreamDesc,
        ) -> Result<Box<dyn crate::output::StreamSink>, crate::output::OutputError> {
            self.0.push(desc.clone());
            NullOutput.open(desc)
        }

        fn describe(&self) -> String {
            "recording".into()
        }
    }

    /// The output learns how much of a codec's audio lands at once, whatever the
    /// guest's open said: its ring and backlog margin are sized by it.
    #[test]
    fn passthrough_audio_tells_the_output_what_lands_at_once() {
        crate::decode::init().unwrap();
        let dir = std::env::temp_dir().join(format!("melange-encoded-packets-{}", std::process::id()));
        let mut streams = EncodedStreams::new(Box::new(FramesOutput::new(&dir, 1 << 20).unwrap()), codec_bits::ENCODED);
        let mut output = Recording::default();
        let volume = Volume::unity();
        let audio = AudioFormat { rate: 48_000, channels: 2, positions: vec![] };
        let opens = [(Codec::Aac, vec![0x11, 0x90], 2048), (Codec::Opus { bitrate: 0 }, Vec::new(), 1920)];
        for (id, (codec, data, expected)) in opens.into_iter().enumerate() {
            let out = AudioOut {
                output: &mut output,
                session: 1,
                latency_frames: &|frames, _| (frames as usize * 2, true),
                quantum: &|_, _| 256,
                volume: &volume,
            };
            streams
                .open(
                    Instant::now(),
                    id as u32 + 1,
                    &open_of(MediaKind::EncodedAudio(audio.clone()), codec.clone(), data),
                    out,
                )
                .unwrap();
            let desc = output.0.last().unwrap();
            assert_eq!(desc.open.frame_samples, expected, "{codec:?}");
            assert_eq!(desc.latency_frames, 2 * expected as usize, "{codec:?}");
        }
        streams.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A player's window is taken when it has a size a screen can have; one with no
    /// size or beyond 8K is said and ignored.
    #[test]
    fn a_players_window_is_taken_when_sane_and_ignored_when_not() {
        use melange_transport::message::Geometry;
        crate::decode::init().unwrap();
        let dir = std::env::temp_dir().join(format!("melange-encoded-geometry-{}", std::process::id()));
        let mut streams = EncodedStreams::new(Box::new(FramesOutput::new(&dir, 1 << 20).unwrap()), codec_bits::ENCODED);
        let video = open_of(
            MediaKind::EncodedVideo(VideoFormat { width: 64, height: 64, framerate_num: 30, framerate_den: 1 }),
            Codec::Vp8,
            Vec::new(),
        );
        let volume = Volume::unity();
        let out = AudioOut {
            output: &mut NullOutput,
            session: 1,
            latency_frames: &|_, _| (1024, true),
            quantum: &|_, _| 256,
            volume: &volume,
        };
        streams.open(Instant::now(), 1, &video, out).unwrap();
        let at = |width, height| StreamControl::Geometry(Geometry { x: -5, y: 7, width, height });
        for control in [at(640, 360), at(0, 360), at(640, 0), at(100_000, 10), at(u32::MAX, u32::MAX)] {
            streams.control(1, control);
        }
        streams.control(1, at(8192, 8192));
        let lines = streams.pump(Instant::now(), 0).lines;
        assert!(lines[0].contains("shows it at 640x360 in its window (at -5,7)"), "{lines:?}");
        assert_eq!(lines.iter().filter(|l| l.contains("ignoring the player's window")).count(), 5, "{lines:?}");
        // Times no player gives: dropped as lost (a keyframe is asked for), said once.
        for (pts_ns, dts_ns, duration_ns) in [(u64::MAX, 0, 0), (0, 1 << 63, 0), (0, 0, u64::MAX)] {
            let au = AccessUnit {
                seq: 0,
                flags: au_flags::KEYFRAME | au_flags::HAS_DTS,
                pts_ns,
                dts_ns,
                duration_ns,
                data: vec![0; 8],
            };
            streams.access_unit(Instant::now(), 1, 1, &au);
        }
        let lines = streams.pump(Instant::now(), 0).lines;
        assert_eq!(lines.iter().filter(|l| l.contains("timed beyond 2^62 ns")).count(), 1, "{lines:?}");
        let closed = streams.close(1, "done").unwrap();
        assert!(closed.contains("3 dropped (times beyond 2^62 ns)"), "{closed}");
        streams.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A codec named on the command line comes with all its profiles; the log names a
    /// missing profile set only when its codec is not missing whole.
    #[test]
    fn codec_lists_carry_profiles_and_name_them_when_missing_alone() {
        let h264 = parse_codecs("h264,aac").unwrap();
        assert_eq!(h264, codec_bits::H264 | codec_bits::H264_HIGH_PROFILES | codec_bits::AAC);
        assert_eq!(parse_codecs("all").unwrap(), codec_bits::ENCODED);
        assert!(parse_codecs("h264,foo").unwrap_err().contains("unknown codec \"foo\""));
        assert_eq!(codec_names(codec_bits::H264 | codec_bits::H264_HIGH_PROFILES), "h264");
        assert_eq!(codec_names(codec_bits::H264_HIGH_PROFILES | codec_bits::VP9), "vp9, h264's profiles beyond High");
    }

    fn open_of(media: MediaKind, codec: Codec, codec_data: Vec<u8>) -> StreamOpen {
        StreamOpen { media, codec, frame_samples: 0, app: AppInfo::default(), codec_data }
    }

    /// A guest cannot make the host run more decoders than the limits, and setup data
    /// that does not parse is refused, not decoded.
    #[test]
    fn decoders_are_bounded_and_bad_setup_data_is_refused() {
        crate::decode::init().unwrap();
        let dir = std::env::temp_dir().join(format!("melange-encoded-limits-{}", std::process::id()));
        let mut streams = EncodedStreams::new(Box::new(FramesOutput::new(&dir, 1 << 20).unwrap()), codec_bits::ENCODED);
        let mut output = NullOutput;
        let latency = |_: u32, _: u32| (1024, true);
        let quantum = |_: u32, _: u32| 256;
        let volume = Volume::unity();
        let mut open = |streams: &mut EncodedStreams, id: u32, o: &StreamOpen| {
            let out = AudioOut {
                output: &mut output,
                session: 1,
                latency_frames: &latency,
                quantum: &quantum,
                volume: &volume,
            };
            streams.open(Instant::now(), id, o, out)
        };
        let video = open_of(
            MediaKind::EncodedVideo(VideoFormat { width: 64, height: 64, framerate_num: 30, framerate_den: 1 }),
            Codec::Vp8,
            Vec::new(),
        );
        for id in 1..=MAX_VIDEOS as u32 {
            open(&mut streams, id, &video).unwrap();
        }
        let refused = open(&mut streams, 100, &video).unwrap_err();
        assert!(refused.contains("at most 8 videos"), "{refused}");
        let audio = AudioFormat { rate: 48_000, channels: 2, positions: vec![] };
        let aac = open_of(MediaKind::EncodedAudio(audio.clone()), Codec::Aac, vec![0x11, 0x90]);
        for id in 200..200 + MAX_AUDIOS as u32 {
            open(&mut streams, id, &aac).unwrap();
        }
        assert!(open(&mut streams, 300, &aac).unwrap_err().contains("at most 16"));
        // Closing one makes room again.
        assert!(streams.close(1, "done").is_some());
        open(&mut streams, 101, &video).unwrap();
        // Vorbis headers that do not parse, AAC without its config: refused.
        streams.close_all("done");
        let vorbis = open_of(MediaKind::EncodedAudio(audio.clone()), Codec::Vorbis, vec![0, 0, 0, 9, 1]);
        assert!(open(&mut streams, 400, &vorbis).unwrap_err().contains("malformed"));
        let bare_aac = open_of(MediaKind::EncodedAudio(audio), Codec::Aac, Vec::new());
        assert!(open(&mut streams, 401, &bare_aac).is_err());
        // Rates and layouts no player has: refused before anything is sized by them.
        for (rate, channels) in [(1_500_000_000, 2), (0, 2), (48_000, 0), (48_000, 9)] {
            let odd = AudioFormat { rate, channels, positions: vec![] };
            let refused = open(&mut streams, 402, &open_of(MediaKind::EncodedAudio(odd), Codec::Aac, vec![0x11, 0x90]));
            assert!(refused.unwrap_err().contains("no audio melange-host plays"), "{rate} Hz, {channels} channels");
        }
        // A guest's camera stream, of any codec: the camera only goes host to guest.
        let camera = VideoFormat { width: 640, height: 360, framerate_num: 30, framerate_den: 1 };
        for codec in [Codec::RawI420, Codec::Vp8] {
            let refused = open(&mut streams, 403, &open_of(MediaKind::Camera(camera.clone()), codec, Vec::new()));
            assert!(refused.unwrap_err().contains("host to the guest"));
        }
        streams.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
