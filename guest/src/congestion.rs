//! Opus bitrate against a port that cannot keep up.
//!
//! The guest's media waits in the session's queue when the port (a slow or stalled
//! host, a throttled chardev) takes less than it is given. [`BitrateLadder`] watches how
//! long that queue is, in time at the rate media is made: while it stays over
//! [`BEHIND`], the bitrate steps down a quarter at a time, at most once per [`HOLD`],
//! to [`MIN_BITRATE`]; once the queue has been near empty for [`CALM`], it steps back up
//! a notch at a time to what was configured. Media the port still cannot take is
//! dropped oldest first by the session ([`melange_transport::Session`]).
//!
//! Plain arithmetic with time passed in: tested with virtual time.

#![forbid(unsafe_code)]

/// Queued media worth more than this, at the rate media is made, means the port is
/// behind.
pub const BEHIND_MS: u64 = 60;
/// Queued media worth less than this means the port keeps up.
pub const CALM_MS: u64 = 10;
/// Least time between two steps down: the queue needs a moment to show a step's effect.
pub const HOLD_NS: u64 = 1_000_000_000;
/// How long the port must keep up before the bitrate steps up again. A step up that
/// overshoots costs a little queue and a step back down a second later; a slow climb
/// costs quality for as long as it lasts (from the floor to 128 kbit/s: 10 s).
pub const CALM_NS: u64 = 2_000_000_000;
/// The bitrate never steps below this (bit/s): stereo Opus is still clean speech here.
pub const MIN_BITRATE: u32 = 24_000;

/// Which way a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The port fell behind: a quarter less.
    Down(u32),
    /// The port kept up for a while: half again, up to the configured bitrate.
    Up(u32),
}

/// The bitrate the guest's Opus encoders use now. See the module docs.
#[derive(Debug, Clone)]
pub struct BitrateLadder {
    configured: u32,
    current: u32,
    last_down_ns: Option<u64>,
    /// What was queued at the last step down: a queue that has shrunk since is
    /// draining, and the step was enough.
    queued_at_down: usize,
    calm_since_ns: Option<u64>,
    /// Steps taken so far, down and up.
    pub steps_down: u64,
    /// See [`BitrateLadder::steps_down`].
    pub steps_up: u64,
}

impl BitrateLadder {
    /// A ladder starting at (and never above) `configured` bit/s.
    pub fn new(configured: u32) -> Self {
        Self {
            configured,
            current: configured,
            last_down_ns: None,
            queued_at_down: 0,
            calm_since_ns: None,
            steps_down: 0,
            steps_up: 0,
        }
    }

    /// The bitrate to encode with now.
    pub fn bitrate(&self) -> u32 {
        self.current
    }

    /// Feeds what is queued for the port (`queued_bytes`) and how fast media is made
    /// (`media_bytes_per_s`, all streams) at `now_ns`; returns a step when the bitrate
    /// changes.
    pub fn update(&mut self, now_ns: u64, queued_bytes: usize, media_bytes_per_s: f64) -> Option<Step> {
        if media_bytes_per_s <= 0.0 {
            self.calm_since_ns = None;
            return None;
        }
        let queued_ms = queued_bytes as f64 * 1000.0 / media_bytes_per_s;
        if queued_ms > BEHIND_MS as f64 {
            self.calm_since_ns = None;
            let held = self.last_down_ns.is_some_and(|t| now_ns.saturating_sub(t) < HOLD_NS);
            let draining = self.last_down_ns.is_some() && queued_bytes < self.queued_at_down;
            let lower = (self.current / 4 * 3).max(MIN_BITRATE.min(self.configured));
            if held || draining || lower == self.current {
                return None;
            }
            self.current = lower;
            self.last_down_ns = Some(now_ns);
            self.queued_at_down = queued_bytes;
            self.steps_down += 1;
            return Some(Step::Down(lower));
        }
        if queued_ms >= CALM_MS as f64 || self.current == self.configured {
            self.calm_since_ns = None;
            return None;
        }
        let since = *self.calm_since_ns.get_or_insert(now_ns);
        if now_ns.saturating_sub(since) < CALM_NS {
            return None;
        }
        self.current = (self.current / 2 * 3).min(self.configured);
        self.calm_since_ns = Some(now_ns);
        self.steps_up += 1;
        Some(Step::Up(self.current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port that moves `capacity` bytes a second while the encoders make media at
    /// the ladder's bitrate; every 10 ms. Returns the bitrate each second.
    fn run(ladder: &mut BitrateLadder, queued: &mut f64, capacity: impl Fn(f64) -> f64, seconds: u32) -> Vec<u32> {
        let mut per_second = Vec::new();
        for tick in 0..seconds * 100 {
            let t = f64::from(tick) / 100.0;
            let made = f64::from(ladder.bitrate()) / 8.0;
            *queued = (*queued + made / 100.0 - capacity(t) / 100.0).max(0.0);
            ladder.update((t * 1e9) as u64, *queued as usize, made);
            if tick % 100 == 99 {
                per_second.push(ladder.bitrate());
            }
        }
        per_second
    }

    #[test]
    fn a_port_at_half_the_rate_steps_the_bitrate_down_and_a_recovered_one_back_up() {
        let mut ladder = BitrateLadder::new(128_000);
        let mut queued = 0.0;
        // Half of 128 kbit/s for 20 s, then plenty.
        let rates = run(&mut ladder, &mut queued, |t| if t < 20.0 { 8_000.0 } else { 1e6 }, 60);
        // It steps down to what the port takes within a few seconds, and no further
        // than a step below it (a draining queue does not push it down).
        let by_5s = rates[4];
        assert!(by_5s <= 64_000, "still {by_5s} bit/s after 5 s: {rates:?}");
        assert!(rates[..20].iter().all(|b| *b >= 40_000), "{rates:?}");
        // ...and, once the port keeps up, climbs back to what was configured.
        assert_eq!(*rates.last().unwrap_or(&0), 128_000, "{rates:?}");
        assert!(ladder.steps_down >= 2 && ladder.steps_up >= 2, "{} down, {} up", ladder.steps_down, ladder.steps_up);
    }

    #[test]
    fn a_port_that_keeps_up_never_moves_it_and_a_stalled_one_stops_at_the_floor() {
        let mut ladder = BitrateLadder::new(128_000);
        let mut queued = 0.0;
        let rates = run(&mut ladder, &mut queued, |_| 1e6, 30);
        assert!(rates.iter().all(|b| *b == 128_000));
        assert_eq!(ladder.steps_down, 0);
        let rates = run(&mut ladder, &mut queued, |_| 0.0, 30);
        assert_eq!(*rates.last().unwrap_or(&0), MIN_BITRATE);
        // One step a second at most.
        assert!(ladder.steps_down <= 30);
        // A configured bitrate below the floor is kept, never raised.
        let mut low = BitrateLadder::new(16_000);
        let mut queued = 0.0;
        assert!(run(&mut low, &mut queued, |_| 0.0, 5).iter().all(|b| *b == 16_000));
    }
}
