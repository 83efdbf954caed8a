//! `instance.json`.
#![no_main]
use std::path::Path;

use blocksnap::format::instance;
use blocksnap::error::Location;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = instance::decode(data, &Location::from(Path::new("fuzz")));
});
