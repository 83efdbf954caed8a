//! `volume restore`: snapshot -> verified blocks -> target file or device.
//!
//! Planning looks at the target (new file, existing file, block device,
//! delta) and decides which blocks to write; execution fetches, decodes,
//! verifies and `pwrite`s them on the worker pool.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::format::manifest::{Block, Manifest};
use crate::id::Namer;
use crate::id::{AccountId, SnapshotId};
use crate::ops::access::readable;
use crate::ops::verify::holds;
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::store::chain::load_into;
use crate::store::chunk_store::ChunkStore;
use crate::store::files::{sync_dir, temp_path_for};
use crate::store::pool::{Work, thread_pool_for};
use crate::sys::{self, LockMode};
use crate::volume::blocks::{BlockPos, Content, Cut, scan};
use crate::volume::io::{self as volume, Volume, is_zero};
use crate::volume::nbd::{NbdClient, is_nbd_uri};
use crate::volume::qemu::{self, QemuExport};

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Replace an existing file target.
    pub force: bool,
    /// Update an existing target in place, writing only differing blocks.
    pub delta: bool,
    /// Size of the restored volume; at least the snapshot's size.
    pub size: Option<u64>,
    /// A block-device target already reads as zeros: skip zero blocks.
    pub assume_zeroed: bool,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Who restores: the snapshot must be theirs, shared with them, or
    /// public. `None`: the region's owner (the default account).
    pub caller: Option<AccountId>,
    /// A new target is created as an image in this qemu format (`qcow2`,
    /// …) and written through a private `qemu-nbd`; `None` or `raw`: a raw
    /// file. An existing target in a qemu format is always written so.
    pub format: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub snapshot: SnapshotId,
    pub target: PathBuf,
    pub target_size: u64,
    pub delta: bool,
    /// Blocks written to the target (data, or zeros over stale data).
    pub blocks_written: u64,
    /// Blocks left as they were: equal already (delta), or zero on a
    /// sparse file or a zeroed device.
    pub blocks_skipped: u64,
    pub bytes_written: u64,
}

/// Granularity at which zero runs inside a data block are left as holes in
/// a new file target.
const SPARSE_PAGE: usize = 4096;

/// Restores snapshot `id` of `region` to `target`, if `opts.caller` may
/// (CreateVolume: the owner, an account it is shared with, or anyone when
/// it is public).
pub fn restore(
    region: &Region,
    id: &SnapshotId,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let caller = region.caller(opts.caller.as_ref());
    let meta = readable(region, id, &caller, "restore")?;
    let pool = thread_pool_for(region.chunks(), opts.threads, Work::Fetch)?;
    progress.start("restore", meta.volume_size);
    let report = restore_in(region, id, target, opts, &pool, progress)?;
    progress.finish();
    Ok(report)
}

/// [`restore`] on a caller's pool (`opts.threads` is ignored), reporting
/// progress without starting or finishing a phase: several restores can
/// share one pool and one progress bar. For callers that have authorised
/// the restore another way (an instance launch, by the image's launch
/// permission): `opts.caller` is not checked.
pub fn restore_in(
    region: &Region,
    id: &SnapshotId,
    target: &Path,
    opts: &RestoreOptions,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let _lock = region.lock(LockMode::Shared, "volume restore")?;
    let manifest = region.read_snapshot(id)?;
    let keyed = region.chunks_for(&manifest.meta)?;
    let source = Stored {
        store: &keyed,
        manifest: &manifest,
    };
    refuse_store_paths(region, target)?;
    restore_from(&source, target, opts, pool, progress)
}

/// Where a restore's blocks come from: a snapshot's manifest and chunks in
/// a region, or a server's EBS direct API.
pub trait BlockSource: Sync {
    fn snapshot(&self) -> &SnapshotId;
    fn volume_size(&self) -> u64;
    fn block_size(&self) -> u32;
    fn block_count(&self) -> usize;
    /// Block `index` holds data; any other reads as zeros.
    fn has_data(&self, index: usize) -> bool;
    /// Reads the data block at `pos` into `buf`, verified.
    fn fetch(&self, pos: BlockPos, buf: &mut Vec<u8>) -> Result<()>;
    /// How a delta restore names the target's blocks for [`Self::holds`].
    fn namer(&self) -> Namer;
    /// The target's block `index`, read as `content`, is already this one.
    fn holds(&self, index: usize, content: &Content<'_>) -> bool;
}

/// A snapshot of a region, read from its chunk store.
struct Stored<'a> {
    store: &'a dyn ChunkStore,
    manifest: &'a Manifest,
}

impl BlockSource for Stored<'_> {
    fn snapshot(&self) -> &SnapshotId {
        &self.manifest.meta.id
    }

    fn volume_size(&self) -> u64 {
        self.manifest.meta.volume_size
    }

    fn block_size(&self) -> u32 {
        self.manifest.meta.block_size
    }

    fn block_count(&self) -> usize {
        self.manifest.blocks.len()
    }

    fn has_data(&self, index: usize) -> bool {
        matches!(self.manifest.blocks[index], Block::Data(_))
    }

    /// Fetches, decodes and verifies the chunk of the block at `pos`.
    fn fetch(&self, pos: BlockPos, buf: &mut Vec<u8>) -> Result<()> {
        let Block::Data(id) = &self.manifest.blocks[pos.index as usize] else {
            unreachable!("only data blocks are fetched");
        };
        let problem = |e: Error| match e {
            Error::MissingChunk { .. } => "is missing from the store".to_string(),
            Error::CorruptChunk { reason, .. } => format!("is corrupt ({reason})"),
            other => other.to_string(),
        };
        let bad = |problem: String| Error::BadChunkInSnapshot {
            chunk: *id,
            snapshot: self.manifest.meta.id.clone(),
            offset: pos.offset,
            problem,
        };
        match load_into(self.store, id, buf) {
            Ok(_) if buf.len() == pos.len => Ok(()),
            Ok(_) => Err(bad(format!(
                "holds {} bytes for a {}-byte block",
                buf.len(),
                pos.len
            ))),
            Err(e @ (Error::MissingChunk { .. } | Error::CorruptChunk { .. })) => {
                Err(bad(problem(e)))
            }
            Err(e) => Err(e),
        }
    }

    fn namer(&self) -> Namer {
        self.store.namer()
    }

    fn holds(&self, index: usize, content: &Content<'_>) -> bool {
        holds(&self.manifest.blocks[index], content)
    }
}

/// Restores what `source` holds to `target` on `pool`, as
/// [`restore_in`] does, for any source; the caller has checked the
/// restore is allowed and that `target` is outside its store.
pub fn restore_from(
    source: &dyn BlockSource,
    target: &Path,
    opts: &RestoreOptions,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let id = source.snapshot();
    let snap_size = source.volume_size();
    let size = opts.size.unwrap_or(snap_size);
    if size < snap_size {
        return Err(Error::InvalidArgument(format!(
            "--size {size} is smaller than {id}'s volume of {snap_size} bytes: give at least {snap_size}"
        )));
    }
    volume::check_size(target, size)?;
    let job = Job {
        source,
        pool,
        progress,
    };
    let mut report = RestoreReport {
        snapshot: id.clone(),
        target: target.to_path_buf(),
        target_size: size,
        delta: opts.delta,
        blocks_written: 0,
        blocks_skipped: 0,
        bytes_written: 0,
    };
    if let Some(uri) = target.to_str().filter(|s| is_nbd_uri(s)) {
        return restore_nbd(&job, uri, size, opts, report);
    }
    let wanted = opts.format.as_deref().filter(|f| *f != "raw");
    match (qemu::detect_format(target)?, wanted) {
        (Some(format), _) => {
            // An existing image: replaced only as a file would be.
            if !opts.delta && !opts.force {
                return Err(Error::TargetExists(target.to_path_buf()));
            }
            let export = QemuExport::start(target, &format, true, None)?;
            return restore_nbd(&job, export.uri(), size, opts, report);
        }
        (None, Some(format)) if !target.exists() => {
            if opts.delta {
                return Err(Error::NotFound(format!(
                    "--delta target {} does not exist: drop --delta to restore into a new image",
                    target.display()
                )));
            }
            qemu::create_image(target, format, size)?;
            let fresh = RestoreOptions {
                assume_zeroed: true,
                ..opts.clone()
            };
            let done = QemuExport::start(target, format, true, None)
                .and_then(|export| restore_nbd(&job, export.uri(), size, &fresh, report));
            if done.is_err() {
                let _ = fs::remove_file(target);
            }
            return done;
        }
        (None, Some(format)) => {
            return Err(Error::InvalidArgument(format!(
                "{} exists and is no {format} image: --format creates a new image; give a new \
                 path",
                target.display()
            )));
        }
        (None, None) => {}
    }

    let existing = match fs::metadata(target) {
        Ok(md) => Some(md.file_type()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).ctx("stat restore target", target),
    };
    match existing {
        None if opts.delta => {
            return Err(Error::NotFound(format!(
                "--delta target {} does not exist: drop --delta to restore into a new file",
                target.display()
            )));
        }
        Some(ft) if ft.is_block_device() => {
            if !opts.delta && !opts.force {
                return Err(Error::TargetExists(target.to_path_buf()));
            }
            let file = open_device(target)?;
            let (_, dev_size) = volume::probe(&file, target)?;
            if dev_size > size && !opts.force {
                return Err(Error::TargetSizeDiffers {
                    path: target.to_path_buf(),
                    size: dev_size,
                    snapshot: id.clone(),
                    needed: size,
                    outcome: format!(
                        "bytes {size} to {dev_size} of the device would be left as they are; pass \
                         --force to go ahead"
                    ),
                });
            }
            if dev_size < size {
                return Err(Error::TargetTooSmall {
                    path: target.to_path_buf(),
                    size: dev_size,
                    needed: size,
                    snapshot: id.clone(),
                });
            }
            report.target_size = dev_size;
            let out = Out::Device {
                file: &file,
                path: target,
            };
            if opts.delta {
                job.delta(&Volume::open(target)?, &out, &mut report)?;
            } else {
                job.full(&out, !opts.assume_zeroed, &mut report)?;
            }
            file.sync_all().ctx("flush", target)?;
        }
        Some(ft) if ft.is_file() && opts.delta => {
            let file = volume::open_rw(target)?;
            let file_size = file.metadata().ctx("stat restore target", target)?.len();
            if file_size != size && opts.size.is_none() && !opts.force {
                let outcome = if file_size > size {
                    format!(
                        "--delta would cut it to {size} bytes, dropping its last {} bytes; pass \
                         --force to do so, or --size {file_size} to keep its size",
                        file_size - size
                    )
                } else {
                    format!(
                        "--delta would grow it to {size} bytes; pass --force to do so, or --size \
                         to choose the size"
                    )
                };
                return Err(Error::TargetSizeDiffers {
                    path: target.to_path_buf(),
                    size: file_size,
                    snapshot: id.clone(),
                    needed: size,
                    outcome,
                });
            }
            // Shrinking drops stale bytes past the end; growing adds a hole.
            file.set_len(snap_size).ctx("resize", target)?;
            file.set_len(size).ctx("resize", target)?;
            let out = Out::File {
                file: &file,
                path: target,
                sparse: false,
            };
            job.delta(&Volume::open(target)?, &out, &mut report)?;
            file.sync_all().ctx("flush", target)?;
        }
        Some(ft) if ft.is_file() && !opts.force => {
            return Err(Error::TargetExists(target.to_path_buf()));
        }
        Some(ft) if !ft.is_file() => return Err(Error::NotAVolume(target.to_path_buf())),
        _ => {
            // A new file: written under a temporary name and renamed into
            // place only when complete.
            let tmp = TempFile::create(target)?;
            tmp.file.set_len(size).ctx("size", &tmp.path)?;
            let out = Out::File {
                file: &tmp.file,
                path: &tmp.path,
                sparse: true,
            };
            job.full(&out, false, &mut report)?;
            // Without --force, a file that appeared at the target meanwhile
            // is never replaced.
            tmp.commit(target, opts.force)?;
        }
    }
    Ok(report)
}

struct Job<'a> {
    source: &'a dyn BlockSource,
    pool: &'a rayon::ThreadPool,
    progress: &'a dyn Progress,
}

impl Job<'_> {
    fn block_pos(&self, index: usize) -> BlockPos {
        let bs = self.source.block_size() as u64;
        let offset = index as u64 * bs;
        BlockPos {
            index: index as u64,
            offset,
            len: (self.source.volume_size() - offset).min(bs) as usize,
        }
    }

    /// Writes every block into a target whose current content is ignored:
    /// data blocks always, zero and hole blocks only with `write_zeros`.
    fn full(&self, out: &Out, write_zeros: bool, report: &mut RestoreReport) -> Result<()> {
        let count = self.source.block_count();
        let work: Vec<usize> = (0..count)
            .filter(|&i| write_zeros || self.source.has_data(i))
            .collect();
        // Workers fetch and decode in parallel but take turns writing to a
        // file: concurrent buffered writes to one file contend on its inode
        // lock and burn CPU spinning on it. NBD connections write side by
        // side.
        let writer = std::sync::Mutex::new(());
        let bytes: u64 = self.pool.install(|| {
            work.par_iter()
                .map_init(Vec::new, |buf, &i| {
                    let pos = self.block_pos(i);
                    if self.source.has_data(i) {
                        self.source.fetch(pos, buf)?;
                        let _turn = out
                            .serial()
                            .then(|| writer.lock().unwrap_or_else(|p| p.into_inner()));
                        out.data(buf, pos.offset)?;
                    } else {
                        let _turn = out
                            .serial()
                            .then(|| writer.lock().unwrap_or_else(|p| p.into_inner()));
                        out.zeros(pos.offset, pos.len as u64)?;
                    }
                    out.written(pos.offset, pos.len as u64);
                    self.progress.advance(pos.len as u64);
                    Ok::<u64, Error>(pos.len as u64)
                })
                .try_reduce(|| 0, |a, b| Ok(a + b))
        })?;
        report.blocks_written = work.len() as u64;
        report.blocks_skipped = (count - work.len()) as u64;
        report.bytes_written = bytes;
        Ok(())
    }

    /// Hashes each block of the target (read as `reader`) and rewrites
    /// only those that differ.
    fn delta(&self, reader: &Volume, out: &Out, report: &mut RestoreReport) -> Result<()> {
        let snap_size = self.source.volume_size();
        let mut written = 0u64;
        let mut bytes = 0u64;
        scan(
            reader,
            Cut {
                len: snap_size,
                block_size: self.source.block_size(),
                namer: self.source.namer(),
                map: true,
            },
            self.pool,
            self.progress,
            |pos, content| -> Result<u64> {
                let index = pos.index as usize;
                if self.source.holds(index, &content) {
                    return Ok(0);
                }
                if self.source.has_data(index) {
                    let mut buf = Vec::new();
                    self.source.fetch(pos, &mut buf)?;
                    out.data(&buf, pos.offset)?;
                } else {
                    out.zeros(pos.offset, pos.len as u64)?;
                }
                Ok(pos.len as u64)
            },
            |_, n| {
                if n > 0 {
                    written += 1;
                    bytes += n;
                }
                Ok(())
            },
        )?;
        report.blocks_written = written;
        report.blocks_skipped = self.source.block_count() as u64 - written;
        report.bytes_written = bytes;
        Ok(())
    }
}

/// Where restored blocks go.
enum Out<'a> {
    /// A regular file; `sparse`: a new one, whose zero pages are left as
    /// holes.
    File {
        file: &'a File,
        path: &'a Path,
        sparse: bool,
    },
    Device {
        file: &'a File,
        path: &'a Path,
    },
    Nbd(&'a NbdClient),
}

impl Out<'_> {
    /// Whether writers must take turns.
    fn serial(&self) -> bool {
        !matches!(self, Out::Nbd(_))
    }

    fn data(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Out::File {
                file,
                path,
                sparse: true,
            } => write_sparse(file, path, buf, offset),
            Out::File { file, path, .. } | Out::Device { file, path } => {
                file.write_all_at(buf, offset).ctx("write", path)
            }
            Out::Nbd(c) => c.write(offset, buf),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros: a hole where the file
    /// system or server can make one, written zeros otherwise.
    fn zeros(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Out::File { file, path, .. } => {
                if sys::punch_hole(file, offset, len).is_ok() {
                    return Ok(());
                }
                file.write_all_at(&vec![0u8; len as usize], offset)
                    .ctx("write", path)
            }
            Out::Device { file, path } => file
                .write_all_at(&vec![0u8; len as usize], offset)
                .ctx("write", path),
            Out::Nbd(c) => c.write_zeroes(offset, len),
        }
    }

    /// After a block is written: start its writeback (a file or device).
    fn written(&self, offset: u64, len: u64) {
        if let Out::File { file, .. } | Out::Device { file, .. } = self {
            sys::start_writeback(file, offset, len);
        }
    }
}

/// Restores into the NBD export at `uri` (`qemu-nbd` over a qcow2, say):
/// data blocks written, zero and hole blocks written as zeros
/// (`WRITE_ZEROES`) unless `--assume-zeroed`, or with `--delta` only the
/// blocks that differ; flushed before success is reported.
fn restore_nbd(
    job: &Job,
    uri: &str,
    size: u64,
    opts: &RestoreOptions,
    mut report: RestoreReport,
) -> Result<RestoreReport> {
    let target = Volume::open_nbd(uri, &[])?;
    let client = target.nbd().expect("an NBD volume");
    if client.read_only() {
        return Err(Error::InvalidArgument(format!(
            "{uri} is exported read-only: export it writable (qemu-nbd without -r)"
        )));
    }
    let have = client.size();
    let id = job.source.snapshot();
    if have < size {
        return Err(Error::TargetTooSmall {
            path: PathBuf::from(uri),
            size: have,
            needed: size,
            snapshot: id.clone(),
        });
    }
    if have > size && !opts.force {
        return Err(Error::TargetSizeDiffers {
            path: PathBuf::from(uri),
            size: have,
            snapshot: id.clone(),
            needed: size,
            outcome: format!(
                "bytes {size} to {have} of the export would be left as they are; pass --force to \
                 go ahead"
            ),
        });
    }
    report.target_size = have;
    let out = Out::Nbd(client);
    if opts.delta {
        job.delta(&target, &out, &mut report)?;
    } else {
        job.full(&out, !opts.assume_zeroed, &mut report)?;
    }
    client.flush()?;
    Ok(report)
}

/// Writes `data` at `offset`, skipping 4 KiB pages that are all zeros, so a
/// freshly sized file stays sparse where the source was.
fn write_sparse(file: &File, path: &Path, data: &[u8], offset: u64) -> Result<()> {
    let mut start = 0;
    while start < data.len() {
        // Skip zero pages.
        while start < data.len() && is_zero(&data[start..(start + SPARSE_PAGE).min(data.len())]) {
            start += SPARSE_PAGE;
        }
        if start >= data.len() {
            break;
        }
        let mut end = start;
        while end < data.len() && !is_zero(&data[end..(end + SPARSE_PAGE).min(data.len())]) {
            end += SPARSE_PAGE;
        }
        let end = end.min(data.len());
        file.write_all_at(&data[start..end], offset + start as u64)
            .ctx("write", path)?;
        start = end;
    }
    Ok(())
}

/// Refuses a target inside the region's own directory: a careless
/// `--force` there would overwrite a chunk or manifest.
fn refuse_store_paths(region: &Region, target: &Path) -> Result<()> {
    let Some(root) = region.backend().local_root() else {
        return Ok(());
    };
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (Ok(root), Ok(dir)) = (fs::canonicalize(root), fs::canonicalize(dir)) else {
        return Ok(());
    };
    if dir.starts_with(&root) {
        return Err(Error::InvalidArgument(format!(
            "target {} is inside region {}'s store ({}): restore somewhere else",
            target.display(),
            region.name(),
            root.display()
        )));
    }
    Ok(())
}

/// Opens a block device for writing with `O_EXCL`: the kernel refuses a
/// device that is mounted or claimed by another exclusive opener.
fn open_device(path: &Path) -> Result<File> {
    match sys::open_nonblocking(path, true, true) {
        Ok(f) => {
            sys::set_blocking(&f).ctx("open for writing", path)?;
            Ok(f)
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(Error::DeviceBusy(path.to_path_buf()))
        }
        Err(e) => Err(e).ctx("open for writing", path),
    }
}

/// A file being restored under a temporary name; removed unless committed.
struct TempFile {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    fn create(target: &Path) -> Result<TempFile> {
        let path = temp_path_for(target);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx("create", &path)?;
        Ok(TempFile {
            path,
            file,
            committed: false,
        })
    }

    fn commit(mut self, target: &Path, replace: bool) -> Result<()> {
        self.file.sync_all().ctx("flush", &self.path)?;
        if replace {
            fs::rename(&self.path, target).ctx("rename into place", target)?;
        } else {
            match sys::rename_noreplace(&self.path, target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(Error::TargetExists(target.to_path_buf()));
                }
                Err(e) => return Err(e).ctx("rename into place", target),
            }
        }
        self.committed = true;
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(parent)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}
