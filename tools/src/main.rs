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
    /// Create a datastore over one or more LUNs (destroys what they hold).
    Mkfs {
        /// A name for the datastore (up to 63 bytes).
        #[arg(long, default_value = "")]
        label: String,
        /// File block size: a power of two from 64K to 64M.
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        block_size: u64,
        /// Host slots (hosts that may mount at once), 1 to 1024.
        #[arg(long, default_value_t = 64)]
        max_hosts: u32,
        /// LUNs: paths or URLs (file:///path, nbd://host[:port]/export, nbd+unix:///export?socket=/path).
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
        /// LUNs, then the mountpoint.
        #[arg(required = true, num_args = 2..)]
        args: Vec<String>,
    },
    /// Grow the datastore by one LUN.
    Extend {
        #[arg(required = true)]
        luns: Vec<String>,
        /// The LUN to add.
        #[arg(long)]
        add: String,
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
    specs
        .iter()
        .map(|s| lun::open(s).with_context(|| format!("opening LUN {s}")))
        .collect()
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

fn info(specs: &[String]) -> Result<()> {
    let fs = Fs::open(open_luns(specs)?)?;
    let h = &fs.vol.header;
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
    println!("extents     {}", h.extents.len());
    for (i, (e, l)) in h.extents.iter().zip(&fs.vol.luns).enumerate() {
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
    }
    Ok(())
}

fn fsck(specs: &[String], repair: bool) -> Result<bool> {
    let fs = Fs::open(open_luns(specs)?)?;
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
) -> Result<()> {
    let (mnt, specs) = args.split_last().expect("clap requires two");
    let mnt = PathBuf::from(mnt);
    if !mnt.is_dir() {
        bail!("mountpoint {} is not a directory", mnt.display());
    }
    // Validate before anything else, in the foreground, so errors reach the user.
    let fs = Arc::new(Fs::open(open_luns(specs)?)?);
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
        return daemonize(args, threads, &mnt, &log);
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
            label,
            block_size,
            max_hosts,
            luns,
        } => {
            let bs = u32::try_from(block_size).context("block size too large")?;
            let fs = Fs::mkfs(
                open_luns(&luns)?,
                &MkfsOptions {
                    label,
                    block_size: bs,
                    max_hosts,
                    ..Default::default()
                },
            )?;
            let u = fs.usage();
            println!(
                "created datastore {} over {} extent(s): {} ({} blocks of {}), {} host slots",
                vmfs::volume::uuid_str(&fs.vol.header.uuid),
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
            args,
        } => mount(&args, foreground, threads, log_file)?,
        Cmd::Extend { luns, add } => {
            let mut fs = Fs::open(open_luns(&luns)?)?;
            let before = fs.usage().total_blocks;
            fs.extend(lun::open(&add).with_context(|| format!("opening LUN {add}"))?)?;
            let u = fs.usage();
            println!(
                "added {add}: {} -> {} ({} extents)",
                human(before * u.block_size),
                human(u.total_blocks * u.block_size),
                fs.vol.header.extents.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmfs: {e:#}");
            ExitCode::from(2)
        }
    }
}
