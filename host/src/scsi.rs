//! The host's paravirtual SCSI controllers: `vmfs scsi add/remove/list`,
//! and the disk operations that must go through a controller while its
//! guest runs (snapshot, consolidate and resize pause the disk's I/O;
//! revert and delete are refused). One registry per host agent; a disk is
//! attached to at most one controller of this host, and opened for writing
//! with this host's identity, so a disk in use on another host is refused
//! naming that host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hypervisor_io::backend::Backend;
use hypervisor_io::prstore::FilePrStore;
use hypervisor_io::rdmlun::{RdmPassthrough, RdmUnit};
use hypervisor_io::scsi::disk::Counters;
use hypervisor_io::scsi::disk::DiskUnit;
use hypervisor_io::scsi::pr::{MemPrStore, PrStore};
use hypervisor_io::scsi::target::Target;
use hypervisor_io::scsi::target::Unit;
use hypervisor_io::vdisk::VirtualDisk;
use hypervisor_io::virtio::{Config, Controller};
use serde::{Deserialize, Serialize};
use vmfs::Fs;

use crate::error::{HostError, Result};
use crate::ops::{self, DiskDone};

struct Lun {
    lun: u16,
    path: String,
    storage: Storage,
    unit: Unit,
}

/// What a LUN is.
enum Storage {
    /// A virtual disk (a chain).
    Disk(Arc<VirtualDisk>),
    /// A virtual-mode raw device mapping, emulated over the mapped LUN.
    Rdm(Arc<RdmUnit>),
    /// A physical-mode raw device mapping: commands pass through.
    Pass(Arc<RdmPassthrough>),
}

impl Storage {
    /// (size, thin)
    fn shape(&self) -> (u64, bool) {
        match self {
            Storage::Disk(d) => (d.capacity(), d.thin()),
            Storage::Rdm(r) => (r.capacity(), false),
            Storage::Pass(p) => (p.size(), false),
        }
    }

    fn close(&self) -> Result<()> {
        match self {
            Storage::Disk(d) => d.close().map_err(ops::disk_err),
            Storage::Rdm(r) => Ok(r.close()?),
            Storage::Pass(p) => Ok(p.close()?),
        }
    }
}

struct Attached {
    ctl: Controller,
    luns: Vec<Lun>,
    /// The guest's qemu-guest-agent socket (`scsi add --guest-agent`).
    agent: Option<PathBuf>,
}

/// This host's controllers, by socket path.
pub struct Scsi {
    fs: Arc<Fs>,
    host: String,
    ctls: Mutex<BTreeMap<PathBuf, Attached>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LunInfo {
    pub lun: u16,
    pub disk: String,
    pub size: u64,
    pub thin: bool,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub discards: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerInfo {
    pub socket: String,
    pub queues: usize,
    pub connected: bool,
    pub connections: u64,
    pub inflight: usize,
    pub luns: Vec<LunInfo>,
    #[serde(default)]
    pub guest_agent: Option<String>,
}

/// Options of `scsi add`.
#[derive(Debug, Clone, Deserialize)]
pub struct AddArgs {
    pub socket: String,
    #[serde(default = "one")]
    pub queues: usize,
    pub disks: Vec<String>,
    /// The guest's qemu-guest-agent socket, for quiesced snapshots.
    #[serde(default)]
    pub guest_agent: Option<String>,
}

fn one() -> usize {
    1
}

impl Scsi {
    pub fn new(fs: Arc<Fs>, host: String) -> Scsi {
        Scsi {
            fs,
            host,
            ctls: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn fs(&self) -> &Arc<Fs> {
        &self.fs
    }

    /// This host's UUID.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// The virtual disk `path` as attached here (its path as attached,
    /// the disk, its controller's guest agent), `None` when not attached;
    /// an error for a raw device mapping (which has no snapshots).
    pub(crate) fn attached_disk(
        &self,
        path: &str,
    ) -> Result<Option<(String, Arc<VirtualDisk>, Option<PathBuf>)>> {
        let map = self.lock();
        let Some((socket, lun)) = Self::find(&map, path) else {
            return Ok(None);
        };
        let Some(att) = map.get(&socket) else {
            return Ok(None);
        };
        let Some(l) = att.luns.iter().find(|l| l.lun == lun) else {
            return Ok(None);
        };
        match &l.storage {
            Storage::Disk(d) => Ok(Some((l.path.clone(), d.clone(), att.agent.clone()))),
            _ => Err(HostError::BadRequest(format!(
                "{path} is a raw device mapping (LUN {lun} of {}): it has no snapshots; leave it out",
                socket.display()
            ))),
        }
    }

    /// The datastore paths of the virtual disks attached here.
    pub(crate) fn attached_paths(&self) -> Vec<String> {
        let map = self.lock();
        map.values()
            .flat_map(|a| a.luns.iter())
            .filter(|l| matches!(l.storage, Storage::Disk(_)))
            .map(|l| l.path.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Attached>> {
        self.ctls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_unit(&self, path: &str) -> Result<(Storage, Unit)> {
        let ino = self.fs.resolve(path.trim_start_matches('/'))?;
        let inode = self.fs.getattr(ino)?;
        if inode.flags & vmfs::format::FD_FLAG_RDM != 0 {
            let m = self.fs.mapping_of(&inode)?;
            if m.mode == rdm::Mode::Physical {
                let p = Arc::new(RdmPassthrough::open(
                    &self.fs,
                    path.trim_start_matches('/'),
                )?);
                // Only a LUN that speaks SCSI can take the guest's commands.
                let probe = [0u8; 6];
                let mut v = Vec::new();
                use hypervisor_io::scsi::target::RawUnit;
                let o = p.execute(
                    &probe,
                    hypervisor_io::scsi::disk::Buffers {
                        data_out: &[],
                        data_in: &mut v,
                        data_in_max: 0,
                    },
                );
                if o == hypervisor_io::scsi::disk::Outcome::Check(
                    hypervisor_io::scsi::sense::Sense::INTERNAL_TARGET_FAILURE,
                ) {
                    let _ = p.close();
                    return Err(HostError::BadRequest(format!(
                        "{path} is a physical-mode raw device mapping whose LUN does not take SCSI commands (a file or NBD LUN): map it in virtual mode"
                    )));
                }
                return Ok((Storage::Pass(p.clone()), Unit::Raw(p)));
            }
            let r = Arc::new(RdmUnit::open(&self.fs, path.trim_start_matches('/'), &m)?);
            let unit = Arc::new(DiskUnit::new(
                path.to_string(),
                r.clone() as Arc<dyn Backend>,
                Arc::new(MemPrStore::default()),
            ));
            return Ok((Storage::Rdm(r), Unit::Emulated(unit)));
        }
        let (store, name) = ops::store_for(&self.fs, path)?;
        let disk = Arc::new(VirtualDisk::open(store.clone(), &name, path).map_err(ops::disk_err)?);
        // A shared disk's reservations are seen by every host that serves
        // it; a disk only this host can open keeps them in memory.
        let pr: Arc<dyn PrStore> = if disk.shared() {
            let stem = snapshot::ops::stem(&name).map_err(ops::disk_err)?;
            Arc::new(FilePrStore::open(store, stem).map_err(ops::disk_err)?)
        } else {
            Arc::new(MemPrStore::default())
        };
        let unit = Arc::new(DiskUnit::new(
            path.to_string(),
            disk.clone() as Arc<dyn Backend>,
            pr,
        ));
        Ok((Storage::Disk(disk), Unit::Emulated(unit)))
    }

    /// Where `path` is attached: controller socket and LUN.
    fn find(map: &BTreeMap<PathBuf, Attached>, path: &str) -> Option<(PathBuf, u16)> {
        let norm = |p: &str| p.trim_matches('/').to_string();
        map.iter().find_map(|(s, a)| {
            a.luns
                .iter()
                .find(|l| norm(&l.path) == norm(path))
                .map(|l| (s.clone(), l.lun))
        })
    }

    /// `scsi add`: a new controller with `disks` as LUNs 0..; or, on a
    /// controller that exists, the disks as new LUNs (hot-plugged into a
    /// running guest).
    pub fn add(&self, a: &AddArgs) -> Result<ControllerInfo> {
        let socket = PathBuf::from(&a.socket);
        if !socket.is_absolute() {
            return Err(HostError::BadRequest(format!(
                "the controller socket {} must be an absolute path",
                a.socket
            )));
        }
        if a.disks.is_empty() {
            return Err(HostError::BadRequest("scsi add: no disk given".into()));
        }
        if let Some(g) = a
            .guest_agent
            .as_ref()
            .filter(|g| !Path::new(g).is_absolute())
        {
            return Err(HostError::BadRequest(format!(
                "the guest agent's socket {g} must be an absolute path"
            )));
        }
        let mut map = self.lock();
        for d in &a.disks {
            if let Some((s, lun)) = Self::find(&map, d) {
                return Err(HostError::Busy(format!(
                    "{d} is already attached to the controller {} as LUN {lun}",
                    s.display()
                )));
            }
        }
        let mut opened = Vec::new();
        for d in &a.disks {
            match self.open_unit(d) {
                Ok((storage, unit)) => opened.push((d.clone(), storage, unit)),
                Err(e) => {
                    for (p, s, _) in &opened {
                        if let Err(e) = s.close() {
                            tracing::error!("{p}: closing: {e}");
                        }
                    }
                    return Err(e);
                }
            }
        }
        if let Some(att) = map.get_mut(&socket) {
            if let Some(g) = &a.guest_agent {
                att.agent = Some(PathBuf::from(g));
            }
            for (path, storage, unit) in opened {
                let lun = (0..hypervisor_io::scsi::target::MAX_LUNS)
                    .find(|l| att.luns.iter().all(|x| x.lun != *l))
                    .ok_or_else(|| HostError::Busy("the controller has no free LUN".into()))?;
                att.ctl.add_lun(lun, unit.clone());
                tracing::info!("{}: {path} added as LUN {lun}", socket.display());
                att.luns.push(Lun {
                    lun,
                    path,
                    storage,
                    unit,
                });
            }
            return Ok(info(&socket, att));
        }
        if socket.exists() {
            // Ours are in the map; anything else there is not to be taken over.
            let live = std::os::unix::net::UnixStream::connect(&socket).is_ok();
            if live {
                return Err(HostError::Busy(format!(
                    "{} is a socket something else listens on",
                    socket.display()
                )));
            }
        }
        let target = Arc::new(Target::new());
        let mut luns = Vec::new();
        for (i, (path, storage, unit)) in opened.into_iter().enumerate() {
            match &unit {
                Unit::Emulated(u) => target.add(i as u16, u.clone()),
                Unit::Raw(r) => target.add_raw(i as u16, r.clone()),
            }
            luns.push(Lun {
                lun: i as u16,
                path,
                storage,
                unit,
            });
        }
        let name = socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ctl = Controller::start(
            Config {
                socket: socket.clone(),
                request_queues: a.queues.clamp(1, 16),
                io_threads: (a.queues * 4).clamp(4, 16),
                nexus: format!("{}/{name}", self.host),
            },
            target,
        )
        .map_err(|e| {
            HostError::io(
                format!("starting the controller on {}", socket.display()),
                e,
            )
        })?;
        let att = Attached {
            ctl,
            luns,
            agent: a.guest_agent.as_ref().map(PathBuf::from),
        };
        let i = info(&socket, &att);
        map.insert(socket, att);
        Ok(i)
    }

    /// `scsi remove`: refused while a guest is connected.
    pub fn remove(&self, socket: &str) -> Result<ControllerInfo> {
        let socket = PathBuf::from(socket);
        let mut map = self.lock();
        let Some(att) = map.get(&socket) else {
            return Err(HostError::NotFound(format!(
                "no controller of this host listens on {}",
                socket.display()
            )));
        };
        if att.ctl.connected() {
            return Err(HostError::Busy(format!(
                "a guest is connected to {}: stop it first",
                socket.display()
            )));
        }
        if let Some(l) = att
            .luns
            .iter()
            .find(|l| matches!(&l.storage, Storage::Disk(d) if d.busy()))
        {
            return Err(HostError::Busy(format!(
                "{} (LUN {}) is being snapshotted, consolidated or resized: try again when that ends",
                l.path, l.lun
            )));
        }
        let att = map.remove(&socket).expect("just found");
        let i = info(&socket, &att);
        att.ctl.stop();
        close_all(&att.luns)?;
        Ok(i)
    }

    pub fn list(&self) -> Vec<ControllerInfo> {
        self.lock().iter().map(|(s, a)| info(s, a)).collect()
    }

    /// Stop every controller (the host is stopping).
    pub fn stop_all(&self) {
        let map = std::mem::take(&mut *self.lock());
        for (s, a) in map {
            tracing::info!("stopping the controller on {}", s.display());
            a.ctl.stop();
            if let Err(e) = close_all(&a.luns) {
                tracing::error!("{e}");
            }
        }
    }

    /// A disk command on a disk attached here, carried out through its
    /// controller; `None` when the disk is not attached.
    pub fn disk_command(
        &self,
        c: &str,
        path: &str,
        args: &serde_json::Value,
    ) -> Option<Result<serde_json::Value>> {
        let map = self.lock();
        let (socket, lun) = Self::find(&map, path)?;
        let att = map.get(&socket)?;
        let l = att.luns.iter().find(|l| l.lun == lun)?;
        let Storage::Disk(disk) = &l.storage else {
            return Some(Err(HostError::Busy(format!(
                "{path} is a raw device mapping attached to {} as LUN {lun}: {c} is refused while it is attached",
                socket.display()
            ))));
        };
        let busy = || {
            Some(Err(HostError::Busy(format!(
                "{path} is attached to the running controller {} as LUN {lun}: {c} is refused while it is attached",
                socket.display()
            ))))
        };
        if matches!(
            c,
            "disk-revert"
                | "disk-delete"
                | "disk-import"
                | "disk-tracking"
                | "disk-share"
                | "disk-check"
        ) {
            // (A check would read, or with --repair finish, the merge a
            // running consolidation is making.)
            return busy();
        }
        if !matches!(c, "disk-snapshot" | "disk-consolidate" | "disk-resize") {
            return None;
        }
        let Some(op) = disk.begin_op() else {
            return Some(Err(HostError::Busy(format!(
                "{path}: another snapshot, consolidation or resize of it is running; try again when it ends"
            ))));
        };
        // A merge its host did not finish: with the guest running first.
        if let Err(e) = crate::online::finish_interrupted(&l.path, &op) {
            return Some(Err(e));
        }
        let r = match c {
            "disk-snapshot" => self.paused(l, &op, "snapshot", |store, name| {
                let s = snapshot::ops::snapshot(store, name)?;
                Ok((s.said(), s.change_id.map(|i| i.to_string())))
            }),
            "disk-consolidate" => {
                if let Err(e) = crate::vm::refuse_while_backed_up(&self.fs, path) {
                    return Some(Err(e));
                }
                let all = args.get("all").and_then(|v| v.as_bool()).unwrap_or(false);
                // Merging can take minutes: the registry is not held (the
                // operation keeps the controller from being removed).
                let path = l.path.clone();
                drop(map);
                crate::online::consolidate(&path, &op, all)
            }
            _ => {
                let Some(size) = args.get("size").and_then(|v| v.as_u64()) else {
                    return Some(Err(HostError::BadRequest("disk-resize: size".into())));
                };
                let r = self.paused(l, &op, "resize", |store, name| {
                    snapshot::ops::resize(store, name, size)?;
                    Ok((format!("grown to {size} bytes"), None))
                });
                if r.is_ok() {
                    att.ctl.capacity_changed(lun);
                }
                r
            }
        };
        Some(r.and_then(|d| {
            serde_json::to_value(d)
                .map_err(|e| HostError::Agent(format!("encoding the reply: {e}")))
        }))
    }

    /// Run `op` on an attached disk with its I/O held; the pause is logged.
    fn paused(
        &self,
        l: &Lun,
        disk: &VirtualDisk,
        what: &str,
        op: impl FnOnce(Arc<dyn snapshot::Store>, &str) -> snapshot::Result<(String, Option<String>)>,
    ) -> Result<DiskDone> {
        let store = disk.store().clone();
        let name = disk.name().to_string();
        let (r, held) = disk.with_closed(|| op(store.clone(), &name));
        tracing::info!(
            "{}: {what} with the guest's I/O held for {:.1} ms",
            l.path,
            held.as_secs_f64() * 1000.0
        );
        let (said, change_id) = r.map_err(ops::disk_err)?;
        Ok(DiskDone {
            path: l.path.clone(),
            said: format!(
                "{said} (guest I/O held {:.1} ms)",
                held.as_secs_f64() * 1000.0
            ),
            depth: disk.depth(),
            change_id,
        })
    }
}

/// Close every disk of a stopped controller (each is tried; the first
/// failure is returned).
fn close_all(luns: &[Lun]) -> Result<()> {
    let mut first = None;
    for l in luns {
        if let Err(e) = l.storage.close() {
            tracing::error!("{}: closing: {e}", l.path);
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

static NO_COUNTERS: std::sync::LazyLock<Counters> = std::sync::LazyLock::new(Counters::default);

fn info(socket: &Path, a: &Attached) -> ControllerInfo {
    let s = a.ctl.shared();
    ControllerInfo {
        socket: socket.display().to_string(),
        queues: s.request_queues,
        connected: a.ctl.connected(),
        connections: s.connections.load(Ordering::Relaxed),
        inflight: s.inflight.count(),
        guest_agent: a.agent.as_ref().map(|p| p.display().to_string()),
        luns: a
            .luns
            .iter()
            .map(|l| {
                let c = match (&l.unit, &l.storage) {
                    (Unit::Emulated(u), _) => &u.counters,
                    (_, Storage::Pass(p)) => &p.counters,
                    _ => &NO_COUNTERS,
                };
                let (size, thin) = l.storage.shape();
                LunInfo {
                    lun: l.lun,
                    disk: l.path.clone(),
                    size,
                    thin,
                    reads: c.reads.load(Ordering::Relaxed),
                    writes: c.writes.load(Ordering::Relaxed),
                    read_bytes: c.read_bytes.load(Ordering::Relaxed),
                    write_bytes: c.write_bytes.load(Ordering::Relaxed),
                    discards: c.discards.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                }
            })
            .collect(),
    }
}
