//! The crash-recovery harness (the engine of `vmfs crashtest`).
//!
//! A workload runs through the filesystem library on a LUN that records every
//! write and flush ([`lun::RecordingLun`], like dm-log-writes). For a crash
//! point between two flushes it builds the image a power cut would leave:
//! everything up to the last completed flush, plus a subset of the writes
//! issued after it, plus optionally one torn sector. Each image is mounted
//! (which replays the journal), checked with fsck, and compared with an
//! oracle: a model of the namespace and file contents after every prefix of
//! the operations. The recovered metadata must equal the model after some
//! prefix that includes every operation a completed fsync/sync covered; every
//! byte of a file must be one that file held after one of the possible
//! prefixes.
//!
//! Workloads are (1) bounded exhaustive: every sequence of up to three
//! operations over a small set of names, each followed by nothing, fsync or
//! sync (CrashMonkey/ACE style), and (2) long random sequences from a seed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use lun::{CowLun, Event, Lun, MemLun, RecordingLun, WriteLog};
use vmfs::{Fs, FsError, MkfsOptions, SetAttr};

/// The datastore the harness works on: two extents, a small first one
/// (metadata and the journal) and a second one where most file data lands,
/// so that a flush of one LUN says nothing about the other.
const LUN_SIZES: [u64; 2] = [2 << 20, 12 << 20];
/// Log markers: operation `i` started / completed.
pub(crate) fn mark_start(i: usize) -> u64 {
    2 * i as u64
}
pub(crate) fn mark_done(i: usize) -> u64 {
    2 * i as u64 + 1
}

// ---------------------------------------------------------------- RNG

/// splitmix64: small, seedable, good enough for choosing test cases.
#[derive(Clone)]
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

// ---------------------------------------------------------------- operations

/// One step of a workload. Paths are relative to the root, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create(String),
    Mkdir(String),
    Write(String, u64, u64),
    Link(String, String),
    Unlink(String),
    Rmdir(String),
    Rename(String, String),
    Truncate(String, u64),
    Falloc(String, u64, u64),
    Punch(String, u64, u64),
    Fsync(String),
    Sync,
}

impl Op {
    fn is_persist(&self) -> bool {
        matches!(self, Op::Fsync(_) | Op::Sync)
    }
    /// The path an fsync after this operation targets.
    fn target(&self) -> Option<&str> {
        match self {
            Op::Create(p)
            | Op::Write(p, ..)
            | Op::Truncate(p, _)
            | Op::Falloc(p, ..)
            | Op::Punch(p, ..) => Some(p),
            Op::Link(_, p) | Op::Rename(_, p) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create(p) => write!(f, "create({p})"),
            Op::Mkdir(p) => write!(f, "mkdir({p})"),
            Op::Write(p, o, l) => write!(f, "write({p},{o},{l})"),
            Op::Link(a, b) => write!(f, "link({a},{b})"),
            Op::Unlink(p) => write!(f, "unlink({p})"),
            Op::Rmdir(p) => write!(f, "rmdir({p})"),
            Op::Rename(a, b) => write!(f, "rename({a},{b})"),
            Op::Truncate(p, n) => write!(f, "truncate({p},{n})"),
            Op::Falloc(p, o, l) => write!(f, "falloc({p},{o},{l})"),
            Op::Punch(p, o, l) => write!(f, "punch({p},{o},{l})"),
            Op::Fsync(p) => write!(f, "fsync({p})"),
            Op::Sync => write!(f, "sync"),
        }
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Op, String> {
        let s = s.trim();
        if s == "sync" {
            return Ok(Op::Sync);
        }
        let (name, rest) = s
            .split_once('(')
            .ok_or_else(|| format!("{s:?}: expected name(args)"))?;
        let args: Vec<&str> = rest
            .strip_suffix(')')
            .ok_or_else(|| format!("{s:?}: missing )"))?
            .split(',')
            .map(str::trim)
            .collect();
        let n = |i: usize| -> Result<u64, String> {
            args.get(i)
                .ok_or_else(|| format!("{s:?}: missing argument {i}"))?
                .parse()
                .map_err(|_| format!("{s:?}: argument {i} is not a number"))
        };
        let p = |i: usize| -> Result<String, String> {
            args.get(i)
                .filter(|a| !a.is_empty())
                .map(|a| a.to_string())
                .ok_or_else(|| format!("{s:?}: missing path {i}"))
        };
        Ok(match name {
            "create" => Op::Create(p(0)?),
            "mkdir" => Op::Mkdir(p(0)?),
            "write" => Op::Write(p(0)?, n(1)?, n(2)?),
            "link" => Op::Link(p(0)?, p(1)?),
            "unlink" => Op::Unlink(p(0)?),
            "rmdir" => Op::Rmdir(p(0)?),
            "rename" => Op::Rename(p(0)?, p(1)?),
            "truncate" => Op::Truncate(p(0)?, n(1)?),
            "falloc" => Op::Falloc(p(0)?, n(1)?, n(2)?),
            "punch" => Op::Punch(p(0)?, n(1)?, n(2)?),
            "fsync" => Op::Fsync(p(0)?),
            _ => return Err(format!("{s:?}: unknown operation {name}")),
        })
    }
}

/// A workload as one line: operations separated by `;`.
pub fn format_ops(ops: &[Op]) -> String {
    ops.iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(";")
}
pub fn parse_ops(s: &str) -> Result<Vec<Op>, String> {
    s.split(';')
        .filter(|x| !x.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// The operations the exhaustive workloads choose from. The base image holds
/// file A (20 KiB, in sub-blocks), directory D with file D/C (200 KiB, in
/// file blocks), and F (1 MiB, never touched, filling the first extent);
/// B, D/E and E do not exist.
pub fn op_menu() -> Vec<Op> {
    let s = |x: &str| x.to_string();
    vec![
        Op::Create(s("B")),
        Op::Create(s("D/E")),
        Op::Mkdir(s("E")),
        Op::Write(s("A"), 20 << 10, 4096),
        Op::Write(s("A"), 0, 4096),
        Op::Write(s("A"), 100 << 10, 150 << 10),
        Op::Write(s("D/C"), 150 << 10, 200 << 10),
        Op::Write(s("B"), 0, 70 << 10),
        Op::Link(s("A"), s("B")),
        Op::Link(s("D/C"), s("E")),
        Op::Unlink(s("A")),
        Op::Unlink(s("D/C")),
        Op::Rmdir(s("E")),
        Op::Rmdir(s("D")),
        Op::Rename(s("A"), s("B")),
        Op::Rename(s("A"), s("D/C")),
        Op::Rename(s("D/C"), s("A")),
        Op::Rename(s("D"), s("E")),
        Op::Truncate(s("A"), 0),
        Op::Truncate(s("D/C"), 70 << 10),
        Op::Truncate(s("A"), 300 << 10),
        Op::Falloc(s("A"), 0, 256 << 10),
        Op::Punch(s("D/C"), 64 << 10, 64 << 10),
    ]
}

/// The three persistence variants after an operation.
fn persist_variants(op: &Op) -> Vec<Option<Op>> {
    let mut v = vec![None, Some(Op::Sync)];
    if let Some(t) = op.target() {
        v.push(Some(Op::Fsync(t.to_string())));
    }
    v
}

/// The content byte written at `off` by the workload's write number `k`.
fn pattern(k: usize, off: u64) -> u8 {
    (off.wrapping_mul(31).wrapping_add(k as u64 * 101 + 7) % 251) as u8 + 1
}

// ---------------------------------------------------------------- the model

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

/// What the namespace and the files are after some operations.
#[derive(Debug, Clone)]
struct Model {
    nodes: Vec<Node>,
    paths: BTreeMap<String, usize>,
}

fn parent(p: &str) -> &str {
    p.rsplit_once('/').map_or("", |(d, _)| d)
}

impl Model {
    fn base() -> Model {
        let mut m = Model {
            nodes: vec![Node::Dir],
            paths: BTreeMap::from([(String::new(), 0)]),
        };
        m.add(
            "A",
            Node::File((0..20u64 << 10).map(|o| pattern(1000, o)).collect()),
        );
        m.add("D", Node::Dir);
        // A filler that fills the first extent, so that later file data
        // lands on the second.
        m.add(
            "F",
            Node::File((0..1u64 << 20).map(|o| pattern(1002, o)).collect()),
        );
        m.add(
            "D/C",
            Node::File((0..200u64 << 10).map(|o| pattern(1001, o)).collect()),
        );
        m
    }
    fn add(&mut self, p: &str, n: Node) {
        self.nodes.push(n);
        self.paths.insert(p.to_string(), self.nodes.len() - 1);
    }
    fn is_dir(&self, p: &str) -> bool {
        self.paths
            .get(p)
            .is_some_and(|&n| self.nodes[n] == Node::Dir)
    }
    fn file(&mut self, p: &str) -> Result<&mut Vec<u8>, i32> {
        let n = *self.paths.get(p).ok_or(libc::ENOENT)?;
        match &mut self.nodes[n] {
            Node::File(d) => Ok(d),
            Node::Dir => Err(libc::EISDIR),
        }
    }
    fn children(&self, p: &str) -> usize {
        let pre = format!("{p}/");
        self.paths.keys().filter(|k| k.starts_with(&pre)).count()
    }
    fn check_new(&self, p: &str) -> Result<(), i32> {
        if !self.paths.contains_key(parent(p)) {
            return Err(libc::ENOENT);
        }
        if !self.is_dir(parent(p)) {
            return Err(libc::ENOTDIR);
        }
        if self.paths.contains_key(p) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    /// Apply `op` (write number `k` for patterns); Err(errno) changes nothing.
    fn apply(&mut self, op: &Op, k: usize) -> Result<(), i32> {
        match op {
            Op::Create(p) => {
                self.check_new(p)?;
                self.add(p, Node::File(Vec::new()));
            }
            Op::Mkdir(p) => {
                self.check_new(p)?;
                self.add(p, Node::Dir);
            }
            Op::Write(p, off, len) => {
                let d = self.file(p)?;
                let end = (off + len) as usize;
                if d.len() < end {
                    d.resize(end, 0);
                }
                for o in *off..off + len {
                    d[o as usize] = pattern(k, o);
                }
            }
            Op::Link(a, b) => {
                let n = *self.paths.get(a).ok_or(libc::ENOENT)?;
                if self.nodes[n] == Node::Dir {
                    return Err(libc::EPERM);
                }
                self.check_new(b)?;
                self.paths.insert(b.clone(), n);
            }
            Op::Unlink(p) => {
                let n = *self.paths.get(p).ok_or(libc::ENOENT)?;
                if self.nodes[n] == Node::Dir {
                    return Err(libc::EISDIR);
                }
                self.paths.remove(p);
            }
            Op::Rmdir(p) => {
                let n = *self.paths.get(p).ok_or(libc::ENOENT)?;
                if self.nodes[n] != Node::Dir {
                    return Err(libc::ENOTDIR);
                }
                if self.children(p) > 0 {
                    return Err(libc::ENOTEMPTY);
                }
                self.paths.remove(p);
            }
            Op::Rename(a, b) => {
                let n = *self.paths.get(a).ok_or(libc::ENOENT)?;
                if !self.is_dir(parent(b)) {
                    return Err(libc::ENOENT);
                }
                let a_dir = self.nodes[n] == Node::Dir;
                if a_dir && b.starts_with(&format!("{a}/")) {
                    return Err(libc::EINVAL);
                }
                if let Some(&m) = self.paths.get(b) {
                    if m == n {
                        return Ok(()); // the same file: nothing to do
                    }
                    let b_dir = self.nodes[m] == Node::Dir;
                    if !a_dir && b_dir {
                        return Err(libc::EISDIR);
                    }
                    if a_dir && !b_dir {
                        return Err(libc::ENOTDIR);
                    }
                    if b_dir && self.children(b) > 0 {
                        return Err(libc::ENOTEMPTY);
                    }
                    self.paths.remove(b);
                }
                let pre = format!("{a}/");
                let moved: Vec<(String, usize)> = self
                    .paths
                    .iter()
                    .filter(|(k, _)| *k == a || k.starts_with(&pre))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                for (k, v) in moved {
                    self.paths.remove(&k);
                    self.paths.insert(format!("{b}{}", &k[a.len()..]), v);
                }
            }
            Op::Truncate(p, n) => {
                self.file(p)?.resize(*n as usize, 0);
            }
            Op::Falloc(p, off, len) => {
                let d = self.file(p)?;
                let end = (off + len) as usize;
                if d.len() < end {
                    d.resize(end, 0);
                }
            }
            Op::Punch(p, off, len) => {
                let d = self.file(p)?;
                let end = ((off + len) as usize).min(d.len());
                for b in d.iter_mut().take(end).skip(*off as usize) {
                    *b = 0;
                }
            }
            Op::Fsync(p) => {
                self.paths.get(p).ok_or(libc::ENOENT)?;
            }
            Op::Sync => {}
        }
        Ok(())
    }

    /// The metadata a crash must preserve exactly: per path its kind, size,
    /// and the other paths of the same file.
    fn shape(&self) -> BTreeMap<String, (bool, u64, Vec<String>)> {
        let mut by_node: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (p, &n) in &self.paths {
            by_node.entry(n).or_default().push(p.clone());
        }
        self.paths
            .iter()
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, &n)| {
                let (dir, size) = match &self.nodes[n] {
                    Node::Dir => (true, 0),
                    Node::File(d) => (false, d.len() as u64),
                };
                let others = by_node[&n].iter().filter(|q| *q != p).cloned().collect();
                (p.clone(), (dir, size, others))
            })
            .collect()
    }
}

// ---------------------------------------------------------------- the real filesystem

/// The model speaks POSIX: compare in errnos.
fn errno(e: &FsError) -> i32 {
    vmfs::fuse::errno(e.fault())
}

fn resolve(fs: &Fs, p: &str) -> vmfs::Result<u64> {
    let mut ino = fs.root();
    for c in p.split('/').filter(|c| !c.is_empty()) {
        ino = fs.lookup(ino, c.as_bytes())?.addr;
    }
    Ok(ino)
}

fn split(fs: &Fs, p: &str) -> vmfs::Result<(u64, String)> {
    let name = p.rsplit('/').next().unwrap_or(p).to_string();
    Ok((resolve(fs, parent(p))?, name))
}

/// Run `op` on the filesystem.
fn run_op(fs: &Fs, op: &Op, k: usize) -> vmfs::Result<()> {
    match op {
        Op::Create(p) | Op::Mkdir(p) => {
            let (d, n) = split(fs, p)?;
            let mode = if matches!(op, Op::Mkdir(_)) {
                libc::S_IFDIR | 0o755
            } else {
                libc::S_IFREG | 0o644
            };
            fs.create(d, n.as_bytes(), mode, 0, 0, 0, None)?;
        }
        Op::Write(p, off, len) => {
            let data: Vec<u8> = (*off..off + len).map(|o| pattern(k, o)).collect();
            fs.write(resolve(fs, p)?, *off, &data)?;
        }
        Op::Link(a, b) => {
            let i = resolve(fs, a)?;
            let (d, n) = split(fs, b)?;
            fs.link(i, d, n.as_bytes())?;
        }
        Op::Unlink(p) | Op::Rmdir(p) => {
            let (d, n) = split(fs, p)?;
            fs.unlink(d, n.as_bytes(), matches!(op, Op::Rmdir(_)))?;
        }
        Op::Rename(a, b) => {
            let (d1, n1) = split(fs, a)?;
            let (d2, n2) = split(fs, b)?;
            fs.rename(d1, n1.as_bytes(), d2, n2.as_bytes(), false, false)?;
        }
        Op::Truncate(p, n) => {
            let i = resolve(fs, p)?;
            fs.setattr(
                i,
                &SetAttr {
                    size: Some(*n),
                    ..Default::default()
                },
            )?;
        }
        Op::Falloc(p, off, len) => fs.fallocate(resolve(fs, p)?, *off, *len, 0)?,
        Op::Punch(p, off, len) => fs.fallocate(
            resolve(fs, p)?,
            *off,
            *len,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )?,
        Op::Fsync(p) => {
            resolve(fs, p)?;
            fs.sync()?;
        }
        Op::Sync => fs.sync()?,
    }
    Ok(())
}

/// What a mounted crash image holds: path -> (is dir, size, file id), and contents.
struct Seen {
    shape: BTreeMap<String, (bool, u64, Vec<String>)>,
    data: BTreeMap<String, Vec<u8>>,
}

fn observe(fs: &Fs) -> vmfs::Result<Seen> {
    let mut paths: BTreeMap<String, (bool, u64, u64)> = BTreeMap::new();
    let mut data = BTreeMap::new();
    let mut stack = vec![(String::new(), fs.root())];
    while let Some((p, d)) = stack.pop() {
        for e in fs.readdir(d)? {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let path = if p.is_empty() {
                name
            } else {
                format!("{p}/{name}")
            };
            let i = fs.getattr(e.fd)?;
            if i.is_dir() {
                paths.insert(path.clone(), (true, 0, e.fd));
                stack.push((path, e.fd));
            } else {
                paths.insert(path.clone(), (false, i.size, e.fd));
                data.insert(path, fs.read(e.fd, 0, i.size as usize)?);
            }
        }
    }
    let mut by_fd: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, (_, _, fd)) in &paths {
        by_fd.entry(*fd).or_default().push(p.clone());
    }
    let shape = paths
        .iter()
        .map(|(p, (dir, size, fd))| {
            let others = by_fd[fd].iter().filter(|q| *q != p).cloned().collect();
            (p.clone(), (*dir, *size, others))
        })
        .collect();
    Ok(Seen { shape, data })
}

// ---------------------------------------------------------------- crash images

/// Which crash image: a power cut just before the log's `segment`-th flush
/// completes (or at the end of the log), with those of the writes then in
/// flight that reached the disk, and optionally a torn sector of one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    /// Crash before the `segment`-th flush of the log completed (or at the end).
    pub segment: usize,
    /// Indices (among the writes in flight, in log order: written since the
    /// last flush of their own LUN) of those that reached the disk.
    pub writes: Vec<usize>,
    /// (index among the writes in flight, sector within it): that sector is
    /// half new, half old.
    pub torn: Option<(usize, u64)>,
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.segment)?;
        let w: Vec<String> = self.writes.iter().map(|w| w.to_string()).collect();
        write!(
            f,
            "{}",
            if w.is_empty() {
                "-".into()
            } else {
                w.join(",")
            }
        )?;
        if let Some((w, s)) = self.torn {
            write!(f, ":torn={w}.{s}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Crash {
    type Err = String;
    fn from_str(s: &str) -> Result<Crash, String> {
        let bad = || format!("{s:?}: expected SEGMENT:W,W,...[:torn=W.S]");
        let mut it = s.split(':');
        let segment = it.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        let ws = it.next().ok_or_else(bad)?;
        let writes = if ws == "-" {
            Vec::new()
        } else {
            ws.split(',')
                .map(|x| x.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?
        };
        let torn = match it.next() {
            None => None,
            Some(t) => {
                let (w, sec) = t
                    .strip_prefix("torn=")
                    .and_then(|t| t.split_once('.'))
                    .ok_or_else(bad)?;
                Some((
                    w.parse().map_err(|_| bad())?,
                    sec.parse().map_err(|_| bad())?,
                ))
            }
        };
        Ok(Crash {
            segment,
            writes,
            torn,
        })
    }
}

/// A recorded run of one workload.
struct Recording {
    log: Vec<Event>,
    /// Model after each prefix: states[k] = after the first k operations.
    states: Vec<Model>,
    /// Per operation: a persistence operation that succeeded (a failed
    /// fsync promises nothing).
    persisted: Vec<bool>,
}

/// Crash points: just before each flush of the log completes, and at the
/// end. Crash point `s` is log index `points[s]`.
pub(crate) fn crash_points(log: &[Event]) -> Vec<usize> {
    let mut out: Vec<usize> = (0..log.len())
        .filter(|&i| matches!(log[i], Event::Flush { .. }))
        .collect();
    out.push(log.len());
    out
}

fn lun_of(e: &Event) -> Option<usize> {
    match e {
        Event::Write { lun, .. } | Event::Zero { lun, .. } | Event::Flush { lun } => Some(*lun),
        Event::Mark(_) => None,
    }
}

/// Log indices of the writes before `b` that no flush of their own LUN
/// before `b` made durable: a power cut at `b` keeps any subset of them.
pub(crate) fn pending(log: &[Event], b: usize) -> Vec<usize> {
    let mut last_flush: Vec<Option<usize>> = Vec::new();
    for (i, e) in log[..b].iter().enumerate() {
        if let Event::Flush { lun } = e {
            if last_flush.len() <= *lun {
                last_flush.resize(lun + 1, None);
            }
            last_flush[*lun] = Some(i);
        }
    }
    (0..b)
        .filter(|&i| is_write(&log[i]))
        .filter(|&i| {
            let l = lun_of(&log[i]).unwrap_or(0);
            last_flush.get(l).copied().flatten().is_none_or(|f| f < i)
        })
        .collect()
}

pub(crate) fn is_write(e: &Event) -> bool {
    matches!(e, Event::Write { .. } | Event::Zero { .. })
}

pub(crate) fn apply_event(luns: &[CowLun], e: &Event) -> lun::Result<()> {
    let Some(l) = lun_of(e).and_then(|i| luns.get(i)) else {
        return Ok(());
    };
    match e {
        Event::Write { offset, data, .. } => l.write_at(data, *offset),
        Event::Zero { offset, len, .. } => l.write_zeroes(*offset, *len, false),
        _ => Ok(()),
    }
}

/// Choose up to `budget` crash states of a log: the crash with nothing in
/// flight, every crash point with all its writes landed, then partial
/// subsets and torn sectors while the budget lasts.
pub(crate) fn plan(log: &[Event], budget: usize, rng: &mut Rng) -> Vec<Crash> {
    let points = crash_points(log);
    let pend: Vec<Vec<usize>> = points.iter().map(|&b| pending(log, b)).collect();
    let mut out: Vec<Crash> = vec![Crash {
        segment: 0,
        writes: Vec::new(),
        torn: None,
    }];
    // Every crash point with writes in flight: all of them on disk (the
    // crash just before the flush completes), then partial subsets and
    // torn variants while the budget lasts.
    let live: Vec<usize> = (0..points.len()).filter(|&s| !pend[s].is_empty()).collect();
    for &s in &live {
        out.push(Crash {
            segment: s,
            writes: (0..pend[s].len()).collect(),
            torn: None,
        });
    }
    let mut tries = 0;
    while out.len() < budget && !live.is_empty() && tries < budget * 4 {
        tries += 1;
        let s = live[rng.below(live.len() as u64) as usize];
        let n = pend[s].len();
        let writes: Vec<usize> = match rng.below(3) {
            0 => (0..rng.below(n as u64) as usize).collect(), // a prefix
            _ => (0..n).filter(|_| rng.below(2) == 0).collect(), // any subset
        };
        let torn = if rng.below(2) == 0 && !writes.is_empty() {
            let w = writes[rng.below(writes.len() as u64) as usize];
            let len = match &log[pend[s][w]] {
                Event::Write { data, .. } => data.len() as u64,
                _ => 0,
            };
            (len >= 512).then(|| (w, rng.below(len / 512)))
        } else {
            None
        };
        let c = Crash {
            segment: s,
            writes,
            torn,
        };
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out.truncate(budget.max(1));
    out
}

/// The image a crash state leaves (a copy-on-write over `bases`), and
/// which operations it must show: at least the first `durable` (their
/// persistence acknowledged), at most the first `started`.
pub(crate) fn crash_image(
    bases: &[Arc<MemLun>],
    log: &[Event],
    persisted: &[bool],
    c: &Crash,
) -> Result<(Vec<CowLun>, usize, usize), String> {
    let points = crash_points(log);
    let &b = points.get(c.segment).ok_or_else(|| {
        format!(
            "crash point {} does not exist ({} in the log)",
            c.segment,
            points.len()
        )
    })?;
    let pend = pending(log, b);
    let mut chosen = std::collections::HashMap::new();
    for &w in &c.writes {
        let i = *pend
            .get(w)
            .ok_or_else(|| format!("write {w} is not in flight at crash point {}", c.segment))?;
        chosen.insert(i, w);
    }
    let imgs: Vec<CowLun> = bases.iter().map(|b| CowLun::new(b.clone())).collect();
    let io = |e: lun::LunError| e.to_string();
    for (i, e) in log[..b].iter().enumerate() {
        if !is_write(e) {
            continue;
        }
        let w = match chosen.get(&i) {
            Some(&w) => Some(w),
            None if pend.binary_search(&i).is_ok() => continue, // in flight, lost
            None => None,                                       // durable
        };
        if let (Some((tw, sec)), Some(w), Event::Write { lun, offset, data }) = (c.torn, w, e) {
            if tw == w {
                // All sectors but the torn one, and half of that one.
                let img = &imgs[*lun];
                let mut d = data.to_vec();
                let s = (sec * 512) as usize;
                if s + 512 <= d.len() {
                    let mut old = vec![0u8; 256];
                    img.read_at(&mut old, offset + s as u64 + 256).map_err(io)?;
                    d[s + 256..s + 512].copy_from_slice(&old);
                }
                img.write_at(&d, *offset).map_err(io)?;
                continue;
            }
        }
        apply_event(&imgs, e).map_err(io)?;
    }
    // Which operations had completed (their persistence acknowledged)
    // and which had started before the crash point (the flush at `b`).
    let mut durable = 0usize;
    let mut started = 0usize;
    for e in &log[..b] {
        if let Event::Mark(m) = e {
            let k = (*m / 2) as usize;
            if m % 2 == 0 {
                started = started.max(k + 1);
            } else if persisted.get(k).copied().unwrap_or(true) {
                durable = durable.max(k + 1);
            }
        }
    }
    let started = started.min(persisted.len());
    let durable = durable.min(persisted.len());
    Ok((imgs, durable, started))
}

/// Print a write log (`VMFS_CRASH_DEBUG=1`).
pub(crate) fn print_log(log: &[Event]) {
    for (i, e) in log.iter().enumerate() {
        match e {
            Event::Write { lun, offset, data } => {
                eprintln!("{i}: write lun{lun} {offset:#x} +{:#x}", data.len())
            }
            Event::Zero { lun, offset, len } => {
                eprintln!("{i}: zero lun{lun} {offset:#x} +{len:#x}")
            }
            Event::Flush { lun } => eprintln!("{i}: FLUSH lun{lun}"),
            Event::Mark(m) => eprintln!(
                "{i}: op {} {}",
                m / 2,
                if m % 2 == 0 { "start" } else { "done" }
            ),
        }
    }
}

/// The harness's fixed starting image and settings.
pub struct Harness {
    bases: Vec<Arc<MemLun>>,
}

/// One failed crash state.
#[derive(Debug, Clone)]
pub struct Failure {
    pub workload: String,
    pub crash: Option<Crash>,
    pub what: String,
}

impl Failure {
    /// One line that reruns exactly this state.
    pub fn reproducer(&self) -> String {
        match &self.crash {
            Some(c) => format!(
                "vmfs crashtest --workload '{}' --crash '{c}'",
                self.workload
            ),
            None => format!("vmfs crashtest --workload '{}'", self.workload),
        }
    }
}

/// Counters of a run.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub workloads: u64,
    pub states: u64,
    pub replayed: u64,
    pub failures: Vec<Failure>,
}

impl Harness {
    /// mkfs a small datastore (64 KiB blocks, 1 MiB journal so that runs wrap
    /// and checkpoint it) and put the base files on it.
    pub fn new() -> anyhow::Result<Harness> {
        let mems: Vec<Arc<MemLun>> = LUN_SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| Arc::new(MemLun::new(&format!("crash-lun{i}"), n)))
            .collect();
        let fs = Fs::mkfs(
            mems.iter().map(|m| m.clone() as Arc<dyn Lun>).collect(),
            &MkfsOptions {
                label: "crashtest".into(),
                block_size: 64 << 10,
                max_hosts: 4,
                journal_blocks: 256,
                ..Default::default()
            },
        )?;
        let m = Model::base();
        let root = fs.root();
        let mk =
            |dir: u64, name: &str, mode: u32| fs.create(dir, name.as_bytes(), mode, 0, 0, 0, None);
        let a = mk(root, "A", libc::S_IFREG | 0o644)?;
        let d = mk(root, "D", libc::S_IFDIR | 0o755)?;
        let c = mk(d.addr, "C", libc::S_IFREG | 0o644)?;
        let f = mk(root, "F", libc::S_IFREG | 0o644)?;
        for (ino, p) in [(a.addr, "A"), (c.addr, "D/C"), (f.addr, "F")] {
            if let Node::File(data) = &m.nodes[m.paths[p]] {
                fs.write(ino, 0, data)?;
            }
        }
        fs.unmount()?;
        drop(fs);
        Ok(Harness {
            bases: mems
                .iter()
                .enumerate()
                .map(|(i, m)| Arc::new(MemLun::from_bytes(&format!("crash-lun{i}"), m.snapshot())))
                .collect(),
        })
    }

    /// Run `ops` on a recording LUN over the base image.
    fn record(&self, ops: &[Op]) -> Result<Recording, String> {
        let log = WriteLog::default();
        let luns: Vec<Arc<dyn Lun>> = self
            .bases
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Arc::new(RecordingLun::new(
                    Arc::new(CowLun::new(b.clone())),
                    i,
                    log.clone(),
                )) as Arc<dyn Lun>
            })
            .collect();
        let fs = Fs::open(luns).map_err(|e| format!("mount before the workload: {e}"))?;
        let mut model = Model::base();
        let mut states = vec![model.clone()];
        let mut persisted = Vec::new();
        let push = |m: u64| {
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Event::Mark(m))
        };
        for (k, op) in ops.iter().enumerate() {
            push(mark_start(k));
            let want = model.apply(op, k);
            let got = run_op(&fs, op, k);
            push(mark_done(k));
            match (&want, &got) {
                (Ok(()), Err(e)) => {
                    return Err(format!(
                        "operation {k} {op} failed: {e}; the model says it succeeds"
                    ))
                }
                (Err(w), Ok(())) => {
                    return Err(format!(
                        "operation {k} {op} succeeded; the model says it fails with errno {w}"
                    ))
                }
                (Err(w), Err(e)) if *w != errno(e) => {
                    return Err(format!(
                        "operation {k} {op} failed with errno {} ({e}), the model says errno {w}",
                        errno(e)
                    ))
                }
                _ => {}
            }
            persisted.push(op.is_persist() && got.is_ok());
            states.push(model.clone());
        }
        // A clean unmount ends the log: every operation durable after it.
        push(mark_start(ops.len()));
        fs.unmount()
            .map_err(|e| format!("unmount after the workload: {e}"))?;
        push(mark_done(ops.len()));
        drop(fs);
        let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if std::env::var_os("VMFS_CRASH_DEBUG").is_some() {
            print_log(&log);
        }
        Ok(Recording {
            log,
            states,
            persisted,
        })
    }

    /// Build the crash image, mount it, fsck it and judge it by the oracle.
    fn check(&self, rec: &Recording, c: &Crash) -> Result<bool, String> {
        let (imgs, durable, started) = crash_image(&self.bases, &rec.log, &rec.persisted, c)?;
        let luns: Vec<Arc<dyn Lun>> = imgs
            .into_iter()
            .map(|l| Arc::new(l) as Arc<dyn Lun>)
            .collect();
        let fs = Fs::open(luns).map_err(|e| format!("mount (journal replay) failed: {e}"))?;
        let replayed = !fs.replays().is_empty();
        let r =
            vmfs::fsck::check(&fs, false, None).map_err(|e| format!("fsck could not run: {e}"))?;
        if !r.errors.is_empty() {
            fs.abandon();
            return Err(format!("fsck: {}", r.errors.join("; ")));
        }
        let seen = observe(&fs).map_err(|e| format!("reading the recovered tree: {e}"))?;
        fs.abandon();
        let candidates = &rec.states[durable..=started];
        let Some(m) = candidates.iter().find(|m| m.shape() == seen.shape) else {
            return Err(format!(
                "the recovered namespace {:?} is not the one after any of operations {durable}..={started} (after {durable}: {:?})",
                seen.shape.keys().collect::<Vec<_>>(),
                rec.states[durable].shape().keys().collect::<Vec<_>>()
            ));
        };
        for (p, got) in &seen.data {
            let n = m.paths[p];
            let whole = |s: &Model| matches!(s.nodes.get(n), Some(Node::File(d)) if d == got);
            if candidates.iter().any(whole) {
                continue; // the common case: one state's contents exactly
            }
            for (off, byte) in got.iter().enumerate() {
                let ok = candidates.iter().any(|s| match s.nodes.get(n) {
                    Some(Node::File(d)) => d.get(off) == Some(byte),
                    _ => false,
                });
                if !ok {
                    return Err(format!(
                        "{p}: byte {off} is {byte:#04x}, which no possible state of the file holds (operations {durable}..={started})"
                    ));
                }
            }
        }
        Ok(replayed)
    }

    /// Record one workload and check up to `budget` of its crash states (or
    /// exactly `only`).
    pub fn run_workload(
        &self,
        ops: &[Op],
        budget: usize,
        only: Option<&Crash>,
        rng: &mut Rng,
        sum: &mut Summary,
    ) {
        run_recorded(
            format_ops(ops),
            || self.record(ops),
            |rec| &rec.log,
            |rec, c| self.check(rec, c),
            (budget, only, rng, sum),
        );
    }
}

/// The loop both harnesses share: record a workload (a failure to is one
/// failure), plan up to `budget` crash states of its log (or exactly
/// `only`), check each, count.
pub(crate) fn run_recorded<R>(
    workload: String,
    record: impl FnOnce() -> Result<R, String>,
    log: impl Fn(&R) -> &[Event],
    check: impl Fn(&R, &Crash) -> Result<bool, String>,
    (budget, only, rng, sum): (usize, Option<&Crash>, &mut Rng, &mut Summary),
) {
    sum.workloads += 1;
    let rec = match record() {
        Ok(r) => r,
        Err(what) => {
            sum.failures.push(Failure {
                workload,
                crash: None,
                what,
            });
            return;
        }
    };
    let states = match only {
        Some(c) => vec![c.clone()],
        None => plan(log(&rec), budget, rng),
    };
    for c in states {
        sum.states += 1;
        match check(&rec, &c) {
            Ok(replayed) => sum.replayed += u64::from(replayed),
            Err(what) => sum.failures.push(Failure {
                workload: workload.clone(),
                crash: Some(c),
                what,
            }),
        }
    }
}

/// Every workload of up to `max_ops` operations from the menu, each followed
/// by each persistence variant, in a fixed order (shortest first).
pub fn exhaustive(max_ops: usize) -> impl Iterator<Item = Vec<Op>> {
    let menu = op_menu();
    let steps: Vec<Vec<Op>> = menu
        .iter()
        .flat_map(|op| {
            persist_variants(op).into_iter().map(move |p| {
                let mut v = vec![op.clone()];
                v.extend(p);
                v
            })
        })
        .collect();
    let n = steps.len();
    (1..=max_ops).flat_map(move |len| {
        let steps = steps.clone();
        (0..n.pow(len as u32)).map(move |mut idx| {
            let mut w = Vec::new();
            for _ in 0..len {
                w.extend(steps[idx % n].iter().cloned());
                idx /= n;
            }
            w
        })
    })
}

/// How many workloads [`exhaustive`] yields.
pub fn exhaustive_count(max_ops: usize) -> u64 {
    let n: u64 = op_menu()
        .iter()
        .map(|o| persist_variants(o).len() as u64)
        .sum();
    (1..=max_ops as u32).map(|l| n.pow(l)).sum()
}

/// A random workload of `len` operations (with random persistence).
pub fn random_workload(rng: &mut Rng, len: usize) -> Vec<Op> {
    let menu = op_menu();
    let mut w = Vec::new();
    for _ in 0..len {
        let op = menu[rng.below(menu.len() as u64) as usize].clone();
        let p = persist_variants(&op);
        let pick = p[rng.below(p.len() as u64) as usize].clone();
        w.push(op);
        w.extend(pick);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_and_crashes_round_trip_as_text() {
        let w = random_workload(&mut Rng::new(5), 20);
        assert_eq!(parse_ops(&format_ops(&w)).unwrap(), w);
        for s in ["3:0,2,5:torn=2.7", "0:-", "12:1"] {
            assert_eq!(s.parse::<Crash>().unwrap().to_string(), s);
        }
        assert!("x".parse::<Crash>().is_err());
        assert!(parse_ops("frob(A)").is_err());
    }

    #[test]
    fn model_follows_posix_rename_rules() {
        let mut m = Model::base();
        assert_eq!(
            m.apply(&"rename(D,D/X)".parse().unwrap(), 0),
            Err(libc::EINVAL)
        );
        assert_eq!(
            m.apply(&"rename(A,D)".parse().unwrap(), 0),
            Err(libc::EISDIR)
        );
        assert_eq!(
            m.apply(&"rmdir(D)".parse().unwrap(), 0),
            Err(libc::ENOTEMPTY)
        );
        m.apply(&"rename(D,E)".parse().unwrap(), 0).unwrap();
        assert!(m.paths.contains_key("E/C") && !m.paths.contains_key("D/C"));
    }

    #[test]
    fn a_few_workloads_survive_every_planned_crash() {
        let h = Harness::new().unwrap();
        let mut sum = Summary::default();
        let mut rng = Rng::new(1);
        for w in [
            "create(B);fsync(B);write(B,0,71680);sync",
            "rename(A,D/C);sync;unlink(D/C)",
            "truncate(A,0);write(D/C,153600,204800);fsync(D/C)",
        ] {
            h.run_workload(&parse_ops(w).unwrap(), 40, None, &mut rng, &mut sum);
        }
        assert!(sum.failures.is_empty(), "{:#?}", sum.failures);
        assert!(sum.states >= 30, "{sum:?}");
        assert!(
            sum.replayed > 0,
            "some crash states must need a replay: {sum:?}"
        );
    }
}

/// What [`multi_host`] checked.
#[derive(Debug, Default)]
pub struct MultiSummary {
    pub states: usize,
    pub files_checked: usize,
    pub replays: usize,
}

/// The multi-host workload under the recording LUN: `hosts` hosts mounted
/// at once (each with its heartbeat, lease and volume lock, in this
/// process) create, write and unlink files in one directory, fsync after
/// each step, and the run ends as a crash of all of them. Every crash state
/// of the log — at each flush, with the writes in flight all landed or all
/// lost — must open (replaying every host's journal), fsck clean, and hold
/// every file whose fsync returned (and none whose removal's fsync
/// returned), with its exact contents.
pub fn multi_host(hosts: usize, ops: usize, seed: u64) -> anyhow::Result<MultiSummary> {
    let mems: Vec<Arc<MemLun>> = LUN_SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| Arc::new(MemLun::new(&format!("multi-lun{i}"), n)))
        .collect();
    let fs = Fs::mkfs(
        mems.iter().map(|m| m.clone() as Arc<dyn Lun>).collect(),
        &MkfsOptions {
            label: "multihost".into(),
            block_size: 64 << 10,
            max_hosts: 8,
            journal_blocks: 256,
            ..Default::default()
        },
    )?;
    fs.unmount()?;
    drop(fs);
    let t = vmfs::cluster::Timeouts::new(Some(50), Some(800))?;
    let uuid = |h: usize| {
        let mut u = [0u8; 16];
        u[0] = 0x42;
        u[15] = h as u8 + 1;
        u
    };
    // The hosts mount together once before the recording, so that each
    // slot has its journal: a journal is allocated at a slot's first mount,
    // which a crash may leak (fsck --repair's job). (One after another,
    // each would take the slot the one before left, journal and all.)
    let first: Vec<Fs> = (0..hosts)
        .map(|h| {
            Fs::mount(
                mems.iter().map(|m| m.clone() as Arc<dyn Lun>).collect(),
                uuid(h),
                t,
            )
        })
        .collect::<vmfs::Result<_>>()?;
    for fs in first {
        fs.unmount()?;
    }
    let bases: Vec<Vec<u8>> = mems.iter().map(|m| m.snapshot()).collect();
    let log: WriteLog = Arc::new(std::sync::Mutex::new(Vec::new()));
    let live: Vec<Arc<dyn Lun>> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let m = Arc::new(MemLun::from_bytes(&format!("multi-lun{i}"), b.clone()));
            Arc::new(RecordingLun::new(m, i, log.clone())) as Arc<dyn Lun>
        })
        .collect();
    let data = |h: usize, k: usize| -> Vec<u8> {
        let len = [100usize, 5000, 70_000][(k + h) % 3];
        (0..len)
            .map(|j| (j * 13 + k * 7 + h * 29 + seed as usize) as u8)
            .collect()
    };
    // Marks: bit 63 = removal fsynced, bit 62 = removal started, then
    // host << 16 | k; no flag: created, written and fsynced.
    let mark = |log: &WriteLog, m: u64| {
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event::Mark(m))
    };
    let mut mounted = Vec::new();
    for h in 0..hosts {
        mounted.push(Fs::mount(live.clone(), uuid(h), t)?);
    }
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = mounted
            .iter()
            .enumerate()
            .map(|(h, fs)| {
                let log = log.clone();
                s.spawn(move || -> anyhow::Result<()> {
                    let root = fs.root();
                    let mut rng = Rng::new(seed ^ (h as u64 + 1) * 0x9e37_79b9);
                    let mut mine: Vec<usize> = Vec::new();
                    for k in 0..ops {
                        if !mine.is_empty() && rng.below(4) == 0 {
                            let j = mine.remove(rng.below(mine.len() as u64) as usize);
                            // From here a crash may or may not keep the file.
                            mark(&log, 1 << 62 | (h as u64) << 16 | j as u64);
                            fs.unlink(root, format!("h{h}-{j}").as_bytes(), false)?;
                            fs.sync()?;
                            mark(&log, 1 << 63 | (h as u64) << 16 | j as u64);
                            continue;
                        }
                        let i = fs.create(
                            root,
                            format!("h{h}-{k}").as_bytes(),
                            libc::S_IFREG | 0o644,
                            0,
                            0,
                            0,
                            None,
                        )?;
                        fs.write(i.addr, 0, &data(h, k))?;
                        fs.sync()?;
                        mark(&log, (h as u64) << 16 | k as u64);
                        mine.push(k);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().expect("host thread")?;
        }
        Ok(())
    })?;
    for fs in &mounted {
        fs.abandon(); // all hosts crash together
    }
    drop(mounted);
    let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut sum = MultiSummary::default();
    for b in crash_points(&log) {
        let pend: std::collections::HashSet<usize> = pending(&log, b).into_iter().collect();
        for keep_in_flight in [true, false] {
            let imgs: Vec<CowLun> = bases
                .iter()
                .enumerate()
                .map(|(i, bb)| {
                    CowLun::new(Arc::new(MemLun::from_bytes(
                        &format!("multi-lun{i}"),
                        bb.clone(),
                    )))
                })
                .collect();
            for (i, e) in log[..b].iter().enumerate() {
                if keep_in_flight || !pend.contains(&i) {
                    apply_event(&imgs, e)?;
                }
            }
            let luns: Vec<Arc<dyn Lun>> = imgs
                .into_iter()
                .map(|l| Arc::new(l) as Arc<dyn Lun>)
                .collect();
            let fs = Fs::open(luns).map_err(|e| {
                anyhow::anyhow!("crash at log {b}: mount (journal replay) failed: {e}")
            })?;
            sum.replays += fs.replays().len();
            let r = vmfs::fsck::check(&fs, false, None)?;
            if !r.errors.is_empty() {
                anyhow::bail!(
                    "crash at log {b} (in flight kept: {keep_in_flight}): fsck: {}",
                    r.errors.join("; ")
                );
            }
            // What the fsyncs before the crash promised.
            // Some(true): must be there; Some(false): must be gone; None: either.
            let mut want: std::collections::BTreeMap<(usize, usize), Option<bool>> =
                Default::default();
            for e in &log[..b] {
                if let Event::Mark(m) = e {
                    let (h, k) = (((m >> 16) & 0xffff) as usize, (m & 0xffff) as usize);
                    let v = match m >> 62 {
                        0 => Some(true),
                        1 => None,
                        _ => Some(false),
                    };
                    want.insert((h, k), v);
                }
            }
            let root = fs.root();
            for ((h, k), present) in want {
                let name = format!("h{h}-{k}");
                let found = fs.lookup(root, name.as_bytes());
                let present = match (present, &found) {
                    (Some(p), _) => p,
                    (None, Ok(_)) => true,
                    (None, Err(_)) => false,
                };
                match (found, present) {
                    (Ok(i), true) => {
                        let got = fs.read(i.addr, 0, i.size as usize + 1)?;
                        if got != data(h, k) {
                            anyhow::bail!("crash at log {b}: {name} has other contents than its fsync promised");
                        }
                        sum.files_checked += 1;
                    }
                    (Err(_), false) => {}
                    (Ok(_), false) => anyhow::bail!(
                        "crash at log {b}: {name} is back after its removal was fsynced"
                    ),
                    (Err(e), true) => {
                        if std::env::var_os("VMFS_CRASH_DEBUG").is_some() {
                            for (i, e) in log[..b].iter().enumerate() {
                                match e {
                                    Event::Write { lun, offset, data } => {
                                        eprintln!("{i}: write lun{lun} {offset:#x} +{}", data.len())
                                    }
                                    other => eprintln!("{i}: {other:?}"),
                                }
                            }
                            eprintln!(
                                "root: {:?}",
                                fs.readdir(root).map(|v| v
                                    .iter()
                                    .map(|d| String::from_utf8_lossy(&d.name).to_string())
                                    .collect::<Vec<_>>())
                            );
                        }
                        anyhow::bail!("crash at log {b}: {name} was fsynced but is gone: {e}")
                    }
                }
            }
            fs.abandon();
            sum.states += 1;
        }
    }
    Ok(sum)
}
