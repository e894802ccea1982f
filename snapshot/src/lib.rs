//! Virtual disks on the datastore, the way ESX keeps them and QEMU's own
//! tools read them: a VMDK text descriptor naming its extents (flat for a
//! base disk, hosted sparse for the layers written after a snapshot), a
//! chain of frozen layers below the current one, and the operations on
//! the chain. Everything goes through [`store::Store`]: a directory of the
//! datastore through the vmfs file API, or a local directory.

pub mod ctk;
pub mod descriptor;
pub mod disk;
pub mod error;
pub mod extent;
pub mod ids;
pub mod merge;
pub mod ops;
pub mod sparse;
pub mod store;

pub use disk::Disk;
pub use error::{DiskError, Result};
pub use ops::Provisioning;
pub use store::{DiskFile, LocalStore, Store, VmfsStore};
