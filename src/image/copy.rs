//! `image copy` (CopyImage): copies an image and its snapshots to another
//! region, moving only the chunks that region lacks, under new ids.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::chunk;
use crate::format::image::{Image, MappingTarget};
use crate::format::manifest::{self, Manifest, SnapshotStats};
use crate::id::{AccountId, ChunkId, ImageId, SnapshotId};
use crate::image::ops::{RegisterOptions, read_launchable, register};
use crate::image::rules::{check_name_free, validate_name};
use crate::ops::access::readable;
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::store::chain::{self, walk_bases};
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

/// Deletes the snapshot copies a failed copy made, and returns its error.
fn discard(dst: &Region, made: &[CopiedSnapshot], e: Error) -> Error {
    for s in made {
        let _ = dst.delete_snapshot(&s.copy);
    }
    e
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
    // Each distinct chunk once, remembering where it is first used.
    let mut chunks: Vec<(ChunkId, usize, u64)> = Vec::new();
    let mut seen = HashSet::new();
    for (mi, m) in manifests.iter().enumerate() {
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
                    if chain::present_and_sound(dst.chunks(), c)? {
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
                        match chunk::base_of(&stored) {
                            None => chunk::decode_into(c, &stored, buf),
                            Some(_) => chain::load_into(src.chunks(), c, buf).map(|_| ()),
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
    progress.finish();

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut renamed: HashMap<SnapshotId, SnapshotId> = HashMap::new();
    let mut report_snaps: Vec<CopiedSnapshot> = Vec::new();
    for m in &manifests {
        let new_id = SnapshotId::random();
        let mut meta = m.meta.clone();
        meta.id = new_id.clone();
        // The parent lives in the source region; the copy stands alone.
        meta.parent = None;
        meta.owner = opts.caller.clone();
        meta.created_ns = now;
        meta.description = format!(
            "Copied for DestinationAmi {new_ami} from SourceAmi {ami} for SourceSnapshot {} from region {}",
            m.meta.id,
            src.name()
        );
        meta.tags = Vec::new();
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
        let copy = Manifest {
            meta,
            blocks: m.blocks.clone(),
        };
        if let Err(e) = dst.write_snapshot(&copy) {
            return Err(discard(dst, &report_snaps, e));
        }
        renamed.insert(m.meta.id.clone(), new_id.clone());
        report_snaps.push(CopiedSnapshot {
            source: m.meta.id.clone(),
            copy: new_id,
        });
    }

    let mut mappings = view.image.block_device_mappings.clone();
    for m in &mut mappings {
        if let MappingTarget::Ebs(e) = &mut m.target {
            e.snapshot_id = renamed[&e.snapshot_id].clone();
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
        chunks_copied: copied.into_inner(),
        bytes_copied: bytes_copied.into_inner(),
        chunks_present: present.into_inner(),
        bytes_present: bytes_present.into_inner(),
    })
}
