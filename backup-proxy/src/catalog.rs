//! The catalog: a SQLite database on the proxy of every backup run it
//! made or saw (repository, backup, disks, change IDs, bytes read, new,
//! reused and stored, duration, and whether it ended well and if not why).
//! The repository is the truth: `sync` brings the catalog in line with
//! it, and a damaged catalog is set aside and rebuilt.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{BackupError, Result};
use crate::manifest::Manifest;
use crate::repo::Repo;

pub const DEFAULT_PATH: &str = "/var/lib/vmfs/backup/catalog.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS repos(
  id INTEGER PRIMARY KEY, url TEXT NOT NULL UNIQUE, repo_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  repo INTEGER NOT NULL REFERENCES repos(id),
  backup TEXT, name TEXT NOT NULL,
  started INTEGER NOT NULL, finished INTEGER,
  state TEXT NOT NULL CHECK(state IN ('running','ok','failed','interrupted','pruned')),
  reason TEXT, host TEXT, pid INTEGER,
  read INTEGER, new INTEGER, reused INTEGER, stored INTEGER, zero INTEGER, millis INTEGER,
  UNIQUE(repo, backup));
CREATE TABLE IF NOT EXISTS disks(
  run INTEGER NOT NULL REFERENCES runs(id), name TEXT NOT NULL,
  size INTEGER, source TEXT, change_id TEXT, since TEXT,
  read INTEGER, new INTEGER, reused INTEGER, stored INTEGER,
  PRIMARY KEY(run, name));
";

#[derive(Debug, Clone)]
pub struct Run {
    pub backup: Option<String>,
    pub name: String,
    pub started: i64,
    pub finished: Option<i64>,
    pub state: String,
    pub reason: Option<String>,
    pub read: u64,
    pub new: u64,
    pub reused: u64,
    pub stored: u64,
    pub millis: u64,
}

/// Why a catalog did not open: damage (set it aside) or anything else.
enum Open {
    Damaged(String),
    Other(String),
}

impl From<rusqlite::Error> for Open {
    fn from(e: rusqlite::Error) -> Open {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, DatabaseCorrupt | NotADatabase) =>
            {
                Open::Damaged(e.to_string())
            }
            _ => Open::Other(e.to_string()),
        }
    }
}

impl std::fmt::Display for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Open::Damaged(s) | Open::Other(s) => f.write_str(s),
        }
    }
}

pub struct Catalog {
    conn: Connection,
    path: PathBuf,
    /// Set when a damaged catalog was set aside at open.
    pub rebuilt: Option<String>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> BackupError {
    BackupError::Catalog {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

impl Catalog {
    pub fn default_path() -> PathBuf {
        std::env::var_os("VMFS_BACKUP_CATALOG")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_PATH.into())
    }

    pub fn open(path: &Path) -> Result<Catalog> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| err(path, e))?;
        }
        match Self::try_open(path) {
            Ok(c) => Ok(c),
            // Only damage sets a catalog aside: a busy or full disk, a
            // permission, is an error to report, not a reason to lose the
            // failed runs it alone records.
            Err(Open::Damaged(why)) if path.exists() => {
                let aside = path.with_extension(format!(
                    "damaged-{}",
                    crate::util::stamp(crate::util::unix_now())
                ));
                std::fs::rename(path, &aside).map_err(|e| err(path, e))?;
                for ext in ["-wal", "-shm"] {
                    let mut from = path.as_os_str().to_owned();
                    from.push(ext);
                    let mut to = aside.as_os_str().to_owned();
                    to.push(ext);
                    let _ = std::fs::rename(&from, &to);
                }
                let mut c = Self::try_open(path).map_err(|e| err(path, e))?;
                c.rebuilt = Some(format!(
                    "catalog {} was damaged ({why}); set aside as {} and rebuilt from the repository",
                    path.display(),
                    aside.display()
                ));
                Ok(c)
            }
            Err(e) => Err(err(path, e)),
        }
    }

    fn try_open(path: &Path) -> std::result::Result<Catalog, Open> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Err(Open::Damaged(ok));
        }
        conn.execute_batch("PRAGMA journal_mode=WAL;")?;
        conn.execute_batch(SCHEMA)?;
        let v: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key='schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match v.as_deref() {
            None => {
                conn.execute("INSERT INTO meta(key, value) VALUES('schema', '1')", [])?;
            }
            Some("1") => {}
            Some(v) => {
                return Err(Open::Other(format!(
                    "schema version {v} (this program knows 1)"
                )))
            }
        }
        Ok(Catalog {
            conn,
            path: path.to_path_buf(),
            rebuilt: None,
        })
    }

    fn repo_row(&self, repo: &Repo) -> Result<i64> {
        let url = repo.describe();
        self.conn
            .execute(
                "INSERT INTO repos(url, repo_id) VALUES(?1, ?2) ON CONFLICT(url) DO UPDATE SET repo_id=excluded.repo_id",
                params![url, repo.config.id],
            )
            .map_err(|e| err(&self.path, e))?;
        self.conn
            .query_row("SELECT id FROM repos WHERE url=?1", params![url], |r| {
                r.get(0)
            })
            .map_err(|e| err(&self.path, e))
    }

    /// A run begins.
    pub fn begin(&self, repo: &Repo, name: &str) -> Result<i64> {
        let r = self.repo_row(repo)?;
        self.conn
            .execute(
                "INSERT INTO runs(repo, name, started, state, host, pid) VALUES(?1, ?2, ?3, 'running', ?4, ?5)",
                params![r, name, crate::util::unix_now(), crate::session::hostname(), std::process::id()],
            )
            .map_err(|e| err(&self.path, e))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn finish_ok(&self, run: i64, m: &Manifest) -> Result<()> {
        // A sync by another process may have recorded it already.
        self.conn
            .execute(
                "DELETE FROM runs WHERE backup=?1 AND id<>?2",
                params![m.id, run],
            )
            .map_err(|e| err(&self.path, e))?;
        self.record(run, m, "ok")
    }

    fn record(&self, run: i64, m: &Manifest, state: &str) -> Result<()> {
        let t = m.totals();
        self.conn
            .execute(
                "UPDATE runs SET backup=?2, started=?3, finished=?4, state=?5, reason=NULL, host=?6,
                 read=?7, new=?8, reused=?9, stored=?10, zero=?11, millis=?12 WHERE id=?1",
                params![run, m.id, m.started, m.finished, state, m.host, t.read, t.new, t.reused, t.stored, t.zero, t.millis],
            )
            .map_err(|e| err(&self.path, e))?;
        for d in &m.disks {
            self.conn
                .execute(
                    "INSERT OR REPLACE INTO disks(run, name, size, source, change_id, since, read, new, reused, stored)
                     VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![run, d.name, d.size, d.source, d.change_id, d.since, d.stats.read, d.stats.new, d.stats.reused, d.stats.stored],
                )
                .map_err(|e| err(&self.path, e))?;
        }
        Ok(())
    }

    pub fn finish_failed(&self, run: i64, why: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET finished=?2, state='failed', reason=?3 WHERE id=?1",
                params![run, crate::util::unix_now(), why],
            )
            .map_err(|e| err(&self.path, e))
            .map(|_| ())
    }

    /// Bring the catalog in line with the repository: every backup there
    /// is recorded (its manifest read once), those gone are marked pruned,
    /// runs of this host whose process is gone are marked interrupted.
    pub fn sync(&self, repo: &Repo) -> Result<Vec<String>> {
        let ids: Vec<String> = repo.list()?.into_iter().map(|l| l.id).collect();
        self.sync_with(repo, &ids, &mut |id| repo.manifest(id))
    }

    /// [`Catalog::sync`] with the repository's backups `ids` already
    /// listed, reading the manifests not yet recorded through `manifest`
    /// (a caller that has read them already passes them on).
    pub fn sync_with(
        &self,
        repo: &Repo,
        ids: &[String],
        manifest: &mut dyn FnMut(&str) -> Result<Manifest>,
    ) -> Result<Vec<String>> {
        let r = self.repo_row(repo)?;
        let mut warnings = Vec::new();
        let have: std::collections::HashSet<String> = {
            let mut st = self
                .conn
                .prepare(
                    "SELECT backup FROM runs WHERE repo=?1 AND backup IS NOT NULL AND state='ok'",
                )
                .map_err(|e| err(&self.path, e))?;
            let rows = st
                .query_map(params![r], |row| row.get::<_, String>(0))
                .map_err(|e| err(&self.path, e))?;
            rows.filter_map(|x| x.ok()).collect()
        };
        let there: std::collections::HashSet<&str> = ids.iter().map(|id| id.as_str()).collect();
        for id in ids {
            if have.contains(id) {
                continue;
            }
            match manifest(id) {
                Ok(m) => {
                    self.conn
                        .execute(
                            "INSERT INTO runs(repo, backup, name, started, state) VALUES(?1, ?2, ?3, ?4, 'ok')
                             ON CONFLICT(repo, backup) DO UPDATE SET state='ok'",
                            params![r, m.id, m.name, m.started],
                        )
                        .map_err(|e| err(&self.path, e))?;
                    let run: i64 = self
                        .conn
                        .query_row(
                            "SELECT id FROM runs WHERE repo=?1 AND backup=?2",
                            params![r, m.id],
                            |x| x.get(0),
                        )
                        .map_err(|e| err(&self.path, e))?;
                    self.record(run, &m, "ok")?;
                }
                Err(e) => warnings.push(format!("backup {id}: {e}")),
            }
        }
        for b in have.iter().filter(|b| !there.contains(b.as_str())) {
            self.conn
                .execute(
                    "UPDATE runs SET state='pruned' WHERE repo=?1 AND backup=?2",
                    params![r, b],
                )
                .map_err(|e| err(&self.path, e))?;
        }
        let host = crate::session::hostname();
        let mut st = self
            .conn
            .prepare("SELECT id, pid FROM runs WHERE repo=?1 AND state='running' AND host=?2")
            .map_err(|e| err(&self.path, e))?;
        let running: Vec<(i64, i64)> = st
            .query_map(params![r, host], |row| {
                Ok((row.get(0)?, row.get::<_, Option<i64>>(1)?.unwrap_or(0)))
            })
            .map_err(|e| err(&self.path, e))?
            .filter_map(|x| x.ok())
            .collect();
        for (id, pid) in running {
            // SAFETY: kill(pid, 0) only asks whether the process exists.
            let alive = pid > 0
                && pid != std::process::id() as i64
                && unsafe { libc::kill(pid as i32, 0) } == 0;
            if !alive && pid != std::process::id() as i64 {
                self.conn
                    .execute(
                        "UPDATE runs SET state='interrupted', reason='the backup process ended before the backup was whole' WHERE id=?1",
                        params![id],
                    )
                    .map_err(|e| err(&self.path, e))?;
            }
        }
        Ok(warnings)
    }

    /// Every run recorded for `repo`, oldest first.
    pub fn runs(&self, repo: &Repo) -> Result<Vec<Run>> {
        let r = self.repo_row(repo)?;
        let mut st = self
            .conn
            .prepare(
                "SELECT backup, name, started, finished, state, reason, read, new, reused, stored, millis
                 FROM runs WHERE repo=?1 ORDER BY started, id",
            )
            .map_err(|e| err(&self.path, e))?;
        let rows = st
            .query_map(params![r], |x| {
                Ok(Run {
                    backup: x.get(0)?,
                    name: x.get(1)?,
                    started: x.get(2)?,
                    finished: x.get(3)?,
                    state: x.get(4)?,
                    reason: x.get(5)?,
                    read: x.get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
                    new: x.get::<_, Option<i64>>(7)?.unwrap_or(0) as u64,
                    reused: x.get::<_, Option<i64>>(8)?.unwrap_or(0) as u64,
                    stored: x.get::<_, Option<i64>>(9)?.unwrap_or(0) as u64,
                    millis: x.get::<_, Option<i64>>(10)?.unwrap_or(0) as u64,
                })
            })
            .map_err(|e| err(&self.path, e))?;
        Ok(rows.filter_map(|x| x.ok()).collect())
    }
}
