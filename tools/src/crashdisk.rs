//! Crash states of virtual-disk workloads (`vmfs crashtest --workload
//! 'disk:…'`, and a share of every default run): writes into a disk's chain
//! through `snapshot`, flushes, snapshot, revert, consolidate, grow,
//! clone, and the steps of a running disk's consolidation (freeze, merge), on the recording LUN of [`crate::crashtest`], with an oracle on
//! the disk's content and on its change tracking.
//!
//! For every crash state the recovered datastore must mount and fsck
//! clean, and then:
//! - the disk opens (its chain is whole: descriptors, CIDs, grain tables);
//! - every sector reads as in one state the operations could have left:
//!   all acknowledged flushes kept, and around a chain operation in flight
//!   either everything before it or everything after it, never a mix;
//! - for every change ID a snapshot printed before the crash,
//!   `changed --since ID` is not "the whole disk" (a crash does not reset
//!   the history) and covers every byte that differs between the disk at
//!   that ID and the recovered disk;
//! - a writer's open (which finishes an interrupted consolidation and
//!   recovers change tracking) changes no byte, and then `disk check` is
//!   clean and the answers still cover;
//! - a clone is either absent or whole.

use std::fmt;
use std::sync::Arc;

use lun::{Event, Lun, MemLun, RecordingLun, WriteLog};
use snapshot::ctk::ChangeId;
use snapshot::ops::{self, Provisioning};
use snapshot::{Disk, Store, VmfsStore};
use vmfs::{Fs, MkfsOptions};

use crate::crashtest::{crash_image, mark_done, mark_start, run_recorded, Crash, Rng, Summary};

const LUN_SIZES: [u64; 2] = [2 << 20, 14 << 20];
const DISK: &str = "disk.vmdk";
const CLONE: &str = "copy.vmdk";
const SIZE: u64 = 2 << 20;

/// One step of a disk workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// `len` bytes of `byte` at `off` (not durable until a flush).
    Write(u64, u64, u8),
    Flush,
    Snapshot,
    Revert,
    Consolidate,
    /// Grow by this many bytes.
    Grow(u64),
    /// A clone of the current content as `copy.vmdk`.
    Clone,
    /// The first step of consolidating a running disk: a snapshot that
    /// ends no change epoch ([`snapshot::merge::freeze`]).
    Freeze,
    /// The newest snapshot merged into the one below it and dropped
    /// ([`snapshot::merge::merge_down`]).
    Merge,
}

impl DiskOp {
    /// Changes the chain (the disk is closed first; acknowledged durable).
    fn is_chain(&self) -> bool {
        !matches!(self, DiskOp::Write(..) | DiskOp::Flush)
    }
}

impl fmt::Display for DiskOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskOp::Write(o, l, b) => write!(f, "w({o},{l},{b})"),
            DiskOp::Flush => write!(f, "flush"),
            DiskOp::Snapshot => write!(f, "snapshot"),
            DiskOp::Revert => write!(f, "revert"),
            DiskOp::Consolidate => write!(f, "consolidate"),
            DiskOp::Grow(n) => write!(f, "grow({n})"),
            DiskOp::Clone => write!(f, "clone"),
            DiskOp::Freeze => write!(f, "freeze"),
            DiskOp::Merge => write!(f, "merge"),
        }
    }
}

impl std::str::FromStr for DiskOp {
    type Err = String;
    fn from_str(s: &str) -> Result<DiskOp, String> {
        let s = s.trim();
        let args = |s: &str| -> Result<Vec<u64>, String> {
            s.split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .map_err(|_| format!("{x:?} is not a number"))
                })
                .collect()
        };
        Ok(match s {
            "flush" => DiskOp::Flush,
            "snapshot" => DiskOp::Snapshot,
            "revert" => DiskOp::Revert,
            "consolidate" => DiskOp::Consolidate,
            "freeze" => DiskOp::Freeze,
            "merge" => DiskOp::Merge,
            "clone" => DiskOp::Clone,
            _ => {
                let (name, rest) = s
                    .split_once('(')
                    .and_then(|(n, r)| Some((n, r.strip_suffix(')')?)))
                    .ok_or_else(|| format!("unknown disk operation {s:?}"))?;
                let a = args(rest)?;
                match (name, a.as_slice()) {
                    ("w", &[o, l, b]) if l > 0 && b < 256 => DiskOp::Write(o, l, b as u8),
                    ("grow", &[n]) if n > 0 => DiskOp::Grow(n),
                    _ => return Err(format!("unknown disk operation {s:?}")),
                }
            }
        })
    }
}

/// `disk:OP;OP;…`
pub fn format_disk_ops(ops: &[DiskOp]) -> String {
    let v: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
    format!("disk:{}", v.join(";"))
}

pub fn parse_disk_ops(s: &str) -> Result<Vec<DiskOp>, String> {
    let s = s
        .strip_prefix("disk:")
        .ok_or_else(|| format!("{s:?}: a disk workload starts with disk:"))?;
    s.split(';')
        .filter(|x| !x.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// A random disk workload of `len` operations that the chain allows
/// (revert and consolidate only with a snapshot, grow only without).
pub fn random_disk_workload(rng: &mut Rng, len: usize) -> Vec<DiskOp> {
    let mut depth = 0;
    let mut size = SIZE;
    let mut w = Vec::new();
    while w.len() < len {
        let op = match rng.below(14) {
            0..=4 => {
                let most = if rng.below(2) == 0 { 4096 } else { 200_000 };
                let l = 1 + rng.below(most);
                let l = l.min(size);
                let o = rng.below(size - l + 1);
                DiskOp::Write(o, l, 1 + rng.below(255) as u8)
            }
            5 => DiskOp::Flush,
            6 | 7 if depth < 4 => {
                depth += 1;
                DiskOp::Snapshot
            }
            8 if depth > 0 => DiskOp::Revert,
            9 if depth > 0 => {
                depth -= 1;
                DiskOp::Consolidate
            }
            10 if depth == 0 && size < 3 * SIZE => {
                let n = 512 * (1 + rng.below(1024));
                size += n;
                DiskOp::Grow(n)
            }
            11 => DiskOp::Clone,
            12 if depth < 4 => {
                depth += 1;
                DiskOp::Freeze
            }
            13 if depth >= 2 => {
                depth -= 1;
                DiskOp::Merge
            }
            _ => continue,
        };
        w.push(op);
    }
    w
}

struct Recording {
    log: Vec<Event>,
    /// The disk's content after each prefix of the operations.
    states: Vec<Vec<u8>>,
    /// The clone's content after each prefix (once made).
    clones: Vec<Option<Vec<u8>>>,
    persisted: Vec<bool>,
    /// The change ID each snapshot printed.
    ids: Vec<Option<ChangeId>>,
}

/// The disk harness: a datastore with one thin 2 MiB disk holding some data.
pub struct DiskHarness {
    bases: Vec<Arc<MemLun>>,
    base: Vec<u8>,
}

fn store(fs: &Arc<Fs>) -> Arc<dyn Store> {
    Arc::new(VmfsStore::new(fs.clone(), "vm"))
}

fn read_all(store: &Arc<dyn Store>, name: &str) -> Result<Vec<u8>, String> {
    let d =
        Disk::open(store.clone(), name, false).map_err(|e| format!("{name} does not open: {e}"))?;
    let mut b = vec![0u8; d.capacity() as usize];
    d.read_at(&mut b, 0)
        .map_err(|e| format!("reading {name}: {e}"))?;
    Ok(b)
}

impl DiskHarness {
    pub fn new() -> anyhow::Result<DiskHarness> {
        // Intent regions of 256 KiB (8 on the 2 MiB disk, so that which
        // region a block is in matters), and a checkpoint at every flush
        // (which keeps the intent bits of regions still being written):
        // the same code paths as a big disk, and no clock in the log.
        snapshot::ctk::test_knobs(4, true);
        snapshot::ids::test_seed(1);
        let mems: Vec<Arc<MemLun>> = LUN_SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| Arc::new(MemLun::new(&format!("disk-lun{i}"), n)))
            .collect();
        let fs = Arc::new(Fs::mkfs(
            mems.iter().map(|m| m.clone() as Arc<dyn Lun>).collect(),
            &MkfsOptions {
                label: "crashdisk".into(),
                block_size: 64 << 10,
                max_hosts: 4,
                journal_blocks: 256,
                ..Default::default()
            },
        )?);
        fs.mkdir_path("vm", 0o755)?;
        let st = store(&fs);
        ops::create(&*st, DISK, SIZE, Provisioning::Thin, "pvscsi")?;
        let mut base = vec![0u8; SIZE as usize];
        let d = Disk::open(st.clone(), DISK, true)?;
        for (o, l, b) in [(0u64, 300_000u64, 0x11u8), (1 << 20, 70_000, 0x22)] {
            let v = vec![b; l as usize];
            d.write_at(&v, o)?;
            base[o as usize..(o + l) as usize].copy_from_slice(&v);
        }
        d.close()?;
        drop(st);
        fs.unmount()?;
        drop(fs);
        Ok(DiskHarness {
            bases: mems
                .iter()
                .enumerate()
                .map(|(i, m)| Arc::new(MemLun::from_bytes(&format!("disk-lun{i}"), m.snapshot())))
                .collect(),
            base,
        })
    }

    fn record(&self, ops: &[DiskOp]) -> Result<Recording, String> {
        // The same identifiers (CIDs, file names) every run of a workload:
        // a reproducer's crash point is where it was.
        snapshot::ids::test_seed(1);
        let log = WriteLog::default();
        let luns: Vec<Arc<dyn Lun>> = self
            .bases
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Arc::new(RecordingLun::new(
                    Arc::new(lun::CowLun::new(b.clone())),
                    i,
                    log.clone(),
                )) as Arc<dyn Lun>
            })
            .collect();
        let fs = Arc::new(Fs::open(luns).map_err(|e| format!("mount before the workload: {e}"))?);
        let st = store(&fs);
        let push = |m: u64| {
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Event::Mark(m))
        };
        let mut content = self.base.clone();
        let mut frozen: Vec<Vec<u8>> = Vec::new();
        let mut clone: Option<Vec<u8>> = None;
        let mut rec = Recording {
            log: Vec::new(),
            states: vec![content.clone()],
            clones: vec![None],
            persisted: Vec::new(),
            ids: Vec::new(),
        };
        let mut open: Option<Disk> = None;
        for (k, op) in ops.iter().enumerate() {
            push(mark_start(k));
            let fail = |e: &dyn fmt::Display| format!("operation {k} {op} failed: {e}");
            if op.is_chain() {
                if let Some(d) = open.take() {
                    d.close().map_err(|e| fail(&e))?;
                }
            }
            let mut id = None;
            match op {
                DiskOp::Write(o, l, b) => {
                    if open.is_none() {
                        open = Some(Disk::open(st.clone(), DISK, true).map_err(|e| fail(&e))?);
                    }
                    let (o, l) = (*o as usize, *l as usize);
                    if o + l > content.len() {
                        return Err(fail(&"past the end of the disk"));
                    }
                    let v = vec![*b; l];
                    open.as_ref()
                        .expect("opened")
                        .write_at(&v, o as u64)
                        .map_err(|e| fail(&e))?;
                    content[o..o + l].copy_from_slice(&v);
                }
                DiskOp::Flush => {
                    if let Some(d) = &open {
                        d.flush().map_err(|e| fail(&e))?;
                    }
                }
                DiskOp::Snapshot => {
                    let s = ops::snapshot(st.clone(), DISK).map_err(|e| fail(&e))?;
                    id = Some(s.change_id.ok_or_else(|| fail(&"no change ID"))?);
                    frozen.push(content.clone());
                }
                DiskOp::Revert => {
                    ops::revert(st.clone(), DISK).map_err(|e| fail(&e))?;
                    content = frozen.last().cloned().ok_or_else(|| fail(&"no snapshot"))?;
                }
                DiskOp::Consolidate => {
                    ops::consolidate(st.clone(), DISK).map_err(|e| fail(&e))?;
                    frozen.pop();
                }
                DiskOp::Freeze => {
                    snapshot::merge::freeze(st.clone(), DISK).map_err(|e| fail(&e))?;
                    frozen.push(content.clone());
                }
                DiskOp::Merge => {
                    let f = Disk::open(st.clone(), DISK, false)
                        .map_err(|e| fail(&e))?
                        .layers
                        .get(1)
                        .map(|l| l.name.clone())
                        .ok_or_else(|| fail(&"no snapshot"))?;
                    snapshot::merge::merge_down(st.clone(), DISK, &f).map_err(|e| fail(&e))?;
                    // The layer below now holds the merged one's state.
                    let k = frozen
                        .len()
                        .checked_sub(2)
                        .ok_or_else(|| fail(&"one snapshot"))?;
                    frozen.remove(k);
                }
                DiskOp::Grow(n) => {
                    let size = content.len() as u64 + n;
                    ops::resize(st.clone(), DISK, size).map_err(|e| fail(&e))?;
                    content.resize(size as usize, 0);
                }
                DiskOp::Clone => {
                    if clone.is_some() {
                        ops::delete(st.clone(), CLONE).map_err(|e| fail(&e))?;
                    }
                    ops::clone(st.clone(), DISK, st.clone(), CLONE, Provisioning::Thin)
                        .map_err(|e| fail(&e))?;
                    clone = Some(content.clone());
                }
            }
            push(mark_done(k));
            rec.persisted.push(op.is_chain() || *op == DiskOp::Flush);
            rec.ids.push(id);
            rec.states.push(content.clone());
            rec.clones.push(clone.clone());
        }
        push(mark_start(ops.len()));
        if let Some(d) = open.take() {
            d.close()
                .map_err(|e| format!("closing the disk after the workload: {e}"))?;
        }
        drop(st);
        fs.unmount()
            .map_err(|e| format!("unmount after the workload: {e}"))?;
        push(mark_done(ops.len()));
        drop(fs);
        rec.log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if std::env::var_os("VMFS_CRASH_DEBUG").is_some() {
            crate::crashtest::print_log(&rec.log);
        }
        Ok(rec)
    }

    /// Judge one crash state (see the module's comment).
    fn check(&self, ops: &[DiskOp], rec: &Recording, c: &Crash) -> Result<bool, String> {
        let (imgs, durable, started) = crash_image(&self.bases, &rec.log, &rec.persisted, c)?;
        let luns: Vec<Arc<dyn Lun>> = imgs
            .into_iter()
            .map(|l| Arc::new(l) as Arc<dyn Lun>)
            .collect();
        let fs =
            Arc::new(Fs::open(luns).map_err(|e| format!("mount (journal replay) failed: {e}"))?);
        let replayed = !fs.replays().is_empty();
        let r = judge(&fs, ops, rec, durable, started);
        fs.abandon();
        r.map(|()| replayed)
    }

    pub fn run_workload(
        &self,
        ops: &[DiskOp],
        budget: usize,
        only: Option<&Crash>,
        rng: &mut Rng,
        sum: &mut Summary,
    ) {
        run_recorded(
            format_disk_ops(ops),
            || self.record(ops),
            |rec| &rec.log,
            |rec, c| self.check(ops, rec, c),
            (budget, only, rng, sum),
        );
    }
}

/// Whether every byte of `got` is that byte of some state in `group` (of
/// the same length). Bytes, not sectors: the harness tears a LUN's sector
/// in half, and a disk's sector on it tears with it.
fn sectors_from(got: &[u8], group: &[Vec<u8>]) -> Result<(), String> {
    let group: Vec<&Vec<u8>> = group.iter().filter(|s| s.len() == got.len()).collect();
    if group.is_empty() {
        return Err(format!("no possible state is {} bytes long", got.len()));
    }
    if group.iter().any(|s| s.as_slice() == got) {
        return Ok(());
    }
    for (i, sec) in got.chunks(512).enumerate() {
        let r = i * 512..i * 512 + sec.len();
        if group.iter().any(|s| &s[r.clone()] == sec) {
            continue;
        }
        for (j, b) in sec.iter().enumerate() {
            let at = r.start + j;
            if !group.iter().any(|s| s[at] == *b) {
                return Err(format!(
                    "byte {at} (sector {i}) reads {b:#04x}, which no possible state holds"
                ));
            }
        }
    }
    Ok(())
}

fn judge(
    fs: &Arc<Fs>,
    ops: &[DiskOp],
    rec: &Recording,
    durable: usize,
    started: usize,
) -> Result<(), String> {
    let r = vmfs::fsck::check(fs, false, None).map_err(|e| format!("fsck could not run: {e}"))?;
    if !r.errors.is_empty() {
        return Err(format!("fsck: {}", r.errors.join("; ")));
    }
    let st = store(fs);
    let got = read_all(&st, DISK)?;
    // Around the chain operation in flight (at most one: a finished one is
    // durable), all before it or all after it.
    let window = durable..started;
    let chain = window.clone().rev().find(|&k| ops[k].is_chain());
    let content = |got: &[u8]| -> Result<(), String> {
        match chain {
            None => sectors_from(got, &rec.states[durable..=started]),
            Some(j) => sectors_from(got, &rec.states[durable..=j])
                .or_else(|_| sectors_from(got, &rec.states[j + 1..=started]))
                .map_err(|e| {
                    format!(
                        "{e}: neither the state before operation {j} ({}) nor after it",
                        ops[j]
                    )
                }),
        }
        .map_err(|e| format!("{DISK}: {e} (operations {durable}..={started})"))
    };
    content(&got)?;
    // Change tracking: every ID acknowledged covers the differences.
    let ids: Vec<(usize, ChangeId)> = rec.ids[..durable]
        .iter()
        .enumerate()
        .filter_map(|(k, id)| id.map(|i| (k, i)))
        .collect();
    let covers = |got: &[u8], when: &str| -> Result<(), String> {
        for (k, id) in &ids {
            let c = ops::changed(st.clone(), DISK, Some(*id), None)
                .map_err(|e| format!("{when}: changed --since {id}: {e}"))?;
            if let Some(why) = c.whole_disk {
                return Err(format!(
                    "{when}: changed --since {id} answers the whole disk after a crash: {why}"
                ));
            }
            let then = &rec.states[k + 1];
            for (i, &b) in got.iter().enumerate() {
                if then.get(i) != Some(&b) && !c.ranges.iter().any(|r| r.contains(&(i as u64))) {
                    return Err(format!(
                        "{when}: byte {i} differs from the disk at {id} (after operation {k}) but changed --since it does not cover it: {:?}",
                        c.ranges
                    ));
                }
            }
        }
        Ok(())
    };
    covers(&got, "after the crash")?;
    // And between two IDs: --until covers what differs between them.
    for (i, (kx, x)) in ids.iter().enumerate() {
        for (ky, y) in &ids[i + 1..] {
            let c = ops::changed(st.clone(), DISK, Some(*x), Some(*y))
                .map_err(|e| format!("changed --since {x} --until {y}: {e}"))?;
            let (a, b) = (&rec.states[kx + 1], &rec.states[ky + 1]);
            for (j, byte) in b.iter().enumerate() {
                if a.get(j) != Some(byte) && !c.ranges.iter().any(|r| r.contains(&(j as u64))) {
                    return Err(format!(
                        "byte {j} differs between {x} and {y} but changed --since {x} --until {y} does not cover it: {:?}",
                        c.ranges
                    ));
                }
            }
        }
    }
    // A clone: absent, or whole (as of the clone operation that made it).
    if st.exists(CLONE).map_err(|e| e.to_string())? {
        let cl = read_all(&st, CLONE)?;
        let ok = rec.clones[durable..=started]
            .iter()
            .flatten()
            .any(|c| *c == cl);
        if !ok {
            return Err(format!(
                "{CLONE} is there but is not a whole clone (operations {durable}..={started})"
            ));
        }
    } else if rec.clones[durable].is_some() && !ops[durable..started].contains(&DiskOp::Clone) {
        // (A clone in flight replaces the last one: deleted first.)
        return Err(format!("{CLONE} was acknowledged but is gone"));
    }
    // A writer's open finishes what was interrupted and recovers tracking;
    // no byte changes.
    ops::finish_consolidation(st.clone(), DISK).map_err(|e| format!("finishing: {e}"))?;
    Disk::open(st.clone(), DISK, true)
        .and_then(|d| d.close())
        .map_err(|e| format!("{DISK} does not open for writing after the crash: {e}"))?;
    let again = read_all(&st, DISK)?;
    if again != got {
        return Err(format!(
            "{DISK}: opening it for writing changed its content"
        ));
    }
    covers(&again, "after a writer's open")?;
    let r = ops::check(st.clone(), DISK, false).map_err(|e| format!("disk check: {e}"))?;
    if !r.problems.is_empty() {
        return Err(format!("disk check: {}", r.problems.join("; ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ops_round_trip_as_text() {
        let w = random_disk_workload(&mut Rng::new(3), 30);
        assert_eq!(parse_disk_ops(&format_disk_ops(&w)).unwrap(), w);
        assert!(parse_disk_ops("disk:frob").is_err());
        assert!(parse_disk_ops("w(1,2,3)").is_err());
    }

    #[test]
    fn a_few_disk_workloads_recover_right() {
        let h = DiskHarness::new().unwrap();
        let mut sum = Summary::default();
        let mut rng = Rng::new(9);
        for _ in 0..2 {
            let w = random_disk_workload(&mut rng, 8);
            h.run_workload(&w, 30, None, &mut rng, &mut sum);
        }
        let w =
            parse_disk_ops("disk:w(0,70000,5);snapshot;w(65536,4096,6);flush;consolidate").unwrap();
        h.run_workload(&w, 60, None, &mut rng, &mut sum);
        let w = parse_disk_ops(
            "disk:snapshot;w(0,200000,7);freeze;w(4096,70000,8);flush;merge;w(0,4096,9);consolidate",
        )
        .unwrap();
        h.run_workload(&w, 60, None, &mut rng, &mut sum);
        assert!(sum.failures.is_empty(), "{:#?}", sum.failures);
        assert!(sum.states >= 40, "{}", sum.states);
    }
}
