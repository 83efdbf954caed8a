//! Fault injection at the storage layer, on a countdown: a chunk store that
//! fails its Nth write (put, sync) or its Nth read, and that separates
//! "written" from "durable" so a simulated crash loses or truncates every
//! chunk put since the last `sync`; and a region backend that fails its Nth
//! write of a catalog object (a snapshot manifest commit, an image file).
//! Every failure point is tried; after each, the store must hold no
//! snapshot or image that names what it lacks, a failed restore must leave
//! no target, and a retry must succeed and restore exactly.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blocksnap::LockMode;
use blocksnap::error::{Error, Location, Result};
use blocksnap::id::ChunkId;
use blocksnap::ops::check;
use blocksnap::ops::restore::{self, RestoreOptions};
use blocksnap::ops::snapshot::{self, CreateOptions, ParentChoice};
use blocksnap::progress::NoProgress;
use blocksnap::region::backend::{Backend, LocalBackend, RegionLock};
use blocksnap::region::catalog::Region;
use blocksnap::store::chunk_store::{ChunkStore, Fanout, StoredChunk};
use blocksnap::store::local::LocalChunkStore;

/// What a simulated power loss takes: chunk files whose names were not yet
/// made durable by any `sync` (a `syncfs`, so shared by all stores).
#[derive(Clone, Default)]
struct Disk(Arc<Mutex<HashSet<ChunkId>>>);

impl Disk {
    /// Power loss: every chunk put since the last sync is lost, either
    /// entirely or (its name durable, its data not) cut to half its length.
    fn crash(&self, root: &Path) {
        let store = LocalChunkStore::new(root.join("chunks"), Fanout::NARROW);
        for (i, id) in self.0.lock().unwrap().drain().enumerate() {
            let path = store.path_of(&id);
            if i % 2 == 0 {
                let _ = fs::remove_file(path);
            } else if let Ok(bytes) = fs::read(&path) {
                fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            }
        }
    }
}

struct FaultyStore {
    inner: LocalChunkStore,
    ops: AtomicU64,
    /// The operation (counting puts and syncs from 1) that fails; 0: none.
    fail_at: u64,
    reads: AtomicU64,
    /// The read (counting gets from 1) that fails; 0: none.
    fail_read_at: u64,
    disk: Disk,
}

impl FaultyStore {
    fn new(region: &Region, fail_at: u64, disk: &Disk) -> Box<Self> {
        Box::new(FaultyStore {
            inner: LocalChunkStore::new(
                region
                    .backend()
                    .local_root()
                    .expect("a local region")
                    .join("chunks"),
                Fanout::of_local_store(region.info().version),
            ),
            ops: AtomicU64::new(0),
            fail_at,
            reads: AtomicU64::new(0),
            fail_read_at: 0,
            disk: disk.clone(),
        })
    }

    /// A store whose `fail_read_at`th read fails (0: none), writes never.
    fn failing_reads(region: &Region, fail_read_at: u64) -> Box<Self> {
        Box::new(FaultyStore {
            fail_read_at,
            ..*FaultyStore::new(region, 0, &Disk::default())
        })
    }

    fn tick_read(&self, id: &ChunkId) -> Result<()> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_read_at {
            return Err(Error::Io {
                op: "read (injected fault)",
                path: self.inner.path_of(id),
                source: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }

    fn tick(&self) -> Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at {
            return Err(Error::Io {
                op: "write (injected fault)",
                path: self.inner.root().to_path_buf(),
                source: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }
}

impl ChunkStore for FaultyStore {
    fn has(&self, id: &ChunkId) -> Result<bool> {
        self.inner.has(id)
    }
    fn changed_at(&self, id: &ChunkId) -> Result<Option<std::time::SystemTime>> {
        self.inner.changed_at(id)
    }
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        self.tick()?;
        let wrote = self.inner.put(id, data)?;
        if wrote {
            self.disk.0.lock().unwrap().insert(*id);
        }
        Ok(wrote)
    }
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.tick_read(id)?;
        self.inner.get(id)
    }
    fn list(&self) -> Result<Vec<ChunkId>> {
        self.inner.list()
    }
    fn remove(&self, id: &ChunkId) -> Result<()> {
        self.inner.remove(id)
    }
    fn sync(&self) -> Result<()> {
        self.tick()?;
        self.inner.sync()?;
        self.disk.0.lock().unwrap().clear();
        Ok(())
    }
    fn size(&self, id: &ChunkId) -> Result<u64> {
        self.inner.size(id)
    }
    fn quarantine(&self, id: &ChunkId) -> Result<()> {
        self.inner.quarantine(id)
    }
    fn quarantined(&self) -> Result<Vec<StoredChunk>> {
        self.inner.quarantined()
    }
    fn purge_quarantined(&self) -> Result<u64> {
        self.inner.purge_quarantined()
    }
}

fn open(store_root: &Path) -> Region {
    Region::open_or_create(store_root, "local").unwrap()
}

/// Every manifest names only chunks that exist and verify.
fn assert_consistent(store_root: &Path, context: &str) {
    let report = check::verify(&open(store_root), None, 2, &NoProgress).unwrap();
    assert!(report.is_clean(), "{context}: {report:?}");
}

fn assert_restores(region: &Region, meta: &blocksnap::SnapshotMeta, source: &Path, dir: &Path) {
    let out = dir.join(format!("{}.img", meta.id));
    restore::restore(
        region,
        &meta.id,
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(&out).unwrap(), fs::read(source).unwrap());
    fs::remove_file(out).unwrap();
}

/// 2 MiB in 64 KiB blocks: text, random, zeros and a hole.
fn volume(dir: &Path, seed: u8) -> std::path::PathBuf {
    let path = dir.join(format!("v{seed}.img"));
    let f = fs::File::create(&path).unwrap();
    f.set_len(2 << 20).unwrap();
    let text: Vec<u8> = (0..600_000u32)
        .map(|i| b"log line "[i as usize % 9] ^ (i / 4096) as u8)
        .collect();
    f.write_all_at(&text, 0).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
    let random: Vec<u8> = (0..400_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    f.write_all_at(&random, 700_000).unwrap();
    f.write_all_at(&vec![0u8; 200_000], 1_200_000).unwrap();
    path
}

fn options() -> CreateOptions {
    CreateOptions {
        parent: ParentChoice::Latest,
        block_size: Some(64 << 10),
        threads: 2,
        ..Default::default()
    }
}

/// Store operations (puts and syncs) one snapshot of `vol` into an empty
/// store takes.
fn operations(vol: &Path) -> u64 {
    let scratch = tempfile::tempdir().unwrap();
    let region = open(scratch.path());
    let disk = Disk::default();
    let region = region.with_chunk_store(FaultyStore::new(&open(scratch.path()), 0, &disk));
    snapshot::create(&region, vol, &options(), &NoProgress).unwrap();
    region.chunks().list().unwrap().len() as u64 + 1
}

#[test]
fn every_failure_point_of_a_snapshot_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let store_root = dir.path().join("store");
    let v1 = volume(dir.path(), 1);
    let v2 = volume(dir.path(), 2);
    let total = operations(&v1).max(operations(&v2));
    assert!(total > 10, "too few operations to be interesting: {total}");

    let disk = Disk::default();
    for vol in [&v1, &v2] {
        for fail_at in 1..=total + 1 {
            let plain = open(&store_root);
            let before = plain.snapshot_ids().unwrap();
            let region =
                plain.with_chunk_store(FaultyStore::new(&open(&store_root), fail_at, &disk));
            let result = snapshot::create(&region, vol, &options(), &NoProgress);
            let after = region.snapshot_ids().unwrap();
            match &result {
                Err(_) => assert_eq!(
                    after, before,
                    "a failed snapshot left a manifest (fault at op {fail_at})"
                ),
                Ok(meta) => assert!(after.contains(&meta.id)),
            }
            assert_consistent(&store_root, &format!("fault at op {fail_at}"));
        }
    }
    // Retrying with a healthy store works and restores exactly.
    let region = open(&store_root);
    for vol in [&v1, &v2] {
        let meta = snapshot::create(&region, vol, &options(), &NoProgress).unwrap();
        assert_restores(&region, &meta, vol, dir.path());
    }
}

#[test]
fn power_loss_after_any_fault_never_breaks_a_committed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = volume(dir.path(), 3);
    let total = operations(&v1);
    for fail_at in 1..=total + 1 {
        for retry_first in [false, true] {
            let store_root = dir.path().join(format!("store-{fail_at}-{retry_first}"));
            let disk = Disk::default();
            // A snapshot fails part-way, leaving chunks written but not durable...
            let region = open(&store_root).with_chunk_store(FaultyStore::new(
                &open(&store_root),
                fail_at,
                &disk,
            ));
            let first = snapshot::create(&region, &v1, &options(), &NoProgress);
            // ...optionally a second one deduplicates against them and commits...
            let second = retry_first.then(|| {
                let region = open(&store_root).with_chunk_store(FaultyStore::new(
                    &open(&store_root),
                    0,
                    &disk,
                ));
                snapshot::create(&region, &v1, &options(), &NoProgress).unwrap()
            });
            // ...then the power fails.
            disk.crash(open(&store_root).backend().local_root().unwrap());
            let context = format!("fault at op {fail_at}, retry first: {retry_first}");
            assert_consistent(&store_root, &context);
            let region = open(&store_root);
            for meta in first.iter().chain(second.iter()) {
                assert_restores(&region, meta, &v1, dir.path());
            }
            // And a snapshot after the crash repairs what was lost.
            let meta = snapshot::create(&region, &v1, &options(), &NoProgress).unwrap();
            assert_restores(&region, &meta, &v1, dir.path());
            assert_consistent(&store_root, &context);
        }
    }
}

/// Truncates the volume once a given number of bytes has been read.
struct Shrinker<'a> {
    path: &'a Path,
    after: u64,
    seen: AtomicU64,
}

impl blocksnap::progress::Progress for Shrinker<'_> {
    fn advance(&self, bytes: u64) {
        let before = self.seen.fetch_add(bytes, Ordering::SeqCst);
        if before < self.after && before + bytes >= self.after {
            fs::OpenOptions::new()
                .write(true)
                .open(self.path)
                .unwrap()
                .set_len(self.after)
                .unwrap();
        }
    }
}

#[test]
fn a_volume_that_shrinks_while_read_is_a_clear_error_and_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store_root = dir.path().join("store");
    let vol = dir.path().join("shrinking.img");
    let mut x = 1u64;
    let data: Vec<u8> = (0..(64u64 << 20))
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    fs::write(&vol, &data).unwrap();
    let region = open(&store_root);
    let shrink = Shrinker {
        path: &vol,
        after: 8 << 20,
        seen: AtomicU64::new(0),
    };
    let opts = CreateOptions {
        threads: 1,
        ..options()
    };
    let err = snapshot::create(&region, &vol, &opts, &shrink).unwrap_err();
    assert!(matches!(err, Error::VolumeShrank { .. }), "{err}");
    assert!(err.to_string().contains("shrank"), "{err}");
    assert!(region.snapshot_ids().unwrap().is_empty());
    assert_consistent(&store_root, "after a shrinking volume");
}

/// A local region's backend whose `fail_at`th write of a catalog object
/// (create or replace: a snapshot manifest, an image file, permissions)
/// fails; 0: none.
struct FaultyBackend {
    inner: LocalBackend,
    writes: AtomicU64,
    fail_at: u64,
}

impl FaultyBackend {
    fn tick(&self, key: &str) -> Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at {
            return Err(Error::Io {
                op: "commit (injected fault)",
                path: self.inner.local_root().unwrap().join(key),
                source: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }
}

impl Backend for FaultyBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn local_root(&self) -> Option<&Path> {
        self.inner.local_root()
    }
    fn locate(&self, key: &str) -> Location {
        self.inner.locate(key)
    }
    fn read(&self, key: &str, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.inner.read(key, what, limit)
    }
    fn read_head(&self, key: &str, len: u64) -> Result<Option<(Vec<u8>, u64)>> {
        self.inner.read_head(key, len)
    }
    fn changed_at(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        self.inner.changed_at(key)
    }
    fn create(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.tick(key)?;
        self.inner.create(key, data)
    }
    fn replace(&self, key: &str, data: &[u8]) -> Result<()> {
        self.tick(key)?;
        self.inner.replace(key, data)
    }
    fn remove(&self, key: &str) -> Result<bool> {
        self.inner.remove(key)
    }
    fn list(&self, dir: &str) -> Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn chunk_store(&self, store_version: u32) -> Box<dyn ChunkStore> {
        self.inner.chunk_store(store_version)
    }
    fn lock(&self, mode: LockMode, purpose: &str) -> Result<RegionLock> {
        self.inner.lock(mode, purpose)
    }
    fn catalog_lock(&self, purpose: &str) -> Result<RegionLock> {
        self.inner.catalog_lock(purpose)
    }

    fn policy_lock(&self, purpose: &str) -> Result<RegionLock> {
        self.inner.policy_lock(purpose)
    }
}

/// The default region of `store_root` over a [`FaultyBackend`].
fn open_faulty(store_root: &Path, fail_at: u64) -> Region {
    let backend = FaultyBackend {
        inner: LocalBackend::new(store_root.join("local")),
        writes: AtomicU64::new(0),
        fail_at,
    };
    Region::open_backend(Box::new(backend), store_root, "local").unwrap()
}

#[test]
fn every_failure_point_of_a_restore_leaves_no_target_and_a_retry_works() {
    let dir = tempfile::tempdir().unwrap();
    let store_root = dir.path().join("store");
    let v1 = volume(dir.path(), 4);
    let v2 = volume(dir.path(), 5);
    let region = open(&store_root);
    snapshot::create(&region, &v1, &options(), &NoProgress).unwrap();
    // An incremental: its blocks are deltas whose bases are read too.
    let meta = snapshot::create(&region, &v2, &options(), &NoProgress).unwrap();
    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    let target = out.join("volume.img");
    let mut failed = 0;
    for fail_read_at in 1.. {
        let region = open(&store_root)
            .with_chunk_store(FaultyStore::failing_reads(&open(&store_root), fail_read_at));
        let opts = RestoreOptions {
            threads: 2,
            ..RestoreOptions::default()
        };
        match restore::restore(&region, &meta.id, &target, &opts, &NoProgress) {
            Err(e) => {
                failed += 1;
                assert!(
                    e.to_string().contains("injected"),
                    "read {fail_read_at}: {e}"
                );
                let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
                assert!(left.is_empty(), "read {fail_read_at} left {left:?}");
            }
            Ok(_) => {
                assert_eq!(fs::read(&target).unwrap(), fs::read(&v2).unwrap());
                break;
            }
        }
    }
    assert!(failed > 10, "too few reads to be interesting: {failed}");
}

#[test]
fn every_failed_manifest_or_image_commit_leaves_no_trace_and_a_retry_works() {
    use blocksnap::image::create::{ImageCreateOptions, MapSource, MapSpec, create_from_volumes};
    let dir = tempfile::tempdir().unwrap();
    let store_root = dir.path().join("store");
    let v1 = volume(dir.path(), 6);
    let v2 = volume(dir.path(), 7);
    let owner = open(&store_root).info().owner.clone();
    let maps = [("/dev/xvda", &v1), ("/dev/xvdb", &v2)].map(|(dev, v)| MapSpec {
        device: dev.parse().unwrap(),
        source: MapSource::Volume(v.to_path_buf()),
    });
    let opts = |name: &str| ImageCreateOptions::new(name, owner.clone());
    let mut failed = 0;
    for fail_at in 1.. {
        let region = open_faulty(&store_root, fail_at);
        let before = region.list_snapshots().unwrap().snapshots.len();
        let images = || {
            blocksnap::region::images::list(&open(&store_root))
                .unwrap()
                .images
        };
        let images_before = images().len();
        let name = format!("image-{fail_at}");
        match create_from_volumes(&region, &maps, &opts(&name), &NoProgress) {
            Err(e) => {
                failed += 1;
                assert!(e.to_string().contains("injected"), "write {fail_at}: {e}");
                assert_eq!(
                    images().len(),
                    images_before,
                    "write {fail_at} left an image"
                );
                // The snapshots it took are deleted again.
                let after = region.list_snapshots().unwrap().snapshots.len();
                assert_eq!(after, before, "write {fail_at} left snapshots");
                assert_consistent(&store_root, &format!("write {fail_at}"));
            }
            Ok(report) => {
                assert_eq!(images().len(), images_before + 1);
                let region = open(&store_root);
                for s in &report.snapshots {
                    let source = if s.device.as_str() == "/dev/xvda" {
                        &v1
                    } else {
                        &v2
                    };
                    assert_restores(&region, &s.snapshot, source, dir.path());
                }
                break;
            }
        }
    }
    assert!(
        failed >= 3,
        "a snapshot pair and an image are at least three commits: {failed}"
    );
    assert_consistent(&store_root, "after the retry");
}
