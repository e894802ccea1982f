//! A repository: its config, its key, and the objects in it (docs/FORMAT.md,
//! "Backup repository"):
//!
//! ```text
//! config                              what the repository is (plain)
//! keys/KEY-ID                         the passphrase-wrapped key (encrypted repositories)
//! chunks/AB/DIGEST                    a chunk, named by its (keyed) BLAKE3
//! backups/NAME/STAMP-RAND/DISK.index  a disk's fixed index
//! backups/NAME/STAMP-RAND/manifest    the backup, written last
//! sessions/ID, sessions/ID.chunks-N   running writers and their intent logs
//! gc/condemned/L, gc/rescue/L/..., gc/sweeping/L   garbage collection
//! ```

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{self, Backend};
use crate::blob::{self, Cipher, Kind};
use crate::error::{corrupt, BackupError, Result};
use crate::index::{Digest, Index};
use crate::keys::KeyFile;
use crate::manifest::{DiskEntry, Manifest};
use crate::util::{check_name, hex, unhex};

pub const DEFAULT_CHUNK: u32 = 4 << 20;
const FORMAT: &str = "vmfs-backup-repository";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_size: u32,
    pub digest: String,
    pub compression: String,
    pub encryption: Option<Encryption>,
    pub created: String,
    /// How long a writer's session lives without a heartbeat (seconds)
    /// before garbage collection takes it for dead.
    #[serde(default = "default_lease")]
    pub lease_secs: u64,
    /// In an encrypted repository: a MAC of the rest of the config under
    /// the master key, so no one who can write the store can turn
    /// encryption off or change the lease unnoticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Config {
    fn mac_with(&self, c: &Cipher) -> String {
        let mut plain = self.clone();
        plain.mac = None;
        let body = serde_json::to_vec(&plain).unwrap_or_default();
        let k = blake3::derive_key("vmfs-backup 2026-11 config mac", &c.id_key);
        hex(blake3::keyed_hash(&k, &body).as_bytes())
    }
}

fn default_lease() -> u64 {
    600
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Encryption {
    pub cipher: String,
    pub key_id: String,
}

/// How to get the key of an encrypted repository.
#[derive(Default, Clone)]
pub struct KeySource {
    /// A key file; else the copy in the repository.
    pub file: Option<std::path::PathBuf>,
    /// The passphrase; else [`crate::keys::passphrase`] asks.
    pub passphrase: Option<Vec<u8>>,
}

impl KeySource {
    fn passphrase(&self, prompt: &str) -> Result<Vec<u8>> {
        match &self.passphrase {
            Some(p) => Ok(p.clone()),
            None => crate::keys::passphrase(prompt),
        }
    }
}

pub struct Repo {
    pub backend: Arc<dyn Backend>,
    pub config: Config,
    pub cipher: Option<Cipher>,
}

/// A backup, as listed: its ID and when its manifest was written.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub name: String,
    pub modified_ms: i64,
}

pub fn manifest_key(id: &str) -> String {
    format!("backups/{id}/manifest")
}

pub fn index_key(id: &str, disk: &str) -> String {
    format!("backups/{id}/{disk}.index")
}

pub fn chunk_key(d: &Digest) -> String {
    let h = hex(d);
    format!("chunks/{}/{h}", &h[..2])
}

pub fn digest_of_key(key: &str) -> Option<Digest> {
    let h = key.rsplit('/').next()?;
    unhex(h)?.try_into().ok()
}

impl Repo {
    /// Make a new repository at `url`. With `encrypt`, a new key is made,
    /// written to that file (mode 0600, never over an existing file) and
    /// its wrapped copy to `keys/`.
    pub fn init(url: &str, chunk_size: u32, encrypt: Option<(&Path, &[u8])>) -> Result<Repo> {
        if !(64 * 1024..=16 << 20).contains(&chunk_size) || !chunk_size.is_power_of_two() {
            return Err(BackupError::Invalid(format!(
                "chunk size {chunk_size}: a power of two from 64 KiB to 16 MiB (a multiple of change tracking's 64 KiB blocks)"
            )));
        }
        let backend = backend::open(url)?;
        if backend.exists("config")? {
            return Err(BackupError::Invalid(format!(
                "{}: already a repository",
                backend.describe()
            )));
        }
        let mut cipher = None;
        let mut encryption = None;
        if let Some((keyfile, pass)) = encrypt {
            let kf = KeyFile::create(pass)?;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(keyfile)
                .map_err(|e| BackupError::Key(format!("{}: {e}", keyfile.display())))?;
            use std::io::Write;
            f.write_all(&kf.to_json())
                .and_then(|_| f.sync_all())
                .map_err(|e| BackupError::Key(format!("{}: {e}", keyfile.display())))?;
            backend.put_new(&format!("keys/{}", kf.key_id), &kf.to_json())?;
            cipher = Some(kf.unlock(pass, &keyfile.display().to_string())?);
            encryption = Some(Encryption {
                cipher: "aes-256-gcm".into(),
                key_id: kf.key_id,
            });
        }
        let config = Config {
            format: FORMAT.into(),
            version: 1,
            id: hex(&crate::util::random_bytes::<16>()),
            chunk_size,
            digest: "blake3".into(),
            compression: "zstd".into(),
            encryption,
            created: crate::util::human_time(crate::util::unix_now()),
            // Tests shorten it; writers and collectors read it from here,
            // so they always agree.
            lease_secs: std::env::var("VMFS_BACKUP_LEASE_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default_lease()),
            mac: None,
        };
        let mut config = config;
        if let Some(c) = &cipher {
            config.mac = Some(config.mac_with(c));
        }
        let body = serde_json::to_vec_pretty(&config).unwrap_or_default();
        if !backend.put_new(
            "config",
            &blob::seal(Kind::Config, &body, false, None, b"config"),
        )? {
            return Err(BackupError::Invalid(format!(
                "{}: already a repository",
                backend.describe()
            )));
        }
        Ok(Repo {
            backend,
            config,
            cipher,
        })
    }

    pub fn open(url: &str, key: &KeySource) -> Result<Repo> {
        let backend = backend::open(url)?;
        let what = format!("{}/config", backend.describe());
        let raw = backend.get("config")?.ok_or_else(|| {
            BackupError::NotFound(format!(
                "{}: not a repository (no config; `vmfs backup init` makes one)",
                backend.describe()
            ))
        })?;
        let body = blob::open(Kind::Config, &raw, None, b"config", &what)?;
        let config: Config =
            serde_json::from_slice(&body).map_err(|e| corrupt(&what, e.to_string()))?;
        if config.format != FORMAT || config.version != 1 || config.digest != "blake3" {
            return Err(corrupt(
                &what,
                format!(
                    "{} version {} with {} digests: not one this program reads",
                    config.format, config.version, config.digest
                ),
            ));
        }
        if !(64 * 1024..=16 << 20).contains(&config.chunk_size)
            || !config.chunk_size.is_power_of_two()
        {
            return Err(corrupt(&what, format!("chunk size {}", config.chunk_size)));
        }
        let cipher = match &config.encryption {
            None => {
                if !backend.list("keys/")?.is_empty() {
                    return Err(BackupError::Key(format!(
                        "{what}: says the repository is not encrypted, but it holds keys: refused (has the config been tampered with?)"
                    )));
                }
                if key.file.is_some() {
                    return Err(BackupError::Key(format!(
                        "{}: the repository is not encrypted; no key is needed",
                        backend.describe()
                    )));
                }
                None
            }
            Some(enc) => {
                let (kf, kwhat) = match &key.file {
                    Some(p) => {
                        let t = std::fs::read(p)
                            .map_err(|e| BackupError::Key(format!("{}: {e}", p.display())))?;
                        (
                            KeyFile::parse(&t, &p.display().to_string())?,
                            p.display().to_string(),
                        )
                    }
                    None => {
                        let k = format!("keys/{}", enc.key_id);
                        let t = backend.get(&k)?.ok_or_else(|| {
                            BackupError::Key(format!("{}: encrypted, and its key copy {k} is gone: give the key file with --key", backend.describe()))
                        })?;
                        (
                            KeyFile::parse(&t, &k)?,
                            format!("{}/{k}", backend.describe()),
                        )
                    }
                };
                if kf.key_id != enc.key_id {
                    return Err(BackupError::Key(format!(
                        "{kwhat}: key {} is not this repository's key ({})",
                        kf.key_id, enc.key_id
                    )));
                }
                let pass = key.passphrase(&format!("passphrase for {kwhat}: "))?;
                let c = kf.unlock(&pass, &kwhat)?;
                if config.mac.as_deref() != Some(config.mac_with(&c).as_str()) {
                    return Err(BackupError::Key(format!(
                        "{what}: does not match its MAC under the key: refused (has it been tampered with?)"
                    )));
                }
                Some(c)
            }
        };
        Ok(Repo {
            backend,
            config,
            cipher,
        })
    }

    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    pub fn lease_ms(&self) -> i64 {
        self.config.lease_secs.clamp(1, 86_400) as i64 * 1000
    }

    /// A chunk's digest: BLAKE3, keyed with the repository's ID key when
    /// it is encrypted.
    pub fn chunk_id(&self, data: &[u8]) -> Digest {
        match &self.cipher {
            Some(c) => *blake3::keyed_hash(&c.id_key, data).as_bytes(),
            None => *blake3::hash(data).as_bytes(),
        }
    }

    pub fn seal_chunk(&self, d: &Digest, data: &[u8]) -> Vec<u8> {
        blob::seal(Kind::Chunk, data, true, self.cipher.as_ref(), d)
    }

    /// A chunk's content, checked against its digest.
    pub fn get_chunk(&self, d: &Digest) -> Result<Vec<u8>> {
        let key = chunk_key(d);
        let what = format!("{}/{key}", self.describe());
        let raw = self
            .backend
            .get(&key)?
            .ok_or_else(|| BackupError::NotFound(what.clone()))?;
        self.open_chunk(d, &raw, &what)
    }

    pub fn open_chunk(&self, d: &Digest, raw: &[u8], what: &str) -> Result<Vec<u8>> {
        let data = blob::open(Kind::Chunk, raw, self.cipher.as_ref(), d, what)?;
        if &self.chunk_id(&data) != d {
            return Err(corrupt(what, "content does not hash to the chunk's name"));
        }
        Ok(data)
    }

    /// Seal and store a backup's object (an index or a manifest), create-only.
    pub fn put_object(&self, kind: Kind, key: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let obj = blob::seal(
            kind,
            plain,
            kind == Kind::Manifest,
            self.cipher.as_ref(),
            key.as_bytes(),
        );
        if !self.backend.put_new(key, &obj)? {
            return Err(BackupError::Invalid(format!(
                "{}/{key}: already there",
                self.describe()
            )));
        }
        Ok(obj)
    }

    pub fn get_object(&self, kind: Kind, key: &str) -> Result<Vec<u8>> {
        let what = format!("{}/{key}", self.describe());
        let raw = self
            .backend
            .get(key)?
            .ok_or_else(|| BackupError::NotFound(what.clone()))?;
        blob::open(kind, &raw, self.cipher.as_ref(), key.as_bytes(), &what)
    }

    /// Every whole backup (those whose manifest is written), oldest first
    /// by ID within a name.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let mut v: Vec<Listed> = self
            .backend
            .list("backups/")?
            .into_iter()
            .filter_map(|e| {
                let id = e
                    .key
                    .strip_prefix("backups/")?
                    .strip_suffix("/manifest")?
                    .to_string();
                let (name, _) = id.split_once('/')?;
                Some(Listed {
                    name: name.to_string(),
                    id,
                    modified_ms: e.modified_ms,
                })
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    pub fn manifest(&self, id: &str) -> Result<Manifest> {
        let key = manifest_key(id);
        let m = Manifest::decode(
            &self.get_object(Kind::Manifest, &key)?,
            &format!("{}/{key}", self.describe()),
        )?;
        if m.id != id {
            return Err(corrupt(
                format!("{}/{key}", self.describe()),
                format!("names backup {}", m.id),
            ));
        }
        Ok(m)
    }

    /// A disk's index, checked against the digest its manifest recorded.
    pub fn index(&self, d: &DiskEntry) -> Result<Index> {
        let what = format!("{}/{}", self.describe(), d.index);
        let raw = self
            .backend
            .get(&d.index)?
            .ok_or_else(|| BackupError::NotFound(what.clone()))?;
        if hex(blake3::hash(&raw).as_bytes()) != d.index_digest {
            return Err(corrupt(
                &what,
                "does not match the digest its manifest recorded",
            ));
        }
        let plain = blob::open(
            Kind::Index,
            &raw,
            self.cipher.as_ref(),
            d.index.as_bytes(),
            &what,
        )?;
        let i = Index::decode(&plain, &what)?;
        if i.size != d.size || i.chunk_size != d.chunk_size {
            return Err(corrupt(
                &what,
                format!(
                    "{} bytes in {}-byte chunks; the manifest says {} in {}",
                    i.size, i.chunk_size, d.size, d.chunk_size
                ),
            ));
        }
        Ok(i)
    }

    /// `NAME` (its newest backup), `NAME/latest`, or a backup's ID.
    pub fn resolve(&self, spec: &str) -> Result<String> {
        let (name, which) = match spec.split_once('/') {
            Some((n, w)) => (n, Some(w)),
            None => (spec, None),
        };
        check_name("backup name", name)?;
        let all = self.list()?;
        let mine: Vec<&Listed> = all.iter().filter(|l| l.name == name).collect();
        match which {
            None | Some("latest") => mine.last().map(|l| l.id.clone()).ok_or_else(|| {
                BackupError::NotFound(format!("{}: no backup named {name}", self.describe()))
            }),
            Some(_) => mine
                .iter()
                .find(|l| l.id == spec)
                .map(|l| l.id.clone())
                .ok_or_else(|| {
                    BackupError::NotFound(format!("{}: no backup {spec}", self.describe()))
                }),
        }
    }
}
