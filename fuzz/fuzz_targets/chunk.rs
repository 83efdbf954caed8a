//! Chunk decoding (plain chunks, and deltas over a fixed base): any bytes,
//! any name. Must return, never panic or
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
    // The base of the corpus's page delta: deltas decode over it.
    let base: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let _ = chunk::decode_delta(&id, data, &base, &mut out, &blocksnap::id::Namer::Plain);
});
