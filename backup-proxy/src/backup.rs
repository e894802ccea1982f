//! Backing up images: read what may hold data (or only what changed since
//! the last backup's change ID, taking every other chunk's digest from its
//! index), cut it into fixed chunks, skip zeros, hash, compress, encrypt
//! and store the new ones, on several threads at once; then the index of
//! each disk and, last, the manifest.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::blob::Kind;
use crate::error::{BackupError, Result};
use crate::image::Source;
use crate::index::{Digest, Index, ZERO};
use crate::manifest::{DiskEntry, Manifest, Stats};
use crate::repo::{chunk_key, index_key, manifest_key, Repo};
use crate::session::Session;
use crate::util::{check_name, hex, random_bytes, stamp, unix_now};

/// One disk of a backup.
pub struct DiskJob<'a> {
    pub name: String,
    pub source: &'a dyn Source,
    /// Read only what changed since this change ID (the source's), taking
    /// the rest from the newest backup of the same name and disk that
    /// recorded it.
    pub since: Option<String>,
}

#[derive(Clone)]
pub struct Options {
    /// Threads that read, hash, compress and store chunks.
    pub workers: usize,
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Options {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Options {
            workers: (cores * 2).clamp(4, 32),
            progress: false,
        }
    }
}

pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any bytes are a valid u128.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0)
        && post.iter().all(|&x| x == 0)
        && mid.iter().fold(0u128, |a, &x| a | x) == 0
}

/// A progress bar on the terminal (hidden when stderr is not one).
pub fn bar(total: u64, on: bool, what: &str) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(s) = indicatif::ProgressStyle::with_template(&format!(
        "{what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
    )) {
        pb.set_style(s);
    }
    pb
}

/// Back up `disks` as backup NAME. The backup is listed only once whole.
pub fn backup(repo: Arc<Repo>, name: &str, disks: &[DiskJob], opts: &Options) -> Result<Manifest> {
    check_name("backup name", name)?;
    let mut names = HashSet::new();
    for d in disks {
        check_name("disk name", &d.name)?;
        if !names.insert(&d.name) {
            return Err(BackupError::Invalid(format!(
                "disk name {} given twice",
                d.name
            )));
        }
    }
    let cs = repo.config.chunk_size;
    for d in disks {
        let n = crate::index::chunks(d.source.size(), cs);
        if n.saturating_mul(32).saturating_add(56) > crate::blob::MAX_PLAIN as u64 {
            return Err(BackupError::Invalid(format!(
                "{}: {} bytes is more than an index of {}-byte chunks holds; use a repository with larger chunks",
                d.source.describe(),
                d.source.size(),
                cs
            )));
        }
    }
    let started = unix_now();
    let id = format!("{name}/{}-{}", stamp(started), hex(&random_bytes::<4>()));
    let session = Session::start(repo.clone(), &id)?;
    let r = run(&repo, &session, &id, name, started, disks, opts);
    if r.is_err() {
        session.failed();
        // Its indexes, if any were written, mean nothing without the
        // manifest; its new chunks are collected from its intent log.
        if let Err(e) = crate::gc::discard_backup(&repo, &id) {
            tracing::warn!("backup {id}: removing what it wrote: {e}");
        }
    }
    session.end();
    r
}

fn run(
    repo: &Arc<Repo>,
    session: &Session,
    id: &str,
    name: &str,
    started: i64,
    disks: &[DiskJob],
    opts: &Options,
) -> Result<Manifest> {
    let mut entries = Vec::new();
    let mut parent_id = None;
    for job in disks {
        let (entry, parent) = backup_disk(repo, session, id, name, job, opts)?;
        if parent.is_some() {
            parent_id = parent;
        }
        entries.push(entry);
    }
    let m = Manifest {
        version: crate::manifest::VERSION,
        id: id.to_string(),
        name: name.to_string(),
        started,
        finished: unix_now(),
        host: crate::session::hostname(),
        parent: parent_id,
        disks: entries,
    };
    session.check_before_commit()?;
    repo.put_object(Kind::Manifest, &manifest_key(id), &m.encode())?;
    Ok(m)
}

/// The newest backup NAME with disk `disk` at change ID `since`.
fn find_parent(repo: &Repo, name: &str, disk: &str, since: &str) -> Result<(String, Index)> {
    let all = repo.list()?;
    let mut seen = Vec::new();
    for l in all.iter().rev().filter(|l| l.name == name) {
        let m = match repo.manifest(&l.id) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("skipping backup {}: {e}", l.id);
                continue;
            }
        };
        if let Some(d) = m.disks.iter().find(|d| d.name == disk) {
            if d.change_id.as_deref() == Some(since) {
                return Ok((l.id.clone(), repo.index(d)?));
            }
            if let Some(c) = &d.change_id {
                seen.push(format!("{} at {c}", l.id));
            }
        }
    }
    Err(BackupError::NotFound(format!(
        "{}: no backup {name} of disk {disk} at change ID {since} to build on ({}); back it up without --since",
        repo.describe(),
        if seen.is_empty() { "none records a change ID".to_string() } else { seen.join(", ") }
    )))
}

struct Shared<'a> {
    repo: &'a Repo,
    session: &'a Session,
    source: &'a dyn Source,
    index: &'a Index,
    parent: Option<&'a Index>,
    todo: Vec<(usize, Work)>,
    next: AtomicUsize,
    digests: Mutex<Vec<Digest>>,
    seen: Mutex<HashSet<Digest>>,
    stats: Mutex<Stats>,
    pb: indicatif::ProgressBar,
    stop: AtomicBool,
}

/// What a chunk needs.
#[derive(Clone)]
enum Work {
    /// Nothing changed (or, in a full backup, nothing there).
    Skip,
    Whole,
    /// These parts changed: read them over the parent's chunk.
    Patch(Vec<std::ops::Range<u64>>),
}

/// Store chunk `d` (`data` is its content) unless it is there.
fn store(repo: &Repo, d: &Digest, data: &[u8]) -> Result<()> {
    repo.backend
        .put_new(&chunk_key(d), &repo.seal_chunk(d, data))
        .map(|_| ())
}

fn backup_disk(
    repo: &Arc<Repo>,
    session: &Session,
    id: &str,
    name: &str,
    job: &DiskJob,
    opts: &Options,
) -> Result<(DiskEntry, Option<String>)> {
    let t0 = Instant::now();
    let src = job.source;
    let size = src.size();
    let cs = repo.config.chunk_size;
    let mut index = Index::new(cs, size);
    let change_id = src.change_id();
    let (ranges, parent) = match &job.since {
        None => (src.allocated()?, None),
        Some(since) => {
            let (pid, pidx) = find_parent(repo, name, &job.name, since)?;
            let c = src.changed_since(since)?;
            if let Some(why) = &c.whole {
                tracing::warn!("{}: reading it whole: {why}", src.describe());
            }
            (c.ranges, Some((pid, pidx)))
        }
    };
    // What each chunk needs: the parts the ranges touch. A chunk of an
    // incremental that changed in less than half is patched: those parts
    // read from the source over the parent's chunk (so the source is read
    // only where it changed); else it is read whole. A chunk the parent
    // cannot give (a grown disk's tail) is read whole.
    let n = index.digests.len();
    let mut parts: Vec<Vec<std::ops::Range<u64>>> = vec![Vec::new(); n];
    for r in &ranges {
        if r.start >= r.end || r.start >= size {
            continue;
        }
        let end = r.end.min(size);
        let (a, b) = (
            (r.start / cs as u64) as usize,
            ((end - 1) / cs as u64) as usize,
        );
        for (i, p) in parts.iter_mut().enumerate().take(b + 1).skip(a) {
            let c = index.range(i);
            p.push(r.start.max(c.start)..end.min(c.end));
        }
    }
    // Chunks verify set aside as damaged: never taken from the parent, so
    // this backup stores them again.
    let damaged: HashSet<Digest> = if parent.is_some() {
        repo.backend
            .list("damaged/")?
            .iter()
            .filter_map(|e| {
                let h = e.key.strip_prefix("damaged/")?.get(..64)?;
                crate::util::unhex(h)?.try_into().ok()
            })
            .collect()
    } else {
        HashSet::new()
    };
    let usable = |i: usize| match &parent {
        Some((_, p)) => {
            i < p.digests.len() && p.range(i) == index.range(i) && !damaged.contains(&p.digests[i])
        }
        None => false,
    };
    let mut work: Vec<Work> = Vec::with_capacity(n);
    for (i, p) in parts.into_iter().enumerate() {
        let c = index.range(i);
        work.push(if parent.is_some() && !usable(i) {
            Work::Whole
        } else if p.is_empty() {
            Work::Skip
        } else if usable(i) && p.iter().map(|r| r.end - r.start).sum::<u64>() * 2 < c.end - c.start
        {
            Work::Patch(p)
        } else {
            Work::Whole
        });
    }
    let mut stats = Stats::default();
    if let Some((_, p)) = &parent {
        for (i, w) in work.iter().enumerate() {
            if !matches!(w, Work::Skip) {
                continue;
            }
            let d = p.digests[i];
            index.digests[i] = d;
            let r = index.range(i);
            let len = r.end - r.start;
            if d == ZERO {
                stats.zero += len;
                continue;
            }
            stats.reused += len;
            stats.chunks += 1;
            session.reference(&d, &mut || {
                let mut buf = vec![0u8; len as usize];
                src.read_at(&mut buf, r.start)?;
                if repo.chunk_id(&buf) != d {
                    return Err(BackupError::Invalid(format!(
                        "{}: the chunk at offset {} changed since change ID {}, which the source did not report; back it up without --since",
                        src.describe(), r.start, job.since.as_deref().unwrap_or("")
                    )));
                }
                store(repo, &d, &buf)
            })?;
        }
    } else {
        for (i, w) in work.iter().enumerate() {
            if matches!(w, Work::Skip) {
                let r = index.range(i);
                stats.zero += r.end - r.start;
            }
        }
    }
    let todo: Vec<(usize, Work)> = work
        .into_iter()
        .enumerate()
        .filter(|(_, w)| !matches!(w, Work::Skip))
        .collect();
    let total: u64 = todo
        .iter()
        .map(|(i, w)| match w {
            Work::Patch(p) => p.iter().map(|r| r.end - r.start).sum(),
            _ => index.range(*i).end - index.range(*i).start,
        })
        .sum();
    let parent_index = parent.as_ref().map(|(_, p)| p);
    let sh = Shared {
        repo,
        session,
        source: src,
        index: &index,
        parent: parent_index,
        todo,
        next: AtomicUsize::new(0),
        digests: Mutex::new(index.digests.clone()),
        seen: Mutex::new(HashSet::new()),
        stats: Mutex::new(stats),
        pb: bar(total, opts.progress, &job.name),
        stop: AtomicBool::new(false),
    };
    let run = crate::util::in_parallel(opts.workers, &sh.stop, "backup", || worker(&sh));
    sh.pb.finish_and_clear();
    run?;
    let digests = sh.digests.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut stats = sh.stats.into_inner().unwrap_or_else(|p| p.into_inner());
    index.digests = digests;
    let ikey = index_key(id, &job.name);
    let obj = repo.put_object(Kind::Index, &ikey, &index.encode())?;
    stats.millis = t0.elapsed().as_millis() as u64;
    Ok((
        DiskEntry {
            name: job.name.clone(),
            size,
            chunk_size: cs,
            index: ikey,
            index_digest: hex(blake3::hash(&obj).as_bytes()),
            source: src.describe(),
            change_id,
            since: job.since.clone(),
            stats,
        },
        parent.map(|(p, _)| p),
    ))
}

/// Chunks a worker has sealed and will store once their digests are logged.
const BATCH: usize = 8;

fn worker(sh: &Shared) -> Result<()> {
    let cs = sh.index.chunk_size as usize;
    let mut buf = vec![0u8; cs];
    let mut batch: Vec<(Digest, Vec<u8>, u64)> = Vec::new();
    loop {
        let k = sh.next.fetch_add(1, Ordering::Relaxed);
        if k >= sh.todo.len() || sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let (i, work) = &sh.todo[k];
        let i = *i;
        let r = sh.index.range(i);
        let len = (r.end - r.start) as usize;
        let b = &mut buf[..len];
        let read = fill_chunk(sh, i, work, b)?;
        sh.pb.inc(read);
        sh.stats.lock().unwrap_or_else(|p| p.into_inner()).read += read;
        if is_zero(b) {
            sh.stats.lock().unwrap_or_else(|p| p.into_inner()).zero += len as u64;
            continue; // the digest stays ZERO
        }
        let d = sh.repo.chunk_id(b);
        sh.digests.lock().unwrap_or_else(|p| p.into_inner())[i] = d;
        let first = sh.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(d);
        if !first || sh.repo.backend.exists(&chunk_key(&d))? {
            {
                let mut st = sh.stats.lock().unwrap_or_else(|p| p.into_inner());
                st.reused += len as u64;
                st.chunks += 1;
            }
            let data = b.to_vec();
            sh.session
                .reference(&d, &mut || store(sh.repo, &d, &data))?;
            continue;
        }
        batch.push((d, sh.repo.seal_chunk(&d, b), len as u64));
        if batch.len() >= BATCH {
            flush(sh, &mut batch)?;
        }
    }
    flush(sh, &mut batch)
}

/// Chunk `i`'s new content into `b`; returns the bytes read from the source.
fn fill_chunk(sh: &Shared, i: usize, work: &Work, b: &mut [u8]) -> Result<u64> {
    let r = sh.index.range(i);
    if let (Work::Patch(parts), Some(p)) = (work, sh.parent) {
        let d = p.digests[i];
        let base = if d == ZERO {
            Ok(None)
        } else {
            sh.repo.get_chunk(&d).map(Some)
        };
        match base {
            Ok(base) => {
                match base {
                    Some(c) if c.len() == b.len() => b.copy_from_slice(&c),
                    Some(_) => return whole(sh, r.start, b),
                    None => b.fill(0),
                }
                let mut n = 0;
                for q in parts {
                    let (a, z) = ((q.start - r.start) as usize, (q.end - r.start) as usize);
                    sh.source.read_at(&mut b[a..z], q.start)?;
                    n += q.end - q.start;
                }
                return Ok(n);
            }
            Err(e) => tracing::warn!(
                "reading the chunk at offset {} whole: its parent chunk: {e}",
                r.start
            ),
        }
    }
    whole(sh, r.start, b)
}

fn whole(sh: &Shared, off: u64, b: &mut [u8]) -> Result<u64> {
    sh.source.read_at(b, off)?;
    Ok(b.len() as u64)
}

fn flush(sh: &Shared, batch: &mut Vec<(Digest, Vec<u8>, u64)>) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let ds: Vec<Digest> = batch.iter().map(|b| b.0).collect();
    sh.session.intend(&ds)?;
    for (d, sealed, len) in batch.drain(..) {
        let created = sh.repo.backend.put_new(&chunk_key(&d), &sealed)?;
        {
            let mut st = sh.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.chunks += 1;
            if created {
                st.new += len;
                st.stored += sealed.len() as u64;
                st.new_chunks += 1;
            } else {
                st.reused += len;
            }
        }
        let repo = sh.repo;
        sh.session.reference(&d, &mut || {
            repo.backend.put_new(&chunk_key(&d), &sealed).map(|_| ())
        })?;
    }
    Ok(())
}
