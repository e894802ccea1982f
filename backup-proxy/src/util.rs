//! Small helpers: hex, times, random identifiers, names.

use crate::error::{BackupError, Result};

pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS's generator; there is no fallback worth having.
    getrandom::getrandom(&mut b).expect("the OS random generator failed");
    b
}

/// Seconds since 1970 on this machine's clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds on this machine's boot clock: monotonic, and running
/// through a suspend (a writer's lapsed heartbeat must count it).
pub fn boot_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as i64 * 1000 + ts.tv_nsec as i64 / 1_000_000
}

pub use snapshot::disk::civil;

/// A time as `(year, month, day, hour, minute, second)` in UTC.
fn fields(t: i64) -> (i64, u32, u32, i64, i64, i64) {
    let (y, m, d) = civil(t.div_euclid(86400));
    let s = t.rem_euclid(86400);
    (y, m, d, s / 3600, s / 60 % 60, s % 60)
}

/// `YYYYMMDDTHHMMSSZ`, the time part of a backup's ID.
pub fn stamp(t: i64) -> String {
    let (y, m, d, h, mi, s) = fields(t);
    format!("{y:04}{m:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// `YYYY-MM-DD HH:MM:SS UTC`, for people.
pub fn human_time(t: i64) -> String {
    let (y, m, d, h, mi, s) = fields(t);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// Run `f` on `n` threads at once; the first error wins and sets `stop`
/// (which `f` watches), and a thread that panicked is an error too.
pub fn in_parallel(
    n: usize,
    stop: &std::sync::atomic::AtomicBool,
    what: &str,
    f: impl Fn() -> Result<()> + Sync,
) -> Result<()> {
    let errors: Vec<BackupError> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n.max(1))
            .map(|_| {
                s.spawn(|| {
                    let r = f();
                    if r.is_err() {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| match h.join() {
                Ok(r) => r.err(),
                Err(_) => Some(BackupError::Invalid(format!("a {what} thread panicked"))),
            })
            .collect()
    });
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Fill `buf` with a fast deterministic pseudo-random pattern of `seed`
/// (xorshift): test and bench images whose runs compare.
pub fn pseudo_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// A backup or disk name: letters, digits, `.`, `_`, `-`, not starting
/// with `.`, at most 100 bytes (it is part of object keys).
pub fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "{what} {s:?}: use 1 to 100 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

pub fn human_bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_times() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(unhex("abc").is_none() && unhex("zz").is_none());
        assert_eq!(stamp(0), "19700101T000000Z");
        assert_eq!(human_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert!(check_name("backup", "web-01.vm_a").is_ok());
        assert!(check_name("backup", "a/b").is_err() && check_name("backup", ".x").is_err());
    }
}

/// Open (creating) `path` and take an exclusive `flock` on it without
/// waiting: `Some` while this process holds it (until the file is dropped),
/// `None` when another holds it.
pub fn try_lock_file(path: &std::path::Path) -> Result<Option<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| BackupError::Invalid(format!("{}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    let got = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } == 0;
    Ok(got.then_some(f))
}
