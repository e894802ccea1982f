//! Paravirtual SCSI for QEMU/KVM guests: the host serves virtual disks and
//! raw device mappings through a vhost-user-scsi device, as ESX's vmkernel
//! serves PVSCSI. Three layers, each knowing only the one below:
//!
//! * `virtio/` (feature `vhost`): the vhost-user device, its queues and
//!   descriptor chains, the virtio-scsi request and response headers, task
//!   management and events. Knows nothing of SCSI commands.
//! * [`scsi`]: a SCSI target (logical units, commands, sense, unit
//!   attentions, persistent reservations). Knows nothing of virtio.
//! * [`backend`]: a logical unit's storage (a virtual disk through
//!   `snapshot/` and the file API, memory, null).

pub mod backend;
#[cfg(feature = "vhost")]
pub mod prstore;
#[cfg(feature = "vhost")]
pub mod rdmlun;
pub mod scsi;
#[cfg(feature = "vhost")]
pub mod vdisk;
#[cfg(feature = "vhost")]
pub mod virtio;
