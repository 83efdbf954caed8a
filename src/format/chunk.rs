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
//!
//! codec 3 (page delta), format version 3 only:
//! 0       48    as codec 2: magic, version 3, codec 3, raw length, base,
//!               depth (the base's raw length is this chunk's)
//! 48      ..    payload: one zstd frame of a bitmap of the block's 4 KiB
//!               pages (bit i of byte i/8: page i changed; unused bits zero)
//!               followed by each changed page in order (the last page of a
//!               block may be short)
//! ```
//!
//! A changed block is usually its parent's block with a few writes in it;
//! stored as a delta against the parent's chunk it costs about the bytes
//! that changed instead of the whole block. A page delta compares the two
//! blocks page by page and keeps the changed pages: 7 to 22 times faster
//! than zstd's delta at level 1 and smaller for block writes (see README,
//! Speed); zstd's delta stays for a base of another length. Chains are
//! bounded: a block whose base is already at depth 3 is stored plain.
//!
//! Version 3 exists only for codec 3, so a blocksnap that predates page
//! deltas says "written by a newer blocksnap" rather than "corrupt"; every
//! other codec is still written at version 1.
//!
//! A chunk is named by the BLAKE3-256 of its raw bytes (keyed BLAKE3 under
//! an encryption key, see [`Namer`]); [`decode_into`] and
//! `store::chain::load_into` check the name before they return a single
//! byte.
//!
//! # Sealed chunks (versions 2 and 4)
//!
//! A chunk under an encryption key keeps the plain header of its codec
//! (version byte 2 instead of 1, 4 instead of 3, so a blocksnap that
//! predates encryption says "written by a newer blocksnap"); its payload is
//! encrypted where it lies, and a trailer follows:
//!
//! ```text
//! 0       H     the plain header, version 2/4   H = 12, or 48 for codecs 2, 3
//! H       ..    the payload of the plain chunk, encrypted (`key::Cipher`)
//! end-56  24    random nonce
//! end-32  16    tag; associated data: the chunk's name, bytes 0..H, key id
//! end-16  16    key id (the UUID's bytes)
//! ```
//!
//! A delta's base stays readable (gc follows chains without a key); the
//! name as associated data makes a chunk copied or moved to another name
//! fail, as does any change to its header. Sealing and opening work in
//! place: no copy of the payload. [`seal`] and [`unseal`] turn a
//! plain chunk into a sealed one and back; the decoders read plain ones.

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::format::key::{DataKey, SEAL_OVERHEAD};
use crate::id::{ChunkId, KeyId, Namer};

pub const CHUNK_MAGIC: &[u8; 4] = b"BSCK";
pub const CHUNK_VERSION: u8 = 1;
/// The version of a sealed (encrypted) chunk.
pub const SEALED_VERSION: u8 = 2;
/// The version of a plain page delta (codec 3), the only codec written at it.
pub const PAGE_DELTA_VERSION: u8 = 3;
/// The version of a sealed page delta.
pub const SEALED_PAGE_DELTA_VERSION: u8 = 4;
/// The unit a page delta compares and keeps.
pub const DELTA_PAGE: usize = 4096;
const KEY_ID_LEN: usize = 16;
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
    PageDelta = 3,
}

/// Whether `version` is that of a sealed chunk.
fn sealed_version(version: u8) -> bool {
    version == SEALED_VERSION || version == SEALED_PAGE_DELTA_VERSION
}

/// Whether the stored bytes are a sealed chunk (by magic and version).
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.len() > 4 && &stored[..4] == CHUNK_MAGIC && sealed_version(stored[4])
}

/// Whether `codec` is one of the delta codecs (a base and a depth follow
/// the header).
fn is_delta(codec: u8) -> bool {
    codec == Codec::ZstdDelta as u8 || codec == Codec::PageDelta as u8
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
    if head.len() < DELTA_HEADER_LEN || &head[..4] != CHUNK_MAGIC || !is_delta(head[5]) {
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
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + n + SEALED_TRAILER_LEN);
    push_header(&mut out, Codec::ZstdDelta, raw.len());
    out.extend_from_slice(&base.0);
    out.extend_from_slice(&[base_depth + 1, 0, 0, 0]);
    out.extend_from_slice(&payload[..n]);
    Some(out)
}

/// Encodes `raw` against `base_raw` (the bytes of chunk `base`, at depth
/// `base_depth`) as a page delta, or as a zstd delta when the two differ
/// in length. `None` when the chain would be too long or the delta is not
/// smaller than `limit` bytes.
pub fn encode_against(
    raw: &[u8],
    base: &ChunkId,
    base_raw: &[u8],
    base_depth: u8,
    limit: usize,
) -> Option<Vec<u8>> {
    if raw.len() == base_raw.len() {
        encode_page_delta(raw, base, base_raw, base_depth, limit)
    } else {
        encode_delta(raw, base, base_raw, base_depth, limit)
    }
}

/// Encodes `raw` as a page delta against `base_raw` (the bytes of chunk
/// `base`, at depth `base_depth`, as long as `raw`). `None` when the chain
/// would be too long or the delta is not smaller than `limit` bytes.
pub fn encode_page_delta(
    raw: &[u8],
    base: &ChunkId,
    base_raw: &[u8],
    base_depth: u8,
    limit: usize,
) -> Option<Vec<u8>> {
    if base_depth >= MAX_DEPTH || raw.len() > MAX_RAW_LEN || raw.len() != base_raw.len() {
        return None;
    }
    let pages = raw.len().div_ceil(DELTA_PAGE);
    let bitmap = pages.div_ceil(8);
    let mut diff = vec![0u8; bitmap];
    for (i, (now, was)) in raw
        .chunks(DELTA_PAGE)
        .zip(base_raw.chunks(DELTA_PAGE))
        .enumerate()
    {
        if now != was {
            diff[i / 8] |= 1 << (i % 8);
            diff.extend_from_slice(now);
            if diff.len() >= limit {
                // Nearly every page changed: the block alone compresses as
                // well and needs no base to restore.
                return None;
            }
        }
    }
    let payload = with_compressor(|c, _| c.compress(&diff)).ok()?;
    if DELTA_HEADER_LEN + payload.len() >= limit {
        return None;
    }
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + payload.len() + SEALED_TRAILER_LEN);
    push_header(&mut out, Codec::PageDelta, raw.len());
    out.extend_from_slice(&base.0);
    out.extend_from_slice(&[base_depth + 1, 0, 0, 0]);
    out.extend_from_slice(&payload);
    Some(out)
}

/// Decodes the delta chunk `stored` (codec 2 or 3) over its base's raw
/// bytes and checks the result against the name `id`.
pub fn decode_delta(
    id: &ChunkId,
    stored: &[u8],
    base_raw: &[u8],
    out: &mut Vec<u8>,
    namer: &Namer,
) -> Result<()> {
    let raw_len = checked_raw_len(id, stored)?;
    match stored[5] {
        c if c == Codec::ZstdDelta as u8 => decode_zstd_delta(id, stored, raw_len, base_raw, out)?,
        c if c == Codec::PageDelta as u8 => decode_page_delta(id, stored, raw_len, base_raw, out)?,
        _ => {
            return Err(Error::corrupt_chunk(*id)(
                "it is not a delta chunk, but is read as one".into(),
            ));
        }
    }
    check_name(id, out, namer)
}

fn decode_page_delta(
    id: &ChunkId,
    stored: &[u8],
    raw_len: usize,
    base_raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let corrupt = Error::corrupt_chunk(*id);
    if base_raw.len() != raw_len {
        return Err(corrupt(format!(
            "a page delta of {raw_len} bytes over a base of {} bytes",
            base_raw.len()
        )));
    }
    let pages = raw_len.div_ceil(DELTA_PAGE);
    let bitmap = pages.div_ceil(8);
    let mut diff = Vec::with_capacity(bitmap + raw_len);
    decompress_into(&stored[DELTA_HEADER_LEN..], &mut diff)
        .map_err(|e| corrupt(format!("zstd: {e}")))?;
    if diff.len() < bitmap {
        return Err(corrupt("page delta shorter than its page bitmap".into()));
    }
    if !pages.is_multiple_of(8) && diff[bitmap - 1] >> (pages % 8) != 0 {
        return Err(corrupt("page bitmap marks pages past the block".into()));
    }
    out.clear();
    out.extend_from_slice(base_raw);
    let mut at = bitmap;
    for i in (0..pages).filter(|i| diff[i / 8] & (1 << (i % 8)) != 0) {
        let page = i * DELTA_PAGE..((i + 1) * DELTA_PAGE).min(raw_len);
        let Some(bytes) = diff.get(at..at + page.len()) else {
            return Err(corrupt("page delta shorter than the pages it marks".into()));
        };
        out[page].copy_from_slice(bytes);
        at += bytes.len();
    }
    if at != diff.len() {
        return Err(corrupt(format!(
            "page delta holds {} bytes past the pages it marks",
            diff.len() - at
        )));
    }
    Ok(())
}

fn decode_zstd_delta(
    id: &ChunkId,
    stored: &[u8],
    raw_len: usize,
    base_raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    use zstd::zstd_safe::DCtx;
    let corrupt = Error::corrupt_chunk(*id);
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
    Ok(())
}

fn check_name(id: &ChunkId, raw: &[u8], namer: &Namer) -> Result<()> {
    if namer.name(raw) != *id {
        return Err(Error::CorruptChunk {
            chunk: *id,
            reason: "its bytes do not match its BLAKE3 name".into(),
        });
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
    if sealed_version(stored[4]) {
        return Err(corrupt(
            "it is encrypted, but is read as a plain chunk: the snapshot naming it is not \
             encrypted, so the chunk was put there from elsewhere"
                .into(),
        ));
    }
    if stored[4] > SEALED_PAGE_DELTA_VERSION {
        return Err(Error::NewerChunk {
            chunk: *id,
            detail: format!("chunk format version {}", stored[4]),
        });
    }
    if stored[4] != CHUNK_VERSION && stored[4] != PAGE_DELTA_VERSION {
        return Err(corrupt(format!(
            "chunk format version {} was never written",
            stored[4]
        )));
    }
    check_codec(id, stored[4], stored[5])?;
    let raw_len = u32::from_le_bytes(stored[8..12].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_RAW_LEN {
        return Err(corrupt(format!(
            "raw length {raw_len} exceeds the {MAX_RAW_LEN}-byte limit"
        )));
    }
    if is_delta(stored[5]) && stored.len() < DELTA_HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes is shorter than a delta chunk header",
            stored.len()
        )));
    }
    Ok(raw_len)
}

/// A codec unknown to this blocksnap is a newer one (a codec added later
/// comes with a version bump; a reader still never calls it damage); a
/// page delta lives at version 3 (4 sealed) and nothing else does.
fn check_codec(id: &ChunkId, version: u8, codec: u8) -> Result<()> {
    if codec > Codec::PageDelta as u8 {
        return Err(Error::NewerChunk {
            chunk: *id,
            detail: format!("codec {codec}"),
        });
    }
    let page_delta_version = matches!(version, PAGE_DELTA_VERSION | SEALED_PAGE_DELTA_VERSION);
    if (codec == Codec::PageDelta as u8) != page_delta_version {
        return Err(Error::corrupt_chunk(*id)(format!(
            "codec {codec} in a chunk of format version {version}, which is never written"
        )));
    }
    Ok(())
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's zstd compressor (at [`ZSTD_LEVEL`]) and its
/// scratch buffer.
fn with_compressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>, &mut Vec<u8>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some((zstd::bulk::Compressor::new(ZSTD_LEVEL)?, Vec::new()));
        }
        let (c, scratch) = slot.as_mut().expect("compressor was just created");
        f(c, scratch)
    })
}

/// Decompresses the zstd frame `payload` into `out` (replacing its
/// content, at most its capacity) with this thread's decompressor; returns
/// the bytes written.
fn decompress_into(payload: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        let d = slot.as_mut().expect("decompressor was just created");
        d.decompress_to_buffer(payload, out)
    })
}

fn push_header(out: &mut Vec<u8>, codec: Codec, raw_len: usize) {
    out.extend_from_slice(CHUNK_MAGIC);
    out.push(if codec == Codec::PageDelta {
        PAGE_DELTA_VERSION
    } else {
        CHUNK_VERSION
    });
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
    let compressed = with_compressor(|c, scratch| {
        scratch.clear();
        scratch.reserve(raw.len());
        match c.compress_to_buffer(raw, scratch) {
            Ok(n) if n < raw.len() => {
                // Room for a seal's trailer: sealing never moves it.
                let mut out = Vec::with_capacity(HEADER_LEN + n + SEALED_TRAILER_LEN);
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
        let mut out = Vec::with_capacity(HEADER_LEN + raw.len() + SEALED_TRAILER_LEN);
        push_header(&mut out, Codec::Raw, raw.len());
        out.extend_from_slice(raw);
        out
    });
    Ok(out)
}

/// Decodes a stored plain chunk into `out` and checks that its bytes hash
/// to `id`. `out` is cleared first; its capacity is reused. A delta chunk
/// needs its base: use `store::chain::load_into`.
pub fn decode_into(id: &ChunkId, stored: &[u8], out: &mut Vec<u8>, namer: &Namer) -> Result<()> {
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
            let n = decompress_into(payload, out).map_err(|e| corrupt(format!("zstd: {e}")))?;
            if n != raw_len {
                return Err(corrupt(format!(
                    "decompressed to {n} bytes, header says {raw_len}"
                )));
            }
        }
        c if is_delta(c) => {
            return Err(corrupt(
                "a delta chunk decodes only with its base (see load_into)".into(),
            ));
        }
        other => return Err(corrupt(format!("unknown codec {other}"))),
    }
    check_name(id, out, namer)
}

/// [`decode_into`] a fresh buffer, for a plainly named chunk.
pub fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_into(id, stored, &mut out, &Namer::Plain)?;
    Ok(out)
}

/// The length of the plain header of a chunk whose codec byte is `codec`.
fn plain_header_len(codec: u8) -> usize {
    if is_delta(codec) {
        DELTA_HEADER_LEN
    } else {
        HEADER_LEN
    }
}

/// Bytes a sealed chunk adds to its plain form.
pub const SEALED_TRAILER_LEN: usize = KEY_ID_LEN + SEAL_OVERHEAD;

/// The key a sealed chunk is under, from its whole stored bytes; `None`
/// for a plain chunk or bytes that are not a sealed chunk.
pub fn sealed_key_of(stored: &[u8]) -> Option<KeyId> {
    if stored.len() < HEADER_LEN || !is_sealed(stored) {
        return None;
    }
    if stored.len() < plain_header_len(stored[5]) + SEALED_TRAILER_LEN {
        return None;
    }
    let at = stored.len() - KEY_ID_LEN;
    Some(KeyId(stored[at..].try_into().expect("16 bytes")))
}

fn sealed_ad(id: &ChunkId, header: &[u8], key: &KeyId) -> Vec<u8> {
    [&id.0[..], header, &key.0[..]].concat()
}

/// Seals the plain chunk `plain` (as [`encode`] or [`encode_delta`] wrote
/// it) named `id` under `key`, in place.
pub fn seal(key: &DataKey, id: &ChunkId, mut plain: Vec<u8>) -> Vec<u8> {
    let hl = plain_header_len(plain[5]);
    plain[4] = if plain[4] == PAGE_DELTA_VERSION {
        SEALED_PAGE_DELTA_VERSION
    } else {
        SEALED_VERSION
    };
    let ad = sealed_ad(id, &plain[..hl], &key.id);
    plain.reserve(SEALED_TRAILER_LEN);
    key.chunk_cipher().seal_in_place(&ad, &mut plain, hl);
    plain.extend_from_slice(&key.id.0);
    plain
}

/// Opens the sealed chunk `stored` named `id` under `key` back into its
/// plain form (in place), which the decoders read. A plain chunk, one
/// under another key, or one that fails authentication (altered, or moved
/// from another name) is corrupt.
pub fn unseal(key: &DataKey, id: &ChunkId, mut stored: Vec<u8>) -> Result<Vec<u8>> {
    let corrupt = Error::corrupt_chunk(*id);
    if stored.len() < HEADER_LEN || &stored[..4] != CHUNK_MAGIC {
        return Err(corrupt("not a chunk (bad magic or too short)".into()));
    }
    let plain_version = match stored[4] {
        SEALED_VERSION => CHUNK_VERSION,
        SEALED_PAGE_DELTA_VERSION => PAGE_DELTA_VERSION,
        CHUNK_VERSION | PAGE_DELTA_VERSION => {
            return Err(corrupt(format!(
                "it is not encrypted, but the snapshot naming it is encrypted under key {}: \
                 the chunk was put there from elsewhere",
                key.id
            )));
        }
        v if v > SEALED_PAGE_DELTA_VERSION => {
            return Err(Error::NewerChunk {
                chunk: *id,
                detail: format!("chunk format version {v}"),
            });
        }
        v => {
            return Err(corrupt(format!(
                "chunk format version {v} was never written"
            )));
        }
    };
    check_codec(id, stored[4], stored[5])?;
    let hl = plain_header_len(stored[5]);
    let Some(under) = sealed_key_of(&stored) else {
        return Err(corrupt(format!(
            "{} bytes is shorter than a sealed chunk",
            stored.len()
        )));
    };
    if under != key.id {
        return Err(corrupt(format!(
            "it is encrypted under key {under}, but the snapshot naming it is under key {}: the \
             chunk was put there from elsewhere",
            key.id
        )));
    }
    let ad = sealed_ad(id, &stored[..hl], &key.id);
    stored.truncate(stored.len() - KEY_ID_LEN);
    if !key.chunk_cipher().open_in_place(&ad, &mut stored, hl) {
        return Err(corrupt(
            "it fails authentication under its key: it was altered, or moved here from another \
             chunk's name"
                .into(),
        ));
    }
    stored[4] = plain_version;
    Ok(stored)
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
            decode_into(&id, &b, &mut Vec::new(), &Namer::Plain).unwrap_err()
        };
        for (at, v) in [
            (4, SEALED_PAGE_DELTA_VERSION + 1),
            (5, Codec::PageDelta as u8 + 1),
            (5, 255),
        ] {
            let e = with(at, v);
            assert!(matches!(e, Error::NewerChunk { .. }), "{e}");
            assert!(e.to_string().contains("newer blocksnap"), "{e}");
        }
        // Version 0 was never written; a page delta is written at version 3
        // only, and only a page delta is.
        for (at, v) in [(4, 0), (4, PAGE_DELTA_VERSION), (5, Codec::PageDelta as u8)] {
            let e = with(at, v);
            assert!(matches!(e, Error::CorruptChunk { .. }), "{at} = {v}: {e}");
            assert!(!e.to_string().contains("newer"), "{e}");
        }
    }

    /// A 100,000-byte block (its last page short) and a base that differs
    /// from it in three pages, the short one among them.
    fn page_delta_case() -> (Vec<u8>, Vec<u8>) {
        let base: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut raw = base.clone();
        raw[5] ^= 0xff;
        raw[4096 * 7 + 100..4096 * 7 + 3000].fill(0xaa);
        raw[99_999] ^= 1;
        (base, raw)
    }

    #[test]
    fn a_page_delta_keeps_the_changed_pages_and_decodes_over_its_base() {
        let (base, raw) = page_delta_case();
        let (bid, id) = (ChunkId::of(&base), ChunkId::of(&raw));
        let d = encode_page_delta(&raw, &bid, &base, 1, usize::MAX).unwrap();
        assert_eq!((d[4], d[5]), (PAGE_DELTA_VERSION, Codec::PageDelta as u8));
        assert!(
            d.len() < 3 * DELTA_PAGE + DELTA_HEADER_LEN,
            "{} bytes",
            d.len()
        );
        assert_eq!(base_of(&d), Some(Base { id: bid, depth: 2 }));
        let mut out = Vec::new();
        decode_delta(&id, &d, &base, &mut out, &Namer::Plain).unwrap();
        assert_eq!(out, raw);
        // Over another base, or one of another length: damage, named.
        let mut other = base.clone();
        other[50_000] ^= 1;
        let e = decode_delta(&id, &d, &other, &mut out, &Namer::Plain).unwrap_err();
        assert!(e.to_string().contains("BLAKE3"), "{e}");
        let e = decode_delta(&id, &d, &base[..90_000], &mut out, &Namer::Plain).unwrap_err();
        assert!(e.to_string().contains("over a base of 90000 bytes"), "{e}");
        // Every flipped byte of the header and payload, and every
        // truncation, is refused (the base and depth are the chain's to
        // check, the reserved bytes no one's).
        for pos in (0..6).chain(8..12).chain(DELTA_HEADER_LEN..d.len()) {
            let mut bad = d.clone();
            bad[pos] ^= 0x01;
            assert!(
                decode_delta(&id, &bad, &base, &mut out, &Namer::Plain).is_err(),
                "flip at {pos} accepted"
            );
        }
        for len in 0..d.len() {
            assert!(decode_delta(&id, &d[..len], &base, &mut out, &Namer::Plain).is_err());
        }
        // The chain bound, a base of another length, and no saving.
        assert!(encode_page_delta(&raw, &bid, &base, MAX_DEPTH, usize::MAX).is_none());
        assert!(encode_page_delta(&raw, &bid, &base[..4096], 0, usize::MAX).is_none());
        assert!(encode_page_delta(&raw, &bid, &base, 0, 100).is_none());
        // Every page rewritten: stored plain, even where it would compress.
        let rewritten: Vec<u8> = base.iter().map(|b| b ^ 0x55).collect();
        let limit = base.len() - base.len() / 8;
        assert!(encode_page_delta(&rewritten, &bid, &base, 0, limit).is_none());
        // encode_against takes zstd's delta for a base of another length.
        let z = encode_against(&raw, &bid, &base[..60_000], 0, usize::MAX).unwrap();
        assert_eq!((z[4], z[5]), (CHUNK_VERSION, Codec::ZstdDelta as u8));
        decode_delta(&id, &z, &base[..60_000], &mut out, &Namer::Plain).unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn a_page_delta_bitmap_marking_pages_past_the_block_is_damage() {
        let (base, raw) = page_delta_case();
        let bid = ChunkId::of(&base);
        let pages = raw.len().div_ceil(DELTA_PAGE);
        let mut diff = vec![0u8; pages.div_ceil(8)];
        diff[0] = 1;
        diff.extend_from_slice(&raw[..DELTA_PAGE]);
        diff[pages / 8] |= 1 << (pages % 8);
        let mut d = encode_page_delta(&raw, &bid, &base, 0, usize::MAX).unwrap();
        d.truncate(DELTA_HEADER_LEN);
        d.extend_from_slice(&zstd::bulk::compress(&diff, 1).unwrap());
        let e = decode_delta(
            &ChunkId::of(&raw),
            &d,
            &base,
            &mut Vec::new(),
            &Namer::Plain,
        )
        .unwrap_err();
        assert!(e.to_string().contains("past the block"), "{e}");
    }

    #[test]
    fn sealed_chunks_open_under_their_key_and_name_only() {
        use crate::format::key::{DataKey, Material};
        let key = DataKey::new(KeyId::random(), &Material::random());
        let other = DataKey::new(KeyId::random(), &Material::random());
        let raw: Vec<u8> = b"secret block "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let id = key.namer().name(&raw);
        let plain = encode(&raw).unwrap();
        let sealed = seal(&key, &id, plain.clone());
        assert_eq!(sealed_key_of(&sealed), Some(key.id));
        assert_eq!(sealed_key_of(&plain), None);
        assert!(!sealed.windows(13).any(|w| w == b"secret block "));
        let opened = unseal(&key, &id, sealed.clone()).unwrap();
        assert_eq!(opened, plain);
        let mut out = Vec::new();
        decode_into(&id, &opened, &mut out, &key.namer()).unwrap();
        assert_eq!(out, raw);
        // Read as plain, under another key, under another name, or altered.
        assert!(matches!(
            decode(&id, &sealed),
            Err(Error::CorruptChunk { .. })
        ));
        assert!(
            unseal(&other, &id, sealed.clone())
                .unwrap_err()
                .to_string()
                .contains("under key")
        );
        assert!(unseal(&key, &ChunkId([1; 32]), sealed.clone()).is_err());
        assert!(
            unseal(&key, &id, plain.clone())
                .unwrap_err()
                .to_string()
                .contains("not encrypted")
        );
        for pos in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x10;
            assert!(unseal(&key, &id, bad).is_err(), "flip at {pos} accepted");
        }
        // A delta keeps its base readable without the key.
        let mut changed = raw.clone();
        changed[100] ^= 1;
        let did = key.namer().name(&changed);
        let d = encode_delta(&changed, &id, &raw, 0, usize::MAX).unwrap();
        let sd = seal(&key, &did, d);
        assert_eq!(base_of(&sd).unwrap().id, id);
        let back = unseal(&key, &did, sd).unwrap();
        let mut out = Vec::new();
        decode_delta(&did, &back, &raw, &mut out, &key.namer()).unwrap();
        assert_eq!(out, changed);
        // A page delta seals at version 4 and opens back to version 3.
        let pd = encode_page_delta(&changed, &id, &raw, 0, usize::MAX).unwrap();
        let spd = seal(&key, &did, pd.clone());
        assert_eq!(spd[4], SEALED_PAGE_DELTA_VERSION);
        assert!(is_sealed(&spd) && !is_sealed(&pd));
        assert_eq!(sealed_key_of(&spd), Some(key.id));
        assert_eq!(base_of(&spd).unwrap().id, id);
        assert!(!spd.windows(13).any(|w| w == b"secret block "));
        assert!(matches!(
            decode(&did, &spd),
            Err(Error::CorruptChunk { .. })
        ));
        let back = unseal(&key, &did, spd).unwrap();
        assert_eq!(back, pd);
        decode_delta(&did, &back, &raw, &mut out, &key.namer()).unwrap();
        assert_eq!(out, changed);
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
}
