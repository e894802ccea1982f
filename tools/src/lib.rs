//! Libraries behind the `vmfs` command that are worth calling on their own:
//! the crash-recovery harness.

pub mod benchutil;
pub mod crashdisk;
pub mod crashtest;
