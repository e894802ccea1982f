//! Where a host's control sockets live, and who may use them.
//!
//! `STATE_DIR/run/DATASTORE-UUID.sock`, one per datastore this machine
//! hosts; `STATE_DIR/run` is mode 0700 and each socket 0600, and the host
//! also checks each client's credentials (SO_PEERCRED): root, or the user
//! the host runs as.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{HostError, Result};
use crate::proto::{Greeting, GreetingLine};

/// The default state directory (host UUID, LUN list, sockets).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmfs";

/// The state directory of a host: `explicit`, else the default; a host
/// given a UUID on the command line (playing another machine, as tests
/// do) without a state directory keeps its state in
/// `DEFAULT_STATE_DIR/hosts/UUID`.
pub fn state_dir(explicit: Option<&Path>, host_uuid: Option<&str>) -> PathBuf {
    match (explicit, host_uuid) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(u)) => Path::new(DEFAULT_STATE_DIR).join("hosts").join(u),
        (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
    }
}

pub fn run_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("run")
}

/// The control socket of datastore `uuid` (its volume UUID, as printed).
pub fn socket_path(state_dir: &Path, uuid: &str) -> PathBuf {
    run_dir(state_dir).join(format!("{uuid}.sock"))
}

/// Whether a peer may use the socket: root, or our own user.
pub fn peer_allowed(s: &UnixStream) -> std::result::Result<libc::ucred, String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for getsockopt to fill.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!(
            "cannot read the client's credentials: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid == 0 || cred.uid == me {
        Ok(cred)
    } else {
        Err(format!(
            "user {} may not use this host's control socket (root only)",
            cred.uid
        ))
    }
}

/// Read a host's greeting from a fresh connection.
pub fn read_greeting(s: &UnixStream) -> Result<Greeting> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| HostError::io("setting a timeout on the control socket", e))?;
    let mut line = Vec::new();
    let mut r = BufReader::new(s).take(64 << 10);
    r.read_until(b'\n', &mut line)
        .map_err(|e| HostError::Agent(format!("no greeting from the host: {e}")))?;
    let g: GreetingLine = serde_json::from_slice(&line).map_err(|e| {
        HostError::Agent(format!(
            "what answers on the socket is not a vmfs host ({e}): {:?}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ))
    })?;
    Ok(g.greeting)
}

use std::io::Read;

/// Bind the control socket of datastore `uuid`. A socket left by a host
/// that was killed (nobody listens) is replaced; one a live host answers on
/// is refused: this machine already hosts that datastore. Returns the
/// listener and the socket's inode (removed at stop only if still ours).
pub fn bind(state_dir: &Path, uuid: &str) -> Result<(UnixListener, PathBuf, u64)> {
    let dir = run_dir(state_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| HostError::io(format!("creating {}", dir.display()), e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| HostError::io(format!("making {} root-only", dir.display()), e))?;
    let path = socket_path(state_dir, uuid);
    if path.exists() {
        match UnixStream::connect(&path) {
            Ok(s) => {
                let who = match read_greeting(&s) {
                    Ok(g) => format!("pid {}, slot {}", g.pid, g.slot),
                    Err(e) => format!("a process that does not answer: {e}"),
                };
                return Err(HostError::Agent(format!(
                    "this machine already hosts datastore {uuid} ({who}; socket {}): one host per machine and datastore; give another --state-dir to play another machine",
                    path.display()
                )));
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::warn!(
                    "replacing the stale control socket {} (its host stopped without removing it)",
                    path.display()
                );
                std::fs::remove_file(&path)
                    .map_err(|e| HostError::io(format!("removing {}", path.display()), e))?;
            }
            Err(e) => {
                return Err(HostError::io(
                    format!("checking the existing control socket {}", path.display()),
                    e,
                ))
            }
        }
    }
    // Created 0600 (umask), then made so whatever the umask was.
    // SAFETY: umask cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(&path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| HostError::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| HostError::io(format!("making {} root-only", path.display()), e))?;
    let ino = std::fs::metadata(&path)
        .map_err(|e| HostError::io(format!("reading {}", path.display()), e))?
        .ino();
    Ok((l, path, ino))
}
