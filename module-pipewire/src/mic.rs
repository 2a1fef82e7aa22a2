//! The virtual microphone: an `Audio/Source` stream of this process, `sink.name` +
//! `.mic` ("Melange microphone"), the default source by its priority. It plays what
//! the host's microphone sends through a render core (jitter buffer, drift control),
//! and silence without it: never an error, never another device. Its real-time
//! callback is melange-pw's playback callback; it shows its jitter buffer's figures on
//! its node.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use melange_guest::mic::{MicFeed, MIC_RATE};
use melange_pw::{Playback, RtStream};
use melange_shim::codec::SampleFormat;
use melange_shim::render::{jitter_target_frames, render_ring, RenderConfig, RenderCore, RenderStats};
use pipewire as pw;
use pw::properties::properties;
use pw::spa;

use crate::config::Config;
use crate::stream::{format_pod, new_stream, update_properties};

/// Decoded microphone audio the virtual source's ring holds at most.
const MIC_RING: Duration = Duration::from_millis(500);

/// The microphone's ring: the end the link thread feeds with the host's packets, and
/// the render core the source plays. Its packets are 10 ms, or 5 ms when the taps' are
/// shorter (at 32 kbit/s a 2.5 ms Opus packet is 10 bytes, too few for clean speech);
/// its jitter buffer is derived as the host's: a packet, the graph's quantum and the
/// margin.
pub(crate) fn mic_ring(config: &Config) -> (MicFeed, RenderCore) {
    let mic_frame_us = config.frame_us.clamp(5_000, 10_000);
    let mic_frames = (u64::from(MIC_RATE) * u64::from(mic_frame_us) / 1_000_000) as usize;
    let (producer, core) = render_ring(
        RenderConfig {
            rate: MIC_RATE,
            channels: 1,
            latency_frames: jitter_target_frames(mic_frames as u32, config.tap_quantum, MIC_RATE),
            trim: true,
            quantum: config.tap_quantum,
            packet_frames: mic_frames as u32,
        },
        MIC_RATE as usize * MIC_RING.as_millis() as usize / 1000,
    );
    let stats = core.stats().clone();
    (MicFeed { producer, stats, frame_us: mic_frame_us }, core)
}

/// The virtual microphone, open on the session's PipeWire.
pub(crate) struct MicSource {
    stream: RtStream<pw::stream::StreamBox<'static>, Playback>,
    stats: Arc<RenderStats>,
    published: Vec<(&'static str, String)>,
    /// The fill sum and cycle count at the last put.
    fill_mark: (u64, u64),
}

impl MicSource {
    /// Makes the source on `core`, playing `render`.
    pub(crate) fn create(core: &pw::core::Core, config: &Config, render: RenderCore) -> Result<MicSource, String> {
        let name = config.mic_name();
        let description = format!("{} microphone", config.sink_description);
        let props = properties! {
            "media.type" => "Audio",
            "media.category" => "Duplex",
            "media.class" => "Audio/Source",
            "node.name" => name.as_str(),
            "node.description" => description.as_str(),
            "node.latency" => format!("{}/{MIC_RATE}", config.tap_quantum).as_str(),
            "priority.session" => "2000",
            "priority.driver" => "0",
        };
        let stream = new_stream(core, "melange-mic", props)
            .map_err(|e| format!("cannot create the microphone's stream: {e}"))?;
        let stats = render.stats().clone();
        let listener = melange_pw::listen_playback(&stream, render)
            .register()
            .map_err(|e| format!("cannot listen on the microphone's stream: {e}"))?;
        let stream = RtStream::new(stream, listener);
        let pod = format_pod(SampleFormat::F32, &[spa::sys::SPA_AUDIO_CHANNEL_MONO])?;
        // Not autoconnected: a source that recording apps are linked to.
        melange_pw::connect(&stream, spa::utils::Direction::Output, &pod, false)
            .map_err(|e| format!("cannot connect the microphone's stream: {e}"))?;
        log::info!("melange: created the microphone {name} (\"{description}\")");
        Ok(MicSource { stream, stats, published: Vec::new(), fill_mark: (0, 0) })
    }

    /// Puts the jitter buffer's figures on the source's node as `melange.*` properties:
    /// its mean fill since the last put, the drift, underruns and silence so far.
    pub(crate) fn publish_counters(&mut self) {
        let s = &self.stats;
        let (sum, cycles) = (s.fill_sum_frames.load(Ordering::Relaxed), s.cycles.load(Ordering::Relaxed));
        let (last_sum, last_cycles) = std::mem::replace(&mut self.fill_mark, (sum, cycles));
        let fill = (cycles > last_cycles)
            .then(|| (sum - last_sum) as f64 / (cycles - last_cycles) as f64 * 1000.0 / f64::from(MIC_RATE))
            .map_or("n/a".to_string(), |ms| format!("{ms:.1}"));
        let counters = vec![
            ("melange.fill.ms", fill),
            (
                "melange.target.ms",
                format!("{:.1}", s.target_frames.load(Ordering::Relaxed) as f64 * 1000.0 / f64::from(MIC_RATE)),
            ),
            ("melange.drift.ppm", format!("{:.0}", s.drift_ppb.load(Ordering::Relaxed) as f64 / 1000.0)),
            ("melange.underruns", s.underruns.load(Ordering::Relaxed).to_string()),
            ("melange.latency.cuts", s.latency_cuts.load(Ordering::Relaxed).to_string()),
            ("melange.silence.frames", s.silence_frames.load(Ordering::Relaxed).to_string()),
        ];
        update_properties(&self.stream, counters, &mut self.published);
    }
}
