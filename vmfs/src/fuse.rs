//! The FUSE front end (fuser): many threads, 1 MiB requests, kernel
//! permission checks (`default_permissions`), and entry/attribute timeouts of
//! one second so that, once several hosts mount one datastore, a change on
//! one is seen by the others within a second.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use crate::error::{Fault, FsError};
use crate::file::File;
use crate::format::*;
use crate::fs::{Fs, SetAttr};
use crate::writebehind::WriteBehind;

/// How long the kernel may trust an entry or attributes: other hosts change
/// the datastore too, and a name they make must be seen within a second.
const TTL: Duration = Duration::from_millis(500);

pub struct VmfsFuse {
    fs: Arc<Fs>,
    dirs: Mutex<HashMap<u64, Vec<(u64, u8, Vec<u8>)>>>,
    next_fh: AtomicU64,
    /// Open files by FUSE handle.
    files: RwLock<HashMap<u64, Handle>>,
    /// Writes answered before they reach the LUN ([`crate::writebehind`]).
    wb: WriteBehind,
    /// Read-ahead of direct-I/O handles, which the kernel does not read
    /// ahead for: per file, where the next sequential read starts and how
    /// far the LUN has been asked to read ahead.
    ahead: Mutex<HashMap<u64, (u64, u64)>>,
}

/// How far a sequential reader of a direct-I/O handle is read ahead.
const READ_AHEAD: u64 = 8 << 20;

/// One open of a file through the mount.
struct Handle {
    file: Arc<File>,
    /// Its writes may be queued (a regular file opened for writing that is
    /// neither multi-writer nor a raw device mapping), and its sequential
    /// reads are read ahead.
    behind: bool,
}

impl Handle {
    fn new(file: File, i: &Inode, write: bool) -> Handle {
        let behind = write
            && i.mode & S_IFMT == S_IFREG
            && i.flags & (crate::format::FD_FLAG_MULTI_WRITER | crate::format::FD_FLAG_RDM) == 0;
        Handle {
            file: Arc::new(file),
            behind,
        }
    }
}

/// The errno of each kind of failure: the one place the crate speaks errno.
pub fn errno(f: Fault) -> i32 {
    match f {
        Fault::NotFound => libc::ENOENT,
        Fault::Exists => libc::EEXIST,
        Fault::NotDir => libc::ENOTDIR,
        Fault::IsDir => libc::EISDIR,
        Fault::NotEmpty => libc::ENOTEMPTY,
        Fault::NameTooLong => libc::ENAMETOOLONG,
        Fault::Invalid => libc::EINVAL,
        Fault::TooBig => libc::EFBIG,
        Fault::NotPermitted => libc::EPERM,
        Fault::NotSupported => libc::EOPNOTSUPP,
        Fault::TooManyLinks => libc::EMLINK,
        Fault::NoDevice => libc::ENXIO,
        Fault::Busy => libc::EBUSY,
        Fault::NoSpace => libc::ENOSPC,
        Fault::BadHandle => libc::EBADF,
        Fault::Io => libc::EIO,
    }
}

/// A FUSE reply's error for `e` (an I/O error is logged: the reply alone
/// says nothing of what failed).
fn reply_errno(e: &FsError) -> Errno {
    let f = e.fault();
    if f == Fault::Io {
        tracing::error!("{e}");
    }
    Errno::from_i32(errno(f))
}

fn done(reply: ReplyEmpty, r: crate::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(reply_errno(&e)),
    }
}

fn data(reply: ReplyData, r: crate::Result<Vec<u8>>) {
    match r {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(reply_errno(&e)),
    }
}

fn systime(t: (i64, u32)) -> SystemTime {
    if t.0 >= 0 {
        UNIX_EPOCH + Duration::new(t.0 as u64, t.1)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.0.unsigned_abs()) + Duration::from_nanos(u64::from(t.1))
    }
}

fn from_systime(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    }
}

fn kind(mode: u32) -> FileType {
    match mode & S_IFMT {
        S_IFDIR => FileType::Directory,
        S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn kind_from_dt(k: u8) -> FileType {
    kind(u32::from(k) << 12)
}

fn time_or_now(t: Option<TimeOrNow>) -> Option<(i64, u32)> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(s) => from_systime(s),
        TimeOrNow::Now => crate::fs::now(),
    })
}

impl VmfsFuse {
    pub fn new(fs: Arc<Fs>) -> VmfsFuse {
        VmfsFuse {
            fs,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            files: RwLock::new(HashMap::new()),
            wb: WriteBehind::new(),
            ahead: Mutex::new(HashMap::new()),
        }
    }

    /// After a read of `len` bytes at `off` through a direct-I/O handle:
    /// if it continues the previous one, keep the LUN reading up to
    /// [`READ_AHEAD`] past it (topped up every half window).
    fn read_ahead(&self, ino: u64, off: u64, len: u64) {
        let (from, to) = {
            let mut m = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
            let e = m.entry(ino).or_insert((0, 0));
            let end = off.saturating_add(len);
            if off != e.0 {
                *e = (end, end);
                return;
            }
            e.0 = end;
            if e.1 >= end.saturating_add(READ_AHEAD / 2) {
                return;
            }
            let from = e.1.max(end);
            e.1 = end.saturating_add(READ_AHEAD);
            (from, e.1)
        };
        self.fs.prefetch(ino, from, to - from);
    }

    /// Keep an open file; its FUSE handle.
    fn keep(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, h);
        FileHandle(fh)
    }

    /// The open file of handle `fh` (and whether its I/O is queued/read ahead).
    fn file(&self, fh: FileHandle) -> Option<(Arc<File>, bool)> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .map(|h| (h.file.clone(), h.behind))
    }

    fn ino(&self, i: INodeNo) -> u64 {
        if i.0 == 1 {
            self.fs.root()
        } else {
            i.0
        }
    }

    fn fuse_ino(&self, addr: u64) -> INodeNo {
        INodeNo(if addr == self.fs.root() { 1 } else { addr })
    }

    fn attr(&self, i: &Inode) -> FileAttr {
        let blocks = if i.layout == Layout::Inline {
            i.size.div_ceil(512)
        } else {
            i.alloc_bytes / 512
        };
        FileAttr {
            ino: self.fuse_ino(i.addr),
            size: i.size,
            blocks,
            atime: systime(i.atime),
            mtime: systime(i.mtime),
            ctime: systime(i.ctime),
            crtime: systime(i.crtime),
            kind: kind(i.mode),
            perm: (i.mode & 0o7777) as u16,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            blksize: 1 << 16,
            flags: 0,
        }
    }

    fn entry(&self, r: crate::Result<Inode>, reply: ReplyEntry) {
        // Attributes of a file with queued writes are read after them.
        let r = r.and_then(|i| {
            if self.wb.busy(i.addr) {
                self.wb.wait_idle(i.addr);
                self.fs.getattr(i.addr)
            } else {
                Ok(i)
            }
        });
        match r {
            Ok(i) => reply.entry(&TTL, &self.attr(&i), Generation(i.generation)),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }
}

impl Filesystem for VmfsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        // Write handles use direct I/O (see `open`); this keeps mmap working
        // on them, and makes the kernel write back and drop cached pages of
        // the range before each direct write (coherence with cached readers).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    /// The kernel let go of the mount. The datastore itself is unmounted
    /// by [`serve_then`] once the FUSE session has ended and what runs
    /// beside FUSE (the host agent, its guests' disks) has stopped: those
    /// may still write, and a change after the final checkpoint would sit
    /// in a journal nobody replays.
    fn destroy(&mut self) {
        if let Err(e) = self.wb.settle_all() {
            tracing::error!("a queued write failed before unmount: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(self.fs.lookup(self.ino(parent), name.as_bytes()), reply)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.wb.wait_idle(self.ino(ino));
        match self.fs.getattr(self.ino(ino)) {
            Ok(i) => reply.attr(&TTL, &self.attr(&i)),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_or_now(atime),
            mtime: time_or_now(mtime),
            ctime: ctime.map(from_systime),
        };
        self.wb.wait_idle(self.ino(ino));
        match self.fs.setattr(self.ino(ino), &a) {
            Ok(i) => reply.attr(&TTL, &self.attr(&i)),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        data(reply, self.fs.readlink(self.ino(ino)))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let fmt = mode & S_IFMT;
        let mode = if fmt == 0 { mode | S_IFREG } else { mode };
        if mode & S_IFMT == S_IFDIR {
            return reply.error(Errno::EINVAL);
        }
        self.entry(
            self.fs.create(
                self.ino(parent),
                name.as_bytes(),
                mode,
                req.uid(),
                req.gid(),
                rdev,
                None,
            ),
            reply,
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            self.fs.create(
                self.ino(parent),
                name.as_bytes(),
                S_IFDIR | (mode & 0o7777),
                req.uid(),
                req.gid(),
                0,
                None,
            ),
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        done(
            reply,
            self.fs.unlink(self.ino(parent), name.as_bytes(), false),
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        done(
            reply,
            self.fs.unlink(self.ino(parent), name.as_bytes(), true),
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes();
        if t.is_empty() || t.len() >= 4096 {
            return reply.error(Errno::ENAMETOOLONG);
        }
        self.entry(
            self.fs.create(
                self.ino(parent),
                link_name.as_bytes(),
                S_IFLNK | 0o777,
                req.uid(),
                req.gid(),
                0,
                Some(t),
            ),
            reply,
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        done(
            reply,
            self.fs.rename(
                self.ino(parent),
                name.as_bytes(),
                self.ino(newparent),
                newname.as_bytes(),
                flags.contains(RenameFlags::RENAME_NOREPLACE),
                flags.contains(RenameFlags::RENAME_EXCHANGE),
            ),
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            self.fs
                .link(self.ino(ino), self.ino(newparent), newname.as_bytes()),
            reply,
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.ino(ino);
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match File::open_posix(&self.fs, ino, write) {
            Ok((_, i)) if i.is_dir() && write => reply.error(Errno::EISDIR),
            Ok((f, i)) => {
                let flags = open_flags(&i, write);
                reply.opened(self.keep(Handle::new(f, &i, write)), flags)
            }
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = self.ino(ino);
        let Some((file, behind)) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        self.wb.wait_idle(ino);
        let mut buf = vec![0u8; size as usize];
        let r = file.read_at(&mut buf, offset).map(|n| {
            buf.truncate(n);
            buf
        });
        data(reply, r);
        if behind {
            self.read_ahead(ino, offset, size as u64);
        }
    }

    /// A write into blocks the file already has is answered first and
    /// carried out after ([`crate::writebehind`]); one that allocates is
    /// carried out before the answer, so that running out of space is
    /// reported by the write itself.
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let ino = self.ino(ino);
        let Some((file, behind)) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        // On direct I/O the kernel leaves set-ID stripping to us.
        if wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = self.fs.drop_setid_for_write(ino) {
                return reply.error(reply_errno(&e));
            }
        }
        let queued = behind
            && match file.writes_in_place(offset, data.len()) {
                Ok(yes) => yes,
                Err(e) => return reply.error(reply_errno(&e)),
            };
        if queued {
            match self.wb.begin(ino, offset, data.len()) {
                Ok(t) => {
                    reply.written(data.len() as u32);
                    // `data` is this thread's request buffer, still ours.
                    self.wb.end(t, file.write_at(data, offset));
                }
                Err(e) => reply.error(reply_errno(&e)),
            }
            return;
        }
        // After this file's outstanding writes (they may overlap).
        self.wb.wait_idle(ino);
        match file.write_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    // No `flush`: close() has nothing to do that release does not (queued
    // writes are waited for there, and their failures reported by fsync).
    // Leaving it unimplemented answers ENOSYS once, and the kernel then
    // stops sending FLUSH at every close (one round trip less).

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.ino(ino);
        let Some(h) = self
            .files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0)
        else {
            return reply.error(Errno::EBADF);
        };
        if h.behind {
            self.wb.wait_idle(ino);
            self.wb.forget(ino);
            self.ahead
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ino);
        }
        match Arc::try_unwrap(h.file) {
            Ok(f) => done(reply, f.close()),
            // A request still running on it: the last one drops it.
            Err(_) => reply.ok(),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.ino(ino);
        done(
            reply,
            self.wb.settle(ino).and_then(|()| self.fs.fsync_file(ino)),
        )
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.ino(ino);
        match self.fs.getattr(ino) {
            Ok(i) if i.is_dir() => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = self.ino(ino);
        let fresh = offset == 0
            || !self
                .dirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&fh.0);
        if fresh {
            // A snapshot per open handle: stable offsets while others change
            // the directory. Listed without holding the handle table.
            let d = match self.fs.getattr(dir) {
                Ok(d) => d,
                Err(e) => return reply.error(reply_errno(&e)),
            };
            let mut list = vec![
                (d.addr, 4u8, b".".to_vec()),
                (d.parent, 4u8, b"..".to_vec()),
            ];
            match self.fs.readdir(dir) {
                Ok(es) => list.extend(es.into_iter().map(|e| (e.fd, e.kind, e.name))),
                Err(e) => return reply.error(reply_errno(&e)),
            }
            self.dirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fh.0, list);
        }
        let dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let list = &dirs[&fh.0];
        for (i, (a, k, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(
                self.fuse_ino(*a),
                i as u64 + 1,
                kind_from_dt(*k),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        done(reply, self.fs.sync())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let u = self.fs.usage();
        let fds_per_block = (u.block_size - 4096) / 4096;
        let files = u.fds_used + u.fds_free + u.free_blocks * fds_per_block;
        reply.statfs(
            u.total_blocks,
            u.free_blocks,
            u.free_blocks,
            files,
            files - u.fds_used,
            u.block_size as u32,
            NAME_MAX as u32,
            u.block_size as u32,
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mode = if mode & S_IFMT == 0 {
            mode | S_IFREG
        } else {
            mode
        };
        match self.fs.create(
            self.ino(parent),
            name.as_bytes(),
            mode,
            req.uid(),
            req.gid(),
            0,
            None,
        ) {
            Ok(i) => {
                let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
                let f = match File::open_posix(&self.fs, i.addr, write) {
                    Ok((f, _)) => f,
                    Err(e) => return reply.error(reply_errno(&e)),
                };
                let flags = open_flags(&i, write);
                let fh = self.keep(Handle::new(f, &i, write));
                reply.created(&TTL, &self.attr(&i), Generation(i.generation), fh, flags)
            }
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if name.as_bytes() != MULTI_WRITER_XATTR {
            return reply.error(Errno::ENOTSUP);
        }
        let on = match value {
            b"1" | b"on" | b"true" => true,
            b"0" | b"off" | b"false" => false,
            _ => return reply.error(Errno::EINVAL),
        };
        self.wb.wait_idle(self.ino(ino));
        done(reply, self.fs.set_multi_writer(self.ino(ino), on))
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_bytes() != MULTI_WRITER_XATTR {
            return reply.error(Errno::ENODATA);
        }
        match self.fs.getattr(self.ino(ino)) {
            Ok(i) if i.flags & crate::format::FD_FLAG_MULTI_WRITER != 0 => xattr(reply, b"1", size),
            Ok(_) => reply.error(Errno::ENODATA),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.getattr(self.ino(ino)) {
            Ok(i) => {
                let mut names = Vec::new();
                if i.flags & crate::format::FD_FLAG_MULTI_WRITER != 0 {
                    names.extend_from_slice(MULTI_WRITER_XATTR);
                    names.push(0);
                }
                xattr(reply, &names, size)
            }
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if name.as_bytes() != MULTI_WRITER_XATTR {
            return reply.error(Errno::ENODATA);
        }
        done(reply, self.fs.set_multi_writer(self.ino(ino), false))
    }

    /// SEEK_DATA and SEEK_HOLE from the file's block map, so that
    /// `qemu-img map`, `cp --sparse` and backup tools see holes; other
    /// whences are the kernel's.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        let Some((file, _)) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        self.wb.wait_idle(self.ino(ino));
        let r = match whence {
            libc::SEEK_DATA => file.seek_data(off),
            libc::SEEK_HOLE => file.seek_hole(off),
            _ => return reply.error(Errno::EINVAL),
        };
        match r {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(reply_errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.wb.wait_idle(self.ino(ino));
        done(
            reply,
            self.fs.fallocate(self.ino(ino), offset, length, mode),
        )
    }
}

/// How long a metadata change may wait in memory before it is committed.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// The extended attribute that marks a file multi-writer ("1" or "0").
pub const MULTI_WRITER_XATTR: &[u8] = b"user.vmfs.multi-writer";

/// Direct I/O (no page cache in the kernel) for a multi-writer file (other
/// hosts write it too), a raw device mapping (others may reach its LUN
/// directly), and every handle that writes a regular file: each write then
/// costs one copy less and is answered early ([`crate::writebehind`]),
/// and sequential reads through it are read ahead here
/// ([`VmfsFuse::read_ahead`]).
fn open_flags(i: &Inode, write: bool) -> FopenFlags {
    if write && i.mode & S_IFMT == S_IFREG
        || i.flags & (crate::format::FD_FLAG_MULTI_WRITER | crate::format::FD_FLAG_RDM) != 0
    {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

fn xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}

/// Mount and serve until unmounted (`fusermount3 -u`) or until `stop` is
/// signalled; flushes the volume before returning.
pub fn serve(
    fs: Arc<Fs>,
    mountpoint: &Path,
    threads: usize,
    stop: std::sync::mpsc::Receiver<()>,
) -> crate::Result<()> {
    serve_then(fs, mountpoint, threads, stop, Box::new(|| {}))
}

/// [`serve`], calling `before_unmount` once the FUSE session has ended and
/// before the datastore is unmounted (the host agent stops there: nothing
/// may act as this host after its slot is freed).
pub fn serve_then(
    fs: Arc<Fs>,
    mountpoint: &Path,
    threads: usize,
    stop: std::sync::mpsc::Receiver<()>,
    before_unmount: Box<dyn FnOnce() + Send>,
) -> crate::Result<()> {
    let mut before_unmount = Some(before_unmount);
    let label = if fs.vol().header.label.is_empty() {
        crate::volume::uuid_str(&fs.vol().header.uuid)
    } else {
        fs.vol().header.label.clone()
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("vmfs:{label}")),
        MountOption::Subtype("vmfs".into()),
        MountOption::DefaultPermissions,
    ];
    // SAFETY: geteuid has no preconditions.
    cfg.acl = if unsafe { libc::geteuid() } == 0 {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(threads.max(1));
    cfg.clone_fd = true;
    let session = fuser::spawn_mount(VmfsFuse::new(fs.clone()), mountpoint, &cfg)
        .map_err(|e| FsError::Invalid(format!("cannot mount on {}: {e}", mountpoint.display())))?;
    // Changes made through the file API (the host agent's disk operations)
    // drop what the kernel caches of the names and files they touched.
    let notifier = session.notifier();
    let root = fs.root();
    let fuse_ino = move |a: u64| INodeNo(if a == root { 1 } else { a });
    fs.set_observer(Box::new(move |c| {
        let r = match &c {
            crate::fs::Change::Entry { dir, name } => {
                notifier.inval_entry(fuse_ino(*dir), OsStr::from_bytes(name))
            }
            crate::fs::Change::Inode { ino } => notifier.inval_inode(fuse_ino(*ino), 0, 0),
        };
        if let Err(e) = r {
            tracing::debug!("telling the kernel of {c:?}: {e}");
        }
    }));
    tracing::info!("mounted on {}", mountpoint.display());
    let (done_tx, done_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let waiter = std::thread::spawn(move || {
        let _ = done_tx.send(session.join());
    });
    // Cluster housekeeping on its own thread ([`crate::Housekeeper`]).
    let hk = crate::Housekeeper::start(fs.clone());
    let stop_hk = move || drop(hk);
    let mut last_commit = std::time::Instant::now();
    loop {
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            // The commit timer: metadata changes nobody fsynced reach the
            // journal within this interval (ext4's default is 5 s too).
            if let Err(e) = fs.commit_pending() {
                tracing::error!("periodic journal commit failed: {e}");
            }
            last_commit = std::time::Instant::now();
        }
        if stop.recv_timeout(Duration::from_millis(200)).is_ok() {
            tracing::info!("signal received: unmounting {}", mountpoint.display());
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(mountpoint)
                .status();
            if !st.map(|s| s.success()).unwrap_or(false) {
                let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
                    .map_err(|_| FsError::Invalid("mountpoint has a NUL".into()))?;
                // SAFETY: c is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        match done_rx.recv_timeout(Duration::from_millis(10)) {
            Ok(r) => {
                let _ = waiter.join();
                if let Some(f) = before_unmount.take() {
                    f();
                }
                stop_hk();
                fs.unmount()?;
                tracing::info!("unmounted {}", mountpoint.display());
                return r.map_err(|e| {
                    FsError::Invalid(format!("FUSE session ended with an error: {e}"))
                });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => return Ok(()),
        }
    }
}
