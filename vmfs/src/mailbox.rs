//! Requests between the hosts of a datastore through the datastore alone
//! (no network between them, no shared secret): what a backup proxy asks
//! of the host that runs a VM (snapshot its disks, delete the snapshots).
//!
//! Every host reads every heartbeat sector at each heartbeat already (to
//! judge who lives); the mailbox rides on that:
//!
//! 1. the asker writes the request's body as a file
//!    (`.vmfs-mail/ASKER-UUID-ID.req`), then sets in its **own** heartbeat
//!    sector: to whom (slot and that slot's generation), the request's
//!    number and kind;
//! 2. the asked host sees it at its next heartbeat, sets in its own sector
//!    "taken: slot, generation, number", and handles it on a thread of its
//!    own (the host's handler, [`Fs::set_mail_handler`]);
//! 3. it writes the answer (`.vmfs-mail/ASKER-UUID-ID.rep`: a status byte,
//!    then the body) and sets "answered";
//! 4. the asker, which reads the asked host's sector every few
//!    milliseconds meanwhile, reads the answer, clears its request and
//!    removes both files.
//!
//! The asker gives up with an error naming the host when the request is
//! not taken within a few heartbeats (the host is stopped, or too old to
//! know requests), or when the asked host's heartbeat stops (it died). A
//! request is handled once per asker generation and number, whoever reads
//! it again. docs/FORMAT.md has the sector's fields.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{FsError, Result};
use crate::file::LockMode;
use crate::format::{HostSlot, Mail, MAIL_ANSWERED, MAIL_TAKEN, SLOT_FREE};
use crate::volume::uuid_str;
use crate::Fs;

/// The directory of request and answer bodies.
pub const DIR: &str = ".vmfs-mail";
/// The longest body of a request or an answer.
pub const MAX_BODY: usize = 4 << 20;

/// A request as the asked host's handler gets it.
#[derive(Debug, Clone)]
pub struct Request {
    pub from_slot: u32,
    pub from_host: [u8; 16],
    /// The asker's slot generation.
    pub gen: u64,
    pub id: u64,
    pub kind: u32,
    pub body: Vec<u8>,
}

/// What a host does with the requests it is asked: the answer's body, or
/// an error (a message for the asker).
pub type Handler = Arc<dyn Fn(Request) -> std::result::Result<Vec<u8>, String> + Send + Sync>;

/// One host's mailbox state.
#[derive(Default)]
pub struct Mailbox {
    handler: Mutex<Option<Handler>>,
    /// Per asker (slot, generation): the last request number taken.
    taken: Mutex<HashMap<(u32, u64), u64>>,
    /// One request of this host at a time; true once this host's leftovers
    /// (bodies of requests an earlier run of it did not finish) are gone.
    asking: Mutex<bool>,
    next_id: AtomicU64,
}

/// A request's body (`req`) or answer (`rep`): named by the asker's UUID,
/// its slot generation (a new run of the asker numbers from 1 again) and
/// the request's number.
fn body_path(asker: &[u8; 16], gen: u64, id: u64, ext: &str) -> String {
    format!("{DIR}/{}-{gen}-{id}.{ext}", uuid_str(asker))
}

fn write_file(fs: &Arc<Fs>, path: &str, body: &[u8]) -> Result<()> {
    let _ = fs.unlink_path(path);
    let tmp = format!("{path}.new");
    let _ = fs.unlink_path(&tmp);
    let f = fs.create_file(&tmp, 0o600, LockMode::Exclusive)?;
    f.write_at(body, 0)?;
    f.flush()?;
    f.close()?;
    fs.rename_path(&tmp, path)
}

fn read_file(fs: &Arc<Fs>, path: &str) -> Result<Vec<u8>> {
    let f = fs.open_path(path, LockMode::ReadOnly)?;
    let len = f.len()?;
    if len > MAX_BODY as u64 {
        return Err(FsError::Invalid(format!(
            "{path}: {len} bytes, more than a request may hold"
        )));
    }
    let mut b = vec![0u8; len as usize];
    let n = f.read_at(&mut b, 0)?;
    b.truncate(n);
    Ok(b)
}

fn ensure_dir(fs: &Arc<Fs>) -> Result<()> {
    match fs.mkdir_path(DIR, 0o700) {
        Ok(()) => Ok(()),
        Err(e) if e.fault() == crate::Fault::Exists => Ok(()),
        Err(e) => Err(e),
    }
}

impl Fs {
    /// Handle the requests other hosts send this one with `h` (the host
    /// agent sets it; without one, requests are answered with an error).
    pub fn set_mail_handler(&self, h: Handler) {
        *self
            .mailbox
            .handler
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    /// At each heartbeat (housekeeping): take the requests addressed to
    /// this host among `slots` (as just read).
    pub(crate) fn deliver_mail(self: &Arc<Self>, slots: &[HostSlot]) {
        let Some(m) = self.member() else {
            return;
        };
        let me = m.slot;
        let my_gen = m.slot_state().generation;
        for (s, hs) in slots.iter().enumerate() {
            let s = s as u32;
            let mail = hs.mail;
            if s == me || hs.state == SLOT_FREE || mail.req_to != me + 1 || mail.req_gen != my_gen {
                continue;
            }
            {
                let mut t = self.mailbox.taken.lock().unwrap_or_else(|p| p.into_inner());
                let last = t.entry((s, hs.generation)).or_insert(0);
                if mail.req_id <= *last {
                    continue;
                }
                *last = mail.req_id;
            }
            let req = Request {
                from_slot: s,
                from_host: hs.host,
                gen: hs.generation,
                id: mail.req_id,
                kind: mail.req_kind,
                body: Vec::new(),
            };
            let asker_gen = hs.generation;
            if let Err(e) = m.update_mail(|x| {
                x.rep_to = s + 1;
                x.rep_gen = asker_gen;
                x.rep_id = req.id;
                x.rep_state = MAIL_TAKEN;
            }) {
                tracing::error!("taking request {} of slot {s}: {e}", req.id);
                continue;
            }
            tracing::info!(
                "request {} (kind {}) from host {} (slot {s}) taken",
                req.id,
                req.kind,
                uuid_str(&hs.host)
            );
            let fs = self.clone();
            let spawned = std::thread::Builder::new()
                .name("vmfs-mail".into())
                .spawn(move || fs.answer(req, asker_gen));
            if let Err(e) = spawned {
                tracing::error!("a thread for request of slot {s}: {e}");
            }
        }
    }

    fn answer(self: &Arc<Self>, mut req: Request, asker_gen: u64) {
        let handler = self
            .mailbox
            .handler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let out = match read_file(self, &body_path(&req.from_host, req.gen, req.id, "req")) {
            Err(e) => Err(format!("reading the request: {e}")),
            Ok(b) => {
                req.body = b;
                match handler {
                    Some(h) => h(req.clone()),
                    None => Err("this host handles no requests (it is not a host agent)".into()),
                }
            }
        };
        let mut file = Vec::new();
        match out {
            Ok(b) => {
                file.push(0u8);
                file.extend(b);
            }
            Err(e) => {
                file.push(1u8);
                file.extend(e.into_bytes());
            }
        }
        let path = body_path(&req.from_host, req.gen, req.id, "rep");
        if let Err(e) = write_file(self, &path, &file) {
            tracing::error!("writing the answer to request {}: {e}", req.id);
            return;
        }
        if let Some(m) = self.member() {
            let (slot, id) = (req.from_slot, req.id);
            let r = m.update_mail(|x| {
                if x.rep_to == slot + 1 && x.rep_gen == asker_gen && x.rep_id == id {
                    x.rep_state = MAIL_ANSWERED;
                }
            });
            if let Err(e) = r {
                tracing::error!("answering request {id}: {e}");
            }
        }
    }

    /// Ask the host in slot `to` to handle a request of `kind` with `body`;
    /// its answer's body. Errors name the host: not taken within `take`
    /// (stopped, or a host that knows no requests), its heartbeat stopped
    /// before it answered, not answered within `answer`, or its handler's
    /// error.
    pub fn ask(
        self: &Arc<Self>,
        to: u32,
        kind: u32,
        body: &[u8],
        take: Duration,
        answer: Duration,
    ) -> Result<Vec<u8>> {
        let m = self
            .member()
            .ok_or_else(|| FsError::Invalid("asking another host needs a mounted host".into()))?;
        if body.len() > MAX_BODY {
            return Err(FsError::Invalid("a request body over 4 MiB".into()));
        }
        let mut swept = self
            .mailbox
            .asking
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let vol = self.vol();
        let slots = crate::cluster::read_slots(&vol)?;
        let Some((target, _)) = slots.get(to as usize) else {
            return Err(FsError::Invalid(format!("there is no slot {to}")));
        };
        if target.state != crate::format::SLOT_LIVE || to == m.slot {
            return Err(FsError::Invalid(format!(
                "slot {to} holds no other live host"
            )));
        }
        let who = format!("host {} (slot {to})", uuid_str(&target.host));
        let gen = target.generation;
        ensure_dir(self)?;
        if !*swept {
            self.sweep_mail(&m.host, m.slot_state().generation);
            *swept = true;
        }
        let id = self.mailbox.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let my_gen = m.slot_state().generation;
        let req_path = body_path(&m.host, my_gen, id, "req");
        let rep_path = body_path(&m.host, my_gen, id, "rep");
        write_file(self, &req_path, body)?;
        m.update_mail(|x| {
            x.req_to = to + 1;
            x.req_gen = gen;
            x.req_id = id;
            x.req_kind = kind;
        })?;
        let r = self.wait_answer(
            m.slot,
            m.slot_state().generation,
            to,
            gen,
            id,
            &who,
            take,
            answer,
        );
        // The request is over whatever happened.
        if let Err(e) = m.update_mail(|x| {
            x.req_to = 0;
            x.req_gen = 0;
            x.req_id = 0;
            x.req_kind = 0;
        }) {
            tracing::warn!("clearing request {id}: {e}");
        }
        let _ = self.unlink_path(&req_path);
        let r = r.and_then(|()| read_file(self, &rep_path));
        let _ = self.unlink_path(&rep_path);
        let file = r?;
        match file.split_first() {
            Some((0, b)) => Ok(b.to_vec()),
            Some((_, e)) => Err(FsError::Invalid(format!(
                "{who} answered: {}",
                String::from_utf8_lossy(e)
            ))),
            None => Err(FsError::Invalid(format!("{who} wrote an empty answer"))),
        }
    }

    /// Remove the bodies and answers of requests an earlier run of host
    /// `me` left (it was killed while asking): at its first request.
    fn sweep_mail(&self, me: &[u8; 16], gen: u64) {
        let prefix = format!("{}-", uuid_str(me));
        let mine_now = format!("{}-{gen}-", uuid_str(me));
        let Ok(dir) = self.resolve(DIR) else {
            return;
        };
        let Ok(entries) = self.readdir(dir) else {
            return;
        };
        for e in entries {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            if name.starts_with(&prefix) && !name.starts_with(&mine_now) {
                if let Err(err) = self.unlink_path(&format!("{DIR}/{name}")) {
                    tracing::warn!("removing {DIR}/{name}, left by a request of this host: {err}");
                }
            }
        }
    }

    /// Wait until the host in slot `to` has answered request `id`.
    #[allow(clippy::too_many_arguments)]
    fn wait_answer(
        &self,
        me: u32,
        my_gen: u64,
        to: u32,
        gen: u64,
        id: u64,
        who: &str,
        take: Duration,
        answer: Duration,
    ) -> Result<()> {
        let m = self.member().expect("asked as a member");
        let lease = m.timeouts.lease;
        let poll = (m.timeouts.heartbeat / 4).max(Duration::from_millis(5));
        let start = Instant::now();
        let mut taken = false;
        let mut last = (Vec::new(), Instant::now());
        loop {
            m.check_lease()?;
            let slots = crate::cluster::read_slots(&self.vol())?;
            let (hs, sec) = &slots[to as usize];
            if hs.state != crate::format::SLOT_LIVE || hs.generation != gen {
                return Err(FsError::Invalid(format!(
                    "{who} is gone (its slot was freed or taken over) before answering request {id}"
                )));
            }
            if *sec != last.0 {
                last = (sec.clone(), Instant::now());
            } else if last.1.elapsed() >= lease {
                return Err(FsError::Invalid(format!(
                    "{who} stopped: its heartbeat has not changed for {} ms, and request {id} is unanswered",
                    lease.as_millis()
                )));
            }
            let mail: Mail = hs.mail;
            let mine = mail.rep_to == me + 1 && mail.rep_gen == my_gen && mail.rep_id == id;
            if mine && mail.rep_state == MAIL_ANSWERED {
                return Ok(());
            }
            if mine && !taken {
                taken = true;
                tracing::info!(
                    "{who} took request {id} after {} ms",
                    start.elapsed().as_millis()
                );
            }
            // The host's sector shows one request it took: another asker's
            // taken in the same heartbeat may hide ours. Then the answer
            // file says it (looked for only past `take`: a directory lookup).
            let shadowed = !mine && mail.rep_to != 0;
            if (taken || shadowed)
                && !mine
                && start.elapsed() > take
                && self.resolve(&body_path(&m.host, my_gen, id, "rep")).is_ok()
            {
                return Ok(());
            }
            let take_limit = if shadowed { take * 5 } else { take };
            if !taken && start.elapsed() > take_limit {
                return Err(FsError::Invalid(format!(
                    "{who} did not take request {id} within {} ms: it is stopped, or runs a version that knows no requests",
                    take_limit.as_millis()
                )));
            }
            if start.elapsed() > answer {
                return Err(FsError::Invalid(format!(
                    "{who} did not answer request {id} within {} s",
                    answer.as_secs()
                )));
            }
            std::thread::sleep(poll);
        }
    }
}
