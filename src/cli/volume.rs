//! `volume`: restore a snapshot into a file or device, verify a volume
//! against a snapshot, serve a snapshot over NBD.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;

use blocksnap::AccountId;
use blocksnap::Region;
use blocksnap::lazy::fuse::{self, MountOptions};
use blocksnap::lazy::nbd::{self, Listen, ServeLog, ServeOptions};
use blocksnap::ops::restore::{self, RestoreOptions};
use blocksnap::ops::verify::verify_volume;

use crate::cli::output::Out;
use crate::cli::parse::{parse_size, parse_snapshot};

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Compare a volume (file or device) with a snapshot without restoring;
    /// exits 4 and lists the differing block ranges if they differ
    Verify {
        snapshot: String,
        target: PathBuf,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Serve a snapshot as an NBD export, read in place: only the chunks a
    /// client reads are fetched. Read-only unless --writable --overlay FILE
    ///
    /// Runs until interrupted. Clients: `qemu-img info nbd://127.0.0.1:10809/NAME`,
    /// `nbd+unix:///NAME?socket=PATH`, `nbdinfo`, `nbdcopy`. Holes and zero
    /// blocks are reported through the base:allocation meta context.
    Serve {
        snapshot: String,
        /// TCP address to listen on
        #[arg(
            long,
            value_name = "HOST:PORT",
            default_value = "127.0.0.1:10809",
            conflicts_with = "socket"
        )]
        listen: String,
        /// Listen on a Unix socket instead
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Export name [default: the snapshot id]
        #[arg(long, value_name = "EXPORT")]
        name: Option<String>,
        /// Memory for decoded blocks (e.g. 64M)
        #[arg(long, value_name = "BYTES", default_value = "64M")]
        cache: String,
        /// Accept writes, into --overlay
        #[arg(long, requires = "overlay")]
        writable: bool,
        /// The overlay file that holds what was written (created on first
        /// use, continued after a restart), with its dirty map FILE.dirty
        #[arg(long, value_name = "FILE", requires = "writable")]
        overlay: Option<PathBuf>,
    },
    /// Mount a snapshot as one file, DIR/volume.img, read in place;
    /// read-only unless --writable --overlay FILE
    ///
    /// Runs until unmounted (`blocksnap volume unmount DIR`). Then
    /// `losetup -r -f --show DIR/volume.img` and `mount -o ro` browse its
    /// files; `cp --sparse=always` and `qemu-img` skip its holes.
    Mount {
        snapshot: String,
        /// An existing, empty directory
        dir: PathBuf,
        /// Memory for decoded blocks (e.g. 64M)
        #[arg(long, value_name = "BYTES", default_value = "64M")]
        cache: String,
        /// Accept writes, into --overlay
        #[arg(long, requires = "overlay")]
        writable: bool,
        /// The overlay file that holds what was written (created on first
        /// use, continued after a restart), with its maps FILE.dirty and
        /// FILE.present
        #[arg(long, value_name = "FILE", requires = "writable")]
        overlay: Option<PathBuf>,
        /// Return once the mount is ready, serving it in the background
        #[arg(long)]
        background: bool,
    },
    /// End a `volume mount`
    Unmount { dir: PathBuf },
    /// Restore a snapshot into a new file, over a file, onto a block device, into an NBD export or a qemu image [CreateVolume]
    ///
    /// A new file target is written under a temporary name and renamed
    /// into place when complete; it is sparse where the snapshot has zero
    /// or hole blocks. --delta and block-device targets are written in
    /// place: an interrupted restore leaves them partly written, and a
    /// rerun with --delta finishes the job.
    Restore(RestoreArgs),
}

/// What `volume restore` takes, wherever the snapshot is read from.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    pub snapshot: String,
    /// File, block device, NBD URI (nbd://…, nbd+unix://…) or qemu
    /// image (qcow2…) to restore into
    pub target: PathBuf,
    /// Replace an existing file or overwrite a block device; with
    /// --delta, accept a target whose size differs from the snapshot's
    #[arg(long)]
    force: bool,
    /// Update an existing file or device in place, writing only blocks that differ
    #[arg(long)]
    delta: bool,
    /// Size of the restored volume (e.g. 20G); at least the snapshot's size
    #[arg(long, value_name = "BYTES")]
    size: Option<String>,
    /// The block device already reads as zeros: skip writing zero blocks
    #[arg(long)]
    assume_zeroed: bool,
    /// Create the new target as an image in this qemu format (qcow2,
    /// vmdk, vhdx…), written through qemu-nbd [default: raw]
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// Worker threads [default: one per core]
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl RestoreArgs {
    /// The snapshot and how to restore it, as `caller` (`None`: the
    /// server decides).
    pub fn parse(
        &self,
        caller: Option<AccountId>,
    ) -> Result<(blocksnap::SnapshotId, RestoreOptions)> {
        let opts = RestoreOptions {
            force: self.force,
            delta: self.delta,
            size: self
                .size
                .as_deref()
                .map(|s| parse_size(s, "--size"))
                .transpose()?,
            assume_zeroed: self.assume_zeroed,
            threads: self.threads,
            caller,
            format: self.format.clone(),
        };
        Ok((parse_snapshot(&self.snapshot)?, opts))
    }
}

pub fn run(region: &Arc<Region>, out: &Out, caller: &AccountId, cmd: VolumeCmd) -> Result<u8> {
    match cmd {
        VolumeCmd::Verify {
            snapshot,
            target,
            threads,
        } => {
            let id = parse_snapshot(&snapshot)?;
            let bar = out.progress();
            let check = verify_volume(region, &id, &target, caller, threads, &bar)?;
            bar.done();
            out.volume_check(&check);
            Ok(if check.matches() { 0 } else { 4 })
        }
        VolumeCmd::Serve {
            snapshot,
            listen,
            socket,
            name,
            cache,
            writable: _,
            overlay,
        } => {
            let id = parse_snapshot(&snapshot)?;
            let opts = ServeOptions {
                listen: match socket {
                    Some(path) => Listen::Unix(path),
                    None => Listen::Tcp(listen),
                },
                name: name.unwrap_or_else(|| id.to_string()),
                cache: cache_size(&cache)?,
                caller: Some(caller.clone()),
                overlay,
            };
            nbd::serve(region, &id, &opts, &StderrLog)?;
            Ok(0)
        }
        VolumeCmd::Mount {
            snapshot,
            dir,
            cache,
            writable: _,
            overlay,
            background,
        } => {
            let id = parse_snapshot(&snapshot)?;
            if background {
                return background_mount(&dir);
            }
            let opts = MountOptions {
                cache: cache_size(&cache)?,
                caller: Some(caller.clone()),
                overlay,
            };
            fuse::mount(region, &id, &dir, &opts, &StderrLog)?;
            Ok(0)
        }
        VolumeCmd::Unmount { dir } => {
            fuse::unmount(&dir)?;
            Ok(0)
        }
        VolumeCmd::Restore(args) => {
            let (id, opts) = args.parse(Some(caller.clone()))?;
            let target = &args.target;
            let bar = out.progress();
            let report = restore::restore(region, &id, target, &opts, &bar)?;
            bar.done();
            out.restore(&report);
            Ok(0)
        }
    }
}

/// `volume mount --background`: runs the same command without
/// `--background` as a child in a session of its own, and returns once
/// its mount is ready (or with its error, if it fails first).
fn background_mount(dir: &std::path::Path) -> Result<u8> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--background")
        .collect();
    let mut child = Command::new(std::env::current_exe()?);
    child
        .args(&args)
        .env("BLOCKSNAP_DETACHED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    blocksnap::detach_command(&mut child);
    let mut child = child.spawn()?;
    let stderr = child.stderr.take().expect("piped");
    let mut said = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if line.starts_with("blocksnap: serving ") {
            println!(
                "mounted at {} (pid {}): `blocksnap volume unmount {}` ends it",
                dir.display(),
                child.id(),
                dir.display()
            );
            return Ok(0);
        }
        said.push(line);
    }
    let status = child.wait()?;
    for line in &said {
        eprintln!("{line}");
    }
    Ok(status.code().map_or(1, |c| c as u8).max(1))
}

/// `--cache`: bytes of decoded blocks.
pub fn cache_size(s: &str) -> Result<usize> {
    let n = parse_size(s, "--cache")?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// The server's lines, on stderr: where it listens, then one line per
/// failed read or broken connection.
/// Writes that fail (a `--background` parent gone) are dropped.
pub struct StderrLog;

impl ServeLog for StderrLog {
    fn listening(&self, uri: &str) {
        let _ = writeln!(std::io::stderr(), "blocksnap: serving {uri}");
    }

    fn line(&self, line: String) {
        let _ = writeln!(std::io::stderr(), "blocksnap: {line}");
    }
}
