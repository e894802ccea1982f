//! `vmfs backup attach` / `detach`: a VM's disks frozen and shown to
//! third-party backup tools, as VCB's proxy mount did. The freeze and
//! snapshot are the backup job's (`job.rs`: quiesce through the guest's
//! agent, every disk at one moment, thaw); then each frozen layer is
//! exposed read-only as a raw image file under a mountpoint (FUSE,
//! `mount.rs`) and, when asked, over NBD (`nbd.rs`), until `detach`
//! unmounts them and deletes the snapshots.
//!
//! The process that attaches stays as long as the disks are exposed (it
//! is the job: its snapshots are its own while it lives, and no other job
//! of the VM may start). `detach DIR` finds it through a record under the
//! state directory (`backup/attached/KEY.json`, KEY from DIR) and asks it
//! over its control socket (`KEY.sock`, one JSON line each way). If it was
//! killed, `detach` cleans up in its stead: the dead mount is detached and
//! the snapshots deleted, as the next backup of the VM would.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};
use crate::export::{unique_names, DataMap, Export};
use crate::image::Source;
use crate::job::{self, Coordinator, Frozen, Snapshot, VmJob};
use crate::mount::{ImagesFs, Mounted};
use crate::nbd::NbdServer;

fn invalid(s: impl Into<String>) -> BackupError {
    BackupError::Invalid(s.into())
}

/// What an attach shows, and how it was reached: written beside its
/// control socket for `detach` (and `vmfs backup attached`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub mountpoint: PathBuf,
    /// The process serving it (the job).
    pub pid: u32,
    pub name: String,
    /// The disks as given to attach, and as paths inside the datastore.
    pub disks: Vec<PathBuf>,
    pub paths: Vec<String>,
    /// The datastore's LUNs when the job joined it as a host of its own
    /// (else it went through this machine's host agent).
    #[serde(default)]
    pub datastore: Vec<String>,
    pub snapshots: Vec<Frozen>,
    /// What is shown, one per disk in the job's order.
    pub images: Vec<Image>,
    /// Seconds since the epoch.
    pub attached: u64,
    pub socket: PathBuf,
}

/// One frozen disk as shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    /// The NBD export's name.
    pub name: String,
    /// The raw image file (`MOUNTPOINT/NAME.img`).
    pub file: PathBuf,
    /// Its NBD URI, when served over NBD.
    pub nbd: Option<String>,
    pub size: u64,
    /// Bytes that may hold data (the rest reads as zeros).
    pub data: u64,
}

/// What `attach` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachReport {
    pub record: Record,
    pub snapshot: Snapshot,
    /// Snapshots killed jobs left, deleted first.
    pub cleaned: Vec<String>,
    pub warnings: Vec<String>,
}

/// What `detach` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachReport {
    pub mountpoint: PathBuf,
    /// The snapshots deleted.
    pub consolidated: Vec<String>,
    /// From the snapshots taken to deleted (0 when unknown: a dead job's).
    pub snapshot_lifetime_ms: f64,
    /// Whether the job had died and detach cleaned up in its stead.
    pub after_crash: bool,
}

/// Where this machine keeps its attach records.
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("backup").join("attached")
}

/// A mountpoint as records name it: absolute, with symlinks resolved when
/// it can be (a dead FUSE mount cannot be resolved: its absolute form).
fn normal(dir: &Path) -> PathBuf {
    dir.canonicalize()
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf())
}

fn key(mountpoint: &Path) -> String {
    let h = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    h.to_hex()[..16].to_string()
}

/// The record of the attach on `dir`, if any.
pub fn find(state_dir: &Path, dir: &Path) -> Result<Option<(PathBuf, Record)>> {
    let want = [normal(dir), std::path::absolute(dir).unwrap_or_default()];
    let d = records_dir(state_dir);
    let Ok(rd) = std::fs::read_dir(&d) else {
        return Ok(None);
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(t) = std::fs::read(&p) else { continue };
        match serde_json::from_slice::<Record>(&t) {
            Ok(r) if want.contains(&r.mountpoint) => return Ok(Some((p, r))),
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: ignoring a damaged attach record: {e}", p.display()),
        }
    }
    Ok(None)
}

/// Where the background process of an attach on `mountpoint` logs.
pub fn log_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    records_dir(state_dir).join(format!("{}.log", key(&normal(mountpoint))))
}

/// A VM's frozen disks, exposed.
pub struct Attached {
    record: Record,
    record_path: PathBuf,
    mounted: Mounted,
    server: Option<NbdServer>,
    taken: Instant,
    _lock: job::JobLock,
    /// The mountpoint's lock (`KEY.lock`), held for the attach's life.
    _place: std::fs::File,
}

/// Freeze and snapshot the VM's disks at `paths` through `host` (see
/// [`job::backup_vm`]), then expose the frozen layers on `mountpoint` (an
/// empty directory) and on `nbd` (`unix:PATH` or `HOST:PORT`). Whatever
/// fails after the snapshot deletes it again. `datastore`: the LUNs the job
/// joined as a host of its own (recorded for `detach`), empty when `host`
/// is this machine's host agent.
pub fn attach(
    job: &VmJob,
    host: &dyn Coordinator,
    paths: &[String],
    mountpoint: &Path,
    nbd: Option<&str>,
    datastore: &[String],
) -> Result<(Attached, AttachReport)> {
    crate::util::check_name("backup name", &job.name)?;
    if paths.is_empty() || paths.len() != job.disks.len() {
        return Err(invalid("no disk given"));
    }
    let mountpoint = normal(mountpoint);
    if !mountpoint.is_dir() {
        return Err(invalid(format!(
            "{}: not a directory",
            mountpoint.display()
        )));
    }
    if let Some((_, r)) = find(&job.state_dir, &mountpoint)? {
        if UnixStream::connect(&r.socket).is_ok() {
            return Err(invalid(format!(
                "{}: the disks of {} are attached there already (process {}): detach them first",
                mountpoint.display(),
                r.name,
                r.pid
            )));
        }
    }
    let dir = records_dir(&job.state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
    let k = key(&mountpoint);
    // One attach per mountpoint, from here to its end (two attaches of
    // different VMs would otherwise race for the record and the socket).
    let Some(place) = crate::util::try_lock_file(&dir.join(format!("{k}.lock")))? else {
        return Err(invalid(format!(
            "{}: another attach is using this mountpoint",
            mountpoint.display()
        )));
    };
    let lock = job::lock(&job.state_dir, &job.name)?;
    let cleaned = job::clean_leftovers(host, paths)?;
    let mut warnings = Vec::new();
    let snap = job::snapshot_vm(job, host, paths, &mut warnings)?;
    let taken = Instant::now();
    let r = expose(job, host, paths, &snap, &mountpoint, nbd);
    let (mounted, server, exports) = match r {
        Ok(x) => x,
        Err(e) => {
            if let Err(d) = job::consolidate(host, &snap.disks) {
                tracing::error!("deleting the snapshots after a failed attach: {d}");
            }
            return Err(e);
        }
    };
    let uris = server.as_ref().map(|s| s.uris()).unwrap_or_default();
    let images = exports
        .iter()
        .enumerate()
        .map(|(i, e)| Image {
            name: e.name.clone(),
            file: mountpoint.join(e.file_name()),
            nbd: uris.get(i).cloned(),
            size: e.map.size(),
            data: e.map.data_bytes(),
        })
        .collect();
    let record = Record {
        images,
        mountpoint,
        pid: std::process::id(),
        name: job.name.clone(),
        disks: job.disks.clone(),
        paths: paths.to_vec(),
        datastore: datastore.to_vec(),
        snapshots: snap.disks.clone(),
        attached: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        socket: dir.join(format!("{k}.sock")),
    };
    let record_path = dir.join(format!("{k}.json"));
    let a = Attached {
        record: record.clone(),
        record_path,
        mounted,
        server,
        taken,
        _lock: lock,
        _place: place,
    };
    Ok((
        a,
        AttachReport {
            record,
            snapshot: snap,
            cleaned,
            warnings,
        },
    ))
}

/// Open each frozen layer, mount the files, start the NBD server.
fn expose(
    job: &VmJob,
    host: &dyn Coordinator,
    paths: &[String],
    snap: &Snapshot,
    mountpoint: &Path,
    nbd: Option<&str>,
) -> Result<(Mounted, Option<NbdServer>, Vec<Export>)> {
    let norm = |p: &str| p.trim_matches('/').to_string();
    let mut names = Vec::new();
    let mut layers = Vec::new();
    for f in &snap.disks {
        let Some(i) = paths.iter().position(|p| norm(p) == norm(&f.path)) else {
            return Err(invalid(format!(
                "the host snapshotted {}, which is not a disk of the job",
                f.path
            )));
        };
        names.push(crate::image::name_of(&job.disks[i], ".vmdk"));
        layers.push(host.open_layer(&f.path, &f.frozen)?);
    }
    let mut exports = Vec::new();
    for (name, layer) in unique_names(&names).into_iter().zip(layers) {
        let map = DataMap::new(layer.size(), layer.allocated()?);
        exports.push(Export {
            name,
            map: Arc::new(map),
            image: Arc::new(layer),
        });
    }
    let fs = ImagesFs::new(exports.clone(), SystemTime::now());
    let mounted = crate::mount::mount(fs, &format!("vmfs-attach:{}", job.name), mountpoint)?;
    let server = match nbd {
        Some(a) => Some(NbdServer::start(a, exports.clone())?),
        None => None,
    };
    Ok((mounted, server, exports))
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    command: String,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    #[serde(default)]
    ok: Option<DetachReport>,
    #[serde(default)]
    error: Option<String>,
}

impl Attached {
    /// Stop showing the disks and delete their snapshots. Not `force`:
    /// refused (and nothing changed) while a process uses the mount;
    /// `force`: the mount is detached lazily, NBD clients cut off.
    fn detach(&mut self, host: &dyn Coordinator, force: bool) -> Result<DetachReport> {
        if !force {
            if let Some(n) = self
                .server
                .as_ref()
                .map(|s| s.connections())
                .filter(|n| *n > 0)
            {
                return Err(invalid(format!(
                    "{n} NBD client(s) are reading the disks: detach once they are done (or --force)"
                )));
            }
        }
        self.mounted.unmount(force)?;
        if let Some(s) = self.server.take() {
            s.stop();
        }
        // (The layers were the exports', dropped with the mount and the
        // server: nothing holds them open now.)
        let lifetime = self.taken.elapsed();
        job::consolidate(host, &self.record.snapshots)?;
        Ok(DetachReport {
            mountpoint: self.record.mountpoint.clone(),
            consolidated: self
                .record
                .snapshots
                .iter()
                .map(|f| format!("{}: {}", f.path, f.frozen))
                .collect(),
            snapshot_lifetime_ms: lifetime.as_secs_f64() * 1000.0,
            after_crash: false,
        })
    }

    /// Serve `detach` requests on the control socket until one succeeds,
    /// or `stop` is set (a signal: then detach with force). `ready` is
    /// called once the record and socket are in place.
    pub fn serve(
        mut self,
        host: &dyn Coordinator,
        stop: Arc<AtomicBool>,
        ready: impl FnOnce(),
    ) -> Result<DetachReport> {
        let sock = self.record.socket.clone();
        let l = match self.publish() {
            Ok(l) => l,
            // Nobody could find this attach to end it: end it now.
            Err(e) => {
                if let Err(d) = self.detach(host, true) {
                    tracing::error!("undoing the attach: {d}");
                }
                let _ = std::fs::remove_file(&sock);
                let _ = std::fs::remove_file(&self.record_path);
                return Err(e);
            }
        };
        ready();
        let done = loop {
            if stop.load(Ordering::SeqCst) {
                tracing::warn!("stopped: detaching {}", self.record.mountpoint.display());
                break self.detach(host, true);
            }
            let (mut s, _) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => {
                    tracing::warn!("{}: {e}", sock.display());
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut line = String::new();
            let req = BufReader::new((&s).take(64 << 10))
                .read_line(&mut line)
                .map_err(|e| e.to_string())
                .and_then(|_| serde_json::from_str::<Request>(&line).map_err(|e| e.to_string()));
            let (reply, finished) = match req {
                Ok(r) if r.command == "detach" => match self.detach(host, r.force) {
                    Ok(rep) => (
                        Reply {
                            ok: Some(rep.clone()),
                            error: None,
                        },
                        Some(Ok(rep)),
                    ),
                    // Not unmounted (busy): nothing changed, still attached.
                    Err(e) if self.server.is_some() || !self.mounted.is_unmounted() => (
                        Reply {
                            ok: None,
                            error: Some(e.to_string()),
                        },
                        None,
                    ),
                    // Unmounted, but deleting the snapshots failed: the
                    // record stays for `detach` to retry as after a crash.
                    Err(e) => (
                        Reply {
                            ok: None,
                            error: Some(format!(
                                "the disks are no longer shown, but deleting their snapshots failed (detach again, or the next backup of the VM deletes them): {e}"
                            )),
                        },
                        Some(Err(e)),
                    ),
                },
                Ok(r) => (
                    Reply {
                        ok: None,
                        error: Some(format!("unknown command {:?}", r.command)),
                    },
                    None,
                ),
                Err(e) => (
                    Reply {
                        ok: None,
                        error: Some(format!("bad request: {e}")),
                    },
                    None,
                ),
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let _ = s.write_all(&out);
            if let Some(d) = finished {
                break d;
            }
        };
        let _ = std::fs::remove_file(&sock);
        if done.is_ok() {
            let _ = std::fs::remove_file(&self.record_path);
        }
        done
    }

    /// The control socket (listening) and the record beside it.
    fn publish(&self) -> Result<UnixListener> {
        let sock = &self.record.socket;
        let _ = std::fs::remove_file(sock);
        let l = crate::nbd::with_private_umask(|| UnixListener::bind(sock))
            .map_err(|e| invalid(format!("{}: {e}", sock.display())))?;
        let _ = std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600));
        l.set_nonblocking(true)
            .map_err(|e| invalid(format!("{}: {e}", sock.display())))?;
        let text = serde_json::to_vec_pretty(&self.record).map_err(|e| invalid(e.to_string()))?;
        let tmp = self.record_path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &self.record_path))
            .map_err(|e| invalid(format!("{}: {e}", self.record_path.display())))?;
        Ok(l)
    }
}

/// How `detach` went when asked of the attaching process.
pub enum Asked {
    Done(DetachReport),
    /// The process is gone (killed): the caller cleans up with
    /// [`cleanup_dead`].
    Dead(PathBuf, Record),
}

/// `vmfs backup detach DIR`: ask the process serving DIR to detach.
pub fn detach(state_dir: &Path, dir: &Path, force: bool) -> Result<Asked> {
    let Some((path, r)) = find(state_dir, dir)? else {
        return Err(invalid(format!(
            "nothing is attached on {} (no record under {})",
            dir.display(),
            records_dir(state_dir).display()
        )));
    };
    let mut s = match UnixStream::connect(&r.socket) {
        Ok(s) => s,
        Err(e) => {
            // Dead only when nobody listens and its process is gone (a
            // socket we may not open is not a dead attach).
            let refused = matches!(
                e.raw_os_error(),
                Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
            );
            if refused && process_gone(r.pid) {
                return Ok(Asked::Dead(path, r));
            }
            return Err(invalid(format!(
                "the attach process {} of {} does not answer on {}: {e}",
                r.pid,
                r.mountpoint.display(),
                r.socket.display()
            )));
        }
    };
    let mut req = serde_json::to_vec(&Request {
        command: "detach".into(),
        force,
    })
    .map_err(|e| invalid(e.to_string()))?;
    req.push(b'\n');
    s.write_all(&req)
        .map_err(|e| invalid(format!("{}: {e}", r.socket.display())))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| invalid(format!("{}: {e}", r.socket.display())))?;
    if line.is_empty() {
        return Err(invalid(format!(
            "the attach process {} closed its socket without an answer (see its log)",
            r.pid
        )));
    }
    let rep: Reply = serde_json::from_str(&line)
        .map_err(|e| invalid(format!("the attach process's answer: {e}")))?;
    match (rep.ok, rep.error) {
        (Some(d), _) => Ok(Asked::Done(d)),
        (None, Some(e)) => Err(invalid(e)),
        (None, None) => Err(invalid("the attach process answered nothing")),
    }
}

/// Clean up after an attach whose process died: detach its dead mount and
/// delete its snapshots through `host` (the dead job's snapshots are
/// anybody's now), then forget the record.
pub fn cleanup_dead(
    record_path: &Path,
    r: &Record,
    host: &dyn Coordinator,
) -> Result<DetachReport> {
    // Only our own dead mount (the path may hold something else by now).
    if ours_mounted_at(&r.mountpoint) {
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&r.mountpoint)
            .stderr(std::process::Stdio::null())
            .status();
    }
    let mut done = Vec::new();
    for f in &r.snapshots {
        match host.left(&f.path)? {
            // Still there (the marker names it): delete it.
            Some(m) if m.frozen == f.frozen && m.cid == f.cid => {
                job::consolidate(host, std::slice::from_ref(f))?;
                done.push(format!("{}: {}", f.path, f.frozen));
            }
            // Deleted already (by a backup of the VM, or the host).
            _ => {}
        }
    }
    let _ = std::fs::remove_file(&r.socket);
    let _ = std::fs::remove_file(record_path);
    Ok(DetachReport {
        mountpoint: r.mountpoint.clone(),
        consolidated: done,
        snapshot_lifetime_ms: 0.0,
        after_crash: true,
    })
}

/// Whether an attach's view (mount source `vmfs-attach:NAME`) is mounted
/// at `dir`.
fn ours_mounted_at(dir: &Path) -> bool {
    let Ok(t) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.as_os_str().to_string_lossy();
    t.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        // After " - ": the type, then the source.
        let source = l.split(" - ").nth(1).and_then(|x| x.split(' ').nth(1));
        f.get(4) == Some(&want.as_ref()) && source.is_some_and(|s| s.starts_with("vmfs-attach:"))
    })
}

/// Whether process `pid` has ended: no such process, or a zombie nobody
/// has reaped yet (a killed attach's parent exited long ago).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's closing parenthesis.
        Ok(st) => st
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}
