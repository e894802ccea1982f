//! Before `mkfs` or `extend` writes a LUN: what the LUN holds now, and
//! whether a host still uses it.
//!
//! The rules (mkfs.xfs, mkfs.ext4 and mkfs.ocfs2 do the same, the last with
//! its heartbeat):
//!
//! 1. Every LUN is read, nothing is written, until every LUN has passed.
//! 2. A LUN that holds one of our datastore headers, or anything libblkid
//!    recognises (a filesystem, a partition table, an LVM or RAID member,
//!    swap, a crypto container), is refused unless `force`; the message
//!    names the LUN and what it holds.
//! 3. Even with `force`, a LUN of a datastore with a live host is refused:
//!    that datastore's heartbeat region (on its first extent, found among
//!    the LUNs given or by the URL its header records) is watched for one
//!    lease, as a mounting host watches it, and the live hosts are named.
//!    A datastore whose first extent cannot be reached cannot be judged, so
//!    it is refused too (that LUN must be given, or be gone for good: then
//!    `force` overwrites it with a warning).
//! 4. With `force`, what libblkid found is wiped (its magics zeroed, as
//!    `wipefs -a`) just before formatting, so nothing later takes the LUN
//!    for what it held.

use std::sync::Arc;

use lun::probe::Signature;
use lun::Lun;

use crate::cluster::Timeouts;
use crate::error::{FsError, Result};
use crate::format::*;
use crate::volume::{uuid_str, Volume};

/// What one LUN holds.
#[derive(Debug, Clone)]
pub enum Holds {
    /// An extent of one of our datastores (its header says which).
    Datastore { header: Box<VolumeHeader> },
    /// Our header's magic with a header that does not decode.
    DamagedDatastore(String),
    /// What libblkid recognised.
    Foreign(Vec<Signature>),
}

impl std::fmt::Display for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holds::Datastore { header: h } => write!(
                f,
                "extent {} of {} of datastore {} \"{}\"",
                h.extent_index,
                h.extents.len(),
                uuid_str(&h.uuid),
                h.label
            ),
            Holds::DamagedDatastore(why) => write!(f, "a damaged datastore header ({why})"),
            Holds::Foreign(s) => {
                let all: Vec<String> = s.iter().map(|s| s.to_string()).collect();
                write!(f, "{}", all.join(", "))
            }
        }
    }
}

/// What was checked: what a forced format wipes.
pub struct Checked {
    wipe: Vec<(Arc<dyn Lun>, Holds)>,
}

impl Checked {
    /// Zero the magics of what was found (only when forced; nothing
    /// otherwise): libblkid's signatures, and the magic of an old datastore
    /// header (no host uses it: checked). Call right before formatting.
    pub fn wipe(&self) -> Result<()> {
        for (l, h) in &self.wipe {
            tracing::info!("{}: wiping {h}", l.name());
            match h {
                Holds::Foreign(s) => lun::probe::wipe(&**l, s)?,
                Holds::Datastore { .. } | Holds::DamagedDatastore(_) => {
                    l.write_at(&[0u8; 4], 0)?;
                    l.flush()?;
                }
            }
        }
        Ok(())
    }
}

/// What `lun` holds now (None: nothing anyone recognises). Reads only.
pub fn holds(lun: &dyn Lun) -> Result<Option<Holds>> {
    if lun.size() < MD as u64 {
        return Err(FsError::Occupied(format!(
            "{}: the LUN is only {} bytes, too small to hold a datastore",
            lun.name(),
            lun.size()
        )));
    }
    let mut b = vec![0u8; MD];
    lun.read_at(&mut b, 0)?;
    if get32(&b, 0) == MAGIC_VOLUME {
        return Ok(Some(match VolumeHeader::decode(&b, None) {
            Ok(h) => Holds::Datastore {
                header: Box::new(h),
            },
            Err(why) => Holds::DamagedDatastore(why),
        }));
    }
    let sigs = lun::probe::probe(lun)?;
    Ok((!sigs.is_empty()).then_some(Holds::Foreign(sigs)))
}

/// A live host of a datastore, for messages.
fn live_hosts(lun0: Arc<dyn Lun>, header: &VolumeHeader, t: &Timeouts) -> Result<Vec<String>> {
    let mut header = header.clone();
    header.extent_index = 0;
    // Only the heartbeat region (on extent 0) is read through this view.
    let view = Volume {
        header,
        luns: vec![lun0],
    };
    let live = crate::cluster::live_slots(&view, t)?;
    let slots = crate::cluster::slot_table(&view)?;
    Ok(live
        .into_iter()
        .map(|s| format!("host {} (slot {s})", uuid_str(&slots[s as usize].host)))
        .collect())
}

/// Check the LUNs `what` ("mkfs", "extend") would overwrite, following the
/// rules at the top of this file. `open` opens a LUN by URL (a datastore's
/// first extent, by the hint in its header, when it is not among `luns`).
/// Ok: every LUN may be written (call [`Checked::wipe`] before formatting).
pub fn check_overwrite(
    luns: &[Arc<dyn Lun>],
    force: bool,
    t: &Timeouts,
    what: &str,
    open: &dyn Fn(&str) -> Result<Arc<dyn Lun>>,
) -> Result<Checked> {
    let mut found = Vec::new();
    for l in luns {
        if let Some(h) = holds(&**l)? {
            found.push((l.clone(), h));
        }
    }
    // (LUN, why): at most one refusal per LUN.
    let mut refusals: Vec<(String, String)> = Vec::new();
    // Rule 3: every datastore met, judged once by its heartbeat region.
    let mut judged: Vec<[u8; 16]> = Vec::new();
    for (l, h) in &found {
        let Holds::Datastore { header } = h else {
            continue;
        };
        if judged.contains(&header.uuid) {
            continue;
        }
        judged.push(header.uuid);
        let first = found.iter().find_map(|(l0, h0)| match h0 {
            Holds::Datastore { header: h0 } if h0.uuid == header.uuid && h0.extent_index == 0 => {
                Some(Ok(l0.clone()))
            }
            _ => None,
        });
        let first = first.unwrap_or_else(|| match header.urls.first() {
            Some(u) if !u.is_empty() => open(u).and_then(|l0| {
                let mut b = vec![0u8; MD];
                l0.read_at(&mut b, 0)?;
                match VolumeHeader::decode(&b, None) {
                    Ok(h0) if h0.uuid == header.uuid && h0.extent_index == 0 => Ok(l0),
                    _ => Err(FsError::Invalid(format!(
                        "{u} is no longer the first extent of that datastore"
                    ))),
                }
            }),
            _ => Err(FsError::Invalid("its header records no URL for it".into())),
        });
        let ds = format!("datastore {} \"{}\"", uuid_str(&header.uuid), header.label);
        match first {
            Ok(l0) => {
                let live = live_hosts(l0, header, t)?;
                if !live.is_empty() {
                    refusals.push((l.name().to_string(), format!(
                        "{}: {} is in use: {} live (its heartbeat moved within {} ms); unmount it on every host first",
                        l.name(),
                        ds,
                        live.join(", "),
                        t.lease.as_millis()
                    )));
                }
            }
            Err(e) if force => tracing::warn!(
                "{}: cannot tell whether any host uses {ds}: its first extent cannot be read ({e}); overwriting as forced",
                l.name()
            ),
            Err(e) => refusals.push((l.name().to_string(), format!(
                "{}: cannot tell whether any host uses {ds}: its first extent cannot be read ({e}); give that LUN too, or --force if the datastore is gone",
                l.name()
            ))),
        }
    }
    // Rule 2.
    if !force {
        for (l, h) in &found {
            if !refusals.iter().any(|(n, _)| n == l.name()) {
                refusals.push((l.name().to_string(), format!("{}: holds {h}", l.name())));
            }
        }
    }
    if !refusals.is_empty() {
        let tail = if force {
            String::new()
        } else {
            format!("\n{what} overwrites what a LUN holds only with --force (never while a host uses it)")
        };
        return Err(FsError::Occupied(format!(
            "{what} refused, nothing was written:\n  {}{tail}",
            refusals
                .iter()
                .map(|(_, why)| why.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        )));
    }
    for (l, h) in &found {
        tracing::warn!("{}: overwriting {h} (forced)", l.name());
    }
    Ok(Checked { wipe: found })
}
