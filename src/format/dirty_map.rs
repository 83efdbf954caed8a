//! The maps beside a writable overlay `FILE`: `FILE.dirty` says which
//! granules of a lazy volume have been written since the snapshot
//! underneath was taken; `FILE.present` which granules the overlay holds
//! anyway (hydrated from the snapshot, or written before the snapshot
//! underneath was taken), so reads of them need no store.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BSDM" (dirty) or "BSPM" (present)  (frozen: do not modify)
//! 4       4     format version = 1, u32 LE
//! 8       4     granule size in bytes, u32 LE (a power of two, 4 KiB..1 MiB)
//! 12      4     reserved, zero
//! 16      8     volume size in bytes, u64 LE
//! 24      32    the snapshot underneath: its id in ASCII, zero-padded
//! 56      8     reserved, zero
//! 64      32    BLAKE3 of bytes 0..64
//! 96      ..    the bitmap: bit i (least significant first) of byte
//!               i / 8 set = granule i has been written
//! ```
//!
//! A dirty bit is cleared only when a snapshot that holds the granule
//! becomes the one underneath (and the granule is then marked present),
//! so the dirty map can over-report (a write that failed after its bit
//! was set) but never under-report. A present bit is set only once the
//! overlay's bytes are durable, so the present map may under-report but
//! never over-report. The present map's snapshot field names the
//! snapshot the overlay was created from; only its volume size and
//! granule must match the dirty map's.

use crate::error::{Error, Location, Result};
use crate::format::check_version;
use crate::id::SnapshotId;

pub const DIRTY_MAGIC: &[u8; 4] = b"BSDM";
pub const PRESENT_MAGIC: &[u8; 4] = b"BSPM";
pub const DIRTY_VERSION: u32 = 1;

/// Which of the two maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    Dirty,
    Present,
}

impl MapKind {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            MapKind::Dirty => DIRTY_MAGIC,
            MapKind::Present => PRESENT_MAGIC,
        }
    }

    /// What the map is called in errors.
    pub fn what(self) -> &'static str {
        match self {
            MapKind::Dirty => "dirty map",
            MapKind::Present => "present map",
        }
    }

    /// The file name suffix after the overlay's name.
    pub fn suffix(self) -> &'static str {
        match self {
            MapKind::Dirty => ".dirty",
            MapKind::Present => ".present",
        }
    }
}
pub const HEADER_LEN: usize = 96;
/// The granule a write is tracked in: the page size of file systems and
/// the sector size of modern disks, so an aligned write never needs the
/// snapshot's bytes around it.
pub const DEFAULT_GRANULE: u32 = 4096;

/// A dirty map's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyHeader {
    pub granule: u32,
    pub volume_size: u64,
    pub snapshot: SnapshotId,
}

impl DirtyHeader {
    pub fn encode(&self, kind: MapKind) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(kind.magic());
        b[4..8].copy_from_slice(&DIRTY_VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.granule.to_le_bytes());
        b[16..24].copy_from_slice(&self.volume_size.to_le_bytes());
        let id = self.snapshot.as_str().as_bytes();
        b[24..24 + id.len()].copy_from_slice(id);
        let sum = blake3::hash(&b[..64]);
        b[64..96].copy_from_slice(sum.as_bytes());
        b
    }

    pub fn decode(kind: MapKind, b: &[u8], at: &Location) -> Result<DirtyHeader> {
        let corrupt = Error::corrupt_file(kind.what(), at);
        if b.len() < HEADER_LEN {
            return Err(corrupt(format!(
                "{} bytes is shorter than its header",
                b.len()
            )));
        }
        if &b[0..4] != kind.magic() {
            return Err(corrupt(format!(
                "it does not start with {}",
                String::from_utf8_lossy(kind.magic())
            )));
        }
        let version = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        check_version(kind.what(), at, version, DIRTY_VERSION)?;
        if blake3::hash(&b[..64]).as_bytes() != &b[64..96] {
            return Err(corrupt("its header checksum does not match".into()));
        }
        let granule = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if !granule.is_power_of_two() || !(4096..=1 << 20).contains(&granule) {
            return Err(corrupt(format!("granule of {granule} bytes")));
        }
        let volume_size = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        let id = &b[24..56];
        let len = id.iter().position(|&c| c == 0).unwrap_or(id.len());
        let snapshot = std::str::from_utf8(&id[..len])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("it names no valid snapshot".into()))?;
        Ok(DirtyHeader {
            granule,
            volume_size,
            snapshot,
        })
    }

    /// Granules of the volume.
    pub fn granules(&self) -> u64 {
        self.volume_size.div_ceil(self.granule as u64)
    }

    /// Length of the whole file: header and bitmap.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + self.granules().div_ceil(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn headers_round_trip_and_damage_or_a_newer_version_is_named() {
        let h = DirtyHeader {
            granule: DEFAULT_GRANULE,
            volume_size: (1 << 30) + 5,
            snapshot: "snap-0123456789abcdef0".parse().unwrap(),
        };
        let at = Location::from(Path::new("x.dirty"));
        let b = h.encode(MapKind::Dirty);
        assert_eq!(DirtyHeader::decode(MapKind::Dirty, &b, &at).unwrap(), h);
        let p = h.encode(MapKind::Present);
        assert_eq!(DirtyHeader::decode(MapKind::Present, &p, &at).unwrap(), h);
        assert!(DirtyHeader::decode(MapKind::Dirty, &p, &at).is_err());
        assert_eq!(h.granules(), (1 << 18) + 1);
        let mut bad = b;
        bad[20] ^= 1;
        let e = DirtyHeader::decode(MapKind::Dirty, &bad, &at).unwrap_err();
        assert!(matches!(e, Error::CorruptFile { .. }), "{e}");
        let mut newer = b;
        newer[4] = 2;
        let e = DirtyHeader::decode(MapKind::Dirty, &newer, &at).unwrap_err();
        assert!(e.to_string().contains("newer blocksnap"), "{e}");
        assert!(DirtyHeader::decode(MapKind::Dirty, &b[..50], &at).is_err());
    }

    #[test]
    fn a_released_dirty_map_still_reads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/v1-all-formats/overlay.img.dirty");
        let bytes = std::fs::read(&path).unwrap();
        let h =
            DirtyHeader::decode(MapKind::Dirty, &bytes, &Location::from(path.as_path())).unwrap();
        assert_eq!(h.snapshot.as_str(), "snap-7b3cecd6a20941ad5");
        assert_eq!((h.granule, h.volume_size), (4096, 4 << 20));
        assert_eq!(bytes.len() as u64, h.file_len());
        let set: Vec<u64> = (0..h.granules())
            .filter(|&i| bytes[HEADER_LEN + (i / 8) as usize] & (1 << (i % 8)) != 0)
            .collect();
        // Bytes 1000..4000 and 1 MiB..+64 KiB were written.
        assert_eq!(set, [0].into_iter().chain(256..272).collect::<Vec<_>>());
    }

    #[test]
    fn a_released_present_map_still_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/v1-all-formats/overlay.img.present");
        let bytes = std::fs::read(&path).unwrap();
        let at = Location::from(path.as_path());
        let h = DirtyHeader::decode(MapKind::Present, &bytes, &at).unwrap();
        assert_eq!(h.snapshot.as_str(), "snap-e45491d1f535b0ece");
        assert_eq!((h.granule, h.volume_size), (4096, 4 << 20));
        assert!(DirtyHeader::decode(MapKind::Dirty, &bytes, &at).is_err());
        let set: Vec<u64> = (0..h.granules())
            .filter(|&i| bytes[HEADER_LEN + (i / 8) as usize] & (1 << (i % 8)) != 0)
            .collect();
        // Bytes 8 KiB..16 KiB and 2 MiB..+4 KiB were written, then
        // snapshotted: the overlay holds them.
        assert_eq!(set, [2, 3, 512]);
    }
}
