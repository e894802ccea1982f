//! Self-fencing at the I/O layer: a LUN wrapper that refuses every write
//! once the host's lease is no longer safely held.
//!
//! The heartbeat (in the filesystem's cluster layer) renews the lease and
//! tells a [`Lease`] when each renewal *started*; the lease is safe until
//! `start + safe_window`, a window shorter than the time after which other
//! hosts may declare this one dead. Past it, or once the heartbeat saw its
//! slot taken, every write, zeroing, compare-and-write and flush fails with
//! [`LunError::Fenced`]: a host that was stalled (SIGSTOP, a long GC pause, a
//! hung path) cannot scribble over a datastore another host has recovered.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{CompareAndWrite, Lun, LunError, Result};

/// The state of one host's lease, shared by its heartbeat and its LUNs.
pub struct Lease {
    epoch: Instant,
    /// Nanoseconds since `epoch` at which the last successful renewal started.
    renewed: AtomicU64,
    safe_window: Duration,
    fenced: AtomicBool,
    why: Mutex<String>,
}

impl Lease {
    /// A lease just renewed, safe for `safe_window` after each renewal start.
    pub fn new(safe_window: Duration) -> Arc<Lease> {
        Arc::new(Lease {
            epoch: Instant::now(),
            renewed: AtomicU64::new(0),
            safe_window,
            fenced: AtomicBool::new(false),
            why: Mutex::new(String::new()),
        })
    }
    /// A renewal that started at `started` completed.
    pub fn renewed(&self, started: Instant) {
        let ns = started.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.renewed.fetch_max(ns, Ordering::SeqCst);
    }
    /// Fence for good (the slot was taken over, or the host is leaving).
    pub fn fence(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
            tracing::error!("fenced: {why}");
        }
    }
    /// How long since the last renewal started.
    pub fn age(&self) -> Duration {
        let last = Duration::from_nanos(self.renewed.load(Ordering::SeqCst));
        self.epoch.elapsed().saturating_sub(last)
    }
    /// Ok while writes are safe; once not, fenced for good.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !self.fenced.load(Ordering::SeqCst) {
            let age = self.age();
            if age <= self.safe_window {
                return Ok(());
            }
            self.fence(&format!(
                "the heartbeat was last renewed {} ms ago, past the safe window of {} ms",
                age.as_millis(),
                self.safe_window.as_millis()
            ));
        }
        Err(self.why.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }
}

/// A LUN whose writes stop when its lease is lost.
pub struct FencedLun {
    inner: Arc<dyn Lun>,
    lease: Arc<Lease>,
}

impl FencedLun {
    pub fn new(inner: Arc<dyn Lun>, lease: Arc<Lease>) -> FencedLun {
        FencedLun { inner, lease }
    }
    fn guard(&self) -> Result<()> {
        self.lease.check().map_err(|why| LunError::Fenced {
            lun: self.inner.name().to_string(),
            why,
        })
    }
}

impl Lun for FencedLun {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        self.inner.prefetch(offset, len)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.guard()?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.guard()?;
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.guard()?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn identity(&self) -> Result<String> {
        self.inner.identity()
    }
    fn has_compare_and_write(&self) -> bool {
        self.inner.has_compare_and_write()
    }
    fn compare_and_write_note(&self) -> Option<String> {
        self.inner.compare_and_write_note()
    }
    fn compare_and_write(&self, offset: u64, expect: &[u8], new: &[u8]) -> Result<CompareAndWrite> {
        self.guard()?;
        self.inner.compare_and_write(offset, expect, new)
    }
    /// Refused once fenced, whatever the command: which CDBs write is the
    /// device's business, and a fenced host must not write.
    fn passthrough(
        &self,
        cdb: &[u8],
        data_out: &[u8],
        data_in: usize,
    ) -> Option<Result<crate::ScsiReply>> {
        if let Err(e) = self.guard() {
            return Some(Err(e));
        }
        self.inner.passthrough(cdb, data_out, data_in)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemLun;

    #[test]
    fn writes_stop_past_the_safe_window_and_stay_stopped() {
        let lease = Lease::new(Duration::from_millis(50));
        let l = FencedLun::new(Arc::new(MemLun::new("m", 4096)), lease.clone());
        l.write_at(&[1; 512], 0).unwrap();
        std::thread::sleep(Duration::from_millis(80));
        let e = l.write_at(&[2; 512], 0).unwrap_err().to_string();
        assert!(e.contains("fenced") && e.contains("safe window"), "{e}");
        // A late renewal does not unfence: another host may own the slot now.
        lease.renewed(Instant::now());
        assert!(l.flush().is_err());
        let mut b = [0u8; 512];
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(
            b, [1; 512],
            "reads still work, the refused write wrote nothing"
        );
    }
}
