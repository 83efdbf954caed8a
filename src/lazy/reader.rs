//! A snapshot read in place: any byte range, fetching, verifying and
//! decompressing only the chunks it touches, with a bounded cache of
//! decoded blocks. Hole and zero blocks read as zeros without I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::format::key::DataKey;
use crate::format::manifest::{Block, Manifest, SnapshotMeta};
use crate::id::{ChunkId, SnapshotId};
use crate::region::catalog::Region;
use crate::store::chain::load_into;
use crate::store::sealed::Keyed;

/// The default cache of decoded blocks (`--cache`).
pub const DEFAULT_CACHE: usize = 64 << 20;

/// A read that failed on a chunk: which chunk, where in the volume.
#[derive(Debug)]
pub struct ReadFailure {
    pub snapshot: SnapshotId,
    pub chunk: ChunkId,
    pub offset: u64,
    pub error: Error,
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chunk {} of {} (volume offset {}): {}",
            self.chunk.short(),
            self.snapshot,
            self.offset,
            self.error
        )
    }
}

/// A snapshot of a region, readable at any offset.
pub struct LazyVolume {
    region: Arc<Region>,
    manifest: Manifest,
    /// The snapshot's key, unlocked once, when it is encrypted.
    key: Option<Arc<DataKey>>,
    cache: Mutex<Cache>,
}

/// Decoded blocks by chunk, least recently used evicted first once their
/// bytes pass the budget.
struct Cache {
    budget: usize,
    used: usize,
    tick: u64,
    blocks: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
}

impl Cache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        self.blocks.get_mut(id).map(|(b, t)| {
            *t = tick;
            b.clone()
        })
    }

    fn insert(&mut self, id: ChunkId, block: Arc<Vec<u8>>) {
        if block.len() > self.budget {
            return;
        }
        while self.used + block.len() > self.budget {
            let Some(oldest) = self
                .blocks
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((b, _)) = self.blocks.remove(&oldest) {
                self.used -= b.len();
            }
        }
        self.tick += 1;
        self.used += block.len();
        if let Some((old, _)) = self.blocks.insert(id, (block, self.tick)) {
            self.used -= old.len();
        }
    }
}

impl LazyVolume {
    /// Snapshot `id` of `region`, with `cache` bytes of decoded blocks.
    pub fn open(region: Arc<Region>, id: &SnapshotId, cache: usize) -> Result<LazyVolume> {
        let manifest = region.read_snapshot(id)?;
        let key = region.chunks_for(&manifest.meta)?.key().cloned();
        Ok(LazyVolume {
            manifest,
            key,
            region,
            cache: Mutex::new(Cache {
                budget: cache,
                used: 0,
                tick: 0,
                blocks: HashMap::new(),
            }),
        })
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.manifest.meta
    }

    pub fn size(&self) -> u64 {
        self.manifest.meta.volume_size
    }

    fn block_size(&self) -> u64 {
        self.manifest.meta.block_size as u64
    }

    /// Fills `buf` from `offset`; the range must lie inside the volume.
    pub fn read_at(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), Box<ReadFailure>> {
        let bs = self.block_size();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let index = at / bs;
            let within = (at % bs) as usize;
            let block_len = (self.size() - index * bs).min(bs) as usize;
            let n = (block_len - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match &self.manifest.blocks[index as usize] {
                Block::Hole | Block::Zero => out.fill(0),
                Block::Data(id) => {
                    let block = self.chunk(id).map_err(|error| {
                        Box::new(ReadFailure {
                            snapshot: self.manifest.meta.id.clone(),
                            chunk: *id,
                            offset: index * bs,
                            error,
                        })
                    })?;
                    out.copy_from_slice(&block[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The first offset at or after `offset` inside a data block (what
    /// `SEEK_DATA` answers); `None` when only holes and zeros follow.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        self.next(offset, true)
    }

    /// The first offset at or after `offset` inside a hole or zero block,
    /// or the end of the volume (what `SEEK_HOLE` answers).
    pub fn next_hole(&self, offset: u64) -> u64 {
        self.next(offset, false).unwrap_or(self.size())
    }

    fn next(&self, offset: u64, data: bool) -> Option<u64> {
        let bs = self.block_size();
        let first = offset / bs;
        let found = self.manifest.blocks[first.min(self.manifest.blocks.len() as u64) as usize..]
            .iter()
            .position(|b| matches!(b, Block::Data(_)) == data)?;
        Some((first + found as u64) * bs).map(|at| at.max(offset))
    }

    /// The runs of `[offset, offset + len)`, clipped to the volume: each a
    /// length and whether it holds data (`false`: a hole or zeros).
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let bs = self.block_size();
        let end = offset.saturating_add(len).min(self.size());
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let index = at / bs;
            let next = ((index + 1) * bs).min(end);
            let data = matches!(self.manifest.blocks[index as usize], Block::Data(_));
            match runs.last_mut() {
                Some((n, d)) if *d == data => *n += next - at,
                _ => runs.push((next - at, data)),
            }
            at = next;
        }
        runs
    }

    /// The decoded bytes of chunk `id`, from the cache or the store
    /// (verified against its name on the way).
    fn chunk(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self.cache.lock().expect("cache lock").get(id) {
            return Ok(b);
        }
        let mut raw = Vec::new();
        load_into(
            &Keyed::new(self.region.chunks(), self.key.clone()),
            id,
            &mut raw,
        )?;
        let raw = Arc::new(raw);
        self.cache
            .lock()
            .expect("cache lock")
            .insert(*id, raw.clone());
        Ok(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_within_its_budget_and_keeps_the_recent() {
        let mut c = Cache {
            budget: 10,
            used: 0,
            tick: 0,
            blocks: HashMap::new(),
        };
        let id = |n: u8| ChunkId([n; 32]);
        c.insert(id(1), Arc::new(vec![0; 4]));
        c.insert(id(2), Arc::new(vec![0; 4]));
        assert!(c.get(&id(1)).is_some());
        c.insert(id(3), Arc::new(vec![0; 4]));
        assert!(c.used <= 10);
        assert!(
            c.get(&id(2)).is_none(),
            "the least recently used goes first"
        );
        assert!(c.get(&id(1)).is_some() && c.get(&id(3)).is_some());
        c.insert(id(4), Arc::new(vec![0; 11]));
        assert!(
            c.get(&id(4)).is_none(),
            "a block over the whole budget is not kept"
        );
    }
}
