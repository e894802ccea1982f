//! Persistent reservations of a shared disk, kept on the datastore beside
//! it (`NAME.pr`, opened multi-writer by every host that serves the disk)
//! so that guests on several hosts see one reservation, as guest clusters
//! and pacemaker's `fence_scsi` need.
//!
//! A change holds `NAME.pr.lock` open exclusively (the datastore's own
//! file lock: one host at a time, EBUSY for the others, who retry), reads
//! the state, changes it, writes it with the change counter moved, and
//! flushes. Every command that touches the medium first reads the 32-byte
//! header, and the payload again only when the counter moved: a host that
//! another fenced off sees it at its next write. A state file that cannot
//! be read fails those commands (HARDWARE ERROR) rather than let a fenced
//! host write.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapshot::{DiskFile, Store};

use crate::scsi::pr::file;
use crate::scsi::pr::{PrFailure, PrState, PrStore};
use crate::scsi::sense::Sense;

/// How long a change waits for another host's change.
const LOCK_WAIT: Duration = Duration::from_secs(10);

pub struct FilePrStore {
    store: Arc<dyn Store>,
    name: String,
    lock: String,
    file: Arc<dyn DiskFile>,
    /// The last state read, with its change counter.
    cache: Mutex<(u64, PrState)>,
}

fn io(e: impl std::fmt::Display, what: &str) -> PrFailure {
    tracing::error!("{what}: {e}");
    PrFailure::Check(Sense::INTERNAL_TARGET_FAILURE)
}

impl FilePrStore {
    /// Open the state of the disk whose stem is `stem` (made by
    /// `snapshot::ops::set_shared`).
    pub fn open(store: Arc<dyn Store>, stem: &str) -> snapshot::Result<FilePrStore> {
        let name = snapshot::ops::reservations_file(stem);
        let file = store
            .open(&name, true)
            .map_err(|e| snapshot::DiskError::Store {
                file: name.clone(),
                source: e,
            })?;
        Ok(FilePrStore {
            lock: snapshot::ops::reservations_lock(stem),
            store,
            name,
            file,
            cache: Mutex::new((0, PrState::default())),
        })
    }

    fn describe(&self) -> String {
        self.store.describe(&self.name)
    }

    fn read_all(&self) -> Result<(PrState, u64), PrFailure> {
        let mut h = [0u8; file::HEADER];
        self.file
            .read_full(&mut h, 0)
            .map_err(|e| io(e, &self.describe()))?;
        let (len, _) = file::header(&h, &self.describe())?;
        let mut b = vec![0u8; file::HEADER + len];
        self.file
            .read_full(&mut b, 0)
            .map_err(|e| io(e, &self.describe()))?;
        Ok(file::decode(&b, &self.describe())?)
    }
}

impl PrStore for FilePrStore {
    fn transact(
        &self,
        f: &mut dyn FnMut(&mut PrState) -> Result<bool, PrFailure>,
    ) -> Result<(), PrFailure> {
        let t = Instant::now();
        let _held = loop {
            match self.store.open(&self.lock, true) {
                Ok(l) => break l,
                Err(e) if t.elapsed() < LOCK_WAIT => {
                    tracing::debug!("{}: waiting: {e}", self.store.describe(&self.lock));
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io(e, &self.store.describe(&self.lock))),
            }
        };
        let (mut s, counter) = self.read_all()?;
        if f(&mut s)? {
            let b = file::encode(&s, counter + 1);
            self.file
                .write_at(&b, 0)
                .and_then(|()| self.file.flush())
                .map_err(|e| io(e, &self.describe()))?;
            *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = (counter + 1, s);
        }
        Ok(())
    }

    fn current(&self) -> Result<PrState, PrFailure> {
        let mut h = [0u8; file::HEADER];
        self.file
            .read_full(&mut h, 0)
            .map_err(|e| io(e, &self.describe()))?;
        let (_, counter) = file::header(&h, &self.describe()).map_err(PrFailure::from)?;
        {
            let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if c.0 == counter {
                return Ok(c.1.clone());
            }
        }
        let (s, counter) = self.read_all()?;
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = (counter, s.clone());
        Ok(s)
    }

    /// Another host may have changed it at any moment.
    fn maybe_active(&self) -> bool {
        true
    }
}
