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
//! Where the job runs (the proxy) decides how it reaches the disks: a
//! [`Coordinator`] (the host crate has both: through this machine's host
//! agent and mount, or as a host of the datastore of its own that asks
//! the VM's host through the datastore and reads the LUNs). This module
//! knows only the requests and answers (the types below, which the host
//! agent answers with).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
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
    /// The guest agent's socket on the VM's host, when its controller was
    /// added without `--guest-agent`.
    pub guest_agent: Option<String>,
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

fn yes() -> bool {
    true
}

fn default_deadline() -> u64 {
    10_000
}

/// `vm-snapshot`'s arguments (the host agent's command).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotArgs {
    /// Every disk of the VM (datastore paths); each attached to a
    /// controller of the host asked, or in use by no host (the VM is off).
    pub disks: Vec<String>,
    /// Freeze the guest's filesystems through its agent (when its
    /// controller names one).
    #[serde(default = "yes")]
    pub quiesce: bool,
    /// The longest the guest may stay frozen; past it the host thaws it
    /// whatever is still running.
    #[serde(default = "default_deadline")]
    pub freeze_deadline_ms: u64,
    /// The job asking (recorded in each disk's marker).
    #[serde(default)]
    pub job: Option<Job>,
    /// The guest agent's socket (on the host's machine) for disks whose
    /// controller names none.
    #[serde(default)]
    pub guest_agent: Option<String>,
}

/// One disk's snapshot, as `vm-snapshot` answers and the marker beside
/// the disk keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Frozen {
    pub path: String,
    /// The frozen layer's descriptor (beside the disk's).
    pub frozen: String,
    /// The change ID the disk froze at (`None`: tracking is off).
    pub change_id: Option<String>,
    /// The backup job that took it.
    #[serde(default)]
    pub job: Option<Job>,
    /// The frozen layer's CID (hex): a later snapshot may reuse the name.
    #[serde(default)]
    pub cid: Option<String>,
}

/// A backup job: the host of the datastore it runs as (its UUID: the
/// proxy's own slot, or the host agent it goes through), and its process
/// on that host's machine. While it lives, its snapshots are its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    pub host: String,
    pub pid: u32,
    /// A proxy's heartbeat slot and its generation (a proxy is a host of
    /// the datastore for the job's time: a new job of the same proxy has
    /// another generation).
    #[serde(default)]
    pub slot: Option<(u32, u64)>,
}

/// `vm-snapshot`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub disks: Vec<Frozen>,
    /// Whether the guest's filesystems were frozen through its agent for
    /// the whole of the snapshot (else crash-consistent).
    pub quiesced: bool,
    /// How, for a person: "guest agent (2 filesystems frozen)", or why not.
    pub how: String,
    /// How long the guest's filesystems were frozen (0 when not).
    pub frozen_ms: f64,
    /// How long the disks' I/O was held.
    pub held_ms: f64,
}

/// `vm-consolidate`'s arguments: the snapshots a `vm-snapshot` took.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsolidateArgs {
    pub disks: Vec<Frozen>,
    /// The job asking: a snapshot another job took is deleted only once
    /// that job is gone (a killed job's leftovers).
    #[serde(default)]
    pub job: Option<Job>,
}

/// What `disk-changed` answers that a backup uses.
#[derive(Debug, Clone, Deserialize)]
struct ChangedAnswer {
    ranges: Vec<(u64, u64)>,
    whole_disk: Option<String>,
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
    fn job(&self) -> Job;
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
        let c: ChangedAnswer = call(
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

/// This machine's lock on backing up VM `name` (released when dropped).
pub(crate) struct JobLock {
    _held: std::fs::File,
}

pub(crate) fn lock(state_dir: &Path, name: &str) -> Result<JobLock> {
    let dir = state_dir.join("backup").join("jobs");
    std::fs::create_dir_all(&dir)
        .map_err(|e| BackupError::Invalid(format!("{}: {e}", dir.display())))?;
    let p = dir.join(format!("{name}.lock"));
    let Some(f) = crate::util::try_lock_file(&p)? else {
        let who = std::fs::read_to_string(&p).unwrap_or_default();
        return Err(BackupError::Invalid(format!(
            "a backup of {name} is running on this machine already ({}): refused",
            who.trim()
        )));
    };
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

/// Delete the snapshots killed jobs left on the disks at `paths` (what
/// each disk's marker names); what was deleted, for the report.
pub(crate) fn clean_leftovers(host: &dyn Coordinator, paths: &[String]) -> Result<Vec<String>> {
    let mut cleaned = Vec::new();
    for p in paths {
        let Some(f) = host.left(p)? else {
            continue;
        };
        tracing::warn!(
            "{p}: deleting the snapshot {} a killed backup left",
            f.frozen
        );
        consolidate(host, std::slice::from_ref(&f)).map_err(|e| {
            BackupError::Invalid(format!("{p}: deleting the snapshot {}: {e}", f.frozen))
        })?;
        cleaned.push(format!("{p}: {}", f.frozen));
    }
    Ok(cleaned)
}

/// The pre-freeze hook, `vm-snapshot` (freeze, snapshot every disk at one
/// moment, thaw: all in the host), then the post-thaw hook whatever
/// happened (what the pre-freeze hook began must end). A failing post-thaw
/// hook is a warning.
pub(crate) fn snapshot_vm(
    job: &VmJob,
    host: &dyn Coordinator,
    paths: &[String],
    warnings: &mut Vec<String>,
) -> Result<Snapshot> {
    if let Some(cmd) = &job.pre_freeze {
        hook("pre-freeze", cmd, job).map_err(BackupError::Invalid)?;
    }
    let snap: Result<Snapshot> = call(
        host,
        "vm-snapshot",
        SnapshotArgs {
            disks: paths.to_vec(),
            quiesce: job.quiesce,
            freeze_deadline_ms: job.freeze_deadline_ms,
            job: Some(host.job()),
            guest_agent: job.guest_agent.clone(),
        },
    );
    if let Some(cmd) = &job.post_thaw {
        if let Err(e) = hook("post-thaw", cmd, job) {
            tracing::warn!("{e}");
            warnings.push(e);
        }
    }
    snap.map_err(|e| BackupError::Invalid(format!("snapshotting the VM: {e}")))
}

/// Delete the snapshots `disks` (`vm-consolidate`).
pub(crate) fn consolidate(host: &dyn Coordinator, disks: &[Frozen]) -> Result<()> {
    let _: Value = call(
        host,
        "vm-consolidate",
        ConsolidateArgs {
            disks: disks.to_vec(),
            job: Some(host.job()),
        },
    )?;
    Ok(())
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
    let cleaned = clean_leftovers(host, paths)?;
    let mut warnings = Vec::new();
    let snap = snapshot_vm(job, host, paths, &mut warnings)?;
    let taken = Instant::now();
    let stored = store(&repo, job, host, paths, &snap, opts);
    // Deleted whatever happened.
    let deleted = consolidate(host, &snap.disks);
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
