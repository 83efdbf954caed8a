//! Progress reporting. The library calls these hooks; the binary decides
//! whether to draw anything.

/// Receives progress of a long operation. Called from worker threads.
pub trait Progress: Sync {
    /// A phase starts: `total` bytes of work under `label`.
    fn start(&self, _label: &str, _total: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The phase is over.
    fn finish(&self) {}
    /// Something the user should know that does not stop the operation
    /// (a volume that changed while it was read).
    fn warn(&self, _message: &str) {}
    /// Something the user should know about a choice made for them (the
    /// parent taken for a volume with no lineage).
    fn note(&self, _message: &str) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
