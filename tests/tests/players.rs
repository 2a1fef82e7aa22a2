//! Players' own streams, end to end: real GStreamer players (`gst-launch-1.0 playbin`,
//! `gst-play-1.0`) in the guest session with the `melange` plugin, the real guest module
//! and its media broker, and a real melange-host decoding with GStreamer.
//!
//! Clips are made by GStreamer's encoders at test time; every frame the host decodes is
//! checked against a reference decode of the same file, and the sound against the
//! tone the clip carries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use melange_tests::{audio, scratch, serial, wait_until, GuestCodec, PipeWire, Redirected};
use serde_json::Value;

/// A test clip's containers and codecs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clip {
    /// H.264 (with B-frames) and AAC in MP4.
    H264Aac,
    /// VP9 and Opus in WebM.
    Vp9Opus,
    /// VP8 and Vorbis in WebM.
    Vp8Vorbis,
    /// H.264 and AAC in MP4, 6 s, with a white flash and a beep at each whole second.
    FlashBeep,
}

/// The tone the clips carry, Hz, and its amplitude.
const TONE_HZ: f64 = 440.0;
const TONE_AMP: f64 = 0.4;

/// Frames in a clip (30 fps).
fn clip_frames(clip: Clip) -> usize {
    if clip == Clip::FlashBeep {
        180
    } else {
        60
    }
}

impl Clip {
    fn video_codec(self) -> &'static str {
        match self {
            Clip::H264Aac | Clip::FlashBeep => "h264",
            Clip::Vp9Opus => "vp9",
            Clip::Vp8Vorbis => "vp8",
        }
    }

    fn audio_codec(self) -> &'static str {
        match self {
            Clip::H264Aac | Clip::FlashBeep => "aac",
            Clip::Vp9Opus => "opus",
            Clip::Vp8Vorbis => "vorbis",
        }
    }
}

/// Makes (once per test binary) and returns a clip, 320x240 at 30 fps, stereo 48 kHz.
fn clip(clip: Clip) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| scratch("player-clips"));
    let (name, video_enc, audio_enc, mux) = match clip {
        Clip::H264Aac => ("h264-aac.mp4", H264_ENC, AAC_ENC, "mp4mux"),
        Clip::FlashBeep => ("flash-beep.mp4", H264_ENC, AAC_ENC, "mp4mux"),
        Clip::Vp9Opus => {
            ("vp9-opus.webm", "vp9enc deadline=1 cpu-used=8 keyframe-max-dist=30", "opusenc bitrate=128000", "webmmux")
        }
        Clip::Vp8Vorbis => {
            ("vp8-vorbis.webm", "vp8enc deadline=1 cpu-used=8 keyframe-max-dist=30", "vorbisenc quality=0.6", "webmmux")
        }
    };
    let path = dir.join(name);
    if path.exists() {
        return path;
    }
    let frames = clip_frames(clip);
    let seconds = frames as f64 / 30.0;
    let (video_src, audio_src) = if clip == Clip::FlashBeep {
        // Black frames but a white one at each whole second, and a 30 ms 1 kHz beep
        // starting with each of them.
        let raw = dir.join("flash.i420");
        let (w, h) = (320, 240);
        let mut bytes = Vec::with_capacity(frames * w * h * 3 / 2);
        for n in 0..frames {
            let luma = if n % 30 == 0 { 235 } else { 16 };
            bytes.extend(std::iter::repeat_n(luma, w * h));
            bytes.extend(std::iter::repeat_n(128, w * h / 2));
        }
        std::fs::write(&raw, bytes).expect("raw frames");
        let wav = dir.join("beep.wav");
        let beep: Vec<f64> = (0..(48000.0 * seconds) as usize)
            .map(|i| {
                let t = i as f64 / 48000.0;
                if t.fract() < 0.03 {
                    TONE_AMP * (2.0 * std::f64::consts::PI * 1000.0 * t).sin()
                } else {
                    0.0
                }
            })
            .collect();
        audio::write_wav_s16(&wav, 48000, 2, &audio::to_s16(&beep, 2));
        (
            format!(
                "filesrc location={} ! rawvideoparse width={w} height={h} format=i420 framerate=30/1",
                raw.display()
            ),
            format!("filesrc location={} ! wavparse", wav.display()),
        )
    } else {
        let audio_buffers = (seconds * 48000.0 / 960.0).round() as usize;
        (
            format!("videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1"),
            format!("audiotestsrc num-buffers={audio_buffers} samplesperbuffer=960 freq={TONE_HZ} volume={TONE_AMP}"),
        )
    };
    let partial = path.with_extension("partial");
    let pipeline = format!(
        "{mux} name=m ! filesink location={out} {video_src} ! videoconvert ! {video_enc} ! queue ! m. \
         {audio_src} ! audioconvert ! audioresample ! audio/x-raw,rate=48000,channels=2 ! {audio_enc} ! queue ! m.",
        out = partial.display()
    );
    let out = Command::new("gst-launch-1.0")
        .arg("-q")
        .arg("-e")
        .args(pipeline.split_whitespace())
        .output()
        .expect("gst-launch-1.0 runs");
    assert!(out.status.success(), "making {name}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::rename(&partial, &path).expect("rename the clip");
    path
}

/// H.264 with B-frames, a keyframe a second.
const H264_ENC: &str =
    "x264enc key-int-max=30 bframes=2 speed-preset=ultrafast ! video/x-h264,profile=main ! h264parse";
const AAC_ENC: &str = "voaacenc bitrate=128000 ! aacparse";

/// The `melange` plugin, copied alone into a directory for GST_PLUGIN_PATH.
fn plugin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("gst-plugin");
        let lib = melange_tests::profile_dir().join("libgstmelange.so");
        std::fs::copy(&lib, dir.join("libgstmelange.so")).unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
        dir
    })
    .clone()
}

/// A command in the guest session that sees the `melange` plugin, with its own
/// registry cache and its pipelines dumped as dot files into `dots`.
fn player(pw: &PipeWire, program: &str, dots: &Path) -> Command {
    std::fs::create_dir_all(dots).expect("dot dir");
    let mut cmd = pw.command(program);
    cmd.env("GST_PLUGIN_PATH", plugin_dir())
        .env("GST_REGISTRY", dots.join("registry.bin"))
        .env("GST_DEBUG_DUMP_DOT_DIR", dots)
        .env("GST_DEBUG", "melangesink:4")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY");
    cmd
}

/// Plays `file` with `gst-launch-1.0 playbin` (plus `extra` properties).
fn playbin(pw: &PipeWire, file: &Path, dots: &Path, extra: &[&str]) -> Output {
    let mut cmd = player(pw, "gst-launch-1.0", dots);
    cmd.arg("playbin").arg(format!("uri=file://{}", file.display())).args(extra);
    timed_output(cmd, Duration::from_secs(60))
}

/// Runs `cmd` to its end, killing it after `timeout`.
fn timed_output(mut cmd: Command, timeout: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the player starts");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let _ = child.stdout.take().map(|mut o| o.read_to_end(&mut stdout));
    let _ = child.stderr.take().map(|mut e| e.read_to_end(&mut stderr));
    Output { status, stdout, stderr }
}

/// The element factories the player's pipeline held when it played (from the dot
/// files gst-launch dumps at each state change).
fn elements_used(dots: &Path) -> String {
    std::fs::read_dir(dots)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "dot"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// melange-host's `.decoded.jsonl` files in `dir` for `codec`.
fn decoded_logs(dir: &Path, codec: &str) -> Vec<PathBuf> {
    let suffix = format!(".{codec}.decoded.jsonl");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(&suffix))
        .collect();
    found.sort();
    found
}

/// FNV-1a 64, as melange-host computes it.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Each frame's checksum in a reference decode of `file` (GStreamer's decoders,
/// I420 in its default layout), of frames `width` x `height` (multiples of 4: no
/// padding in the rows).
fn reference_frames(file: &Path, width: usize, height: usize) -> Vec<u64> {
    let raw = file.with_extension("i420");
    let out = Command::new("gst-launch-1.0")
        .args(["-q", "filesrc"])
        .arg(format!("location={}", file.display()))
        .args(["!", "decodebin", "!", "videoconvert", "!", "video/x-raw,format=I420", "!", "filesink"])
        .arg(format!("location={}", raw.display()))
        .output()
        .expect("gst-launch-1.0 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&raw).expect("the reference decode");
    let frame = width * height * 3 / 2;
    assert_eq!(bytes.len() % frame, 0, "{} bytes is no whole number of {width}x{height} frames", bytes.len());
    bytes.chunks(frame).map(fnv1a).collect()
}

/// The frames melange-host decoded and showed, in order.
fn host_frames(dir: &Path, codec: &str) -> Vec<Value> {
    let logs = decoded_logs(dir, codec);
    assert_eq!(logs.len(), 1, "one decoded {codec} stream, got {logs:?}");
    json_lines(&logs[0]).into_iter().filter(|v| v["event"] == "frame").collect()
}

/// The one WAV file melange-host wrote for the player's audio.
fn host_audio(dir: &Path) -> audio::Audio {
    let wavs = melange_tests::wav_files(dir);
    assert_eq!(wavs.len(), 1, "one audio stream, got {wavs:?}");
    audio::read_wav(&wavs[0]).expect("a WAV")
}

/// Starts a guest and a host that writes everything into `out`.
fn rig(dir: &Path, out: &Path) -> Redirected {
    let out = format!("frames:{}", out.display());
    Redirected::start_with_host_args(dir, GuestCodec::Opus(128_000), &["--output", &out])
}

/// Waits until the host closed every stream (the files are complete).
fn wait_closed(rig: &mut Redirected, streams: usize) {
    let closed = wait_until(Duration::from_secs(10), || {
        (rig.host.log_text().matches(") closed (").count() >= streams).then_some(())
    });
    assert!(closed.is_some(), "the host did not close {streams} streams:\n{}", rig.host.log_text());
}

/// A clip's video decoded on the host matches the reference, frame for frame; its
/// sound arrives at the tone's frequency and level; the guest decoded nothing.
fn plays_through(clip_kind: Clip, program: &str) {
    let _serial = serial();
    let dir = scratch(&format!("player-{}-{}", clip_kind.video_codec(), program));
    let out = dir.join("out");
    let mut rig = rig(&dir, &out);
    let file = clip(clip_kind);
    let dots = dir.join("dots");
    let played = match program {
        "playbin" => playbin(&rig.guest_pw, &file, &dots, &[]),
        _ => {
            let mut cmd = player(&rig.guest_pw, "gst-play-1.0", &dots);
            cmd.arg("--no-interactive").arg(&file);
            timed_output(cmd, Duration::from_secs(60))
        }
    };
    let stderr = String::from_utf8_lossy(&played.stderr);
    assert!(played.status.success(), "{program} failed: {stderr}\n{}", rig.host.log_text());
    wait_closed(&mut rig, 2);
    rig.guest.stop();
    rig.host.stop();

    if program == "playbin" {
        let used = elements_used(&dots);
        assert!(used.contains("GstMelangeVideoSink") && used.contains("GstMelangeAudioSink"), "{used}");
        for decoder in ["avdec_", "vp8dec", "vp9dec", "opusdec", "vorbisdec", "faad"] {
            assert!(!used.contains(decoder), "the guest decoded ({decoder}) in:\n{used}");
        }
    }
    let want = reference_frames(&file, 320, 240);
    assert_eq!(want.len(), clip_frames(clip_kind));
    let got = host_frames(&out, clip_kind.video_codec());
    let got_fnv: Vec<u64> = got.iter().map(|f| f["fnv"].as_u64().expect("fnv")).collect();
    assert_eq!(got_fnv.len(), want.len(), "frames shown on the host vs in the file");
    let differ = got_fnv.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} frames differ from the reference decode", want.len());
    assert!(got.iter().all(|f| f["width"] == 320 && f["height"] == 240));
    assert_eq!(decoded_logs(&out, clip_kind.audio_codec()).len(), 1, "one decoded audio stream");

    let sound = host_audio(&out);
    let x = sound.channel(0);
    let body = audio::middle(audio::active(&x, 0.01), 0.8);
    let seconds = body.len() as f64 / f64::from(sound.rate);
    assert!(seconds > 1.2, "only {seconds:.2} s of the tone arrived");
    let f = audio::median_frequency(body, sound.rate);
    assert!((f - TONE_HZ).abs() < 2.0, "the tone arrived at {f:.1} Hz");
    let level = audio::rms_db(body);
    let want_level = 20.0 * (TONE_AMP / 2f64.sqrt()).log10();
    assert!((level - want_level).abs() < 1.0, "the tone arrived at {level:.2} dBFS, not {want_level:.2}");
}

#[test]
fn playbin_h264_aac_in_mp4_is_decoded_on_the_host_frame_for_frame() {
    plays_through(Clip::H264Aac, "playbin");
}

#[test]
fn playbin_vp9_opus_in_webm_is_decoded_on_the_host_frame_for_frame() {
    plays_through(Clip::Vp9Opus, "playbin");
}

#[test]
fn gst_play_vp8_vorbis_is_decoded_on_the_host_frame_for_frame() {
    plays_through(Clip::Vp8Vorbis, "gst-play");
}

#[test]
fn gst_play_h264_aac_is_decoded_on_the_host_frame_for_frame() {
    plays_through(Clip::H264Aac, "gst-play");
}

/// Runs `melange-player` on `file` in the guest session.
fn scripted(pw: &PipeWire, file: &Path, dots: &Path, args: &[&str]) -> Output {
    let mut cmd = player(pw, melange_tests::bin("melange-player").to_str().expect("a path"), dots);
    cmd.arg(file).args(args);
    timed_output(cmd, Duration::from_secs(60))
}

fn frame_fnvs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["fnv"].as_u64().expect("fnv")).collect()
}

/// An accurate seek from 0.5 s to 1.5 s: the host shows the frames before it, then
/// exactly the reference's from 1.5 s on, none in between (the lead-in from the
/// keyframe at 1 s is decoded there, not shown).
#[test]
fn a_seek_shows_exactly_the_frames_from_its_target() {
    let _serial = serial();
    let dir = scratch("player-seek");
    let out = dir.join("out");
    let mut rig = rig(&dir, &out);
    let file = clip(Clip::H264Aac);
    let played = scripted(&rig.guest_pw, &file, &dir.join("dots"), &["--seek", "0.5:1.5"]);
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    wait_closed(&mut rig, 2);
    rig.host.stop();
    let want = reference_frames(&file, 320, 240);
    let got = frame_fnvs(&host_frames(&out, "h264"));
    let tail = &want[45..];
    let shown: Vec<Option<usize>> = got.iter().map(|f| want.iter().position(|w| w == f)).collect();
    assert!(got.len() > tail.len() && got.ends_with(tail), "reference frames shown: {shown:?}");
    // Before it, frames in order from the first, none from the lead-in (the keyframe at
    // 1 s and after): a frame or two near the seek may be flushed before it is shown.
    let before = &shown[..shown.len() - tail.len()];
    assert!(before.len() >= 10, "{} frames before the seek", before.len());
    assert!(before.iter().all(|i| i.is_some_and(|i| i < 30)), "reference frames shown: {shown:?}");
    assert!(before.windows(2).all(|w| w[0] < w[1]) && before[0] == Some(0), "reference frames shown: {shown:?}");
    let index = std::fs::read_to_string(decoded_logs(&out, "h264")[0].with_extension("").with_extension("jsonl"))
        .expect("the access-unit index");
    assert!(index.contains(r#""event":"flush""#), "no flush reached the host");
}

/// A pause of a second: every frame still shown, in order, with the pause between two
/// of them on the host; the sound pauses with it.
#[test]
fn a_pause_holds_picture_and_sound_on_the_host() {
    let _serial = serial();
    let dir = scratch("player-pause");
    let out = dir.join("out");
    let mut rig = rig(&dir, &out);
    let file = clip(Clip::H264Aac);
    let played = scripted(&rig.guest_pw, &file, &dir.join("dots"), &["--pause", "0.7:1.0"]);
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    wait_closed(&mut rig, 2);
    rig.host.stop();
    let frames = host_frames(&out, "h264");
    assert_eq!(frame_fnvs(&frames), reference_frames(&file, 320, 240));
    let shown: Vec<u64> = frames.iter().map(|f| f["shown_ns"].as_u64().expect("shown_ns")).collect();
    let gaps: Vec<u64> = shown.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    let longest = gaps.iter().max().copied().unwrap_or(0);
    assert!((900_000_000..1_400_000_000).contains(&longest), "the longest gap between frames: {longest} ns");
    let pcm: Vec<Value> = json_lines(&decoded_logs(&out, "aac")[0]);
    let due: Vec<u64> = pcm.iter().filter_map(|l| l["due_ns"].as_u64()).collect();
    let audio_gap = due.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    assert!(audio_gap >= 900_000_000, "the sound did not pause: longest gap {audio_gap} ns");
}

/// Two players at once: each one's frames arrive whole, in its own stream.
#[test]
fn two_players_at_once_each_get_their_own_frames() {
    let _serial = serial();
    let dir = scratch("player-two");
    let out = dir.join("out");
    let mut rig = rig(&dir, &out);
    let (a, b) = (clip(Clip::H264Aac), clip(Clip::Vp9Opus));
    let pw = &rig.guest_pw;
    let (da, db) = (dir.join("dots-a"), dir.join("dots-b"));
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| playbin(pw, &a, &da, &[]));
        let tb = s.spawn(|| playbin(pw, &b, &db, &[]));
        (ta.join().expect("player a"), tb.join().expect("player b"))
    });
    assert!(ra.status.success() && rb.status.success(), "{:?} {:?}", ra, rb);
    wait_closed(&mut rig, 4);
    rig.host.stop();
    assert_eq!(frame_fnvs(&host_frames(&out, "h264")), reference_frames(&a, 320, 240));
    assert_eq!(frame_fnvs(&host_frames(&out, "vp9")), reference_frames(&b, 320, 240));
}

/// Players that cannot be forwarded still play, decoding in the guest (into a window
/// on the guest's own display): one that sets its own video sink (its sound is still
/// forwarded), any player while no host is connected, and a codec the host does not
/// decode.
#[test]
fn players_decode_locally_when_melange_cannot_take_their_stream() {
    let _serial = serial();
    let dir = scratch("player-local");
    let xvfb = Xvfb::start(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let out = dir.join("out");
    // The host takes AAC but no H.264.
    let out_arg = format!("frames:{}", out.display());
    let mut rig = Redirected::start_with_host_args(
        &dir,
        GuestCodec::Opus(128_000),
        &["--output", &out_arg, "--video-codecs", "aac"],
    );
    let file = clip(Clip::H264Aac);
    let uri = format!("uri=file://{}", file.display());
    let play = |pw: &PipeWire, dots: &Path, program: &str, args: &[&str]| {
        let mut cmd = player(pw, program, dots);
        cmd.env("DISPLAY", &xvfb.display).args(args);
        timed_output(cmd, Duration::from_secs(60))
    };

    let dots = dir.join("dots-no-codec");
    let played = play(&rig.guest_pw, &dots, "gst-launch-1.0", &["playbin", &uri]);
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    let used = elements_used(&dots);
    assert!(used.contains("avdec_h264") && !used.contains("GstMelangeVideoSink"), "{used}");
    assert!(used.contains("GstMelangeAudioSink") && !used.contains("avdec_aac"), "{used}");

    let dots = dir.join("dots-own-sink");
    let player_bin = melange_tests::bin("melange-player");
    let file_arg = file.display().to_string();
    let played =
        play(&rig.guest_pw, &dots, player_bin.to_str().expect("a path"), &[&file_arg, "--video-sink", "ximagesink"]);
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    wait_closed(&mut rig, 2);
    assert!(decoded_logs(&out, "h264").is_empty(), "an H.264 stream reached the host");
    assert_eq!(decoded_logs(&out, "aac").len(), 2, "both players' sound is forwarded");

    // No host: the guest's broker refuses at once and the players decode everything.
    rig.host.stop();
    let dots = dir.join("dots-no-host");
    let started = Instant::now();
    let played = play(&rig.guest_pw, &dots, "gst-launch-1.0", &["playbin", &uri]);
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    let used = elements_used(&dots);
    assert!(used.contains("avdec_h264") && used.contains("avdec_aac"), "{used}");
    assert!(!used.contains("GstMelange"), "{used}");
    // It played its 2 s at its pace: nothing waited for a host.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

/// A flash and a beep at each whole second: on the host, from 3 s on, each flash is
/// shown within 15 ms of its beep being heard (the beep's time is the audio output's own render
/// delay: the host's PipeWire here).
#[test]
fn picture_and_sound_leave_the_host_within_15_ms() {
    let _serial = serial();
    let dir = scratch("player-av-sync");
    let out = dir.join("out");
    let frames_arg = format!("frames:{}", out.display());
    let mut rig = Redirected::start_with_host_args(&dir, GuestCodec::Opus(128_000), &["--video-output", &frames_arg]);
    let file = clip(Clip::FlashBeep);
    let played = playbin(&rig.guest_pw, &file, &dir.join("dots"), &[]);
    let _ = std::fs::write(dir.join("player.log"), &played.stderr);
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    wait_closed(&mut rig, 2);
    rig.host.stop();

    let frames = host_frames(&out, "h264");
    assert_eq!(frames.len(), clip_frames(Clip::FlashBeep));
    let flashes: Vec<&Value> = frames.iter().filter(|f| f["luma"].as_f64().unwrap_or(0.0) > 128.0).collect();
    assert_eq!(flashes.len(), 6, "flashes at 0, 1, ... 5 s");
    let pcm = json_lines(&decoded_logs(&out, "aac")[0]);
    // When the sound of guest time `pts` is heard on the host.
    let heard = |pts: i64| -> Option<f64> {
        pcm.iter().find_map(|l| {
            let (start, frames, due) = (l["pts_ns"].as_i64()?, l["frames"].as_i64()?, l["due_ns"].as_i64()?);
            let end = start + frames * 1_000_000_000 / 48_000;
            (start..end).contains(&pts).then(|| (due + (pts - start)) as f64)
        })
    };
    let mut offsets = Vec::new();
    // The first seconds are the sinks learning the host's delays (the audio output's
    // settles as its jitter buffer does) and the host following them; from then on, in
    // sync (docs/host.md).
    for flash in &flashes[3..] {
        let pts = flash["pts_ns"].as_i64().expect("pts");
        let shown = flash["shown_ns"].as_f64().expect("shown");
        let beep = heard(pts).unwrap_or_else(|| panic!("no sound at the flash's time {pts}"));
        offsets.push((shown - beep) / 1e6);
    }
    eprintln!("picture minus sound on the host, ms: {offsets:?}");
    assert!(offsets.iter().all(|o| o.abs() <= 15.0), "A/V offsets {offsets:?} ms");
}

/// `--video-output window` under Xvfb: the video shows in a window titled after the
/// app, and the window's pixels are the video's.
#[test]
fn the_host_shows_the_video_in_a_window_titled_after_the_app() {
    let _serial = serial();
    let dir = scratch("player-window");
    let xvfb = Xvfb::start(&dir);
    let display = xvfb.display.clone();
    let mut rig = Redirected::start_with_host_env(
        &dir,
        GuestCodec::Opus(128_000),
        &["--video-output", "window"],
        &[("DISPLAY", display.as_str())],
    );
    let green = green_clip(&dir);
    let mut cmd = player(&rig.guest_pw, "gst-launch-1.0", &dir.join("dots"));
    cmd.arg("playbin").arg(format!("uri=file://{}", green.display()));
    let mut app = cmd.spawn().expect("the player");
    let title = "gst-launch-1.0 (guest)";
    let tree = wait_until(Duration::from_secs(10), || {
        let out = Command::new("xwininfo").args(["-root", "-tree", "-display", &display]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(title).then_some(text)
    });
    assert!(tree.is_some(), "no window titled {title:?}:\n{}", rig.host.log_text());
    std::thread::sleep(Duration::from_millis(1500));
    let shot = Command::new("xwd").args(["-root", "-silent", "-display", &display]).output().expect("xwd");
    let _ = app.wait();
    rig.host.stop();
    drop(xvfb);
    let pixels = xwd_pixels(&shot.stdout).expect("an XWD image");
    // The picture: at least most of a 320x240 window of the clip's green.
    let green_pixels = pixels.iter().filter(|&&(r, g, b)| is_green(r, g, b)).count();
    assert!(green_pixels > 320 * 240 * 8 / 10, "{green_pixels} green pixels on the screen");
}

/// An app that gives its video sink a window and a rectangle in it (`GstVideoOverlay`,
/// as GTK and Qt players do): the host's window takes the rectangle's size, and the
/// picture fills it.
#[test]
fn the_hosts_window_takes_the_size_the_app_shows_the_video_at() {
    let _serial = serial();
    let dir = scratch("player-geometry");
    let xvfb = Xvfb::start(&dir);
    let display = xvfb.display.clone();
    let mut rig = Redirected::start_with_host_env(
        &dir,
        GuestCodec::Opus(128_000),
        &["--video-output", "window"],
        &[("DISPLAY", display.as_str())],
    );
    let green = green_clip(&dir);
    let mut cmd =
        player(&rig.guest_pw, melange_tests::bin("melange-player").to_str().expect("a path"), &dir.join("dots"));
    cmd.arg(&green).args(["--render-rectangle", "16,24,400,300"]);
    let mut app = cmd.spawn().expect("the player");
    let title = "melange-player (guest)";
    let size = wait_until(Duration::from_secs(10), || window_size(&display, title));
    std::thread::sleep(Duration::from_millis(1500));
    let shot = Command::new("xwd").args(["-root", "-silent", "-display", &display]).output().expect("xwd");
    let tree = Command::new("xwininfo").args(["-root", "-tree", "-display", &display]).output().expect("xwininfo");
    let _ = app.wait();
    rig.host.stop();
    drop(xvfb);
    let log = rig.host.log_text();
    let tree = String::from_utf8_lossy(&tree.stdout);
    assert_eq!(size, Some((400, 300)), "the host's window {title:?} in\n{tree}\n{log}");
    assert!(log.contains("the player shows it at 400x300 in its window (at 16,24)"), "{log}");
    let pixels = xwd_pixels(&shot.stdout).expect("an XWD image");
    let green_pixels = pixels.iter().filter(|&&(r, g, b)| is_green(r, g, b)).count();
    assert!(green_pixels > 400 * 300 * 8 / 10, "{green_pixels} green pixels on the screen");
}

/// A host whose only H.264 decoder takes the common profiles (openh264dec, as a
/// hardware decoder lists its own): a High 4:4:4 clip is declined by the guest's sink
/// and decoded in the guest, a High one is forwarded and decoded on the host; the
/// host's log names what it lacks.
#[test]
fn a_host_whose_decoder_lacks_a_profile_gets_only_the_profiles_it_decodes() {
    let _serial = serial();
    let dir = scratch("player-profiles");
    let out = dir.join("out");
    let frames_arg = format!("frames:{}", out.display());
    let mut rig = Redirected::start_with_host_env(
        &dir,
        GuestCodec::Opus(128_000),
        &["--video-output", &frames_arg],
        &[("GST_PLUGIN_FEATURE_RANK", "avdec_h264:NONE")],
    );
    let log = rig.host.log_text();
    assert!(log.contains("no GStreamer decoder here for h264's profiles beyond High"), "{log}");
    let clip = |name: &str, format: &str| {
        let path = dir.join(name);
        let made = Command::new("gst-launch-1.0")
            .args(["-q", "-e", "videotestsrc", "num-buffers=60", "!"])
            .arg(format!("video/x-raw,format={format},width=320,height=240,framerate=30/1"))
            .args(["!", "x264enc", "!", "mp4mux", "!", "filesink"])
            .arg(format!("location={}", path.display()))
            .output()
            .expect("gst-launch");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        path
    };
    let (high, high444) = (clip("high.mp4", "I420"), clip("high444.mp4", "Y444"));
    // The guest's own display, for the clip it decodes.
    let xvfb = Xvfb::start(&dir);
    for file in [&high444, &high] {
        let mut cmd = player(&rig.guest_pw, "gst-launch-1.0", &dir.join("dots"));
        cmd.env("DISPLAY", &xvfb.display).arg("playbin").arg(format!("uri=file://{}", file.display()));
        let played = timed_output(cmd, Duration::from_secs(60));
        assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stdout));
    }
    wait_closed(&mut rig, 1);
    rig.host.stop();
    let log = rig.host.log_text();
    assert_eq!(log.matches("encoded video h264").count(), 1, "only the High clip reaches the host:\n{log}");
    let frames = host_frames(&out, "h264");
    assert_eq!(frames.len(), 60, "every frame of the High clip decoded on the host");
}

/// A host that takes VP9 but no players' audio: the sound of a VP9 + Opus file is
/// decoded in the guest (tapped like any app's), not offered to a host that would
/// refuse it, though the host's handshake names Opus for tapped audio.
#[test]
fn a_host_taking_no_players_audio_gets_only_the_video() {
    let _serial = serial();
    let dir = scratch("player-video-only");
    let out = dir.join("out");
    let frames_arg = format!("frames:{}", out.display());
    let mut rig = Redirected::start_with_host_args(
        &dir,
        GuestCodec::Opus(128_000),
        &["--video-output", &frames_arg, "--video-codecs", "vp9"],
    );
    let played = playbin(&rig.guest_pw, &clip(Clip::Vp9Opus), &dir.join("dots"), &[]);
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    wait_closed(&mut rig, 1);
    rig.host.stop();
    let log = rig.host.log_text();
    assert!(log.contains("encoded video vp9"), "{log}");
    assert!(!log.contains("encoded audio"), "no players' audio offered:\n{log}");
    assert_eq!(host_frames(&out, "vp9").len(), clip_frames(Clip::Vp9Opus));
}

/// The clip's green (0x00c000), as a screen shows it.
fn is_green(r: u8, g: u8, b: u8) -> bool {
    r < 40 && (150..=230).contains(&g) && b < 40
}

/// Five seconds of 320x240 H.264 in MP4, all of it one green.
fn green_clip(dir: &Path) -> PathBuf {
    let green = dir.join("green.mp4");
    let made = Command::new("gst-launch-1.0")
        .args([
            "-q",
            "-e",
            "videotestsrc",
            "num-buffers=150",
            "pattern=solid-color",
            "foreground-color=0xff00c000",
            "!",
        ])
        .args(["video/x-raw,width=320,height=240,framerate=30/1", "!", "videoconvert", "!", "x264enc", "!", "mp4mux"])
        .args(["!", "filesink"])
        .arg(format!("location={}", green.display()))
        .output()
        .expect("gst-launch");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    green
}

/// The size of the top-level window titled `title` on `display`, if there is one.
fn window_size(display: &str, title: &str) -> Option<(u32, u32)> {
    let out = Command::new("xwininfo").args(["-root", "-tree", "-display", display]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Video sinks add the program's name: "Totem (guest) : melange-host".
    let line = text.lines().find(|l| l.contains(&format!("\"{title}")))?;
    // `0x200001 "title": ("class" "class")  400x300+0+0  +0+0`
    line.split_whitespace().find_map(|word| {
        // WxH+X+Y (the window id, 0x..., has no offset after it).
        let (w, rest) = word.split_once('x')?;
        let (h, _) = rest.split_once(['+', '-'])?;
        Some((w.parse().ok()?, h.parse().ok()?))
    })
}

/// A virtual X display for a test's windows (the host's, or a guest player's own).
struct Xvfb {
    display: String,
    proc: melange_tests::Proc,
}

impl Xvfb {
    /// A display Xvfb picked itself (`-displayfd`: a free one, told once it accepts
    /// clients), so a stale socket or another test's server is never mistaken for it.
    fn start(dir: &Path) -> Xvfb {
        let mut c = Command::new("Xvfb");
        c.args(["-displayfd", "1", "-screen", "0", "640x480x24", "-nolisten", "tcp"]);
        let log = dir.join("xvfb.log");
        let proc = melange_tests::Proc::spawn(c, log.clone());
        let number = wait_until(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines().find_map(|l| l.trim().parse::<u32>().ok())
        });
        let number = number
            .unwrap_or_else(|| panic!("Xvfb did not start:\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        let display = format!(":{number}");
        // Until a client gets in: the last server on this number may still hold its
        // abstract socket while it exits, and Xlib tries that one first.
        let serving = wait_until(Duration::from_secs(10), || {
            let probe = Command::new("xwininfo").args(["-root", "-display", &display]).output().ok()?;
            probe.status.success().then_some(())
        });
        assert!(serving.is_some(), "Xvfb on {display} takes no clients");
        Xvfb { display, proc }
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        self.proc.stop();
    }
}

/// The pixels of an XWD dump of a 24-bit TrueColor screen (32 bits per pixel).
fn xwd_pixels(xwd: &[u8]) -> Option<Vec<(u8, u8, u8)>> {
    let field = |i: usize| Some(u32::from_be_bytes(xwd.get(i * 4..i * 4 + 4)?.try_into().ok()?) as usize);
    let (header, width, height) = (field(0)?, field(4)?, field(5)?);
    let (byte_order, bits_per_pixel, bytes_per_line, ncolors) = (field(7)?, field(11)?, field(12)?, field(19)?);
    if bits_per_pixel != 32 {
        return None;
    }
    let start = header + ncolors * 12;
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        for x in 0..width {
            let p = xwd.get(start + y * bytes_per_line + x * 4..start + y * bytes_per_line + x * 4 + 4)?;
            let v = if byte_order == 0 {
                u32::from_le_bytes(p.try_into().ok()?)
            } else {
                u32::from_be_bytes(p.try_into().ok()?)
            };
            out.push(((v >> 16) as u8, (v >> 8) as u8, v as u8));
        }
    }
    Some(out)
}
