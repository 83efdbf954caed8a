//! The images (AMIs) a region holds, in its `images/` directory:
//!
//! ```text
//! <ami>.json         the image manifest: immutable once written
//! <ami>.launch.json  launch permissions (owner-only changes)
//! <ami>.state.json   state (available/deregistered) and deprecation time
//! ```
//!
//! Reading, listing and writing them, and which images use a snapshot.
//! The rules an image must follow are in `image::rules`.

use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::format::image::{
    Image, ImageState, LaunchPermissions, MAX_JSON, StateRecord, decode_image, decode_permissions,
    decode_state, encode_image, encode_permissions, encode_state,
};
use crate::format::lifecycle::{BinEntry, ResourceType};
use crate::id::{AccountId, ImageId, SnapshotId};
use crate::region::catalog::Region;
use crate::region::permissions::Grants;
use crate::region::recycle;
use crate::store::pool::map_io;

pub fn image_key(id: &ImageId) -> String {
    format!("images/{id}.json")
}

pub fn launch_key(id: &ImageId) -> String {
    format!("images/{id}.launch.json")
}

pub fn state_key(id: &ImageId) -> String {
    format!("images/{id}.state.json")
}

/// Where the tags `CreateTags` gave an image live.
pub fn tags_key(id: &ImageId) -> String {
    format!("images/{id}.tags.json")
}

/// An image with its mutable attributes, as `describe` shows it.
#[derive(Debug, Clone)]
pub struct ImageView {
    pub image: Image,
    pub state: StateRecord,
    pub permissions: LaunchPermissions,
}

impl ImageView {
    pub fn can_launch(&self, account: &AccountId) -> bool {
        self.permissions.allows(&self.image.owner_id, account)
    }

    pub fn is_deprecated(&self, now: SystemTime) -> bool {
        self.state
            .deprecation_time
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .is_some_and(|t| t <= now)
    }

    /// Fails unless `account` owns the image.
    pub fn require_owner(&self, account: &AccountId, action: &'static str) -> Result<()> {
        if &self.image.owner_id == account {
            return Ok(());
        }
        let hint = format!("only its owner, account {}, may", self.image.owner_id);
        Err(self.refused(account, action, hint))
    }

    /// Fails unless `account` may launch (and so see and copy) the image.
    pub fn require_launch(&self, account: &AccountId, action: &'static str) -> Result<()> {
        if self.can_launch(account) {
            return Ok(());
        }
        let hint = format!(
            "it is private; its owner can share it with `blocksnap image permissions {} --add {account}`",
            self.image.image_id
        );
        Err(self.refused(account, action, hint))
    }

    fn refused(&self, account: &AccountId, action: &'static str, hint: String) -> Error {
        Error::NotPermitted {
            account: account.clone(),
            action,
            image: self.image.image_id.clone(),
            hint,
        }
    }

    pub fn require_available(&self) -> Result<()> {
        match self.state.state {
            ImageState::Available => Ok(()),
            ImageState::Deregistered => Err(Error::ImageDeregistered(self.image.image_id.clone())),
        }
    }
}

/// Reads an image with its state and permissions.
pub fn read(region: &Region, id: &ImageId) -> Result<ImageView> {
    let store = region.backend();
    let path = store.locate(&image_key(id));
    let bytes = store
        .read(&image_key(id), "image manifest", MAX_JSON)?
        .ok_or_else(|| Error::ImageNotFound {
            id: id.clone(),
            region: region.name().to_string(),
        })?;
    let mut image = decode_image(&bytes, &path)?;
    if &image.image_id != id {
        return Err(Error::CorruptFile {
            what: "image manifest",
            location: path,
            reason: format!("it describes {} instead", image.image_id),
        });
    }
    let state = match store.read(&state_key(id), "image state", MAX_JSON)? {
        Some(b) => decode_state(&b, &store.locate(&state_key(id)))?,
        None => StateRecord::default(),
    };
    let permissions = match store.read(&launch_key(id), "launch permissions", MAX_JSON)? {
        Some(b) => decode_permissions(&b, &store.locate(&launch_key(id)))?,
        None => LaunchPermissions::default(),
    };
    if let Some(tags) = region.tag_record(&tags_key(id))? {
        image.tags = tags;
    }
    Ok(ImageView {
        image,
        state,
        permissions,
    })
}

/// Images found in a region, and files that could not be read.
pub struct ImageListing {
    pub images: Vec<ImageView>,
    pub damaged: Vec<Error>,
}

/// Every image of the region, oldest first.
pub fn list(region: &Region) -> Result<ImageListing> {
    let ids: Vec<ImageId> = region
        .backend()
        .list("images")?
        .iter()
        .filter_map(|name| name.strip_suffix(".json")?.parse().ok())
        .collect();
    let mut listing = ImageListing {
        images: Vec::new(),
        damaged: Vec::new(),
    };
    for view in map_io(region.chunks(), &ids, |id| read(region, id))? {
        match view {
            Ok(v) => listing.images.push(v),
            Err(Error::ImageNotFound { .. }) => {}
            Err(e) => listing.damaged.push(e),
        }
    }
    listing.images.sort_by(|a, b| {
        (&a.image.creation_date, &a.image.image_id)
            .cmp(&(&b.image.creation_date, &b.image.image_id))
    });
    Ok(listing)
}

/// Writes a new image manifest; an existing one is never overwritten.
pub fn write_new(region: &Region, image: &Image) -> Result<()> {
    let created = region
        .backend()
        .create(&image_key(&image.image_id), &encode_image(image))?;
    if !created {
        return Err(Error::AlreadyExists(format!(
            "image {} already exists",
            image.image_id
        )));
    }
    Ok(())
}

pub fn write_state(region: &Region, id: &ImageId, state: &StateRecord) -> Result<()> {
    region
        .backend()
        .replace(&state_key(id), &encode_state(state))
}

pub fn write_permissions(region: &Region, id: &ImageId, p: &LaunchPermissions) -> Result<()> {
    region
        .backend()
        .replace(&launch_key(id), &encode_permissions(p))
}

/// Available images among `images` whose mappings use `snapshot`.
pub fn users_of(images: &[ImageView], snapshot: &SnapshotId) -> Vec<ImageId> {
    images
        .iter()
        .filter(|v| {
            v.state.state == ImageState::Available && v.image.snapshot_ids().any(|s| s == snapshot)
        })
        .map(|v| v.image.image_id.clone())
        .collect()
}

/// The images in the recycle bin (deregistered, with a bin entry), with
/// their entries.
pub fn binned(region: &Region) -> Result<Vec<(BinEntry, ImageView)>> {
    binned_among(region, &list(region)?.images)
}

/// The images of `images` (a listing of the region) in the recycle bin.
fn binned_among(region: &Region, images: &[ImageView]) -> Result<Vec<(BinEntry, ImageView)>> {
    let mut out = Vec::new();
    for e in recycle::entries(region, ResourceType::Ec2Image)? {
        match images.iter().find(|v| v.image.image_id.as_str() == e.id) {
            Some(v) if v.state.state == ImageState::Deregistered => out.push((e, v.clone())),
            Some(_) => {}
            // Not listed: gone, or unreadable, which is an error here (the
            // entry may be all that keeps it).
            None => match e.id.parse::<ImageId>().map(|id| read(region, &id)) {
                Ok(Err(err)) if !matches!(err, Error::ImageNotFound { .. }) => return Err(err),
                _ => {}
            },
        }
    }
    Ok(out)
}

/// Fails if a registered image in the region uses `snapshot`, or an image
/// in the recycle bin (which would need it back).
pub fn check_snapshot_unused(region: &Region, snapshot: &SnapshotId) -> Result<()> {
    let listing = list(region)?;
    if let Some(e) = listing.damaged.into_iter().next() {
        // An unreadable image might use the snapshot: refuse rather than guess.
        return Err(e);
    }
    if let Some(image) = users_of(&listing.images, snapshot).into_iter().next() {
        return Err(Error::SnapshotInUse {
            snapshot: snapshot.clone(),
            image,
        });
    }
    for (entry, view) in binned_among(region, &listing.images)? {
        if view.image.snapshot_ids().any(|s| s == snapshot) {
            return Err(Error::Conflict(format!(
                "snapshot {snapshot} backs image {}, which is in the recycle bin until {}: \
                 restore the image with `blocksnap image restore-from-recycle-bin {}` and \
                 deregister it with its snapshots, or wait until it is purged",
                entry.id, entry.recycle_bin_exit_time, entry.id
            )));
        }
    }
    Ok(())
}
