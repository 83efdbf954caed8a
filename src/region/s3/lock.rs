//! The region lock and the catalog lock as objects (the protocol is in
//! the room's docs, `region::s3`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, PutMode};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Location, Result};
use crate::id::random_id;
use crate::region::backend::{RegionLock, holder_note, lock_wait};
use crate::region::s3::client::{S3, modified};
use crate::sys::LockMode;

/// Age at which a lock object belongs to a dead process (settings).
pub fn lock_stale() -> Duration {
    crate::settings::get().s3_lock_stale
}

#[derive(Serialize, Deserialize)]
struct LockRecord {
    holder: String,
}

pub struct S3Lock {
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
    s3: Arc<S3>,
    key: String,
}

impl S3Lock {
    pub fn take(s3: &Arc<S3>, dir: &str, mode: LockMode, purpose: &str) -> Result<RegionLock> {
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
                    source: None,
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
                let holder = s3
                    .read(&other_key, "lock object", 64 << 10)?
                    .and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok())
                    .map_or_else(|| format!("lock object {other_key}"), |r| r.holder);
                return Err(Error::Locked {
                    location: Location::Url(s3.url.clone()),
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
