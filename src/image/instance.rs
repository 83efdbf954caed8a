//! Instances (RunInstances, TerminateInstances): a directory holding the
//! volumes restored from an image, one file per device, and `instance.json`
//! recording where each came from.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::format::image::{GIB, MAX_JSON, MAX_VOLUME_GIB, MappingTarget, volume_gib_allowed};
use crate::format::instance::{
    INSTANCE_FORMAT, INSTANCE_VERSION, Instance, InstanceDevice, InstanceEbs, InstanceVolume,
    RUNNING, TERMINATED, decode, encode,
};
use crate::id::{AccountId, ImageId, InstanceId};
use crate::image::ops::read_launchable;
use crate::ops::restore::{self, RestoreOptions};
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::store::files::{Durability, read_bounded, write_atomic};
use crate::store::pool;

const INSTANCE_FILE: &str = "instance.json";

/// Reads `DIR/instance.json`.
pub fn read(dir: &Path) -> Result<Instance> {
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
}

/// Launches `ami` into `dir`: restores every EBS mapping in parallel into
/// `DIR/<device>.img` (sparse, verified, grown to its VolumeSize), creates
/// an empty sparse file for each ephemeral device, skips no-device
/// mappings, and writes `instance.json` last.
pub fn launch(
    region: &Region,
    ami: &ImageId,
    dir: &Path,
    opts: &LaunchOptions,
    progress: &dyn Progress,
) -> Result<Instance> {
    let view = read_launchable(region, ami, &opts.caller, "launch")?;
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
    for m in &view.image.block_device_mappings {
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
                total += region.read_snapshot_meta(&e.snapshot_id)?.volume_size;
                InstanceVolume::Ebs(InstanceEbs {
                    snapshot_id: e.snapshot_id.clone(),
                    volume_size: e.volume_size,
                    delete_on_termination: e.delete_on_termination,
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

    let pool = pool::thread_pool_for(region.chunks(), opts.threads, pool::Work::Fetch)?;
    progress.start("launch", total);
    let result: Result<()> = pool.install(|| {
        devices.par_iter().try_for_each(|d| {
            let path = dir.join(&d.volume_file);
            match &d.volume {
                InstanceVolume::Ebs(e) => {
                    let ropts = RestoreOptions {
                        size: Some(e.volume_size * GIB),
                        ..Default::default()
                    };
                    restore::restore_in(region, &e.snapshot_id, &path, &ropts, &pool, progress)
                        .map(|_| ())
                }
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
            let _ = fs::remove_file(dir.join(&d.volume_file));
        }
        let _ = fs::remove_dir(dir);
        return Err(e);
    }
    let inst = Instance {
        format: Some(INSTANCE_FORMAT.into()),
        version: Some(INSTANCE_VERSION),
        instance_id: InstanceId::random(),
        image_id: ami.clone(),
        region: region.name().to_string(),
        owner_id: opts.caller.clone(),
        launch_time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        state: RUNNING.into(),
        architecture: view.image.architecture.clone(),
        root_device_name: view.image.root_device_name.clone(),
        block_device_mappings: devices,
    };
    write(dir, &inst)?;
    Ok(inst)
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
    let mut report_deleted = Vec::new();
    let mut kept = Vec::new();
    for d in &inst.block_device_mappings {
        let path = dir.join(&d.volume_file);
        let delete = match &d.volume {
            InstanceVolume::Ebs(e) => e.delete_on_termination,
            InstanceVolume::VirtualName(_) => true,
        };
        if delete {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx("delete volume", &path),
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
