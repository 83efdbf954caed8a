//! Every byte layout blocksnap writes, each with its name or magic and
//! version: pure encode and decode, no I/O. The fuzz targets depend on
//! this room alone.
//!
//! | file                                     | format (magic or name)                  | version | module         |
//! |------------------------------------------|-----------------------------------------|---------|----------------|
//! | `chunks/<2 or 4 hex>/<64 hex>`           | `BSCK`, codecs 0 raw, 1 zstd, 2 delta, 3 page delta | 1; 2 sealed; 3 page delta, 4 sealed | [`chunk`]  |
//! | `snapshots/<snap>`                       | `BSNAPMAN`                              | 1; 2, 3 encrypted | [`manifest`] |
//! | `images/<ami>.json`                      | `blocksnap-image` ([`envelope`])        | 1; 2 with `Encrypted` | [`image`] |
//! | `keys/<key id>.json`                     | `blocksnap-key`                         | 1       | [`key`]        |
//! | a key file (outside the store)           | `blocksnap-key-file`                    | 1       | [`key`]        |
//! | `encryption.json` (a region's root)      | `blocksnap-encryption`                  | 1       | [`key`]        |
//! | `images/<ami>.launch.json`               | `blocksnap-launch-permissions`          | 1       | [`image`]      |
//! | `images/<ami>.state.json`                | `blocksnap-image-state`                 | 1       | [`image`]      |
//! | `snapshot-permissions/<snap>.json`       | `blocksnap-create-volume-permissions`   | 1       | [`image`]      |
//! | `snapshot-tags/<snap>.json`, `images/<ami>.tags.json` | `blocksnap-tags`          | 1       | [`image`]      |
//! | `store.json` (a region's root)           | `blocksnap-region`                      | 1; 2 two-digit fan-out | [`region`] |
//! | `regions.json` (the store's root)        | `blocksnap-regions`                     | 1       | [`regions`]    |
//! | `instance.json` (an instance directory)  | `blocksnap-instance` (absent: 1)        | 1, 2    | [`instance`]   |
//! | `FILE.dirty` (beside a writable overlay) | `BSDM`                                  | 1       | [`dirty_map`]  |
//! | `FILE.present` (beside an overlay)       | `BSPM`                                  | 1       | [`dirty_map`]  |
//! | control socket messages (not stored)     | JSON lines with `Version`               | 1       | [`control`]    |
//! | `leases/<snap>/<key>.json`               | `blocksnap-lease`                       | 1       | [`lease`]      |
//! | `policies/<policy>.json`                 | `blocksnap-lifecycle-policy`            | 1       | [`lifecycle`]  |
//! | `policies/<policy>.state.json`           | `blocksnap-lifecycle-policy-state`      | 1       | [`lifecycle`]  |
//! | `recycle-bin/rules/<rule>.json`          | `blocksnap-retention-rule`              | 1       | [`lifecycle`]  |
//! | `recycle-bin/{snapshots,images}/<id>.json` | `blocksnap-recycle-bin-entry`         | 1       | [`lifecycle`]  |
//! | `server/accounts.json` (the store's root) | JSON with `format`                     | 1       | `server::accounts` |
//! | `server/uploads/<snap>/start.json`, `blocks` | `blocksnap-upload`; lines `INDEX SHA256 KIND CHUNK RAW STORED` | 1 | `server::ebs` |
//!
//! # The rule: never modify, only add
//!
//! A released layout is frozen. A new codec, field or meaning is a new
//! version (a new chunk codec is a new chunk version too), and
//! `testdata/` keeps a fixture of every released version, decoded by a
//! test. A reader that meets a version or codec newer than it knows says
//! "written by a newer blocksnap: upgrade" ([`check_version`],
//! `Error::NewerChunk`), never "corrupt", and `store verify --repair`
//! never moves aside a chunk it cannot understand. A version older than
//! the reader's that was never written is damage, never a reason to
//! upgrade.

use crate::error::{Error, Location, Result};

pub mod chunk;
pub mod control;
pub mod dirty_map;
pub mod envelope;
pub mod image;
pub mod instance;
pub mod key;
pub mod lease;
pub mod lifecycle;
pub mod manifest;
pub mod nbd;
pub mod region;
pub mod regions;

/// Checks the `format` name and `version` a JSON file declares against
/// what this blocksnap reads.
pub fn check_format(
    what: &'static str,
    at: &Location,
    format: &str,
    expected: &str,
    version: u32,
    supported: u32,
) -> Result<()> {
    check_format_versions(what, at, format, expected, version, supported, supported)
}

/// [`check_format`] for a format of which versions `oldest..=supported`
/// were all written.
pub fn check_format_versions(
    what: &'static str,
    at: &Location,
    format: &str,
    expected: &str,
    version: u32,
    oldest: u32,
    supported: u32,
) -> Result<()> {
    if format != expected {
        return Err(Error::CorruptFile {
            what,
            location: at.clone(),
            reason: format!("format is {format:?}, expected {expected:?}"),
        });
    }
    check_versions(what, at, version, oldest, supported)
}

/// A format version newer than this blocksnap reads is "written by a newer
/// blocksnap"; an older one that no reader here knows is damage, never a
/// reason to upgrade.
pub fn check_version(
    what: &'static str,
    at: &Location,
    version: u32,
    supported: u32,
) -> Result<()> {
    check_versions(what, at, version, supported, supported)
}

/// [`check_version`] for a format of which versions `oldest..=supported`
/// were all written.
pub fn check_versions(
    what: &'static str,
    at: &Location,
    version: u32,
    oldest: u32,
    supported: u32,
) -> Result<()> {
    if version > supported {
        return Err(Error::UnsupportedVersion {
            what,
            location: at.clone(),
            found: version,
            supported,
        });
    }
    if version < oldest {
        return Err(Error::CorruptFile {
            what,
            location: at.clone(),
            reason: format!(
                "format version {version} was never written (this is version {supported})"
            ),
        });
    }
    Ok(())
}
