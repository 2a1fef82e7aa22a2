//! The Opus (and PCM) decode path on hostile packets and claimed durations: never
//! panics, never writes past what it claims, and refuses packets that do not match.
//!
//! Input: a selector byte (layout, codec, concealment), then records of
//! `[length][claimed duration / 40][packet bytes]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use melange_shim::codec::StreamDecoder;
use melange_transport::message::{AudioFormat, Codec};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else { return };
    let (rate, channels) = [(48000, 2), (48000, 1), (16000, 1), (8000, 2)][usize::from(sel % 4)];
    let format = AudioFormat { rate, channels, positions: vec![3; usize::from(channels)] };
    let codec = if sel & 4 == 0 { Codec::Opus { bitrate: 64_000 } } else { Codec::PcmS16Le };
    let Ok(mut dec) = StreamDecoder::new(&format, &codec, rate / 100) else { return };
    let mut out = Vec::new();
    while let [len, claim, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (packet, next) = tail.split_at(n);
        rest = next;
        let claimed = usize::from(*claim) * 40;
        let before = out.len();
        match dec.decode(packet, claimed, &mut out) {
            Ok(()) => assert_eq!(out.len() - before, claimed * usize::from(channels)),
            Err(_) => assert_eq!(out.len(), before),
        }
        if sel & 8 != 0 {
            dec.conceal(rate as usize / 100, &mut out);
        }
        out.clear();
    }
});
