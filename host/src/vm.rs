//! What a backup asks of the host that serves a VM's disks: snapshot all of
//! them at one moment, quiesced through the guest's agent when it has one
//! (`vm-snapshot`), and later delete those snapshots while the guest runs
//! (`vm-consolidate`).
//!
//! The whole freeze happens inside one `vm-snapshot`: freeze, hold every
//! disk's I/O, snapshot each, resume, thaw. Whoever asked can die at any
//! moment without leaving the guest frozen; and a watchdog thaws the guest
//! at the freeze deadline even if a snapshot hangs (the result then says
//! the snapshots are only crash-consistent).

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypervisor_io::vdisk::VirtualDisk;

use crate::error::{HostError, Result};
use crate::ops::{self, DiskDone};
use crate::qga;
use crate::scsi::Scsi;

pub use backup_proxy::job::{ConsolidateArgs, Frozen, Job, Snapshot, SnapshotArgs};

fn frozen_of(
    fs: &Arc<vmfs::Fs>,
    path: &str,
    s: snapshot::ops::Snapshot,
    job: &Option<Job>,
) -> Frozen {
    Frozen {
        cid: layer_cid(fs, path, &s.frozen),
        path: path.to_string(),
        frozen: s.frozen,
        change_id: s.change_id.map(|i| i.to_string()),
        job: job.clone(),
    }
}

/// The CID of layer `frozen` beside disk `path` (`None`: unreadable).
fn layer_cid(fs: &Arc<vmfs::Fs>, path: &str, frozen: &str) -> Option<String> {
    let (store, _) = ops::store_for(fs, path).ok()?;
    snapshot::disk::read_descriptor(&*store, frozen)
        .ok()
        .map(|d| format!("{:08x}", d.cid))
}

/// Whether job `j` still runs, as far as host `me` (this host's UUID) of
/// datastore `fs` can tell: a proxy's by its heartbeat slot and
/// generation, a job of this machine by its process.
pub fn job_alive(j: &Job, fs: &Arc<vmfs::Fs>, me: &str) -> bool {
    let slots = match ops::disk_slots(&fs.vol()) {
        Ok(s) => s,
        // Unknown: as if it ran (nothing deleted under a live job).
        Err(_) => return true,
    };
    let live = |s: &vmfs::Result<vmfs::format::HostSlot>| {
        s.as_ref()
            .ok()
            .filter(|s| s.state == vmfs::format::SLOT_LIVE)
            .cloned()
    };
    if let Some((slot, gen)) = j.slot {
        return slots
            .iter()
            .any(|(n, s)| *n == slot && live(s).is_some_and(|s| s.generation == gen));
    }
    if j.host == me {
        return std::path::Path::new(&format!("/proc/{}", j.pid)).exists();
    }
    slots
        .iter()
        .any(|(_, s)| live(s).is_some_and(|s| vmfs::volume::uuid_str(&s.host) == j.host))
}

/// The file beside disk `path` that names the snapshot a backup took of it
/// until the backup deletes it (`DIR/NAME.vmdk.backup`; JSON: a [`Frozen`]):
/// a backup that was killed leaves it, and the next one deletes that
/// snapshot first.
pub fn marker_of(path: &str) -> String {
    format!("{}.backup", path.trim_end_matches('/'))
}

fn write_marker(fs: &Arc<vmfs::Fs>, f: &Frozen) -> Result<()> {
    let (store, name) = ops::store_for(fs, &f.path)?;
    let text = serde_json::to_vec_pretty(f).map_err(|e| HostError::Agent(e.to_string()))?;
    snapshot::ops::replace_file(&*store, &format!("{name}.backup"), &text).map_err(ops::disk_err)
}

/// The snapshot a backup left on disk `path` (its marker), if any.
pub fn left_by_backup(fs: &Arc<vmfs::Fs>, path: &str) -> Result<Option<Frozen>> {
    let (store, name) = ops::store_for(fs, path)?;
    let m = format!("{name}.backup");
    let Some(b) = snapshot::ops::read_small(&*store, &m, 64 << 10).map_err(ops::disk_err)? else {
        return Ok(None);
    };
    match serde_json::from_slice::<Frozen>(&b) {
        Ok(fr) => Ok(Some(fr)),
        Err(e) => {
            tracing::warn!("{path}: ignoring a damaged backup marker {m}: {e}");
            Ok(None)
        }
    }
}

/// Refuse to consolidate disk `path` while a backup that still runs reads
/// its snapshot (the merge would go into the layer being read; a reader on
/// this host does not hold the layer's lock against this host).
pub fn refuse_while_backed_up(fs: &Arc<vmfs::Fs>, path: &str) -> Result<()> {
    let me = fs
        .member()
        .map(|m| vmfs::volume::uuid_str(&m.host))
        .unwrap_or_default();
    if let Some(m) = left_by_backup(fs, path)? {
        if let Some(j) = m.job.as_ref().filter(|j| job_alive(j, fs, &me)) {
            return Err(HostError::Busy(format!(
                "{path}: a backup is reading its snapshot {} (job: host {}, process {}): consolidate once it ends (the backup deletes its snapshot itself)",
                m.frozen, j.host, j.pid
            )));
        }
    }
    Ok(())
}

fn remove_marker(fs: &Arc<vmfs::Fs>, f: &Frozen) {
    let r = ops::store_for(fs, &f.path).and_then(|(store, name)| {
        store
            .remove_if_there(&format!("{name}.backup"))
            .map_err(|e| HostError::Agent(e.to_string()))
    });
    if let Err(e) = r {
        tracing::warn!("{}: removing its backup marker: {e}", f.path);
    }
}

/// The guest agent frozen for a snapshot, and the watchdog that thaws it at
/// the deadline.
struct Freeze {
    agent: Arc<Mutex<qga::Agent>>,
    stop: mpsc::Sender<()>,
    watchdog: std::thread::JoinHandle<bool>,
    started: Instant,
    count: u64,
}

impl Freeze {
    fn start(path: &PathBuf, deadline: Duration) -> Result<Freeze> {
        let started = Instant::now();
        let mut a = qga::Agent::connect(path, Duration::from_secs(5))?;
        let agent_deadline = deadline.min(Duration::from_secs(60));
        let count = match a.freeze(agent_deadline) {
            Ok(n) => n,
            Err(e) => {
                // Some filesystems may be frozen: thaw whatever is.
                let _ = a.thaw(Duration::from_secs(10));
                return Err(e);
            }
        };
        let agent = Arc::new(Mutex::new(a));
        let (stop, stopped) = mpsc::channel();
        let dog = agent.clone();
        let left = deadline.saturating_sub(started.elapsed());
        let watchdog = std::thread::spawn(move || {
            if stopped.recv_timeout(left) == Err(mpsc::RecvTimeoutError::Timeout) {
                tracing::error!(
                    "the guest stayed frozen to its deadline of {} ms: thawing it now",
                    deadline.as_millis()
                );
                let mut a = dog.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = a.thaw(Duration::from_secs(10)) {
                    tracing::error!("thawing the guest at its deadline: {e}");
                }
                return true;
            }
            false
        });
        Ok(Freeze {
            agent,
            stop,
            watchdog,
            started,
            count,
        })
    }

    /// Thaw; whether the freeze held until now (the watchdog did not thaw
    /// first), and how long the guest was frozen.
    fn thaw(self) -> (bool, Duration, Result<u64>) {
        let _ = self.stop.send(());
        let fired = self.watchdog.join().unwrap_or(true);
        let r = if fired {
            Ok(0)
        } else {
            // Tried again: a guest left frozen is the one outcome to avoid.
            let mut a = self.agent.lock().unwrap_or_else(|p| p.into_inner());
            let mut r = a.thaw(Duration::from_secs(10));
            for _ in 0..2 {
                if r.is_ok() {
                    break;
                }
                tracing::warn!("thawing the guest: {:?}; trying again", r.as_ref().err());
                std::thread::sleep(Duration::from_millis(500));
                r = a.thaw(Duration::from_secs(10));
            }
            r
        };
        (!fired, self.started.elapsed(), r)
    }
}

impl Scsi {
    /// `vm-snapshot` (see the module doc).
    pub fn vm_snapshot(&self, a: &SnapshotArgs) -> Result<Snapshot> {
        if a.disks.is_empty() {
            return Err(HostError::BadRequest("vm-snapshot: no disk given".into()));
        }
        for d in &a.disks {
            if let Some(f) = left_by_backup(self.fs(), d)? {
                return Err(HostError::Busy(match &f.job {
                    Some(j) if job_alive(j, self.fs(), self.host()) => format!(
                        "{d}: a backup is running (its job: host {}, process {}); a second one is refused",
                        j.host, j.pid
                    ),
                    _ => format!(
                        "{d}: the snapshot {} of a backup that was killed is still there: `vm-consolidate` it first",
                        f.frozen
                    ),
                }));
            }
        }
        // Each disk: attached here (its controller's agent), or opened here.
        let mut attached: Vec<(String, Arc<VirtualDisk>)> = Vec::new();
        let mut agents: Vec<PathBuf> = Vec::new();
        let mut off: Vec<String> = Vec::new();
        for d in &a.disks {
            match self.attached_disk(d)? {
                Some((p, disk, agent)) => {
                    attached.push((p, disk));
                    agents.extend(agent.filter(|g| !agents.contains(g)));
                }
                None => off.push(d.clone()),
            }
        }
        // The job names the agent when the controllers do not.
        if agents.is_empty() && !attached.is_empty() {
            agents.extend(a.guest_agent.as_ref().map(PathBuf::from));
        }
        let mut ops_held = Vec::new();
        for (p, d) in &attached {
            match d.begin_op() {
                Some(op) => ops_held.push(op),
                None => {
                    return Err(HostError::Busy(format!(
                        "{p}: another snapshot, consolidation or resize of it is running; try again when it ends"
                    )))
                }
            }
        }
        // A merge its host did not finish (it died mid-consolidation) is
        // finished now with the guest running, not inside the hold below.
        for ((p, _), op) in attached.iter().zip(&ops_held) {
            crate::online::finish_interrupted(p, op)?;
        }
        // Quiesce.
        let deadline = Duration::from_millis(a.freeze_deadline_ms.clamp(100, 600_000));
        let mut freezes = Vec::new();
        let mut how = Vec::new();
        if !a.quiesce {
            how.push("crash-consistent (quiescing not asked)".to_string());
        } else if agents.is_empty() {
            how.push(if attached.is_empty() {
                "the VM is off (no host serves its disks)".to_string()
            } else {
                "crash-consistent (no guest agent named: `vmfs scsi add --guest-agent`, or the job's --guest-agent)".to_string()
            });
        }
        if a.quiesce {
            for g in &agents {
                match Freeze::start(g, deadline) {
                    Ok(f) => freezes.push(f),
                    Err(e) => {
                        tracing::warn!("quiescing through {}: {e}", g.display());
                        how.push(format!("crash-consistent ({e})"));
                    }
                }
            }
        }
        // Every disk held at once, then each snapshotted.
        let t = Instant::now();
        let mut done = Vec::new();
        let r: Result<()> = (|| {
            let mut held = Vec::new();
            for (p, d) in &attached {
                held.push(
                    d.hold()
                        .map_err(|e| HostError::Agent(format!("{p}: holding its I/O: {e}")))?,
                );
            }
            let mut r = Ok(());
            for (p, d) in &attached {
                match snapshot::ops::snapshot(d.store().clone(), d.name()) {
                    Ok(s) => done.push(frozen_of(self.fs(), p, s, &a.job)),
                    Err(e) => {
                        r = Err(ops::disk_err(e));
                        break;
                    }
                }
            }
            for h in held {
                h.reopen();
            }
            r
        })();
        let held_for = t.elapsed();
        // Thaw (always, whatever happened).
        let mut quiesced = !freezes.is_empty() && how.is_empty();
        let mut frozen_for = Duration::ZERO;
        let mut count = 0;
        for f in freezes {
            count += f.count;
            let (held, d, tr) = f.thaw();
            frozen_for = frozen_for.max(d);
            if !held {
                quiesced = false;
                how.push(format!(
                    "crash-consistent (the freeze outlasted its deadline of {} ms and was undone)",
                    deadline.as_millis()
                ));
            }
            if let Err(e) = tr {
                tracing::error!("thawing the guest: {e}");
                how.push(format!("thawing: {e}"));
            }
        }
        // The disks' operations end here: deleting what a failure left
        // starts operations of its own.
        drop(ops_held);
        if let Err(e) = r {
            self.undo(&done);
            return Err(e);
        }
        // Disks no host serves: nothing writes them, no pause needed.
        for p in &off {
            let r = ops::store_for(self.fs(), p).and_then(|(store, name)| {
                snapshot::ops::snapshot(store, &name).map_err(ops::disk_err)
            });
            match r {
                Ok(s) => done.push(frozen_of(self.fs(), p, s, &a.job)),
                Err(e) => {
                    self.undo(&done);
                    return Err(e);
                }
            }
        }
        for f in &done {
            if let Err(e) = write_marker(self.fs(), f) {
                self.undo(&done);
                return Err(e);
            }
        }
        if quiesced {
            how.insert(0, format!("guest agent ({count} filesystem(s) frozen)"));
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            "vm-snapshot of {} disk(s): {}; guest frozen {:.1} ms, I/O held {:.1} ms",
            done.len(),
            how.join("; "),
            ms(frozen_for),
            ms(held_for)
        );
        Ok(Snapshot {
            disks: done,
            quiesced,
            how: how.join("; "),
            frozen_ms: ms(frozen_for),
            held_ms: ms(held_for),
        })
    }

    /// Delete snapshots a failed `vm-snapshot` took (logged, not raised).
    fn undo(&self, done: &[Frozen]) {
        if let Err(e) = self.vm_consolidate(&ConsolidateArgs {
            disks: done.to_vec(),
            job: done.first().and_then(|f| f.job.clone()),
        }) {
            tracing::error!("deleting the snapshots of a failed vm-snapshot: {e}");
        }
    }

    /// `vm-consolidate`: delete each snapshot named (with its guest running
    /// when attached here).
    /// Delete the snapshots killed backup jobs left on the disks attached
    /// here (their markers name a job that no longer runs), so a VM whose
    /// backups stopped does not grow a delta for ever. A job is taken for
    /// dead only when two calls in a row found it so (`dead`: what the
    /// last call found), leaving its next run the time to clean up itself.
    /// What was deleted, for the log.
    pub fn clean_abandoned(&self, dead: &mut Vec<(String, String)>) -> Vec<String> {
        let mut now = Vec::new();
        let mut done = Vec::new();
        for p in self.attached_paths() {
            let Ok(Some(m)) = left_by_backup(self.fs(), &p) else {
                continue;
            };
            // A snapshot someone took by hand (no job): theirs to delete.
            let Some(j) = &m.job else { continue };
            if job_alive(j, self.fs(), self.host()) {
                continue;
            }
            let key = (p.clone(), m.frozen.clone());
            if !dead.contains(&key) {
                now.push(key);
                continue;
            }
            let a = ConsolidateArgs {
                disks: vec![m.clone()],
                job: None,
            };
            match self.vm_consolidate(&a) {
                Ok(_) => {
                    tracing::warn!(
                        "{p}: deleted the snapshot {} a killed backup left (job: host {}, process {})",
                        m.frozen,
                        j.host,
                        j.pid
                    );
                    done.push(format!("{p}: {}", m.frozen));
                }
                Err(e) => {
                    tracing::warn!(
                        "{p}: deleting the snapshot {} a killed backup left: {e}",
                        m.frozen
                    );
                    now.push(key);
                }
            }
        }
        *dead = now;
        done
    }

    pub fn vm_consolidate(&self, a: &ConsolidateArgs) -> Result<Vec<DiskDone>> {
        let mut out = Vec::new();
        let mut first_err = None;
        for f in &a.disks {
            // Another job's snapshot, while that job runs: not deleted.
            if let Some(m) = left_by_backup(self.fs(), &f.path)? {
                if let Some(j) = &m.job {
                    if m.frozen == f.frozen
                        && a.job.as_ref() != Some(j)
                        && job_alive(j, self.fs(), self.host())
                    {
                        let e = HostError::Busy(format!(
                            "{}: its snapshot {} belongs to a backup that is running (host {}, process {})",
                            f.path, f.frozen, j.host, j.pid
                        ));
                        first_err.get_or_insert(e);
                        continue;
                    }
                }
            }
            // A layer of that name that is another snapshot now (the
            // backup's was deleted, a later one took its name): not ours.
            if f.cid.is_some() && layer_cid(self.fs(), &f.path, &f.frozen) != f.cid {
                if left_by_backup(self.fs(), &f.path)?.is_some_and(|m| m.frozen == f.frozen) {
                    remove_marker(self.fs(), f);
                }
                continue;
            }
            let r = match self.attached_disk(&f.path)? {
                Some((p, disk, _)) => match disk.begin_op() {
                    Some(op) => crate::online::delete_snapshot(&p, &op, &f.frozen),
                    None => Err(HostError::Busy(format!(
                        "{p}: another snapshot, consolidation or resize of it is running; try again when it ends"
                    ))),
                },
                None => ops::disk_delete_snapshot(self.fs(), &f.path, &f.frozen),
            };
            match r {
                Ok(d) => {
                    if left_by_backup(self.fs(), &f.path)?.is_some_and(|m| m.frozen == f.frozen) {
                        remove_marker(self.fs(), f);
                    }
                    out.push(d)
                }
                Err(e) => {
                    tracing::error!("{}: deleting snapshot {}: {e}", f.path, f.frozen);
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};

    /// A fake guest agent: answers sync, freeze (2 filesystems) and thaw,
    /// and counts the thaws.
    fn fake_agent(p: &std::path::Path) -> Arc<std::sync::atomic::AtomicUsize> {
        let thaws = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let l = std::os::unix::net::UnixListener::bind(p).unwrap();
        let t = thaws.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    line.retain(|&b| b != 0xff);
                    let v: serde_json::Value = match serde_json::from_slice(&line) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    let reply = match v["execute"].as_str().unwrap_or("") {
                        "guest-sync-delimited" => {
                            let _ = s.write_all(&[0xff]);
                            format!("{{\"return\": {}}}\n", v["arguments"]["id"])
                        }
                        "guest-fsfreeze-freeze" => "{\"return\": 2}\n".into(),
                        "guest-fsfreeze-thaw" => {
                            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            "{\"return\": 2}\n".into()
                        }
                        _ => "{\"error\": {\"desc\": \"?\"}}\n".into(),
                    };
                    let _ = s.write_all(reply.as_bytes());
                }
            }
        });
        thaws
    }

    /// A freeze that outlasts its deadline (a snapshot that hangs) is thawed
    /// by the watchdog on time, once, and says so.
    #[test]
    fn the_watchdog_thaws_a_guest_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qga.sock");
        let thaws = fake_agent(&p);
        let f = Freeze::start(&p, Duration::from_millis(300)).unwrap();
        assert_eq!(f.count, 2);
        let t = Instant::now();
        while thaws.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "never thawed");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (held, frozen_for, r) = f.thaw();
        assert!(!held, "the freeze is reported as undone");
        assert!(r.is_ok());
        assert!(frozen_for >= Duration::from_millis(300));
        assert_eq!(thaws.load(std::sync::atomic::Ordering::SeqCst), 1);
        // In time: thawed by the snapshot's end, not the watchdog.
        let f = Freeze::start(&p, Duration::from_secs(30)).unwrap();
        let (held, _, r) = f.thaw();
        assert!(held && r.is_ok());
        assert_eq!(thaws.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
