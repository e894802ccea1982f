//! The hosted sparse extent (`KDMV`), VMware's "Virtual Disk Format 1.1"
//! as QEMU's `block/vmdk.c` reads and writes it: our snapshot deltas.
//!
//! ```text
//! sector 0         header (512 bytes, little-endian, below)
//! rgd_offset       redundant grain directory: one u32 per grain table
//!                  redundant grain tables, 512 u32 entries (4 sectors) each
//! gd_offset        grain directory
//!                  grain tables
//! grain_offset     grains, each `granularity` sectors, appended as written
//! ```
//!
//! A grain-table entry is the grain's sector in the file, 0 when the grain
//! was never written here (it reads from the parent). Every grain table is
//! preallocated and both directories point at them: QEMU's driver damages
//! the header when it writes a grain whose table is missing, and a table
//! that exists from the start is never allocated under a write.
//!
//! Header (offsets in bytes, sector counts as u64 unless said):
//!
//! | off | field |
//! |---|---|
//! | 0 | magic `KDMV` (0x564d444b) |
//! | 4 | version u32 (1) |
//! | 8 | flags u32: bit 0 newline check, bit 1 redundant GD, bit 16 compressed, bit 17 markers |
//! | 12 | capacity (sectors) |
//! | 20 | granularity (sectors per grain) |
//! | 28 | embedded descriptor offset (0: none) |
//! | 36 | embedded descriptor size |
//! | 44 | grain-table entries per table u32 (512) |
//! | 48 | redundant grain directory offset |
//! | 56 | grain directory offset |
//! | 64 | first grain (overhead) |
//! | 72 | unclean-shutdown byte |
//! | 73 | `\n` ` ` `\r` `\n` (a file that went through a text-mode copy is told by these) |
//! | 77 | compression u16 (0) |
//! | 79 | zero to 512 |

use crate::error::{DiskError, Result};

pub const MAGIC: u32 = 0x564d_444b; // "KDMV" read as little-endian bytes K D M V
pub const SECTOR: u64 = 512;
pub const GTES_PER_GT: u32 = 512;
/// Sectors of one grain table.
pub const GT_SECTORS: u64 = (GTES_PER_GT as u64 * 4) / SECTOR;
pub const FLAG_NL_DETECT: u32 = 1 << 0;
pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESS: u32 = 1 << 16;
pub const FLAG_MARKER: u32 = 1 << 17;
const CHECK: [u8; 4] = *b"\n \r\n";
/// Sectors a u32 entry can address: a sparse extent ends before 2 TiB.
pub const MAX_FILE_SECTORS: u64 = 1 << 32;
/// The largest capacity of one sparse extent we make (room for grains and
/// tables below 2 TiB); larger disks have several.
pub const MAX_EXTENT_CAPACITY: u64 = 1 << 40; // bytes

/// Where the unclean-shutdown byte is in the header.
pub const UNCLEAN_AT: u64 = 72;

/// A sparse extent's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub granularity: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub grain_offset: u64,
    pub unclean: u8,
    pub compression: u16,
}

fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn get64(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

impl Header {
    /// The layout of a new extent of `capacity` bytes with grains of
    /// `grain` bytes: header, redundant directory and tables, directory and
    /// tables, first grain aligned to a grain.
    pub fn new(capacity: u64, grain: u64) -> Result<Header> {
        if !grain.is_power_of_two() || !(4096..=1 << 20).contains(&grain) {
            return Err(DiskError::Invalid(format!(
                "grain size {grain} is not a power of two from 4 KiB to 1 MiB"
            )));
        }
        if capacity == 0 || capacity % SECTOR != 0 || capacity > MAX_EXTENT_CAPACITY {
            return Err(DiskError::Invalid(format!(
                "sparse extent capacity {capacity} is not a whole number of sectors from 512 bytes to 1 TiB"
            )));
        }
        let granularity = grain / SECTOR;
        let capacity = capacity / SECTOR;
        let tables = capacity
            .div_ceil(granularity)
            .div_ceil(u64::from(GTES_PER_GT));
        let gd_sectors = (tables * 4).div_ceil(SECTOR);
        let rgd_offset = 1;
        let gd_offset = rgd_offset + gd_sectors + tables * GT_SECTORS;
        let end = gd_offset + gd_sectors + tables * GT_SECTORS;
        Ok(Header {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity,
            granularity,
            desc_offset: 0,
            desc_size: 0,
            gtes_per_gt: GTES_PER_GT,
            rgd_offset,
            gd_offset,
            grain_offset: end.div_ceil(granularity) * granularity,
            unclean: 0,
            compression: 0,
        })
    }

    /// Grain tables (and directory entries) the extent has.
    pub fn tables(&self) -> u64 {
        self.capacity
            .div_ceil(self.granularity)
            .div_ceil(u64::from(self.gtes_per_gt))
    }

    /// Sectors of one directory.
    pub fn gd_sectors(&self) -> u64 {
        (self.tables() * 4).div_ceil(SECTOR)
    }

    pub fn grain_bytes(&self) -> u64 {
        self.granularity * SECTOR
    }

    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        b[72] = self.unclean;
        b[73..77].copy_from_slice(&CHECK);
        b[77..79].copy_from_slice(&self.compression.to_le_bytes());
        b
    }

    /// Decode and check a header read from `file` (of `file_len` bytes).
    pub fn decode(b: &[u8], file: &str, file_len: u64) -> Result<Header> {
        let bad = |offset: u64, reason: String| DiskError::Corrupt {
            file: file.to_string(),
            offset,
            reason,
        };
        if b.len() < 512 {
            return Err(bad(
                0,
                format!("{} bytes: too short for a sparse header", b.len()),
            ));
        }
        if get32(b, 0) != MAGIC {
            return Err(bad(0, "no KDMV magic: not a hosted sparse extent".into()));
        }
        let h = Header {
            version: get32(b, 4),
            flags: get32(b, 8),
            capacity: get64(b, 12),
            granularity: get64(b, 20),
            desc_offset: get64(b, 28),
            desc_size: get64(b, 36),
            gtes_per_gt: get32(b, 44),
            rgd_offset: get64(b, 48),
            gd_offset: get64(b, 56),
            grain_offset: get64(b, 64),
            unclean: b[72],
            compression: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(bad(
                4,
                format!("sparse extent version {} is not 1 to 3", h.version),
            ));
        }
        if h.flags & FLAG_NL_DETECT != 0 && b[73..77] != CHECK {
            return Err(bad(
                73,
                "the newline check bytes are damaged (was the file copied in text mode?)".into(),
            ));
        }
        if h.flags & (FLAG_COMPRESS | FLAG_MARKER) != 0 || h.compression != 0 {
            return Err(bad(
                8,
                "a compressed (stream-optimized) extent: convert it with qemu-img first".into(),
            ));
        }
        if !h.granularity.is_power_of_two() || !(8..=2048).contains(&h.granularity) {
            return Err(bad(
                20,
                format!(
                    "grain of {} sectors is not a power of two from 8 to 2048",
                    h.granularity
                ),
            ));
        }
        if h.gtes_per_gt != GTES_PER_GT {
            return Err(bad(
                44,
                format!(
                    "{} entries per grain table (this host reads 512)",
                    h.gtes_per_gt
                ),
            ));
        }
        if h.capacity == 0 || h.capacity > MAX_FILE_SECTORS {
            return Err(bad(
                12,
                format!("capacity of {} sectors is not from 1 to 2^32", h.capacity),
            ));
        }
        let meta_end = |at: u64| {
            at.saturating_add(h.gd_sectors())
                .saturating_add(h.tables() * GT_SECTORS)
        };
        for (o, at, what) in [
            (56u64, h.gd_offset, "grain directory"),
            (48, h.rgd_offset, "redundant grain directory"),
        ] {
            if what.starts_with("redundant") && h.flags & FLAG_RGD == 0 {
                continue;
            }
            if at == 0
                || meta_end(at) > h.grain_offset
                || meta_end(at).saturating_mul(SECTOR) > file_len
            {
                return Err(bad(
                    o,
                    format!("{what} at sector {at} does not lie between the header and the first grain inside the file"),
                ));
            }
        }
        if h.grain_offset >= MAX_FILE_SECTORS {
            return Err(bad(
                64,
                format!("first grain at sector {} is past 2 TiB", h.grain_offset),
            ));
        }
        Ok(h)
    }
}

/// Check one directory's entries: each table after the directory and
/// before the first grain, tables not overlapping. Returns the tables'
/// sectors.
pub fn check_gd(h: &Header, gd: &[u32], file: &str, which: u64) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(gd.len());
    for (k, &e) in gd.iter().enumerate() {
        let at = u64::from(e);
        let off = which * SECTOR + k as u64 * 4;
        if at == 0 {
            return Err(DiskError::Corrupt {
                file: file.to_string(),
                offset: off,
                reason: format!(
                    "grain directory entry {k} is 0 (this host preallocates every grain table)"
                ),
            });
        }
        if at < 1 || at + GT_SECTORS > h.grain_offset {
            return Err(DiskError::Corrupt {
                file: file.to_string(),
                offset: off,
                reason: format!(
                    "grain table {k} at sector {at} is not between the header and the first grain"
                ),
            });
        }
        out.push(at);
    }
    Ok(out)
}

/// Check a grain-table entry read at byte `at_byte` of `file` (of
/// `file_len` bytes): 0, or a whole grain at or past the first grain,
/// aligned, inside the file.
pub fn check_gte(h: &Header, e: u32, file: &str, at_byte: u64, file_len: u64) -> Result<()> {
    let s = u64::from(e);
    if s == 0 || (s == 1 && h.flags & FLAG_ZERO_GRAIN != 0) {
        return Ok(());
    }
    let bad = |reason: String| DiskError::Corrupt {
        file: file.to_string(),
        offset: at_byte,
        reason,
    };
    if s < h.grain_offset {
        return Err(bad(format!(
            "grain-table entry points at sector {s}, into the metadata before the first grain ({})",
            h.grain_offset
        )));
    }
    if (s + h.granularity) * SECTOR > file_len {
        return Err(bad(format!(
            "grain-table entry points at sector {s}, past the end of the file ({file_len} bytes): a truncated delta"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_lay_out_tables_before_the_grains() {
        for (cap, grain) in [
            (64u64 << 20, 64u64 << 10),
            (1 << 40, 1 << 20),
            (512, 4096),
            (3 << 30, 64 << 10),
        ] {
            let h = Header::new(cap, grain).unwrap();
            let file_len = h.grain_offset * SECTOR;
            assert_eq!(Header::decode(&h.encode(), "x", file_len).unwrap(), h);
            assert!(h.gd_offset + h.gd_sectors() + h.tables() * GT_SECTORS <= h.grain_offset);
            assert_eq!(h.grain_offset % h.granularity, 0);
            assert!(h.grain_offset < MAX_FILE_SECTORS);
        }
        assert!(Header::new(1 << 41, 64 << 10).is_err());
        assert!(Header::new(1 << 20, 3000).is_err());
    }

    #[test]
    fn damaged_headers_are_refused_naming_the_field() {
        let h = Header::new(64 << 20, 64 << 10).unwrap();
        let len = h.grain_offset * SECTOR;
        let cases: Vec<(usize, u8, &str)> = vec![
            (0, b'X', "magic"),
            (4, 9, "version"),
            (20, 3, "grain"),
            (44, 7, "entries per grain table"),
            (74, b'x', "newline"),
            (10, 1, "compressed"),
            (56, 0, "grain directory"),
        ];
        for (at, v, want) in cases {
            let mut b = h.encode();
            b[at] = v;
            if at == 56 {
                b[56..64].fill(0);
            }
            let e = Header::decode(&b, "d-s001.vmdk", len)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains("d-s001.vmdk"),
                "byte {at}: {e}"
            );
        }
        assert!(
            Header::decode(&h.encode(), "x", 1024).is_err(),
            "a truncated file"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_header_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 512)) {
            let mut b = b;
            b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            if let Ok(h) = Header::decode(&b, "p", u64::MAX / 4) {
                let _ = h.tables();
                let _ = h.gd_sectors();
            }
        }
    }
}
