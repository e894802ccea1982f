#![no_main]
//! Any line must parse to a control request or an error reply, never a
//! panic; a request that parses encodes back to one that parses the same,
//! and its arguments decode into a command's typed struct or an error.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match host::proto::parse_request(data) {
        Ok(r) => {
            let again = host::proto::parse_request(&serde_json::to_vec(&r).unwrap())
                .unwrap_or_else(|(e, _)| panic!("a parsed request does not parse again: {e}"));
            assert_eq!(again, r);
            let _ = host::proto::arguments::<std::collections::HashMap<String, String>>(
                &r.command,
                &r.arguments,
            );
        }
        Err((e, _)) => {
            let line = host::proto::Reply::err(&e, None).line();
            assert!(line.ends_with(b"\n"));
        }
    }
});
