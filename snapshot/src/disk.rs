//! A virtual disk: its chain of layers, newest first, opened from the one
//! name the user keeps (`NAME.vmdk`), read through and written at the top.
//!
//! **File naming** (one directory per disk's chain):
//!
//! | file | what |
//! |---|---|
//! | `NAME.vmdk` | the descriptor of the current state, always (the name users and `qemu-img` use) |
//! | `NAME-flat.vmdk` | the base disk's flat extent |
//! | `NAME-NNNNNN.vmdk` | the frozen descriptor of snapshot NNNNNN (the layer that was current when it was taken) |
//! | `NAME-NNNNNN-delta[-K].vmdk` | the sparse extent(s) of the layer written after snapshot NNNNNN |
//!
//! So `NAME.vmdk` names the base disk until the first snapshot; then it
//! names a delta whose `parentFileNameHint` is the frozen descriptor below
//! it, and so on down to `NAME-000000.vmdk`, the frozen base.

use std::collections::HashSet;
use std::sync::Arc;

use crate::ctk::{self, ChangeId, Changes, Tracker};
use crate::descriptor::{Descriptor, Kind, NO_PARENT};
use crate::error::{at, DiskError, Result};
use crate::extent::{Grain, SparseExtent};
use crate::store::{DiskFile, Store};

/// The deepest chain (snapshots below the current layer), as ESX allows.
pub const MAX_DEPTH: usize = 31;

enum Io {
    Flat {
        file: Arc<dyn DiskFile>,
        name: String,
        /// Where the extent starts in its file (bytes).
        offset: u64,
    },
    Zero,
    Sparse(SparseExtent),
}

struct Piece {
    /// Where the extent starts in the disk (bytes) and its length.
    start: u64,
    len: u64,
    io: Io,
}

/// One layer of the chain: a descriptor and its extents.
pub struct Layer {
    pub name: String,
    pub desc: Descriptor,
    pieces: Vec<Piece>,
}

impl Layer {
    pub fn capacity(&self) -> u64 {
        self.desc.capacity()
    }

    fn piece(&self, off: u64) -> Option<&Piece> {
        self.pieces
            .iter()
            .find(|p| off >= p.start && off < p.start + p.len)
    }

    /// Bytes this layer holds: a flat extent's allocated bytes, a sparse
    /// extent's grains.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let mut n = 0;
        for p in &self.pieces {
            n += match &p.io {
                Io::Flat { file, name, offset } => file
                    .allocated(*offset, p.len)
                    .map_err(at(name))?
                    .iter()
                    .map(|r| r.end - r.start)
                    .sum::<u64>(),
                Io::Zero => 0,
                Io::Sparse(s) => s.allocated_bytes()?,
            };
        }
        Ok(n)
    }
}

/// Read a descriptor file whole.
pub fn read_descriptor(store: &dyn Store, name: &str) -> Result<Descriptor> {
    let f = store.open(name, false).map_err(at(name))?;
    let len = f.len().map_err(at(name))?;
    if len > crate::descriptor::MAX_LEN as u64 {
        return Err(DiskError::Descriptor {
            file: name.to_string(),
            line: 0,
            reason: format!("{len} bytes: too long for a descriptor (is it an extent?)"),
        });
    }
    let mut b = vec![0u8; len as usize];
    f.read_full(&mut b, 0).map_err(at(name))?;
    Descriptor::parse(&b, name)
}

fn open_layer(store: &dyn Store, name: &str, desc: Descriptor, write: bool) -> Result<Layer> {
    let mut pieces = Vec::with_capacity(desc.extents.len());
    let mut start = 0;
    for e in &desc.extents {
        let len = e.sectors * 512;
        let io = match (e.kind, &e.file) {
            (Kind::Zero, _) => Io::Zero,
            (k, Some(f)) => {
                let file = store.open(f, write).map_err(at(f))?;
                if k.is_flat() {
                    let have = file.len().map_err(at(f))?;
                    let need = e.offset * 512 + len;
                    if have < need {
                        return Err(DiskError::Corrupt {
                            file: f.clone(),
                            offset: have,
                            reason: format!(
                                "the flat extent holds {have} bytes; {name} needs {need}"
                            ),
                        });
                    }
                    Io::Flat {
                        file,
                        name: f.clone(),
                        offset: e.offset * 512,
                    }
                } else {
                    let s = SparseExtent::open(file, f)?;
                    if s.capacity() < len {
                        return Err(DiskError::Corrupt {
                            file: f.clone(),
                            offset: 12,
                            reason: format!(
                                "the sparse extent holds {} bytes; {name} gives it {len}",
                                s.capacity()
                            ),
                        });
                    }
                    Io::Sparse(s)
                }
            }
            (_, None) => unreachable!("the parser gives every non-ZERO extent a file"),
        };
        pieces.push(Piece { start, len, io });
        start += len;
    }
    Ok(Layer {
        name: name.to_string(),
        desc,
        pieces,
    })
}

/// An open virtual disk.
pub struct Disk {
    pub store: Arc<dyn Store>,
    /// Newest first: `layers[0]` is `NAME.vmdk`.
    pub layers: Vec<Layer>,
    writable: bool,
    /// Change tracking, when the current descriptor names a file for it.
    tracking: Option<Tracking>,
}

struct Tracking {
    /// `None`: the file could not be read (a read-only open answers the
    /// whole disk; a writer starts a new history).
    tracker: Option<Tracker>,
    /// Why the history cannot answer for this disk's content (something
    /// that does not keep it wrote the disk); `changed` then answers the
    /// whole disk.
    foreign: Option<String>,
}

/// What `disk info` says of change tracking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingInfo {
    pub file: String,
    /// The ID of the last snapshot (epoch 0: the start of the history).
    pub last_id: Option<ChangeId>,
    pub granularity: u64,
    /// When and why the history began.
    pub began: String,
    /// Why the history cannot answer (the next write-open restarts it).
    pub invalid: Option<String>,
}

/// The civil date (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's algorithm).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// `now` as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

impl Disk {
    /// Open the disk whose current descriptor is `name`, and every layer
    /// below it. Refused: a missing parent, a CID that differs from the
    /// one the child recorded, a cycle, a chain deeper than [`MAX_DEPTH`].
    pub fn open(store: Arc<dyn Store>, name: &str, write: bool) -> Result<Disk> {
        Self::open_with(store, name, write, false)
    }

    /// [`Disk::open`]; `merging`: for the consolidation that is finishing
    /// an interrupted one (else refused while its marker is there).
    pub(crate) fn open_with(
        store: Arc<dyn Store>,
        name: &str,
        write: bool,
        merging: bool,
    ) -> Result<Disk> {
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        let mut next = Some((name.to_string(), None::<(String, u32)>));
        while let Some((n, child)) = next.take() {
            if !seen.insert(n.clone()) {
                return Err(DiskError::Chain(format!(
                    "{}: the chain loops back to {n}",
                    store.describe(name)
                )));
            }
            if layers.len() > MAX_DEPTH {
                return Err(DiskError::Chain(format!(
                    "{}: the chain is deeper than {MAX_DEPTH} snapshots",
                    store.describe(name)
                )));
            }
            let desc = match read_descriptor(&*store, &n) {
                Err(DiskError::Store { source, .. })
                    if source.is_not_found() && child.is_some() =>
                {
                    let (c, _) = child.expect("checked");
                    return Err(DiskError::Chain(format!(
                        "{}: its parent {} is missing",
                        store.describe(&c),
                        store.describe(&n)
                    )));
                }
                r => r?,
            };
            if let Some((c, want)) = &child {
                if desc.cid != *want {
                    return Err(DiskError::Chain(format!(
                        "{} records parent CID {want:08x}, but its parent {} has CID {:08x}: the parent changed after the child was made; refusing to read a mix",
                        store.describe(c),
                        store.describe(&n),
                        desc.cid
                    )));
                }
            }
            if let Some(h) = &desc.parent_hint {
                next = Some((h.clone(), Some((n.clone(), desc.parent_cid))));
            } else if desc.parent_cid != NO_PARENT {
                return Err(DiskError::Chain(format!(
                    "{} has a parent CID but no parentFileNameHint",
                    store.describe(&n)
                )));
            }
            let top = layers.is_empty();
            layers.push(open_layer(&*store, &n, desc, write && top)?);
        }
        if layers.len() > 1 && !merging {
            let below = &layers[1].name;
            // (A merge marker naming a layer no longer in the chain is
            // what a finished merge failed to remove: not in the way.)
            if write
                && store
                    .exists(&consolidating_marker(below))
                    .map_err(at(below))?
                && !crate::merge::merging_into(&*store, below)?
                    .is_some_and(|f| !layers.iter().any(|l| l.name == f))
            {
                // Reads are right (the current layer covers what was
                // merged), but nothing may write before it is finished.
                return Err(DiskError::Chain(format!(
                    "{}: a consolidation into {below} was interrupted; `vmfs disk consolidate` or `vmfs disk check --repair` finishes it",
                    store.describe(name)
                )));
            }
        }
        if !merging
            && store
                .exists(&consolidating_marker(name))
                .map_err(at(name))?
        {
            return Err(DiskError::Chain(format!(
                "{}: a consolidation into this layer was interrupted: it holds part of the newer layer's writes, so it is not the snapshot it was; finish the consolidation of the disk above it first",
                store.describe(name)
            )));
        }
        // Not writable (nor closed as a writer when dropped) until every
        // step of the open succeeded.
        let mut d = Disk {
            store,
            layers,
            writable: false,
            tracking: None,
        };
        // Tracking first: it compares the files' stamps with those of the
        // last clean close, before this open marks the extents in use.
        d.tracking = d.open_tracking(name, write)?;
        if write {
            for p in &d.layers[0].pieces {
                if let Io::Sparse(s) = &p.io {
                    s.begin_write()?;
                }
            }
        }
        d.writable = write;
        Ok(d)
    }

    /// Open the change-tracking file the current descriptor names, check
    /// that its history still describes the disk, and (for a writer)
    /// recover it after a crash or start a new history saying why.
    fn open_tracking(&self, name: &str, write: bool) -> Result<Option<Tracking>> {
        let desc = &self.layers[0].desc;
        let Some(file) = desc.change_track_path().map(str::to_string) else {
            return Ok(None);
        };
        let cid = desc.cid;
        let (tracker, foreign) = match Tracker::open(&*self.store, &file, write) {
            Ok(t) => {
                let h = t.header();
                let why = if !t.knows_cid(cid) {
                    Some(format!(
                        "{name}'s CID is {cid:08x} but its change tracking last saw {:08x}: something that does not keep change tracking (QEMU's vmdk driver, another tool) wrote the disk",
                        h.cid
                    ))
                } else if h.capacity < self.capacity() {
                    Some(format!(
                        "the disk is {} bytes but its change tracking covers {}: it was grown by something that does not keep change tracking",
                        self.capacity(),
                        h.capacity
                    ))
                } else if !h.open && h.pending_cid != Some(cid) && h.stamp != self.stamp()? {
                    Some(format!(
                        "the files of {name}'s chain changed (length or modification time) since this host last closed the disk: something that does not keep change tracking wrote them (a dd into an extent, a file copied over one)"
                    ))
                } else {
                    None
                };
                (Some(t), why)
            }
            // Missing or damaged: the history cannot answer (a writer
            // starts a new one). Any other error (I/O, a lock held
            // elsewhere) fails the open: nothing is restarted on a
            // transient error.
            Err(e @ DiskError::Corrupt { .. }) => (
                None,
                Some(format!("its change-tracking file is damaged: {e}")),
            ),
            Err(DiskError::Store { file, source }) if source.is_not_found() => (
                None,
                Some(format!("its change-tracking file {file} is missing")),
            ),
            Err(e) => return Err(e),
        };
        if !write {
            return Ok(Some(Tracking { tracker, foreign }));
        }
        let tracker = match (tracker, foreign) {
            (Some(t), None) => t,
            (old, Some(why)) => {
                drop(old);
                tracing::warn!(
                    "{}: change tracking restarts: {why}; the next backup reads the whole disk",
                    self.store.describe(name)
                );
                ctk::create(
                    &*self.store,
                    &file,
                    self.capacity(),
                    cid,
                    &format!("{} (restarted: {why})", utc_now()),
                )?;
                Tracker::open(&*self.store, &file, true)?
            }
            (None, None) => unreachable!("an unreadable file has a reason"),
        };
        tracker.begin(cid)?;
        Ok(Some(Tracking {
            tracker: Some(tracker),
            foreign: None,
        }))
    }

    /// A stamp of every file of the chain (their lengths and modification
    /// times), as a clean close records it.
    pub fn stamp(&self) -> Result<u64> {
        let mut v = Vec::new();
        for l in &self.layers {
            for p in &l.pieces {
                let (f, n) = match &p.io {
                    Io::Flat { file, name, .. } => (file, name),
                    Io::Sparse(s) => (&s.file, &s.name),
                    Io::Zero => continue,
                };
                v.push((
                    n.clone(),
                    f.len().map_err(at(n))?,
                    f.modified().map_err(at(n))?,
                ));
            }
        }
        Ok(ctk::stamp(&v))
    }

    fn tracker(&self) -> Option<&Tracker> {
        self.tracking.as_ref().and_then(|t| t.tracker.as_ref())
    }

    /// Change tracking's state, `None` when it is off.
    pub fn tracking_info(&self) -> Option<TrackingInfo> {
        let t = self.tracking.as_ref()?;
        let file = self.layers[0]
            .desc
            .change_track_path()
            .unwrap_or_default()
            .to_string();
        Some(match &t.tracker {
            Some(tr) => {
                let h = tr.header();
                TrackingInfo {
                    file,
                    last_id: Some(tr.last_id()),
                    granularity: ctk::BLOCK,
                    began: h.reason,
                    invalid: t.foreign.clone(),
                }
            }
            None => TrackingInfo {
                file,
                last_id: None,
                granularity: ctk::BLOCK,
                began: String::new(),
                invalid: t.foreign.clone(),
            },
        })
    }

    /// The byte ranges that may differ from the disk's content at `since`
    /// (`None`: `'*'`, every range that may hold data), up to `until`
    /// (default: now).
    pub fn changed(&self, since: Option<ChangeId>, until: Option<ChangeId>) -> Result<Changes> {
        let Some(since) = since else {
            return Ok(Changes {
                granularity: ctk::BLOCK,
                ranges: self.allocated_ranges()?,
                whole_disk: None,
            });
        };
        let whole = |why: String| Changes {
            granularity: ctk::BLOCK,
            ranges: vec![0..self.capacity()],
            whole_disk: Some(why),
        };
        let Some(t) = &self.tracking else {
            return Ok(whole("change tracking is off for this disk".into()));
        };
        let Some(tr) = &t.tracker else {
            return Ok(whole(t.foreign.clone().unwrap_or_default()));
        };
        let mut c = tr.changed(since, until, t.foreign.clone())?;
        for r in &mut c.ranges {
            r.end = r.end.min(self.capacity());
        }
        c.ranges.retain(|r| r.start < r.end);
        Ok(c)
    }

    /// End the current change-tracking epoch (a snapshot is being taken;
    /// `next_cid` is the new layer's CID). `None` when tracking is off.
    pub fn end_epoch(&self, next_cid: u32) -> Result<Option<ChangeId>> {
        self.tracker().map(|t| t.end_epoch(next_cid)).transpose()
    }

    /// Accept `cid` as the descriptor's next CID in the change history
    /// (before an operation of ours commits it).
    pub fn expect_cid(&self, cid: u32) -> Result<()> {
        self.tracker()
            .map(|t| t.expect_cid(cid))
            .transpose()
            .map(|_| ())
    }

    /// Record `ranges` as changed now, durably (what a revert drops).
    pub fn mark_changed(&self, ranges: &[std::ops::Range<u64>]) -> Result<()> {
        self.tracker()
            .map(|t| t.mark_durably(ranges))
            .transpose()
            .map(|_| ())
    }

    /// Grow the change history with the disk.
    pub fn grow_tracking(&self, capacity: u64) -> Result<()> {
        self.tracker()
            .map(|t| t.grow(capacity))
            .transpose()
            .map(|_| ())
    }

    /// Flush, and close the change history cleanly (its stamp of the
    /// chain as it is now). Dropping a writable disk does this too, but
    /// cannot report an error.
    pub fn close(mut self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.close_extents()?;
        if let Some(t) = self.tracker() {
            t.close(self.layers[0].desc.cid, self.stamp()?)?;
        }
        Ok(())
    }

    /// Flush and mark the current layer's extents closed cleanly.
    fn close_extents(&mut self) -> Result<()> {
        self.writable = false;
        self.flush()?;
        for p in &self.layers[0].pieces {
            if let Io::Sparse(s) = &p.io {
                s.mark_clean()?;
            }
        }
        Ok(())
    }

    /// Close after an operation of ours committed a new descriptor `name`
    /// over this disk's chain (a snapshot, revert or consolidation): the
    /// change history is stamped with the new chain's files and CID, so
    /// that a writer that does not keep it is noticed from now on (not
    /// only after the next open for writing).
    pub fn close_committed(mut self, name: &str) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.close_extents()?;
        let Some(t) = self.tracker() else {
            return Ok(());
        };
        let new = Disk::open(self.store.clone(), name, false)?;
        t.close_as(new.layers[0].desc.cid, new.stamp()?, true)
    }

    pub fn capacity(&self) -> u64 {
        self.layers[0].capacity()
    }

    /// Snapshots below the current layer.
    pub fn depth(&self) -> usize {
        self.layers.len() - 1
    }

    /// Read `buf.len()` bytes at `off` (an error past the end).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range("read", buf.len(), off)?;
        self.read_layer(0, buf, off)
    }

    /// An I/O of `len` bytes at `off` ends inside the disk.
    fn check_range(&self, what: &str, len: usize, off: u64) -> Result<()> {
        off.checked_add(len as u64)
            .filter(|&e| e <= self.capacity())
            .map(|_| ())
            .ok_or_else(|| {
                DiskError::Invalid(format!(
                    "{what} of {len} bytes at {off} ends past the disk's {} bytes",
                    self.capacity()
                ))
            })
    }

    /// Read from layer `i` down.
    fn read_layer(&self, i: usize, buf: &mut [u8], off: u64) -> Result<()> {
        let Some(layer) = self.layers.get(i) else {
            buf.fill(0);
            return Ok(());
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let Some(p) = layer.piece(pos) else {
                // Past this layer's end (a parent smaller than its child).
                buf[done..].fill(0);
                return Ok(());
            };
            let n = ((p.start + p.len - pos) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            let rel = pos - p.start;
            match &p.io {
                Io::Zero => part.fill(0),
                Io::Flat { file, name, offset } => {
                    file.read_full(part, offset + rel).map_err(at(name))?
                }
                Io::Sparse(s) => {
                    let gb = s.grain_bytes();
                    let mut k = 0usize;
                    while k < part.len() {
                        let r = rel + k as u64;
                        let in_g = r % gb;
                        let mut m = ((gb - in_g) as usize).min(part.len() - k);
                        match s.lookup(r / gb)? {
                            Grain::At(a) => {
                                // Grains that follow each other in the file
                                // too (written in order): one read.
                                let mut next = a + gb;
                                while k + m < part.len() {
                                    match s.lookup((r + m as u64) / gb)? {
                                        Grain::At(b) if b == next => {
                                            m += (gb as usize).min(part.len() - k - m);
                                            next += gb;
                                        }
                                        _ => break,
                                    }
                                }
                                s.file
                                    .read_full(&mut part[k..k + m], a + in_g)
                                    .map_err(at(&s.name))?
                            }
                            Grain::Zero => part[k..k + m].fill(0),
                            Grain::Absent => {
                                self.read_layer(i + 1, &mut part[k..k + m], pos + k as u64)?
                            }
                        }
                        k += m;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Write all of `data` at `off` into the current layer (recorded by
    /// change tracking first, durably).
    pub fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::Invalid("the disk is open read-only".into()));
        }
        self.check_range("write", data.len(), off)?;
        if let Some(t) = self.tracker() {
            t.record(off, data.len() as u64)?;
        }
        let layer = &self.layers[0];
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let p = layer.piece(pos).expect("inside the capacity");
            let n = ((p.start + p.len - pos) as usize).min(data.len() - done);
            let part = &data[done..done + n];
            let rel = pos - p.start;
            match &p.io {
                Io::Zero => {
                    return Err(DiskError::Invalid(format!(
                        "{}: the extent at {} is a ZERO extent: not writable",
                        layer.name, p.start
                    )))
                }
                Io::Flat { file, name, offset } => {
                    file.write_at(part, offset + rel).map_err(at(name))?
                }
                Io::Sparse(s) => self.write_sparse(s, pos - rel, rel, part)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Write `part` at `rel` of sparse extent `s` (which starts at `base`
    /// in the disk): in place where its grain exists, else a new grain
    /// completed from the layers below.
    fn write_sparse(&self, s: &SparseExtent, base: u64, rel: u64, part: &[u8]) -> Result<()> {
        let gb = s.grain_bytes();
        let mut k = 0usize;
        let mut grain = Vec::new();
        while k < part.len() {
            let r = rel + k as u64;
            let (g, in_g) = (r / gb, r % gb);
            let m = ((gb - in_g) as usize).min(part.len() - k);
            let sub = &part[k..k + m];
            let mut place = match s.lookup(g)? {
                Grain::At(a) => Some(a),
                _ => None,
            };
            if place.is_none() {
                grain.resize(gb as usize, 0);
                if m as u64 != gb {
                    // The rest of the grain as it reads now, from below.
                    self.read_layer(1, &mut grain, base + g * gb)?;
                }
                grain[in_g as usize..in_g as usize + m].copy_from_slice(sub);
                place = s.allocate(g, &grain)?;
            }
            if let Some(a) = place {
                s.file.write_at(sub, a + in_g).map_err(at(&s.name))?;
            }
            k += m;
        }
        Ok(())
    }

    /// Whether blocks of the current layer are allocated on first write
    /// (a sparse delta or extent, or a flat extent of a thin disk), so a
    /// discard can give space back.
    pub fn thin(&self) -> bool {
        let top = &self.layers[0];
        top.desc.ddb("ddb.thinProvisioned") == Some("1")
            || top.pieces.iter().any(|p| matches!(p.io, Io::Sparse(_)))
    }

    /// The guest no longer needs `[off, off+len)`: it reads as zeros
    /// afterwards, and what the current layer held there goes back to the
    /// datastore. A flat extent's range is punched out; a sparse extent's
    /// whole grains are punched out of its file where they are (their
    /// entries stay and read the hole's zeros, so a grain over a snapshot
    /// hides the parent's data without an entry QEMU would not know);
    /// part grains are written with zeros. Recorded by change tracking
    /// like a write.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::Invalid("the disk is open read-only".into()));
        }
        let n = usize::try_from(len)
            .map_err(|_| DiskError::Invalid(format!("a discard of {len} bytes")))?;
        self.check_range("discard", n, off)?;
        if let Some(t) = self.tracker() {
            t.record(off, len)?;
        }
        let layer = &self.layers[0];
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let p = layer.piece(pos).expect("inside the capacity");
            let n = (p.start + p.len - pos).min(len - done);
            let rel = pos - p.start;
            match &p.io {
                Io::Zero => {}
                Io::Flat { file, name, offset } => {
                    file.punch_hole(offset + rel, n).map_err(at(name))?
                }
                Io::Sparse(s) => self.discard_sparse(s, pos - rel, rel, n)?,
            }
            done += n;
        }
        Ok(())
    }

    fn discard_sparse(&self, s: &SparseExtent, base: u64, rel: u64, len: u64) -> Result<()> {
        let gb = s.grain_bytes();
        let zeros = vec![0u8; gb as usize];
        let mut k = 0u64;
        while k < len {
            let r = rel + k;
            let (g, in_g) = (r / gb, r % gb);
            let m = (gb - in_g).min(len - k);
            if m < gb {
                self.write_sparse(s, base, r, &zeros[..m as usize])?;
            } else {
                let place = match s.lookup(g)? {
                    Grain::At(a) => Some(a),
                    Grain::Zero => None,
                    // Nothing here and nothing below: already zeros.
                    Grain::Absent if self.layers.len() == 1 => None,
                    // The parent's data shows through: cover it with a
                    // grain of zeros, then give that grain's space back.
                    Grain::Absent => match s.allocate(g, &zeros)? {
                        Some(a) => Some(a),
                        None => match s.lookup(g)? {
                            Grain::At(a) => Some(a),
                            _ => None,
                        },
                    },
                };
                if let Some(a) = place {
                    s.file.punch_hole(a, gb).map_err(at(&s.name))?;
                }
            }
            k += m;
        }
        Ok(())
    }

    /// The ranges of the disk the current layer holds itself (its grains;
    /// all of a flat layer), in order.
    pub fn top_ranges(&self) -> Result<Vec<std::ops::Range<u64>>> {
        self.layer_ranges(0, false)
    }

    /// The ranges of the disk that may hold data: what any layer holds
    /// (a flat extent's allocated ranges, a sparse extent's grains), merged
    /// and in order. Everything else reads as zeros.
    pub fn allocated_ranges(&self) -> Result<Vec<std::ops::Range<u64>>> {
        let mut all = Vec::new();
        for i in 0..self.layers.len() {
            all.extend(self.layer_ranges(i, true)?);
        }
        all.sort_by_key(|r| r.start);
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for r in all {
            let r = r.start..r.end.min(self.capacity());
            if r.start >= r.end {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.end >= r.start => l.end = l.end.max(r.end),
                _ => out.push(r),
            }
        }
        Ok(out)
    }

    /// What layer `i` holds; `sparse_flat`: a flat extent's allocated
    /// ranges only (else all of it).
    fn layer_ranges(&self, i: usize, sparse_flat: bool) -> Result<Vec<std::ops::Range<u64>>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        let cap = self.capacity();
        for p in &self.layers[i].pieces {
            match &p.io {
                Io::Zero => {}
                Io::Flat { file, name, offset } if sparse_flat => {
                    for r in file.allocated(*offset, p.len).map_err(at(name))? {
                        out.push(p.start + r.start - offset..p.start + r.end - offset);
                    }
                }
                Io::Flat { .. } => out.push(p.start..p.start + p.len),
                Io::Sparse(s) => {
                    let gb = s.grain_bytes();
                    for g in 0..p.len.div_ceil(gb) {
                        if s.lookup(g)? != Grain::Absent {
                            let a = p.start + g * gb;
                            let b = (a + gb).min(p.start + p.len).min(cap);
                            match out.last_mut() {
                                Some(r) if r.end == a => r.end = b,
                                _ => out.push(a..b),
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Make everything written durable: flat extents flushed; sparse
    /// grains, then their grain-table entries; change tracking's entries
    /// (at most once a second; its intent bits already cover the rest).
    pub fn flush(&self) -> Result<()> {
        for p in &self.layers[0].pieces {
            match &p.io {
                Io::Flat { file, name, .. } => file.flush().map_err(at(name))?,
                Io::Sparse(s) => s.flush()?,
                Io::Zero => {}
            }
        }
        if self.writable {
            if let Some(t) = self.tracker() {
                t.checkpoint(false)?;
            }
        }
        Ok(())
    }
}

/// Stamp the chain of disk `name` as it is now into its change history
/// (after a repair of ours rewrote metadata of its files), keeping the
/// history. Only for a history known to describe the disk.
pub(crate) fn reseal(store: Arc<dyn Store>, name: &str) -> Result<()> {
    let d = Disk::open(store.clone(), name, false)?;
    let Some(file) = d.layers[0].desc.change_track_path() else {
        return Ok(());
    };
    // The current layer's extents held for writing meanwhile: no writer
    // of the disk (whose header this would overwrite) can be open.
    let _held: Vec<_> = d.layers[0]
        .desc
        .extents
        .iter()
        .filter_map(|e| e.file.as_ref())
        .map(|f| store.open(f, true).map_err(at(f)))
        .collect::<Result<_>>()?;
    let t = Tracker::open(&*store, file, true)?;
    let cid = d.layers[0].desc.cid;
    t.begin(cid)?;
    t.close(cid, d.stamp()?)
}

/// The file whose presence says a consolidation into layer `name` started
/// and has not finished.
pub fn consolidating_marker(name: &str) -> String {
    format!("{name}.consolidating")
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::error!("closing {}: {e}", self.layers[0].name);
        }
    }
}
