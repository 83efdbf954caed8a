//! Parsers of command-line values: ids, sizes, tags, accounts and
//! permission changes.

use anyhow::Result;
use clap::Args;

use blocksnap::format::image::TagChange;
use blocksnap::format::manifest::Tag;
use blocksnap::region::permissions::PermissionChange;
use blocksnap::{Error, ImageId, SnapshotId};

pub fn parse_snapshot(s: &str) -> Result<SnapshotId> {
    Ok(s.parse::<SnapshotId>()?)
}

/// Parses `123`, `64K`, `512KiB`, `20G`, `1T` (powers of 1024).
pub fn parse_size(s: &str, what: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => u32::MAX,
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| shift != u32::MAX)
        .and_then(|n| n.checked_mul(1u64 << shift.min(40)))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what} {s:?} is not a size: use bytes or a K, M, G or T suffix, e.g. 512K"
            ))
            .into()
        })
}

pub fn parse_tag(s: &str) -> Result<Tag> {
    match s.split_once('=') {
        Some((k, v)) => {
            let tag = Tag {
                key: k.to_string(),
                value: v.to_string(),
            };
            blocksnap::lifecycle::policy::check_user_tags(std::slice::from_ref(&tag))?;
            Ok(tag)
        }
        None => Err(Error::InvalidArgument(format!("tag {s:?} is not KEY=VALUE")).into()),
    }
}

/// Parses a duration such as `7d`, `12h` or `30m`.
pub fn parse_duration(s: &str, what: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        Error::InvalidArgument(format!(
            "{what} {s:?} is not a duration ({e}): write it as 7d, 12h or 30m"
        ))
        .into()
    })
}

pub fn parse_image(s: &str) -> Result<ImageId> {
    Ok(s.parse::<ImageId>()?)
}

#[derive(Args, Debug)]
pub struct PermissionArgs {
    /// ACCOUNT or `all` (public) (repeatable)
    #[arg(long, value_name = "ACCOUNT|all")]
    pub add: Vec<String>,
    /// ACCOUNT or `all` (repeatable)
    #[arg(long, value_name = "ACCOUNT|all")]
    pub remove: Vec<String>,
    /// Back to owner only
    #[arg(long)]
    pub reset: bool,
}

/// `--add`, `--remove` and `--reset` of a permissions command.
pub fn permission_change(args: &PermissionArgs) -> Result<PermissionChange> {
    let (add, remove, reset) = (&args.add, &args.remove, args.reset);
    if add.is_empty() && remove.is_empty() && !reset {
        return Err(Error::InvalidArgument(
            "say what to change: --add, --remove or --reset".into(),
        )
        .into());
    }
    Ok(PermissionChange {
        add: add.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
        remove: remove.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
        reset,
    })
}

pub use blocksnap::region::permissions::{account_or_self, grantee_or_self};

/// `--encrypted` and `--kms-key-id`, as EC2 spells them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EncryptionArgs {
    /// Encrypt, under --kms-key-id or the region's default key (alias/aws/ebs)
    #[arg(long)]
    pub encrypted: bool,
    /// The key: a key id, alias/NAME, or either's ARN (implies --encrypted)
    #[arg(long, value_name = "KEY")]
    pub kms_key_id: Option<String>,
}

impl EncryptionArgs {
    pub fn options(&self) -> blocksnap::ops::snapshot::Encryption {
        blocksnap::ops::snapshot::Encryption {
            encrypted: self.encrypted,
            kms_key_id: self.kms_key_id.clone(),
        }
    }
}

/// `--parent SNAP` / `--no-parent` of `snapshot create`.
pub fn parent_choice(
    parent: Option<&str>,
    no_parent: bool,
) -> Result<blocksnap::ops::snapshot::ParentChoice> {
    use blocksnap::ops::snapshot::ParentChoice;
    Ok(match (parent, no_parent) {
        (Some(p), _) => ParentChoice::Explicit(parse_snapshot(p)?),
        (None, true) => ParentChoice::None,
        (None, false) => ParentChoice::Latest,
    })
}

/// Repeated `--tag KEY=VALUE`.
pub fn parse_tags(tags: &[String]) -> Result<Vec<Tag>> {
    tags.iter().map(|t| parse_tag(t)).collect()
}

/// `--tag`, `--untag` and `--untag-all` of a tag command.
#[derive(Args, Debug)]
pub struct TagArgs {
    /// Add a tag, or give its key a new value (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tag: Vec<String>,
    /// Remove tag KEY, or only where its value is VALUE (repeatable)
    #[arg(long, value_name = "KEY[=VALUE]")]
    pub untag: Vec<String>,
    /// Remove every tag (blocksnap's own stay)
    #[arg(long, conflicts_with = "untag")]
    pub untag_all: bool,
}

/// The change a tag command asks for.
pub fn tag_change(args: &TagArgs) -> Result<TagChange> {
    if args.tag.is_empty() && args.untag.is_empty() && !args.untag_all {
        return Err(Error::InvalidArgument(
            "say what to change: --tag KEY=VALUE, --untag KEY or --untag-all".into(),
        )
        .into());
    }
    let add = parse_tags(&args.tag)?;
    let remove: Vec<(String, Option<String>)> = args
        .untag
        .iter()
        .map(|u| match u.split_once('=') {
            Some((key, value)) => (key.to_string(), Some(value.to_string())),
            None => (u.clone(), None),
        })
        .collect();
    if let Some((key, _)) = remove.iter().find(|(k, _)| add.iter().any(|t| t.key == *k)) {
        return Err(Error::InvalidArgument(format!(
            "tag {key:?} is both given (--tag) and removed (--untag): say which"
        ))
        .into());
    }
    let change = TagChange {
        add,
        remove,
        remove_all: args.untag_all,
    };
    change.check()?;
    Ok(change)
}
