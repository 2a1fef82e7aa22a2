//! The thread that drives the [`BrokerCore`]: it owns the broker's socket and its
//! stubs' connections, and passes commands to the guest core and its notes back.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Receiver;
use melange_transport::port::{bind_private_listener, poll_fds, Waker};

use crate::broker::BrokerCore;
use crate::core::{BrokerNote, Command};
use crate::thread::GuestHandle;

/// Bytes read from one stub per wake-up, so that one cannot starve the others.
const READ_SHARE: usize = 64 * 1024;

/// The running broker; dropping it stops the thread and removes its socket.
#[derive(Debug)]
pub struct BrokerThread {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl BrokerThread {
    /// Listens on `path` (mode 0600, its directory 0700) and serves stubs; `notes`
    /// (woken through `waker`) is what the guest core says for the broker.
    pub fn spawn(
        path: &Path,
        guest: GuestHandle,
        notes: Receiver<BrokerNote>,
        waker: Arc<Waker>,
    ) -> io::Result<BrokerThread> {
        let listener = bind_private_listener(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ids = guest.clone();
        let mut driver = Driver {
            listener,
            clients: BTreeMap::new(),
            next_client: 1,
            core: BrokerCore::new(move || ids.next_stream_id()),
            guest,
            notes,
            waker: waker.clone(),
            stop: stop.clone(),
        };
        log::info!("melange broker: players reach the host through {}", path.display());
        let thread = std::thread::Builder::new().name("melange-broker".into()).spawn(move || driver.run())?;
        Ok(BrokerThread { stop, waker, path: path.into(), thread: Some(thread) })
    }
}

impl Drop for BrokerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Driver {
    listener: UnixListener,
    clients: BTreeMap<u64, UnixStream>,
    next_client: u64,
    core: BrokerCore,
    guest: GuestHandle,
    notes: Receiver<BrokerNote>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl Driver {
    fn run(&mut self) {
        let mut buf = vec![0u8; READ_SHARE];
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut fds = vec![(self.listener.as_raw_fd(), libc::POLLIN), (self.waker.as_raw_fd(), libc::POLLIN)];
            let ids: Vec<u64> = self.clients.keys().copied().collect();
            for id in &ids {
                let want = if self.core.transmit(*id).is_empty() { libc::POLLIN } else { libc::POLLIN | libc::POLLOUT };
                fds.push((self.clients[id].as_raw_fd(), want));
            }
            let revents = match poll_fds(&mut fds, Some(self.core.poll_timeout(now))) {
                Ok(r) => r,
                Err(e) => {
                    log::error!("melange broker: poll failed: {e}; the broker stops");
                    return;
                }
            };
            let now = Instant::now();
            if revents[1] != 0 {
                self.waker.drain();
            }
            while let Ok(note) = self.notes.try_recv() {
                self.core.note(now, note);
            }
            if revents[0] != 0 {
                self.accept(now);
            }
            for (i, id) in ids.iter().enumerate() {
                if revents[2 + i] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read(now, *id, &mut buf);
                }
            }
            self.core.timeout(now);
            self.forward();
            self.write();
        }
    }

    fn accept(&mut self, now: Instant) {
        while let Ok((sock, _)) = self.listener.accept() {
            if !self.core.has_room() || sock.set_nonblocking(true).is_err() {
                log::warn!("melange broker: a player was turned away: {} are connected", self.core.clients());
                continue;
            }
            let id = self.next_client;
            self.next_client += 1;
            self.clients.insert(id, sock);
            self.core.accept(now, id);
        }
    }

    fn read(&mut self, now: Instant, id: u64, buf: &mut [u8]) {
        let Some(sock) = self.clients.get_mut(&id) else { return };
        match sock.read(buf) {
            Ok(0) => self.hang_up(id),
            Ok(n) => self.core.input(now, id, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.hang_up(id),
        }
    }

    fn hang_up(&mut self, id: u64) {
        self.clients.remove(&id);
        self.core.hung_up(id);
    }

    /// Hands the guest core what the stubs sent; an access unit the core's queue has
    /// no room for is dropped (the stream's next keyframe is asked for by the host).
    fn forward(&mut self) {
        while let Some(command) = self.core.poll_command() {
            match command {
                Command::AccessUnit(..) => {
                    self.guest.try_send(command);
                }
                other => self.guest.send(other),
            }
        }
    }

    fn write(&mut self) {
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            while !self.core.transmit(id).is_empty() {
                let Some(sock) = self.clients.get_mut(&id) else { break };
                match sock.write(self.core.transmit(id)) {
                    Ok(0) => break,
                    Ok(n) => self.core.consume(id, n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.hang_up(id);
                        break;
                    }
                }
            }
        }
        while let Some(id) = self.core.poll_gone() {
            self.clients.remove(&id);
        }
    }
}
