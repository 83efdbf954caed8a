//! `store.json`.
#![no_main]
use std::path::Path;

use blocksnap::format::region;
use blocksnap::error::Location;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = region::decode_region_info(data, &Location::from(Path::new("fuzz")), "local");
});
