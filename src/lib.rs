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
//! terminate) and [`copy`] (between regions) -> [`gc`] (gc and verify);
//! [`access`] decides who may use a snapshot, and [`settings`] holds the
//! tuning values the binary parses once.
//! [`region`] ties a region together over a [`backend::Backend`]: a local
//! directory, or a prefix of an S3 bucket ([`s3`], defined in
//! [`regions`]).
//!
//! # Block states
//!
//! Every block of a volume is one of: a **hole** (unallocated in a sparse
//! file; found with `SEEK_DATA`/`SEEK_HOLE`, never read), **zero** (read,
//! all zeros; recorded as a state, no chunk) or **data** (a chunk named by
//! the BLAKE3-256 of its raw bytes). Restoring leaves holes and zeros
//! unwritten in a file, so the result is sparse.
//!
//! # Locking and garbage collection
//!
//! A local region has a `lock` file taken with `flock(2)`; a region on an
//! object store has lock objects with the same shared/exclusive meaning
//! (the protocol, and how gc stays safe beside writers on other machines,
//! is in [`s3`]). Writers (snapshot
//! create, image create, image copy), readers (volume restore, volume
//! verify, store verify, instance launch) and snapshot delete hold it
//! shared; `store gc` holds it exclusive:
//!
//! | holding \ wants   | shared         | exclusive (gc) |
//! |-------------------|----------------|----------------|
//! | shared            | runs           | waits          |
//! | exclusive (gc)    | waits          | waits          |
//!
//! gc is mark and sweep under the exclusive lock: it reads every snapshot
//! manifest (refusing to sweep if one is unreadable), marks the chunks
//! they name, and deletes every other chunk and every leftover temporary
//! file. Because no writer runs meanwhile, a chunk that a snapshot being
//! created needs is either already named by a committed manifest or is
//! written after gc ends. A lock held by a process that died is released by
//! the kernel, so there is never a stale lock; gc records its pid, host
//! and start time in the file so a waiting command can name it. A command
//! waits up to a minute (`BLOCKSNAP_LOCK_WAIT`) for a conflicting lock,
//! then fails with exit code 5.
//!
//! # Durability
//!
//! A chunk is written to a temporary name and renamed, with no fsync of its
//! own. Before a snapshot manifest is written, [`store::ChunkStore::sync`]
//! (one `syncfs(2)` for the local store) makes every chunk durable,
//! including chunks another process wrote that this one found and reused.
//! A crash before that flush may leave a chunk missing or partial under its
//! final name, but no manifest names it; a later snapshot verifies any
//! chunk it finds before relying on it ([`chunk::present_and_sound`]) and
//! rewrites a damaged one. The manifest is then written to a temporary
//! name, fsynced and renamed, and its directory fsynced: the rename is the
//! commit point.
//!
//! The library never prints; progress goes through [`progress::Progress`].

// Only `sys` (wrappers over Linux calls std lacks) may use `unsafe`.
#![deny(unsafe_code)]

pub mod access;
pub mod backend;
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
pub mod regions;
pub mod restore;
pub mod s3;
pub mod settings;
pub mod snapshot;
pub mod store;
mod sys;
pub mod volume;

pub use error::{Error, ErrorKind, Result};
pub use id::{AccountId, ChunkId, ImageId, InstanceId, SnapshotId};
pub use manifest::{Block, Manifest, SnapshotMeta, SnapshotStats, Tag};
pub use region::Region;
pub use sys::{LockMode, default_sigpipe};
