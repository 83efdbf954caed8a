//! blocksnap used as a careless or hostile user would: damaged parents,
//! races between processes, FIFOs, closed pipes, huge sizes, other
//! accounts, typos. Each test fails on a blocksnap without the fix it
//! names.

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

const OTHER: &str = "111111111111";
const THIRD: &str = "222222222222";

on_each_backend!(
    an_incremental_on_a_damaged_parent_stores_the_block_again,
    an_incremental_on_a_damaged_parent_stores_the_block_again_case
);
fn an_incremental_on_a_damaged_parent_stores_the_block_again_case(env: &Env) {
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(21, 4 * MIB as usize)).unwrap();
    let e1 = id(&env.snapshot(&vol, &[]));

    // S3 stamps objects in whole seconds, and a chunk changed in the very
    // second its snapshot was committed is not told apart (README).
    if env.s3.is_some() {
        std::thread::sleep(Duration::from_millis(1100));
    }
    // A flipped byte in one of E1's chunks; the volume is unchanged.
    let key = env.chunk_key(&e1, 2, "local");
    let mut bytes = env.read_stored("local", &key);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    env.write_stored("local", &key, &bytes);
    let e2 = env.snapshot(&vol, &[]);
    assert_eq!(e2["Stats"]["NewChunks"], 1, "{e2}");
    assert_eq!(e2["Stats"]["UnchangedBlocks"], 7, "{e2}");
    let out = env.path("e2.img");
    env.ok(&["volume", "restore", &id(&e2), s(&out)]);
    assert!(fs::read(&out).unwrap() == fs::read(&vol).unwrap());
    // The rewritten chunk heals E1 too.
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");

    // After `store verify --repair` moved a chunk aside, the next default
    // snapshot writes it again: the README's healing procedure heals.
    let key = env.chunk_key(&e1, 5, "local");
    let mut bytes = env.read_stored("local", &key);
    bytes[20] ^= 0x01;
    env.write_stored("local", &key, &bytes);
    let repaired = env.run(&["store", "verify", "--repair"]);
    assert_eq!(repaired.status.code(), Some(4), "{repaired:?}");
    let e3 = env.snapshot(&vol, &[]);
    assert_eq!(e3["Stats"]["NewChunks"], 1, "{e3}");
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    for snap in [e1, id(&e3)] {
        let out = env.path(&format!("{snap}.img"));
        env.ok(&["volume", "restore", &snap, s(&out)]);
        assert!(fs::read(&out).unwrap() == fs::read(&vol).unwrap());
    }
}

#[test]
fn an_image_from_an_instance_on_a_damaged_parent_stores_the_block_again() {
    let env = Env::new();
    let vol = env.path("root.img");
    fs::write(&vol, random_bytes(22, 4 * MIB as usize)).unwrap();
    let created = env.json(&[
        "image",
        "create",
        "--name",
        "base",
        "--map",
        &format!("/dev/xvda={}", s(&vol)),
    ]);
    let ami = created["ImageId"].as_str().unwrap().to_string();
    let snap = created["Snapshots"][0]["SnapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    let inst = env.path("inst");
    env.ok(&["instance", "launch", &ami, s(&inst)]);
    let key = env.chunk_key(&snap, 1, "local");
    let mut bytes = env.read_stored("local", &key);
    bytes[30] ^= 0x10;
    env.write_stored("local", &key, &bytes);
    let again = env.json(&[
        "image",
        "create",
        "--name",
        "from instance",
        "--instance",
        s(&inst),
    ]);
    let ami2 = again["ImageId"].as_str().unwrap();
    let inst2 = env.path("inst2");
    env.ok(&["instance", "launch", ami2, s(&inst2)]);
    let cmp = format!(
        "cmp -n {} '{}' '{}'",
        4 * MIB,
        inst2.join("xvda.img").display(),
        vol.display()
    );
    sh_ok(&cmp);
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
}

#[test]
fn a_restore_never_replaces_a_file_that_appeared_meanwhile() {
    let env = Env::new();
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(23, 96 * MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let mut raced = 0;
    for round in 0..6 {
        let target = env.path(&format!("t{round}.img"));
        let mut child = env
            .command(&["volume", "restore", &snap, s(&target), "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Once the restore's temporary file is there, it is writing: the
        // target appears now, before the restore can put its own in place.
        let temp = format!(".t{round}.img.tmp-");
        let writing = |e: &fs::DirEntry| e.file_name().to_string_lossy().starts_with(&temp);
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(20)
            && child.try_wait().unwrap().is_none()
            && !fs::read_dir(env.path(""))
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| writing(&e))
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let mine = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target);
        let out = child.wait_with_output().unwrap();
        if mine.is_err() {
            continue; // the restore finished first: nothing to race
        }
        raced += 1;
        fs::write(&target, b"the user's file").unwrap();
        assert_eq!(out.status.code(), Some(5), "round {round}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
        assert_eq!(fs::read(&target).unwrap(), b"the user's file");
        // No temporary file is left beside it.
        let left: Vec<_> = fs::read_dir(env.path(""))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
    assert!(
        raced > 0,
        "no round created the target while the restore ran"
    );
}

on_each_backend!(
    snapshots_are_private_to_their_owner_until_shared,
    snapshots_are_private_to_their_owner_until_shared_case
);
fn snapshots_are_private_to_their_owner_until_shared_case(env: &Env) {
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(24, 2 * MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let as_ = |account: &str, args: &[&str]| {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--account", account]);
        v.into_iter().map(String::from).collect::<Vec<String>>()
    };
    let fails_as = |account: &str, args: &[&str], code: i32| {
        let a = as_(account, args);
        env.fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), code)
    };
    let ok_as = |account: &str, args: &[&str]| {
        let a = as_(account, args);
        env.ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let listed = |account: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["snapshot", "list", "--json"];
        args.extend_from_slice(extra);
        let v: Value = serde_json::from_str(&ok_as(account, &args)).unwrap();
        v["Snapshots"].as_array().unwrap().iter().map(id).collect()
    };
    let out = env.path("other.img");

    // Private: another account can neither see, read, nor change it.
    for args in [
        vec!["volume", "restore", &snap, s(&out)],
        vec!["volume", "verify", &snap, s(&vol)],
        vec!["snapshot", "describe", &snap],
        vec!["snapshot", "blocks", &snap],
        vec!["snapshot", "changed-blocks", &snap, &snap],
        vec!["snapshot", "create", s(&vol), "--parent", &snap],
    ] {
        let err = fails_as(OTHER, &args, 6);
        assert!(
            err.contains(OTHER) && err.contains(&snap),
            "{args:?}: {err}"
        );
    }
    assert!(!out.exists());
    fails_as(OTHER, &["snapshot", "delete", &snap], 6);
    fails_as(
        OTHER,
        &["snapshot", "permissions", &snap, "--add", OTHER],
        6,
    );
    fails_as(OTHER, &["snapshot", "describe-permissions", &snap], 6);
    assert!(listed(OTHER, &[]).is_empty());

    // Shared with OTHER: it may restore, not delete or share further.
    let p = env.json(&["snapshot", "permissions", &snap, "--add", OTHER]);
    assert_eq!(
        p["CreateVolumePermissions"],
        serde_json::json!([{"UserId": OTHER}])
    );
    ok_as(OTHER, &["volume", "restore", &snap, s(&out)]);
    assert!(fs::read(&out).unwrap() == fs::read(&vol).unwrap());
    ok_as(OTHER, &["snapshot", "describe", &snap]);
    fails_as(OTHER, &["snapshot", "delete", &snap], 6);
    fails_as(
        OTHER,
        &["snapshot", "permissions", &snap, "--add", THIRD],
        6,
    );
    assert_eq!(listed(OTHER, &[]), vec![snap.clone()]);
    assert!(listed(OTHER, &["--owner", "self"]).is_empty());
    assert_eq!(
        listed(OTHER, &["--restorable-by", "self"]),
        vec![snap.clone()]
    );
    assert!(listed(THIRD, &[]).is_empty());

    // Public, then private again.
    env.ok(&["snapshot", "permissions", &snap, "--add", "all"]);
    assert_eq!(listed(THIRD, &[]), vec![snap.clone()]);
    assert_eq!(
        listed(THIRD, &["--restorable-by", "all"]),
        vec![snap.clone()]
    );
    env.ok(&["snapshot", "permissions", &snap, "--reset"]);
    assert!(listed(THIRD, &[]).is_empty());
    assert!(listed(OTHER, &[]).is_empty());
    let d = env.json(&["snapshot", "describe-permissions", &snap]);
    assert_eq!(d["CreateVolumePermissions"], serde_json::json!([]));

    // A snapshot of the same path by OTHER starts its own lineage.
    let theirs: Value =
        serde_json::from_str(&ok_as(OTHER, &["snapshot", "create", s(&vol), "--json"])).unwrap();
    assert!(theirs.get("ParentSnapshotId").is_none(), "{theirs}");
    assert_eq!(theirs["OwnerId"], OTHER);

    // A damaged permission file grants nothing, and does not lock the
    // owner out.
    env.ok(&["snapshot", "permissions", &snap, "--add", OTHER]);
    let key = format!("snapshot-permissions/{snap}.json");
    let mut bytes = env.read_stored("local", &key);
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    env.write_stored("local", &key, &bytes);
    let err = fails_as(
        OTHER,
        &["volume", "restore", &snap, s(&env.path("o2.img"))],
        4,
    );
    assert!(
        err.contains("snapshot permissions") && err.contains("damaged"),
        "{err}"
    );
    env.ok(&["snapshot", "describe", &snap]);
    assert!(!listed(OTHER, &[]).contains(&snap));
    let v = env.run(&["store", "verify", "--json"]);
    assert_eq!(v.status.code(), Some(4), "{v:?}");
    assert!(String::from_utf8_lossy(&v.stdout).contains("snapshot permissions"));
    env.ok(&["snapshot", "permissions", &snap, "--reset"]);

    // Only the owner deletes, and the permissions go with it.
    env.ok(&["snapshot", "delete", &snap]);
    env.fails(&["snapshot", "describe", &snap], 3);
}

#[test]
fn a_shared_image_launches_without_snapshot_permission() {
    let env = Env::new();
    let vol = env.path("root.img");
    fs::write(&vol, random_bytes(25, 2 * MIB as usize)).unwrap();
    let created = env.json(&[
        "image",
        "create",
        "--name",
        "shared",
        "--map",
        &format!("/dev/xvda={}", s(&vol)),
    ]);
    let ami = created["ImageId"].as_str().unwrap();
    env.ok(&["image", "permissions", ami, "--add", OTHER]);
    let inst = env.path("inst");
    env.ok(&["instance", "launch", ami, s(&inst), "--account", OTHER]);
    // The volume is grown to its 1 GiB VolumeSize: compare the snapshot's bytes.
    let cmp = format!(
        "cmp -n {} '{}' '{}'",
        2 * MIB,
        inst.join("xvda.img").display(),
        vol.display()
    );
    sh_ok(&cmp);
}

/// Runs two commands at once, `rounds` times, calling `check` after each.
fn race(
    env: &Env,
    rounds: usize,
    mut setup: impl FnMut(usize) -> [Vec<String>; 2],
    mut check: impl FnMut(usize, [bool; 2]),
) {
    for round in 0..rounds {
        let cmds = setup(round);
        let spawn = |args: &Vec<String>| -> Child {
            env.command(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut a = spawn(&cmds[0]);
        let mut b = spawn(&cmds[1]);
        let (ra, rb) = (a.wait().unwrap().success(), b.wait().unwrap().success());
        check(round, [ra, rb]);
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

on_each_backend!(
    concurrent_changes_never_lose_one_another,
    concurrent_changes_never_lose_one_another_case
);
fn concurrent_changes_never_lose_one_another_case(env: &Env) {
    let rounds = if env.name().contains("s3") { 4 } else { 8 };
    let vol = env.path("root.img");
    fs::write(&vol, random_bytes(26, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let ami = env.json(&[
        "image",
        "register",
        "--name",
        "racer",
        "--map",
        &format!("/dev/xvda={snap}"),
    ])["ImageId"]
        .as_str()
        .unwrap()
        .to_string();
    let perms = |what: &str, id: &str| -> Value { env.json(&[what, "describe-permissions", id]) };

    // Two --add: both stay. An --add racing a --remove: the removed one goes.
    for (noun, id, key) in [
        ("image", &ami, "LaunchPermissions"),
        ("snapshot", &snap, "CreateVolumePermissions"),
    ] {
        race(
            env,
            rounds,
            |_| {
                env.ok(&[noun, "permissions", id, "--reset"]);
                env.ok(&[noun, "permissions", id, "--add", THIRD]);
                [
                    strings(&[noun, "permissions", id, "--add", OTHER]),
                    strings(&[
                        noun,
                        "permissions",
                        id,
                        "--remove",
                        THIRD,
                        "--add",
                        "333333333333",
                    ]),
                ]
            },
            |round, ok| {
                assert_eq!(ok, [true, true], "{noun} round {round}");
                let p = perms(noun, id);
                let got: Vec<&str> = p[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g["UserId"].as_str().unwrap())
                    .collect();
                assert!(
                    got.contains(&OTHER) && got.contains(&"333333333333"),
                    "{noun} round {round}: {p}"
                );
                assert!(
                    !got.contains(&THIRD),
                    "{noun} round {round}: removed account kept: {p}"
                );
            },
        );
    }

    // Two registrations of one name: exactly one wins.
    race(
        env,
        rounds,
        |round| {
            let name = format!("same name {round}");
            let map = format!("/dev/xvda={snap}");
            [
                strings(&["image", "register", "--name", &name, "--map", &map]),
                strings(&["image", "register", "--name", &name, "--map", &map]),
            ]
        },
        |round, ok| {
            assert_eq!(
                ok.iter().filter(|o| **o).count(),
                1,
                "round {round}: {ok:?}"
            )
        },
    );

    // Deleting a snapshot racing an image registered on it: never both.
    race(
        env,
        rounds,
        |round| {
            let s2 = id(&env.snapshot(&vol, &["--no-parent"]));
            [
                strings(&["snapshot", "delete", &s2]),
                strings(&[
                    "image",
                    "register",
                    "--name",
                    &format!("on deleted {round}"),
                    "--map",
                    &format!("/dev/xvda={s2}"),
                ]),
            ]
        },
        |round, ok| {
            assert_ne!(
                ok,
                [true, true],
                "round {round}: an image on a deleted snapshot"
            )
        },
    );

    // Deregistration with its snapshots racing deprecation: the image ends
    // deregistered whenever its snapshots are gone.
    race(
        env,
        rounds,
        |round| {
            let s3 = id(&env.snapshot(&vol, &["--no-parent"]));
            let a = env.json(&[
                "image",
                "register",
                "--name",
                &format!("dereg {round}"),
                "--map",
                &format!("/dev/xvda={s3}"),
            ]);
            let a = a["ImageId"].as_str().unwrap().to_string();
            [
                strings(&["image", "deregister", &a, "--delete-associated-snapshots"]),
                strings(&["image", "deprecate", &a, "--at", "2030-01-01T00:00:00Z"]),
            ]
        },
        |round, _| {
            let list = env.json(&["image", "list", "--include-deprecated"]);
            for img in list["Images"].as_array().unwrap() {
                let name = img["Name"].as_str().unwrap();
                if name == format!("dereg {round}") {
                    panic!("round {round}: {name} is still available: {img}");
                }
            }
        },
    );
}

#[test]
fn concurrent_region_adds_keep_both() {
    // Local regions, and definitions on the S3 test server.
    let local = Env::new();
    race(
        &local,
        8,
        |round| {
            [
                strings(&["region", "add", &format!("a-{round}")]),
                strings(&["region", "add", &format!("a-{round}")]),
            ]
        },
        |round, ok| {
            assert_eq!(
                ok.iter().filter(|o| **o).count(),
                1,
                "round {round}: {ok:?}"
            )
        },
    );
    let Some(env) = Env::with_s3_server() else {
        return;
    };
    let server = env.s3.as_ref().unwrap();
    let add = |name: &str| {
        strings(&[
            "region",
            "add",
            name,
            &server.url(name),
            "--endpoint",
            &server.endpoint,
            "--allow-http",
        ])
    };
    race(
        &env,
        6,
        |round| [add(&format!("a-{round}")), add(&format!("b-{round}"))],
        |round, ok| assert_eq!(ok, [true, true], "round {round}"),
    );
    let list = env.json(&["region", "list"]);
    let names: Vec<&str> = list["Regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["RegionName"].as_str().unwrap())
        .collect();
    for round in 0..6 {
        for n in [format!("a-{round}"), format!("b-{round}")] {
            assert!(names.contains(&n.as_str()), "{n} lost: {names:?}");
        }
    }
}

#[test]
fn a_fifo_is_refused_at_once() {
    let env = Env::new();
    let fifo = env.path("fifo");
    sh_ok(&format!("mkfifo '{}'", fifo.display()));
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(27, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    for args in [
        vec!["snapshot", "create", s(&fifo)],
        vec!["volume", "verify", &snap, s(&fifo)],
        vec![
            "image",
            "create",
            "--name",
            "fifo",
            "--map",
            &format!("/dev/xvda={}", s(&fifo)),
        ],
        vec!["volume", "restore", &snap, s(&fifo), "--force"],
    ] {
        let started = Instant::now();
        let mut child = env
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if started.elapsed() > Duration::from_secs(20) {
                child.kill().unwrap();
                panic!("{args:?} hangs on a FIFO");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("not a regular file or block device"), "{err}");
    }
    assert_eq!(
        env.json(&["snapshot", "list"])["Snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let env = Env::new();
    let vol = env.path("vol.img");
    fs::write(&vol, text_bytes(28, 64 * MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &["--block-size", "64K"]));
    let bin = env!("CARGO_BIN_EXE_blocksnap");
    for cmd in ["snapshot blocks", "snapshot describe", "snapshot list"] {
        let script = format!(
            "set -o pipefail; BLOCKSNAP_STORE='{}' '{bin}' {cmd} {} 2>'{}' | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}",
            env.store().display(),
            if cmd == "snapshot list" { "" } else { &snap },
            env.path("err").display()
        );
        let status: i32 = sh_ok(&script).trim().parse().unwrap();
        let err = fs::read_to_string(env.path("err")).unwrap();
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{cmd}: {err}"
        );
        // Done, or ended by SIGPIPE (128 + 13) as `cat` and `ls` are.
        assert!(status == 0 || status == 141, "{cmd}: exit {status}: {err}");
    }
}

#[test]
fn volumes_beyond_64_tib_are_refused_without_allocating() {
    let env = Env::new();
    // tmpfs holds sparse files of any size; ext4 stops at 16 TiB.
    let dir = Path::new("/dev/shm");
    assert!(
        dir.is_dir(),
        "/dev/shm (tmpfs) is needed for huge sparse files"
    );
    for (name, size) in [
        ("4E", "4E"),
        ("64T+1", &((64u64 << 40) + 1).to_string()[..]),
    ] {
        let path = dir.join(format!("blocksnap-huge-{}-{name}.img", std::process::id()));
        sh_ok(&format!("truncate -s {size} '{}'", path.display()));
        let out = env.run(&["snapshot", "create", s(&path)]);
        let _ = fs::remove_file(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains("64 TiB") && !err.contains("memory allocation"),
            "{err}"
        );
    }
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(29, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let err = env.fails(
        &[
            "volume",
            "restore",
            &snap,
            s(&env.path("r.img")),
            "--size",
            "65T",
        ],
        2,
    );
    assert!(err.contains("64 TiB"), "{err}");
    // A careless thread count is refused, not attempted.
    let err = env.fails(
        &[
            "volume",
            "restore",
            &snap,
            s(&env.path("t.img")),
            "--threads",
            "100000",
        ],
        2,
    );
    assert!(err.contains("at most 1024"), "{err}");
}

#[test]
fn image_create_checks_every_argument_before_the_first_snapshot() {
    let env = Env::new();
    let vol = env.path("root.img");
    fs::write(&vol, random_bytes(30, 3 * MIB as usize)).unwrap();
    let map = format!("/dev/xvda={}", s(&vol));
    for size in ["0", "70000"] {
        let err = env.fails(
            &[
                "image",
                "create",
                "--name",
                "sized",
                "--map",
                &map,
                "--volume-size",
                &format!("/dev/xvda={size}"),
            ],
            2,
        );
        assert!(err.contains("/dev/xvda"), "{err}");
    }
    assert!(
        env.json(&["snapshot", "list"])["Snapshots"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A failure after the snapshots were taken (a mapping of another
    // account's snapshot, found only at registration) deletes them.
    let other_vol = env.path("other.img");
    fs::write(&other_vol, random_bytes(31, MIB as usize)).unwrap();
    let theirs = id(&env.snapshot(&other_vol, &["--account", OTHER]));
    env.ok(&[
        "snapshot",
        "permissions",
        &theirs,
        "--add",
        "all",
        "--account",
        OTHER,
    ]);
    let err = env.fails(
        &[
            "image",
            "create",
            "--name",
            "mixed",
            "--map",
            &map,
            "--map",
            &format!("/dev/xvdf={theirs}"),
        ],
        2,
    );
    assert!(err.contains(&theirs), "{err}");
    let mine = env.json(&["snapshot", "list", "--owner", "self"]);
    assert!(mine["Snapshots"].as_array().unwrap().is_empty(), "{mine}");
}

#[test]
fn the_readmes_exit_code_table_is_true() {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("### Exit codes"))
        .filter(|l| l.starts_with("| ") && l.chars().nth(2).is_some_and(|c| c.is_ascii_digit()))
        .take(7)
        .collect();
    assert_eq!(table.len(), 7, "{table:?}");
    for (code, row) in table.iter().enumerate() {
        assert!(row.starts_with(&format!("| {code} |")), "{row}");
    }

    let env = Env::new();
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(32, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let missing = "snap-0000000000000000f";
    // Each row, by a command the row names.
    let cases: Vec<(i32, Vec<String>)> = vec![
        (
            2,
            strings(&["snapshot", "create", s(&vol), "--block-size", "3K"]),
        ),
        (3, strings(&["snapshot", "create", "absent.img"])),
        (3, strings(&["volume", "restore", missing, "x.img"])),
        (3, strings(&["image", "describe", "ami-0000000000000000f"])),
        (
            3,
            strings(&[
                "image",
                "create",
                "--name",
                "not found",
                "--map",
                "/dev/xvda=absent.img",
            ]),
        ),
        (
            3,
            strings(&[
                "image",
                "register",
                "--name",
                "not found",
                "--map",
                &format!("/dev/xvda={missing}"),
            ]),
        ),
        (3, strings(&["instance", "describe", "no-such-dir"])),
        (
            3,
            strings(&["snapshot", "list", "--region", "no-such-region"]),
        ),
        (3, strings(&["region", "remove", "no-such-region"])),
        (5, strings(&["volume", "restore", &snap, s(&vol)])),
        (5, strings(&["region", "add", "local"])),
        (
            6,
            strings(&["snapshot", "describe", &snap, "--account", OTHER]),
        ),
    ];
    for (code, args) in cases {
        env.fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), code);
    }
    let chunk = env.chunk_key(&snap, 0, "local");
    fs::write(env.store().join("local").join(&chunk), b"garbage").unwrap();
    env.fails(&["volume", "restore", &snap, "y.img"], 4);
}

#[test]
fn a_typo_in_a_region_creates_nothing() {
    let env = Env::new();
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(33, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let ami = env.json(&[
        "image",
        "register",
        "--name",
        "typo",
        "--map",
        &format!("/dev/xvda={snap}"),
    ]);
    let ami = ami["ImageId"].as_str().unwrap();
    let err = env.fails(&["--region", "eu-wset-1", "snapshot", "list"], 3);
    assert!(
        err.contains("eu-wset-1") && err.contains("region add"),
        "{err}"
    );
    let err = env.fails(&["image", "copy", ami, "--to-region", "eu-wset-1"], 3);
    assert!(err.contains("local"), "{err}");
    assert!(!env.store().join("eu-wset-1").exists());
    let copy = env.json(&[
        "image",
        "copy",
        ami,
        "--to-region",
        "eu-west-1",
        "--create-region",
    ]);
    assert!(copy["ImageId"].as_str().is_some());
    env.ok(&["snapshot", "list", "--region", "eu-west-1"]);
    // `region remove` forgets definitions and never deletes a local region.
    let err = env.fails(&["region", "remove", "eu-west-1"], 2);
    assert!(err.contains("never deletes"), "{err}");
    assert!(env.store().join("eu-west-1/store.json").exists());
}

#[test]
fn a_restore_into_the_store_itself_is_refused() {
    let env = Env::new();
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(36, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let manifest = env.store().join("local/snapshots").join(&snap);
    let before = fs::read(&manifest).unwrap();
    let err = env.fails(&["volume", "restore", &snap, s(&manifest), "--force"], 2);
    assert!(err.contains("inside region local"), "{err}");
    assert!(fs::read(&manifest).unwrap() == before);
    env.fails(
        &[
            "volume",
            "restore",
            &snap,
            s(&env.store().join("local/x.img")),
        ],
        2,
    );
}

#[test]
fn a_volume_written_while_snapshotted_warns() {
    let env = Env::new();
    let vol = env.path("busy.img");
    fs::write(&vol, text_bytes(34, 128 * MIB as usize)).unwrap();
    let writer = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "while :; do dd if=/dev/urandom of='{}' bs=4096 count=1 seek=$((RANDOM % 30000)) conv=notrunc status=none; sleep 0.002; done",
            vol.display()
        ))
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _writer = Kill(writer);
    std::thread::sleep(Duration::from_millis(50));
    let out = env.run(&["snapshot", "create", s(&vol), "--threads", "1"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("changed while it was read"),
        "{err}"
    );
}

#[test]
fn an_instance_or_image_with_an_impossible_volume_size_is_refused() {
    let env = Env::new();
    let vol = env.path("root.img");
    fs::write(&vol, random_bytes(35, MIB as usize)).unwrap();
    let ami = env.json(&[
        "image",
        "create",
        "--name",
        "sized",
        "--map",
        &format!("/dev/xvda={}", s(&vol)),
    ]);
    let ami = ami["ImageId"].as_str().unwrap();
    let inst = env.path("inst");
    env.ok(&["instance", "launch", ami, s(&inst)]);
    let file = inst.join("instance.json");
    let json = fs::read_to_string(&file).unwrap();
    let edited = json.replacen(
        "\"VolumeSize\": 1",
        "\"VolumeSize\": 18446744073709551615",
        1,
    );
    assert_ne!(json, edited);
    fs::write(&file, edited).unwrap();
    let err = env.fails(&["instance", "describe", s(&inst)], 4);
    assert!(err.contains("volume size"), "{err}");
    env.fails(
        &["image", "create", "--name", "again", "--instance", s(&inst)],
        4,
    );
}

#[test]
fn a_malformed_setting_is_a_usage_error_naming_it() {
    let env = Env::new();
    for (name, value) in [
        ("BLOCKSNAP_LOCK_WAIT", "soon"),
        ("BLOCKSNAP_S3_INFLIGHT", "0"),
        ("BLOCKSNAP_S3_RETRIES", "-1"),
    ] {
        let out = env
            .command(&["snapshot", "list"])
            .env(name, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}={value}: {err}");
        assert!(err.contains(name) && err.contains(value), "{err}");
    }
    // Nothing was created: the settings are checked before the store is used.
    assert!(!env.store().exists());
}
