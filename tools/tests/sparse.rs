//! Holes through the FUSE mount: lseek(SEEK_DATA/SEEK_HOLE) answers from
//! the block map, so `qemu-img map`, `cp --sparse` and backup tools see a
//! sparse file's holes.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::process::Command;

mod common;
use common::{text, vmfs, Host};

const MIB: u64 = 1 << 20;

fn lseek(f: &std::fs::File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: a valid descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    (r >= 0).then_some(r as u64)
}

#[test]
fn holes_show_through_the_mount_to_lseek_qemu_img_map_and_cp() {
    let d = tempfile::tempdir().unwrap();
    let lun = d.path().join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let lun = lun.to_str().unwrap();
    let o = vmfs(&["mkfs", "--block-size", "1M", lun]);
    assert!(o.status.success(), "{}", text(&o));
    let mnt = d.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let mut host = Host::mount(&[lun], &mnt);

    // 64 MiB, data at 8 MiB (2 MiB), 40 MiB (one block) and the last block.
    let p = mnt.join("sparse.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&vec![0xa5; (2 * MIB) as usize], 8 * MIB)
        .unwrap();
    f.write_all_at(&[1u8; 4096], 40 * MIB + 4096).unwrap();
    f.write_all_at(b"end", 64 * MIB - 3).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let data = [
        (8 * MIB, 10 * MIB),
        (40 * MIB, 41 * MIB),
        (63 * MIB, 64 * MIB),
    ];

    let f = std::fs::File::open(&p).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Some(8 * MIB));
    assert_eq!(lseek(&f, 8 * MIB, libc::SEEK_HOLE), Some(10 * MIB));
    assert_eq!(lseek(&f, 11 * MIB, libc::SEEK_DATA), Some(40 * MIB));
    assert_eq!(lseek(&f, 64 * MIB - 1, libc::SEEK_HOLE), Some(64 * MIB));
    assert_eq!(lseek(&f, 64 * MIB, libc::SEEK_DATA), None);
    drop(f);

    // qemu-img map: the data extents are exactly the written blocks.
    let o = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let mut got = Vec::new();
    for l in out.lines().filter(|l| l.contains("\"data\": true")) {
        let num = |k: &str| -> u64 {
            let s = &l[l.find(k).unwrap() + k.len()..];
            s.trim_start_matches([' ', ':'])
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (start, len) = (num("\"start\""), num("\"length\""));
        got.push((start, start + len));
    }
    assert_eq!(got, data, "qemu-img map said:\n{out}");

    // cp --sparse=always keeps the holes (and the bytes).
    let copy = d.path().join("copy.raw");
    let o = Command::new("cp")
        .arg("--sparse=always")
        .arg(&p)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&p).unwrap());
    let c = std::fs::File::open(&copy).unwrap();
    assert_eq!(lseek(&c, 0, libc::SEEK_DATA), Some(8 * MIB));
    host.unmount().unwrap();
}
