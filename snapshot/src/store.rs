//! The seam under the virtual-disk code: a directory of files
//! ([`Store`]) and a file in it ([`DiskFile`]). [`VmfsStore`] is a
//! directory of the datastore through the vmfs file API (what the host
//! uses); [`LocalStore`] is a local directory (tests against `qemu-img` on
//! local files, import and export). The disk code knows nothing else.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::StoreError;

pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// One open file of a disk (a descriptor or an extent).
pub trait DiskFile: Send + Sync {
    /// Read into `buf` at `off`; short only at the end of the file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> StoreResult<usize>;
    /// Write all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> StoreResult<()>;
    fn len(&self) -> StoreResult<u64>;
    fn set_len(&self, len: u64) -> StoreResult<()>;
    /// Make what was written durable.
    fn flush(&self) -> StoreResult<()>;
    /// Deallocate `[off, off+len)` (reads zeros, the length unchanged).
    fn punch_hole(&self, off: u64, len: u64) -> StoreResult<()>;
    /// Allocate `[off, off+len)` (reads zeros where it was a hole),
    /// extending the file when it ends past it.
    fn allocate(&self, off: u64, len: u64) -> StoreResult<()>;
    /// The ranges of `[off, off+len)` that hold data, in order.
    fn allocated(&self, off: u64, len: u64) -> StoreResult<Vec<Range<u64>>>;
    /// When the file's data last changed (seconds, nanoseconds).
    fn modified(&self) -> StoreResult<(i64, u32)>;

    /// Read exactly `buf.len()` bytes; bytes past the end read as zeros.
    fn read_full(&self, buf: &mut [u8], off: u64) -> StoreResult<()> {
        let n = self.read_at(buf, off)?;
        buf[n..].fill(0);
        Ok(())
    }
}

/// A directory that holds a disk's files. Names are plain file names (no
/// `/`): a chain lives in one directory.
pub trait Store: Send + Sync {
    /// Open an existing file, for writing or read-only.
    fn open(&self, name: &str, write: bool) -> StoreResult<Arc<dyn DiskFile>>;
    /// Create a new file (an error if it exists), open for writing.
    fn create(&self, name: &str) -> StoreResult<Arc<dyn DiskFile>>;
    /// Rename, replacing `to` if it exists (atomically).
    fn rename(&self, from: &str, to: &str) -> StoreResult<()>;
    fn remove(&self, name: &str) -> StoreResult<()>;
    fn exists(&self, name: &str) -> StoreResult<bool>;
    /// Remove `name` if it is there (a leftover of an interrupted
    /// operation, or a file about to be made afresh).
    fn remove_if_there(&self, name: &str) -> StoreResult<()> {
        match self.remove(name) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }
    /// Where the files are, for messages.
    fn describe(&self, name: &str) -> String;
    /// Whether `name` is marked for writing by several hosts at once (a
    /// shared disk's extents); opens for writing then take that lock mode.
    fn multi_writer(&self, _name: &str) -> StoreResult<bool> {
        Ok(false)
    }
    /// Mark (or unmark) `name` multi-writer; not open for writing here.
    fn set_multi_writer(&self, name: &str, _on: bool) -> StoreResult<()> {
        Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!(
                "{}: only a datastore has multi-writer files",
                self.describe(name)
            ),
        )))
    }
}

// ---------------------------------------------------------------- local

/// A local directory.
pub struct LocalStore {
    dir: PathBuf,
}

impl LocalStore {
    pub fn new(dir: impl Into<PathBuf>) -> LocalStore {
        LocalStore { dir: dir.into() }
    }
}

struct LocalFile(std::fs::File);

fn errno_result(r: libc::c_int) -> StoreResult<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().into())
    }
}

impl DiskFile for LocalFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> StoreResult<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.0.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> StoreResult<()> {
        Ok(self.0.write_all_at(buf, off)?)
    }
    fn len(&self) -> StoreResult<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> StoreResult<()> {
        Ok(self.0.set_len(len)?)
    }
    fn flush(&self) -> StoreResult<()> {
        Ok(self.0.sync_data()?)
    }
    fn punch_hole(&self, off: u64, len: u64) -> StoreResult<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a valid descriptor and plain integers.
        errno_result(unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        })
    }
    fn allocate(&self, off: u64, len: u64) -> StoreResult<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: as above.
        errno_result(unsafe { libc::fallocate(self.0.as_raw_fd(), 0, off as i64, len as i64) })
    }
    fn allocated(&self, off: u64, len: u64) -> StoreResult<Vec<Range<u64>>> {
        let end = off.saturating_add(len).min(self.len()?);
        let fd = self.0.as_raw_fd();
        let seek = |at: u64, whence| -> Option<u64> {
            // SAFETY: a valid descriptor.
            let r = unsafe { libc::lseek(fd, at as i64, whence) };
            (r >= 0).then_some(r as u64)
        };
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = off;
        while pos < end {
            let Some(d) = seek(pos, libc::SEEK_DATA) else {
                break;
            };
            if d >= end {
                break;
            }
            let h = seek(d, libc::SEEK_HOLE).unwrap_or(end).min(end);
            out.push(d..h);
            pos = h;
        }
        Ok(out)
    }
    fn modified(&self) -> StoreResult<(i64, u32)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.0.metadata()?;
        Ok((m.mtime(), m.mtime_nsec() as u32))
    }
}

impl Store for LocalStore {
    fn open(&self, name: &str, write: bool) -> StoreResult<Arc<dyn DiskFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(self.dir.join(name))?;
        Ok(Arc::new(LocalFile(f)))
    }
    fn create(&self, name: &str) -> StoreResult<Arc<dyn DiskFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))?;
        Ok(Arc::new(LocalFile(f)))
    }
    fn rename(&self, from: &str, to: &str) -> StoreResult<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))?;
        // The rename itself durable: the directory synced.
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
    fn remove(&self, name: &str) -> StoreResult<()> {
        Ok(std::fs::remove_file(self.dir.join(name))?)
    }
    fn exists(&self, name: &str) -> StoreResult<bool> {
        Ok(self.dir.join(name).try_exists()?)
    }
    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

// ---------------------------------------------------------------- vmfs

/// A directory of a datastore, through the vmfs file API: the host's view.
pub struct VmfsStore {
    fs: Arc<vmfs::Fs>,
    /// The directory inside the datastore ("" for the root).
    dir: String,
}

impl VmfsStore {
    pub fn new(fs: Arc<vmfs::Fs>, dir: &str) -> VmfsStore {
        VmfsStore {
            fs,
            dir: dir.trim_matches('/').to_string(),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.dir.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.dir)
        }
    }
}

struct VmfsFile(vmfs::File);

impl DiskFile for VmfsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> StoreResult<usize> {
        Ok(self.0.read_at(buf, off)?)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> StoreResult<()> {
        Ok(self.0.write_at(buf, off)?)
    }
    fn len(&self) -> StoreResult<u64> {
        Ok(self.0.len()?)
    }
    fn set_len(&self, len: u64) -> StoreResult<()> {
        Ok(self.0.set_len(len)?)
    }
    fn flush(&self) -> StoreResult<()> {
        Ok(self.0.flush()?)
    }
    fn punch_hole(&self, off: u64, len: u64) -> StoreResult<()> {
        Ok(self.0.punch_hole(off, len)?)
    }
    fn allocate(&self, off: u64, len: u64) -> StoreResult<()> {
        Ok(self.0.allocate(off, len)?)
    }
    fn allocated(&self, off: u64, len: u64) -> StoreResult<Vec<Range<u64>>> {
        Ok(self.0.allocated(off, len)?)
    }
    fn modified(&self) -> StoreResult<(i64, u32)> {
        Ok(self.0.fs().getattr(self.0.ino())?.mtime)
    }
}

impl Store for VmfsStore {
    fn open(&self, name: &str, write: bool) -> StoreResult<Arc<dyn DiskFile>> {
        let mode = match write {
            false => vmfs::LockMode::ReadOnly,
            true if self.multi_writer(name)? => vmfs::LockMode::MultiWriter,
            true => vmfs::LockMode::Exclusive,
        };
        Ok(Arc::new(VmfsFile(
            self.fs.open_path(&self.path(name), mode)?,
        )))
    }
    fn create(&self, name: &str) -> StoreResult<Arc<dyn DiskFile>> {
        let f = self
            .fs
            .create_file(&self.path(name), 0o600, vmfs::LockMode::Exclusive)?;
        Ok(Arc::new(VmfsFile(f)))
    }
    fn rename(&self, from: &str, to: &str) -> StoreResult<()> {
        self.fs.rename_path(&self.path(from), &self.path(to))?;
        // The rename is committed before this returns: it is the commit
        // point of snapshot, revert and consolidate.
        self.fs.sync()?;
        Ok(())
    }
    fn remove(&self, name: &str) -> StoreResult<()> {
        Ok(self.fs.unlink_path(&self.path(name))?)
    }
    fn exists(&self, name: &str) -> StoreResult<bool> {
        match self.fs.resolve(&self.path(name)) {
            Ok(_) => Ok(true),
            Err(e) if e.fault() == vmfs::Fault::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    fn describe(&self, name: &str) -> String {
        format!("datastore:/{}", self.path(name))
    }
    fn multi_writer(&self, name: &str) -> StoreResult<bool> {
        let ino = self.fs.resolve(&self.path(name))?;
        Ok(self.fs.getattr(ino)?.flags & vmfs::format::FD_FLAG_MULTI_WRITER != 0)
    }
    fn set_multi_writer(&self, name: &str, on: bool) -> StoreResult<()> {
        let ino = self.fs.resolve(&self.path(name))?;
        Ok(self.fs.set_multi_writer(ino, on)?)
    }
}
