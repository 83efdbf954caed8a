//! Cutting a volume into blocks, classifying and hashing them in parallel.
//!
//! This is the hot path of `snapshot create`, `volume restore --delta` and
//! every other command that reads a volume. Blocks are handled in bounded
//! windows: the window's holes are found first (`SEEK_DATA`, no reads),
//! then the pool's workers each read a block with `pread`, check it for
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
    Data { bytes: &'a [u8], id: ChunkId },
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
        let results: Vec<Result<(BlockPos, T)>> = pool.install(|| {
            slots
                .into_par_iter()
                .map(|(pos, has_data, buf)| {
                    let content = if has_data {
                        let bytes = &mut buf[..pos.len];
                        volume.read_exact_at(bytes, pos.offset)?;
                        if is_zero(bytes) {
                            Content::Zero
                        } else {
                            Content::Data {
                                id: namer.name(bytes),
                                bytes,
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
        for r in results {
            let (pos, out) = r?;
            sink(pos, out)?;
        }
        first += count as u64;
    }
    Ok(())
}
