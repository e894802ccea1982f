//! Paravirtual SCSI against its baselines, side by side in one run.
//!
//! 1. The target alone: commands per second through `Target::execute`
//!    against a null unit (no virtio, no storage) from 1..N threads: the
//!    backend's own ceiling.
//! 2. A real guest (QEMU under TCG here): fio 4 KiB random read and write
//!    at queue depth 32, and 1 MiB sequential, on a disk served by our
//!    vhost-user-scsi controller from a datastore on a file LUN, vs. QEMU's
//!    own virtio-scsi (`scsi-hd`, `cache=none,aio=io_uring`) on a raw file
//!    in the same directory. Prints the ratios. Not a test: no pass/fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use hypervisor_io::backend::NullBackend;
use hypervisor_io::scsi::disk::{Buffers, DiskUnit};
use hypervisor_io::scsi::pr::MemPrStore;
use hypervisor_io::scsi::target::Target;
use vmfs_tools::benchutil::{mount, run, vmfs_bin};

#[derive(Parser)]
#[command(about = "paravirtual SCSI vs. its baselines")]
struct Args {
    /// Scratch directory (needs ~3x --size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The guest disk's size in MiB.
    #[arg(long, default_value_t = 1024)]
    size: u64,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 8)]
    runtime: u32,
    /// The test guest (built by tests/guest/build-guest.sh).
    #[arg(long, default_value = "/var/tmp/vmfs-guest")]
    guest: PathBuf,
    /// Only the target-layer part.
    #[arg(long)]
    target_only: bool,
}

fn target_rate(threads: usize, secs: f64) -> f64 {
    let t = Arc::new(Target::new());
    let unit = DiskUnit::new(
        "null".into(),
        Arc::new(NullBackend { capacity: 1 << 40 }),
        Arc::new(MemPrStore::default()),
    );
    t.add(0, Arc::new(unit));
    // The power-on attention.
    let mut v = Vec::new();
    let _ = t.execute(
        "b",
        0,
        &[0; 6],
        Buffers {
            data_out: &[],
            data_in: &mut v,
            data_in_max: 0,
        },
    );
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|k| {
                let t = t.clone();
                s.spawn(move || {
                    let mut buf = Vec::with_capacity(4096);
                    let mut n = 0u64;
                    let mut lba = k as u32 * 1000;
                    while Instant::now() < stop {
                        for _ in 0..1000 {
                            lba = lba.wrapping_mul(1_103_515_245).wrapping_add(12345) % (1 << 28);
                            let l = lba.to_be_bytes();
                            let cdb = [0x28, 0, l[0], l[1], l[2], l[3], 0, 0, 8, 0];
                            let _ = t.execute(
                                "b",
                                0,
                                &cdb,
                                Buffers {
                                    data_out: &[],
                                    data_in: &mut buf,
                                    data_in_max: 4096,
                                },
                            );
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    counts.iter().sum::<u64>() as f64 / secs
}

/// The fio jobs, in the order run: writes first so the reads read data.
const JOBS: &[(&str, &str, &str)] = &[
    ("4k-randwrite", "randwrite", "4k"),
    ("1m-write", "write", "1m"),
    ("4k-randread", "randread", "4k"),
    ("1m-read", "read", "1m"),
];

/// Boot the guest with `qemu_args`, run the jobs on /dev/sda, and return
/// (IOPS, MiB/s) per job.
fn guest_fio(a: &Args, dir: &Path, name: &str, qemu_args: &[String]) -> Result<Vec<(f64, f64)>> {
    let span = (a.size / 2).max(64);
    let mut script = String::from("#!/bin/sh\nset -e\n");
    for (job, rw, bs) in JOBS {
        script += &format!(
            "fio --name={job} --filename=/dev/sda --direct=1 --ioengine=libaio --iodepth=32 --rw={rw} --bs={bs} --size={span}M --runtime={} --time_based --minimal | sed 's/^/FIO /'\n",
            a.runtime
        );
    }
    let t = dir.join(format!("{name}.sh"));
    std::fs::write(&t, script)?;
    let log = dir.join(format!("{name}.log"));
    let kit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/run-guest.sh");
    let st = Command::new(kit)
        .arg("-k")
        .arg(&a.guest)
        .arg("-t")
        .arg(&t)
        .arg("-l")
        .arg(&log)
        .args(["-T", "900", "-m", "512M"])
        .arg("--")
        .args(qemu_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    if !st.success() {
        bail!("the {name} guest failed ({st}): see {}", log.display());
    }
    // fio's terse format v3: field 8 is read IOPS, 7 read KiB/s; 49 and 48
    // the same for writes.
    let mut out = Vec::new();
    for l in console.lines().filter_map(|l| l.strip_prefix("FIO ")) {
        let f: Vec<&str> = l.split(';').collect();
        let num = |i: usize| {
            f.get(i)
                .and_then(|x| x.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let (rbw, riops, wbw, wiops) = (num(6), num(7), num(47), num(48));
        out.push(if riops > 0.0 {
            (riops, rbw / 1024.0)
        } else {
            (wiops, wbw / 1024.0)
        });
    }
    if out.len() != JOBS.len() {
        bail!(
            "the {name} guest printed {} fio results: see {}",
            out.len(),
            log.display()
        );
    }
    Ok(out)
}

fn main() -> Result<()> {
    let a = Args::parse();
    println!("target layer alone, READ(10) of 4 KiB against a null unit:");
    for threads in [1, 2, 4, 8] {
        let r = target_rate(threads, 2.0);
        println!("  {threads} thread(s): {:>10.0} commands/s", r);
    }
    if a.target_only {
        return Ok(());
    }
    let dir = tempfile::Builder::new()
        .prefix("scsibench")
        .tempdir_in(&a.dir)?;
    let d = dir.path();
    let vmfs = vmfs_bin();
    // The datastore: one file LUN, mounted as a host.
    let lun = d.join("ds.img");
    std::fs::File::create(&lun)?.set_len((a.size + 1024) << 20)?;
    run(Command::new(&vmfs).arg("mkfs").arg(&lun))?;
    let mnt = d.join("m");
    std::fs::create_dir(&mnt)?;
    let st = d.join("state");
    let mut host = mount(&vmfs, &st, &lun, &mnt)?;
    let result = (|| -> Result<()> {
        let disk = mnt.join("bench.vmdk");
        run(Command::new(&vmfs)
            .args(["disk", "create", "--provisioning", "lazy", "--size"])
            .arg(format!("{}M", a.size))
            .arg("--state-dir")
            .arg(&st)
            .arg(&disk))?;
        let sock = d.join("vus.sock");
        run(Command::new(&vmfs)
            .args(["scsi", "add", "--state-dir"])
            .arg(&st)
            .arg("--socket")
            .arg(&sock)
            .arg(&disk))?;
        let ours = guest_fio(
            &a,
            d,
            "vhost",
            &[
                "-chardev".into(),
                format!("socket,id=vus,path={}", sock.display()),
                "-device".into(),
                "vhost-user-scsi-pci,chardev=vus,num_queues=1".into(),
            ],
        )?;
        let raw = d.join("qemu.raw");
        std::fs::File::create(&raw)?.set_len(a.size << 20)?;
        let theirs = guest_fio(
            &a,
            d,
            "qemu",
            &[
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=d0,cache=none,aio=io_uring",
                    raw.display()
                ),
                "-device".into(),
                "virtio-scsi-pci,num_queues=1".into(),
                "-device".into(),
                "scsi-hd,drive=d0".into(),
            ],
        )?;
        println!(
            "\nfio in the guest (QEMU TCG), QD 32, {} s per job:",
            a.runtime
        );
        println!(
            "  {:<14} {:>18} {:>18} {:>7}",
            "job", "vhost-user (ours)", "QEMU virtio-scsi", "ratio"
        );
        for (k, (job, _, bs)) in JOBS.iter().enumerate() {
            let (o, q) = (ours[k], theirs[k]);
            let (vo, vq, unit) = if *bs == "4k" {
                (o.0, q.0, "IOPS")
            } else {
                (o.1, q.1, "MiB/s")
            };
            println!(
                "  {job:<14} {:>12.0} {unit:<5} {:>12.0} {unit:<5} {:>6.2}x",
                vo,
                vq,
                if vq > 0.0 { vo / vq } else { 0.0 }
            );
        }
        Ok(())
    })();
    unsafe { libc::kill(host.id() as i32, libc::SIGTERM) };
    let _ = host.wait();
    result
}
