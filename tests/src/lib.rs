//! Test harness on real parts: headless PipeWire sessions (pipewire, WirePlumber,
//! pipewire-pulse), the guest module in its own `pipewire` process, `melange-host`,
//! and the stock PipeWire/PulseAudio/ALSA clients. Plus the signal analysis the tests
//! assert with: WAV I/O, level, frequency, alignment, correlation.
//!
//! Binaries come from the cargo target directory the tests run from (build with
//! `cargo build --release --workspace` first; `scripts/test` does).

pub mod audio;
mod scripted;
pub mod video;

pub use scripted::{ScriptedGuest, ScriptedHost};

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `target/<profile>` of the running binary (tests live in `target/<profile>/deps`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// Path of a binary built by this workspace.
pub fn bin(name: &str) -> PathBuf {
    profile_dir().join(name)
}

/// A fresh scratch directory for one test or demo run.
pub fn scratch(name: &str) -> PathBuf {
    let base =
        std::env::var_os("MELANGE_TEST_DIR").map_or_else(|| std::env::temp_dir().join("melange-tests"), PathBuf::from);
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Takes this test binary's turn: tests that run real-time audio on real daemons share
/// the machine's two cores, and their timing assertions hold only when they do not
/// compete, so within a binary they run one at a time, each holding the guard for its
/// whole run. (The binaries themselves run one after the other under `cargo test`.) A
/// test that failed while holding it does not stop the others.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is stopped with a signal (default SIGTERM) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    stop_signal: i32,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr into `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc { child: Some(child), log, stop_signal: libc::SIGTERM }
    }

    /// Its exit status, if it has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Uses SIGINT instead of SIGTERM to stop it.
    pub fn stop_with_sigint(mut self) -> Self {
        self.stop_signal = libc::SIGINT;
        self
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`; panics with the log if it does not.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let found = wait_until(timeout, || {
            if self.log_text().contains(needle) {
                return Some(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("process exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            None
        });
        if found.is_none() {
            panic!("no {needle:?} within {timeout:?} in {}:\n{}", self.log.display(), self.log_text());
        }
    }

    /// Sends its stop signal and waits for it (kills it after 10 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, self.stop_signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Which daemons a headless session runs.
#[derive(Debug, Clone, Copy)]
pub struct SessionKind {
    /// Run WirePlumber.
    pub wireplumber: bool,
    /// Run pipewire-pulse.
    pub pulse: bool,
}

/// A running headless PipeWire session (see `scripts/headless-pipewire`).
#[derive(Debug)]
pub struct PipeWire {
    /// Its directory; clients use `run/` as XDG_RUNTIME_DIR.
    pub dir: PathBuf,
    proc: Proc,
}

impl PipeWire {
    /// Starts pipewire, WirePlumber and pipewire-pulse in `dir` and waits until ready.
    pub fn start(dir: &Path) -> PipeWire {
        Self::start_with(dir, SessionKind { wireplumber: true, pulse: true })
    }

    /// Starts the daemons `kind` asks for.
    pub fn start_with(dir: &Path, kind: SessionKind) -> PipeWire {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut cmd = Command::new(root().join("scripts/headless-pipewire"));
        cmd.arg(dir);
        if !kind.wireplumber {
            cmd.arg("--no-wireplumber");
        }
        if !kind.pulse {
            cmd.arg("--no-pulse");
        }
        // Its own log inside its directory: a test's `guest.log` is the module's.
        let mut proc = Proc::spawn(cmd, dir.join("headless-pipewire.log"));
        proc.wait_for_log("ready", Duration::from_secs(30));
        PipeWire { dir: dir.to_path_buf(), proc }
    }

    /// A command that runs as a client of this session.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("XDG_RUNTIME_DIR", self.dir.join("run"))
            .env("XDG_CONFIG_HOME", self.dir.join("config"))
            .env("XDG_STATE_HOME", self.dir.join("state"))
            .env("HOME", self.dir.join("home"))
            .env_remove("PIPEWIRE_REMOTE")
            .env_remove("PULSE_SERVER")
            .env_remove("DBUS_SESSION_BUS_ADDRESS");
        cmd
    }

    /// Runs a client to completion and returns its stdout; panics on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// All objects, as `pw-dump` prints them.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        let out = self.command("pw-dump").output().map(|o| o.stdout).unwrap_or_default();
        serde_json::from_slice::<Vec<serde_json::Value>>(&out).unwrap_or_default()
    }

    /// Props of the first node whose `node.name` is `name`.
    pub fn node_props(&self, name: &str) -> Option<serde_json::Value> {
        self.dump().into_iter().find_map(|o| {
            let props = o.pointer("/info/props")?;
            (o["type"] == "PipeWire:Interface:Node" && props["node.name"] == name).then(|| props.clone())
        })
    }

    /// Nodes whose props satisfy `pred`.
    pub fn nodes_where(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        self.dump()
            .into_iter()
            .filter_map(|o| {
                let props = o.pointer("/info/props")?.clone();
                (o["type"] == "PipeWire:Interface:Node" && pred(&props)).then_some(props)
            })
            .collect()
    }

    /// Creates a lingering null sink, the stand-in for the host's speakers.
    pub fn add_null_sink(&self, name: &str) {
        let props = format!(
            "{{ factory.name=support.null-audio-sink node.name={name} node.description={name} media.class=Audio/Sink \
             object.linger=true audio.position=[FL FR] priority.session=1000 }}"
        );
        self.run("pw-cli", &["create-node", "adapter", &props]);
        wait_until(Duration::from_secs(10), || self.node_props(name))
            .unwrap_or_else(|| panic!("sink {name} did not appear"));
    }

    /// Stops the daemons.
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

/// Codec for the guest module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCodec {
    /// s16le PCM.
    Pcm,
    /// Opus at the given bitrate.
    Opus(u32),
}

/// The guest module, run by `scripts/melange-guest` against `pw`.
pub fn start_guest(pw: &PipeWire, port: &str, codec: GuestCodec, log: PathBuf) -> Proc {
    start_guest_with(pw, port, codec, &[], log)
}

/// [`start_guest`] with more `scripts/melange-guest` options (e.g. `--mode low-latency`).
pub fn start_guest_with(pw: &PipeWire, port: &str, codec: GuestCodec, extra: &[&str], log: PathBuf) -> Proc {
    let profile = profile_dir();
    let mut cmd = pw.command(root().join("scripts/melange-guest"));
    cmd.arg("--port").arg(port).args(extra);
    match codec {
        GuestCodec::Pcm => cmd.args(["--codec", "pcm"]),
        GuestCodec::Opus(bitrate) => cmd.args(["--codec", "opus", "--bitrate", &bitrate.to_string()]),
    };
    cmd.env("MELANGE_PROFILE", profile.file_name().unwrap_or_default());
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    cmd.env("RUST_LOG", "info");
    let mut proc = Proc::spawn(cmd, log);
    proc.wait_for_log("redirect sink", Duration::from_secs(20));
    // The sink must be the default before apps start, or they play elsewhere.
    let ok = wait_until(Duration::from_secs(10), || {
        let out = pw.command("pw-metadata").args(["-n", "default", "0", "default.audio.sink"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).contains("\"melange\"").then_some(())
    });
    assert!(ok.is_some(), "the Melange sink did not become the default sink");
    proc
}

/// `melange-host` with the given arguments (plus `--report report.jsonl` in `dir`).
pub fn start_host(args: &[&str], env_from: Option<&PipeWire>, dir: &Path) -> Proc {
    start_host_with_env(args, env_from, dir, &[])
}

/// As [`start_host`], with variables set in its environment.
pub fn start_host_with_env(args: &[&str], env_from: Option<&PipeWire>, dir: &Path, env: &[(&str, &str)]) -> Proc {
    let mut cmd = match env_from {
        Some(pw) => pw.command(bin("melange-host")),
        None => Command::new(bin("melange-host")),
    };
    cmd.envs(env.iter().copied());
    cmd.args(args)
        .arg("--report")
        .arg(dir.join("report.jsonl"))
        .env("RUST_LOG", std::env::var("MELANGE_HOST_LOG").unwrap_or_else(|_| "info".into()));
    if running_as_root() {
        cmd.arg("--allow-root");
    }
    Proc::spawn(cmd, dir.join("host.log")).stop_with_sigint()
}

/// A guest session redirected over a unix socket in `dir` to `melange-host`, which plays
/// into a second, host session whose null sink `speakers` stands in for the speakers.
#[derive(Debug)]
pub struct Redirected {
    /// The host's session.
    pub host_pw: PipeWire,
    /// The guest's session.
    pub guest_pw: PipeWire,
    /// `melange-host --output pipewire`.
    pub host: Proc,
    /// The guest module.
    pub guest: Proc,
}

impl Redirected {
    /// Starts both sessions, melange-host and the guest module, and waits until the
    /// guest is connected.
    pub fn start(dir: &Path, codec: GuestCodec) -> Redirected {
        Self::start_with(dir, codec, false, &[], &[]).0
    }

    /// As [`Redirected::start`], with more `melange-host` arguments (`--stats`, say).
    pub fn start_with_host_args(dir: &Path, codec: GuestCodec, host_args: &[&str]) -> Redirected {
        Self::start_with(dir, codec, false, host_args, &[]).0
    }

    /// As [`Redirected::start_with_host_args`], with variables set in melange-host's
    /// environment (`DISPLAY`, say).
    pub fn start_with_host_env(dir: &Path, codec: GuestCodec, host_args: &[&str], env: &[(&str, &str)]) -> Redirected {
        Self::start_with(dir, codec, false, host_args, env).0
    }

    /// As [`Redirected::start`], with the port running through a [`Relay`].
    pub fn start_relayed(dir: &Path, codec: GuestCodec) -> (Redirected, Relay) {
        let (rig, relay) = Self::start_with(dir, codec, true, &[], &[]);
        (rig, relay.unwrap_or_else(|| unreachable!("asked for a relay")))
    }

    fn start_with(
        dir: &Path,
        codec: GuestCodec,
        relayed: bool,
        host_args: &[&str],
        env: &[(&str, &str)],
    ) -> (Redirected, Option<Relay>) {
        let host_pw = PipeWire::start(&dir.join("host"));
        host_pw.add_null_sink("speakers");
        let port = dir.join("port.sock");
        let host_port = if relayed { dir.join("host.sock") } else { port.clone() };
        let listen = format!("unix:{}", host_port.display());
        // `--output pipewire` unless the caller gives another.
        let output: &[&str] = if host_args.contains(&"--output") { &[] } else { &["--output", "pipewire"] };
        let args: Vec<&str> = ["--listen", listen.as_str()]
            .into_iter()
            .chain(output.iter().copied())
            .chain(host_args.iter().copied())
            .collect();
        let mut host = start_host_with_env(&args, Some(&host_pw), dir, env);
        host.wait_for_log("waiting for a guest", Duration::from_secs(10));
        let relay = relayed.then(|| Relay::start(&port, host_port));
        let guest_pw = PipeWire::start(&dir.join("guest"));
        let mut guest = start_guest(&guest_pw, &format!("unix:{}", port.display()), codec, dir.join("guest.log"));
        guest.wait_for_log("connected to melange-host", Duration::from_secs(10));
        (Redirected { host_pw, guest_pw, host, guest }, relay)
    }
}

/// Copies bytes between the guest's socket and the host's, and on demand cuts every
/// connection (the port disconnected, as when the host side of a VM's chardev goes),
/// holds the bytes back for a while (a stalled port) or passes the guest's at a set
/// rate (a host that reads slowly).
#[derive(Debug)]
pub struct Relay {
    live: Arc<Mutex<Vec<UnixStream>>>,
    /// Held while the port stalls; each copy takes it before it writes.
    gate: Arc<Mutex<()>>,
    /// Bytes a second passed from the guest to the host; 0: as fast as they come.
    guest_rate: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    /// Listens on `listen` and connects each guest that comes to `target`.
    pub fn start(listen: &Path, target: PathBuf) -> Relay {
        let listener = UnixListener::bind(listen).unwrap_or_else(|e| panic!("relay binds {}: {e}", listen.display()));
        let live: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let gate: Arc<Mutex<()>> = Arc::default();
        let guest_rate: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (registry, gates, rate) = (live.clone(), gate.clone(), guest_rate.clone());
        std::thread::spawn(move || {
            for guest in listener.incoming().map_while(Result::ok) {
                let Ok(host) = UnixStream::connect(&target) else { continue };
                let (Ok(g2), Ok(h2)) = (guest.try_clone(), host.try_clone()) else { continue };
                registry.lock().unwrap_or_else(|e| e.into_inner()).extend([g2, h2]);
                let directions =
                    [(guest.try_clone(), host.try_clone(), true), (host.try_clone(), guest.try_clone(), false)];
                for (from, to, from_guest) in directions.into_iter().filter_map(|(a, b, g)| Some((a.ok()?, b.ok()?, g)))
                {
                    let gate = gates.clone();
                    let rate = from_guest.then(|| rate.clone());
                    std::thread::spawn(move || copy_through(from, to, &gate, rate.as_deref()));
                }
            }
        });
        Relay { live, gate, guest_rate }
    }

    /// Passes the guest's bytes at `bytes_per_s` from now on (`None`: unlimited).
    pub fn throttle(&self, bytes_per_s: Option<u64>) {
        self.guest_rate.store(bytes_per_s.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Cuts every connection.
    pub fn cut(&self) {
        for s in self.live.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Holds every byte back for `how_long`, then lets the backlog through.
    pub fn stall(&self, how_long: Duration) {
        let _held = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::sleep(how_long);
    }
}

fn copy_through(
    mut from: UnixStream,
    mut to: UnixStream,
    gate: &Mutex<()>,
    rate: Option<&std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // At a set rate: a twentieth of a second's worth at a time, then the rest of
        // that twentieth.
        let limit = rate.map_or(0, |r| r.load(std::sync::atomic::Ordering::Relaxed));
        let want = if limit > 0 { ((limit / 20) as usize).clamp(1, buf.len()) } else { buf.len() };
        let started = Instant::now();
        let Ok(n @ 1..) = from.read(&mut buf[..want]) else { break };
        drop(gate.lock().unwrap_or_else(|e| e.into_inner()));
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if limit > 0 {
            let due = Duration::from_secs_f64(n as f64 / limit as f64);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Sends `signal` to `pid` (a child of the test, or one of its children).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory preconditions; the pid is the test's own process.
    unsafe { libc::kill(pid as i32, signal) };
}

/// The `--stats` lines of stream `stream` in a log, in order, as key-value maps.
pub fn stats_lines(log: &Path, stream: u32) -> Vec<std::collections::BTreeMap<String, String>> {
    let tag = format!(" stream={stream} ");
    lines(log)
        .iter()
        .filter(|l| l.starts_with("stats ") && l.contains(&tag))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}

/// True when this process runs as root (CI does); melange-host then needs `--allow-root`.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The child of `launcher` called `comm` (or `launcher` itself if it is called so):
/// the `pipewire` process behind `scripts/melange-guest`, say.
pub fn child_named(launcher: u32, comm: &str) -> u32 {
    let is = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm);
    if is(launcher) {
        return launcher;
    }
    std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid| is(*pid))
        .unwrap_or(launcher)
}

/// Open file descriptors and threads of a process.
pub fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |dir: String| std::fs::read_dir(dir).map_or(0, |d| d.count());
    (count(format!("/proc/{pid}/fd")), count(format!("/proc/{pid}/task")))
}

/// CPU seconds (user + system) a process and all its threads have used.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) in a `/proc/.../stat` file, 0 if it is gone.
pub fn cpu_seconds_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // After the command name: utime and stime are the 12th and 13th fields.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (tick(11) + tick(12)) / hz
}

/// A `/proc/PID/status` value in KiB (`VmHWM:` is the peak RSS), 0 if absent.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// The per-stream reports `melange-host --report` wrote.
pub fn reports(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("report.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Lines of a file, for waiting on logs written by others.
pub fn lines(path: &Path) -> Vec<String> {
    File::open(path).map(|f| BufReader::new(f).lines().map_while(Result::ok).collect()).unwrap_or_default()
}

/// WAV files in a directory, sorted by name.
pub fn wav_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "wav")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
