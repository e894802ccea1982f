//! One machine, one host: the `vmfs mount` process is this machine's host
//! of a datastore (heartbeat slot, journal, locks, FUSE), and every command
//! on this machine that touches that datastore goes through its **control
//! socket** ([`agent`], [`client`], protocol in [`proto`] and
//! `docs/CONTROL.md`). The operations themselves ([`ops`]) are library
//! calls with typed results, run by the agent on its mounted datastore or
//! by the CLI on one it opens itself when no host here has it mounted.

pub mod agent;
pub mod client;
pub mod error;
pub mod online;
pub mod ops;
pub mod proto;
pub mod proxy;
pub mod qga;
pub mod scsi;
pub mod socket;
pub mod vm;

pub use agent::{Agent, Config};
pub use client::Client;
pub use error::{HostError, Result};
