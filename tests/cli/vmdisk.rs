//! VM disks through NBD: qcow2 images exported by `qemu-nbd` (qemu's own
//! server), snapshotted with and without qemu's dirty bitmaps, restored
//! into a new qcow2; and a hand-made server that misbehaves.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A running `qemu-nbd`, killed when dropped.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd -t -k SOCKET -x disk -f FORMAT EXTRA… IMAGE`, once it
    /// answers.
    fn start(env: &Env, image: &Path, format: &str, extra: &[&str]) -> QemuNbd {
        let socket = env.path(&format!("qemu-nbd-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("qemu-nbd")
            .args(["-t", "-k", s(&socket), "-x", "disk", "-f", format])
            .args(extra)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd runs (apt-get install qemu-utils)");
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "qemu-nbd never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io(format: &str, image: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(image).output().unwrap();
    assert!(out.status.success(), "qemu-io {cmds:?}: {out:?}");
}

/// A 64 MiB ext4 image with files, as a qcow2.
fn ext4_qcow2(env: &Env) -> PathBuf {
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..20u64 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(i, 300_000)).unwrap();
    }
    let raw = env.path("ext4.img");
    sh_ok(&format!(
        "truncate -s 64M '{}' && mkfs.ext4 -q -d '{}' '{}'",
        s(&raw),
        s(&src),
        s(&raw)
    ));
    let qcow2 = env.path("disk.qcow2");
    qemu_ok(&["convert", "-O", "qcow2", s(&raw), s(&qcow2)]);
    qcow2
}

#[test]
fn a_qcow2_with_a_dirty_bitmap_snapshots_only_what_qemu_marked() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let disk = ext4_qcow2(&env);
    // The full snapshot, through qemu's server: holes are not read.
    let server = QemuNbd::start(&env, &disk, "qcow2", &["-r"]);
    let full = env.json(&["snapshot", "create", &server.uri()]);
    assert!(full["Stats"]["HoleBlocks"].as_u64().unwrap() > 64, "{full}");
    assert_eq!(full["SourcePath"], server.uri().as_str());
    drop(server);

    // The bitmap starts when the parent is taken; then the guest writes.
    qemu_ok(&["bitmap", "--add", "--enable", s(&disk), "b0"]);
    qemu_io(
        "qcow2",
        &disk,
        &[
            "write -P 0xab 1M 64k",
            "write -P 0xcd 40M 4k",
            "write -P 0xef 63M 512",
        ],
    );
    let server = QemuNbd::start(&env, &disk, "qcow2", &["-r", "-B", "b0"]);
    let inc = env.json(&[
        "snapshot",
        "create",
        &server.uri(),
        "--dirty-bitmap",
        "b0",
        "--parent",
        &id(&full),
    ]);
    assert_eq!(inc["BlocksRead"], 3, "{inc}");
    assert_eq!(inc["BlocksTaken"], 128 - 3, "{inc}");
    assert!(inc["Stats"]["NewChunks"].as_u64().unwrap() <= 3, "{inc}");
    // The increment restores to what qemu reads from the qcow2.
    let want = env.path("want.img");
    qemu_ok(&["convert", "-O", "raw", s(&disk), s(&want)]);
    let out = env.path("out.img");
    env.ok(&["volume", "restore", &id(&inc), s(&out)]);
    assert_same(&want, &out);
    assert_fsck_clean(&out);

    // Misuse: a bitmap the server does not export, no parent, a parent of
    // another size, a bitmap on a file.
    let e = env.fails(
        &[
            "snapshot",
            "create",
            &server.uri(),
            "--dirty-bitmap",
            "nosuch",
            "--parent",
            &id(&full),
        ],
        2,
    );
    assert!(e.contains("no dirty bitmap \"nosuch\""), "{e}");
    let e = env.run(&["snapshot", "create", &server.uri(), "--dirty-bitmap", "b0"]);
    assert_eq!(e.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("--parent"),
        "{e:?}"
    );
    let small = env.path("small.img");
    std::fs::write(&small, random_bytes(3, 1 << 20)).unwrap();
    let other = id(&env.snapshot(&small, &[]));
    let e = env.fails(
        &[
            "snapshot",
            "create",
            &server.uri(),
            "--dirty-bitmap",
            "b0",
            "--parent",
            &other,
        ],
        2,
    );
    assert!(e.contains("same disk"), "{e}");
    let e = env.fails(
        &[
            "snapshot",
            "create",
            s(&small),
            "--dirty-bitmap",
            "b0",
            "--parent",
            &other,
        ],
        2,
    );
    assert!(e.contains("neither an NBD URI"), "{e}");
    drop(server);

    // Round trip: restored into a new qcow2 through qemu-nbd, identical.
    let copy = env.path("copy.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&copy), "64M"]);
    let target = QemuNbd::start(&env, &copy, "qcow2", &[]);
    env.ok(&["volume", "restore", &id(&inc), &target.uri()]);
    // Again with --delta: nothing differs, nothing is written.
    let again = env.json(&["volume", "restore", &id(&inc), &target.uri(), "--delta"]);
    assert_eq!(again["BlocksWritten"], 0, "{again}");
    drop(target);
    let same = qemu_ok(&["compare", s(&disk), s(&copy)]);
    assert!(same.contains("identical"), "{same}");
    // A read-only export is refused as a target.
    let ro = QemuNbd::start(&env, &copy, "qcow2", &["-r"]);
    let e = env.fails(&["volume", "restore", &id(&inc), &ro.uri()], 2);
    assert!(e.contains("read-only"), "{e}");
}

#[test]
fn qcow2_files_are_read_and_written_through_a_private_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let disk = ext4_qcow2(&env);
    // The file itself: the same snapshot as through an export.
    let full = env.json(&["snapshot", "create", s(&disk)]);
    assert!(
        full["SourcePath"].as_str().unwrap().ends_with("disk.qcow2"),
        "{full}"
    );
    // Its persistent bitmap, straight from the file.
    qemu_ok(&["bitmap", "--add", "--enable", s(&disk), "daily"]);
    qemu_io("qcow2", &disk, &["write -P 0x77 7M 8k"]);
    let inc = env.json(&[
        "snapshot",
        "create",
        s(&disk),
        "--dirty-bitmap",
        "daily",
        "--parent",
        &id(&full),
    ]);
    assert_eq!(inc["BlocksRead"], 1, "{inc}");
    // Into a new qcow2, sparse where the snapshot is.
    let copy = env.path("copy.qcow2");
    env.ok(&[
        "volume",
        "restore",
        &id(&inc),
        s(&copy),
        "--format",
        "qcow2",
    ]);
    assert!(qemu_ok(&["compare", s(&disk), s(&copy)]).contains("identical"));
    let info = qemu_ok(&["info", "--output=json", s(&copy)]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    // An existing image is replaced only with --force or --delta; verify
    // reads it too.
    env.fails(&["volume", "restore", &id(&inc), s(&copy)], 5);
    let d = env.json(&["volume", "restore", &id(&inc), s(&copy), "--delta"]);
    assert_eq!(d["BlocksWritten"], 0, "{d}");
    env.ok(&["volume", "verify", &id(&inc), s(&copy)]);
    // No qemu-nbd is left running.
    assert!(!qemu_nbd_serves(&copy), "qemu-nbd left running");
    // An image that names another file (a raw disk whose guest wrote a
    // qcow2 header with a backing file, say) is never opened.
    let secret = env.path("secret");
    std::fs::write(&secret, b"a host file").unwrap();
    let evil = env.path("evil.img");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&secret),
        "-F",
        "raw",
        s(&evil),
        "1M",
    ]);
    let e = env.fails(&["snapshot", "create", s(&evil)], 2);
    assert!(
        e.contains("backing file") && e.contains("self-contained"),
        "{e}"
    );
    assert!(!qemu_nbd_serves(&evil));
}

/// Whether a qemu-nbd serving `image` is running.
fn qemu_nbd_serves(image: &Path) -> bool {
    let out = Command::new("pgrep")
        .args(["-f", &format!("qemu-nbd.*{}", s(image))])
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

#[test]
fn a_mostly_empty_64_gib_qcow2_costs_what_its_data_costs() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let disk = env.path("big.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&disk), "64G"]);
    qemu_io("qcow2", &disk, &["write -P 0x5a 10G 1M"]);
    let server = QemuNbd::start(&env, &disk, "qcow2", &["-r"]);
    let v = env.json(&["snapshot", "create", &server.uri()]);
    // Two 512 KiB blocks of data; the rest was never read (base:allocation).
    assert_eq!(v["Stats"]["DataBlocks"], 2, "{v}");
    assert_eq!(
        v["Stats"]["HoleBlocks"],
        (64u64 << 30) / (512 << 10) - 2,
        "{v}"
    );
}

/// A server that speaks the handshake, then answers every read with
/// `reply` (given the request's cookie and offset), on its own thread.
/// How a hostile server answers a read: the bytes for (cookie, offset).
type Reply = fn(u64, u64) -> Vec<u8>;

fn hostile_server(socket: &Path, reply: Reply) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut hello = b"NBDMAGIC".to_vec();
            hello.extend_from_slice(b"IHAVEOPT");
            hello.extend_from_slice(&3u16.to_be_bytes());
            if c.write_all(&hello).is_err() {
                continue;
            }
            let mut flags = [0u8; 4];
            if c.read_exact(&mut flags).is_err() {
                continue;
            }
            let option_reply =
                |c: &mut std::os::unix::net::UnixStream, opt: u32, kind: u32, data: &[u8]| {
                    let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                    r.extend_from_slice(&opt.to_be_bytes());
                    r.extend_from_slice(&kind.to_be_bytes());
                    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
                    r.extend_from_slice(data);
                    c.write_all(&r)
                };
            // Options until GO.
            loop {
                let mut h = [0u8; 16];
                if c.read_exact(&mut h).is_err() {
                    break;
                }
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                c.read_exact(&mut data).unwrap();
                if opt == 7 {
                    let mut info = 0u16.to_be_bytes().to_vec();
                    info.extend_from_slice(&(4u64 << 20).to_be_bytes());
                    info.extend_from_slice(&3u16.to_be_bytes());
                    option_reply(&mut c, opt, 3, &info).unwrap();
                    option_reply(&mut c, opt, 1, &[]).unwrap();
                    break;
                }
                option_reply(&mut c, opt, 1, &[]).unwrap();
            }
            // Requests.
            loop {
                let mut r = [0u8; 28];
                if c.read_exact(&mut r).is_err() {
                    break;
                }
                let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
                let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
                let answer = reply(cookie, offset);
                if answer.is_empty() || c.write_all(&answer).is_err() {
                    break;
                }
            }
        }
    })
}

/// A structured reply chunk.
fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = 0x668e_33efu32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

#[test]
fn a_server_that_lies_or_goes_away_leaves_no_snapshot() {
    let cases: [(&str, Reply, &str); 4] = [
        (
            "data outside the request",
            |cookie, offset| {
                let mut p = (offset + (64 << 20)).to_be_bytes().to_vec();
                p.extend_from_slice(&[1u8; 4096]);
                chunk(1, 1, cookie, &p)
            },
            "data outside the request",
        ),
        (
            "a short read",
            |cookie, offset| {
                let mut p = offset.to_be_bytes().to_vec();
                p.extend_from_slice(&[1u8; 4096]);
                chunk(1, 1, cookie, &p)
            },
            "answered short",
        ),
        ("a disconnect", |_, _| Vec::new(), "closed the connection"),
        (
            "an error",
            |cookie, _| {
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(&4u16.to_be_bytes());
                p.extend_from_slice(b"gone");
                chunk(1, (1 << 15) | 1, cookie, &p)
            },
            "error 5: gone",
        ),
    ];
    for (what, reply, says) in cases {
        let env = Env::new();
        let socket = env.path("liar.sock");
        let _server = hostile_server(&socket, reply);
        let uri = format!("nbd+unix:///x?socket={}", socket.display());
        let e = env.fails(&["snapshot", "create", &uri], 1);
        assert!(e.contains(&uri) && e.contains(says), "{what}: {e}");
        let list = env.json(&["snapshot", "list"]);
        assert_eq!(
            list["Snapshots"].as_array().unwrap().len(),
            0,
            "{what}: {list}"
        );
    }
    // Nobody there, and a URI without its socket.
    let env = Env::new();
    let e = env.fails(
        &[
            "snapshot",
            "create",
            "nbd+unix:///x?socket=/nonexistent.sock",
        ],
        1,
    );
    assert!(e.contains("/nonexistent.sock"), "{e}");
    let e = env.fails(&["snapshot", "create", "nbd+unix:///x"], 2);
    assert!(e.contains("socket="), "{e}");
}

#[test]
fn qemu_nbd_killed_mid_snapshot_leaves_no_snapshot_and_a_sound_store() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let raw = env.path("disk.img");
    std::fs::write(&raw, random_bytes(9, 64 * MIB as usize)).unwrap();
    let mut server = QemuNbd::start(&env, &raw, "raw", &["-r"]);
    let uri = server.uri();
    let snap = env
        .command(&["snapshot", "create", &uri])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(40));
    server.child.kill().unwrap();
    let out = snap.wait_with_output().unwrap();
    let listed = env.json(&["snapshot", "list"])["Snapshots"]
        .as_array()
        .unwrap()
        .len();
    if out.status.success() {
        // It won the race: then it is whole.
        assert_eq!(listed, 1);
    } else {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(&uri), "{e}");
        assert_eq!(listed, 0, "a snapshot from a server that went away");
    }
    // What it stored is only unreferenced chunks, which gc reclaims.
    env.ok(&["store", "verify"]);
    env.ok(&["store", "gc"]);
}

#[test]
fn a_killed_blocksnap_leaves_no_qemu_nbd_behind() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let raw = env.path("random.img");
    std::fs::write(&raw, random_bytes(12, 96 * MIB as usize)).unwrap();
    let disk = env.path("orphan.qcow2");
    qemu_ok(&["convert", "-O", "qcow2", s(&raw), s(&disk)]);
    let running = || qemu_nbd_serves(&disk);
    // A killed blocksnap cannot remove its socket directory: keep it in
    // this test's own.
    let mut snap = env
        .command(&["snapshot", "create", s(&disk)])
        .env("TMPDIR", env.path("."))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !running() {
        // Generous: the whole suite shares two cores.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "qemu-nbd never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    snap.kill().unwrap();
    snap.wait().unwrap();
    let killed = Instant::now();
    // SIGKILL from the kernel (a SIGTERM during its start was lost by
    // qemu-nbd twice in CI, leaving it serving forever): once, with the whole suite
    // running on two cores, it was still there after 10 s.
    while running() {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "qemu-nbd outlived the blocksnap that started it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
