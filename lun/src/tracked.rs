//! A flush with nothing to make durable costs a round trip (NBD FLUSH, iSCSI
//! SYNCHRONIZE CACHE, fdatasync and the disk cache flush behind it) and
//! changes nothing. [`FlushTracked`] remembers whether any write completed
//! since the last flush began, and skips the flush when none did.
//!
//! The flag is set *after* a write returns and cleared as a flush *begins*:
//! a write that completes while a flush runs sets it again, so the next
//! flush is not skipped. A flush covers the writes completed before it was
//! issued, which is all a caller may count on from any LUN.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{CompareAndWrite, Lun, Result};

pub struct FlushTracked {
    inner: Arc<dyn Lun>,
    unflushed: AtomicBool,
}

impl FlushTracked {
    pub fn new(inner: Arc<dyn Lun>) -> FlushTracked {
        FlushTracked {
            inner,
            // Whatever happened before we were opened is not ours to judge.
            unflushed: AtomicBool::new(true),
        }
    }
    fn wrote<T>(&self, r: Result<T>) -> Result<T> {
        // Even a failed write may have changed some sectors.
        self.unflushed.store(true, Ordering::SeqCst);
        r
    }
}

impl Lun for FlushTracked {
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
        self.wrote(self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> Result<()> {
        if !self.unflushed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let r = self.inner.flush();
        if r.is_err() {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.wrote(self.inner.write_zeroes(offset, len, unmap))
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
        self.wrote(self.inner.compare_and_write(offset, expect, new))
    }
    fn passthrough(
        &self,
        cdb: &[u8],
        data_out: &[u8],
        data_in: usize,
    ) -> Option<Result<crate::ScsiReply>> {
        // Whatever it did, the next flush must reach the device.
        let r = self.inner.passthrough(cdb, data_out, data_in)?;
        Some(self.wrote(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultLun, FaultPlan, MemLun};

    /// Counts flushes reaching the LUN below.
    struct Counting(MemLun, std::sync::atomic::AtomicU64);
    impl Lun for Counting {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn block_size(&self) -> u32 {
            self.0.block_size()
        }
        fn read_at(&self, b: &mut [u8], o: u64) -> Result<()> {
            self.0.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> Result<()> {
            self.0.write_at(b, o)
        }
        fn flush(&self) -> Result<()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<()> {
            self.0.write_zeroes(o, l, u)
        }
        fn identity(&self) -> Result<String> {
            self.0.identity()
        }
    }

    #[test]
    fn only_flushes_after_writes() {
        let c = Arc::new(Counting(MemLun::new("m", 1 << 20), 0.into()));
        let t = FlushTracked::new(c.clone());
        t.flush().unwrap(); // the first one always goes through
        t.flush().unwrap();
        t.flush().unwrap();
        assert_eq!(c.1.load(Ordering::SeqCst), 1);
        t.write_at(&[1; 512], 0).unwrap();
        t.flush().unwrap();
        t.flush().unwrap();
        assert_eq!(c.1.load(Ordering::SeqCst), 2);
        t.write_zeroes(0, 512, false).unwrap();
        t.flush().unwrap();
        assert_eq!(c.1.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_failed_flush_is_tried_again() {
        let f = Arc::new(FaultLun::new(Arc::new(MemLun::new("m", 1 << 20))));
        let t = FlushTracked::new(f.clone());
        t.write_at(&[1; 512], 0).unwrap();
        f.set_plan(FaultPlan {
            fail_flush: true,
            ..FaultPlan::default()
        });
        assert!(t.flush().is_err());
        f.set_plan(FaultPlan::default());
        // Still owed: the next flush is not skipped (and succeeds).
        t.flush().unwrap();
    }
}
