//! The command line: global options, the nouns, and the dispatch from a
//! parsed command to its noun.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use blocksnap::{AccountId, Error, Region};

use crate::cli::account::AccountCmd;
use crate::cli::image::ImageCmd;
use crate::cli::instance::InstanceCmd;
use crate::cli::key::KeyCmd;
use crate::cli::output::Out;
use crate::cli::policy::PolicyCmd;
use crate::cli::recycle_bin::RecycleBinCmd;
use crate::cli::region::RegionCmd;
use crate::cli::snapshot::SnapshotCmd;
use crate::cli::store::StoreCmd;
use crate::cli::volume::VolumeCmd;
use crate::cli::{
    account, exit, image, instance, key, policy, recycle_bin, region, remote, snapshot, store,
    volume,
};

use blocksnap::region::catalog::DEFAULT_REGION;

#[derive(Parser, Debug)]
#[command(
    name = "blocksnap",
    version,
    about = "Block-level incremental snapshots of disk images and block devices",
    after_help = exit::EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct Global {
    /// Store directory [default: $XDG_DATA_HOME/blocksnap or ~/.local/share/blocksnap]
    #[arg(long, global = true, env = "BLOCKSNAP_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Region: a sub-directory of the store, or one defined with `region add`
    #[arg(
        long,
        global = true,
        env = "BLOCKSNAP_REGION",
        default_value = DEFAULT_REGION,
        value_name = "NAME"
    )]
    pub region: String,
    /// Account acting (12 digits) [default: the region's owner]
    #[arg(long, global = true, env = "BLOCKSNAP_ACCOUNT", value_name = "ID")]
    pub account: Option<String>,
    /// Send the command to a `blocksnap serve` at URL, signed with
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_CA_BUNDLE: a CA to
    /// trust); the key decides the account. Given before the command:
    /// `region add --endpoint` is an S3 endpoint
    #[arg(long, env = "BLOCKSNAP_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// Print one JSON document in AWS CLI shapes
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar; `policy run` prints only what failed
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Read the passphrase of encryption keys from FILE (its first line)
    /// [default: $BLOCKSNAP_PASSPHRASE, else asked on the terminal]
    #[arg(
        long,
        global = true,
        env = "BLOCKSNAP_PASSPHRASE_FILE",
        value_name = "FILE"
    )]
    pub passphrase_file: Option<PathBuf>,
    /// A key file holding a key kept outside the store (repeatable)
    #[arg(long, global = true, env = "BLOCKSNAP_KEY_FILE", value_name = "PATH")]
    pub key_file: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create, list, inspect and delete snapshots [CreateSnapshot, DescribeSnapshots, ...]
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Restore snapshots to files and block devices [CreateVolume]
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Images (AMIs): create, register, list, share, copy, deregister [CreateImage, ...]
    #[command(subcommand)]
    Image(ImageCmd),
    /// Launch and terminate instances from images [RunInstances, TerminateInstances]
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Maintain the store: verify, gc, stats
    #[command(subcommand)]
    Store(StoreCmd),
    /// Define regions on S3-compatible object stores [DescribeRegions]
    #[command(subcommand)]
    Region(RegionCmd),
    /// Encryption keys: create, list, grant, disable [KMS]
    #[command(subcommand)]
    Key(KeyCmd),
    /// Lifecycle policies: snapshots and images on a schedule, with retention [DLM]
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The recycle bin: retention rules that make deletions recoverable [Recycle Bin]
    #[command(subcommand)]
    RecycleBin(RecycleBinCmd),
    /// The server's accounts and their access keys [IAM CreateAccessKey, ...]
    #[command(subcommand)]
    Account(AccountCmd),
    /// Serve the store over HTTP to clients that sign their requests (AWS SigV4):
    /// the EBS direct API
    Serve {
        /// Address to listen on (port 0: any free port, printed on start)
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: String,
        /// Connections served at once; more wait to be accepted
        #[arg(long, default_value_t = 256)]
        max_connections: usize,
        /// Seconds a client has to send a request's headers
        #[arg(long, default_value = "10", value_parser = account::seconds, value_name = "SECS")]
        header_timeout: std::time::Duration,
        /// Seconds a client has to send a request's body
        #[arg(long, default_value = "60", value_parser = account::seconds, value_name = "SECS")]
        body_timeout: std::time::Duration,
        /// Serve HTTPS with this certificate chain (PEM); needs --tls-key
        #[arg(long, requires = "tls_key", value_name = "PEM")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM)
        #[arg(long, requires = "tls_cert", value_name = "PEM")]
        tls_key: Option<PathBuf>,
    },
}

/// The store root: `--store`, `$BLOCKSNAP_STORE`, or a per-user directory.
fn store_root(global: &Global) -> Result<PathBuf> {
    if let Some(p) = &global.store {
        return Ok(p.clone());
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("blocksnap"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/blocksnap")),
        None => Err(Error::InvalidArgument(
            "no store given and $HOME is not set: pass --store DIR".into(),
        )
        .into()),
    }
}

/// Runs a parsed command line; the returned number is the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    // A long-running server of lazy volumes: before any thread starts.
    if matches!(
        &cli.command,
        Command::Volume(VolumeCmd::Serve { .. } | VolumeCmd::Mount { .. })
            | Command::Instance(InstanceCmd::Attach { .. })
    ) {
        blocksnap::limit_malloc_arenas();
    }
    // Servers and clients of `serve` move blocks through fresh buffers.
    if matches!(&cli.command, Command::Serve { .. }) || cli.global.endpoint.is_some() {
        blocksnap::reuse_block_buffers();
    }
    let g = &cli.global;
    let account = g
        .account
        .as_deref()
        .map(str::parse::<AccountId>)
        .transpose()?;
    // Tuning variables are parsed once, here: a bad value is a usage error.
    let settings = blocksnap::settings::Settings::from_vars(|n| std::env::var(n).ok())?;
    blocksnap::settings::install(settings);
    let mut out = Out::new(g.json, g.quiet);
    // `region add --endpoint` names an S3 endpoint: region definitions are
    // never sent to a server.
    let served = !matches!(&cli.command, Command::Region(_));
    if let Some(endpoint) = g.endpoint.as_deref().filter(|e| served && !e.is_empty()) {
        if g.account.is_some() {
            return Err(Error::InvalidArgument(format!(
                "--account with --endpoint {endpoint}: the server takes the account from your \
                 access key (AWS_ACCESS_KEY_ID); leave out --account and BLOCKSNAP_ACCOUNT"
            ))
            .into());
        }
        return run_remote(endpoint, &g.region, &out, cli.command);
    }
    let root = store_root(g)?;
    install_keyring(g, account.clone(), &cli.command)?;
    let command = match cli.command {
        // Region definitions work without opening a region.
        Command::Region(cmd) if !cmd.needs_region() => return region::run(&root, &out, cmd),
        // The server's accounts and the server are the store's, not a region's.
        Command::Account(cmd) => return account::run(&root, &out, cmd),
        Command::Serve {
            listen,
            max_connections,
            header_timeout,
            body_timeout,
            tls_cert,
            tls_key,
        } => {
            if g.account.is_some() {
                return Err(Error::InvalidArgument(
                    "serve takes no --account: each request's access key decides its account"
                        .into(),
                )
                .into());
            }
            let opts = blocksnap::server::ServeOptions {
                listen,
                max_connections: max_connections.max(1),
                header_timeout,
                body_timeout,
                tls: tls_cert.zip(tls_key),
                ..Default::default()
            };
            return account::serve_store(&root, opts, g.quiet);
        }
        other => other,
    };
    // Only the default region is created on first use; any other must
    // exist (`region add`), so a typo is an error, not a new empty region.
    let opened = if g.region == DEFAULT_REGION {
        Region::open_or_create(&root, &g.region)
    } else {
        Region::open(&root, &g.region)
    };
    let region = opened.with_context(|| {
        format!(
            "cannot open region {} of store {}",
            g.region,
            root.display()
        )
    })?;
    // Shared with the threads of a served or mounted volume.
    let region = std::sync::Arc::new(region);
    // Leaving out --account acts as the region's default owner.
    let caller = region.caller(account.as_ref());
    out.set_region(region.clone());
    match command {
        Command::Snapshot(cmd) => snapshot::run(&region, &out, account, &caller, cmd),
        Command::Image(cmd) => image::run(&root, &region, &out, caller, cmd),
        Command::Instance(cmd) => instance::run(&region, &out, caller, cmd),
        Command::Volume(cmd) => volume::run(&region, &out, &caller, cmd),
        Command::Store(cmd) => store::run(&region, &out, cmd),
        Command::Key(cmd) => key::run(&region, &out, &caller, cmd),
        Command::Region(cmd) => region::run_in(&region, &out, cmd),
        Command::Policy(cmd) => policy::run(&root, &region, &out, &caller, cmd),
        Command::RecycleBin(cmd) => recycle_bin::run(&region, &out, &caller, cmd),
        Command::Account(_) | Command::Serve { .. } => unreachable!("run before a region opens"),
    }
}

/// Runs `command` against the server at `endpoint`, in `region`.
fn run_remote(endpoint: &str, region: &str, out: &Out, command: Command) -> Result<u8> {
    // Instances are directories here: describing or terminating one needs
    // neither store nor server.
    if let Command::Instance(cmd @ (InstanceCmd::Describe { .. } | InstanceCmd::Terminate { .. })) =
        command
    {
        return instance::run_local(out, cmd);
    }
    let client = blocksnap::server::client::Client::from_env(endpoint, region)?;
    match command {
        Command::Snapshot(cmd) => remote::snapshot(&client, out, cmd),
        Command::Volume(cmd) => remote::restore(&client, out, cmd),
        Command::Image(cmd) => remote::image(&client, out, cmd),
        Command::Instance(cmd) => remote::instance(&client, region, out, cmd),
        other => remote::not_served(None, &other),
    }
}

/// The process's keyring: the passphrase from `BLOCKSNAP_PASSPHRASE` or
/// `--passphrase-file` (never an argument), else asked on the terminal;
/// the key files; the acting account.
fn install_keyring(g: &Global, account: Option<AccountId>, command: &Command) -> Result<()> {
    use zeroize::Zeroizing;
    let from_env = std::env::var("BLOCKSNAP_PASSPHRASE").ok();
    let passphrase = match (&g.passphrase_file, from_env) {
        (Some(path), _) => {
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot read the passphrase file {}: {e}",
                    path.display()
                ))
            })?);
            Some(Zeroizing::new(
                text.lines().next().unwrap_or_default().to_string(),
            ))
        }
        (None, Some(p)) => Some(Zeroizing::new(p)),
        (None, None) => None,
    };
    if passphrase.as_ref().is_some_and(|p| p.is_empty()) {
        return Err(Error::InvalidArgument(
            "the passphrase is empty: give a non-empty one (BLOCKSNAP_PASSPHRASE or \
             --passphrase-file)"
                .into(),
        )
        .into());
    }
    // A served or mounted volume runs detached: it never asks.
    let detached = std::env::var_os("BLOCKSNAP_DETACHED").is_some();
    let prompt: Option<Box<blocksnap::region::keys::Prompt>> = (!detached).then(|| {
        Box::new(|what: &str, confirm: bool| {
            let first = blocksnap::read_secret_line(&format!("Passphrase for {what}: "))?;
            Some((|| {
                let first = Zeroizing::new(first.map_err(|e| Error::Io {
                    op: "read the passphrase from",
                    path: "/dev/tty".into(),
                    source: e,
                })?);
                if first.is_empty() {
                    return Err(Error::Key("no passphrase given".into()));
                }
                if confirm {
                    let again = blocksnap::read_secret_line("Repeat the passphrase: ")
                        .unwrap_or_else(|| Ok(String::new()))
                        .map(Zeroizing::new)
                        .unwrap_or_default();
                    if *again != *first {
                        return Err(Error::Key(
                            "the passphrases differ: nothing was created".into(),
                        ));
                    }
                }
                Ok(first)
            })())
        }) as Box<blocksnap::region::keys::Prompt>
    });
    // `key create --key-file` names the file to write, not one to read.
    let key_files = match command {
        Command::Key(KeyCmd::Create { .. }) => Vec::new(),
        _ => g.key_file.clone(),
    };
    blocksnap::region::keys::install(blocksnap::region::keys::Keyring::new(
        passphrase, prompt, key_files, account,
    ));
    Ok(())
}
