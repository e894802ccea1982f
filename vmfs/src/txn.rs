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

/// Verified metadata blocks, by 4K address.
#[derive(Default)]
pub struct Meta {
    cache: HashMap<u64, Vec<u8>>,
    pub txn: Txn,
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

    /// The block as this transaction sees it, verified.
    pub fn get(&mut self, vol: &Volume, addr: u64, magic: u32) -> Result<&[u8]> {
        if self.txn.blocks.contains_key(&addr) {
            let (m, b) = &self.txn.blocks[&addr];
            if *m != magic {
                let (lun, offset) = vol.where_is(addr * MD as u64);
                return Err(FsError::Corrupt {
                    lun,
                    offset,
                    object: format!("{} {:#x}", magic_name(magic), addr),
                    reason: format!("is in use as a {}", magic_name(*m)),
                });
            }
            return Ok(b);
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

    /// Stop tracking a block that is being freed.
    pub fn forget(&mut self, addr: u64) {
        self.txn.blocks.remove(&addr);
        self.cache.remove(&addr);
    }

    /// Write every staged block in place (bodies only: lock sectors belong to
    /// the locking layer), then make them the cached version.
    pub fn commit(&mut self, vol: &Volume) -> Result<()> {
        let txn = std::mem::take(&mut self.txn);
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
        Ok(())
    }

    /// Drop every staged change.
    pub fn abort(&mut self) {
        self.txn = Txn::default();
    }

    /// Forget everything cached (after an error of uncertain extent).
    pub fn clear(&mut self) {
        self.cache.clear();
        self.txn = Txn::default();
    }
}
