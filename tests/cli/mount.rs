//! `volume mount`: a snapshot as a FUSE file, read by the kernel's own
//! clients — cmp, cp --sparse, e2fsck, a loop device and ext4.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A running `volume mount`, unmounted and reaped when dropped.
struct Mounted {
    child: Option<Child>,
    dir: PathBuf,
}

impl Mounted {
    /// Mounts `snap` at a new directory; `None` (skipped) where this
    /// machine cannot mount FUSE file systems.
    fn start(env: &Env, snap: &str) -> Option<Mounted> {
        if !Path::new("/dev/fuse").exists() {
            skip("no /dev/fuse: FUSE is not available here");
            return None;
        }
        let dir = env.path("mnt");
        fs::create_dir_all(&dir).unwrap();
        let mut child = env
            .command(&["volume", "mount", snap, s(&dir)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !dir.join("volume.img").exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                if err.contains("Operation not permitted") || err.contains("Permission denied") {
                    skip(format!("cannot mount FUSE here: {err}"));
                    return None;
                }
                panic!("volume mount exited early ({status}): {err}");
            }
            assert!(started.elapsed() < Duration::from_secs(20), "never mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Mounted {
            child: Some(child),
            dir,
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("volume.img")
    }

    /// `volume unmount`; the mount command then ends by itself, cleanly.
    fn unmount(mut self, env: &Env) -> String {
        env.ok(&["volume", "unmount", s(&self.dir)]);
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_mounted_snapshot_reads_as_its_volume_and_its_file_system_mounts() {
    let env = Env::new();
    let v1 = &images().v1;
    let snap = id(&env.snapshot(v1, &[]));
    let Some(m) = Mounted::start(&env, &snap) else {
        return;
    };
    assert_eq!(fs::metadata(m.file()).unwrap().len(), IMAGE_SIZE);
    assert_same(v1, &m.file());

    // SEEK_DATA/SEEK_HOLE come from the manifest: a sparse copy keeps the
    // holes and zero blocks out.
    let copy = env.path("copy.img");
    sh_ok(&format!(
        "cp --sparse=always '{}' '{}'",
        m.file().display(),
        copy.display()
    ));
    assert_same(v1, &copy);
    assert!(allocated(&copy) < IMAGE_SIZE / 2, "the copy is not sparse");
    assert_fsck_clean(&m.file());

    // A loop device over the file, and ext4 over that.
    let loop_dev = sh(&format!("losetup -r -f --show '{}'", m.file().display()));
    if loop_dev.status.success() {
        let dev = String::from_utf8(loop_dev.stdout)
            .unwrap()
            .trim()
            .to_string();
        let fsdir = env.path("fs");
        fs::create_dir_all(&fsdir).unwrap();
        let mounted = sh(&format!("mount -o ro {dev} '{}'", fsdir.display()));
        if mounted.status.success() {
            let conf = fs::read(fsdir.join("etc/conf3.txt")).unwrap();
            assert_eq!(conf, text_bytes(3, 20_000 + 3 * 3_000));
            sh_ok(&format!("umount '{}'", fsdir.display()));
        } else {
            skip(format!(
                "cannot mount ext4 from a loop device: {}",
                String::from_utf8_lossy(&mounted.stderr)
            ));
        }
        sh_ok(&format!("losetup -d {dev}"));
    } else {
        skip(format!(
            "cannot attach a loop device: {}",
            String::from_utf8_lossy(&loop_dev.stderr)
        ));
    }

    // Read-only: opening for writing is refused.
    assert!(fs::OpenOptions::new().write(true).open(m.file()).is_err());
    // While it is mounted, gc waits for it.
    env.gc_is_held_off("beside a mounted snapshot");
    m.unmount(&env);
    env.ok(&["store", "gc"]);
}

#[test]
fn a_corrupt_chunk_is_an_io_error_never_wrong_bytes() {
    let env = Env::new();
    let vol = env.path("small.img");
    let mut bytes = random_bytes(11, (2 * MIB) as usize);
    bytes.extend(random_bytes(12, (2 * MIB) as usize));
    fs::write(&vol, &bytes).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    env.damage_chunk(&snap, 1);
    let Some(m) = Mounted::start(&env, &snap) else {
        return;
    };
    let read = fs::read(m.file());
    let err = read.expect_err("a damaged snapshot read as whole");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Sound blocks still read.
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(m.file()).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, bytes[..4096]);
    drop(f);
    let log = m.unmount(&env);
    assert!(
        log.contains(&snap) && log.contains("volume offset"),
        "{log}"
    );
}

#[test]
fn an_interrupted_mount_takes_itself_down() {
    let env = Env::new();
    let vol = env.path("tiny.img");
    fs::write(&vol, random_bytes(4, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    for signal in ["INT", "TERM"] {
        let Some(mut m) = Mounted::start(&env, &snap) else {
            return;
        };
        let child = m.child.take().unwrap();
        sh_ok(&format!("kill -{signal} {}", child.id()));
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "SIG{signal}: {out:?}");
        // Not left mounted (a dead mount would fail even to list).
        let left: Vec<_> = fs::read_dir(&m.dir).unwrap().collect();
        assert!(left.is_empty(), "SIG{signal} left {left:?}");
    }
}

#[test]
fn mounting_needs_a_directory_and_permission() {
    let env = Env::new();
    let vol = env.path("tiny.img");
    fs::write(&vol, random_bytes(3, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let missing = env.path("no-such-dir");
    let e = env.fails(&["volume", "mount", &snap, s(&missing)], 3);
    assert!(e.contains("not a directory"), "{e}");
    let e = env.fails(
        &[
            "volume",
            "mount",
            &snap,
            s(&env.path("")),
            "--account",
            "222222222222",
        ],
        6,
    );
    assert!(e.contains("mount"), "{e}");
    let e = env.fails(&["volume", "unmount", s(&env.path(""))], 2);
    assert!(e.contains("cannot unmount"), "{e}");
}

#[test]
fn a_writable_mount_in_the_background_keeps_writes_in_its_overlay() {
    use std::os::unix::fs::FileExt;
    if !Path::new("/dev/fuse").exists() {
        skip("no /dev/fuse: FUSE is not available here");
        return;
    }
    let env = Env::new();
    let vol = env.path("base.img");
    let base = random_bytes(31, 4 * MIB as usize);
    fs::write(&vol, &base).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let dir = env.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    let overlay = env.path("overlay.img");
    // --background returns once the mount is ready.
    let said = env.ok(&[
        "volume",
        "mount",
        &snap,
        s(&dir),
        "--writable",
        "--overlay",
        s(&overlay),
        "--background",
    ]);
    assert!(said.contains("mounted at"), "{said}");
    let file = dir.join("volume.img");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    f.write_all_at(&[0xab; 65536], MIB).unwrap();
    f.write_all_at(b"unaligned", 3 * MIB + 100).unwrap();
    f.sync_all().unwrap();
    // A volume does not grow.
    assert!(f.write_all_at(b"x", 4 * MIB).is_err());
    drop(f);
    let mut want = base.clone();
    want[MIB as usize..MIB as usize + 65536].fill(0xab);
    want[3 * MIB as usize + 100..3 * MIB as usize + 109].copy_from_slice(b"unaligned");
    assert!(fs::read(&file).unwrap() == want);

    // Snapshotted through the mount's own process, from the dirty map.
    let t = env.json(&["snapshot", "create", s(&overlay)]);
    assert_eq!(t["BlocksRead"], 2, "{t}");
    let out = env.path("out.img");
    env.ok(&["volume", "restore", &id(&t), s(&out)]);
    assert!(fs::read(&out).unwrap() == want);

    env.ok(&["volume", "unmount", s(&dir)]);
    let started = Instant::now();
    while file.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "still mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A failing mount in the background reports its error and exit code.
    let e = env.fails(
        &[
            "volume",
            "mount",
            &snap,
            s(&env.path("nowhere")),
            "--background",
        ],
        3,
    );
    assert!(e.contains("not a directory"), "{e}");
}
