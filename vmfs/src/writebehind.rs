//! Write-behind for the FUSE front end.
//!
//! Without it a `write(2)` through the mount waits while the daemon copies
//! the data to the LUN, so one writer moves data at half the speed of a raw
//! file: the kernel's copy to the daemon and the daemon's copy to the LUN
//! take turns. With it, the FUSE thread that received a write answers first
//! and then writes the bytes (still in its request buffer) to the LUN, while
//! another FUSE thread receives the next request, as the page cache lets a
//! local write return before the disk has it. At most one write per FUSE
//! thread is outstanding.
//!
//! What a user can rely on stays what a local file gives:
//! * every later operation on the file sees the bytes: reads, attributes,
//!   truncation, fallocate, fsync and close first wait until the file's
//!   writes have reached the LUN ([`WriteBehind::settle`]);
//! * a write that overlaps one still outstanding waits for it, so
//!   overlapping writes land in the order they were answered;
//! * a write that fails after its answer is logged and reported by the
//!   file's next write or fsync (as the kernel reports a failed writeback);
//! * fsync, syncfs and unmount wait for everything first.
//!
//! Only writes into blocks the file already has are answered early (the
//! front end asks [`crate::fs::Fs::writes_in_place`]): one that allocates
//! can fail for lack of space, which the write itself must report. Files
//! other hosts may write at the same time (multi-writer) and raw device
//! mappings are written through.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use crate::error::{Fault, FsError, Result};

#[derive(Default)]
struct State {
    /// Writes answered but not yet on the LUN: (ticket, ino, offset, length).
    running: Vec<(u64, u64, u64, usize)>,
    next: u64,
    /// Per file: the first failure not yet reported (its kind, message).
    failed: HashMap<u64, (Fault, String)>,
}

impl State {
    fn overlaps(&self, ino: u64, off: u64, len: usize) -> bool {
        self.running
            .iter()
            .any(|&(_, i, o, l)| i == ino && o < off + len as u64 && off < o + l as u64)
    }
    fn busy(&self, ino: u64) -> bool {
        self.running.iter().any(|r| r.1 == ino)
    }
}

/// A write answered early; hand it back to [`WriteBehind::end`].
#[must_use]
pub struct Ticket {
    id: u64,
    ino: u64,
    off: u64,
    len: usize,
}

#[derive(Default)]
pub struct WriteBehind {
    state: Mutex<State>,
    /// Signalled whenever a write reaches the LUN (or fails).
    done: Condvar,
}

impl WriteBehind {
    pub fn new() -> WriteBehind {
        WriteBehind::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// About to answer a write of `len` bytes at `off` in file `ino` before
    /// carrying it out: wait for outstanding writes it overlaps, and record
    /// it. A failure of an earlier write to this file is returned instead
    /// (once): answer the write with it.
    pub fn begin(&self, ino: u64, off: u64, len: usize) -> Result<Ticket> {
        let mut st = self.lock();
        if let Some((n, m)) = st.failed.remove(&ino) {
            return Err(FsError::File(n, m));
        }
        while st.overlaps(ino, off, len) {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.next += 1;
        let id = st.next;
        st.running.push((id, ino, off, len));
        Ok(Ticket { id, ino, off, len })
    }

    /// The write of `t` was carried out, with result `r`.
    pub fn end(&self, t: Ticket, r: Result<()>) {
        let mut st = self.lock();
        if let Some(p) = st.running.iter().position(|x| x.0 == t.id) {
            st.running.swap_remove(p);
        }
        if let Err(e) = r {
            tracing::error!(
                "write of {} bytes at offset {} to file {:#x}, answered earlier, failed: {e}",
                t.len,
                t.off,
                t.ino
            );
            st.failed
                .entry(t.ino)
                .or_insert_with(|| (e.fault(), e.to_string()));
        }
        self.done.notify_all();
    }

    /// Whether file `ino` has writes outstanding.
    pub fn busy(&self, ino: u64) -> bool {
        self.lock().busy(ino)
    }

    /// Wait until every write of file `ino` reached the LUN; then report
    /// (and forget) a failure among them.
    pub fn settle(&self, ino: u64) -> Result<()> {
        self.wait_idle(ino);
        match self.lock().failed.remove(&ino) {
            Some((n, m)) => Err(FsError::File(n, m)),
            None => Ok(()),
        }
    }

    /// Wait until every write of file `ino` reached the LUN (a failure
    /// stays to be reported by the next write or fsync).
    pub fn wait_idle(&self, ino: u64) {
        let mut st = self.lock();
        while st.busy(ino) {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wait until every outstanding write reached the LUN; report the
    /// first failure not reported yet (and forget them all).
    pub fn settle_all(&self) -> Result<()> {
        let mut st = self.lock();
        while !st.running.is_empty() {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let first = st.failed.drain().next();
        match first {
            Some((_, (n, m))) => Err(FsError::File(n, m)),
            None => Ok(()),
        }
    }

    /// The file is closed: a failure nobody was told of is only logged.
    pub fn forget(&self, ino: u64) {
        if let Some((_, m)) = self.lock().failed.remove(&ino) {
            tracing::error!(
                "file {ino:#x} closed with a failed write its application was not told of: {m}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as M};

    /// Threads answer first and write after, like the FUSE threads;
    /// overlapping writes must land in the order they were begun.
    #[test]
    fn overlapping_writes_land_in_order() {
        let wb = Arc::new(WriteBehind::new());
        let file = Arc::new(M::new(vec![0u8; 4096]));
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Ticket, u8)>(0);
        let rx = Arc::new(M::new(rx));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (wb, file, rx) = (wb.clone(), file.clone(), rx.clone());
                std::thread::spawn(move || loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok((t, v)) = job else { return };
                    std::thread::sleep(std::time::Duration::from_micros(100 * u64::from(v % 3)));
                    file.lock().unwrap()[t.off as usize..t.off as usize + t.len].fill(v);
                    wb.end(t, Ok(()));
                })
            })
            .collect();
        for k in 0..200u32 {
            let t = wb.begin(7, u64::from(k * 10), 64).unwrap();
            tx.send((t, k as u8)).unwrap();
        }
        wb.settle(7).unwrap();
        drop(tx);
        for w in workers {
            w.join().unwrap();
        }
        let f = file.lock().unwrap();
        for k in 0..200usize {
            assert!(
                f[k * 10..k * 10 + 10].iter().all(|&b| b == k as u8),
                "range {k}"
            );
        }
        assert!(!wb.busy(7));
    }

    #[test]
    fn a_failure_is_reported_once() {
        let wb = WriteBehind::new();
        let t = wb.begin(3, 0, 3).unwrap();
        let u = wb.begin(4, 0, 3).unwrap();
        assert!(wb.busy(3));
        wb.end(t, Err(FsError::File(Fault::Io, "LUN error".into())));
        wb.end(u, Err(FsError::File(Fault::NoSpace, "full".into())));
        assert_eq!(wb.settle(3).unwrap_err().fault(), Fault::Io);
        assert!(wb.settle(3).is_ok(), "reported once");
        // File 4's failure waits for its next write.
        assert_eq!(wb.begin(4, 0, 1).err().unwrap().fault(), Fault::NoSpace);
        let t = wb.begin(4, 0, 1).unwrap();
        wb.end(t, Ok(()));
        wb.settle_all().unwrap();
    }
}
