//! `account` and `serve`: the server's accounts and keys, and the server.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use blocksnap::AccountId;
use blocksnap::server::accounts::{AccessKey, Account, Accounts};
use blocksnap::server::{ServeOptions, serve};

use crate::cli::output::Out;

#[derive(Subcommand, Debug)]
pub enum AccountCmd {
    /// Make an account and its first access key; the secret is shown once
    Create {
        /// A name to tell accounts apart
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Accounts and their access key ids (never the secrets)
    List,
    /// Delete an account and its keys; what it owns stays in the store
    Delete { account: String },
    /// Access keys: create one (rotation), delete one
    #[command(subcommand)]
    Keys(KeysCmd),
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Add an access key to ACCOUNT (at most two); the secret is shown once
    Create { account: String },
    /// Delete access key KEY of ACCOUNT
    Delete { account: String, key: String },
}

pub fn run(root: &Path, out: &Out, cmd: AccountCmd) -> Result<u8> {
    let accounts = Accounts::of_store(root);
    match cmd {
        AccountCmd::Create { name } => {
            let (a, key) = accounts.create(&name)?;
            print_key(out, &a.id, &key, Some(&a));
        }
        AccountCmd::List => {
            let list = accounts.list()?;
            if out.json() {
                out.print(json!({"Accounts": list.iter().map(account_json).collect::<Vec<_>>()}));
            } else {
                for a in &list {
                    let keys: Vec<&str> = a.keys.iter().map(|k| k.access_key_id.as_str()).collect();
                    println!("{}  {:<20} keys: {}", a.id, a.name, keys.join(", "));
                }
            }
        }
        AccountCmd::Delete { account } => {
            let id: AccountId = account.parse()?;
            accounts.delete(&id)?;
            if !out.json() {
                println!("account {id} deleted; its snapshots and images stay in the store");
            }
        }
        AccountCmd::Keys(KeysCmd::Create { account }) => {
            let id: AccountId = account.parse()?;
            let key = accounts.create_key(&id)?;
            print_key(out, &id, &key, None);
        }
        AccountCmd::Keys(KeysCmd::Delete { account, key }) => {
            let id: AccountId = account.parse()?;
            accounts.delete_key(&id, &key)?;
            if !out.json() {
                println!("access key {key} of account {id} deleted");
            }
        }
    }
    Ok(0)
}

fn account_json(a: &Account) -> Value {
    json!({
        "AccountId": a.id.to_string(),
        "Name": a.name,
        "AccessKeyIds": a.keys.iter().map(|k| k.access_key_id.clone()).collect::<Vec<_>>(),
    })
}

/// Shows a new key, its secret included: the only time it is shown.
fn print_key(out: &Out, id: &AccountId, key: &AccessKey, account: Option<&Account>) {
    if out.json() {
        let mut doc = json!({
            "AccessKey": {
                "AccountId": id.to_string(),
                "AccessKeyId": key.access_key_id,
                "SecretAccessKey": key.secret_access_key,
                "Status": "Active",
            }
        });
        if let Some(a) = account {
            doc["Account"] = account_json(a);
        }
        return out.print(doc);
    }
    println!("account:           {id}");
    println!("access key id:     {}", key.access_key_id);
    println!("secret access key: {}", key.secret_access_key);
    println!("(the secret is not shown again)");
}

/// `serve`: runs until SIGTERM or SIGINT.
pub fn serve_store(root: &Path, opts: ServeOptions, quiet: bool) -> Result<u8> {
    // A server outlives whoever reads its output: a log line or its
    // address written to a closed pipe or a full disk is lost, and the
    // server goes on.
    blocksnap::ignore_sigpipe();
    let tls = opts.tls.is_some();
    let log: Arc<dyn Fn(&blocksnap::server::RequestLog) + Send + Sync> = Arc::new(move |line| {
        if !quiet {
            // One write per line: stderr is unbuffered, and the line's
            // fields one write each cost 20 system calls a request.
            use std::io::Write;
            let text = format!("{line}\n");
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        }
    });
    serve(
        root,
        &opts,
        &|addr| {
            let scheme = if tls { "https" } else { "http" };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {scheme}://{addr}").and_then(|_| out.flush());
        },
        log,
    )?;
    Ok(0)
}

/// Seconds as a duration, for clap.
pub fn seconds(s: &str) -> std::result::Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))
}
