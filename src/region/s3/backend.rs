//! A region's files on an S3-compatible store: the [`Backend`] over one
//! `s3://BUCKET/PREFIX`.

use std::sync::Arc;
use std::time::SystemTime;

use object_store::{ObjectStore, ObjectStoreExt, PutMode};

use crate::error::{Location, Result};
use crate::format::regions::RegionDef;
use crate::region::backend::{Backend, RegionLock};
use crate::region::s3::chunks::S3ChunkStore;
use crate::region::s3::client::{Requests, S3, absent, modified};
use crate::region::s3::lock::{S3Lock, lock_stale};
use crate::store::chunk_store::ChunkStore;
use crate::sys::LockMode;

/// A region kept on an S3-compatible object store.
pub struct S3Backend {
    s3: Arc<S3>,
}

impl S3Backend {
    /// Connects to the store `def` names, with credentials from the
    /// environment. Sends no request.
    pub fn connect(region: &str, def: &RegionDef) -> Result<S3Backend> {
        Ok(S3Backend {
            s3: Arc::new(S3::connect(region, def)?),
        })
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.s3.url.clone()
    }

    fn locate(&self, key: &str) -> Location {
        Location::Url(self.s3.url_of(key))
    }

    fn read(&self, key: &str, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.s3.read(key, what, limit)
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

    fn chunk_store(&self, _store_version: u32) -> Box<dyn ChunkStore> {
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

    /// The same protocol again, over `policy-locks/exclusive-<random>`.
    fn policy_lock(&self, purpose: &str) -> Result<RegionLock> {
        S3Lock::take(&self.s3, "policy-locks", LockMode::Exclusive, purpose)
    }

    fn gc_cutoff(&self, lock: &RegionLock) -> Result<Option<SystemTime>> {
        let grace = crate::settings::get().gc_grace();
        Ok(lock.since.map(|t| t - grace))
    }

    fn remove_leftovers(&self) -> Result<u64> {
        let mut removed = 0;
        for dir in ["locks", "catalog-locks", "policy-locks"] {
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
