//! `melange-probe`: timestamps audio on the graph clock, for latency measurements with
//! one clock (`CLOCK_MONOTONIC`, which every PipeWire graph on this machine runs on).
//!
//! ```text
//! melange-probe play   --out FILE [--target NODE] [--seconds S] [--quantum N]
//! melange-probe record --out FILE --target NODE [--seconds S] [--wav FILE]
//! ```
//!
//! `play` is an app: it plays [`audio::click_train`] and writes, per click, the graph
//! time at which the click's onset sample entered the graph (the cycle time of the
//! buffer that held it, plus its offset), and the delay the app's stream reported for
//! it (`pw_stream_get_time`: what an app would use for A/V sync). `record` captures a
//! node (a sink's monitor) and writes the graph time of each click onset it hears, and
//! optionally the recording as WAV. One JSON object per line:
//! `{"onset_ns": T, "delay_ns": D}` (`delay_ns` from `play` only).
//!
//! The real-time callbacks only copy into preallocated wait-free rings.

use std::cell::Cell;
use std::io::Write;
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

struct Args {
    mode: String,
    out: PathBuf,
    target: Option<String>,
    seconds: f64,
    quantum: u32,
    wav: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("usage: melange-probe play|record --out FILE [--target NODE] [--seconds S]")?;
    let mut a = Args { mode, out: PathBuf::new(), target: None, seconds: 10.0, quantum: 256, wav: None };
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--out" => a.out = v.into(),
            "--target" => a.target = Some(v),
            "--seconds" => a.seconds = v.parse().map_err(|_| format!("bad --seconds {v}"))?,
            "--quantum" => a.quantum = v.parse().map_err(|_| format!("bad --quantum {v}"))?,
            "--wav" => a.wav = Some(v.into()),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if a.out.as_os_str().is_empty() {
        return Err("--out is required".into());
    }
    Ok(a)
}

fn format_pod() -> Result<Vec<u8>, String> {
    let mut info = spa::param::audio::AudioInfoRaw::new();
    info.set_format(spa::param::audio::AudioFormat::F32LE);
    info.set_rate(RATE);
    info.set_channels(CHANNELS as u32);
    let mut position = [0u32; spa::sys::SPA_AUDIO_MAX_CHANNELS as usize];
    position[0] = spa::sys::SPA_AUDIO_CHANNEL_FL;
    position[1] = spa::sys::SPA_AUDIO_CHANNEL_FR;
    info.set_position(position);
    let obj = spa::pod::Object {
        type_: spa::utils::SpaTypes::ObjectParamFormat.as_raw(),
        id: spa::param::ParamType::EnumFormat.as_raw(),
        properties: info.into(),
    };
    spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &spa::pod::Value::Object(obj))
        .map(|(c, _)| c.into_inner())
        .map_err(|e| format!("{e:?}"))
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
    let context = pw::context::ContextRc::new(&main_loop, None).map_err(|e| e.to_string())?;
    let core = context.connect_rc(None).map_err(|e| format!("cannot connect to PipeWire: {e}"))?;
    let play = args.mode == "play";
    if !play && args.mode != "record" {
        return Err(format!("unknown mode {}", args.mode));
    }
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
    if !play {
        props.insert("stream.capture.sink", "true");
    }
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
    let mut params = [spa::pod::Pod::from_bytes(&pod).ok_or("bad pod")?];
    let direction = if play { spa::utils::Direction::Output } else { spa::utils::Direction::Input };
    stream
        .connect(
            direction,
            None,
            pw::stream::StreamFlags::AUTOCONNECT
                | pw::stream::StreamFlags::MAP_BUFFERS
                | pw::stream::StreamFlags::RT_PROCESS,
            &mut params,
        )
        .map_err(|e| e.to_string())?;

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
    let mut out = std::fs::File::create(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
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
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    if let Some(wav) = &args.wav {
        audio::write_wav_f32(wav, RATE, 1, &recording);
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("melange-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
