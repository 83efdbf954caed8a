//! Command-line definitions and the glue from each command to the library.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use blocksnap::gc;
use blocksnap::manifest::{self, Tag};
use blocksnap::restore::{self, RestoreOptions};
use blocksnap::snapshot::{self, CreateOptions, ParentChoice};
use blocksnap::{AccountId, Error, ErrorKind, Region, SnapshotId};

use crate::output::{self, Out};

/// The region used without `--region`: the only one created on first use.
const DEFAULT_REGION: &str = "local";

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (I/O error, unreadable volume, anything not below)
  2  usage error: bad argument, malformed id, wrong block size, not a file or
     device, volume over 64 TiB
  3  not found: volume, snapshot, image, instance or region does not exist
  4  integrity: a chunk or manifest is corrupt, truncated or missing
  5  conflict: already exists (region, image name), target exists, differs in
     size or is too small, device in use,
     store locked, image deregistered, snapshot in use by an image
  6  permission: the account may not use or change that image or snapshot";

#[derive(Parser, Debug)]
#[command(
    name = "blocksnap",
    version,
    about = "Block-level incremental snapshots of disk images and block devices",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct Global {
    /// Store directory [default: $XDG_DATA_HOME/blocksnap or ~/.local/share/blocksnap]
    #[arg(long, global = true, env = "BLOCKSNAP_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Region: a sub-directory of the store, or one defined with `region add`
    #[arg(
        long,
        global = true,
        env = "BLOCKSNAP_REGION",
        default_value = DEFAULT_REGION,
        value_name = "NAME"
    )]
    pub region: String,
    /// Account acting (12 digits) [default: the region's owner]
    #[arg(long, global = true, env = "BLOCKSNAP_ACCOUNT", value_name = "ID")]
    pub account: Option<String>,
    /// Print one JSON document in AWS CLI shapes
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create, list, inspect and delete snapshots [CreateSnapshot, DescribeSnapshots, ...]
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Restore snapshots to files and block devices [CreateVolume]
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Images (AMIs): create, register, list, share, copy, deregister [CreateImage, ...]
    #[command(subcommand)]
    Image(ImageCmd),
    /// Launch and terminate instances from images [RunInstances, TerminateInstances]
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Maintain the store: verify, gc, stats
    #[command(subcommand)]
    Store(StoreCmd),
    /// Define regions on S3-compatible object stores [DescribeRegions]
    #[command(subcommand)]
    Region(RegionCmd),
}

#[derive(Subcommand, Debug)]
pub enum RegionCmd {
    /// Create region NAME: a directory of the store, or at s3://BUCKET[/PREFIX]
    ///
    /// Without a URL the region is a new directory `<store>/NAME`. Only this
    /// command (and the default region `local`, on first use) creates a
    /// region: `--region` with an unknown name is an error.
    ///
    /// Credentials come only from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    /// (and AWS_SESSION_TOKEN, AWS_REGION) and are never stored. Tuning:
    /// BLOCKSNAP_S3_INFLIGHT (requests in flight, default 32),
    /// BLOCKSNAP_S3_TIMEOUT (seconds per request, 60), BLOCKSNAP_S3_RETRIES
    /// (6), BLOCKSNAP_S3_TRACE=1 (print the requests sent).
    Add {
        /// Region name, e.g. eu-central-1 or team-lab
        name: String,
        /// s3://BUCKET or s3://BUCKET/PREFIX [default: a local directory]
        url: Option<String>,
        /// S3 endpoint, e.g. http://127.0.0.1:8333 [default: $AWS_ENDPOINT, or AWS]
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// Allow a plain-HTTP endpoint
        #[arg(long)]
        allow_http: bool,
    },
    /// List regions: local directories and object-store definitions
    List,
    /// Forget an object-store region's definition (deletes nothing stored there)
    Remove { name: String },
}

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
pub struct PermissionArgs {
    /// ACCOUNT or `all` (public) (repeatable)
    #[arg(long, value_name = "ACCOUNT|all")]
    pub add: Vec<String>,
    /// ACCOUNT or `all` (repeatable)
    #[arg(long, value_name = "ACCOUNT|all")]
    pub remove: Vec<String>,
    /// Back to owner only
    #[arg(long)]
    pub reset: bool,
}

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

#[derive(Subcommand, Debug)]
pub enum InstanceCmd {
    /// Restore every volume of an image into DIR [RunInstances]
    Launch {
        image: String,
        dir: PathBuf,
        /// Size of each ephemeral (instance-store) volume
        #[arg(long, default_value = "1G", value_name = "BYTES")]
        ephemeral_size: String,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Delete the volumes marked DeleteOnTermination and the ephemeral ones [TerminateInstances]
    Terminate { dir: PathBuf },
    /// Show an instance's instance.json [DescribeInstances]
    Describe { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a raw image file or block device [CreateSnapshot]
    ///
    /// The first snapshot of a volume stores every non-zero block; later
    /// ones are incremental against the newest snapshot of the same path
    /// (or --parent) and store only blocks the store lacks.
    Create {
        /// Image file or block device (e.g. disk.img, /dev/loop3)
        volume: PathBuf,
        /// Snapshot to be incremental against [default: newest of this volume]
        #[arg(long, value_name = "SNAP", conflicts_with = "no_parent")]
        parent: Option<String>,
        /// Take a full snapshot, with no parent
        #[arg(long)]
        no_parent: bool,
        /// Block size, a power of two from 64K to 8M [default: the parent's, or 512K]
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Tag as KEY=VALUE (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Store changed blocks whole, never as deltas against the parent's
        #[arg(long)]
        no_delta: bool,
    },
    /// List the snapshots you may restore (yours, shared with you, public), oldest first [DescribeSnapshots]
    List {
        /// Only snapshots of this volume path
        #[arg(long, value_name = "PATH")]
        volume: Option<PathBuf>,
        /// Only snapshots owned by `self` or an account
        #[arg(long, value_name = "self|ACCOUNT")]
        owner: Option<String>,
        /// Only snapshots `self`, `all` (public) or an account may restore
        #[arg(long, value_name = "self|all|ACCOUNT")]
        restorable_by: Option<String>,
    },
    /// Show who may restore a snapshot; owner only [DescribeSnapshotAttribute createVolumePermission]
    DescribePermissions { snapshot: String },
    /// Change who may restore a snapshot; owner only [ModifySnapshotAttribute createVolumePermission]
    Permissions {
        snapshot: String,
        #[command(flatten)]
        change: PermissionArgs,
    },
    /// Show one snapshot [DescribeSnapshots --snapshot-ids]
    Describe { snapshot: String },
    /// List every block with its state and digest [ListSnapshotBlocks]
    Blocks { snapshot: String },
    /// Blocks whose content differs between two snapshots, from the manifests alone [ListChangedBlocks]
    ChangedBlocks { first: String, second: String },
    /// Delete a snapshot; its chunks are reclaimed by `store gc` [DeleteSnapshot]
    Delete { snapshot: String },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Compare a volume (file or device) with a snapshot without restoring;
    /// exits 4 and lists the differing block ranges if they differ
    Verify {
        snapshot: String,
        target: PathBuf,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Restore a snapshot into a new file, over a file, or onto a block device [CreateVolume]
    ///
    /// A new file target is written under a temporary name and renamed
    /// into place when complete; it is sparse where the snapshot has zero
    /// or hole blocks. --delta and block-device targets are written in
    /// place: an interrupted restore leaves them partly written, and a
    /// rerun with --delta finishes the job.
    Restore {
        snapshot: String,
        /// File or block device to restore into
        target: PathBuf,
        /// Replace an existing file or overwrite a block device; with
        /// --delta, accept a target whose size differs from the snapshot's
        #[arg(long)]
        force: bool,
        /// Update an existing file or device in place, writing only blocks that differ
        #[arg(long)]
        delta: bool,
        /// Size of the restored volume (e.g. 20G); at least the snapshot's size
        #[arg(long, value_name = "BYTES")]
        size: Option<String>,
        /// The block device already reads as zeros: skip writing zero blocks
        #[arg(long)]
        assume_zeroed: bool,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Check every manifest and chunk (decompress and re-hash)
    ///
    /// Exits 4 if a manifest is damaged or a needed chunk is missing or
    /// corrupt. With --repair, corrupt chunks are moved aside (<chunk>.bad);
    /// a new snapshot of the same data then stores them again (heals).
    Verify {
        /// Check only this snapshot and the chunks it names
        #[arg(long, value_name = "SNAP")]
        snapshot: Option<String>,
        /// Move corrupt chunks aside so a later snapshot rewrites them
        #[arg(long)]
        repair: bool,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Delete chunks no snapshot needs, and leftovers of interrupted writes
    Gc {
        /// Also delete the corrupt chunks `store verify --repair` moved aside (.bad)
        #[arg(long)]
        purge_quarantine: bool,
    },
    /// Count snapshots, chunks and bytes stored
    Stats,
}

fn region_cmd(root: &Path, out: &Out, cmd: RegionCmd) -> Result<u8> {
    match cmd {
        RegionCmd::Add {
            name,
            url,
            endpoint,
            allow_http,
        } => {
            let Some(url) = url else {
                if endpoint.is_some() || allow_http {
                    return Err(Error::InvalidArgument(
                        "--endpoint and --allow-http need an s3:// URL".into(),
                    )
                    .into());
                }
                let region = blocksnap::regions::add_local(root, &name)?;
                out.local_region_added(&name, &region);
                return Ok(0);
            };
            let def = blocksnap::regions::RegionDef {
                url,
                endpoint,
                allow_http,
            };
            blocksnap::regions::add(root, &name, def.clone())?;
            // Reach the store now, so a wrong URL, endpoint or credential
            // shows here rather than on the first snapshot.
            let opened =
                Region::open_or_create(root, &name).and_then(|r| r.snapshot_ids().map(|_| r));
            let region = match opened {
                Ok(r) => r,
                Err(e) => {
                    blocksnap::regions::remove(root, &name)?;
                    return Err(
                        anyhow::Error::new(e).context(format!("region {name} was not added"))
                    );
                }
            };
            out.region_added(&name, &def, &region);
            Ok(0)
        }
        RegionCmd::List => {
            let defined = blocksnap::regions::defined(root)?;
            let local = blocksnap::regions::local(root)?;
            out.region_list(root, &local, &defined);
            Ok(0)
        }
        RegionCmd::Remove { name } => {
            let def = blocksnap::regions::remove(root, &name)?;
            out.region_removed(&name, &def);
            Ok(0)
        }
    }
}

/// The store root: `--store`, `$BLOCKSNAP_STORE`, or a per-user directory.
fn store_root(global: &Global) -> Result<PathBuf> {
    if let Some(p) = &global.store {
        return Ok(p.clone());
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("blocksnap"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/blocksnap")),
        None => Err(Error::InvalidArgument(
            "no store given and $HOME is not set: pass --store DIR".into(),
        )
        .into()),
    }
}

pub fn parse_snapshot(s: &str) -> Result<SnapshotId> {
    Ok(s.parse::<SnapshotId>()?)
}

/// Parses `123`, `64K`, `512KiB`, `20G`, `1T` (powers of 1024).
pub fn parse_size(s: &str, what: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => u32::MAX,
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| shift != u32::MAX)
        .and_then(|n| n.checked_mul(1u64 << shift.min(40)))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what} {s:?} is not a size: use bytes or a K, M, G or T suffix, e.g. 512K"
            ))
            .into()
        })
}

pub fn parse_tag(s: &str) -> Result<Tag> {
    match s.split_once('=') {
        Some((k, v)) => Ok(Tag {
            key: k.to_string(),
            value: v.to_string(),
        }),
        None => Err(Error::InvalidArgument(format!("tag {s:?} is not KEY=VALUE")).into()),
    }
}

/// Runs a parsed command line; the returned number is the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let g = &cli.global;
    let account = g
        .account
        .as_deref()
        .map(str::parse::<AccountId>)
        .transpose()?;
    // Tuning variables are parsed once, here: a bad value is a usage error.
    let settings = blocksnap::settings::Settings::from_vars(|n| std::env::var(n).ok())?;
    blocksnap::settings::install(settings);
    let root = store_root(g)?;
    let out = Out::new(g.json, g.quiet);
    let command = match cli.command {
        // Region definitions work without opening a region.
        Command::Region(cmd) => return region_cmd(&root, &out, cmd),
        other => other,
    };
    // Only the default region is created on first use; any other must
    // exist (`region add`), so a typo is an error, not a new empty region.
    let opened = if g.region == DEFAULT_REGION {
        Region::open_or_create(&root, &g.region)
    } else {
        Region::open(&root, &g.region)
    };
    let region = opened.with_context(|| {
        format!(
            "cannot open region {} of store {}",
            g.region,
            root.display()
        )
    })?;
    // Leaving out --account acts as the region's default owner.
    let caller = account
        .clone()
        .unwrap_or_else(|| region.info().owner.clone());
    match command {
        Command::Snapshot(cmd) => snapshot_cmd(&region, &out, account, &caller, cmd),
        Command::Image(cmd) => crate::image_cli::run(&root, &region, &out, caller, cmd),
        Command::Instance(cmd) => crate::image_cli::instance(&region, &out, caller, cmd),
        Command::Volume(VolumeCmd::Verify {
            snapshot,
            target,
            threads,
        }) => {
            let id = parse_snapshot(&snapshot)?;
            blocksnap::access::readable(&region, &id, &caller, "verify a volume against")?;
            let bar = out.progress();
            let check = restore::verify_volume(&region, &id, &target, threads, &bar)?;
            bar.done();
            out.volume_check(&check);
            Ok(if check.matches() { 0 } else { 4 })
        }
        Command::Volume(VolumeCmd::Restore {
            snapshot,
            target,
            force,
            delta,
            size,
            assume_zeroed,
            threads,
        }) => {
            let id = parse_snapshot(&snapshot)?;
            let opts = RestoreOptions {
                force,
                delta,
                size: size
                    .as_deref()
                    .map(|s| parse_size(s, "--size"))
                    .transpose()?,
                assume_zeroed,
                threads,
            };
            blocksnap::access::readable(&region, &id, &caller, "restore")?;
            let bar = out.progress();
            let report = restore::restore(&region, &id, &target, &opts, &bar)?;
            bar.done();
            out.restore(&report);
            Ok(0)
        }
        Command::Store(StoreCmd::Verify {
            snapshot,
            repair,
            threads,
        }) => {
            let only = snapshot.as_deref().map(parse_snapshot).transpose()?;
            let bar = out.progress();
            let report = gc::verify_and_repair(&region, only.as_ref(), threads, repair, &bar)?;
            bar.done();
            out.verify(&report);
            Ok(if report.is_clean() { 0 } else { 4 })
        }
        Command::Store(StoreCmd::Gc { purge_quarantine }) => {
            let report = gc::gc(&region, purge_quarantine)?;
            out.gc(&report);
            Ok(0)
        }
        Command::Region(cmd) => region_cmd(&root, &out, cmd),
        Command::Store(StoreCmd::Stats) => {
            out.stats(&output::Stats::collect(&region)?);
            Ok(0)
        }
    }
}

fn snapshot_cmd(
    region: &Region,
    out: &Out,
    account: Option<AccountId>,
    caller: &AccountId,
    cmd: SnapshotCmd,
) -> Result<u8> {
    use blocksnap::access;
    match cmd {
        SnapshotCmd::Create {
            volume,
            parent,
            no_parent,
            block_size,
            description,
            tags,
            threads,
            no_delta,
        } => {
            let parent = match (parent, no_parent) {
                (Some(p), _) => {
                    let id = parse_snapshot(&p)?;
                    access::readable(region, &id, caller, "take as a parent")?;
                    ParentChoice::Explicit(id)
                }
                (None, true) => ParentChoice::None,
                (None, false) => ParentChoice::Latest,
            };
            let block_size = block_size
                .as_deref()
                .map(|s| {
                    parse_size(s, "--block-size")
                        .and_then(|n| Ok(manifest::validate_block_size(n)?))
                })
                .transpose()?;
            let opts = CreateOptions {
                parent,
                block_size,
                description,
                tags: tags.iter().map(|t| parse_tag(t)).collect::<Result<_>>()?,
                owner: account,
                threads,
                delta: !no_delta,
            };
            let bar = out.progress();
            let meta = snapshot::create(region, &volume, &opts, &bar)?;
            bar.done();
            out.snapshot_created(&meta);
            Ok(0)
        }
        SnapshotCmd::List {
            volume,
            owner,
            restorable_by,
        } => {
            let filter = access::ListFilter {
                owner: owner
                    .as_deref()
                    .map(|s| crate::image_cli::account_or_self(s, caller))
                    .transpose()?,
                restorable_by: restorable_by
                    .as_deref()
                    .map(|s| crate::image_cli::grantee_or_self(s, caller))
                    .transpose()?,
            };
            let (views, damaged) = access::list(region, caller, &filter)?;
            for e in &damaged {
                eprintln!("blocksnap: warning: {e}: run `blocksnap store verify`");
            }
            let source = volume.map(|v| blocksnap::volume::source_path(&v));
            let snaps: Vec<_> = views
                .into_iter()
                .map(|v| v.meta)
                .filter(|m| source.as_ref().is_none_or(|s| &m.source == s))
                .collect();
            out.snapshot_list(&snaps);
            Ok(0)
        }
        SnapshotCmd::Describe { snapshot } => {
            let meta = access::readable(region, &parse_snapshot(&snapshot)?, caller, "describe")?;
            out.snapshot_describe(&meta);
            Ok(0)
        }
        SnapshotCmd::Blocks { snapshot } => {
            let m = region.read_snapshot(&parse_snapshot(&snapshot)?)?;
            access::check_readable(region, &m.meta, caller, "list the blocks of")?;
            out.blocks(&m);
            Ok(0)
        }
        SnapshotCmd::DescribePermissions { snapshot } => {
            let id = parse_snapshot(&snapshot)?;
            access::owned(region, &id, caller, "see the permissions of")?;
            let perms = access::read_permissions(region, &id)?;
            let grants = &perms.create_volume_permissions;
            crate::image_cli::print_grants(out, id.as_str(), "SnapshotId", &perms, grants);
            Ok(0)
        }
        SnapshotCmd::Permissions { snapshot, change } => {
            let id = parse_snapshot(&snapshot)?;
            let change = crate::image_cli::permission_change(&change)?;
            let perms = access::modify(region, &id, caller, &change)?;
            let grants = &perms.create_volume_permissions;
            crate::image_cli::print_grants(out, id.as_str(), "SnapshotId", &perms, grants);
            Ok(0)
        }
        SnapshotCmd::ChangedBlocks { first, second } => {
            let a = region.read_snapshot(&parse_snapshot(&first)?)?;
            let b = region.read_snapshot(&parse_snapshot(&second)?)?;
            for m in [&a, &b] {
                access::check_readable(region, &m.meta, caller, "compare")?;
            }
            let changed = snapshot::changed_blocks(&a, &b)?;
            out.changed_blocks(&a, &b, &changed);
            Ok(0)
        }
        SnapshotCmd::Delete { snapshot } => {
            let id = parse_snapshot(&snapshot)?;
            access::delete(region, &id, caller)?;
            out.deleted(&id);
            Ok(0)
        }
    }
}

/// Exit code and one-line message for a failure.
pub fn describe_error(err: &anyhow::Error) -> (u8, String) {
    let code = match err
        .chain()
        .find_map(|e| e.downcast_ref::<Error>())
        .map(Error::kind)
    {
        Some(ErrorKind::Usage) => 2,
        Some(ErrorKind::NotFound) => 3,
        Some(ErrorKind::Integrity) => 4,
        Some(ErrorKind::Conflict) => 5,
        Some(ErrorKind::Permission) => 6,
        Some(ErrorKind::Other) | None => 1,
    };
    // Library errors already carry their cause in the message; context
    // added here comes first.
    let mut parts: Vec<String> = Vec::new();
    for e in err.chain() {
        let s = e.to_string();
        if parts.last().is_some_and(|prev| prev.contains(&s)) {
            continue;
        }
        let lib = e.downcast_ref::<Error>().is_some();
        parts.push(s);
        if lib {
            break;
        }
    }
    (code, parts.join(": "))
}
