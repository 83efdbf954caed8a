//! `snapshot prune`: which snapshots of a volume to keep, by restic's
//! bucket rules (`restic forget --keep-*`), and deleting the rest.
//!
//! Snapshots are taken newest first. `--keep-last N` keeps the newest N;
//! `--keep-hourly N` keeps the newest snapshot of each of the newest N
//! hours that have one, and likewise daily, weekly (ISO weeks), monthly and
//! yearly; `unlimited` keeps one for every bucket. A snapshot is kept if
//! any rule keeps it, with every rule that did as its reasons. A rule with
//! counts left when the list runs out also keeps the oldest snapshot (as
//! restic does since 0.17: the longest history its counts allow).
//!
//! Where blocksnap differs from restic: buckets are UTC days and hours, not
//! the local time zone; an empty policy is refused, not "keep everything";
//! a snapshot that backs a registered image (or a lazy volume, or that
//! cannot be read) is never deleted, and is not counted in any bucket; and
//! deleting follows the recycle bin's rules, so a rule of the owner's
//! keeps what prune removes until its retention ends.

use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::format::manifest::SnapshotMeta;
use crate::id::{AccountId, ImageId};
use crate::ops::access::{Deleted, delete_at};
use crate::region::catalog::Region;
use crate::region::images::{self, users_of};

/// How many of a bucket to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Count(u32),
    Unlimited,
}

/// The `--keep-*` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: Option<Keep>,
    pub hourly: Option<Keep>,
    pub daily: Option<Keep>,
    pub weekly: Option<Keep>,
    pub monthly: Option<Keep>,
    pub yearly: Option<Keep>,
}

impl KeepPolicy {
    fn rules(&self) -> [(Option<Keep>, Bucket, &'static str); 6] {
        [
            (self.last, Bucket::Each, "last snapshot"),
            (self.hourly, Bucket::Hour, "hourly snapshot"),
            (self.daily, Bucket::Day, "daily snapshot"),
            (self.weekly, Bucket::Week, "weekly snapshot"),
            (self.monthly, Bucket::Month, "monthly snapshot"),
            (self.yearly, Bucket::Year, "yearly snapshot"),
        ]
    }

    /// Whether no rule keeps anything (a policy that would delete all).
    pub fn is_empty(&self) -> bool {
        self.rules()
            .iter()
            .all(|(k, _, _)| matches!(k, None | Some(Keep::Count(0))))
    }
}

#[derive(Debug, Clone, Copy)]
enum Bucket {
    Each,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

/// A civil UTC date from days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_date`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The ISO 8601 year and week of a day.
fn iso_week(days: i64) -> (i64, i64) {
    // 1970-01-01 was a Thursday; Monday is 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_date(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    (year, week)
}

fn bucket_of(b: Bucket, secs: i64, nr: usize) -> i64 {
    let days = secs.div_euclid(86_400);
    let hour = secs.rem_euclid(86_400) / 3600;
    let (y, m, d) = civil_date(days);
    let (m, d) = (i64::from(m), i64::from(d));
    match b {
        Bucket::Each => nr as i64,
        Bucket::Hour => ((y * 100 + m) * 100 + d) * 100 + hour,
        Bucket::Day => (y * 100 + m) * 100 + d,
        Bucket::Week => {
            let (wy, w) = iso_week(days);
            wy * 100 + w
        }
        Bucket::Month => y * 100 + m,
        Bucket::Year => y,
    }
}

/// A snapshot and why it is kept (no reasons: it is removed).
#[derive(Debug, Clone)]
pub struct Decision {
    pub meta: SnapshotMeta,
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

fn seconds(meta: &SnapshotMeta) -> i64 {
    (meta.created_ns / 1_000_000_000) as i64
}

/// Applies `policy` to `snaps` (any order): one decision each, newest
/// first. Pure: nothing is read or deleted.
pub fn plan(mut snaps: Vec<SnapshotMeta>, policy: &KeepPolicy) -> Vec<Decision> {
    snaps.sort_by(|a, b| (b.created_ns, &b.id).cmp(&(a.created_ns, &a.id)));
    let mut rules: Vec<(Option<u32>, Bucket, &str, Option<i64>)> = policy
        .rules()
        .into_iter()
        .filter_map(|(keep, bucket, reason)| match keep {
            None | Some(Keep::Count(0)) => None,
            Some(Keep::Count(n)) => Some((Some(n), bucket, reason, None)),
            Some(Keep::Unlimited) => Some((None, bucket, reason, None)),
        })
        .collect();
    let oldest = snaps.len().saturating_sub(1);
    snaps
        .into_iter()
        .enumerate()
        .map(|(nr, meta)| {
            let mut reasons = Vec::new();
            for (left, bucket, reason, last) in rules.iter_mut() {
                if *left == Some(0) {
                    continue;
                }
                let val = bucket_of(*bucket, seconds(&meta), nr);
                let new_bucket = *last != Some(val);
                if new_bucket || nr == oldest {
                    *last = Some(val);
                    if let Some(n) = left {
                        *n -= 1;
                    }
                    reasons.push(match new_bucket {
                        true => reason.to_string(),
                        false => format!("oldest {reason}"),
                    });
                }
            }
            Decision { meta, reasons }
        })
        .collect()
}

/// What prune did, or would do (`dry_run`).
#[derive(Debug, Default)]
pub struct PruneReport {
    /// Every snapshot of the volume the policy judged, newest first.
    pub decisions: Vec<Decision>,
    /// Snapshots kept whatever the policy says: each with why.
    pub held: Vec<(SnapshotMeta, String)>,
    /// What deleting each removed snapshot did.
    pub deleted: Vec<(SnapshotMeta, Deleted)>,
    /// Snapshots the policy removes that could not be deleted.
    pub failed: Vec<(SnapshotMeta, Error)>,
    /// The caller's encrypted snapshots whose source could not be read
    /// (their key is not at hand): not judged, so kept.
    pub sealed: usize,
}

/// Applies `policy` to `caller`'s snapshots of `source` and deletes (or
/// bins) the ones it does not keep, unless `dry_run`.
pub fn prune(
    region: &Region,
    caller: &AccountId,
    source: &str,
    policy: &KeepPolicy,
    dry_run: bool,
    now: SystemTime,
) -> Result<PruneReport> {
    if policy.is_empty() {
        return Err(Error::InvalidArgument(
            "no --keep-* option keeps anything: prune refuses to delete every snapshot of a \
             volume (delete them one by one with `blocksnap snapshot delete`)"
                .into(),
        ));
    }
    let listing = region.list_snapshots()?;
    if let Some(e) = listing.damaged.into_iter().next() {
        // An unreadable manifest may be of this volume: its place in the
        // buckets is unknown.
        return Err(e);
    }
    let images = images::list(region)?;
    if let Some(e) = images.damaged.into_iter().next() {
        return Err(e);
    }
    let mut report = PruneReport::default();
    let mut judged = Vec::new();
    for meta in listing.snapshots {
        if &meta.owner != caller {
            continue;
        }
        if meta.sealed {
            report.sealed += 1;
            continue;
        }
        if meta.source != source {
            continue;
        }
        let users: Vec<ImageId> = users_of(&images.images, &meta.id);
        match users.first() {
            Some(image) => report
                .held
                .push((meta, format!("it backs registered image {image}"))),
            None => judged.push(meta),
        }
    }
    report.decisions = plan(judged, policy);
    if dry_run {
        return Ok(report);
    }
    for d in &report.decisions {
        if d.keep() {
            continue;
        }
        match delete_at(region, &d.meta.id, caller, now) {
            Ok(done) => report.deleted.push((d.meta.clone(), done)),
            Err(e) => report.failed.push((d.meta.clone(), e)),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_and_iso_weeks_match_the_calendar() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2019, 9, 1), 18_140);
        assert_eq!(civil_date(18_140), (2019, 9, 1));
        for d in [-1000, 0, 11_016, 18_140, 20_000, 60_000] {
            let (y, m, dd) = civil_date(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        // 2019-09-01 was a Sunday: ISO week 35 of 2019.
        assert_eq!(iso_week(days_from_civil(2019, 9, 1)), (2019, 35));
        // 2021-01-03 (Sunday) is in week 53 of 2020; 2024-12-30 in week 1 of 2025.
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
        assert_eq!(iso_week(days_from_civil(2024, 12, 30)), (2025, 1));
    }
}
