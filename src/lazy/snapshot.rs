//! Snapshots of lazy volumes in proportion to what changed: only the
//! blocks the dirty map names are read, hashed and stored; every other
//! block is taken from the snapshot underneath without being read. All
//! overlays of one request are paused together, so the snapshots are of
//! one instant (writes acknowledged before it are in, later ones are
//! not); then each new snapshot goes underneath its overlay and the dirty
//! map starts again empty.

use std::sync::Arc;

use rayon::prelude::*;

use crate::error::Result;
use crate::format::manifest::{self, Block, Tag};
use crate::id::AccountId;
use crate::lazy::overlay::{Overlay, Paused};
use crate::ops::access::readable;
use crate::ops::snapshot::{self, Outcome, Taken, validate_labels};
use crate::region::catalog::Region;
use crate::store::chunk_store::ChunkStore;
use crate::store::{chain, pool};
use crate::sys::LockMode;

#[derive(Debug, Clone, Default)]
pub struct LazySnapshotOptions {
    pub description: String,
    pub tags: Vec<Tag>,
    /// `None`: the region's default owner.
    pub owner: Option<AccountId>,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Store changed blocks as deltas against the parent's where smaller.
    pub no_delta: bool,
}

/// One snapshot of a lazy volume, and what it cost.
pub type LazySnapshot = crate::ops::snapshot::Incremental;

/// One overlay to snapshot, and the `source` its snapshot records.
pub struct Target<'a> {
    pub overlay: &'a Overlay,
    pub source: String,
}

/// Snapshots every overlay of `targets` at one instant, then puts each
/// new snapshot underneath its overlay.
pub fn snapshot_overlays(
    region: &Region,
    targets: &[Target],
    opts: &LazySnapshotOptions,
) -> Result<Vec<LazySnapshot>> {
    validate_labels(&opts.description, &opts.tags)?;
    let _lock = region.lock(LockMode::Shared, "snapshot create")?;
    // The parent is taken unread: its owner must let the new owner read
    // it, as for any explicit parent.
    let owner = region.caller(opts.owner.as_ref());
    for t in targets {
        readable(
            region,
            &t.overlay.base().meta().id,
            &owner,
            "take as a parent",
        )?;
    }
    let paused = targets
        .iter()
        .map(|t| t.overlay.pause())
        .collect::<Result<Vec<_>>>()?;
    let mut taken = Vec::new();
    for (t, p) in targets.iter().zip(&paused) {
        match take(region, p, &t.source, opts) {
            Ok(s) => taken.push(s),
            Err(e) => {
                // Nothing is underneath yet: the snapshots taken so far are
                // of no use on their own.
                for s in &taken {
                    let _ = region.delete_snapshot(&s.meta.id);
                }
                return Err(e);
            }
        }
    }
    for (p, s) in paused.iter().zip(&taken) {
        p.rebase(&s.meta.id)?;
    }
    Ok(taken)
}

/// Snapshots one paused overlay: reads the blocks its dirty map names,
/// takes the rest from the snapshot underneath.
fn take(
    region: &Region,
    paused: &Paused,
    source: &str,
    opts: &LazySnapshotOptions,
) -> Result<LazySnapshot> {
    let overlay = paused.overlay();
    let base = overlay.base();
    let parent = base.manifest();
    let block_size = parent.meta.block_size;
    let bs = block_size as u64;
    let size = overlay.size();
    let count = manifest::block_count(size, block_size);
    let dirty = paused.dirty_blocks(bs)?;
    let read_count = dirty.len() as u64;

    // Under the key of the snapshot underneath, as every incremental is.
    let keyed = region.chunks_for(&parent.meta)?;
    let store: &dyn ChunkStore = &keyed;
    let pool = pool::thread_pool_for(store, opts.threads, pool::Work::Compute)?;
    let committed = region.snapshot_committed_at(&parent.meta.id)?;
    let read: Vec<(u64, Outcome)> = pool.install(|| {
        dirty
            .par_iter()
            .map(|&i| {
                let len = bs.min(size - i * bs) as usize;
                // The parent's block, loaded once: the base of the new
                // bytes and of their delta.
                let parent_block = parent.blocks.get(i as usize);
                let mut base_raw = Vec::new();
                let depth = match parent_block {
                    Some(Block::Data(id)) => chain::load_into(store, id, &mut base_raw)?,
                    _ => 0,
                };
                // A delta's base is the chunk as stored, never padded.
                let stored_len = base_raw.len();
                base_raw.resize(len, 0);
                let mut bytes = base_raw.clone();
                paused.read_dirty_into(i * bs, &mut bytes)?;
                let outcome = if bytes.iter().all(|&b| b == 0) {
                    Outcome::Zero
                } else {
                    snapshot::store_block(
                        store,
                        parent_block,
                        committed,
                        &bytes,
                        store.namer().name(&bytes),
                        !opts.no_delta,
                        Some((&base_raw[..stored_len], depth)),
                    )?
                };
                Ok((i, outcome))
            })
            .collect::<Result<Vec<_>>>()
    })?;

    let (blocks, stats) = snapshot::merge_with_parent(&parent.blocks, size, block_size, read);
    let meta = snapshot::commit(
        region,
        Taken {
            parent: Some(parent.meta.id.clone()),
            owner: region.caller(opts.owner.as_ref()),
            volume_size: size,
            block_size,
            description: opts.description.clone(),
            tags: opts.tags.clone(),
            source: source.to_string(),
            blocks,
            stats,
            kms_key_id: parent.meta.kms_key_id,
        },
    )?;
    Ok(LazySnapshot {
        meta,
        blocks_read: read_count,
        blocks_taken: count - read_count,
    })
}

/// Snapshots one overlay this process holds (see [`snapshot_overlays`]).
pub fn snapshot_overlay(
    region: &Region,
    overlay: &Arc<Overlay>,
    source: String,
    opts: &LazySnapshotOptions,
) -> Result<LazySnapshot> {
    let targets = [Target {
        overlay: overlay.as_ref(),
        source,
    }];
    Ok(snapshot_overlays(region, &targets, opts)?.remove(0))
}
