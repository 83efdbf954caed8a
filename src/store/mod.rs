//! The chunk store: where the stored form of blocks lives, and how chunks
//! are loaded and trusted.
//!
//! [`chunk_store`] is the [`chunk_store::ChunkStore`] trait every backend
//! implements (and the chunk key layout they share); [`local`] is the
//! local-directory backend (the S3 one is in `region::s3`, beside the rest
//! of that backend); [`chain`] loads chunks through their delta chains and
//! decides whether a stored chunk may be relied on; [`pool`] sizes the
//! worker pools; [`sealed`] is the view of a store through one
//! encryption key; [`files`] holds the atomic-write and small-file helpers
//! every local room uses.
//!
//! Uses `format` below it; nothing here knows about regions, snapshots or
//! images.

pub mod chain;
pub mod chunk_store;
pub mod files;
pub mod local;
pub mod pool;
pub mod sealed;
