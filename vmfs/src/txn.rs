//! The metadata cache and the transaction: the one place every metadata
//! change passes through.
//!
//! A filesystem operation stages the metadata blocks it changes in a
//! [`Txn`]; nothing reaches the disk until [`Meta::commit`], and an operation
//! that fails midway is aborted with nothing written. The journal (its own
//! crate, later) makes commit atomic by logging the staged blocks first.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::{FsError, Result};
use crate::format::*;
use crate::volume::Volume;

/// Staged changes of one operation.
#[derive(Default)]
pub struct Txn {
    /// 4K address -> (magic, full 4 KiB block).
    pub blocks: BTreeMap<u64, (u32, Vec<u8>)>,
    /// File blocks and resources freed by this transaction: never reused by it.
    pub freed: HashSet<u64>,
}

/// Verified metadata blocks, by 4K address, and the running journal
/// transaction.
///
/// Without a journal (mkfs, before the journal exists) an operation's blocks
/// go in place when it commits. With one, they join the running transaction
/// (`dirty`), which [`Meta::journal_commit`] writes to the journal as one
/// atomic record (group commit) and then in place: at fsync/sync, when it
/// grows past a quarter of the journal, on a timer, at unmount.
#[derive(Default)]
pub struct Meta {
    cache: HashMap<u64, Vec<u8>>,
    pub txn: Txn,
    /// Committed by operations, not yet in the journal: 4K address -> (magic, sealed block).
    dirty: BTreeMap<u64, (u32, Vec<u8>)>,
    /// Freed by operations of the running transaction: not reusable until it
    /// is committed (a crash must not find another file's data in them).
    pending_free: HashSet<u64>,
    /// Freed by committed transactions still in the journal: not reusable
    /// until a checkpoint empties the journal. Otherwise a replay could write
    /// a stale metadata image of the block (a directory block, say) over the
    /// data of the file that reused it; jbd2 has revoke records for this.
    freed_in_journal: HashSet<u64>,
    pub jnl: Option<journal::Journal>,
    /// Set when writing committed blocks in place failed: the journal must
    /// not checkpoint past them; every later commit fails until a remount
    /// replays the journal.
    failed: Option<String>,
    /// Blocks read from disk (for tests and statistics).
    pub reads: u64,
}

const CACHE_MAX: usize = 65536;

impl Meta {
    fn verify(vol: &Volume, addr: u64, magic: u32, b: &[u8]) -> Result<()> {
        let bo = body_offset(magic);
        check_body(&b[bo..], magic, addr).map_err(|reason| {
            let (lun, off) = vol.where_is(addr * MD as u64);
            FsError::Corrupt {
                lun,
                offset: off + bo as u64,
                object: format!("{} {:#x}", magic_name(magic), addr),
                reason,
            }
        })
    }

    fn wrong_type(vol: &Volume, addr: u64, magic: u32, is: u32) -> FsError {
        let (lun, offset) = vol.where_is(addr * MD as u64);
        FsError::Corrupt {
            lun,
            offset,
            object: format!("{} {:#x}", magic_name(magic), addr),
            reason: format!("is in use as a {}", magic_name(is)),
        }
    }

    /// The block as staged by this operation or committed by an earlier one
    /// (the newest truth), if it is: checked to be of type `magic`.
    fn staged(&self, vol: &Volume, addr: u64, magic: u32) -> Result<Option<&Vec<u8>>> {
        for staged in [&self.txn.blocks, &self.dirty] {
            if let Some((m, b)) = staged.get(&addr) {
                if *m != magic {
                    return Err(Self::wrong_type(vol, addr, magic, *m));
                }
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// The block as this transaction sees it, if it is in memory (staged,
    /// committed or cached): for reading it while asking `self` other
    /// questions, once [`Meta::get`] has brought it in.
    pub fn peek(&self, addr: u64) -> Option<&[u8]> {
        [&self.txn.blocks, &self.dirty]
            .into_iter()
            .find_map(|m| m.get(&addr).map(|(_, b)| b.as_slice()))
            .or_else(|| self.cache.get(&addr).map(Vec::as_slice))
    }

    /// The block as this transaction sees it, verified.
    pub fn get(&mut self, vol: &Volume, addr: u64, magic: u32) -> Result<&[u8]> {
        if self.staged(vol, addr, magic)?.is_some() {
            return Ok(self.staged(vol, addr, magic)?.expect("just found"));
        }
        if !self.cache.contains_key(&addr) {
            let mut b = vec![0u8; MD];
            vol.read(addr * MD as u64, &mut b)?;
            self.reads += 1;
            Self::verify(vol, addr, magic, &b)?;
            if self.cache.len() >= CACHE_MAX {
                self.cache.clear();
            }
            self.cache.insert(addr, b);
        } else if get32(&self.cache[&addr][body_offset(magic)..], 0) != magic {
            // Cached blocks were verified when read; only the type can be wrong.
            Self::verify(vol, addr, magic, &self.cache[&addr])?;
        }
        Ok(&self.cache[&addr])
    }

    /// Drop a clean cached copy of a block (another host may have changed it).
    pub fn uncache(&mut self, addr: u64) {
        self.cache.remove(&addr);
    }

    /// The block as this host sees it (staged, committed, else read from
    /// disk now, past the cache, and not cached): for blocks other hosts
    /// may be rewriting, so a copy that fails its checksum is read again a
    /// few times (a torn read) before it counts as damaged.
    pub fn read_fresh(&mut self, vol: &Volume, addr: u64, magic: u32) -> Result<Vec<u8>> {
        if let Some(b) = self.staged(vol, addr, magic)? {
            return Ok(b.clone());
        }
        let mut b = vec![0u8; MD];
        let mut tries = 0;
        loop {
            vol.read(addr * MD as u64, &mut b)?;
            self.reads += 1;
            match Self::verify(vol, addr, magic, &b) {
                Ok(()) => return Ok(b),
                Err(_) if tries < locking::TORN_READ_RETRIES => {
                    tries += 1;
                    locking::torn_read_pause(tries);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stage the block for change and return it (the whole 4 KiB).
    pub fn get_mut(&mut self, vol: &Volume, addr: u64, magic: u32) -> Result<&mut Vec<u8>> {
        if !self.txn.blocks.contains_key(&addr) {
            let b = self.get(vol, addr, magic)?.to_vec();
            self.txn.blocks.insert(addr, (magic, b));
        }
        Ok(&mut self.txn.blocks.get_mut(&addr).expect("staged").1)
    }

    /// Stage a brand-new block (its previous contents are irrelevant).
    pub fn create(&mut self, addr: u64, magic: u32, seq: u64) -> &mut Vec<u8> {
        let mut b = vec![0u8; MD];
        init_body(&mut b[body_offset(magic)..], magic, addr, seq);
        self.txn.blocks.insert(addr, (magic, b));
        &mut self.txn.blocks.get_mut(&addr).expect("staged").1
    }

    /// Stop tracking a block that is being freed (its last contents need not
    /// reach the disk: the free and the changes before it commit together).
    pub fn forget(&mut self, addr: u64) {
        self.txn.blocks.remove(&addr);
        self.dirty.remove(&addr);
        self.cache.remove(&addr);
    }

    /// Whether a resource or file block (by 4K address) was freed and that
    /// free is not committed yet: it must not be allocated.
    pub fn is_pending_free(&self, key: u64) -> bool {
        self.txn.freed.contains(&key)
            || self.pending_free.contains(&key)
            || self.freed_in_journal.contains(&key)
    }
    pub fn has_pending_free(&self) -> bool {
        !self.pending_free.is_empty() || !self.freed_in_journal.is_empty()
    }

    /// End of one operation: its blocks become part of the running journal
    /// transaction (or, without a journal, are written in place now).
    pub fn commit(&mut self, vol: &Volume) -> Result<()> {
        let txn = std::mem::take(&mut self.txn);
        if self.jnl.is_none() {
            for (addr, (magic, mut b)) in txn.blocks {
                let bo = body_offset(magic);
                seal(&mut b[bo..]);
                if let Err(e) = vol.write(addr * MD as u64 + bo as u64, &b[bo..]) {
                    // What is on disk is now uncertain: drop it from the cache.
                    self.cache.remove(&addr);
                    return Err(e);
                }
                self.cache.insert(addr, b);
            }
            return Ok(());
        }
        if let Some(j) = &self.jnl {
            if journal::record_len(txn.blocks.len()) > j.capacity() {
                // Refuse it whole rather than wedge every later commit.
                return Err(FsError::Invalid(format!(
                    "this operation changes {} metadata blocks, more than the journal's {} log blocks hold; make the datastore with a larger --journal-size, or do it in smaller steps",
                    txn.blocks.len(),
                    j.capacity()
                )));
            }
        }
        let limit = self.dirty_limit();
        if self.dirty.len() + txn.blocks.len() > limit && !self.dirty.is_empty() {
            // Keep every running transaction small enough for the journal:
            // commit what came before this operation first.
            self.journal_commit(vol)?;
        }
        for (addr, (magic, mut b)) in txn.blocks {
            seal(&mut b[body_offset(magic)..]);
            self.cache.remove(&addr);
            self.dirty.insert(addr, (magic, b));
        }
        self.pending_free.extend(txn.freed);
        if self.dirty.len() >= limit {
            self.journal_commit(vol)?;
        }
        Ok(())
    }

    /// Blocks the running transaction may hold before it is committed.
    fn dirty_limit(&self) -> usize {
        self.jnl.as_ref().map_or(usize::MAX, |j| {
            // A record of n images takes n + n/252 + 2 log blocks; keep a
            // transaction within a quarter of the log.
            (j.capacity() as usize / 4).max(16)
        })
    }

    /// Blocks waiting in the running transaction.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Commit the running transaction: flush file data it may point at, write
    /// it to the journal (durable when this returns), then in place.
    pub fn journal_commit(&mut self, vol: &Volume) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(FsError::Invalid(format!(
                "the datastore stopped writing metadata after an earlier failure ({why}); unmount and mount again to replay the journal"
            )));
        }
        let Some(jnl) = self.jnl.as_mut() else {
            return Ok(());
        };
        if self.dirty.is_empty() {
            return Ok(());
        }
        // Ordered data: blocks a new pointer points at are durable first.
        vol.flush()?;
        let images: Vec<(u64, u32, &[u8])> = self
            .dirty
            .iter()
            .map(|(&a, (m, b))| (a, body_offset(*m) as u32, b.as_slice()))
            .collect();
        let checkpoints = jnl.checkpoints;
        jnl.commit(&images, vol)?;
        if jnl.checkpoints != checkpoints {
            // The journal was emptied before this record: older frees are final.
            self.freed_in_journal.clear();
        }
        let dirty = std::mem::take(&mut self.dirty);
        self.freed_in_journal.extend(self.pending_free.drain());
        for (addr, (magic, b)) in dirty {
            let bo = body_offset(magic);
            if let Err(e) = vol.write(addr * MD as u64 + bo as u64, &b[bo..]) {
                self.failed = Some(e.to_string());
                self.cache.remove(&addr);
                return Err(e);
            }
            if self.cache.len() >= CACHE_MAX {
                self.cache.clear();
            }
            self.cache.insert(addr, b);
        }
        Ok(())
    }

    /// Commit, then make everything durable in place and empty the journal.
    pub fn checkpoint(&mut self, vol: &Volume) -> Result<()> {
        self.journal_commit(vol)?;
        if let Some(j) = self.jnl.as_mut() {
            j.checkpoint(vol)?;
            self.freed_in_journal.clear();
        }
        Ok(())
    }

    /// Drop every staged change of the current operation.
    pub fn abort(&mut self) {
        self.txn = Txn::default();
    }

    /// Forget every clean cached block (after an error of uncertain extent).
    /// The running transaction stays: it is the newest truth.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.txn = Txn::default();
    }
}
