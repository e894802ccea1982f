//! `vmfs backup mount`: a backup's disks as read-only raw image files in
//! a FUSE mount, each chunk fetched when first read and kept in a cache,
//! so `losetup -r -P` and `mount -o ro` browse a guest's files without a
//! full restore.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
    SessionACL,
};

use crate::error::{BackupError, Result};
use crate::index::{Digest, Index, ZERO};
use crate::manifest::Manifest;
use crate::repo::Repo;

const TTL: Duration = Duration::from_secs(3600);
/// Chunks kept decoded (4 MiB each by default).
const CACHE_CHUNKS: usize = 64;

struct Image {
    name: String,
    index: Index,
}

struct Cache {
    map: HashMap<Digest, (Arc<Vec<u8>>, u64)>,
    tick: u64,
}

pub struct BackupFs {
    repo: Arc<Repo>,
    images: Vec<Image>,
    time: std::time::SystemTime,
    cache: Mutex<Cache>,
}

impl BackupFs {
    pub fn new(repo: Arc<Repo>, m: &Manifest) -> Result<BackupFs> {
        let mut images = Vec::new();
        for d in &m.disks {
            images.push(Image {
                name: format!("{}.img", d.name),
                index: repo.index(d)?,
            });
        }
        Ok(BackupFs {
            repo,
            images,
            time: UNIX_EPOCH + Duration::from_secs(m.finished.max(0) as u64),
            cache: Mutex::new(Cache {
                map: HashMap::new(),
                tick: 0,
            }),
        })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == 1 {
            (FileType::Directory, 0, 0o555, 2)
        } else {
            let im = self.images.get(ino as usize - 2)?;
            (FileType::RegularFile, im.index.size, 0o444, 1)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 1 << 16,
            flags: 0,
        })
    }

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

    /// Read `[off, off+len)` of image `im`.
    pub fn read_image(&self, im: usize, off: u64, len: usize) -> Result<Vec<u8>> {
        let idx = &self.images[im].index;
        let end = (off + len as u64).min(idx.size);
        let mut out = Vec::with_capacity(end.saturating_sub(off) as usize);
        let cs = idx.chunk_size as u64;
        let mut pos = off;
        while pos < end {
            let i = (pos / cs) as usize;
            let r = idx.range(i);
            let upto = end.min(r.end);
            let d = &idx.digests[i];
            if *d == ZERO {
                out.resize(out.len() + (upto - pos) as usize, 0);
            } else {
                let c = self.chunk(d)?;
                let a = (pos - r.start) as usize;
                let b = (upto - r.start) as usize;
                let part = c.get(a..b).ok_or_else(|| {
                    crate::error::corrupt(
                        crate::repo::chunk_key(d),
                        "shorter than its place in the index",
                    )
                })?;
                out.extend_from_slice(part);
            }
            pos = upto;
        }
        Ok(out)
    }
}

impl Filesystem for BackupFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        match self.images.iter().position(|i| OsStr::new(&i.name) == name) {
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
        let Some(k) = (ino.0 as usize)
            .checked_sub(2)
            .filter(|k| *k < self.images.len())
        else {
            return reply.error(Errno::EISDIR);
        };
        match self.read_image(k, offset, size as usize) {
            Ok(v) => reply.data(&v),
            Err(e) => {
                tracing::error!("{}: read at {offset}: {e}", self.images[k].name);
                reply.error(Errno::EIO)
            }
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
        for (k, im) in self.images.iter().enumerate() {
            list.push((k as u64 + 2, FileType::RegularFile, im.name.clone()));
        }
        for (i, (ino, kind, name)) in list.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, OsStr::new(&name)) {
                break;
            }
        }
        reply.ok()
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
    let fs = BackupFs::new(repo, m)?;
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("vmfs-backup:{}", m.id)),
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
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(session.join());
    });
    loop {
        if stop.recv_timeout(Duration::from_millis(200)).is_ok() {
            let _ = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(mountpoint)
                .status();
        }
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(r) => {
                let _ = waiter.join();
                return r.map_err(|e| {
                    BackupError::Invalid(format!("FUSE session ended with an error: {e}"))
                });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => return Ok(()),
        }
    }
}
