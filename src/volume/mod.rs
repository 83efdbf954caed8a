//! Volumes: the disk images, block devices and NBD exports blocksnap reads
//! and writes.
//!
//! [`io`] opens a volume, sizes it, finds its holes and reads it; [`nbd`]
//! is the client for volumes behind an NBD server, [`qemu`] serves image
//! files in qemu's formats through a private `qemu-nbd`; [`blocks`] cuts a
//! volume into blocks and classifies and hashes them in parallel (the hot
//! path of every command that reads a volume).
//!
//! Uses `format` (the NBD wire protocol) and the foundation (`error`,
//! `id`, `progress`, `sys`): the caller brings the worker pool.

pub mod blocks;
pub mod io;
pub mod nbd;
pub mod qemu;
