//! Chunks as objects `chunks/<4 hex>/<64 hex>`, uploaded asynchronously.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Error, ErrorKind, Result};
use crate::id::ChunkId;
use crate::region::s3::client::{Requests, S3, absent, modified, remote_error};
use crate::store::chunk_store::{ChunkStore, Fanout, StoredChunk};

/// Existence questions answered by HEAD before listing every chunk once.
pub const HEAD_BUDGET: usize = 256;

/// Four hex digits on an object store, whatever the store version: no
/// directories to create, and prefixes spread the request load.
fn chunk_key(id: &ChunkId) -> String {
    format!("chunks/{}", Fanout::WIDE.name(id))
}

#[derive(Default)]
struct Uploads {
    /// Chunks being uploaded, readable meanwhile (shared with the upload,
    /// not copied).
    pending: HashMap<ChunkId, Bytes>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    first_error: Option<Arc<Error>>,
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
    pub fn new(s3: Arc<S3>) -> S3ChunkStore {
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
                source: Some(e.clone() as _),
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
                        up.first_error = Some(Arc::new(remote_error("upload", url, &endpoint, e)));
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
                    source: Some(Arc::new(e)),
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
