//! Instances (RunInstances, TerminateInstances): a directory holding the
//! volumes restored from an image, one file per device, and `instance.json`
//! recording where each came from. A lazy instance (`--lazy`) restores
//! nothing: each EBS volume is an overlay over its snapshot, served as
//! `DIR/<device>.img` by `instance attach`.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::format::control::Op;
use crate::format::control::Taken;
use crate::format::image::{BlockDeviceMapping, DeviceName};
use crate::format::image::{GIB, MAX_JSON, MAX_VOLUME_GIB, MappingTarget, volume_gib_allowed};
use crate::format::instance::{
    INSTANCE_FORMAT, Instance, InstanceDevice, InstanceEbs, InstanceVolume, RUNNING, TERMINATED,
    decode, encode,
};
use crate::id::{AccountId, ImageId, InstanceId, SnapshotId};
use crate::image::ops::read_launchable;
use crate::lazy::control;
use crate::lazy::disk::Disk;
use crate::lazy::fuse::{Entry, check_mount_point, end_mount, serve_files};
use crate::lazy::nbd::{self, Listen, ServeLog};
use crate::lazy::overlay::Overlay;
use crate::lazy::reader::DEFAULT_CACHE;
use crate::lazy::snapshot::{LazySnapshot, LazySnapshotOptions, Target, snapshot_overlays};
use crate::ops::restore::{self, RestoreOptions};
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::store::files::{Durability, read_bounded, write_atomic};
use crate::store::pool;
use crate::sys::LockMode;

const INSTANCE_FILE: &str = "instance.json";

/// Reads `DIR/instance.json`.
pub fn read(dir: &Path) -> Result<Instance> {
    // A lazy instance whose attach was killed leaves a dead mount over
    // its directory: the files are all still under it.
    crate::lazy::fuse::clear_dead_mount(dir);
    let path = dir.join(INSTANCE_FILE);
    let bytes = read_bounded(&path, "instance description", MAX_JSON)?.ok_or_else(|| {
        Error::NotFound(format!(
            "{} holds no instance ({} is missing): give the directory `instance launch` created",
            dir.display(),
            INSTANCE_FILE
        ))
    })?;
    decode(&bytes, &path.into())
}

fn write(dir: &Path, inst: &Instance) -> Result<()> {
    write_atomic(&dir.join(INSTANCE_FILE), &encode(inst), Durability::Now)
}

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub caller: AccountId,
    pub threads: usize,
    /// Size of each instance-store (ephemeral) volume.
    pub ephemeral_size: u64,
    /// Restore nothing: create an overlay over each snapshot instead.
    pub lazy: bool,
}

/// Launches `ami` into `dir`: restores every EBS mapping in parallel into
/// `DIR/<device>.img` (sparse, verified, grown to its VolumeSize), creates
/// an empty sparse file for each ephemeral device, skips no-device
/// mappings, and writes `instance.json` last.
pub fn launch(
    region: &Arc<Region>,
    ami: &ImageId,
    dir: &Path,
    opts: &LaunchOptions,
    progress: &dyn Progress,
) -> Result<Instance> {
    let view = read_launchable(region, ami, &opts.caller, "launch")?;
    let pool = pool::thread_pool_for(region.chunks(), opts.threads, pool::Work::Fetch)?;
    let image = LaunchedImage {
        id: ami,
        region: region.name(),
        mappings: &view.image.block_device_mappings,
        architecture: &view.image.architecture,
        root_device_name: &view.image.root_device_name,
    };
    let volume_size = |id: &SnapshotId| Ok(region.read_snapshot_meta(id)?.volume_size);
    let fill = |path: &Path, e: &InstanceEbs| match &e.overlay {
        Some(overlay) => Overlay::create(
            &dir.join(overlay),
            region.clone(),
            &e.snapshot_id,
            e.volume_size * GIB,
            DEFAULT_CACHE,
        )
        .map(|_| ()),
        None => {
            let ropts = RestoreOptions {
                size: Some(e.volume_size * GIB),
                ..Default::default()
            };
            restore::restore_in(region, &e.snapshot_id, path, &ropts, &pool, progress).map(|_| ())
        }
    };
    launch_with(&image, dir, opts, &pool, progress, &volume_size, &fill)
}

/// What a launch needs of an image, wherever it was read from.
pub struct LaunchedImage<'a> {
    pub id: &'a ImageId,
    pub region: &'a str,
    pub mappings: &'a [BlockDeviceMapping],
    pub architecture: &'a str,
    pub root_device_name: &'a DeviceName,
}

/// Launches `image` into `dir` as [`launch`] does, for any source of its
/// volumes: `volume_size` gives a snapshot's size in bytes (for
/// progress), `fill` makes the EBS volume at a path from its snapshot (on
/// `pool`, reporting to `progress`).
pub fn launch_with(
    image: &LaunchedImage,
    dir: &Path,
    opts: &LaunchOptions,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
    volume_size: &(dyn Fn(&SnapshotId) -> Result<u64> + Sync),
    fill: &(dyn Fn(&Path, &InstanceEbs) -> Result<()> + Sync),
) -> Result<Instance> {
    let ami = image.id;
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::InvalidInstance(format!(
                    "{} is not empty: launch into a new or empty directory",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).ctx("create instance directory", dir)?
        }
        Err(e) => return Err(e).ctx("read", dir),
    }

    let mut devices = Vec::new();
    let mut total = 0;
    for m in image.mappings {
        let volume_file = format!("{}.img", m.device_name.basename());
        let volume = match &m.target {
            MappingTarget::Ebs(e) => {
                if !volume_gib_allowed(e.volume_size) {
                    // Only an edited manifest holds such a size: never wrap it.
                    return Err(Error::InvalidImage(format!(
                        "{ami} maps {} with a volume size of {} GiB, outside 1-{} GiB: the image \
                         cannot be launched",
                        m.device_name, e.volume_size, MAX_VOLUME_GIB
                    )));
                }
                total += volume_size(&e.snapshot_id)?;
                InstanceVolume::Ebs(InstanceEbs {
                    snapshot_id: e.snapshot_id.clone(),
                    volume_size: e.volume_size,
                    delete_on_termination: e.delete_on_termination,
                    overlay: opts
                        .lazy
                        .then(|| format!("{}.overlay", m.device_name.basename())),
                })
            }
            MappingTarget::VirtualName(v) => InstanceVolume::VirtualName(v.clone()),
            MappingTarget::NoDevice(_) => continue,
        };
        devices.push(InstanceDevice {
            device_name: m.device_name.clone(),
            volume_file,
            volume,
        });
    }

    progress.start("launch", total);
    let result: Result<()> = pool.install(|| {
        devices.par_iter().try_for_each(|d| {
            let path = dir.join(&d.volume_file);
            match &d.volume {
                InstanceVolume::Ebs(e) => fill(&path, e),
                InstanceVolume::VirtualName(_) => File::create_new(&path)
                    .and_then(|f| f.set_len(opts.ephemeral_size))
                    .ctx("create ephemeral volume", &path),
            }
        })
    });
    progress.finish();
    if let Err(e) = result {
        // Leave no half-launched instance behind.
        for d in &devices {
            for f in files_of(d) {
                let _ = fs::remove_file(dir.join(f));
            }
        }
        let _ = fs::remove_dir(dir);
        return Err(e);
    }
    let mut inst = Instance {
        format: Some(INSTANCE_FORMAT.into()),
        version: None,
        instance_id: InstanceId::random(),
        image_id: ami.clone(),
        region: image.region.to_string(),
        owner_id: opts.caller.clone(),
        launch_time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        state: RUNNING.into(),
        architecture: image.architecture.to_string(),
        root_device_name: image.root_device_name.clone(),
        block_device_mappings: devices,
    };
    inst.version = Some(inst.needed_version());
    write(dir, &inst)?;
    Ok(inst)
}

/// The files in the instance directory that make up device `d`'s volume.
fn files_of(d: &InstanceDevice) -> Vec<String> {
    match &d.volume {
        InstanceVolume::Ebs(InstanceEbs {
            overlay: Some(o), ..
        }) => [".dirty", ".present", ""]
            .iter()
            .map(|suffix| format!("{o}{suffix}"))
            .collect(),
        _ => vec![d.volume_file.clone()],
    }
}

/// What `instance terminate` removed and kept.
#[derive(Debug, Clone)]
pub struct TerminateReport {
    pub instance: Instance,
    pub deleted: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

/// Deletes the volumes marked DeleteOnTermination and the ephemeral ones,
/// keeps the rest, and marks the instance terminated.
pub fn terminate(dir: &Path) -> Result<TerminateReport> {
    let mut inst = read(dir)?;
    if inst.state == TERMINATED {
        return Err(Error::InvalidInstance(format!(
            "instance {} is already terminated",
            inst.instance_id
        )));
    }
    if inst.is_lazy() {
        detach(dir)?;
        // Read again from the directory itself, no longer through a mount.
        inst = read(dir)?;
    }
    let mut report_deleted = Vec::new();
    let mut kept = Vec::new();
    for d in &inst.block_device_mappings {
        let files = files_of(d);
        let path = dir.join(files.last().expect("a volume has a file"));
        let delete = match &d.volume {
            InstanceVolume::Ebs(e) => e.delete_on_termination,
            InstanceVolume::VirtualName(_) => true,
        };
        if delete {
            // The overlay's maps go before the overlay: a leftover
            // overlay without maps is no half-volume anyone could use.
            for f in &files {
                let p = dir.join(f);
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).ctx("delete volume", &p),
                }
            }
            report_deleted.push(path);
        } else {
            kept.push(path);
        }
    }
    inst.state = TERMINATED.into();
    write(dir, &inst)?;
    Ok(TerminateReport {
        instance: inst,
        deleted: report_deleted,
        kept,
    })
}

/// Stops the `instance attach` serving the lazy instance in `dir`, if one
/// does, and waits until it is gone.
pub fn detach(dir: &Path) -> Result<bool> {
    if control::request(dir, Op::Stop)?.is_none() {
        return Ok(false);
    }
    for _ in 0..600 {
        if control::request(dir, Op::Stop)?.is_none() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::InvalidInstance(format!(
        "the blocksnap attached to {} did not stop within 30 s: stop it (`umount {}`), then \
         try again",
        dir.display(),
        dir.display()
    )))
}

/// How `instance attach` serves a lazy instance.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Also serve each volume as an NBD export named by its device
    /// (`xvda`).
    pub nbd: Option<Listen>,
    /// Copy every block into the overlays in the background.
    pub hydrate: bool,
    /// Bytes of decoded blocks kept in memory per volume.
    pub cache: usize,
}

/// Serves the lazy instance in `dir` until it is detached (`instance
/// terminate`, `umount DIR`, a signal): its volumes as files `DIR/xvda.img`…
/// of a FUSE mount over `DIR`, optionally as NBD exports, and a control
/// socket through which they are snapshotted. Holds the region lock shared
/// meanwhile, so `store gc` cannot reclaim a chunk the volumes read.
pub fn attach(
    region: &Arc<Region>,
    dir: &Path,
    opts: &AttachOptions,
    log: &'static dyn ServeLog,
) -> Result<()> {
    let inst = read(dir)?;
    check_usable(region, &inst)?;
    if !inst.is_lazy() {
        return Err(Error::InvalidInstance(format!(
            "instance {} was not launched --lazy: its volumes are the files in {}",
            inst.instance_id,
            dir.display()
        )));
    }
    check_mount_point(dir)?;
    let canonical = fs::canonicalize(dir).ctx("resolve", dir)?;
    let _lock = region.lock(LockMode::Shared, "instance attach")?;
    let mut files = Vec::new();
    let mut lazy = Vec::new();
    let mut exports = Vec::new();
    for d in &inst.block_device_mappings {
        let disk = match &d.volume {
            InstanceVolume::Ebs(InstanceEbs {
                overlay: Some(o), ..
            }) => {
                let overlay = Arc::new(Overlay::open(
                    &dir.join(o),
                    region.clone(),
                    None,
                    opts.cache,
                )?);
                let source = canonical.join(&d.volume_file).display().to_string();
                lazy.push((d.device_name.clone(), overlay.clone(), source));
                Disk::Overlay(overlay)
            }
            _ => Disk::file(dir.join(&d.volume_file))?,
        };
        let disk = Arc::new(disk);
        exports.push((d.device_name.basename().to_string(), disk.clone()));
        files.push((d.volume_file.clone(), Entry::Disk(disk)));
    }
    files.push((INSTANCE_FILE.to_string(), Entry::Bytes(encode(&inst))));

    let handler = {
        let (region, lazy, mountpoint) = (region.clone(), lazy.clone(), canonical.clone());
        move |op: &Op| -> std::result::Result<Vec<Taken>, String> {
            match op {
                Op::Snapshot { devices, .. } => {
                    snapshot_attached(&region, &lazy, devices, &control::options(op))
                        .map_err(|e| e.to_string())
                }
                Op::Stop => {
                    end_mount(&mountpoint);
                    Ok(Vec::new())
                }
            }
        }
    };
    control::listen(&canonical, Arc::new(handler))?;
    if opts.hydrate {
        for (device, overlay, _) in &lazy {
            let (device, overlay) = (device.clone(), overlay.clone());
            std::thread::spawn(move || {
                crate::sys::lower_thread_priority();
                let started = Instant::now();
                let stop = AtomicBool::new(false);
                match overlay.hydrate(&stop) {
                    Ok(n) => log.line(format!(
                        "hydrated {device}: {n} bytes copied in {:.1} s; it no longer reads the store",
                        started.elapsed().as_secs_f64()
                    )),
                    Err(e) => log.line(format!("hydrating {device} stopped: {e}")),
                }
            });
        }
    }
    if let Some(listen) = opts.nbd.clone() {
        let exports = exports.clone();
        std::thread::spawn(move || {
            let refs: Vec<(String, &Disk)> = exports
                .iter()
                .map(|(n, d)| (n.clone(), d.as_ref()))
                .collect();
            if let Err(e) = nbd::serve_exports(&listen, &refs, log) {
                log.line(format!("nbd: {e}"));
            }
        });
    }
    serve_files(dir, files, &format!("blocksnap:{}", inst.instance_id), log)
}

/// Snapshots the lazy volumes of `devices` (all when empty) of an attached
/// instance at one instant.
fn snapshot_attached(
    region: &Region,
    lazy: &[(DeviceName, Arc<Overlay>, String)],
    devices: &[String],
    opts: &LazySnapshotOptions,
) -> Result<Vec<Taken>> {
    let chosen: Vec<_> = lazy
        .iter()
        .filter(|(d, _, _)| devices.is_empty() || devices.iter().any(|n| n == d.as_str()))
        .collect();
    if let Some(unknown) = devices
        .iter()
        .find(|n| !lazy.iter().any(|(d, _, _)| d.as_str() == n.as_str()))
    {
        return Err(Error::InvalidInstance(format!(
            "the instance has no lazy volume {unknown}"
        )));
    }
    let targets: Vec<Target> = chosen
        .iter()
        .map(|(_, o, source)| Target {
            overlay: o.as_ref(),
            source: source.clone(),
        })
        .collect();
    let taken = snapshot_overlays(region, &targets, opts)?;
    Ok(chosen
        .iter()
        .zip(taken)
        .map(|((d, _, _), s)| Taken {
            volume: d.to_string(),
            snapshot_id: s.meta.id,
            blocks_read: s.blocks_read,
            blocks_taken: s.blocks_taken,
        })
        .collect())
}

/// Snapshots lazy volumes of the instance in `dir` (those of `devices`,
/// or all when empty) at one instant, reading only their dirty blocks:
/// through the `instance attach` serving it, or here when none does.
pub fn snapshot_lazy(
    region: &Arc<Region>,
    dir: &Path,
    devices: &[DeviceName],
    opts: &LazySnapshotOptions,
) -> Result<Vec<(DeviceName, LazySnapshot)>> {
    let names: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    let op = Op::Snapshot {
        devices: names.clone(),
        description: opts.description.clone(),
        tags: opts.tags.clone(),
        owner: opts.owner.clone(),
        threads: opts.threads,
        no_delta: opts.no_delta,
    };
    let taken = match control::request(dir, op.clone())? {
        Some(t) => t,
        None => {
            let inst = read(dir)?;
            check_usable(region, &inst)?;
            let canonical = fs::canonicalize(dir).ctx("resolve", dir)?;
            let mut lazy = Vec::new();
            for d in &inst.block_device_mappings {
                if let InstanceVolume::Ebs(InstanceEbs {
                    overlay: Some(o), ..
                }) = &d.volume
                {
                    let overlay =
                        match Overlay::open(&dir.join(o), region.clone(), None, DEFAULT_CACHE) {
                            Ok(o) => o,
                            // Attached meanwhile: ask it.
                            Err(Error::AlreadyExists(_)) => {
                                if let Some(t) = control::request(dir, op.clone())? {
                                    return described(region, t);
                                }
                                return Err(Error::InvalidInstance(format!(
                                    "{} is in use by a blocksnap that does not answer: stop it and \
                                 try again",
                                    dir.join(o).display()
                                )));
                            }
                            Err(e) => return Err(e),
                        };
                    let source = canonical.join(&d.volume_file).display().to_string();
                    lazy.push((d.device_name.clone(), Arc::new(overlay), source));
                }
            }
            snapshot_attached(region, &lazy, &names, opts)?
        }
    };
    described(region, taken)
}

/// The snapshots a control request took, as this region has them.
fn described(region: &Region, taken: Vec<Taken>) -> Result<Vec<(DeviceName, LazySnapshot)>> {
    taken
        .into_iter()
        .map(|t| {
            let meta = region.read_snapshot_meta(&t.snapshot_id).map_err(|_| {
                Error::InvalidInstance(format!(
                    "the attached instance wrote {} into another store or region: give the same \
                     --store and --region as `instance attach`",
                    t.snapshot_id
                ))
            })?;
            Ok((
                t.volume.parse()?,
                LazySnapshot {
                    meta,
                    blocks_read: t.blocks_read,
                    blocks_taken: t.blocks_taken,
                },
            ))
        })
        .collect()
}

/// An instance is used in the region it was launched in, while running.
pub fn check_usable(region: &Region, inst: &Instance) -> Result<()> {
    if inst.region != region.name() {
        return Err(Error::InvalidInstance(format!(
            "instance {} was launched in region {}: pass --region {}",
            inst.instance_id, inst.region, inst.region
        )));
    }
    if inst.state != RUNNING {
        return Err(Error::InvalidInstance(format!(
            "instance {} is {}: its volumes are gone",
            inst.instance_id, inst.state
        )));
    }
    Ok(())
}

/// When `path` is a lazy volume of an instance (`DIR/xvda.img` of an
/// instance launched `--lazy`, attached or not): its instance directory
/// and device.
pub fn lazy_device_of(path: &Path) -> Result<Option<(PathBuf, DeviceName)>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let file = dir.join(INSTANCE_FILE);
    let Some(bytes) = read_bounded(&file, "instance description", MAX_JSON)? else {
        return Ok(None);
    };
    let inst = decode(&bytes, &file.as_path().into())?;
    Ok(inst
        .block_device_mappings
        .iter()
        .find(|d| {
            name == d.volume_file.as_str()
                && matches!(&d.volume, InstanceVolume::Ebs(e) if e.overlay.is_some())
        })
        .map(|d| (dir.to_path_buf(), d.device_name.clone())))
}
