//! The backup repository against restic and borg, side by side in one run
//! on the same image: full backup throughput, repository size, an
//! incremental after a 1% change (time and bytes read), restore
//! throughput. Every tool encrypts (restic always does; borg with
//! repokey-blake2; ours with --encrypt). Pages of the source (and of the
//! repository, before a restore) are dropped before each run, and each
//! run is timed until what it wrote is on disk (`sync`).
//!
//! The image: a 4 GiB thin virtual disk with change tracking holding an
//! ext4 filesystem made with `mkfs.ext4 -d` from a directory tree (2 GiB),
//! 1 GiB of random data and 1 GiB of written zeros. We back up the disk
//! (incrementals by its change ID); restic and borg back up the same
//! bytes as a raw file. Not a test: no pass/fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use snapshot::{Disk, LocalStore, Store};

#[derive(Parser)]
#[command(about = "the backup repository vs. restic and borg")]
struct Args {
    /// Scratch directory (needs ~20 GiB free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The directory tree the ext4 part is made from.
    #[arg(long, default_value = "/usr/share")]
    tree: PathBuf,
    /// Image size in GiB (half filesystem, a quarter random, a quarter zeros).
    #[arg(long, default_value_t = 4)]
    size: u64,
    /// Where restores write (default: the scratch directory). A tmpfs
    /// such as /dev/shm shows the tools' own speed, not the disk's.
    #[arg(long)]
    restore_to: Option<PathBuf>,
    /// Leave out borg (the slowest).
    #[arg(long)]
    no_borg: bool,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Drop `p`'s pages from the cache: all clean pages (drop_caches) when we
/// may, so that no run pays for another's leftovers; else `p`'s own.
fn evict(p: &Path) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok() {
        return;
    }
    let mut st = vec![p.to_path_buf()];
    while let Some(p) = st.pop() {
        if p.is_dir() {
            st.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if let Ok(f) = std::fs::File::open(&p) {
            // SAFETY: fadvise on an open descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

fn du(p: &Path) -> u64 {
    let o = Command::new("du").args(["-sb"]).arg(p).output().ok();
    o.and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
    .unwrap_or(0)
}

/// Run `cmd`, timing it until what it wrote is on disk (`sync`: a
/// restore is done when the image is durable, whether the tool syncs or
/// not); fail with its output if it fails.
fn timed(what: &str, cmd: &mut Command) -> Result<(f64, String)> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let t = Instant::now();
    let o = cmd.output().with_context(|| format!("running {what}"))?;
    unsafe { libc::sync() };
    let secs = t.elapsed().as_secs_f64();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        bail!("{what} failed: {out}");
    }
    Ok((secs, out))
}

use backup_proxy::util::pseudo_random as fill;

fn b3(p: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| p.display().to_string())?;
    let mut h = blake3::Hasher::new();
    let mut b = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut b)?;
        if n == 0 {
            break;
        }
        h.update(&b[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

struct Row {
    tool: &'static str,
    full: f64,
    repo: u64,
    inc: f64,
    inc_read: u64,
    restore: f64,
    same: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let size = a.size * GIB;
    let vmfs = std::env::current_exe()?.with_file_name("vmfs");
    let t = tempfile::Builder::new()
        .prefix("vmfs-backupbench-")
        .tempdir_in(&a.dir)?;
    let s = t.path();
    eprintln!("making the image in {}", s.display());
    let fsimg = s.join("fs.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&a.tree)
        .arg(&fsimg)
        .arg(format!("{}M", size / 2 / MIB))
        .status()?;
    if !st.success() {
        bail!(
            "mkfs.ext4 -d {} failed (is the tree larger than {} MiB?)",
            a.tree.display(),
            size / 2 / MIB
        );
    }
    let ds = s.join("ds");
    std::fs::create_dir(&ds)?;
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(&ds));
    snapshot::ops::create(
        &*store,
        "vm.vmdk",
        size,
        snapshot::Provisioning::Thin,
        "lsilogic",
    )?;
    snapshot::ops::set_tracking(store.clone(), "vm.vmdk", true)?;
    {
        use std::io::Read;
        let d = Disk::open(store.clone(), "vm.vmdk", true)?;
        let mut f = std::fs::File::open(&fsimg)?;
        let mut b = vec![0u8; (4 * MIB) as usize];
        let mut off = 0;
        loop {
            let n = f.read(&mut b)?;
            if n == 0 {
                break;
            }
            if b[..n].iter().any(|&x| x != 0) {
                d.write_at(&b[..n], off)?;
            }
            off += n as u64;
        }
        for k in 0..(size / 4 / (4 * MIB)) {
            fill(&mut b, k + 1);
            d.write_at(&b, size / 2 + k * 4 * MIB)?;
        }
        b.fill(0);
        for k in 0..(size / 4 / (4 * MIB)) {
            d.write_at(&b, size / 4 * 3 + k * 4 * MIB)?;
        }
        d.close()?;
    }
    std::fs::remove_file(&fsimg)?;
    let c1 = snapshot::ops::snapshot(store.clone(), "vm.vmdk")?
        .change_id
        .context("change tracking is off")?;
    let raw = s.join("img.raw");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(ds.join("vm-flat.vmdk"))
        .arg(&raw)
        .status()?;
    if !st.success() {
        bail!("copying the image");
    }

    let pass = "bench-passphrase";
    let catalog = s.join("catalog.sqlite");
    let ours = |args: &[&str]| {
        let mut c = Command::new(&vmfs);
        c.arg("backup")
            .args(args)
            .env("VMFS_BACKUP_PASSPHRASE", pass)
            .env("VMFS_BACKUP_CATALOG", &catalog);
        c
    };
    let restic = |args: &[&str]| {
        let mut c = Command::new("restic");
        c.args(args)
            .env("RESTIC_PASSWORD", pass)
            .env("RESTIC_CACHE_DIR", s.join("restic-cache"));
        c
    };
    let borg = |args: &[&str]| {
        let mut c = Command::new("borg");
        c.args(args)
            .env("BORG_PASSPHRASE", pass)
            .env("BORG_BASE_DIR", s.join("borg-home"))
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes");
        c
    };
    let (ro, rr, rb) = (
        s.join("repo-ours"),
        s.join("repo-restic"),
        s.join("repo-borg"),
    );
    let (ros, rrs, rbs) = (
        ro.to_str().unwrap(),
        rr.to_str().unwrap(),
        rb.to_str().unwrap(),
    );
    let rawp = raw.to_str().unwrap();
    let vm = ds.join("vm.vmdk");
    let vmp = vm.to_str().unwrap();
    timed(
        "init",
        &mut ours(&[
            "init",
            "--repo",
            ros,
            "--encrypt",
            s.join("key").to_str().unwrap(),
        ]),
    )?;
    timed("restic init", &mut restic(&["init", "-r", rrs]))?;
    if !a.no_borg {
        timed(
            "borg init",
            &mut borg(&["init", "-e", "repokey-blake2", rbs]),
        )?;
    }

    // Full.
    let mut rows = Vec::new();
    evict(&ds);
    let (f_ours, _) = timed(
        "backup",
        &mut ours(&["image", "--repo", ros, "--name", "vm", vmp]),
    )?;
    evict(&raw);
    let (f_restic, _) = timed("restic backup", &mut restic(&["backup", "-r", rrs, rawp]))?;
    let f_borg = if a.no_borg {
        0.0
    } else {
        evict(&raw);
        timed(
            "borg create",
            &mut borg(&["create", &format!("{rbs}::full"), rawp]),
        )?
        .0
    };
    let sizes = (du(&ro), du(&rr), if a.no_borg { 0 } else { du(&rb) });

    // 1%: scattered 1 MiB writes into the disk, and the same into the raw copy.
    {
        use std::os::unix::fs::FileExt;
        let d = Disk::open(store.clone(), "vm.vmdk", true)?;
        let f = std::fs::OpenOptions::new().write(true).open(&raw)?;
        let mut b = vec![0u8; MIB as usize];
        let n = size / 100 / MIB;
        for k in 0..n {
            fill(&mut b, 1000 + k);
            let off = (k * 7919 + 13) * MIB % (size - MIB) / (64 << 10) * (64 << 10);
            d.write_at(&b, off)?;
            f.write_all_at(&b, off)?;
        }
        d.close()?;
        f.sync_all()?;
    }
    snapshot::ops::snapshot(store.clone(), "vm.vmdk")?;
    evict(&ds);
    let (i_ours, out) = timed(
        "incremental",
        &mut ours(&[
            "image",
            "--repo",
            ros,
            "--name",
            "vm",
            "--json",
            "--since",
            &c1.to_string(),
            vmp,
        ]),
    )?;
    let m: serde_json::Value =
        serde_json::from_str(&out[out.find('{').unwrap_or(0)..=out.rfind('}').unwrap_or(0)])?;
    let read_ours = m["disks"][0]["stats"]["read"].as_u64().unwrap_or(0);
    evict(&raw);
    let (i_restic, _) = timed("restic backup", &mut restic(&["backup", "-r", rrs, rawp]))?;
    let i_borg = if a.no_borg {
        0.0
    } else {
        evict(&raw);
        timed(
            "borg create",
            &mut borg(&["create", &format!("{rbs}::inc"), rawp]),
        )?
        .0
    };
    let want = b3(&raw)?;

    // Restore the latest.
    let rt = tempfile::Builder::new()
        .prefix("vmfs-backupbench-restore-")
        .tempdir_in(a.restore_to.as_deref().unwrap_or(s))?;
    let rts = rt.path();
    let out_ours = rts.join("out-ours.raw");
    evict(&ro);
    let (r_ours, out) = timed(
        "restore",
        &mut ours(&["restore", "--repo", ros, "vm", out_ours.to_str().unwrap()]),
    )?;
    eprint!("{out}");
    let same_ours = b3(&out_ours)? == want;
    std::fs::remove_file(&out_ours)?;
    let rdir = rts.join("out-restic");
    evict(&rr);
    let (r_restic, _) = timed(
        "restic restore",
        &mut restic(&[
            "restore",
            "-r",
            rrs,
            "latest",
            "--target",
            rdir.to_str().unwrap(),
        ]),
    )?;
    let restored = rdir.join(raw.strip_prefix("/").unwrap_or(&raw));
    let same_restic = b3(&restored)? == want;
    std::fs::remove_dir_all(&rdir)?;
    let (r_borg, same_borg) = if a.no_borg {
        (0.0, false)
    } else {
        let bdir = rts.join("out-borg");
        std::fs::create_dir(&bdir)?;
        evict(&rb);
        let (t, _) = timed(
            "borg extract",
            borg(&["extract", &format!("{rbs}::inc")]).current_dir(&bdir),
        )?;
        let same = b3(&bdir.join(raw.strip_prefix("/").unwrap_or(&raw)))? == want;
        std::fs::remove_dir_all(&bdir)?;
        (t, same)
    };
    rows.push(Row {
        tool: "vmfs backup",
        full: f_ours,
        repo: sizes.0,
        inc: i_ours,
        inc_read: read_ours,
        restore: r_ours,
        same: same_ours,
    });
    rows.push(Row {
        tool: "restic",
        full: f_restic,
        repo: sizes.1,
        inc: i_restic,
        inc_read: size,
        restore: r_restic,
        same: same_restic,
    });
    if !a.no_borg {
        rows.push(Row {
            tool: "borg",
            full: f_borg,
            repo: sizes.2,
            inc: i_borg,
            inc_read: size,
            restore: r_borg,
            same: same_borg,
        });
    }
    let gb = size as f64 / GIB as f64;
    println!(
        "{} GiB image ({} ext4 from {}, random, zeros); 1% change = {} MiB in 1 MiB writes; restic {} ; borg {}",
        a.size,
        a.size as f64 / 2.0,
        a.tree.display(),
        size / 100 / MIB,
        String::from_utf8_lossy(&Command::new("restic").arg("version").output()?.stdout).trim(),
        String::from_utf8_lossy(&Command::new("borg").arg("--version").output()?.stdout).trim(),
    );
    println!(
        "{:<12} {:>9} {:>10} {:>11} {:>8} {:>11} {:>10} {:>10}  restored",
        "tool",
        "full s",
        "full MiB/s",
        "repo MiB",
        "incr s",
        "incr read",
        "restore s",
        "rest MiB/s"
    );
    for r in &rows {
        println!(
            "{:<12} {:>9.1} {:>10.0} {:>11.0} {:>8.1} {:>9.0}Mi {:>10.1} {:>10.0}  {}",
            r.tool,
            r.full,
            gb * 1024.0 / r.full,
            r.repo as f64 / MIB as f64,
            r.inc,
            r.inc_read as f64 / MIB as f64,
            r.restore,
            gb * 1024.0 / r.restore,
            if r.same { "equal" } else { "DIFFERENT" }
        );
    }
    let (o, re) = (&rows[0], &rows[1]);
    println!(
        "ours / restic: full backup {:.2}x the throughput, repository {:.2}x the size, incremental {:.2}x faster reading {:.3}x the bytes, restore {:.2}x the throughput",
        re.full / o.full,
        o.repo as f64 / re.repo as f64,
        re.inc / o.inc,
        o.inc_read as f64 / re.inc_read as f64,
        re.restore / o.restore
    );
    Ok(())
}
