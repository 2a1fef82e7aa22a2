//! Writes the fuzzers' seed corpora into `fuzz/seeds/<target>/`, from a genuine session:
//! the exact bytes a guest sends (hello, an Opus and a PCM stream of real encoded audio,
//! heartbeats, closes, goodbye), cut at every phase boundary.
//!
//! `cargo run --release -p melange-tests --bin melange-fuzz-seeds`

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use melange_shim::codec::FrameEncoder;
use melange_shim::opus::Application;
use melange_shim::playout::Playout;
use melange_transport::message::{
    codec_bits, AppInfo, AudioFormat, Capabilities, Codec, MediaKind, MediaPacket, Role, StreamOpen,
};
use melange_transport::session::{CloseReason, Event, Session, SessionConfig};

/// One recorded session, as the guest wrote it, with the offsets of its phases.
struct Recording {
    bytes: Vec<u8>,
    /// (phase name, end offset) in order.
    phases: Vec<(&'static str, usize)>,
    /// Control payloads and Opus packets seen, for the message and codec targets.
    controls: Vec<Vec<u8>>,
    opus: Vec<Vec<u8>>,
}

fn record() -> Recording {
    let t0 = Instant::now();
    let caps = Capabilities {
        codecs: codec_bits::PCM_S16LE | codec_bits::OPUS,
        max_streams: melange_transport::message::MAX_STREAMS,
        kinds: melange_transport::message::kind_bits::AUDIO,
    };
    let mut cfg = SessionConfig::new(Role::Guest, "melange-guest (seed)", caps.clone());
    cfg.epoch = 0x1485_ce00_0001;
    let mut guest = Session::new(cfg, t0);
    let mut host = Session::new(SessionConfig::new(Role::Host, "melange-host (seed)", caps), t0);
    let mut rec = Recording { bytes: Vec::new(), phases: Vec::new(), controls: Vec::new(), opus: Vec::new() };
    let take = |g: &mut Session, rec: &mut Recording, phase: &'static str| {
        let out = g.pending_output().to_vec();
        g.consume_output(out.len());
        rec.bytes.extend_from_slice(&out);
        rec.phases.push((phase, rec.bytes.len()));
        out
    };
    let hello = take(&mut guest, &mut rec, "hello");
    host.handle_input(t0, &hello);
    let welcome = host.pending_output().to_vec();
    guest.handle_input(t0, &welcome);
    while guest.poll_event().is_some() {}
    rec.controls.push(hello[16..].to_vec());
    rec.controls.push(welcome[16..].to_vec());

    let stereo = AudioFormat { rate: 48000, channels: 2, positions: vec![3, 4] };
    for (id, codec, name) in [(1u32, Codec::Opus { bitrate: 128_000 }, "Firefox"), (2, Codec::PcmS16Le, "paplay")] {
        let open = StreamOpen {
            media: MediaKind::Audio(stereo.clone()),
            codec: codec.clone(),
            frame_samples: 480,
            app: AppInfo { name: name.into(), role: "Music".into(), binary: name.to_lowercase(), ..Default::default() },
            codec_data: Vec::new(),
        };
        let Ok(()) = guest.open_stream(id, &open) else { continue };
        let opened = take(&mut guest, &mut rec, "stream-open");
        rec.controls.push(opened[16..].to_vec());
        // The application the guest's taps encode with (`Mode::application` in
        // module-pipewire's config.rs).
        let Ok(mut enc) = FrameEncoder::new(&stereo, &codec, 480, Application::RestrictedLowDelay) else { continue };
        for seq in 0..20u32 {
            let frame: Vec<u8> = (0..480)
                .flat_map(|i| {
                    let v = 0.3 * (2.0 * std::f32::consts::PI * 440.0 * (seq * 480 + i) as f32 / 48000.0).sin();
                    match codec {
                        Codec::PcmS16Le => {
                            let s = ((v * 32767.0) as i16).to_le_bytes();
                            [s[0], s[1], s[0], s[1]].to_vec()
                        }
                        _ => [v.to_ne_bytes(), v.to_ne_bytes()].concat(),
                    }
                })
                .collect();
            let mut data = Vec::new();
            if enc.encode(&frame, &mut data).is_err() {
                continue;
            }
            if matches!(codec, Codec::Opus { .. }) {
                rec.opus.push(data.clone());
            }
            let packet = MediaPacket { seq, pts_ns: 1_000_000_000 + u64::from(seq) * 10_000_000, duration: 480, data };
            let _ = guest.send_media(id, &packet);
        }
        take(&mut guest, &mut rec, "media");
        guest.handle_timeout(t0 + Duration::from_secs(1));
        take(&mut guest, &mut rec, "heartbeat");
        guest.close_stream(id, "app stopped");
        let closed = take(&mut guest, &mut rec, "stream-close");
        rec.controls.push(closed[16..].to_vec());
    }
    guest.close(CloseReason::Local("guest side shutting down".into()));
    let bye = take(&mut guest, &mut rec, "goodbye");
    rec.controls.push(bye[16..].to_vec());
    while let Some(e) = guest.poll_event() {
        if let Event::Error(e) = e {
            eprintln!("seed session error: {e}");
        }
    }
    rec
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn run(root: &Path) -> std::io::Result<usize> {
    let rec = record();
    let seeds = root.join("fuzz/seeds");
    let mut n = 0;
    // Frame decoder: [cut size][bytes], the session up to and from every phase boundary.
    let mut start = 0;
    for (i, (phase, end)) in rec.phases.iter().enumerate() {
        for (cut, part) in [(7u8, &rec.bytes[..*end]), (255, &rec.bytes[start..*end])] {
            let mut seed = vec![cut];
            seed.extend_from_slice(part);
            write(&seeds.join("frame_decoder"), &format!("{i:02}-{phase}-{cut}"), &seed)?;
            n += 1;
        }
        start = *end;
    }
    // Control messages: each payload as sent.
    for (i, c) in rec.controls.iter().enumerate() {
        write(&seeds.join("control_messages"), &format!("{i:02}"), c)?;
        n += 1;
    }
    // Session: the recorded bytes fed as raw-byte ops (op 6, length, bytes), cut at
    // every phase boundary.
    let mut ops = Vec::new();
    let mut start = 0;
    for (i, (phase, end)) in rec.phases.iter().enumerate() {
        for chunk in rec.bytes[start..*end].chunks(255) {
            ops.push(6u8);
            ops.push(chunk.len() as u8);
            ops.extend_from_slice(chunk);
        }
        write(&seeds.join("session"), &format!("{i:02}-{phase}"), &ops)?;
        n += 1;
        start = *end;
    }
    // Jitter buffer: the (buffered, wanted) trace of bursty arrival into a 30 ms target.
    let mut trace = vec![22u8]; // 22 * 64 + 1 frames ~ 30 ms
    let mut p = Playout::new(22 * 64 + 1, 4800);
    let mut buffered = 0usize;
    for cycle in 0..400 {
        if cycle % 4 == 0 {
            buffered += 960 * (1 + cycle % 3);
        }
        trace.extend_from_slice(&(buffered.min(65535) as u16).to_le_bytes());
        trace.extend_from_slice(&256u16.to_le_bytes());
        buffered -= p.plan(buffered, 256);
    }
    write(&seeds.join("jitter_buffer"), "bursty", &trace)?;
    n += 1;
    // Opus decode: real packets as [len][480 / 40][bytes] records.
    let mut records = vec![0u8];
    for packet in rec.opus.iter().filter(|p| p.len() < 256) {
        records.push(packet.len() as u8);
        records.push(12);
        records.extend_from_slice(packet);
    }
    write(&seeds.join("opus_decode"), "stereo-48k", &records)?;
    n += 1;
    Ok(n)
}

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    match run(root) {
        Ok(n) => {
            println!("wrote {n} seeds under {}", root.join("fuzz/seeds").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("melange-fuzz-seeds: {e}");
            ExitCode::FAILURE
        }
    }
}
