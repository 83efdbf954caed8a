//! `recycle-bin`: retention rules, and what they keep (AWS Recycle Bin).

use std::time::SystemTime;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use blocksnap::format::lifecycle::{BinEntry, ResourceType, RetentionRule};
use blocksnap::ops::recycle::{self, RuleSpec, days_or_hours, lock_state};
use blocksnap::{AccountId, Error, Region};

use crate::cli::output::{Out, bin_entry_json};
use crate::cli::parse::{parse_duration, parse_tag};

#[derive(Subcommand, Debug)]
pub enum RecycleBinCmd {
    /// Retention rules: which deleted snapshots or deregistered images are kept, and how long
    #[command(subcommand)]
    Rule(RuleCmd),
    /// Your snapshots and images in the recycle bin [ListSnapshotsInRecycleBin, ListImagesInRecycleBin]
    List,
}

#[derive(Subcommand, Debug)]
pub enum RuleCmd {
    /// Create a retention rule [CreateRule]
    Create {
        /// What the rule keeps: snapshot or image
        #[arg(long, value_name = "snapshot|image")]
        resource: String,
        /// How long a deleted object is kept: whole hours or days, 1h to 365d (e.g. 7d)
        #[arg(long, value_name = "DURATION")]
        retain: String,
        /// Keep only objects with this tag (repeatable; any one matches; KEY= matches any value)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Lock the rule at once; unlocking then takes this long (7d to 30d)
        #[arg(long, value_name = "UNLOCK_DELAY")]
        lock: Option<String>,
    },
    /// List your retention rules [ListRules]
    List,
    /// Change a rule's retention; a locked rule's may only grow [UpdateRule]
    Update {
        rule: String,
        #[arg(long, value_name = "DURATION")]
        retain: String,
    },
    /// Lock a rule: it cannot be deleted nor its retention shortened [LockRule]
    Lock {
        rule: String,
        /// How long unlocking takes (7d to 30d)
        #[arg(long, value_name = "DURATION")]
        unlock_delay: String,
    },
    /// Start a locked rule's unlock delay [UnlockRule]
    Unlock { rule: String },
    /// Delete an unlocked rule; what it keeps stays until its time [DeleteRule]
    Delete { rule: String },
}

fn resource(s: &str) -> Result<ResourceType> {
    match s {
        "snapshot" | "EBS_SNAPSHOT" => Ok(ResourceType::EbsSnapshot),
        "image" | "EC2_IMAGE" => Ok(ResourceType::Ec2Image),
        other => Err(Error::InvalidArgument(format!(
            "--resource {other:?}: give snapshot or image"
        ))
        .into()),
    }
}

/// AWS's `RetentionPeriod` of `seconds`: in days where whole.
fn period(seconds: u64) -> Value {
    if seconds.is_multiple_of(86_400) {
        json!({"RetentionPeriodValue": seconds / 86_400, "RetentionPeriodUnit": "DAYS"})
    } else {
        json!({"RetentionPeriodValue": seconds / 3600, "RetentionPeriodUnit": "HOURS"})
    }
}

fn rule_json(r: &RetentionRule, now: SystemTime) -> Value {
    let mut doc = json!({
        "Identifier": r.identifier.as_str(),
        "ResourceType": serde_json::to_value(r.resource_type).expect("serializes"),
        "RetentionPeriod": period(r.retention_seconds),
        "ResourceTags": r.resource_tags.iter().map(|t| json!({"ResourceTagKey": t.key, "ResourceTagValue": t.value})).collect::<Vec<_>>(),
        "Description": r.description,
        "Status": "available",
        "LockState": lock_state(r, now),
        "OwnerId": r.owner_id.as_str(),
    });
    if let Some(l) = &r.lock {
        doc["LockConfiguration"] = json!({"UnlockDelay": {"UnlockDelayValue": l.unlock_delay_seconds / 86_400, "UnlockDelayUnit": "DAYS"}});
        if let Some(t) = &l.unlock_at {
            doc["LockEndTime"] = json!(t);
        }
    }
    doc
}

fn print_rule(out: &Out, r: &RetentionRule, now: SystemTime) {
    if out.json {
        return out.print(rule_json(r, now));
    }
    let tags = match r.resource_tags.is_empty() {
        true => "all of them".to_string(),
        false => r
            .resource_tags
            .iter()
            .map(|t| format!("{}={}", t.key, t.value))
            .collect::<Vec<_>>()
            .join(", "),
    };
    println!(
        "{}  {}s ({tags}) kept {} after deletion  {}{}",
        r.identifier,
        r.resource_type.noun(),
        days_or_hours(r.retention_seconds),
        lock_state(r, now),
        r.lock
            .as_ref()
            .and_then(|l| l.unlock_at.as_ref())
            .map(|t| format!(" (until {t})"))
            .unwrap_or_default()
    );
}

pub fn restored_from_bin(out: &Out, e: &BinEntry) {
    if out.json {
        return out.print(json!({"Return": true, "Restored": bin_entry_json(e)}));
    }
    println!(
        "{} {} restored from the recycle bin",
        e.resource_type.noun(),
        e.id
    );
}

pub fn run(region: &Region, out: &Out, caller: &AccountId, cmd: RecycleBinCmd) -> Result<u8> {
    let now = SystemTime::now();
    match cmd {
        RecycleBinCmd::List => {
            let entries = recycle::list_binned(region, caller)?;
            if out.json {
                let snaps: Vec<Value> = entries
                    .iter()
                    .filter(|e| e.resource_type == ResourceType::EbsSnapshot)
                    .map(bin_entry_json)
                    .collect();
                let imgs: Vec<Value> = entries
                    .iter()
                    .filter(|e| e.resource_type == ResourceType::Ec2Image)
                    .map(bin_entry_json)
                    .collect();
                out.print(json!({"Snapshots": snaps, "Images": imgs}));
            } else if entries.is_empty() {
                println!("the recycle bin is empty");
            } else {
                for e in &entries {
                    println!(
                        "{}  {}  deleted {}  kept until {}  (rule {})",
                        e.id,
                        e.resource_type.noun(),
                        e.recycle_bin_enter_time,
                        e.recycle_bin_exit_time,
                        e.rule
                    );
                }
            }
            Ok(0)
        }
        RecycleBinCmd::Rule(cmd) => run_rule(region, out, caller, cmd, now),
    }
}

fn run_rule(
    region: &Region,
    out: &Out,
    caller: &AccountId,
    cmd: RuleCmd,
    now: SystemTime,
) -> Result<u8> {
    let parse_rule = |s: &str| -> Result<blocksnap::id::RuleId> { Ok(s.parse()?) };
    match cmd {
        RuleCmd::Create {
            resource: r,
            retain,
            tags,
            description,
            lock,
        } => {
            let spec = RuleSpec {
                resource_type: resource(&r)?,
                retention: parse_duration(&retain, "--retain")?,
                tags: tags.iter().map(|t| parse_tag(t)).collect::<Result<_>>()?,
                description,
                lock: lock.map(|l| parse_duration(&l, "--lock")).transpose()?,
            };
            let rule = recycle::create_rule(region, caller, &spec, now)?;
            print_rule(out, &rule, now);
        }
        RuleCmd::List => {
            let rules = recycle::list_rules(region, caller)?;
            if out.json {
                out.print(
                    json!({"Rules": rules.iter().map(|r| rule_json(r, now)).collect::<Vec<_>>()}),
                );
            } else if rules.is_empty() {
                println!("no retention rules: deletions are final");
            } else {
                for r in &rules {
                    print_rule(out, r, now);
                }
            }
        }
        RuleCmd::Update { rule, retain } => {
            let d = parse_duration(&retain, "--retain")?;
            let r = recycle::update_rule(region, caller, &parse_rule(&rule)?, d, now)?;
            print_rule(out, &r, now);
        }
        RuleCmd::Lock { rule, unlock_delay } => {
            let d = parse_duration(&unlock_delay, "--unlock-delay")?;
            let r = recycle::lock_rule(region, caller, &parse_rule(&rule)?, d, now)?;
            print_rule(out, &r, now);
        }
        RuleCmd::Unlock { rule } => {
            let r = recycle::unlock_rule(region, caller, &parse_rule(&rule)?, now)?;
            print_rule(out, &r, now);
        }
        RuleCmd::Delete { rule } => {
            let id = parse_rule(&rule)?;
            recycle::delete_rule(region, caller, &id, now)?;
            if out.json {
                out.print(json!({"Identifier": id.as_str(), "Deleted": true}));
            } else {
                println!("rule {id} deleted");
            }
        }
    }
    Ok(0)
}
