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
//! [`chunks::HEAD_BUDGET`] questions of a command, then from one listing of
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
//!
//! [`client`] is the connection (configuration, request counters, error
//! classification); [`backend`] the region's files; [`lock`] the lock
//! protocol; [`chunks`] the chunk store.

pub mod backend;
pub mod chunks;
pub mod client;
pub mod lock;
