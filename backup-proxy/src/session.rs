//! A writer's session: how a backup stays safe from a garbage collection
//! running on another machine at the same time, with no lock server
//! (docs/FORMAT.md, "Garbage collection").
//!
//! Garbage collection first *condemns* chunks (a list under
//! `gc/condemned/`), and deletes them only in a later *sweep*. A writer:
//! - registers `sessions/ID` before it reads the condemned lists, and
//!   rewrites it every lease/8 (its modification time, by the store's
//!   clock, is its heartbeat), naming every list it has *acknowledged*;
//! - acknowledges a list only after writing a rescue record
//!   (`gc/rescue/L/...`) for every chunk of that list it references;
//! - for a chunk of a known list that it comes to reference later, writes
//!   the rescue record first, then looks for the list's sweep marker: if a
//!   sweep has begun, it waits for it to end and stores the chunk again.
//!
//! A sweep writes its marker, then requires every live session to have
//! acknowledged the list, then reads the rescue records: a writer's rescue
//! either precedes the sweep's read (and the chunk is kept) or follows the
//! marker (and the writer sees it). Before a chunk is stored, the writer
//! logs its digest (`sessions/ID.chunks-N`), so the chunks of a backup
//! that was killed are found without listing the whole store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::blob::{self, Kind};
use crate::error::{BackupError, Result};
use crate::index::{decode_list, encode_list, Digest};
use crate::repo::{chunk_key, Repo};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// The backup it writes.
    pub backup: String,
    /// Condemned lists it has acknowledged.
    pub acked: Vec<String>,
}

pub fn session_key(id: &str) -> String {
    format!("sessions/{id}")
}

pub fn read_list(repo: &Repo, key: &str) -> Result<Vec<Digest>> {
    let obj = repo.get_object(Kind::ChunkList, key)?;
    decode_list(&obj, &format!("{}/{key}", repo.describe()))
}

pub fn put_list(repo: &Repo, key: &str, d: &[Digest]) -> Result<bool> {
    repo.backend.put_new(
        key,
        &blob::seal(
            Kind::ChunkList,
            &encode_list(d),
            false,
            None,
            key.as_bytes(),
        ),
    )
}

pub fn read_record(repo: &Repo, key: &str) -> Result<Option<SessionRecord>> {
    let b = match repo.get_object(Kind::Session, key) {
        Ok(b) => b,
        Err(BackupError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&b)
        .map(Some)
        .map_err(|e| crate::error::corrupt(format!("{}/{key}", repo.describe()), e.to_string()))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

struct State {
    known: HashMap<String, HashSet<Digest>>,
    referenced: HashSet<Digest>,
    record: SessionRecord,
}

pub struct Session {
    repo: Arc<Repo>,
    key: String,
    state: Mutex<State>,
    seq: AtomicU64,
    /// When the last write of the record that succeeded began
    /// ([`crate::util::boot_ms`]).
    last_beat: AtomicI64,
    /// Set for good once two successful heartbeats were more than half a
    /// lease apart: a collector may have taken us for dead meanwhile.
    lapsed: AtomicBool,
    stop: (Mutex<bool>, Condvar),
    failed: AtomicBool,
}

impl Session {
    /// Register, then learn (and acknowledge) the condemned lists.
    pub fn start(repo: Arc<Repo>, backup: &str) -> Result<Arc<Session>> {
        let id = format!(
            "{}-{}",
            crate::util::stamp(crate::util::unix_now()),
            crate::util::hex(&crate::util::random_bytes::<6>())
        );
        let s = Arc::new(Session {
            key: session_key(&id),
            repo,
            state: Mutex::new(State {
                known: HashMap::new(),
                referenced: HashSet::new(),
                record: SessionRecord {
                    id,
                    host: hostname(),
                    pid: std::process::id(),
                    backup: backup.to_string(),
                    acked: Vec::new(),
                },
            }),
            seq: AtomicU64::new(0),
            last_beat: AtomicI64::new(crate::util::boot_ms()),
            lapsed: AtomicBool::new(false),
            stop: (Mutex::new(false), Condvar::new()),
            failed: AtomicBool::new(false),
        });
        s.write_record()?;
        s.learn()?;
        let hb = s.clone();
        // Every lease/8 (VMFS_BACKUP_HEARTBEAT_MS: oftener, so that
        // collections need not wait as long for acknowledgements).
        let every = std::env::var("VMFS_BACKUP_HEARTBEAT_MS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(s.repo.lease_ms() / 8)
            .clamp(50, s.repo.lease_ms() / 8) as u64;
        let every = Duration::from_millis(every);
        std::thread::spawn(move || hb.heartbeat(every));
        Ok(s)
    }

    pub fn id(&self) -> String {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record
            .id
            .clone()
    }

    fn write_record(&self) -> Result<()> {
        let body = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec(&st.record).unwrap_or_default()
        };
        let began = crate::util::boot_ms();
        self.repo.backend.put(
            &self.key,
            &blob::seal(Kind::Session, &body, false, None, self.key.as_bytes()),
        )?;
        let prev = self.last_beat.swap(began, Ordering::SeqCst);
        if crate::util::boot_ms() - prev > self.repo.lease_ms() / 2 {
            self.lapsed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Read condemned lists not yet known; rescue what we reference of
    /// them; acknowledge them.
    fn learn(&self) -> Result<()> {
        let lists = self.repo.backend.list("gc/condemned/")?;
        let mut changed = false;
        for e in lists {
            let lid = e.key["gc/condemned/".len()..].to_string();
            if self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .known
                .contains_key(&lid)
            {
                continue;
            }
            let digests = match read_list(&self.repo, &e.key) {
                Ok(d) => d,
                Err(BackupError::NotFound(_)) => continue, // swept meanwhile
                Err(e @ BackupError::Corrupt { .. }) => {
                    // Not acknowledged: no sweep of it can run; the next
                    // collection sets it aside.
                    tracing::warn!("{e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let set: HashSet<Digest> = digests.into_iter().collect();
            let mine: Vec<Digest> = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let mine = st.referenced.intersection(&set).copied().collect();
                // Known from now on: a chunk referenced from here is
                // rescued by `reference` itself.
                st.known.insert(lid.clone(), set);
                mine
            };
            if !mine.is_empty() {
                if let Err(e) = self.rescue(&lid, &mine) {
                    // Not acknowledged; learnt afresh at the next beat.
                    self.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .known
                        .remove(&lid);
                    return Err(e);
                }
            }
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record
                .acked
                .push(lid);
            changed = true;
        }
        if changed {
            self.write_record()?;
        }
        Ok(())
    }

    fn rescue(&self, lid: &str, d: &[Digest]) -> Result<String> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let key = format!("gc/rescue/{lid}/{}-{n}", self.id());
        put_list(&self.repo, &key, d)?;
        Ok(key)
    }

    fn heartbeat(self: Arc<Self>, every: Duration) {
        loop {
            {
                let (m, cv) = &self.stop;
                let g = m.lock().unwrap_or_else(|p| p.into_inner());
                let (g, _) = cv.wait_timeout(g, every).unwrap_or_else(|p| p.into_inner());
                if *g {
                    return;
                }
            }
            // The record first: renewing it must not hang on the lists.
            if let Err(e) = self.write_record() {
                tracing::warn!("backup session {}: heartbeat: {e}", self.key);
            }
            if let Err(e) = self.learn() {
                tracing::warn!("backup session {}: reading condemned lists: {e}", self.key);
            }
        }
    }

    /// Log `d` as chunks this session may create, before storing them.
    pub fn intend(&self, d: &[Digest]) -> Result<()> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        put_list(&self.repo, &format!("{}.chunks-{n}", self.key), d)?;
        Ok(())
    }

    /// This backup now references `d`. `store` puts the chunk there again
    /// (reading the source if it must) when a sweep that began before our
    /// rescue may delete it.
    pub fn reference(&self, d: &Digest, store: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let lists: Vec<String> = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !st.referenced.insert(*d) || st.known.is_empty() {
                return Ok(());
            }
            st.known
                .iter()
                .filter(|(_, s)| s.contains(d))
                .map(|(l, _)| l.clone())
                .collect()
        };
        for lid in lists {
            let rescue = self.rescue(&lid, &[*d])?;
            let marker = format!("gc/sweeping/{lid}");
            let list = format!("gc/condemned/{lid}");
            // The marker first, then the list (a sweep removes the list,
            // then its marker): no marker, then the list still there, means
            // the sweep has not begun and will read our rescue.
            let sweeping = self.repo.backend.exists(&marker)?;
            if sweeping || !self.repo.backend.exists(&list)? {
                // It has begun, or ended, maybe without our rescue: wait
                // for it to end (or to be abandoned), then make sure of the
                // chunk.
                // Abandoned when its marker has not been renewed (its
                // modification time unchanged) for a lease of our own time.
                let lease = self.repo.lease_ms();
                let mut seen: Option<(i64, i64)> = None;
                loop {
                    let m = self.repo.backend.list(&marker)?;
                    let Some(e) = m.iter().find(|e| e.key == marker) else {
                        break;
                    };
                    match seen {
                        Some((t, since)) if t == e.modified_ms => {
                            if crate::util::boot_ms() - since > lease {
                                break;
                            }
                        }
                        _ => seen = Some((e.modified_ms, crate::util::boot_ms())),
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                if !self.repo.backend.exists(&chunk_key(d))? {
                    self.intend(&[*d])?;
                    store()?;
                }
                if !self.repo.backend.exists(&list)? {
                    // Swept: the list is no more, nor need our rescues be.
                    self.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .known
                        .remove(&lid);
                    self.repo.backend.delete(&rescue)?;
                }
            }
        }
        Ok(())
    }

    /// Before the manifest: a writer whose heartbeat lapsed for half a
    /// lease (stalled, cut off from the store, suspended) may have been
    /// taken for dead by a collector, which then collects what it stored
    /// and its index objects: it fails rather than write a manifest that
    /// may name missing objects.
    pub fn check_before_commit(&self) -> Result<()> {
        if crate::util::boot_ms() - self.last_beat.load(Ordering::SeqCst) > self.repo.lease_ms() / 4
        {
            self.write_record()?;
        }
        if self.lapsed.load(Ordering::SeqCst) {
            return Err(BackupError::Invalid(format!(
                "backup session {}: its heartbeat lapsed for more than half the {} s lease, so a collection may have taken it for dead; run the backup again",
                self.key,
                self.repo.lease_ms() / 1000
            )));
        }
        Ok(())
    }

    pub fn failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Stop the heartbeat. After a whole backup the intent logs go (its
    /// manifest now references what it stored); after a failure they stay
    /// for garbage collection, and the record goes so it knows.
    pub fn end(&self) {
        {
            let (m, cv) = &self.stop;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
        if !self.failed.load(Ordering::Relaxed) {
            if let Ok(l) = self.repo.backend.list(&format!("{}.chunks-", self.key)) {
                for e in l {
                    let _ = self.repo.backend.delete(&e.key);
                }
            }
        }
        let _ = self.repo.backend.delete(&self.key);
    }
}
