//! Operations on the snapshots of a region, one file each: [`snapshot`]
//! (create, compare), [`restore`] (restore a volume), [`verify`] (verify a
//! volume against a snapshot), [`parent`] (a parent for a volume with no
//! lineage), [`gc`] (`store gc`), [`check`]
//! (`store verify`, `store stats`), [`access`] (who may use a snapshot: restore,
//! describe, delete, share), [`recycle`] (the recycle bin: retention rules,
//! binned snapshots, purging) and [`prune`] (`snapshot prune`: keep-last,
//! hourly, daily, weekly, monthly and yearly buckets).
//!
//! Uses `region`, `store`, `volume`, `format` and the foundation; the
//! image room above builds on these.

pub mod access;
pub mod check;
pub mod gc;
pub mod parent;
pub mod prune;
pub mod recycle;
pub mod restore;
pub mod snapshot;
pub mod verify;
