//! Key files: the repository's 64-byte master key (a data key for
//! AES-256-GCM and a key for chunk digests), wrapped with a key derived
//! from a passphrase by Argon2id. `init --encrypt KEYFILE` writes one and
//! keeps a copy in the repository (`keys/KEY-ID`), like borg's repokey, so
//! the passphrase alone opens it; with `--key KEYFILE` the file is used.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use crate::blob::Cipher;
use crate::error::{BackupError, Result};
use crate::util::{hex, random_bytes, unhex};

const FORMAT: &str = "vmfs-backup-key";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub format: String,
    pub version: u32,
    /// Names the key; the repository's config records it.
    pub key_id: String,
    pub kdf: Kdf,
    pub cipher: String,
    pub nonce: String,
    /// The master key, encrypted under the passphrase's key.
    pub wrapped: String,
    pub created: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kdf {
    pub name: String,
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    pub salt: String,
}

fn key_id(master: &[u8; 64]) -> String {
    hex(&blake3::derive_key("vmfs-backup 2026-11 key id", master)[..8])
}

fn kek(kdf: &Kdf, passphrase: &[u8]) -> Result<[u8; 32]> {
    let bad = |e: String| BackupError::Key(format!("key file: key derivation: {e}"));
    if kdf.name != "argon2id" {
        return Err(bad(format!("unknown function {:?}", kdf.name)));
    }
    // Bounded, so a hostile key file cannot make us allocate without end.
    if kdf.m_kib > 1 << 20 || kdf.t > 16 || kdf.p > 16 {
        return Err(bad("parameters out of range".into()));
    }
    let salt = unhex(&kdf.salt).ok_or_else(|| bad("salt is not hex".into()))?;
    let params = Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32)).map_err(|e| bad(e.to_string()))?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, &salt, &mut out)
        .map_err(|e| bad(e.to_string()))?;
    Ok(out)
}

impl KeyFile {
    /// A new random master key, wrapped under `passphrase`.
    pub fn create(passphrase: &[u8]) -> Result<KeyFile> {
        if passphrase.is_empty() {
            return Err(BackupError::Key("the passphrase is empty".into()));
        }
        let master: [u8; 64] = random_bytes();
        let kdf = Kdf {
            name: "argon2id".into(),
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
            salt: hex(&random_bytes::<16>()),
        };
        let k = kek(&kdf, passphrase)?;
        let id = key_id(&master);
        let nonce: [u8; 12] = random_bytes();
        let wrapped = Aes256Gcm::new((&k).into())
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &master,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| BackupError::Key("wrapping the key failed".into()))?;
        Ok(KeyFile {
            format: FORMAT.into(),
            version: 1,
            key_id: id,
            kdf,
            cipher: "aes-256-gcm".into(),
            nonce: hex(&nonce),
            wrapped: hex(&wrapped),
            created: crate::util::human_time(crate::util::unix_now()),
        })
    }

    pub fn parse(text: &[u8], what: &str) -> Result<KeyFile> {
        let k: KeyFile = serde_json::from_slice(text)
            .map_err(|e| BackupError::Key(format!("{what}: not a key file: {e}")))?;
        if k.format != FORMAT || k.version != 1 || k.cipher != "aes-256-gcm" {
            return Err(BackupError::Key(format!(
                "{what}: not a key file this program reads ({} version {}, {})",
                k.format, k.version, k.cipher
            )));
        }
        Ok(k)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Unwrap the master key: a wrong passphrase (or a damaged file) is
    /// refused, never guessed past.
    pub fn unlock(&self, passphrase: &[u8], what: &str) -> Result<Cipher> {
        let k = kek(&self.kdf, passphrase)?;
        let nonce = unhex(&self.nonce).filter(|n| n.len() == 12);
        let wrapped = unhex(&self.wrapped);
        let (Some(nonce), Some(wrapped)) = (nonce, wrapped) else {
            return Err(BackupError::Key(format!(
                "{what}: damaged (nonce or key not hex)"
            )));
        };
        let master = Aes256Gcm::new((&k).into())
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &wrapped,
                    aad: self.key_id.as_bytes(),
                },
            )
            .map_err(|_| {
                BackupError::Key(format!("{what}: wrong passphrase (or a damaged key file)"))
            })?;
        let master: [u8; 64] = master
            .try_into()
            .map_err(|_| BackupError::Key(format!("{what}: damaged (key length)")))?;
        if key_id(&master) != self.key_id {
            return Err(BackupError::Key(format!(
                "{what}: damaged (key ID does not match the key)"
            )));
        }
        let mut enc = [0u8; 32];
        enc.copy_from_slice(&master[..32]);
        let mut id = [0u8; 32];
        id.copy_from_slice(&master[32..]);
        Ok(Cipher::new(&enc, id))
    }
}

/// The passphrase: `VMFS_BACKUP_PASSPHRASE`, else the file named by
/// `VMFS_BACKUP_PASSPHRASE_FILE` (first line), else asked on the terminal.
pub fn passphrase(prompt: &str) -> Result<Vec<u8>> {
    if let Ok(p) = std::env::var("VMFS_BACKUP_PASSPHRASE") {
        return Ok(p.into_bytes());
    }
    if let Ok(f) = std::env::var("VMFS_BACKUP_PASSPHRASE_FILE") {
        let t = std::fs::read(&f).map_err(|e| BackupError::Key(format!("{f}: {e}")))?;
        let line = t.split(|&c| c == b'\n').next().unwrap_or_default();
        return Ok(line.to_vec());
    }
    read_tty(prompt)
}

fn read_tty(prompt: &str) -> Result<Vec<u8>> {
    use std::io::{BufRead, Write};
    use std::os::unix::io::AsRawFd;
    let none = || {
        BackupError::Key(
            "the repository is encrypted: give its passphrase on a terminal, or in VMFS_BACKUP_PASSPHRASE or VMFS_BACKUP_PASSPHRASE_FILE".into(),
        )
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| none())?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios calls on an open descriptor with a zeroed struct
    // that tcgetattr fills in.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut old) } != 0 {
        return Err(none());
    }
    let mut quiet = old;
    quiet.c_lflag &= !libc::ECHO;
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    let _ = write!(&tty, "{prompt}");
    let mut line = String::new();
    let r = std::io::BufReader::new(&tty).read_line(&mut line);
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    let _ = writeln!(&tty);
    r.map_err(|_| none())?;
    Ok(line.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_passphrase_is_refused() {
        let k = KeyFile::create(b"secret").unwrap();
        let k2 = KeyFile::parse(&k.to_json(), "k").unwrap();
        assert!(k2.unlock(b"secret", "k").is_ok());
        assert!(k2.unlock(b"Secret", "k").is_err());
        let mut bad = k2.clone();
        bad.key_id = "0000000000000000".into();
        assert!(bad.unlock(b"secret", "k").is_err());
    }
}
