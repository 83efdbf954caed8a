//! Sealed (encrypted) chunk decoding under a fixed key: any bytes, any
//! name. Header checks, authentication and the plain decoders behind it
//! must return, never panic.
#![no_main]
use blocksnap::ChunkId;
use blocksnap::format::chunk;
use blocksnap::format::key::{DataKey, Material};
use blocksnap::id::KeyId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = DataKey::new(KeyId([1; 16]), &Material::from_bytes([7; 32]));
    let id = ChunkId([3; 32]);
    let _ = chunk::sealed_key_of(data);
    let _ = chunk::base_of(data);
    if let Ok(plain) = chunk::unseal(&key, &id, data.to_vec()) {
        let _ = chunk::decode_into(&id, &plain, &mut Vec::new(), &key.namer());
    }
});
