//! Registering images, changing their permissions and deprecation, and
//! deregistering them (RegisterImage, ModifyImageAttribute,
//! EnableImageDeprecation, DeregisterImage).

use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::format::image::{
    BlockDeviceMapping, DeviceName, Image, ImageState, LaunchPermissions, StateRecord, TagChange,
};
use crate::format::lifecycle::{BinEntry, ResourceType};
use crate::format::manifest::Tag;
use crate::id::{AccountId, ImageId, SnapshotId};
use crate::image::rules::{check_labels, check_name_free, host_architecture, validate_mappings};
use crate::ops::access::{Deleted, check_no_lazy_volume, remove_or_bin};
use crate::ops::recycle::{entry_for, keeping_rule, require_bin_owner};
use crate::region::catalog::Region;
use crate::region::images::{
    self, ImageView, read, tags_key, users_of, write_new, write_permissions, write_state,
};
use crate::region::permissions::{Grantee, Grants, PermissionChange};
use crate::region::recycle::{remove_entry, write_entry};
use crate::sys::LockMode;

/// Reads an image that `caller` may `action` (launch, copy): it must be
/// available and theirs, shared with them, or public.
pub fn read_launchable(
    region: &Region,
    id: &ImageId,
    caller: &AccountId,
    action: &'static str,
) -> Result<ImageView> {
    let view = read(region, id)?;
    view.require_launch(caller, action)?;
    view.require_available()?;
    Ok(view)
}

/// Changes the tags of image `id`; owner only (CreateTags, DeleteTags).
/// Returns its tags now.
pub fn change_tags(
    region: &Region,
    id: &ImageId,
    caller: &AccountId,
    change: &TagChange,
) -> Result<Vec<Tag>> {
    change.check()?;
    let _catalog = region.catalog_lock("change tags")?;
    let view = read(region, id)?;
    view.require_owner(caller, "tag")?;
    let image = &view.image;
    region.change_tag_record(&tags_key(id), &image.tags, &image.description, change)
}

/// What `register` needs beyond the mappings.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    pub name: String,
    pub description: String,
    pub architecture: Option<String>,
    pub root_device: DeviceName,
    pub tags: Vec<Tag>,
    pub owner: AccountId,
    /// Minted before snapshots are taken, so they can name it.
    pub image_id: Option<ImageId>,
    pub source_image_id: Option<ImageId>,
    pub source_region: Option<String>,
}

/// Validates and registers an image from existing snapshots (RegisterImage).
pub fn register(
    region: &Region,
    opts: &RegisterOptions,
    mappings: Vec<BlockDeviceMapping>,
) -> Result<Image> {
    let architecture = opts
        .architecture
        .clone()
        .unwrap_or_else(|| host_architecture().to_string());
    // Under the catalog lock, two registrations of one name cannot both
    // pass the name check, and a snapshot cannot be deleted between the
    // mapping check and the write.
    let _catalog = region.catalog_lock("image register")?;
    check_labels(
        region,
        &opts.owner,
        &opts.name,
        &opts.description,
        &opts.tags,
        &architecture,
    )?;
    let metas = validate_mappings(region, &opts.root_device, &mappings)?;
    for meta in &metas {
        if meta.owner != opts.owner {
            return Err(Error::InvalidImage(format!(
                "snapshot {} belongs to account {}, not {}: only your own snapshots can back your image",
                meta.id, meta.owner, opts.owner
            )));
        }
    }
    let image = Image {
        image_id: opts.image_id.clone().unwrap_or_else(ImageId::random),
        name: opts.name.clone(),
        description: opts.description.clone(),
        architecture,
        root_device_name: opts.root_device.clone(),
        root_device_type: "ebs".into(),
        block_device_mappings: mappings,
        owner_id: opts.owner.clone(),
        creation_date: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        tags: opts.tags.clone(),
        source_image_id: opts.source_image_id.clone(),
        source_region: opts.source_region.clone(),
    };
    write_new(region, &image)?;
    Ok(image)
}

/// Changes launch permissions; owner only. The manifest is untouched.
pub fn modify_permissions(
    region: &Region,
    id: &ImageId,
    caller: &AccountId,
    change: &PermissionChange,
) -> Result<LaunchPermissions> {
    let _catalog = region.catalog_lock("image permissions")?;
    let view = read(region, id)?;
    view.require_owner(caller, "change launch permissions of")?;
    let mut perms = view.permissions;
    perms.apply(change);
    write_permissions(region, id, &perms)?;
    Ok(perms)
}

/// Sets or clears the deprecation time; owner only (EnableImageDeprecation).
pub fn set_deprecation(
    region: &Region,
    id: &ImageId,
    caller: &AccountId,
    at: Option<SystemTime>,
) -> Result<StateRecord> {
    let _catalog = region.catalog_lock("image deprecate")?;
    let view = read(region, id)?;
    view.require_owner(caller, "deprecate")?;
    let state = StateRecord {
        deprecation_time: at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        ..view.state
    };
    write_state(region, id, &state)?;
    Ok(state)
}

/// Result of a deregistration.
#[derive(Debug, Clone, Default)]
pub struct DeregisterReport {
    pub deleted_snapshots: Vec<SnapshotId>,
    /// Snapshots a retention rule moved to the recycle bin.
    pub binned_snapshots: Vec<BinEntry>,
    /// Snapshots kept because another registered image uses them.
    pub kept_snapshots: Vec<KeptSnapshot>,
    /// Where a retention rule keeps the image: its recycle bin entry.
    pub binned: Option<BinEntry>,
}

#[derive(Debug, Clone)]
pub struct KeptSnapshot {
    pub snapshot: SnapshotId,
    pub used_by: SnapshotUser,
}

/// What still needs a snapshot that deregistering would have deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotUser {
    Image(ImageId),
    /// The image deregistered, kept in the recycle bin: restoring it needs
    /// its snapshots.
    BinnedImage(ImageId),
    /// A lazy volume: its overlay's path.
    LazyVolume(String),
}

impl SnapshotUser {
    /// The image id or the overlay's path.
    pub fn name(&self) -> &str {
        match self {
            SnapshotUser::Image(i) | SnapshotUser::BinnedImage(i) => i.as_str(),
            SnapshotUser::LazyVolume(p) => p,
        }
    }
}

impl std::fmt::Display for SnapshotUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotUser::Image(i) => write!(f, "registered image {i}"),
            SnapshotUser::BinnedImage(i) => write!(f, "image {i} in the recycle bin"),
            SnapshotUser::LazyVolume(p) => write!(f, "lazy volume {p}"),
        }
    }
}

/// Deregisters an image; owner only (DeregisterImage). With
/// `delete_snapshots`, deletes its snapshots that no other registered
/// image uses. Where a retention rule of the owner's keeps images, the
/// image goes to the recycle bin, and keeps its snapshots.
pub fn deregister(
    region: &Region,
    id: &ImageId,
    caller: &AccountId,
    delete_snapshots: bool,
) -> Result<DeregisterReport> {
    deregister_at(region, id, caller, delete_snapshots, SystemTime::now())
}

/// [`deregister`] at time `now` (when a bin entry starts).
pub fn deregister_at(
    region: &Region,
    id: &ImageId,
    caller: &AccountId,
    delete_snapshots: bool,
    now: SystemTime,
) -> Result<DeregisterReport> {
    let _catalog = region.catalog_lock("image deregister")?;
    // Held shared so that gc, which purges the bin, is not running.
    let _lock = region.lock(LockMode::Shared, "image deregister")?;
    let view = read(region, id)?;
    view.require_owner(caller, "deregister")?;
    view.require_available()?;
    let mut report = DeregisterReport::default();
    let kind = ResourceType::Ec2Image;
    if let Some(rule) = keeping_rule(region, &view.image.owner_id, kind, Some(&view.image.tags))? {
        // The entry first: cut short here, the image is still available
        // and gc drops the entry.
        let entry = entry_for(kind, id.as_str(), &view.image.owner_id, &rule, now);
        write_entry(region, &entry)?;
        report.binned = Some(entry);
    }
    write_state(
        region,
        id,
        &StateRecord {
            state: ImageState::Deregistered,
            ..view.state.clone()
        },
    )?;
    if delete_snapshots {
        let others = images::list(region)?.images;
        let mut seen = Vec::new();
        for snap in view.image.snapshot_ids() {
            if seen.contains(&snap) {
                continue;
            }
            seen.push(snap);
            let user = if report.binned.is_some() {
                Some(SnapshotUser::BinnedImage(id.clone()))
            } else {
                match users_of(&others, snap).into_iter().find(|o| o != id) {
                    Some(image) => Some(SnapshotUser::Image(image)),
                    None => match check_no_lazy_volume(region, snap) {
                        Ok(()) => None,
                        Err(Error::SnapshotUnderLazyVolume { overlay, .. }) => {
                            Some(SnapshotUser::LazyVolume(overlay))
                        }
                        Err(e) => return Err(e),
                    },
                }
            };
            if let Some(user) = user {
                report.kept_snapshots.push(KeptSnapshot {
                    snapshot: snap.clone(),
                    used_by: user,
                });
                continue;
            }
            let meta = match region.read_snapshot_meta(snap) {
                Ok(m) => m,
                Err(Error::SnapshotNotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            match remove_or_bin(region, &meta, now)? {
                Deleted::Removed => report.deleted_snapshots.push(snap.clone()),
                Deleted::Binned(e) => report.binned_snapshots.push(e),
            }
        }
    }
    Ok(report)
}

/// Brings image `id` back from the recycle bin, available again (its
/// name must still be free among the owner's images).
pub fn restore_from_bin(region: &Region, id: &ImageId, caller: &AccountId) -> Result<BinEntry> {
    let _catalog = region.catalog_lock("image restore-from-recycle-bin")?;
    let _lock = region.lock(LockMode::Shared, "image restore-from-recycle-bin")?;
    let (entry, view) = images::binned(region)?
        .into_iter()
        .find(|(e, _)| e.id == id.as_str())
        .ok_or_else(|| {
            Error::NotFound(format!(
                "image {id} is not in the recycle bin of region {}: run `blocksnap recycle-bin list`",
                region.name()
            ))
        })?;
    require_bin_owner(&entry, caller)?;
    for snap in view.image.snapshot_ids() {
        if !region.has_snapshot(snap)? {
            return Err(Error::Conflict(format!(
                "image {id} cannot come back: its snapshot {snap} is gone (restore it first \
                 with `blocksnap snapshot restore-from-recycle-bin {snap}` if it is in the bin)"
            )));
        }
    }
    check_name_free(region, caller, &view.image.name)?;
    write_state(
        region,
        id,
        &StateRecord {
            state: ImageState::Available,
            ..view.state
        },
    )?;
    remove_entry(region, ResourceType::Ec2Image, id.as_str())?;
    Ok(entry)
}

/// Which images `image list` shows, as DescribeImages filters them.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `--owner`: only images of this account.
    pub owner: Option<AccountId>,
    /// `--executable-by`: only images this account (or, with
    /// [`Grantee::All`], everyone) may launch.
    pub executable_by: Option<Grantee>,
    pub include_deregistered: bool,
    pub include_deprecated: bool,
}

/// The images `caller` may see (its own, those shared with it, public
/// ones), narrowed by `filter`; oldest first. Files that could not be read
/// are returned beside them.
pub fn list(
    region: &Region,
    caller: &AccountId,
    filter: &ListFilter,
) -> Result<(Vec<ImageView>, Vec<Error>)> {
    let listing = images::list(region)?;
    let now = SystemTime::now();
    let shown = listing
        .images
        .into_iter()
        .filter(|v| v.can_launch(caller))
        .filter(|v| filter.owner.as_ref().is_none_or(|o| &v.image.owner_id == o))
        .filter(|v| match &filter.executable_by {
            None => true,
            Some(Grantee::All) => v.permissions.is_public(),
            Some(Grantee::Account(a)) => v.can_launch(a),
        })
        .filter(|v| filter.include_deregistered || v.state.state == ImageState::Available)
        .filter(|v| filter.include_deprecated || !v.is_deprecated(now))
        .collect();
    Ok((shown, listing.damaged))
}
