//! `store gc` (mark and sweep) and `store verify`.
//!
//! gc holds the region lock exclusively: no snapshot, restore or verify
//! runs while it marks and sweeps, so a chunk that a snapshot being created
//! right now needs cannot be deleted under it. Every manifest must read
//! cleanly before anything is deleted; one damaged manifest stops gc,
//! because the chunks it names are unknown.

use std::collections::HashSet;

use rayon::prelude::*;

use crate::chunk;
use crate::chunker;
use crate::error::{Error, Result};
use crate::id::{ChunkId, SnapshotId};
use crate::progress::Progress;
use crate::region::Region;
use crate::store::ChunkStore;
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
}

/// Deletes every chunk no snapshot names, and leftover temporary files;
/// with `purge_quarantine`, also the chunks `verify --repair` moved aside.
pub fn gc(region: &Region, purge_quarantine: bool) -> Result<GcReport> {
    let lock = region.lock(LockMode::Exclusive, "store gc")?;
    let cutoff = region.backend().gc_cutoff(&lock)?;
    let mut report = GcReport::default();
    let mut live = HashSet::new();
    for id in region.snapshot_ids()? {
        let m = region.read_snapshot(&id)?;
        live.extend(m.blocks.iter().filter_map(|b| b.chunk().copied()));
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

/// Walks delta chains from `roots`: calls `add(dependent, base)` for each
/// chunk's base and follows the bases for which it returns true (newly
/// seen). Chunks not in the store are skipped: verify reports them.
pub(crate) fn walk_bases(
    store: &dyn ChunkStore,
    roots: impl IntoIterator<Item = ChunkId>,
    mut add: impl FnMut(&ChunkId, ChunkId) -> bool,
) -> Result<()> {
    // Level by level, each level's headers fetched together.
    let mut level: Vec<ChunkId> = roots.into_iter().collect();
    while !level.is_empty() {
        let heads = crate::chunker::map_io(store, &level, |id| {
            store.get_head(id, chunk::DELTA_HEADER_LEN)
        })?;
        let mut next = Vec::new();
        for (id, head) in level.iter().zip(heads) {
            let head = match head {
                Ok(h) => h,
                Err(Error::MissingChunk { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Some(base) = chunk::base_of(&head)
                && add(id, base.id)
            {
                next.push(base.id);
            }
        }
        level = next;
    }
    Ok(())
}

/// Where a chunk is used: one snapshot and the volume offset of its first
/// block with that chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkUse {
    pub snapshot: SnapshotId,
    pub offset: u64,
}

/// A chunk that is missing or does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChunk {
    pub chunk: ChunkId,
    /// `None` for a chunk no snapshot needs.
    pub used_by: Option<ChunkUse>,
    pub problem: String,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub snapshots_checked: u64,
    pub images_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Manifests that did not read back (message per manifest).
    pub damaged_manifests: Vec<String>,
    pub missing_chunks: Vec<BadChunk>,
    pub corrupt_chunks: Vec<BadChunk>,
    /// Chunks in a format or codec this blocksnap does not know (written
    /// by a newer one): reported, never moved aside.
    pub newer_chunks: Vec<BadChunk>,
    /// Stored chunks no snapshot names (reclaimed by gc; not an error).
    pub orphan_chunks: u64,
    /// Corrupt chunks moved aside by `repair`.
    pub quarantined: u64,
    /// Chunks moved aside earlier and still kept (`.bad`).
    pub quarantine_held: u64,
}

impl VerifyReport {
    /// Nothing that a snapshot needs is wrong. A corrupt chunk no snapshot
    /// uses is reported but harms nothing.
    pub fn is_clean(&self) -> bool {
        self.damaged_manifests.is_empty()
            && self.missing_chunks.is_empty()
            && self.corrupt_chunks.iter().all(|b| b.used_by.is_none())
            && self.newer_chunks.iter().all(|b| b.used_by.is_none())
    }
}

/// Checks every manifest and every stored chunk (decompress and re-hash in
/// parallel). With `only`, checks that snapshot and the chunks it names.
pub fn verify(
    region: &Region,
    only: Option<&SnapshotId>,
    threads: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    verify_and_repair(region, only, threads, false, progress)
}

/// [`verify`], and with `repair` move every corrupt chunk aside
/// (`<chunk>.bad`): the snapshots that need it stay unrestorable until a
/// new snapshot of the same data stores the chunk again.
pub fn verify_and_repair(
    region: &Region,
    only: Option<&SnapshotId>,
    threads: usize,
    repair: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let _lock = region.lock(LockMode::Shared, "store verify")?;
    let mut report = VerifyReport::default();
    // Chunk -> first (snapshot, offset) that needs it.
    let mut needed: std::collections::HashMap<ChunkId, ChunkUse> = Default::default();
    let ids = match only {
        Some(id) => vec![id.clone()],
        None => region.snapshot_ids()?,
    };
    for id in ids {
        match region.read_snapshot(&id) {
            Ok(m) => {
                let bs = m.meta.block_size as u64;
                for (i, b) in m.blocks.iter().enumerate() {
                    if let Some(c) = b.chunk() {
                        needed.entry(*c).or_insert_with(|| ChunkUse {
                            snapshot: id.clone(),
                            offset: i as u64 * bs,
                        });
                    }
                }
                report.snapshots_checked += 1;
            }
            Err(e @ Error::SnapshotNotFound { .. }) if only.is_some() => return Err(e),
            Err(e) => report.damaged_manifests.push(e.to_string()),
        }
    }
    if only.is_none() {
        // Snapshot permission files: readable (a damaged one grants
        // nothing, so it is damage to report).
        for name in region.backend().list("snapshot-permissions")? {
            let Some(id) = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<SnapshotId>().ok())
            else {
                continue;
            };
            if let Err(e) = crate::access::read_permissions(region, &id) {
                report.damaged_manifests.push(e.to_string());
            }
        }
        // Image manifests: readable, and every snapshot a registered image
        // maps still there.
        let images = crate::image::list(region)?;
        report
            .damaged_manifests
            .extend(images.damaged.iter().map(|e| e.to_string()));
        for v in &images.images {
            report.images_checked += 1;
            if v.state.state != crate::image::ImageState::Available {
                continue;
            }
            for m in &v.image.block_device_mappings {
                if let Some(e) = m.ebs()
                    && !region.has_snapshot(&e.snapshot_id)?
                {
                    report.damaged_manifests.push(format!(
                        "image {} maps {} to {}, which is missing from region {}",
                        v.image.image_id,
                        m.device_name,
                        e.snapshot_id,
                        region.name()
                    ));
                }
            }
        }
    }
    let store = region.chunks();
    let present: HashSet<ChunkId> = store.list()?.into_iter().collect();
    // Bases of needed delta chunks are needed too, by the same snapshot.
    let roots: Vec<ChunkId> = needed.keys().copied().collect();
    walk_bases(store, roots, |dependent, base| {
        if needed.contains_key(&base) {
            return false;
        }
        let used = needed[dependent].clone();
        needed.insert(base, used);
        true
    })?;
    let to_check: Vec<ChunkId> = match only {
        Some(_) => needed
            .keys()
            .filter(|c| present.contains(c))
            .copied()
            .collect(),
        None => present.iter().copied().collect(),
    };
    for (c, used) in &needed {
        if !present.contains(c) {
            report.missing_chunks.push(BadChunk {
                chunk: *c,
                used_by: Some(used.clone()),
                problem: "missing from the store".into(),
            });
        }
    }
    if only.is_none() {
        report.orphan_chunks = present.iter().filter(|c| !needed.contains_key(c)).count() as u64;
    }

    let pool = chunker::thread_pool_for(region.chunks(), threads, chunker::Work::Fetch)?;
    progress.start("verify", to_check.len() as u64);
    let results: Vec<(ChunkId, Result<u64>)> = pool.install(|| {
        to_check
            .par_iter()
            .map_init(Vec::new, |buf, c| {
                let r = chunk::load_into(store, c, buf).map(|_| buf.len() as u64);
                progress.advance(1);
                (*c, r)
            })
            .collect()
    });
    progress.finish();
    for (c, r) in results {
        report.chunks_checked += 1;
        match r {
            Ok(n) => report.bytes_checked += n,
            Err(e @ Error::NewerChunk { .. }) => report.newer_chunks.push(BadChunk {
                chunk: c,
                used_by: needed.get(&c).cloned(),
                problem: e.to_string(),
            }),
            Err(e) => report.corrupt_chunks.push(BadChunk {
                chunk: c,
                used_by: needed.get(&c).cloned(),
                problem: e.to_string(),
            }),
        }
    }
    if repair {
        for bad in &report.corrupt_chunks {
            store.quarantine(&bad.chunk)?;
            report.quarantined += 1;
        }
    }
    report.missing_chunks.sort_by_key(|b| b.chunk);
    report.corrupt_chunks.sort_by_key(|b| b.chunk);
    report.newer_chunks.sort_by_key(|b| b.chunk);
    report.quarantine_held = store.quarantined()?.len() as u64;
    Ok(report)
}
