//! The CLI's long operations against a server (`--endpoint`): a local
//! volume snapshotted through the EBS direct API, snapshots restored and
//! images launched from it, block by block and in parallel, with the
//! same restore code (targets, sparse files, deltas, qemu formats) as a
//! local store.
//!
//! Unchanged blocks are found without reading anything back: a block
//! token of this server names the block's content (see [`token`]), so
//! hashing the local block tells whether the server already holds it.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use bytes::Bytes;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, Result};
use crate::format::image::{BlockDeviceMapping, DeviceName, EbsMapping, MappingTarget, TagChange};
use crate::format::instance::Instance;
use crate::format::manifest::Tag;
use crate::id::{ImageId, Namer, SnapshotId, random_id};
use crate::image::instance::{LaunchOptions, LaunchedImage, launch_with};
use crate::ops::restore::{BlockSource, RestoreOptions, RestoreReport, restore_from};
use crate::ops::snapshot::ParentChoice;
use crate::progress::Progress;
use crate::store::pool::thread_pool;
use crate::volume::blocks::{BlockPos, Content, Cut, scan, steady};
use crate::volume::io::{Volume, source_path};

use super::client::{Call, Client, Xml, sha256};
pub use super::ebs::SOURCE_TAG;
use super::ebs::{BLOCK, LAUNCH_PARAM, token};

const GIB: u64 = 1 << 30;
/// Requests in flight at once, by default: the work is the server's and
/// the network's, not this machine's cores.
const DEFAULT_STREAMS: usize = 8;

fn streams(threads: usize) -> usize {
    match threads {
        0 => DEFAULT_STREAMS,
        n => n,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// `Latest`: the newest of yours uploaded from the same volume path.
    pub parent: ParentChoice,
    pub description: String,
    pub tags: Vec<Tag>,
    /// Requests in flight; 0: [`DEFAULT_STREAMS`].
    pub threads: usize,
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub id: SnapshotId,
    pub parent: Option<SnapshotId>,
    pub source: String,
    /// GiB, as the EBS direct API sizes volumes.
    pub volume_size: u64,
    pub blocks: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
}

/// A snapshot on the server, as its block list: the token of each data
/// block (kept only for those, so a mostly empty volume costs what its
/// data costs); any other block reads as zeros.
pub struct Remote<'a> {
    client: &'a Client,
    id: SnapshotId,
    volume_size: u64,
    tokens: HashMap<u64, String>,
    /// For a launch: the image whose launch permission allows the reads.
    image: Option<ImageId>,
}

impl<'a> Remote<'a> {
    /// Lists the blocks of `id` (every page).
    pub fn open(
        client: &'a Client,
        id: &SnapshotId,
        image: Option<&ImageId>,
    ) -> Result<Remote<'a>> {
        let mut tokens = HashMap::new();
        let mut volume_size = 0;
        let query: Vec<(&str, String)> = image
            .map(|ami| (LAUNCH_PARAM, ami.to_string()))
            .into_iter()
            .collect();
        let path = format!("/snapshots/{id}/blocks");
        each_page(
            client,
            &path,
            &query,
            "list the blocks of a snapshot at",
            |page| {
                let gib = page["VolumeSize"].as_u64().unwrap_or(0);
                volume_size = gib * GIB;
                for b in page["Blocks"].as_array().into_iter().flatten() {
                    let (Some(i), Some(t)) = (b["BlockIndex"].as_u64(), b["BlockToken"].as_str())
                    else {
                        continue;
                    };
                    if i >= volume_size / BLOCK as u64 {
                        return Err(Error::InvalidArgument(format!(
                            "{} lists block {i} of {id}, past its {gib} GiB",
                            client.endpoint()
                        )));
                    }
                    tokens.insert(i, t.to_string());
                }
                Ok(())
            },
        )?;
        Ok(Remote {
            client,
            id: id.clone(),
            volume_size,
            tokens,
            image: image.cloned(),
        })
    }

    /// The data blocks, in order: index and token.
    pub fn blocks(&self) -> Vec<(u64, &str)> {
        let mut b: Vec<(u64, &str)> = self.tokens.iter().map(|(i, t)| (*i, t.as_str())).collect();
        b.sort_unstable();
        b
    }

    /// The server holds `content` at `index` already.
    fn has(&self, index: usize, content: &Content<'_>) -> bool {
        let listed = self.tokens.get(&(index as u64)).map(String::as_str);
        match (content, listed) {
            (Content::Data { id, .. }, Some(t)) => token(&self.id, index as u64, id) == t,
            (Content::Data { .. }, None) => false,
            (_, listed) => listed.is_none(),
        }
    }
}

impl BlockSource for Remote<'_> {
    fn snapshot(&self) -> &SnapshotId {
        &self.id
    }

    fn volume_size(&self) -> u64 {
        self.volume_size
    }

    fn block_size(&self) -> u32 {
        BLOCK
    }

    fn block_count(&self) -> usize {
        (self.volume_size / BLOCK as u64) as usize
    }

    fn has_data(&self, index: usize) -> bool {
        self.tokens.contains_key(&(index as u64))
    }

    /// `GetSnapshotBlock`, its length and SHA-256 checked.
    fn fetch(&self, pos: BlockPos, buf: &mut Vec<u8>) -> Result<()> {
        let index = pos.index;
        let token = self
            .tokens
            .get(&index)
            .expect("only data blocks are fetched");
        let mut query = vec![("blockToken", token.clone())];
        if let Some(ami) = &self.image {
            query.push((LAUNCH_PARAM, ami.to_string()));
        }
        let path = format!("/snapshots/{}/blocks/{index}", self.id);
        let answer = self.client.get("ebs", &path, query, "read a block from")?;
        let sum = answer.header("x-amz-checksum").map(str::to_string);
        if answer.body.len() != pos.len || sum.as_deref() != Some(&b64(&sha256(&answer.body))) {
            return Err(Error::Remote {
                op: "read a block from",
                location: self.client.endpoint().to_string(),
                reason: format!(
                    "block {index} of {} came with {} bytes and checksum {sum:?}, which do not \
                     match: nothing was written from it; try again",
                    self.id,
                    answer.body.len()
                ),
                kind: ErrorKind::Integrity,
                source: None,
            });
        }
        buf.clear();
        buf.extend_from_slice(&answer.body);
        Ok(())
    }

    fn namer(&self) -> Namer {
        Namer::Plain
    }

    fn holds(&self, index: usize, content: &Content<'_>) -> bool {
        self.has(index, content)
    }
}

/// Every page of a paged EBS list call (`maxResults`, `NextToken`): GETs
/// `path` with `query` and hands each page to `page`.
fn each_page(
    client: &Client,
    path: &str,
    query: &[(&str, String)],
    what: &'static str,
    mut page: impl FnMut(&Value) -> Result<()>,
) -> Result<()> {
    let mut next: Option<String> = None;
    loop {
        let mut q = query.to_vec();
        q.push(("maxResults", "10000".to_string()));
        if let Some(n) = &next {
            q.push(("pageToken", n.clone()));
        }
        let answer = client.get("ebs", path, q, what)?.json()?;
        page(&answer)?;
        match answer["NextToken"].as_str() {
            Some(n) => next = Some(n.to_string()),
            None => return Ok(()),
        }
    }
}

/// Snapshots the volume at `path` through the server's EBS direct API:
/// only blocks the parent does not hold already are sent, 512 KiB each
/// with its SHA-256, then completed with the LINEAR checksum. The volume
/// is sized in whole GiB, as EBS sizes volumes.
pub fn upload(
    client: &Client,
    path: &Path,
    opts: &UploadOptions,
    progress: &dyn Progress,
) -> Result<Uploaded> {
    let volume = Volume::open(path)?;
    let source = source_path(path);
    let size = volume.size();
    let gib = size.div_ceil(GIB).max(1);
    let parent = match &opts.parent {
        ParentChoice::None => None,
        ParentChoice::Explicit(id) => Some(id.clone()),
        ParentChoice::Latest => latest_of(client, &source)?,
    };
    let parent = match &parent {
        Some(id) => Some(Remote::open(client, id, None)?),
        None => None,
    };
    let mut tags = opts.tags.clone();
    tags.push(Tag {
        key: SOURCE_TAG.to_string(),
        value: source.clone(),
    });
    let mut start = json!({
        "VolumeSize": gib,
        "Description": opts.description,
        "Tags": tags,
        "ClientToken": random_id("upload"),
    });
    if let Some(p) = &parent {
        start["ParentSnapshotId"] = json!(p.id.as_str());
    }
    let started = client
        .send(&Call {
            service: "ebs",
            method: "POST",
            path: "/snapshots".into(),
            query: Vec::new(),
            headers: vec![("content-type", "application/json".into())],
            body: start.to_string().into(),
            body_sha256: None,
            what: "start a snapshot at",
        })?
        .json()?;
    let id: SnapshotId = started["SnapshotId"].as_str().unwrap_or_default().parse()?;

    let put = |index: u64, data: &[u8]| -> Result<[u8; 32]> {
        let mut body = data.to_vec();
        body.resize(BLOCK as usize, 0);
        let sha = sha256(&body);
        client.send(&Call {
            service: "ebs",
            method: "PUT",
            path: format!("/snapshots/{id}/blocks/{index}"),
            query: Vec::new(),
            headers: vec![
                ("content-type", "application/octet-stream".into()),
                ("x-amz-data-length", BLOCK.to_string()),
                ("x-amz-checksum", b64(&sha)),
                ("x-amz-checksum-algorithm", "SHA256".into()),
            ],
            body: body.into(),
            body_sha256: Some(sha),
            what: "write a block to",
        })?;
        Ok(sha)
    };
    let pool = thread_pool(streams(opts.threads))?;
    let mut sent: Vec<(u64, [u8; 32])> = Vec::new();
    progress.start("upload", size);
    scan(
        &volume,
        Cut {
            len: size,
            block_size: BLOCK,
            namer: Namer::Plain,
            // As a local create: mapped only where most blocks are hashed
            // and found unchanged.
            map: parent.is_some(),
        },
        &pool,
        progress,
        |pos, content| -> Result<Option<[u8; 32]>> {
            if parent
                .as_ref()
                .is_some_and(|p| p.has(pos.index as usize, &content))
            {
                return Ok(None);
            }
            match content {
                Content::Data { bytes, id, mapped } => {
                    steady(bytes, id, mapped, Namer::Plain, |b, _| put(pos.index, b)).map(Some)
                }
                // A zero block over a parent's data.
                _ if parent.is_some() => put(pos.index, &[]).map(Some),
                _ => Ok(None),
            }
        },
        |pos, sha| {
            if let Some(sha) = sha {
                sent.push((pos.index, sha));
            }
            Ok(())
        },
    )?;
    // Past the volume's end, up to its whole GiB: zeros over any parent
    // data there.
    let blocks = size.div_ceil(BLOCK as u64);
    if let Some(p) = &parent {
        let mut tail: Vec<u64> = p
            .tokens
            .keys()
            .copied()
            .filter(|&i| i >= blocks && i < gib * GIB / BLOCK as u64)
            .collect();
        tail.sort_unstable();
        let shas = pool.install(|| {
            tail.par_iter()
                .map(|&i| put(i, &[]).map(|s| (i, s)))
                .collect::<Result<Vec<_>>>()
        })?;
        sent.extend(shas);
    }
    progress.finish();
    sent.sort_by_key(|(i, _)| *i);
    let mut all = Vec::with_capacity(sent.len() * 32);
    for (_, sha) in &sent {
        all.extend_from_slice(sha);
    }
    client.send(&Call {
        service: "ebs",
        method: "POST",
        path: format!("/snapshots/completion/{id}"),
        query: Vec::new(),
        headers: vec![
            ("x-amz-changedblockscount", sent.len().to_string()),
            ("x-amz-checksum", b64(&sha256(&all))),
            ("x-amz-checksum-algorithm", "SHA256".into()),
            ("x-amz-checksum-aggregation-method", "LINEAR".into()),
        ],
        body: Bytes::new(),
        body_sha256: None,
        what: "complete a snapshot at",
    })?;
    Ok(Uploaded {
        id,
        parent: parent.map(|p| p.id),
        source,
        volume_size: gib,
        blocks,
        blocks_sent: sent.len() as u64,
        bytes_sent: sent.len() as u64 * BLOCK as u64,
    })
}

/// The newest completed snapshot of yours uploaded from `source`.
fn latest_of(client: &Client, source: &str) -> Result<Option<SnapshotId>> {
    let x = client.ec2(
        "DescribeSnapshots",
        &[("Owner.1".into(), "self".into())],
        "list your snapshots at",
    )?;
    let mut newest: Option<(String, String)> = None;
    for item in x.items("snapshotSet") {
        let from_source = item
            .items("tagSet")
            .any(|t| t.text_of("key") == SOURCE_TAG && t.text_of("value") == source);
        if !from_source || item.text_of("status") != "completed" {
            continue;
        }
        let at = item.text_of("startTime").to_string();
        if newest.as_ref().is_none_or(|(t, _)| at >= *t) {
            newest = Some((at, item.text_of("snapshotId").to_string()));
        }
    }
    newest
        .map(|(_, id)| id.parse())
        .transpose()
        .map_err(Into::into)
}

/// Restores snapshot `id` from the server to `target`, as `volume restore`
/// restores from a store.
pub fn restore(
    client: &Client,
    id: &SnapshotId,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let remote = Remote::open(client, id, None)?;
    let pool = thread_pool(streams(opts.threads))?;
    progress.start("restore", remote.volume_size);
    let report = restore_from(&remote, target, opts, &pool, progress)?;
    progress.finish();
    Ok(report)
}

/// Launches image `ami` from the server into `dir`, as `instance launch`
/// does from a store: its snapshots are read with the image's launch
/// permission.
pub fn launch(
    client: &Client,
    region: &str,
    ami: &ImageId,
    dir: &Path,
    opts: &LaunchOptions,
    progress: &dyn Progress,
) -> Result<Instance> {
    if opts.lazy {
        return Err(Error::InvalidArgument(
            "--lazy reads the store itself: launch lazily on the server's machine, or leave out \
             --lazy to restore the volumes through the server"
                .into(),
        ));
    }
    let x = client.ec2(
        "DescribeImages",
        &[("ImageId.1".into(), ami.to_string())],
        "describe an image at",
    )?;
    let item = x
        .items("imagesSet")
        .next()
        .ok_or_else(|| Error::ImageNotFound {
            id: ami.clone(),
            region: region.to_string(),
        })?;
    if item.text_of("imageState") != "available" {
        return Err(Error::InvalidImage(format!(
            "{ami} is {}, not available: it cannot be launched",
            item.text_of("imageState")
        )));
    }
    let mappings = item
        .items("blockDeviceMapping")
        .map(mapping_of)
        .collect::<Result<Vec<_>>>()?;
    let root: DeviceName = item.text_of("rootDeviceName").parse()?;
    let image = LaunchedImage {
        id: ami,
        region,
        mappings: &mappings,
        architecture: item.text_of("architecture"),
        root_device_name: &root,
    };
    let remotes = mappings
        .iter()
        .filter_map(BlockDeviceMapping::ebs)
        .map(|e| {
            Remote::open(client, &e.snapshot_id, Some(ami)).map(|r| (e.snapshot_id.clone(), r))
        })
        .collect::<Result<Vec<_>>>()?;
    let of = |id: &SnapshotId| {
        remotes
            .iter()
            .find(|(s, _)| s == id)
            .map(|(_, r)| r)
            .expect("listed above")
    };
    let pool = thread_pool(streams(opts.threads))?;
    let opts = LaunchOptions {
        caller: client.account()?,
        ..opts.clone()
    };
    let volume_size = |id: &SnapshotId| Ok(of(id).volume_size);
    let fill = |path: &Path, e: &crate::format::instance::InstanceEbs| {
        let ropts = RestoreOptions {
            size: Some(e.volume_size * GIB),
            ..Default::default()
        };
        restore_from(of(&e.snapshot_id), path, &ropts, &pool, progress).map(|_| ())
    };
    launch_with(&image, dir, &opts, &pool, progress, &volume_size, &fill)
}

/// A `<blockDeviceMapping>` item as the image holds it.
fn mapping_of(item: &Xml) -> Result<BlockDeviceMapping> {
    let device_name: DeviceName = item.text_of("deviceName").parse()?;
    let target = if let Some(ebs) = item.child("ebs") {
        let number = |name: &str| {
            ebs.text_of(name).parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!(
                    "the server's mapping of {device_name} has no {name}"
                ))
            })
        };
        MappingTarget::Ebs(EbsMapping {
            snapshot_id: ebs.text_of("snapshotId").parse()?,
            volume_size: number("volumeSize")?,
            delete_on_termination: ebs.text_of("deleteOnTermination") == "true",
            encrypted: ebs.text_of("encrypted") == "true",
            kms_key_id: None,
        })
    } else if item.child("noDevice").is_some() {
        MappingTarget::NoDevice(String::new())
    } else {
        MappingTarget::VirtualName(item.text_of("virtualName").to_string())
    };
    Ok(BlockDeviceMapping {
        device_name,
        target,
    })
}

/// The blocks that differ between `first` and `second`
/// (`ListChangedBlocks`, every page), as the server lists them.
pub fn changed_blocks(
    client: &Client,
    first: &SnapshotId,
    second: &SnapshotId,
) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    let path = format!("/snapshots/{second}/changedblocks");
    let query = [("firstSnapshotId", first.to_string())];
    each_page(client, &path, &query, "list changed blocks at", |page| {
        all.extend(
            page["ChangedBlocks"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        Ok(())
    })?;
    Ok(all)
}

/// The snapshots `DescribeSnapshots` shows, in the AWS CLI's JSON shape.
pub fn describe_snapshots(client: &Client, params: &[(String, String)]) -> Result<Vec<Value>> {
    let x = client.ec2("DescribeSnapshots", params, "describe snapshots at")?;
    Ok(x.items("snapshotSet")
        .map(|i| {
            let mut v = json!({
                "SnapshotId": i.text_of("snapshotId"),
                "VolumeId": i.text_of("volumeId"),
                "State": i.text_of("status"),
                "StartTime": i.text_of("startTime"),
                "Progress": i.text_of("progress"),
                "OwnerId": i.text_of("ownerId"),
                "VolumeSize": i.text_of("volumeSize").parse::<u64>().unwrap_or(0),
                "Description": i.text_of("description"),
                "Encrypted": i.text_of("encrypted") == "true",
                "StorageTier": i.text_of("storageTier"),
            });
            let tags = tags_of(i);
            if !tags.is_empty() {
                v["Tags"] = json!(tags);
            }
            v
        })
        .collect())
}

/// The images `DescribeImages` shows, in the AWS CLI's JSON shape.
pub fn describe_images(client: &Client, params: &[(String, String)]) -> Result<Vec<Value>> {
    let x = client.ec2("DescribeImages", params, "describe images at")?;
    x.items("imagesSet")
        .map(|i| {
            let maps = i
                .items("blockDeviceMapping")
                .map(|m| {
                    let mut v = json!({"DeviceName": m.text_of("deviceName")});
                    if let Some(e) = m.child("ebs") {
                        v["Ebs"] = json!({
                            "SnapshotId": e.text_of("snapshotId"),
                            "VolumeSize": e.text_of("volumeSize").parse::<u64>().unwrap_or(0),
                            "DeleteOnTermination": e.text_of("deleteOnTermination") == "true",
                            "Encrypted": e.text_of("encrypted") == "true",
                        });
                    } else if m.child("noDevice").is_some() {
                        v["NoDevice"] = json!("");
                    } else {
                        v["VirtualName"] = json!(m.text_of("virtualName"));
                    }
                    v
                })
                .collect::<Vec<_>>();
            let mut v = json!({
                "ImageId": i.text_of("imageId"),
                "Name": i.text_of("name"),
                "Description": i.text_of("description"),
                "State": i.text_of("imageState"),
                "OwnerId": i.text_of("imageOwnerId"),
                "CreationDate": i.text_of("creationDate"),
                "Public": i.text_of("isPublic") == "true",
                "Architecture": i.text_of("architecture"),
                "RootDeviceName": i.text_of("rootDeviceName"),
                "BlockDeviceMappings": maps,
            });
            let tags = tags_of(i);
            if !tags.is_empty() {
                v["Tags"] = json!(tags);
            }
            Ok(v)
        })
        .collect()
}

fn tags_of(item: &Xml) -> Vec<Tag> {
    item.items("tagSet")
        .map(|t| Tag {
            key: t.text_of("key").to_string(),
            value: t.text_of("value").to_string(),
        })
        .collect()
}

/// Changes the tags of a snapshot or an image of the caller's:
/// `DeleteTags`, then `CreateTags`, as EC2 has no one call for both.
pub fn change_tags(client: &Client, resource: &str, change: &TagChange) -> Result<()> {
    let on = [("ResourceId.1".to_string(), resource.to_string())];
    if change.remove_all || !change.remove.is_empty() {
        let mut p = on.to_vec();
        for (i, (key, value)) in change.remove.iter().enumerate() {
            p.push((format!("Tag.{}.Key", i + 1), key.clone()));
            if let Some(v) = value {
                p.push((format!("Tag.{}.Value", i + 1), v.clone()));
            }
        }
        client.ec2("DeleteTags", &p, "remove tags at")?;
    }
    if !change.add.is_empty() {
        let mut p = on.to_vec();
        for (i, t) in change.add.iter().enumerate() {
            p.push((format!("Tag.{}.Key", i + 1), t.key.clone()));
            p.push((format!("Tag.{}.Value", i + 1), t.value.clone()));
        }
        client.ec2("CreateTags", &p, "tag at")?;
    }
    Ok(())
}

/// The tags of a snapshot or an image (`DescribeSnapshots`,
/// `DescribeImages`).
pub fn tags_of_resource(client: &Client, resource: &str) -> Result<Vec<Tag>> {
    let (action, param, set) = match resource.starts_with("ami-") {
        true => ("DescribeImages", "ImageId.1", "imagesSet"),
        false => ("DescribeSnapshots", "SnapshotId.1", "snapshotSet"),
    };
    let x = client.ec2(
        action,
        &[(param.to_string(), resource.to_string())],
        "describe at",
    )?;
    Ok(x.items(set).next().map(tags_of).unwrap_or_default())
}
