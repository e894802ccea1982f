//! Directories as linear-hash files: buckets, overflow chains, splits,
//! lookup, insert, remove, list.

use super::*;

impl State {
    /// Where directory block `idx` is (leaf and 4 KiB within it).
    pub(crate) fn dir_pos(vol: &Volume, dir: &Inode, idx: u64) -> (u64, u64) {
        let leaf_sz = Self::leaf_size(vol, dir);
        (
            idx * MD as u64 / leaf_sz,
            (idx * MD as u64 % leaf_sz) / MD as u64,
        )
    }

    /// The 4K address of directory block `idx`, allocating (zeroed) if absent.
    pub(crate) fn dir_block_alloc(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        idx: u64,
    ) -> Result<u64> {
        let (li, sub) = Self::dir_pos(vol, dir, idx);
        let (a, fresh) = self.map_alloc(vol, dir, li)?;
        if fresh {
            vol.zero(a * MD as u64, Self::leaf_size(vol, dir))?;
        }
        dir.size = dir.size.max((idx + 1) * MD as u64);
        Ok(a + sub)
    }

    /// The 4K address of directory block `idx`, which must exist.
    pub(crate) fn dir_block_ro(&mut self, vol: &Volume, dir: &Inode, idx: u64) -> Result<u64> {
        let (li, sub) = Self::dir_pos(vol, dir, idx);
        match self.get_ptr(vol, dir, li)? {
            0 => {
                let (lun, off) = vol.where_is(dir.addr * MD as u64);
                Err(corrupt(
                    &lun,
                    off,
                    format!("directory {:#x}", dir.addr),
                    format!("block {idx} is missing (a hole)"),
                ))
            }
            p => Ok((p & PTR_ADDR_MASK) + sub),
        }
    }

    pub(crate) fn bucket_read(
        &mut self,
        vol: &Volume,
        dir: &Inode,
        idx: u64,
    ) -> Result<(u64, Vec<DirEntry>, u32)> {
        let a = self.dir_block_ro(vol, dir, idx)?;
        let b = self.meta.get(vol, a, MAGIC_DIRBKT)?;
        let next = get32(b, 36);
        let es = bucket_entries(b).map_err(|r| {
            let (lun, off) = vol.where_is(a * MD as u64);
            corrupt(
                &lun,
                off,
                format!("directory bucket {idx} of directory {:#x}", dir.addr),
                r,
            )
        })?;
        Ok((a, es, next))
    }

    pub(crate) fn bucket_write(
        &mut self,
        vol: &Volume,
        addr: u64,
        es: &[DirEntry],
        next: u32,
    ) -> Result<()> {
        let b = self.meta.get_mut(vol, addr, MAGIC_DIRBKT)?;
        let ok = bucket_store(b, es);
        put32(b, 36, next);
        debug_assert!(ok);
        Ok(())
    }

    /// (hdr addr, level, split, entries)
    pub(crate) fn dir_hdr(&mut self, vol: &Volume, dir: &Inode) -> Result<(u64, u32, u32, u64)> {
        let a = self.dir_block_ro(vol, dir, 0)?;
        let b = self.meta.get(vol, a, MAGIC_DIRHDR)?;
        let (level, split, n) = (get32(b, 32), get32(b, 36), get64(b, 40));
        // Buckets are 2^level + split with split < 2^level.
        if level > 30 || u64::from(split) >= 1u64 << level {
            let (lun, off) = vol.where_is(a * MD as u64);
            return Err(corrupt(
                &lun,
                off,
                format!("directory header of {:#x}", dir.addr),
                format!("level {level} split {split}"),
            ));
        }
        Ok((a, level, split, n))
    }

    pub(crate) fn bucket_of(level: u32, split: u32, h: u64) -> u64 {
        let b = h & ((1u64 << level) - 1);
        if b < u64::from(split) {
            h & ((1u64 << (level + 1)) - 1)
        } else {
            b
        }
    }

    pub fn dir_init(&mut self, vol: &Volume, dir: &mut Inode, parent: u64) -> Result<()> {
        let h = self.dir_block_alloc(vol, dir, 0)?;
        let b = self.meta.create(h, MAGIC_DIRHDR, dir.addr);
        put64(b, 48, parent);
        let k = self.dir_block_alloc(vol, dir, 1)?;
        self.meta.create(k, MAGIC_DIRBKT, dir.addr);
        dir.parent = parent;
        Ok(())
    }

    pub fn dir_lookup(
        &mut self,
        vol: &Volume,
        dir: &Inode,
        name: &[u8],
    ) -> Result<Option<DirEntry>> {
        let h = name_hash(name);
        let (_, level, split, _) = self.dir_hdr(vol, dir)?;
        let mut idx = 1 + Self::bucket_of(level, split, h);
        for _ in 0..1_000_000 {
            let (_, es, next) = self.bucket_read(vol, dir, idx)?;
            if let Some(e) = es.into_iter().find(|e| e.hash == h && e.name == name) {
                return Ok(Some(e));
            }
            if next == 0 {
                return Ok(None);
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
        Err(FsError::Invalid(format!(
            "directory {:#x}: overflow chain loops",
            dir.addr
        )))
    }

    pub fn dir_list(&mut self, vol: &Volume, dir: &Inode) -> Result<Vec<DirEntry>> {
        let (_, level, split, _) = self.dir_hdr(vol, dir)?;
        let nb = (1u64 << level) + u64::from(split);
        let mut out = Vec::new();
        for b in 0..nb {
            let mut idx = 1 + b;
            let mut hops = 0;
            loop {
                let (_, es, next) = self.bucket_read(vol, dir, idx)?;
                out.extend(es);
                if next == 0 {
                    break;
                }
                hops += 1;
                if hops > 1_000_000 {
                    return Err(FsError::Invalid(format!(
                        "directory {:#x}: overflow chain loops",
                        dir.addr
                    )));
                }
                idx = DIR_OVF_BASE + u64::from(next) - 1;
            }
        }
        Ok(out)
    }

    pub(crate) fn ovf_alloc(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        hdr: u64,
    ) -> Result<(u32, u64)> {
        let b = self.meta.get(vol, hdr, MAGIC_DIRHDR)?;
        let (onext, ofree) = (get32(b, 56), get32(b, 60));
        let k = if ofree != 0 {
            let a = self.dir_block_ro(vol, dir, DIR_OVF_BASE + u64::from(ofree) - 1)?;
            let nf = get32(self.meta.get(vol, a, MAGIC_DIRBKT)?, 36);
            put32(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 60, nf);
            ofree
        } else {
            put32(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 56, onext + 1);
            onext + 1
        };
        let a = self.dir_block_alloc(vol, dir, DIR_OVF_BASE + u64::from(k) - 1)?;
        self.meta.create(a, MAGIC_DIRBKT, dir.addr);
        Ok((k, a))
    }

    pub(crate) fn ovf_release(
        &mut self,
        vol: &Volume,
        dir: &Inode,
        hdr: u64,
        k: u32,
    ) -> Result<()> {
        let a = self.dir_block_ro(vol, dir, DIR_OVF_BASE + u64::from(k) - 1)?;
        let head = get32(self.meta.get(vol, hdr, MAGIC_DIRHDR)?, 60);
        self.bucket_write(vol, a, &[], head)?;
        put32(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 60, k);
        Ok(())
    }

    /// Store `es` as the chain of bucket `b`, reusing or releasing overflow blocks.
    pub(crate) fn write_chain(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        hdr: u64,
        b: u64,
        es: Vec<DirEntry>,
    ) -> Result<()> {
        let (a, _, mut next) = self.bucket_read(vol, dir, 1 + b)?;
        while next != 0 {
            let (_, _, n2) = self.bucket_read(vol, dir, DIR_OVF_BASE + u64::from(next) - 1)?;
            self.ovf_release(vol, dir, hdr, next)?;
            next = n2;
        }
        let mut groups: Vec<Vec<DirEntry>> = vec![Vec::new()];
        let mut used = 0;
        for e in es {
            if DB_ENTRIES + used + e.disk_len() > MD {
                groups.push(Vec::new());
                used = 0;
            }
            used += e.disk_len();
            groups.last_mut().expect("one").push(e);
        }
        let mut addrs = vec![a];
        let mut ks = vec![0u32];
        for _ in 1..groups.len() {
            let (k, oa) = self.ovf_alloc(vol, dir, hdr)?;
            addrs.push(oa);
            ks.push(k);
        }
        for (i, g) in groups.iter().enumerate() {
            let next = ks.get(i + 1).copied().unwrap_or(0);
            self.bucket_write(vol, addrs[i], g, next)?;
        }
        Ok(())
    }

    pub fn dir_insert(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        name: &[u8],
        fd: u64,
        kind: u8,
    ) -> Result<()> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(fault(Fault::NameTooLong));
        }
        let e = DirEntry {
            hash: name_hash(name),
            fd,
            kind,
            name: name.to_vec(),
        };
        let (hdr, level, split, n) = self.dir_hdr(vol, dir)?;
        let b = Self::bucket_of(level, split, e.hash);
        let mut idx = 1 + b;
        loop {
            let (a, mut es, next) = self.bucket_read(vol, dir, idx)?;
            let used: usize = es.iter().map(DirEntry::disk_len).sum();
            if DB_ENTRIES + used + e.disk_len() <= MD {
                es.push(e);
                self.bucket_write(vol, a, &es, next)?;
                break;
            }
            if next == 0 {
                let (k, oa) = self.ovf_alloc(vol, dir, hdr)?;
                self.bucket_write(vol, oa, &[e], 0)?;
                self.bucket_write(vol, a, &es, k)?;
                break;
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
        put64(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 40, n + 1);
        let nb = (1u64 << level) + u64::from(split);
        if n + 1 > nb * DIR_SPLIT_LOAD {
            self.dir_split(vol, dir, hdr, level, split)?;
        }
        Ok(())
    }

    pub(crate) fn dir_split(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        hdr: u64,
        level: u32,
        split: u32,
    ) -> Result<()> {
        let s = u64::from(split);
        let newb = s + (1u64 << level);
        // Gather the chain of bucket s.
        let mut all = Vec::new();
        let mut idx = 1 + s;
        loop {
            let (_, es, next) = self.bucket_read(vol, dir, idx)?;
            all.extend(es);
            if next == 0 {
                break;
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
        let a = self.dir_block_alloc(vol, dir, 1 + newb)?;
        self.meta.create(a, MAGIC_DIRBKT, dir.addr);
        let mask = (1u64 << (level + 1)) - 1;
        let (stay, go): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| e.hash & mask == s);
        self.write_chain(vol, dir, hdr, s, stay)?;
        self.write_chain(vol, dir, hdr, newb, go)?;
        let (nl, ns) = if split + 1 == 1u32 << level {
            (level + 1, 0)
        } else {
            (level, split + 1)
        };
        let h = self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?;
        put32(h, 32, nl);
        put32(h, 36, ns);
        Ok(())
    }

    pub fn dir_remove(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        name: &[u8],
    ) -> Result<Option<DirEntry>> {
        let h = name_hash(name);
        let (hdr, level, split, n) = self.dir_hdr(vol, dir)?;
        let mut idx = 1 + Self::bucket_of(level, split, h);
        loop {
            let (a, mut es, next) = self.bucket_read(vol, dir, idx)?;
            if let Some(p) = es.iter().position(|e| e.hash == h && e.name == name) {
                let e = es.remove(p);
                self.bucket_write(vol, a, &es, next)?;
                put64(
                    self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?,
                    40,
                    n.saturating_sub(1),
                );
                return Ok(Some(e));
            }
            if next == 0 {
                return Ok(None);
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
    }

    /// Entries in a directory (from its header).
    pub fn dir_count(&mut self, vol: &Volume, dir: &Inode) -> Result<u64> {
        Ok(self.dir_hdr(vol, dir)?.3)
    }

    pub(crate) fn set_dotdot(&mut self, vol: &Volume, dir: &mut Inode, parent: u64) -> Result<()> {
        let (hdr, ..) = self.dir_hdr(vol, dir)?;
        put64(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 48, parent);
        dir.parent = parent;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lun::MemLun;

    fn fs() -> Fs {
        let l: Arc<dyn lun::Lun> = Arc::new(MemLun::new("dir", 64 << 20));
        Fs::mkfs(vec![l], &MkfsOptions::default()).unwrap()
    }

    /// A directory of thousands of entries: every name is found after the
    /// buckets split, removed ones are gone, the count follows, and a name
    /// is never in twice.
    #[test]
    fn names_survive_splits_and_removals() {
        let fs = fs();
        fs.op(|st, vol| {
            let mut d = st.ialloc(vol, S_IFDIR | 0o755, 0, 0)?;
            let root = vol.header.root_fd;
            st.dir_init(vol, &mut d, root)?;
            let (_, level0, _, _) = st.dir_hdr(vol, &d)?;
            let n = 3000u64;
            for k in 0..n {
                st.dir_insert(vol, &mut d, format!("entry-{k}").as_bytes(), 0x1000 + k, 1)?;
            }
            let (_, level, split, _) = st.dir_hdr(vol, &d)?;
            assert!(level > level0 || split > 0, "no bucket ever split");
            for k in (0..n).step_by(7) {
                let e = st.dir_lookup(vol, &d, format!("entry-{k}").as_bytes())?;
                assert_eq!(e.map(|e| e.fd), Some(0x1000 + k), "entry-{k}");
            }
            for k in (0..n).filter(|k| k % 2 == 0) {
                let e = st.dir_remove(vol, &mut d, format!("entry-{k}").as_bytes())?;
                assert_eq!(e.map(|e| e.fd), Some(0x1000 + k));
            }
            assert!(st.dir_lookup(vol, &d, b"entry-42")?.is_none());
            assert!(st.dir_lookup(vol, &d, b"entry-43")?.is_some());
            assert!(st.dir_remove(vol, &mut d, b"entry-42")?.is_none());
            let names: Vec<_> = st
                .dir_list(vol, &d)?
                .into_iter()
                .filter(|e| e.name.starts_with(b"entry-"))
                .map(|e| e.name)
                .collect();
            assert_eq!(names.len() as u64, n / 2);
            let unique: std::collections::HashSet<_> = names.iter().collect();
            assert_eq!(unique.len(), names.len());
            assert!(st.dir_insert(vol, &mut d, b"", 1, 1).is_err());
            assert!(st
                .dir_insert(vol, &mut d, &[b'x'; NAME_MAX + 1], 1, 1)
                .is_err());
            Ok(())
        })
        .unwrap();
    }
}
