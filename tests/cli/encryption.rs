//! Encrypted snapshots and images: no readable byte of a disk in the
//! store, keyed chunk names, tampering found, keys and passphrases, and
//! EBS's rules for encryption, each in its own test.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::*;

const PASSPHRASE: &str = "correct horse battery staple 7f3a9c";
/// 64 bytes no file system writes by itself.
const MARKER: &[u8; 64] = b"BLOCKSNAP-ENCRYPTION-MARKER-5b1f0c9e2a7d4e83-never-in-the-store!";
const OTHER: &str = "222222222222";
/// A description and a tag value only the key may show.
const DESCRIPTION: &str = "payroll-disk-3e9b7c1f-description";
const TAG_VALUE: &str = "team-ledger-0d4a8e62";

/// A 64 MiB ext4 image holding MARKER and 2 MiB of compressible text;
/// returns it and the text.
fn marked_volume(env: &Env, name: &str) -> (PathBuf, Vec<u8>) {
    let src = env.path(&format!("{name}-src"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("marker"), MARKER).unwrap();
    let text = text_bytes(42, 2 * MIB as usize);
    fs::write(src.join("notes.txt"), &text).unwrap();
    fs::write(src.join("noise.bin"), random_bytes(3, MIB as usize)).unwrap();
    let img = env.path(&format!("{name}.img"));
    sh_ok(&format!(
        "truncate -s 64M '{0}' && mkfs.ext4 -q -F -d '{1}' '{0}'",
        img.display(),
        src.display()
    ));
    (img, text)
}

/// Every object of `region`, by key, as an outside client sees it.
fn stored_objects(env: &Env, region: &str) -> Vec<(String, Vec<u8>)> {
    let local = env.store().join(region).join("store.json").exists();
    match &env.s3 {
        _ if local => {
            let root = env.store().join(region);
            let mut files = Vec::new();
            walk_files(&root, &mut files);
            files
                .into_iter()
                .map(|p| {
                    let key = p.strip_prefix(&root).unwrap().display().to_string();
                    (key, fs::read(&p).unwrap())
                })
                .collect()
        }
        Some(server) => {
            let prefix = format!("{}/{region}/", server.prefix);
            let listing = String::from_utf8(env.list_stored_keys(&prefix)).unwrap();
            let keys: Vec<String> = listing
                .split("<Key>")
                .skip(1)
                .map(|k| k.split("</Key>").next().unwrap().to_string())
                .collect();
            assert!(!keys.is_empty(), "no objects listed under {prefix}");
            keys.into_iter()
                .map(|k| {
                    let key = k.strip_prefix(&prefix).unwrap().to_string();
                    let bytes = env.read_stored(region, &key);
                    (key, bytes)
                })
                .collect()
        }
        None => panic!("region {region} is neither local nor on the S3 server"),
    }
}

fn walk_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Whether `needle` is in `bytes`, raw or inside any zstd frame in them.
fn holds(bytes: &[u8], needle: &[u8]) -> bool {
    let found = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    if found(bytes) {
        return true;
    }
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    (0..bytes.len().saturating_sub(4))
        .filter(|&i| bytes[i..i + 4] == ZSTD_MAGIC)
        .any(|i| {
            let mut out = Vec::new();
            let mut d = match zstd::stream::read::Decoder::new(&bytes[i..]) {
                Ok(d) => d.single_frame(),
                Err(_) => return false,
            };
            let _ = std::io::Read::read_to_end(&mut d, &mut out);
            found(&out)
        })
}

/// The chunk names a snapshot's blocks hold.
fn names(env: &Env, snap: &str, extra: &[&str]) -> HashSet<String> {
    let mut args = vec!["snapshot", "blocks", snap];
    args.extend_from_slice(extra);
    let v = env.json(&args);
    v["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["Checksum"].as_str().map(str::to_string))
        .collect()
}

/// Registers image `enc` of `img`, encrypted under the default key.
fn encrypted_image(env: &Env, img: &Path) -> String {
    let created = env.json(&[
        "image",
        "create",
        "--name",
        "enc",
        "--map",
        &format!("/dev/xvda={}", s(img)),
        "--encrypted",
    ]);
    created["ImageId"].as_str().unwrap().to_string()
}

/// A launched volume holds the image's volume, then zeros to the GiB.
fn assert_launched(volume: &Path, launched: &Path) {
    let len = fs::metadata(volume).unwrap().len();
    let same = sh(&format!(
        "cmp -n {len} '{}' '{}'",
        volume.display(),
        launched.display()
    ));
    assert!(same.status.success(), "{same:?}");
}

fn describe(env: &Env, snap: &str) -> Value {
    env.json(&["snapshot", "describe", snap])["Snapshots"][0].clone()
}

fn no_readable_byte_case(env: &Env) {
    env.set_passphrase(Some(PASSPHRASE));
    let (img, text) = marked_volume(env, "disk");
    let window = &text[MIB as usize..MIB as usize + 4096];
    let tag = format!("owner={TAG_VALUE}");
    let labels = ["--description", DESCRIPTION, "--tag", &tag];
    let snap = env.snapshot(&img, &[&["--encrypted"], &labels[..]].concat());
    assert_eq!(snap["Encrypted"], true, "{snap}");
    assert!(
        snap["KmsKeyId"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:kms:local:"),
        "{snap}"
    );
    let objects = stored_objects(env, "local");
    assert!(objects.iter().any(|(k, _)| k.starts_with("keys/")));
    let path = s(&img).as_bytes();
    for (key, bytes) in &objects {
        assert!(!holds(bytes, MARKER), "the marker is readable in {key}");
        assert!(!holds(bytes, window), "the text is readable in {key}");
        for meta in [DESCRIPTION.as_bytes(), TAG_VALUE.as_bytes(), path] {
            assert!(!holds(bytes, meta), "{meta:?} is readable in {key}");
        }
        assert!(
            !holds(bytes, PASSPHRASE.as_bytes()),
            "the passphrase is in {key}"
        );
    }
    // The same search finds both in a plain snapshot: it can fail.
    let plain_args = [
        &[
            "snapshot",
            "create",
            s(&img),
            "--no-parent",
            "--region",
            "r2",
        ],
        &labels[..],
    ]
    .concat();
    env.ok(&plain_args);
    let plain = stored_objects(env, "r2");
    for needle in [&MARKER[..], window, DESCRIPTION.as_bytes(), path] {
        assert!(plain.iter().any(|(_, b)| holds(b, needle)));
    }
    let out = env.path("restored.img");
    env.ok(&["volume", "restore", &id(&snap), s(&out)]);
    assert_same(&img, &out);
    assert_fsck_clean(&out);
}
on_each_backend!(
    no_readable_byte_of_the_disk_reaches_the_store,
    no_readable_byte_case
);

#[test]
fn names_say_nothing_across_keys_and_still_deduplicate_within_one() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    env.ok(&["key", "create", "--alias", "a"]);
    env.ok(&["key", "create", "--alias", "b"]);
    let (img, _) = marked_volume(&env, "disk");
    let a = id(&env.snapshot(&img, &["--kms-key-id", "alias/a"]));
    let b = id(&env.snapshot(&img, &["--kms-key-id", "alias/b", "--no-parent"]));
    let plain = id(&env.snapshot(&img, &["--no-parent"]));
    let (na, nb, np) = (
        names(&env, &a, &[]),
        names(&env, &b, &[]),
        names(&env, &plain, &[]),
    );
    assert!(!na.is_empty() && na.len() == nb.len() && nb.len() == np.len());
    assert!(na.is_disjoint(&nb), "two keys share chunk names");
    assert!(na.is_disjoint(&np) && nb.is_disjoint(&np));
    // One block changed: the incremental under alias/a stores one chunk.
    sh_ok(&format!(
        "printf 'changed' | dd of='{}' bs=1 seek=$((40*1024*1024+5)) conv=notrunc 2>/dev/null",
        img.display()
    ));
    let inc = env.json(&[
        "snapshot",
        "create",
        s(&img),
        "--parent",
        &a,
        "--kms-key-id",
        "alias/a",
    ]);
    assert_eq!(inc["ParentSnapshotId"], a.as_str(), "{inc}");
    assert_eq!(inc["Stats"]["NewChunks"], 1, "{inc}");
    assert_eq!(inc["KmsKeyId"], describe(&env, &a)["KmsKeyId"]);
    let ni = names(&env, &id(&inc), &[]);
    assert_eq!(ni.difference(&na).count(), 1, "dedup lost within a key");
}

/// Runs `restore` of `snap` to a new file and expects an integrity error
/// naming `what`; nothing is left at the target.
fn restore_refused(env: &Env, snap: &str, what: &str) {
    let out = env.path("tampered.img");
    let _ = fs::remove_file(&out);
    let e = env.fails(&["volume", "restore", snap, s(&out)], 4);
    assert!(e.contains(what), "{what} not named: {e}");
    if out.exists() {
        // Whatever was written is only what verified before the damage.
        assert!(fs::metadata(&out).unwrap().len() <= 64 * MIB);
    }
}

#[test]
fn tampering_with_sealed_chunks_and_manifests_is_found_and_named() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let snap = id(&env.snapshot(&img, &["--encrypted"]));
    env.ok(&["key", "create", "--alias", "other"]);
    let other = id(&env.snapshot(&img, &["--kms-key-id", "alias/other", "--no-parent"]));
    let blocks = env.json(&["snapshot", "blocks", &snap]);
    let data: Vec<usize> = blocks["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, b)| b["Checksum"].is_string())
        .map(|(i, _)| i)
        .collect();
    let (i, j) = (data[0], data[1]);
    let (ki, kj) = (
        env.chunk_key(&snap, i, "local"),
        env.chunk_key(&snap, j, "local"),
    );
    let short = |k: &str| k.rsplit('/').next().unwrap()[..12].to_string();
    let (ci, cj) = (env.read_stored("local", &ki), env.read_stored("local", &kj));
    let put = |k: &str, b: &[u8]| env.write_stored("local", k, b);
    // A payload byte, a header byte (the raw length), the nonce.
    for pos in [ci.len() - 20, 9, 40] {
        let mut bad = ci.clone();
        bad[pos] ^= 0x04;
        put(&ki, &bad);
        restore_refused(&env, &snap, &short(&ki));
        put(&ki, &ci);
    }
    // Two chunks swapped.
    put(&ki, &cj);
    put(&kj, &ci);
    restore_refused(&env, &snap, &short(&ki));
    put(&ki, &ci);
    put(&kj, &cj);
    // The same block's chunk from another key, under this name.
    let ko = env.chunk_key(&other, i, "local");
    put(&ki, &env.read_stored("local", &ko));
    restore_refused(&env, &snap, &short(&ki));
    put(&ki, &ci);
    // The manifest: its meta, its name table, its sealed block list.
    let mk = format!("snapshots/{snap}");
    let m = env.read_stored("local", &mk);
    for pos in [120, m.len() - 200, m.len() - 3] {
        let mut bad = m.clone();
        bad[pos] ^= 0x01;
        put(&mk, &bad);
        restore_refused(&env, &snap, &snap);
        put(&mk, &m);
    }
    // Even with its checksums recomputed, an altered block list does not
    // authenticate.
    let mut forged = m.clone();
    let n = forged.len();
    forged[n - 30] ^= 0x01;
    let u32_at = |o: usize| u32::from_le_bytes(m[o..o + 4].try_into().unwrap()) as usize;
    let metas = 112..112 + u32_at(12) + u32_at(28);
    let body = blake3::hash(&forged[metas.end..]);
    forged[80..112].copy_from_slice(body.as_bytes());
    put(&mk, &forged);
    let e = env.fails(&["volume", "restore", &snap, s(&env.path("f.img"))], 4);
    assert!(e.contains("block list fails authentication"), "{e}");
    // So does an altered sealed meta.
    let mut forged = m.clone();
    forged[metas.end - 30] ^= 0x01;
    let mut h = blake3::Hasher::new();
    h.update(&forged[..48]);
    h.update(&forged[metas]);
    forged[48..80].copy_from_slice(h.finalize().as_bytes());
    put(&mk, &forged);
    let e = env.fails(&["snapshot", "describe", &snap], 4);
    assert!(e.contains("meta fails authentication"), "{e}");
    put(&mk, &m);
    let out = env.path("good.img");
    env.ok(&["volume", "restore", &snap, s(&out)]);
    assert_same(&img, &out);
}

#[test]
fn keys_need_the_passphrase_a_grant_and_to_be_enabled() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let snap = env.snapshot(&img, &["--encrypted"]);
    let (snap, key) = (id(&snap), snap["KmsKeyId"].as_str().unwrap().to_string());
    let key_id = key.rsplit('/').next().unwrap().to_string();
    let out = env.path("out.img");
    let restore = ["volume", "restore", &snap, s(&out), "--force"];

    env.set_passphrase(Some("not the passphrase"));
    let e = env.fails(&restore, 6);
    assert!(e.contains("wrong passphrase") && e.contains(&key_id), "{e}");
    // None at all, and no terminal to ask on.
    env.set_passphrase(None);
    let o = env
        .command(&restore)
        .env("BLOCKSNAP_DETACHED", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("BLOCKSNAP_PASSPHRASE"));
    // From a file.
    let pf = env.path("passphrase");
    fs::write(&pf, format!("{PASSPHRASE}\n")).unwrap();
    env.ok(&[
        "volume",
        "restore",
        &snap,
        s(&out),
        "--force",
        "--passphrase-file",
        s(&pf),
    ]);
    assert_same(&img, &out);
    env.set_passphrase(Some(PASSPHRASE));

    // Disabled: nothing under it reads; enabled again: it does.
    env.ok(&["key", "disable", "alias/aws/ebs"]);
    let e = env.fails(&restore, 6);
    assert!(e.contains("disabled") && e.contains(&key_id), "{e}");
    env.ok(&["key", "enable", &key]);
    env.ok(&restore);

    // Shared with another account, which the key is not granted to.
    env.ok(&["snapshot", "permissions", &snap, "--add", OTHER]);
    let as_other = [
        "volume",
        "restore",
        &snap,
        s(&out),
        "--force",
        "--account",
        OTHER,
    ];
    let e = env.fails(&as_other, 6);
    assert!(e.contains(&key_id) && e.contains("grant"), "{e}");
    // Only the owner grants.
    env.fails(
        &[
            "key",
            "grant",
            &key_id,
            "--grantee",
            OTHER,
            "--account",
            OTHER,
        ],
        6,
    );
    env.ok(&["key", "grant", &key_id, "--grantee", OTHER]);
    let d = env.json(&["key", "describe", &key_id]);
    assert_eq!(d["KeyMetadata"]["Grants"][0], OTHER, "{d}");
    env.ok(&as_other);
    assert_same(&img, &out);
    env.ok(&["key", "revoke", &key_id, "--grantee", OTHER]);
    env.fails(&as_other, 6);

    // A key kept in a key file: the store holds no material for it.
    let kf = env.path("db.key");
    env.ok(&["key", "create", "--alias", "db", "--key-file", s(&kf)]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&kf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let e = env.fails(
        &["key", "create", "--alias", "db2", "--key-file", s(&kf)],
        5,
    );
    assert!(e.contains("never overwrites"), "{e}");
    let e = env.fails(
        &[
            "snapshot",
            "create",
            s(&img),
            "--kms-key-id",
            "alias/db",
            "--no-parent",
        ],
        6,
    );
    assert!(e.contains("--key-file"), "{e}");
    let missing = env.path("missing.key");
    env.fails(
        &[
            "snapshot",
            "create",
            s(&img),
            "--kms-key-id",
            "alias/db",
            "--no-parent",
            "--key-file",
            s(&missing),
        ],
        3,
    );
    let kf_snap = env.json(&[
        "snapshot",
        "create",
        s(&img),
        "--kms-key-id",
        "alias/db",
        "--no-parent",
        "--key-file",
        s(&kf),
    ]);
    let e = env.fails(&["volume", "restore", &id(&kf_snap), s(&out), "--force"], 6);
    assert!(e.contains("key file"), "{e}");
    env.ok(&[
        "volume",
        "restore",
        &id(&kf_snap),
        s(&out),
        "--force",
        "--key-file",
        s(&kf),
    ]);
    assert_same(&img, &out);

    // Another account's alias/aws/ebs is its own key.
    let theirs = env.json(&[
        "snapshot",
        "create",
        s(&img),
        "--encrypted",
        "--no-parent",
        "--account",
        OTHER,
    ]);
    assert_ne!(theirs["KmsKeyId"].as_str().unwrap(), key, "{theirs}");
    assert!(
        theirs["KmsKeyId"]
            .as_str()
            .unwrap()
            .contains(&format!(":{OTHER}:key/"))
    );
    env.fails(&["key", "describe", "alias/db", "--account", OTHER], 3);

    // No option takes the passphrase itself (it would show in `ps`).
    let o = env.run(&["snapshot", "list", "--passphrase", PASSPHRASE]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(!holds(&o.stderr, PASSPHRASE.as_bytes()));

    // The passphrase never shows: not in any output, not in the store.
    let outputs = [
        env.run(&["key", "list", "--json"]),
        env.run(&["key", "describe", "alias/db", "--json"]),
        env.run(&["snapshot", "list", "--json"]),
        env.run(&["store", "verify"]),
    ];
    for o in &outputs {
        assert!(o.status.success(), "{o:?}");
        for stream in [&o.stdout, &o.stderr] {
            assert!(!holds(stream, PASSPHRASE.as_bytes()), "passphrase printed");
        }
    }
    for (key, bytes) in stored_objects(&env, "local") {
        assert!(!holds(&bytes, PASSPHRASE.as_bytes()), "passphrase in {key}");
    }
    assert!(!holds(&fs::read(&kf).unwrap(), PASSPHRASE.as_bytes()));
}

#[test]
fn an_incremental_of_an_encrypted_snapshot_stays_under_its_key() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    env.ok(&["key", "create", "--alias", "mine"]);
    let (img, _) = marked_volume(&env, "disk");
    let first = env.snapshot(&img, &["--kms-key-id", "alias/mine"]);
    // Asked for nothing: still encrypted, under the same key, incremental.
    let next = env.snapshot(&img, &[]);
    assert_eq!(next["ParentSnapshotId"], first["SnapshotId"], "{next}");
    assert_eq!(next["Encrypted"], true);
    assert_eq!(next["KmsKeyId"], first["KmsKeyId"]);
    assert_eq!(next["Stats"]["NewChunks"], 0, "{next}");
    // Another key for the same lineage: refused with an explicit parent,
    // a new full lineage without.
    let e = env.fails(
        &[
            "snapshot",
            "create",
            s(&img),
            "--parent",
            &id(&first),
            "--kms-key-id",
            "alias/aws/ebs",
        ],
        2,
    );
    assert!(e.contains("stays under its parent's key"), "{e}");
    let other = env.snapshot(&img, &["--kms-key-id", "alias/aws/ebs"]);
    assert!(other.get("ParentSnapshotId").is_none(), "{other}");
    assert_ne!(other["KmsKeyId"], first["KmsKeyId"]);
}

#[test]
fn encrypting_a_volume_with_unencrypted_snapshots_starts_a_full_lineage() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let plain = id(&env.snapshot(&img, &[]));
    let e = env.fails(
        &[
            "snapshot",
            "create",
            s(&img),
            "--parent",
            &plain,
            "--encrypted",
        ],
        2,
    );
    assert!(
        e.contains("is not encrypted") && e.contains("first encrypted snapshot"),
        "{e}"
    );
    let o = env.run(&["snapshot", "create", s(&img), "--encrypted", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let enc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(enc.get("ParentSnapshotId").is_none(), "{enc}");
    assert_eq!(enc["Encrypted"], true);
    assert!(String::from_utf8_lossy(&o.stderr).contains("new full, encrypted lineage"));
    assert!(enc["Stats"]["NewChunks"].as_u64().unwrap() > 0);
    // An unencrypted snapshot is never incremental to an encrypted one.
    let after = env.snapshot(&img, &[]);
    assert_eq!(after["Encrypted"], true, "{after}");
}

#[test]
fn without_its_key_a_snapshot_shows_only_what_anyone_may_see() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let tag = format!("owner={TAG_VALUE}");
    let snap = env.snapshot(
        &img,
        &["--encrypted", "--description", DESCRIPTION, "--tag", &tag],
    );
    let full = describe(&env, &id(&snap));
    assert_eq!(full["Description"], DESCRIPTION, "{full}");
    assert_eq!(full["Tags"][0]["Value"], TAG_VALUE, "{full}");
    assert_eq!(full["SourcePath"], s(&img), "{full}");
    assert!(full.get("Sealed").is_none(), "{full}");

    // No passphrase: id, owner, size, time, encryption and key, no more.
    env.set_passphrase(None);
    let o = env.run(&["snapshot", "describe", &id(&snap), "--json"]);
    assert!(o.status.success(), "{o:?}");
    let bare = &serde_json::from_slice::<Value>(&o.stdout).unwrap()["Snapshots"][0];
    for k in [
        "SnapshotId",
        "OwnerId",
        "VolumeSizeBytes",
        "StartTime",
        "KmsKeyId",
    ] {
        assert_eq!(bare[k], full[k], "{k}: {bare}");
    }
    assert_eq!(
        (&bare["Encrypted"], &bare["Sealed"]),
        (&true.into(), &true.into())
    );
    for k in ["Description", "Tags", "SourcePath", "RootDigest", "Stats"] {
        assert!(bare.get(k).is_none(), "{k} shown without the key: {bare}");
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs the passphrase"), "{err}");
    let listed = env.ok(&["snapshot", "list"]);
    assert!(
        listed.contains(&id(&snap))
            && listed.contains("(encrypted")
            && !listed.contains("disk.img"),
        "{listed}"
    );
    // Its volume cannot be told: a plain snapshot of what may be the same
    // disk is refused (a full one stays possible, and plain).
    let e = env.fails(&["snapshot", "create", s(&img)], 6);
    assert!(
        e.contains(&id(&snap)) && e.contains("--no-parent") && e.contains("passphrase"),
        "{e}"
    );
    let fresh = env.snapshot(&img, &["--no-parent"]);
    assert_eq!(fresh["Encrypted"], false, "{fresh}");

    // A wrong passphrase says so beside the listing.
    env.set_passphrase(Some("not the passphrase"));
    let o = env.run(&["snapshot", "list", "--volume", s(&img)]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("wrong passphrase"),
        "{o:?}"
    );

    // With it, everything; the volume's latest snapshot (the plain one)
    // is the next one's parent.
    env.set_passphrase(Some(PASSPHRASE));
    let listed = env.json(&["snapshot", "list", "--volume", s(&img)]);
    assert_eq!(listed["Snapshots"].as_array().unwrap().len(), 2, "{listed}");
    let next = env.snapshot(&img, &[]);
    assert_eq!(next["ParentSnapshotId"], fresh["SnapshotId"], "{next}");
}

#[test]
fn encryption_by_default_encrypts_every_new_snapshot() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let v = env.json(&["region", "encryption"]);
    assert_eq!(v["EbsEncryptionByDefault"], false, "{v}");
    assert_eq!(
        describe(&env, &id(&env.snapshot(&img, &[])))["Encrypted"],
        false
    );
    env.ok(&["key", "create", "--alias", "fleet"]);
    let v = env.json(&[
        "region",
        "encryption",
        "--by-default",
        "on",
        "--kms-key-id",
        "alias/fleet",
    ]);
    assert_eq!(v["EbsEncryptionByDefault"], true, "{v}");
    let fleet = env.json(&["key", "describe", "alias/fleet"])["KeyMetadata"]["Arn"].clone();
    assert_eq!(v["KmsKeyId"], fleet);
    let s = env.snapshot(&img, &[]);
    assert_eq!(s["Encrypted"], true, "{s}");
    assert_eq!(s["KmsKeyId"], fleet);
    env.ok(&["region", "encryption", "--by-default", "off"]);
    let other = env.path("other.img");
    sparse_copy(&img, &other);
    // A copy of the volume finds its parent by its blocks, and an
    // incremental stays under its parent's key; a fresh lineage follows
    // the region's setting.
    let copy = env.snapshot(&other, &[]);
    assert_eq!(copy["ParentSnapshotId"], s["SnapshotId"], "{copy}");
    assert_eq!(copy["Encrypted"], true, "{copy}");
    assert_eq!(env.snapshot(&other, &["--no-parent"])["Encrypted"], false);
    env.fails(&["region", "encryption", "--by-default", "maybe"], 2);
}

#[test]
fn images_record_encryption_and_a_shared_one_needs_its_key_granted() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let ami = encrypted_image(&env, &img);
    let d = env.json(&["image", "describe", &ami]);
    let ebs = &d["Images"][0]["BlockDeviceMappings"][0]["Ebs"];
    assert_eq!(ebs["Encrypted"], true, "{d}");
    let arn = env.json(&["key", "describe", "alias/aws/ebs"])["KeyMetadata"]["Arn"].clone();
    assert_eq!(ebs["KmsKeyId"], arn, "{d}");
    // The image file is a version a blocksnap without encryption refuses.
    let raw: Value =
        serde_json::from_slice(&env.read_stored("local", &format!("images/{ami}.json"))).unwrap();
    assert_eq!(raw["Version"], 2);

    env.ok(&["image", "permissions", &ami, "--add", OTHER]);
    let inst = env.path("inst");
    let launch = ["instance", "launch", &ami, s(&inst), "--account", OTHER];
    let e = env.fails(&launch, 6);
    let key_id = arn.as_str().unwrap().rsplit('/').next().unwrap();
    assert!(e.contains(key_id), "{e}");
    assert!(!inst.join("xvda.img").exists());
    // Copying also needs the snapshot shared (EC2), and then the key.
    let snap = ebs["SnapshotId"].as_str().unwrap().to_string();
    env.ok(&["snapshot", "permissions", &snap, "--add", OTHER]);
    let e = env.fails(
        &[
            "image",
            "copy",
            &ami,
            "--to-region",
            "local",
            "--account",
            OTHER,
        ],
        6,
    );
    assert!(e.contains(key_id), "{e}");
    env.ok(&["key", "grant", key_id, "--grantee", OTHER]);
    let _ = fs::remove_dir_all(&inst);
    env.ok(&launch);
    assert_launched(&img, &inst.join("xvda.img"));
}

fn copies_reencrypt_case(env: &Env) {
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(env, "disk");
    let ami = encrypted_image(env, &img);
    let snap = |region: &str, ami: &str| -> String {
        let d = env.json(&["image", "describe", ami, "--region", region]);
        d["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let src_names = names(env, &snap("local", &ami), &[]);
    // Same region, same key: the chunks are shared.
    let same = env.json(&[
        "image",
        "copy",
        &ami,
        "--to-region",
        "local",
        "--name",
        "same",
    ]);
    assert_eq!(same["ChunksCopied"], 0, "{same}");
    // Same region, another key: sealed again, under new names.
    env.ok(&["key", "create", "--alias", "second"]);
    let rekeyed = env.json(&[
        "image",
        "copy",
        &ami,
        "--to-region",
        "local",
        "--name",
        "rekeyed",
        "--kms-key-id",
        "alias/second",
    ]);
    let rk = rekeyed["ImageId"].as_str().unwrap().to_string();
    let rk_snap = snap("local", &rk);
    assert!(names(env, &rk_snap, &[]).is_disjoint(&src_names));
    let second = env.json(&["key", "describe", "alias/second"])["KeyMetadata"]["Arn"].clone();
    assert_eq!(describe(env, &rk_snap)["KmsKeyId"], second);
    // To another region (keys are regional), asked for no encryption: it
    // stays encrypted, under that region's default key.
    let there = env.json(&["image", "copy", &rk, "--to-region", "eu-west-1"]);
    let there_ami = there["ImageId"].as_str().unwrap().to_string();
    let d = env.json(&["image", "describe", &there_ami, "--region", "eu-west-1"]);
    let ebs = &d["Images"][0]["BlockDeviceMappings"][0]["Ebs"];
    assert_eq!(ebs["Encrypted"], true, "{d}");
    assert!(
        ebs["KmsKeyId"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:kms:eu-west-1:"),
        "{d}"
    );
    // And back, re-encrypted under a key of the first region.
    let back = env.json(&[
        "image",
        "copy",
        &there_ami,
        "--region",
        "eu-west-1",
        "--to-region",
        "local",
        "--name",
        "back",
        "--kms-key-id",
        "alias/second",
    ]);
    let back_ami = back["ImageId"].as_str().unwrap().to_string();
    let inst = env.path("inst");
    env.ok(&["instance", "launch", &back_ami, s(&inst)]);
    assert_launched(&img, &inst.join("xvda.img"));
    for region in ["local", "eu-west-1"] {
        for (key, bytes) in stored_objects(env, region) {
            assert!(!holds(&bytes, MARKER), "marker readable in {region}/{key}");
        }
        let v = env.json(&["store", "verify", "--region", region]);
        assert_eq!(v["Clean"], true, "{v}");
        assert_eq!(v["ChunksUnchecked"], 0, "{v}");
    }
}
on_each_backend!(copies_reencrypt_and_never_decrypt, copies_reencrypt_case);

#[test]
fn copies_reencrypt_from_a_local_region_to_s3_and_back() {
    let Some(env) = Env::with_s3_server() else {
        return;
    };
    env.add_s3_region("eu-west-1");
    copies_reencrypt_case(&env);
}

#[test]
fn restore_verify_delta_gc_and_store_verify_work_on_encrypted_snapshots() {
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let first = id(&env.snapshot(&img, &["--encrypted"]));
    sh_ok(&format!(
        "printf 'second version' | dd of='{}' bs=1 seek=$((33*1024*1024)) conv=notrunc 2>/dev/null",
        img.display()
    ));
    let second = id(&env.snapshot(&img, &[]));
    let changed = env.json(&["snapshot", "changed-blocks", &first, &second]);
    assert_eq!(
        changed["ChangedBlocks"].as_array().unwrap().len(),
        1,
        "{changed}"
    );
    // Sparse, verified, then a delta restore back to the first.
    let out = env.path("out.img");
    env.ok(&["volume", "restore", &second, s(&out)]);
    assert_same(&img, &out);
    assert!(allocated(&out) < 32 * MIB, "not sparse");
    let v = env.json(&["volume", "verify", &second, s(&out)]);
    assert_eq!(v["DifferingBlocks"], 0, "{v}");
    let r = env.json(&["volume", "restore", &first, s(&out), "--delta"]);
    assert_eq!(r["BlocksWritten"], 1, "{r}");
    let v = env.json(&["volume", "verify", &first, s(&out)]);
    assert_eq!(v["DifferingBlocks"], 0, "{v}");
    assert_fsck_clean(&out);

    // Without the passphrase: list shows what EBS shows, gc still works by
    // name, and store verify says what it could not check.
    env.set_passphrase(None);
    let cmd = |args: &[&str]| {
        let mut a = args.to_vec();
        a.push("--json");
        let o = env
            .command(&a)
            .env("BLOCKSNAP_DETACHED", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let list = cmd(&["snapshot", "list"]);
    assert!(
        list["Snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["Encrypted"] == true)
    );
    let v = cmd(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    assert!(v["ChunksUnchecked"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["SnapshotsUnauthenticated"], 2, "{v}");
    env.ok(&["snapshot", "delete", &second]);
    let gc = cmd(&["store", "gc"]);
    assert_eq!(gc["ChunksRemoved"], 1, "{gc}");
    env.set_passphrase(Some(PASSPHRASE));
    let v = env.json(&["store", "verify"]);
    assert_eq!(v["Clean"], true, "{v}");
    assert_eq!(v["ChunksUnchecked"], 0, "{v}");
    assert_eq!(v["SnapshotsUnauthenticated"], 0, "{v}");
    env.ok(&["volume", "restore", &first, s(&out), "--force"]);
    // Damage found by store verify with the key, and only with it.
    let data = env.json(&["snapshot", "blocks", &first])["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .position(|b| b["Checksum"].is_string())
        .unwrap();
    let key = env.damage_chunk(&first, data);
    let o = env.run(&["store", "verify", "--json"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Clean"], false, "{v}");
    assert!(v["CorruptChunks"][0]["ChunkId"].as_str().unwrap().len() == 64);
    assert!(key.contains(v["CorruptChunks"][0]["ChunkId"].as_str().unwrap()));
    // The key id in its trailer was hit: even without the key, the chunk
    // is not sealed under the key its snapshot is under.
    env.set_passphrase(None);
    let o = env
        .command(&["store", "verify", "--json"])
        .env("BLOCKSNAP_DETACHED", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["CorruptChunks"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn an_encrypted_snapshot_mounts_as_a_lazy_volume() {
    if !Path::new("/dev/fuse").exists() {
        skip("no /dev/fuse: FUSE is not available here");
        return;
    }
    let env = Env::new();
    env.set_passphrase(Some(PASSPHRASE));
    let (img, _) = marked_volume(&env, "disk");
    let snap = id(&env.snapshot(&img, &["--encrypted"]));
    let dir = env.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    env.ok(&["volume", "mount", &snap, s(&dir), "--background"]);
    let file = dir.join("volume.img");
    let same = sh(&format!("cmp '{}' '{}'", img.display(), file.display()));
    env.ok(&["volume", "unmount", s(&dir)]);
    assert!(same.status.success(), "{same:?}");
    // A lazy instance of an encrypted image: its snapshot stays encrypted.
    let created = env.json(&[
        "image",
        "create",
        "--name",
        "lazy",
        "--map",
        &format!("/dev/xvda={}", s(&img)),
    ]);
    let ami = created["ImageId"].as_str().unwrap().to_string();
    let inst = env.path("inst");
    env.ok(&["instance", "launch", &ami, s(&inst), "--lazy"]);
    let taken = env.json(&["snapshot", "create", s(&inst.join("xvda.img"))]);
    assert_eq!(taken["Encrypted"], true, "{taken}");
    env.fails(
        &[
            "snapshot",
            "create",
            s(&inst.join("xvda.img")),
            "--kms-key-id",
            "alias/aws/ebs",
        ],
        2,
    );
}
