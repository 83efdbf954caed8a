//! Chunk storage: the [`ChunkStore`] trait the pipeline talks to, and the
//! local-directory backend.
//!
//! The trait is content-agnostic (it moves opaque bytes named by a
//! [`ChunkId`]) and small, so an object-store backend can implement it
//! without the snapshot or restore code changing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, IoContext, Result};
use crate::id::{ChunkId, random_id};

/// A chunk as a listing describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    pub id: ChunkId,
    /// Stored (compressed) bytes.
    pub size: u64,
    /// When it was written, by the store's clock, where the store says.
    pub written: Option<std::time::SystemTime>,
}

/// Where chunks live. Implementations are shared by the worker threads.
pub trait ChunkStore: Send + Sync {
    /// Whether a chunk with this name is stored.
    fn has(&self, id: &ChunkId) -> Result<bool>;
    /// Stores `data` under `id` atomically. Returns `false`, having done
    /// nothing, when the chunk is already there.
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool>;
    /// The stored bytes of a chunk; [`Error::MissingChunk`] if absent.
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>>;
    /// The first `len` bytes of a chunk (all of it if shorter): enough to
    /// read its header without fetching its payload.
    fn get_head(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>> {
        let mut bytes = self.get(id)?;
        bytes.truncate(len);
        Ok(bytes)
    }
    /// Every stored chunk, in no particular order.
    fn list(&self) -> Result<Vec<ChunkId>>;
    /// Deletes a chunk; deleting an absent chunk is not an error.
    fn remove(&self, id: &ChunkId) -> Result<()>;
    /// Makes every chunk now visible durable, including chunks another
    /// process put and this one only found with `has`. Called before a
    /// manifest that names the chunks is written.
    fn sync(&self) -> Result<()>;
    /// Stored size of a chunk in bytes.
    fn size(&self, id: &ChunkId) -> Result<u64>;
    /// When the stored chunk was last written or changed, by the store's
    /// clock (a file's ctime, an object's Last-Modified); `None` when it is
    /// absent. A store that cannot tell says `UNIX_EPOCH` (never changed).
    fn changed_at(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        Ok(self.has(id)?.then_some(SystemTime::UNIX_EPOCH))
    }
    /// Moves a corrupt chunk aside so that it no longer counts as stored:
    /// the next snapshot of the same data writes it anew.
    fn quarantine(&self, id: &ChunkId) -> Result<()> {
        self.remove(id)
    }
    /// Chunks moved aside by [`ChunkStore::quarantine`] and still kept
    /// (`<id>.bad`), with their stored sizes.
    fn quarantined(&self) -> Result<Vec<StoredChunk>> {
        Ok(Vec::new())
    }
    /// Deletes every quarantined chunk; returns how many there were.
    fn purge_quarantined(&self) -> Result<u64> {
        Ok(0)
    }
    /// Every stored chunk with its stored size and, where the store keeps
    /// one, the time it was written. A chunk removed meanwhile is left out.
    fn list_stored(&self) -> Result<Vec<StoredChunk>> {
        let mut out = Vec::new();
        for id in self.list()? {
            match self.size(&id) {
                Ok(size) => out.push(StoredChunk {
                    id,
                    size,
                    written: None,
                }),
                Err(Error::MissingChunk { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    /// Whether a stored chunk is always whole (one atomic PUT), so that a
    /// chunk found in the store can be trusted without reading it back.
    /// `false` for the local store, where a crash before `sync` can leave a
    /// partial file under a chunk's name.
    fn atomic_puts(&self) -> bool {
        false
    }
    /// How many requests the store wants in flight: a latency-bound store
    /// asks the pipeline for more worker threads than there are cores.
    fn io_parallelism(&self) -> usize {
        0
    }
    /// Removes leftovers of interrupted writes (temporary files) and
    /// returns how many there were. Called by gc, when no writer runs.
    fn remove_leftovers(&self) -> Result<u64> {
        Ok(0)
    }
}

/// Chunks as files: `chunks/<first 4 hex>/<64 hex>`.
///
/// A chunk is written to a temporary name and renamed, without an fsync of
/// its own; it becomes durable at the next `sync`, one `syncfs(2)` of the
/// store's file system that also covers chunks other processes wrote and
/// this one deduplicated against. Until then a crash can leave a chunk
/// missing or partial under its final name, which is why a chunk found in
/// the store is verified before a new snapshot relies on it.
pub struct LocalChunkStore {
    root: PathBuf,
}

impl LocalChunkStore {
    pub fn new(root: PathBuf) -> Self {
        LocalChunkStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        self.root.join(chunk_name(id))
    }

    /// Calls `f` with the name and path of every file under
    /// `chunks/<4 hex>/`: chunks, quarantined chunks, temporary files.
    fn for_each_file(&self, mut f: impl FnMut(&str, &Path) -> Result<()>) -> Result<()> {
        for_each_entry(&self.root, |sub| {
            for_each_entry(&sub, |file| {
                match file.file_name().and_then(|n| n.to_str()) {
                    Some(name) => f(name, &file),
                    None => Ok(()),
                }
            })
        })
    }

    /// Calls `f` with each quarantined chunk (`<64 hex>.bad`) and its path.
    fn for_each_quarantined(&self, mut f: impl FnMut(ChunkId, &Path) -> Result<()>) -> Result<()> {
        self.for_each_file(|name, path| {
            match name.strip_suffix(".bad").and_then(|n| n.parse().ok()) {
                Some(id) => f(id, path),
                None => Ok(()),
            }
        })
    }

    fn remove_temp_files(&self) -> Result<u64> {
        let mut removed = 0;
        self.for_each_file(|name, path| {
            if is_temp_name(name) {
                fs::remove_file(path).ctx("remove temporary file", path)?;
                removed += 1;
            }
            Ok(())
        })?;
        Ok(removed)
    }
}

impl ChunkStore for LocalChunkStore {
    fn has(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path_of(id);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).ctx("look up chunk", &path),
        }
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        if self.has(id)? {
            return Ok(false);
        }
        let path = self.path_of(id);
        let dir = path.parent().expect("chunk paths have a parent");
        if !dir.exists() {
            fs::create_dir_all(dir).ctx("create chunk directory", dir)?;
        }
        write_atomic(&path, data, Durability::AtSync)?;
        Ok(true)
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let path = self.path_of(id);
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::MissingChunk { chunk: *id })
            }
            Err(e) => Err(e).ctx("read chunk", &path),
        }
    }

    fn get_head(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>> {
        let path = self.path_of(id);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::MissingChunk { chunk: *id });
            }
            Err(e) => return Err(e).ctx("open chunk", &path),
        };
        let mut head = Vec::with_capacity(len);
        io::Read::take(f, len as u64)
            .read_to_end(&mut head)
            .ctx("read chunk", &path)?;
        Ok(head)
    }

    fn list(&self) -> Result<Vec<ChunkId>> {
        let mut ids = Vec::new();
        self.for_each_file(|name, _| {
            ids.extend(name.parse::<ChunkId>().ok());
            Ok(())
        })?;
        Ok(ids)
    }

    fn remove(&self, id: &ChunkId) -> Result<()> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove chunk", &path),
        }
    }

    fn sync(&self) -> Result<()> {
        if !self.root.exists() {
            return Ok(());
        }
        let dir = File::open(&self.root).ctx("open", &self.root)?;
        crate::sys::syncfs(&dir).ctx("flush the file system of", &self.root)
    }

    fn size(&self, id: &ChunkId) -> Result<u64> {
        let path = self.path_of(id);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::MissingChunk { chunk: *id })
            }
            Err(e) => Err(e).ctx("stat chunk", &path),
        }
    }

    fn remove_leftovers(&self) -> Result<u64> {
        self.remove_temp_files()
    }

    fn quarantined(&self) -> Result<Vec<StoredChunk>> {
        let mut out = Vec::new();
        self.for_each_quarantined(|id, path| {
            let size = fs::symlink_metadata(path).ctx("stat", path)?.len();
            out.push(StoredChunk {
                id,
                size,
                written: None,
            });
            Ok(())
        })?;
        Ok(out)
    }

    fn purge_quarantined(&self) -> Result<u64> {
        let mut removed = 0;
        self.for_each_quarantined(|_, path| {
            fs::remove_file(path).ctx("remove quarantined chunk", path)?;
            removed += 1;
            Ok(())
        })?;
        Ok(removed)
    }

    fn changed_at(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        let path = self.path_of(id);
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(Some(ctime(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("look up chunk", &path),
        }
    }

    /// Renames the chunk to `<64 hex>.bad` beside it, for inspection.
    fn quarantine(&self, id: &ChunkId) -> Result<()> {
        let path = self.path_of(id);
        let bad = path.with_extension("bad");
        match fs::rename(&path, &bad) {
            Ok(()) => {}
            // Another process moved it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx("move corrupt chunk aside", &path),
        }
        sync_dir(path.parent().expect("chunk paths have a parent"))
    }
}

/// Where a chunk lives under a region's `chunks/`, on every backend:
/// `<first 4 hex>/<64 hex>` (frozen: the store layout).
pub(crate) fn chunk_name(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("{}/{hex}", &hex[..4])
}

/// A file's status-change time: set by the kernel on every write, rename
/// or link, and not settable by a user.
pub(crate) fn ctime(m: &fs::Metadata) -> SystemTime {
    use std::os::unix::fs::MetadataExt;
    let (s, ns) = (m.ctime(), m.ctime_nsec());
    if s < 0 {
        return SystemTime::UNIX_EPOCH;
    }
    SystemTime::UNIX_EPOCH + std::time::Duration::new(s as u64, ns.clamp(0, 999_999_999) as u32)
}

/// Calls `f` with the path of every entry of `dir`; a missing `dir` has none.
pub(crate) fn for_each_entry(dir: &Path, mut f: impl FnMut(PathBuf) -> Result<()>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("list directory", dir),
    };
    for entry in entries {
        f(entry.ctx("list directory", dir)?.path())?;
    }
    Ok(())
}

/// Reads a file of at most `limit` bytes (refusing a larger one as damaged
/// before reading it all); `Ok(None)` if it is absent.
pub(crate) fn read_bounded(path: &Path, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx("open", path),
    };
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .ctx("read", path)?;
    if bytes.len() as u64 > limit {
        return Err(Error::CorruptFile {
            what,
            path: path.to_path_buf(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(Some(bytes))
}

const TEMP_MARK: &str = ".tmp-";

pub(crate) fn is_temp_name(name: &str) -> bool {
    name.contains(TEMP_MARK)
}

/// A unique temporary path beside `path`.
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let suffix = random_id("x");
    path.with_file_name(format!(".{name}{TEMP_MARK}{}", &suffix[2..]))
}

/// When a file written by [`write_atomic`] becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Before `write_atomic` returns: fsync the file, rename, fsync the
    /// directory.
    Now,
    /// At the next [`ChunkStore::sync`]: write and rename only. After a
    /// crash before that sync the file may be missing or hold partial
    /// content under its final name; readers of such files verify them
    /// (chunks are checked against their names).
    AtSync,
}

/// Writes `data` to `path` atomically for other processes: a unique
/// temporary name in the same directory, write, rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8], durability: Durability) -> Result<()> {
    let tmp = temp_path_for(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create temporary file", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        if durability == Durability::Now {
            f.sync_all().ctx("fsync", &tmp)?;
        }
        fs::rename(&tmp, path).ctx("rename into place", path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if durability == Durability::Now {
        sync_dir(path.parent().expect("store paths have a parent"))?;
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::new(dir.path().join("chunks"));
        let id = ChunkId::of(b"abc");
        assert!(!store.has(&id).unwrap());
        assert!(matches!(store.get(&id), Err(Error::MissingChunk { .. })));
        assert!(store.put(&id, b"stored bytes").unwrap());
        assert!(
            !store.put(&id, b"stored bytes").unwrap(),
            "second put must be a no-op"
        );
        store.sync().unwrap();
        assert!(store.has(&id).unwrap());
        assert_eq!(store.get(&id).unwrap(), b"stored bytes");
        assert_eq!(store.size(&id).unwrap(), 12);
        assert_eq!(store.list().unwrap(), vec![id]);
        let hex = id.to_hex();
        assert!(
            store
                .path_of(&id)
                .ends_with(format!("{}/{}", &hex[..4], hex))
        );
        store.remove(&id).unwrap();
        store.remove(&id).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn temp_files_are_not_listed_and_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::new(dir.path().join("chunks"));
        let id = ChunkId::of(b"x");
        store.put(&id, b"x").unwrap();
        let tmp = temp_path_for(&store.path_of(&id));
        fs::write(&tmp, b"half").unwrap();
        assert_eq!(store.list().unwrap(), vec![id]);
        assert_eq!(store.remove_leftovers().unwrap(), 1);
        assert!(!tmp.exists());
        assert!(store.has(&id).unwrap());
    }
}
