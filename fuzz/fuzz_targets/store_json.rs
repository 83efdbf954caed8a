//! `store.json`.
#![no_main]
use std::path::Path;

use blocksnap::format::region;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = region::decode_region_info(data, Path::new("fuzz"), "local");
});
