//! Lifecycle: policies on a schedule with retention and copies, prune's
//! buckets, and the recycle bin. Time-dependent behaviour runs through the
//! library with its clock given (`now`), never by sleeping; the command
//! line is driven where the system clock serves.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blocksnap::error::Error;
use blocksnap::format::lifecycle::{Policy, PolicyTarget, ResourceType, Retain};
use blocksnap::format::manifest::{SnapshotMeta, Tag};
use blocksnap::lifecycle::policy::{self, POLICY_TAG, PolicySpec, RunContext, SLOT_TAG};
use blocksnap::ops::access::{self, Deleted};
use blocksnap::ops::gc::gc_at;
use blocksnap::ops::prune::{Keep, KeepPolicy, plan};
use blocksnap::ops::recycle::{self, RuleSpec};
use blocksnap::ops::restore::{self, RestoreOptions};
use blocksnap::ops::snapshot::{self, CreateOptions};
use blocksnap::progress::NoProgress;
use blocksnap::{AccountId, Region, SnapshotId};

use crate::util::{Env, assert_fsck_clean, assert_same, id, s, sh_ok};

const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

fn t(rfc3339: &str) -> SystemTime {
    humantime::parse_rfc3339(rfc3339).unwrap()
}

/// A small ext4 volume at `path` holding a few random files.
fn ext4_volume(path: &Path, seed: u64) {
    let dir = path.with_extension("d");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..4 {
        fs::write(
            dir.join(format!("f{i}")),
            crate::util::random_bytes(seed * 10 + i, 300_000),
        )
        .unwrap();
    }
    sh_ok(&format!("mkfs.ext4 -q -F -d {} {} 16M", s(&dir), s(path)));
}

/// One ext4 volume (`disk.img`, files from `seed`) in the local region:
/// the region, its owner and the volume as a policy target.
struct World {
    vol: std::path::PathBuf,
    region: Arc<Region>,
    me: AccountId,
    target: PolicyTarget,
}

impl World {
    /// Policy `sp` of the volume's owner, created at `at`.
    fn policy(&self, env: &Env, sp: &PolicySpec, at: SystemTime) -> Policy {
        policy::create(&self.region, &env.store(), &self.me, sp, at).unwrap()
    }
}

fn world(env: &Env, seed: u64) -> World {
    let vol = env.path("disk.img");
    ext4_volume(&vol, seed);
    let region = open(env, "local");
    let me = region.info().owner.clone();
    let target = PolicyTarget::Volume(blocksnap::volume::io::source_path(&vol));
    World {
        vol,
        region,
        me,
        target,
    }
}

/// A world (seed `seed`) with an hourly policy `name` keeping `keep`,
/// created at 00:30 on 2 November 2026 (returned).
fn hourly_world(env: &Env, seed: u64, name: &str, keep: u32) -> (World, Policy, SystemTime) {
    let w = world(env, seed);
    let t0 = t("2026-11-02T00:30:00Z");
    let sp = spec(name, vec![w.target.clone()], "1h", Retain::Count(keep));
    let p = w.policy(env, &sp, t0);
    (w, p, t0)
}

/// Restores `snap` of `region` to a new file and checks it is `vol`, byte
/// for byte, and a clean ext4.
fn restores_as(env: &Env, region: &Region, snap: &SnapshotId, vol: &Path) {
    let out = env.path("restored-check.img");
    let _ = fs::remove_file(&out);
    restore::restore(region, snap, &out, &RestoreOptions::default(), &NoProgress).unwrap();
    assert_same(&out, vol);
    assert_fsck_clean(&out);
}

fn open(env: &Env, name: &str) -> Arc<Region> {
    // The library reads no environment: S3 credentials come in as the
    // binary passes them, through the settings.
    let settings = blocksnap::settings::Settings::from_vars(|n| std::env::var(n).ok());
    blocksnap::settings::install(settings.unwrap());
    let region = match name {
        "local" => Region::open_or_create(&env.store(), name),
        _ => Region::open(&env.store(), name),
    };
    Arc::new(region.unwrap())
}

fn spec(name: &str, targets: Vec<PolicyTarget>, every: &str, retain: Retain) -> PolicySpec {
    PolicySpec {
        name: name.into(),
        targets,
        schedule: every.into(),
        retain,
        create_image: false,
        image_name_prefix: None,
        copy: None,
        tags: vec![Tag {
            key: "team".into(),
            value: "db".into(),
        }],
    }
}

fn run_at(
    env: &Env,
    region: &Arc<Region>,
    caller: &AccountId,
    now: SystemTime,
) -> policy::RunReport {
    let ctx = RunContext {
        region,
        store_root: &env.store(),
        caller,
        threads: 1,
        now,
        progress: &NoProgress,
    };
    policy::run(&ctx, None).unwrap()
}

fn tag<'a>(m: &'a SnapshotMeta, key: &str) -> Option<&'a str> {
    m.tags
        .iter()
        .find(|t| t.key == key)
        .map(|t| t.value.as_str())
}

fn of_policy(region: &Region, p: &blocksnap::format::lifecycle::Policy) -> Vec<SnapshotMeta> {
    let mut v: Vec<SnapshotMeta> = region
        .list_snapshots()
        .unwrap()
        .snapshots
        .into_iter()
        .filter(|m| tag(m, POLICY_TAG) == Some(p.policy_id.as_str()))
        .collect();
    v.sort_by(|a, b| tag(a, SLOT_TAG).cmp(&tag(b, SLOT_TAG)));
    v
}

#[test]
fn a_week_of_hourly_runs_keeps_the_newest_24_of_that_policy_and_nothing_of_another() {
    let env = Env::new();
    let (w, hourly, t0) = hourly_world(&env, 1, "hourly", 24);
    let (vol, region, me, target) = (
        w.vol.clone(),
        w.region.clone(),
        w.me.clone(),
        w.target.clone(),
    );
    let daily = w.policy(
        &env,
        &spec("daily", vec![target], "1d", Retain::Count(1000)),
        t0,
    );
    // Made by hand: no policy's to retire.
    let manual = snapshot::create(&region, &vol, &CreateOptions::default(), &NoProgress).unwrap();
    // Created at 00:30: the 00:00 slot predates the policy.
    assert!(run_at(&env, &region, &me, t0).ran.is_empty());
    for h in 1..=168u64 {
        let now = t0 + Duration::from_secs(h * HOUR + 60);
        if h % 24 == 0 {
            // The volume changes now and then.
            fs::write(env.path("disk.d/f0"), crate::util::random_bytes(h, 1000)).unwrap();
        }
        let r = run_at(&env, &region, &me, now);
        assert!(!r.failed(), "{:?}", r.ran);
        // Run again in the same minute: nothing left to do.
        assert!(run_at(&env, &region, &me, now).ran.is_empty());
    }
    let kept = of_policy(&region, &hourly);
    let slots: Vec<&str> = kept.iter().map(|m| tag(m, SLOT_TAG).unwrap()).collect();
    let want: Vec<String> = (145..=168)
        .map(|h| {
            humantime::format_rfc3339_seconds(
                t("2026-11-02T00:00:00Z") + Duration::from_secs(h * HOUR),
            )
            .to_string()
        })
        .collect();
    assert_eq!(slots, want, "exactly the newest 24 hourly slots");
    assert!(kept.iter().all(|m| tag(m, "team") == Some("db")));
    // The daily policy made one a day (03 to 09 November) and lost none.
    let days = of_policy(&region, &daily);
    assert_eq!(days.len(), 7);
    assert_eq!(tag(&days[0], SLOT_TAG), Some("2026-11-03T00:00:00Z"));
    assert!(region.has_snapshot(&manual.id).unwrap());
    // The newest restores byte for byte.
    restores_as(&env, &region, &kept[23].id, &vol);
    let st = policy::read_state(&region, &hourly.policy_id).unwrap();
    assert_eq!(st.completed_slot.as_deref(), Some(want[23].as_str()));
}

fn age_retention_and_copies(env: &Env) {
    let World {
        vol,
        region,
        me,
        target,
    } = world(env, 2);
    let west = open(env, "eu-west-1");
    let mut sp = spec("daily", vec![target], "1d", Retain::AgeSeconds(3 * DAY));
    sp.copy = Some(blocksnap::format::lifecycle::CrossRegionCopy {
        target_region: "eu-west-1".into(),
        retain_count: 2,
    });
    let t0 = t("2026-11-01T12:00:00Z");
    let p = policy::create(&region, &env.store(), &me, &sp, t0).unwrap();
    for d in 1..=6u64 {
        let r = run_at(env, &region, &me, t0 + Duration::from_secs(d * DAY));
        assert!(!r.failed(), "{:?}", r.ran);
    }
    // At 11-07 12:00 the slots of 11-05, 11-06, 11-07 are under three days old.
    let here: Vec<String> = of_policy(&region, &p)
        .iter()
        .map(|m| tag(m, SLOT_TAG).unwrap().to_string())
        .collect();
    assert_eq!(
        here,
        [
            "2026-11-05T00:00:00Z",
            "2026-11-06T00:00:00Z",
            "2026-11-07T00:00:00Z"
        ]
    );
    let there = of_policy(&west, &p);
    assert_eq!(there.len(), 2, "the copies keep their own count");
    assert_eq!(tag(&there[1], SLOT_TAG), Some("2026-11-07T00:00:00Z"));
    restores_as(env, &west, &there[1].id, &vol);
    // Long after, with no runs between: one run does the newest slot, and
    // age retention still keeps the newest.
    let late = t0 + Duration::from_secs(60 * DAY);
    run_at(env, &region, &me, late);
    let here = of_policy(&region, &p);
    assert_eq!(here.len(), 1);
    assert_eq!(tag(&here[0], SLOT_TAG), Some("2026-12-31T00:00:00Z"));
}

on_each_backend!(
    age_retention_and_cross_region_copies_keep_their_own_count,
    age_retention_and_copies
);

/// The images a region holds that policy `p` made, available ones only,
/// oldest slot first.
fn images_of(region: &Region, p: &Policy) -> Vec<blocksnap::region::images::ImageView> {
    let mut v: Vec<_> = blocksnap::region::images::list(region)
        .unwrap()
        .images
        .into_iter()
        .filter(|v| {
            v.state.state == blocksnap::format::image::ImageState::Available
                && v.image
                    .tags
                    .iter()
                    .any(|t| t.key == POLICY_TAG && t.value == p.policy_id.as_str())
        })
        .collect();
    v.sort_by(|a, b| a.image.name.cmp(&b.image.name));
    v
}

#[test]
fn an_image_policy_copies_its_images_and_retires_them_with_their_snapshots() {
    let env = Env::with_test_regions();
    let w = world(&env, 9);
    let west = open(&env, "eu-west-1");
    let mut sp = spec("images", vec![w.target.clone()], "1d", Retain::Count(2));
    sp.create_image = true;
    sp.copy = Some(blocksnap::format::lifecycle::CrossRegionCopy {
        target_region: "eu-west-1".into(),
        retain_count: 1,
    });
    let t0 = t("2026-11-01T12:00:00Z");
    let p = w.policy(&env, &sp, t0);
    for d in 1..=4u64 {
        let r = run_at(&env, &w.region, &w.me, t0 + Duration::from_secs(d * DAY));
        assert!(!r.failed(), "{:?}", r.ran);
    }
    let here = images_of(&w.region, &p);
    let names: Vec<&str> = here.iter().map(|v| v.image.name.as_str()).collect();
    assert_eq!(names, ["images-20261104T0000Z", "images-20261105T0000Z"]);
    // Retired images took their snapshots with them: only the two kept
    // images' snapshots are the policy's.
    assert_eq!(of_policy(&w.region, &p).len(), 2);
    let there = images_of(&west, &p);
    assert_eq!(there.len(), 1, "the copies keep their own count");
    assert_eq!(there[0].image.name, "images-20261105T0000Z");
    let snap = there[0].image.snapshot_ids().next().unwrap().clone();
    restores_as(&env, &west, &snap, &w.vol);
}

#[test]
fn a_missing_target_is_reported_and_the_others_proceed() {
    let env = Env::new();
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    ext4_volume(&a, 3);
    ext4_volume(&b, 4);
    let region = open(&env, "local");
    let me = region.info().owner.clone();
    let targets = [&a, &b]
        .iter()
        .map(|v| PolicyTarget::Volume(blocksnap::volume::io::source_path(v)))
        .collect();
    let t0 = SystemTime::now() - Duration::from_secs(3 * HOUR);
    let p = policy::create(
        &region,
        &env.store(),
        &me,
        &spec("two", targets, "1h", Retain::Count(5)),
        t0,
    )
    .unwrap();
    fs::remove_file(&a).unwrap();
    // The command line, with the system's clock: the current hour is due.
    let out = env.run(&["policy", "run"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed target is a failed run"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("partial"), "{text}");
    assert!(text.contains("a.img: failed"), "{text}");
    let doc = env.json(&["policy", "describe", "two"]);
    let targets = doc["LastRun"]["Targets"].as_array().unwrap();
    assert_eq!(doc["LastRun"]["Outcome"], "partial");
    assert_eq!(targets[0]["Outcome"], "failed");
    assert!(
        targets[0]["Error"].as_str().unwrap().contains("a.img"),
        "{doc}"
    );
    assert_eq!(targets[1]["Outcome"], "succeeded");
    assert_eq!(of_policy(&region, &p).len(), 1);
    // A typo is caught when the policy is made; so are a bad name and a
    // name taken.
    let create = |name: &str, vol: &str, code: i32| {
        let args = ["policy", "create", "--name", name, "--volume", vol];
        env.fails(
            &[&args[..], &["--every", "1h", "--retain-count", "2"]].concat(),
            code,
        )
    };
    let e = create("typo", "nosuch.img", 3);
    assert!(e.contains("nosuch.img"), "{e}");
    create("no/slash", s(&b), 2);
    // A FIFO is refused at once, without being opened.
    let fifo = env.path("fifo");
    sh_ok(&format!("mkfifo {}", s(&fifo)));
    create("fifo", s(&fifo), 2);
    // Sizes past what a clock can count are refused, not wrapped.
    let args = ["policy", "create", "--name", "huge", "--volume", s(&b)];
    env.fails(
        &[&args[..], &["--every", "400d", "--retain-count", "1"]].concat(),
        2,
    );
    env.fails(
        &[&args[..], &["--every", "1d", "--retain-age", "99999999d"]].concat(),
        2,
    );
    create("two", s(&b), 5);
    // Another account: its own policies only.
    env.fails(
        &["--account", "222222222222", "policy", "describe", "two"],
        3,
    );
    let id = p.policy_id.to_string();
    env.fails(&["--account", "222222222222", "policy", "delete", &id], 6);
    env.fails(
        &[
            "--account",
            "222222222222",
            "policy",
            "run",
            "--policy",
            &id,
        ],
        6,
    );
    // The slot is done: running again does nothing until the next one.
    let again = env.ok(&["policy", "run"]);
    assert!(again.contains("nothing due"), "{again}");
}

/// A policy created long enough ago that the system clock's current slot
/// is due, with the command line as the runner.
fn due_image_policy(env: &Env, vol: &Path) -> blocksnap::format::lifecycle::Policy {
    let region = open(env, "local");
    let me = region.info().owner.clone();
    let mut sp = spec(
        "nightly",
        vec![PolicyTarget::Volume(blocksnap::volume::io::source_path(
            vol,
        ))],
        "1h",
        Retain::Count(3),
    );
    sp.create_image = true;
    sp.image_name_prefix = Some("web".into());
    let t0 = SystemTime::now() - Duration::from_secs(3 * HOUR);
    policy::create(&region, &env.store(), &me, &sp, t0).unwrap()
}

#[test]
fn two_runs_at_once_do_the_work_once_and_a_killed_run_is_completed_by_the_next() {
    let env = Env::new();
    let vol = env.path("big.img");
    fs::write(&vol, crate::util::random_bytes(9, 192 << 20)).unwrap();
    let p = due_image_policy(&env, &vol);
    let region = open(&env, "local");

    // Killed while it snapshots: no image, and what it wrote is no snapshot.
    let mut child = env
        .command(&["policy", "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let chunks = env.store().join("local/chunks");
    let started = std::time::Instant::now();
    while fs::read_dir(&chunks).map_or(0, |d| d.count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no chunk written"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let images = env.json(&["image", "list"]);
    assert_eq!(images["Images"].as_array().unwrap().len(), 0, "{images}");

    // Two runs at once: the work is done once.
    let runs: Vec<_> = (0..2)
        .map(|_| {
            env.command(&["policy", "run", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut made = 0;
    for r in runs {
        let o = r.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        made += doc["Ran"].as_array().unwrap().len();
    }
    assert_eq!(made, 1, "one of the two runs did the slot");
    let images = env.json(&["image", "list"]);
    let list = images["Images"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{images}");
    assert!(list[0]["Name"].as_str().unwrap().starts_with("web-"));
    // Every snapshot the policy took backs its image: none left over.
    let snaps = of_policy(&region, &p);
    assert_eq!(snaps.len(), 1);
    let mapped = list[0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(snaps[0].id.as_str(), mapped);
    let out = env.path("restored.img");
    env.ok(&["volume", "restore", &mapped, s(&out)]);
    assert_same(&out, &vol);
}

/// A run cut short after its snapshot was committed but before the state
/// was written: the next run takes that snapshot instead of another.
#[test]
fn a_snapshot_made_for_the_slot_before_a_crash_is_not_made_twice() {
    let env = Env::new();
    let (w, p, _) = hourly_world(&env, 5, "hourly-db", 5);
    let (vol, region, me, target) = (
        w.vol.clone(),
        w.region.clone(),
        w.me.clone(),
        w.target.clone(),
    );
    let mut tags = p.tags.clone();
    for (k, v) in [
        (POLICY_TAG, p.policy_id.as_str()),
        ("blocksnap:lifecycle-target", target.path()),
        (SLOT_TAG, "2026-11-02T01:00:00Z"),
    ] {
        tags.push(Tag {
            key: k.into(),
            value: v.into(),
        });
    }
    let opts = CreateOptions {
        tags,
        ..CreateOptions::default()
    };
    let before = snapshot::create(&region, &vol, &opts, &NoProgress).unwrap();
    let r = run_at(&env, &region, &me, t("2026-11-02T01:05:00Z"));
    assert!(r.ran[0].1.targets[0].created.is_empty(), "{:?}", r.ran);
    let made = of_policy(&region, &p);
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].id, before.id);
}

fn meta_at(template: &SnapshotMeta, secs: u64, n: u64) -> SnapshotMeta {
    let mut m = template.clone();
    m.created_ns = secs * 1_000_000_000;
    m.id = format!("snap-{n:017x}").parse().unwrap();
    m
}

#[test]
fn prune_buckets_match_restics_documented_examples() {
    let env = Env::new();
    let vol = env.path("disk.img");
    fs::write(&vol, vec![1u8; 1 << 20]).unwrap();
    let region = open(&env, "local");
    let one = snapshot::create(&region, &vol, &CreateOptions::default(), &NoProgress).unwrap();

    // restic's "one backup every Sunday for 12 weeks", --keep-daily 4.
    let first = humantime::parse_rfc3339("2019-09-01T11:00:00Z").unwrap();
    let base = first.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let sundays: Vec<SnapshotMeta> = (0..12)
        .map(|w| meta_at(&one, base + w * 7 * DAY, w))
        .collect();
    let daily4 = KeepPolicy {
        daily: Some(Keep::Count(4)),
        ..KeepPolicy::default()
    };
    let d = plan(sundays.clone(), &daily4);
    let kept: Vec<u64> = d
        .iter()
        .filter(|d| d.keep())
        .map(|d| (d.meta.created_ns / 1_000_000_000 - base) / (7 * DAY))
        .collect();
    assert_eq!(kept, vec![11, 10, 9, 8], "the last four Sundays");
    assert!(
        d.iter()
            .filter(|d| d.keep())
            .all(|d| d.reasons == ["daily snapshot"])
    );

    // restic's "one backup every day for 100 years", --keep-daily 7
    // --keep-weekly 5 --keep-monthly 12 --keep-yearly 75: 7 daily, 4 more
    // weekly, 11 or 12 monthly, 74 or 75 yearly.
    let base = 3652 * DAY; // 1980-01-01
    // 100 years ending on a Sunday, as restic's count assumes (the seven
    // dailies then hold exactly one weekly).
    let days = 36_525u64;
    let every_day: Vec<SnapshotMeta> = (0..days)
        .map(|i| meta_at(&one, base + i * DAY + 3 * HOUR, i))
        .collect();
    let p = KeepPolicy {
        daily: Some(Keep::Count(7)),
        weekly: Some(Keep::Count(5)),
        monthly: Some(Keep::Count(12)),
        yearly: Some(Keep::Count(75)),
        ..KeepPolicy::default()
    };
    let d = plan(every_day, &p);
    let only = |r: &str| {
        d.iter()
            .filter(|d| d.reasons.first().map(String::as_str) == Some(r))
            .count()
    };
    assert_eq!(
        d.iter()
            .filter(|d| d.reasons.contains(&"daily snapshot".into()))
            .count(),
        7
    );
    assert_eq!(only("weekly snapshot"), 4, "the 7 dailies hold one weekly");
    assert!((11..=12).contains(&only("monthly snapshot")));
    assert!((74..=75).contains(&only("yearly snapshot")));
    let kept = d.iter().filter(|d| d.keep()).count();
    assert!(
        (7 + 4 + 11 + 74..=7 + 4 + 12 + 75).contains(&kept),
        "{kept}"
    );

    // Counts left when the list runs out keep the oldest too; unlimited
    // keeps one a bucket; an empty policy is refused.
    let three: Vec<SnapshotMeta> = (0..3).map(|i| meta_at(&one, base + i * HOUR, i)).collect();
    let d = plan(
        three.clone(),
        &KeepPolicy {
            daily: Some(Keep::Count(5)),
            ..KeepPolicy::default()
        },
    );
    assert_eq!(d[0].reasons, ["daily snapshot"]);
    assert!(!d[1].keep());
    assert_eq!(d[2].reasons, ["oldest daily snapshot"]);
    let d = plan(
        three,
        &KeepPolicy {
            hourly: Some(Keep::Unlimited),
            ..KeepPolicy::default()
        },
    );
    assert!(d.iter().all(|d| d.keep()));
    let e = blocksnap::ops::prune::prune(
        &region,
        &one.owner,
        &one.source,
        &KeepPolicy::default(),
        true,
        SystemTime::now(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn prune_on_the_command_line_keeps_what_an_image_needs_and_follows_the_bin() {
    let env = Env::new();
    let vol = env.path("disk.img");
    ext4_volume(&vol, 6);
    let snaps: Vec<String> = (0..4)
        .map(|i| {
            fs::write(
                env.path("disk.d/f1"),
                crate::util::random_bytes(100 + i, 4000),
            )
            .unwrap();
            id(&env.snapshot(&vol, &[]))
        })
        .collect();
    // The oldest backs an image: never pruned, never counted.
    env.ok(&[
        "image",
        "register",
        "--name",
        "base",
        "--map",
        &format!("/dev/xvda={}", snaps[0]),
    ]);
    env.ok(&[
        "recycle-bin",
        "rule",
        "create",
        "--resource",
        "snapshot",
        "--retain",
        "2d",
    ]);
    let dry = env.json(&[
        "snapshot",
        "prune",
        "--volume",
        s(&vol),
        "--keep-last",
        "1",
        "--dry-run",
    ]);
    assert_eq!(dry["Held"][0]["SnapshotId"], snaps[0].as_str());
    let outcomes: Vec<&str> = dry["Snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["Outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["kept", "would be removed", "would be removed"]);
    assert_eq!(
        env.json(&["snapshot", "list"])["Snapshots"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let text = env.ok(&["snapshot", "prune", "--volume", s(&vol), "--keep-last", "1"]);
    assert!(text.contains("moved to the recycle bin until"), "{text}");
    let left: Vec<String> = env.json(&["snapshot", "list"])["Snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["SnapshotId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, [snaps[0].clone(), snaps[3].clone()]);
    let bin = env.json(&["recycle-bin", "list"]);
    assert_eq!(bin["Snapshots"].as_array().unwrap().len(), 2);
    env.fails(&["snapshot", "prune", "--volume", s(&vol)], 2);
}

fn recycle_bin_round_trip(env: &Env) {
    let vol = env.path("disk.img");
    ext4_volume(&vol, 7);
    let keep = id(&env.snapshot(&vol, &["--tag", "keep=yes"]));
    let plain = id(&env.snapshot(&vol, &["--no-parent"]));
    // Only tagged snapshots are kept.
    env.ok(&[
        "recycle-bin",
        "rule",
        "create",
        "--resource",
        "snapshot",
        "--retain",
        "7d",
        "--tag",
        "keep=yes",
    ]);
    let d = env.json(&["snapshot", "delete", &plain]);
    assert!(d.get("RecycleBin").is_none(), "{d}");
    let d = env.json(&["snapshot", "delete", &keep]);
    assert_eq!(d["RecycleBin"]["SnapshotId"], keep.as_str(), "{d}");
    let e = env.fails(&["snapshot", "describe", &keep], 3);
    assert!(e.contains("recycle bin"), "{e}");
    env.fails(&["volume", "restore", &keep, s(&env.path("x.img"))], 3);
    // Another account may neither see nor bring it back.
    let other = env.json(&["--account", "222222222222", "recycle-bin", "list"]);
    assert_eq!(other["Snapshots"].as_array().unwrap().len(), 0);
    env.fails(
        &[
            "--account",
            "222222222222",
            "snapshot",
            "restore-from-recycle-bin",
            &keep,
        ],
        6,
    );
    // gc keeps every chunk a binned snapshot needs.
    let gc = env.json(&["store", "gc"]);
    assert_eq!(gc["RecycleBinKept"], 1, "{gc}");
    env.ok(&["snapshot", "restore-from-recycle-bin", &keep]);
    env.fails(&["snapshot", "restore-from-recycle-bin", &keep], 3);
    let out = env.path("restored.img");
    env.ok(&["volume", "restore", &keep, s(&out)]);
    assert_same(&out, &vol);
    assert_fsck_clean(&out);

    // Images: deregistered into the bin, its snapshots held, brought back.
    env.ok(&[
        "recycle-bin",
        "rule",
        "create",
        "--resource",
        "image",
        "--retain",
        "1d",
    ]);
    let ami = env.json(&[
        "image",
        "register",
        "--name",
        "app",
        "--map",
        &format!("/dev/xvda={keep}"),
    ])["ImageId"]
        .as_str()
        .unwrap()
        .to_string();
    let d = env.json(&["image", "deregister", &ami, "--delete-associated-snapshots"]);
    assert_eq!(d["RecycleBin"]["ImageId"], ami.as_str(), "{d}");
    assert_eq!(d["KeptSnapshots"][0]["SnapshotId"], keep.as_str());
    let e = env.fails(&["snapshot", "delete", &keep], 5);
    assert!(e.contains("recycle bin") && e.contains(&ami), "{e}");
    env.fails(&["instance", "launch", &ami, s(&env.path("inst"))], 5);
    env.ok(&["image", "restore-from-recycle-bin", &ami]);
    let desc = env.json(&["image", "describe", &ami]);
    assert_eq!(desc["Images"][0]["State"], "available", "{desc}");
}

on_each_backend!(
    deleted_snapshots_and_images_go_to_the_bin_and_come_back,
    recycle_bin_round_trip
);

#[test]
fn the_bin_is_purged_after_its_retention_and_only_then() {
    let env = Env::new();
    let World {
        vol, region, me, ..
    } = world(&env, 8);
    let snap = snapshot::create(&region, &vol, &CreateOptions::default(), &NoProgress).unwrap();
    let rule = RuleSpec {
        resource_type: ResourceType::EbsSnapshot,
        retention: Duration::from_secs(HOUR),
        tags: Vec::new(),
        description: String::new(),
        lock: None,
    };
    let t0 = SystemTime::now();
    recycle::create_rule(&region, &me, &rule, t0).unwrap();
    let done = access::delete_at(&region, &snap.id, &me, t0).unwrap();
    assert!(matches!(done, Deleted::Binned(_)));
    let chunks = || region.chunks().list_stored().unwrap().len();
    let stored = chunks();
    assert!(stored > 0);
    // store verify checks what a binned snapshot needs: a chunk removed
    // under it is damage.
    let v = blocksnap::ops::check::verify(&region, None, 1, &NoProgress).unwrap();
    assert!(v.is_clean());
    assert_eq!(v.snapshots_checked, 1);
    let victim = region.chunks().list_stored().unwrap()[0].id;
    let bytes = region.chunks().get(&victim).unwrap();
    region.chunks().remove(&victim).unwrap();
    let v = blocksnap::ops::check::verify(&region, None, 1, &NoProgress).unwrap();
    assert!(
        !v.is_clean(),
        "a missing chunk of a binned snapshot is damage"
    );
    region.chunks().put(&victim, &bytes).unwrap();
    let r = gc_at(&region, false, t0 + Duration::from_secs(HOUR - 60)).unwrap();
    assert_eq!(
        (r.binned_kept, r.binned_purged, r.chunks_removed),
        (1, 0, 0)
    );
    assert_eq!(chunks(), stored);
    let r = gc_at(&region, false, t0 + Duration::from_secs(HOUR + 60)).unwrap();
    assert_eq!((r.binned_kept, r.binned_purged), (0, 1));
    assert_eq!(r.chunks_removed as usize, stored);
    let e = recycle::restore_snapshot(&region, &snap.id, &me).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert!(
        fs::read_dir(env.store().join("local/recycle-bin/snapshots"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn a_locked_rule_cannot_be_deleted_or_shortened_until_its_unlock_delay_ends() {
    let env = Env::new();
    let rule = env.json(&[
        "recycle-bin",
        "rule",
        "create",
        "--resource",
        "snapshot",
        "--retain",
        "10d",
        "--lock",
        "7d",
    ]);
    let rid = rule["Identifier"].as_str().unwrap().to_string();
    assert_eq!(rule["LockState"], "locked");
    let e = env.fails(&["recycle-bin", "rule", "delete", &rid], 5);
    assert!(e.contains("locked"), "{e}");
    env.fails(
        &["recycle-bin", "rule", "update", &rid, "--retain", "1d"],
        5,
    );
    let longer = env.json(&["recycle-bin", "rule", "update", &rid, "--retain", "20d"]);
    assert_eq!(longer["RetentionPeriod"]["RetentionPeriodValue"], 20);
    env.fails(
        &["recycle-bin", "rule", "lock", &rid, "--unlock-delay", "1d"],
        2,
    );
    let pending = env.json(&["recycle-bin", "rule", "unlock", &rid]);
    assert_eq!(pending["LockState"], "pending_unlock");
    env.fails(&["recycle-bin", "rule", "delete", &rid], 5);
    env.fails(
        &[
            "--account",
            "222222222222",
            "recycle-bin",
            "rule",
            "delete",
            &rid,
        ],
        6,
    );
    // Eight days on (the library's clock), it is unlocked and goes.
    let region = open(&env, "local");
    let me = region.info().owner.clone();
    let rid: blocksnap::id::RuleId = rid.parse().unwrap();
    let later = SystemTime::now() + Duration::from_secs(8 * DAY);
    recycle::delete_rule(&region, &me, &rid, later).unwrap();
    assert!(recycle::list_rules(&region, &me).unwrap().is_empty());
}

/// A move into the bin cut short after its entry and its copy were
/// written, before the original went (as a kill would leave it): the
/// snapshot is where it was, the bin shows nothing, gc removes the
/// leftover and keeps the chunks, and the delete then goes through.
#[test]
fn a_move_into_the_bin_cut_short_leaves_the_snapshot_where_it_was() {
    let env = Env::new();
    let w = world(&env, 10);
    let snap = snapshot::create(&w.region, &w.vol, &CreateOptions::default(), &NoProgress).unwrap();
    let rule = RuleSpec {
        resource_type: ResourceType::EbsSnapshot,
        retention: Duration::from_secs(DAY),
        tags: Vec::new(),
        description: String::new(),
        lock: None,
    };
    let now = SystemTime::now();
    let rule = recycle::create_rule(&w.region, &w.me, &rule, now).unwrap();
    let entry = recycle::entry_for(
        ResourceType::EbsSnapshot,
        snap.id.as_str(),
        &w.me,
        &rule,
        now,
    );
    blocksnap::region::recycle::write_entry(&w.region, &entry).unwrap();
    let key = blocksnap::region::catalog::Region::snapshot_key(&snap.id);
    let bytes = w
        .region
        .backend()
        .read(&key, "manifest", 1 << 30)
        .unwrap()
        .unwrap();
    let copy = blocksnap::region::catalog::binned_snapshot_key(&snap.id);
    w.region.backend().create(&copy, &bytes).unwrap();
    assert!(recycle::list_binned(&w.region, &w.me).unwrap().is_empty());
    restores_as(&env, &w.region, &snap.id, &w.vol);
    let r = gc_at(&w.region, false, now).unwrap();
    assert_eq!((r.binned_kept, r.chunks_removed), (0, 0));
    assert!(!w.region.has_binned_snapshot(&snap.id).unwrap());
    let done = access::delete_at(&w.region, &snap.id, &w.me, now).unwrap();
    assert!(matches!(done, Deleted::Binned(_)));
    assert_eq!(recycle::list_binned(&w.region, &w.me).unwrap().len(), 1);
}
