//! `image`: create, register, describe, share, copy, deprecate and
//! deregister images (EC2's JSON shapes with `--json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use blocksnap::format::image::{self, DeviceName};
use blocksnap::image::copy::{self, CopyOptions};
use blocksnap::image::create::{self as image_create, ImageCreateOptions, MapSpec};
use blocksnap::image::ops::{self as image_ops, ListFilter};
use blocksnap::region::images::{self, ImageView};
use blocksnap::region::permissions::Grants;
use blocksnap::{AccountId, Error, ImageId, Region};

use crate::cli::output::bin_entry_json;
use crate::cli::output::{Out, human, print_grants};
use crate::cli::parse::{
    EncryptionArgs, PermissionArgs, TagArgs, account_or_self, grantee_or_self, parse_image,
    parse_tag, permission_change, tag_change,
};
use crate::cli::recycle_bin::restored_from_bin;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Snapshot volumes (or a launched instance's volumes) and register an image [CreateImage]
    Create {
        #[arg(long)]
        name: String,
        /// DEVICE=VOLUME (a file or block device to snapshot), DEVICE=snap-…,
        /// DEVICE=none or DEVICE=ephemeralN (repeatable)
        #[arg(
            long = "map",
            value_name = "DEVICE=VALUE",
            required_unless_present = "instance",
            conflicts_with = "instance"
        )]
        maps: Vec<String>,
        /// Snapshot every volume of the instance in DIR, each incremental
        /// against the snapshot it was launched from
        #[arg(long, value_name = "DIR")]
        instance: Option<PathBuf>,
        #[command(flatten)]
        common: ImageArgs,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[command(flatten)]
        encryption: EncryptionArgs,
    },
    /// Register an image from existing snapshots [RegisterImage]
    Register {
        #[arg(long)]
        name: String,
        /// DEVICE=snap-…, DEVICE=none or DEVICE=ephemeralN (repeatable)
        #[arg(long = "map", value_name = "DEVICE=VALUE", required = true)]
        maps: Vec<String>,
        #[command(flatten)]
        common: ImageArgs,
    },
    /// List images you can launch [DescribeImages]
    List {
        /// Only images owned by `self` or an account
        #[arg(long, value_name = "self|ACCOUNT")]
        owner: Option<String>,
        /// Only images `self`, `all` (public) or an account may launch
        #[arg(long, value_name = "self|all|ACCOUNT")]
        executable_by: Option<String>,
        #[arg(long)]
        include_deregistered: bool,
        #[arg(long)]
        include_deprecated: bool,
    },
    /// Show one image [DescribeImages --image-ids]
    Describe { image: String },
    /// Add, change or remove an image's tags; owner only [CreateTags, DeleteTags]
    Tag {
        image: String,
        #[command(flatten)]
        change: TagArgs,
    },
    /// Show who may launch an image; owner only [DescribeImageAttribute launchPermission]
    DescribePermissions { image: String },
    /// Change who may launch an image; owner only [ModifyImageAttribute launchPermission]
    Permissions {
        image: String,
        #[command(flatten)]
        change: PermissionArgs,
    },
    /// Copy an image and its snapshots to another region [CopyImage]
    Copy {
        image: String,
        #[arg(long, value_name = "REGION")]
        to_region: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Copy the image's tags too
        #[arg(long)]
        copy_tags: bool,
        /// Create REGION as a local region if it does not exist
        #[arg(long)]
        create_region: bool,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Encrypt the copies (a key of the target region; an encrypted
        /// image is never copied unencrypted)
        #[command(flatten)]
        encryption: EncryptionArgs,
    },
    /// Deprecate an image at a time, or cancel it [EnableImageDeprecation]
    Deprecate {
        image: String,
        /// RFC 3339 time, e.g. 2027-01-01T00:00:00Z, or `now`
        #[arg(
            long,
            value_name = "TIME",
            required_unless_present = "cancel",
            conflicts_with = "cancel"
        )]
        at: Option<String>,
        #[arg(long)]
        cancel: bool,
    },
    /// Bring an image back from the recycle bin, available again [RestoreImageFromRecycleBin]
    RestoreFromRecycleBin { image: String },
    /// Deregister an image; owner only [DeregisterImage]
    Deregister {
        image: String,
        /// Also delete its snapshots that no other registered image uses
        #[arg(long)]
        delete_associated_snapshots: bool,
    },
}

/// Who to grant or revoke, for an image's or a snapshot's permissions.
#[derive(Args, Debug)]
pub struct ImageArgs {
    #[arg(long, default_value = "")]
    pub description: String,
    /// Root device [default: the first --map, or the instance's]
    #[arg(long, value_name = "DEVICE")]
    pub root_device: Option<String>,
    /// x86_64 or arm64 [default: this host's]
    #[arg(long)]
    pub architecture: Option<String>,
    /// Tag as KEY=VALUE (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// DEVICE=GiB: volume size of a mapping [default: the snapshot's size]
    #[arg(long = "volume-size", value_name = "DEVICE=GIB")]
    pub volume_sizes: Vec<String>,
    /// DEVICE whose volume survives `instance terminate` (repeatable)
    #[arg(long = "keep-on-termination", value_name = "DEVICE")]
    pub keep: Vec<String>,
}

/// `DEVICE=GiB` pairs.
fn volume_sizes(specs: &[String]) -> Result<HashMap<DeviceName, u64>> {
    let mut sizes = HashMap::new();
    for s in specs {
        let (dev, gib) = s.split_once('=').ok_or_else(|| {
            Error::InvalidImage(format!(
                "--volume-size {s:?} is not DEVICE=GIB, e.g. /dev/xvdf=20"
            ))
        })?;
        let gib: u64 = gib.parse().map_err(|_| {
            Error::InvalidImage(format!(
                "--volume-size {s:?}: {gib:?} is not a whole number of GiB"
            ))
        })?;
        sizes.insert(dev.parse()?, gib);
    }
    Ok(sizes)
}

pub fn create_options(
    args: &ImageArgs,
    name: String,
    owner: AccountId,
    threads: usize,
) -> Result<ImageCreateOptions> {
    Ok(ImageCreateOptions {
        encryption: Default::default(),
        name,
        description: args.description.clone(),
        architecture: args.architecture.clone(),
        root_device: args.root_device.as_deref().map(str::parse).transpose()?,
        tags: args
            .tags
            .iter()
            .map(|t| parse_tag(t))
            .collect::<Result<_>>()?,
        snapshot_tags: Vec::new(),
        volume_sizes: volume_sizes(&args.volume_sizes)?,
        keep_on_termination: args
            .keep
            .iter()
            .map(|d| d.parse())
            .collect::<Result<_, _>>()?,
        owner,
        threads,
    })
}

pub fn run(
    store_root: &Path,
    region: &Arc<Region>,
    out: &Out,
    caller: AccountId,
    cmd: ImageCmd,
) -> Result<u8> {
    match cmd {
        ImageCmd::Create {
            name,
            maps,
            instance,
            common,
            threads,
            encryption,
        } => {
            let mut opts = create_options(&common, name, caller, threads)?;
            opts.encryption = encryption.options();
            let bar = out.progress();
            let report = match instance {
                Some(dir) => image_create::create_from_instance(region, &dir, &opts, &bar)?,
                None => {
                    let specs: Vec<MapSpec> = maps
                        .iter()
                        .map(|m| MapSpec::parse(m))
                        .collect::<Result<_, _>>()?;
                    image_create::create_from_volumes(region, &specs, &opts, &bar)?
                }
            };
            bar.done();
            if out.json {
                let snaps: Vec<Value> = report
                    .snapshots
                    .iter()
                    .map(|c| {
                        json!({
                            "DeviceName": c.device.as_str(),
                            "SnapshotId": c.snapshot.id.as_str(),
                            "ParentSnapshotId": c.snapshot.parent.as_ref().map(|p| p.as_str()),
                            "NewChunks": c.snapshot.stats.new_chunks,
                            "NewBytesStored": c.snapshot.stats.new_bytes_stored,
                            "BlocksRead": c.read_taken.map(|r| r.0),
                            "BlocksTaken": c.read_taken.map(|r| r.1),
                        })
                    })
                    .collect();
                out.print(json!({ "ImageId": report.image.image_id.as_str(), "Snapshots": snaps }));
            } else {
                println!(
                    "{} registered as {:?}",
                    report.image.image_id, report.image.name
                );
                for c in &report.snapshots {
                    let s = &c.snapshot.stats;
                    println!(
                        "  {} -> {} ({}): {} new chunks, {} stored",
                        c.device,
                        c.snapshot.id,
                        match &c.snapshot.parent {
                            Some(p) => format!("incremental on {p}"),
                            None => "full".into(),
                        },
                        s.new_chunks,
                        human(s.new_bytes_stored)
                    );
                    if let Some((read, taken)) = c.read_taken {
                        println!(
                            "    lazy: read {read} blocks the dirty map names, took {taken} unread"
                        );
                    }
                }
            }
            Ok(0)
        }
        ImageCmd::Register { name, maps, common } => {
            let specs = maps
                .iter()
                .map(|m| MapSpec::parse(m))
                .collect::<blocksnap::Result<Vec<_>>>()?;
            let opts = create_options(&common, name, caller, 0)?;
            let img = image_create::register_maps(region, &specs, &opts)?;
            if out.json {
                out.print(json!({ "ImageId": img.image_id.as_str() }));
            } else {
                println!("{} registered as {:?}", img.image_id, img.name);
            }
            Ok(0)
        }
        ImageCmd::List {
            owner,
            executable_by,
            include_deregistered,
            include_deprecated,
        } => {
            let owner = owner
                .as_deref()
                .map(|s| account_or_self(s, &caller))
                .transpose()?;
            let exec = executable_by
                .as_deref()
                .map(|s| grantee_or_self(s, &caller))
                .transpose()?;
            let filter = ListFilter {
                owner,
                executable_by: exec,
                include_deregistered,
                include_deprecated,
            };
            let (shown, damaged) = image_ops::list(region, &caller, &filter)?;
            for e in &damaged {
                eprintln!("blocksnap: warning: {e}: run `blocksnap store verify`");
            }
            out.image_list(&shown, image_json);
            Ok(0)
        }
        ImageCmd::Describe { image: id } => {
            let v = images::read(region, &parse_image(&id)?)?;
            v.require_launch(&caller, "describe")?;
            if out.json {
                out.print(json!({ "Images": [image_json(&v)] }));
            } else {
                print_image(&v);
            }
            Ok(0)
        }
        ImageCmd::Tag { image: id, change } => {
            let id = parse_image(&id)?;
            let tags = image_ops::change_tags(region, &id, &caller, &tag_change(&change)?)?;
            out.tags(id.as_str(), &tags);
            Ok(0)
        }
        ImageCmd::DescribePermissions { image: id } => {
            let id = parse_image(&id)?;
            let v = images::read(region, &id)?;
            v.require_owner(&caller, "see launch permissions of")?;
            print_permissions(out, &id, &v.permissions);
            Ok(0)
        }
        ImageCmd::Permissions { image: id, change } => {
            let id = parse_image(&id)?;
            let change = permission_change(&change)?;
            let perms = image_ops::modify_permissions(region, &id, &caller, &change)?;
            print_permissions(out, &id, &perms);
            Ok(0)
        }
        ImageCmd::Copy {
            image: id,
            to_region,
            name,
            description,
            copy_tags,
            threads,
            create_region,
            encryption,
        } => {
            let id = parse_image(&id)?;
            let dst = if create_region {
                match Region::open(store_root, &to_region) {
                    Err(Error::NotFound(_)) => {
                        blocksnap::region::catalog::add_local(store_root, &to_region)?
                    }
                    other => other?,
                }
            } else {
                Region::open(store_root, &to_region)?
            };
            let opts = CopyOptions {
                caller,
                name,
                description,
                copy_tags,
                threads,
                encryption: encryption.options(),
            };
            let bar = out.progress();
            let r = copy::copy_image(region, &id, &dst, &opts, &bar)?;
            bar.done();
            if out.json {
                out.print(json!({
                    "ImageId": r.image.image_id.as_str(),
                    "SourceImageId": id.as_str(),
                    "SourceRegion": region.name(),
                    "Region": dst.name(),
                    "Snapshots": r.snapshots.iter().map(|s| json!({"SourceSnapshotId": s.source.as_str(), "SnapshotId": s.copy.as_str()})).collect::<Vec<_>>(),
                    "ChunksCopied": r.chunks_copied,
                    "BytesCopied": r.bytes_copied,
                    "ChunksAlreadyPresent": r.chunks_present,
                    "BytesAlreadyPresent": r.bytes_present,
                }));
            } else {
                println!(
                    "{id} ({}) copied to {} as {}",
                    region.name(),
                    dst.name(),
                    r.image.image_id
                );
                for s in &r.snapshots {
                    println!("  {} -> {}", s.source, s.copy);
                }
                println!(
                    "  chunks copied: {} ({}); already there: {} ({})",
                    r.chunks_copied,
                    human(r.bytes_copied),
                    r.chunks_present,
                    human(r.bytes_present)
                );
            }
            Ok(0)
        }
        ImageCmd::Deprecate {
            image: id,
            at,
            cancel,
        } => {
            let id = parse_image(&id)?;
            let when = match (at.as_deref(), cancel) {
                (_, true) => None,
                (Some("now"), _) => Some(SystemTime::now()),
                (Some(t), _) => Some(humantime::parse_rfc3339_weak(t).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "--at {t:?} is not an RFC 3339 time ({e}): e.g. 2027-01-01T00:00:00Z"
                    ))
                })?),
                (None, false) => None,
            };
            let state = image_ops::set_deprecation(region, &id, &caller, when)?;
            if out.json {
                out.print(
                    json!({ "ImageId": id.as_str(), "DeprecationTime": state.deprecation_time }),
                );
            } else {
                match &state.deprecation_time {
                    Some(t) => println!("{id} is deprecated from {t}"),
                    None => println!("{id} is no longer deprecated"),
                }
            }
            Ok(0)
        }
        ImageCmd::RestoreFromRecycleBin { image } => {
            let id = parse_image(&image)?;
            let e = image_ops::restore_from_bin(region, &id, &caller)?;
            restored_from_bin(out, &e);
            Ok(0)
        }
        ImageCmd::Deregister {
            image: id,
            delete_associated_snapshots,
        } => {
            let id = parse_image(&id)?;
            let r = image_ops::deregister(region, &id, &caller, delete_associated_snapshots)?;
            if out.json {
                out.print(json!({
                    "ImageId": id.as_str(),
                    "State": "deregistered",
                    "RecycleBin": r.binned.as_ref().map(bin_entry_json),
                    "DeletedSnapshots": r.deleted_snapshots.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                    "RecycledSnapshots": r.binned_snapshots.iter().map(bin_entry_json).collect::<Vec<_>>(),
                    "KeptSnapshots": r.kept_snapshots.iter().map(|k| json!({"SnapshotId": k.snapshot.as_str(), "UsedBy": k.used_by.name()})).collect::<Vec<_>>(),
                }));
            } else {
                match &r.binned {
                    Some(e) => println!(
                        "{id} deregistered and kept in the recycle bin until {} (rule {}); \
                         `blocksnap image restore-from-recycle-bin {id}` brings it back",
                        e.recycle_bin_exit_time, e.rule
                    ),
                    None => println!("{id} deregistered"),
                }
                for s in &r.deleted_snapshots {
                    println!("  deleted {s}");
                }
                for e in &r.binned_snapshots {
                    println!(
                        "  moved {} to the recycle bin until {}",
                        e.id, e.recycle_bin_exit_time
                    );
                }
                for k in &r.kept_snapshots {
                    println!("  kept {}: {} still uses it", k.snapshot, k.used_by);
                }
                if !r.deleted_snapshots.is_empty() {
                    println!("  run `blocksnap store gc` to reclaim chunks no snapshot needs");
                }
            }
            Ok(0)
        }
    }
}

fn image_json(v: &ImageView) -> Value {
    let mut doc = serde_json::to_value(&v.image).expect("image serializes");
    let now = SystemTime::now();
    doc["State"] = json!(v.state.state.as_str());
    doc["Public"] = json!(v.permissions.is_public());
    if let Some(t) = &v.state.deprecation_time {
        doc["DeprecationTime"] = json!(t);
    }
    doc["Deprecated"] = json!(v.is_deprecated(now));
    doc
}

fn print_image(v: &ImageView) {
    let i = &v.image;
    println!("ImageId          {}", i.image_id);
    println!("Name             {}", i.name);
    println!("Description      {}", i.description);
    println!("OwnerId          {}", i.owner_id);
    println!("State            {}", v.state.state.as_str());
    println!(
        "Public           {}",
        if v.permissions.is_public() {
            "yes"
        } else {
            "no"
        }
    );
    println!("Architecture     {}", i.architecture);
    println!("CreationDate     {}", i.creation_date);
    println!(
        "DeprecationTime  {}",
        v.state.deprecation_time.as_deref().unwrap_or("-")
    );
    if let (Some(src), Some(region)) = (&i.source_image_id, &i.source_region) {
        println!("CopiedFrom       {src} in {region}");
    }
    let tags: Vec<String> = i
        .tags
        .iter()
        .map(|t| format!("{}={}", t.key, t.value))
        .collect();
    println!("Tags             {}", tags.join(", "));
    println!("RootDeviceName   {}", i.root_device_name);
    for m in &i.block_device_mappings {
        let what = match &m.target {
            image::MappingTarget::Ebs(e) => format!(
                "{} {} GiB{}",
                e.snapshot_id,
                e.volume_size,
                if e.delete_on_termination {
                    ""
                } else {
                    " (kept on termination)"
                }
            ),
            image::MappingTarget::NoDevice(_) => "no device".into(),
            image::MappingTarget::VirtualName(v) => v.clone(),
        };
        println!("  {:<12} {what}", m.device_name.as_str());
    }
}

fn print_permissions(out: &Out, id: &ImageId, perms: &image::LaunchPermissions) {
    print_grants(
        out,
        id.as_str(),
        "ImageId",
        perms,
        &perms.launch_permissions,
    );
}
