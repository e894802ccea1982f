//! Host membership through the disk: heartbeat slots, liveness judged on
//! this host's monotonic clock, recovery of dead hosts, self-fencing.
//!
//! Several hosts mount a datastore at once. A mounting host watches every
//! slot in use for one lease: a slot that changes is a live host (it will
//! share the datastore with it); one that does not is a dead host, whose
//! journal is replayed before its slot is freed with a new generation (which
//! also breaks every lock it held: locks name a slot *and* its generation).
//! Once mounted, each host keeps watching ([`Monitor`]) and recovers hosts
//! that die while it runs; two survivors racing for one dead host settle it
//! on the slot's sector, and exactly one replays.
//!
//! Slot changes use compare-and-write of the sector where the LUN has it;
//! elsewhere a write, a wait longer than any concurrent writer's window, and
//! a read-back (sanlock's delta lease, simplified).
//!
//! Timeouts derive from the lease (one place, [`Timeouts`]): the host stops
//! writing once its last renewal is older than half the lease, so the other
//! half is margin before any observer, waiting a full lease from when *it*
//! first saw the slot's value, may call the host dead. Wall clocks of
//! different hosts are never compared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lun::{Lease, Lun};

use crate::error::{FsError, Result};
use crate::format::*;
use crate::volume::{uuid_str, Volume};

/// Heartbeat and lease timing, all derived here.
///
/// Defaults: heartbeat every 1 s, lease 8 s (VMFS: ~3 s heartbeat, dead
/// after 16 s; sanlock: 20 s renewal, dead after 80-140 s). A host renews 4
/// times within its 4 s safe window, so one slow I/O (up to the I/O timeout
/// of lease/4 = 2 s) does not fence it; an observer declares it dead after
/// 8 s without change, 4 s after it stopped writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub heartbeat: Duration,
    pub lease: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            heartbeat: Duration::from_millis(1000),
            lease: Duration::from_millis(8000),
        }
    }
}

impl Timeouts {
    pub fn new(heartbeat_ms: Option<u64>, lease_ms: Option<u64>) -> Result<Timeouts> {
        let d = Timeouts::default();
        let lease = lease_ms.map_or(d.lease, Duration::from_millis);
        let heartbeat = heartbeat_ms.map_or(lease / 8, Duration::from_millis);
        let t = Timeouts { heartbeat, lease };
        if t.heartbeat.is_zero() || t.heartbeat * 2 > t.safe_window() {
            return Err(FsError::Invalid(format!(
                "heartbeat {} ms and lease {} ms: the heartbeat must be at most a quarter of the lease, so that a host renews at least twice before it must stop writing",
                t.heartbeat.as_millis(),
                t.lease.as_millis()
            )));
        }
        Ok(t)
    }
    /// The longest one I/O may take before it counts as failed.
    pub fn io(&self) -> Duration {
        self.lease / 4
    }
    /// How this host opens LUNs: network backends that retry on their own
    /// (iSCSI) give up on a command after [`Timeouts::io`], so no write of a
    /// host can land after it has fenced itself.
    pub fn lun_options(&self) -> lun::OpenOptions {
        lun::OpenOptions {
            io_timeout: Some(self.io()),
        }
    }
    /// How long after a renewal started this host may still write.
    pub fn safe_window(&self) -> Duration {
        self.lease / 2
    }
}

fn region(vol: &Volume) -> u64 {
    vol.header.heartbeat_off / MD as u64
}

/// How a slot change must be confirmed on a LUN without compare-and-write.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Taking ownership (claim, recovery): write, wait two I/O timeouts,
    /// read back: a concurrent claimant's write would be visible by then.
    Wait,
    /// Changing a slot this host owns (renewal, journal location): nobody
    /// else writes it while its heartbeat moves, so read-check-write.
    Owned,
}

/// Replace a slot's sector `expect` by `new` atomically: compare-and-write
/// of the LUN block holding it (retrying when only a neighbour slot moved),
/// or, without compare-and-write, read-check-write (and for [`Confirm::Wait`]
/// wait and read back). Ok(false): the slot did not hold `expect`.
fn swap_sector(
    lun: &dyn Lun,
    off: u64,
    expect: &[u8],
    new: &[u8],
    t: &Timeouts,
    confirm: Confirm,
) -> Result<bool> {
    if lun.has_compare_and_write() {
        let written = locking::caw_in_block(lun, off, expect.len(), |cur| {
            Ok::<_, FsError>(if cur == expect {
                locking::Decision::Write(new.to_vec())
            } else {
                locking::Decision::Keep
            })
        })?;
        // A claim is made durable; a renewal need only be seen (flushing a
        // busy LUN file can take longer than the safe window, and would
        // fence a healthy host).
        if written && confirm == Confirm::Wait {
            lun.flush()?;
        }
        return Ok(written);
    }
    let mut cur = vec![0u8; expect.len()];
    lun.read_at(&mut cur, off)?;
    if cur != expect {
        return Ok(false);
    }
    lun.write_at(new, off)?;
    if confirm == Confirm::Owned {
        return Ok(true);
    }
    lun.flush()?;
    // Any host that read the old value before our write writes within one
    // I/O timeout; after two, its write would be visible here.
    std::thread::sleep(t.io() * 2);
    lun.read_at(&mut cur, off)?;
    Ok(cur == new)
}

/// What this host knows of its own slot; shared with the heartbeat thread.
struct Own {
    slot: u32,
    hs: HostSlot,
    sector: Vec<u8>,
}

/// This host's membership: its slot, its lease, its heartbeat thread.
pub struct Member {
    pub slot: u32,
    pub host: [u8; 16],
    pub lease: Arc<Lease>,
    pub timeouts: Timeouts,
    lun: Arc<dyn Lun>,
    off: u64,
    region: u64,
    own: Arc<Mutex<Own>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// This host's threads waiting for the volume lock.
    wanting: Mutex<u32>,
    /// File-block clusters this host's threads wait for, oldest first.
    clusters: Mutex<Vec<u64>>,
}

/// What joining found and did.
pub struct Joined {
    pub member: Member,
    /// Journals of dead hosts replayed: (slot, report).
    pub replays: Vec<(u32, journal::Report)>,
    /// Whether a slot was recovered while joining.
    pub unclean: bool,
    /// Dead hosts found while joining, for the new member to recover under
    /// the volume lock.
    pub dead: Vec<Dead>,
}

pub(crate) type Slots = Vec<(HostSlot, Vec<u8>)>;

/// Every heartbeat slot, decoded, with its raw sector.
pub(crate) fn read_slots(vol: &Volume) -> Result<Slots> {
    vol.read_slots()?
        .into_iter()
        .map(|(hs, sec)| Ok((hs?, sec)))
        .collect()
}

/// Watch every slot in use for one lease on this host's clock. Returns the
/// slots as first read and the busy ones that did not change (dead hosts).
/// A slot that changes is a live host: with `refuse` (`what` ... `tail`
/// say what that means for the caller) that is an error; it always is when
/// the live host has this host's UUID (`me`).
fn watch(
    vol: &Volume,
    me: Option<[u8; 16]>,
    t: &Timeouts,
    refuse: Option<(&str, &str)>,
) -> Result<(Slots, Vec<u32>)> {
    let first = read_slots(vol)?;
    let mut busy: Vec<u32> = (0..vol.header.max_hosts)
        .filter(|&s| first[s as usize].0.state != SLOT_FREE)
        .collect();
    if busy.is_empty() {
        return Ok((first, busy));
    }
    // Liveness by observation on our own clock: a slot that does not
    // change for a whole lease is dead.
    tracing::info!(
        "{} slot(s) in use ({busy:?}): watching their heartbeats for {} ms",
        busy.len(),
        t.lease.as_millis()
    );
    let start = Instant::now();
    while start.elapsed() < t.lease && !busy.is_empty() {
        std::thread::sleep(
            t.heartbeat
                .min(t.lease - start.elapsed().min(t.lease))
                .max(Duration::from_millis(1)),
        );
        let now = read_slots(vol)?;
        let mut still = Vec::new();
        for &s in &busy {
            let (was, cur) = (&first[s as usize].1, &now[s as usize]);
            if *was == cur.1 {
                still.push(s);
                continue;
            }
            let who = uuid_str(&cur.0.host);
            if cur.0.state == SLOT_LIVE && Some(cur.0.host) == me {
                return Err(FsError::Invalid(format!(
                    "host {who} (slot {s}) is live with the same host UUID as this one: another process with this identity, or a copy of its state directory"
                )));
            }
            if let Some((what, tail)) = refuse {
                if cur.0.state != SLOT_LIVE {
                    return Err(FsError::Invalid(format!(
                        "host {who} (slot {s}) is being recovered by another host right now; try again"
                    )));
                }
                return Err(FsError::Invalid(format!(
                    "{what} host {who} (slot {s}), whose heartbeat is live{tail}"
                )));
            }
            tracing::info!("host {who} (slot {s}) is live: sharing the datastore with it");
        }
        busy = still;
    }
    let states: Vec<u32> = first.iter().map(|(h, _)| h.state).collect();
    let silent = busy.clone();
    busy.retain(|&s| !replayer_alive(&first[s as usize].0, s, &states, &silent));
    Ok((first, busy))
}

/// The slots of live hosts, judged by watching every slot in use for one
/// lease (dead ones are not listed).
pub fn live_slots(vol: &Volume, t: &Timeouts) -> Result<Vec<u32>> {
    let (first, dead) = watch(vol, None, t, None)?;
    Ok((0..vol.header.max_hosts)
        .filter(|s| first[*s as usize].0.state != SLOT_FREE && !dead.contains(s))
        .collect())
}

/// For offline work (fsck --repair, extend): Ok when no host is live (dead
/// ones may remain: their journals are replayed by the caller's open).
pub fn ensure_idle(vol: &Volume, t: &Timeouts, work: &str) -> Result<()> {
    watch(
        vol,
        None,
        t,
        Some((
            "the datastore is mounted by",
            &format!("; unmount it before {work}"),
        )),
    )?;
    Ok(())
}

/// Recover the dead host in slot `s`, whose sector was `sec` (`hs` decoded)
/// unchanged for a lease: mark it being replayed by `replayer`, replay its
/// journal, free the slot with generation + 1 (its locks are then stale).
/// Ok(None) when another host changed the slot first (it recovers it, or
/// the host was not dead).
///
/// `claim`: [`Confirm::Owned`] when the caller holds the volume lock (every
/// other recoverer needs it too: a read-check-write is enough);
/// [`Confirm::Wait`] (delta lease) when it cannot take it.
#[allow(clippy::too_many_arguments)]
pub fn recover(
    vol: &Volume,
    s: u32,
    hs: &HostSlot,
    sec: &[u8],
    replayer: u32,
    t: &Timeouts,
    why: &str,
    claim: Confirm,
) -> Result<Option<Option<journal::Report>>> {
    let lun = vol.luns[0].clone();
    let mut rec = hs.clone();
    rec.state = SLOT_REPLAYING;
    rec.replayer = replayer;
    let enc = rec.encode(region(vol), s);
    if !swap_sector(&*lun, vol.slot_off(s), sec, &enc, t, claim)? {
        tracing::info!("slot {s} changed before this host could recover it: another host is on it");
        return Ok(None);
    }
    tracing::warn!(
        "host {} (slot {s}, generation {}) {why}; replaying its journal",
        uuid_str(&hs.host),
        hs.generation,
    );
    let mut report = None;
    if hs.journal != 0 {
        let r = crate::journals::journal_region(vol, hs.journal, hs.journal_blocks, s)?;
        let rep = journal::replay(&r, &vol.header.uuid, vol)?;
        tracing::info!("journal of slot {s}: {rep}");
        report = Some(rep);
    }
    let mut free = rec.clone();
    free.state = SLOT_FREE;
    free.replayer = 0;
    free.generation += 1;
    let fenc = free.encode(region(vol), s);
    // Nobody else writes a slot this live host is replaying (observers
    // judge it by this host's heartbeat), so no delta-lease wait here.
    if !swap_sector(&*lun, vol.slot_off(s), &enc, &fenc, t, Confirm::Owned)? {
        return Err(FsError::Invalid(format!(
            "heartbeat slot {s} changed while this host was recovering it"
        )));
    }
    lun.flush()?;
    tracing::info!(
        "slot {s} is free again (generation {}): the locks host {} held are released",
        free.generation,
        uuid_str(&hs.host)
    );
    Ok(Some(report))
}

/// Whether a lock holder is the current incarnation of its slot: the slot
/// has that generation and is not free. A slot being replayed still holds.
pub fn is_current(slots: &[HostSlot], h: &locking::Holder) -> bool {
    slots
        .get(h.slot as usize)
        .is_some_and(|s| s.generation == h.generation && s.state != SLOT_FREE)
}

/// Every slot, decoded (an undecodable one is an error).
pub fn slot_table(vol: &Volume) -> Result<Vec<HostSlot>> {
    Ok(read_slots(vol)?.into_iter().map(|(h, _)| h).collect())
}

/// What a mounted host keeps watching: every other slot's sector and when
/// (on this host's clock) it last changed.
#[derive(Default)]
pub struct Monitor {
    seen: HashMap<u32, (Vec<u8>, Instant)>,
    /// Every slot as the last [`Monitor::observe`] read it.
    pub last: Vec<HostSlot>,
}

/// A dead host found by [`Monitor::observe`].
pub struct Dead {
    pub slot: u32,
    pub hs: HostSlot,
    pub sector: Vec<u8>,
    pub silent: Duration,
}

impl Monitor {
    /// Read the slots once: returns whether any other host is in a slot,
    /// and the hosts whose sectors have not changed for a lease.
    pub fn observe(&mut self, vol: &Volume, me: u32, t: &Timeouts) -> Result<(bool, Vec<Dead>)> {
        let now = Instant::now();
        let mut others = false;
        let mut dead = Vec::new();
        let slots = read_slots(vol)?;
        self.last = slots.iter().map(|(h, _)| h.clone()).collect();
        let states: Vec<u32> = slots.iter().map(|(h, _)| h.state).collect();
        for (s, (hs, sec)) in slots.into_iter().enumerate() {
            let s = s as u32;
            if s == me || hs.state == SLOT_FREE {
                self.seen.remove(&s);
                continue;
            }
            others = true;
            match self.seen.get(&s) {
                Some((was, since)) if *was == sec => {
                    let silent = now.duration_since(*since);
                    if silent >= t.lease {
                        dead.push(Dead {
                            slot: s,
                            hs,
                            sector: sec,
                            silent,
                        });
                    }
                }
                _ => {
                    self.seen.insert(s, (sec, now));
                }
            }
        }
        // A slot being replayed by a live host is not dead, however long
        // the replay takes: only its replayer's death makes it so.
        let silent: Vec<u32> = dead.iter().map(|d| d.slot).collect();
        dead.retain(|d| !replayer_alive(&d.hs, d.slot, &states, &silent));
        Ok((others, dead))
    }
}

/// Whether slot `s`, being replayed, has a replayer that still lives: another
/// slot, in use, not among the `silent` (dead) ones.
fn replayer_alive(hs: &HostSlot, s: u32, states: &[u32], silent: &[u32]) -> bool {
    hs.state == SLOT_REPLAYING
        && hs.replayer != s
        && states
            .get(hs.replayer as usize)
            .is_some_and(|&st| st != SLOT_FREE)
        && !silent.contains(&hs.replayer)
}

/// The free slot a host joining as `host` claims, in this order: its own
/// (the slot it left, with its journal); any slot with a journal (a host that
/// left, or a dead host recovered: joining then needs no free space, which
/// is what lets a full datastore be mounted again, see FORMAT.md); a slot
/// never used; any free slot.
fn pick_slot(now: &Slots, host: [u8; 16]) -> Option<u32> {
    let free = |s: &usize| now[*s].0.state == SLOT_FREE;
    let all = 0..now.len();
    all.clone()
        .filter(free)
        .find(|&s| now[s].0.host == host && now[s].0.journal != 0)
        .or_else(|| all.clone().filter(free).find(|&s| now[s].0.journal != 0))
        .or_else(|| all.clone().filter(free).find(|&s| now[s].0.host == [0; 16]))
        .or_else(|| all.clone().find(free))
        .map(|s| s as u32)
}

/// Join the volume as host `host`: judge the other slots, recover dead
/// hosts, share with live ones, claim a slot, start the heartbeat.
pub fn join(vol: &Volume, host: [u8; 16], t: Timeouts) -> Result<Joined> {
    let n = vol.header.max_hosts;
    let lun = vol.luns[0].clone();
    let (first, dead) = watch(vol, Some(host), &t, None)?;
    let mut replays = Vec::new();
    let mut now = read_slots(vol)?;
    let live = (0..n)
        .filter(|&s| now[s as usize].0.state != SLOT_FREE && !dead.contains(&s))
        .count();
    // A slot that has a journal never needs free space to join (see
    // `pick_slot`). When none is free but a dead host's slot has one, that
    // slot is freed first: by this host when no host lives (delta lease,
    // as any host may), else by the live hosts, which recover dead hosts
    // under the volume lock within about a lease: this host waits for them
    // (bounded), rather than race them for the slot.
    let has_journal =
        |now: &Slots, s: Option<u32>| s.is_some_and(|s| now[s as usize].0.journal != 0);
    // Recover dead slot `s` here, before claiming (delta lease): only when
    // no host lives to do it under the volume lock.
    let recover_here = |s: u32, replays: &mut Vec<(u32, journal::Report)>| -> Result<Slots> {
        let (hs, sec) = &first[s as usize];
        let why = format!(
            "stopped without unmounting: no heartbeat for {} ms",
            t.lease.as_millis()
        );
        if let Some(Some(rep)) = recover(vol, s, hs, sec, s, &t, &why, Confirm::Wait)? {
            replays.push((s, rep));
        }
        read_slots(vol)
    };
    // The slot whose journal this host may reuse once a live host has freed
    // it: a dead host's, or one a live host is recovering right now (its
    // slot changed while this host watched, so `watch` did not call it dead).
    let replaying = |now: &Slots| {
        (0..n)
            .find(|&s| now[s as usize].0.state == SLOT_REPLAYING && now[s as usize].0.journal != 0)
    };
    if !has_journal(&now, pick_slot(&now, host)) {
        let dead_with_journal = dead
            .iter()
            .copied()
            .find(|&s| first[s as usize].0.journal != 0);
        if let (Some(s), 0) = (dead_with_journal, live) {
            now = recover_here(s, &mut replays)?;
        } else if let Some(s) = dead_with_journal.or_else(|| replaying(&now)) {
            tracing::info!(
                "no free heartbeat slot has a journal: waiting for a live host to recover slot {s} (a host that stopped), whose journal this host can reuse"
            );
            let start = Instant::now();
            while start.elapsed() < t.lease * 3 && !has_journal(&now, pick_slot(&now, host)) {
                std::thread::sleep(t.heartbeat);
                now = read_slots(vol)?;
            }
        }
    }
    if pick_slot(&now, host).is_none() && live == 0 && !dead.is_empty() {
        // Every slot is held by a dead host and no host lives to recover
        // them under the volume lock: recover one here.
        now = recover_here(dead[0], &mut replays)?;
    }
    // Claim a free slot; another mounting host may take the same one at
    // the same moment: then look again (a few times).
    let mut tries = 0;
    let (slot, hs, sector) = loop {
        let slot = pick_slot(&now, host).ok_or_else(|| {
            FsError::Invalid(format!(
                "all {n} host slots are in use ({} by hosts that stopped and are being recovered: try again in a few seconds)",
                dead.len()
            ))
        })?;
        let (old, old_sec) = &now[slot as usize];
        let mut hs = old.clone();
        hs.state = SLOT_LIVE;
        hs.replayer = 0;
        hs.host = host;
        hs.generation += 1;
        hs.heartbeat = 0;
        // Requests and answers of the slot's last host are not this one's.
        hs.mail = Mail::default();
        let sector = hs.encode(region(vol), slot);
        if swap_sector(
            &*lun,
            vol.slot_off(slot),
            old_sec,
            &sector,
            &t,
            Confirm::Wait,
        )? {
            break (slot, hs, sector);
        }
        tries += 1;
        if tries >= 8 {
            return Err(FsError::Invalid(format!(
                "other hosts kept claiming the free heartbeat slots at the same moment (last: slot {slot}); try again"
            )));
        }
        tracing::info!(
            "another host claimed heartbeat slot {slot} at the same moment: trying another"
        );
        now = read_slots(vol)?;
    };
    // Dead hosts left for this host to recover once it is a member.
    let dead: Vec<Dead> = dead
        .iter()
        .filter(|&&s| s != slot && now[s as usize].1 == first[s as usize].1)
        .map(|&s| Dead {
            slot: s,
            hs: first[s as usize].0.clone(),
            sector: first[s as usize].1.clone(),
            silent: t.lease,
        })
        .collect();
    lun.flush()?;
    tracing::info!(
        "joined as host {} in slot {slot} (generation {}), heartbeat {} ms, lease {} ms",
        uuid_str(&host),
        hs.generation,
        t.heartbeat.as_millis(),
        t.lease.as_millis()
    );
    let lease = Lease::new(t.safe_window());
    let m = Member {
        slot,
        host,
        lease,
        timeouts: t,
        lun: lun.clone(),
        off: vol.slot_off(slot),
        region: region(vol),
        own: Arc::new(Mutex::new(Own { slot, hs, sector })),
        stop: Arc::new(AtomicBool::new(false)),
        thread: Mutex::new(None),
        wanting: Mutex::new(0),
        clusters: Mutex::new(Vec::new()),
    };
    m.start();
    Ok(Joined {
        member: m,
        unclean: !replays.is_empty(),
        replays,
        dead,
    })
}

impl Member {
    fn start(&self) {
        let (lun, off, region, own, stop, lease, t) = (
            self.lun.clone(),
            self.off,
            self.region,
            self.own.clone(),
            self.stop.clone(),
            self.lease.clone(),
            self.timeouts,
        );
        let h = std::thread::Builder::new()
            .name("vmfs-heartbeat".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) && !lease.is_fenced() {
                    std::thread::sleep(t.heartbeat);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let started = Instant::now();
                    let mut o = own.lock().unwrap_or_else(|p| p.into_inner());
                    // A host that went silent past its safe window (stalled,
                    // SIGSTOP) may already be being recovered: it must not
                    // write its slot again, or on a LUN without
                    // compare-and-write its renewal could land over the
                    // recoverer's claim. It stays fenced.
                    if let Err(why) = lease.check() {
                        tracing::error!(
                            "host {} (slot {}): stops writing to the datastore and no longer renews its heartbeat: {why}",
                            uuid_str(&o.hs.host),
                            o.slot
                        );
                        break;
                    }
                    let mut next = o.hs.clone();
                    next.heartbeat += 1;
                    let enc = next.encode(region, o.slot);
                    match swap_sector(&*lun, off, &o.sector, &enc, &t, Confirm::Owned) {
                        Ok(true) => {
                            lease.renewed(started);
                            o.hs = next;
                            o.sector = enc;
                        }
                        Ok(false) => {
                            lease.fence(&format!(
                                "heartbeat slot {} was taken over by another host (this host was presumed dead)",
                                o.slot
                            ));
                            break;
                        }
                        Err(e) => tracing::warn!("heartbeat renewal of slot {} failed: {e}", o.slot),
                    }
                }
            })
            .expect("spawn the heartbeat thread");
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    /// Change this host's slot (journal location) under the heartbeat's lock.
    pub fn update(&self, f: impl FnOnce(&mut HostSlot)) -> Result<()> {
        self.change(f, true)
    }

    /// Rewrite this host's own sector with `f` applied (read-check-write,
    /// or compare-and-write), flushed if `flush`. A sector that is no
    /// longer what this host wrote means another host took the slot over:
    /// fence.
    fn change(&self, f: impl FnOnce(&mut HostSlot), flush: bool) -> Result<()> {
        let mut o = self.own.lock().unwrap_or_else(|p| p.into_inner());
        self.check_lease()?;
        let mut next = o.hs.clone();
        f(&mut next);
        let enc = next.encode(self.region, o.slot);
        if !swap_sector(
            &*self.lun,
            self.off,
            &o.sector,
            &enc,
            &self.timeouts,
            Confirm::Owned,
        )? {
            self.lease.fence("heartbeat slot changed under this host");
            return Err(FsError::Invalid(format!(
                "heartbeat slot {} was taken over by another host",
                o.slot
            )));
        }
        if flush {
            self.lun.flush()?;
        }
        o.hs = next;
        o.sector = enc;
        Ok(())
    }

    /// Change the mailbox fields of this host's sector (not flushed:
    /// other hosts read the LUN; a request does not outlive a crash).
    pub fn update_mail(&self, f: impl FnOnce(&mut Mail)) -> Result<()> {
        self.change(|hs| f(&mut hs.mail), false)
    }

    /// Err (fenced, EIO) once this host may no longer write.
    pub fn check_lease(&self) -> Result<()> {
        self.lease.check().map_err(|why| {
            FsError::Lun(lun::LunError::Fenced {
                lun: self.lun.name().to_string(),
                why,
            })
        })
    }

    /// This host as a lock holder: its slot and the slot's generation.
    pub fn holder(&self) -> locking::Holder {
        locking::Holder {
            slot: self.slot,
            generation: self.slot_state().generation,
        }
    }

    /// One more of this host's threads waits for the volume lock: the first
    /// sets the wants bit in this host's heartbeat sector (not flushed), the
    /// last to stop ([`Member::unwant_volume_lock`]) clears it. Counted, so
    /// one thread that got it never hides another that still waits.
    pub fn want_volume_lock(&self) -> Result<()> {
        let mut n = self.wanting.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            self.change(|hs| hs.wants = 1, false)?;
        }
        *n += 1;
        Ok(())
    }

    /// The end of a [`Member::want_volume_lock`].
    pub fn unwant_volume_lock(&self) -> Result<()> {
        let mut n = self.wanting.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.change(|hs| hs.wants = 0, false)?;
        }
        Ok(())
    }

    /// One more wait for file-block cluster `addr`. The slot has room for
    /// one request: it shows the oldest of this host's requests still
    /// waiting, so no request is lost when another thread's ends.
    pub fn want_cluster(&self, addr: u64) -> Result<()> {
        let mut w = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        w.push(addr);
        self.show_cluster(&w)
    }

    /// The end of a [`Member::want_cluster`].
    pub fn unwant_cluster(&self, addr: u64) -> Result<()> {
        let mut w = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.iter().position(|&a| a == addr) {
            w.remove(i);
        }
        self.show_cluster(&w)
    }

    fn show_cluster(&self, w: &[u64]) -> Result<()> {
        let addr = w.first().copied().unwrap_or(0);
        if self.slot_state().want_cluster == addr {
            return Ok(());
        }
        self.change(|hs| hs.want_cluster = addr, false)
    }

    /// Write this host's Disk Paxos ballot block (in its heartbeat sector).
    /// Not flushed: other hosts read the LUN, and a ballot need not
    /// survive a power loss (every holder's slot is recovered after one).
    pub fn set_ballot(&self, d: &locking::Dblock) -> Result<()> {
        self.change(|hs| hs.ballot = *d, false)
    }

    /// The slot as this host last wrote it.
    pub fn slot_state(&self) -> HostSlot {
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hs
            .clone()
    }

    /// Stop the heartbeat (joins its thread).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }

    /// Leave cleanly: stop the heartbeat, mark the slot free (keeping its
    /// journal for the next mount of this host).
    pub fn leave(&self) -> Result<()> {
        self.stop();
        self.update(|hs| {
            hs.state = SLOT_FREE;
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The hosts' ballot blocks for the volume lock's Disk Paxos: each in its
/// host's heartbeat sector.
pub struct Ballots<'a> {
    pub vol: &'a Volume,
    pub member: &'a Member,
}

impl locking::BallotBox for Ballots<'_> {
    fn write_mine(&self, d: &locking::Dblock) -> locking::Result<()> {
        self.member.set_ballot(d).map_err(|e| match e {
            FsError::Lun(l) => locking::LockError::Lun(l),
            e => locking::LockError::Corrupt {
                lun: self.vol.luns[0].name().to_string(),
                offset: self.vol.slot_off(self.member.slot),
                reason: e.to_string(),
            },
        })
    }
    fn read_all(&self) -> locking::Result<Vec<locking::Dblock>> {
        let slots = read_slots(self.vol).map_err(|e| match e {
            FsError::Lun(l) => locking::LockError::Lun(l),
            e => locking::LockError::Corrupt {
                lun: self.vol.luns[0].name().to_string(),
                offset: self.vol.header.heartbeat_off,
                reason: e.to_string(),
            },
        })?;
        Ok(slots.into_iter().map(|(h, _)| h.ballot).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_being_replayed_lives_as_long_as_its_replayer() {
        let hs = HostSlot {
            state: SLOT_REPLAYING,
            replayer: 2,
            ..Default::default()
        };
        let states = [SLOT_LIVE, SLOT_REPLAYING, SLOT_LIVE];
        assert!(replayer_alive(&hs, 1, &states, &[1]));
        // The replayer is silent too, or gone: the replay must be redone.
        assert!(!replayer_alive(&hs, 1, &states, &[1, 2]));
        assert!(!replayer_alive(
            &hs,
            1,
            &[SLOT_LIVE, SLOT_REPLAYING, SLOT_FREE],
            &[1]
        ));
        // Replayed by "itself" (recovered at a mount, before a slot was had).
        let own = HostSlot {
            replayer: 1,
            ..hs.clone()
        };
        assert!(!replayer_alive(&own, 1, &states, &[1]));
        // A live slot is judged by its own heartbeat only.
        let live = HostSlot {
            state: SLOT_LIVE,
            ..hs
        };
        assert!(!replayer_alive(&live, 1, &states, &[1]));
    }

    #[test]
    fn timeouts_derive_from_the_lease() {
        let t = Timeouts::default();
        assert_eq!(t.io(), Duration::from_secs(2));
        assert_eq!(t.safe_window(), Duration::from_secs(4));
        let t = Timeouts::new(None, Some(800)).unwrap();
        assert_eq!(t.heartbeat, Duration::from_millis(100));
        assert!(Timeouts::new(Some(300), Some(800)).is_err());
        assert!(Timeouts::new(Some(0), None).is_err());
    }
}
