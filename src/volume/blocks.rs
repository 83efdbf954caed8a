//! Cutting a volume into blocks, classifying and hashing them in parallel.
//!
//! This is the hot path of `snapshot create`, `volume restore --delta` and
//! every other command that reads a volume. Blocks are handled in bounded
//! windows: the window's holes are found first (`SEEK_DATA`, no reads),
//! then the pool's workers each read a block (with `pread`, or in place
//! from a mapping of the window where the caller allows it), check it for
//! zeros and hash it with BLAKE3, and hand it to the caller's `visit`
//! closure, still on the worker. Results come back in block order to
//! `sink` on the calling thread. Memory is one window of buffers, whatever
//! the volume's size.

use rayon::prelude::*;

use crate::error::{IoContext, Result};
use crate::id::{ChunkId, Namer};
use crate::progress::Progress;
use crate::volume::io::{Volume, is_zero};

/// Bytes of block buffers in flight at once (at least two blocks a thread).
const WINDOW_BYTES: usize = 32 << 20;

/// What a block of the volume holds.
pub enum Content<'a> {
    /// Entirely unallocated: not read.
    Hole,
    /// Read, and all zeros.
    Zero,
    /// Read, with its name (BLAKE3, keyed for an encrypted snapshot).
    /// `mapped`: `bytes` is a view of the volume itself, which a writer may
    /// change while it is read; whatever is kept must be copied (and named
    /// again from the copy, see [`steady`]).
    Data {
        bytes: &'a [u8],
        id: ChunkId,
        mapped: bool,
    },
}

/// Where a block is.
#[derive(Debug, Clone, Copy)]
pub struct BlockPos {
    pub index: u64,
    pub offset: u64,
    /// The block size, or less for the last block.
    pub len: usize,
}

/// How a volume is cut: its first `len` bytes, in blocks of `block_size`,
/// each named by `namer`.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub len: u64,
    pub block_size: u32,
    pub namer: Namer,
    /// Read blocks in place from a mapping of each window rather than
    /// copying them out of the page cache (files and block devices). For
    /// callers that mostly hash and compare: an incremental or a delta
    /// restore copied 2.9 GB of a 4 GiB image only to hash it, a third of
    /// its CPU time.
    pub map: bool,
}

thread_local! {
    static STEADY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with bytes of a block that cannot change while `f` runs and
/// their name: `bytes` and `id` themselves when they were read into a
/// buffer; a copy named anew when they are a view of a mapped volume (a
/// writer may have changed them since they were hashed, and a chunk must
/// hold exactly what its name says).
pub fn steady<T>(
    bytes: &[u8],
    id: ChunkId,
    mapped: bool,
    namer: Namer,
    f: impl FnOnce(&[u8], ChunkId) -> T,
) -> T {
    if !mapped {
        return f(bytes, id);
    }
    STEADY.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        buf.extend_from_slice(bytes);
        let id = namer.name(&buf);
        f(&buf, id)
    })
}

/// Reads `volume` as `cut` says, calls `visit` for each block on the
/// pool's workers (in any order), and passes the results to `sink` in
/// block order.
pub fn scan<T: Send>(
    volume: &Volume,
    cut: Cut,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
    visit: impl Fn(BlockPos, Content<'_>) -> Result<T> + Sync,
    mut sink: impl FnMut(BlockPos, T) -> Result<()>,
) -> Result<()> {
    let Cut {
        len,
        block_size,
        namer,
        map: in_place,
    } = cut;
    let bs = block_size as usize;
    let window = (WINDOW_BYTES / bs).max(pool.current_num_threads() * 2);
    let blocks = len.div_ceil(block_size as u64);
    let mut buffers: Vec<Vec<u8>> = Vec::new();
    let mut map = volume.data_map();
    let mut first = 0u64;
    while first < blocks {
        let count = window.min((blocks - first) as usize);
        // Only allocate as many buffers as the largest window needs.
        while buffers.len() < count {
            buffers.push(vec![0u8; bs]);
        }
        let mut slots = Vec::with_capacity(count);
        for (k, buf) in buffers.iter_mut().take(count).enumerate() {
            let index = first + k as u64;
            let offset = index * block_size as u64;
            let blen = (len - offset).min(block_size as u64);
            let has_data = map
                .has_data(offset, offset + blen)
                .ctx("find holes in", volume.path())?;
            let pos = BlockPos {
                index,
                offset,
                len: blen as usize,
            };
            slots.push((pos, has_data, buf));
        }
        let start = first * block_size as u64;
        let end = (start + (count * bs) as u64).min(len);
        // A window of holes is not mapped: the mapping's read-ahead advice
        // would fill the page cache with their zeros (an incremental of a
        // 64 GiB volume holding 12 MiB took 19 s doing so, against 0.1 s
        // for its full snapshot).
        let view = if in_place && slots.iter().any(|(_, has_data, _)| *has_data) {
            volume.map(start, (end - start) as usize)
        } else {
            None
        };
        let results: Vec<Result<(BlockPos, T)>> = pool.install(|| {
            slots
                .into_par_iter()
                .map(|(pos, has_data, buf)| {
                    let content = if has_data {
                        let (bytes, mapped) = match &view {
                            Some(v) => {
                                let at = (pos.offset - start) as usize;
                                (&v.bytes()[at..at + pos.len], true)
                            }
                            None => {
                                let bytes = &mut buf[..pos.len];
                                volume.read_exact_at(bytes, pos.offset)?;
                                (&*bytes, false)
                            }
                        };
                        if is_zero(bytes) {
                            Content::Zero
                        } else {
                            Content::Data {
                                id: namer.name(bytes),
                                bytes,
                                mapped,
                            }
                        }
                    } else {
                        Content::Hole
                    };
                    let out = visit(pos, content)?;
                    progress.advance(pos.len as u64);
                    Ok((pos, out))
                })
                .collect()
        });
        if view.as_ref().is_some_and(|v| v.faulted()) {
            return Err(unreadable(volume, start, end, &mut buffers[0]));
        }
        for r in results {
            let (pos, out) = r?;
            sink(pos, out)?;
        }
        first += count as u64;
    }
    Ok(())
}

/// Why `[start, end)` of `volume` could not be read through its mapping:
/// the error a `pread` of it meets (the volume shrank, an I/O error).
fn unreadable(volume: &Volume, start: u64, end: u64, buf: &mut [u8]) -> crate::error::Error {
    let mut at = start;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        if let Err(e) = volume.read_exact_at(&mut buf[..n], at) {
            return e;
        }
        at += n as u64;
    }
    crate::error::Error::Io {
        op: "read volume",
        path: volume.path().to_path_buf(),
        source: std::io::Error::other("a page of the mapped volume could not be read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::progress::NoProgress;
    use std::sync::Mutex;

    /// Each block's index, name (`None`: zeros or a hole) and whether it
    /// was mapped; `during` runs once, as the first block is visited.
    fn scan_all(
        volume: &Volume,
        len: u64,
        map: bool,
        during: impl FnOnce() + Send,
    ) -> Result<Vec<(u64, Option<ChunkId>, bool)>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let found = Mutex::new(Vec::new());
        let during = Mutex::new(Some(during));
        scan(
            volume,
            Cut {
                len,
                block_size: 64 << 10,
                namer: Namer::Plain,
                map,
            },
            &pool,
            &NoProgress,
            |pos, content| {
                if let Some(f) = during.lock().unwrap().take() {
                    f();
                }
                let (id, mapped) = match content {
                    Content::Data { bytes, id, mapped } => {
                        // Mapped bytes may change after they were named
                        // (this test truncates the file under the scan):
                        // `steady` copies and names them again before a
                        // block is stored. Copied bytes cannot change.
                        if !mapped {
                            assert_eq!(ChunkId::of(bytes), id);
                        }
                        (Some(id), mapped)
                    }
                    Content::Zero | Content::Hole => (None, false),
                };
                found.lock().unwrap().push((pos.index, id, mapped));
                Ok(())
            },
            |_, ()| Ok(()),
        )?;
        let mut found = found.into_inner().unwrap();
        found.sort();
        Ok(found)
    }

    #[test]
    fn a_mapped_scan_names_blocks_as_a_copying_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let mut data: Vec<u8> = (0..(3u32 << 20) + 12_345)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        data[1 << 20..(1 << 20) + (64 << 10)].fill(0);
        std::fs::write(&path, &data).unwrap();
        let volume = Volume::open(&path).unwrap();
        let len = data.len() as u64;
        let copied = scan_all(&volume, len, false, || ()).unwrap();
        let mapped = scan_all(&volume, len, true, || ()).unwrap();
        assert_eq!(copied.len(), 49);
        let strip = |v: &[(u64, Option<ChunkId>, bool)]| {
            v.iter().map(|(i, id, _)| (*i, *id)).collect::<Vec<_>>()
        };
        assert_eq!(strip(&copied), strip(&mapped));
        assert!(copied.iter().all(|b| !b.2));
        assert!(mapped.iter().filter(|b| b.1.is_some()).all(|b| b.2));
        assert_eq!(mapped[16].1, None, "the zero block");
    }

    #[test]
    fn a_volume_that_shrinks_under_a_mapped_scan_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        for map in [false, true] {
            std::fs::write(&path, vec![9u8; 4 << 20]).unwrap();
            let volume = Volume::open(&path).unwrap();
            // Shrinks while the first window is being read, after its holes
            // were looked up: the blocks past the new end are read (or
            // mapped) and find nothing.
            let shrink = || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(1 << 20)
                    .unwrap()
            };
            let err = scan_all(&volume, 4 << 20, map, shrink).unwrap_err();
            assert!(
                matches!(err, Error::VolumeShrank { .. }),
                "map {map}: {err}"
            );
        }
    }

    #[test]
    fn steady_bytes_are_a_copy_named_from_the_copy() {
        let bytes = vec![5u8; 1000];
        let wrong = ChunkId::of(b"not these bytes");
        steady(&bytes, wrong, true, Namer::Plain, |b, id| {
            assert_eq!(b, &bytes[..]);
            assert_ne!(b.as_ptr(), bytes.as_ptr());
            assert_eq!(id, ChunkId::of(&bytes));
        });
        steady(&bytes, wrong, false, Namer::Plain, |b, id| {
            assert_eq!(b.as_ptr(), bytes.as_ptr());
            assert_eq!(id, wrong);
        });
    }
}
