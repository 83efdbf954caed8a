//! A region: one store of chunks, snapshots and images, kept on a
//! [`backend::Backend`] (a local directory, or a prefix of an S3 bucket).
//!
//! [`catalog`] is the [`catalog::Region`] itself (opening a region,
//! reading and committing snapshot manifests, its locks); [`backend`] the
//! trait a region's files go through and the local backend; [`defs`] the
//! region names a store defines (`regions.json`); [`s3`] the object-store
//! backend; [`images`] the image files a region holds; [`permissions`]
//! grants and the snapshot permission files; [`recycle`] the recycle
//! bin's rules and entries; [`keys`] the region's
//! encryption keys and the keyring that unlocks them.
//!
//! Uses `store`, `format` and the foundation; knows no operation.

pub mod backend;
pub mod catalog;
pub mod defs;
pub mod images;
pub mod keys;
pub mod permissions;
pub mod recycle;
pub mod s3;
