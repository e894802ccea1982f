//! The block map: each file's pointer tree (leaves, pointer blocks, holes,
//! unwritten leaves), mapping and freeing leaves, and walking it for data
//! and holes (what SEEK_DATA/SEEK_HOLE and the file API's allocated ranges
//! answer).

use super::*;

impl State {
    pub fn leaf_size(vol: &Volume, ino: &Inode) -> u64 {
        match ino.layout {
            Layout::Tree { sub: true, .. } => u64::from(vol.header.sub_block_size),
            _ => vol.block_size(),
        }
    }

    pub(crate) fn span(level: u8) -> u64 {
        (PB_PTRS as u64).pow(u32::from(level))
    }

    pub(crate) fn pb_ptr(&mut self, vol: &Volume, pb: u64, i: usize) -> Result<u64> {
        Ok(get64(self.meta.get(vol, pb, MAGIC_PTR)?, 64 + i * 8))
    }

    pub(crate) fn check_ptr(vol: &Volume, ino: &Inode, p: u64) -> Result<u64> {
        let a = p & PTR_ADDR_MASK;
        if a * MD as u64 >= vol.header.total_blocks() * vol.block_size() {
            let (lun, off) = vol.where_is(ino.addr * MD as u64);
            return Err(corrupt(
                &lun,
                off,
                format!("file descriptor {:#x}", ino.addr),
                format!("pointer {a:#x} is beyond the volume"),
            ));
        }
        Ok(p)
    }

    /// The pointer of leaf `li` (0: a hole).
    pub fn get_ptr(&mut self, vol: &Volume, ino: &Inode, li: u64) -> Result<u64> {
        let Layout::Tree { depth, .. } = ino.layout else {
            return Ok(0);
        };
        let span = Self::span(depth);
        let root = li / span;
        if root >= FD_PTRS as u64 {
            return Ok(0);
        }
        let mut p = ino.ptr(root as usize);
        let mut rem = li % span;
        let mut lvl = depth;
        while lvl > 0 {
            if p == 0 {
                return Ok(0);
            }
            let pb = Self::check_ptr(vol, ino, p)? & PTR_ADDR_MASK;
            lvl -= 1;
            let s = Self::span(lvl);
            p = self.pb_ptr(vol, pb, (rem / s) as usize)?;
            rem %= s;
        }
        Self::check_ptr(vol, ino, p)
    }

    /// The first byte at or after `off` that holds data (a written leaf,
    /// or inline bytes); None when no leaf past it does. Empty pointer
    /// blocks are skipped whole.
    pub fn next_data(&mut self, vol: &Volume, ino: &Inode, off: u64) -> Result<Option<u64>> {
        if ino.layout == Layout::Inline {
            return Ok((off < ino.size).then_some(off));
        }
        let leaf = Self::leaf_size(vol, ino);
        Ok(self
            .scan(vol, ino, off / leaf, true)?
            .map(|li| (li * leaf).max(off)))
    }

    /// The first byte at or after `off` in a hole (unwritten leaves read as
    /// zeros and count as holes); past the last leaf everything is one.
    pub fn next_hole(&mut self, vol: &Volume, ino: &Inode, off: u64) -> Result<u64> {
        if ino.layout == Layout::Inline {
            return Ok(off.max(ino.size));
        }
        let leaf = Self::leaf_size(vol, ino);
        Ok(match self.scan(vol, ino, off / leaf, false)? {
            Some(li) => (li * leaf).max(off),
            None => (FD_PTRS as u64 * Self::tree_span(ino))
                .saturating_mul(leaf)
                .max(off),
        })
    }

    pub(crate) fn tree_span(ino: &Inode) -> u64 {
        match ino.layout {
            Layout::Tree { depth, .. } => Self::span(depth),
            Layout::Inline => 1,
        }
    }

    /// The first leaf at or after `from` that is data (`data`) or a hole.
    pub(crate) fn scan(
        &mut self,
        vol: &Volume,
        ino: &Inode,
        from: u64,
        data: bool,
    ) -> Result<Option<u64>> {
        let Layout::Tree { depth, .. } = ino.layout else {
            return Ok(None);
        };
        let span = Self::span(depth);
        for root in from / span..FD_PTRS as u64 {
            let found = self.scan_node(
                vol,
                ino,
                ino.ptr(root as usize),
                depth,
                root * span,
                from,
                data,
            )?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// [`State::scan`] below pointer `p` of `level`, which covers the leaves
    /// from `base` on.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scan_node(
        &mut self,
        vol: &Volume,
        ino: &Inode,
        p: u64,
        level: u8,
        base: u64,
        from: u64,
        data: bool,
    ) -> Result<Option<u64>> {
        if level == 0 {
            let is_data = p != 0 && p & PTR_UNWRITTEN == 0;
            return Ok((is_data == data).then_some(base));
        }
        if p == 0 {
            return Ok((!data).then_some(base.max(from)));
        }
        let pb = Self::check_ptr(vol, ino, p)? & PTR_ADDR_MASK;
        let s = Self::span(level - 1);
        let first = from.saturating_sub(base) / s;
        for k in first..PB_PTRS as u64 {
            let child = self.pb_ptr(vol, pb, k as usize)?;
            let r = self.scan_node(vol, ino, child, level - 1, base + k * s, from, data)?;
            if r.is_some() {
                return Ok(r);
            }
        }
        Ok(None)
    }

    pub(crate) fn alloc_leaf(&mut self, vol: &Volume, sub: bool) -> Result<u64> {
        if sub {
            self.alloc.alloc_res(vol, &mut self.meta, ResType::SubBlock)
        } else {
            Ok(self.alloc.alloc_fb(vol, &mut self.meta)? * vol.blocks_per_4k())
        }
    }

    pub(crate) fn free_leaf(&mut self, vol: &Volume, sub: bool, addr: u64) -> Result<()> {
        if sub {
            self.alloc
                .free_res(vol, &mut self.meta, ResType::SubBlock, addr)
        } else {
            self.alloc
                .free_fb(vol, &mut self.meta, addr / vol.blocks_per_4k())
        }
    }

    pub(crate) fn new_pb(&mut self, vol: &Volume, ino: &mut Inode) -> Result<u64> {
        let a = self
            .alloc
            .alloc_res(vol, &mut self.meta, ResType::PtrBlock)?;
        self.meta.create(a, MAGIC_PTR, ino.addr);
        ino.alloc_bytes += MD as u64;
        Ok(a)
    }

    /// Map leaf `li`, allocating what is missing. Returns the leaf's 4K
    /// address and whether it is fresh (its unwritten parts must be zeroed
    /// before anything points at it durably).
    pub fn map_alloc(&mut self, vol: &Volume, ino: &mut Inode, li: u64) -> Result<(u64, bool)> {
        let Layout::Tree { sub, mut depth } = ino.layout else {
            return Err(FsError::Invalid("map_alloc on an inline file".into()));
        };
        while li >= FD_PTRS as u64 * Self::span(depth) {
            if depth >= 4 {
                return Err(fault(Fault::TooBig));
            }
            let pb = self.new_pb(vol, ino)?;
            let b = self.meta.get_mut(vol, pb, MAGIC_PTR)?;
            for i in 0..FD_PTRS {
                put64(b, 64 + i * 8, ino.ptr(i));
            }
            ino.area[..FD_PTRS * 8].fill(0);
            ino.set_ptr(0, pb);
            depth += 1;
            ino.layout = Layout::Tree { sub, depth };
        }
        let span = Self::span(depth);
        let root = (li / span) as usize;
        let mut rem = li % span;
        // `node` = None: the descriptor's own pointers; Some(pb): a pointer block.
        let mut node: Option<u64> = None;
        let mut idx = root;
        let mut lvl = depth;
        loop {
            let p = match node {
                None => ino.ptr(idx),
                Some(pb) => self.pb_ptr(vol, pb, idx)?,
            };
            let p = if p != 0 {
                Self::check_ptr(vol, ino, p)?
            } else {
                0
            };
            if lvl == 0 {
                let leaf_sz = Self::leaf_size(vol, ino);
                let (addr, fresh, newp) = if p == 0 {
                    let a = self.alloc_leaf(vol, sub)?;
                    ino.alloc_bytes += leaf_sz;
                    (a, true, Some(a))
                } else if p & PTR_UNWRITTEN != 0 {
                    (p & PTR_ADDR_MASK, true, Some(p & PTR_ADDR_MASK))
                } else {
                    (p, false, None)
                };
                if let Some(np) = newp {
                    self.set_ptr(vol, ino, node, idx, np)?;
                }
                return Ok((addr, fresh));
            }
            let child = if p == 0 {
                let pb = self.new_pb(vol, ino)?;
                self.set_ptr(vol, ino, node, idx, pb)?;
                pb
            } else {
                p & PTR_ADDR_MASK
            };
            lvl -= 1;
            let s = Self::span(lvl);
            idx = (rem / s) as usize;
            rem %= s;
            node = Some(child);
        }
    }

    pub(crate) fn set_ptr(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        node: Option<u64>,
        idx: usize,
        v: u64,
    ) -> Result<()> {
        match node {
            None => ino.set_ptr(idx, v),
            Some(pb) => put64(self.meta.get_mut(vol, pb, MAGIC_PTR)?, 64 + idx * 8, v),
        }
        Ok(())
    }

    /// Mark leaf `li` allocated-but-unwritten (fallocate), if it is a hole.
    pub(crate) fn prealloc_leaf(&mut self, vol: &Volume, ino: &mut Inode, li: u64) -> Result<()> {
        if self.get_ptr(vol, ino, li)? != 0 {
            return Ok(());
        }
        let (addr, _) = self.map_alloc(vol, ino, li)?;
        // map_alloc stored a plain pointer; mark it unwritten in place.
        self.rewrite_ptr(vol, ino, li, addr | PTR_UNWRITTEN)
    }

    pub(crate) fn rewrite_ptr(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        li: u64,
        v: u64,
    ) -> Result<()> {
        let Layout::Tree { depth, .. } = ino.layout else {
            return Ok(());
        };
        let span = Self::span(depth);
        let mut node = None;
        let mut idx = (li / span) as usize;
        let mut rem = li % span;
        let mut lvl = depth;
        while lvl > 0 {
            let p = match node {
                None => ino.ptr(idx),
                Some(pb) => self.pb_ptr(vol, pb, idx)?,
            };
            lvl -= 1;
            let s = Self::span(lvl);
            node = Some(p & PTR_ADDR_MASK);
            idx = (rem / s) as usize;
            rem %= s;
        }
        self.set_ptr(vol, ino, node, idx, v)
    }

    /// Free leaves `[from, to)`; pointer blocks left empty are freed too.
    pub fn free_range(&mut self, vol: &Volume, ino: &mut Inode, from: u64, to: u64) -> Result<()> {
        let Layout::Tree { sub, depth } = ino.layout else {
            return Ok(());
        };
        let span = Self::span(depth);
        let leaf_sz = Self::leaf_size(vol, ino);
        for r in 0..FD_PTRS {
            let base = r as u64 * span;
            if base >= to || base + span <= from {
                continue;
            }
            let p = ino.ptr(r);
            if p == 0 {
                continue;
            }
            let p = Self::check_ptr(vol, ino, p)?;
            if depth == 0 {
                self.free_leaf(vol, sub, p & PTR_ADDR_MASK)?;
                ino.alloc_bytes = ino.alloc_bytes.saturating_sub(leaf_sz);
                ino.set_ptr(r, 0);
            } else if self.free_in_pb(
                vol,
                ino,
                p & PTR_ADDR_MASK,
                depth,
                base,
                from,
                to,
                sub,
                leaf_sz,
            )? {
                ino.set_ptr(r, 0);
            }
        }
        if from == 0 && to == u64::MAX {
            ino.layout = if ino.is_dir() {
                Layout::Tree {
                    sub: true,
                    depth: 0,
                }
            } else {
                Layout::Inline
            };
            ino.area.fill(0);
        }
        Ok(())
    }

    /// Returns true when the pointer block was freed (it became empty).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn free_in_pb(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        pb: u64,
        lvl: u8,
        base: u64,
        from: u64,
        to: u64,
        sub: bool,
        leaf_sz: u64,
    ) -> Result<bool> {
        let s = Self::span(lvl - 1);
        let mut any_left = false;
        for i in 0..PB_PTRS {
            let p = self.pb_ptr(vol, pb, i)?;
            if p == 0 {
                continue;
            }
            let cb = base + i as u64 * s;
            if cb >= to || cb + s <= from {
                any_left = true;
                continue;
            }
            let p = Self::check_ptr(vol, ino, p)?;
            let cleared = if lvl == 1 {
                self.free_leaf(vol, sub, p & PTR_ADDR_MASK)?;
                ino.alloc_bytes = ino.alloc_bytes.saturating_sub(leaf_sz);
                true
            } else {
                self.free_in_pb(
                    vol,
                    ino,
                    p & PTR_ADDR_MASK,
                    lvl - 1,
                    cb,
                    from,
                    to,
                    sub,
                    leaf_sz,
                )?
            };
            if cleared {
                put64(self.meta.get_mut(vol, pb, MAGIC_PTR)?, 64 + i * 8, 0);
            } else {
                any_left = true;
            }
        }
        if !any_left {
            self.meta.forget(pb);
            self.alloc
                .free_res(vol, &mut self.meta, ResType::PtrBlock, pb)?;
            ino.alloc_bytes = ino.alloc_bytes.saturating_sub(MD as u64);
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lun::MemLun;

    const BS: u64 = 64 << 10;

    /// The data/hole walk over a tree two levels deep: written leaves are
    /// data, holes and unwritten (preallocated) leaves are not, whole empty
    /// pointer subtrees are skipped, and freeing leaves makes them holes.
    #[test]
    fn data_and_holes_are_found_across_pointer_blocks() {
        let l: Arc<dyn lun::Lun> = Arc::new(MemLun::new("bmap", 256 << 20));
        let opts = MkfsOptions {
            block_size: BS as u32,
            ..Default::default()
        };
        let fs = Fs::mkfs(vec![l], &opts).unwrap();
        let f = fs
            .create(fs.root(), b"f", S_IFREG | 0o644, 0, 0, 0, None)
            .unwrap();
        // Leaves 0 and 5 in the first pointer block's range, 1000 beyond
        // it, 10 and 11 preallocated.
        let far = 1000 * BS;
        for at in [0, 5 * BS, far] {
            fs.write(f.addr, at, &[1u8; 100]).unwrap();
        }
        fs.fallocate(f.addr, 10 * BS, 2 * BS, libc::FALLOC_FL_KEEP_SIZE)
            .unwrap();
        fs.op(|st, vol| {
            let i = st.iget(vol, f.addr)?;
            assert!(matches!(i.layout, Layout::Tree { sub: false, depth } if depth >= 1));
            assert_eq!(st.next_data(vol, &i, 0)?, Some(0));
            assert_eq!(st.next_data(vol, &i, 1)?, Some(1));
            assert_eq!(st.next_data(vol, &i, BS)?, Some(5 * BS));
            assert_eq!(st.next_data(vol, &i, 5 * BS + 7)?, Some(5 * BS + 7));
            // The unwritten leaves 10 and 11 read as zeros: not data.
            assert_eq!(st.next_data(vol, &i, 6 * BS)?, Some(far));
            assert_eq!(st.next_data(vol, &i, far + BS)?, None);
            assert_eq!(st.next_hole(vol, &i, 0)?, BS);
            assert_eq!(st.next_hole(vol, &i, 5 * BS)?, 6 * BS);
            assert_eq!(st.next_hole(vol, &i, 10 * BS)?, 10 * BS);
            assert_eq!(st.next_hole(vol, &i, far)?, far + BS);
            assert!(st.get_ptr(vol, &i, 10)? & PTR_UNWRITTEN != 0);
            assert_eq!(st.get_ptr(vol, &i, 500)?, 0);
            Ok(())
        })
        .unwrap();
        // Free leaves 0..6: the first data is the far leaf.
        fs.op(|st, vol| {
            let mut i = st.iget(vol, f.addr)?;
            st.free_range(vol, &mut i, 0, 6)?;
            st.iput(vol, &i)?;
            assert_eq!(st.next_data(vol, &i, 0)?, Some(far));
            assert_eq!(st.next_hole(vol, &i, 0)?, 0);
            Ok(())
        })
        .unwrap();
        let r = crate::fsck::check(&fs, false, None).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }
}
