//! `store verify`: every manifest, image and permission file of a region
//! read back, every chunk decompressed and re-hashed; with `--repair`,
//! corrupt chunks moved aside.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::chunk;
use crate::format::image::ImageState;
use crate::format::key::DataKey;
use crate::id::{ChunkId, KeyId, Namer, SnapshotId};
use crate::ops::recycle::binned_snapshots;
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::region::{images, permissions};
use crate::store::chain::{load_into, walk_bases};
use crate::store::chunk_store::ChunkStore;
use crate::store::pool::{Work, thread_pool_for};
use crate::store::sealed::Keyed;
use crate::sys::LockMode;

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
    /// Encrypted snapshots whose block lists could not be authenticated
    /// (no usable key): only their structure and checksums were checked.
    pub snapshots_unauthenticated: u64,
    /// Encrypted chunks whose key was not usable: only their structure
    /// was checked.
    pub chunks_unchecked: u64,
    /// Why keys were not usable (the first reason per key).
    pub key_problems: Vec<String>,
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
/// Records that snapshot `id`, under `key`, needs each chunk of `names`
/// (known by name only: no offset).
fn need_all(
    needed: &mut HashMap<ChunkId, ChunkUse>,
    under: &mut HashMap<ChunkId, Option<KeyId>>,
    id: &SnapshotId,
    key: Option<KeyId>,
    names: Vec<ChunkId>,
) {
    for c in names {
        under.entry(c).or_insert(key);
        needed.entry(c).or_insert_with(|| ChunkUse {
            snapshot: id.clone(),
            offset: 0,
        });
    }
}

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
    // Chunk -> the key the snapshots that need it are under (`None`:
    // plain): a chunk is checked under that key, whatever its trailer says.
    let mut under: HashMap<ChunkId, Option<KeyId>> = HashMap::new();
    let mut key_problems: Vec<String> = Vec::new();
    for id in ids {
        let read = match region.read_snapshot(&id) {
            // Without the key: the name table, checked by its checksum.
            Err(Error::Key(why)) => {
                if !key_problems.contains(&why) {
                    key_problems.push(why);
                }
                report.snapshots_unauthenticated += 1;
                let names = region
                    .read_snapshot_meta(&id)
                    .and_then(|m| Ok((m.kms_key_id, region.snapshot_chunk_names(&id)?)));
                match names {
                    Ok((key, names)) => {
                        need_all(&mut needed, &mut under, &id, key, names);
                        report.snapshots_checked += 1;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match read {
            Ok(m) => {
                let bs = m.meta.block_size as u64;
                for (i, b) in m.blocks.iter().enumerate() {
                    if let Some(c) = b.chunk() {
                        under.entry(*c).or_insert(m.meta.kms_key_id);
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
        // Snapshots in the recycle bin: the chunks they name (from the name
        // table, no key needed) must be there and sound to bring them back.
        for e in binned_snapshots(region)? {
            let Ok(id) = e.id.parse::<SnapshotId>() else {
                continue;
            };
            let names = region
                .read_binned_snapshot_meta(&id)
                .and_then(|m| Ok((m.kms_key_id, region.binned_snapshot_chunk_names(&id)?)));
            match names {
                Ok((key, names)) => {
                    need_all(&mut needed, &mut under, &id, key, names);
                    report.snapshots_checked += 1;
                }
                Err(e) => report.damaged_manifests.push(e.to_string()),
            }
        }
        // Snapshot permission files: readable (a damaged one grants
        // nothing, so it is damage to report).
        for id in permissions::listed(region)? {
            if let Err(e) = permissions::read(region, &id) {
                report.damaged_manifests.push(e.to_string());
            }
        }
        // Image manifests: readable, and every snapshot a registered image
        // maps still there.
        let images = images::list(region)?;
        report
            .damaged_manifests
            .extend(images.damaged.iter().map(|e| e.to_string()));
        for v in &images.images {
            report.images_checked += 1;
            if v.state.state != ImageState::Available {
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
        under.insert(base, under.get(dependent).copied().flatten());
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

    let pool = thread_pool_for(region.chunks(), threads, Work::Fetch)?;
    let views = KeyViews::new(region);
    progress.start("verify", to_check.len() as u64);
    let results: Vec<(ChunkId, Result<Option<u64>>)> = pool.install(|| {
        to_check
            .par_iter()
            .map_init(Vec::new, |buf, c| {
                let r = check_chunk(store, &views, c, under.get(c).copied(), buf);
                progress.advance(1);
                (*c, r)
            })
            .collect()
    });
    progress.finish();
    for why in views.problems() {
        if !key_problems.contains(&why) {
            key_problems.push(why);
        }
    }
    report.key_problems = key_problems;
    for (c, r) in results {
        report.chunks_checked += 1;
        match r {
            Ok(Some(n)) => report.bytes_checked += n,
            Ok(None) => report.chunks_unchecked += 1,
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

/// The keys of a region as `store verify` meets them in chunk headers:
/// each unlocked once, or remembered as unusable (and why).
struct KeyViews<'a> {
    region: &'a Region,
    keys: Mutex<HashMap<KeyId, std::result::Result<Arc<DataKey>, String>>>,
}

impl<'a> KeyViews<'a> {
    fn new(region: &'a Region) -> KeyViews<'a> {
        KeyViews {
            region,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// The usable key `id`; `None` when it is not (no passphrase, not
    /// granted, disabled, wrong passphrase).
    fn get(&self, id: &KeyId) -> Result<Option<Arc<DataKey>>> {
        let mut keys = self.keys.lock().expect("key views lock");
        if !keys.contains_key(id) {
            let k = match self.region.keys().data_key(id) {
                Ok(k) => Ok(k),
                Err(Error::Key(why)) => Err(why),
                Err(e) => return Err(e),
            };
            keys.insert(*id, k);
        }
        Ok(keys[id].as_ref().ok().cloned())
    }

    fn problems(&self) -> Vec<String> {
        let keys = self.keys.lock().expect("key views lock");
        keys.values()
            .filter_map(|k| k.as_ref().err().cloned())
            .collect()
    }
}

/// Reads chunk `c` back whole and checks it against its name: its raw
/// length; `None` when it is encrypted under a key this command cannot
/// use, and only its header's structure was checked. `expected`: the key
/// of the snapshots that need it (`Some(None)`: plain ones); `None` for a
/// chunk no snapshot needs, checked under the key its trailer names.
fn check_chunk(
    store: &dyn ChunkStore,
    views: &KeyViews,
    c: &ChunkId,
    expected: Option<Option<KeyId>>,
    buf: &mut Vec<u8>,
) -> Result<Option<u64>> {
    let stored = store.get(c)?;
    let sealed = chunk::is_sealed(&stored);
    let named = match expected {
        Some(k) => k,
        None if sealed => match chunk::sealed_key_of(&stored) {
            Some(k) => Some(k),
            None => {
                return Err(Error::CorruptChunk {
                    chunk: *c,
                    reason: format!("{} bytes is shorter than a sealed chunk", stored.len()),
                });
            }
        },
        None => None,
    };
    let key = if let Some(k) = named {
        match views.get(&k)? {
            Some(key) => Some(key),
            // Without the key, structure only: sealed, and under the key
            // its snapshots are under.
            None if chunk::sealed_key_of(&stored) == Some(k) => return Ok(None),
            None => {
                return Err(Error::CorruptChunk {
                    chunk: *c,
                    reason: format!(
                        "it is not sealed under key {k}, which the snapshots naming it are \
                         under: it was put there from elsewhere or damaged"
                    ),
                });
            }
        }
    } else {
        None
    };
    if chunk::base_of(&stored).is_some() {
        load_into(&Keyed::new(store, key), c, buf)?;
    } else {
        let namer = key.as_ref().map_or(Namer::Plain, |k| k.namer());
        let plain = match &key {
            Some(k) => chunk::unseal(k, c, stored)?,
            None => stored,
        };
        chunk::decode_into(c, &plain, buf, &namer)?;
    }
    Ok(Some(buf.len() as u64))
}

/// What `store stats` counts in a region.
#[derive(Debug, Clone)]
pub struct RegionStats {
    pub region: String,
    pub owner: String,
    /// Where the region lives: a directory or an `s3://` URL.
    pub root: String,
    pub snapshots: u64,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub quarantined: u64,
    pub quarantined_bytes: u64,
}

/// Counts a region's snapshots, chunks, stored bytes and quarantined
/// chunks.
pub fn stats(region: &Region) -> Result<RegionStats> {
    let chunks = region.chunks().list_stored()?;
    let bad = region.chunks().quarantined()?;
    Ok(RegionStats {
        region: region.name().to_string(),
        owner: region.info().owner.to_string(),
        root: region.location(),
        snapshots: region.snapshot_ids()?.len() as u64,
        chunks: chunks.len() as u64,
        stored_bytes: chunks.iter().map(|c| c.size).sum(),
        quarantined: bad.len() as u64,
        quarantined_bytes: bad.iter().map(|c| c.size).sum(),
    })
}
