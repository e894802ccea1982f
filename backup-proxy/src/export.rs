//! Read-only images for third-party tools: a VM's frozen disks
//! (`vmfs backup attach`) or a stored backup's disks (`vmfs backup mount`),
//! as raw image files in a FUSE mount (`mount.rs`) and as NBD exports
//! (`nbd.rs`). Both ask the same two things of an image: its bytes, and
//! where it may hold data (so `cp --sparse`, `qemu-img convert` and
//! `nbdcopy` skip what is known to read as zeros).

use std::ops::Range;
use std::sync::Arc;

use crate::error::Result;

/// An image served read-only.
pub trait ReadImage: Send + Sync {
    fn size(&self) -> u64;
    /// Fill `buf` from `off` (zeros past the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
}

impl ReadImage for crate::image::VDisk {
    fn size(&self) -> u64 {
        crate::image::Source::size(self)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        crate::image::Source::read_at(self, buf, off)
    }
}

/// Where an image may hold data: sorted, disjoint, merged ranges, fixed for
/// the export's life (the images served never change). Outside them the
/// image reads as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataMap {
    size: u64,
    ranges: Vec<Range<u64>>,
}

impl DataMap {
    /// From ranges in any order, clipped to `size`.
    pub fn new(size: u64, mut ranges: Vec<Range<u64>>) -> DataMap {
        ranges.retain(|r| r.start < r.end && r.start < size);
        ranges.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            let r = r.start..r.end.min(size);
            match out.last_mut() {
                Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
                _ => out.push(r),
            }
        }
        DataMap { size, ranges: out }
    }

    /// All of it data (when nothing better is known).
    pub fn full(size: u64) -> DataMap {
        DataMap::new(size, vec![0..size])
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes that may hold data.
    pub fn data_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Index of the first range ending after `off`.
    fn first_after(&self, off: u64) -> usize {
        self.ranges.partition_point(|r| r.end <= off)
    }

    /// `lseek(SEEK_DATA)`: the first data offset at or after `off`.
    pub fn seek_data(&self, off: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        self.ranges
            .get(self.first_after(off))
            .map(|r| r.start.max(off))
    }

    /// `lseek(SEEK_HOLE)`: the first hole at or after `off` (the end of the
    /// image counts as one).
    pub fn seek_hole(&self, off: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        match self.ranges.get(self.first_after(off)) {
            Some(r) if r.start <= off => Some(r.end),
            _ => Some(off),
        }
    }

    /// `[off, off+len)` as consecutive extents `(length, is data)`, at
    /// most `max` of them (the last may stop short of `off+len`).
    pub fn extents(&self, off: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = off.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = off;
        let mut i = self.first_after(off);
        while pos < end && out.len() < max {
            match self.ranges.get(i) {
                Some(r) if r.start <= pos => {
                    let e = r.end.min(end);
                    out.push((e - pos, true));
                    pos = e;
                    i += 1;
                }
                Some(r) => {
                    let e = r.start.min(end);
                    out.push((e - pos, false));
                    pos = e;
                }
                None => {
                    out.push((end - pos, false));
                    pos = end;
                }
            }
        }
        out
    }
}

/// One image as the exports show it.
#[derive(Clone)]
pub struct Export {
    /// The NBD export name, and with `.img` the file name.
    pub name: String,
    pub image: Arc<dyn ReadImage>,
    pub map: Arc<DataMap>,
}

impl Export {
    pub fn file_name(&self) -> String {
        format!("{}.img", self.name)
    }
}

/// `names` made unique (`d0`, `d0-2`, ...), in order: two disks of one VM
/// may have the same file name in different directories.
pub fn unique_names(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        let mut c = n.clone();
        let mut k = 2;
        while out.contains(&c) {
            c = format!("{n}-{k}");
            k += 1;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_merge_and_seek() {
        let m = DataMap::new(100, vec![50..60, 10..20, 15..30, 90..200]);
        assert_eq!(m.ranges, vec![10..30, 50..60, 90..100]);
        assert_eq!(m.data_bytes(), 40);
        assert_eq!(m.seek_data(0), Some(10));
        assert_eq!(m.seek_data(12), Some(12));
        assert_eq!(m.seek_data(30), Some(50));
        assert_eq!(m.seek_data(95), Some(95));
        assert_eq!(m.seek_data(100), None);
        assert_eq!(m.seek_hole(0), Some(0));
        assert_eq!(m.seek_hole(12), Some(30));
        assert_eq!(m.seek_hole(95), Some(100));
        assert_eq!(DataMap::new(10, vec![]).seek_data(0), None);
        assert_eq!(
            m.extents(0, 100, 100),
            vec![
                (10, false),
                (20, true),
                (20, false),
                (10, true),
                (30, false),
                (10, true)
            ]
        );
        assert_eq!(m.extents(15, 10, 100), vec![(10, true)]);
        assert_eq!(m.extents(0, 100, 2), vec![(10, false), (20, true)]);
        assert_eq!(m.extents(95, 50, 9), vec![(5, true)]);
        assert!(m.extents(100, 10, 9).is_empty());
        // Every byte is covered once, whatever the window.
        for off in 0..100 {
            for len in [1u64, 7, 33, 1000] {
                let e = m.extents(off, len, usize::MAX);
                let total: u64 = e.iter().map(|x| x.0).sum();
                assert_eq!(total, len.min(100 - off));
                assert!(e.iter().all(|x| x.0 > 0));
            }
        }
    }

    #[test]
    fn names_are_made_unique() {
        let n = |v: &[&str]| unique_names(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(n(&["a", "b", "a", "a"]), vec!["a", "b", "a-2", "a-3"]);
    }
}
