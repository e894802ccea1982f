//! The same operations on a datastore directory through the vmfs file API.

use std::sync::Arc;

use lun::MemLun;
use snapshot::ops::{self, Provisioning};
use snapshot::{Disk, Store, VmfsStore};

#[test]
fn disks_on_a_datastore_through_the_file_api() {
    let l: Arc<dyn lun::Lun> = Arc::new(MemLun::new("ds", 256 << 20));
    let fs = Arc::new(vmfs::Fs::mkfs(vec![l], &vmfs::MkfsOptions::default()).unwrap());
    fs.mkdir_path("vm1", 0o755).unwrap();
    let store: Arc<dyn Store> = Arc::new(VmfsStore::new(fs.clone(), "vm1"));
    ops::create(&*store, "disk.vmdk", 16 << 20, Provisioning::Thin, "pvscsi").unwrap();
    {
        let d = Disk::open(store.clone(), "disk.vmdk", true).unwrap();
        d.write_at(&[7u8; 70_000], 1000).unwrap();
        d.flush().unwrap();
    }
    ops::snapshot(store.clone(), "disk.vmdk").unwrap();
    {
        let d = Disk::open(store.clone(), "disk.vmdk", true).unwrap();
        d.write_at(&[8u8; 5000], 2000).unwrap();
    }
    let n = ops::clone(
        store.clone(),
        "disk.vmdk",
        store.clone(),
        "copy.vmdk",
        Provisioning::Thin,
    )
    .unwrap();
    assert!(n > 0);
    let c = Disk::open(store.clone(), "copy.vmdk", false).unwrap();
    let mut b = vec![0u8; 8000];
    c.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[1000..2000], &[7u8; 1000][..]);
    assert_eq!(&b[2000..7000], &[8u8; 5000][..]);
    assert_eq!(&b[7000..8000], &[7u8; 1000][..]);
    drop(c);
    ops::consolidate(store.clone(), "disk.vmdk").unwrap();
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}
