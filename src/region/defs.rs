//! Region definitions: which region names live on an S3-compatible object
//! store. Kept in `<store>/regions.json`; a name not defined there is a
//! directory of the store root. Credentials are never stored here: they
//! come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::format::regions::{MAX_REGIONS_JSON, RegionDef, S3Url, decode_regions, encode_regions};
use crate::region::backend::flock_file;
use crate::store::files::{Durability, for_each_entry, read_bounded, write_atomic};
use crate::sys::LockMode;

const FILE: &str = "regions.json";

/// Checks a region name: 1–63 of lowercase letters, digits and `-`.
/// What the store root holds beside its regions' directories: the owner
/// account file and the server's key directory.
const RESERVED: [&str; 2] = ["account", "server"];

pub fn validate_region_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    // Names the store root holds beside its regions.
    if ok && RESERVED.contains(&name) {
        return Err(Error::InvalidArgument(format!(
            "region name {name:?} is reserved: the store keeps its own {name} beside its regions; \
             choose another name"
        )));
    }
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid region name {name:?}: use 1-63 lowercase letters, digits and '-', e.g. us-east-1"
        )))
    }
}

pub fn read_file(store_root: &Path) -> Result<BTreeMap<String, RegionDef>> {
    let path = store_root.join(FILE);
    match read_bounded(&path, "region definitions", MAX_REGIONS_JSON)? {
        Some(bytes) => decode_regions(&bytes, &path.into()),
        None => Ok(BTreeMap::new()),
    }
}

fn write_file(store_root: &Path, regions: BTreeMap<String, RegionDef>) -> Result<()> {
    std::fs::create_dir_all(store_root).ctx("create store directory", store_root)?;
    write_atomic(
        &store_root.join(FILE),
        &encode_regions(regions),
        Durability::Now,
    )
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
    for_each_entry(store_root, |p| {
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
pub fn locked<T>(store_root: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::fs::create_dir_all(store_root).ctx("create store directory", store_root)?;
    let _lock = flock_file(
        &store_root.join("regions.lock"),
        LockMode::Exclusive,
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
    validate_region_name(name)?;
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
pub fn refuse_taken(
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
