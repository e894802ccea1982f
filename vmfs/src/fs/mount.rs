//! The filesystem's lifecycle: mkfs, open (for use or for checking), mount
//! as a host of the cluster, the journal of this host's slot, sync and
//! unmount, housekeeping (commits, recovery of dead hosts, orphans),
//! extend, and the usage figures.

use super::*;

impl Fs {
    /// Format, then open (mount in the library) the new filesystem.
    pub fn mkfs(luns: Vec<Arc<dyn lun::Lun>>, opts: &MkfsOptions) -> Result<Fs> {
        let vol = Volume::mkfs(luns.clone(), opts)?;
        let fs = Fs::from_volume(vol)?;
        // The root is written in place: there is no journal yet, and an
        // interrupted mkfs leaves no root, which open refuses.
        let root = fs.op(|st, vol| {
            let mut root = st.ialloc(vol, S_IFDIR | 0o755, 0, 0)?;
            root.nlink = 2;
            let a = root.addr;
            st.dir_init(vol, &mut root, a)?;
            st.iput(vol, &root)?;
            Ok(a)
        })?;
        let mut v = Volume::clone(&fs.vol());
        v.header.root_fd = root;
        v.write_headers(None)?;
        fs.set_vol(v);
        fs.abandon();
        drop(fs);
        Fs::open(luns)
    }

    /// Open a validated volume in the library as host slot 0, without a
    /// heartbeat (tests, tools, the crash harness): replay every journal that
    /// holds committed transactions, then open slot 0's journal (allocating
    /// it on first use). `vmfs mount` uses [`Fs::mount`].
    pub fn open(luns: Vec<Arc<dyn lun::Lun>>) -> Result<Fs> {
        Self::open_inner(luns)
    }

    /// Mount as host `host`: join the heartbeat region (refused while another
    /// host is live; dead hosts are recovered), then open with every write
    /// going through this host's lease (self-fencing).
    pub fn mount(
        luns: Vec<Arc<dyn lun::Lun>>,
        host: [u8; 16],
        t: crate::cluster::Timeouts,
    ) -> Result<Fs> {
        // Check everything reading only (a journal replay goes to memory):
        // a mount refused for corruption writes nothing, not even a slot.
        // Other hosts may be changing the metadata while this reads: a
        // check that fails is tried again a few times before it counts.
        let validate = || -> Result<()> {
            let cow = luns
                .iter()
                .map(|l| Arc::new(lun::CowLun::new(l.clone())) as Arc<dyn lun::Lun>)
                .collect();
            let vol = Volume::open(cow)?;
            if vol.header.root_fd == 0 {
                return Err(FsError::Invalid(
                    "the volume has no root directory: mkfs did not finish; run mkfs again".into(),
                ));
            }
            replay_journals(&vol)?;
            let fs = Fs::from_volume(vol)?;
            fs.abandon();
            fs.check_root()
        };
        let mut tries = 0;
        while let Err(e) = validate() {
            tries += 1;
            if tries >= 5 || matches!(e, FsError::Extent { .. }) {
                return Err(e);
            }
            tracing::debug!("checking the datastore before joining failed ({e}); trying again");
            std::thread::sleep(std::time::Duration::from_millis(100 * tries));
        }
        let vol = Volume::open(luns.clone())?;
        let joined = crate::cluster::join(&vol, host, t)?;
        drop(vol);
        let lease = joined.member.lease.clone();
        let fenced: Vec<Arc<dyn lun::Lun>> = luns
            .into_iter()
            .map(|l| Arc::new(lun::FencedLun::new(l, lease.clone())) as Arc<dyn lun::Lun>)
            .collect();
        let vol = Volume::open(fenced)?;
        // Other hosts change the metadata from now on: everything is read
        // under the volume lock (the allocation summaries at the first
        // operation), nothing before.
        let mut vlock = locking::VolumeLock::new(vol.luns[0].clone(), vol.header.rt_off);
        // A host the lock is handed to takes it within microseconds when it
        // runs; a sixteenth of the lease also covers a busy CPU's delays.
        vlock.lapse = t.lease / 16;
        tracing::info!(
            "on-disk locks of this datastore: {}",
            vlock.method.describe()
        );
        let fs = Fs::with_alloc(vol, Meta::default(), Alloc::default())?;
        fs.lock().alloc_stale = true;
        let Joined {
            member,
            replays,
            unclean,
            dead,
        } = joined;
        let slot = member.slot;
        {
            let mut st = fs.lock();
            st.me = Some(member.holder());
            st.alloc.locks = Some(crate::alloc::Locks::new(member.holder()));
        }
        let _ = fs.member.set(member);
        let _ = fs.shared.set(Shared {
            vlock,
            contended: std::sync::atomic::AtomicBool::new(true),
            watched: std::sync::atomic::AtomicBool::new(false),
            monitor: Mutex::new(crate::cluster::Monitor::default()),
        });
        // Dead hosts found while joining: recovered as any member would,
        // under the volume lock (before anything here waits on it).
        let recovered = match fs.recover_slots(dead, "stopped without unmounting") {
            Ok(n) => n,
            Err(e) => {
                if let Some(m) = fs.member.get() {
                    let _ = m.leave();
                }
                fs.abandon();
                return Err(e);
            }
        };
        let mut all = replays;
        all.extend(fs.replays());
        fs.finish_open(slot, all, unclean || recovered > 0)?;
        Ok(fs)
    }

    pub(crate) fn open_inner(luns: Vec<Arc<dyn lun::Lun>>) -> Result<Fs> {
        let vol = Volume::open(luns)?;
        if vol.header.root_fd == 0 {
            return Err(FsError::Invalid(
                "the volume has no root directory: mkfs did not finish; run mkfs again".into(),
            ));
        }
        let unclean = vol.read_slot(0)?.state != SLOT_FREE;
        let replays = replay_journals(&vol)?;
        let fs = Fs::from_volume(vol)?;
        fs.finish_open(0, replays, unclean)?;
        Ok(fs)
    }

    /// Check the root, open this slot's journal, clean up after a crash.
    pub(crate) fn finish_open(
        &self,
        slot: u32,
        replays: Vec<(u32, journal::Report)>,
        unclean: bool,
    ) -> Result<()> {
        let fs = self;
        let r = (|| {
            fs.check_root()?;
            fs.start_journal(slot)?;
            if let Some(m) = fs.member.get() {
                let hosts = fs.vol().header.max_hosts;
                fs.op(|st, _| {
                    st.alloc.set_affinity(m.slot, hosts);
                    Ok(())
                })?;
            }
            if unclean {
                // Files unlinked while open live until their last close; a
                // crash leaves them with no name and no opener. Free them now.
                let n = fs.free_orphans()?;
                if n > 0 {
                    tracing::info!(
                        "freed {n} file(s) that were unlinked while open when the host stopped"
                    );
                }
                fs.sync()?;
            }
            fs.release_volume_lock()
        })();
        if let Err(e) = r {
            // Leave the slot as a clean stop would, or as it was.
            if let Some(m) = fs.member.get() {
                let _ = m.leave();
            }
            fs.abandon();
            return Err(e);
        }
        *fs.replays.lock().unwrap_or_else(|p| p.into_inner()) = replays;
        Ok(())
    }

    /// The root must be a readable directory.
    pub(crate) fn check_root(&self) -> Result<()> {
        self.read_op(|st, vol| {
            let root = st.iget(vol, vol.header.root_fd)?;
            if !root.is_dir() {
                return Err(FsError::Invalid(
                    "the root file descriptor is not a directory".into(),
                ));
            }
            st.dir_hdr(vol, &root)?;
            Ok(())
        })
    }

    /// Open for checking: with `repair` false, every write (journal replay
    /// included) stays in memory and the LUNs are not changed.
    pub fn open_for_check(luns: Vec<Arc<dyn lun::Lun>>, repair: bool) -> Result<Fs> {
        if repair {
            return Fs::open(luns);
        }
        let cow = luns
            .into_iter()
            .map(|l| Arc::new(lun::CowLun::new(l)) as Arc<dyn lun::Lun>)
            .collect();
        Fs::open(cow)
    }

    pub(crate) fn from_volume(vol: Volume) -> Result<Fs> {
        let mut meta = Meta::default();
        let alloc = Alloc::load(&vol, &mut meta)?;
        Self::with_alloc(vol, meta, alloc)
    }

    pub(crate) fn with_alloc(vol: Volume, meta: Meta, alloc: Alloc) -> Result<Fs> {
        let seed = now();
        Ok(Fs {
            vol: RwLock::new(Arc::new(vol)),
            st: Mutex::new(State {
                meta,
                alloc,
                open: HashMap::new(),
                orphans: HashSet::new(),
                next_gen: (seed.0 as u64) << 20 ^ u64::from(seed.1),
                vl_held: None,
                vl_since: std::time::Instant::now(),
                vl_checkpoint: std::time::Duration::ZERO,
                cache_gen: None,
                alloc_stale: false,
                flocks: HashMap::new(),
                me: None,
            }),
            data_locks: Mutex::new(HashMap::new()),
            slot: std::sync::atomic::AtomicU32::new(u32::MAX),
            closed: std::sync::atomic::AtomicBool::new(false),
            replays: Mutex::new(Vec::new()),
            member: std::sync::OnceLock::new(),
            shared: std::sync::OnceLock::new(),
            unopened_gen: std::sync::atomic::AtomicU64::new(0),
            mailbox: Default::default(),
            mapped: Mutex::new(HashMap::new()),
            mapped_count: std::sync::atomic::AtomicUsize::new(0),
            rdm_luns: RwLock::new(Vec::new()),
            yield_wants: std::sync::atomic::AtomicBool::new(false),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Open (or allocate and format) slot `slot`'s journal and mark the slot live.
    pub(crate) fn start_journal(&self, slot: u32) -> Result<()> {
        let vol = &self.vol();
        let mut hs = vol.read_slot(slot)?;
        let uuid = vol.header.uuid;
        let jnl = if hs.journal == 0 {
            // First mount of this slot: contiguous file blocks, written in
            // place (bitmap, then journal, then the slot pointing at it; a
            // crash in between leaks blocks that fsck --repair reclaims).
            let bpk = vol.blocks_per_4k();
            let want = u64::from(vol.header.journal_blocks).div_ceil(bpk);
            let least = u64::from(JOURNAL_MIN_BLOCKS).div_ceil(bpk);
            // Where free space is left only in pieces, a smaller journal
            // (the slot records its size): joining fails only when not even
            // the smallest fits.
            let mut nfb = want;
            let first = loop {
                match self.op(|st, vol| st.alloc.alloc_run(vol, &mut st.meta, nfb)) {
                    Ok(f) => break f,
                    Err(FsError::NoSpace(_)) if nfb > least => nfb = (nfb / 2).max(least),
                    Err(e) => return Err(e),
                }
            };
            if nfb < want {
                tracing::warn!(
                    "slot {slot}: a journal of {} KiB instead of {} KiB: the free space left has no longer run of blocks",
                    nfb * vol.block_size() / 1024,
                    want * vol.block_size() / 1024
                );
            }
            vol.flush()?;
            let r = self.journal_region(first * bpk, (nfb * bpk) as u32, slot)?;
            let seed = now();
            let j = journal::Journal::format(r, &uuid, (seed.0 as u64) << 20 | 1)?;
            hs.journal = first * bpk;
            hs.journal_blocks = (nfb * bpk) as u32;
            j
        } else {
            journal::Journal::open(
                self.journal_region(hs.journal, hs.journal_blocks, slot)?,
                &uuid,
            )?
        };
        match self.member.get() {
            // Joining marked the slot live; record the journal under the heartbeat's lock.
            Some(m) => {
                let (a, n) = (hs.journal, hs.journal_blocks);
                m.update(|s| {
                    s.journal = a;
                    s.journal_blocks = n;
                })?;
            }
            None => {
                hs.state = SLOT_LIVE;
                hs.generation += 1;
                vol.write_slot(slot, &hs)?;
            }
        }
        self.lock().meta.jnl = Some(jnl);
        self.slot.store(slot, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// 4K addresses of every allocated file descriptor, cluster by cluster.
    pub(crate) fn allocated_fds(&self) -> Result<Vec<u64>> {
        let clusters: Vec<_> = self
            .lock()
            .alloc
            .clusters
            .iter()
            .filter(|c| c.rtype == ResType::Fd)
            .cloned()
            .collect();
        let mut out = Vec::new();
        for c in clusters {
            let bitmap = self.read_op(|st, vol| {
                Ok(st.meta.get(vol, c.addr, MAGIC_RCLUSTER)?[LOCK_SECTOR..].to_vec())
            })?;
            out.extend(
                (0..c.count as usize)
                    .filter(|&j| bit_get(&bitmap[CL_BITMAP..], j))
                    .map(|j| c.addr + 1 + j as u64),
            );
        }
        Ok(out)
    }

    /// Free every allocated file descriptor with no links (after a crash,
    /// nothing has it open). Returns how many. Reads every descriptor: the
    /// price of not keeping an on-disk orphan list, paid only after a crash.
    /// A descriptor another live host holds open (its lock) is skipped.
    pub fn free_orphans(&self) -> Result<u64> {
        let mut n = 0;
        for a in self.allocated_fds()? {
            let freed = self.op(|st, vol| match st.iget(vol, a) {
                Ok(mut i) if i.nlink == 0 && !st.open.contains_key(&a) => {
                    // Another live host may still have it open.
                    if self.shared.get().is_some() {
                        let (lun, off) = self.vol().lock_sector(a)?;
                        let rec = locking::read_lock(&*lun, off)?;
                        let t = crate::cluster::slot_table(vol)?;
                        if rec
                            .holders
                            .iter()
                            .any(|h| crate::cluster::is_current(&t, h))
                        {
                            return Ok(false);
                        }
                    }
                    st.ifree(vol, &mut i)?;
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            n += u64::from(freed);
        }
        Ok(n)
    }

    pub(crate) fn journal_region(
        &self,
        addr: u64,
        nblocks: u32,
        slot: u32,
    ) -> Result<journal::Region> {
        journal_region(&self.vol(), addr, nblocks, slot)
    }

    /// Journal replays done when this filesystem was opened: (slot, report).
    pub fn replays(&self) -> Vec<(u32, journal::Report)> {
        self.replays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Commit every pending metadata change and make all data durable
    /// (fsync, fdatasync, syncfs, sync).
    pub fn sync(&self) -> Result<()> {
        let mut st = self.lock();
        if st.meta.dirty_len() > 0 {
            st.meta.journal_commit(&self.vol())
        } else {
            drop(st);
            self.vol().flush()
        }
    }

    /// Commit the running transaction if it has waited long enough (the
    /// mount's commit timer calls this).
    pub fn commit_pending(&self) -> Result<()> {
        let mut st = self.lock();
        st.meta.journal_commit(&self.vol())
    }

    /// Clean unmount: commit, checkpoint (the journal is left empty), mark
    /// the slot free. Idempotent.
    pub fn unmount(&self) -> Result<()> {
        if self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let slot = self.slot.load(std::sync::atomic::Ordering::SeqCst);
        let mut st = if self.shared.get().is_some() {
            self.lock_with_volume_lock()?
        } else {
            self.lock()
        };
        if self.shared.get().is_some() {
            // Give back every file lock, then the volume lock (after a checkpoint).
            let me = self
                .member
                .get()
                .expect("cluster mode has a member")
                .holder();
            for addr in st.flocks.keys().copied().collect::<Vec<_>>() {
                let (lun, off) = self.vol().lock_sector(addr)?;
                locking::release_under_volume_lock(&*lun, off, me)?;
            }
            st.flocks.clear();
            st.alloc.release_all(&self.vol())?;
            self.vl_leave(&mut st, true)?;
        }
        st.meta.checkpoint(&self.vol())?;
        if let Some(m) = self.member.get() {
            m.leave()?;
        } else if slot != u32::MAX {
            let mut hs = self.vol().read_slot(slot)?;
            hs.state = SLOT_FREE;
            self.vol().write_slot(slot, &hs)?;
        }
        Ok(())
    }

    /// Drop without writing anything more, as a crash would (tests, and a
    /// filesystem whose LUNs are gone).
    pub fn abandon(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(m) = self.member.get() {
            m.stop();
        }
    }

    /// Every slot as housekeeping last read it.
    pub(crate) fn last_slots(&self) -> Vec<crate::format::HostSlot> {
        match self.shared.get() {
            Some(sh) => sh
                .monitor
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last
                .clone(),
            None => Vec::new(),
        }
    }

    /// Cluster housekeeping, every heartbeat interval (the mount runs it on
    /// a thread of its own): watch the other slots; give the volume lock
    /// back when another host has arrived; recover hosts that died (journal
    /// replay, slot freed, their locks with it), then free the files they
    /// had unlinked while open.
    pub fn housekeep(&self) -> Result<()> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(());
        };
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) || m.lease.is_fenced() {
            return Ok(());
        }
        let (others, dead) = sh
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(&self.vol(), m.slot, &m.timeouts)?;
        let was = sh
            .contended
            .swap(others, std::sync::atomic::Ordering::SeqCst);
        if others && !was {
            tracing::info!(
                "another host is mounted: the volume lock is given back whenever another host waits for it"
            );
        }
        if others {
            self.release_volume_lock()?;
            // An extent another host added shows in statfs without waiting
            // for an operation here.
            let mut st = self.lock();
            if st.vl_held.is_none() && self.refresh_volume(&mut st)? {
                // The allocation summaries (statfs) are reloaded under the lock.
                drop(st);
                self.op(|_, _| Ok(()))?;
            }
        }
        if self.recover_slots(dead, "stopped")? > 0 {
            let n = self.free_orphans()?;
            if n > 0 {
                tracing::info!("freed {n} file(s) the dead host had unlinked while open");
            }
            self.release_volume_lock()?;
        }
        Ok(())
    }

    /// Recover dead hosts (`why` for the log): for each, take the volume
    /// lock — breaking its holds, and those of the other dead hosts: they
    /// write nothing any more (self-fencing) — then, if its slot is still
    /// as seen, mark it being replayed by this host, replay its journal,
    /// free it with generation + 1. Every recoverer goes through the volume
    /// lock, so a read-check-write of the slot suffices even on LUNs without
    /// compare-and-write: no delta-lease waits in a takeover. Returns how
    /// many this host recovered (their replays are in [`Fs::replays`]).
    pub(crate) fn recover_slots(
        &self,
        dead: Vec<crate::cluster::Dead>,
        why: &str,
    ) -> Result<usize> {
        let Some(m) = self.member.get() else {
            return Ok(0);
        };
        let breaking: Vec<u32> = dead.iter().map(|d| d.slot).collect();
        let mut done = 0;
        for d in dead {
            let mut st = self.lock();
            // Without reloading allocation summaries: the dead host may
            // have left them half written until its journal is replayed.
            self.vl_take(&mut st, &breaking, false, true)?;
            let why = format!(
                "{why}: its heartbeat has not changed for {} ms (lease {} ms)",
                d.silent.as_millis(),
                m.timeouts.lease.as_millis()
            );
            let r = crate::cluster::recover(
                &self.vol(),
                d.slot,
                &d.hs,
                &d.sector,
                m.slot,
                &m.timeouts,
                &why,
                crate::cluster::Confirm::Owned,
            );
            // What the replay wrote in place is newer than anything cached.
            st.meta.clear();
            st.alloc_stale = true;
            st.cache_gen = None;
            let left = self.vl_leave(&mut st, true);
            if let Some(rep) = r? {
                done += 1;
                if let Some(rep) = rep {
                    self.replays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((d.slot, rep));
                }
            }
            left?;
        }
        Ok(done)
    }

    /// Whether the datastore is shared with other hosts (cluster mode).
    /// This host's journal: bytes in use and its size (None: no journal).
    pub fn journal_use(&self) -> Option<(u64, u64)> {
        let st = self.lock();
        st.meta
            .jnl
            .as_ref()
            .map(|j| (j.used() * 4096, j.capacity() * 4096))
    }

    /// Files this host has open.
    pub fn open_files(&self) -> usize {
        self.lock().open.len()
    }

    pub fn usage(&self) -> Usage {
        let st = self.lock();
        let fds: Vec<_> = st
            .alloc
            .clusters
            .iter()
            .filter(|c| c.rtype == ResType::Fd)
            .collect();
        let fds_free: u64 = fds.iter().map(|c| u64::from(c.free)).sum();
        let fds_total: u64 = fds.iter().map(|c| u64::from(c.count)).sum();
        Usage {
            block_size: self.vol().block_size(),
            total_blocks: self.vol().header.total_blocks(),
            free_blocks: st.alloc.free_blocks(),
            fd_clusters: fds.len() as u64,
            fds_used: fds_total - fds_free,
            fds_free,
        }
    }

    /// The extents holding a file's data blocks.
    pub fn extents_of(&self, ino: u64) -> Result<std::collections::BTreeSet<usize>> {
        self.read_op(|st, vol| {
            let i = st.iget(vol, ino)?;
            let leaf = State::leaf_size(vol, &i);
            let mut out = std::collections::BTreeSet::new();
            for li in 0..i.size.div_ceil(leaf) {
                let p = st.get_ptr(vol, &i, li)?;
                if p != 0 {
                    out.insert(vol.locate((p & PTR_ADDR_MASK) * MD as u64)?.0);
                }
            }
            Ok(out)
        })
    }

    /// 4K addresses of a directory's header and first bucket.
    pub fn dir_blocks(&self, dir: u64) -> Result<(u64, u64)> {
        self.read_op(|st, vol| {
            let d = st.iget(vol, dir)?;
            Ok((st.dir_block_ro(vol, &d, 0)?, st.dir_block_ro(vol, &d, 1)?))
        })
    }

    /// Re-read allocation summaries (after fsck rewrote bitmaps).
    pub fn reload_alloc(&self) -> Result<()> {
        let mut st = self.lock();
        st.meta.clear();
        let mut a = Alloc::load(&self.vol(), &mut st.meta)?;
        a.keep_hints(&st.alloc);
        st.alloc = a;
        Ok(())
    }

    /// Grow by one extent. Mounted with other hosts, under the volume lock:
    /// they see the new configuration generation when they next take the
    /// lock or read (and every heartbeat), open the new LUN by the URL
    /// recorded in the header, check it, and use the new capacity.
    pub fn extend(&self, new: Arc<dyn lun::Lun>) -> Result<()> {
        let new = match self.member.get() {
            Some(m) => Arc::new(lun::FencedLun::new(new, m.lease.clone())) as Arc<dyn lun::Lun>,
            None => new,
        };
        let mut st = self.lock_with_volume_lock()?;
        let r = (|| -> Result<()> {
            self.refresh_volume(&mut st)?;
            let mut v = Volume::clone(&self.vol());
            v.extend(new)?;
            self.set_vol(v);
            let mut a = Alloc::load(&self.vol(), &mut st.meta)?;
            a.keep_hints(&st.alloc);
            st.alloc = a;
            Ok(())
        })();
        let left = self.vl_leave(&mut st, true);
        r?;
        left
    }

    /// In cluster mode: if another host added an extent (extent 0's header
    /// has a newer configuration), open the new LUNs by their recorded URLs,
    /// check them with the whole volume, and switch to the larger volume.
    /// A LUN this host cannot open leaves it on the old configuration, said
    /// in the log (its files there read as I/O errors here).
    pub(crate) fn refresh_volume(&self, st: &mut State) -> Result<bool> {
        let Some(m) = self.member.get() else {
            return Ok(false);
        };
        let cur = self.vol();
        let mut b = vec![0u8; MD];
        cur.luns[0].read_at(&mut b, 0)?;
        let Ok(h) = VolumeHeader::decode(&b, Some(0)) else {
            return Ok(false); // torn or damaged: the next look decides
        };
        if h.uuid != cur.header.uuid || h.config_gen <= cur.header.config_gen {
            return Ok(false);
        }
        let mut luns = cur.luns.clone();
        for (i, e) in h.extents.iter().enumerate().skip(luns.len()) {
            let url = h.urls.get(i).cloned().unwrap_or_default();
            let opened = if url.is_empty() {
                Err(format!("the header records no URL for extent {i}"))
            } else {
                lun::open_with(&url, m.timeouts.lun_options()).map_err(|e| e.to_string())
            };
            match opened {
                Ok(l) => luns
                    .push(Arc::new(lun::FencedLun::new(l, m.lease.clone())) as Arc<dyn lun::Lun>),
                Err(why) => {
                    let was = self
                        .unopened_gen
                        .swap(h.config_gen, std::sync::atomic::Ordering::SeqCst);
                    if was == h.config_gen {
                        return Ok(false);
                    }
                    tracing::error!(
                        "another host added extent {i} ({}) to the datastore, but this host cannot open it: {why}; remount with that LUN to use it",
                        crate::volume::uuid_str(&e.uuid)
                    );
                    return Ok(false);
                }
            }
        }
        let v = match Volume::open(luns) {
            Ok(v) => v,
            Err(e) => {
                let was = self
                    .unopened_gen
                    .swap(h.config_gen, std::sync::atomic::Ordering::SeqCst);
                if was != h.config_gen {
                    tracing::error!(
                        "another host extended the datastore (configuration {}), but the new volume does not check out here: {e}; staying on configuration {}",
                        h.config_gen,
                        cur.header.config_gen
                    );
                }
                return Ok(false);
            }
        };
        tracing::info!(
            "the datastore grew to {} extents ({} blocks): configuration generation {}",
            v.header.extents.len(),
            v.header.total_blocks(),
            v.header.config_gen
        );
        self.set_vol(v);
        st.alloc_stale = true;
        Ok(true)
    }
}
