//! Each host slot's journal on the volume: where it lies (checked to sit
//! inside one extent), and replaying every journal that holds committed
//! work. Below `cluster` (which replays a dead host's) and `fs` (which
//! replays at open and runs its own).

use crate::error::{FsError, Result};
use crate::format::*;
use crate::volume::Volume;

/// The journal region of a slot, checked to lie inside one extent's file blocks.
pub fn journal_region(vol: &Volume, addr: u64, nblocks: u32, slot: u32) -> Result<journal::Region> {
    let (i, off) = vol.locate(addr * MD as u64)?;
    let (j, _) = vol.locate((addr + u64::from(nblocks)) * MD as u64 - 1)?;
    if i != j {
        return Err(FsError::Corrupt {
            lun: vol.luns[0].name().to_string(),
            offset: vol.header.heartbeat_off + u64::from(slot) * LOCK_SECTOR as u64,
            object: format!("heartbeat slot {slot}"),
            reason: format!(
                "its journal at {addr:#x} (+{nblocks} blocks) crosses extents {i} and {j}"
            ),
        });
    }
    Ok(journal::Region {
        lun: vol.luns[i].clone(),
        lun_offset: off,
        addr,
        nblocks,
        slot,
    })
}

/// Replay every slot's journal that holds committed transactions. (One host
/// in this version; the cluster layer will replay only dead hosts' journals.)
pub fn replay_journals(vol: &Volume) -> Result<Vec<(u32, journal::Report)>> {
    let mut out = Vec::new();
    for (slot, (hs, _)) in (0..).zip(vol.read_slots()?) {
        let hs = hs?;
        if hs.journal == 0 {
            continue;
        }
        let r = journal_region(vol, hs.journal, hs.journal_blocks, slot)?;
        let rep = journal::replay(&r, &vol.header.uuid, vol)?;
        if rep.transactions > 0 || rep.stopped.is_some() {
            out.push((slot, rep));
        }
    }
    Ok(out)
}
