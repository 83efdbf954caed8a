//! Regions on an S3-compatible object store (AWS S3, SeaweedFS, Ceph
//! radosgw, MinIO), through the `object_store` crate.
//!
//! The layout under the region's `s3://BUCKET/PREFIX` is the local one:
//! `store.json`, `chunks/<4 hex>/<64 hex>`, `snapshots/<snap-id>`,
//! `images/…`, plus `locks/` for the lock protocol below.
//!
//! # Writes
//!
//! A chunk is one PUT, atomic on every S3 store: it is either wholly there
//! or absent, so a chunk found in the store is trusted without reading it
//! back. Chunk uploads run on a small async runtime, up to
//! `BLOCKSNAP_S3_INFLIGHT` (default 32, see [`crate::settings`]) at once, while
//! the pipeline goes on hashing; `sync` waits for all of them and reports
//! the first failure. Manifests, image manifests and `store.json` are
//! created with `If-None-Match: *` (put-if-absent) and never overwritten,
//! after every chunk they name is stored: an interrupted command leaves no
//! visible snapshot, only unreferenced chunks that gc reclaims. Image state
//! and launch permissions are replaced whole by one PUT.
//!
//! Whether a chunk exists is answered from the parent manifest first (the
//! pipeline never asks about unchanged blocks), then by HEAD for the first
//! [`HEAD_BUDGET`] questions of a command, then from one listing of
//! `chunks/` held in memory, so an incremental snapshot costs a handful
//! of requests beyond its uploads.
//!
//! # Locks without file locks
//!
//! A command takes the region lock by creating
//! `locks/{shared,exclusive}-<random>` holding its purpose, pid and host,
//! then listing `locks/`. A lock counts while its object was written less than
//! `BLOCKSNAP_S3_LOCK_STALE` (default 300 s) before the newest one, by the
//! store's own timestamps (so hosts' clocks do not matter); a holder
//! rewrites its object every fifth of that period. A shared taker
//! conflicts with any other live lock that is not shared (an object there
//! that is no lock counts as exclusive), an exclusive taker with any other
//! live lock. On conflict the taker deletes its object, waits a
//! random moment and tries again, up to `BLOCKSNAP_LOCK_WAIT`. Because S3
//! is strongly consistent (read-after-write, list-after-write), of two
//! takers the later one to create its object always sees the earlier:
//! a writer and gc can never both proceed.
//!
//! gc therefore runs alone; on top of that it keeps every unreferenced
//! chunk written within a grace period before its lock
//! (`BLOCKSNAP_S3_GC_GRACE`, default the stale period), so a writer whose
//! lock lapsed (a paused process) does not lose the chunks it uploaded.
//! gc also deletes lock objects that went stale (their holders died).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, RegionLock, holder_note, lock_wait};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::id::{ChunkId, random_id};
use crate::regions::{RegionDef, S3Url};
use crate::store::{ChunkStore, StoredChunk};
use crate::sys::LockMode;

/// Existence questions answered by HEAD before listing every chunk once.
pub const HEAD_BUDGET: usize = 256;

/// Age at which a lock object belongs to a dead process (settings).
fn lock_stale() -> Duration {
    crate::settings::get().s3_lock_stale
}

/// Requests sent, by kind; printed at exit with `BLOCKSNAP_S3_TRACE=1`.
#[derive(Default)]
struct Requests {
    get: AtomicU64,
    head: AtomicU64,
    put: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

impl Requests {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The connection shared by a region's backend and chunk store.
struct S3 {
    requests: Arc<Requests>,
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
    url: String,
    prefix: String,
    endpoint: String,
    inflight: usize,
}

impl Drop for S3 {
    fn drop(&mut self) {
        if crate::settings::get().s3_trace {
            let r = &self.requests;
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            eprintln!(
                "blocksnap: requests to {}: {} GET, {} HEAD, {} PUT, {} listings, {} DELETE",
                self.url,
                n(&r.get),
                n(&r.head),
                n(&r.put),
                n(&r.list),
                n(&r.delete)
            );
        }
    }
}

impl S3 {
    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.handle().block_on(f)
    }

    /// An object-store error as [`Error`]: what was done, on which object,
    /// why, and what to check.
    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        remote_error(op, self.url_of(key), &self.endpoint, e)
    }

    fn list_meta(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.path(dir);
        Requests::add(&self.requests.list);
        self.block_on(self.store.list(Some(&prefix)).try_collect::<Vec<_>>())
            .map_err(|e| self.error("list", dir, e))
    }

    /// `key`'s name relative to the region (`chunks/ab12/…`).
    fn key_of<'a>(&self, meta: &'a ObjectMeta) -> &'a str {
        let full = meta.location.as_ref();
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(self.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<bool> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let payload = PutPayload::from(data.to_vec());
        Requests::add(&self.requests.put);
        match self.block_on(self.store.put_opts(&self.path(key), payload, opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.error("write", key, e)),
        }
    }

    fn get_range(&self, key: &str, len: u64) -> Result<Option<(Vec<u8>, u64)>> {
        let path = self.path(key);
        let result = self.block_on(async {
            if len == 0 {
                Requests::add(&self.requests.head);
                let meta = self.store.head(&path).await?;
                return Ok((Vec::new(), meta.size));
            }
            let opts = GetOptions {
                range: Some(GetRange::Bounded(0..len)),
                ..Default::default()
            };
            Requests::add(&self.requests.get);
            let got = self.store.get_opts(&path, opts).await?;
            let size = got.meta.size;
            Ok((got.bytes().await?.to_vec(), size))
        });
        match result {
            Ok(r) => Ok(Some(r)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(self.error("read", key, e)),
        }
    }
}

/// Whether `e` says that an object is absent (and not its bucket).
fn absent(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && !e.to_string().contains("NoSuchBucket")
}

/// An error's text on one line, with an S3 error document reduced to its
/// code and message.
fn condensed(text: &str) -> String {
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let start = text.find(&open)? + open.len();
        let len = text[start..].find(&format!("</{tag}>"))?;
        Some(&text[start..start + len])
    };
    let head = text.split("<?xml").next().unwrap_or(text);
    let mut out = head.trim_end_matches([' ', ':', '\n']).to_string();
    if let (Some(code), Some(msg)) = (field("Code"), field("Message")) {
        out = format!("{out}: {code}: {msg}");
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Classifies an object-store failure for the user.
fn remote_error(
    op: &'static str,
    location: String,
    endpoint: &str,
    e: object_store::Error,
) -> Error {
    use object_store::Error as E;
    // The whole chain: the outer message often hides the cause (a timeout).
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    let (kind, hint) = match &e {
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => (
            ErrorKind::Permission,
            "the store refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        _ if text.contains("NoSuchBucket") || text.contains("bucket does not exist") => (
            ErrorKind::NotFound,
            "the bucket does not exist: create it, or fix the region's URL (`blocksnap region list`)",
        ),
        _ if text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
            || text.contains("AccessDenied") =>
        {
            (
                ErrorKind::Permission,
                "the store refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )
        }
        E::NotFound { .. } => (ErrorKind::NotFound, "it does not exist"),
        E::Precondition { .. } | E::AlreadyExists { .. } => {
            (ErrorKind::Conflict, "another writer created it first")
        }
        _ if text.contains("timed out") || text.contains("operation timed out") => (
            ErrorKind::Other,
            "the store did not answer in time (BLOCKSNAP_S3_TIMEOUT): check that it runs and is reachable",
        ),
        _ if text.contains("error sending request") || text.contains("connect") => (
            ErrorKind::Other,
            "the store cannot be reached: check that it runs and the region's endpoint",
        ),
        _ => (ErrorKind::Other, "the object store failed"),
    };
    Error::Remote {
        op,
        location,
        reason: format!("{hint} ({endpoint}: {})", condensed(&text)),
        kind,
    }
}

/// A region kept on an S3-compatible object store.
pub struct S3Backend {
    s3: Arc<S3>,
}

impl S3Backend {
    /// Connects to the store `def` names, with credentials from the
    /// environment. Sends no request.
    pub fn connect(region: &str, def: &RegionDef) -> Result<S3Backend> {
        let url = S3Url::parse(&def.url)?;
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let (Some(key), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(Error::Remote {
                op: "open region",
                location: format!("{region} ({})", def.url),
                reason: "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                         (and AWS_REGION) in the environment"
                    .into(),
                kind: ErrorKind::Permission,
            });
        };
        let endpoint = def.endpoint.clone().or_else(|| var("AWS_ENDPOINT"));
        let settings = crate::settings::get();
        let timeout = settings.s3_timeout.as_secs_f64();
        let retries = settings.s3_retries;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_region(var("AWS_REGION").unwrap_or_else(|| "us-east-1".into()))
            .with_allow_http(def.allow_http)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: retries,
                retry_timeout: Duration::from_secs_f64(timeout * 2.0),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs_f64(timeout))
                    .with_connect_timeout(Duration::from_secs_f64(timeout.min(10.0)))
                    .with_allow_http(def.allow_http),
            );
        if let Some(token) = var("AWS_SESSION_TOKEN") {
            builder = builder.with_token(token);
        }
        if let Some(e) = &endpoint {
            builder = builder.with_endpoint(e);
        }
        let store = builder.build().map_err(|e| Error::Remote {
            op: "open region",
            location: format!("{region} ({})", def.url),
            reason: e.to_string(),
            kind: ErrorKind::Usage,
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blocksnap-s3")
            .enable_all()
            .build()
            .ctx("start the S3 client", std::path::Path::new("tokio"))?;
        let inflight = settings.s3_inflight.max(1);
        Ok(S3Backend {
            s3: Arc::new(S3 {
                requests: Arc::default(),
                store,
                runtime,
                url: format!("s3://{}{}", url.bucket, prefixed(&url.prefix)),
                prefix: url.prefix,
                endpoint: endpoint.unwrap_or_else(|| "AWS S3".into()),
                inflight,
            }),
        })
    }
}

fn prefixed(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!("/{prefix}")
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.s3.url.clone()
    }

    fn locate(&self, key: &str) -> PathBuf {
        PathBuf::from(self.s3.url_of(key))
    }

    fn read(&self, key: &str, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>> {
        let path = self.s3.path(key);
        let result = self.s3.block_on(async {
            Requests::add(&self.s3.requests.get);
            let got = self.s3.store.get(&path).await?;
            if got.meta.size > limit {
                return Ok(Err(got.meta.size));
            }
            Ok(Ok(got.bytes().await?.to_vec()))
        });
        match result {
            Ok(Ok(bytes)) => Ok(Some(bytes)),
            Ok(Err(size)) => Err(Error::CorruptFile {
                what,
                path: self.locate(key),
                reason: format!("it holds {size} bytes, more than {limit}"),
            }),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(self.s3.error("read", key, e)),
        }
    }

    fn read_head(&self, key: &str, len: u64) -> Result<Option<(Vec<u8>, u64)>> {
        self.s3.get_range(key, len)
    }

    fn changed_at(&self, key: &str) -> Result<Option<SystemTime>> {
        let path = self.s3.path(key);
        Requests::add(&self.s3.requests.head);
        match self.s3.block_on(self.s3.store.head(&path)) {
            Ok(meta) => Ok(Some(modified(&meta))),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(self.s3.error("read", key, e)),
        }
    }

    fn create(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.s3.put(key, data, PutMode::Create)
    }

    fn replace(&self, key: &str, data: &[u8]) -> Result<()> {
        self.s3.put(key, data, PutMode::Overwrite).map(|_| ())
    }

    fn remove(&self, key: &str) -> Result<bool> {
        // S3's DELETE succeeds on an absent key: ask first, for the answer.
        if self.s3.get_range(key, 0)?.is_none() {
            return Ok(false);
        }
        Requests::add(&self.s3.requests.delete);
        match self.s3.block_on(self.s3.store.delete(&self.s3.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(self.s3.error("delete", key, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let dir_path = self.s3.path(dir);
        Requests::add(&self.s3.requests.list);
        let listed = self
            .s3
            .block_on(self.s3.store.list_with_delimiter(Some(&dir_path)))
            .map_err(|e| self.s3.error("list", dir, e))?;
        Ok(listed
            .objects
            .iter()
            .filter_map(|m| m.location.filename().map(str::to_string))
            .collect())
    }

    fn chunk_store(&self) -> Box<dyn ChunkStore> {
        Box::new(S3ChunkStore::new(self.s3.clone()))
    }

    fn lock(&self, mode: LockMode, purpose: &str) -> Result<RegionLock> {
        S3Lock::take(&self.s3, "locks", mode, purpose)
    }

    /// The same protocol as the region lock, exclusive, over its own
    /// objects `catalog-locks/exclusive-<random>`.
    fn catalog_lock(&self, purpose: &str) -> Result<RegionLock> {
        S3Lock::take(&self.s3, "catalog-locks", LockMode::Exclusive, purpose)
    }

    fn gc_cutoff(&self, lock: &RegionLock) -> Result<Option<SystemTime>> {
        let grace = crate::settings::get().gc_grace();
        Ok(lock.since.map(|t| t - grace))
    }

    fn remove_leftovers(&self) -> Result<u64> {
        let mut removed = 0;
        for dir in ["locks", "catalog-locks"] {
            let locks = self.s3.list_meta(dir)?;
            let Some(newest) = locks.iter().map(modified).max() else {
                continue;
            };
            for m in locks.iter().filter(|m| modified(m) + lock_stale() < newest) {
                let key = self.s3.key_of(m).to_string();
                if self.remove(&key)? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// When the store last wrote an object, by its own clock.
fn modified(m: &ObjectMeta) -> SystemTime {
    SystemTime::from(m.last_modified)
}

// ---- locks ----

#[derive(Serialize, Deserialize)]
struct LockRecord {
    holder: String,
}

struct S3Lock {
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
    s3: Arc<S3>,
    key: String,
}

impl S3Lock {
    fn take(s3: &Arc<S3>, dir: &str, mode: LockMode, purpose: &str) -> Result<RegionLock> {
        let exclusive = mode == LockMode::Exclusive;
        let record = serde_json::to_vec(&LockRecord {
            holder: holder_note(purpose),
        })
        .expect("lock record serializes");
        let started = Instant::now();
        loop {
            // The mode is in the name, so a listing tells every holder's.
            let kind = if exclusive { "exclusive" } else { "shared" };
            let key = format!("{dir}/{kind}-{}", &random_id("l")[2..]);
            s3.put(&key, &record, PutMode::Overwrite)?;
            let locks = s3.list_meta(dir)?;
            let mine = locks.iter().find(|m| s3.key_of(m) == key).ok_or_else(|| {
                Error::Remote {
                    op: "take the lock of",
                    location: s3.url.clone(),
                    reason: format!("lock object {key} was written but is not listed: the store is not strongly consistent"),
                    kind: ErrorKind::Other,
                }
            })?;
            let since = modified(mine);
            let newest = locks.iter().map(modified).max().unwrap_or(since);
            let conflicting = locks.iter().find(|other| {
                let other_key = s3.key_of(other);
                let shared = other_key.starts_with(&format!("{dir}/shared-"));
                other_key != key
                    && modified(other) + lock_stale() >= newest
                    && (exclusive || !shared)
            });
            let Some(other) = conflicting else {
                let stop = Arc::new(AtomicBool::new(false));
                let refresher = spawn_refresher(s3.clone(), key.clone(), record, stop.clone());
                let lock = S3Lock {
                    stop,
                    refresher: Some(refresher),
                    s3: s3.clone(),
                    key,
                };
                return Ok(RegionLock::new(Box::new(lock), Some(since)));
            };
            let other_key = s3.key_of(other).to_string();
            let _ = s3.block_on(s3.store.delete(&s3.path(&key)));
            if started.elapsed() >= lock_wait() {
                // Who holds it, for the message; an object that is not a
                // lock record still counts (as exclusive) until stale.
                let backend = S3Backend { s3: s3.clone() };
                let holder = backend
                    .read(&other_key, "lock object", 64 << 10)?
                    .and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok())
                    .map_or_else(|| format!("lock object {other_key}"), |r| r.holder);
                return Err(Error::Locked {
                    path: PathBuf::from(s3.url.clone()),
                    holder,
                });
            }
            let jitter = u64::from_str_radix(&random_id("j")[2..4], 16).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50 + jitter));
        }
    }
}

/// Rewrites the lock object every fifth of the stale period while held.
fn spawn_refresher(
    s3: Arc<S3>,
    key: String,
    record: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let every = lock_stale() / 5;
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100).min(every));
            if last.elapsed() >= every {
                let _ = s3.put(&key, &record, PutMode::Overwrite);
                last = Instant::now();
            }
        }
    })
}

impl Drop for S3Lock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self
            .s3
            .block_on(self.s3.store.delete(&self.s3.path(&self.key)));
    }
}

// ---- chunks ----

fn chunk_key(id: &ChunkId) -> String {
    format!("chunks/{}", crate::store::chunk_name(id))
}

#[derive(Default)]
struct Uploads {
    /// Chunks being uploaded, readable meanwhile (shared with the upload,
    /// not copied).
    pending: HashMap<ChunkId, Bytes>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    first_error: Option<Error>,
}

/// Chunks as objects `chunks/<4 hex>/<64 hex>`.
pub struct S3ChunkStore {
    s3: Arc<S3>,
    /// Every chunk known to be stored, once listed, with when it was
    /// written (`UNIX_EPOCH` for one this process uploaded).
    index: Mutex<Option<HashMap<ChunkId, SystemTime>>>,
    heads: AtomicUsize,
    uploads: Arc<Mutex<Uploads>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl S3ChunkStore {
    fn new(s3: Arc<S3>) -> S3ChunkStore {
        S3ChunkStore {
            permits: Arc::new(tokio::sync::Semaphore::new(s3.inflight)),
            s3,
            index: Mutex::new(None),
            heads: AtomicUsize::new(0),
            uploads: Arc::default(),
        }
    }

    fn failed(&self) -> Result<()> {
        match &self.uploads.lock().expect("uploads lock").first_error {
            Some(e) => Err(Error::Remote {
                op: "upload chunks to",
                location: self.s3.url.clone(),
                reason: e.to_string(),
                kind: e.kind(),
            }),
            None => Ok(()),
        }
    }

    fn listed(&self) -> Result<Vec<StoredChunk>> {
        Ok(self
            .s3
            .list_meta("chunks")?
            .iter()
            .filter_map(|m| {
                Some(StoredChunk {
                    id: m.location.filename()?.parse().ok()?,
                    size: m.size,
                    written: Some(modified(m)),
                })
            })
            .collect())
    }
}

impl S3ChunkStore {
    /// When chunk `id` was written, from the index (listing `chunks/` once
    /// when there is none yet, while other workers wait for it); `None`
    /// when it is not stored.
    fn indexed(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        let mut index = self.index.lock().expect("index lock");
        if index.is_none() {
            let listed = self.listed()?.into_iter();
            *index = Some(
                listed
                    .map(|c| (c.id, c.written.unwrap_or(SystemTime::UNIX_EPOCH)))
                    .collect(),
            );
        }
        Ok(index.as_ref().and_then(|i| i.get(id)).copied())
    }
}

impl ChunkStore for S3ChunkStore {
    fn has(&self, id: &ChunkId) -> Result<bool> {
        if self
            .uploads
            .lock()
            .expect("uploads lock")
            .pending
            .contains_key(id)
        {
            return Ok(true);
        }
        if let Some(index) = &*self.index.lock().expect("index lock") {
            return Ok(index.contains_key(id));
        }
        if self.heads.fetch_add(1, Ordering::Relaxed) < HEAD_BUDGET {
            return Ok(self.s3.get_range(&chunk_key(id), 0)?.is_some());
        }
        // One listing, while the other workers wait for it.
        Ok(self.indexed(id)?.is_some())
    }

    /// Callers ask [`ChunkStore::has`] first (snapshot and copy do), so
    /// `put` asks the store nothing more: a chunk known to be stored or
    /// uploading is skipped, any other is uploaded with put-if-absent, and
    /// one another writer stored meanwhile counts as new here.
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        self.failed()?;
        let indexed = self.index.lock().expect("index lock");
        if indexed.as_ref().is_some_and(|i| i.contains_key(id)) {
            return Ok(false);
        }
        drop(indexed);
        let data = Bytes::copy_from_slice(data);
        {
            let mut up = self.uploads.lock().expect("uploads lock");
            if up.pending.insert(*id, data.clone()).is_some() {
                return Ok(false);
            }
            up.tasks.retain(|t| !t.is_finished());
        }
        let permit = self
            .s3
            .block_on(self.permits.clone().acquire_owned())
            .expect("the semaphore is never closed");
        // The task holds no `Arc<S3>`: the runtime must not be dropped by
        // one of its own tasks finishing last.
        let (uploads, id) = (self.uploads.clone(), *id);
        let (store, requests) = (self.s3.store.clone(), self.s3.requests.clone());
        let key = chunk_key(&id);
        let path = self.s3.path(&key);
        let (url, endpoint) = (self.s3.url_of(&key), self.s3.endpoint.clone());
        let task = self.s3.runtime.spawn(async move {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            let payload = PutPayload::from(data);
            Requests::add(&requests.put);
            let result = store.put_opts(&path, payload, opts).await;
            drop(permit);
            let mut up = uploads.lock().expect("uploads lock");
            up.pending.remove(&id);
            match result {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => {
                    if up.first_error.is_none() {
                        up.first_error = Some(remote_error("upload", url, &endpoint, e));
                    }
                }
            }
        });
        self.uploads.lock().expect("uploads lock").tasks.push(task);
        if let Some(index) = &mut *self.index.lock().expect("index lock") {
            index.insert(id, SystemTime::UNIX_EPOCH);
        }
        Ok(true)
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if let Some(d) = self.uploads.lock().expect("uploads lock").pending.get(id) {
            return Ok(d.to_vec());
        }
        let key = chunk_key(id);
        Requests::add(&self.s3.requests.get);
        match self
            .s3
            .block_on(async { self.s3.store.get(&self.s3.path(&key)).await?.bytes().await })
        {
            Ok(b) => Ok(b.to_vec()),
            Err(e) if absent(&e) => Err(Error::MissingChunk { chunk: *id }),
            Err(e) => Err(self.s3.error("read", &key, e)),
        }
    }

    fn get_head(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>> {
        if let Some(d) = self.uploads.lock().expect("uploads lock").pending.get(id) {
            return Ok(d[..len.min(d.len())].to_vec());
        }
        match self.s3.get_range(&chunk_key(id), len as u64)? {
            Some((head, _)) => Ok(head),
            None => Err(Error::MissingChunk { chunk: *id }),
        }
    }

    fn list(&self) -> Result<Vec<ChunkId>> {
        Ok(self.listed()?.into_iter().map(|c| c.id).collect())
    }

    fn list_stored(&self) -> Result<Vec<StoredChunk>> {
        self.listed()
    }

    fn remove(&self, id: &ChunkId) -> Result<()> {
        let key = chunk_key(id);
        Requests::add(&self.s3.requests.delete);
        match self.s3.block_on(self.s3.store.delete(&self.s3.path(&key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.s3.error("delete", &key, e)),
        }
        if let Some(index) = &mut *self.index.lock().expect("index lock") {
            index.remove(id);
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let tasks = std::mem::take(&mut self.uploads.lock().expect("uploads lock").tasks);
        for t in tasks {
            if let Err(e) = self.s3.block_on(t) {
                return Err(Error::Remote {
                    op: "upload chunks to",
                    location: self.s3.url.clone(),
                    reason: format!("an upload task failed: {e}"),
                    kind: ErrorKind::Other,
                });
            }
        }
        self.failed()
    }

    fn size(&self, id: &ChunkId) -> Result<u64> {
        match self.s3.get_range(&chunk_key(id), 0)? {
            Some((_, size)) => Ok(size),
            None => Err(Error::MissingChunk { chunk: *id }),
        }
    }

    fn quarantine(&self, id: &ChunkId) -> Result<()> {
        let key = chunk_key(id);
        let bad = self.s3.path(&format!("{key}.bad"));
        match self
            .s3
            .block_on(self.s3.store.rename(&self.s3.path(&key), &bad))
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.s3.error("move corrupt chunk aside", &key, e)),
        }
        if let Some(index) = &mut *self.index.lock().expect("index lock") {
            index.remove(id);
        }
        Ok(())
    }

    fn atomic_puts(&self) -> bool {
        true
    }

    fn quarantined(&self) -> Result<Vec<StoredChunk>> {
        Ok(self
            .s3
            .list_meta("chunks")?
            .iter()
            .filter_map(|m| {
                let id = m.location.filename()?.strip_suffix(".bad")?.parse().ok()?;
                Some(StoredChunk {
                    id,
                    size: m.size,
                    written: Some(modified(m)),
                })
            })
            .collect())
    }

    fn purge_quarantined(&self) -> Result<u64> {
        let mut removed = 0;
        for c in self.quarantined()? {
            let key = format!("{}.bad", chunk_key(&c.id));
            Requests::add(&self.s3.requests.delete);
            match self.s3.block_on(self.s3.store.delete(&self.s3.path(&key))) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(e) => return Err(self.s3.error("delete", &key, e)),
            }
        }
        Ok(removed)
    }

    /// From one listing of `chunks/`, which carries each object's write
    /// time; a chunk this process uploaded counts as unchanged.
    fn changed_at(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        let uploading = self
            .uploads
            .lock()
            .expect("uploads lock")
            .pending
            .contains_key(id);
        if uploading {
            return Ok(Some(SystemTime::UNIX_EPOCH));
        }
        self.indexed(id)
    }

    fn io_parallelism(&self) -> usize {
        self.s3.inflight
    }
}
