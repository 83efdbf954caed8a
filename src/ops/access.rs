//! Who may use a snapshot, as EC2 decides it: a snapshot belongs to the
//! account that created it and is private by default; its owner grants
//! **create-volume permission** to accounts, or to `all` (public)
//! (ModifySnapshotAttribute). Restoring, verifying a volume against it,
//! describing it and listing its blocks need ownership or that permission;
//! deleting it and changing its permissions are the owner's alone.
//!
//! Permissions live beside the manifest, which never changes, in
//! `snapshot-permissions/<snap-id>.json` (the image files' checksummed JSON
//! envelope); a snapshot without that file is private.

use std::path::Path;
use std::time::SystemTime;

use crate::error::{Error, Location, Result};
use crate::format::dirty_map::{DirtyHeader, HEADER_LEN, MapKind};
use crate::format::image::{CreateVolumePermissions, TagChange};
use crate::format::lifecycle::{BinEntry, ResourceType};
use crate::format::manifest::{SnapshotMeta, Tag};
use crate::id::{AccountId, SnapshotId};
use crate::ops::recycle::{bin_snapshot, keeping_rule};
use crate::region::catalog::{Region, tags_key};
use crate::region::images::check_snapshot_unused;
use crate::region::permissions::{self, Grantee, Grants, PermissionChange};
use crate::store::pool::map_io;
use crate::sys::LockMode;

/// A snapshot's meta with its permissions.
#[derive(Debug, Clone)]
pub struct SnapshotView {
    pub meta: SnapshotMeta,
    pub permissions: CreateVolumePermissions,
}

impl SnapshotView {
    /// Whether `account` may restore (and so see) the snapshot.
    pub fn can_restore(&self, account: &AccountId) -> bool {
        self.permissions.allows(&self.meta.owner, account)
    }
}

/// Fails unless `caller` owns the snapshot `meta` describes (the manifest
/// says so; no permission file is needed).
pub fn require_owner(meta: &SnapshotMeta, caller: &AccountId, action: &'static str) -> Result<()> {
    if &meta.owner == caller {
        return Ok(());
    }
    Err(Error::SnapshotNotPermitted {
        account: caller.clone(),
        action,
        snapshot: meta.id.clone(),
        hint: format!("only its owner, account {}, may", meta.owner),
    })
}

/// Fails unless `caller` owns snapshot `id`.
fn check_owned(
    region: &Region,
    id: &SnapshotId,
    caller: &AccountId,
    action: &'static str,
) -> Result<()> {
    require_owner(&region.read_snapshot_meta(id)?, caller, action)
}

/// Changes the tags of snapshot `id`; owner only (CreateTags,
/// DeleteTags). Returns its tags now. An encrypted snapshot's tags are
/// sealed in its manifest with it, and do not change.
pub fn change_tags(
    region: &Region,
    id: &SnapshotId,
    caller: &AccountId,
    change: &TagChange,
) -> Result<Vec<Tag>> {
    change.check()?;
    let _catalog = region.catalog_lock("change tags")?;
    let meta = region.read_snapshot_meta(id)?;
    require_owner(&meta, caller, "tag")?;
    if meta.kms_key_id.is_some() {
        return Err(Error::InvalidArgument(format!(
            "{id} is encrypted: its tags are sealed in it under its key and cannot change"
        )));
    }
    region.change_tag_record(&tags_key(id), &meta.tags, &meta.description, change)
}

/// The create-volume permissions of snapshot `id`; owner only
/// (DescribeSnapshotAttribute).
pub fn permissions_of(
    region: &Region,
    id: &SnapshotId,
    caller: &AccountId,
) -> Result<CreateVolumePermissions> {
    check_owned(region, id, caller, "see the permissions of")?;
    permissions::read(region, id)
}

/// Snapshot `id`'s meta, if `caller` may `action` it (restore, verify,
/// describe, list the blocks of): the owner, a listed account, or anyone
/// when public.
pub fn readable(
    region: &Region,
    id: &SnapshotId,
    caller: &AccountId,
    action: &'static str,
) -> Result<SnapshotMeta> {
    let meta = region.read_snapshot_meta(id)?;
    check_readable(region, &meta, caller, action).map(|()| meta)
}

/// Fails unless `caller` may `action` the snapshot `meta` describes (for a
/// caller that has read the manifest already).
pub fn check_readable(
    region: &Region,
    meta: &SnapshotMeta,
    caller: &AccountId,
    action: &'static str,
) -> Result<()> {
    if &meta.owner == caller {
        // The owner needs no permission file, nor a readable one.
        return Ok(());
    }
    if permissions::read(region, &meta.id)?.allows(&meta.owner, caller) {
        return Ok(());
    }
    Err(Error::SnapshotNotPermitted {
        account: caller.clone(),
        action,
        snapshot: meta.id.clone(),
        hint: format!(
            "it is private; its owner can share it with `blocksnap snapshot permissions {} --add {caller}`",
            meta.id
        ),
    })
}

/// Changes create-volume permissions; owner only (ModifySnapshotAttribute).
/// Under the catalog lock, so concurrent changes never lose one another.
pub fn modify(
    region: &Region,
    id: &SnapshotId,
    caller: &AccountId,
    change: &PermissionChange,
) -> Result<CreateVolumePermissions> {
    let _catalog = region.catalog_lock("snapshot permissions")?;
    check_owned(region, id, caller, "change the permissions of")?;
    // `--reset` needs nothing from the old file, so it also mends a damaged one.
    let mut perms = if change.reset {
        CreateVolumePermissions::default()
    } else {
        permissions::read(region, id)?
    };
    perms.apply(change);
    permissions::write(region, id, &perms)?;
    Ok(perms)
}

/// What deleting a snapshot did.
#[derive(Debug, Clone)]
pub enum Deleted {
    /// The manifest is gone; its chunks stay until `store gc`.
    Removed,
    /// A retention rule moved it to the recycle bin.
    Binned(BinEntry),
}

/// Deletes snapshot `id`; owner only (DeleteSnapshot). Refused while a
/// registered image uses it. Under the catalog lock, so an image cannot be
/// registered on it meanwhile; its chunks stay until `store gc`. Where a
/// retention rule of the owner's keeps it, it goes to the recycle bin.
pub fn delete(region: &Region, id: &SnapshotId, caller: &AccountId) -> Result<Deleted> {
    delete_at(region, id, caller, SystemTime::now())
}

/// [`delete`] at time `now` (when a bin entry starts).
pub fn delete_at(
    region: &Region,
    id: &SnapshotId,
    caller: &AccountId,
    now: SystemTime,
) -> Result<Deleted> {
    let _catalog = region.catalog_lock("snapshot delete")?;
    let _lock = region.lock(LockMode::Shared, "snapshot delete")?;
    let meta = region.read_snapshot_meta(id)?;
    require_owner(&meta, caller, "delete")?;
    check_snapshot_unused(region, id)?;
    check_no_lazy_volume(region, id)?;
    remove_or_bin(region, &meta, now)
}

/// Removes the snapshot `meta` describes, or moves it to the recycle bin
/// where a rule of its owner's keeps it. The caller holds the catalog lock
/// and the region lock (shared), and has checked the snapshot is unused.
pub fn remove_or_bin(region: &Region, meta: &SnapshotMeta, now: SystemTime) -> Result<Deleted> {
    let tags = (!meta.sealed).then_some(meta.tags.as_slice());
    match keeping_rule(region, &meta.owner, ResourceType::EbsSnapshot, tags)? {
        Some(rule) => Ok(Deleted::Binned(bin_snapshot(region, meta, &rule, now)?)),
        None => {
            region.delete_snapshot(&meta.id)?;
            Ok(Deleted::Removed)
        }
    }
}

/// Refuses a snapshot that a lazy volume (an overlay) still reads, as its
/// lease in the region says. A lease of this host whose overlay is gone,
/// or no longer over this snapshot, is stale: it is dropped. An overlay
/// under a FUSE mount (an attached instance hides its directory) counts as
/// there.
pub fn check_no_lazy_volume(region: &Region, id: &SnapshotId) -> Result<()> {
    let here = crate::sys::hostname();
    for (key, lease) in region.leases(id)? {
        if lease.host == here && !overlay_reads(Path::new(&lease.overlay), id) {
            region.remove_lease(id, &key)?;
            continue;
        }
        return Err(Error::SnapshotUnderLazyVolume {
            snapshot: id.clone(),
            overlay: lease.overlay,
            host: lease.host,
        });
    }
    Ok(())
}

/// Whether the overlay at `overlay` may still read snapshot `id`: its dirty
/// map names it, or cannot be read to say otherwise.
fn overlay_reads(overlay: &Path, id: &SnapshotId) -> bool {
    let mut map = overlay.as_os_str().to_os_string();
    map.push(MapKind::Dirty.suffix());
    let map = std::path::PathBuf::from(map);
    let mut head = vec![0u8; HEADER_LEN];
    let read = std::fs::File::open(&map).and_then(|f| {
        use std::io::Read;
        f.take(HEADER_LEN as u64).read_exact(&mut head)
    });
    match read {
        Ok(()) => DirtyHeader::decode(MapKind::Dirty, &head, &Location::from(map.as_path()))
            .map_or(true, |h| h.snapshot == *id),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            overlay.parent().is_some_and(crate::sys::on_fuse)
        }
        Err(_) => true,
    }
}

/// Which snapshots `snapshot list` shows, as DescribeSnapshots filters
/// them.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `--owner`: only snapshots of this account.
    pub owner: Option<AccountId>,
    /// `--restorable-by`: only snapshots this account (or, with
    /// [`Grantee::All`], everyone) may restore.
    pub restorable_by: Option<Grantee>,
}

/// The snapshots `caller` may see (its own, those shared with it, public
/// ones), narrowed by `filter`; oldest first. Damaged manifests are
/// returned beside them.
pub fn list(
    region: &Region,
    caller: &AccountId,
    filter: &ListFilter,
) -> Result<(Vec<SnapshotView>, Vec<Error>)> {
    let listing = region.list_snapshots()?;
    // The caller's own snapshots need their permissions read only to
    // answer `--restorable-by`.
    let perms = map_io(region.chunks(), &listing.snapshots, |m| {
        if &m.owner == caller && filter.restorable_by.is_none() {
            Ok(CreateVolumePermissions::default())
        } else {
            permissions::read(region, &m.id)
        }
    })?;
    let mut out = Vec::new();
    let mut damaged = listing.damaged;
    for (meta, p) in listing.snapshots.into_iter().zip(perms) {
        // A damaged permission file grants nothing; the owner still sees
        // the snapshot, and the damage is reported beside the listing.
        let permissions = p.unwrap_or_else(|e| {
            damaged.push(e);
            CreateVolumePermissions::default()
        });
        let v = SnapshotView { meta, permissions };
        let shown = v.can_restore(caller)
            && filter.owner.as_ref().is_none_or(|o| &v.meta.owner == o)
            && match &filter.restorable_by {
                None => true,
                Some(Grantee::All) => v.permissions.is_public(),
                Some(Grantee::Account(a)) => v.can_restore(a),
            };
        if shown {
            out.push(v);
        }
    }
    Ok((out, damaged))
}
