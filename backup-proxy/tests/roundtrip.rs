//! Backups of images through the library, on a local repository: full and
//! incremental round trips, encryption, damage, garbage collection.

use std::path::Path;
use std::sync::Arc;

use backup_proxy::backup::{backup, DiskJob, Options};
use backup_proxy::image::{create_dest, open_source};
use backup_proxy::{KeySource, Repo};

use backup_proxy::util::pseudo_random as fill;

const MIB: u64 = 1 << 20;

/// 64 MiB: holes, written zeros, random data, a region repeated, text.
fn mixed_image(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    let mut r = vec![0u8; (8 * MIB) as usize];
    fill(&mut r, 1);
    f.write_all_at(&r, 4 * MIB).unwrap(); // random
    f.write_all_at(&r, 20 * MIB).unwrap(); // the same again: deduplicated
    f.write_all_at(&vec![0u8; (4 * MIB) as usize], 32 * MIB)
        .unwrap(); // written zeros
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog\n"
        .iter()
        .cycle()
        .take((3 * MIB) as usize)
        .copied()
        .collect();
    f.write_all_at(&text, 40 * MIB + 12345).unwrap(); // compressible, unaligned
    fill(&mut r[..(MIB as usize)], 2);
    f.write_all_at(&r[..(MIB as usize)], 63 * MIB).unwrap(); // the last chunk
}

/// A thin disk `vm.vmdk` of `size` bytes in a new directory `dir`, with
/// change tracking on.
fn tracked_disk(dir: &Path, size: u64) -> Arc<dyn snapshot::Store> {
    std::fs::create_dir(dir).unwrap();
    let store: Arc<dyn snapshot::Store> = Arc::new(snapshot::LocalStore::new(dir));
    snapshot::ops::create(
        &*store,
        "vm.vmdk",
        size,
        snapshot::Provisioning::Thin,
        "lsilogic",
    )
    .unwrap();
    snapshot::ops::set_tracking(store.clone(), "vm.vmdk", true).unwrap();
    store
}

fn digest(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

fn opts() -> Options {
    Options {
        workers: 4,
        progress: false,
    }
}

fn image_backup(
    repo: &Arc<Repo>,
    name: &str,
    src: &Path,
    since: Option<String>,
) -> backup_proxy::manifest::Manifest {
    let s = open_source(src).unwrap();
    let job = DiskJob {
        name: "disk".into(),
        source: &*s,
        since,
    };
    backup(repo.clone(), name, &[job], &opts()).unwrap()
}

fn restore_to(repo: &Repo, id: &str, dest: &Path) -> backup_proxy::restore::RestoreStats {
    let m = repo.manifest(id).unwrap();
    let d = backup_proxy::restore::pick(&m, None).unwrap();
    let t = create_dest(dest, d.size).unwrap();
    backup_proxy::restore::restore(repo, d, t, 8, false).unwrap()
}

fn repo_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut st = vec![dir.to_path_buf()];
    while let Some(d) = st.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                st.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out
}

fn chunk_count(dir: &Path) -> usize {
    repo_files(&dir.join("chunks")).len()
}

#[test]
fn a_mixed_image_round_trips_and_is_stored_once() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img");
    mixed_image(&img);
    let url = t.path().join("repo");
    let repo = Arc::new(Repo::init(url.to_str().unwrap(), 4 << 20, None).unwrap());
    let m = image_backup(&repo, "vm", &img, None);
    let s = m.totals();
    // Holes are never read; the duplicate 8 MiB and the zeros are not stored.
    assert!(s.read <= 28 * MIB, "{s:?}");
    assert_eq!(s.new, 4 * MIB * 4, "{s:?}"); // two random chunks, the text, the tail
    assert!(s.stored < s.new, "text compresses: {s:?}");
    let out = t.path().join("out");
    let r = restore_to(&repo, &m.id, &out);
    assert_eq!(digest(&img), digest(&out));
    assert!(r.zero >= 40 * MIB);
    // Holes stay holes.
    let blocks = std::fs::metadata(&out)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .unwrap();
    assert!(
        blocks * 512 < 30 * MIB,
        "restore wrote {} bytes",
        blocks * 512
    );
    // A second backup of the same image stores nothing.
    let m2 = image_backup(&repo, "vm", &img, None);
    assert_eq!(m2.totals().new, 0);
    let chunks = chunk_count(&url);
    // Another VM with the same data: deduplicated across names too.
    image_backup(&repo, "other", &img, None);
    assert_eq!(chunk_count(&url), chunks);
    let v = backup_proxy::verify::verify(&repo, None, 4, false).unwrap();
    assert!(v.ok(), "{:?}", v.damaged);
    assert_eq!(v.backups, 3);
}

/// A virtual disk with change tracking: a 1% change read back alone.
#[test]
fn an_incremental_backup_reads_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("ds");
    let size = 256 * MIB;
    let store = tracked_disk(&dir, size);
    {
        let d = snapshot::Disk::open(store.clone(), "vm.vmdk", true).unwrap();
        let mut b = vec![0u8; (96 * MIB) as usize];
        fill(&mut b, 3);
        d.write_at(&b, 0).unwrap();
        d.write_at(&b[..(64 * MIB) as usize], 160 * MIB).unwrap();
        d.close().unwrap();
    }
    let s1 = snapshot::ops::snapshot(store.clone(), "vm.vmdk").unwrap();
    let repo =
        Arc::new(Repo::init(t.path().join("repo").to_str().unwrap(), 4 << 20, None).unwrap());
    let vm = dir.join("vm.vmdk");
    let full = image_backup(&repo, "vm", &vm, None);
    let id1 = s1.change_id.unwrap().to_string();
    assert_eq!(full.disks[0].change_id.as_deref(), Some(id1.as_str()));
    // 1% of the disk, in scattered 64 KiB writes.
    {
        let d = snapshot::Disk::open(store.clone(), "vm.vmdk", true).unwrap();
        let mut b = vec![0u8; 64 << 10];
        for k in 0..41u64 {
            fill(&mut b, 100 + k);
            d.write_at(&b, (k * 6151 * 1024) % (size - (64 << 10)) / 65536 * 65536)
                .unwrap();
        }
        d.close().unwrap();
    }
    let s2 = snapshot::ops::snapshot(store.clone(), "vm.vmdk").unwrap();
    let inc = image_backup(&repo, "vm", &vm, Some(id1.clone()));
    let st = inc.totals();
    // Only the changed 64 KiB blocks are read from the disk; the rest of
    // each chunk they fall in comes from the parent backup's chunk.
    assert!(st.read <= 41 * 2 * (64 << 10), "{st:?}");
    assert_eq!(inc.parent.as_deref(), Some(full.id.as_str()));
    assert_eq!(inc.disks[0].change_id, s2.change_id.map(|c| c.to_string()));
    // Restore to a raw file and to a new virtual disk: both equal the disk.
    let want = {
        let d = snapshot::Disk::open(store.clone(), "vm.vmdk", false).unwrap();
        let mut b = vec![0u8; size as usize];
        d.read_at(&mut b, 0).unwrap();
        blake3::hash(&b)
    };
    let out = t.path().join("out.raw");
    restore_to(&repo, &inc.id, &out);
    assert_eq!(digest(&out), want);
    let vout = dir.join("restored.vmdk");
    restore_to(&repo, &inc.id, &vout);
    let src = open_source(&vout).unwrap();
    let mut b = vec![0u8; size as usize];
    src.read_at(&mut b, 0).unwrap();
    assert_eq!(blake3::hash(&b), want);
    // An ID no backup recorded is refused, not guessed.
    let s = open_source(&vm).unwrap();
    let job = DiskJob {
        name: "disk".into(),
        source: &*s,
        since: Some("0000000000000001/3".into()),
    };
    let e = backup(repo.clone(), "vm", &[job], &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no backup vm of disk disk at change ID"), "{e}");
}

#[test]
fn the_1_percent_incremental_reads_at_most_2_percent() {
    // The figure, on 64 KiB-granular changes clustered as a guest
    // writes them (a file's worth at a time): 1% changed, ≤ 2% read.
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("ds");
    let size = 1024 * MIB;
    let store = tracked_disk(&dir, size);
    let s1 = snapshot::ops::snapshot(store.clone(), "vm.vmdk").unwrap();
    let repo =
        Arc::new(Repo::init(t.path().join("repo").to_str().unwrap(), 4 << 20, None).unwrap());
    let vm = dir.join("vm.vmdk");
    image_backup(&repo, "vm", &vm, None);
    {
        let d = snapshot::Disk::open(store.clone(), "vm.vmdk", true).unwrap();
        let mut b = vec![0u8; (MIB + MIB / 4) as usize];
        for k in 0..8u64 {
            fill(&mut b, 7 + k);
            d.write_at(&b, k * 128 * MIB + 3 * MIB).unwrap();
        }
        d.close().unwrap();
    }
    snapshot::ops::snapshot(store.clone(), "vm.vmdk").unwrap();
    let inc = image_backup(&repo, "vm", &vm, Some(s1.change_id.unwrap().to_string()));
    let read = inc.totals().read;
    assert!(read * 50 <= size, "read {read} of {size} after a 1% change");
}

#[test]
fn encryption_refuses_wrong_keys_and_leaves_no_plaintext() {
    let t = tempfile::tempdir().unwrap();
    let url = t.path().join("repo");
    let key = t.path().join("key");
    let repo = Arc::new(
        Repo::init(
            url.to_str().unwrap(),
            1 << 20,
            Some((&key, b"correct horse")),
        )
        .unwrap(),
    );
    // Known content: a marker line, and random data, in 1 MiB chunks.
    let img = t.path().join("SOURCE-NAME-MARKER");
    let mut data = vec![0u8; (8 * MIB) as usize];
    fill(&mut data, 9);
    for (k, c) in data.chunks_mut((MIB / 2) as usize).enumerate() {
        let m = format!("SECRET-MARKER-{k:04}-do-not-leak-");
        c[..m.len()].copy_from_slice(m.as_bytes());
    }
    std::fs::write(&img, &data).unwrap();
    let m = image_backup(&repo, "vm", &img, None);
    for f in repo_files(&url) {
        let b = std::fs::read(&f).unwrap();
        assert!(
            !b.windows(14).any(|w| w == b"SECRET-MARKER-"),
            "{} holds the marker",
            f.display()
        );
        assert!(
            !b.windows(32).any(|w| w == &data[1000..1032]),
            "{} holds image bytes",
            f.display()
        );
        assert!(
            !String::from_utf8_lossy(&b).contains("SOURCE-NAME-MARKER"),
            "{} names the source",
            f.display()
        );
    }
    let ks = |file: Option<&Path>, p: &[u8]| KeySource {
        file: file.map(|f| f.to_path_buf()),
        passphrase: Some(p.to_vec()),
    };
    let u = url.to_str().unwrap();
    // Right passphrase, from the copy in the repository or the key file.
    for k in [ks(None, b"correct horse"), ks(Some(&key), b"correct horse")] {
        let r = Repo::open(u, &k).unwrap();
        let out = t.path().join(format!("out-{}", k.file.is_some()));
        restore_to(&r, &m.id, &out);
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }
    let e = Repo::open(u, &ks(None, b"wrong"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("wrong passphrase"), "{e}");
    // Another repository's key is refused by its ID.
    let other = t.path().join("other-key");
    Repo::init(
        t.path().join("repo2").to_str().unwrap(),
        1 << 20,
        Some((&other, b"correct horse")),
    )
    .unwrap();
    let e = Repo::open(u, &ks(Some(&other), b"correct horse"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is not this repository's key"), "{e}");
    // Whoever can write the store cannot turn encryption off unnoticed.
    {
        use backup_proxy::blob::{self, Kind};
        let raw = std::fs::read(url.join("config")).unwrap();
        let plain = blob::open(Kind::Config, &raw, None, b"config", "config").unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        let saved = raw.clone();
        let refused = |v: &serde_json::Value| {
            let obj = blob::seal(
                Kind::Config,
                &serde_json::to_vec(v).unwrap(),
                false,
                None,
                b"config",
            );
            std::fs::write(url.join("config"), obj).unwrap();
            let e = Repo::open(u, &ks(None, b"correct horse"))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("tampered"), "{e}");
        };
        v["lease_secs"] = serde_json::json!(1);
        refused(&v);
        v["encryption"] = serde_json::Value::Null;
        v["mac"] = serde_json::Value::Null;
        refused(&v);
        std::fs::write(url.join("config"), saved).unwrap();
    }
    // Chunk names are keyed: the plain BLAKE3 of a chunk is not among them.
    let plain = blake3::hash(&data[..(MIB as usize)]).to_hex().to_string();
    assert!(!repo_files(&url)
        .iter()
        .any(|f| f.to_string_lossy().contains(&plain)));
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_at(&mut b, at).unwrap();
    f.write_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[test]
fn damage_is_named_and_undamaged_backups_still_restore() {
    let t = tempfile::tempdir().unwrap();
    let url = t.path().join("repo");
    let repo = Arc::new(Repo::init(url.to_str().unwrap(), 1 << 20, None).unwrap());
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    for (p, seed) in [(&a, 1), (&b, 2), (&c, 3)] {
        let mut d = vec![0u8; (4 * MIB) as usize];
        fill(&mut d, seed);
        std::fs::write(p, &d).unwrap();
    }
    let ma = image_backup(&repo, "a", &a, None);
    let mb = image_backup(&repo, "b", &b, None);
    let mc = image_backup(&repo, "c", &c, None);
    // A chunk of a's, an index of b's, c's manifest.
    let ia = repo.index(&ma.disks[0]).unwrap();
    flip(
        &url.join(backup_proxy::repo::chunk_key(&ia.digests[1])),
        5000,
    );
    flip(&url.join(&mb.disks[0].index), 100);
    flip(&url.join(backup_proxy::repo::manifest_key(&mc.id)), 40);
    let v = backup_proxy::verify::verify(&repo, None, 4, false).unwrap();
    let names: Vec<&String> = v.damaged.keys().collect();
    assert_eq!(names, vec![&ma.id, &mb.id, &mc.id], "{:?}", v.damaged);
    assert!(v.damaged[&ma.id][0].contains("damaged"), "{:?}", v.damaged);
    // Restore of the damaged one fails with a clear error; a new backup of
    // a's image (which re-reads the damaged chunk's data) and its restore work.
    let m = repo.manifest(&ma.id).unwrap();
    let e = backup_proxy::restore::restore(
        &repo,
        &m.disks[0],
        create_dest(&t.path().join("x"), 4 * MIB).unwrap(),
        4,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not found"), "{e}");
    // Verify moved the damaged chunk aside, so the next backup of the
    // same data stores it again: the damaged backup heals.
    let m2 = image_backup(&repo, "a2", &a, None);
    assert_eq!(m2.totals().new, MIB, "{:?}", m2.totals());
    restore_to(&repo, &ma.id, &t.path().join("a.out"));
    assert_eq!(digest(&a), digest(&t.path().join("a.out")));
    restore_to(&repo, &m2.id, &t.path().join("a2.out"));
    let v = backup_proxy::verify::verify(&repo, None, 4, false).unwrap();
    assert_eq!(v.damaged.keys().collect::<Vec<_>>(), vec![&mb.id, &mc.id]);
    // Listing still works, and prune can forget the damaged ones.
    assert_eq!(repo.list().unwrap().len(), 4);
}
