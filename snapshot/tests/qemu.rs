//! Our disks and chains as QEMU's own tools see them, on local files:
//! `qemu-img info/check/compare` read what we write, and we read what
//! `qemu-io` writes into our chains.

use std::process::Command;
use std::sync::Arc;

use snapshot::ops::{self, Provisioning};
use snapshot::{Disk, LocalStore, Store};

mod common;
use common::qemu_img;

const MIB: u64 = 1 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i * 7 + seed * 13 + i / 4096) as u8)
        .collect()
}

/// The disk and what it must read as.
struct Model {
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
    want: Vec<u8>,
}

impl Model {
    fn new(size: u64, prov: Provisioning) -> Model {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        ops::create(&*store, "vm.vmdk", size, prov, "lsilogic").unwrap();
        Model {
            store,
            dir,
            want: vec![0; size as usize],
        }
    }
    fn write(&mut self, writes: &[(u64, usize, u64)]) {
        let d = Disk::open(self.store.clone(), "vm.vmdk", true).unwrap();
        for &(off, len, seed) in writes {
            let p = pattern(seed, len);
            d.write_at(&p, off).unwrap();
            self.want[off as usize..off as usize + len].copy_from_slice(&p);
        }
        d.flush().unwrap();
    }
    fn expect(&self, name: &str) {
        let raw = self.dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, &self.want).unwrap();
        // Ours.
        let d = Disk::open(self.store.clone(), name, false).unwrap();
        let mut got = vec![0u8; self.want.len()];
        d.read_at(&mut got, 0).unwrap();
        assert!(
            got == self.want,
            "{name} reads differently through our code"
        );
        // QEMU's.
        let (ok, out) = qemu_img(
            &[
                "compare",
                "-f",
                "vmdk",
                "-F",
                "raw",
                name,
                raw.to_str().unwrap(),
            ],
            self.dir.path(),
        );
        assert!(ok, "qemu-img compare {name}: {out}");
    }
    fn check(&self) {
        let (ok, out) = qemu_img(&["check", "vm.vmdk"], self.dir.path());
        assert!(ok && out.contains("No errors"), "{out}");
    }
}

#[test]
fn base_disks_of_each_provisioning_read_the_same_in_qemu() {
    for prov in [Provisioning::Thin, Provisioning::Lazy, Provisioning::Eager] {
        let mut m = Model::new(64 * MIB, prov);
        m.write(&[
            (0, 4096, 1),
            (MIB + 100, 70_000, 2),
            (64 * MIB - 512, 512, 3),
        ]);
        m.expect("vm.vmdk");
        let (ok, out) = qemu_img(&["info", "--output=json", "vm.vmdk"], m.dir.path());
        assert!(ok && out.contains("\"virtual-size\": 67108864"), "{out}");
        assert!(out.contains("\"create-type\": \"vmfs\""), "{out}");
        let flat = std::fs::metadata(m.dir.path().join("vm-flat.vmdk")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let used = flat.blocks() * 512;
        match prov {
            Provisioning::Thin => assert!(used < 4 * MIB, "thin: {used}"),
            _ => assert!(used >= 64 * MIB, "{prov:?}: {used}"),
        }
    }
}

#[test]
fn snapshot_chains_read_the_same_in_qemu_and_frozen_layers_stay_frozen() {
    let mut m = Model::new(96 * MIB, Provisioning::Thin);
    m.write(&[(0, 3 * MIB as usize, 1), (50 * MIB, 8192, 2)]);
    let state0 = m.want.clone();
    let f0 = ops::snapshot(m.store.clone(), "vm.vmdk").unwrap().frozen;
    assert_eq!(f0, "vm-000000.vmdk");
    // Partial grains (completed from below), whole grains, across grains.
    m.write(&[
        (100, 10, 3),
        (64 * 1024, 64 * 1024, 4),
        (MIB - 5000, 10_000, 5),
        (90 * MIB, 1, 6),
    ]);
    let state1 = m.want.clone();
    let f1 = ops::snapshot(m.store.clone(), "vm.vmdk").unwrap().frozen;
    m.write(&[(64 * 1024 + 77, 3000, 7), (2 * MIB, MIB as usize, 8)]);
    m.expect("vm.vmdk");
    m.check();
    let (ok, out) = qemu_img(&["info", "--backing-chain", "vm.vmdk"], m.dir.path());
    assert!(ok, "{out}");
    assert_eq!(out.matches("image: ").count(), 3, "{out}");
    // The frozen layers read as the disk did when they were frozen.
    let cur = std::mem::replace(&mut m.want, state0);
    m.expect(&f0);
    m.want = state1;
    m.expect(&f1);
    m.want = cur;
    let d = Disk::open(m.store.clone(), "vm.vmdk", false).unwrap();
    assert_eq!(d.depth(), 2);
}

#[test]
fn a_chain_qemu_wrote_into_reads_right_with_ours() {
    let mut m = Model::new(32 * MIB, Provisioning::Thin);
    m.write(&[(0, 2 * MIB as usize, 1)]);
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "vmdk",
            "-c",
            "write -P 0x5a 1000k 300k",
            "-c",
            "write -P 0x11 20M 4k",
            "vm.vmdk",
        ])
        .current_dir(m.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    m.want[1000 * 1024..1300 * 1024].fill(0x5a);
    m.want[20 * MIB as usize..20 * MIB as usize + 4096].fill(0x11);
    m.expect("vm.vmdk");
    // And we go on writing into what QEMU allocated.
    m.write(&[(1000 * 1024 + 5, 100, 9)]);
    m.expect("vm.vmdk");
    m.check();
}

#[test]
fn revert_drops_what_was_written_since_the_snapshot() {
    let mut m = Model::new(16 * MIB, Provisioning::Thin);
    m.write(&[(0, 100_000, 1)]);
    let frozen = m.want.clone();
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(50, 1000, 2), (8 * MIB, 70_000, 3)]);
    let old_top = snapshot::disk::read_descriptor(&*m.store, "vm.vmdk").unwrap();
    ops::revert(m.store.clone(), "vm.vmdk").unwrap();
    m.want = frozen;
    m.expect("vm.vmdk");
    m.check();
    let gone = old_top.extents[0].file.clone().unwrap();
    assert!(!m.store.exists(&gone).unwrap(), "the old delta is left");
    // Written again after the revert.
    m.write(&[(4096, 4096, 4)]);
    m.expect("vm.vmdk");
    // No snapshot left below the base: refused.
    let b = Model::new(MIB, Provisioning::Thin);
    assert!(ops::revert(b.store.clone(), "vm.vmdk").is_err());
}

/// Rewrite the CID line of the descriptor at `p` (as a tool that does not
/// keep the chain would).
fn set_cid(p: &std::path::Path, cid: &str) {
    let text = std::fs::read_to_string(p).unwrap();
    let line = text.lines().find(|l| l.starts_with("CID=")).unwrap();
    std::fs::write(p, text.replace(line, &format!("CID={cid}"))).unwrap();
}

#[test]
fn a_broken_chain_is_refused_with_a_clear_error() {
    let mut m = Model::new(8 * MIB, Provisioning::Thin);
    m.write(&[(0, 4096, 1)]);
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    let p = m.dir.path().join("vm-000000.vmdk");
    let text = std::fs::read_to_string(&p).unwrap();
    // The parent's CID changed after the child was made.
    set_cid(&p, "0badc0de");
    let e = Disk::open(m.store.clone(), "vm.vmdk", false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("parent CID") && e.contains("vm-000000.vmdk"),
        "{e}"
    );
    // A missing parent.
    std::fs::remove_file(&p).unwrap();
    let e = Disk::open(m.store.clone(), "vm.vmdk", false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing"), "{e}");
    // A loop.
    std::fs::write(
        &p,
        text.replace(
            "createType=\"vmfs\"",
            "createType=\"vmfs\"\nparentFileNameHint=\"vm.vmdk\"",
        )
        .replace("parentCID=ffffffff", "parentCID=00000001"),
    )
    .unwrap();
    let e = Disk::open(m.store.clone(), "vm.vmdk", false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("parent CID") || e.contains("loops"), "{e}");
    // A grain-table entry into the metadata.
    let mut m = Model::new(8 * MIB, Provisioning::Thin);
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(0, 4096, 1)]);
    let top = snapshot::disk::read_descriptor(&*m.store, "vm.vmdk").unwrap();
    let delta = m.dir.path().join(top.extents[0].file.as_ref().unwrap());
    let mut b = std::fs::read(&delta).unwrap();
    let h = snapshot::sparse::Header::decode(&b[..512], "d", b.len() as u64).unwrap();
    let gt =
        u32::from_le_bytes(b[(h.gd_offset * 512) as usize..][..4].try_into().unwrap()) as usize;
    b[gt * 512..gt * 512 + 4].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(&delta, &b).unwrap();
    // The redundant table still has it right: reads use it.
    let d = Disk::open(m.store.clone(), "vm.vmdk", false).unwrap();
    let mut x = vec![0u8; 4096];
    d.read_at(&mut x, 0).unwrap();
    assert_eq!(x, m.want[..4096]);
    drop(d);
    // Both copies damaged: a clear error naming the file and offset.
    let rgt =
        u32::from_le_bytes(b[(h.rgd_offset * 512) as usize..][..4].try_into().unwrap()) as usize;
    b[rgt * 512..rgt * 512 + 4].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(&delta, &b).unwrap();
    let d = Disk::open(m.store.clone(), "vm.vmdk", false).unwrap();
    let e = d.read_at(&mut x, 0).unwrap_err().to_string();
    assert!(
        e.contains("into the metadata") && e.contains("delta"),
        "{e}"
    );
}

#[test]
fn consolidate_merges_the_newest_snapshot_and_keeps_the_content() {
    let mut m = Model::new(40 * MIB, Provisioning::Thin);
    m.write(&[(0, 3 * MIB as usize, 1)]);
    let state0 = m.want.clone();
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(100, 10, 2), (10 * MIB, 200_000, 3)]);
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(64 * 1024 + 3, 5000, 4), (39 * MIB, MIB as usize, 5)]);
    // Delete the newest snapshot: the top merges into the delta below.
    let n = ops::consolidate(m.store.clone(), "vm.vmdk").unwrap();
    assert!(n >= MIB && n <= 2 * MIB + 256 * 1024, "{n}");
    m.expect("vm.vmdk");
    m.check();
    let d = Disk::open(m.store.clone(), "vm.vmdk", false).unwrap();
    assert_eq!(d.depth(), 1);
    drop(d);
    assert!(!m.store.exists("vm-000001.vmdk").unwrap());
    // The older snapshot still reads as it was frozen.
    let cur = std::mem::replace(&mut m.want, state0);
    m.expect("vm-000000.vmdk");
    m.want = cur;
    // And the last one: into the flat base disk.
    ops::consolidate(m.store.clone(), "vm.vmdk").unwrap();
    m.expect("vm.vmdk");
    let d = Disk::open(m.store.clone(), "vm.vmdk", false).unwrap();
    assert_eq!(d.depth(), 0);
    drop(d);
    let left: Vec<_> = std::fs::read_dir(m.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".vmdk"))
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(
        left,
        vec!["vm-ctk.vmdk", "vm-flat.vmdk", "vm.vmdk"],
        "files left behind"
    );
    assert!(ops::consolidate(m.store.clone(), "vm.vmdk").is_err());
    let (ok, out) = qemu_img(&["info", "vm.vmdk"], m.dir.path());
    assert!(ok && out.contains("create type: vmfs"), "{out}");
}

#[test]
fn clone_import_and_export_keep_the_content_and_the_holes() {
    let mut m = Model::new(48 * MIB, Provisioning::Thin);
    m.write(&[(0, 100_000, 1), (20 * MIB, MIB as usize, 2)]);
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(20 * MIB + 4096, 8192, 3), (47 * MIB, 4096, 4)]);
    // Export: a sparse raw file qemu-img agrees with.
    let raw = m.dir.path().join("out.raw");
    ops::export(m.store.clone(), "vm.vmdk", &raw).unwrap();
    assert!(std::fs::read(&raw).unwrap() == m.want);
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(&raw).unwrap().blocks() * 512 < 4 * MIB,
        "export is not sparse"
    );
    // Clone: an independent base disk.
    let n = ops::clone(
        m.store.clone(),
        "vm.vmdk",
        m.store.clone(),
        "copy.vmdk",
        Provisioning::Thin,
    )
    .unwrap();
    assert!(n <= 3 * MIB, "{n}");
    m.expect("copy.vmdk");
    let c = Disk::open(m.store.clone(), "copy.vmdk", false).unwrap();
    assert_eq!(c.depth(), 0);
    drop(c);
    // Import: a raw image back as a new disk.
    ops::import(
        &raw,
        m.store.clone(),
        "back.vmdk",
        Provisioning::Thin,
        "pvscsi",
    )
    .unwrap();
    m.expect("back.vmdk");
    // The source is untouched by all of it.
    m.expect("vm.vmdk");
    assert!(ops::clone(
        m.store.clone(),
        "vm.vmdk",
        m.store.clone(),
        "copy.vmdk",
        Provisioning::Thin
    )
    .is_err());
}

#[test]
fn a_disk_grows_and_keeps_its_content() {
    let mut m = Model::new(8 * MIB, Provisioning::Thin);
    m.write(&[(0, 4096, 1), (8 * MIB - 4096, 4096, 2)]);
    assert_eq!(
        ops::resize(m.store.clone(), "vm.vmdk", 20 * MIB).unwrap(),
        20 * MIB
    );
    m.want.resize(20 * MIB as usize, 0);
    m.write(&[(19 * MIB, 4096, 3)]);
    m.expect("vm.vmdk");
    let (ok, out) = qemu_img(&["info", "vm.vmdk"], m.dir.path());
    assert!(ok && out.contains("20 MiB"), "{out}");
    assert!(
        ops::resize(m.store.clone(), "vm.vmdk", MIB).is_err(),
        "shrinking"
    );
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    let e = ops::resize(m.store.clone(), "vm.vmdk", 40 * MIB).unwrap_err();
    assert!(e.to_string().contains("consolidate"), "{e}");
}

/// The layout of the top delta: its file, header, and the sectors of the
/// primary and redundant tables of table 0.
fn top_delta(m: &Model) -> (std::path::PathBuf, snapshot::sparse::Header, u64, u64) {
    let top = snapshot::disk::read_descriptor(&*m.store, "vm.vmdk").unwrap();
    let p = m.dir.path().join(top.extents[0].file.as_ref().unwrap());
    let b = std::fs::read(&p).unwrap();
    let h = snapshot::sparse::Header::decode(&b[..512], "d", b.len() as u64).unwrap();
    let at = |s: u64| u32::from_le_bytes(b[(s * 512) as usize..][..4].try_into().unwrap()) as u64;
    (p, h, at(h.gd_offset), at(h.rgd_offset))
}

fn poke(p: &std::path::Path, at: u64, v: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_le_bytes(), at).unwrap();
}

#[test]
fn check_finds_damage_and_repair_fixes_what_is_safe() {
    let mut m = Model::new(16 * MIB, Provisioning::Thin);
    m.write(&[(0, 100_000, 1)]);
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(0, 4096, 2), (5 * MIB, 70_000, 3)]);
    let r = ops::check(m.store.clone(), "vm.vmdk", false).unwrap();
    assert!(r.problems.is_empty() && r.layers == 2, "{:?}", r.problems);

    // The primary grain directory damaged: the chain does not open; the
    // redundant one rebuilds it.
    let (p, h, _gt, _rgt) = top_delta(&m);
    poke(&p, h.gd_offset * 512, 0);
    assert!(Disk::open(m.store.clone(), "vm.vmdk", false).is_err());
    let r = ops::check(m.store.clone(), "vm.vmdk", false).unwrap();
    assert!(!r.problems.is_empty() && r.repaired.is_empty(), "{r:?}");
    let r = ops::check(m.store.clone(), "vm.vmdk", true).unwrap();
    assert_eq!(r.unrepairable, 0, "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("rebuilt")), "{r:?}");
    m.expect("vm.vmdk");
    m.check();

    // An interrupted flush: the redundant table lost an entry.
    let (p, _h, _gt, rgt) = top_delta(&m);
    poke(&p, rgt * 512, 0);
    let r = ops::check(m.store.clone(), "vm.vmdk", true).unwrap();
    assert!(r.repaired.iter().any(|x| x.contains("grain 0")), "{r:?}");
    assert!(ops::check(m.store.clone(), "vm.vmdk", false)
        .unwrap()
        .problems
        .is_empty());
    m.expect("vm.vmdk");

    // Both copies point past the end of a cut-short delta: cleared, the
    // grain reads from the parent again.
    let (p, _h, gt, rgt) = top_delta(&m);
    let len = std::fs::metadata(&p).unwrap().len();
    let grain = 80u64; // grain 80 (5 MiB): written above
    let beyond = (len / 512 + 1000) as u32;
    poke(&p, gt * 512 + grain * 4, beyond);
    poke(&p, rgt * 512 + grain * 4, beyond);
    let r = ops::check(m.store.clone(), "vm.vmdk", true).unwrap();
    assert_eq!(r.unrepairable, 0, "{r:?}");
    let d = Disk::open(m.store.clone(), "vm.vmdk", false).unwrap();
    let mut b = vec![1u8; 4096];
    d.read_at(&mut b, 5 * MIB).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "the cleared grain reads from the parent (zeros there)"
    );
    drop(d);

    // A CID mismatch: found, not repairable here.
    set_cid(&m.dir.path().join("vm-000000.vmdk"), "0badc0de");
    let r = ops::check(m.store.clone(), "vm.vmdk", true).unwrap();
    assert!(
        r.unrepairable > 0 && r.problems.iter().any(|x| x.contains("CID")),
        "{r:?}"
    );
}

#[test]
fn a_chain_is_at_most_31_snapshots_deep() {
    let mut m = Model::new(4 * MIB, Provisioning::Thin);
    for k in 0..31u64 {
        m.write(&[(k * 65536, 4096, k + 1)]);
        ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    }
    let e = ops::snapshot(m.store.clone(), "vm.vmdk")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("31 snapshots") && e.contains("consolidate"),
        "{e}"
    );
    m.write(&[(3 * MIB, 4096, 99)]);
    m.expect("vm.vmdk");
    m.check();
    let d = Disk::open(m.store.clone(), "vm.vmdk", false).unwrap();
    assert_eq!(d.depth(), 31);
    drop(d);
    // All of them consolidated at once: one layer, same content.
    for _ in 0..31 {
        ops::consolidate(m.store.clone(), "vm.vmdk").unwrap();
    }
    m.expect("vm.vmdk");
}

/// A running disk's consolidation (`snapshot::merge`): freeze, merge the
/// frozen layer into the one below while another thread keeps writing the
/// disk, relink; then the small rest with the disk closed. The content is
/// the last write everywhere, QEMU reads the chain at every step, the older
/// snapshot is refused while it holds part of a merge, and an interrupted
/// merge is finished by the next chain operation.
#[test]
fn a_snapshot_is_merged_down_while_the_disk_is_written() {
    use snapshot::merge;
    let mut m = Model::new(40 * MIB, Provisioning::Thin);
    m.write(&[(0, 3 * MIB as usize, 1)]);
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(100, 10, 2), (10 * MIB, 2 * MIB as usize, 3)]);
    let frozen = merge::freeze(m.store.clone(), "vm.vmdk").unwrap();
    assert_eq!(frozen, "vm-000001.vmdk");
    // The guest goes on writing (its own thread) while the merge copies.
    let d = Disk::open(m.store.clone(), "vm.vmdk", true).unwrap();
    let writes: Vec<(u64, usize, u64)> = (0..64)
        .map(|i| {
            (
                (i * 613 * 1024) % (38 * MIB),
                4096 + (i as usize % 7) * 1000,
                10 + i,
            )
        })
        .collect();
    let n = std::thread::scope(|s| {
        let h = s.spawn(|| merge::merge_frozen(&d, &frozen, None).unwrap());
        for &(off, len, seed) in &writes {
            d.write_at(&pattern(seed, len), off).unwrap();
        }
        h.join().unwrap()
    });
    for &(off, len, seed) in &writes {
        m.want[off as usize..off as usize + len].copy_from_slice(&pattern(seed, len));
    }
    assert!(n >= 2 * MIB, "{n} bytes merged");
    d.flush().unwrap();
    // The layer below holds part of a merge: not a snapshot to read, but
    // the disk reads right.
    let e = Disk::open(m.store.clone(), "vm-000000.vmdk", false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("interrupted"), "{e}");
    d.close().unwrap();
    m.expect("vm.vmdk");
    merge::relink(m.store.clone(), "vm.vmdk", &frozen).unwrap();
    assert!(!m.store.exists(&frozen).unwrap());
    assert!(!m.store.exists("vm-000000.vmdk.consolidating").unwrap());
    m.expect("vm.vmdk");
    m.check();
    assert_eq!(
        Disk::open(m.store.clone(), "vm.vmdk", false)
            .unwrap()
            .depth(),
        1
    );
    // Merged down, and the rest in one closed step: back on the base.
    ops::consolidate(m.store.clone(), "vm.vmdk").unwrap();
    m.expect("vm.vmdk");
    assert_eq!(
        Disk::open(m.store.clone(), "vm.vmdk", false)
            .unwrap()
            .depth(),
        0
    );

    // Interrupted after the copy (a crash before the relink): a snapshot
    // finishes it first, and reverting to it gives the disk as it was.
    ops::snapshot(m.store.clone(), "vm.vmdk").unwrap();
    m.write(&[(5 * MIB, 70_000, 40)]);
    let frozen = merge::freeze(m.store.clone(), "vm.vmdk").unwrap();
    let d = Disk::open(m.store.clone(), "vm.vmdk", true).unwrap();
    merge::merge_frozen(&d, &frozen, None).unwrap();
    d.close().unwrap();
    m.write(&[(6 * MIB, 4096, 41)]);
    let before_revert = m.want.clone();
    let r = ops::check(m.store.clone(), "vm.vmdk", false).unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("merge")),
        "{:?}",
        r.problems
    );
    // A revert keeps the layer it reverts to (the merged one).
    ops::revert(m.store.clone(), "vm.vmdk").unwrap();
    let mut want = before_revert;
    want[6 * MIB as usize..6 * MIB as usize + 4096].copy_from_slice(&vec![0u8; 4096]);
    m.want = want;
    m.expect("vm.vmdk");
    assert!(!m.store.exists(&frozen).unwrap());
    assert!(ops::check(m.store.clone(), "vm.vmdk", false)
        .unwrap()
        .problems
        .is_empty());
    m.check();
}
