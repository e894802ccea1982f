//! Where a repository's objects live: a local directory or an
//! S3-compatible bucket. The repository needs only what both give without
//! a lock server: create-only writes (`put_new`: a link(2) that fails on
//! an existing name; S3's conditional put, `If-None-Match: *`), plain
//! writes for records a writer owns, reads, listing, deletes, and the
//! store's own clock (an object's modification time), so no two machines'
//! clocks are ever compared.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{BackupError, Result};

/// One object, as listed.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub size: u64,
    /// When it was last written, in milliseconds, by the store's clock.
    pub modified_ms: i64,
}

pub trait Backend: Send + Sync {
    /// Create `key` with `data` unless it exists: true if this call made
    /// it. Never replaces an object.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool>;
    /// Create or replace `key` (for records one writer owns).
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// The object, or `None` if it is not there.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.size(key)?.is_some())
    }
    /// The object's size, or `None` if it is not there.
    fn size(&self, key: &str) -> Result<Option<u64>>;
    /// Every object whose key starts with `prefix` (a folder: ends in `/`).
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;
    /// Remove `key`; no error if it is not there.
    fn delete(&self, key: &str) -> Result<()>;
    /// Now, by the store's clock (milliseconds).
    fn now_ms(&self) -> Result<i64>;
    /// Remove what writers that died left half-written in the folder of
    /// `key` (a local directory's temporary files older than `age_ms`;
    /// nothing on S3, whose writes are whole or absent).
    fn clean_partial(&self, _key: &str, _age_ms: i64) -> Result<usize> {
        Ok(0)
    }
    /// The repository's location, for messages.
    fn describe(&self) -> String;
}

/// Open `REPO`: a directory, or `s3://BUCKET/PREFIX`.
pub fn open(url: &str) -> Result<Arc<dyn Backend>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        #[cfg(feature = "s3")]
        return Ok(Arc::new(S3::new(rest)?));
        #[cfg(not(feature = "s3"))]
        return Err(BackupError::Invalid(format!(
            "s3://{rest}: built without S3 support"
        )));
    } else if url.contains("://") {
        Err(BackupError::Invalid(format!(
            "{url}: a repository is a directory or s3://BUCKET/PREFIX"
        )))
    } else {
        Ok(Arc::new(LocalDir::new(url)))
    }
}

fn backend_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BackupError {
    BackupError::Backend {
        what: what.to_string(),
        msg: e.to_string(),
    }
}

// ---------------------------------------------------------------- local

pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> LocalDir {
        LocalDir { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(BackupError::Invalid(format!(
                "{key:?} is not an object key"
            )));
        }
        Ok(self.root.join(key))
    }

    /// Write `data` to a new temporary file beside `path`, durably.
    fn temp(&self, path: &Path, data: &[u8]) -> Result<PathBuf> {
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(|e| backend_err(dir.display(), e))?;
        let tmp = dir.join(format!(
            ".tmp-{}",
            crate::util::hex(&crate::util::random_bytes::<8>())
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| backend_err(tmp.display(), e))?;
        f.write_all(data).and_then(|_| f.sync_data()).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            backend_err(tmp.display(), e)
        })?;
        Ok(tmp)
    }

    fn sync_dir(&self, path: &Path) {
        if let Some(d) = path.parent() {
            if let Ok(f) = std::fs::File::open(d) {
                let _ = f.sync_all();
            }
        }
    }
}

impl Backend for LocalDir {
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        let path = self.path(key)?;
        if path.exists() {
            return Ok(false);
        }
        let tmp = self.temp(&path, data)?;
        let r = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match r {
            Ok(()) => {
                self.sync_dir(&path);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(backend_err(path.display(), e)),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let tmp = self.temp(&path, data)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            backend_err(path.display(), e)
        })?;
        self.sync_dir(&path);
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend_err(path.display(), e)),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend_err(path.display(), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let (dir, start) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let base = if dir.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir)
        };
        let mut stack = vec![(base, dir.to_string())];
        while let Some((d, key)) = stack.pop() {
            let rd = match std::fs::read_dir(&d) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(backend_err(d.display(), e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| backend_err(d.display(), e))?;
                let name = ent.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let k = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}/{name}")
                };
                if key == dir && !name.starts_with(start) {
                    continue;
                }
                let md = match ent.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(backend_err(ent.path().display(), e)),
                };
                if md.is_dir() {
                    stack.push((ent.path(), k));
                } else {
                    let modified_ms = md
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                    out.push(Entry {
                        key: k,
                        size: md.len(),
                        modified_ms,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend_err(path.display(), e)),
        }
    }

    fn now_ms(&self) -> Result<i64> {
        let key = format!(
            "gc/.clock-{}",
            crate::util::hex(&crate::util::random_bytes::<8>())
        );
        let path = self.root.join(&key);
        let tmp = self.temp(&path, b"")?;
        let t = std::fs::metadata(&tmp)
            .and_then(|m| m.modified())
            .map_err(|e| backend_err(tmp.display(), e))?;
        let _ = std::fs::remove_file(&tmp);
        Ok(t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0))
    }

    fn clean_partial(&self, key: &str, age_ms: i64) -> Result<usize> {
        let path = self.path(key)?;
        let Some(dir) = path.parent() else {
            return Ok(0);
        };
        let rd = match std::fs::read_dir(dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(backend_err(dir.display(), e)),
        };
        let mut n = 0;
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with(".tmp-") {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a.as_millis() as i64 > age_ms);
            if old && std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

// ---------------------------------------------------------------- S3

#[cfg(feature = "s3")]
/// An S3-compatible bucket through `object_store`, driven from our
/// threads by a small runtime of its own. Endpoint, region and keys come
/// from the usual AWS environment variables (`AWS_ENDPOINT_URL`,
/// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
pub struct S3 {
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Runtime,
    bucket: String,
    prefix: String,
}

#[cfg(feature = "s3")]
impl S3 {
    fn new(rest: &str) -> Result<S3> {
        use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b.to_string(), p.trim_matches('/').to_string()),
            None => (rest.to_string(), String::new()),
        };
        if bucket.is_empty() {
            return Err(BackupError::Invalid(
                "s3://BUCKET/PREFIX: the bucket is missing".into(),
            ));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok();
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            b = b.with_region("us-east-1");
        }
        let store = b
            .build()
            .map_err(|e| backend_err(format!("s3://{rest}"), e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| backend_err("s3 runtime", e))?;
        Ok(S3 {
            store: Arc::new(store),
            rt,
            bucket,
            prefix,
        })
    }

    fn path(&self, key: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        }
    }

    fn what(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.path(key))
    }
}

#[cfg(feature = "s3")]
impl Backend for S3 {
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        use object_store::{PutMode, PutOptions, PutPayload};
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        match self
            .rt
            .block_on(self.store.put_opts(&self.path(key), payload, opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(backend_err(self.what(key), e)),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let payload = object_store::PutPayload::from(bytes::Bytes::copy_from_slice(data));
        self.rt
            .block_on(self.store.put(&self.path(key), payload))
            .map(|_| ())
            .map_err(|e| backend_err(self.what(key), e))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let r = self.rt.block_on(async {
            let g = self.store.get(&self.path(key)).await?;
            g.bytes().await
        });
        match r {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(backend_err(self.what(key), e)),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.rt.block_on(self.store.head(&self.path(key))) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(backend_err(self.what(key), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        use futures::TryStreamExt;
        let full = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        // object_store lists by whole path segments: list the folder and
        // keep the keys that start with the prefix.
        let folder = match full.rfind('/') {
            Some(i) => full[..i].to_string(),
            None => String::new(),
        };
        let p = object_store::path::Path::from(folder);
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&p)).try_collect())
            .map_err(|e| backend_err(self.what(prefix), e))?;
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out: Vec<Entry> = metas
            .into_iter()
            .filter(|m| m.location.as_ref().starts_with(&full))
            .map(|m| Entry {
                key: m.location.as_ref()[strip..].to_string(),
                size: m.size,
                modified_ms: m.last_modified.timestamp_millis(),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match self.rt.block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend_err(self.what(key), e)),
        }
    }

    fn now_ms(&self) -> Result<i64> {
        let key = format!(
            "gc/clock/{}",
            crate::util::hex(&crate::util::random_bytes::<8>())
        );
        self.put(&key, b"")?;
        let m = self
            .rt
            .block_on(self.store.head(&self.path(&key)))
            .map_err(|e| backend_err(self.what(&key), e))?;
        self.delete(&key)?;
        Ok(m.last_modified.timestamp_millis())
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}
