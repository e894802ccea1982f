//! `vmfs backup` end to end, as a user runs it: on a local directory and
//! on S3 (a real `moto_server`), several processes at once, a backup
//! killed half-way, damage to the catalog, and file-level browsing of an
//! ext4 image through `backup mount`, a loop device and a read-only mount.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{mounted, text, VMFS};

/// `vmfs backup ARGS` with a private catalog and the environment `env`.
fn bk(env: &Env, args: &[&str]) -> Output {
    env.cmd(args).output().expect("run vmfs")
}

struct Env {
    dir: tempfile::TempDir,
    vars: Vec<(String, String)>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![
            (
                "VMFS_BACKUP_CATALOG".into(),
                dir.path().join("catalog.sqlite").display().to_string(),
            ),
            ("VMFS_LOG".into(), "warn".into()),
            // Short leases, so collection after a killed writer waits little
            // (a writer fails if its heartbeat lapses for half of it).
            ("VMFS_BACKUP_LEASE_SECS".into(), "4".into()),
        ];
        Env { dir, vars }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(VMFS);
        c.arg("backup").args(args);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }
}

/// `vmfs backup image --repo R --name NAME PATH`, which must succeed.
fn backup_of(env: &Env, r: &str, name: &str, path: &str) -> String {
    ok(bk(env, &["image", "--repo", r, "--name", name, path]))
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

use backup_proxy::util::pseudo_random as fill;

const MIB: usize = 1 << 20;

/// An image of `mib` MiB: random data from `seed`, every fourth MiB a hole.
fn image(p: &Path, mib: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).unwrap();
    f.set_len((mib * MIB) as u64).unwrap();
    let mut b = vec![0u8; MIB];
    for k in 0..mib {
        if k % 4 == 3 {
            continue;
        }
        fill(&mut b, seed * 100_000 + k as u64);
        f.write_all_at(&b, (k * MIB) as u64).unwrap();
    }
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn ids(env: &Env, repo: &str) -> Vec<String> {
    let o = ok(bk(env, &["list", "--repo", repo, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&o[..o.rfind('}').unwrap() + 1]).unwrap();
    v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

fn files_under(d: &Path) -> usize {
    let mut n = 0;
    let mut st = vec![d.to_path_buf()];
    while let Some(d) = st.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                st.push(p)
            } else {
                n += 1
            }
        }
    }
    n
}

/// The chunks the backups of `repo` reference, from their indexes.
fn referenced(repo: &str) -> std::collections::HashSet<[u8; 32]> {
    let r = backup_proxy::Repo::open(repo, &Default::default()).unwrap();
    let mut s = std::collections::HashSet::new();
    for l in r.list().unwrap() {
        for d in r.manifest(&l.id).unwrap().disks {
            s.extend(
                r.index(&d)
                    .unwrap()
                    .digests
                    .into_iter()
                    .filter(|d| *d != [0; 32]),
            );
        }
    }
    s
}

#[test]
fn a_backup_killed_half_way_is_never_listed_and_its_chunks_are_collected() {
    let env = Env::new();
    let repo = env.path("repo");
    let r = repo.to_str().unwrap();
    ok(bk(&env, &["init", "--repo", r]));
    let small = env.path("small.img");
    image(&small, 16, 1);
    backup_of(&env, r, "vm", &small.display().to_string());
    let big = env.path("big.img");
    image(&big, 768, 2);
    let mut c: Child = env
        .cmd(&[
            "image",
            "--repo",
            r,
            "--name",
            "vm",
            &big.display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has stored some chunks.
    let t0 = Instant::now();
    while files_under(&repo.join("chunks")) < 40 {
        assert!(
            t0.elapsed() < Duration::from_secs(60) && c.try_wait().unwrap().is_none(),
            "backup ended first"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    c.wait().unwrap();
    assert_eq!(ids(&env, r).len(), 1, "a half backup is listed");
    let o = ok(bk(&env, &["list", "--repo", r]));
    assert!(
        o.contains("interrupted"),
        "the catalog keeps the killed run: {o}"
    );
    // The next backup and a prune are fine.
    backup_of(&env, r, "vm", &small.display().to_string());
    assert_eq!(ids(&env, r).len(), 2);
    // Once the killed writer's lease is over, its chunks are collected,
    // found from its intent log, not by listing every chunk.
    std::thread::sleep(Duration::from_secs(5));
    let o = ok(bk(&env, &["prune", "--repo", r, "--keep-last", "5"]));
    assert!(o.contains("condemned") && o.contains("deleted"), "{o}");
    assert_eq!(files_under(&repo.join("chunks")), referenced(r).len());
    assert_eq!(
        files_under(&repo.join("sessions")),
        0,
        "{:?}",
        std::fs::read_dir(repo.join("sessions"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    ok(bk(&env, &["verify", "--repo", r]));
    let out = env.path("out");
    ok(bk(
        &env,
        &["restore", "--repo", r, "vm", &out.display().to_string()],
    ));
    assert!(same(&out, &small));
}

#[test]
fn a_damaged_catalog_is_rebuilt_from_the_repository_and_encryption_needs_the_passphrase() {
    let mut env = Env::new();
    env.vars
        .push(("VMFS_BACKUP_PASSPHRASE".into(), "hunter2".into()));
    let repo = env.path("repo");
    let r = repo.to_str().unwrap();
    let key = env.path("key");
    ok(bk(
        &env,
        &["init", "--repo", r, "--encrypt", &key.display().to_string()],
    ));
    let img = env.path("a.img");
    image(&img, 8, 3);
    for _ in 0..2 {
        backup_of(&env, r, "vm", &img.display().to_string());
    }
    let cat = env.path("catalog.sqlite");
    assert!(cat.exists());
    // Flip bytes all over the catalog's pages.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cat)
            .unwrap();
        let n = f.metadata().unwrap().len();
        for at in (0..n).step_by(997) {
            f.write_at(&[0xA5], at).unwrap();
        }
    }
    let o = ok(bk(&env, &["list", "--repo", r]));
    assert!(o.contains("rebuilt from the repository"), "{o}");
    assert_eq!(ids(&env, r).len(), 2);
    // The wrong passphrase is refused, with the key file or the copy.
    let mut bad = Env::new();
    bad.vars
        .push(("VMFS_BACKUP_PASSPHRASE".into(), "hunter3".into()));
    for extra in [vec![], vec!["--key", key.to_str().unwrap()]] {
        let mut a = vec!["list", "--repo", r];
        a.extend(extra);
        let o = bk(&bad, &a);
        assert!(
            !o.status.success() && text(&o).contains("wrong passphrase"),
            "{}",
            text(&o)
        );
    }
}

// ---------------------------------------------------------------- S3

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's S3 server on a free port of 127.0.0.1, with bucket `bucket`.
fn moto(bucket: &str) -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m moto.server (PyPI moto[server]; scripts/setup.sh installs it)");
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "moto_server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A bucket: moto accepts a plain path-style PUT.
    let st = Command::new("python3")
        .args([
            "-c",
            &format!("import urllib.request as u; u.urlopen(u.Request('{url}/{bucket}', method='PUT')).read()"),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "creating the bucket");
    Moto { child, url }
}

fn s3_env(m: &Moto) -> Env {
    let mut env = Env::new();
    // moto is one Python process: a longer lease, so a slow answer under
    // load does not make a writer lapse.
    for (k, v) in env.vars.iter_mut() {
        if k == "VMFS_BACKUP_LEASE_SECS" {
            *v = "8".into();
        }
    }
    // Heartbeats (and so acknowledgements of condemned lists) oftener.
    env.vars
        .push(("VMFS_BACKUP_HEARTBEAT_MS".into(), "200".into()));
    for (k, v) in [
        ("AWS_ENDPOINT_URL", m.url.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        env.vars.push((k.into(), v.into()));
    }
    env
}

#[test]
fn on_s3_backups_round_trip_with_two_writers_at_once_and_a_prune_during_a_backup() {
    let m = moto("vmfs-backups");
    let env = s3_env(&m);
    for (k, v) in &env.vars {
        std::env::set_var(k, v);
    }
    let r = "s3://vmfs-backups/site-a";
    ok(bk(&env, &["init", "--repo", r]));
    // Create-only writes are create-only on this server.
    let be = backup_proxy::backend::open(r).unwrap();
    assert!(be.put_new("probe/x", b"1").unwrap());
    assert!(!be.put_new("probe/x", b"2").unwrap());
    assert_eq!(be.get("probe/x").unwrap().unwrap(), b"1");
    be.delete("probe/x").unwrap();

    let (a, b) = (env.path("a.img"), env.path("b.img"));
    image(&a, 48, 10);
    image(&b, 48, 10);
    {
        // b shares most of a's chunks, so the two writers race on them.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&[0x55; 4096], 5 * MIB as u64).unwrap();
    }
    let spawn = |name: &str, p: &Path| {
        env.cmd(&[
            "image",
            "--repo",
            r,
            "--name",
            name,
            &p.display().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (ca, cb) = (spawn("vm-a", &a), spawn("vm-b", &b));
    ok(ca.wait_with_output().unwrap());
    ok(cb.wait_with_output().unwrap());
    assert_eq!(ids(&env, r).len(), 2);
    for (name, p) in [("vm-a", &a), ("vm-b", &b)] {
        let out = env.path(&format!("{name}.out"));
        ok(bk(
            &env,
            &["restore", "--repo", r, name, &out.display().to_string()],
        ));
        assert!(same(&out, p), "{name}");
    }
    ok(bk(&env, &["verify", "--repo", r]));

    // A prune during a backup: vm-c's old backup of image c is forgotten
    // while a new backup of the same image runs and reuses its chunks.
    let c = env.path("c.img");
    image(&c, 512, 11);
    backup_of(&env, r, "vm-c", &c.display().to_string());
    let d = env.path("d.img");
    image(&d, 4, 12);
    backup_of(&env, r, "vm-c", &d.display().to_string());
    let mut running = env
        .cmd(&[
            "image",
            "--repo",
            r,
            "--name",
            "vm-c2",
            "--workers",
            "1",
            &c.display().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once its session is registered, forget vm-c's backup of c: its
    // chunks are condemned, and the sweep waits for the running backup.
    let t0 = Instant::now();
    while be.list("sessions/").unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = ok(bk(&env, &["prune", "--repo", r, "--keep-last", "1"]));
    assert!(o.contains("forgot vm-c/"), "{o}");
    assert!(
        running.try_wait().unwrap().is_none(),
        "the backup ended before the prune; make c larger"
    );
    assert!(o.contains("condemned"), "{o}");
    // The sweep waits until the backup's heartbeat has acknowledged the
    // list (rescuing what it references so far); then it sweeps during
    // the backup, deleting what the backup has not yet come to, which the
    // backup stores again when it gets there.
    let mut out = o;
    let t0 = Instant::now();
    while !out.contains("deleted") {
        assert!(t0.elapsed() < Duration::from_secs(20), "{out}");
        std::thread::sleep(Duration::from_millis(300));
        out += &ok(bk(&env, &["gc", "--repo", r]));
    }
    let still = running.try_wait().unwrap().is_none();
    eprintln!("collection during the backup (still running after it: {still}):\n{out}");
    assert!(still, "the backup ended before the sweep; make c larger");
    ok(running.wait_with_output().unwrap());
    // The new backup is whole: every chunk it references is there.
    let out = env.path("c.out");
    ok(bk(
        &env,
        &["restore", "--repo", r, "vm-c2", &out.display().to_string()],
    ));
    assert!(same(&out, &c));
    ok(bk(&env, &["verify", "--repo", r]));
    // Collection finishes once no writer is left, and keeps what vm-c2 uses.
    ok(bk(&env, &["gc", "--repo", r]));
    assert!(
        be.list("gc/").unwrap().is_empty(),
        "{:?}",
        be.list("gc/").unwrap()
    );
    let chunks = be.list("chunks/").unwrap().len();
    assert_eq!(chunks, referenced(r).len());
    ok(bk(&env, &["verify", "--repo", r]));
}

// ---------------------------------------------------------------- file level

#[test]
fn an_ext4_image_is_browsed_through_backup_mount_and_a_read_only_loop_mount() {
    let env = Env::new();
    let tree = env.path("tree");
    for d in ["etc", "home/user/docs", "var/log"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    for (k, f) in [
        "etc/hosts",
        "home/user/docs/report.txt",
        "home/user/big.bin",
        "var/log/syslog",
    ]
    .iter()
    .enumerate()
    {
        let mut b = vec![0u8; 1000 + k * 700_000];
        fill(&mut b, 40 + k as u64);
        std::fs::write(tree.join(f), &b).unwrap();
    }
    let img = env.path("fs.img");
    let st = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-d",
            tree.to_str().unwrap(),
            img.to_str().unwrap(),
            "64M",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let repo = env.path("repo");
    let r = repo.to_str().unwrap();
    ok(bk(&env, &["init", "--repo", r]));
    ok(bk(
        &env,
        &[
            "image",
            "--repo",
            r,
            "--name",
            "guest",
            "--disk",
            "root",
            img.to_str().unwrap(),
        ],
    ));
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut m = env
        .cmd(&["mount", "--repo", r, "guest", mnt.to_str().unwrap()])
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !mnt.join("root.img").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20) && m.try_wait().unwrap().is_none(),
            "backup mount failed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = Command::new("losetup")
        .args([
            "-r",
            "-P",
            "-f",
            "--show",
            mnt.join("root.img").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let fsmnt = env.path("fsmnt");
    std::fs::create_dir(&fsmnt).unwrap();
    let o = Command::new("mount")
        .args(["-o", "ro", &dev, fsmnt.to_str().unwrap()])
        .output()
        .unwrap();
    let mounted_ok = o.status.success();
    let diff = mounted_ok.then(|| {
        Command::new("diff")
            .args([
                "-r",
                "-x",
                "lost+found",
                tree.to_str().unwrap(),
                fsmnt.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    });
    let _ = Command::new("umount").arg(&fsmnt).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    // A write through the FUSE view is refused.
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("root.img"));
    unsafe { libc::kill(m.id() as i32, libc::SIGINT) };
    let st = m.wait().unwrap();
    assert!(mounted_ok, "{}", text(&o));
    let diff = diff.unwrap();
    assert!(diff.status.success(), "{}", text(&diff));
    assert!(w.is_err());
    assert!(st.success(), "backup mount exited {st:?}");
    assert!(!mounted(&mnt));
}

#[test]
fn a_restore_onto_a_block_device_writes_the_zeros_too_and_never_overwrites_a_file() {
    let env = Env::new();
    let repo = env.path("repo");
    let r = repo.to_str().unwrap();
    ok(bk(&env, &["init", "--repo", r]));
    let img = env.path("a.img");
    image(&img, 16, 5); // every fourth MiB a hole
    ok(bk(
        &env,
        &["image", "--repo", r, "--name", "vm", img.to_str().unwrap()],
    ));
    // A device full of old data: the holes must come back as zeros.
    let backing = env.path("dev.img");
    std::fs::write(&backing, vec![0xFFu8; 16 * MIB]).unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show", backing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let res = bk(&env, &["restore", "--repo", r, "vm", &dev]);
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    ok(res);
    assert!(same(&backing, &img));
    // An existing file is never written over.
    let o = bk(&env, &["restore", "--repo", r, "vm", img.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("already exists"),
        "{}",
        text(&o)
    );
    // A backup that is not there, a repository that is not one: clear errors.
    let o = bk(
        &env,
        &[
            "restore",
            "--repo",
            r,
            "nosuch",
            env.path("x").to_str().unwrap(),
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("no backup named nosuch"),
        "{}",
        text(&o)
    );
    let o = bk(
        &env,
        &["list", "--repo", env.path("empty").to_str().unwrap()],
    );
    assert!(
        !o.status.success() && text(&o).contains("not a repository"),
        "{}",
        text(&o)
    );
}
