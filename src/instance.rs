//! Instances (RunInstances, TerminateInstances): a directory holding the
//! volumes restored from an image, one file per device, and `instance.json`
//! recording where each came from.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chunker;
use crate::error::{Error, IoContext, Result};
use crate::id::{AccountId, ImageId, InstanceId, SnapshotId};
use crate::image::{self, DeviceName, GIB, MappingTarget};
use crate::progress::Progress;
use crate::region::Region;
use crate::restore::{self, RestoreOptions};
use crate::store::{Durability, read_bounded, write_atomic};

pub const RUNNING: &str = "running";
pub const TERMINATED: &str = "terminated";
const INSTANCE_FILE: &str = "instance.json";
/// Format name and version `instance.json` declares (frozen: do not
/// modify). Files written before these fields existed carry neither and
/// are read as version 1.
pub const INSTANCE_FORMAT: &str = "blocksnap-instance";
pub const INSTANCE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceEbs {
    pub snapshot_id: SnapshotId,
    pub volume_size: u64,
    pub delete_on_termination: bool,
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

/// Reads `DIR/instance.json`.
pub fn read(dir: &Path) -> Result<Instance> {
    let path = dir.join(INSTANCE_FILE);
    let bytes = read_bounded(&path, "instance description", image::MAX_JSON)?.ok_or_else(|| {
        Error::NotFound(format!(
            "{} holds no instance ({} is missing): give the directory `instance launch` created",
            dir.display(),
            INSTANCE_FILE
        ))
    })?;
    decode(&bytes, &path)
}

/// Decodes an `instance.json`; `path` names it in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Instance> {
    let inst: Instance = serde_json::from_slice(bytes).map_err(|e| Error::CorruptFile {
        what: "instance description",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::error::check_format(
        "instance description",
        path,
        inst.format.as_deref().unwrap_or(INSTANCE_FORMAT),
        INSTANCE_FORMAT,
        inst.version.unwrap_or(INSTANCE_VERSION),
        INSTANCE_VERSION,
    )?;
    for d in &inst.block_device_mappings {
        // A file name only: never a path that leaves the directory.
        if d.volume_file.is_empty() || d.volume_file.contains('/') || d.volume_file.starts_with('.')
        {
            return Err(Error::CorruptFile {
                what: "instance description",
                path: path.to_path_buf(),
                reason: format!("volume file {:?} is not a plain file name", d.volume_file),
            });
        }
        if let InstanceVolume::Ebs(e) = &d.volume
            && !image::volume_gib_allowed(e.volume_size)
        {
            return Err(Error::CorruptFile {
                what: "instance description",
                path: path.to_path_buf(),
                reason: format!(
                    "{} has a volume size of {} GiB, outside 1-{} GiB",
                    d.device_name,
                    e.volume_size,
                    image::MAX_VOLUME_GIB
                ),
            });
        }
    }
    Ok(inst)
}

fn write(dir: &Path, inst: &Instance) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(inst).expect("instance serializes");
    json.push(b'\n');
    write_atomic(&dir.join(INSTANCE_FILE), &json, Durability::Now)
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
    let view = image::read_launchable(region, ami, &opts.caller, "launch")?;
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
                if !image::volume_gib_allowed(e.volume_size) {
                    // Only an edited manifest holds such a size: never wrap it.
                    return Err(Error::InvalidImage(format!(
                        "{ami} maps {} with a volume size of {} GiB, outside 1-{} GiB: the image \
                         cannot be launched",
                        m.device_name,
                        e.volume_size,
                        image::MAX_VOLUME_GIB
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

    let pool = chunker::thread_pool_for(region.chunks(), opts.threads, chunker::Work::Fetch)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_json_declares_its_format_and_older_files_still_read() {
        let legacy = include_bytes!("../testdata/v1-all-formats/instance/instance.json");
        let p = Path::new("instance.json");
        let inst = decode(legacy, p).unwrap();
        assert_eq!(inst.format, None);
        let mut current = inst.clone();
        current.format = Some(INSTANCE_FORMAT.into());
        current.version = Some(INSTANCE_VERSION);
        let json = serde_json::to_vec(&current).unwrap();
        assert!(
            String::from_utf8_lossy(&json)
                .starts_with(r#"{"Format":"blocksnap-instance","Version":1,"#)
        );
        assert_eq!(decode(&json, p).unwrap(), current);
        current.version = Some(2);
        let e = decode(&serde_json::to_vec(&current).unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("newer blocksnap"), "{e}");
        current.version = Some(0);
        let e = decode(&serde_json::to_vec(&current).unwrap(), p).unwrap_err();
        assert!(matches!(e, Error::CorruptFile { .. }), "{e}");
    }
}
