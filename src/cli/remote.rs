//! `--endpoint URL`: commands sent to a `blocksnap serve`, signed with the
//! AWS keys of the environment. The key decides the account; the commands
//! with a call on the server are sent there, and the rest say where to run
//! them.

use anyhow::Result;
use serde_json::{Value, json};

use blocksnap::Error;
use blocksnap::format::image::TagChange;
use blocksnap::image::instance::LaunchOptions;
use blocksnap::ops::restore::BlockSource;
use blocksnap::server::client::Client;
use blocksnap::server::remote::{self, UploadOptions};

use crate::cli::image::{ImageCmd, create_options};
use crate::cli::instance::{self, InstanceCmd};
use crate::cli::output::Out;
use crate::cli::parse::{
    PermissionArgs, TagArgs, parent_choice, parse_image, parse_size, parse_snapshot, parse_tags,
    tag_change,
};
use crate::cli::snapshot::SnapshotCmd;
use crate::cli::volume::VolumeCmd;

/// `snapshot tag` and `image tag`: the change, then the tags it left.
fn tag(client: &Client, out: &Out, resource: &str, change: &TagArgs) -> Result<u8> {
    remote::change_tags(client, resource, &tag_change(change)?)?;
    out.tags(resource, &remote::tags_of_resource(client, resource)?);
    Ok(0)
}

/// `volume restore` from the server.
pub fn restore(client: &Client, out: &Out, cmd: VolumeCmd) -> Result<u8> {
    let VolumeCmd::Restore(args) = cmd else {
        return not_served(Some("volume"), &cmd);
    };
    let (id, opts) = args.parse(None)?;
    let bar = out.progress();
    let report = remote::restore(client, &id, &args.target, &opts, &bar)?;
    bar.done();
    out.restore(&report);
    Ok(0)
}

/// `instance launch` from the server (`describe` and `terminate` need no
/// server, and run before a client is made).
pub fn instance(client: &Client, region: &str, out: &Out, cmd: InstanceCmd) -> Result<u8> {
    match cmd {
        InstanceCmd::Launch {
            image,
            dir,
            ephemeral_size,
            threads,
            lazy,
        } => {
            let id = parse_image(&image)?;
            let opts = LaunchOptions {
                // Replaced by the key's account.
                caller: "000000000000".parse()?,
                threads,
                ephemeral_size: parse_size(&ephemeral_size, "--ephemeral-size")?,
                lazy,
            };
            let bar = out.progress();
            let inst = remote::launch(client, region, &id, &dir, &opts, &bar)?;
            bar.done();
            instance::print_launched(out, &inst, &dir);
            Ok(0)
        }
        other => not_served(Some("instance"), &other),
    }
}

/// The error for a command with no call on the server: `noun` and the
/// first word of `command`'s `Debug` form (`Prune { .. }`), or its first
/// two words without a noun (`Store(Gc)`).
pub fn not_served(noun: Option<&str>, command: &impl std::fmt::Debug) -> Result<u8> {
    let debug = format!("{command:?}");
    let words = debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(if noun.is_some() { 1 } else { 2 })
        .map(kebab);
    let name = noun
        .map(str::to_string)
        .into_iter()
        .chain(words)
        .collect::<Vec<_>>()
        .join(" ");
    Err(Error::InvalidArgument(format!(
        "`{name}` is not sent to a server: with --endpoint, `snapshot create|list|describe|tag|\
         delete|blocks|changed-blocks|permissions|describe-permissions`, `volume restore`, \
         `image register|list|describe|tag|copy|deregister|permissions|describe-permissions` and \
         `instance launch|describe|terminate` are; run the rest on the server's machine, \
         without --endpoint"
    ))
    .into())
}

pub fn snapshot(client: &Client, out: &Out, cmd: SnapshotCmd) -> Result<u8> {
    match cmd {
        SnapshotCmd::Create {
            volume,
            parent,
            no_parent,
            block_size,
            description,
            tags,
            threads,
            no_delta,
            encryption,
            dirty_bitmap,
        } => {
            let refuse = |what: &str| -> Result<u8> {
                Err(Error::InvalidArgument(format!(
                    "{what} with --endpoint: the EBS direct API writes unencrypted 512 KiB \
                     blocks read from the volume, and the server decides how to store them"
                ))
                .into())
            };
            if block_size.is_some() {
                return refuse("--block-size");
            }
            if no_delta {
                return refuse("--no-delta");
            }
            if encryption.encrypted || encryption.kms_key_id.is_some() {
                return refuse("--encrypted");
            }
            if dirty_bitmap.is_some() {
                return refuse("--dirty-bitmap");
            }
            // An overlay holds only what was written over its snapshot:
            // read raw, the rest would be sent as zeros.
            if blocksnap::image::instance::lazy_device_of(&volume)?.is_some()
                || blocksnap::lazy::overlay::is_overlay(&volume)
            {
                return Err(Error::InvalidArgument(format!(
                    "{} is a lazy volume, which holds only what was written over its snapshot: \
                     snapshot it on the server's machine, without --endpoint",
                    volume.display()
                ))
                .into());
            }
            let opts = UploadOptions {
                parent: parent_choice(parent.as_deref(), no_parent)?,
                description,
                tags: parse_tags(&tags)?,
                threads,
            };
            let bar = out.progress();
            let up = remote::upload(client, &volume, &opts, &bar)?;
            bar.done();
            if out.json {
                out.print(json!({
                    "SnapshotId": up.id.as_str(),
                    "ParentSnapshotId": up.parent.as_ref().map(|p| p.as_str()),
                    "VolumeSize": up.volume_size,
                    "State": "completed",
                    "Blocks": up.blocks,
                    "BlocksSent": up.blocks_sent,
                    "BytesSent": up.bytes_sent,
                }));
            } else {
                let how = match &up.parent {
                    Some(p) => format!("incremental of {p}"),
                    None => "full".into(),
                };
                println!(
                    "{} created from {} at {} ({how}): {} of {} blocks sent",
                    up.id,
                    up.source,
                    client.endpoint(),
                    up.blocks_sent,
                    up.blocks
                );
            }
            Ok(0)
        }
        SnapshotCmd::List {
            volume,
            owner,
            restorable_by,
        } => {
            let mut params = Vec::new();
            if let Some(o) = owner {
                params.push(("Owner.1".to_string(), o));
            }
            if let Some(r) = restorable_by {
                params.push(("RestorableBy.1".to_string(), r));
            }
            let source = volume.map(|v| blocksnap::volume::io::source_path(&v));
            let snaps: Vec<Value> = remote::describe_snapshots(client, &params)?
                .into_iter()
                .filter(|s| source.as_ref().is_none_or(|src| source_of(s) == Some(src)))
                .collect();
            print_snapshots(out, &snaps);
            Ok(0)
        }
        SnapshotCmd::Describe { snapshot } => {
            let id = parse_snapshot(&snapshot)?;
            let params = [("SnapshotId.1".to_string(), id.to_string())];
            print_snapshots(out, &remote::describe_snapshots(client, &params)?);
            Ok(0)
        }
        SnapshotCmd::Delete { snapshot } => {
            let id = parse_snapshot(&snapshot)?;
            let params = [("SnapshotId".to_string(), id.to_string())];
            client.ec2("DeleteSnapshot", &params, "delete a snapshot at")?;
            match out.json {
                true => out.print(json!({"SnapshotId": id.as_str(), "Deleted": true})),
                false => println!("{id} deleted"),
            }
            Ok(0)
        }
        SnapshotCmd::DescribePermissions { snapshot } => {
            let id = parse_snapshot(&snapshot)?;
            permissions(client, out, "Snapshot", id.as_str(), None)
        }
        SnapshotCmd::Blocks { snapshot } => {
            let id = parse_snapshot(&snapshot)?;
            let snap = remote::Remote::open(client, &id, None)?;
            let blocks = snap.blocks();
            if out.json {
                let listed: Vec<Value> = blocks
                    .iter()
                    .map(|(i, t)| json!({"BlockIndex": i, "BlockToken": t}))
                    .collect();
                out.print(json!({
                    "SnapshotId": id.as_str(),
                    "VolumeSize": BlockSource::volume_size(&snap) >> 30,
                    "BlockSize": 512 << 10,
                    "Blocks": listed,
                }));
            } else {
                for (i, t) in &blocks {
                    println!("{i:>10}  {t}");
                }
            }
            Ok(0)
        }
        SnapshotCmd::ChangedBlocks { first, second } => {
            let (a, b) = (parse_snapshot(&first)?, parse_snapshot(&second)?);
            let changed = remote::changed_blocks(client, &a, &b)?;
            if out.json {
                out.print(json!({ "ChangedBlocks": changed }));
            } else {
                for c in &changed {
                    println!("{:>10}", c["BlockIndex"]);
                }
            }
            Ok(0)
        }
        SnapshotCmd::Permissions { snapshot, change } => {
            let id = parse_snapshot(&snapshot)?;
            permissions(client, out, "Snapshot", id.as_str(), Some(&change))
        }
        SnapshotCmd::Tag { snapshot, change } => {
            let id = parse_snapshot(&snapshot)?;
            tag(client, out, id.as_str(), &change)
        }
        other => not_served(Some("snapshot"), &other),
    }
}

pub fn image(client: &Client, out: &Out, cmd: ImageCmd) -> Result<u8> {
    match cmd {
        ImageCmd::List {
            owner,
            executable_by,
            include_deregistered: _,
            include_deprecated,
        } => {
            let mut params = Vec::new();
            if let Some(o) = owner {
                params.push(("Owner.1".to_string(), o));
            }
            if let Some(e) = executable_by {
                params.push(("ExecutableBy.1".to_string(), e));
            }
            if include_deprecated {
                params.push(("IncludeDeprecated".to_string(), "true".to_string()));
            }
            print_images(out, &remote::describe_images(client, &params)?);
            Ok(0)
        }
        ImageCmd::Describe { image } => {
            let id = parse_image(&image)?;
            let params = [("ImageId.1".to_string(), id.to_string())];
            print_images(out, &remote::describe_images(client, &params)?);
            Ok(0)
        }
        ImageCmd::Register { name, maps, common } => {
            use blocksnap::image::create::{MapSource, MapSpec};
            let specs = maps
                .iter()
                .map(|m| MapSpec::parse(m))
                .collect::<blocksnap::Result<Vec<_>>>()?;
            let opts = create_options(&common, name, "000000000000".parse()?, 0)?;
            let mut params = vec![
                ("Name".to_string(), opts.name.clone()),
                ("Description".to_string(), opts.description.clone()),
            ];
            if let Some(a) = &opts.architecture {
                params.push(("Architecture".into(), a.clone()));
            }
            if let Some(r) = &opts.root_device {
                params.push(("RootDeviceName".into(), r.to_string()));
            }
            for (i, m) in specs.iter().enumerate() {
                let key = |k: &str| format!("BlockDeviceMapping.{}.{k}", i + 1);
                params.push((key("DeviceName"), m.device.to_string()));
                match &m.source {
                    MapSource::Snapshot(snap) => {
                        params.push((key("Ebs.SnapshotId"), snap.to_string()));
                        if let Some(gib) = opts.volume_sizes.get(&m.device) {
                            params.push((key("Ebs.VolumeSize"), gib.to_string()));
                        }
                        let keep = opts.keep_on_termination.contains(&m.device);
                        params.push((key("Ebs.DeleteOnTermination"), (!keep).to_string()));
                    }
                    MapSource::NoDevice => params.push((key("NoDevice"), String::new())),
                    MapSource::Ephemeral(v) => params.push((key("VirtualName"), v.clone())),
                    MapSource::Volume(path) => {
                        return Err(Error::InvalidImage(format!(
                            "{}={}: register maps snapshots (snap-…), none or ephemeralN; with \
                             --endpoint, take the snapshot first with `snapshot create`",
                            m.device,
                            path.display()
                        ))
                        .into());
                    }
                }
            }
            let x = client.ec2("RegisterImage", &params, "register an image at")?;
            let id = x.text_of("imageId").to_string();
            if !opts.tags.is_empty() {
                let add = TagChange {
                    add: opts.tags,
                    ..TagChange::default()
                };
                remote::change_tags(client, &id, &add)?;
            }
            match out.json {
                true => out.print(json!({ "ImageId": id })),
                false => println!("{id} registered as {:?}", opts.name),
            }
            Ok(0)
        }
        ImageCmd::Copy {
            image,
            to_region,
            name,
            description,
            copy_tags,
            create_region,
            threads: _,
            encryption,
        } => {
            if create_region || encryption.encrypted || encryption.kms_key_id.is_some() {
                return Err(Error::InvalidArgument(
                    "--create-region, --encrypted and --kms-key-id with --endpoint: regions and \
                     keys are the server's; copy on the server's machine, without --endpoint"
                        .into(),
                )
                .into());
            }
            let id = parse_image(&image)?;
            let mut params = vec![
                ("SourceRegion".to_string(), client.region().to_string()),
                ("SourceImageId".to_string(), id.to_string()),
            ];
            if let Some(n) = name {
                params.push(("Name".into(), n));
            }
            if let Some(d) = description {
                params.push(("Description".into(), d));
            }
            if copy_tags {
                params.push(("CopyImageTags".into(), "true".into()));
            }
            // CopyImage is sent to the region copied into, as EC2's is.
            let to = client.in_region(&to_region);
            let x = to.ec2("CopyImage", &params, "copy an image at")?;
            let copy = x.text_of("imageId").to_string();
            match out.json {
                true => out.print(json!({ "ImageId": copy, "Region": to_region })),
                false => println!("{id} copied to {to_region} as {copy}"),
            }
            Ok(0)
        }
        ImageCmd::Deregister {
            image,
            delete_associated_snapshots,
        } => {
            let id = parse_image(&image)?;
            let mut params = vec![("ImageId".to_string(), id.to_string())];
            if delete_associated_snapshots {
                params.push(("DeleteAssociatedSnapshots".into(), "true".into()));
            }
            client.ec2("DeregisterImage", &params, "deregister an image at")?;
            match out.json {
                true => out.print(json!({ "ImageId": id.as_str(), "State": "deregistered" })),
                false => println!("{id} deregistered"),
            }
            Ok(0)
        }
        ImageCmd::Tag { image, change } => {
            let id = parse_image(&image)?;
            tag(client, out, id.as_str(), &change)
        }
        ImageCmd::DescribePermissions { image } => {
            let id = parse_image(&image)?;
            permissions(client, out, "Image", id.as_str(), None)
        }
        ImageCmd::Permissions { image, change } => {
            let id = parse_image(&image)?;
            permissions(client, out, "Image", id.as_str(), Some(&change))
        }
        other => not_served(Some("image"), &other),
    }
}

/// Shows, or changes and then shows, who may restore a snapshot or
/// launch an image: `Describe/Modify{Snapshot,Image}Attribute`.
fn permissions(
    client: &Client,
    out: &Out,
    kind: &str,
    id: &str,
    change: Option<&PermissionArgs>,
) -> Result<u8> {
    let (attr, attr_key) = match kind {
        "Snapshot" => ("createVolumePermission", "CreateVolumePermission"),
        _ => ("launchPermission", "LaunchPermission"),
    };
    let id_key = format!("{kind}Id");
    if let Some(change) = change {
        if change.reset {
            return Err(Error::InvalidArgument(
                "--reset with --endpoint: remove each grant with --remove".into(),
            )
            .into());
        }
        if change.add.is_empty() && change.remove.is_empty() {
            return Err(
                Error::InvalidArgument("say what to change: --add or --remove".into()).into(),
            );
        }
        let mut params = vec![(id_key.clone(), id.to_string())];
        for (side, who) in [("Add", &change.add), ("Remove", &change.remove)] {
            for (i, w) in who.iter().enumerate() {
                let field = match w.as_str() {
                    "all" => "Group",
                    _ => "UserId",
                };
                params.push((format!("{attr_key}.{side}.{}.{field}", i + 1), w.clone()));
            }
        }
        client.ec2(
            &format!("Modify{kind}Attribute"),
            &params,
            "change permissions at",
        )?;
    }
    let params = [
        (id_key.clone(), id.to_string()),
        ("Attribute".to_string(), attr.to_string()),
    ];
    let x = client.ec2(
        &format!("Describe{kind}Attribute"),
        &params,
        "show permissions at",
    )?;
    let grants: Vec<Value> = x
        .items(attr)
        .map(|g| match g.child("group") {
            Some(group) => json!({"Group": group.text}),
            None => json!({"UserId": g.text_of("userId")}),
        })
        .collect();
    if out.json {
        let key = format!("{}s", attr_key);
        out.print(json!({ id_key: id, key: grants }));
    } else if grants.is_empty() {
        println!("{id}: owner only");
    } else {
        for g in &grants {
            match g.get("Group") {
                Some(_) => println!("{id}: everyone (public)"),
                None => println!("{id}: account {}", g["UserId"].as_str().unwrap_or_default()),
            }
        }
    }
    Ok(0)
}

fn source_of(snapshot: &Value) -> Option<&String> {
    snapshot["Tags"]
        .as_array()?
        .iter()
        .find_map(|t| match &t["Key"] {
            Value::String(k) if k == blocksnap::server::remote::SOURCE_TAG => match &t["Value"] {
                Value::String(v) => Some(v),
                _ => None,
            },
            _ => None,
        })
}

fn print_snapshots(out: &Out, snaps: &[Value]) {
    if out.json {
        return out.print(json!({ "Snapshots": snaps }));
    }
    for s in snaps {
        let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
        println!(
            "{}  {:>5} GiB  {:<9}  {}  owner {}  {}",
            text("SnapshotId"),
            s["VolumeSize"],
            text("State"),
            text("StartTime"),
            text("OwnerId"),
            source_of(s).cloned().unwrap_or_else(|| text("Description"))
        );
    }
}

fn print_images(out: &Out, images: &[Value]) {
    if out.json {
        return out.print(json!({ "Images": images }));
    }
    for i in images {
        let text = |k: &str| i[k].as_str().unwrap_or_default().to_string();
        println!(
            "{}  {}  {}  owner {}{}",
            text("ImageId"),
            text("Name"),
            text("State"),
            text("OwnerId"),
            if i["Public"] == json!(true) {
                "  public"
            } else {
                ""
            }
        );
        for m in i["BlockDeviceMappings"].as_array().into_iter().flatten() {
            let target = match (&m["Ebs"], &m["VirtualName"]) {
                (Value::Object(e), _) => format!(
                    "{} ({} GiB)",
                    e["SnapshotId"].as_str().unwrap_or_default(),
                    e["VolumeSize"]
                ),
                (_, Value::String(v)) => v.clone(),
                _ => "no device".into(),
            };
            println!(
                "  {} -> {target}",
                m["DeviceName"].as_str().unwrap_or_default()
            );
        }
    }
}

/// `RestoreFromRecycleBin` as `restore-from-recycle-bin`.
fn kebab(word: &str) -> String {
    let mut out = String::new();
    for (i, c) in word.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}
