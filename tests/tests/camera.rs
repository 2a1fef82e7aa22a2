//! The camera's building blocks on real PipeWire and GStreamer: Melange's own raw
//! video source node (`melange_pw::video`, what "Melange camera" is made of), read by
//! `pipewiresrc` as a video-call app reads a camera.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use melange_tests::{bin, scratch, serial, PipeWire, Proc};

/// Bytes of a 320x240 I420 frame.
const FRAME: usize = 320 * 240 * 3 / 2;

/// Frame `n` as `melange-test-camera` makes it.
fn expected(n: u64) -> Vec<u8> {
    let mut f: Vec<u8> = (0..FRAME).map(|i| (n as usize).wrapping_mul(31).wrapping_add(i / 7) as u8).collect();
    f[..8].copy_from_slice(&n.to_le_bytes());
    f
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

/// The host hears the guest's demand for the camera: when the first app starts
/// capturing from "Melange camera", and when the last one stops.
#[test]
fn an_app_capturing_from_the_guests_camera_asks_the_host_for_it_and_leaving_releases_it() {
    let _serial = serial();
    let dir = scratch("camera-demand");
    let mut rig = melange_tests::Redirected::start(&dir, melange_tests::GuestCodec::Opus(64_000));
    let mut cmd = rig.guest_pw.command("gst-launch-1.0");
    cmd.args(["-q", "pipewiresrc", "target-object=melange.camera", "!", "video/x-raw,format=I420", "!", "fakesink"]);
    let mut app = Proc::spawn(cmd, dir.join("app.log"));
    rig.host.wait_for_log("the guest wants the camera", Duration::from_secs(10));
    app.stop();
    rig.host.wait_for_log("the guest no longer wants the camera", Duration::from_secs(10));
    let guest = rig.guest.log_text();
    assert!(guest.contains("asking for the host's camera"), "{guest}");
    assert!(guest.contains("releasing the host's camera"), "{guest}");
}
