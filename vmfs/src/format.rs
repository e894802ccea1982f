//! The on-disk format: constants, the common metadata header, and codecs for
//! every metadata structure. `docs/FORMAT.md` describes the same bytes; keep
//! the two in step.
//!
//! All integers are little-endian. Metadata lives in 4 KiB blocks. Every
//! block starts (after a 512-byte lock sector, for lockable objects) with a
//! 32-byte header: magic, version, crc32 of the body, and the block's own
//! address, so a misdirected or torn write is caught on read.

use crate::error::FsError;

pub const MD: usize = 4096;
pub const LOCK_SECTOR: usize = 512;
pub const VERSION: u16 = 1;
pub const HDR: usize = 32;

pub const MAGIC_VOLUME: u32 = u32::from_le_bytes(*b"VMFV");
pub const MAGIC_FBC: u32 = u32::from_le_bytes(*b"VFBC");
pub const MAGIC_RCLUSTER: u32 = u32::from_le_bytes(*b"VRCL");
pub const MAGIC_RTABLE: u32 = u32::from_le_bytes(*b"VRTB");
pub const MAGIC_FD: u32 = u32::from_le_bytes(*b"VFDE");
pub const MAGIC_PTR: u32 = u32::from_le_bytes(*b"VPTR");
pub const MAGIC_DIRHDR: u32 = u32::from_le_bytes(*b"VDRH");
pub const MAGIC_DIRBKT: u32 = u32::from_le_bytes(*b"VDRB");
pub const MAGIC_HEARTBEAT: u32 = u32::from_le_bytes(*b"VHBT");

pub const MAX_EXTENTS: usize = 32;
pub const MAX_HOSTS_LIMIT: u32 = 1024;
/// Per-host journal size in 4 KiB blocks: default 16 MiB, 1 MiB to 4 GiB.
pub const JOURNAL_DEFAULT_BLOCKS: u32 = 4096;
pub const JOURNAL_MIN_BLOCKS: u32 = 256;
pub const JOURNAL_MAX_BLOCKS: u32 = 1 << 20;
/// File blocks covered by one file-block cluster (its bitmap is 2 KiB).
/// Blocks one file-block cluster covers at most (its bitmap fills its
/// block); volumes made before the header said otherwise use exactly this.
pub const FBC_BLOCKS: u64 = 16384;
/// Fewest blocks a file-block cluster covers (mkfs's choice).
pub const FBC_BLOCKS_MIN: u64 = 512;

/// Whether `n` blocks per file-block cluster is a size the format allows.
pub fn check_fbc_blocks(n: u32) -> std::result::Result<(), String> {
    if n % 8 != 0 || !(8..=FBC_BLOCKS).contains(&u64::from(n)) {
        return Err(format!(
            "{n} blocks per file-block cluster: must be a multiple of 8 in 8..={FBC_BLOCKS}"
        ));
    }
    Ok(())
}
pub const RT_ENTRIES: usize = 440;
/// Pointers in a pointer block.
pub const PB_PTRS: usize = 504;
/// Pointers in a file descriptor.
pub const FD_PTRS: usize = 256;
pub const FD_AREA: usize = 256;
pub const INLINE_MAX: usize = MD - LOCK_SECTOR - FD_AREA;
/// Bit 63 of a pointer: allocated but never written, reads as zeros.
pub const PTR_UNWRITTEN: u64 = 1 << 63;
pub const PTR_ADDR_MASK: u64 = (1 << 56) - 1;

/// The kinds of resources kept in resource clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResType {
    Fd = 1,
    SubBlock = 2,
    PtrBlock = 3,
}

impl ResType {
    pub fn from_u32(v: u32) -> Option<ResType> {
        match v {
            1 => Some(ResType::Fd),
            2 => Some(ResType::SubBlock),
            3 => Some(ResType::PtrBlock),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ResType::Fd => "file descriptor",
            ResType::SubBlock => "sub-block",
            ResType::PtrBlock => "pointer block",
        }
    }
}

pub fn get16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
pub fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
pub fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn magic_name(m: u32) -> &'static str {
    match m {
        MAGIC_VOLUME => "volume header",
        MAGIC_FBC => "file-block cluster",
        MAGIC_RCLUSTER => "resource cluster",
        MAGIC_RTABLE => "resource table",
        MAGIC_FD => "file descriptor",
        MAGIC_PTR => "pointer block",
        MAGIC_DIRHDR => "directory header",
        MAGIC_DIRBKT => "directory bucket",
        MAGIC_HEARTBEAT => "heartbeat slot",
        _ => "metadata block",
    }
}

/// Compute the checksum of a body (the crc field counts as zero).
pub fn body_crc(body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&body[..8]);
    h.update(&[0; 4]);
    h.update(&body[12..]);
    h.finalize()
}

/// Start a fresh body: zero it and write the header fields.
pub fn init_body(body: &mut [u8], magic: u32, self_addr: u64, seq: u64) {
    body.fill(0);
    put32(body, 0, magic);
    put16(body, 4, VERSION);
    put64(body, 16, self_addr);
    put64(body, 24, seq);
}

/// Seal a body before it goes to disk.
pub fn seal(body: &mut [u8]) {
    let c = body_crc(body);
    put32(body, 8, c);
}

/// Why a body failed verification (None when it is good).
pub fn check_body(body: &[u8], magic: u32, self_addr: u64) -> std::result::Result<(), String> {
    let m = get32(body, 0);
    if m != magic {
        if body.iter().all(|&b| b == 0) {
            return Err(format!(
                "expected a {}, found an all-zero block",
                magic_name(magic)
            ));
        }
        return Err(format!(
            "bad magic {m:#010x}, expected {magic:#010x} ({})",
            magic_name(magic)
        ));
    }
    let v = get16(body, 4);
    if v != VERSION {
        return Err(format!(
            "format version {v}, this build reads version {VERSION}"
        ));
    }
    let stored = get32(body, 8);
    let c = body_crc(body);
    if stored != c {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {c:#010x})"
        ));
    }
    let a = get64(body, 16);
    if a != self_addr {
        return Err(format!(
            "block says it belongs at address {a:#x}, read from {self_addr:#x} (misdirected write)"
        ));
    }
    Ok(())
}

/// Byte offset of the body within a 4 KiB block of this kind.
pub fn body_offset(magic: u32) -> usize {
    match magic {
        MAGIC_FBC | MAGIC_RCLUSTER | MAGIC_RTABLE | MAGIC_FD => LOCK_SECTOR,
        _ => 0,
    }
}

// ---------------------------------------------------------------- volume header

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentEntry {
    pub uuid: [u8; 16],
    /// File blocks this extent contributes.
    pub nblocks: u64,
    /// Logical number of its first block.
    pub first_block: u64,
    /// Blocks at its start holding metadata (header, bitmaps, ...).
    pub meta_blocks: u32,
    /// Byte offset of its file-block cluster area within the extent.
    pub fbc_off: u32,
    /// The LUN's size in bytes when the extent was added.
    pub lun_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHeader {
    pub uuid: [u8; 16],
    pub label: String,
    pub config_gen: u64,
    pub block_size: u32,
    pub sub_block_size: u32,
    pub max_hosts: u32,
    pub extent_index: u32,
    pub created: u64,
    pub root_fd: u64,
    pub heartbeat_off: u64,
    pub rt_off: u64,
    pub rt_blocks: u32,
    /// Size of each host's journal in 4 KiB blocks (superblock included).
    pub journal_blocks: u32,
    /// Blocks each file-block cluster covers (the last of an extent may
    /// cover fewer); each cluster is locked on its own, so hosts allocate
    /// from different ones. Stored as 0 by volumes made before the field:
    /// read as [`FBC_BLOCKS`].
    pub fbc_blocks: u32,
    pub extents: Vec<ExtentEntry>,
    /// Per extent, the LUN URL it was given as (a hint for hosts that must
    /// open an extent another host added; "" when unknown).
    pub urls: Vec<String>,
}

const VH_EXTENTS: usize = 192;
const VH_EXTENT_SIZE: usize = 48;
/// URL hints: u16 length, then the URLs NUL-separated, to the end of the body.
const VH_URLS: usize = VH_EXTENTS + MAX_EXTENTS * VH_EXTENT_SIZE;
const VH_URLS_MAX: usize = MD - VH_URLS - 2;

impl VolumeHeader {
    pub fn encode(&self, self_addr: u64) -> Vec<u8> {
        let mut b = vec![0u8; MD];
        init_body(&mut b, MAGIC_VOLUME, self_addr, self.config_gen);
        b[32..48].copy_from_slice(&self.uuid);
        let l = self.label.as_bytes();
        b[48..48 + l.len().min(63)].copy_from_slice(&l[..l.len().min(63)]);
        put64(&mut b, 112, self.config_gen);
        put32(&mut b, 120, self.block_size);
        put32(&mut b, 124, self.sub_block_size);
        put32(&mut b, 128, self.max_hosts);
        put32(&mut b, 132, self.extent_index);
        put32(&mut b, 136, self.extents.len() as u32);
        put64(&mut b, 144, self.created);
        put64(&mut b, 152, self.root_fd);
        put64(&mut b, 160, self.heartbeat_off);
        put64(&mut b, 168, self.rt_off);
        put32(&mut b, 176, self.rt_blocks);
        put32(&mut b, 180, self.journal_blocks);
        put32(&mut b, 184, self.fbc_blocks);
        for (i, e) in self.extents.iter().enumerate() {
            let o = VH_EXTENTS + i * VH_EXTENT_SIZE;
            b[o..o + 16].copy_from_slice(&e.uuid);
            put64(&mut b, o + 16, e.nblocks);
            put64(&mut b, o + 24, e.first_block);
            put32(&mut b, o + 32, e.meta_blocks);
            put32(&mut b, o + 36, e.fbc_off);
            put64(&mut b, o + 40, e.lun_size);
        }
        let urls = self.urls.join("\0").into_bytes();
        if urls.len() <= VH_URLS_MAX && !self.urls.iter().any(|u| u.contains('\0')) {
            b[VH_URLS..VH_URLS + 2].copy_from_slice(&(urls.len() as u16).to_le_bytes());
            b[VH_URLS + 2..VH_URLS + 2 + urls.len()].copy_from_slice(&urls);
        }
        seal(&mut b);
        b
    }

    /// Decode and validate a header read from the start of a LUN.
    pub fn decode(b: &[u8], self_addr: Option<u64>) -> std::result::Result<VolumeHeader, String> {
        if b.len() < MD {
            return Err(format!("header is {} bytes, expected {MD}", b.len()));
        }
        let b = &b[..MD];
        if get32(b, 0) != MAGIC_VOLUME {
            return Err(
                "no datastore volume header (bad magic): not a datastore extent, or not formatted"
                    .into(),
            );
        }
        let addr = self_addr.unwrap_or_else(|| get64(b, 16));
        check_body(b, MAGIC_VOLUME, addr)?;
        let count = get32(b, 136) as usize;
        if count == 0 || count > MAX_EXTENTS {
            return Err(format!(
                "extent count {count} out of range 1..={MAX_EXTENTS}"
            ));
        }
        let block_size = get32(b, 120);
        let sub_block_size = get32(b, 124);
        if !block_size.is_power_of_two() || !(64 << 10..=64 << 20).contains(&block_size) {
            return Err(format!(
                "block size {block_size} is not a power of two in 64K..64M"
            ));
        }
        if !sub_block_size.is_power_of_two()
            || sub_block_size < MD as u32
            || sub_block_size > block_size / 16
        {
            return Err(format!(
                "sub-block size {sub_block_size} invalid for block size {block_size}"
            ));
        }
        let extent_index = get32(b, 132);
        if extent_index as usize >= count {
            return Err(format!(
                "extent index {extent_index} but only {count} extents"
            ));
        }
        let max_hosts = get32(b, 128);
        if max_hosts == 0 || max_hosts > MAX_HOSTS_LIMIT {
            return Err(format!(
                "max hosts {max_hosts} out of range 1..={MAX_HOSTS_LIMIT}"
            ));
        }
        let journal_blocks = get32(b, 180);
        if !(JOURNAL_MIN_BLOCKS..=JOURNAL_MAX_BLOCKS).contains(&journal_blocks) {
            return Err(format!(
                "journal size {journal_blocks} blocks out of range {JOURNAL_MIN_BLOCKS}..={JOURNAL_MAX_BLOCKS}"
            ));
        }
        let fbc_blocks = match get32(b, 184) {
            0 => FBC_BLOCKS as u32,
            n => n,
        };
        check_fbc_blocks(fbc_blocks)?;
        let mut extents = Vec::with_capacity(count);
        let mut next_first = 0u64;
        for i in 0..count {
            let o = VH_EXTENTS + i * VH_EXTENT_SIZE;
            let e = ExtentEntry {
                uuid: b[o..o + 16].try_into().expect("16 bytes"),
                nblocks: get64(b, o + 16),
                first_block: get64(b, o + 24),
                meta_blocks: get32(b, o + 32),
                fbc_off: get32(b, o + 36),
                lun_size: get64(b, o + 40),
            };
            if e.first_block != next_first {
                return Err(format!(
                    "extent {i} starts at block {} but the previous ends at {next_first}",
                    e.first_block
                ));
            }
            if e.nblocks == 0 || u64::from(e.meta_blocks) >= e.nblocks || e.nblocks > (1 << 40) {
                return Err(format!(
                    "extent {i}: {} blocks with {} metadata blocks",
                    e.nblocks, e.meta_blocks
                ));
            }
            if e.nblocks.saturating_mul(u64::from(block_size)) > e.lun_size {
                return Err(format!(
                    "extent {i}: {} blocks do not fit its LUN size {}",
                    e.nblocks, e.lun_size
                ));
            }
            next_first += e.nblocks;
            extents.push(e);
        }
        let label_raw = &b[48..112];
        let end = label_raw
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(label_raw.len());
        // URL hints: malformed ones are dropped, never an error (a hint).
        let n = (get16(b, VH_URLS) as usize).min(VH_URLS_MAX);
        let mut urls: Vec<String> = if n == 0 {
            Vec::new()
        } else {
            String::from_utf8_lossy(&b[VH_URLS + 2..VH_URLS + 2 + n])
                .split('\0')
                .map(str::to_string)
                .collect()
        };
        urls.resize(count, String::new());
        Ok(VolumeHeader {
            urls,
            uuid: b[32..48].try_into().expect("16 bytes"),
            label: String::from_utf8_lossy(&label_raw[..end]).into_owned(),
            config_gen: get64(b, 112),
            block_size,
            sub_block_size,
            max_hosts,
            extent_index,
            created: get64(b, 144),
            root_fd: get64(b, 152),
            heartbeat_off: get64(b, 160),
            rt_off: get64(b, 168),
            rt_blocks: get32(b, 176),
            journal_blocks,
            fbc_blocks,
            extents,
        })
    }

    pub fn total_blocks(&self) -> u64 {
        self.extents.iter().map(|e| e.nblocks).sum()
    }
}

// ---------------------------------------------------------------- file descriptor

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;

/// How a file's data is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Data in the descriptor itself.
    Inline,
    /// A tree of pointers of `depth` levels of pointer blocks above leaves of
    /// sub-blocks (`sub == true`: small files and directories) or file blocks.
    Tree { sub: bool, depth: u8 },
}

/// Descriptor flag: the file may be opened for writing by several hosts at
/// once (clustered guests); set with the `user.vmfs.multi-writer` xattr.
pub const FD_FLAG_MULTI_WRITER: u32 = 1;
/// FD flag: the file is a raw device mapping (its contents, the mapping
/// descriptor, are written by `rdm`; the mapped LUN holds the data).
pub const FD_FLAG_RDM: u32 = 2;

/// A decoded file descriptor (inode). The pointer area is kept raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub addr: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub generation: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub crtime: (i64, u32),
    pub rdev: u32,
    pub flags: u32,
    pub layout: Layout,
    pub alloc_bytes: u64,
    pub parent: u64,
    pub area: Vec<u8>,
}

impl Inode {
    pub fn new(
        addr: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        now: (i64, u32),
        generation: u64,
    ) -> Inode {
        Inode {
            addr,
            mode,
            uid,
            gid,
            nlink: 1,
            size: 0,
            generation,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            flags: 0,
            layout: Layout::Inline,
            alloc_bytes: 0,
            parent: 0,
            area: vec![0; INLINE_MAX],
        }
    }
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn ptr(&self, i: usize) -> u64 {
        get64(&self.area, i * 8)
    }
    pub fn set_ptr(&mut self, i: usize, v: u64) {
        put64(&mut self.area, i * 8, v)
    }

    /// Encode into the body (bytes 512..4096) of an FD block.
    pub fn encode(&self, body: &mut [u8]) {
        init_body(body, MAGIC_FD, self.addr, 0);
        put32(body, 32, self.mode);
        put32(body, 36, self.uid);
        put32(body, 40, self.gid);
        put32(body, 44, self.nlink);
        put64(body, 48, self.size);
        put64(body, 56, self.generation);
        let t = |b: &mut [u8], o: usize, v: (i64, u32)| {
            put64(b, o, v.0 as u64);
            put32(b, o + 8, v.1);
        };
        t(body, 64, self.atime);
        t(body, 76, self.mtime);
        t(body, 88, self.ctime);
        t(body, 100, self.crtime);
        put32(body, 112, self.rdev);
        put32(body, 116, self.flags);
        let (m, leaf, depth) = match self.layout {
            Layout::Inline => (0, 0, 0),
            Layout::Tree { sub, depth } => (1, if sub { 1 } else { 2 }, depth),
        };
        body[120] = m;
        body[121] = leaf;
        body[122] = depth;
        put64(body, 128, self.alloc_bytes);
        put64(body, 136, self.parent);
        body[FD_AREA..FD_AREA + INLINE_MAX].copy_from_slice(&self.area);
        seal(body);
    }

    /// Decode a verified FD body; `Err` says what is inconsistent.
    pub fn decode(body: &[u8], addr: u64) -> std::result::Result<Inode, String> {
        check_body(body, MAGIC_FD, addr)?;
        let t = |o: usize| (get64(body, o) as i64, get32(body, o + 8));
        let layout = match (body[120], body[121], body[122]) {
            (0, _, _) => Layout::Inline,
            (1, 1, d) if d <= 4 => Layout::Tree {
                sub: true,
                depth: d,
            },
            (1, 2, d) if d <= 4 => Layout::Tree {
                sub: false,
                depth: d,
            },
            (m, l, d) => return Err(format!("unknown addressing mode {m}/{l}/{d}")),
        };
        let ino = Inode {
            addr,
            mode: get32(body, 32),
            uid: get32(body, 36),
            gid: get32(body, 40),
            nlink: get32(body, 44),
            size: get64(body, 48),
            generation: get64(body, 56),
            atime: t(64),
            mtime: t(76),
            ctime: t(88),
            crtime: t(100),
            rdev: get32(body, 112),
            flags: get32(body, 116),
            layout,
            alloc_bytes: get64(body, 128),
            parent: get64(body, 136),
            area: body[FD_AREA..FD_AREA + INLINE_MAX].to_vec(),
        };
        if ino.mode & S_IFMT == 0 {
            return Err("file type is zero".into());
        }
        if layout == Layout::Inline && ino.size > INLINE_MAX as u64 {
            return Err(format!(
                "inline file of {} bytes (at most {INLINE_MAX})",
                ino.size
            ));
        }
        Ok(ino)
    }
}

// ---------------------------------------------------------------- bitmaps

pub fn bit_get(bm: &[u8], i: usize) -> bool {
    bm[i / 8] & (1 << (i % 8)) != 0
}
pub fn bit_set(bm: &mut [u8], i: usize, v: bool) {
    if v {
        bm[i / 8] |= 1 << (i % 8)
    } else {
        bm[i / 8] &= !(1 << (i % 8))
    }
}

/// Offsets within the body of cluster blocks (FBC and resource clusters).
pub const CL_FIRST: usize = 32; // FBC: first block (u64); RC: type (u32) + res size (u32)
pub const CL_COUNT: usize = 40;
pub const CL_FREE: usize = 44;
pub const CL_BITMAP: usize = 48;
pub const CL_BITMAP_BYTES: usize = (FBC_BLOCKS / 8) as usize;

// ---------------------------------------------------------------- directories

/// Directory bucket entries start here.
pub const DB_ENTRIES: usize = 40;
/// Index of the first overflow block in a directory file.
pub const DIR_OVF_BASE: u64 = 1 << 20;
pub const NAME_MAX: usize = 255;

/// The on-disk name hash (FNV-1a 64 with a final mix). Never change it: the
/// placement of every directory entry depends on it.
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in name {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub hash: u64,
    pub fd: u64,
    pub kind: u8,
    pub name: Vec<u8>,
}

impl DirEntry {
    pub fn disk_len(&self) -> usize {
        18 + self.name.len()
    }
}

/// Parse the entries of a verified bucket body.
pub fn bucket_entries(b: &[u8]) -> std::result::Result<Vec<DirEntry>, String> {
    let n = get16(b, 32) as usize;
    let used = get16(b, 34) as usize;
    if DB_ENTRIES + used > MD {
        return Err(format!("bucket claims {used} bytes of entries"));
    }
    let mut out = Vec::with_capacity(n);
    let mut o = DB_ENTRIES;
    for i in 0..n {
        if o + 18 > DB_ENTRIES + used {
            return Err(format!("entry {i} runs past the used area"));
        }
        let nl = b[o + 17] as usize;
        if nl == 0 || o + 18 + nl > DB_ENTRIES + used {
            return Err(format!("entry {i} has a bad name length {nl}"));
        }
        out.push(DirEntry {
            hash: get64(b, o),
            fd: get64(b, o + 8),
            kind: b[o + 16],
            name: b[o + 18..o + 18 + nl].to_vec(),
        });
        o += 18 + nl;
    }
    if o != DB_ENTRIES + used {
        return Err(format!(
            "entries end at {o} but the bucket says {}",
            DB_ENTRIES + used
        ));
    }
    Ok(out)
}

/// Write entries into a bucket body (header already initialised). False if they do not fit.
pub fn bucket_store(b: &mut [u8], entries: &[DirEntry]) -> bool {
    let total: usize = entries.iter().map(DirEntry::disk_len).sum();
    if DB_ENTRIES + total > MD {
        return false;
    }
    b[DB_ENTRIES..].fill(0);
    let mut o = DB_ENTRIES;
    for e in entries {
        put64(b, o, e.hash);
        put64(b, o + 8, e.fd);
        b[o + 16] = e.kind;
        b[o + 17] = e.name.len() as u8;
        b[o + 18..o + 18 + e.name.len()].copy_from_slice(&e.name);
        o += e.disk_len();
    }
    put16(b, 32, entries.len() as u16);
    put16(b, 34, total as u16);
    true
}

pub fn corrupt(lun: &str, offset: u64, object: String, reason: String) -> FsError {
    FsError::Corrupt {
        lun: lun.to_string(),
        offset,
        object,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vh() -> VolumeHeader {
        VolumeHeader {
            uuid: [7; 16],
            label: "ds1".into(),
            config_gen: 3,
            block_size: 1 << 20,
            sub_block_size: 64 << 10,
            max_hosts: 64,
            extent_index: 1,
            created: 1,
            root_fd: 99,
            heartbeat_off: 4096,
            rt_off: 40960,
            rt_blocks: 64,
            journal_blocks: 4096,
            fbc_blocks: 512,
            urls: vec!["/dev/sdb".into(), "nbd://h/e".into()],
            extents: vec![
                ExtentEntry {
                    uuid: [1; 16],
                    nblocks: 64,
                    first_block: 0,
                    meta_blocks: 1,
                    fbc_off: 8192,
                    lun_size: 64 << 20,
                },
                ExtentEntry {
                    uuid: [2; 16],
                    nblocks: 32,
                    first_block: 64,
                    meta_blocks: 1,
                    fbc_off: 4096,
                    lun_size: 32 << 20,
                },
            ],
        }
    }

    #[test]
    fn volume_header_roundtrip_and_every_flip_detected() {
        let h = vh();
        let b = h.encode(0x4000);
        assert_eq!(VolumeHeader::decode(&b, Some(0x4000)).unwrap(), h);
        assert!(VolumeHeader::decode(&b, Some(0x8000))
            .unwrap_err()
            .contains("misdirected"));
        for i in (0..MD).step_by(7) {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(
                VolumeHeader::decode(&c, Some(0x4000)).is_err(),
                "flip at {i} undetected"
            );
        }
    }

    #[test]
    fn inode_roundtrip() {
        let mut i = Inode::new(0x1234, S_IFREG | 0o644, 1, 2, (5, 6), 9);
        i.layout = Layout::Tree {
            sub: false,
            depth: 2,
        };
        i.set_ptr(3, 77 | PTR_UNWRITTEN);
        let mut b = vec![0u8; MD - LOCK_SECTOR];
        i.encode(&mut b);
        assert_eq!(Inode::decode(&b, 0x1234).unwrap(), i);
        b[40] ^= 1;
        assert!(Inode::decode(&b, 0x1234).unwrap_err().contains("checksum"));
    }

    #[test]
    fn bucket_roundtrip() {
        let mut b = vec![0u8; MD];
        init_body(&mut b, MAGIC_DIRBKT, 5, 1);
        let es: Vec<DirEntry> = (0..20)
            .map(|i| DirEntry {
                hash: name_hash(format!("f{i}").as_bytes()),
                fd: i,
                kind: 1,
                name: format!("f{i}").into_bytes(),
            })
            .collect();
        assert!(bucket_store(&mut b, &es));
        seal(&mut b);
        check_body(&b, MAGIC_DIRBKT, 5).unwrap();
        assert_eq!(bucket_entries(&b).unwrap(), es);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), MD), addr in any::<u64>()) {
            let _ = VolumeHeader::decode(&data, Some(addr));
            let _ = VolumeHeader::decode(&data, None);
            let _ = Inode::decode(&data[..MD - LOCK_SECTOR], addr);
            let _ = bucket_entries(&data);
        }
        #[test]
        fn sealed_garbage_decoders_never_panic(mut data in proptest::collection::vec(any::<u8>(), MD), magic in 0usize..3) {
            // Valid header, random contents: exercises the field checks, not just the checksum.
            let m = [MAGIC_VOLUME, MAGIC_FD, MAGIC_DIRBKT][magic];
            put32(&mut data, 0, m);
            put16(&mut data, 4, VERSION);
            put64(&mut data, 16, 8);
            seal(&mut data);
            let _ = VolumeHeader::decode(&data, Some(8));
            let _ = Inode::decode(&data[..MD - LOCK_SECTOR], 8);
            let _ = bucket_entries(&data);
        }
    }
}

/// State of a heartbeat slot.
pub const SLOT_FREE: u32 = 0;
pub const SLOT_LIVE: u32 = 1;
pub const SLOT_REPLAYING: u32 = 2;

/// One heartbeat slot (a 512-byte sector of the heartbeat region). Version 1
/// of the filesystem uses the journal location and state; the locking layer
/// owns the heartbeat fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSlot {
    pub state: u32,
    /// While `state` is SLOT_REPLAYING: the slot of the host replaying it.
    pub replayer: u32,
    pub host: [u8; 16],
    pub generation: u64,
    pub heartbeat: u64,
    /// 4K address of the slot's journal (0: none allocated yet).
    pub journal: u64,
    pub journal_blocks: u32,
    /// This slot's Disk Paxos ballot block for the volume lock (used on
    /// LUNs without compare-and-write; written only by the slot's host).
    pub ballot: locking::Dblock,
    /// Bit 0: this host is waiting for the volume lock. A holder that sees
    /// it gives the lock back after its current operation; a holder that
    /// sees no waiter keeps it (a hint for speed, never for safety).
    pub wants: u32,
    /// 4K address of the file-block cluster this host waits for (0: none):
    /// its holder gives it back at its next chance (a hint for speed; the
    /// cluster's lock sector decides).
    pub want_cluster: u64,
    /// A request of this host to another, and this host's answer to one
    /// ([`crate::mailbox`]); zero in volumes written before them.
    pub mail: Mail,
}

/// The mailbox fields of a heartbeat sector (offsets 132..184).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mail {
    /// Slot + 1 this host asks (0: no request).
    pub req_to: u32,
    /// That slot's generation when asked (a new host there ignores it).
    pub req_gen: u64,
    /// The request's number (per slot generation of this host, from 1).
    pub req_id: u64,
    pub req_kind: u32,
    /// Slot + 1 of the host whose request this host last took (0: none).
    pub rep_to: u32,
    /// That host's generation.
    pub rep_gen: u64,
    pub rep_id: u64,
    /// 1: taken, being handled; 2: answered (the answer is a file).
    pub rep_state: u32,
}

/// Offset of the mailbox fields in a heartbeat sector, and their version
/// (a u32 before them).
pub const SLOT_MAIL_OFF: usize = 132;
pub const MAIL_VERSION: u32 = 1;
pub const MAIL_TAKEN: u32 = 1;
pub const MAIL_ANSWERED: u32 = 2;

/// Offset of the ballot block in a heartbeat sector.
pub const SLOT_BALLOT_OFF: usize = 96;

impl HostSlot {
    /// The sealed sector of slot `slot` in the region at 4K address `region`.
    pub fn encode(&self, region: u64, slot: u32) -> Vec<u8> {
        let mut b = vec![0u8; LOCK_SECTOR];
        init_body(&mut b, MAGIC_HEARTBEAT, region, u64::from(slot));
        put32(&mut b, 32, self.state);
        put32(&mut b, 36, self.replayer);
        b[40..56].copy_from_slice(&self.host);
        put64(&mut b, 56, self.generation);
        put64(&mut b, 64, self.heartbeat);
        put64(&mut b, 72, self.journal);
        put32(&mut b, 80, self.journal_blocks);
        put32(&mut b, 84, self.wants);
        put64(&mut b, 88, self.want_cluster);
        b[SLOT_BALLOT_OFF..SLOT_BALLOT_OFF + locking::DBLOCK_LEN]
            .copy_from_slice(&self.ballot.encode());
        if self.mail != Mail::default() {
            let m = &self.mail;
            let o = SLOT_MAIL_OFF;
            put32(&mut b, o, MAIL_VERSION);
            put32(&mut b, o + 4, m.req_to);
            put64(&mut b, o + 8, m.req_gen);
            put64(&mut b, o + 16, m.req_id);
            put32(&mut b, o + 24, m.req_kind);
            put32(&mut b, o + 28, m.rep_to);
            put64(&mut b, o + 32, m.rep_gen);
            put64(&mut b, o + 40, m.rep_id);
            put32(&mut b, o + 48, m.rep_state);
        }
        seal(&mut b);
        b
    }

    pub fn decode(b: &[u8], region: u64, slot: u32) -> std::result::Result<HostSlot, String> {
        check_body(b, MAGIC_HEARTBEAT, region)?;
        if get64(b, 24) != u64::from(slot) {
            return Err(format!(
                "sector says slot {}, found at slot {slot}",
                get64(b, 24)
            ));
        }
        let s = HostSlot {
            state: get32(b, 32),
            replayer: get32(b, 36),
            host: b[40..56].try_into().expect("16 bytes"),
            generation: get64(b, 56),
            heartbeat: get64(b, 64),
            journal: get64(b, 72),
            journal_blocks: get32(b, 80),
            ballot: locking::Dblock::decode(
                &b[SLOT_BALLOT_OFF..SLOT_BALLOT_OFF + locking::DBLOCK_LEN],
            ),
            wants: get32(b, 84),
            want_cluster: get64(b, 88),
            mail: Mail::default(),
        };
        let o = SLOT_MAIL_OFF;
        let mut s = s;
        match get32(b, o) {
            0 => {}
            MAIL_VERSION => {
                s.mail = Mail {
                    req_to: get32(b, o + 4),
                    req_gen: get64(b, o + 8),
                    req_id: get64(b, o + 16),
                    req_kind: get32(b, o + 24),
                    rep_to: get32(b, o + 28),
                    rep_gen: get64(b, o + 32),
                    rep_id: get64(b, o + 40),
                    rep_state: get32(b, o + 48),
                }
            }
            // A newer host's mail: not for this one to read, the rest of
            // the slot still is.
            _ => {}
        }
        if s.state > SLOT_REPLAYING {
            return Err(format!("unknown slot state {}", s.state));
        }
        if s.journal != 0 && !(JOURNAL_MIN_BLOCKS..=JOURNAL_MAX_BLOCKS).contains(&s.journal_blocks)
        {
            return Err(format!("journal of {} blocks", s.journal_blocks));
        }
        Ok(s)
    }
}
