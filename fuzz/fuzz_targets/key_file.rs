//! Key records, key files and the encryption settings: JSON from the store
//! or anywhere on disk. The Argon2id cost a file asks for is bounded.
#![no_main]
use std::path::Path;

use blocksnap::error::Location;
use blocksnap::format::key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = &Location::from(Path::new("fuzz"));
    if let Ok(r) = key::decode_record(data, p)
        && let Some(w) = &r.wrapped
    {
        let mut cheap = w.clone();
        cheap.memory_kib = cheap.memory_kib.min(64);
        cheap.iterations = cheap.iterations.min(1);
        let _ = key::unwrap(&cheap, &r.key_id, b"x", p);
    }
    let _ = key::decode_key_file(data, p);
    let _ = key::decode_defaults(data, p);
});
