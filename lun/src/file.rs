//! Local files and block devices.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::{check_caw, check_range, CompareAndWrite, Lun, LunError, Result};

/// The extended attribute that keeps a regular file's LUN identity.
const ID_XATTR: &[u8] = b"user.vmfs.lun-id\0";

/// A LUN backed by a regular file or a block device, with positional I/O.
///
/// Compare-and-write is atomic across processes on this machine: it takes an
/// open-file-description lock on the sector's byte range (and a mutex for the
/// threads of this process, which share the description), compares, writes.
///
/// Large aligned writes (file data) bypass the host's page cache: see
/// [`DIRECT_MIN`]. Everything else, metadata included, is buffered.
pub struct FileLun {
    name: String,
    path: PathBuf,
    file: File,
    /// The same open file with `O_DIRECT`, for large aligned writes; `None`
    /// where the filesystem refuses direct I/O (some tmpfs, FUSE, NFS
    /// setups).
    direct: Option<File>,
    /// Cleared, with a warning, the first time a direct write is refused.
    direct_ok: AtomicBool,
    size: u64,
    block_size: u32,
    is_block_device: bool,
    caw: Mutex<()>,
}

/// A write whose [`DIRECT_ALIGN`]-aligned middle is at least this long
/// writes that middle with `O_DIRECT`; its unaligned head and tail, and
/// every shorter write, go through the page cache.
///
/// Why: a buffered write costs a copy into the page cache and, later, the
/// kernel's write-back of it; both take CPU from the host that runs the
/// VMs, and the data ends up cached twice when it came through the FUSE
/// mount. A direct write is one DMA, as QEMU's `cache=none` and ESX do.
/// Small writes stay buffered: each direct write waits for the device, and
/// metadata blocks are read back often.
pub const DIRECT_MIN: usize = 128 << 10;
/// Offset, length and memory alignment of a direct write; it suits every
/// device whose logical block is at most 4 KiB (a LUN whose block is larger
/// uses its block size).
const DIRECT_ALIGN: usize = 4096;
/// A direct write from an unaligned buffer is copied through a per-thread
/// aligned buffer of this size, a piece at a time. It is one huge page
/// where the kernel has them: perf showed pinning the 256 small pages of
/// each 1 MiB write for the device as a cost of its own.
const BOUNCE: usize = 2 << 20;

/// A zeroed heap buffer of [`BOUNCE`] bytes aligned to its size, which the
/// kernel is asked to back with a huge page (`MADV_HUGEPAGE`).
struct Bounce(std::ptr::NonNull<u8>);

impl Bounce {
    fn layout() -> std::alloc::Layout {
        // BOUNCE is a power of two: this cannot fail.
        std::alloc::Layout::from_size_align(BOUNCE, BOUNCE).expect("power-of-two layout")
    }
    fn new() -> Bounce {
        let layout = Bounce::layout();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        let Some(p) = std::ptr::NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: advice on memory this buffer owns, before its first touch
        // (so the fault can take a huge page); failure only means small
        // pages. Then every byte is initialised.
        unsafe {
            libc::madvise(p.as_ptr().cast(), BOUNCE, libc::MADV_HUGEPAGE);
            std::ptr::write_bytes(p.as_ptr(), 0, BOUNCE);
        }
        Bounce(p)
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: BOUNCE initialised (zeroed) bytes owned by self, borrowed
        // mutably through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), BOUNCE) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), Bounce::layout()) }
    }
}

thread_local! {
    static BOUNCE_BUF: RefCell<Option<Bounce>> = const { RefCell::new(None) };
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

impl FileLun {
    /// Open `path` for reading and writing; `name` is how the user wrote it.
    pub fn open(path: &Path, name: &str) -> Result<FileLun> {
        let open_err = |what: &str, cause| LunError::Open {
            lun: name.to_string(),
            what: what.to_string(),
            cause,
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
        // Through /proc, so it is the same file even if the path was
        // renamed meanwhile.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| {
                tracing::info!(
                    lun = name,
                    "no direct I/O, data writes go through the page cache: {e}"
                )
            })
            .ok();
        Ok(FileLun {
            name: name.to_string(),
            path: path.to_path_buf(),
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
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
            cause: e,
        })?;
        f.set_len(size).map_err(|e| LunError::Open {
            lun: name.clone(),
            what: "cannot size".into(),
            cause: e,
        })?;
        drop(f);
        FileLun::open(path, &name)
    }

    fn io_err(&self, offset: u64, len: u64, cause: std::io::Error) -> LunError {
        LunError::Io {
            lun: self.name.clone(),
            offset,
            len,
            cause,
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

    /// How much of a write of `len` bytes at `offset` goes direct: the
    /// aligned middle `(skip, n)` after an unaligned head of `skip` bytes,
    /// if it is at least [`DIRECT_MIN`] long and this LUN has direct I/O.
    ///
    /// Head and tail stay buffered. They exist because FUSE splits a write
    /// from an unaligned buffer at page boundaries of that buffer: a 1 MiB
    /// write arrives as 1 MiB - 48 bytes and then 48 bytes.
    fn direct_part(&self, len: usize, offset: u64) -> Option<(&File, usize, usize)> {
        let direct = self.direct.as_ref()?;
        if len < DIRECT_MIN || !self.direct_ok.load(Ordering::Relaxed) {
            return None;
        }
        let align = self.direct_align() as u64;
        let skip = (offset.next_multiple_of(align) - offset) as usize;
        let n = (len.checked_sub(skip)? as u64 / align * align) as usize;
        (n >= DIRECT_MIN).then_some((direct, skip, n))
    }

    fn write_buffered(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err(offset, buf.len() as u64, e))
    }

    fn direct_align(&self) -> usize {
        DIRECT_ALIGN.max(self.block_size as usize)
    }

    /// Write `buf` at `offset` through `direct`: straight from `buf` when it
    /// is aligned, else a piece at a time through this thread's bounce
    /// buffer. Offset and length are aligned (see `direct_part`).
    fn write_direct(&self, direct: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let align = self.direct_align();
        if (buf.as_ptr() as usize).is_multiple_of(align) {
            return direct.write_all_at(buf, offset);
        }
        BOUNCE_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let bounce = b.get_or_insert_with(Bounce::new).as_mut();
            let mut done = 0;
            while done < buf.len() {
                let n = (buf.len() - done).min(BOUNCE);
                bounce[..n].copy_from_slice(&buf[done..done + n]);
                direct.write_all_at(&bounce[..n], offset + done as u64)?;
                done += n;
            }
            Ok(())
        })
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
        if let Some((direct, skip, n)) = self.direct_part(buf.len(), offset) {
            let at = offset + skip as u64;
            match self.write_direct(direct, &buf[skip..skip + n], at) {
                Ok(()) => {
                    self.write_buffered(&buf[..skip], offset)?;
                    return self.write_buffered(&buf[skip + n..], at + n as u64);
                }
                // The filesystem opened the file for direct I/O but refuses
                // this alignment (a block larger than we assumed, a
                // filesystem that only pretends): buffered from now on.
                // Rewriting the whole range buffered is safe; a direct write
                // that failed part-way left nothing the rewrite does not
                // cover.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        lun = self.name,
                        offset = at,
                        "direct write refused ({e}); writing through the page cache from now on"
                    );
                }
                Err(e) => return Err(self.io_err(at, n as u64, e)),
            }
        }
        self.write_buffered(buf, offset)
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

    /// How many pages of `f` in `[off, off + len)` are in the page cache.
    fn cached_pages(f: &File, off: u64, len: usize) -> usize {
        let page = 4096;
        // SAFETY: a read-only shared mapping of a file we hold open, only
        // asked about (mincore), never read; unmapped before returning.
        unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                off as libc::off_t,
            );
            assert_ne!(m, libc::MAP_FAILED);
            let mut v = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(m, len, v.as_mut_ptr()), 0);
            libc::munmap(m, len);
            v.iter().filter(|&&b| b & 1 != 0).count()
        }
    }

    #[test]
    fn large_writes_go_around_the_page_cache_and_read_back() {
        // /var/tmp is a disk filesystem on most machines; the temp dir may
        // be tmpfs, whose direct I/O goes through its page cache anyway.
        let dir = tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let p = dir.path().join("d.img");
        let size = 16usize << 20;
        let lun = FileLun::create(&p, size as u64).unwrap();
        let mut expect = vec![0u8; size];
        let mut aligned = vec![0u8; (1 << 20) + 4096];
        let a = aligned.as_ptr().align_offset(4096);
        // (offset, length): from an aligned buffer; from an unaligned one
        // (bounce buffer); an unaligned head and tail around a middle longer
        // than the bounce buffer; one too short to go direct.
        let cases: [(usize, usize); 4] = [
            (0, 1 << 20),
            (1 << 20, 1 << 20),
            ((3 << 20) + 100, (5 << 20) + 7),
            (12 << 20, 64 << 10),
        ];
        for (k, &(off, len)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k as u8 + 1))
                .collect();
            if k == 0 {
                aligned[a..a + len].copy_from_slice(&data);
                lun.write_at(&aligned[a..a + len], off as u64).unwrap();
            } else {
                lun.write_at(&data, off as u64).unwrap();
            }
            expect[off..off + len].copy_from_slice(&data);
        }
        // SAFETY: statfs fills a plain struct through a valid path.
        let tmpfs = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
        };
        if !tmpfs {
            assert!(
                lun.direct.is_some(),
                "no O_DIRECT descriptor on a disk filesystem"
            );
            let f = &lun.file;
            // The direct middles left nothing cached...
            assert_eq!(cached_pages(f, 0, 2 << 20), 0);
            assert_eq!(cached_pages(f, (3 << 20) + 4096, (5 << 20) - 4096), 0);
            // ...the head and tail pages and the short write went through
            // the cache.
            assert_eq!(cached_pages(f, 3 << 20, 4096), 1);
            assert_eq!(cached_pages(f, 8 << 20, 4096), 1);
            assert_eq!(cached_pages(f, 12 << 20, 64 << 10), 16);
        }
        // Read back here and through another open of the file, as another
        // host on this machine would.
        let other = FileLun::open(&p, "other").unwrap();
        for l in [&lun, &other] {
            let mut got = vec![0u8; size];
            l.read_at(&mut got, 0).unwrap();
            assert!(got == expect, "{} read back other bytes", l.name);
        }
    }
}
