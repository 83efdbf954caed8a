//! `store.json` in a region's root: the region's name, its default owner
//! and when it was created.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::format::check_format_versions;
use crate::id::AccountId;

pub const STORE_FORMAT: &str = "blocksnap-region";
/// Version 2: a local region's chunks fan out by two hex digits (see
/// `store::chunk_store::Fanout`). Version 1 (four) is still read and
/// written as it is.
pub const STORE_VERSION: u32 = 2;
pub const MAX_STORE_JSON: u64 = 64 << 10;
/// Contents of `store.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionInfo {
    pub format: String,
    pub version: u32,
    pub region: String,
    /// The default account: owner of what is created without `--account`.
    pub owner: AccountId,
    pub created: String,
}

/// Decodes a `store.json` for region `name`; `path` names it in errors.
pub fn decode_region_info(bytes: &[u8], at: &Location, name: &str) -> Result<RegionInfo> {
    let corrupt = Error::corrupt_file("store description", at);
    if bytes.len() as u64 > MAX_STORE_JSON {
        return Err(corrupt(format!("larger than {MAX_STORE_JSON} bytes")));
    }
    let info: RegionInfo = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let (format, version) = (&info.format, info.version);
    check_format_versions(
        "store description",
        at,
        format,
        STORE_FORMAT,
        version,
        1,
        STORE_VERSION,
    )?;
    if info.region != name {
        return Err(corrupt(format!(
            "it names region {:?}, but is opened as {name:?}: a region keeps its name, so \
             open it (or define it with `region add`) as {:?}",
            info.region, info.region
        )));
    }
    Ok(info)
}

/// Encodes `store.json`.
pub fn encode_region_info(info: &RegionInfo) -> Vec<u8> {
    serde_json::to_vec_pretty(info).expect("region info serializes")
}
