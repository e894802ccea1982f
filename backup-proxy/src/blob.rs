//! The one envelope of every object in a repository (docs/FORMAT.md,
//! "Backup repository"): a 24-byte header with a magic naming the kind of
//! object, a version, flags, lengths and a CRC32 of the whole object, then
//! the payload, compressed with zstd and, in an encrypted repository,
//! sealed with AES-256-GCM under a random nonce and bound to the object's
//! name (associated data), so an object copied over another is refused.
//!
//! The CRC lets `verify` find damage without the key; the digest of a
//! chunk (or the checksum inside an index) checks the content itself.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use crate::error::{corrupt, Result};

pub const HEADER: usize = 24;
const VERSION: u8 = 1;
const F_ZSTD: u8 = 1;
const F_AES: u8 = 2;
/// zstd level: 3 (zstd's default; restic's "auto").
const ZSTD_LEVEL: i32 = 3;
/// The largest plaintext an object may claim (a chunk is at most 16 MiB;
/// an index of a 64 TiB disk at 4 MiB chunks is 512 MiB).
pub const MAX_PLAIN: usize = 1 << 30;

/// What an object is; its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Config,
    Chunk,
    Index,
    Manifest,
    /// A list of chunk digests (a session's intent log, a condemned list,
    /// a rescue record).
    ChunkList,
    /// A writer's session record, or a sweep's marker.
    Session,
}

impl Kind {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            Kind::Config => b"VBKF",
            Kind::Chunk => b"VBKC",
            Kind::Index => b"VBKI",
            Kind::Manifest => b"VBKM",
            Kind::ChunkList => b"VBKL",
            Kind::Session => b"VBKS",
        }
    }
    /// The most content an object of this kind may claim: a hostile
    /// header must not make us allocate more.
    fn max_plain(self) -> usize {
        match self {
            Kind::Chunk => 16 << 20,
            Kind::Index => MAX_PLAIN,
            _ => 64 << 20,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Config => "repository config",
            Kind::Chunk => "chunk",
            Kind::Index => "index",
            Kind::Manifest => "manifest",
            Kind::ChunkList => "chunk list",
            Kind::Session => "session record",
        }
    }
}

/// The repository's data key, unwrapped from its key file.
pub struct Cipher {
    aead: Aes256Gcm,
    /// Keys the chunk digests (BLAKE3 keyed mode), so the store learns
    /// nothing of the content from chunk names.
    pub id_key: [u8; 32],
}

impl Cipher {
    pub fn new(enc_key: &[u8; 32], id_key: [u8; 32]) -> Cipher {
        Cipher {
            aead: Aes256Gcm::new(enc_key.into()),
            id_key,
        }
    }
}

/// Seal `plain` as an object of `kind`. `compress`: try zstd (kept only
/// when it saves something). `aad`: what the object is bound to (its name).
pub fn seal(
    kind: Kind,
    plain: &[u8],
    compress: bool,
    cipher: Option<&Cipher>,
    aad: &[u8],
) -> Vec<u8> {
    let mut flags = 0u8;
    let packed;
    let mut body: &[u8] = plain;
    if compress && compressible(plain) {
        if let Ok(c) = zstd::bulk::compress(plain, ZSTD_LEVEL) {
            if c.len() + c.len() / 64 < plain.len() {
                packed = c;
                body = &packed;
                flags |= F_ZSTD;
            }
        }
    }
    let payload = match cipher {
        Some(c) => {
            flags |= F_AES;
            let nonce: [u8; 12] = crate::util::random_bytes();
            let ad = assoc(&header(kind, flags, 0, plain.len() as u32), aad);
            let ct = c
                .aead
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: body,
                        aad: &ad,
                    },
                )
                .expect("AES-GCM encryption of an in-memory buffer cannot fail");
            let mut p = nonce.to_vec();
            p.extend_from_slice(&ct);
            p
        }
        None => body.to_vec(),
    };
    let mut out = header(kind, flags, payload.len() as u32, plain.len() as u32).to_vec();
    out.extend_from_slice(&payload);
    let crc = crc(&out);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The associated data of a sealed object: the magic, version and flags,
/// the content length (so a header cannot be made to claim more), then
/// the object's name.
fn assoc(header: &[u8], name: &[u8]) -> Vec<u8> {
    let mut ad = header[..8].to_vec();
    ad.extend_from_slice(&header[12..16]);
    ad.extend_from_slice(name);
    ad
}

/// Whether compressing `b` is worth trying: for a large buffer, three
/// 32 KiB samples (start, middle, end) must shrink by 3% at zstd's
/// fastest level. Random or already-compressed data then costs a few
/// samples' work instead of a whole chunk's at level 3.
fn compressible(b: &[u8]) -> bool {
    const S: usize = 32 << 10;
    if b.len() < 8 * S {
        return true;
    }
    let mut raw = 0;
    let mut packed = 0;
    for start in [0, b.len() / 2, b.len() - S] {
        let s = &b[start..start + S];
        raw += S;
        packed += zstd::bulk::compress(s, 1).map(|c| c.len()).unwrap_or(S);
    }
    packed * 100 < raw * 97
}

fn header(kind: Kind, flags: u8, stored: u32, plain: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(kind.magic());
    h[4] = VERSION;
    h[5] = flags;
    h[8..12].copy_from_slice(&stored.to_le_bytes());
    h[12..16].copy_from_slice(&plain.to_le_bytes());
    h
}

/// CRC32 of an object with its CRC field taken as zero.
fn crc(obj: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&obj[..16]);
    h.update(&[0; 4]);
    h.update(&obj[20..]);
    h.finalize()
}

/// Check an object's envelope (magic, version, lengths, CRC) without
/// opening it: what `verify` can say with no key. `what` names it.
pub fn check(kind: Kind, obj: &[u8], what: &str) -> Result<(u8, usize)> {
    if obj.len() < HEADER {
        return Err(corrupt(
            what,
            format!("{} bytes: shorter than a {} header", obj.len(), kind.name()),
        ));
    }
    if &obj[0..4] != kind.magic() {
        return Err(corrupt(
            what,
            format!("not a {} (magic {:02x?})", kind.name(), &obj[0..4]),
        ));
    }
    if obj[4] != VERSION {
        return Err(corrupt(
            what,
            format!(
                "{} version {} (this program reads {VERSION})",
                kind.name(),
                obj[4]
            ),
        ));
    }
    let flags = obj[5];
    if flags & !(F_ZSTD | F_AES) != 0 || obj[6] != 0 || obj[7] != 0 {
        return Err(corrupt(what, format!("unknown flags {flags:#x}")));
    }
    let stored = u32::from_le_bytes(obj[8..12].try_into().unwrap_or_default()) as usize;
    let plain = u32::from_le_bytes(obj[12..16].try_into().unwrap_or_default()) as usize;
    if stored != obj.len() - HEADER {
        return Err(corrupt(
            what,
            format!(
                "payload is {} bytes, header says {stored}",
                obj.len() - HEADER
            ),
        ));
    }
    if plain > kind.max_plain() {
        return Err(corrupt(what, format!("claims {plain} bytes of content")));
    }
    let want = u32::from_le_bytes(obj[16..20].try_into().unwrap_or_default());
    if crc(obj) != want {
        return Err(corrupt(what, "checksum mismatch"));
    }
    Ok((flags, plain))
}

/// Open an object sealed by [`seal`]: check it, decrypt, decompress.
pub fn open(
    kind: Kind,
    obj: &[u8],
    cipher: Option<&Cipher>,
    aad: &[u8],
    what: &str,
) -> Result<Vec<u8>> {
    let (flags, plain) = check(kind, obj, what)?;
    let payload = &obj[HEADER..];
    let decrypted;
    let body: &[u8] = if flags & F_AES != 0 {
        let c = cipher.ok_or_else(|| {
            crate::error::BackupError::Key(format!("{what} is encrypted and no key was given"))
        })?;
        if payload.len() < 12 + 16 {
            return Err(corrupt(what, "too short for its nonce and tag"));
        }
        let ad = assoc(obj, aad);
        decrypted = c
            .aead
            .decrypt(Nonce::from_slice(&payload[..12]), Payload { msg: &payload[12..], aad: &ad })
            .map_err(|_| corrupt(what, "does not authenticate with this repository's key (damaged, or moved from another name)"))?;
        &decrypted
    } else {
        if cipher.is_some()
            && kind != Kind::Config
            && kind != Kind::ChunkList
            && kind != Kind::Session
        {
            return Err(corrupt(what, "is not encrypted in an encrypted repository"));
        }
        payload
    };
    let out = if flags & F_ZSTD != 0 {
        zstd::bulk::decompress(body, plain).map_err(|e| corrupt(what, format!("zstd: {e}")))?
    } else {
        body.to_vec()
    };
    if out.len() != plain {
        return Err(corrupt(
            what,
            format!("content is {} bytes, header says {plain}", out.len()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let c = Cipher::new(&[7; 32], [9; 32]);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for cipher in [None, Some(&c)] {
            for compress in [false, true] {
                let o = seal(Kind::Chunk, &data, compress, cipher, b"name");
                assert_eq!(open(Kind::Chunk, &o, cipher, b"name", "x").unwrap(), data);
                assert!(open(Kind::Index, &o, cipher, b"name", "x").is_err());
                for i in [0, 5, 13, 30, o.len() - 1] {
                    let mut d = o.clone();
                    d[i] ^= 0x40;
                    assert!(
                        open(Kind::Chunk, &d, cipher, b"name", "x").is_err(),
                        "flip at {i}"
                    );
                }
                assert!(open(Kind::Chunk, &o[..o.len() - 1], cipher, b"name", "x").is_err());
                if cipher.is_some() {
                    assert!(open(Kind::Chunk, &o, cipher, b"other", "x").is_err());
                    assert!(open(Kind::Chunk, &o, None, b"name", "x").is_err());
                    let wrong = Cipher::new(&[8; 32], [9; 32]);
                    assert!(open(Kind::Chunk, &o, Some(&wrong), b"name", "x").is_err());
                }
            }
        }
    }
}
