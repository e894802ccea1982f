//! The checker. Walks the namespace from the root, records the owner of every
//! file block and resource, and compares with the bitmaps, link counts,
//! directory placement and sizes. `repair` rebuilds what can be rebuilt from
//! the reachable tree (bitmaps and free counts, link counts, directory entries
//! that point at unreadable descriptors, orphans moved to /lost+found) and
//! says what it did; what it cannot fix safely (a block owned twice) it reports.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::error::Result;
use crate::format::*;
use crate::fs::{kind_of, Fs, State};
use crate::volume::Volume;

#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<String>,
    pub repaired: Vec<String>,
    pub files: u64,
    pub dirs: u64,
    pub blocks_used: u64,
    /// Errors that repair cannot fix.
    pub unrepairable: usize,
}

/// Who owns a block or resource: (owner FD, what).
type Owner = (u64, &'static str);

struct Walk {
    fb: HashMap<u64, Owner>,
    res: HashMap<(ResType, u64), Owner>,
    refs: HashMap<u64, u32>,
    subdirs: HashMap<u64, u32>,
    inodes: BTreeMap<u64, Inode>,
    bad_entries: Vec<(u64, Vec<u8>, String)>,
}

fn own_fb(w: &mut Walk, r: &mut Report, lbn: u64, o: Owner) {
    if let Some(prev) = w.fb.insert(lbn, o) {
        r.errors.push(format!(
            "file block {lbn} is owned twice: by {} of {:#x} and by {} of {:#x}",
            prev.1, prev.0, o.1, o.0
        ));
        r.unrepairable += 1;
    }
}
fn own_res(w: &mut Walk, r: &mut Report, t: ResType, a: u64, o: Owner) {
    if let Some(prev) = w.res.insert((t, a), o) {
        r.errors.push(format!(
            "{} {a:#x} is owned twice: by {} of {:#x} and by {} of {:#x}",
            t.name(),
            prev.1,
            prev.0,
            o.1,
            o.0
        ));
        r.unrepairable += 1;
    }
}

fn walk_tree(
    st: &mut State,
    vol: &Volume,
    ino: &Inode,
    w: &mut Walk,
    r: &mut Report,
) -> Result<()> {
    let Layout::Tree { sub, depth } = ino.layout else {
        return Ok(());
    };
    let leaf_sz = State::leaf_size(vol, ino);
    let leaves_needed = ino.size.div_ceil(leaf_sz);
    let bpk = vol.blocks_per_4k();
    let total4k = vol.header.total_blocks() * bpk;
    // (pointer, level, first leaf index covered)
    let mut stack: Vec<(u64, u8, u64)> = Vec::new();
    let span = |l: u8| (PB_PTRS as u64).pow(u32::from(l));
    for i in 0..FD_PTRS {
        let p = ino.ptr(i);
        if p != 0 {
            stack.push((p, depth, i as u64 * span(depth)));
        }
    }
    while let Some((p, lvl, first)) = stack.pop() {
        let a = p & PTR_ADDR_MASK;
        if a >= total4k {
            r.errors.push(format!(
                "file {:#x}: pointer {a:#x} is beyond the volume",
                ino.addr
            ));
            continue;
        }
        if lvl == 0 {
            if first >= leaves_needed && !ino.is_dir() && p & PTR_UNWRITTEN == 0 {
                r.errors.push(format!(
                    "file {:#x}: leaf {first} is beyond its size {}",
                    ino.addr, ino.size
                ));
            }
            if sub {
                own_res(w, r, ResType::SubBlock, a, (ino.addr, "data"));
            } else if a % bpk != 0 {
                r.errors.push(format!(
                    "file {:#x}: file-block pointer {a:#x} is not block aligned",
                    ino.addr
                ));
            } else {
                own_fb(w, r, a / bpk, (ino.addr, "data"));
            }
            continue;
        }
        own_res(w, r, ResType::PtrBlock, a, (ino.addr, "pointer block"));
        match st.meta.get(vol, a, MAGIC_PTR) {
            Ok(b) => {
                let b = b.to_vec();
                for i in 0..PB_PTRS {
                    let c = get64(&b, 64 + i * 8);
                    if c != 0 {
                        stack.push((c, lvl - 1, first + i as u64 * span(lvl - 1)));
                    }
                }
            }
            Err(e) => r.errors.push(format!("file {:#x}: {e}", ino.addr)),
        }
    }
    Ok(())
}

/// Check the filesystem; with `repair`, fix what is safe to fix.
pub fn check(fs: &Fs, repair: bool, progress: Option<&dyn Fn(u64, u64)>) -> Result<Report> {
    let mut r = Report::default();
    let vol = &fs.vol();
    let root = fs.root();
    let total_fds = fs.usage().fds_used;
    let mut w = Walk {
        fb: HashMap::new(),
        res: HashMap::new(),
        refs: HashMap::new(),
        subdirs: HashMap::new(),
        inodes: BTreeMap::new(),
        bad_entries: Vec::new(),
    };
    {
        let mut st = fs.lock();
        let st = &mut *st;
        // Metadata areas and resource clusters own their blocks.
        for e in &vol.header.extents {
            for k in 0..u64::from(e.meta_blocks) {
                w.fb.insert(e.first_block + k, (0, "volume metadata"));
            }
        }
        let bpk = vol.blocks_per_4k();
        for c in st.alloc.clusters.clone() {
            own_fb(&mut w, &mut r, c.addr / bpk, (0, "resource cluster"));
        }
        // Heartbeat slots: each journal owns its file blocks.
        for (slot, (hs, _)) in (0u32..).zip(vol.read_slots()?) {
            match hs {
                Ok(hs) if hs.journal != 0 => {
                    if hs.journal % bpk != 0 || u64::from(hs.journal_blocks) % bpk != 0 {
                        r.errors.push(format!("heartbeat slot {slot}: journal {:#x} (+{} blocks) is not whole file blocks", hs.journal, hs.journal_blocks));
                        r.unrepairable += 1;
                        continue;
                    }
                    for k in 0..u64::from(hs.journal_blocks) / bpk {
                        own_fb(
                            &mut w,
                            &mut r,
                            hs.journal / bpk + k,
                            (u64::from(slot), "journal of slot"),
                        );
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    r.errors.push(e.to_string());
                    r.unrepairable += 1;
                }
            }
        }
        // Walk the namespace.
        let mut queue = VecDeque::from([root]);
        let mut seen_dirs = HashSet::new();
        w.refs.insert(root, 1);
        while let Some(d) = queue.pop_front() {
            if !seen_dirs.insert(d) {
                r.errors.push(format!(
                    "directory {d:#x} is reachable twice (a cycle or a hard-linked directory)"
                ));
                r.unrepairable += 1;
                continue;
            }
            let dino = match st.iget(vol, d) {
                Ok(i) => i,
                Err(e) => {
                    r.errors.push(format!("directory {d:#x}: {e}"));
                    continue;
                }
            };
            r.dirs += 1;
            let entries = match st.dir_list(vol, &dino) {
                Ok(es) => es,
                Err(e) => {
                    r.errors.push(format!("directory {d:#x}: {e}"));
                    r.unrepairable += 1;
                    Vec::new()
                }
            };
            check_dir_layout(st, vol, &dino, &entries, &mut r);
            for e in entries {
                let child = match st.iget(vol, e.fd) {
                    Ok(c) => c,
                    Err(err) => {
                        let why = format!("entry {:?} in directory {d:#x} points at an unreadable file descriptor: {err}", String::from_utf8_lossy(&e.name));
                        r.errors.push(why.clone());
                        w.bad_entries.push((d, e.name.clone(), why));
                        continue;
                    }
                };
                if e.hash != name_hash(&e.name) {
                    r.errors.push(format!(
                        "entry {:?} in directory {d:#x} has a wrong hash",
                        String::from_utf8_lossy(&e.name)
                    ));
                }
                if e.kind != kind_of(child.mode) {
                    r.errors.push(format!(
                        "entry {:?} in directory {d:#x}: type {} but the file is type {}",
                        String::from_utf8_lossy(&e.name),
                        e.kind,
                        kind_of(child.mode)
                    ));
                }
                *w.refs.entry(e.fd).or_default() += 1;
                if child.is_dir() {
                    *w.subdirs.entry(d).or_default() += 1;
                    if child.parent != d {
                        r.errors.push(format!(
                            "directory {:#x} says its parent is {:#x} but it is in {d:#x}",
                            child.addr, child.parent
                        ));
                    }
                    queue.push_back(child.addr);
                } else {
                    r.files += 1;
                }
                w.inodes.entry(child.addr).or_insert(child);
            }
            w.inodes.insert(d, dino);
            if let Some(p) = progress {
                p(w.inodes.len() as u64, total_fds);
            }
        }
        for ino in w.inodes.clone().values() {
            own_res(
                &mut w,
                &mut r,
                ResType::Fd,
                ino.addr,
                (ino.addr, "descriptor"),
            );
            walk_tree(st, vol, ino, &mut w, &mut r)?;
            if ino.layout == Layout::Inline && ino.size > INLINE_MAX as u64 {
                r.errors.push(format!(
                    "file {:#x}: inline with size {}",
                    ino.addr, ino.size
                ));
            }
            let want = if ino.is_dir() {
                2 + w.subdirs.get(&ino.addr).copied().unwrap_or(0)
            } else {
                w.refs.get(&ino.addr).copied().unwrap_or(0)
            };
            if ino.nlink != want {
                r.errors.push(format!(
                    "file {:#x}: link count {} but {want} links found",
                    ino.addr, ino.nlink
                ));
            }
        }
        r.blocks_used = w.fb.len() as u64;
    }
    let orphans = compare_bitmaps(fs, &w, &mut r)?;
    if repair && !r.errors.is_empty() {
        do_repair(fs, &w, &orphans, &mut r)?;
    }
    Ok(r)
}

fn check_dir_layout(st: &mut State, vol: &Volume, d: &Inode, entries: &[DirEntry], r: &mut Report) {
    let mut names = HashSet::new();
    for e in entries {
        if !names.insert(e.name.clone()) {
            r.errors.push(format!(
                "directory {:#x} holds the name {:?} twice",
                d.addr,
                String::from_utf8_lossy(&e.name)
            ));
        }
        if e.name.is_empty()
            || e.name.contains(&b'/')
            || e.name.contains(&0)
            || e.name == b"."
            || e.name == b".."
        {
            r.errors.push(format!(
                "directory {:#x} holds an invalid name {:?}",
                d.addr,
                String::from_utf8_lossy(&e.name)
            ));
        }
    }
    if let Ok(hdr_count) = st.dir_count(vol, d) {
        if hdr_count != entries.len() as u64 {
            r.errors.push(format!(
                "directory {:#x}: header counts {hdr_count} entries, {} found",
                d.addr,
                entries.len()
            ));
        }
    }
}

/// Compare bitmaps with ownership; returns allocated-but-unreachable FDs.
fn compare_bitmaps(fs: &Fs, w: &Walk, r: &mut Report) -> Result<Vec<u64>> {
    let vol = &fs.vol();
    let mut st = fs.lock();
    let mut orphans = Vec::new();
    for c in st.alloc.fbc.clone() {
        let b = st.meta.get(vol, c.addr, MAGIC_FBC)?[LOCK_SECTOR..].to_vec();
        let mut free = 0;
        for j in 0..c.count as usize {
            let lbn = c.first + j as u64;
            let used = bit_get(&b[CL_BITMAP..], j);
            let owned = w.fb.contains_key(&lbn);
            if !used {
                free += 1;
            }
            if used && !owned {
                r.errors.push(format!(
                    "file block {lbn} is marked in use but nothing owns it (leaked)"
                ));
            } else if !used && owned {
                let o = w.fb[&lbn];
                r.errors.push(format!(
                    "file block {lbn} is owned by {} of {:#x} but marked free",
                    o.1, o.0
                ));
            }
        }
        if free != get32(&b, CL_FREE) {
            r.errors.push(format!(
                "file-block cluster {:#x}: free count {} but {free} blocks are free",
                c.addr,
                get32(&b, CL_FREE)
            ));
        }
    }
    for c in st.alloc.clusters.clone() {
        let b = st.meta.get(vol, c.addr, MAGIC_RCLUSTER)?[LOCK_SECTOR..].to_vec();
        let per = u64::from(c.res_size) / MD as u64;
        let mut free = 0;
        for j in 0..c.count as usize {
            let a = c.addr + 1 + j as u64 * per;
            let used = bit_get(&b[CL_BITMAP..], j);
            let owned = w.res.contains_key(&(c.rtype, a));
            if !used {
                free += 1;
            }
            if used && !owned {
                if c.rtype == ResType::Fd {
                    orphans.push(a);
                    r.errors.push(format!(
                        "file descriptor {a:#x} is allocated but no directory links it (orphan)"
                    ));
                } else {
                    r.errors.push(format!(
                        "{} {a:#x} is marked in use but nothing owns it (leaked)",
                        c.rtype.name()
                    ));
                }
            } else if !used && owned {
                let o = w.res[&(c.rtype, a)];
                r.errors.push(format!(
                    "{} {a:#x} is owned by {} of {:#x} but marked free",
                    c.rtype.name(),
                    o.1,
                    o.0
                ));
            }
        }
        if free != get32(&b, CL_FREE) {
            r.errors.push(format!(
                "{} cluster {:#x}: free count {} but {free} are free",
                c.rtype.name(),
                c.addr,
                get32(&b, CL_FREE)
            ));
        }
    }
    Ok(orphans)
}

fn do_repair(fs: &Fs, w: &Walk, orphans: &[u64], r: &mut Report) -> Result<()> {
    let root = fs.root();
    // 1. Directory entries pointing at unreadable descriptors.
    for (d, name, why) in &w.bad_entries {
        fs.op(|st, vol| {
            let mut dir = st.iget(vol, *d)?;
            st.dir_remove(vol, &mut dir, name)?;
            st.iput(vol, &dir)
        })?;
        r.repaired.push(format!("removed: {why}"));
    }
    // 2. Link counts.
    for ino in w.inodes.values() {
        let want = if ino.is_dir() {
            2 + w.subdirs.get(&ino.addr).copied().unwrap_or(0)
        } else {
            w.refs.get(&ino.addr).copied().unwrap_or(0)
        };
        if ino.nlink != want && want > 0 {
            fs.op(|st, vol| {
                let mut i = st.iget(vol, ino.addr)?;
                i.nlink = want;
                st.iput(vol, &i)
            })?;
            r.repaired.push(format!(
                "file {:#x}: link count {} -> {want}",
                ino.addr, ino.nlink
            ));
        }
    }
    // 3. Orphans with data go to /lost+found; they keep their blocks.
    let mut adopted = HashSet::new();
    for &o in orphans {
        let Ok(ino) = fs.getattr(o) else { continue };
        if ino.is_dir() || ino.nlink == 0 {
            continue; // freed below by the bitmap rebuild
        }
        let lf = match fs.lookup(root, b"lost+found") {
            Ok(i) => i.addr,
            Err(_) => {
                fs.create(root, b"lost+found", S_IFDIR | 0o700, 0, 0, 0, None)?
                    .addr
            }
        };
        let name = format!("#{o:x}");
        fs.op(|st, vol| {
            let mut d = st.iget(vol, lf)?;
            st.dir_insert(vol, &mut d, name.as_bytes(), o, kind_of(ino.mode))?;
            let mut i = st.iget(vol, o)?;
            i.nlink = 1;
            st.iput(vol, &i)?;
            st.iput(vol, &d)
        })?;
        adopted.insert(o);
        r.repaired.push(format!(
            "file descriptor {o:#x} linked as /lost+found/{name}"
        ));
    }
    // 4. Rebuild bitmaps from ownership, counting what the adopted files own.
    let fresh = {
        let mut r2 = Report::default();
        let mut w2 = Walk {
            fb: w.fb.clone(),
            res: w.res.clone(),
            refs: HashMap::new(),
            subdirs: HashMap::new(),
            inodes: BTreeMap::new(),
            bad_entries: Vec::new(),
        };
        {
            let mut st = fs.lock();
            for &o in &adopted {
                if let Ok(i) = st.iget(&fs.vol(), o) {
                    own_res(&mut w2, &mut r2, ResType::Fd, o, (o, "descriptor"));
                    walk_tree(&mut st, &fs.vol(), &i, &mut w2, &mut r2)?;
                }
            }
            if let Ok(lf) = fs.lookup_locked(&mut st, root, b"lost+found") {
                own_res(
                    &mut w2,
                    &mut r2,
                    ResType::Fd,
                    lf.addr,
                    (lf.addr, "descriptor"),
                );
                walk_tree(&mut st, &fs.vol(), &lf, &mut w2, &mut r2)?;
            }
        }
        w2
    };
    let n = fs.op(|st, vol| {
        let mut fixed = 0;
        for c in st.alloc.fbc.clone() {
            fixed += rebuild_bitmap(st, vol, c.addr, MAGIC_FBC, c.count, |j| {
                fresh.fb.contains_key(&(c.first + j as u64))
            })? as u32;
        }
        for c in st.alloc.clusters.clone() {
            let per = u64::from(c.res_size) / MD as u64;
            fixed += rebuild_bitmap(st, vol, c.addr, MAGIC_RCLUSTER, c.count, |j| {
                fresh
                    .res
                    .contains_key(&(c.rtype, c.addr + 1 + j as u64 * per))
            })? as u32;
        }
        Ok(fixed)
    })?;
    if n > 0 {
        r.repaired.push(format!(
            "rebuilt {n} allocation bitmaps from what the files own"
        ));
    }
    fs.reload_alloc()?;
    Ok(())
}

/// Set a cluster's bitmap and free count from `owned`; true if it changed.
fn rebuild_bitmap(
    st: &mut State,
    vol: &Volume,
    addr: u64,
    magic: u32,
    count: u32,
    owned: impl Fn(usize) -> bool,
) -> Result<bool> {
    let b = st.meta.get(vol, addr, magic)?[LOCK_SECTOR..].to_vec();
    let mut nb = b.clone();
    let mut free = 0;
    for j in 0..count as usize {
        bit_set(&mut nb[CL_BITMAP..], j, owned(j));
        free += u32::from(!owned(j));
    }
    put32(&mut nb, CL_FREE, free);
    if nb != b {
        st.meta.get_mut(vol, addr, magic)?[LOCK_SECTOR..].copy_from_slice(&nb);
    }
    Ok(nb != b)
}

/// How many metadata blocks a cold lookup reads (tests the O(1) claim).
pub fn count_lookup_reads(fs: &Fs, dir: u64, name: &[u8]) -> Result<u64> {
    {
        let mut st = fs.lock();
        st.meta.clear();
        st.meta.reads = 0;
    }
    fs.lookup(dir, name)?;
    Ok(fs.lock().meta.reads)
}

/// Where one metadata object of each kind lives: (kind, extent, byte offset
/// of its checksummed body on that extent's LUN). For tests and inspection.
pub fn locate_objects(fs: &Fs) -> Result<Vec<(&'static str, usize, u64)>> {
    let vol = &fs.vol();
    let h = &vol.header;
    let at = |addr4k: u64, body: usize| -> Result<(usize, u64)> {
        let (i, o) = vol.locate(addr4k * MD as u64)?;
        Ok((i, o + body as u64))
    };
    let mut out = vec![
        ("volume header", 0, 0),
        (
            "file-block cluster",
            0,
            u64::from(h.extents[0].fbc_off) + LOCK_SECTOR as u64,
        ),
    ];
    out.push(("resource table", 0, h.rt_off + LOCK_SECTOR as u64));
    let clusters = fs.lock().alloc.clusters.clone();
    if let Some(c) = clusters.first() {
        let (i, o) = at(c.addr, LOCK_SECTOR)?;
        out.push(("resource cluster", i, o));
    }
    let (dh, db) = fs.dir_blocks(fs.root())?;
    let (i, o) = at(dh, 0)?;
    out.push(("directory header", i, o));
    let (i, o) = at(db, 0)?;
    out.push(("directory bucket", i, o));
    let mut st = fs.lock();
    let root = st.iget(vol, fs.root())?;
    let mut fd = None;
    let mut pb = None;
    for e in st.dir_list(vol, &root)? {
        let ino = st.iget(vol, e.fd)?;
        if ino.is_dir() {
            continue;
        }
        fd.get_or_insert(ino.addr);
        if let Layout::Tree { depth, .. } = ino.layout {
            if depth > 0 && pb.is_none() {
                pb = (0..FD_PTRS).map(|k| ino.ptr(k)).find(|&p| p != 0);
            }
        }
    }
    drop(st);
    if let Some(a) = fd {
        let (i, o) = at(a, LOCK_SECTOR)?;
        out.push(("file descriptor", i, o));
    }
    if let Some(p) = pb {
        let (i, o) = at(p & PTR_ADDR_MASK, 0)?;
        out.push(("pointer block", i, o));
    }
    Ok(out)
}
