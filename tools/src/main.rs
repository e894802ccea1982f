//! `vmfs`: make, inspect, check, mount and grow datastores.
//! A thin layer: parse arguments, call the libraries, print.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmfs::{Fs, MkfsOptions};

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
        #[arg(required = true)]
        luns: Vec<String>,
    },
    /// Locks held on disk: object, mode, owner slot/host, generation.
    Locks {
        #[arg(required = true)]
        luns: Vec<String>,
    },
    /// Show the volume, its extents, usage and free space.
    Info {
        #[arg(required = true)]
        luns: Vec<String>,
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
    /// Grow the datastore by one LUN.
    Extend {
        #[arg(required = true)]
        luns: Vec<String>,
        /// The LUN to add. Refused if it holds anything (as for mkfs) unless
        /// --force; refused always if it belongs to a datastore in use.
        #[arg(long)]
        add: String,
        /// Overwrite what the new LUN holds (never a datastore a host uses).
        #[arg(long)]
        force: bool,
        /// While other hosts have it mounted, this command joins as a host
        /// for the time of the change.
        #[command(flatten)]
        host: HostArgs,
    },
    /// Raw device mappings: a file on the datastore that stands for a whole LUN.
    #[command(subcommand)]
    Rdm(RdmCmd),
}

#[derive(Subcommand)]
enum RdmCmd {
    /// Map LUN-URL as a file PATH (from the datastore's root) on the datastore
    /// over DATASTORE-LUN...: records the LUN's identity, size, the mode and
    /// the URL. A LUN of a datastore is refused.
    #[command(
        override_usage = "vmfs rdm create --mode virtual|physical [HOST OPTIONS] LUN-URL DATASTORE-LUN... PATH"
    )]
    Create {
        /// virtual (a virtual disk over the LUN; snapshots allowed) or
        /// physical (SCSI commands pass through; no snapshots).
        #[arg(long, value_parser = ["virtual", "physical"])]
        mode: String,
        /// LUN-URL, then the datastore's LUNs, then the path of the mapping.
        #[arg(required = true, num_args = 3..)]
        args: Vec<String>,
        /// While other hosts have the datastore mounted, this command joins
        /// as a host for the time of the change.
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show a mapping and whether this host reaches its LUN unchanged (exit 1
    /// if not): the LUNs listed in STATE_DIR/luns are searched, then the
    /// mapping's URL hint.
    #[command(override_usage = "vmfs rdm info [--state-dir DIR] DATASTORE-LUN... PATH")]
    Info {
        #[arg(required = true, num_args = 2..)]
        args: Vec<String>,
        /// Where this host keeps its LUN list (file `luns`, one URL per line).
        #[arg(long, default_value = "/var/lib/vmfs")]
        state_dir: PathBuf,
    },
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|_| format!("{s:?} is not a size like 1M or 65536"))
}

fn open_luns(specs: &[String]) -> Result<Vec<Arc<dyn lun::Lun>>> {
    open_luns_with(specs, lun::OpenOptions::default())
}

/// Open LUNs for a host of the cluster: network I/O bounded by the I/O
/// timeout its lease implies (see `Timeouts::io`).
fn open_luns_for(specs: &[String], t: &vmfs::cluster::Timeouts) -> Result<Vec<Arc<dyn lun::Lun>>> {
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

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// `vmfs locks`: every lock that is not free, with its holders and
/// whether each holder is still the live incarnation of its slot.
fn locks(specs: &[String]) -> Result<()> {
    let luns = open_luns(specs)?;
    // The slots as they are on disk: opening for the check below replays
    // journals (in memory) and so frees slots in its own view.
    let slots: Vec<_> = vmfs::volume::Volume::open(luns.clone())?
        .read_slots()?
        .into_iter()
        .map(|(h, _)| h.ok())
        .collect();
    let fs = Fs::open_for_check(luns, false)?;
    let held = fs.held_locks()?;
    println!(
        "locks by {}",
        vmfs::locking::Method::for_lun(&*fs.vol().luns[0]).describe()
    );
    let current = |h: &vmfs::locking::Holder| {
        matches!(slots.get(h.slot as usize).and_then(|s| s.as_ref()),
            Some(s) if s.generation == h.generation && s.state != vmfs::format::SLOT_FREE)
    };
    // A lock whose every holder is gone (its slot recovered or freed since)
    // is free: counted, not listed.
    let (live, stale): (Vec<_>, Vec<_>) = held
        .into_iter()
        .partition(|(_, rec)| rec.holders.iter().any(current));
    if live.is_empty() {
        println!("no lock is held");
    }
    for (what, rec) in live {
        println!(
            "{what}: {}, lock generation {}",
            rec.mode.name(),
            rec.generation
        );
        for h in &rec.holders {
            let (who, state) = match slots.get(h.slot as usize).and_then(|s| s.as_ref()) {
                Some(s) if current(h) => (vmfs::volume::uuid_str(&s.host), "held"),
                Some(s) => (
                    vmfs::volume::uuid_str(&s.host),
                    "stale: the slot was freed or recovered since (not a holder any more)",
                ),
                None => ("?".to_string(), "no such slot"),
            };
            println!(
                "  slot {} generation {}  host {who}  {state}",
                h.slot, h.generation
            );
        }
    }
    if !stale.is_empty() {
        println!(
            "{} lock sector(s) still name only hosts recovered or gone since: those locks are free",
            stale.len()
        );
    }
    fs.abandon();
    Ok(())
}

fn info(specs: &[String]) -> Result<()> {
    let luns = open_luns(specs)?;
    let slots: Vec<_> = {
        let vol = vmfs::volume::Volume::open(luns.clone())?;
        (0u32..)
            .zip(vol.read_slots()?)
            .map(|(s, (hs, _))| (s, hs))
            .collect()
    };
    // Opened over copy-on-write LUNs: a journal replay stays in memory.
    let fs = Fs::open_for_check(luns, false)?;
    let h = &fs.vol().header;
    let u = fs.usage();
    println!("volume      {}", vmfs::volume::uuid_str(&h.uuid));
    println!(
        "label       {}",
        if h.label.is_empty() { "-" } else { &h.label }
    );
    println!(
        "format      version {}, configuration generation {}",
        vmfs::format::VERSION,
        h.config_gen
    );
    println!(
        "block size  {} (sub-blocks {})",
        human(u.block_size),
        human(u64::from(h.sub_block_size))
    );
    println!("host slots  {}", h.max_hosts);
    println!(
        "journals    {} per host, allocated at a host's first mount",
        human(u64::from(h.journal_blocks) * 4096)
    );
    for (s, hs) in slots {
        match hs {
            Ok(hs) if hs.journal != 0 || hs.state != vmfs::format::SLOT_FREE => println!(
                "  slot {s}: {}, generation {}, journal at 4K block {:#x} ({})",
                match hs.state {
                    vmfs::format::SLOT_LIVE => "mounted (or not cleanly unmounted)",
                    vmfs::format::SLOT_REPLAYING => "being replayed",
                    _ => "free",
                },
                hs.generation,
                hs.journal,
                human(u64::from(hs.journal_blocks) * 4096)
            ),
            Ok(_) => {}
            Err(e) => println!("  slot {s}: {e}"),
        }
    }
    for (s, rep) in fs.replays() {
        println!(
            "  slot {s}: journal holds committed work: {rep} (in memory only; mount applies it)"
        );
    }
    println!(
        "capacity    {} ({} blocks)",
        human(u.total_blocks * u.block_size),
        u.total_blocks
    );
    println!(
        "free        {} ({} blocks, {:.1}%)",
        human(u.free_blocks * u.block_size),
        u.free_blocks,
        100.0 * u.free_blocks as f64 / u.total_blocks as f64
    );
    println!(
        "files       {} in use, {} descriptors free in {} clusters",
        u.fds_used, u.fds_free, u.fd_clusters
    );
    println!(
        "locks       {}",
        vmfs::locking::Method::for_lun(&*fs.vol().luns[0]).describe()
    );
    println!("extents     {}", h.extents.len());
    for (i, (e, l)) in h.extents.iter().zip(&fs.vol().luns).enumerate() {
        let atomic = if l.has_compare_and_write() {
            "compare-and-write"
        } else {
            "no compare-and-write"
        };
        println!(
            "  [{i}] {}  {}  blocks {}..{}  {}  {}",
            vmfs::volume::uuid_str(&e.uuid),
            human(e.nblocks * u.block_size),
            e.first_block,
            e.first_block + e.nblocks,
            l.name(),
            atomic
        );
        if let Some(note) = l.compare_and_write_note() {
            println!("      {note}");
        }
    }
    Ok(())
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
    match rdm::host_luns(&host.state_dir) {
        Ok(list) => fs.set_rdm_luns(list),
        Err(e) => tracing::warn!(
            "cannot read this host's LUN list {}: {e}; raw device mappings are found by their URL hints only",
            host.state_dir.join("luns").display()
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
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the signal handler")?;
    vmfs::fuse::serve(fs, &mnt, threads, rx)?;
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
        Cmd::Info { luns } => info(&luns)?,
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
        Cmd::Hosts { luns } => hosts(&luns)?,
        Cmd::Locks { luns } => locks(&luns)?,
        Cmd::Crashtest(a) => return crashtest(a),
        Cmd::Rdm(c) => return rdm_cmd(c),
        Cmd::Extend {
            luns,
            add,
            force,
            host,
        } => {
            let t = vmfs::cluster::Timeouts::new(host.heartbeat_ms, host.lease_ms)?;
            let luns = open_luns_for(&luns, &t)?;
            let new = lun::open_with(&add, t.lun_options())
                .with_context(|| format!("opening LUN {}", lun::redact(&add)))?;
            let checked = vmfs::guard::check_overwrite(
                std::slice::from_ref(&new),
                force,
                &t,
                "extend",
                &open_hint(&t),
            )?;
            let live = vmfs::cluster::live_slots(&vmfs::Volume::open(luns.clone())?, &t)?;
            // Offline, or online: as one more host, under the volume lock;
            // the mounted hosts pick the new extent up by its URL.
            let fs = if live.is_empty() {
                Fs::open(luns)?
            } else {
                eprintln!(
                    "{} host(s) have the datastore mounted: extending online",
                    live.len()
                );
                Fs::mount(luns, host.uuid()?, t)?
            };
            let before = fs.usage().total_blocks;
            checked.wipe()?;
            fs.extend(new)?;
            let u = fs.usage();
            println!(
                "added {add}: {} -> {} ({} extents)",
                human(before * u.block_size),
                human(u.total_blocks * u.block_size),
                fs.vol().header.extents.len()
            );
            fs.unmount()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Walk `path` (from the root, `/`-separated) to its parent directory;
/// returns (parent, last name).
fn parent_of(fs: &Fs, path: &str) -> Result<(u64, Vec<u8>)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let Some((last, dirs)) = parts.split_last() else {
        bail!("{path:?}: give a path to a file inside the datastore");
    };
    let mut dir = fs.root();
    for d in dirs {
        dir = fs
            .lookup(dir, d.as_bytes())
            .with_context(|| format!("{path}: directory {d:?}"))?
            .addr;
    }
    Ok((dir, last.as_bytes().to_vec()))
}

/// Does this LUN carry a datastore's volume header?
fn is_datastore_lun(l: &dyn lun::Lun) -> bool {
    let mut b = vec![0u8; vmfs::format::MD];
    l.read_at(&mut b, 0).is_ok() && vmfs::format::VolumeHeader::decode(&b, None).is_ok()
}

fn rdm_cmd(c: RdmCmd) -> Result<ExitCode> {
    match c {
        RdmCmd::Create { mode, args, host } => {
            let mode = rdm::Mode::parse(&mode).context("--mode is virtual or physical")?;
            let (url, rest) = args.split_first().context("LUN-URL")?;
            let (path, ds) = rest.split_last().context("PATH")?;
            let t = vmfs::cluster::Timeouts::new(host.heartbeat_ms, host.lease_ms)?;
            let target = lun::open_with(url, t.lun_options())
                .with_context(|| format!("opening LUN {}", lun::redact(url)))?;
            let luns = open_luns_for(ds, &t)?;
            let m = rdm::create(&*target, mode, &luns, is_datastore_lun)?;
            let live = vmfs::cluster::live_slots(&vmfs::Volume::open(luns.clone())?, &t)?;
            let fs = if live.is_empty() {
                Fs::open(luns)?
            } else {
                Fs::mount(luns, host.uuid()?, t)?
            };
            let r = (|| -> Result<()> {
                let (dir, name) = parent_of(&fs, path)?;
                fs.create_mapping(dir, &name, &m.encode(), m.size)
                    .with_context(|| format!("creating the mapping file {path}"))?;
                Ok(())
            })();
            fs.unmount()?;
            r?;
            println!(
                "{path}: {} mapping of {} ({}, {})",
                mode.name(),
                m.url_hint,
                m.identity,
                human(m.size)
            );
            Ok(ExitCode::SUCCESS)
        }
        RdmCmd::Info { args, state_dir } => {
            let (path, ds) = args.split_last().context("PATH")?;
            let fs = Fs::open_for_check(open_luns(ds)?, false)?;
            let (dir, name) = parent_of(&fs, path)?;
            let ino = fs
                .lookup(dir, &name)
                .with_context(|| format!("{path}: no such file in the datastore"))?;
            if ino.flags & vmfs::format::FD_FLAG_RDM == 0 {
                bail!("{path}: not a raw device mapping (an ordinary file)");
            }
            let m = fs
                .mapping_of(&ino)
                .with_context(|| format!("{path}: reading the mapping"))?;
            println!("mapping     {path}");
            println!("mode        {} ({})", m.mode.name(), m.mode.create_type());
            println!("identity    {}", m.identity);
            println!(
                "size        {} ({} bytes, {}-byte blocks)",
                human(m.size),
                m.size,
                m.block_size
            );
            println!("url hint    {}", m.url_hint);
            let list = rdm::host_luns(&state_dir)
                .with_context(|| format!("reading {}", state_dir.join("luns").display()))?;
            match rdm::resolve(&m, &list, lun::OpenOptions::default()) {
                Ok(l) => {
                    println!("lun         {} (identity and size match)", l.name());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("lun         not usable: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

/// Who this host is on the datastore, and its heartbeat timing.
#[derive(clap::Args, Clone)]
struct HostArgs {
    /// This host's UUID (default: kept in --state-dir).
    #[arg(long, conflicts_with = "state_dir")]
    host_uuid: Option<uuid::Uuid>,
    /// Where this host keeps its UUID (file `host-uuid`, created on first use).
    #[arg(long, default_value = "/var/lib/vmfs")]
    state_dir: PathBuf,
    /// Heartbeat interval (default: lease / 8).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Lease timeout: a host silent this long is dead (default 8000). This
    /// host stops writing when its last renewal is half a lease old.
    #[arg(long)]
    lease_ms: Option<u64>,
}

impl HostArgs {
    fn uuid(&self) -> Result<[u8; 16]> {
        if let Some(u) = self.host_uuid {
            return Ok(*u.as_bytes());
        }
        let f = self.state_dir.join("host-uuid");
        if let Ok(t) = std::fs::read_to_string(&f) {
            let u = uuid::Uuid::parse_str(t.trim())
                .with_context(|| format!("{} does not hold a UUID", f.display()))?;
            return Ok(*u.as_bytes());
        }
        std::fs::create_dir_all(&self.state_dir).with_context(|| {
            format!(
                "creating the state directory {} (give --state-dir or --host-uuid)",
                self.state_dir.display()
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

fn hosts(specs: &[String]) -> Result<()> {
    let vol = vmfs::Volume::open(open_luns(specs)?)?;
    let read = || -> Result<Vec<_>> {
        vol.read_slots()?
            .into_iter()
            .map(|(hs, _)| Ok(hs?))
            .collect()
    };
    let first = read()?;
    // Liveness is a change seen on this host's clock: watch for two seconds.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let second = read()?;
    let mut shown = 0;
    for (s, (a, b)) in first.iter().zip(&second).enumerate() {
        if b.state == vmfs::format::SLOT_FREE && b.journal == 0 && b.host == [0; 16] {
            continue;
        }
        shown += 1;
        let state = match b.state {
            vmfs::format::SLOT_LIVE if a.heartbeat != b.heartbeat => {
                "live (heartbeat moving)".to_string()
            }
            vmfs::format::SLOT_LIVE => {
                "live?  (no heartbeat change in 2 s: stopped, or a slow heartbeat)".to_string()
            }
            vmfs::format::SLOT_REPLAYING => format!("being recovered by slot {}", b.replayer),
            _ => "free".to_string(),
        };
        println!(
            "slot {s:4}  {state}\n           host {}  generation {}  heartbeat {}  journal {}",
            vmfs::volume::uuid_str(&b.host),
            b.generation,
            b.heartbeat,
            if b.journal == 0 {
                "none".to_string()
            } else {
                format!(
                    "at 4K block {:#x} ({} KiB)",
                    b.journal,
                    u64::from(b.journal_blocks) * 4
                )
            }
        );
    }
    if shown == 0 {
        println!("no host has mounted this datastore");
    }
    Ok(())
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
}

fn crashtest(a: CrashArgs) -> Result<ExitCode> {
    use vmfs_tools::crashtest::*;
    let h = Harness::new()?;
    let mut sum = Summary::default();
    let mut rng = Rng::new(a.seed);
    let t0 = std::time::Instant::now();
    if let Some(w) = &a.workload {
        let ops = parse_ops(w).map_err(anyhow::Error::msg)?;
        let c = a
            .crash
            .as_deref()
            .map(str::parse::<Crash>)
            .transpose()
            .map_err(anyhow::Error::msg)?;
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
