//! `snapshot`: create, list, describe, compare, share and delete
//! snapshots.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use std::sync::Arc;

use blocksnap::format::manifest;
use blocksnap::image::instance;
use blocksnap::lazy::control;
use blocksnap::lazy::overlay::is_overlay;
use blocksnap::lazy::snapshot::LazySnapshotOptions;
use blocksnap::ops::prune::{self, Keep, KeepPolicy};
use blocksnap::ops::snapshot::{self, CreateOptions, ParentChoice};
use blocksnap::{AccountId, Region};

use crate::cli::output::{Out, print_grants};
use crate::cli::parse::{
    EncryptionArgs, PermissionArgs, TagArgs, account_or_self, grantee_or_self, parent_choice,
    parse_size, parse_snapshot, parse_tags, permission_change, tag_change,
};
use crate::cli::recycle_bin::restored_from_bin;

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a raw image file, a block device or an NBD export [CreateSnapshot]
    ///
    /// The first snapshot of a volume stores every non-zero block; later
    /// ones are incremental against the newest snapshot of the same path
    /// (or --parent) and store only blocks the store lacks.
    ///
    /// A lazy volume (an overlay FILE of `volume serve/mount --writable`,
    /// or DIR/xvda.img of an instance launched --lazy) is snapshotted from
    /// its dirty map: only the blocks written since the snapshot underneath
    /// are read, at one instant even while it is being written.
    Create {
        /// Image file, block device or NBD URI (e.g. disk.img, /dev/loop3,
        /// nbd+unix:///disk?socket=/run/vm.sock, nbd://host:10809/disk)
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
        #[command(flatten)]
        encryption: EncryptionArgs,
        /// Read only the blocks qemu's dirty bitmap NAME marks (an NBD volume
        /// exported with it); every other block is taken from --parent
        #[arg(long, value_name = "NAME", requires = "parent")]
        dirty_bitmap: Option<String>,
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
    /// Add, change or remove a snapshot's tags; owner only [CreateTags, DeleteTags]
    Tag {
        snapshot: String,
        #[command(flatten)]
        change: TagArgs,
    },
    /// List every block with its state and digest [ListSnapshotBlocks]
    Blocks { snapshot: String },
    /// Blocks whose content differs between two snapshots, from the manifests alone [ListChangedBlocks]
    ChangedBlocks { first: String, second: String },
    /// Delete a snapshot; its chunks are reclaimed by `store gc` [DeleteSnapshot]
    ///
    /// Where a recycle bin retention rule of yours matches, the snapshot
    /// goes to the recycle bin instead and can be restored until the
    /// rule's retention ends.
    Delete { snapshot: String },
    /// Bring a snapshot back from the recycle bin [RestoreSnapshotFromRecycleBin]
    RestoreFromRecycleBin { snapshot: String },
    /// Delete a volume's snapshots a keep policy does not keep (restic's forget buckets)
    ///
    /// Snapshots are taken newest first; each --keep-* option keeps the
    /// newest snapshot of each of its newest N buckets (hours, days, ISO
    /// weeks, months, years; UTC), --keep-last the newest N; a snapshot is
    /// kept if any option keeps it. N may be `unlimited`. Snapshots that back
    /// a registered image are never deleted.
    Prune {
        /// The volume whose snapshots (yours) are pruned
        #[arg(long, value_name = "PATH")]
        volume: PathBuf,
        #[arg(long, value_name = "N")]
        keep_last: Option<String>,
        #[arg(long, value_name = "N")]
        keep_hourly: Option<String>,
        #[arg(long, value_name = "N")]
        keep_daily: Option<String>,
        #[arg(long, value_name = "N")]
        keep_weekly: Option<String>,
        #[arg(long, value_name = "N")]
        keep_monthly: Option<String>,
        #[arg(long, value_name = "N")]
        keep_yearly: Option<String>,
        /// Show what would be kept and removed; delete nothing
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_keep(s: Option<String>, what: &str) -> Result<Option<Keep>> {
    let Some(s) = s else {
        return Ok(None);
    };
    if s == "unlimited" || s == "-1" {
        return Ok(Some(Keep::Unlimited));
    }
    match s.parse::<u32>() {
        Ok(n) => Ok(Some(Keep::Count(n))),
        Err(_) => Err(blocksnap::Error::InvalidArgument(format!(
            "{what} {s:?}: give a number or `unlimited`"
        ))
        .into()),
    }
}

pub fn run(
    region: &Arc<Region>,
    out: &Out,
    account: Option<AccountId>,
    caller: &AccountId,
    cmd: SnapshotCmd,
) -> Result<u8> {
    use blocksnap::ops::access;
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
            dirty_bitmap,
            encryption,
        } => {
            let parent = parent_choice(parent.as_deref(), no_parent)?;
            let block_size = block_size
                .as_deref()
                .map(|s| {
                    parse_size(s, "--block-size")
                        .and_then(|n| Ok(manifest::validate_block_size(n)?))
                })
                .transpose()?;
            let tags = parse_tags(&tags)?;
            let lazy_device = instance::lazy_device_of(&volume)?;
            if lazy_device.is_some() || is_overlay(&volume) {
                if encryption.encrypted || encryption.kms_key_id.is_some() {
                    return Err(blocksnap::Error::InvalidArgument(format!(
                        "{} is a lazy volume: its snapshot is encrypted exactly as the snapshot \
                         underneath it is (EBS: an incremental stays under its parent's key); \
                         leave out --encrypted and --kms-key-id",
                        volume.display()
                    ))
                    .into());
                }
                if parent != ParentChoice::Latest || block_size.is_some() {
                    return Err(blocksnap::Error::InvalidArgument(format!(
                        "{} is a lazy volume: its parent is the snapshot underneath it, and its \
                         block size that snapshot's; leave out --parent, --no-parent and \
                         --block-size",
                        volume.display()
                    ))
                    .into());
                }
                let lopts = LazySnapshotOptions {
                    description,
                    tags,
                    owner: account,
                    threads,
                    no_delta,
                };
                let taken = match lazy_device {
                    Some((dir, device)) => {
                        instance::snapshot_lazy(region, &dir, &[device], &lopts)?
                            .remove(0)
                            .1
                    }
                    None => control::snapshot_overlay_path(region, &volume, &lopts)?,
                };
                out.incremental_created(&taken);
                return Ok(0);
            }
            let opts = CreateOptions {
                parent,
                block_size,
                description,
                tags,
                owner: account,
                threads,
                delta: !no_delta,
                encryption: encryption.options(),
            };
            if let Some(bitmap) = dirty_bitmap {
                let bar = out.progress();
                let taken = snapshot::create_from_bitmap(region, &volume, &bitmap, &opts, &bar)?;
                bar.done();
                out.incremental_created(&taken);
                return Ok(0);
            }
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
                    .map(|s| account_or_self(s, caller))
                    .transpose()?,
                restorable_by: restorable_by
                    .as_deref()
                    .map(|s| grantee_or_self(s, caller))
                    .transpose()?,
            };
            let (views, damaged) = access::list(region, caller, &filter)?;
            for e in &damaged {
                eprintln!("blocksnap: warning: {e}: run `blocksnap store verify`");
            }
            let source = volume.map(|v| blocksnap::volume::io::source_path(&v));
            let sealed = views.iter().filter(|v| v.meta.sealed).count();
            let snaps: Vec<_> = views
                .into_iter()
                .map(|v| v.meta)
                .filter(|m| source.as_ref().is_none_or(|s| &m.source == s))
                .collect();
            out.snapshot_list(&snaps);
            if sealed > 0 {
                let what = match &source {
                    Some(s) => format!("{sealed} encrypted snapshots may be of {s} too"),
                    None => format!("{sealed} encrypted snapshots show no description or source"),
                };
                explain_sealed(&what);
            }
            Ok(0)
        }
        SnapshotCmd::Describe { snapshot } => {
            let meta = access::readable(region, &parse_snapshot(&snapshot)?, caller, "describe")?;
            out.snapshot_describe(&meta);
            if meta.sealed {
                explain_sealed(&format!("{} shows no description or source", meta.id));
            }
            Ok(0)
        }
        SnapshotCmd::Tag { snapshot, change } => {
            let id = parse_snapshot(&snapshot)?;
            let tags = access::change_tags(region, &id, caller, &tag_change(&change)?)?;
            out.tags(id.as_str(), &tags);
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
            let perms = access::permissions_of(region, &id, caller)?;
            let grants = &perms.create_volume_permissions;
            print_grants(out, id.as_str(), "SnapshotId", &perms, grants);
            Ok(0)
        }
        SnapshotCmd::Permissions { snapshot, change } => {
            let id = parse_snapshot(&snapshot)?;
            let change = permission_change(&change)?;
            let perms = access::modify(region, &id, caller, &change)?;
            let grants = &perms.create_volume_permissions;
            print_grants(out, id.as_str(), "SnapshotId", &perms, grants);
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
            let done = access::delete(region, &id, caller)?;
            out.deleted(&id, &done);
            Ok(0)
        }
        SnapshotCmd::RestoreFromRecycleBin { snapshot } => {
            let id = parse_snapshot(&snapshot)?;
            let e = blocksnap::ops::recycle::restore_snapshot(region, &id, caller)?;
            restored_from_bin(out, &e);
            Ok(0)
        }
        SnapshotCmd::Prune {
            volume,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            dry_run,
        } => {
            let policy = KeepPolicy {
                last: parse_keep(keep_last, "--keep-last")?,
                hourly: parse_keep(keep_hourly, "--keep-hourly")?,
                daily: parse_keep(keep_daily, "--keep-daily")?,
                weekly: parse_keep(keep_weekly, "--keep-weekly")?,
                monthly: parse_keep(keep_monthly, "--keep-monthly")?,
                yearly: parse_keep(keep_yearly, "--keep-yearly")?,
            };
            let source = blocksnap::volume::io::source_path(&volume);
            let now = std::time::SystemTime::now();
            let r = prune::prune(region, caller, &source, &policy, dry_run, now)?;
            out.pruned(&source, &r, dry_run);
            match r.failed.first() {
                Some((_, e)) => Ok(crate::cli::exit::code_of(e)),
                None => Ok(0),
            }
        }
    }
}

/// Says on stderr why encrypted snapshots were shown without their sealed
/// meta: why each key this process could not use was refused, naming the
/// key where the reason does not.
fn explain_sealed(what: &str) {
    for (key, why) in blocksnap::region::keys::refusals() {
        let key = key.to_string();
        match why.contains(&key) {
            true => eprintln!("blocksnap: note: {what}: {why}"),
            false => eprintln!("blocksnap: note: {what}: key {key}: {why}"),
        }
    }
}
