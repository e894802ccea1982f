//! The read-only NBD server (`backup attach --nbd`): any bytes a client
//! sends, handshake and requests, end in replies or a closed connection,
//! never a panic, a hang or an allocation past one request's data.
#![no_main]

use std::sync::Arc;

use backup_proxy::export::{DataMap, Export, ReadImage};
use libfuzzer_sys::fuzz_target;

struct Pattern;

impl ReadImage for Pattern {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> backup_proxy::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((off + i as u64) % 251) as u8;
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = vec![
        Export {
            name: "d0".into(),
            image: Arc::new(Pattern),
            map: Arc::new(DataMap::new(1 << 20, vec![4096..65536, 200_000..300_000])),
        },
        Export {
            name: "d1".into(),
            image: Arc::new(Pattern),
            map: Arc::new(DataMap::full(1 << 20)),
        },
    ];
    let _ = backup_proxy::nbd::serve_connection(data, std::io::sink(), &exports);
});
