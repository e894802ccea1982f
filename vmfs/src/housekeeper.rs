//! The thread every host of a datastore runs beside its users (the FUSE
//! mount, or a program using only the file API): every heartbeat it runs
//! [`Fs::housekeep`] (watch the other slots, recover dead hosts, free
//! orphans), and between heartbeats gives the volume lock to a host that
//! waits for it ([`Fs::yield_if_wanted`]). It must run on time whatever
//! the I/O threads are doing: takeover of dead hosts depends on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Fs;

/// How often an idle host holding the volume lock looks for a host waiting
/// for it (one read of the heartbeat region, only while others are mounted).
const LOCK_WATCH: Duration = Duration::from_millis(10);

/// The running housekeeping thread; dropping it stops it (before unmount).
pub struct Housekeeper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Housekeeper {
    /// Start housekeeping for `fs` (nothing to do unless it is mounted as a
    /// host of the cluster).
    pub fn start(fs: Arc<Fs>) -> Housekeeper {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = fs.member().map(|m| m.timeouts.heartbeat).map(|every| {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("vmfs-cluster".into())
                .spawn(move || {
                    if let Some(sh) = fs.shared() {
                        sh.watched.store(true, Ordering::SeqCst);
                    }
                    let mut last = Instant::now() - every;
                    while !stop.load(Ordering::SeqCst) {
                        if last.elapsed() >= every {
                            last = Instant::now();
                            if let Err(e) = fs.housekeep() {
                                tracing::error!("cluster housekeeping: {e}");
                            }
                            // Requests of other hosts, in the sectors just read.
                            let slots = fs.last_slots();
                            fs.deliver_mail(&slots);
                        }
                        // Between heartbeats: give the volume lock to a host
                        // that waits for it, if this one sits on it idle.
                        if let Err(e) = fs.yield_if_wanted() {
                            tracing::error!("giving the volume lock to a waiting host: {e}");
                        }
                        std::thread::sleep(LOCK_WATCH.min(every));
                    }
                })
                .expect("spawn the cluster thread")
        });
        Housekeeper { stop, thread }
    }
}

impl Drop for Housekeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
