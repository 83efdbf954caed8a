//! Worker pools: one worker per core for hashing and compressing, raised
//! for a latency-bound (remote) store to the requests it wants in flight.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::store::chunk_store::ChunkStore;

/// The most worker threads a command takes (`--threads`).
pub const MAX_THREADS: usize = 1024;

/// A thread pool of `threads` workers, or one per core when 0.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    if threads > MAX_THREADS {
        return Err(Error::InvalidArgument(format!(
            "{threads} worker threads asked for: give at most {MAX_THREADS} (0 means one per core)"
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("blocksnap-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start {threads} worker threads: {e}")))
}

/// What a pool's workers mostly do, which sizes the pool for a remote
/// store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Wait for chunks to arrive (restore, copy, verify): one worker per
    /// request the store wants in flight.
    Fetch,
    /// Hash and compress, waiting only now and then (snapshot: its uploads
    /// run asynchronously; workers wait for existence checks and delta
    /// bases). A quarter as many: each worker holds compression state.
    Compute,
}

/// A pool for work on `store`: `threads` (0: one per core), raised for a
/// latency-bound store to the requests it wants in flight, since its
/// workers wait.
pub fn thread_pool_for(
    store: &dyn ChunkStore,
    threads: usize,
    work: Work,
) -> Result<rayon::ThreadPool> {
    let io = match work {
        Work::Fetch => store.io_parallelism(),
        Work::Compute => store.io_parallelism() / 4,
    };
    if io == 0 {
        return thread_pool(threads);
    }
    let cpu = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    thread_pool(cpu.max(io))
}

/// `f` over `items`, in order: in parallel on a [`thread_pool_for`] pool
/// when `store` is latency-bound, one after another otherwise (local reads
/// are quick, and a pool costs more than it saves).
pub fn map_io<T: Sync, R: Send>(
    store: &dyn ChunkStore,
    items: &[T],
    f: impl Fn(&T) -> R + Sync + Send,
) -> Result<Vec<R>> {
    if store.io_parallelism() == 0 {
        return Ok(items.iter().map(f).collect());
    }
    let pool = thread_pool_for(store, 0, Work::Fetch)?;
    Ok(pool.install(|| items.par_iter().map(f).collect()))
}
