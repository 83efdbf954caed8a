//! Regions on a real S3 server (SeaweedFS, started by `.ci/run` through
//! scripts/with-s3.sh): copies between backends, gc beside a writer, and
//! failures: a server killed mid-snapshot, wrong or missing credentials, a
//! missing bucket, throttling and server errors, a server that never
//! answers. Skipped, with the reason printed, when no server is configured.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

fn image_volume(env: &Env) -> PathBuf {
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        fs::write(src.join(format!("f{i}.bin")), random_bytes(i, 700_000)).unwrap();
        fs::write(src.join(format!("t{i}.txt")), text_bytes(i, 400_000)).unwrap();
    }
    let img = env.path("root.img");
    sh_ok(&format!(
        "truncate -s 64M '{0}' && mkfs.ext4 -q -F -d '{1}' '{0}'",
        img.display(),
        src.display()
    ));
    img
}

/// Restores the image's root snapshot in `region` and compares it.
fn assert_image_restores(env: &Env, ami: &str, region: &str, expect: &Path) {
    let d = env.json(&["image", "describe", ami, "--region", region]);
    let snap = d["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.path(&format!("{region}-{snap}.img"));
    env.ok(&[
        "volume",
        "restore",
        &snap,
        s(&out),
        "--region",
        region,
        "--force",
    ]);
    assert_same(&out, expect);
    let v = env.json(&["store", "verify", "--region", region]);
    assert_eq!(v["Clean"], true, "{v}");
}

#[test]
fn copy_image_between_backends_moves_only_missing_chunks() {
    let Some(env) = Env::with_s3_server() else {
        return;
    };
    env.add_s3_region("s3-a");
    env.add_s3_region("s3-b");
    let listed = env.json(&["region", "list"]);
    let names: Vec<&str> = listed["Regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["RegionName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s3-a", "s3-b"]);
    let vol = image_volume(&env);
    let created = env.json(&[
        "image",
        "create",
        "--name",
        "web",
        "--map",
        &format!("/dev/xvda={}", s(&vol)),
    ]);
    let ami = created["ImageId"].as_str().unwrap().to_string();

    // local -> S3
    let c1 = env.json(&["image", "copy", &ami, "--to-region", "s3-a"]);
    assert!(c1["ChunksCopied"].as_u64().unwrap() > 10, "{c1}");
    assert_eq!(c1["ChunksAlreadyPresent"], 0);
    let ami_a = c1["ImageId"].as_str().unwrap().to_string();
    assert_image_restores(&env, &ami_a, "s3-a", &vol);
    // Again, under another name: every chunk is already there.
    let again = env.json(&[
        "image",
        "copy",
        &ami,
        "--to-region",
        "s3-a",
        "--name",
        "web2",
    ]);
    assert_eq!(again["ChunksCopied"], 0, "{again}");
    assert_eq!(again["ChunksAlreadyPresent"], c1["ChunksCopied"]);

    // S3 -> S3
    let c2 = env.json(&[
        "image",
        "copy",
        &ami_a,
        "--region",
        "s3-a",
        "--to-region",
        "s3-b",
    ]);
    assert_eq!(c2["ChunksCopied"], c1["ChunksCopied"]);
    let ami_b = c2["ImageId"].as_str().unwrap().to_string();
    let b = env.json(&["image", "describe", &ami_b, "--region", "s3-b"]);
    assert_eq!(b["Images"][0]["SourceRegion"], "s3-a");
    assert_image_restores(&env, &ami_b, "s3-b", &vol);

    // S3 -> another local region, then back to the original region
    // (already holding every chunk).
    let c3 = env.json(&[
        "image",
        "copy",
        &ami_b,
        "--region",
        "s3-b",
        "--to-region",
        "eu-west-1",
        "--create-region",
    ]);
    assert_eq!(c3["ChunksCopied"], c1["ChunksCopied"]);
    assert_image_restores(&env, c3["ImageId"].as_str().unwrap(), "eu-west-1", &vol);
    assert!(env.store().join("eu-west-1/store.json").is_file());
    let c4 = env.json(&[
        "image",
        "copy",
        &ami_b,
        "--region",
        "s3-b",
        "--to-region",
        "local",
        "--name",
        "home",
    ]);
    assert_eq!(c4["ChunksCopied"], 0, "{c4}");

    // Forgetting a region deletes nothing: defined again, it is all there.
    env.ok(&["region", "remove", "s3-b"]);
    assert!(!env.ok(&["region", "list"]).contains("s3-b"));
    env.add_s3_region("s3-b");
    assert_image_restores(&env, &ami_b, "s3-b", &vol);
}

/// Waits until a lock object exists in region `local`.
fn wait_for_a_lock(env: &Env) {
    let t = Instant::now();
    while env.count_stored("local", "locks") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no command took the lock"
        );
        sleep(Duration::from_millis(20));
    }
}

#[test]
fn gc_waits_for_a_writer_that_reuses_unreferenced_chunks() {
    let Some(env) = Env::s3() else { return };
    // Snapshot A, then delete it: its chunks are unreferenced.
    let old = random_bytes(1, 24 * MIB as usize);
    let vol = env.path("vol.img");
    fs::write(&vol, &old).unwrap();
    let a = id(&env.snapshot(&vol, &[]));
    env.ok(&["snapshot", "delete", &a]);
    // B holds the same 24 MiB plus 96 MiB new: it finds A's chunks in the
    // store early and reuses them, then spends a while uploading.
    let mut data = old.clone();
    data.extend(random_bytes(2, 96 * MIB as usize));
    fs::write(&vol, &data).unwrap();
    let mut writer = env
        .command(&["snapshot", "create", s(&vol), "--no-parent", "--json"])
        .env("BLOCKSNAP_S3_INFLIGHT", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the writer holds its lock, gc starts.
    wait_for_a_lock(&env);
    let still_running = writer.try_wait().unwrap().is_none();
    let gc = env.command(&["store", "gc", "--json"]).output().unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(gc.status.success(), "{gc:?}");
    assert!(
        still_running,
        "the writer finished before gc started: nothing was tested"
    );
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        b["Stats"]["ReusedBytes"].as_u64().unwrap() >= 24 * MIB,
        "{b}"
    );
    let report: Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert_eq!(
        report["ChunksRemoved"], 0,
        "gc removed chunks B reuses: {report}"
    );
    let restored = env.path("b.img");
    env.ok(&["volume", "restore", &id(&b), s(&restored)]);
    assert!(fs::read(&restored).unwrap() == data);
    assert_eq!(env.json(&["store", "verify"])["Clean"], true);
    assert_eq!(
        env.count_stored("local", "locks"),
        0,
        "a lock object was left behind"
    );
}

#[test]
fn a_dead_holders_lock_goes_stale_and_gc_clears_it() {
    let Some(env) = Env::s3() else { return };
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(3, 64 * MIB as usize)).unwrap();
    // A writer killed while it holds its lock...
    let mut writer = env
        .command(&["snapshot", "create", s(&vol)])
        .env("BLOCKSNAP_S3_INFLIGHT", "1")
        .spawn()
        .unwrap();
    wait_for_a_lock(&env);
    writer.kill().unwrap();
    writer.wait().unwrap();
    assert_eq!(env.count_stored("local", "locks"), 1);
    // ...blocks gc until it is stale by the store's clock.
    let err = env.gc_is_held_off("beside a live writer's lock");
    assert!(err.contains("snapshot create by pid"), "{err}");
    sleep(Duration::from_secs(3));
    let gc = env
        .command(&["store", "gc", "--json"])
        .env("BLOCKSNAP_S3_LOCK_STALE", "2")
        .output()
        .unwrap();
    assert!(gc.status.success(), "{gc:?}");
    let report: Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert_eq!(report["TempFilesRemoved"], 1, "{report}");
    assert_eq!(report["Snapshots"], 0);
    assert_eq!(env.count_stored("local", "locks"), 0);
    assert_eq!(
        env.count_stored("local", "chunks"),
        0,
        "the killed run's chunks stayed"
    );
}

#[test]
fn wrong_or_missing_credentials_and_a_missing_bucket_are_clear_errors() {
    let Some(env) = Env::s3() else { return };
    let vol = env.path("vol.img");
    fs::write(&vol, random_bytes(4, 2 * MIB as usize)).unwrap();
    let run_with = |var: &str, value: Option<&str>, args: &[&str]| {
        let mut c = env.command(args);
        match value {
            Some(v) => c.env(var, v),
            None => c.env_remove(var),
        };
        c.output().unwrap()
    };
    let wrong = run_with(
        "AWS_SECRET_ACCESS_KEY",
        Some("not-the-secret"),
        &["snapshot", "create", s(&vol)],
    );
    assert_eq!(wrong.status.code(), Some(6), "{wrong:?}");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("refused the credentials") && err.contains("AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let none = run_with("AWS_ACCESS_KEY_ID", None, &["snapshot", "list"]);
    assert_eq!(none.status.code(), Some(6), "{none:?}");
    assert!(String::from_utf8_lossy(&none.stderr).contains("no credentials"));
    // Credentials are never written to the store's files.
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    for (path, bytes) in env.store_state() {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&secret),
            "{} holds the secret",
            path.display()
        );
    }
    assert_eq!(
        env.json(&["snapshot", "list"])["Snapshots"],
        serde_json::json!([])
    );

    let server = env.s3.clone().unwrap();
    let err = env.fails(
        &[
            "region",
            "add",
            "gone",
            "s3://no-such-bucket-here/x",
            "--endpoint",
            &server.endpoint,
            "--allow-http",
        ],
        3,
    );
    assert!(err.contains("bucket does not exist"), "{err}");
    let regions = env.json(&["region", "list"]);
    assert!(!regions.to_string().contains("gone"), "{regions}");
    let err = env.fails(&["region", "add", "bad", "http://x/y"], 2);
    assert!(err.contains("s3://BUCKET"), "{err}");
    let err = env.fails(
        &[
            "region",
            "add",
            "local",
            &server.url("again"),
            "--endpoint",
            &server.endpoint,
        ],
        5,
    );
    assert!(err.contains("already defined"), "{err}");
}

/// A proxy to the S3 server that answers the first `fail` connections
/// after `armed` is set with `503 Slow Down`, as a throttling S3 does.
struct Throttle {
    endpoint: String,
    armed: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
}

impl Throttle {
    fn start(upstream: &str, fail: usize) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        let armed = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (a, n) = (armed.clone(), served.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut client) = conn else { continue };
                if a.load(Ordering::SeqCst) && n.fetch_add(1, Ordering::SeqCst) < fail {
                    std::thread::spawn(move || slow_down(&mut client));
                    continue;
                }
                let up = upstream.clone();
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(&up) else {
                        return;
                    };
                    let (mut c2, mut s2) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let back = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut s2, &mut c2);
                        let _ = c2.shutdown(std::net::Shutdown::Both);
                    });
                    let mut server = server;
                    let _ = std::io::copy(&mut client, &mut server);
                    let _ = server.shutdown(std::net::Shutdown::Write);
                    let _ = back.join();
                });
            }
        });
        Throttle {
            endpoint,
            armed,
            served,
        }
    }
}

/// Reads one request and answers 503 SlowDown.
fn slow_down(client: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let header_end = loop {
        let Ok(n) = client.read(&mut byte) else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&byte[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + body_len {
        match client.read(&mut byte) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&byte[..n]),
        }
    }
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                <Message>Please reduce your request rate.</Message></Error>";
    let _ = write!(
        client,
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[test]
fn throttling_and_server_errors_are_retried_with_backoff() {
    let Some(env) = Env::with_s3_server() else {
        return;
    };
    let server = env.s3.clone().unwrap();
    let proxy = Throttle::start(&server.endpoint, 4);
    env.ok(&[
        "region",
        "add",
        "slow",
        &server.url("slow"),
        "--endpoint",
        &proxy.endpoint,
        "--allow-http",
    ]);
    let vol = env.path("vol.img");
    let data = random_bytes(5, 6 * MIB as usize);
    fs::write(&vol, &data).unwrap();
    proxy.armed.store(true, Ordering::SeqCst);
    let snap = env.snapshot(&vol, &["--region", "slow"]);
    assert!(
        proxy.served.load(Ordering::SeqCst) > 4,
        "the proxy was not used"
    );
    let out = env.path("out.img");
    env.ok(&["volume", "restore", &id(&snap), s(&out), "--region", "slow"]);
    assert!(fs::read(&out).unwrap() == data);
    // With retries off, the same throttling is an error.
    let again = Throttle::start(&server.endpoint, 1000);
    env.ok(&[
        "region",
        "add",
        "slower",
        &server.url("slower"),
        "--endpoint",
        &again.endpoint,
        "--allow-http",
    ]);
    again.armed.store(true, Ordering::SeqCst);
    let out = env
        .command(&["snapshot", "list", "--region", "slower"])
        .env("BLOCKSNAP_S3_RETRIES", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SlowDown"),
        "{out:?}"
    );
}

#[test]
fn a_server_that_never_answers_times_out_clearly() {
    let Some(env) = Env::with_s3_server() else {
        return;
    };
    let server = env.s3.clone().unwrap();
    env.add_s3_region("slow");
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", mute.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in mute.incoming().take(8) {
            conns.push(c);
        }
        sleep(Duration::from_secs(30));
    });
    let t = Instant::now();
    let out = env
        .command(&[
            "region",
            "add",
            "mute",
            &server.url("mute"),
            "--endpoint",
            &endpoint,
            "--allow-http",
        ])
        .env("BLOCKSNAP_S3_TIMEOUT", "1")
        .env("BLOCKSNAP_S3_RETRIES", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not answer in time"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20));
    drop(held);
}

/// A private server (the test kills it), from scripts/s3-server.sh.
struct PrivateServer {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

fn s3_script(cmd: &str, dir: &Path) -> std::process::Output {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/s3-server.sh"))
        .args([cmd, s(dir)])
        .output()
        .unwrap()
}

impl PrivateServer {
    fn start(dir: PathBuf) -> PrivateServer {
        let out = s3_script("start", &dir);
        assert!(out.status.success(), "{out:?}");
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PrivateServer { dir, env }
    }

    fn var(&self, name: &str) -> &str {
        &self.env.iter().find(|(k, _)| k == name).unwrap().1
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = s3_script("stop", &self.dir);
    }
}

#[test]
fn a_server_killed_mid_snapshot_leaves_no_snapshot() {
    // A private server; the shared one only says the tests may run.
    let Some(env) = Env::with_s3_server() else {
        return;
    };
    let server = PrivateServer::start(env.path("server"));
    let with_server = |args: &[&str]| {
        let mut c = env.command(args);
        for (k, v) in &server.env {
            c.env(k, v);
        }
        c.env("BLOCKSNAP_S3_TIMEOUT", "3")
            .env("BLOCKSNAP_S3_RETRIES", "2");
        c
    };
    let url = format!("s3://{}/killed", server.var("BLOCKSNAP_TEST_S3_BUCKET"));
    let added = with_server(&[
        "region",
        "add",
        "local",
        &url,
        "--endpoint",
        server.var("BLOCKSNAP_TEST_S3_ENDPOINT"),
        "--allow-http",
    ])
    .output()
    .unwrap();
    assert!(added.status.success(), "{added:?}");
    let vol = env.path("vol.img");
    let data = random_bytes(6, 160 * MIB as usize);
    fs::write(&vol, &data).unwrap();
    let child = with_server(&["snapshot", "create", s(&vol)])
        .env("BLOCKSNAP_S3_INFLIGHT", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server once the upload is under way.
    let t = Instant::now();
    loop {
        let listed = with_server(&["store", "stats", "--json"]).output().unwrap();
        let stats: Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
        if stats["Chunks"].as_u64().unwrap_or(0) >= 8 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no upload started");
        sleep(Duration::from_millis(50));
    }
    let killed = s3_script("kill", &server.dir);
    assert!(killed.status.success(), "{killed:?}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be reached") || err.contains("did not answer"),
        "{err}"
    );
    assert!(
        err.contains(server.var("BLOCKSNAP_TEST_S3_ENDPOINT")),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // Back up: no snapshot is visible, the store verifies, a rerun works
    // (with the usual patience again: verify reads every chunk).
    let restarted = s3_script("restart", &server.dir);
    assert!(restarted.status.success(), "{restarted:?}");
    let with_server = |args: &[&str]| {
        let mut c = with_server(args);
        c.env("BLOCKSNAP_S3_TIMEOUT", "60")
            .env("BLOCKSNAP_S3_RETRIES", "6");
        c
    };
    let list = with_server(&["snapshot", "list", "--json"])
        .output()
        .unwrap();
    assert!(list.status.success(), "{list:?}");
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(
        list["Snapshots"],
        serde_json::json!([]),
        "a half-written snapshot is visible"
    );
    let verify = with_server(&["store", "verify", "--json"])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    let verify: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(verify["Clean"], true, "{verify}");
    assert!(verify["OrphanChunks"].as_u64().unwrap() >= 8);
    let rerun = with_server(&["snapshot", "create", s(&vol), "--json"])
        .output()
        .unwrap();
    assert!(rerun.status.success(), "{rerun:?}");
    let snap: Value = serde_json::from_slice(&rerun.stdout).unwrap();
    let restored = env.path("restored.img");
    let r = with_server(&["volume", "restore", &id(&snap), s(&restored)])
        .output()
        .unwrap();
    assert!(r.status.success(), "{r:?}");
    assert!(fs::read(&restored).unwrap() == data);
}

/// `(GET, HEAD, PUT, listings)` from a `BLOCKSNAP_S3_TRACE` line.
fn request_counts(stderr: &str) -> (u64, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("requests to"))
        .unwrap_or_else(|| panic!("no request trace in {stderr}"));
    let count = |what: &str| -> u64 {
        let before = &line[..line.find(what).unwrap()];
        before.split_whitespace().last().unwrap().parse().unwrap()
    };
    (
        count(" GET"),
        count(" HEAD"),
        count(" PUT"),
        count(" listings"),
    )
}

#[test]
fn an_incremental_asks_nothing_about_unchanged_blocks() {
    let Some(env) = Env::s3() else { return };
    let vol = env.path("vol.img");
    let mut data = random_bytes(7, 32 * MIB as usize);
    fs::write(&vol, &data).unwrap();
    env.snapshot(&vol, &[]);
    // Two of the 64 blocks change.
    for at in [3 * 512 * 1024 + 4096, 40 * 512 * 1024] {
        data[at..at + 65536].copy_from_slice(&random_bytes(at as u64, 65536));
    }
    fs::write(&vol, &data).unwrap();
    let out = env
        .command(&["snapshot", "create", s(&vol), "--json"])
        .env("BLOCKSNAP_S3_TRACE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["Stats"]["UnchangedBlocks"], 62, "{snap}");
    let (get, head, put, lists) = request_counts(&String::from_utf8_lossy(&out.stderr));
    eprintln!("incremental of 2 in 64 blocks: {get} GET, {head} HEAD, {put} PUT, {lists} listings");
    // Per changed block: a HEAD (is the new chunk stored?), a GET of the
    // parent's chunk (the delta's base) and a PUT. Beyond that: store.json
    // and the parent manifest, encryption.json (is encryption on by
    // default?), the parent's tag record (`CreateTags`; absent here), the
    // manifest and the lock objects.
    assert!(head <= 2 + 2, "{head} HEAD for 2 changed of 64 blocks");
    assert!(get <= 2 + 2 + 2 + 1 + 1, "{get} GET");
    assert!(put <= 2 + 1 + 1, "{put} PUT");
    assert!(lists <= 3, "{lists} listings");
    let restored = env.path("r.img");
    env.ok(&["volume", "restore", &id(&snap), s(&restored)]);
    assert!(fs::read(&restored).unwrap() == data);
}
