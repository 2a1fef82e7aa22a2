//! Control-message decoding on arbitrary payloads: never panics, and whatever decodes
//! re-encodes and decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use melange_transport::message::{
    decode_control, encode_control, AccessUnit, Heartbeat, Hello, MediaPacket, Reason, StreamControl, StreamEnd,
    StreamOpen, Welcome,
};

fn round_trip<T>(name: &'static str, data: &[u8])
where
    T: serde::Serialize + for<'a> serde::Deserialize<'a> + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = decode_control::<T>(name, data) {
        if let Ok(bytes) = encode_control(name, &msg) {
            assert_eq!(decode_control::<T>(name, &bytes).expect("re-decodes"), msg);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Hello>("hello", data);
    round_trip::<Welcome>("welcome", data);
    round_trip::<Reason>("reason", data);
    round_trip::<Heartbeat>("heartbeat", data);
    round_trip::<StreamOpen>("stream-open", data);
    round_trip::<StreamEnd>("stream-end", data);
    round_trip::<StreamControl>("stream-control", data);
    // Hellos and welcomes of any version read without panicking.
    let _ = Hello::decode(data);
    let _ = Welcome::decode(data);
    if let Ok((au, size, first)) = AccessUnit::decode_header(data) {
        let mut out = Vec::new();
        AccessUnit { data: first.to_vec(), ..au }.encode_header(&mut out);
        if first.len() == size {
            assert_eq!(&out[..], &data[..out.len()]);
        }
    }
    if let Ok(p) = MediaPacket::decode(data) {
        let mut out = Vec::new();
        p.encode_into(&mut out);
        assert_eq!(out, data);
    }
});
