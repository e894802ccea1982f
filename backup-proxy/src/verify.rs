//! Verify: read every manifest, index and chunk that the backups asked
//! about reference, check each against its checksum and digest, and name
//! the backups each damaged object breaks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::Result;
use crate::index::{Digest, ZERO};
use crate::repo::{chunk_key, Repo};

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub backups: usize,
    pub chunks: usize,
    pub bytes: u64,
    /// Backup ID → what is wrong with it.
    pub damaged: BTreeMap<String, Vec<String>>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Verify `only` (backup IDs) or every backup.
pub fn verify(
    repo: &Repo,
    only: Option<&[String]>,
    workers: usize,
    progress: bool,
) -> Result<VerifyReport> {
    let mut rep = VerifyReport::default();
    let ids: Vec<String> = match only {
        Some(v) => v.to_vec(),
        None => repo.list()?.into_iter().map(|l| l.id).collect(),
    };
    let mut users: HashMap<Digest, BTreeSet<String>> = HashMap::new();
    for id in &ids {
        rep.backups += 1;
        let m = match repo.manifest(id) {
            Ok(m) => m,
            Err(e) => {
                rep.damaged
                    .entry(id.clone())
                    .or_default()
                    .push(e.to_string());
                continue;
            }
        };
        for d in &m.disks {
            match repo.index(d) {
                Ok(i) => {
                    for dg in i.digests.into_iter().filter(|d| *d != ZERO) {
                        users.entry(dg).or_default().insert(id.clone());
                    }
                }
                Err(e) => rep
                    .damaged
                    .entry(id.clone())
                    .or_default()
                    .push(e.to_string()),
            }
        }
    }
    let all: Vec<&Digest> = users.keys().collect();
    rep.chunks = all.len();
    let next = AtomicUsize::new(0);
    let bad: Mutex<Vec<(Digest, String)>> = Mutex::new(Vec::new());
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let pb = crate::backup::bar(
        all.len() as u64 * repo.config.chunk_size as u64,
        progress,
        "verify",
    );
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(d) = all.get(k) else { return };
                match repo.get_chunk(d) {
                    Ok(data) => {
                        bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if matches!(e, crate::error::BackupError::Corrupt { .. }) {
                            set_aside(repo, d);
                        }
                        bad.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((**d, e.to_string()))
                    }
                }
                pb.inc(repo.config.chunk_size as u64);
            });
        }
    });
    pb.finish_and_clear();
    rep.bytes = bytes.into_inner();
    for (d, why) in bad.into_inner().unwrap_or_else(|p| p.into_inner()) {
        for id in users.get(&d).into_iter().flatten() {
            rep.damaged
                .entry(id.clone())
                .or_default()
                .push(format!("chunk {}: {why}", chunk_key(&d)));
        }
    }
    Ok(rep)
}

/// Move a damaged chunk to `damaged/` (kept for a post-mortem), so the
/// next backup holding the same data stores it again and the backups that
/// reference it are whole once more (PBS does the same).
fn set_aside(repo: &Repo, d: &Digest) {
    let key = chunk_key(d);
    let r = repo.backend.get(&key).and_then(|raw| {
        if let Some(raw) = raw {
            let aside = format!(
                "damaged/{}-{}",
                crate::util::hex(d),
                crate::util::stamp(crate::util::unix_now())
            );
            repo.backend.put(&aside, &raw)?;
        }
        repo.backend.delete(&key)
    });
    match r {
        Ok(()) => tracing::warn!(
            "{}/{key}: damaged; moved to damaged/ so the next backup stores it again",
            repo.describe()
        ),
        Err(e) => tracing::warn!(
            "{}/{key}: damaged, and could not be moved aside: {e}",
            repo.describe()
        ),
    }
}
