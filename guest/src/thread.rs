//! The thread that drives the guest's [`GuestCore`]: it owns the port, sleeps until the
//! port, a command or the core's next timeout wakes it, and moves bytes.
//!
//! The module talks to it through a [`GuestHandle`] from any thread: taps are handed
//! over as their [`TapEncoder`], and the core encodes them itself, waking when the guest
//! graph cycle that completes a packet has run ([`TapEncoder::wake_at`]). Taps share
//! the graph's clock, so one wake-up serves all of them, and a packet goes from the tap
//! ring to the port without crossing another thread.

#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use melange_shim::clock;
use melange_shim::tap::TapEncoder;
use melange_transport::message::{StreamOpen, Volume};
use melange_transport::port::{Port, PortEvent, PortSpec, Waker};

use crate::broker_thread::BrokerThread;
use crate::core::{BrokerNote, Command, CoreConfig, CoreEvent, GuestCore, GuestStats};
use crate::mic::MicFeed;

/// Commands that may wait between the module (and the broker) and the thread.
const COMMAND_QUEUE: usize = 512;
/// Notes that may wait for the broker.
const NOTE_QUEUE: usize = 256;
/// How long the thread waits after a port error before it looks again.
const PORT_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// Cheap, cloneable access to the guest thread from the module's threads.
#[derive(Debug, Clone)]
pub struct GuestHandle {
    commands: Sender<Command>,
    shutdown: Arc<AtomicBool>,
    waker: Arc<Waker>,
    next_id: Arc<AtomicU32>,
    stats: Arc<GuestStats>,
    /// What the host last asked the redirect sink's volume to be, until taken.
    host_volume: Arc<Mutex<Option<Volume>>>,
}

impl GuestHandle {
    /// Hands the thread a command. Commands are never dropped: waits for room (the
    /// thread drains constantly).
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
        self.waker.wake();
    }

    /// Hands the thread a command if its queue has room; false if it was dropped.
    pub fn try_send(&self, command: Command) -> bool {
        let sent = self.commands.try_send(command).is_ok();
        if sent {
            self.waker.wake();
        } else {
            self.stats.units_dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// A stream id no other stream of this guest has.
    pub fn next_stream_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed).max(1)
    }

    /// Registers a stream whose media the thread encodes from `encoder`'s tap; returns
    /// its id. The stream closes by itself once the tap's writer is gone and everything
    /// it captured is sent (the last partial packet padded with silence); call
    /// [`GuestHandle::wake`] after dropping the writer so that is prompt.
    pub fn open_tap(&self, open: StreamOpen, encoder: TapEncoder) -> u32 {
        let id = self.next_stream_id();
        self.send(Command::Tap(id, open, Box::new(encoder)));
        id
    }

    /// Ends a stream.
    pub fn close_stream(&self, stream: u32, reason: &str) {
        self.send(Command::Close(stream, reason.into()));
    }

    /// Tells the host whether a guest app records from the virtual microphone now.
    pub fn want_mic(&self, wanted: bool) {
        self.send(Command::MicWanted(wanted));
    }

    /// Tells the host whether an app captures from the virtual camera.
    pub fn want_camera(&self, wanted: bool) {
        self.send(Command::CameraWanted(wanted));
    }

    /// Tells the host the redirect sink's volume and mute: it applies them to every
    /// stream, and while muted nothing is sent at all.
    pub fn set_volume(&self, volume: Volume) {
        self.send(Command::Volume(volume));
    }

    /// A volume the user set on the host since the last call, for the redirect sink.
    pub fn take_host_volume(&self) -> Option<Volume> {
        self.host_volume.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Wakes the thread (after a tap's writer went away).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// The connection's counters.
    pub fn stats(&self) -> &Arc<GuestStats> {
        &self.stats
    }
}

/// Settings of the guest thread.
#[derive(Debug)]
pub struct GuestConfig {
    /// Where the host is.
    pub port: PortSpec,
    /// Software name sent in the handshake.
    pub software: String,
    /// The virtual microphone's render ring, if the guest has one.
    pub mic: Option<MicFeed>,
    /// Where the host's camera frames go, if the guest has a virtual camera.
    pub camera: Option<crate::camera::CameraFeed>,
    /// Where the media broker listens for players' stubs, if it runs.
    pub broker: Option<PathBuf>,
}

/// The running guest thread; dropping it says goodbye to the host and stops it.
#[derive(Debug)]
pub struct GuestThread {
    handle: GuestHandle,
    thread: Option<JoinHandle<()>>,
    /// Stopped before the thread, so that its last commands arrive.
    broker: Option<BrokerThread>,
}

impl GuestThread {
    /// Opens the port and starts the thread. Fails only if the port spec itself is
    /// unusable; an absent host is waited for.
    pub fn spawn(config: GuestConfig) -> io::Result<Self> {
        let port = Port::open(&config.port)?;
        let (commands, command_rx) = crossbeam_channel::bounded(COMMAND_QUEUE);
        let stats = Arc::new(GuestStats::default());
        let handle = GuestHandle {
            commands,
            shutdown: Arc::default(),
            waker: Arc::new(Waker::new()?),
            next_id: Arc::new(AtomicU32::new(1)),
            stats: stats.clone(),
            host_volume: Arc::default(),
        };
        let core = GuestCore::new(
            CoreConfig { software: config.software, clock_id: clock::clock_id() },
            config.mic,
            config.camera,
            stats,
        );
        let (broker, notes) = match &config.broker {
            Some(path) => {
                let (tx, rx) = crossbeam_channel::bounded(NOTE_QUEUE);
                let waker = Arc::new(Waker::new()?);
                match BrokerThread::spawn(path, handle.clone(), rx, waker.clone()) {
                    Ok(b) => (Some(b), Some((tx, waker))),
                    Err(e) => {
                        // Players then find no socket and decode themselves.
                        log::error!(
                            "melange broker: cannot listen on {}: {e}; players decode in the guest",
                            path.display()
                        );
                        (None, None)
                    }
                }
            }
            None => (None, None),
        };
        let mut driver =
            Driver { port, core, commands: command_rx, handle: handle.clone(), last_status: String::new(), notes };
        let thread = std::thread::Builder::new().name("melange-guest".into()).spawn(move || driver.run())?;
        Ok(Self { handle, thread: Some(thread), broker })
    }

    /// A handle for the module's threads.
    pub fn handle(&self) -> GuestHandle {
        self.handle.clone()
    }

    /// Says goodbye to the host and stops the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.broker.take();
        if let Some(t) = self.thread.take() {
            self.handle.shutdown.store(true, Ordering::Relaxed);
            self.handle.waker.wake();
            let _ = t.join();
        }
    }
}

impl Drop for GuestThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The loop: commands in, port events in, the core polled, bytes out.
struct Driver {
    port: Port,
    core: GuestCore,
    commands: Receiver<Command>,
    handle: GuestHandle,
    /// Last connectivity problem logged, so each is logged once.
    last_status: String,
    /// Where notes for the media broker go, and its waker.
    notes: Option<(crossbeam_channel::Sender<BrokerNote>, Arc<Waker>)>,
}

impl Driver {
    fn run(&mut self) {
        log::info!("melange guest: waiting for the host on {}", self.port.describe());
        let mut buf = vec![0u8; 64 * 1024];
        while self.take_commands() {
            let (now, now_ns) = clock::now_pair();
            self.core.poll(now, now_ns);
            self.after_core();
            let timeout = self.core.poll_timeout(now, now_ns);
            let want_write = !self.core.transmit().is_empty();
            let event = match self.port.wait(want_write, Some(timeout), Some(&self.handle.waker)) {
                Ok(event) => event,
                Err(e) => {
                    self.status(format!("port error on {}: {e}", self.port.describe()));
                    std::thread::sleep(PORT_ERROR_PAUSE);
                    continue;
                }
            };
            match event {
                PortEvent::Connected => {
                    let (now, now_ns) = clock::now_pair();
                    self.core.connected(now, now_ns);
                }
                PortEvent::Disconnected(reason) => self.lost(&reason),
                PortEvent::Readable => self.read(&mut buf),
                PortEvent::Woken | PortEvent::Writable | PortEvent::Timeout => {}
            }
            if !self.core.has_session() {
                if let Some(e) = self.port.last_error().map(str::to_owned) {
                    self.status(format!("waiting for the host: {e}"));
                }
            }
        }
        // Taps released before the shutdown send their last packets and close.
        self.core.shutdown(clock::monotonic_ns());
        self.flush();
    }

    /// Applies the module's commands, in order; false on shutdown.
    fn take_commands(&mut self) -> bool {
        loop {
            if self.handle.shutdown.load(Ordering::Relaxed) {
                return false;
            }
            match self.commands.try_recv() {
                Ok(command) => self.core.command(command),
                // Every handle is gone: nobody can send anything again.
                Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    /// Does what the core asked for and writes what it has.
    fn after_core(&mut self) {
        while let Some(event) = self.core.poll_event() {
            match event {
                CoreEvent::HangUp => self.port.disconnect(),
                CoreEvent::HostVolume(volume) => {
                    *self.handle.host_volume.lock().unwrap_or_else(|e| e.into_inner()) = Some(volume);
                }
                CoreEvent::Broker(note) => {
                    if let Some((tx, waker)) = &self.notes {
                        let _ = tx.try_send(note);
                        waker.wake();
                    }
                }
            }
        }
        if self.core.stats().connected.load(Ordering::Relaxed) {
            self.last_status.clear();
        }
        self.flush();
    }

    /// Logs a connectivity problem once, until it changes.
    fn status(&mut self, text: String) {
        if text != self.last_status {
            log::warn!("melange guest: {text}");
            self.last_status = text;
        }
    }

    fn lost(&mut self, reason: &str) {
        if self.core.disconnected() {
            log::warn!("melange guest: host disconnected ({reason}); reconnecting");
        } else {
            self.status(reason.to_string());
        }
    }

    fn read(&mut self, buf: &mut [u8]) {
        loop {
            match self.port.read(buf) {
                Ok(Some(0)) => return self.lost("end of stream"),
                Ok(Some(n)) => self.core.handle_input(clock::now_pair().0, &buf[..n]),
                Ok(None) => return,
                Err(e) => return self.lost(&e.to_string()),
            }
        }
    }

    fn flush(&mut self) {
        while !self.core.transmit().is_empty() {
            match self.port.write(self.core.transmit()) {
                Ok(0) => return,
                Ok(n) => self.core.consume(n),
                Err(e) => return self.lost(&e.to_string()),
            }
        }
    }
}
