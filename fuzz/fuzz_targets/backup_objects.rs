//! The backup repository's decoders: any bytes as a sealed object of any
//! kind (plain and encrypted), an index, a chunk list, a manifest, a key
//! file. Never a panic, never a huge allocation on a hostile length.
#![no_main]

use backup_proxy::blob::{self, Cipher, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let kind = [Kind::Config, Kind::Chunk, Kind::Index, Kind::Manifest, Kind::ChunkList, Kind::Session][sel as usize % 6];
    let cipher = Cipher::new(&[7; 32], [9; 32]);
    let _ = blob::check(kind, body, "fuzz");
    let _ = blob::open(kind, body, None, b"k", "fuzz");
    let _ = blob::open(kind, body, Some(&cipher), b"k", "fuzz");
    let _ = backup_proxy::index::Index::decode(body, "fuzz");
    let _ = backup_proxy::index::decode_list(body, "fuzz");
    let _ = backup_proxy::manifest::Manifest::decode(body, "fuzz");
    let _ = backup_proxy::keys::KeyFile::parse(body, "fuzz");
    // A valid envelope around the fuzzed content reaches the decoders
    // behind it too.
    let sealed = blob::seal(kind, body, sel & 0x80 != 0, None, b"k");
    if let Ok(p) = blob::open(kind, &sealed, None, b"k", "fuzz") {
        assert_eq!(p, body);
    }
});
