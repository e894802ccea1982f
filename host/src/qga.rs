//! A qemu-guest-agent client: what the host needs to quiesce a guest for a
//! snapshot (`guest-fsfreeze-freeze`, whose hooks run in the guest, then
//! `guest-fsfreeze-thaw`). The agent speaks one JSON object per line on the
//! UNIX socket of QEMU's `virtserialport name=org.qemu.guest_agent.0`.
//!
//! Every exchange starts with a resynchronisation: 0xFF (which resets the
//! agent's parser) and `guest-sync-delimited` with a fresh id, until the
//! agent echoes that id: replies left over from an earlier client that gave
//! up are discarded. Every wait has a deadline; nothing here blocks for
//! longer than the caller allows.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{HostError, Result};

/// The longest line the agent may send (a freeze answers a number).
const MAX_LINE: usize = 1 << 20;

pub struct Agent {
    path: PathBuf,
    sock: UnixStream,
    buf: Vec<u8>,
}

fn err(path: &Path, what: impl std::fmt::Display) -> HostError {
    HostError::Agent(format!("guest agent {}: {what}", path.display()))
}

impl Agent {
    /// Connect and synchronise within `within`.
    pub fn connect(path: &Path, within: Duration) -> Result<Agent> {
        let until = Instant::now() + within;
        let sock = UnixStream::connect(path).map_err(|e| err(path, format!("connecting: {e}")))?;
        let mut a = Agent {
            path: path.to_path_buf(),
            sock,
            buf: Vec::new(),
        };
        a.sync(until)?;
        Ok(a)
    }

    fn send(&mut self, v: &serde_json::Value, reset: bool) -> Result<()> {
        let mut line = if reset { vec![0xff] } else { Vec::new() };
        line.extend(serde_json::to_vec(v).map_err(|e| err(&self.path, e))?);
        line.push(b'\n');
        self.sock
            .write_all(&line)
            .map_err(|e| err(&self.path, format!("sending: {e}")))
    }

    /// The next JSON object, `None` when `until` passes first.
    fn recv(&mut self, until: Instant) -> Result<Option<serde_json::Value>> {
        loop {
            // 0xFF precedes a guest-sync-delimited reply; never valid JSON.
            self.buf.retain(|&b| b != 0xff);
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return match serde_json::from_slice(&line) {
                    Ok(v) => Ok(Some(v)),
                    Err(e) => Err(err(&self.path, format!("a reply that is not JSON: {e}"))),
                };
            }
            if self.buf.len() > MAX_LINE {
                return Err(err(&self.path, "a reply line over 1 MiB"));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock
                .set_read_timeout(Some(left))
                .map_err(|e| err(&self.path, e))?;
            let mut chunk = [0u8; 4096];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Err(err(&self.path, "the agent closed the connection")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(&self.path, format!("reading: {e}"))),
            }
        }
    }

    fn sync(&mut self, until: Instant) -> Result<()> {
        while Instant::now() < until {
            // Fresh per attempt; unpredictability does not matter, only
            // that a stale reply does not carry it.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let id = u64::from((nanos ^ std::process::id().rotate_left(16)) >> 1);
            self.send(
                &serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
                true,
            )?;
            let round = until.min(Instant::now() + Duration::from_secs(2));
            while let Some(v) = self.recv(round)? {
                if v.get("return").and_then(|r| r.as_u64()) == Some(id) {
                    self.buf.clear();
                    return Ok(());
                }
            }
        }
        Err(err(
            &self.path,
            "no answer to guest-sync-delimited (is the agent running in the guest?)",
        ))
    }

    /// Run `cmd`; its `return` value, or the agent's error.
    pub fn execute(&mut self, cmd: &str, within: Duration) -> Result<serde_json::Value> {
        let until = Instant::now() + within;
        self.send(&serde_json::json!({ "execute": cmd }), false)?;
        match self.recv(until)? {
            Some(v) => {
                if let Some(e) = v.get("error") {
                    let desc = e.get("desc").and_then(|d| d.as_str()).unwrap_or("");
                    return Err(err(&self.path, format!("{cmd} failed: {desc} ({e})")));
                }
                Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null))
            }
            None => Err(err(
                &self.path,
                format!("no answer to {cmd} within {} ms", within.as_millis()),
            )),
        }
    }

    /// Freeze the guest's filesystems (its fsfreeze hooks run first);
    /// returns how many it froze.
    pub fn freeze(&mut self, within: Duration) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-freeze", within)?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Thaw them (the hooks run after).
    pub fn thaw(&mut self, within: Duration) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw", within)?;
        Ok(v.as_u64().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent on a socket pair: answers sync with the id asked, and
    /// freeze with 2; a stale reply first (from a client that gave up).
    #[test]
    fn a_stale_reply_is_skipped_and_a_freeze_answers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qga.sock");
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"{\"return\": 77}\n").unwrap();
            let sync_prefix = [0xffu8];
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = Vec::new();
            loop {
                line.clear();
                if std::io::BufRead::read_until(&mut r, b'\n', &mut line).unwrap() == 0 {
                    return;
                }
                line.retain(|&b| b != 0xff);
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
                let reply = match v["execute"].as_str().unwrap() {
                    "guest-sync-delimited" => {
                        s.write_all(&sync_prefix).unwrap();
                        format!("{{\"return\": {}}}\n", v["arguments"]["id"])
                    }
                    "guest-fsfreeze-freeze" => "{\"return\": 2}\n".into(),
                    _ => {
                        "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\n".into()
                    }
                };
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        let mut a = Agent::connect(&p, Duration::from_secs(5)).unwrap();
        assert_eq!(a.freeze(Duration::from_secs(5)).unwrap(), 2);
        let e = a.execute("guest-frob", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn no_agent_is_a_clear_error_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qga.sock");
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let t = Instant::now();
        let e = Agent::connect(&p, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("guest-sync"), "{e}");
    }
}
