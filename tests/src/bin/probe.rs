//! `melange-probe`: timestamps audio on the graph clock, for latency measurements with
//! one clock (`CLOCK_MONOTONIC`, which every PipeWire graph on this machine runs on).
//!
//! ```text
//! melange-probe play   --out FILE [--target NODE] [--seconds S] [--quantum N] [--api pipewire|pulse]
//! melange-probe record --out FILE --target NODE [--monitor] [--seconds S] [--wav FILE]
//! ```
//!
//! `play` is an app: it plays [`audio::click_train`] and writes, per click, the graph
//! time at which the click's onset sample entered the graph (the cycle time of the
//! buffer that held it, plus its offset), and the delay the app's stream reported for
//! it (`pw_stream_get_time`: what an app would use for A/V sync). `record` captures a
//! node's output (with `--monitor`, a sink's monitor) and writes the graph time of each
//! click onset it hears, and optionally the recording as WAV. `play --api pulse` plays
//! through the PulseAudio API instead (`pa_simple`, 50 ms target buffer): before each
//! 10 ms write it asks `pa_simple_get_latency` (`pa_stream_get_latency`, what `pacat -v`
//! prints), and writes per click the time that click would start playing if the
//! stream had no latency, with the latency the server reported.
//!
//! Capturing a playback stream directly sees each sample with the graph time the
//! stream wrote it in; a sink's monitor shows it a cycle later (the null sink holds a
//! cycle and, unlike a sound card, does not report it). One JSON object per line:
//! `{"onset_ns": T, "delay_ns": D}` (`delay_ns` from `play` only).
//!
//! The real-time callbacks only copy into preallocated wait-free rings.

use std::cell::Cell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use melange_tests::audio;
use pipewire as pw;
use pw::spa;
use rtrb::{Consumer, Producer, RingBuffer};

const RATE: u32 = 48_000;
const CHANNELS: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Stamp {
    /// Index of the first frame of the cycle in the stream.
    frame: u64,
    /// Graph time of that cycle.
    now_ns: i64,
    /// Delay the stream reported, ns.
    delay_ns: i64,
}

/// What the probe is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// An app: plays the click train and stamps each click as it enters the graph.
    Play,
    /// Captures a node and stamps each click it hears.
    Record,
}

/// The API `play` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Api {
    /// A PipeWire stream.
    Pipewire,
    /// The PulseAudio API (`pa_simple`).
    Pulse,
}

/// Timestamps audio on the graph clock, for latency measurements on one clock.
#[derive(Debug, clap::Parser)]
#[command(name = "melange-probe")]
struct Args {
    /// `play` (an app) or `record` (a capture of `--target`).
    mode: Mode,
    /// Where the JSON lines go, one per click.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The node to play into or record (`target.object`).
    #[arg(long, value_name = "NODE")]
    target: Option<String>,
    /// How long to play or record.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    seconds: f64,
    /// The graph quantum the stream asks for (`node.latency`), frames at 48 kHz.
    #[arg(long, value_name = "N", default_value_t = 256)]
    quantum: u32,
    /// `record`: also write the recording as a WAV file.
    #[arg(long, value_name = "FILE")]
    wav: Option<PathBuf>,
    /// `record`: capture the target sink's monitor.
    #[arg(long)]
    monitor: bool,
    /// `play`: the API to play through.
    #[arg(long, value_enum, default_value_t = Api::Pipewire)]
    api: Api,
}

fn format_pod() -> Result<Vec<u8>, String> {
    let positions = [spa::sys::SPA_AUDIO_CHANNEL_FL, spa::sys::SPA_AUDIO_CHANNEL_FR];
    melange_pw::format_pod(spa::param::audio::AudioFormat::F32LE, RATE, &positions[..CHANNELS])
}

struct Rt {
    signal: Vec<f32>,
    pos: u64,
    stamps: Producer<Stamp>,
    samples: Option<Producer<f32>>,
    done: Rc<Cell<bool>>,
}

fn delay_ns(t: &pw::stream::Time) -> i64 {
    let r = t.rate();
    if r.denom == 0 {
        return 0;
    }
    t.delay() * i64::from(r.num) * 1_000_000_000 / i64::from(r.denom)
}

fn run(args: &Args) -> Result<(), String> {
    pw::init();
    let main_loop = pw::main_loop::MainLoopRc::new(None).map_err(|e| e.to_string())?;
    // As audio apps do (pw-play, pipewire-pulse): a real-time data loop.
    let props = pw::properties::properties! { "config.name" => "client-rt.conf" };
    let context = pw::context::ContextRc::new(&main_loop, Some(props)).map_err(|e| e.to_string())?;
    let core = context.connect_rc(None).map_err(|e| format!("cannot connect to PipeWire: {e}"))?;
    let play = args.mode == Mode::Play;
    let cycles = (args.seconds * f64::from(RATE) / 16.0) as usize + 1024;
    let (stamps_tx, mut stamps_rx) = RingBuffer::<Stamp>::new(cycles);
    let (samples_tx, mut samples_rx): (Option<Producer<f32>>, Option<Consumer<f32>>) = if play {
        (None, None)
    } else {
        let (tx, rx) = RingBuffer::new((args.seconds * f64::from(RATE)) as usize + RATE as usize);
        (Some(tx), Some(rx))
    };
    let done = Rc::new(Cell::new(false));
    let signal = if play { audio::click_train(RATE, args.seconds) } else { Vec::new() };
    let onsets_in_signal = audio::click_onsets(&signal, RATE);

    let mut props = pw::properties::PropertiesBox::new();
    props.insert("media.type", "Audio");
    props.insert("media.category", if play { "Playback" } else { "Capture" });
    props.insert("media.role", "Music");
    props.insert("application.name", "melange-probe");
    props.insert("node.name", if play { "melange-probe-play" } else { "melange-probe-record" });
    props.insert("node.latency", format!("{}/{RATE}", args.quantum).as_str());
    if let Some(t) = &args.target {
        props.insert("target.object", t.as_str());
    }
    if args.monitor {
        props.insert("stream.capture.sink", "true");
    }
    // Never record something else than the target.
    props.insert("node.dont-reconnect", "true");
    let stream = pw::stream::StreamRc::new(core.clone(), "melange-probe", props).map_err(|e| e.to_string())?;
    let rt = Rt { signal, pos: 0, stamps: stamps_tx, samples: samples_tx, done: done.clone() };
    let _listener = stream
        .add_local_listener_with_user_data(rt)
        .process(move |stream, rt| {
            let time = stream.time().ok();
            let Some(mut buffer) = stream.dequeue_buffer() else { return };
            let requested = buffer.requested() as usize;
            let Some(data) = buffer.datas_mut().first_mut() else { return };
            let stride = 4 * CHANNELS;
            let stamp = |frame| Stamp {
                frame,
                now_ns: time.as_ref().map_or(0, |t| t.now()),
                delay_ns: time.as_ref().map_or(0, delay_ns),
            };
            if play {
                let Some(bytes) = data.data() else { return };
                let max = bytes.len() / stride;
                let frames = if requested > 0 { requested.min(max) } else { max.min(1024) };
                let _ = rt.stamps.push(stamp(rt.pos));
                for (f, out) in bytes[..frames * stride].chunks_exact_mut(stride).enumerate() {
                    let v: f32 = rt.signal.get(rt.pos as usize + f).copied().unwrap_or(0.0);
                    out[..4].copy_from_slice(&v.to_ne_bytes());
                    out[4..8].copy_from_slice(&v.to_ne_bytes());
                }
                rt.pos += frames as u64;
                if rt.pos as usize > rt.signal.len() + RATE as usize / 2 {
                    rt.done.set(true);
                }
                let chunk = data.chunk_mut();
                *chunk.offset_mut() = 0;
                *chunk.stride_mut() = stride as i32;
                *chunk.size_mut() = (frames * stride) as u32;
            } else {
                let (offset, size) = (data.chunk().offset() as usize, data.chunk().size() as usize);
                let Some(bytes) = data.data() else { return };
                let end = (offset + size).min(bytes.len());
                let frames = (end - offset.min(end)) / stride;
                let _ = rt.stamps.push(stamp(rt.pos));
                if let Some(samples) = &mut rt.samples {
                    for f in bytes[offset.min(end)..end].chunks_exact(stride) {
                        let _ = samples.push(f32::from_ne_bytes([f[0], f[1], f[2], f[3]]));
                    }
                }
                rt.pos += frames as u64;
            }
        })
        .register()
        .map_err(|e| e.to_string())?;
    let pod = format_pod()?;
    let direction = if play { spa::utils::Direction::Output } else { spa::utils::Direction::Input };
    melange_pw::connect(&stream, direction, &pod, true)?;

    // Stop when the signal has played out (play) or after --seconds (record).
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(args.seconds + if play { 5.0 } else { 0.0 });
    let weak = main_loop.downgrade();
    let timer = main_loop.loop_().add_timer(move |_| {
        if done.get() || std::time::Instant::now() >= deadline {
            if let Some(l) = weak.upgrade() {
                l.quit();
            }
        }
    });
    let tick = Duration::from_millis(50);
    let _ = timer.update_timer(Some(tick), Some(tick));
    main_loop.run();
    let _ = stream.disconnect();

    let mut stamps = Vec::new();
    while let Ok(s) = stamps_rx.pop() {
        stamps.push(s);
    }
    let (onsets, recording) = match samples_rx.as_mut() {
        None => (onsets_in_signal, Vec::new()),
        Some(rx) => {
            let mut x = Vec::with_capacity(rx.slots());
            while let Ok(v) = rx.pop() {
                x.push(v);
            }
            (audio::click_onsets(&x, RATE), x)
        }
    };
    if let Some(wav) = &args.wav {
        audio::write_wav_f32(wav, RATE, 1, &recording);
    }
    let mut out = String::new();
    for onset in onsets {
        // The cycle that held the onset: the last stamp at or before it.
        let i = stamps.partition_point(|s| s.frame <= onset as u64);
        let Some(s) = i.checked_sub(1).and_then(|i| stamps.get(i)) else { continue };
        if s.now_ns == 0 {
            continue;
        }
        let t = s.now_ns + ((onset as u64 - s.frame) as f64 * 1e9 / f64::from(RATE)) as i64;
        let line = if play {
            serde_json::json!({ "onset_ns": t, "delay_ns": s.delay_ns })
        } else {
            serde_json::json!({ "onset_ns": t })
        };
        out.push_str(&format!("{line}\n"));
    }
    write_whole(&args.out, &out)
}

/// Writes `text` to `path` whole: the tests take the file's appearance as the end of
/// the run, so it must never be seen half written.
fn write_whole(path: &std::path::Path, text: &str) -> Result<(), String> {
    let part = path.with_extension("part");
    std::fs::write(&part, text).map_err(|e| format!("{}: {e}", part.display()))?;
    std::fs::rename(&part, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The PulseAudio client API (libpulse), as much of it as `play --api pulse` uses.
mod pa {
    use std::ffi::{c_char, c_int, c_void};

    /// `pa_sample_spec`.
    #[repr(C)]
    pub struct SampleSpec {
        pub format: c_int,
        pub rate: u32,
        pub channels: u8,
    }

    /// `pa_buffer_attr`; `u32::MAX` is the server's default.
    #[repr(C)]
    pub struct BufferAttr {
        pub maxlength: u32,
        pub tlength: u32,
        pub prebuf: u32,
        pub minreq: u32,
        pub fragsize: u32,
    }

    /// `pa_timing_info`.
    #[repr(C)]
    pub struct TimingInfo {
        pub timestamp: libc::timeval,
        pub synchronized_clocks: c_int,
        pub sink_usec: u64,
        pub source_usec: u64,
        pub transport_usec: u64,
        pub playing: c_int,
        pub write_index_corrupt: c_int,
        pub write_index: i64,
        pub read_index_corrupt: c_int,
        pub read_index: i64,
        pub configured_sink_usec: u64,
        pub configured_source_usec: u64,
        pub since_underrun: i64,
    }

    pub const SAMPLE_FLOAT32LE: c_int = 5;
    pub const CONTEXT_READY: c_int = 4;
    pub const CONTEXT_FAILED: c_int = 5;
    pub const STREAM_READY: c_int = 2;
    pub const STREAM_FAILED: c_int = 3;
    pub const OPERATION_RUNNING: c_int = 0;
    /// `PA_STREAM_ADJUST_LATENCY`: tlength is the whole latency, as for an A/V player.
    pub const STREAM_ADJUST_LATENCY: c_int = 0x2000;
    pub const SEEK_RELATIVE: c_int = 0;

    #[link(name = "pulse")]
    extern "C" {
        pub fn pa_mainloop_new() -> *mut c_void;
        pub fn pa_mainloop_get_api(m: *mut c_void) -> *mut c_void;
        pub fn pa_mainloop_iterate(m: *mut c_void, block: c_int, retval: *mut c_int) -> c_int;
        pub fn pa_mainloop_free(m: *mut c_void);
        pub fn pa_context_new(api: *mut c_void, name: *const c_char) -> *mut c_void;
        pub fn pa_context_connect(c: *mut c_void, server: *const c_char, flags: c_int, api: *const c_void) -> c_int;
        pub fn pa_context_get_state(c: *mut c_void) -> c_int;
        pub fn pa_context_errno(c: *mut c_void) -> c_int;
        pub fn pa_context_disconnect(c: *mut c_void);
        pub fn pa_context_unref(c: *mut c_void);
        pub fn pa_stream_new(
            c: *mut c_void,
            name: *const c_char,
            ss: *const SampleSpec,
            map: *const c_void,
        ) -> *mut c_void;
        pub fn pa_stream_connect_playback(
            s: *mut c_void,
            dev: *const c_char,
            attr: *const BufferAttr,
            flags: c_int,
            volume: *const c_void,
            sync: *mut c_void,
        ) -> c_int;
        pub fn pa_stream_get_state(s: *mut c_void) -> c_int;
        pub fn pa_stream_writable_size(s: *mut c_void) -> usize;
        pub fn pa_stream_write(
            s: *mut c_void,
            data: *const c_void,
            bytes: usize,
            free_cb: *const c_void,
            offset: i64,
            seek: c_int,
        ) -> c_int;
        pub fn pa_stream_update_timing_info(s: *mut c_void, cb: *const c_void, userdata: *mut c_void) -> *mut c_void;
        pub fn pa_stream_get_timing_info(s: *mut c_void) -> *const TimingInfo;
        pub fn pa_stream_get_latency(s: *mut c_void, usec: *mut u64, negative: *mut c_int) -> c_int;
        pub fn pa_stream_drain(s: *mut c_void, cb: *const c_void, userdata: *mut c_void) -> *mut c_void;
        pub fn pa_stream_disconnect(s: *mut c_void) -> c_int;
        pub fn pa_stream_unref(s: *mut c_void);
        pub fn pa_operation_get_state(o: *mut c_void) -> c_int;
        pub fn pa_operation_unref(o: *mut c_void);
        pub fn pa_strerror(error: c_int) -> *const c_char;
    }
}

/// A libpulse connection driven by its own (non-threaded) main loop.
struct Pulse {
    main_loop: *mut std::ffi::c_void,
    context: *mut std::ffi::c_void,
    stream: *mut std::ffi::c_void,
}

impl Pulse {
    fn error(&self) -> String {
        // SAFETY: the context is live; pa_strerror returns a static string.
        unsafe { std::ffi::CStr::from_ptr(pa::pa_strerror(pa::pa_context_errno(self.context))) }
            .to_string_lossy()
            .into_owned()
    }

    /// Runs the loop until `done` says so (or a failure state); blocks between events.
    fn iterate_until(&self, mut done: impl FnMut() -> bool) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            // SAFETY: the main loop is live.
            if unsafe { pa::pa_mainloop_iterate(self.main_loop, 1, std::ptr::null_mut()) } < 0 {
                return Err(format!("the PulseAudio main loop failed: {}", self.error()));
            }
            if std::time::Instant::now() > deadline {
                return Err("no answer from the PulseAudio server within 10 s".into());
            }
        }
        Ok(())
    }

    /// Runs an operation to completion.
    fn wait(&self, op: *mut std::ffi::c_void) -> Result<(), String> {
        if op.is_null() {
            return Err(format!("operation refused: {}", self.error()));
        }
        // SAFETY: `op` is a live operation until unref'd below.
        let result = self.iterate_until(|| unsafe { pa::pa_operation_get_state(op) } != pa::OPERATION_RUNNING);
        // SAFETY: as above, once.
        unsafe { pa::pa_operation_unref(op) };
        result
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        // SAFETY: each pointer is live or null, and freed once.
        unsafe {
            if !self.stream.is_null() {
                pa::pa_stream_disconnect(self.stream);
                pa::pa_stream_unref(self.stream);
            }
            pa::pa_context_disconnect(self.context);
            pa::pa_context_unref(self.context);
            pa::pa_mainloop_free(self.main_loop);
        }
    }
}

/// `play --api pulse`: see the module docs.
fn play_pulse(args: &Args) -> Result<(), String> {
    use std::ffi::CString;
    let signal = audio::click_train(RATE, args.seconds);
    let stereo: Vec<f32> = signal.iter().flat_map(|v| [*v, *v]).collect();
    let name = c"melange-probe";
    // SAFETY: creating a main loop and a context has no preconditions.
    let mut pulse = unsafe {
        let main_loop = pa::pa_mainloop_new();
        let context = pa::pa_context_new(pa::pa_mainloop_get_api(main_loop), name.as_ptr());
        Pulse { main_loop, context, stream: std::ptr::null_mut() }
    };
    // SAFETY: the context is live.
    if unsafe { pa::pa_context_connect(pulse.context, std::ptr::null(), 0, std::ptr::null()) } < 0 {
        return Err(format!("cannot connect to the PulseAudio server: {}", pulse.error()));
    }
    let context = pulse.context;
    // SAFETY: the context is live.
    pulse.iterate_until(|| {
        matches!(unsafe { pa::pa_context_get_state(context) }, pa::CONTEXT_READY | pa::CONTEXT_FAILED)
    })?;
    // SAFETY: as above.
    if unsafe { pa::pa_context_get_state(context) } != pa::CONTEXT_READY {
        return Err(format!("cannot connect to the PulseAudio server: {}", pulse.error()));
    }
    let spec = pa::SampleSpec { format: pa::SAMPLE_FLOAT32LE, rate: RATE, channels: CHANNELS as u8 };
    let frame_bytes = 4 * CHANNELS;
    // 50 ms in all, as a player would ask.
    let attr = pa::BufferAttr {
        maxlength: u32::MAX,
        tlength: RATE / 20 * frame_bytes as u32,
        prebuf: u32::MAX,
        minreq: u32::MAX,
        fragsize: u32::MAX,
    };
    let dev = args.target.as_deref().map(CString::new).transpose().map_err(|_| "bad --target")?;
    // SAFETY: live context; spec, attr and dev outlive the calls.
    unsafe {
        pulse.stream = pa::pa_stream_new(context, name.as_ptr(), &spec, std::ptr::null());
        if pulse.stream.is_null()
            || pa::pa_stream_connect_playback(
                pulse.stream,
                dev.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
                &attr,
                pa::STREAM_ADJUST_LATENCY,
                std::ptr::null(),
                std::ptr::null_mut(),
            ) < 0
        {
            return Err(format!("cannot open a playback stream: {}", pulse.error()));
        }
    }
    let stream = pulse.stream;
    // SAFETY: the stream is live.
    pulse
        .iterate_until(|| matches!(unsafe { pa::pa_stream_get_state(stream) }, pa::STREAM_READY | pa::STREAM_FAILED))?;
    // SAFETY: as above.
    if unsafe { pa::pa_stream_get_state(stream) } != pa::STREAM_READY {
        return Err(format!("the playback stream failed: {}", pulse.error()));
    }

    // Per 10 ms write: when, the latency the client library computed, the sink latency
    // the server reported, and frames written before.
    let chunk = RATE as usize / 100;
    let mut writes: Vec<(i64, i64, i64, usize)> = Vec::with_capacity(stereo.len() / chunk / CHANNELS + 1);
    let start = std::time::Instant::now();
    for (i, part) in stereo.chunks(chunk * CHANNELS).enumerate() {
        // Paced like a player: each 10 ms written when it is due, after a 50 ms prefill.
        let due = (start + Duration::from_millis(10 * i as u64)).checked_sub(Duration::from_millis(50));
        if let Some(wait) = due.and_then(|d| d.checked_duration_since(std::time::Instant::now())) {
            std::thread::sleep(wait);
        }
        let bytes = std::mem::size_of_val(part);
        // SAFETY: the stream is live.
        pulse.iterate_until(|| unsafe { pa::pa_stream_writable_size(stream) } >= bytes)?;
        // Fresh timing, as an A/V player asks before it schedules a frame.
        // SAFETY: as above.
        pulse.wait(unsafe { pa::pa_stream_update_timing_info(stream, std::ptr::null(), std::ptr::null_mut()) })?;
        let (mut usec, mut negative) = (0u64, 0);
        // SAFETY: as above; timing info is valid after the update.
        let (sink_usec, ok) = unsafe {
            let ok = pa::pa_stream_get_latency(stream, &mut usec, &mut negative) == 0;
            let info = pa::pa_stream_get_timing_info(stream);
            (info.as_ref().map_or(0, |t| t.sink_usec), ok)
        };
        let latency_ns = if ok && negative == 0 { usec as i64 * 1000 } else { 0 };
        writes.push((melange_shim::clock::monotonic_ns() as i64, latency_ns, sink_usec as i64 * 1000, i * chunk));
        // SAFETY: as above; `part` outlives the call (libpulse copies it).
        if unsafe { pa::pa_stream_write(stream, part.as_ptr().cast(), bytes, std::ptr::null(), 0, pa::SEEK_RELATIVE) }
            < 0
        {
            return Err(format!("write failed: {}", pulse.error()));
        }
    }
    // SAFETY: as above.
    pulse.wait(unsafe { pa::pa_stream_drain(stream, std::ptr::null(), std::ptr::null_mut()) })?;
    drop(pulse);
    let mut out = String::new();
    for onset in audio::click_onsets(&signal, RATE) {
        let Some(&(t, latency, sink, written)) = writes.get(onset / chunk) else { continue };
        let onset_ns = t + ((onset - written) as f64 * 1e9 / f64::from(RATE)) as i64;
        let line = serde_json::json!({ "onset_ns": onset_ns, "delay_ns": latency, "sink_delay_ns": sink });
        out.push_str(&format!("{line}\n"));
    }
    write_whole(&args.out, &out)
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let done = if args.api == Api::Pulse && args.mode == Mode::Play { play_pulse(&args) } else { run(&args) };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("melange-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults_and_modes() {
        let a = Args::try_parse_from(["melange-probe", "record", "--out", "o", "--target", "n", "--monitor"]).unwrap();
        assert_eq!((a.mode, a.target.as_deref(), a.monitor, a.api), (Mode::Record, Some("n"), true, Api::Pipewire));
        assert_eq!((a.seconds, a.quantum, a.wav), (10.0, 256, None));
        let a = Args::try_parse_from(["melange-probe", "play", "--out", "o", "--api", "pulse"]).unwrap();
        assert_eq!((a.mode, a.api), (Mode::Play, Api::Pulse));
    }

    #[test]
    fn a_misspelled_flag_or_a_missing_out_is_an_error() {
        for args in [
            &["play", "--out", "o", "--seconds"][..],
            &["play"],
            &["sing", "--out", "o"],
            &["play", "--out", "o", "--tagret", "n"],
        ] {
            assert!(
                Args::try_parse_from(std::iter::once("melange-probe").chain(args.iter().copied())).is_err(),
                "{args:?}"
            );
        }
    }
}
