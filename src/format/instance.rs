//! `instance.json` in an instance's directory: where each of its volumes
//! came from. Format name and version (frozen: do not modify); files
//! written before these fields existed carry neither and are read as
//! version 1. Version 2 adds `Overlay` to an EBS volume of a lazy
//! instance (`instance launch --lazy`); an instance without one is still
//! written as version 1, so older readers keep reading it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::format::check_format_versions;
use crate::format::image::{DeviceName, MAX_VOLUME_GIB, volume_gib_allowed};
use crate::id::{AccountId, ImageId, InstanceId, SnapshotId};

/// `State` of a launched instance.
pub const RUNNING: &str = "running";
/// `State` of a terminated instance.
pub const TERMINATED: &str = "terminated";
pub const INSTANCE_FORMAT: &str = "blocksnap-instance";
pub const INSTANCE_VERSION: u32 = 2;
/// The version of an instance with no lazy volume.
pub const INSTANCE_VERSION_PLAIN: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceEbs {
    pub snapshot_id: SnapshotId,
    pub volume_size: u64,
    pub delete_on_termination: bool,
    /// A lazy volume: the overlay file (in the instance directory) that
    /// holds what was written over the snapshot; its maps lie beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceVolume {
    Ebs(InstanceEbs),
    VirtualName(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceDevice {
    pub device_name: DeviceName,
    /// File name inside the instance directory.
    pub volume_file: String,
    #[serde(flatten)]
    pub volume: InstanceVolume,
}

/// `instance.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Instance {
    /// [`INSTANCE_FORMAT`]; `None` in files from before it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    pub instance_id: InstanceId,
    pub image_id: ImageId,
    pub region: String,
    /// The account that launched it.
    pub owner_id: AccountId,
    pub launch_time: String,
    pub state: String,
    pub architecture: String,
    pub root_device_name: DeviceName,
    pub block_device_mappings: Vec<InstanceDevice>,
}

/// Decodes an `instance.json`; `path` names it in errors.
pub fn decode(bytes: &[u8], at: &Location) -> Result<Instance> {
    let inst: Instance = serde_json::from_slice(bytes).map_err(|e| Error::CorruptFile {
        what: "instance description",
        location: at.clone(),
        reason: e.to_string(),
    })?;
    check_format_versions(
        "instance description",
        at,
        inst.format.as_deref().unwrap_or(INSTANCE_FORMAT),
        INSTANCE_FORMAT,
        inst.version.unwrap_or(INSTANCE_VERSION_PLAIN),
        INSTANCE_VERSION_PLAIN,
        INSTANCE_VERSION,
    )?;
    let plain = |name: &str| !(name.is_empty() || name.contains('/') || name.starts_with('.'));
    for d in &inst.block_device_mappings {
        // A file name only: never a path that leaves the directory.
        let overlay = match &d.volume {
            InstanceVolume::Ebs(e) => e.overlay.as_deref(),
            InstanceVolume::VirtualName(_) => None,
        };
        if let Some(bad) = std::iter::once(d.volume_file.as_str())
            .chain(overlay)
            .find(|n| !plain(n))
        {
            return Err(Error::CorruptFile {
                what: "instance description",
                location: at.clone(),
                reason: format!("volume file {bad:?} is not a plain file name"),
            });
        }
        if let InstanceVolume::Ebs(e) = &d.volume
            && !volume_gib_allowed(e.volume_size)
        {
            return Err(Error::CorruptFile {
                what: "instance description",
                location: at.clone(),
                reason: format!(
                    "{} has a volume size of {} GiB, outside 1-{} GiB",
                    d.device_name, e.volume_size, MAX_VOLUME_GIB
                ),
            });
        }
    }
    Ok(inst)
}

impl Instance {
    /// Whether any of its volumes is lazy.
    pub fn is_lazy(&self) -> bool {
        self.block_device_mappings
            .iter()
            .any(|d| matches!(&d.volume, InstanceVolume::Ebs(e) if e.overlay.is_some()))
    }

    /// The version its `instance.json` is written in: the oldest that
    /// holds it.
    pub fn needed_version(&self) -> u32 {
        if self.is_lazy() {
            INSTANCE_VERSION
        } else {
            INSTANCE_VERSION_PLAIN
        }
    }
}

/// Encodes an `instance.json`.
pub fn encode(inst: &Instance) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(inst).expect("instance serializes");
    json.push(b'\n');
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn instance_json_declares_its_format_and_older_files_still_read() {
        let legacy = include_bytes!("../../testdata/v1-all-formats/instance/instance.json");
        let lazy = include_bytes!("../../testdata/v1-all-formats/lazy-instance/instance.json");
        let l = decode(lazy, &Location::from(Path::new("lazy/instance.json"))).unwrap();
        assert!(l.is_lazy() && l.version == Some(2));
        let p = &Location::from(Path::new("instance.json"));
        let inst = decode(legacy, p).unwrap();
        assert_eq!(inst.format, None);
        let mut current = inst.clone();
        current.format = Some(INSTANCE_FORMAT.into());
        current.version = Some(INSTANCE_VERSION_PLAIN);
        let json = serde_json::to_vec(&current).unwrap();
        assert!(
            String::from_utf8_lossy(&json)
                .starts_with(r#"{"Format":"blocksnap-instance","Version":1,"#)
        );
        assert_eq!(decode(&json, p).unwrap(), current);
        current.version = Some(3);
        let e = decode(&serde_json::to_vec(&current).unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("newer blocksnap"), "{e}");
        current.version = Some(0);
        let e = decode(&serde_json::to_vec(&current).unwrap(), p).unwrap_err();
        assert!(matches!(e, Error::CorruptFile { .. }), "{e}");
    }
}
