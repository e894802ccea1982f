//! iSCSI LUNs through libiscsi.
//!
//! The libiscsi context lives behind a mutex shared by the callers and one
//! event-loop thread per LUN. A caller builds its command (CDB, direction,
//! data), queues it and writes it to the socket itself, then waits for its
//! completion; large transfers are split and all pieces are in flight at
//! once, and many callers can have commands in flight together.
//!
//! **Who receives (leader/follower).** One waiting caller at a time polls
//! the socket (without the lock), receives and completes commands
//! (`iscsi_service`), its own and the others', which it wakes. When its own
//! command is done it hands the turn to another waiting caller and returns.
//! So the thread whose answer arrives first is never woken, and no extra
//! thread sits between the socket and the callers. The loop thread only
//! logs in again after a drop, enforces deadlines, and makes sure someone
//! receives when nobody does.
//!
//! **Dropped connections.** libiscsi's own reconnect is off; the loop does
//! it. When the connection drops, every command in flight comes back
//! cancelled; the loop logs in again (a new session, backing off from 100 ms
//! to 1 s between attempts) and sends those commands again, oldest first.
//! Sending a WRITE again writes the same bytes again, so no write's effect
//! is lost or doubled. A COMPARE AND WRITE that reports a miscompare may be
//! our own first attempt, already applied before the connection dropped: the
//! sector is read back, and if it holds our new bytes the command is
//! reported as written. Unit attentions (a new session, a target restart)
//! are answered by sending the command again.
//!
//! **Deadlines and fencing.** Every command has a deadline of one I/O
//! timeout (`IscsiOptions::io_timeout`; a mounted host derives it from its
//! lease). A command past it is cancelled (if in flight) or never sent again
//! (if waiting for a new session), and fails. So no write of a host is sent
//! later than one I/O timeout after the host issued it: a host that has
//! fenced itself cannot have old writes land after a reconnect, while its
//! lease may already have been broken. (A command already on the wire to a
//! live target when cancelled may still be carried out by it; the target
//! aborts everything of a connection that drops.)
//!
//! **COMPARE AND WRITE** is used when the target reports it (VPD page 0xB0,
//! MAXIMUM COMPARE AND WRITE LENGTH ≥ 1), except on targets known to
//! implement it without atomicity: tgt's `bs_rdwr` backend reads, compares
//! and writes from a thread pool without a lock, so two hosts can both
//! "win" (see [`caw_quirk`]). Those LUNs use the no-ATS locking path.

mod ffi;
pub mod scsi;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::url::IscsiUrl;
use crate::{check_caw, check_range, CompareAndWrite, Lun, LunError, Result};
use ffi::{Completion, Dir};

/// Commands larger than this are split (and sent concurrently).
const MAX_TRANSFER: u64 = 1 << 20;
/// How long a waiting caller yields before it sleeps ([`Slot::sleep`]).
const SPIN: Duration = Duration::from_micros(30);
/// How often a command that met a unit attention is sent again.
const UA_RETRIES: u32 = 10;
/// How often a command the target was too busy for is sent again.
const BUSY_RETRIES: u32 = 50;

/// Options for opening an iSCSI LUN.
#[derive(Debug, Clone, Copy)]
pub struct IscsiOptions {
    /// The longest one command may take, re-sends included (see the module
    /// documentation). The cluster layer sets it from its lease.
    pub io_timeout: Duration,
}

impl Default for IscsiOptions {
    fn default() -> Self {
        IscsiOptions {
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// What the target told us about the LUN.
#[derive(Debug, Clone)]
pub struct IscsiInfo {
    pub vendor: String,
    pub product: String,
    pub revision: String,
    pub serial: Option<String>,
    pub identity: String,
    pub blocks: u64,
    pub block_len: u32,
    /// COMPARE AND WRITE advertised by the target.
    pub caw_advertised: bool,
    /// COMPARE AND WRITE used (advertised and not known to be non-atomic).
    pub caw: bool,
    /// Why an advertised COMPARE AND WRITE is not used.
    pub caw_quirk: Option<&'static str>,
    pub unmap: bool,
    pub unmap_reads_zero: bool,
    pub max_unmap_blocks: u32,
    pub max_transfer: u64,
}

/// Targets whose COMPARE AND WRITE is not atomic, by INQUIRY vendor and product.
pub fn caw_quirk(vendor: &str, product: &str) -> Option<&'static str> {
    match (vendor, product) {
        ("IET", "VIRTUAL-DISK") => Some(
            "tgt advertises COMPARE AND WRITE, but its rdwr backend reads, compares and \
             writes without a lock, so it is not atomic between sessions",
        ),
        _ => None,
    }
}

/// A LUN reached over iSCSI.
pub struct IscsiLun {
    name: String,
    shared: Arc<Shared>,
    /// Wakes the event loop (to poll for writability, or to stop).
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
    info: IscsiInfo,
    /// Striped locks for read-modify-write of partial logical blocks.
    rmw: Vec<std::sync::Mutex<()>>,
}

/// The loop's copy of the login parameters (owned strings).
struct LoginData {
    initiator: String,
    target: String,
    portal: String,
    lun: u16,
    chap: Option<(String, String)>,
    target_chap: Option<(String, String)>,
    header_digest: Option<i32>,
    tcp_user_timeout_ms: u32,
}

fn default_initiator() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let host = if ok {
        let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..n])
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .collect::<String>()
            .to_lowercase()
    } else {
        String::new()
    };
    if host.is_empty() {
        "iqn.2026-11.org.vmfs:host".into()
    } else {
        format!("iqn.2026-11.org.vmfs:{host}")
    }
}

/// One command the loop owns until its caller has an answer.
struct Pending {
    cdb: Vec<u8>,
    dir: Dir,
    /// The data-out bytes while not in flight (libiscsi holds them in flight).
    data_out: Vec<u8>,
    reply: Arc<Slot>,
    deadline: Instant,
    /// The libiscsi task while in flight on the current session.
    task: Option<ffi::Task>,
    /// Cancelled by us at its deadline (not by a dropped connection).
    expired: bool,
}

fn failed(status: i32, data_out: Vec<u8>, message: String) -> Completion {
    Completion {
        status,
        sense_key: 0,
        ascq: 0,
        data_in: Vec::new(),
        data_out,
        message: Some(message),
    }
}

/// The event loop: owns the session, the commands in flight and the ones
/// waiting for a connection; logs in again when the connection drops.
struct Looper {
    login: LoginData,
    name: String,
    io_timeout: Duration,
    pending: std::collections::HashMap<u64, Pending>,
    /// Commands to send once there is a session, oldest first.
    waiting: std::collections::VecDeque<u64>,
    next_id: u64,
    /// Completions handed over by libiscsi's callbacks, for `settle`.
    done: Arc<Mutex<Vec<(u64, Completion)>>>,
    /// Shutting down: cancelled commands are answered, not sent again.
    stopping: bool,
    session: Option<ffi::Session>,
    next_login: Instant,
    backoff: Duration,
    down_since: Option<Instant>,
    /// A caller is polling the socket (it receives for everyone).
    polling: bool,
    /// Callers asleep while another receives, to hand the turn to.
    idle: std::collections::VecDeque<Arc<Slot>>,
}

impl Looper {
    fn connect(login: &LoginData) -> std::result::Result<ffi::Session, String> {
        ffi::Session::connect(&ffi::Login {
            initiator: &login.initiator,
            target: &login.target,
            portal: &login.portal,
            lun: login.lun,
            chap: login.chap.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
            target_chap: login
                .target_chap
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.as_str())),
            header_digest: login.header_digest,
            tcp_user_timeout_ms: login.tcp_user_timeout_ms,
        })
    }

    fn accept(&mut self, cdb: Vec<u8>, dir: Dir, data_out: Vec<u8>, reply: Arc<Slot>) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            id,
            Pending {
                cdb,
                dir,
                data_out,
                reply,
                deadline: Instant::now() + self.io_timeout,
                task: None,
                expired: false,
            },
        );
        self.waiting.push_back(id);
    }

    /// Send what waits, if there is a session.
    fn send_waiting(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        while let Some(id) = self.waiting.pop_front() {
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            let q = self.done.clone();
            let done = Box::new(move |c: Completion| {
                q.lock().unwrap_or_else(|p| p.into_inner()).push((id, c))
            });
            let data_out = std::mem::take(&mut p.data_out);
            match s.submit(self.login.lun, &p.cdb, p.dir, data_out, done) {
                Ok(t) => p.task = Some(t),
                Err((why, data_out)) => {
                    self.done
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((id, failed(ffi::STATUS_ERROR, data_out, why)));
                }
            }
        }
    }

    /// Hand finished commands to their callers, or keep those the dropped
    /// connection cancelled (within their deadline) to send again.
    /// Returns the answers to send; the caller sends them once it has let
    /// go of the session lock (a send may wake a thread).
    #[must_use]
    fn settle(&mut self) -> Vec<(Arc<Slot>, Completion)> {
        let mut out = Vec::new();
        let finished: Vec<(u64, Completion)> =
            std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()));
        for (id, mut c) in finished {
            let Some(mut p) = self.pending.remove(&id) else {
                continue;
            };
            p.task = None;
            if c.status == ffi::STATUS_CANCELLED
                && !p.expired
                && !self.stopping
                && Instant::now() < p.deadline
            {
                // The connection dropped under it: send it again on the next
                // session. A write sent twice writes the same bytes twice.
                p.data_out = std::mem::take(&mut c.data_out);
                self.pending.insert(id, p);
                self.waiting.push_back(id);
                continue;
            }
            if p.expired {
                c.status = ffi::STATUS_TIMEOUT;
                c.message = Some(format!(
                    "no answer within the I/O timeout of {:?}",
                    self.io_timeout
                ));
            }
            out.push((p.reply, c));
        }
        out
    }

    /// Commands past their deadline: cancel those in flight, fail those waiting.
    fn expire(&mut self) {
        let now = Instant::now();
        let overdue: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.expired && now >= p.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            p.expired = true;
            match (p.task.take(), self.session.as_mut()) {
                (Some(t), Some(s)) => s.cancel(t),
                _ => {
                    self.waiting.retain(|w| *w != id);
                    let data_out = std::mem::take(&mut p.data_out);
                    self.done
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((id, failed(ffi::STATUS_TIMEOUT, data_out, String::new())));
                }
            }
        }
    }

    /// The connection dropped: every command in flight completes (cancelled)
    /// when the session goes; log in again soon.
    fn lost(&mut self, why: &str) {
        if self.down_since.is_none() {
            tracing::warn!(lun = %self.name, "iSCSI connection lost ({}); logging in again", why.trim());
            self.down_since = Some(Instant::now());
        }
        for p in self.pending.values_mut() {
            p.task = None;
        }
        self.session = None; // destroying the context cancels what was in flight
        self.next_login = Instant::now();
        self.backoff = Duration::from_millis(100);
    }

    fn try_login(&mut self) {
        if self.session.is_some() || Instant::now() < self.next_login {
            return;
        }
        match Self::connect(&self.login) {
            Ok(s) => {
                if let Some(t) = self.down_since.take() {
                    tracing::warn!(
                        lun = %self.name,
                        "iSCSI session restored after {:?}; sending {} command(s) again",
                        t.elapsed(),
                        self.waiting.len()
                    );
                }
                self.session = Some(s);
            }
            Err(e) => {
                tracing::debug!(lun = %self.name, "iSCSI login failed: {e}");
                self.next_login = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
            }
        }
    }

    /// Stop: every command still here is answered (cancelled).
    fn shutdown(&mut self) {
        self.stopping = true;
        self.session = None; // completes what was in flight (cancelled)
        answer(self.settle());
        for id in std::mem::take(&mut self.waiting) {
            if let Some(p) = self.pending.remove(&id) {
                p.reply.fill(failed(
                    ffi::STATUS_CANCELLED,
                    p.data_out,
                    "the LUN was closed".into(),
                ));
            }
        }
    }

    /// Let libiscsi work on the socket (`revents` from poll, or POLLOUT from
    /// a caller that just queued a command); a dropped connection is noticed here.
    fn service(&mut self, revents: i16) {
        if let Some(s) = self.session.as_mut() {
            let down = match s.service(revents) {
                Err(e) => Some(e),
                Ok(()) if !s.logged_in() => Some(s.error()),
                Ok(()) => None,
            };
            if let Some(why) = down {
                self.lost(&why);
            }
        }
    }

    /// A caller still waiting, to take the turn receiving, when commands
    /// are out and nobody receives (none if a caller receives already).
    fn heir(&mut self) -> Option<Arc<Slot>> {
        if self.polling || self.pending.is_empty() || self.session.is_none() {
            return None;
        }
        while let Some(s) = self.idle.pop_front() {
            if s.waiting() {
                return Some(s);
            }
        }
        None
    }

    /// The socket and the events to poll it for (none without a session).
    fn poll_target(&self) -> (i32, i16) {
        match &self.session {
            Some(s) => (s.fd(), s.which_events()),
            None => (-1, 0),
        }
    }
}

/// Send answers (outside the session lock).
fn answer(out: Vec<(Arc<Slot>, Completion)>) {
    for (reply, c) in out {
        reply.fill(c);
    }
}

/// Where one command's completion lands, and how its waiting caller is
/// woken: with the completion, or to take its turn receiving.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

#[derive(Default)]
struct SlotState {
    done: Option<Completion>,
    /// The completion was taken: nobody waits here any more.
    taken: bool,
    /// Asked to poll the socket (the previous receiver left).
    lead: bool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn fill(&self, c: Completion) {
        self.lock().done = Some(c);
        self.cv.notify_one();
    }
    fn take(&self) -> Option<Completion> {
        let mut s = self.lock();
        let c = s.done.take();
        s.taken |= c.is_some();
        c
    }
    /// Whose caller still waits for an answer (and can take a turn).
    fn waiting(&self) -> bool {
        let s = self.lock();
        s.done.is_none() && !s.taken
    }
    fn nominate(&self) {
        self.lock().lead = true;
        self.cv.notify_one();
    }
    /// Sleep until answered, nominated, or `limit` passed.
    ///
    /// For the first [`SPIN`] it yields instead of sleeping: an answer
    /// usually arrives within a few microseconds of another, and a thread
    /// that never went to sleep needs no wake-up (a futex wake and a
    /// context switch per command were most of what we spent beyond
    /// `iscsi-perf`, a single-threaded loop).
    fn sleep(&self, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < SPIN {
            {
                let s = self.lock();
                if s.done.is_some() || s.lead {
                    break;
                }
            }
            std::thread::yield_now();
        }
        let s = self.lock();
        let (mut s, _) = self
            .cv
            .wait_timeout_while(s, limit, |s| s.done.is_none() && !s.lead)
            .unwrap_or_else(|p| p.into_inner());
        s.lead = false;
    }
}

/// Poll one socket (and the `nudge` eventfd) for up to `ms`; the socket's revents.
fn poll_socket(fd: i32, events: i16, nudge: i32, ms: i32) -> i16 {
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: nudge,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` holds two valid pollfd entries.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if fds[1].revents & libc::POLLIN != 0 {
        eventfd_clear(nudge);
    }
    fds[0].revents
}

/// What the caller threads and the event-loop thread share. Callers queue
/// and send their commands themselves, and take turns receiving; the loop
/// logs in again and enforces deadlines.
struct Shared {
    looper: Mutex<Looper>,
    stop: AtomicBool,
    /// Wakes the caller polling the socket (to poll for writability too).
    nudge: OwnedFd,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Looper> {
        self.looper.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The loop thread: logs in again, sends what waited for a session,
/// enforces deadlines, and, when commands are out but no caller is
/// receiving, receives what has arrived and asks a waiting caller to take
/// over. Wakes every 100 ms, or when `wake` is written (stop).
fn event_loop(shared: Arc<Shared>, wake: i32) {
    loop {
        let mut fds = [libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` holds one valid pollfd entry.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        if fds[0].revents & libc::POLLIN != 0 {
            eventfd_clear(wake);
        }
        let mut l = shared.lock();
        if shared.stop.load(Ordering::SeqCst) {
            return l.shutdown();
        }
        l.try_login();
        l.send_waiting();
        if !l.polling {
            let (fd, events) = l.poll_target();
            if fd >= 0 {
                let revents = poll_socket(fd, events, shared.nudge.as_raw_fd(), 0);
                l.service(revents);
            }
        }
        // Settle first: a task that completed in this round is freed and
        // must not be cancelled by `expire`.
        let mut out = l.settle();
        l.expire();
        out.extend(l.settle());
        let heir = l.heir();
        drop(l);
        answer(out);
        if let Some(h) = heir {
            h.nominate();
        }
    }
}

/// Wake whoever polls eventfd `fd`.
fn eventfd_signal(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a u64 to our eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Reset eventfd `fd` after poll reported it readable.
fn eventfd_clear(fd: i32) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a u64 from our eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

fn eventfd(name: &str) -> Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(LunError::Open {
            lun: name.into(),
            what: "cannot create an eventfd".into(),
            cause: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `efd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(efd) })
}

impl IscsiLun {
    /// Log in to the target of `url` and learn the LUN's size, identity and
    /// capabilities. `name` is how messages show the LUN (no password).
    pub fn connect(url: &IscsiUrl, name: &str, opts: IscsiOptions) -> Result<IscsiLun> {
        let err = |what: String| LunError::Iscsi {
            lun: name.to_string(),
            what,
        };
        let header_digest = url.header_digest.as_deref().map(|d| match d {
            "none" => 0,
            "none-crc32c" => 1,
            "crc32c-none" => 2,
            _ => 3,
        });
        let io = opts.io_timeout.max(Duration::from_millis(100));
        let login = LoginData {
            initiator: url.initiator.clone().unwrap_or_else(default_initiator),
            target: url.target.clone(),
            portal: url.portal(),
            lun: url.lun,
            chap: url
                .chap
                .as_ref()
                .map(|c| (c.user.clone(), c.secret.0.clone())),
            target_chap: url
                .target_chap
                .as_ref()
                .map(|c| (c.user.clone(), c.secret.0.clone())),
            header_digest,
            tcp_user_timeout_ms: io.as_millis().min(u128::from(u32::MAX)) as u32,
        };
        let wake = eventfd(name)?;
        let efd = wake.as_raw_fd();
        let session = Looper::connect(&login).map_err(|e| {
            err(format!(
                "login to {} at {} failed: {e}",
                url.target,
                url.portal()
            ))
        })?;
        let shared = Arc::new(Shared {
            looper: Mutex::new(Looper {
                login,
                name: name.to_string(),
                io_timeout: io,
                pending: Default::default(),
                waiting: Default::default(),
                next_id: 1,
                done: Default::default(),
                stopping: false,
                session: Some(session),
                next_login: Instant::now(),
                backoff: Duration::from_millis(100),
                down_since: None,
                polling: false,
                idle: Default::default(),
            }),
            stop: AtomicBool::new(false),
            nudge: eventfd(name)?,
        });
        let thread = std::thread::Builder::new()
            .name("iscsi".into())
            .spawn({
                let shared = shared.clone();
                move || event_loop(shared, efd)
            })
            .map_err(|e| LunError::Open {
                lun: name.into(),
                what: "cannot start the iSCSI thread".into(),
                cause: e,
            })?;
        let mut lun = IscsiLun {
            name: name.to_string(),
            shared,
            wake,
            thread: Some(thread),
            rmw: (0..64).map(|_| std::sync::Mutex::new(())).collect(),
            info: IscsiInfo {
                vendor: String::new(),
                product: String::new(),
                revision: String::new(),
                serial: None,
                identity: String::new(),
                blocks: 0,
                block_len: 512,
                caw_advertised: false,
                caw: false,
                caw_quirk: None,
                unmap: false,
                unmap_reads_zero: false,
                max_unmap_blocks: 0,
                max_transfer: MAX_TRANSFER,
            },
        };
        lun.probe(url)?;
        tracing::debug!(lun = name, info = ?lun.info, "iSCSI LUN ready");
        Ok(lun)
    }

    pub fn info(&self) -> &IscsiInfo {
        &self.info
    }

    fn probe(&mut self, url: &IscsiUrl) -> Result<()> {
        let bad = |what: String| LunError::Iscsi {
            lun: self.name.clone(),
            what,
        };
        self.exec(
            "TEST UNIT READY",
            0,
            scsi::test_unit_ready(),
            Dir::None,
            Vec::new(),
        )?;
        let inq = self.exec(
            "INQUIRY",
            0,
            scsi::inquiry(None, 96),
            Dir::Read(96),
            Vec::new(),
        )?;
        let inq = scsi::parse_inquiry(&inq.data_in).map_err(bad)?;
        if inq.peripheral_type != 0 {
            return Err(LunError::Iscsi {
                lun: self.name.clone(),
                what: format!(
                    "LUN {} of {} is not a disk (peripheral device type {:#x}); give the number of a disk LUN",
                    url.lun, url.target, inq.peripheral_type
                ),
            });
        }
        let cap = self.exec(
            "READ CAPACITY(16)",
            0,
            scsi::read_capacity16(),
            Dir::Read(32),
            Vec::new(),
        )?;
        let cap = scsi::parse_capacity(&cap.data_in).map_err(|e| LunError::Iscsi {
            lun: self.name.clone(),
            what: e,
        })?;
        let vpd = |me: &Self, page: u8| -> Result<Vec<u8>> {
            Ok(me
                .exec(
                    "INQUIRY (VPD)",
                    0,
                    scsi::inquiry(Some(page), 255),
                    Dir::Read(255),
                    Vec::new(),
                )?
                .data_in)
        };
        let bad = |what: String| LunError::Iscsi {
            lun: self.name.clone(),
            what,
        };
        let pages = scsi::parse_supported_pages(&vpd(self, 0x00)?).map_err(bad)?;
        let serial = if pages.contains(&0x80) {
            Some(scsi::parse_serial(&vpd(self, 0x80)?).map_err(bad)?)
        } else {
            None
        };
        let designator = if pages.contains(&0x83) {
            scsi::parse_identity(&vpd(self, 0x83)?).map_err(bad)?
        } else {
            None
        };
        let limits = if pages.contains(&0xb0) {
            scsi::parse_block_limits(&vpd(self, 0xb0)?).map_err(bad)?
        } else {
            scsi::BlockLimits::default()
        };
        let prov = if pages.contains(&0xb2) {
            scsi::parse_provisioning(&vpd(self, 0xb2)?).map_err(bad)?
        } else {
            scsi::Provisioning::default()
        };
        let identity = match (designator, &serial) {
            (Some(d), _) => d,
            (None, Some(s)) if !s.is_empty() => format!("serial.{}.{}", inq.vendor, s),
            _ => format!("iscsi:{}/{}", url.target, url.lun),
        };
        let quirk = caw_quirk(&inq.vendor, &inq.product);
        let bl = u64::from(cap.block_len);
        let mut max_transfer = MAX_TRANSFER;
        if limits.max_transfer_blocks != 0 {
            max_transfer = max_transfer.min(u64::from(limits.max_transfer_blocks) * bl);
        }
        max_transfer = (max_transfer / bl).max(1) * bl;
        self.info = IscsiInfo {
            vendor: inq.vendor,
            product: inq.product,
            revision: inq.revision,
            serial,
            identity,
            blocks: cap.blocks,
            block_len: cap.block_len,
            caw_advertised: limits.max_caw_blocks >= 1,
            caw: limits.max_caw_blocks >= 1 && quirk.is_none(),
            caw_quirk: if limits.max_caw_blocks >= 1 {
                quirk
            } else {
                None
            },
            unmap: prov.lbpu && cap.lbpme,
            unmap_reads_zero: prov.lbprz || cap.lbprz,
            max_unmap_blocks: limits.max_unmap_blocks,
            max_transfer,
        };
        Ok(())
    }

    /// Queue one command and send it from this thread; its completion
    /// lands in the returned slot (see [`IscsiLun::wait`]).
    fn submit(&self, cdb: Vec<u8>, dir: Dir, data_out: Vec<u8>) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        let mut l = self.shared.lock();
        l.accept(cdb, dir, data_out, slot.clone());
        l.send_waiting();
        // Write it to the socket now.
        l.service(libc::POLLOUT);
        let out = l.settle();
        let more = l.poll_target().1 & libc::POLLOUT != 0;
        drop(l);
        answer(out);
        if more {
            // The socket is full: whoever receives must poll for
            // writability too.
            eventfd_signal(&self.shared.nudge);
        }
        slot
    }

    /// Wait for a command's completion. If no caller is receiving, receive
    /// (for everyone) until ours is in; then hand the turn to a caller that
    /// still waits. Otherwise sleep until answered or handed the turn.
    fn wait(&self, slot: Arc<Slot>) -> Completion {
        loop {
            if let Some(c) = slot.take() {
                return c;
            }
            let mut l = self.shared.lock();
            let (fd, events) = l.poll_target();
            if l.polling || fd < 0 || self.shared.stop.load(Ordering::SeqCst) {
                // Someone else receives (or there is no session): sleep. The
                // limit only bounds a missed hand-over.
                if l.idle.len() > 64 {
                    l.idle.retain(|s| s.waiting());
                }
                l.idle.push_back(slot.clone());
                drop(l);
                slot.sleep(Duration::from_millis(50));
                continue;
            }
            l.polling = true;
            drop(l);
            let revents = poll_socket(fd, events, self.shared.nudge.as_raw_fd(), 50);
            let mut l = self.shared.lock();
            l.polling = false;
            // The session may have changed while we polled: its events
            // then belong to a closed socket.
            if l.poll_target().0 == fd {
                l.service(revents);
            }
            let out = l.settle();
            drop(l);
            answer(out);
            if slot.waiting() {
                continue; // not ours yet: our turn goes on
            }
            let heir = self.shared.lock().heir();
            if let Some(h) = heir {
                h.nominate();
            }
        }
    }

    /// Whether a completion asks for the same command again, after how long.
    fn retry_after(c: &Completion, attempt: u32) -> Option<Duration> {
        match c.status {
            ffi::STATUS_CHECK_CONDITION if c.sense_key == 0x6 && attempt < UA_RETRIES => {
                Some(Duration::ZERO)
            }
            // NOT READY, becoming ready.
            ffi::STATUS_CHECK_CONDITION
                if c.sense_key == 0x2 && c.ascq == 0x0401 && attempt < BUSY_RETRIES =>
            {
                Some(Duration::from_millis(20))
            }
            ffi::STATUS_BUSY | ffi::STATUS_TASK_SET_FULL if attempt < BUSY_RETRIES => {
                Some(Duration::from_millis(u64::from(attempt.min(7)) * 10 + 1))
            }
            _ => None,
        }
    }

    /// Finish a command that came back: retry it while the target asks for
    /// that, then turn what is left into an error.
    fn settle(
        &self,
        what: &'static str,
        offset: u64,
        cdb: &[u8],
        dir: Dir,
        mut c: Completion,
        accept_miscompare: bool,
    ) -> Result<Completion> {
        let mut attempt = 0;
        while let Some(pause) = Self::retry_after(&c, attempt) {
            if c.sense_key == 0x6 {
                tracing::debug!(lun = %self.name, "{what}: unit attention {:#06x}, sending again", c.ascq);
            }
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
            attempt += 1;
            let data_out = std::mem::take(&mut c.data_out);
            c = self.wait(self.submit(cdb.to_vec(), dir, data_out));
        }
        match c.status {
            ffi::STATUS_GOOD => Ok(c),
            ffi::STATUS_CHECK_CONDITION if accept_miscompare && c.sense_key == 0xe => Ok(c),
            ffi::STATUS_CHECK_CONDITION => Err(LunError::Scsi {
                lun: self.name.clone(),
                command: what,
                offset,
                status: scsi::sense_text(c.sense_key, c.ascq),
            }),
            ffi::STATUS_TIMEOUT => Err(LunError::Disconnected {
                lun: self.name.clone(),
                what: format!("{what} at offset {offset} timed out"),
            }),
            ffi::STATUS_CANCELLED | ffi::STATUS_ERROR => Err(LunError::Disconnected {
                lun: self.name.clone(),
                what: format!(
                    "{what} at offset {offset}: {}",
                    c.message.as_deref().unwrap_or("cancelled")
                ),
            }),
            s => Err(LunError::Scsi {
                lun: self.name.clone(),
                command: what,
                offset,
                status: match s {
                    ffi::STATUS_RESERVATION_CONFLICT => "RESERVATION CONFLICT".into(),
                    ffi::STATUS_TASK_ABORTED => "TASK ABORTED".into(),
                    ffi::STATUS_BUSY => "BUSY (gave up)".into(),
                    ffi::STATUS_TASK_SET_FULL => "TASK SET FULL (gave up)".into(),
                    s => format!("status {s:#x}"),
                },
            }),
        }
    }

    fn exec(
        &self,
        what: &'static str,
        offset: u64,
        cdb: Vec<u8>,
        dir: Dir,
        data_out: Vec<u8>,
    ) -> Result<Completion> {
        let c = self.wait(self.submit(cdb.clone(), dir, data_out));
        self.settle(what, offset, &cdb, dir, c, false)
    }

    /// Read or write `len` bytes at `offset` in pieces of at most
    /// `max_transfer`, all in flight at once.
    fn transfer(
        &self,
        write: Option<&[u8]>,
        read: Option<&mut [u8]>,
        offset: u64,
        fua: bool,
    ) -> Result<()> {
        let bl = u64::from(self.info.block_len);
        let len = write.map_or_else(|| read.as_ref().map_or(0, |r| r.len()), |w| w.len()) as u64;
        check_range(&self.name, self.size(), offset, len)?;
        if offset % bl != 0 || len % bl != 0 {
            return Err(LunError::InvalidArgument {
                lun: self.name.clone(),
                what: format!(
                    "access at offset {offset} (+{len} bytes) is not aligned to the {bl}-byte logical block"
                ),
            });
        }
        let what = if write.is_some() {
            "WRITE(16)"
        } else {
            "READ(16)"
        };
        let mut pieces = Vec::new();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.info.max_transfer);
            let off = offset + done;
            let lba = off / bl;
            let blocks = (n / bl) as u32;
            let (cdb, dir, data) = match write {
                Some(w) => (
                    scsi::write16(lba, blocks, fua),
                    Dir::Write,
                    w[done as usize..(done + n) as usize].to_vec(),
                ),
                None => (scsi::read16(lba, blocks), Dir::Read(n as usize), Vec::new()),
            };
            let rx = self.submit(cdb.clone(), dir, data);
            pieces.push((off, n, cdb, dir, rx));
            done += n;
        }
        let mut out = read;
        let mut first_err = None;
        for (off, n, cdb, dir, rx) in pieces {
            let c = self.wait(rx);
            match self.settle(what, off, &cdb, dir, c, false) {
                Ok(c) => {
                    if let Some(o) = out.as_deref_mut() {
                        let s = (off - offset) as usize;
                        if c.data_in.len() != n as usize {
                            first_err.get_or_insert(LunError::Iscsi {
                                lun: self.name.clone(),
                                what: format!(
                                    "READ(16) at offset {off} returned {} bytes, not {n}",
                                    c.data_in.len()
                                ),
                            });
                            continue;
                        }
                        o[s..s + n as usize].copy_from_slice(&c.data_in);
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The logical-block-aligned range covering `[offset, offset+len)`.
    fn aligned(&self, offset: u64, len: u64) -> (u64, u64) {
        let bl = u64::from(self.info.block_len);
        (offset / bl * bl, (offset + len).div_ceil(bl) * bl)
    }

    /// A write that starts or ends inside a logical block: read the partial
    /// blocks, merge, write whole blocks. Partial blocks are serialized
    /// within this process (two writers of different bytes of one block
    /// must not undo each other); between hosts, only one writes a block.
    fn write_unaligned(&self, buf: &[u8], offset: u64, start: u64, end: u64) -> Result<()> {
        let bl = u64::from(self.info.block_len);
        let head = start / bl;
        let tail = (end - bl) / bl;
        let stripe = |lba: u64| (lba % self.rmw.len() as u64) as usize;
        let (a, b) = (stripe(head), stripe(tail));
        let _g1 = self.rmw[a.min(b)].lock().unwrap_or_else(|p| p.into_inner());
        let _g2 = (a != b).then(|| self.rmw[a.max(b)].lock().unwrap_or_else(|p| p.into_inner()));
        let mut whole = vec![0u8; (end - start) as usize];
        if offset != start {
            self.transfer(None, Some(&mut whole[..bl as usize]), start, false)?;
        }
        let last = whole.len() - bl as usize;
        if offset + buf.len() as u64 != end && (last != 0 || offset == start) {
            self.transfer(None, Some(&mut whole[last..]), end - bl, false)?;
        }
        let s = (offset - start) as usize;
        whole[s..s + buf.len()].copy_from_slice(buf);
        self.transfer(Some(&whole), None, start, false)
    }

    /// Write with Force Unit Access: durable when this returns.
    pub fn write_fua(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.transfer(Some(buf), None, offset, true)
    }
}

impl Lun for IscsiLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn passthrough(
        &self,
        cdb: &[u8],
        data_out: &[u8],
        data_in: usize,
    ) -> Option<Result<crate::ScsiReply>> {
        if cdb.is_empty() || cdb.len() > 16 {
            return Some(Err(LunError::InvalidArgument {
                lun: self.name.clone(),
                what: format!("a CDB of {} bytes", cdb.len()),
            }));
        }
        let dir = if !data_out.is_empty() {
            Dir::Write
        } else if data_in > 0 {
            Dir::Read(data_in)
        } else {
            Dir::None
        };
        let c = self.wait(self.submit(cdb.to_vec(), dir, data_out.to_vec()));
        if let Some(m) = c.message {
            return Some(Err(LunError::Io {
                lun: self.name.clone(),
                offset: 0,
                len: 0,
                cause: std::io::Error::other(format!(
                    "passing through opcode {:#04x}: {m}",
                    cdb[0]
                )),
            }));
        }
        Some(Ok(crate::ScsiReply {
            status: c.status as u8,
            sense_key: c.sense_key,
            ascq: c.ascq,
            data_in: c.data_in,
        }))
    }
    fn size(&self) -> u64 {
        self.info.blocks * u64::from(self.info.block_len)
    }
    fn block_size(&self) -> u32 {
        self.info.block_len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (start, end) = self.aligned(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            return self.transfer(None, Some(buf), offset, false);
        }
        let mut tmp = vec![0u8; (end - start) as usize];
        self.transfer(None, Some(&mut tmp), start, false)?;
        let s = (offset - start) as usize;
        buf.copy_from_slice(&tmp[s..s + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(&self.name, self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (start, end) = self.aligned(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            return self.transfer(Some(buf), None, offset, false);
        }
        self.write_unaligned(buf, offset, start, end)
    }
    fn flush(&self) -> Result<()> {
        match self.exec(
            "SYNCHRONIZE CACHE(16)",
            0,
            scsi::synchronize_cache16(),
            Dir::None,
            Vec::new(),
        ) {
            Err(LunError::Scsi { status, .. })
                if status.contains("invalid command operation code") =>
            {
                self.exec(
                    "SYNCHRONIZE CACHE(10)",
                    0,
                    scsi::synchronize_cache10(),
                    Dir::None,
                    Vec::new(),
                )
                .map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(&self.name, self.size(), offset, len)?;
        let bl = u64::from(self.info.block_len);
        if unmap
            && self.info.unmap
            && self.info.unmap_reads_zero
            && offset % bl == 0
            && len % bl == 0
        {
            let max = if self.info.max_unmap_blocks == 0 {
                1 << 16
            } else {
                u64::from(self.info.max_unmap_blocks)
            };
            let mut lba = offset / bl;
            let end = (offset + len) / bl;
            while lba < end {
                let n = (end - lba).min(max);
                let params = scsi::unmap_params(&[(lba, n as u32)]);
                self.exec(
                    "UNMAP",
                    lba * bl,
                    scsi::unmap(params.len() as u16),
                    Dir::Write,
                    params,
                )?;
                lba += n;
            }
            return Ok(());
        }
        let chunk = self.info.max_transfer.min(len.max(1));
        let zeros = vec![0u8; chunk as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    fn identity(&self) -> Result<String> {
        Ok(self.info.identity.clone())
    }
    fn has_compare_and_write(&self) -> bool {
        self.info.caw
    }
    fn compare_and_write_note(&self) -> Option<String> {
        self.info.caw_quirk.map(|q| {
            format!(
                "{} {} advertises COMPARE AND WRITE; not used: {q}",
                self.info.vendor, self.info.product
            )
        })
    }
    fn compare_and_write(&self, offset: u64, expect: &[u8], new: &[u8]) -> Result<CompareAndWrite> {
        if !self.info.caw {
            return Err(LunError::Unsupported {
                lun: self.name.clone(),
                what: "compare-and-write",
            });
        }
        check_caw(self, offset, expect, new)?;
        let mut data = Vec::with_capacity(expect.len() * 2);
        data.extend_from_slice(expect);
        data.extend_from_slice(new);
        let bl = u64::from(self.info.block_len);
        let cdb = scsi::compare_and_write(offset / bl, 1);
        let c = self.wait(self.submit(cdb.clone(), Dir::Write, data));
        let c = self.settle("COMPARE AND WRITE", offset, &cdb, Dir::Write, c, true)?;
        if c.status == ffi::STATUS_GOOD {
            return Ok(CompareAndWrite::Written);
        }
        // A miscompare. After a reconnect it may be our own first attempt,
        // applied before the connection dropped: then the sector holds `new`.
        let mut now = vec![0u8; new.len()];
        self.read_at(&mut now, offset)?;
        if now == new {
            Ok(CompareAndWrite::Written)
        } else {
            Ok(CompareAndWrite::Mismatch)
        }
    }
}

impl Drop for IscsiLun {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        eventfd_signal(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
