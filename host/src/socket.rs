//! Where a host's control sockets live, and who may use them.
//!
//! `STATE_DIR/run/DATASTORE-UUID.sock`, one per datastore this machine
//! hosts; `STATE_DIR/run` is mode 0700 and each socket 0600, and the host
//! also checks each client's credentials (SO_PEERCRED): root, or the user
//! the host runs as.

use std::io::{BufRead, BufReader, Read};
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

/// Bind the control socket of datastore `uuid`, holding `UUID.lock`
/// (flock) for as long as the returned lock file stays open: a second
/// agent for the same datastore in the same state directory is refused
/// (this machine already hosts it), and a socket left at the path by a
/// killed agent (nobody holds the lock) is replaced, but only if it is a
/// socket this user owns. Returns the listener, its path, its inode (the
/// agent removes the path at stop only if it is still this socket) and
/// the lock file.
pub fn bind(state_dir: &Path, uuid: &str) -> Result<(UnixListener, PathBuf, u64, std::fs::File)> {
    use std::os::unix::fs::FileTypeExt;
    let dir = run_dir(state_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| HostError::io(format!("creating {}", dir.display()), e))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner = std::fs::metadata(&dir)
        .map_err(|e| HostError::io(format!("reading {}", dir.display()), e))?
        .uid();
    if owner != me {
        return Err(HostError::Permission(format!(
            "{} belongs to user {owner}, not to this host's user {me}: refusing to serve a control socket there",
            dir.display()
        )));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| HostError::io(format!("making {} root-only", dir.display()), e))?;
    let path = socket_path(state_dir, uuid);
    let lock_path = dir.join(format!("{uuid}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| HostError::io(format!("opening {}", lock_path.display()), e))?;
    // SAFETY: a valid descriptor.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let who = UnixStream::connect(&path)
            .map_err(|e| HostError::Agent(e.to_string()))
            .and_then(|s| read_greeting(&s))
            .map(|g| format!("pid {}, slot {}", g.pid, g.slot))
            .unwrap_or_else(|e| format!("a process that does not answer: {e}"));
        return Err(HostError::Agent(format!(
            "this machine already hosts datastore {uuid} ({who}; socket {}): one host per machine and datastore; give another --state-dir to play another machine",
            path.display()
        )));
    }
    // We hold the lock: whatever is at the path was left by an agent that
    // died. Replace it only if it is a socket of ours.
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() && m.uid() == me => {
            tracing::warn!(
                "replacing the stale control socket {} (its host stopped without removing it)",
                path.display()
            );
            std::fs::remove_file(&path)
                .map_err(|e| HostError::io(format!("removing {}", path.display()), e))?;
        }
        Ok(_) => {
            return Err(HostError::Agent(format!(
                "{} is not a control socket of this host's user: refusing to remove it",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(HostError::io(format!("reading {}", path.display()), e)),
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
    Ok((l, path, ino, lock))
}
