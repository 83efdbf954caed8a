//! `volume mount` and `instance attach`: volumes as files of a FUSE file
//! system, read in place: `DIR/volume.img` for a snapshot (read-only, or
//! writable through an overlay), `DIR/xvda.img`... for a lazy instance.
//!
//! Reads fetch, verify and decompress only the chunks they touch;
//! `lseek(SEEK_DATA/SEEK_HOLE)` answers from the manifest (and the
//! overlay's map), so `cp --sparse`, `qemu-img` and `e2fsck` skip holes
//! and zero blocks. A loop device over a file (`losetup`) mounts the
//! volume's file system.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::error::{Error, IoContext, Result};
use crate::id::{AccountId, SnapshotId};
use crate::lazy::disk::Disk;
use crate::lazy::nbd::ServeLog;
use crate::lazy::reader::DEFAULT_CACHE;
use crate::ops::access::readable;
use crate::region::catalog::Region;
use crate::sys::LockMode;

/// The one file of a `volume mount`.
pub const VOLUME_FILE: &str = "volume.img";
/// Attributes never change: the kernel may keep them.
const TTL: Duration = Duration::from_secs(3600);
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;
const FALLOC_FL_KEEP_SIZE: i32 = 1;
const FALLOC_FL_PUNCH_HOLE: i32 = 2;
const FALLOC_FL_ZERO_RANGE: i32 = 16;

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Bytes of decoded blocks kept in memory.
    pub cache: usize,
    /// Who mounts: the snapshot must be theirs, shared with them, or
    /// public. `None`: the region's owner.
    pub caller: Option<AccountId>,
    /// Writable: writes go to this overlay file (and its maps); `None`:
    /// read-only.
    pub overlay: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache: DEFAULT_CACHE,
            caller: None,
            overlay: None,
        }
    }
}

/// A file of the mount.
pub enum Entry {
    /// A volume.
    Disk(Arc<Disk>),
    /// Fixed bytes, read-only (an instance's `instance.json`).
    Bytes(Vec<u8>),
}

impl Entry {
    fn size(&self) -> u64 {
        match self {
            Entry::Disk(d) => d.size(),
            Entry::Bytes(b) => b.len() as u64,
        }
    }
}

/// Mounts snapshot `id` at `dir` as `DIR/volume.img` and serves it until
/// it is unmounted (`volume unmount DIR`, `fusermount3 -u DIR`, `umount
/// DIR`). Holds the region lock shared meanwhile, so `store gc` cannot
/// reclaim a chunk it reads.
pub fn mount(
    region: &Arc<Region>,
    id: &SnapshotId,
    dir: &Path,
    opts: &MountOptions,
    log: &'static dyn ServeLog,
) -> Result<()> {
    let caller = region.caller(opts.caller.as_ref());
    readable(region, id, &caller, "mount")?;
    check_mount_point(dir)?;
    let _lock = region.lock(LockMode::Shared, "volume mount")?;
    let disk = Disk::open(region, id, opts.overlay.as_deref(), opts.cache)?;
    let files = vec![(VOLUME_FILE.to_string(), Entry::Disk(Arc::new(disk)))];
    serve_files(dir, files, &format!("blocksnap:{id}"), log)
}

/// A mount point must be an existing directory.
pub fn check_mount_point(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "mount point {} is not a directory: create it first",
            dir.display()
        )));
    }
    Ok(())
}

/// Mounts `files` at `dir` and serves them until unmounted; writable where
/// their disk is. Interrupted or told to end (SIGINT, SIGTERM, SIGHUP),
/// the mount is taken down rather than left behind dead.
pub fn serve_files(
    dir: &Path,
    files: Vec<(String, Entry)>,
    fs_name: &str,
    log: &'static dyn ServeLog,
) -> Result<()> {
    let writable = files
        .iter()
        .any(|(_, e)| matches!(e, Entry::Disk(d) if d.writable()));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fs_name.to_string()),
        MountOption::Subtype("blocksnap".into()),
        MountOption::DefaultPermissions,
    ];
    if !writable {
        config.mount_options.push(MountOption::RO);
    }
    config.n_threads = Some(4);
    let fs = VolumeFs {
        files,
        created: SystemTime::now(),
        log,
    };
    let signals = crate::sys::block_termination().ctx("block signals", dir)?;
    let session = fuser::spawn_mount2(fs, dir, &config).ctx("mount FUSE file system at", dir)?;
    log.listening(&dir.display().to_string());
    let mountpoint = dir.to_path_buf();
    std::thread::spawn(move || {
        crate::sys::wait_termination(&signals);
        end_mount(&mountpoint);
    });
    session.join().ctx("serve FUSE file system at", dir)
}

/// Takes this process's mount at `dir` down, so that its session ends.
/// Lazily: a reader still holding a file keeps it until it lets go. A user
/// who may not unmount goes through fusermount3; failing that, ending the
/// process is still better than serving on.
pub fn end_mount(dir: &Path) {
    if !unmount_lazily(dir) {
        std::process::exit(1);
    }
}

/// Detaches the mount at `dir` (or asks fusermount3 to); whether it went.
fn unmount_lazily(dir: &Path) -> bool {
    crate::sys::unmount_lazily(dir).is_ok()
        || std::process::Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success())
}

/// Takes down the mount at `dir` if its server died (it answers every
/// call with `ENOTCONN`, "transport endpoint is not connected"), as a
/// killed `instance attach` leaves it; whether there was one.
pub fn clear_dead_mount(dir: &Path) -> bool {
    // Listing asks the server (attributes may come from the kernel's cache).
    let dead = matches!(std::fs::read_dir(dir), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    dead && unmount_lazily(dir)
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
    /// Inode 2 + i is file i.
    files: Vec<(String, Entry)>,
    created: SystemTime,
    log: &'static dyn ServeLog,
}

impl VolumeFs {
    fn entry(&self, ino: INodeNo) -> Option<&Entry> {
        let i = ino.0.checked_sub(2)?;
        self.files.get(usize::try_from(i).ok()?).map(|(_, e)| e)
    }

    fn disk(&self, ino: INodeNo) -> std::result::Result<&Disk, Errno> {
        match self.entry(ino) {
            Some(Entry::Disk(d)) => Ok(d),
            Some(Entry::Bytes(_)) => Err(Errno::EINVAL),
            None if ino == INodeNo::ROOT => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink, blksize) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o555, 0, 2, 4096)
        } else {
            let e = self.entry(ino)?;
            let (perm, blksize) = match e {
                Entry::Disk(d) if d.writable() => (0o644, d.block_size()),
                Entry::Disk(d) => (0o444, d.block_size()),
                Entry::Bytes(_) => (0o444, 4096),
            };
            (FileType::RegularFile, perm, e.size(), 1, blksize)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: crate::sys::effective_uid(),
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize,
        })
    }

    /// Errno for a failed write or flush, with one logged line.
    fn failed(&self, what: &str, e: Error) -> Errno {
        self.log.line(format!("{what} failed: {e}"));
        match e {
            Error::NoSpace { .. } => Errno::ENOSPC,
            _ => Errno::EIO,
        }
    }
}

impl Filesystem for VolumeFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self
            .files
            .iter()
            .position(|(n, _)| name == n.as_str())
            .and_then(|i| self.attr(INodeNo(i as u64 + 2)));
        match found {
            Some(a) if parent == INodeNo::ROOT => reply.entry(&TTL, &a, Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // A volume keeps its size and owner; times are ignored.
        if size.is_some_and(|s| s != a.size) || mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &a)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writable = match self.entry(ino) {
            Some(Entry::Disk(d)) => d.writable(),
            Some(Entry::Bytes(_)) => false,
            None if ino == INodeNo::ROOT => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY && !writable {
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
        let Some(entry) = self.entry(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let end = offset.saturating_add(size as u64).min(entry.size());
        let start = offset.min(end);
        match entry {
            Entry::Bytes(b) => reply.data(&b[start as usize..end as usize]),
            Entry::Disk(d) => {
                let mut buf = vec![0u8; (end - start) as usize];
                match d.read_at(start, &mut buf) {
                    Ok(()) => reply.data(&buf),
                    Err(e) => {
                        self.log.line(format!("read failed at offset {start}: {e}"));
                        reply.error(Errno::EIO)
                    }
                }
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let disk = match self.disk(ino) {
            Ok(d) if d.writable() => d,
            Ok(_) => return reply.error(Errno::EPERM),
            Err(e) => return reply.error(e),
        };
        // A volume does not grow.
        if offset.saturating_add(data.len() as u64) > disk.size() {
            return reply.error(Errno::ENOSPC);
        }
        match disk.write_at(offset, Some(data), data.len() as u64) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(self.failed("write", e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.disk(ino).map(|d| d.flush()) {
            Ok(Ok(())) => reply.ok(),
            Ok(Err(e)) => reply.error(self.failed("flush", e)),
            Err(_) => reply.ok(),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let disk = match self.disk(ino) {
            Ok(d) if d.writable() => d,
            Ok(_) => return reply.error(Errno::EPERM),
            Err(e) => return reply.error(e),
        };
        let end = offset.saturating_add(length);
        if end > disk.size() {
            return reply.error(if mode & FALLOC_FL_KEEP_SIZE != 0 {
                Errno::EINVAL
            } else {
                Errno::ENOSPC
            });
        }
        // Allocation is a no-op (every byte is there); punching or zeroing
        // a range writes zeros.
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) == 0 {
            return reply.ok();
        }
        match disk.write_at(offset, None, length) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.failed("write", e)),
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
        let disk = match self.disk(ino) {
            Ok(d) if at < d.size() => d,
            _ => return reply.error(Errno::ENXIO),
        };
        let found = match whence {
            SEEK_DATA => disk.next_data(at),
            SEEK_HOLE => disk.next_hole(at).map(Some),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(self.failed("seek", e)),
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
        ]
        .into_iter()
        .chain(
            self.files
                .iter()
                .enumerate()
                .map(|(i, (n, _))| (INodeNo(i as u64 + 2), FileType::RegularFile, n.as_str())),
        );
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}
