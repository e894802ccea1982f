//! A read-only NBD server for the exports (`vmfs backup attach --nbd`):
//! what lets `qemu-img convert nbd://…`, `nbdcopy` or `nbd-client` read a
//! VM's frozen disks.
//!
//! Fixed newstyle handshake only (no oldstyle, no TLS): `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`,
//! `NBD_OPT_STRUCTURED_REPLY` and the `base:allocation` meta context
//! (`NBD_OPT_LIST/SET_META_CONTEXT`), so that a client asks where the data
//! is (`NBD_CMD_BLOCK_STATUS`) and reads only that; structured reads send
//! holes as `NBD_REPLY_TYPE_OFFSET_HOLE`. Transmission: READ, BLOCK_STATUS,
//! FLUSH and CACHE (nothing to do), DISC; WRITE, TRIM and WRITE_ZEROES get
//! EPERM (the export is read-only, and says so). A connection is a thread
//! answering its requests in order; several connections may read at once
//! (`NBD_FLAG_CAN_MULTI_CONN`: nothing changes under them).
//!
//! Every malformed message ends that connection with an error in the log
//! (an option we do not know gets `NBD_REP_ERR_UNSUP`, as the protocol
//! asks); nothing a client sends can panic the server or make it allocate
//! more than one request's data (32 MiB). Protocol reference: the NBD
//! project's `doc/proto.md`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lun::nbd_proto::*;

use crate::error::{BackupError, Result};
use crate::export::Export;

/// The largest READ or BLOCK_STATUS length served (what we advertise as
/// the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest option payload read (names and queries are short).
const MAX_OPTION: u32 = 64 << 10;
/// The largest WRITE payload swallowed before refusing it; past it the
/// connection ends.
const MAX_WRITE: u32 = 64 << 20;
/// Block-status descriptors per reply.
const MAX_DESCRIPTORS: usize = 4096;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The id of `base:allocation` on every connection.
const BASE_ALLOCATION_ID: u32 = 1;
const BASE_ALLOCATION: &str = "base:allocation";

type IoResult<T> = std::io::Result<T>;

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_u32(r: &mut impl Read) -> IoResult<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> IoResult<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Read and drop `n` bytes.
fn discard(r: &mut impl Read, n: u64) -> IoResult<()> {
    let got = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
    if got < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// What the handshake settled.
struct Session {
    export: usize,
    structured: bool,
    allocation: bool,
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> IoResult<()> {
    w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)
}

/// A name and what follows it in an option: `u32 length, name`.
fn name_in(data: &[u8]) -> Option<(String, &[u8])> {
    let n = u32_at(data, 0)? as usize;
    let name = data.get(4..4usize.checked_add(n)?)?;
    Some((String::from_utf8_lossy(name).into_owned(), &data[4 + n..]))
}

fn transmission_flags(structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

/// The handshake: options until one starts transmission (`Some`), or the
/// client leaves (`None`).
fn handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &[Export],
) -> IoResult<Option<Session>> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let cflags = read_u32(r)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(bad(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export (index) `base:allocation` was selected for.
    let mut meta: Option<usize> = None;
    let find = |name: &str| {
        // The default export ("") is the first.
        if name.is_empty() && !exports.is_empty() {
            return Some(0);
        }
        exports.iter().position(|e| e.name == name)
    };
    let unknown = |name: &str| {
        format!(
            "no export named {name:?} (exports: {})",
            exports
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(bad("an option without the IHAVEOPT magic"));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            return Err(bad(format!("option {opt} of {len} bytes: too large")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(k) = find(&name) else {
                    // This option has no error reply: the connection ends.
                    return Err(bad(unknown(&name)));
                };
                w.write_all(&exports[k].map.size().to_be_bytes())?;
                w.write_all(&transmission_flags(structured).to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                return Ok(Some(Session {
                    export: k,
                    structured,
                    allocation: structured && meta == Some(k),
                }));
            }
            OPT_ABORT => {
                let _ = opt_reply(w, opt, REP_ACK, &[]);
                let _ = w.flush();
                return Ok(None);
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    for e in exports {
                        let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(e.name.as_bytes());
                        opt_reply(w, opt, REP_SERVER, &d)?;
                    }
                    opt_reply(w, opt, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let parsed = name_in(&data).and_then(|(name, rest)| {
                    let n = u16_at(rest, 0)? as usize;
                    let infos: Option<Vec<u16>> = (0..n).map(|i| u16_at(rest, 2 + 2 * i)).collect();
                    let infos = infos?;
                    (rest.len() == 2 + 2 * n).then_some((name, infos))
                });
                let Some((name, infos)) = parsed else {
                    opt_reply(w, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
                    w.flush()?;
                    continue;
                };
                let Some(k) = find(&name) else {
                    opt_reply(w, opt, REP_ERR_UNKNOWN, unknown(&name).as_bytes())?;
                    w.flush()?;
                    continue;
                };
                let e = &exports[k];
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&e.map.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(structured).to_be_bytes());
                opt_reply(w, opt, REP_INFO, &d)?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&4096u32.to_be_bytes());
                    d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    opt_reply(w, opt, REP_INFO, &d)?;
                }
                if infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    opt_reply(w, opt, REP_INFO, &d)?;
                }
                opt_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
                if opt == OPT_GO {
                    return Ok(Some(Session {
                        export: k,
                        structured,
                        allocation: structured && meta == Some(k),
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    structured = true;
                    opt_reply(w, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                let parsed = name_in(&data).and_then(|(name, rest)| {
                    let n = u32_at(rest, 0)? as usize;
                    let mut q = Vec::new();
                    let mut at = &rest[4..];
                    for _ in 0..n {
                        let (s, more) = name_in(at)?;
                        q.push(s);
                        at = more;
                    }
                    at.is_empty().then_some((name, q))
                });
                if set && !structured {
                    opt_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first",
                    )?;
                } else if let Some((name, queries)) = parsed {
                    if let Some(k) = find(&name) {
                        let ours = if set {
                            queries.iter().any(|q| q == BASE_ALLOCATION)
                        } else {
                            queries.is_empty()
                                || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                        };
                        if ours {
                            let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                            opt_reply(w, opt, REP_META_CONTEXT, &d)?;
                        }
                        if set {
                            meta = ours.then_some(k);
                        }
                        opt_reply(w, opt, REP_ACK, &[])?;
                    } else {
                        opt_reply(w, opt, REP_ERR_UNKNOWN, unknown(&name).as_bytes())?;
                    }
                } else {
                    opt_reply(w, opt, REP_ERR_INVALID, b"malformed meta context option")?;
                }
            }
            OPT_STARTTLS => {
                opt_reply(
                    w,
                    opt,
                    REP_ERR_UNSUP,
                    b"no TLS: reach this server over a UNIX socket or a trusted network",
                )?;
            }
            _ => opt_reply(w, opt, REP_ERR_UNSUP, &[])?,
        }
        w.flush()?;
    }
}

fn simple_reply(w: &mut impl Write, cookie: u64, error: u32) -> IoResult<()> {
    w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&error.to_be_bytes())?;
    w.write_all(&cookie.to_be_bytes())
}

fn chunk(w: &mut impl Write, cookie: u64, done: bool, kind: u16, len: usize) -> IoResult<()> {
    w.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&(if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&cookie.to_be_bytes())?;
    w.write_all(&(len as u32).to_be_bytes())
}

/// An error reply in either form.
fn error_reply(
    w: &mut impl Write,
    s: &Session,
    cookie: u64,
    error: u32,
    msg: &str,
) -> IoResult<()> {
    if !s.structured {
        return simple_reply(w, cookie, error);
    }
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    chunk(w, cookie, true, REPLY_ERROR, 6 + msg.len())?;
    w.write_all(&error.to_be_bytes())?;
    w.write_all(&(msg.len() as u16).to_be_bytes())?;
    w.write_all(msg)
}

/// Transmission: requests until DISC or the connection ends.
fn transmission(r: &mut impl Read, w: &mut impl Write, e: &Export, s: &Session) -> IoResult<()> {
    let size = e.map.size();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            // A client that closes without NBD_CMD_DISC.
            Err(x) if x.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(x) => return Err(x),
        }
        let f = |a: usize, b: usize| &h[a..b];
        let magic = u32::from_be_bytes(f(0, 4).try_into().unwrap_or_default());
        if magic != REQUEST_MAGIC {
            return Err(bad(format!("a request with magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes(f(4, 6).try_into().unwrap_or_default());
        let kind = u16::from_be_bytes(f(6, 8).try_into().unwrap_or_default());
        let cookie = u64::from_be_bytes(f(8, 16).try_into().unwrap_or_default());
        let off = u64::from_be_bytes(f(16, 24).try_into().unwrap_or_default());
        let len = u32::from_be_bytes(f(24, 28).try_into().unwrap_or_default());
        let in_range = len > 0 && off.checked_add(len as u64).is_some_and(|end| end <= size);
        match kind {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                if !in_range || len > MAX_REQUEST {
                    error_reply(
                        w,
                        s,
                        cookie,
                        EINVAL,
                        "read out of range (or longer than 32 MiB)",
                    )?;
                } else {
                    let n = len as usize;
                    buf.clear();
                    buf.resize(n, 0);
                    // Only what may hold data is read; the rest stays zero.
                    let ext = e.map.extents(off, len as u64, usize::MAX);
                    let mut at = 0usize;
                    let mut failed = None;
                    for &(l, data) in &ext {
                        if data {
                            if let Err(x) = e
                                .image
                                .read_at(&mut buf[at..at + l as usize], off + at as u64)
                            {
                                failed = Some(x);
                                break;
                            }
                        }
                        at += l as usize;
                    }
                    if let Some(x) = failed {
                        tracing::error!("NBD export {}: read at {off}: {x}", e.name);
                        error_reply(w, s, cookie, EIO, &format!("read at {off}: {x}"))?;
                    } else if !s.structured {
                        simple_reply(w, cookie, 0)?;
                        w.write_all(&buf)?;
                    } else if flags & CMDF_DF != 0 || ext.len() == 1 && ext[0].1 {
                        chunk(w, cookie, true, REPLY_OFFSET_DATA, 8 + n)?;
                        w.write_all(&off.to_be_bytes())?;
                        w.write_all(&buf)?;
                    } else {
                        let mut at = 0usize;
                        for (i, &(l, data)) in ext.iter().enumerate() {
                            let last = i + 1 == ext.len();
                            let o = off + at as u64;
                            if data {
                                chunk(w, cookie, last, REPLY_OFFSET_DATA, 8 + l as usize)?;
                                w.write_all(&o.to_be_bytes())?;
                                w.write_all(&buf[at..at + l as usize])?;
                            } else {
                                chunk(w, cookie, last, REPLY_OFFSET_HOLE, 12)?;
                                w.write_all(&o.to_be_bytes())?;
                                w.write_all(&(l as u32).to_be_bytes())?;
                            }
                            at += l as usize;
                        }
                    }
                }
            }
            CMD_BLOCK_STATUS => {
                if !s.allocation {
                    error_reply(w, s, cookie, EINVAL, "no meta context was negotiated")?;
                } else if !in_range {
                    error_reply(w, s, cookie, EINVAL, "block status out of range")?;
                } else {
                    let max = if flags & CMDF_REQ_ONE != 0 {
                        1
                    } else {
                        MAX_DESCRIPTORS
                    };
                    let ext = e.map.extents(off, len as u64, max);
                    chunk(w, cookie, true, REPLY_BLOCK_STATUS, 4 + 8 * ext.len())?;
                    w.write_all(&BASE_ALLOCATION_ID.to_be_bytes())?;
                    for (l, data) in ext {
                        w.write_all(&(l as u32).to_be_bytes())?;
                        let st = if data { 0 } else { STATE_HOLE | STATE_ZERO };
                        w.write_all(&st.to_be_bytes())?;
                    }
                }
            }
            CMD_FLUSH | CMD_CACHE => {
                if s.structured {
                    chunk(w, cookie, true, REPLY_NONE, 0)?;
                } else {
                    simple_reply(w, cookie, 0)?;
                }
            }
            CMD_WRITE => {
                if len > MAX_WRITE {
                    return Err(bad(format!("a write of {len} bytes to a read-only export")));
                }
                discard(r, len as u64)?;
                error_reply(w, s, cookie, EPERM, "the export is read-only")?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                error_reply(w, s, cookie, EPERM, "the export is read-only")?;
            }
            _ => error_reply(w, s, cookie, EINVAL, "unknown command")?,
        }
        w.flush()?;
        // One large read does not pin its buffer for the connection's life.
        if buf.capacity() > 4 << 20 {
            buf = Vec::new();
        }
    }
}

/// Serve one connection (reading `r`, writing `w`) to its end: Ok when the
/// client left as the protocol allows, Err naming what was wrong.
pub fn serve_connection(r: impl Read, w: impl Write, exports: &[Export]) -> IoResult<()> {
    serve_connection_then(r, w, exports, || {})
}

/// [`serve_connection`], calling `negotiated` once the handshake is over
/// (the server lifts the handshake's time limit there).
fn serve_connection_then(
    r: impl Read,
    w: impl Write,
    exports: &[Export],
    negotiated: impl FnOnce(),
) -> IoResult<()> {
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let Some(s) = handshake(&mut r, &mut w, exports)? else {
        return Ok(());
    };
    negotiated();
    transmission(&mut r, &mut w, &exports[s.export], &s)
}

/// Where the server listens.
#[derive(Debug, Clone)]
enum Addr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        };
    }
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// A running server: accepting on one thread, a thread per connection.
pub struct NbdServer {
    addr: Addr,
    names: Vec<String>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<(Conn, Option<JoinHandle<()>>)>>>,
    accept: Option<JoinHandle<()>>,
}

/// Parse `--nbd ADDR`: `unix:PATH` or a path (a UNIX socket), else
/// `HOST:PORT` (TCP; port 0 picks a free one).
fn parse_addr(a: &str) -> Result<Addr> {
    if let Some(p) = a.strip_prefix("unix:") {
        return Ok(Addr::Unix(PathBuf::from(p)));
    }
    if a.starts_with('/') || a.starts_with('.') {
        return Ok(Addr::Unix(PathBuf::from(a)));
    }
    let sa = a
        .to_socket_addrs()
        .map_err(|e| BackupError::Invalid(format!("--nbd {a}: not unix:PATH or HOST:PORT ({e})")))?
        .next()
        .ok_or_else(|| BackupError::Invalid(format!("--nbd {a}: no address")))?;
    Ok(Addr::Tcp(sa))
}

/// Run `f` (which creates a file) with umask 077: the file is never open
/// to other users, not even between its creation and a chmod.
pub fn with_private_umask<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o077) };
    let r = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r
}

impl NbdServer {
    /// Listen on `addr` (see [`parse_addr`]) and serve `exports`.
    pub fn start(addr: &str, exports: Vec<Export>) -> Result<NbdServer> {
        let err = |e: std::io::Error| BackupError::Invalid(format!("NBD server on {addr}: {e}"));
        let mut parsed = parse_addr(addr)?;
        let listener = match &parsed {
            Addr::Unix(p) => {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if !m.file_type().is_socket() {
                        return Err(BackupError::Invalid(format!(
                            "NBD server on {}: it exists and is not a socket",
                            p.display()
                        )));
                    }
                    if UnixStream::connect(p).is_ok() {
                        return Err(BackupError::Invalid(format!(
                            "NBD server on {}: another server listens there",
                            p.display()
                        )));
                    }
                    // Left by a server that was killed.
                    let _ = std::fs::remove_file(p);
                }
                // The disks' contents: the owner (root) only, from the start.
                let l = with_private_umask(|| UnixListener::bind(p)).map_err(err)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                Listener::Unix(l)
            }
            Addr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(err)?;
                parsed = Addr::Tcp(l.local_addr().map_err(err)?);
                l.set_nonblocking(true).map_err(err)?;
                Listener::Tcp(l)
            }
        };
        let names = exports.iter().map(|e| e.name.clone()).collect();
        let exports = Arc::new(exports);
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<(Conn, Option<JoinHandle<()>>)>>> = Arc::default();
        let (st, cs) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, exports, st, cs))
            .map_err(err)?;
        tracing::info!("NBD server on {addr}: exports {:?}", &names);
        Ok(NbdServer {
            addr: parsed,
            names,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// Each export's NBD URI (what `qemu-img` and `nbdcopy` take).
    pub fn uris(&self) -> Vec<String> {
        self.names
            .iter()
            .map(|n| match &self.addr {
                Addr::Unix(p) => format!("nbd+unix:///{n}?socket={}", p.display()),
                Addr::Tcp(a) => format!("nbd://{a}/{n}"),
            })
            .collect()
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| t.as_ref().is_some_and(|t| !t.is_finished()))
            .count()
    }

    /// Stop listening, end every connection and wait for their threads
    /// (after this no export's image is used any more).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for (c, _) in &conns {
            c.shutdown();
        }
        for (_, t) in conns {
            if let Some(t) = t {
                let _ = t.join();
            }
        }
        if let Addr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    l: Listener,
    exports: Arc<Vec<Export>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<(Conn, Option<JoinHandle<()>>)>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let got = match &l {
            Listener::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok((
                    Conn::Unix(s.try_clone()?),
                    Conn::Unix(s.try_clone()?),
                    Box::new(s.try_clone()?) as Box<dyn Read + Send>,
                    Box::new(s) as Box<dyn Write + Send>,
                ))
            }),
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                Ok((
                    Conn::Tcp(s.try_clone()?),
                    Conn::Tcp(s.try_clone()?),
                    Box::new(s.try_clone()?) as Box<dyn Read + Send>,
                    Box::new(s) as Box<dyn Write + Send>,
                ))
            }),
        };
        match got {
            Ok((conn, own, r, w)) => {
                let mut cs = conns.lock().unwrap_or_else(|p| p.into_inner());
                // Forget connections that ended.
                cs.retain_mut(|(_, t)| {
                    if t.as_ref().is_some_and(|t| t.is_finished()) {
                        if let Some(t) = t.take() {
                            let _ = t.join();
                        }
                        return false;
                    }
                    true
                });
                if cs.len() >= MAX_CONNECTIONS {
                    tracing::warn!("NBD: {MAX_CONNECTIONS} connections already: one more refused");
                    conn.shutdown();
                    continue;
                }
                let ex = exports.clone();
                let t = std::thread::Builder::new()
                    .name("nbd-conn".into())
                    .spawn(move || {
                        // A client that never finishes its handshake does not
                        // keep one of the connections for ever.
                        own.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
                        let r = serve_connection_then(r, w, &ex, || own.set_read_timeout(None));
                        if let Err(e) = r {
                            if e.kind() != std::io::ErrorKind::BrokenPipe
                                && e.kind() != std::io::ErrorKind::ConnectionReset
                            {
                                tracing::warn!("NBD connection ended: {e}");
                            }
                        }
                        // Closed now (the client waits for it after DISC), not
                        // when the list of connections lets go of its copy.
                        own.shutdown();
                    });
                match t {
                    Ok(t) => cs.push((conn, Some(t))),
                    Err(e) => {
                        tracing::error!("NBD: cannot start a connection's thread: {e}");
                        conn.shutdown();
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("NBD: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{DataMap, ReadImage};

    struct Pattern(u64);
    impl ReadImage for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let p = off + i as u64;
                *b = if p < self.0 { (p % 251) as u8 | 1 } else { 0 };
            }
            Ok(())
        }
    }

    fn exports() -> Vec<Export> {
        vec![Export {
            name: "d0".into(),
            image: Arc::new(Pattern(1 << 20)),
            map: Arc::new(DataMap::new(1 << 20, vec![4096..8192, 65536..131072])),
        }]
    }

    fn opt(v: &mut Vec<u8>, o: u32, data: &[u8]) {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    }

    fn req(v: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, off: u64, len: u32) {
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
    }

    fn run(input: &[u8]) -> (IoResult<()>, Vec<u8>) {
        let mut out = Vec::new();
        let r = serve_connection(input, &mut out, &exports());
        (r, out)
    }

    #[test]
    fn export_name_then_simple_read() {
        let mut i = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        opt(&mut i, OPT_EXPORT_NAME, b"d0");
        req(&mut i, 0, CMD_READ, 7, 4090, 10);
        req(&mut i, 0, CMD_WRITE, 8, 0, 3);
        i.extend_from_slice(b"abc");
        req(&mut i, 0, CMD_READ, 9, (1 << 20) - 4, 8);
        req(&mut i, 0, CMD_DISC, 10, 0, 0);
        let (r, o) = run(&i);
        r.unwrap();
        // 18 handshake + 8 size + 2 flags
        let t = &o[28..];
        assert_eq!(&t[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32_at(t, 4), Some(0));
        // 4090..4096 is a hole (zeros), 4096.. data.
        assert_eq!(&t[16..22], &[0; 6]);
        assert_eq!(t[22], (4096 % 251) as u8 | 1);
        let t = &t[26..];
        assert_eq!(u32_at(t, 4), Some(EPERM));
        let t = &t[16..];
        assert_eq!(u32_at(t, 4), Some(EINVAL));
    }

    #[test]
    fn go_structured_block_status_and_holes() {
        let mut i = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        opt(&mut i, OPT_LIST, &[]);
        opt(&mut i, OPT_STRUCTURED_REPLY, &[]);
        let mut m = 2u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"d0");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        opt(&mut i, OPT_SET_META_CONTEXT, &m);
        let mut g = 5u32.to_be_bytes().to_vec();
        g.extend_from_slice(b"nosuch");
        g.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut i, OPT_GO, &g[..]); // malformed: length says 5, name is 6
        let mut g = 2u32.to_be_bytes().to_vec();
        g.extend_from_slice(b"d0");
        g.extend_from_slice(&1u16.to_be_bytes());
        g.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        opt(&mut i, OPT_GO, &g);
        req(&mut i, 0, CMD_BLOCK_STATUS, 1, 0, 1 << 17);
        req(&mut i, 0, CMD_READ, 2, 0, 8192);
        req(&mut i, 0, CMD_DISC, 3, 0, 0);
        let (r, o) = run(&i);
        r.unwrap();
        let find = |magic: &[u8]| {
            o.windows(magic.len())
                .position(|w| w == magic)
                .expect("reply")
        };
        let p = find(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let t = &o[p..];
        assert_eq!(u16_at(t, 6), Some(REPLY_BLOCK_STATUS));
        // hole 0..4096, data ..8192, hole ..65536, data ..131072
        let n = u32_at(t, 16).unwrap() as usize;
        assert_eq!(n, 4 + 8 * 4);
        let d = &t[24..];
        assert_eq!(u32_at(d, 0), Some(4096));
        assert_eq!(u32_at(d, 4), Some(STATE_HOLE | STATE_ZERO));
        assert_eq!(u32_at(d, 8), Some(4096));
        assert_eq!(u32_at(d, 12), Some(0));
        // The read: a hole chunk, then a data chunk marked done.
        let t = &t[20 + n..];
        assert_eq!(u16_at(t, 6), Some(REPLY_OFFSET_HOLE));
        assert_eq!(u16_at(t, 4), Some(0));
        let t = &t[20 + 12..];
        assert_eq!(u16_at(t, 6), Some(REPLY_OFFSET_DATA));
        assert_eq!(u16_at(t, 4), Some(REPLY_FLAG_DONE));
        assert_eq!(u32_at(t, 16), Some(8 + 4096));
    }

    /// The default export ("") named in SET_META_CONTEXT and GO: block
    /// status works (the context is the export's, whatever it was called).
    #[test]
    fn the_default_export_keeps_its_meta_context() {
        let mut i = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        opt(&mut i, OPT_STRUCTURED_REPLY, &[]);
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        opt(&mut i, OPT_SET_META_CONTEXT, &m);
        let mut g = 0u32.to_be_bytes().to_vec();
        g.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut i, OPT_GO, &g);
        req(&mut i, CMDF_REQ_ONE, CMD_BLOCK_STATUS, 1, 0, 8192);
        req(&mut i, 0, CMD_DISC, 2, 0, 0);
        let (r, o) = run(&i);
        r.unwrap();
        let p = o
            .windows(4)
            .position(|w| w == STRUCTURED_REPLY_MAGIC.to_be_bytes())
            .expect("a structured reply");
        let t = &o[p..];
        assert_eq!(u16_at(t, 6), Some(REPLY_BLOCK_STATUS));
        // One descriptor (REQ_ONE): the hole at 0..4096.
        assert_eq!(u32_at(t, 16), Some(4 + 8));
        assert_eq!(u32_at(t, 24), Some(4096));
        assert_eq!(u32_at(t, 28), Some(STATE_HOLE | STATE_ZERO));
    }

    #[test]
    fn garbage_ends_the_connection_without_panic() {
        for input in [
            &b""[..],
            &[0, 0, 0, 4][..],
            &[0, 0, 0, 3, 1, 2, 3][..],
            &[
                0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0xff, 0xff, 0xff, 0xff,
                0x7f, 0xff, 0xff, 0xff,
            ][..],
        ] {
            let (r, _) = run(input);
            assert!(r.is_err(), "{input:?}");
        }
        // An unknown option is refused, and the connection goes on.
        let mut i = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        opt(&mut i, 42, b"xyz");
        opt(&mut i, OPT_ABORT, &[]);
        let (r, o) = run(&i);
        r.unwrap();
        assert!(o.windows(4).any(|w| w == REP_ERR_UNSUP.to_be_bytes()));
    }
}
