//! The namespace: lookup, readdir, create, link, unlink, rename, setattr,
//! readlink, the multi-writer mark.

use super::*;

impl Fs {
    /// Set or clear a file's multi-writer flag (several hosts may then
    /// open it for writing at once). Refused while it is open for writing.
    pub fn set_multi_writer(&self, ino: u64, on: bool) -> Result<()> {
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(fault(Fault::IsDir));
            }
            let open_here = st.flocks.get(&ino).is_some_and(|f| f.writers > 0);
            if open_here {
                return Err(FsError::Busy(format!(
                    "file descriptor {ino:#x} is open for writing: close it before changing its multi-writer flag"
                )));
            }
            self.check_not_open_elsewhere(ino, "change the multi-writer flag of")?;
            if on {
                i.flags |= FD_FLAG_MULTI_WRITER;
            } else {
                i.flags &= !FD_FLAG_MULTI_WRITER;
            }
            i.ctime = now();
            st.iput(vol, &i)
        })
    }

    pub fn getattr(&self, ino: u64) -> Result<Inode> {
        self.read_op(|st, vol| st.iget(vol, ino))
    }

    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<Inode> {
        self.read_op(|st, _| self.lookup_locked(st, dir, name))
    }

    pub fn lookup_locked(&self, st: &mut State, dir: u64, name: &[u8]) -> Result<Inode> {
        if name.len() > NAME_MAX {
            return Err(fault(Fault::NameTooLong));
        }
        let d = st.iget(&self.vol(), dir)?;
        if !d.is_dir() {
            return Err(fault(Fault::NotDir));
        }
        if name == b"." {
            return Ok(d);
        }
        if name == b".." {
            return st.iget(&self.vol(), d.parent);
        }
        match st.dir_lookup(&self.vol(), &d, name)? {
            Some(e) => st.iget(&self.vol(), e.fd),
            None => Err(fault(Fault::NotFound)),
        }
    }

    pub fn readdir(&self, dir: u64) -> Result<Vec<DirEntry>> {
        self.read_op(|st, vol| {
            let d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(fault(Fault::NotDir));
            }
            st.dir_list(vol, &d)
        })
    }

    pub(crate) fn check_name(name: &[u8]) -> Result<()> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(fault(Fault::Invalid));
        }
        if name.len() > NAME_MAX {
            return Err(fault(Fault::NameTooLong));
        }
        Ok(())
    }

    /// Create a node of any type other than a directory.
    pub fn create(
        &self,
        dir: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Inode> {
        Self::check_name(name)?;
        self.op(|st, vol| {
            let mut d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(fault(Fault::NotDir));
            }
            if d.nlink == 0 {
                return Err(fault(Fault::NotFound));
            }
            if st.dir_lookup(vol, &d, name)?.is_some() {
                return Err(fault(Fault::Exists));
            }
            let is_dir = mode & S_IFMT == S_IFDIR;
            let mut mode = mode;
            let gid = if d.mode & libc::S_ISGID != 0 {
                if is_dir {
                    mode |= libc::S_ISGID;
                }
                d.gid
            } else {
                gid
            };
            let mut ino = st.ialloc(vol, mode, uid, gid)?;
            ino.rdev = rdev;
            if is_dir {
                ino.nlink = 2;
                st.dir_init(vol, &mut ino, d.addr)?;
                d.nlink += 1;
            }
            if let Some(t) = target {
                st.write_locked(vol, &mut ino, 0, t)?;
            }
            st.iput(vol, &ino)?;
            st.dir_insert(vol, &mut d, name, ino.addr, kind_of(mode))?;
            let t = now();
            d.mtime = t;
            d.ctime = t;
            st.iput(vol, &d)?;
            Ok(ino)
        })
    }

    pub fn link(&self, ino: u64, dir: u64, name: &[u8]) -> Result<Inode> {
        Self::check_name(name)?;
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(fault(Fault::NotPermitted));
            }
            let mut d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(fault(Fault::NotDir));
            }
            if i.nlink >= 65000 {
                return Err(fault(Fault::TooManyLinks));
            }
            if st.dir_lookup(vol, &d, name)?.is_some() {
                return Err(fault(Fault::Exists));
            }
            st.dir_insert(vol, &mut d, name, i.addr, kind_of(i.mode))?;
            i.nlink += 1;
            let t = now();
            i.ctime = t;
            d.mtime = t;
            d.ctime = t;
            st.iput(vol, &i)?;
            st.iput(vol, &d)?;
            st.orphans.remove(&i.addr);
            Ok(i)
        })
    }

    /// Drop one link of `i`; free it when no link and no open handle remains.
    pub(crate) fn drop_link(st: &mut State, vol: &Volume, i: &mut Inode) -> Result<()> {
        i.nlink = i.nlink.saturating_sub(if i.is_dir() { 2 } else { 1 });
        i.ctime = now();
        if i.nlink == 0 {
            if st.open.get(&i.addr).copied().unwrap_or(0) > 0 {
                st.orphans.insert(i.addr);
                st.iput(vol, i)?;
            } else {
                st.ifree(vol, i)?;
            }
        } else {
            st.iput(vol, i)?;
        }
        Ok(())
    }

    pub fn unlink(&self, dir: u64, name: &[u8], rmdir: bool) -> Result<()> {
        if name == b"." {
            return Err(fault(Fault::Invalid));
        }
        if name == b".." {
            return Err(fault(Fault::NotEmpty));
        }
        self.op(|st, vol| {
            let mut d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(fault(Fault::NotDir));
            }
            let e = st
                .dir_lookup(vol, &d, name)?
                .ok_or_else(|| fault(Fault::NotFound))?;
            let mut i = st.iget(vol, e.fd)?;
            if rmdir {
                if !i.is_dir() {
                    return Err(fault(Fault::NotDir));
                }
                if st.dir_count(vol, &i)? > 0 {
                    return Err(fault(Fault::NotEmpty));
                }
                d.nlink -= 1;
            } else if i.is_dir() {
                return Err(fault(Fault::IsDir));
            } else if i.nlink <= 1 {
                self.check_not_open_elsewhere(i.addr, "remove the last name of")?;
            }
            st.dir_remove(vol, &mut d, name)?;
            let t = now();
            d.mtime = t;
            d.ctime = t;
            st.iput(vol, &d)?;
            Self::drop_link(st, vol, &mut i)
        })
    }

    /// Is `anc` an ancestor of (or equal to) `dir`?
    pub(crate) fn is_ancestor(
        st: &mut State,
        vol: &Volume,
        anc: u64,
        mut dir: u64,
        root: u64,
    ) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == anc {
                return Ok(true);
            }
            if dir == root {
                return Ok(false);
            }
            dir = st.iget(vol, dir)?.parent;
        }
        Err(FsError::Invalid("directory parent chain loops".into()))
    }

    pub fn rename(
        &self,
        pdir: u64,
        name: &[u8],
        ndir: u64,
        nname: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> Result<()> {
        Self::check_name(nname)?;
        if name == b"." || name == b".." {
            return Err(fault(Fault::Invalid));
        }
        let root = self.root();
        self.op(|st, vol| {
            let mut src_dir = st.iget(vol, pdir)?;
            let e = st
                .dir_lookup(vol, &src_dir, name)?
                .ok_or_else(|| fault(Fault::NotFound))?;
            let mut dst_dir = if ndir == pdir {
                src_dir.clone()
            } else {
                st.iget(vol, ndir)?
            };
            if !dst_dir.is_dir() {
                return Err(fault(Fault::NotDir));
            }
            let mut src = st.iget(vol, e.fd)?;
            let existing = st.dir_lookup(vol, &dst_dir, nname)?;
            if src.is_dir() && Self::is_ancestor(st, vol, src.addr, ndir, root)? {
                return Err(fault(Fault::Invalid));
            }
            if let Some(x) = &existing {
                if x.fd == src.addr {
                    return Ok(()); // same file: nothing to do
                }
                if noreplace {
                    return Err(fault(Fault::Exists));
                }
            } else if exchange {
                return Err(fault(Fault::NotFound));
            }
            let t = now();
            if exchange {
                let x = existing.expect("checked");
                let mut other = st.iget(vol, x.fd)?;
                if other.is_dir() && Self::is_ancestor(st, vol, other.addr, pdir, root)? {
                    return Err(fault(Fault::Invalid));
                }
                st.dir_remove(vol, &mut src_dir, name)?;
                if ndir == pdir {
                    st.dir_remove(vol, &mut src_dir, nname)?;
                    st.dir_insert(vol, &mut src_dir, nname, src.addr, kind_of(src.mode))?;
                    st.dir_insert(vol, &mut src_dir, name, other.addr, kind_of(other.mode))?;
                } else {
                    st.dir_remove(vol, &mut dst_dir, nname)?;
                    st.dir_insert(vol, &mut dst_dir, nname, src.addr, kind_of(src.mode))?;
                    st.dir_insert(vol, &mut src_dir, name, other.addr, kind_of(other.mode))?;
                    if src.is_dir() != other.is_dir() {
                        let (gain, lose) = if src.is_dir() {
                            (&mut dst_dir, &mut src_dir)
                        } else {
                            (&mut src_dir, &mut dst_dir)
                        };
                        gain.nlink += 1;
                        lose.nlink -= 1;
                    }
                    if src.is_dir() {
                        st.set_dotdot(vol, &mut src, ndir)?;
                    }
                    if other.is_dir() {
                        st.set_dotdot(vol, &mut other, pdir)?;
                    }
                }
                src.ctime = t;
                other.ctime = t;
                st.iput_renamed(vol, &src)?;
                st.iput_renamed(vol, &other)?;
            } else {
                if let Some(x) = &existing {
                    let mut victim = st.iget(vol, x.fd)?;
                    match (src.is_dir(), victim.is_dir()) {
                        (true, false) => return Err(fault(Fault::NotDir)),
                        (false, true) => return Err(fault(Fault::IsDir)),
                        (true, true) => {
                            if st.dir_count(vol, &victim)? > 0 {
                                return Err(fault(Fault::NotEmpty));
                            }
                        }
                        _ => {}
                    }
                    if !victim.is_dir() && victim.nlink <= 1 {
                        self.check_not_open_elsewhere(victim.addr, "replace")?;
                    }
                    st.dir_remove(vol, &mut dst_dir, nname)?;
                    if victim.is_dir() {
                        dst_dir.nlink -= 1;
                    }
                    Self::drop_link(st, vol, &mut victim)?;
                }
                if ndir == pdir {
                    st.dir_remove(vol, &mut dst_dir, name)?;
                } else {
                    st.dir_remove(vol, &mut src_dir, name)?;
                }
                st.dir_insert(vol, &mut dst_dir, nname, src.addr, kind_of(src.mode))?;
                if src.is_dir() && ndir != pdir {
                    src_dir.nlink -= 1;
                    dst_dir.nlink += 1;
                    st.set_dotdot(vol, &mut src, ndir)?;
                }
                src.ctime = t;
                st.iput_renamed(vol, &src)?;
            }
            if ndir != pdir {
                src_dir.mtime = t;
                src_dir.ctime = t;
                st.iput(vol, &src_dir)?;
            }
            dst_dir.mtime = t;
            dst_dir.ctime = t;
            st.iput(vol, &dst_dir)?;
            Ok(())
        })
    }

    pub fn setattr(&self, ino: u64, a: &SetAttr) -> Result<Inode> {
        let fd = self.file_data(ino);
        let _g = a
            .size
            .map(|_| fd.rw.write().unwrap_or_else(|p| p.into_inner()));
        // Sizes and times cached for the in-place path are forgotten.
        let _forget = Forget(&fd);
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            if a.size.is_some() && i.flags & FD_FLAG_RDM != 0 {
                return Err(FsError::File(
                    Fault::NotPermitted,
                    format!("file {ino:#x} is a raw device mapping: its size is its LUN's"),
                ));
            }
            let t = now();
            if let Some(m) = a.mode {
                i.mode = (i.mode & S_IFMT) | (m & 0o7777);
            }
            if let Some(u) = a.uid {
                i.uid = u;
            }
            if let Some(g) = a.gid {
                i.gid = g;
            }
            if let Some(s) = a.size {
                if i.is_dir() {
                    return Err(fault(Fault::IsDir));
                }
                self.check_not_open_elsewhere(i.addr, "truncate")?;
                st.truncate(vol, &mut i, s)?;
                i.mtime = t;
            }
            if let Some(x) = a.atime {
                i.atime = x;
            }
            if let Some(x) = a.mtime {
                i.mtime = x;
            }
            i.ctime = a.ctime.unwrap_or(t);
            st.iput(vol, &i)?;
            Ok(i)
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.read_op(|st, vol| {
            let i = st.iget(vol, ino)?;
            if i.mode & S_IFMT != S_IFLNK {
                return Err(fault(Fault::Invalid));
            }
            st.read_locked(vol, &i, 0, i.size as usize)
        })
    }
}
