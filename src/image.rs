//! Images (AMIs): immutable manifests of block device mappings, their launch
//! permissions, registration, deprecation and deregistration.
//!
//! On disk, in a region's `images/` directory:
//!
//! ```text
//! <ami>.json         the image manifest: immutable once written
//! <ami>.launch.json  launch permissions (owner-only changes)
//! <ami>.state.json   state (available/deregistered) and deprecation time
//! ```
//!
//! Each is a JSON envelope `{"Format", "Version", "Checksum", "Body"}`
//! whose checksum is the BLAKE3 of the body's exact bytes, so an edited or
//! truncated file is reported, never used. The body uses EC2's key names.
//!
//! Permissions protect a store shared through blocksnap: every read or
//! launch of another account's image checks its launch permissions and
//! every change is owner-only. They do not protect against someone with
//! write access to the store's files.

use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result, check_format};
use crate::id::{AccountId, ImageId, SnapshotId, string_newtype};
use crate::manifest::{SnapshotMeta, Tag};
use crate::region::Region;

const IMAGE_FORMAT: &str = "blocksnap-image";
const LAUNCH_FORMAT: &str = "blocksnap-launch-permissions";
const STATE_FORMAT: &str = "blocksnap-image-state";
const FORMAT_VERSION: u32 = 1;
pub(crate) const MAX_JSON: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// EBS's largest volume, in GiB.
pub const MAX_VOLUME_GIB: u64 = 65536;

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

/// A list of grants in EC2's shape: an image's launch permissions, a
/// snapshot's create-volume permissions.
pub trait Grants {
    fn grants(&self) -> &[LaunchPermission];
    fn grants_mut(&mut self) -> &mut Vec<LaunchPermission>;

    /// Granted to `all`.
    fn is_public(&self) -> bool {
        self.grants()
            .iter()
            .any(|p| matches!(p, LaunchPermission::Group(g) if g == "all"))
    }

    /// Granted to `account` by name.
    fn lists(&self, account: &AccountId) -> bool {
        self.grants()
            .iter()
            .any(|p| matches!(p, LaunchPermission::Account(a) if a == account))
    }

    /// Applies `--reset`, then `--remove`, then `--add`.
    fn apply(&mut self, change: &PermissionChange) {
        let list = self.grants_mut();
        if change.reset {
            list.clear();
        }
        for g in &change.remove {
            let p = g.permission();
            list.retain(|q| *q != p);
        }
        for g in &change.add {
            let p = g.permission();
            if !list.contains(&p) {
                list.push(p);
            }
        }
    }
}

impl Grants for LaunchPermissions {
    fn grants(&self) -> &[LaunchPermission] {
        &self.launch_permissions
    }
    fn grants_mut(&mut self) -> &mut Vec<LaunchPermission> {
        &mut self.launch_permissions
    }
}

/// Who a permission change is about: an account, or everyone (`all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    Account(AccountId),
    All,
}

impl FromStr for Grantee {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            Ok(Grantee::All)
        } else {
            Ok(Grantee::Account(s.parse()?))
        }
    }
}

impl Grantee {
    pub fn permission(&self) -> LaunchPermission {
        match self {
            Grantee::Account(a) => LaunchPermission::Account(a.clone()),
            Grantee::All => LaunchPermission::Group("all".into()),
        }
    }
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
        &self.image.owner_id == account
            || self.permissions.is_public()
            || self.permissions.lists(account)
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
            Ok(())
        } else {
            Err(Error::NotPermitted {
                account: account.clone(),
                action,
                image: self.image.image_id.clone(),
                hint: format!("only its owner, account {}, may", self.image.owner_id),
            })
        }
    }

    /// Fails unless `account` may launch (and so see and copy) the image.
    pub fn require_launch(&self, account: &AccountId, action: &'static str) -> Result<()> {
        if self.can_launch(account) {
            Ok(())
        } else {
            Err(Error::NotPermitted {
                account: account.clone(),
                action,
                image: self.image.image_id.clone(),
                hint: format!(
                    "it is private; its owner can share it with `blocksnap image permissions {} --add {account}`",
                    self.image.image_id
                ),
            })
        }
    }

    pub fn require_available(&self) -> Result<()> {
        match self.state.state {
            ImageState::Available => Ok(()),
            ImageState::Deregistered => Err(Error::ImageDeregistered(self.image.image_id.clone())),
        }
    }
}

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

/// Volume size in GiB that holds `bytes`.
pub fn gib_for(bytes: u64) -> u64 {
    bytes.div_ceil(GIB).max(1)
}

/// Whether `gib` is a volume size EBS allows: 1 to [`MAX_VOLUME_GIB`].
pub fn volume_gib_allowed(gib: u64) -> bool {
    (1..=MAX_VOLUME_GIB).contains(&gib)
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
    let bad = |m: String| Err(Error::InvalidImage(m));
    if mappings.is_empty() {
        return bad("an image needs at least one block device mapping".into());
    }
    let mut metas = Vec::new();
    for (i, m) in mappings.iter().enumerate() {
        if mappings[..i].iter().any(|o| o.device_name == m.device_name) {
            return bad(format!(
                "device {} is mapped twice: map each device once",
                m.device_name
            ));
        }
        match &m.target {
            MappingTarget::Ebs(e) => {
                let meta = match region.read_snapshot_meta(&e.snapshot_id) {
                    Ok(meta) => meta,
                    Err(Error::SnapshotNotFound { .. }) => {
                        return Err(Error::NotFound(format!(
                            "{} maps {}, which does not exist in region {}",
                            m.device_name,
                            e.snapshot_id,
                            region.name()
                        )));
                    }
                    Err(e) => return Err(e),
                };
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
    match mappings.iter().find(|m| &m.device_name == root) {
        None => bad(format!(
            "root device {root} is not among the mappings: map it, or pick another with --root-device"
        )),
        Some(m) if m.ebs().is_none() => bad(format!(
            "root device {root} must map a snapshot, not a no-device or ephemeral volume"
        )),
        Some(_) => Ok(metas),
    }
}

// ---- storage ----

fn image_key(id: &ImageId) -> String {
    format!("images/{id}.json")
}

fn launch_key(id: &ImageId) -> String {
    format!("images/{id}.launch.json")
}

fn state_key(id: &ImageId) -> String {
    format!("images/{id}.state.json")
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope<'a> {
    format: String,
    version: u32,
    checksum: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

pub(crate) fn encode_envelope<T: Serialize>(format: &str, body: &T) -> Vec<u8> {
    let body = serde_json::to_string_pretty(body).expect("image data serializes");
    let checksum = blake3::hash(body.as_bytes()).to_hex().to_string();
    let raw = RawValue::from_string(body).expect("serde_json output is valid JSON");
    let mut out = serde_json::to_vec_pretty(&Envelope {
        format: format.into(),
        version: FORMAT_VERSION,
        checksum,
        body: &raw,
    })
    .expect("envelope serializes");
    out.push(b'\n');
    out
}

pub(crate) fn decode_envelope<T: DeserializeOwned>(
    bytes: &[u8],
    format: &str,
    what: &'static str,
    path: &Path,
) -> Result<T> {
    let corrupt = Error::corrupt_file(what, path);
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON ({e})")))?;
    check_format(what, path, &env.format, format, env.version, FORMAT_VERSION)?;
    if blake3::hash(env.body.get().as_bytes()).to_hex().as_str() != env.checksum {
        return Err(corrupt(
            "checksum mismatch: the file was edited or damaged".into(),
        ));
    }
    serde_json::from_str(env.body.get()).map_err(|e| corrupt(e.to_string()))
}

/// Decodes an image manifest file (`images/<ami>.json`); `path` names it
/// in errors.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<Image> {
    decode_envelope(bytes, IMAGE_FORMAT, "image manifest", path)
}

/// Decodes a launch permissions file (`images/<ami>.launch.json`).
pub fn decode_permissions(bytes: &[u8], path: &Path) -> Result<LaunchPermissions> {
    decode_envelope(bytes, LAUNCH_FORMAT, "launch permissions", path)
}

/// Decodes an image state file (`images/<ami>.state.json`).
pub fn decode_state(bytes: &[u8], path: &Path) -> Result<StateRecord> {
    decode_envelope(bytes, STATE_FORMAT, "image state", path)
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
    let image = decode_image(&bytes, &path)?;
    if &image.image_id != id {
        return Err(Error::CorruptFile {
            what: "image manifest",
            path,
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
    Ok(ImageView {
        image,
        state,
        permissions,
    })
}

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
    for view in crate::chunker::map_io(region.chunks(), &ids, |id| read(region, id))? {
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
pub(crate) fn write_new(region: &Region, image: &Image) -> Result<()> {
    let created = region.backend().create(
        &image_key(&image.image_id),
        &encode_envelope(IMAGE_FORMAT, image),
    )?;
    if !created {
        return Err(Error::AlreadyExists(format!(
            "image {} already exists",
            image.image_id
        )));
    }
    Ok(())
}

fn write_state(region: &Region, id: &ImageId, state: &StateRecord) -> Result<()> {
    region
        .backend()
        .replace(&state_key(id), &encode_envelope(STATE_FORMAT, state))
}

fn write_permissions(region: &Region, id: &ImageId, p: &LaunchPermissions) -> Result<()> {
    region
        .backend()
        .replace(&launch_key(id), &encode_envelope(LAUNCH_FORMAT, p))
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
    validate_name(&opts.name)?;
    crate::snapshot::validate_labels(&opts.description, &opts.tags)?;
    let architecture = opts
        .architecture
        .clone()
        .unwrap_or_else(|| host_architecture().to_string());
    validate_architecture(&architecture)?;
    // Under the catalog lock, two registrations of one name cannot both
    // pass the name check, and a snapshot cannot be deleted between the
    // mapping check and the write.
    let _catalog = region.catalog_lock("image register")?;
    check_name_free(region, &opts.owner, &opts.name)?;
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

/// A permission change (ModifyImageAttribute launchPermission).
#[derive(Debug, Clone, Default)]
pub struct PermissionChange {
    pub add: Vec<Grantee>,
    pub remove: Vec<Grantee>,
    pub reset: bool,
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
    /// Snapshots kept because another registered image uses them.
    pub kept_snapshots: Vec<KeptSnapshot>,
}

#[derive(Debug, Clone)]
pub struct KeptSnapshot {
    pub snapshot: SnapshotId,
    pub used_by: ImageId,
}

/// Deregisters an image; owner only (DeregisterImage). With
/// `delete_snapshots`, deletes its snapshots that no other registered
/// image uses.
pub fn deregister(
    region: &Region,
    id: &ImageId,
    caller: &AccountId,
    delete_snapshots: bool,
) -> Result<DeregisterReport> {
    let _catalog = region.catalog_lock("image deregister")?;
    let view = read(region, id)?;
    view.require_owner(caller, "deregister")?;
    view.require_available()?;
    write_state(
        region,
        id,
        &StateRecord {
            state: ImageState::Deregistered,
            ..view.state.clone()
        },
    )?;
    let mut report = DeregisterReport::default();
    if delete_snapshots {
        let _lock = region.lock(crate::LockMode::Shared, "image deregister")?;
        let others = list(region)?.images;
        let mut seen = Vec::new();
        for snap in view.image.snapshot_ids() {
            if seen.contains(&snap) {
                continue;
            }
            seen.push(snap);
            match users_of(&others, snap).into_iter().find(|o| o != id) {
                Some(user) => report.kept_snapshots.push(KeptSnapshot {
                    snapshot: snap.clone(),
                    used_by: user,
                }),
                None => {
                    match region.delete_snapshot(snap) {
                        Ok(()) | Err(Error::SnapshotNotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                    report.deleted_snapshots.push(snap.clone());
                }
            }
        }
    }
    Ok(report)
}

/// Available images among `images` whose mappings use `snapshot`.
fn users_of(images: &[ImageView], snapshot: &SnapshotId) -> Vec<ImageId> {
    images
        .iter()
        .filter(|v| {
            v.state.state == ImageState::Available && v.image.snapshot_ids().any(|s| s == snapshot)
        })
        .map(|v| v.image.image_id.clone())
        .collect()
}

/// Fails if a registered image in the region uses `snapshot`.
pub fn check_snapshot_unused(region: &Region, snapshot: &SnapshotId) -> Result<()> {
    let listing = list(region)?;
    if let Some(e) = listing.damaged.into_iter().next() {
        // An unreadable image might use the snapshot: refuse rather than guess.
        return Err(e);
    }
    match users_of(&listing.images, snapshot).into_iter().next() {
        Some(image) => Err(Error::SnapshotInUse {
            snapshot: snapshot.clone(),
            image,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn mappings_serialize_in_ec2_shape() {
        let m = vec![
            BlockDeviceMapping {
                device_name: "/dev/xvda".parse().unwrap(),
                target: MappingTarget::Ebs(EbsMapping {
                    snapshot_id: "snap-0123456789abcdef0".parse().unwrap(),
                    volume_size: 8,
                    delete_on_termination: true,
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
        let bytes = encode_envelope(LAUNCH_FORMAT, &perms);
        let p = Path::new("x.launch.json");
        let back: LaunchPermissions =
            decode_envelope(&bytes, LAUNCH_FORMAT, "launch permissions", p).unwrap();
        assert_eq!(back, perms);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let edited = text.replace("123456789012", "999999999999");
        let err = decode_envelope::<LaunchPermissions>(
            edited.as_bytes(),
            LAUNCH_FORMAT,
            "launch permissions",
            p,
        )
        .unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = decode_envelope::<LaunchPermissions>(
            &bytes[..bytes.len() / 2],
            LAUNCH_FORMAT,
            "launch permissions",
            p,
        )
        .unwrap_err();
        assert!(matches!(err, Error::CorruptFile { .. }), "{err}");
        assert!(
            decode_envelope::<LaunchPermissions>(&bytes, IMAGE_FORMAT, "image manifest", p)
                .is_err()
        );
    }
}
