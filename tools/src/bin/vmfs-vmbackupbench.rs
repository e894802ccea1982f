//! The agentless backup of a running VM (`vmfs backup vm`), one run: a
//! guest (QEMU TCG) runs on a 4 GiB virtual disk full of data, with its
//! qemu-guest-agent; a full backup, then the guest changes 1% of the disk
//! (40 MiB in 64 KiB writes at random places), then an incremental. For
//! each: the guest's freeze, the I/O hold, the snapshot's lifetime, the job
//! time and the bytes read; beside reading the same disk whole with
//! `qemu-img convert` through the mount (the baseline a backup tool
//! without change tracking pays). The proxy is host B on the LUN (asking
//! host A through the datastore), or with --local host A's own agent. Not
//! a test: no pass/fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use vmfs_tools::benchutil::{mount, run, vmfs_bin};

#[derive(Parser)]
#[command(about = "the agentless VM backup: freeze, snapshot lifetime, full and incremental")]
struct Args {
    /// Scratch directory (needs ~3x --size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The guest disk's size in MiB (filled with data).
    #[arg(long, default_value_t = 4096)]
    size: u64,
    /// The test guest (built by tests/guest/build-guest.sh).
    #[arg(long, default_value = "/var/tmp/vmfs-guest")]
    guest: PathBuf,
    /// Back up through host A's agent instead of a proxy on the LUN.
    #[arg(long)]
    local: bool,
}

const MIB: u64 = 1 << 20;

/// A raw image of `size` MiB of incompressible data (a cheap generator).
fn fill(p: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..size {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

fn wait_for(log: &Path, line: &str, within: Duration) -> Result<()> {
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(line)
    {
        if t.elapsed() > within {
            bail!("no {line} from the guest: see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

struct Job {
    secs: f64,
    read: u64,
    frozen_ms: f64,
    held_ms: f64,
    lifetime_ms: f64,
    how: String,
}

fn job(cmd: &mut Command) -> Result<Job> {
    let t = Instant::now();
    let out = run(cmd)?;
    let secs = t.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let read = v["manifest"]["disks"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|x| x["stats"]["read"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    Ok(Job {
        secs,
        read,
        frozen_ms: v["snapshot"]["frozen_ms"].as_f64().unwrap_or(0.0),
        held_ms: v["snapshot"]["held_ms"].as_f64().unwrap_or(0.0),
        lifetime_ms: v["snapshot_lifetime_ms"].as_f64().unwrap_or(0.0),
        how: v["snapshot"]["how"].as_str().unwrap_or("").to_string(),
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("vmbackupbench")
        .tempdir_in(&a.dir)?;
    let d = dir.path();
    let vmfs = vmfs_bin();
    let lun = d.join("ds.img");
    std::fs::File::create(&lun)?.set_len((a.size * 2 + 2048) * MIB)?;
    run(Command::new(&vmfs).arg("mkfs").arg(&lun))?;
    let mnt = d.join("m");
    std::fs::create_dir(&mnt)?;
    let st = d.join("a");
    let mut host = mount(&vmfs, &st, &lun, &mnt)?;
    let mut guest = None;
    let result = (|| -> Result<()> {
        std::fs::create_dir(mnt.join("vm"))?;
        let raw = d.join("in.raw");
        eprintln!("making {} MiB of data...", a.size);
        fill(&raw, a.size)?;
        let disk = mnt.join("vm/d.vmdk");
        run(Command::new(&vmfs)
            .args(["disk", "import", "--state-dir"])
            .arg(&st)
            .arg(&raw)
            .arg(&disk))?;
        std::fs::remove_file(&raw)?;
        let sock = d.join("vus.sock");
        let qga = d.join("qga.sock");
        run(Command::new(&vmfs)
            .args(["scsi", "add", "--state-dir"])
            .arg(&st)
            .arg("--socket")
            .arg(&sock)
            .arg("--guest-agent")
            .arg(&qga)
            .arg(&disk))?;
        // The guest changes 1% of the disk once a second disk is plugged
        // in (the bench's signal).
        let writes = a.size * MIB / 100 / (64 << 10);
        let blocks = a.size * MIB / (64 << 10);
        let script = format!(
            "#!/bin/sh\necho READY\nwhile [ ! -b /dev/sdb ]; do sleep 0.2; done\ni=0\nwhile [ $i -lt {writes} ]; do\n  b=$(( ($i * 7919 + 13) % {blocks} ))\n  dd if=/dev/urandom of=/dev/sda bs=64k count=1 seek=$b oflag=direct conv=notrunc 2>/dev/null\n  i=$((i+1))\ndone\nsync\necho CHANGED\nsleep 3600\n"
        );
        let t = d.join("g.sh");
        std::fs::write(&t, script)?;
        let log = d.join("g.log");
        let kit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/run-guest.sh");
        guest = Some(
            Command::new(kit)
                .arg("-k")
                .arg(&a.guest)
                .arg("-t")
                .arg(&t)
                .arg("-l")
                .arg(&log)
                .args(["-T", "3600", "-m", "512M", "-g"])
                .arg(&qga)
                .arg("--")
                .args([
                    "-chardev",
                    &format!("socket,id=vus,path={}", sock.display()),
                    "-device",
                    "vhost-user-scsi-pci,chardev=vus,num_queues=1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_for(&log, "READY", Duration::from_secs(300))?;
        let repo = d.join("repo");
        run(Command::new(&vmfs)
            .args(["backup", "init", "--repo"])
            .arg(&repo))?;
        let catalog = d.join("catalog.sqlite");
        let bst = d.join("b");
        // The proxy's way to the disk: host A's agent, or host B on the LUN.
        let reach = |c: &mut Command| {
            if a.local {
                c.arg("--state-dir").arg(&st).arg(&disk);
            } else {
                c.arg("--datastore")
                    .arg(&lun)
                    .arg("--state-dir")
                    .arg(&bst)
                    .args(["--lease-ms", "8000", "vm/d.vmdk"]);
            }
        };
        let backup = || {
            let mut c = Command::new(&vmfs);
            c.args(["backup", "vm", "--json", "--name", "vm", "--repo"])
                .arg(&repo)
                .env("VMFS_BACKUP_CATALOG", &catalog);
            reach(&mut c);
            c
        };
        let full = job(&mut backup())?;
        // The signal: a small disk hot-plugged.
        let small = mnt.join("vm/s.vmdk");
        run(Command::new(&vmfs)
            .args(["disk", "create", "--size", "16M", "--state-dir"])
            .arg(&st)
            .arg(&small))?;
        run(Command::new(&vmfs)
            .args(["scsi", "add", "--state-dir"])
            .arg(&st)
            .arg("--socket")
            .arg(&sock)
            .arg(&small))?;
        wait_for(&log, "CHANGED", Duration::from_secs(1800))?;
        let incr = job(&mut backup())?;
        // The baseline: the whole disk read with qemu-img through the mount.
        let out = d.join("whole.raw");
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args(["convert", "-f", "vmdk", "-O", "raw"])
            .arg(&disk)
            .arg(&out))?;
        let whole = t.elapsed().as_secs_f64();
        std::fs::remove_file(&out)?;
        // The same disk frozen for another tool (`backup attach`): copied
        // whole over our NBD server and from the FUSE file. The VM has four
        // disks by then (two more hot-plugged): the freeze covers them all.
        for n in ["s2", "s3"] {
            let p = mnt.join(format!("vm/{n}.vmdk"));
            run(Command::new(&vmfs)
                .args(["disk", "create", "--size", "16M", "--state-dir"])
                .arg(&st)
                .arg(&p))?;
            run(Command::new(&vmfs)
                .args(["scsi", "add", "--state-dir"])
                .arg(&st)
                .arg("--socket")
                .arg(&sock)
                .arg(&p))?;
        }
        let exp = d.join("exp");
        std::fs::create_dir(&exp)?;
        let nbd = d.join("nbd.sock");
        let mut c = Command::new(&vmfs);
        c.args(["backup", "attach", "--json", "--mountpoint"])
            .arg(&exp)
            .arg("--nbd")
            .arg(format!("unix:{}", nbd.display()));
        reach(&mut c);
        for n in ["s", "s2", "s3"] {
            if a.local {
                c.arg(mnt.join(format!("vm/{n}.vmdk")));
            } else {
                c.arg(format!("vm/{n}.vmdk"));
            }
        }
        let t = Instant::now();
        let o = c.output()?;
        if !o.status.success() {
            bail!("backup attach: {}", String::from_utf8_lossy(&o.stderr));
        }
        let attach = t.elapsed().as_secs_f64();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let four = (
            v["snapshot"]["frozen_ms"].as_f64().unwrap_or(-1.0),
            v["snapshot"]["held_ms"].as_f64().unwrap_or(-1.0),
            v["snapshot"]["how"].as_str().unwrap_or("").to_string(),
        );
        let uri = v["record"]["images"][0]["nbd"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw", &uri])
            .arg(&out))?;
        let over_nbd = t.elapsed().as_secs_f64();
        std::fs::remove_file(&out)?;
        let t = Instant::now();
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(exp.join("d.img"))
            .arg(&out))?;
        let over_file = t.elapsed().as_secs_f64();
        std::fs::remove_file(&out)?;
        let mut c = Command::new(&vmfs);
        c.args(["backup", "detach"]).arg(&exp);
        c.arg("--state-dir").arg(if a.local { &st } else { &bst });
        run(&mut c)?;
        let size = a.size * MIB;
        println!(
            "VM backup of a running {} MiB disk ({}), proxy: {}",
            a.size,
            full.how,
            if a.local {
                "host A's agent"
            } else {
                "host B on the LUN"
            }
        );
        println!(
            "  {:<12} {:>8} {:>12} {:>8} {:>10} {:>10} {:>14}",
            "run", "time s", "read MiB", "% disk", "frozen ms", "held ms", "snapshot s"
        );
        for (n, j) in [("full", &full), ("incremental", &incr)] {
            println!(
                "  {n:<12} {:>8.1} {:>12.1} {:>7.2}% {:>10.0} {:>10.1} {:>14.1}",
                j.secs,
                j.read as f64 / MIB as f64,
                100.0 * j.read as f64 / size as f64,
                j.frozen_ms,
                j.held_ms,
                j.lifetime_ms / 1000.0
            );
        }
        println!(
            "  qemu-img convert of the whole disk through the mount: {whole:.1} s, {} MiB read ({:.2}x the incremental's time)",
            a.size,
            whole / incr.secs.max(0.001)
        );
        println!(
            "  backup attach of the VM's 4 disks: guest frozen {:.0} ms, I/O held {:.1} ms ({})",
            four.0, four.1, four.2
        );
        println!(
            "  backup attach (freeze, snapshot, expose): {attach:.1} s; the frozen disk copied whole with qemu-img over NBD: {over_nbd:.1} s ({:.2}x the baseline), with cp --sparse from the file: {over_file:.1} s ({:.2}x)",
            over_nbd / whole.max(0.001),
            over_file / whole.max(0.001)
        );
        Ok(())
    })();
    if let Some(mut g) = guest {
        unsafe { libc::kill(g.id() as i32, libc::SIGTERM) };
        let _ = g.wait();
    }
    unsafe { libc::kill(host.id() as i32, libc::SIGTERM) };
    let _ = host.wait();
    result
}
