//! The commands that read or change a datastore: through this machine's
//! host agent when a mount here hosts the datastore, else on the datastore
//! opened by this command. Either way the same library call
//! ([`host::ops`]) does the work, and the same code prints its result.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use host::ops;
use host::Client;
use serde_json::json;
use vmfs::Fs;

use crate::{human, open_luns, open_luns_for, DiskAt, DiskCmd, HostArgs};

/// Where a command's datastore is.
pub enum Target {
    /// Hosted on this machine: its agent.
    Agent(Client),
    /// Not hosted here: its LUNs, opened by this command.
    Luns(Vec<String>),
}

/// The datastore named by `args`: one directory under a vmfs mountpoint,
/// or its LUNs (then its host agent here, if one runs, is used).
pub fn target(args: &[String], state_dir: &Path) -> Result<Target> {
    if let [one] = args {
        let p = Path::new(one);
        if p.is_dir() {
            if let Some((c, _)) = host::client::at_path(p, state_dir)? {
                return Ok(Target::Agent(c));
            }
            bail!(
                "{one} is a directory, not under a vmfs mount of this machine: name the datastore by its LUNs or by a path under its mountpoint"
            );
        }
    }
    by_luns(args, state_dir)
}

/// The agent of the datastore on `luns`, else the LUNs.
pub fn by_luns(luns: &[String], state_dir: &Path) -> Result<Target> {
    let first =
        lun::open(&luns[0]).with_context(|| format!("opening LUN {}", lun::redact(&luns[0])))?;
    if let Some(uuid) = host::client::datastore_uuid(&*first) {
        drop(first);
        if let Some(c) = host::client::find(state_dir, &uuid)? {
            tracing::debug!(
                "datastore {uuid} is hosted here: through {}",
                c.socket.display()
            );
            return Ok(Target::Agent(c));
        }
    }
    Ok(Target::Luns(luns.to_vec()))
}

/// A LUN spec as the agent (another process, another working directory)
/// must see it: a relative file path made absolute.
fn absolute_lun(spec: &str) -> String {
    if spec.contains("://") || Path::new(spec).is_absolute() {
        return spec.to_string();
    }
    std::fs::canonicalize(spec)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| spec.to_string())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

// ---------------------------------------------------------------- info

pub fn info(args: &[String], state_dir: &Path, as_json: bool) -> Result<()> {
    let i = match target(args, state_dir)? {
        Target::Agent(mut c) => c.call::<ops::Info>("info", json!({}))?,
        Target::Luns(specs) => {
            let luns = open_luns(&specs)?;
            // The slots as on disk: the check's open replays journals in
            // memory and so frees slots in its own view.
            let slots = ops::disk_slots(&vmfs::Volume::open(luns.clone())?)?;
            let fs = Fs::open_for_check(luns, false)?;
            let i = ops::info(&fs, slots);
            fs.abandon();
            i
        }
    };
    if as_json {
        return print_json(&i);
    }
    println!("volume      {}", i.volume);
    println!(
        "label       {}",
        if i.label.is_empty() { "-" } else { &i.label }
    );
    println!(
        "format      version {}, configuration generation {}",
        i.format_version, i.config_generation
    );
    println!(
        "block size  {} (sub-blocks {})",
        human(i.block_size),
        human(i.sub_block_size)
    );
    println!("host slots  {}", i.max_hosts);
    println!(
        "journals    {} per host, allocated at a host's first mount",
        human(i.journal_bytes)
    );
    for s in &i.slots {
        let state = match s.state.as_str() {
            "mounted" => "mounted (or not cleanly unmounted)",
            "replaying" => "being replayed",
            "free" => "free",
            other => {
                println!("  slot {}: {other}", s.slot);
                continue;
            }
        };
        println!(
            "  slot {}: {state}, generation {}, journal at 4K block {:#x} ({})",
            s.slot,
            s.generation,
            s.journal_block,
            human(s.journal_bytes)
        );
    }
    for r in &i.replays {
        println!("  {r} (in memory only; mount applies it)");
    }
    println!(
        "capacity    {} ({} blocks)",
        human(i.total_blocks * i.block_size),
        i.total_blocks
    );
    println!(
        "free        {} ({} blocks, {:.1}%)",
        human(i.free_blocks * i.block_size),
        i.free_blocks,
        100.0 * i.free_blocks as f64 / i.total_blocks.max(1) as f64
    );
    println!(
        "files       {} in use, {} descriptors free in {} clusters",
        i.files, i.descriptors_free, i.descriptor_clusters
    );
    println!("locks       {}", i.lock_method);
    println!("extents     {}", i.extents.len());
    for (k, e) in i.extents.iter().enumerate() {
        println!(
            "  [{k}] {}  {}  blocks {}..{}  {}  {}",
            e.uuid,
            human(e.bytes),
            e.first_block,
            e.first_block + e.nblocks,
            e.lun,
            if e.compare_and_write {
                "compare-and-write"
            } else {
                "no compare-and-write"
            }
        );
        if let Some(note) = &e.note {
            println!("      {note}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- hosts

pub fn hosts(args: &[String], state_dir: &Path, as_json: bool) -> Result<()> {
    let h = match target(args, state_dir)? {
        Target::Agent(mut c) => c.call::<ops::Hosts>("hosts", json!({"watch_ms": 2000}))?,
        Target::Luns(specs) => {
            let vol = vmfs::Volume::open(open_luns(&specs)?)?;
            ops::hosts(&vol, std::time::Duration::from_secs(2))?
        }
    };
    if as_json {
        return print_json(&h);
    }
    for s in &h.slots {
        let state = match s.state.as_str() {
            "live" => "live (heartbeat moving)".to_string(),
            "silent" => format!(
                "live?  (no heartbeat change in {} s: stopped, or a slow heartbeat)",
                h.watched_ms / 1000
            ),
            "replaying" => format!("being recovered by slot {}", s.replayer),
            other => other.to_string(),
        };
        println!(
            "slot {:4}  {state}\n           host {}  generation {}  heartbeat {}  journal {}",
            s.slot,
            s.host,
            s.generation,
            s.heartbeat,
            if s.journal_block == 0 {
                "none".to_string()
            } else {
                format!(
                    "at 4K block {:#x} ({} KiB)",
                    s.journal_block,
                    s.journal_bytes / 1024
                )
            }
        );
    }
    if h.slots.is_empty() {
        println!("no host has mounted this datastore");
    }
    Ok(())
}

// ---------------------------------------------------------------- locks

pub fn locks(args: &[String], state_dir: &Path, as_json: bool) -> Result<()> {
    let l = match target(args, state_dir)? {
        Target::Agent(mut c) => c.call::<ops::Locks>("locks", json!({}))?,
        Target::Luns(specs) => {
            let luns = open_luns(&specs)?;
            let slots = ops::disk_slots(&vmfs::Volume::open(luns.clone())?)?;
            let fs = Fs::open_for_check(luns, false)?;
            let l = ops::locks(&fs, &slots);
            fs.abandon();
            l?
        }
    };
    if as_json {
        return print_json(&l);
    }
    println!("locks by {}", l.method);
    if l.held.is_empty() {
        println!("no lock is held");
    }
    for v in &l.held {
        println!("{}: {}, lock generation {}", v.object, v.mode, v.generation);
        for h in &v.holders {
            let state = match h.state.as_str() {
                "stale" => "stale: the slot was freed or recovered since (not a holder any more)",
                s => s,
            };
            println!(
                "  slot {} generation {}  host {}  {state}",
                h.slot, h.generation, h.host
            );
        }
    }
    if l.stale > 0 {
        println!(
            "{} lock sector(s) still name only hosts recovered or gone since: those locks are free",
            l.stale
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- status

pub fn status(state_dir: &Path, as_json: bool) -> Result<()> {
    let all = host::client::all(state_dir)?;
    if as_json {
        let v: Vec<_> = all
            .iter()
            .map(|r| match r {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => json!({ "error": e }),
            })
            .collect();
        return print_json(&v);
    }
    if all.is_empty() {
        println!(
            "this machine hosts no datastore (no host agent in {})",
            host::socket::run_dir(state_dir).display()
        );
    }
    for r in all {
        match r {
            Ok(s) => {
                println!(
                    "datastore {}{}",
                    s.datastore,
                    if s.label.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", s.label)
                    }
                );
                println!("  mountpoint  {}", s.mountpoint);
                println!(
                    "  host        {}, slot {}, generation {}, pid {}",
                    s.host, s.slot, s.generation, s.pid
                );
                println!(
                    "  journal     {} of {} in use",
                    human(s.journal_used),
                    human(s.journal_bytes)
                );
                println!("  open files  {}", s.open_files);
                println!("  lease       {} ms", s.lease_ms);
                println!("  socket      {}", s.socket);
                for a in &s.attached {
                    println!("  serves      {a}");
                }
            }
            Err(e) => println!("a host agent that did not answer: {e}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- rdm

/// `vmfs rdm create`: `rest` is the datastore's LUNs then PATH, or just a
/// PATH under a mountpoint of this machine.
pub fn rdm_create(mode: &str, url: &str, rest: &[String], host_args: &HostArgs) -> Result<()> {
    let mode = rdm::Mode::parse(mode).context("--mode is virtual or physical")?;
    let state_dir = host_args.state_dir();
    let (path, ds) = rest.split_last().context("PATH")?;
    let (target, path) = if ds.is_empty() {
        match host::client::at_path(Path::new(path), &state_dir)? {
            Some((c, inner)) => (Target::Agent(c), inner),
            None => bail!(
                "{path} is not under a vmfs mount of this machine: give the datastore's LUNs, then the path inside it"
            ),
        }
    } else {
        (by_luns(ds, &state_dir)?, path.clone())
    };
    let made = match target {
        Target::Agent(mut c) => c.call::<ops::RdmCreated>(
            "rdm-create",
            json!({"url": absolute_lun(url), "mode": mode.name(), "path": path}),
        )?,
        Target::Luns(specs) => {
            // A path that cannot name a file is refused before anything is opened.
            if path.split('/').all(str::is_empty) || path.split('/').any(|c| c == "..") {
                bail!("{path:?} is not a path to a file inside the datastore");
            }
            let t = vmfs::cluster::Timeouts::new(host_args.heartbeat_ms, host_args.lease_ms)?;
            let target = lun::open_with(url, t.lun_options())
                .with_context(|| format!("opening LUN {}", lun::redact(url)))?;
            let luns = open_luns_for(&specs, &t)?;
            let m = ops::rdm_mapping(&*target, mode, &luns)?;
            let fs = open_for_change(luns, host_args, &t, "creating the mapping online")?;
            let r = ops::rdm_create(&fs, &m, &path);
            fs.unmount()?;
            r?
        }
    };
    println!(
        "{}: {} mapping of {} ({}, {})",
        made.path,
        made.mode,
        made.url_hint,
        made.identity,
        human(made.size)
    );
    Ok(())
}

/// `vmfs rdm info`; exit 1 when this host does not reach the LUN unchanged.
pub fn rdm_info(args: &[String], state_dir: &Path) -> Result<bool> {
    let (path, ds) = args.split_last().context("PATH")?;
    let i = if ds.is_empty() {
        match host::client::at_path(Path::new(path), state_dir)? {
            Some((mut c, inner)) => c.call::<ops::RdmInfo>("rdm-info", json!({ "path": inner }))?,
            None => bail!(
                "{path} is not under a vmfs mount of this machine: give the datastore's LUNs, then the path inside it"
            ),
        }
    } else {
        match by_luns(ds, state_dir)? {
            Target::Agent(mut c) => c.call::<ops::RdmInfo>("rdm-info", json!({ "path": path }))?,
            Target::Luns(specs) => {
                let fs = Fs::open_for_check(open_luns(&specs)?, false)?;
                let r = ops::rdm_info(&fs, path, state_dir);
                fs.abandon();
                r?
            }
        }
    };
    println!("mapping     {}", i.path);
    println!("mode        {} ({})", i.mode, i.create_type);
    println!("identity    {}", i.identity);
    println!(
        "size        {} ({} bytes, {}-byte blocks)",
        human(i.size),
        i.size,
        i.block_size
    );
    println!("url hint    {}", i.url_hint);
    match &i.lun {
        Ok(l) => {
            println!("lun         {l} (identity and size match)");
            Ok(true)
        }
        Err(e) => {
            println!("lun         not usable: {e}");
            Ok(false)
        }
    }
}

// ---------------------------------------------------------------- extend

pub fn extend(args: &[String], add: &str, force: bool, host_args: &HostArgs) -> Result<()> {
    let state_dir = host_args.state_dir();
    let e = match target(args, &state_dir)? {
        Target::Agent(mut c) => {
            c.call::<ops::Extended>("extend", json!({"lun": absolute_lun(add), "force": force}))?
        }
        Target::Luns(specs) => {
            let t = vmfs::cluster::Timeouts::new(host_args.heartbeat_ms, host_args.lease_ms)?;
            let luns = open_luns_for(&specs, &t)?;
            let new = lun::open_with(add, t.lun_options())
                .with_context(|| format!("opening LUN {}", lun::redact(add)))?;
            // Before the datastore is opened: a refusal writes nothing.
            let checked = ops::check_new_extent(&new, force, &t)?;
            let fs = open_for_change(luns, host_args, &t, "extending online")?;
            let r = ops::extend(&fs, new, checked);
            fs.unmount()?;
            r?
        }
    };
    println!(
        "added {add}: {} -> {} ({} extents)",
        human(e.bytes_before),
        human(e.bytes_after),
        e.extents
    );
    Ok(())
}

/// A datastore no host of this machine has mounted, opened to change it:
/// offline when no host anywhere has it mounted, else as one more host
/// (under the volume lock, for the time of the change).
fn open_for_change(
    luns: Vec<Arc<dyn lun::Lun>>,
    host_args: &HostArgs,
    t: &vmfs::cluster::Timeouts,
    what: &str,
) -> Result<Fs> {
    let live = vmfs::cluster::live_slots(&vmfs::Volume::open(luns.clone())?, t)?;
    if live.is_empty() {
        return Ok(Fs::open(luns)?);
    }
    eprintln!(
        "{} host(s) have the datastore mounted, none on this machine: {what}, as a host for the time of the change",
        live.len()
    );
    Ok(Fs::mount(luns, host_args.uuid()?, *t)?)
}

/// The path a mount's agent reports for `mnt`.
pub fn canonical(mnt: &Path) -> PathBuf {
    std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf())
}

// ---------------------------------------------------------------- disks

/// `vmfs disk ...`: through this machine's host agent, or on the datastore
/// opened here.
pub fn disk(c: DiskCmd) -> Result<std::process::ExitCode> {
    let (cmd, args, at, change) = match &c {
        DiskCmd::Create {
            size,
            provisioning,
            adapter,
            change_tracking,
            at,
        } => (
            "disk-create",
            json!({"size": size, "provisioning": provisioning, "adapter": adapter,
                   "change_tracking": change_tracking == "on"}),
            at,
            true,
        ),
        DiskCmd::Changed {
            since, until, at, ..
        } => (
            "disk-changed",
            json!({"since": since, "until": until}),
            at,
            false,
        ),
        DiskCmd::Tracking { state, at } => {
            ("disk-tracking", json!({"on": state == "on"}), at, true)
        }
        DiskCmd::Share { state, at } => ("disk-share", json!({"on": state == "on"}), at, true),
        DiskCmd::Info { at, .. } => ("disk-info", json!({}), at, false),
        DiskCmd::Snapshot { at } => ("disk-snapshot", json!({}), at, true),
        DiskCmd::Revert { at } => ("disk-revert", json!({}), at, true),
        DiskCmd::Consolidate { all, at } => ("disk-consolidate", json!({ "all": all }), at, true),
        DiskCmd::Clone {
            dst,
            provisioning,
            at,
        } => (
            "disk-clone",
            json!({"to": dst_path(at, dst)?, "provisioning": provisioning}),
            at,
            true,
        ),
        DiskCmd::Import {
            raw,
            provisioning,
            adapter,
            at,
        } => (
            "disk-import",
            json!({"raw": abs(raw)?, "provisioning": provisioning, "adapter": adapter}),
            at,
            true,
        ),
        DiskCmd::Export { raw, at } => ("disk-export", json!({ "raw": abs(raw)? }), at, false),
        DiskCmd::Resize { size, at } => ("disk-resize", json!({ "size": size }), at, true),
        DiskCmd::Delete { at } => ("disk-delete", json!({}), at, true),
        DiskCmd::Check { repair, at } => ("disk-check", json!({ "repair": repair }), at, *repair),
    };
    let state_dir = at.host.state_dir();
    let (target, path) = disk_target(at, &state_dir)?;
    let mut args = args;
    args["path"] = json!(path);
    let out: serde_json::Value = match target {
        Target::Agent(mut c) => c.call_value(cmd, args)?,
        Target::Luns(specs) => {
            let t = vmfs::cluster::Timeouts::new(at.host.heartbeat_ms, at.host.lease_ms)?;
            let luns = open_luns_for(&specs, &t)?;
            let fs = Arc::new(if change {
                open_for_change(luns, &at.host, &t, "changing the disk")?
            } else {
                Fs::open_for_check(luns, false)?
            });
            let r = host::agent::disk_command(&fs, cmd, &args);
            if change {
                fs.unmount()?;
            } else {
                fs.abandon();
            }
            r?
        }
    };
    if let DiskCmd::Info { json: true, .. } | DiskCmd::Changed { json: true, .. } = c {
        print_json(&out)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let DiskCmd::Changed { .. } = c {
        let r: ops::DiskChanges = serde_json::from_value(out)?;
        if let Some(why) = &r.whole_disk {
            eprintln!("the whole disk must be read: {why}");
        }
        for (a, b) in &r.ranges {
            println!("{a} {}", b - a);
        }
        eprintln!(
            "{} range(s), {} of {} ({} granularity)",
            r.ranges.len(),
            human(r.bytes),
            human(r.size),
            human(r.granularity)
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let DiskCmd::Check { repair, .. } = c {
        let r: ops::DiskCheck = serde_json::from_value(out)?;
        for p in &r.problems {
            println!("problem: {p}");
        }
        for x in &r.repaired {
            println!("repaired: {x}");
        }
        for x in &r.notes {
            println!("note: {x}");
        }
        let clean = r.problems.is_empty() || (repair && r.unrepairable == 0);
        if r.problems.is_empty() {
            println!("{}: {} layer(s), clean", r.path, r.layers);
        } else if clean {
            println!("{}: {} problem(s), all repaired", r.path, r.problems.len());
        } else {
            println!(
                "{}: {} problem(s), {} that cannot be repaired safely{}",
                r.path,
                r.problems.len(),
                r.unrepairable,
                if repair {
                    ""
                } else {
                    "; run with --repair to fix what can be fixed"
                }
            );
        }
        return Ok(if clean {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::from(1)
        });
    }
    if let DiskCmd::Info { .. } = c {
        let i: ops::DiskInfo = serde_json::from_value(out)?;
        println!("disk        {}", i.path);
        println!("size        {} ({} bytes)", human(i.size), i.size);
        if let Some(a) = &i.adapter {
            println!("adapter     {a}");
        }
        if let Some(t) = i.thin {
            println!("base        {}", if t { "thin" } else { "thick" });
        }
        println!("chain       {} layer(s), newest first", i.layers.len());
        for (k, l) in i.layers.iter().enumerate() {
            println!(
                "  [{k}] {}  CID {}{}  {}  {} in {}",
                l.descriptor,
                l.cid,
                l.parent_cid
                    .as_ref()
                    .map(|p| format!(" (parent {p})"))
                    .unwrap_or_default(),
                l.create_type,
                human(l.allocated),
                l.extents.join(", ")
            );
        }
        match &i.tracking {
            None => println!("tracking    off"),
            Some(t) => {
                println!(
                    "tracking    on, {} granularity, in {}",
                    human(t.granularity),
                    t.file
                );
                if let Some(id) = &t.last_change_id {
                    println!("  last change ID  {id}");
                }
                println!("  history began   {}", t.began);
                if let Some(w) = &t.invalid {
                    println!("  cannot answer   {w}");
                }
            }
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let d: ops::DiskDone = serde_json::from_value(out)?;
    println!(
        "{} ({} snapshot(s) below the current layer)",
        d.said, d.depth
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// A local path made absolute (the host agent runs elsewhere).
fn abs(p: &Path) -> Result<String> {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    p.to_str()
        .map(String::from)
        .context("a raw image's path must be UTF-8")
}

/// A clone's destination inside the datastore: under the same mountpoint
/// as DISK, or (with --datastore) as given.
fn dst_path(at: &DiskAt, dst: &str) -> Result<String> {
    if !at.datastore.is_empty() {
        return Ok(dst.to_string());
    }
    let Some((src_mp, _)) = host::client::mount_of(Path::new(&at.disk)) else {
        bail!("{} is not under a vmfs mount of this machine", at.disk);
    };
    match host::client::mount_of(Path::new(dst)) {
        Some((mp, inner)) if mp == src_mp => Ok(inner),
        _ => bail!(
            "{dst} is not under the mountpoint {} of {}'s datastore",
            src_mp.display(),
            at.disk
        ),
    }
}

/// The datastore of a disk, and the disk's path inside it.
fn disk_target(at: &DiskAt, state_dir: &Path) -> Result<(Target, String)> {
    if !at.datastore.is_empty() {
        return Ok((by_luns(&at.datastore, state_dir)?, at.disk.clone()));
    }
    match host::client::at_path(Path::new(&at.disk), state_dir)? {
        Some((c, inner)) => Ok((Target::Agent(c), inner)),
        None => bail!(
            "{} is not under a vmfs mount of this machine: give --datastore LUN... and the path inside the datastore",
            at.disk
        ),
    }
}
