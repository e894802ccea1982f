//! Copy-on-write and recording wrappers: the building blocks of crash images.
//!
//! [`CowLun`] reads through to a base LUN until a range is written, keeping
//! every write in memory: `fsck` without `--repair` replays a journal into one
//! so that nothing reaches the real LUN, and the crash harness builds each
//! crash image as one over a shared base. [`RecordingLun`] logs every write
//! and flush in order, as dm-log-writes does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{check_caw, check_range, CompareAndWrite, Lun, Result};

const PAGE: u64 = 4096;

/// Pages written over a base LUN, by page number.
pub type Pages = HashMap<u64, Box<[u8]>>;

/// A LUN whose writes stay in memory over a read-only base.
pub struct CowLun {
    name: String,
    base: Arc<dyn Lun>,
    pages: Mutex<Pages>,
}

impl CowLun {
    pub fn new(base: Arc<dyn Lun>) -> CowLun {
        Self::with_pages(base, Pages::new())
    }
    /// Start from `pages` already written over `base`.
    pub fn with_pages(base: Arc<dyn Lun>, pages: Pages) -> CowLun {
        CowLun {
            name: base.name().to_string(),
            base,
            pages: Mutex::new(pages),
        }
    }
    /// The pages written so far.
    pub fn pages(&self) -> Pages {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn page<'a>(&self, pages: &'a mut Pages, n: u64) -> Result<&'a mut Box<[u8]>> {
        if !pages.contains_key(&n) {
            let mut b = vec![0u8; PAGE as usize];
            let off = n * PAGE;
            let len = PAGE.min(self.base.size() - off) as usize;
            self.base.read_at(&mut b[..len], off)?;
            pages.insert(n, b.into_boxed_slice());
        }
        Ok(pages.get_mut(&n).expect("inserted"))
    }

    /// Apply `f(page, range in page, range in the request)` to every page of a write.
    fn each_page(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut [u8], std::ops::Range<usize>, std::ops::Range<usize>),
    ) -> Result<()> {
        check_range(&self.name, self.size(), offset, len)?;
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let mut pos = offset;
        while pos < offset + len {
            let n = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let take = (PAGE - pos % PAGE).min(offset + len - pos) as usize;
            let p = self.page(&mut pages, n)?;
            let at = (pos - offset) as usize;
            f(p, in_page..in_page + take, at..at + take);
            pos += take as u64;
        }
        Ok(())
    }
}

impl Lun for CowLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.base.size()
    }
    fn block_size(&self) -> u32 {
        self.base.block_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, self.size(), offset, buf.len() as u64)?;
        let pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        if pages.is_empty() {
            drop(pages);
            return self.base.read_at(buf, offset);
        }
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let n = pos / PAGE;
            let take = (PAGE - pos % PAGE).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            match pages.get(&n) {
                Some(p) => {
                    let i = (pos % PAGE) as usize;
                    buf[at..at + take].copy_from_slice(&p[i..i + take]);
                }
                None => self.base.read_at(&mut buf[at..at + take], pos)?,
            }
            pos += take as u64;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.each_page(offset, buf.len() as u64, |p, pr, br| {
            p[pr].copy_from_slice(&buf[br])
        })
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.each_page(offset, len, |p, pr, _| p[pr].fill(0))
    }
    fn identity(&self) -> Result<String> {
        self.base.identity()
    }
    /// As the LUN below: a copy-on-write view reports how the real LUN
    /// would lock (its own compare-and-write works in any case).
    fn has_compare_and_write(&self) -> bool {
        self.base.has_compare_and_write()
    }
    fn compare_and_write_note(&self) -> Option<String> {
        self.base.compare_and_write_note()
    }
    fn compare_and_write(&self, offset: u64, expect: &[u8], new: &[u8]) -> Result<CompareAndWrite> {
        check_caw(self, offset, expect, new)?;
        // One lock over compare and write: atomic against other threads.
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.page(&mut pages, offset / PAGE)?;
        let r = (offset % PAGE) as usize..(offset % PAGE) as usize + expect.len();
        if p[r.clone()] != *expect {
            return Ok(CompareAndWrite::Mismatch);
        }
        p[r].copy_from_slice(new);
        Ok(CompareAndWrite::Written)
    }
}

/// One entry of a write log.
#[derive(Debug, Clone)]
pub enum Event {
    /// `data` written at `offset` of LUN number `lun`.
    Write {
        lun: usize,
        offset: u64,
        data: Arc<[u8]>,
    },
    /// `len` bytes zeroed at `offset`.
    Zero { lun: usize, offset: u64, len: u64 },
    /// A flush of LUN `lun` completed: every write before it is durable.
    Flush { lun: usize },
    /// A marker the workload put in the log (operation started/finished).
    Mark(u64),
}

/// A shared, ordered log of several LUNs' writes and flushes.
pub type WriteLog = Arc<Mutex<Vec<Event>>>;

/// A LUN that logs every write, zeroing and flush to a [`WriteLog`].
pub struct RecordingLun {
    inner: Arc<dyn Lun>,
    index: usize,
    log: WriteLog,
}

impl RecordingLun {
    pub fn new(inner: Arc<dyn Lun>, index: usize, log: WriteLog) -> RecordingLun {
        RecordingLun { inner, index, log }
    }
    fn push(&self, e: Event) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }
}

impl Lun for RecordingLun {
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
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        // Logged after it succeeded, under the log lock: the log order is
        // an order the writes really completed in.
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.write_at(buf, offset)?;
        log.push(Event::Write {
            lun: self.index,
            offset,
            data: buf.into(),
        });
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()?;
        self.push(Event::Flush { lun: self.index });
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.write_zeroes(offset, len, unmap)?;
        log.push(Event::Zero {
            lun: self.index,
            offset,
            len,
        });
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
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.inner.compare_and_write(offset, expect, new)?;
        if r == CompareAndWrite::Written {
            log.push(Event::Write {
                lun: self.index,
                offset,
                data: new.into(),
            });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemLun;

    #[test]
    fn cow_reads_base_until_written_and_never_writes_it() {
        let base = Arc::new(MemLun::from_bytes("m", vec![7u8; 3 * 4096]));
        let c = CowLun::new(base.clone());
        c.write_at(&[1u8; 5000], 4000).unwrap();
        c.write_zeroes(9000, 10, true).unwrap();
        let mut b = vec![0u8; 3 * 4096];
        c.read_at(&mut b, 0).unwrap();
        assert!(b[..4000].iter().all(|&x| x == 7));
        assert!(b[4000..9000].iter().all(|&x| x == 1));
        assert!(b[9000..9010].iter().all(|&x| x == 0));
        assert!(b[9010..].iter().all(|&x| x == 7));
        assert!(base.snapshot().iter().all(|&x| x == 7));
        assert!(c.read_at(&mut b, 1).is_err());
    }

    #[test]
    fn recording_logs_in_order() {
        let log = WriteLog::default();
        let r = RecordingLun::new(Arc::new(MemLun::new("m", 8192)), 3, log.clone());
        r.write_at(&[1; 512], 512).unwrap();
        r.flush().unwrap();
        r.write_zeroes(0, 512, false).unwrap();
        let l = log.lock().unwrap();
        assert!(matches!(
            l[0],
            Event::Write {
                lun: 3,
                offset: 512,
                ..
            }
        ));
        assert!(matches!(l[1], Event::Flush { lun: 3 }));
        assert!(matches!(
            l[2],
            Event::Zero {
                lun: 3,
                offset: 0,
                len: 512
            }
        ));
    }
}
