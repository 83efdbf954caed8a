//! A chunk store seen through one encryption key: [`Keyed`] seals what is
//! put, unseals what is got, and names chunks by the key's keyed BLAKE3,
//! so the delta chains, the pipeline and the decoders above it run
//! unchanged on encrypted snapshots. Without a key it is the store itself.
//!
//! What is not content passes through untouched: headers (a delta's base
//! is readable without the key, for gc), listings, sizes, times.

use std::sync::Arc;
use std::time::SystemTime;

use crate::error::Result;
use crate::format::chunk::{self, seal, unseal};
use crate::format::key::DataKey;
use crate::id::{ChunkId, Namer};
use crate::store::chunk_store::{ChunkStore, StoredChunk};

/// `store` as the snapshots under `key` see it (`None`: plain snapshots).
pub struct Keyed<'a> {
    store: &'a dyn ChunkStore,
    key: Option<Arc<DataKey>>,
}

impl<'a> Keyed<'a> {
    pub fn new(store: &'a dyn ChunkStore, key: Option<Arc<DataKey>>) -> Keyed<'a> {
        Keyed { store, key }
    }

    pub fn key(&self) -> Option<&Arc<DataKey>> {
        self.key.as_ref()
    }

    /// The store underneath, whose bytes are as stored.
    pub fn raw(&self) -> &'a dyn ChunkStore {
        self.store
    }
}

impl ChunkStore for Keyed<'_> {
    fn namer(&self) -> Namer {
        self.key.as_ref().map_or(Namer::Plain, |k| k.namer())
    }
    fn has(&self, id: &ChunkId) -> Result<bool> {
        self.store.has(id)
    }
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        match &self.key {
            Some(k) => self.store.put(id, &seal(k, id, data.to_vec())),
            None => self.store.put(id, data),
        }
    }
    fn put_owned(&self, id: &ChunkId, data: Vec<u8>) -> Result<Option<u64>> {
        match &self.key {
            Some(k) => self.store.put_owned(id, seal(k, id, data)),
            None => self.store.put_owned(id, data),
        }
    }
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let stored = self.store.get(id)?;
        match &self.key {
            Some(k) => unseal(k, id, stored),
            None => Ok(stored),
        }
    }
    fn get_head(&self, id: &ChunkId, len: usize) -> Result<Vec<u8>> {
        // Only ever asked for a delta's base: the plain part of a header.
        debug_assert!(len <= chunk::DELTA_HEADER_LEN);
        self.store.get_head(id, len)
    }
    fn list(&self) -> Result<Vec<ChunkId>> {
        self.store.list()
    }
    fn remove(&self, id: &ChunkId) -> Result<()> {
        self.store.remove(id)
    }
    fn sync(&self) -> Result<()> {
        self.store.sync()
    }
    fn size(&self, id: &ChunkId) -> Result<u64> {
        self.store.size(id)
    }
    fn changed_at(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        self.store.changed_at(id)
    }
    fn quarantine(&self, id: &ChunkId) -> Result<()> {
        self.store.quarantine(id)
    }
    fn quarantined(&self) -> Result<Vec<StoredChunk>> {
        self.store.quarantined()
    }
    fn purge_quarantined(&self) -> Result<u64> {
        self.store.purge_quarantined()
    }
    fn list_stored(&self) -> Result<Vec<StoredChunk>> {
        self.store.list_stored()
    }
    fn atomic_puts(&self) -> bool {
        self.store.atomic_puts()
    }
    fn io_parallelism(&self) -> usize {
        self.store.io_parallelism()
    }
    fn remove_leftovers(&self) -> Result<u64> {
        self.store.remove_leftovers()
    }
}
