//! A region's encryption keys (a local KMS): `keys/<key id>.json`, the
//! region's encryption defaults (`encryption.json`), and the process-wide
//! [`Keyring`] that turns a key id into a usable [`DataKey`] — checking
//! that the key is enabled and that the acting account owns it or was
//! granted it, and unwrapping its material with the passphrase.
//!
//! Keys are regional, as KMS keys are: a snapshot copied to another region
//! is sealed again under a key of that region.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use zeroize::Zeroizing;

use crate::error::{Error, IoContext, Result};
use crate::format::key::{
    self, DataKey, EncryptionDefaults, KeyFile, KeyRecord, MAX_KEY_FILE, Material,
};
use crate::id::{AccountId, KeyId};
use crate::region::backend::Backend;

/// The alias of the key a region creates on first use, as EBS's
/// `alias/aws/ebs`.
pub const DEFAULT_ALIAS: &str = "aws/ebs";
const MAX_ALIAS: usize = 256;
const MAX_KEY_DESCRIPTION: usize = 8192;

/// Asks for a passphrase on the terminal (`prompt`, and `confirm` again
/// when a new one is set); `None` where there is no terminal.
pub type Prompt = dyn Fn(&str, bool) -> Option<Result<Zeroizing<String>>> + Send + Sync;

/// Where keys come from for this process: the passphrase (given, or asked
/// for on a terminal), key files, and the acting account. Installed once
/// by the binary ([`install`]).
pub struct Keyring {
    passphrase: Mutex<Option<Zeroizing<String>>>,
    prompt: Option<Box<Prompt>>,
    key_files: Vec<PathBuf>,
    account: Option<AccountId>,
    unlocked: Mutex<HashMap<KeyId, Arc<DataKey>>>,
    /// Keys [`Keys::data_key_at_hand`] could not use, and why.
    refused: Mutex<HashMap<KeyId, String>>,
    /// Held while a key is unwrapped: racing readers of one key unwrap it
    /// once.
    unwrapping: Mutex<()>,
}

impl Keyring {
    pub fn new(
        passphrase: Option<Zeroizing<String>>,
        prompt: Option<Box<Prompt>>,
        key_files: Vec<PathBuf>,
        account: Option<AccountId>,
    ) -> Keyring {
        Keyring {
            passphrase: Mutex::new(passphrase),
            prompt,
            key_files,
            account,
            unlocked: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            unwrapping: Mutex::new(()),
        }
    }

    /// The passphrase: given, or asked for once on the terminal (where
    /// `ask`).
    fn passphrase(&self, what: &str, confirm: bool, ask: bool) -> Result<Zeroizing<String>> {
        let mut slot = self.passphrase.lock().expect("passphrase lock");
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let asked = match &self.prompt {
            Some(p) if ask => p(what, confirm),
            _ => None,
        };
        match asked {
            Some(p) => {
                let p = p?;
                *slot = Some(p.clone());
                Ok(p)
            }
            None => Err(Error::Key(format!(
                "{what} needs the passphrase: set BLOCKSNAP_PASSPHRASE, pass --passphrase-file \
                 FILE, or run on a terminal to be asked"
            ))),
        }
    }
}

static KEYRING: OnceLock<Keyring> = OnceLock::new();

/// Installs the process's keyring; only the first call counts.
pub fn install(k: Keyring) {
    let _ = KEYRING.set(k);
}

fn keyring() -> &'static Keyring {
    KEYRING.get_or_init(|| Keyring::new(None, None, Vec::new(), None))
}

/// The keys [`Keys::data_key_at_hand`] found unusable in this process, and
/// why, by key.
pub fn refusals() -> Vec<(KeyId, String)> {
    let mut out: Vec<_> = keyring()
        .refused
        .lock()
        .expect("keyring lock")
        .iter()
        .map(|(k, why)| (*k, why.clone()))
        .collect();
    out.sort();
    out
}

fn record_key(id: &KeyId) -> String {
    format!("keys/{id}.json")
}

/// A region's keys: its backend, name (for ARNs) and default account.
pub struct Keys<'a> {
    pub backend: &'a dyn Backend,
    pub region: &'a str,
    pub owner: &'a AccountId,
}

/// What `key create` makes.
pub struct NewKey<'a> {
    pub owner: AccountId,
    pub alias: Option<&'a str>,
    pub description: &'a str,
    /// Keep the material in this file instead of the store.
    pub key_file: Option<&'a Path>,
}

impl Keys<'_> {
    /// The account acting in this process.
    pub fn caller(&self) -> AccountId {
        keyring()
            .account
            .clone()
            .unwrap_or_else(|| self.owner.clone())
    }

    /// `arn:aws:kms:<region>:<owner>:key/<key id>`, as KMS names a key.
    pub fn arn(&self, r: &KeyRecord) -> String {
        format!("arn:aws:kms:{}:{}:key/{}", self.region, r.owner, r.key_id)
    }

    fn not_found(&self, spec: &str) -> Error {
        Error::NotFound(format!(
            "key {spec} not found in region {}: run `blocksnap key list` to see the keys there, \
             or `blocksnap key create` to make one",
            self.region
        ))
    }

    /// Every key of the region, oldest first.
    pub fn list(&self) -> Result<Vec<KeyRecord>> {
        let mut out = Vec::new();
        for name in self.backend.list("keys")? {
            let Some(id) = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<KeyId>().ok())
            else {
                continue;
            };
            if let Some(r) = self.read(&id)? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| (&a.created, a.key_id).cmp(&(&b.created, b.key_id)));
        Ok(out)
    }

    fn read(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        let k = record_key(id);
        let Some(bytes) = self.backend.read(&k, "key", MAX_KEY_FILE)? else {
            return Ok(None);
        };
        let at = self.backend.locate(&k);
        let r = key::decode_record(&bytes, &at)?;
        if r.key_id != *id {
            return Err(Error::CorruptFile {
                what: "key",
                location: at,
                reason: format!("it describes key {} instead", r.key_id),
            });
        }
        Ok(Some(r))
    }

    /// The key `spec` names: a key id, `alias/NAME`, or either as an ARN.
    /// An alias is the acting account's own, as in KMS (another account's
    /// is named by its ARN); `alias/aws/ebs` is created for the account on
    /// first use.
    pub fn resolve(&self, spec: &str) -> Result<KeyRecord> {
        let (account, local) = match spec.strip_prefix("arn:aws:kms:") {
            Some(rest) => {
                // <region>:<account>:key/<id> | alias/<name>
                let mut parts = rest.splitn(3, ':');
                let (region, account, what) = (parts.next(), parts.next(), parts.next());
                if region != Some(self.region) {
                    return Err(Error::InvalidArgument(format!(
                        "key {spec} is not a key of region {}: keys are regional; name a key of \
                         this region",
                        self.region
                    )));
                }
                let account: AccountId = account.unwrap_or_default().parse()?;
                let what = what.ok_or_else(|| self.not_found(spec))?;
                let local = what.strip_prefix("key/").unwrap_or(what).to_string();
                (account, local)
            }
            None => (self.caller(), spec.to_string()),
        };
        if let Some(alias) = local.strip_prefix("alias/") {
            let found = self
                .list()?
                .into_iter()
                .find(|r| r.alias.as_deref() == Some(alias) && r.owner == account);
            return match found {
                Some(r) => Ok(r),
                // As KMS does, the default key comes into being when first
                // named by its account.
                None if alias == DEFAULT_ALIAS && account == self.caller() => self.default_key(),
                None => Err(self.not_found(spec)),
            };
        }
        let id: KeyId = local.parse()?;
        self.read(&id)?.ok_or_else(|| self.not_found(spec))
    }

    /// Creates a key; its material is wrapped under the passphrase and kept
    /// in the region, or in `key_file`.
    pub fn create(&self, new: &NewKey) -> Result<KeyRecord> {
        if let Some(a) = new.alias {
            validate_alias(a)?;
            if a.starts_with("aws/") {
                return Err(Error::InvalidArgument(format!(
                    "alias/{a}: aliases beginning with alias/aws/ are reserved for the keys \
                     blocksnap creates itself"
                )));
            }
        }
        self.create_unchecked(new)
    }

    fn create_unchecked(&self, new: &NewKey) -> Result<KeyRecord> {
        if new.description.chars().count() > MAX_KEY_DESCRIPTION {
            return Err(Error::InvalidArgument(format!(
                "a key description has at most {MAX_KEY_DESCRIPTION} characters"
            )));
        }
        let _lock = self.backend.catalog_lock("key create")?;
        if let Some(a) = new.alias
            && self
                .list()?
                .iter()
                .any(|r| r.alias.as_deref() == Some(a) && r.owner == new.owner)
        {
            return Err(Error::AlreadyExists(format!(
                "alias/{a} already names a key of account {} in region {}: choose another alias",
                new.owner, self.region
            )));
        }
        if let Some(p) = new.key_file
            && p.exists()
        {
            return Err(Error::AlreadyExists(format!(
                "key file {} already exists: blocksnap never overwrites a key file (its key \
                 would be lost); choose another path",
                p.display()
            )));
        }
        let id = KeyId::random();
        let material = Material::random();
        let passphrase = keyring().passphrase(&format!("new key {id}"), true, true)?;
        let wrapped = key::wrap(&material, &id, passphrase.as_bytes());
        let record = KeyRecord {
            key_id: id,
            owner: new.owner.clone(),
            alias: new.alias.map(str::to_string),
            description: new.description.to_string(),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            enabled: true,
            grants: Vec::new(),
            wrapped: match new.key_file {
                Some(path) => {
                    let file = key::encode_key_file(&KeyFile {
                        key_id: id,
                        wrapped,
                    });
                    write_key_file(path, &file)?;
                    None
                }
                None => Some(wrapped),
            },
        };
        self.backend
            .create(&record_key(&id), &key::encode_record(&record))?;
        keyring()
            .unlocked
            .lock()
            .expect("keyring lock")
            .insert(id, Arc::new(DataKey::new(id, &material)));
        Ok(record)
    }

    /// Changes key `spec` with `change`, which only its owner may do.
    pub fn update(
        &self,
        spec: &str,
        action: &str,
        change: impl FnOnce(&mut KeyRecord),
    ) -> Result<KeyRecord> {
        let _lock = self.backend.catalog_lock("key update")?;
        let mut r = self.resolve(spec)?;
        let caller = self.caller();
        if r.owner != caller {
            return Err(Error::Key(format!(
                "account {caller} may not {action} key {}: only its owner {} may",
                r.key_id, r.owner
            )));
        }
        change(&mut r);
        self.backend
            .replace(&record_key(&r.key_id), &key::encode_record(&r))?;
        Ok(r)
    }

    /// The key to seal a new snapshot under: `spec`, or the region's
    /// default (`encryption.json`'s key, else `alias/aws/ebs`, created on
    /// first use as EBS creates its default key).
    pub fn choose(&self, spec: Option<&str>) -> Result<KeyRecord> {
        if let Some(s) = spec {
            return self.resolve(s);
        }
        if let Some(id) = self.defaults()?.kms_key_id {
            return self.resolve(&id.to_string());
        }
        self.resolve(&format!("alias/{DEFAULT_ALIAS}"))
    }

    /// The acting account's `alias/aws/ebs`, created on first use.
    fn default_key(&self) -> Result<KeyRecord> {
        let made = self.create_unchecked(&NewKey {
            owner: self.caller(),
            alias: Some(DEFAULT_ALIAS),
            description: "Default key that protects my EBS volumes when no other key is defined",
            key_file: None,
        });
        match made {
            // Another command created it first.
            Err(Error::AlreadyExists(_)) => self.resolve(&format!("alias/{DEFAULT_ALIAS}")),
            other => other,
        }
    }

    /// The key `id`, ready to seal and open with, for the acting account:
    /// the key must exist, be enabled, and be owned by or granted to the
    /// account; its material is unwrapped with the passphrase.
    pub fn data_key(&self, id: &KeyId) -> Result<Arc<DataKey>> {
        self.unlock(id, true)
    }

    /// Key `id` if this process can use it without asking for the
    /// passphrase: unlocked already, or unwrapped with the passphrase or
    /// key file given. `None` where it cannot (no passphrase, a wrong one,
    /// not granted, disabled: [`refusals`] says why); the answer holds for
    /// the rest of the process. For what may be shown without a key.
    pub fn data_key_at_hand(&self, id: &KeyId) -> Result<Option<Arc<DataKey>>> {
        let ring = keyring();
        if let Some(k) = ring.unlocked.lock().expect("keyring lock").get(id) {
            return Ok(Some(k.clone()));
        }
        if ring.refused.lock().expect("keyring lock").contains_key(id) {
            return Ok(None);
        }
        match self.unlock(id, false) {
            Ok(k) => Ok(Some(k)),
            Err(Error::Key(why) | Error::NotFound(why)) => {
                ring.refused.lock().expect("keyring lock").insert(*id, why);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn unlock(&self, id: &KeyId, ask: bool) -> Result<Arc<DataKey>> {
        let r = self.read(id)?.ok_or_else(|| {
            Error::Key(format!(
                "key {id} is not in region {}: the snapshot was sealed under a key this region \
                 no longer has, and cannot be read",
                self.region
            ))
        })?;
        let caller = self.caller();
        if r.owner != caller && !r.grants.contains(&caller) {
            return Err(Error::Key(format!(
                "account {caller} may not use key {id} (owner {}): the owner must grant it with \
                 `blocksnap key grant {id} --grantee {caller}`",
                r.owner
            )));
        }
        if !r.enabled {
            return Err(Error::Key(format!(
                "key {id} is disabled: its owner can enable it with `blocksnap key enable {id}`"
            )));
        }
        let ring = keyring();
        let _one = ring.unwrapping.lock().expect("keyring lock");
        if let Some(k) = ring.unlocked.lock().expect("keyring lock").get(id) {
            return Ok(k.clone());
        }
        let (wrapped, at) = match &r.wrapped {
            Some(w) => (w.clone(), self.backend.locate(&record_key(id))),
            None => self.wrapped_in_key_file(id)?,
        };
        let passphrase = ring.passphrase(&format!("key {id}"), false, ask)?;
        let material = key::unwrap(&wrapped, id, passphrase.as_bytes(), &at)?
            .ok_or_else(|| Error::Key(format!("wrong passphrase for key {id}")))?;
        let k = Arc::new(DataKey::new(*id, &material));
        ring.unlocked
            .lock()
            .expect("keyring lock")
            .insert(*id, k.clone());
        Ok(k)
    }

    fn wrapped_in_key_file(&self, id: &KeyId) -> Result<(key::WrappedKey, crate::error::Location)> {
        for path in &keyring().key_files {
            let bytes = std::fs::read(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound(format!(
                    "key file {} does not exist: check the path given with --key-file",
                    path.display()
                )),
                _ => Error::Io {
                    op: "read key file",
                    path: path.clone(),
                    source: e,
                },
            })?;
            if bytes.len() as u64 > MAX_KEY_FILE {
                return Err(Error::CorruptFile {
                    what: "key file",
                    location: path.clone().into(),
                    reason: "it is larger than any key file".into(),
                });
            }
            let f = key::decode_key_file(&bytes, &path.clone().into())?;
            if f.key_id == *id {
                return Ok((f.wrapped, path.clone().into()));
            }
        }
        Err(Error::Key(format!(
            "key {id} is kept in a key file, outside the store: pass --key-file PATH (or set \
             BLOCKSNAP_KEY_FILE) to use it"
        )))
    }

    /// The region's encryption defaults.
    pub fn defaults(&self) -> Result<EncryptionDefaults> {
        match self
            .backend
            .read("encryption.json", "encryption settings", MAX_KEY_FILE)?
        {
            Some(b) => key::decode_defaults(&b, &self.backend.locate("encryption.json")),
            None => Ok(EncryptionDefaults::default()),
        }
    }

    pub fn set_defaults(&self, d: &EncryptionDefaults) -> Result<()> {
        self.backend
            .replace("encryption.json", &key::encode_defaults(d))
    }
}

fn validate_alias(a: &str) -> Result<()> {
    let ok = !a.is_empty()
        && a.len() <= MAX_ALIAS
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "alias {a:?}: give --alias NAME of 1-{MAX_ALIAS} letters, digits, '/', '_' or '-' \
             (it is then used as alias/NAME)"
        )))
    }
}

/// Writes a new key file, readable by its owner only, never replacing one.
fn write_key_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .ctx("create key file", path)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .ctx("write key file", path)
}
