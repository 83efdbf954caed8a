//! `region`: define regions on object stores, create local ones, list
//! and forget them.

use std::path::Path;

use anyhow::Result;
use clap::Subcommand;

use blocksnap::format::regions::RegionDef;
use blocksnap::region::{catalog, defs};
use blocksnap::{Error, Region};

use crate::cli::output::Out;

#[derive(Subcommand, Debug)]
pub enum RegionCmd {
    /// Create region NAME: a directory of the store, or at s3://BUCKET[/PREFIX]
    ///
    /// Without a URL the region is a new directory `<store>/NAME`. Only this
    /// command (and the default region `local`, on first use) creates a
    /// region: `--region` with an unknown name is an error.
    ///
    /// Credentials come only from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    /// (and AWS_SESSION_TOKEN, AWS_REGION) and are never stored. Tuning:
    /// BLOCKSNAP_S3_INFLIGHT (requests in flight, default 32),
    /// BLOCKSNAP_S3_TIMEOUT (seconds per request, 60), BLOCKSNAP_S3_RETRIES
    /// (6), BLOCKSNAP_S3_TRACE=1 (print the requests sent).
    Add {
        /// Region name, e.g. eu-central-1 or team-lab
        name: String,
        /// s3://BUCKET or s3://BUCKET/PREFIX [default: a local directory]
        url: Option<String>,
        /// S3 endpoint, e.g. http://127.0.0.1:8333 [default: $AWS_ENDPOINT, or AWS]
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// Allow a plain-HTTP endpoint
        #[arg(long)]
        allow_http: bool,
    },
    /// List regions: local directories and object-store definitions
    List,
    /// Forget an object-store region's definition (deletes nothing stored there)
    Remove { name: String },
    /// Show or set encryption by default for new snapshots of the region
    /// (--region) [EnableEbsEncryptionByDefault, ModifyEbsDefaultKmsKeyId]
    Encryption {
        /// Encrypt every new snapshot, asked for or not
        #[arg(long, value_name = "on|off")]
        by_default: Option<String>,
        /// The key used by default [default: alias/aws/ebs]
        #[arg(long, value_name = "KEY")]
        kms_key_id: Option<String>,
    },
}

impl RegionCmd {
    /// Whether the command acts on the region `--region` names.
    pub fn needs_region(&self) -> bool {
        matches!(self, RegionCmd::Encryption { .. })
    }
}

/// The region commands that act on an opened region.
pub fn run_in(region: &Region, out: &Out, cmd: RegionCmd) -> Result<u8> {
    let RegionCmd::Encryption {
        by_default,
        kms_key_id,
    } = cmd
    else {
        unreachable!("only `region encryption` needs a region");
    };
    let keys = region.keys();
    let mut d = keys.defaults()?;
    if by_default.is_some() || kms_key_id.is_some() {
        if let Some(v) = by_default {
            d.encrypted_by_default = match v.as_str() {
                "on" | "true" => true,
                "off" | "false" => false,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "--by-default {other:?}: give on or off"
                    ))
                    .into());
                }
            };
        }
        if let Some(k) = kms_key_id {
            d.kms_key_id = Some(keys.resolve(&k)?.key_id);
        }
        keys.set_defaults(&d)?;
    }
    let key = match &d.kms_key_id {
        Some(k) => keys.arn(&keys.resolve(&k.to_string())?),
        None => format!("alias/{}", blocksnap::region::keys::DEFAULT_ALIAS),
    };
    if out.json {
        out.print(serde_json::json!({
            "EbsEncryptionByDefault": d.encrypted_by_default,
            "KmsKeyId": key,
        }));
    } else {
        println!(
            "region {}: encryption by default {}, key {key}",
            region.name(),
            if d.encrypted_by_default { "on" } else { "off" }
        );
    }
    Ok(0)
}

pub fn run(root: &Path, out: &Out, cmd: RegionCmd) -> Result<u8> {
    match cmd {
        RegionCmd::Add {
            name,
            url,
            endpoint,
            allow_http,
        } => {
            let Some(url) = url else {
                if endpoint.is_some() || allow_http {
                    return Err(Error::InvalidArgument(
                        "--endpoint and --allow-http need an s3:// URL".into(),
                    )
                    .into());
                }
                let region = catalog::add_local(root, &name)?;
                out.local_region_added(&name, &region);
                return Ok(0);
            };
            let def = RegionDef {
                url,
                endpoint,
                allow_http,
            };
            defs::add(root, &name, def.clone())?;
            // Reach the store now, so a wrong URL, endpoint or credential
            // shows here rather than on the first snapshot.
            let opened =
                Region::open_or_create(root, &name).and_then(|r| r.snapshot_ids().map(|_| r));
            let region = match opened {
                Ok(r) => r,
                Err(e) => {
                    defs::remove(root, &name)?;
                    return Err(
                        anyhow::Error::new(e).context(format!("region {name} was not added"))
                    );
                }
            };
            out.region_added(&name, &def, &region);
            Ok(0)
        }
        RegionCmd::List => {
            let defined = defs::defined(root)?;
            let local = defs::local(root)?;
            out.region_list(root, &local, &defined);
            Ok(0)
        }
        RegionCmd::Remove { name } => {
            let def = defs::remove(root, &name)?;
            out.region_removed(&name, &def);
            Ok(0)
        }
        RegionCmd::Encryption { .. } => unreachable!("dispatched with its region"),
    }
}
