//! Descriptor chains of any shape, as a hostile guest could lay them out:
//! the fuzzer's bytes are the start of 64 KiB of guest memory holding a split queue
//! (descriptor table, available ring) and the buffers, every address,
//! length, flag and `next` arbitrary (indirect tables, loops, chains that
//! leave guest memory, headers cut short). Each chain the queue yields is
//! carried out as a virtio-scsi command against an in-memory unit. Never a
//! panic, never a write outside the chain's writable buffers.
#![no_main]

use std::sync::Arc;

use hypervisor_io::backend::MemBackend;
use hypervisor_io::scsi::disk::DiskUnit;
use hypervisor_io::scsi::pr::MemPrStore;
use hypervisor_io::scsi::target::Target;
use hypervisor_io::virtio::device::command;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;
const SIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let n = data.len().min(MEM);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let t = Target::new();
    t.add(
        0,
        Arc::new(DiskUnit::new(
            "fuzz".into(),
            Arc::new(MemBackend::new(1 << 20, [2; 16])),
            Arc::new(MemPrStore::default()),
        )),
    );
    let Ok(mut q) = Queue::new(SIZE) else { return };
    q.set_size(SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    // Everything the queue needs lies in the first 1 KiB, so that short
    // inputs reach the chain walker: the table (256 bytes), the available
    // ring at 0x100, the used ring at 0x200.
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let Ok(it) = q.iter(&mem) else { return };
    let chains: Vec<_> = it.take(64).collect();
    for c in chains {
        let head = c.head_index();
        let used = command(&t, "fuzz", c);
        let _ = q.add_used(&mem, head, used);
    }
});
