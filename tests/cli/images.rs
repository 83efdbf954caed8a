//! Images (AMIs), instances and copies between regions, end to end.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::*;

const OTHER: &str = "111111111111";
const THIRD: &str = "222222222222";
const GIB: u64 = 1 << 30;

fn ami(v: &Value) -> String {
    v["ImageId"].as_str().unwrap().to_string()
}

/// A small real ext4 data volume.
fn data_volume(env: &Env) -> PathBuf {
    let src = env.path("data-src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..5u64 {
        fs::write(
            src.join(format!("table{i}.db")),
            random_bytes(40 + i, 300_000),
        )
        .unwrap();
        fs::write(
            src.join(format!("notes{i}.txt")),
            text_bytes(50 + i, 200_000),
        )
        .unwrap();
    }
    let img = env.path("data.img");
    sh_ok(&format!(
        "truncate -s 64M '{0}' && mkfs.ext4 -q -F -d '{1}' '{0}'",
        img.display(),
        src.display()
    ));
    img
}

fn snapshot_of<'a>(created: &'a Value, device: &str) -> &'a Value {
    created["Snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["DeviceName"] == device)
        .unwrap_or_else(|| panic!("no snapshot for {device} in {created}"))
}

/// `cmp` of the first `len` bytes, and zeros after them.
fn assert_prefix_then_zeros(volume: &Path, source: &Path, len: u64) {
    sh_ok(&format!(
        "cmp -n {len} '{}' '{}'",
        volume.display(),
        source.display()
    ));
    let cmp = sh_ok(&format!(
        "qemu-img compare -f raw -F raw '{}' '{}'",
        source.display(),
        volume.display()
    ));
    assert!(cmp.contains("identical"), "{cmp}");
}

on_each_backend!(
    lifecycle_create_launch_customise_create_copy_launch,
    lifecycle_create_launch_customise_create_copy_launch_case
);
fn lifecycle_create_launch_customise_create_copy_launch_case(env: &Env) {
    let imgs = images();
    let root = env.path("root.img");
    sparse_copy(&imgs.v1, &root);
    let data = data_volume(env);
    let data_golden = env.path("data-golden.img");
    sparse_copy(&data, &data_golden);

    // 1. An image of two volumes, plus a suppressed and an ephemeral device.
    let created = env.json(&[
        "image",
        "create",
        "--name",
        "web (v1)",
        "--description",
        "golden web server",
        "--map",
        &format!("/dev/xvda={}", s(&root)),
        "--map",
        &format!("/dev/xvdf={}", s(&data)),
        "--map",
        "/dev/xvdb=none",
        "--map",
        "/dev/xvdc=ephemeral0",
        "--volume-size",
        "/dev/xvdf=2",
        "--keep-on-termination",
        "/dev/xvdf",
        "--tag",
        "app=web",
    ]);
    let ami1 = ami(&created);
    let root_snap = snapshot_of(&created, "/dev/xvda");
    let data_snap = snapshot_of(&created, "/dev/xvdf");
    let image1_stored = root_snap["NewBytesStored"].as_u64().unwrap()
        + data_snap["NewBytesStored"].as_u64().unwrap();
    assert!(root_snap["NewChunks"].as_u64().unwrap() > 100);

    let d = env.json(&["image", "describe", &ami1]);
    let img = &d["Images"][0];
    assert_eq!(img["Name"], "web (v1)");
    assert_eq!(img["State"], "available");
    assert_eq!(img["RootDeviceName"], "/dev/xvda");
    assert_eq!(img["RootDeviceType"], "ebs");
    assert_eq!(img["Public"], false);
    assert_eq!(
        img["Tags"],
        serde_json::json!([{"Key": "app", "Value": "web"}])
    );
    let maps = img["BlockDeviceMappings"].as_array().unwrap();
    assert_eq!(maps.len(), 4);
    assert_eq!(maps[0]["Ebs"]["VolumeSize"], 1);
    assert_eq!(maps[0]["Ebs"]["DeleteOnTermination"], true);
    assert_eq!(maps[1]["Ebs"]["VolumeSize"], 2);
    assert_eq!(maps[1]["Ebs"]["DeleteOnTermination"], false);
    assert_eq!(
        maps[2],
        serde_json::json!({"DeviceName": "/dev/xvdb", "NoDevice": ""})
    );
    assert_eq!(
        maps[3],
        serde_json::json!({"DeviceName": "/dev/xvdc", "VirtualName": "ephemeral0"})
    );

    // 2. Launch it.
    let inst1 = env.path("inst1");
    let launched = env.json(&["instance", "launch", &ami1, s(&inst1)]);
    let i1 = &launched["Instances"][0];
    assert!(i1["InstanceId"].as_str().unwrap().starts_with("i-"));
    assert_eq!(i1["ImageId"], ami1.as_str());
    assert_eq!(fs::metadata(inst1.join("xvda.img")).unwrap().len(), GIB);
    assert_eq!(fs::metadata(inst1.join("xvdf.img")).unwrap().len(), 2 * GIB);
    assert!(
        !inst1.join("xvdb.img").exists(),
        "a NoDevice mapping got a volume"
    );
    assert_eq!(
        allocated(&inst1.join("xvdc.img")),
        0,
        "ephemeral volume is not an empty sparse file"
    );
    assert_prefix_then_zeros(&inst1.join("xvda.img"), &imgs.v1, IMAGE_SIZE);
    assert_prefix_then_zeros(&inst1.join("xvdf.img"), &data_golden, 64 * MIB);
    assert_fsck_clean(&inst1.join("xvda.img"));
    let recorded: Value =
        serde_json::from_slice(&fs::read(inst1.join("instance.json")).unwrap()).unwrap();
    assert_eq!(
        recorded["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"],
        root_snap["SnapshotId"]
    );
    assert_eq!(recorded["BlockDeviceMappings"][0]["VolumeFile"], "xvda.img");

    // 3. Customise the root volume: a new file and an edited one.
    let extra = env.path("extra.bin");
    fs::write(&extra, random_bytes(77, 2 * MIB as usize)).unwrap();
    sh_ok(&format!(
        "debugfs -w -R 'write {} data/app.bin' '{}'",
        extra.display(),
        inst1.join("xvda.img").display()
    ));
    let extra2 = env.path("conf.txt");
    fs::write(&extra2, text_bytes(78, 5000)).unwrap();
    sh_ok(&format!(
        "debugfs -w -R 'write {} app.conf' '{}'",
        extra2.display(),
        inst1.join("xvda.img").display()
    ));
    assert_fsck_clean(&inst1.join("xvda.img"));
    let listing = sh_ok(&format!(
        "debugfs -R 'ls -l /data' '{}' 2>/dev/null",
        inst1.join("xvda.img").display()
    ));
    assert!(
        listing.contains("app.bin") && listing.contains("2097152"),
        "debugfs did not write: {listing}"
    );

    // 4. An image from the instance: incremental against what it was launched from.
    let created2 = env.json(&[
        "image",
        "create",
        "--name",
        "web (v2)",
        "--instance",
        s(&inst1),
    ]);
    let ami2 = ami(&created2);
    let r2 = snapshot_of(&created2, "/dev/xvda");
    let d2 = snapshot_of(&created2, "/dev/xvdf");
    assert_eq!(r2["ParentSnapshotId"], root_snap["SnapshotId"]);
    assert_eq!(d2["ParentSnapshotId"], data_snap["SnapshotId"]);
    assert_eq!(
        d2["NewChunks"], 0,
        "the unchanged data volume stored new chunks"
    );
    let changed = r2["NewChunks"].as_u64().unwrap();
    assert!(
        changed > 0 && changed <= 12,
        "root volume stored {changed} chunks for ~2 MiB of changes"
    );
    let image2_stored =
        r2["NewBytesStored"].as_u64().unwrap() + d2["NewBytesStored"].as_u64().unwrap();
    let desc2 = env.json(&["image", "describe", &ami2]);
    let maps2 = desc2["Images"][0]["BlockDeviceMappings"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(maps2.len(), 3, "{maps2:?}");
    assert_eq!(
        maps2[1]["Ebs"]["DeleteOnTermination"], false,
        "keep-on-termination lost"
    );
    assert_eq!(maps2[2]["VirtualName"], "ephemeral0");

    // 5. Launch the new image: the same bytes as the customised instance.
    let inst2 = env.path("inst2");
    env.ok(&["instance", "launch", &ami2, s(&inst2)]);
    assert_same(&inst2.join("xvda.img"), &inst1.join("xvda.img"));
    assert_same(&inst2.join("xvdf.img"), &inst1.join("xvdf.img"));
    assert_fsck_clean(&inst2.join("xvda.img"));

    // 6. Copy to another region and launch there.
    let copy2 = env.json(&["image", "copy", &ami2, "--to-region", "eu-west-1"]);
    let copied_bytes_2 = copy2["BytesCopied"].as_u64().unwrap();
    assert!(copy2["ChunksCopied"].as_u64().unwrap() > 100);
    assert_eq!(copy2["ChunksAlreadyPresent"], 0);
    let ami2_eu = ami(&copy2);
    assert_ne!(ami2_eu, ami2, "a copy must get a new id");
    let eu = env.json(&["image", "describe", &ami2_eu, "--region", "eu-west-1"]);
    assert_eq!(eu["Images"][0]["SourceImageId"], ami2.as_str());
    assert_eq!(eu["Images"][0]["SourceRegion"], "local");
    let eu_snap = eu["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(eu_snap, r2["SnapshotId"].as_str().unwrap());
    let inst3 = env.path("inst3");
    env.ok(&[
        "instance",
        "launch",
        &ami2_eu,
        s(&inst3),
        "--region",
        "eu-west-1",
    ]);
    assert_same(&inst3.join("xvda.img"), &inst1.join("xvda.img"));
    assert_same(&inst3.join("xvdf.img"), &inst1.join("xvdf.img"));
    assert_fsck_clean(&inst3.join("xvda.img"));
    // The original image's own id is unknown there.
    env.fails(&["image", "describe", &ami2, "--region", "eu-west-1"], 3);

    // 7. Copying the image v2 was derived from moves only what the region lacks.
    let copy1 = env.json(&[
        "image",
        "copy",
        &ami1,
        "--to-region",
        "eu-west-1",
        "--copy-tags",
    ]);
    let moved = copy1["ChunksCopied"].as_u64().unwrap();
    assert!(copy1["ChunksAlreadyPresent"].as_u64().unwrap() > 100);
    assert!(moved <= 12, "second copy moved {moved} chunks");
    let copied_bytes_1 = copy1["BytesCopied"].as_u64().unwrap();
    let eu1 = env.json(&["image", "describe", &ami(&copy1), "--region", "eu-west-1"]);
    assert_eq!(
        eu1["Images"][0]["Tags"],
        serde_json::json!([{"Key": "app", "Value": "web"}])
    );
    assert_eq!(
        eu["Images"][0]["Tags"],
        serde_json::json!([]),
        "tags copied without --copy-tags"
    );
    let v = env.json(&["store", "verify", "--region", "eu-west-1"]);
    assert_eq!(v["Clean"], true);

    // 8. Terminate: DeleteOnTermination volumes and ephemeral ones go, the rest stay.
    let t = env.json(&["instance", "terminate", s(&inst1)]);
    assert_eq!(t["State"], "terminated");
    assert!(!inst1.join("xvda.img").exists());
    assert!(!inst1.join("xvdc.img").exists());
    assert!(inst1.join("xvdf.img").exists());
    env.fails(&["instance", "terminate", s(&inst1)], 2);
    env.fails(
        &[
            "image",
            "create",
            "--name",
            "from dead",
            "--instance",
            s(&inst1),
        ],
        2,
    );

    eprintln!(
        "lifecycle: image v1 stored {image1_stored} bytes, image v2 (from the instance) {image2_stored}; \
         copy of v2 moved {copied_bytes_2} bytes, then copy of v1 moved {copied_bytes_1} ({moved} chunks)"
    );
}

on_each_backend!(
    launch_permissions_guard_describe_launch_copy_and_changes,
    launch_permissions_guard_describe_launch_copy_and_changes_case
);
fn launch_permissions_guard_describe_launch_copy_and_changes_case(env: &Env) {
    let img = env.path("disk.img");
    fs::write(&img, text_bytes(3, 3 * MIB as usize)).unwrap();
    let a = ami(&env.json(&[
        "image",
        "create",
        "--name",
        "private",
        "--map",
        &format!("/dev/xvda={}", s(&img)),
    ]));
    let as_other = |args: &[&str], account: &str| {
        let mut v = args.to_vec();
        v.extend_from_slice(&["--account", account]);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run_as = |args: &[&str], account: &str| {
        env.run(
            &as_other(args, account)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    };
    let fails_as = |args: &[&str], account: &str, code: i32| {
        env.fails(
            &as_other(args, account)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            code,
        )
    };
    let listed = |account: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["image", "list", "--json", "--account", account];
        args.extend_from_slice(extra);
        let v: Value = serde_json::from_str(&env.ok(&args)).unwrap();
        v["Images"].as_array().unwrap().iter().map(ami).collect()
    };
    let inst = |n: &str| s(&env.path(n)).to_string();

    // Private: the other account can do nothing with it.
    let err = fails_as(&["image", "describe", &a], OTHER, 6);
    assert!(err.contains(OTHER) && err.contains("--add"), "{err}");
    fails_as(&["instance", "launch", &a, &inst("x1")], OTHER, 6);
    assert!(!env.path("x1").exists());
    fails_as(&["image", "copy", &a, "--to-region", "r2"], OTHER, 6);
    assert!(listed(OTHER, &[]).is_empty());

    // Shared with OTHER.
    env.ok(&["image", "permissions", &a, "--add", OTHER]);
    let perms = env.json(&["image", "describe-permissions", &a]);
    assert_eq!(
        perms["LaunchPermissions"],
        serde_json::json!([{"UserId": OTHER}])
    );
    assert!(run_as(&["image", "describe", &a], OTHER).status.success());
    assert!(
        run_as(&["instance", "launch", &a, &inst("x2")], OTHER)
            .status
            .success()
    );
    // Launching needs no snapshot permission, copying does (EC2's rule for
    // shared AMIs): read permission on every snapshot behind the image.
    let desc = env.json(&["image", "describe", &a]);
    let snap_a = desc["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    let err = fails_as(&["image", "copy", &a, "--to-region", "r2"], OTHER, 6);
    assert!(
        err.contains(&snap_a) && err.contains("snapshot permissions"),
        "{err}"
    );
    fails_as(&["volume", "restore", &snap_a, &inst("v.img")], OTHER, 6);
    env.ok(&["snapshot", "permissions", &snap_a, "--add", OTHER]);
    let copy = run_as(&["image", "copy", &a, "--to-region", "r2", "--json"], OTHER);
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let copied: Value = serde_json::from_slice(&copy.stdout).unwrap();
    let owner_of_copy = env.json(&[
        "image",
        "describe",
        &ami(&copied),
        "--region",
        "r2",
        "--account",
        OTHER,
    ]);
    assert_eq!(owner_of_copy["Images"][0]["OwnerId"], OTHER);
    assert_eq!(listed(OTHER, &[]), vec![a.clone()]);
    assert_eq!(listed(OTHER, &["--executable-by", "self"]), vec![a.clone()]);
    assert!(listed(OTHER, &["--owner", "self"]).is_empty());
    fails_as(&["image", "describe", &a], THIRD, 6);
    // Only the owner changes or inspects permissions, deprecates or deregisters.
    fails_as(&["image", "permissions", &a, "--add", THIRD], OTHER, 6);
    fails_as(&["image", "describe-permissions", &a], OTHER, 6);
    fails_as(&["image", "deprecate", &a, "--at", "now"], OTHER, 6);
    let err = fails_as(&["image", "deregister", &a], OTHER, 6);
    assert!(err.contains("only its owner"), "{err}");

    // Removed again.
    env.ok(&["image", "permissions", &a, "--remove", OTHER]);
    fails_as(&["image", "describe", &a], OTHER, 6);
    fails_as(&["instance", "launch", &a, &inst("x3")], OTHER, 6);

    // Public: anyone.
    env.ok(&["image", "permissions", &a, "--add", "all"]);
    assert!(run_as(&["image", "describe", &a], THIRD).status.success());
    assert!(
        run_as(&["instance", "launch", &a, &inst("x4")], THIRD)
            .status
            .success()
    );
    assert_eq!(listed(THIRD, &["--executable-by", "all"]), vec![a.clone()]);
    let d = env.json(&["image", "describe", &a]);
    assert_eq!(d["Images"][0]["Public"], true);

    // Reset: owner only again. The manifest itself never changed.
    let manifest = format!("images/{a}.json");
    let before = env.read_stored("local", &manifest);
    env.ok(&["image", "permissions", &a, "--reset"]);
    fails_as(&["image", "describe", &a], THIRD, 6);
    assert_eq!(env.read_stored("local", &manifest), before);
    let err = env.fails(&["image", "permissions", &a, "--add", "12345"], 2);
    assert!(err.contains("12 decimal digits"), "{err}");
}

#[test]
fn mapping_and_name_rules_each_have_a_clear_error() {
    let env = Env::new();
    let img = env.path("disk.img");
    fs::write(&img, text_bytes(4, 2 * MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&img, &[]));
    let m = |dev: &str, v: &str| format!("{dev}={v}");
    let reg = |name: &str, maps: &[String], extra: &[&str]| {
        let mut a: Vec<String> = ["image", "register", "--name", name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for x in maps {
            a.push("--map".into());
            a.push(x.clone());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let fails = |args: Vec<String>, code: i32| {
        env.fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), code)
    };
    let before = env.store_state();

    let err = fails(reg("good name", &[m("/dev/nvme0n1", &snap)], &[]), 2);
    assert!(
        err.contains("/dev/sda1, /dev/sd[b-z] or /dev/xvd[a-z]"),
        "{err}"
    );
    let err = fails(
        reg(
            "good name",
            &[m("/dev/xvda", &snap), m("/dev/xvda", &snap)],
            &[],
        ),
        2,
    );
    assert!(err.contains("mapped twice"), "{err}");
    let err = fails(
        reg(
            "good name",
            &[m("/dev/xvdb", &snap)],
            &["--root-device", "/dev/xvda"],
        ),
        2,
    );
    assert!(err.contains("root device /dev/xvda is not among"), "{err}");
    let err = fails(
        reg(
            "good name",
            &[m("/dev/xvda", "none"), m("/dev/xvdb", &snap)],
            &[],
        ),
        2,
    );
    assert!(err.contains("must map a snapshot"), "{err}");
    let err = fails(
        reg(
            "good name",
            &[m("/dev/xvda", &snap), m("/dev/xvdc", "ephemeralX")],
            &[],
        ),
        2,
    );
    assert!(err.contains("ephemeral0 to ephemeral23"), "{err}");
    let err = fails(
        reg(
            "good name",
            &[m("/dev/xvda", "snap-0123456789abcdef0")],
            &[],
        ),
        3,
    );
    assert!(err.contains("does not exist in region local"), "{err}");
    let err = fails(
        reg(
            "good name",
            &[m("/dev/xvda", &snap)],
            &["--volume-size", "/dev/xvda=0"],
        ),
        2,
    );
    assert!(err.contains("smaller than"), "{err}");
    let err = fails(reg("ab", &[m("/dev/xvda", &snap)], &[]), 2);
    assert!(err.contains("3 to 128"), "{err}");
    let err = fails(reg("bad|name", &[m("/dev/xvda", &snap)], &[]), 2);
    assert!(err.contains("'|'"), "{err}");
    let err = fails(reg("good name", &[m("/dev/xvda", "disk.img")], &[]), 2);
    assert!(err.contains("image create"), "{err}");
    let err = fails(
        reg(
            "good name",
            &[m("/dev/xvda", &snap)],
            &["--architecture", "sparc"],
        ),
        2,
    );
    assert!(err.contains("x86_64 or arm64"), "{err}");
    let err = env.fails(
        &[
            "image",
            "create",
            "--name",
            "good name",
            "--map",
            "/dev/xvda=missing.img",
        ],
        3,
    );
    assert!(err.contains("missing.img"), "{err}");
    assert_eq!(
        env.store_state(),
        before,
        "a refused registration changed the store"
    );

    // Names are unique per owner in a region, not across accounts.
    env.ok(&reg(
        "good name",
        &[m("/dev/xvda", &snap), m("/dev/xvdb", "none")],
        &["--architecture", "arm64"],
    )
    .iter()
    .map(String::as_str)
    .collect::<Vec<_>>());
    let err = fails(reg("good name", &[m("/dev/xvda", &snap)], &[]), 5);
    assert!(err.contains("already has an image named"), "{err}");
    // Another account cannot back its image with someone else's snapshot.
    let err = fails(
        reg("good name", &[m("/dev/xvda", &snap)], &["--account", OTHER]),
        2,
    );
    assert!(err.contains("belongs to account"), "{err}");
}

on_each_backend!(
    tags_change_after_creation_and_every_reader_sees_them,
    tags_change_after_creation_and_every_reader_sees_them_case
);
fn tags_change_after_creation_and_every_reader_sees_them_case(env: &Env) {
    let img = env.path("t.img");
    fs::write(&img, text_bytes(7, 2 * MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&img, &["--tag", "env=test", "--tag", "team=db"]));
    let map = format!("/dev/xvda={snap}");
    let image = ami(&env.json(&[
        "image", "register", "--name", "tagged", "--map", &map, "--tag", "env=test",
    ]));
    let tags_of = |v: &Value| -> Vec<String> {
        let mut t: Vec<String> = v["Tags"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{}={}",
                    t["Key"].as_str().unwrap(),
                    t["Value"].as_str().unwrap()
                )
            })
            .collect();
        t.sort();
        t
    };
    // A new value, a new key and a removal in one command.
    let now = env.json(&[
        "snapshot",
        "tag",
        &snap,
        "--tag",
        "env=prod",
        "--tag",
        "owner=ops",
        "--untag",
        "team",
    ]);
    assert_eq!(now["ResourceId"], snap.as_str());
    assert_eq!(tags_of(&now), ["env=prod", "owner=ops"]);
    // Every reader sees them: describe, list, a restore's view of the meta.
    let described = env.json(&["snapshot", "describe", &snap]);
    assert_eq!(
        tags_of(&described["Snapshots"][0]),
        ["env=prod", "owner=ops"]
    );
    let listed = env.json(&["snapshot", "list"]);
    assert_eq!(tags_of(&listed["Snapshots"][0]), ["env=prod", "owner=ops"]);
    // A value given with --untag must match.
    let kept = env.json(&["snapshot", "tag", &snap, "--untag", "env=test"]);
    assert_eq!(tags_of(&kept), ["env=prod", "owner=ops"]);
    let text = env.ok(&["snapshot", "tag", &snap, "--untag-all"]);
    assert!(text.contains("has no tags"), "{text}");
    assert_eq!(
        tags_of(&env.json(&["snapshot", "describe", &snap])["Snapshots"][0]),
        Vec::<String>::new()
    );
    // Images too; the manifest of the snapshot is not rewritten, so it
    // still restores and verifies.
    let now = env.json(&["image", "tag", &image, "--tag", "tier=gold"]);
    assert_eq!(tags_of(&now), ["env=test", "tier=gold"]);
    let described = env.json(&["image", "describe", &image]);
    assert_eq!(tags_of(&described["Images"][0]), ["env=test", "tier=gold"]);
    env.ok(&["store", "verify"]);
    let out = env.path("t-restored.img");
    env.ok(&["volume", "restore", &snap, s(&out)]);
    sh_ok(&format!("cmp '{}' '{}'", img.display(), out.display()));
    // Refusals: another account, blocksnap's own keys, nothing to do,
    // one key both given and removed, an unknown snapshot.
    for args in [
        vec!["--account", OTHER, "snapshot", "tag", &snap, "--tag", "a=b"],
        vec!["--account", OTHER, "image", "tag", &image, "--untag-all"],
    ] {
        let err = env.fails(&args, 6);
        assert!(err.contains("only its owner"), "{err}");
    }
    for args in [
        vec!["snapshot", "tag", &snap, "--tag", "blocksnap:source=x"],
        vec![
            "image",
            "tag",
            &image,
            "--untag",
            "blocksnap:lifecycle-slot",
        ],
        vec!["snapshot", "tag", &snap],
        vec!["snapshot", "tag", &snap, "--tag", "a=1", "--untag", "a"],
        vec!["snapshot", "tag", &snap, "--tag", "novalue"],
        vec!["snapshot", "tag", &snap, "--untag", "=v"],
    ] {
        env.fails(&args, 2);
    }
    env.fails(
        &["snapshot", "tag", "snap-00000000000000000", "--tag", "a=b"],
        3,
    );
    assert_eq!(
        tags_of(&env.json(&["image", "describe", &image])["Images"][0]),
        ["env=test", "tier=gold"]
    );
}

on_each_backend!(
    deregister_deprecate_and_snapshot_deletion_rules,
    deregister_deprecate_and_snapshot_deletion_rules_case
);
fn deregister_deprecate_and_snapshot_deletion_rules_case(env: &Env) {
    let a_img = env.path("a.img");
    let b_img = env.path("b.img");
    fs::write(&a_img, text_bytes(5, 2 * MIB as usize)).unwrap();
    fs::write(&b_img, random_bytes(6, 2 * MIB as usize)).unwrap();
    let sa = id(&env.snapshot(&a_img, &[]));
    let sb = id(&env.snapshot(&b_img, &[]));
    let reg = |name: &str, maps: &[&str]| {
        let mut args = vec!["image", "register", "--name", name];
        for m in maps {
            args.push("--map");
            args.push(m);
        }
        ami(&env.json(&args))
    };
    let ma = format!("/dev/xvda={sa}");
    let mb = format!("/dev/xvdf={sb}");
    let img1 = reg("one", &[&ma, &mb]);
    let img2 = reg("two", &[&ma]);

    // A snapshot backing a registered image cannot be deleted.
    let err = env.fails(&["snapshot", "delete", &sa], 5);
    assert!(err.contains(&img1) || err.contains(&img2), "{err}");

    // Deprecation hides from list but still launches for the owner.
    env.ok(&["image", "deprecate", &img2, "--at", "2020-01-01T00:00:00Z"]);
    let list = env.json(&["image", "list"]);
    let ids: Vec<String> = list["Images"].as_array().unwrap().iter().map(ami).collect();
    assert_eq!(ids, vec![img1.clone()]);
    let all = env.json(&["image", "list", "--include-deprecated"]);
    assert_eq!(all["Images"].as_array().unwrap().len(), 2);
    env.ok(&["instance", "launch", &img2, s(&env.path("dep"))]);
    env.ok(&["image", "deprecate", &img2, "--at", "2999-01-01T00:00:00Z"]);
    assert_eq!(
        env.json(&["image", "list"])["Images"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "future deprecation hid it"
    );
    env.ok(&["image", "deprecate", &img2, "--cancel"]);
    env.fails(&["image", "deprecate", &img2, "--at", "tomorrow"], 2);

    // Deregister with snapshots: sb goes, sa stays because img2 uses it.
    let r = env.json(&[
        "image",
        "deregister",
        &img1,
        "--delete-associated-snapshots",
    ]);
    assert_eq!(r["DeletedSnapshots"], serde_json::json!([sb]));
    assert_eq!(
        r["KeptSnapshots"],
        serde_json::json!([{"SnapshotId": sa, "UsedBy": img2}])
    );
    env.fails(&["snapshot", "describe", &sb], 3);
    env.ok(&["snapshot", "describe", &sa]);
    let err = env.fails(&["instance", "launch", &img1, s(&env.path("nope"))], 5);
    assert!(err.contains("deregistered"), "{err}");
    assert!(!env.path("nope").exists());
    env.fails(&["image", "copy", &img1, "--to-region", "r2"], 5);
    env.fails(&["image", "deregister", &img1], 5);
    assert!(
        env.json(&["image", "list"])["Images"]
            .as_array()
            .unwrap()
            .len()
            == 1
    );
    let with = env.json(&["image", "list", "--include-deregistered"]);
    assert_eq!(with["Images"].as_array().unwrap().len(), 2);
    // A deregistered image's name is free again.
    reg("one", &[&ma]);

    // Once nothing registered uses it, the snapshot can be deleted.
    env.ok(&["image", "deregister", &img2]);
    let err = env.fails(&["snapshot", "delete", &sa], 5);
    assert!(err.contains("backs registered image"), "{err}");
}

#[test]
fn tampered_or_truncated_image_manifest_is_detected() {
    let env = Env::new();
    let img = env.path("disk.img");
    fs::write(&img, text_bytes(8, MIB as usize)).unwrap();
    let a = ami(&env.json(&[
        "image",
        "create",
        "--name",
        "tamper me",
        "--map",
        &format!("/dev/xvda={}", s(&img)),
    ]));
    let path = env.store().join("local/images").join(format!("{a}.json"));
    let good = fs::read_to_string(&path).unwrap();

    fs::write(&path, good.replace("tamper me", "tampered!")).unwrap();
    let err = env.fails(&["image", "describe", &a], 4);
    assert!(err.contains(&a) && err.contains("checksum"), "{err}");
    env.fails(&["instance", "launch", &a, s(&env.path("i"))], 4);
    let out = env.run(&["image", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning"),
        "damaged image not reported by list"
    );
    let v = env.run(&["store", "verify", "--json"]);
    assert_eq!(
        v.status.code(),
        Some(4),
        "store verify missed a tampered image manifest"
    );
    let report: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert!(
        report["DamagedManifests"][0].as_str().unwrap().contains(&a),
        "{report}"
    );

    fs::write(&path, &good[..good.len() / 2]).unwrap();
    let err = env.fails(&["image", "describe", &a], 4);
    assert!(err.contains("damaged"), "{err}");

    // Launch permissions are guarded the same way.
    fs::write(&path, &good).unwrap();
    env.ok(&["image", "permissions", &a, "--add", OTHER]);
    let lp = env
        .store()
        .join("local/images")
        .join(format!("{a}.launch.json"));
    let text = fs::read_to_string(&lp).unwrap();
    fs::write(&lp, text.replace(OTHER, THIRD)).unwrap();
    env.fails(&["image", "describe", &a, "--account", THIRD], 4);
}
