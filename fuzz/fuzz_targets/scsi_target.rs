//! The SCSI target as a guest drives it: a run of commands (CDB, data-out,
//! buffer size) to a small in-memory unit, persistent reservations from two
//! initiators included, and virtio-scsi's LUN field. Never a panic, never
//! more data-in than the guest's buffers hold, never an I/O outside the
//! unit.
#![no_main]

use std::sync::Arc;

use hypervisor_io::backend::MemBackend;
use hypervisor_io::scsi::disk::{Buffers, DiskUnit, Outcome};
use hypervisor_io::scsi::pr::MemPrStore;
use hypervisor_io::scsi::target::Target;
use hypervisor_io::virtio::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let t = Target::new();
    let unit = DiskUnit::new(
        "fuzz".into(),
        Arc::new(MemBackend::new(1 << 20, [1; 16])),
        Arc::new(MemPrStore::default()),
    );
    t.add(0, Arc::new(unit));
    let mut data_in = Vec::new();
    // Each command: [lun-field 8][cdb 16][max-in 2][out-len 2][out...]
    let mut rest = data;
    while rest.len() >= 28 {
        let (hdr, tail) = rest.split_at(28);
        let lun = match wire::address(&hdr[0..8]) {
            wire::Address::Lun(l) => l,
            wire::Address::ReportLuns => 0,
            wire::Address::Bad => 7,
        };
        let cdb = &hdr[8..24];
        let max_in = usize::from(u16::from_le_bytes([hdr[24], hdr[25]])) * 16;
        let out_len = usize::from(u16::from_le_bytes([hdr[26], hdr[27]])).min(tail.len());
        let (out, next) = tail.split_at(out_len);
        let nexus = if hdr[0] & 1 == 0 { "a" } else { "b" };
        let o = t.execute(
            nexus,
            lun,
            cdb,
            Buffers {
                data_out: out,
                data_in: &mut data_in,
                data_in_max: max_in,
            },
        );
        if let Outcome::Good(n) = o {
            assert!(n <= max_in && n == data_in.len(), "{n} bytes for a buffer of {max_in}");
        }
        rest = next;
    }
});
