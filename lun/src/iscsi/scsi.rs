//! SCSI command blocks and the data they return, built and parsed in Rust
//! (SBC-3 / SPC-4). Every parser checks lengths and returns an error naming
//! the field instead of trusting the target.

/// TEST UNIT READY.
pub fn test_unit_ready() -> Vec<u8> {
    vec![0u8; 6]
}

/// INQUIRY (standard data when `page` is None, else that VPD page).
pub fn inquiry(page: Option<u8>, alloc: u16) -> Vec<u8> {
    let mut c = vec![0u8; 6];
    c[0] = 0x12;
    if let Some(p) = page {
        c[1] = 1;
        c[2] = p;
    }
    c[3..5].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ CAPACITY(16) (SERVICE ACTION IN(16), action 0x10).
pub fn read_capacity16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&32u32.to_be_bytes());
    c
}

fn rw16(op: u8, lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    if fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// READ(16).
pub fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(0x88, lba, blocks, false)
}

/// WRITE(16), with Force Unit Access when `fua`.
pub fn write16(lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    rw16(0x8a, lba, blocks, fua)
}

/// COMPARE AND WRITE of `blocks` blocks (the data-out is compare then write).
pub fn compare_and_write(lba: u64, blocks: u8) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

/// SYNCHRONIZE CACHE(16) of the whole LUN.
pub fn synchronize_cache16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x91;
    c
}

/// SYNCHRONIZE CACHE(10) of the whole LUN, for targets without the 16-byte form.
pub fn synchronize_cache10() -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x35;
    c
}

/// UNMAP with a parameter list of `param_len` bytes.
pub fn unmap(param_len: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&param_len.to_be_bytes());
    c
}

/// The UNMAP parameter list for the given (lba, blocks) ranges.
pub fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8 + 16 * ranges.len()];
    let desc = (16 * ranges.len()) as u16;
    p[0..2].copy_from_slice(&(desc + 6).to_be_bytes());
    p[2..4].copy_from_slice(&desc.to_be_bytes());
    for (i, (lba, n)) in ranges.iter().enumerate() {
        let d = &mut p[8 + 16 * i..24 + 16 * i];
        d[0..8].copy_from_slice(&lba.to_be_bytes());
        d[8..12].copy_from_slice(&n.to_be_bytes());
    }
    p
}

fn need(what: &str, buf: &[u8], n: usize) -> Result<(), String> {
    if buf.len() < n {
        return Err(format!(
            "{what}: {} bytes, at least {n} expected",
            buf.len()
        ));
    }
    Ok(())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// READ CAPACITY(16) data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub blocks: u64,
    pub block_len: u32,
    /// Logical block provisioning management enabled (thin).
    pub lbpme: bool,
    /// Unmapped blocks read as zeros.
    pub lbprz: bool,
}

pub fn parse_capacity(b: &[u8]) -> Result<Capacity, String> {
    need("READ CAPACITY(16) data", b, 32)?;
    let last = u64::from_be_bytes(b[0..8].try_into().map_err(|_| "short")?);
    let block_len = be32(&b[8..12]);
    if !(512..=65536).contains(&block_len) || !block_len.is_power_of_two() {
        return Err(format!("READ CAPACITY(16): logical block length {block_len} is not a power of two from 512 to 64 KiB"));
    }
    let blocks = last
        .checked_add(1)
        .ok_or("READ CAPACITY(16): last LBA overflows")?;
    if blocks.checked_mul(u64::from(block_len)).is_none() {
        return Err(format!(
            "READ CAPACITY(16): {blocks} blocks of {block_len} bytes overflow"
        ));
    }
    Ok(Capacity {
        blocks,
        block_len,
        lbpme: b[14] & 0x80 != 0,
        lbprz: b[14] & 0x40 != 0,
    })
}

/// Standard INQUIRY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    pub peripheral_type: u8,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

pub fn parse_inquiry(b: &[u8]) -> Result<Inquiry, String> {
    need("standard INQUIRY data", b, 36)?;
    Ok(Inquiry {
        peripheral_type: b[0] & 0x1f,
        vendor: ascii(&b[8..16]),
        product: ascii(&b[16..32]),
        revision: ascii(&b[32..36]),
    })
}

/// A VPD page's payload (after its 4-byte header), checked against the
/// page code asked for and the length the target declared.
pub fn vpd_payload(page: u8, b: &[u8]) -> Result<&[u8], String> {
    need(&format!("VPD page {page:#04x}"), b, 4)?;
    if b[1] != page {
        return Err(format!(
            "asked for VPD page {page:#04x}, got page {:#04x}",
            b[1]
        ));
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    let end = (4 + len).min(b.len());
    Ok(&b[4..end])
}

/// VPD 0x00: the pages this LUN has.
pub fn parse_supported_pages(b: &[u8]) -> Result<Vec<u8>, String> {
    Ok(vpd_payload(0x00, b)?.to_vec())
}

/// VPD 0x80: the unit serial number.
pub fn parse_serial(b: &[u8]) -> Result<String, String> {
    Ok(ascii(vpd_payload(0x80, b)?))
}

/// VPD 0x83: the LUN's best designator, written as Linux and ESX write
/// them (`naa.<hex>`, `eui.<hex>`, `t10.<text>`, or a SCSI name string).
/// Only designators of the logical unit itself count (association 0).
pub fn parse_identity(b: &[u8]) -> Result<Option<String>, String> {
    let mut p = vpd_payload(0x83, b)?;
    let mut best: Option<(u8, String)> = None;
    while p.len() >= 4 {
        let code_set = p[0] & 0x0f;
        let assoc = (p[1] >> 4) & 0x03;
        let dtype = p[1] & 0x0f;
        let len = p[3] as usize;
        let Some(d) = p.get(4..4 + len) else {
            return Err(format!(
                "VPD page 0x83: designator of {len} bytes runs past the page"
            ));
        };
        p = &p[4 + len..];
        if assoc != 0 || d.is_empty() {
            continue;
        }
        let hex = || d.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let (rank, text) = match dtype {
            3 => {
                // NAA: rank by the NAA field (6 registered extended, 5 registered, 2 extended, 3 local).
                let naa = d[0] >> 4;
                let rank = match naa {
                    6 => 10,
                    5 => 9,
                    2 => 8,
                    _ => 4,
                };
                (rank, format!("naa.{}", hex()))
            }
            2 => (7, format!("eui.{}", hex())),
            8 if code_set == 3 => (6, ascii(d)),
            1 => (
                3,
                format!("t10.{}", ascii(d).replace(char::is_whitespace, "_")),
            ),
            _ => continue,
        };
        if best.as_ref().is_none_or(|(r, _)| rank > *r) {
            best = Some((rank, text));
        }
    }
    Ok(best.map(|(_, t)| t))
}

/// VPD 0xB0: block limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    /// Largest COMPARE AND WRITE, in blocks (0: not supported).
    pub max_caw_blocks: u8,
    /// Largest transfer, in blocks (0: no limit stated).
    pub max_transfer_blocks: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
}

pub fn parse_block_limits(b: &[u8]) -> Result<BlockLimits, String> {
    let p = vpd_payload(0xb0, b)?;
    let mut l = BlockLimits::default();
    if p.len() >= 2 {
        l.max_caw_blocks = p[1];
    }
    if p.len() >= 8 {
        l.max_transfer_blocks = be32(&p[4..8]);
    }
    if p.len() >= 24 {
        l.max_unmap_blocks = be32(&p[16..20]);
        l.max_unmap_descriptors = be32(&p[20..24]);
    }
    Ok(l)
}

/// VPD 0xB2: logical block provisioning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provisioning {
    /// UNMAP is supported.
    pub lbpu: bool,
    /// Unmapped blocks read as zeros.
    pub lbprz: bool,
}

pub fn parse_provisioning(b: &[u8]) -> Result<Provisioning, String> {
    let p = vpd_payload(0xb2, b)?;
    need("VPD page 0xb2", p, 2)?;
    Ok(Provisioning {
        lbpu: p[1] & 0x80 != 0,
        lbprz: p[1] & 0x1c != 0,
    })
}

/// A sense key and additional sense code as a person reads them.
pub fn sense_text(key: u8, ascq: u16) -> String {
    let k = match key {
        0x0 => "NO SENSE",
        0x1 => "RECOVERED ERROR",
        0x2 => "NOT READY",
        0x3 => "MEDIUM ERROR",
        0x4 => "HARDWARE ERROR",
        0x5 => "ILLEGAL REQUEST",
        0x6 => "UNIT ATTENTION",
        0x7 => "DATA PROTECT",
        0x8 => "BLANK CHECK",
        0xb => "ABORTED COMMAND",
        0xd => "VOLUME OVERFLOW",
        0xe => "MISCOMPARE",
        _ => "sense key",
    };
    let a = match ascq {
        0x0000 => "",
        0x0401 => "becoming ready",
        0x0402 => "initializing command required",
        0x1100 => "unrecovered read error",
        0x1d00 => "miscompare during verify",
        0x2000 => "invalid command operation code",
        0x2100 => "LBA out of range",
        0x2400 => "invalid field in CDB",
        0x2500 => "logical unit not supported",
        0x2600 => "invalid field in parameter list",
        0x2700 => "write protected",
        0x2900 => "power on, reset or bus device reset",
        0x2a09 => "capacity data has changed",
        0x3a00 => "medium not present",
        0x3f0e => "reported LUNs data has changed",
        0x4400 => "internal target failure",
        _ => "",
    };
    if a.is_empty() {
        format!("CHECK CONDITION: {k} ({key:#x}), ASC/ASCQ {ascq:#06x}")
    } else {
        format!("CHECK CONDITION: {k}, {a} (ASC/ASCQ {ascq:#06x})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdbs_follow_sbc() {
        let c = read16(0x0102_0304_0506_0708, 9);
        assert_eq!(c[0], 0x88);
        assert_eq!(&c[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&c[10..14], &[0, 0, 0, 9]);
        assert_eq!(write16(1, 1, true)[1], 0x08);
        assert_eq!(compare_and_write(5, 1)[13], 1);
        assert_eq!(inquiry(Some(0x83), 255), vec![0x12, 1, 0x83, 0, 255, 0]);
        let p = unmap_params(&[(10, 20)]);
        assert_eq!(&p[0..4], &[0, 22, 0, 16]);
        assert_eq!(&p[8..16], &10u64.to_be_bytes());
    }

    #[test]
    fn parses_tgt_identity() {
        // What tgt returns for a LUN with scsi_id "IET     00010001": a T10
        // designator, a locally assigned NAA and a registered extended NAA.
        let mut page = vec![0, 0x83, 0, 0];
        page.extend_from_slice(&[2, 1, 0, 16]);
        page.extend_from_slice(b"IET     00010001");
        page.extend_from_slice(&[1, 3, 0, 8, 0x30, 0, 0, 0, 0, 0, 0, 1]);
        page.extend_from_slice(&[
            1, 3, 0, 16, 0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1,
        ]);
        let n = (page.len() - 4) as u16;
        page[2..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(
            parse_identity(&page).unwrap().unwrap(),
            "naa.60000000000000000000000000010001"
        );
        // Truncated designator: an error, not a panic.
        let mut bad = page.clone();
        bad[7] = 200;
        assert!(parse_identity(&bad).is_err());
    }

    #[test]
    fn parses_capacity() {
        let mut b = vec![0u8; 32];
        b[0..8].copy_from_slice(&131071u64.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        b[14] = 0xc0;
        let c = parse_capacity(&b).unwrap();
        assert_eq!(
            (c.blocks, c.block_len, c.lbpme, c.lbprz),
            (131072, 512, true, true)
        );
        b[8..12].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_capacity(&b).is_err());
        b[0..8].copy_from_slice(&u64::MAX.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        assert!(parse_capacity(&b).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_capacity(&b);
            let _ = parse_inquiry(&b);
            let _ = parse_supported_pages(&b);
            let _ = parse_serial(&b);
            let _ = parse_identity(&b);
            let _ = parse_block_limits(&b);
            let _ = parse_provisioning(&b);
        }
    }
}
