//! File I/O by descriptor: reads and writes (in place without the state
//! lock, or as one transaction), read-ahead, fallocate, fsync.

use super::*;
use crate::file::Range;
use crate::leafmap::{FileData, Leaf};

impl Fs {
    /// fsync of one file: an open mapping flushes its LUN; then the
    /// metadata is committed.
    pub fn fsync_file(&self, ino: u64) -> Result<()> {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            lun.flush()?;
        }
        self.sync()
    }

    pub fn read(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let n = self.read_into(ino, off, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Read into the caller's buffer; returns the bytes read (short at EOF).
    /// An open raw device mapping reads its LUN.
    pub fn read_into(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let fd = self.file_data(ino);
        self.read_with(&fd, ino, off, buf)
    }

    /// Before a write by a caller without CAP_FSETID: drop the file's
    /// set-user-ID bit, and its set-group-ID bit if it is group-executable,
    /// as the kernel does for a local filesystem (FUSE leaves this to the
    /// filesystem on direct-I/O handles). Costs nothing when neither is set.
    pub fn drop_setid_for_write(&self, ino: u64) -> Result<()> {
        fn setid(mode: u32) -> u32 {
            let mut kill = mode & libc::S_ISUID;
            if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
                kill |= libc::S_ISGID;
            }
            if mode & S_IFMT == S_IFREG {
                kill
            } else {
                0
            }
        }
        if setid(self.getattr(ino)?.mode) == 0 {
            return Ok(());
        }
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            let kill = setid(i.mode);
            if kill != 0 {
                i.mode &= !kill;
                i.ctime = now();
                st.iput(vol, &i)?;
            }
            Ok(())
        })
    }

    /// Hint the LUNs that `len` bytes of file `ino` at `off` will be read
    /// soon (read-ahead for readers the kernel does not read ahead for).
    /// Holes, inline data and bytes past EOF are skipped; a failure only
    /// means no read-ahead.
    pub fn prefetch(&self, ino: u64, off: u64, len: u64) {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            return lun.prefetch(off, len);
        }
        let segs = self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            let n = i.size.saturating_sub(off).min(len) as usize;
            if i.is_dir() || i.layout == Layout::Inline || n == 0 {
                return Ok(Vec::new());
            }
            st.plan(vol, &i, off, n)
        });
        let vol = self.vol();
        for s in segs.unwrap_or_default() {
            if let Some(at) = s.at {
                vol.prefetch(at, s.len as u64);
            }
        }
    }

    /// What the file itself holds (a mapping's descriptor, not its LUN).
    pub fn read_stored(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let n = self.read_into_stored(ino, off, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    pub(crate) fn read_into_stored(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let fd = self.file_data(ino);
        let _g = fd.rw.read().unwrap_or_else(|p| p.into_inner());
        self.read_into_locked(ino, off, buf)
    }

    /// Read under the state lock (the caller holds the file's data lock).
    pub(crate) fn read_into_locked(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let (n, segs) = self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(fault(Fault::IsDir));
            }
            st.read_prepare(vol, &i, off, buf)
        })?;
        fetch(&self.vol(), &segs, buf)?;
        Ok(n)
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<Inode> {
        if let Some((lun, i)) = self.mapped_lun(ino) {
            // A mapping is exactly its LUN: no writing past its end.
            if off
                .checked_add(data.len() as u64)
                .is_none_or(|e| e > lun.size())
            {
                return Err(FsError::File(
                    Fault::NoSpace,
                    format!(
                        "write at {off} (+{} bytes) past the end of the mapped LUN ({} bytes)",
                        data.len(),
                        lun.size()
                    ),
                ));
            }
            lun.write_at(data, off)?;
            return Ok(i);
        }
        let fd = self.file_data(ino);
        self.write_data(&fd, ino, off, data)
    }

    /// Write under the file's data lock: shared, or exclusive when the
    /// write moves the file to another layout (sub-block leaves freed for
    /// file blocks: nothing may read or write them meanwhile). The leaves
    /// the write touched are forgotten by the cache before the lock goes.
    pub(crate) fn write_data(
        &self,
        fd: &crate::leafmap::FileData,
        ino: u64,
        off: u64,
        data: &[u8],
    ) -> Result<Inode> {
        let need_excl =
            |e: &FsError| matches!(e, FsError::Retry(Retry(RetryKind::NeedExclusiveData)));
        let r = {
            let _g = fd.rw.read().unwrap_or_else(|p| p.into_inner());
            self.write_held(fd, ino, off, data, false)
        };
        match r {
            Err(e) if need_excl(&e) => {
                let _g = fd.rw.write().unwrap_or_else(|p| p.into_inner());
                self.write_held(fd, ino, off, data, true)
            }
            r => r,
        }
    }

    /// [`Fs::write_data`] with the data lock held (`exclusive`: for writing).
    fn write_held(
        &self,
        fd: &crate::leafmap::FileData,
        ino: u64,
        off: u64,
        data: &[u8],
        exclusive: bool,
    ) -> Result<Inode> {
        // Fast path: every byte lands in a written, mapped leaf: data moves
        // without the state lock, then the size and times are committed
        // (only if they changed: same size within one clock tick = nothing to do).
        if let Some((segs, unchanged)) = self.in_place_plan(ino, off, data.len())? {
            for s in &segs {
                self.vol()
                    .write(s.at.expect("mapped"), &data[s.buf_off..s.buf_off + s.len])?;
            }
            if let Some(i) = unchanged {
                return Ok(i);
            }
            return self.file_op(ino, |st, vol| {
                let mut i = st.iget(vol, ino)?;
                i.size = i.size.max(off + data.len() as u64);
                let t = now();
                i.mtime = t;
                i.ctime = t;
                st.iput(vol, &i)?;
                Ok(i)
            });
        }
        let end = off.saturating_add(data.len() as u64);
        let r = self.file_op(ino, |st, vol| {
            let mut i = st.iget(vol, ino)?;
            if !exclusive && st.converts_layout(vol, &i, end) {
                return Err(FsError::Retry(Retry(RetryKind::NeedExclusiveData)));
            }
            st.write_locked(vol, &mut i, off, data)?;
            let t = now();
            i.mtime = t;
            i.ctime = t;
            st.iput(vol, &i)?;
            // It may have allocated into leaves cached as holes: forgotten
            // before the state lock goes, so no thread can see the new
            // leaves in the metadata (and write there in place) and then
            // read the old hole from the cache.
            fd.invalidate_range(off, data.len() as u64);
            Ok(i)
        });
        // With the data lock still held, nothing shrinks the file before
        // the cache learns its size.
        if let Ok(i) = &r {
            fd.grew(&fd.ticket(), i.size);
        }
        r
    }

    /// Where a write of `len` bytes at `off` lands when every byte falls in
    /// a written, mapped leaf (no allocation, no metadata but size and
    /// times); with the inode when even those stay as they are. None when
    /// the write needs more.
    #[allow(clippy::type_complexity)]
    pub(crate) fn in_place_plan(
        &self,
        ino: u64,
        off: u64,
        len: usize,
    ) -> Result<Option<(Vec<Seg>, Option<Inode>)>> {
        let end = off
            .checked_add(len as u64)
            .ok_or_else(|| fault(Fault::TooBig))?;
        self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(fault(Fault::IsDir));
            }
            Ok(if i.layout == Layout::Inline || off > i.size {
                // Inline data is metadata; a write past EOF zeroes the gap first.
                None
            } else {
                let segs = st.plan(vol, &i, off, len)?;
                let t = now();
                let unchanged = end <= i.size && i.mtime == t && i.ctime == t;
                segs.iter()
                    .all(|s| s.at.is_some())
                    .then_some((segs, unchanged.then_some(i)))
            })
        })
    }

    /// Whether a write of `len` bytes at `off` to `ino` needs no block
    /// allocated (so it cannot fail for lack of space): the FUSE front end
    /// may then answer it before the bytes reach the LUN.
    pub fn writes_in_place(&self, ino: u64, off: u64, len: usize) -> Result<bool> {
        if self.mapped_lun(ino).is_some() {
            return Ok(false);
        }
        Ok(self.in_place_plan(ino, off, len)?.is_some())
    }

    /// fallocate: mode bits as in fallocate(2).
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        if self.getattr(ino)?.flags & FD_FLAG_RDM != 0 {
            return Err(FsError::File(
                Fault::NotSupported,
                format!("file {ino:#x} is a raw device mapping: allocate on its LUN"),
            ));
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
            || (punch && !keep)
            || (punch && zero)
        {
            return Err(fault(Fault::NotSupported));
        }
        if len == 0 {
            return Err(fault(Fault::Invalid));
        }
        let fd = self.file_data(ino);
        let _g = fd.rw.write().unwrap_or_else(|p| p.into_inner());
        let _forget = Forget(&fd);
        self.file_op(ino, |st, vol| {
            let mut i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(fault(Fault::IsDir));
            }
            if punch || zero {
                self.check_not_open_elsewhere(i.addr, "punch a hole in")?;
                st.punch(vol, &mut i, off, len)?;
            }
            if !punch {
                st.preallocate(vol, &mut i, off, len, keep)?;
            }
            let t = now();
            i.mtime = t;
            i.ctime = t;
            st.iput(vol, &i)?;
            Ok(())
        })
    }
}

/// How many leaves a miss fills ahead of the one asked for (sequential
/// readers then find the next ones cached).
const FILL_AHEAD: u64 = 256;

// The in-place path: reads and writes of blocks an open file already has,
// through its leaf cache ([`crate::leafmap`]); misses fill it.
impl Fs {
    /// Reads and writes of an open file meet its blocks here first.
    pub(crate) fn read_with(
        &self,
        fd: &FileData,
        ino: u64,
        off: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            let n = lun.size().saturating_sub(off).min(buf.len() as u64) as usize;
            lun.read_at(&mut buf[..n], off)?;
            return Ok(n);
        }
        let _g = fd.rw.read().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if let Some(r) = self.read_cached(fd, off, buf) {
                return r.map(|()| buf.len());
            }
            if attempt == 0 && !buf.is_empty() {
                self.fill_leaves(fd, ino, off, buf.len() as u64)?;
            }
        }
        self.read_into_locked(ino, off, buf)
    }

    /// A read wholly inside known leaves: Some(result), else None.
    fn read_cached(&self, fd: &FileData, off: u64, buf: &mut [u8]) -> Option<Result<()>> {
        let vol = self.vol();
        let mut err = None;
        let ok = fd.with_leaves(off, buf.len() as u64, |li, leaf, l| {
            let start = (li * leaf).max(off);
            let end = ((li + 1) * leaf).min(off + buf.len() as u64);
            let piece = &mut buf[(start - off) as usize..(end - off) as usize];
            match l {
                Leaf::Hole => piece.fill(0),
                Leaf::At(a) => {
                    if let Err(e) = vol.read(a + (start - li * leaf), piece) {
                        err = Some(e);
                        return false;
                    }
                }
                Leaf::Unknown => return false,
            }
            true
        });
        match err {
            Some(e) => Some(Err(e)),
            None => ok.then_some(Ok(())),
        }
    }

    /// A write wholly into known, mapped leaves: true when done.
    fn write_cached(&self, fd: &FileData, off: u64, data: &[u8]) -> Result<bool> {
        let vol = self.vol();
        let mut err = None;
        let ok = fd.with_leaves(off, data.len() as u64, |li, leaf, l| {
            let Leaf::At(a) = l else {
                return false;
            };
            let start = (li * leaf).max(off);
            let end = ((li + 1) * leaf).min(off + data.len() as u64);
            let piece = &data[(start - off) as usize..(end - off) as usize];
            if let Err(e) = vol.write(a + (start - li * leaf), piece) {
                err = Some(e);
                return false;
            }
            true
        });
        match err {
            Some(e) => Err(e),
            None => Ok(ok),
        }
    }

    /// Look up the leaves of `[off, off+len)` and a window past it, and
    /// cache what may be cached.
    fn fill_leaves(&self, fd: &FileData, ino: u64, off: u64, len: u64) -> Result<()> {
        let t = fd.ticket();
        let found = self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            if i.is_dir() || i.flags & FD_FLAG_RDM != 0 {
                return Ok(None);
            }
            let Layout::Tree { sub: false, .. } = i.layout else {
                return Ok(None);
            };
            let leaf = vol.block_size();
            let first = off / leaf;
            let in_file = i.size.div_ceil(leaf);
            if first >= in_file {
                return Ok(None); // past the end: nothing to cache
            }
            let want = off.saturating_add(len).div_ceil(leaf).max(first + 1);
            let last = want.max(first + FILL_AHEAD).min(in_file);
            let mut v = Vec::with_capacity(last.saturating_sub(first) as usize);
            for li in first..last {
                let p = st.get_ptr(vol, &i, li)?;
                v.push(if p == 0 {
                    Leaf::Hole
                } else if p & PTR_UNWRITTEN != 0 {
                    Leaf::Unknown
                } else {
                    Leaf::At((p & PTR_ADDR_MASK) * MD as u64)
                });
            }
            Ok(Some((leaf, i.size, first, v)))
        })?;
        if let Some((leaf, size, first, v)) = found {
            fd.fill(&t, leaf, size, first, &v);
        }
        Ok(())
    }

    /// Write through the cache when every leaf is known and mapped, else
    /// as one metadata transaction; then stamp the file's times.
    pub(crate) fn write_with(&self, fd: &FileData, ino: u64, off: u64, data: &[u8]) -> Result<()> {
        if self.mapped_lun(ino).is_some() {
            return self.write(ino, off, data).map(|_| ());
        }
        let g = fd.rw.read().unwrap_or_else(|p| p.into_inner());
        if data.is_empty() {
            return Ok(());
        }
        for attempt in 0..2 {
            if self.write_cached(fd, off, data)? {
                return self.stamp_times(fd, ino);
            }
            if attempt == 0 {
                self.fill_leaves(fd, ino, off, data.len() as u64)?;
            }
        }
        drop(g);
        self.write_data(fd, ino, off, data).map(|_| ())
    }

    pub(crate) fn writes_in_place_with(
        &self,
        fd: &FileData,
        ino: u64,
        off: u64,
        len: usize,
    ) -> Result<bool> {
        if self.mapped_lun(ino).is_some() {
            return Ok(false);
        }
        if len > 0 && fd.with_leaves(off, len as u64, |_, _, l| matches!(l, Leaf::At(_))) {
            return Ok(true);
        }
        self.writes_in_place(ino, off, len)
    }

    /// After an in-place write: the file's modification and change times
    /// become now, committed once per clock tick at most.
    fn stamp_times(&self, fd: &FileData, ino: u64) -> Result<()> {
        let t = crate::fs::now();
        let packed = (t.0 as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(u64::from(t.1))
            | 1;
        if fd.stamp.load(std::sync::atomic::Ordering::SeqCst) == packed {
            return Ok(());
        }
        self.file_op(ino, |st, vol| {
            let mut i = st.iget(vol, ino)?;
            if i.mtime != t || i.ctime != t {
                i.mtime = t;
                i.ctime = t;
                st.iput(vol, &i)?;
            }
            Ok(())
        })?;
        fd.stamp.store(packed, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The data ranges of file `ino` within `[off, off+len)`.
    pub fn allocated(&self, ino: u64, off: u64, len: u64) -> Result<Vec<Range>> {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            let end = off.saturating_add(len).min(lun.size());
            return Ok(if off < end {
                vec![off..end]
            } else {
                Vec::new()
            });
        }
        self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            let end = off.saturating_add(len).min(i.size);
            let mut out: Vec<Range> = Vec::new();
            let mut pos = off;
            while pos < end {
                let Some(d) = st.next_data(vol, &i, pos)? else {
                    break;
                };
                if d >= end {
                    break;
                }
                let h = st.next_hole(vol, &i, d)?.min(end);
                match out.last_mut() {
                    Some(r) if r.end == d => r.end = h,
                    _ => out.push(d..h),
                }
                pos = h;
            }
            Ok(out)
        })
    }

    /// lseek(SEEK_DATA) on file `ino`.
    pub fn seek_data(&self, ino: u64, off: u64) -> Result<Option<u64>> {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            return Ok((off < lun.size()).then_some(off));
        }
        self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            if off >= i.size {
                return Ok(None);
            }
            Ok(st.next_data(vol, &i, off)?.filter(|&d| d < i.size))
        })
    }

    /// lseek(SEEK_HOLE) on file `ino`.
    pub fn seek_hole(&self, ino: u64, off: u64) -> Result<Option<u64>> {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            return Ok((off < lun.size()).then_some(lun.size()));
        }
        self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            if off >= i.size {
                return Ok(None);
            }
            Ok(Some(st.next_hole(vol, &i, off)?.min(i.size)))
        })
    }
}
