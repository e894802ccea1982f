//! Small-file metadata rate, side by side with ext4 on a loop device over a
//! file on the same disk: create + write 4 KiB + fsync, and create + unlink,
//! through the library and through the FUSE mount. Prints ops/s and the
//! ratios. Not a test: no pass/fail. Needs root (losetup, mount).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use vmfs::format::S_IFREG;
use vmfs::{Fs, MkfsOptions};

#[derive(Parser)]
#[command(about = "vmfs small-file metadata rate vs. ext4 on a loop device")]
struct Args {
    /// Scratch directory on the disk to measure (needs ~2 GiB free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Files per loop.
    #[arg(long, default_value_t = 2000)]
    count: u64,
}

struct Rates {
    create_write_fsync: f64,
    create_unlink: f64,
}

/// The two loops through a mounted directory (FUSE or ext4).
fn posix_loops(dir: &Path, n: u64) -> Result<Rates> {
    let d = dir.join("bench");
    std::fs::create_dir_all(&d)?;
    let data = vec![0x5au8; 4096];
    let t = Instant::now();
    for k in 0..n {
        let mut f = std::fs::File::create(d.join(format!("f{k}")))?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    let cwf = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for k in 0..n {
        let p = d.join(format!("g{k}"));
        std::fs::File::create(&p)?;
        std::fs::remove_file(&p)?;
    }
    let cu = n as f64 / t.elapsed().as_secs_f64();
    Ok(Rates {
        create_write_fsync: cwf,
        create_unlink: cu,
    })
}

/// The same loops through the library.
fn library_loops(fs: &Fs, n: u64) -> Result<Rates> {
    let root = fs.root();
    let d = fs
        .create(root, b"lib", libc::S_IFDIR | 0o755, 0, 0, 0, None)?
        .addr;
    let data = vec![0x5au8; 4096];
    let t = Instant::now();
    for k in 0..n {
        let i = fs.create(
            d,
            format!("f{k}").as_bytes(),
            S_IFREG | 0o644,
            0,
            0,
            0,
            None,
        )?;
        fs.write(i.addr, 0, &data)?;
        fs.sync()?;
    }
    let cwf = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for k in 0..n {
        let name = format!("g{k}");
        fs.create(d, name.as_bytes(), S_IFREG | 0o644, 0, 0, 0, None)?;
        fs.unlink(d, name.as_bytes(), false)?;
    }
    let cu = n as f64 / t.elapsed().as_secs_f64();
    Ok(Rates {
        create_write_fsync: cwf,
        create_unlink: cu,
    })
}

fn run(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn ext4_loops(dir: &Path, n: u64) -> Result<Rates> {
    let img = dir.join("ext4.img");
    std::fs::File::create(&img)?.set_len(1 << 30)?;
    let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&img))?;
    let mnt = dir.join("ext4");
    std::fs::create_dir_all(&mnt)?;
    let r = (|| {
        run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
        run(Command::new("mount").arg(&dev).arg(&mnt))?;
        let r = posix_loops(&mnt, n);
        run(Command::new("umount").arg(&mnt))?;
        r
    })();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    let _ = std::fs::remove_file(&img);
    r
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = a.dir.join(format!("vmfs-metabench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("{} files per loop, scratch {}", a.count, dir.display());

    let ext4 = ext4_loops(&dir, a.count).context("ext4 on a loop device")?;

    let lun_path = dir.join("lun.img");
    std::fs::File::create(&lun_path)?.set_len(1 << 30)?;
    let lun = lun::open(lun_path.to_str().context("path")?)?;
    let fs = Arc::new(Fs::mkfs(vec![lun], &MkfsOptions::default())?);
    let lib = library_loops(&fs, a.count)?;

    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let fs2 = fs.clone();
    let m2 = mnt.clone();
    let server = std::thread::spawn(move || {
        vmfs::fuse::serve(
            fs2,
            &m2,
            std::env::var("THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(4),
            rx,
        )
    });
    let t = Instant::now();
    while !std::fs::read_to_string("/proc/self/mountinfo")?.contains(mnt.to_str().context("path")?)
    {
        ensure!(t.elapsed().as_secs() < 20, "mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let fuse = posix_loops(&mnt, a.count);
    let _ = tx.send(());
    let _ = server.join();
    let fuse = fuse?;

    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "loop", "ext4 ops/s", "library", "FUSE", "lib/ext4", "FUSE/ext4"
    );
    for (name, e, l, f) in [
        (
            "create + write 4K + fsync",
            ext4.create_write_fsync,
            lib.create_write_fsync,
            fuse.create_write_fsync,
        ),
        (
            "create + unlink",
            ext4.create_unlink,
            lib.create_unlink,
            fuse.create_unlink,
        ),
    ] {
        println!(
            "{name:<34} {e:>12.0} {l:>12.0} {f:>12.0} {:>7.2}x {:>7.2}x",
            l / e,
            f / e
        );
    }
    println!("goal: FUSE >= 0.50x ext4");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
