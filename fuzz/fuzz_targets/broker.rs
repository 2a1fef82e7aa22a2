//! The guest's media broker fed by stubs that send anything: valid sessions with
//! streams, access units and control, raw frames of any kind, and bytes, split at
//! random points, interleaved with the host coming, going, refusing streams and asking
//! for keyframes. Never panics; every command it passes on names a stream it opened.
#![no_main]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use melange_guest::broker::BrokerCore;
use melange_guest::core::{BrokerNote, Command};
use melange_transport::message::{codec_bits, kind_bits, Capabilities};

fuzz_target!(|data: &[u8]| {
    let mut next = 0u32;
    let mut broker = BrokerCore::new(move || {
        next += 1;
        next
    });
    let caps = Capabilities { codecs: codec_bits::ENCODED, max_streams: 64, kinds: kind_bits::ENCODED_VIDEO };
    let t0 = Instant::now();
    let mut now = t0;
    let mut open: BTreeSet<u32> = BTreeSet::new();
    let mut ops = data;
    while let [op, arg, rest @ ..] = ops {
        let client = u64::from(arg % 3);
        let mut used = 0;
        match op % 8 {
            0 => broker.note(now, BrokerNote::HostReady(caps.clone())),
            1 => broker.note(now, BrokerNote::HostGone),
            2 => broker.accept(now, client),
            3 => broker.hung_up(client),
            4 => broker.note(now, BrokerNote::Rejected(u32::from(*arg % 8), "no".into())),
            5 => broker.note(now, BrokerNote::KeyframeRequest(u32::from(*arg % 8))),
            6 => now += Duration::from_millis(u64::from(*arg) * 50),
            _ => {
                let len = usize::from(*arg).min(rest.len());
                broker.input(now, client, &rest[..len]);
                used = len;
            }
        }
        broker.timeout(now);
        for id in 0..3 {
            let n = broker.transmit(id).len();
            broker.consume(id, n);
        }
        while broker.poll_gone().is_some() {}
        while let Some(command) = broker.poll_command() {
            match command {
                Command::Open(port, _) => {
                    assert!(open.insert(port), "stream {port} opened twice");
                }
                Command::AccessUnit(port, _) | Command::Control(port, _) => {
                    assert!(open.contains(&port), "a command for stream {port}, which is not open");
                }
                Command::Close(port, _) => {
                    assert!(open.remove(&port), "stream {port} closed but not open");
                }
                _ => {}
            }
        }
        ops = &rest[used..];
    }
});
