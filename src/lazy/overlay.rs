//! A writable lazy volume: writes go to a sparse overlay file, and the
//! granules written are recorded in a dirty map beside it
//! (`format::dirty_map`); reads take granules the overlay holds from it
//! and the rest from the snapshot underneath.
//!
//! Durability: a write's dirty bits are set and the map made durable
//! (`fdatasync`) before the write is acknowledged, and they are only
//! cleared once a snapshot holding those granules is underneath, so the
//! map never under-reports; the written bytes themselves are durable at
//! the next flush, as on a disk with a write cache. A partial granule is
//! first filled from the snapshot (read-modify-write), so a granule the
//! overlay holds always holds the volume's bytes.
//!
//! Snapshots ([`Overlay::pause`], [`Paused::rebase`]): writes wait while a
//! snapshot reads the dirty granules; then the new snapshot goes
//! underneath, the dirty granules become present ones, and the dirty map
//! starts again empty, so the next snapshot is incremental again.
//! Hydration ([`Overlay::hydrate`]) copies the snapshot's blocks into the
//! overlay and marks them present, after which reads need no store.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::error::{Error, IoContext, Location, Result};
use crate::format::dirty_map::{DEFAULT_GRANULE, DirtyHeader, HEADER_LEN, MapKind};
use crate::format::lease::Lease;
use crate::id::SnapshotId;
use crate::lazy::reader::{LazyVolume, ReadFailure};
use crate::region::catalog::Region;
use crate::sys::LockMode;

/// How far back `volume serve SNAP --overlay FILE` may name the snapshot
/// an overlay started from, after snapshots went underneath it.
const MAX_LINEAGE: usize = 10_000;
/// Bitmap bytes handled at a time when maps are combined or cleared.
const MAP_STEP: u64 = 64 << 10;

/// A read that failed: a chunk of the snapshot underneath, or the overlay.
#[derive(Debug)]
pub enum ReadError {
    Chunk(Box<ReadFailure>),
    Other(Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Chunk(c) => c.fmt(f),
            ReadError::Other(e) => e.fmt(f),
        }
    }
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        ReadError::Other(e)
    }
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Chunk(c) => c.error,
            ReadError::Other(e) => e,
        }
    }
}

/// Reads `buf` from `offset` of `base`, as zeros past its end (a volume
/// may be larger than the snapshot it was created from).
pub fn read_base(
    base: &LazyVolume,
    offset: u64,
    buf: &mut [u8],
) -> std::result::Result<(), ReadError> {
    let inside = base.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    if inside > 0 {
        base.read_at(offset, &mut buf[..inside])
            .map_err(ReadError::Chunk)?;
    }
    buf[inside..].fill(0);
    Ok(())
}

/// One of the two maps beside an overlay.
struct MapFile {
    file: File,
    path: PathBuf,
    kind: MapKind,
}

impl MapFile {
    fn open(overlay: &Path, kind: MapKind) -> Result<MapFile> {
        let path = map_path(overlay, kind);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx("open", &path)?;
        Ok(MapFile { file, path, kind })
    }

    /// The header, or `None` when none was written yet (a new map, or a
    /// creation cut short before its header, so before any write was
    /// acknowledged).
    fn header(&self) -> Result<Option<DirtyHeader>> {
        let len = self.file.metadata().ctx("stat", &self.path)?.len();
        let mut head = vec![0u8; HEADER_LEN.min(len as usize)];
        self.file
            .read_exact_at(&mut head, 0)
            .ctx("read", &self.path)?;
        if head.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let at = Location::from(self.path.as_path());
        let h = DirtyHeader::decode(self.kind, &head, &at)?;
        if len < h.file_len() {
            return Err(Error::corrupt_file(self.kind.what(), &at)(format!(
                "{len} bytes, but its bitmap needs {}",
                h.file_len()
            )));
        }
        Ok(Some(h))
    }

    /// Sizes the map for `h`, then writes the header last (its presence
    /// says the map is complete).
    fn create(&self, h: &DirtyHeader) -> Result<()> {
        self.file.set_len(h.file_len()).ctx("size", &self.path)?;
        self.write_header(h)
    }

    fn write_header(&self, h: &DirtyHeader) -> Result<()> {
        self.file
            .write_all_at(&h.encode(self.kind), 0)
            .ctx("write", &self.path)?;
        self.file.sync_all().ctx("fsync", &self.path)
    }

    /// Bitmap bytes `b0..=b1`.
    fn bytes(&self, b0: u64, b1: u64) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; (b1 - b0 + 1) as usize];
        self.file
            .read_exact_at(&mut bytes, HEADER_LEN as u64 + b0)
            .ctx("read", &self.path)?;
        Ok(bytes)
    }

    fn write_bytes(&self, b0: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, HEADER_LEN as u64 + b0)
            .ctx("write", &self.path)
    }

    /// Sets the bits of granules `first..=last` and makes them durable.
    fn set(&self, first: u64, last: u64) -> Result<()> {
        let (b0, b1) = (first / 8, last / 8);
        let mut bytes = self.bytes(b0, b1)?;
        let before = bytes.clone();
        for i in first..=last {
            bytes[(i / 8 - b0) as usize] |= 1 << (i % 8);
        }
        if bytes == before {
            return Ok(());
        }
        self.write_bytes(b0, &bytes)?;
        self.file.sync_data().ctx("fsync", &self.path)
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().ctx("fsync", &self.path)
    }
}

/// Where the map of `kind` of the overlay at `overlay` lives.
pub fn map_path(overlay: &Path, kind: MapKind) -> PathBuf {
    let mut name = overlay.as_os_str().to_os_string();
    name.push(kind.suffix());
    PathBuf::from(name)
}

/// Where the dirty map of the overlay at `path` lives.
pub fn map_path_of(path: &Path) -> PathBuf {
    map_path(path, MapKind::Dirty)
}

/// Whether `path` is an overlay: its dirty map exists beside it.
pub fn is_overlay(path: &Path) -> bool {
    map_path_of(path).is_file()
}

/// The overlay at `path` and its maps at `path.dirty` and `path.present`.
pub struct Overlay {
    /// This overlay's lease on the snapshot underneath.
    lease: Lease,
    data: File,
    data_path: PathBuf,
    dirty: MapFile,
    present: MapFile,
    size: u64,
    granule: u64,
    cache: usize,
    /// The snapshot underneath.
    base: RwLock<Arc<LazyVolume>>,
    /// Serialises writers (a write's read-modify-write and its bits) and
    /// holds them off while a snapshot is taken.
    writing: Mutex<()>,
}

impl Overlay {
    /// Creates a new overlay at `path` over snapshot `origin`, for a volume
    /// of `size` bytes (at least the snapshot's).
    pub fn create(
        path: &Path,
        region: Arc<Region>,
        origin: &SnapshotId,
        size: u64,
        cache: usize,
    ) -> Result<Overlay> {
        if path.exists() {
            return Err(Error::AlreadyExists(format!(
                "{} exists: an overlay is created only once",
                path.display()
            )));
        }
        Overlay::open(path, region, Some((origin, size)), cache)
    }

    /// Opens the overlay at `path`, creating it over `create` (a snapshot
    /// and a volume size) when it does not exist yet. An existing overlay
    /// continues over the snapshot its dirty map names, which must be
    /// `create`'s snapshot or one taken of the overlay since.
    pub fn open(
        path: &Path,
        region: Arc<Region>,
        create: Option<(&SnapshotId, u64)>,
        cache: usize,
    ) -> Result<Overlay> {
        if create.is_none() && !is_overlay(path) {
            return Err(Error::NotFound(format!(
                "{} is not an overlay ({} is missing)",
                path.display(),
                map_path_of(path).display()
            )));
        }
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx("open overlay", path)?;
        let dirty = MapFile::open(path, MapKind::Dirty)?;
        // One process per overlay: two would each set bits over the
        // other's and could lose some. The kernel drops the lock with its
        // holder.
        if !crate::sys::try_lock(&dirty.file, LockMode::Exclusive).ctx("lock", &dirty.path)? {
            return Err(Error::AlreadyExists(format!(
                "overlay {} is in use by another blocksnap: stop it, or give another overlay path",
                path.display()
            )));
        }
        let header = match (dirty.header()?, create) {
            (Some(have), Some((origin, _))) => {
                if have.snapshot != *origin && !descends(&region, &have.snapshot, origin)? {
                    return Err(Error::InvalidArgument(format!(
                        "overlay {} belongs to {}, not {origin}: give another overlay path",
                        path.display(),
                        have.snapshot,
                    )));
                }
                have
            }
            (Some(have), None) => have,
            (None, Some((origin, size))) => {
                let base = region.read_snapshot_meta(origin)?;
                if size < base.volume_size {
                    return Err(Error::InvalidArgument(format!(
                        "a volume of {size} bytes cannot hold {origin} ({} bytes)",
                        base.volume_size
                    )));
                }
                let h = DirtyHeader {
                    granule: DEFAULT_GRANULE,
                    volume_size: size,
                    snapshot: origin.clone(),
                };
                data.set_len(size).ctx("size overlay", path)?;
                dirty.create(&h)?;
                h
            }
            (None, None) => {
                return Err(Error::CorruptFile {
                    what: "dirty map",
                    location: Location::from(dirty.path.as_path()),
                    reason: "it has no header".into(),
                });
            }
        };
        let present = MapFile::open(path, MapKind::Present)?;
        match present.header()? {
            None => present.create(&header)?,
            Some(p) if (p.granule, p.volume_size) == (header.granule, header.volume_size) => {}
            Some(p) => {
                return Err(Error::corrupt_file(
                    "present map",
                    &Location::from(present.path.as_path()),
                )(format!(
                    "it is for {} bytes in granules of {}, but the dirty map for {} in {}",
                    p.volume_size, p.granule, header.volume_size, header.granule
                )));
            }
        }
        // The snapshot underneath must outlive the overlay: `snapshot
        // delete` refuses it while this lease stands.
        let lease = Lease::new(
            &crate::sys::hostname(),
            &std::fs::canonicalize(path)
                .ctx("resolve", path)?
                .display()
                .to_string(),
        );
        region.add_lease(&header.snapshot, &lease)?;
        let base = LazyVolume::open(region, &header.snapshot, cache)?;
        Ok(Overlay {
            lease,
            data,
            data_path: path.to_path_buf(),
            dirty,
            present,
            size: header.volume_size,
            granule: header.granule as u64,
            cache,
            base: RwLock::new(Arc::new(base)),
            writing: Mutex::new(()),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.data_path
    }

    /// The snapshot underneath now.
    pub fn base(&self) -> Arc<LazyVolume> {
        self.base.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Whether the overlay holds each of granules `first..=last`.
    fn held(&self, first: u64, last: u64) -> Result<Vec<bool>> {
        let (b0, b1) = (first / 8, last / 8);
        let dirty = self.dirty.bytes(b0, b1)?;
        let present = self.present.bytes(b0, b1)?;
        Ok((first..=last)
            .map(|i| {
                let k = (i / 8 - b0) as usize;
                (dirty[k] | present[k]) & (1 << (i % 8)) != 0
            })
            .collect())
    }

    /// Whether any granule of `[offset, offset + len)` was written since
    /// the snapshot underneath was taken.
    pub fn any_dirty(&self, offset: u64, len: u64) -> Result<bool> {
        if len == 0 {
            return Ok(false);
        }
        let g = self.granule;
        let (first, last) = (offset / g, (offset + len - 1) / g);
        let bytes = self.dirty.bytes(first / 8, last / 8)?;
        Ok((first..=last).any(|i| bytes[(i / 8 - first / 8) as usize] & (1 << (i % 8)) != 0))
    }

    /// The runs of `[offset, offset + len)`: each a length and whether the
    /// overlay holds it.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let g = self.granule;
        let end = offset + len;
        let (first, last) = (offset / g, (end - 1) / g);
        let bits = self.held(first, last)?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        for (i, held) in (first..=last).zip(bits) {
            let next = ((i + 1) * g).min(end);
            match runs.last_mut() {
                Some((n, d)) if *d == held => *n += next - at,
                _ => runs.push((next - at, held)),
            }
            at = next;
        }
        Ok(runs)
    }

    /// Data and hole runs of `[offset, offset + len)`: what the overlay
    /// holds is data, the rest as the snapshot has it.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let base = self.base();
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        for (n, held) in self.runs(offset, len)? {
            let mut parts = if held {
                vec![(n, true)]
            } else {
                base.extents(at, n)
            };
            let covered: u64 = parts.iter().map(|p| p.0).sum();
            if covered < n {
                // Past the end of the snapshot: never written, so a hole.
                parts.push((n - covered, false));
            }
            for (m, data) in parts {
                match runs.last_mut() {
                    Some((l, d)) if *d == data => *l += m,
                    _ => runs.push((m, data)),
                }
            }
            at += n;
        }
        Ok(runs)
    }

    /// Reads `buf` from `offset`: what the overlay holds from it, the rest
    /// from the snapshot underneath.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), ReadError> {
        let base = self.base();
        let mut at = 0usize;
        for (len, held) in self.runs(offset, buf.len() as u64)? {
            let part = &mut buf[at..at + len as usize];
            let pos = offset + at as u64;
            if held {
                self.data
                    .read_exact_at(part, pos)
                    .ctx("read overlay", &self.data_path)?;
            } else {
                read_base(&base, pos, part)?;
            }
            at += len as usize;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (`None`: `len` zeros), and records the
    /// granules durably before returning.
    pub fn write_at(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _turn = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let base = self.base();
        let g = self.granule;
        let end = offset + len;
        // Granules the write covers only in part, not yet in the overlay:
        // fill them from the snapshot first.
        let (head, tail) = (offset / g * g, (end - 1) / g * g);
        let edges = if head == tail {
            vec![head]
        } else {
            vec![head, tail]
        };
        for edge in edges {
            let whole = edge >= offset && (edge + g).min(self.size) <= end;
            if whole || self.held(edge / g, edge / g)?[0] {
                continue;
            }
            let mut fill = vec![0u8; g.min(self.size - edge) as usize];
            read_base(&base, edge, &mut fill)?;
            self.data
                .write_all_at(&fill, edge)
                .ctx("write overlay", &self.data_path)?;
        }
        match data {
            Some(d) => self.data.write_all_at(d, offset),
            None => self.data.write_all_at(&vec![0u8; len as usize], offset),
        }
        .ctx("write overlay", &self.data_path)?;
        self.dirty.set(offset / g, (end - 1) / g)
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&self) -> Result<()> {
        self.data.sync_data().ctx("fsync", &self.data_path)?;
        self.dirty.sync()?;
        self.present.sync()
    }

    /// Holds writes off (they wait) and flushes, until the returned guard
    /// is dropped: what a snapshot reads is then one instant of the volume.
    pub fn pause(&self) -> Result<Paused<'_>> {
        let turn = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.flush()?;
        Ok(Paused {
            overlay: self,
            _turn: turn,
        })
    }

    /// Copies every block the overlay does not hold yet from the snapshot
    /// underneath, a block at a time and yielding to writes, and marks it
    /// present once durable; returns the bytes copied. Stops early, without
    /// harm, when `stop` is set.
    pub fn hydrate(&self, stop: &AtomicBool) -> Result<u64> {
        const BATCH: u64 = 8 << 20;
        let g = self.granule;
        let step = self.base().meta().block_size as u64;
        let granules = self.size.div_ceil(g);
        let mut copied = 0u64;
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut pending_bytes = 0u64;
        let mut at = 0u64;
        let mut buf = Vec::new();
        while at < self.size && !stop.load(Ordering::Relaxed) {
            let len = step.min(self.size - at);
            let (first, last) = (at / g, ((at + len - 1) / g).min(granules - 1));
            if self.held(first, last)?.iter().all(|&h| h) {
                at += len;
                continue;
            }
            let base = self.base();
            buf.resize(len as usize, 0);
            read_base(&base, at, &mut buf)?;
            let zeros = buf.iter().all(|&b| b == 0);
            {
                let _turn = self.writing.lock().unwrap_or_else(|p| p.into_inner());
                // Only granules still not held: a write may have come.
                let held = self.held(first, last)?;
                for (i, h) in (first..=last).zip(held) {
                    if h {
                        continue;
                    }
                    let from = i * g - at;
                    let n = g.min(self.size - i * g);
                    if zeros {
                        crate::sys::punch_hole(&self.data, i * g, n)
                    } else {
                        self.data
                            .write_all_at(&buf[from as usize..(from + n) as usize], i * g)
                    }
                    .ctx("write overlay", &self.data_path)?;
                }
            }
            pending.push((first, last));
            pending_bytes += len;
            copied += len;
            at += len;
            if pending_bytes >= BATCH || at >= self.size {
                self.mark_present(&mut pending)?;
                pending_bytes = 0;
            }
        }
        self.mark_present(&mut pending)?;
        Ok(copied)
    }

    /// Marks `ranges` of granules present, once the overlay's bytes are
    /// durable (a present bit must never come before its bytes).
    fn mark_present(&self, ranges: &mut Vec<(u64, u64)>) -> Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.data.sync_data().ctx("fsync", &self.data_path)?;
        for (first, last) in ranges.drain(..) {
            self.present.set(first, last)?;
        }
        Ok(())
    }

    /// Whether the overlay holds every granule: reads need no store.
    pub fn hydrated(&self) -> Result<bool> {
        let granules = self.size.div_ceil(self.granule);
        let mut first = 0;
        while first < granules {
            let last = (first + MAP_STEP * 8 - 1).min(granules - 1);
            if !self.held(first, last)?.iter().all(|&h| h) {
                return Ok(false);
            }
            first = last + 1;
        }
        Ok(true)
    }
}

/// An overlay with its writes held off ([`Overlay::pause`]).
pub struct Paused<'a> {
    overlay: &'a Overlay,
    _turn: MutexGuard<'a, ()>,
}

impl Paused<'_> {
    pub fn overlay(&self) -> &Overlay {
        self.overlay
    }

    /// Overwrites the parts of `buf` (the volume's bytes from `offset` as
    /// the snapshot underneath has them) that were written since, from the
    /// overlay.
    pub fn read_dirty_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let o = self.overlay;
        if buf.is_empty() {
            return Ok(());
        }
        let g = o.granule;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / g, (end - 1) / g);
        let bytes = o.dirty.bytes(first / 8, last / 8)?;
        for i in first..=last {
            if bytes[(i / 8 - first / 8) as usize] & (1 << (i % 8)) == 0 {
                continue;
            }
            let (from, to) = ((i * g).max(offset), ((i + 1) * g).min(end));
            o.data
                .read_exact_at(
                    &mut buf[(from - offset) as usize..(to - offset) as usize],
                    from,
                )
                .ctx("read overlay", &o.data_path)?;
        }
        Ok(())
    }

    /// The indexes of the blocks of `block_size` bytes that hold a granule
    /// written since the snapshot underneath was taken, in order. Reads the
    /// bitmap a window at a time: memory follows the dirty blocks.
    pub fn dirty_blocks(&self, block_size: u64) -> Result<Vec<u64>> {
        let o = self.overlay;
        let per_block = (block_size / o.granule).max(1);
        let map_len = o.size.div_ceil(o.granule).div_ceil(8);
        let mut found = Vec::new();
        let mut b0 = 0;
        while b0 < map_len {
            let b1 = (b0 + MAP_STEP).min(map_len) - 1;
            let bytes = o.dirty.bytes(b0, b1)?;
            for (k, &byte) in bytes.iter().enumerate() {
                if byte == 0 {
                    continue;
                }
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        let block = ((b0 + k as u64) * 8 + bit) / per_block;
                        if found.last() != Some(&block) {
                            found.push(block);
                        }
                    }
                }
            }
            b0 = b1 + 1;
        }
        Ok(found)
    }

    /// Puts `snapshot`, just taken of this overlay, underneath it: the
    /// dirty granules become present ones and the dirty map starts again
    /// empty. Each step leaves the maps safe if the process dies there:
    /// present bits are set before the dirty map changes its snapshot, and
    /// dirty bits are cleared last (until then they over-report).
    pub fn rebase(&self, snapshot: &SnapshotId) -> Result<()> {
        let o = self.overlay;
        let base = LazyVolume::open(o.base().region().clone(), snapshot, o.cache)?;
        if base.size() != o.size || base.meta().parent.as_ref() != Some(&o.base().meta().id) {
            return Err(Error::InvalidArgument(format!(
                "{snapshot} was not taken of overlay {}",
                o.data_path.display()
            )));
        }
        let map_len = o.size.div_ceil(o.granule).div_ceil(8);
        let mut b0 = 0;
        while b0 < map_len {
            let b1 = (b0 + MAP_STEP).min(map_len) - 1;
            let dirty = o.dirty.bytes(b0, b1)?;
            if dirty.iter().any(|&b| b != 0) {
                let mut present = o.present.bytes(b0, b1)?;
                present.iter_mut().zip(&dirty).for_each(|(p, d)| *p |= d);
                o.present.write_bytes(b0, &present)?;
            }
            b0 = b1 + 1;
        }
        o.present.sync()?;
        let region = o.base().region().clone();
        let old = o.base().meta().id.clone();
        region.add_lease(snapshot, &o.lease)?;
        o.dirty.write_header(&DirtyHeader {
            granule: o.granule as u32,
            volume_size: o.size,
            snapshot: snapshot.clone(),
        })?;
        *o.base.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(base);
        let mut b0 = 0;
        while b0 < map_len {
            let b1 = (b0 + MAP_STEP).min(map_len) - 1;
            if o.dirty.bytes(b0, b1)?.iter().any(|&b| b != 0) {
                o.dirty
                    .write_bytes(b0, &vec![0u8; (b1 - b0 + 1) as usize])?;
            }
            b0 = b1 + 1;
        }
        o.dirty.sync()?;
        region.remove_lease(&old, &o.lease.key())
    }
}

/// Whether `descendant` was taken, through parents, from `ancestor`.
fn descends(region: &Region, descendant: &SnapshotId, ancestor: &SnapshotId) -> Result<bool> {
    let mut at = descendant.clone();
    for _ in 0..MAX_LINEAGE {
        if !region.has_snapshot(&at)? {
            return Ok(false);
        }
        match region.read_snapshot_meta(&at)?.parent {
            Some(p) if p == *ancestor => return Ok(true),
            Some(p) => at = p,
            None => return Ok(false),
        }
    }
    Ok(false)
}
