//! `image create` (CreateImage): snapshot volumes (given as files and
//! devices, or the volumes of a launched instance) and register an image of
//! them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::image::{
    BlockDeviceMapping, DeviceName, EbsMapping, Image, MappingTarget, gib_for,
};
use crate::format::instance::InstanceVolume;
use crate::format::manifest::{SnapshotMeta, Tag};
use crate::id::{AccountId, ImageId, SnapshotId};
use crate::image::ops::{self, RegisterOptions};
use crate::image::{instance, rules};
use crate::lazy::snapshot::{LazySnapshot, LazySnapshotOptions};
use crate::ops::snapshot::{self, CreateOptions, Encryption, ParentChoice};
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::volume::io::Volume;

/// What a `--map DEVICE=VALUE` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSource {
    /// A volume to snapshot.
    Volume(PathBuf),
    /// An existing snapshot.
    Snapshot(SnapshotId),
    /// `none`: the device is suppressed.
    NoDevice,
    /// `ephemeralN`.
    Ephemeral(String),
}

impl MapSource {
    /// `none`, `ephemeralN`, `snap-…`, or a path.
    pub fn parse(value: &str) -> Result<MapSource> {
        Ok(if value == "none" {
            MapSource::NoDevice
        } else if value.starts_with("ephemeral") {
            MapSource::Ephemeral(value.to_string())
        } else if value.starts_with("snap-") {
            MapSource::Snapshot(value.parse()?)
        } else {
            MapSource::Volume(PathBuf::from(value))
        })
    }
}

/// One `--map DEVICE=VALUE`.
#[derive(Debug, Clone)]
pub struct MapSpec {
    pub device: DeviceName,
    pub source: MapSource,
}

impl MapSpec {
    /// Parses `DEVICE=VALUE`.
    pub fn parse(s: &str) -> Result<MapSpec> {
        let (dev, value) = s.split_once('=').ok_or_else(|| {
            Error::InvalidImage(format!(
                "mapping {s:?} is not DEVICE=VALUE: e.g. /dev/xvda=root.img, /dev/xvdb=snap-…, /dev/xvdc=none, /dev/xvdd=ephemeral0"
            ))
        })?;
        Ok(MapSpec {
            device: dev.parse()?,
            source: MapSource::parse(value)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ImageCreateOptions {
    pub name: String,
    pub description: String,
    pub architecture: Option<String>,
    /// Default: the first mapped device.
    pub root_device: Option<DeviceName>,
    pub tags: Vec<Tag>,
    /// Tags for the snapshots it takes (the image's own are `tags`).
    pub snapshot_tags: Vec<Tag>,
    /// GiB per device; default: the smallest that holds the snapshot.
    pub volume_sizes: HashMap<DeviceName, u64>,
    /// Devices whose volumes survive `instance terminate`.
    pub keep_on_termination: Vec<DeviceName>,
    pub owner: AccountId,
    pub threads: usize,
    /// Encryption asked of the volumes snapshotted (EBS's rules: see
    /// `ops::snapshot::choose_key`).
    pub encryption: Encryption,
}

impl ImageCreateOptions {
    /// Options for an image called `name` owned by `owner`, with every
    /// other choice left to its default.
    pub fn new(name: &str, owner: AccountId) -> ImageCreateOptions {
        ImageCreateOptions {
            name: name.into(),
            description: String::new(),
            architecture: None,
            root_device: None,
            tags: Vec::new(),
            snapshot_tags: Vec::new(),
            volume_sizes: HashMap::new(),
            keep_on_termination: Vec::new(),
            owner,
            threads: 0,
            encryption: Encryption::default(),
        }
    }

    /// The size of `dev`'s volume: as given, or the GiB that hold `bytes`.
    fn volume_gib(&self, dev: &DeviceName, bytes: u64) -> u64 {
        self.volume_sizes
            .get(dev)
            .copied()
            .unwrap_or(gib_for(bytes))
    }

    fn register_options(
        &self,
        root_device: DeviceName,
        image_id: Option<ImageId>,
    ) -> RegisterOptions {
        RegisterOptions {
            name: self.name.clone(),
            description: self.description.clone(),
            architecture: self.architecture.clone(),
            root_device,
            tags: self.tags.clone(),
            owner: self.owner.clone(),
            image_id,
            source_image_id: None,
            source_region: None,
        }
    }
}

/// What `image create` did: the image and each new snapshot.
#[derive(Debug, Clone)]
pub struct ImageCreateReport {
    pub image: Image,
    pub snapshots: Vec<CreatedSnapshot>,
}

#[derive(Debug, Clone)]
pub struct CreatedSnapshot {
    pub device: DeviceName,
    pub snapshot: SnapshotMeta,
    /// Of a lazy volume: blocks read (the dirty map named them) and blocks
    /// taken from the parent unread.
    pub read_taken: Option<(u64, u64)>,
}

/// One device of the image to be: how to get its mapping.
enum Plan {
    Snapshot {
        path: PathBuf,
        parent: ParentChoice,
        keep: bool,
    },
    /// A lazy volume of the instance, snapshotted from its dirty map.
    Lazy {
        keep: bool,
    },
    Ready(MappingTarget),
}

/// Snapshots the volumes named by `maps` and registers an image of them.
pub fn create_from_volumes(
    region: &Region,
    maps: &[MapSpec],
    opts: &ImageCreateOptions,
    progress: &dyn Progress,
) -> Result<ImageCreateReport> {
    let plans = maps
        .iter()
        .map(|m| Ok((m.device.clone(), plan(region, m, opts)?)))
        .collect::<Result<Vec<_>>>()?;
    let root = root_device(maps, opts)?;
    let job = Job {
        region,
        root: &root,
        opts,
        call: "CreateImage",
        progress,
        lazy: None,
    };
    snapshot_and_register(job, plans)
}

/// Registers an image of existing snapshots, `none` and `ephemeralN`
/// mappings (RegisterImage): nothing is snapshotted, so a volume is
/// refused.
pub fn register_maps(
    region: &Region,
    maps: &[MapSpec],
    opts: &ImageCreateOptions,
) -> Result<Image> {
    let mut mappings = Vec::new();
    for m in maps {
        if let MapSource::Volume(path) = &m.source {
            return Err(Error::InvalidImage(format!(
                "{}={}: register maps snapshots (snap-…), none or ephemeralN; use `image create` to snapshot a volume",
                m.device,
                path.display()
            )));
        }
        let Plan::Ready(target) = plan(region, m, opts)? else {
            unreachable!("only a volume is snapshotted");
        };
        mappings.push(BlockDeviceMapping {
            device_name: m.device.clone(),
            target,
        });
    }
    let ropts = opts.register_options(root_device(maps, opts)?, None);
    ops::register(region, &ropts, mappings)
}

/// The mapping of snapshot `meta` as a `volume_gib` volume, recording its
/// encryption as EC2 does (`Encrypted`, and the key's ARN as `KmsKeyId`).
pub fn ebs_mapping(
    region: &Region,
    meta: &SnapshotMeta,
    volume_gib: u64,
    delete_on_termination: bool,
) -> Result<EbsMapping> {
    let kms_key_id = match &meta.kms_key_id {
        Some(k) => {
            let keys = region.keys();
            Some(keys.arn(&keys.resolve(&k.to_string())?))
        }
        None => None,
    };
    Ok(EbsMapping {
        snapshot_id: meta.id.clone(),
        volume_size: volume_gib,
        delete_on_termination,
        encrypted: kms_key_id.is_some(),
        kms_key_id,
    })
}

/// How device `m` gets its mapping: a volume to snapshot, or one ready.
fn plan(region: &Region, m: &MapSpec, opts: &ImageCreateOptions) -> Result<Plan> {
    let keep = opts.keep_on_termination.contains(&m.device);
    Ok(match &m.source {
        MapSource::Volume(path) => Plan::Snapshot {
            path: path.clone(),
            parent: ParentChoice::Latest,
            keep,
        },
        MapSource::Snapshot(id) => {
            let meta = rules::mapped_snapshot(region, &m.device, id)?;
            Plan::Ready(MappingTarget::Ebs(ebs_mapping(
                region,
                &meta,
                opts.volume_gib(&m.device, meta.volume_size),
                !keep,
            )?))
        }
        MapSource::NoDevice => Plan::Ready(MappingTarget::NoDevice(String::new())),
        MapSource::Ephemeral(v) => Plan::Ready(MappingTarget::VirtualName(v.clone())),
    })
}

/// `--root-device`, or the first mapped device.
fn root_device(maps: &[MapSpec], opts: &ImageCreateOptions) -> Result<DeviceName> {
    match &opts.root_device {
        Some(r) => Ok(r.clone()),
        None => maps
            .first()
            .map(|m| m.device.clone())
            .ok_or_else(|| Error::InvalidImage("an image needs at least one --map".into())),
    }
}

/// Snapshots every EBS volume of the instance in `dir`, each incremental
/// against the snapshot it was launched from, and registers an image with
/// the same device names and root device.
pub fn create_from_instance(
    region: &Arc<Region>,
    dir: &Path,
    opts: &ImageCreateOptions,
    progress: &dyn Progress,
) -> Result<ImageCreateReport> {
    let inst = instance::read(dir)?;
    instance::check_usable(region, &inst)?;
    let mut plans = Vec::new();
    for d in &inst.block_device_mappings {
        let plan = match &d.volume {
            InstanceVolume::Ebs(e) if e.overlay.is_some() => Plan::Lazy {
                keep: !e.delete_on_termination,
            },
            InstanceVolume::Ebs(e) => Plan::Snapshot {
                path: dir.join(&d.volume_file),
                parent: if region.has_snapshot(&e.snapshot_id)? {
                    ParentChoice::Explicit(e.snapshot_id.clone())
                } else {
                    // Its source snapshot was deleted: fall back to the
                    // newest snapshot of the same volume file, if any.
                    ParentChoice::Latest
                },
                keep: !e.delete_on_termination,
            },
            InstanceVolume::VirtualName(v) => Plan::Ready(MappingTarget::VirtualName(v.clone())),
        };
        plans.push((d.device_name.clone(), plan));
    }
    let root = opts
        .root_device
        .clone()
        .unwrap_or(inst.root_device_name.clone());
    let call = format!("CreateImage({})", inst.instance_id);
    let take_lazy = |devices: &[DeviceName], description: String| {
        let lopts = LazySnapshotOptions {
            description,
            tags: opts.snapshot_tags.clone(),
            owner: Some(opts.owner.clone()),
            threads: opts.threads,
            no_delta: false,
        };
        instance::snapshot_lazy(region, dir, devices, &lopts)
    };
    let job = Job {
        region,
        root: &root,
        opts,
        call: &call,
        progress,
        lazy: Some(&take_lazy),
    };
    snapshot_and_register(job, plans)
}

/// Takes snapshots of lazy volumes by device, with a description.
type TakeLazy<'a> = dyn Fn(&[DeviceName], String) -> Result<Vec<(DeviceName, LazySnapshot)>> + 'a;

/// One image creation: where, its root device, its options, the EC2 call
/// it stands for (named in its snapshots' descriptions).
#[derive(Clone, Copy)]
struct Job<'a> {
    region: &'a Region,
    root: &'a DeviceName,
    opts: &'a ImageCreateOptions,
    call: &'a str,
    progress: &'a dyn Progress,
    /// Snapshots the instance's lazy volumes.
    lazy: Option<&'a TakeLazy<'a>>,
}

fn snapshot_and_register(job: Job, plans: Vec<(DeviceName, Plan)>) -> Result<ImageCreateReport> {
    let Job {
        region, root, opts, ..
    } = job;
    // Everything that can be checked before snapshotting is, so a bad
    // name or mapping leaves no stray snapshots behind.
    rules::check_labels(
        region,
        &opts.owner,
        &opts.name,
        &opts.description,
        &opts.tags,
        opts.architecture
            .as_deref()
            .unwrap_or_else(|| rules::host_architecture()),
    )?;
    rules::check_devices(
        root,
        plans.iter().map(|(d, p)| {
            let snapshot = matches!(
                p,
                Plan::Snapshot { .. } | Plan::Lazy { .. } | Plan::Ready(MappingTarget::Ebs(_))
            );
            (d, snapshot)
        }),
    )?;
    for dev in opts.volume_sizes.keys() {
        if !plans.iter().any(|(d, _)| d == dev) {
            return Err(Error::InvalidImage(format!(
                "--volume-size names {dev}, which is not mapped"
            )));
        }
    }
    for (dev, plan) in &plans {
        let given = opts.volume_sizes.get(dev).copied();
        match plan {
            Plan::Snapshot { path, .. } => {
                let volume = Volume::open(path).map_err(|e| match e {
                    Error::VolumeNotFound(p) => {
                        Error::NotFound(format!("{dev}: volume {} does not exist", p.display()))
                    }
                    other => other,
                })?;
                if let Some(gib) = given {
                    let source = format!("volume {}", path.display());
                    rules::validate_volume_size(dev, gib, &source, volume.size())?;
                }
            }
            Plan::Ready(MappingTarget::Ebs(e)) => {
                let meta = rules::mapped_snapshot(region, dev, &e.snapshot_id)?;
                let source = e.snapshot_id.to_string();
                rules::validate_volume_size(dev, e.volume_size, &source, meta.volume_size)?;
            }
            Plan::Ready(MappingTarget::VirtualName(v)) => rules::validate_virtual_name(dev, v)?,
            Plan::Ready(MappingTarget::NoDevice(_)) | Plan::Lazy { .. } => {}
        }
    }

    // From here on, a failure deletes the snapshots this call took.
    let mut created = Vec::new();
    let result = take_and_register(job, plans, &mut created);
    if result.is_err() {
        // A lazy volume's new snapshot is already underneath its overlay:
        // it stays.
        for c in created.iter().filter(|c| c.read_taken.is_none()) {
            let _ = region.delete_snapshot(&c.snapshot.id);
        }
    }
    let image = result?;
    Ok(ImageCreateReport {
        image,
        snapshots: created,
    })
}

fn take_and_register(
    job: Job,
    plans: Vec<(DeviceName, Plan)>,
    created: &mut Vec<CreatedSnapshot>,
) -> Result<Image> {
    let Job {
        region,
        root,
        opts,
        call,
        progress,
        lazy,
    } = job;
    let image_id = ImageId::random();
    // Every lazy volume at one instant, first.
    let lazy_devices: Vec<DeviceName> = plans
        .iter()
        .filter(|(_, p)| matches!(p, Plan::Lazy { .. }))
        .map(|(d, _)| d.clone())
        .collect();
    let mut lazy_taken = match lazy {
        Some(take) if !lazy_devices.is_empty() => {
            take(&lazy_devices, format!("Created by {call} for {image_id}"))?
        }
        _ => Vec::new(),
    };
    let mut mappings = Vec::new();
    for (dev, plan) in plans {
        let target = match plan {
            Plan::Ready(t) => t,
            Plan::Lazy { keep } => {
                let at = lazy_taken
                    .iter()
                    .position(|(d, _)| *d == dev)
                    .ok_or_else(|| {
                        Error::InvalidInstance(format!("no snapshot was taken of lazy {dev}"))
                    })?;
                let (_, s) = lazy_taken.swap_remove(at);
                created.push(CreatedSnapshot {
                    device: dev.clone(),
                    snapshot: s.meta.clone(),
                    read_taken: Some((s.blocks_read, s.blocks_taken)),
                });
                MappingTarget::Ebs(ebs_mapping(
                    region,
                    &s.meta,
                    opts.volume_gib(&dev, s.meta.volume_size),
                    !keep,
                )?)
            }
            Plan::Snapshot { path, parent, keep } => {
                let copts = CreateOptions {
                    parent,
                    block_size: None,
                    description: format!("Created by {call} for {image_id} ({dev})"),
                    tags: opts.snapshot_tags.clone(),
                    owner: Some(opts.owner.clone()),
                    threads: opts.threads,
                    encryption: opts.encryption.clone(),
                    ..CreateOptions::default()
                };
                let meta = snapshot::create(region, &path, &copts, progress)?;
                let t = MappingTarget::Ebs(ebs_mapping(
                    region,
                    &meta,
                    opts.volume_gib(&dev, meta.volume_size),
                    !keep,
                )?);
                created.push(CreatedSnapshot {
                    device: dev.clone(),
                    snapshot: meta,
                    read_taken: None,
                });
                t
            }
        };
        mappings.push(BlockDeviceMapping {
            device_name: dev,
            target,
        });
    }
    let ropts = opts.register_options(root.clone(), Some(image_id));
    ops::register(region, &ropts, mappings)
}
