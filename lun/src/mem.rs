//! An in-memory LUN for tests.

use std::sync::RwLock;

use crate::{check_caw, check_range, CompareAndWrite, Lun, Result};

/// A LUN held in memory. Compare-and-write is atomic.
pub struct MemLun {
    name: String,
    id: String,
    block_size: u32,
    data: RwLock<Vec<u8>>,
}

impl MemLun {
    pub fn new(name: &str, size: u64) -> MemLun {
        MemLun {
            name: name.to_string(),
            id: format!("mem:{}", uuid::Uuid::new_v4()),
            block_size: 512,
            data: RwLock::new(vec![0; size as usize]),
        }
    }
    /// A LUN holding a copy of `bytes`.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> MemLun {
        MemLun {
            name: name.to_string(),
            id: format!("mem:{}", uuid::Uuid::new_v4()),
            block_size: 512,
            data: RwLock::new(bytes),
        }
    }
    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Lun for MemLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        check_range(&self.name, d.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        check_range(&self.name, d.len() as u64, offset, buf.len() as u64)?;
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        check_range(&self.name, d.len() as u64, offset, len)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn identity(&self) -> Result<String> {
        Ok(self.id.clone())
    }
    fn has_compare_and_write(&self) -> bool {
        true
    }
    fn compare_and_write(&self, offset: u64, expect: &[u8], new: &[u8]) -> Result<CompareAndWrite> {
        check_caw(self, offset, expect, new)?;
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        let r = offset as usize..offset as usize + expect.len();
        if d[r.clone()] != *expect {
            return Ok(CompareAndWrite::Mismatch);
        }
        d[r].copy_from_slice(new);
        Ok(CompareAndWrite::Written)
    }
}
