//! The datastore filesystem: on-disk format ([`format`]), the volume across
//! extents ([`volume`]), allocation ([`alloc`]), the metadata transaction
//! ([`txn`]), files and directories ([`fs`]), the checker ([`fsck`]) and the
//! FUSE front end ([`fuse`]).

pub mod alloc;
pub mod cluster;
pub mod error;
pub mod file;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod guard;
pub mod leafmap;
pub mod txn;
pub mod volume;
pub mod writebehind;

pub use error::{FsError, Result};
pub use file::{File, LockMode};
pub use fs::{Fs, SetAttr, Usage};
pub use volume::{MkfsOptions, Volume};

pub use locking;
