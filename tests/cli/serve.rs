//! `volume serve`: a snapshot as an NBD export, read by qemu's own tools
//! (qemu-img, qemu-io) as outside clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A running `volume serve`, killed when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
    name: String,
}

impl Server {
    fn start(env: &Env, snap: &str, name: &str) -> Server {
        let socket = env.path(&format!("{name}.sock"));
        Server::launch(env, snap, &socket, name, &[])
    }

    /// `volume serve SNAP --socket SOCKET --name NAME EXTRA…`, once it
    /// answers on its socket (which may be stale beforehand).
    fn launch(env: &Env, snap: &str, socket: &Path, name: &str, extra: &[&str]) -> Server {
        let mut args = vec![
            "volume",
            "serve",
            snap,
            "--socket",
            s(socket),
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        let child = env
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            socket: socket.to_path_buf(),
            name: name.to_string(),
        };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("volume serve exited early: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn uri(&self) -> String {
        self.uri_of(&self.name)
    }

    fn uri_of(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Stops the server and returns what it logged.
    fn stop(mut self) -> String {
        self.child.kill().unwrap();
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes in the data blocks of `snap`, as its manifest lists them.
fn manifest_data_bytes(env: &Env, snap: &str) -> u64 {
    let blocks = env.json(&["snapshot", "blocks", snap]);
    let bs = blocks["BlockSize"].as_u64().unwrap();
    let data = blocks["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["State"] == "data")
        .count() as u64;
    data * bs
}

#[test]
fn qemu_reads_a_served_snapshot_byte_for_byte_without_a_restore() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let v1 = &images().v1;
    let snap = id(&env.snapshot(v1, &[]));
    let server = Server::start(&env, &snap, "golden");

    // Size and format, as qemu sees them.
    let info: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["info", "--output=json", &server.uri()])).unwrap();
    assert_eq!(info["virtual-size"], IMAGE_SIZE);

    // The whole volume, equal to the image and to a restore.
    let out = env.path("converted.img");
    qemu_ok(&["convert", "-O", "raw", &server.uri(), s(&out)]);
    assert_same(v1, &out);
    let restored = env.path("restored.img");
    env.ok(&["volume", "restore", &snap, s(&restored)]);
    qemu_ok(&["compare", &server.uri(), s(&restored)]);

    // Holes and zero blocks are reported as such (base:allocation): the
    // map's data extents are exactly the snapshot's data blocks.
    let map: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["map", "--output=json", &server.uri()])).unwrap();
    let data_bytes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data_bytes > 0 && data_bytes < IMAGE_SIZE, "{map}");
    assert_eq!(data_bytes, manifest_data_bytes(&env, &snap));

    // Read-only: a write is refused and changes nothing.
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 1M 64k", &server.uri()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&write.stdout).to_string()
        + &String::from_utf8_lossy(&write.stderr);
    assert!(
        !write.status.success() || said.contains("ermission") || said.contains("read-only"),
        "a write went through: {said}"
    );
    qemu_ok(&["compare", &server.uri(), s(&restored)]);

    // An unknown export is refused, and the server goes on serving.
    let unknown = qemu_img(&["info", &server.uri_of("nope")]);
    assert!(!unknown.status.success());
    qemu_ok(&["info", &server.uri()]);

    // While it serves, gc waits for it (it holds the region lock).
    let err = env.gc_is_held_off("beside a served snapshot");
    assert!(err.contains("locked"), "{err}");
    server.stop();
    env.ok(&["store", "gc"]);
}

#[test]
fn a_corrupt_chunk_is_an_io_error_for_that_read_and_the_server_goes_on() {
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let vol = env.path("small.img");
    let mut bytes = random_bytes(7, (4 * MIB) as usize);
    bytes.extend(text_bytes(8, (4 * MIB) as usize));
    std::fs::write(&vol, &bytes).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    // Block 1 (random data, stored raw) gets a flipped byte.
    let key = env.damage_chunk(&snap, 1);
    let server = Server::start(&env, &snap, "damaged");

    let out = env.path("out.img");
    let convert = qemu_img(&["convert", "-O", "raw", &server.uri(), s(&out)]);
    assert!(
        !convert.status.success(),
        "a damaged snapshot read as whole"
    );
    // A sound block still reads, from a server that still serves.
    let read = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 64k", &server.uri()])
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let log = server.stop();
    assert!(
        log.contains(&snap) && log.contains("volume offset"),
        "{log}"
    );
    assert!(
        log.contains(&key.rsplit('/').next().unwrap()[..12]),
        "{log}"
    );
}

#[test]
fn a_socket_left_by_a_killed_server_is_replaced_and_a_live_one_is_not() {
    let env = Env::new();
    let vol = env.path("tiny.img");
    std::fs::write(&vol, random_bytes(3, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let server = Server::start(&env, &snap, "tiny");
    let socket = server.socket.clone();
    // A second server on the same live socket is refused.
    let e = env.fails(&["volume", "serve", &snap, "--socket", s(&socket)], 5);
    assert!(e.contains("a server answers there"), "{e}");
    drop(server);
    assert!(socket.exists(), "a killed server leaves its socket");
    // The stale socket is replaced.
    let again = Server::start_at(&env, &snap, &socket);
    drop(again);
    // A path that is no socket is never removed.
    let file = env.path("not-a-socket");
    std::fs::write(&file, b"keep").unwrap();
    env.fails(&["volume", "serve", &snap, "--socket", s(&file)], 5);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

impl Server {
    /// A server on `socket`, which may be stale: waits until it answers.
    fn start_at(env: &Env, snap: &str, socket: &Path) -> Server {
        Server::launch(env, snap, socket, snap, &[])
    }
}

/// A raw client: what qemu never sends.
mod raw {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    pub struct Client(pub UnixStream);

    impl Client {
        /// Connects and completes the handshake's greeting.
        pub fn connect(socket: &std::path::Path) -> Client {
            let mut s = UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).unwrap();
            assert_eq!(&hello[..8], b"NBDMAGIC");
            s.write_all(&3u32.to_be_bytes()).unwrap();
            Client(s)
        }

        pub fn option(&mut self, option: u32, data: &[u8]) {
            let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
            m.extend_from_slice(&option.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.0.write_all(&m).unwrap();
        }

        /// One option reply: its type and data.
        pub fn reply(&mut self) -> (u32, Vec<u8>) {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.0.read_exact(&mut d).unwrap();
            (kind, d)
        }

        /// `NBD_OPT_GO` for `name`, through to its `ACK`.
        pub fn go(&mut self, name: &str) {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&0u16.to_be_bytes());
            self.option(7, &d);
            loop {
                match self.reply() {
                    (1, _) => return,
                    (3, _) => continue,
                    other => panic!("GO answered {other:?}"),
                }
            }
        }

        pub fn request(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) {
            let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
            r.extend_from_slice(&0u16.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&7u64.to_be_bytes());
            r.extend_from_slice(&offset.to_be_bytes());
            r.extend_from_slice(&length.to_be_bytes());
            r.extend_from_slice(payload);
            self.0.write_all(&r).unwrap();
        }

        /// A simple reply's error, reading `data` bytes after a success.
        pub fn simple(&mut self, data: usize) -> u32 {
            let mut h = [0u8; 16];
            self.0.read_exact(&mut h).unwrap();
            assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
            if error == 0 {
                let mut d = vec![0u8; data];
                self.0.read_exact(&mut d).unwrap();
            }
            error
        }

        /// Whether the server has closed the connection.
        pub fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(self.0.read(&mut b), Ok(0) | Err(_))
        }
    }
}

#[test]
fn a_hostile_client_loses_its_own_connection_and_others_are_served() {
    use raw::Client;
    use std::io::Write;
    let env = Env::new();
    let vol = env.path("tiny.img");
    std::fs::write(&vol, random_bytes(5, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let server = Server::start(&env, &snap, "tiny");

    // Malformed options get an error reply and the negotiation goes on.
    let mut c = Client::connect(&server.socket);
    c.option(7, &[0, 0]);
    assert_eq!(c.reply().0, (1 << 31) | 3, "a truncated GO is invalid");
    c.option(7, &[0, 0, 0, 4, b'n', b'o', b'p', b'e', 0, 0]);
    assert_eq!(c.reply().0, (1 << 31) | 6, "an unknown export");
    c.option(200, &[]);
    assert_eq!(c.reply().0, (1 << 31) | 1, "an unknown option");
    c.go("tiny");
    // Requests past the end, too large, unknown, or writes: errors, and
    // the connection stays usable.
    c.request(0, MIB - 10, 20, &[]);
    assert_eq!(c.simple(20), 22, "a read past the end");
    c.request(0, 0, 64 << 20, &[]);
    assert_eq!(c.simple(0), 75, "a read over 32 MiB");
    c.request(99, 0, 1, &[]);
    assert_eq!(c.simple(0), 22, "an unknown command");
    c.request(1, 0, 4, b"evil");
    assert_eq!(c.simple(0), 1, "a write to a read-only export");
    c.request(0, 4096, 4096, &[]);
    assert_eq!(c.simple(4096), 0, "a good read after all that");
    // Garbage ends this connection only.
    c.0.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed());

    // An absurd option length, and a client gone mid-request.
    let mut c = Client::connect(&server.socket);
    c.0.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())
        .unwrap();
    c.0.write_all(&7u32.to_be_bytes()).unwrap();
    c.0.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(c.closed());
    let mut c = Client::connect(&server.socket);
    c.go("");
    c.0.write_all(&[0x25, 0x60]).unwrap();
    drop(c);
    // And one gone while its 1 MiB reply is being sent.
    let mut c = Client::connect(&server.socket);
    c.go("");
    c.request(0, 0, MIB as u32, &[]);
    drop(c);

    // Two connections at once, each reading in turn.
    let (mut a, mut b) = (
        Client::connect(&server.socket),
        Client::connect(&server.socket),
    );
    a.go("tiny");
    b.go("tiny");
    b.request(0, 0, 65536, &[]);
    a.request(0, 65536, 65536, &[]);
    assert_eq!(a.simple(65536), 0);
    assert_eq!(b.simple(65536), 0);

    // Meanwhile everyone else is served.
    let out = env.path("out.img");
    qemu_ok(&["convert", "-O", "raw", &server.uri(), s(&out)]);
    assert_same(&vol, &out);
}

#[test]
fn a_tcp_export_says_where_it_listens() {
    use std::io::BufRead;
    if !have_qemu() {
        return;
    }
    let env = Env::new();
    let vol = env.path("tcp.img");
    std::fs::write(&vol, random_bytes(9, MIB as usize)).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    // Port 0: the kernel picks a free one, and the server names it.
    let mut child = env
        .command(&["volume", "serve", &snap, "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no nbd:// URI in {line:?}"))
        .to_string();
    assert!(uri.ends_with(&format!("/{snap}")), "{uri}");
    let out = env.path("out.img");
    let convert = qemu_img(&["convert", "-O", "raw", &uri, s(&out)]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        convert.status.success(),
        "{}",
        String::from_utf8_lossy(&convert.stderr)
    );
    assert_same(&vol, &out);
}

/// libnbd's tools, another outside client: `nbdinfo --list` and `--map`
/// (the allocation map), and `nbdcopy`, which reads over several
/// connections at once where the export allows it.
#[test]
fn libnbd_lists_maps_and_copies_the_export_over_several_connections() {
    if Command::new("nbdinfo").arg("--version").output().is_err() {
        skip("nbdinfo is not installed (apt-get install libnbd-bin)");
        return;
    }
    let env = Env::new();
    let v1 = &images().v1;
    let snap = id(&env.snapshot(v1, &[]));
    let server = Server::start(&env, &snap, "golden");
    let run = |cmd: &str, args: &[&str]| {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let list = run("nbdinfo", &["--list", &server.uri()]);
    assert!(list.contains("golden"), "{list}");
    assert!(list.contains("can_multi_conn: true"), "{list}");
    // `--map`: "offset length type description"; type 0 is data.
    let map = run("nbdinfo", &["--map", &server.uri()]);
    let mut data = 0u64;
    let mut covered = 0u64;
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (len, kind): (u64, u32) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        covered += len;
        if kind == 0 {
            data += len;
        } else {
            assert_eq!(kind, 3, "a hole that does not read as zeros: {line}");
        }
    }
    assert_eq!(covered, IMAGE_SIZE);
    assert_eq!(data, manifest_data_bytes(&env, &snap));
    let out = env.path("copied.img");
    run(
        "nbdcopy",
        &["--connections=4", "--requests=16", &server.uri(), s(&out)],
    );
    assert_same(v1, &out);
}

/// `qemu-io` commands against `uri`; stdout, after asserting success.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

impl Server {
    /// A writable server of `snap` over the overlay at `overlay`.
    fn writable(env: &Env, snap: &str, overlay: &Path) -> Server {
        let socket = env.path("rw.sock");
        Server::launch(
            env,
            snap,
            &socket,
            "rw",
            &["--writable", "--overlay", s(overlay)],
        )
    }
}

/// A snapshot of `size` random bytes: the test's world, the bytes, the
/// snapshot and where its overlay goes.
fn writable_volume(seed: u64, size: u64) -> (Env, Vec<u8>, String, PathBuf) {
    let env = Env::new();
    let vol = env.path("base.img");
    let base = random_bytes(seed, size as usize);
    std::fs::write(&vol, &base).unwrap();
    let snap = id(&env.snapshot(&vol, &[]));
    let overlay = env.path("overlay.img");
    (env, base, snap, overlay)
}

#[test]
fn a_writable_export_keeps_its_writes_in_the_overlay_across_restarts() {
    if !have_qemu() {
        return;
    }
    let (env, base, snap, overlay) = writable_volume(21, 4 * MIB);
    let server = Server::writable(&env, &snap, &overlay);
    let uri = server.uri();
    // Aligned, unaligned (inside one granule and across two), zeroes.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1M 64k",
            "write -P 0xcd 1000 3000",
            "write -P 0xef 8190 10",
            "write -z 2M 128k",
            "flush",
        ],
    );
    let mut want = base.clone();
    want[1 << 20..(1 << 20) + 65536].fill(0xab);
    want[1000..4000].fill(0xcd);
    want[8190..8200].fill(0xef);
    want[2 << 20..(2 << 20) + 131072].fill(0);
    qemu_io(&uri, &["read -P 0xab 1M 64k", "read -P 0xcd 1000 3000"]);
    let out = env.path("out.img");
    qemu_ok(&["convert", "-O", "raw", &uri, s(&out)]);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the export does not read as written"
    );
    // The overlay is sparse: it holds the written granules, not the volume.
    assert!(allocated(&overlay) < MIB, "{}", allocated(&overlay));

    // Killed and restarted on the same overlay: every write is still there.
    drop(server);
    let server = Server::writable(&env, &snap, &overlay);
    let again = env.path("again.img");
    qemu_ok(&["convert", "-O", "raw", &server.uri(), s(&again)]);
    assert!(
        std::fs::read(&again).unwrap() == want,
        "writes lost across a restart"
    );
    drop(server);

    // The snapshot itself never changes.
    let restored = env.path("restored.img");
    env.ok(&["volume", "restore", &snap, s(&restored)]);
    assert!(std::fs::read(&restored).unwrap() == base);
    // An overlay belongs to one snapshot.
    let other = id(&env.snapshot(&out, &[]));
    let e = env.fails(
        &[
            "volume",
            "serve",
            &other,
            "--socket",
            s(&env.path("x.sock")),
            "--writable",
            "--overlay",
            s(&overlay),
        ],
        2,
    );
    assert!(e.contains(&snap), "{e}");
    // One server per overlay: a second one is refused while the first runs.
    let first = Server::writable(&env, &snap, &overlay);
    let e = env.fails(
        &[
            "volume",
            "serve",
            &snap,
            "--socket",
            s(&env.path("y.sock")),
            "--writable",
            "--overlay",
            s(&overlay),
        ],
        5,
    );
    assert!(e.contains("in use"), "{e}");
    // Zero-length writes and reads are no-ops, not failures.
    let mut c = raw::Client::connect(&first.socket);
    c.go("rw");
    c.request(1, 0, 0, &[]);
    assert_eq!(c.simple(0), 0, "a zero-length write");
    c.request(0, 0, 0, &[]);
    assert_eq!(c.simple(0), 0, "a zero-length read");
    drop(first);
    // --overlay without --writable (or the other way round) is a usage error.
    let plain = env.run(&["volume", "serve", &snap, "--writable"]);
    assert_eq!(plain.status.code(), Some(2));
}

#[test]
fn a_writable_server_killed_mid_write_loses_no_acknowledged_write() {
    use std::io::BufRead;
    if !have_qemu() {
        return;
    }
    let (env, base, snap, overlay) = writable_volume(22, 8 * MIB);
    let mut server = Server::writable(&env, &snap, &overlay);
    // 100 writes of 64 KiB, pattern k at 64 KiB * k + 512 (unaligned),
    // no flush: each is acknowledged before the next is sent.
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for k in 1..=100u64 {
        args.push("-c".into());
        args.push(format!("write -P {k} {} 65536", k * 65536 + 512));
    }
    args.push(server.uri());
    let mut writer = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = 0u64;
    for line in std::io::BufReader::new(writer.stdout.take().unwrap()).lines() {
        if line.unwrap().starts_with("wrote") {
            acked += 1;
            if acked == 30 {
                server.child.kill().unwrap();
                break;
            }
        }
    }
    let _ = writer.wait();
    let _ = server.child.wait();
    drop(server);

    let server = Server::writable(&env, &snap, &overlay);
    let out = env.path("out.img");
    qemu_ok(&["convert", "-O", "raw", &server.uri(), s(&out)]);
    let got = std::fs::read(&out).unwrap();
    for k in 1..=acked {
        let at = (k * 65536 + 512) as usize;
        assert!(
            got[at..at + 65536].iter().all(|&b| b == k as u8),
            "acknowledged write {k} lost"
        );
    }
    // A write not seen acknowledged may be there in part, as on a disk,
    // but only ever with its own bytes or the snapshot's.
    for k in acked + 1..=100 {
        let at = (k * 65536 + 512) as usize;
        let region = &got[at..at + 65536];
        assert!(
            region
                .iter()
                .zip(&base[at..at + 65536])
                .all(|(&b, &was)| b == k as u8 || b == was),
            "write {k} holds foreign bytes"
        );
    }
    assert!(
        got[..65536 + 512] == base[..65536 + 512],
        "untouched bytes changed"
    );
}

/// A writer hammers a writable export, each write a sequence number in
/// one of 64 slots, while snapshots of the overlay are taken: each
/// snapshot is the volume at one instant (after some write n and before
/// n + 1), and the next is incremental against it.
#[test]
fn snapshots_of_a_volume_being_written_are_each_of_one_instant() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const SLOTS: u64 = 64;
    const SLOT_GAP: u64 = 64 * 1024;
    let (env, base, snap, overlay) = writable_volume(23, 4 * MIB);
    let server = Server::writable(&env, &snap, &overlay);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (socket, stop, written) = (server.socket.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut c = raw::Client::connect(&socket);
            c.go("rw");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let block: Vec<u8> = n.to_le_bytes().repeat(512);
                c.request(1, (n % SLOTS) * SLOT_GAP, 4096, &block);
                assert_eq!(c.simple(0), 0, "write {n} failed");
                written.store(n, Ordering::Relaxed);
            }
        })
    };
    let mut taken = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        taken.push(env.json(&["snapshot", "create", s(&overlay)]));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        written.load(Ordering::Relaxed) > 100,
        "the writer barely ran"
    );
    drop(server);

    let mut instants = Vec::new();
    for (k, t) in taken.iter().enumerate() {
        if k > 0 {
            // Each is incremental on the one before, reading at most the
            // blocks the writer touched.
            assert_eq!(t["ParentSnapshotId"], taken[k - 1]["SnapshotId"], "{t}");
            assert!(t["BlocksRead"].as_u64().unwrap() <= 8, "{t}");
        }
        let out = env.path(&format!("pit{k}.img"));
        env.ok(&["volume", "restore", &id(t), s(&out)]);
        let got = std::fs::read(&out).unwrap();
        // Every slot holds one whole write (or the snapshot's bytes).
        let values: Vec<Option<u64>> = (0..SLOTS)
            .map(|slot| {
                let at = (slot * SLOT_GAP) as usize;
                let cell = &got[at..at + 4096];
                if cell == &base[at..at + 4096] {
                    return None;
                }
                let v = u64::from_le_bytes(cell[..8].try_into().unwrap());
                assert!(
                    cell.chunks(8).all(|c| c == v.to_le_bytes()),
                    "slot {slot} is torn in snapshot {k}"
                );
                assert_eq!(v % SLOTS, slot, "slot {slot} holds write {v}");
                Some(v)
            })
            .collect();
        // The instant: the newest write in it; every slot then holds the
        // newest write to it up to that one.
        let m = values.iter().flatten().max().copied().unwrap_or(0);
        for (slot, v) in values.iter().enumerate() {
            let slot = slot as u64;
            let expect = (m >= slot)
                .then(|| m - (m - slot) % SLOTS)
                .filter(|&e| e > 0);
            assert_eq!(
                *v, expect,
                "snapshot {k} is not of one instant (newest write {m})"
            );
        }
        // Outside the slots, the snapshot's bytes.
        let mut rest = got.clone();
        let mut want = base.clone();
        for slot in 0..SLOTS {
            let at = (slot * SLOT_GAP) as usize;
            rest[at..at + 4096].fill(0);
            want[at..at + 4096].fill(0);
        }
        assert!(rest == want, "snapshot {k} changed bytes nobody wrote");
        instants.push(m);
    }
    assert!(
        instants.windows(2).all(|w| w[0] <= w[1]) && instants[3] > instants[0],
        "snapshots do not follow the writer: {instants:?}"
    );
}

/// blocksnap's own NBD client against its own server: a served snapshot
/// snapshots to the same root digest, and a restore into a writable
/// export reads back as the snapshot.
#[test]
fn blocksnaps_client_reads_and_writes_its_own_exports() {
    let (env, _base, snap, overlay) = writable_volume(24, 4 * MIB);
    let served = Server::start(&env, &snap, "ro");
    let again = env.json(&["snapshot", "create", &served.uri(), "--no-parent"]);
    let first = env.json(&["snapshot", "describe", &snap]);
    assert_eq!(
        again["RootDigest"], first["Snapshots"][0]["RootDigest"],
        "{again}"
    );
    drop(served);
    // Into a writable export over another snapshot: afterwards it reads as
    // the snapshot restored.
    let other = env.path("other.img");
    std::fs::write(&other, random_bytes(25, 4 * MIB as usize)).unwrap();
    let other_snap = id(&env.snapshot(&other, &[]));
    let rw = Server::writable(&env, &other_snap, &overlay);
    env.ok(&["volume", "restore", &snap, &rw.uri()]);
    let d = env.json(&["volume", "restore", &snap, &rw.uri(), "--delta"]);
    assert_eq!(d["BlocksWritten"], 0, "{d}");
    env.ok(&["volume", "verify", &snap, &rw.uri()]);
}
