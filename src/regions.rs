//! Region definitions: which region names live on an S3-compatible object
//! store. Kept in `<store>/regions.json`; a name not defined there is a
//! directory of the store root. Credentials are never stored here: they
//! come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result, check_format};
use crate::store::{Durability, read_bounded, write_atomic};

const FORMAT: &str = "blocksnap-regions";
const VERSION: u32 = 1;
const FILE: &str = "regions.json";
const MAX_LEN: u64 = 1 << 20;

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
struct RegionsFile {
    format: String,
    version: u32,
    regions: BTreeMap<String, RegionDef>,
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

fn read_file(store_root: &Path) -> Result<BTreeMap<String, RegionDef>> {
    let path = store_root.join(FILE);
    let Some(bytes) = read_bounded(&path, "region definitions", MAX_LEN)? else {
        return Ok(BTreeMap::new());
    };
    let corrupt = Error::corrupt_file("region definitions", &path);
    let file: RegionsFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let what = "region definitions";
    check_format(what, &path, &file.format, FORMAT, file.version, VERSION)?;
    for def in file.regions.values() {
        S3Url::parse(&def.url).map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(file.regions)
}

fn write_file(store_root: &Path, regions: BTreeMap<String, RegionDef>) -> Result<()> {
    let file = RegionsFile {
        format: FORMAT.into(),
        version: VERSION,
        regions,
    };
    let mut json = serde_json::to_vec_pretty(&file).expect("regions serialize");
    json.push(b'\n');
    std::fs::create_dir_all(store_root).ctx("create store directory", store_root)?;
    write_atomic(&store_root.join(FILE), &json, Durability::Now)
}

/// The definition of region `name`, if it lives on an object store.
pub fn lookup(store_root: &Path, name: &str) -> Result<Option<RegionDef>> {
    Ok(read_file(store_root)?.remove(name))
}

/// Every region defined on an object store, by name.
pub fn defined(store_root: &Path) -> Result<BTreeMap<String, RegionDef>> {
    read_file(store_root)
}

/// Names of the local regions: directories of the store root that hold a
/// `store.json`.
pub fn local(store_root: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    crate::store::for_each_entry(store_root, |p| {
        if p.join("store.json").is_file()
            && let Some(n) = p.file_name().and_then(|n| n.to_str())
        {
            names.push(n.to_string());
        }
        Ok(())
    })?;
    names.sort();
    Ok(names)
}

/// Holds `<store>/regions.lock` exclusively while `regions.json` is read,
/// changed and written back, so two `region add`s never lose one.
fn locked<T>(store_root: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::fs::create_dir_all(store_root).ctx("create store directory", store_root)?;
    let _lock = crate::backend::flock_file(
        &store_root.join("regions.lock"),
        crate::sys::LockMode::Exclusive,
        "region definitions",
        None,
    )?;
    f()
}

/// Defines region `name` on an object store. Refuses a name already in
/// use, by a definition or by a local region directory.
pub fn add(store_root: &Path, name: &str, def: RegionDef) -> Result<()> {
    locked(store_root, || add_locked(store_root, name, def))
}

fn add_locked(store_root: &Path, name: &str, def: RegionDef) -> Result<()> {
    crate::region::validate_region_name(name)?;
    S3Url::parse(&def.url)?;
    if let Some(e) = &def.endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(Error::InvalidArgument(format!(
            "endpoint {e:?} is not an http:// or https:// URL"
        )));
    }
    let mut regions = read_file(store_root)?;
    refuse_taken(store_root, &regions, name)?;
    regions.insert(name.to_string(), def);
    write_file(store_root, regions)
}

/// Fails if `name` is taken: defined in `regions`, or a local region.
fn refuse_taken(
    store_root: &Path,
    regions: &BTreeMap<String, RegionDef>,
    name: &str,
) -> Result<()> {
    if let Some(old) = regions.get(name) {
        return Err(Error::AlreadyExists(format!(
            "region {name} is already defined ({}): remove it first with `blocksnap region remove {name}`",
            old.url
        )));
    }
    if store_root.join(name).join("store.json").exists() {
        return Err(Error::AlreadyExists(format!(
            "region {name} already exists as the local directory {}: pick another name",
            store_root.join(name).display()
        )));
    }
    Ok(())
}

/// Creates local region `name`, the directory `<store>/name`. Refuses a
/// name already in use, by a definition or by a local region.
pub fn add_local(store_root: &Path, name: &str) -> Result<crate::region::Region> {
    crate::region::validate_region_name(name)?;
    locked(store_root, || {
        refuse_taken(store_root, &read_file(store_root)?, name)?;
        crate::region::Region::open_or_create(store_root, name)
    })
}

/// Forgets the definition of region `name`. Nothing stored there is
/// deleted.
pub fn remove(store_root: &Path, name: &str) -> Result<RegionDef> {
    locked(store_root, || remove_locked(store_root, name))
}

fn remove_locked(store_root: &Path, name: &str) -> Result<RegionDef> {
    let mut regions = read_file(store_root)?;
    let local = store_root.join(name);
    if !regions.contains_key(name) && local.join("store.json").exists() {
        return Err(Error::InvalidArgument(format!(
            "region {name} is a local directory ({}): blocksnap never deletes a region's data; \
             remove the directory yourself if you mean to",
            local.display()
        )));
    }
    let def = regions.remove(name).ok_or_else(|| {
        Error::NotFound(format!(
            "region {name} is not defined on an object store: `blocksnap region list` shows the regions"
        ))
    })?;
    write_file(store_root, regions)?;
    Ok(def)
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
    fn add_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let def = RegionDef {
            url: "s3://bkt/p".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
        };
        add(dir.path(), "eu-west-1", def.clone()).unwrap();
        assert!(add(dir.path(), "eu-west-1", def.clone()).is_err());
        assert_eq!(lookup(dir.path(), "eu-west-1").unwrap(), Some(def.clone()));
        assert_eq!(lookup(dir.path(), "us-east-1").unwrap(), None);
        std::fs::create_dir_all(dir.path().join("local-1")).unwrap();
        std::fs::write(dir.path().join("local-1/store.json"), b"{}").unwrap();
        assert!(add(dir.path(), "local-1", def.clone()).is_err());
        assert_eq!(local(dir.path()).unwrap(), vec!["local-1".to_string()]);
        assert_eq!(remove(dir.path(), "eu-west-1").unwrap(), def);
        assert!(remove(dir.path(), "eu-west-1").is_err());
    }
}
