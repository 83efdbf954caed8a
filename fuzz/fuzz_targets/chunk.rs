//! Chunk decoding: any bytes, any name. Must return, never panic or
//! allocate past the 8 MiB raw-length bound.
#![no_main]
use blocksnap::ChunkId;
use blocksnap::format::chunk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = ChunkId::of(data.get(12..).unwrap_or(&[]));
    let mut out = Vec::new();
    let _ = chunk::decode_into(&id, data, &mut out, &blocksnap::id::Namer::Plain);
    let _ = chunk::decode(&ChunkId([0; 32]), data);
    let _ = chunk::base_of(data);
});
