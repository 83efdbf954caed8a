//! The chunk format: how one block's bytes are stored.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BSCK"              (frozen: do not modify)
//! 4       1     format version = 1
//! 5       1     codec: 0 = raw, 1 = zstd
//! 6       2     reserved, zero
//! 8       4     raw length, u32 little-endian (<= 8 MiB)
//! 12      ..    payload
//! ```
//!
//! A chunk is named by the BLAKE3-256 of its raw bytes; [`decode`] checks the
//! name before it returns a single byte.

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::id::ChunkId;

pub const CHUNK_MAGIC: &[u8; 4] = b"BSCK";
pub const CHUNK_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 12;
/// The largest block size, so the largest raw chunk.
pub const MAX_RAW_LEN: usize = 8 << 20;
/// zstd level used for new chunks: the fastest, see README (Speed).
pub const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Encodes `raw` as a stored chunk: zstd when that is smaller, raw otherwise.
pub fn encode(raw: &[u8]) -> Result<Vec<u8>> {
    assert!(
        raw.len() <= MAX_RAW_LEN,
        "block larger than the largest block size"
    );
    let mut out = Vec::with_capacity(HEADER_LEN + raw.len());
    out.extend_from_slice(CHUNK_MAGIC);
    out.push(CHUNK_VERSION);
    out.push(Codec::Zstd as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    let bound = zstd::zstd_safe::compress_bound(raw.len());
    out.resize(HEADER_LEN + bound, 0);
    let compressed = COMPRESSOR.with(|cell| -> std::io::Result<usize> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        let c = slot.as_mut().expect("compressor was just created");
        c.compress_to_buffer(raw, &mut out[HEADER_LEN..])
    });
    match compressed {
        Ok(n) if n < raw.len() => out.truncate(HEADER_LEN + n),
        _ => {
            out[5] = Codec::Raw as u8;
            out.truncate(HEADER_LEN);
            out.extend_from_slice(raw);
        }
    }
    Ok(out)
}

/// Decodes a stored chunk into `out` and checks that its bytes hash to `id`.
/// `out` is cleared first; its capacity is reused.
pub fn decode_into(id: &ChunkId, stored: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let corrupt = |reason: String| Error::CorruptChunk { chunk: *id, reason };
    if stored.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes is shorter than a chunk header",
            stored.len()
        )));
    }
    if &stored[..4] != CHUNK_MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    if stored[4] != CHUNK_VERSION {
        return Err(corrupt(format!(
            "unknown chunk format version {}",
            stored[4]
        )));
    }
    let raw_len = u32::from_le_bytes(stored[8..12].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_RAW_LEN {
        return Err(corrupt(format!(
            "raw length {raw_len} exceeds the {MAX_RAW_LEN}-byte limit"
        )));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(
                matches!(err, Error::CorruptChunk { .. }),
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
