//! Byte-stream ports: the I/O edge under a [`Session`](crate::Session).
//!
//! A [`Port`] owns one port and its connectivity. It reconnects by itself where the port
//! kind allows and reports each change as a [`PortEvent`]: every `Connected` means "start
//! a new session", every `Disconnected` means "the session is over".
//!
//! | spec | behaviour |
//! |---|---|
//! | `virtio:NAME` | `/dev/virtio-ports/NAME`, opened once, non-blocking; `POLLHUP` means "host absent", `POLLOUT` without it means "host present" |
//! | `unix:PATH` | connects, retrying with backoff (100 ms doubling to 250 ms) |
//! | listening `unix:PATH` | binds (mode 0600, 0660 under a umask with group write), accepts; a new connection replaces the current one |
//! | `stdio` | stdin/stdout; end of input ends the link for good |
//! | [`Port::pair`] | two connected ends in memory, for tests |

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Where virtio-serial ports appear in a guest (udev makes these links by port name).
pub const VIRTIO_PORTS_DIR: &str = "/dev/virtio-ports";
/// How often to look again at a virtio port that reports "host absent": poll() cannot
/// wait for the host to appear (POLLHUP is level-triggered), so we sleep between looks.
const VIRTIO_RECHECK: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A peer that comes back is found within this: audio must resume within half a second
/// of the host being back. A failed connect() to a unix socket costs microseconds, so
/// four a second cost nothing while the peer stays away.
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// A port as written on a command line or in a config: `virtio:NAME`, `unix:PATH`, `stdio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// A virtio-serial port by name (guest side).
    Virtio(String),
    /// A unix socket path (connect, or listen with [`Port::listen`]).
    Unix(PathBuf),
    /// Standard input and output.
    Stdio,
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "stdio" {
            return Ok(PortSpec::Stdio);
        }
        match s.split_once(':') {
            Some(("virtio", name)) if !name.is_empty() && !name.contains('/') => Ok(PortSpec::Virtio(name.into())),
            Some(("unix", path)) if !path.is_empty() => Ok(PortSpec::Unix(path.into())),
            _ => Err(format!(
                "invalid port {s:?}: expected virtio:NAME (e.g. virtio:org.melange.media.0), unix:PATH or stdio"
            )),
        }
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortSpec::Virtio(n) => write!(f, "virtio:{n}"),
            PortSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            PortSpec::Stdio => f.write_str("stdio"),
        }
    }
}

/// What happened on a link during [`Port::wait`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortEvent {
    /// A peer is there: start a new session.
    Connected,
    /// The peer went away; the link will reconnect by itself if its kind can.
    Disconnected(String),
    /// Bytes can be read.
    Readable,
    /// Bytes can be written.
    Writable,
    /// The [`Waker`] was signalled.
    Woken,
    /// The timeout passed with nothing else to report.
    Timeout,
}

/// Wakes a thread blocked in [`Port::wait`] from another thread (an eventfd).
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A new waker.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Makes the waiting thread return [`PortEvent::Woken`]. Not for real-time threads.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. A full counter
        // (EAGAIN) still leaves the fd readable, which is all we need.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// The eventfd, for a signal handler to write to (`write` is async-signal-safe).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Another handle on the same wake-up (for threads that wake this one).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { fd: self.fd.try_clone()? })
    }

    /// Clears a wake-up, for a thread that polls the eventfd itself.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

enum Kind {
    Virtio { name: String, path: PathBuf, file: Option<File>, next_open: Instant },
    Connect { path: PathBuf, next_attempt: Instant, backoff: Duration, last_error: Option<String> },
    Listen { path: PathBuf, listener: UnixListener },
    Stdio { finished: bool },
    Pair,
}

/// One port plus its connectivity. See the module docs.
pub struct Port {
    kind: Kind,
    /// The live connection for socket and stdio kinds.
    stream: Option<Conn>,
    /// Virtio: whether the host was present at the last look.
    present: bool,
    /// A change to report on the next wait, before anything else.
    pending: Option<PortEvent>,
}

enum Conn {
    Unix(UnixStream),
    Stdio,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").field("spec", &self.describe()).field("connected", &self.is_connected()).finish()
    }
}

impl Port {
    /// Opens a port for the connecting side (`virtio:`, `unix:` connect, `stdio`).
    /// Never fails for a peer that is merely absent: the link waits and retries.
    pub fn open(spec: &PortSpec) -> io::Result<Port> {
        let now = Instant::now();
        let kind = match spec {
            PortSpec::Virtio(name) => Kind::Virtio {
                name: name.clone(),
                path: Path::new(VIRTIO_PORTS_DIR).join(name),
                file: None,
                next_open: now,
            },
            PortSpec::Unix(path) => {
                Kind::Connect { path: path.clone(), next_attempt: now, backoff: BACKOFF_MIN, last_error: None }
            }
            PortSpec::Stdio => {
                set_nonblocking(0)?;
                set_nonblocking(1)?;
                return Ok(Port {
                    kind: Kind::Stdio { finished: false },
                    stream: Some(Conn::Stdio),
                    present: true,
                    pending: Some(PortEvent::Connected),
                });
            }
        };
        Ok(Port { kind, stream: None, present: false, pending: None })
    }

    /// Binds a listening unix socket at `path` ([`bind_listener`]) and accepts
    /// connections on it, one at a time: a new connection replaces the current one.
    pub fn listen(path: &Path) -> io::Result<Port> {
        let listener = bind_listener(path)?;
        Ok(Port { kind: Kind::Listen { path: path.into(), listener }, stream: None, present: false, pending: None })
    }

    /// Two connected ends, for tests. Disconnecting either end is final.
    pub fn pair() -> io::Result<(Port, Port)> {
        let (a, b) = UnixStream::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        let end = |s| Port {
            kind: Kind::Pair,
            stream: Some(Conn::Unix(s)),
            present: true,
            pending: Some(PortEvent::Connected),
        };
        Ok((end(a), end(b)))
    }

    /// The port, for logs.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Virtio { path, .. } => path.display().to_string(),
            Kind::Connect { path, .. } => format!("unix:{}", path.display()),
            Kind::Listen { path, .. } => format!("listening unix:{}", path.display()),
            Kind::Stdio { .. } => "stdio".into(),
            Kind::Pair => "memory pair".into(),
        }
    }

    /// True while a peer is there to talk to.
    pub fn is_connected(&self) -> bool {
        match self.kind {
            Kind::Virtio { .. } => self.present,
            _ => self.stream.is_some(),
        }
    }

    /// True when the link can never connect again (stdio at end of input, a closed pair).
    pub fn is_finished(&self) -> bool {
        match self.kind {
            Kind::Stdio { finished } => finished,
            Kind::Pair => self.stream.is_none(),
            _ => false,
        }
    }

    /// The last reason a connect attempt failed, if it is still failing.
    pub fn last_error(&self) -> Option<&str> {
        match &self.kind {
            Kind::Connect { last_error, .. } => last_error.as_deref(),
            _ => None,
        }
    }

    /// Blocks until something happens or `timeout` passes. `want_write` asks to be told
    /// when bytes can be written. Connection changes come first and are reported once.
    pub fn wait(
        &mut self,
        want_write: bool,
        timeout: Option<Duration>,
        waker: Option<&Waker>,
    ) -> io::Result<PortEvent> {
        if let Some(ev) = self.pending.take() {
            return Ok(ev);
        }
        let now = Instant::now();
        let deadline = timeout.map(|t| now + t);
        // Connect-side housekeeping; it may shorten the wait.
        let mut wait_until = deadline;
        match &mut self.kind {
            Kind::Connect { path, next_attempt, backoff, last_error } if self.stream.is_none() => {
                if now >= *next_attempt {
                    match UnixStream::connect(&*path).and_then(prepare_stream) {
                        Ok(s) => {
                            self.stream = Some(Conn::Unix(s));
                            *backoff = BACKOFF_MIN;
                            *last_error = None;
                            return Ok(PortEvent::Connected);
                        }
                        Err(e) => {
                            *last_error = Some(describe_connect_error(path, &e));
                            *next_attempt = now + *backoff;
                            *backoff = (*backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                wait_until = Some(wait_until.map_or(*next_attempt, |d| d.min(*next_attempt)));
            }
            Kind::Virtio { path, file, next_open, name } => {
                if file.is_none() && now >= *next_open {
                    match OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&*path) {
                        Ok(f) => *file = Some(f),
                        Err(e) => {
                            *next_open = now + BACKOFF_MAX;
                            // Reported on every failed attempt; callers log each text once.
                            return Ok(PortEvent::Disconnected(describe_virtio_error(name, path, &e)));
                        }
                    }
                }
                if let Some(f) = file {
                    let revents = poll_fds(&mut [(f.as_raw_fd(), libc::POLLOUT)], Some(Duration::ZERO))?[0];
                    let present = revents & libc::POLLHUP == 0 && revents & libc::POLLOUT != 0;
                    if present != self.present {
                        self.present = present;
                        return Ok(if present {
                            PortEvent::Connected
                        } else {
                            PortEvent::Disconnected("host side of the virtio port closed".into())
                        });
                    }
                }
                if !self.present {
                    let recheck = now + VIRTIO_RECHECK;
                    wait_until = Some(wait_until.map_or(recheck, |d| d.min(recheck)));
                }
            }
            _ => {}
        }

        let mut fds: Vec<(RawFd, libc::c_short)> = Vec::with_capacity(3);
        let io_events = libc::POLLIN | if want_write { libc::POLLOUT } else { 0 };
        match (&self.kind, &self.stream) {
            (Kind::Virtio { file: Some(f), .. }, _) if self.present => fds.push((f.as_raw_fd(), io_events)),
            (Kind::Stdio { .. }, Some(_)) => {
                fds.push((0, libc::POLLIN));
                if want_write {
                    fds.push((1, libc::POLLOUT));
                }
            }
            (_, Some(Conn::Unix(s))) => fds.push((s.as_raw_fd(), io_events)),
            _ => {}
        }
        if let Kind::Listen { listener, .. } = &self.kind {
            fds.push((listener.as_raw_fd(), libc::POLLIN));
        }
        let waker_index = waker.map(|w| {
            fds.push((w.fd.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let timeout = wait_until.map(|d| d.saturating_duration_since(Instant::now()));
        let revents = poll_fds(&mut fds, timeout)?;

        if let (Some(i), Some(w)) = (waker_index, waker) {
            if revents[i] != 0 {
                w.drain();
                return Ok(PortEvent::Woken);
            }
        }
        if let Kind::Listen { listener, .. } = &self.kind {
            let li = fds.iter().position(|(fd, _)| *fd == listener.as_raw_fd());
            if li.is_some_and(|i| revents[i] != 0) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let s = prepare_stream(s)?;
                        let replaced = self.stream.replace(Conn::Unix(s)).is_some();
                        if replaced {
                            self.pending = Some(PortEvent::Connected);
                            return Ok(PortEvent::Disconnected("replaced by a new connection".into()));
                        }
                        return Ok(PortEvent::Connected);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut readable = false;
        let mut writable = false;
        let mut hangup = false;
        for (i, (fd, _)) in fds.iter().enumerate() {
            if Some(i) == waker_index
                || matches!(&self.kind, Kind::Listen { listener, .. } if listener.as_raw_fd() == *fd)
            {
                continue;
            }
            let r = revents[i];
            readable |= r & libc::POLLIN != 0;
            writable |= r & libc::POLLOUT != 0;
            hangup |= r & (libc::POLLHUP | libc::POLLERR) != 0;
        }
        if readable || (hangup && !matches!(self.kind, Kind::Virtio { .. })) {
            // A hangup on a socket shows up as a read of 0 bytes; let read() report it.
            return Ok(PortEvent::Readable);
        }
        if hangup {
            self.present = false;
            return Ok(PortEvent::Disconnected("host side of the virtio port closed".into()));
        }
        if writable {
            return Ok(PortEvent::Writable);
        }
        Ok(PortEvent::Timeout)
    }

    /// Reads available bytes. `Ok(None)` means nothing to read now; a lost peer is
    /// `Ok(Some(0))`, after which the link is disconnected (and will reconnect).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let result = match (&mut self.kind, &mut self.stream) {
            (Kind::Virtio { file: Some(f), .. }, _) if self.present => f.read(buf),
            (Kind::Virtio { .. }, _) => return Ok(Some(0)),
            (_, Some(Conn::Unix(s))) => s.read(buf),
            (_, Some(Conn::Stdio)) => io::stdin().lock().read(buf),
            (_, None) => return Ok(Some(0)),
        };
        match result {
            Ok(0) => {
                self.drop_connection();
                Ok(Some(0))
            }
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(_) => {
                self.drop_connection();
                Ok(Some(0))
            }
        }
    }

    /// Writes what the port takes now; `Ok(0)` when it takes nothing. A lost peer is an
    /// error of kind `BrokenPipe`, after which the link is disconnected.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = match (&mut self.kind, &mut self.stream) {
            (Kind::Virtio { file: Some(f), .. }, _) if self.present => f.write(buf),
            (_, Some(Conn::Unix(s))) => s.write(buf),
            (_, Some(Conn::Stdio)) => {
                let mut out = io::stdout().lock();
                out.write(buf).and_then(|n| out.flush().map(|()| n))
            }
            _ => return Err(io::ErrorKind::BrokenPipe.into()),
        };
        match result {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => {
                self.drop_connection();
                Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
            }
        }
    }

    /// Drops the current connection (after a protocol failure, say). Reconnecting kinds
    /// try again after their backoff.
    pub fn disconnect(&mut self) {
        self.drop_connection();
    }

    fn drop_connection(&mut self) {
        match &mut self.kind {
            Kind::Virtio { .. } => {
                // Keep the fd: the port opens exclusively, and reopening loses bytes.
                // Wait for the host to go and come back instead.
                self.present = false;
            }
            Kind::Stdio { finished } => {
                *finished = true;
                self.stream = None;
            }
            Kind::Connect { next_attempt, backoff, .. } => {
                self.stream = None;
                *next_attempt = Instant::now() + *backoff;
            }
            Kind::Listen { .. } | Kind::Pair => self.stream = None,
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Kind::Listen { path, .. } = &self.kind {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn describe_connect_error(path: &Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "{} does not exist yet: start the VM (or melange-host --listen), and check that its socket path is this one",
            path.display()
        ),
        io::ErrorKind::ConnectionRefused => format!(
            "nobody listens on {}: what made it (the VM or melange-host --listen) is gone; start it again",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "no permission to connect to {}: run as the socket's owner, or as a member of its group",
            path.display()
        ),
        _ => format!("cannot connect to {}: {e}", path.display()),
    }
}

fn describe_virtio_error(name: &str, path: &Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "no virtio port {}: add `-device virtio-serial-pci -device virtserialport,chardev=...,name={name}` to QEMU \
             (libvirt: <channel type='unix'><target type='virtio' name='{name}'/></channel>)",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "no permission on {}: install the melange-guest package (its udev rule 70-melange.rules gives the \
             user at the seat the port) or add the user to the port's group",
            path.display()
        ),
        _ if e.raw_os_error() == Some(libc::EBUSY) => {
            format!("{} is busy: another process has it open (only one may)", path.display())
        }
        _ => format!("cannot open {}: {e}", path.display()),
    }
}

/// What the kernel may hold of our output for a slow peer, in bytes (Linux doubles it).
/// Small, so that the session's own queue, which drops the oldest media and never
/// control, is where a backlog waits: at a few kB/s the kernel's default of some 200 kB
/// would hold tens of seconds of audio and hold back heartbeats as long.
const SEND_BUFFER: libc::c_int = 8 * 1024;

/// Makes a fresh unix stream non-blocking with a small send buffer.
fn prepare_stream(s: UnixStream) -> io::Result<UnixStream> {
    s.set_nonblocking(true)?;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&SEND_BUFFER as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a caller-provided fd with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// poll(2) over `(fd, events)`; returns `revents` in the same order.
/// Waits until one of `fds` (descriptor, `POLLIN`/`POLLOUT` bits) is ready or
/// `timeout` passes (`None`: forever); returns each one's `revents`.
pub fn poll_fds(fds: &mut [(RawFd, libc::c_short)], timeout: Option<Duration>) -> io::Result<Vec<libc::c_short>> {
    let mut pfds: Vec<libc::pollfd> = fds.iter().map(|&(fd, events)| libc::pollfd { fd, events, revents: 0 }).collect();
    // ppoll, not poll: callers schedule encoder work to the tenth of a millisecond.
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    loop {
        // SAFETY: pfds is a valid, correctly sized array of pollfd; ts_ptr is null or
        // points to a timespec that outlives the call; no signal mask is passed.
        let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Binds a non-blocking listening unix socket at `path`: mode 0600, or 0660 where the
/// umask leaves group write; its directory made 0700 if missing. A stale socket there is
/// replaced; a live one, or anything that is not a socket, is an error and left alone.
///
/// The socket is bound, put in listening state and given its mode under a staging
/// name, then renamed into place: a peer that sees `path` can connect at once, and
/// never meets a socket that refuses it or has the umask's mode.
pub fn bind_listener(path: &Path) -> io::Result<UnixListener> {
    place_listener(path, None)
}

/// [`bind_listener`] for the user alone: mode 0600 whatever the umask.
pub fn bind_private_listener(path: &Path) -> io::Result<UnixListener> {
    place_listener(path, Some(0o600))
}

fn place_listener(path: &Path, mode: Option<u32>) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another listener", path.display()),
            ));
        }
        _ => {}
    }
    let staging = path.with_file_name(format!(".mh-{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let (listener, at) = match UnixListener::bind(&staging) {
        Ok(l) => (l, staging.as_path()),
        // The staging name outgrows sun_path only where `path` has a shorter name.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            let _ = std::fs::remove_file(path);
            (UnixListener::bind(path)?, path)
        }
        Err(e) => return Err(e),
    };
    let placed = (|| {
        // Connecting takes write permission: the owner's, and the group's where the
        // umask leaves group write (the system unit's UMask=0007 lets QEMU in by its group).
        let group_writable = std::fs::metadata(at)?.permissions().mode() & 0o020 != 0;
        let mode = mode.unwrap_or(if group_writable { 0o660 } else { 0o600 });
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode))?;
        listener.set_nonblocking(true)?;
        if at != path {
            std::fs::rename(at, path)?;
        }
        Ok(())
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(at);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("virtio:org.melange.media.0".parse(), Ok(PortSpec::Virtio("org.melange.media.0".into())));
        assert_eq!("unix:/run/x.sock".parse(), Ok(PortSpec::Unix("/run/x.sock".into())));
        assert_eq!("stdio".parse(), Ok(PortSpec::Stdio));
        for bad in ["", "tcp:1.2.3.4", "virtio:", "virtio:a/b", "unix:"] {
            let e = bad.parse::<PortSpec>().unwrap_err();
            assert!(e.contains("expected virtio:NAME"), "{e}");
        }
    }

    #[test]
    fn pair_moves_bytes_and_reports_hangup() {
        let (mut a, mut b) = Port::pair().unwrap();
        assert_eq!(a.wait(false, Some(Duration::ZERO), None).unwrap(), PortEvent::Connected);
        assert_eq!(b.wait(false, Some(Duration::ZERO), None).unwrap(), PortEvent::Connected);
        assert_eq!(a.write(b"abc").unwrap(), 3);
        assert_eq!(b.wait(false, Some(Duration::from_secs(1)), None).unwrap(), PortEvent::Readable);
        let mut buf = [0u8; 8];
        assert_eq!(b.read(&mut buf).unwrap(), Some(3));
        assert_eq!(b.read(&mut buf).unwrap(), None);
        drop(a);
        assert_eq!(b.wait(false, Some(Duration::from_secs(1)), None).unwrap(), PortEvent::Readable);
        assert_eq!(b.read(&mut buf).unwrap(), Some(0));
        assert!(b.is_finished());
    }

    #[test]
    fn unix_connect_retries_until_a_listener_appears() {
        let dir = std::env::temp_dir().join(format!("melange-port-test-{}", std::process::id()));
        let path = dir.join("s.sock");
        let mut c = Port::open(&PortSpec::Unix(path.clone())).unwrap();
        assert_eq!(c.wait(false, Some(Duration::from_millis(10)), None).unwrap(), PortEvent::Timeout);
        assert!(c.last_error().unwrap().contains("does not exist"));
        let mut l = Port::listen(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert!(mode == 0o600 || mode == 0o660, "others may connect: {mode:o}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.wait(false, Some(Duration::from_millis(50)), None).unwrap() != PortEvent::Connected {
            assert!(Instant::now() < deadline);
        }
        assert_eq!(l.wait(false, Some(Duration::from_secs(1)), None).unwrap(), PortEvent::Connected);
        assert_eq!(c.write(b"x").unwrap(), 1);
        drop(l);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn listen_places_a_ready_socket_and_never_removes_what_is_not_a_stale_socket() {
        let dir = std::env::temp_dir().join(format!("melange-listen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file.sock");
        std::fs::write(&file, b"keep").unwrap();
        let err = Port::listen(&file).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");

        let path = dir.join("s.sock");
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let live = Port::listen(&path).unwrap();
        // Listening and with its final mode as soon as the name exists; no staging name left.
        assert!(UnixStream::connect(&path).is_ok());
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let err = Port::listen(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(live);
        assert!(!path.exists());

        // A one-letter name at the sun_path limit (107 bytes), where the staging name
        // would not fit: bound in place.
        let deep = dir.join("d".repeat(107 - dir.as_os_str().len() - 3));
        std::fs::create_dir_all(&deep).unwrap();
        let short = deep.join("a");
        assert_eq!(short.as_os_str().len(), 107);
        let l = Port::listen(&short).unwrap();
        assert!(UnixStream::connect(&short).is_ok());
        drop(l);
        assert!(!short.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn waker_interrupts_a_wait() {
        let (mut a, _b) = Port::pair().unwrap();
        a.wait(false, None, None).unwrap();
        let w = Waker::new().unwrap();
        w.wake();
        assert_eq!(a.wait(false, Some(Duration::from_secs(5)), Some(&w)).unwrap(), PortEvent::Woken);
    }

    #[test]
    fn each_setup_mistake_is_one_line_with_its_fix() {
        let err = |kind| io::Error::from(kind);
        let path = Path::new("/run/melange/vm1.sock");
        let missing = describe_connect_error(path, &err(io::ErrorKind::NotFound));
        assert!(
            missing.contains("/run/melange/vm1.sock does not exist") && missing.contains("start the VM"),
            "{missing}"
        );
        let refused = describe_connect_error(path, &err(io::ErrorKind::ConnectionRefused));
        assert!(
            refused.contains("nobody listens on /run/melange/vm1.sock") && refused.contains("start it"),
            "{refused}"
        );
        let denied = describe_connect_error(path, &err(io::ErrorKind::PermissionDenied));
        assert!(
            denied.contains("no permission to connect to /run/melange/vm1.sock") && denied.contains("group"),
            "{denied}"
        );
        let port = Path::new("/dev/virtio-ports/org.melange.media.0");
        let no_access = describe_virtio_error("org.melange.media.0", port, &err(io::ErrorKind::PermissionDenied));
        assert!(no_access.contains("70-melange.rules") && no_access.contains("melange-guest"), "{no_access}");
        let busy = describe_virtio_error("org.melange.media.0", port, &io::Error::from_raw_os_error(libc::EBUSY));
        assert!(busy.contains("busy") && busy.contains("only one"), "{busy}");
        for text in [missing, refused, denied, no_access, busy] {
            assert!(!text.contains('\n'), "not one line: {text}");
        }
    }

    #[test]
    fn missing_virtio_port_names_the_fix() {
        let mut l = Port::open(&PortSpec::Virtio("org.melange.test.missing".into())).unwrap();
        let PortEvent::Disconnected(text) = l.wait(false, Some(Duration::ZERO), None).unwrap() else { panic!() };
        assert!(
            text.contains("/dev/virtio-ports/org.melange.test.missing") && text.contains("virtserialport"),
            "{text}"
        );
    }
}
