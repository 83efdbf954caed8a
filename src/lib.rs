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
//! # Rooms
//!
//! ```text
//! cli (the binary)      parse, dispatch, print; exit codes
//!   server/             `serve`: accounts and keys, SigV4, the EBS direct API over HTTP
//!   lifecycle/          policies on a schedule, with retention (snapshots, images, copies)
//!   image/              AMIs and instances, built out of snapshot operations
//!   lazy/               snapshots used in place: a reader, overlays, NBD, FUSE, dirty-map snapshots
//!   ops/                operations on a region's snapshots, one file each
//!   region/             a region over a backend (local, s3/): catalog, images, permissions
//!   store/  volume/     chunks (trait, local, chains, pools) | the disk being read or written
//!   format/             every byte layout and its version: pure encode/decode
//! error id progress settings sys   the foundation every room may use
//! ```
//!
//! - [`format`](mod@format): chunk, snapshot manifest, JSON envelope, image files,
//!   `store.json`, `regions.json`, `instance.json`; the never-modify rule.
//! - [`store`]: the [`store::chunk_store::ChunkStore`] trait, the local
//!   chunk store, delta-chain loading, worker pools, file helpers.
//! - [`volume`]: opening, sizing and reading volumes; cutting them into
//!   blocks and hashing them in parallel.
//! - [`region`]: [`Region`] over a [`region::backend::Backend`], region
//!   definitions, the S3 backend, image and permission files.
//! - [`ops`]: snapshot, restore, volume verify, gc, store verify, access.
//! - [`lazy`]: a snapshot read in place (only the chunks a read touches,
//!   a bounded cache), made writable through an overlay and its dirty map,
//!   served over NBD (`volume serve`) or as FUSE files (`volume mount`),
//!   snapshotted from the dirty map, controlled over a socket.
//! - [`image`]: image rules, register/deregister, create, instances (lazy
//!   ones too), copy.
//! - [`lifecycle`]: policies that snapshot volumes and instances on a
//!   schedule, copy to another region and keep a count or an age.
//! - Foundation: [`error`], [`id`], [`progress`], [`settings`] (the tuning
//!   values the binary parses once), `sys` (the only `unsafe`).
//!
//! **Arrows point down.** A module may use the rooms below its own and
//! the foundation, and files of its own room that do not use it back: the
//! order is `lifecycle` → `image` → `lazy` → `ops` → `region` → `store` | `volume` → `format` →
//! foundation (`store` and `volume` are side by side and do not use each
//! other). A folder's `mod.rs` only declares its files, so no file is
//! reached through it. `scripts/check-layout.py` draws every file's
//! imports and fails on a cycle or an upward arrow; CI runs it.
//!
//! # Words
//!
//! - **store**: the directory a user points `--store` at; it holds the
//!   regions (and `regions.json`, which says which live on S3).
//! - **region**: one store of chunks, snapshot manifests and images, with
//!   its `store.json` (a name kept from the first release: it describes the
//!   region, [`format::region::RegionInfo`]).
//! - **chunk store**: where a region keeps its chunks
//!   ([`store::chunk_store::ChunkStore`]); the `store` room holds it.
//! - `blocksnap store gc|verify|stats` act on one region's chunks and
//!   manifests (the CLI's noun, kept for compatibility).
//!
//! # Block states
//!
//! Every block of a volume is one of: a **hole** (unallocated in a sparse
//! file; found with `SEEK_DATA`/`SEEK_HOLE`, never read), **zero** (read,
//! all zeros; recorded as a state, no chunk) or **data** (a chunk named by
//! the BLAKE3-256 of its raw bytes, keyed under an encryption key: see
//! [`format::key`] and [`store::sealed`]). Restoring leaves holes and zeros
//! unwritten in a file, so the result is sparse.
//!
//! # Locking and garbage collection
//!
//! A local region has a `lock` file taken with `flock(2)`; a region on an
//! object store has lock objects with the same shared/exclusive meaning
//! (the protocol, and how gc stays safe beside writers on other machines,
//! is in [`region::s3`]). Writers (snapshot
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
//! own. Before a snapshot manifest is written, [`store::chunk_store::ChunkStore::sync`]
//! (one `syncfs(2)` for the local store) makes every chunk durable,
//! including chunks another process wrote that this one found and reused.
//! A crash before that flush may leave a chunk missing or partial under its
//! final name, but no manifest names it; a later snapshot verifies any
//! chunk it finds before relying on it ([`store::chain::present_and_sound`]) and
//! rewrites a damaged one. The manifest is then written to a temporary
//! name, fsynced and renamed, and its directory fsynced: the rename is the
//! commit point.
//!
//! The library never prints; progress goes through [`progress::Progress`].

// Only `sys` (wrappers over Linux calls std lacks) may use `unsafe`.
#![deny(unsafe_code)]

pub mod error;
pub mod format;
pub mod id;
pub mod image;
pub mod lazy;
pub mod lifecycle;
pub mod ops;
pub mod progress;
pub mod region;
pub mod server;
pub mod settings;
pub mod store;
mod sys;
pub mod volume;

pub use error::{Error, ErrorKind, Result};
pub use format::manifest::{Block, Manifest, SnapshotMeta, SnapshotStats, Tag};
pub use id::{AccountId, ChunkId, ImageId, InstanceId, SnapshotId};
pub use region::catalog::Region;
pub use sys::{
    LockMode, default_sigpipe, detach_command, ignore_sigpipe, limit_malloc_arenas,
    read_secret_line, reuse_block_buffers,
};
