//! The SCSI target: commands parsed ([`cdb`]), carried out against a
//! logical unit's [`crate::backend::Backend`] ([`disk`]), routed by LUN
//! with unit attentions ([`target`]); sense data ([`sense`]); persistent
//! reservations ([`pr`]). Nothing here knows of virtio.

pub mod cdb;
pub mod disk;
pub mod pr;
pub mod sense;
pub mod target;
