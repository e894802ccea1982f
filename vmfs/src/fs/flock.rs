//! File locks: this host's opens of a file, the on-disk lock mode they need
//! (exclusive, shared, multi-writer), EBUSY naming the holder, and the last
//! close that frees an unlinked file.

use super::*;

impl Fs {
    /// Open a file; `write`: for writing. In cluster mode the file's lock
    /// is taken on disk: exclusive for writing (multi-writer when the file
    /// has that flag), shared for reading; a file another host holds in a
    /// mode that excludes this one is EBUSY, and the log names that host.
    /// Open file `ino` on this host: take its lock (exclusive for writing,
    /// shared for reading, or multi-writer); a raw device mapping also opens
    /// its LUN, or the open fails (ENXIO) and the lock is given back.
    pub fn open_file(&self, ino: u64, write: bool) -> Result<Inode> {
        self.open_file_as(ino, write, None)
    }

    /// Open `ino` in lock mode `mode` (None: as POSIX opens do, exclusive
    /// for writing unless the file is marked multi-writer).
    pub(crate) fn open_file_as(
        &self,
        ino: u64,
        write: bool,
        mode: Option<crate::file::LockMode>,
    ) -> Result<Inode> {
        let i = self.open_file_lock(ino, write, mode)?;
        if i.flags & FD_FLAG_RDM != 0 && !i.is_dir() {
            if let Err(e) = self.attach_mapping(&i) {
                let _ = self.release(ino, write);
                return Err(e);
            }
        }
        Ok(i)
    }

    pub(crate) fn open_file_lock(
        &self,
        ino: u64,
        write: bool,
        mode: Option<crate::file::LockMode>,
    ) -> Result<Inode> {
        use crate::file::LockMode;
        let check = |i: &Inode| {
            if mode == Some(LockMode::MultiWriter) && i.flags & FD_FLAG_MULTI_WRITER == 0 {
                return Err(FsError::Invalid(format!(
                    "file {:#x} is not marked multi-writer: mark it before opening it multi-writer",
                    i.addr
                )));
            }
            Ok(())
        };
        if self.shared.get().is_none() {
            let mut st = self.lock();
            let i = st.iget(&self.vol(), ino)?;
            check(&i)?;
            *st.open.entry(ino).or_default() += 1;
            let fd = self.file_data(ino);
            fd.set_holes_ok(true);
            fd.opened();
            return Ok(i);
        }
        let want = mode.map(|m| match m {
            LockMode::Exclusive => locking::Mode::Exclusive,
            LockMode::ReadOnly => locking::Mode::Shared,
            LockMode::MultiWriter => locking::Mode::MultiWriter,
        });
        self.op(|st, vol| {
            let i = st.iget(vol, ino)?;
            check(&i)?;
            if !i.is_dir() {
                self.lock_file(st, &i, write, want)?;
            }
            *st.open.entry(ino).or_default() += 1;
            self.file_data(ino).opened();
            Ok(i)
        })
    }

    /// Record one more open of `i` by this host, taking or strengthening
    /// its on-disk lock when needed (under the volume lock).
    pub(crate) fn lock_file(
        &self,
        st: &mut State,
        i: &Inode,
        write: bool,
        want: Option<locking::Mode>,
    ) -> Result<()> {
        use locking::Mode;
        let cur = st.flocks.get(&i.addr).copied();
        let want = want.unwrap_or(if !write {
            Mode::Shared
        } else if i.flags & FD_FLAG_MULTI_WRITER != 0 {
            Mode::MultiWriter
        } else {
            Mode::Exclusive
        });
        let mode = match (cur.map(|c| c.mode), want) {
            (None, w) => w,
            // An exclusive open asked of a file this host holds multi-writer.
            (Some(Mode::MultiWriter), Mode::Exclusive) => Mode::Exclusive,
            (Some(Mode::Exclusive), _) | (Some(Mode::MultiWriter), _) => cur.expect("some").mode,
            (Some(Mode::Shared), Mode::Shared) => Mode::Shared,
            (Some(_), w) => w,
        };
        if cur.map(|c| c.mode) != Some(mode) {
            let m = self.member.get().expect("cluster mode has a member");
            let me = m.holder();
            let (lun, off) = self.vol().lock_sector(i.addr)?;
            let members = self.current_holders(me);
            if let Err(held) = locking::acquire_under_volume_lock(&*lun, off, mode, me, &members)? {
                let who: Vec<String> = held
                    .holders
                    .iter()
                    .filter(|h| **h != me)
                    .map(|h| self.describe_holder(h))
                    .collect();
                let msg = format!(
                    "file descriptor {:#x} is open {} by {}; this host cannot open it {}",
                    i.addr,
                    held.mode.name(),
                    who.join(", "),
                    if write { "for writing" } else { "for reading" }
                );
                tracing::warn!("{msg}");
                return Err(FsError::Busy(msg));
            }
        }
        let e = st.flocks.entry(i.addr).or_insert(FileLock {
            mode,
            writers: 0,
            readers: 0,
        });
        e.mode = mode;
        if write {
            e.writers += 1;
        } else {
            e.readers += 1;
        }
        // Another host may fill holes only of a multi-writer file.
        self.file_data(i.addr)
            .set_holes_ok(mode != Mode::MultiWriter);
        Ok(())
    }

    /// One open of `addr` by this host ends: weaken or drop its lock.
    pub(crate) fn unlock_file(&self, st: &mut State, addr: u64, write: bool) -> Result<()> {
        use locking::Mode;
        let Some(mut fl) = st.flocks.get(&addr).copied() else {
            return Ok(());
        };
        if write {
            fl.writers = fl.writers.saturating_sub(1);
        } else {
            fl.readers = fl.readers.saturating_sub(1);
        }
        let m = self.member.get().expect("cluster mode has a member");
        let me = m.holder();
        let (lun, off) = self.vol().lock_sector(addr)?;
        if fl.writers == 0 && fl.readers == 0 {
            locking::release_under_volume_lock(&*lun, off, me)?;
            st.flocks.remove(&addr);
            return Ok(());
        }
        if fl.writers == 0 && fl.mode != Mode::Shared {
            // Only readers left: let other hosts read too. Not while another
            // host holds it (multi-writer): shared cannot be had beside it,
            // and letting go would leave this host's readers unlocked.
            let current = self.current_holders(me);
            let rec = locking::read_lock(&*lun, off)?;
            if !rec.holders.iter().any(|h| *h != me && current(h)) {
                locking::release_under_volume_lock(&*lun, off, me)?;
                // Under the volume lock nobody else changed the sector.
                if let Err(held) =
                    locking::acquire_under_volume_lock(&*lun, off, Mode::Shared, me, &current)?
                {
                    let _ = locking::acquire_under_volume_lock(&*lun, off, fl.mode, me, &current)?;
                    return Err(FsError::Busy(format!(
                        "file descriptor {addr:#x}: could not keep it open for reading ({} held it meanwhile)",
                        held.mode.name()
                    )));
                }
                fl.mode = Mode::Shared;
                self.file_data(addr).set_holes_ok(true);
            }
        }
        st.flocks.insert(addr, fl);
        Ok(())
    }

    /// In cluster mode: EBUSY when a host other than this one holds the
    /// file open (removing its last name, truncating it or punching it
    /// would pull blocks from under that host's I/O).
    pub(crate) fn check_not_open_elsewhere(&self, addr: u64, what: &str) -> Result<()> {
        let Some(m) = self.member.get() else {
            return Ok(());
        };
        if self.shared.get().is_none() {
            return Ok(());
        }
        let me = m.holder();
        let (lun, off) = self.vol().lock_sector(addr)?;
        let rec = locking::read_lock(&*lun, off)?;
        let others: Vec<_> = rec.holders.iter().filter(|h| **h != me).collect();
        if others.is_empty() {
            return Ok(());
        }
        let table = crate::cluster::slot_table(&self.vol())?;
        let live: Vec<String> = others
            .into_iter()
            .filter(|h| crate::cluster::is_current(&table, h))
            .map(|h| self.describe_holder(h))
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let msg = format!(
            "cannot {what} file descriptor {addr:#x}: it is open ({}) by {}",
            rec.mode.name(),
            live.join(", ")
        );
        tracing::warn!("{msg}");
        Err(FsError::Busy(msg))
    }

    /// The last close of an unlinked file frees it.
    pub fn release(&self, ino: u64, write: bool) -> Result<()> {
        self.detach_mapping(ino);
        // The open ends here whether or not its lock could be let go (an
        // error is still said, after).
        let unlocked = if self.shared.get().is_some() {
            self.op(|st, _| self.unlock_file(st, ino, write))
        } else {
            Ok(())
        };
        let free = {
            let mut st = self.lock();
            let n = st.open.entry(ino).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.open.remove(&ino);
                self.file_data(ino).closed();
                st.orphans.remove(&ino)
            } else {
                false
            }
        };
        if free {
            self.op(|st, vol| {
                // Opened again (by descriptor) since: its last close frees it.
                if st.open.contains_key(&ino) {
                    st.orphans.insert(ino);
                    return Ok(());
                }
                let mut i = st.iget(vol, ino)?;
                if i.nlink == 0 {
                    st.ifree(vol, &mut i)?;
                }
                Ok(())
            })?;
        }
        unlocked
    }
}
