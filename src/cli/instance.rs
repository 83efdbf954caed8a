//! `instance`: launch instances from images, terminate them.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use blocksnap::image::instance::{self, LaunchOptions};
use blocksnap::{AccountId, Region};

use crate::cli::output::Out;
use crate::cli::parse::{parse_image, parse_size};

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
    },
    /// Delete the volumes marked DeleteOnTermination and the ephemeral ones [TerminateInstances]
    Terminate { dir: PathBuf },
    /// Show an instance's instance.json [DescribeInstances]
    Describe { dir: PathBuf },
}

pub fn run(region: &Region, out: &Out, caller: AccountId, cmd: InstanceCmd) -> Result<u8> {
    match cmd {
        InstanceCmd::Launch {
            image: id,
            dir,
            ephemeral_size,
            threads,
        } => {
            let id = parse_image(&id)?;
            let opts = LaunchOptions {
                caller,
                threads,
                ephemeral_size: parse_size(&ephemeral_size, "--ephemeral-size")?,
            };
            let bar = out.progress();
            let inst = instance::launch(region, &id, &dir, &opts, &bar)?;
            bar.done();
            if out.json {
                out.print(json!({ "Instances": [serde_json::to_value(&inst)?] }));
            } else {
                println!(
                    "{} launched from {} in {}",
                    inst.instance_id,
                    id,
                    dir.display()
                );
                for d in &inst.block_device_mappings {
                    println!(
                        "  {} -> {}",
                        d.device_name,
                        dir.join(&d.volume_file).display()
                    );
                }
            }
            Ok(0)
        }
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
    }
}
