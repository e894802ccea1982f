//! A disk's fixed index (PBS's "fidx"): the digest of every chunk of the
//! image in order; an all-zero digest is a chunk of zeros, never stored.
//! Sealed in the repository envelope; inside, a BLAKE3 of the content
//! checks it whole (docs/FORMAT.md).

use crate::error::{corrupt, Result};

pub type Digest = [u8; 32];
pub const ZERO: Digest = [0; 32];
const HEAD: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub chunk_size: u32,
    pub size: u64,
    pub digests: Vec<Digest>,
}

impl Index {
    pub fn new(chunk_size: u32, size: u64) -> Index {
        Index {
            chunk_size,
            size,
            digests: vec![ZERO; chunks(size, chunk_size) as usize],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEAD + 32 * self.digests.len() + 32);
        v.extend_from_slice(&self.chunk_size.to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        for d in &self.digests {
            v.extend_from_slice(d);
        }
        let sum = blake3::hash(&v);
        v.extend_from_slice(sum.as_bytes());
        v
    }

    pub fn decode(b: &[u8], what: &str) -> Result<Index> {
        if b.len() < HEAD + 32 {
            return Err(corrupt(what, format!("index content is {} bytes", b.len())));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(corrupt(what, "index checksum mismatch"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().unwrap_or_default());
        let chunk_size = u32_at(0);
        if !(64 * 1024..=16 << 20).contains(&chunk_size) || !chunk_size.is_power_of_two() {
            return Err(corrupt(what, format!("chunk size {chunk_size}")));
        }
        let size = u64_at(8);
        let count = u64_at(16);
        if count != chunks(size, chunk_size)
            || (body.len() - HEAD) as u64 != count.saturating_mul(32)
        {
            return Err(corrupt(
                what,
                format!(
                    "{count} entries for {size} bytes in {} bytes of index",
                    body.len()
                ),
            ));
        }
        let digests = body[HEAD..]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or(ZERO))
            .collect();
        Ok(Index {
            chunk_size,
            size,
            digests,
        })
    }

    /// The byte range of chunk `i` in the image.
    pub fn range(&self, i: usize) -> std::ops::Range<u64> {
        let s = i as u64 * self.chunk_size as u64;
        s..(s + self.chunk_size as u64).min(self.size)
    }
}

pub fn chunks(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(chunk_size as u64)
}

/// Encode a list of digests (a chunk list object's content).
pub fn encode_list(d: &[Digest]) -> Vec<u8> {
    let mut v = Vec::with_capacity(d.len() * 32 + 32);
    for x in d {
        v.extend_from_slice(x);
    }
    let sum = blake3::hash(&v);
    v.extend_from_slice(sum.as_bytes());
    v
}

pub fn decode_list(b: &[u8], what: &str) -> Result<Vec<Digest>> {
    if b.len() < 32 || b.len() % 32 != 0 {
        return Err(corrupt(
            what,
            format!("chunk list content is {} bytes", b.len()),
        ));
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt(what, "chunk list checksum mismatch"));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap_or(ZERO))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut i = Index::new(4 << 20, 10 << 20);
        assert_eq!(i.digests.len(), 3);
        i.digests[1] = [5; 32];
        let e = i.encode();
        assert_eq!(Index::decode(&e, "x").unwrap(), i);
        for k in 0..e.len() {
            let mut d = e.clone();
            d[k] ^= 1;
            assert!(Index::decode(&d, "x").is_err());
        }
        assert_eq!(i.range(2), (8 << 20)..(10 << 20));
        let l = vec![[1; 32], [2; 32]];
        assert_eq!(decode_list(&encode_list(&l), "l").unwrap(), l);
    }
}
