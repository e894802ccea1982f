//! `vmfs backup attach` / `detach`: a thin layer over
//! `backup_proxy::attach`. Attach starts itself again in the background
//! (its own session, logging to a file beside its record) and returns once
//! that process shows the disks, printing what it shows.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use backup_proxy::attach::{self, Asked, AttachReport, DetachReport};
use backup_proxy::util::human_bytes;

use crate::backup::{Reach, VmArgs};

fn print_attach(r: &AttachReport) {
    crate::backup::print_snapshot(&r.cleaned, &r.snapshot);
    println!(
        "attached on {} (process {}), read-only:",
        r.record.mountpoint.display(),
        r.record.pid
    );
    for i in &r.record.images {
        println!(
            "  {}  {} ({} may hold data){}",
            i.file.display(),
            human_bytes(i.size),
            human_bytes(i.data),
            i.nbd.as_ref().map(|u| format!("  {u}")).unwrap_or_default()
        );
    }
    println!(
        "end with: vmfs backup detach {}",
        r.record.mountpoint.display()
    );
    for w in &r.warnings {
        eprintln!("vmfs: warning: {w}");
    }
}

fn print_detach(d: &DetachReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(d)?);
        return Ok(());
    }
    if d.after_crash {
        println!(
            "the attach process of {} had died: its mount detached",
            d.mountpoint.display()
        );
    } else {
        println!(
            "detached {}; the snapshots lived {:.1} s",
            d.mountpoint.display(),
            d.snapshot_lifetime_ms / 1000.0
        );
    }
    for c in &d.consolidated {
        println!("  deleted the snapshot {c}");
    }
    Ok(())
}

/// Start this command again in the background and wait until it shows the
/// disks (or fails: then its log says why).
fn spawn_background(vm: &VmArgs, mountpoint: &Path, json: bool) -> Result<ExitCode> {
    let state = vm.host.state_dir();
    std::fs::create_dir_all(attach::records_dir(&state))
        .with_context(|| format!("{}", attach::records_dir(&state).display()))?;
    let log_path = attach::log_path(&state, mountpoint);
    let log =
        std::fs::File::create(&log_path).with_context(|| format!("{}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--background-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it only detaches the child from
    // this terminal's session (a Ctrl-C here must not stop the job).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the attach process")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim().is_empty() {
        let st = child.wait()?;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let why = log
            .lines()
            .filter(|l| l.starts_with("vmfs: ") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "the attach failed ({st}): {}\n(log: {})",
            if why.is_empty() {
                log.trim()
            } else {
                why.trim()
            },
            log_path.display()
        );
    }
    let r: AttachReport =
        serde_json::from_str(&line).context("reading the attach process's report")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_attach(&r);
        println!("(log: {})", log_path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmfs backup attach`.
pub fn attach_cmd(
    vm: VmArgs,
    mountpoint: &Path,
    nbd: Option<&str>,
    foreground: bool,
    json: bool,
    background_child: bool,
) -> Result<ExitCode> {
    if !foreground && !background_child {
        return spawn_background(&vm, mountpoint, json);
    }
    let mut vm = vm;
    if vm.datastore.is_empty() {
        // Recorded for `detach`, which may run from elsewhere.
        for d in &mut vm.disks {
            if let Ok(p) = std::path::absolute(&*d) {
                *d = p;
            }
        }
    }
    let job = vm.job()?;
    let (reach, paths) = Reach::open(
        &vm.disks,
        &vm.datastore,
        &vm.host,
        job.freeze_deadline_ms,
        true,
    )?;
    // Before the snapshots: a signal from here on ends the attach cleanly.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("installing the signal handler")?;
    let r = (|| -> Result<DetachReport> {
        let (attached, report) = attach::attach(
            &job,
            reach.coordinator(),
            &paths,
            mountpoint,
            nbd,
            &vm.datastore,
        )?;
        let d = attached.serve(reach.coordinator(), stop, || {
            if background_child {
                // One line for the parent, then nothing more on stdout (the
                // parent is gone once it has read it).
                if let Ok(t) = serde_json::to_string(&report) {
                    let mut o = std::io::stdout().lock();
                    let _ = writeln!(o, "{t}");
                    let _ = o.flush();
                }
                if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                    // SAFETY: dup2 onto our own stdout.
                    unsafe {
                        libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
                    }
                }
            } else if json {
                if let Ok(t) = serde_json::to_string_pretty(&report) {
                    println!("{t}");
                }
            } else {
                print_attach(&report);
                println!("(interrupt, or detach from another shell, to end)");
            }
        })?;
        Ok(d)
    })();
    reach.leave();
    let d = r?;
    if background_child {
        tracing::info!("detached: {:?}", d.consolidated);
    } else {
        print_detach(&d, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmfs backup detach`.
pub fn detach_cmd(
    mountpoint: &Path,
    force: bool,
    json: bool,
    host: &crate::HostArgs,
) -> Result<ExitCode> {
    let state = host.state_dir();
    let d = match attach::detach(&state, mountpoint, force)? {
        Asked::Done(d) => d,
        Asked::Dead(path, rec) => {
            eprintln!(
                "the attach process {} of {} is gone: cleaning up its snapshots here",
                rec.pid,
                rec.mountpoint.display()
            );
            let (reach, _) = Reach::open(&rec.disks, &rec.datastore, host, 10_000, false)?;
            let r = attach::cleanup_dead(&path, &rec, reach.coordinator());
            reach.leave();
            r?
        }
    };
    print_detach(&d, json)?;
    Ok(ExitCode::SUCCESS)
}
