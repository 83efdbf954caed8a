//! Volumes: the disk images and block devices blocksnap reads and writes.
//!
//! [`io`] opens a volume, sizes it, finds its holes and reads it; [`blocks`]
//! cuts it into blocks and classifies and hashes them in parallel (the hot
//! path of every command that reads a volume).
//!
//! Uses only the foundation (`error`, `id`, `progress`, `sys`): the caller
//! brings the worker pool.

pub mod blocks;
pub mod io;
