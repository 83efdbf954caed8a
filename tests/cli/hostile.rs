//! Hostile input: every decoder of bytes from disk replays the fuzz corpus
//! (`testdata/fuzz/<target>/`, seeds plus any crash ever found) and a set
//! of mutations of each seed, and must return a value or a typed error,
//! never panic.

use std::path::{Path, PathBuf};

use blocksnap::error::Location;
use blocksnap::format::{chunk, image, instance, region};
use blocksnap::{ChunkId, Manifest};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/fuzz");

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(CORPUS).join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect()
}

/// The input itself, every truncation at a few lengths, and single-byte
/// changes spread over it (each byte set to 0x00, 0xff and flipped).
fn mutations(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![seed.to_vec(), Vec::new()];
    let step = (seed.len() / 64).max(1);
    for cut in (0..seed.len()).step_by(step) {
        out.push(seed[..cut].to_vec());
    }
    for pos in (0..seed.len()).step_by(step) {
        for v in [0x00, 0xff, seed[pos] ^ 0x55] {
            let mut m = seed.to_vec();
            m[pos] = v;
            out.push(m);
        }
    }
    // Lengths near the header fields set huge.
    for pos in (0..seed.len().min(32)).step_by(4) {
        let mut m = seed.to_vec();
        for b in &mut m[pos..(pos + 4).min(seed.len())] {
            *b = 0xff;
        }
        out.push(m);
    }
    out
}

fn replay(target: &str, decode: impl Fn(&[u8])) {
    for (path, seed) in corpus(target) {
        for input in mutations(&seed) {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(&input)));
            assert!(
                r.is_ok(),
                "{target}: decoder panicked on a mutation of {}",
                path.display()
            );
        }
    }
}

/// The corpus's page delta (`page-delta-6c07…`): its base (100,000 bytes,
/// the last page short) and the block it decodes to.
fn page_delta_case() -> (Vec<u8>, Vec<u8>) {
    let base: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut raw = base.clone();
    raw[5] ^= 0xff;
    raw[4096 * 7 + 100..4096 * 7 + 3000].fill(0xaa);
    raw[99_999] ^= 1;
    (base, raw)
}

#[test]
fn chunk_decoder_survives_the_corpus() {
    let plain = blocksnap::id::Namer::Plain;
    let (base, raw) = page_delta_case();
    let id = ChunkId::of(&raw);
    let seed = std::fs::read(Path::new(CORPUS).join("chunk/page-delta-6c07fc0cbbfe")).unwrap();
    // The seed is a sound page delta over its base, so mutations reach the
    // page decoder, not only the header checks.
    let mut out = Vec::new();
    chunk::decode_delta(&id, &seed, &base, &mut out, &plain).unwrap();
    assert_eq!(out, raw);
    replay("chunk", |b| {
        let _ = chunk::decode(&ChunkId::of(b), b);
        let _ = chunk::decode(&ChunkId([7; 32]), b);
        let _ = chunk::base_of(b);
        let mut out = Vec::new();
        let _ = chunk::decode_delta(&id, b, &base, &mut out, &plain);
        let _ = chunk::decode_delta(&id, b, &base[..4096], &mut out, &plain);
    });
}

#[test]
fn snapshot_manifest_decoder_survives_the_corpus() {
    let p = &Location::from(Path::new("corpus"));
    replay("snapshot_manifest", |b| {
        let _ = Manifest::decode(b, p);
        if let Some(n) = Manifest::meta_prefix_len(b) {
            let _ = Manifest::decode_meta(&b[..n.min(b.len())], p, b.len() as u64, None);
        }
    });
}

#[test]
fn image_decoders_survive_the_corpus() {
    let p = &Location::from(Path::new("corpus"));
    replay("image_manifest", |b| {
        let _ = image::decode_image(b, p);
        let _ = image::decode_permissions(b, p);
        let _ = image::decode_state(b, p);
        let _ = image::decode_snapshot_permissions(b, p);
    });
}

#[test]
fn store_and_instance_json_decoders_survive_the_corpus() {
    let p = &Location::from(Path::new("corpus"));
    replay("store_json", |b| {
        let _ = region::decode_region_info(b, p, "local");
    });
    replay("instance_json", |b| {
        let _ = instance::decode(b, p);
    });
}

#[test]
fn seeds_decode_cleanly() {
    // The seeds are real files: they must decode, or the corpus is stale.
    let p = &Location::from(Path::new("seed"));
    for (path, b) in corpus("snapshot_manifest") {
        Manifest::decode(&b, p).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for (path, b) in corpus("store_json") {
        region::decode_region_info(&b, p, "local")
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for (path, b) in corpus("instance_json") {
        instance::decode(&b, p).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let images = corpus("image_manifest");
    assert!(images.iter().any(|(path, b)| {
        path.to_string_lossy().ends_with(".permissions.json")
            && image::decode_snapshot_permissions(b, p).is_ok()
    }));
    assert!(images.iter().any(|(path, b)| {
        path.to_string_lossy().ends_with(".launch.json") && image::decode_permissions(b, p).is_ok()
    }));
    assert!(
        images
            .iter()
            .any(|(_, b)| image::decode_image(b, p).is_ok())
    );
}

/// The dirty map's header and the NBD request decoder: the released
/// fixture and a request, and every mutation of them.
#[test]
fn dirty_map_and_nbd_request_decoders_survive_mutations() {
    use blocksnap::format::dirty_map::{DirtyHeader, MapKind};
    use blocksnap::format::nbd::{REQUEST_LEN, Reader, Request};
    let fixture = Path::new(CORPUS).join("../v1-all-formats/overlay.img.dirty");
    let seed = std::fs::read(&fixture).unwrap();
    let p = &Location::from(fixture.as_path());
    for input in mutations(&seed) {
        let r = std::panic::catch_unwind(|| {
            DirtyHeader::decode(MapKind::Dirty, &input, p).map(|h| h.file_len())
        });
        assert!(r.is_ok(), "the dirty map decoder panicked");
    }
    let request = Request {
        flags: 0,
        kind: 0,
        cookie: 1,
        offset: 4096,
        length: 512,
    }
    .encode();
    for input in mutations(&request) {
        let r = std::panic::catch_unwind(|| {
            if let Ok(b) = <&[u8; REQUEST_LEN]>::try_from(&input[..]) {
                let _ = Request::decode(b);
            }
            let mut r = Reader::new(&input);
            let _ = (r.string(), r.u32(), r.u16(), r.is_empty());
        });
        assert!(r.is_ok(), "the NBD decoders panicked");
    }
}

/// The lazy volumes' other inputs: the present map's header, a lease (read
/// from a shared region), and a control request (read from a socket).
#[test]
fn present_map_lease_and_control_decoders_survive_mutations() {
    use blocksnap::format::control::Request;
    use blocksnap::format::dirty_map::{DirtyHeader, MapKind};
    use blocksnap::format::lease;
    let dir = Path::new(CORPUS).join("../v1-all-formats");
    let p = &Location::from(dir.as_path());
    let present = std::fs::read(dir.join("overlay.img.present")).unwrap();
    for input in mutations(&present) {
        let r =
            std::panic::catch_unwind(|| DirtyHeader::decode(MapKind::Present, &input, p).is_ok());
        assert!(r.is_ok(), "the present map decoder panicked");
    }
    let lease_json = std::fs::read(dir.join("lease.json")).unwrap();
    for input in mutations(&lease_json) {
        let r = std::panic::catch_unwind(|| lease::decode(&input, p).is_ok());
        assert!(r.is_ok(), "the lease decoder panicked");
    }
    let request = br#"{"Version":1,"Op":"Snapshot","Devices":["/dev/xvda"],"Description":"d","Tags":[{"Key":"k","Value":"v"}],"Owner":null,"Threads":0,"NoDelta":false}"#;
    assert!(serde_json::from_slice::<Request>(request).is_ok());
    for input in mutations(request) {
        let r = std::panic::catch_unwind(|| serde_json::from_slice::<Request>(&input).is_ok());
        assert!(r.is_ok(), "the control request decoder panicked");
    }
}

#[test]
fn nbd_reply_parser_survives_the_corpus() {
    replay("nbd_reply", |b| {
        let _ = blocksnap::volume::nbd::parse_replies(b);
    });
}

#[test]
fn server_request_parsing_survives_the_corpus() {
    replay("sigv4_request", |b| {
        let _ = blocksnap::server::examine_untrusted(b);
    });
    // The seed of AWS's get-vanilla test holds a good signature; its
    // mutations (every byte flipped, every cut) must not.
    let seed = std::fs::read(format!("{CORPUS}/sigv4_request/get-vanilla")).unwrap();
    assert!(blocksnap::server::examine_untrusted(&seed));
    let signed = seed.len() - 2;
    for i in 0..signed {
        let mut bad = seed.clone();
        bad[i] ^= 0x01;
        assert!(
            !blocksnap::server::examine_untrusted(&bad),
            "byte {i} of the signed request changed and the signature still held"
        );
    }
}

/// The fixture key of `testdata/v2-encrypted` (alias/fixture), unwrapped
/// once with its passphrase.
fn fixture_key() -> std::sync::Arc<blocksnap::format::key::DataKey> {
    use blocksnap::format::key;
    let dir = Path::new(CORPUS).join("../v2-encrypted/store/keys");
    let path = dir.join("218d56d9-d151-4b03-8b74-55f0ef9456d2.json");
    let at = Location::from(path.as_path());
    let record = key::decode_record(&std::fs::read(&path).unwrap(), &at).unwrap();
    let wrapped = record.wrapped.as_ref().unwrap();
    let material = key::unwrap(
        wrapped,
        &record.key_id,
        b"blocksnap fixture passphrase",
        &at,
    )
    .unwrap()
    .expect("the fixture's passphrase");
    std::sync::Arc::new(key::DataKey::new(record.key_id, &material))
}

#[test]
fn sealed_chunk_and_manifest_decoders_survive_the_corpus() {
    let key = fixture_key();
    let namer = key.namer();
    // Seeds are named as in the fixture store: the name is the file's.
    let named = |path: &Path| -> ChunkId {
        let dir = Path::new(CORPUS).join("../v2-encrypted/store/chunks");
        let b = std::fs::read(path).unwrap();
        walk(&dir)
            .into_iter()
            .find(|p| std::fs::read(p).unwrap() == b)
            .and_then(|p| p.file_name()?.to_str()?.parse().ok())
            .unwrap_or(ChunkId([0; 32]))
    };
    for (path, seed) in corpus("sealed_chunk") {
        let id = named(&path);
        let opened = chunk::unseal(&key, &id, seed.clone())
            .unwrap_or_else(|e| panic!("seed {}: {e}", path.display()));
        if chunk::base_of(&opened).is_none() {
            chunk::decode_into(&id, &opened, &mut Vec::new(), &namer).unwrap();
        }
        assert_eq!(chunk::sealed_key_of(&seed), Some(key.id));
    }
    replay("sealed_chunk", |b| {
        let id = ChunkId([3; 32]);
        let _ = chunk::sealed_key_of(b);
        let _ = chunk::base_of(b);
        if let Ok(plain) = chunk::unseal(&key, &id, b.to_vec()) {
            let _ = chunk::decode_into(&id, &plain, &mut Vec::new(), &namer);
        }
        let _ = chunk::decode(&id, b);
    });
    let p = &Location::from(Path::new("corpus"));
    let k = key.clone();
    let key_for = move |_: &blocksnap::id::KeyId| Ok(k.clone());
    let mut versions = std::collections::BTreeSet::new();
    for (path, seed) in corpus("sealed_manifest") {
        let m = Manifest::decode_with(&seed, p, &key_for)
            .unwrap_or_else(|e| panic!("seed {}: {e}", path.display()));
        let n = Manifest::meta_prefix_len(&seed).unwrap();
        let bare = Manifest::decode_meta(&seed[..n], p, seed.len() as u64, None).unwrap();
        assert_eq!((bare.id, bare.kms_key_id), (m.meta.id, Some(key.id)));
        versions.insert(seed[8]);
    }
    // Both encrypted manifest versions: meta readable (2) and sealed (3).
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), [2, 3]);
    replay("sealed_manifest", |b| {
        let _ = Manifest::decode_with(b, p, &key_for);
        let _ = Manifest::chunk_names(b, p);
        let _ = Manifest::sealed_header(b);
        if let Some(n) = Manifest::meta_prefix_len(b) {
            let head = &b[..n.min(b.len())];
            let _ = Manifest::decode_meta(head, p, b.len() as u64, None);
            let _ = Manifest::decode_meta(head, p, b.len() as u64, Some(&key));
        }
    });
}

#[test]
fn key_file_decoders_survive_the_corpus() {
    use blocksnap::format::key;
    let p = &Location::from(Path::new("corpus"));
    let seeds = corpus("key_file");
    assert!(seeds.iter().any(|(_, b)| key::decode_record(b, p).is_ok()));
    assert!(
        seeds
            .iter()
            .any(|(_, b)| key::decode_key_file(b, p).is_ok())
    );
    assert!(
        seeds
            .iter()
            .any(|(_, b)| key::decode_defaults(b, p).is_ok())
    );
    replay("key_file", |b| {
        if let Ok(r) = key::decode_record(b, p)
            && let Some(w) = &r.wrapped
        {
            // Bounded: a hostile file cannot ask for gigabytes or hours.
            let mut cheap = w.clone();
            cheap.memory_kib = cheap.memory_kib.min(64);
            cheap.iterations = cheap.iterations.min(1);
            let _ = key::unwrap(&cheap, &r.key_id, b"x", p);
        }
        let _ = key::decode_key_file(b, p);
        let _ = key::decode_defaults(b, p);
    });
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The lifecycle's records (read from a shared region): every file of the
/// released fixture, and its mutations.
#[test]
fn lifecycle_record_decoders_survive_mutations() {
    use blocksnap::format::lifecycle::{
        decode_bin_entry, decode_policy, decode_policy_state, decode_rule,
    };
    let dir = Path::new(CORPUS).join("../v4-lifecycle/store");
    let p = &Location::from(dir.as_path());
    let files = [
        ("policies/policy-9fe627ac135222dce.json", 0),
        ("policies/policy-9fe627ac135222dce.state.json", 1),
        ("recycle-bin/rules/rule-3d52ff2e123a7cf4d.json", 2),
        ("recycle-bin/snapshots/snap-a0ec66861b46eff92.json", 3),
        ("recycle-bin/images/ami-7b1b5d8ee611dec8b.json", 3),
    ];
    for (name, kind) in files {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let decode = |b: &[u8]| match kind {
            0 => decode_policy(b, p).is_ok(),
            1 => decode_policy_state(b, p).is_ok(),
            2 => decode_rule(b, p).is_ok(),
            _ => decode_bin_entry(b, p).is_ok(),
        };
        assert!(decode(&bytes), "{name} decodes");
        for input in mutations(&bytes) {
            let r = std::panic::catch_unwind(|| decode(&input));
            assert!(r.is_ok(), "the decoder of {name} panicked");
        }
        // Another kind's record is refused by name, never taken for this one.
        let other = std::fs::read(dir.join(files[(kind + 1) % 4].0)).unwrap();
        assert!(!decode(&other), "{name}: another format accepted");
    }
}
