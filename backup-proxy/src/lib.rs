//! The backup repository (issue 19): content-addressed, deduplicated,
//! compressed and optionally encrypted images of disks, on a local
//! directory or S3-compatible object storage, with several writers and no
//! lock server; backup (full or incremental by change ID), restore,
//! verify, prune and garbage collection, a SQLite catalog, and a read-only
//! FUSE view for file-level restore. docs/FORMAT.md has every object.

#[cfg(feature = "mount")]
pub mod attach;
pub mod backend;
pub mod backup;
pub mod blob;
#[cfg(feature = "catalog")]
pub mod catalog;
pub mod error;
pub mod export;
pub mod gc;
pub mod image;
pub mod index;
pub mod job;
pub mod keys;
pub mod manifest;
#[cfg(feature = "mount")]
pub mod mount;
pub mod nbd;
pub mod repo;
pub mod restore;
pub mod session;
pub mod util;
pub mod verify;

pub use error::{BackupError, Result};
pub use repo::{KeySource, Repo};
