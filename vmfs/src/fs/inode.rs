//! File descriptors (inodes): read, write back, allocate and free them.

use super::*;

impl State {
    pub fn iget(&mut self, vol: &Volume, addr: u64) -> Result<Inode> {
        if addr == 0 || addr & !PTR_ADDR_MASK != 0 {
            return Err(fault(Fault::NotFound));
        }
        let mut b = self.meta.get(vol, addr, MAGIC_FD)?;
        let fresh;
        if self
            .me
            .is_some_and(|me| exclusive_elsewhere(b, me).is_some())
        {
            // Another host holds this file alone and changes its descriptor
            // without the volume lock: what is cached may be old.
            fresh = self.meta.read_fresh(vol, addr, MAGIC_FD)?;
            b = &fresh;
        }
        let body = &b[LOCK_SECTOR..];
        if get32(body, 32) == 0 {
            return Err(fault(Fault::NotFound)); // a freed descriptor
        }
        Inode::decode(body, addr).map_err(|reason| {
            let (lun, off) = vol.where_is(addr * MD as u64);
            corrupt(
                &lun,
                off + LOCK_SECTOR as u64,
                format!("file descriptor {addr:#x}"),
                reason,
            )
        })
    }

    pub fn iput(&mut self, vol: &Volume, ino: &Inode) -> Result<()> {
        if ino.layout == Layout::Inline && ino.size > INLINE_MAX as u64 {
            // Never write a descriptor the decoder would reject.
            return Err(FsError::Invalid(format!(
                "internal error: inline file {:#x} of {} bytes",
                ino.addr, ino.size
            )));
        }
        if let Some(me) = self.me {
            let b = self.meta.get(vol, ino.addr, MAGIC_FD)?;
            if let Some(h) = exclusive_elsewhere(b, me) {
                let table = crate::cluster::slot_table(vol)?;
                if crate::cluster::is_current(&table, &h) {
                    return Err(FsError::Busy(format!(
                        "file descriptor {:#x} is open for writing by the host in slot {} (generation {}): its metadata cannot change elsewhere until that host closes it",
                        ino.addr, h.slot, h.generation
                    )));
                }
            }
        }
        let b = self.meta.get_mut(vol, ino.addr, MAGIC_FD)?;
        ino.encode(&mut b[LOCK_SECTOR..]);
        Ok(())
    }

    /// Write back a renamed file's descriptor (its new ctime), except when
    /// another host holds the file open alone: its descriptor is that
    /// host's to change, and rename need not touch it (POSIX leaves the
    /// ctime update to the implementation), so the rename goes ahead.
    pub(crate) fn iput_renamed(&mut self, vol: &Volume, ino: &Inode) -> Result<()> {
        if let Some(me) = self.me {
            let b = self.meta.get(vol, ino.addr, MAGIC_FD)?;
            if exclusive_elsewhere(b, me).is_some() {
                return Ok(());
            }
        }
        self.iput(vol, ino)
    }

    pub(crate) fn ialloc(&mut self, vol: &Volume, mode: u32, uid: u32, gid: u32) -> Result<Inode> {
        let addr = self.alloc.alloc_res(vol, &mut self.meta, ResType::Fd)?;
        self.next_gen += 1;
        let mut ino = Inode::new(addr, mode, uid, gid, now(), self.next_gen);
        if mode & S_IFMT == S_IFDIR {
            ino.layout = Layout::Tree {
                sub: true,
                depth: 0,
            };
        }
        self.meta.create(addr, MAGIC_FD, 0);
        self.iput(vol, &ino)?;
        Ok(ino)
    }

    /// Free a descriptor and everything it owns.
    pub(crate) fn ifree(&mut self, vol: &Volume, ino: &mut Inode) -> Result<()> {
        self.free_range(vol, ino, 0, u64::MAX)?;
        let b = self.meta.get_mut(vol, ino.addr, MAGIC_FD)?;
        let gen = ino.generation;
        init_body(&mut b[LOCK_SECTOR..], MAGIC_FD, ino.addr, 0);
        put64(&mut b[LOCK_SECTOR..], 56, gen);
        self.alloc
            .free_res(vol, &mut self.meta, ResType::Fd, ino.addr)
    }
}
