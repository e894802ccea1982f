//! Requests between two hosts of one datastore through their heartbeat
//! sectors (`vmfs::mailbox`): asked, taken within heartbeats, answered;
//! a handler's error comes back as the answer; a host that takes nothing
//! (no housekeeping) or that stops is an error naming it, in time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::{Lun, MemLun};
use vmfs::cluster::Timeouts;
use vmfs::{Fs, Housekeeper, MkfsOptions};

fn two_hosts() -> (Arc<Fs>, Arc<Fs>, Timeouts) {
    let l: Arc<dyn Lun> = Arc::new(MemLun::new("mail", 256 << 20));
    drop(Fs::mkfs(vec![l.clone()], &MkfsOptions::default()).unwrap());
    let t = Timeouts::new(Some(25), Some(400)).unwrap();
    let a = Arc::new(Fs::mount(vec![l.clone()], [1; 16], t).unwrap());
    let b = Arc::new(Fs::mount(vec![l], [2; 16], t).unwrap());
    (a, b, t)
}

#[test]
fn a_request_is_taken_and_answered_within_heartbeats() {
    let (a, b, _) = two_hosts();
    // What an earlier run of B left (killed while asking): swept at its
    // first request.
    let bid = vmfs::volume::uuid_str(&b.member().unwrap().host);
    b.mkdir_path(vmfs::mailbox::DIR, 0o700).unwrap();
    for ext in ["req", "rep"] {
        let f = b
            .create_file(
                &format!("{}/{bid}-9.{ext}", vmfs::mailbox::DIR),
                0o600,
                vmfs::file::LockMode::Exclusive,
            )
            .unwrap();
        f.write_at(b"old", 0).unwrap();
        f.close().unwrap();
    }
    a.set_mail_handler(Arc::new(|r: vmfs::mailbox::Request| {
        if r.kind == 7 {
            return Err("kind 7 is refused".into());
        }
        let mut out = b"echo: ".to_vec();
        out.extend(&r.body);
        Ok(out)
    }));
    let _hk = Housekeeper::start(a.clone());
    let to = a.member().unwrap().slot;
    let t = Instant::now();
    let got = b
        .ask(
            to,
            1,
            b"hello",
            Duration::from_secs(2),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(got, b"echo: hello");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Again (a new number), a big body, and a refusal.
    let big = vec![9u8; 1 << 20];
    let got = b
        .ask(to, 1, &big, Duration::from_secs(2), Duration::from_secs(10))
        .unwrap();
    assert_eq!(got.len(), 6 + big.len());
    let e = b
        .ask(to, 7, b"", Duration::from_secs(2), Duration::from_secs(10))
        .unwrap_err();
    assert!(e.to_string().contains("kind 7 is refused"), "{e}");
    // Nothing is left in the mail directory.
    let dir = a.resolve(vmfs::mailbox::DIR).unwrap();
    let left: Vec<String> = a
        .readdir(dir)
        .unwrap()
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_host_that_takes_nothing_is_named_in_time() {
    let (a, b, t) = two_hosts();
    // No housekeeping on A: it never reads the request.
    let to = a.member().unwrap().slot;
    let start = Instant::now();
    let e = b
        .ask(
            to,
            1,
            b"x",
            Duration::from_millis(300),
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("did not take") && e.contains(&format!("slot {to}")),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    // A host that stops (unmounted here, its heartbeat gone) while asked.
    let _hk = Housekeeper::start(a.clone());
    a.set_mail_handler(Arc::new(|_| {
        std::thread::sleep(Duration::from_secs(30));
        Ok(Vec::new())
    }));
    let a2 = a.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        a2.abandon();
    });
    let start = Instant::now();
    let e = b
        .ask(to, 1, b"x", Duration::from_secs(2), Duration::from_secs(20))
        .unwrap_err()
        .to_string();
    stopper.join().unwrap();
    assert!(e.contains(&format!("slot {to}")), "{e}");
    assert!(start.elapsed() < t.lease * 6, "{:?}: {e}", start.elapsed());
}
