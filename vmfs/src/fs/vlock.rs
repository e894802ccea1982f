//! How operations run (ocfs2's dlmglue): one transaction under the volume
//! lock ([`Fs::op`]), file operations without it while this host holds the
//! file alone ([`Fs::file_op`]), reads without it checked against the
//! lock's generation ([`Fs::read_op`]), the lock's fair hand-over to
//! waiting hosts, and waiting for file-block clusters.

use super::*;

impl Fs {
    /// Every lock that is not free: the volume lock, file-block clusters, then file descriptors
    /// (object, its 4K address or 0, the lock as on disk). Holders may be
    /// stale (their slot recovered since): the caller judges them.
    pub fn held_locks(&self) -> Result<Vec<(String, locking::LockRec)>> {
        let mut out = Vec::new();
        let vl = locking::read_lock(&*self.vol().luns[0], self.vol().header.rt_off)?;
        if !vl.holders.is_empty() {
            out.push(("volume lock".to_string(), vl));
        }
        let fbcs: Vec<u64> = self.lock().alloc.fbc.iter().map(|c| c.addr).collect();
        let objects = fbcs.into_iter().map(|a| ("file-block cluster", a)).chain(
            self.allocated_fds()?
                .into_iter()
                .map(|a| ("file descriptor", a)),
        );
        for (what, a) in objects {
            let (lun, off) = self.vol().lock_sector(a)?;
            let rec = locking::read_lock(&*lun, off)?;
            if !rec.holders.is_empty() {
                out.push((format!("{what} {a:#x}"), rec));
            }
        }
        Ok(out)
    }

    /// Run `f` as one transaction: commit on success, nothing written on
    /// error. In cluster mode, under the volume lock; when `f` must change a
    /// file-block cluster another host holds, nothing is written, this host
    /// asks for the cluster, waits until it is given back, and runs `f` again.
    /// Nothing is written once the datastore is unmounted (or abandoned):
    /// its journal was checkpointed and its slot given up, so a late
    /// change would sit in a journal nobody replays.
    fn check_mounted(&self) -> Result<()> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FsError::ReadOnly(
                "the datastore is unmounted on this host: nothing more is written".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn op<R>(&self, mut f: impl FnMut(&mut State, &Volume) -> Result<R>) -> Result<R> {
        self.check_mounted()?;
        loop {
            let mut st = self.lock_with_volume_lock()?;
            let t0 = std::time::Instant::now();
            st.vl_checkpoint = std::time::Duration::ZERO;
            let r = self.op_locked(&mut st, &mut f);
            // Other hosts can take the volume lock only between operations
            // (an idle holder gives it back when asked): an operation that
            // ran this long under it held every waiting host up that long.
            if let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) {
                if sh.contended.load(std::sync::atomic::Ordering::SeqCst)
                    && t0.elapsed() > m.timeouts.lease / 4
                {
                    tracing::warn!(
                        "an operation held the volume lock for {} ms while other hosts may wait",
                        t0.elapsed().as_millis()
                    );
                }
            }
            match r {
                Err(FsError::Retry(Retry(RetryKind::ClusterBusy { addr, slot }))) => {
                    // Its holder needs the volume lock to give it back.
                    self.vl_leave(&mut st, true)?;
                    drop(st);
                    self.wait_for_cluster(addr, slot)?;
                }
                r => {
                    let left = self.vl_leave(&mut st, false);
                    let slow = st.vl_checkpoint;
                    if self
                        .member
                        .get()
                        .is_some_and(|m| slow > m.timeouts.lease / 4)
                    {
                        tracing::warn!(
                            "flushing the checkpoint to the LUN took {} ms before the volume lock could go to a waiting host",
                            slow.as_millis()
                        );
                    }
                    let r = r?;
                    left?;
                    return Ok(r);
                }
            }
        }
    }

    /// Wait until no live host other than this one holds file-block cluster
    /// `addr` (first seen held by the host in `slot`), asking for it in this
    /// host's heartbeat slot meanwhile.
    pub(crate) fn wait_for_cluster(&self, addr: u64, slot: u32) -> Result<()> {
        let Some(m) = self.member.get() else {
            return Ok(());
        };
        let me = m.holder();
        let (lun, off) = self.vol().lock_sector(addr)?;
        m.want_cluster(addr)?;
        let start = std::time::Instant::now();
        let mut said = false;
        let mut pause = std::time::Duration::from_micros(200);
        let r = loop {
            if let Err(e) = m.check_lease() {
                break Err(e);
            }
            let rec = match locking::read_lock(&*lun, off) {
                Ok(r) => r,
                Err(e) => break Err(e.into()),
            };
            let current = self.current_holders(me);
            if !rec.holders.iter().any(|h| *h != me && current(h)) {
                break Ok(());
            }
            if !said && start.elapsed() > m.timeouts.lease {
                said = true;
                tracing::warn!(
                    "waiting for file-block cluster {addr:#x}: held by {} for more than {} ms",
                    rec.holders
                        .first()
                        .map(|h| self.describe_holder(h))
                        .unwrap_or_else(|| format!("the host in slot {slot}")),
                    m.timeouts.lease.as_millis()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(5));
        };
        if said {
            tracing::info!(
                "got file-block cluster {addr:#x} after {} ms",
                start.elapsed().as_millis()
            );
        }
        let cleared = m.unwant_cluster(addr);
        r?;
        cleared
    }

    /// Run `f` on file `ino` as one transaction. When this host holds the
    /// file open alone (its exclusive lock) and does not hold the volume
    /// lock, `f` first runs without it: nobody else may change the file's
    /// descriptor and pointer blocks, and file blocks come from clusters
    /// this host holds. If `f` needs more (a resource cluster, a cluster
    /// not held, any other block), nothing is written and `f` runs again
    /// under the volume lock ([`Fs::op`]).
    pub(crate) fn file_op<R>(
        &self,
        ino: u64,
        mut f: impl FnMut(&mut State, &Volume) -> Result<R>,
    ) -> Result<R> {
        self.check_mounted()?;
        if let (Some(_), Some(m)) = (self.shared.get(), self.member.get()) {
            let mut st = self.lock();
            if st.vl_held.is_none() && Self::holds_alone(&st, ino) {
                m.check_lease()?;
                let vol = self.vol();
                st.alloc.begin_op(false);
                let r = f(&mut st, &vol);
                let rerun = match &r {
                    Ok(_) => !Self::staged_only_own(&st, ino),
                    Err(e) => matches!(e, FsError::Retry(Retry(RetryKind::NeedVolumeLock))),
                };
                if !rerun {
                    return Self::end_txn(&mut st, &vol, r);
                }
                Self::abort_txn(&mut st, &vol);
            }
        }
        self.op(f)
    }

    /// Whether this host holds file `ino` open alone (exclusive lock).
    pub(crate) fn holds_alone(st: &State, ino: u64) -> bool {
        st.flocks
            .get(&ino)
            .is_some_and(|l| l.mode == locking::Mode::Exclusive)
    }

    /// Whether the running transaction changes only what this host owns
    /// while it holds file `ino` alone: the file's descriptor, pointer
    /// blocks (reached only through that descriptor) and file-block
    /// clusters whose lock it holds.
    pub(crate) fn staged_only_own(st: &State, ino: u64) -> bool {
        let held = st.alloc.locks.as_ref().map(|l| &l.held);
        st.meta
            .txn
            .blocks
            .iter()
            .all(|(&a, (magic, _))| match *magic {
                MAGIC_FD => a == ino,
                MAGIC_PTR => true,
                MAGIC_FBC => held.is_some_and(|h| h.contains(&a)),
                _ => false,
            })
    }

    /// [`Fs::read_op`] for reads of file `ino`: without looking at the
    /// volume lock when this host holds the file alone (nobody else changes
    /// its metadata then), so its I/O never waits for other hosts.
    pub(crate) fn file_read_op<R>(
        &self,
        ino: u64,
        mut f: impl FnMut(&mut State, &Volume) -> Result<R>,
    ) -> Result<R> {
        if self.shared.get().is_some() {
            let mut st = self.lock();
            if Self::holds_alone(&st, ino) {
                return f(&mut st, &self.vol());
            }
        }
        self.read_op(f)
    }

    pub(crate) fn op_locked<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut State, &Volume) -> Result<R>,
    ) -> Result<R> {
        st.alloc.begin_op(true);
        let vol = self.vol();
        let r = f(st, &vol);
        Self::end_txn(st, &vol, r)
    }

    /// End the running transaction as `r` says: commit it when `r` is Ok,
    /// else drop it unwritten.
    pub(crate) fn end_txn<R>(st: &mut State, vol: &Volume, r: Result<R>) -> Result<R> {
        match r {
            Ok(r) => match st.meta.commit(vol) {
                Ok(()) => Ok(r),
                Err(e) => {
                    // What reached the disk is uncertain: forget every cached block.
                    st.meta.clear();
                    Self::reload_after_failure(st, vol);
                    Err(e)
                }
            },
            Err(e) => {
                Self::abort_txn(st, vol);
                Err(e)
            }
        }
    }

    /// Drop the running transaction unwritten.
    pub(crate) fn abort_txn(st: &mut State, vol: &Volume) {
        // Allocation summaries change only together with a staged cluster
        // block: an operation that staged nothing changed none.
        let touched = !st.meta.txn.blocks.is_empty();
        st.meta.abort();
        if touched {
            Self::reload_after_failure(st, vol);
        }
    }

    /// The state, with the volume lock held (cluster mode; just the state
    /// otherwise). While another host holds the lock, the state is let go
    /// between attempts: the housekeeping thread needs it to recover a holder
    /// that died, whose lock breaks only then.
    pub(crate) fn lock_with_volume_lock(&self) -> Result<MutexGuard<'_, State>> {
        let mut wait = LockWait::new();
        let mut wanting = Wanting::none();
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            let mut st = self.lock();
            if self.vl_take(&mut st, &[], true, false)? {
                wait.got();
                drop(wanting);
                return Ok(st);
            }
            drop(st);
            if let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) {
                // Ask the holder to give it back after its operation.
                wanting.start(m)?;
                // Hosts whose ballots collided separate by slot.
                std::thread::sleep(std::time::Duration::from_micros(
                    13 * u64::from(m.slot % 32),
                ));
                let holder = sh
                    .vlock
                    .peek()
                    .ok()
                    .and_then(|r| r.holders.first().copied().or(r.next));
                wait.still_waiting(self, m.timeouts.lease, holder.as_ref());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(2));
        }
    }

    /// Take the volume lock (cluster mode; nothing otherwise), counting the
    /// holds of the hosts in slots `breaking` (found dead) as gone;
    /// `load_alloc`: reload stale allocation summaries.
    /// `patient`: wait until it is had; else give up (Ok(false)) as soon as
    /// another host holds it or a ballot collided, without sleeping.
    pub(crate) fn vl_take(
        &self,
        st: &mut State,
        breaking: &[u32],
        load_alloc: bool,
        patient: bool,
    ) -> Result<bool> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(true);
        };
        if st.vl_held.is_some() {
            return Ok(true);
        }
        let me = m.holder();
        let ballots = crate::cluster::Ballots {
            vol: &self.vol(),
            member: m,
        };
        let mut wait = LockWait::new();
        let mut wanting = Wanting::none();
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            m.check_lease()?;
            let current = self.current_holders(me);
            let members = |h: &locking::Holder| !breaking.contains(&h.slot) && current(h);
            match sh.vlock.try_acquire(me, &members, &ballots)? {
                locking::Attempt::Acquired { generation } => {
                    if st.cache_gen.is_none_or(|g| g + 1 != generation) {
                        // Someone else held it since: nothing cached is known good.
                        st.meta.clear();
                        st.alloc_stale = true;
                        self.refresh_volume(st)?;
                    }
                    st.vl_held = Some(generation);
                    st.vl_since = std::time::Instant::now();
                    st.cache_gen = Some(generation);
                    drop(wanting);
                    if st.alloc_stale && load_alloc {
                        st.alloc = Alloc::reload(&self.vol(), &mut st.meta, &st.alloc)?;
                        st.alloc_stale = false;
                    }
                    wait.got();
                    return Ok(true);
                }
                locking::Attempt::Busy(rec) => {
                    if !patient {
                        return Ok(false);
                    }
                    // Ask the holder to give it back after its operation.
                    wanting.start(m)?;
                    wait.still_waiting(
                        self,
                        m.timeouts.lease,
                        rec.holders.first().or(rec.next.as_ref()),
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(2));
                }
                locking::Attempt::Collided => {
                    if !patient {
                        return Ok(false);
                    }
                    // Back off by slot so that colliding hosts separate.
                    std::thread::sleep(std::time::Duration::from_micros(
                        100 + 97 * u64::from(me.slot % 32),
                    ));
                }
            }
        }
    }

    /// Give the volume lock back after an operation when another host is
    /// mounted (`force`: in any case): commit and checkpoint first, so that
    /// the next holder reads everything in place and no replay of this
    /// host's journal can ever write over what it changes.
    pub(crate) fn vl_leave(&self, st: &mut State, force: bool) -> Result<()> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(());
        };
        if st.vl_held.is_none() {
            return Ok(());
        }
        // Kept while no other host waits for it (sticky, group commit), and
        // for at least a quantum once taken: each hand-over costs a journal
        // commit and checkpoint, so a busy host does a few operations per turn.
        // Without a watcher nobody would notice a waiter while this host is
        // idle: then the lock goes back after every operation.
        let watched = sh.watched.load(std::sync::atomic::Ordering::SeqCst);
        let contended = sh.contended.load(std::sync::atomic::Ordering::SeqCst);
        let mut table = None;
        if !force {
            if !contended {
                return Ok(());
            }
            if watched {
                if st.vl_since.elapsed() < LOCK_QUANTUM {
                    return Ok(());
                }
                let t = crate::cluster::slot_table(&self.vol());
                if !Self::volume_lock_wanted(&t, m.slot) {
                    return Ok(());
                }
                table = Some(t);
            }
        }
        if !watched {
            // Nobody here would hand a file-block cluster to a host asking
            // for it: hold none between operations.
            st.alloc.release_all(&self.vol())?;
        }
        // A failed commit keeps the lock: what is on disk is uncertain,
        // and only a replay of this host's journal may fix it.
        let t0 = std::time::Instant::now();
        st.meta.checkpoint(&self.vol())?;
        st.vl_checkpoint = t0.elapsed();
        // Handed to the next host that waits, in turn by slot: fair.
        let next = match table {
            Some(t) => Self::next_waiter(&t, m.slot),
            None if contended => {
                Self::next_waiter(&crate::cluster::slot_table(&self.vol()), m.slot)
            }
            None => None,
        };
        sh.vlock.release_to(m.holder(), next)?;
        st.vl_held = None;
        Ok(())
    }

    /// The live host that waits for the volume lock and comes first after
    /// slot `me` in slot order (wrapping): each waiting host gets the lock in
    /// turn, so none waits more than one turn of the others.
    pub(crate) fn next_waiter(table: &Result<Vec<HostSlot>>, me: u32) -> Option<locking::Holder> {
        let t = table.as_ref().ok()?;
        let n = t.len() as u32;
        (1..n).map(|k| (me + k) % n).find_map(|s| {
            let h = &t[s as usize];
            (h.state == crate::format::SLOT_LIVE && h.wants & 1 != 0).then_some(locking::Holder {
                slot: s,
                generation: h.generation,
            })
        })
    }

    /// Whether another live host says in `table` that it waits for the
    /// volume lock. A slot table that could not be read counts as yes (give
    /// the lock back).
    pub(crate) fn volume_lock_wanted(table: &Result<Vec<HostSlot>>, me: u32) -> bool {
        table.is_err() || Self::next_waiter(table, me).is_some()
    }

    /// Called between operations: if this host holds the volume lock while
    /// another waits for it, commit, checkpoint and give it back; give every
    /// file-block cluster another host asks for back (under the volume lock,
    /// after a checkpoint). Reads the heartbeat region at most once.
    pub fn yield_if_wanted(&self) -> Result<()> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(());
        };
        if !sh.contended.load(std::sync::atomic::Ordering::SeqCst) || m.lease.is_fenced() {
            return Ok(());
        }
        let (held, vl_due): (Vec<u64>, bool) = {
            let st = self.lock();
            (
                st.alloc
                    .locks
                    .as_ref()
                    .map(|l| l.held.iter().copied().collect())
                    .unwrap_or_default(),
                st.vl_held.is_some() && st.vl_since.elapsed() >= LOCK_QUANTUM,
            )
        };
        if held.is_empty() {
            self.stop_yield_wants(m)?;
            if !vl_due {
                return Ok(());
            }
        }
        let table = crate::cluster::slot_table(&self.vol());
        let wanted: Vec<u64> = match &table {
            Ok(t) => t
                .iter()
                .enumerate()
                .filter(|(i, h)| {
                    *i as u32 != m.slot
                        && h.state == crate::format::SLOT_LIVE
                        && held.contains(&h.want_cluster)
                })
                .map(|(_, h)| h.want_cluster)
                .collect(),
            Err(_) => Vec::new(),
        };
        if wanted.is_empty() {
            self.stop_yield_wants(m)?;
        } else {
            // One try: this thread also recovers dead hosts, one of
            // which may be what holds the volume lock. Next tick again;
            // meanwhile this host says it waits, so that the lock is handed
            // to it in its turn.
            let mut st = self.lock();
            if !self.vl_take(&mut st, &[], true, false)? {
                if !self
                    .yield_wants
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    m.want_volume_lock()?;
                }
                return Ok(());
            }
            self.stop_yield_wants(m)?;
            let vol = self.vol();
            let r = wanted
                .iter()
                .try_for_each(|&a| st.alloc.yield_cluster(&vol, a));
            let left = self.vl_leave(&mut st, true);
            r?;
            left?;
            for a in wanted {
                tracing::debug!("gave file-block cluster {a:#x} to a host that waits for it");
            }
            return Ok(());
        }
        if vl_due && Self::volume_lock_wanted(&table, m.slot) {
            let mut st = self.lock();
            if st.vl_held.is_some() {
                self.vl_leave(&mut st, true)?;
            }
        }
        // An unreadable heartbeat region matters here only to hand-overs.
        if held.is_empty() {
            return Ok(());
        }
        table.map(|_| ())
    }

    /// The housekeeping thread no longer waits for the volume lock.
    pub(crate) fn stop_yield_wants(&self, m: &crate::cluster::Member) -> Result<()> {
        if self
            .yield_wants
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            m.unwant_volume_lock()?;
        }
        Ok(())
    }

    /// Give the volume lock back now if this host holds it.
    pub fn release_volume_lock(&self) -> Result<()> {
        let mut st = self.lock();
        self.vl_leave(&mut st, true)
    }

    /// Whether a lock holder is current (see [`crate::cluster::is_current`]),
    /// reading the slot table once, and only when asked about a host other
    /// than `me`. A table that cannot be read counts every holder as current
    /// (the safe side: wait, or refuse).
    pub(crate) fn current_holders(
        &self,
        me: locking::Holder,
    ) -> impl Fn(&locking::Holder) -> bool + '_ {
        let table = std::cell::OnceCell::new();
        move |h| {
            *h == me
                || match table.get_or_init(|| crate::cluster::slot_table(&self.vol()).ok()) {
                    Some(t) => crate::cluster::is_current(t, h),
                    None => true,
                }
        }
    }

    /// "host UUID (slot N)" for a lock holder.
    pub(crate) fn describe_holder(&self, h: &locking::Holder) -> String {
        match self.vol().read_slot(h.slot) {
            Ok(hs) => format!(
                "host {} (slot {}, generation {})",
                crate::volume::uuid_str(&hs.host),
                h.slot,
                h.generation
            ),
            Err(_) => format!("the host in slot {} (generation {})", h.slot, h.generation),
        }
    }

    /// Run a read-only `f` on metadata that is current. In cluster mode
    /// without the volume lock: the lock's sector is read before (waiting
    /// while another host holds it; the cache is dropped if its generation
    /// moved) and, if `f` read anything from disk, after; if it changed in
    /// between, `f` runs again on fresh blocks.
    pub(crate) fn read_op<R>(
        &self,
        mut f: impl FnMut(&mut State, &Volume) -> Result<R>,
    ) -> Result<R> {
        let mut st = self.lock();
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return f(&mut st, &self.vol());
        };
        if st.vl_held.is_some() {
            return f(&mut st, &self.vol());
        }
        let me = m.holder();
        let mut pause = std::time::Duration::from_micros(20);
        let mut tries = 0u32;
        let mut wanting = Wanting::none();
        loop {
            let rec = sh.vlock.peek()?;
            let others: Vec<_> = rec.holders.iter().filter(|h| **h != me).collect();
            if rec.holders.is_empty() && rec.next == Some(me) {
                // Handed to this host (it said it waits): take it, read
                // under it, and pass it on, or every other host would wait
                // for the reservation to lapse.
                if self.vl_take(&mut st, &[], true, false)? {
                    drop(wanting);
                    let r = f(&mut st, &self.vol());
                    let left = self.vl_leave(&mut st, false);
                    let r = r?;
                    left?;
                    return Ok(r);
                }
            }
            if !others.is_empty() {
                let t = crate::cluster::slot_table(&self.vol())?;
                if others.iter().any(|h| crate::cluster::is_current(&t, h)) {
                    m.check_lease()?;
                    // A holder keeps the lock while nobody waits: say we do.
                    wanting.start(m)?;
                    // Let the state go while waiting (the housekeeping
                    // thread needs it to recover a holder that died).
                    drop(st);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(2));
                    st = self.lock();
                    if st.vl_held.is_some() {
                        return f(&mut st, &self.vol());
                    }
                    continue;
                }
            }
            if st.cache_gen != Some(rec.generation) {
                st.meta.clear();
                st.alloc_stale = true;
                st.cache_gen = Some(rec.generation);
                self.refresh_volume(&mut st)?;
            }
            drop(std::mem::replace(&mut wanting, Wanting::none()));
            let reads = st.meta.reads;
            let r = f(&mut st, &self.vol());
            if st.meta.reads == reads {
                return r;
            }
            let after = sh.vlock.peek()?;
            if after == rec {
                return r;
            }
            // Changed under us: what was read may be half old, half new.
            st.meta.clear();
            st.cache_gen = None;
            tries += 1;
            if tries > 1000 {
                return r;
            }
        }
    }

    pub(crate) fn reload_after_failure(st: &mut State, vol: &Volume) {
        match Alloc::load(vol, &mut st.meta) {
            Ok(mut a) => {
                a.keep_hints(&st.alloc);
                st.alloc = a;
            }
            Err(e) => tracing::error!("reloading allocation state after a failed operation: {e}"),
        }
    }
}
