//! `volume verify`: compare a volume with a snapshot by hashing its
//! blocks, reading no chunk.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::format::manifest::Block;
use crate::id::{AccountId, SnapshotId};
use crate::ops::access::readable;
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::store::chunk_store::ChunkStore;
use crate::store::pool::{Work, thread_pool_for};
use crate::volume::blocks::{Content, Cut, scan};
use crate::volume::io::Volume;

/// Whether a volume block read as `content` holds what `want` describes.
pub fn holds(want: &Block, content: &Content<'_>) -> bool {
    match (want, content) {
        (Block::Data(id), Content::Data { id: have, .. }) => id == have,
        (Block::Data(_), _) => false,
        (_, Content::Data { .. }) => false,
        _ => true,
    }
}

/// A run of consecutive blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRange {
    pub first_block: u64,
    pub last_block: u64,
    pub offset: u64,
    pub len: u64,
}

/// What `volume verify` found.
#[derive(Debug, Clone)]
pub struct VolumeCheck {
    pub snapshot: SnapshotId,
    pub target: PathBuf,
    pub blocks_checked: u64,
    pub differing_blocks: u64,
    /// Differing blocks, merged into runs.
    pub differing: Vec<BlockRange>,
}

impl VolumeCheck {
    pub fn matches(&self) -> bool {
        self.differing.is_empty()
    }
}

/// Compares a volume (a restored file or a device) with a snapshot without
/// restoring anything: reads and hashes each block of the target and
/// reports the ranges that differ. Reads no chunk.
pub fn verify_volume(
    region: &Region,
    id: &SnapshotId,
    target: &Path,
    caller: &AccountId,
    threads: usize,
    progress: &dyn Progress,
) -> Result<VolumeCheck> {
    readable(region, id, caller, "verify a volume against")?;
    let m = region.read_snapshot(id)?;
    let volume = Volume::open(target)?;
    let pool = thread_pool_for(region.chunks(), threads, Work::Fetch)?;
    let namer = region.chunks_for(&m.meta)?.namer();
    let bs = m.meta.block_size as u64;
    let readable = volume.size().min(m.meta.volume_size);
    let mut check = VolumeCheck {
        snapshot: id.clone(),
        target: target.to_path_buf(),
        blocks_checked: m.blocks.len() as u64,
        differing_blocks: 0,
        differing: Vec::new(),
    };
    let mut note = |index: u64| {
        let offset = index * bs;
        let len = (m.meta.volume_size - offset).min(bs);
        check.differing_blocks += 1;
        match check.differing.last_mut() {
            Some(r) if r.last_block + 1 == index => {
                r.last_block = index;
                r.len += len;
            }
            _ => check.differing.push(BlockRange {
                first_block: index,
                last_block: index,
                offset,
                len,
            }),
        }
    };
    progress.start("verify", m.meta.volume_size);
    // Only whole blocks the target holds can match; a short target
    // differs from its end on.
    let whole = if readable < m.meta.volume_size {
        readable / bs * bs
    } else {
        readable
    };
    scan(
        &volume,
        Cut {
            len: whole,
            block_size: m.meta.block_size,
            namer,
            map: true,
        },
        &pool,
        progress,
        |pos, content| Ok(holds(&m.blocks[pos.index as usize], &content)),
        |pos, same| {
            if !same {
                note(pos.index);
            }
            Ok(())
        },
    )?;
    for index in whole.div_ceil(bs)..m.blocks.len() as u64 {
        note(index);
    }
    progress.finish();
    Ok(check)
}
