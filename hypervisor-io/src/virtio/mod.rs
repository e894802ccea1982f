//! The virtio side: one [`Controller`] per guest controller, serving a
//! vhost-user socket that QEMU connects to (and reconnects to after a
//! reboot or a restart: the controller stays until it is stopped).
//! [`device`] is one connection's vhost-user device; [`wire`] the
//! virtio-scsi layouts. Nothing here knows what a SCSI command means: it
//! hands the CDB and the buffers to the [`crate::scsi::target::Target`].

pub mod device;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::scsi::target::Target;

type Job = Box<dyn FnOnce() + Send>;

/// The most request queues a controller serves (QEMU's `num_queues`).
pub const MAX_REQUEST_QUEUES: usize = 16;

/// The controller's I/O threads: requests from every queue run here, so a
/// queue has as many in flight as there are threads.
pub struct Pool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Pool {
    fn new(name: &str, n: usize) -> std::io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("scsi-io-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(j) => j,
                            Err(_) => return,
                        };
                        job();
                    })?,
            );
        }
        tracing::debug!("{name}: {n} I/O threads");
        Ok(Pool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    pub fn submit(&self, job: Job) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(job);
        }
    }

    fn stop(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

/// Requests taken from the queues and not yet completed.
#[derive(Default)]
pub struct Inflight {
    n: Mutex<usize>,
    idle: Condvar,
}

impl Inflight {
    pub fn begin(&self) {
        *self.n.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }
    pub fn end(&self) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }
    pub fn count(&self) -> usize {
        *self.n.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn wait_idle(&self) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What a controller's connection threads and I/O threads share.
pub struct Shared {
    pub name: String,
    /// The initiator's name for persistent reservations.
    pub nexus: String,
    pub target: Arc<Target>,
    /// The request queues the guest is expected to use (sizes the I/O
    /// threads; any up to [`MAX_REQUEST_QUEUES`] is served).
    pub request_queues: usize,
    pub pool: Pool,
    pub inflight: Inflight,
    pub events: Mutex<device::Events>,
    pub connected: AtomicBool,
    pub connections: AtomicU64,
    stop: AtomicBool,
    shutdown: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
}

/// One guest controller: a vhost-user-scsi socket and its target.
pub struct Controller {
    shared: Arc<Shared>,
    socket: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How a controller is set up.
pub struct Config {
    pub socket: PathBuf,
    pub request_queues: usize,
    pub io_threads: usize,
    pub nexus: String,
}

impl Controller {
    /// Bind `socket` (replacing a stale socket file) and serve `target`.
    pub fn start(cfg: Config, target: Arc<Target>) -> std::io::Result<Controller> {
        let name = cfg.socket.display().to_string();
        let queues = cfg.request_queues.clamp(1, MAX_REQUEST_QUEUES);
        let mut listener = Listener::new(&cfg.socket, true)
            .map_err(|e| std::io::Error::other(format!("listening on {name}: {e}")))?;
        let shared = Arc::new(Shared {
            name: name.clone(),
            nexus: cfg.nexus,
            target,
            request_queues: queues,
            pool: Pool::new(&name, cfg.io_threads)?,
            inflight: Inflight::default(),
            events: Mutex::new(device::Events::default()),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            shutdown: Mutex::new(None),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("scsi-ctl".into())
            .spawn(move || serve(s, &mut listener))?;
        tracing::info!("virtio-scsi controller on {name}: {queues} request queue(s)");
        Ok(Controller {
            shared,
            socket: cfg.socket,
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.shared.target
    }

    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Add a LUN to the running controller and tell the guest (hotplug).
    pub fn add_lun(&self, lun: u16, unit: crate::scsi::target::Unit) {
        match unit {
            crate::scsi::target::Unit::Emulated(u) => self.shared.target.add(lun, u),
            crate::scsi::target::Unit::Raw(r) => self.shared.target.add_raw(lun, r),
        }
        self.event(wire::event(
            wire::event::TRANSPORT_RESET,
            lun,
            wire::event::RESCAN,
        ));
    }

    /// Remove a LUN and tell the guest.
    pub fn remove_lun(&self, lun: u16) -> Option<crate::scsi::target::Unit> {
        let u = self.shared.target.remove(lun);
        self.event(wire::event(
            wire::event::TRANSPORT_RESET,
            lun,
            wire::event::REMOVED,
        ));
        u
    }

    /// The capacity of `lun` changed: a unit attention, and a parameter
    /// change event so the guest looks now.
    pub fn capacity_changed(&self, lun: u16) {
        self.shared
            .target
            .attention(lun, crate::scsi::sense::Sense::CAPACITY_CHANGED);
        // reason: ASC 0x2A, ASCQ 0x09
        self.event(wire::event(
            wire::event::PARAM_CHANGE,
            lun,
            0x2A | (0x09 << 8),
        ));
    }

    fn event(&self, ev: [u8; wire::EVENT_LEN]) {
        self.shared
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ev);
    }

    /// Stop serving: disconnect the guest if there is one, wait for the
    /// requests in flight, close the socket.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .shared
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.shutdown();
        }
        // Wake an accept that waits for a connection.
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        let _ = t.join();
        self.shared.inflight.wait_idle();
        self.shared.pool.stop();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Accept connections one after another until stopped.
fn serve(s: Arc<Shared>, listener: &mut Listener) {
    while !s.stop.load(Ordering::SeqCst) {
        let dev = match device::Device::new(s.clone()) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::error!("{}: {e}", s.name);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut daemon = match VhostUserDaemon::new(
            "vhost-user-scsi".into(),
            dev.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("{}: {e}", s.name);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(listener) {
            tracing::warn!("{}: accepting a connection: {e}", s.name);
            dev.exit();
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if s.stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
            let _ = daemon.wait();
            dev.exit();
            break;
        }
        let t = Instant::now();
        *s.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        s.connected.store(true, Ordering::SeqCst);
        let n = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!("{}: guest connected (connection {n})", s.name);
        let r = daemon.wait();
        s.connected.store(false, Ordering::SeqCst);
        s.shutdown.lock().unwrap_or_else(|p| p.into_inner()).take();
        s.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .disconnect();
        dev.exit();
        s.inflight.wait_idle();
        match r {
            Ok(()) => tracing::info!(
                "{}: guest disconnected after {:.1} s",
                s.name,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => tracing::warn!("{}: connection ended: {e}", s.name),
        }
    }
}
