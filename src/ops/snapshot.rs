//! `snapshot create`: volume -> blocks -> chunks -> manifest, and the
//! manifest-only queries.

use std::path::Path;

use rayon::prelude::*;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::format::chunk;
use crate::format::manifest::{self, Block, Manifest, SnapshotMeta, SnapshotStats, Tag};
use crate::format::nbd::{DIRTY_BITMAP_PREFIX, STATE_DIRTY};
use crate::id::{AccountId, ChunkId, KeyId, SnapshotId};
use crate::ops::access::readable;
use crate::ops::parent;
use crate::progress::Progress;
use crate::region::catalog::Region;
use crate::store::chain;
use crate::store::chunk_store::ChunkStore;
use crate::store::pool;
use crate::sys::LockMode;
use crate::volume::blocks::{self, Content, Cut};
use crate::volume::io::{Volume, VolumeKind, is_zero, source_path};
use crate::volume::nbd::is_nbd_uri;
use crate::volume::qemu;

/// Which snapshot a new one is incremental against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ParentChoice {
    /// The newest snapshot of the same source path, if any.
    #[default]
    Latest,
    /// A full snapshot: no parent.
    None,
    Explicit(SnapshotId),
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub parent: ParentChoice,
    /// `None`: the parent's block size, or the default for a first snapshot.
    pub block_size: Option<u32>,
    pub description: String,
    pub tags: Vec<Tag>,
    /// `None`: the region's default owner.
    pub owner: Option<AccountId>,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Store a changed block as a zstd delta against the parent's block
    /// when that is much smaller (see `chunk`).
    pub delta: bool,
    pub encryption: Encryption,
}

/// What a new snapshot asks of encryption (`--encrypted`, `--kms-key-id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encryption {
    pub encrypted: bool,
    /// A key id, `alias/NAME` or ARN; implies `encrypted`.
    pub kms_key_id: Option<String>,
}

/// The key a new snapshot is sealed under, by EBS's rules, and the parent
/// it keeps:
///
/// - an incremental of an encrypted snapshot is encrypted under the same
///   key, asked for or not;
/// - encryption asked for (`--encrypted`, `--kms-key-id`, or the region's
///   encryption by default) over an unencrypted parent, or a key other
///   than the parent's, starts a new full lineage: as in EBS, the first
///   snapshot under a key is full. A parent named with `--parent` is never
///   dropped silently: that is refused instead.
///
/// The key is checked usable (enabled, granted, passphrase) before any
/// block is read.
pub fn choose_key(
    region: &Region,
    parent: Option<SnapshotMeta>,
    explicit_parent: bool,
    enc: &Encryption,
    progress: &dyn Progress,
) -> Result<(Option<KeyId>, Option<SnapshotMeta>)> {
    let keys = region.keys();
    let requested = match &enc.kms_key_id {
        Some(s) => Some(keys.resolve(s)?.key_id),
        None => None,
    };
    let wanted = enc.encrypted || requested.is_some() || keys.defaults()?.encrypted_by_default;
    let chosen = match parent {
        Some(p) if p.kms_key_id.is_some() => {
            let under = p.kms_key_id.expect("checked");
            match requested {
                Some(r) if r != under => {
                    if explicit_parent {
                        return Err(Error::InvalidArgument(format!(
                            "parent {} is encrypted under key {under}, and an incremental \
                             snapshot stays under its parent's key: drop --kms-key-id, or take \
                             a full snapshot under key {r} with --no-parent",
                            p.id
                        )));
                    }
                    progress.warn(&format!(
                        "the volume's last snapshot {} is under key {under}, not {r}: this \
                         snapshot starts a new full lineage under {r}",
                        p.id
                    ));
                    (Some(r), None)
                }
                _ => (Some(under), Some(p)),
            }
        }
        Some(p) if wanted => {
            if explicit_parent {
                return Err(Error::InvalidArgument(format!(
                    "parent {} is not encrypted, and an encrypted snapshot cannot be incremental \
                     to it (as in EBS, the first encrypted snapshot of a volume is full): drop \
                     --parent",
                    p.id
                )));
            }
            let k = match requested {
                Some(r) => r,
                None => keys.choose(None)?.key_id,
            };
            progress.warn(&format!(
                "the volume's last snapshot {} is not encrypted: this snapshot starts a new full, \
                 encrypted lineage under key {k}",
                p.id
            ));
            (Some(k), None)
        }
        p if wanted => {
            let k = match requested {
                Some(r) => r,
                None => keys.choose(None)?.key_id,
            };
            (Some(k), p)
        }
        p => (None, p),
    };
    if let Some(k) = &chosen.0 {
        keys.data_key(k)?;
    }
    Ok(chosen)
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            parent: ParentChoice::Latest,
            block_size: None,
            description: String::new(),
            tags: Vec::new(),
            owner: None,
            threads: 0,
            delta: true,
            encryption: Encryption::default(),
        }
    }
}

pub use crate::format::manifest::validate_labels;

/// What happened to one block during create.
#[derive(Debug, Clone)]
pub enum Outcome {
    Hole,
    Zero,
    /// A data block named by the parent at the same index, reused unread.
    Unchanged(Block),
    /// A data block whose chunk was already stored: its raw length.
    Known(Block, u64),
    New {
        block: Block,
        raw: u64,
        stored: u64,
    },
}

/// The parent's block, already loaded: its raw bytes and the depth of its
/// delta chain (`chain::load_into`).
pub type LoadedBase<'a> = (&'a [u8], u8);

/// Stores data block `bytes` (named `id`) unless it is the parent's block
/// at the same index or already stored; with `delta`, a new block is
/// stored as a delta against the parent's when that is much smaller
/// (`loaded`: the parent's block, when the caller has read it already).
pub fn store_block(
    store: &dyn ChunkStore,
    parent_block: Option<&Block>,
    parent_committed: Option<SystemTime>,
    bytes: &[u8],
    id: ChunkId,
    delta: bool,
    loaded: Option<LoadedBase>,
) -> Result<Outcome> {
    match settled(store, parent_block, parent_committed, &id, bytes.len())? {
        Some(known) => Ok(known),
        None => store_new(store, parent_block, bytes, id, delta, loaded),
    }
}

/// Stores data block `bytes` (named `id`), which [`settled`] found neither
/// the parent's nor in the store: as a delta against the parent's block
/// when `delta` and that is much smaller, else plain.
fn store_new(
    store: &dyn ChunkStore,
    parent_block: Option<&Block>,
    bytes: &[u8],
    id: ChunkId,
    delta: bool,
    loaded: Option<LoadedBase>,
) -> Result<Outcome> {
    let block = Block::Data(id);
    // A delta first: when it works, the block is not compressed a second
    // time.
    let delta = match parent_block {
        Some(Block::Data(base)) if delta => delta_against(store, base, bytes, loaded),
        _ => None,
    };
    let stored = match delta {
        Some(d) => d,
        None => chunk::encode(bytes)?,
    };
    Ok(match store.put_owned(&id, stored)? {
        Some(stored) => Outcome::New {
            block,
            raw: bytes.len() as u64,
            stored,
        },
        None => Outcome::Known(block, bytes.len() as u64),
    })
}

/// What storing a block named `id` comes to without its bytes: unchanged
/// from the parent, or already in the store; `None` when it must be
/// stored.
fn settled(
    store: &dyn ChunkStore,
    parent_block: Option<&Block>,
    parent_committed: Option<SystemTime>,
    id: &ChunkId,
    len: usize,
) -> Result<Option<Outcome>> {
    let block = Block::Data(*id);
    Ok(
        if parent_block == Some(&block) && chain::reusable(store, id, parent_committed)? {
            Some(Outcome::Unchanged(block))
        } else if chain::present_and_sound(store, id)? {
            Some(Outcome::Known(block, len as u64))
        } else {
            None
        },
    )
}

/// Adds one block's outcome, `len` bytes long, to `stats`; returns the
/// block for the manifest.
pub fn tally(stats: &mut SnapshotStats, len: u64, outcome: Outcome) -> Block {
    match outcome {
        Outcome::Hole => {
            stats.hole_blocks += 1;
            Block::Hole
        }
        Outcome::Zero => {
            stats.zero_blocks += 1;
            Block::Zero
        }
        Outcome::Unchanged(b) => {
            stats.data_blocks += 1;
            stats.unchanged_blocks += 1;
            stats.reused_bytes += len;
            b
        }
        Outcome::Known(b, raw) => {
            stats.data_blocks += 1;
            stats.reused_bytes += raw;
            b
        }
        Outcome::New { block, raw, stored } => {
            stats.data_blocks += 1;
            stats.new_chunks += 1;
            stats.new_bytes_raw += raw;
            stats.new_bytes_stored += stored;
            block
        }
    }
}

/// The block list of a snapshot of `size` bytes made of the `changed`
/// blocks (by index, ascending, with what storing each did) and every
/// other block taken from `parent` without reading it; and its counts.
pub fn merge_with_parent(
    parent: &[Block],
    size: u64,
    block_size: u32,
    changed: Vec<(u64, Outcome)>,
) -> (Vec<Block>, SnapshotStats) {
    let bs = block_size as u64;
    let count = manifest::block_count(size, block_size);
    let mut stats = SnapshotStats::default();
    let mut blocks = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut changed = changed.into_iter().peekable();
    for i in 0..count {
        let len = bs.min(size - i * bs);
        let outcome = match changed.next_if(|(j, _)| *j == i) {
            Some((_, o)) => o,
            None => match parent.get(i as usize) {
                Some(b @ Block::Data(_)) => Outcome::Unchanged(*b),
                Some(Block::Zero) => Outcome::Zero,
                Some(Block::Hole) | None => Outcome::Hole,
            },
        };
        blocks.push(tally(&mut stats, len, outcome));
    }
    (blocks, stats)
}

/// A snapshot made from a list of changed blocks, and what it cost.
#[derive(Debug, Clone)]
pub struct Incremental {
    pub meta: SnapshotMeta,
    /// Blocks read (a dirty map or bitmap named them).
    pub blocks_read: u64,
    /// Blocks taken from the parent without being read.
    pub blocks_taken: u64,
}

/// Snapshots the NBD export at `uri` reading only the blocks qemu's dirty
/// bitmap `bitmap` marks, taking every other block from `opts.parent`
/// (which must be given: the snapshot taken when the bitmap was created or
/// cleared) without reading it.
pub fn create_from_bitmap(
    region: &Region,
    uri: &Path,
    bitmap: &str,
    opts: &CreateOptions,
    progress: &dyn Progress,
) -> Result<Incremental> {
    validate_labels(&opts.description, &opts.tags)?;
    let text = uri.display().to_string();
    let image_format = match uri.to_str().filter(|s| is_nbd_uri(s)) {
        Some(_) => None,
        None => Some(qemu::detect_format(uri)?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--dirty-bitmap reads qemu's dirty bitmap, and {text} is neither an NBD URI nor \
                 an image in a qemu format (qcow2…): give nbd://… or nbd+unix://… of a disk \
                 exported with its bitmap (qemu-nbd -B {bitmap} …), or the qcow2 file itself"
            ))
        })?),
    };
    let ParentChoice::Explicit(parent_id) = &opts.parent else {
        return Err(Error::InvalidArgument(
            "--dirty-bitmap needs --parent SNAP, the snapshot taken when the bitmap was created \
             or cleared: the bitmap says only what changed since then"
                .into(),
        ));
    };
    let context = format!("{DIRTY_BITMAP_PREFIX}{bitmap}");
    let volume = match &image_format {
        None => Volume::open_nbd(&text, std::slice::from_ref(&context))?,
        Some(format) => Volume::open_image(uri, format, Some(bitmap))?,
    };
    let client = volume.nbd().expect("an NBD volume");
    if !client.has_context(&context) {
        return Err(Error::InvalidArgument(format!(
            "{text} offers no dirty bitmap {bitmap:?}: export it with the disk (qemu-nbd -B \
             {bitmap}, or QMP block-export-add with \"bitmaps\": [\"{bitmap}\"])"
        )));
    }
    let _lock = region.lock(LockMode::Shared, "snapshot create")?;
    let owner = region.caller(opts.owner.as_ref());
    readable(region, parent_id, &owner, "take as a parent")?;
    let (key, _) = choose_key(
        region,
        Some(region.read_snapshot_meta(parent_id)?),
        true,
        &opts.encryption,
        progress,
    )?;
    let parent = region.read_snapshot(parent_id)?;
    let size = volume.size();
    if parent.meta.volume_size != size {
        return Err(Error::InvalidArgument(format!(
            "{parent_id} is of a {}-byte volume and {text} is {size} bytes: a dirty bitmap only \
             says what changed on the same disk; take a full snapshot (--no-parent) instead",
            parent.meta.volume_size
        )));
    }
    let block_size = parent.meta.block_size;
    if let Some(bs) = opts.block_size.filter(|&b| b != block_size) {
        return Err(Error::BlockSizeMismatch {
            parent: parent_id.clone(),
            parent_block_size: block_size,
            block_size: bs,
        });
    }
    let bs = block_size as u64;
    // The dirty ranges, rounded out to blocks.
    let mut dirty: Vec<u64> = Vec::new();
    for (at, len, state) in client.block_status(&context, 0, size)? {
        if state & STATE_DIRTY == 0 {
            continue;
        }
        for b in at / bs..=(at + len - 1) / bs {
            if dirty.last().is_none_or(|&l| l < b) {
                dirty.push(b);
            }
        }
    }
    let keyed = region.chunks_under(key.as_ref())?;
    let store: &dyn ChunkStore = &keyed;
    let pool = pool::thread_pool_for(store, opts.threads, pool::Work::Compute)?;
    let committed = region.snapshot_committed_at(parent_id)?;
    progress.start("snapshot", dirty.len() as u64 * bs);
    let read: Vec<(u64, Outcome)> = pool.install(|| {
        dirty
            .par_iter()
            .map(|&i| {
                let mut buf = vec![0u8; bs.min(size - i * bs) as usize];
                volume.read_exact_at(&mut buf, i * bs)?;
                let outcome = if is_zero(&buf) {
                    Outcome::Zero
                } else {
                    store_block(
                        store,
                        parent.blocks.get(i as usize),
                        committed,
                        &buf,
                        store.namer().name(&buf),
                        opts.delta,
                        None,
                    )?
                };
                progress.advance(buf.len() as u64);
                Ok((i, outcome))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    progress.finish();
    let (blocks, stats) = merge_with_parent(&parent.blocks, size, block_size, read);
    let meta = commit(
        region,
        Taken {
            parent: Some(parent_id.clone()),
            owner,
            volume_size: size,
            block_size,
            description: opts.description.clone(),
            tags: opts.tags.clone(),
            source: source_path(uri),
            blocks,
            stats,
            kms_key_id: key,
        },
    )?;
    let count = manifest::block_count(size, block_size);
    Ok(Incremental {
        meta,
        blocks_read: dirty.len() as u64,
        blocks_taken: count - dirty.len() as u64,
    })
}

/// A snapshot's manifest, once its blocks are stored.
pub struct Taken {
    pub parent: Option<SnapshotId>,
    pub owner: AccountId,
    pub volume_size: u64,
    pub block_size: u32,
    pub description: String,
    pub tags: Vec<Tag>,
    pub source: String,
    pub blocks: Vec<Block>,
    pub stats: SnapshotStats,
    /// The key the snapshot is sealed under: its chunks already are.
    pub kms_key_id: Option<KeyId>,
}

/// Writes the manifest of `taken` under a new id: the snapshot exists
/// from here on.
pub fn commit(region: &Region, taken: Taken) -> Result<SnapshotMeta> {
    commit_as(region, SnapshotId::random(), taken)
}

/// [`commit`] under id `id`, given out before the blocks arrived (the EBS
/// direct API's `StartSnapshot`).
pub fn commit_as(region: &Region, id: SnapshotId, taken: Taken) -> Result<SnapshotMeta> {
    let created_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let meta = SnapshotMeta {
        id,
        parent: taken.parent,
        owner: taken.owner,
        volume_size: taken.volume_size,
        block_size: taken.block_size,
        created_ns,
        description: taken.description,
        tags: taken.tags,
        source: taken.source,
        root_digest: manifest::root_digest(&taken.blocks),
        stats: taken.stats,
        kms_key_id: taken.kms_key_id,
        sealed: false,
    };
    let m = Manifest {
        meta,
        blocks: taken.blocks,
    };
    region.write_snapshot(&m)?;
    Ok(m.meta)
}

/// The snapshots `owner` took, their meta opened: an encrypted snapshot's
/// source path is sealed, so if the owner has snapshots whose key this
/// process cannot use without asking, the key is asked for (or its absence
/// refused, exit 6) rather than take a plain full snapshot of what may be
/// an encrypted volume. Only the owner's own: another account's snapshot
/// of the same path is no parent of this one.
fn owned_snapshots(region: &Region, source: &str, owner: &AccountId) -> Result<Vec<SnapshotMeta>> {
    let mut listing = region.list_snapshots()?.snapshots;
    listing.retain(|m| &m.owner == owner);
    let mut opened = Vec::with_capacity(listing.len());
    for m in listing {
        if !m.sealed {
            opened.push(m);
            continue;
        }
        let k = m.kms_key_id.expect("a sealed meta names its key");
        // Asked once per key: the keyring keeps it unlocked.
        region.keys().data_key(&k).map_err(|e| match e {
            Error::Key(why) | Error::NotFound(why) => Error::Key(format!(
                "{} is encrypted under key {k}, and only that key shows which volume it is \
                 of: it may be the last snapshot of {source}. {why}; or take a full snapshot \
                 with --no-parent",
                m.id
            )),
            e => e,
        })?;
        match region.read_snapshot_meta(&m.id) {
            Ok(m) => opened.push(m),
            // Deleted since the listing.
            Err(Error::SnapshotNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(opened)
}

/// Snapshots the volume at `path` into `region`.
pub fn create(
    region: &Region,
    path: &Path,
    opts: &CreateOptions,
    progress: &dyn Progress,
) -> Result<SnapshotMeta> {
    validate_labels(&opts.description, &opts.tags)?;
    let volume = Volume::open(path)?;
    let source = source_path(path);
    let _lock = region.lock(LockMode::Shared, "snapshot create")?;
    let owner = region.caller(opts.owner.as_ref());

    let parent = match &opts.parent {
        ParentChoice::None => None,
        ParentChoice::Explicit(id) => {
            readable(region, id, &owner, "take as a parent")?;
            Some(region.read_snapshot_meta(id)?)
        }
        ParentChoice::Latest => {
            let owned = owned_snapshots(region, &source, &owner)?;
            let latest = owned
                .iter()
                .filter(|m| m.source == source)
                .max_by_key(|m| m.created_ns);
            match latest {
                Some(m) => Some(m.clone()),
                None => parent::find(region, &volume, opts.block_size, owned, progress)?.map(|f| {
                    progress.note(&format!(
                        "{source} has no snapshot yet: taking {} as its parent, as {}; \
                         --no-parent takes a full snapshot instead",
                        f.meta.id,
                        f.reason()
                    ));
                    f.meta
                }),
            }
        }
    };
    let explicit = matches!(opts.parent, ParentChoice::Explicit(_));
    let (key, parent) = choose_key(region, parent, explicit, &opts.encryption, progress)?;
    let parent = match parent {
        Some(m) => Some(region.read_snapshot(&m.id)?),
        None => None,
    };
    let block_size = match (&parent, opts.block_size) {
        (Some(p), Some(bs)) if p.meta.block_size != bs => {
            return Err(Error::BlockSizeMismatch {
                parent: p.meta.id.clone(),
                parent_block_size: p.meta.block_size,
                block_size: bs,
            });
        }
        (Some(p), _) => p.meta.block_size,
        (None, Some(bs)) => bs,
        (None, None) => manifest::DEFAULT_BLOCK_SIZE,
    };
    manifest::validate_block_size(block_size as u64)?;
    let parent_blocks: &[Block] = parent.as_ref().map(|p| p.blocks.as_slice()).unwrap_or(&[]);

    let keyed = region.chunks_under(key.as_ref())?;
    let store: &dyn ChunkStore = &keyed;
    let pool = pool::thread_pool_for(store, opts.threads, pool::Work::Compute)?;
    let size = volume.size();
    // Chunks the parent names are reused unread only if unchanged since
    // it was committed (see `chain::reusable`).
    let parent_committed = match &parent {
        Some(p) => region.snapshot_committed_at(&p.meta.id)?,
        None => None,
    };
    // Grown as blocks arrive: a huge sparse volume must not reserve its
    // whole block list up front.
    let mut blocks =
        Vec::with_capacity(manifest::block_count(size, block_size).min(1 << 20) as usize);
    let mut stats = SnapshotStats::default();

    progress.start("snapshot", size);
    blocks::scan(
        &volume,
        Cut {
            len: size,
            block_size,
            namer: store.namer(),
            // With a parent most blocks are only hashed and found
            // unchanged; without one every block is copied to be stored,
            // and `pread` copies no more than a mapping would.
            map: parent.is_some(),
        },
        &pool,
        progress,
        |pos, content| match content {
            Content::Hole => Ok(Outcome::Hole),
            Content::Zero => Ok(Outcome::Zero),
            Content::Data { bytes, id, mapped } => {
                let parent_block = parent_blocks.get(pos.index as usize);
                if let Some(known) =
                    settled(store, parent_block, parent_committed, &id, bytes.len())?
                {
                    return Ok(known);
                }
                // A block changed by a writer since it was hashed is looked
                // up again under its new name.
                blocks::steady(bytes, id, mapped, store.namer(), |steady, named| {
                    if named == id {
                        store_new(store, parent_block, steady, named, opts.delta, None)
                    } else {
                        store_block(
                            store,
                            parent_block,
                            parent_committed,
                            steady,
                            named,
                            opts.delta,
                            None,
                        )
                    }
                })
            }
        },
        |pos, outcome| {
            blocks.push(tally(&mut stats, pos.len as u64, outcome));
            Ok(())
        },
    )?;
    progress.finish();
    if volume.kind() == VolumeKind::File && volume.changed_since_open()? {
        progress.warn(&format!(
            "{} changed while it was read (its size or modification time moved): the snapshot \
             may hold blocks from different moments; quiesce the writer (fsfreeze, a stopped VM, \
             a read-only loop device or an LVM snapshot) and snapshot again for a consistent copy",
            path.display()
        ));
    }

    commit(
        region,
        Taken {
            parent: parent.map(|p| p.meta.id),
            owner,
            volume_size: size,
            block_size,
            description: opts.description.clone(),
            tags: opts.tags.clone(),
            source,
            blocks,
            stats,
            kms_key_id: key,
        },
    )
}

/// `raw` as a delta against the parent's chunk at the same index, when that
/// chunk reads back and the delta is at most seven eighths of the raw
/// block (deltas cost a restore one more decompression, so a small saving
/// is not worth it; a block that compresses well alone is then stored
/// plain). When the parent's chain is already as deep as allowed, the delta
/// is taken against the chain's root, the plain chunk it started from,
/// which keeps chains short on blocks that change in every snapshot.
fn delta_against(
    store: &dyn ChunkStore,
    base: &ChunkId,
    raw: &[u8],
    loaded: Option<LoadedBase>,
) -> Option<Vec<u8>> {
    let limit = raw.len() - raw.len() / 8;
    let mut base_raw = Vec::new();
    let (base_bytes, depth) = match loaded {
        Some(l) => l,
        None => {
            let depth = chain::load_into(store, base, &mut base_raw).ok()?;
            (&base_raw[..], depth)
        }
    };
    if depth < chunk::MAX_DEPTH {
        return chunk::encode_against(raw, base, base_bytes, depth, limit);
    }
    let mut root = *base;
    for _ in 0..chunk::MAX_DEPTH {
        let head = store.get_head(&root, chunk::DELTA_HEADER_LEN).ok()?;
        match chunk::base_of(&head) {
            Some(b) => root = b.id,
            None => break,
        }
    }
    let depth = chain::load_into(store, &root, &mut base_raw).ok()?;
    (depth == 0).then(|| chunk::encode_against(raw, &root, &base_raw, 0, limit))?
}

/// A block that differs between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedBlock {
    pub index: u64,
    pub first: Option<Block>,
    pub second: Option<Block>,
}

/// Blocks whose content differs between `a` and `b`, from the manifests
/// alone. A block past the end of the shorter volume counts as changed
/// unless the longer one holds zeros there.
pub fn changed_blocks(a: &Manifest, b: &Manifest) -> Result<Vec<ChangedBlock>> {
    if a.meta.block_size != b.meta.block_size {
        return Err(Error::InvalidArgument(format!(
            "{} uses {}-byte blocks and {} uses {}: only snapshots with the same block size compare",
            a.meta.id, a.meta.block_size, b.meta.id, b.meta.block_size
        )));
    }
    let n = a.blocks.len().max(b.blocks.len());
    Ok((0..n)
        .filter_map(|i| {
            let (x, y) = (a.blocks.get(i), b.blocks.get(i));
            let same = x
                .unwrap_or(&Block::Hole)
                .same_content(y.unwrap_or(&Block::Hole));
            (!same).then(|| ChangedBlock {
                index: i as u64,
                first: x.copied(),
                second: y.copied(),
            })
        })
        .collect())
}
