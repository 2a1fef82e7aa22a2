//! The camera's building blocks on real PipeWire and GStreamer: Melange's own raw
//! video source node (`melange_pw::video`, what "Melange camera" is made of), read by
//! `pipewiresrc` as a video-call app reads a camera.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use melange_tests::video::{self, Pattern};
use melange_tests::{bin, scratch, serial, PipeWire, Proc};

/// Bytes of a 320x240 I420 frame.
const FRAME: usize = 320 * 240 * 3 / 2;

/// Frame `n` as `melange-test-camera` makes it by default.
fn expected(n: u64) -> Vec<u8> {
    video::frame(Pattern::Counter, 320, 240, n)
}

/// `num` frames read from node `target` by `pipewiresrc`, as raw I420 320x240.
fn consume(pw: &PipeWire, target: &str, num: u32, out: &Path) -> Vec<Vec<u8>> {
    let mut cmd = pw.command("gst-launch-1.0");
    cmd.args(["-q", "pipewiresrc", &format!("target-object={target}"), &format!("num-buffers={num}"), "!"])
        .args(["video/x-raw,format=I420,width=320,height=240", "!", "filesink"])
        .arg(format!("location={}", out.display()));
    let done = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(done, "pipewiresrc did not end with {num} frames");
    let bytes = std::fs::read(out).expect("the consumer's file");
    bytes.chunks(FRAME).map(<[u8]>::to_vec).collect()
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> bool {
    let mut child = cmd.spawn().expect("gst-launch-1.0");
    let ended = melange_tests::wait_until(timeout, || child.try_wait().ok().flatten());
    if ended.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    ended.is_some_and(|s| s.success())
}

/// Both sessions, melange-host with `host_args` (`--camera ...`) and the guest module.
fn call_rig(dir: &Path, host_args: &[&str]) -> melange_tests::Redirected {
    melange_tests::Redirected::start_with_host_args(dir, melange_tests::GuestCodec::Opus(64_000), host_args)
}

/// What a guest app (`pipewiresrc` from "Melange camera", with `caps`) wrote of `n`
/// frames into `out`; fails the test if it did not end with them.
fn capture(pw: &PipeWire, caps: &str, n: u32, out: &Path) -> Vec<u8> {
    let mut cmd = pw.command("gst-launch-1.0");
    cmd.args(["-q", "pipewiresrc", "target-object=melange.camera", &format!("num-buffers={n}"), "!", caps])
        .args(["!", "filesink"])
        .arg(format!("location={}", out.display()));
    assert!(run_with_timeout(cmd, Duration::from_secs(30)), "the app got no {n} frames as {caps}");
    std::fs::read(out).expect("the app's file")
}

/// Every frame a consumer gets is one the camera made, whole, and in the order made;
/// few are skipped; a second consumer after the first gets frames too.
#[test]
fn a_raw_video_source_hands_pipewiresrc_its_frames_whole_and_in_order() {
    let _serial = serial();
    let dir = scratch("camera-source");
    let pw = PipeWire::start(&dir.join("pw"));
    let mut cmd = pw.command(bin("melange-test-camera"));
    cmd.args(["--name", "test-cam", "--width", "320", "--height", "240", "--fps", "30"]);
    let mut camera = Proc::spawn(cmd, dir.join("camera.log"));
    camera.wait_for_log("melange-test-camera: test-cam", Duration::from_secs(10));
    for round in 0..2 {
        let frames = consume(&pw, "test-cam", 30, &dir.join(format!("frames-{round}.yuv")));
        assert_eq!(frames.len(), 30, "round {round}: frames");
        let numbers: Vec<u64> =
            frames.iter().map(|f| u64::from_le_bytes(f[..8].try_into().expect("8 bytes"))).collect();
        for (f, n) in frames.iter().zip(&numbers) {
            assert!(*f == expected(*n), "round {round}: frame {n} is not the camera's");
        }
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "round {round}: out of order: {numbers:?}");
        let skipped = numbers[29] - numbers[0] - 29;
        eprintln!("round {round}: frames {} to {}, {skipped} skipped", numbers[0], numbers[29]);
        assert!(skipped <= 3, "round {round}: {skipped} frames skipped: {numbers:?}");
    }
    camera.stop();
}

/// Without a host the guest's "Melange camera" is there, a `Video/Source`, says why no
/// frames come, and a video-call app can link to it (it waits for frames; nothing
/// fails).
#[test]
fn without_a_host_the_guests_camera_is_there_and_says_why_it_is_dark() {
    let _serial = serial();
    let dir = scratch("camera-no-host");
    let pw = PipeWire::start(&dir.join("pw"));
    let port = dir.join("no-host.sock");
    let mut guest = melange_tests::start_guest(
        &pw,
        &format!("unix:{}", port.display()),
        melange_tests::GuestCodec::Opus(64_000),
        dir.join("guest.log"),
    );
    let props = melange_tests::wait_until(Duration::from_secs(10), || {
        pw.node_props("melange.camera").filter(|p| p.get("melange.camera.status").is_some())
    })
    .unwrap_or_else(|| panic!("no camera node:\n{}", guest.log_text()));
    assert_eq!(props["media.class"], "Video/Source", "{props}");
    assert_eq!(props["node.description"], "Melange camera", "{props}");
    assert_eq!(props["melange.camera.status"], "no host connected", "{props}");
    let mut cmd = pw.command("gst-launch-1.0");
    cmd.args(["-q", "pipewiresrc", "target-object=melange.camera", "!", "video/x-raw,format=I420", "!", "fakesink"]);
    let mut app = Proc::spawn(cmd, dir.join("app.log"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(app.try_wait().is_none(), "the app ended: {}", app.log_text());
    app.stop();
    guest.stop();
}

/// The caps of what "Melange camera" shows unless asked otherwise.
const I420: &str = "video/x-raw,format=I420,width=640,height=360";

/// Bytes of a 640x360 I420 frame: what "Melange camera" shows.
const CALL_FRAME: usize = 640 * 360 * 3 / 2;

/// Starts `melange-test-camera` as `name` on `pw`, at 640x360 and 30 fps.
fn test_camera(pw: &PipeWire, name: &str, log: std::path::PathBuf) -> Proc {
    test_camera_showing(pw, name, Pattern::Counter, log)
}

/// As [`test_camera`], showing `pattern`.
fn test_camera_showing(pw: &PipeWire, name: &str, pattern: Pattern, log: std::path::PathBuf) -> Proc {
    test_camera_as(pw, name, pattern, &["--width", "640", "--height", "360"], log)
}

/// As [`test_camera_showing`], with more `melange-test-camera` arguments (size, layout).
fn test_camera_as(pw: &PipeWire, name: &str, pattern: Pattern, args: &[&str], log: std::path::PathBuf) -> Proc {
    let pattern = match pattern {
        Pattern::Counter => "counter",
        Pattern::Smooth => "smooth",
    };
    let mut cmd = pw.command(bin("melange-test-camera"));
    cmd.args(["--name", name, "--fps", "30", "--pattern", pattern]).args(args);
    let mut camera = Proc::spawn(cmd, log);
    camera.wait_for_log(&format!("melange-test-camera: {name}"), Duration::from_secs(10));
    camera
}

/// The guest camera's status, once it says something starting with `prefix`.
fn wait_status(pw: &PipeWire, prefix: &str) -> String {
    melange_tests::wait_until(Duration::from_secs(15), || {
        pw.node_props("melange.camera")
            .and_then(|p| p.get("melange.camera.status").and_then(|v| v.as_str()).map(str::to_owned))
            .filter(|s| s.starts_with(prefix))
    })
    .unwrap_or_else(|| {
        let now = pw.node_props("melange.camera").map(|p| p.to_string()).unwrap_or_default();
        panic!("the camera's status never began with {prefix:?}: {now}")
    })
}

/// The frame numbers of `frames` (as `melange-test-camera` stamps them), checking that
/// each is the camera's own, whole, and that they come in order with few skipped.
fn check_camera_frames(frames: &[Vec<u8>], size: usize) -> Vec<u64> {
    let numbers: Vec<u64> = frames.iter().map(|f| video::number(Pattern::Counter, 640, f)).collect();
    for (f, n) in frames.iter().zip(&numbers) {
        assert_eq!(f.len(), size, "frame {n} is cut");
        assert!(*f == video::frame(Pattern::Counter, 640, 360, *n), "frame {n} is not the camera's");
    }
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "out of order: {numbers:?}");
    let skipped = numbers[numbers.len() - 1] - numbers[0] + 1 - numbers.len() as u64;
    eprintln!("frames {} to {}, {skipped} skipped", numbers[0], numbers[numbers.len() - 1]);
    assert!(skipped <= 3, "{skipped} frames skipped: {numbers:?}");
    numbers
}

/// The host's camera reaches a guest app through "Melange camera" exactly: every frame
/// the app gets is the host camera's own, byte for byte, in order; the host captures
/// only while the app does, and says so in its log.
#[test]
fn the_hosts_camera_reaches_a_guest_app_exact_in_order_and_only_while_it_captures() {
    let _serial = serial();
    let dir = scratch("camera-call");
    let rig = call_rig(&dir, &["--camera", "test-cam"]);
    let mut camera = test_camera(&rig.host_pw, "test-cam", dir.join("camera.log"));
    assert!(wait_status(&rig.guest_pw, "idle").contains("closed"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!rig.host.log_text().contains("camera opened"), "opened with no app: {}", rig.host.log_text());

    for round in 0..2 {
        let out = dir.join(format!("call-{round}.yuv"));
        let started = std::time::Instant::now();
        let bytes = capture(&rig.guest_pw, I420, 60, &out);
        let ended = std::time::Instant::now();
        assert_eq!(bytes.len(), 60 * CALL_FRAME, "round {round}");
        let frames: Vec<Vec<u8>> = bytes.chunks(CALL_FRAME).map(<[u8]>::to_vec).collect();
        check_camera_frames(&frames, CALL_FRAME);
        let log = melange_tests::wait_until(Duration::from_secs(5), || {
            let log = rig.host.log_text();
            (log.matches("camera closed").count() > round).then_some(log)
        })
        .unwrap_or_else(|| panic!("round {round}: the host's camera stayed open: {}", rig.host.log_text()));
        let close_delay = ended.elapsed();
        assert_eq!(log.matches("camera opened for the guest: camera test-cam").count(), round + 1, "{log}");
        eprintln!(
            "round {round}: app ran {:.0} ms for 60 frames; the host closed the camera at most {:.0} ms after the app ended",
            (ended - started).as_secs_f64() * 1000.0,
            close_delay.as_secs_f64() * 1000.0
        );
        assert!(wait_status(&rig.guest_pw, "idle").contains("closed"));
        // The close's hysteresis: the next open is at least half a second later.
        std::thread::sleep(Duration::from_millis(600));
    }
    camera.stop();
}

/// A host without a camera to give (`--camera none`, or a camera that is not there):
/// the guest's camera says why it is dark, an app capturing from it waits without an
/// error; a host with none is not asked, one whose camera is missing says so.
#[test]
fn a_host_without_the_camera_leaves_the_guests_dark_and_says_why() {
    let _serial = serial();
    let dir = scratch("camera-none");
    let rig = call_rig(&dir, &["--camera", "none"]);
    wait_status(&rig.guest_pw, "the host has no camera to give");
    let mut cmd = rig.guest_pw.command("gst-launch-1.0");
    cmd.args(["-q", "pipewiresrc", "target-object=melange.camera", "!", "video/x-raw,format=I420", "!", "fakesink"]);
    let mut app = Proc::spawn(cmd, dir.join("app.log"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(app.try_wait().is_none(), "the app ended: {}", app.log_text());
    // A host that offers no camera is not asked for one.
    let host = rig.host.log_text();
    assert!(!host.contains("opening") && !host.contains("captures from its camera"), "{host}");
    assert!(!rig.guest.log_text().contains("asking for the host's camera"), "{}", rig.guest.log_text());
    app.stop();
    drop(rig);

    let dir = scratch("camera-missing");
    let rig = call_rig(&dir, &["--camera", "no-such-camera"]);
    wait_status(&rig.guest_pw, "idle");
    let mut cmd = rig.guest_pw.command("gst-launch-1.0");
    cmd.args(["-q", "pipewiresrc", "target-object=melange.camera", "!", "video/x-raw,format=I420", "!", "fakesink"]);
    let mut app = Proc::spawn(cmd, dir.join("app.log"));
    let status = wait_status(&rig.guest_pw, "the host's camera failed");
    assert!(
        rig.host.log_text().contains("cannot capture camera no-such-camera for the guest"),
        "{}",
        rig.host.log_text()
    );
    eprintln!("status: {status}");
    assert!(app.try_wait().is_none(), "the app ended: {}", app.log_text());
    app.stop();
}

/// A V4L2 app (GStreamer's `v4l2src`, through `pw-v4l2`) gets the host's camera from
/// "Melange camera" exactly as a PipeWire app does. `pw-v4l2` needs a `/dev/video0` to
/// exist: a placeholder in a private mount namespace stands in for it.
#[test]
fn a_v4l2_app_gets_the_hosts_camera_through_pw_v4l2() {
    let _serial = serial();
    let dir = scratch("camera-v4l2");
    let rig = call_rig(&dir, &["--camera", "test-cam"]);
    let mut camera = test_camera(&rig.host_pw, "test-cam", dir.join("camera.log"));
    wait_status(&rig.guest_pw, "idle");
    // pw-v4l2 0.3.65 shows V4L2 apps the node's first format only: I420 at 640x360.
    {
        let format = "I420";
        let out = dir.join(format!("v4l2-{format}.raw"));
        let app = format!(
            "mount -t tmpfs tmpfs /dev && mknod /dev/video0 c 81 0 && mknod /dev/null c 1 3 && \
             exec pw-v4l2 gst-launch-1.0 -q v4l2src device=/dev/video0 num-buffers=45 \
             ! video/x-raw,format={format},width=640,height=360 ! filesink location={}",
            out.display()
        );
        let mut cmd = rig.guest_pw.command("unshare");
        cmd.args(["-m", "sh", "-c", &app]);
        assert!(run_with_timeout(cmd, Duration::from_secs(30)), "the V4L2 app got no 45 {format} frames");
        let bytes = std::fs::read(&out).expect("the app's file");
        let size = if format == "YUY2" { 640 * 360 * 2 } else { CALL_FRAME };
        assert_eq!(bytes.len(), 45 * size, "{format}");
        let frames: Vec<Vec<u8>> = bytes
            .chunks(size)
            .map(|f| if format == "YUY2" { video::yuy2_to_i420(f, 640, 360) } else { f.to_vec() })
            .collect();
        check_camera_frames(&frames, CALL_FRAME);
    }
    camera.stop();
}

/// Encoded (`--camera-codec vp8`, `h264`): every frame a guest app gets is the host
/// camera's, in order, at a PSNR of at least 35 dB against the camera's own picture.
#[test]
fn the_hosts_camera_encoded_reaches_a_guest_app_at_35_db_and_in_order() {
    let _serial = serial();
    for codec in ["vp8", "h264"] {
        let dir = scratch(&format!("camera-{codec}"));
        let mut rig = call_rig(&dir, &["--camera", "test-cam", "--camera-codec", codec]);
        let mut camera = test_camera_showing(&rig.host_pw, "test-cam", Pattern::Smooth, dir.join("camera.log"));
        wait_status(&rig.guest_pw, "idle");
        let out = dir.join("call.yuv");
        let bytes = capture(&rig.guest_pw, I420, 60, &out);
        assert_eq!(bytes.len(), 60 * CALL_FRAME, "{codec}");
        let frames: Vec<&[u8]> = bytes.chunks(CALL_FRAME).collect();
        let numbers: Vec<u64> = frames.iter().map(|f| video::number(Pattern::Smooth, 640, f)).collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{codec}: out of order: {numbers:?}");
        let psnr: Vec<f64> = frames
            .iter()
            .zip(&numbers)
            .map(|(f, n)| video::psnr(f, &video::frame(Pattern::Smooth, 640, 360, *n)))
            .collect();
        let min = psnr.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = psnr.iter().sum::<f64>() / psnr.len() as f64;
        let skipped = numbers[59] - numbers[0] - 59;
        rig.host.wait_for_log("camera closed", Duration::from_secs(5));
        let log = rig.host.log_text();
        let sent = log.lines().find(|l| l.contains("camera closed")).unwrap_or_default().to_owned();
        eprintln!("{codec}: PSNR min {min:.1} dB, mean {mean:.1} dB; {skipped} skipped; host: {sent}");
        assert!(min >= 35.0, "{codec}: a frame at {min:.1} dB: {psnr:?}");
        assert!(skipped <= 3, "{codec}: {skipped} skipped: {numbers:?}");
        camera.stop();
    }
}

/// Apps asking for another layout or size get it: YUY2 at 640x360 (a V4L2 app's usual
/// first choice) is the camera's frame byte for byte once unpacked; NV12 at 1280x720 is
/// the frame scaled, in order.
#[test]
fn apps_get_the_layout_and_size_they_ask_for() {
    let _serial = serial();
    let dir = scratch("camera-formats");
    let rig = call_rig(&dir, &["--camera", "test-cam"]);
    let mut camera = test_camera_showing(&rig.host_pw, "test-cam", Pattern::Smooth, dir.join("camera.log"));
    wait_status(&rig.guest_pw, "idle");
    for (format, width, height) in [("YUY2", 640usize, 360usize), ("NV12", 1280, 720)] {
        let out = dir.join(format!("{format}.raw"));
        let caps = format!("video/x-raw,format={format},width={width},height={height}");
        let bytes = capture(&rig.guest_pw, &caps, 30, &out);
        let size = if format == "YUY2" { width * height * 2 } else { video::i420_bytes(width, height) };
        assert_eq!(bytes.len(), 30 * size, "{format}");
        let mut numbers = Vec::new();
        for f in bytes.chunks(size) {
            if format == "YUY2" {
                let i420 = video::yuy2_to_i420(f, width, height);
                let n = video::number(Pattern::Smooth, width, &i420);
                assert!(i420 == video::frame(Pattern::Smooth, width, height, n), "YUY2 frame {n} is not the camera's");
                numbers.push(n);
            } else {
                let n = video::number_scaled(width, f, 2.0);
                let mut want = vec![0u8; size];
                let out = melange_pw::video::OutFormat {
                    format: melange_pw::video::PixelFormat::Nv12,
                    width: width as u32,
                    height: height as u32,
                };
                melange_pw::video::convert(&video::frame(Pattern::Smooth, 640, 360, n), 640, 360, out, &mut want);
                assert!(f == want, "NV12 frame {n} is not the camera's, scaled");
                numbers.push(n);
            }
        }
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{format}: out of order: {numbers:?}");
        eprintln!("{format} {width}x{height}: frames {} to {}", numbers[0], numbers[29]);
    }
    camera.stop();
}

/// A camera of another size and layout than the guest shows (640x480 YUY2, as many USB
/// cameras give): the host converts and scales it into 640x360 I420, the 4:3 picture
/// between black borders, and the guest app gets every frame in order.
#[test]
fn a_camera_of_another_size_and_layout_is_scaled_to_what_the_guest_shows() {
    let _serial = serial();
    let dir = scratch("camera-4x3");
    let rig = call_rig(&dir, &["--camera", "test-cam"]);
    let args = ["--width", "640", "--height", "480", "--format", "yuy2"];
    let mut camera = test_camera_as(&rig.host_pw, "test-cam", Pattern::Smooth, &args, dir.join("camera.log"));
    wait_status(&rig.guest_pw, "idle");
    let out = dir.join("4x3.yuv");
    let bytes = capture(&rig.guest_pw, I420, 30, &out);
    assert_eq!(bytes.len(), 30 * CALL_FRAME);
    // 640x480 into 640x360: scaled by 0.75 to 480x360, centred: borders 80 pixels wide.
    let numbers: Vec<u64> = bytes.chunks(CALL_FRAME).map(|f| video::number_at(640, f, 0.75, 80, 0)).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "out of order: {numbers:?}");
    let skipped = numbers[29] - numbers[0] - 29;
    assert!(skipped <= 3, "{skipped} skipped: {numbers:?}");
    let f = &bytes[..CALL_FRAME];
    let border: Vec<u8> = (0..360).flat_map(|y| f[y * 640..y * 640 + 70].to_vec()).collect();
    let mean = border.iter().map(|&v| f64::from(v)).sum::<f64>() / border.len() as f64;
    assert!((mean - 16.0).abs() < 4.0, "the border's luma is {mean:.1}, not black");
    eprintln!("4:3 YUY2 camera: frames {} to {}, {skipped} skipped, border luma {mean:.1}", numbers[0], numbers[29]);
    camera.stop();
}
