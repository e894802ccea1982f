//! Changed-block tracking, against a model of the disk's content at each
//! change ID: `changed --since X` covers every byte that differs between
//! the disk at X and the disk now, through writes, snapshots, reverts,
//! consolidations, growth and crashes; and a writer that does not keep the
//! tracking (QEMU's vmdk driver, a write into an extent) makes the answer
//! the whole disk, saying why.

use std::collections::BTreeMap;
use std::ops::Range;
use std::process::Command;
use std::sync::Arc;

use snapshot::ctk::ChangeId;
use snapshot::ops::{self, Provisioning};
use snapshot::{Disk, LocalStore, Store};

mod common;
use common::qemu_img;

const MIB: u64 = 1 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Write `data` at `off` of a file of the disk directly, as `dd` would
/// (no writer of ours involved).
fn dd(file: &std::path::Path, data: &[u8], off: u64) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .write_all_at(data, off)
        .unwrap();
}

/// Take a snapshot of `vm.vmdk`: the change ID it froze at.
fn snap(store: &Arc<dyn Store>) -> ChangeId {
    ops::snapshot(store.clone(), "vm.vmdk")
        .unwrap()
        .change_id
        .expect("change tracking is on")
}

/// A new thin disk `vm.vmdk` of `size` bytes in a fresh directory.
fn new_disk(size: u64) -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
    ops::create(&*store, "vm.vmdk", size, Provisioning::Thin, "pvscsi").unwrap();
    (dir, store)
}

fn read_all(store: &Arc<dyn Store>, name: &str) -> Vec<u8> {
    let d = Disk::open(store.clone(), name, false).unwrap();
    let mut b = vec![0u8; d.capacity() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

fn covered(ranges: &[Range<u64>], at: u64) -> bool {
    ranges.iter().any(|r| r.start <= at && at < r.end)
}

/// Every byte that differs between `then` and `now` (the part of `now`
/// past `then`'s end differs if not zero... or always: the disk grew) is
/// inside `ranges`.
fn assert_covers(ranges: &[Range<u64>], then: &[u8], now: &[u8], what: &str) {
    const C: usize = 4096;
    for (k, chunk) in now.chunks(C).enumerate() {
        let base = k * C;
        if then.get(base..base + chunk.len()) == Some(chunk) {
            continue;
        }
        for (j, &b) in chunk.iter().enumerate() {
            let i = base + j;
            let old = then.get(i).copied();
            if old != Some(b) && !covered(ranges, i as u64) {
                panic!(
                    "{what}: byte {i} changed ({old:?} -> {b}) but no range covers it: {ranges:?}"
                );
            }
        }
    }
}

fn changed(
    store: &Arc<dyn Store>,
    since: ChangeId,
    until: Option<ChangeId>,
) -> snapshot::ctk::Changes {
    ops::changed(store.clone(), "vm.vmdk", Some(since), until).unwrap()
}

#[test]
fn changed_covers_every_difference_through_the_chain_operations_and_crashes() {
    for seed in 1..=6u64 {
        let (dir, store) = new_disk(24 * MIB);
        let mut rng = Rng(seed * 0x9e37_79b9_7f4a_7c15);
        // The content at each change ID taken.
        let mut at: BTreeMap<u32, (ChangeId, Vec<u8>)> = BTreeMap::new();
        let mut log = Vec::new();
        for _step in 0..36 {
            let depth = Disk::open(store.clone(), "vm.vmdk", false).unwrap().depth();
            let op = rng.below(11);
            match op {
                0..=3 => {
                    let d = Disk::open(store.clone(), "vm.vmdk", true).unwrap();
                    let cap = d.capacity();
                    for _ in 0..1 + rng.below(6) {
                        let len = 1 + rng.below(200_000);
                        let off = rng.below(cap - len);
                        let fill = vec![(rng.next() | 1) as u8; len as usize];
                        d.write_at(&fill, off).unwrap();
                    }
                    if op == 3 {
                        // A crash: nothing flushed or closed.
                        std::mem::forget(d);
                        log.push("crash");
                    } else {
                        d.close().unwrap();
                        log.push("write");
                    }
                }
                4 | 5 | 9 if depth < 6 => {
                    let s = ops::snapshot(store.clone(), "vm.vmdk").unwrap();
                    let id = s.change_id.expect("tracking is on");
                    at.insert(id.epoch, (id, read_all(&store, "vm.vmdk")));
                    log.push("snapshot");
                }
                6 if depth > 0 => {
                    ops::revert(store.clone(), "vm.vmdk").unwrap();
                    log.push("revert");
                }
                7 if depth > 0 => {
                    ops::consolidate(store.clone(), "vm.vmdk").unwrap();
                    log.push("consolidate");
                }
                8 if depth == 0 => {
                    let cap = Disk::open(store.clone(), "vm.vmdk", false)
                        .unwrap()
                        .capacity();
                    ops::resize(store.clone(), "vm.vmdk", cap + MIB + 512).unwrap();
                    log.push("resize");
                }
                _ => continue,
            }
            let now = read_all(&store, "vm.vmdk");
            let ids: Vec<_> = at.values().map(|(id, c)| (*id, c.clone())).collect();
            for (i, (x, then)) in ids.iter().enumerate() {
                let c = changed(&store, *x, None);
                assert!(c.whole_disk.is_none(), "{:?}", c.whole_disk);
                let what = format!("seed {seed}, after {log:?}: since {x}");
                assert_covers(&c.ranges, then, &now, &what);
                // Up to itself and to the next ID.
                for (y, later) in ids[i..].iter().take(2) {
                    let c = changed(&store, *x, Some(*y));
                    let what = format!("seed {seed}, after {log:?}: {x} until {y}");
                    assert_covers(&c.ranges, then, later, &what);
                }
            }
        }
        assert!(at.len() >= 2, "seed {seed}: too few IDs to check: {log:?}");
        // Still precise where nothing was in flight: since the last ID
        // right after a clean close of an unwritten disk, nothing.
        let s = ops::snapshot(store.clone(), "vm.vmdk").unwrap();
        let c = changed(&store, s.change_id.unwrap(), None);
        assert!(c.ranges.is_empty(), "{:?}", c.ranges);
        let (ok, out) = qemu_img(&["check", "vm.vmdk"], dir.path());
        assert!(ok, "{out}");
    }
}

/// Consolidating the newest snapshot and then reverting goes back past a
/// change ID: what was written before that ID now reads as it was before,
/// and must be reported.
#[test]
fn a_revert_after_a_consolidation_reports_what_it_took_back() {
    let (_dir, store) = new_disk(8 * MIB);
    ops::snapshot(store.clone(), "vm.vmdk").unwrap();
    let d = Disk::open(store.clone(), "vm.vmdk", true).unwrap();
    d.write_at(&[1; 512], 3 * MIB).unwrap();
    d.close().unwrap();
    let then = read_all(&store, "vm.vmdk");
    let id2 = snap(&store);
    ops::consolidate(store.clone(), "vm.vmdk").unwrap();
    ops::revert(store.clone(), "vm.vmdk").unwrap();
    let now = read_all(&store, "vm.vmdk");
    assert_ne!(then, now);
    let c = changed(&store, id2, None);
    assert_covers(&c.ranges, &then, &now, "since the consolidated snapshot");
    assert_eq!(c.ranges, vec![3 * MIB..3 * MIB + 65536]);
}

#[test]
fn the_cost_is_paid_once_per_region_and_the_answer_is_block_grained() {
    let (_dir, store) = new_disk(256 * MIB);
    let id = snap(&store);
    let d = Disk::open(store.clone(), "vm.vmdk", true).unwrap();
    d.write_at(&[1; 4096], 5 * MIB).unwrap();
    d.write_at(&[2; 100], 200 * MIB + 70_000).unwrap();
    d.close().unwrap();
    let c = changed(&store, id, None);
    assert_eq!(
        c.ranges,
        vec![
            5 * MIB..5 * MIB + 65536,
            200 * MIB + 65536..200 * MIB + 131_072
        ]
    );
    assert_eq!(c.granularity, 65536);
    // '*': what may hold data.
    let all = ops::changed(store.clone(), "vm.vmdk", None, None).unwrap();
    assert_eq!(all.ranges, c.ranges);
}

fn info_tracking(store: &Arc<dyn Store>) -> snapshot::disk::TrackingInfo {
    Disk::open(store.clone(), "vm.vmdk", false)
        .unwrap()
        .tracking_info()
        .unwrap()
}

#[test]
fn a_writer_that_does_not_keep_tracking_makes_the_answer_the_whole_disk() {
    // QEMU's vmdk driver writing the current layer (a delta) changes its CID.
    let (dir, store) = new_disk(16 * MIB);
    let id = snap(&store);
    let o = Command::new("qemu-io")
        .args(["-f", "vmdk", "-c", "write -P 0x55 3M 4k", "vm.vmdk"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let c = changed(&store, id, None);
    let why = c.whole_disk.expect("the whole disk");
    assert!(why.contains("CID"), "{why}");
    assert_eq!(c.ranges, vec![0..16 * MIB]);
    assert!(info_tracking(&store).invalid.is_some());
    // The next write-open starts a new history; IDs of the old one are
    // answered with the whole disk, saying when and why it restarted.
    let d = Disk::open(store.clone(), "vm.vmdk", true).unwrap();
    d.close().unwrap();
    let t = info_tracking(&store);
    assert!(
        t.invalid.is_none() && t.began.contains("restarted"),
        "{t:?}"
    );
    let c = changed(&store, id, None);
    let why = c.whole_disk.expect("the whole disk");
    assert!(
        why.contains("another change history") && why.contains("CID"),
        "{why}"
    );

    // A write straight into a base disk's flat extent (dd) changes its
    // modification time while no writer of ours has it open.
    let (dir, store) = new_disk(16 * MIB);
    let id = snap(&store);
    ops::consolidate(store.clone(), "vm.vmdk").unwrap();
    let d = Disk::open(store.clone(), "vm.vmdk", true).unwrap();
    d.write_at(&[9; 512], 0).unwrap();
    d.close().unwrap();
    assert!(changed(&store, id, None).whole_disk.is_none());
    std::thread::sleep(std::time::Duration::from_millis(20));
    dd(&dir.path().join("vm-flat.vmdk"), &[7; 4096], 8 * MIB);
    let why = changed(&store, id, None)
        .whole_disk
        .expect("the whole disk");
    assert!(why.contains("modification time"), "{why}");

    // Off: every ID is answered with the whole disk; '*' still works.
    ops::set_tracking(store.clone(), "vm.vmdk", false).unwrap();
    assert!(!dir.path().join("vm-ctk.vmdk").exists());
    let why = changed(&store, id, None).whole_disk.unwrap();
    assert!(why.contains("off"), "{why}");
    assert!(ops::changed(store.clone(), "vm.vmdk", None, None)
        .unwrap()
        .whole_disk
        .is_none());
    ops::set_tracking(store.clone(), "vm.vmdk", true).unwrap();
    let t = info_tracking(&store);
    assert!(t.began.contains("turned on"), "{t:?}");
    let (ok, out) = qemu_img(&["info", "vm.vmdk"], dir.path());
    assert!(ok, "{out}");
}

#[test]
fn an_interrupted_consolidation_is_finished_before_anything_else() {
    let (dir, store) = new_disk(8 * MIB);
    let d = Disk::open(store.clone(), "vm.vmdk", true).unwrap();
    d.write_at(&[1; 65536], 0).unwrap();
    d.close().unwrap();
    ops::snapshot(store.clone(), "vm.vmdk").unwrap();
    let d = Disk::open(store.clone(), "vm.vmdk", true).unwrap();
    d.write_at(&[2; 4096], 0).unwrap();
    d.close().unwrap();
    let want = read_all(&store, "vm.vmdk");
    // What a consolidation killed after it began merging leaves: the marker,
    // and part of the top's writes in the layer below.
    std::fs::write(
        dir.path().join("vm-000000.vmdk.consolidating"),
        "consolidating\n",
    )
    .unwrap();
    dd(&dir.path().join("vm-flat.vmdk"), &[2; 512], 0);
    // Reads are right; the frozen layer is not readable as a snapshot;
    // nothing writes before the merge is finished.
    assert_eq!(read_all(&store, "vm.vmdk"), want);
    let e = Disk::open(store.clone(), "vm-000000.vmdk", false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("interrupted"), "{e}");
    let e = Disk::open(store.clone(), "vm.vmdk", true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("interrupted"), "{e}");
    let r = ops::check(store.clone(), "vm.vmdk", false).unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("interrupted")),
        "{r:?}"
    );
    // A revert cannot go back to a snapshot that is half merged: it
    // finishes the consolidation and says so.
    let e = ops::revert(store.clone(), "vm.vmdk")
        .unwrap_err()
        .to_string();
    assert!(e.contains("finished first"), "{e}");
    assert_eq!(read_all(&store, "vm.vmdk"), want);
    assert_eq!(
        Disk::open(store.clone(), "vm.vmdk", false).unwrap().depth(),
        0
    );
    assert!(!dir.path().join("vm-000000.vmdk.consolidating").exists());
    let r = ops::check(store.clone(), "vm.vmdk", false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
}

/// Right after a snapshot (no writer has opened the new layer yet), a
/// write into a frozen layer's extent is noticed too: the snapshot stamped
/// the new chain.
#[test]
fn a_write_into_a_frozen_extent_right_after_a_snapshot_is_noticed() {
    let (dir, store) = new_disk(8 * MIB);
    let id = snap(&store);
    assert!(changed(&store, id, None).whole_disk.is_none());
    std::thread::sleep(std::time::Duration::from_millis(20));
    dd(&dir.path().join("vm-flat.vmdk"), &[7; 512], 0);
    let why = changed(&store, id, None)
        .whole_disk
        .expect("the whole disk");
    assert!(why.contains("modification time"), "{why}");
}
