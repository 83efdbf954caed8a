//! `blocksnap serve` against clients nobody here wrote: the AWS CLI and
//! botocore (AWS's Python SDK) sign every request with keys from `account
//! create`, write snapshots through the EBS direct API that `volume
//! restore` gives back byte for byte, and read them back; unsigned, badly
//! signed, expired and unknown-key requests are refused with AWS's codes;
//! another account reads nothing private until it is granted.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use blocksnap::server::client::sha256;
use serde_json::Value;

use crate::util::{Env, MIB, assert_fsck_clean, assert_same, s, sh_ok, skip};

/// The AWS CLI of `scripts/awscli.sh`, if installed.
fn aws_cli() -> Option<PathBuf> {
    let path = match std::env::var_os("BLOCKSNAP_AWS_VENV") {
        Some(v) => PathBuf::from(v),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".aws-venv"),
    }
    .join("bin/aws");
    if path.exists() {
        Some(path)
    } else {
        skip(format!(
            "no AWS CLI at {} (scripts/awscli.sh installs it)",
            path.display()
        ));
        None
    }
}

/// A running `blocksnap serve` on a free port, stopped with SIGTERM.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(env: &Env) -> Server {
        Server::start_with(env, &[])
    }

    fn start_with(env: &Env, extra: &[&str]) -> Server {
        let log = env.path("serve.log");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut child = env
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve printed {line:?}"))
            .to_string();
        Server { child, url, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// An account's access key.
#[derive(Clone)]
struct Key {
    account: String,
    id: String,
    secret: String,
}

/// A fresh store with the account alice, served; `None` (the test skips,
/// saying why) without the AWS CLI.
fn alice_served() -> Option<(PathBuf, Env, Key, Server)> {
    let cli = aws_cli()?;
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let server = Server::start(&env);
    Some((cli, env, alice, server))
}

fn create_account(env: &Env, name: &str) -> Key {
    let v = env.json(&["account", "create", "--name", name]);
    Key {
        account: v["AccessKey"]["AccountId"].as_str().unwrap().into(),
        id: v["AccessKey"]["AccessKeyId"].as_str().unwrap().into(),
        secret: v["AccessKey"]["SecretAccessKey"].as_str().unwrap().into(),
    }
}

/// A client process signing with `key` for region `local`.
fn client(program: &Path, key: &Key) -> Command {
    let mut c = Command::new(program);
    c.env("AWS_ACCESS_KEY_ID", &key.id)
        .env("AWS_SECRET_ACCESS_KEY", &key.secret)
        .env("AWS_DEFAULT_REGION", "local")
        .env_remove("AWS_REGION")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_MAX_ATTEMPTS", "1");
    c
}

fn aws(cli: &Path, server: &Server, key: &Key, args: &[&str]) -> Output {
    client(cli, key)
        .args(["--endpoint-url", &server.url, "--output", "json"])
        .args(args)
        .output()
        .unwrap()
}

fn aws_ok(cli: &Path, server: &Server, key: &Key, args: &[&str]) -> Value {
    let out = aws(cli, server, key, args);
    assert!(
        out.status.success(),
        "aws {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Runs `aws`, expects it to fail with AWS error `code`.
fn aws_fails(cli: &Path, server: &Server, key: &Key, args: &[&str], code: &str) -> String {
    let out = aws(cli, server, key, args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "aws {args:?} succeeded");
    assert!(err.contains(&format!("({code})")), "aws {args:?}: {err}");
    err
}

/// `aws ebs start-snapshot` of 1 GiB with client token `token`.
fn start_with_token(cli: &Path, server: &Server, key: &Key, token: &str) -> Value {
    aws_ok(
        cli,
        server,
        key,
        &[
            "ebs",
            "start-snapshot",
            "--volume-size",
            "1",
            "--client-token",
            token,
        ],
    )
}

/// Uploads `image` with botocore; returns the snapshot id.
fn upload(cli: &Path, server: &Server, key: &Key, image: &Path, extra: &[&str]) -> String {
    let python = cli.with_file_name("python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/clients/ebs_upload.py");
    let out = client(&python, key)
        .arg(script)
        .args([&server.url, s(image)])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "upload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A 1 MiB random image `small.img` uploaded by `key` with botocore and
/// registered as image `name` (with `extra` arguments); its snapshot and
/// image ids.
fn uploaded_image(
    env: &Env,
    cli: &Path,
    server: &Server,
    key: &Key,
    name: &str,
    extra: &[&str],
) -> (String, String) {
    let img = env.path("small.img");
    std::fs::write(&img, crate::util::random_bytes(11, MIB as usize)).unwrap();
    let snap = upload(cli, server, key, &img, &[]);
    let map = format!("/dev/xvda={snap}");
    let mut args = vec![
        "--account",
        &key.account,
        "image",
        "register",
        "--name",
        name,
        "--map",
        &map,
    ];
    args.extend_from_slice(extra);
    let reg = env.json(&args);
    (snap, reg["ImageId"].as_str().unwrap().to_string())
}

/// Asserts that `restored`, a 1 GiB volume, is `img` followed by zeros.
fn assert_padded_same(env: &Env, img: &Path, restored: &Path) {
    let want = env.path("want.img");
    std::fs::copy(img, &want).unwrap();
    sh_ok(&format!("truncate -s 1G '{}'", s(&want)));
    assert_same(&want, restored);
    std::fs::remove_file(&want).unwrap();
}

/// A 1 GiB sparse ext4 image with a few MiB of files.
fn ext4_image(env: &Env, name: &str) -> PathBuf {
    let dir = env.path(&format!("{name}.d"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.bin"),
        crate::util::random_bytes(7, 3 * MIB as usize),
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "hello from the EBS direct API\n").unwrap();
    let img = env.path(name);
    sh_ok(&format!(
        "truncate -s 1G '{i}' && mkfs.ext4 -q -F -O ^has_journal -E lazy_itable_init=1 -d '{d}' '{i}'",
        i = s(&img),
        d = s(&dir)
    ));
    img
}

#[test]
fn aws_clients_write_and_read_snapshots_that_restore_exactly() {
    let Some((cli, env, alice, server)) = alice_served() else {
        return;
    };
    let v1 = ext4_image(&env, "v1.img");
    let snap1 = upload(&cli, &server, &alice, &v1, &[]);

    // The snapshot is alice's: restored as her, it is the image.
    let out = env.path("out1.img");
    env.ok(&[
        "--account",
        &alice.account,
        "volume",
        "restore",
        &snap1,
        s(&out),
    ]);
    assert_same(&v1, &out);
    assert_fsck_clean(&out);

    // An incremental: one block rewritten, uploaded alone over the parent.
    let v2 = env.path("v2.img");
    std::fs::copy(&v1, &v2).unwrap();
    let block = 1000u64;
    let changed = crate::util::random_bytes(9, 512 << 10);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&v2).unwrap();
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(block * (512 << 10)))
            .unwrap();
        f.write_all(&changed).unwrap();
    }
    let snap2 = upload(
        &cli,
        &server,
        &alice,
        &v2,
        &["--parent", &snap1, "--blocks", &block.to_string()],
    );
    let out2 = env.path("out2.img");
    env.ok(&[
        "--account",
        &alice.account,
        "volume",
        "restore",
        &snap2,
        s(&out2),
    ]);
    assert_same(&v2, &out2);

    // The AWS CLI reads them back.
    let list = aws_ok(
        &cli,
        &server,
        &alice,
        &["ebs", "list-snapshot-blocks", "--snapshot-id", &snap2],
    );
    assert_eq!(list["BlockSize"], 524288);
    assert_eq!(list["VolumeSize"], 1);
    let blocks = list["Blocks"].as_array().unwrap();
    let mut data_blocks = 0;
    let mut raw = std::fs::File::open(&v2).unwrap();
    for b in blocks {
        let i = b["BlockIndex"].as_u64().unwrap();
        let mut want = vec![0u8; 512 << 10];
        use std::io::{Seek, SeekFrom};
        raw.seek(SeekFrom::Start(i * (512 << 10))).unwrap();
        raw.read_exact(&mut want).unwrap();
        assert!(
            want.iter().any(|&x| x != 0),
            "block {i} is listed but all zeros"
        );
        data_blocks += 1;
    }
    assert!(data_blocks >= 2, "{list}");
    let entry = blocks.iter().find(|b| b["BlockIndex"] == block).unwrap();
    let got = env.path("block.bin");
    let meta = aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ebs",
            "get-snapshot-block",
            "--snapshot-id",
            &snap2,
            "--block-index",
            &block.to_string(),
            "--block-token",
            entry["BlockToken"].as_str().unwrap(),
            s(&got),
        ],
    );
    assert_eq!(std::fs::read(&got).unwrap(), changed);
    assert_eq!(meta["DataLength"], 524288);
    assert_eq!(meta["ChecksumAlgorithm"], "SHA256");
    // A token of another block reads nothing.
    let other = blocks.iter().find(|b| b["BlockIndex"] != block).unwrap();
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "ebs",
            "get-snapshot-block",
            "--snapshot-id",
            &snap2,
            "--block-index",
            &block.to_string(),
            "--block-token",
            other["BlockToken"].as_str().unwrap(),
            s(&got),
        ],
        "ValidationException",
    );
    let changed_list = aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ebs",
            "list-changed-blocks",
            "--first-snapshot-id",
            &snap1,
            "--second-snapshot-id",
            &snap2,
        ],
    );
    let changed_blocks = changed_list["ChangedBlocks"].as_array().unwrap();
    assert_eq!(changed_blocks.len(), 1, "{changed_list}");
    assert_eq!(changed_blocks[0]["BlockIndex"], block);
    assert!(changed_blocks[0]["SecondBlockToken"].is_string());
    assert!(changed_blocks[0].get("FirstBlockToken").is_none());

    // Every request is in the log, with its account; no secret anywhere
    // but the key file.
    let log = server.log();
    assert!(
        log.contains(&format!(
            "account={} op=PutSnapshotBlock status=201",
            alice.account
        )),
        "{log}"
    );
    assert!(!log.contains(&alice.secret));
    let key_file = env.store().join("server/accounts.json");
    for (path, bytes) in env.store_state() {
        if path != key_file {
            assert!(
                !bytes
                    .windows(alice.secret.len())
                    .any(|w| w == alice.secret.as_bytes()),
                "{} holds the secret",
                path.display()
            );
        }
    }
}

#[test]
fn an_upload_is_checked_before_it_is_kept() {
    let Some((cli, env, alice, server)) = alice_served() else {
        return;
    };
    let start = |token: &str| start_with_token(&cli, &server, &alice, token);
    let started = start("token-1");
    assert_eq!(started["Status"], "pending");
    assert_eq!(started["OwnerId"], alice.account.as_str());
    // The same client token: the same snapshot.
    assert_eq!(start("token-1")["SnapshotId"], started["SnapshotId"]);
    let snap = started["SnapshotId"].as_str().unwrap().to_string();
    assert_ne!(start("token-2")["SnapshotId"], started["SnapshotId"]);
    let data = env.path("blk");
    std::fs::write(&data, crate::util::random_bytes(3, 512 << 10)).unwrap();
    let put = |checksum: &str, index: &str| {
        aws(
            &cli,
            &server,
            &alice,
            &[
                "ebs",
                "put-snapshot-block",
                "--snapshot-id",
                &snap,
                "--block-index",
                index,
                "--block-data",
                s(&data),
                "--data-length",
                "524288",
                "--checksum",
                checksum,
                "--checksum-algorithm",
                "SHA256",
            ],
        )
    };
    // A checksum that is not the block's: refused.
    let out = put("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "0");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ValidationException"));
    // Past the end of a 1 GiB volume.
    let sum = sh_ok(&format!(
        "openssl dgst -sha256 -binary '{}' | base64",
        s(&data)
    ));
    let out = put(sum.trim(), "2048");
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the end"));
    assert!(put(sum.trim(), "5").status.success());
    // The count must be what was written.
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "ebs",
            "complete-snapshot",
            "--snapshot-id",
            &snap,
            "--changed-blocks-count",
            "2",
        ],
        "ValidationException",
    );
    // Not visible before it is complete, and gc waits for it.
    env.fails(
        &["--account", &alice.account, "snapshot", "describe", &snap],
        3,
    );
    env.gc_is_held_off("an EBS upload is in progress");
    aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ebs",
            "complete-snapshot",
            "--snapshot-id",
            &snap,
            "--changed-blocks-count",
            "1",
        ],
    );
    let d = env.json(&["--account", &alice.account, "snapshot", "describe", &snap]);
    assert_eq!(d["Snapshots"][0]["OwnerId"], alice.account.as_str(), "{d}");
    // Completed: no more blocks.
    assert!(!put(sum.trim(), "6").status.success());
}

#[test]
fn requests_without_a_good_signature_are_refused() {
    let Some((cli, env, alice, server)) = alice_served() else {
        return;
    };
    let list = [
        "ebs",
        "list-snapshot-blocks",
        "--snapshot-id",
        "snap-0123456789abcdef0",
    ];
    // A wrong secret, an unknown key.
    let wrong = Key {
        secret: "x".repeat(40),
        ..alice.clone()
    };
    aws_fails(&cli, &server, &wrong, &list, "SignatureDoesNotMatch");
    // EC2's calls answer in EC2's shape, which its clients parse.
    aws_fails(
        &cli,
        &server,
        &wrong,
        &["ec2", "describe-snapshots"],
        "SignatureDoesNotMatch",
    );
    let unknown = Key {
        id: "AKIAAAAAAAAAAAAAAAAA".into(),
        ..alice.clone()
    };
    aws_fails(&cli, &server, &unknown, &list, "InvalidClientTokenId");
    // A deleted key stops working at once.
    let second = env.json(&["account", "keys", "create", &alice.account]);
    let rotated = Key {
        id: second["AccessKey"]["AccessKeyId"].as_str().unwrap().into(),
        secret: second["AccessKey"]["SecretAccessKey"]
            .as_str()
            .unwrap()
            .into(),
        ..alice.clone()
    };
    aws_fails(&cli, &server, &rotated, &list, "ResourceNotFoundException");
    env.ok(&["account", "keys", "delete", &alice.account, &alice.id]);
    aws_fails(&cli, &server, &alice, &list, "InvalidClientTokenId");
    // Unsigned, and signed 20 minutes ago (a replay past the window).
    let host = server.url.trim_start_matches("http://").to_string();
    let raw = |extra: &str| {
        let mut c = std::net::TcpStream::connect(&host).unwrap();
        write!(
            c,
            "GET /snapshots/snap-0123456789abcdef0/blocks HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        resp
    };
    let resp = raw("");
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("MissingAuthenticationToken"), "{resp}");
    // The request signed at `t`, sent raw.
    let signed_at = |t: std::time::SystemTime| {
        let date = blocksnap::server::sigv4::format_amz_date(t);
        let mut headers = http::HeaderMap::new();
        headers.insert("host", host.parse().unwrap());
        headers.insert("x-amz-date", date.parse().unwrap());
        let req = blocksnap::server::sigv4::Request {
            method: "GET",
            path: "/snapshots/snap-0123456789abcdef0/blocks",
            query: "",
            headers: &headers,
            body: b"",
        };
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let auth = blocksnap::server::sigv4::sign(
            &req,
            &rotated.id,
            &rotated.secret,
            "local",
            "ebs",
            &["host", "x-amz-date"],
            empty,
        )
        .unwrap();
        raw(&format!("x-amz-date: {date}\r\nauthorization: {auth}\r\n"))
    };
    let now = std::time::SystemTime::now();
    let resp = signed_at(now - std::time::Duration::from_secs(20 * 60));
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("RequestExpired"), "{resp}");
    // The same request signed now passes the signature check.
    let resp = signed_at(now);
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert!(!server.log().contains(&rotated.secret));
}

#[test]
fn another_account_reads_nothing_private_until_granted() {
    let Some(cli) = aws_cli() else { return };
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let bob = create_account(&env, "bob");
    let server = Server::start(&env);
    let img = env.path("small.img");
    std::fs::write(&img, crate::util::random_bytes(5, 2 * MIB as usize)).unwrap();
    let snap = upload(&cli, &server, &alice, &img, &[]);
    let list = [
        "ebs",
        "list-snapshot-blocks",
        "--snapshot-id",
        snap.as_str(),
    ];
    aws_fails(&cli, &server, &bob, &list, "AccessDeniedException");
    aws_fails(
        &cli,
        &server,
        &bob,
        &[
            "ebs",
            "start-snapshot",
            "--volume-size",
            "1",
            "--parent-snapshot-id",
            &snap,
        ],
        "AccessDeniedException",
    );
    env.fails(
        &[
            "--account",
            &bob.account,
            "volume",
            "restore",
            &snap,
            s(&env.path("b.img")),
        ],
        6,
    );
    // Bob cannot write into alice's upload either.
    let started = aws_ok(
        &cli,
        &server,
        &alice,
        &["ebs", "start-snapshot", "--volume-size", "1"],
    );
    let pending = started["SnapshotId"].as_str().unwrap();
    aws_fails(
        &cli,
        &server,
        &bob,
        &[
            "ebs",
            "complete-snapshot",
            "--snapshot-id",
            pending,
            "--changed-blocks-count",
            "0",
        ],
        "ResourceNotFoundException",
    );
    // Granted, bob reads it and builds on it; revoked, he reads it no more.
    env.ok(&[
        "--account",
        &alice.account,
        "snapshot",
        "permissions",
        &snap,
        "--add",
        &bob.account,
    ]);
    let blocks = aws_ok(&cli, &server, &bob, &list);
    assert_eq!(blocks["Blocks"].as_array().unwrap().len(), 4);
    let child = upload(
        &cli,
        &server,
        &bob,
        &img,
        &["--parent", &snap, "--blocks", "0"],
    );
    let out = env.path("bob.img");
    env.ok(&[
        "--account",
        &bob.account,
        "volume",
        "restore",
        &child,
        s(&out),
    ]);
    assert_padded_same(&env, &img, &out);
    env.ok(&[
        "--account",
        &alice.account,
        "snapshot",
        "permissions",
        &snap,
        "--remove",
        &bob.account,
    ]);
    aws_fails(&cli, &server, &bob, &list, "AccessDeniedException");
}

#[test]
fn aws_ec2_calls_describe_share_and_deregister_with_the_cli_rules() {
    let Some(cli) = aws_cli() else { return };
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let bob = create_account(&env, "bob");
    let server = Server::start(&env);
    let img = env.path("small.img");
    std::fs::write(&img, crate::util::random_bytes(6, MIB as usize)).unwrap();
    let snap = upload(&cli, &server, &alice, &img, &[]);
    let mine = aws_ok(
        &cli,
        &server,
        &alice,
        &["ec2", "describe-snapshots", "--owner-ids", "self"],
    );
    let snaps = mine["Snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{mine}");
    assert_eq!(snaps[0]["SnapshotId"], snap.as_str());
    assert_eq!(snaps[0]["State"], "completed");
    assert_eq!(snaps[0]["OwnerId"], alice.account.as_str());
    assert_eq!(snaps[0]["VolumeSize"], 1);
    // STS says whose each key is.
    let who = aws_ok(&cli, &server, &bob, &["sts", "get-caller-identity"]);
    assert_eq!(who["Account"], bob.account.as_str(), "{who}");
    // Bob sees none of it, by listing or by id.
    let his = aws_ok(&cli, &server, &bob, &["ec2", "describe-snapshots"]);
    assert_eq!(his["Snapshots"], serde_json::json!([]), "{his}");
    let by_id = ["ec2", "describe-snapshots", "--snapshot-ids", snap.as_str()];
    aws_fails(&cli, &server, &bob, &by_id, "UnauthorizedOperation");
    aws_fails(
        &cli,
        &server,
        &bob,
        &[
            "ec2",
            "describe-snapshots",
            "--snapshot-ids",
            "snap-0123456789abcdef0",
        ],
        "InvalidSnapshot.NotFound",
    );
    // Shared with bob through EC2's own call.
    aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "modify-snapshot-attribute",
            "--snapshot-id",
            &snap,
            "--attribute",
            "createVolumePermission",
            "--operation-type",
            "add",
            "--user-ids",
            &bob.account,
        ],
    );
    let attr = aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "describe-snapshot-attribute",
            "--snapshot-id",
            &snap,
            "--attribute",
            "createVolumePermission",
        ],
    );
    assert_eq!(
        attr["CreateVolumePermissions"][0]["UserId"],
        bob.account.as_str(),
        "{attr}"
    );
    aws_ok(&cli, &server, &bob, &by_id);
    let restorable = aws_ok(
        &cli,
        &server,
        &bob,
        &[
            "ec2",
            "describe-snapshots",
            "--restorable-by-user-ids",
            "self",
            "--owner-ids",
            &alice.account,
        ],
    );
    assert_eq!(
        restorable["Snapshots"].as_array().unwrap().len(),
        1,
        "{restorable}"
    );
    // Only the owner deletes or shares.
    aws_fails(
        &cli,
        &server,
        &bob,
        &["ec2", "delete-snapshot", "--snapshot-id", &snap],
        "UnauthorizedOperation",
    );

    // An image of alice's, registered, shared and unshared through EC2's
    // calls. Bob cannot back an image with her snapshot.
    let mapping = format!("DeviceName=/dev/xvda,Ebs={{SnapshotId={snap}}}");
    let register = |key: &Key, name: &str| {
        aws(
            &cli,
            &server,
            key,
            &[
                "ec2",
                "register-image",
                "--name",
                name,
                "--root-device-name",
                "/dev/xvda",
                "--block-device-mappings",
                &mapping,
            ],
        )
    };
    let reg = register(&alice, "web");
    assert!(
        reg.status.success(),
        "{}",
        String::from_utf8_lossy(&reg.stderr)
    );
    let reg: Value = serde_json::from_slice(&reg.stdout).unwrap();
    let ami = reg["ImageId"].as_str().unwrap().to_string();
    let bobs = register(&bob, "mine");
    assert!(!bobs.status.success());
    let err = String::from_utf8_lossy(&bobs.stderr);
    assert!(err.contains("only your own snapshots"), "{err}");
    let image = ["ec2", "describe-images", "--image-ids", ami.as_str()];
    let seen = aws_ok(&cli, &server, &alice, &image);
    let i = &seen["Images"][0];
    assert_eq!(i["Name"], "web");
    assert_eq!(i["State"], "available");
    assert_eq!(i["Public"], false);
    assert_eq!(i["RootDeviceName"], "/dev/xvda");
    assert_eq!(
        i["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"],
        snap.as_str()
    );
    aws_fails(&cli, &server, &bob, &image, "UnauthorizedOperation");
    let share = |op: &str| {
        aws_ok(
            &cli,
            &server,
            &alice,
            &[
                "ec2",
                "modify-image-attribute",
                "--image-id",
                &ami,
                "--launch-permission",
                &format!("{op}=[{{UserId={}}}]", bob.account),
            ],
        )
    };
    share("Add");
    assert_eq!(
        aws_ok(&cli, &server, &bob, &image)["Images"][0]["ImageId"],
        ami.as_str()
    );
    let perms = aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "describe-image-attribute",
            "--image-id",
            &ami,
            "--attribute",
            "launchPermission",
        ],
    );
    assert_eq!(
        perms["LaunchPermissions"][0]["UserId"],
        bob.account.as_str(),
        "{perms}"
    );
    // What EC2 allows bob, the CLI allows him too: launch it.
    let vm = env.path("vm");
    env.ok(&[
        "--account",
        &bob.account,
        "instance",
        "launch",
        &ami,
        s(&vm),
        "--lazy",
    ]);
    aws_fails(
        &cli,
        &server,
        &bob,
        &["ec2", "deregister-image", "--image-id", &ami],
        "UnauthorizedOperation",
    );
    share("Remove");
    aws_fails(&cli, &server, &bob, &image, "UnauthorizedOperation");
    aws_ok(
        &cli,
        &server,
        &alice,
        &["ec2", "deregister-image", "--image-id", &ami],
    );
    assert_eq!(
        aws_ok(&cli, &server, &alice, &image)["Images"][0]["State"],
        "deregistered"
    );
    // An unknown action, a wrong version: EC2's error shapes.
    aws_fails(
        &cli,
        &server,
        &alice,
        &["ec2", "describe-volumes"],
        "InvalidAction",
    );
}

#[test]
fn sixteen_clients_upload_at_once_and_every_snapshot_restores_exactly() {
    let Some((cli, env, alice, server)) = alice_served() else {
        return;
    };
    let python = cli.with_file_name("python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/clients/ebs_upload.py");
    let images: Vec<PathBuf> = (0..16)
        .map(|i| {
            let img = env.path(&format!("c{i}.img"));
            std::fs::write(&img, crate::util::random_bytes(100 + i, 3 * MIB as usize)).unwrap();
            img
        })
        .collect();
    let clients: Vec<Child> = images
        .iter()
        .map(|img| {
            client(&python, &alice)
                .arg(&script)
                .args([&server.url, s(img)])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ids: Vec<String> = clients
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .collect();
    for (img, id) in images.iter().zip(&ids) {
        let out = env.path(&format!("{id}.img"));
        env.ok(&[
            "--account",
            &alice.account,
            "volume",
            "restore",
            id,
            s(&out),
        ]);
        assert_padded_same(&env, img, &out);
        std::fs::remove_file(&out).unwrap();
    }
    env.ok(&["store", "verify"]);
}

#[test]
fn a_client_that_trickles_its_headers_is_cut_off_without_starving_others() {
    let Some(cli) = aws_cli() else { return };
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let server = Server::start_with(&env, &["--header-timeout", "2"]);
    let host = server.url.trim_start_matches("http://").to_string();
    let slow = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(&host).unwrap();
        let started = std::time::Instant::now();
        // One byte every 200 ms, for up to 20 s, until the server hangs up.
        for b in b"GET /snapshots/snap-0123456789abcdef0/blocks HTTP/1.1\r\nhost: x\r\nx-slow: "
            .iter()
            .cycle()
        {
            if c.write_all(&[*b]).is_err() || started.elapsed().as_secs() > 20 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        started.elapsed()
    });
    // Meanwhile others are served.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let v = aws_ok(
        &cli,
        &server,
        &alice,
        &["ec2", "describe-snapshots", "--owner-ids", "self"],
    );
    assert_eq!(v["Snapshots"], serde_json::json!([]));
    let held = slow.join().unwrap();
    assert!(
        held < std::time::Duration::from_secs(15),
        "a client sending a byte every 200 ms was still connected after {held:?}"
    );
}

#[test]
fn ec2_describes_filter_and_page_and_nothing_asked_is_left_undone() {
    let Some((cli, env, alice, server)) = alice_served() else {
        return;
    };
    let vol = env.path("vol.img");
    std::fs::write(&vol, crate::util::random_bytes(4, MIB as usize)).unwrap();
    // Seven snapshots: tagged env=test, env=dev1, env=dev2, and four prod.
    let mut snaps = Vec::new();
    for env_tag in ["test", "dev1", "dev2", "prod", "prod", "prod", "prod"] {
        let tag = format!("env={env_tag}");
        let v = env.json(&[
            "--account",
            &alice.account,
            "snapshot",
            "create",
            s(&vol),
            "--no-parent",
            "--tag",
            &tag,
        ]);
        snaps.push(v["SnapshotId"].as_str().unwrap().to_string());
    }
    let ids = |v: &Value, set: &str, key: &str| -> Vec<String> {
        let mut ids: Vec<String> = v[set]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|x| x[key].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // describe-snapshots of one's own, with `args`.
    let describe = |args: &[&str]| {
        let mut all = vec!["ec2", "describe-snapshots", "--owner-ids", "self"];
        all.extend_from_slice(args);
        aws(&cli, &server, &alice, &all)
    };
    let described = |args: &[&str]| {
        let out = describe(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        ids(
            &serde_json::from_slice(&out.stdout).unwrap(),
            "Snapshots",
            "SnapshotId",
        )
    };
    // Filters narrow, values of one filter are alternatives, wildcards
    // match, filters together must all hold.
    assert_eq!(
        described(&["--filters", "Name=tag:env,Values=test"]),
        vec![snaps[0].clone()]
    );
    assert_eq!(
        described(&["--filters", "Name=tag:env,Values=test,dev*"]),
        sorted(snaps[..3].to_vec())
    );
    assert_eq!(
        described(&["--filters", "Name=tag:env,Values=dev?"]),
        sorted(snaps[1..3].to_vec())
    );
    let one = format!("Name=snapshot-id,Values={}", snaps[4]);
    assert_eq!(
        described(&["--filters", "Name=tag:env,Values=prod", &one]),
        vec![snaps[4].clone()]
    );
    assert_eq!(
        described(&["--filters", "Name=tag-key,Values=env"]).len(),
        7
    );
    assert!(described(&["--filters", "Name=tag:env,Values=staging"]).is_empty());
    // A filter this server does not know is refused, not ignored.
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "describe-snapshots",
            "--filters",
            "Name=volume-id,Values=vol-1",
        ],
        "InvalidParameterValue",
    );
    // Pages of five: the AWS CLI follows NextToken to all seven, and one
    // page stops at five with a token.
    assert_eq!(described(&["--page-size", "5"]), sorted(snaps.clone()));
    let first: Value =
        serde_json::from_slice(&describe(&["--max-results", "5", "--no-paginate"]).stdout).unwrap();
    assert_eq!(first["Snapshots"].as_array().unwrap().len(), 5, "{first}");
    assert!(first["NextToken"].is_string(), "{first}");

    // A dry run reads and changes nothing: a describe says it would have
    // worked; a delete is refused, and the snapshot is still there.
    let dry = describe(&["--dry-run"]);
    let err = String::from_utf8_lossy(&dry.stderr);
    assert!(err.contains("DryRunOperation"), "{err}");
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "delete-snapshot",
            "--snapshot-id",
            &snaps[0],
            "--dry-run",
        ],
        "UnsupportedOperation",
    );
    assert_eq!(
        described(&["--snapshot-ids", &snaps[0]]),
        vec![snaps[0].clone()]
    );

    // Images: by name with a wildcard, by a snapshot they map.
    let map = |i: usize| format!("/dev/xvda={}", snaps[i]);
    let mut amis = Vec::new();
    for (i, name) in [(0, "web-1"), (1, "web-2"), (2, "db-1")] {
        let v = env.json(&[
            "--account",
            &alice.account,
            "image",
            "register",
            "--name",
            name,
            "--map",
            &map(i),
        ]);
        amis.push(v["ImageId"].as_str().unwrap().to_string());
    }
    let images = |filter: &str| {
        ids(
            &aws_ok(
                &cli,
                &server,
                &alice,
                &[
                    "ec2",
                    "describe-images",
                    "--owners",
                    "self",
                    "--filters",
                    filter,
                ],
            ),
            "Images",
            "ImageId",
        )
    };
    assert_eq!(images("Name=name,Values=web-*"), sorted(amis[..2].to_vec()));
    let by_snap = format!("Name=block-device-mapping.snapshot-id,Values={}", snaps[2]);
    assert_eq!(images(&by_snap), vec![amis[2].clone()]);
    // Asked to tag the image it registers: refused, where leaving the
    // tags undone would say it was done; nothing is registered.
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "register-image",
            "--name",
            "tagged",
            "--block-device-mappings",
            &format!("DeviceName=/dev/xvda,Ebs={{SnapshotId={}}}", snaps[3]),
            "--tag-specifications",
            "ResourceType=image,Tags=[{Key=team,Value=a}]",
        ],
        "UnknownParameter",
    );
    assert!(images("Name=name,Values=tagged").is_empty());
    // A copy retried with its client token is the same copy.
    let copy = |token: &str, name: &str| {
        aws_ok(
            &cli,
            &server,
            &alice,
            &[
                "ec2",
                "copy-image",
                "--source-region",
                "local",
                "--source-image-id",
                &amis[0],
                "--name",
                name,
                "--client-token",
                token,
            ],
        )["ImageId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let once = copy("copy-web-1", "web-copy");
    assert_eq!(copy("copy-web-1", "web-copy"), once);
    assert_ne!(copy("copy-web-2", "web-copy-2"), once);
    assert_eq!(images("Name=name,Values=web-copy*").len(), 2);
}

#[test]
fn a_store_is_served_by_one_server_at_a_time() {
    let env = Env::new();
    env.ok(&["store", "stats"]);
    // Served before it has an account: accounts are made while it runs.
    let first = Server::start(&env);
    let alice = create_account(&env, "alice");
    let pid = first.child.id();
    // A second server would take up the first's uploads as its own.
    let out = env.run(&["serve", "--listen", "127.0.0.1:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("served already") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    // The first goes on; once it is stopped, another may serve.
    remote_ok(&env, &first, &alice, &["snapshot", "list"]);
    drop(first);
    let second = Server::start(&env);
    let v = remote_ok(&env, &second, &alice, &["snapshot", "list"]);
    assert_eq!(v["Snapshots"], serde_json::json!([]));
}

#[test]
fn a_server_goes_on_when_its_output_cannot_be_written() {
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // Its address goes to a full disk, its log to a pipe nobody reads.
    let mut child = env
        .command(&["serve", "--listen", &listen])
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "serve ended: {:?}",
            child.wait()
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let server = Server {
        child,
        url: format!("http://{listen}"),
        log: env.path("no-log"),
    };
    // Each request writes a log line into the closed pipe.
    for _ in 0..3 {
        let v = remote_ok(&env, &server, &alice, &["snapshot", "list"]);
        assert_eq!(v["Snapshots"], serde_json::json!([]));
    }
}

/// Sends `head` and `body` on a fresh connection to `server` and returns
/// the answer's status line (within `wait`, or the empty string).
fn raw_request(server: &Server, head: &str, body: &[u8], wait: std::time::Duration) -> String {
    let host = server.url.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(host).unwrap();
    c.set_read_timeout(Some(wait)).unwrap();
    // The server may answer and close before all of the body is taken.
    let _ = c.write_all(head.as_bytes()).and_then(|_| c.write_all(body));
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_body_too_large_is_refused_at_once_and_the_server_goes_on() {
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let server = Server::start(&env);
    let path = "/snapshots/snap-0123456789abcdef0/blocks/0";
    // Declared far too large: refused from the headers, long before the
    // 60 s a body may take.
    let started = std::time::Instant::now();
    let status = raw_request(
        &server,
        &format!("PUT {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999\r\n\r\n"),
        b"abc",
        std::time::Duration::from_secs(30),
    );
    assert!(status.starts_with("HTTP/1.1 413"), "{status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "answered only after {:?}",
        started.elapsed()
    );
    // Sent without a length, in chunks, past the limit: refused once the
    // limit is crossed.
    let chunk = vec![7u8; 64 << 10];
    let mut body = Vec::new();
    for _ in 0..12 {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let status = raw_request(
        &server,
        &format!("PUT {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"),
        &body,
        std::time::Duration::from_secs(30),
    );
    assert!(status.starts_with("HTTP/1.1 413"), "{status:?}");
    // Each is in the log; others are served.
    assert_eq!(
        server.log().matches("status=413").count(),
        2,
        "{}",
        server.log()
    );
    let v = remote_ok(&env, &server, &alice, &["snapshot", "list"]);
    assert_eq!(v["Snapshots"], serde_json::json!([]));
}

#[test]
fn a_server_killed_mid_upload_shows_no_partial_snapshot_and_carries_on_when_restarted() {
    let Some(cli) = aws_cli() else { return };
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let mut server = Server::start(&env);
    let start = |server: &Server, token: &str| {
        let v = start_with_token(&cli, server, &alice, token);
        v["SnapshotId"].as_str().unwrap().to_string()
    };
    let put = |server: &Server, snap: &str, index: &str, data: &Path| {
        let sum = sh_ok(&format!(
            "openssl dgst -sha256 -binary '{}' | base64",
            s(data)
        ));
        aws_ok(
            &cli,
            server,
            &alice,
            &[
                "ebs",
                "put-snapshot-block",
                "--snapshot-id",
                snap,
                "--block-index",
                index,
                "--block-data",
                s(data),
                "--data-length",
                "524288",
                "--checksum",
                sum.trim(),
                "--checksum-algorithm",
                "SHA256",
            ],
        );
    };
    let blocks: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = env.path(&format!("blk{i}"));
            std::fs::write(&p, crate::util::random_bytes(8 + i, 512 << 10)).unwrap();
            p
        })
        .collect();
    let pending = start(&server, "job-7");
    put(&server, &pending, "0", &blocks[0]);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut server = Server::start(&env);
    assert!(
        server
            .log()
            .contains(&format!("upload {pending} carries on (1 blocks kept)"))
    );
    // Nothing half-written is visible as a snapshot; by its id it is
    // still pending.
    let listed = aws_ok(
        &cli,
        &server,
        &alice,
        &["ec2", "describe-snapshots", "--owner-ids", "self"],
    );
    assert_eq!(listed["Snapshots"], serde_json::json!([]), "{listed}");
    let by_id = aws_ok(
        &cli,
        &server,
        &alice,
        &["ec2", "describe-snapshots", "--snapshot-ids", &pending],
    );
    assert_eq!(by_id["Snapshots"][0]["State"], "pending", "{by_id}");
    // The client's retry with the same token gets the same snapshot, and
    // carries on where it was.
    assert_eq!(start(&server, "job-7"), pending);
    put(&server, &pending, "1", &blocks[1]);
    aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ebs",
            "complete-snapshot",
            "--snapshot-id",
            &pending,
            "--changed-blocks-count",
            "2",
        ],
    );
    let img = env.path("two.img");
    sh_ok(&format!(
        "cat '{}' '{}' > '{}'",
        s(&blocks[0]),
        s(&blocks[1]),
        s(&img)
    ));
    let out = env.path("out.img");
    env.ok(&[
        "--account",
        &alice.account,
        "volume",
        "restore",
        &pending,
        s(&out),
    ]);
    assert_padded_same(&env, &img, &out);

    // gc run while no server holds an upload reclaims its blocks: the
    // restarted server drops it, and the same token starts anew.
    let lost = start(&server, "job-8");
    put(&server, &lost, "0", &blocks[2]);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    env.ok(&["store", "gc"]);
    let server = Server::start(&env);
    assert!(
        server.log().contains(&format!("upload {lost} dropped")),
        "{}",
        server.log()
    );
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "ebs",
            "complete-snapshot",
            "--snapshot-id",
            &lost,
            "--changed-blocks-count",
            "1",
        ],
        "ResourceNotFoundException",
    );
    let again = start(&server, "job-8");
    assert_ne!(again, lost);
    env.ok(&["store", "verify"]);
}

#[test]
fn https_with_a_certificate_serves_the_aws_cli_and_refuses_plain_http() {
    let Some(cli) = aws_cli() else { return };
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    // A test CA, and the server's certificate signed by it (rustls, as
    // browsers, will not take a CA certificate as a server's).
    let (cert, key, ca) = (
        env.path("cert.pem"),
        env.path("key.pem"),
        env.path("ca.pem"),
    );
    std::fs::write(env.path("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    sh_ok(&format!(
        "cd '{d}' && openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=test-ca -days 1 \
         -keyout ca.key -out '{ca}' 2>/dev/null && openssl req -newkey rsa:2048 -nodes \
         -subj /CN=localhost -keyout '{k}' -out leaf.csr 2>/dev/null && openssl x509 -req \
         -in leaf.csr -CA '{ca}' -CAkey ca.key -CAcreateserial -days 1 -extfile san.ext \
         -out '{c}' 2>/dev/null",
        d = s(&env.path(".")),
        ca = s(&ca),
        k = s(&key),
        c = s(&cert)
    ));
    // A key that is not a key: a clear refusal before listening.
    let err = env.fails(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&cert),
        ],
        2,
    );
    assert!(err.contains("private key"), "{err}");
    // A FIFO is refused, not waited on.
    let fifo = env.path("fifo.pem");
    sh_ok(&format!("mkfifo '{}'", s(&fifo)));
    let err = env.fails(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(&fifo),
            "--tls-key",
            s(&key),
        ],
        2,
    );
    assert!(err.contains("not a regular file"), "{err}");
    let server = Server::start_with(&env, &["--tls-cert", s(&cert), "--tls-key", s(&key)]);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let v = aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "--ca-bundle",
            s(&ca),
            "ec2",
            "describe-snapshots",
            "--owner-ids",
            "self",
        ],
    );
    assert_eq!(v["Snapshots"], serde_json::json!([]));
    // blocksnap's own client trusts the CA of AWS_CA_BUNDLE, as the AWS
    // CLI does, and uploads and restores over TLS.
    let img = env.path("small.img");
    std::fs::write(&img, crate::util::random_bytes(8, 3 * MIB as usize)).unwrap();
    let with_ca = |args: &[&str]| {
        let mut all = vec!["--endpoint", server.url.as_str(), "--json"];
        all.extend_from_slice(args);
        env.command(&all)
            .env("AWS_ACCESS_KEY_ID", &alice.id)
            .env("AWS_SECRET_ACCESS_KEY", &alice.secret)
            .env("AWS_CA_BUNDLE", &ca)
            .output()
            .unwrap()
    };
    let made = with_ca(&["snapshot", "create", s(&img)]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: Value = serde_json::from_slice(&made.stdout).unwrap();
    let back = env.path("back.img");
    let restored = with_ca(&[
        "volume",
        "restore",
        made["SnapshotId"].as_str().unwrap(),
        s(&back),
    ]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_padded_same(&env, &img, &back);
    // Without the CA the clients refuse the server; plain HTTP gets no answer.
    let err = remote_fails(&env, &server, &alice, &["snapshot", "list"], 1);
    assert!(err.contains("AWS_CA_BUNDLE"), "{err}");
    let out = aws(&cli, &server, &alice, &["ec2", "describe-snapshots"]);
    assert!(!out.status.success());
    let plain = server.url.replace("https://", "http://");
    let out = client(&cli, &alice)
        .args(["--endpoint-url", &plain, "ec2", "describe-snapshots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// coldsnap 0.12 (`cargo install --locked coldsnap --version 0.12.0`), if
/// installed: on PATH or in cargo's bin directory.
fn coldsnap() -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"));
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(cargo_bin)
        .map(|d| d.join("coldsnap"))
        .find(|p| p.exists());
    if found.is_none() {
        skip("no coldsnap (cargo install --locked coldsnap --version 0.12.0)");
    }
    found
}

fn coldsnap_ok(program: &Path, server: &Server, key: &Key, args: &[&str]) -> String {
    let out = client(program, key)
        .args(["--region", "local", "--endpoint", &server.url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "coldsnap {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn coldsnap_uploads_downloads_and_waits() {
    let Some(coldsnap) = coldsnap() else { return };
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let server = Server::start(&env);
    let img = ext4_image(&env, "disk.img");
    // coldsnap upload --wait: EBS's calls, then EC2's DescribeSnapshots.
    let up = coldsnap_ok(
        &coldsnap,
        &server,
        &alice,
        &["upload", "--no-progress", "--wait", s(&img)],
    );
    let snap = up.lines().next().unwrap().trim().to_string();
    assert!(snap.starts_with("snap-"), "{up}");
    let restored = env.path("restored.img");
    env.ok(&[
        "--account",
        &alice.account,
        "volume",
        "restore",
        &snap,
        s(&restored),
    ]);
    assert_same(&img, &restored);
    assert_fsck_clean(&restored);
    coldsnap_ok(&coldsnap, &server, &alice, &["wait", &snap]);
    // coldsnap download of a snapshot blocksnap took equals its restore.
    let v2 = env.path("v2.img");
    std::fs::copy(&img, &v2).unwrap();
    sh_ok(&format!(
        "printf 'changed by blocksnap' | dd of='{}' bs=1 seek=300000000 conv=notrunc 2>/dev/null",
        s(&v2)
    ));
    let taken = env.json(&["--account", &alice.account, "snapshot", "create", s(&v2)]);
    let taken = taken["SnapshotId"].as_str().unwrap().to_string();
    let down = env.path("down.img");
    coldsnap_ok(
        &coldsnap,
        &server,
        &alice,
        &["download", "--no-progress", &taken, s(&down)],
    );
    let mine = env.path("mine.img");
    env.ok(&[
        "--account",
        &alice.account,
        "volume",
        "restore",
        &taken,
        s(&mine),
    ]);
    assert_same(&mine, &down);
    assert_same(&v2, &down);
    // Another account's coldsnap reads nothing of it.
    let bob = create_account(&env, "bob");
    let out = client(&coldsnap, &bob)
        .args(["--region", "local", "--endpoint", &server.url])
        .args(["download", "--no-progress", &taken, s(&env.path("bob.img"))])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// What blocksnap answers beside moto 5.1 for the same requests, by shape:
/// the differences kept on purpose, each because AWS answers as blocksnap
/// does (see the README).
const KEPT_FROM_MOTO: [(&str, &str); 11] = [
    ("ListSnapshotBlocks", "extra ExpiryTime"),
    ("ListChangedBlocks", "extra ExpiryTime"),
    ("DescribeSnapshots", "extra Snapshots[].StorageTier"),
    ("DescribeSnapshots", "missing Snapshots[].Tags"),
    ("DescribeImages", "extra Images[].Architecture"),
    (
        "DescribeImages",
        "extra Images[].BlockDeviceMappings[].Ebs.Encrypted",
    ),
    ("DescribeImages", "missing Images[].BootMode"),
    ("DescribeImages", "extra Images[].Hypervisor"),
    ("DescribeImages", "missing Images[].ProductCodes"),
    ("DescribeImages", "missing Images[].Tags"),
    ("DescribeImages", "extra Images[].VirtualizationType"),
];

#[test]
fn answers_have_the_shapes_moto_gives_but_for_the_differences_kept() {
    let Some((cli, env, alice, server)) = alice_served() else {
        return;
    };
    let (_, ami) = uploaded_image(&env, &cli, &server, &alice, "cmp", &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/clients/compare_moto.py");
    let out = client(&cli.with_file_name("python3"), &alice)
        .arg(script)
        .args([&server.url, ami.as_str(), "222222222222"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut unexpected = Vec::new();
    for (op, diffs) in report.as_object().unwrap() {
        for d in diffs.as_array().unwrap() {
            let d = d.as_str().unwrap();
            if !KEPT_FROM_MOTO.contains(&(op.as_str(), d)) {
                unexpected.push(format!("{op}: {d}"));
            }
        }
    }
    assert!(
        unexpected.is_empty(),
        "shapes differ from moto's: {unexpected:#?}"
    );
    assert_eq!(report.as_object().unwrap().len(), 16, "{report}");
}

#[test]
fn copy_image_through_ec2_follows_the_cli_rules_across_regions() {
    let Some(cli) = aws_cli() else { return };
    let env = Env::with_test_regions();
    let alice = create_account(&env, "alice");
    let bob = create_account(&env, "bob");
    let server = Server::start(&env);
    let img = env.path("small.img");
    std::fs::write(&img, crate::util::random_bytes(12, 2 * MIB as usize)).unwrap();
    let snap = upload(&cli, &server, &alice, &img, &[]);
    let reg = aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "register-image",
            "--name",
            "base",
            "--block-device-mappings",
            &format!("DeviceName=/dev/xvda,Ebs={{SnapshotId={snap}}}"),
        ],
    );
    let ami = reg["ImageId"].as_str().unwrap().to_string();
    aws_ok(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "modify-image-attribute",
            "--image-id",
            &ami,
            "--launch-permission",
            &format!("Add=[{{UserId={}}}]", bob.account),
        ],
    );
    let copy = [
        "--region",
        "eu-west-1",
        "ec2",
        "copy-image",
        "--source-region",
        "local",
        "--source-image-id",
        ami.as_str(),
        "--name",
        "bobs",
    ];
    // EC2's rule: copying a shared image needs read access to its snapshots.
    aws_fails(&cli, &server, &bob, &copy, "UnauthorizedOperation");
    env.ok(&[
        "--account",
        &alice.account,
        "snapshot",
        "permissions",
        &snap,
        "--add",
        &bob.account,
    ]);
    let copied = aws_ok(&cli, &server, &bob, &copy);
    let new_ami = copied["ImageId"].as_str().unwrap().to_string();
    let there = aws_ok(
        &cli,
        &server,
        &bob,
        &[
            "--region",
            "eu-west-1",
            "ec2",
            "describe-images",
            "--image-ids",
            &new_ami,
        ],
    );
    let image = &there["Images"][0];
    assert_eq!(image["OwnerId"], bob.account.as_str(), "{there}");
    let copied_snap = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        .as_str()
        .unwrap();
    let out = env.path("copy.img");
    env.ok(&[
        "--region",
        "eu-west-1",
        "--account",
        &bob.account,
        "volume",
        "restore",
        copied_snap,
        s(&out),
    ]);
    assert_padded_same(&env, &img, &out);
    // The copy is bob's and private: alice does not see it there.
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "--region",
            "eu-west-1",
            "ec2",
            "describe-images",
            "--image-ids",
            &new_ami,
        ],
        "UnauthorizedOperation",
    );
    // blocksnap's own client copies too, sending CopyImage to the region
    // copied into.
    let copied = remote_ok(
        &env,
        &server,
        &alice,
        &[
            "image",
            "copy",
            &ami,
            "--to-region",
            "eu-west-1",
            "--copy-tags",
        ],
    );
    let mine = copied["ImageId"].as_str().unwrap();
    let there = env.json(&[
        "--region",
        "eu-west-1",
        "--account",
        &alice.account,
        "image",
        "describe",
        mine,
    ]);
    assert_eq!(
        there["Images"][0]["OwnerId"],
        alice.account.as_str(),
        "{there}"
    );
}

#[test]
fn no_region_can_take_the_names_the_store_keeps_beside_its_regions() {
    let env = Env::new();
    env.ok(&["account", "create"]);
    for name in ["server", "account"] {
        let err = env.fails(&["region", "add", name], 2);
        assert!(err.contains("reserved"), "{err}");
    }
    // The key file is still only the server's.
    let mode = std::os::unix::fs::MetadataExt::mode(
        &std::fs::metadata(env.store().join("server")).unwrap(),
    );
    assert_eq!(mode & 0o777, 0o700);
}

/// `blocksnap --endpoint` signing with `key`; its store is one that does
/// not exist, so nothing it does can reach the server's store but through
/// the server.
fn remote(env: &Env, server: &Server, key: &Key, args: &[&str]) -> Output {
    let mut all = vec!["--endpoint", server.url.as_str()];
    all.extend_from_slice(args);
    env.command(&all)
        .env("BLOCKSNAP_STORE", env.path("no-store-here"))
        .env("AWS_ACCESS_KEY_ID", &key.id)
        .env("AWS_SECRET_ACCESS_KEY", &key.secret)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .unwrap()
}

fn remote_ok(env: &Env, server: &Server, key: &Key, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = remote(env, server, key, &all);
    assert!(
        out.status.success(),
        "blocksnap --endpoint {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn remote_fails(env: &Env, server: &Server, key: &Key, args: &[&str], code: i32) -> String {
    let out = remote(env, server, key, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.starts_with("blocksnap: error: "), "{err}");
    assert!(!err.contains(&key.secret), "{err}");
    err
}

#[test]
fn the_cli_through_an_endpoint_snapshots_restores_and_launches() {
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let bob = create_account(&env, "bob");
    let server = Server::start(&env);
    let img = ext4_image(&env, "disk.img");

    // A full snapshot sends only the blocks that are not zero.
    let full = remote_ok(&env, &server, &alice, &["snapshot", "create", s(&img)]);
    let first = full["SnapshotId"].as_str().unwrap().to_string();
    assert_eq!(full["ParentSnapshotId"], Value::Null);
    assert_eq!(full["Blocks"], 2048);
    let sent = full["BlocksSent"].as_u64().unwrap();
    assert!(sent > 0 && sent < 200, "{full}");

    // A file written into the file system: the next snapshot finds its
    // parent by the volume's path and sends only what changed.
    let extra = env.path("extra.bin");
    std::fs::write(&extra, crate::util::random_bytes(9, 2 * MIB as usize)).unwrap();
    sh_ok(&format!(
        "debugfs -w -R 'write {} extra.bin' '{}' >/dev/null 2>&1",
        s(&extra),
        s(&img)
    ));
    let inc = remote_ok(&env, &server, &alice, &["snapshot", "create", s(&img)]);
    let second = inc["SnapshotId"].as_str().unwrap().to_string();
    assert_eq!(inc["ParentSnapshotId"], first.as_str());
    let sent = inc["BlocksSent"].as_u64().unwrap();
    assert!((4..=40).contains(&sent), "{inc}");

    // Restored through the server, as a new file and as a delta onto the
    // first snapshot's volume; the server's own CLI sees the same bytes
    // and the volume's path.
    let out = env.path("restored.img");
    remote_ok(
        &env,
        &server,
        &alice,
        &["volume", "restore", &first, s(&out)],
    );
    let delta = remote_ok(
        &env,
        &server,
        &alice,
        &["volume", "restore", &second, s(&out), "--delta"],
    );
    let written = delta["BlocksWritten"].as_u64().unwrap();
    assert!((4..=40).contains(&written), "{delta}");
    assert_same(&img, &out);
    assert_fsck_clean(&out);
    let local = env.path("local.img");
    env.ok(&[
        "--account",
        &alice.account,
        "volume",
        "restore",
        &second,
        s(&local),
    ]);
    assert_same(&img, &local);
    let listed = env.json(&[
        "--account",
        &alice.account,
        "snapshot",
        "list",
        "--volume",
        s(&img),
    ]);
    assert_eq!(listed["Snapshots"].as_array().unwrap().len(), 2, "{listed}");
    // qemu-img reads the qcow2 the server's blocks were written into.
    let qcow = env.path("restored.qcow2");
    remote_ok(
        &env,
        &server,
        &alice,
        &["volume", "restore", &second, s(&qcow), "--format", "qcow2"],
    );
    sh_ok(&format!("qemu-img compare -q '{}' '{}'", s(&img), s(&qcow)));
    let mine = remote_ok(
        &env,
        &server,
        &alice,
        &["snapshot", "list", "--volume", s(&img)],
    );
    assert_eq!(mine["Snapshots"].as_array().unwrap().len(), 2, "{mine}");

    // Bob may not read alice's snapshot; --account is no way around it.
    remote_fails(
        &env,
        &server,
        &bob,
        &["volume", "restore", &first, s(&env.path("b.img"))],
        6,
    );
    remote_fails(&env, &server, &bob, &["snapshot", "describe", &first], 6);
    remote_fails(&env, &server, &bob, &["snapshot", "delete", &first], 6);
    remote_fails(
        &env,
        &server,
        &bob,
        &["--account", &alice.account, "snapshot", "list"],
        2,
    );
    assert!(!env.path("b.img").exists());

    // An image alice shares: bob launches it through the server, reading
    // its snapshot by the launch permission alone.
    // The block lists through the server: the second snapshot differs
    // from the first in exactly the blocks its upload sent.
    let listed = remote_ok(&env, &server, &alice, &["snapshot", "blocks", &first]);
    assert_eq!(
        listed["Blocks"].as_array().unwrap().len() as u64,
        full["BlocksSent"].as_u64().unwrap()
    );
    let changed = remote_ok(
        &env,
        &server,
        &alice,
        &["snapshot", "changed-blocks", &first, &second],
    );
    assert_eq!(
        changed["ChangedBlocks"].as_array().unwrap().len() as u64,
        inc["BlocksSent"].as_u64().unwrap(),
        "{changed}"
    );
    let reg = remote_ok(
        &env,
        &server,
        &alice,
        &[
            "image",
            "register",
            "--name",
            "golden",
            "--map",
            &format!("/dev/xvda={second}"),
            "--map",
            "/dev/xvdb=ephemeral0",
            "--tag",
            "role=golden",
        ],
    );
    let ami = reg["ImageId"].as_str().unwrap().to_string();
    let described = env.json(&["--account", &alice.account, "image", "describe", &ami]);
    assert_eq!(
        described["Images"][0]["Tags"][0]["Value"], "golden",
        "{described}"
    );
    // A lazy volume holds only what was written over its snapshot: it is
    // never uploaded raw.
    let lazy = env.path("lazy-vm");
    env.ok(&[
        "--account",
        &alice.account,
        "instance",
        "launch",
        &ami,
        s(&lazy),
        "--lazy",
    ]);
    for f in ["xvda.img", "xvda.overlay"] {
        let err = remote_fails(
            &env,
            &server,
            &alice,
            &["snapshot", "create", s(&lazy.join(f))],
            2,
        );
        assert!(err.contains("lazy volume"), "{err}");
    }
    let dir = env.path("vm");
    remote_fails(
        &env,
        &server,
        &bob,
        &["instance", "launch", &ami, s(&dir)],
        6,
    );
    assert!(!dir.exists());
    let perms = remote_ok(
        &env,
        &server,
        &alice,
        &["image", "permissions", &ami, "--add", &bob.account],
    );
    assert_eq!(
        perms["LaunchPermissions"][0]["UserId"],
        bob.account.as_str()
    );
    // The launch permission reads the image's snapshots and no other
    // (curl signs its own requests: `--aws-sigv4`).
    let list_for_launch = |snap: &str| {
        sh_ok(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --aws-sigv4 'aws:amz:local:ebs' \
             --user '{}:{}' '{}/snapshots/{snap}/blocks?launchImageId={ami}'",
            bob.id, bob.secret, server.url
        ))
    };
    assert_eq!(list_for_launch(&second).trim(), "200");
    assert_eq!(list_for_launch(&first).trim(), "403");
    let images = remote_ok(&env, &server, &bob, &["image", "list"]);
    assert_eq!(images["Images"][0]["ImageId"], ami.as_str(), "{images}");
    let launched = remote_ok(
        &env,
        &server,
        &bob,
        &[
            "instance",
            "launch",
            &ami,
            s(&dir),
            "--ephemeral-size",
            "4M",
        ],
    );
    let inst = &launched["Instances"][0];
    assert_eq!(inst["OwnerId"], bob.account.as_str(), "{launched}");
    assert_same(&img, &dir.join("xvda.img"));
    assert_eq!(
        std::fs::metadata(dir.join("xvdb.img")).unwrap().len(),
        4 * MIB
    );
    remote_fails(&env, &server, &bob, &["snapshot", "describe", &second], 6);
    remote_ok(&env, &server, &bob, &["instance", "terminate", s(&dir)]);
    // Revoked, bob launches it no more.
    remote_ok(
        &env,
        &server,
        &alice,
        &["image", "permissions", &ami, "--remove", &bob.account],
    );
    remote_fails(
        &env,
        &server,
        &bob,
        &["instance", "launch", &ami, s(&env.path("vm2"))],
        6,
    );
    remote_fails(&env, &server, &bob, &["image", "deregister", &ami], 6);
    remote_ok(&env, &server, &alice, &["image", "deregister", &ami]);

    // What has no call on the server says where to run it; no key, a
    // wrong key or no server are each a clear error.
    let err = remote_fails(&env, &server, &alice, &["store", "gc"], 2);
    assert!(err.contains("server's machine"), "{err}");
    let no_key = env
        .command(&["--endpoint", &server.url, "snapshot", "list"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("AWS_ACCESS_KEY_ID"));
    let wrong = Key {
        secret: "x".repeat(40),
        ..alice.clone()
    };
    let err = remote_fails(&env, &server, &wrong, &["snapshot", "list"], 6);
    assert!(err.contains("SignatureDoesNotMatch"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = Server {
        child: Command::new("true").spawn().unwrap(),
        url: format!("http://{}", closed.local_addr().unwrap()),
        log: env.path("none.log"),
    };
    drop(closed);
    let err = remote_fails(&env, &gone, &alice, &["snapshot", "list"], 1);
    assert!(err.contains("blocksnap serve"), "{err}");
    assert!(!server.log().contains(&alice.secret));
}

#[test]
fn frozen_server_formats_still_read() {
    // testdata/v6-server: the key file, the journal of an upload a killed
    // server left, one block written, and the tags CreateTags gave the
    // snapshot it becomes (see its README).
    const ACCOUNT: &str = "034113131889";
    const KEY: &str = "AKIASV6QXD5ZTXLWSFSC:HR4TdPprlCVus34bmCfLSTxMvvjsGxsWM2WV+Qz0";
    const SNAP: &str = "snap-a1c0c703eff1c23af";
    let env = Env::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v6-server/store");
    sh_ok(&format!(
        "mkdir -p '{0}' && cp -r '{1}/.' '{0}/' && chmod 700 '{0}/server' && \
         chmod 600 '{0}/server/accounts.json'",
        env.store().display(),
        fixture.display()
    ));
    let listed = env.json(&["account", "list"]);
    assert!(listed.to_string().contains(ACCOUNT), "{listed}");
    // A journal of a newer blocksnap is left for it, not dropped.
    let newer = env.store().join("server/uploads/snap-0123456789abcdef0");
    std::fs::create_dir_all(&newer).unwrap();
    std::fs::write(
        newer.join("start.json"),
        r#"{"Format": "blocksnap-upload", "Version": 99}"#,
    )
    .unwrap();
    let server = Server::start(&env);
    assert!(server.log().contains("left alone"), "{}", server.log());
    assert!(newer.join("start.json").exists());
    assert!(
        server
            .log()
            .contains(&format!("upload {SNAP} carries on (1 blocks kept)")),
        "{}",
        server.log()
    );
    // Completed by curl, with the LINEAR checksum over the one block's
    // SHA-256. curl 7.88 signs `x-amz-checksum-algorithm` (and the
    // aggregation method) before `x-amz-checksum`: the server takes the
    // order the request lists.
    let block: Vec<u8> = (0..512 << 10).map(|i| (i % 251) as u8 + 1).collect();
    let linear = BASE64.encode(sha256(&sha256(&block)));
    let completed = sh_ok(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' --aws-sigv4 'aws:amz:local:ebs' --user '{KEY}' \
         -X POST -H 'x-amz-changedblockscount: 1' -H 'x-amz-checksum: {linear}' \
         -H 'x-amz-checksum-algorithm: SHA256' -H 'x-amz-checksum-aggregation-method: LINEAR' \
         '{}/snapshots/completion/{SNAP}'",
        server.url
    ));
    assert_eq!(completed.trim(), "202", "{}", server.log());
    let out = env.path("out.img");
    env.ok(&["--account", ACCOUNT, "volume", "restore", SNAP, s(&out)]);
    // The tags `CreateTags` left (`blocksnap-tags` 1) replace its own.
    let described = env.json(&["--account", ACCOUNT, "snapshot", "describe", SNAP]);
    let tags = described["Snapshots"][0]["Tags"].to_string();
    assert!(
        tags.contains("\"frozen\"") && tags.contains("\"fixture\""),
        "{tags}"
    );
    let want = env.path("want.img");
    let f = std::fs::File::create(&want).unwrap();
    f.set_len(1 << 30).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &block, 3 * (512 << 10)).unwrap();
    assert_same(&want, &out);
}

#[test]
fn create_tags_changes_the_tags_every_reader_sees() {
    let Some(cli) = aws_cli() else { return };
    let env = Env::new();
    env.ok(&["store", "stats"]);
    let alice = create_account(&env, "alice");
    let bob = create_account(&env, "bob");
    let server = Server::start(&env);
    let (snap, ami) = uploaded_image(
        &env,
        &cli,
        &server,
        &alice,
        "tagged",
        &["--tag", "env=test"],
    );
    let img = env.path("small.img");
    let tag = |key: &Key, resources: &[&str], tags: &[&str]| {
        let mut args = vec!["ec2", "create-tags", "--resources"];
        args.extend_from_slice(resources);
        args.push("--tags");
        args.extend_from_slice(tags);
        aws(&cli, &server, key, &args)
    };
    let done = tag(
        &alice,
        &[&snap, &ami],
        &["Key=team,Value=db", "Key=env,Value=prod"],
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    // A key given again takes the new value.
    assert!(
        tag(&alice, &[&snap], &["Key=team,Value=web"])
            .status
            .success()
    );
    let tags_of = |v: &Value| {
        let mut t: Vec<(String, String)> = v["Tags"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let text = |k: &str| t[k].as_str().unwrap().to_string();
                (text("Key"), text("Value"))
            })
            .filter(|(k, _)| k != "blocksnap:source")
            .collect();
        t.sort();
        t
    };
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    let snap_tags = || {
        let d = aws_ok(
            &cli,
            &server,
            &alice,
            &["ec2", "describe-snapshots", "--snapshot-ids", &snap],
        );
        tags_of(&d["Snapshots"][0])
    };
    assert_eq!(snap_tags(), [pair("env", "prod"), pair("team", "web")]);
    // The CLI on the server's store sees the same tags.
    let local = env.json(&["--account", &alice.account, "snapshot", "describe", &snap]);
    let local = &local["Snapshots"][0];
    assert_eq!(
        tags_of(local),
        [pair("env", "prod"), pair("team", "web")],
        "{local}"
    );
    let image = aws_ok(
        &cli,
        &server,
        &alice,
        &["ec2", "describe-images", "--image-ids", &ami],
    );
    assert_eq!(
        tags_of(&image["Images"][0]),
        [pair("env", "prod"), pair("team", "db")]
    );
    env.ok(&["store", "verify"]);
    // DeleteTags: a value given must match; a key alone goes whatever its
    // value; no tag named takes every tag; blocksnap's own keys are refused.
    let untag = |resource: &str, tags: &[&str]| {
        let mut args = vec!["ec2", "delete-tags", "--resources", resource];
        if !tags.is_empty() {
            args.push("--tags");
            args.extend_from_slice(tags);
        }
        aws_ok(&cli, &server, &alice, &args);
    };
    untag(&snap, &["Key=team,Value=db"]);
    assert_eq!(snap_tags(), [pair("env", "prod"), pair("team", "web")]);
    untag(&snap, &["Key=team"]);
    assert_eq!(snap_tags(), [pair("env", "prod")]);
    untag(&snap, &[]);
    assert_eq!(snap_tags(), []);
    aws_fails(
        &cli,
        &server,
        &alice,
        &[
            "ec2",
            "delete-tags",
            "--resources",
            &snap,
            "--tags",
            "Key=blocksnap:source",
        ],
        "InvalidParameterValue",
    );
    aws_fails(
        &cli,
        &server,
        &bob,
        &["ec2", "delete-tags", "--resources", &ami],
        "UnauthorizedOperation",
    );
    // blocksnap's own `tag` commands through the server send the same calls.
    let now = remote_ok(
        &env,
        &server,
        &alice,
        &["image", "tag", &ami, "--tag", "tier=gold", "--untag", "env"],
    );
    assert_eq!(now["ResourceId"], ami.as_str());
    assert_eq!(tags_of(&now), [pair("team", "db"), pair("tier", "gold")]);
    let now = remote_ok(
        &env,
        &server,
        &alice,
        &["snapshot", "tag", &snap, "--tag", "a=b"],
    );
    assert_eq!(tags_of(&now), [pair("a", "b")]);
    remote_fails(
        &env,
        &server,
        &bob,
        &["image", "tag", &ami, "--untag-all"],
        6,
    );
    env.ok(&["store", "verify"]);
    // Another account tags nothing of alice's; bad tags are refused.
    let refused = tag(&bob, &[&snap], &["Key=team,Value=mine"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UnauthorizedOperation"));
    let long = format!("Key={},Value=x", "k".repeat(129));
    let refused = tag(&alice, &[&snap], &[&long]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("InvalidParameterValue"));
    let refused = tag(&alice, &["vol-0123456789abcdef0"], &["Key=a,Value=b"]);
    assert!(!refused.status.success());
    // An encrypted snapshot's tags are sealed with it.
    env.set_passphrase(Some("tags test passphrase"));
    let sealed = env.json(&[
        "--account",
        &alice.account,
        "snapshot",
        "create",
        s(&img),
        "--encrypted",
        "--no-parent",
    ]);
    let sealed = sealed["SnapshotId"].as_str().unwrap();
    let refused = tag(&alice, &[sealed], &["Key=a,Value=b"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("sealed"), "{err}");
    // Deleted with its snapshot.
    let record = env.store().join(format!("local/snapshot-tags/{snap}.json"));
    assert!(record.exists());
    env.ok(&["--account", &alice.account, "image", "deregister", &ami]);
    env.ok(&["--account", &alice.account, "snapshot", "delete", &snap]);
    assert!(
        !env.store()
            .join(format!("local/snapshot-tags/{snap}.json"))
            .exists()
    );
}
