//! The agentless backup of one virtual machine (`vmfs backup vm`): ask the
//! host that serves the VM's disks to snapshot them all at one moment
//! (quiesced through the guest's agent when it has one), read each frozen
//! layer (only what changed since the last backup's change ID), store it
//! in the repository, and delete the snapshots, whatever happened.
//!
//! The host does the freeze, the snapshots and the thaw inside one request
//! (`vm-snapshot`, `host/src/vm.rs`), so the guest is never left frozen by
//! a job that dies. A job that dies leaves its snapshots (each named by a
//! marker beside its disk): the next job of the VM deletes them first.
//! Two jobs of one VM on this machine at once: the second is refused.
//!
//! Where the job runs (the proxy) decides how it reaches the disks
//! ([`Coordinator`]): on the machine that hosts the datastore
//! (`vmfs mount`), through that host's control socket and mount; anywhere
//! else that sees the LUNs, as a host of the datastore of its own, asking
//! the host that holds the disks through the datastore itself
//! (`vmfs::mailbox`) and reading the frozen layers straight from the LUNs
//! (a disk no host holds, the VM being off, it snapshots itself).

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use host::vm::{ConsolidateArgs, Frozen, Snapshot, SnapshotArgs};
use serde::Serialize;
use serde_json::Value;

use crate::backup::{DiskJob, Options};
use crate::error::{BackupError, Result};
use crate::image::{Changed, Source, VDisk};
use crate::manifest::Manifest;
use crate::repo::Repo;

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct VmJob {
    /// The backup's name (the VM's): its backups form one history.
    pub name: String,
    /// Every disk of the VM: `MOUNTPOINT/.../NAME.vmdk`.
    pub disks: Vec<PathBuf>,
    pub quiesce: bool,
    pub freeze_deadline_ms: u64,
    /// Run (`sh -c`) before the guest is frozen; failing stops the job.
    pub pre_freeze: Option<String>,
    /// Run after the guest is thawed (failing is reported).
    pub post_thaw: Option<String>,
    /// This machine's state directory (where its host agents listen).
    pub state_dir: PathBuf,
}

/// What a job did.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub manifest: Option<Manifest>,
    pub snapshot: Snapshot,
    /// From the snapshots taken to the snapshots deleted.
    pub snapshot_lifetime_ms: f64,
    /// Snapshots an earlier, killed job left, deleted first.
    pub cleaned: Vec<String>,
    /// Warnings (a post-thaw hook that failed, ...).
    pub warnings: Vec<String>,
}

fn host_err(what: &str, e: host::HostError) -> BackupError {
    BackupError::Invalid(format!("{what}: {e}"))
}

/// How the job reaches the host serving the VM's disks, and the disks.
pub trait Coordinator: Send + Sync {
    /// Run a host command (`vm-snapshot`, `vm-consolidate`, `disk-changed`)
    /// as the host that serves the disks.
    fn call(&self, command: &str, args: Value) -> Result<Value>;
    /// The frozen layer `frozen` of disk `disk` (a datastore path), open
    /// read-only.
    fn open_layer(&self, disk: &str, frozen: &str) -> Result<VDisk>;
    /// The snapshot an earlier backup left on `disk` (its marker).
    fn left(&self, disk: &str) -> Result<Option<Frozen>>;
    /// This job as the host knows it (whose snapshots are whose).
    fn job(&self) -> host::vm::Job;
}

fn call<T: serde::de::DeserializeOwned>(
    c: &dyn Coordinator,
    command: &str,
    args: impl Serialize,
) -> Result<T> {
    let a = serde_json::to_value(args).map_err(|e| BackupError::Invalid(e.to_string()))?;
    let v = c.call(command, a)?;
    serde_json::from_value(v)
        .map_err(|e| BackupError::Invalid(format!("the host's answer to {command}: {e}")))
}

/// A frozen layer as a backup source: data from the layer, what changed
/// from the disk's change history up to the snapshot's change ID (asked of
/// the host, which keeps that history).
struct FrozenSource<'a> {
    layer: VDisk,
    disk: String,
    change_id: Option<String>,
    host: &'a dyn Coordinator,
}

impl Source for FrozenSource<'_> {
    fn size(&self) -> u64 {
        self.layer.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.layer.read_at(buf, off)
    }
    fn allocated(&self) -> Result<Vec<std::ops::Range<u64>>> {
        self.layer.allocated()
    }
    fn changed_since(&self, since: &str) -> Result<Changed> {
        let Some(until) = &self.change_id else {
            return self.layer.changed_since(since);
        };
        let c: host::ops::DiskChanges = call(
            self.host,
            "disk-changed",
            serde_json::json!({"path": self.disk, "since": since, "until": until}),
        )?;
        Ok(Changed {
            ranges: c.ranges.into_iter().map(|(a, b)| a..b).collect(),
            whole: c.whole_disk,
        })
    }
    fn change_id(&self) -> Option<String> {
        self.change_id.clone()
    }
    fn describe(&self) -> String {
        self.layer.describe()
    }
    fn disk_name(&self) -> String {
        self.layer.disk_name()
    }
}

/// The host agent of this machine: its control socket, and the frozen
/// layers through its mount.
pub struct LocalAgent {
    client: Mutex<host::Client>,
    /// The agent's host UUID.
    host: String,
    /// The mountpoint, for reading.
    mount: PathBuf,
}

impl LocalAgent {
    /// The agent serving the disks at `disks` (under one vmfs mount of this
    /// machine); the disks' paths inside the datastore.
    pub fn for_disks(disks: &[PathBuf], state_dir: &Path) -> Result<(LocalAgent, Vec<String>)> {
        let mut client: Option<host::Client> = None;
        let mut mount = None;
        let mut paths = Vec::new();
        for d in disks {
            let Some((mp, _)) = host::client::mount_of(d) else {
                return Err(BackupError::Invalid(format!(
                    "{} is not under a vmfs mount of this machine (give --datastore LUN... to back up from the LUNs)",
                    d.display()
                )));
            };
            let Some((c, inner)) = host::client::at_path(d, state_dir)
                .map_err(|e| host_err(&d.display().to_string(), e))?
            else {
                return Err(BackupError::Invalid(format!(
                    "{} is not under a vmfs mount of this machine",
                    d.display()
                )));
            };
            match &client {
                None => {
                    client = Some(c);
                    mount = Some(mp);
                }
                Some(a) if a.greeting.datastore != c.greeting.datastore => {
                    return Err(BackupError::Invalid(format!(
                        "{} is on another datastore than {}: one job backs up the disks of one datastore",
                        d.display(),
                        disks[0].display()
                    )))
                }
                Some(_) => {}
            }
            paths.push(inner);
        }
        let (Some(client), Some(mount)) = (client, mount) else {
            return Err(BackupError::Invalid("no disk given".into()));
        };
        Ok((
            LocalAgent {
                host: client.greeting.host.clone(),
                client: Mutex::new(client),
                mount,
            },
            paths,
        ))
    }

    fn local(&self, disk: &str) -> PathBuf {
        self.mount.join(disk.trim_start_matches('/'))
    }
}

impl Coordinator for LocalAgent {
    fn call(&self, command: &str, args: Value) -> Result<Value> {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        c.call_value(command, args)
            .map_err(|e| host_err(command, e))
    }
    fn open_layer(&self, disk: &str, frozen: &str) -> Result<VDisk> {
        let p = self.local(disk);
        VDisk::open(&p.parent().unwrap_or(Path::new("/")).join(frozen))
    }
    fn left(&self, disk: &str) -> Result<Option<Frozen>> {
        let m = PathBuf::from(host::vm::marker_of(&self.local(disk).display().to_string()));
        Ok(std::fs::read(&m)
            .ok()
            .and_then(|t| serde_json::from_slice::<Frozen>(&t).ok()))
    }
    fn job(&self) -> host::vm::Job {
        host::vm::Job {
            host: self.host.clone(),
            pid: std::process::id(),
            slot: None,
        }
    }
}

/// This machine's lock on backing up VM `name` (released when dropped).
struct JobLock {
    _held: std::fs::File,
}

fn lock(state_dir: &Path, name: &str) -> Result<JobLock> {
    let dir = state_dir.join("backup").join("jobs");
    std::fs::create_dir_all(&dir)
        .map_err(|e| BackupError::Invalid(format!("{}: {e}", dir.display())))?;
    let p = dir.join(format!("{name}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&p)
        .map_err(|e| BackupError::Invalid(format!("{}: {e}", p.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let who = std::fs::read_to_string(&p).unwrap_or_default();
        return Err(BackupError::Invalid(format!(
            "a backup of {name} is running on this machine already ({}): refused",
            who.trim()
        )));
    }
    let _ = f.set_len(0);
    let _ = std::io::Write::write_all(&mut &f, format!("pid {}", std::process::id()).as_bytes());
    Ok(JobLock { _held: f })
}

fn hook(what: &str, cmd: &str, job: &VmJob) -> std::result::Result<(), String> {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("VMFS_BACKUP_NAME", &job.name)
        .env(
            "VMFS_BACKUP_DISKS",
            job.disks
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .output()
        .map_err(|e| format!("the {what} hook {cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "the {what} hook {cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(())
}

/// The newest backup NAME's change ID for disk `disk` (the next
/// incremental's `since`), `None` when none records one.
pub fn last_change_id(repo: &Repo, name: &str, disk: &str) -> Result<Option<String>> {
    for l in repo.list()?.iter().rev().filter(|l| l.name == name) {
        match repo.manifest(&l.id) {
            Ok(m) => {
                if let Some(d) = m.disks.iter().find(|d| d.name == disk) {
                    if d.change_id.is_some() {
                        return Ok(d.change_id.clone());
                    }
                }
            }
            Err(e) => tracing::warn!("skipping backup {}: {e}", l.id),
        }
    }
    Ok(None)
}

/// Run the job (see the module doc) through `host`, for the disks at
/// datastore paths `paths` (in the job's order). The snapshots are deleted
/// however the backup ends; the manifest exists only when every disk was
/// stored.
pub fn backup_vm(
    repo: Arc<Repo>,
    job: &VmJob,
    host: &dyn Coordinator,
    paths: &[String],
    opts: &Options,
) -> Result<VmReport> {
    crate::util::check_name("backup name", &job.name)?;
    if paths.is_empty() || paths.len() != job.disks.len() {
        return Err(BackupError::Invalid("no disk given".into()));
    }
    let _lock = lock(&job.state_dir, &job.name)?;
    // Snapshots a killed job left: deleted first.
    let mut cleaned = Vec::new();
    for p in paths {
        let Some(f) = host.left(p)? else {
            continue;
        };
        tracing::warn!(
            "{p}: deleting the snapshot {} a killed backup left",
            f.frozen
        );
        let _: Vec<host::ops::DiskDone> = call(
            host,
            "vm-consolidate",
            ConsolidateArgs {
                disks: vec![f.clone()],
                job: Some(host.job()),
            },
        )
        .map_err(|e| {
            BackupError::Invalid(format!("{p}: deleting the snapshot {}: {e}", f.frozen))
        })?;
        cleaned.push(format!("{p}: {}", f.frozen));
    }
    let mut warnings = Vec::new();
    if let Some(cmd) = &job.pre_freeze {
        hook("pre-freeze", cmd, job).map_err(BackupError::Invalid)?;
    }
    let snap: Snapshot = call(
        host,
        "vm-snapshot",
        SnapshotArgs {
            disks: paths.to_vec(),
            quiesce: job.quiesce,
            freeze_deadline_ms: job.freeze_deadline_ms,
            job: Some(host.job()),
        },
    )
    .map_err(|e| BackupError::Invalid(format!("snapshotting the VM: {e}")))?;
    let taken = Instant::now();
    if let Some(cmd) = &job.post_thaw {
        if let Err(e) = hook("post-thaw", cmd, job) {
            tracing::warn!("{e}");
            warnings.push(e);
        }
    }
    let stored = store(&repo, job, host, paths, &snap, opts);
    // Deleted whatever happened.
    let deleted: Result<Vec<host::ops::DiskDone>> = call(
        host,
        "vm-consolidate",
        ConsolidateArgs {
            disks: snap.disks.clone(),
            job: Some(host.job()),
        },
    );
    let lifetime = taken.elapsed();
    let manifest = stored?;
    if let Err(e) = deleted {
        return Err(BackupError::Invalid(format!(
            "the backup is stored, but deleting its snapshots failed (the next backup of this VM deletes them): {e}"
        )));
    }
    Ok(VmReport {
        manifest: Some(manifest),
        snapshot: snap,
        snapshot_lifetime_ms: lifetime.as_secs_f64() * 1000.0,
        cleaned,
        warnings,
    })
}

/// Read every frozen layer into the repository.
fn store(
    repo: &Arc<Repo>,
    job: &VmJob,
    host: &dyn Coordinator,
    paths: &[String],
    snap: &Snapshot,
    opts: &Options,
) -> Result<Manifest> {
    let norm = |p: &str| p.trim_matches('/').to_string();
    let mut sources = Vec::new();
    for f in &snap.disks {
        let Some(i) = paths.iter().position(|p| norm(p) == norm(&f.path)) else {
            return Err(BackupError::Invalid(format!(
                "the host snapshotted {}, which is not a disk of the job",
                f.path
            )));
        };
        sources.push((
            crate::image::name_of(&job.disks[i], ".vmdk"),
            FrozenSource {
                layer: host.open_layer(&f.path, &f.frozen)?,
                disk: f.path.clone(),
                change_id: f.change_id.clone(),
                host,
            },
        ));
    }
    let mut jobs = Vec::new();
    for (name, src) in &sources {
        let since = last_change_id(repo, &job.name, name)?;
        jobs.push(DiskJob {
            name: name.clone(),
            source: src,
            since,
        });
    }
    crate::backup::backup(repo.clone(), &job.name, &jobs, opts)
}
