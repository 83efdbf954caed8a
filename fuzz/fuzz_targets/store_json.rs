//! `store.json`.
#![no_main]
use std::path::Path;

use blocksnap::region;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = region::decode_store_info(data, Path::new("fuzz"), "local");
});
