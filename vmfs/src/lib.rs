//! The datastore filesystem: on-disk format ([`format`]), the volume across
//! extents ([`volume`]), allocation ([`alloc`]), the metadata transaction
//! ([`txn`]), files and directories ([`fs`]), the checker ([`fsck`]) and the
//! FUSE front end ([`fuse`]).

pub mod alloc;
pub mod cluster;
pub mod error;
pub mod file;
pub mod format;
mod fs;
pub mod fsck;
pub mod fuse;
pub mod guard;
mod housekeeper;
pub mod journals;
pub mod leafmap;
pub mod mailbox;
pub mod txn;
pub mod volume;
pub mod writebehind;

pub use error::{Fault, FsError, Result};
pub use file::{File, LockMode};
pub use fs::{Change, Fs, SetAttr, Usage};
pub use housekeeper::Housekeeper;

/// White-box access for tests that damage or fill a datastore on purpose
/// (cargo feature `test-hooks`; never in the shipped binary): run a
/// transaction on the filesystem's internal state.
#[cfg(feature = "test-hooks")]
pub mod testing {
    pub use crate::fs::State;
    pub use crate::txn::Meta;

    /// [`crate::Fs`]'s internal transaction runner.
    pub fn op<R>(
        fs: &crate::Fs,
        f: impl FnMut(&mut State, &crate::Volume) -> crate::Result<R>,
    ) -> crate::Result<R> {
        fs.op(f)
    }

    /// Metadata blocks committed by operations, not yet in the journal.
    pub fn dirty_len(fs: &crate::Fs) -> usize {
        fs.lock().meta.dirty_len()
    }
}
pub use volume::{MkfsOptions, Volume};

pub use locking;
