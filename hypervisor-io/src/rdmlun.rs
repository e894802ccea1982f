//! A virtual-mode raw device mapping as a logical unit: the mapping file
//! opened through the vmfs file API (which reads and writes the mapped
//! LUN, through this host's fence), emulated like a disk. Its identity is
//! made from the mapped LUN's, so it is the same on every host.

use std::sync::{Arc, RwLock};

use crate::backend::{Backend, BackendError, BackendResult, Identity};

pub struct RdmUnit {
    /// `None` once closed.
    file: RwLock<Option<vmfs::File>>,
    path: String,
    id: Identity,
    size: u64,
    block_size: u32,
}

/// 16 stable bytes from the mapped LUN's identity.
fn uuid_of(identity: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (k, c) in b.chunks_mut(4).enumerate() {
        let mut h = crc32fast::Hasher::new();
        h.update(&[k as u8]);
        h.update(identity.as_bytes());
        c.copy_from_slice(&h.finalize().to_be_bytes());
    }
    b
}

impl RdmUnit {
    /// Open the mapping at `path` for writing (exclusive, as a disk).
    pub fn open(fs: &Arc<vmfs::Fs>, path: &str, mapping: &rdm::Mapping) -> vmfs::Result<RdmUnit> {
        let file = fs.open_path(path, vmfs::LockMode::Exclusive)?;
        let size = file.len()?;
        Ok(RdmUnit {
            file: RwLock::new(Some(file)),
            path: path.to_string(),
            id: Identity {
                uuid: uuid_of(&mapping.identity),
                product: "Raw mapping".into(),
            },
            size,
            block_size: mapping.block_size.max(512),
        })
    }

    /// Close the mapping now (the controller stopped): later I/O fails.
    pub fn close(&self) -> vmfs::Result<()> {
        match self.file.write().unwrap_or_else(|p| p.into_inner()).take() {
            Some(f) => f.close(),
            None => Ok(()),
        }
    }

    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&vmfs::File) -> vmfs::Result<T>,
    ) -> BackendResult<T> {
        let g = self.file.read().unwrap_or_else(|p| p.into_inner());
        let file = g
            .as_ref()
            .ok_or_else(|| BackendError::Failed(format!("{}: closed", self.path)))?;
        f(file).map_err(|e| err(e, what, &self.path))
    }
}

fn err(e: vmfs::FsError, what: &str, path: &str) -> BackendError {
    let m = format!("{path}: {e}");
    match (e.fault(), what) {
        (vmfs::Fault::BadHandle, _) => BackendError::ReadOnly(m),
        (_, "read") => BackendError::Read(m),
        (_, "write") => BackendError::Write(m),
        _ => BackendError::Failed(m),
    }
}

impl Backend for RdmUnit {
    fn describe(&self) -> String {
        self.path.clone()
    }
    fn identity(&self) -> Identity {
        self.id.clone()
    }
    fn capacity(&self) -> u64 {
        self.size - self.size % u64::from(self.block_size)
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn thin(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> BackendResult<()> {
        let n = self.with("read", |f| f.read_at(buf, off))?;
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> BackendResult<()> {
        self.with("write", |f| f.write_at(buf, off))
    }
    fn flush(&self) -> BackendResult<()> {
        self.with("flush", |f| f.flush())
    }
    fn discard(&self, off: u64, len: u64) -> BackendResult<()> {
        // Not thin: UNMAP is never offered; WRITE SAME of zeros lands here.
        let zeros = vec![0u8; (1 << 20).min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A physical-mode raw device mapping: the guest's commands go to the
/// mapped LUN as they are (libiscsi), but REPORT LUNS, which is the
/// controller's. The guest sees the LUN's own identity, reservations and
/// sense data.
pub struct RdmPassthrough {
    file: RwLock<Option<vmfs::File>>,
    path: String,
    pub counters: crate::scsi::disk::Counters,
}

impl RdmPassthrough {
    pub fn open(fs: &Arc<vmfs::Fs>, path: &str) -> vmfs::Result<RdmPassthrough> {
        let file = fs.open_path(path, vmfs::LockMode::Exclusive)?;
        Ok(RdmPassthrough {
            file: RwLock::new(Some(file)),
            path: path.to_string(),
            counters: Default::default(),
        })
    }

    pub fn close(&self) -> vmfs::Result<()> {
        match self.file.write().unwrap_or_else(|p| p.into_inner()).take() {
            Some(f) => f.close(),
            None => Ok(()),
        }
    }

    pub fn size(&self) -> u64 {
        self.file
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|f| f.len().ok())
            .unwrap_or(0)
    }
}

impl crate::scsi::target::RawUnit for RdmPassthrough {
    fn execute(
        &self,
        cdb: &[u8],
        io: crate::scsi::disk::Buffers<'_>,
    ) -> crate::scsi::disk::Outcome {
        use crate::scsi::disk::Outcome;
        use crate::scsi::sense::Sense;
        use std::sync::atomic::Ordering::Relaxed;
        let Some(n) = cdb.first().and_then(|&op| crate::scsi::cdb::cdb_len(op)) else {
            return Outcome::Check(Sense::INVALID_OPCODE);
        };
        let Some(cdb) = cdb.get(..n.min(16)) else {
            return Outcome::Check(Sense::INVALID_OPCODE);
        };
        let g = self.file.read().unwrap_or_else(|p| p.into_inner());
        let Some(f) = g.as_ref() else {
            return Outcome::Check(Sense::INTERNAL_TARGET_FAILURE);
        };
        let want_in = if io.data_out.is_empty() {
            io.data_in_max
        } else {
            0
        };
        match f.scsi_passthrough(cdb, io.data_out, want_in) {
            Ok(r) => {
                let len = r.data_in.len().min(io.data_in_max);
                io.data_in.extend_from_slice(&r.data_in[..len]);
                if io.data_out.is_empty() {
                    self.counters.reads.fetch_add(1, Relaxed);
                    self.counters.read_bytes.fetch_add(len as u64, Relaxed);
                } else {
                    self.counters.writes.fetch_add(1, Relaxed);
                    self.counters
                        .write_bytes
                        .fetch_add(io.data_out.len() as u64, Relaxed);
                }
                let sense = (r.status == 2).then_some(Sense {
                    key: r.sense_key,
                    asc: (r.ascq >> 8) as u8,
                    ascq: r.ascq as u8,
                    field: None,
                });
                if r.status != 0 {
                    self.counters.errors.fetch_add(1, Relaxed);
                }
                Outcome::Raw {
                    status: r.status,
                    sense,
                    len,
                }
            }
            Err(e) => {
                tracing::warn!("{}: {e}", self.path);
                self.counters.errors.fetch_add(1, Relaxed);
                Outcome::Check(Sense::INTERNAL_TARGET_FAILURE)
            }
        }
    }
}
