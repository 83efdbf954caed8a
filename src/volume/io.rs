//! Volumes: raw image files, block devices and NBD exports. Finds their
//! size, where their holes are, and reads their blocks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::format::nbd::{BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, STATE_ZERO};
use crate::sys;
use crate::volume::nbd::{NbdClient, NbdUri, is_nbd_uri};
use crate::volume::qemu::{self, QemuExport};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    File,
    BlockDevice,
    /// An NBD export (`nbd://…`, `nbd+unix://…`).
    Nbd,
}

#[derive(Debug)]
enum Source {
    File(File),
    Nbd(NbdClient),
}

/// An open volume, read-only.
#[derive(Debug)]
pub struct Volume {
    /// The path, or the NBD URI.
    path: PathBuf,
    source: Source,
    size: u64,
    kind: VolumeKind,
    /// Size and modification time when opened, to tell whether the volume
    /// was written while it was read.
    stamp: (u64, Option<std::time::SystemTime>),
    /// The `qemu-nbd` serving an image in a qemu format (last: it stops
    /// after the client has said goodbye).
    _export: Option<QemuExport>,
}

impl Volume {
    /// Opens `path` for reading and finds its size: `BLKGETSIZE64` for a
    /// block device, the file length for a regular file.
    pub fn open(path: &Path) -> Result<Volume> {
        if let Some(uri) = path.to_str().filter(|s| is_nbd_uri(s)) {
            return Volume::open_nbd(uri, &[]);
        }
        if let Some(format) = qemu::detect_format(path)? {
            return Volume::open_image(path, &format, None);
        }
        // Non-blocking, so a FIFO is refused by its type instead of
        // hanging the open until a writer appears.
        let file = match sys::open_nonblocking(path, false, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::VolumeNotFound(path.to_path_buf()));
            }
            Err(e) => return Err(e).ctx("open volume", path),
        };
        let (kind, size) = probe(&file, path)?;
        sys::set_blocking(&file).ctx("open volume", path)?;
        check_size(path, size)?;
        let stamp = stamp(&file, path)?;
        Ok(Volume {
            path: path.to_path_buf(),
            source: Source::File(file),
            size,
            kind,
            stamp,
            _export: None,
        })
    }

    /// Opens the image in qemu format `format` at `path` through a private
    /// `qemu-nbd` (exporting its persistent dirty bitmap `bitmap`).
    pub fn open_image(path: &Path, format: &str, bitmap: Option<&str>) -> Result<Volume> {
        let export = QemuExport::start(path, format, false, bitmap)?;
        let extra: Vec<String> = bitmap
            .map(|b| format!("{DIRTY_BITMAP_PREFIX}{b}"))
            .into_iter()
            .collect();
        let mut v = Volume::open_nbd(export.uri(), &extra)?;
        v.path = path.to_path_buf();
        v._export = Some(export);
        Ok(v)
    }

    /// Connects to the NBD export at `uri`, asking for `base:allocation`
    /// (holes and zeros are not read) and the meta contexts `extra`.
    /// Requests are pipelined, so one connection keeps a server busy; a
    /// further one per four cores (up to 8) where the server allows several
    /// (on 2 cores, a second connection made `qemu-nbd` slower: 0.68–0.78×
    /// the file's throughput against 0.91–1.04× with one).
    pub fn open_nbd(uri: &str, extra: &[String]) -> Result<Volume> {
        let parsed = NbdUri::parse(uri)?;
        let mut contexts = vec![BASE_ALLOCATION.to_string()];
        contexts.extend_from_slice(extra);
        let connections =
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).clamp(1, 8));
        let client = NbdClient::connect(&parsed, &contexts, connections)?;
        let size = client.size();
        check_size(Path::new(uri), size)?;
        Ok(Volume {
            path: PathBuf::from(uri),
            source: Source::Nbd(client),
            size,
            kind: VolumeKind::Nbd,
            stamp: (size, None),
            _export: None,
        })
    }

    /// The NBD client of an NBD volume.
    pub fn nbd(&self) -> Option<&NbdClient> {
        match &self.source {
            Source::Nbd(c) => Some(c),
            Source::File(_) => None,
        }
    }

    /// Whether the file's size or modification time moved since it was
    /// opened: a writer was at work, so blocks read at different moments
    /// may not belong together.
    pub fn changed_since_open(&self) -> Result<bool> {
        match &self.source {
            Source::File(f) => Ok(stamp(f, &self.path)? != self.stamp),
            Source::Nbd(_) => Ok(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    /// Fills `buf` from `offset`. A volume that ends early (it shrank after
    /// it was opened) is an error, never a short block.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.source {
            Source::File(f) => read_full(f, &self.path, buf, offset),
            Source::Nbd(c) => c.read(offset, buf),
        }
    }

    /// A view of `[offset, offset + len)` of a file or block device read in
    /// place (see [`sys::MappedRange`]); `None` for an NBD export, or where
    /// it cannot be mapped (the caller reads with `pread`).
    pub fn map(&self, offset: u64, len: usize) -> Option<sys::MappedRange> {
        match &self.source {
            Source::File(f) => sys::MappedRange::map(f, offset, len).ok(),
            Source::Nbd(_) => None,
        }
    }

    /// A cursor over the data segments of this volume, for hole detection.
    pub fn data_map(&self) -> DataMap<'_> {
        match &self.source {
            Source::File(f) => DataMap::new(Holes::File(f), self.kind == VolumeKind::File),
            Source::Nbd(c) => {
                let supported = c.has_context(BASE_ALLOCATION);
                DataMap::new(Holes::Nbd(c, Vec::new()), supported)
            }
        }
    }
}

fn stamp(file: &File, path: &Path) -> Result<(u64, Option<std::time::SystemTime>)> {
    let m = file.metadata().ctx("stat volume", path)?;
    Ok((m.len(), m.modified().ok()))
}

/// How a snapshot records the volume at `path`: absolute, symlinks
/// resolved where the path exists, so `--volume` filters and the default
/// parent match however the path was written.
pub fn source_path(path: &Path) -> String {
    if let Some(uri) = path.to_str().filter(|s| is_nbd_uri(s)) {
        return uri.to_string();
    }
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The largest volume blocksnap takes: EBS's limit (io2 Block Express),
/// 64 TiB. The block list of a snapshot is held in memory, 33 bytes a
/// block: 4.1 GiB at this size with 512 KiB blocks.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// Refuses a volume larger than [`MAX_VOLUME_SIZE`].
pub fn check_size(path: &Path, size: u64) -> Result<()> {
    if size > MAX_VOLUME_SIZE {
        return Err(Error::VolumeTooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(())
}

/// Size and kind of an open file or device.
pub(crate) fn probe(file: &File, path: &Path) -> Result<(VolumeKind, u64)> {
    let meta = file.metadata().ctx("stat volume", path)?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let size = sys::block_device_size(file).ctx("read the size of block device", path)?;
        Ok((VolumeKind::BlockDevice, size))
    } else if ft.is_file() {
        Ok((VolumeKind::File, meta.len()))
    } else {
        Err(Error::NotAVolume(path.to_path_buf()))
    }
}

/// `pread` until `buf` is full; running out of bytes means the volume shrank.
pub(crate) fn read_full(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::VolumeShrank {
            path: path.to_path_buf(),
            offset: offset + buf.len() as u64,
        }),
        Err(e) => Err(e).ctx("read volume", path),
    }
}

/// Opens an existing file or device for reading and writing.
pub(crate) fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx("open for writing", path)
}

/// Answers "does `[start, end)` hold any data?" with `SEEK_DATA` /
/// `SEEK_HOLE`, for ranges asked in increasing order. Files on file systems
/// without hole support, and block devices, report data everywhere.
pub struct DataMap<'a> {
    holes: Holes<'a>,
    supported: bool,
    /// The first data segment at or after the last queried start.
    seg_start: u64,
    seg_end: u64,
}

/// Where holes are found: `SEEK_DATA`/`SEEK_HOLE`, or an NBD server's
/// `base:allocation` extents (fetched a window at a time).
enum Holes<'a> {
    File(&'a File),
    Nbd(&'a NbdClient, Vec<(u64, u64, u32)>),
}

/// How much of an NBD export's allocation is asked for at once.
const NBD_STATUS_WINDOW: u64 = 1 << 30;

impl<'a> DataMap<'a> {
    fn new(holes: Holes<'a>, supported: bool) -> Self {
        DataMap {
            holes,
            supported,
            seg_start: 0,
            seg_end: 0,
        }
    }

    pub fn has_data(&mut self, start: u64, end: u64) -> io::Result<bool> {
        if !self.supported {
            return Ok(true);
        }
        let file = match &mut self.holes {
            Holes::File(f) => *f,
            Holes::Nbd(client, extents) => return nbd_has_data(client, extents, start, end),
        };
        if self.seg_end <= start {
            match sys::seek(file, start, sys::Seek::Data) {
                Ok(Some(data)) => {
                    let hole = sys::seek(file, data, sys::Seek::Hole)?.unwrap_or(u64::MAX);
                    self.seg_start = data;
                    self.seg_end = hole;
                }
                Ok(None) => {
                    self.seg_start = u64::MAX;
                    self.seg_end = u64::MAX;
                }
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    self.supported = false;
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.seg_start < end)
    }
}

/// Whether `[start, end)` of an NBD export holds any range the server
/// does not report as reading zeros; `extents` caches its answers, asked
/// for in increasing order.
fn nbd_has_data(
    client: &NbdClient,
    extents: &mut Vec<(u64, u64, u32)>,
    start: u64,
    end: u64,
) -> io::Result<bool> {
    extents.retain(|&(at, len, _)| at + len > start);
    if extents.last().is_none_or(|&(at, len, _)| at + len < end) {
        let from = extents.last().map_or(start, |&(at, len, _)| at + len);
        let n = NBD_STATUS_WINDOW.max(end - from).min(client.size() - from);
        let more = client
            .block_status(BASE_ALLOCATION, from, n)
            .map_err(|e| io::Error::other(e.to_string()))?;
        extents.extend(more);
    }
    Ok(extents
        .iter()
        .take_while(|&&(at, _, _)| at < end)
        .any(|&(at, len, state)| at + len > start && state & STATE_ZERO == 0))
}

/// True when every byte of `buf` is zero. Checks 64 bytes at a time so the
/// compiler vectorises the inner loop, and stops at the first non-zero run.
pub fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.as_chunks::<64>();
    chunks
        .iter()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 4096 + 7];
        assert!(is_zero(&buf));
        buf[4096 + 6] = 1;
        assert!(!is_zero(&buf));
        buf[4096 + 6] = 0;
        buf[100] = 0x80;
        assert!(!is_zero(&buf));
        assert!(is_zero(&[]));
    }

    #[test]
    fn data_map_finds_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let mut f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.flush().unwrap();
        f.sync_all().unwrap();
        let vol = Volume::open(&path).unwrap();
        assert_eq!(vol.size(), 16 << 20);
        let mut map = vol.data_map();
        let mb = 1u64 << 20;
        let answers: Vec<bool> = (0..16)
            .map(|i| map.has_data(i * mb, (i + 1) * mb).unwrap())
            .collect();
        let mut expected = vec![false; 16];
        expected[8] = true;
        assert_eq!(answers, expected);
    }

    #[test]
    fn missing_volume_is_named() {
        let err = Volume::open(Path::new("/nonexistent/disk.img")).unwrap_err();
        assert!(matches!(err, Error::VolumeNotFound(_)));
        assert!(err.to_string().contains("/nonexistent/disk.img"));
    }

    #[test]
    fn shrinking_volume_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let vol = Volume::open(&path).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let mut buf = vec![0u8; 8192];
        let err = vol.read_exact_at(&mut buf, 0).unwrap_err();
        assert!(matches!(err, Error::VolumeShrank { .. }), "{err}");
    }
}
