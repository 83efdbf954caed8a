//! Encrypted (version 2 and 3) manifest decoding: the keyless parts (meta,
//! name table) and, under a fixed key, the sealed meta and block list.
#![no_main]
use std::path::Path;
use std::sync::Arc;

use blocksnap::Manifest;
use blocksnap::error::Location;
use blocksnap::format::key::{DataKey, Material};
use blocksnap::id::KeyId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = &Location::from(Path::new("fuzz"));
    let key = Arc::new(DataKey::new(KeyId([1; 16]), &Material::from_bytes([7; 32])));
    let _ = Manifest::decode_with(data, p, &|_| Ok(key.clone()));
    let _ = Manifest::chunk_names(data, p);
    if let Some(n) = Manifest::meta_prefix_len(data) {
        let head = &data[..n.min(data.len())];
        let _ = Manifest::decode_meta(head, p, data.len() as u64, None);
        let _ = Manifest::decode_meta(head, p, data.len() as u64, Some(&key));
    }
});
