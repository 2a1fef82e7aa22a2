//! The WAV (RIFF/WAVE) file layout, written and read in one place: melange-host's
//! `--output wav` writes it, the tests and tools read what it and `pw-record` wrote
//! and write their test signals with it.
//!
//! [`header`] makes the 44-byte header of a plain file of 16-bit PCM or 32-bit IEEE
//! float; [`parse`] walks a file's chunks to its format and its audio, for plain files
//! and `WAVE_FORMAT_EXTENSIBLE` ones (as `pw-record` writes). Bytes in, bytes out: no
//! I/O, and no panic on any input.

#![forbid(unsafe_code)]

use thiserror::Error;

/// Bytes of the header [`header`] makes: the audio starts there.
pub const HEADER_BYTES: usize = 44;
/// Most audio a file can say it holds: what fits in the RIFF chunk's 32-bit size
/// beside the rest of the header.
pub const MAX_DATA_BYTES: u64 = u32::MAX as u64 - 36;

/// `wFormatTag` of 16-bit PCM.
const FORMAT_PCM: u16 = 1;
/// `wFormatTag` of IEEE float.
const FORMAT_IEEE_FLOAT: u16 = 3;
/// `wFormatTag` saying that the real tag is in the extension (its sub-format GUID's
/// first two bytes).
const FORMAT_EXTENSIBLE: u16 = 0xFFFE;

/// How samples are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    /// Signed 16-bit little-endian PCM.
    S16,
    /// 32-bit little-endian IEEE float.
    F32,
}

impl SampleFormat {
    /// Bytes of one sample.
    pub fn bytes(self) -> u16 {
        match self {
            SampleFormat::S16 => 2,
            SampleFormat::F32 => 4,
        }
    }

    fn tag(self) -> u16 {
        match self {
            SampleFormat::S16 => FORMAT_PCM,
            SampleFormat::F32 => FORMAT_IEEE_FLOAT,
        }
    }
}

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavFormat {
    /// How samples are stored.
    pub sample: SampleFormat,
    /// Interleaved channels.
    pub channels: u16,
    /// Sample frames per second.
    pub rate: u32,
}

/// Why bytes are not a WAV file [`parse`] can read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WavError {
    /// No `RIFF`/`WAVE` at the start.
    #[error("not a WAV file")]
    NotWav,
    /// The chunks end before a `data` chunk.
    #[error("no data chunk")]
    NoData,
    /// A format other than 16-bit PCM and 32-bit float, or no `fmt ` chunk before
    /// the data.
    #[error("unsupported WAV format {tag}/{bits} bits")]
    Unsupported {
        /// The format tag (0: no `fmt ` chunk).
        tag: u16,
        /// Bits per sample.
        bits: u16,
    },
}

/// The header of a plain WAV file of `format` holding `data_bytes` of audio (at most
/// [`MAX_DATA_BYTES`]; more is said as that).
pub fn header(format: WavFormat, data_bytes: u64) -> [u8; HEADER_BYTES] {
    let block = format.channels.saturating_mul(format.sample.bytes());
    // Fits: MAX_DATA_BYTES + 36 is u32::MAX.
    let data = data_bytes.min(MAX_DATA_BYTES) as u32;
    let mut h = [0u8; HEADER_BYTES];
    let fields: [&[u8]; 13] = [
        b"RIFF",
        &(36 + data).to_le_bytes(),
        b"WAVE",
        b"fmt ",
        &16u32.to_le_bytes(),
        &format.sample.tag().to_le_bytes(),
        &format.channels.to_le_bytes(),
        &format.rate.to_le_bytes(),
        &format.rate.saturating_mul(u32::from(block)).to_le_bytes(),
        &block.to_le_bytes(),
        &(format.sample.bytes() * 8).to_le_bytes(),
        b"data",
        &data.to_le_bytes(),
    ];
    let mut at = 0;
    for field in fields {
        h[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    h
}

/// The format of a WAV file's `bytes` and its audio: the `data` chunk, or as much of
/// it as is there (a file cut short, or still being written, reads as what it holds).
pub fn parse(bytes: &[u8]) -> Result<(WavFormat, &[u8]), WavError> {
    if bytes.get(0..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WAVE") {
        return Err(WavError::NotWav);
    }
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map_or(0, |v| u16::from_le_bytes([v[0], v[1]]));
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map_or(0, |v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
    let mut pos = 12usize;
    let (mut tag, mut channels, mut rate, mut bits) = (0u16, 0u16, 0u32, 0u16);
    while let Some(id) = pos.checked_add(4).and_then(|end| bytes.get(pos..end)) {
        let len = u32_at(bytes, pos + 4) as usize;
        let start = pos.saturating_add(8).min(bytes.len());
        let body = &bytes[start..start.saturating_add(len).min(bytes.len())];
        if id == b"fmt " && body.len() >= 16 {
            tag = u16_at(body, 0);
            channels = u16_at(body, 2);
            rate = u32_at(body, 4);
            bits = u16_at(body, 14);
            if tag == FORMAT_EXTENSIBLE && body.len() >= 26 {
                tag = u16_at(body, 24);
            }
        } else if id == b"data" {
            let sample = match (tag, bits) {
                (FORMAT_PCM, 16) => SampleFormat::S16,
                (FORMAT_IEEE_FLOAT, 32) => SampleFormat::F32,
                _ => return Err(WavError::Unsupported { tag, bits }),
            };
            return Ok((WavFormat { sample, channels, rate }, body));
        }
        // Chunks are padded to an even length.
        pos = start.saturating_add(len).saturating_add(len & 1);
    }
    Err(WavError::NoData)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STEREO_S16: WavFormat = WavFormat { sample: SampleFormat::S16, channels: 2, rate: 48_000 };

    #[test]
    fn the_header_of_a_stereo_s16_file_is_the_canonical_one() {
        let golden: [u8; 44] = [
            b'R', b'I', b'F', b'F', 44, 0, 0, 0, b'W', b'A', b'V', b'E', b'f', b'm', b't', b' ', 16, 0, 0, 0, 1, 0, 2,
            0, 0x80, 0xBB, 0, 0, 0x00, 0xEE, 0x02, 0, 4, 0, 16, 0, b'd', b'a', b't', b'a', 8, 0, 0, 0,
        ];
        assert_eq!(header(STEREO_S16, 8), golden);
    }

    #[test]
    fn what_is_written_reads_back() {
        for format in [STEREO_S16, WavFormat { sample: SampleFormat::F32, channels: 1, rate: 44_100 }] {
            let mut file = header(format, 12).to_vec();
            file.extend_from_slice(&[7; 12]);
            assert_eq!(parse(&file), Ok((format, &[7u8; 12][..])));
            // Cut short: what is there.
            assert_eq!(parse(&file[..50]), Ok((format, &[7u8; 6][..])));
        }
    }

    #[test]
    fn a_size_beyond_the_format_is_said_as_the_most_it_can_say() {
        let h = header(STEREO_S16, u64::MAX);
        assert_eq!(u32::from_le_bytes([h[4], h[5], h[6], h[7]]), u32::MAX);
        assert_eq!(u64::from(u32::from_le_bytes([h[40], h[41], h[42], h[43]])), MAX_DATA_BYTES);
    }

    #[test]
    fn extensible_files_and_other_chunks_are_read() {
        // As pw-record writes: WAVE_FORMAT_EXTENSIBLE with the float sub-format, after
        // an odd-length chunk of something else.
        let mut file = b"RIFF\0\0\0\0WAVE".to_vec();
        file.extend_from_slice(b"LIST\x03\0\0\0abc\0");
        let mut fmt = vec![0u8; 40];
        fmt[0..2].copy_from_slice(&0xFFFEu16.to_le_bytes());
        fmt[2..4].copy_from_slice(&2u16.to_le_bytes());
        fmt[4..8].copy_from_slice(&48_000u32.to_le_bytes());
        fmt[14..16].copy_from_slice(&32u16.to_le_bytes());
        fmt[24..26].copy_from_slice(&3u16.to_le_bytes());
        file.extend_from_slice(b"fmt \x28\0\0\0");
        file.extend_from_slice(&fmt);
        file.extend_from_slice(b"data\x08\0\0\0");
        file.extend_from_slice(&1.0f32.to_le_bytes());
        file.extend_from_slice(&(-1.0f32).to_le_bytes());
        let (format, data) = parse(&file).unwrap();
        assert_eq!(format, WavFormat { sample: SampleFormat::F32, channels: 2, rate: 48_000 });
        assert_eq!(data.len(), 8);
    }

    #[test]
    fn what_it_cannot_read_it_says() {
        assert_eq!(parse(b"RIFX\0\0\0\0WAVE"), Err(WavError::NotWav));
        assert_eq!(parse(b"RIFF\0\0\0\0WAVEfmt "), Err(WavError::NoData));
        assert_eq!(parse(b"RIFF\0\0\0\0WAVEdata\0\0\0\0"), Err(WavError::Unsupported { tag: 0, bits: 0 }));
        let mut u8_file = header(STEREO_S16, 0);
        u8_file[34] = 8;
        assert_eq!(parse(&u8_file), Err(WavError::Unsupported { tag: 1, bits: 8 }));
    }

    proptest! {
        #[test]
        fn no_input_makes_it_panic(tail in proptest::collection::vec(any::<u8>(), 0..200), cut in 0usize..300) {
            let mut file = b"RIFF\0\0\0\0WAVE".to_vec();
            file.extend_from_slice(&tail);
            let _ = parse(&file);
            let mut file = header(STEREO_S16, 4).to_vec();
            file.extend_from_slice(&tail);
            file.truncate(cut);
            let _ = parse(&file);
        }
    }
}
