//! blocksnap: block-level, incremental snapshots of raw disk images and
//! block devices into a content-addressed chunk store, modelled on Amazon
//! EBS snapshots.
//!
//! # Data flow
//!
//! ```text
//! volume ──read──▶ blocks ──hash (rayon, BLAKE3)──▶ digests ──▶ zero / unchanged vs parent / known / new
//!                                                                │
//!                                        new ──zstd──▶ chunk store (atomic, idempotent)
//!                                                                │
//!                     snapshot manifest (written LAST: the commit point) ◀──┘
//! snapshot manifest ──▶ restore (parallel fetch, decompress, verify, pwrite)
//! ```
//!
//! The modules follow it: [`volume`] (size, holes, reads) -> [`chunker`]
//! (blocks, zero detection, parallel hashing) -> [`chunk`] (the stored
//! form of one block) -> [`store`] (the [`store::ChunkStore`] trait and the
//! local backend) -> [`manifest`] (the snapshot format) -> [`snapshot`]
//! (create, compare) -> [`restore`] -> [`image`] (AMI manifests, launch
//! permissions, deregistration), [`image_create`], [`instance`] (launch,
//! terminate) and [`copy`] (between regions) -> [`gc`] (gc and verify).
//! [`region`] ties a store directory together.
//!
//! # Block states
//!
//! Every block of a volume is one of: a **hole** (unallocated in a sparse
//! file; found with `SEEK_DATA`/`SEEK_HOLE`, never read), **zero** (read,
//! all zeros; recorded as a state, no chunk) or **data** (a chunk named by
//! the BLAKE3-256 of its raw bytes). Restoring leaves holes and zeros
//! unwritten in a file, so the result is sparse.
//!
//! # Durability
//!
//! Each file is written to a unique temporary name, fsynced and renamed.
//! Chunk directories are fsynced before the manifest that names them is
//! written, and the manifest's rename is the commit point: a crash leaves
//! either no snapshot or a complete one. Leftover temporary files and
//! unreferenced chunks are removed by `store gc`.
//!
//! # Locking
//!
//! Each region has a `lock` file taken with `flock(2)`:
//!
//! | command                         | lock      | runs beside              |
//! |---------------------------------|-----------|--------------------------|
//! | snapshot create, restore, verify, delete | shared | each other          |
//! | store gc                        | exclusive | nothing                  |
//!
//! A lock held by a process that died is released by the kernel, so there is
//! no stale lock to clean up. A command waits up to a minute for a
//! conflicting lock, then fails naming the holder.
//!
//! The library never prints; progress goes through [`progress::Progress`].

pub mod chunk;
pub mod chunker;
pub mod copy;
pub mod error;
#[cfg(test)]
mod faults;
pub mod gc;
#[cfg(test)]
mod hostile;
pub mod id;
pub mod image;
pub mod image_create;
pub mod instance;
pub mod manifest;
pub mod progress;
pub mod region;
pub mod restore;
pub mod snapshot;
pub mod store;
mod sys;
pub mod volume;

pub use error::{Error, ErrorKind, Result};
pub use id::{AccountId, ChunkId, ImageId, InstanceId, SnapshotId};
pub use manifest::{Block, Manifest, SnapshotMeta, SnapshotStats, Tag};
pub use region::Region;
pub use sys::LockMode;
