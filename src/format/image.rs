//! Image files, as EC2 shapes them: the image manifest
//! (`images/<ami>.json`, immutable once written), its launch permissions
//! (`images/<ami>.launch.json`), its state (`images/<ami>.state.json`),
//! and a snapshot's create-volume permissions
//! (`snapshot-permissions/<snap>.json`). Each is a [`super::envelope`]
//! whose body uses EC2's key names.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::format::envelope;
use crate::format::manifest::Tag;
use crate::id::{AccountId, ImageId, SnapshotId, string_newtype};

pub const IMAGE_FORMAT: &str = "blocksnap-image";
pub const LAUNCH_FORMAT: &str = "blocksnap-launch-permissions";
pub const STATE_FORMAT: &str = "blocksnap-image-state";
pub const SNAPSHOT_PERMISSIONS_FORMAT: &str = "blocksnap-create-volume-permissions";
pub const TAGS_FORMAT: &str = "blocksnap-tags";
/// The most bytes any of these files may hold.
pub const MAX_JSON: u64 = 1 << 20;
/// One GiB, the unit of EBS volume sizes.
pub const GIB: u64 = 1 << 30;
/// EBS's largest volume, in GiB.
pub const MAX_VOLUME_GIB: u64 = 65536;

/// Volume size in GiB that holds `bytes`.
pub fn gib_for(bytes: u64) -> u64 {
    bytes.div_ceil(GIB).max(1)
}

/// Whether `gib` is a volume size EBS allows: 1 to [`MAX_VOLUME_GIB`].
pub fn volume_gib_allowed(gib: u64) -> bool {
    (1..=MAX_VOLUME_GIB).contains(&gib)
}

/// An EC2 Linux device name: `/dev/sda1`, `/dev/sd[b-z]` or `/dev/xvd[a-z]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceName(String);

impl DeviceName {
    /// `xvda` for `/dev/xvda`: the volume file's stem in an instance.
    pub fn basename(&self) -> &str {
        self.0.trim_start_matches("/dev/")
    }
}

impl FromStr for DeviceName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let letter = |r: &str, lo: u8| r.len() == 1 && (lo..=b'z').contains(&r.as_bytes()[0]);
        let ok = s == "/dev/sda1"
            || s.strip_prefix("/dev/sd").is_some_and(|r| letter(r, b'b'))
            || s.strip_prefix("/dev/xvd").is_some_and(|r| letter(r, b'a'));
        if ok {
            Ok(DeviceName(s.to_string()))
        } else {
            Err(Error::InvalidImage(format!(
                "device name {s:?} is not valid: use /dev/sda1, /dev/sd[b-z] or /dev/xvd[a-z]"
            )))
        }
    }
}

string_newtype!(DeviceName);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EbsMapping {
    pub snapshot_id: SnapshotId,
    /// GiB; at least the snapshot's size.
    pub volume_size: u64,
    pub delete_on_termination: bool,
    /// The snapshot is encrypted (image format version 2; absent in 1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// The ARN of the key it is encrypted under (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
}

/// What a device maps to: exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MappingTarget {
    Ebs(EbsMapping),
    /// Suppresses the device (EC2 writes `"NoDevice": ""`).
    NoDevice(String),
    /// An instance-store volume: `ephemeral0`, `ephemeral1`, …
    VirtualName(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct BlockDeviceMapping {
    pub device_name: DeviceName,
    #[serde(flatten)]
    pub target: MappingTarget,
}

impl BlockDeviceMapping {
    pub fn ebs(&self) -> Option<&EbsMapping> {
        match &self.target {
            MappingTarget::Ebs(e) => Some(e),
            _ => None,
        }
    }
}

/// The immutable part of an image, with EC2's key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Image {
    pub image_id: ImageId,
    pub name: String,
    pub description: String,
    pub architecture: String,
    pub root_device_name: DeviceName,
    pub root_device_type: String,
    pub block_device_mappings: Vec<BlockDeviceMapping>,
    pub owner_id: AccountId,
    pub creation_date: String,
    pub tags: Vec<Tag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image_id: Option<ImageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_region: Option<String>,
}

impl Image {
    pub fn snapshot_ids(&self) -> impl Iterator<Item = &SnapshotId> {
        self.block_device_mappings
            .iter()
            .filter_map(|m| m.ebs())
            .map(|e| &e.snapshot_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Available,
    Deregistered,
}

impl ImageState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ImageState::Available => "available",
            ImageState::Deregistered => "deregistered",
        }
    }
}

/// The mutable state beside an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StateRecord {
    pub state: ImageState,
    /// RFC 3339; the image is deprecated from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_time: Option<String>,
}

impl Default for StateRecord {
    fn default() -> Self {
        StateRecord {
            state: ImageState::Available,
            deprecation_time: None,
        }
    }
}

/// One grant of launch permission, in EC2's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchPermission {
    #[serde(rename = "UserId")]
    Account(AccountId),
    /// `all`: public.
    #[serde(rename = "Group")]
    Group(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LaunchPermissions {
    pub launch_permissions: Vec<LaunchPermission>,
}

/// A snapshot's create-volume permissions, in EC2's shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateVolumePermissions {
    pub create_volume_permissions: Vec<LaunchPermission>,
}

/// Decodes an image manifest file (`images/<ami>.json`); `path` names it
/// in errors.
pub fn decode_image(bytes: &[u8], at: &Location) -> Result<Image> {
    envelope::decode_versions(bytes, IMAGE_FORMAT, "image manifest", at, IMAGE_VERSION)
}

/// Image manifests are version 1 unless a mapping is encrypted: version 2
/// added `Encrypted` and `KmsKeyId`, so a blocksnap that predates them
/// says "written by a newer blocksnap" instead of launching the image as
/// if it were not encrypted.
pub const IMAGE_VERSION: u32 = 2;

/// Decodes a launch permissions file (`images/<ami>.launch.json`).
pub fn decode_permissions(bytes: &[u8], at: &Location) -> Result<LaunchPermissions> {
    envelope::decode(bytes, LAUNCH_FORMAT, "launch permissions", at)
}

/// Decodes an image state file (`images/<ami>.state.json`).
pub fn decode_state(bytes: &[u8], at: &Location) -> Result<StateRecord> {
    envelope::decode(bytes, STATE_FORMAT, "image state", at)
}

/// Decodes a snapshot permissions file (`snapshot-permissions/<snap>.json`).
pub fn decode_snapshot_permissions(bytes: &[u8], at: &Location) -> Result<CreateVolumePermissions> {
    envelope::decode(
        bytes,
        SNAPSHOT_PERMISSIONS_FORMAT,
        "snapshot permissions",
        at,
    )
}

/// Encodes an image manifest file.
pub fn encode_image(image: &Image) -> Vec<u8> {
    let encrypted = image
        .block_device_mappings
        .iter()
        .any(|m| m.ebs().is_some_and(|e| e.encrypted));
    envelope::encode_version(IMAGE_FORMAT, if encrypted { 2 } else { 1 }, image)
}

/// Encodes a launch permissions file.
pub fn encode_permissions(p: &LaunchPermissions) -> Vec<u8> {
    envelope::encode(LAUNCH_FORMAT, p)
}

/// Encodes an image state file.
pub fn encode_state(s: &StateRecord) -> Vec<u8> {
    envelope::encode(STATE_FORMAT, s)
}

/// The tags of a snapshot or image as `CreateTags` left them
/// (`snapshot-tags/<snap>.json`, `images/<ami>.tags.json`): they replace
/// the tags it was made with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TagRecord {
    pub tags: Vec<crate::format::manifest::Tag>,
}

/// What `CreateTags` and `DeleteTags` do to a resource's tags: first the
/// removals, then the additions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagChange {
    /// Added; a key already there takes the new value (`CreateTags`).
    pub add: Vec<Tag>,
    /// Removed by key; with a value, only where the tag has that value
    /// (`DeleteTags`).
    pub remove: Vec<(String, Option<String>)>,
    /// Every tag removed (`DeleteTags` naming no tag).
    pub remove_all: bool,
}

impl TagChange {
    /// Refuses a change to the tags blocksnap writes itself.
    pub fn check(&self) -> Result<()> {
        if self.remove.iter().any(|(key, _)| key.is_empty()) {
            return Err(Error::InvalidArgument(
                "a tag to remove names no key: give KEY or KEY=VALUE".into(),
            ));
        }
        let added = self.add.iter().map(|t| t.key.as_str());
        let removed = self.remove.iter().map(|(key, _)| key.as_str());
        added
            .chain(removed)
            .try_for_each(crate::format::manifest::check_user_tag_key)
    }

    /// `old` changed by this. Removing every tag keeps blocksnap's own.
    pub fn apply(&self, old: &[Tag]) -> TagRecord {
        use crate::format::manifest::RESERVED_TAG_PREFIX;
        let mut tags = old.to_vec();
        tags.retain(|t| {
            let named = self
                .remove
                .iter()
                .any(|(key, value)| *key == t.key && value.as_ref().is_none_or(|v| *v == t.value));
            let all = self.remove_all && !t.key.starts_with(RESERVED_TAG_PREFIX);
            !(named || all)
        });
        for t in &self.add {
            match tags.iter_mut().find(|o| o.key == t.key) {
                Some(o) => o.value = t.value.clone(),
                None => tags.push(t.clone()),
            }
        }
        TagRecord { tags }
    }
}

/// Decodes a tags file.
pub fn decode_tags(bytes: &[u8], at: &Location) -> Result<TagRecord> {
    envelope::decode(bytes, TAGS_FORMAT, "tags", at)
}

/// Encodes a tags file.
pub fn encode_tags(t: &TagRecord) -> Vec<u8> {
    envelope::encode(TAGS_FORMAT, t)
}

/// Encodes a snapshot permissions file.
pub fn encode_snapshot_permissions(p: &CreateVolumePermissions) -> Vec<u8> {
    envelope::encode(SNAPSHOT_PERMISSIONS_FORMAT, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_change_removes_then_adds_and_keeps_blocksnaps_own_tags() {
        let tag = |k: &str, v: &str| Tag {
            key: k.into(),
            value: v.into(),
        };
        let old = [
            tag("env", "test"),
            tag("team", "db"),
            tag("blocksnap:source", "/d"),
        ];
        let change = TagChange {
            add: vec![tag("env", "prod"), tag("tier", "gold")],
            remove: vec![("team".into(), Some("web".into())), ("env".into(), None)],
            remove_all: false,
        };
        // team stays (another value), env goes and comes back with the new one.
        let keys = change.apply(&old).tags;
        assert_eq!(
            keys,
            [
                tag("team", "db"),
                tag("blocksnap:source", "/d"),
                tag("env", "prod"),
                tag("tier", "gold")
            ]
        );
        let all = TagChange {
            remove_all: true,
            ..TagChange::default()
        };
        assert_eq!(all.apply(&old).tags, [tag("blocksnap:source", "/d")]);
        for bad in [
            TagChange {
                add: vec![tag("blocksnap:x", "1")],
                ..TagChange::default()
            },
            TagChange {
                remove: vec![("blocksnap:source".into(), None)],
                ..TagChange::default()
            },
            TagChange {
                remove: vec![(String::new(), Some("v".into()))],
                ..TagChange::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        assert!(change.check().is_ok());
    }
    use std::path::Path;

    #[test]
    fn device_names_follow_ec2_linux_naming() {
        for ok in [
            "/dev/sda1",
            "/dev/sdb",
            "/dev/sdz",
            "/dev/xvda",
            "/dev/xvdz",
        ] {
            assert!(ok.parse::<DeviceName>().is_ok(), "{ok}");
        }
        for bad in [
            "/dev/sda",
            "/dev/sda2",
            "/dev/xvdA",
            "/dev/xvdaa",
            "/dev/nvme0n1",
            "xvda",
            "/dev/sd1",
            "",
        ] {
            let err = bad.parse::<DeviceName>().unwrap_err().to_string();
            assert!(err.contains("/dev/sd[b-z]"), "{bad}: {err}");
        }
        assert_eq!(
            "/dev/xvdf".parse::<DeviceName>().unwrap().basename(),
            "xvdf"
        );
    }

    #[test]
    fn mappings_serialize_in_ec2_shape() {
        let m = vec![
            BlockDeviceMapping {
                device_name: "/dev/xvda".parse().unwrap(),
                target: MappingTarget::Ebs(EbsMapping {
                    snapshot_id: "snap-0123456789abcdef0".parse().unwrap(),
                    volume_size: 8,
                    delete_on_termination: true,
                    encrypted: false,
                    kms_key_id: None,
                }),
            },
            BlockDeviceMapping {
                device_name: "/dev/xvdb".parse().unwrap(),
                target: MappingTarget::NoDevice(String::new()),
            },
            BlockDeviceMapping {
                device_name: "/dev/xvdc".parse().unwrap(),
                target: MappingTarget::VirtualName("ephemeral0".into()),
            },
        ];
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-0123456789abcdef0", "VolumeSize": 8, "DeleteOnTermination": true}},
                {"DeviceName": "/dev/xvdb", "NoDevice": ""},
                {"DeviceName": "/dev/xvdc", "VirtualName": "ephemeral0"}
            ])
        );
        let back: Vec<BlockDeviceMapping> = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
        let perms = LaunchPermissions {
            launch_permissions: vec![
                LaunchPermission::Account("123456789012".parse().unwrap()),
                LaunchPermission::Group("all".into()),
            ],
        };
        assert_eq!(
            serde_json::to_value(&perms).unwrap(),
            serde_json::json!({"LaunchPermissions": [{"UserId": "123456789012"}, {"Group": "all"}]})
        );
    }

    #[test]
    fn envelope_detects_edits_and_truncation() {
        let perms = LaunchPermissions {
            launch_permissions: vec![LaunchPermission::Account("123456789012".parse().unwrap())],
        };
        let bytes = envelope::encode(LAUNCH_FORMAT, &perms);
        let p = &Location::from(Path::new("x.launch.json"));
        let back: LaunchPermissions =
            envelope::decode(&bytes, LAUNCH_FORMAT, "launch permissions", p).unwrap();
        assert_eq!(back, perms);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let edited = text.replace("123456789012", "999999999999");
        let err = envelope::decode::<LaunchPermissions>(
            edited.as_bytes(),
            LAUNCH_FORMAT,
            "launch permissions",
            p,
        )
        .unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = envelope::decode::<LaunchPermissions>(
            &bytes[..bytes.len() / 2],
            LAUNCH_FORMAT,
            "launch permissions",
            p,
        )
        .unwrap_err();
        assert!(matches!(err, Error::CorruptFile { .. }), "{err}");
        assert!(
            envelope::decode::<LaunchPermissions>(&bytes, IMAGE_FORMAT, "image manifest", p)
                .is_err()
        );
    }
}
