//! Grants: who a region's images and snapshots are shared with, and the
//! snapshot permission files (`snapshot-permissions/<snap>.json`) beside
//! the manifests, which never change.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::format::image::{
    CreateVolumePermissions, LaunchPermission, LaunchPermissions, MAX_JSON,
    decode_snapshot_permissions, encode_snapshot_permissions,
};
use crate::id::{AccountId, SnapshotId};
use crate::region::catalog::{Region, permissions_key};

/// A list of grants in EC2's shape: an image's launch permissions, a
/// snapshot's create-volume permissions.
pub trait Grants {
    fn grants(&self) -> &[LaunchPermission];
    fn grants_mut(&mut self) -> &mut Vec<LaunchPermission>;

    /// Granted to `all`.
    fn is_public(&self) -> bool {
        self.grants()
            .iter()
            .any(|p| matches!(p, LaunchPermission::Group(g) if g == "all"))
    }

    /// Granted to `account` by name.
    fn lists(&self, account: &AccountId) -> bool {
        self.grants()
            .iter()
            .any(|p| matches!(p, LaunchPermission::Account(a) if a == account))
    }

    /// Whether `account` may use what `owner` owns under these grants: the
    /// owner, a listed account, or anyone when public.
    fn allows(&self, owner: &AccountId, account: &AccountId) -> bool {
        owner == account || self.is_public() || self.lists(account)
    }

    /// Applies `--reset`, then `--remove`, then `--add`.
    fn apply(&mut self, change: &PermissionChange) {
        let list = self.grants_mut();
        if change.reset {
            list.clear();
        }
        for g in &change.remove {
            let p = g.permission();
            list.retain(|q| *q != p);
        }
        for g in &change.add {
            let p = g.permission();
            if !list.contains(&p) {
                list.push(p);
            }
        }
    }
}

impl Grants for LaunchPermissions {
    fn grants(&self) -> &[LaunchPermission] {
        &self.launch_permissions
    }
    fn grants_mut(&mut self) -> &mut Vec<LaunchPermission> {
        &mut self.launch_permissions
    }
}

/// Who a permission change is about: an account, or everyone (`all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    Account(AccountId),
    All,
}

impl FromStr for Grantee {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            Ok(Grantee::All)
        } else {
            Ok(Grantee::Account(s.parse()?))
        }
    }
}

impl Grantee {
    pub fn permission(&self) -> LaunchPermission {
        match self {
            Grantee::Account(a) => LaunchPermission::Account(a.clone()),
            Grantee::All => LaunchPermission::Group("all".into()),
        }
    }
}

impl Grants for CreateVolumePermissions {
    fn grants(&self) -> &[LaunchPermission] {
        &self.create_volume_permissions
    }
    fn grants_mut(&mut self) -> &mut Vec<LaunchPermission> {
        &mut self.create_volume_permissions
    }
}

/// A permission change (ModifyImageAttribute launchPermission).
#[derive(Debug, Clone, Default)]
pub struct PermissionChange {
    pub add: Vec<Grantee>,
    pub remove: Vec<Grantee>,
    pub reset: bool,
}

/// `self` (the caller) or an account id, as EC2's owner filters take them.
pub fn account_or_self(s: &str, caller: &AccountId) -> Result<AccountId> {
    if s == "self" {
        Ok(caller.clone())
    } else {
        Ok(s.parse()?)
    }
}

/// `self`, `all` or an account id, as EC2's grantee filters take them.
pub fn grantee_or_self(s: &str, caller: &AccountId) -> Result<Grantee> {
    match s {
        "self" => Ok(Grantee::Account(caller.clone())),
        other => other.parse(),
    }
}

/// The permissions of snapshot `id` (none granted when it has no file).
pub fn read(region: &Region, id: &SnapshotId) -> Result<CreateVolumePermissions> {
    let key = permissions_key(id);
    match region
        .backend()
        .read(&key, "snapshot permissions", MAX_JSON)?
    {
        Some(b) => decode_snapshot_permissions(&b, &region.backend().locate(&key)),
        None => Ok(CreateVolumePermissions::default()),
    }
}

/// Replaces the permissions of snapshot `id`.
pub fn write(region: &Region, id: &SnapshotId, perms: &CreateVolumePermissions) -> Result<()> {
    region
        .backend()
        .replace(&permissions_key(id), &encode_snapshot_permissions(perms))
}

/// The snapshots that have a permission file (damaged ones included).
pub fn listed(region: &Region) -> Result<Vec<SnapshotId>> {
    Ok(region
        .backend()
        .list("snapshot-permissions")?
        .iter()
        .filter_map(|name| name.strip_suffix(".json")?.parse().ok())
        .collect())
}
