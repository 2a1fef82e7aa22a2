//! Test signals and the measurements tests assert on.

use std::path::Path;

use melange_shim::wav::{self, SampleFormat, WavFormat};

/// Interleaved audio with its layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// Sample frames per second.
    pub rate: u32,
    /// Channels.
    pub channels: usize,
    /// Interleaved samples in [-1, 1).
    pub samples: Vec<f32>,
    /// The raw s16 samples, if the file was s16 (for bit-exact checks).
    pub s16: Option<Vec<i16>>,
}

impl Audio {
    /// One channel.
    pub fn channel(&self, c: usize) -> Vec<f32> {
        self.samples.iter().skip(c).step_by(self.channels.max(1)).copied().collect()
    }

    /// Duration in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / self.channels.max(1) as f64 / f64::from(self.rate)
    }
}

/// Reads a PCM s16 or IEEE-float WAV (plain or WAVE_FORMAT_EXTENSIBLE).
pub fn read_wav(path: &Path) -> Result<Audio, String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (format, data) = wav::parse(&b).map_err(|e| format!("{}: {e}", path.display()))?;
    let (rate, channels) = (format.rate, usize::from(format.channels));
    Ok(match format.sample {
        SampleFormat::S16 => {
            let s16: Vec<i16> = data.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
            let samples = s16.iter().map(|v| f32::from(*v) / 32768.0).collect();
            Audio { rate, channels, samples, s16: Some(s16) }
        }
        SampleFormat::F32 => {
            let samples = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Audio { rate, channels, samples, s16: None }
        }
    })
}

/// Writes an s16 WAV.
pub fn write_wav_s16(path: &Path, rate: u32, channels: u16, samples: &[i16]) {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    write_wav(path, WavFormat { sample: SampleFormat::S16, channels, rate }, &data);
}

/// Writes a 32-bit float WAV.
pub fn write_wav_f32(path: &Path, rate: u32, channels: u16, samples: &[f32]) {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    write_wav(path, WavFormat { sample: SampleFormat::F32, channels, rate }, &data);
}

fn write_wav(path: &Path, format: WavFormat, data: &[u8]) {
    let mut file = wav::header(format, data.len() as u64).to_vec();
    file.extend_from_slice(data);
    std::fs::write(path, file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A sine tone, `seconds` long, amplitude `amp`.
pub fn tone(freq: f64, rate: u32, seconds: f64, amp: f64) -> Vec<f64> {
    let n = (f64::from(rate) * seconds) as usize;
    (0..n).map(|i| amp * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()).collect()
}

/// A linear chirp from `f0` to `f1` Hz.
pub fn chirp(f0: f64, f1: f64, rate: u32, seconds: f64, amp: f64) -> Vec<f64> {
    let n = (f64::from(rate) * seconds) as usize;
    let k = (f1 - f0) / seconds;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            amp * (2.0 * std::f64::consts::PI * (f0 * t + 0.5 * k * t * t)).sin()
        })
        .collect()
}

/// Deterministic white noise (xorshift), for signals that align in exactly one place.
pub fn noise(n: usize, amp: f64, seed: u64) -> Vec<f64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            amp * ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
        .collect()
}

/// Quantises to s16 and duplicates into `channels` channels.
pub fn to_s16(signal: &[f64], channels: usize) -> Vec<i16> {
    signal.iter().flat_map(|v| std::iter::repeat_n((v * 32767.0).round() as i16, channels)).collect()
}

/// RMS level in dBFS.
pub fn rms_db(x: &[f32]) -> f64 {
    let p = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / x.len().max(1) as f64;
    10.0 * p.max(1e-20).log10()
}

/// The part of a signal between the first and last sample above `threshold`.
pub fn active(x: &[f32], threshold: f32) -> &[f32] {
    let first = x.iter().position(|v| v.abs() > threshold).unwrap_or(0);
    let last = x.iter().rposition(|v| v.abs() > threshold).map_or(first, |l| l + 1);
    &x[first..last]
}

/// The middle `fraction` of a slice (to skip start and end transients).
pub fn middle(x: &[f32], fraction: f64) -> &[f32] {
    let skip = ((1.0 - fraction) / 2.0 * x.len() as f64) as usize;
    &x[skip..x.len() - skip]
}

/// Frequency of a clean tone from interpolated zero crossings.
pub fn frequency(x: &[f32], rate: u32) -> f64 {
    let mut crossings = Vec::new();
    for i in 1..x.len() {
        let (a, b) = (f64::from(x[i - 1]), f64::from(x[i]));
        if a < 0.0 && b >= 0.0 {
            crossings.push((i - 1) as f64 + a / (a - b));
        }
    }
    match (crossings.first(), crossings.last()) {
        (Some(f), Some(l)) if crossings.len() > 2 => (crossings.len() - 1) as f64 * f64::from(rate) / (l - f),
        _ => 0.0,
    }
}

/// The median of `measure` over the windows of `x`: one cycle lost on the way
/// (an app's own underrun, or a graph cycle that ran late on a busy machine) changes
/// one window, not the figure; a systematic error moves every window.
fn median_per_window(x: &[f32], window: usize, measure: impl Fn(&[f32]) -> f64) -> f64 {
    let mut v: Vec<f64> = x.chunks_exact(window.max(1)).map(measure).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// [`frequency`] as the median over 100 ms windows.
pub fn median_frequency(x: &[f32], rate: u32) -> f64 {
    median_per_window(x, (rate / 10) as usize, |w| frequency(w, rate))
}

/// [`frequency`] as the median over 20 ms windows, for recordings too short for
/// [`median_frequency`] to have more than a window or two.
pub fn median_frequency_short(x: &[f32], rate: u32) -> f64 {
    median_per_window(x, (rate / 50) as usize, |w| frequency(w, rate))
}

/// [`tone_amplitude`] as the median over 100 ms windows. Use a `freq` with a whole
/// number of cycles in 100 ms, or leakage lowers the figure.
pub fn median_tone_amplitude(x: &[f32], rate: u32, freq: f64) -> f64 {
    median_per_window(x, (rate / 10) as usize, |w| tone_amplitude(w, rate, freq))
}

/// Amplitude of the `freq` component (Goertzel), relative to full scale.
pub fn tone_amplitude(x: &[f32], rate: u32, freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / f64::from(rate);
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for v in x {
        let s = f64::from(*v) + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    2.0 * power.max(0.0).sqrt() / x.len().max(1) as f64
}

/// The lag (in samples, `signal` later than `reference` is positive) that best aligns
/// `signal` to `reference`, searched in `0..max_lag`, over a window of `window` samples.
pub fn best_lag(reference: &[f32], signal: &[f32], max_lag: usize, window: usize) -> usize {
    let start = reference.iter().position(|v| v.abs() > 0.01).unwrap_or(0);
    let r = &reference[start..(start + window).min(reference.len())];
    (0..max_lag)
        .filter(|lag| start + lag + r.len() <= signal.len())
        .map(|lag| {
            let s = &signal[start + lag..start + lag + r.len()];
            let c: f64 = r.iter().zip(s).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            (lag, c)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |(lag, _)| lag)
}

/// Pearson correlation of two equally long signals.
pub fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ma = a.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64;
    let mb = b.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x) - ma, f64::from(*y) - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    sab / (saa * sbb).sqrt().max(1e-20)
}

/// Seconds between clicks of [`click_train`]: longer than any latency measured.
pub const CLICK_PERIOD: f64 = 0.5;
/// Level above which a sample starts a click.
const CLICK_THRESHOLD: f32 = 0.3;

/// The latency probe signal: every [`CLICK_PERIOD`] a 2 ms Hann-windowed 3 kHz burst
/// at 0.9, over a continuous chirp (300 Hz to 6 kHz every period) at 0.1 that keeps
/// every path busy and gives the quality measure something to correlate. The chirp
/// never crosses the click threshold, even after a lossy codec.
pub fn click_train(rate: u32, seconds: f64) -> Vec<f32> {
    let n = (f64::from(rate) * seconds) as usize;
    let period = (f64::from(rate) * CLICK_PERIOD) as usize;
    let burst = (f64::from(rate) * 0.002) as usize;
    (0..n)
        .map(|i| {
            let t = (i % period) as f64 / f64::from(rate);
            let k = (6000.0 - 300.0) / CLICK_PERIOD;
            let mut v = 0.1 * (2.0 * std::f64::consts::PI * (300.0 * t + 0.5 * k * t * t)).sin();
            let j = i % period;
            if j < burst {
                let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * j as f64 / burst as f64).cos();
                v = 0.9 * w * (2.0 * std::f64::consts::PI * 3000.0 * j as f64 / f64::from(rate)).sin();
            }
            v as f32
        })
        .collect()
}

/// Sample indices where clicks start: the first sample above the threshold at least
/// half a click period after the previous click.
pub fn click_onsets(x: &[f32], rate: u32) -> Vec<usize> {
    let holdoff = (f64::from(rate) * CLICK_PERIOD / 2.0) as usize;
    let mut onsets: Vec<usize> = Vec::new();
    for (i, v) in x.iter().enumerate() {
        if v.abs() > CLICK_THRESHOLD && onsets.last().is_none_or(|l| i - l >= holdoff) {
            onsets.push(i);
        }
    }
    onsets
}

/// The output of a bit-exact path as runs that match `original` exactly: (start in
/// `got`, start in `original`, samples). A new run starts wherever the output leaves
/// the input (a cycle lost to a late graph, say) and picks it up again; zeros between
/// runs (silence) are skipped. Interleaved samples: runs start on frame boundaries of
/// `channels`. Stops at the first stretch of 64 samples found nowhere in the input.
pub fn exact_runs(original: &[i16], got: &[i16], channels: usize) -> Vec<(usize, usize, usize)> {
    const PROBE: usize = 64;
    let mut runs = Vec::new();
    let mut pos = 0;
    while let Some(start) = got[pos..].iter().position(|v| *v != 0).map(|p| (pos + p) / channels * channels) {
        if start + PROBE > got.len() {
            break;
        }
        let Some(at) = find(original, &got[start..start + PROBE]) else { break };
        let n = got[start..].iter().zip(&original[at..]).take_while(|(a, b)| a == b).count();
        runs.push((start, at, n));
        pos = start + n.max(1);
    }
    runs
}

/// Where `needle` first occurs in `haystack`, for bit-exact alignment.
pub fn find(haystack: &[i16], needle: &[i16]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_measure() {
        let x: Vec<f32> = tone(1000.0, 48000, 1.0, 0.5).iter().map(|v| *v as f32).collect();
        assert!((frequency(&x, 48000) - 1000.0).abs() < 0.1);
        assert!((rms_db(&x) - (20.0 * (0.5f64 / 2f64.sqrt()).log10())).abs() < 0.01);
        assert!((tone_amplitude(&x, 48000, 1000.0) - 0.5).abs() < 0.01);
        assert!(tone_amplitude(&x, 48000, 440.0) < 0.01);
        let n: Vec<f32> = noise(48000, 0.5, 7).iter().map(|v| *v as f32).collect();
        let mut late = vec![0.0f32; 123];
        late.extend_from_slice(&n);
        assert_eq!(best_lag(&n, &late, 1000, 4800), 123);
        assert!((correlation(&n, &late[123..]) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn clicks_are_found_where_they_start() {
        let x = click_train(48000, 2.0);
        let onsets = click_onsets(&x, 48000);
        assert_eq!(onsets.len(), 4);
        for (k, o) in onsets.iter().enumerate() {
            let start = k * 24000;
            assert!(*o > start && *o < start + 96, "click {k} found at {o}");
        }
        let mut late = vec![0.0f32; 1000];
        late.extend_from_slice(&x);
        assert_eq!(click_onsets(&late, 48000), onsets.iter().map(|o| o + 1000).collect::<Vec<_>>());
    }
}
