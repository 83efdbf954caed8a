//! `policy`: lifecycle policies (EBS Data Lifecycle Manager) and
//! `policy run`, which cron or a systemd timer calls every minute.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use blocksnap::format::lifecycle::{
    CrossRegionCopy, Policy, PolicyRun, PolicyState, PolicyStatus, PolicyTarget, Retain,
};
use blocksnap::lifecycle::policy::{self, PolicySpec, RunContext, next_due};
use blocksnap::{AccountId, Error, Region};

use crate::cli::output::Out;
use crate::cli::parse::{parse_duration, parse_tag};

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Create a policy: snapshots (or images) on a schedule, kept by count or age [CreateLifecyclePolicy]
    Create {
        #[arg(long)]
        name: String,
        /// A volume to snapshot (repeatable)
        #[arg(long = "volume", value_name = "PATH")]
        volumes: Vec<PathBuf>,
        /// An instance directory to make images of (repeatable; needs --create-image)
        #[arg(long = "instance", value_name = "DIR")]
        instances: Vec<PathBuf>,
        /// 30m, 1h, 12h, 1d (from midnight UTC), or a cron expression in UTC ("0 3 * * *")
        #[arg(long, value_name = "INTERVAL|CRON")]
        every: String,
        /// Keep the newest N of what it made, per target
        #[arg(long, value_name = "N", conflicts_with = "retain_age")]
        retain_count: Option<u32>,
        /// Keep what it made for this long (e.g. 14d); always the newest
        #[arg(long, value_name = "AGE")]
        retain_age: Option<String>,
        /// Make an image (AMI) of each target instead of bare snapshots
        #[arg(long)]
        create_image: bool,
        /// Image names: PREFIX-<UTC time> [default: the policy's name]
        #[arg(long, value_name = "PREFIX")]
        image_name_prefix: Option<String>,
        /// Copy what it makes to this region
        #[arg(long, value_name = "REGION")]
        copy_to_region: Option<String>,
        /// Keep the newest N copies there
        #[arg(long, value_name = "N", requires = "copy_to_region")]
        copy_retain_count: Option<u32>,
        /// Tag what it makes with KEY=VALUE (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// List your policies [GetLifecyclePolicies]
    List,
    /// Show a policy, its last run and when it is next due [GetLifecyclePolicy]
    Describe { policy: String },
    /// Start running a policy again [UpdateLifecyclePolicy --state ENABLED]
    Enable { policy: String },
    /// Stop running a policy; what it made stays [UpdateLifecyclePolicy --state DISABLED]
    Disable { policy: String },
    /// Delete a policy; what it made stays [DeleteLifecyclePolicy]
    Delete { policy: String },
    /// Do whatever your policies have due now (call it every minute from cron)
    Run {
        /// Only this policy (name or id)
        #[arg(long, value_name = "NAME|ID")]
        policy: Option<String>,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

fn absolute(p: &Path) -> String {
    blocksnap::volume::io::source_path(p)
}

fn retain_json(r: &Retain) -> Value {
    match r {
        Retain::Count(n) => json!({"Count": n}),
        Retain::AgeSeconds(s) => json!({"Interval": s / 3600, "IntervalUnit": "HOURS"}),
    }
}

fn run_json(r: &PolicyRun) -> Value {
    json!({
        "Slot": r.slot,
        "Started": r.started,
        "Finished": r.finished,
        "Outcome": r.outcome,
        "Targets": r.targets.iter().map(|t| json!({
            "Target": t.target.path(),
            "Outcome": t.outcome,
            "Created": t.created,
            "Deleted": t.deleted,
            "Error": t.error,
        })).collect::<Vec<_>>(),
    })
}

fn when(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn policy_json(p: &Policy, state: &PolicyState, now: SystemTime) -> Result<Value> {
    let targets = |instance: bool| {
        p.targets
            .iter()
            .filter(|t| matches!(t, PolicyTarget::Instance(_)) == instance)
            .map(|t| t.path().to_string())
            .collect::<Vec<_>>()
    };
    Ok(json!({
        "PolicyId": p.policy_id.as_str(),
        "Description": p.name,
        "State": match p.state { PolicyStatus::Enabled => "ENABLED", PolicyStatus::Disabled => "DISABLED" },
        "OwnerId": p.owner_id.as_str(),
        "DateCreated": p.date_created,
        "PolicyDetails": {
            "PolicyType": if p.create_image { "IMAGE_MANAGEMENT" } else { "EBS_SNAPSHOT_MANAGEMENT" },
            "Volumes": targets(false),
            "Instances": targets(true),
            "Schedules": [{
                "Name": p.name,
                "CreateRule": {"Schedule": p.schedule},
                "RetainRule": retain_json(&p.retain),
                "TagsToAdd": p.tags,
                "ImageNamePrefix": p.image_name_prefix,
                "CrossRegionCopyRules": p.copy.iter().map(|c| json!({"TargetRegion": c.target_region, "RetainRule": {"Count": c.retain_count}})).collect::<Vec<_>>(),
            }],
        },
        "LastRun": state.last_run.as_ref().map(run_json),
        "NextDue": when(next_due(p, state, now)?),
    }))
}

fn print_run_text(name: &str, r: &PolicyRun) {
    println!("{name}: run for {} {}", r.slot, r.outcome);
    for t in &r.targets {
        let made = match t.created.is_empty() {
            true => "nothing new".to_string(),
            false => format!("made {}", t.created.join(", ")),
        };
        let gone = match t.deleted.is_empty() {
            true => String::new(),
            false => format!("; retired {}", t.deleted.join(", ")),
        };
        match &t.error {
            Some(e) => println!("  {}: failed: {e}", t.target),
            None => println!("  {}: {made}{gone}", t.target),
        }
    }
}

fn describe(out: &Out, p: &Policy, state: &PolicyState, now: SystemTime) -> Result<()> {
    if out.json {
        out.print(policy_json(p, state, now)?);
        return Ok(());
    }
    let retain = match &p.retain {
        Retain::Count(n) => format!("the newest {n}"),
        Retain::AgeSeconds(s) => format!(
            "what is under {} old (and the newest)",
            blocksnap::ops::recycle::days_or_hours(*s)
        ),
    };
    println!(
        "{}  {}  {}  every {}  keeps {retain}{}",
        p.policy_id,
        p.name,
        match p.state {
            PolicyStatus::Enabled => "enabled",
            PolicyStatus::Disabled => "disabled",
        },
        p.schedule,
        if p.create_image { "  images" } else { "" }
    );
    for t in &p.targets {
        println!("  target: {t}");
    }
    if let Some(c) = &p.copy {
        println!(
            "  copies to region {}, keeps the newest {}",
            c.target_region, c.retain_count
        );
    }
    match &state.last_run {
        Some(r) => print_run_text("  last run", r),
        None => println!("  not run yet"),
    }
    match next_due(p, state, now)? {
        Some(t) => println!("  next due: {}", humantime::format_rfc3339_seconds(t)),
        None => println!("  next due: never (disabled)"),
    }
    Ok(())
}

pub fn run(
    root: &Path,
    region: &Arc<Region>,
    out: &Out,
    caller: &AccountId,
    cmd: PolicyCmd,
) -> Result<u8> {
    let now = SystemTime::now();
    match cmd {
        PolicyCmd::Create {
            name,
            volumes,
            instances,
            every,
            retain_count,
            retain_age,
            create_image,
            image_name_prefix,
            copy_to_region,
            copy_retain_count,
            tags,
        } => {
            let retain = match (retain_count, retain_age) {
                (Some(n), _) => Retain::Count(n),
                (None, Some(a)) => {
                    Retain::AgeSeconds(parse_duration(&a, "--retain-age")?.as_secs())
                }
                (None, None) => {
                    return Err(Error::InvalidArgument(
                        "say what the policy keeps: --retain-count N or --retain-age AGE".into(),
                    )
                    .into());
                }
            };
            let mut targets: Vec<PolicyTarget> = volumes
                .iter()
                .map(|v| PolicyTarget::Volume(absolute(v)))
                .collect();
            targets.extend(
                instances
                    .iter()
                    .map(|d| PolicyTarget::Instance(absolute(d))),
            );
            let copy = copy_to_region.map(|r| CrossRegionCopy {
                target_region: r,
                retain_count: copy_retain_count.unwrap_or(1),
            });
            let spec = PolicySpec {
                name,
                targets,
                schedule: every,
                retain,
                create_image,
                image_name_prefix,
                copy,
                tags: tags.iter().map(|t| parse_tag(t)).collect::<Result<_>>()?,
            };
            let p = policy::create(region, root, caller, &spec, now)?;
            describe(out, &p, &PolicyState::default(), now)?;
            Ok(0)
        }
        PolicyCmd::List => {
            let all = policy::list(region, caller)?;
            if out.json {
                let docs = all
                    .iter()
                    .map(|(p, s)| policy_json(p, s, now))
                    .collect::<Result<Vec<_>>>()?;
                out.print(json!({"Policies": docs}));
            } else if all.is_empty() {
                println!("no policies");
            } else {
                for (p, s) in &all {
                    describe(out, p, s, now)?;
                }
            }
            Ok(0)
        }
        PolicyCmd::Describe { policy: name } => {
            let p = policy::find(region, caller, &name)?;
            let s = policy::read_state(region, &p.policy_id)?;
            describe(out, &p, &s, now)?;
            Ok(0)
        }
        PolicyCmd::Enable { policy: name } => {
            let p = policy::set_enabled(region, caller, &name, true)?;
            describe(out, &p, &policy::read_state(region, &p.policy_id)?, now)?;
            Ok(0)
        }
        PolicyCmd::Disable { policy: name } => {
            let p = policy::set_enabled(region, caller, &name, false)?;
            describe(out, &p, &policy::read_state(region, &p.policy_id)?, now)?;
            Ok(0)
        }
        PolicyCmd::Delete { policy: name } => {
            let p = policy::delete(region, caller, &name)?;
            if out.json {
                out.print(json!({"PolicyId": p.policy_id.as_str(), "Deleted": true}));
            } else {
                println!(
                    "policy {} ({}) deleted; what it made stays",
                    p.policy_id, p.name
                );
            }
            Ok(0)
        }
        PolicyCmd::Run {
            policy: only,
            threads,
        } => {
            let bar = out.progress();
            let ctx = RunContext {
                region,
                store_root: root,
                caller,
                threads,
                now,
                progress: &bar,
            };
            let report = policy::run(&ctx, only.as_deref())?;
            bar.done();
            if out.json {
                out.print(json!({
                    "Ran": report.ran.iter().map(|(p, r)| json!({"PolicyId": p.policy_id.as_str(), "Name": p.name, "Run": run_json(r)})).collect::<Vec<_>>(),
                    "Idle": report.idle.iter().map(|(p, next)| json!({"PolicyId": p.policy_id.as_str(), "Name": p.name, "NextDue": when(*next)})).collect::<Vec<_>>(),
                    "Busy": report.busy,
                }));
            } else {
                if let Some(holder) = report.busy.as_ref().filter(|_| !out.quiet()) {
                    eprintln!(
                        "blocksnap: note: another policy run is at work ({holder}); it does what is due"
                    );
                }
                // Quiet (cron): only what failed, so mail means trouble.
                for (p, r) in &report.ran {
                    if !out.quiet() || r.outcome != "succeeded" {
                        print_run_text(&p.name, r);
                    }
                }
                if !out.quiet() {
                    for (p, next) in &report.idle {
                        if let Some(t) = when(*next) {
                            println!("{}: nothing due; next at {t}", p.name);
                        }
                    }
                }
            }
            Ok(if report.failed() { 1 } else { 0 })
        }
    }
}
