//! Throughput of the datastore against its baselines, side by side in one run:
//! the library vs. the raw LUN file, and the FUSE mount vs. a raw file on the
//! same disk. Prints MB/s (or IOPS) and the ratio. Not a test: no pass/fail.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use vmfs::format::S_IFREG;
use vmfs::{Fs, MkfsOptions};

#[derive(Parser)]
#[command(about = "vmfs throughput vs. the raw LUN and a raw file")]
struct Args {
    /// Scratch directory on the disk to measure (needs ~3x --size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// File size in MiB.
    #[arg(long, default_value_t = 1024)]
    size: u64,
    /// Random 4 KiB reads per run.
    #[arg(long, default_value_t = 20000)]
    random_reads: u64,
    /// Rounds, alternating baseline and vmfs; the medians are reported
    /// (a virtual disk's throughput swings between runs).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Drop a file's pages from the page cache so reads go to the disk.
fn evict(p: &Path) {
    if let Ok(f) = File::open(p) {
        let _ = f.sync_all();
        // SAFETY: plain integer arguments on a valid fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

struct Io<'a> {
    write: Box<dyn Fn(&[u8], u64) -> Result<()> + 'a>,
    read: Box<dyn Fn(&mut [u8], u64) -> Result<()> + 'a>,
    sync: Box<dyn Fn() -> Result<()> + 'a>,
    evict: Box<dyn Fn() + 'a>,
}

struct Figures {
    seq_write: f64,
    seq_read: f64,
    rand_read: f64,
}

fn measure(io: &Io, size: u64, nrand: u64) -> Result<Figures> {
    let mb = 1u64 << 20;
    let buf = vec![0xa5u8; mb as usize];
    let t = Instant::now();
    for k in 0..size {
        (io.write)(&buf, k * mb)?;
    }
    (io.sync)()?;
    let seq_write = size as f64 / t.elapsed().as_secs_f64();
    (io.evict)();
    let mut rb = vec![0u8; mb as usize];
    let t = Instant::now();
    for k in 0..size {
        (io.read)(&mut rb, k * mb)?;
    }
    let seq_read = size as f64 / t.elapsed().as_secs_f64();
    (io.evict)();
    let mut x = 0x2545f4914f6cdd1du64;
    let mut small = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..nrand {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (io.read)(&mut small, (x % (size * 256)) * 4096)?;
    }
    let rand_read = nrand as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        seq_write,
        seq_read,
        rand_read,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Alternate baseline and vmfs `rounds` times; medians of each figure.
fn compare(
    base: &Io,
    ours: &Io,
    size: u64,
    nrand: u64,
    rounds: usize,
) -> Result<(Figures, Figures)> {
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        b.push(measure(base, size, nrand)?);
        o.push(measure(ours, size, nrand)?);
    }
    let med = |v: &[Figures]| Figures {
        seq_write: median(v.iter().map(|f| f.seq_write).collect()),
        seq_read: median(v.iter().map(|f| f.seq_read).collect()),
        rand_read: median(v.iter().map(|f| f.rand_read).collect()),
    };
    Ok((med(&b), med(&o)))
}

fn row(name: &str, unit: &str, base: f64, ours: f64, goal: &str) {
    println!(
        "{name:<34} {base:>10.0} {ours:>10.0} {unit:<5} {:>6.2}x   {goal}",
        ours / base
    );
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = a.dir.join(format!("vmfs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let size = a.size;
    let lun_path = dir.join("lun.img");
    let raw_path = dir.join("raw.img");
    let lun_size = (size + 64) << 20;
    File::create(&lun_path)?.set_len(lun_size)?;
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)?;
    raw.set_len(size << 20)?;

    // Preallocate both: write every byte once, untimed.
    let lun: Arc<dyn lun::Lun> = lun::open(lun_path.to_str().context("path")?)?;
    let fs = Arc::new(Fs::mkfs(vec![lun], &MkfsOptions::default())?);
    let f = fs.create(fs.root(), b"disk", S_IFREG | 0o644, 0, 0, 0, None)?;
    let buf = vec![1u8; 1 << 20];
    for k in 0..size {
        fs.write(f.addr, k << 20, &buf)?;
        raw.write_all_at(&buf, k << 20)?;
    }
    fs.sync()?;
    raw.sync_all()?;

    let raw_io = Io {
        write: Box::new(|b, o| Ok(raw.write_all_at(b, o)?)),
        read: Box::new(|b, o| Ok(raw.read_exact_at(b, o)?)),
        sync: Box::new(|| Ok(raw.sync_data()?)),
        evict: Box::new(|| evict(&raw_path)),
    };
    let fid = f.addr;
    let lib_io = Io {
        write: Box::new(|b, o| {
            fs.write(fid, o, b)?;
            Ok(())
        }),
        read: Box::new(|b, o| {
            fs.read_into(fid, o, b)?;
            Ok(())
        }),
        sync: Box::new(|| Ok(fs.sync()?)),
        evict: Box::new(|| evict(&lun_path)),
    };
    println!("vmfs-bench: {size} MiB file, {} random 4 KiB reads, median of {} alternating rounds, scratch {}", a.random_reads, a.rounds, dir.display());
    println!(
        "{:<34} {:>10} {:>10} {:<5} {:>7}   goal",
        "", "baseline", "vmfs", "unit", "ratio"
    );
    let (rb, lb) = compare(&raw_io, &lib_io, size, a.random_reads, a.rounds)?;
    row(
        "library seq write 1M vs raw LUN",
        "MB/s",
        rb.seq_write,
        lb.seq_write,
        ">= 0.95x",
    );
    row(
        "library seq read 1M vs raw LUN",
        "MB/s",
        rb.seq_read,
        lb.seq_read,
        ">= 0.95x",
    );
    row(
        "library rand read 4K vs raw LUN",
        "IOPS",
        rb.rand_read,
        lb.rand_read,
        ">= 0.90x",
    );

    // The same through the FUSE mount vs. the raw backing file.
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let fs2 = fs.clone();
    let m2 = mnt.clone();
    let server = std::thread::spawn(move || vmfs::fuse::serve(fs2, &m2, 4, rx));
    let t = Instant::now();
    while !std::fs::read_to_string("/proc/self/mountinfo")?.contains(mnt.to_str().context("path")?)
    {
        anyhow::ensure!(t.elapsed().as_secs() < 20, "mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mounted_path = mnt.join("disk");
    let mf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mounted_path)?;
    let fuse_io = Io {
        write: Box::new(|b, o| Ok(mf.write_all_at(b, o)?)),
        read: Box::new(|b, o| Ok(mf.read_exact_at(b, o)?)),
        sync: Box::new(|| Ok(mf.sync_data()?)),
        evict: Box::new(|| {
            evict(&mounted_path);
            evict(&lun_path)
        }),
    };
    let (rb2, fb) = compare(&raw_io, &fuse_io, size, a.random_reads, a.rounds)?;
    row(
        "FUSE seq write 1M vs raw file",
        "MB/s",
        rb2.seq_write,
        fb.seq_write,
        ">= 0.70x",
    );
    row(
        "FUSE seq read 1M vs raw file",
        "MB/s",
        rb2.seq_read,
        fb.seq_read,
        ">= 0.70x",
    );
    row(
        "FUSE rand read 4K vs raw file",
        "IOPS",
        rb2.rand_read,
        fb.rand_read,
        "",
    );
    drop(fuse_io);
    drop(mf);
    let _ = tx.send(());
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
