//! What a LUN already holds, as util-linux's libblkid sees it: filesystems,
//! partition tables, LVM and RAID members, swap, crypto containers. `mkfs`
//! and `extend` ask before they overwrite anything (as mkfs.xfs, mkfs.ext4
//! and mkfs.ocfs2 do), and wipe the magics of what they were told to
//! overwrite (as `wipefs -a`).
//!
//! libblkid probes a file descriptor, and a LUN here may be an NBD export or
//! an iSCSI LUN with no descriptor of its own. So every LUN is probed the
//! same way: the parts of it where probers look (the first
//! [`HEAD`] bytes and the last [`TAIL`]) are copied into a sparse memory
//! file of the LUN's size, and libblkid probes that. Every signature libblkid
//! knows sits there: superblocks within the first 32 MiB (VMware's VMFS,
//! the deepest, at 19 MiB), backup GPT headers, MD 0.90/1.0 and DDF RAID
//! superblocks, ZFS and nilfs tail labels within the last MiB.
//!
//! Only this file holds `unsafe` for libblkid (LGPL, linked dynamically).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::{c_char, c_int};

use crate::{Lun, LunError, Result};

/// Bytes copied from the start of a LUN for probing.
pub const HEAD: u64 = 32 << 20;
/// Bytes copied from the end of a LUN for probing.
pub const TAIL: u64 = 2 << 20;

/// One signature found on a LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// libblkid's name: `ext4`, `xfs`, `gpt`, `dos`, `LVM2_member`,
    /// `linux_raid_member`, `swap`, `crypto_LUKS`, ...
    pub kind: String,
    /// What it is: `filesystem`, `partition table`, `raid`, `crypto`, `other`.
    pub usage: String,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// Where its magic is, and the magic's length (what a wipe zeroes).
    pub magic_offset: Option<u64>,
    pub magic_len: usize,
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.kind, self.usage)?;
        if let Some(l) = &self.label {
            write!(f, " label \"{l}\"")?;
        }
        if let Some(u) = &self.uuid {
            write!(f, " uuid {u}")?;
        }
        if let Some(o) = self.magic_offset {
            write!(f, " at offset {o}")?;
        }
        Ok(())
    }
}

#[allow(non_camel_case_types)]
#[repr(C)]
struct blkid_struct_probe {
    _opaque: [u8; 0],
}
#[allow(non_camel_case_types)]
type blkid_probe = *mut blkid_struct_probe;

const BLKID_SUBLKS_LABEL: c_int = 1 << 1;
const BLKID_SUBLKS_UUID: c_int = 1 << 3;
const BLKID_SUBLKS_TYPE: c_int = 1 << 5;
const BLKID_SUBLKS_USAGE: c_int = 1 << 7;
const BLKID_SUBLKS_MAGIC: c_int = 1 << 9;
const BLKID_SUBLKS_BADCSUM: c_int = 1 << 10;
const BLKID_PARTS_MAGIC: c_int = 1 << 3;

// Linked by build.rs (pkg-config blkid).
extern "C" {
    fn blkid_new_probe() -> blkid_probe;
    fn blkid_free_probe(pr: blkid_probe);
    fn blkid_probe_set_device(pr: blkid_probe, fd: c_int, off: i64, size: i64) -> c_int;
    fn blkid_probe_enable_superblocks(pr: blkid_probe, enable: c_int) -> c_int;
    fn blkid_probe_set_superblocks_flags(pr: blkid_probe, flags: c_int) -> c_int;
    fn blkid_probe_enable_partitions(pr: blkid_probe, enable: c_int) -> c_int;
    fn blkid_probe_set_partitions_flags(pr: blkid_probe, flags: c_int) -> c_int;
    fn blkid_do_probe(pr: blkid_probe) -> c_int;
    fn blkid_probe_lookup_value(
        pr: blkid_probe,
        name: *const c_char,
        data: *mut *const c_char,
        len: *mut usize,
    ) -> c_int;
}

/// A probe that frees itself.
struct Probe(blkid_probe);

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: made by blkid_new_probe, freed once.
        unsafe { blkid_free_probe(self.0) }
    }
}

impl Probe {
    /// A value of the current result, as raw bytes (NUL dropped).
    fn value(&self, name: &str) -> Option<Vec<u8>> {
        let n = CString::new(name).ok()?;
        let mut data: *const c_char = std::ptr::null();
        let mut len: usize = 0;
        // SAFETY: the probe is live; libblkid points `data` at `len` bytes it
        // owns until the next probe call, and we copy them out at once.
        let rc = unsafe { blkid_probe_lookup_value(self.0, n.as_ptr(), &mut data, &mut len) };
        if rc != 0 || data.is_null() {
            return None;
        }
        // SAFETY: as above; `len` counts the terminating NUL.
        let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, len) };
        Some(bytes.strip_suffix(&[0]).unwrap_or(bytes).to_vec())
    }
    fn text(&self, name: &str) -> Option<String> {
        self.value(name)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .filter(|s| !s.is_empty())
    }
}

/// Every signature libblkid finds on `lun` (none: an empty list).
pub fn probe(lun: &dyn Lun) -> Result<Vec<Signature>> {
    let img = image(lun)?;
    probe_fd(&img, lun.name())
}

/// Copy the head and the tail of `lun` into a sparse memory file of its size.
fn image(lun: &dyn Lun) -> Result<OwnedFd> {
    let name = CString::new("vmfs-probe").expect("no NUL");
    let open_err = |what: &str| LunError::Open {
        lun: lun.name().to_string(),
        what: what.to_string(),
        cause: std::io::Error::last_os_error(),
    };
    // SAFETY: a valid C string; the returned descriptor is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(open_err("making a memory file to probe it in"));
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = lun.size();
    // SAFETY: plain syscall on our descriptor.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(open_err("sizing the memory file to probe it in"));
    }
    let head = size.min(HEAD);
    let tail_start = size.saturating_sub(TAIL).max(head);
    let mut buf = vec![0u8; 1 << 20];
    for (from, to) in [(0, head), (tail_start, size)] {
        let mut off = from;
        while off < to {
            let n = (to - off).min(buf.len() as u64) as usize;
            lun.read_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&b| b != 0) {
                let mut done = 0;
                while done < n {
                    // SAFETY: writes from our buffer into our descriptor.
                    let w = unsafe {
                        libc::pwrite(
                            fd.as_raw_fd(),
                            buf[done..n].as_ptr().cast(),
                            n - done,
                            (off + done as u64) as libc::off_t,
                        )
                    };
                    if w <= 0 {
                        return Err(open_err("copying into the memory file to probe it in"));
                    }
                    done += w as usize;
                }
            }
            off += n as u64;
        }
    }
    Ok(fd)
}

fn probe_fd(fd: &OwnedFd, lun: &str) -> Result<Vec<Signature>> {
    let failed = |what: &str| LunError::InvalidArgument {
        lun: lun.to_string(),
        what: format!("libblkid: {what}"),
    };
    // SAFETY: no arguments; null on failure.
    let pr = unsafe { blkid_new_probe() };
    if pr.is_null() {
        return Err(failed("could not make a probe"));
    }
    let pr = Probe(pr);
    // SAFETY: a live probe and a descriptor that outlives it (both dropped
    // at the end of this function, the probe first).
    unsafe {
        if blkid_probe_set_device(pr.0, fd.as_raw_fd(), 0, 0) != 0 {
            return Err(failed("could not probe the copy of the LUN"));
        }
        blkid_probe_enable_superblocks(pr.0, 1);
        blkid_probe_set_superblocks_flags(
            pr.0,
            BLKID_SUBLKS_LABEL
                | BLKID_SUBLKS_UUID
                | BLKID_SUBLKS_TYPE
                | BLKID_SUBLKS_USAGE
                | BLKID_SUBLKS_MAGIC
                | BLKID_SUBLKS_BADCSUM,
        );
        blkid_probe_enable_partitions(pr.0, 1);
        blkid_probe_set_partitions_flags(pr.0, BLKID_PARTS_MAGIC);
    }
    let mut out = Vec::new();
    // As wipefs: each call returns the next signature; 1 when none is left.
    // Bounded, in case a damaged image made libblkid loop.
    for _ in 0..64 {
        // SAFETY: a live probe.
        let rc = unsafe { blkid_do_probe(pr.0) };
        if rc == 1 {
            break;
        }
        if rc < 0 {
            return Err(failed("probing failed"));
        }
        let (kind, usage, off, magic) = match pr.text("TYPE") {
            Some(t) => (
                t,
                pr.text("USAGE").unwrap_or_else(|| "other".into()),
                pr.text("SBMAGIC_OFFSET"),
                pr.value("SBMAGIC"),
            ),
            None => match pr.text("PTTYPE") {
                Some(t) => (
                    t,
                    "partition table".to_string(),
                    pr.text("PTMAGIC_OFFSET"),
                    pr.value("PTMAGIC"),
                ),
                None => continue,
            },
        };
        out.push(Signature {
            kind,
            usage,
            label: pr.text("LABEL"),
            uuid: pr.text("UUID"),
            magic_offset: off.and_then(|o| o.parse().ok()),
            magic_len: magic.map_or(0, |m| m.len()),
        });
    }
    Ok(out)
}

/// Zero the magic of every signature in `sigs` on `lun` (what `wipefs -a`
/// does), so that nothing later mistakes the LUN for what it held.
pub fn wipe(lun: &dyn Lun, sigs: &[Signature]) -> Result<()> {
    for s in sigs {
        if let Some(off) = s.magic_offset {
            if s.magic_len > 0 && off + s.magic_len as u64 <= lun.size() {
                lun.write_at(&vec![0u8; s.magic_len], off)?;
            }
        }
    }
    lun.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemLun;

    #[test]
    fn an_empty_lun_holds_nothing() {
        let l = MemLun::new("mem", 64 << 20);
        assert_eq!(probe(&l).unwrap(), vec![]);
    }

    #[test]
    fn an_ext2_superblock_is_found_and_wiped() {
        let l = MemLun::new("mem", 64 << 20);
        // A minimal ext2 superblock: magic 0xEF53 at 1024 + 56, sizes that
        // make sense (libblkid checks a few).
        let mut sb = vec![0u8; 1024];
        sb[0..4].copy_from_slice(&16u32.to_le_bytes()); // inodes
        sb[4..8].copy_from_slice(&64u32.to_le_bytes()); // blocks
        sb[24..28].copy_from_slice(&0u32.to_le_bytes()); // log block size: 1K
        sb[32..36].copy_from_slice(&8192u32.to_le_bytes()); // blocks per group
        sb[40..44].copy_from_slice(&16u32.to_le_bytes()); // inodes per group
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[76..80].copy_from_slice(&1u32.to_le_bytes()); // revision
        sb[88..90].copy_from_slice(&128u16.to_le_bytes()); // inode size
        sb[120..124].copy_from_slice(b"test");
        l.write_at(&sb, 1024).unwrap();
        let found = probe(&l).unwrap();
        assert!(
            found
                .iter()
                .any(|s| s.kind.starts_with("ext") && s.usage == "filesystem"),
            "{found:?}"
        );
        wipe(&l, &found).unwrap();
        assert_eq!(probe(&l).unwrap(), vec![]);
    }
}
