//! The EBS direct API (`ebs`, 2019-11-02): snapshots written block by
//! block (`StartSnapshot`, `PutSnapshotBlock`, `CompleteSnapshot`) and
//! read block by block (`ListSnapshotBlocks`, `ListChangedBlocks`,
//! `GetSnapshotBlock`), with AWS's paths, headers, JSON shapes and errors.
//!
//! A snapshot being written is held in memory with its region's lock
//! taken shared (gc waits for it) until it is completed or its `Timeout`
//! passes; each block is stored as a chunk when it arrives, so what an
//! abandoned or interrupted upload leaves is only chunks no manifest
//! names, which gc reclaims. The manifest is written on completion, under
//! the id `StartSnapshot` gave out: before that no one sees the snapshot.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use serde_json::{Value, json};

use crate::error::{Error, IoContext, Result};
use crate::format::manifest::{self, Block, DEFAULT_BLOCK_SIZE, Manifest, Tag};
use crate::id::{AccountId, ChunkId, ImageId, SnapshotId};
use crate::image::ops::read_launchable;
use crate::ops::access::readable;
use crate::ops::snapshot::{
    Outcome, Taken, changed_blocks, commit_as, merge_with_parent, store_block,
};
use crate::region::backend::RegionLock;
use crate::region::catalog::Region;
use crate::store::chain::load_into;
use crate::store::chunk_store::ChunkStore;
use crate::store::files::{Durability, write_atomic};
use crate::sys::LockMode;
use crate::volume::io::is_zero;

use super::{Params, Reply};

/// The only block size of the EBS direct API.
pub const BLOCK: u32 = DEFAULT_BLOCK_SIZE;
const GIB: u64 = 1 << 30;
/// `StartSnapshot`'s `Timeout` bounds, in minutes, and its default.
const TIMEOUT_MIN: u64 = 10;
const TIMEOUT_MAX: u64 = 4320;
const TIMEOUT_DEFAULT: u64 = 60;
/// How long block tokens are said to be good for.
const TOKEN_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_RESULTS: usize = 10_000;
/// Uploads one account may have in progress at once (EBS has a quota of
/// concurrent snapshots too); each holds a region lock and its block list.
pub const MAX_PENDING: usize = 100;
/// The tag blocksnap's CLI gives a snapshot it uploads: the volume's path,
/// kept as the snapshot's source so the next snapshot of that volume finds
/// its parent.
pub const SOURCE_TAG: &str = "blocksnap:source";
/// The files of an upload's journal, and the format of `start.json`
/// (`blocks` lines are `INDEX SHA256 KIND CHUNK RAW STORED`, see
/// [`encode_block`]).
const START_FILE: &str = "start.json";
const JOURNAL_FORMAT: &str = "blocksnap-upload";
const JOURNAL_VERSION: u32 = 1;
const BLOCKS_FILE: &str = "blocks";
/// How long a `ClientToken` keeps answering with its snapshot.
pub(super) const TOKEN_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// A snapshot being written.
struct Pending {
    region: Arc<Region>,
    owner: AccountId,
    volume_size: u64,
    parent: Option<Manifest>,
    parent_committed: Option<SystemTime>,
    description: String,
    tags: Vec<Tag>,
    started: SystemTime,
    /// `Timeout`: how long the upload may go without a block written.
    timeout: Duration,
    deadline: Instant,
    /// Block index -> what storing it did, and its SHA-256.
    blocks: BTreeMap<u64, (Outcome, [u8; 32])>,
    /// Completed: its manifest is written, and no block is taken.
    done: bool,
    /// Its journal's block file, appended to as blocks are kept.
    journal: Option<std::fs::File>,
    /// Kept shared while the upload lasts: gc cannot delete its chunks.
    _lock: RegionLock,
}

/// The snapshots being written, and the client tokens already answered.
#[derive(Default)]
pub struct Uploads {
    /// Where each upload in progress is journaled (`<store>/server/uploads`),
    /// so a restarted server carries on with it; `None`: memory only.
    journal: Option<PathBuf>,
    pending: Mutex<HashMap<SnapshotId, Arc<Mutex<Pending>>>>,
    /// (account, client token) -> the snapshot that token started, and
    /// when; forgotten after [`TOKEN_MEMORY`].
    tokens: Mutex<HashMap<(AccountId, String), (SnapshotId, Instant)>>,
    /// Held through each `StartSnapshot`: a client's retries of one start,
    /// racing one another, find the first's snapshot, and an account's
    /// count of uploads in progress holds.
    starting: Mutex<()>,
}

impl Uploads {
    /// Uploads journaled in `dir`: a server restarted after a crash carries
    /// on with those it finds there ([`Uploads::recover`]).
    pub fn journaled(dir: PathBuf) -> Uploads {
        Uploads {
            journal: Some(dir),
            ..Default::default()
        }
    }

    /// Drops uploads past their deadline; their chunks are left to gc.
    pub fn expire(&self, now: Instant) -> usize {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, at)| now.duration_since(*at) < TOKEN_MEMORY);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let before = pending.len();
        let mut gone = Vec::new();
        pending.retain(|id, p| {
            let keep = p.lock().map(|p| p.deadline > now).unwrap_or(false);
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        let after = pending.len();
        drop(pending);
        for id in gone {
            self.forget(&id);
        }
        before - after
    }

    /// Removes upload `id`'s journal.
    fn forget(&self, id: &SnapshotId) {
        if let Some(dir) = &self.journal {
            let _ = std::fs::remove_dir_all(dir.join(id.as_str()));
        }
    }

    /// Takes up again the uploads a previous server left in the journal,
    /// each in the region `open_region` gives by name, with its Timeout
    /// running anew. An upload whose region, parent or kept blocks are
    /// gone (gc ran while no server held them) is dropped: its client
    /// starts again. Returns what it did, one line per upload.
    pub fn recover(&self, open_region: &dyn Fn(&str) -> Result<Arc<Region>>) -> Vec<String> {
        let Some(dir) = &self.journal else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut said = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(id) = name.parse::<SnapshotId>() else {
                continue;
            };
            match self.recover_one(&id, &e.path(), open_region) {
                Ok(blocks) => said.push(format!("upload {id} carries on ({blocks} blocks kept)")),
                // Left as it is for the blocksnap that wrote it.
                Err(e @ Error::UnsupportedVersion { .. }) => {
                    said.push(format!("upload {id} left alone: {e}"))
                }
                Err(why) => {
                    let _ = std::fs::remove_dir_all(e.path());
                    said.push(format!("upload {id} dropped: {why}"));
                }
            }
        }
        said
    }

    fn recover_one(
        &self,
        id: &SnapshotId,
        dir: &Path,
        open_region: &dyn Fn(&str) -> Result<Arc<Region>>,
    ) -> Result<usize> {
        let bad = |what: &str| Error::InvalidArgument(format!("its journal {what}"));
        let start: Value = serde_json::from_slice(
            &std::fs::read(dir.join(START_FILE)).map_err(|_| bad("has no start"))?,
        )
        .map_err(|_| bad("start is damaged"))?;
        if start["Format"].as_str() != Some(JOURNAL_FORMAT) {
            return Err(bad("start is not an upload's"));
        }
        let version = start["Version"].as_u64().unwrap_or(0);
        if version > JOURNAL_VERSION as u64 {
            return Err(Error::UnsupportedVersion {
                what: "upload journal",
                location: dir.join(START_FILE).into(),
                found: version as u32,
                supported: JOURNAL_VERSION,
            });
        }
        let text = |k: &str| start[k].as_str().map(str::to_string);
        let region = open_region(&text("Region").ok_or_else(|| bad("names no region"))?)?;
        let owner: AccountId = text("Owner")
            .ok_or_else(|| bad("names no owner"))?
            .parse()?;
        let volume_size = start["VolumeSize"]
            .as_u64()
            .ok_or_else(|| bad("has no size"))?;
        let timeout = Duration::from_secs(start["TimeoutSecs"].as_u64().unwrap_or(3600));
        let started = SystemTime::UNIX_EPOCH
            + Duration::from_secs_f64(start["Started"].as_f64().unwrap_or(0.0).max(0.0));
        let lock = region.lock(LockMode::Shared, "EBS direct API snapshot upload")?;
        if region.has_snapshot(id)? {
            return Err(Error::Conflict("it was completed".into()));
        }
        let parent = match text("Parent") {
            Some(p) => Some(region.read_snapshot(&p.parse()?)?),
            None => None,
        };
        let parent_committed = match &parent {
            Some(p) => region.snapshot_committed_at(&p.meta.id)?,
            None => None,
        };
        let store = region.chunks_under(None)?;
        let mut blocks = BTreeMap::new();
        let lines = std::fs::read_to_string(dir.join(BLOCKS_FILE)).unwrap_or_default();
        for line in lines.lines() {
            // A line cut short by the crash was never acknowledged.
            let Some((index, outcome, sha)) = decode_block(line) else {
                continue;
            };
            if let Some(Block::Data(c)) = block_of(&outcome)
                && !store.has(&c)?
            {
                return Err(Error::NotFound(format!(
                    "block {index}'s chunk {} is no longer in the store",
                    c.short()
                )));
            }
            blocks.insert(index, (outcome, sha));
        }
        let journal = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(BLOCKS_FILE))
            .ok();
        let count = blocks.len();
        let p = Pending {
            region,
            owner: owner.clone(),
            volume_size,
            parent,
            parent_committed,
            description: text("Description").unwrap_or_default(),
            tags: parse_tags(&start)?,
            started,
            timeout,
            deadline: Instant::now() + timeout,
            blocks,
            done: false,
            journal,
            _lock: lock,
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Arc::new(Mutex::new(p)));
        if let Some(token) = text("ClientToken") {
            let age = SystemTime::now()
                .duration_since(started)
                .unwrap_or_default();
            if age < TOKEN_MEMORY {
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        (owner, token),
                        (
                            id.clone(),
                            Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                        ),
                    );
            }
        }
        Ok(count)
    }

    /// Journals a new upload: its start, and an empty block file.
    fn journal_start(
        &self,
        id: &SnapshotId,
        p: &Pending,
        client_token: Option<&str>,
    ) -> Result<Option<std::fs::File>> {
        let Some(dir) = &self.journal else {
            return Ok(None);
        };
        let dir = dir.join(id.as_str());
        std::fs::create_dir_all(&dir).ctx("create", &dir)?;
        let start = json!({
            "Format": JOURNAL_FORMAT,
            "Version": JOURNAL_VERSION,
            "Region": p.region.name(),
            "Owner": p.owner.to_string(),
            "VolumeSize": p.volume_size,
            "Parent": p.parent.as_ref().map(|m| m.meta.id.to_string()),
            "Description": p.description,
            "Tags": json!(p.tags),
            "ClientToken": client_token,
            "TimeoutSecs": p.timeout.as_secs(),
            "Started": epoch(p.started),
        });
        let blocks = dir.join(BLOCKS_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&blocks)
            .ctx("create", &blocks)?;
        write_atomic(
            &dir.join(START_FILE),
            start.to_string().as_bytes(),
            Durability::Now,
        )?;
        Ok(Some(file))
    }

    /// The volume size and start of `caller`'s upload `id`, while it is
    /// being written.
    pub fn pending_of(&self, id: &SnapshotId, caller: &AccountId) -> Option<(u64, SystemTime)> {
        let p = self.get(id, caller).ok()?;
        let p = p.lock().unwrap_or_else(|p| p.into_inner());
        (!p.done).then_some((p.volume_size, p.started))
    }

    fn get(&self, id: &SnapshotId, caller: &AccountId) -> Result<Arc<Mutex<Pending>>> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get(id) {
            Some(p) if &p.lock().unwrap_or_else(|p| p.into_inner()).owner == caller => {
                Ok(p.clone())
            }
            _ => Err(Error::NotFound(format!(
                "no snapshot {id} is being written by account {caller}: StartSnapshot first \
                 (an upload ends when it is completed or its Timeout passes)"
            ))),
        }
    }
}

/// `POST /snapshots`.
pub fn start_snapshot(
    uploads: &Uploads,
    region: Arc<Region>,
    caller: &AccountId,
    body: &[u8],
) -> Result<Reply> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidArgument(format!("the request body is not JSON: {e}")))?;
    let gib = v
        .get("VolumeSize")
        .and_then(Value::as_u64)
        .filter(|&g| (1..=65_536).contains(&g))
        .ok_or_else(|| {
            Error::InvalidArgument("VolumeSize must be a whole number of GiB, 1 to 65536".into())
        })?;
    let str_field = |name: &str| -> Result<Option<String>> {
        match v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::InvalidArgument(format!("{name} must be a string"))),
        }
    };
    if v.get("Encrypted").and_then(Value::as_bool) == Some(true)
        || str_field("KmsKeyArn")?.is_some()
    {
        return Err(Error::InvalidArgument(
            "encrypted snapshots cannot be written through the EBS direct API of this server \
             yet: write it unencrypted, or snapshot the volume with the CLI (--encrypted)"
                .into(),
        ));
    }
    let timeout = match v.get("Timeout") {
        None | Some(Value::Null) => TIMEOUT_DEFAULT,
        Some(t) => t
            .as_u64()
            .filter(|t| (TIMEOUT_MIN..=TIMEOUT_MAX).contains(t))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "Timeout is in minutes, {TIMEOUT_MIN} to {TIMEOUT_MAX}"
                ))
            })?,
    };
    let description = str_field("Description")?.unwrap_or_default();
    let tags = parse_tags(&v)?;
    let client_token = str_field("ClientToken")?;
    let _one_at_a_time = uploads.starting.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(token) = &client_token {
        check_client_token(token)?;
        let known = uploads
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(caller.clone(), token.clone()))
            .map(|(id, _)| id.clone());
        if let Some(id) = known {
            return answer_again(uploads, &region, caller, &id);
        }
    }
    let in_progress = uploads
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|p| &p.lock().unwrap_or_else(|p| p.into_inner()).owner == caller)
        .count();
    if in_progress >= MAX_PENDING {
        return Ok(Reply::error(
            402,
            "ServiceQuotaExceededException",
            &format!(
                "account {caller} has {in_progress} snapshots in progress, the most at once: \
                 complete them or let their Timeout pass"
            ),
        ));
    }
    let volume_size = gib * GIB;
    let parent = match str_field("ParentSnapshotId")? {
        None => None,
        Some(p) => {
            let id: SnapshotId = p.parse()?;
            let meta = readable(&region, &id, caller, "take as a parent")?;
            if meta.kms_key_id.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{id} is encrypted, and encrypted snapshots cannot be written through the \
                     EBS direct API of this server yet"
                )));
            }
            if meta.block_size != BLOCK {
                return Err(Error::InvalidArgument(format!(
                    "{id} has {}-byte blocks; the EBS direct API writes 512 KiB blocks",
                    meta.block_size
                )));
            }
            if meta.volume_size > volume_size {
                return Err(Error::InvalidArgument(format!(
                    "VolumeSize {gib} GiB is smaller than parent {id}'s {} bytes",
                    meta.volume_size
                )));
            }
            Some(region.read_snapshot(&id)?)
        }
    };
    let parent_committed = match &parent {
        Some(p) => region.snapshot_committed_at(&p.meta.id)?,
        None => None,
    };
    let lock = region.lock(LockMode::Shared, "EBS direct API snapshot upload")?;
    let id = SnapshotId::random();
    let started = SystemTime::now();
    let p = Pending {
        region,
        owner: caller.clone(),
        volume_size,
        parent,
        parent_committed,
        description,
        tags,
        started,
        timeout: Duration::from_secs(timeout * 60),
        deadline: Instant::now() + Duration::from_secs(timeout * 60),
        blocks: BTreeMap::new(),
        done: false,
        journal: None,
        _lock: lock,
    };
    let mut p = p;
    p.journal = uploads.journal_start(&id, &p, client_token.as_deref())?;
    let body = started_json(&id, &p, "pending");
    uploads
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), Arc::new(Mutex::new(p)));
    if let Some(token) = client_token {
        uploads
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((caller.clone(), token), (id, Instant::now()));
    }
    Ok(Reply::json(201, body))
}

/// A `ClientToken` as AWS bounds it: at most 64 characters.
pub(super) fn check_client_token(token: &str) -> Result<&str> {
    if token.len() > 64 {
        return Err(Error::InvalidArgument(
            "ClientToken is at most 64 characters".into(),
        ));
    }
    Ok(token)
}

/// `StartSnapshot` again with a token already used: the same snapshot.
fn answer_again(
    uploads: &Uploads,
    region: &Region,
    caller: &AccountId,
    id: &SnapshotId,
) -> Result<Reply> {
    if let Ok(p) = uploads.get(id, caller) {
        let p = p.lock().unwrap_or_else(|p| p.into_inner());
        return Ok(Reply::json(201, started_json(id, &p, "pending")));
    }
    let meta = readable(region, id, caller, "describe")?;
    Ok(Reply::json(
        201,
        json!({
            "SnapshotId": id.to_string(),
            "OwnerId": meta.owner.to_string(),
            "Status": "completed",
            "StartTime": meta.created_ns as f64 / 1e9,
            "VolumeSize": meta.volume_size.div_ceil(GIB),
            "BlockSize": meta.block_size,
            "Description": meta.description,
            "ParentSnapshotId": meta.parent.map(|p| p.to_string()),
            "Tags": json!(meta.tags),
        }),
    ))
}

fn started_json(id: &SnapshotId, p: &Pending, status: &str) -> Value {
    json!({
        "SnapshotId": id.to_string(),
        "OwnerId": p.owner.to_string(),
        "Status": status,
        "StartTime": epoch(p.started),
        "VolumeSize": p.volume_size / GIB,
        "BlockSize": BLOCK,
        "Description": p.description,
        "ParentSnapshotId": p.parent.as_ref().map(|m| m.meta.id.to_string()),
        "Tags": json!(p.tags),
    })
}

fn parse_tags(v: &Value) -> Result<Vec<Tag>> {
    let Some(list) = v.get("Tags").filter(|t| !t.is_null()) else {
        return Ok(Vec::new());
    };
    let bad =
        || Error::InvalidArgument("Tags must be a list of {\"Key\": .., \"Value\": ..}".into());
    list.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|t| {
            let key = t.get("Key").and_then(Value::as_str).ok_or_else(bad)?;
            let value = t.get("Value").and_then(Value::as_str).unwrap_or_default();
            Ok(Tag {
                key: key.to_string(),
                value: value.to_string(),
            })
        })
        .collect()
}

/// A header's value, if present and text.
pub type Headers<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A request's body, with its SHA-256 where the signature check computed it.
pub struct Body<'a> {
    pub data: &'a [u8],
    pub sha256: Option<[u8; 32]>,
}

/// `PUT /snapshots/{id}/blocks/{index}`.
pub fn put_snapshot_block(
    uploads: &Uploads,
    caller: &AccountId,
    id: &SnapshotId,
    index: u64,
    header: Headers,
    body: Body,
) -> Result<Reply> {
    let data = body.data;
    let upload = uploads.get(id, caller)?;
    let (region, volume_size, parent_block, committed) = {
        let p = upload.lock().unwrap_or_else(|p| p.into_inner());
        (
            p.region.clone(),
            p.volume_size,
            p.parent
                .as_ref()
                .and_then(|m| m.blocks.get(index as usize).copied()),
            p.parent_committed,
        )
    };
    let count = manifest::block_count(volume_size, BLOCK);
    if index >= count {
        return Err(Error::InvalidArgument(format!(
            "BlockIndex {index} is past the end of {id}'s {count} blocks"
        )));
    }
    let length = header("x-amz-data-length")
        .and_then(|l| l.parse::<u64>().ok())
        .ok_or_else(|| Error::InvalidArgument("x-amz-Data-Length is required".into()))?;
    if length != BLOCK as u64 || data.len() as u64 != length {
        return Err(Error::InvalidArgument(format!(
            "a block is {BLOCK} bytes: x-amz-Data-Length says {length} and the body holds {}",
            data.len()
        )));
    }
    let zero = is_zero(data);
    // A third of a typical volume's blocks are zeros, and their digest is
    // one constant: scanning for zeros costs a fraction of hashing them.
    let sha = match body.sha256 {
        Some(sha) => sha,
        None if zero => zero_block_sha256(),
        None => sha256(data),
    };
    check_checksum(header, &sha, "the block")?;
    let outcome = if zero {
        Outcome::Zero
    } else {
        let store = region.chunks_under(None)?;
        let store: &dyn ChunkStore = &store;
        store_block(
            store,
            parent_block.as_ref(),
            committed,
            data,
            store.namer().name(data),
            true,
            None,
        )?
    };
    let mut p = upload.lock().unwrap_or_else(|p| p.into_inner());
    if p.done {
        // Completed while this block was being stored: it is not part of
        // the snapshot, so it must not be acknowledged.
        return Err(Error::Conflict(format!(
            "{id} was completed while block {index} was being written: the block is not in it"
        )));
    }
    if let Some(f) = &mut p.journal {
        use std::io::Write;
        // One write of one line: a crash leaves it whole or cut short.
        f.write_all(encode_block(index, &outcome, &sha).as_bytes())
            .ctx("journal a block of", Path::new(id.as_str()))?;
    }
    p.blocks.insert(index, (outcome, sha));
    // As EBS: the Timeout runs from the last block written.
    p.deadline = Instant::now() + p.timeout;
    drop(p);
    Ok(Reply::empty(201)
        .header("x-amz-Checksum", b64(&sha))
        .header("x-amz-Checksum-Algorithm", "SHA256"))
}

/// The SHA-256 of a block of zeros, computed once.
fn zero_block_sha256() -> [u8; 32] {
    static DIGEST: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *DIGEST.get_or_init(|| sha256(&vec![0; BLOCK as usize]))
}

/// Checks `x-amz-Checksum` (base64 SHA-256, the only algorithm) against
/// `sha`, when the request carries one.
fn check_checksum(header: Headers, sha: &[u8; 32], what: &str) -> Result<()> {
    let Some(given) = header("x-amz-checksum") else {
        return Err(Error::InvalidArgument(format!(
            "x-amz-Checksum (base64 SHA-256 of {what}) is required"
        )));
    };
    if let Some(alg) = header("x-amz-checksum-algorithm")
        && alg != "SHA256"
    {
        return Err(Error::InvalidArgument(format!(
            "x-amz-Checksum-Algorithm {alg} is not SHA256, the only one"
        )));
    }
    if given != b64(sha) {
        return Err(Error::InvalidArgument(format!(
            "x-amz-Checksum is not the SHA-256 of {what}: it was damaged on the way; send it again"
        )));
    }
    Ok(())
}

/// `POST /snapshots/completion/{id}`.
pub fn complete_snapshot(
    uploads: &Uploads,
    region: &Region,
    caller: &AccountId,
    id: &SnapshotId,
    header: Headers,
) -> Result<Reply> {
    let upload = match uploads.get(id, caller) {
        Ok(u) => u,
        // A retry of a completion whose answer was lost: the snapshot is
        // the caller's and complete, and saying so is the answer it missed.
        Err(e) => {
            return match region.read_snapshot_meta(id) {
                Ok(meta) if &meta.owner == caller => {
                    Ok(Reply::json(202, json!({"Status": "completed"})))
                }
                _ => Err(e),
            };
        }
    };
    let mut p = upload.lock().unwrap_or_else(|p| p.into_inner());
    if p.done {
        return Ok(Reply::json(202, json!({"Status": "completed"})));
    }
    let count = header("x-amz-changedblockscount")
        .and_then(|c| c.parse::<u64>().ok())
        .ok_or_else(|| Error::InvalidArgument("x-amz-ChangedBlocksCount is required".into()))?;
    if count != p.blocks.len() as u64 {
        return Err(Error::InvalidArgument(format!(
            "x-amz-ChangedBlocksCount is {count} but {} blocks were written to {id}",
            p.blocks.len()
        )));
    }
    if header("x-amz-checksum").is_some() {
        if let Some(m) = header("x-amz-checksum-aggregation-method")
            && m != "LINEAR"
        {
            return Err(Error::InvalidArgument(format!(
                "x-amz-Checksum-Aggregation-Method {m} is not LINEAR, the only one"
            )));
        }
        let mut all = Vec::with_capacity(p.blocks.len() * 32);
        for (_, sha) in p.blocks.values() {
            all.extend_from_slice(sha);
        }
        check_checksum(
            header,
            &sha256(&all),
            "the blocks' SHA-256 digests in order",
        )?;
    }
    // Kept until the manifest is written: a completion that fails (a full
    // disk) can be retried.
    let changed: Vec<(u64, Outcome)> = p.blocks.iter().map(|(i, (o, _))| (*i, o.clone())).collect();
    let parent_blocks = p
        .parent
        .as_ref()
        .map(|m| m.blocks.as_slice())
        .unwrap_or(&[]);
    let (blocks, stats) = merge_with_parent(parent_blocks, p.volume_size, BLOCK, changed);
    commit_as(
        &p.region,
        id.clone(),
        Taken {
            parent: p.parent.as_ref().map(|m| m.meta.id.clone()),
            owner: p.owner.clone(),
            volume_size: p.volume_size,
            block_size: BLOCK,
            description: p.description.clone(),
            tags: p.tags.clone(),
            source: p
                .tags
                .iter()
                .find(|t| t.key == SOURCE_TAG)
                .map_or_else(|| "EBS direct API".into(), |t| t.value.clone()),
            blocks,
            stats,
            kms_key_id: None,
        },
    )?;
    p.done = true;
    p.journal = None;
    drop(p);
    uploads
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id);
    uploads.forget(id);
    Ok(Reply::json(202, json!({"Status": "completed"})))
}

/// The query parameter of blocksnap's CLI reading a snapshot to launch
/// an image (`instance launch --endpoint`).
pub const LAUNCH_PARAM: &str = "launchImageId";

/// A snapshot readable by `caller` through this API: one they may
/// restore, or, with `launchImageId=ami-…`, one backing an image they may
/// launch (EC2 creates the volumes of a launch for anyone the image's
/// launch permission names, whoever may restore its snapshots: the same
/// bytes reach the same account either way).
fn readable_manifest(
    region: &Region,
    id: &SnapshotId,
    caller: &AccountId,
    query: &Params,
) -> Result<Manifest> {
    match query.get(LAUNCH_PARAM) {
        Some(ami) => {
            let ami: ImageId = ami.parse()?;
            let view = read_launchable(region, &ami, caller, "launch")?;
            let maps = |e: &crate::format::image::EbsMapping| &e.snapshot_id == id;
            if !view
                .image
                .block_device_mappings
                .iter()
                .any(|m| m.ebs().is_some_and(maps))
            {
                return Err(Error::Forbidden(format!(
                    "{ami} maps no volume to {id}: a launch reads only its image's snapshots"
                )));
            }
        }
        None => {
            readable(region, id, caller, "read the blocks of")?;
        }
    }
    let m = region.read_snapshot(id)?;
    if m.meta.block_size != BLOCK {
        return Err(Error::InvalidArgument(format!(
            "{id} has {}-byte blocks; the EBS direct API reads 512 KiB blocks",
            m.meta.block_size
        )));
    }
    Ok(m)
}

/// The paging of a list call: `startingBlockIndex`, `pageToken`,
/// `maxResults`.
struct Page {
    start: u64,
    max: usize,
}

fn page(query: &Params) -> Result<Page> {
    let num = |name: &str| -> Result<Option<u64>> {
        query
            .get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| Error::InvalidArgument(format!("{name} must be a whole number")))
            })
            .transpose()
    };
    let token = match query.get("pageToken") {
        Some(t) => Some(t.parse::<u64>().map_err(|_| {
            Error::InvalidArgument("pageToken is not one this server gave out".into())
        })?),
        None => None,
    };
    let max = num("maxResults")?.unwrap_or(MAX_RESULTS as u64);
    if !(100..=MAX_RESULTS as u64).contains(&max) {
        return Err(Error::InvalidArgument(format!(
            "maxResults is 100 to {MAX_RESULTS}"
        )));
    }
    Ok(Page {
        start: token.or(num("startingBlockIndex")?).unwrap_or(0),
        max: max as usize,
    })
}

/// `GET /snapshots/{id}/blocks`.
pub fn list_snapshot_blocks(
    region: &Region,
    caller: &AccountId,
    id: &SnapshotId,
    query: &Params,
) -> Result<Reply> {
    let m = readable_manifest(region, id, caller, query)?;
    let page = page(query)?;
    let mut out = Vec::new();
    let mut next = None;
    for (i, b) in m.blocks.iter().enumerate().skip(page.start as usize) {
        let Block::Data(c) = b else { continue };
        if out.len() == page.max {
            next = Some(i as u64);
            break;
        }
        out.push(json!({"BlockIndex": i, "BlockToken": token(id, i as u64, c)}));
    }
    Ok(list_page("Blocks", out, &m, next))
}

/// A page of a list call: the entries under `key`, the snapshot's size and
/// block size, and where the next page starts.
fn list_page(key: &str, entries: Vec<Value>, m: &Manifest, next: Option<u64>) -> Reply {
    let mut body = json!({
        key: entries,
        "ExpiryTime": expiry(),
        "VolumeSize": m.meta.volume_size.div_ceil(GIB),
        "BlockSize": BLOCK,
    });
    if let Some(n) = next {
        body["NextToken"] = json!(n.to_string());
    }
    Reply::json(200, body)
}

/// `GET /snapshots/{second}/changedblocks?firstSnapshotId=`.
pub fn list_changed_blocks(
    region: &Region,
    caller: &AccountId,
    second: &SnapshotId,
    query: &Params,
) -> Result<Reply> {
    let b = readable_manifest(region, second, caller, query)?;
    let a = match query.get("firstSnapshotId") {
        Some(f) => Some(readable_manifest(region, &f.parse()?, caller, query)?),
        None => None,
    };
    let page = page(query)?;
    let changed = match &a {
        Some(a) => changed_blocks(a, &b)?,
        None => changed_blocks(
            &Manifest {
                meta: b.meta.clone(),
                blocks: Vec::new(),
            },
            &b,
        )?,
    };
    let tok = |m: &Manifest, i: u64, blk: Option<Block>| match blk {
        Some(Block::Data(c)) => Some(token(&m.meta.id, i, &c)),
        _ => None,
    };
    let mut out = Vec::new();
    let mut next = None;
    for c in changed.into_iter().filter(|c| c.index >= page.start) {
        if out.len() == page.max {
            next = Some(c.index);
            break;
        }
        let mut entry = json!({"BlockIndex": c.index});
        if let Some(a) = &a
            && let Some(t) = tok(a, c.index, c.first)
        {
            entry["FirstBlockToken"] = json!(t);
        }
        if let Some(t) = tok(&b, c.index, c.second) {
            entry["SecondBlockToken"] = json!(t);
        }
        out.push(entry);
    }
    Ok(list_page("ChangedBlocks", out, &b, next))
}

/// `GET /snapshots/{id}/blocks/{index}?blockToken=`.
pub fn get_snapshot_block(
    region: &Region,
    caller: &AccountId,
    id: &SnapshotId,
    index: u64,
    query: &Params,
) -> Result<Reply> {
    let m = readable_manifest(region, id, caller, query)?;
    let given = query
        .get("blockToken")
        .ok_or_else(|| Error::InvalidArgument("blockToken is required".into()))?;
    let chunk = match m.blocks.get(index as usize) {
        Some(Block::Data(c)) if &token(id, index, c) == given => *c,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "blockToken is not that of block {index} of {id}: take it from \
                 ListSnapshotBlocks or ListChangedBlocks"
            )));
        }
    };
    let store = region.chunks_for(&m.meta)?;
    let mut data = Vec::with_capacity(BLOCK as usize);
    load_into(&store, &chunk, &mut data)?;
    let sha = sha256(&data);
    let len = data.len();
    Ok(Reply::bytes(200, data)
        .header("x-amz-Data-Length", len.to_string())
        .header("x-amz-Checksum", b64(&sha))
        .header("x-amz-Checksum-Algorithm", "SHA256"))
}

/// A block token: names the snapshot, the index and the chunk, so a token
/// of one block never reads another.
///
/// A client holding a block can tell whether it is the same without
/// reading it back: the CLI's incremental uploads and delta restores
/// compare the token of what they hold (`id`, index, its BLAKE3 name)
/// with the listed one.
pub fn token(id: &SnapshotId, index: u64, chunk: &ChunkId) -> String {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(id.as_str().as_bytes());
    bytes.extend_from_slice(&index.to_le_bytes());
    bytes.extend_from_slice(chunk.to_hex().as_bytes());
    let d = sha256(&bytes);
    // URL-safe, so it goes in a query as it is; the leading letter keeps
    // it from starting with `-`, which command lines (the AWS CLI's
    // `--block-token -…`) would take for an option.
    format!(
        "B{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&d[..24])
    )
}

use super::client::sha256;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An upload journal's line for block `index`:
/// `INDEX SHA256(base64) KIND CHUNK RAW STORED`.
fn encode_block(index: u64, outcome: &Outcome, sha: &[u8; 32]) -> String {
    let chunk = |b: &Block| match b {
        Block::Data(c) => c.to_hex(),
        Block::Zero => "zero".into(),
        Block::Hole => "hole".into(),
    };
    let (kind, block, raw, stored) = match outcome {
        Outcome::Hole => ("hole", "-".to_string(), 0, 0),
        Outcome::Zero => ("zero", "-".to_string(), 0, 0),
        Outcome::Unchanged(b) => ("unchanged", chunk(b), 0, 0),
        Outcome::Known(b, raw) => ("known", chunk(b), *raw, 0),
        Outcome::New { block, raw, stored } => ("new", chunk(block), *raw, *stored),
    };
    format!("{index} {} {kind} {block} {raw} {stored}\n", b64(sha))
}

fn decode_block(line: &str) -> Option<(u64, Outcome, [u8; 32])> {
    let f: Vec<&str> = line.split(' ').collect();
    let [index, sha, kind, block, raw, stored] = f[..] else {
        return None;
    };
    let sha: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(sha)
        .ok()?
        .try_into()
        .ok()?;
    let block = match block {
        "zero" => Block::Zero,
        "hole" | "-" => Block::Hole,
        hex => Block::Data(hex.parse().ok()?),
    };
    let (raw, stored): (u64, u64) = (raw.parse().ok()?, stored.parse().ok()?);
    let outcome = match kind {
        "hole" => Outcome::Hole,
        "zero" => Outcome::Zero,
        "unchanged" => Outcome::Unchanged(block),
        "known" => Outcome::Known(block, raw),
        "new" => Outcome::New { block, raw, stored },
        _ => return None,
    };
    Some((index.parse().ok()?, outcome, sha))
}

fn block_of(outcome: &Outcome) -> Option<Block> {
    match outcome {
        Outcome::Unchanged(b) | Outcome::Known(b, _) | Outcome::New { block: b, .. } => Some(*b),
        Outcome::Hole | Outcome::Zero => None,
    }
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn expiry() -> f64 {
    epoch(SystemTime::now() + TOKEN_LIFE).floor()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tokens_are_url_safe_and_never_look_like_an_option() {
        let id = SnapshotId::random();
        let chunk = ChunkId(*blake3::hash(b"a block").as_bytes());
        // A leading character is one of 64 for each token: thousands of
        // them would find a `-` if one could start a token.
        for index in 0..5000 {
            let t = token(&id, index, &chunk);
            assert!(!t.starts_with('-'), "{t}");
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{t}"
            );
        }
    }

    fn put(
        uploads: &Uploads,
        owner: &AccountId,
        id: &SnapshotId,
        index: u64,
        data: &[u8],
    ) -> Result<Reply> {
        let sum = b64(&sha256(data));
        let len = data.len().to_string();
        let header = move |name: &str| match name {
            "x-amz-data-length" => Some(len.clone()),
            "x-amz-checksum" => Some(sum.clone()),
            _ => None,
        };
        let body = Body { data, sha256: None };
        put_snapshot_block(uploads, owner, id, index, &header, body)
    }

    #[test]
    fn an_upload_past_its_timeout_is_dropped_and_gc_reclaims_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(Region::open_or_create(dir.path(), "local").unwrap());
        let owner: AccountId = "111111111111".parse().unwrap();
        let uploads = Uploads::default();
        let t0 = Instant::now();
        let started = start_snapshot(
            &uploads,
            region.clone(),
            &owner,
            br#"{"VolumeSize": 1, "Timeout": 10}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&started.body).unwrap();
        let id: SnapshotId = v["SnapshotId"].as_str().unwrap().parse().unwrap();
        let data: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8 + 1).collect();
        put(&uploads, &owner, &id, 0, &data).unwrap();
        // Another account cannot write into it.
        let other: AccountId = "222222222222".parse().unwrap();
        assert!(matches!(
            put(&uploads, &other, &id, 1, &data),
            Err(Error::NotFound(_))
        ));
        assert_eq!(uploads.expire(t0 + Duration::from_secs(9 * 60)), 0);
        assert_eq!(uploads.expire(t0 + Duration::from_secs(11 * 60)), 1);
        assert!(matches!(
            put(&uploads, &owner, &id, 1, &data),
            Err(Error::NotFound(_))
        ));
        assert!(!region.has_snapshot(&id).unwrap());
        let report = crate::ops::gc::gc(&region, false).unwrap();
        assert_eq!(report.chunks_removed, 1, "{report:?}");
    }

    #[test]
    fn a_block_of_zeros_is_checked_against_its_own_digest() {
        // The SHA-256 of 512 KiB of zeros, as `sha256sum` gives it.
        const ZEROS: &str = "B4VNL+8pega6gWheZgwzLeNtXRjVRpJ9MNqtbX/aFUE=";
        assert_eq!(b64(&zero_block_sha256()), ZEROS);
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(Region::open_or_create(dir.path(), "local").unwrap());
        let owner: AccountId = "111111111111".parse().unwrap();
        let uploads = Uploads::default();
        let started = start_snapshot(&uploads, region, &owner, br#"{"VolumeSize": 1}"#).unwrap();
        let v: Value = serde_json::from_slice(&started.body).unwrap();
        let id: SnapshotId = v["SnapshotId"].as_str().unwrap().parse().unwrap();
        let zeros = vec![0; BLOCK as usize];
        let put_zeros = |sum: &str| {
            let sum = sum.to_string();
            let header = move |name: &str| match name {
                "x-amz-data-length" => Some(BLOCK.to_string()),
                "x-amz-checksum" => Some(sum.clone()),
                _ => None,
            };
            let body = Body {
                data: &zeros,
                sha256: None,
            };
            put_snapshot_block(&uploads, &owner, &id, 3, &header, body)
        };
        let wrong = b64(&sha256(b"not zeros"));
        assert!(matches!(put_zeros(&wrong), Err(Error::InvalidArgument(_))));
        let reply = put_zeros(ZEROS).unwrap();
        assert_eq!(reply.status, 201);
    }

    #[test]
    fn journal_lines_give_back_what_was_kept() {
        let c = ChunkId::of(b"x");
        let sha = sha256(b"y");
        for o in [
            Outcome::Zero,
            Outcome::Unchanged(Block::Data(c)),
            Outcome::Known(Block::Data(c), 7),
            Outcome::New {
                block: Block::Data(c),
                raw: 9,
                stored: 4,
            },
        ] {
            let line = encode_block(42, &o, &sha);
            let (i, back, s) = decode_block(line.trim_end()).unwrap();
            assert_eq!((i, s), (42, sha));
            assert_eq!(format!("{back:?}"), format!("{o:?}"));
            // Cut short by a crash: not taken.
            assert!(decode_block(&line[..line.len() / 2]).is_none());
        }
    }

    #[test]
    fn one_client_token_sent_at_once_from_many_threads_starts_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(Region::open_or_create(dir.path(), "local").unwrap());
        let owner: AccountId = "111111111111".parse().unwrap();
        let uploads = Uploads::journaled(dir.path().join("uploads"));
        // A client's retries of one StartSnapshot, racing one another.
        for round in 0..5 {
            let body = format!(r#"{{"VolumeSize": 1, "ClientToken": "retry-{round}"}}"#);
            let ids: Vec<String> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            let r =
                                start_snapshot(&uploads, region.clone(), &owner, body.as_bytes())
                                    .unwrap();
                            assert_eq!(r.status, 201);
                            let v: Value = serde_json::from_slice(&r.body).unwrap();
                            v["SnapshotId"].as_str().unwrap().to_string()
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            assert!(ids.iter().all(|i| i == &ids[0]), "round {round}: {ids:?}");
        }
        let pending = uploads.pending.lock().unwrap().len();
        assert_eq!(pending, 5, "one upload for each token");
    }

    #[test]
    fn a_completion_sent_again_is_answered_as_the_first_was() {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(Region::open_or_create(dir.path(), "local").unwrap());
        let owner: AccountId = "111111111111".parse().unwrap();
        let other: AccountId = "222222222222".parse().unwrap();
        let uploads = Uploads::default();
        let started =
            start_snapshot(&uploads, region.clone(), &owner, br#"{"VolumeSize": 1}"#).unwrap();
        let v: Value = serde_json::from_slice(&started.body).unwrap();
        let id: SnapshotId = v["SnapshotId"].as_str().unwrap().parse().unwrap();
        let data: Vec<u8> = (0..BLOCK).map(|i| (i % 249) as u8 + 1).collect();
        put(&uploads, &owner, &id, 3, &data).unwrap();
        let header = |name: &str| (name == "x-amz-changedblockscount").then(|| "1".to_string());
        let complete = |who: &AccountId| complete_snapshot(&uploads, &region, who, &id, &header);
        assert_eq!(complete(&owner).unwrap().status, 202);
        // The client did not hear the answer and sends it again.
        let again = complete(&owner).unwrap();
        assert_eq!(again.status, 202);
        let v: Value = serde_json::from_slice(&again.body).unwrap();
        assert_eq!(v["Status"], "completed");
        assert_eq!(region.read_snapshot(&id).unwrap().blocks.len(), 2048);
        // Nobody else completes it, nor learns it exists.
        assert!(matches!(complete(&other), Err(Error::NotFound(_))));
        let never = SnapshotId::random();
        assert!(matches!(
            complete_snapshot(&uploads, &region, &owner, &never, &header),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn an_account_has_at_most_so_many_uploads_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(Region::open_or_create(dir.path(), "local").unwrap());
        let owner: AccountId = "111111111111".parse().unwrap();
        let uploads = Uploads::default();
        let start = |who: &AccountId| {
            start_snapshot(&uploads, region.clone(), who, br#"{"VolumeSize": 1}"#).unwrap()
        };
        for _ in 0..MAX_PENDING {
            assert_eq!(start(&owner).status, 201);
        }
        let refused = start(&owner);
        assert_eq!(refused.status, 402);
        assert_eq!(refused.code, Some("ServiceQuotaExceededException"));
        // Another account is not held back by it.
        assert_eq!(start(&"222222222222".parse().unwrap()).status, 201);
    }
}
