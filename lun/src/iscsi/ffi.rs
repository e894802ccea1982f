//! The thin, safe layer over libiscsi (LGPL, linked dynamically). Every
//! `unsafe` of the iSCSI backend is in this file.
//!
//! Only a handful of libiscsi's entry points are used: a context, its login,
//! the event-loop trio (`iscsi_get_fd`, `iscsi_which_events`,
//! `iscsi_service`) and `iscsi_scsi_command_async` with tasks built from our
//! own CDBs. CDBs and the data they return are built and parsed in Rust
//! (`super::scsi`), so no libiscsi structure is mirrored here except the
//! leading fields of `struct scsi_sense` and the two-field `struct iscsi_data`.
//!
//! libiscsi contexts are single-threaded: a [`Session`] may move between
//! threads, but its calls must never overlap (the backend keeps it behind a
//! mutex).

#![allow(non_camel_case_types)]

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_uchar, c_void};

#[repr(C)]
struct iscsi_context {
    _opaque: [u8; 0],
}

#[repr(C)]
struct scsi_task {
    _opaque: [u8; 0],
}

/// The leading fields of libiscsi's `struct scsi_sense` (an unsigned char
/// then two ints, so the same offsets on every ABI libiscsi supports). The
/// padding is larger than the rest of the C struct (20 bytes), which
/// `scsi_task_get_status` copies whole.
#[repr(C)]
struct scsi_sense {
    error_type: c_uchar,
    key: c_int,
    ascq: c_int,
    _rest: [u32; 8],
}

type iscsi_command_cb = extern "C" fn(*mut iscsi_context, c_int, *mut c_void, *mut c_void);
type iscsi_log_fn = extern "C" fn(c_int, *const c_char);

const ISCSI_SESSION_NORMAL: c_int = 2;
const SCSI_XFER_NONE: c_int = 0;
const SCSI_XFER_READ: c_int = 1;
const SCSI_XFER_WRITE: c_int = 2;

// Linked by build.rs (pkg-config libiscsi).
extern "C" {
    fn iscsi_create_context(initiator_name: *const c_char) -> *mut iscsi_context;
    fn iscsi_destroy_context(iscsi: *mut iscsi_context) -> c_int;
    fn iscsi_set_targetname(iscsi: *mut iscsi_context, name: *const c_char) -> c_int;
    fn iscsi_set_session_type(iscsi: *mut iscsi_context, t: c_int) -> c_int;
    fn iscsi_set_header_digest(iscsi: *mut iscsi_context, d: c_int) -> c_int;
    fn iscsi_set_initiator_username_pwd(
        iscsi: *mut iscsi_context,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    fn iscsi_set_target_username_pwd(
        iscsi: *mut iscsi_context,
        user: *const c_char,
        passwd: *const c_char,
    ) -> c_int;
    fn iscsi_full_connect_sync(
        iscsi: *mut iscsi_context,
        portal: *const c_char,
        lun: c_int,
    ) -> c_int;
    fn iscsi_get_error(iscsi: *mut iscsi_context) -> *const c_char;
    fn iscsi_get_fd(iscsi: *mut iscsi_context) -> c_int;
    fn iscsi_which_events(iscsi: *mut iscsi_context) -> c_int;
    fn iscsi_service(iscsi: *mut iscsi_context, revents: c_int) -> c_int;
    fn iscsi_set_noautoreconnect(iscsi: *mut iscsi_context, state: c_int);
    fn iscsi_is_logged_in(iscsi: *mut iscsi_context) -> c_int;
    fn iscsi_scsi_cancel_task(iscsi: *mut iscsi_context, task: *mut scsi_task) -> c_int;
    fn iscsi_set_tcp_user_timeout(iscsi: *mut iscsi_context, timeout_ms: c_int);
    fn iscsi_set_log_level(iscsi: *mut iscsi_context, level: c_int);
    fn iscsi_set_log_fn(iscsi: *mut iscsi_context, f: iscsi_log_fn);
    fn iscsi_scsi_command_async(
        iscsi: *mut iscsi_context,
        lun: c_int,
        task: *mut scsi_task,
        cb: iscsi_command_cb,
        data: *mut c_void,
        private_data: *mut c_void,
    ) -> c_int;
    fn scsi_create_task(
        cdb_size: c_int,
        cdb: *mut c_uchar,
        xfer_dir: c_int,
        expxferlen: c_int,
    ) -> *mut scsi_task;
    fn scsi_free_scsi_task(task: *mut scsi_task);
    fn scsi_task_add_data_in_buffer(task: *mut scsi_task, len: c_int, buf: *mut c_uchar) -> c_int;
    fn scsi_task_add_data_out_buffer(task: *mut scsi_task, len: c_int, buf: *mut c_uchar) -> c_int;
    fn scsi_task_get_status(task: *mut scsi_task, sense: *mut scsi_sense) -> c_int;
}

/// SCSI and transport status codes as libiscsi reports them.
pub const STATUS_GOOD: i32 = 0;
pub const STATUS_CHECK_CONDITION: i32 = 2;
pub const STATUS_BUSY: i32 = 8;
pub const STATUS_RESERVATION_CONFLICT: i32 = 0x18;
pub const STATUS_TASK_SET_FULL: i32 = 0x28;
pub const STATUS_TASK_ABORTED: i32 = 0x40;
pub const STATUS_CANCELLED: i32 = 0x0f00_0000;
pub const STATUS_ERROR: i32 = 0x0f00_0001;
/// Also used by us for commands that outlived their deadline.
pub const STATUS_TIMEOUT: i32 = 0x0f00_0002;

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    None,
    /// From the target into a buffer of this many bytes.
    Read(usize),
    /// From the given bytes to the target.
    Write,
}

/// How one command ended.
#[derive(Debug)]
pub struct Completion {
    pub status: i32,
    pub sense_key: u8,
    /// Additional sense code (high byte) and qualifier (low byte).
    pub ascq: u16,
    pub data_in: Vec<u8>,
    /// The data-out bytes, handed back so that a retry needs no copy.
    pub data_out: Vec<u8>,
    /// libiscsi's message, for transport failures (timeout, cancel, error).
    pub message: Option<String>,
}

/// One command's buffers and completion handler, owned by libiscsi between
/// submission and callback (as the task's private pointer).
struct InFlight {
    data_in: Vec<u8>,
    data_out: Vec<u8>,
    done: Box<dyn FnOnce(Completion) + Send>,
}

/// A command in flight, for [`Session::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task(*mut scsi_task);

// SAFETY: a task handle is only dereferenced by libiscsi inside calls on its
// session, which the owner serializes (see `Session`).
unsafe impl Send for Task {}

/// Login parameters.
pub struct Login<'a> {
    pub initiator: &'a str,
    pub target: &'a str,
    pub portal: &'a str,
    pub lun: u16,
    pub chap: Option<(&'a str, &'a str)>,
    pub target_chap: Option<(&'a str, &'a str)>,
    /// libiscsi's enum: 0 none, 1 none-crc32c, 2 crc32c-none, 3 crc32c.
    pub header_digest: Option<i32>,
    pub tcp_user_timeout_ms: u32,
}

/// A logged-in iSCSI session (a libiscsi context).
pub struct Session {
    ctx: *mut iscsi_context,
}

// SAFETY: libiscsi keeps no thread-local state: a context may be used from
// any thread as long as calls on it never overlap. `Session`'s methods take
// `&mut self` (or `&self` for reads of its state), and the backend keeps the
// session behind a mutex, so calls are serialized.
unsafe impl Send for Session {}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

extern "C" fn log_to_tracing(level: c_int, msg: *const c_char) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libiscsi passes a NUL-terminated message valid for this call.
    let m = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    // Everything libiscsi reports is also reported by us, once and with the
    // LUN's name (lost connections, failed logins, unit attentions): its
    // own messages are for debugging.
    let _ = level;
    tracing::debug!(target: "libiscsi", "{m}");
}

impl Session {
    /// Create a context, log in to `login.target` at `login.portal` and check
    /// that LUN `login.lun` exists (eating the unit attention of a new
    /// session). libiscsi's own reconnect is off: when the connection drops,
    /// every command in flight completes with `STATUS_CANCELLED` and the
    /// caller decides what to send again on a new session, and when.
    pub fn connect(login: &Login<'_>) -> Result<Session, String> {
        let initiator = cstring("the initiator name", login.initiator)?;
        let target = cstring("the target name", login.target)?;
        let portal = cstring("the portal", login.portal)?;
        // SAFETY: a valid C string; NULL on failure is checked.
        let ctx = unsafe { iscsi_create_context(initiator.as_ptr()) };
        if ctx.is_null() {
            return Err("libiscsi could not create a context".into());
        }
        let s = Session { ctx };
        // SAFETY (this block): `ctx` is a live context; every string is a
        // valid C string that libiscsi copies before returning.
        unsafe {
            iscsi_set_log_fn(ctx, log_to_tracing);
            iscsi_set_log_level(ctx, 1);
            if iscsi_set_targetname(ctx, target.as_ptr()) != 0
                || iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL) != 0
            {
                return Err(s.error());
            }
            if let Some(d) = login.header_digest {
                if iscsi_set_header_digest(ctx, d) != 0 {
                    return Err(s.error());
                }
            }
            if let Some((u, p)) = login.chap {
                let (u, p) = (cstring("the CHAP user", u)?, cstring("the CHAP secret", p)?);
                if iscsi_set_initiator_username_pwd(ctx, u.as_ptr(), p.as_ptr()) != 0 {
                    return Err(s.error());
                }
            }
            if let Some((u, p)) = login.target_chap {
                let (u, p) = (
                    cstring("the target CHAP user", u)?,
                    cstring("the target CHAP secret", p)?,
                );
                if iscsi_set_target_username_pwd(ctx, u.as_ptr(), p.as_ptr()) != 0 {
                    return Err(s.error());
                }
            }
            iscsi_set_tcp_user_timeout(ctx, login.tcp_user_timeout_ms as c_int);
            iscsi_set_noautoreconnect(ctx, 1);
            if iscsi_full_connect_sync(ctx, portal.as_ptr(), c_int::from(login.lun)) != 0 {
                return Err(s.error());
            }
        }
        Ok(s)
    }

    /// libiscsi's last error message for this context.
    pub fn error(&self) -> String {
        // SAFETY: live context; the returned string (if any) is owned by it.
        let p = unsafe { iscsi_get_error(self.ctx) };
        if p.is_null() {
            return "unknown libiscsi error".into();
        }
        // SAFETY: NUL-terminated, valid until the next libiscsi call on ctx.
        let m = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        if m.is_empty() {
            "unknown libiscsi error".into()
        } else {
            m
        }
    }

    /// Whether the session is still logged in (false once the connection dropped).
    pub fn logged_in(&self) -> bool {
        // SAFETY: live context.
        unsafe { iscsi_is_logged_in(self.ctx) != 0 }
    }

    /// Forget a command: its completion runs now, with `STATUS_CANCELLED`.
    /// `task` must be the handle of a command whose completion has not run.
    /// A command already sent may still be carried out by the target.
    pub fn cancel(&mut self, task: Task) {
        // SAFETY: per the contract, the task is live (its callback has not
        // run, so it has not been freed).
        unsafe {
            iscsi_scsi_cancel_task(self.ctx, task.0);
        }
    }

    /// The socket to poll.
    pub fn fd(&self) -> i32 {
        // SAFETY: live context.
        unsafe { iscsi_get_fd(self.ctx) }
    }

    /// The poll events libiscsi waits for; 0 while it backs off a reconnect.
    pub fn which_events(&self) -> i16 {
        // SAFETY: live context.
        unsafe { iscsi_which_events(self.ctx) as i16 }
    }

    /// Let libiscsi process `revents` (0: just time out overdue commands and
    /// drive a pending reconnect). Completion handlers run from here.
    pub fn service(&mut self, revents: i16) -> Result<(), String> {
        // SAFETY: live context; callbacks run on this thread, inside this call.
        if unsafe { iscsi_service(self.ctx, c_int::from(revents)) } < 0 {
            return Err(self.error());
        }
        Ok(())
    }

    /// Queue one command for LUN `lun`. `done` runs exactly once, from a later
    /// [`Session::service`] or [`Session::cancel`] (or from drop, with
    /// `STATUS_CANCELLED`). The returned handle is valid until then.
    pub fn submit(
        &mut self,
        lun: u16,
        cdb: &[u8],
        dir: Dir,
        data_out: Vec<u8>,
        done: Box<dyn FnOnce(Completion) + Send>,
    ) -> Result<Task, (String, Vec<u8>)> {
        let (xfer, len) = match dir {
            Dir::None => (SCSI_XFER_NONE, 0),
            Dir::Read(n) => (SCSI_XFER_READ, n),
            Dir::Write => (SCSI_XFER_WRITE, data_out.len()),
        };
        if cdb.len() > 16 || len > i32::MAX as usize {
            return Err(("command too large".into(), data_out));
        }
        let mut cdb_buf = [0u8; 16];
        cdb_buf[..cdb.len()].copy_from_slice(cdb);
        let mut fl = Box::new(InFlight {
            data_in: if let Dir::Read(n) = dir {
                vec![0u8; n]
            } else {
                Vec::new()
            },
            data_out,
            done,
        });
        // SAFETY: `cdb_buf` is copied into the task. The data buffers are the
        // heap storage of the two Vecs in `fl`, which is leaked into the
        // task's private pointer below and stays untouched until the
        // callback takes it back, after libiscsi is done with the task.
        unsafe {
            let task =
                scsi_create_task(cdb.len() as c_int, cdb_buf.as_mut_ptr(), xfer, len as c_int);
            if task.is_null() {
                return Err(("libiscsi could not allocate a task".into(), fl.data_out));
            }
            let added = match dir {
                Dir::Read(n) if n > 0 => {
                    scsi_task_add_data_in_buffer(task, n as c_int, fl.data_in.as_mut_ptr())
                }
                Dir::Write if len > 0 => {
                    scsi_task_add_data_out_buffer(task, len as c_int, fl.data_out.as_mut_ptr())
                }
                _ => 0,
            };
            if added != 0 {
                scsi_free_scsi_task(task);
                return Err((
                    "libiscsi could not attach the data buffer".into(),
                    fl.data_out,
                ));
            }
            let private = Box::into_raw(fl);
            let r = iscsi_scsi_command_async(
                self.ctx,
                c_int::from(lun),
                task,
                on_done,
                std::ptr::null_mut(),
                private.cast(),
            );
            if r != 0 {
                let fl = Box::from_raw(private);
                scsi_free_scsi_task(task);
                return Err((self.error(), fl.data_out));
            }
            Ok(Task(task))
        }
    }
}

extern "C" fn on_done(
    ctx: *mut iscsi_context,
    status: c_int,
    task: *mut c_void,
    private: *mut c_void,
) {
    if private.is_null() {
        return;
    }
    // SAFETY: `private` is the InFlight leaked by `submit`, handed back once.
    let fl = unsafe { Box::from_raw(private.cast::<InFlight>()) };
    let task = task.cast::<scsi_task>();
    let mut sense = scsi_sense {
        error_type: 0,
        key: 0,
        ascq: 0,
        _rest: [0; 8],
    };
    let mut st = status;
    if !task.is_null() {
        // SAFETY: the task is live until freed here; `sense` is large enough.
        unsafe {
            st = scsi_task_get_status(task, &mut sense);
            scsi_free_scsi_task(task);
        }
    }
    let message = if st == STATUS_TIMEOUT || st == STATUS_CANCELLED || st == STATUS_ERROR {
        // SAFETY: the context is live during its own callbacks.
        let p = unsafe { iscsi_get_error(ctx) };
        // SAFETY: NUL-terminated and owned by the context.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    } else {
        None
    };
    let InFlight {
        data_in,
        data_out,
        done,
    } = *fl;
    let c = Completion {
        status: st,
        sense_key: (sense.key & 0xff) as u8,
        ascq: (sense.ascq & 0xffff) as u16,
        data_in,
        data_out,
        message,
    };
    // A panic must not unwind into C.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(c)));
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: live context, destroyed once; libiscsi completes every
        // command still queued with STATUS_CANCELLED, which frees its InFlight.
        unsafe {
            iscsi_destroy_context(self.ctx);
        }
    }
}
