//! Lazy instances and lazy volumes, through the kernel's own clients: an
//! image of a real ext4 root launched `--lazy`, attached as a FUSE file,
//! loop-mounted read-write and changed by ext4; then snapshotted from its
//! dirty map and compared byte for byte with a normal launch.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::*;

/// A running `instance attach`, ended and reaped when dropped.
pub struct Attached {
    child: Option<Child>,
    dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Attached {
    /// `instance attach DIR EXTRA…`, once `DIR/xvda.img` is served; `None`
    /// (skipped) where this machine cannot mount FUSE file systems.
    pub fn start(env: &Env, dir: &Path, extra: &[&str]) -> Option<Attached> {
        if !Path::new("/dev/fuse").exists() {
            skip("no /dev/fuse: FUSE is not available here");
            return None;
        }
        let mut args = vec!["instance", "attach", s(dir)];
        args.extend_from_slice(extra);
        let mut child = env
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !dir.join("xvda.img").exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("Operation not permitted") || err.contains("Permission denied") {
                    skip(format!("cannot mount FUSE here: {err}"));
                    return None;
                }
                panic!("instance attach exited early ({status}): {err}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "never attached"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(|l| l.ok())
            {
                let mut log = lines.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Some(Attached {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
        })
    }

    /// Waits until the attach logs a line containing `what`.
    pub fn await_log(&self, what: &str, limit: Duration) {
        let started = Instant::now();
        while !self.log.lock().unwrap().contains(what) {
            assert!(
                started.elapsed() < limit,
                "never logged {what:?}: {}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the mount is left dead behind it, as after a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits for the attach to end by itself; returns what it logged.
    pub fn wait(mut self) -> String {
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(status.success(), "{status}");
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Registers an image of `root` as /dev/xvda and returns its id.
fn image_of(env: &Env, name: &str, root: &Path) -> String {
    let v = env.json(&[
        "image",
        "create",
        "--name",
        name,
        "--map",
        &format!("/dev/xvda={}", s(root)),
    ]);
    v["ImageId"].as_str().unwrap().to_string()
}

/// The contents of `path` inside the ext4 image `img`.
fn ext4_cat(img: &Path, path: &str) -> Vec<u8> {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .unwrap();
    out.stdout
}

#[test]
fn a_lazy_instance_changed_by_ext4_snapshots_only_what_was_written() {
    let env = Env::new();
    let root = env.path("root.img");
    sparse_copy(&images().v1, &root);
    let ami = image_of(&env, "ext4-root", &root);

    let dir = env.path("lazy");
    let v = env.json(&["instance", "launch", &ami, s(&dir), "--lazy"]);
    assert_eq!(v["Instances"][0]["Version"], 2, "{v}");
    // Nothing was restored: the overlay holds no byte yet.
    assert_eq!(allocated(&dir.join("xvda.overlay")), 0);
    assert!(!dir.join("xvda.img").exists());

    let Some(attached) = Attached::start(&env, &dir, &[]) else {
        return;
    };
    let volume = dir.join("xvda.img");
    // Through the FUSE file, the volume is the image's root, grown to its
    // VolumeSize with zeros.
    assert_same_prefix(&root, &volume);
    // While attached, the instance is still described.
    let d = env.json(&["instance", "describe", s(&dir)]);
    assert_eq!(d["Instances"][0]["ImageId"], ami.as_str());

    // ext4 on a loop device over the FUSE file: write a file, edit one,
    // delete one.
    let Some(dev) = attach_loop(&volume) else {
        return;
    };
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    sh_ok(&format!("mount {} {}", dev.0, s(&mnt)));
    let added = random_bytes(77, 2 * MIB as usize);
    fs::write(mnt.join("data/added.bin"), &added).unwrap();
    let mut conf = fs::read(mnt.join("etc/conf3.txt")).unwrap();
    conf.extend_from_slice(b"\nedited by the lazy instance\n");
    fs::write(mnt.join("etc/conf3.txt"), &conf).unwrap();
    fs::remove_file(mnt.join("data/small5.bin")).unwrap();
    sh_ok(&format!("umount {}", s(&mnt)));
    drop(dev);

    // The image of the instance reads only the dirty blocks.
    let v = env.json(&[
        "image",
        "create",
        "--name",
        "changed",
        "--instance",
        s(&dir),
    ]);
    let snap = &v["Snapshots"][0];
    let (read, taken) = (
        snap["BlocksRead"].as_u64().unwrap(),
        snap["BlocksTaken"].as_u64().unwrap(),
    );
    let blocks = read + taken;
    assert!(read > 0, "{v}");
    assert!(
        read * 10 < blocks,
        "read {read} of {blocks} blocks for a few MiB of change"
    );
    assert!(snap["NewChunks"].as_u64().unwrap() <= read, "{v}");
    let changed = v["ImageId"].as_str().unwrap().to_string();

    // A normal launch of the new image is byte-equal to the lazy volume,
    // and its file system holds the changes.
    let plain = env.path("plain");
    env.ok(&["instance", "launch", &changed, s(&plain)]);
    let restored = plain.join("xvda.img");
    assert_same(&restored, &volume);
    assert_fsck_clean(&restored);
    assert!(ext4_cat(&restored, "/data/added.bin") == added);
    assert!(ext4_cat(&restored, "/etc/conf3.txt") == conf);
    assert!(ext4_cat(&restored, "/data/small5.bin").is_empty());

    // The dirty map restarted: with no write since, nothing is read.
    let again = env.json(&["snapshot", "create", s(&volume)]);
    assert_eq!(again["BlocksRead"], 0, "{again}");
    assert_eq!(again["ParentSnapshotId"], snap["SnapshotId"], "{again}");
    // Writes through the FUSE file itself count too.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&volume).unwrap();
        f.write_all_at(&[0x5a; 4096], 300 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    let third = env.json(&["snapshot", "create", s(&volume)]);
    assert_eq!(third["BlocksRead"], 1, "{third}");

    // gc cannot run under a served volume; terminate detaches and deletes.
    env.gc_is_held_off("under an attached instance");
    let t = env.ok(&["instance", "terminate", s(&dir)]);
    assert!(t.contains("deleted"), "{t}");
    attached.wait();
    for f in ["xvda.overlay", "xvda.overlay.dirty", "xvda.overlay.present"] {
        assert!(!dir.join(f).exists(), "{f} left behind");
    }
    let d = env.json(&["instance", "describe", s(&dir)]);
    assert_eq!(d["Instances"][0]["State"], "terminated");
}

#[test]
fn a_hydrated_lazy_instance_no_longer_needs_the_store() {
    let env = Env::new();
    let root = env.path("root.img");
    fs::write(&root, random_bytes(5, 24 * MIB as usize)).unwrap();
    let ami = image_of(&env, "hydrate-me", &root);
    let dir = env.path("lazy");
    env.ok(&["instance", "launch", &ami, s(&dir), "--lazy"]);
    let Some(attached) = Attached::start(&env, &dir, &["--hydrate"]) else {
        return;
    };
    attached.await_log("hydrated /dev/xvda", Duration::from_secs(120));
    // With its chunks gone, the volume still reads in full.
    let chunks = env.store().join("local/chunks");
    let away = env.path("chunks.away");
    fs::rename(&chunks, &away).unwrap();
    let volume = dir.join("xvda.img");
    let got = fs::read(&volume).unwrap();
    fs::rename(&away, &chunks).unwrap();
    assert!(got[..24 * MIB as usize] == fs::read(&root).unwrap()[..]);
    assert!(got[24 * MIB as usize..].iter().all(|&b| b == 0));
    // Unmounted from outside, the attach ends cleanly; hydration marked
    // every granule present (1 GiB: 262,144 granules, 32 KiB of bitmap).
    sh_ok(&format!("umount {}", s(&dir)));
    attached.wait();
    let map = fs::read(dir.join("xvda.overlay.present")).unwrap();
    assert_eq!(map.len(), 96 + 32768);
    assert!(
        map[96..].iter().all(|&b| b == 0xff),
        "not every granule present"
    );
    env.ok(&["instance", "terminate", s(&dir)]);
}

#[test]
fn a_lazy_instance_snapshots_the_same_without_being_attached() {
    let env = Env::new();
    let root = env.path("root.img");
    fs::write(&root, random_bytes(6, 8 * MIB as usize)).unwrap();
    let ami = image_of(&env, "offline", &root);
    let dir = env.path("lazy");
    env.ok(&["instance", "launch", &ami, s(&dir), "--lazy"]);
    // Another account may not take a snapshot it cannot read as a parent.
    let e = env.fails(
        &[
            "snapshot",
            "create",
            s(&dir.join("xvda.img")),
            "--account",
            "111111111111",
        ],
        6,
    );
    assert!(e.contains("111111111111"), "{e}");
    // Attached or not, an overlay is one process's at a time.
    let v = env.json(&[
        "image",
        "create",
        "--name",
        "offline-1",
        "--instance",
        s(&dir),
    ]);
    assert_eq!(v["Snapshots"][0]["BlocksRead"], 0, "{v}");
    // A wrong flag for a lazy volume is refused with the reason.
    let e = env.fails(
        &[
            "snapshot",
            "create",
            s(&dir.join("xvda.img")),
            "--no-parent",
        ],
        2,
    );
    assert!(e.contains("lazy volume"), "{e}");
    // The instance's launch metadata is a released format: an unknown
    // newer version is named as such.
    let json = fs::read_to_string(dir.join("instance.json")).unwrap();
    fs::write(
        dir.join("instance.json"),
        json.replace("\"Version\": 2", "\"Version\": 9"),
    )
    .unwrap();
    let e = env.fails(&["instance", "describe", s(&dir)], 1);
    assert!(e.contains("newer blocksnap"), "{e}");
}

/// `a` equals the first bytes of `b`, and the rest of `b` is zeros.
fn assert_same_prefix(a: &Path, b: &Path) {
    let n = fs::metadata(a).unwrap().len();
    let out = std::process::Command::new("cmp")
        .args(["-n", &n.to_string()])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} is not the start of {}",
        s(a),
        s(b)
    );
    let tail = sh_ok(&format!(
        "tail -c +{} '{}' | tr -d '\\0' | wc -c",
        n + 1,
        s(b)
    ));
    assert_eq!(tail.trim(), "0", "{} holds more than zeros past {n}", s(b));
}

#[test]
fn a_lazy_volume_survives_its_attach_killed_at_any_point_of_a_snapshot() {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    let root = env.path("root.img");
    let base = random_bytes(8, 8 * MIB as usize);
    fs::write(&root, &base).unwrap();
    let ami = image_of(&env, "killed", &root);
    let dir = env.path("lazy");
    env.ok(&["instance", "launch", &ami, s(&dir), "--lazy"]);
    let volume = dir.join("xvda.img");
    let mut want = base.clone();
    want.resize(1 << 30, 0);
    for k in 0..8u64 {
        let Some(attached) = Attached::start(&env, &dir, &[]) else {
            return;
        };
        // What was written before is there after a SIGKILL and a restart,
        // even one in the middle of a snapshot.
        let mut got = vec![0u8; 16 * MIB as usize];
        fs::File::open(&volume)
            .unwrap()
            .read_exact_at(&mut got, 0)
            .unwrap();
        assert!(
            got[..] == want[..got.len()],
            "round {k}: the volume changed across a kill"
        );
        let at = k * MIB + 4096 * (k + 1);
        let f = fs::OpenOptions::new().write(true).open(&volume).unwrap();
        f.write_all_at(&[k as u8 + 1; 20_000], at).unwrap();
        f.sync_all().unwrap();
        drop(f);
        want[at as usize..at as usize + 20_000].fill(k as u8 + 1);
        let mut snap = env
            .command(&["snapshot", "create", s(&volume)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(4 * k));
        attached.kill();
        let _ = snap.wait();
    }
    // The dead mount of the last kill is cleared; the last snapshot taken
    // now, of everything written, restores byte for byte.
    let Some(attached) = Attached::start(&env, &dir, &[]) else {
        return;
    };
    let t = env.json(&["snapshot", "create", s(&volume)]);
    let out = env.path("out.img");
    env.ok(&["volume", "restore", &id(&t), s(&out)]);
    assert!(
        fs::read(&out).unwrap() == want,
        "the snapshot is not the volume"
    );
    env.ok(&["instance", "terminate", s(&dir)]);
    attached.wait();
}
