//! An asynchronous NBD client of our own (tokio), behind the synchronous
//! [`Lun`] trait.
//!
//! Fixed newstyle handshake, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_GO` with the
//! export name, then transmission with many requests in flight on one
//! connection: each caller writes its request under a short write lock and
//! waits on a oneshot channel; one reader task reads replies (simple or
//! structured) and hands each to its waiter by cookie. FLUSH, FUA, TRIM and
//! WRITE_ZEROES are used when the server advertises them. Every malformed or
//! short reply ends the connection with an error naming what was wrong, and
//! every request in flight fails with it; nothing is retried silently.
//!
//! Protocol reference: the NBD protocol document (`doc/proto.md` of the NBD
//! project).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use crate::{check_range, Lun, LunError, NbdAddr, Result};

use crate::nbd_proto::*;
pub use crate::nbd_proto::{
    TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES,
};

/// The largest reply payload we accept; anything larger is a broken server.
const MAX_PAYLOAD: u32 = 64 << 20;
/// Requests are split at this size unless the server asks for less.
const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
type BoxStream = Box<dyn Stream>;

/// What the server told us about the export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub structured_replies: bool,
}

struct Pending {
    /// For reads: where the data goes (pre-zeroed, so holes need no work).
    buf: Vec<u8>,
    offset: u64,
    error: Option<LunError>,
    done: oneshot::Sender<std::result::Result<Vec<u8>, LunError>>,
}

struct Shared {
    name: String,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once the connection is dead: every later request fails with it.
    /// `true` when the server broke the protocol (not worth a new connection).
    dead: Mutex<Option<(String, bool)>>,
}

impl Shared {
    /// End the connection: every request in flight, and every later one,
    /// fails with `why`; as a protocol error when the server broke the
    /// protocol, else as a lost connection (which callers may retry on a
    /// new one).
    fn fail_all(&self, why: String, protocol: bool) {
        let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        if dead.is_none() {
            tracing::error!(lun = %self.name, "NBD connection lost: {why}");
            *dead = Some((why.clone(), protocol));
        }
        for (_, p) in self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = p.done.send(Err(self.error(&why, protocol)));
        }
    }

    fn error(&self, why: &str, protocol: bool) -> LunError {
        if protocol {
            proto(&self.name, why)
        } else {
            LunError::Disconnected {
                lun: self.name.clone(),
                what: why.to_string(),
            }
        }
    }
}

/// One connection to the server: its reply reader's state and its writer.
struct Conn {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<WriteHalf<BoxStream>>,
    /// Counts connections: a caller that saw connection `gen` fail asks for
    /// a new one only if it is still the current one.
    gen: u64,
}

/// A LUN reached over NBD.
pub struct NbdLun {
    name: String,
    addr: NbdAddr,
    export: String,
    conn: std::sync::RwLock<Arc<Conn>>,
    /// Held while connecting again, so that one caller does it.
    reconnecting: tokio::sync::Mutex<()>,
    /// A command is sent again on a new connection only within this long
    /// of being issued (see [`NbdLun::connect`]).
    io_timeout: std::time::Duration,
    info: ExportInfo,
    next_cookie: std::sync::atomic::AtomicU64,
    identity: String,
    rt: tokio::runtime::Runtime,
}

fn proto(name: &str, what: impl Into<String>) -> LunError {
    LunError::Protocol {
        lun: name.to_string(),
        what: what.into(),
    }
}

fn io_to_lun(name: &str, what: &str, e: std::io::Error) -> LunError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        LunError::Disconnected {
            lun: name.to_string(),
            what: format!("server closed the connection during {what}"),
        }
    } else {
        LunError::Disconnected {
            lun: name.to_string(),
            what: format!("{what}: {e}"),
        }
    }
}

async fn send_option(s: &mut BoxStream, name: &str, opt: u32, data: &[u8]) -> Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
        .await
        .map_err(|e| io_to_lun(name, "option send", e))
}

/// Read one option reply: (reply type, payload).
async fn read_option_reply(s: &mut BoxStream, name: &str, opt: u32) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)
        .await
        .map_err(|e| io_to_lun(name, "option reply", e))?;
    let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
    let ropt = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let rtype = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    if magic != OPT_REPLY_MAGIC {
        return Err(proto(
            name,
            format!("option reply magic {magic:#x}, expected {OPT_REPLY_MAGIC:#x}"),
        ));
    }
    if ropt != opt {
        return Err(proto(
            name,
            format!("reply for option {ropt} while waiting for option {opt}"),
        ));
    }
    if len > 1 << 20 {
        return Err(proto(name, format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)
        .await
        .map_err(|e| io_to_lun(name, "option reply payload", e))?;
    Ok((rtype, data))
}

async fn handshake(s: &mut BoxStream, name: &str, export: &str) -> Result<ExportInfo> {
    let mut h = [0u8; 18];
    s.read_exact(&mut h[..16])
        .await
        .map_err(|e| io_to_lun(name, "handshake", e))?;
    let m1 = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
    let m2 = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
    if m1 != NBDMAGIC {
        return Err(proto(name, format!("not an NBD server (greeting {m1:#x})")));
    }
    if m2 == OLDSTYLE_MAGIC {
        return Err(proto(
            name,
            "server speaks the old-style handshake; only fixed newstyle is supported",
        ));
    }
    if m2 != IHAVEOPT {
        return Err(proto(name, format!("unknown handshake magic {m2:#x}")));
    }
    s.read_exact(&mut h[16..18])
        .await
        .map_err(|e| io_to_lun(name, "handshake flags", e))?;
    let sflags = u16::from_be_bytes([h[16], h[17]]);
    if sflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto(
            name,
            "server does not support the fixed newstyle handshake",
        ));
    }
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (sflags & FLAG_NO_ZEROES));
    s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| io_to_lun(name, "client flags", e))?;

    send_option(s, name, OPT_STRUCTURED_REPLY, &[]).await?;
    let (rtype, _) = read_option_reply(s, name, OPT_STRUCTURED_REPLY).await?;
    let structured = rtype == REP_ACK;

    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, name, OPT_GO, &go).await?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_block: DEFAULT_MAX_REQUEST,
        structured_replies: structured,
    };
    let mut have_export = false;
    loop {
        let (rtype, data) = read_option_reply(s, name, OPT_GO).await?;
        match rtype {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let itype = u16::from_be_bytes([data[0], data[1]]);
                match itype {
                    INFO_EXPORT if data.len() == 12 => {
                        info.size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                        info.flags = u16::from_be_bytes([data[10], data[11]]);
                        have_export = true;
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        info.min_block =
                            u32::from_be_bytes(data[2..6].try_into().expect("4 bytes")).max(1);
                        info.preferred_block =
                            u32::from_be_bytes(data[6..10].try_into().expect("4 bytes"));
                        info.max_block =
                            u32::from_be_bytes(data[10..14].try_into().expect("4 bytes"));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(proto(
                            name,
                            format!("info {itype} with {} bytes", data.len()),
                        ));
                    }
                    _ => {} // informational items we did not ask for
                }
            }
            REP_INFO => return Err(proto(name, "empty NBD_REP_INFO")),
            t if t & REP_ERR_BIT != 0 => {
                let message = String::from_utf8_lossy(&data).into_owned();
                let _ = send_option(s, name, OPT_ABORT, &[]).await;
                return Err(LunError::Refused {
                    lun: name.to_string(),
                    what: format!("export {export:?} (reply {:#x})", t),
                    message: if message.is_empty() {
                        "no message".into()
                    } else {
                        message
                    },
                });
            }
            t => return Err(proto(name, format!("unexpected option reply type {t}"))),
        }
    }
    if !have_export {
        return Err(proto(
            name,
            "server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT",
        ));
    }
    if info.max_block == 0 || info.max_block > DEFAULT_MAX_REQUEST {
        info.max_block = DEFAULT_MAX_REQUEST;
    }
    Ok(info)
}

async fn reader_loop(mut r: ReadHalf<BoxStream>, shared: Arc<Shared>) {
    let (why, protocol) = match read_replies(&mut r, &shared).await {
        Ok(()) => ("server closed the connection".to_string(), false),
        Err(LunError::Protocol { what, .. }) => (what, true),
        Err(e) => (e.to_string(), false),
    };
    shared.fail_all(why, protocol);
}

async fn read_replies(r: &mut ReadHalf<BoxStream>, sh: &Shared) -> Result<()> {
    let name = sh.name.as_str();
    loop {
        let mut m = [0u8; 4];
        match r.read_exact(&mut m).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_to_lun(name, "reply", e)),
        }
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                r.read_exact(&mut h)
                    .await
                    .map_err(|e| io_to_lun(name, "simple reply", e))?;
                let errno = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8 bytes"));
                let mut p = sh
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&cookie)
                    .ok_or_else(|| {
                        proto(name, format!("simple reply for unknown cookie {cookie}"))
                    })?;
                if errno == 0 && !p.buf.is_empty() {
                    r.read_exact(&mut p.buf)
                        .await
                        .map_err(|e| io_to_lun(name, "read data", e))?;
                }
                let res = if errno != 0 {
                    Err(LunError::Remote {
                        lun: name.into(),
                        offset: p.offset,
                        errno,
                        message: errno_text(errno),
                    })
                } else {
                    Ok(std::mem::take(&mut p.buf))
                };
                let _ = p.done.send(res);
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                r.read_exact(&mut h)
                    .await
                    .map_err(|e| io_to_lun(name, "structured reply", e))?;
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let rtype = u16::from_be_bytes([h[2], h[3]]);
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8 bytes"));
                let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
                if len > MAX_PAYLOAD + 8 {
                    return Err(proto(
                        name,
                        format!("structured reply chunk of {len} bytes"),
                    ));
                }
                let mut payload = vec![0u8; len as usize];
                r.read_exact(&mut payload)
                    .await
                    .map_err(|e| io_to_lun(name, "structured reply payload", e))?;
                let mut pend = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
                let p = pend.get_mut(&cookie).ok_or_else(|| {
                    proto(
                        name,
                        format!("structured reply for unknown cookie {cookie}"),
                    )
                })?;
                apply_chunk(name, p, rtype, &payload)?;
                if flags & REPLY_FLAG_DONE != 0 {
                    let mut p = pend.remove(&cookie).expect("present above");
                    let res = match p.error.take() {
                        Some(e) => Err(e),
                        None => Ok(std::mem::take(&mut p.buf)),
                    };
                    let _ = p.done.send(res);
                }
            }
            other => return Err(proto(name, format!("reply magic {other:#x}"))),
        }
    }
}

fn apply_chunk(name: &str, p: &mut Pending, rtype: u16, payload: &[u8]) -> Result<()> {
    let within = |off: u64, len: u64, p: &Pending| -> Result<usize> {
        let start = off.checked_sub(p.offset).ok_or_else(|| {
            proto(
                name,
                format!("chunk at {off} before the request at {}", p.offset),
            )
        })?;
        if start + len > p.buf.len() as u64 {
            return Err(proto(
                name,
                format!(
                    "chunk at {off} (+{len}) beyond the request at {} (+{})",
                    p.offset,
                    p.buf.len()
                ),
            ));
        }
        Ok(start as usize)
    };
    match rtype {
        REPLY_NONE if payload.is_empty() => {}
        REPLY_OFFSET_DATA if payload.len() >= 8 => {
            let off = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
            let data = &payload[8..];
            let s = within(off, data.len() as u64, p)?;
            p.buf[s..s + data.len()].copy_from_slice(data);
        }
        REPLY_OFFSET_HOLE if payload.len() == 12 => {
            let off = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
            let len = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
            let s = within(off, len as u64, p)?;
            p.buf[s..s + len as usize].fill(0);
        }
        REPLY_ERROR | REPLY_ERROR_OFFSET if payload.len() >= 6 => {
            let errno = u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes"));
            let mlen = u16::from_be_bytes([payload[4], payload[5]]) as usize;
            let msg = payload
                .get(6..6 + mlen)
                .ok_or_else(|| proto(name, "error chunk shorter than its message"))?;
            let offset = if rtype == REPLY_ERROR_OFFSET {
                let o = payload
                    .get(6 + mlen..14 + mlen)
                    .ok_or_else(|| proto(name, "error chunk without offset"))?;
                u64::from_be_bytes(o.try_into().expect("8 bytes"))
            } else {
                p.offset
            };
            let mut message = errno_text(errno);
            if !msg.is_empty() {
                message = format!("{message}: {}", String::from_utf8_lossy(msg));
            }
            p.error.get_or_insert(LunError::Remote {
                lun: name.into(),
                offset,
                errno,
                message,
            });
        }
        t if t & 0x8000 != 0 => {
            p.error.get_or_insert(LunError::Remote {
                lun: name.into(),
                offset: p.offset,
                errno: 5,
                message: format!("unknown error chunk type {t}"),
            });
        }
        t => {
            return Err(proto(
                name,
                format!(
                    "structured reply chunk type {t} with {} bytes",
                    payload.len()
                ),
            ))
        }
    }
    Ok(())
}

fn errno_text(e: u32) -> String {
    match e {
        1 => "EPERM".into(),
        5 => "EIO".into(),
        12 => "ENOMEM".into(),
        22 => "EINVAL".into(),
        28 => "ENOSPC".into(),
        75 => "EOVERFLOW".into(),
        95 => "ENOTSUP".into(),
        108 => "ESHUTDOWN".into(),
        n => format!("errno {n}"),
    }
}

/// Open a connection and negotiate the export.
async fn dial(addr: &NbdAddr, export: &str, name: &str) -> Result<(BoxStream, ExportInfo)> {
    let mut s: BoxStream =
        match addr {
            NbdAddr::Tcp { host, port } => {
                let t = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| LunError::Open {
                        lun: name.into(),
                        what: format!("cannot connect to {host}:{port}"),
                        cause: e,
                    })?;
                let _ = t.set_nodelay(true);
                Box::new(t)
            }
            NbdAddr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(
                |e| LunError::Open {
                    lun: name.into(),
                    what: format!("cannot connect to {}", p.display()),
                    cause: e,
                },
            )?),
        };
    let info = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        handshake(&mut s, name, export),
    )
    .await
    .map_err(|_| proto(name, "handshake timed out after 30 s"))??;
    Ok((s, info))
}

/// Start the reply reader of a new connection (on the current runtime).
fn start_conn(stream: BoxStream, name: &str, gen: u64) -> Conn {
    let (r, w) = tokio::io::split(stream);
    let shared = Arc::new(Shared {
        name: name.into(),
        pending: Mutex::new(HashMap::new()),
        dead: Mutex::new(None),
    });
    tokio::spawn(reader_loop(r, shared.clone()));
    Conn {
        shared,
        writer: tokio::sync::Mutex::new(w),
        gen,
    }
}

/// The I/O timeout of an NBD LUN when none is given.
pub const DEFAULT_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl NbdLun {
    /// Connect, negotiate, and start the reply reader.
    ///
    /// When the connection drops, a command is sent again on a new
    /// connection (negotiated again, the export must have the same size) as
    /// long as it is within `io_timeout` of being issued; after that it
    /// fails. Sending a WRITE again writes the same bytes again, so no
    /// write's effect is lost or doubled, and no command of a host reaches
    /// the server later than one I/O timeout after it was issued.
    pub fn connect(
        addr: NbdAddr,
        export: &str,
        name: &str,
        io_timeout: std::time::Duration,
    ) -> Result<NbdLun> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nbd-client")
            .enable_all()
            .build()
            .map_err(|e| LunError::Open {
                lun: name.into(),
                what: "cannot start the NBD runtime".into(),
                cause: e,
            })?;
        let conn = rt.block_on(async {
            let (stream, info) = dial(&addr, export, name).await?;
            Ok::<_, LunError>((start_conn(stream, name, 0), info))
        });
        let (conn, info) = conn?;
        let where_ = match &addr {
            NbdAddr::Tcp { host, port } => format!("{host}:{port}"),
            NbdAddr::Unix(p) => p.display().to_string(),
        };
        tracing::debug!(
            lun = name,
            size = info.size,
            flags = info.flags,
            "NBD export ready"
        );
        Ok(NbdLun {
            name: name.into(),
            addr,
            export: export.into(),
            conn: std::sync::RwLock::new(Arc::new(conn)),
            reconnecting: tokio::sync::Mutex::new(()),
            io_timeout,
            info,
            next_cookie: std::sync::atomic::AtomicU64::new(1),
            identity: format!("nbd:{where_}/{export}"),
            rt,
        })
    }

    fn current(&self) -> Arc<Conn> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Connection `seen` failed: connect again (once, whoever comes first),
    /// retrying until `deadline`.
    async fn reconnect(&self, seen: u64, deadline: std::time::Instant) -> Result<()> {
        let _one = self.reconnecting.lock().await;
        if self.current().gen != seen {
            return Ok(()); // another caller already did
        }
        let lost = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let attempt =
                tokio::time::timeout(left, dial(&self.addr, &self.export, &self.name)).await;
            match attempt {
                Ok(Ok((stream, info))) => {
                    if info.size != self.info.size {
                        return Err(proto(
                            &self.name,
                            format!(
                                "after reconnecting, the export is {} bytes instead of {}",
                                info.size, self.info.size
                            ),
                        ));
                    }
                    let conn = start_conn(stream, &self.name, seen + 1);
                    *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(conn);
                    tracing::warn!(
                        lun = %self.name,
                        "NBD connection restored after {:?}",
                        lost.elapsed()
                    );
                    return Ok(());
                }
                Ok(Err(e)) => tracing::debug!(lun = %self.name, "NBD reconnect failed: {e}"),
                Err(_) => {}
            }
            if std::time::Instant::now() + pause >= deadline {
                return Err(LunError::Disconnected {
                    lun: self.name.clone(),
                    what: format!(
                        "the server did not come back within the I/O timeout of {:?}",
                        self.io_timeout
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    }

    /// Send one command and wait for its complete reply, on a new connection
    /// if the current one drops (within the I/O timeout).
    async fn command(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let deadline = std::time::Instant::now() + self.io_timeout;
        loop {
            let conn = self.current();
            match self.command_on(&conn, cmd, flags, offset, len, data).await {
                Err(LunError::Disconnected { .. }) if std::time::Instant::now() < deadline => {
                    self.reconnect(conn.gen, deadline).await?;
                }
                r => return r,
            }
        }
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Send one command on `conn` and wait for its complete reply.
    async fn command_on(
        &self,
        conn: &Conn,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let name = conn.shared.name.as_str();
        if let Some((why, protocol)) = conn
            .shared
            .dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(conn.shared.error(&why, protocol));
        }
        let cookie = self
            .next_cookie
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let buf = if cmd == CMD_READ {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        conn.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                cookie,
                Pending {
                    buf,
                    offset,
                    error: None,
                    done: tx,
                },
            );
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        {
            let mut w = conn.writer.lock().await;
            let sent = async {
                w.write_all(&h).await?;
                if let Some(d) = data {
                    w.write_all(d).await?;
                }
                w.flush().await
            }
            .await;
            if let Err(e) = sent {
                conn.shared
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&cookie);
                let err = io_to_lun(name, "request send", e);
                conn.shared.fail_all(err.to_string(), false);
                return Err(err);
            }
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(LunError::Disconnected {
                lun: name.into(),
                what: "reply reader stopped".into(),
            }),
        }
    }

    /// Run a command over `[offset, offset+len)` split into server-sized pieces, all in flight at once.
    fn split_run(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> Result<()> {
        let max = u64::from(self.info.max_block);
        self.rt.block_on(async {
            let mut futs = Vec::new();
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(max);
                let d = data.map(|d| &d[done as usize..(done + n) as usize]);
                futs.push(self.command(cmd, flags, offset + done, n as u32, d));
                done += n;
            }
            let mut pos = 0usize;
            let mut out = out;
            let joined = join_all(futs).await;
            for r in joined {
                let v = r?;
                if let Some(o) = out.as_deref_mut() {
                    o[pos..pos + v.len()].copy_from_slice(&v);
                    pos += v.len();
                }
            }
            Ok(())
        })
    }
}

/// Await many futures concurrently on this task (no extra dependency needed).
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Unpin,
{
    use std::pin::Pin;
    use std::task::{Context, Poll};
    struct JoinAll<F: std::future::Future> {
        futs: Vec<Option<Pin<Box<F>>>>,
        out: Vec<Option<F::Output>>,
    }
    impl<F: std::future::Future> std::future::Future for JoinAll<F>
    where
        F::Output: Unpin,
    {
        type Output = Vec<F::Output>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.get_mut();
            let mut pending = false;
            for (i, slot) in this.futs.iter_mut().enumerate() {
                if let Some(f) = slot {
                    match f.as_mut().poll(cx) {
                        Poll::Ready(v) => {
                            this.out[i] = Some(v);
                            *slot = None;
                        }
                        Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                Poll::Pending
            } else {
                Poll::Ready(
                    this.out
                        .iter_mut()
                        .map(|o| o.take().expect("each future completed once"))
                        .collect(),
                )
            }
        }
    }
    let n = futs.len();
    JoinAll {
        futs: futs.into_iter().map(|f| Some(Box::pin(f))).collect(),
        out: (0..n).map(|_| None).collect(),
    }
    .await
}

impl Lun for NbdLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.info.size
    }
    fn block_size(&self) -> u32 {
        self.info.min_block.max(512)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.name(), self.info.size, offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        self.split_run(CMD_READ, 0, offset, len, None, Some(buf))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.name(), self.info.size, offset, buf.len() as u64)?;
        if self.info.flags & TF_READ_ONLY != 0 {
            return Err(LunError::Unsupported {
                lun: self.name().into(),
                what: "writing (the export is read-only)",
            });
        }
        self.split_run(CMD_WRITE, 0, offset, buf.len() as u64, Some(buf), None)
    }
    fn flush(&self) -> Result<()> {
        if self.info.flags & TF_SEND_FLUSH == 0 {
            // The server says it has no volatile cache to flush.
            return Ok(());
        }
        self.rt
            .block_on(self.command(CMD_FLUSH, 0, 0, 0, None))
            .map(|_| ())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(self.name(), self.info.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.info.flags & TF_SEND_WRITE_ZEROES != 0 {
            let flags = if unmap { 0 } else { CMDF_NO_HOLE };
            // The largest 4 KiB-aligned length a request can carry.
            let max = u64::from(u32::MAX) & !0xfff;
            let mut done = 0;
            while done < len {
                let n = (len - done).min(max);
                self.rt.block_on(self.command(
                    CMD_WRITE_ZEROES,
                    flags,
                    offset + done,
                    n as u32,
                    None,
                ))?;
                done += n;
            }
            return Ok(());
        }
        let zeros = vec![0u8; len.min(u64::from(self.info.max_block)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    fn identity(&self) -> Result<String> {
        Ok(self.identity.clone())
    }
}

impl NbdLun {
    /// Write with Force Unit Access when the server offers it (else write + flush).
    pub fn write_fua(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.name(), self.info.size, offset, buf.len() as u64)?;
        if self.info.flags & TF_SEND_FUA != 0 {
            self.split_run(
                CMD_WRITE,
                CMDF_FUA,
                offset,
                buf.len() as u64,
                Some(buf),
                None,
            )
        } else {
            self.write_at(buf, offset)?;
            self.flush()
        }
    }
    /// Tell the server the range is no longer needed (contents undefined after).
    pub fn trim(&self, offset: u64, len: u32) -> Result<()> {
        if self.info.flags & TF_SEND_TRIM == 0 {
            return Err(LunError::Unsupported {
                lun: self.name().into(),
                what: "TRIM",
            });
        }
        self.rt
            .block_on(self.command(CMD_TRIM, 0, offset, len, None))
            .map(|_| ())
    }
}

impl Drop for NbdLun {
    fn drop(&mut self) {
        // Polite disconnect; the server must not reply to NBD_CMD_DISC.
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let conn = self.current();
        self.rt.block_on(async {
            let mut w = conn.writer.lock().await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                let _ = w.write_all(&h).await;
                let _ = w.shutdown().await;
            })
            .await;
        });
    }
}
