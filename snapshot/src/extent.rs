//! One extent of one layer, open: flat (bytes at the same offsets in its
//! file), zero, or sparse (grains found through the grain tables).
//!
//! **Sparse writes and crashes.** A grain written for the first time is
//! appended to the file, and its grain-table entry is *not* written at
//! once: it waits in `pending` (reads see it there) until
//! [`SparseExtent::flush`], which makes the grains durable first and only
//! then writes the entries (both tables) and makes them durable. So after a
//! crash an entry never points at a grain whose bytes did not land: the
//! grain reads as before the write (from the parent), never as zeros or
//! garbage. A write into a grain that already has one goes in place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{at, DiskError, Result};
use crate::sparse::{self, Header, SECTOR};
use crate::store::DiskFile;

pub struct SparseExtent {
    pub file: Arc<dyn DiskFile>,
    pub name: String,
    pub hdr: Header,
    /// Sectors of each grain table, primary and redundant.
    gts: Vec<u64>,
    rgts: Vec<u64>,
    /// Grain tables read so far (entries as on disk plus flushed updates).
    tables: Vec<OnceLock<Box<[AtomicU32]>>>,
    /// Serializes allocation; holds the next free sector and the entries
    /// not yet written to the tables.
    alloc: Mutex<Alloc>,
}

struct Alloc {
    next: u64,
    pending: HashMap<u64, u32>,
}

/// Where a grain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Never written here: read the parent.
    Absent,
    /// Written and reading as zeros (QEMU's zeroed-grain entries).
    Zero,
    /// At this byte offset of the file.
    At(u64),
}

impl SparseExtent {
    /// Open an existing sparse extent and check its header and directories.
    pub fn open(file: Arc<dyn DiskFile>, name: &str) -> Result<SparseExtent> {
        let len = file.len().map_err(at(name))?;
        let mut b = [0u8; 512];
        file.read_full(&mut b, 0).map_err(at(name))?;
        let hdr = Header::decode(&b, name, len)?;
        let read_gd = |at_sector: u64| -> Result<Vec<u64>> {
            let mut raw = vec![0u8; (hdr.tables() * 4) as usize];
            file.read_full(&mut raw, at_sector * SECTOR)
                .map_err(at(name))?;
            let gd: Vec<u32> = raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            sparse::check_gd(&hdr, &gd, name, at_sector)
        };
        let gts = read_gd(hdr.gd_offset)?;
        let rgts = if hdr.flags & sparse::FLAG_RGD != 0 {
            read_gd(hdr.rgd_offset)?
        } else {
            Vec::new()
        };
        let next = (len.div_ceil(SECTOR)).max(hdr.grain_offset);
        let tables = (0..gts.len()).map(|_| OnceLock::new()).collect();
        Ok(SparseExtent {
            file,
            name: name.to_string(),
            hdr,
            gts,
            rgts,
            tables,
            alloc: Mutex::new(Alloc {
                next,
                pending: HashMap::new(),
            }),
        })
    }

    /// Begin writing an open sparse extent. One that was not closed
    /// cleanly (its unclean-shutdown byte set: a crash, a kill) is checked
    /// first, and what an interrupted flush left apart (the two copies of
    /// a table entry) is repaired, as a journal replay would; then the
    /// byte is set until [`SparseExtent::mark_clean`]. Before any lookup.
    pub fn begin_write(&self) -> Result<()> {
        let (file, name) = (&*self.file, self.name.as_str());
        let mut b = [0u8; 512];
        file.read_full(&mut b, 0).map_err(at(name))?;
        if b[sparse::UNCLEAN_AT as usize] != 0 {
            let c = check_file(file, name, true)?;
            if c.unrepairable > 0 {
                return Err(DiskError::Corrupt {
                    file: name.to_string(),
                    offset: 0,
                    reason: format!(
                        "not closed cleanly, and damaged beyond a safe repair: {}",
                        c.problems.join("; ")
                    ),
                });
            }
            for r in &c.repaired {
                tracing::warn!("after an unclean shutdown: {r}");
            }
            Ok(())
        } else {
            Self::set_unclean(file, name, 1)
        }
    }

    fn set_unclean(file: &dyn DiskFile, name: &str, v: u8) -> Result<()> {
        file.write_at(&[v], sparse::UNCLEAN_AT).map_err(at(name))?;
        file.flush().map_err(at(name))
    }

    /// Everything flushed: mark the extent closed cleanly.
    pub fn mark_clean(&self) -> Result<()> {
        self.flush()?;
        Self::set_unclean(&*self.file, &self.name, 0)
    }

    /// Make a new, empty sparse extent of `capacity` bytes in `file`: every
    /// grain table preallocated (zeros), both directories pointing at them.
    pub fn create(
        file: Arc<dyn DiskFile>,
        name: &str,
        capacity: u64,
        grain: u64,
    ) -> Result<SparseExtent> {
        let hdr = Header::new(capacity, grain)?;
        let tables = hdr.tables();
        let dir = |gd_at: u64| -> Vec<u8> {
            let first = gd_at + hdr.gd_sectors();
            (0..tables)
                .flat_map(|k| ((first + k * sparse::GT_SECTORS) as u32).to_le_bytes())
                .collect()
        };
        file.set_len(hdr.grain_offset * SECTOR).map_err(at(name))?;
        file.write_at(&dir(hdr.rgd_offset), hdr.rgd_offset * SECTOR)
            .map_err(at(name))?;
        file.write_at(&dir(hdr.gd_offset), hdr.gd_offset * SECTOR)
            .map_err(at(name))?;
        // The tables are zeros already (a fresh file's holes); the header last.
        file.write_at(&hdr.encode(), 0).map_err(at(name))?;
        file.flush().map_err(at(name))?;
        Self::open(file, name)
    }

    pub fn capacity(&self) -> u64 {
        self.hdr.capacity * SECTOR
    }

    pub fn grain_bytes(&self) -> u64 {
        self.hdr.grain_bytes()
    }

    fn table(&self, t: usize) -> Result<&[AtomicU32]> {
        if let Some(x) = self.tables[t].get() {
            return Ok(x);
        }
        let n = sparse::GTES_PER_GT as usize;
        let at_byte = self.gts[t] * SECTOR;
        let primary = read_u32s(&*self.file, at_byte, n, &self.name)?;
        // The redundant copy too: a crash between the two copies' writes
        // leaves them apart, and reads must answer what `check --repair`
        // (and the next writer's open) will settle on, from the first read.
        let redundant = match self.rgts.get(t) {
            Some(&r) => Some((
                r * SECTOR,
                read_u32s(&*self.file, r * SECTOR, n, &self.name)?,
            )),
            None => None,
        };
        let len = self.file.len().map_err(at(&self.name))?;
        let mut v = Vec::with_capacity(n);
        for (k, &p) in primary.iter().enumerate() {
            let pa = at_byte + k as u64 * 4;
            let mut e = p;
            if let Some((ra, r)) = &redundant {
                let r = r[k];
                if r != p {
                    let ok = |x: u32, a: u64| {
                        sparse::check_gte(&self.hdr, x, &self.name, a, len).is_ok()
                    };
                    e = settle(p, ok(p, pa), r, ok(r, ra + k as u64 * 4)).unwrap_or(p);
                }
            }
            sparse::check_gte(&self.hdr, e, &self.name, pa, len)?;
            v.push(AtomicU32::new(e));
        }
        let _ = self.tables[t].set(v.into_boxed_slice());
        Ok(self.tables[t].get().expect("just set"))
    }

    /// Where grain `g` is.
    pub fn lookup(&self, g: u64) -> Result<Grain> {
        let per = u64::from(sparse::GTES_PER_GT);
        let (t, k) = ((g / per) as usize, (g % per) as usize);
        if t >= self.tables.len() {
            return Err(DiskError::Invalid(format!(
                "{}: grain {g} is past the extent's capacity",
                self.name
            )));
        }
        let e = match self
            .alloc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .get(&g)
        {
            Some(&e) => e,
            None => self.table(t)?[k].load(Ordering::Acquire),
        };
        Ok(match e {
            0 => Grain::Absent,
            1 if self.hdr.flags & sparse::FLAG_ZERO_GRAIN != 0 => Grain::Zero,
            s => Grain::At(u64::from(s) * SECTOR),
        })
    }

    /// Write a whole new grain `g` (`data` is one grain) at the end of the
    /// file; its entry waits for [`SparseExtent::flush`]. `fill` is called
    /// under the allocation lock when the grain turns out to be absent, to
    /// complete `data` from the parent; if another writer allocated it
    /// meanwhile, returns its offset instead and writes nothing.
    pub fn allocate(&self, g: u64, data: &[u8]) -> Result<Option<u64>> {
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&e) = a.pending.get(&g) {
            return Ok(Some(u64::from(e) * SECTOR));
        }
        let per = u64::from(sparse::GTES_PER_GT);
        let cur = self.table((g / per) as usize)?[(g % per) as usize].load(Ordering::Acquire);
        if cur > 1 {
            return Ok(Some(u64::from(cur) * SECTOR));
        }
        let s = a.next;
        if s + self.hdr.granularity > sparse::MAX_FILE_SECTORS {
            return Err(DiskError::Invalid(format!(
                "{}: no room for another grain below 2 TiB",
                self.name
            )));
        }
        self.file
            .write_at(data, s * SECTOR)
            .map_err(at(&self.name))?;
        a.next = s + self.hdr.granularity;
        a.pending.insert(g, s as u32);
        Ok(None)
    }

    /// Grains allocated since the last flush.
    pub fn pending(&self) -> usize {
        self.alloc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .len()
    }

    /// Make the new grains durable, then their entries (both tables).
    pub fn flush(&self) -> Result<()> {
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        self.file.flush().map_err(at(&self.name))?;
        if a.pending.is_empty() {
            return Ok(());
        }
        let per = u64::from(sparse::GTES_PER_GT);
        let mut entries: Vec<(u64, u32)> = a.pending.iter().map(|(&g, &s)| (g, s)).collect();
        entries.sort_unstable();
        for (g, s) in &entries {
            let (t, k) = ((g / per) as usize, g % per);
            for base in [Some(self.gts[t]), self.rgts.get(t).copied()]
                .into_iter()
                .flatten()
            {
                self.file
                    .write_at(&s.to_le_bytes(), base * SECTOR + k * 4)
                    .map_err(at(&self.name))?;
            }
        }
        self.file.flush().map_err(at(&self.name))?;
        for (g, s) in entries {
            let (t, k) = ((g / per) as usize, (g % per) as usize);
            self.table(t)?[k].store(s, Ordering::Release);
        }
        a.pending.clear();
        Ok(())
    }

    /// Bytes of grains in the file.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let mut n = 0;
        for t in 0..self.tables.len() {
            n += self
                .table(t)?
                .iter()
                .filter(|e| e.load(Ordering::Acquire) > 1)
                .count() as u64;
        }
        n += self.pending() as u64;
        Ok(n * self.grain_bytes())
    }
}

/// Rebuild the directory at sector `gd_at` from the good tables `from`:
/// each table copied to where this layout keeps the tables of that
/// directory (right after it), then the directory pointing at them.
fn rebuild_directory(
    file: &dyn DiskFile,
    name: &str,
    hdr: &Header,
    from: &[u64],
    gd_at: u64,
) -> Result<Vec<u64>> {
    let per = sparse::GTES_PER_GT as usize;
    let mut out = Vec::with_capacity(from.len());
    for (k, &src) in from.iter().enumerate() {
        let t = read_u32s(file, src * SECTOR, per, name)?;
        let dst = gd_at + hdr.gd_sectors() + k as u64 * sparse::GT_SECTORS;
        let raw: Vec<u8> = t.iter().flat_map(|e| e.to_le_bytes()).collect();
        file.write_at(&raw, dst * SECTOR).map_err(at(name))?;
        out.push(dst);
    }
    let raw: Vec<u8> = out.iter().flat_map(|&s| (s as u32).to_le_bytes()).collect();
    file.write_at(&raw, gd_at * SECTOR).map_err(at(name))?;
    file.flush().map_err(at(name))?;
    Ok(out)
}

/// Which copy of a grain-table entry to believe, primary `p` or redundant
/// `r` (each valid or not): the valid one; of two valid ones, the one that
/// points at a grain (grains are only added: 0 is the older state of an
/// interrupted flush). `None`: neither is valid, or they name two grains.
/// Reads and `check --repair` settle on the same entry by this one rule.
fn settle(p: u32, p_ok: bool, r: u32, r_ok: bool) -> Option<u32> {
    match (p_ok, r_ok) {
        _ if p == r => p_ok.then_some(p),
        (true, true) if p == 0 => Some(r),
        (true, true) if r == 0 => Some(p),
        (true, true) => None,
        (true, false) => Some(p),
        (false, true) => Some(r),
        (false, false) => None,
    }
}

/// What checking one sparse extent found and fixed.
#[derive(Debug, Default)]
pub struct Checked {
    pub problems: Vec<String>,
    pub repaired: Vec<String>,
    /// Problems left that no repair here can fix safely.
    pub unrepairable: usize,
}

fn read_u32s(file: &dyn DiskFile, off: u64, n: usize, name: &str) -> Result<Vec<u32>> {
    let mut raw = vec![0u8; n * 4];
    file.read_full(&mut raw, off).map_err(at(name))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Check a sparse extent's two grain directories and every pair of grain
/// tables, and with `repair` fix what can be fixed safely:
/// - a directory that is damaged is rebuilt from the other (its tables
///   copied to where this layout keeps them);
/// - a table entry the two copies disagree on: the one that is valid
///   wins; of two valid ones, the one that points at a grain wins (a
///   grain is only ever added: 0 is the older state of an interrupted
///   flush);
/// - an entry past the end of the file (a delta cut short) is cleared:
///   the grain's bytes are not there to lose.
///
/// Entries pointing into the metadata or at a grain another entry uses
/// are reported and left alone.
pub fn check_file(file: &dyn DiskFile, name: &str, repair: bool) -> Result<Checked> {
    let mut c = Checked::default();
    let len = file.len().map_err(at(name))?;
    let mut b = [0u8; 512];
    file.read_full(&mut b, 0).map_err(at(name))?;
    let hdr = Header::decode(&b, name, len)?;
    let tables = hdr.tables() as usize;
    let per = sparse::GTES_PER_GT as usize;
    let has_rgd = hdr.flags & sparse::FLAG_RGD != 0;
    let gd = read_u32s(file, hdr.gd_offset * SECTOR, tables, name)?;
    let rgd = if has_rgd {
        read_u32s(file, hdr.rgd_offset * SECTOR, tables, name)?
    } else {
        Vec::new()
    };
    let gd_ok = sparse::check_gd(&hdr, &gd, name, hdr.gd_offset);
    let rgd_ok = if has_rgd {
        sparse::check_gd(&hdr, &rgd, name, hdr.rgd_offset)
    } else {
        Ok(Vec::new())
    };
    let (gts, rgts) = match (gd_ok, rgd_ok) {
        (Ok(g), Ok(r)) => (g, r),
        (Err(e), Ok(r)) if has_rgd => {
            c.problems.push(format!("{e}"));
            if !repair {
                return Ok(c);
            }
            let g = rebuild_directory(file, name, &hdr, &r, hdr.gd_offset)?;
            c.repaired.push(format!(
                "{name}: grain directory rebuilt from the redundant one"
            ));
            (g, r)
        }
        (Ok(g), Err(e)) => {
            c.problems.push(format!("{e}"));
            if !repair {
                return Ok(c);
            }
            let r = rebuild_directory(file, name, &hdr, &g, hdr.rgd_offset)?;
            c.repaired.push(format!(
                "{name}: redundant grain directory rebuilt from the primary one"
            ));
            (g, r)
        }
        (Err(e), _) => {
            c.problems.push(format!("{e}"));
            c.problems.push(format!(
                "{name}: no valid grain directory to rebuild it from"
            ));
            c.unrepairable += 1;
            return Ok(c);
        }
    };
    let valid = |e: u32, at_byte: u64| sparse::check_gte(&hdr, e, name, at_byte, len).is_ok();
    let mut used: HashMap<u32, (usize, usize)> = HashMap::new();
    for k in 0..tables {
        let p = read_u32s(file, gts[k] * SECTOR, per, name)?;
        let r = match rgts.get(k) {
            Some(&rt) => read_u32s(file, rt * SECTOR, per, name)?,
            None => p.clone(),
        };
        for j in 0..per {
            let pa = gts[k] * SECTOR + j as u64 * 4;
            let ra = rgts.get(k).map_or(pa, |&rt| rt * SECTOR + j as u64 * 4);
            let (pv, rv) = (p[j], r[j]);
            let (pok, rok) = (valid(pv, pa), valid(rv, ra));
            let mut want = pv;
            if pv != rv || !pok {
                // Neither valid, both past the end of the file: the grain
                // is not there (a delta cut short).
                let past = |e: u32| u64::from(e) >= hdr.grain_offset;
                let choice = settle(pv, pok, rv, rok)
                    .or_else(|| (!pok && !rok && past(pv) && past(rv)).then_some(0));
                c.problems.push(format!(
                    "{name}: grain table {k} entry {j} (grain {}): primary {pv}, redundant {rv}",
                    k * per + j
                ));
                match choice {
                    Some(v) if repair => {
                        for (at_byte, cur) in [(pa, pv), (ra, rv)] {
                            if cur != v {
                                file.write_at(&v.to_le_bytes(), at_byte).map_err(at(name))?;
                            }
                        }
                        c.repaired.push(format!(
                            "{name}: grain {} set to sector {v} in both tables",
                            k * per + j
                        ));
                        want = v;
                    }
                    Some(_) => {}
                    None => c.unrepairable += 1,
                }
            }
            if want > 1 {
                if let Some((k2, j2)) = used.insert(want, (k, j)) {
                    c.problems.push(format!(
                        "{name}: grains {} and {} both point at sector {want}",
                        k2 * per + j2,
                        k * per + j
                    ));
                    c.unrepairable += 1;
                }
            }
        }
    }
    if repair && !c.repaired.is_empty() {
        file.flush().map_err(at(name))?;
    }
    Ok(c)
}
