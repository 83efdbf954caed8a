//! Loading chunks through their delta chains, and deciding whether a
//! stored chunk can be relied on: [`load_into`] decodes a chunk and every
//! base under it, checking each against its name; [`present_and_sound`]
//! and [`reusable`] decide whether a chunk found in a store may be named
//! by a new snapshot; [`walk_bases`] lists the bases a set of chunks
//! stands on.

use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::format::chunk::{DELTA_HEADER_LEN, MAX_DEPTH, base_of, decode_delta, decode_into};
use crate::id::ChunkId;
use crate::store::chunk_store::ChunkStore;
use crate::store::pool::map_io;

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
        decode_into(id, &stored, out, &store.namer())?;
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
    decode_delta(id, &stored, &base_raw, out, &store.namer())?;
    Ok(base.depth)
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

/// Walks delta chains from `roots`: calls `add(dependent, base)` for each
/// chunk's base and follows the bases for which it returns true (newly
/// seen). Chunks not in the store are skipped: verify reports them.
pub fn walk_bases(
    store: &dyn ChunkStore,
    roots: impl IntoIterator<Item = ChunkId>,
    mut add: impl FnMut(&ChunkId, ChunkId) -> bool,
) -> Result<()> {
    // Level by level, each level's headers fetched together.
    let mut level: Vec<ChunkId> = roots.into_iter().collect();
    while !level.is_empty() {
        let heads = map_io(store, &level, |id| store.get_head(id, DELTA_HEADER_LEN))?;
        let mut next = Vec::new();
        for (id, head) in level.iter().zip(heads) {
            let head = match head {
                Ok(h) => h,
                Err(Error::MissingChunk { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Some(base) = base_of(&head)
                && add(id, base.id)
            {
                next.push(base.id);
            }
        }
        level = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::chunk::{HEADER_LEN, decode, encode, encode_delta};
    use crate::store::chunk_store::Fanout;
    use crate::store::local::LocalChunkStore;

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
        let store = LocalChunkStore::new(dir.path().to_path_buf(), Fanout::NARROW);
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
        let store = LocalChunkStore::new(dir.path().to_path_buf(), Fanout::NARROW);
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
