//! `volume mount`: a snapshot as one read-only file, `DIR/volume.img`, in a
//! FUSE file system, read in place.
//!
//! Reads fetch, verify and decompress only the chunks they touch;
//! `lseek(SEEK_DATA/SEEK_HOLE)` answers from the manifest, so `cp
//! --sparse`, `qemu-img` and `e2fsck` skip holes and zero blocks. A loop
//! device over the file (`losetup -r`) mounts the snapshot's file system.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyLseek, ReplyOpen, Request,
};

use crate::error::{Error, IoContext, Result};
use crate::id::{AccountId, SnapshotId};
use crate::lazy::nbd::ServeLog;
use crate::lazy::reader::{DEFAULT_CACHE, LazyVolume};
use crate::ops::access::readable;
use crate::region::catalog::Region;
use crate::sys::LockMode;

/// The one file of the mount.
pub const VOLUME_FILE: &str = "volume.img";
const FILE_INO: INodeNo = INodeNo(2);
/// Attributes never change: the kernel may keep them.
const TTL: Duration = Duration::from_secs(3600);
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Bytes of decoded blocks kept in memory.
    pub cache: usize,
    /// Who mounts: the snapshot must be theirs, shared with them, or
    /// public. `None`: the region's owner.
    pub caller: Option<AccountId>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache: DEFAULT_CACHE,
            caller: None,
        }
    }
}

/// Mounts snapshot `id` at `dir` and serves it until it is unmounted
/// (`volume unmount DIR`, `fusermount3 -u DIR`, `umount DIR`). Holds the
/// region lock shared meanwhile, so `store gc` cannot reclaim a chunk it
/// reads.
pub fn mount(
    region: &Arc<Region>,
    id: &SnapshotId,
    dir: &Path,
    opts: &MountOptions,
    log: &'static dyn ServeLog,
) -> Result<()> {
    let caller = region.caller(opts.caller.as_ref());
    readable(region, id, &caller, "mount")?;
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "mount point {} is not a directory: create it first",
            dir.display()
        )));
    }
    let _lock = region.lock(LockMode::Shared, "volume mount")?;
    let volume = LazyVolume::open(region.clone(), id, opts.cache)?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("blocksnap:{id}")),
        MountOption::Subtype("blocksnap".into()),
        MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(4);
    let fs = VolumeFs { volume, log };
    // Interrupted or told to end, the mount is taken down rather than
    // left behind dead ("transport endpoint is not connected").
    let signals = crate::sys::block_termination().ctx("block signals", dir)?;
    let session = fuser::spawn_mount2(fs, dir, &config).ctx("mount FUSE file system at", dir)?;
    log.listening(&dir.join(VOLUME_FILE).display().to_string());
    let mountpoint = dir.to_path_buf();
    std::thread::spawn(move || {
        crate::sys::wait_termination(&signals);
        // Lazily: a reader still holding the file keeps it until it lets
        // go. A user who may not unmount goes through fusermount3; failing
        // that, ending is still better than ignoring the signal.
        if crate::sys::unmount_lazily(&mountpoint).is_err() {
            let helped = std::process::Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&mountpoint)
                .status()
                .is_ok_and(|s| s.success());
            if !helped {
                std::process::exit(1);
            }
        }
    });
    session.join().ctx("serve FUSE file system at", dir)
}

/// Unmounts a `volume mount` at `dir`.
pub fn unmount(dir: &Path) -> Result<()> {
    crate::sys::unmount(dir).map_err(|e| {
        Error::InvalidArgument(format!(
            "cannot unmount {}: {e} (is it a blocksnap mount? `fusermount3 -u {}` also ends one)",
            dir.display(),
            dir.display()
        ))
    })
}

struct VolumeFs {
    volume: LazyVolume,
    log: &'static dyn ServeLog,
}

impl VolumeFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o555, 0, 2),
            FILE_INO => (FileType::RegularFile, 0o444, self.volume.size(), 1),
            _ => return None,
        };
        let created = UNIX_EPOCH + Duration::from_nanos(self.volume.meta().created_ns);
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: created,
            mtime: created,
            ctime: created,
            crtime: created,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: self.volume.meta().block_size,
        })
    }
}

impl Filesystem for VolumeFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(a) if parent == INodeNo::ROOT && name == VOLUME_FILE => {
                reply.entry(&TTL, &a, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = offset.saturating_add(size as u64).min(self.volume.size());
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        match self.volume.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(failure) => {
                self.log.line(format!("read failed: {failure}"));
                reply.error(Errno::EIO)
            }
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(at) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        if ino != FILE_INO || at >= self.volume.size() {
            return reply.error(Errno::ENXIO);
        }
        let found = match whence {
            SEEK_DATA => self.volume.next_data(at),
            SEEK_HOLE => Some(self.volume.next_hole(at)),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Some(o) => reply.offset(o as i64),
            None => reply.error(Errno::ENXIO),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, VOLUME_FILE),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}
