//! Virtual disks against their baselines, side by side in one run, on
//! local files (a directory of the disk to measure): a base disk's
//! sequential reads vs. its flat extent read directly; 4 KiB random reads
//! through a chain 8 deep vs. a disk with no snapshot; 4 KiB random reads
//! on a depth-2 chain vs. QEMU's own vmdk driver (`qemu-img bench`) on the
//! same files; consolidating a delta vs. writing as much sequentially.
//! Prints the ratios. Not a test: no pass/fail.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use snapshot::ops::{self, Provisioning};
use snapshot::{Disk, LocalStore, Store};

#[derive(Parser)]
#[command(about = "virtual disks vs. their baselines")]
struct Args {
    /// Scratch directory on the disk to measure.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Disk size in MiB.
    #[arg(long, default_value_t = 512)]
    size: u64,
    /// 4 KiB random reads per run.
    #[arg(long, default_value_t = 20000)]
    reads: u64,
}

fn evict(p: &std::path::Path) {
    use std::os::fd::AsRawFd;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        if let Ok(f) = std::fs::File::open(e.path()) {
            let _ = f.sync_all();
            // SAFETY: plain integers on a valid fd.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

fn rand_reads(d: &Disk, size: u64, n: u64) -> Result<f64> {
    let mut buf = vec![0u8; 4096];
    let mut x = 0x9e3779b97f4a7c15u64;
    let t = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.read_at(&mut buf, (x % (size / 4096)) * 4096)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn fill(d: &Disk, size: u64) -> Result<()> {
    let buf = vec![0x5au8; 1 << 20];
    for k in 0..size >> 20 {
        d.write_at(&buf, k << 20)?;
    }
    d.flush()?;
    Ok(())
}

/// Write 10% of the grains of the current layer, at random.
fn scatter(d: &Disk, size: u64, seed: u64) -> Result<()> {
    let buf = vec![seed as u8; 64 << 10];
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    for _ in 0..(size / (64 << 10)) / 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.write_at(&buf, (x % (size / (64 << 10))) * (64 << 10))?;
    }
    d.flush()?;
    Ok(())
}

fn qemu_bench(file: &std::path::Path, n: u64, size: u64) -> Result<f64> {
    // -n: no cache of QEMU's own; random offsets via -S (step) is not
    // random, so use a large step modulo the size: QEMU's bench walks
    // offsets by the step and wraps.
    let t = Instant::now();
    let o = std::process::Command::new("qemu-img")
        .args([
            "bench",
            "-f",
            "vmdk",
            "-c",
            &n.to_string(),
            "-s",
            "4096",
            "-S",
        ])
        .arg(((size / 4096 / 7 * 4096) + 4096).to_string())
        .arg(file)
        .output()
        .context("qemu-img bench")?;
    anyhow::ensure!(
        o.status.success(),
        "qemu-img bench: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = a.dir.join(format!("vmfs-diskbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let size = a.size << 20;
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(&dir));
    println!(
        "vmfs-diskbench: {} MiB disks, local files in {}",
        a.size,
        dir.display()
    );

    // 1. A base disk vs. its flat extent.
    ops::create(&*store, "base.vmdk", size, Provisioning::Thin, "pvscsi")?;
    fill(&Disk::open(store.clone(), "base.vmdk", true)?, size)?;
    let flat = store.open("base-flat.vmdk", false)?;
    let disk = Disk::open(store.clone(), "base.vmdk", false)?;
    let mut buf = vec![0u8; 1 << 20];
    let seq = |f: &mut dyn FnMut(&mut [u8], u64) -> Result<()>, buf: &mut [u8]| -> Result<f64> {
        evict(&dir);
        let t = Instant::now();
        for k in 0..size >> 20 {
            f(buf, k << 20)?;
        }
        Ok((size >> 20) as f64 * 1.048576 / t.elapsed().as_secs_f64())
    };
    let mut r = |b: &mut [u8], o: u64| -> Result<()> { Ok(flat.read_full(b, o)?) };
    let b1 = seq(&mut r, &mut buf)?;
    let mut r = |b: &mut [u8], o: u64| -> Result<()> { Ok(disk.read_at(b, o)?) };
    let o1 = seq(&mut r, &mut buf)?;
    let mut r = |b: &mut [u8], o: u64| -> Result<()> { Ok(disk.read_at(b, o)?) };
    let o2 = seq(&mut r, &mut buf)?;
    let mut r = |b: &mut [u8], o: u64| -> Result<()> { Ok(flat.read_full(b, o)?) };
    let b2 = seq(&mut r, &mut buf)?;
    let rate = |x: f64, y: f64| 2.0 / (1.0 / x + 1.0 / y);
    let (b, o) = (rate(b1, b2), rate(o1, o2));
    println!(
        "{:<44} {b:>9.0} {o:>9.0} MB/s {:>6.2}x   goal >= 0.95x",
        "seq read 1M: flat extent -> base disk",
        o / b
    );
    drop(disk);

    // 2. A chain 8 deep (each delta 10% of the grains) vs. depth 0.
    ops::create(&*store, "deep.vmdk", size, Provisioning::Thin, "pvscsi")?;
    fill(&Disk::open(store.clone(), "deep.vmdk", true)?, size)?;
    for k in 0..8 {
        ops::snapshot(store.clone(), "deep.vmdk")?;
        scatter(&Disk::open(store.clone(), "deep.vmdk", true)?, size, k + 1)?;
    }
    let deep = Disk::open(store.clone(), "deep.vmdk", false)?;
    let flat0 = Disk::open(store.clone(), "base.vmdk", false)?;
    evict(&dir);
    let z1 = rand_reads(&flat0, size, a.reads)?;
    evict(&dir);
    let d1 = rand_reads(&deep, size, a.reads)?;
    evict(&dir);
    let d2 = rand_reads(&deep, size, a.reads)?;
    evict(&dir);
    let z2 = rand_reads(&flat0, size, a.reads)?;
    let (z, dd) = (rate(z1, z2), rate(d1, d2));
    println!(
        "{:<44} {z:>9.0} {dd:>9.0} IOPS {:>6.2}x   goal >= 0.80x",
        "rand read 4K: depth 0 -> depth 8",
        dd / z
    );
    drop(deep);

    // 3. Depth 2: ours vs. QEMU's driver on the same files.
    ops::create(&*store, "two.vmdk", size, Provisioning::Thin, "pvscsi")?;
    fill(&Disk::open(store.clone(), "two.vmdk", true)?, size)?;
    for k in 0..2 {
        ops::snapshot(store.clone(), "two.vmdk")?;
        scatter(&Disk::open(store.clone(), "two.vmdk", true)?, size, k + 11)?;
    }
    let two = Disk::open(store.clone(), "two.vmdk", false)?;
    evict(&dir);
    let q1 = qemu_bench(&dir.join("two.vmdk"), a.reads, size)?;
    evict(&dir);
    let w1 = rand_reads(&two, size, a.reads)?;
    evict(&dir);
    let w2 = rand_reads(&two, size, a.reads)?;
    evict(&dir);
    let q2 = qemu_bench(&dir.join("two.vmdk"), a.reads, size)?;
    let (q, w) = (rate(q1, q2), rate(w1, w2));
    println!(
        "{:<44} {q:>9.0} {w:>9.0} IOPS {:>6.2}x   goal >= 1.0x (QEMU's run includes starting qemu-img)",
        "rand read 4K, depth 2: qemu-img bench -> ours",
        w / q
    );
    drop(two);

    // 4. Consolidating a delta (half the disk written) vs. writing as much.
    ops::snapshot(store.clone(), "base.vmdk")?;
    {
        let d = Disk::open(store.clone(), "base.vmdk", true)?;
        let buf = vec![0x33u8; 1 << 20];
        for k in 0..(size >> 21) {
            d.write_at(&buf, k << 21)?;
        }
        d.flush()?;
    }
    evict(&dir);
    let t = Instant::now();
    let merged = ops::consolidate(store.clone(), "base.vmdk")?;
    let c = merged as f64 / 1e6 / t.elapsed().as_secs_f64();
    let seqw = {
        let f = store.create("seq.raw")?;
        let buf = vec![0x44u8; 1 << 20];
        let t = Instant::now();
        for k in 0..merged >> 20 {
            f.write_at(&buf, k << 20)?;
        }
        f.flush()?;
        merged as f64 / 1e6 / t.elapsed().as_secs_f64()
    };
    println!(
        "{:<44} {seqw:>9.0} {c:>9.0} MB/s {:>6.2}x   goal >= 0.80x",
        "consolidate: seq write -> merge",
        c / seqw
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
