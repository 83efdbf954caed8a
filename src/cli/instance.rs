//! `instance`: launch instances from images (restored, or lazy), attach
//! lazy ones, terminate them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use blocksnap::image::instance::{self, AttachOptions, LaunchOptions};
use blocksnap::lazy::nbd::Listen;
use blocksnap::{AccountId, Region};

use crate::cli::output::Out;
use crate::cli::parse::{parse_image, parse_size};
use crate::cli::volume::{StderrLog, cache_size};

#[derive(Subcommand, Debug)]
pub enum InstanceCmd {
    /// Restore every volume of an image into DIR [RunInstances]
    Launch {
        image: String,
        dir: PathBuf,
        /// Size of each ephemeral (instance-store) volume
        #[arg(long, default_value = "1G", value_name = "BYTES")]
        ephemeral_size: String,
        /// Worker threads [default: one per core]
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Restore nothing: each EBS volume becomes an overlay over its
        /// snapshot, read lazily once attached (`instance attach`)
        #[arg(long)]
        lazy: bool,
    },
    /// Serve a lazy instance's volumes as files DIR/xvda.img… (a FUSE mount
    /// over DIR) until it is terminated or unmounted
    ///
    /// Reads fetch only the chunks they touch; writes go to the overlays
    /// and their dirty maps, so `image create --instance DIR` reads only
    /// what was written.
    Attach {
        dir: PathBuf,
        /// Also serve each volume as an NBD export named by its device (xvda)
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "socket")]
        nbd: Option<String>,
        /// Serve the NBD exports on a Unix socket instead
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Copy every block into the overlays in the background, at idle
        /// priority, so the volumes stop needing the store
        #[arg(long)]
        hydrate: bool,
        /// Memory for decoded blocks, per volume (e.g. 64M)
        #[arg(long, value_name = "BYTES", default_value = "64M")]
        cache: String,
    },
    /// Delete the volumes marked DeleteOnTermination and the ephemeral ones [TerminateInstances]
    ///
    /// A lazy instance is detached first.
    Terminate { dir: PathBuf },
    /// Show an instance's instance.json [DescribeInstances]
    Describe { dir: PathBuf },
}

pub fn run(region: &Arc<Region>, out: &Out, caller: AccountId, cmd: InstanceCmd) -> Result<u8> {
    match cmd {
        InstanceCmd::Launch {
            image: id,
            dir,
            ephemeral_size,
            threads,
            lazy,
        } => {
            let id = parse_image(&id)?;
            let opts = LaunchOptions {
                caller,
                threads,
                ephemeral_size: parse_size(&ephemeral_size, "--ephemeral-size")?,
                lazy,
            };
            let bar = out.progress();
            let inst = instance::launch(region, &id, &dir, &opts, &bar)?;
            bar.done();
            print_launched(out, &inst, &dir);
            Ok(0)
        }
        InstanceCmd::Attach {
            dir,
            nbd,
            socket,
            hydrate,
            cache,
        } => {
            let opts = AttachOptions {
                nbd: match (nbd, socket) {
                    (_, Some(path)) => Some(Listen::Unix(path)),
                    (Some(addr), None) => Some(Listen::Tcp(addr)),
                    (None, None) => None,
                },
                hydrate,
                cache: cache_size(&cache)?,
            };
            instance::attach(region, &dir, &opts, &StderrLog)?;
            Ok(0)
        }
        cmd @ (InstanceCmd::Terminate { .. } | InstanceCmd::Describe { .. }) => run_local(out, cmd),
    }
}

/// The commands on an instance directory alone, with no store.
pub fn run_local(out: &Out, cmd: InstanceCmd) -> Result<u8> {
    match cmd {
        InstanceCmd::Terminate { dir } => {
            let r = instance::terminate(&dir)?;
            if out.json {
                out.print(json!({
                    "InstanceId": r.instance.instance_id.as_str(),
                    "State": "terminated",
                    "DeletedVolumes": r.deleted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                    "KeptVolumes": r.kept.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                }));
            } else {
                println!("{} terminated", r.instance.instance_id);
                for p in &r.deleted {
                    println!("  deleted {}", p.display());
                }
                for p in &r.kept {
                    println!("  kept {}", p.display());
                }
            }
            Ok(0)
        }
        InstanceCmd::Describe { dir } => {
            let inst = instance::read(&dir)?;
            out.print(json!({ "Instances": [serde_json::to_value(&inst)?] }));
            Ok(0)
        }
        _ => unreachable!("only commands on the directory"),
    }
}

/// What `instance launch` prints.
pub fn print_launched(
    out: &Out,
    inst: &blocksnap::format::instance::Instance,
    dir: &std::path::Path,
) {
    if out.json {
        out.print(json!({ "Instances": [serde_json::to_value(inst).expect("json serializes")] }));
        return;
    }
    println!(
        "{} launched from {} in {}",
        inst.instance_id,
        inst.image_id,
        dir.display()
    );
    for d in &inst.block_device_mappings {
        println!(
            "  {} -> {}",
            d.device_name,
            dir.join(&d.volume_file).display()
        );
    }
    if inst.is_lazy() {
        println!(
            "  lazy: `blocksnap instance attach {}` serves the volumes",
            dir.display()
        );
    }
}
