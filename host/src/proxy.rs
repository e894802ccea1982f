//! The backup job's ways to the host serving a VM's disks
//! ([`backup_proxy::job::Coordinator`]):
//!
//! - [`LocalAgent`]: on the machine that hosts the datastore: its host
//!   agent's control socket, and the frozen layers read through its mount;
//! - [`SanProxy`]: on a machine that sees only the datastore's LUNs (VCB's
//!   SAN transport): the proxy is a host of the datastore of its own; it
//!   asks the host that holds the VM's disks through the datastore itself
//!   (`vmfs::mailbox`: the request in the proxy's heartbeat sector, taken
//!   and answered by that host within a few heartbeats), and reads the
//!   frozen layers straight from the LUNs with the file API (read-only
//!   locks: the host cannot merge into a layer while the proxy reads it).
//!   Disks no host holds (the VM is off) the proxy snapshots itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backup_proxy::error::{BackupError, Result};
use backup_proxy::image::VDisk;
use backup_proxy::job::{Coordinator, Frozen, Job};
use serde_json::Value;
use vmfs::Fs;

fn host_err(what: &str, e: crate::HostError) -> BackupError {
    BackupError::Invalid(format!("{what}: {e}"))
}

/// The host agent of this machine: its control socket, and the frozen
/// layers through its mount.
pub struct LocalAgent {
    /// The agent's control socket, and the datastore it must answer for
    /// (a connection per call: the agent closes one idle for a minute,
    /// `agent::IDLE_TIMEOUT`, and a job reads for longer than that between
    /// its snapshot and its consolidation).
    socket: PathBuf,
    datastore: String,
    /// The agent's host UUID.
    host: String,
    /// The mountpoint, for reading.
    mount: PathBuf,
}

impl LocalAgent {
    /// The agent serving the disks at `disks` (under one vmfs mount of this
    /// machine); the disks' paths inside the datastore.
    pub fn for_disks(disks: &[PathBuf], state_dir: &Path) -> Result<(LocalAgent, Vec<String>)> {
        let (client, mount, paths) = crate::client::at_paths(disks, state_dir).map_err(|e| {
            host_err(
                "the VM's disks (give --datastore LUN... to back up from the LUNs)",
                e,
            )
        })?;
        Ok((
            LocalAgent {
                host: client.greeting.host.clone(),
                socket: client.socket.clone(),
                datastore: client.greeting.datastore.clone(),
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
        crate::Client::connect(&self.socket, Some(&self.datastore))
            .and_then(|mut c| c.call_value(command, args))
            .map_err(|e| host_err(command, e))
    }
    fn open_layer(&self, disk: &str, frozen: &str) -> Result<VDisk> {
        let p = self.local(disk);
        VDisk::open(&p.parent().unwrap_or(Path::new("/")).join(frozen))
    }
    fn left(&self, disk: &str) -> Result<Option<Frozen>> {
        let m = PathBuf::from(crate::vm::marker_of(
            &self.local(disk).display().to_string(),
        ));
        Ok(std::fs::read(&m)
            .ok()
            .and_then(|t| serde_json::from_slice::<Frozen>(&t).ok()))
    }
    fn job(&self) -> Job {
        Job {
            host: self.host.clone(),
            pid: std::process::id(),
            slot: None,
        }
    }
}

pub struct SanProxy {
    fs: Arc<Fs>,
    /// The host holding the disks: slot, and a name for messages. `None`:
    /// no host holds them.
    holder: Option<(u32, String)>,
    /// For disks no host holds: the host operations, run here.
    here: crate::scsi::Scsi,
    freeze_deadline: Duration,
}

fn herr(e: crate::HostError) -> BackupError {
    BackupError::Invalid(e.to_string())
}

impl SanProxy {
    /// For the disks at `paths` of the datastore `fs` (mounted here as a
    /// host): find the host that holds them (the lock of each one's current
    /// layer). Disks held by different hosts are refused (one VM runs on
    /// one host).
    pub fn new(fs: Arc<Fs>, paths: &[String], freeze_deadline: Duration) -> Result<SanProxy> {
        let me = fs.member().map(|m| m.slot);
        let slots = crate::ops::disk_slots(&fs.vol()).map_err(herr)?;
        let mut holder: Option<(u32, String)> = None;
        let mut first = None;
        for p in paths {
            let (store, name) = crate::ops::store_for(&fs, p).map_err(herr)?;
            let d = snapshot::disk::read_descriptor(&*store, &name)
                .map_err(|e| BackupError::Invalid(e.to_string()))?;
            let dir = p
                .trim_matches('/')
                .rsplit_once('/')
                .map(|x| x.0)
                .unwrap_or("");
            let mut held = None;
            for e in &d.extents {
                let Some(f) = &e.file else { continue };
                let fp = if dir.is_empty() {
                    f.clone()
                } else {
                    format!("{dir}/{f}")
                };
                let (_, hs) = fs
                    .holders_of(&fp)
                    .map_err(|e| BackupError::Invalid(e.to_string()))?;
                for h in hs {
                    let live = slots.iter().any(|(s, x)| {
                        *s == h.slot
                            && x.as_ref().is_ok_and(|x| {
                                x.generation == h.generation && x.state == vmfs::format::SLOT_LIVE
                            })
                    });
                    if live && Some(h.slot) != me {
                        let who = slots
                            .iter()
                            .find(|(s, _)| *s == h.slot)
                            .and_then(|(_, x)| x.as_ref().ok())
                            .map(|x| vmfs::volume::uuid_str(&x.host))
                            .unwrap_or_default();
                        held = Some((h.slot, format!("host {who} (slot {})", h.slot)));
                    }
                }
            }
            match (&first, &held) {
                (None, _) => {
                    first = Some(p.clone());
                    holder = held;
                }
                (Some(f), h) if h.as_ref().map(|x| x.0) != holder.as_ref().map(|x| x.0) => {
                    return Err(BackupError::Invalid(format!(
                        "{p} and {f} are held by different hosts ({} and {}): the disks of one VM run on one host",
                        h.as_ref().map(|x| x.1.as_str()).unwrap_or("none"),
                        holder.as_ref().map(|x| x.1.as_str()).unwrap_or("none")
                    )))
                }
                _ => {}
            }
        }
        let me_name = fs
            .member()
            .map(|m| vmfs::volume::uuid_str(&m.host))
            .unwrap_or_default();
        Ok(SanProxy {
            here: crate::scsi::Scsi::new(fs.clone(), me_name),
            fs,
            holder,
            freeze_deadline,
        })
    }

    /// The host the proxy asks, for messages ("" when none).
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_ref().map(|h| h.1.as_str())
    }
}

impl Coordinator for SanProxy {
    fn call(&self, command: &str, args: Value) -> Result<Value> {
        let Some((slot, who)) = &self.holder else {
            // Nobody holds the disks: the proxy does it, as a host.
            let v = match command {
                "vm-snapshot" => serde_json::to_value(
                    self.here
                        .vm_snapshot(
                            &serde_json::from_value(args)
                                .map_err(|e| BackupError::Invalid(e.to_string()))?,
                        )
                        .map_err(herr)?,
                ),
                "vm-consolidate" => serde_json::to_value(
                    self.here
                        .vm_consolidate(
                            &serde_json::from_value(args)
                                .map_err(|e| BackupError::Invalid(e.to_string()))?,
                        )
                        .map_err(herr)?,
                ),
                "disk-changed" => {
                    let s = |k: &str| args.get(k).and_then(|v| v.as_str()).map(String::from);
                    let (Some(path), Some(since)) = (s("path"), s("since")) else {
                        return Err(BackupError::Invalid("disk-changed: path, since".into()));
                    };
                    serde_json::to_value(
                        crate::ops::disk_changed(&self.fs, &path, &since, s("until").as_deref())
                            .map_err(herr)?,
                    )
                }
                c => return Err(BackupError::Invalid(format!("{c}: not a job's command"))),
            };
            return v.map_err(|e| BackupError::Invalid(e.to_string()));
        };
        let m = self.fs.member().ok_or_else(|| {
            BackupError::Invalid("the proxy is not a host of the datastore".into())
        })?;
        let beat = m.timeouts.heartbeat;
        let take = (beat * 6).max(Duration::from_secs(2));
        let answer = match command {
            "vm-snapshot" => self.freeze_deadline + Duration::from_secs(300),
            "vm-consolidate" => Duration::from_secs(6 * 3600),
            _ => Duration::from_secs(300),
        };
        let body = serde_json::to_vec(&crate::agent::MailCommand {
            command: command.to_string(),
            arguments: args,
        })
        .map_err(|e| BackupError::Invalid(e.to_string()))?;
        let out = self
            .fs
            .ask(*slot, crate::agent::MAIL_COMMAND, &body, take, answer)
            .map_err(|e| BackupError::Invalid(format!("asking {who} for {command}: {e}")))?;
        serde_json::from_slice(&out)
            .map_err(|e| BackupError::Invalid(format!("{who}'s answer to {command}: {e}")))
    }

    fn open_layer(&self, disk: &str, frozen: &str) -> Result<VDisk> {
        let dir = disk
            .trim_matches('/')
            .rsplit_once('/')
            .map(|x| x.0)
            .unwrap_or("");
        let store: Arc<dyn snapshot::Store> =
            Arc::new(snapshot::VmfsStore::new(self.fs.clone(), dir));
        let shown = PathBuf::from(format!("[datastore] {dir}/{frozen}"));
        let d = snapshot::Disk::open(store, frozen, false)
            .map_err(|e| BackupError::Invalid(format!("{}: {e}", shown.display())))?;
        Ok(VDisk::from_disk(d, shown))
    }

    fn left(&self, disk: &str) -> Result<Option<Frozen>> {
        crate::vm::left_by_backup(&self.fs, disk).map_err(herr)
    }

    fn job(&self) -> Job {
        let m = self.fs.member();
        Job {
            host: m
                .map(|m| vmfs::volume::uuid_str(&m.host))
                .unwrap_or_default(),
            pid: std::process::id(),
            slot: m.map(|m| (m.slot, m.slot_state().generation)),
        }
    }
}
