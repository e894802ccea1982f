//! Read-only raw image files in a FUSE mount ([`ImagesFs`], over any
//! [`Export`]s): a stored backup's disks (`vmfs backup mount`: each chunk
//! fetched when first read and kept in a cache, so `losetup -r -P` and
//! `mount -o ro` browse a guest's files without a full restore) and a
//! VM's frozen disks (`vmfs backup attach`). `lseek(SEEK_DATA/SEEK_HOLE)`
//! and the block count tell where the data is.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyLseek,
    ReplyOpen, Request, SessionACL,
};

use crate::error::{BackupError, Result};
use crate::export::{DataMap, Export, ReadImage};
use crate::index::{Digest, Index, ZERO};
use crate::manifest::Manifest;
use crate::repo::Repo;

const TTL: Duration = Duration::from_secs(3600);
/// Chunks kept decoded (4 MiB each by default), for all of a backup's disks.
const CACHE_CHUNKS: usize = 64;

struct Cache {
    map: HashMap<Digest, (Arc<Vec<u8>>, u64)>,
    tick: u64,
}

/// Decoded chunks of one repository, the least recently read dropped first.
struct ChunkCache {
    repo: Arc<Repo>,
    cache: Mutex<Cache>,
}

impl ChunkCache {
    fn chunk(&self, d: &Digest) -> Result<Arc<Vec<u8>>> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.tick += 1;
            let t = c.tick;
            if let Some(e) = c.map.get_mut(d) {
                e.1 = t;
                return Ok(e.0.clone());
            }
        }
        let data = Arc::new(self.repo.get_chunk(d)?);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.map.len() >= CACHE_CHUNKS {
            if let Some(old) = c.map.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                c.map.remove(&old);
            }
        }
        let t = c.tick;
        c.map.insert(*d, (data.clone(), t));
        Ok(data)
    }
}

/// One disk of a stored backup, read chunk by chunk from the repository.
struct RepoImage {
    chunks: Arc<ChunkCache>,
    index: Index,
}

impl ReadImage for RepoImage {
    fn size(&self) -> u64 {
        self.index.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let idx = &self.index;
        let end = (off + buf.len() as u64).min(idx.size);
        let cs = idx.chunk_size as u64;
        let mut pos = off;
        while pos < end {
            let i = (pos / cs) as usize;
            let r = idx.range(i);
            let upto = end.min(r.end);
            let d = &idx.digests[i];
            let dst = &mut buf[(pos - off) as usize..(upto - off) as usize];
            if *d == ZERO {
                dst.fill(0);
            } else {
                let c = self.chunks.chunk(d)?;
                let a = (pos - r.start) as usize;
                let b = (upto - r.start) as usize;
                let part = c.get(a..b).ok_or_else(|| {
                    crate::error::corrupt(
                        crate::repo::chunk_key(d),
                        "shorter than its place in the index",
                    )
                })?;
                dst.copy_from_slice(part);
            }
            pos = upto;
        }
        let past = (end.saturating_sub(off) as usize).min(buf.len());
        buf[past..].fill(0);
        Ok(())
    }
}

/// Backup `m`'s disks as exports (`NAME` each, the file `NAME.img`); the
/// chunks that are all zeros are holes.
pub fn backup_exports(repo: Arc<Repo>, m: &Manifest) -> Result<Vec<Export>> {
    let chunks = Arc::new(ChunkCache {
        repo: repo.clone(),
        cache: Mutex::new(Cache {
            map: HashMap::new(),
            tick: 0,
        }),
    });
    let mut out = Vec::new();
    for d in &m.disks {
        let index = repo.index(d)?;
        let data = (0..index.digests.len())
            .filter(|&i| index.digests[i] != ZERO)
            .map(|i| index.range(i))
            .collect();
        out.push(Export {
            name: d.name.clone(),
            map: Arc::new(DataMap::new(index.size, data)),
            image: Arc::new(RepoImage {
                chunks: chunks.clone(),
                index,
            }),
        });
    }
    Ok(out)
}

/// Read-only raw image files, one per export, in one directory.
pub struct ImagesFs {
    /// Emptied by [`Mounted::unmount`] when the mount outlives its
    /// unmounting (a file still open): the images are let go at once.
    exports: Arc<std::sync::RwLock<Vec<Export>>>,
    time: std::time::SystemTime,
    /// Who mounted it: the files' owner.
    uid: u32,
    gid: u32,
}

impl ImagesFs {
    /// `exports` as files dated `time`.
    pub fn new(exports: Vec<Export>, time: std::time::SystemTime) -> ImagesFs {
        // SAFETY: geteuid and getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        ImagesFs {
            exports: Arc::new(std::sync::RwLock::new(exports)),
            time,
            uid,
            gid,
        }
    }

    fn exports(&self) -> std::sync::RwLockReadGuard<'_, Vec<Export>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    fn export(&self, ino: u64) -> Option<Export> {
        (ino as usize)
            .checked_sub(2)
            .and_then(|k| self.exports().get(k).cloned())
    }

    /// Readable by whoever mounted it alone (root, as a rule): a disk's
    /// bytes are every file of the guest, whatever their modes inside.
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink, blocks) = if ino == 1 {
            (FileType::Directory, 0, 0o500, 2, 0)
        } else {
            let e = self.export(ino)?;
            let size = e.map.size();
            // What may hold data, so `du` and `stat` tell a sparse image.
            (
                FileType::RegularFile,
                size,
                0o400,
                1,
                e.map.data_bytes().div_ceil(512),
            )
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 16,
            flags: 0,
        })
    }

    /// Read `len` bytes at `off` of export `k` (short at the end).
    fn read_export(&self, k: &Export, off: u64, len: usize) -> Result<Vec<u8>> {
        let end = (off + len as u64).min(k.map.size());
        let mut out = vec![0u8; end.saturating_sub(off) as usize];
        let mut at = 0usize;
        for (l, data) in k.map.extents(off, out.len() as u64, usize::MAX) {
            if data {
                k.image
                    .read_at(&mut out[at..at + l as usize], off + at as u64)?;
            }
            at += l as usize;
        }
        Ok(out)
    }
}

impl Filesystem for ImagesFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        let found = self
            .exports()
            .iter()
            .position(|e| OsStr::new(&e.file_name()) == name);
        match found {
            Some(k) => match self.attr(k as u64 + 2) {
                Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if self.attr(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(k) = self.export(ino.0) else {
            // The directory; or an image let go (unmounted while open).
            return reply.error(if ino.0 == 1 {
                Errno::EISDIR
            } else {
                Errno::EIO
            });
        };
        match self.read_export(&k, offset, size as usize) {
            Ok(v) => reply.data(&v),
            Err(e) => {
                tracing::error!("{}: read at {offset}: {e}", k.file_name());
                reply.error(Errno::EIO)
            }
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let (Some(k), Ok(off)) = (self.export(ino.0), u64::try_from(offset)) else {
            return reply.error(Errno::EINVAL);
        };
        let r = match whence {
            libc::SEEK_DATA => k.map.seek_data(off),
            libc::SEEK_HOLE => k.map.seek_hole(off),
            _ => return reply.error(Errno::EINVAL),
        };
        match r {
            Some(o) => reply.offset(o as i64),
            None => reply.error(Errno::ENXIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok()
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let mut list = vec![
            (1u64, FileType::Directory, ".".to_string()),
            (1, FileType::Directory, "..".into()),
        ];
        for (k, e) in self.exports().iter().enumerate() {
            list.push((k as u64 + 2, FileType::RegularFile, e.file_name()));
        }
        for (i, (ino, kind, name)) in list.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, OsStr::new(&name)) {
                break;
            }
        }
        reply.ok()
    }
}

/// A mounted [`ImagesFs`].
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    /// The kernel's number for this FUSE connection
    /// (`/sys/fs/fuse/connections/N`): the minor of the mount's device.
    connection: Option<u64>,
    /// Unmounted (lazily), the session perhaps still alive.
    detached: bool,
    exports: Arc<std::sync::RwLock<Vec<Export>>>,
}

/// Mount `fs` read-only on `mountpoint`, named `fsname` in the mount table.
pub fn mount(fs: ImagesFs, fsname: &str, mountpoint: &Path) -> Result<Mounted> {
    let exports = fs.exports.clone();
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("vmfs-backup".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
    ];
    // SAFETY: geteuid has no preconditions.
    cfg.acl = if unsafe { libc::geteuid() } == 0 {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(4);
    let session = fuser::spawn_mount(fs, mountpoint, &cfg).map_err(|e| {
        BackupError::Invalid(format!("cannot mount on {}: {e}", mountpoint.display()))
    })?;
    let connection = std::os::unix::fs::MetadataExt::dev(
        &std::fs::metadata(mountpoint)
            .map_err(|e| BackupError::Invalid(format!("{}: {e}", mountpoint.display())))?,
    );
    Ok(Mounted {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        connection: Some(libc::minor(connection) as u64),
        detached: false,
        exports,
    })
}

impl Mounted {
    /// Unmount and wait for the filesystem to be dropped. Not `lazy`: Err
    /// while a process uses the mount (it stays mounted); `lazy`: detached
    /// now, gone when its last user leaves.
    pub fn unmount(&mut self, lazy: bool) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // Not when it has gone already (someone unmounted it), nor twice: the
        // path may hold another filesystem by now.
        if !session.guard.is_finished() && !self.detached {
            let mut c = std::process::Command::new("fusermount3");
            c.arg("-u");
            if lazy {
                c.arg("-z");
            }
            let o = c.arg(&self.mountpoint).output();
            let failed = match o {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
                Err(e) => Some(format!("fusermount3: {e}")),
            };
            if let Some(why) = failed {
                if !session.guard.is_finished() {
                    self.session = Some(session);
                    return Err(BackupError::Invalid(format!(
                        "cannot unmount {}: {why}",
                        self.mountpoint.display()
                    )));
                }
            }
            self.detached = true;
        }
        // Detached lazily, the connection lives on while a file is open
        // (a loop device, say): abort it, so those files fail from now on
        // and the images are let go.
        if lazy && !session.guard.is_finished() {
            if let Some(c) = self.connection {
                let _ = std::fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1");
            }
        }
        // The images are let go here whatever happens next (this handle
        // shares them with the filesystem).
        self.exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // Unmounted for good: the session ends as soon as the kernel says so.
        if !lazy {
            return session.join().map_err(|e| {
                BackupError::Invalid(format!("FUSE session ended with an error: {e}"))
            });
        }
        let t = std::time::Instant::now();
        while !session.guard.is_finished() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !session.guard.is_finished() {
            // Still in use (and no fusectl to abort it): its files fail
            // from now on (the images were let go above), and the session
            // ends on its own when its last user closes.
            tracing::warn!(
                "{}: unmounted while a file of it is open; that file reads nothing more",
                self.mountpoint.display()
            );
            std::thread::spawn(move || {
                let _ = session.join();
            });
            return Ok(());
        }
        session
            .join()
            .map_err(|e| BackupError::Invalid(format!("FUSE session ended with an error: {e}")))
    }

    /// Whether it was unmounted (by [`Mounted::unmount`]).
    pub fn is_unmounted(&self) -> bool {
        self.session.is_none()
    }

    /// Wait until `stop` fires (then unmount, lazily) or someone unmounts it.
    pub fn wait(mut self, stop: std::sync::mpsc::Receiver<()>) -> Result<()> {
        loop {
            if stop.recv_timeout(Duration::from_millis(200)).is_ok() {
                return self.unmount(true);
            }
            if self.session.as_ref().is_none_or(|s| s.guard.is_finished()) {
                return self.unmount(true);
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.unmount(true);
    }
}

/// Mount backup `m` read-only on `mountpoint` until `stop` fires (then
/// unmount) or someone unmounts it.
pub fn serve(
    repo: Arc<Repo>,
    m: &Manifest,
    mountpoint: &Path,
    stop: std::sync::mpsc::Receiver<()>,
) -> Result<()> {
    let time = UNIX_EPOCH + Duration::from_secs(m.finished.max(0) as u64);
    let fs = ImagesFs::new(backup_exports(repo, m)?, time);
    mount(fs, &format!("vmfs-backup:{}", m.id), mountpoint)?.wait(stop)
}
