//! A region: one store directory holding chunks, snapshot manifests and
//! (later) images, with `store.json` describing it and `lock` guarding it.
//!
//! ```text
//! <store>/<region>/
//!   store.json                    format, version, region name, owner account, created
//!   chunks/<first 4 hex>/<64 hex> one chunk (see chunk.rs)
//!   snapshots/<snap-id>           snapshot manifest (see manifest.rs)
//!   images/                       image manifests
//!   lock                          flock: shared for writers and readers, exclusive for gc
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::id::{AccountId, SnapshotId};
use crate::manifest::{self, Manifest, SnapshotMeta};
use crate::store::{
    ChunkStore, Durability, LocalChunkStore, for_each_entry, read_bounded, write_atomic,
};
use crate::sys::{self, LockMode};

pub const STORE_FORMAT: &str = "blocksnap-region";
pub const STORE_VERSION: u32 = 1;
const MAX_STORE_JSON: u64 = 64 << 10;
/// How long a command waits for a conflicting lock before giving up;
/// `BLOCKSNAP_LOCK_WAIT` (seconds) overrides it.
const LOCK_WAIT: Duration = Duration::from_secs(60);

fn lock_wait() -> Duration {
    std::env::var("BLOCKSNAP_LOCK_WAIT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(LOCK_WAIT)
}

/// Contents of `store.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreInfo {
    pub format: String,
    pub version: u32,
    pub region: String,
    /// The default account: owner of what is created without `--account`.
    pub owner: AccountId,
    pub created: String,
}

pub struct Region {
    root: PathBuf,
    info: StoreInfo,
    chunks: Box<dyn ChunkStore>,
}

/// Snapshots found by [`Region::list_snapshots`], and manifests that could
/// not be read.
pub struct SnapshotListing {
    pub snapshots: Vec<SnapshotMeta>,
    pub damaged: Vec<Error>,
}

/// Checks a region name: 1–63 of lowercase letters, digits and `-`.
pub fn validate_region_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid region name {name:?}: use 1-63 lowercase letters, digits and '-', e.g. us-east-1"
        )))
    }
}

impl Region {
    /// Opens region `name` under `store_root`, creating it (and the store
    /// root) on first use.
    pub fn open_or_create(store_root: &Path, name: &str) -> Result<Region> {
        validate_region_name(name)?;
        let root = store_root.join(name);
        let info_path = root.join("store.json");
        if !info_path.exists() {
            fs::create_dir_all(&root).ctx("create region directory", &root)?;
            for sub in ["chunks", "snapshots", "images"] {
                let p = root.join(sub);
                fs::create_dir_all(&p).ctx("create directory", &p)?;
            }
            let info = StoreInfo {
                format: STORE_FORMAT.into(),
                version: STORE_VERSION,
                region: name.into(),
                owner: store_account(store_root)?,
                created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            };
            let json = serde_json::to_vec_pretty(&info).expect("store info serializes");
            // Two first commands racing: the rename makes one of them win
            // and both then read the same file.
            write_atomic(&info_path, &json, Durability::Now)?;
        }
        let info = read_store_info(&info_path, name)?;
        Ok(Region {
            chunks: Box::new(LocalChunkStore::new(root.join("chunks"))),
            root,
            info,
        })
    }

    /// The same region with its chunks kept by another [`ChunkStore`]
    /// (another backend, or a fault-injecting one in tests).
    pub fn with_chunk_store(self, chunks: Box<dyn ChunkStore>) -> Region {
        Region { chunks, ..self }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn name(&self) -> &str {
        &self.info.region
    }

    pub fn info(&self) -> &StoreInfo {
        &self.info
    }

    pub fn chunks(&self) -> &dyn ChunkStore {
        self.chunks.as_ref()
    }

    fn snapshot_path(&self, id: &SnapshotId) -> PathBuf {
        self.root.join("snapshots").join(id.as_str())
    }

    fn not_found(&self, id: &SnapshotId) -> Error {
        Error::SnapshotNotFound {
            id: id.clone(),
            region: self.name().to_string(),
        }
    }

    pub fn has_snapshot(&self, id: &SnapshotId) -> bool {
        self.snapshot_path(id).exists()
    }

    /// Reads and checks a whole snapshot manifest.
    pub fn read_snapshot(&self, id: &SnapshotId) -> Result<Manifest> {
        let path = self.snapshot_path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(id)),
            Err(e) => return Err(e).ctx("read snapshot manifest", &path),
        };
        let m = Manifest::decode(&bytes, &path)?;
        self.check_name(&m.meta, id, &path)?;
        Ok(m)
    }

    /// Reads and checks only the meta of a snapshot manifest.
    pub fn read_snapshot_meta(&self, id: &SnapshotId) -> Result<SnapshotMeta> {
        let path = self.snapshot_path(id);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(id)),
            Err(e) => return Err(e).ctx("open snapshot manifest", &path),
        };
        let file_len = f.metadata().ctx("stat snapshot manifest", &path)?.len();
        let mut head = Vec::with_capacity(manifest::HEADER_LEN);
        (&mut f)
            .take(manifest::HEADER_LEN as u64)
            .read_to_end(&mut head)
            .ctx("read snapshot manifest", &path)?;
        if let Some(n) = Manifest::meta_prefix_len(&head) {
            (&mut f)
                .take((n - head.len()) as u64)
                .read_to_end(&mut head)
                .ctx("read snapshot manifest", &path)?;
        }
        let meta = Manifest::decode_meta(&head, &path, file_len)?;
        self.check_name(&meta, id, &path)?;
        Ok(meta)
    }

    fn check_name(&self, meta: &SnapshotMeta, id: &SnapshotId, path: &Path) -> Result<()> {
        if &meta.id != id {
            return Err(Error::CorruptFile {
                what: "snapshot manifest",
                path: path.to_path_buf(),
                reason: format!("it describes {} instead", meta.id),
            });
        }
        Ok(())
    }

    /// Commits a snapshot: chunks are made durable first, then the manifest
    /// is written atomically. The snapshot exists from the rename on.
    pub fn write_snapshot(&self, m: &Manifest) -> Result<()> {
        self.chunks.sync()?;
        write_atomic(
            &self.snapshot_path(&m.meta.id),
            &m.encode(),
            Durability::Now,
        )
    }

    /// Removes a snapshot manifest. Its chunks stay until `store gc`.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let path = self.snapshot_path(id);
        match fs::remove_file(&path) {
            Ok(()) => crate::store::sync_dir(path.parent().expect("has parent")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(self.not_found(id)),
            Err(e) => Err(e).ctx("remove snapshot manifest", &path),
        }
    }

    /// Ids of every snapshot manifest present, sorted.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let dir = self.root.join("snapshots");
        let mut ids = Vec::new();
        for_each_entry(&dir, |p| {
            if let Some(id) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
            {
                ids.push(id);
            }
            Ok(())
        })?;
        ids.sort();
        Ok(ids)
    }

    /// Every snapshot, oldest first.
    pub fn list_snapshots(&self) -> Result<SnapshotListing> {
        let mut listing = SnapshotListing {
            snapshots: Vec::new(),
            damaged: Vec::new(),
        };
        for id in self.snapshot_ids()? {
            match self.read_snapshot_meta(&id) {
                Ok(m) => listing.snapshots.push(m),
                // Removed between the listing and the read.
                Err(Error::SnapshotNotFound { .. }) => {}
                Err(e) => listing.damaged.push(e),
            }
        }
        listing
            .snapshots
            .sort_by(|a, b| (a.created_ns, &a.id).cmp(&(b.created_ns, &b.id)));
        Ok(listing)
    }

    /// Takes the region lock, waiting up to a minute for a conflicting one.
    pub fn lock(&self, mode: LockMode, purpose: &str) -> Result<RegionLock> {
        let path = self.root.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx("open lock file", &path)?;
        let started = Instant::now();
        loop {
            if sys::try_lock(&file, mode).ctx("lock", &path)? {
                break;
            }
            if started.elapsed() >= lock_wait() {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match (mode, holder.trim()) {
                    (LockMode::Exclusive, _) => {
                        "snapshot, restore or other commands are using it".to_string()
                    }
                    (LockMode::Shared, "") => "an exclusive holder, such as store gc".to_string(),
                    (LockMode::Shared, h) => h.to_string(),
                };
                return Err(Error::Locked { path, holder });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if mode == LockMode::Exclusive {
            // Tells a waiting command who holds the store.
            let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let note = format!(
                "{purpose} by pid {} on {} since {}",
                std::process::id(),
                host.trim(),
                humantime::format_rfc3339_seconds(SystemTime::now())
            );
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = file.write_all(note.as_bytes());
        }
        Ok(RegionLock { _file: file })
    }
}

/// Held region lock; released when dropped (or when the process dies).
pub struct RegionLock {
    _file: File,
}

/// The store's default account, shared by all its regions: read from
/// `<store>/account`, or created there on first use.
fn store_account(store_root: &Path) -> Result<AccountId> {
    let path = store_root.join("account");
    if !path.exists() {
        fs::create_dir_all(store_root).ctx("create store directory", store_root)?;
        // Publish with link(2), which never replaces: of racing first
        // commands exactly one account wins and all read it.
        let tmp = crate::store::temp_path_for(&path);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create", &tmp)?;
        let linked = f
            .write_all(format!("{}\n", AccountId::random()).as_bytes())
            .and_then(|()| f.sync_all())
            .and_then(|()| fs::hard_link(&tmp, &path));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => crate::store::sync_dir(store_root)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx("create", &path),
        }
    }
    let text = fs::read_to_string(&path).ctx("read", &path)?;
    text.trim().parse().map_err(|_| Error::CorruptFile {
        what: "store account",
        path: path.clone(),
        reason: format!("{:?} is not a 12-digit account id", text.trim()),
    })
}

fn read_store_info(path: &Path, name: &str) -> Result<StoreInfo> {
    let bytes = read_bounded(path, "store description", MAX_STORE_JSON)?
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        .ctx("read", path)?;
    decode_store_info(&bytes, path, name)
}

/// Decodes a `store.json` for region `name`; `path` names it in errors.
pub fn decode_store_info(bytes: &[u8], path: &Path, name: &str) -> Result<StoreInfo> {
    let corrupt = |reason: String| Error::CorruptFile {
        what: "store description",
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() as u64 > MAX_STORE_JSON {
        return Err(corrupt(format!("larger than {MAX_STORE_JSON} bytes")));
    }
    let info: StoreInfo = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if info.format != STORE_FORMAT {
        return Err(corrupt(format!(
            "format is {:?}, not {STORE_FORMAT:?}",
            info.format
        )));
    }
    if info.version != STORE_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "store",
            path: path.to_path_buf(),
            found: info.version,
            supported: STORE_VERSION,
        });
    }
    if info.region != name {
        return Err(corrupt(format!(
            "it names region {:?}, but lives in {name:?}",
            info.region
        )));
    }
    Ok(info)
}
