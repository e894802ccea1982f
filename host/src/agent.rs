//! The host agent: the `vmfs mount` process listens on its datastore's
//! control socket and runs the commands of this machine as this host (its
//! slot, its journal, its locks). One thread accepts; each connection has a
//! thread of its own (at most [`MAX_CLIENTS`] at once), so a slow or silent
//! client never holds up another, and a connection idle for
//! [`IDLE_TIMEOUT`] is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vmfs::Fs;

use crate::error::{HostError, Result};
use crate::ops;
use crate::proto::{self, Greeting, GreetingLine, Reply, Request};

pub const MAX_CLIENTS: usize = 16;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The commands of protocol version 1.
pub const COMMANDS: &[&str] = &[
    "status",
    "info",
    "hosts",
    "locks",
    "rdm-create",
    "rdm-info",
    "extend",
    "disk-create",
    "disk-info",
    "disk-snapshot",
    "disk-revert",
    "disk-consolidate",
    "disk-clone",
    "disk-import",
    "disk-export",
    "disk-resize",
    "disk-check",
    "disk-changed",
    "disk-delete",
    "disk-tracking",
    "disk-share",
    "scsi-add",
    "scsi-remove",
    "scsi-list",
    "vm-snapshot",
    "vm-consolidate",
];

/// What the agent serves.
pub struct Config {
    pub fs: Arc<Fs>,
    pub state_dir: PathBuf,
    pub mountpoint: PathBuf,
}

struct Shared {
    cfg: Config,
    greeting: Greeting,
    socket: PathBuf,
    stop: AtomicBool,
    clients: AtomicUsize,
    /// Requests being carried out now (the agent stops only after them).
    active: AtomicUsize,
    /// The paravirtual SCSI controllers this host serves.
    scsi: crate::scsi::Scsi,
}

/// A running agent; dropping it stops it and removes its socket.
pub struct Agent {
    shared: Arc<Shared>,
    listener_fd: i32,
    ino: u64,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Held (flock) while this agent serves the datastore.
    _lock: std::fs::File,
}

impl Agent {
    /// Bind the datastore's control socket (replacing a stale one) and serve.
    pub fn start(cfg: Config) -> Result<Agent> {
        let vol = cfg.fs.vol();
        let uuid = vmfs::volume::uuid_str(&vol.header.uuid);
        let (slot, host) = match cfg.fs.member() {
            Some(m) => (m.slot, vmfs::volume::uuid_str(&m.host)),
            None => (u32::MAX, String::new()),
        };
        let (listener, socket, ino, lock) = crate::socket::bind(&cfg.state_dir, &uuid)?;
        let greeting = Greeting {
            protocol: proto::VERSION,
            datastore: uuid,
            host,
            slot,
            pid: std::process::id(),
        };
        let scsi = crate::scsi::Scsi::new(cfg.fs.clone(), greeting.host.clone());
        let shared = Arc::new(Shared {
            scsi,
            cfg,
            greeting,
            socket: socket.clone(),
            stop: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        });
        // Requests of other hosts through the datastore (a backup proxy on
        // a machine with no network to this one): the commands a proxy
        // needs, carried out as this host.
        let weak = Arc::downgrade(&shared);
        shared
            .cfg
            .fs
            .set_mail_handler(Arc::new(move |r: vmfs::mailbox::Request| {
                let s = weak
                    .upgrade()
                    .ok_or_else(|| "the host agent is stopping".to_string())?;
                mail_command(&s, &r)
            }));
        // Snapshots that killed backup jobs left on this host's disks.
        let weak = Arc::downgrade(&shared);
        let every = shared
            .cfg
            .fs
            .member()
            .map(|m| (m.timeouts.lease * 4).max(Duration::from_secs(5)))
            .unwrap_or(Duration::from_secs(60));
        std::thread::Builder::new()
            .name("vmfs-janitor".into())
            .spawn(move || janitor(weak, every))
            .map_err(|e| HostError::io("starting the janitor thread", e))?;
        let listener_fd = listener.as_raw_fd();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vmfs-agent".into())
            .spawn(move || accept_loop(s, listener))
            .map_err(|e| HostError::io("starting the agent thread", e))?;
        tracing::info!("control socket {}", socket.display());
        Ok(Agent {
            shared,
            listener_fd,
            ino,
            thread: Some(thread),
            _lock: lock,
        })
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.shared.socket
    }
}

/// Every `every`, delete the snapshots killed backup jobs left on the
/// disks attached here (`Scsi::clean_abandoned`), until the agent stops.
fn janitor(shared: std::sync::Weak<Shared>, every: Duration) {
    let mut dead = Vec::new();
    loop {
        let t = std::time::Instant::now();
        while t.elapsed() < every {
            std::thread::sleep(Duration::from_millis(200));
            match shared.upgrade() {
                Some(s) if !s.stop.load(Ordering::SeqCst) => {}
                _ => return,
            }
        }
        let Some(s) = shared.upgrade() else { return };
        s.active.fetch_add(1, Ordering::SeqCst);
        // (Counted first, then checked: a stopping agent that saw no
        // request running has set `stop` before this looks.)
        if !s.stop.load(Ordering::SeqCst) {
            s.scsi.clean_abandoned(&mut dead);
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a stopping agent waits for the requests it is carrying out.
const DRAIN: Duration = Duration::from_secs(60);

impl Drop for Agent {
    /// Stop: refuse new requests, remove the socket, wait for the requests
    /// being carried out (the datastore is unmounted only after this).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Remove the socket only if it is still ours.
        if std::fs::metadata(&self.shared.socket).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.shared.socket);
        }
        // Wake the accept: shutdown makes it fail at once.
        // SAFETY: the listener's fd is open until the thread ends.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let t = std::time::Instant::now();
        while self.shared.active.load(Ordering::SeqCst) > 0 && t.elapsed() < DRAIN {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.shared.active.load(Ordering::SeqCst) > 0 {
            tracing::error!(
                "a control request was still running after {} s of unmounting",
                DRAIN.as_secs()
            );
        }
        // The guests' disks close before the datastore is unmounted.
        self.shared.scsi.stop_all();
    }
}

fn accept_loop(s: Arc<Shared>, l: UnixListener) {
    for c in l.incoming() {
        if s.stop.load(Ordering::SeqCst) {
            break;
        }
        let c = match c {
            Ok(c) => c,
            Err(e) => {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                tracing::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if s.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            s.clients.fetch_sub(1, Ordering::SeqCst);
            let e = HostError::Busy(format!(
                "this host serves {MAX_CLIENTS} control connections at once: try again"
            ));
            let _ = (&c).write_all(&Reply::err(&e, None).line());
            continue;
        }
        let s2 = s.clone();
        let r = std::thread::Builder::new()
            .name("vmfs-agent-conn".into())
            .spawn(move || {
                if let Err(e) = serve_conn(&s2, c) {
                    tracing::debug!("control connection ended: {e}");
                }
                s2.clients.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = r {
            s.clients.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("control socket: cannot start a connection thread: {e}");
        }
    }
}

fn serve_conn(s: &Shared, c: UnixStream) -> std::io::Result<()> {
    if let Err(why) = crate::socket::peer_allowed(&c) {
        tracing::warn!("control socket: refused a client: {why}");
        (&c).write_all(&Reply::err(&HostError::Permission(why), None).line())?;
        return Ok(());
    }
    c.set_read_timeout(Some(IDLE_TIMEOUT))?;
    c.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut g = serde_json::to_vec(&GreetingLine {
        greeting: s.greeting.clone(),
    })
    .unwrap_or_default();
    g.push(b'\n');
    (&c).write_all(&g)?;
    let mut r = BufReader::new(&c);
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        let n = (&mut r)
            .take(proto::MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(()); // the client closed
        }
        if line.last() != Some(&b'\n') {
            let e = if n >= proto::MAX_LINE {
                HostError::BadRequest(format!(
                    "request longer than {} bytes: closing the connection",
                    proto::MAX_LINE
                ))
            } else {
                HostError::BadRequest("request not ended by a newline".into())
            };
            (&c).write_all(&Reply::err(&e, None).line())?;
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match proto::parse_request(&line) {
            Ok(req) => {
                let id = req.id.clone();
                s.active.fetch_add(1, Ordering::SeqCst);
                let r = if s.stop.load(Ordering::SeqCst) {
                    Err(HostError::Busy(
                        "this host is unmounting the datastore: run the command again once it is unmounted".into(),
                    ))
                } else {
                    handle(s, &req)
                };
                s.active.fetch_sub(1, Ordering::SeqCst);
                match r {
                    Ok(v) => Reply::ok(v, id),
                    Err(e) => {
                        tracing::info!("control: {} failed: {e}", req.command);
                        Reply::err(&e, id)
                    }
                }
            }
            Err((e, id)) => Reply::err(&e, id),
        };
        (&c).write_all(&reply.line())?;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsArgs {
    #[serde(default = "two_seconds")]
    watch_ms: u64,
}

fn two_seconds() -> u64 {
    2000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RdmCreateArgs {
    url: String,
    mode: String,
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathArgs {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskCreateArgs {
    path: String,
    size: u64,
    #[serde(default = "thin")]
    provisioning: String,
    #[serde(default = "lsilogic")]
    adapter: String,
    #[serde(default = "yes")]
    change_tracking: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangedArgs {
    path: String,
    since: String,
    #[serde(default)]
    until: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackingArgs {
    path: String,
    on: bool,
}

fn thin() -> String {
    "thin".into()
}

fn lsilogic() -> String {
    "lsilogic".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckArgs {
    path: String,
    #[serde(default)]
    repair: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeArgs {
    path: String,
    size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneArgs {
    path: String,
    to: String,
    #[serde(default = "thin")]
    provisioning: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportArgs {
    raw: String,
    path: String,
    #[serde(default = "thin")]
    provisioning: String,
    #[serde(default = "lsilogic")]
    adapter: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportArgs {
    path: String,
    raw: String,
}

fn provisioning(s: &str) -> Result<snapshot::Provisioning> {
    snapshot::Provisioning::parse(s)
        .ok_or_else(|| HostError::BadRequest(format!("provisioning {s:?}: thin, lazy or eager")))
}

fn local_path(p: &str) -> Result<&str> {
    if !p.starts_with('/') {
        return Err(HostError::BadRequest(format!(
            "{p:?}: a raw image's path must be absolute (the host's working directory is not the caller's)"
        )));
    }
    Ok(p)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsolidateArgs {
    path: String,
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendArgs {
    lun: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketArgs {
    socket: String,
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| HostError::Agent(format!("encoding the reply: {e}")))
}

/// The request kind of a control command sent through the datastore
/// (`vmfs::mailbox`): body `{"command", "arguments"}`, answer the result.
pub const MAIL_COMMAND: u32 = 1;

/// The commands another host may ask this one through the datastore.
pub const MAIL_COMMANDS: &[&str] = &[
    "status",
    "disk-info",
    "disk-changed",
    "vm-snapshot",
    "vm-consolidate",
];

#[derive(Serialize, Deserialize)]
pub struct MailCommand {
    pub command: String,
    #[serde(default)]
    pub arguments: Value,
}

fn mail_command(s: &Shared, r: &vmfs::mailbox::Request) -> std::result::Result<Vec<u8>, String> {
    if r.kind != MAIL_COMMAND {
        return Err(format!("unknown request kind {}", r.kind));
    }
    let c: MailCommand = serde_json::from_slice(&r.body)
        .map_err(|e| format!("a request that is not understood: {e}"))?;
    if !MAIL_COMMANDS.contains(&c.command.as_str()) {
        return Err(format!(
            "{} is not a command other hosts may ask (only {})",
            c.command.chars().take(100).collect::<String>(),
            MAIL_COMMANDS.join(", ")
        ));
    }
    if s.stop.load(Ordering::SeqCst) {
        return Err("the host agent is stopping".into());
    }
    tracing::info!(
        "{} asked by host {} (slot {}) through the datastore",
        c.command,
        vmfs::volume::uuid_str(&r.from_host),
        r.from_slot
    );
    let req = Request {
        protocol: proto::VERSION,
        command: c.command,
        arguments: c.arguments,
        id: None,
    };
    s.active.fetch_add(1, Ordering::SeqCst);
    let out = handle(s, &req);
    s.active.fetch_sub(1, Ordering::SeqCst);
    match out {
        Ok(v) => serde_json::to_vec(&v).map_err(|e| e.to_string()),
        Err(e) => Err(format!("{} ({})", e, e.class())),
    }
}

/// Run one request as this host.
fn handle(s: &Shared, req: &Request) -> Result<Value> {
    let fs = &s.cfg.fs;
    let args = &req.arguments;
    let c = req.command.as_str();
    match c {
        "status" => {
            proto::arguments::<NoArgs>(c, args)?;
            to_value(status(s))
        }
        "info" => {
            proto::arguments::<NoArgs>(c, args)?;
            let slots = ops::disk_slots(&fs.vol())?;
            to_value(ops::info(fs, slots))
        }
        "hosts" => {
            let a: HostsArgs = proto::arguments(c, args)?;
            let watch = Duration::from_millis(a.watch_ms.min(60_000));
            to_value(ops::hosts(&fs.vol(), watch)?)
        }
        "locks" => {
            proto::arguments::<NoArgs>(c, args)?;
            let slots = ops::disk_slots(&fs.vol())?;
            to_value(ops::locks(fs, &slots)?)
        }
        "rdm-create" => {
            let a: RdmCreateArgs = proto::arguments(c, args)?;
            let mode = rdm::Mode::parse(&a.mode).ok_or_else(|| {
                HostError::BadRequest(format!("mode {:?}: virtual or physical", a.mode))
            })?;
            let t = fs.member().map(|m| m.timeouts).unwrap_or_default();
            let target = lun::open_with(&a.url, t.lun_options())?;
            let m = ops::rdm_mapping(&*target, mode, &fs.vol().luns)?;
            to_value(ops::rdm_create(fs, &m, &a.path)?)
        }
        "rdm-info" => {
            let a: PathArgs = proto::arguments(c, args)?;
            to_value(ops::rdm_info(fs, &a.path, &s.cfg.state_dir)?)
        }
        "extend" => {
            let a: ExtendArgs = proto::arguments(c, args)?;
            let t = fs.member().map(|m| m.timeouts).unwrap_or_default();
            let new = lun::open_with(&a.lun, t.lun_options())?;
            let checked = ops::check_new_extent(&new, a.force, &t)?;
            to_value(ops::extend(fs, new, checked)?)
        }
        "scsi-add" => {
            let a: crate::scsi::AddArgs = proto::arguments(c, args)?;
            to_value(s.scsi.add(&a)?)
        }
        "scsi-remove" => {
            let a: SocketArgs = proto::arguments(c, args)?;
            to_value(s.scsi.remove(&a.socket)?)
        }
        "scsi-list" => {
            proto::arguments::<NoArgs>(c, args)?;
            to_value(s.scsi.list())
        }
        "vm-snapshot" => {
            let a: crate::vm::SnapshotArgs = proto::arguments(c, args)?;
            to_value(s.scsi.vm_snapshot(&a)?)
        }
        "vm-consolidate" => {
            let a: crate::vm::ConsolidateArgs = proto::arguments(c, args)?;
            to_value(s.scsi.vm_consolidate(&a)?)
        }
        c if c.starts_with("disk-") => {
            // A disk attached to a controller here goes through it.
            let path = args.get("path").and_then(|p| p.as_str()).unwrap_or("");
            match s.scsi.disk_command(c, path, args) {
                Some(r) => r,
                None => disk_command(fs, c, args),
            }
        }
        _ => Err(HostError::UnknownCommand(
            req.command.chars().take(100).collect(),
            COMMANDS.join(", "),
        )),
    }
}

/// Run a `disk-*` command on `fs`: the agent's, and the CLI's when no
/// agent hosts the datastore (one decoding of the arguments for both).
pub fn disk_command(fs: &Arc<vmfs::Fs>, c: &str, args: &Value) -> Result<Value> {
    match c {
        "disk-create" => {
            let a: DiskCreateArgs = proto::arguments(c, args)?;
            to_value(ops::disk_create(
                fs,
                &a.path,
                a.size,
                provisioning(&a.provisioning)?,
                &a.adapter,
                a.change_tracking,
            )?)
        }
        "disk-changed" => {
            let a: ChangedArgs = proto::arguments(c, args)?;
            to_value(ops::disk_changed(
                fs,
                &a.path,
                &a.since,
                a.until.as_deref(),
            )?)
        }
        "disk-tracking" => {
            let a: TrackingArgs = proto::arguments(c, args)?;
            to_value(ops::disk_tracking(fs, &a.path, a.on)?)
        }
        "disk-share" => {
            let a: TrackingArgs = proto::arguments(c, args)?;
            to_value(ops::disk_share(fs, &a.path, a.on)?)
        }
        "disk-info" => {
            let a: PathArgs = proto::arguments(c, args)?;
            to_value(ops::disk_info(fs, &a.path)?)
        }
        "disk-snapshot" => {
            let a: PathArgs = proto::arguments(c, args)?;
            to_value(ops::disk_snapshot(fs, &a.path)?)
        }
        "disk-revert" => {
            let a: PathArgs = proto::arguments(c, args)?;
            to_value(ops::disk_revert(fs, &a.path)?)
        }
        "disk-check" => {
            let a: CheckArgs = proto::arguments(c, args)?;
            to_value(ops::disk_check(fs, &a.path, a.repair)?)
        }
        "disk-delete" => {
            let a: PathArgs = proto::arguments(c, args)?;
            to_value(ops::disk_delete(fs, &a.path)?)
        }
        "disk-resize" => {
            let a: ResizeArgs = proto::arguments(c, args)?;
            to_value(ops::disk_resize(fs, &a.path, a.size)?)
        }
        "disk-clone" => {
            let a: CloneArgs = proto::arguments(c, args)?;
            to_value(ops::disk_clone(
                fs,
                &a.path,
                &a.to,
                provisioning(&a.provisioning)?,
            )?)
        }
        "disk-import" => {
            let a: ImportArgs = proto::arguments(c, args)?;
            let p = provisioning(&a.provisioning)?;
            to_value(ops::disk_import(
                fs,
                local_path(&a.raw)?,
                &a.path,
                p,
                &a.adapter,
            )?)
        }
        "disk-export" => {
            let a: ExportArgs = proto::arguments(c, args)?;
            to_value(ops::disk_export(fs, &a.path, local_path(&a.raw)?)?)
        }
        "disk-consolidate" => {
            let a: ConsolidateArgs = proto::arguments(c, args)?;
            to_value(ops::disk_consolidate(fs, &a.path, a.all)?)
        }
        _ => Err(HostError::UnknownCommand(
            c.chars().take(100).collect(),
            COMMANDS.join(", "),
        )),
    }
}

fn status(s: &Shared) -> ops::Status {
    let fs = &s.cfg.fs;
    let (used, size) = fs.journal_use().unwrap_or((0, 0));
    let (generation, lease) = match fs.member() {
        Some(m) => (m.holder().generation, m.timeouts.lease.as_millis() as u64),
        None => (0, 0),
    };
    ops::Status {
        datastore: s.greeting.datastore.clone(),
        label: fs.vol().header.label.clone(),
        mountpoint: s.cfg.mountpoint.display().to_string(),
        host: s.greeting.host.clone(),
        slot: s.greeting.slot,
        generation,
        pid: s.greeting.pid,
        journal_used: used,
        journal_bytes: size,
        open_files: fs.open_files(),
        lease_ms: lease,
        socket: s.socket.display().to_string(),
        attached: s
            .scsi
            .list()
            .iter()
            .flat_map(|c| {
                c.luns.iter().map(move |l| {
                    format!(
                        "{} LUN {}: {}{}",
                        c.socket,
                        l.lun,
                        l.disk,
                        if c.connected {
                            ""
                        } else {
                            " (no guest connected)"
                        }
                    )
                })
            })
            .collect(),
    }
}
