//! The NBD client's reply parsing: any bytes as a server's answers to a
//! read and a block status query. Must return, never panic or allocate
//! past its 64 MiB chunk bound.
#![no_main]
use blocksnap::volume::nbd::parse_replies;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_replies(data);
});
