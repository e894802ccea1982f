//! Prune and garbage collection. Prune forgets backups by retention;
//! collection finds the chunks that only forgotten backups (and killed
//! writers) referenced, *condemns* them, and deletes them in a *sweep*
//! that every live writer has acknowledged (see [`crate::session`]).
//!
//! The work follows what changed, not the repository's size: candidates
//! come from the indexes of the backups forgotten and the intent logs of
//! dead writers, never from listing or touching every chunk; the live
//! set is read only for the candidates, from the surviving indexes.

use std::collections::{BTreeMap, HashSet};

use crate::blob::{self, Kind};
use crate::error::{BackupError, Result};
use crate::index::{Digest, Index, ZERO};
use crate::repo::{chunk_key, Listed, Repo};
use crate::session::{put_list, read_list, read_record, SessionRecord};
use crate::util::{civil, hex, random_bytes, stamp, unix_now};

#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub keep_last: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }
}

#[derive(Debug, Default)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub forgotten: Vec<String>,
    /// Chunks condemned by this run.
    pub condemned: usize,
    pub swept: Vec<SweepReport>,
}

#[derive(Debug, Default)]
pub struct SweepReport {
    pub list: String,
    pub deleted: usize,
    pub freed: u64,
    /// Kept because a backup references them again (or a writer rescued them).
    pub kept: usize,
    /// Not swept: the live session that has not yet acknowledged the list.
    pub waiting_for: Option<String>,
}

/// When a backup started, from its ID (`NAME/YYYYMMDDTHHMMSSZ-RAND`).
pub fn started_of(id: &str) -> Option<i64> {
    let s = id.split('/').nth(1)?;
    let n = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0, 4)?,
        n(4, 6)?,
        n(6, 8)?,
        n(9, 11)?,
        n(11, 13)?,
        n(13, 15)?,
    );
    // Days from civil (inverse of util::civil).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86400 + h * 3600 + mi * 60 + se)
}

/// Which backups of each name to keep: the union of the rules, each
/// counting the newest backup of each of its last N periods (restic's and
/// PBS's reading of them).
pub fn select(all: &[Listed], r: &Retention) -> (Vec<String>, Vec<String>) {
    let mut by_name: BTreeMap<&str, Vec<&Listed>> = BTreeMap::new();
    for l in all {
        by_name.entry(&l.name).or_default().push(l);
    }
    let (mut keep, mut forget) = (Vec::new(), Vec::new());
    for (_, mut v) in by_name {
        v.sort_by(|a, b| b.id.cmp(&a.id)); // newest first
        let mut kept: HashSet<&str> = HashSet::new();
        if let Some(n) = r.keep_last {
            kept.extend(v.iter().take(n).map(|l| l.id.as_str()));
        }
        let period = |l: &Listed, f: &dyn Fn(i64) -> i64| {
            f(started_of(&l.id).unwrap_or(0).div_euclid(86400))
        };
        let rules: [(Option<usize>, &dyn Fn(i64) -> i64); 3] = [
            (r.keep_daily, &|d| d),
            (r.keep_weekly, &|d| (d + 3).div_euclid(7)), // ISO weeks start on Monday
            (r.keep_monthly, &|d| {
                let (y, m, _) = civil(d);
                y * 12 + m as i64
            }),
        ];
        for (n, f) in rules {
            let Some(n) = n else { continue };
            let mut seen = HashSet::new();
            for l in &v {
                if seen.len() >= n {
                    break;
                }
                if seen.insert(period(l, f)) {
                    kept.insert(&l.id);
                }
            }
        }
        for l in v {
            if kept.contains(l.id.as_str()) {
                keep.push(l.id.clone());
            } else {
                forget.push(l.id.clone());
            }
        }
    }
    keep.sort();
    forget.sort();
    (keep, forget)
}

/// The chunks a backup references, from its index objects (read directly,
/// so a backup whose manifest is damaged can still be forgotten cleanly).
fn referenced(repo: &Repo, id: &str) -> Result<HashSet<Digest>> {
    let mut out = HashSet::new();
    for e in repo.backend.list(&format!("backups/{id}/"))? {
        if !e.key.ends_with(".index") {
            continue;
        }
        let what = format!("{}/{}", repo.describe(), e.key);
        let plain = repo.get_object(Kind::Index, &e.key)?;
        out.extend(
            Index::decode(&plain, &what)?
                .digests
                .into_iter()
                .filter(|d| *d != ZERO),
        );
    }
    Ok(out)
}

/// Of `candidates`, those some backup in the repository now references.
/// A backup that cannot be read makes this fail: nothing is condemned or
/// deleted on a guess.
fn live_among(
    repo: &Repo,
    candidates: &HashSet<Digest>,
    skip: &HashSet<String>,
) -> Result<HashSet<Digest>> {
    let mut live = HashSet::new();
    if candidates.is_empty() {
        return Ok(live);
    }
    for l in repo.list()? {
        if skip.contains(&l.id) {
            continue;
        }
        let m = match repo.manifest(&l.id) {
            Ok(m) => m,
            // Forgotten by another prune since we listed it.
            Err(BackupError::NotFound(_)) if !repo.backend.exists(&crate::repo::manifest_key(&l.id))? => continue,
            Err(e) => {
                return Err(BackupError::Invalid(format!(
                    "garbage collection stopped: backup {} cannot be read ({e}); `vmfs backup verify` names it",
                    l.id
                )))
            }
        };
        for d in &m.disks {
            let i = repo.index(d).map_err(|e| {
                BackupError::Invalid(format!("garbage collection stopped: backup {} cannot be read ({e}); `vmfs backup verify` names it", l.id))
            })?;
            live.extend(i.digests.iter().filter(|d| candidates.contains(*d)));
        }
    }
    Ok(live)
}

/// Sessions: (record, its key, whether its heartbeat is fresh).
type Stale = Vec<(String, Option<SessionRecord>)>;

fn sessions(repo: &Repo) -> Result<(Vec<(SessionRecord, bool)>, Stale, Vec<String>)> {
    let now = repo.backend.now_ms()?;
    let lease = repo.lease_ms();
    let all = repo.backend.list("sessions/")?;
    let mut records = Vec::new();
    let mut live_ids = HashSet::new();
    let mut stale_records = Vec::new();
    for e in all.iter().filter(|e| !e.key.contains(".chunks-")) {
        let fresh = now - e.modified_ms <= lease;
        match read_record(repo, &e.key) {
            Ok(Some(r)) => {
                if fresh {
                    live_ids.insert(e.key.clone());
                } else {
                    stale_records.push((e.key.clone(), Some(r.clone())));
                }
                records.push((r, fresh));
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!("{err}");
                if fresh {
                    // Unreadable but alive: it must hold up every sweep.
                    live_ids.insert(e.key.clone());
                    records.push((
                        SessionRecord {
                            id: e.key.clone(),
                            ..Default::default()
                        },
                        true,
                    ));
                } else {
                    stale_records.push((e.key.clone(), None));
                }
            }
        }
    }
    // Intent logs of writers that are gone.
    let orphans = all
        .iter()
        .filter_map(|e| {
            let (rec, _) = e.key.split_once(".chunks-")?;
            (!live_ids.contains(rec)).then(|| e.key.clone())
        })
        .collect();
    Ok((records, stale_records, orphans))
}

/// Forget the backups the rules do not keep, then collect.
pub fn prune(repo: &Repo, r: &Retention, dry_run: bool) -> Result<PruneReport> {
    if r.is_empty() {
        return Err(BackupError::Invalid(
            "prune needs a rule: --keep-last, --keep-daily, --keep-weekly or --keep-monthly".into(),
        ));
    }
    let all = repo.list()?;
    let (kept, forgotten) = select(&all, r);
    let mut rep = PruneReport {
        kept,
        forgotten,
        ..Default::default()
    };
    if dry_run {
        return Ok(rep);
    }
    let gone: HashSet<String> = rep.forgotten.iter().cloned().collect();
    rep.condemned = condemn(repo, &gone)?;
    rep.swept = sweep_all(repo)?;
    Ok(rep)
}

/// Garbage collection alone (also what prune runs after forgetting).
pub fn collect(repo: &Repo) -> Result<PruneReport> {
    let mut rep = PruneReport {
        condemned: condemn(repo, &HashSet::new())?,
        ..Default::default()
    };
    rep.swept = sweep_all(repo)?;
    Ok(rep)
}

/// A full collection: every chunk in the repository that no backup, no
/// running writer and no pending list accounts for is condemned. It lists
/// every chunk, so its cost follows the repository's size: for what the
/// incremental collection cannot see (chunks of a backup whose index was
/// damaged when it was forgotten, of a damaged intent log, or left by a
/// version without intent logs).
pub fn collect_full(repo: &Repo) -> Result<PruneReport> {
    let mut candidates: HashSet<Digest> = repo
        .backend
        .list("chunks/")?
        .iter()
        .filter_map(|e| crate::repo::digest_of_key(&e.key))
        .collect();
    // What live writers are storing now is theirs.
    let (records, _, _) = sessions(repo)?;
    for (r, fresh) in &records {
        if !fresh {
            continue;
        }
        for e in repo
            .backend
            .list(&format!("{}.chunks-", crate::session::session_key(&r.id)))?
        {
            if let Ok(d) = read_list(repo, &e.key) {
                for x in d {
                    candidates.remove(&x);
                }
            }
        }
    }
    let mut rep = PruneReport {
        condemned: condemn_with(repo, &HashSet::new(), candidates)?,
        ..Default::default()
    };
    rep.swept = sweep_all(repo)?;
    Ok(rep)
}

/// Forget `gone` (manifests first, so each disappears whole), and
/// condemn what only they and dead writers referenced.
fn condemn(repo: &Repo, gone: &HashSet<String>) -> Result<usize> {
    condemn_with(repo, gone, HashSet::new())
}

fn condemn_with(
    repo: &Repo,
    gone: &HashSet<String>,
    mut candidates: HashSet<Digest>,
) -> Result<usize> {
    for id in gone {
        match referenced(repo, id) {
            Ok(s) => candidates.extend(s),
            Err(e) => tracing::warn!(
                "backup {id}: its chunks cannot all be found ({e}); `vmfs backup gc --full` collects them"
            ),
        }
    }
    let (_, stale_records, logs) = sessions(repo)?;
    // Logs that could not be read stay for the next run (a damaged one
    // goes: `gc --full` finds its chunks).
    let mut orphan_logs = Vec::new();
    for k in logs {
        match read_list(repo, &k) {
            Ok(d) => {
                candidates.extend(d);
                orphan_logs.push(k);
            }
            Err(e @ BackupError::Corrupt { .. }) => {
                tracing::warn!("{e}; `vmfs backup gc --full` collects its chunks");
                orphan_logs.push(k);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    // Not twice: a chunk already condemned stays in its list.
    for e in repo.backend.list("gc/condemned/")? {
        if let Ok(d) = read_list(repo, &e.key) {
            for x in d {
                candidates.remove(&x);
            }
        }
    }
    let live = live_among(repo, &candidates, gone)?;
    let list: Vec<Digest> = candidates.difference(&live).copied().collect();
    if !list.is_empty() {
        let key = format!(
            "gc/condemned/{}-{}",
            stamp(unix_now()),
            hex(&random_bytes::<6>())
        );
        put_list(repo, &key, &list)?;
    }
    for id in gone {
        repo.backend.delete(&crate::repo::manifest_key(id))?;
    }
    for id in gone {
        for e in repo.backend.list(&format!("backups/{id}/"))? {
            repo.backend.delete(&e.key)?;
        }
    }
    // What dead writers left: the objects of a backup that never got its
    // manifest, half-written files, their records and intent logs.
    for (_, r) in &stale_records {
        if let Some(r) = r.as_ref().filter(|r| !r.backup.is_empty()) {
            discard_backup(repo, &r.backup)?;
        }
    }
    for k in orphan_logs
        .iter()
        .chain(stale_records.iter().map(|(k, _)| k))
    {
        repo.backend.delete(k)?;
    }
    repo.backend.clean_partial("sessions/x", repo.lease_ms())?;
    Ok(list.len())
}

/// Remove the objects of backup `id` if it has no manifest.
pub fn discard_backup(repo: &Repo, id: &str) -> Result<()> {
    if repo.backend.exists(&crate::repo::manifest_key(id))? {
        return Ok(());
    }
    let dir = format!("backups/{id}/");
    for e in repo.backend.list(&dir)? {
        repo.backend.delete(&e.key)?;
    }
    repo.backend
        .clean_partial(&format!("{dir}x"), repo.lease_ms())?;
    Ok(())
}

fn sweep_all(repo: &Repo) -> Result<Vec<SweepReport>> {
    let mut out = Vec::new();
    let lists: HashSet<String> = repo
        .backend
        .list("gc/condemned/")?
        .into_iter()
        .map(|e| e.key["gc/condemned/".len()..].to_string())
        .collect();
    for lid in &lists {
        out.push(sweep(repo, lid)?);
    }
    // Rescues of lists already swept (a writer that rescued as the sweep
    // ended, then died) are void.
    for e in repo.backend.list("gc/rescue/")? {
        let lid = e.key["gc/rescue/".len()..]
            .split('/')
            .next()
            .unwrap_or_default();
        if !lists.contains(lid) {
            repo.backend.delete(&e.key)?;
        }
    }
    Ok(out)
}

/// Removes a sweep's marker when the sweep ends, however it ends.
struct Marker<'a> {
    repo: &'a Repo,
    key: String,
    /// When its last renewal that succeeded began ([`crate::util::boot_ms`]).
    renewed: i64,
}

impl Marker<'_> {
    /// Rewrite the marker every lease/8 so that no one takes the sweep for
    /// abandoned; a sweep that could not for half a lease stops deleting.
    fn keep_alive(&mut self) -> Result<()> {
        let lease = self.repo.lease_ms();
        let now = crate::util::boot_ms();
        if now - self.renewed < lease / 8 {
            return Ok(());
        }
        self.repo.backend.put(&self.key, &sweep_marker())?;
        if crate::util::boot_ms() - self.renewed > lease / 2 {
            return Err(BackupError::Invalid(format!(
                "{}: the sweep could not renew its marker for half a lease; stopped",
                self.key
            )));
        }
        self.renewed = now;
        Ok(())
    }
}

impl Drop for Marker<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.repo.backend.delete(&self.key) {
            tracing::warn!("{}: removing the sweep marker: {e}", self.key);
        }
    }
}

/// Sweep one condemned list (see [`crate::session`] for why this order).
pub fn sweep(repo: &Repo, lid: &str) -> Result<SweepReport> {
    let mut rep = SweepReport {
        list: lid.to_string(),
        ..Default::default()
    };
    let key = format!("gc/sweeping/{lid}");
    let began = crate::util::boot_ms();
    if !repo.backend.put_new(&key, &sweep_marker())? {
        let m = repo.backend.list(&key)?;
        let stale = match m.iter().find(|e| e.key == key) {
            Some(e) => repo.backend.now_ms()? - e.modified_ms > repo.lease_ms(),
            None => true,
        };
        if !stale {
            rep.waiting_for = Some("another sweep of this list".into());
            return Ok(rep);
        }
        repo.backend.put(&key, &sweep_marker())?;
    }
    let mut marker = Marker {
        repo,
        key,
        renewed: began,
    };
    let (records, _, _) = sessions(repo)?;
    if let Some((r, _)) = records
        .iter()
        .find(|(r, fresh)| *fresh && !r.acked.iter().any(|a| a == lid))
    {
        rep.waiting_for = Some(format!(
            "session {} (backup {} on {})",
            r.id, r.backup, r.host
        ));
        return Ok(rep);
    }
    let lkey = format!("gc/condemned/{lid}");
    let list: HashSet<Digest> = match read_list(repo, &lkey) {
        Ok(l) => l.into_iter().collect(),
        Err(BackupError::NotFound(_)) => return Ok(rep), // swept by another
        Err(e @ BackupError::Corrupt { .. }) => {
            // Its chunks cannot be known: set it aside; they stay.
            tracing::warn!("{e}; set aside under damaged/");
            if let Some(raw) = repo.backend.get(&lkey)? {
                repo.backend.put(&format!("damaged/gc-{lid}"), &raw)?;
            }
            repo.backend.delete(&lkey)?;
            return Ok(rep);
        }
        Err(e) => return Err(e),
    };
    let mut rescued = HashSet::new();
    let rescue_keys = repo.backend.list(&format!("gc/rescue/{lid}/"))?;
    for e in &rescue_keys {
        match read_list(repo, &e.key) {
            Ok(d) => rescued.extend(d),
            // A damaged rescue could have named any chunk: keep them all.
            Err(BackupError::Corrupt { .. }) => rescued.extend(list.iter().copied()),
            Err(e) => return Err(e),
        }
    }
    marker.keep_alive()?;
    let live = live_among(repo, &list, &HashSet::new())?;
    let mut carried = Vec::new();
    for d in &list {
        marker.keep_alive()?;
        if live.contains(d) {
            rep.kept += 1;
            continue;
        }
        if rescued.contains(d) {
            // A writer needs it, but it may never write its manifest:
            // condemned again, to be decided in a later sweep.
            carried.push(*d);
            rep.kept += 1;
            continue;
        }
        let k = chunk_key(d);
        if let Some(n) = repo.backend.size(&k)? {
            rep.freed += n;
        }
        repo.backend.delete(&k)?;
        rep.deleted += 1;
    }
    // Half-written chunks of dead writers lie beside the chunks they were
    // writing: look only in those folders.
    let mut dirs = HashSet::new();
    for d in &list {
        let k = chunk_key(d);
        if dirs.insert(k[..k.rfind('/').unwrap_or(0)].to_string()) {
            marker.keep_alive()?;
            repo.backend.clean_partial(&k, repo.lease_ms())?;
        }
    }
    if !carried.is_empty() {
        put_list(
            repo,
            &format!(
                "gc/condemned/{}-{}",
                stamp(unix_now()),
                hex(&random_bytes::<6>())
            ),
            &carried,
        )?;
    }
    for e in &rescue_keys {
        repo.backend.delete(&e.key)?;
    }
    repo.backend.delete(&lkey)?;
    drop(marker);
    Ok(rep)
}

/// A sweep's marker: who is sweeping.
fn sweep_marker() -> Vec<u8> {
    let r = SessionRecord {
        id: "sweep".into(),
        host: crate::session::hostname(),
        pid: std::process::id(),
        backup: String::new(),
        acked: Vec::new(),
    };
    blob::seal(
        Kind::Session,
        &serde_json::to_vec(&r).unwrap_or_default(),
        false,
        None,
        b"sweep",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(id: &str) -> Listed {
        Listed {
            id: id.into(),
            name: id.split('/').next().unwrap().into(),
            modified_ms: 0,
        }
    }

    #[test]
    fn retention_rules() {
        assert_eq!(started_of("vm/20000229T010203Z-ab"), Some(951_786_123));
        let all: Vec<Listed> = [
            "a/20261101T010000Z-1",
            "a/20261101T020000Z-2",
            "a/20261102T010000Z-3",
            "a/20261110T010000Z-4",
            "a/20261128T010000Z-5",
            "b/20260101T000000Z-6",
        ]
        .iter()
        .map(|s| l(s))
        .collect();
        let (k, f) = select(
            &all,
            &Retention {
                keep_last: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(k, vec!["a/20261128T010000Z-5", "b/20260101T000000Z-6"]);
        assert_eq!(f.len(), 4);
        let (k, _) = select(
            &all,
            &Retention {
                keep_daily: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(
            k,
            vec![
                "a/20261102T010000Z-3",
                "a/20261110T010000Z-4",
                "a/20261128T010000Z-5",
                "b/20260101T000000Z-6"
            ]
        );
        let (k, _) = select(
            &all,
            &Retention {
                keep_monthly: Some(1),
                keep_daily: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(k, vec!["a/20261128T010000Z-5", "b/20260101T000000Z-6"]);
    }
}
