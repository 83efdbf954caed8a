//! The chunk format: how one block's bytes are stored.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BSCK"              (frozen: do not modify)
//! 4       1     format version = 1
//! 5       1     codec: 0 = raw, 1 = zstd, 2 = zstd delta
//! 6       2     reserved, zero
//! 8       4     raw length, u32 little-endian (<= 8 MiB)
//! 12      ..    payload (codecs 0 and 1)
//!
//! codec 2 only:
//! 12      32    base: the chunk id this one is a delta against
//! 44      1     depth: 1 + the base's depth (plain chunks have depth 0), <= 3
//! 45      3     reserved, zero
//! 48      ..    payload: a zstd frame compressed with the base's raw bytes
//!               as its reference prefix
//! ```
//!
//! A changed block is usually its parent's block with a few writes in it;
//! stored as a zstd delta against the parent's chunk it costs about the
//! bytes that changed instead of the whole block. Chains are bounded: a
//! block whose base is already at depth 3 is stored plain.
//!
//! A chunk is named by the BLAKE3-256 of its raw bytes; [`decode_into`]
//! and [`load_into`] check the name before they return a single byte.

use std::cell::RefCell;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::store::ChunkStore;

pub const CHUNK_MAGIC: &[u8; 4] = b"BSCK";
pub const CHUNK_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 12;
pub const DELTA_HEADER_LEN: usize = 48;
/// The longest chain of deltas: a restore decodes at most this many bases.
pub const MAX_DEPTH: u8 = 3;
/// The largest block size, so the largest raw chunk.
pub const MAX_RAW_LEN: usize = 8 << 20;
/// zstd level used for new chunks: the fastest, see README (Speed).
pub const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    ZstdDelta = 2,
}

/// The chunk a delta chunk is decoded against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub id: ChunkId,
    /// This chunk's depth: 1 + the base's.
    pub depth: u8,
}

/// The base of a stored delta chunk, from its first [`DELTA_HEADER_LEN`]
/// bytes; `None` for a plain chunk or bytes that are not a delta header.
pub fn base_of(head: &[u8]) -> Option<Base> {
    if head.len() < DELTA_HEADER_LEN
        || &head[..4] != CHUNK_MAGIC
        || head[5] != Codec::ZstdDelta as u8
    {
        return None;
    }
    Some(Base {
        id: ChunkId(head[12..44].try_into().expect("32 bytes")),
        depth: head[44],
    })
}

/// Encodes `raw` as a delta against `base_raw` (the bytes of chunk `base`,
/// at depth `base_depth`). `None` when the chain would be too long or the
/// delta is not smaller than `limit` bytes.
pub fn encode_delta(
    raw: &[u8],
    base: &ChunkId,
    base_raw: &[u8],
    base_depth: u8,
    limit: usize,
) -> Option<Vec<u8>> {
    use zstd::zstd_safe::{CCtx, CParameter};
    if base_depth >= MAX_DEPTH || raw.len() > MAX_RAW_LEN {
        return None;
    }
    // The matches sit one block back, in the prefix: the window must reach
    // them and the hash table must keep a position per prefix offset.
    let span = (base_raw.len() + raw.len()).max(1 << 10);
    let window_log = (usize::BITS - (span - 1).leading_zeros()).clamp(10, 27);
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(ZSTD_LEVEL))
        .ok()?;
    cctx.set_parameter(CParameter::WindowLog(window_log)).ok()?;
    cctx.set_parameter(CParameter::HashLog((window_log - 4).min(24)))
        .ok()?;
    cctx.ref_prefix(base_raw).ok()?;
    let budget = limit.saturating_sub(DELTA_HEADER_LEN).min(raw.len());
    let mut payload = Vec::with_capacity(budget);
    let n = cctx.compress2(&mut payload, raw).ok()?;
    if DELTA_HEADER_LEN + n >= limit {
        return None;
    }
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + n);
    push_header(&mut out, Codec::ZstdDelta, raw.len());
    out.extend_from_slice(&base.0);
    out.extend_from_slice(&[base_depth + 1, 0, 0, 0]);
    out.extend_from_slice(&payload[..n]);
    Some(out)
}

/// Whether chunk `id` is stored *and* reads back whole. A chunk found in
/// the store may be the partial leftover of a writer that crashed before
/// its sync; one that fails is moved aside (so it can be written anew) and
/// `false` returned.
pub fn present_and_sound(store: &dyn ChunkStore, id: &ChunkId) -> Result<bool> {
    if !store.has(id)? {
        return Ok(false);
    }
    if store.atomic_puts() {
        return Ok(true);
    }
    sound_or_quarantined(store, id)
}

/// Whether chunk `id` reads back whole, its delta chain included; one that
/// fails is moved aside (so the next snapshot of the data writes it anew)
/// and `false` returned. A missing chunk is `false`.
pub fn sound_or_quarantined(store: &dyn ChunkStore, id: &ChunkId) -> Result<bool> {
    match load_into(store, id, &mut Vec::new()) {
        Ok(_) => Ok(true),
        Err(Error::MissingChunk { .. }) => Ok(false),
        Err(Error::CorruptChunk { .. }) => {
            store.quarantine(id)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Loads chunk `id` from `store` into `out`, decoding delta chains, and
/// checks every chunk on the way against its name. Returns the chunk's
/// depth (0 for a plain chunk).
pub fn load_into(store: &dyn ChunkStore, id: &ChunkId, out: &mut Vec<u8>) -> Result<u8> {
    load_chain(store, id, out, MAX_DEPTH)
}

fn load_chain(
    store: &dyn ChunkStore,
    id: &ChunkId,
    out: &mut Vec<u8>,
    bases_left: u8,
) -> Result<u8> {
    let stored = store.get(id)?;
    let Some(base) = base_of(&stored) else {
        decode_into(id, &stored, out)?;
        return Ok(0);
    };
    let corrupt = Error::corrupt_chunk(*id);
    if bases_left == 0 || base.depth == 0 || base.depth > MAX_DEPTH {
        return Err(corrupt(format!(
            "delta chain deeper than {MAX_DEPTH} (depth {})",
            base.depth
        )));
    }
    let mut base_raw = Vec::new();
    let base_depth = match load_chain(store, &base.id, &mut base_raw, bases_left - 1) {
        Ok(d) => d,
        Err(Error::MissingChunk { .. }) => {
            return Err(corrupt(format!(
                "its base chunk {} is missing from the store",
                base.id.short()
            )));
        }
        Err(e) => return Err(corrupt(format!("its base chunk {}: {e}", base.id.short()))),
    };
    if base_depth + 1 != base.depth {
        return Err(corrupt(format!(
            "depth {} over a base of depth {base_depth}",
            base.depth
        )));
    }
    decode_delta(id, &stored, &base_raw, out)?;
    Ok(base.depth)
}

fn decode_delta(id: &ChunkId, stored: &[u8], base_raw: &[u8], out: &mut Vec<u8>) -> Result<()> {
    use zstd::zstd_safe::DCtx;
    let corrupt = Error::corrupt_chunk(*id);
    let raw_len = checked_raw_len(id, stored)?;
    let mut dctx = DCtx::create();
    dctx.ref_prefix(base_raw)
        .map_err(|c| corrupt(format!("zstd: {}", zstd::zstd_safe::get_error_name(c))))?;
    out.clear();
    out.reserve(raw_len);
    let n = dctx
        .decompress(&mut *out, &stored[DELTA_HEADER_LEN..])
        .map_err(|c| corrupt(format!("zstd: {}", zstd::zstd_safe::get_error_name(c))))?;
    if n != raw_len {
        return Err(corrupt(format!(
            "decompressed to {n} bytes, header says {raw_len}"
        )));
    }
    if ChunkId::of(out) != *id {
        return Err(corrupt("its bytes do not match its BLAKE3 name".into()));
    }
    Ok(())
}

/// Checks magic, version and the raw length bound; returns the raw length.
fn checked_raw_len(id: &ChunkId, stored: &[u8]) -> Result<usize> {
    let corrupt = Error::corrupt_chunk(*id);
    if stored.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes is shorter than a chunk header",
            stored.len()
        )));
    }
    if &stored[..4] != CHUNK_MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    if stored[4] > CHUNK_VERSION {
        return Err(Error::NewerChunk {
            chunk: *id,
            detail: format!("chunk format version {}", stored[4]),
        });
    }
    if stored[4] != CHUNK_VERSION {
        return Err(corrupt(format!(
            "chunk format version {} was never written",
            stored[4]
        )));
    }
    if stored[5] > Codec::ZstdDelta as u8 {
        // A codec added later must come with a version bump; a reader
        // still never calls an unknown codec damage.
        return Err(Error::NewerChunk {
            chunk: *id,
            detail: format!("codec {}", stored[5]),
        });
    }
    let raw_len = u32::from_le_bytes(stored[8..12].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_RAW_LEN {
        return Err(corrupt(format!(
            "raw length {raw_len} exceeds the {MAX_RAW_LEN}-byte limit"
        )));
    }
    if stored[5] == Codec::ZstdDelta as u8 && stored.len() < DELTA_HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes is shorter than a delta chunk header",
            stored.len()
        )));
    }
    Ok(raw_len)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn push_header(out: &mut Vec<u8>, codec: Codec, raw_len: usize) {
    out.extend_from_slice(CHUNK_MAGIC);
    out.push(CHUNK_VERSION);
    out.push(codec as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(raw_len as u32).to_le_bytes());
}

/// Encodes `raw` as a stored chunk: zstd when that is smaller, raw otherwise.
pub fn encode(raw: &[u8]) -> Result<Vec<u8>> {
    assert!(
        raw.len() <= MAX_RAW_LEN,
        "block larger than the largest block size"
    );
    // Compress into a per-thread scratch buffer no larger than the raw
    // block: output that does not fit is not worth storing compressed,
    // and nothing is zero-filled.
    let compressed = COMPRESSOR
        .with(|cell| -> std::io::Result<Option<Vec<u8>>> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some((zstd::bulk::Compressor::new(ZSTD_LEVEL)?, Vec::new()));
            }
            let (c, scratch) = slot.as_mut().expect("compressor was just created");
            scratch.clear();
            scratch.reserve(raw.len());
            match c.compress_to_buffer(raw, scratch) {
                Ok(n) if n < raw.len() => {
                    let mut out = Vec::with_capacity(HEADER_LEN + n);
                    push_header(&mut out, Codec::Zstd, raw.len());
                    out.extend_from_slice(&scratch[..n]);
                    Ok(Some(out))
                }
                _ => Ok(None),
            }
        })
        // No compression context (out of memory): store the block raw.
        .unwrap_or(None);
    let out = compressed.unwrap_or_else(|| {
        let mut out = Vec::with_capacity(HEADER_LEN + raw.len());
        push_header(&mut out, Codec::Raw, raw.len());
        out.extend_from_slice(raw);
        out
    });
    Ok(out)
}

/// Decodes a stored plain chunk into `out` and checks that its bytes hash
/// to `id`. `out` is cleared first; its capacity is reused. A delta chunk
/// needs its base: use [`load_into`].
pub fn decode_into(id: &ChunkId, stored: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let corrupt = Error::corrupt_chunk(*id);
    let raw_len = checked_raw_len(id, stored)?;
    let payload = &stored[HEADER_LEN..];
    out.clear();
    match stored[5] {
        c if c == Codec::Raw as u8 => {
            if payload.len() != raw_len {
                return Err(corrupt(format!(
                    "raw payload is {} bytes, header says {raw_len}",
                    payload.len()
                )));
            }
            out.extend_from_slice(payload);
        }
        c if c == Codec::Zstd as u8 => {
            out.reserve(raw_len);
            let n = DECOMPRESSOR
                .with(|cell| -> std::io::Result<usize> {
                    let mut slot = cell.borrow_mut();
                    if slot.is_none() {
                        *slot = Some(zstd::bulk::Decompressor::new()?);
                    }
                    let d = slot.as_mut().expect("decompressor was just created");
                    d.decompress_to_buffer(payload, &mut *out)
                })
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            if n != raw_len {
                return Err(corrupt(format!(
                    "decompressed to {n} bytes, header says {raw_len}"
                )));
            }
        }
        c if c == Codec::ZstdDelta as u8 => {
            return Err(corrupt(
                "a delta chunk decodes only with its base (see load_into)".into(),
            ));
        }
        other => return Err(corrupt(format!("unknown codec {other}"))),
    }
    if ChunkId::of(out) != *id {
        return Err(corrupt("its bytes do not match its BLAKE3 name".into()));
    }
    Ok(())
}

/// [`decode_into`] a fresh buffer.
pub fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_into(id, stored, &mut out)?;
    Ok(out)
}

/// Whether a chunk written at `t` changed after a commit at `since`. A
/// file's ctime ticks in milliseconds, so a change in the commit's own tick
/// counts (`>=`: the few chunks written in that tick are read back). S3's
/// Last-Modified has whole seconds, and counting the commit's second would
/// read back every chunk uploaded in it; there only a later second counts,
/// so an overwrite in the very second of the commit goes unseen until
/// `store verify`.
fn changed_after(store: &dyn ChunkStore, t: SystemTime, since: SystemTime) -> bool {
    if store.atomic_puts() {
        t > since
    } else {
        t >= since
    }
}

/// Whether a chunk that a parent snapshot names can be named again by a
/// new snapshot without reading it: it and every base of its delta chain
/// are stored and unchanged since `since` (when the parent was committed,
/// by the store's clock; `None` when unknown). Chunks never change once
/// written, so one changed later (an edited byte, a rewrite) is read back
/// and verified instead, and a corrupt one is moved aside. A store with
/// atomic puts (S3) answers from one listing and its delta bases are not
/// walked: there `store verify --repair` moves aside every delta whose
/// chain is broken together with the broken base.
pub fn reusable(store: &dyn ChunkStore, id: &ChunkId, since: Option<SystemTime>) -> Result<bool> {
    let mut current = *id;
    for _ in 0..=MAX_DEPTH {
        match store.changed_at(&current)? {
            None => return Ok(false),
            Some(t) if since.is_none_or(|s| changed_after(store, t, s)) => {
                return sound_or_quarantined(store, id);
            }
            Some(_) => {}
        }
        if store.atomic_puts() {
            return Ok(true);
        }
        let head = match store.get_head(&current, DELTA_HEADER_LEN) {
            Ok(h) => h,
            Err(Error::MissingChunk { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        match base_of(&head) {
            Some(b) => current = b.id,
            None => return Ok(true),
        }
    }
    // Deeper than any chain blocksnap writes: let a full read decide.
    sound_or_quarantined(store, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_version_or_codec_is_not_damage_and_an_older_version_is() {
        let raw = vec![7u8; 4096];
        let id = ChunkId::of(&raw);
        let good = encode(&raw).unwrap();
        let with = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            decode_into(&id, &b, &mut Vec::new()).unwrap_err()
        };
        for (at, v) in [
            (4, CHUNK_VERSION + 1),
            (5, Codec::ZstdDelta as u8 + 1),
            (5, 255),
        ] {
            let e = with(at, v);
            assert!(matches!(e, Error::NewerChunk { .. }), "{e}");
            assert!(e.to_string().contains("newer blocksnap"), "{e}");
        }
        let e = with(4, 0);
        assert!(matches!(e, Error::CorruptChunk { .. }), "{e}");
        assert!(!e.to_string().contains("upgrade"), "{e}");
    }

    #[test]
    fn compressible_round_trip() {
        let raw: Vec<u8> = b"hello block world "
            .iter()
            .cycle()
            .take(512 << 10)
            .copied()
            .collect();
        let id = ChunkId::of(&raw);
        let stored = encode(&raw).unwrap();
        assert_eq!(stored[5], Codec::Zstd as u8);
        assert!(stored.len() < raw.len() / 10);
        assert_eq!(decode(&id, &stored).unwrap(), raw);
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let mut raw = vec![0u8; 64 << 10];
        getrandom::fill(&mut raw).unwrap();
        let id = ChunkId::of(&raw);
        let stored = encode(&raw).unwrap();
        assert_eq!(stored[5], Codec::Raw as u8);
        assert_eq!(stored.len(), HEADER_LEN + raw.len());
        assert_eq!(decode(&id, &stored).unwrap(), raw);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let id = ChunkId::of(&raw);
        let stored = encode(&raw).unwrap();
        for pos in [0, 4, 5, 8, HEADER_LEN, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[pos] ^= 0x40;
            let err = decode(&id, &bad).unwrap_err();
            // A version or codec byte that flips upwards reads as a newer
            // format: still refused, but never moved aside by a repair.
            let newer = pos == 4 || pos == 5;
            assert!(
                matches!(err, Error::CorruptChunk { .. })
                    || (newer && matches!(err, Error::NewerChunk { .. })),
                "byte {pos}: {err}"
            );
        }
        assert!(decode(&id, &stored[..stored.len() - 1]).is_err());
        assert!(decode(&id, &stored[..5]).is_err());
    }

    #[test]
    fn absurd_raw_length_is_rejected_before_allocating() {
        let mut bad = Vec::from(&CHUNK_MAGIC[..]);
        bad.extend_from_slice(&[1, 1, 0, 0]);
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&ChunkId([0; 32]), &bad).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_delta_costs_about_the_changed_bytes_and_chains_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::LocalChunkStore::new(dir.path().to_path_buf());
        let block = 512 << 10;
        let mut versions = vec![random(block, 1)];
        for v in 1..=5u64 {
            let mut next = versions.last().unwrap().clone();
            let at = (v as usize * 100_000) % (block - 65536);
            next[at..at + 65536].copy_from_slice(&random(65536, 100 + v));
            versions.push(next);
        }
        let mut prev: Option<(ChunkId, u8)> = None;
        let mut depths = Vec::new();
        for raw in &versions {
            let id = ChunkId::of(raw);
            let plain = encode(raw).unwrap();
            let stored = match prev {
                Some((base, depth)) => {
                    let mut base_raw = Vec::new();
                    assert_eq!(load_into(&store, &base, &mut base_raw).unwrap(), depth);
                    match encode_delta(raw, &base, &base_raw, depth, plain.len()) {
                        Some(d) => {
                            assert!(
                                d.len() < 70_000,
                                "delta of a 64 KiB change took {} bytes",
                                d.len()
                            );
                            d
                        }
                        None => {
                            assert_eq!(depth, MAX_DEPTH, "delta refused below the depth limit");
                            plain
                        }
                    }
                }
                None => plain,
            };
            store.put(&id, &stored).unwrap();
            let mut out = Vec::new();
            let depth = load_into(&store, &id, &mut out).unwrap();
            assert_eq!(&out, raw);
            depths.push(depth);
            prev = Some((id, depth));
        }
        assert_eq!(depths, [0, 1, 2, 3, 0, 1]);
        // decode_into alone refuses a delta; a missing base is named.
        let last = ChunkId::of(versions.last().unwrap());
        let stored = store.get(&last).unwrap();
        assert!(
            decode(&last, &stored)
                .unwrap_err()
                .to_string()
                .contains("base")
        );
        let base = base_of(&stored).unwrap();
        store.remove(&base.id).unwrap();
        let err = load_into(&store, &last, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(matches!(err, Error::CorruptChunk { .. }));
    }

    #[test]
    fn a_corrupt_base_fails_its_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::LocalChunkStore::new(dir.path().to_path_buf());
        let a = random(65536, 7);
        let mut b = a.clone();
        b[100..200].fill(9);
        let (ia, ib) = (ChunkId::of(&a), ChunkId::of(&b));
        store.put(&ia, &encode(&a).unwrap()).unwrap();
        store
            .put(&ib, &encode_delta(&b, &ia, &a, 0, usize::MAX).unwrap())
            .unwrap();
        let mut bad = store.get(&ia).unwrap();
        bad[HEADER_LEN + 10] ^= 1;
        std::fs::write(store.path_of(&ia), &bad).unwrap();
        let err = load_into(&store, &ib, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains(&ia.short()), "{err}");
    }
}
