//! The control protocol, version 1: JSON lines over the control socket, in
//! the spirit of QMP. Written up in `docs/CONTROL.md`.
//!
//! ```text
//! host   -> {"vmfs-host":{"protocol":1,"datastore":"…","host":"…","slot":0,"pid":42}}
//! client -> {"protocol":1,"command":"info","arguments":{},"id":7}
//! host   -> {"return":{…},"id":7}
//!        or {"error":{"class":"NotFound","message":"…"},"id":7}
//! ```
//!
//! One request per line, one reply per request, in order; a connection may
//! carry many. A line longer than [`MAX_LINE`] is answered with a
//! `BadRequest` error and the connection is closed (the rest of the line
//! cannot be told from the next request). `id`, when given, is echoed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{HostError, Result};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The longest request line (bytes, newline included).
pub const MAX_LINE: usize = 1 << 20;

/// The first line a host sends on a new connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Greeting {
    pub protocol: u32,
    /// The datastore this host serves (its volume UUID).
    pub datastore: String,
    /// This host's UUID, slot and process.
    pub host: String,
    pub slot: u32,
    pub pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GreetingLine {
    #[serde(rename = "vmfs-host")]
    pub greeting: Greeting,
}

/// One request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub protocol: u32,
    pub command: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub arguments: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// An error as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub class: String,
    pub message: String,
}

/// One reply: exactly one of `return` and `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    #[serde(rename = "return", default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl Reply {
    pub fn ok(v: Value, id: Option<Value>) -> Reply {
        Reply {
            ret: Some(v),
            error: None,
            id,
        }
    }

    pub fn err(e: &HostError, id: Option<Value>) -> Reply {
        Reply {
            ret: None,
            error: Some(ErrorBody {
                class: e.class().to_string(),
                message: e.to_string(),
            }),
            id,
        }
    }

    /// The reply as one line (newline included).
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(r#"{{"error":{{"class":"Failed","message":"reply not encodable: {e}"}}}}"#)
                .into_bytes()
        });
        v.push(b'\n');
        v
    }

    /// The result, or the error the host replied with.
    pub fn into_result(self) -> Result<Value> {
        match (self.ret, self.error) {
            (_, Some(e)) => Err(HostError::Remote {
                class: e.class,
                message: e.message,
            }),
            (Some(v), None) => Ok(v),
            (None, None) => Err(HostError::Agent(
                "the host's reply has neither a result nor an error".into(),
            )),
        }
    }
}

/// Parse one request line. Never panics; every failure is a `BadRequest`
/// or `VersionMismatch` error with the request's id when it could be read.
pub fn parse_request(line: &[u8]) -> std::result::Result<Request, (HostError, Option<Value>)> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        (
            HostError::BadRequest(format!("not a JSON object on one line: {e}")),
            None,
        )
    })?;
    let id = v.get("id").cloned();
    let Some(obj) = v.as_object() else {
        return Err((
            HostError::BadRequest("a request is a JSON object".into()),
            id,
        ));
    };
    match obj.get("protocol") {
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
        Some(Value::Number(n)) => {
            return Err((
                HostError::Version(format!(
                    "this host speaks control protocol {VERSION}; the request says {n}: use a vmfs of the same version as the host"
                )),
                id,
            ))
        }
        Some(_) => return Err((HostError::BadRequest("\"protocol\" is a number".into()), id)),
        None => {
            return Err((
                HostError::Version(format!(
                    "the request does not say its protocol version (this host speaks {VERSION})"
                )),
                id,
            ))
        }
    }
    serde_json::from_value(v).map_err(|e| (HostError::BadRequest(e.to_string()), id))
}

/// A command's arguments as its typed struct.
pub fn arguments<T: serde::de::DeserializeOwned>(command: &str, v: &Value) -> Result<T> {
    let v = if v.is_null() {
        Value::Object(Default::default())
    } else {
        v.clone()
    };
    serde_json::from_value(v)
        .map_err(|e| HostError::BadRequest(format!("arguments of {command}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        let r = parse_request(br#"{"protocol":1,"command":"info","id":3}"#).unwrap();
        assert_eq!(r.command, "info");
        assert_eq!(r.id, Some(Value::from(3)));
        let bad: &[(&[u8], &str)] = &[
            (b"garbage", "BadRequest"),
            (b"[1,2]", "BadRequest"),
            (br#"{"protocol":"1","command":"info"}"#, "BadRequest"),
            (br#"{"protocol":2,"command":"info"}"#, "VersionMismatch"),
            (br#"{"command":"info"}"#, "VersionMismatch"),
            (br#"{"protocol":1,"command":5}"#, "BadRequest"),
            (
                br#"{"protocol":1,"command":"info","extra":1}"#,
                "BadRequest",
            ),
            (b"\xff\xfe", "BadRequest"),
        ];
        for (line, class) in bad {
            let (e, _) = parse_request(line).unwrap_err();
            assert_eq!(e.class(), *class, "{}", String::from_utf8_lossy(line));
        }
        let (_, id) = parse_request(br#"{"protocol":9,"command":"x","id":"a"}"#).unwrap_err();
        assert_eq!(id, Some(Value::from("a")));
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply::ok(serde_json::json!({"a": 1}), Some(Value::from(1)));
        let back: Reply = serde_json::from_slice(&r.line()).unwrap();
        assert_eq!(back.into_result().unwrap()["a"], 1);
        let e = Reply::err(&HostError::NotFound("no such file: x".into()), None);
        let back: Reply = serde_json::from_slice(&e.line()).unwrap();
        match back.into_result() {
            Err(HostError::Remote { class, message }) => {
                assert_eq!(class, "NotFound");
                assert_eq!(message, "no such file: x");
            }
            r => panic!("{r:?}"),
        }
    }
}
