//! A parent for a volume with no lineage of its own: a copy of an image
//! file, or a disk at a new path. Without one, every changed block of the
//! copy is stored whole; with one, as a small delta against the block it
//! came from.
//!
//! The region's snapshots of the same size are candidates (the newest of
//! each source path, and of the acting account only). A sample of the
//! volume's data blocks, spread evenly over it, is named as a snapshot
//! would name it; a candidate's score is how many sampled blocks its
//! manifest holds at the same index. Only manifests are read, never a
//! chunk. The best candidate is taken if it shares at least a tenth of the
//! sample: a copy shares every block its writes missed (a 512 KiB block
//! escapes 1 % of random 4 KiB writes with odds 0.99^128 = 28 %), while
//! two unrelated volumes share almost none (zero blocks are not counted).

use std::collections::BTreeMap;

use crate::error::Result;
use crate::format::manifest::{self, Block, SnapshotMeta};
use crate::id::{ChunkId, KeyId, Namer};
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::volume::io::{Volume, is_zero};

/// How many blocks of the volume are read and named.
pub const SAMPLE: u64 = 128;
/// How many candidate lineages are compared, newest first.
pub const CANDIDATES: usize = 16;

/// The parent found, and the evidence.
pub struct Found {
    pub meta: SnapshotMeta,
    /// Sampled data blocks the parent holds at the same index.
    pub same: usize,
    /// Data blocks sampled (zero blocks are not).
    pub sampled: usize,
}

impl Found {
    /// Why this parent, in words.
    pub fn reason(&self) -> String {
        format!(
            "{} of {} sampled data blocks are the same in {} (of {})",
            self.same, self.sampled, self.meta.id, self.meta.source
        )
    }
}

/// The best parent for `volume` among `snapshots` (the acting account's
/// own, their meta opened), if one shares enough of it.
/// `block_size` narrows the candidates to those of that block size. A
/// candidate that cannot be read (a damaged manifest, a key that cannot be
/// used) is passed over with a warning: it could not be a parent anyway.
pub fn find(
    region: &Region,
    volume: &Volume,
    block_size: Option<u32>,
    snapshots: Vec<SnapshotMeta>,
    progress: &dyn Progress,
) -> Result<Option<Found>> {
    // The newest snapshot of each source path of the same size.
    let mut newest: BTreeMap<String, SnapshotMeta> = BTreeMap::new();
    for m in snapshots {
        if m.sealed
            || m.volume_size != volume.size()
            || block_size.is_some_and(|b| b != m.block_size)
        {
            continue;
        }
        match newest.get(&m.source) {
            Some(n) if n.created_ns >= m.created_ns => {}
            _ => {
                newest.insert(m.source.clone(), m);
            }
        }
    }
    let mut candidates: Vec<SnapshotMeta> = newest.into_values().collect();
    candidates.sort_by_key(|m| std::cmp::Reverse(m.created_ns));
    candidates.truncate(CANDIDATES);
    let mut by_size: BTreeMap<u32, Vec<SnapshotMeta>> = BTreeMap::new();
    for c in candidates {
        by_size.entry(c.block_size).or_default().push(c);
    }

    let mut best: Option<Found> = None;
    for (block_size, group) in by_size {
        // The sample is read once per block size, and named under each key.
        let mut keys: Vec<Option<KeyId>> = group.iter().map(|c| c.kms_key_id).collect();
        keys.sort();
        keys.dedup();
        let mut namers = Vec::with_capacity(keys.len());
        keys.retain(|k| match k {
            None => {
                namers.push(Namer::Plain);
                true
            }
            Some(k) => match region.keys().data_key(k) {
                Ok(d) => {
                    namers.push(d.namer());
                    true
                }
                Err(e) => {
                    progress.warn(&format!("not comparing with snapshots under key {k}: {e}"));
                    false
                }
            },
        });
        let named = sample(volume, block_size, &namers)?;
        for c in group {
            let Ok(under) = keys.binary_search(&c.kms_key_id) else {
                continue;
            };
            let blocks = match region.read_snapshot(&c.id) {
                Ok(m) => m.blocks,
                Err(e) => {
                    progress.warn(&format!("not comparing with {}: {e}", c.id));
                    continue;
                }
            };
            let same = named
                .iter()
                .filter(|(i, ids)| blocks.get(*i as usize) == Some(&Block::Data(ids[under])))
                .count();
            if best.as_ref().is_none_or(|b| same > b.same) {
                best = Some(Found {
                    meta: c,
                    same,
                    sampled: named.len(),
                });
            }
        }
    }
    Ok(best.filter(|b| b.same >= 2 && b.same * 10 >= b.sampled))
}

/// Up to [`SAMPLE`] data blocks of `volume` cut in `block_size` blocks,
/// spread evenly over it: each block's index and its name under each of
/// `namers`. Zero blocks (holes read as zeros) are left out.
fn sample(volume: &Volume, block_size: u32, namers: &[Namer]) -> Result<Vec<(u64, Vec<ChunkId>)>> {
    let count = manifest::block_count(volume.size(), block_size);
    let step = count.div_ceil(SAMPLE).max(1);
    let mut out = Vec::new();
    let mut buf = vec![0u8; block_size as usize];
    for index in (0..count).step_by(step as usize) {
        let at = index * block_size as u64;
        let len = (volume.size() - at).min(block_size as u64) as usize;
        volume.read_exact_at(&mut buf[..len], at)?;
        if !is_zero(&buf[..len]) {
            out.push((index, namers.iter().map(|n| n.name(&buf[..len])).collect()));
        }
    }
    Ok(out)
}
