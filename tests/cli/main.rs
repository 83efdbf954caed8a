//! The integration tests: one binary. The end-to-end modules run the real
//! `blocksnap` binary on real ext4 images, loop devices, e2fsck, cmp and
//! qemu-img; the library modules drive the public API directly.
//!
//! `BLOCKSNAP_TEST_NO_SKIP=1` (set by `.ci/run`) turns every skip into a
//! failure; without it a missing prerequisite skips a test with its reason
//! printed, and the S3 tests print one summary line of how many skipped.

#[macro_use]
mod util;

// End to end, through the binary.
mod basics; // snapshot, incremental, restore, verify, gc on each backend
mod encryption; // encrypted snapshots and images: keys, sealed chunks, EBS's rules
mod images; // images and instances: create, register, share, copy, launch
mod lazy; // lazy instances: launch --lazy, attach, ext4 through FUSE, dirty-map snapshots
mod lifecycle; // policies, prune and the recycle bin, by the library's clock and the CLI
mod misuse; // hostile and careless use: wrong order, races, bad input
mod mount; // volume mount: a FUSE file read by cmp, cp, e2fsck, loop and ext4
mod s3; // regions on an S3 server: locks, gc beside writers, requests
mod serve; // volume serve: NBD exports read by qemu-img and qemu-io
mod server; // blocksnap serve: accounts, SigV4, the EBS direct API through the AWS CLI and botocore
mod trust; // damage found and refused; healing; newer formats never damage
mod vmdisk; // VM disks through NBD: qcow2 via qemu-nbd, dirty bitmaps, restore into qcow2

// The code itself.
mod layout; // every import points down the flow: no cycle, no arrow up

// The library, through its public API.
mod faults; // a chunk store that fails or loses writes at every point
mod hostile; // every decoder fed the fuzz corpus and its mutations
mod policy; // permission and in-use rules hold for a library caller too
