//! Chain operations on a disk a guest is using, with its I/O held only
//! for short steps: a consolidation in rounds (see [`snapshot::merge`]),
//! and the deletion of one named snapshot (a backup's, once the backup has
//! read it), wherever it is in the chain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor_io::vdisk::VirtualDisk;
use snapshot::merge;

use crate::error::Result;
use crate::ops::{self, DiskDone};

/// A consolidation whose last merge copies at most this much goes on with
/// the guest's I/O held (tens of milliseconds); more is merged while the
/// guest runs.
const MERGE_HELD_MAX: u64 = 16 << 20;
/// Rounds of merging with the guest running before the rest is merged
/// held, however much the guest wrote meanwhile (a guest that writes
/// faster than the datastore merges).
const MERGE_ROUNDS: usize = 4;

/// One operation's steps on one disk, and what they cost the guest.
struct Run<'a> {
    path: &'a str,
    disk: &'a VirtualDisk,
    store: Arc<dyn snapshot::Store>,
    name: String,
    pauses: Vec<Duration>,
    /// Bytes merged with the guest running, and with its I/O held.
    online: u64,
    closed: u64,
}

impl<'a> Run<'a> {
    fn new(path: &'a str, disk: &'a VirtualDisk) -> Run<'a> {
        Run {
            path,
            disk,
            store: disk.store().clone(),
            name: disk.name().to_string(),
            pauses: Vec::new(),
            online: 0,
            closed: 0,
        }
    }

    /// Run `op` with the disk closed and I/O held; the pause is logged.
    fn held<T>(&mut self, what: &str, op: impl FnOnce() -> snapshot::Result<T>) -> Result<T> {
        let (r, d) = self.disk.with_closed(op);
        tracing::info!(
            "{}: {what} with the guest's I/O held for {:.1} ms",
            self.path,
            d.as_secs_f64() * 1000.0
        );
        self.pauses.push(d);
        r.map_err(ops::disk_err)
    }

    /// Merge the frozen layer `frozen` into the layer below it with the
    /// guest running, then relink (held).
    fn merge_down(&mut self, frozen: &str) -> Result<()> {
        let t = Instant::now();
        let disk = self.disk;
        let n = disk
            .with_open(|d| merge::merge_frozen(d, frozen, Some(disk.closing())))
            .map_err(ops::disk_err)?;
        tracing::info!(
            "{}: {} of {frozen} merged with the guest running, in {:.1} s",
            self.path,
            mib(n),
            t.elapsed().as_secs_f64()
        );
        self.online += n;
        let (store, name) = (self.store.clone(), self.name.clone());
        self.held("relinking", || merge::relink(store, &name, frozen))
    }

    /// A merge its host did not finish (it died): continued, running.
    fn finish_interrupted(&mut self) -> Result<()> {
        let store = self.store.clone();
        let unfinished = self
            .disk
            .with_open(|d| {
                for w in d.layers.windows(2).skip(1) {
                    if merge::merging_into(&*store, &w[1].name)?.as_deref() == Some(&w[0].name) {
                        return Ok(Some(w[0].name.clone()));
                    }
                }
                Ok(None)
            })
            .map_err(ops::disk_err)?;
        if let Some(f) = unfinished {
            tracing::warn!("{}: finishing an interrupted merge of {f}", self.path);
            self.merge_down(&f)?;
        }
        Ok(())
    }

    /// Merge the current layer into the snapshot below it (which becomes
    /// the current layer), in rounds.
    fn consolidate_top(&mut self) -> Result<()> {
        let (store, name) = (self.store.clone(), self.name.clone());
        for round in 0.. {
            let left = self.disk.top_bytes().map_err(ops::disk_err)?;
            if left <= MERGE_HELD_MAX
                || round == MERGE_ROUNDS
                || self.disk.depth() >= snapshot::disk::MAX_DEPTH
            {
                if round == MERGE_ROUNDS {
                    tracing::warn!(
                        "{}: the guest writes about as fast as the datastore merges: merging the last {left} bytes with its I/O held",
                        self.path
                    );
                }
                let n = self.held("the last merge", || {
                    snapshot::ops::consolidate(store.clone(), &name)
                })?;
                self.closed += n;
                return Ok(());
            }
            let frozen = self.held("freezing the current layer", || {
                merge::freeze(store.clone(), &name)
            })?;
            if let Err(e) = self.merge_down(&frozen) {
                // Refused before anything was copied (the layer below is
                // read elsewhere): the frozen layer takes back what was
                // written since, and the chain is as it was.
                let below_marked = self
                    .disk
                    .with_open(|d| {
                        let k = d.layers.iter().position(|l| l.name == frozen);
                        Ok(match k.and_then(|k| d.layers.get(k + 1)) {
                            Some(b) => merge::merging_into(&*store, &b.name)?.is_some(),
                            None => false,
                        })
                    })
                    .unwrap_or(true);
                if !below_marked {
                    if let Err(u) = self.held("undoing the freeze", || {
                        snapshot::ops::consolidate(store.clone(), &name)
                    }) {
                        tracing::error!("{}: undoing the freeze: {u}", self.path);
                    }
                }
                return Err(e);
            }
        }
        unreachable!("the rounds end")
    }

    fn done(self, what: String) -> DiskDone {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let longest = self.pauses.iter().max().copied().unwrap_or_default();
        let total: Duration = self.pauses.iter().sum();
        let said = format!(
            "{what}: {} merged with the guest running, {} with its I/O held (guest I/O held {} times, the longest {:.1} ms, {:.1} ms in all)",
            mib(self.online),
            mib(self.closed),
            self.pauses.len(),
            ms(longest),
            ms(total)
        );
        tracing::info!("{}: {said}", self.path);
        DiskDone {
            path: self.path.to_string(),
            said,
            depth: self.disk.depth(),
            change_id: None,
        }
    }
}

/// Consolidate an attached disk while its guest runs (one snapshot, or
/// `all`), in rounds (see [`snapshot::merge`]): freeze the current layer
/// (a pause of milliseconds), merge it into the snapshot below with the
/// guest running, relink (milliseconds); once the current layer holds
/// little, merge it with I/O held. Every pause is logged and reported.
pub fn consolidate(path: &str, disk: &VirtualDisk, all: bool) -> Result<DiskDone> {
    let mut run = Run::new(path, disk);
    run.finish_interrupted()?;
    if disk.depth() == 0 {
        return Err(ops::disk_err(snapshot::DiskError::Invalid(format!(
            "{path} has no snapshot to consolidate"
        ))));
    }
    let mut levels = 0;
    loop {
        run.consolidate_top()?;
        levels += 1;
        if !all || disk.depth() == 0 {
            break;
        }
    }
    Ok(run.done(format!("{levels} snapshot(s) consolidated")))
}

/// Delete the snapshot whose frozen descriptor is `frozen` from an
/// attached disk while its guest runs: the layer above it is merged into
/// it (the current layer, in rounds; an older frozen layer, with the guest
/// running). Nothing to do when `frozen` is no longer in the chain.
pub fn delete_snapshot(path: &str, disk: &VirtualDisk, frozen: &str) -> Result<DiskDone> {
    let mut run = Run::new(path, disk);
    run.finish_interrupted()?;
    let at = disk
        .with_open(|d| {
            Ok(d.layers
                .iter()
                .position(|l| l.name == frozen)
                .filter(|&k| k >= 1)
                .map(|k| (k, d.layers[k - 1].name.clone())))
        })
        .map_err(ops::disk_err)?;
    match at {
        None => return Ok(run.done(format!("{frozen} was gone already"))),
        Some((1, _)) => run.consolidate_top()?,
        Some((_, above)) => run.merge_down(&above)?,
    }
    Ok(run.done(format!("snapshot {frozen} deleted")))
}

/// Finish a merge of an attached disk that its host did not finish (it died
/// mid-consolidation), with the guest running: before any operation that
/// holds the guest's I/O (which would otherwise finish it while held).
pub fn finish_interrupted(path: &str, disk: &VirtualDisk) -> Result<()> {
    let mut run = Run::new(path, disk);
    run.finish_interrupted()
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
}
