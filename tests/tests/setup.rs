//! Setup mistakes, each made for real: one line that names what is wrong and the fix,
//! and nothing else lost meanwhile. (No permission on the virtio port is checked in the
//! VM test, `scripts/vm-test`, where the port and the seat are real.)

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use melange_tests::{
    audio, bin, profile_dir, root, running_as_root, scratch, start_guest, wait_until, GuestCodec, PipeWire, Proc,
};

/// The lines of `log` that contain `needle`.
fn lines_with(log: &str, needle: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}

/// `pipewire -c melange-guest.conf` as the packaged service runs it, with this tree's
/// module, in an environment where `runtime_dir` holds no PipeWire.
fn guest_service_without_pipewire(dir: &Path) -> std::process::Output {
    let modules = dir.join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    let link = modules.join("libpipewire-module-melange.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(profile_dir().join("libpipewire_module_melange.so"), &link).unwrap();
    let sysdir = Command::new("pkg-config")
        .args(["--variable=moduledir", "libpipewire-0.3"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    Command::new("pipewire")
        .arg("-c")
        .arg(root().join("packaging/melange-guest.conf"))
        .env("PIPEWIRE_MODULE_DIR", format!("{}:{sysdir}", modules.display()))
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("PIPEWIRE_REMOTE")
        .env_remove("PIPEWIRE_RUNTIME_DIR")
        .output()
        .expect("pipewire runs")
}

#[test]
fn a_guest_without_its_virtio_port_says_how_to_add_it_and_its_apps_play_on() {
    let dir = scratch("setup-no-port");
    let name = (0..100)
        .map(|i| format!("org.melange.media.{i}"))
        .find(|n| !Path::new("/dev/virtio-ports").join(n).exists())
        .expect("a free port name");
    let pw = PipeWire::start(&dir.join("guest"));
    let guest = start_guest(&pw, &format!("virtio:{name}"), GuestCodec::Opus(128_000), dir.join("guest.log"));

    // An app plays through the redirect sink as if nothing were wrong: 1 s of tone ends.
    let file = dir.join("tone.wav");
    audio::write_wav_s16(&file, 48000, 2, &audio::to_s16(&audio::tone(1000.0, 48000, 1.0, 0.25), 2));
    let mut play = pw.command("pw-play").arg(&file).spawn().expect("pw-play starts");
    let status = wait_until(Duration::from_secs(20), || play.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = play.kill();
        panic!("pw-play did not finish 1 s of audio in 20 s without a port:\n{}", guest.log_text());
    };
    assert!(status.success(), "pw-play failed without a port: {status}");

    let log = guest.log_text();
    let said = lines_with(&log, &format!("no virtio port /dev/virtio-ports/{name}"));
    assert_eq!(said.len(), 1, "said once, not at every retry:\n{log}");
    let line = &said[0];
    for fix in ["-device virtio-serial-pci", &format!("virtserialport,chardev=...,name={name}"), "libvirt"] {
        assert!(line.contains(fix), "{fix:?} missing from: {line}");
    }
    println!("guest: {line}");
}

#[test]
fn a_guest_without_pipewire_says_so_in_one_line() {
    let dir = scratch("setup-guest-no-pipewire");
    let out = guest_service_without_pipewire(&dir);
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the service must fail (and systemd restart it):\n{log}");
    let said = lines_with(&log, "cannot connect to PipeWire (is it running for this user?)");
    assert_eq!(said.len(), 1, "{log}");
    println!("guest: {}", said[0]);
}

#[test]
fn melange_host_says_what_is_wrong_with_its_socket_and_carries_on() {
    let dir = scratch("setup-host-socket");
    let sock = dir.join("vm1.sock");
    let connect = format!("unix:{}", sock.display());
    let mut cmd = Command::new(bin("melange-host"));
    cmd.args(["--connect", &connect, "--output", "null", "--mic", "none"]).env("RUST_LOG", "info");
    if running_as_root() {
        cmd.arg("--allow-root");
    }
    let mut host = Proc::spawn(cmd, dir.join("host.log")).stop_with_sigint();

    // No socket yet: the VM is not running.
    let missing = format!("{} does not exist yet: start the VM", sock.display());
    host.wait_for_log(&missing, Duration::from_secs(10));
    // A socket file nobody listens on: a VM that died and left it behind.
    drop(UnixListener::bind(&sock).unwrap());
    let refused =
        format!("nobody listens on {}: what made it (the VM or melange-host --listen) is gone", sock.display());
    host.wait_for_log(&refused, Duration::from_secs(10));
    // The VM comes: melange-host connects without being restarted.
    std::fs::remove_file(&sock).unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    host.wait_for_log("connected on", Duration::from_secs(10));
    let (_conn, _) = listener.accept().unwrap();

    let log = host.log_text();
    for what in [&missing, &refused] {
        assert_eq!(lines_with(&log, what).len(), 1, "said once, not at every retry:\n{log}");
    }
    println!("host: {}\nhost: {}", lines_with(&log, &missing)[0], lines_with(&log, &refused)[0]);
}

#[test]
fn melange_host_without_pipewire_says_so_in_one_line_and_exits() {
    let dir = scratch("setup-host-no-pipewire");
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut cmd = Command::new(bin("melange-host"));
    cmd.args(["--connect", &format!("unix:{}", dir.join("vm1.sock").display())])
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("PIPEWIRE_REMOTE")
        .env_remove("PIPEWIRE_RUNTIME_DIR");
    if running_as_root() {
        cmd.arg("--allow-root");
    }
    let out = cmd.output().expect("melange-host runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    let said = lines_with(&log, "cannot connect to the host's PipeWire");
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("--output wav:DIR or --output null"), "no fix in: {}", said[0]);
    assert_eq!(log.trim().lines().count(), 1, "one line, not more: {log}");
    println!("host: {}", said[0]);
}

#[test]
fn melange_host_asked_for_a_window_without_a_display_says_so_in_one_line_and_exits() {
    let dir = scratch("setup-host-no-display");
    let mut cmd = Command::new(bin("melange-host"));
    cmd.args(["--connect", &format!("unix:{}", dir.join("vm1.sock").display())])
        .args(["--output", "null", "--video-output", "window"])
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY");
    if running_as_root() {
        cmd.arg("--allow-root");
    }
    let out = cmd.output().expect("melange-host runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    let said = lines_with(&log, "--video-output window needs a display");
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("use --video-output null or frames:DIR"), "no fix in: {}", said[0]);
    assert_eq!(log.trim().lines().count(), 1, "one line, not more: {log}");
    println!("host: {}", said[0]);
}
