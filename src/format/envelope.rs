//! The JSON envelope of image files, snapshot permission files and other
//! small records: `{"Format", "Version", "Checksum", "Body"}`, whose
//! checksum is the BLAKE3 of the body's exact bytes, so an edited or
//! truncated file is reported, never used.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Location, Result};

/// The envelope version (frozen: a new meaning is a new version).
pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope<'a> {
    format: String,
    version: u32,
    checksum: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

pub fn encode<T: Serialize>(format: &str, body: &T) -> Vec<u8> {
    encode_version(format, VERSION, body)
}

/// [`encode`] for a format that has gone past version 1 (a new field or
/// meaning), written as `version`.
pub fn encode_version<T: Serialize>(format: &str, version: u32, body: &T) -> Vec<u8> {
    let body = serde_json::to_string_pretty(body).expect("image data serializes");
    let checksum = blake3::hash(body.as_bytes()).to_hex().to_string();
    let raw = RawValue::from_string(body).expect("serde_json output is valid JSON");
    let mut out = serde_json::to_vec_pretty(&Envelope {
        format: format.into(),
        version,
        checksum,
        body: &raw,
    })
    .expect("envelope serializes");
    out.push(b'\n');
    out
}

pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    format: &str,
    what: &'static str,
    at: &Location,
) -> Result<T> {
    decode_versions(bytes, format, what, at, VERSION)
}

/// [`decode`] for a format of which versions `1..=supported` were written.
pub fn decode_versions<T: DeserializeOwned>(
    bytes: &[u8],
    format: &str,
    what: &'static str,
    at: &Location,
    supported: u32,
) -> Result<T> {
    let corrupt = Error::corrupt_file(what, at);
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON ({e})")))?;
    super::check_format_versions(
        what,
        at,
        &env.format,
        format,
        env.version,
        VERSION,
        supported,
    )?;
    if blake3::hash(env.body.get().as_bytes()).to_hex().as_str() != env.checksum {
        return Err(corrupt(
            "checksum mismatch: the file was edited or damaged".into(),
        ));
    }
    serde_json::from_str(env.body.get()).map_err(|e| corrupt(e.to_string()))
}
