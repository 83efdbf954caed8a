//! `key`: the region's encryption keys, as KMS shapes them [CreateKey,
//! ListKeys, DescribeKey, CreateGrant, RevokeGrant, DisableKey, EnableKey].

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use blocksnap::format::key::KeyRecord;
use blocksnap::region::keys::{Keys, NewKey};
use blocksnap::{AccountId, Region};

use crate::cli::output::Out;

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a key: random material wrapped under the passphrase [CreateKey]
    ///
    /// The passphrase comes from BLOCKSNAP_PASSPHRASE, --passphrase-file,
    /// or a prompt on the terminal; it is never an argument. The wrapped
    /// key is kept in the region (`keys/`), so any host that knows the
    /// passphrase can use it, or with --key-file only in that file.
    Create {
        /// Name the key alias/NAME
        #[arg(long, value_name = "NAME")]
        alias: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Keep the wrapped key in this new file, outside the store
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// List the region's keys [ListKeys, ListAliases]
    List,
    /// Show one key: a key id, alias/NAME or ARN [DescribeKey]
    Describe { key: String },
    /// Let another account use a key; owner only [CreateGrant]
    Grant {
        key: String,
        /// The account to grant (12 digits)
        #[arg(long, value_name = "ACCOUNT")]
        grantee: String,
    },
    /// Take a grant back; owner only [RevokeGrant]
    Revoke {
        key: String,
        #[arg(long, value_name = "ACCOUNT")]
        grantee: String,
    },
    /// Disable a key: nothing sealed under it can be read meanwhile [DisableKey]
    Disable { key: String },
    /// Enable a disabled key [EnableKey]
    Enable { key: String },
}

pub fn run(region: &Region, out: &Out, caller: &AccountId, cmd: KeyCmd) -> Result<u8> {
    let keys = region.keys();
    let r = match cmd {
        KeyCmd::Create {
            alias,
            description,
            key_file,
        } => {
            let alias = alias
                .as_deref()
                .map(|a| a.strip_prefix("alias/").unwrap_or(a));
            keys.create(&NewKey {
                owner: caller.clone(),
                alias,
                description: &description,
                key_file: key_file.as_deref(),
            })?
        }
        KeyCmd::List => {
            let all = keys.list()?;
            if out.json {
                out.print(json!({
                    "Keys": all.iter().map(|r| json!({"KeyId": r.key_id.to_string(), "KeyArn": keys.arn(r)})).collect::<Vec<_>>(),
                    "Aliases": all.iter().filter_map(|r| r.alias.as_ref().map(|a| json!({"AliasName": format!("alias/{a}"), "TargetKeyId": r.key_id.to_string()}))).collect::<Vec<_>>(),
                }));
            } else if all.is_empty() {
                println!("no keys");
            } else {
                for r in &all {
                    println!(
                        "{}  {:8}  owner {}  {}",
                        r.key_id,
                        state(r),
                        r.owner,
                        r.alias
                            .as_ref()
                            .map(|a| format!("alias/{a}"))
                            .unwrap_or_default()
                    );
                }
            }
            return Ok(0);
        }
        KeyCmd::Describe { key } => keys.resolve(&key)?,
        KeyCmd::Grant { key, grantee } => {
            let who: AccountId = grantee.parse()?;
            keys.update(&key, "grant", |r| {
                if !r.grants.contains(&who) {
                    r.grants.push(who.clone());
                }
            })?
        }
        KeyCmd::Revoke { key, grantee } => {
            let who: AccountId = grantee.parse()?;
            keys.update(&key, "revoke a grant of", |r| {
                r.grants.retain(|a| *a != who)
            })?
        }
        KeyCmd::Disable { key } => keys.update(&key, "disable", |r| r.enabled = false)?,
        KeyCmd::Enable { key } => keys.update(&key, "enable", |r| r.enabled = true)?,
    };
    describe(out, &keys, &r);
    Ok(0)
}

fn state(r: &KeyRecord) -> &'static str {
    if r.enabled { "Enabled" } else { "Disabled" }
}

/// KMS's DescribeKey shape, or a few lines for people.
fn describe(out: &Out, keys: &Keys, r: &KeyRecord) {
    if out.json {
        let mut meta: Value = json!({
            "KeyId": r.key_id.to_string(),
            "Arn": keys.arn(r),
            "AWSAccountId": r.owner.as_str(),
            "CreationDate": r.created,
            "Enabled": r.enabled,
            "KeyState": state(r),
            "Description": r.description,
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "KeyManager": if r.alias.as_deref() == Some(blocksnap::region::keys::DEFAULT_ALIAS) { "AWS" } else { "CUSTOMER" },
            "Origin": if r.wrapped.is_some() { "AWS_KMS" } else { "EXTERNAL" },
            "Grants": r.grants.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
        });
        if let Some(a) = &r.alias {
            meta["AliasName"] = json!(format!("alias/{a}"));
        }
        out.print(json!({ "KeyMetadata": meta }));
        return;
    }
    println!("KeyId        {}", r.key_id);
    println!("Arn          {}", keys.arn(r));
    if let Some(a) = &r.alias {
        println!("Alias        alias/{a}");
    }
    println!("Owner        {}", r.owner);
    println!("State        {}", state(r));
    println!("Created      {}", r.created);
    println!(
        "Material     {}",
        if r.wrapped.is_some() {
            "in the region, wrapped under the passphrase"
        } else {
            "in a key file, outside the store"
        }
    );
    if !r.description.is_empty() {
        println!("Description  {}", r.description);
    }
    let grants: Vec<&str> = r.grants.iter().map(|a| a.as_str()).collect();
    println!(
        "Grants       {}",
        if grants.is_empty() {
            "owner only".to_string()
        } else {
            grants.join(", ")
        }
    );
}
