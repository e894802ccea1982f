//! Operations on a disk's chain: create a base disk, take a snapshot,
//! revert to the last one. Each changes the chain by writing new files
//! first and then renaming a new `NAME.vmdk` over the old one: the rename
//! is the commit point, so a crash before it leaves the disk as it was
//! (plus files nothing refers to, which [`sweep`] removes) and a crash
//! after it leaves the new state.
//!
//! Snapshot, in order (each step durable before the next):
//! 1. flush the disk (its grains and grain tables);
//! 2. write the frozen copy of the current descriptor, `NAME-NNNNNN.vmdk`
//!    (same CID: from now on that CID never changes);
//! 3. create the new, empty delta extent(s) of the new layer;
//! 4. write the new current descriptor to `NAME.vmdk.new` (a new CID, the
//!    frozen CID as `parentCID`, the frozen name as `parentFileNameHint`);
//! 5. rename `NAME.vmdk.new` over `NAME.vmdk` — the commit point;
//!
//! Revert makes a new empty delta over the same frozen parent and commits
//! it the same way, then removes the old delta.

use std::sync::Arc;

use crate::ctk::{self, ChangeId};
use crate::descriptor::{Access, Descriptor, Extent, Kind};
use crate::disk::{consolidating_marker, read_descriptor, utc_now, Disk, MAX_DEPTH};
use crate::error::{at, DiskError, Result};
use crate::extent::SparseExtent;
use crate::sparse::MAX_EXTENT_CAPACITY;
use crate::store::Store;

/// How a base disk's blocks are provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// Sparse on the datastore: blocks allocated as written.
    Thin,
    /// Every block allocated at creation, reading zeros until written.
    Lazy,
    /// Every block allocated and written with zeros at creation.
    Eager,
}

impl Provisioning {
    pub fn parse(s: &str) -> Option<Provisioning> {
        match s {
            "thin" => Some(Provisioning::Thin),
            "lazy" | "lazyzeroedthick" => Some(Provisioning::Lazy),
            "eager" | "eagerzeroedthick" => Some(Provisioning::Eager),
            _ => None,
        }
    }
}

/// The grain of our deltas: also change tracking's granularity.
pub const GRAIN: u64 = 64 << 10;

/// A fresh content ID (never the "no parent" value).
pub fn new_cid() -> u32 {
    loop {
        let mut b = [0u8; 4];
        crate::ids::fill(&mut b);
        let c = u32::from_le_bytes(b);
        if c < 0xffff_fffe {
            return c;
        }
    }
}

/// The name every file of disk `name` starts with (`NAME` of `NAME.vmdk`).
pub fn stem(name: &str) -> Result<&str> {
    crate::descriptor::check_name(name).map_err(DiskError::Invalid)?;
    name.strip_suffix(".vmdk")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| DiskError::Invalid(format!("a disk's name ends in .vmdk: {name:?}")))
}

pub(crate) fn write_new(store: &dyn Store, name: &str, text: impl AsRef<[u8]>) -> Result<()> {
    store.remove_if_there(name).map_err(at(name))?;
    let f = store.create(name).map_err(at(name))?;
    f.write_at(text.as_ref(), 0).map_err(at(name))?;
    f.flush().map_err(at(name))?;
    Ok(())
}

/// Replace file `name` with `bytes` at once: written beside it
/// (`NAME.new`), then renamed over it.
pub fn replace_file(store: &dyn Store, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = format!("{name}.new");
    write_new(store, &tmp, bytes)?;
    store.rename(&tmp, name).map_err(at(name))
}

/// The first `max` bytes of small file `name` (a marker), `None` when it
/// is not there.
pub fn read_small(store: &dyn Store, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
    let f = match store.open(name, false) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(at(name)(e)),
    };
    let len = f.len().map_err(at(name))?.min(max) as usize;
    let mut b = vec![0u8; len];
    f.read_full(&mut b, 0).map_err(at(name))?;
    Ok(Some(b))
}

/// Commit `desc` as the current descriptor `name`: written beside it, then
/// renamed over it.
pub(crate) fn commit(store: &dyn Store, name: &str, desc: &Descriptor) -> Result<()> {
    replace_file(store, name, desc.to_text().as_bytes())
}

fn geometry(size: u64) -> (u64, u64, u64) {
    // SCSI disks: 255 heads, 63 sectors per track, as ESX writes them.
    let cyl = (size / (255 * 63 * 512)).clamp(1, 65535);
    (cyl, 255, 63)
}

fn uuid_text() -> String {
    let mut b = [0u8; 16];
    crate::ids::fill(&mut b);
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}", h[..8].join(" "), h[8..].join(" "))
}

/// Create the base disk `name` (`NAME.vmdk` + `NAME-flat.vmdk`) of `size`
/// bytes (rounded up to a sector). `adapter` goes in the disk database
/// (`lsilogic`, `pvscsi`, ...).
pub fn create(
    store: &dyn Store,
    name: &str,
    size: u64,
    prov: Provisioning,
    adapter: &str,
) -> Result<Descriptor> {
    let d = create_unlinked(store, name, size, prov, adapter)?;
    commit(store, name, &d)?;
    let part = part_name(name);
    store.remove_if_there(&part).map_err(at(&part))?;
    Ok(d)
}

/// The descriptor under which a clone or an import is filled before it is
/// committed as `name`: a crash leaves no half-copied disk under its name.
fn part_name(name: &str) -> String {
    format!("{name}.part")
}

/// The extent and change-tracking files of a new disk `name`, and its
/// descriptor (not yet written). The leftovers of an interrupted clone or
/// import of the same name are removed first.
fn create_unlinked(
    store: &dyn Store,
    name: &str,
    size: u64,
    prov: Provisioning,
    adapter: &str,
) -> Result<Descriptor> {
    let st = stem(name)?;
    let part = part_name(name);
    if !store.exists(name).map_err(at(name))? && store.exists(&part).map_err(at(&part))? {
        // (The .part itself stays: it marks these files until the new
        // disk is committed.)
        for f in [format!("{st}-flat.vmdk"), ctk_file(st)] {
            if store.exists(&f).map_err(at(&f))? {
                tracing::warn!(
                    "{}: removing {f}, left by an interrupted clone or import",
                    store.describe(name)
                );
                store.remove_if_there(&f).map_err(at(&f))?;
            }
        }
    }
    if size == 0 || size > 62 << 40 {
        return Err(DiskError::Invalid(format!(
            "disk size {size} is not from 1 byte to 62 TiB"
        )));
    }
    let size = size.div_ceil(512) * 512;
    if store.exists(name).map_err(at(name))? {
        return Err(DiskError::Invalid(format!(
            "{} exists",
            store.describe(name)
        )));
    }
    let flat = format!("{st}-flat.vmdk");
    let f = store.create(&flat).map_err(at(&flat))?;
    f.set_len(size).map_err(at(&flat))?;
    match prov {
        Provisioning::Thin => {}
        Provisioning::Lazy => f.allocate(0, size).map_err(at(&flat))?,
        Provisioning::Eager => {
            f.allocate(0, size).map_err(at(&flat))?;
            let zeros = vec![0u8; 1 << 20];
            let mut o = 0;
            while o < size {
                let n = (size - o).min(zeros.len() as u64) as usize;
                f.write_at(&zeros[..n], o).map_err(at(&flat))?;
                o += n as u64;
            }
        }
    }
    f.flush().map_err(at(&flat))?;
    let mut d = Descriptor::new(
        "vmfs",
        new_cid(),
        vec![Extent {
            access: Access::ReadWrite,
            sectors: size / 512,
            kind: Kind::Vmfs,
            file: Some(flat),
            offset: 0,
        }],
    );
    let (c, h, s) = geometry(size);
    d.set_ddb("ddb.virtualHWVersion", "4");
    d.set_ddb("ddb.adapterType", adapter);
    d.set_ddb("ddb.geometry.cylinders", &c.to_string());
    d.set_ddb("ddb.geometry.heads", &h.to_string());
    d.set_ddb("ddb.geometry.sectors", &s.to_string());
    d.set_ddb("ddb.uuid", &uuid_text());
    d.set_ddb(
        "ddb.thinProvisioned",
        if prov == Provisioning::Thin { "1" } else { "0" },
    );
    // Change tracking on, as for every new disk.
    let ctk_name = ctk_file(st);
    ctk::create(
        store,
        &ctk_name,
        size,
        d.cid,
        &format!("{} (the disk was created)", utc_now()),
    )?;
    d.set_change_track_path(Some(&ctk_name));
    Ok(d)
}

/// Make `name` a disk filled by `fill` (a clone or an import): its files
/// made, filled through a descriptor under another name, then committed.
fn create_filled(
    store: Arc<dyn Store>,
    name: &str,
    size: u64,
    prov: Provisioning,
    adapter: &str,
    fill: impl FnOnce(&Disk) -> Result<u64>,
) -> Result<u64> {
    stem(name)?;
    if store.exists(name).map_err(at(name))? {
        return Err(DiskError::Invalid(format!(
            "{} exists",
            store.describe(name)
        )));
    }
    let part = part_name(name);
    // The .part first, before any other file: whatever a crash leaves
    // from here on, it is there to say whose leftovers they are.
    if !store.exists(&part).map_err(at(&part))? {
        write_new(&*store, &part, "")?;
    }
    let d = create_unlinked(&*store, name, size, prov, adapter)?;
    write_new(&*store, &part, &d.to_text())?;
    let disk = Disk::open(store.clone(), &part, true)?;
    let n = fill(&disk)?;
    disk.close()?;
    store.rename(&part, name).map_err(at(name))?;
    Ok(n)
}

/// Delete disk `name`: its current descriptor first (from then on it is
/// gone), then every other file of its chain. Refused while it is open
/// for writing anywhere.
pub fn delete(store: Arc<dyn Store>, name: &str) -> Result<()> {
    stem(name)?;
    let files = chain_files(&*store, name)?;
    drop(Disk::open(store.clone(), name, true)?);
    // The descriptor becomes the .part first: from then on the disk is
    // gone, and a crash leaves files a later create of the name removes.
    let part = part_name(name);
    store.rename(name, &part).map_err(at(name))?;
    for f in files.iter().filter(|f| *f != name) {
        if let Err(e) = store.remove(f) {
            tracing::warn!("removing {}: {e}", store.describe(f));
        }
    }
    store.remove(&part).map_err(at(&part))?;
    Ok(())
}

/// The change-tracking file of disk `NAME`.
pub fn ctk_file(stem: &str) -> String {
    format!("{stem}-ctk.vmdk")
}

/// Make the empty delta extent(s) of a new layer of `capacity` bytes
/// (several when over 1 TiB) named from `prefix`; their extent lines.
fn new_delta(store: &dyn Store, prefix: &str, capacity: u64) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut left = capacity;
    let mut k = 0;
    while left > 0 {
        let len = left.min(MAX_EXTENT_CAPACITY);
        let name = if capacity <= MAX_EXTENT_CAPACITY {
            format!("{prefix}-delta.vmdk")
        } else {
            format!("{prefix}-delta-{k}.vmdk")
        };
        store.remove_if_there(&name).map_err(at(&name))?;
        let f = store.create(&name).map_err(at(&name))?;
        SparseExtent::create(f, &name, len, GRAIN)?;
        out.push(Extent {
            access: Access::ReadWrite,
            sectors: len / 512,
            kind: Kind::Sparse,
            file: Some(name),
            offset: 0,
        });
        left -= len;
        k += 1;
    }
    Ok(out)
}

/// The descriptor of a new, empty layer over the frozen `parent` (name,
/// descriptor), keeping `top`'s disk database.
fn layer_over(
    store: &dyn Store,
    st: &str,
    depth: usize,
    parent: (&str, &Descriptor),
    top: &Descriptor,
) -> Result<Descriptor> {
    let cid = new_cid();
    let extents = new_delta(store, &format!("{st}-{depth:06}-{cid:08x}"), top.capacity())?;
    let mut d = Descriptor::new("twoGbMaxExtentSparse", cid, extents);
    d.parent_cid = parent.1.cid;
    d.parent_hint = Some(parent.0.to_string());
    d.ddb = top
        .ddb
        .iter()
        .filter(|(k, _)| k != "ddb.thinProvisioned")
        .cloned()
        .collect();
    d.set_change_track_path(top.change_track_path());
    Ok(d)
}

/// What `snapshot` froze.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The frozen layer's descriptor (`NAME-NNNNNN.vmdk`).
    pub frozen: String,
    /// The change ID the disk froze at (`None`: tracking is off).
    pub change_id: Option<ChangeId>,
}

impl Snapshot {
    /// What a snapshot did, for a person.
    pub fn said(&self) -> String {
        format!(
            "snapshot taken: the state until now is frozen as {}{}",
            self.frozen,
            self.change_id
                .map(|i| format!(", change ID {i}"))
                .unwrap_or_default()
        )
    }
}

/// Take a snapshot of disk `name`: freeze its current state. Returns the
/// frozen layer's descriptor name. Refused on a chain already
/// [`MAX_DEPTH`] deep, and while the disk is open for writing elsewhere.
pub fn snapshot(store: Arc<dyn Store>, name: &str) -> Result<Snapshot> {
    take_snapshot(store, name, true)
}

/// [`snapshot`]; `epoch`: end the change-tracking epoch (a snapshot a
/// person or a backup asked for), else only tell tracking the new CID
/// (the first step of a consolidation: see [`crate::merge`]).
pub(crate) fn take_snapshot(store: Arc<dyn Store>, name: &str, epoch: bool) -> Result<Snapshot> {
    let st = stem(name)?.to_string();
    finish_consolidation(store.clone(), name)?;
    // Opened for writing: its extents locked (EBUSY if written elsewhere),
    // and everything written so far made durable.
    let disk = Disk::open(store.clone(), name, true)?;
    refuse_shared(&*store, &disk, "a snapshot")?;
    if disk.depth() >= MAX_DEPTH {
        return Err(DiskError::Chain(format!(
            "{} already has {MAX_DEPTH} snapshots: consolidate before taking another",
            store.describe(name)
        )));
    }
    disk.flush()?;
    let top = disk.layers[0].desc.clone();
    let frozen = format!("{st}-{:06}.vmdk", disk.depth());
    // A marker left by a consolidation of an older layer of this name
    // that finished (it is removed last): not about the new one.
    let stale = consolidating_marker(&frozen);
    store.remove_if_there(&stale).map_err(at(&stale))?;
    let mut fz = top.clone();
    fz.set_change_track_path(None);
    write_new(&*store, &frozen, &fz.to_text())?;
    let next = layer_over(&*store, &st, disk.depth() + 1, (&frozen, &top), &top)?;
    let change_id = if epoch {
        disk.end_epoch(next.cid)?
    } else {
        disk.expect_cid(next.cid)?;
        None
    };
    // Committed while the disk is still open here (its locks held): no
    // writer can open the old layer in between and write into what is now
    // frozen.
    commit(&*store, name, &next)?;
    disk.close_committed(name)?;
    Ok(Snapshot { frozen, change_id })
}

/// Revert disk `name` to its last snapshot: what was written since is
/// dropped. Refused on a disk with no snapshot.
pub fn revert(store: Arc<dyn Store>, name: &str) -> Result<()> {
    let st = stem(name)?.to_string();
    // An interrupted merge of an older snapshot keeps the one reverted to.
    crate::merge::finish(store.clone(), name)?;
    if finish_consolidation(store.clone(), name)?.is_some() {
        return Err(DiskError::Invalid(format!(
            "{}: an interrupted consolidation was found and finished first: the snapshot it deleted is gone, so there is nothing to revert to",
            store.describe(name)
        )));
    }
    let disk = Disk::open(store.clone(), name, true)?;
    refuse_shared(&*store, &disk, "a revert")?;
    if disk.depth() == 0 {
        return Err(DiskError::Invalid(format!(
            "{} has no snapshot to revert to",
            store.describe(name)
        )));
    }
    let top = disk.layers[0].desc.clone();
    let parent = disk.layers[1].desc.clone();
    let parent_name = disk.layers[1].name.clone();
    let next = layer_over(&*store, &st, disk.depth(), (&parent_name, &parent), &top)?;
    // What the dropped layer held reads differently from now on: changed.
    disk.mark_changed(&disk.top_ranges()?)?;
    disk.expect_cid(next.cid)?;
    commit(&*store, name, &next)?;
    disk.close_committed(name)?;
    // The old layer's extents: nothing refers to them now.
    for e in &top.extents {
        if let Some(f) = &e.file {
            if let Err(e) = store.remove(f) {
                tracing::warn!("removing {} after the revert: {e}", store.describe(f));
            }
        }
    }
    Ok(())
}

/// Delete the newest snapshot of disk `name`: what the current layer holds
/// is merged into the layer below it, which becomes the current one.
///
/// 1. open the current layer for writing (EBUSY if written elsewhere) and
///    flush it;
/// 2. open the layer below for writing (EBUSY while anyone reads it: a
///    backup still copying that snapshot);
/// 3. copy every grain of the current layer into the layer below, and make
///    that durable. Reads of the disk do not change meanwhile: the current
///    layer's grains still cover the same bytes. A crash here leaves the
///    chain as it was; the next consolidate copies again;
/// 4. commit a descriptor naming the layer below's extents (a new CID: its
///    content changed) as `NAME.vmdk`;
/// 5. remove the old current layer's extents and the frozen descriptor.
///
/// Returns the bytes merged.
pub fn consolidate(store: Arc<dyn Store>, name: &str) -> Result<u64> {
    stem(name)?;
    // A merge of an older snapshot that was interrupted: finished first
    // (the layer below the current one may be the one it was merging into).
    crate::merge::finish(store.clone(), name)?;
    let top = Disk::open_with(store.clone(), name, true, true)?;
    refuse_shared(&*store, &top, "a consolidation")?;
    if top.depth() == 0 {
        return Err(DiskError::Invalid(format!(
            "{} has no snapshot to consolidate",
            store.describe(name)
        )));
    }
    top.flush()?;
    let top_desc = top.layers[0].desc.clone();
    let parent_name = top.layers[1].name.clone();
    if top_desc.extents.iter().any(|e| e.kind.is_flat()) {
        return Err(DiskError::Chain(format!(
            "{}: the current layer of a chain has flat extents: not one this host made; consolidate it with qemu-img commit",
            store.describe(name)
        )));
    }
    // From here until the commit the layer below holds part of the
    // current layer's writes: the marker keeps anyone from reading it as
    // the snapshot it was, or reverting onto it, until this finishes
    // (here, or in the next consolidate, snapshot, revert or check
    // --repair of the disk).
    // Written once everything that can refuse has passed (the layer below
    // opened for writing, big enough): a refused consolidation leaves no
    // marker behind.
    let parent = Disk::open_with(store.clone(), &parent_name, true, true)?;
    if parent.capacity() < top.capacity() {
        return Err(DiskError::Chain(format!(
            "{} is smaller than {}: grow it first",
            store.describe(&parent_name),
            store.describe(name)
        )));
    }
    let marker = consolidating_marker(&parent_name);
    if !store.exists(&marker).map_err(at(&marker))? {
        write_new(
            &*store,
            &marker,
            &format!(
                "consolidating {name} (CID {:08x}) into {parent_name}\n",
                top_desc.cid
            ),
        )?;
    }
    let merged = merge(&top, &parent, None)?;
    parent.flush()?;
    let mut next = parent.layers[0].desc.clone();
    next.cid = new_cid();
    next.ddb = top_desc.ddb.clone();
    if let Some(t) = parent.layers[0].desc.ddb("ddb.thinProvisioned") {
        next.set_ddb("ddb.thinProvisioned", t);
    }
    next.set_change_track_path(top_desc.change_track_path());
    // The content does not change: change tracking only learns the CID.
    top.expect_cid(next.cid)?;
    parent.close()?;
    commit(&*store, name, &next)?;
    top.close_committed(name)?;
    for f in top_desc
        .extents
        .iter()
        .filter_map(|e| e.file.as_ref())
        .chain([&parent_name, &marker])
    {
        if let Err(e) = store.remove(f) {
            tracing::warn!("removing {} after consolidating: {e}", store.describe(f));
        }
    }
    Ok(merged)
}

/// Copy what `top`'s current layer holds into `parent`: a few readers
/// fetch chunks (a device reads faster with several requests in flight)
/// while the chunks already read are written, in order (a thin parent
/// allocates sequentially, and a run is the same every time). Returns the
/// bytes copied.
pub(crate) fn merge(
    top: &Disk,
    parent: &Disk,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<u64> {
    const CHUNK: u64 = 8 << 20;
    const READERS: usize = 3;
    let mut work = Vec::new();
    for r in top.top_ranges()? {
        let mut o = r.start;
        while o < r.end {
            let n = (r.end - o).min(CHUNK - o % CHUNK);
            work.push((o, n));
            o += n;
        }
    }
    let merged = work.iter().map(|w| w.1).sum();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| -> Result<()> {
        let (full, filled) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(READERS);
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let full = full.clone();
            let (work, next, stop) = (&work, &next, &stop);
            readers.push(sc.spawn(move || -> Result<()> {
                use std::sync::atomic::Ordering::Relaxed;
                while !stop.load(Relaxed) {
                    if cancel.is_some_and(|c| c.load(Relaxed)) {
                        stop.store(true, Relaxed);
                        return Err(DiskError::Invalid(
                            "the merge was stopped (the disk is being closed); the next consolidation finishes it".into(),
                        ));
                    }
                    let k = next.fetch_add(1, Relaxed);
                    let Some(&(o, n)) = work.get(k) else {
                        break;
                    };
                    let mut buf = vec![0u8; n as usize];
                    if let Err(e) = top.read_at(&mut buf, o) {
                        stop.store(true, Relaxed);
                        return Err(e);
                    }
                    if full.send((k, buf)).is_err() {
                        break;
                    }
                }
                Ok(())
            }));
        }
        drop(full);
        let mut res = Ok(());
        // Chunks read ahead of the next one to write (at most a few: the
        // readers take them in order).
        let mut ahead = std::collections::BTreeMap::new();
        let mut due = 0usize;
        'recv: for (k, buf) in filled {
            ahead.insert(k, buf);
            while let Some(buf) = ahead.remove(&due) {
                if let Err(e) = parent.write_at(&buf, work[due].0) {
                    res = Err(e);
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    break 'recv;
                }
                due += 1;
            }
        }
        for r in readers {
            let r = r.join().unwrap_or_else(|_| {
                Err(DiskError::Invalid("a reader of the merge panicked".into()))
            });
            res = res.and(r);
        }
        res
    })?;
    Ok(merged)
}

/// Finish a consolidation of disk `name` that was interrupted (a crash, a
/// kill, an I/O error), if its marker is there: the merge is copied again
/// and committed. Returns the bytes merged, `None` if there was none.
pub fn finish_consolidation(store: Arc<dyn Store>, name: &str) -> Result<Option<u64>> {
    let merged = crate::merge::finish(store.clone(), name)?;
    let d = read_descriptor(&*store, name)?;
    let Some(parent) = &d.parent_hint else {
        return Ok(None);
    };
    let marker = consolidating_marker(parent);
    if !store.exists(&marker).map_err(at(&marker))? {
        return Ok(merged);
    }
    tracing::warn!(
        "{}: finishing a consolidation into {parent} that was interrupted",
        store.describe(name)
    );
    consolidate(store, name).map(Some)
}

/// Copy what `src` reads as into `dst` (same size), chunk by chunk over
/// the ranges that may hold data, leaving zero chunks unwritten (holes on
/// a thin destination). Returns the bytes written.
pub fn copy_disk(src: &Disk, dst: &Disk) -> Result<u64> {
    copy_ranges(
        &src.allocated_ranges()?,
        |b, o| src.read_at(b, o),
        |b, o| dst.write_at(b, o),
    )
}

const CHUNK: u64 = 1 << 20;

fn copy_ranges(
    ranges: &[std::ops::Range<u64>],
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0;
    for r in ranges {
        let mut o = r.start;
        while o < r.end {
            // Chunks aligned to CHUNK, so a copy lands on whole grains.
            let n = (CHUNK - o % CHUNK).min(r.end - o) as usize;
            read(&mut buf[..n], o)?;
            if buf[..n].iter().any(|&b| b != 0) {
                write(&buf[..n], o)?;
                written += n as u64;
            }
            o += n as u64;
        }
    }
    Ok(written)
}

/// A new, independent base disk `dst` (in `dst_store`) with what `src`
/// reads as now. Returns the bytes written.
pub fn clone(
    store: Arc<dyn Store>,
    src: &str,
    dst_store: Arc<dyn Store>,
    dst: &str,
    prov: Provisioning,
) -> Result<u64> {
    let s = Disk::open(store, src, false)?;
    let adapter = s.layers[0]
        .desc
        .ddb("ddb.adapterType")
        .unwrap_or("lsilogic")
        .to_string();
    create_filled(dst_store, dst, s.capacity(), prov, &adapter, |d| {
        copy_disk(&s, d)
    })
}

/// A local file as a store of its directory, and its name.
fn local_file(raw: &std::path::Path) -> Result<(crate::store::LocalStore, &str)> {
    let dir = raw.parent().unwrap_or(std::path::Path::new("."));
    let fname = raw
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| DiskError::Invalid(format!("{}: not a file name", raw.display())))?;
    Ok((crate::store::LocalStore::new(dir), fname))
}

/// A new base disk `dst` with the content of the raw image `raw` (a local
/// file; its holes are not read). Returns the bytes written.
pub fn import(
    raw: &std::path::Path,
    store: Arc<dyn Store>,
    dst: &str,
    prov: Provisioning,
    adapter: &str,
) -> Result<u64> {
    let (local, fname) = local_file(raw)?;
    let f = local.open(fname, false).map_err(at(fname))?;
    let size = f.len().map_err(at(fname))?;
    if size == 0 {
        return Err(DiskError::Invalid(format!("{} is empty", raw.display())));
    }
    let ranges = f.allocated(0, size).map_err(at(fname))?;
    create_filled(store, dst, size, prov, adapter, |d| {
        copy_ranges(
            &ranges,
            |b, o| f.read_full(b, o).map_err(at(fname)),
            |b, o| d.write_at(b, o),
        )
    })
}

/// Write what disk `src` reads as now to the raw image `raw` (a new local
/// file, sparse: zero chunks are holes). Returns the bytes written.
pub fn export(store: Arc<dyn Store>, src: &str, raw: &std::path::Path) -> Result<u64> {
    let s = Disk::open(store, src, false)?;
    let (local, fname) = local_file(raw)?;
    let f = local.create(fname).map_err(at(fname))?;
    f.set_len(s.capacity()).map_err(at(fname))?;
    let n = copy_ranges(
        &s.allocated_ranges()?,
        |b, o| s.read_at(b, o),
        |b, o| f.write_at(b, o).map_err(at(fname)),
    )?;
    f.flush().map_err(at(fname))?;
    Ok(n)
}

/// Grow disk `name` to `size` bytes (rounded up to a sector). Refused on a
/// disk with snapshots (consolidate first, as ESX asks) and for a smaller
/// size. Thin disks grow by a hole; thick ones allocate the new blocks.
/// The new size is committed with the descriptor, after the extent grew.
pub fn resize(store: Arc<dyn Store>, name: &str, size: u64) -> Result<u64> {
    stem(name)?;
    finish_consolidation(store.clone(), name)?;
    let disk = Disk::open(store.clone(), name, true)?;
    refuse_shared(&*store, &disk, "growing it")?;
    if disk.depth() > 0 {
        return Err(DiskError::Invalid(format!(
            "{} has {} snapshot(s): consolidate before growing it",
            store.describe(name),
            disk.depth()
        )));
    }
    let size = size.div_ceil(512) * 512;
    let old = disk.capacity();
    if size < old {
        return Err(DiskError::Invalid(format!(
            "{} is {old} bytes: a disk only grows (asked {size})",
            store.describe(name)
        )));
    }
    if size == old {
        return Ok(old);
    }
    if size > 62 << 40 {
        return Err(DiskError::Invalid(format!(
            "disk size {size} is over 62 TiB"
        )));
    }
    let mut desc = disk.layers[0].desc.clone();
    // The disk stays open (its lock held, change tracking open) until the
    // new size is committed; its clean close then stamps the grown chain.
    // The history grows first: the new blocks count as changed.
    disk.grow_tracking(size)?;
    let thin = desc.ddb("ddb.thinProvisioned") == Some("1");
    let last = desc
        .extents
        .last_mut()
        .filter(|e| e.kind.is_flat())
        .ok_or_else(|| {
            DiskError::Invalid(format!(
                "{}: its last extent is not flat",
                store.describe(name)
            ))
        })?;
    let file = last.file.clone().expect("a flat extent names its file");
    let f = store.open(&file, true).map_err(at(&file))?;
    let end = (last.offset + last.sectors) * 512 + (size - old);
    f.set_len(end).map_err(at(&file))?;
    if !thin {
        f.allocate(end - (size - old), size - old)
            .map_err(at(&file))?;
    }
    f.flush().map_err(at(&file))?;
    drop(f);
    last.sectors += (size - old) / 512;
    let (c, h, s) = geometry(size);
    desc.set_ddb("ddb.geometry.cylinders", &c.to_string());
    desc.set_ddb("ddb.geometry.heads", &h.to_string());
    desc.set_ddb("ddb.geometry.sectors", &s.to_string());
    commit(&*store, name, &desc)?;
    disk.close()?;
    Ok(size)
}

/// Turn change tracking of disk `name` on (a new history: IDs from an
/// earlier one are answered with the whole disk) or off (its file
/// removed). Returns whether it was on before.
pub fn set_tracking(store: Arc<dyn Store>, name: &str, on: bool) -> Result<bool> {
    let st = stem(name)?.to_string();
    let disk = Disk::open(store.clone(), name, true)?;
    let mut desc = disk.layers[0].desc.clone();
    let was = desc.change_track_path().map(str::to_string);
    match (&was, on) {
        (Some(_), true) | (None, false) => return Ok(was.is_some()),
        (None, true) => {
            refuse_shared(&*store, &disk, "change tracking")?;
            let f = ctk_file(&st);
            ctk::create(
                &*store,
                &f,
                disk.capacity(),
                desc.cid,
                &format!("{} (tracking was turned on)", utc_now()),
            )?;
            desc.set_change_track_path(Some(&f));
            disk.close()?;
            commit(&*store, name, &desc)?;
        }
        (Some(f), false) => {
            desc.set_change_track_path(None);
            disk.close()?;
            commit(&*store, name, &desc)?;
            if let Err(e) = store.remove(f) {
                tracing::warn!("removing {}: {e}", store.describe(f));
            }
        }
    }
    Ok(was.is_some())
}

/// What disk `name` may have changed since `since` (`None`: `'*'`, what
/// may hold data), up to `until`.
pub fn changed(
    store: Arc<dyn Store>,
    name: &str,
    since: Option<ChangeId>,
    until: Option<ChangeId>,
) -> Result<ctk::Changes> {
    stem(name)?;
    Disk::open(store, name, false)?.changed(since, until)
}

/// What `disk check` found and did.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub layers: usize,
    pub problems: Vec<String>,
    pub repaired: Vec<String>,
    pub unrepairable: usize,
    /// Not damage: what a person should know (change tracking's state).
    pub notes: Vec<String>,
}

/// Check disk `name`'s chain: every descriptor, the CIDs, each flat
/// extent's length, each sparse extent's directories and tables (and
/// with `repair`, fix what can be fixed safely: see
/// [`crate::extent::check_file`]); then that the chain opens.
pub fn check(store: Arc<dyn Store>, name: &str, repair: bool) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    // Whether change tracking describes the disk before any repair (a
    // repair rewrites metadata, not content: the history is kept).
    let tracking_was_right = Disk::open(store.clone(), name, false)
        .ok()
        .and_then(|d| d.tracking_info())
        .map(|t| {
            if let Some(why) = &t.invalid {
                r.notes.push(format!(
                    "change tracking cannot answer for this disk ({why}); the next write-open starts a new history"
                ));
            }
            t.invalid.is_none()
        });
    let mut merging = None;
    let mut unfinished_merge = false;
    let mut next = Some((name.to_string(), None::<u32>));
    let mut seen = std::collections::HashSet::new();
    while let Some((n, want_cid)) = next.take() {
        if !seen.insert(n.clone()) {
            r.problems.push(format!("the chain loops back to {n}"));
            r.unrepairable += 1;
            break;
        }
        let d = match read_descriptor(&*store, &n) {
            Ok(d) => d,
            Err(e) => {
                r.problems.push(e.to_string());
                r.unrepairable += 1;
                break;
            }
        };
        r.layers += 1;
        if let Some(w) = want_cid {
            if d.cid != w {
                r.problems.push(format!(
                    "{n} has CID {:08x}; its child recorded {w:08x} (the parent changed after the child was made)",
                    d.cid
                ));
                r.unrepairable += 1;
            }
        }
        for e in &d.extents {
            let Some(f) = &e.file else { continue };
            let file = match store.open(f, repair && e.kind == Kind::Sparse) {
                Ok(x) => x,
                Err(err) => {
                    r.problems.push(format!("{f}: {err}"));
                    r.unrepairable += 1;
                    continue;
                }
            };
            if e.kind.is_flat() {
                let have = file.len().map_err(at(f))?;
                if have < (e.offset + e.sectors) * 512 {
                    r.problems.push(format!(
                        "{f}: {have} bytes, {n} needs {}",
                        (e.offset + e.sectors) * 512
                    ));
                    r.unrepairable += 1;
                }
                continue;
            }
            match crate::extent::check_file(&*file, f, repair) {
                Ok(c) => {
                    r.problems.extend(c.problems);
                    r.repaired.extend(c.repaired);
                    r.unrepairable += c.unrepairable;
                }
                Err(err) => {
                    r.problems.push(err.to_string());
                    r.unrepairable += 1;
                }
            }
        }
        let merging_from = crate::merge::merging_into(&*store, &n)?;
        if let Some(f) = &merging_from {
            r.problems.push(format!(
                "a merge of {f} into {n} was interrupted (reads are right; {n} is not the snapshot it was)"
            ));
            unfinished_merge = true;
        } else if r.layers == 2 && store.exists(&consolidating_marker(&n)).map_err(at(&n))? {
            r.problems.push(format!(
                "a consolidation of {name} into {n} was interrupted (reads are right; {n} is not the snapshot it was)"
            ));
            merging = Some(n.clone());
        }
        next = d.parent_hint.clone().map(|h| (h, Some(d.parent_cid)));
    }
    if repair && r.unrepairable == 0 {
        if unfinished_merge {
            let bytes = crate::merge::finish(store.clone(), name)?.unwrap_or(0);
            r.repaired.push(format!(
                "finished the interrupted merge: {bytes} bytes merged, the snapshot deleted"
            ));
        }
        if let Some(n) = merging {
            let bytes = consolidate(store.clone(), name)?;
            r.repaired.push(format!(
                "finished the consolidation into {n}: {bytes} bytes merged, the snapshot deleted"
            ));
        }
        if !r.repaired.is_empty() && tracking_was_right == Some(true) {
            crate::disk::reseal(store.clone(), name)?;
        }
    }
    if r.problems.is_empty() || (repair && r.unrepairable == 0) {
        if let Err(e) = Disk::open(store, name, false) {
            r.problems.push(format!("the chain does not open: {e}"));
            r.unrepairable += 1;
        }
    }
    Ok(r)
}

/// The names of every file the chain of `name` uses.
pub fn chain_files(store: &dyn Store, name: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut next = Some(name.to_string());
    while let Some(n) = next.take() {
        if out.contains(&n) || out.len() > 4 * (MAX_DEPTH + 2) {
            break;
        }
        let d = read_descriptor(store, &n)?;
        out.push(n);
        out.extend(d.extents.iter().filter_map(|e| e.file.clone()));
        out.extend(d.change_track_path().map(str::to_string));
        next = d.parent_hint.clone();
    }
    Ok(out)
}

/// The file that keeps a shared disk's SCSI persistent reservations.
pub fn reservations_file(stem: &str) -> String {
    format!("{stem}.pr")
}

/// The file held exclusively while a host changes those reservations.
pub fn reservations_lock(stem: &str) -> String {
    format!("{stem}.pr.lock")
}

/// Whether disk `name` is shared by several hosts (its extents marked
/// multi-writer).
pub fn is_shared(store: &dyn Store, disk: &Disk) -> Result<bool> {
    for e in &disk.layers[0].desc.extents {
        if let Some(f) = &e.file {
            if store.multi_writer(f).map_err(at(f))? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Refuse `what` on a shared disk: several hosts write its extents, and a
/// chain operation would change the disk under the others.
pub(crate) fn refuse_shared(store: &dyn Store, disk: &Disk, what: &str) -> Result<()> {
    if is_shared(store, disk)? {
        return Err(DiskError::Invalid(format!(
            "{} is shared by several hosts (multi-writer): {what} is refused; `vmfs disk share DISK off` first, with no host using it",
            store.describe(&disk.layers[0].name)
        )));
    }
    Ok(())
}

/// Share disk `name` between hosts (or stop): its flat extents are marked
/// multi-writer, so every host opens them for writing at once (guest
/// clusters); change tracking is turned off (one history cannot follow
/// writers on several hosts); the files for persistent reservations are
/// made (removed when unsharing). Only a disk with no snapshot whose
/// extents are all flat (thick or thin) can be shared, and nobody may have
/// it open.
pub fn set_shared(store: Arc<dyn Store>, name: &str, on: bool) -> Result<()> {
    let st = stem(name)?.to_string();
    let disk = Disk::open(store.clone(), name, false)?;
    if on {
        if disk.depth() > 0 {
            return Err(DiskError::Invalid(format!(
                "{} has {} snapshot(s): consolidate before sharing it",
                store.describe(name),
                disk.depth()
            )));
        }
        if disk.layers[0]
            .desc
            .extents
            .iter()
            .any(|e| e.kind == Kind::Sparse)
        {
            return Err(DiskError::Invalid(format!(
                "{}: only a disk of flat extents can be shared (a sparse extent's grain tables cannot have writers on several hosts)",
                store.describe(name)
            )));
        }
    }
    let files: Vec<String> = disk.layers[0]
        .desc
        .extents
        .iter()
        .filter_map(|e| e.file.clone())
        .collect();
    drop(disk);
    if on {
        set_tracking(store.clone(), name, false)?;
        for f in [reservations_file(&st), reservations_lock(&st)] {
            if !store.exists(&f).map_err(at(&f))? {
                store.create(&f).map_err(at(&f))?;
            }
        }
        store
            .set_multi_writer(&reservations_file(&st), true)
            .map_err(at(&reservations_file(&st)))?;
    }
    for f in &files {
        store.set_multi_writer(f, on).map_err(at(f))?;
    }
    if !on {
        for f in [reservations_file(&st), reservations_lock(&st)] {
            let _ = store.set_multi_writer(&f, false);
            store.remove_if_there(&f).map_err(at(&f))?;
        }
    }
    Ok(())
}
