//! The VMDK text descriptor (`NAME.vmdk`), in VMware's syntax as QEMU's
//! `block/vmdk.c` reads and writes it:
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=2b5f65ab
//! parentCID=ffffffff
//! createType="vmfs"
//!
//! # Extent description
//! RW 131072 VMFS "disk-flat.vmdk"
//!
//! # The Disk Data Base
//! #DDB
//!
//! ddb.adapterType = "lsilogic"
//! ```
//!
//! A child adds `parentFileNameHint="…"` and its parent's CID as
//! `parentCID`. The parser is strict where a mistake would read the wrong
//! data (extent lines, CIDs, file names) and keeps what it does not know
//! (other header keys, every `ddb.` line) so a descriptor written back says
//! what it said. Every failure names the file and line.

use crate::error::{DiskError, Result};

/// The parent CID of a disk with no parent.
pub const NO_PARENT: u32 = 0xffff_ffff;
/// The longest descriptor read (QEMU's limit is about the same).
pub const MAX_LEN: usize = 64 << 10;
/// The most extents one descriptor may list.
pub const MAX_EXTENTS: usize = 4096;

/// How an extent may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

impl Access {
    fn word(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// The extent types this code reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A flat extent on a datastore (ESX's base disks).
    Vmfs,
    /// A flat extent (hosted products' name for the same).
    Flat,
    /// A hosted sparse extent (`KDMV` header, grain tables): our deltas.
    Sparse,
    /// No file: reads as zeros.
    Zero,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Vmfs => "VMFS",
            Kind::Flat => "FLAT",
            Kind::Sparse => "SPARSE",
            Kind::Zero => "ZERO",
        }
    }

    /// Whether the extent's file holds the bytes at the same offsets.
    pub fn is_flat(self) -> bool {
        matches!(self, Kind::Vmfs | Kind::Flat)
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub access: Access,
    /// Its size in 512-byte sectors.
    pub sectors: u64,
    pub kind: Kind,
    /// Its file, in the descriptor's directory (none for ZERO).
    pub file: Option<String>,
    /// Where in a flat file the extent starts, in sectors.
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub version: u32,
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: String,
    pub parent_hint: Option<String>,
    pub extents: Vec<Extent>,
    /// Header keys this code does not interpret, in order (`encoding`...).
    pub other: Vec<(String, String)>,
    /// The disk database, in order (`ddb.adapterType`, `ddb.uuid`...).
    pub ddb: Vec<(String, String)>,
}

/// A file name a descriptor may name: in the same directory, printable,
/// no quote.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!(
            "file name {name:?} is empty or longer than 255 bytes"
        ));
    }
    if name.contains('/') || name == "." || name == ".." {
        return Err(format!(
            "file name {name:?} is not a plain name in the descriptor's directory"
        ));
    }
    if name.chars().any(|c| c == '"' || c.is_control()) {
        return Err(format!(
            "file name {name:?} holds a quote or a control character"
        ));
    }
    Ok(())
}

/// The header key naming a disk's change-tracking file.
pub const CHANGE_TRACK_PATH: &str = "changeTrackPath";

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

impl Descriptor {
    /// A descriptor of one extent with no parent.
    pub fn new(create_type: &str, cid: u32, extents: Vec<Extent>) -> Descriptor {
        Descriptor {
            version: 1,
            cid,
            parent_cid: NO_PARENT,
            create_type: create_type.to_string(),
            parent_hint: None,
            extents,
            other: Vec::new(),
            ddb: Vec::new(),
        }
    }

    /// The disk's size in bytes: its extents end to end.
    pub fn capacity(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors * 512).sum()
    }

    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_ddb(&mut self, key: &str, value: &str) {
        match self.ddb.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_string(),
            None => self.ddb.push((key.to_string(), value.to_string())),
        }
    }

    /// The change-tracking file this descriptor names (`changeTrackPath`,
    /// as ESX writes it), if tracking is on.
    pub fn change_track_path(&self) -> Option<&str> {
        self.other
            .iter()
            .find(|(k, _)| k == CHANGE_TRACK_PATH)
            .map(|(_, v)| unquote(v))
    }

    /// Name (or with `None`, drop) the change-tracking file.
    pub fn set_change_track_path(&mut self, file: Option<&str>) {
        self.other.retain(|(k, _)| k != CHANGE_TRACK_PATH);
        if let Some(f) = file {
            self.other
                .push((CHANGE_TRACK_PATH.to_string(), format!("\"{f}\"")));
        }
    }

    /// Parse `text`, read from `file` (for messages).
    pub fn parse(text: &[u8], file: &str) -> Result<Descriptor> {
        let bad = |line: usize, reason: String| DiskError::Descriptor {
            file: file.to_string(),
            line,
            reason,
        };
        if text.len() > MAX_LEN {
            return Err(bad(
                0,
                format!("longer than {MAX_LEN} bytes: not a descriptor"),
            ));
        }
        // QEMU rewrites a descriptor in place (a new CID at its first write)
        // and pads it with NULs: the text ends at the first one.
        let text = text.split(|&b| b == 0).next().unwrap_or(&[]);
        let text = std::str::from_utf8(text).map_err(|e| {
            bad(
                0,
                format!(
                    "not UTF-8 text (byte {}): not a descriptor",
                    e.valid_up_to()
                ),
            )
        })?;
        let mut version = None;
        let mut cid = None;
        let mut parent_cid = None;
        let mut create_type = None;
        let mut parent_hint = None;
        let mut extents = Vec::new();
        let mut other = Vec::new();
        let mut ddb = Vec::new();
        let hex = |line: usize, key: &str, v: &str| {
            u32::from_str_radix(unquote(v), 16)
                .map_err(|_| bad(line, format!("{key}={v:?} is not a 32-bit hex number")))
        };
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let first = l.split_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if extents.len() >= MAX_EXTENTS {
                    return Err(bad(n, format!("more than {MAX_EXTENTS} extents")));
                }
                extents.push(Self::parse_extent(l).map_err(|r| bad(n, r))?);
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                return Err(bad(
                    n,
                    format!("{l:?} is neither key=value nor an extent line"),
                ));
            };
            let (k, v) = (k.trim(), v.trim());
            if k.starts_with("ddb.") {
                ddb.push((k.to_string(), unquote(v).to_string()));
                continue;
            }
            match k {
                "version" => {
                    let x: u32 = unquote(v)
                        .parse()
                        .map_err(|_| bad(n, format!("version={v:?} is not a number")))?;
                    if !(1..=3).contains(&x) {
                        return Err(bad(n, format!("descriptor version {x} is not 1, 2 or 3")));
                    }
                    version = Some(x);
                }
                "CID" => cid = Some(hex(n, k, v)?),
                "parentCID" => parent_cid = Some(hex(n, k, v)?),
                "createType" => create_type = Some(unquote(v).to_string()),
                "parentFileNameHint" => {
                    let h = unquote(v).to_string();
                    check_name(&h).map_err(|r| bad(n, format!("parentFileNameHint: {r}")))?;
                    parent_hint = Some(h);
                }
                CHANGE_TRACK_PATH => {
                    check_name(unquote(v)).map_err(|r| bad(n, format!("{k}: {r}")))?;
                    other.push((k.to_string(), v.to_string()))
                }
                _ => other.push((k.to_string(), v.to_string())),
            }
        }
        let d = Descriptor {
            version: version.ok_or_else(|| bad(0, "no version= line".into()))?,
            cid: cid.ok_or_else(|| bad(0, "no CID= line".into()))?,
            parent_cid: parent_cid.unwrap_or(NO_PARENT),
            create_type: create_type.ok_or_else(|| bad(0, "no createType= line".into()))?,
            parent_hint,
            extents,
            other,
            ddb,
        };
        if d.extents.is_empty() {
            return Err(bad(0, "no extent line".into()));
        }
        if d.capacity() / 512 > 1 << 40 {
            return Err(bad(0, "extents add up to more than 512 TiB".into()));
        }
        if d.parent_cid == NO_PARENT && d.parent_hint.is_some() {
            return Err(bad(0, "a parentFileNameHint without a parentCID".into()));
        }
        Ok(d)
    }

    fn parse_extent(l: &str) -> std::result::Result<Extent, String> {
        // ACCESS SECTORS TYPE ["FILE" [OFFSET]]; the file name may hold spaces.
        let mut it = l.splitn(4, char::is_whitespace).filter(|s| !s.is_empty());
        let access = match it.next() {
            Some("RW") => Access::ReadWrite,
            Some("RDONLY") => Access::ReadOnly,
            _ => Access::NoAccess,
        };
        let sectors: u64 = it
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|&s| s > 0 && s <= 1 << 40)
            .ok_or_else(|| {
                format!("extent line {l:?}: the sector count is not a number from 1 to 2^40")
            })?;
        let kind = match it.next() {
            Some("VMFS") => Kind::Vmfs,
            Some("FLAT") => Kind::Flat,
            Some("SPARSE") => Kind::Sparse,
            Some("ZERO") => Kind::Zero,
            Some(k) => {
                return Err(format!(
                    "extent type {k:?} is not one this host reads (VMFS, FLAT, SPARSE, ZERO)"
                ))
            }
            None => return Err(format!("extent line {l:?} has no type")),
        };
        let rest = it.next().unwrap_or("").trim();
        if kind == Kind::Zero {
            if !rest.is_empty() {
                return Err(format!("a ZERO extent names no file: {l:?}"));
            }
            return Ok(Extent {
                access,
                sectors,
                kind,
                file: None,
                offset: 0,
            });
        }
        let Some(after) = rest.strip_prefix('"') else {
            return Err(format!("extent line {l:?}: the file name is not in quotes"));
        };
        let Some((name, tail)) = after.split_once('"') else {
            return Err(format!(
                "extent line {l:?}: the file name's quote is not closed"
            ));
        };
        check_name(name)?;
        let tail = tail.trim();
        let offset = if tail.is_empty() {
            0
        } else {
            tail.parse::<u64>()
                .ok()
                .filter(|o| o.checked_add(sectors).is_some_and(|e| e <= 1 << 42))
                .ok_or_else(|| {
                    format!("extent line {l:?}: offset {tail:?} is not a sector number")
                })?
        };
        if offset != 0 && !kind.is_flat() {
            return Err(format!(
                "extent line {l:?}: only flat extents have an offset"
            ));
        }
        Ok(Extent {
            access,
            sectors,
            kind,
            file: Some(name.to_string()),
            offset,
        })
    }

    /// The descriptor as text.
    pub fn to_text(&self) -> String {
        let mut s = String::from("# Disk DescriptorFile\n");
        s += &format!("version={}\n", self.version);
        for (k, v) in &self.other {
            s += &format!("{k}={v}\n");
        }
        s += &format!("CID={:08x}\n", self.cid);
        s += &format!("parentCID={:08x}\n", self.parent_cid);
        s += &format!("createType=\"{}\"\n", self.create_type);
        if let Some(h) = &self.parent_hint {
            s += &format!("parentFileNameHint=\"{h}\"\n");
        }
        s += "\n# Extent description\n";
        for e in &self.extents {
            s += &format!("{} {} {}", e.access.word(), e.sectors, e.kind.word());
            if let Some(f) = &e.file {
                s += &format!(" \"{f}\"");
                if e.kind.is_flat() && e.offset != 0 {
                    s += &format!(" {}", e.offset);
                }
            }
            s += "\n";
        }
        s += "\n# The Disk Data Base\n#DDB\n\n";
        for (k, v) in &self.ddb {
            s += &format!("{k} = \"{v}\"\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "# Disk DescriptorFile\nversion=1\nCID=5ad95a5a\nparentCID=2b5f65ab\ncreateType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"base.vmdk\"\n# Extent description\nRW 131072 SPARSE \"child-s001.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"130\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn a_descriptor_qemu_wrote_parses_and_round_trips() {
        let d = Descriptor::parse(QEMU.as_bytes(), "child.vmdk").unwrap();
        assert_eq!(d.cid, 0x5ad95a5a);
        assert_eq!(d.parent_cid, 0x2b5f65ab);
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].kind, Kind::Sparse);
        assert_eq!(d.capacity(), 64 << 20);
        assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
        let again = Descriptor::parse(d.to_text().as_bytes(), "x").unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn flat_extents_with_offsets_and_names_with_spaces() {
        let t = "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 100 VMFS \"my disk-flat.vmdk\"\nRDONLY 50 FLAT \"b.vmdk\" 7\nRW 10 ZERO\n";
        let d = Descriptor::parse(t.as_bytes(), "d").unwrap();
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-flat.vmdk"));
        assert_eq!(d.extents[1].offset, 7);
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[2].file, None);
        assert_eq!(d.capacity(), 160 * 512);
        assert_eq!(Descriptor::parse(d.to_text().as_bytes(), "d").unwrap(), d);
    }

    #[test]
    fn bad_descriptors_are_refused_naming_the_line() {
        let base = "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\n";
        for (tail, want) in [
            ("RW 100 VMFS \"../etc/passwd\"\n", "plain name"),
            ("RW 100 VMFS \"a/b\"\n", "plain name"),
            ("RW 0 VMFS \"a\"\n", "sector count"),
            ("RW x VMFS \"a\"\n", "sector count"),
            ("RW 100 VMFSSPARSE \"a\"\n", "not one this host reads"),
            ("RW 100 VMFS a\n", "quotes"),
            ("RW 100 VMFS \"a\n", "not closed"),
            ("RW 100 SPARSE \"a\" 5\n", "only flat"),
            ("RW 100 ZERO \"a\"\n", "names no file"),
            ("garbage line\n", "neither"),
            ("", "no extent"),
        ] {
            let t = format!("{base}{tail}");
            let e = Descriptor::parse(t.as_bytes(), "d.vmdk")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.starts_with("d.vmdk"), "{tail:?}: {e}");
        }
        let e = Descriptor::parse(b"version=1\nCID=zz\n", "d").unwrap_err();
        assert!(e.to_string().contains("hex"), "{e}");
        assert!(Descriptor::parse(&[0xff, 0xfe], "d").is_err());
        assert!(Descriptor::parse(&vec![b'#'; MAX_LEN + 1], "d").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            if let Ok(d) = Descriptor::parse(&b, "p") {
                proptest::prop_assert_eq!(Descriptor::parse(d.to_text().as_bytes(), "p").unwrap(), d);
            }
        }
    }
}
