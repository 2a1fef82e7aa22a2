//! The monotonic clock both ends stamp media with, and its domain.

use std::time::{Duration, Instant};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock PipeWire's graph time (`pw_time.now`) uses.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// An [`Instant`] and the monotonic nanoseconds at the same moment.
pub fn now_pair() -> (Instant, u64) {
    (Instant::now(), monotonic_ns())
}

/// Converts an instant to monotonic nanoseconds using a pair from [`now_pair`].
pub fn instant_to_ns(at: Instant, pair: (Instant, u64)) -> u64 {
    if at >= pair.0 {
        pair.1.saturating_add(dur_ns(at - pair.0))
    } else {
        pair.1.saturating_sub(dur_ns(pair.0 - at))
    }
}

fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// This machine's clock domain: the kernel's boot id. Two ends with the same id read the
/// same monotonic clock (the local stand-in for a VM), so latency is measurable directly.
pub fn clock_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}
