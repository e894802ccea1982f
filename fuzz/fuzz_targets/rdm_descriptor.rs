#![no_main]
//! A raw device mapping's descriptor: never a panic, and whatever parses
//! encodes back to a descriptor that parses to the same mapping.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = rdm::Mapping::parse_file(data, "fuzz") {
        let again = rdm::Mapping::parse(&m.encode(), "fuzz").expect("re-encoded mapping parses");
        assert_eq!(again, m);
    }
});
