//! `regions.json` at a store's root: which region names live on an
//! S3-compatible object store, and where.
//!
//! ```json
//! {"format": "blocksnap-regions", "version": 1,
//!  "regions": {"NAME": {"url": "s3://BUCKET/PREFIX", "endpoint": "...", "allow-http": false}}}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::format::check_format;

pub const REGIONS_FORMAT: &str = "blocksnap-regions";
pub const REGIONS_VERSION: u32 = 1;
/// The most bytes `regions.json` may hold.
pub const MAX_REGIONS_JSON: u64 = 1 << 20;

/// Where a region lives on an object store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RegionDef {
    /// `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub url: String,
    /// The S3 endpoint (`http://127.0.0.1:8333`); AWS itself when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Allow a plain-HTTP endpoint.
    #[serde(default)]
    pub allow_http: bool,
}

#[derive(Serialize, Deserialize)]
pub struct RegionsFile {
    pub format: String,
    pub version: u32,
    pub regions: BTreeMap<String, RegionDef>,
}

/// An `s3://` URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<S3Url> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "region URL {url:?} {why}: use s3://BUCKET or s3://BUCKET/PREFIX"
            ))
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(bad(
                "has no valid bucket name (3-63 lowercase letters, digits, '-' and '.')",
            ));
        }
        let prefix = prefix.trim_matches('/');
        let prefix_ok = prefix.split('/').all(|p| {
            prefix.is_empty()
                || (!p.is_empty() && p != "." && p != ".." && !p.contains(['\\', '\0']))
        });
        if !prefix_ok {
            return Err(bad("has an invalid prefix"));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

/// Decodes `regions.json`; `path` names it in errors.
pub fn decode_regions(bytes: &[u8], at: &Location) -> Result<BTreeMap<String, RegionDef>> {
    let what = "region definitions";
    let corrupt = Error::corrupt_file(what, at);
    let file: RegionsFile = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    check_format(
        what,
        at,
        &file.format,
        REGIONS_FORMAT,
        file.version,
        REGIONS_VERSION,
    )?;
    for def in file.regions.values() {
        S3Url::parse(&def.url).map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(file.regions)
}

/// Encodes `regions.json`.
pub fn encode_regions(regions: BTreeMap<String, RegionDef>) -> Vec<u8> {
    let file = RegionsFile {
        format: REGIONS_FORMAT.into(),
        version: REGIONS_VERSION,
        regions,
    };
    let mut json = serde_json::to_vec_pretty(&file).expect("regions serialize");
    json.push(b'\n');
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        let u = S3Url::parse("s3://my-bucket/team/a/").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.prefix.as_str()),
            ("my-bucket", "team/a")
        );
        assert_eq!(S3Url::parse("s3://bkt").unwrap().prefix, "");
        for bad in [
            "http://b/x",
            "s3://",
            "s3://B/x",
            "s3://ab",
            "s3://bkt/a/../b",
            "s3://bkt/a//b",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_released_regions_json_still_reads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/v1-all-formats/regions.json");
        let bytes = std::fs::read(&path).unwrap();
        let at = Location::from(path.as_path());
        let regions = decode_regions(&bytes, &at).unwrap();
        assert_eq!(
            regions["eu-west-1"],
            RegionDef {
                url: "s3://blocksnap-test/team/a".into(),
                endpoint: Some("http://127.0.0.1:8333".into()),
                allow_http: true,
            }
        );
        assert_eq!(regions["us-east-1"].endpoint, None);
        // What this version writes reads back the same.
        assert_eq!(
            decode_regions(&encode_regions(regions.clone()), &at).unwrap(),
            regions
        );
        let newer = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        let e = decode_regions(newer.as_bytes(), &at).unwrap_err();
        assert!(e.to_string().contains("newer blocksnap"), "{e}");
    }
}
