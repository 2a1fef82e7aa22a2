//! The few libopus calls Melange needs, through the system library.

use std::ffi::{c_char, c_int, CStr};
use std::ptr::NonNull;

use thiserror::Error;

#[repr(C)]
struct OpusEncoderRaw {
    _private: [u8; 0],
}
#[repr(C)]
struct OpusDecoderRaw {
    _private: [u8; 0],
}

#[link(name = "opus")]
extern "C" {
    fn opus_encoder_create(fs: i32, channels: c_int, application: c_int, error: *mut c_int) -> *mut OpusEncoderRaw;
    fn opus_encoder_destroy(st: *mut OpusEncoderRaw);
    fn opus_encode_float(st: *mut OpusEncoderRaw, pcm: *const f32, frame_size: c_int, data: *mut u8, max: i32) -> i32;
    fn opus_encoder_ctl(st: *mut OpusEncoderRaw, request: c_int, ...) -> c_int;
    fn opus_decoder_create(fs: i32, channels: c_int, error: *mut c_int) -> *mut OpusDecoderRaw;
    fn opus_decoder_destroy(st: *mut OpusDecoderRaw);
    fn opus_decode_float(
        st: *mut OpusDecoderRaw,
        data: *const u8,
        len: i32,
        pcm: *mut f32,
        frame_size: c_int,
        fec: c_int,
    ) -> c_int;
    fn opus_decoder_get_nb_samples(st: *const OpusDecoderRaw, packet: *const u8, len: i32) -> c_int;
    fn opus_strerror(error: c_int) -> *const c_char;
    fn opus_get_version_string() -> *const c_char;
}

const OPUS_SET_BITRATE_REQUEST: c_int = 4002;
const OPUS_SET_COMPLEXITY_REQUEST: c_int = 4010;
const OPUS_GET_LOOKAHEAD_REQUEST: c_int = 4027;
const OPUS_OK: c_int = 0;

/// Opus coding mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Application {
    /// Speech, for the microphone.
    Voip = 2048,
    /// Best quality for music and general audio (libopus's default; Melange's taps use
    /// [`Application::RestrictedLowDelay`]).
    Audio = 2049,
    /// Lowest algorithmic delay.
    RestrictedLowDelay = 2051,
}

/// A libopus error code with its text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("opus: {text} ({code})")]
pub struct OpusError {
    /// libopus error code (negative).
    pub code: i32,
    /// `opus_strerror`.
    pub text: String,
}

fn check(code: c_int) -> Result<c_int, OpusError> {
    if code >= 0 {
        return Ok(code);
    }
    // SAFETY: opus_strerror returns a static NUL-terminated string for any code.
    let text = unsafe { CStr::from_ptr(opus_strerror(code)) }.to_string_lossy().into_owned();
    Err(OpusError { code, text })
}

/// libopus's version string, for logs.
pub fn version() -> String {
    // SAFETY: static NUL-terminated string.
    unsafe { CStr::from_ptr(opus_get_version_string()) }.to_string_lossy().into_owned()
}

/// Rates libopus accepts.
pub const RATES: [u32; 5] = [8000, 12000, 16000, 24000, 48000];

/// An Opus encoder.
#[derive(Debug)]
pub struct Encoder {
    st: NonNull<OpusEncoderRaw>,
    channels: usize,
}

// SAFETY: the encoder state is plain memory owned by this value; libopus keeps no
// thread-local state, so moving it between threads is fine (it is not Sync).
unsafe impl Send for Encoder {}

impl Encoder {
    /// An encoder for `rate` (one of [`RATES`]) and 1 or 2 channels.
    pub fn new(rate: u32, channels: u8, application: Application, bitrate: u32) -> Result<Self, OpusError> {
        let mut err: c_int = 0;
        let rate = i32::try_from(rate).map_err(|_| OpusError { code: -1, text: "bad rate".into() })?;
        // SAFETY: valid arguments; the error out-pointer is valid.
        let st = unsafe { opus_encoder_create(rate, c_int::from(channels), application as c_int, &mut err) };
        check(err)?;
        let st = NonNull::new(st).ok_or(OpusError { code: -7, text: "allocation failed".into() })?;
        let enc = Self { st, channels: usize::from(channels) };
        let bitrate = i32::try_from(bitrate).unwrap_or(i32::MAX);
        // SAFETY: SET_BITRATE takes one opus_int32 argument.
        check(unsafe { opus_encoder_ctl(enc.st.as_ptr(), OPUS_SET_BITRATE_REQUEST, bitrate) })?;
        Ok(enc)
    }

    /// Sets the encoder's complexity, 0 (cheapest) to 10 (libopus's default).
    pub fn set_complexity(&mut self, complexity: u8) -> Result<(), OpusError> {
        // SAFETY: SET_COMPLEXITY takes one opus_int32 argument.
        check(unsafe {
            opus_encoder_ctl(self.st.as_ptr(), OPUS_SET_COMPLEXITY_REQUEST, i32::from(complexity.min(10)))
        })?;
        Ok(())
    }

    /// Sets the bitrate in bit/s (libopus clamps it to what it can do).
    pub fn set_bitrate(&mut self, bitrate: u32) -> Result<(), OpusError> {
        let bitrate = i32::try_from(bitrate).unwrap_or(i32::MAX);
        // SAFETY: SET_BITRATE takes one opus_int32 argument.
        check(unsafe { opus_encoder_ctl(self.st.as_ptr(), OPUS_SET_BITRATE_REQUEST, bitrate) })?;
        Ok(())
    }

    /// Algorithmic delay of the encoder in samples.
    pub fn lookahead(&self) -> u32 {
        let mut v: i32 = 0;
        // SAFETY: GET_LOOKAHEAD takes one opus_int32 out-pointer.
        let rc = unsafe { opus_encoder_ctl(self.st.as_ptr(), OPUS_GET_LOOKAHEAD_REQUEST, &mut v as *mut i32) };
        if rc == OPUS_OK {
            u32::try_from(v).unwrap_or(0)
        } else {
            0
        }
    }

    /// Encodes one frame of interleaved samples into `out` (cleared first). The frame
    /// must be 2.5, 5, 10, 20, 40 or 60 ms long.
    pub fn encode(&mut self, pcm: &[f32], out: &mut Vec<u8>) -> Result<(), OpusError> {
        let frames = pcm.len() / self.channels.max(1);
        out.clear();
        out.resize(4000, 0); // libopus's recommended maximum packet size
                             // SAFETY: pcm holds frames*channels samples; out has out.len() writable bytes.
        let n = unsafe {
            opus_encode_float(self.st.as_ptr(), pcm.as_ptr(), frames as c_int, out.as_mut_ptr(), out.len() as i32)
        };
        let n = check(n)?;
        out.truncate(n as usize);
        Ok(())
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: created by opus_encoder_create, destroyed once.
        unsafe { opus_encoder_destroy(self.st.as_ptr()) }
    }
}

/// An Opus decoder.
#[derive(Debug)]
pub struct Decoder {
    st: NonNull<OpusDecoderRaw>,
    channels: usize,
}

// SAFETY: as for Encoder.
unsafe impl Send for Decoder {}

impl Decoder {
    /// A decoder for `rate` (one of [`RATES`]) and 1 or 2 channels.
    pub fn new(rate: u32, channels: u8) -> Result<Self, OpusError> {
        let mut err: c_int = 0;
        let rate = i32::try_from(rate).map_err(|_| OpusError { code: -1, text: "bad rate".into() })?;
        // SAFETY: valid arguments; the error out-pointer is valid.
        let st = unsafe { opus_decoder_create(rate, c_int::from(channels), &mut err) };
        check(err)?;
        let st = NonNull::new(st).ok_or(OpusError { code: -7, text: "allocation failed".into() })?;
        Ok(Self { st, channels: usize::from(channels) })
    }

    /// Sample frames a packet decodes to, without decoding it.
    pub fn packet_frames(&self, packet: &[u8]) -> Result<usize, OpusError> {
        // SAFETY: packet is a valid slice of the given length.
        let n = unsafe { opus_decoder_get_nb_samples(self.st.as_ptr(), packet.as_ptr(), packet.len() as i32) };
        check(n).map(|n| n as usize)
    }

    /// Decodes a packet (or conceals a lost one when `packet` is `None`) into `out`,
    /// which must hold `frames * channels` samples; returns the frames written.
    pub fn decode(&mut self, packet: Option<&[u8]>, out: &mut [f32]) -> Result<usize, OpusError> {
        let frames = out.len() / self.channels.max(1);
        let (ptr, len) = packet.map_or((std::ptr::null(), 0), |p| (p.as_ptr(), p.len() as i32));
        // SAFETY: out holds frames*channels floats; ptr/len describe a valid slice or null.
        let n = unsafe { opus_decode_float(self.st.as_ptr(), ptr, len, out.as_mut_ptr(), frames as c_int, 0) };
        check(n).map(|n| n as usize)
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: created by opus_decoder_create, destroyed once.
        unsafe { opus_decoder_destroy(self.st.as_ptr()) }
    }
}
