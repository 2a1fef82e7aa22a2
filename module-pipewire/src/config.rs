//! Module arguments, from the `args = { ... }` block of `melange-guest.conf` (SPA-JSON).
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `port` | `virtio:org.melange.media.0` | where the host is: `virtio:NAME`, `unix:PATH` |
//! | `codec` | `opus` | `opus` or `pcm` (s16le) |
//! | `bitrate` | `128000` | Opus bitrate in bit/s, 6000..=510000 |
//! | `mode` | `normal` | `normal`, or `low-latency` for calls and games (see below) |
//! | `frame.duration` | `10` (`2.5` in low-latency mode) | packet duration in ms: 2.5, 5, 10, 20, 40 or 60 |
//! | `tap.quantum` | `256` (`128` in low-latency mode) | graph quantum the taps ask for, in samples at 48 kHz: 32..=4096 |
//! | `opus.complexity` | `6` | Opus encoder complexity, 0..=10 |
//! | `sink.name` | `melange` | `node.name` of the redirect sink; the standby sink is this plus `.standby` |
//! | `sink.description` | `Melange` | what desktops show for the sink |
//! | `media.socket` | `$XDG_RUNTIME_DIR/melange/media.sock` | where players' in-app stubs reach the media broker (mode 0600); `none` turns the broker off |
//!
//! Low-latency mode sends 2.5 ms packets (Opus restricted-low-delay, like normal mode)
//! and keeps the guest graph's quantum at 128 while an app is redirected. It costs more
//! CPU and bytes per second; the trade-offs are measured in `docs/latency.md`.

use melange_shim::codec::FRAME_DURATIONS_US;
use melange_shim::opus::Application;
use melange_transport::message::Codec;
use melange_transport::port::PortSpec;
use thiserror::Error;

/// The default virtio-serial port name.
pub const DEFAULT_PORT: &str = "virtio:org.melange.media.0";

/// Latency mode: which trade-off between delay and cost the taps make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 10 ms packets and a tap quantum of 256; the default.
    Normal,
    /// 2.5 ms packets and a tap quantum of 128, for calls and games.
    LowLatency,
}

impl Mode {
    /// The module argument's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::LowLatency => "low-latency",
        }
    }

    /// The Opus application both modes encode with: restricted low delay, which is
    /// CELT only, with 2.5 ms of lookahead instead of the 6.5 ms the `audio`
    /// application spends to keep SILK available. At the bitrates Melange sends
    /// (64 kbit/s and up, stereo) libopus picks CELT for music anyway.
    pub fn application(self) -> Application {
        Application::RestrictedLowDelay
    }
}

/// Parsed module arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the host is.
    pub port: PortSpec,
    /// How taps are encoded.
    pub codec: Codec,
    /// Latency mode.
    pub mode: Mode,
    /// Packet duration in microseconds.
    pub frame_us: u32,
    /// Graph quantum the taps ask for, in samples at 48 kHz.
    pub tap_quantum: u32,
    /// Opus encoder complexity.
    pub complexity: u8,
    /// `node.name` of the redirect sink.
    pub sink_name: String,
    /// `node.description` of the redirect sink.
    pub sink_description: String,
    /// Where the media broker listens.
    pub media_socket: MediaSocket,
}

/// `media.socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaSocket {
    /// `$XDG_RUNTIME_DIR/melange/media.sock`.
    Default,
    /// No broker.
    Off,
    /// This path.
    Path(std::path::PathBuf),
}

impl MediaSocket {
    /// The socket's path, if the broker runs (the default needs `XDG_RUNTIME_DIR`).
    pub fn path(&self) -> Option<std::path::PathBuf> {
        match self {
            MediaSocket::Default => {
                std::env::var_os("XDG_RUNTIME_DIR").map(|d| std::path::PathBuf::from(d).join("melange/media.sock"))
            }
            MediaSocket::Off => None,
            MediaSocket::Path(p) => Some(p.clone()),
        }
    }
}

/// A module argument with a value the module cannot use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid module argument {key} = {value:?}: {expected}")]
pub struct ConfigError {
    /// The key.
    pub key: String,
    /// The value given.
    pub value: String,
    /// What would be accepted.
    pub expected: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            port: PortSpec::Virtio("org.melange.media.0".into()),
            codec: Codec::Opus { bitrate: 128_000 },
            mode: Mode::Normal,
            frame_us: 10_000,
            tap_quantum: 256,
            complexity: 6,
            sink_name: "melange".into(),
            sink_description: "Melange".into(),
            media_socket: MediaSocket::Default,
        }
    }
}

impl Config {
    /// `node.name` of the standby sink: the redirect sink's, plus `.standby`.
    pub fn standby_name(&self) -> String {
        format!("{}.standby", self.sink_name)
    }

    /// `node.name` of the virtual camera: the redirect sink's, plus `.camera`.
    pub fn camera_name(&self) -> String {
        format!("{}.camera", self.sink_name)
    }

    /// `node.name` of the virtual microphone: the redirect sink's, plus `.mic`.
    pub fn mic_name(&self) -> String {
        format!("{}.mic", self.sink_name)
    }

    /// Builds a config from key/value pairs; unknown keys are returned for a warning.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut c = Config::default();
        let mut codec_name = "opus".to_string();
        let mut bitrate = 128_000u32;
        let mut unknown = Vec::new();
        let (mut frame_us, mut tap_quantum) = (None, None);
        let err = |key: &str, value: &str, expected: &str| ConfigError {
            key: key.into(),
            value: value.into(),
            expected: expected.into(),
        };
        for (key, value) in pairs {
            match key {
                "port" => c.port = value.parse().map_err(|e: String| err(key, value, &e))?,
                "codec" => match value {
                    "opus" | "pcm" => codec_name = value.into(),
                    _ => return Err(err(key, value, "opus or pcm")),
                },
                "bitrate" => {
                    bitrate = value
                        .parse()
                        .ok()
                        .filter(|b| (6_000..=510_000).contains(b))
                        .ok_or_else(|| err(key, value, "bits per second, 6000..=510000"))?;
                }
                "frame.duration" => {
                    let ms: f64 = value.parse().map_err(|_| err(key, value, "2.5, 5, 10, 20, 40 or 60 (ms)"))?;
                    let us = (ms * 1000.0).round();
                    frame_us = Some(
                        FRAME_DURATIONS_US
                            .iter()
                            .copied()
                            .find(|d| f64::from(*d) == us)
                            .ok_or_else(|| err(key, value, "2.5, 5, 10, 20, 40 or 60 (ms)"))?,
                    );
                }
                "mode" => {
                    c.mode = match value {
                        "normal" => Mode::Normal,
                        "low-latency" => Mode::LowLatency,
                        _ => return Err(err(key, value, "normal or low-latency")),
                    }
                }
                "tap.quantum" => {
                    tap_quantum = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|q| (32..=4096).contains(q))
                            .ok_or_else(|| err(key, value, "samples at 48 kHz, 32..=4096"))?,
                    );
                }
                "opus.complexity" => {
                    c.complexity = value.parse().ok().filter(|c| *c <= 10).ok_or_else(|| err(key, value, "0..=10"))?;
                }
                "sink.name" if !value.is_empty() => c.sink_name = value.into(),
                "sink.description" if !value.is_empty() => c.sink_description = value.into(),
                "sink.name" | "sink.description" => return Err(err(key, value, "a non-empty string")),
                "media.socket" => {
                    c.media_socket = match value {
                        "none" => MediaSocket::Off,
                        _ if value.starts_with('/') => MediaSocket::Path(value.into()),
                        _ => return Err(err(key, value, "an absolute path, or none")),
                    }
                }
                other => unknown.push(other.to_string()),
            }
        }
        let low = c.mode == Mode::LowLatency;
        c.frame_us = frame_us.unwrap_or(if low { 2_500 } else { 10_000 });
        c.tap_quantum = tap_quantum.unwrap_or(if low { 128 } else { 256 });
        c.codec = if codec_name == "pcm" { Codec::PcmS16Le } else { Codec::Opus { bitrate } };
        Ok((c, unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let (c, unknown) = Config::from_pairs([]).unwrap();
        assert_eq!(c, Config::default());
        assert!(unknown.is_empty());
        let (c, unknown) = Config::from_pairs([
            ("port", "unix:/tmp/m.sock"),
            ("codec", "pcm"),
            ("frame.duration", "2.5"),
            ("sink.name", "m2"),
            ("colour", "blue"),
        ])
        .unwrap();
        assert_eq!(c.port, PortSpec::Unix("/tmp/m.sock".into()));
        assert_eq!(c.codec, Codec::PcmS16Le);
        assert_eq!(c.frame_us, 2_500);
        assert_eq!(c.sink_name, "m2");
        assert_eq!(unknown, ["colour"]);
        let (c, _) = Config::from_pairs([("mode", "low-latency")]).unwrap();
        assert_eq!((c.mode, c.frame_us, c.tap_quantum), (Mode::LowLatency, 2_500, 128));
        let (c, _) =
            Config::from_pairs([("mode", "low-latency"), ("frame.duration", "5"), ("tap.quantum", "64")]).unwrap();
        assert_eq!((c.frame_us, c.tap_quantum), (5_000, 64));
        let (c, _) = Config::from_pairs([("bitrate", "64000")]).unwrap();
        assert_eq!(c.codec, Codec::Opus { bitrate: 64_000 });
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        for (k, v) in [
            ("codec", "mp3"),
            ("bitrate", "12"),
            ("frame.duration", "7"),
            ("port", "tcp:x"),
            ("sink.name", ""),
            ("mode", "fast"),
            ("tap.quantum", "5"),
            ("opus.complexity", "11"),
        ] {
            let e = Config::from_pairs([(k, v)]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid module argument {k} = ")), "{e}");
        }
    }
}
