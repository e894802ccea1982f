//! The file API ([`vmfs::File`]) against the LUN file itself, side by side
//! in one run: 4 KiB random reads and writes and 1 MiB sequential reads and
//! writes, from 1 and from 8 threads. The datastore is mounted as a host
//! (heartbeat, locks, journal) alone on a file LUN; the baseline is a raw
//! file of the same size on the same disk, through the same LUN backend
//! (`lun::open`). Write runs end with a flush (the file API's: metadata
//! commit and LUN flush; the LUN's: fdatasync). Each figure is the rate of two runs of each side, run
//! A B B A with both files' pages dropped before each run. Prints the
//! ratios and the 8-thread/1-thread scaling. Not a test: no pass/fail.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use vmfs::{Fs, LockMode, MkfsOptions};

#[derive(Parser)]
#[command(about = "vmfs file API vs. the LUN file, 1 and 8 threads")]
struct Args {
    /// Scratch directory on the disk to measure (needs ~3x --size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// File size in MiB.
    #[arg(long, default_value_t = 1024)]
    size: u64,
    /// 4 KiB operations per random run (split among the threads).
    #[arg(long, default_value_t = 40000)]
    random_ops: u64,
    /// Threads of the parallel runs.
    #[arg(long, default_value_t = 8)]
    threads: u64,
}

/// Positional I/O on one side.
trait Side: Sync {
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()>;
    fn write(&self, buf: &[u8], off: u64) -> Result<()>;
    /// Make the writes durable (a write run ends with it).
    fn sync(&self) -> Result<()>;
    fn evict(&self);
}

struct Raw {
    lun: Arc<dyn lun::Lun>,
    path: PathBuf,
}

impl Side for Raw {
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        Ok(self.lun.read_at(buf, off)?)
    }
    fn write(&self, buf: &[u8], off: u64) -> Result<()> {
        Ok(self.lun.write_at(buf, off)?)
    }
    fn sync(&self) -> Result<()> {
        Ok(self.lun.flush()?)
    }
    fn evict(&self) {
        evict(&self.path)
    }
}

struct Api {
    file: vmfs::File,
    lun_path: PathBuf,
}

impl Side for Api {
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        Ok(self.file.read_exact_at(buf, off)?)
    }
    fn write(&self, buf: &[u8], off: u64) -> Result<()> {
        Ok(self.file.write_at(buf, off)?)
    }
    fn sync(&self) -> Result<()> {
        Ok(self.file.flush()?)
    }
    fn evict(&self) {
        evict(&self.lun_path)
    }
}

/// Drop a file's pages from the page cache so reads go to the disk.
fn evict(p: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.sync_all();
        // SAFETY: plain integer arguments on a valid fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

#[derive(Clone, Copy)]
enum Kind {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::RandRead => "rand read 4K",
            Kind::RandWrite => "rand write 4K",
            Kind::SeqRead => "seq read 1M",
            Kind::SeqWrite => "seq write 1M",
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Kind::RandRead | Kind::RandWrite => "IOPS",
            _ => "MB/s",
        }
    }
}

/// One run of `kind` with `threads` threads: IOPS or MB/s.
fn run(side: &dyn Side, kind: Kind, threads: u64, size_mib: u64, ops: u64) -> Result<f64> {
    side.evict();
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..threads)
            .map(|k| {
                s.spawn(move || -> Result<()> {
                    match kind {
                        Kind::RandRead | Kind::RandWrite => {
                            let mut buf = vec![0x5au8; 4096];
                            let mut x = 0x2545f4914f6cdd1du64 ^ (k + 1).wrapping_mul(0x9e37);
                            for _ in 0..ops / threads {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let off = (x % (size_mib * 256)) * 4096;
                                if let Kind::RandRead = kind {
                                    side.read(&mut buf, off)?;
                                } else {
                                    side.write(&buf, off)?;
                                }
                            }
                        }
                        Kind::SeqRead | Kind::SeqWrite => {
                            // Thread k: its own stripe of the file.
                            let mut buf = vec![0xa5u8; 1 << 20];
                            let per = size_mib / threads;
                            for m in k * per..(k + 1) * per {
                                if let Kind::SeqRead = kind {
                                    side.read(&mut buf, m << 20)?;
                                } else {
                                    side.write(&buf, m << 20)?;
                                }
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("a thread panicked"))??;
        }
        Ok(())
    })?;
    if let Kind::RandWrite | Kind::SeqWrite = kind {
        side.sync()?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(match kind {
        Kind::RandRead | Kind::RandWrite => (ops / threads * threads) as f64 / secs,
        _ => (size_mib / threads * threads) as f64 * 1.048576 / secs,
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = a.dir.join(format!("vmfs-filebench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let size = a.size;
    let lun_path = dir.join("lun.img");
    let raw_path = dir.join("raw.img");
    std::fs::File::create(&lun_path)?.set_len((size + 256) << 20)?;
    std::fs::File::create(&raw_path)?.set_len(size << 20)?;
    let raw_lun = lun::open(raw_path.to_str().context("path")?)?;

    let luns = vec![lun::open(lun_path.to_str().context("path")?)?];
    let opts = MkfsOptions {
        block_size: 1 << 20,
        ..Default::default()
    };
    Fs::mkfs(luns, &opts)?.unmount()?;
    let t = vmfs::cluster::Timeouts::default();
    let luns = vec![lun::open(lun_path.to_str().context("path")?)?];
    let fs = Arc::new(Fs::mount(luns, *uuid::Uuid::new_v4().as_bytes(), t)?);
    let file = fs.create_file("disk-flat.vmdk", 0o600, LockMode::Exclusive)?;
    // Write every byte of both once, untimed (a thick disk).
    let buf = vec![1u8; 1 << 20];
    for k in 0..size {
        file.write_at(&buf, k << 20)?;
        raw_lun.write_at(&buf, k << 20)?;
    }
    file.flush()?;
    raw_lun.flush()?;
    let raw = Raw {
        lun: raw_lun,
        path: raw_path,
    };
    let api = Api {
        file,
        lun_path: lun_path.clone(),
    };

    println!(
        "vmfs-filebench: {size} MiB file, 1 MiB blocks, {} random ops per run, scratch {}",
        a.random_ops,
        dir.display()
    );
    println!(
        "{:<28} {:>10} {:>10} {:<5} {:>7}   goal",
        "", "LUN file", "file API", "unit", "ratio"
    );
    let mut ours = std::collections::HashMap::new();
    let mut base = std::collections::HashMap::new();
    for kind in [
        Kind::SeqWrite,
        Kind::SeqRead,
        Kind::RandRead,
        Kind::RandWrite,
    ] {
        for threads in [1, a.threads] {
            let b1 = run(&raw, kind, threads, size, a.random_ops)?;
            let o1 = run(&api, kind, threads, size, a.random_ops)?;
            let o2 = run(&api, kind, threads, size, a.random_ops)?;
            let b2 = run(&raw, kind, threads, size, a.random_ops)?;
            let rate = |x: f64, y: f64| 2.0 / (1.0 / x + 1.0 / y);
            let (b, o) = (rate(b1, b2), rate(o1, o2));
            base.insert((kind.name(), threads), b);
            ours.insert((kind.name(), threads), o);
            let goal = match kind {
                Kind::SeqRead | Kind::SeqWrite => ">= 0.95x",
                _ => ">= 0.90x",
            };
            println!(
                "{:<28} {b:>10.0} {o:>10.0} {:<5} {:>6.2}x   {goal}",
                format!("{} x{threads}", kind.name()),
                kind.unit(),
                o / b
            );
        }
    }
    println!("scaling, {} threads / 1 thread:", a.threads);
    for kind in [
        Kind::SeqWrite,
        Kind::SeqRead,
        Kind::RandRead,
        Kind::RandWrite,
    ] {
        let s = |m: &std::collections::HashMap<(&str, u64), f64>| {
            m[&(kind.name(), a.threads)] / m[&(kind.name(), 1)]
        };
        println!(
            "{:<28} {:>9.2}x {:>9.2}x         goal for the file API >= 1.6x",
            kind.name(),
            s(&base),
            s(&ours)
        );
    }
    drop(api);
    fs.unmount()?;
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
