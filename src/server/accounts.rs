//! The server's accounts and their access keys.
//!
//! One JSON file, `<store>/server/accounts.json`, in a directory only the
//! server's user may enter (0700), the file itself 0600: the secret access
//! keys are kept in clear because a SigV4 signature can only be checked by
//! recomputing it from the secret, as AWS does. Nothing else in the store
//! holds a secret. Changes take an exclusive `flock` on
//! `server/accounts.lock`, so `account` commands may run beside a server,
//! which reads the file again whenever it changes.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Location, Result};
use crate::id::AccountId;
use crate::store::files::{Durability, read_bounded, write_atomic};
use crate::sys::{self, LockMode};

const FILE: &str = "accounts.json";
const LOCK: &str = "accounts.lock";
const FORMAT: u32 = 1;
/// A key file larger than this is not ours.
const MAX_FILE: u64 = 16 << 20;

/// What tells one version of the key file from another.
pub type FileVersion = (u64, u64, i64, i64);

/// An account of the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Account {
    pub id: AccountId,
    #[serde(default)]
    pub name: String,
    /// Seconds since the epoch.
    pub created: u64,
    #[serde(default)]
    pub keys: Vec<AccessKey>,
}

/// An access key: its id is public, its secret is shown once, when made.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AccessKey {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub created: u64,
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKey")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<secret>")
            .finish()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyFile {
    format: u32,
    accounts: Vec<Account>,
}

/// The accounts of a store's server.
#[derive(Debug, Clone)]
pub struct Accounts {
    dir: PathBuf,
}

impl Accounts {
    /// The accounts of the store at `store_root` (none until one is made).
    pub fn of_store(store_root: &Path) -> Accounts {
        Accounts {
            dir: store_root.join("server"),
        }
    }

    /// The key file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Every account, with its keys.
    pub fn list(&self) -> Result<Vec<Account>> {
        Ok(self.read()?.accounts)
    }

    /// The account holding access key `access_key_id`, and the key.
    pub fn find_key(&self, access_key_id: &str) -> Result<Option<(AccountId, AccessKey)>> {
        Ok(find_key(&self.read()?.accounts, access_key_id))
    }

    /// A fingerprint of the key file (inode, size, change time): the
    /// server reads the file again when it changes.
    pub fn version(&self) -> Option<FileVersion> {
        let md = fs::metadata(self.path()).ok()?;
        Some((md.ino(), md.size(), md.ctime(), md.ctime_nsec()))
    }

    /// Makes a new account with one access key.
    pub fn create(&self, name: &str) -> Result<(Account, AccessKey)> {
        if name.len() > 128 || name.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(
                "an account name is at most 128 characters, none of them control characters".into(),
            ));
        }
        self.change(|file| {
            let mut id = AccountId::random();
            while file.accounts.iter().any(|a| a.id == id) {
                id = AccountId::random();
            }
            let key = new_key(&file.accounts);
            let account = Account {
                id,
                name: name.to_string(),
                created: now(),
                keys: vec![key.clone()],
            };
            file.accounts.push(account.clone());
            Ok((account, key))
        })
    }

    /// Adds an access key to `account` (rotation: make the new key, move
    /// clients to it, delete the old one).
    pub fn create_key(&self, account: &AccountId) -> Result<AccessKey> {
        self.change(|file| {
            let key = new_key(&file.accounts);
            let a = find_account(&mut file.accounts, account)?;
            if a.keys.len() >= 2 {
                return Err(Error::Conflict(format!(
                    "account {account} has two access keys already, as many as AWS allows: \
                     delete one (account keys delete {account} KEY) first"
                )));
            }
            a.keys.push(key.clone());
            Ok(key)
        })
    }

    /// Deletes access key `access_key_id` of `account`.
    pub fn delete_key(&self, account: &AccountId, access_key_id: &str) -> Result<()> {
        self.change(|file| {
            let a = find_account(&mut file.accounts, account)?;
            let before = a.keys.len();
            a.keys.retain(|k| k.access_key_id != access_key_id);
            if a.keys.len() == before {
                return Err(Error::NotFound(format!(
                    "account {account} has no access key {access_key_id}: see account list"
                )));
            }
            Ok(())
        })
    }

    /// Deletes `account` and its keys. What it owns in the store stays.
    pub fn delete(&self, account: &AccountId) -> Result<()> {
        self.change(|file| {
            find_account(&mut file.accounts, account)?;
            file.accounts.retain(|a| &a.id != account);
            Ok(())
        })
    }

    fn read(&self) -> Result<KeyFile> {
        let path = self.path();
        let Some(bytes) = read_bounded(&path, "account key file", MAX_FILE)? else {
            return Ok(KeyFile {
                format: FORMAT,
                accounts: Vec::new(),
            });
        };
        let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptFile {
            what: "account key file",
            location: Location::Path(path.clone()),
            reason: format!("not an account key file: {e}"),
        })?;
        if file.format > FORMAT {
            return Err(Error::UnsupportedVersion {
                what: "account key file",
                location: Location::Path(path),
                found: file.format,
                supported: FORMAT,
            });
        }
        Ok(file)
    }

    /// Reads, changes and writes the key file under its lock.
    fn change<T>(&self, f: impl FnOnce(&mut KeyFile) -> Result<T>) -> Result<T> {
        private_dir(&self.dir)?;
        let lock_path = self.dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx("open", &lock_path)?;
        sys::lock(&lock, LockMode::Exclusive).ctx("lock", &lock_path)?;
        let mut file = self.read()?;
        let out = f(&mut file)?;
        file.format = FORMAT;
        let bytes = serde_json::to_vec_pretty(&file).expect("accounts serialise");
        let path = self.path();
        write_atomic(&path, &bytes, Durability::Now)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).ctx("chmod 600", &path)?;
        drop(lock);
        Ok(out)
    }
}

/// The account holding `access_key_id` among `accounts`, and the key.
pub fn find_key(accounts: &[Account], access_key_id: &str) -> Option<(AccountId, AccessKey)> {
    accounts.iter().find_map(|a| {
        a.keys
            .iter()
            .find(|k| k.access_key_id == access_key_id)
            .map(|k| (a.id.clone(), k.clone()))
    })
}

fn find_account<'a>(accounts: &'a mut [Account], id: &AccountId) -> Result<&'a mut Account> {
    accounts
        .iter_mut()
        .find(|a| &a.id == id)
        .ok_or_else(|| Error::NotFound(format!("no account {id} on this server: see account list")))
}

/// Creates `dir` (0700) or checks that only its owner may enter it.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    if let Some(root) = dir.parent() {
        fs::create_dir_all(root).ctx("create store directory", root)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).ctx("create", dir),
    }
    let md = fs::metadata(dir).ctx("stat", dir)?;
    if md.mode() & 0o077 != 0 {
        return Err(Error::Forbidden(format!(
            "{} holds secret keys and others may enter it (mode {:o}): chmod 700 it",
            dir.display(),
            md.mode() & 0o777
        )));
    }
    Ok(())
}

/// A fresh key whose id no account has.
fn new_key(accounts: &[Account]) -> AccessKey {
    loop {
        let id = access_key_id();
        if find_key(accounts, &id).is_none() {
            let mut secret = [0u8; 30];
            getrandom::fill(&mut secret).expect("the OS random number generator failed");
            return AccessKey {
                access_key_id: id,
                secret_access_key: base64::engine::general_purpose::STANDARD.encode(secret),
                created: now(),
            };
        }
    }
}

/// `AKIA` and 16 characters of base32, as AWS's long-term key ids look.
fn access_key_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random number generator failed");
    let mut id = String::from("AKIA");
    id.extend(bytes.iter().map(|b| ALPHABET[(b % 32) as usize] as char));
    id
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_keys_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::of_store(dir.path());
        assert!(accounts.list().unwrap().is_empty());
        let (a, k1) = accounts.create("alice").unwrap();
        assert!(k1.access_key_id.starts_with("AKIA") && k1.access_key_id.len() == 20);
        assert_eq!(k1.secret_access_key.len(), 40);
        let mode = fs::metadata(accounts.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(dir.path().join("server")).unwrap().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        let k2 = accounts.create_key(&a.id).unwrap();
        assert!(matches!(
            accounts.create_key(&a.id),
            Err(Error::Conflict(_))
        ));
        assert_eq!(
            accounts.find_key(&k2.access_key_id).unwrap().unwrap().0,
            a.id
        );
        accounts.delete_key(&a.id, &k1.access_key_id).unwrap();
        assert!(accounts.find_key(&k1.access_key_id).unwrap().is_none());
        assert!(matches!(
            accounts.delete_key(&a.id, &k1.access_key_id),
            Err(Error::NotFound(_))
        ));
        let (b, _) = accounts.create("").unwrap();
        accounts.delete(&a.id).unwrap();
        let left = accounts.list().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, b.id);
        assert!(!format!("{k2:?}").contains(&k2.secret_access_key));
    }

    #[test]
    fn a_directory_others_may_enter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let server = dir.path().join("server");
        fs::create_dir(&server).unwrap();
        fs::set_permissions(&server, fs::Permissions::from_mode(0o755)).unwrap();
        let err = Accounts::of_store(dir.path()).create("x").unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
}
