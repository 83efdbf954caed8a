//! The library's error type. Every message says what failed, on what, and,
//! where there is one, what to do about it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::id::{AccountId, ChunkId, ImageId, SnapshotId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Broad classes of failure; the binary maps them to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad argument or id: the caller should correct the command.
    Usage,
    /// A named object (volume, snapshot, chunk) does not exist.
    NotFound,
    /// Stored data failed verification: corrupt, truncated or missing.
    Integrity,
    /// The operation conflicts with existing state (target exists, store locked).
    Conflict,
    /// The acting account may not do this.
    Permission,
    /// Anything else, usually an I/O error from the system.
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot {op} {}: no space left on the device; free space there (`blocksnap store gc` \
         reclaims unused chunks) and retry",
        path.display()
    )]
    NoSpace { op: &'static str, path: PathBuf },

    #[error("volume {} does not exist: check the path", .0.display())]
    VolumeNotFound(PathBuf),

    #[error("{} is not a regular file or block device: blocksnap reads and writes only those", .0.display())]
    NotAVolume(PathBuf),

    #[error(
        "volume {} holds {size} bytes, more than the 64 TiB limit (EBS's largest volume): \
         blocksnap refuses larger volumes",
        path.display()
    )]
    VolumeTooLarge { path: PathBuf, size: u64 },

    #[error(
        "volume {} shrank while it was being read (ended before byte {offset}): \
         snapshot it when nothing is resizing it",
        path.display()
    )]
    VolumeShrank { path: PathBuf, offset: u64 },

    #[error(transparent)]
    InvalidId(#[from] crate::id::InvalidId),

    #[error("{0}")]
    InvalidArgument(String),

    /// What a command would create exists already (a region, an image
    /// name, an object id); the message names it.
    #[error("{0}")]
    AlreadyExists(String),

    /// An encryption key that may not be used: wrong passphrase, none
    /// given, not granted, disabled.
    #[error("{0}")]
    Key(String),

    /// The state of an object forbids the change (a locked retention rule,
    /// a snapshot an image in the recycle bin keeps); the message names it
    /// and what to do.
    #[error("{0}")]
    Conflict(String),

    /// The acting account may not touch an object of another account (a
    /// policy, a retention rule); the message names both.
    #[error("{0}")]
    Forbidden(String),

    /// Something named on the command line does not exist (a mapped
    /// snapshot or volume, an instance, a region); the message names it.
    #[error("{0}")]
    NotFound(String),

    #[error("{}", snapshot_not_found(id, region, *binned))]
    SnapshotNotFound {
        id: SnapshotId,
        region: String,
        /// It is in the recycle bin.
        binned: bool,
    },

    #[error(
        "parent {parent} uses {parent_block_size}-byte blocks but this snapshot asks for \
         {block_size}: a lineage keeps one block size, so drop --block-size or start a new \
         lineage without a parent"
    )]
    BlockSizeMismatch {
        parent: SnapshotId,
        parent_block_size: u32,
        block_size: u32,
    },

    #[error("chunk {} is corrupt: {reason}", chunk.short())]
    CorruptChunk { chunk: ChunkId, reason: String },

    /// A chunk in a format or codec this blocksnap does not know: not
    /// damage, so never moved aside.
    #[error(
        "chunk {} was written by a newer blocksnap ({detail}): upgrade blocksnap to read it",
        chunk.short()
    )]
    NewerChunk { chunk: ChunkId, detail: String },

    #[error("chunk {} is missing from the store", chunk.short())]
    MissingChunk { chunk: ChunkId },

    #[error(
        "chunk {} of {snapshot} (volume offset {offset}) {problem}: nothing more was written; \
         run `blocksnap store verify`",
        chunk.short()
    )]
    BadChunkInSnapshot {
        chunk: ChunkId,
        snapshot: SnapshotId,
        offset: u64,
        problem: String,
    },

    #[error("{what} {location} is damaged: {reason}")]
    CorruptFile {
        what: &'static str,
        location: Location,
        reason: String,
    },

    #[error(
        "{what} {location} was written by a newer blocksnap (format version {found}; this one \
         reads up to {supported}): upgrade blocksnap to use it"
    )]
    UnsupportedVersion {
        what: &'static str,
        location: Location,
        found: u32,
        supported: u32,
    },

    #[error("target {} already exists: pass --force to overwrite it, or --delta to update it in place", .0.display())]
    TargetExists(PathBuf),

    #[error(
        "device {} is in use (mounted, or held by another program): unmount or release it first",
        .0.display()
    )]
    DeviceBusy(PathBuf),

    #[error(
        "target {} holds {size} bytes but {snapshot} is {needed}: {outcome}",
        path.display()
    )]
    TargetSizeDiffers {
        path: PathBuf,
        size: u64,
        snapshot: SnapshotId,
        needed: u64,
        outcome: String,
    },

    #[error(
        "target {} holds {size} bytes but {snapshot} needs {needed}: use a larger device",
        path.display()
    )]
    TargetTooSmall {
        path: PathBuf,
        size: u64,
        needed: u64,
        snapshot: SnapshotId,
    },

    #[error("store {location} is locked by another blocksnap ({holder}): wait for it to finish")]
    Locked { location: Location, holder: String },

    #[error(
        "image {id} not found in region {region}: run `blocksnap image list` to see the images you can use there"
    )]
    ImageNotFound { id: ImageId, region: String },

    #[error("{0}")]
    InvalidImage(String),

    #[error("account {account} may not {action} {image}: {hint}")]
    NotPermitted {
        account: AccountId,
        action: &'static str,
        image: ImageId,
        hint: String,
    },

    #[error("account {account} may not {action} {snapshot}: {hint}")]
    SnapshotNotPermitted {
        account: AccountId,
        action: &'static str,
        snapshot: SnapshotId,
        hint: String,
    },

    #[error("image {0} is deregistered and cannot be launched or copied: use another image")]
    ImageDeregistered(ImageId),

    #[error("snapshot {snapshot} backs registered image {image}: deregister the image first")]
    SnapshotInUse {
        snapshot: SnapshotId,
        image: ImageId,
    },

    #[error(
        "snapshot {snapshot} is under lazy volume {overlay} on {host}, which still reads it: \
         terminate its instance or delete the overlay first (or hydrate it, snapshot it, and \
         delete the snapshot that then goes underneath instead)"
    )]
    SnapshotUnderLazyVolume {
        snapshot: SnapshotId,
        overlay: String,
        host: String,
    },

    #[error("{0}")]
    InvalidInstance(String),

    /// A request to an object store failed (after its retries).
    #[error("cannot {op} {location}: {reason}")]
    Remote {
        op: &'static str,
        location: String,
        reason: String,
        kind: ErrorKind,
        /// The client's own error, kept for callers that look deeper.
        #[source]
        source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
    },
}

fn snapshot_not_found(id: &SnapshotId, region: &str, binned: bool) -> String {
    match binned {
        true => format!(
            "snapshot {id} is in the recycle bin of region {region}: bring it back with \
             `blocksnap snapshot restore-from-recycle-bin {id}`"
        ),
        false => format!(
            "snapshot {id} not found in region {region}: run `blocksnap snapshot list` to see the \
             snapshots there"
        ),
    }
}

impl Error {
    /// "`what` `path` is damaged: reason", for a decoder to call with each
    /// reason it finds.
    pub(crate) fn corrupt_file(what: &'static str, at: &Location) -> impl Fn(String) -> Error {
        let location = at.clone();
        move |reason| Error::CorruptFile {
            what,
            location: location.clone(),
            reason,
        }
    }

    /// "chunk … is corrupt: reason", likewise.
    pub(crate) fn corrupt_chunk(chunk: ChunkId) -> impl Fn(String) -> Error {
        move |reason| Error::CorruptChunk { chunk, reason }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidId(_)
            | Error::InvalidArgument(_)
            | Error::BlockSizeMismatch { .. }
            | Error::InvalidImage(_)
            | Error::InvalidInstance(_)
            | Error::NotAVolume(_)
            | Error::VolumeTooLarge { .. } => ErrorKind::Usage,
            Error::VolumeNotFound(_)
            | Error::NotFound(_)
            | Error::SnapshotNotFound { .. }
            | Error::ImageNotFound { .. } => ErrorKind::NotFound,
            Error::NotPermitted { .. }
            | Error::SnapshotNotPermitted { .. }
            | Error::Key(_)
            | Error::Forbidden(_) => ErrorKind::Permission,
            Error::CorruptChunk { .. }
            | Error::MissingChunk { .. }
            | Error::BadChunkInSnapshot { .. }
            | Error::CorruptFile { .. } => ErrorKind::Integrity,
            Error::TargetExists(_)
            | Error::AlreadyExists(_)
            | Error::Conflict(_)
            | Error::DeviceBusy(_)
            | Error::TargetSizeDiffers { .. }
            | Error::TargetTooSmall { .. }
            | Error::Locked { .. }
            | Error::ImageDeregistered(_)
            | Error::SnapshotInUse { .. }
            | Error::SnapshotUnderLazyVolume { .. } => ErrorKind::Conflict,
            Error::Io { .. }
            | Error::NoSpace { .. }
            | Error::VolumeShrank { .. }
            | Error::UnsupportedVersion { .. }
            | Error::NewerChunk { .. } => ErrorKind::Other,
            Error::Remote { kind, .. } => *kind,
        }
    }
}

/// Where a file or an object lives, to name it in messages: a local path,
/// or an object's URL (`s3://BUCKET/PREFIX/KEY`), which is not a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Path(PathBuf),
    Url(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Url(u) => f.write_str(u),
        }
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Location {
        Location::Path(p.to_path_buf())
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Location {
        Location::Path(p)
    }
}

/// Attaches the operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, io::Error> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                Error::NoSpace {
                    op,
                    path: path.to_path_buf(),
                }
            } else {
                Error::Io {
                    op,
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
    }
}
