//! What a mount or an export serves: a snapshot read-only, a writable
//! overlay over one, or a plain file (an instance's ephemeral volume).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::id::SnapshotId;
use crate::lazy::control;
use crate::lazy::overlay::{Overlay, ReadError};
use crate::lazy::reader::LazyVolume;
use crate::region::catalog::Region;

pub enum Disk {
    Snapshot(Box<LazyVolume>),
    Overlay(Arc<Overlay>),
    File {
        file: File,
        path: PathBuf,
        size: u64,
    },
}

impl Disk {
    /// Snapshot `id` of `region`, read-only, or writable through the
    /// overlay at `overlay` (created on first use, continued after; its
    /// control socket answers snapshot requests while it is served).
    pub fn open(
        region: &Arc<Region>,
        id: &SnapshotId,
        overlay: Option<&Path>,
        cache: usize,
    ) -> Result<Disk> {
        Ok(match overlay {
            Some(path) => {
                let size = region.read_snapshot_meta(id)?.volume_size;
                let overlay = Arc::new(Overlay::open(
                    path,
                    region.clone(),
                    Some((id, size)),
                    cache,
                )?);
                control::listen_overlay(&overlay)?;
                Disk::Overlay(overlay)
            }
            None => Disk::Snapshot(Box::new(LazyVolume::open(region.clone(), id, cache)?)),
        })
    }

    /// A plain file served as it is.
    pub fn file(path: PathBuf) -> Result<Disk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        let size = file.metadata().ctx("stat", &path)?.len();
        Ok(Disk::File { file, path, size })
    }

    pub fn size(&self) -> u64 {
        match self {
            Disk::Snapshot(v) => v.size(),
            Disk::Overlay(o) => o.size(),
            Disk::File { size, .. } => *size,
        }
    }

    pub fn writable(&self) -> bool {
        !matches!(self, Disk::Snapshot(_))
    }

    /// The block size clients should prefer.
    pub fn block_size(&self) -> u32 {
        match self {
            Disk::Snapshot(v) => v.meta().block_size,
            Disk::Overlay(o) => o.base().meta().block_size,
            Disk::File { .. } => 4096,
        }
    }

    /// Fills `buf` from `offset`; the range must lie inside the volume.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), ReadError> {
        match self {
            Disk::Snapshot(v) => v.read_at(offset, buf).map_err(ReadError::Chunk),
            Disk::Overlay(o) => o.read_at(offset, buf),
            Disk::File { file, path, .. } => {
                Ok(file.read_exact_at(buf, offset).ctx("read", path)?)
            }
        }
    }

    /// Writes `data` (`None`: `len` zeros) at `offset`; the range must lie
    /// inside the volume.
    pub fn write_at(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        match self {
            Disk::Snapshot(v) => Err(Error::InvalidArgument(format!(
                "{} is served read-only",
                v.meta().id
            ))),
            Disk::Overlay(o) => o.write_at(offset, data, len),
            Disk::File { file, path, .. } => match data {
                Some(d) => file.write_all_at(d, offset),
                None => file.write_all_at(&vec![0u8; len as usize], offset),
            }
            .ctx("write", path),
        }
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&self) -> Result<()> {
        match self {
            Disk::Snapshot(_) => Ok(()),
            Disk::Overlay(o) => o.flush(),
            Disk::File { file, path, .. } => file.sync_data().ctx("fsync", path),
        }
    }

    /// Data and hole runs of `[offset, offset + len)`, clipped to the
    /// volume.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        match self {
            Disk::Snapshot(v) => Ok(v.extents(offset, len)),
            Disk::Overlay(o) => o.extents(offset, len.min(o.size().saturating_sub(offset))),
            Disk::File { size, .. } => Ok(vec![(len.min(size.saturating_sub(offset)), true)]),
        }
    }

    /// `SEEK_DATA`: the first offset at or after `offset` that holds data.
    pub fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.seek(offset, true)
    }

    /// `SEEK_HOLE`: the first offset at or after `offset` in a hole, or the
    /// end.
    pub fn next_hole(&self, offset: u64) -> Result<u64> {
        Ok(self.seek(offset, false)?.unwrap_or(self.size()))
    }

    fn seek(&self, offset: u64, data: bool) -> Result<Option<u64>> {
        match self {
            Disk::Snapshot(v) if data => Ok(v.next_data(offset)),
            Disk::Snapshot(v) => Ok(Some(v.next_hole(offset))),
            Disk::File { .. } => Ok(if data { Some(offset) } else { None }),
            Disk::Overlay(o) => {
                // Walk the extents a window at a time.
                const WINDOW: u64 = 64 << 20;
                let mut at = offset;
                while at < o.size() {
                    let n = WINDOW.min(o.size() - at);
                    for (len, d) in o.extents(at, n)? {
                        if d == data {
                            return Ok(Some(at));
                        }
                        at += len;
                    }
                }
                Ok(None)
            }
        }
    }
}
