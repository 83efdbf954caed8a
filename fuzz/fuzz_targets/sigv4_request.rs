//! A request to `serve` before it is trusted: routing, EC2 form
//! parameters, the SigV4 header's parse and the signature check. Must
//! return, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blocksnap::server::examine_untrusted(data);
});
