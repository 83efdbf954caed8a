//! `store`: verify, gc and count what a region stores.

use anyhow::Result;
use clap::Subcommand;

use blocksnap::Region;
use blocksnap::ops::{check, gc};

use crate::cli::output::Out;
use crate::cli::parse::parse_snapshot;

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Check every manifest and chunk (decompress and re-hash)
    ///
    /// Exits 4 if a manifest is damaged or a needed chunk is missing or
    /// corrupt. With --repair, corrupt chunks are moved aside (<chunk>.bad);
    /// a new snapshot of the same data then stores them again (heals).
    Verify {
        /// Check only this snapshot and the chunks it names
        #[arg(long, value_name = "SNAP")]
        snapshot: Option<String>,
        /// Move corrupt chunks aside so a later snapshot rewrites them
        #[arg(long)]
        repair: bool,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Delete chunks no snapshot needs, and leftovers of interrupted writes
    Gc {
        /// Also delete the corrupt chunks `store verify --repair` moved aside (.bad)
        #[arg(long)]
        purge_quarantine: bool,
    },
    /// Count snapshots, chunks and bytes stored
    Stats,
}

pub fn run(region: &Region, out: &Out, cmd: StoreCmd) -> Result<u8> {
    match cmd {
        StoreCmd::Verify {
            snapshot,
            repair,
            threads,
        } => {
            let only = snapshot.as_deref().map(parse_snapshot).transpose()?;
            let bar = out.progress();
            let report = check::verify_and_repair(region, only.as_ref(), threads, repair, &bar)?;
            bar.done();
            out.verify(&report);
            Ok(if report.is_clean() { 0 } else { 4 })
        }
        StoreCmd::Gc { purge_quarantine } => {
            let report = gc::gc(region, purge_quarantine)?;
            out.gc(&report);
            Ok(0)
        }
        StoreCmd::Stats => {
            out.stats(&check::stats(region)?);
            Ok(0)
        }
    }
}
