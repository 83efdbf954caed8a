//! `image copy` (CopyImage): copies an image and its snapshots to another
//! region, moving only the chunks that region lacks, under new ids.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::chunk;
use crate::format::image::{Image, MappingTarget};
use crate::format::manifest::{self, Manifest, SnapshotStats, Tag};
use crate::id::{AccountId, ChunkId, ImageId, KeyId, SnapshotId};
use crate::image::create::ebs_mapping;
use crate::image::ops::{RegisterOptions, read_launchable, register};
use crate::image::rules::{check_name_free, validate_name};
use crate::ops::access::readable;
use crate::ops::snapshot::{Encryption, Outcome, store_block};
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::store::chain::{self, walk_bases};
use crate::store::chunk_store::ChunkStore;
use crate::store::pool;
use crate::sys::LockMode;

#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub caller: AccountId,
    /// Default: the source image's name.
    pub name: Option<String>,
    /// Default: the source image's description.
    pub description: Option<String>,
    pub copy_tags: bool,
    pub threads: usize,
    /// `--encrypted`, `--kms-key-id`: the key the copies are sealed under
    /// (a key of the target region).
    pub encryption: Encryption,
}

#[derive(Debug, Clone)]
pub struct CopiedSnapshot {
    pub source: SnapshotId,
    pub copy: SnapshotId,
}

#[derive(Debug, Clone)]
pub struct CopyReport {
    pub image: Image,
    pub snapshots: Vec<CopiedSnapshot>,
    pub chunks_copied: u64,
    /// Stored (compressed) bytes written to the target region.
    pub bytes_copied: u64,
    pub chunks_present: u64,
    pub bytes_present: u64,
}

/// The key each copy is sealed under, by EBS's rules for CopyImage: the
/// key asked for (`--kms-key-id`, or the target region's default key with
/// `--encrypted` or encryption by default); else an encrypted snapshot
/// keeps its key within its region and takes the target region's default
/// key in another (keys are regional). An encrypted snapshot is never
/// copied unencrypted.
fn target_keys(
    src: &Region,
    dst: &Region,
    manifests: &[Manifest],
    enc: &Encryption,
) -> Result<Vec<Option<KeyId>>> {
    let keys = dst.keys();
    let requested = match &enc.kms_key_id {
        Some(s) => Some(keys.resolve(s)?.key_id),
        None => None,
    };
    let wanted = enc.encrypted || requested.is_some() || keys.defaults()?.encrypted_by_default;
    let same_region = src.location() == dst.location();
    let mut out = Vec::new();
    for m in manifests {
        out.push(match (m.meta.kms_key_id, requested) {
            (_, Some(r)) => Some(r),
            (Some(k), None) if same_region => Some(k),
            (Some(_), None) => Some(keys.choose(None)?.key_id),
            (None, None) if wanted => Some(keys.choose(None)?.key_id),
            (None, None) => None,
        });
    }
    Ok(out)
}

/// Deletes the snapshot copies a failed copy made, and returns its error.
fn discard(dst: &Region, made: &[CopiedSnapshot], e: Error) -> Error {
    for s in made {
        let _ = dst.delete_snapshot(&s.copy);
    }
    e
}

/// Chunks a copy moved, and found there already.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyCounts {
    pub chunks_copied: u64,
    /// Stored (compressed) bytes written to the target region.
    pub bytes_copied: u64,
    pub chunks_present: u64,
    pub bytes_present: u64,
}

/// What [`copy_manifests`] made: each source snapshot with its copy's
/// meta, and the counts.
struct Copies {
    renamed: Vec<(SnapshotId, manifest::SnapshotMeta)>,
    snapshots: Vec<CopiedSnapshot>,
    counts: CopyCounts,
}

/// Describes and tags the copy of a snapshot.
type Label<'a> = dyn Fn(&manifest::SnapshotMeta) -> (String, Vec<Tag>) + 'a;

/// Copies the snapshots `manifests` from `src` to `dst` (the caller holds
/// both regions' locks, shared): chunks first, bases before deltas, then
/// each copy's manifest, owned by the caller and standing alone. A copy
/// that fails leaves no copied manifest behind.
fn copy_manifests(
    src: &Region,
    dst: &Region,
    manifests: &[Manifest],
    opts: &CopyOptions,
    label: &Label,
    progress: &dyn Progress,
) -> Result<Copies> {
    let targets = target_keys(src, dst, manifests, &opts.encryption)?;
    // Each snapshot's chunks as its key sees them, on both sides.
    let src_views = manifests
        .iter()
        .map(|m| src.chunks_for(&m.meta))
        .collect::<Result<Vec<_>>>()?;
    let dst_views = targets
        .iter()
        .map(|t| dst.chunks_under(t.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let reseal: Vec<bool> = manifests
        .iter()
        .zip(&targets)
        .map(|(m, t)| m.meta.kms_key_id != *t)
        .collect();

    // Each distinct chunk once, remembering where it is first used.
    let mut chunks: Vec<(ChunkId, usize, u64)> = Vec::new();
    let mut seen = HashSet::new();
    for (mi, m) in manifests.iter().enumerate() {
        if reseal[mi] {
            continue;
        }
        for (bi, b) in m.blocks.iter().enumerate() {
            if let Some(c) = b.chunk()
                && seen.insert(*c)
            {
                chunks.push((*c, mi, bi as u64 * m.meta.block_size as u64));
            }
        }
    }

    // Delta chunks travel as they are, so their bases travel too.
    let mut first_use: HashMap<ChunkId, usize> =
        chunks.iter().enumerate().map(|(i, c)| (c.0, i)).collect();
    let roots: Vec<ChunkId> = chunks.iter().map(|c| c.0).collect();
    walk_bases(src.chunks(), roots, |dependent, base| {
        if first_use.contains_key(&base) {
            return false;
        }
        let (_, mi, offset) = chunks[first_use[dependent]];
        first_use.insert(base, chunks.len());
        chunks.push((base, mi, offset));
        true
    })?;
    // Bases before the deltas on them, each level durable before the next,
    // so the target never holds a delta whose base it lacks.
    let mut levels: Vec<Vec<(ChunkId, usize, u64)>> =
        vec![Vec::new(); chunk::MAX_DEPTH as usize + 1];
    for c in chunks {
        let head = src.chunks().get_head(&c.0, chunk::DELTA_HEADER_LEN)?;
        let depth = chunk::base_of(&head).map_or(0, |b| b.depth.min(chunk::MAX_DEPTH)) as usize;
        levels[depth].push(c);
    }

    let copied = AtomicU64::new(0);
    let bytes_copied = AtomicU64::new(0);
    let present = AtomicU64::new(0);
    let bytes_present = AtomicU64::new(0);
    let busiest = if src.chunks().io_parallelism() > dst.chunks().io_parallelism() {
        src.chunks()
    } else {
        dst.chunks()
    };
    let pool = pool::thread_pool_for(busiest, opts.threads, pool::Work::Fetch)?;
    progress.start("copy", levels.iter().map(Vec::len).sum::<usize>() as u64);
    for level in &levels {
        pool.install(|| {
            level
                .par_iter()
                .try_for_each_init(Vec::new, |buf, (c, mi, offset)| -> Result<()> {
                    let (from, to) = (&src_views[*mi], &dst_views[*mi]);
                    if chain::present_and_sound(to, c)? {
                        present.fetch_add(1, Ordering::Relaxed);
                        bytes_present
                            .fetch_add(dst.chunks().size(c).unwrap_or(0), Ordering::Relaxed);
                    } else {
                        let bad = |problem: String| Error::BadChunkInSnapshot {
                            chunk: *c,
                            snapshot: manifests[*mi].meta.id.clone(),
                            offset: *offset,
                            problem,
                        };
                        let stored = src.chunks().get(c).map_err(|e| bad(e.to_string()))?;
                        // Never spread a damaged chunk to another region. A
                        // plain chunk is checked from the bytes in hand; a
                        // delta needs its chain.
                        match (chunk::base_of(&stored), from.key()) {
                            (None, None) => chunk::decode_into(c, &stored, buf, &from.namer()),
                            _ => chain::load_into(from, c, buf).map(|_| ()),
                        }
                        .map_err(|e| bad(e.to_string()))?;
                        if dst.chunks().put(c, &stored)? {
                            copied.fetch_add(1, Ordering::Relaxed);
                            bytes_copied.fetch_add(stored.len() as u64, Ordering::Relaxed);
                        } else {
                            present.fetch_add(1, Ordering::Relaxed);
                            bytes_present.fetch_add(stored.len() as u64, Ordering::Relaxed);
                        }
                    }
                    progress.advance(1);
                    Ok(())
                })
        })?;
        dst.chunks().sync()?;
    }
    // Snapshots sealed again under another key: every block read,
    // renamed under the new key and stored anew (EBS: a copy under a new
    // key is a full copy).
    let mut resealed: HashMap<usize, Vec<manifest::Block>> = HashMap::new();
    for (mi, m) in manifests.iter().enumerate() {
        if !reseal[mi] {
            continue;
        }
        let (from, to) = (&src_views[mi], &dst_views[mi]);
        let bs = m.meta.block_size as u64;
        let blocks = pool.install(|| {
            m.blocks
                .par_iter()
                .enumerate()
                .map_init(Vec::new, |buf, (bi, b)| -> Result<manifest::Block> {
                    let manifest::Block::Data(c) = b else {
                        return Ok(*b);
                    };
                    chain::load_into(from, c, buf).map_err(|e| Error::BadChunkInSnapshot {
                        chunk: *c,
                        snapshot: m.meta.id.clone(),
                        offset: bi as u64 * bs,
                        problem: e.to_string(),
                    })?;
                    let outcome =
                        store_block(to, None, None, buf, to.namer().name(buf), false, None)?;
                    Ok(match outcome {
                        Outcome::New { block, stored, .. } => {
                            copied.fetch_add(1, Ordering::Relaxed);
                            bytes_copied.fetch_add(stored, Ordering::Relaxed);
                            block
                        }
                        Outcome::Known(block, _) | Outcome::Unchanged(block) => {
                            present.fetch_add(1, Ordering::Relaxed);
                            block
                        }
                        Outcome::Hole | Outcome::Zero => unreachable!("a data block"),
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        to.sync()?;
        resealed.insert(mi, blocks);
    }
    progress.finish();

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut renamed: Vec<(SnapshotId, manifest::SnapshotMeta)> = Vec::new();
    let mut report_snaps: Vec<CopiedSnapshot> = Vec::new();
    for (mi, m) in manifests.iter().enumerate() {
        let new_id = SnapshotId::random();
        let mut meta = m.meta.clone();
        meta.id = new_id.clone();
        // The parent lives in the source region; the copy stands alone.
        meta.parent = None;
        meta.owner = opts.caller.clone();
        meta.created_ns = now;
        (meta.description, meta.tags) = label(&m.meta);
        let data_blocks = m.blocks.iter().filter(|b| b.chunk().is_some()).count() as u64;
        meta.stats = SnapshotStats {
            data_blocks,
            zero_blocks: m
                .blocks
                .iter()
                .filter(|b| **b == manifest::Block::Zero)
                .count() as u64,
            hole_blocks: m
                .blocks
                .iter()
                .filter(|b| **b == manifest::Block::Hole)
                .count() as u64,
            ..SnapshotStats::default()
        };
        let blocks = resealed.remove(&mi).unwrap_or_else(|| m.blocks.clone());
        meta.kms_key_id = targets[mi];
        meta.root_digest = manifest::root_digest(&blocks);
        let copy = Manifest { meta, blocks };
        if let Err(e) = dst.write_snapshot(&copy) {
            return Err(discard(dst, &report_snaps, e));
        }
        renamed.push((m.meta.id.clone(), copy.meta));
        report_snaps.push(CopiedSnapshot {
            source: m.meta.id.clone(),
            copy: new_id,
        });
    }

    Ok(Copies {
        renamed,
        snapshots: report_snaps,
        counts: CopyCounts {
            chunks_copied: copied.into_inner(),
            bytes_copied: bytes_copied.into_inner(),
            chunks_present: present.into_inner(),
            bytes_present: bytes_present.into_inner(),
        },
    })
}

/// Copies snapshot `id` from `src` to `dst` for `opts.caller`, who must
/// be able to restore it (CopySnapshot); the copy is described and tagged
/// as given.
pub fn copy_snapshot(
    src: &Region,
    id: &SnapshotId,
    dst: &Region,
    opts: &CopyOptions,
    description: String,
    tags: Vec<Tag>,
    progress: &dyn Progress,
) -> Result<(manifest::SnapshotMeta, CopyCounts)> {
    readable(src, id, &opts.caller, "copy")?;
    let _src_lock = src.lock(LockMode::Shared, "snapshot copy")?;
    let _dst_lock = if src.location() == dst.location() {
        None
    } else {
        Some(dst.lock(LockMode::Shared, "snapshot copy")?)
    };
    let manifests = vec![src.read_snapshot(id)?];
    let label = |_: &manifest::SnapshotMeta| (description.clone(), tags.clone());
    let mut copies = copy_manifests(src, dst, &manifests, opts, &label, progress)?;
    let (_, meta) = copies.renamed.remove(0);
    Ok((meta, copies.counts))
}

/// Copies `ami` from `src` to `dst`. Allowed to its owner and to accounts
/// with launch permission; the copy belongs to the caller.
pub fn copy_image(
    src: &Region,
    ami: &ImageId,
    dst: &Region,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let view = read_launchable(src, ami, &opts.caller, "copy")?;
    // EC2: "To copy an AMI that was shared with you from another account,
    // the owner of the source AMI must grant you read permissions for the
    // storage that backs the AMI, which is the associated EBS snapshot."
    if view.image.owner_id != opts.caller {
        for id in view.image.snapshot_ids() {
            readable(src, id, &opts.caller, "copy the image backed by")?;
        }
    }
    let name = opts.name.clone().unwrap_or_else(|| view.image.name.clone());
    validate_name(&name)?;
    check_name_free(dst, &opts.caller, &name)?;

    let _src_lock = src.lock(LockMode::Shared, "image copy")?;
    let _dst_lock = if src.location() == dst.location() {
        None
    } else {
        Some(dst.lock(LockMode::Shared, "image copy")?)
    };

    let new_ami = ImageId::random();
    let mut manifests: Vec<Manifest> = Vec::new();
    for id in view.image.snapshot_ids() {
        if !manifests.iter().any(|m| &m.meta.id == id) {
            manifests.push(src.read_snapshot(id)?);
        }
    }
    let label = |m: &manifest::SnapshotMeta| {
        let d = format!(
            "Copied for DestinationAmi {new_ami} from SourceAmi {ami} for SourceSnapshot {} from region {}",
            m.id,
            src.name()
        );
        (d, Vec::new())
    };
    let Copies {
        renamed,
        snapshots: report_snaps,
        counts,
    } = copy_manifests(src, dst, &manifests, opts, &label, progress)?;
    let renamed: HashMap<SnapshotId, manifest::SnapshotMeta> = renamed.into_iter().collect();
    let mut mappings = view.image.block_device_mappings.clone();
    for m in &mut mappings {
        if let MappingTarget::Ebs(e) = &mut m.target {
            let copy = &renamed[&e.snapshot_id];
            *e = ebs_mapping(dst, copy, e.volume_size, e.delete_on_termination)
                .map_err(|e| discard(dst, &report_snaps, e))?;
        }
    }
    let ropts = RegisterOptions {
        name,
        description: opts
            .description
            .clone()
            .unwrap_or_else(|| view.image.description.clone()),
        architecture: Some(view.image.architecture.clone()),
        root_device: view.image.root_device_name.clone(),
        tags: if opts.copy_tags {
            view.image.tags.clone()
        } else {
            Vec::new()
        },
        owner: opts.caller.clone(),
        image_id: Some(new_ami),
        source_image_id: Some(ami.clone()),
        source_region: Some(src.name().to_string()),
    };
    // A registration that fails (another image took the name meanwhile)
    // leaves no stray snapshot copies behind.
    let image = register(dst, &ropts, mappings).map_err(|e| discard(dst, &report_snaps, e))?;
    Ok(CopyReport {
        image,
        snapshots: report_snaps,
        chunks_copied: counts.chunks_copied,
        bytes_copied: counts.bytes_copied,
        chunks_present: counts.chunks_present,
        bytes_present: counts.bytes_present,
    })
}
