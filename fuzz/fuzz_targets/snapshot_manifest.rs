//! Snapshot manifests: whole-file and meta-only decoding.
#![no_main]
use std::path::Path;

use blocksnap::Manifest;
use blocksnap::error::Location;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = &Location::from(Path::new("fuzz"));
    let _ = Manifest::decode(data, p);
    if let Some(n) = Manifest::meta_prefix_len(data) {
        let _ = Manifest::decode_meta(&data[..n.min(data.len())], p, data.len() as u64, None);
    }
});
