//! Snapshots used in place, without a restore: [`reader`] reads any byte
//! range of a snapshot, fetching and verifying only the chunks it touches
//! (with a bounded cache); [`overlay`] makes one writable: writes land in
//! an overlay file and a dirty map records which granules were written;
//! [`disk`] is either, or a plain file; [`nbd`] serves disks as NBD
//! exports (`volume serve`), [`fuse`] as files of a FUSE mount (`volume
//! mount`); [`snapshot`] snapshots overlays reading only their dirty
//! blocks; [`control`] lets other processes ask a server for that.
//!
//! Uses `ops` (who may read a snapshot, how blocks are stored), `region`,
//! `store`, `format` and the foundation; lazy instances (`image`) build on
//! it.

pub mod control;
pub mod disk;
pub mod fuse;
pub mod nbd;
pub mod overlay;
pub mod reader;
pub mod snapshot;
