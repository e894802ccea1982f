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
}

/// The IANA port of NBD, and QEMU's default.
pub const NBD_DEFAULT_PORT: u16 = 10809;

fn bad(url: &str, reason: impl Into<String>) -> LunError {
    LunError::BadUrl {
        url: url.to_string(),
        reason: reason.into(),
    }
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
                if authority.is_empty() {
                    return Err(bad(spec, "missing host"));
                }
                let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                    // [v6addr]:port
                    let (h, p) = h.split_once(']').ok_or_else(|| bad(spec, "unclosed ["))?;
                    (h.to_string(), p.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h.to_string(), Some(p)),
                        None => (authority.to_string(), None),
                    }
                };
                let port = match port {
                    Some(p) => p
                        .parse()
                        .map_err(|_| bad(spec, format!("bad port {p:?}")))?,
                    None => NBD_DEFAULT_PORT,
                };
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
            other => Err(bad(spec, format!("unknown scheme {other:?}"))),
        }
    }
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
