//! `vmfs`: make, inspect, check, mount and grow datastores.
//! A thin layer: parse arguments, call the libraries, print.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmfs::{Fs, MkfsOptions};

mod attach;
mod backup;
mod hosted;
mod scsi;

#[derive(Parser)]
#[command(name = "vmfs", version, about = "Clustered datastores on shared LUNs", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a datastore over one or more LUNs. A LUN that holds anything
    /// (a datastore, a filesystem, a partition table, an LVM or RAID member,
    /// swap) is refused unless --force; one of a datastore with a live host
    /// is refused always.
    Mkfs {
        /// Overwrite what the LUNs hold (never a datastore a host uses).
        #[arg(long)]
        force: bool,
        /// The lease of the hosts of a datastore found on a LUN: its
        /// heartbeats are watched this long (default 8000).
        #[arg(long)]
        lease_ms: Option<u64>,
        /// A name for the datastore (up to 63 bytes).
        #[arg(long, default_value = "")]
        label: String,
        /// File block size: a power of two from 64K to 64M.
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        block_size: u64,
        /// Host slots (hosts that may mount at once), 1 to 1024.
        #[arg(long, default_value_t = 64)]
        max_hosts: u32,
        /// Each host's metadata journal, 1M to 4G (default 16M, or 1/32 of a
        /// small datastore).
        #[arg(long, value_parser = parse_size)]
        journal_size: Option<u64>,
        /// LUNs: paths or URLs (file:///path, nbd://host[:port]/export, nbd+unix:///export?socket=/path).
        #[arg(required = true)]
        luns: Vec<String>,
    },
    /// Each host slot: state, host UUID, generation, heartbeat, journal.
    Hosts {
        #[command(flatten)]
        ds: DatastoreArgs,
    },
    /// Locks held on disk: object, mode, owner slot/host, generation.
    Locks {
        #[command(flatten)]
        ds: DatastoreArgs,
    },
    /// Show the volume, its extents, usage and free space.
    Info {
        #[command(flatten)]
        ds: DatastoreArgs,
    },
    /// The datastores this machine hosts (its `vmfs mount` processes):
    /// mountpoint, slot, generation, journal use, open files.
    Status {
        /// Where this machine's host agents listen (STATE_DIR/run).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the datastore; exit 0 clean, 1 errors found, 2 could not run.
    Fsck {
        /// Fix what can be fixed safely, and say what was done.
        #[arg(long)]
        repair: bool,
        #[arg(required = true)]
        luns: Vec<String>,
    },
    /// Mount the datastore with FUSE.
    Mount {
        /// Stay in the foreground (otherwise return once mounted).
        #[arg(long)]
        foreground: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Where the background mount logs (default: a file in the temp
        /// directory named after the mountpoint).
        #[arg(long)]
        log_file: Option<PathBuf>,
        #[command(flatten)]
        host: HostArgs,
        /// LUNs, then the mountpoint.
        #[arg(required = true, num_args = 2..)]
        args: Vec<String>,
    },
    /// Crash-recovery harness: run workloads on a recording LUN, build the
    /// images power cuts would leave, and check each one (mount with journal
    /// replay, fsck, oracle). Exit 1 on any failure.
    Crashtest(CrashArgs),
    /// Grow the datastore by one LUN. Through this machine's host when it
    /// has the datastore mounted.
    Extend {
        /// The datastore: its LUNs, or a directory under its mountpoint.
        #[arg(required = true)]
        luns: Vec<String>,
        /// The LUN to add. Refused if it holds anything (as for mkfs) unless
        /// --force; refused always if it belongs to a datastore in use.
        #[arg(long)]
        add: String,
        /// Overwrite what the new LUN holds (never a datastore a host uses).
        #[arg(long)]
        force: bool,
        /// When hosts elsewhere have it mounted (and none here), this
        /// command joins as a host for the time of the change.
        #[command(flatten)]
        host: HostArgs,
    },
    /// Raw device mappings: a file on the datastore that stands for a whole LUN.
    #[command(subcommand)]
    Rdm(RdmCmd),
    /// Virtual disks (VMDK): create, inspect, snapshot, revert, consolidate.
    /// DISK is NAME.vmdk under a mountpoint of a datastore this machine
    /// hosts (its host agent does the work), or, with --datastore LUN...,
    /// a path inside that datastore.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Paravirtual SCSI controllers (vhost-user-scsi) that serve virtual
    /// disks to QEMU/KVM guests from this machine's host agent.
    #[command(subcommand)]
    Scsi(scsi::ScsiCmd),
    /// Backups: a deduplicating, compressed, optionally encrypted
    /// repository on a directory or S3; back up, restore, mount, verify,
    /// prune.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
}

/// A datastore a reading command names, and how it prints.
#[derive(clap::Args)]
struct DatastoreArgs {
    /// The datastore: its LUNs, or a directory under its mountpoint on
    /// this machine (then its host agent answers).
    #[arg(required = true)]
    luns: Vec<String>,
    /// Where this machine's host agents listen (STATE_DIR/run).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Where a disk is.
#[derive(clap::Args)]
pub(crate) struct DiskAt {
    /// The disk: MOUNTPOINT/.../NAME.vmdk, or a path inside the datastore
    /// named by --datastore.
    pub(crate) disk: String,
    /// The datastore's LUNs, one per --datastore (then DISK is a path
    /// inside it).
    #[arg(long)]
    pub(crate) datastore: Vec<String>,
    /// When the datastore is not mounted here: who this host is.
    #[command(flatten)]
    pub(crate) host: HostArgs,
}

#[derive(Subcommand)]
pub(crate) enum DiskCmd {
    /// A new base disk: NAME.vmdk and NAME-flat.vmdk.
    Create {
        /// Its size (512-byte multiples; K, M, G, T suffixes).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// thin (allocated as written), lazy (allocated, reads zeros), eager (allocated and zeroed).
        #[arg(long, default_value = "thin", value_parser = ["thin", "lazy", "eager"])]
        provisioning: String,
        /// The adapter recorded in the disk database.
        #[arg(long, default_value = "lsilogic", value_parser = ["pvscsi", "lsilogic", "buslogic", "ide"])]
        adapter: String,
        /// Changed-block tracking (on by default; `vmfs disk tracking` turns it on or off later).
        #[arg(long, default_value = "on", value_parser = ["on", "off"])]
        change_tracking: String,
        #[command(flatten)]
        at: DiskAt,
    },
    /// The chain, CIDs, size, allocated bytes per layer, change tracking.
    Info {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: DiskAt,
    },
    /// Freeze the current state: later writes go to a new layer.
    Snapshot {
        #[command(flatten)]
        at: DiskAt,
    },
    /// Drop everything written since the last snapshot.
    Revert {
        #[command(flatten)]
        at: DiskAt,
    },
    /// A new, independent base disk DST with DISK's current content (DST:
    /// under the same mountpoint, or a path inside the same datastore).
    Clone {
        #[command(flatten)]
        at: DiskAt,
        /// The new disk.
        dst: String,
        #[arg(long, default_value = "thin", value_parser = ["thin", "lazy", "eager"])]
        provisioning: String,
    },
    /// A new base disk DISK with the content of the raw image RAW (a local
    /// file; `qemu-img convert -O raw` makes one from anything else).
    Import {
        /// The raw image.
        raw: PathBuf,
        #[arg(long, default_value = "thin", value_parser = ["thin", "lazy", "eager"])]
        provisioning: String,
        #[arg(long, default_value = "lsilogic", value_parser = ["pvscsi", "lsilogic", "buslogic", "ide"])]
        adapter: String,
        #[command(flatten)]
        at: DiskAt,
    },
    /// DISK's current content as a new raw image RAW (sparse: zero chunks are holes).
    Export {
        #[command(flatten)]
        at: DiskAt,
        /// The raw image to make (it must not exist).
        raw: PathBuf,
    },
    /// Check the chain (descriptors, CIDs, grain directories and tables);
    /// exit 0 clean, 1 problems left.
    Check {
        /// Fix what can be fixed safely (a grain directory from its
        /// redundant copy, entries an interrupted flush left apart), and
        /// say what was done.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        at: DiskAt,
    },
    /// Grow the disk (not while it has snapshots).
    Resize {
        /// The new size (K, M, G, T suffixes).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        at: DiskAt,
    },
    /// Delete the newest snapshot (or all): merge into the layer below.
    Consolidate {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        at: DiskAt,
    },
    /// The byte ranges written since a change ID (64 KiB granularity), or
    /// with --since '*' every range that may hold data. After any crash the
    /// answer still covers every write; when the history cannot answer (a
    /// tool that does not keep it wrote the disk) it is the whole disk,
    /// and says why.
    Changed {
        /// A change ID (as `vmfs disk snapshot` prints it) or '*'.
        #[arg(long)]
        since: String,
        /// Up to this change ID (default: now).
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: DiskAt,
    },
    /// Delete the disk and every file of its chain (snapshots, change
    /// tracking); refused while it is open for writing anywhere.
    Delete {
        #[command(flatten)]
        at: DiskAt,
    },
    /// Turn changed-block tracking on (a new history) or off.
    Tracking {
        #[command(flatten)]
        at: DiskAt,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Share the disk between hosts (multi-writer, for guest clusters) or
    /// stop: every host may then attach it at once, SCSI persistent
    /// reservations are kept on the datastore for all of them, change
    /// tracking is off and snapshots are refused. Flat extents only, no
    /// snapshot, nobody using it.
    Share {
        #[command(flatten)]
        at: DiskAt,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(Subcommand)]
enum RdmCmd {
    /// Map LUN-URL as a file on the datastore: PATH under its mountpoint on
    /// this machine (its host agent makes it), or DATASTORE-LUN... then PATH
    /// from the datastore's root. Records the LUN's identity, size, the mode
    /// and the URL. A LUN of a datastore is refused.
    #[command(
        override_usage = "vmfs rdm create --mode virtual|physical [HOST OPTIONS] LUN-URL [DATASTORE-LUN...] PATH"
    )]
    Create {
        /// virtual (a virtual disk over the LUN; snapshots allowed) or
        /// physical (SCSI commands pass through; no snapshots).
        #[arg(long, value_parser = ["virtual", "physical"])]
        mode: String,
        /// LUN-URL, then the datastore's LUNs and the path inside it, or a
        /// path under the datastore's mountpoint.
        #[arg(required = true, num_args = 2..)]
        args: Vec<String>,
        /// When hosts elsewhere have the datastore mounted (and none here),
        /// this command joins as a host for the time of the change.
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show a mapping and whether this host reaches its LUN unchanged (exit 1
    /// if not): the LUNs listed in STATE_DIR/luns are searched, then the
    /// mapping's URL hint. PATH under a mountpoint on this machine, or
    /// DATASTORE-LUN... then PATH inside the datastore.
    #[command(override_usage = "vmfs rdm info [--state-dir DIR] [DATASTORE-LUN...] PATH")]
    Info {
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
        /// Where this host keeps its LUN list (file `luns`, one URL per
        /// line) and its agents' sockets (default /var/lib/vmfs).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size like 1M, 3T or 65536"))
}

pub(crate) fn open_luns(specs: &[String]) -> Result<Vec<Arc<dyn lun::Lun>>> {
    open_luns_with(specs, lun::OpenOptions::default())
}

/// Open LUNs for a host of the cluster: network I/O bounded by the I/O
/// timeout its lease implies (see `Timeouts::io`).
pub(crate) fn open_luns_for(
    specs: &[String],
    t: &vmfs::cluster::Timeouts,
) -> Result<Vec<Arc<dyn lun::Lun>>> {
    open_luns_with(specs, t.lun_options())
}

fn open_luns_with(specs: &[String], o: lun::OpenOptions) -> Result<Vec<Arc<dyn lun::Lun>>> {
    specs
        .iter()
        .map(|s| lun::open_with(s, o).with_context(|| format!("opening LUN {}", lun::redact(s))))
        .collect()
}

/// Open a LUN named by a URL recorded in a datastore's header.
fn open_hint(t: &vmfs::cluster::Timeouts) -> impl Fn(&str) -> vmfs::Result<Arc<dyn lun::Lun>> + '_ {
    move |u| Ok(lun::open_with(u, t.lun_options())?)
}

pub(crate) fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

fn fsck(specs: &[String], repair: bool) -> Result<bool> {
    let luns = open_luns(specs)?;
    if repair {
        let t = vmfs::cluster::Timeouts::default();
        vmfs::cluster::ensure_idle(&vmfs::Volume::open(luns.clone())?, &t, "repairing it")?;
    }
    // Without --repair every write, a journal replay included, stays in memory.
    let fs = Fs::open_for_check(luns, repair)?;
    for (s, rep) in fs.replays() {
        println!(
            "journal of slot {s}: {rep}{}",
            if repair {
                ""
            } else {
                " (in memory for the check; --repair or mount applies it)"
            }
        );
    }
    let bar = indicatif::ProgressBar::new(fs.usage().fds_used.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} checking {pos}/{len} files [{bar:40}] {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |done: u64, total: u64| {
        bar.set_length(total.max(done));
        bar.set_position(done);
    };
    let r = vmfs::fsck::check(&fs, repair, Some(&progress))?;
    bar.finish_and_clear();
    println!(
        "{} directories, {} files, {} blocks in use",
        r.dirs, r.files, r.blocks_used
    );
    for e in &r.errors {
        println!("error: {e}");
    }
    for f in &r.repaired {
        println!("repaired: {f}");
    }
    if r.errors.is_empty() {
        println!("clean");
    } else if repair {
        println!(
            "{} errors found, {} repairs made, {} cannot be repaired safely",
            r.errors.len(),
            r.repaired.len(),
            r.unrepairable
        );
    } else {
        println!(
            "{} errors found; run with --repair to fix what can be fixed",
            r.errors.len()
        );
    }
    Ok(r.errors.is_empty())
}

fn mount(
    args: &[String],
    foreground: bool,
    threads: usize,
    log_file: Option<PathBuf>,
    host: &HostArgs,
) -> Result<()> {
    let (mnt, specs) = args.split_last().expect("clap requires two");
    let mnt = PathBuf::from(mnt);
    if !mnt.is_dir() {
        bail!("mountpoint {} is not a directory", mnt.display());
    }
    // Validate before anything else, in the foreground, so errors reach the
    // user: join (waits out a dead host's lease and recovers it), open.
    let uuid = host.uuid()?;
    let t = vmfs::cluster::Timeouts::new(host.heartbeat_ms, host.lease_ms)?;
    let fs = Arc::new(Fs::mount(open_luns_for(specs, &t)?, uuid, t)?);
    let state_dir = host.state_dir();
    match rdm::host_luns(&state_dir) {
        Ok(list) => fs.set_rdm_luns(list),
        Err(e) => tracing::warn!(
            "cannot read this host's LUN list {}: {e}; raw device mappings are found by their URL hints only",
            state_dir.join("luns").display()
        ),
    }
    for (s, rep) in fs.replays() {
        tracing::info!("journal of slot {s} (the host stopped without unmounting): {rep}");
    }
    if !foreground {
        drop(fs);
        let log = log_file.unwrap_or_else(|| {
            let name = std::fs::canonicalize(&mnt)
                .unwrap_or_else(|_| mnt.clone())
                .display()
                .to_string()
                .replace('/', "_");
            std::env::temp_dir().join(format!("vmfs-mount{name}.log"))
        });
        let mut all = host.to_args(&uuid);
        all.extend(args.iter().cloned());
        return daemonize(&all, threads, &mnt, &log);
    }
    // This process is this machine's host of the datastore: the other
    // commands here reach it through its control socket.
    let agent = host::Agent::start(host::Config {
        fs: fs.clone(),
        state_dir,
        mountpoint: hosted::canonical(&mnt),
    })?;
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the signal handler")?;
    vmfs::fuse::serve_then(fs, &mnt, threads, rx, Box::new(move || drop(agent)))?;
    Ok(())
}

fn is_mounted(mnt: &std::path::Path) -> bool {
    let Ok(m) = std::fs::canonicalize(mnt) else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines().any(|l| {
                l.split(' ').nth(4) == Some(m.to_str().unwrap_or(""))
                    && l.contains(" - fuse")
                    && l.contains(" vmfs:")
            })
        })
        .unwrap_or(false)
}

fn daemonize(
    args: &[String],
    threads: usize,
    mnt: &std::path::Path,
    log: &std::path::Path,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount")
        .arg("--foreground")
        .arg("--threads")
        .arg(threads.to_string())
        .args(args);
    // The daemon must not hold the caller's terminal or pipes open: it logs to a file.
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the log file {}", log.display()))?;
    let start_len = logf.metadata().map(|m| m.len()).unwrap_or(0);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(logf);
    // SAFETY: setsid is async-signal-safe and takes no arguments.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        if is_mounted(mnt) {
            println!(
                "mounted on {} (pid {}, log {}); unmount with: fusermount3 -u {}",
                mnt.display(),
                child.id(),
                log.display(),
                mnt.display()
            );
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            let text = std::fs::read(log).unwrap_or_default();
            let tail = String::from_utf8_lossy(text.get(start_len as usize..).unwrap_or_default());
            bail!(
                "the mount daemon exited ({st}) before the mount appeared:\n{}",
                tail.trim_end()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("{} did not appear as a mount within 30 s", mnt.display())
}

fn state_dir_or_default(d: Option<PathBuf>) -> PathBuf {
    host::socket::state_dir(d.as_deref(), None)
}

fn rdm_cmd(c: RdmCmd) -> Result<ExitCode> {
    match c {
        RdmCmd::Create { mode, args, host } => {
            let (url, rest) = args.split_first().context("LUN-URL")?;
            hosted::rdm_create(&mode, url, rest, &host)?;
            Ok(ExitCode::SUCCESS)
        }
        RdmCmd::Info { args, state_dir } => Ok(
            if hosted::rdm_info(&args, &state_dir_or_default(state_dir))? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            },
        ),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Mkfs {
            force,
            lease_ms,
            label,
            block_size,
            max_hosts,
            journal_size,
            luns,
        } => {
            let bs = u32::try_from(block_size).context("block size too large")?;
            let journal_blocks = match journal_size {
                None => 0,
                Some(n) if n % 4096 == 0 && n / 4096 <= u64::from(u32::MAX) => (n / 4096) as u32,
                Some(n) => bail!("--journal-size {n} is not a multiple of 4K"),
            };
            let t = vmfs::cluster::Timeouts::new(None, lease_ms)?;
            let opts = MkfsOptions {
                label,
                block_size: bs,
                max_hosts,
                journal_blocks,
                ..Default::default()
            };
            opts.check(luns.len())?;
            let opened = open_luns(&luns)?;
            vmfs::guard::check_overwrite(&opened, force, &t, "mkfs", &open_hint(&t))?.wipe()?;
            let fs = Fs::mkfs(opened, &opts)?;
            let u = fs.usage();
            println!(
                "created datastore {} over {} extent(s): {} ({} blocks of {}), {} host slots",
                vmfs::volume::uuid_str(&fs.vol().header.uuid),
                luns.len(),
                human(u.total_blocks * u.block_size),
                u.total_blocks,
                human(u.block_size),
                max_hosts
            );
        }
        Cmd::Info { ds } => hosted::info(&ds.luns, &state_dir_or_default(ds.state_dir), ds.json)?,
        Cmd::Status { state_dir, json } => hosted::status(&state_dir_or_default(state_dir), json)?,
        Cmd::Fsck { repair, luns } => {
            return Ok(match fsck(&luns, repair) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("vmfs fsck: could not run: {e:#}");
                    ExitCode::from(2)
                }
            });
        }
        Cmd::Mount {
            foreground,
            threads,
            log_file,
            host,
            args,
        } => mount(&args, foreground, threads, log_file, &host)?,
        Cmd::Hosts { ds } => hosted::hosts(&ds.luns, &state_dir_or_default(ds.state_dir), ds.json)?,
        Cmd::Locks { ds } => hosted::locks(&ds.luns, &state_dir_or_default(ds.state_dir), ds.json)?,
        Cmd::Crashtest(a) => return crashtest(a),
        Cmd::Rdm(c) => return rdm_cmd(c),
        Cmd::Disk(c) => return hosted::disk(c),
        Cmd::Scsi(c) => return scsi::run(c),
        Cmd::Backup(c) => return backup::run(c),
        Cmd::Extend {
            luns,
            add,
            force,
            host,
        } => hosted::extend(&luns, &add, force, &host)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Who this host is on the datastore, and its heartbeat timing.
#[derive(clap::Args, Clone)]
pub(crate) struct HostArgs {
    /// This host's UUID (default: kept in the state directory). Given
    /// without --state-dir, this process plays another machine, with its
    /// state in /var/lib/vmfs/hosts/UUID (how tests run several hosts on
    /// one machine).
    #[arg(long)]
    host_uuid: Option<uuid::Uuid>,
    /// Where this host keeps its UUID (file `host-uuid`, created on first
    /// use), its LUN list (`luns`) and its control sockets (`run/`)
    /// (default /var/lib/vmfs).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Heartbeat interval (default: lease / 8).
    #[arg(long)]
    pub(crate) heartbeat_ms: Option<u64>,
    /// Lease timeout: a host silent this long is dead (default 8000). This
    /// host stops writing when its last renewal is half a lease old.
    #[arg(long)]
    pub(crate) lease_ms: Option<u64>,
}

impl HostArgs {
    /// The state directory in effect.
    pub(crate) fn state_dir(&self) -> PathBuf {
        host::socket::state_dir(
            self.state_dir.as_deref(),
            self.host_uuid.map(|u| u.to_string()).as_deref(),
        )
    }

    pub(crate) fn uuid(&self) -> Result<[u8; 16]> {
        if let Some(u) = self.host_uuid {
            return Ok(*u.as_bytes());
        }
        let state_dir = self.state_dir();
        let f = state_dir.join("host-uuid");
        if let Ok(t) = std::fs::read_to_string(&f) {
            let u = uuid::Uuid::parse_str(t.trim())
                .with_context(|| format!("{} does not hold a UUID", f.display()))?;
            return Ok(*u.as_bytes());
        }
        std::fs::create_dir_all(&state_dir).with_context(|| {
            format!(
                "creating the state directory {} (give --state-dir or --host-uuid)",
                state_dir.display()
            )
        })?;
        let u = uuid::Uuid::new_v4();
        std::fs::write(&f, format!("{u}\n")).with_context(|| format!("writing {}", f.display()))?;
        Ok(*u.as_bytes())
    }
    /// The same choices as arguments for the background mount process.
    fn to_args(&self, uuid: &[u8; 16]) -> Vec<String> {
        let mut v = vec![
            "--host-uuid".into(),
            uuid::Uuid::from_bytes(*uuid).to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
        ];
        if let Some(h) = self.heartbeat_ms {
            v.extend(["--heartbeat-ms".into(), h.to_string()]);
        }
        if let Some(l) = self.lease_ms {
            v.extend(["--lease-ms".into(), l.to_string()]);
        }
        v
    }
}

#[derive(clap::Args)]
struct CrashArgs {
    /// Crash states to explore (the default is what CI runs).
    #[arg(long, default_value_t = 10_000)]
    states: u64,
    /// Longest exhaustive workload, in operations.
    #[arg(long, default_value_t = 3)]
    max_ops: usize,
    /// Run every workload of up to --max-ops operations (hundreds of
    /// thousands of states; hours) instead of sampling them.
    #[arg(long)]
    exhaustive: bool,
    /// Operations per long random workload (0: none).
    #[arg(long, default_value_t = 24)]
    random_ops: usize,
    /// Seed of the sampling and of the random workloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Crash states checked per workload.
    #[arg(long, default_value_t = 12)]
    per_workload: usize,
    /// Run one workload (operations separated by `;`), as a reproducer prints it.
    #[arg(long)]
    workload: Option<String>,
    /// With --workload: check only this crash state (SEGMENT:WRITES[:torn=W.S]).
    #[arg(long, requires = "workload")]
    crash: Option<String>,
    /// Crash states of virtual-disk workloads (writes into a chain,
    /// snapshot, revert, consolidate, grow, clone, and the freeze and
    /// merge of a running disk's consolidation), beside --states.
    #[arg(long, default_value_t = 4000)]
    disk_states: u64,
}

fn crashtest(a: CrashArgs) -> Result<ExitCode> {
    use vmfs_tools::crashtest::*;
    let h = Harness::new()?;
    let mut sum = Summary::default();
    let mut rng = Rng::new(a.seed);
    let t0 = std::time::Instant::now();
    let crash = a
        .crash
        .as_deref()
        .map(str::parse::<Crash>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if let Some(w) = a.workload.as_deref().filter(|w| w.starts_with("disk:")) {
        use vmfs_tools::crashdisk::*;
        let ops = parse_disk_ops(w).map_err(anyhow::Error::msg)?;
        DiskHarness::new()?.run_workload(
            &ops,
            a.per_workload.max(1) * 10,
            crash.as_ref(),
            &mut rng,
            &mut sum,
        );
    } else if let Some(w) = &a.workload {
        let ops = parse_ops(w).map_err(anyhow::Error::msg)?;
        let c = crash;
        h.run_workload(
            &ops,
            a.per_workload.max(1) * 10,
            c.as_ref(),
            &mut rng,
            &mut sum,
        );
    } else {
        let total = if a.exhaustive { u64::MAX } else { a.states };
        let bar = indicatif::ProgressBar::new(if a.exhaustive {
            exhaustive_count(a.max_ops)
        } else {
            a.states
        });
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} [{bar:40}] {elapsed} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let show = |sum: &Summary| {
            if a.exhaustive {
                bar.set_position(sum.workloads);
            } else {
                bar.set_position(sum.states.min(a.states));
            }
            bar.set_message(format!("{} failures", sum.failures.len()));
        };
        if a.exhaustive {
            for w in exhaustive(a.max_ops) {
                h.run_workload(&w, a.per_workload, None, &mut rng, &mut sum);
                show(&sum);
            }
        } else {
            // Three quarters of the budget: every single-operation workload,
            // then workloads of 2..=max_ops sampled from the exhaustive space;
            // the rest: long random workloads.
            let bounded = if a.random_ops > 0 {
                total * 3 / 4
            } else {
                total
            };
            for w in exhaustive(1) {
                h.run_workload(&w, a.per_workload, None, &mut rng, &mut sum);
                show(&sum);
            }
            let space = exhaustive_count(a.max_ops) - exhaustive_count(1);
            while sum.states < bounded && space > 0 {
                let len = 2 + rng.below(a.max_ops.saturating_sub(1) as u64) as usize;
                let mut w = Vec::new();
                for _ in 0..len {
                    w.extend(random_workload(&mut rng, 1));
                }
                h.run_workload(&w, a.per_workload, None, &mut rng, &mut sum);
                show(&sum);
            }
            while sum.states < total && a.random_ops > 0 {
                let w = random_workload(&mut rng, a.random_ops);
                h.run_workload(&w, a.per_workload * 4, None, &mut rng, &mut sum);
                show(&sum);
            }
        }
        bar.finish_and_clear();
        if !a.exhaustive && a.disk_states > 0 {
            use vmfs_tools::crashdisk::*;
            let dh = DiskHarness::new()?;
            let goal = sum.states + a.disk_states;
            while sum.states < goal {
                let len = 4 + rng.below(12) as usize;
                let w = random_disk_workload(&mut rng, len);
                dh.run_workload(&w, a.per_workload * 3, None, &mut rng, &mut sum);
            }
        }
    }
    println!(
        "{} workloads, {} crash states explored ({} needed a journal replay), {} failures, {:.0} s",
        sum.workloads,
        sum.states,
        sum.replayed,
        sum.failures.len(),
        t0.elapsed().as_secs_f64()
    );
    for f in sum.failures.iter().take(50) {
        println!("FAIL {}\n     {}", f.what, f.reproducer());
    }
    if sum.failures.len() > 50 {
        println!("... and {} more", sum.failures.len() - 50);
    }
    Ok(if sum.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The harness mounts thousands of images: only warnings by default.
    let default = if matches!(cli.cmd, Cmd::Crashtest(_)) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: never in a log file
        // (the background mount's) or a pipe (CI).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmfs: {e:#}");
            ExitCode::from(2)
        }
    }
}
