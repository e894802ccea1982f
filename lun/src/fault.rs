//! A fault-injecting wrapper for tests: fail chosen I/O, or everything after
//! a point, to prove that callers report errors and damage nothing.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{CompareAndWrite, Lun, LunError, Result};

/// What to break.
#[derive(Debug, Default, Clone)]
pub struct FaultPlan {
    /// Reads touching any of these byte ranges fail.
    pub fail_reads: Vec<Range<u64>>,
    /// Writes touching any of these byte ranges fail.
    pub fail_writes: Vec<Range<u64>>,
    /// After this many successful writes, every write fails (a dying disk).
    pub writes_before_failure: Option<u64>,
    /// Flushes fail.
    pub fail_flush: bool,
}

/// Wraps a LUN and fails I/O according to a [`FaultPlan`] that can be changed
/// while the LUN is in use. Also counts writes, so tests can assert that an
/// operation wrote nothing.
pub struct FaultLun {
    inner: Arc<dyn Lun>,
    plan: Mutex<FaultPlan>,
    writes: AtomicU64,
    armed: AtomicBool,
}

fn overlaps(ranges: &[Range<u64>], off: u64, len: u64) -> bool {
    ranges
        .iter()
        .any(|r| off < r.end && r.start < off + len.max(1))
}

impl FaultLun {
    pub fn new(inner: Arc<dyn Lun>) -> FaultLun {
        FaultLun {
            inner,
            plan: Mutex::new(FaultPlan::default()),
            writes: AtomicU64::new(0),
            armed: AtomicBool::new(true),
        }
    }
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
    }
    /// Number of writes (write, write_zeroes, compare-and-write) that reached the inner LUN.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    /// Turn injection on or off without forgetting the plan.
    pub fn arm(&self, on: bool) {
        self.armed.store(on, Ordering::SeqCst);
    }
    fn check_write(&self, off: u64, len: u64) -> Result<()> {
        if !self.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        let budget_spent = plan
            .writes_before_failure
            .is_some_and(|n| self.writes() >= n);
        if budget_spent || overlaps(&plan.fail_writes, off, len) {
            return Err(LunError::Injected {
                lun: self.inner.name().to_string(),
                offset: off,
                op: "write",
            });
        }
        Ok(())
    }
}

impl Lun for FaultLun {
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
        if self.armed.load(Ordering::SeqCst)
            && overlaps(
                &self
                    .plan
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .fail_reads,
                offset,
                buf.len() as u64,
            )
        {
            return Err(LunError::Injected {
                lun: self.name().to_string(),
                offset,
                op: "read",
            });
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.armed.load(Ordering::SeqCst)
            && self
                .plan
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fail_flush
        {
            return Err(LunError::Injected {
                lun: self.name().to_string(),
                offset: 0,
                op: "flush",
            });
        }
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.inner.write_zeroes(offset, len, unmap)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
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
        self.check_write(offset, new.len() as u64)?;
        let r = self.inner.compare_and_write(offset, expect, new)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(r)
    }
}
