//! File data under the state lock: the three layouts (inline in the
//! descriptor, sub-block leaves, file-block leaves) and moving between
//! them; planning reads, writing, zeroing, truncating, punching and
//! preallocating.

use super::*;

impl State {
    /// Plan a read of `[off, off+len)` (already clamped to the size).
    pub fn plan(&mut self, vol: &Volume, ino: &Inode, off: u64, len: usize) -> Result<Vec<Seg>> {
        let leaf_sz = Self::leaf_size(vol, ino);
        let mut segs = Vec::new();
        let mut done = 0usize;
        while done < len {
            let pos = off + done as u64;
            let li = pos / leaf_sz;
            let in_leaf = pos % leaf_sz;
            let n = ((leaf_sz - in_leaf) as usize).min(len - done);
            let p = self.get_ptr(vol, ino, li)?;
            let at = (p != 0 && p & PTR_UNWRITTEN == 0).then(|| p * MD as u64 + in_leaf);
            segs.push(Seg {
                buf_off: done,
                len: n,
                at,
            });
            done += n;
        }
        Ok(segs)
    }

    /// Read with the state lock held (metadata-sized reads: directories, small files).
    /// Start a read into `buf` at `off`: clamps to the size, copies inline
    /// data at once, and returns the bytes the read yields and the segments
    /// still to fetch with [`fetch`] (which needs no lock).
    pub fn read_prepare(
        &mut self,
        vol: &Volume,
        ino: &Inode,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(usize, Vec<Seg>)> {
        let n = ino.size.saturating_sub(off).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok((0, Vec::new()));
        }
        if ino.layout == Layout::Inline {
            buf[..n].copy_from_slice(&ino.area[off as usize..off as usize + n]);
            return Ok((n, Vec::new()));
        }
        Ok((n, self.plan(vol, ino, off, n)?))
    }

    /// Read with the state lock held (metadata-sized reads: directories, small files).
    pub fn read_locked(
        &mut self,
        vol: &Volume,
        ino: &Inode,
        off: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut out = vec![0u8; ino.size.saturating_sub(off).min(len as u64) as usize];
        let (n, segs) = self.read_prepare(vol, ino, off, &mut out)?;
        fetch(vol, &segs, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    pub(crate) fn to_tree(&mut self, vol: &Volume, ino: &mut Inode, new_end: u64) -> Result<()> {
        let content = ino.area[..ino.size as usize].to_vec();
        ino.area.fill(0);
        let sb = u64::from(vol.header.sub_block_size);
        let sub = ino.is_dir() || new_end <= SB_FILE_LEAVES * sb;
        ino.layout = Layout::Tree { sub, depth: 0 };
        if content.iter().any(|&b| b != 0) {
            self.write_locked(vol, ino, 0, &content)?;
        }
        Ok(())
    }

    /// Move a file from sub-block leaves to file blocks: its data (the
    /// sub-block leaves that exist; the size may be far larger after a
    /// truncate up) is copied sub-block by sub-block, holes and zeros left
    /// as holes.
    pub(crate) fn sub_to_fb(&mut self, vol: &Volume, ino: &mut Inode) -> Result<()> {
        let size = ino.size;
        let sb = u64::from(vol.header.sub_block_size);
        let mut data: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut pos = 0;
        while pos < size {
            let Some(d) = self.next_data(vol, ino, pos)? else {
                break;
            };
            if d >= size {
                break;
            }
            let h = self.next_hole(vol, ino, d)?.min(size);
            let mut at = d - d % sb;
            while at < h {
                let n = (h - at).min(sb) as usize;
                let chunk = self.read_locked(vol, ino, at, n)?;
                if chunk.iter().any(|&b| b != 0) {
                    data.push((at, chunk));
                }
                at += sb;
            }
            pos = h;
        }
        self.free_range(vol, ino, 0, u64::MAX)?;
        ino.layout = Layout::Tree {
            sub: false,
            depth: 0,
        };
        ino.size = size;
        for (at, chunk) in data {
            self.write_locked(vol, ino, at, &chunk)?;
        }
        Ok(())
    }

    /// Make the layout able to hold `end` bytes: inline while it fits, then
    /// sub-block leaves, then file-block leaves. True when still inline.
    /// Whether writing up to `end` moves the file from sub-block leaves to
    /// file blocks (freeing leaves a reader without the state lock may be
    /// reading: the writer must hold the file's data lock alone).
    pub(crate) fn converts_layout(&self, vol: &Volume, ino: &Inode, end: u64) -> bool {
        let sb = u64::from(vol.header.sub_block_size);
        matches!(ino.layout, Layout::Tree { sub: true, .. })
            && !ino.is_dir()
            && end > SB_FILE_LEAVES * sb
            && sb < vol.block_size()
    }

    pub(crate) fn prepare_layout(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        end: u64,
    ) -> Result<bool> {
        if ino.layout == Layout::Inline {
            if end <= INLINE_MAX as u64 {
                return Ok(true);
            }
            self.to_tree(vol, ino, end)?;
        }
        if let Layout::Tree { sub: true, .. } = ino.layout {
            let sb = u64::from(vol.header.sub_block_size);
            if !ino.is_dir() && end > SB_FILE_LEAVES * sb && sb < vol.block_size() {
                self.sub_to_fb(vol, ino)?;
            }
        }
        Ok(false)
    }

    /// Write with the state lock held: allocates as needed; fresh leaves get
    /// their unwritten parts zeroed before the data, all before commit.
    pub fn write_locked(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        off: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| fault(Fault::TooBig))?;
        if data.is_empty() {
            return Ok(());
        }
        if self.prepare_layout(vol, ino, end)? {
            ino.area[off as usize..end as usize].copy_from_slice(data);
            ino.size = ino.size.max(end);
            return Ok(());
        }
        self.zero_tail(vol, ino, off)?;
        let leaf_sz = Self::leaf_size(vol, ino);
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let li = pos / leaf_sz;
            let in_leaf = pos % leaf_sz;
            let n = ((leaf_sz - in_leaf) as usize).min(data.len() - done);
            let (addr, fresh) = self.map_alloc(vol, ino, li)?;
            let base = addr * MD as u64;
            if fresh {
                vol.zero(base, in_leaf)?;
                vol.zero(base + in_leaf + n as u64, leaf_sz - in_leaf - n as u64)?;
            }
            vol.write(base + in_leaf, &data[done..done + n])?;
            done += n;
        }
        ino.size = ino.size.max(end);
        Ok(())
    }

    /// Zero `[off, end)` inside already-mapped leaves (no allocation).
    pub(crate) fn zero_mapped(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        off: u64,
        end: u64,
    ) -> Result<()> {
        if off >= end {
            return Ok(());
        }
        if ino.layout == Layout::Inline {
            let e = end.min(INLINE_MAX as u64) as usize;
            if (off as usize) < e {
                ino.area[off as usize..e].fill(0);
            }
            return Ok(());
        }
        for s in self.plan(vol, ino, off, (end - off) as usize)? {
            if let Some(at) = s.at {
                vol.zero(at, s.len as u64)?;
            }
        }
        Ok(())
    }

    /// Before the size grows to `new_end`: zero the stale bytes between the
    /// current end of file and the end of its last leaf, which a shrinking
    /// truncate left in place. Done here and not at the truncate, so that a
    /// crash before the truncate commits finds the old contents whole; the
    /// zeros themselves stay invisible until the new size commits.
    pub(crate) fn zero_tail(&mut self, vol: &Volume, ino: &mut Inode, new_end: u64) -> Result<()> {
        if new_end <= ino.size || ino.layout == Layout::Inline {
            return Ok(());
        }
        let leaf_sz = Self::leaf_size(vol, ino);
        let tail_end = new_end.min(ino.size.next_multiple_of(leaf_sz));
        self.zero_mapped(vol, ino, ino.size, tail_end)
    }

    pub fn truncate(&mut self, vol: &Volume, ino: &mut Inode, size: u64) -> Result<()> {
        if size > ino.size {
            self.zero_tail(vol, ino, size)?;
        }
        if size < ino.size {
            let leaf_sz = Self::leaf_size(vol, ino);
            if ino.layout == Layout::Inline {
                // Inline bytes are metadata: zeroed atomically with the size.
                self.zero_mapped(vol, ino, size, ino.size)?;
            } else {
                self.free_range(vol, ino, size.div_ceil(leaf_sz), u64::MAX)?;
                if size == 0 && !ino.is_dir() {
                    self.free_range(vol, ino, 0, u64::MAX)?;
                }
            }
        }
        if size > (FD_PTRS as u64) * Self::span(4) * vol.block_size() {
            return Err(fault(Fault::TooBig));
        }
        if ino.layout == Layout::Inline && size > INLINE_MAX as u64 {
            self.to_tree(vol, ino, size)?;
        }
        ino.size = size;
        Ok(())
    }

    pub fn punch(&mut self, vol: &Volume, ino: &mut Inode, off: u64, len: u64) -> Result<()> {
        let end = off.saturating_add(len).min(ino.size);
        if off >= end {
            return Ok(());
        }
        if ino.layout == Layout::Inline {
            return self.zero_mapped(vol, ino, off, end);
        }
        let leaf_sz = Self::leaf_size(vol, ino);
        let first_full = off.div_ceil(leaf_sz);
        let last_full = end / leaf_sz; // exclusive
        if first_full < last_full {
            self.zero_mapped(vol, ino, off, first_full * leaf_sz)?;
            self.free_range(vol, ino, first_full, last_full)?;
            self.zero_mapped(vol, ino, last_full * leaf_sz, end)?;
        } else {
            self.zero_mapped(vol, ino, off, end)?;
        }
        Ok(())
    }

    pub fn preallocate(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        off: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<()> {
        let end = off.checked_add(len).ok_or_else(|| fault(Fault::TooBig))?;
        if self.prepare_layout(vol, ino, end)? {
            if !keep_size {
                ino.size = ino.size.max(end);
            }
            return Ok(());
        }
        if !keep_size {
            self.zero_tail(vol, ino, end)?;
        }
        let leaf_sz = Self::leaf_size(vol, ino);
        let need = (end.div_ceil(leaf_sz) - off / leaf_sz) * leaf_sz / vol.block_size();
        if need > self.alloc.free_blocks() {
            return Err(FsError::NoSpace(format!(
                "fallocate of {len} bytes needs {need} blocks"
            )));
        }
        for li in off / leaf_sz..end.div_ceil(leaf_sz) {
            self.prealloc_leaf(vol, ino, li)?;
        }
        if !keep_size {
            ino.size = ino.size.max(end);
        }
        Ok(())
    }
}
