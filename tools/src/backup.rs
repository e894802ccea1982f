//! `vmfs backup ...`: the backup repository's commands, a thin layer over
//! the `backup_proxy` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use backup_proxy::backup::{DiskJob, Options};
use backup_proxy::catalog::Catalog;
use backup_proxy::gc::Retention;
use backup_proxy::util::{human_bytes, human_time};
use backup_proxy::{KeySource, Repo};
use clap::{Args, Subcommand};

#[derive(Args, Clone)]
pub struct RepoArgs {
    /// The repository: a directory or s3://BUCKET/PREFIX (endpoint, region
    /// and keys from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "VMFS_BACKUP_REPO")]
    repo: String,
    /// The key file of an encrypted repository (default: the copy kept in
    /// it). The passphrase: VMFS_BACKUP_PASSPHRASE, VMFS_BACKUP_PASSPHRASE_FILE,
    /// or asked on the terminal.
    #[arg(long, value_name = "KEYFILE")]
    key: Option<PathBuf>,
    /// The catalog of runs [default: VMFS_BACKUP_CATALOG or
    /// /var/lib/vmfs/backup/catalog.sqlite].
    #[arg(long)]
    catalog: Option<PathBuf>,
}

impl RepoArgs {
    fn open(&self) -> Result<Arc<Repo>> {
        let k = KeySource {
            file: self.key.clone(),
            passphrase: None,
        };
        Ok(Arc::new(Repo::open(&self.repo, &k)?))
    }

    fn catalog(&self) -> Option<Catalog> {
        let p = self.catalog.clone().unwrap_or_else(Catalog::default_path);
        match Catalog::open(&p) {
            Ok(c) => {
                if let Some(n) = &c.rebuilt {
                    eprintln!("vmfs: {n}");
                }
                Some(c)
            }
            Err(e) => {
                // The repository is the truth; a catalog we cannot keep
                // does not stop a backup.
                eprintln!("vmfs: warning: {e}; runs are not recorded");
                None
            }
        }
    }
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Make a new repository. With --encrypt, a new key is written to
    /// KEYFILE (keep it safe; a passphrase-wrapped copy stays in the
    /// repository) and every chunk, index and manifest is encrypted.
    Init {
        #[command(flatten)]
        r: RepoArgs,
        #[arg(long, value_name = "KEYFILE")]
        encrypt: Option<PathBuf>,
        /// Chunk size (power of two, 64K to 16M).
        #[arg(long, default_value = "4M")]
        chunk_size: String,
    },
    /// Back up an image: a raw file, a block device, or a virtual disk
    /// (NAME.vmdk, or a frozen layer of one). A full backup reads what may
    /// hold data; --since reads only what changed since that change ID,
    /// taking the rest from the backup that recorded it.
    Image {
        #[command(flatten)]
        r: RepoArgs,
        /// The backup's name (a VM's, say): backups of one name form its history.
        #[arg(long)]
        name: String,
        /// The disk's name in the backup [default: from SOURCE].
        #[arg(long)]
        disk: Option<String>,
        #[arg(long, value_name = "CHANGE-ID")]
        since: Option<String>,
        #[arg(long)]
        json: bool,
        /// Chunks read, hashed, compressed and stored at once [default:
        /// twice the cores, at least 4]; fewer spare a busy source.
        #[arg(long)]
        workers: Option<usize>,
        source: PathBuf,
    },
    /// Back up a running VM's disks, with no agent of ours in the guest:
    /// the host serving them (this machine's `vmfs mount`) freezes the
    /// guest's filesystems through its qemu-guest-agent (`vmfs scsi add
    /// --guest-agent`; else the snapshots are crash-consistent), snapshots
    /// every disk at one moment and thaws; the frozen layers are read (only
    /// what changed since the VM's last backup) into the repository; the
    /// snapshots are deleted while the guest runs, whatever happened. A
    /// disk no host uses (the VM is off) is snapshotted as it is.
    Vm {
        #[command(flatten)]
        r: RepoArgs,
        #[command(flatten)]
        vm: VmArgs,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Freeze and snapshot a running VM's disks as `backup vm` does, then
    /// show each frozen disk read-only as a raw image file NAME.img under
    /// MOUNTPOINT (and over NBD with --nbd), for any backup tool: `cp
    /// --sparse`, `qemu-img convert nbd://...`, `nbdcopy`, or `losetup -r
    /// -P` and `mount -o ro` for its files. A process stays in the
    /// background (the job: no other backup of the VM runs meanwhile) until
    /// `vmfs backup detach MOUNTPOINT` deletes the snapshots.
    Attach {
        #[command(flatten)]
        vm: VmArgs,
        /// An empty directory for the image files.
        #[arg(long)]
        mountpoint: PathBuf,
        /// Also serve each disk over NBD (read-only; export NAME): at
        /// unix:PATH (a UNIX socket, root only) or HOST:PORT (TCP, port 0:
        /// any free one). NBD has no authentication here: over TCP, bind a
        /// loopback or a private backup network.
        #[arg(long, value_name = "ADDR")]
        nbd: Option<String>,
        /// Stay in the foreground (until interrupted, or detached from
        /// another shell), logging to the terminal.
        #[arg(long)]
        foreground: bool,
        #[arg(long)]
        json: bool,
        /// (Internal: the background process attach starts.)
        #[arg(long, hide = true)]
        background_child: bool,
    },
    /// End an attach: unmount its image files, stop its NBD server, delete
    /// its snapshots. Refused while a process uses the files, unless
    /// --force. If the attach process was killed, its leftovers are cleaned
    /// up here.
    Detach {
        mountpoint: PathBuf,
        /// Detach even while the files are in use (lazily) and cut NBD
        /// clients off.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        host: crate::HostArgs,
    },
    /// The backups in the repository (and this machine's failed runs).
    List {
        #[command(flatten)]
        r: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write a backup's disk back: to a new file, a block device, or a new
    /// thin virtual disk (DEST ending in .vmdk). BACKUP is an ID, or a
    /// name for its newest backup.
    Restore {
        #[command(flatten)]
        r: RepoArgs,
        #[arg(long)]
        disk: Option<String>,
        backup: String,
        dest: PathBuf,
    },
    /// Show a backup's disks as read-only image files under MOUNTPOINT
    /// until interrupted (or unmounted), fetching chunks as they are read.
    Mount {
        #[command(flatten)]
        r: RepoArgs,
        backup: String,
        mountpoint: PathBuf,
    },
    /// Re-read and re-hash every chunk the backups use; name the backups
    /// a damaged object breaks. Exit status 1 when any is damaged.
    Verify {
        #[command(flatten)]
        r: RepoArgs,
        backup: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Forget the backups the rules do not keep (per name), then collect
    /// the chunks nothing references any more.
    Prune {
        #[command(flatten)]
        r: RepoArgs,
        #[arg(long)]
        keep_last: Option<usize>,
        #[arg(long)]
        keep_daily: Option<usize>,
        #[arg(long)]
        keep_weekly: Option<usize>,
        #[arg(long)]
        keep_monthly: Option<usize>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Garbage collection alone: chunks of killed backups, and sweeps that
    /// waited for running backups.
    Gc {
        #[command(flatten)]
        r: RepoArgs,
        /// Also list every chunk and collect what nothing accounts for
        /// (its cost follows the repository's size).
        #[arg(long)]
        full: bool,
    },
}

/// What `backup vm` and `backup attach` share: the VM's disks, how to
/// reach them, and how to quiesce.
#[derive(Args, Clone)]
pub struct VmArgs {
    /// The backup's name [default: the directory of the first disk,
    /// the VM's folder].
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// The guest agent's socket on the VM's host (when its controller
    /// was added without `vmfs scsi add --guest-agent`).
    #[arg(long, value_name = "QGA-SOCKET")]
    pub(crate) guest_agent: Option<String>,
    /// Do not freeze the guest's filesystems: crash-consistent.
    #[arg(long)]
    pub(crate) no_quiesce: bool,
    /// The longest the guest may stay frozen; the host thaws it then
    /// whatever is still running.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub(crate) freeze_deadline_ms: u64,
    /// Run (sh -c) before the guest is frozen; failing stops the job.
    #[arg(long, value_name = "CMD")]
    pub(crate) pre_freeze: Option<String>,
    /// Run after the guest is thawed.
    #[arg(long, value_name = "CMD")]
    pub(crate) post_thaw: Option<String>,
    /// Reach the disks from the datastore's LUNs, as a host of its own (a
    /// proxy that does not mount the datastore): the host running the VM
    /// is asked through the datastore, and DISKs are paths inside it.
    #[arg(long, value_name = "LUN")]
    pub(crate) datastore: Vec<String>,
    #[command(flatten)]
    pub(crate) host: crate::HostArgs,
    /// Every disk of the VM: MOUNTPOINT/.../NAME.vmdk (or, with
    /// --datastore, DIR/NAME.vmdk inside it).
    #[arg(required = true)]
    pub(crate) disks: Vec<PathBuf>,
}

impl VmArgs {
    pub(crate) fn job(&self) -> Result<backup_proxy::job::VmJob> {
        Ok(backup_proxy::job::VmJob {
            name: vm_name(self.name.clone(), &self.disks, &self.datastore)?,
            disks: self.disks.clone(),
            quiesce: !self.no_quiesce,
            freeze_deadline_ms: self.freeze_deadline_ms,
            pre_freeze: self.pre_freeze.clone(),
            post_thaw: self.post_thaw.clone(),
            state_dir: self.host.state_dir(),
            guest_agent: self.guest_agent.clone(),
        })
    }
}

fn parse_size(s: &str) -> Result<u32> {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    let v: u64 = n.parse().with_context(|| format!("{s:?} is not a size"))?;
    u32::try_from(v * m).with_context(|| format!("{s} is too large"))
}

/// What a VM job's snapshot did: the leftovers it deleted first, how the
/// guest was quiesced, how long it was frozen and its I/O held.
pub(crate) fn print_snapshot(cleaned: &[String], s: &backup_proxy::job::Snapshot) {
    for c in cleaned {
        println!("deleted the snapshot a killed backup left: {c}");
    }
    println!(
        "snapshot of {} disk(s): {}; guest frozen {:.0} ms, I/O held {:.1} ms",
        s.disks.len(),
        s.how,
        s.frozen_ms,
        s.held_ms
    );
}

fn summary(m: &backup_proxy::manifest::Manifest) {
    let t = m.totals();
    let secs = t.millis as f64 / 1000.0;
    println!("backup {} is whole", m.id);
    for d in &m.disks {
        println!(
            "  disk {}: {} from {}{}{}; read {}, new {} ({} stored)",
            d.name,
            human_bytes(d.size),
            d.source,
            d.since
                .as_ref()
                .map(|s| format!(", changes since {s}"))
                .unwrap_or_default(),
            d.change_id
                .as_ref()
                .map(|c| format!(", at change ID {c}"))
                .unwrap_or_default(),
            human_bytes(d.stats.read),
            human_bytes(d.stats.new),
            human_bytes(d.stats.stored)
        );
    }
    println!(
        "  read {} in {secs:.1} s ({}/s); new {} ({} stored), reused {}, zero {}",
        human_bytes(t.read),
        human_bytes((t.read as f64 / secs.max(0.001)) as u64),
        human_bytes(t.new),
        human_bytes(t.stored),
        human_bytes(t.reused),
        human_bytes(t.zero)
    );
}

/// Record how a run ended in the catalog (a warning when it cannot).
fn record(
    cat: &Option<Catalog>,
    run: Option<i64>,
    res: std::result::Result<&backup_proxy::manifest::Manifest, String>,
) {
    if let (Some(c), Some(run)) = (cat, run) {
        let rec = match res {
            Ok(m) => c.finish_ok(run, m),
            Err(e) => c.finish_failed(run, &e),
        };
        if let Err(e) = rec {
            eprintln!("vmfs: warning: {e}");
        }
    }
}

/// How a job reaches the VM's disks: through this machine's host agent,
/// or (`--datastore`) as a host of the datastore of its own.
pub(crate) enum Reach {
    Local(host::proxy::LocalAgent),
    San(Arc<vmfs::Fs>, host::proxy::SanProxy),
}

impl Reach {
    /// For `disks` (paths under a mount here, or inside the datastore on
    /// `datastore`'s LUNs); the disks' paths inside the datastore.
    pub(crate) fn open(
        disks: &[PathBuf],
        datastore: &[String],
        host: &crate::HostArgs,
        freeze_deadline_ms: u64,
        say: bool,
    ) -> Result<(Reach, Vec<String>)> {
        if datastore.is_empty() {
            let (agent, paths) = host::proxy::LocalAgent::for_disks(disks, &host.state_dir())?;
            return Ok((Reach::Local(agent), paths));
        }
        let t = vmfs::cluster::Timeouts::new(host.heartbeat_ms, host.lease_ms)?;
        let luns = crate::open_luns_for(datastore, &t)?;
        let fs = Arc::new(vmfs::Fs::mount(luns, host.uuid()?, t)?);
        let paths: Vec<String> = disks
            .iter()
            .map(|d| d.to_string_lossy().trim_start_matches('/').to_string())
            .collect();
        match host::proxy::SanProxy::new(
            fs.clone(),
            &paths,
            std::time::Duration::from_millis(freeze_deadline_ms),
        ) {
            Ok(san) => {
                match san.holder().filter(|_| say) {
                    Some(h) => {
                        eprintln!("the VM's disks are held by {h}: asking it through the datastore")
                    }
                    None if say => eprintln!(
                        "no host holds the VM's disks (it is off): snapshotting them here"
                    ),
                    None => {}
                }
                Ok((Reach::San(fs, san), paths))
            }
            Err(e) => {
                let _ = fs.unmount();
                Err(e.into())
            }
        }
    }

    pub(crate) fn coordinator(&self) -> &dyn backup_proxy::job::Coordinator {
        match self {
            Reach::Local(a) => a,
            Reach::San(_, s) => s,
        }
    }

    /// Leave the datastore (a proxy of its own).
    pub(crate) fn leave(self) {
        if let Reach::San(fs, san) = self {
            drop(san);
            if let Err(e) = fs.unmount() {
                eprintln!("vmfs: warning: leaving the datastore: {e}");
            }
        }
    }
}

/// `backup vm` through this machine's host agent, or (`--datastore`) as a
/// host of the datastore of its own.
fn vm_job(
    repo: Arc<Repo>,
    job: &backup_proxy::job::VmJob,
    datastore: &[String],
    host: &crate::HostArgs,
    opts: &Options,
) -> Result<backup_proxy::job::VmReport> {
    let (reach, paths) = Reach::open(&job.disks, datastore, host, job.freeze_deadline_ms, true)?;
    let r = backup_proxy::job::backup_vm(repo, job, reach.coordinator(), &paths, opts);
    reach.leave();
    Ok(r?)
}

/// The backup's name: given, or the first disk's directory (the VM's
/// folder).
fn vm_name(name: Option<String>, disks: &[PathBuf], datastore: &[String]) -> Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    let p = if datastore.is_empty() {
        disks[0].canonicalize().ok()
    } else {
        Some(disks[0].clone())
    };
    p.and_then(|p| p.parent()?.file_name()?.to_str().map(String::from))
        .context("no --name, and the first disk's directory has no usable name")
}

pub fn run(cmd: BackupCmd) -> Result<ExitCode> {
    // Chunks are 4 MiB buffers made and dropped by the thousand: keep them
    // in the heap rather than a fresh mmap each (whose page faults cost a
    // restore a quarter of its system time).
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let opts = Options {
        progress,
        ..Default::default()
    };
    match cmd {
        BackupCmd::Init {
            r,
            encrypt,
            chunk_size,
        } => {
            let cs = parse_size(&chunk_size)?;
            let repo = match &encrypt {
                Some(k) => {
                    let p = backup_proxy::keys::passphrase("new passphrase: ")?;
                    if std::env::var_os("VMFS_BACKUP_PASSPHRASE").is_none()
                        && std::env::var_os("VMFS_BACKUP_PASSPHRASE_FILE").is_none()
                        && backup_proxy::keys::passphrase("again: ")? != p
                    {
                        bail!("the passphrases differ");
                    }
                    Repo::init(&r.repo, cs, Some((k, &p)))?
                }
                None => Repo::init(&r.repo, cs, None)?,
            };
            println!(
                "repository {} made: {} chunks, BLAKE3, zstd, {}",
                repo.describe(),
                human_bytes(cs as u64),
                match (&repo.config.encryption, &encrypt) {
                    (Some(e), Some(k)) => format!(
                        "AES-256-GCM with key {} in {} (keep a copy of it and its passphrase: without them the backups cannot be read)",
                        e.key_id,
                        k.display()
                    ),
                    _ => "not encrypted".into(),
                }
            );
        }
        BackupCmd::Image {
            r,
            name,
            disk,
            since,
            json,
            workers,
            source,
        } => {
            let opts = Options {
                workers: workers.unwrap_or(opts.workers).clamp(1, 256),
                ..opts
            };
            let repo = r.open()?;
            let src = backup_proxy::image::open_source(&source)?;
            let cat = r.catalog();
            let run = cat.as_ref().and_then(|c| c.begin(&repo, &name).ok());
            let job = DiskJob {
                name: disk.unwrap_or_else(|| src.disk_name()),
                source: &*src,
                since,
            };
            let res = backup_proxy::backup::backup(repo.clone(), &name, &[job], &opts);
            record(&cat, run, res.as_ref().map_err(|e| e.to_string()));
            let m = res?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                summary(&m);
            }
        }
        BackupCmd::Vm {
            r,
            vm,
            json,
            workers,
        } => {
            let opts = Options {
                workers: workers.unwrap_or(opts.workers).clamp(1, 256),
                ..opts
            };
            let job = vm.job()?;
            let name = job.name.clone();
            let repo = r.open()?;
            let cat = r.catalog();
            let run = cat.as_ref().and_then(|c| c.begin(&repo, &name).ok());
            let res = vm_job(repo.clone(), &job, &vm.datastore, &vm.host, &opts);
            record(
                &cat,
                run,
                match &res {
                    Ok(rep) => rep
                        .manifest
                        .as_ref()
                        .ok_or_else(|| "no manifest".to_string()),
                    Err(e) => Err(e.to_string()),
                },
            );
            let rep = res?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                print_snapshot(&rep.cleaned, &rep.snapshot);
                println!("snapshots kept {:.1} s", rep.snapshot_lifetime_ms / 1000.0);
                if let Some(m) = &rep.manifest {
                    summary(m);
                }
                for w in &rep.warnings {
                    eprintln!("vmfs: warning: {w}");
                }
            }
        }
        BackupCmd::Attach {
            vm,
            mountpoint,
            nbd,
            foreground,
            json,
            background_child,
        } => {
            return crate::attach::attach_cmd(
                vm,
                &mountpoint,
                nbd.as_deref(),
                foreground,
                json,
                background_child,
            );
        }
        BackupCmd::Detach {
            mountpoint,
            force,
            json,
            host,
        } => return crate::attach::detach_cmd(&mountpoint, force, json, &host),
        BackupCmd::List { r, json } => {
            let repo = r.open()?;
            let ids: Vec<String> = repo.list()?.into_iter().map(|l| l.id).collect();
            let out: Vec<std::result::Result<_, (String, String)>> = ids
                .iter()
                .map(|id| repo.manifest(id).map_err(|e| (id.clone(), e.to_string())))
                .collect();
            let cat = r.catalog();
            let mut failed = Vec::new();
            if let Some(c) = &cat {
                // The manifests just read, not read again.
                let mut read = |id: &str| {
                    let known = out.iter().find(|m| match m {
                        Ok(m) => m.id == id,
                        Err((i, _)) => i == id,
                    });
                    match known {
                        Some(Ok(m)) => Ok(m.clone()),
                        Some(Err((_, e))) => Err(backup_proxy::BackupError::Invalid(e.clone())),
                        None => repo.manifest(id),
                    }
                };
                match c.sync_with(&repo, &ids, &mut read) {
                    Ok(w) => w.iter().for_each(|w| eprintln!("vmfs: warning: {w}")),
                    Err(e) => eprintln!("vmfs: warning: {e}"),
                }
                if let Ok(runs) = c.runs(&repo) {
                    failed = runs
                        .into_iter()
                        .filter(|x| x.state == "failed" || x.state == "interrupted")
                        .collect();
                }
            }
            if json {
                let v = serde_json::json!({
                    "repository": repo.describe(),
                    "backups": out.iter().filter_map(|m| m.as_ref().ok()).collect::<Vec<_>>(),
                    "damaged": out.iter().filter_map(|m| m.as_ref().err()).map(|(id, e)| serde_json::json!({"id": id, "error": e})).collect::<Vec<_>>(),
                    "failed_runs": failed.iter().map(|f| serde_json::json!({"name": f.name, "started": f.started, "state": f.state, "reason": f.reason})).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<40} {:<24} {:>10} {:>10} {:>10}  change ID",
                    "BACKUP", "FINISHED", "SIZE", "NEW", "STORED"
                );
                for m in &out {
                    match m {
                        Ok(m) => {
                            let t = m.totals();
                            let size: u64 = m.disks.iter().map(|d| d.size).sum();
                            let cid = m
                                .disks
                                .iter()
                                .filter_map(|d| d.change_id.clone())
                                .collect::<Vec<_>>()
                                .join(",");
                            println!(
                                "{:<40} {:<24} {:>10} {:>10} {:>10}  {}",
                                m.id,
                                human_time(m.finished),
                                human_bytes(size),
                                human_bytes(t.new),
                                human_bytes(t.stored),
                                if cid.is_empty() { "-".into() } else { cid }
                            );
                        }
                        Err((id, e)) => println!("{id:<40} DAMAGED: {e}"),
                    }
                }
                for f in &failed {
                    println!(
                        "(run of {} at {}: {}: {})",
                        f.name,
                        human_time(f.started),
                        f.state,
                        f.reason.as_deref().unwrap_or("")
                    );
                }
            }
        }
        BackupCmd::Restore {
            r,
            disk,
            backup,
            dest,
        } => {
            let repo = r.open()?;
            let id = repo.resolve(&backup)?;
            let m = repo.manifest(&id)?;
            let d = backup_proxy::restore::pick(&m, disk.as_deref())?;
            let target = backup_proxy::image::create_dest(&dest, d.size)?;
            let workers = opts.workers.max(8);
            let s = backup_proxy::restore::restore(&repo, d, target, workers, progress)?;
            let secs = s.millis as f64 / 1000.0;
            println!(
                "restored disk {} of {id} to {}: {} ({} fetched, {} zero) in {secs:.1} s ({}/s)",
                d.name,
                dest.display(),
                human_bytes(s.bytes),
                human_bytes(s.fetched),
                human_bytes(s.zero),
                human_bytes((s.bytes as f64 / secs.max(0.001)) as u64)
            );
        }
        BackupCmd::Mount {
            r,
            backup,
            mountpoint,
        } => {
            let repo = r.open()?;
            let id = repo.resolve(&backup)?;
            let m = repo.manifest(&id)?;
            let (tx, rx) = std::sync::mpsc::channel();
            ctrlc::set_handler(move || {
                let _ = tx.send(());
            })
            .context("installing the signal handler")?;
            eprintln!(
                "backup {id} on {}: {}; interrupt (or umount) to end",
                mountpoint.display(),
                m.disks
                    .iter()
                    .map(|d| format!("{}.img", d.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            backup_proxy::mount::serve(repo, &m, &mountpoint, rx)?;
        }
        BackupCmd::Verify { r, backup, json } => {
            let repo = r.open()?;
            let only = match &backup {
                Some(b) => Some(vec![repo.resolve(b)?]),
                None => None,
            };
            let rep = backup_proxy::verify::verify(&repo, only.as_deref(), opts.workers, progress)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "backups": rep.backups, "chunks": rep.chunks, "bytes": rep.bytes, "damaged": rep.damaged,
                    }))?
                );
            } else {
                println!(
                    "verified {} backups: {} chunks, {}",
                    rep.backups,
                    rep.chunks,
                    human_bytes(rep.bytes)
                );
                for (id, why) in &rep.damaged {
                    println!("DAMAGED {id}:");
                    for w in why {
                        println!("  {w}");
                    }
                }
            }
            if !rep.ok() {
                return Ok(ExitCode::from(1));
            }
        }
        BackupCmd::Prune {
            r,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
        } => {
            let repo = r.open()?;
            let rules = Retention {
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
            };
            let rep = backup_proxy::gc::prune(&repo, &rules, dry_run)?;
            for id in &rep.forgotten {
                println!("{} {id}", if dry_run { "would forget" } else { "forgot" });
            }
            println!("kept {} backups", rep.kept.len());
            print_gc(&rep);
            if let Some(c) = r.catalog() {
                let _ = c.sync(&repo);
            }
        }
        BackupCmd::Gc { r, full } => {
            let repo = r.open()?;
            print_gc(&if full {
                backup_proxy::gc::collect_full(&repo)?
            } else {
                backup_proxy::gc::collect(&repo)?
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_gc(rep: &backup_proxy::gc::PruneReport) {
    if rep.condemned > 0 {
        println!("condemned {} chunks", rep.condemned);
    }
    for s in &rep.swept {
        match &s.waiting_for {
            Some(w) => println!("collection {} waits for {w}", s.list),
            None => println!(
                "collection {}: deleted {} chunks ({}), kept {} still in use",
                s.list,
                s.deleted,
                human_bytes(s.freed),
                s.kept
            ),
        }
    }
}
