//! Raw device mappings: a small file on the datastore that stands for a
//! whole LUN, as VMFS's RDMs do.
//!
//! The mapping file is a VMware-style disk descriptor (`createType`
//! `vmfsRawDeviceMap` for virtual mode, `vmfsPassthroughRawDeviceMap` for
//! physical mode) whose extent line names the LUN's URL hint, and whose disk
//! database records what opening it checks: the LUN's identity (its VPD
//! 0x83 designator, or the UUID of a file LUN), its size and logical block
//! size at mapping time, the mode, a format version, and a CRC-32 over
//! everything before the checksum line. The first line is the magic.
//!
//! Opening a mapping ([`resolve`]) finds the LUN by identity among the URLs
//! the host was given (its LUN list, [`host_luns`]) and the URL hint, and
//! refuses a LUN whose identity or size no longer match. I/O then goes
//! straight to the LUN.

use std::path::Path;
use std::sync::Arc;

use lun::{Lun, LunError};

/// The mapping format this code writes and reads.
pub const VERSION: u32 = 1;
/// Descriptors are small; anything larger is not one.
pub const MAX_DESCRIPTOR: usize = 64 * 1024;
const MAGIC_LINE: &str = "# Disk DescriptorFile";
const CHECKSUM_KEY: &str = "ddb.vmfs.rdm.checksum";

#[derive(Debug, thiserror::Error)]
pub enum RdmError {
    #[error("{path}: not a raw device mapping: {what}")]
    Format { path: String, what: String },
    #[error("{path}: the mapping's checksum does not match (stored {stored:08x}, computed {computed:08x}): the file is damaged")]
    Checksum {
        path: String,
        stored: u32,
        computed: u32,
    },
    #[error("{path}: mapping format version {version}; this build reads version {VERSION}")]
    Version { path: String, version: u32 },
    #[error(transparent)]
    Lun(#[from] LunError),
    #[error("{url}: this LUN is {got}, but the mapping is of {want}: it is not the mapped LUN (re-create the mapping if the LUN was replaced on purpose)")]
    IdentityMismatch {
        url: String,
        want: String,
        got: String,
    },
    #[error("{url}: the LUN is {got} bytes, the mapping was made of {want} bytes: re-create the mapping if it was resized on purpose")]
    SizeMismatch { url: String, want: u64, got: u64 },
    #[error("no LUN with identity {identity} among those this host can reach ({tried}); add its URL to the host's LUN list")]
    NotFound { identity: String, tried: String },
    #[error("{url}: refusing to map a datastore's own LUN ({why})")]
    DatastoreLun { url: String, why: String },
    #[error("{path}: a physical-mode mapping passes SCSI commands to the LUN and cannot have snapshots; use a virtual-mode mapping")]
    PhysicalSnapshot { path: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, RdmError>;

/// Virtual mode: the guest sees a virtual disk backed by the LUN (snapshots
/// allowed). Physical mode: SCSI commands pass through to the LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Virtual,
    Physical,
}

impl Mode {
    pub fn create_type(self) -> &'static str {
        match self {
            Mode::Virtual => "vmfsRawDeviceMap",
            Mode::Physical => "vmfsPassthroughRawDeviceMap",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Virtual => "virtual",
            Mode::Physical => "physical",
        }
    }
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "virtual" => Some(Mode::Virtual),
            "physical" => Some(Mode::Physical),
            _ => None,
        }
    }
}

/// What a mapping file records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub mode: Mode,
    pub identity: String,
    pub size: u64,
    pub block_size: u32,
    /// The LUN's URL when the mapping was made (no password).
    pub url_hint: String,
}

fn quoted_ok(v: &str) -> bool {
    !v.is_empty() && !v.chars().any(|c| c == '"' || c == '\\' || c.is_control())
}

impl Mapping {
    /// A mapping of `lun` as it is now.
    pub fn for_lun(lun: &dyn Lun, mode: Mode) -> Result<Mapping> {
        let identity = lun.identity()?;
        let url_hint = lun.name().to_string();
        for (what, v) in [("identity", &identity), ("URL", &url_hint)] {
            if !quoted_ok(v) {
                return Err(RdmError::Invalid(format!(
                    "{}: the LUN's {what} {v:?} cannot be recorded in a mapping",
                    lun.name()
                )));
            }
        }
        Ok(Mapping {
            mode,
            identity,
            size: lun.size(),
            block_size: lun.block_size(),
            url_hint,
        })
    }

    /// The descriptor text.
    pub fn encode(&self) -> Vec<u8> {
        let cid = crc32fast::hash(self.identity.as_bytes());
        let mut s = format!(
            "{MAGIC_LINE}\n\
             version=1\n\
             encoding=\"UTF-8\"\n\
             CID={cid:08x}\n\
             parentCID=ffffffff\n\
             createType=\"{}\"\n\
             \n\
             # Extent description\n\
             RW {} VMFSRDM \"{}\"\n\
             \n\
             # The Disk Data Base\n\
             #DDB\n\
             \n\
             ddb.vmfs.rdm.version = \"{VERSION}\"\n\
             ddb.vmfs.rdm.mode = \"{}\"\n\
             ddb.vmfs.rdm.lunIdentity = \"{}\"\n\
             ddb.vmfs.rdm.lunSize = \"{}\"\n\
             ddb.vmfs.rdm.lunBlockSize = \"{}\"\n",
            self.mode.create_type(),
            self.size / 512,
            self.url_hint,
            self.mode.name(),
            self.identity,
            self.size,
            self.block_size,
        );
        let sum = crc32fast::hash(s.as_bytes());
        s.push_str(&format!("{CHECKSUM_KEY} = \"{sum:08x}\"\n"));
        s.into_bytes()
    }

    /// Parse and check a descriptor read from `path` (for messages).
    pub fn parse(bytes: &[u8], path: &str) -> Result<Mapping> {
        let bad = |what: String| RdmError::Format {
            path: path.to_string(),
            what,
        };
        if bytes.len() > MAX_DESCRIPTOR {
            return Err(bad(format!(
                "{} bytes, more than a descriptor's {MAX_DESCRIPTOR}",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        if !text.starts_with(MAGIC_LINE) {
            return Err(bad(format!("the first line is not {MAGIC_LINE:?}")));
        }
        // The checksum line is the last line; the CRC covers everything before it.
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or_else(|| bad("one line only".into()))?;
        let (body, last) = text.split_at(body_end);
        let stored = match kv(last.trim()) {
            Some((CHECKSUM_KEY, v)) => u32::from_str_radix(v, 16)
                .map_err(|_| bad(format!("checksum {v:?} is not hexadecimal")))?,
            _ => return Err(bad(format!("the last line is not {CHECKSUM_KEY}"))),
        };
        let computed = crc32fast::hash(body.as_bytes());
        if stored != computed {
            return Err(RdmError::Checksum {
                path: path.to_string(),
                stored,
                computed,
            });
        }
        let mut create_type = None;
        let mut extent = None;
        let mut fields = std::collections::HashMap::new();
        for (n, line) in body.lines().enumerate().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("RW ") {
                if extent.is_some() {
                    return Err(bad(format!("line {}: a second extent", n + 1)));
                }
                extent = Some((n + 1, rest.to_string()));
                continue;
            }
            let (k, v) = kv(line).ok_or_else(|| bad(format!("line {}: not key = value", n + 1)))?;
            if k == "createType" {
                create_type = Some(v.to_string());
            } else if k.starts_with("ddb.vmfs.rdm.") {
                fields.insert(k.to_string(), v.to_string());
            }
        }
        let get = |k: &str| {
            fields
                .get(&format!("ddb.vmfs.rdm.{k}"))
                .cloned()
                .ok_or_else(|| bad(format!("ddb.vmfs.rdm.{k} is missing")))
        };
        let version: u32 = get("version")?
            .parse()
            .map_err(|_| bad("ddb.vmfs.rdm.version is not a number".into()))?;
        if version != VERSION {
            return Err(RdmError::Version {
                path: path.to_string(),
                version,
            });
        }
        let mode_name = get("mode")?;
        let mode = Mode::parse(&mode_name).ok_or_else(|| bad(format!("mode {mode_name:?}")))?;
        match create_type.as_deref() {
            Some(t) if t == mode.create_type() => {}
            Some(t) => {
                return Err(bad(format!(
                    "createType {t:?} does not match mode {}",
                    mode.name()
                )))
            }
            None => return Err(bad("createType is missing".into())),
        }
        let size: u64 = get("lunSize")?
            .parse()
            .map_err(|_| bad("ddb.vmfs.rdm.lunSize is not a number".into()))?;
        let block_size: u32 = get("lunBlockSize")?
            .parse()
            .map_err(|_| bad("ddb.vmfs.rdm.lunBlockSize is not a number".into()))?;
        let identity = get("lunIdentity")?;
        if !quoted_ok(&identity) {
            return Err(bad("empty LUN identity".into()));
        }
        let (eline, ext) = extent.ok_or_else(|| bad("no extent line".into()))?;
        let mut parts = ext.splitn(3, ' ');
        let sectors: u64 = parts
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(format!("line {eline}: extent size is not a number")))?;
        if parts.next() != Some("VMFSRDM") {
            return Err(bad(format!(
                "line {eline}: the extent is not of type VMFSRDM"
            )));
        }
        let url_hint = parts
            .next()
            .and_then(|u| u.strip_prefix('"'))
            .and_then(|u| u.strip_suffix('"'))
            .ok_or_else(|| bad(format!("line {eline}: the extent's URL is not quoted")))?
            .to_string();
        if sectors != size / 512 {
            return Err(bad(format!(
                "line {eline}: the extent has {sectors} sectors, the LUN size {size} bytes"
            )));
        }
        Ok(Mapping {
            mode,
            identity,
            size,
            block_size,
            url_hint,
        })
    }

    /// Parse a mapping file's contents: the descriptor, then zeros up to
    /// the file's size (the LUN's).
    pub fn parse_file(bytes: &[u8], path: &str) -> Result<Mapping> {
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        Mapping::parse(&bytes[..end], path)
    }

    /// Is `lun` the mapped LUN, unchanged in size?
    pub fn check(&self, lun: &dyn Lun) -> Result<()> {
        let got = lun.identity()?;
        if got != self.identity {
            return Err(RdmError::IdentityMismatch {
                url: lun.name().to_string(),
                want: self.identity.clone(),
                got,
            });
        }
        if lun.size() != self.size {
            return Err(RdmError::SizeMismatch {
                url: lun.name().to_string(),
                want: self.size,
                got: lun.size(),
            });
        }
        Ok(())
    }

    /// Snapshots are for virtual-mode mappings only.
    pub fn snapshot_allowed(&self, path: &str) -> Result<()> {
        match self.mode {
            Mode::Virtual => Ok(()),
            Mode::Physical => Err(RdmError::PhysicalSnapshot {
                path: path.to_string(),
            }),
        }
    }
}

/// `key = "value"` or `key=value`.
fn kv(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.split_once('=')?;
    let v = v.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    Some((k.trim(), v))
}

/// Make a mapping of `lun`, refusing a LUN that belongs to a datastore:
/// one of `datastore` (the extents of the datastore the mapping goes on,
/// compared by identity), or any LUN `is_datastore` recognizes (it carries
/// a datastore's header).
pub fn create(
    lun: &dyn Lun,
    mode: Mode,
    datastore: &[Arc<dyn Lun>],
    is_datastore: impl Fn(&dyn Lun) -> bool,
) -> Result<Mapping> {
    let m = Mapping::for_lun(lun, mode)?;
    for ext in datastore {
        if ext.identity()? == m.identity {
            return Err(RdmError::DatastoreLun {
                url: lun.name().to_string(),
                why: format!("it is the extent {} of this datastore", ext.name()),
            });
        }
    }
    if is_datastore(lun) {
        return Err(RdmError::DatastoreLun {
            url: lun.name().to_string(),
            why: "it carries a datastore's volume header".into(),
        });
    }
    Ok(m)
}

/// The LUN URLs this host was given: `STATE_DIR/luns`, one per line
/// (blank lines and `#` comments ignored). A missing file is an empty list.
pub fn host_luns(state_dir: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(state_dir.join("luns")) {
        Ok(t) => Ok(t
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Open the mapped LUN: the host's LUN list first, then the URL hint; the
/// first LUN with the mapping's identity is checked for size and returned.
pub fn resolve(m: &Mapping, host_luns: &[String], opts: lun::OpenOptions) -> Result<Arc<dyn Lun>> {
    let mut tried = Vec::new();
    let mut urls: Vec<&str> = host_luns.iter().map(String::as_str).collect();
    if !urls.contains(&m.url_hint.as_str()) {
        urls.push(&m.url_hint);
    }
    let mut mismatch = None;
    for url in urls {
        match lun::open_with(url, opts) {
            Ok(l) => match m.check(&*l) {
                Ok(()) => return Ok(l),
                Err(e @ RdmError::SizeMismatch { .. }) => return Err(e),
                Err(e @ RdmError::IdentityMismatch { .. }) => {
                    tried.push(format!(
                        "{}: {}",
                        lun::redact(url),
                        l.identity().unwrap_or_default()
                    ));
                    mismatch.get_or_insert(e);
                }
                Err(e) => tried.push(format!("{}: {e}", lun::redact(url))),
            },
            Err(e) => tried.push(format!("{}: {e}", lun::redact(url))),
        }
    }
    // The hint alone was tried and is another LUN now: say exactly that.
    if tried.len() == 1 {
        if let Some(e) = mismatch {
            return Err(e);
        }
    }
    Err(RdmError::NotFound {
        identity: m.identity.clone(),
        tried: tried.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: Mode) -> Mapping {
        Mapping {
            mode,
            identity: "naa.60000000000000000000000000010001".into(),
            size: 64 << 20,
            block_size: 512,
            url_hint: "iscsi://10.0.0.1:3260/iqn.2026-11.org.vmfs:t/1".into(),
        }
    }

    #[test]
    fn round_trips_both_modes() {
        for mode in [Mode::Virtual, Mode::Physical] {
            let m = sample(mode);
            let text = m.encode();
            let s = String::from_utf8(text.clone()).unwrap();
            assert!(s.contains(mode.create_type()), "{s}");
            assert!(s.contains("RW 131072 VMFSRDM"), "{s}");
            assert_eq!(Mapping::parse(&text, "x").unwrap(), m);
        }
    }

    #[test]
    fn damage_is_named() {
        let t = sample(Mode::Virtual).encode();
        let mut bad = t.clone();
        let i = bad.iter().position(|&b| b == b'6').unwrap();
        bad[i] = b'7';
        assert!(matches!(
            Mapping::parse(&bad, "x"),
            Err(RdmError::Checksum { .. })
        ));
        assert!(matches!(
            Mapping::parse(b"hello\nworld\n", "x"),
            Err(RdmError::Format { .. })
        ));
        let swapped = String::from_utf8(t).unwrap().replace(
            "ddb.vmfs.rdm.version = \"1\"",
            "ddb.vmfs.rdm.version = \"9\"",
        );
        // The checksum catches it first: edits are damage.
        assert!(Mapping::parse(swapped.as_bytes(), "x").is_err());
        assert!(sample(Mode::Physical).snapshot_allowed("p").is_err());
        assert!(sample(Mode::Virtual).snapshot_allowed("v").is_ok());
    }

    #[test]
    fn refuses_a_datastore_lun_and_a_changed_one() {
        let l: Arc<dyn Lun> = Arc::new(lun::MemLun::new("mem:a", 1 << 20));
        let other: Arc<dyn Lun> = Arc::new(lun::MemLun::new("mem:b", 1 << 20));
        assert!(matches!(
            create(&*l, Mode::Virtual, std::slice::from_ref(&l), |_| false),
            Err(RdmError::DatastoreLun { .. })
        ));
        assert!(matches!(
            create(&*l, Mode::Virtual, &[], |_| true),
            Err(RdmError::DatastoreLun { .. })
        ));
        let m = create(&*l, Mode::Virtual, std::slice::from_ref(&other), |_| false).unwrap();
        m.check(&*l).unwrap();
        assert!(matches!(
            m.check(&*other),
            Err(RdmError::IdentityMismatch { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Mapping::parse(&b, "fuzz");
        }
        #[test]
        fn parse_never_panics_on_edited_text(cut in 0usize..700, byte in proptest::num::u8::ANY) {
            let mut t = sample(Mode::Physical).encode();
            let i = cut % t.len();
            t[i] = byte;
            let _ = Mapping::parse(&t, "fuzz");
        }
    }
}
