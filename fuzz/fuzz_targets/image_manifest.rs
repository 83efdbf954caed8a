//! Image manifests, launch permissions, image state files and snapshot
//! permissions (the same envelope).
#![no_main]
use std::path::Path;

use blocksnap::format::image;
use blocksnap::error::Location;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = &Location::from(Path::new("fuzz"));
    let _ = image::decode_image(data, p);
    let _ = image::decode_permissions(data, p);
    let _ = image::decode_state(data, p);
    let _ = image::decode_snapshot_permissions(data, p);
});
