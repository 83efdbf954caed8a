//! A region: one store (a directory, or a prefix of an S3 bucket) holding
//! chunks, snapshot manifests and images, with `store.json` describing it.
//! Which backend a region name resolves to is kept in `regions.json` at the
//! store root (see [`super::defs`]); a name not defined there is a
//! directory of the store root. The layout is in [`super::backend`].

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use crate::error::{Error, IoContext, Location, Result};
use crate::format::image::{MAX_JSON, TagChange, decode_tags, encode_tags};
use crate::format::lease::{self, Lease, MAX_LEASE};
use crate::format::manifest::{self, Manifest, SnapshotMeta, Tag, validate_labels};
use crate::format::region::{
    MAX_STORE_JSON, RegionInfo, STORE_FORMAT, STORE_VERSION, decode_region_info, encode_region_info,
};
use crate::format::regions::RegionDef;
use crate::id::{AccountId, ChunkId, SnapshotId};
use crate::region::backend::{Backend, LocalBackend, RegionLock, create_new_durable};
use crate::region::defs;
use crate::region::keys::Keys;
use crate::region::s3::backend::S3Backend;
use crate::store::chunk_store::ChunkStore;
use crate::store::pool::map_io;
use crate::store::sealed::Keyed;
use crate::sys::LockMode;

/// Where the tags `CreateTags` gave a snapshot live, beside its manifest.
pub fn tags_key(id: &SnapshotId) -> String {
    format!("snapshot-tags/{id}.json")
}

/// Where a snapshot's create-volume permissions live, beside its manifest.
pub fn permissions_key(id: &SnapshotId) -> String {
    format!("snapshot-permissions/{id}.json")
}

/// Where snapshot `id`'s manifest lies while it is in the recycle bin:
/// byte for byte as it was under `snapshots/`.
pub fn binned_snapshot_key(id: &SnapshotId) -> String {
    format!("recycle-bin/snapshots/{id}")
}

/// The region used when none is named: the only one created on first use.
pub const DEFAULT_REGION: &str = "local";

pub struct Region {
    backend: Box<dyn Backend>,
    info: RegionInfo,
    chunks: Box<dyn ChunkStore>,
}

/// Snapshots found by [`Region::list_snapshots`], and manifests that could
/// not be read.
pub struct SnapshotListing {
    pub snapshots: Vec<SnapshotMeta>,
    pub damaged: Vec<Error>,
}

impl Region {
    /// Opens region `name` of the store at `store_root`: the backend
    /// `regions.json` defines for it, or the directory `<store_root>/<name>`.
    /// Creates the region on first use.
    pub fn open_or_create(store_root: &Path, name: &str) -> Result<Region> {
        defs::validate_region_name(name)?;
        let def = defs::lookup(store_root, name)?;
        Region::open_defined(store_root, name, def)
    }

    /// Opens region `name`: on the object store `def` names, or the
    /// directory `<store_root>/<name>`.
    fn open_defined(store_root: &Path, name: &str, def: Option<RegionDef>) -> Result<Region> {
        let backend: Box<dyn Backend> = match def {
            Some(def) => Box::new(S3Backend::connect(name, &def)?),
            None => Box::new(LocalBackend::new(store_root.join(name))),
        };
        Region::open_backend(backend, store_root, name)
    }

    /// Opens region `name` of the store at `store_root`, which must exist:
    /// defined with `region add`, or a local region already created. A
    /// name that is neither (a typo) is [`Error::NotFound`], listing the
    /// regions there are; nothing is created.
    pub fn open(store_root: &Path, name: &str) -> Result<Region> {
        defs::validate_region_name(name)?;
        let def = defs::lookup(store_root, name)?;
        if def.is_none() && !store_root.join(name).join("store.json").exists() {
            let mut known = defs::local(store_root)?;
            known.extend(defs::defined(store_root)?.into_keys());
            known.sort();
            let known = if known.is_empty() {
                "none yet".to_string()
            } else {
                known.join(", ")
            };
            return Err(Error::NotFound(format!(
                "region {name} does not exist in store {} (regions: {known}): check the name, or \
                 create it with `blocksnap region add {name}`",
                store_root.display()
            )));
        }
        Region::open_defined(store_root, name, def)
    }

    /// Opens (creating on first use) region `name` kept by `backend`; a new
    /// region is owned by the store's default account.
    pub fn open_backend(
        backend: Box<dyn Backend>,
        store_root: &Path,
        name: &str,
    ) -> Result<Region> {
        let info = match backend.read("store.json", "store description", MAX_STORE_JSON)? {
            Some(bytes) => decode_region_info(&bytes, &backend.locate("store.json"), name)?,
            None => {
                // A listing fails on a missing bucket, where a read only
                // finds no object (and some servers create buckets on PUT).
                backend.list("snapshots")?;
                let info = RegionInfo {
                    format: STORE_FORMAT.into(),
                    version: STORE_VERSION,
                    region: name.into(),
                    owner: store_account(store_root)?,
                    created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                };
                let json = encode_region_info(&info);
                // Two first commands racing: one creates it and both
                // then read the same description.
                backend.create("store.json", &json)?;
                let bytes = backend
                    .read("store.json", "store description", MAX_STORE_JSON)?
                    .ok_or_else(|| Error::CorruptFile {
                        what: "store description",
                        location: backend.locate("store.json"),
                        reason: "it vanished right after it was created".into(),
                    })?;
                decode_region_info(&bytes, &backend.locate("store.json"), name)?
            }
        };
        Ok(Region {
            chunks: backend.chunk_store(info.version),
            backend,
            info,
        })
    }

    /// The same region with its chunks kept by another [`ChunkStore`]
    /// (another backend, or a fault-injecting one in tests).
    pub fn with_chunk_store(self, chunks: Box<dyn ChunkStore>) -> Region {
        Region { chunks, ..self }
    }

    /// Where the region lives: a directory or an `s3://` URL.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn name(&self) -> &str {
        &self.info.region
    }

    /// The account acting: `account`, or the region's owner (the default
    /// account) when none is given.
    pub fn caller(&self, account: Option<&AccountId>) -> AccountId {
        account.unwrap_or(&self.info.owner).clone()
    }

    pub fn info(&self) -> &RegionInfo {
        &self.info
    }

    /// The chunk store as stored: plain chunks read as themselves, sealed
    /// ones only by their headers. Snapshot data goes through
    /// [`Region::chunks_for`].
    pub fn chunks(&self) -> &dyn ChunkStore {
        self.chunks.as_ref()
    }

    /// The region's encryption keys.
    pub fn keys(&self) -> Keys<'_> {
        Keys {
            backend: self.backend.as_ref(),
            region: &self.info.region,
            owner: &self.info.owner,
        }
    }

    /// The chunk store as the snapshot `meta` sees it: through its key when
    /// it is encrypted (which the acting account must be able to use).
    pub fn chunks_for(&self, meta: &SnapshotMeta) -> Result<Keyed<'_>> {
        self.chunks_under(meta.kms_key_id.as_ref())
    }

    /// The chunk store through key `key` (`None`: plain).
    pub fn chunks_under(&self, key: Option<&crate::id::KeyId>) -> Result<Keyed<'_>> {
        let key = match key {
            Some(k) => Some(self.keys().data_key(k)?),
            None => None,
        };
        Ok(Keyed::new(self.chunks(), key))
    }

    /// Where snapshot `id`'s manifest lies.
    pub fn snapshot_key(id: &SnapshotId) -> String {
        format!("snapshots/{id}")
    }

    fn not_found(&self, id: &SnapshotId) -> Error {
        let binned = self.has_binned_snapshot(id).unwrap_or(false);
        Error::SnapshotNotFound {
            id: id.clone(),
            region: self.name().to_string(),
            binned,
        }
    }

    /// Whether snapshot `id`'s manifest lies in the recycle bin.
    pub fn has_binned_snapshot(&self, id: &SnapshotId) -> Result<bool> {
        Ok(self
            .backend
            .read_head(&binned_snapshot_key(id), 0)?
            .is_some())
    }

    pub fn has_snapshot(&self, id: &SnapshotId) -> Result<bool> {
        Ok(self
            .backend
            .read_head(&Self::snapshot_key(id), 0)?
            .is_some())
    }

    /// The bytes of snapshot `id`'s manifest, and where they are.
    fn manifest_bytes(&self, id: &SnapshotId) -> Result<(Vec<u8>, Location)> {
        self.manifest_bytes_at(id, &Self::snapshot_key(id))
    }

    /// The bytes of snapshot `id`'s manifest at `key`, and where they are.
    fn manifest_bytes_at(&self, id: &SnapshotId, key: &str) -> Result<(Vec<u8>, Location)> {
        let bytes = self
            .backend
            .read(key, "snapshot manifest", manifest::MAX_MANIFEST_LEN)?
            .ok_or_else(|| self.not_found(id))?;
        Ok((bytes, self.backend.locate(key)))
    }

    /// Reads and checks a whole snapshot manifest. Its tags are those it
    /// was made with; [`Region::read_snapshot_meta`] gives the current ones.
    pub fn read_snapshot(&self, id: &SnapshotId) -> Result<Manifest> {
        let (bytes, path) = self.manifest_bytes(id)?;
        let keys = self.keys();
        let m = Manifest::decode_with(&bytes, &path, &|k| keys.data_key(k))?;
        self.check_name(&m.meta, id, &path)?;
        Ok(m)
    }

    /// Replaces `meta`'s tags with those `CreateTags` gave it, if any (an
    /// encrypted snapshot's tags are sealed in its manifest and never
    /// changed). Applied to every meta read ([`Region::read_snapshot_meta`],
    /// which listings, permissions, policies and the recycle bin go
    /// through), not to whole manifests read for their blocks.
    fn current_tags(&self, meta: &mut SnapshotMeta) -> Result<()> {
        if meta.sealed || meta.kms_key_id.is_some() {
            return Ok(());
        }
        if let Some(tags) = self.tag_record(&tags_key(&meta.id))? {
            meta.tags = tags;
        }
        Ok(())
    }

    /// The tags of the tag record (`blocksnap-tags`) at `key`, a
    /// snapshot's or an image's, if it has one.
    pub fn tag_record(&self, key: &str) -> Result<Option<Vec<Tag>>> {
        match self.backend.read(key, "tags", MAX_JSON)? {
            Some(b) => Ok(Some(decode_tags(&b, &self.backend.locate(key))?.tags)),
            None => Ok(None),
        }
    }

    /// Writes as the tag record at `key` the tags `tags` become by
    /// `change`, within EC2's limits (which count `description` with
    /// them). Returns the tags now.
    pub fn change_tag_record(
        &self,
        key: &str,
        tags: &[Tag],
        description: &str,
        change: &TagChange,
    ) -> Result<Vec<Tag>> {
        let record = change.apply(tags);
        validate_labels(description, &record.tags)?;
        self.backend.replace(key, &encode_tags(&record))?;
        Ok(record.tags)
    }

    /// The distinct chunk names snapshot `id` holds, read without a key.
    pub fn snapshot_chunk_names(&self, id: &SnapshotId) -> Result<Vec<ChunkId>> {
        self.chunk_names_at(id, &Self::snapshot_key(id))
    }

    /// The distinct chunk names of snapshot `id` in the recycle bin.
    pub fn binned_snapshot_chunk_names(&self, id: &SnapshotId) -> Result<Vec<ChunkId>> {
        self.chunk_names_at(id, &binned_snapshot_key(id))
    }

    fn chunk_names_at(&self, id: &SnapshotId, key: &str) -> Result<Vec<ChunkId>> {
        let (bytes, path) = self.manifest_bytes_at(id, key)?;
        let names = Manifest::chunk_names(&bytes, &path)?;
        let head = Manifest::meta_prefix_len(&bytes)
            .unwrap_or(bytes.len())
            .min(bytes.len());
        self.check_name(
            &Manifest::decode_meta(&bytes[..head], &path, bytes.len() as u64, None)?,
            id,
            &path,
        )?;
        Ok(names)
    }

    /// Reads and checks only the meta of a snapshot manifest. An encrypted
    /// one's sealed part (description, tags, source, counts) is opened if
    /// its key is at hand without asking ([`Keys::data_key_at_hand`]), and
    /// otherwise left [`SnapshotMeta::sealed`].
    pub fn read_snapshot_meta(&self, id: &SnapshotId) -> Result<SnapshotMeta> {
        self.meta_at(id, &Self::snapshot_key(id))
    }

    /// [`Region::read_snapshot_meta`] of a snapshot in the recycle bin.
    pub fn read_binned_snapshot_meta(&self, id: &SnapshotId) -> Result<SnapshotMeta> {
        self.meta_at(id, &binned_snapshot_key(id))
    }

    fn meta_at(&self, id: &SnapshotId, key: &str) -> Result<SnapshotMeta> {
        let path = self.backend.locate(key);
        let (mut head, file_len) = self
            .backend
            .read_head(key, manifest::HEADER_LEN as u64)?
            .ok_or_else(|| self.not_found(id))?;
        if let Some(n) = Manifest::meta_prefix_len(&head)
            && n > head.len()
        {
            head = self
                .backend
                .read_head(key, n as u64)?
                .ok_or_else(|| self.not_found(id))?
                .0;
        }
        let key = match Manifest::sealed_header(&head) {
            Some(k) => self.keys().data_key_at_hand(&k)?,
            None => None,
        };
        let mut meta = Manifest::decode_meta(&head, &path, file_len, key.as_deref())?;
        self.check_name(&meta, id, &path)?;
        self.current_tags(&mut meta)?;
        Ok(meta)
    }

    fn check_name(&self, meta: &SnapshotMeta, id: &SnapshotId, at: &Location) -> Result<()> {
        if &meta.id != id {
            return Err(Error::CorruptFile {
                what: "snapshot manifest",
                location: at.clone(),
                reason: format!("it describes {} instead", meta.id),
            });
        }
        Ok(())
    }

    /// When snapshot `id`'s manifest was committed, by the store's clock:
    /// every chunk it names was written before then.
    pub fn snapshot_committed_at(&self, id: &SnapshotId) -> Result<Option<SystemTime>> {
        self.backend.changed_at(&Self::snapshot_key(id))
    }

    /// Commits a snapshot: chunks are made durable first, then the manifest
    /// is created (never overwriting one). The snapshot exists from then on.
    pub fn write_snapshot(&self, m: &Manifest) -> Result<()> {
        let bytes = match &m.meta.kms_key_id {
            Some(k) => m.encode_sealed(self.keys().data_key(k)?.as_ref()),
            None => m.encode(),
        };
        self.chunks.sync()?;
        let key = Self::snapshot_key(&m.meta.id);
        if !self.backend.create(&key, &bytes)? {
            return Err(Error::AlreadyExists(format!(
                "snapshot {} already exists in region {}: snapshot ids never repeat, so this is a \
                 copy of a snapshot that is already there",
                m.meta.id,
                self.name()
            )));
        }
        Ok(())
    }

    /// Moves snapshot `id`'s manifest into the recycle bin (its bin entry
    /// is written first, by the caller): a copy at
    /// [`binned_snapshot_key`], then the original removed. Interrupted, the
    /// snapshot is still there and gc drops the half-made copy.
    pub fn move_snapshot_to_bin(&self, id: &SnapshotId) -> Result<()> {
        let (bytes, _) = self.manifest_bytes(id)?;
        self.backend.create(&binned_snapshot_key(id), &bytes)?;
        if !self.backend.remove(&Self::snapshot_key(id))? {
            return Err(self.not_found(id));
        }
        Ok(())
    }

    /// Moves snapshot `id`'s manifest back out of the recycle bin (the
    /// caller then removes its bin entry); where a move cut short left it
    /// in both places, only the bin's copy goes. Interrupted, the snapshot
    /// is back and gc drops what is left in the bin.
    pub fn move_snapshot_from_bin(&self, id: &SnapshotId) -> Result<()> {
        let (bytes, _) = self.manifest_bytes_at(id, &binned_snapshot_key(id))?;
        self.backend.create(&Self::snapshot_key(id), &bytes)?;
        self.backend.remove(&binned_snapshot_key(id))?;
        Ok(())
    }

    /// Removes snapshot `id`'s manifest from the recycle bin for good, and
    /// its permissions (the caller then removes its bin entry).
    pub fn purge_binned_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.backend.remove(&binned_snapshot_key(id))?;
        self.backend.remove(&permissions_key(id))?;
        self.backend.remove(&tags_key(id))?;
        Ok(())
    }

    /// Removes a snapshot manifest. Its chunks stay until `store gc`.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        if self.backend.remove(&Self::snapshot_key(id))? {
            self.backend.remove(&permissions_key(id))?;
            self.backend.remove(&tags_key(id))?;
            Ok(())
        } else {
            Err(self.not_found(id))
        }
    }

    /// Records that the lazy volume `lease` names reads snapshot `id`.
    pub fn add_lease(&self, id: &SnapshotId, lease: &Lease) -> Result<()> {
        self.backend.replace(
            &format!("leases/{id}/{}.json", lease.key()),
            &lease::encode(lease),
        )
    }

    /// Drops the lease `key` on snapshot `id`, if there is one.
    pub fn remove_lease(&self, id: &SnapshotId, key: &str) -> Result<()> {
        self.backend.remove(&format!("leases/{id}/{key}.json"))?;
        Ok(())
    }

    /// The leases on snapshot `id`: each key and lease.
    pub fn leases(&self, id: &SnapshotId) -> Result<Vec<(String, Lease)>> {
        let mut out = Vec::new();
        for name in self.backend.list(&format!("leases/{id}"))? {
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            let k = format!("leases/{id}/{name}");
            if let Some(bytes) = self.backend.read(&k, "lease", MAX_LEASE)? {
                out.push((
                    key.to_string(),
                    lease::decode(&bytes, &self.backend.locate(&k))?,
                ));
            }
        }
        Ok(out)
    }

    /// Ids of every snapshot manifest present, sorted.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let mut ids: Vec<SnapshotId> = self
            .backend
            .list("snapshots")?
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every snapshot, oldest first.
    pub fn list_snapshots(&self) -> Result<SnapshotListing> {
        let mut listing = SnapshotListing {
            snapshots: Vec::new(),
            damaged: Vec::new(),
        };
        let ids = self.snapshot_ids()?;
        let metas = map_io(self.chunks(), &ids, |id| self.read_snapshot_meta(id))?;
        for meta in metas {
            match meta {
                Ok(m) => listing.snapshots.push(m),
                // Removed between the listing and the read.
                Err(Error::SnapshotNotFound { .. }) => {}
                Err(e) => listing.damaged.push(e),
            }
        }
        listing
            .snapshots
            .sort_by(|a, b| (a.created_ns, &a.id).cmp(&(b.created_ns, &b.id)));
        Ok(listing)
    }

    /// Takes the catalog lock (see [`Backend::catalog_lock`]).
    pub fn catalog_lock(&self, purpose: &str) -> Result<RegionLock> {
        self.backend.catalog_lock(purpose)
    }

    /// Takes the policy lock (see [`Backend::policy_lock`]).
    pub fn policy_lock(&self, purpose: &str) -> Result<RegionLock> {
        self.backend.policy_lock(purpose)
    }

    /// Takes the region lock, waiting up to a minute for a conflicting one.
    pub fn lock(&self, mode: LockMode, purpose: &str) -> Result<RegionLock> {
        self.backend.lock(mode, purpose)
    }
}

/// The store's default account, shared by all its regions: read from
/// `<store>/account`, or created there on first use.
fn store_account(store_root: &Path) -> Result<AccountId> {
    let path = store_root.join("account");
    if !path.exists() {
        // Of racing first commands exactly one account wins and all read it.
        create_new_durable(&path, format!("{}\n", AccountId::random()).as_bytes())?;
    }
    let text = fs::read_to_string(&path).ctx("read", &path)?;
    text.trim().parse().map_err(|_| Error::CorruptFile {
        what: "store account",
        location: path.clone().into(),
        reason: format!("{:?} is not a 12-digit account id", text.trim()),
    })
}

/// Creates local region `name`, the directory `<store>/name`. Refuses a
/// name already in use, by a definition or by a local region.
pub fn add_local(store_root: &Path, name: &str) -> Result<Region> {
    defs::validate_region_name(name)?;
    defs::locked(store_root, || {
        defs::refuse_taken(store_root, &defs::read_file(store_root)?, name)?;
        Region::open_or_create(store_root, name)
    })
}
