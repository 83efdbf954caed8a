//! The rules an image follows, as EC2 states them: names, architectures,
//! volume sizes, device mappings, and one image name per owner.
//!
//! Permissions protect a store shared through blocksnap: every read or
//! launch of another account's image checks its launch permissions and
//! every change is owner-only. They do not protect against someone with
//! write access to the store's files.

use crate::error::{Error, Result};
use crate::format::image::{
    BlockDeviceMapping, DeviceName, ImageState, MAX_VOLUME_GIB, MappingTarget, gib_for,
};
use crate::format::manifest::{SnapshotMeta, Tag};
use crate::id::{AccountId, SnapshotId};
use crate::ops::snapshot::validate_labels;
use crate::region::catalog::Region;
use crate::region::images::list;

/// Checks an image name: 3-128 of letters, digits and `()[] ./-'@_`.
pub fn validate_name(name: &str) -> Result<()> {
    let len = name.chars().count();
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c);
    if !(3..=128).contains(&len) {
        return Err(Error::InvalidImage(format!(
            "image name {name:?} has {len} characters: use 3 to 128"
        )));
    }
    if let Some(c) = name.chars().find(|&c| !ok_char(c)) {
        return Err(Error::InvalidImage(format!(
            "image name {name:?} contains {c:?}: use letters, digits, spaces and ()[]./-'@_"
        )));
    }
    Ok(())
}

/// The host's architecture in EC2's words.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "x86_64",
    }
}

pub fn validate_architecture(arch: &str) -> Result<()> {
    match arch {
        "x86_64" | "arm64" => Ok(()),
        other => Err(Error::InvalidImage(format!(
            "architecture {other:?} is not valid: use x86_64 or arm64"
        ))),
    }
}

/// Checks a mapping's volume size: at least 1 GiB and the GiB that hold
/// `source` (a snapshot or volume of `bytes`), at most [`MAX_VOLUME_GIB`].
pub fn validate_volume_size(dev: &DeviceName, gib: u64, source: &str, bytes: u64) -> Result<()> {
    let need = gib_for(bytes);
    if gib < need {
        return Err(Error::InvalidImage(format!(
            "{dev}: volume size {gib} GiB is smaller than {source} ({bytes} bytes): give at least {need}"
        )));
    }
    if gib > MAX_VOLUME_GIB {
        return Err(Error::InvalidImage(format!(
            "{dev}: volume size {gib} GiB exceeds the {MAX_VOLUME_GIB} GiB limit"
        )));
    }
    Ok(())
}

/// Checks an instance-store virtual name: `ephemeral0` to `ephemeral23`.
pub fn validate_virtual_name(dev: &DeviceName, v: &str) -> Result<()> {
    let ok = v.strip_prefix("ephemeral").is_some_and(|n| {
        !n.is_empty()
            && n.len() <= 2
            && n.bytes().all(|b| b.is_ascii_digit())
            && n.parse::<u8>().is_ok_and(|n| n < 24)
    });
    if !ok {
        return Err(Error::InvalidImage(format!(
            "{dev}: virtual name {v:?} is not valid: use ephemeral0 to ephemeral23"
        )));
    }
    Ok(())
}

/// Checks mappings against EC2's rules: valid and unique device names, a
/// virtual name of the form `ephemeralN`, the root device mapped to an EBS
/// snapshot, volume sizes that hold their snapshot, and every snapshot
/// present in `region`. Returns the snapshots' metadata, in mapping order.
pub fn validate_mappings(
    region: &Region,
    root: &DeviceName,
    mappings: &[BlockDeviceMapping],
) -> Result<Vec<SnapshotMeta>> {
    check_devices(
        root,
        mappings.iter().map(|m| (&m.device_name, m.ebs().is_some())),
    )?;
    let mut metas = Vec::new();
    for m in mappings {
        match &m.target {
            MappingTarget::Ebs(e) => {
                let meta = mapped_snapshot(region, &m.device_name, &e.snapshot_id)?;
                validate_volume_size(
                    &m.device_name,
                    e.volume_size,
                    &e.snapshot_id.to_string(),
                    meta.volume_size,
                )?;
                metas.push(meta);
            }
            MappingTarget::NoDevice(_) => {}
            MappingTarget::VirtualName(v) => validate_virtual_name(&m.device_name, v)?,
        }
    }
    Ok(metas)
}

/// The rules on an image's devices, given as (device, whether it holds a
/// snapshot): at least one, each mapped once, and the root among them,
/// holding a snapshot.
pub fn check_devices<'a>(
    root: &DeviceName,
    devices: impl IntoIterator<Item = (&'a DeviceName, bool)>,
) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidImage(m));
    let devices: Vec<_> = devices.into_iter().collect();
    if devices.is_empty() {
        return bad("an image needs at least one block device mapping".into());
    }
    for (i, (dev, _)) in devices.iter().enumerate() {
        if devices[..i].iter().any(|(d, _)| d == dev) {
            return bad(format!(
                "device {dev} is mapped twice: map each device once"
            ));
        }
    }
    match devices.iter().find(|(d, _)| *d == root) {
        None => bad(format!(
            "root device {root} is not among the mappings: map it, or pick another with --root-device"
        )),
        Some((_, false)) => bad(format!(
            "root device {root} must map a snapshot, not a no-device or ephemeral volume"
        )),
        Some(_) => Ok(()),
    }
}

/// The meta of the snapshot `dev` maps; a missing one is [`Error::NotFound`]
/// naming the device.
pub fn mapped_snapshot(region: &Region, dev: &DeviceName, id: &SnapshotId) -> Result<SnapshotMeta> {
    region.read_snapshot_meta(id).map_err(|e| match e {
        Error::SnapshotNotFound { .. } => Error::NotFound(format!(
            "{dev} maps {id}, which does not exist in region {}",
            region.name()
        )),
        other => other,
    })
}

/// The checks on what an image is called and says about itself: its name
/// (unused by `owner` here), description, tags and architecture. Run
/// before anything is written.
pub fn check_labels(
    region: &Region,
    owner: &AccountId,
    name: &str,
    description: &str,
    tags: &[Tag],
    architecture: &str,
) -> Result<()> {
    validate_name(name)?;
    validate_labels(description, tags)?;
    validate_architecture(architecture)?;
    check_name_free(region, owner, name)
}

/// Fails if `owner` already has an available image called `name` here.
pub fn check_name_free(region: &Region, owner: &AccountId, name: &str) -> Result<()> {
    for v in list(region)?.images {
        if &v.image.owner_id == owner
            && v.image.name == name
            && v.state.state == ImageState::Available
        {
            return Err(Error::AlreadyExists(format!(
                "account {owner} already has an image named {name:?} ({}) in region {}: pick another name",
                v.image.image_id,
                region.name()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web server (v2) [prod] ./-'@_").is_ok());
        assert!(
            validate_name("ab")
                .unwrap_err()
                .to_string()
                .contains("3 to 128")
        );
        assert!(validate_name(&"a".repeat(129)).is_err());
        assert!(
            validate_name("bad*name")
                .unwrap_err()
                .to_string()
                .contains("'*'")
        );
    }
}
