//! What a backup reads and a restore writes: a raw file, a block device,
//! or a virtual disk (`snapshot::Disk`, on a datastore through its mount
//! or in a local directory).

use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::ctk::ChangeId;

use crate::error::{image_err, BackupError, Result};

/// What changed since a change ID.
pub struct Changed {
    pub ranges: Vec<Range<u64>>,
    /// Set when the source cannot answer for the ID: `ranges` is then
    /// everything that may hold data, and this says why.
    pub whole: Option<String>,
}

pub trait Source: Send + Sync {
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `off` (zeros past the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    /// The ranges that may hold data, in order.
    fn allocated(&self) -> Result<Vec<Range<u64>>>;
    /// What may have changed since `since` (a change ID it printed).
    fn changed_since(&self, since: &str) -> Result<Changed>;
    /// The change ID that the content read now holds everything up to.
    fn change_id(&self) -> Option<String>;
    fn describe(&self) -> String;
    /// A default name for the disk in the backup.
    fn disk_name(&self) -> String;
}

/// A name for a path, fit for a backup's disk name.
pub(crate) fn name_of(p: &Path, strip: &str) -> String {
    let n = p
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let n = n.strip_suffix(strip).unwrap_or(&n);
    let mut s: String = n
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert_str(0, "disk");
    }
    s
}

/// Open what SOURCE names: `*.vmdk` is a virtual disk, anything else a
/// raw file or block device.
pub fn open_source(path: &Path) -> Result<Box<dyn Source>> {
    if path.extension().is_some_and(|e| e == "vmdk") {
        Ok(Box::new(VDisk::open(path)?))
    } else {
        Ok(Box::new(Raw::open(path)?))
    }
}

// ---------------------------------------------------------------- raw

pub struct Raw {
    file: std::fs::File,
    path: PathBuf,
    size: u64,
    block: bool,
}

fn device_size(f: &std::fs::File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = f;
    let n = f.seek(std::io::SeekFrom::End(0))?;
    f.seek(std::io::SeekFrom::Start(0))?;
    Ok(n)
}

impl Raw {
    pub fn open(path: &Path) -> Result<Raw> {
        let file = std::fs::File::open(path).map_err(|e| image_err(path.display(), e))?;
        let md = file.metadata().map_err(|e| image_err(path.display(), e))?;
        let block = md.file_type().is_block_device();
        if !block && !md.is_file() {
            return Err(image_err(
                path.display(),
                "neither a file, a block device nor a .vmdk disk",
            ));
        }
        let size = if block {
            device_size(&file).map_err(|e| image_err(path.display(), e))?
        } else {
            md.len()
        };
        Ok(Raw {
            file,
            path: path.to_path_buf(),
            size,
            block,
        })
    }
}

impl Source for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(image_err(
                        format!("{} at offset {}", self.path.display(), off + done as u64),
                        e,
                    ))
                }
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// SEEK_DATA/SEEK_HOLE for a file; all of a block device.
    fn allocated(&self) -> Result<Vec<Range<u64>>> {
        if self.block {
            return Ok(vec![0..self.size]);
        }
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = 0i64;
        while (pos as u64) < self.size {
            // SAFETY: lseek on our open descriptor; reads go by pread,
            // so moving its offset disturbs nothing.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                if e.raw_os_error() == Some(libc::EINVAL) {
                    return Ok(vec![0..self.size]); // no SEEK_DATA here
                }
                return Err(image_err(self.path.display(), e));
            }
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { self.size as i64 } else { hole };
            out.push(data as u64..end as u64);
            pos = end;
        }
        Ok(out)
    }

    fn changed_since(&self, since: &str) -> Result<Changed> {
        Err(BackupError::Invalid(format!(
            "{}: a raw image keeps no change history, so --since {since} cannot apply; back it up whole (unchanged chunks are still stored once)",
            self.path.display()
        )))
    }

    fn change_id(&self) -> Option<String> {
        None
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn disk_name(&self) -> String {
        name_of(&self.path, "")
    }
}

// ---------------------------------------------------------------- virtual disk

pub struct VDisk {
    disk: snapshot::Disk,
    path: PathBuf,
}

fn split(path: &Path) -> Result<(PathBuf, String)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BackupError::Invalid(format!("{}: not a disk's file name", path.display())))?
        .to_string();
    Ok((dir, name))
}

impl VDisk {
    /// A disk opened elsewhere (through the datastore's file API), named
    /// `path` in messages.
    pub fn from_disk(disk: snapshot::Disk, path: PathBuf) -> VDisk {
        VDisk { disk, path }
    }

    /// Open a disk read-only: its current descriptor (`NAME.vmdk`) or a
    /// frozen layer, with every layer below it.
    pub fn open(path: &Path) -> Result<VDisk> {
        let (dir, name) = split(path)?;
        let store: Arc<dyn snapshot::Store> = Arc::new(snapshot::LocalStore::new(dir));
        let disk =
            snapshot::Disk::open(store, &name, false).map_err(|e| image_err(path.display(), e))?;
        Ok(VDisk {
            disk,
            path: path.to_path_buf(),
        })
    }
}

impl Source for VDisk {
    fn size(&self) -> u64 {
        self.disk.capacity()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let cap = self.disk.capacity();
        let n = (cap.saturating_sub(off) as usize).min(buf.len());
        if n > 0 {
            self.disk
                .read_at(&mut buf[..n], off)
                .map_err(|e| image_err(format!("{} at offset {off}", self.path.display()), e))?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Range<u64>>> {
        self.disk
            .changed(None, None)
            .map(|c| c.ranges)
            .map_err(|e| image_err(self.path.display(), e))
    }

    fn changed_since(&self, since: &str) -> Result<Changed> {
        let id: ChangeId = since
            .parse()
            .map_err(|e| BackupError::Invalid(format!("--since: {e}")))?;
        let c = self
            .disk
            .changed(Some(id), None)
            .map_err(|e| image_err(self.path.display(), e))?;
        Ok(Changed {
            ranges: c.ranges,
            whole: c.whole_disk,
        })
    }

    fn change_id(&self) -> Option<String> {
        let t = self.disk.tracking_info()?;
        if t.invalid.is_some() {
            return None;
        }
        t.last_id.map(|i| i.to_string())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn disk_name(&self) -> String {
        name_of(&self.path, ".vmdk")
    }
}

// ---------------------------------------------------------------- destinations

pub trait Dest: Send + Sync {
    fn write_at(&self, data: &[u8], off: u64) -> Result<()>;
    /// Whether zero chunks must be written (a block device, which may
    /// hold old data); files and virtual disks leave them as holes.
    fn needs_zeros(&self) -> bool;
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Make what DEST names, `size` bytes: `*.vmdk` a new thin virtual disk,
/// a block device as it is (it must be large enough), else a new file
/// (never over an existing one).
pub fn create_dest(path: &Path, size: u64) -> Result<Box<dyn Dest>> {
    if path.extension().is_some_and(|e| e == "vmdk") {
        let (dir, name) = split(path)?;
        let store: Arc<dyn snapshot::Store> = Arc::new(snapshot::LocalStore::new(dir));
        let rounded = size.div_ceil(512) * 512;
        snapshot::ops::create(
            &*store,
            &name,
            rounded,
            snapshot::Provisioning::Thin,
            "lsilogic",
        )
        .map_err(|e| image_err(path.display(), e))?;
        let disk =
            snapshot::Disk::open(store, &name, true).map_err(|e| image_err(path.display(), e))?;
        return Ok(Box::new(DiskDest {
            disk,
            path: path.to_path_buf(),
        }));
    }
    if let Ok(md) = std::fs::metadata(path) {
        if md.file_type().is_block_device() {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| image_err(path.display(), e))?;
            let have = device_size(&file).map_err(|e| image_err(path.display(), e))?;
            if have < size {
                return Err(image_err(
                    path.display(),
                    format!("{have} bytes: the backup needs {size}"),
                ));
            }
            return Ok(Box::new(RawDest {
                file,
                path: path.to_path_buf(),
                block: true,
            }));
        }
        return Err(image_err(
            path.display(),
            "already exists: restore makes a new file (or writes a block device)",
        ));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| image_err(path.display(), e))?;
    file.set_len(size)
        .map_err(|e| image_err(path.display(), e))?;
    Ok(Box::new(RawDest {
        file,
        path: path.to_path_buf(),
        block: false,
    }))
}

struct RawDest {
    file: std::fs::File,
    path: PathBuf,
    block: bool,
}

impl Dest for RawDest {
    fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(data, off)
            .map_err(|e| image_err(format!("{} at offset {off}", self.path.display()), e))
    }
    fn needs_zeros(&self) -> bool {
        self.block
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| image_err(self.path.display(), e))
    }
}

struct DiskDest {
    disk: snapshot::Disk,
    path: PathBuf,
}

impl Dest for DiskDest {
    fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        let n = (self.disk.capacity().saturating_sub(off) as usize).min(data.len());
        self.disk
            .write_at(&data[..n], off)
            .map_err(|e| image_err(format!("{} at offset {off}", self.path.display()), e))
    }
    fn needs_zeros(&self) -> bool {
        false
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let p = self.path.clone();
        self.disk.flush().map_err(|e| image_err(p.display(), e))?;
        self.disk.close().map_err(|e| image_err(p.display(), e))
    }
}
