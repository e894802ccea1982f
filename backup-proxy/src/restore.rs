//! Restoring a backup's disk: every chunk fetched, checked against its
//! digest and written in place by several threads at once; zero chunks
//! stay holes (a file, a thin virtual disk) or are written as zeros (a
//! block device).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{BackupError, Result};
use crate::image::Dest;
use crate::index::ZERO;
use crate::manifest::{DiskEntry, Manifest};
use crate::repo::Repo;

#[derive(Debug, Default, Clone)]
pub struct RestoreStats {
    pub bytes: u64,
    pub fetched: u64,
    pub zero: u64,
    pub millis: u64,
}

/// The disk of `m` named `disk`, or its only disk.
pub fn pick<'a>(m: &'a Manifest, disk: Option<&str>) -> Result<&'a DiskEntry> {
    match disk {
        Some(n) => m.disks.iter().find(|d| d.name == n).ok_or_else(|| {
            BackupError::NotFound(format!(
                "backup {} has no disk {n} (it has {})",
                m.id,
                m.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }),
        None if m.disks.len() == 1 => Ok(&m.disks[0]),
        None => Err(BackupError::Invalid(format!(
            "backup {} has {} disks ({}): name one with --disk",
            m.id,
            m.disks.len(),
            m.disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub fn restore(
    repo: &Repo,
    d: &DiskEntry,
    dest: Box<dyn Dest>,
    workers: usize,
    progress: bool,
) -> Result<RestoreStats> {
    let t0 = std::time::Instant::now();
    let index = repo.index(d)?;
    let zeros = dest.needs_zeros();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let stats = Mutex::new(RestoreStats::default());
    let pb = crate::backup::bar(d.size, progress, &d.name);
    let run = crate::util::in_parallel(workers, &stop, "restore", || -> Result<()> {
        let zero_buf = vec![0u8; if zeros { index.chunk_size as usize } else { 0 }];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= index.digests.len() || stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let r = index.range(i);
            let len = (r.end - r.start) as usize;
            let dg = &index.digests[i];
            let res = if *dg == ZERO {
                stats.lock().unwrap_or_else(|p| p.into_inner()).zero += len as u64;
                if zeros {
                    dest.write_at(&zero_buf[..len], r.start)
                } else {
                    Ok(())
                }
            } else {
                repo.get_chunk(dg).and_then(|data| {
                    if data.len() != len {
                        return Err(crate::error::corrupt(
                            crate::repo::chunk_key(dg),
                            format!(
                                "{} bytes where the index has a {len}-byte chunk",
                                data.len()
                            ),
                        ));
                    }
                    stats.lock().unwrap_or_else(|p| p.into_inner()).fetched += len as u64;
                    if zeros {
                        return dest.write_at(&data, r.start);
                    }
                    // A fresh file or thin disk reads zeros where
                    // nothing is written: write only the runs of
                    // 4 KiB blocks that hold data (less to write,
                    // and the image comes back as sparse as it was).
                    for run in data_runs(&data, 4096) {
                        dest.write_at(&data[run.clone()], r.start + run.start as u64)?;
                    }
                    Ok(())
                })
            };
            res?;
            pb.inc(len as u64);
        }
    });
    pb.finish_and_clear();
    run?;
    dest.finish()?;
    let mut s = stats.into_inner().unwrap_or_else(|p| p.into_inner());
    s.bytes = d.size;
    s.millis = t0.elapsed().as_millis() as u64;
    Ok(s)
}

/// The runs of `block`-sized pieces of `b` that are not all zeros.
fn data_runs(b: &[u8], block: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (k, piece) in b.chunks(block).enumerate() {
        if crate::backup::is_zero(piece) {
            continue;
        }
        let (s, e) = (k * block, k * block + piece.len());
        match out.last_mut() {
            Some(last) if last.end == s => last.end = e,
            _ => out.push(s..e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_runs_skip_zero_blocks() {
        let mut b = vec![0u8; 10 * 4096 + 100];
        b[5] = 1;
        b[4096 * 3] = 1;
        b[4096 * 4 + 7] = 1;
        b[10 * 4096 + 99] = 1;
        assert_eq!(
            super::data_runs(&b, 4096),
            vec![0..4096, 3 * 4096..5 * 4096, 10 * 4096..10 * 4096 + 100]
        );
    }
}
