//! Lifecycle policies (EBS Data Lifecycle Manager): snapshot volumes, or
//! make images of volumes and instances, on a schedule; copy what was made
//! to another region; keep a count or an age of it.
//!
//! `policy run` does what is due and nothing else, so cron may call it
//! every minute: each policy's newest slot ([`Schedule`]) at or after its
//! creation is done once. Runs hold the region's policy lock, so a second
//! run at the same time waits and then finds the work done. What a policy
//! makes carries three tags: [`POLICY_TAG`] (its id, as DLM's
//! `aws:dlm:lifecycle-policy-id`), [`TARGET_TAG`] (the volume or instance)
//! and [`SLOT_TAG`] (the scheduled time). A run cut short (killed, a
//! crash) leaves the slot undone; the next run finds what was already
//! made for that slot by its tags and makes only the rest, and an image
//! is registered whole or not at all.
//!
//! Retention only ever deletes what the policy made, for that target,
//! oldest first: never the newest, never a snapshot that backs a
//! registered image the policy did not make. Deleting follows the recycle
//! bin's rules. Age is counted from each object's slot, by the same clock
//! as the schedule (the library takes `now`; the binary passes the
//! system's).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, ErrorKind, Result};
use crate::format::image::{DeviceName, ImageState};
use crate::format::lifecycle::{
    CrossRegionCopy, MAX_RECORD, Policy, PolicyRun, PolicyState, PolicyStatus, PolicyTarget,
    Retain, TargetOutcome, decode_policy, decode_policy_state, encode_policy, encode_policy_state,
};
use crate::format::manifest::{SnapshotMeta, Tag};
use crate::id::{AccountId, ImageId, PolicyId, SnapshotId};
use crate::image::copy::{CopyOptions, copy_image, copy_snapshot};
use crate::image::create::{
    ImageCreateOptions, MapSource, MapSpec, create_from_instance, create_from_volumes,
};
use crate::image::instance::lazy_device_of;
use crate::image::ops::deregister_at;
use crate::image::rules::validate_name;
use crate::lazy::overlay::is_overlay;
use crate::lifecycle::schedule::Schedule;
use crate::ops::access::{Deleted, delete_at};
use crate::ops::recycle::{parse_time, time_string};
use crate::ops::snapshot::{self, CreateOptions, ParentChoice, validate_labels};
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::region::images::{self, ImageView, users_of};
use crate::volume::nbd::is_nbd_uri;

/// The tag naming the policy that made a snapshot or image.
pub const POLICY_TAG: &str = "blocksnap:lifecycle-policy-id";
/// The tag naming the volume or instance it was made of.
pub const TARGET_TAG: &str = "blocksnap:lifecycle-target";
/// The tag naming the scheduled time it was made for.
pub const SLOT_TAG: &str = "blocksnap:lifecycle-slot";
/// The longest `--retain-age`: a hundred years.
const MAX_RETAIN_AGE: u64 = 36_500 * 86_400;
pub use crate::format::manifest::RESERVED_TAG_PREFIX;
use crate::format::manifest::check_user_tag_key;

fn policy_key(id: &PolicyId) -> String {
    format!("policies/{id}.json")
}

fn state_key(id: &PolicyId) -> String {
    format!("policies/{id}.state.json")
}

/// What `policy create` asks for.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    pub name: String,
    pub targets: Vec<PolicyTarget>,
    pub schedule: String,
    pub retain: Retain,
    pub create_image: bool,
    pub image_name_prefix: Option<String>,
    pub copy: Option<CrossRegionCopy>,
    pub tags: Vec<Tag>,
}

/// Refuses tag keys blocksnap reserves for itself.
pub fn check_user_tags(tags: &[Tag]) -> Result<()> {
    tags.iter().try_for_each(|t| check_user_tag_key(&t.key))
}

fn stamp(slot: &str) -> String {
    slot.chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T' || *c == 'Z')
        .collect::<String>()
        .replacen("00Z", "Z", 1)
}

/// The name of the image a policy makes of target number `i` for `slot`.
fn image_name(policy: &Policy, i: usize, slot: &str) -> String {
    let prefix = policy.image_name_prefix.as_deref().unwrap_or(&policy.name);
    match policy.targets.len() {
        1 => format!("{prefix}-{}", stamp(slot)),
        _ => format!("{prefix}-{}-{}", stamp(slot), i + 1),
    }
}

pub fn read_policy(region: &Region, id: &PolicyId) -> Result<Option<Policy>> {
    let key = policy_key(id);
    let backend = region.backend();
    match backend.read(&key, "lifecycle policy", MAX_RECORD)? {
        Some(bytes) => Ok(Some(decode_policy(&bytes, &backend.locate(&key))?)),
        None => Ok(None),
    }
}

pub fn read_state(region: &Region, id: &PolicyId) -> Result<PolicyState> {
    let key = state_key(id);
    let backend = region.backend();
    match backend.read(&key, "lifecycle policy state", MAX_RECORD)? {
        Some(bytes) => decode_policy_state(&bytes, &backend.locate(&key)),
        None => Ok(PolicyState::default()),
    }
}

/// Every policy of the region, of all accounts, oldest first.
fn all(region: &Region) -> Result<Vec<Policy>> {
    let mut out = Vec::new();
    for name in region.backend().list("policies")? {
        let Some(id) = name
            .strip_suffix(".json")
            .filter(|n| !n.ends_with(".state"))
            .and_then(|n| n.parse::<PolicyId>().ok())
        else {
            continue;
        };
        if let Some(p) = read_policy(region, &id)? {
            out.push(p);
        }
    }
    out.sort_by(|a, b| (&a.date_created, &a.policy_id).cmp(&(&b.date_created, &b.policy_id)));
    Ok(out)
}

/// The caller's policies with their states.
pub fn list(region: &Region, caller: &AccountId) -> Result<Vec<(Policy, PolicyState)>> {
    all(region)?
        .into_iter()
        .filter(|p| &p.owner_id == caller)
        .map(|p| {
            let s = read_state(region, &p.policy_id)?;
            Ok((p, s))
        })
        .collect()
}

/// The caller's policy named `name_or_id` (its id or its name).
pub fn find(region: &Region, caller: &AccountId, name_or_id: &str) -> Result<Policy> {
    let policies = all(region)?;
    let found = policies
        .iter()
        .find(|p| p.policy_id.as_str() == name_or_id)
        .or_else(|| {
            policies
                .iter()
                .find(|p| &p.owner_id == caller && p.name == name_or_id)
        });
    match found {
        Some(p) if &p.owner_id == caller => Ok(p.clone()),
        Some(p) => Err(Error::Forbidden(format!(
            "account {caller} may not use policy {}: it belongs to account {}",
            p.policy_id, p.owner_id
        ))),
        None => Err(Error::NotFound(format!(
            "policy {name_or_id:?} not found in region {}: run `blocksnap policy list`",
            region.name()
        ))),
    }
}

/// Creates a policy owned by `caller`. `store_root` is where a copy's
/// target region is looked up.
pub fn create(
    region: &Region,
    store_root: &Path,
    caller: &AccountId,
    spec: &PolicySpec,
    now: SystemTime,
) -> Result<Policy> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    let name_ok = |c: char| c.is_ascii_alphanumeric() || " -_.".contains(c);
    if spec.name.is_empty() || spec.name.chars().count() > 128 || !spec.name.chars().all(name_ok) {
        return bad(format!(
            "policy name {:?} is not allowed: use 1 to 128 letters, digits, spaces, '-', '_' or '.'",
            spec.name
        ));
    }
    if spec.name.starts_with("policy-") {
        return bad(format!(
            "policy name {:?} looks like a policy id: pick a name that does not start with policy-",
            spec.name
        ));
    }
    if spec.targets.is_empty() {
        return bad("a policy needs a target: --volume PATH or --instance DIR".into());
    }
    if !spec.create_image
        && let Some(t) = spec
            .targets
            .iter()
            .find(|t| matches!(t, PolicyTarget::Instance(_)))
    {
        return bad(format!(
            "{t}: a policy makes images of instances; add --create-image (or name its volume \
             files with --volume)"
        ));
    }
    if spec.image_name_prefix.is_some() && !spec.create_image {
        return bad("--image-name-prefix needs --create-image".into());
    }
    for t in &spec.targets {
        // A typo is caught now, not at the first run; a target that goes
        // away later is reported by the run it fails.
        let there = match t {
            PolicyTarget::Volume(v) => is_nbd_uri(v) || Path::new(v).exists(),
            PolicyTarget::Instance(d) => Path::new(d).join("instance.json").is_file(),
        };
        if !there {
            return Err(Error::NotFound(format!(
                "{t} does not exist: check the path (an instance is a directory made by \
                 `blocksnap instance launch`)"
            )));
        }
        if let PolicyTarget::Volume(v) = t {
            let path = Path::new(v);
            // A FIFO, a directory or a character device is never a volume.
            use std::os::unix::fs::FileTypeExt;
            let kind = std::fs::metadata(path).map(|m| m.file_type());
            if !is_nbd_uri(v) && !kind.is_ok_and(|k| k.is_file() || k.is_block_device()) {
                return Err(Error::NotAVolume(path.to_path_buf()));
            }
            if is_overlay(path) || lazy_device_of(path)?.is_some() {
                return bad(format!(
                    "{v} is a lazy volume: a policy takes it through its instance \
                     (--instance DIR --create-image), or through `snapshot create` by hand"
                ));
            }
        }
    }
    let schedule = Schedule::from_str(&spec.schedule)?;
    if schedule.next_slot(now).is_none() {
        return bad(format!("schedule {:?} never comes", spec.schedule));
    }
    match spec.retain {
        Retain::Count(0) => return bad("--retain-count must be at least 1".into()),
        Retain::AgeSeconds(0) => return bad("--retain-age must be longer than 0".into()),
        Retain::AgeSeconds(a) if a > MAX_RETAIN_AGE => {
            return bad("--retain-age is at most 100 years (36500d)".into());
        }
        _ => {}
    }
    check_user_tags(&spec.tags)?;
    if let Some(copy) = &spec.copy {
        if copy.retain_count == 0 {
            return bad("--copy-retain-count must be at least 1".into());
        }
        let dst = Region::open(store_root, &copy.target_region)?;
        if dst.location() == region.location() {
            return bad(format!(
                "--copy-to-region {} is this policy's own region",
                copy.target_region
            ));
        }
    }
    let policy = Policy {
        policy_id: PolicyId::random(),
        name: spec.name.clone(),
        owner_id: caller.clone(),
        state: PolicyStatus::Enabled,
        targets: spec.targets.clone(),
        schedule: spec.schedule.trim().to_string(),
        retain: spec.retain.clone(),
        create_image: spec.create_image,
        image_name_prefix: spec.image_name_prefix.clone(),
        copy: spec.copy.clone(),
        tags: spec.tags.clone(),
        date_created: time_string(now),
    };
    for (i, t) in policy.targets.iter().enumerate() {
        validate_labels("", &made_tags(&policy, t, &time_string(now)))?;
        if spec.create_image {
            validate_name(&image_name(&policy, i, &time_string(now)))?;
        }
    }
    let _catalog = region.catalog_lock("policy create")?;
    if all(region)?
        .iter()
        .any(|p| p.owner_id == *caller && p.name == spec.name)
    {
        return Err(Error::AlreadyExists(format!(
            "account {caller} already has a policy named {:?} in region {}: pick another name",
            spec.name,
            region.name()
        )));
    }
    region
        .backend()
        .create(&policy_key(&policy.policy_id), &encode_policy(&policy))?;
    Ok(policy)
}

/// Enables or disables a policy; a disabled one does nothing when run.
pub fn set_enabled(
    region: &Region,
    caller: &AccountId,
    name_or_id: &str,
    on: bool,
) -> Result<Policy> {
    let _catalog = region.catalog_lock("policy enable")?;
    let mut p = find(region, caller, name_or_id)?;
    p.state = if on {
        PolicyStatus::Enabled
    } else {
        PolicyStatus::Disabled
    };
    region
        .backend()
        .replace(&policy_key(&p.policy_id), &encode_policy(&p))?;
    Ok(p)
}

/// Deletes a policy. What it made stays (as with DLM): delete or prune it
/// by hand.
pub fn delete(region: &Region, caller: &AccountId, name_or_id: &str) -> Result<Policy> {
    // Not while a run is doing its work.
    let _policy = region.policy_lock("policy delete")?;
    let _catalog = region.catalog_lock("policy delete")?;
    let p = find(region, caller, name_or_id)?;
    region.backend().remove(&policy_key(&p.policy_id))?;
    region.backend().remove(&state_key(&p.policy_id))?;
    Ok(p)
}

/// The slot a policy would run for at `now`, if one is due.
fn due_slot(policy: &Policy, state: &PolicyState, now: SystemTime) -> Result<Option<SystemTime>> {
    if policy.state != PolicyStatus::Enabled {
        return Ok(None);
    }
    let schedule = Schedule::from_str(&policy.schedule)?;
    let Some(slot) = schedule.latest_slot(now) else {
        return Ok(None);
    };
    let created = parse_time(&policy.date_created).unwrap_or(slot);
    let done = state.completed_slot.as_deref().and_then(parse_time);
    Ok((slot >= created && done.is_none_or(|d| d < slot)).then_some(slot))
}

/// When the policy next has work, as of `now` (now, if it is due).
pub fn next_due(
    policy: &Policy,
    state: &PolicyState,
    now: SystemTime,
) -> Result<Option<SystemTime>> {
    if policy.state != PolicyStatus::Enabled {
        return Ok(None);
    }
    if due_slot(policy, state, now)?.is_some() {
        return Ok(Some(now));
    }
    Ok(Schedule::from_str(&policy.schedule)?.next_slot(now))
}

/// What `policy run` did.
#[derive(Debug, Default)]
pub struct RunReport {
    pub ran: Vec<(Policy, PolicyRun)>,
    /// Enabled policies with nothing due, and when they next are.
    pub idle: Vec<(Policy, Option<SystemTime>)>,
    /// Another `policy run` holds the lock (who): nothing was done.
    pub busy: Option<String>,
}

impl RunReport {
    /// Whether some target failed.
    pub fn failed(&self) -> bool {
        self.ran.iter().any(|(_, r)| r.outcome != "succeeded")
    }
}

/// What a run needs beside the policy.
pub struct RunContext<'a> {
    pub region: &'a Arc<Region>,
    pub store_root: &'a Path,
    pub caller: &'a AccountId,
    pub threads: usize,
    pub now: SystemTime,
    pub progress: &'a dyn Progress,
}

/// Does the work that is due at `ctx.now` for the caller's enabled
/// policies (or only `only`, a name or id).
pub fn run(ctx: &RunContext, only: Option<&str>) -> Result<RunReport> {
    let region = ctx.region;
    let policies = match only {
        Some(n) => vec![find(region, ctx.caller, n)?],
        None => all(region)?
            .into_iter()
            .filter(|p| &p.owner_id == ctx.caller)
            .collect(),
    };
    let mut report = RunReport::default();
    let _lock = match region.policy_lock("policy run") {
        Ok(l) => l,
        // Another run has been at work for longer than the lock wait: it
        // does what is due.
        Err(Error::Locked { holder, .. }) => {
            report.busy = Some(holder);
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    for listed in policies {
        // Read again under the lock: another run may have done the work,
        // or the policy changed.
        let Some(policy) = read_policy(region, &listed.policy_id)? else {
            continue;
        };
        let state = read_state(region, &policy.policy_id)?;
        let Some(slot) = due_slot(&policy, &state, ctx.now)? else {
            if policy.state == PolicyStatus::Enabled {
                let next = next_due(&policy, &state, ctx.now)?;
                report.idle.push((policy, next));
            }
            continue;
        };
        let slot = time_string(slot);
        let started = time_string(SystemTime::now());
        let targets: Vec<TargetOutcome> = policy
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut outcome = TargetOutcome {
                    target: t.clone(),
                    outcome: "succeeded".into(),
                    created: Vec::new(),
                    deleted: Vec::new(),
                    error: None,
                };
                if let Err(e) = run_target(ctx, &policy, i, &slot, &mut outcome) {
                    outcome.outcome = "failed".into();
                    outcome.error = Some(e.to_string());
                }
                outcome
            })
            .collect();
        let failed = targets.iter().filter(|t| t.outcome != "succeeded").count();
        let run = PolicyRun {
            slot: slot.clone(),
            started,
            finished: time_string(SystemTime::now()),
            outcome: match failed {
                0 => "succeeded",
                n if n == targets.len() => "failed",
                _ => "partial",
            }
            .into(),
            targets,
        };
        let state = PolicyState {
            completed_slot: Some(slot),
            last_run: Some(run.clone()),
        };
        region
            .backend()
            .replace(&state_key(&policy.policy_id), &encode_policy_state(&state))?;
        report.ran.push((policy, run));
    }
    Ok(report)
}

fn tag<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter().find(|t| t.key == key).map(|t| t.value.as_str())
}

/// The tags a policy puts on what it makes of `target` for `slot`.
fn made_tags(policy: &Policy, target: &PolicyTarget, slot: &str) -> Vec<Tag> {
    let mut tags = policy.tags.clone();
    for (key, value) in [
        (POLICY_TAG, policy.policy_id.as_str()),
        (TARGET_TAG, target.path()),
        (SLOT_TAG, slot),
    ] {
        tags.push(Tag {
            key: key.into(),
            value: value.into(),
        });
    }
    tags
}

fn made_by(tags: &[Tag], policy: &Policy, target: &PolicyTarget) -> bool {
    tag(tags, POLICY_TAG) == Some(policy.policy_id.as_str())
        && tag(tags, TARGET_TAG) == Some(target.path())
}

/// The caller's snapshots the policy made of `target`, oldest slot first.
fn made_snapshots(
    region: &Region,
    caller: &AccountId,
    policy: &Policy,
    target: &PolicyTarget,
) -> Result<Vec<SnapshotMeta>> {
    let mut out: Vec<SnapshotMeta> = region
        .list_snapshots()?
        .snapshots
        .into_iter()
        .filter(|m| &m.owner == caller && made_by(&m.tags, policy, target))
        .collect();
    by_slot(&mut out);
    Ok(out)
}

/// Sorts snapshots a policy made oldest slot first.
fn by_slot(made: &mut [SnapshotMeta]) {
    made.sort_by(|a, b| {
        (tag(&a.tags, SLOT_TAG), a.created_ns).cmp(&(tag(&b.tags, SLOT_TAG), b.created_ns))
    });
}

/// The caller's available images the policy made of `target`, oldest
/// slot first; and every image of the region.
fn made_images(
    region: &Region,
    caller: &AccountId,
    policy: &Policy,
    target: &PolicyTarget,
) -> Result<(Vec<ImageView>, Vec<ImageView>)> {
    let listing = images::list(region)?;
    if let Some(e) = listing.damaged.into_iter().next() {
        return Err(e);
    }
    let mut made: Vec<ImageView> = listing
        .images
        .iter()
        .filter(|v| {
            &v.image.owner_id == caller
                && v.state.state == ImageState::Available
                && made_by(&v.image.tags, policy, target)
        })
        .cloned()
        .collect();
    made.sort_by(|a, b| {
        (tag(&a.image.tags, SLOT_TAG), &a.image.creation_date)
            .cmp(&(tag(&b.image.tags, SLOT_TAG), &b.image.creation_date))
    });
    Ok((made, listing.images))
}

/// Which of `slots` (oldest first) retention lets go at `now`: never the
/// newest.
fn expired(slots: &[Option<&str>], retain: &Retain, now: SystemTime) -> Vec<usize> {
    let n = slots.len();
    (0..n.saturating_sub(1))
        .filter(|&i| match retain {
            Retain::Count(keep) => i + (*keep as usize) < n,
            Retain::AgeSeconds(age) => slots[i]
                .and_then(parse_time)
                .and_then(|t| t.checked_add(Duration::from_secs(*age)))
                .is_some_and(|end| end <= now),
        })
        .collect()
}

fn deleted_name(id: &str, d: &Deleted) -> String {
    match d {
        Deleted::Removed => id.to_string(),
        Deleted::Binned(e) => format!("{id} (recycle bin until {})", e.recycle_bin_exit_time),
    }
}

fn run_target(
    ctx: &RunContext,
    policy: &Policy,
    index: usize,
    slot: &str,
    out: &mut TargetOutcome,
) -> Result<()> {
    if policy.create_image {
        run_image_target(ctx, policy, index, slot, out)
    } else {
        run_snapshot_target(ctx, policy, &policy.targets[index], slot, out)
    }
}

fn copy_options(ctx: &RunContext) -> CopyOptions {
    CopyOptions {
        caller: ctx.caller.clone(),
        name: None,
        description: None,
        copy_tags: true,
        threads: ctx.threads,
        encryption: Default::default(),
    }
}

fn run_snapshot_target(
    ctx: &RunContext,
    policy: &Policy,
    target: &PolicyTarget,
    slot: &str,
    out: &mut TargetOutcome,
) -> Result<()> {
    let region: &Region = ctx.region;
    let mut made = made_snapshots(region, ctx.caller, policy, target)?;
    let tags = made_tags(policy, target, slot);
    let snap = match made.iter().find(|m| tag(&m.tags, SLOT_TAG) == Some(slot)) {
        // Made by a run that was cut short.
        Some(m) => m.clone(),
        None => {
            let opts = CreateOptions {
                parent: ParentChoice::Latest,
                description: format!("Created for policy {} ({slot})", policy.policy_id),
                tags: tags.clone(),
                owner: Some(ctx.caller.clone()),
                threads: ctx.threads,
                ..CreateOptions::default()
            };
            let meta = snapshot::create(region, Path::new(target.path()), &opts, ctx.progress)?;
            out.created.push(meta.id.to_string());
            made.push(meta.clone());
            by_slot(&mut made);
            meta
        }
    };
    if let Some(copy) = &policy.copy {
        let dst = Region::open(ctx.store_root, &copy.target_region)?;
        let mut copies = made_snapshots(&dst, ctx.caller, policy, target)?;
        if !copies.iter().any(|m| tag(&m.tags, SLOT_TAG) == Some(slot)) {
            let description = format!(
                "Copied for policy {} from {} in region {}",
                policy.policy_id,
                snap.id,
                region.name()
            );
            let opts = copy_options(ctx);
            let (c, _) = copy_snapshot(
                region,
                &snap.id,
                &dst,
                &opts,
                description,
                tags,
                ctx.progress,
            )?;
            out.created
                .push(format!("{} ({})", c.id, copy.target_region));
            copies.push(c);
            by_slot(&mut copies);
        }
        let retain = Retain::Count(copy.retain_count);
        retire_snapshots(&dst, ctx, &copies, &retain, out)?;
    }
    retire_snapshots(region, ctx, &made, &policy.retain, out)
}

/// Deletes what retention lets go of `made` (oldest slot first), except
/// snapshots an image uses.
fn retire_snapshots(
    region: &Region,
    ctx: &RunContext,
    made: &[SnapshotMeta],
    retain: &Retain,
    out: &mut TargetOutcome,
) -> Result<()> {
    let slots: Vec<Option<&str>> = made.iter().map(|m| tag(&m.tags, SLOT_TAG)).collect();
    let images = images::list(region)?;
    for i in expired(&slots, retain, ctx.now) {
        let m = &made[i];
        if !users_of(&images.images, &m.id).is_empty() {
            continue;
        }
        retire(region, ctx, &m.id, out)?;
    }
    Ok(())
}

/// Deletes (or bins) snapshot `id` and says so in `out`. One that must
/// stay (a lazy volume reads it, an image uses it) stays, and is tried
/// again by the next run.
fn retire(
    region: &Region,
    ctx: &RunContext,
    id: &SnapshotId,
    out: &mut TargetOutcome,
) -> Result<()> {
    match delete_at(region, id, ctx.caller, ctx.now) {
        Ok(d) => out.deleted.push(deleted_name(id.as_str(), &d)),
        Err(e) if e.kind() == ErrorKind::Conflict => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

fn run_image_target(
    ctx: &RunContext,
    policy: &Policy,
    index: usize,
    slot: &str,
    out: &mut TargetOutcome,
) -> Result<()> {
    let region: &Region = ctx.region;
    let target = &policy.targets[index];
    let tags = made_tags(policy, target, slot);
    let (made, _) = made_images(region, ctx.caller, policy, target)?;
    let ami: ImageId = match made
        .iter()
        .find(|v| tag(&v.image.tags, SLOT_TAG) == Some(slot))
    {
        Some(v) => v.image.image_id.clone(),
        None => {
            let mut opts =
                ImageCreateOptions::new(&image_name(policy, index, slot), ctx.caller.clone());
            opts.description = format!("Created for policy {} ({slot})", policy.policy_id);
            opts.tags = tags.clone();
            opts.snapshot_tags = tags.clone();
            opts.threads = ctx.threads;
            let report = match target {
                PolicyTarget::Volume(p) => {
                    let map = MapSpec {
                        device: DeviceName::from_str("/dev/xvda")?,
                        source: MapSource::Volume(p.into()),
                    };
                    create_from_volumes(region, &[map], &opts, ctx.progress)?
                }
                PolicyTarget::Instance(d) => {
                    create_from_instance(ctx.region, Path::new(d), &opts, ctx.progress)?
                }
            };
            out.created.push(report.image.image_id.to_string());
            report.image.image_id
        }
    };
    discard_strays(region, ctx, policy, target, out)?;
    if let Some(copy) = &policy.copy {
        let dst = Region::open(ctx.store_root, &copy.target_region)?;
        let (copies, _) = made_images(&dst, ctx.caller, policy, target)?;
        if !copies
            .iter()
            .any(|v| tag(&v.image.tags, SLOT_TAG) == Some(slot))
        {
            let c = copy_image(region, &ami, &dst, &copy_options(ctx), ctx.progress)?;
            out.created
                .push(format!("{} ({})", c.image.image_id, copy.target_region));
        }
        let (copies, _) = made_images(&dst, ctx.caller, policy, target)?;
        retire_images(&dst, ctx, &copies, &Retain::Count(copy.retain_count), out)?;
    }
    let (made, _) = made_images(region, ctx.caller, policy, target)?;
    retire_images(region, ctx, &made, &policy.retain, out)
}

/// Deletes the snapshots of `target` the policy took for images that were
/// never registered (a run cut short between its snapshots and the image).
fn discard_strays(
    region: &Region,
    ctx: &RunContext,
    policy: &Policy,
    target: &PolicyTarget,
    out: &mut TargetOutcome,
) -> Result<()> {
    let (_, all_images) = made_images(region, ctx.caller, policy, target)?;
    let used: Vec<&SnapshotId> = all_images
        .iter()
        .flat_map(|v| v.image.snapshot_ids())
        .collect();
    for m in made_snapshots(region, ctx.caller, policy, target)? {
        if !used.contains(&&m.id) {
            retire(region, ctx, &m.id, out)?;
        }
    }
    Ok(())
}

fn retire_images(
    region: &Region,
    ctx: &RunContext,
    made: &[ImageView],
    retain: &Retain,
    out: &mut TargetOutcome,
) -> Result<()> {
    let slots: Vec<Option<&str>> = made.iter().map(|v| tag(&v.image.tags, SLOT_TAG)).collect();
    for i in expired(&slots, retain, ctx.now) {
        let id = &made[i].image.image_id;
        let r = deregister_at(region, id, ctx.caller, true, ctx.now)?;
        out.deleted.push(match &r.binned {
            Some(e) => format!("{id} (recycle bin until {})", e.recycle_bin_exit_time),
            None => id.to_string(),
        });
        for s in &r.deleted_snapshots {
            out.deleted.push(s.to_string());
        }
        for e in &r.binned_snapshots {
            out.deleted.push(format!(
                "{} (recycle bin until {})",
                e.id, e.recycle_bin_exit_time
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_a_count_or_an_age_and_always_the_newest() {
        let slots = [
            Some("2026-11-01T00:00:00Z"),
            Some("2026-11-02T00:00:00Z"),
            Some("2026-11-03T00:00:00Z"),
            Some("2026-11-04T00:00:00Z"),
        ];
        let now = parse_time("2026-11-04T12:00:00Z").unwrap();
        assert_eq!(expired(&slots, &Retain::Count(2), now), vec![0, 1]);
        assert_eq!(expired(&slots, &Retain::Count(9), now), Vec::<usize>::new());
        assert_eq!(
            expired(&slots, &Retain::AgeSeconds(2 * 86400), now),
            vec![0, 1]
        );
        // Even when everything is old, the newest stays.
        let later = parse_time("2027-01-01T00:00:00Z").unwrap();
        assert_eq!(
            expired(&slots, &Retain::AgeSeconds(3600), later),
            vec![0, 1, 2]
        );
        assert_eq!(stamp("2026-11-27T10:00:00Z"), "20261127T1000Z");
    }
}
