//! Crash safety, concurrency, locking, corruption and resource faults, with
//! the real binary: SIGKILL at many points, parallel commands, a held lock,
//! a full disk, damaged chunks and manifests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

/// Wall time of one uninterrupted run.
fn timed(env: &Env, args: &[&str]) -> Duration {
    let t = Instant::now();
    env.ok(args);
    t.elapsed()
}

/// Starts `args`, SIGKILLs it after `after` (if still running); returns
/// whether it had already finished.
fn kill_after(env: &Env, args: &[&str], after: Duration) -> bool {
    let mut child: Child = env
        .command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    sleep(after);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    child.wait().unwrap();
    finished
}

/// `store verify` passes (orphan chunks and leftovers are fine).
fn assert_verified(env: &Env, region: &str, context: &str) {
    let out = env.run(&["store", "verify", "--region", region, "--json"]);
    assert!(
        out.status.success(),
        "verify failed after {context}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` kill points spread evenly over a run of length `t` (and a little past
/// it, to catch the commit itself).
fn kill_points(t: Duration, n: u32) -> Vec<Duration> {
    (1..=n)
        .map(|k| t.mul_f64(k as f64 / n as f64 * 1.1))
        .collect()
}

#[test]
fn sigkill_at_many_points_never_leaves_an_inconsistent_store() {
    let imgs = images();
    let env = Env::new();
    let mut kills = 0;
    let mut finished_before_kill = 0;

    // snapshot create: each killed run, then verify, rerun, restore, compare.
    let probe = Env::new();
    let t = timed(&probe, &["snapshot", "create", s(&imgs.v1)]);
    for (i, at) in kill_points(t, 12).into_iter().enumerate() {
        let vol = if i % 2 == 0 { &imgs.v1 } else { &imgs.v2 };
        finished_before_kill += kill_after(&env, &["snapshot", "create", s(vol)], at) as u32;
        kills += 1;
        assert_verified(&env, "local", &format!("snapshot create killed at {at:?}"));
        let snap = id(&env.snapshot(vol, &[]));
        let out = env.path("check.img");
        env.ok(&["volume", "restore", &snap, s(&out)]);
        assert_same(&out, vol);
        fs::remove_file(&out).unwrap();
    }

    // volume restore: never a half-written file under the final name.
    let snap = id(&env.snapshot(&imgs.v1, &[]));
    let target = env.path("restored.img");
    let t = timed(&env, &["volume", "restore", &snap, s(&target)]);
    fs::remove_file(&target).unwrap();
    for at in kill_points(t, 6) {
        let done = kill_after(&env, &["volume", "restore", &snap, s(&target)], at);
        finished_before_kill += done as u32;
        kills += 1;
        if target.exists() {
            assert_same(&target, &imgs.v1);
            fs::remove_file(&target).unwrap();
        }
        env.ok(&["volume", "restore", &snap, s(&target)]);
        assert_same(&target, &imgs.v1);
        fs::remove_file(&target).unwrap();
    }

    // image create: killed part-way leaves snapshots at most, never a broken image.
    let root = env.path("root.img");
    sparse_copy(&imgs.v2, &root);
    let map = format!("/dev/xvda={}", s(&root));
    let t = timed(
        &Env::new(),
        &["image", "create", "--name", "probe", "--map", &map],
    );
    for (i, at) in kill_points(t, 6).into_iter().enumerate() {
        let name = format!("killed {i}");
        finished_before_kill += kill_after(
            &env,
            &["image", "create", "--name", &name, "--map", &map],
            at,
        ) as u32;
        kills += 1;
        assert_verified(&env, "local", &format!("image create killed at {at:?}"));
        env.ok(&[
            "image",
            "create",
            "--name",
            &format!("retry {i}"),
            "--map",
            &map,
        ]);
    }

    // image copy to another region.
    let list = env.json(&["image", "list"]);
    let ami = list["Images"][0]["ImageId"].as_str().unwrap().to_string();
    env.ok(&["region", "add", "probe"]);
    let t = timed(&env, &["image", "copy", &ami, "--to-region", "probe"]);
    for (i, at) in kill_points(t, 6).into_iter().enumerate() {
        let region = format!("copy-{i}");
        env.ok(&["region", "add", &region]);
        let args = [
            "image",
            "copy",
            ami.as_str(),
            "--to-region",
            region.as_str(),
        ];
        finished_before_kill += kill_after(&env, &args, at) as u32;
        kills += 1;
        assert_verified(&env, &region, &format!("image copy killed at {at:?}"));
        assert_verified(&env, "local", &format!("image copy killed at {at:?}"));
        let copy = env.json(&[
            "image",
            "copy",
            &ami,
            "--to-region",
            &region,
            "--name",
            "retried copy",
        ]);
        let inst = env.path(&format!("inst-{i}"));
        env.ok(&[
            "instance",
            "launch",
            copy["ImageId"].as_str().unwrap(),
            s(&inst),
            "--region",
            &region,
        ]);
        sh_ok(&format!(
            "cmp -n {IMAGE_SIZE} '{}' '{}'",
            inst.join("xvda.img").display(),
            imgs.v2.display()
        ));
        fs::remove_dir_all(&inst).unwrap();
    }

    // store gc after deleting most snapshots: killed mid-sweep, the rest stays whole.
    let keep = id(&env.snapshot(&imgs.v1, &["--no-parent"]));
    let gc_env = &env;
    for (i, at) in [2u64, 5, 10, 20, 40, 80].into_iter().enumerate() {
        let doomed = id(&gc_env.snapshot(&imgs.v2, &["--no-parent", "--block-size", "64K"]));
        gc_env.ok(&["snapshot", "delete", &doomed]);
        finished_before_kill +=
            kill_after(gc_env, &["store", "gc"], Duration::from_millis(at)) as u32;
        kills += 1;
        assert_verified(
            gc_env,
            "local",
            &format!("store gc killed after {at} ms (round {i})"),
        );
        gc_env.ok(&["store", "gc"]);
    }
    let out = env.path("kept.img");
    env.ok(&["volume", "restore", &keep, s(&out)]);
    assert_same(&out, &imgs.v1);

    assert!(kills >= 30, "only {kills} kill points");
    eprintln!(
        "crash harness: {kills} SIGKILLs, {finished_before_kill} of them after the command had finished"
    );
}

#[test]
fn concurrent_snapshots_restores_and_gc_all_end_correctly() {
    let imgs = images();
    let env = Env::new();
    let base = id(&env.snapshot(&imgs.v1, &[]));
    let copy_path = env.path("third.img");
    sparse_copy(&imgs.v2, &copy_path);
    let mut children: Vec<(String, Child)> = Vec::new();
    let spawn = |args: &[&str]| {
        env.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for (name, vol) in [
        ("v1", &imgs.v1),
        ("v2", &imgs.v2),
        ("third", &copy_path),
        ("v2 again", &imgs.v2),
    ] {
        children.push((
            format!("snapshot {name}"),
            spawn(&["snapshot", "create", s(vol), "--json"]),
        ));
    }
    for i in 0..2 {
        let t = env.path(&format!("r{i}.img"));
        children.push((
            format!("restore {i}"),
            spawn(&["volume", "restore", &base, s(&t)]),
        ));
    }
    for i in 0..3 {
        children.push((format!("gc {i}"), spawn(&["store", "gc"])));
    }
    let mut created: Vec<(String, String)> = Vec::new();
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if name.starts_with("snapshot") {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            created.push((id(&v), v["SourcePath"].as_str().unwrap().to_string()));
        }
    }
    for i in 0..2 {
        assert_same(&env.path(&format!("r{i}.img")), &imgs.v1);
    }
    assert_verified(&env, "local", "concurrent commands");
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["OrphanChunks"], 0, "gc left orphans: {v}");
    for (snap, source) in created {
        let out = env.path(&format!("{snap}.img"));
        env.ok(&["volume", "restore", &snap, s(&out)]);
        assert_same(&out, Path::new(&source));
    }
}

#[test]
fn a_lock_held_by_a_killed_process_does_not_block() {
    let env = Env::new();
    let img = env.path("disk.img");
    fs::write(&img, text_bytes(1, MIB as usize)).unwrap();
    env.ok(&["store", "stats"]);
    let lock = env.store().join("local/lock");
    // Another process holds the store exclusively (as gc does)...
    let mut holder = hold_exclusive(&lock, 60);
    let snapshot_waiting = |secs: &str| {
        env.command(&["snapshot", "create", s(&img)])
            .env("BLOCKSNAP_LOCK_WAIT", secs)
            .output()
            .unwrap()
    };
    let out = snapshot_waiting("1");
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked") && err.contains("gc"), "{err}");
    // ...and is killed: the kernel drops its lock, and the next command runs.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = snapshot_waiting("1");
    assert!(
        out.status.success(),
        "the dead holder's lock still blocks: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A waiting command proceeds as soon as a live holder lets go.
    let mut holder = hold_exclusive(&lock, 1);
    let out = snapshot_waiting("30");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    holder.wait().unwrap();
}

/// Another process holding `lock` exclusively for `secs` seconds. With
/// --no-fork the holder is the very process a kill ends (no child keeps
/// the lock).
fn hold_exclusive(lock: &Path, secs: u32) -> Child {
    let child = Command::new("flock")
        .args(["--no-fork", "-x"])
        .arg(lock)
        .args(["sleep", &secs.to_string()])
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(300));
    child
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(path: PathBuf, size: &str) -> Option<SmallFs> {
        fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs(path)),
            Ok(o) => {
                skip(format!(
                    "cannot mount a tmpfs: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skip(format!("mount not runnable: {e}"));
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_no_snapshot() {
    let env = Env::new();
    let Some(small) = SmallFs::mount(env.path("small"), "12m") else {
        return;
    };
    let store = small.0.join("store");
    let big = env.path("big.img");
    fs::write(&big, random_bytes(11, 48 * MIB as usize)).unwrap();
    let run = |args: &[&str]| {
        env.command(args)
            .env("BLOCKSNAP_STORE", &store)
            .output()
            .unwrap()
    };
    let out = run(&["snapshot", "create", s(&big)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no space left") && err.contains(s(&store)),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let snaps = fs::read_dir(store.join("local/snapshots")).map_or(0, |d| d.count());
    assert_eq!(snaps, 0, "a manifest was written on a full disk");
    let verify = run(&["store", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // gc reclaims what the failed run left; a snapshot that fits then works.
    assert!(run(&["store", "gc"]).status.success());
    let smallimg = env.path("small.img");
    fs::write(&smallimg, text_bytes(2, 2 * MIB as usize)).unwrap();
    let ok = run(&["snapshot", "create", s(&smallimg), "--json"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A restore onto the full file system fails cleanly too.
    let filler = small.0.join("filler");
    let _ = fs::write(&filler, vec![1u8; 12 * MIB as usize]);
    let snap: Value = serde_json::from_slice(&ok.stdout).unwrap();
    let target = small.0.join("restored.img");
    let out = run(&["volume", "restore", &id(&snap), s(&target)]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        !target.exists(),
        "a partial restore was left under the final name"
    );
}

#[test]
fn an_unusable_store_path_is_a_clear_error() {
    let env = Env::new();
    let not_a_dir = env.path("file");
    fs::write(&not_a_dir, b"x").unwrap();
    let out = env
        .command(&["snapshot", "list"])
        .env("BLOCKSNAP_STORE", &not_a_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(s(&not_a_dir)), "{err}");
}

#[test]
fn every_kind_of_damage_is_found_by_verify_and_refused_by_restore() {
    let env = Env::new();
    let img = env.path("disk.img");
    fs::write(
        &img,
        [
            text_bytes(1, 3 * MIB as usize),
            random_bytes(2, 3 * MIB as usize),
        ]
        .concat(),
    )
    .unwrap();
    let snap = id(&env.snapshot(&img, &["--block-size", "64K"]));
    let blocks = env.json(&["snapshot", "blocks", &snap]);
    let chunks: Vec<String> = blocks["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["Checksum"].as_str().map(String::from))
        .collect();
    let chunk_path = |c: &str| env.store().join("local").join(env.chunk_key_of(c, "local"));
    let manifest = env.store().join("local/snapshots").join(&snap);
    let good_manifest = fs::read(&manifest).unwrap();
    let out = env.path("out.img");

    type Damage = Box<dyn Fn()>;
    let flip = |p: PathBuf, at: fn(usize) -> usize| -> Damage {
        Box::new(move || {
            let mut b = fs::read(&p).unwrap();
            let i = at(b.len());
            b[i] ^= 0x20;
            fs::write(&p, b).unwrap();
        })
    };
    let truncate = |p: PathBuf| -> Damage {
        Box::new(move || {
            let b = fs::read(&p).unwrap();
            fs::write(&p, &b[..b.len() / 2]).unwrap();
        })
    };
    let delete = |p: PathBuf| -> Damage { Box::new(move || fs::remove_file(&p).unwrap()) };
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "flipped chunk payload",
            flip(chunk_path(&chunks[0]), |n| n - 1),
            "CorruptChunks",
        ),
        (
            "flipped chunk header",
            flip(chunk_path(&chunks[10]), |_| 8),
            "CorruptChunks",
        ),
        (
            "truncated chunk",
            truncate(chunk_path(&chunks[60])),
            "CorruptChunks",
        ),
        (
            "deleted chunk",
            delete(chunk_path(&chunks[70])),
            "MissingChunks",
        ),
        (
            "flipped manifest byte",
            flip(manifest.clone(), |n| n / 2),
            "DamagedManifests",
        ),
        (
            "truncated manifest",
            truncate(manifest.clone()),
            "DamagedManifests",
        ),
    ];
    for (what, damage, category) in cases {
        let before = env.store_state();
        damage();
        let v = env.run(&["store", "verify", "--json"]);
        assert_eq!(v.status.code(), Some(4), "verify missed a {what}");
        let report: Value = serde_json::from_slice(&v.stdout).unwrap();
        assert_eq!(
            report[category].as_array().unwrap().len(),
            1,
            "{what}: {report}"
        );
        let err = env.fails(&["volume", "restore", &snap, s(&out)], 4);
        assert!(!out.exists(), "{what}: restore left a file");
        if category != "DamagedManifests" {
            assert!(
                err.contains(&snap) && err.contains("offset"),
                "{what}: {err}"
            );
        }
        // Put the store back as it was for the next case.
        for (p, b) in &before {
            fs::write(p, b).unwrap();
        }
    }
    assert_eq!(fs::read(&manifest).unwrap(), good_manifest);

    // --repair moves a corrupt chunk aside; a new snapshot of the same data heals it.
    flip(chunk_path(&chunks[5]), |n| n - 1)();
    let v = env.run(&["store", "verify", "--repair", "--json"]);
    assert_eq!(v.status.code(), Some(4));
    let report: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(report["Quarantined"], 1);
    assert!(chunk_path(&chunks[5]).with_extension("bad").exists());
    let still = env.run(&["store", "verify", "--snapshot", &snap]);
    assert_eq!(
        still.status.code(),
        Some(4),
        "the moved-aside chunk is needed until healed"
    );
    let healed = env.snapshot(&img, &["--no-parent", "--block-size", "64K"]);
    assert_eq!(
        healed["Stats"]["NewChunks"], 1,
        "the heal did not rewrite exactly the lost chunk"
    );
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    env.ok(&["volume", "restore", &snap, s(&out)]);
    assert_same(&out, &img);

    // volume verify: a matching volume, then one with a changed block.
    let r = env.json(&["volume", "verify", &snap, s(&out)]);
    assert_eq!(r["Matches"], true);
    let f = fs::OpenOptions::new().write(true).open(&out).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed", 70_000).unwrap();
    let v = env.run(&["volume", "verify", &snap, s(&out), "--json"]);
    assert_eq!(v.status.code(), Some(4));
    let r: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(
        r["DifferingRanges"],
        serde_json::json!([{"FirstBlock": 1, "LastBlock": 1, "Offset": 65536, "Length": 65536}])
    );
}

#[test]
fn formats_from_a_newer_blocksnap_are_never_called_damage() {
    let env = Env::new();
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(40, 2 * MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let chunk = env
        .store()
        .join("local")
        .join(env.chunk_key(&snap, 0, "local"));

    // A chunk in a later format version (5: 2 is a sealed chunk, 3 and 4
    // page deltas, known): reported as such, and `--repair` leaves it where
    // it is.
    let mut bytes = fs::read(&chunk).unwrap();
    bytes[4] = 5;
    fs::write(&chunk, &bytes).unwrap();
    let out = env.run(&["store", "verify", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["NewerChunks"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["CorruptChunks"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["Quarantined"], 0, "{v}");
    assert!(chunk.exists());
    let err = env.fails(&["volume", "restore", &snap, s(&env.path("r.img"))], 1);
    assert!(
        err.contains("newer blocksnap") && err.contains("upgrade"),
        "{err}"
    );

    // A manifest of a later version (4: 2 and 3 are encrypted manifests,
    // known) says "upgrade"; version 0 never existed, so it is damage.
    let manifest = env.store().join("local/snapshots").join(&snap);
    let original = fs::read(&manifest).unwrap();
    for (version, says) in [(4u32, "newer blocksnap"), (0, "never written")] {
        let mut m = original.clone();
        m[8..12].copy_from_slice(&version.to_le_bytes());
        fs::write(&manifest, &m).unwrap();
        let out = env.run(&["snapshot", "describe", &snap]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "version {version}: {err}");
        assert_eq!(err.contains("upgrade"), version == 4, "{err}");
    }
}

on_each_backend!(
    quarantined_chunks_are_counted_and_purged_on_request,
    quarantined_chunks_are_counted_and_purged_on_request_case
);
fn quarantined_chunks_are_counted_and_purged_on_request_case(env: &Env) {
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(41, 2 * MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let key = env.chunk_key(&snap, 1, "local");
    let mut bytes = env.read_stored("local", &key);
    bytes[40] ^= 0x04;
    env.write_stored("local", &key, &bytes);
    let out = env.run(&["store", "verify", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Quarantined"], 1, "{v}");
    assert_eq!(v["QuarantineHeld"], 1, "{v}");

    let stats = env.json(&["store", "stats"]);
    assert_eq!(stats["QuarantinedChunks"], 1, "{stats}");
    assert_eq!(stats["QuarantinedBytes"], bytes.len() as u64, "{stats}");
    // gc keeps them for inspection unless asked.
    let gc = env.json(&["store", "gc"]);
    assert_eq!(gc["QuarantinedKept"], 1, "{gc}");
    assert_eq!(env.json(&["store", "stats"])["QuarantinedChunks"], 1);
    let gc = env.json(&["store", "gc", "--purge-quarantine"]);
    assert_eq!(gc["QuarantinedRemoved"], 1, "{gc}");
    let stats = env.json(&["store", "stats"]);
    assert_eq!(stats["QuarantinedChunks"], 0, "{stats}");
    // The healing snapshot stores the block again.
    let healed = env.snapshot(&vol, &[]);
    assert_eq!(healed["Stats"]["NewChunks"], 1, "{healed}");
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
}
