//! EC2's Query API (`Version=2016-11-15`) for snapshots and images: form
//! parameters in, XML out, errors in EC2's `<Response><Errors>` shape.
//! Each action is the CLI's library call with the authenticated account as
//! the caller, so permissions are the same rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::format::image::{LaunchPermission, MappingTarget, TagChange};
use crate::format::manifest::{SnapshotMeta, Tag};
use crate::id::{AccountId, ImageId, SnapshotId};
use crate::image::ops as images;
use crate::ops::access;
use crate::region::catalog::Region;
use crate::region::images::ImageView;
use crate::region::permissions::{
    Grantee, Grants, PermissionChange, account_or_self, grantee_or_self,
};

use super::ebs::{TOKEN_MEMORY, Uploads, check_client_token};
use super::query;
use super::{Params, Reply};

pub const VERSION: &str = "2016-11-15";
const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";
/// The STS API version of `GetCallerIdentity`.
const STS_VERSION: &str = "2011-06-15";

/// `Prefix.1`, `Prefix.2`, … in order.
fn list(p: &Params, prefix: &str) -> Vec<String> {
    (1..)
        .map_while(|i| p.get(&format!("{prefix}.{i}")).cloned())
        .collect()
}

fn required<'a>(p: &'a Params, name: &str) -> Result<&'a str> {
    p.get(name)
        .map(String::as_str)
        .ok_or_else(|| Error::InvalidArgument(format!("MissingParameter: {name} is required")))
}

/// Answers one EC2 action; `Err` only for errors of the request itself.
pub fn answer(
    region: &Region,
    uploads: &Uploads,
    caller: &AccountId,
    p: &Params,
    copies: &CopyTokens,
    open_region: &dyn Fn(&str) -> Result<std::sync::Arc<Region>>,
) -> std::result::Result<Reply, Reply> {
    let action = p.get("Action").map(String::as_str).unwrap_or_default();
    if action == "GetCallerIdentity" {
        return Ok(caller_identity(caller, p));
    }
    if p.get("Version").map(String::as_str) != Some(VERSION) {
        return Err(error(
            400,
            "InvalidParameterValue",
            &format!("this server speaks EC2 API version {VERSION}: send Version={VERSION}"),
        ));
    }
    if let Some(known) = known_parameters(action)
        && let Some(k) = query::unknown(p, known)
    {
        return Err(error(
            400,
            "UnknownParameter",
            &format!(
                "the parameter {k} is not one this server reads for {action}, and it would \
                 not be left undone: {} are",
                known.join(", ")
            ),
        ));
    }
    if let Some((list, missing)) = query::gap(p) {
        return Err(error(
            400,
            "InvalidParameterValue",
            &format!(
                "{list}.{missing} is missing: a list is numbered 1, 2, 3… without a gap, \
                 and what follows one would be left undone"
            ),
        ));
    }
    // A dry run of a Describe… is the call, its answer dropped; of a
    // change, nothing at all.
    let dry_run = p.get("DryRun").is_some_and(|v| v == "true");
    if dry_run && !action.starts_with("Describe") {
        return Err(error(
            400,
            "UnsupportedOperation",
            &format!(
                "DryRun of {action} is not supported by this server: nothing was done; \
                 send it without DryRun to make the change"
            ),
        ));
    }
    let body = match action {
        "DescribeSnapshots" => describe_snapshots(region, uploads, caller, p),
        "DeleteSnapshot" => delete_snapshot(region, caller, p),
        "DescribeSnapshotAttribute" => describe_snapshot_attribute(region, caller, p),
        "ModifySnapshotAttribute" => modify_snapshot_attribute(region, caller, p),
        "DescribeImages" => describe_images(region, caller, p),
        "DescribeImageAttribute" => describe_image_attribute(region, caller, p),
        "ModifyImageAttribute" => modify_image_attribute(region, caller, p),
        "DeregisterImage" => deregister_image(region, caller, p),
        "RegisterImage" => register_image(region, caller, p),
        "CopyImage" => copy_image(region, caller, p, copies, open_region),
        "CreateTags" => change_tags(region, caller, p, false),
        "DeleteTags" => change_tags(region, caller, p, true),
        "" => {
            return Err(error(400, "MissingAction", "the request names no Action"));
        }
        other => {
            return Err(error(
                400,
                "InvalidAction",
                &format!("the action {other} is not valid for this web service"),
            ));
        }
    };
    match body {
        Ok(_) if dry_run => Err(error(
            412,
            "DryRunOperation",
            "Request would have succeeded, but DryRun flag is set.",
        )),
        Ok(inner) => Ok(response(action, &inner)),
        Err(e) => Err(from_error(&e, action)),
    }
}

/// `CopyImage`'s client tokens: (account, region, token) -> the copy that
/// token made or is making, and when it was asked. A retry (botocore
/// sends one token for all tries of a call) waits for the copy in flight
/// and gets its image, rather than making another; forgotten after a day.
#[derive(Default)]
pub struct CopyTokens(Mutex<HashMap<(AccountId, String, String), CopySlot>>);

type CopySlot = (Arc<Mutex<Option<ImageId>>>, Instant);

impl CopyTokens {
    /// The slot of `token`, made if new.
    fn slot(&self, caller: &AccountId, region: &str, token: &str) -> Arc<Mutex<Option<ImageId>>> {
        let now = Instant::now();
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, (_, at)| now.duration_since(*at) < TOKEN_MEMORY);
        all.entry((caller.clone(), region.to_string(), token.to_string()))
            .or_insert_with(|| (Arc::default(), now))
            .0
            .clone()
    }
}

/// The parameters `action` reads, numbers as `N` (`None`: not an action
/// here). Any other is refused, where EC2 would act on it: a filter, a
/// tag specification or a client token left undone would make the answer
/// a lie.
fn known_parameters(action: &str) -> Option<&'static [&'static str]> {
    Some(match action {
        "DescribeSnapshots" => &[
            "SnapshotId.N",
            "Owner.N",
            "RestorableBy.N",
            "Filter.N.Name",
            "Filter.N.Value.N",
            "MaxResults",
            "NextToken",
        ],
        "DeleteSnapshot" => &["SnapshotId"],
        "DescribeSnapshotAttribute" => &["SnapshotId", "Attribute"],
        "ModifySnapshotAttribute" => &[
            "SnapshotId",
            "Attribute",
            "OperationType",
            "UserId.N",
            "UserGroup.N",
            "CreateVolumePermission.Add.N.UserId",
            "CreateVolumePermission.Add.N.Group",
            "CreateVolumePermission.Remove.N.UserId",
            "CreateVolumePermission.Remove.N.Group",
        ],
        "DescribeImages" => &[
            "ImageId.N",
            "Owner.N",
            "ExecutableBy.N",
            "IncludeDeprecated",
            "Filter.N.Name",
            "Filter.N.Value.N",
            "MaxResults",
            "NextToken",
        ],
        "DescribeImageAttribute" => &["ImageId", "Attribute"],
        "ModifyImageAttribute" => &[
            "ImageId",
            "Attribute",
            "OperationType",
            "UserId.N",
            "UserGroup.N",
            "LaunchPermission.Add.N.UserId",
            "LaunchPermission.Add.N.Group",
            "LaunchPermission.Remove.N.UserId",
            "LaunchPermission.Remove.N.Group",
        ],
        "DeregisterImage" => &["ImageId", "DeleteAssociatedSnapshots"],
        "RegisterImage" => &[
            "Name",
            "Description",
            "Architecture",
            "RootDeviceName",
            "BlockDeviceMapping.N.DeviceName",
            "BlockDeviceMapping.N.Ebs.SnapshotId",
            "BlockDeviceMapping.N.Ebs.VolumeSize",
            "BlockDeviceMapping.N.Ebs.DeleteOnTermination",
            // Volumes here have no type: every one is `standard`.
            "BlockDeviceMapping.N.Ebs.VolumeType",
            "BlockDeviceMapping.N.NoDevice",
            "BlockDeviceMapping.N.VirtualName",
        ],
        "CopyImage" => &[
            "SourceImageId",
            "SourceRegion",
            "Name",
            "Description",
            "CopyImageTags",
            "Encrypted",
            "KmsKeyId",
            "ClientToken",
        ],
        "CreateTags" | "DeleteTags" => &["ResourceId.N", "Tag.N.Key", "Tag.N.Value"],
        _ => return None,
    })
}

/// `CreateTags` and `DeleteTags`: `ResourceId.N` (snapshots and images
/// of the caller's), `Tag.N.Key` and `Tag.N.Value`; each resource in turn.
/// As EC2's `DeleteTags`: a tag named without a value goes whatever its
/// value, and naming no tag deletes them all.
fn change_tags(region: &Region, caller: &AccountId, p: &Params, delete: bool) -> Result<String> {
    let resources = list(p, "ResourceId");
    if resources.is_empty() {
        return Err(Error::InvalidArgument(
            "MissingParameter: ResourceId.1 is required".into(),
        ));
    }
    let named: Vec<(String, Option<String>)> = (1..)
        .map_while(|i| {
            let key = p.get(&format!("Tag.{i}.Key"))?;
            Some((key.clone(), p.get(&format!("Tag.{i}.Value")).cloned()))
        })
        .collect();
    let change = if delete {
        TagChange {
            remove_all: named.is_empty(),
            remove: named,
            ..TagChange::default()
        }
    } else if named.is_empty() {
        return Err(Error::InvalidArgument(
            "MissingParameter: Tag.1.Key is required".into(),
        ));
    } else {
        TagChange {
            add: named
                .into_iter()
                .map(|(key, value)| Tag {
                    key,
                    value: value.unwrap_or_default(),
                })
                .collect(),
            ..TagChange::default()
        }
    };
    for r in &resources {
        if r.starts_with("ami-") {
            images::change_tags(region, &r.parse()?, caller, &change)?;
        } else if r.starts_with("snap-") {
            access::change_tags(region, &r.parse()?, caller, &change)?;
        } else {
            return Err(Error::InvalidArgument(format!(
                "{r} is neither a snapshot nor an image, the only resources this server tags"
            )));
        }
    }
    Ok("<return>true</return>".into())
}

/// STS `GetCallerIdentity`: the account of the request's access key.
fn caller_identity(caller: &AccountId, p: &Params) -> Reply {
    if p.get("Version").map(String::as_str) != Some(STS_VERSION) {
        return error(
            400,
            "InvalidParameterValue",
            &format!(
                "GetCallerIdentity is of STS version {STS_VERSION}: send Version={STS_VERSION}"
            ),
        );
    }
    Reply::xml(
        200,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetCallerIdentityResponse \
             xmlns=\"https://sts.amazonaws.com/doc/{STS_VERSION}/\"><GetCallerIdentityResult>\
             <Arn>arn:aws:iam::{caller}:root</Arn><UserId>{caller}</UserId>\
             <Account>{caller}</Account></GetCallerIdentityResult><ResponseMetadata>\
             <RequestId>{}</RequestId></ResponseMetadata></GetCallerIdentityResponse>",
            crate::id::random_id("req")
        ),
    )
}

/// Wraps an action's elements in its `<ActionResponse>`.
fn response(action: &str, inner: &str) -> Reply {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{action}Response xmlns=\"{XMLNS}\">\
         <requestId>{}</requestId>{inner}</{action}Response>",
        crate::id::random_id("req")
    );
    Reply::xml(200, xml)
}

/// An error as EC2 writes it.
pub fn error(status: u16, code: &'static str, message: &str) -> Reply {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
        esc(message),
        crate::id::random_id("req")
    );
    let mut r = Reply::xml(status, xml);
    r.code = Some(code);
    r
}

fn from_error(e: &Error, action: &str) -> Reply {
    let msg = e.to_string();
    let (status, code) = match (e, e.kind()) {
        (Error::SnapshotNotFound { .. }, _) => (400, "InvalidSnapshot.NotFound"),
        (Error::ImageNotFound { .. }, _) => (400, "InvalidAMIID.NotFound"),
        (Error::InvalidId(_), _) if action.contains("Image") => (400, "InvalidAMIID.Malformed"),
        (Error::InvalidId(_), _) => (400, "InvalidParameterValue"),
        (_, ErrorKind::Permission) => (403, "UnauthorizedOperation"),
        (_, ErrorKind::NotFound) => (400, "InvalidParameterValue"),
        (_, ErrorKind::Usage) if msg.starts_with("MissingParameter") => (400, "MissingParameter"),
        (_, ErrorKind::Usage) => (400, "InvalidParameterValue"),
        (_, ErrorKind::Conflict) => (400, "IncorrectState"),
        (_, ErrorKind::Integrity | ErrorKind::Other) => (500, "InternalError"),
    };
    error(status, code, &msg)
}

fn one_owner(p: &Params, key: &str, caller: &AccountId) -> Result<Option<AccountId>> {
    let owners = list(p, key);
    match owners.as_slice() {
        [] => Ok(None),
        [one] => account_or_self(one, caller).map(Some),
        _ => Err(Error::InvalidArgument(format!(
            "one {key} at a time: this server filters by a single owner"
        ))),
    }
}

fn describe_snapshots(
    region: &Region,
    uploads: &Uploads,
    caller: &AccountId,
    p: &Params,
) -> Result<String> {
    let filters = query::Filters::of(
        p,
        &[
            "snapshot-id",
            "owner-id",
            "status",
            "description",
            "volume-size",
            "tag-key",
        ],
    )?;
    let ids = list(p, "SnapshotId");
    // The item of each snapshot the filters pass.
    let mut found = Vec::new();
    if !ids.is_empty() {
        for id in ids {
            let id: SnapshotId = id.parse()?;
            if let Some((size, started)) = uploads.pending_of(&id, caller) {
                let attrs = || {
                    vec![
                        ("snapshot-id".into(), id.to_string()),
                        ("owner-id".into(), caller.to_string()),
                        ("status".into(), "pending".into()),
                        ("volume-size".into(), (size >> 30).to_string()),
                    ]
                };
                if !filters.pass(attrs) {
                    continue;
                }
                found.push(format!(
                    "<item><snapshotId>{id}</snapshotId><volumeId>vol-ffffffff</volumeId>\
                     <status>pending</status><startTime>{}</startTime><progress>0%</progress>\
                     <ownerId>{caller}</ownerId><volumeSize>{}</volumeSize><encrypted>false\
                     </encrypted><storageTier>standard</storageTier></item>",
                    iso(started),
                    size >> 30
                ));
                continue;
            }
            let meta = access::readable(region, &id, caller, "describe")?;
            if filters.pass(|| snapshot_attrs(&meta)) {
                found.push(snapshot_item(&meta));
            }
        }
    } else {
        let filter = access::ListFilter {
            owner: one_owner(p, "Owner", caller)?,
            restorable_by: match list(p, "RestorableBy").as_slice() {
                [] => None,
                [one] => Some(grantee_or_self(one, caller)?),
                _ => {
                    return Err(Error::InvalidArgument("one RestorableBy at a time".into()));
                }
            },
        };
        let (views, _damaged) = access::list(region, caller, &filter)?;
        for v in views {
            if filters.pass(|| snapshot_attrs(&v.meta)) {
                found.push(snapshot_item(&v.meta));
            }
        }
    }
    paged("snapshotSet", p, found)
}

/// The page of `found` items that `p` asks for, in `<set>`, and the next
/// page's token.
fn paged(set: &str, p: &Params, found: Vec<String>) -> Result<String> {
    let (items, next) = query::page(p, found)?;
    let mut out = format!("<{set}>{}</{set}>", items.concat());
    if let Some(t) = next {
        out.push_str(&format!("<nextToken>{t}</nextToken>"));
    }
    Ok(out)
}

/// What filters see of a snapshot: what its item shows.
fn snapshot_attrs(m: &SnapshotMeta) -> Vec<(String, String)> {
    let mut attrs = vec![
        ("snapshot-id".into(), m.id.to_string()),
        ("owner-id".into(), m.owner.to_string()),
        ("status".into(), "completed".into()),
        (
            "volume-size".into(),
            m.volume_size.div_ceil(1 << 30).to_string(),
        ),
    ];
    if !m.sealed {
        attrs.push(("description".into(), m.description.clone()));
    }
    attrs.extend(query::tag_attrs(m.tags.iter().map(|t| (&t.key, &t.value))));
    attrs
}

fn snapshot_item(m: &SnapshotMeta) -> String {
    let mut s = format!(
        "<item><snapshotId>{}</snapshotId><volumeId>vol-ffffffff</volumeId>\
         <status>completed</status><startTime>{}</startTime><progress>100%</progress>\
         <ownerId>{}</ownerId><volumeSize>{}</volumeSize>",
        m.id,
        iso(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(m.created_ns)),
        m.owner,
        m.volume_size.div_ceil(1 << 30)
    );
    if !m.sealed {
        s.push_str(&format!(
            "<description>{}</description>",
            esc(&m.description)
        ));
    }
    s.push_str(&format!(
        "<encrypted>{}</encrypted>",
        m.kms_key_id.is_some()
    ));
    if let Some(k) = &m.kms_key_id {
        s.push_str(&format!("<kmsKeyId>{k}</kmsKeyId>"));
    }
    s.push_str(&tag_set(m.tags.iter().map(|t| (&t.key, &t.value))));
    s.push_str("<storageTier>standard</storageTier></item>");
    s
}

fn tag_set<'a>(tags: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let items: String = tags
        .map(|(k, v)| {
            format!(
                "<item><key>{}</key><value>{}</value></item>",
                esc(k),
                esc(v)
            )
        })
        .collect();
    if items.is_empty() {
        String::new()
    } else {
        format!("<tagSet>{items}</tagSet>")
    }
}

fn delete_snapshot(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    let id: SnapshotId = required(p, "SnapshotId")?.parse()?;
    access::delete(region, &id, caller)?;
    Ok("<return>true</return>".into())
}

fn permission_items(grants: &[LaunchPermission]) -> String {
    grants
        .iter()
        .map(|g| match g {
            LaunchPermission::Account(a) => format!("<item><userId>{a}</userId></item>"),
            LaunchPermission::Group(g) => format!("<item><group>{}</group></item>", esc(g)),
        })
        .collect()
}

fn check_attribute(p: &Params, want: &str) -> Result<()> {
    match p.get("Attribute") {
        Some(a) if a == want => Ok(()),
        None => Ok(()),
        Some(a) => Err(Error::InvalidArgument(format!(
            "attribute {a} is not one this server keeps: only {want}"
        ))),
    }
}

fn describe_snapshot_attribute(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    let id: SnapshotId = required(p, "SnapshotId")?.parse()?;
    check_attribute(p, "createVolumePermission")?;
    let perms = access::permissions_of(region, &id, caller)?;
    Ok(format!(
        "<snapshotId>{id}</snapshotId><createVolumePermission>{}</createVolumePermission>",
        permission_items(&perms.create_volume_permissions)
    ))
}

/// The change a Modify…Attribute asks for, in either of EC2's forms:
/// `OperationType` with `UserId.N` / `UserGroup.N`, or
/// `{Attr}.Add.N.UserId|Group` and `{Attr}.Remove.N.…`.
fn permission_change(p: &Params, attr: &str, caller: &AccountId) -> Result<PermissionChange> {
    let mut change = PermissionChange {
        add: Vec::new(),
        remove: Vec::new(),
        reset: false,
    };
    let who = |user: Option<&String>, group: Option<&String>| -> Result<Option<Grantee>> {
        match (user, group) {
            (Some(u), _) => Ok(Some(Grantee::Account(account_or_self(u, caller)?))),
            (None, Some(g)) if g == "all" => Ok(Some(Grantee::All)),
            (None, Some(g)) => Err(Error::InvalidArgument(format!(
                "group {g:?} is not known: the only group is all"
            ))),
            (None, None) => Ok(None),
        }
    };
    for (side, into) in [("Add", &mut change.add), ("Remove", &mut change.remove)] {
        for i in 1.. {
            let user = p.get(&format!("{attr}.{side}.{i}.UserId"));
            let group = p.get(&format!("{attr}.{side}.{i}.Group"));
            match who(user, group)? {
                Some(g) => into.push(g),
                None => break,
            }
        }
    }
    if let Some(op) = p.get("OperationType") {
        let mut grantees: Vec<Grantee> = Vec::new();
        for u in list(p, "UserId") {
            grantees.push(Grantee::Account(account_or_self(&u, caller)?));
        }
        for g in list(p, "UserGroup") {
            grantees.push(who(None, Some(&g))?.expect("a group"));
        }
        match op.as_str() {
            "add" => change.add.extend(grantees),
            "remove" => change.remove.extend(grantees),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "OperationType {other} is neither add nor remove"
                )));
            }
        }
    }
    if change.add.is_empty() && change.remove.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "MissingParameter: say whom to add or remove ({attr}.Add.1.UserId, or OperationType \
             with UserId.1)"
        )));
    }
    Ok(change)
}

fn modify_snapshot_attribute(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    let id: SnapshotId = required(p, "SnapshotId")?.parse()?;
    check_attribute(p, "createVolumePermission")?;
    let change = permission_change(p, "CreateVolumePermission", caller)?;
    access::modify(region, &id, caller, &change)?;
    Ok("<return>true</return>".into())
}

fn describe_images(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    let filters = query::Filters::of(
        p,
        &[
            "image-id",
            "owner-id",
            "name",
            "description",
            "state",
            "is-public",
            "architecture",
            "root-device-name",
            "block-device-mapping.snapshot-id",
            "block-device-mapping.device-name",
            "tag-key",
        ],
    )?;
    let ids = list(p, "ImageId");
    let mut found = Vec::new();
    if !ids.is_empty() {
        for id in ids {
            let id: ImageId = id.parse()?;
            let view = crate::region::images::read(region, &id)?;
            view.require_launch(caller, "describe")?;
            if filters.pass(|| image_attrs(&view)) {
                found.push(image_item(&view));
            }
        }
    } else {
        let filter = images::ListFilter {
            owner: one_owner(p, "Owner", caller)?,
            executable_by: match list(p, "ExecutableBy").as_slice() {
                [] => None,
                [one] => Some(grantee_or_self(one, caller)?),
                _ => return Err(Error::InvalidArgument("one ExecutableBy at a time".into())),
            },
            include_deregistered: false,
            include_deprecated: p.get("IncludeDeprecated").is_some_and(|v| v == "true"),
        };
        let (views, _damaged) = images::list(region, caller, &filter)?;
        for v in views {
            if filters.pass(|| image_attrs(&v)) {
                found.push(image_item(&v));
            }
        }
    }
    paged("imagesSet", p, found)
}

/// What filters see of an image: what its item shows.
fn image_attrs(v: &ImageView) -> Vec<(String, String)> {
    let i = &v.image;
    let mut attrs: Vec<(String, String)> = vec![
        ("image-id".into(), i.image_id.to_string()),
        ("owner-id".into(), i.owner_id.to_string()),
        ("name".into(), i.name.clone()),
        ("description".into(), i.description.clone()),
        ("state".into(), v.state.state.as_str().to_string()),
        ("is-public".into(), v.permissions.is_public().to_string()),
        ("architecture".into(), i.architecture.clone()),
        ("root-device-name".into(), i.root_device_name.to_string()),
    ];
    for m in &i.block_device_mappings {
        attrs.push((
            "block-device-mapping.device-name".into(),
            m.device_name.to_string(),
        ));
        if let MappingTarget::Ebs(e) = &m.target {
            attrs.push((
                "block-device-mapping.snapshot-id".into(),
                e.snapshot_id.to_string(),
            ));
        }
    }
    attrs.extend(query::tag_attrs(i.tags.iter().map(|t| (&t.key, &t.value))));
    attrs
}

fn image_item(v: &ImageView) -> String {
    let i = &v.image;
    let mut mappings = String::new();
    for m in &i.block_device_mappings {
        mappings.push_str(&format!("<item><deviceName>{}</deviceName>", m.device_name));
        match &m.target {
            MappingTarget::Ebs(e) => mappings.push_str(&format!(
                "<ebs><snapshotId>{}</snapshotId><volumeSize>{}</volumeSize>\
                 <deleteOnTermination>{}</deleteOnTermination><volumeType>standard</volumeType>\
                 <encrypted>{}</encrypted></ebs>",
                e.snapshot_id, e.volume_size, e.delete_on_termination, e.encrypted
            )),
            MappingTarget::NoDevice(_) => mappings.push_str("<noDevice></noDevice>"),
            MappingTarget::VirtualName(n) => {
                mappings.push_str(&format!("<virtualName>{}</virtualName>", esc(n)))
            }
        }
        mappings.push_str("</item>");
    }
    let mut s = format!(
        "<item><imageId>{}</imageId><imageState>{}</imageState><imageOwnerId>{}</imageOwnerId>\
         <creationDate>{}</creationDate><isPublic>{}</isPublic><architecture>{}</architecture>\
         <imageType>machine</imageType><name>{}</name><description>{}</description>\
         <rootDeviceType>{}</rootDeviceType><rootDeviceName>{}</rootDeviceName>\
         <blockDeviceMapping>{mappings}</blockDeviceMapping>\
         <virtualizationType>hvm</virtualizationType><hypervisor>xen</hypervisor>",
        i.image_id,
        v.state.state.as_str(),
        i.owner_id,
        esc(&i.creation_date),
        v.permissions.is_public(),
        esc(&i.architecture),
        esc(&i.name),
        esc(&i.description),
        esc(&i.root_device_type),
        i.root_device_name,
    );
    if let Some(t) = &v.state.deprecation_time {
        s.push_str(&format!("<deprecationTime>{}</deprecationTime>", esc(t)));
    }
    s.push_str(&tag_set(i.tags.iter().map(|t| (&t.key, &t.value))));
    s.push_str("</item>");
    s
}

fn describe_image_attribute(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    let id: ImageId = required(p, "ImageId")?.parse()?;
    check_attribute(p, "launchPermission")?;
    let view = crate::region::images::read(region, &id)?;
    view.require_owner(caller, "see the launch permissions of")?;
    Ok(format!(
        "<imageId>{id}</imageId><launchPermission>{}</launchPermission>",
        permission_items(&view.permissions.launch_permissions)
    ))
}

fn modify_image_attribute(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    let id: ImageId = required(p, "ImageId")?.parse()?;
    check_attribute(p, "launchPermission")?;
    let change = permission_change(p, "LaunchPermission", caller)?;
    images::modify_permissions(region, &id, caller, &change)?;
    Ok("<return>true</return>".into())
}

/// `RegisterImage` from snapshots: `BlockDeviceMapping.N.DeviceName` with
/// `.Ebs.SnapshotId` (and `.Ebs.VolumeSize`, `.Ebs.DeleteOnTermination`),
/// `.NoDevice` or `.VirtualName`; the CLI's `image register` rules.
fn register_image(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    use crate::image::create::{ImageCreateOptions, MapSource, MapSpec, register_maps};
    let mut opts = ImageCreateOptions::new(required(p, "Name")?, caller.clone());
    opts.description = p.get("Description").cloned().unwrap_or_default();
    opts.architecture = p.get("Architecture").cloned();
    opts.root_device = p.get("RootDeviceName").map(|d| d.parse()).transpose()?;
    let mut maps = Vec::new();
    for i in 1.. {
        let key = |k: &str| format!("BlockDeviceMapping.{i}.{k}");
        let Some(device) = p.get(&key("DeviceName")) else {
            break;
        };
        let device: crate::format::image::DeviceName = device.parse()?;
        let source = if let Some(snap) = p.get(&key("Ebs.SnapshotId")) {
            if let Some(gib) = p.get(&key("Ebs.VolumeSize")) {
                let gib = gib.parse::<u64>().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "{} is not a whole number of GiB",
                        key("Ebs.VolumeSize")
                    ))
                })?;
                opts.volume_sizes.insert(device.clone(), gib);
            }
            if p.get(&key("Ebs.DeleteOnTermination"))
                .is_some_and(|v| v == "false")
            {
                opts.keep_on_termination.push(device.clone());
            }
            MapSource::Snapshot(snap.parse()?)
        } else if p.contains_key(&key("NoDevice")) {
            MapSource::NoDevice
        } else if let Some(v) = p.get(&key("VirtualName")) {
            MapSource::Ephemeral(v.clone())
        } else {
            return Err(Error::InvalidArgument(format!(
                "{} maps to nothing: give Ebs.SnapshotId, NoDevice or VirtualName",
                key("DeviceName")
            )));
        };
        maps.push(MapSpec { device, source });
    }
    if maps.is_empty() {
        return Err(Error::InvalidArgument(
            "MissingParameter: RegisterImage needs BlockDeviceMapping.1.DeviceName with \
             Ebs.SnapshotId (images here are backed by snapshots)"
                .into(),
        ));
    }
    let image = register_maps(region, &maps, &opts)?;
    Ok(format!("<imageId>{}</imageId>", image.image_id))
}

/// `CopyImage` from `SourceRegion` into the request's region, the CLI's
/// `image copy`: copies its snapshots (only the chunks the target lacks).
fn copy_image(
    region: &Region,
    caller: &AccountId,
    p: &Params,
    copies: &CopyTokens,
    open_region: &dyn Fn(&str) -> Result<std::sync::Arc<Region>>,
) -> Result<String> {
    use crate::image::copy::{CopyOptions, copy_image};
    let id: ImageId = required(p, "SourceImageId")?.parse()?;
    let source = open_region(required(p, "SourceRegion")?)?;
    if p.get("Encrypted").is_some_and(|v| v == "true") || p.contains_key("KmsKeyId") {
        return Err(Error::InvalidArgument(
            "encrypted copies are not made through this server yet: use `blocksnap image copy \
             --encrypted`"
                .into(),
        ));
    }
    let opts = CopyOptions {
        caller: caller.clone(),
        name: p.get("Name").cloned(),
        description: p.get("Description").cloned(),
        copy_tags: p.get("CopyImageTags").is_some_and(|v| v == "true"),
        threads: 0,
        encryption: Default::default(),
    };
    let slot = match p.get("ClientToken") {
        Some(t) => Some(copies.slot(caller, region.name(), check_client_token(t)?)),
        None => None,
    };
    // Held through the copy: a retry waits here for the first try's image.
    let mut made = slot
        .as_ref()
        .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(Some(image)) = made.as_deref() {
        return Ok(format!("<imageId>{image}</imageId>"));
    }
    let report = copy_image(&source, &id, region, &opts, &crate::progress::NoProgress)?;
    if let Some(made) = made.as_deref_mut() {
        *made = Some(report.image.image_id.clone());
    }
    Ok(format!("<imageId>{}</imageId>", report.image.image_id))
}

fn deregister_image(region: &Region, caller: &AccountId, p: &Params) -> Result<String> {
    let id: ImageId = required(p, "ImageId")?.parse()?;
    let delete = p
        .get("DeleteAssociatedSnapshots")
        .is_some_and(|v| v == "true");
    images::deregister(region, &id, caller, delete)?;
    Ok("<return>true</return>".into())
}

fn iso(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// XML text escaping.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {
                out.push_str(&format!("&#x{:x};", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::parse_params;

    #[test]
    fn forms_lists_and_escapes() {
        let p = parse_params(
            "Action=DescribeSnapshots&SnapshotId.1=snap-1&SnapshotId.2=snap%2D2&Name=a+b&Owner.1=self",
        );
        assert_eq!(list(&p, "SnapshotId"), ["snap-1", "snap-2"]);
        assert_eq!(p["Name"], "a b");
        assert_eq!(esc("<a & 'b'>\u{1}"), "&lt;a &amp; &apos;b&apos;&gt;&#x1;");
    }

    #[test]
    fn both_forms_of_a_permission_change() {
        let me: AccountId = "111111111111".parse().unwrap();
        let p = parse_params(
            "LaunchPermission.Add.1.UserId=222222222222&LaunchPermission.Add.2.Group=all&LaunchPermission.Remove.1.UserId=333333333333",
        );
        let c = permission_change(&p, "LaunchPermission", &me).unwrap();
        assert_eq!(c.add.len(), 2);
        assert_eq!(c.remove.len(), 1);
        let p = parse_params("OperationType=remove&UserId.1=self&UserGroup.1=all");
        let c = permission_change(&p, "CreateVolumePermission", &me).unwrap();
        assert_eq!(c.remove, [Grantee::Account(me.clone()), Grantee::All]);
        assert!(permission_change(&parse_params(""), "LaunchPermission", &me).is_err());
        assert!(
            permission_change(
                &parse_params("OperationType=add&UserGroup.1=admins"),
                "X",
                &me
            )
            .is_err()
        );
    }
}
