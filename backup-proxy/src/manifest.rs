//! A backup's manifest: what was backed up, from where, at which change
//! ID, with the digest of each disk's index. Written last and create-only:
//! a backup exists exactly when its manifest does (docs/FORMAT.md).

use serde::{Deserialize, Serialize};

use crate::error::{corrupt, Result};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    /// `NAME/STAMP-RAND`.
    pub id: String,
    pub name: String,
    /// Seconds since 1970 by the proxy's clock (for retention and people).
    pub started: i64,
    pub finished: i64,
    pub host: String,
    /// The backup whose index unchanged chunks were taken from.
    pub parent: Option<String>,
    pub disks: Vec<DiskEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskEntry {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    /// The index object's key, and the BLAKE3 of its stored bytes.
    pub index: String,
    pub index_digest: String,
    /// What was read: a file, a block device, a virtual disk.
    pub source: String,
    /// The source's change ID that this backup holds everything up to
    /// (the next incremental asks for changes since it).
    pub change_id: Option<String>,
    /// The change ID this backup was incremental from.
    pub since: Option<String>,
    pub stats: Stats,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes of chunks this backup stored (before compression), and after.
    pub new: u64,
    pub stored: u64,
    /// Bytes of chunks that were there already (read and found, or taken
    /// unchanged from the parent's index).
    pub reused: u64,
    /// Bytes of zero chunks (holes and zeros), never stored.
    pub zero: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub millis: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.read += o.read;
        self.new += o.new;
        self.stored += o.stored;
        self.reused += o.reused;
        self.zero += o.zero;
        self.chunks += o.chunks;
        self.new_chunks += o.new_chunks;
    }
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8], what: &str) -> Result<Manifest> {
        let m: Manifest =
            serde_json::from_slice(b).map_err(|e| corrupt(what, format!("manifest: {e}")))?;
        if m.version != VERSION {
            return Err(corrupt(
                what,
                format!(
                    "manifest version {} (this program reads {VERSION})",
                    m.version
                ),
            ));
        }
        Ok(m)
    }

    pub fn totals(&self) -> Stats {
        let mut s = Stats::default();
        for d in &self.disks {
            s.add(&d.stats);
        }
        s.millis = self.disks.iter().map(|d| d.stats.millis).max().unwrap_or(0);
        s
    }
}
