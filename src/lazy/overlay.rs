//! A writable lazy volume: writes go to a sparse overlay file, and the
//! granules written are recorded in a dirty map beside it
//! (`format::dirty_map`); reads take written granules from the overlay
//! and the rest from the snapshot.
//!
//! Durability: a write's bits are set and the map made durable
//! (`fdatasync`) before the write is acknowledged, and bits are only ever
//! set, so the map never under-reports; the written bytes themselves are
//! durable at the next flush, as on a disk with a write cache. A partial
//! granule is first filled from the snapshot (read-modify-write), so a
//! granule marked dirty always holds the volume's bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Location, Result};
use crate::format::dirty_map::{DEFAULT_GRANULE, DirtyHeader, HEADER_LEN};
use crate::lazy::reader::LazyVolume;
use crate::sys::LockMode;

/// The overlay at `path` and its map at `path.dirty`.
pub struct Overlay {
    data: File,
    map: File,
    data_path: PathBuf,
    map_path: PathBuf,
    header: DirtyHeader,
    /// Serialises writers: a write's read-modify-write and its bits.
    writing: Mutex<()>,
}

impl Overlay {
    /// Opens the overlay of `volume` at `path`, creating it (and its map)
    /// on first use; an existing one must belong to the same snapshot.
    pub fn open(path: &Path, volume: &LazyVolume) -> Result<Overlay> {
        let map_path = map_path_of(path);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx("open overlay", path)?;
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&map_path)
            .ctx("open dirty map", &map_path)?;
        // One server per overlay: two would each set bits over the other's
        // and could lose some. The kernel drops the lock with its holder.
        if !crate::sys::try_lock(&map, LockMode::Exclusive).ctx("lock dirty map", &map_path)? {
            return Err(Error::AlreadyExists(format!(
                "overlay {} is in use by another blocksnap: stop it, or give another --overlay path",
                path.display()
            )));
        }
        let want = DirtyHeader {
            granule: DEFAULT_GRANULE,
            volume_size: volume.size(),
            snapshot: volume.meta().id.clone(),
        };
        let map_len = map.metadata().ctx("stat", &map_path)?.len();
        let mut head = vec![0u8; HEADER_LEN.min(map_len as usize)];
        map.read_exact_at(&mut head, 0)
            .ctx("read dirty map", &map_path)?;
        // No header yet: new, or a creation cut short before its header
        // was written (so before any write was acknowledged).
        let header = if head.iter().all(|&b| b == 0) {
            // New: size both files, then the header last (its presence
            // says the pair is complete).
            data.set_len(want.volume_size).ctx("size overlay", path)?;
            map.set_len(want.file_len())
                .ctx("size dirty map", &map_path)?;
            map.write_all_at(&want.encode(), 0)
                .ctx("write dirty map", &map_path)?;
            map.sync_all().ctx("fsync", &map_path)?;
            want
        } else {
            let mut head = vec![0u8; HEADER_LEN.min(map_len as usize)];
            map.read_exact_at(&mut head, 0)
                .ctx("read dirty map", &map_path)?;
            let have = DirtyHeader::decode(&head, &Location::from(map_path.as_path()))?;
            if have.snapshot != want.snapshot || have.volume_size != want.volume_size {
                return Err(Error::InvalidArgument(format!(
                    "overlay {} belongs to {} ({} bytes), not {}: give another --overlay path",
                    path.display(),
                    have.snapshot,
                    have.volume_size,
                    want.snapshot
                )));
            }
            if map_len < have.file_len() {
                return Err(Error::corrupt_file(
                    "dirty map",
                    &Location::from(map_path.as_path()),
                )(format!(
                    "{map_len} bytes, but its bitmap needs {}",
                    have.file_len()
                )));
            }
            have
        };
        Ok(Overlay {
            data,
            map,
            data_path: path.to_path_buf(),
            map_path,
            header,
            writing: Mutex::new(()),
        })
    }

    fn granule(&self) -> u64 {
        self.header.granule as u64
    }

    /// The runs of `[offset, offset + len)`: each a length and whether it
    /// was written (and so lives in the overlay).
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let g = self.granule();
        let end = offset + len;
        let (first, last) = (offset / g, (end - 1) / g);
        let bits = self.bits(first, last)?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        for (i, dirty) in (first..=last).zip(bits) {
            let next = ((i + 1) * g).min(end);
            match runs.last_mut() {
                Some((n, d)) if *d == dirty => *n += next - at,
                _ => runs.push((next - at, dirty)),
            }
            at = next;
        }
        Ok(runs)
    }

    /// Reads `buf` from `offset`: written granules from the overlay, the
    /// rest from `base`.
    pub fn read_at(&self, base: &LazyVolume, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut at = 0usize;
        for (len, dirty) in self.runs(offset, buf.len() as u64)? {
            let part = &mut buf[at..at + len as usize];
            let pos = offset + at as u64;
            if dirty {
                self.data
                    .read_exact_at(part, pos)
                    .ctx("read overlay", &self.data_path)?;
            } else {
                base.read_at(pos, part).map_err(|f| f.error)?;
            }
            at += len as usize;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (`None`: zeros), and records the granules
    /// durably before returning.
    pub fn write_at(
        &self,
        base: &LazyVolume,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _turn = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let g = self.granule();
        let end = offset + len;
        // Granules the write covers only in part, not yet in the overlay:
        // fill them from the volume first.
        let (head, tail) = (offset / g * g, (end - 1) / g * g);
        let edges = if head == tail {
            vec![head]
        } else {
            vec![head, tail]
        };
        for edge in edges {
            let whole = edge >= offset && (edge + g).min(self.header.volume_size) <= end;
            if whole || self.bits(edge / g, edge / g)?[0] {
                continue;
            }
            let glen = g.min(self.header.volume_size - edge) as usize;
            let mut fill = vec![0u8; glen];
            base.read_at(edge, &mut fill).map_err(|f| f.error)?;
            self.data
                .write_all_at(&fill, edge)
                .ctx("write overlay", &self.data_path)?;
        }
        match data {
            Some(d) => self.data.write_all_at(d, offset),
            None => self.data.write_all_at(&vec![0u8; len as usize], offset),
        }
        .ctx("write overlay", &self.data_path)?;
        self.set_bits(offset / g, (end - 1) / g)
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&self) -> Result<()> {
        self.data.sync_data().ctx("fsync", &self.data_path)?;
        self.map.sync_data().ctx("fsync", &self.map_path)
    }

    /// The bits of granules `first..=last`.
    fn bits(&self, first: u64, last: u64) -> Result<Vec<bool>> {
        let (b0, b1) = (first / 8, last / 8);
        let mut bytes = vec![0u8; (b1 - b0 + 1) as usize];
        self.map
            .read_exact_at(&mut bytes, HEADER_LEN as u64 + b0)
            .ctx("read dirty map", &self.map_path)?;
        Ok((first..=last)
            .map(|i| bytes[(i / 8 - b0) as usize] & (1 << (i % 8)) != 0)
            .collect())
    }

    /// Sets the bits of granules `first..=last` and makes them durable.
    fn set_bits(&self, first: u64, last: u64) -> Result<()> {
        let (b0, b1) = (first / 8, last / 8);
        let mut bytes = vec![0u8; (b1 - b0 + 1) as usize];
        let at = HEADER_LEN as u64 + b0;
        self.map
            .read_exact_at(&mut bytes, at)
            .ctx("read dirty map", &self.map_path)?;
        let before = bytes.clone();
        for i in first..=last {
            bytes[(i / 8 - b0) as usize] |= 1 << (i % 8);
        }
        if bytes == before {
            return Ok(());
        }
        self.map
            .write_all_at(&bytes, at)
            .ctx("write dirty map", &self.map_path)?;
        self.map.sync_data().ctx("fsync", &self.map_path)
    }
}

/// Where the dirty map of the overlay at `path` lives.
pub fn map_path_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".dirty");
    PathBuf::from(name)
}
