//! The playout decision on arbitrary (buffered, wanted) sequences: it never takes more
//! than is buffered or wanted, and its target stays within its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use melange_shim::playout::Playout;

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else { return };
    let initial = usize::from(*first) * 64 + 1;
    let mut p = Playout::new(initial, 4800);
    for pair in rest.chunks_exact(4) {
        let buffered = usize::from(u16::from_le_bytes([pair[0], pair[1]]));
        let wanted = usize::from(u16::from_le_bytes([pair[2], pair[3]]));
        let take = p.plan(buffered, wanted);
        assert!(take <= buffered && take <= wanted);
        assert!(p.target() >= initial && p.target() <= initial * 4);
    }
});
