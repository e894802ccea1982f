//! The file API: files on the datastore as this host reads and writes them,
//! without FUSE in the data path. The floors above (virtual disks, the
//! paravirtual SCSI backend, the backup proxy) use only this; the FUSE
//! adapter is its first client.
//!
//! ```no_run
//! # fn f(fs: std::sync::Arc<vmfs::Fs>) -> vmfs::Result<()> {
//! use vmfs::file::LockMode;
//! let f = fs.create_file("vm1/disk-flat.vmdk", 0o600, LockMode::Exclusive)?;
//! f.set_len(10 << 30)?;                    // thin: a 10 GiB hole
//! f.write_at(&[1u8; 4096], 1 << 20)?;      // allocates one block
//! f.flush()?;                              // the fsync rule: metadata committed, LUNs flushed
//! let mut buf = [0u8; 4096];
//! f.read_at(&mut buf, 1 << 20)?;           // many threads may do this at once
//! assert_eq!(f.allocated(0, f.len()?)?.len(), 1);
//! # Ok(()) }
//! ```
//!
//! **Locks.** Opening takes the file's on-disk lock for this host in the
//! mode asked ([`LockMode`]); a file another host holds in a mode that
//! excludes it is refused with [`FsError::Busy`] naming that host. Opens of
//! one file on this host share one lock (the strongest asked) until the last
//! [`File`] is dropped.
//!
//! **Data path.** [`File::read_at`] and [`File::write_at`] of blocks the
//! file already has go from the caller's buffer to the LUN under the file's
//! data lock only (shared), with no allocation and no filesystem-wide lock
//! ([`crate::leafmap`]); anything that allocates, extends or meets a block
//! not yet known runs as one metadata transaction first.
//!
//! **Durability** (the fsync rule): a write is on the LUN when `write_at`
//! returns, but a write that allocated is durable only after [`File::flush`]
//! (or the next periodic commit), which commits the metadata and flushes the
//! LUNs' write caches.

use std::sync::Arc;

use crate::error::{Fault, FsError, Result};
use crate::format::*;
use crate::fs::Fs;
use crate::leafmap::FileData;

/// How a file is opened, as the on-disk lock mode it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// One host reads and writes (VMFS's exclusive lock).
    Exclusive,
    /// Any number of hosts read; nobody writes.
    ReadOnly,
    /// Several hosts write (a clustered guest's shared disk). The file must
    /// be marked multi-writer ([`Fs::set_multi_writer`]).
    MultiWriter,
}

impl LockMode {
    pub fn writes(self) -> bool {
        self != LockMode::ReadOnly
    }
}

/// An allocated range of a file: bytes `[start, end)` hold data (everything
/// else reads as zeros).
pub type Range = std::ops::Range<u64>;

/// An open file of the datastore. Cheap to share between threads
/// (`Arc<File>`); every method takes `&self`. Dropping the last handle of a
/// file on this host releases its lock (and frees it if it was unlinked).
pub struct File {
    fs: Arc<Fs>,
    ino: u64,
    mode: LockMode,
    data: Arc<FileData>,
    /// For error messages.
    name: String,
    /// Released by [`File::close`].
    closed: bool,
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("ino", &format_args!("{:#x}", self.ino))
            .field("mode", &self.mode)
            .field("name", &self.name)
            .finish()
    }
}

impl File {
    /// Open file descriptor `ino` (FUSE's handles; others open by path).
    pub fn open_ino(fs: &Arc<Fs>, ino: u64, mode: LockMode, name: String) -> Result<File> {
        fs.open_file_as(ino, mode.writes(), Some(mode))?;
        Ok(File {
            fs: fs.clone(),
            ino,
            mode,
            data: fs.file_data(ino),
            name,
            closed: false,
        })
    }

    /// Open as FUSE opens: the lock mode follows the file's multi-writer
    /// mark (`write`: exclusive, or multi-writer when marked).
    pub(crate) fn open_posix(fs: &Arc<Fs>, ino: u64, write: bool) -> Result<(File, Inode)> {
        let i = fs.open_file_as(ino, write, None)?;
        let mode = match (write, i.flags & FD_FLAG_MULTI_WRITER != 0) {
            (false, _) => LockMode::ReadOnly,
            (true, false) => LockMode::Exclusive,
            (true, true) => LockMode::MultiWriter,
        };
        let f = File {
            fs: fs.clone(),
            ino,
            mode,
            data: fs.file_data(ino),
            name: format!("file {ino:#x}"),
            closed: false,
        };
        Ok((f, i))
    }

    /// Close, saying whether releasing the lock (or freeing an unlinked
    /// file) failed; dropping does the same and logs a failure.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.fs.release(self.ino, self.mode.writes())
    }

    /// The file's descriptor address (its inode number).
    pub fn ino(&self) -> u64 {
        self.ino
    }

    pub fn mode(&self) -> LockMode {
        self.mode
    }

    pub fn fs(&self) -> &Arc<Fs> {
        &self.fs
    }

    /// Read into `buf` at `off`; returns the bytes read (short only at the
    /// end of the file). Holes read as zeros.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        self.fs.read_with(&self.data, self.ino, off, buf)
    }

    /// Read exactly `buf.len()` bytes at `off` (an error past the end).
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let n = self.read_at(buf, off)?;
        if n < buf.len() {
            return Err(FsError::Invalid(format!(
                "{}: read of {} bytes at {off} ends past its end ({} bytes read)",
                self.name,
                buf.len(),
                n
            )));
        }
        Ok(())
    }

    /// Write all of `data` at `off`, extending the file when it ends past it.
    pub fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        self.check_writable("write")?;
        self.fs
            .write_with(&self.data, self.ino, off, data)
            .map(|_| ())
    }

    /// Whether a write of `len` bytes at `off` needs no block allocated
    /// (so it cannot fail for lack of space).
    pub fn writes_in_place(&self, off: u64, len: usize) -> Result<bool> {
        self.fs.writes_in_place_with(&self.data, self.ino, off, len)
    }

    /// Commit this host's metadata and flush the LUNs (the fsync rule).
    pub fn flush(&self) -> Result<()> {
        self.fs.fsync_file(self.ino)
    }

    /// The file's length in bytes.
    pub fn len(&self) -> Result<u64> {
        Ok(self.fs.getattr(self.ino)?.size)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Set the length: growing leaves a hole, shrinking frees the blocks
    /// past the end (refused while another host has the file open).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable("set the length of")?;
        let a = crate::fs::SetAttr {
            size: Some(len),
            ..Default::default()
        };
        self.fs.setattr(self.ino, &a)?;
        self.fs.changed(crate::fs::Change::Inode { ino: self.ino });
        Ok(())
    }

    /// A raw device mapping opened for writing: send one SCSI command to
    /// its LUN as it is (a physical-mode mapping's pass-through), through
    /// this host's fence. Refused on a file that is no mapping, or whose
    /// LUN speaks no SCSI (a file or NBD LUN).
    pub fn scsi_passthrough(
        &self,
        cdb: &[u8],
        data_out: &[u8],
        data_in: usize,
    ) -> Result<lun::ScsiReply> {
        self.check_writable("pass a SCSI command to")?;
        let Some((l, _)) = self.fs.mapped_lun(self.ino) else {
            return Err(FsError::File(
                crate::error::Fault::NotSupported,
                format!(
                    "{}: not a raw device mapping: no SCSI pass-through",
                    self.name
                ),
            ));
        };
        match l.passthrough(cdb, data_out, data_in) {
            Some(r) => Ok(r?),
            None => Err(FsError::File(
                crate::error::Fault::NotSupported,
                format!(
                    "{}: its LUN {} is no SCSI device: no pass-through",
                    self.name,
                    l.name()
                ),
            )),
        }
    }

    /// Deallocate `[off, off+len)`: whole blocks are freed, partial ones
    /// zeroed; the length does not change.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable("punch a hole in")?;
        if len == 0 {
            return Ok(());
        }
        self.fs.fallocate(
            self.ino,
            off,
            len,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
    }

    /// Make `[off, off+len)` read as zeros with its blocks kept allocated
    /// (unwritten), extending the file when it ends past it.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable("write zeroes to")?;
        if len == 0 {
            return Ok(());
        }
        self.fs
            .fallocate(self.ino, off, len, libc::FALLOC_FL_ZERO_RANGE)
    }

    /// Allocate `[off, off+len)` (reading as zeros where it was a hole),
    /// extending the file when it ends past it: thick provisioning.
    pub fn allocate(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable("allocate")?;
        if len == 0 {
            return Ok(());
        }
        self.fs.fallocate(self.ino, off, len, 0)
    }

    /// The ranges of `[off, off+len)` that hold data, in order (what
    /// SEEK_DATA/SEEK_HOLE walk). Unwritten blocks read as zeros and are
    /// not data.
    pub fn allocated(&self, off: u64, len: u64) -> Result<Vec<Range>> {
        self.fs.allocated(self.ino, off, len)
    }

    /// lseek(SEEK_DATA): the first byte at or after `off` that is data;
    /// None when there is none before the end (ENXIO).
    pub fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        self.fs.seek_data(self.ino, off)
    }

    /// lseek(SEEK_HOLE): the first byte at or after `off` in a hole (the
    /// end of the file counts as one); None when `off` is past the end.
    pub fn seek_hole(&self, off: u64) -> Result<Option<u64>> {
        self.fs.seek_hole(self.ino, off)
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.mode.writes() {
            return Ok(());
        }
        Err(FsError::ReadOnly(format!(
            "cannot {what} {}: it is open read-only",
            self.name
        )))
    }
}

impl Drop for File {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Err(e) = self.fs.release(self.ino, self.mode.writes()) {
            tracing::error!("closing {}: {e}", self.name);
        }
    }
}

/// Path operations: paths are relative to the datastore's root ("a/b",
/// "/a/b" and "./a//b" are the same); `..` and symbolic links are not
/// followed.
impl Fs {
    /// The descriptor of the file at `path`.
    pub fn resolve(&self, path: &str) -> Result<u64> {
        let mut ino = self.root();
        for c in components(path)? {
            ino = self
                .lookup(ino, c.as_bytes())
                .map_err(|e| name_path(e, path))?
                .addr;
        }
        Ok(ino)
    }

    /// The directory that holds `path`, and its last name.
    pub fn parent_path<'p>(&self, path: &'p str) -> Result<(u64, &'p str)> {
        let mut cs = components(path)?;
        let Some(name) = cs.pop() else {
            return Err(FsError::Invalid(format!(
                "{path:?} names the root, not a file"
            )));
        };
        let mut ino = self.root();
        for c in cs {
            ino = self
                .lookup(ino, c.as_bytes())
                .map_err(|e| name_path(e, path))?
                .addr;
        }
        Ok((ino, name))
    }

    /// Open the file at `path` with the lock `mode`.
    pub fn open_path(self: &Arc<Self>, path: &str, mode: LockMode) -> Result<File> {
        let ino = self.resolve(path)?;
        let i = self.getattr(ino)?;
        if i.is_dir() {
            return Err(FsError::File(
                Fault::IsDir,
                format!("{path} is a directory"),
            ));
        }
        File::open_ino(self, ino, mode, path.to_string()).map_err(|e| name_path(e, path))
    }

    /// Create a regular file at `path` (an error if it exists) and open it.
    pub fn create_file(self: &Arc<Self>, path: &str, perm: u32, mode: LockMode) -> Result<File> {
        let (dir, name) = self.parent_path(path)?;
        let (uid, gid) = owner();
        let i = self
            .create(
                dir,
                name.as_bytes(),
                S_IFREG | (perm & 0o7777),
                uid,
                gid,
                0,
                None,
            )
            .map_err(|e| name_path(e, path))?;
        self.entry_changed(dir, name);
        File::open_ino(self, i.addr, mode, path.to_string())
    }

    fn entry_changed(&self, dir: u64, name: &str) {
        self.changed(crate::fs::Change::Entry {
            dir,
            name: name.as_bytes().to_vec(),
        });
        self.changed(crate::fs::Change::Inode { ino: dir });
    }

    /// The hosts holding the file at `path` (its on-disk lock: slot and the
    /// slot's generation when taken; a holder whose slot has moved on
    /// since is stale) and the lock's mode.
    pub fn holders_of(&self, path: &str) -> Result<(locking::Mode, Vec<locking::Holder>)> {
        let ino = self.resolve(path)?;
        let (lun, off) = self.vol().lock_sector(ino)?;
        let rec = locking::read_lock(&*lun, off)?;
        Ok((rec.mode, rec.holders))
    }

    /// Make a directory at `path`.
    pub fn mkdir_path(&self, path: &str, perm: u32) -> Result<()> {
        let (dir, name) = self.parent_path(path)?;
        let (uid, gid) = owner();
        self.create(
            dir,
            name.as_bytes(),
            S_IFDIR | (perm & 0o7777),
            uid,
            gid,
            0,
            None,
        )
        .map_err(|e| name_path(e, path))?;
        self.entry_changed(dir, name);
        Ok(())
    }

    /// Remove the file at `path` (refused while another host has it open;
    /// open here, it lives until its last handle is dropped).
    pub fn unlink_path(&self, path: &str) -> Result<()> {
        let (dir, name) = self.parent_path(path)?;
        self.unlink(dir, name.as_bytes(), false)
            .map_err(|e| name_path(e, path))?;
        self.entry_changed(dir, name);
        Ok(())
    }

    /// Rename `from` to `to`, replacing a file at `to`.
    pub fn rename_path(&self, from: &str, to: &str) -> Result<()> {
        let (fd, fname) = self.parent_path(from)?;
        let (td, tname) = self.parent_path(to)?;
        self.rename(fd, fname.as_bytes(), td, tname.as_bytes(), false, false)
            .map_err(|e| name_path(e, &format!("{from} -> {to}")))?;
        self.entry_changed(fd, fname);
        self.entry_changed(td, tname);
        Ok(())
    }
}

fn owner() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

fn components(path: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(FsError::Invalid(format!(
                    "{path:?}: `..` is not followed in datastore paths"
                )))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Name the path in a bare errno error.
fn name_path(e: FsError, path: &str) -> FsError {
    match e {
        FsError::File(f, m) if !m.contains(path) => FsError::File(f, format!("{path}: {m}")),
        FsError::Busy(m) => FsError::Busy(format!("{path}: {m}")),
        e => e,
    }
}
