use std::path::PathBuf;

use crate::{LunError, Result};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed LUN URL, in QEMU's syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LunUrl {
    File(PathBuf),
    Nbd { addr: NbdAddr, export: String },
    Iscsi(IscsiUrl),
}

/// A password: kept out of `Debug` output, logs and error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// CHAP credentials: a user name and its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: Secret,
}

/// `iscsi://[user[%password]@]host[:port]/target-iqn/lun[?args]`, as QEMU
/// and libiscsi write it.
///
/// Arguments: `initiator_name=IQN`, `target_user=U`, `target_password=P`
/// (mutual CHAP), `header_digest=none|crc32c|none-crc32c|crc32c-none`.
/// Credentials missing from the URL come from the environment variables
/// libiscsi's own tools read: `LIBISCSI_CHAP_USERNAME`,
/// `LIBISCSI_CHAP_PASSWORD`, `LIBISCSI_CHAP_TARGET_USERNAME`,
/// `LIBISCSI_CHAP_TARGET_PASSWORD`; the initiator name from
/// `VMFS_INITIATOR_NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    pub host: String,
    pub port: u16,
    pub target: String,
    pub lun: u16,
    pub chap: Option<Chap>,
    pub target_chap: Option<Chap>,
    pub initiator: Option<String>,
    pub header_digest: Option<String>,
}

impl IscsiUrl {
    /// `host:port` as libiscsi takes it (IPv6 in brackets).
    pub fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
    /// The URL without any password, nor this host's initiator name: what
    /// messages and on-disk hints show (another host opening the hint uses
    /// its own initiator name and its own credentials).
    pub fn redacted(&self) -> String {
        let user = match &self.chap {
            Some(c) => format!("{}@", escape(&c.user)),
            None => String::new(),
        };
        let mut args = Vec::new();
        if let Some(t) = &self.target_chap {
            args.push(format!("target_user={}", escape(&t.user)));
        }
        if let Some(h) = &self.header_digest {
            args.push(format!("header_digest={h}"));
        }
        let q = if args.is_empty() {
            String::new()
        } else {
            format!("?{}", args.join("&"))
        };
        format!(
            "iscsi://{user}{}/{}/{}{q}",
            self.portal(),
            escape(&self.target),
            self.lun
        )
    }
}

/// The IANA port of iSCSI.
pub const ISCSI_DEFAULT_PORT: u16 = 3260;

/// %-escape what would break a URL's structure.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The IANA port of NBD, and QEMU's default.
pub const NBD_DEFAULT_PORT: u16 = 10809;

fn bad(url: &str, reason: impl Into<String>) -> LunError {
    LunError::BadUrl {
        url: redact(url),
        reason: reason.into(),
    }
}

/// A URL as the user wrote it, minus any password (`user%password@` and
/// `target_password=`), for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = main.split_once('/').unwrap_or((main, ""));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once('%') {
            Some((u, _)) => format!("{u}%***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}://{authority}");
    if main.contains('/') {
        out.push('/');
        out.push_str(path);
    }
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.contains("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// Undo %XX escapes (QEMU URLs may escape export names).
fn unescape(url: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| bad(url, "truncated %-escape"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad(url, "bad %-escape"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(url, "escape is not UTF-8"))
}

impl LunUrl {
    pub fn parse(spec: &str) -> Result<LunUrl> {
        if spec.is_empty() {
            return Err(bad(spec, "empty"));
        }
        let Some((scheme, rest)) = spec.split_once("://") else {
            if let Some(p) = spec.strip_prefix("file:") {
                return Ok(LunUrl::File(PathBuf::from(p)));
            }
            return Ok(LunUrl::File(PathBuf::from(spec)));
        };
        match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad(spec, "file URLs take an absolute path: file:///path"));
                }
                Ok(LunUrl::File(PathBuf::from(unescape(spec, rest)?)))
            }
            "nbd" | "nbd+tcp" => {
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                let (host, port) = host_port(spec, authority, NBD_DEFAULT_PORT)?;
                let (path, query) = path.split_once('?').unwrap_or((path, ""));
                if !query.is_empty() {
                    return Err(bad(
                        spec,
                        "nbd:// takes no query; use nbd+unix:// for sockets",
                    ));
                }
                Ok(LunUrl::Nbd {
                    addr: NbdAddr::Tcp { host, port },
                    export: unescape(spec, path)?,
                })
            }
            "nbd+unix" => {
                let rest = rest.strip_prefix('/').ok_or_else(|| {
                    bad(
                        spec,
                        "nbd+unix URLs have no host: nbd+unix:///export?socket=/path",
                    )
                })?;
                let (path, query) = rest
                    .split_once('?')
                    .ok_or_else(|| bad(spec, "missing ?socket=/path"))?;
                let mut socket = None;
                for kv in query.split('&') {
                    match kv.split_once('=') {
                        Some(("socket", v)) => socket = Some(PathBuf::from(unescape(spec, v)?)),
                        _ => return Err(bad(spec, format!("unknown parameter {kv:?}"))),
                    }
                }
                let socket = socket.ok_or_else(|| bad(spec, "missing ?socket=/path"))?;
                Ok(LunUrl::Nbd {
                    addr: NbdAddr::Unix(socket),
                    export: unescape(spec, path)?,
                })
            }
            "iscsi" => parse_iscsi(spec, rest, &|k| std::env::var(k).ok()).map(LunUrl::Iscsi),
            other => Err(bad(spec, format!("unknown scheme {other:?}"))),
        }
    }
}

/// Split `host[:port]` or `[v6]:port`.
fn host_port(spec: &str, authority: &str, default: u16) -> Result<(String, u16)> {
    if authority.is_empty() {
        return Err(bad(spec, "missing host"));
    }
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or_else(|| bad(spec, "unclosed ["))?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad(spec, "missing host"));
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| bad(spec, format!("bad port {p:?}")))?,
        None => default,
    };
    Ok((host, port))
}

/// The part of an iscsi:// URL after the scheme; `env` reads the environment.
fn parse_iscsi(spec: &str, rest: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<IscsiUrl> {
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = main
        .split_once('/')
        .ok_or_else(|| bad(spec, "missing /target-iqn/lun"))?;
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = host_port(spec, hostport, ISCSI_DEFAULT_PORT)?;
    let (target, lun) = path
        .rsplit_once('/')
        .ok_or_else(|| bad(spec, "missing LUN number: iscsi://host/target-iqn/lun"))?;
    let target = unescape(spec, target)?;
    if target.is_empty() || target.contains('/') {
        return Err(bad(spec, "the target name must be one path element"));
    }
    let lun: u16 = lun
        .parse()
        .map_err(|_| bad(spec, format!("LUN {lun:?} is not a number from 0 to 65535")))?;
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let (mut user, mut password) = match userinfo {
        Some(u) => match u.split_once('%') {
            Some((u, p)) => (Some(unescape(spec, u)?), Some(unescape(spec, p)?)),
            None => (Some(unescape(spec, u)?), None),
        },
        None => (None, None),
    };
    user = nonempty(user).or_else(|| nonempty(env("LIBISCSI_CHAP_USERNAME")));
    password = nonempty(password).or_else(|| nonempty(env("LIBISCSI_CHAP_PASSWORD")));
    let mut target_user = nonempty(env("LIBISCSI_CHAP_TARGET_USERNAME"));
    let mut target_password = nonempty(env("LIBISCSI_CHAP_TARGET_PASSWORD"));
    let mut initiator = nonempty(env("VMFS_INITIATOR_NAME"));
    let mut header_digest = None;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(spec, format!("argument {k:?} has no value", k = kv)))?;
        let v = unescape(spec, v)?;
        match k {
            "initiator_name" | "initiator-name" => initiator = Some(v),
            "target_user" => target_user = Some(v),
            "target_password" => target_password = Some(v),
            "header_digest" => match v.as_str() {
                "none" | "crc32c" | "none-crc32c" | "crc32c-none" => header_digest = Some(v),
                _ => {
                    return Err(bad(
                        spec,
                        format!(
                        "header_digest {v:?}: expected none, crc32c, none-crc32c or crc32c-none"
                    ),
                    ))
                }
            },
            _ => return Err(bad(spec, format!("unknown argument {k:?}"))),
        }
    }
    let chap = match (user, password) {
        (Some(user), Some(p)) => Some(Chap { user, secret: Secret(p) }),
        (None, None) => None,
        (Some(u), None) => {
            return Err(bad(spec, format!("CHAP user {u:?} has no password (give it as user%password@ or in LIBISCSI_CHAP_PASSWORD)")))
        }
        (None, Some(_)) => return Err(bad(spec, "a CHAP password without a user")),
    };
    let target_chap = match (target_user, target_password) {
        (Some(user), Some(p)) => Some(Chap { user, secret: Secret(p) }),
        (None, None) => None,
        _ => {
            return Err(bad(spec, "mutual CHAP needs both target_user and target_password (or LIBISCSI_CHAP_TARGET_USERNAME and _PASSWORD)"))
        }
    };
    if target_chap.is_some() && chap.is_none() {
        return Err(bad(
            spec,
            "mutual CHAP needs the initiator's CHAP credentials too",
        ));
    }
    Ok(IscsiUrl {
        host,
        port,
        target,
        lun,
        chap,
        target_chap,
        initiator,
        header_digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_forms() {
        assert_eq!(
            LunUrl::parse("/tmp/a.img").unwrap(),
            LunUrl::File("/tmp/a.img".into())
        );
        assert_eq!(
            LunUrl::parse("file:///tmp/a%20b.img").unwrap(),
            LunUrl::File("/tmp/a b.img".into())
        );
        assert_eq!(
            LunUrl::parse("file:/tmp/x").unwrap(),
            LunUrl::File("/tmp/x".into())
        );
        assert_eq!(
            LunUrl::parse("nbd://127.0.0.1:10900/disk0").unwrap(),
            LunUrl::Nbd {
                addr: NbdAddr::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10900
                },
                export: "disk0".into()
            }
        );
        assert_eq!(
            LunUrl::parse("nbd://server").unwrap(),
            LunUrl::Nbd {
                addr: NbdAddr::Tcp {
                    host: "server".into(),
                    port: 10809
                },
                export: "".into()
            }
        );
        assert_eq!(
            LunUrl::parse("nbd://[::1]:99/e").unwrap(),
            LunUrl::Nbd {
                addr: NbdAddr::Tcp {
                    host: "::1".into(),
                    port: 99
                },
                export: "e".into()
            }
        );
        assert_eq!(
            LunUrl::parse("nbd+unix:///exp?socket=/run/s.sock").unwrap(),
            LunUrl::Nbd {
                addr: NbdAddr::Unix("/run/s.sock".into()),
                export: "exp".into()
            }
        );
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_iscsi_urls() {
        let u = parse_iscsi("x", "10.0.0.1/iqn.2026-11.org.vmfs:t1/1", &no_env).unwrap();
        assert_eq!(u.host, "10.0.0.1");
        assert_eq!(u.port, 3260);
        assert_eq!(u.target, "iqn.2026-11.org.vmfs:t1");
        assert_eq!(u.lun, 1);
        assert!(u.chap.is_none());
        assert_eq!(
            u.redacted(),
            "iscsi://10.0.0.1:3260/iqn.2026-11.org.vmfs:t1/1"
        );

        let u = parse_iscsi(
            "x",
            "alice%s3cr%25t@[::1]:3261/iqn.x:y/0?target_user=tgt&target_password=pw2&initiator_name=iqn.i:h",
            &no_env,
        )
        .unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, 3261);
        let chap = u.chap.clone().unwrap();
        assert_eq!(
            (chap.user.as_str(), chap.secret.0.as_str()),
            ("alice", "s3cr%t")
        );
        assert_eq!(u.target_chap.clone().unwrap().secret.0, "pw2");
        assert_eq!(u.initiator.as_deref(), Some("iqn.i:h"));
        let shown = u.redacted();
        assert!(!shown.contains("s3cr") && !shown.contains("pw2"), "{shown}");
        assert!(
            !format!("{u:?}").contains("s3cr"),
            "Debug leaks the password"
        );

        let env = |k: &str| match k {
            "LIBISCSI_CHAP_USERNAME" => Some("bob".to_string()),
            "LIBISCSI_CHAP_PASSWORD" => Some("fromenv".to_string()),
            _ => None,
        };
        let u = parse_iscsi("x", "h/iqn.x:y/3", &env).unwrap();
        assert_eq!(u.chap.unwrap().secret.0, "fromenv");
    }

    #[test]
    fn iscsi_errors_never_show_passwords() {
        for u in [
            "iscsi://alice%hunter2@h/iqn.x:y/notanumber",
            "iscsi://alice%hunter2@h/iqn.x:y/1?bogus=1",
            "iscsi://h/iqn.x:y/1?target_password=hunter2",
        ] {
            let e = LunUrl::parse(u).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
        for u in [
            "iscsi://h",
            "iscsi://h/iqn",
            "iscsi:///iqn.x/1",
            "iscsi://h/iqn.x/70000",
            "iscsi://h/a/b/1",
            "iscsi://h/iqn.x/1?header_digest=md5",
        ] {
            assert!(LunUrl::parse(u).is_err(), "{u} accepted");
        }
    }

    #[test]
    fn rejects_nonsense() {
        for u in [
            "",
            "nbd://",
            "nbd://h:port/x",
            "nbd+unix:///x",
            "iscsi2://x",
            "file://rel",
            "nbd+unix:///e?sock=1",
            "nbd://h/%zz",
        ] {
            assert!(LunUrl::parse(u).is_err(), "{u} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = LunUrl::parse(&s);
        }
    }
}
