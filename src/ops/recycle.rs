//! The recycle bin (AWS Recycle Bin): retention rules, and what they keep.
//!
//! A rule belongs to an account and names a resource type (snapshots or
//! images), a retention period and optionally tags. When its owner deletes
//! a snapshot or deregisters an image a rule matches (a rule without tags
//! matches all of the owner's; one with tags, objects carrying any of
//! them), the object goes to the bin instead: a snapshot's manifest moves
//! to `recycle-bin/snapshots/`, so nothing sees it but the bin and gc,
//! which keeps every chunk it names; an image stays deregistered with an
//! entry saying until when it may come back. Where several rules match,
//! the longest retention wins (as AWS decides). `store gc` purges what is
//! past its retention.
//!
//! A rule can be locked (AWS's rule lock): a locked rule cannot be deleted
//! nor its retention shortened; `unlock` starts its unlock delay, after
//! which it is unlocked.
//!
//! Every move writes the bin entry first; a move cut short leaves the
//! object where it was (or back where it was), and gc removes the leftover
//! half of the move (see [`purge`]).

use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::format::lifecycle::{BinEntry, ResourceType, RetentionRule, RuleLock};
use crate::format::manifest::{SnapshotMeta, Tag};
use crate::id::{AccountId, RuleId, SnapshotId};
use crate::region::catalog::{Region, binned_snapshot_key};
use crate::region::images;
use crate::region::recycle::{self, read_entry, remove_entry, write_entry};
use crate::sys::LockMode;

/// The shortest and longest retention (AWS: 1 to 365 days; shorter
/// periods are allowed here, in whole hours, for testing a rule).
const MIN_RETENTION: Duration = Duration::from_secs(3600);
const MAX_RETENTION: Duration = Duration::from_secs(365 * 86400);
/// AWS's bounds on a rule lock's unlock delay: 7 to 30 days.
const MIN_UNLOCK_DELAY: Duration = Duration::from_secs(7 * 86400);
const MAX_UNLOCK_DELAY: Duration = Duration::from_secs(30 * 86400);

/// A period as people write it here: `7d`, `36h`.
pub fn days_or_hours(secs: u64) -> String {
    match secs {
        s if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s => humantime::format_duration(Duration::from_secs(s)).to_string(),
    }
}

pub fn time_string(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

/// A rule's lock state, as AWS names it: `locked`, `pending_unlock` or
/// `unlocked`.
pub fn lock_state(rule: &RetentionRule, now: SystemTime) -> &'static str {
    match &rule.lock {
        None => "unlocked",
        Some(RuleLock {
            unlock_at: None, ..
        }) => "locked",
        Some(RuleLock {
            unlock_at: Some(t), ..
        }) => match parse_time(t) {
            Some(t) if t <= now => "unlocked",
            _ => "pending_unlock",
        },
    }
}

/// What `recycle-bin rule create` asks for.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub resource_type: ResourceType,
    pub retention: Duration,
    pub tags: Vec<Tag>,
    pub description: String,
    /// Lock the rule at once, with this unlock delay.
    pub lock: Option<Duration>,
}

fn check_retention(d: Duration) -> Result<()> {
    if d < MIN_RETENTION || d > MAX_RETENTION || !d.as_secs().is_multiple_of(3600) {
        return Err(Error::InvalidArgument(format!(
            "a retention period of {} is not allowed: give whole hours or days from 1h to 365d",
            humantime::format_duration(d)
        )));
    }
    Ok(())
}

fn check_unlock_delay(d: Duration) -> Result<()> {
    if d < MIN_UNLOCK_DELAY || d > MAX_UNLOCK_DELAY || !d.as_secs().is_multiple_of(86400) {
        return Err(Error::InvalidArgument(format!(
            "an unlock delay of {} is not allowed: give whole days from 7d to 30d (as AWS's rule lock)",
            humantime::format_duration(d)
        )));
    }
    Ok(())
}

pub fn create_rule(
    region: &Region,
    caller: &AccountId,
    spec: &RuleSpec,
    now: SystemTime,
) -> Result<RetentionRule> {
    check_retention(spec.retention)?;
    if let Some(d) = spec.lock {
        check_unlock_delay(d)?;
    }
    crate::format::manifest::validate_labels(&spec.description, &spec.tags)?;
    let rule = RetentionRule {
        identifier: RuleId::random(),
        owner_id: caller.clone(),
        resource_type: spec.resource_type,
        retention_seconds: spec.retention.as_secs(),
        resource_tags: spec.tags.clone(),
        description: spec.description.clone(),
        lock: spec.lock.map(|d| RuleLock {
            unlock_delay_seconds: d.as_secs(),
            unlock_at: None,
        }),
        date_created: time_string(now),
    };
    let _catalog = region.catalog_lock("recycle-bin rule create")?;
    recycle::write_rule(region, &rule)?;
    Ok(rule)
}

/// The caller's rules, oldest first.
pub fn list_rules(region: &Region, caller: &AccountId) -> Result<Vec<RetentionRule>> {
    Ok(recycle::rules(region)?
        .into_iter()
        .filter(|r| &r.owner_id == caller)
        .collect())
}

/// Rule `id`, if `caller` owns it.
pub fn owned_rule(region: &Region, caller: &AccountId, id: &RuleId) -> Result<RetentionRule> {
    let rule = recycle::read_rule(region, id)?.ok_or_else(|| {
        Error::NotFound(format!(
            "retention rule {id} not found in region {}: run `blocksnap recycle-bin rule list`",
            region.name()
        ))
    })?;
    if &rule.owner_id != caller {
        return Err(Error::Forbidden(format!(
            "account {caller} may not change retention rule {id}: it belongs to account {}",
            rule.owner_id
        )));
    }
    Ok(rule)
}

fn refuse_locked(rule: &RetentionRule, now: SystemTime, what: &str) -> Result<()> {
    match lock_state(rule, now) {
        "unlocked" => Ok(()),
        state => {
            let until = match rule.lock.as_ref().and_then(|l| l.unlock_at.clone()) {
                Some(t) => format!("it unlocks at {t}"),
                None => format!(
                    "unlock it with `blocksnap recycle-bin rule unlock {}`, then wait its unlock \
                     delay of {}",
                    rule.identifier,
                    days_or_hours(rule.lock.as_ref().map_or(0, |l| l.unlock_delay_seconds))
                ),
            };
            Err(Error::Conflict(format!(
                "retention rule {} is {state}: it cannot be {what} until it is unlocked; {until}",
                rule.identifier
            )))
        }
    }
}

/// Changes a rule's retention. While the rule is locked it may only grow.
pub fn update_rule(
    region: &Region,
    caller: &AccountId,
    id: &RuleId,
    retention: Duration,
    now: SystemTime,
) -> Result<RetentionRule> {
    check_retention(retention)?;
    let _catalog = region.catalog_lock("recycle-bin rule update")?;
    let mut rule = owned_rule(region, caller, id)?;
    if retention.as_secs() < rule.retention_seconds {
        refuse_locked(&rule, now, "shortened")?;
    }
    rule.retention_seconds = retention.as_secs();
    recycle::write_rule(region, &rule)?;
    Ok(rule)
}

/// Locks a rule (again: a pending unlock is cancelled).
pub fn lock_rule(
    region: &Region,
    caller: &AccountId,
    id: &RuleId,
    unlock_delay: Duration,
    now: SystemTime,
) -> Result<RetentionRule> {
    check_unlock_delay(unlock_delay)?;
    let _catalog = region.catalog_lock("recycle-bin rule lock")?;
    let mut rule = owned_rule(region, caller, id)?;
    if lock_state(&rule, now) != "unlocked"
        && let Some(l) = &rule.lock
        && unlock_delay.as_secs() < l.unlock_delay_seconds
    {
        return Err(Error::Conflict(format!(
            "retention rule {id} is locked with an unlock delay of {}: a locked rule's delay \
             cannot be shortened",
            days_or_hours(l.unlock_delay_seconds)
        )));
    }
    rule.lock = Some(RuleLock {
        unlock_delay_seconds: unlock_delay.as_secs(),
        unlock_at: None,
    });
    recycle::write_rule(region, &rule)?;
    Ok(rule)
}

/// Starts a locked rule's unlock delay; the rule stays locked until it
/// has passed.
pub fn unlock_rule(
    region: &Region,
    caller: &AccountId,
    id: &RuleId,
    now: SystemTime,
) -> Result<RetentionRule> {
    let _catalog = region.catalog_lock("recycle-bin rule unlock")?;
    let mut rule = owned_rule(region, caller, id)?;
    match (lock_state(&rule, now), rule.lock.as_mut()) {
        ("locked", Some(l)) => {
            l.unlock_at = Some(time_string(
                now + Duration::from_secs(l.unlock_delay_seconds),
            ));
        }
        ("pending_unlock", _) => {}
        _ => {
            return Err(Error::Conflict(format!(
                "retention rule {id} is not locked: there is nothing to unlock"
            )));
        }
    }
    recycle::write_rule(region, &rule)?;
    Ok(rule)
}

/// Deletes a rule; refused while it is locked. What it already keeps
/// stays in the bin until its own retention ends.
pub fn delete_rule(
    region: &Region,
    caller: &AccountId,
    id: &RuleId,
    now: SystemTime,
) -> Result<()> {
    let _catalog = region.catalog_lock("recycle-bin rule delete")?;
    let rule = owned_rule(region, caller, id)?;
    refuse_locked(&rule, now, "deleted")?;
    recycle::remove_rule(region, id)
}

/// Whether `rule` keeps an object with `tags` (`None`: its tags are sealed
/// and unknown, so a tag rule is taken to match: keeping it loses nothing).
fn matches(rule: &RetentionRule, tags: Option<&[Tag]>) -> bool {
    if rule.resource_tags.is_empty() {
        return true;
    }
    let Some(tags) = tags else {
        return true;
    };
    rule.resource_tags.iter().any(|want| {
        tags.iter()
            .any(|t| t.key == want.key && (want.value.is_empty() || t.value == want.value))
    })
}

/// The rule that keeps `owner`'s object of `kind` with `tags`, if any: the
/// one with the longest retention.
pub fn keeping_rule(
    region: &Region,
    owner: &AccountId,
    kind: ResourceType,
    tags: Option<&[Tag]>,
) -> Result<Option<RetentionRule>> {
    Ok(recycle::rules(region)?
        .into_iter()
        .filter(|r| &r.owner_id == owner && r.resource_type == kind && matches(r, tags))
        .max_by_key(|r| r.retention_seconds))
}

/// A new bin entry for `id` under `rule`.
pub fn entry_for(
    kind: ResourceType,
    id: &str,
    owner: &AccountId,
    rule: &RetentionRule,
    now: SystemTime,
) -> BinEntry {
    BinEntry {
        resource_type: kind,
        id: id.to_string(),
        owner_id: owner.clone(),
        recycle_bin_enter_time: time_string(now),
        recycle_bin_exit_time: time_string(now + Duration::from_secs(rule.retention_seconds)),
        rule: rule.identifier.clone(),
    }
}

/// Moves the snapshot `meta` describes to the bin under `rule`. The caller
/// holds the catalog lock and the region lock (shared) and has checked
/// that the snapshot may be deleted.
pub fn bin_snapshot(
    region: &Region,
    meta: &SnapshotMeta,
    rule: &RetentionRule,
    now: SystemTime,
) -> Result<BinEntry> {
    let entry = entry_for(
        ResourceType::EbsSnapshot,
        meta.id.as_str(),
        &meta.owner,
        rule,
        now,
    );
    write_entry(region, &entry)?;
    region.move_snapshot_to_bin(&meta.id)?;
    Ok(entry)
}

/// The snapshots in the bin (the moves that finished), of every account.
pub fn binned_snapshots(region: &Region) -> Result<Vec<BinEntry>> {
    let mut out = Vec::new();
    for e in recycle::entries(region, ResourceType::EbsSnapshot)? {
        let Ok(id) = e.id.parse::<SnapshotId>() else {
            continue;
        };
        if region.has_binned_snapshot(&id)? && !region.has_snapshot(&id)? {
            out.push(e);
        }
    }
    Ok(out)
}

/// The caller's objects in the bin: snapshots, then images.
pub fn list_binned(region: &Region, caller: &AccountId) -> Result<Vec<BinEntry>> {
    let mut out: Vec<BinEntry> = binned_snapshots(region)?;
    out.extend(images::binned(region)?.into_iter().map(|(e, _)| e));
    out.retain(|e| &e.owner_id == caller);
    Ok(out)
}

fn not_in_bin(region: &Region, kind: ResourceType, id: &str) -> Error {
    Error::NotFound(format!(
        "{} {id} is not in the recycle bin of region {}: run `blocksnap recycle-bin list`",
        kind.noun(),
        region.name()
    ))
}

/// Fails unless `caller` owns bin entry `e`.
pub fn require_bin_owner(e: &BinEntry, caller: &AccountId) -> Result<()> {
    if &e.owner_id != caller {
        return Err(Error::Forbidden(format!(
            "account {caller} may not restore {} {} from the recycle bin: only its owner, \
             account {}, may",
            e.resource_type.noun(),
            e.id,
            e.owner_id
        )));
    }
    Ok(())
}

/// Brings snapshot `id` back from the bin, as it was (permissions too).
pub fn restore_snapshot(region: &Region, id: &SnapshotId, caller: &AccountId) -> Result<BinEntry> {
    let _catalog = region.catalog_lock("snapshot restore-from-recycle-bin")?;
    let _lock = region.lock(LockMode::Shared, "snapshot restore-from-recycle-bin")?;
    let kind = ResourceType::EbsSnapshot;
    let entry = match read_entry(region, kind, id.as_str())? {
        Some(e) if region.has_binned_snapshot(id)? => e,
        _ => return Err(not_in_bin(region, kind, id.as_str())),
    };
    require_bin_owner(&entry, caller)?;
    region.move_snapshot_from_bin(id)?;
    remove_entry(region, kind, id.as_str())?;
    Ok(entry)
}

/// What [`purge`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    /// Snapshots past their retention, removed for good.
    pub snapshots: u64,
    /// Snapshots still in the bin, whose chunks gc keeps.
    pub kept: Vec<SnapshotId>,
    /// Leftovers of moves cut short, removed.
    pub leftovers: u64,
}

/// Purges the snapshots in the bin past their retention at `now`, and the
/// leftovers of interrupted moves; returns the snapshots still kept. Run
/// by gc under its exclusive lock.
pub fn purge_snapshots(region: &Region, now: SystemTime) -> Result<Purged> {
    let mut out = Purged::default();
    let kind = ResourceType::EbsSnapshot;
    let mut seen = std::collections::HashSet::new();
    for e in recycle::entries(region, kind)? {
        let id: SnapshotId = match e.id.parse() {
            Ok(id) => id,
            Err(_) => continue,
        };
        seen.insert(id.clone());
        if region.has_snapshot(&id)? {
            // A move into the bin or out of it was cut short; the snapshot
            // is where it was.
            region.backend().remove(&binned_snapshot_key(&id))?;
            remove_entry(region, kind, id.as_str())?;
            out.leftovers += 1;
        } else if !region.has_binned_snapshot(&id)? {
            remove_entry(region, kind, id.as_str())?;
            out.leftovers += 1;
        } else if parse_time(&e.recycle_bin_exit_time).is_some_and(|t| t <= now) {
            region.purge_binned_snapshot(&id)?;
            remove_entry(region, kind, id.as_str())?;
            out.snapshots += 1;
        } else {
            out.kept.push(id);
        }
    }
    // A manifest in the bin without an entry (damage): its chunks are kept.
    for name in region.backend().list("recycle-bin/snapshots")? {
        if let Ok(id) = name.parse::<SnapshotId>()
            && !seen.contains(&id)
        {
            out.kept.push(id);
        }
    }
    Ok(out)
}

/// Ends the bin entries of images past their retention at `now` (the
/// image stays deregistered, as without a bin), and entries of images
/// restored or gone; returns how many images were purged. Run by gc.
pub fn purge_images(region: &Region, now: SystemTime) -> Result<u64> {
    let kind = ResourceType::Ec2Image;
    let binned: Vec<String> = images::binned(region)?
        .into_iter()
        .map(|(e, _)| e.id)
        .collect();
    let mut purged = 0;
    for e in recycle::entries(region, kind)? {
        if !binned.contains(&e.id) {
            remove_entry(region, kind, &e.id)?;
        } else if parse_time(&e.recycle_bin_exit_time).is_some_and(|t| t <= now) {
            remove_entry(region, kind, &e.id)?;
            purged += 1;
        }
    }
    Ok(purged)
}
