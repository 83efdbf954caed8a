//! The snapshot manifest: what a snapshot is, and its on-disk format.
//!
//! ```text
//! offset  size       field
//! 0       8          magic "BSNAPMAN"            (frozen: do not modify)
//! 8       4          format version = 1, u32 LE
//! 12      4          meta length M, u32 LE (<= 1 MiB)
//! 16      8          blocks length B, u64 LE
//! 24      32         BLAKE3 of bytes 0..24 followed by the meta bytes
//! 56      32         BLAKE3 of the blocks bytes
//! 88      M          meta: SnapshotMeta in postcard
//! 88+M    B          blocks: one entry per block, in order:
//!                      0x00 hole | 0x01 zero | 0x02 + 32-byte chunk id
//! ```
//!
//! The two checksums let `snapshot list` read and trust the meta without
//! reading the block list. A file whose length is not exactly `88 + M + B`
//! is truncated (or has trailing bytes) and is rejected.
//!
//! # Encrypted snapshots (version 3)
//!
//! ```text
//! offset  size       field
//! 0       8          magic "BSNAPMAN"
//! 8       4          format version = 3, u32 LE
//! 12      4          readable meta length M, u32 LE (<= 1 MiB)
//! 16      8          sealed block list length B, u64 LE
//! 24      4          chunk names N, u32 LE
//! 28      4          sealed meta length S, u32 LE (<= 1 MiB)
//! 32      16         key id (the UUID's bytes)
//! 48      32         BLAKE3 of bytes 0..48, the readable and sealed meta
//! 80      32         BLAKE3 of the name table followed by the sealed block list
//! 112     M          readable meta, postcard: id, parent, owner, volume
//!                      size, block size, creation time
//! 112+M   S          sealed meta: AES-256-GCM (see `format::key`) of the
//!                      postcard description, tags, source path, root
//!                      digest and counts; associated data: bytes 0..48
//!                      and the readable meta
//! ..      32 N       name table: the distinct chunk names, ascending
//! ..      B          sealed block list: one entry per block,
//!                      0x00 hole | 0x01 zero | 0x02 + u32 LE index into
//!                      the name table; associated data: bytes 0..80, both
//!                      metas, BLAKE3 of the name table
//! ```
//!
//! Without the key a reader sees what EBS shows anyone allowed to describe
//! a snapshot, no more: its id, parent, owner, size, block size, time and
//! key, checked by the BLAKE3 sums (and, with the key, authenticated as
//! associated data). The description, tags, source path and counts open
//! only with the key. The name table lets gc mark chunks without a key;
//! which block holds which chunk is readable only with it.
//!
//! Version 2 (written by earlier releases, still read) is version 3 with
//! the whole meta readable: bytes 28..32 are zero and the meta is the
//! version 1 postcard meta.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::format::key::{DataKey, SEAL_OVERHEAD};
use crate::id::{AccountId, ChunkId, KeyId, SnapshotId};

pub const MANIFEST_MAGIC: &[u8; 8] = b"BSNAPMAN";
pub const MANIFEST_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 88;
/// The version of an encrypted snapshot's manifest: its meta sealed but
/// for what anyone may see.
pub const SEALED_MANIFEST_VERSION: u32 = 3;
/// The first encrypted manifests, whose whole meta is readable.
pub const READABLE_META_VERSION: u32 = 2;
pub const SEALED_HEADER_LEN: usize = 112;
pub const MAX_META_LEN: u32 = 1 << 20;
/// The largest manifest read: a 64 TiB volume of 4 KiB data blocks, the
/// most blocks a volume can have (33 bytes each).
pub const MAX_MANIFEST_LEN: u64 = HEADER_LEN as u64 + MAX_META_LEN as u64 + 33 * (1 << 34);

/// What one block of a volume held when it was snapshotted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Unallocated in a sparse file: never read, reads back as zeros.
    Hole,
    /// Allocated, but every byte is zero: stored as a state, not a chunk.
    Zero,
    /// Anything else: the chunk holding its bytes.
    Data(ChunkId),
}

impl Block {
    pub fn chunk(&self) -> Option<&ChunkId> {
        match self {
            Block::Data(id) => Some(id),
            _ => None,
        }
    }

    pub fn state_name(&self) -> &'static str {
        match self {
            Block::Hole => "hole",
            Block::Zero => "zero",
            Block::Data(_) => "data",
        }
    }

    /// Whether two blocks hold the same bytes (holes and zeros do).
    pub fn same_content(&self, other: &Block) -> bool {
        match (self, other) {
            (Block::Data(a), Block::Data(b)) => a == b,
            (Block::Data(_), _) | (_, Block::Data(_)) => false,
            _ => true,
        }
    }
}

/// A tag. Field names matter only to JSON (EC2's `Key`/`Value`); postcard
/// encodes fields by position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Tag {
    pub key: String,
    pub value: String,
}

const MAX_DESCRIPTION: usize = 255;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 256;
const MAX_TAGS: usize = 50;

/// Tag keys with this prefix are blocksnap's own, as `aws:` is AWS's.
pub const RESERVED_TAG_PREFIX: &str = "blocksnap:";

/// Refuses a tag key blocksnap reserves for itself.
pub fn check_user_tag_key(key: &str) -> Result<()> {
    if key.starts_with(RESERVED_TAG_PREFIX) {
        return Err(Error::InvalidArgument(format!(
            "tag key {key:?} is reserved: keys starting with {RESERVED_TAG_PREFIX:?} are the tags \
             blocksnap itself writes (as aws: is AWS's)"
        )));
    }
    Ok(())
}

/// Checks description and tags against EC2's limits.
pub fn validate_labels(description: &str, tags: &[Tag]) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if description.chars().count() > MAX_DESCRIPTION {
        return bad(format!(
            "description is longer than {MAX_DESCRIPTION} characters"
        ));
    }
    if tags.len() > MAX_TAGS {
        return bad(format!(
            "{} tags given, at most {MAX_TAGS} allowed",
            tags.len()
        ));
    }
    for t in tags {
        if t.key.is_empty() || t.key.chars().count() > MAX_TAG_KEY {
            return bad(format!(
                "tag key {:?} must be 1-{MAX_TAG_KEY} characters",
                t.key
            ));
        }
        if t.value.chars().count() > MAX_TAG_VALUE {
            return bad(format!(
                "tag value for {:?} is longer than {MAX_TAG_VALUE} characters",
                t.key
            ));
        }
        if tags.iter().filter(|o| o.key == t.key).count() > 1 {
            return bad(format!("tag key {:?} is given twice", t.key));
        }
    }
    Ok(())
}

/// Counts recorded when a snapshot is created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub hole_blocks: u64,
    /// Data blocks whose digest equals the parent's at the same index.
    pub unchanged_blocks: u64,
    /// Chunks this snapshot added to the store.
    pub new_chunks: u64,
    /// Raw bytes of the chunks this snapshot added.
    pub new_bytes_raw: u64,
    /// Bytes those chunks take in the store (after compression).
    pub new_bytes_stored: u64,
    /// Raw bytes of data blocks whose chunk was already stored.
    pub reused_bytes: u64,
}

/// Everything about a snapshot but its block list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: SnapshotId,
    pub parent: Option<SnapshotId>,
    pub owner: AccountId,
    pub volume_size: u64,
    pub block_size: u32,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub description: String,
    pub tags: Vec<Tag>,
    /// The volume it was taken from, as an absolute path.
    pub source: String,
    /// BLAKE3 over the ordered block digests, holes and zeros alike as 32
    /// zero bytes: equal for any two snapshots of the same bytes.
    pub root_digest: [u8; 32],
    pub stats: SnapshotStats,
    /// The key an encrypted snapshot is under (from the manifest's header,
    /// not the postcard meta: version 1 meta bytes stay as they were).
    #[serde(skip)]
    pub kms_key_id: Option<KeyId>,
    /// The description, tags, source, root digest and stats are sealed
    /// under `kms_key_id` and were read without it: they are empty here.
    #[serde(skip)]
    pub sealed: bool,
}

/// What an encrypted snapshot shows without its key (the first fields of
/// [`SnapshotMeta`], in its order).
#[derive(Serialize, Deserialize)]
struct ReadableMeta {
    id: SnapshotId,
    parent: Option<SnapshotId>,
    owner: AccountId,
    volume_size: u64,
    block_size: u32,
    created_ns: u64,
}

/// What only an encrypted snapshot's key opens (the rest of
/// [`SnapshotMeta`]).
#[derive(Serialize, Deserialize)]
struct SealedMeta {
    description: String,
    tags: Vec<Tag>,
    source: String,
    root_digest: [u8; 32],
    stats: SnapshotStats,
}

impl SnapshotMeta {
    pub fn block_count(&self) -> u64 {
        block_count(self.volume_size, self.block_size)
    }

    pub fn created(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(self.created_ns)
    }
}

/// A whole snapshot manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub meta: SnapshotMeta,
    pub blocks: Vec<Block>,
}

pub fn block_count(volume_size: u64, block_size: u32) -> u64 {
    volume_size.div_ceil(block_size as u64)
}

/// The root digest of an ordered block list.
pub fn root_digest(blocks: &[Block]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for b in blocks {
        match b {
            Block::Data(id) => h.update(&id.0),
            _ => h.update(&[0u8; 32]),
        };
    }
    *h.finalize().as_bytes()
}

const TAG_HOLE: u8 = 0;
const TAG_ZERO: u8 = 1;
const TAG_DATA: u8 = 2;

fn header_checksum(header24: &[u8], meta: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(header24);
    h.update(meta);
    *h.finalize().as_bytes()
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let meta = postcard::to_allocvec(&self.meta).expect("snapshot meta always serializes");
        let mut blocks = Vec::with_capacity(self.blocks.len() * 33);
        for b in &self.blocks {
            match b {
                Block::Hole => blocks.push(TAG_HOLE),
                Block::Zero => blocks.push(TAG_ZERO),
                Block::Data(id) => {
                    blocks.push(TAG_DATA);
                    blocks.extend_from_slice(&id.0);
                }
            }
        }
        let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + blocks.len());
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&(blocks.len() as u64).to_le_bytes());
        let hc = header_checksum(&out[..24], &meta);
        out.extend_from_slice(&hc);
        out.extend_from_slice(blake3::hash(&blocks).as_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&blocks);
        out
    }

    /// Decodes a whole manifest file, asking `key_for` for the key of an
    /// encrypted one. `at` only names it in errors.
    pub fn decode_with(
        bytes: &[u8],
        at: &Location,
        key_for: &dyn Fn(&KeyId) -> Result<std::sync::Arc<DataKey>>,
    ) -> Result<Manifest> {
        match Self::sealed_header(bytes) {
            Some(_) => Sealed::parse(bytes, at, bytes.len() as u64)?.decode(bytes, at, key_for),
            None => Self::decode(bytes, at),
        }
    }

    /// The key of an encrypted manifest, from its first bytes; `None` for
    /// a plain one (or bytes that are no manifest: decoding says why).
    pub fn sealed_header(head: &[u8]) -> Option<KeyId> {
        if head.len() < SEALED_HEADER_LEN || &head[..8] != MANIFEST_MAGIC {
            return None;
        }
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if !(READABLE_META_VERSION..=SEALED_MANIFEST_VERSION).contains(&version) {
            return None;
        }
        Some(KeyId(head[32..48].try_into().expect("16 bytes")))
    }

    /// Every chunk name the manifest `bytes` holds, distinct, without a key
    /// (gc's mark).
    pub fn chunk_names(bytes: &[u8], at: &Location) -> Result<Vec<ChunkId>> {
        if Self::sealed_header(bytes).is_some() {
            let s = Sealed::parse(bytes, at, bytes.len() as u64)?;
            s.readable_meta(bytes, at)?;
            s.check_body(bytes, at)?;
            return Ok(s.names(bytes));
        }
        let m = Self::decode(bytes, at)?;
        let mut names: Vec<ChunkId> = m.blocks.iter().filter_map(|b| b.chunk().copied()).collect();
        names.sort_unstable();
        names.dedup();
        Ok(names)
    }

    /// Encodes an encrypted manifest under `key`.
    pub fn encode_sealed(&self, key: &DataKey) -> Vec<u8> {
        let m = &self.meta;
        let readable = postcard::to_allocvec(&ReadableMeta {
            id: m.id.clone(),
            parent: m.parent.clone(),
            owner: m.owner.clone(),
            volume_size: m.volume_size,
            block_size: m.block_size,
            created_ns: m.created_ns,
        })
        .expect("snapshot meta always serializes");
        let private = zeroize::Zeroizing::new(
            postcard::to_allocvec(&SealedMeta {
                description: m.description.clone(),
                tags: m.tags.clone(),
                source: m.source.clone(),
                root_digest: m.root_digest,
                stats: m.stats.clone(),
            })
            .expect("snapshot meta always serializes"),
        );
        let mut names: Vec<ChunkId> = self
            .blocks
            .iter()
            .filter_map(|b| b.chunk().copied())
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut table = Vec::with_capacity(names.len() * 32);
        for n in &names {
            table.extend_from_slice(&n.0);
        }
        let mut entries = Vec::with_capacity(self.blocks.len() * 5);
        for b in &self.blocks {
            match b {
                Block::Hole => entries.push(TAG_HOLE),
                Block::Zero => entries.push(TAG_ZERO),
                Block::Data(id) => {
                    let i = names.binary_search(id).expect("every name is in the table");
                    entries.push(TAG_DATA);
                    entries.extend_from_slice(&(i as u32).to_le_bytes());
                }
            }
        }
        let sealed_len = (entries.len() + SEAL_OVERHEAD) as u64;
        let mut out = Vec::with_capacity(
            SEALED_HEADER_LEN
                + readable.len()
                + private.len()
                + table.len()
                + entries.len()
                + 2 * SEAL_OVERHEAD,
        );
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&SEALED_MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&(readable.len() as u32).to_le_bytes());
        out.extend_from_slice(&sealed_len.to_le_bytes());
        out.extend_from_slice(&(names.len() as u32).to_le_bytes());
        out.extend_from_slice(&((private.len() + SEAL_OVERHEAD) as u32).to_le_bytes());
        out.extend_from_slice(&key.id.0);
        let mut metas = readable.clone();
        key.manifest_cipher()
            .seal_into(&meta_ad(&out[..48], &readable), &private, &mut metas);
        let hc = header_checksum(&out[..48], &metas);
        out.extend_from_slice(&hc);
        let mut sealed = Vec::with_capacity(entries.len() + SEAL_OVERHEAD);
        key.manifest_cipher().seal_into(
            &sealed_ad(&out[..80], &metas, &table),
            &entries,
            &mut sealed,
        );
        let mut body = blake3::Hasher::new();
        body.update(&table);
        body.update(&sealed);
        out.extend_from_slice(body.finalize().as_bytes());
        out.extend_from_slice(&metas);
        out.extend_from_slice(&table);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decodes a whole plain (version 1) manifest file. `at` only names it
    /// in errors; an encrypted one needs [`Manifest::decode_with`].
    pub fn decode(bytes: &[u8], at: &Location) -> Result<Manifest> {
        if Self::sealed_header(bytes).is_some() {
            let s = Sealed::parse(bytes, at, bytes.len() as u64)?;
            let meta = s.readable_meta(bytes, at)?;
            return Err(Error::CorruptFile {
                what: "snapshot manifest",
                location: at.clone(),
                reason: format!(
                    "it is encrypted under key {}, and was read without one",
                    meta.kms_key_id.expect("a sealed meta names its key")
                ),
            });
        }
        let parsed = Header::parse(bytes, at, bytes.len() as u64)?;
        let meta = parsed.meta(bytes, at)?;
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        let start = HEADER_LEN + parsed.meta_len as usize;
        let raw = &bytes[start..];
        if blake3::hash(raw).as_bytes() != &parsed.blocks_checksum {
            return Err(corrupt("block list checksum mismatch".into()));
        }
        let expected = meta.block_count();
        let blocks = parse_entries(raw, expected, &corrupt, |raw, pos| {
            let Some(id) = raw.get(*pos..*pos + 32) else {
                return Err(corrupt("block list ends inside a chunk id".into()));
            };
            *pos += 32;
            Ok(Block::Data(ChunkId(id.try_into().expect("32 bytes"))))
        })?;
        if blocks.len() as u64 != expected {
            return Err(corrupt(format!(
                "{} block entries for a {}-byte volume of {}-byte blocks (expected {expected})",
                blocks.len(),
                meta.volume_size,
                meta.block_size
            )));
        }
        Ok(Manifest { meta, blocks })
    }

    /// Decodes only the meta from the first bytes of a manifest file whose
    /// total length is `file_len`. An encrypted one's sealed part opens
    /// with `key` (the key [`Manifest::sealed_header`] names); without it
    /// the meta comes back [`SnapshotMeta::sealed`].
    pub fn decode_meta(
        prefix: &[u8],
        at: &Location,
        file_len: u64,
        key: Option<&DataKey>,
    ) -> Result<SnapshotMeta> {
        if Self::sealed_header(prefix).is_some() {
            return Sealed::parse(prefix, at, file_len)?.meta(prefix, at, key);
        }
        Header::parse(prefix, at, file_len)?.meta(prefix, at)
    }

    /// How many leading bytes [`Manifest::decode_meta`] needs, from the
    /// first [`HEADER_LEN`] bytes; `None` if those are not a manifest header.
    pub fn meta_prefix_len(header: &[u8]) -> Option<usize> {
        if header.len() < HEADER_LEN || &header[..8] != MANIFEST_MAGIC {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
        let (fixed, sealed_meta) = match u32_at(8) {
            READABLE_META_VERSION => (SEALED_HEADER_LEN, 0),
            SEALED_MANIFEST_VERSION => (SEALED_HEADER_LEN, u32_at(28)),
            _ => (HEADER_LEN, 0),
        };
        let meta_len = u32_at(12);
        (meta_len <= MAX_META_LEN && sealed_meta <= MAX_META_LEN)
            .then_some(fixed + meta_len as usize + sealed_meta as usize)
    }
}

/// What a sealed meta is bound to: the header up to its checksums, and the
/// readable meta.
fn meta_ad(head48: &[u8], readable: &[u8]) -> Vec<u8> {
    [head48, readable].concat()
}

/// What a sealed block list is bound to: the header through the meta
/// checksum, both metas (version 2: the meta), the name table's digest.
fn sealed_ad(head80: &[u8], meta: &[u8], table: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(80 + meta.len() + 32);
    ad.extend_from_slice(head80);
    ad.extend_from_slice(meta);
    ad.extend_from_slice(blake3::hash(table).as_bytes());
    ad
}

/// The header of an encrypted (version 2 or 3) manifest.
struct Sealed {
    version: u32,
    /// The readable meta's length (version 2: the whole meta's).
    meta_len: usize,
    /// The sealed meta's length (version 2: none).
    sealed_meta_len: usize,
    names: usize,
    key: KeyId,
}

impl Sealed {
    fn parse(bytes: &[u8], at: &Location, file_len: u64) -> Result<Sealed> {
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        if bytes.len() < SEALED_HEADER_LEN {
            return Err(corrupt(format!(
                "truncated: {} bytes, shorter than the {SEALED_HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        let meta_len = u32_at(12);
        let sealed_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let names = u32_at(24);
        let sealed_meta_len = u32_at(28);
        if meta_len > MAX_META_LEN {
            return Err(corrupt(format!(
                "meta length {meta_len} exceeds {MAX_META_LEN}"
            )));
        }
        if version == READABLE_META_VERSION && sealed_meta_len != 0 {
            return Err(corrupt("reserved header bytes are not zero".into()));
        }
        if version != READABLE_META_VERSION
            && !(SEAL_OVERHEAD as u32..=MAX_META_LEN).contains(&sealed_meta_len)
        {
            return Err(corrupt(format!(
                "sealed meta length {sealed_meta_len} is out of range"
            )));
        }
        if sealed_len < SEAL_OVERHEAD as u64 {
            return Err(corrupt(
                "the sealed block list is shorter than its nonce and tag".into(),
            ));
        }
        check_lengths(
            bytes,
            file_len,
            SEALED_HEADER_LEN as u64 + meta_len as u64 + sealed_meta_len as u64,
            &[names as u64 * 32, sealed_len],
            &corrupt,
        )?;
        Ok(Sealed {
            version,
            meta_len: meta_len as usize,
            sealed_meta_len: sealed_meta_len as usize,
            names: names as usize,
            key: KeyId(bytes[32..48].try_into().expect("16 bytes")),
        })
    }

    /// Both metas' bytes (version 2: the meta).
    fn metas_range(&self) -> std::ops::Range<usize> {
        SEALED_HEADER_LEN..SEALED_HEADER_LEN + self.meta_len + self.sealed_meta_len
    }

    /// The meta, checked by its checksum, its sealed part opened with `key`
    /// where that is the manifest's key (see [`Sealed::open`]).
    fn meta(&self, bytes: &[u8], at: &Location, key: Option<&DataKey>) -> Result<SnapshotMeta> {
        let mut meta = self.readable_meta(bytes, at)?;
        if let Some(key) = key {
            self.open(bytes, at, &mut meta, key)?;
        }
        Ok(meta)
    }

    /// The meta as anyone may read it, checked by its checksum: for
    /// version 3, [`SnapshotMeta::sealed`] with the sealed part unopened.
    fn readable_meta(&self, bytes: &[u8], at: &Location) -> Result<SnapshotMeta> {
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        let metas = &bytes[self.metas_range()];
        if header_checksum(&bytes[..48], metas) != bytes[48..80] {
            return Err(corrupt("header checksum mismatch".into()));
        }
        if self.version == READABLE_META_VERSION {
            let mut meta = decode_meta_bytes(metas, &corrupt)?;
            meta.kms_key_id = Some(self.key);
            return Ok(meta);
        }
        let r: ReadableMeta = postcard::from_bytes(&metas[..self.meta_len])
            .map_err(|e| corrupt(format!("meta: {e}")))?;
        check_block_size(r.block_size, &corrupt)?;
        Ok(SnapshotMeta {
            id: r.id,
            parent: r.parent,
            owner: r.owner,
            volume_size: r.volume_size,
            block_size: r.block_size,
            created_ns: r.created_ns,
            description: String::new(),
            tags: Vec::new(),
            source: String::new(),
            root_digest: [0; 32],
            stats: SnapshotStats::default(),
            kms_key_id: Some(self.key),
            sealed: true,
        })
    }

    /// Opens the sealed part of `meta` (read by [`Sealed::readable_meta`])
    /// with `key`; a key other than the manifest's leaves it sealed.
    fn open(
        &self,
        bytes: &[u8],
        at: &Location,
        meta: &mut SnapshotMeta,
        key: &DataKey,
    ) -> Result<()> {
        if !meta.sealed || key.id != self.key {
            return Ok(());
        }
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        let (readable, private) = bytes[self.metas_range()].split_at(self.meta_len);
        let mut plain = zeroize::Zeroizing::new(Vec::new());
        if !key
            .manifest_cipher()
            .open_into(&meta_ad(&bytes[..48], readable), private, &mut plain)
        {
            return Err(corrupt(format!(
                "its meta fails authentication under key {}: it was altered",
                self.key
            )));
        }
        let p: SealedMeta =
            postcard::from_bytes(&plain).map_err(|e| corrupt(format!("sealed meta: {e}")))?;
        meta.description = p.description;
        meta.tags = p.tags;
        meta.source = p.source;
        meta.root_digest = p.root_digest;
        meta.stats = p.stats;
        meta.sealed = false;
        Ok(())
    }

    fn table_range(&self) -> std::ops::Range<usize> {
        let start = self.metas_range().end;
        start..start + self.names * 32
    }

    /// Checks the body's checksum and that the names are strictly ascending.
    fn check_body(&self, bytes: &[u8], at: &Location) -> Result<()> {
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        let body = &bytes[self.metas_range().end..];
        if blake3::hash(body).as_bytes() != &bytes[80..112] {
            return Err(corrupt("name table or block list checksum mismatch".into()));
        }
        let table = &bytes[self.table_range()];
        if table
            .chunks_exact(32)
            .zip(table.chunks_exact(32).skip(1))
            .any(|(a, b)| a >= b)
        {
            return Err(corrupt("the name table is not strictly ascending".into()));
        }
        Ok(())
    }

    fn names(&self, bytes: &[u8]) -> Vec<ChunkId> {
        bytes[self.table_range()]
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
            .collect()
    }

    fn decode(
        &self,
        bytes: &[u8],
        at: &Location,
        key_for: &dyn Fn(&KeyId) -> Result<std::sync::Arc<DataKey>>,
    ) -> Result<Manifest> {
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        // Damage shows before a key is asked for.
        let mut meta = self.readable_meta(bytes, at)?;
        self.check_body(bytes, at)?;
        let key = key_for(&self.key)?;
        self.open(bytes, at, &mut meta, &key)?;
        let table = &bytes[self.table_range()];
        let ad = sealed_ad(&bytes[..80], &bytes[self.metas_range()], table);
        let mut entries = Vec::new();
        if !key
            .manifest_cipher()
            .open_into(&ad, &bytes[self.table_range().end..], &mut entries)
        {
            return Err(corrupt(format!(
                "its block list fails authentication under key {}: it was altered",
                self.key
            )));
        }
        let names = self.names(bytes);
        let expected = meta.block_count();
        let mut used = vec![false; names.len()];
        let blocks = parse_entries(&entries, expected, &corrupt, |entries, pos| {
            let Some(i) = entries.get(*pos..*pos + 4) else {
                return Err(corrupt("block list ends inside a name index".into()));
            };
            *pos += 4;
            let i = u32::from_le_bytes(i.try_into().expect("4 bytes")) as usize;
            let Some(id) = names.get(i) else {
                return Err(corrupt(format!("name index {i} is past the name table")));
            };
            used[i] = true;
            Ok(Block::Data(*id))
        })?;
        if blocks.len() as u64 != expected || used.contains(&false) {
            return Err(corrupt(format!(
                "{} block entries for {expected} blocks, or names no block uses",
                blocks.len()
            )));
        }
        Ok(Manifest { meta, blocks })
    }
}

/// Checks that a manifest of `file_len` bytes is exactly its header and
/// meta (`through_meta` bytes) followed by `parts`, and that `bytes` (the
/// whole file, or a prefix) holds the meta.
fn check_lengths(
    bytes: &[u8],
    file_len: u64,
    through_meta: u64,
    parts: &[u64],
    corrupt: &impl Fn(String) -> Error,
) -> Result<()> {
    let total = parts
        .iter()
        .try_fold(through_meta, |t, p| t.checked_add(*p))
        .ok_or_else(|| corrupt("lengths overflow".into()))?;
    if total != file_len {
        return Err(corrupt(if file_len < total {
            format!("truncated: {file_len} of {total} bytes")
        } else {
            format!("{} unexpected bytes after the end", file_len - total)
        }));
    }
    if (bytes.len() as u64) < through_meta {
        return Err(corrupt("truncated inside the meta".into()));
    }
    Ok(())
}

/// Parses a block list that should hold `expected` entries: a tag byte
/// each, `data` reading what follows a data tag at `pos` and advancing it.
/// The caller checks the count.
fn parse_entries(
    raw: &[u8],
    expected: u64,
    corrupt: &impl Fn(String) -> Error,
    mut data: impl FnMut(&[u8], &mut usize) -> Result<Block>,
) -> Result<Vec<Block>> {
    // Each entry takes at least one byte, so `raw.len()` bounds the count.
    if expected > raw.len() as u64 {
        return Err(corrupt(format!(
            "{expected} blocks cannot fit in {} bytes",
            raw.len()
        )));
    }
    let mut blocks = Vec::with_capacity(expected as usize);
    let mut pos = 0;
    while pos < raw.len() {
        let tag = raw[pos];
        pos += 1;
        blocks.push(match tag {
            TAG_HOLE => Block::Hole,
            TAG_ZERO => Block::Zero,
            TAG_DATA => data(raw, &mut pos)?,
            other => {
                return Err(corrupt(format!(
                    "unknown block tag {other} at entry {}",
                    blocks.len()
                )));
            }
        });
    }
    Ok(blocks)
}

fn decode_meta_bytes(meta: &[u8], corrupt: &impl Fn(String) -> Error) -> Result<SnapshotMeta> {
    let meta: SnapshotMeta =
        postcard::from_bytes(meta).map_err(|e| corrupt(format!("meta: {e}")))?;
    check_block_size(meta.block_size, corrupt)?;
    Ok(meta)
}

fn check_block_size(bs: u32, corrupt: &impl Fn(String) -> Error) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(corrupt(format!("block size {bs} out of range")));
    }
    Ok(())
}

struct Header {
    meta_len: u32,
    header_checksum: [u8; 32],
    blocks_checksum: [u8; 32],
}

impl Header {
    /// Checks magic, version and lengths. `bytes` is at least the header
    /// (the whole file, or its meta prefix); `file_len` the file's length.
    fn parse(bytes: &[u8], at: &Location, file_len: u64) -> Result<Header> {
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(format!(
                "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MANIFEST_MAGIC {
            return Err(corrupt("not a snapshot manifest (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        crate::format::check_versions(
            "snapshot manifest",
            at,
            version,
            MANIFEST_VERSION,
            SEALED_MANIFEST_VERSION,
        )?;
        if version != MANIFEST_VERSION {
            return Err(corrupt(format!(
                "truncated: {} bytes, shorter than the {SEALED_HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let meta_len = u32_at(12);
        let blocks_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if meta_len > MAX_META_LEN {
            return Err(corrupt(format!(
                "meta length {meta_len} exceeds {MAX_META_LEN}"
            )));
        }
        check_lengths(
            bytes,
            file_len,
            HEADER_LEN as u64 + meta_len as u64,
            &[blocks_len],
            &corrupt,
        )?;
        Ok(Header {
            meta_len,
            header_checksum: bytes[24..56].try_into().expect("32 bytes"),
            blocks_checksum: bytes[56..88].try_into().expect("32 bytes"),
        })
    }

    fn meta(&self, bytes: &[u8], at: &Location) -> Result<SnapshotMeta> {
        let corrupt = Error::corrupt_file("snapshot manifest", at);
        let meta = &bytes[HEADER_LEN..HEADER_LEN + self.meta_len as usize];
        if header_checksum(&bytes[..24], meta) != self.header_checksum {
            return Err(corrupt("header checksum mismatch".into()));
        }
        decode_meta_bytes(meta, &corrupt)
    }
}

pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 8 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 512 << 10;

/// Checks a requested block size: a power of two from 64 KiB to 8 MiB.
pub fn validate_block_size(bs: u64) -> Result<u32> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE as u64..=MAX_BLOCK_SIZE as u64).contains(&bs) {
        Ok(bs as u32)
    } else {
        Err(Error::InvalidArgument(format!(
            "block size {bs} is not allowed: use a power of two from 65536 (64 KiB) to 8388608 (8 MiB)"
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn sample() -> Manifest {
        let blocks = vec![
            Block::Data(ChunkId::of(b"a")),
            Block::Zero,
            Block::Hole,
            Block::Data(ChunkId::of(b"b")),
            Block::Data(ChunkId::of(b"a")),
        ];
        let meta = SnapshotMeta {
            id: "snap-0123456789abcdef0".parse().unwrap(),
            parent: Some("snap-00000000000000001".parse().unwrap()),
            owner: "123456789012".parse().unwrap(),
            volume_size: 4 * 65536 + 100,
            block_size: 65536,
            created_ns: 1_700_000_000_123_456_789,
            description: "golden disk".into(),
            tags: vec![Tag {
                key: "env".into(),
                value: "bench".into(),
            }],
            source: "/images/disk.img".into(),
            root_digest: root_digest(&blocks),
            stats: SnapshotStats {
                data_blocks: 3,
                zero_blocks: 1,
                hole_blocks: 1,
                unchanged_blocks: 1,
                new_chunks: 2,
                new_bytes_raw: 131072,
                new_bytes_stored: 4000,
                reused_bytes: 65536,
            },
            kms_key_id: None,
            sealed: false,
        };
        Manifest { meta, blocks }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode();
        let p = &Location::from(Path::new("m"));
        assert_eq!(Manifest::decode(&bytes, p).unwrap(), m);
        let n = Manifest::meta_prefix_len(&bytes[..HEADER_LEN]).unwrap();
        assert_eq!(
            Manifest::decode_meta(&bytes[..n], p, bytes.len() as u64, None).unwrap(),
            m.meta
        );
    }

    #[test]
    fn truncation_and_flips_are_detected() {
        let bytes = sample().encode();
        let p = &Location::from(Path::new("m"));
        for len in [0, 10, HEADER_LEN, HEADER_LEN + 5, bytes.len() - 1] {
            let err = Manifest::decode(&bytes[..len], p).unwrap_err();
            assert!(err.to_string().contains("truncated"), "len {len}: {err}");
        }
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 1;
            assert!(Manifest::decode(&bad, p).is_err(), "flip at {pos} accepted");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Manifest::decode(&long, p).is_err());
    }

    #[test]
    fn sealed_round_trip_without_and_with_the_key() {
        use crate::format::key::{DataKey, Material};
        use std::sync::Arc;
        let key = Arc::new(DataKey::new(KeyId::random(), &Material::random()));
        let m = sample();
        let bytes = m.encode_sealed(&key);
        let p = &Location::from(Path::new("m"));
        let k = key.clone();
        let with = move |id: &KeyId| {
            assert_eq!(*id, k.id);
            Ok(k.clone())
        };
        let back = Manifest::decode_with(&bytes, p, &with).unwrap();
        assert_eq!(back.blocks, m.blocks);
        assert_eq!(back.meta.kms_key_id, Some(key.id));
        assert_eq!(
            Manifest {
                meta: SnapshotMeta {
                    kms_key_id: None,
                    ..back.meta.clone()
                },
                blocks: back.blocks.clone()
            },
            m
        );
        let n = Manifest::meta_prefix_len(&bytes[..HEADER_LEN]).unwrap();
        let u16_at = |o: usize| bytes[o] as usize + ((bytes[o + 1] as usize) << 8);
        assert_eq!(n, SEALED_HEADER_LEN + u16_at(12) + u16_at(28));
        assert_eq!(
            Manifest::decode_meta(&bytes[..n], p, bytes.len() as u64, Some(&key)).unwrap(),
            back.meta
        );
        // Without the key: what anyone may see, and nothing else.
        let bare = Manifest::decode_meta(&bytes[..n], p, bytes.len() as u64, None).unwrap();
        assert!(bare.sealed);
        assert_eq!(
            (
                &bare.id,
                &bare.parent,
                &bare.owner,
                bare.volume_size,
                bare.block_size
            ),
            (
                &m.meta.id,
                &m.meta.parent,
                &m.meta.owner,
                m.meta.volume_size,
                m.meta.block_size
            )
        );
        assert_eq!(
            (bare.created_ns, bare.kms_key_id),
            (m.meta.created_ns, Some(key.id))
        );
        assert!(bare.description.is_empty() && bare.tags.is_empty() && bare.source.is_empty());
        for secret in [m.meta.description.as_bytes(), m.meta.source.as_bytes()] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret));
        }
        let mut names = vec![ChunkId::of(b"a"), ChunkId::of(b"b")];
        names.sort();
        assert_eq!(Manifest::chunk_names(&bytes, p).unwrap(), names);
        assert!(
            Manifest::decode(&bytes, p)
                .unwrap_err()
                .to_string()
                .contains("encrypted")
        );
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 1;
            assert!(
                Manifest::decode_with(&bad, p, &with).is_err(),
                "flip at {pos} accepted"
            );
        }
        for len in [0, 50, SEALED_HEADER_LEN, bytes.len() - 1] {
            assert!(
                Manifest::decode_with(&bytes[..len], p, &with).is_err(),
                "len {len}"
            );
        }
        let other = Arc::new(DataKey::new(key.id, &Material::random()));
        let wrong = move |_: &KeyId| Ok(other.clone());
        assert!(
            Manifest::decode_with(&bytes, p, &wrong)
                .unwrap_err()
                .to_string()
                .contains("authentication")
        );
    }

    #[test]
    fn block_states_compare_by_content() {
        let a = Block::Data(ChunkId::of(b"a"));
        assert!(Block::Hole.same_content(&Block::Zero));
        assert!(a.same_content(&a));
        assert!(!a.same_content(&Block::Zero));
        assert!(!Block::Hole.same_content(&a));
        let with_holes = [a, Block::Hole];
        let with_zeros = [a, Block::Zero];
        assert_eq!(root_digest(&with_holes), root_digest(&with_zeros));
        assert_ne!(root_digest(&with_holes), root_digest(&[Block::Zero, a]));
    }

    #[test]
    fn block_sizes() {
        assert_eq!(validate_block_size(512 << 10).unwrap(), 512 << 10);
        for bad in [0, 4096, 3 << 20, 16 << 20, 100_000] {
            assert!(validate_block_size(bad).is_err(), "{bad}");
        }
        assert_eq!(block_count(0, 65536), 0);
        assert_eq!(block_count(65537, 65536), 2);
    }
}

#[cfg(test)]
mod frozen {
    use super::*;
    use crate::format::chunk;
    use std::path::Path;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/v1");

    /// The first released formats: a manifest and its chunks written by
    /// blocksnap 0.1 must decode forever.
    #[test]
    fn v1_manifest_and_chunks_decode() {
        let path = Path::new(FIXTURE).join("store/snapshots/snap-3e2e387c701c15658");
        let bytes = std::fs::read(&path).unwrap();
        let m = Manifest::decode(&bytes, &path.clone().into()).unwrap();
        assert_eq!(m.meta.id.as_str(), "snap-3e2e387c701c15658");
        assert_eq!(m.meta.parent, None);
        assert_eq!(m.meta.owner.as_str(), "123456789012");
        assert_eq!(m.meta.block_size, 65536);
        assert_eq!(m.meta.volume_size, 4 * 65536 + 3000);
        assert_eq!(m.meta.description, "v1 fixture");
        assert_eq!(
            m.meta.tags,
            vec![Tag {
                key: "format".into(),
                value: "v1".into()
            }]
        );
        assert_eq!(m.meta.stats.data_blocks, 3);
        assert_eq!(m.meta.stats.new_chunks, 3);
        let states: Vec<_> = m.blocks.iter().map(Block::state_name).collect();
        assert_eq!(states, ["data", "zero", "hole", "data", "data"]);
        assert_eq!(m.meta.root_digest, root_digest(&m.blocks));
        assert_eq!(
            m.encode(),
            bytes,
            "re-encoding changed the bytes of a frozen format"
        );

        let volume = std::fs::read(Path::new(FIXTURE).join("volume.img")).unwrap();
        for (i, b) in m.blocks.iter().enumerate() {
            if let Block::Data(id) = b {
                let hex = id.to_hex();
                let stored = std::fs::read(
                    Path::new(FIXTURE)
                        .join("store/chunks")
                        .join(&hex[..4])
                        .join(&hex),
                )
                .unwrap();
                let raw = chunk::decode(id, &stored).unwrap();
                let start = i * 65536;
                assert_eq!(raw, &volume[start..(start + 65536).min(volume.len())]);
            }
        }
    }
}
