//! Deleting a snapshot that is not the newest: merging a frozen layer into
//! the layer below it while the disk above keeps being written, which is
//! how a running guest's disk is consolidated with short pauses (ESX's
//! "consolidate helper"):
//!
//! 1. [`freeze`] (guest paused a few milliseconds): the current layer is
//!    frozen as `F`, a new empty layer `H` takes the guest's writes;
//! 2. [`merge_frozen`] (guest running): every grain `F` holds is copied into
//!    the layer below it, `P`. Reads of the disk do not change meanwhile:
//!    `F` still covers what is copied, and nothing writes `F` or `P`;
//! 3. [`relink`] (guest paused a few milliseconds): `H` is re-pointed at
//!    `P`, and `F` is removed.
//!
//! `H` then holds only what the guest wrote during step 2; the caller
//! repeats, or merges `H` into `P` with the disk closed
//! ([`crate::ops::consolidate`]) once it is small.
//!
//! **Crashes.** From step 2 until `F` is gone, a marker beside `P`
//! (`P.consolidating`, its text `merging F (CID …) into P`) says that `P`
//! holds part of `F`: nobody may read `P` as the snapshot it was. The disk
//! itself opens for writing meanwhile (its reads are right), so a guest can
//! be restarted on it at once (HA). [`finish`] completes an interrupted
//! merge: copy again and relink when `F` is still in the chain, else only
//! remove what is left of `F` and the marker. Every chain operation runs
//! it first.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::descriptor::Descriptor;
use crate::disk::{consolidating_marker, read_descriptor, Disk, MAX_DEPTH};
use crate::error::{at, DiskError, Result};
use crate::store::Store;

/// The first words of a marker left by [`merge_frozen`] (a consolidation
/// of the current layer writes another text).
const MERGING: &str = "merging ";

/// The chain of `name`, newest first: (descriptor name, descriptor).
fn chain(store: &dyn Store, name: &str) -> Result<Vec<(String, Descriptor)>> {
    let mut out: Vec<(String, Descriptor)> = Vec::new();
    let mut next = Some(name.to_string());
    while let Some(n) = next.take() {
        if out.iter().any(|(x, _)| *x == n) || out.len() > MAX_DEPTH + 1 {
            return Err(DiskError::Chain(format!(
                "{}: the chain loops or is deeper than {} snapshots",
                store.describe(name),
                MAX_DEPTH
            )));
        }
        let d = read_descriptor(store, &n)?;
        next = d.parent_hint.clone();
        out.push((n, d));
    }
    Ok(out)
}

/// The frozen layer a [`merge_frozen`] marker beside layer `below` names,
/// `None` when there is no marker or it is a consolidation's.
pub fn merging_into(store: &dyn Store, below: &str) -> Result<Option<String>> {
    let Some(b) = crate::ops::read_small(store, &consolidating_marker(below), 4096)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&b);
    Ok(text
        .strip_prefix(MERGING)
        .and_then(|t| t.split(" (CID ").next())
        .filter(|t| !t.is_empty() && !t.contains('\n'))
        .map(str::to_string))
}

/// Step 1: freeze the current layer of disk `name` as a snapshot that
/// change tracking does not see (no change ID ends: the disk's content
/// does not change). Returns the frozen layer's descriptor name.
pub fn freeze(store: Arc<dyn Store>, name: &str) -> Result<String> {
    crate::ops::take_snapshot(store, name, false).map(|s| s.frozen)
}

/// Step 2: copy what the frozen layer `frozen` of the disk `top` (open for
/// writing by this host, as the running guest's disk is: its current layer
/// keeps taking writes meanwhile, and its change tracking stays open, so a
/// crash here is recovered like any writer's) holds into the layer below
/// it. Returns the bytes copied. Refused when `frozen` is the current layer
/// or the base. Setting `cancel` stops it (an error; what was copied stays
/// marked, for [`finish`]).
pub fn merge_frozen(top: &Disk, frozen: &str, cancel: Option<&AtomicBool>) -> Result<u64> {
    let store = &top.store;
    let name = &top.layers[0].name;
    let c: Vec<(String, Descriptor)> = top
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.desc.clone()))
        .collect();
    let k = position(&**store, name, &c, frozen)?;
    let (fname, fdesc) = &c[k];
    let below = c[k + 1].0.clone();
    if fdesc.extents.iter().any(|e| e.kind.is_flat()) {
        return Err(DiskError::Chain(format!(
            "{}: a frozen layer with flat extents is not one this host made; consolidate it with qemu-img commit",
            store.describe(fname)
        )));
    }
    let upper = Disk::open(store.clone(), fname, false)?;
    // Opened for writing before the marker is written: a layer below that
    // someone reads (a backup copying that snapshot) refuses here, and
    // nothing is left behind.
    let lower = Disk::open_with(store.clone(), &below, true, true)?;
    if lower.capacity() < upper.capacity() {
        return Err(DiskError::Chain(format!(
            "{} is smaller than {}: grow it first",
            store.describe(&below),
            store.describe(fname)
        )));
    }
    let marker = consolidating_marker(&below);
    match merging_into(&**store, &below)? {
        Some(f) if f == *fname => {}
        Some(f) => {
            return Err(DiskError::Chain(format!(
                "{}: a merge of {f} into it is unfinished; finish it first",
                store.describe(&below)
            )))
        }
        None => {
            if store.exists(&marker).map_err(at(&marker))? {
                return Err(DiskError::Chain(format!(
                    "{}: a consolidation into it is unfinished; finish it first",
                    store.describe(&below)
                )));
            }
            crate::ops::write_new(
                &**store,
                &marker,
                &format!("{MERGING}{fname} (CID {:08x}) into {below}\n", fdesc.cid),
            )?;
        }
    }
    let n = crate::ops::merge(&upper, &lower, cancel)?;
    lower.flush()?;
    lower.close()?;
    Ok(n)
}

/// [`merge_frozen`] with the disk opened here (nobody else may be writing
/// it), then [`relink`]: the older snapshot `frozen` of disk `name` is
/// deleted. Returns the bytes copied.
pub fn merge_down(store: Arc<dyn Store>, name: &str, frozen: &str) -> Result<u64> {
    let top = Disk::open_with(store.clone(), name, true, true)?;
    let n = merge_frozen(&top, frozen, None)?;
    top.close()?;
    relink(store, name, frozen)?;
    Ok(n)
}

/// Where `frozen` is in chain `c`: a layer with one above and one below.
fn position(
    store: &dyn Store,
    name: &str,
    c: &[(String, Descriptor)],
    frozen: &str,
) -> Result<usize> {
    match c.iter().position(|(n, _)| n == frozen) {
        Some(k) if k >= 1 && k + 1 < c.len() => Ok(k),
        Some(_) => Err(DiskError::Invalid(format!(
            "{}: {frozen} is the current layer or the base of the chain, not a snapshot between two layers",
            store.describe(name)
        ))),
        None => Err(DiskError::Invalid(format!(
            "{}: {frozen} is not in its chain",
            store.describe(name)
        ))),
    }
}

/// Step 3: after [`merge_frozen`], drop `frozen` from disk `name`'s chain:
/// the layer above it is re-pointed at the layer below (one atomic rename
/// of its descriptor), then `frozen`'s files and the marker are removed.
/// The disk must not be open for writing (by anyone: EBUSY naming them).
pub fn relink(store: Arc<dyn Store>, name: &str, frozen: &str) -> Result<()> {
    // Held for writing throughout: nobody writes the disk meanwhile, and
    // change tracking is stamped with the new chain when it closes.
    let top = Disk::open_with(store.clone(), name, true, true)?;
    let c = chain(&*store, name)?;
    let k = position(&*store, name, &c, frozen)?;
    let below = &c[k + 1];
    if merging_into(&*store, &below.0)?.as_deref() != Some(frozen) {
        return Err(DiskError::Chain(format!(
            "{}: {frozen} was not merged into {} (no marker says so): refusing to drop it",
            store.describe(name),
            below.0
        )));
    }
    let (above, adesc) = &c[k - 1];
    let mut d = adesc.clone();
    d.parent_hint = Some(below.0.clone());
    d.parent_cid = below.1.cid;
    crate::ops::commit(&*store, above, &d)?;
    top.close_committed(name)?;
    remove_layer(&*store, frozen, &c[k].1, &below.0);
    Ok(())
}

/// Remove a dropped frozen layer's extents, then its descriptor, then the
/// marker beside `below` (that order: an interruption leaves what tells
/// [`finish`] what is still to remove).
fn remove_layer(store: &dyn Store, frozen: &str, desc: &Descriptor, below: &str) {
    for f in desc
        .extents
        .iter()
        .filter_map(|e| e.file.as_deref())
        .chain([frozen, consolidating_marker(below).as_str()])
    {
        if let Err(e) = store.remove_if_there(f) {
            tracing::warn!("removing {} after a merge: {e}", store.describe(f));
        }
    }
}

/// Finish every merge into a layer of disk `name`'s chain that was
/// interrupted (a crash, a kill, an error). Returns the bytes copied again,
/// `None` when nothing was unfinished. Nobody may be writing the disk.
pub fn finish(store: Arc<dyn Store>, name: &str) -> Result<Option<u64>> {
    let mut done = None;
    // At most one per layer; each pass finishes one and reads the chain again.
    for _ in 0..=MAX_DEPTH {
        let c = chain(&*store, name)?;
        let mut found = None;
        for (k, (n, _)) in c.iter().enumerate().skip(1) {
            if let Some(f) = merging_into(&*store, n)? {
                found = Some((k, n.clone(), f));
                break;
            }
        }
        let Some((k, below, frozen)) = found else {
            return Ok(done);
        };
        if k >= 2 && c[k - 1].0 == frozen {
            tracing::warn!(
                "{}: finishing a merge of {frozen} into {below} that was interrupted",
                store.describe(name)
            );
            let n = merge_down(store.clone(), name, &frozen)?;
            done = Some(done.unwrap_or(0) + n);
        } else {
            // Relinked already: what is left of the frozen layer (unless a
            // layer of that name is in the chain again: then it is not it).
            tracing::warn!(
                "{}: removing what is left of {frozen}, merged into {below}",
                store.describe(name)
            );
            let _held = Disk::open_with(store.clone(), name, true, true)?;
            if !c.iter().any(|(n, _)| *n == frozen) && store.exists(&frozen).map_err(at(&frozen))? {
                let d = read_descriptor(&*store, &frozen)?;
                remove_layer(&*store, &frozen, &d, &below);
            } else {
                let m = consolidating_marker(&below);
                store.remove(&m).map_err(at(&m))?;
            }
            done.get_or_insert(0);
        }
    }
    Err(DiskError::Chain(format!(
        "{}: unfinished merges kept coming back",
        store.describe(name)
    )))
}
