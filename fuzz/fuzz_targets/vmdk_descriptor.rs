#![no_main]
//! Any bytes must parse to a VMDK descriptor or an error naming the line,
//! never a panic; a descriptor that parses prints back to one that parses
//! the same.
use libfuzzer_sys::fuzz_target;
use snapshot::descriptor::Descriptor;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Descriptor::parse(data, "fuzz.vmdk") {
        let again = Descriptor::parse(d.to_text().as_bytes(), "fuzz.vmdk")
            .expect("a printed descriptor parses");
        assert_eq!(again, d);
    }
});
