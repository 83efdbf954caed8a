//! Snapshots used in place, without a restore: [`reader`] reads any byte
//! range of a snapshot, fetching and verifying only the chunks it touches
//! (with a bounded cache); [`nbd`] serves that as an NBD export
//! (`volume serve`); [`fuse`] as one file in a FUSE mount (`volume
//! mount`); [`overlay`] makes a served volume writable: writes land in
//! an overlay file and a dirty map records which granules were written.
//!
//! Uses `ops` (who may read a snapshot), `region`, `store`, `format` and
//! the foundation; images and instances will build lazy volumes on it.

pub mod fuse;
pub mod nbd;
pub mod overlay;
pub mod reader;
