//! When a policy runs: every N minutes, hours or days (slots counted from
//! the Unix epoch, so `1d` is midnight UTC and `6h` is 00:00, 06:00…), or
//! a cron expression (`M H DOM MON DOW`, UTC, with `*`, lists, ranges and
//! steps; where both day fields are restricted, either matching is
//! enough, as in cron).
//!
//! A policy's work for a slot is done once; a slot missed (the machine was
//! off) is not made up for slot by slot: the next run does the newest one.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

const MINUTE: u64 = 60;
/// The longest interval: a year (leap or not).
const MAX_INTERVAL: u64 = 366 * 86_400;
/// How far a cron search looks, back or ahead: long enough for any
/// expression that ever matches (29 February comes within 8 years).
const CRON_HORIZON: u64 = 8 * 366 * 24 * 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every(Duration),
    Cron(Cron),
}

/// A parsed cron expression: the allowed values of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    days_any: bool,
    weekdays_any: bool,
}

fn bad(s: &str, why: &str) -> Error {
    Error::InvalidArgument(format!(
        "schedule {s:?} is not valid: {why}; give an interval (30m, 1h, 12h, 1d) or a cron \
         expression (\"0 3 * * *\", \"cron(*/15 * * * *)\"), in UTC"
    ))
}

/// Parses one cron field into the allowed values `lo..=hi`.
fn field(spec: &str, lo: u32, hi: u32, whole: &str) -> Result<Vec<bool>> {
    let mut allowed = vec![false; hi as usize + 1];
    for part in spec.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad(whole, &format!("step {s:?} is not a positive number")))?,
            ),
            None => (part, 1),
        };
        let num = |v: &str| {
            v.parse::<u32>()
                .ok()
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| bad(whole, &format!("{v:?} is not a number from {lo} to {hi}")))
        };
        let (from, to) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None if part.contains('/') => (num(r)?, hi),
                None => {
                    let n = num(r)?;
                    (n, n)
                }
            },
        };
        if from > to {
            return Err(bad(whole, &format!("range {range:?} runs backwards")));
        }
        for v in (from..=to).step_by(step as usize) {
            allowed[v as usize] = true;
        }
    }
    Ok(allowed)
}

impl FromStr for Schedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Schedule> {
        let t = s.trim();
        let cron = t
            .strip_prefix("cron(")
            .and_then(|r| r.strip_suffix(')'))
            .or_else(|| (t.split_whitespace().count() == 5).then_some(t));
        if let Some(expr) = cron {
            let f: Vec<&str> = expr.split_whitespace().collect();
            if f.len() != 5 {
                return Err(bad(s, "a cron expression has five fields: M H DOM MON DOW"));
            }
            let mut weekdays = field(f[4], 0, 7, s)?;
            // 7 is Sunday too.
            weekdays[0] |= weekdays[7];
            weekdays.truncate(7);
            return Ok(Schedule::Cron(Cron {
                minutes: field(f[0], 0, 59, s)?,
                hours: field(f[1], 0, 23, s)?,
                days: field(f[2], 1, 31, s)?,
                months: field(f[3], 1, 12, s)?,
                weekdays,
                days_any: f[2] == "*",
                weekdays_any: f[4] == "*",
            }));
        }
        let d = humantime::parse_duration(t).map_err(|e| bad(s, &e.to_string()))?;
        if d.as_secs() < MINUTE || !d.as_secs().is_multiple_of(MINUTE) || d.subsec_nanos() != 0 {
            return Err(bad(s, "an interval is whole minutes, at least one"));
        }
        if d.as_secs() > MAX_INTERVAL {
            return Err(bad(
                s,
                "an interval is at most 366d (a cron expression says more)",
            ));
        }
        Ok(Schedule::Every(d))
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

impl Cron {
    /// Whether the minute starting `secs` after the epoch matches.
    fn matches(&self, secs: u64) -> bool {
        let days = (secs / 86_400) as i64;
        let in_day = secs % 86_400;
        let (_, month, day) = crate::ops::prune::civil_date(days);
        let weekday = (days + 4).rem_euclid(7) as usize; // Sunday is 0
        let day_ok = match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (false, true) => self.days[day as usize],
            (true, false) => self.weekdays[weekday],
            (false, false) => self.days[day as usize] || self.weekdays[weekday],
        };
        day_ok
            && self.months[month as usize]
            && self.hours[(in_day / 3600) as usize]
            && self.minutes[((in_day % 3600) / 60) as usize]
    }
}

impl Schedule {
    /// The newest scheduled time at or before `now`.
    pub fn latest_slot(&self, now: SystemTime) -> Option<SystemTime> {
        let secs = epoch_secs(now);
        match self {
            Schedule::Every(d) => Some(at(secs - secs % d.as_secs())),
            Schedule::Cron(c) => {
                let start = secs - secs % MINUTE;
                (0..CRON_HORIZON)
                    .map(|i| start.checked_sub(i * MINUTE))
                    .take_while(Option::is_some)
                    .flatten()
                    .find(|&t| c.matches(t))
                    .map(at)
            }
        }
    }

    /// The first scheduled time after `t`.
    pub fn next_slot(&self, t: SystemTime) -> Option<SystemTime> {
        let secs = epoch_secs(t);
        match self {
            Schedule::Every(d) => Some(at(secs - secs % d.as_secs() + d.as_secs())),
            Schedule::Cron(c) => {
                let start = secs - secs % MINUTE + MINUTE;
                (0..CRON_HORIZON)
                    .map(|i| start + i * MINUTE)
                    .find(|&t| c.matches(t))
                    .map(at)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn intervals_fall_on_epoch_aligned_slots() {
        let s: Schedule = "1h".parse().unwrap();
        assert_eq!(
            s.latest_slot(t("2026-11-27T10:42:13Z")),
            Some(t("2026-11-27T10:00:00Z"))
        );
        assert_eq!(
            s.next_slot(t("2026-11-27T10:00:00Z")),
            Some(t("2026-11-27T11:00:00Z"))
        );
        let d: Schedule = "1d".parse().unwrap();
        assert_eq!(
            d.latest_slot(t("2026-11-27T23:59:59Z")),
            Some(t("2026-11-27T00:00:00Z"))
        );
        for bad in [
            "0s",
            "30s",
            "90s",
            "367d",
            "soon",
            "cron(* * *)",
            "61 * * * *",
        ] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cron_expressions_match_as_cron_does() {
        let s: Schedule = "cron(30 3 * * *)".parse().unwrap();
        assert_eq!(
            s.latest_slot(t("2026-11-27T03:29:59Z")),
            Some(t("2026-11-26T03:30:00Z"))
        );
        assert_eq!(
            s.next_slot(t("2026-11-27T03:29:59Z")),
            Some(t("2026-11-27T03:30:00Z"))
        );
        // Every 15 minutes on weekdays: 2026-11-28 is a Saturday.
        let w: Schedule = "*/15 * * * 1-5".parse().unwrap();
        assert_eq!(
            w.next_slot(t("2026-11-27T23:50:00Z")),
            Some(t("2026-11-30T00:00:00Z"))
        );
        // Day of month OR day of week when both are given: the 1st, or Sundays.
        let either: Schedule = "0 0 1 * 0".parse().unwrap();
        assert_eq!(
            either.next_slot(t("2026-11-27T00:00:00Z")),
            Some(t("2026-11-29T00:00:00Z"))
        );
        assert_eq!(
            either.next_slot(t("2026-11-29T00:00:00Z")),
            Some(t("2026-12-01T00:00:00Z"))
        );
        // 29 February, found years ahead.
        let leap: Schedule = "0 12 29 2 *".parse().unwrap();
        assert_eq!(
            leap.next_slot(t("2026-11-27T00:00:00Z")),
            Some(t("2028-02-29T12:00:00Z"))
        );
        // Never: 31 February.
        let never: Schedule = "0 0 31 2 *".parse().unwrap();
        assert_eq!(never.latest_slot(t("2026-11-27T00:00:00Z")), None);
    }
}
