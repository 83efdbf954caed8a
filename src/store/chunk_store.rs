//! The [`ChunkStore`] trait the pipeline talks to, and the chunk key
//! layout every backend shares.
//!
//! The trait is content-agnostic (it moves opaque bytes named by a
//! [`ChunkId`]) and small, so an object-store backend implements it
//! without the snapshot or restore code changing.

use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::id::{ChunkId, Namer};

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
    /// How the chunks read and written through this store are named (the
    /// key-bound view of `store::sealed` names them by keyed BLAKE3).
    fn namer(&self) -> Namer {
        Namer::Plain
    }
    /// Whether a chunk with this name is stored.
    fn has(&self, id: &ChunkId) -> Result<bool>;
    /// Stores `data` under `id` atomically. Returns `false`, having done
    /// nothing, when the chunk is already there.
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool>;
    /// [`ChunkStore::put`] of a buffer the caller gives up (a view that
    /// transforms chunks does so in place): the bytes stored, or `None`,
    /// having done nothing, when the chunk is already there.
    fn put_owned(&self, id: &ChunkId, data: Vec<u8>) -> Result<Option<u64>> {
        Ok(self.put(id, &data)?.then_some(data.len() as u64))
    }
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

/// How many hex digits of a chunk's name name its directory under
/// `chunks/`. A local region of store version 2 or later uses two: 256
/// directories, made once, where four made a new store pay a `mkdir` for
/// nearly every chunk of its first snapshot (65,536 directories, ~260 µs
/// each on ext4); at 10 M chunks that is 39,000 entries a directory, which
/// ext4's, XFS's and btrfs's indexed directories look up in a few block
/// reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fanout(usize);

impl Fanout {
    /// `chunks/<4 hex>/`: object stores, and local regions of store
    /// version 1.
    pub const WIDE: Fanout = Fanout(4);
    /// `chunks/<2 hex>/`: local regions of store version 2.
    pub const NARROW: Fanout = Fanout(2);

    /// The fan-out of a local region of store version `version`.
    pub fn of_local_store(version: u32) -> Fanout {
        if version >= 2 {
            Fanout::NARROW
        } else {
            Fanout::WIDE
        }
    }

    /// `<prefix>/<64 hex>`: where a chunk lives under a region's
    /// `chunks/` (frozen: the store layout).
    pub fn name(self, id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!("{}/{hex}", &hex[..self.0])
    }
}
