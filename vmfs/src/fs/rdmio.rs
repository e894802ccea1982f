//! Raw device mappings open on this host: a mapping file's LUN, opened at
//! open and used for its I/O.

use super::*;

impl Fs {
    /// Write `descriptor` as the new regular file `name` in `dir`, flag it a
    /// raw device mapping (FD flag [`FD_FLAG_RDM`]) and give it the mapped
    /// LUN's size (sparse: only the descriptor takes space).
    pub fn create_mapping(
        &self,
        dir: u64,
        name: &[u8],
        descriptor: &[u8],
        lun_size: u64,
    ) -> Result<Inode> {
        let i = self.create(dir, name, libc::S_IFREG | 0o600, 0, 0, 0, None)?;
        self.open_file(i.addr, true)?;
        let r = (|| {
            self.write(i.addr, 0, descriptor)?;
            self.op(|st, vol| {
                let mut n = st.iget(vol, i.addr)?;
                if lun_size > n.size {
                    st.truncate(vol, &mut n, lun_size)?;
                }
                n.flags |= crate::format::FD_FLAG_RDM;
                st.iput(vol, &n)?;
                Ok(n)
            })
        })();
        let closed = self.release(i.addr, true);
        let n = r?;
        closed?;
        self.sync()?;
        Ok(n)
    }

    /// The LUN URLs this host may open for raw device mappings (searched
    /// before a mapping's own URL hint).
    pub fn set_rdm_luns(&self, urls: Vec<String>) {
        *self.rdm_luns.write().unwrap_or_else(|p| p.into_inner()) = urls;
    }

    /// The descriptor of mapping `i`, as stored (not the LUN's data).
    pub fn mapping_of(&self, i: &Inode) -> Result<rdm::Mapping> {
        let len = i.size.min(rdm::MAX_DESCRIPTOR as u64 + 1) as usize;
        let text = self.read_stored(i.addr, 0, len)?;
        rdm::Mapping::parse_file(&text, &format!("mapping file {:#x}", i.addr))
            .map_err(|e| FsError::File(Fault::NoDevice, e.to_string()))
    }

    /// After the file lock of mapping `i` is taken: open its LUN (once per
    /// host), found by identity and checked; writes go through this host's
    /// fence like every other write.
    pub(crate) fn attach_mapping(&self, i: &Inode) -> Result<()> {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = m.get_mut(&i.addr) {
            x.opens += 1;
            return Ok(());
        }
        let mapping = self.mapping_of(i)?;
        let opts = self
            .member
            .get()
            .map(|mb| mb.timeouts.lun_options())
            .unwrap_or_default();
        let list = self
            .rdm_luns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lun = rdm::resolve(&mapping, &list, opts).map_err(|e| {
            tracing::error!("raw device mapping {:#x}: {e}", i.addr);
            FsError::File(Fault::NoDevice, e.to_string())
        })?;
        let lun: Arc<dyn lun::Lun> = match self.member.get() {
            Some(mb) => Arc::new(lun::FencedLun::new(lun, mb.lease.clone())),
            None => lun,
        };
        m.insert(
            i.addr,
            Mapped {
                lun,
                inode: i.clone(),
                opens: 1,
            },
        );
        self.mapped_count
            .store(m.len(), std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn detach_mapping(&self, ino: u64) {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = m.get_mut(&ino) {
            x.opens -= 1;
            if x.opens == 0 {
                m.remove(&ino);
                self.mapped_count
                    .store(m.len(), std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// The LUN of an open raw device mapping, with the mapping's inode.
    pub(crate) fn mapped_lun(&self, ino: u64) -> Option<(Arc<dyn lun::Lun>, Inode)> {
        if self.mapped_count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return None;
        }
        let m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&ino).map(|x| (x.lun.clone(), x.inode.clone()))
    }
}
