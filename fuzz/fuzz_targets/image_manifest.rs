//! Image manifests, launch permissions and image state files.
#![no_main]
use std::path::Path;

use blocksnap::image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz");
    let _ = image::decode_image(data, p);
    let _ = image::decode_permissions(data, p);
    let _ = image::decode_state(data, p);
});
