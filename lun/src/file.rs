//! Local files and block devices.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{check_caw, check_range, CompareAndWrite, Lun, LunError, Result};

/// The extended attribute that keeps a regular file's LUN identity.
const ID_XATTR: &[u8] = b"user.vmfs.lun-id\0";

/// A LUN backed by a regular file or a block device, with positional I/O.
///
/// Compare-and-write is atomic across processes on this machine: it takes an
/// open-file-description lock on the sector's byte range (and a mutex for the
/// threads of this process, which share the description), compares, writes.
pub struct FileLun {
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
    block_size: u32,
    is_block_device: bool,
    caw: Mutex<()>,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

impl FileLun {
    /// Open `path` for reading and writing; `name` is how the user wrote it.
    pub fn open(path: &Path, name: &str) -> Result<FileLun> {
        let open_err = |what: &str, source| LunError::Open {
            lun: name.to_string(),
            what: what.to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_err("cannot open", e))?;
        let md = file.metadata().map_err(|e| open_err("cannot stat", e))?;
        let is_block_device = md.file_type().is_block_device();
        let (size, block_size) = if is_block_device {
            let mut size: u64 = 0;
            let mut bs: libc::c_int = 0;
            // SAFETY: both ioctls write one integer of the stated type into a valid pointer.
            let r1 = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            let r2 = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut bs) };
            if r1 != 0 || r2 != 0 {
                return Err(open_err(
                    "cannot query block device size",
                    std::io::Error::last_os_error(),
                ));
            }
            (size, bs.max(512) as u32)
        } else if md.file_type().is_file() {
            (md.len(), 512)
        } else {
            return Err(open_err(
                "not a regular file or block device",
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        };
        Ok(FileLun {
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            size,
            block_size,
            is_block_device,
            caw: Mutex::new(()),
        })
    }

    /// Create (or truncate to) a sparse file of `size` bytes and open it.
    pub fn create(path: &Path, size: u64) -> Result<FileLun> {
        let name = path.display().to_string();
        let f = File::create(path).map_err(|e| LunError::Open {
            lun: name.clone(),
            what: "cannot create".into(),
            source: e,
        })?;
        f.set_len(size).map_err(|e| LunError::Open {
            lun: name.clone(),
            what: "cannot size".into(),
            source: e,
        })?;
        drop(f);
        FileLun::open(path, &name)
    }

    fn io_err(&self, offset: u64, len: u64, source: std::io::Error) -> LunError {
        LunError::Io {
            lun: self.name.clone(),
            offset,
            len,
            source,
        }
    }

    fn range_lock(&self, offset: u64, len: u64, lock: bool) -> std::io::Result<()> {
        // SAFETY: flock is plain data; zeroed is a valid initial value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = offset as libc::off_t;
        fl.l_len = len as libc::off_t;
        // SAFETY: F_OFD_SETLKW reads a valid flock.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLKW, &fl) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn serial_of_block_device(&self) -> Option<String> {
        let md = self.file.metadata().ok()?;
        let rdev = md.rdev();
        let (maj, min) = (libc::major(rdev), libc::minor(rdev));
        for f in ["device/wwid", "wwid", "device/serial", "serial"] {
            if let Ok(s) = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/{f}")) {
                let s = s.trim();
                if !s.is_empty() {
                    return Some(format!("serial:{s}"));
                }
            }
        }
        None
    }

    fn xattr_identity(&self) -> Option<String> {
        let fd = self.file.as_raw_fd();
        let mut buf = [0u8; 64];
        // SAFETY: name is NUL-terminated; buf is valid for its length.
        let n = unsafe {
            libc::fgetxattr(
                fd,
                ID_XATTR.as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n > 0 {
            return std::str::from_utf8(&buf[..n as usize])
                .ok()
                .map(|s| format!("uuid:{s}"));
        }
        let id = uuid::Uuid::new_v4().to_string();
        // SAFETY: as above; XATTR_CREATE so two racing openers keep one identity.
        let r = unsafe {
            libc::fsetxattr(
                fd,
                ID_XATTR.as_ptr().cast(),
                id.as_ptr().cast(),
                id.len(),
                libc::XATTR_CREATE,
            )
        };
        if r == 0 {
            return Some(format!("uuid:{id}"));
        }
        // Lost a race: read the winner's.
        let n = unsafe {
            libc::fgetxattr(
                fd,
                ID_XATTR.as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n > 0)
            .then(|| {
                std::str::from_utf8(&buf[..n as usize])
                    .ok()
                    .map(|s| format!("uuid:{s}"))
            })
            .flatten()
    }
}

impl Lun for FileLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, self.size, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err(offset, buf.len() as u64, e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(&self.name, self.size, offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err(offset, buf.len() as u64, e))
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err(0, 0, e))
    }
    /// Starts the kernel's read-ahead of the range into the page cache.
    fn prefetch(&self, offset: u64, len: u64) {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return;
        }
        // SAFETY: plain integer arguments on an fd this LUN owns; a failure
        // only means no read-ahead.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(&self.name, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate takes plain integers.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // Not supported here (some filesystems, some devices): write zeros.
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    fn identity(&self) -> Result<String> {
        if self.is_block_device {
            if let Some(s) = self.serial_of_block_device() {
                return Ok(s);
            }
        } else if let Some(id) = self.xattr_identity() {
            return Ok(id);
        }
        // No serial and no xattr support: the file's place on this machine.
        let md = self.file.metadata().map_err(|e| self.io_err(0, 0, e))?;
        Ok(format!(
            "inode:{}:{}:{}",
            md.dev(),
            md.ino(),
            self.path.display()
        ))
    }
    fn has_compare_and_write(&self) -> bool {
        true
    }
    fn compare_and_write(&self, offset: u64, expect: &[u8], new: &[u8]) -> Result<CompareAndWrite> {
        check_caw(self, offset, expect, new)?;
        let len = expect.len() as u64;
        let _g = self.caw.lock().unwrap_or_else(|p| p.into_inner());
        self.range_lock(offset, len, true)
            .map_err(|e| self.io_err(offset, len, e))?;
        let result = (|| {
            let mut cur = vec![0u8; expect.len()];
            self.read_at(&mut cur, offset)?;
            if cur != expect {
                return Ok(CompareAndWrite::Mismatch);
            }
            self.write_at(new, offset)?;
            Ok(CompareAndWrite::Written)
        })();
        let unlock = self
            .range_lock(offset, len, false)
            .map_err(|e| self.io_err(offset, len, e));
        let r = result?;
        unlock?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_zero_caw() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.img");
        let lun = FileLun::create(&p, 1 << 20).unwrap();
        lun.write_at(&[7u8; 4096], 8192).unwrap();
        let mut b = [0u8; 4096];
        lun.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [7u8; 4096]);
        lun.write_zeroes(8192, 4096, true).unwrap();
        lun.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [0u8; 4096]);
        assert!(matches!(
            lun.read_at(&mut b, (1 << 20) - 100),
            Err(LunError::OutOfRange { .. })
        ));
        let old = [0u8; 512];
        let new = [1u8; 512];
        assert_eq!(
            lun.compare_and_write(0, &old, &new).unwrap(),
            CompareAndWrite::Written
        );
        assert_eq!(
            lun.compare_and_write(0, &old, &new).unwrap(),
            CompareAndWrite::Mismatch
        );
        assert!(lun.compare_and_write(1, &old, &new).is_err());
        let id1 = lun.identity().unwrap();
        let id2 = FileLun::open(&p, "again").unwrap().identity().unwrap();
        assert_eq!(id1, id2);
    }

    #[test]
    fn caw_is_exclusive_between_threads() {
        let dir = tempfile::tempdir().unwrap();
        let lun = std::sync::Arc::new(FileLun::create(&dir.path().join("c.img"), 4096).unwrap());
        // Each thread increments a counter in sector 0 by compare-and-write 200 times.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lun = lun.clone();
                std::thread::spawn(move || {
                    let mut done = 0;
                    while done < 200 {
                        let mut cur = [0u8; 512];
                        lun.read_at(&mut cur, 0).unwrap();
                        let mut next = cur;
                        let v = u64::from_le_bytes(cur[..8].try_into().unwrap()) + 1;
                        next[..8].copy_from_slice(&v.to_le_bytes());
                        if lun.compare_and_write(0, &cur, &next).unwrap()
                            == CompareAndWrite::Written
                        {
                            done += 1;
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut cur = [0u8; 512];
        lun.read_at(&mut cur, 0).unwrap();
        assert_eq!(u64::from_le_bytes(cur[..8].try_into().unwrap()), 800);
    }
}
