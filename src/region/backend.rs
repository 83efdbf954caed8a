//! Where a region keeps its files: the [`Backend`] trait, and the local
//! directory that is the default.
//!
//! A backend holds small named objects (`store.json`, `snapshots/<id>`,
//! `images/<ami>.json`, …) beside the region's chunks. Keys are relative,
//! `/`-separated and the same on every backend, so a region's layout is one
//! tree whether it lives in a directory or under an S3 prefix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, IoContext, Location, Result};
use crate::store::chunk_store::ChunkStore;
use crate::store::chunk_store::Fanout;
use crate::store::files::{
    Durability, ctime, for_each_entry, is_temp_name, read_bounded, sync_dir, temp_path_for,
    write_atomic,
};
use crate::store::local::LocalChunkStore;
use crate::sys::{self, LockMode};

/// How long a command waits for a conflicting lock before giving up
/// (`BLOCKSNAP_LOCK_WAIT`, see [`crate::settings`]).
pub(crate) fn lock_wait() -> Duration {
    crate::settings::get().lock_wait
}

/// A region's storage. Implementations are shared by worker threads.
pub trait Backend: Send + Sync {
    /// Where the region lives: a directory path or an `s3://` URL.
    fn location(&self) -> String;
    /// The region's directory, for a local backend.
    fn local_root(&self) -> Option<&Path> {
        None
    }
    /// Where object `key` lives, to name it in messages.
    fn locate(&self, key: &str) -> Location;
    /// Object `key` if it exists and holds at most `limit` bytes (a larger
    /// one is refused as damaged `what`); `Ok(None)` if absent.
    fn read(&self, key: &str, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>>;
    /// The first `len` bytes of `key` (all of it if shorter) and its whole
    /// size; `Ok(None)` if absent.
    fn read_head(&self, key: &str, len: u64) -> Result<Option<(Vec<u8>, u64)>>;
    /// When object `key` was last written, by the store's clock (a file's
    /// ctime, an object's Last-Modified); `Ok(None)` if absent.
    fn changed_at(&self, key: &str) -> Result<Option<SystemTime>>;
    /// Creates `key` durably unless it exists (put-if-absent): `Ok(false)`,
    /// having changed nothing, when it does. Never overwrites.
    fn create(&self, key: &str, data: &[u8]) -> Result<bool>;
    /// Writes `key` durably, atomically replacing any previous content.
    fn replace(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Deletes `key`; `Ok(false)` if it was absent.
    fn remove(&self, key: &str) -> Result<bool>;
    /// Names of the objects directly under `dir` (not recursive).
    fn list(&self, dir: &str) -> Result<Vec<String>>;
    /// The region's chunk store.
    /// The region's chunks, laid out as its store version (`store.json`)
    /// says.
    fn chunk_store(&self, store_version: u32) -> Box<dyn ChunkStore>;
    /// Takes the region lock (see the crate docs), waiting up to
    /// `BLOCKSNAP_LOCK_WAIT` (default 60 s) for a conflicting holder.
    fn lock(&self, mode: LockMode, purpose: &str) -> Result<RegionLock>;
    /// Takes the region's catalog lock, exclusive: held while an image's
    /// state or permissions, a snapshot's permissions, or the set of
    /// images and snapshots is read, checked and changed, so concurrent
    /// changes never lose one another. Independent of the region lock:
    /// whoever holds both holds the region lock shared, and gc (its only
    /// exclusive taker) never takes this one, so they cannot deadlock.
    fn catalog_lock(&self, purpose: &str) -> Result<RegionLock>;
    /// Takes the region's policy lock, exclusive: held by `policy run`
    /// while it does a policy's work, so two runs at once do it once.
    /// Independent of the other two locks, and taken before them.
    fn policy_lock(&self, purpose: &str) -> Result<RegionLock>;
    /// Unreferenced chunks written after this instant may belong to a
    /// snapshot still being written and are kept by gc; `None` when the
    /// region lock alone is proof (a local `flock`). Called under gc's lock.
    fn gc_cutoff(&self, _lock: &RegionLock) -> Result<Option<SystemTime>> {
        Ok(None)
    }
    /// Removes leftovers of interrupted commands outside the chunk store
    /// (stale lock objects); returns how many. Called by gc, under its lock.
    fn remove_leftovers(&self) -> Result<u64> {
        Ok(0)
    }
}

/// A held region lock, released when dropped (or when the process dies).
pub struct RegionLock {
    _guard: Box<dyn Send>,
    /// When the lock was taken, by the store's clock where it has one.
    pub(crate) since: Option<SystemTime>,
}

impl RegionLock {
    pub(crate) fn new(guard: Box<dyn Send>, since: Option<SystemTime>) -> RegionLock {
        RegionLock {
            _guard: guard,
            since,
        }
    }
}

/// A region as a directory:
///
/// ```text
/// <store>/<region>/
///   store.json                    format, version, region name, owner account, created
///   chunks/<first 4 hex>/<64 hex> one chunk (see chunk.rs)
///   snapshots/<snap-id>           snapshot manifest (see manifest.rs)
///   images/<ami>.json, …          image manifests, state, launch permissions
///   lock                          flock: shared for writers and readers, exclusive for gc
/// ```
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: PathBuf) -> LocalBackend {
        LocalBackend { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn locate(&self, key: &str) -> Location {
        self.path(key).into()
    }

    fn read(&self, key: &str, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>> {
        read_bounded(&self.path(key), what, limit)
    }

    fn read_head(&self, key: &str, len: u64) -> Result<Option<(Vec<u8>, u64)>> {
        let path = self.path(key);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("open", &path),
        };
        let size = f.metadata().ctx("stat", &path)?.len();
        let mut head = Vec::with_capacity(len.min(size) as usize);
        f.take(len).read_to_end(&mut head).ctx("read", &path)?;
        Ok(Some((head, size)))
    }

    fn changed_at(&self, key: &str) -> Result<Option<SystemTime>> {
        let path = self.path(key);
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(Some(ctime(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("stat", &path),
        }
    }

    fn create(&self, key: &str, data: &[u8]) -> Result<bool> {
        create_new_durable(&self.path(key), data)
    }

    fn replace(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key);
        ensure_parent(&path)?;
        write_atomic(&path, data, Durability::Now)
    }

    fn remove(&self, key: &str) -> Result<bool> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(path.parent().expect("keys have a parent"))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).ctx("remove", &path),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for_each_entry(&self.path(dir), |p| {
            if let Some(n) = p.file_name().and_then(|n| n.to_str())
                && !is_temp_name(n)
            {
                names.push(n.to_string());
            }
            Ok(())
        })?;
        Ok(names)
    }

    fn chunk_store(&self, store_version: u32) -> Box<dyn ChunkStore> {
        Box::new(LocalChunkStore::new(
            self.root.join("chunks"),
            Fanout::of_local_store(store_version),
        ))
    }

    fn lock(&self, mode: LockMode, purpose: &str) -> Result<RegionLock> {
        // Shared holders leave no note; an exclusive waiter names them so.
        let shared_holders = "snapshot, restore or other commands are using it";
        flock_file(&self.root.join("lock"), mode, purpose, Some(shared_holders))
    }

    fn catalog_lock(&self, purpose: &str) -> Result<RegionLock> {
        flock_file(
            &self.root.join("catalog.lock"),
            LockMode::Exclusive,
            purpose,
            None,
        )
    }

    fn policy_lock(&self, purpose: &str) -> Result<RegionLock> {
        flock_file(
            &self.root.join("policy.lock"),
            LockMode::Exclusive,
            purpose,
            None,
        )
    }
}

/// Takes an `flock(2)` on `path` (created if needed), waiting up to
/// [`lock_wait`] for a conflicting holder, then failing with a note of who
/// holds it. An exclusive holder writes its note into the file; a shared
/// one cannot (several share it), so `shared_holders` names them for an
/// exclusive waiter where shared holders exist.
pub(crate) fn flock_file(
    path: &Path,
    mode: LockMode,
    purpose: &str,
    shared_holders: Option<&str>,
) -> Result<RegionLock> {
    let mut file = open_lock_file(path)?;
    let started = Instant::now();
    while !try_flock(&mut file, path, mode, purpose)? {
        if started.elapsed() >= lock_wait() {
            let holder = match (mode, shared_holders, holder_of(&mut file).as_str()) {
                (LockMode::Exclusive, Some(others), _) => others.to_string(),
                (_, _, "") => "an exclusive holder, such as store gc".to_string(),
                (_, _, h) => h.to_string(),
            };
            return Err(Error::Locked {
                location: path.into(),
                holder,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(RegionLock::new(Box::new(file), None))
}

/// Opens lock file `path`, made if new.
pub(crate) fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx("open lock file", path)
}

/// One try at an `flock(2)` on lock `file` (at `path`): whether it was
/// taken. An exclusive holder writes its note into the file: who it is,
/// for those it keeps out ([`holder_of`]).
pub(crate) fn try_flock(
    file: &mut File,
    path: &Path,
    mode: LockMode,
    purpose: &str,
) -> Result<bool> {
    if !sys::try_lock(file, mode).ctx("lock", path)? {
        return Ok(false);
    }
    if mode == LockMode::Exclusive {
        let note = holder_note(purpose);
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(note.as_bytes());
    }
    Ok(true)
}

/// The note an exclusive holder of lock `file` left (empty if none).
pub(crate) fn holder_of(file: &mut File) -> String {
    let mut holder = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut holder);
    holder.trim().to_string()
}

/// "gc by pid 12 on host since 2026-…": who holds a lock, for the waiting.
pub(crate) fn holder_note(purpose: &str) -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{purpose} by pid {} on {} since {}",
        std::process::id(),
        host.trim(),
        humantime::format_rfc3339_seconds(SystemTime::now())
    )
}

fn ensure_parent(path: &Path) -> Result<()> {
    let dir = path.parent().expect("keys have a parent");
    if !dir.exists() {
        fs::create_dir_all(dir).ctx("create directory", dir)?;
    }
    Ok(())
}

/// Creates `path` with `data` unless it exists, durably: write and fsync a
/// temporary file, then link(2) it to the final name, which never
/// replaces. Of racing creators exactly one wins.
pub(crate) fn create_new_durable(path: &Path, data: &[u8]) -> Result<bool> {
    ensure_parent(path)?;
    let tmp = temp_path_for(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .ctx("create temporary file", &tmp)?;
    let linked = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(path.parent().expect("keys have a parent"))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).ctx("create", path),
    }
}
