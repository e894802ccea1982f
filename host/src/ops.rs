//! The datastore operations behind the CLI's commands, as library calls
//! with typed results: the host agent runs them on its mounted datastore,
//! the CLI on one it opens itself when no host on this machine has it
//! mounted. Results serialize to the control protocol's replies.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmfs::format::{HostSlot, SLOT_FREE, SLOT_LIVE, SLOT_REPLAYING};
use vmfs::volume::uuid_str;
use vmfs::Fs;

use crate::error::{HostError, Result};

/// `vmfs info`: the volume, its host slots, usage and extents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub volume: String,
    pub label: String,
    pub format_version: u32,
    pub config_generation: u64,
    pub block_size: u64,
    pub sub_block_size: u64,
    pub max_hosts: u32,
    pub journal_bytes: u64,
    /// Slots in use or with a journal.
    pub slots: Vec<SlotSummary>,
    /// Journals holding committed work not yet applied (text).
    pub replays: Vec<String>,
    pub total_blocks: u64,
    pub free_blocks: u64,
    pub files: u64,
    pub descriptors_free: u64,
    pub descriptor_clusters: u64,
    pub lock_method: String,
    pub extents: Vec<ExtentInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotSummary {
    pub slot: u32,
    /// "mounted", "replaying", "free", or the error reading it.
    pub state: String,
    pub generation: u64,
    pub journal_block: u64,
    pub journal_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtentInfo {
    pub uuid: String,
    pub bytes: u64,
    pub first_block: u64,
    pub nblocks: u64,
    pub lun: String,
    pub compare_and_write: bool,
    pub note: Option<String>,
}

fn slot_state(s: &HostSlot) -> &'static str {
    match s.state {
        SLOT_LIVE => "mounted",
        SLOT_REPLAYING => "replaying",
        _ => "free",
    }
}

/// [`Info`] of `fs`; `slots` as read from disk (before a check's in-memory
/// replay changed them).
pub fn info(fs: &Fs, slots: Vec<(u32, vmfs::Result<HostSlot>)>) -> Info {
    let vol = fs.vol();
    let h = &vol.header;
    let u = fs.usage();
    Info {
        volume: uuid_str(&h.uuid),
        label: h.label.clone(),
        format_version: u32::from(vmfs::format::VERSION),
        config_generation: h.config_gen,
        block_size: u.block_size,
        sub_block_size: u64::from(h.sub_block_size),
        max_hosts: h.max_hosts,
        journal_bytes: u64::from(h.journal_blocks) * 4096,
        slots: slots
            .into_iter()
            .filter_map(|(s, hs)| match hs {
                Ok(hs) if hs.journal != 0 || hs.state != SLOT_FREE => Some(SlotSummary {
                    slot: s,
                    state: slot_state(&hs).into(),
                    generation: hs.generation,
                    journal_block: hs.journal,
                    journal_bytes: u64::from(hs.journal_blocks) * 4096,
                }),
                Ok(_) => None,
                Err(e) => Some(SlotSummary {
                    slot: s,
                    state: e.to_string(),
                    generation: 0,
                    journal_block: 0,
                    journal_bytes: 0,
                }),
            })
            .collect(),
        replays: fs
            .replays()
            .into_iter()
            .map(|(s, rep)| format!("slot {s}: journal holds committed work: {rep}"))
            .collect(),
        total_blocks: u.total_blocks,
        free_blocks: u.free_blocks,
        files: u.fds_used,
        descriptors_free: u.fds_free,
        descriptor_clusters: u.fd_clusters,
        lock_method: vmfs::locking::Method::for_lun(&*vol.luns[0])
            .describe()
            .to_string(),
        extents: h
            .extents
            .iter()
            .zip(&vol.luns)
            .map(|(e, l)| ExtentInfo {
                uuid: uuid_str(&e.uuid),
                bytes: e.nblocks * u.block_size,
                first_block: e.first_block,
                nblocks: e.nblocks,
                lun: l.name().to_string(),
                compare_and_write: l.has_compare_and_write(),
                note: l.compare_and_write_note().map(|s| s.to_string()),
            })
            .collect(),
    }
}

/// The slots of `vol` as on disk, numbered.
pub fn disk_slots(vol: &vmfs::Volume) -> Result<Vec<(u32, vmfs::Result<HostSlot>)>> {
    Ok((0u32..)
        .zip(vol.read_slots()?.into_iter().map(|(h, _)| h))
        .collect())
}

/// `vmfs hosts`: each slot ever used, and whether its heartbeat moves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hosts {
    pub slots: Vec<HostView>,
    /// How long the heartbeats were watched (ms).
    pub watched_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    pub slot: u32,
    /// "live", "silent" (live on disk, no heartbeat change), "replaying", "free".
    pub state: String,
    pub replayer: u32,
    pub host: String,
    pub generation: u64,
    pub heartbeat: u64,
    pub journal_block: u64,
    pub journal_bytes: u64,
}

/// Watch the heartbeats for `watch` and report every slot ever used.
pub fn hosts(vol: &vmfs::Volume, watch: std::time::Duration) -> Result<Hosts> {
    let read = || -> Result<Vec<HostSlot>> {
        vol.read_slots()?
            .into_iter()
            .map(|(hs, _)| Ok(hs?))
            .collect()
    };
    let first = read()?;
    // Liveness is a change seen on this host's clock.
    std::thread::sleep(watch);
    let second = read()?;
    let mut out = Vec::new();
    for (s, (a, b)) in (0u32..).zip(first.iter().zip(&second)) {
        if b.state == SLOT_FREE && b.journal == 0 && b.host == [0; 16] {
            continue;
        }
        let state = match b.state {
            SLOT_LIVE if a.heartbeat != b.heartbeat => "live",
            SLOT_LIVE => "silent",
            SLOT_REPLAYING => "replaying",
            _ => "free",
        };
        out.push(HostView {
            slot: s,
            state: state.into(),
            replayer: b.replayer,
            host: uuid_str(&b.host),
            generation: b.generation,
            heartbeat: b.heartbeat,
            journal_block: b.journal,
            journal_bytes: u64::from(b.journal_blocks) * 4096,
        });
    }
    Ok(Hosts {
        slots: out,
        watched_ms: watch.as_millis() as u64,
    })
}

/// `vmfs locks`: every lock that is not free.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Locks {
    pub method: String,
    pub held: Vec<LockView>,
    /// Lock sectors naming only hosts recovered or gone since (free locks).
    pub stale: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockView {
    pub object: String,
    pub mode: String,
    pub generation: u64,
    pub holders: Vec<HolderView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HolderView {
    pub slot: u32,
    pub generation: u64,
    pub host: String,
    /// "held", "stale" (its slot was freed or recovered since), "no such slot".
    pub state: String,
}

/// The locks of `fs`, judged against `slots` as on disk.
pub fn locks(fs: &Fs, slots: &[(u32, vmfs::Result<HostSlot>)]) -> Result<Locks> {
    let held = fs.held_locks()?;
    let slot = |n: u32| slots.get(n as usize).and_then(|(_, s)| s.as_ref().ok());
    let current = |h: &vmfs::locking::Holder| matches!(slot(h.slot), Some(s) if s.generation == h.generation && s.state != SLOT_FREE);
    let (live, stale): (Vec<_>, Vec<_>) = held
        .into_iter()
        .partition(|(_, rec)| rec.holders.iter().any(current));
    Ok(Locks {
        method: vmfs::locking::Method::for_lun(&*fs.vol().luns[0])
            .describe()
            .to_string(),
        held: live
            .into_iter()
            .map(|(what, rec)| LockView {
                object: what,
                mode: rec.mode.name().to_string(),
                generation: rec.generation,
                holders: rec
                    .holders
                    .iter()
                    .map(|h| HolderView {
                        slot: h.slot,
                        generation: h.generation,
                        host: slot(h.slot)
                            .map(|s| uuid_str(&s.host))
                            .unwrap_or("?".into()),
                        state: match slot(h.slot) {
                            Some(_) if current(h) => "held",
                            Some(_) => "stale",
                            None => "no such slot",
                        }
                        .into(),
                    })
                    .collect(),
            })
            .collect(),
        stale: stale.len(),
    })
}

/// Does this LUN carry a datastore's volume header?
pub fn is_datastore_lun(l: &dyn lun::Lun) -> bool {
    let mut b = vec![0u8; vmfs::format::MD];
    l.read_at(&mut b, 0).is_ok() && vmfs::format::VolumeHeader::decode(&b, None).is_ok()
}

/// `vmfs rdm create`: what was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RdmCreated {
    pub path: String,
    pub mode: String,
    pub url_hint: String,
    pub identity: String,
    pub size: u64,
}

/// The mapping of LUN `target` for the datastore on `datastore` (its
/// LUNs): refused for a LUN of that or any datastore. Run before the
/// datastore is opened for the change: a refusal writes nothing.
pub fn rdm_mapping(
    target: &dyn lun::Lun,
    mode: rdm::Mode,
    datastore: &[Arc<dyn lun::Lun>],
) -> Result<rdm::Mapping> {
    Ok(rdm::create(target, mode, datastore, is_datastore_lun)?)
}

/// Write mapping `m` as the file `path` of `fs`.
pub fn rdm_create(fs: &Fs, m: &rdm::Mapping, path: &str) -> Result<RdmCreated> {
    let mode = m.mode;
    let (dir, name) = fs.parent_path(path)?;
    fs.create_mapping(dir, name.as_bytes(), &m.encode(), m.size)
        .map_err(|e| HostError::Agent(format!("creating the mapping file {path}: {e}")))?;
    Ok(RdmCreated {
        path: path.to_string(),
        mode: mode.name().to_string(),
        url_hint: m.url_hint.clone(),
        identity: m.identity.to_string(),
        size: m.size,
    })
}

/// `vmfs rdm info`: a mapping and whether this host reaches its LUN.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RdmInfo {
    pub path: String,
    pub mode: String,
    pub create_type: String,
    pub identity: String,
    pub size: u64,
    pub block_size: u32,
    pub url_hint: String,
    /// The LUN that matches, or why none does.
    pub lun: std::result::Result<String, String>,
}

/// The mapping at `path` of `fs`, resolved against this host's LUN list in
/// `state_dir`.
pub fn rdm_info(fs: &Fs, path: &str, state_dir: &Path) -> Result<RdmInfo> {
    let ino = fs.resolve(path)?;
    let i = fs.getattr(ino)?;
    if i.flags & vmfs::format::FD_FLAG_RDM == 0 {
        return Err(vmfs::FsError::Invalid(format!(
            "{path}: not a raw device mapping (an ordinary file)"
        ))
        .into());
    }
    let m = fs.mapping_of(&i)?;
    let list = rdm::host_luns(state_dir)
        .map_err(|e| HostError::io(format!("reading {}", state_dir.join("luns").display()), e))?;
    let lun = rdm::resolve(&m, &list, lun::OpenOptions::default())
        .map(|l| l.name().to_string())
        .map_err(|e| e.to_string());
    Ok(RdmInfo {
        path: path.to_string(),
        mode: m.mode.name().to_string(),
        create_type: m.mode.create_type().to_string(),
        identity: m.identity.to_string(),
        size: m.size,
        block_size: m.block_size,
        url_hint: m.url_hint.clone(),
        lun,
    })
}

/// `vmfs extend`: the datastore before and after.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extended {
    pub added: String,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub extents: usize,
}

/// Look at LUN `new` before it is added: refused if it holds anything
/// unless `force`, always if it belongs to a datastore in use. Run before
/// the datastore is opened: a refused extend writes nothing anywhere.
pub fn check_new_extent(
    new: &Arc<dyn lun::Lun>,
    force: bool,
    t: &vmfs::cluster::Timeouts,
) -> Result<vmfs::guard::Checked> {
    let hint =
        |u: &str| -> vmfs::Result<Arc<dyn lun::Lun>> { Ok(lun::open_with(u, t.lun_options())?) };
    Ok(vmfs::guard::check_overwrite(
        std::slice::from_ref(new),
        force,
        t,
        "extend",
        &hint,
    )?)
}

/// Add LUN `new`, checked by [`check_new_extent`], to `fs`.
pub fn extend(fs: &Fs, new: Arc<dyn lun::Lun>, checked: vmfs::guard::Checked) -> Result<Extended> {
    let before = fs.usage();
    let name = new.name().to_string();
    checked.wipe()?;
    fs.extend(new)?;
    let u = fs.usage();
    Ok(Extended {
        added: name,
        bytes_before: before.total_blocks * before.block_size,
        bytes_after: u.total_blocks * u.block_size,
        extents: fs.vol().header.extents.len(),
    })
}

/// `vmfs status`: what this host is for one datastore it has mounted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub datastore: String,
    pub label: String,
    pub mountpoint: String,
    pub host: String,
    pub slot: u32,
    pub generation: u64,
    pub pid: u32,
    /// Bytes of this host's journal in use, and its size.
    pub journal_used: u64,
    pub journal_bytes: u64,
    /// Files this host has open.
    pub open_files: usize,
    pub lease_ms: u64,
    pub socket: String,
    /// The disks this host serves to guests: `SOCKET LUN N: PATH`.
    #[serde(default)]
    pub attached: Vec<String>,
}

// ---------------------------------------------------------------- virtual disks

/// The directory of `path` inside the datastore and the disk's file name.
fn split_disk_path(path: &str) -> Result<(String, String)> {
    let p = path.trim_matches('/');
    let (dir, name) = match p.rsplit_once('/') {
        Some((d, n)) => (d.to_string(), n.to_string()),
        None => (String::new(), p.to_string()),
    };
    if name.is_empty() || !name.ends_with(".vmdk") || p.split('/').any(|c| c == "..") {
        return Err(HostError::BadRequest(format!(
            "{path:?} is not a path to a NAME.vmdk inside the datastore"
        )));
    }
    Ok((dir, name))
}

pub fn store_for(fs: &Arc<Fs>, path: &str) -> Result<(Arc<dyn snapshot::Store>, String)> {
    let (dir, name) = split_disk_path(path)?;
    Ok((Arc::new(snapshot::VmfsStore::new(fs.clone(), &dir)), name))
}

/// `vmfs disk info`: the chain and each layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskInfo {
    pub path: String,
    pub size: u64,
    pub adapter: Option<String>,
    pub thin: Option<bool>,
    /// Newest first: the current layer, then each snapshot below it.
    pub layers: Vec<LayerInfo>,
    /// Change tracking (`None`: off).
    #[serde(default)]
    pub tracking: Option<TrackingInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrackingInfo {
    pub file: String,
    /// The ID of the last snapshot (`HISTORY/0`: the start of the history).
    pub last_change_id: Option<String>,
    pub granularity: u64,
    /// When and why the history began.
    pub began: String,
    /// Why it cannot answer now (the next write-open starts a new history).
    pub invalid: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInfo {
    pub descriptor: String,
    pub cid: String,
    pub parent_cid: Option<String>,
    pub create_type: String,
    pub extents: Vec<String>,
    pub allocated: u64,
}

pub fn disk_info(fs: &Arc<Fs>, path: &str) -> Result<DiskInfo> {
    let (store, name) = store_for(fs, path)?;
    let d = snapshot::Disk::open(store, &name, false).map_err(disk_err)?;
    let mut layers = Vec::new();
    for l in &d.layers {
        layers.push(LayerInfo {
            descriptor: l.name.clone(),
            cid: format!("{:08x}", l.desc.cid),
            parent_cid: (l.desc.parent_cid != snapshot::descriptor::NO_PARENT)
                .then(|| format!("{:08x}", l.desc.parent_cid)),
            create_type: l.desc.create_type.clone(),
            extents: l
                .desc
                .extents
                .iter()
                .filter_map(|e| e.file.clone())
                .collect(),
            allocated: l.allocated_bytes().map_err(disk_err)?,
        });
    }
    let base = &d.layers[d.layers.len() - 1].desc;
    Ok(DiskInfo {
        path: path.to_string(),
        size: d.capacity(),
        adapter: d.layers[0].desc.ddb("ddb.adapterType").map(String::from),
        thin: base.ddb("ddb.thinProvisioned").map(|v| v == "1"),
        layers,
        tracking: d.tracking_info().map(|t| TrackingInfo {
            file: t.file,
            last_change_id: t.last_id.map(|i| i.to_string()),
            granularity: t.granularity,
            began: t.began,
            invalid: t.invalid,
        }),
    })
}

/// `vmfs disk changed`: the byte ranges to read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskChanges {
    pub path: String,
    pub since: String,
    pub until: Option<String>,
    pub size: u64,
    pub granularity: u64,
    /// `[start, end)` byte ranges, in order.
    pub ranges: Vec<(u64, u64)>,
    /// Their total.
    pub bytes: u64,
    /// Set when the answer is the whole disk because the history cannot
    /// answer: why.
    pub whole_disk: Option<String>,
}

fn change_id(s: &str) -> Result<snapshot::ctk::ChangeId> {
    s.parse().map_err(disk_err)
}

pub fn disk_changed(
    fs: &Arc<Fs>,
    path: &str,
    since: &str,
    until: Option<&str>,
) -> Result<DiskChanges> {
    let (store, name) = store_for(fs, path)?;
    let s = if since == "*" {
        None
    } else {
        Some(change_id(since)?)
    };
    let u = until.map(change_id).transpose()?;
    let d = snapshot::Disk::open(store, &name, false).map_err(disk_err)?;
    let c = d.changed(s, u).map_err(disk_err)?;
    Ok(DiskChanges {
        path: path.to_string(),
        since: since.to_string(),
        until: until.map(String::from),
        size: d.capacity(),
        granularity: c.granularity,
        bytes: c.ranges.iter().map(|r| r.end - r.start).sum(),
        ranges: c.ranges.iter().map(|r| (r.start, r.end)).collect(),
        whole_disk: c.whole_disk,
    })
}

pub fn disk_tracking(fs: &Arc<Fs>, path: &str, on: bool) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    let was = snapshot::ops::set_tracking(store, &name, on).map_err(disk_err)?;
    let said = match (was, on) {
        (true, true) => "change tracking was already on".to_string(),
        (false, false) => "change tracking was already off".to_string(),
        (false, true) => {
            "change tracking is on: a new history begins (the next backup reads the whole disk)"
                .to_string()
        }
        (true, false) => "change tracking is off; its file is removed".to_string(),
    };
    done(fs, path, said)
}

/// What a disk operation did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskDone {
    pub path: String,
    /// What happened, for a person.
    pub said: String,
    pub depth: usize,
    /// What `snapshot` froze at (with change tracking on).
    #[serde(default)]
    pub change_id: Option<String>,
}

pub fn disk_err(e: snapshot::DiskError) -> HostError {
    HostError::Disk(e)
}

fn done(fs: &Arc<Fs>, path: &str, said: String) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    let d = snapshot::Disk::open(store, &name, false).map_err(disk_err)?;
    Ok(DiskDone {
        path: path.to_string(),
        said,
        depth: d.depth(),
        change_id: None,
    })
}

pub fn disk_share(fs: &Arc<Fs>, path: &str, on: bool) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    snapshot::ops::set_shared(store, &name, on).map_err(disk_err)?;
    done(
        fs,
        path,
        if on {
            "shared: every host may attach it at once (multi-writer); change tracking is off".into()
        } else {
            "no longer shared: one host at a time".into()
        },
    )
}

pub fn disk_create(
    fs: &Arc<Fs>,
    path: &str,
    size: u64,
    prov: snapshot::Provisioning,
    adapter: &str,
    tracking: bool,
) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    snapshot::ops::create(&*store, &name, size, prov, adapter).map_err(disk_err)?;
    if !tracking {
        snapshot::ops::set_tracking(store, &name, false).map_err(disk_err)?;
    }
    done(
        fs,
        path,
        format!(
            "created {path}: {size} bytes, {prov:?}, change tracking {}",
            if tracking { "on" } else { "off" }
        ),
    )
}

pub fn disk_snapshot(fs: &Arc<Fs>, path: &str) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    let s = snapshot::ops::snapshot(store, &name).map_err(disk_err)?;
    let mut d = done(fs, path, s.said())?;
    d.change_id = s.change_id.map(|i| i.to_string());
    Ok(d)
}

pub fn disk_revert(fs: &Arc<Fs>, path: &str) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    snapshot::ops::revert(store, &name).map_err(disk_err)?;
    done(fs, path, "reverted to the last snapshot".into())
}

pub fn disk_clone(
    fs: &Arc<Fs>,
    path: &str,
    to: &str,
    prov: snapshot::Provisioning,
) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    let (dst_store, dst) = store_for(fs, to)?;
    let n = snapshot::ops::clone(store, &name, dst_store, &dst, prov).map_err(disk_err)?;
    done(fs, to, format!("cloned {path} to {to}: {n} bytes written"))
}

/// `raw` is a path on this machine (absolute: the agent's working
/// directory is not the caller's).
pub fn disk_import(
    fs: &Arc<Fs>,
    raw: &str,
    path: &str,
    prov: snapshot::Provisioning,
    adapter: &str,
) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    let n = snapshot::ops::import(Path::new(raw), store, &name, prov, adapter).map_err(disk_err)?;
    done(
        fs,
        path,
        format!("imported {raw} as {path}: {n} bytes written"),
    )
}

pub fn disk_export(fs: &Arc<Fs>, path: &str, raw: &str) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    let n = snapshot::ops::export(store, &name, Path::new(raw)).map_err(disk_err)?;
    done(
        fs,
        path,
        format!("exported {path} to {raw}: {n} bytes written, the rest holes"),
    )
}

pub fn disk_resize(fs: &Arc<Fs>, path: &str, size: u64) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    let n = snapshot::ops::resize(store, &name, size).map_err(disk_err)?;
    done(fs, path, format!("{path} is {n} bytes"))
}

/// Delete a disk and every file of its chain (refused while it is open
/// for writing anywhere, naming the holder).
pub fn disk_delete(fs: &Arc<Fs>, path: &str) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    snapshot::ops::delete(store, &name).map_err(disk_err)?;
    Ok(DiskDone {
        path: path.to_string(),
        said: format!("deleted {path} and every file of its chain"),
        depth: 0,
        change_id: None,
    })
}

/// `vmfs disk check`: what was found and repaired.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskCheck {
    pub path: String,
    pub layers: usize,
    pub problems: Vec<String>,
    pub repaired: Vec<String>,
    pub unrepairable: usize,
    #[serde(default)]
    pub notes: Vec<String>,
}

pub fn disk_check(fs: &Arc<Fs>, path: &str, repair: bool) -> Result<DiskCheck> {
    let (store, name) = store_for(fs, path)?;
    let r = snapshot::ops::check(store, &name, repair).map_err(disk_err)?;
    Ok(DiskCheck {
        path: path.to_string(),
        layers: r.layers,
        problems: r.problems,
        repaired: r.repaired,
        unrepairable: r.unrepairable,
        notes: r.notes,
    })
}

pub fn disk_consolidate(fs: &Arc<Fs>, path: &str, all: bool) -> Result<DiskDone> {
    crate::vm::refuse_while_backed_up(fs, path)?;
    let (store, name) = store_for(fs, path)?;
    let mut merged = 0;
    let mut n = 0;
    loop {
        merged += snapshot::ops::consolidate(store.clone(), &name).map_err(disk_err)?;
        n += 1;
        let depth = snapshot::Disk::open(store.clone(), &name, false)
            .map_err(disk_err)?
            .depth();
        if !all || depth == 0 {
            break;
        }
    }
    done(
        fs,
        path,
        format!("{n} snapshot(s) deleted, {merged} bytes merged"),
    )
}

/// Delete the snapshot whose frozen descriptor is `frozen` (beside disk
/// `path`) from a disk nobody is writing: the layer above it merged into
/// it. Nothing to do when it is no longer in the chain (said so).
pub fn disk_delete_snapshot(fs: &Arc<Fs>, path: &str, frozen: &str) -> Result<DiskDone> {
    let (store, name) = store_for(fs, path)?;
    snapshot::ops::finish_consolidation(store.clone(), &name).map_err(disk_err)?;
    let at = {
        let d = snapshot::Disk::open(store.clone(), &name, false).map_err(disk_err)?;
        d.layers
            .iter()
            .position(|l| l.name == frozen)
            .filter(|&k| k >= 1)
            .map(|k| (k, d.layers[k - 1].name.clone()))
    };
    let said = match at {
        None => format!("{frozen} was gone already"),
        Some((1, _)) => {
            let n = snapshot::ops::consolidate(store, &name).map_err(disk_err)?;
            format!("snapshot {frozen} deleted, {n} bytes merged")
        }
        Some((_, above)) => {
            let n = snapshot::merge::merge_down(store, &name, &above).map_err(disk_err)?;
            format!("snapshot {frozen} deleted, {n} bytes merged")
        }
    };
    done(fs, path, said)
}
