//! `store gc`: mark and sweep.
//!
//! gc holds the region lock exclusively: no snapshot, restore or verify
//! runs while it marks and sweeps, so a chunk that a snapshot being created
//! right now needs cannot be deleted under it. Every manifest must read
//! cleanly before anything is deleted; one damaged manifest stops gc,
//! because the chunks it names are unknown.

use std::collections::HashSet;
use std::time::SystemTime;

use crate::error::Result;
use crate::id::ChunkId;
use crate::ops::recycle::{purge_images, purge_snapshots};
use crate::region::catalog::Region;
use crate::store::chain::walk_bases;
use crate::sys::LockMode;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub snapshots: u64,
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub temp_files_removed: u64,
    /// Chunks moved aside by `verify --repair`, kept for inspection.
    pub quarantined_kept: u64,
    /// Quarantined chunks deleted (`--purge-quarantine`).
    pub quarantined_removed: u64,
    /// Snapshots in the recycle bin, whose chunks are kept.
    pub binned_kept: u64,
    /// Snapshots and images past their recycle bin retention, purged.
    pub binned_purged: u64,
}

/// Deletes every chunk no snapshot names, and leftover temporary files;
/// with `purge_quarantine`, also the chunks `verify --repair` moved aside.
/// First purges what the recycle bin holds past its retention.
pub fn gc(region: &Region, purge_quarantine: bool) -> Result<GcReport> {
    gc_at(region, purge_quarantine, SystemTime::now())
}

/// [`gc`] at time `now` (which decides what the recycle bin purges).
pub fn gc_at(region: &Region, purge_quarantine: bool, now: SystemTime) -> Result<GcReport> {
    let lock = region.lock(LockMode::Exclusive, "store gc")?;
    let cutoff = region.backend().gc_cutoff(&lock)?;
    let mut report = GcReport::default();
    let mut live = HashSet::new();
    let binned = purge_snapshots(region, now)?;
    report.binned_purged = binned.snapshots + purge_images(region, now)?;
    for id in &binned.kept {
        live.extend(region.binned_snapshot_chunk_names(id)?);
        report.binned_kept += 1;
    }
    for id in region.snapshot_ids()? {
        // By name, from the manifest's name table: no key needed.
        live.extend(region.snapshot_chunk_names(&id)?);
        report.snapshots += 1;
    }
    let store = region.chunks();
    // A base is live while any delta on it is.
    let roots: Vec<ChunkId> = live.iter().copied().collect();
    walk_bases(store, roots, |_, base| live.insert(base))?;
    for chunk in store.list_stored()? {
        let young = matches!((cutoff, chunk.written), (Some(c), Some(w)) if w > c);
        if live.contains(&chunk.id) || young {
            report.chunks_kept += 1;
        } else {
            report.bytes_removed += chunk.size;
            store.remove(&chunk.id)?;
            report.chunks_removed += 1;
        }
    }
    report.temp_files_removed = store.remove_leftovers()? + region.backend().remove_leftovers()?;
    if purge_quarantine {
        report.quarantined_removed = store.purge_quarantined()?;
    } else {
        report.quarantined_kept = store.quarantined()?.len() as u64;
    }
    Ok(report)
}
