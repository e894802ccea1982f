//! Virtual disks against their baselines, side by side in one run, through
//! the vmfs file API on a datastore mounted as a host on a file LUN (or
//! with --local, on local files). QEMU's rows run `qemu-img bench` on the
//! same files through an in-process FUSE mount of the same datastore.
//!
//! Rows: a base disk's sequential 1 MiB reads vs. its flat extent read
//! directly; 4 KiB random reads through a chain 8 deep (10% of the disk
//! per delta) vs. a disk with no snapshot; 4 KiB random reads and writes
//! on a depth-2 chain vs. QEMU's vmdk driver; 4 KiB random writes with
//! change tracking on vs. off; consolidating a delta vs. writing as much
//! sequentially. Each figure is the rate of two runs per side, run A B B A,
//! pages dropped before each. Prints the ratios. Not a test: no pass/fail.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use snapshot::ops::{self, Provisioning};
use snapshot::{Disk, LocalStore, Store, VmfsStore};

#[derive(Parser)]
#[command(about = "virtual disks vs. their baselines")]
struct Args {
    /// Scratch directory on the disk to measure (needs ~16x --size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Disk size in MiB (the consolidated delta is this big too).
    #[arg(long, default_value_t = 1024)]
    size: u64,
    /// 4 KiB random operations per run.
    #[arg(long, default_value_t = 20000)]
    ops: u64,
    /// Local files instead of a datastore.
    #[arg(long)]
    local: bool,
    /// Only these rows (1-6), comma-separated.
    #[arg(long, value_delimiter = ',')]
    rows: Vec<u32>,
}

struct Bench {
    store: Arc<dyn Store>,
    /// Where QEMU finds the disks.
    files: PathBuf,
    /// What to drop from the page cache before a run.
    drop: Vec<PathBuf>,
    size: u64,
    ops: u64,
}

fn evict_path(p: &Path) {
    use std::os::fd::AsRawFd;
    let paths: Vec<PathBuf> = if p.is_dir() {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    } else {
        vec![p.to_path_buf()]
    };
    for p in paths {
        if let Ok(f) = std::fs::File::open(&p) {
            let _ = f.sync_all();
            // SAFETY: plain integers on a valid fd.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

impl Bench {
    fn evict(&self) {
        for p in &self.drop {
            evict_path(p);
        }
    }

    fn offsets(&self, seed: u64) -> impl Iterator<Item = u64> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let n = self.size / 4096;
        (0..self.ops).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n) * 4096
        })
    }

    fn rand_reads(&self, d: &Disk) -> Result<f64> {
        self.evict();
        let mut buf = vec![0u8; 4096];
        let t = Instant::now();
        for o in self.offsets(7) {
            d.read_at(&mut buf, o)?;
        }
        Ok(self.ops as f64 / t.elapsed().as_secs_f64())
    }

    /// 4 KiB random writes, then a flush.
    fn rand_writes(&self, d: &Disk, seed: u64) -> Result<f64> {
        self.evict();
        let buf = vec![seed as u8; 4096];
        let t = Instant::now();
        for o in self.offsets(seed) {
            d.write_at(&buf, o)?;
        }
        d.flush()?;
        Ok(self.ops as f64 / t.elapsed().as_secs_f64())
    }

    fn fill(&self, name: &str) -> Result<()> {
        let d = Disk::open(self.store.clone(), name, true)?;
        let buf = vec![0x5au8; 1 << 20];
        for k in 0..self.size >> 20 {
            d.write_at(&buf, k << 20)?;
        }
        d.close()?;
        Ok(())
    }

    /// Write 10% of the grains of the current layer, at random.
    fn scatter(&self, name: &str, seed: u64) -> Result<()> {
        let d = Disk::open(self.store.clone(), name, true)?;
        let g = 64u64 << 10;
        let buf = vec![seed as u8; g as usize];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for _ in 0..(self.size / g) / 10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            d.write_at(&buf, (x % (self.size / g)) * g)?;
        }
        d.close()?;
        Ok(())
    }

    /// A disk `name` with `depth` snapshots, each delta 10% of the disk
    /// (the base full when `full`).
    fn chain(&self, name: &str, depth: u64, full: bool) -> Result<()> {
        ops::create(&*self.store, name, self.size, Provisioning::Thin, "pvscsi")?;
        if full {
            self.fill(name)?;
        }
        for k in 0..depth {
            ops::snapshot(self.store.clone(), name)?;
            self.scatter(name, k + 1)?;
        }
        Ok(())
    }

    /// `qemu-img bench` of 4 KiB operations on `name` (random offsets:
    /// a step of about a seventh of the disk, wrapping).
    fn qemu(&self, name: &str, write: bool) -> Result<f64> {
        self.evict();
        let mut c = std::process::Command::new("qemu-img");
        c.args(["bench", "-f", "vmdk", "-c", &self.ops.to_string()]);
        c.args([
            "-s",
            "4096",
            "-S",
            &((self.size / 4096 / 7 * 4096) + 4096).to_string(),
        ]);
        if write {
            c.arg("-w");
        }
        let t = Instant::now();
        let o = c
            .arg(self.files.join(name))
            .output()
            .context("qemu-img bench")?;
        anyhow::ensure!(
            o.status.success(),
            "qemu-img bench: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(self.ops as f64 / t.elapsed().as_secs_f64())
    }
}

/// The rate of two runs (harmonic mean).
fn rate(x: f64, y: f64) -> f64 {
    2.0 / (1.0 / x + 1.0 / y)
}

fn row(what: &str, base: f64, ours: f64, unit: &str, goal: &str) {
    println!(
        "{what:<46} {base:>9.0} {ours:>9.0} {unit:<4} {:>6.2}x   goal {goal}",
        ours / base
    );
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = a.dir.join(format!("vmfs-diskbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let size = a.size << 20;
    let mut serving = None;
    let b = if a.local {
        println!(
            "vmfs-diskbench: {} MiB disks, local files in {}",
            a.size,
            dir.display()
        );
        Bench {
            store: Arc::new(LocalStore::new(&dir)),
            files: dir.clone(),
            drop: vec![dir.clone()],
            size,
            ops: a.ops,
        }
    } else {
        let lun_path = dir.join("lun.img");
        std::fs::File::create(&lun_path)?.set_len((20 * a.size + 2048) << 20)?;
        let lun_name = lun_path.to_str().context("path")?.to_string();
        let opts = vmfs::MkfsOptions {
            block_size: 1 << 20,
            ..Default::default()
        };
        vmfs::Fs::mkfs(vec![lun::open(&lun_name)?], &opts)?.unmount()?;
        let t = vmfs::cluster::Timeouts::default();
        let fs = Arc::new(vmfs::Fs::mount(
            vec![lun::open(&lun_name)?],
            *uuid::Uuid::new_v4().as_bytes(),
            t,
        )?);
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let (stop, rx) = std::sync::mpsc::channel();
        let f2 = fs.clone();
        let m2 = mnt.clone();
        let h = std::thread::spawn(move || vmfs::fuse::serve(f2, &m2, 4, rx));
        // Wait for the mount.
        for _ in 0..100 {
            if std::fs::read_to_string("/proc/self/mountinfo")?
                .contains(mnt.to_str().unwrap_or("?"))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        serving = Some((stop, h, mnt.clone()));
        println!(
            "vmfs-diskbench: {} MiB disks on a datastore (1 MiB blocks) on {}, QEMU through its FUSE mount",
            a.size, lun_name
        );
        Bench {
            store: Arc::new(VmfsStore::new(fs, "")),
            files: mnt.clone(),
            drop: vec![lun_path, mnt],
            size,
            ops: a.ops,
        }
    };
    println!("{:<46} {:>9} {:>9}", "", "baseline", "ours");
    let r = rows(&b, size, &a.rows);
    drop(b);
    if let Some((stop, h, mnt)) = serving {
        let _ = stop.send(());
        let _ = h.join();
        if std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(mnt.to_str().unwrap_or("?"))
        {
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(&mnt)
                .status();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn rows(b: &Bench, size: u64, only: &[u32]) -> Result<()> {
    let on = |n: u32| only.is_empty() || only.contains(&n);
    b.chain("base.vmdk", 0, true)?;

    // 1. A base disk vs. its flat extent.
    if on(1) {
        let flat = b.store.open("base-flat.vmdk", false)?;
        let disk = Disk::open(b.store.clone(), "base.vmdk", false)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut seq = |f: &mut dyn FnMut(&mut [u8], u64) -> Result<()>| -> Result<f64> {
            b.evict();
            let t = Instant::now();
            for k in 0..size >> 20 {
                f(&mut buf, k << 20)?;
            }
            Ok(size as f64 / 1e6 / t.elapsed().as_secs_f64())
        };
        // Warm both sides' block maps once, untimed.
        seq(&mut |x, o| Ok(flat.read_full(x, o)?))?;
        seq(&mut |x, o| Ok(disk.read_at(x, o)?))?;
        let b1 = seq(&mut |x, o| Ok(flat.read_full(x, o)?))?;
        let o1 = seq(&mut |x, o| Ok(disk.read_at(x, o)?))?;
        let o2 = seq(&mut |x, o| Ok(disk.read_at(x, o)?))?;
        let b2 = seq(&mut |x, o| Ok(flat.read_full(x, o)?))?;
        row(
            "seq read 1M: flat extent -> base disk",
            rate(b1, b2),
            rate(o1, o2),
            "MB/s",
            ">= 0.95x",
        );
        println!("  (runs: flat {b1:.0}, disk {o1:.0}, disk {o2:.0}, flat {b2:.0})");
        drop((disk, flat));
    }

    // 2. A chain 8 deep (each delta 10% of the disk) vs. depth 0.
    if on(2) {
        b.chain("deep.vmdk", 8, true)?;
        let deep = Disk::open(b.store.clone(), "deep.vmdk", false)?;
        let zero = Disk::open(b.store.clone(), "base.vmdk", false)?;
        let z1 = b.rand_reads(&zero)?;
        let d1 = b.rand_reads(&deep)?;
        let d2 = b.rand_reads(&deep)?;
        let z2 = b.rand_reads(&zero)?;
        row(
            "rand read 4K: depth 0 -> depth 8",
            rate(z1, z2),
            rate(d1, d2),
            "IOPS",
            ">= 0.80x",
        );
        drop((deep, zero));
    }

    // 3. Depth 2, reads: QEMU's driver vs. ours on the same files.
    if on(3) {
        b.chain("two.vmdk", 2, true)?;
        let q1 = b.qemu("two.vmdk", false)?;
        let two = Disk::open(b.store.clone(), "two.vmdk", false)?;
        let w1 = b.rand_reads(&two)?;
        let w2 = b.rand_reads(&two)?;
        drop(two);
        let q2 = b.qemu("two.vmdk", false)?;
        row(
            "rand read 4K, depth 2: qemu-img bench -> ours",
            rate(q1, q2),
            rate(w1, w2),
            "IOPS",
            ">= 1.0x (QEMU's includes starting qemu-img)",
        );
    }
    let open = |n: &str| Disk::open(b.store.clone(), n, true);

    // 4. Depth 2, writes: each run on a fresh chain (the first writes to a
    // grain allocate it, on both sides alike).
    if on(4) {
        for k in 0..4 {
            b.chain(&format!("w{k}.vmdk"), 2, false)?;
        }
        let q1 = b.qemu("w0.vmdk", true)?;
        let w1 = b.rand_writes(&open("w1.vmdk")?, 3)?;
        let w2 = b.rand_writes(&open("w2.vmdk")?, 3)?;
        let q2 = b.qemu("w3.vmdk", true)?;
        row(
            "rand write 4K, depth 2: qemu-img bench -> ours",
            rate(q1, q2),
            rate(w1, w2),
            "IOPS",
            ">= 1.0x",
        );
    }

    // 5. Change tracking on vs. off: 4 KiB random writes into fresh thin
    // base disks.
    if on(5) {
        for (n, on) in [
            ("t0.vmdk", true),
            ("t1.vmdk", false),
            ("t2.vmdk", false),
            ("t3.vmdk", true),
        ] {
            ops::create(&*b.store, n, size, Provisioning::Thin, "pvscsi")?;
            if !on {
                ops::set_tracking(b.store.clone(), n, false)?;
            }
        }
        let on1 = b.rand_writes(&open("t0.vmdk")?, 5)?;
        let off1 = b.rand_writes(&open("t1.vmdk")?, 5)?;
        let off2 = b.rand_writes(&open("t2.vmdk")?, 5)?;
        let on2 = b.rand_writes(&open("t3.vmdk")?, 5)?;
        row(
            "rand write 4K: tracking off -> on",
            rate(off1, off2),
            rate(on1, on2),
            "IOPS",
            ">= 0.9x",
        );
    }

    // 6. Consolidating a delta as big as the disk vs. writing as much
    // sequentially through the file API.
    if on(6) {
        ops::snapshot(b.store.clone(), "base.vmdk")?;
        {
            let d = open("base.vmdk")?;
            let buf = vec![0x33u8; 1 << 20];
            for k in 0..size >> 20 {
                d.write_at(&buf, k << 20)?;
            }
            d.close()?;
        }
        let seqw = |name: &str| -> Result<f64> {
            b.evict();
            let f = b.store.create(name)?;
            let buf = vec![0x44u8; 1 << 20];
            let t = Instant::now();
            for k in 0..size >> 20 {
                f.write_at(&buf, k << 20)?;
            }
            f.flush()?;
            Ok(size as f64 / 1e6 / t.elapsed().as_secs_f64())
        };
        let s1 = seqw("seq1.raw")?;
        {
            // The delta read alone, for the note.
            let d = Disk::open(b.store.clone(), "base.vmdk", false)?;
            let mut buf = vec![0u8; 8 << 20];
            b.evict();
            let t = Instant::now();
            for k in 0..size >> 23 {
                d.read_at(&mut buf, k << 23)?;
            }
            println!(
                "  (reading the delta alone: {:.0} MB/s)",
                size as f64 / 1e6 / t.elapsed().as_secs_f64()
            );
        }
        b.evict();
        let t = Instant::now();
        let merged = ops::consolidate(b.store.clone(), "base.vmdk")?;
        let c = merged as f64 / 1e6 / t.elapsed().as_secs_f64();
        let s2 = seqw("seq2.raw")?;
        row(
            &format!("consolidate {} MiB: seq write -> merge", merged >> 20),
            rate(s1, s2),
            c,
            "MB/s",
            ">= 0.80x",
        );
    }
    Ok(())
}
