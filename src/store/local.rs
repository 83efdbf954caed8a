//! The local chunk store: one file per chunk under a region's `chunks/`.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;
use crate::store::chunk_store::{ChunkStore, Fanout, StoredChunk};
use crate::store::files::{
    Durability, ctime, for_each_entry, is_temp_name, sync_dir, write_atomic,
};

/// Chunks as files: `chunks/<first 2 or 4 hex>/<64 hex>` (see [`Fanout`]).
///
/// A chunk is written to a temporary name and renamed, without an fsync of
/// its own; it becomes durable at the next `sync`, one `syncfs(2)` of the
/// store's file system that also covers chunks other processes wrote and
/// this one deduplicated against. Until then a crash can leave a chunk
/// missing or partial under its final name, which is why a chunk found in
/// the store is verified before a new snapshot relies on it.
pub struct LocalChunkStore {
    root: PathBuf,
    fanout: Fanout,
}

impl LocalChunkStore {
    pub fn new(root: PathBuf, fanout: Fanout) -> Self {
        LocalChunkStore { root, fanout }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        self.root.join(self.fanout.name(id))
    }

    /// Calls `f` with the name and path of every file under
    /// `chunks/<prefix>/`: chunks, quarantined chunks, temporary files.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::files::temp_path_for;

    #[test]
    fn put_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::new(dir.path().join("chunks"), Fanout::NARROW);
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
                .ends_with(format!("{}/{}", &hex[..2], hex))
        );
        store.remove(&id).unwrap();
        store.remove(&id).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn temp_files_are_not_listed_and_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::new(dir.path().join("chunks"), Fanout::WIDE);
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
