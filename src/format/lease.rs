//! `leases/<snap>/<key>.json` in a region: a lazy volume (an overlay) on
//! some host still reads the snapshot, so it must not be deleted. The key
//! is a digest of host and overlay path ([`lease_key`]). Format name and
//! version (frozen: do not modify).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::format::check_format;

pub const LEASE_FORMAT: &str = "blocksnap-lease";
pub const LEASE_VERSION: u32 = 1;
/// The longest lease file read.
pub const MAX_LEASE: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Lease {
    pub format: String,
    pub version: u32,
    /// The overlay's absolute path on `host`.
    pub overlay: String,
    pub host: String,
}

impl Lease {
    pub fn new(host: &str, overlay: &str) -> Lease {
        Lease {
            format: LEASE_FORMAT.into(),
            version: LEASE_VERSION,
            overlay: overlay.into(),
            host: host.into(),
        }
    }

    /// The key it is stored under.
    pub fn key(&self) -> String {
        lease_key(&self.host, &self.overlay)
    }
}

/// The name of the lease of `overlay` on `host`: 32 hex digits.
pub fn lease_key(host: &str, overlay: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(host.as_bytes());
    h.update(&[0]);
    h.update(overlay.as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

pub fn decode(bytes: &[u8], at: &Location) -> Result<Lease> {
    let lease: Lease = serde_json::from_slice(bytes).map_err(|e| Error::CorruptFile {
        what: "lease",
        location: at.clone(),
        reason: e.to_string(),
    })?;
    check_format(
        "lease",
        at,
        &lease.format,
        LEASE_FORMAT,
        lease.version,
        LEASE_VERSION,
    )?;
    Ok(lease)
}

pub fn encode(lease: &Lease) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(lease).expect("lease serializes");
    json.push(b'\n');
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_released_lease_still_reads_and_a_newer_one_is_named() {
        let bytes = include_bytes!("../../testdata/v1-all-formats/lease.json");
        let at = Location::from(Path::new("lease.json"));
        let l = decode(bytes, &at).unwrap();
        assert_eq!(l.overlay, "/var/lib/vm/i-0123456789abcdef0/xvda.overlay");
        assert_eq!(l.key().len(), 32);
        assert_eq!(decode(&encode(&l), &at).unwrap(), l);
        let newer = String::from_utf8_lossy(bytes).replace("\"Version\": 1", "\"Version\": 2");
        let e = decode(newer.as_bytes(), &at).unwrap_err();
        assert!(e.to_string().contains("newer blocksnap"), "{e}");
    }
}
