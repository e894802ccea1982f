//! The CLI's side of the control socket: find the host of a datastore on
//! this machine (by the datastore's UUID, or by a path under its
//! mountpoint), and call it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{HostError, Result};
use crate::ops::Status;
use crate::proto::{self, Greeting, Reply, Request};

/// A connection to a host agent.
pub struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
    pub greeting: Greeting,
    pub socket: PathBuf,
    next_id: u64,
}

impl Client {
    /// Connect to the socket at `path`; when `datastore` is given, the host
    /// must serve that datastore (a socket answering for another is refused,
    /// never used).
    pub fn connect(path: &Path, datastore: Option<&str>) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => HostError::Permission(format!(
                "the host agent's control socket {} is root-only: run this command as root",
                path.display()
            )),
            _ => HostError::io(format!("connecting to {}", path.display()), e),
        })?;
        let greeting = crate::socket::read_greeting(&s)?;
        if greeting.protocol != proto::VERSION {
            return Err(HostError::Version(format!(
                "the host on {} speaks control protocol {}, this vmfs speaks {}: use the same version",
                path.display(),
                greeting.protocol,
                proto::VERSION
            )));
        }
        if let Some(want) = datastore {
            if greeting.datastore != want {
                return Err(HostError::Agent(format!(
                    "the control socket {} answers for datastore {}, not {want}: refusing to use it (a socket renamed or left by another datastore's host)",
                    path.display(),
                    greeting.datastore
                )));
            }
        }
        // A host that stops answering fails the command, it does not hang it.
        s.set_read_timeout(Some(std::time::Duration::from_secs(600)))
            .map_err(|e| HostError::io("setting the socket timeout", e))?;
        let r = s
            .try_clone()
            .map_err(|e| HostError::io("cloning the socket", e))?;
        Ok(Client {
            w: s,
            r: BufReader::new(r),
            greeting,
            socket: path.to_path_buf(),
            next_id: 1,
        })
    }

    /// Send one request, wait for its reply.
    pub fn call_value(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            protocol: proto::VERSION,
            command: command.to_string(),
            arguments,
            id: Some(Value::from(id)),
        };
        let mut line = serde_json::to_vec(&req)
            .map_err(|e| HostError::BadRequest(format!("encoding the request: {e}")))?;
        line.push(b'\n');
        self.w
            .write_all(&line)
            .map_err(|e| HostError::Agent(format!("the host stopped answering: {e}")))?;
        let mut reply = Vec::new();
        (&mut self.r)
            .take(64 << 20)
            .read_until(b'\n', &mut reply)
            .map_err(|e| HostError::Agent(format!("the host stopped answering: {e}")))?;
        if reply.is_empty() {
            return Err(HostError::Agent(format!(
                "the host (pid {}) closed the connection without answering {command}",
                self.greeting.pid
            )));
        }
        let reply: Reply = serde_json::from_slice(&reply)
            .map_err(|e| HostError::Agent(format!("the host's reply is not understood: {e}")))?;
        reply.into_result()
    }

    /// [`Client::call_value`] with typed arguments and result.
    pub fn call<T: DeserializeOwned>(&mut self, command: &str, arguments: Value) -> Result<T> {
        let v = self.call_value(command, arguments)?;
        serde_json::from_value(v).map_err(|e| {
            HostError::Agent(format!(
                "the host's result of {command} is not understood: {e}"
            ))
        })
    }
}

/// The host agent of datastore `uuid` on this machine, if one runs. A
/// socket nobody listens on (its host was killed) is not trusted: None.
pub fn find(state_dir: &Path, uuid: &str) -> Result<Option<Client>> {
    let path = crate::socket::socket_path(state_dir, uuid);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(HostError::Permission(format!(
                "cannot look for a host agent in {}: root-only (run as root)",
                path.parent().unwrap_or(&path).display()
            )))
        }
        _ => {}
    }
    match Client::connect(&path, Some(uuid)) {
        Ok(c) => Ok(Some(c)),
        Err(HostError::Io { cause, .. })
            if cause.raw_os_error() == Some(libc::ECONNREFUSED)
                || cause.raw_os_error() == Some(libc::ENOENT) =>
        {
            tracing::debug!("{} is stale (no host listens): ignored", path.display());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The UUID of the datastore whose first LUN (or any extent) is `lun`.
pub fn datastore_uuid(lun: &dyn lun::Lun) -> Option<String> {
    let mut b = vec![0u8; vmfs::format::MD];
    lun.read_at(&mut b, 0).ok()?;
    let h = vmfs::format::VolumeHeader::decode(&b, None).ok()?;
    Some(vmfs::volume::uuid_str(&h.uuid))
}

/// Every host agent on this machine, with its status (or why it could not
/// be asked).
pub fn all(state_dir: &Path) -> Result<Vec<std::result::Result<Status, String>>> {
    let dir = crate::socket::run_dir(state_dir);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(HostError::Permission(format!(
                "{} is root-only: run as root",
                dir.display()
            )))
        }
        Err(e) => return Err(HostError::io(format!("reading {}", dir.display()), e)),
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let uuid = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match find(state_dir, &uuid) {
            Ok(Some(mut c)) => {
                let _ =
                    c.w.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let _ =
                    c.r.get_ref()
                        .set_read_timeout(Some(std::time::Duration::from_secs(10)));
                out.push(
                    c.call::<Status>("status", Value::Null)
                        .map_err(|e| e.to_string()),
                )
            }
            Ok(None) => {}
            Err(e) => out.push(Err(format!("{}: {e}", p.display()))),
        }
    }
    Ok(out)
}

/// The vmfs FUSE mount that holds `path` (its mountpoint), and `path`
/// inside it.
pub fn mount_of(path: &Path) -> Option<(PathBuf, String)> {
    // A path that does not exist yet (a file to create): its directory.
    let (real, tail) = match std::fs::canonicalize(path) {
        Ok(p) => (p, None),
        Err(_) => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (std::fs::canonicalize(parent).ok()?, path.file_name())
        }
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<PathBuf> = None;
    for l in info.lines() {
        let mut parts = l.split(" - ");
        let (Some(a), Some(b)) = (parts.next(), parts.next()) else {
            continue;
        };
        // "fuse vmfs:LABEL ..." (or "fuse.vmfs" where the subtype shows).
        let mut f = b.split(' ');
        let (Some(fstype), Some(source)) = (f.next(), f.next()) else {
            continue;
        };
        if !fstype.starts_with("fuse") || !source.starts_with("vmfs:") {
            continue;
        }
        let Some(mp) = a.split(' ').nth(4) else {
            continue;
        };
        let mp = PathBuf::from(mp.replace("\\040", " "));
        if real.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|b| mp.as_os_str().len() > b.as_os_str().len())
        {
            best = Some(mp);
        }
    }
    let mp = best?;
    let mut inner = real.strip_prefix(&mp).ok()?.to_path_buf();
    if let Some(t) = tail {
        inner.push(t);
    }
    Some((mp, inner.to_string_lossy().into_owned()))
}

/// When `path` lies under a vmfs mount of this machine: the host agent that
/// serves it and the path inside the datastore. Err when it lies under one
/// whose host does not answer in `state_dir`.
pub fn at_path(path: &Path, state_dir: &Path) -> Result<Option<(Client, String)>> {
    Ok(at_mount(path, state_dir)?.map(|(c, _, inner)| (c, inner)))
}

/// [`at_path`], with the mountpoint.
fn at_mount(path: &Path, state_dir: &Path) -> Result<Option<(Client, PathBuf, String)>> {
    let Some((mp, inner)) = mount_of(path) else {
        return Ok(None);
    };
    for st in all(state_dir)?.into_iter().flatten() {
        if Path::new(&st.mountpoint) == mp {
            if let Some(c) = find(state_dir, &st.datastore)? {
                return Ok(Some((c, mp, inner)));
            }
        }
    }
    Err(HostError::NotFound(format!(
        "{} is under the vmfs mount {}, but no host agent in {} serves it (mounted with another --state-dir?)",
        path.display(),
        mp.display(),
        crate::socket::run_dir(state_dir).display()
    )))
}

/// The host agent serving every one of `paths` (under vmfs mounts of this
/// machine, all of one datastore), its mountpoint, and each path inside the
/// datastore, in order.
pub fn at_paths(paths: &[PathBuf], state_dir: &Path) -> Result<(Client, PathBuf, Vec<String>)> {
    let mut agent: Option<(Client, PathBuf)> = None;
    let mut inner = Vec::new();
    for p in paths {
        let Some((c, mp, i)) = at_mount(p, state_dir)? else {
            return Err(HostError::NotFound(format!(
                "{} is not under a vmfs mount of this machine",
                p.display()
            )));
        };
        match &agent {
            None => agent = Some((c, mp)),
            Some((a, _)) if a.greeting.datastore != c.greeting.datastore => {
                return Err(HostError::BadRequest(format!(
                    "{} is on another datastore than {}: give the disks of one datastore",
                    p.display(),
                    paths[0].display()
                )))
            }
            Some(_) => {}
        }
        inner.push(i);
    }
    let (c, mp) = agent.ok_or_else(|| HostError::BadRequest("no disk given".into()))?;
    Ok((c, mp, inner))
}
