//! The core path: snapshot, incremental, restore, verify, gc, on each
//! backend.

use std::fs;
use std::os::unix::fs::FileExt;

use crate::util::*;

on_each_backend!(
    full_then_incremental_snapshot_restores_both_exactly,
    full_then_incremental_snapshot_restores_both_exactly_case
);
fn full_then_incremental_snapshot_restores_both_exactly_case(env: &Env) {
    let imgs = images();
    let work = env.path("disk.img");
    sparse_copy(&imgs.v1, &work);
    let full = env.snapshot(&work, &["--description", "golden", "--tag", "env=bench"]);
    assert!(full.get("ParentSnapshotId").is_none());
    assert_eq!(full["VolumeSizeBytes"], IMAGE_SIZE);
    assert_eq!(full["VolumeSize"], 1);
    assert_eq!(full["State"], "completed");
    assert_eq!(full["Description"], "golden");
    assert_eq!(
        full["Tags"],
        serde_json::json!([{"Key": "env", "Value": "bench"}])
    );
    let fs_ = &full["Stats"];
    let blocks = IMAGE_SIZE / (512 * 1024);
    assert_eq!(
        fs_["DataBlocks"].as_u64().unwrap()
            + fs_["ZeroBlocks"].as_u64().unwrap()
            + fs_["HoleBlocks"].as_u64().unwrap(),
        blocks
    );
    assert!(
        fs_["HoleBlocks"].as_u64().unwrap() > blocks / 3,
        "holes were not detected: {fs_}"
    );
    let full_stored = fs_["NewBytesStored"].as_u64().unwrap();
    let full_raw = fs_["NewBytesRaw"].as_u64().unwrap();
    assert!(
        full_raw > 100 * MIB,
        "full snapshot stored only {full_raw} raw bytes"
    );
    assert!(full_stored < full_raw, "compression saved nothing");

    // The same path again, now holding v2: incremental against the first.
    sparse_copy(&imgs.v2, &work);
    let inc = env.snapshot(&work, &[]);
    assert_eq!(inc["ParentSnapshotId"], full["SnapshotId"]);
    let is = &inc["Stats"];
    let inc_stored = is["NewBytesStored"].as_u64().unwrap();
    assert!(inc_stored > 0, "the change stored nothing");
    assert!(
        inc_stored * 10 < full_stored,
        "incremental stored {inc_stored} bytes, full {full_stored}: not far fewer"
    );
    assert!(is["UnchangedBlocks"].as_u64().unwrap() > is["DataBlocks"].as_u64().unwrap() * 9 / 10);

    for (snap, source) in [(&full, &imgs.v1), (&inc, &imgs.v2)] {
        let out = env.path(&format!("{}.img", id(snap)));
        let r = env.json(&["volume", "restore", &id(snap), out.to_str().unwrap()]);
        assert_eq!(r["SizeBytes"], IMAGE_SIZE);
        assert_same(&out, source);
        assert_fsck_clean(&out);
        // Sparse where the source was: no more allocated than the source.
        let (got, src) = (allocated(&out), allocated(source));
        assert!(
            got <= src + MIB,
            "restored image allocates {got} bytes, source {src}"
        );
        assert!(
            got < IMAGE_SIZE / 2,
            "restored image is not sparse ({got} bytes allocated)"
        );
    }

    // The listing knows both; describe matches what create said.
    let list = env.json(&["snapshot", "list"]);
    let ids: Vec<_> = list["Snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(id)
        .collect();
    assert_eq!(ids, vec![id(&full), id(&inc)]);
    let d = env.json(&["snapshot", "describe", &id(&inc)]);
    assert_eq!(d["Snapshots"][0], inc);
    let mine = env.json(&["snapshot", "list", "--volume", work.to_str().unwrap()]);
    assert_eq!(mine["Snapshots"].as_array().unwrap().len(), 2);
}

on_each_backend!(
    delta_restore_writes_exactly_the_changed_blocks,
    delta_restore_writes_exactly_the_changed_blocks_case
);
fn delta_restore_writes_exactly_the_changed_blocks_case(env: &Env) {
    let imgs = images();
    let s1 = id(&env.snapshot(&imgs.v1, &[]));
    let s2 = id(&env.snapshot(&imgs.v2, &[]));
    let changed = env.json(&["snapshot", "changed-blocks", &s1, &s2]);
    let n_changed = changed["ChangedBlocks"].as_array().unwrap().len() as u64;
    assert!(
        n_changed > 0 && n_changed < 40,
        "{n_changed} changed blocks"
    );

    let target = env.path("target.img");
    sparse_copy(&imgs.v2, &target);
    let r = env.json(&[
        "volume",
        "restore",
        "--delta",
        &s1,
        target.to_str().unwrap(),
    ]);
    assert_eq!(r["BlocksWritten"], n_changed);
    assert_eq!(
        r["BlocksWritten"].as_u64().unwrap() + r["BlocksSkipped"].as_u64().unwrap(),
        IMAGE_SIZE / (512 * 1024)
    );
    assert_same(&target, &imgs.v1);
    assert_fsck_clean(&target);

    // Already equal: nothing to write.
    let again = env.json(&[
        "volume",
        "restore",
        "--delta",
        &s1,
        target.to_str().unwrap(),
    ]);
    assert_eq!(again["BlocksWritten"], 0);

    // And back to v2.
    let r = env.json(&[
        "volume",
        "restore",
        "--delta",
        &s2,
        target.to_str().unwrap(),
    ]);
    assert_eq!(r["BlocksWritten"], n_changed);
    assert_same(&target, &imgs.v2);
}

on_each_backend!(
    delta_restore_clears_blocks_that_are_zero_in_the_snapshot,
    delta_restore_clears_blocks_that_are_zero_in_the_snapshot_case
);
fn delta_restore_clears_blocks_that_are_zero_in_the_snapshot_case(env: &Env) {
    let img = env.path("small.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(4 * MIB).unwrap();
    f.write_all_at(&random_bytes(1, 100_000), 0).unwrap();
    let snap = id(&env.snapshot(&img, &["--block-size", "64K"]));
    // Scribble over a hole and grow the file: delta must undo both.
    let target = env.path("t.img");
    fs::copy(&img, &target).unwrap();
    let t = fs::OpenOptions::new().write(true).open(&target).unwrap();
    t.write_all_at(&random_bytes(2, 70_000), 2 * MIB).unwrap();
    t.set_len(5 * MIB).unwrap();
    // The target is larger: --delta would cut it, so it asks first and
    // changes nothing.
    let before = fs::read(&target).unwrap();
    let err = env.fails(
        &[
            "volume",
            "restore",
            "--delta",
            &snap,
            target.to_str().unwrap(),
        ],
        5,
    );
    assert!(err.contains("cut it") && err.contains("--force"), "{err}");
    assert!(fs::read(&target).unwrap() == before);
    let r = env.json(&[
        "volume",
        "restore",
        "--delta",
        "--force",
        &snap,
        target.to_str().unwrap(),
    ]);
    assert_eq!(r["BlocksWritten"], 2);
    assert_same(&target, &img);
}

#[test]
fn loop_devices_snapshot_and_restore() {
    let imgs = images();
    let env = Env::new();
    let src_img = env.path("src.img");
    sparse_copy(&imgs.v1, &src_img);
    let Some(src) = attach_loop(&src_img) else {
        return;
    };
    let snap = env.snapshot(&src.path(), &[]);
    assert_eq!(snap["VolumeSizeBytes"], IMAGE_SIZE);
    assert_eq!(snap["SourcePath"], src.0.as_str());
    // A device reports no holes: unallocated ranges read as zero blocks.
    assert_eq!(snap["Stats"]["HoleBlocks"], 0);
    assert!(snap["Stats"]["ZeroBlocks"].as_u64().unwrap() > 0);
    let snap = id(&snap);

    // Onto another loop device over a file full of garbage: zeros must be written.
    let dst_img = env.path("dst.img");
    fs::write(&dst_img, random_bytes(3, IMAGE_SIZE as usize)).unwrap();
    let Some(dst) = attach_loop(&dst_img) else {
        return;
    };
    // An existing device is overwritten only with --force.
    let err = env.fails(&["volume", "restore", &snap, &dst.0], 5);
    assert!(err.contains("--force"), "{err}");
    let r = env.json(&["volume", "restore", &snap, &dst.0, "--force"]);
    assert_eq!(r["BlocksWritten"], IMAGE_SIZE / (512 * 1024));
    assert_same(&dst.path(), &imgs.v1);

    // Delta onto the device from v2's content.
    let s2 = id(&env.snapshot(&imgs.v2, &[]));
    let r = env.json(&["volume", "restore", "--delta", &s2, &dst.0]);
    assert!(r["BlocksWritten"].as_u64().unwrap() < 40);
    assert_same(&dst.path(), &imgs.v2);

    // And to a file.
    let file = env.path("restored.img");
    env.ok(&["volume", "restore", &snap, file.to_str().unwrap()]);
    assert_same(&file, &imgs.v1);
    assert_fsck_clean(&file);

    // A device smaller than the snapshot is refused, and left alone.
    let small_img = env.path("small.img");
    fs::write(&small_img, vec![0xabu8; 8 * MIB as usize]).unwrap();
    let Some(small) = attach_loop(&small_img) else {
        return;
    };
    let err = env.fails(&["volume", "restore", &snap, &small.0, "--force"], 5);
    assert!(err.contains("needs") && err.contains(&small.0), "{err}");
    drop(small);
    assert!(fs::read(&small_img).unwrap().iter().all(|&b| b == 0xab));

    // A mounted device is refused even with --force (O_EXCL), and its file
    // system survives.
    let mounted_img = env.path("mounted.img");
    sparse_copy(&imgs.v2, &mounted_img);
    let Some(mounted) = attach_loop(&mounted_img) else {
        return;
    };
    let mnt = env.path("mnt");
    fs::create_dir(&mnt).unwrap();
    sh_ok(&format!("mount -o ro {} '{}'", mounted.0, mnt.display()));
    let err = env.fails(&["volume", "restore", &snap, &mounted.0, "--force"], 5);
    let err2 = env.fails(&["volume", "restore", &snap, &mounted.0, "--delta"], 5);
    sh_ok(&format!("umount '{}'", mnt.display()));
    assert!(err.contains("in use") && err.contains(&mounted.0), "{err}");
    assert!(err2.contains("in use"), "{err2}");
    drop(mounted);
    assert_same(&mounted_img, &imgs.v2);

    // A device larger than the snapshot: --delta leaves its tail, so it
    // asks for --force.
    let big_img = env.path("big.img");
    fs::write(
        &big_img,
        vec![0xcdu8; IMAGE_SIZE as usize + 8 * MIB as usize],
    )
    .unwrap();
    let Some(big) = attach_loop(&big_img) else {
        return;
    };
    let err = env.fails(&["volume", "restore", "--delta", &snap, &big.0], 5);
    assert!(
        err.contains("left as they are") && err.contains("--force"),
        "{err}"
    );
    env.ok(&["volume", "restore", "--delta", &snap, &big.0, "--force"]);
    drop(big);
    let bytes = fs::read(&big_img).unwrap();
    assert!(bytes[..IMAGE_SIZE as usize] == fs::read(&imgs.v1).unwrap()[..]);
    assert!(bytes[IMAGE_SIZE as usize..].iter().all(|&b| b == 0xcd));
}

#[test]
fn corrupt_chunk_stops_restore_naming_chunk_snapshot_and_offset() {
    let imgs = images();
    let env = Env::new();
    let snap = id(&env.snapshot(&imgs.v1, &[]));
    let blocks = env.json(&["snapshot", "blocks", &snap]);
    let (index, chunk) = blocks["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|b| {
            Some((
                b["BlockIndex"].as_u64()?,
                b["Checksum"].as_str()?.to_string(),
            ))
        })
        .unwrap();
    let path = env
        .store()
        .join("local")
        .join(env.chunk_key_of(&chunk, "local"));
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    let target = env.path("out.img");
    let err = env.fails(&["volume", "restore", &snap, target.to_str().unwrap()], 4);
    assert!(err.contains(&chunk[..12]), "{err}");
    assert!(err.contains(&snap), "{err}");
    assert!(
        err.contains(&format!("offset {}", index * 512 * 1024)),
        "{err}"
    );
    assert!(
        !target.exists(),
        "a half-restored file was left under the final name"
    );
    let leftovers: Vec<_> = fs::read_dir(env.dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary restore file left behind");

    let out = env.run(&["store", "verify"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&chunk));

    // Delta restore refuses just the same.
    let t2 = env.path("t2.img");
    fs::write(&t2, b"").unwrap();
    let err = env.fails(
        &[
            "volume",
            "restore",
            "--delta",
            "--force",
            &snap,
            t2.to_str().unwrap(),
        ],
        4,
    );
    assert!(err.contains(&chunk[..12]), "{err}");
}

#[test]
fn bad_inputs_fail_cleanly_and_change_nothing() {
    let env = Env::new();
    let img = env.path("disk.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(2 * MIB).unwrap();
    f.write_all_at(&text_bytes(1, 300_000), 0).unwrap();
    let snap = id(&env.snapshot(&img, &[]));
    let before = env.store_state();

    let err = env.fails(&["snapshot", "create", "missing.img"], 3);
    assert!(err.contains("missing.img"), "{err}");
    let err = env.fails(&["snapshot", "describe", "snap-0000000000000000f"], 3);
    assert!(
        err.contains("snap-0000000000000000f") && err.contains("snapshot list"),
        "{err}"
    );
    let err = env.fails(&["volume", "restore", "snap-0000000000000000f", "x.img"], 3);
    assert!(err.contains("not found"), "{err}");
    let err = env.fails(&["snapshot", "describe", "snap-xyz"], 2);
    assert!(
        err.contains("snap-xyz") && err.contains("17 lowercase hex"),
        "{err}"
    );
    let err = env.fails(
        &[
            "snapshot",
            "create",
            img.to_str().unwrap(),
            "--parent",
            &snap,
            "--block-size",
            "1M",
        ],
        2,
    );
    assert!(
        err.contains(&snap) && err.contains("524288") && err.contains("1048576"),
        "{err}"
    );
    let err = env.fails(
        &[
            "snapshot",
            "create",
            img.to_str().unwrap(),
            "--block-size",
            "3000",
        ],
        2,
    );
    assert!(err.contains("power of two"), "{err}");
    let err = env.fails(
        &[
            "snapshot",
            "create",
            img.to_str().unwrap(),
            "--tag",
            "novalue",
        ],
        2,
    );
    assert!(err.contains("KEY=VALUE"), "{err}");
    let err = env.fails(&["volume", "restore", &snap, img.to_str().unwrap()], 5);
    assert!(err.contains("--force"), "{err}");
    let err = env.fails(&["volume", "restore", &snap, "new.img", "--size", "1M"], 2);
    assert!(err.contains("smaller"), "{err}");
    let err = env.fails(&["volume", "restore", "--delta", &snap, "absent.img"], 3);
    assert!(err.contains("absent.img"), "{err}");
    let err = env.fails(
        &[
            "snapshot",
            "create",
            img.to_str().unwrap(),
            "--account",
            "12",
        ],
        2,
    );
    assert!(err.contains("12 decimal digits"), "{err}");
    assert_eq!(
        env.store_state(),
        before,
        "a failed command changed the store"
    );

    // A truncated manifest is detected, never used.
    let manifest = env.store().join("local/snapshots").join(&snap);
    let bytes = fs::read(&manifest).unwrap();
    fs::write(&manifest, &bytes[..bytes.len() - 10]).unwrap();
    let before = env.store_state();
    let err = env.fails(&["volume", "restore", &snap, "out.img"], 4);
    assert!(err.contains(&snap) && err.contains("truncated"), "{err}");
    let err = env.fails(&["snapshot", "describe", &snap], 4);
    assert!(err.contains("truncated"), "{err}");
    assert!(!env.path("out.img").exists());
    // gc refuses to sweep while a manifest is unreadable.
    env.fails(&["store", "gc"], 4);
    assert_eq!(env.store_state(), before);
}

on_each_backend!(
    qemu_img_sees_restored_image_identical,
    qemu_img_sees_restored_image_identical_case
);
fn qemu_img_sees_restored_image_identical_case(env: &Env) {
    let imgs = images();
    let snap = id(&env.snapshot(&imgs.v2, &[]));
    let out = env.path("r.img");
    env.ok(&[
        "volume",
        "restore",
        &snap,
        out.to_str().unwrap(),
        "--size",
        "400M",
    ]);
    assert_eq!(fs::metadata(&out).unwrap().len(), 400 * MIB);
    // qemu-img compares a shorter image as if zero-extended (strict mode off).
    let cmp = sh_ok(&format!(
        "qemu-img compare -f raw -F raw '{}' '{}'",
        imgs.v2.display(),
        out.display()
    ));
    assert!(cmp.contains("identical"), "{cmp}");
    // And a qcow2 made by qemu-img from the restored raw image reads back the same.
    let q = env.path("r.qcow2");
    sh_ok(&format!(
        "qemu-img convert -f raw -O qcow2 '{}' '{}'",
        out.display(),
        q.display()
    ));
    let cmp = sh_ok(&format!(
        "qemu-img compare '{}' '{}'",
        q.display(),
        out.display()
    ));
    assert!(cmp.contains("identical"), "{cmp}");
}

on_each_backend!(
    three_block_states_and_small_block_sizes,
    three_block_states_and_small_block_sizes_case
);
fn three_block_states_and_small_block_sizes_case(env: &Env) {
    let img = env.path("states.img");
    let f = fs::File::create(&img).unwrap();
    let bs = 64 * 1024u64;
    f.set_len(8 * bs + 1000).unwrap(); // last block is short
    f.write_all_at(&random_bytes(5, bs as usize), 0).unwrap(); // block 0: data
    f.write_all_at(&vec![0u8; bs as usize], bs).unwrap(); // block 1: allocated zeros
    f.write_all_at(&random_bytes(6, 10), 3 * bs + 5).unwrap(); // block 3: data
    f.write_all_at(b"tail", 8 * bs + 10).unwrap(); // short last block: data
    f.sync_all().unwrap();
    let snap = env.snapshot(&img, &["--block-size", "64K"]);
    assert_eq!(snap["BlockSize"], 65536);
    let blocks = env.json(&["snapshot", "blocks", &id(&snap)]);
    let states: Vec<&str> = blocks["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["State"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "data", "zero", "hole", "data", "hole", "hole", "hole", "hole", "data"
        ]
    );
    let out = env.path("out.img");
    env.ok(&["volume", "restore", &id(&snap), out.to_str().unwrap()]);
    assert_same(&out, &img);
    // A second snapshot inherits the block size from its parent.
    let again = env.snapshot(&img, &[]);
    assert_eq!(again["BlockSize"], 65536);
    assert_eq!(again["Stats"]["NewChunks"], 0);
    assert_eq!(again["Stats"]["UnchangedBlocks"], 3);
    assert_eq!(again["RootDigest"], snap["RootDigest"]);
}

on_each_backend!(
    delete_and_gc_reclaim_only_unshared_chunks,
    delete_and_gc_reclaim_only_unshared_chunks_case
);
fn delete_and_gc_reclaim_only_unshared_chunks_case(env: &Env) {
    let imgs = images();
    let s1 = id(&env.snapshot(&imgs.v1, &[]));
    // Not incremental to s1 (v2 would find it as its parent by its
    // blocks): its changed blocks are chunks of its own, not deltas that
    // keep s1's chunks alive.
    let s2 = id(&env.snapshot(&imgs.v2, &["--no-parent"]));
    let stats_before = env.json(&["store", "stats"]);
    env.ok(&["snapshot", "delete", &s1]);
    env.fails(&["snapshot", "describe", &s1], 3);
    let gc = env.json(&["store", "gc"]);
    assert!(gc["ChunksRemoved"].as_u64().unwrap() > 0);
    assert!(gc["ChunksRemoved"].as_u64().unwrap() < 40);
    let stats_after = env.json(&["store", "stats"]);
    assert_eq!(
        stats_after["Chunks"].as_u64().unwrap(),
        stats_before["Chunks"].as_u64().unwrap() - gc["ChunksRemoved"].as_u64().unwrap()
    );
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true);
    assert_eq!(v["OrphanChunks"], 0);
    let out = env.path("r2.img");
    env.ok(&["volume", "restore", &s2, out.to_str().unwrap()]);
    assert_same(&out, &imgs.v2);
}

#[test]
fn frozen_formats_of_every_kind_still_read() {
    // testdata/v1-all-formats: every file kind, chunks of every codec (a
    // delta among them), image files, snapshot permissions, instance.json.
    let env = Env::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v1-all-formats");
    sh_ok(&format!(
        "mkdir -p '{0}' && cp -r '{1}' '{0}/local' && cp -r '{2}' '{3}'",
        env.store().display(),
        fixture.join("store").display(),
        fixture.join("instance").display(),
        env.path("inst").display()
    ));
    let owner = ["--account", "244203064162"];
    let (full, incr, ami) = (
        "snap-719fcfabbdb7f4a87",
        "snap-c8e322a722e2962bd",
        "ami-782d1b9366d3a512b",
    );
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    assert_eq!(v["ChunksChecked"], 5, "{v}");
    for (snap, volume) in [(full, "volume-v1.img"), (incr, "volume-v2.img")] {
        let out = env.path(&format!("{snap}.img"));
        env.ok(&["volume", "restore", snap, s(&out), owner[0], owner[1]]);
        assert_same(&out, &fixture.join(volume));
    }
    let d = env.json(&["snapshot", "describe", incr, owner[0], owner[1]]);
    assert_eq!(d["Snapshots"][0]["ParentSnapshotId"], full);
    let p = env.json(&["snapshot", "describe-permissions", incr, owner[0], owner[1]]);
    assert_eq!(
        p["CreateVolumePermissions"],
        serde_json::json!([{"UserId": "222222222222"}])
    );
    let img = env.json(&["image", "describe", ami, owner[0], owner[1]]);
    assert_eq!(img["Images"][0]["Name"], "frozen");
    assert_eq!(
        img["Images"][0]["DeprecationTime"], "2030-01-01T00:00:00Z",
        "{img}"
    );
    let lp = env.json(&["image", "describe-permissions", ami, owner[0], owner[1]]);
    assert_eq!(lp["LaunchPermissions"].as_array().unwrap().len(), 2, "{lp}");
    let inst = env.json(&["instance", "describe", s(&env.path("inst"))]);
    assert_eq!(inst["Instances"][0]["ImageId"], ami, "{inst}");
}

#[test]
fn frozen_page_delta_formats_still_read() {
    // testdata/v5-page-delta: page deltas plain (chunk format version 3)
    // and sealed (version 4) beside chunks of versions 1 and 2.
    let env = Env::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v5-page-delta");
    sh_ok(&format!(
        "mkdir -p '{0}' && cp -r '{1}' '{0}/local'",
        env.store().display(),
        fixture.join("store").display()
    ));
    let mut versions: Vec<u8> = fs::read_dir(fixture.join("store/chunks"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| fs::read(f.unwrap().path()).unwrap()[4])
        .collect();
    versions.sort();
    versions.dedup();
    assert_eq!(
        versions,
        [1, 2, 3, 4],
        "the fixture holds every chunk version"
    );
    env.set_passphrase(Some("blocksnap fixture passphrase"));
    let owner = ["--account", "475138931851"];
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    assert_eq!(v["ChunksChecked"], 10, "{v}");
    assert_eq!(v["ChunksUnchecked"], 0, "{v}");
    let volumes = fixture.join("../v1-all-formats");
    for (snap, volume) in [
        ("snap-62cd89ef25571841c", "volume-v1.img"),
        ("snap-f0f52b21cee495d23", "volume-v2.img"),
        ("snap-56a5a3b864315cec5", "volume-v1.img"),
        ("snap-a6d41eecdf0b41a55", "volume-v2.img"),
    ] {
        let out = env.path(&format!("{snap}.img"));
        env.ok(&["volume", "restore", snap, s(&out), owner[0], owner[1]]);
        assert_same(&out, &volumes.join(volume));
    }
}

#[test]
fn frozen_lifecycle_formats_still_read() {
    // testdata/v4-lifecycle: a policy and its state after a run, retention
    // rules (one locked), a snapshot and an image in the recycle bin.
    let env = Env::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v4-lifecycle");
    sh_ok(&format!(
        "mkdir -p '{0}' && cp -r '{1}' '{0}/local'",
        env.store().display(),
        fixture.join("store").display()
    ));
    let owner = ["--account", "031894645168"];
    let (binned, ami, made) = (
        "snap-a0ec66861b46eff92",
        "ami-7b1b5d8ee611dec8b",
        "snap-376877e9085bd0f18",
    );
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    let rules = env.json(&["recycle-bin", "rule", "list", owner[0], owner[1]]);
    let states: Vec<&str> = rules["Rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["LockState"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 2, "{rules}");
    assert!(states.contains(&"locked"), "{rules}");
    let bin = env.json(&["recycle-bin", "list", owner[0], owner[1]]);
    assert_eq!(bin["Snapshots"][0]["SnapshotId"], binned, "{bin}");
    assert_eq!(bin["Images"][0]["ImageId"], ami, "{bin}");
    let p = env.json(&["policy", "describe", "fixture-policy", owner[0], owner[1]]);
    assert_eq!(p["LastRun"]["Outcome"], "succeeded", "{p}");
    assert_eq!(p["LastRun"]["Targets"][0]["Created"][0], made, "{p}");
    assert_eq!(p["PolicyDetails"]["Schedules"][0]["RetainRule"]["Count"], 2);
    env.ok(&[
        "snapshot",
        "restore-from-recycle-bin",
        binned,
        owner[0],
        owner[1],
    ]);
    env.ok(&["image", "restore-from-recycle-bin", ami, owner[0], owner[1]]);
    let img = env.json(&["image", "describe", ami, owner[0], owner[1]]);
    assert_eq!(img["Images"][0]["State"], "available", "{img}");
    let v1 = fixture.join("../v1-all-formats/volume-v1.img");
    for (snap, volume) in [(binned, v1), (made, fixture.join("volume-v2.img"))] {
        let out = env.path(&format!("{snap}.img"));
        env.ok(&["volume", "restore", snap, s(&out), owner[0], owner[1]]);
        assert_same(&out, &volume);
    }
}

#[test]
fn frozen_encrypted_formats_still_read() {
    // testdata/v2-encrypted: keys (one wrapped in the region, one in a key
    // file), the region's encryption by default, sealed chunks of every
    // codec, encrypted manifests (a full and an incremental), an image
    // manifest of version 2. Passphrase: "blocksnap fixture passphrase".
    let env = Env::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v2-encrypted");
    sh_ok(&format!(
        "mkdir -p '{0}' && cp -r '{1}' '{0}/local'",
        env.store().display(),
        fixture.join("store").display()
    ));
    env.set_passphrase(Some("blocksnap fixture passphrase"));
    let owner = ["--account", "466065103774"];
    let key_file = fixture.join("fixture.key");
    let kf = ["--key-file", s(&key_file)];
    let v = env.json(&["store", "verify", kf[0], kf[1]]);
    assert_eq!(v["Clean"], true, "{v}");
    assert_eq!(v["ChunksChecked"], 11, "{v}");
    assert_eq!(v["ChunksUnchecked"], 0, "{v}");
    // Restores `snap` as the fixture's `volume` was.
    let restores_as = |snap: &str, volume: &str, extra: &[&str]| {
        let out = env.path(&format!("{snap}.img"));
        let restore = ["volume", "restore", snap, s(&out), owner[0], owner[1]];
        env.ok(&[&restore[..], extra].concat());
        assert_same(&out, &fixture.join(volume));
    };
    for (snap, volume) in [
        ("snap-dfe9010889cffe50b", "volume-v1.img"),
        ("snap-03bcf05e62c8f12e1", "volume-v2.img"),
        ("snap-a1bb55f288bdf4d62", "volume-v1.img"),
    ] {
        restores_as(snap, volume, &kf);
    }
    let d = env.json(&[
        "snapshot",
        "describe",
        "snap-03bcf05e62c8f12e1",
        owner[0],
        owner[1],
    ]);
    assert_eq!(d["Snapshots"][0]["Encrypted"], true, "{d}");
    assert_eq!(
        d["Snapshots"][0]["KmsKeyId"],
        "arn:aws:kms:local:466065103774:key/218d56d9-d151-4b03-8b74-55f0ef9456d2"
    );
    let img = env.json(&[
        "image",
        "describe",
        "ami-660dec39716f31515",
        owner[0],
        owner[1],
    ]);
    assert_eq!(
        img["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["Encrypted"],
        true
    );
    let keys = env.json(&["key", "list"]);
    assert_eq!(keys["Aliases"].as_array().unwrap().len(), 2, "{keys}");
    let e = env.json(&["region", "encryption"]);
    assert_eq!(e["EbsEncryptionByDefault"], true, "{e}");
    // Without the key file, its snapshot says how to read it.
    let err = env.fails(
        &[
            "volume",
            "restore",
            "snap-a1bb55f288bdf4d62",
            s(&env.path("x.img")),
            owner[0],
            owner[1],
        ],
        6,
    );
    assert!(err.contains("--key-file"), "{err}");

    // testdata/v3-sealed-meta: manifests of version 3, whose description,
    // tags, source and counts open only with the key.
    let sealed = fixture.with_file_name("v3-sealed-meta");
    sh_ok(&format!(
        "cp -r '{}' '{}/v3'",
        sealed.join("store").display(),
        env.store().display()
    ));
    let v3 = ["--region", "v3"];
    for (snap, volume, description) in [
        ("snap-6103cc8f6efc80782", "volume-v1.img", "v3 full"),
        ("snap-f15809be8f5e0c6f6", "volume-v2.img", "v3 incremental"),
    ] {
        restores_as(snap, volume, &v3);
        let d = env.json(&[
            "snapshot", "describe", snap, owner[0], owner[1], v3[0], v3[1],
        ]);
        assert_eq!(d["Snapshots"][0]["Description"], description, "{d}");
        assert_eq!(d["Snapshots"][0]["Tags"][0]["Value"], "v3", "{d}");
    }
    let v = env.json(&["store", "verify", v3[0], v3[1]]);
    assert_eq!(
        (&v["Clean"], &v["ChunksUnchecked"]),
        (&true.into(), &0.into()),
        "{v}"
    );
    env.set_passphrase(None);
    let d = env.json(&[
        "snapshot",
        "describe",
        "snap-f15809be8f5e0c6f6",
        owner[0],
        owner[1],
        v3[0],
        v3[1],
    ]);
    assert_eq!(d["Snapshots"][0]["Sealed"], true, "{d}");
    assert_eq!(
        d["Snapshots"][0]["ParentSnapshotId"], "snap-6103cc8f6efc80782",
        "{d}"
    );
}

#[test]
fn frozen_v1_formats_still_read() {
    // testdata/v1 is a region written by the first release; it must keep
    // restoring to the same bytes.
    let env = Env::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v1");
    sh_ok(&format!(
        "mkdir -p '{0}' && cp -r '{1}' '{0}/local'",
        env.store().display(),
        fixture.join("store").display()
    ));
    // Its snapshot belongs to account 123456789012, not to the region's
    // default owner: private to it, as every snapshot without permissions.
    let mine = ["--account", "123456789012"];
    let list = env.json(&["snapshot", "list", mine[0], mine[1]]);
    let snaps = list["Snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    let snap = id(&snaps[0]);
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    let out = env.path("fixture.img");
    env.ok(&[
        "volume",
        "restore",
        &snap,
        out.to_str().unwrap(),
        mine[0],
        mine[1],
    ]);
    assert_same(&out, &fixture.join("volume.img"));

    // A region of store version 1 keeps its layout (chunks under four hex
    // digits) as new snapshots are added; a new region fans out by two.
    let other = env.path("other.img");
    fs::write(&other, random_bytes(11, 3 << 20)).unwrap();
    env.snapshot(&other, &[]);
    env.ok(&["region", "add", "fresh"]);
    env.snapshot(&other, &["--region", "fresh"]);
    for (region, version, digits) in [("local", 1, 4), ("fresh", 2, 2)] {
        let root = env.store().join(region);
        let info: serde_json::Value =
            serde_json::from_slice(&fs::read(root.join("store.json")).unwrap()).unwrap();
        assert_eq!(info["version"], version, "{info}");
        for dir in fs::read_dir(root.join("chunks")).unwrap() {
            let name = dir.unwrap().file_name();
            assert_eq!(name.len(), digits, "{region}: {name:?}");
        }
        let v = env.json(&["store", "verify", "--region", region]);
        assert_eq!(v["Clean"], true, "{v}");
    }
    let restored = env.path("other-restored.img");
    let snap = env.json(&["snapshot", "list", "--volume", s(&other)])["Snapshots"][0].clone();
    env.ok(&["volume", "restore", &id(&snap), s(&restored)]);
    assert_same(&other, &restored);
}

#[test]
fn help_documents_exit_codes_and_global_flags_go_anywhere() {
    let env = Env::new();
    let help = env.ok(&["--help"]);
    assert!(
        help.contains("Exit codes") && help.contains("integrity"),
        "{help}"
    );
    let a = env.ok(&["--json", "store", "stats"]);
    let b = env.ok(&["store", "stats", "--json"]);
    assert_eq!(a, b);
    // Only `region add` (or the default region) creates a region: a typo
    // is exit 3 naming the regions there are, and creates nothing.
    let err = env.fails(&["store", "stats", "--region", "eu-wset-1"], 3);
    assert!(err.contains("eu-wset-1") && err.contains("local"), "{err}");
    assert!(!env.store().join("eu-wset-1").exists());
    env.ok(&["region", "add", "eu-west-1"]);
    env.fails(&["region", "add", "eu-west-1"], 5);
    let other = env.json(&["store", "stats", "--region", "eu-west-1"]);
    assert_eq!(other["Region"], "eu-west-1");
    assert!(env.store().join("eu-west-1/store.json").exists());
    env.fails(&["store", "stats", "--region", "Bad_Name"], 2);
}

on_each_backend!(
    changed_blocks_are_stored_as_deltas_that_survive_deletion_gc_and_copy,
    changed_blocks_are_stored_as_deltas_that_survive_deletion_gc_and_copy_case
);
fn changed_blocks_are_stored_as_deltas_that_survive_deletion_gc_and_copy_case(env: &Env) {
    let work = env.path("vol.img");
    let mut data = random_bytes(21, 8 * MIB as usize);
    fs::write(&work, &data).unwrap();
    let first = id(&env.snapshot(&work, &[]));
    let mut versions = vec![(first.clone(), data.clone())];
    // Eight more versions, each with 12 scattered 64 KiB writes: blocks hit
    // again and again grow delta chains past the depth limit.
    let (mut stored_total, mut changed_total) = (0, 0);
    for v in 1..=8u64 {
        let spots = random_bytes(v, 12 * 8);
        for (w, spot) in spots.chunks(8).enumerate() {
            let r = u64::from_le_bytes(spot.try_into().unwrap());
            // A few hot blocks take a third of the writes.
            let at = if w % 3 == 0 {
                (w as u64 % 2) * MIB
            } else {
                r % (8 * MIB - 65536) / 4096 * 4096
            } as usize;
            data[at..at + 65536].copy_from_slice(&random_bytes(v * 100 + w as u64, 65536));
        }
        fs::write(&work, &data).unwrap();
        let snap = env.snapshot(&work, &[]);
        stored_total += snap["Stats"]["NewBytesStored"].as_u64().unwrap();
        changed_total += 12 * 65536;
        versions.push((id(&snap), data.clone()));
    }
    eprintln!("deltas: {stored_total} bytes stored for {changed_total} changed");
    assert!(
        stored_total < changed_total * 13 / 10,
        "{stored_total} bytes stored for {changed_total} changed"
    );
    // Without deltas the same change costs whole blocks.
    let plain = env.snapshot(&work, &["--no-parent", "--no-delta", "--block-size", "1M"]);
    assert!(plain["Stats"]["NewBytesStored"].as_u64().unwrap() >= 8 * MIB);

    let check_all = |versions: &[(String, Vec<u8>)]| {
        for (snap, bytes) in versions {
            let out = env.path(&format!("{snap}.img"));
            let _ = fs::remove_file(&out);
            env.ok(&["volume", "restore", snap, out.to_str().unwrap()]);
            assert!(
                fs::read(&out).unwrap() == *bytes,
                "{snap} restored wrong bytes"
            );
        }
    };
    check_all(&versions);
    // Deleting the snapshots the deltas were made against keeps their bases.
    for (snap, _) in &versions[..7] {
        env.ok(&["snapshot", "delete", snap]);
    }
    env.ok(&["snapshot", "delete", &id(&plain)]);
    env.ok(&["store", "gc"]);
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    check_all(&versions[7..]);

    // A copy to another region carries the bases along.
    let last = &versions[8].0;
    let img = env.json(&[
        "image",
        "register",
        "--name",
        "delta chain",
        "--map",
        &format!("/dev/xvda={last}"),
    ]);
    let copy = env.json(&[
        "image",
        "copy",
        img["ImageId"].as_str().unwrap(),
        "--to-region",
        "r2",
    ]);
    let d = env.json(&[
        "image",
        "describe",
        copy["ImageId"].as_str().unwrap(),
        "--region",
        "r2",
    ]);
    let copied = d["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    let v = env.json(&["store", "verify", "--region", "r2"]);
    assert_eq!(v["Clean"], true, "{v}");
    let out = env.path("copied.img");
    env.ok(&[
        "volume",
        "restore",
        &copied,
        out.to_str().unwrap(),
        "--region",
        "r2",
    ]);
    assert!(fs::read(&out).unwrap() == versions[8].1);
}

/// A 64 MiB ext4 image holding `files` MiB of random files from `seed`.
fn random_ext4(env: &Env, name: &str, seed: u64, files: usize) -> std::path::PathBuf {
    let src = env.path(&format!("{name}-src"));
    fs::create_dir_all(&src).unwrap();
    for i in 0..files {
        let len = MIB as usize - 4096 * (i % 7);
        fs::write(
            src.join(format!("f{i}")),
            random_bytes(seed * 1000 + i as u64, len),
        )
        .unwrap();
    }
    let img = env.path(&format!("{name}.img"));
    sh_ok(&format!(
        "truncate -s 64M '{0}' && mkfs.ext4 -q -F -d '{1}' '{0}'",
        img.display(),
        src.display()
    ));
    img
}

#[test]
fn a_copy_at_a_new_path_finds_its_parent_by_a_sample_of_its_blocks() {
    let env = Env::new();
    let img = random_ext4(&env, "disk", 1, 48);
    let first = env.snapshot(&img, &[]);
    // A copy, changed by 4 KiB writes at 1 % of its pages, spread at random.
    let copy = env.path("copy.img");
    fs::copy(&img, &copy).unwrap();
    let pages = 64 * MIB / 4096;
    let f = fs::OpenOptions::new().write(true).open(&copy).unwrap();
    let picks = random_bytes(7, 8 * (pages as usize / 100));
    let mut changed = std::collections::BTreeSet::new();
    for (n, p) in picks.chunks_exact(8).enumerate() {
        let page = u64::from_le_bytes(p.try_into().unwrap()) % pages;
        f.write_all_at(&random_bytes(100 + n as u64, 4096), page * 4096)
            .unwrap();
        changed.insert(page);
    }
    drop(f);
    let changed_bytes = changed.len() as u64 * 4096;

    let o = env.run(&["snapshot", "create", s(&copy), "--json"]);
    assert!(o.status.success(), "{o:?}");
    let snap: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let said = String::from_utf8_lossy(&o.stderr);
    assert_eq!(snap["ParentSnapshotId"], first["SnapshotId"], "{snap}");
    assert!(
        said.contains(&format!("taking {} as its parent", id(&first)))
            && said.contains("sampled data blocks are the same")
            && said.contains("--no-parent"),
        "{said}"
    );
    let stored = snap["Stats"]["NewBytesStored"].as_u64().unwrap();
    // Without the parent the same copy stores its changed blocks whole.
    env.ok(&["region", "add", "alone"]);
    env.ok(&["snapshot", "create", s(&img), "--region", "alone"]);
    let alone = env.json(&[
        "snapshot",
        "create",
        s(&copy),
        "--no-parent",
        "--region",
        "alone",
    ]);
    let whole = alone["Stats"]["NewBytesStored"].as_u64().unwrap();
    assert!(
        stored * 5 < whole && stored < 3 * changed_bytes,
        "{stored} bytes stored with the parent, {whole} without, {changed_bytes} changed"
    );
    let out = env.path("restored.img");
    env.ok(&["volume", "restore", &id(&snap), s(&out)]);
    assert_same(&copy, &out);
    assert_fsck_clean(&out);
    // The copy now has a lineage of its own.
    let next = env.snapshot(&copy, &[]);
    assert_eq!(next["ParentSnapshotId"], snap["SnapshotId"]);

    // A volume of the same size sharing nothing takes no parent.
    let other = random_ext4(&env, "other", 2, 40);
    let o = env.run(&["snapshot", "create", s(&other), "--json"]);
    assert!(o.status.success(), "{o:?}");
    let fresh: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(fresh.get("ParentSnapshotId").is_none(), "{fresh}");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("as its parent"));
    let out = env.path("other-restored.img");
    env.ok(&["volume", "restore", &id(&fresh), s(&out)]);
    assert_same(&other, &out);

    // A candidate whose manifest is damaged is passed over, and said.
    let manifest = env.store().join("local/snapshots").join(id(&first));
    let mut m = fs::read(&manifest).unwrap();
    *m.last_mut().unwrap() ^= 1;
    fs::write(&manifest, &m).unwrap();
    let third = env.path("third.img");
    fs::copy(&copy, &third).unwrap();
    let o = env.run(&["snapshot", "create", s(&third), "--json"]);
    assert!(o.status.success(), "{o:?}");
    let taken: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(taken["ParentSnapshotId"], next["SnapshotId"], "{taken}");
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains(&format!("not comparing with {}", id(&first))),
        "{said}"
    );
}

#[test]
fn a_few_changed_pages_are_stored_as_a_page_delta_and_restore_exactly() {
    // Block 1 (of 512 KiB) gets three 4 KiB pages rewritten: the
    // incremental stores them as a page delta (codec 3, chunk format
    // version 3) against the parent's chunk, a few KiB, not the block.
    let env = Env::new();
    let vol = env.path("vol.img");
    let mut data = random_bytes(7, 2 * MIB as usize);
    fs::write(&vol, &data).unwrap();
    let first = id(&env.snapshot(&vol, &[]));
    for page in [130usize, 131, 200] {
        data[page * 4096..(page + 1) * 4096].copy_from_slice(&random_bytes(page as u64, 4096));
    }
    fs::write(&vol, &data).unwrap();
    let second = env.snapshot(&vol, &["--parent", &first]);
    let new = &second["Stats"];
    assert_eq!(new["NewChunks"], 1, "{second}");
    let stored = new["NewBytesStored"].as_u64().unwrap();
    assert!(
        stored < 4 * 4096,
        "{stored} bytes stored for 3 pages: {second}"
    );
    let chunk = env.read_stored("local", &env.chunk_key(&id(&second), 1, "local"));
    assert_eq!((chunk[4], chunk[5]), (3, 3), "a page delta at version 3");
    let out = env.path("out.img");
    env.ok(&["volume", "restore", &id(&second), s(&out)]);
    assert_same(&out, &vol);
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
}
